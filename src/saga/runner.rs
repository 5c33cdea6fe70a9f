//! Carries out what [`super::machine`] decides: runs the steps, writes the journal (every
//! write a compare-and-swap that takes or renews this delivery's lease), publishes outcomes
//! only after the journal write that stands for them won, and returns the verdict.

use chrono::{DateTime, Utc};
use tracing::{Instrument, info, info_span, warn};

use super::announce::republish;
use super::journal::{self, Journal, RescindRecord, Sla, StepName, Stored, write_indexes};
use super::machine::{self, AfterConflict, Arrival, Holding, Next, SaveFor, Stop};
use super::outcome::{self, OutcomeType, outcome_of};
use super::ownership::{LOCAL_PATIENCE, holding};
use super::ports::Outcomes;
use super::run::Run;
use super::{Delivery, Deps, Failed, StepError, Verdict, bucket_for, steps};
use crate::cxone::{CallLog, Cxone};
use crate::event::{Command, Event, Termination};
use crate::store::{Store, StoreError, keys};

/// Runs (or resumes) the saga of an event and says what to do with the message.
pub async fn run<C: Cxone, S: Store, O: Outcomes>(
    deps: &Deps<C, S>,
    event: &Event,
    delivery: &Delivery,
    outcomes: &O,
) -> Verdict {
    let span = info_span!(
        "saga",
        saga_id = %event.saga_id(),
        external_id = %event.employee().external_id,
        stage = ?delivery.stage,
    );
    async {
        match &event.command {
            Command::Terminate(t) => terminate(deps, event, t, delivery, outcomes).await,
            Command::Rescind(r) => {
                super::compensate::rescind(deps, event, r, &delivery.holder, outcomes).await
            }
        }
    }
    .instrument(span)
    .await
}

/// The SLA of a termination arriving now (CONTRACT §4 `sla`).
pub(crate) fn sla(revoke_within_secs: u64, t: &Termination, now: DateTime<Utc>) -> Sla {
    let from = t.effective_at.map(|e| e.with_timezone(&Utc)).unwrap_or(now);
    Sla {
        revoke_within_secs,
        due_at: from + chrono::Duration::seconds(i64::try_from(revoke_within_secs).unwrap_or(0)),
        met: None,
    }
}

async fn terminate<C: Cxone, S: Store, O: Outcomes>(
    deps: &Deps<C, S>,
    event: &Event,
    t: &Termination,
    delivery: &Delivery,
    outcomes: &O,
) -> Verdict {
    let saga_id = event.saga_id();
    let Some(_entered) = deps
        .local
        .enter(&saga_id, &delivery.holder.delivery, LOCAL_PATIENCE)
        .await
    else {
        info!("another copy of this event is running in this process; waiting in a delay queue");
        return Verdict::Wait;
    };
    let now = Utc::now();
    let loaded = match journal::load(deps.store.as_ref(), &saga_id).await {
        Ok(l) => l,
        Err(e) if e.is_transient() => {
            return Verdict::Park {
                reason: format!("reading the journal: {e}"),
            };
        }
        Err(e) => {
            // Nothing may be published that a journal write did not win; an operator fixes
            // or removes the journal and replays the dead letter.
            warn!(error = %e, "the saga journal is unreadable");
            return Verdict::DeadLetter(Failed {
                class: super::FailureClass::Permanent,
                message: format!("{e}: fix or remove the journal, then replay this message"),
                step: None,
                saga_id: Some(saga_id),
            });
        }
    };
    let holding = match &loaded {
        Some(s) => holding(deps, &s.journal, &delivery.holder, now).await,
        None => Holding::Free,
    };
    let due = !crate::event::is_future(t.effective_at, now);
    let arrival = machine::arrive(
        loaded.as_ref().map(|s| &s.journal),
        delivery.stage,
        &holding,
        due,
        delivery.released,
    );
    let calls = CallLog::default();
    let mut run = Run {
        cxone: deps.cxone.recording(calls.clone()),
        calls,
        deps,
        event,
        termination: t,
        delivery,
        stored: Stored {
            journal: Journal::new(&saga_id, event, now),
            etag: None,
        },
        resumed: false,
        plan: t.options.dry_run,
        leased: false,
        conflicts: 0,
        started: tokio::time::Instant::now(),
    };
    let verdict = match arrival {
        Arrival::New => {
            run.stored.journal.sla = Some(sla(deps.settings.sla.revoke_within_secs, t, now));
            if due {
                run.drive(outcomes).await
            } else {
                run.schedule(outcomes).await
            }
        }
        Arrival::Republish(kind) => {
            let j = loaded
                .map(|s| s.journal)
                .unwrap_or_else(|| run.stored.journal.clone());
            info!(state = ?j.state, "saga already finished; publishing its outcome again");
            republish(deps, &j, kind, outcomes).await
        }
        Arrival::HandOverAgain => {
            info!("access removal is done; handing over to housekeeping again");
            Verdict::HandOver
        }
        Arrival::NotDue => Verdict::Defer {
            secs: bucket_for(
                t.effective_at
                    .map(|e| (e.with_timezone(&Utc) - now).num_seconds())
                    .unwrap_or(1),
                &deps.settings.worker.schedule_buckets_secs,
            ),
            reason: "scheduled".to_owned(),
        },
        Arrival::StillHeld => {
            info!("saga is held by the mass-deletion guard; keeping it held");
            Verdict::Hold
        }
        Arrival::Busy(holder) => {
            info!(%holder, "another delivery runs this saga; waiting");
            Verdict::Wait
        }
        Arrival::Compensate | Arrival::Resume => {
            let Some(mut stored) = loaded else {
                return Verdict::Wait;
            };
            run.resumed = stored.journal.started();
            machine::reopen(&mut stored.journal, delivery.released, now);
            run.stored = stored;
            run.drive(outcomes).await
        }
    };
    if matches!(
        verdict,
        Verdict::Park { .. } | Verdict::Defer { .. } | Verdict::Requeue | Verdict::Wait
    ) {
        run.release().await;
    }
    verdict
}

/// Conflicts one delivery resolves before it steps aside.
const MAX_CONFLICTS: u32 = 5;

impl<C: Cxone, S: Store> Run<'_, C, S> {
    async fn drive<O: Outcomes>(&mut self, outcomes: &O) -> Verdict {
        // While access is not yet removed, this saga counts towards the oldest-unrevoked age
        // (the SLA-at-risk alert).
        let j = self.journal();
        let _unrevoked = (j.revoked_at.is_none() && !self.plan && j.rescind.is_none()).then(|| {
            self.deps
                .metrics
                .unrevoked(j.event_time().unwrap_or(j.created_at))
        });
        self.drive_steps(outcomes).await
    }

    async fn drive_steps<O: Outcomes>(&mut self, outcomes: &O) -> Verdict {
        loop {
            if self.delivery.draining.is_cancelled() && self.stored.etag.is_some() {
                return self.park_for_shutdown().await;
            }
            let next = machine::next(self.journal(), self.facts());
            match next {
                Next::Step(step) => {
                    if let Some(verdict) = self.step(step, outcomes).await {
                        return verdict;
                    }
                }
                Next::Save(why) => {
                    if why == SaveFor::Manifest {
                        machine::prepare_manifest(self.journal_mut(), Utc::now());
                    }
                    match self.save().await {
                        Ok(()) => {}
                        Err(StoreError::Conflict { .. }) => {
                            return self.after_conflict(outcomes).await;
                        }
                        Err(e) => {
                            let step = self.journal().next_step().unwrap_or(StepName::Resolve);
                            return self.stop(step, StepError::Store(e), outcomes).await;
                        }
                    }
                    if why == SaveFor::Create
                        && let Err(e) = self.check_pending_rescind().await
                    {
                        return Verdict::Park {
                            reason: format!("checking for an earlier rescind: {e}"),
                        };
                    }
                }
                Next::Admit => {
                    if let Some(verdict) = self.admit(outcomes).await {
                        return verdict;
                    }
                }
                Next::Verify => {
                    if let Some(verdict) = self.verify(outcomes).await {
                        return verdict;
                    }
                }
                Next::HandOver => {
                    machine::hand_over(self.journal_mut());
                    return match self.write().await {
                        Ok(()) => {
                            self.deps.metrics.saga_handed_over();
                            info!("access removed and verified; handed over to housekeeping");
                            Verdict::HandOver
                        }
                        Err(StoreError::Conflict { .. }) => self.after_conflict(outcomes).await,
                        Err(e) => Verdict::Park {
                            reason: format!("saving the hand-over: {e}"),
                        },
                    };
                }
                Next::Compensate => return self.compensate(outcomes).await,
                Next::Complete => return self.complete(outcomes).await,
            }
        }
    }

    /// Runs one step; `Some` ends the run.
    async fn step<O: Outcomes>(&mut self, step: StepName, outcomes: &O) -> Option<Verdict> {
        let started = Utc::now();
        {
            let rec = self.journal_mut().step_mut(step);
            rec.attempts += 1;
            rec.started_at = Some(started);
            rec.error = None;
        }
        let span = info_span!("step", step = step.as_str());
        let result = if step == StepName::Resolve && self.stored.etag.is_none() {
            // A new saga: its index entries are written while CXone is read, so a rescind can
            // find the saga before anything in CXone changes.
            let deps = self.deps;
            let j = &self.stored.journal;
            let (external_id, saga_id, created) = (
                j.employee.external_id.clone(),
                j.saga_id.clone(),
                j.created_at,
            );
            let (indexes, result) = tokio::join!(
                write_indexes(deps.store.as_ref(), &external_id, &saga_id, created),
                steps::execute(self, step).instrument(span)
            );
            match indexes {
                Ok(()) => result,
                Err(e) => Err(StepError::Store(e)),
            }
        } else {
            steps::execute(self, step).instrument(span).await
        };
        let finished = Utc::now();
        self.deps.metrics.step_finished(
            step.as_str(),
            (finished - started).num_milliseconds() as f64 / 1000.0,
        );
        match result {
            Ok(result) => {
                let had_revoked = self.journal().revoked_at.is_some();
                machine::step_done(self.journal_mut(), step, result, finished);
                if !had_revoked && let Some(secs) = machine::time_to_revoke(self.journal()) {
                    self.deps.metrics.time_to_revoke(secs);
                    if let Some(met) = self.journal().sla.as_ref().and_then(|s| s.met) {
                        self.deps.metrics.sla_revocation(met);
                    }
                }
                None
            }
            Err(e) if e.is_conflict() => Some(self.after_conflict(outcomes).await),
            Err(StepError::Slice) => {
                info!(
                    step = step.as_str(),
                    "time slice used up; continuing in a fresh delivery"
                );
                Some(Verdict::Requeue)
            }
            Err(e) => Some(self.stop(step, e, outcomes).await),
        }
    }

    /// The mass-deletion guard, before the first destructive call; `Some` ends the run.
    async fn admit<O: Outcomes>(&mut self, outcomes: &O) -> Option<Verdict> {
        let now = Utc::now();
        if self.delivery.released {
            machine::admitted(self.journal_mut(), "released", now);
            return None;
        }
        let admitted = self
            .deps
            .gate
            .admit(
                self.deps.store.as_ref(),
                &self.deps.settings.guard,
                &self.stored.journal.saga_id,
            )
            .await;
        match admitted {
            Ok(true) => {
                machine::admitted(self.journal_mut(), "admitted", now);
                None
            }
            Ok(false) => {
                warn!("mass-deletion guard: window full; holding the saga for an operator");
                Some(self.hold(outcomes).await)
            }
            Err(super::guard::GuardError::Unreadable(why)) => {
                // Fail closed: a window nobody can read must not wave deletions through.
                warn!(%why, "mass-deletion guard window unreadable; holding the saga");
                Some(self.hold(outcomes).await)
            }
            Err(super::guard::GuardError::Store(e)) => {
                warn!(error = %e, "mass-deletion guard window not writable now; parking the saga");
                Some(Verdict::Park {
                    reason: format!("mass-deletion guard: {e}"),
                })
            }
        }
    }

    async fn hold<O: Outcomes>(&mut self, outcomes: &O) -> Verdict {
        machine::hold(self.journal_mut());
        match self.write().await {
            Ok(()) => {}
            Err(StoreError::Conflict { .. }) => return self.after_conflict(outcomes).await,
            Err(e) => {
                return Verdict::Park {
                    reason: format!("saving the held journal: {e}"),
                };
            }
        }
        self.deps.metrics.saga_held();
        let out = outcome_of(self.journal(), OutcomeType::Held, &self.deps.settings);
        if let Err(e) = outcomes.publish(&out).await {
            return Verdict::Park {
                reason: format!("publishing the held outcome: {e}"),
            };
        }
        Verdict::Hold
    }

    /// The verification re-read; `Some` ends the run.
    async fn verify<O: Outcomes>(&mut self, outcomes: &O) -> Option<Verdict> {
        let seen = match steps::verify::read(self).await {
            Ok(seen) => seen,
            Err(e) => return Some(self.stop(StepName::RevokeKeys, e, outcomes).await),
        };
        let sessions = self.termination.options.terminate_sessions;
        match machine::verified(self.journal_mut(), seen, sessions, Utc::now()) {
            Ok(()) => {
                info!("verified: CXone shows no access left");
                None
            }
            Err(message) => {
                warn!(%message, "verification failed; revoking again later");
                let step = StepName::ACCESS[1..]
                    .iter()
                    .copied()
                    .find(|s| !self.journal().step(*s).status.is_settled())
                    .unwrap_or(StepName::RevokeKeys);
                Some(
                    self.stop(step, StepError::Transient(message), outcomes)
                        .await,
                )
            }
        }
    }

    /// A step failed: park, defer or fail, as the machine decides.
    async fn stop<O: Outcomes>(
        &mut self,
        step: StepName,
        error: StepError,
        outcomes: &O,
    ) -> Verdict {
        if matches!(error, StepError::Defer { .. })
            && step == StepName::Logout
            && let Some(verdict) = self.revoke_keys_while_waiting(outcomes).await
        {
            return verdict;
        }
        let delays = self.deps.settings.worker.retry_delays_secs.len() as u32;
        let parks = self.delivery.parks;
        let stop = machine::step_failed(
            self.journal_mut(),
            step,
            error.failure(),
            parks,
            delays,
            Utc::now(),
        );
        let stored = self.stored.etag.is_some();
        match stop {
            Stop::Park { reason } => {
                warn!(step = step.as_str(), error = %error, parks = self.delivery.parks, "transient failure; parking the saga");
                if stored {
                    match self.write().await {
                        Ok(()) => {}
                        Err(StoreError::Conflict { .. }) => {
                            return self.after_conflict(outcomes).await;
                        }
                        Err(e) => warn!(error = %e, "could not save the journal while parking"),
                    }
                }
                Verdict::Park { reason }
            }
            Stop::Defer { secs, reason } => {
                if stored && let Err(e) = self.write().await {
                    warn!(error = %e, "could not save the journal before waiting");
                }
                info!(step = step.as_str(), secs, %reason, "step deferred");
                Verdict::Defer { secs, reason }
            }
            Stop::Fail { class, message } => {
                warn!(step = step.as_str(), class = class.as_str(), error = %message, "saga failed; access stays as it is now");
                // Only a failure the journal records is published.
                match self.write().await {
                    Ok(()) => {}
                    Err(StoreError::Conflict { .. }) => return self.after_conflict(outcomes).await,
                    Err(e) => {
                        return Verdict::Park {
                            reason: format!("saving the failed journal: {e}"),
                        };
                    }
                }
                let out = outcome::build(self.journal(), OutcomeType::Failed, None);
                if let Err(e) = outcomes.publish(&out).await {
                    return Verdict::Park {
                        reason: format!("publishing the failed outcome: {e}"),
                    };
                }
                self.deps.metrics.saga_finished("FAILED");
                Verdict::DeadLetter(Failed {
                    class,
                    message,
                    step: Some(step.as_str().to_owned()),
                    saga_id: Some(self.journal().saga_id.clone()),
                })
            }
        }
    }

    /// While the logout waits for a live call, API keys must not stay usable.
    async fn revoke_keys_while_waiting<O: Outcomes>(&mut self, outcomes: &O) -> Option<Verdict> {
        if self
            .journal()
            .step(StepName::RevokeKeys)
            .status
            .is_settled()
        {
            return None;
        }
        Box::pin(self.step(StepName::RevokeKeys, outcomes)).await
    }

    async fn park_for_shutdown(&mut self) -> Verdict {
        self.stored.journal.lease = None;
        if let Err(e) = self.write().await {
            warn!(error = %e, "could not save progress before shutdown; resuming from the last save");
        }
        info!("shutting down: saga saved and handed back to the queue");
        Verdict::Requeue
    }

    /// A journal write lost a race: re-read and decide again.
    async fn after_conflict<O: Outcomes>(&mut self, outcomes: &O) -> Verdict {
        self.conflicts += 1;
        let theirs =
            match journal::load(self.deps.store.as_ref(), &self.stored.journal.saga_id).await {
                Ok(Some(t)) => t,
                Ok(None) => return Verdict::Wait,
                Err(e) => {
                    return Verdict::Park {
                        reason: format!("re-reading the journal after a conflict: {e}"),
                    };
                }
            };
        match machine::after_conflict(&theirs.journal, &self.delivery.holder) {
            AfterConflict::Republish(kind) => {
                info!("the saga was finished by someone else meanwhile");
                republish(self.deps, &theirs.journal, kind, outcomes).await
            }
            AfterConflict::Compensate if self.conflicts <= MAX_CONFLICTS => {
                info!("a rescind arrived while this delivery ran the saga; compensating");
                if let Some(r) = theirs.journal.rescind.clone() {
                    machine::rescinded(self.journal_mut(), r);
                }
                self.stored.etag = theirs.etag;
                Box::pin(self.compensate(outcomes)).await
            }
            _ => {
                info!(holder = ?theirs.journal.lease.as_ref().map(|l| &l.owner), "someone else moved the saga; stepping aside");
                Verdict::Wait
            }
        }
    }

    /// After the first write: a rescind for this employee that arrived before this saga
    /// existed covers it if the termination was decided before the rescind.
    async fn check_pending_rescind(&mut self) -> Result<(), StoreError> {
        let key = keys::pending_rescind(&self.stored.journal.employee.external_id);
        let Some(obj) = self.deps.store.get(&key).await? else {
            return Ok(());
        };
        let Ok(pending) = serde_json::from_slice::<super::compensate::Pending>(&obj.body) else {
            warn!(%key, "unreadable pending rescind; ignored");
            return Ok(());
        };
        if pending.covers(self.stored.journal.event_time()) {
            info!("a rescind for this employee arrived before this termination; cancelling");
            machine::rescinded(
                self.journal_mut(),
                RescindRecord {
                    event_id: pending.event_id,
                    source: pending.source,
                    received_at: pending.received_at,
                },
            );
        }
        Ok(())
    }

    /// A future-dated termination: journal it, say so once, wait in the bucketed queues.
    async fn schedule<O: Outcomes>(&mut self, outcomes: &O) -> Verdict {
        machine::schedule(self.journal_mut());
        let j = &self.stored.journal;
        if let Err(e) = write_indexes(
            self.deps.store.as_ref(),
            &j.employee.external_id,
            &j.saga_id,
            j.created_at,
        )
        .await
        {
            return Verdict::Park {
                reason: format!("indexing the saga: {e}"),
            };
        }
        match self.write().await {
            Ok(()) => {}
            Err(StoreError::Conflict { .. }) => return self.after_conflict(outcomes).await,
            Err(e) => {
                return Verdict::Park {
                    reason: format!("saving the schedule: {e}"),
                };
            }
        }
        if let Err(e) = self.check_pending_rescind().await {
            return Verdict::Park {
                reason: format!("checking for an earlier rescind: {e}"),
            };
        }
        if self.journal().rescind.is_some() {
            return self.compensate(outcomes).await;
        }
        let out = outcome_of(self.journal(), OutcomeType::Scheduled, &self.deps.settings);
        if let Err(e) = outcomes.publish(&out).await {
            return Verdict::Park {
                reason: format!("publishing the scheduled outcome: {e}"),
            };
        }
        info!(effective_at = ?self.termination.effective_at, "termination scheduled");
        let remaining = self
            .termination
            .effective_at
            .map(|t| (t.with_timezone(&Utc) - Utc::now()).num_seconds())
            .unwrap_or(1);
        Verdict::Defer {
            secs: bucket_for(remaining, &self.deps.settings.worker.schedule_buckets_secs),
            reason: "scheduled".to_owned(),
        }
    }

    /// Undoes what CXone shows done, holding the lease; then the final write, the rescind
    /// manifest and `saga.compensated`.
    async fn compensate<O: Outcomes>(&mut self, outcomes: &O) -> Verdict {
        if !self.leased {
            match self.save().await {
                Ok(()) => {}
                Err(StoreError::Conflict { .. }) => return self.after_conflict(outcomes).await,
                Err(e) => {
                    return Verdict::Park {
                        reason: format!("taking the lease to compensate: {e}"),
                    };
                }
            }
        }
        let report =
            match super::compensate::undo(&self.cxone, &self.deps.settings, &self.stored.journal)
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    return Verdict::Park {
                        reason: format!("compensating: {e}"),
                    };
                }
            };
        machine::compensated(
            self.journal_mut(),
            report.document,
            report.cancelled,
            Utc::now(),
        );
        match self.write().await {
            Ok(()) => {}
            Err(StoreError::Conflict { .. }) => return self.after_conflict(outcomes).await,
            Err(e) => {
                return Verdict::Park {
                    reason: format!("saving the compensated journal: {e}"),
                };
            }
        }
        self.deps.metrics.saga_finished("COMPENSATED");
        info!(cancelled = report.cancelled, "termination rescinded");
        republish(
            self.deps,
            self.journal(),
            OutcomeType::Compensated,
            outcomes,
        )
        .await
    }

    async fn complete<O: Outcomes>(&mut self, outcomes: &O) -> Verdict {
        let plan = self.plan;
        let kind = machine::complete(self.journal_mut(), plan, Utc::now());
        match self.write().await {
            Ok(()) => {}
            Err(StoreError::Conflict { .. }) => return self.after_conflict(outcomes).await,
            Err(e) => {
                return Verdict::Park {
                    reason: format!("saving the completed journal: {e}"),
                };
            }
        }
        let out = outcome_of(self.journal(), kind, &self.deps.settings);
        if let Err(e) = outcomes.publish(&out).await {
            return Verdict::Park {
                reason: format!("publishing the outcome: {e}"),
            };
        }
        let status = self
            .journal()
            .status
            .map(|s| s.as_str())
            .unwrap_or("DELETED");
        self.deps.metrics.saga_finished(status);
        info!(status, "saga finished");
        Verdict::Settled
    }
}
