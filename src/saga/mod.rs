//! The offboarding saga: one per termination event, steps in order (access cut first), a
//! journal in S3 so any worker can resume it, and a verdict the broker layer carries out.
//!
//! The saga knows neither lapin nor reqwest nor the AWS SDK: it talks to [`Cxone`],
//! [`Store`] and [`Outcomes`], with in-memory fakes in the unit tests.

mod compensate;
pub mod guard;
pub mod handler;
pub mod journal;
pub mod outcome;
mod steps;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::broker::dead_letter::{DeadLetter, ErrorClass};
use crate::config::Settings;
use crate::cxone::{CALL_LOG, CallRecord, Cxone, CxoneError};
use crate::event::{Command, Event};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError, Write};
use journal::{
    ErrorRecord, FinalStatus, GuardRecord, Journal, Lease, SagaState, StepName, StepStatus, Stored,
};
use outcome::{OutcomeType, Outcomes};

/// Namespace of saga ids (UUID v5 over `source` + `id`).
const SAGA_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x2b8e_51c0_7d3a_4f69_b1e4_93c2_6a0d_7f18);

/// The saga id of an event: the same for every redelivery and re-publication.
pub fn saga_id(source: &str, event_id: &str) -> String {
    uuid::Uuid::new_v5(&SAGA_NAMESPACE, format!("{source}\n{event_id}").as_bytes()).to_string()
}

/// How long a lease holds without being renewed by a journal write.
pub const LEASE_SECS: i64 = 120;

/// What went wrong in a step, classified.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Cxone(#[from] CxoneError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A condition that retrying cannot change (e.g. two CXone users with one external id).
    #[error("{0}")]
    Permanent(String),
    /// Worth another try later (e.g. a notification endpoint down).
    #[error("{0}")]
    Transient(String),
    /// Not now: come back in `secs` (e.g. the agent is on a live call).
    #[error("{reason}")]
    Defer { secs: u64, reason: String },
}

impl StepError {
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Cxone(e) => e.is_transient(),
            Self::Store(e) => e.is_transient() || matches!(e, StoreError::Conflict { .. }),
            Self::Permanent(_) => false,
            Self::Transient(_) | Self::Defer { .. } => true,
        }
    }

    pub fn http_status(&self) -> Option<u16> {
        match self {
            Self::Cxone(e) => e.status,
            _ => None,
        }
    }
}

/// What the broker layer must do with the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Done and published: ack.
    Settled,
    /// Failed and its `saga.failed` outcome published: dead-letter with these headers.
    DeadLetter(DeadLetter),
    /// A transient failure: park in the next delay queue (or fail as exhausted there).
    Park { reason: String },
    /// Another worker holds the saga's lease: wait in the shortest delay queue.
    Wait,
    /// Shutting down: progress is saved; put the message straight back on the work queue.
    Requeue,
    /// Not due yet (scheduled, or waiting for a live contact to end): back in `secs`.
    Defer { secs: u64, reason: String },
    /// The mass-deletion guard stopped it: park in the held queue for an operator.
    Hold,
}

/// Everything a saga needs from the outside.
pub struct Deps<C, S> {
    pub cxone: Arc<C>,
    pub store: Arc<S>,
    pub settings: Arc<Settings>,
    /// This process's lease owner id.
    pub owner: String,
    pub metrics: Metrics,
    /// Batches this process's admissions through the mass-deletion guard.
    pub gate: Arc<guard::Gate>,
    /// The HRIS webhook client, built on first use and shared by every saga of this worker,
    /// so a layoff's thousands of notifications reuse its connections.
    pub(crate) webhook: Arc<std::sync::OnceLock<Result<reqwest::Client, String>>>,
}

impl<C, S> Deps<C, S> {
    pub fn new(
        cxone: Arc<C>,
        store: Arc<S>,
        settings: Arc<Settings>,
        owner: String,
        metrics: Metrics,
    ) -> Self {
        Self {
            cxone,
            store,
            settings,
            owner,
            metrics,
            gate: Arc::new(guard::Gate::default()),
            webhook: Arc::default(),
        }
    }
}

impl<C, S> Clone for Deps<C, S> {
    fn clone(&self) -> Self {
        Self {
            cxone: self.cxone.clone(),
            store: self.store.clone(),
            settings: self.settings.clone(),
            owner: self.owner.clone(),
            metrics: self.metrics.clone(),
            gate: self.gate.clone(),
            webhook: self.webhook.clone(),
        }
    }
}

/// About one delivery of the event.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The broker redelivered it: whoever had it before is gone, so its lease may be taken.
    pub redelivered: bool,
    /// Times this message was parked after transient failures.
    pub parks: u32,
    /// Cancelled when shutdown begins: stop between steps.
    pub draining: CancellationToken,
    /// An operator released it from the mass-deletion guard.
    pub released: bool,
}

impl Delivery {
    pub fn new(draining: CancellationToken) -> Self {
        Self {
            redelivered: false,
            parks: 0,
            draining,
            released: false,
        }
    }
}

/// State of one run (one delivery) of a saga.
pub(crate) struct Run<'a, C, S> {
    pub deps: &'a Deps<C, S>,
    pub event: &'a Event,
    pub stored: Stored,
    /// The saga had started before this run: every write step reads first.
    pub resumed: bool,
    /// Dry run: read everything, write nothing in CXone or the archive.
    pub plan: bool,
    pub calls: Arc<std::sync::Mutex<Vec<CallRecord>>>,
}

/// What a step reports.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum StepResult {
    Done(Option<String>),
    Skipped(String),
    /// `resolve` found nobody: the saga ends `ALREADY_ABSENT`.
    Absent(String),
    /// Dry run: what the step would do.
    Planned(String, serde_json::Value),
}

/// Picks the largest bucket not longer than `remaining` (the smallest when none is).
pub fn bucket_for(remaining_secs: i64, buckets: &[u64]) -> u64 {
    let remaining = u64::try_from(remaining_secs.max(1)).unwrap_or(1);
    let mut sorted: Vec<u64> = buckets.to_vec();
    sorted.sort_unstable();
    sorted
        .iter()
        .rev()
        .find(|b| **b <= remaining)
        .copied()
        .or_else(|| sorted.first().copied())
        .unwrap_or(1)
}

impl<C: Cxone, S: Store> Deps<C, S> {
    /// Runs (or resumes) the saga of a termination event and says what to do with the message.
    pub async fn run_termination<O: Outcomes>(
        &self,
        event: &Event,
        delivery: &Delivery,
        outcomes: &O,
    ) -> Verdict {
        let id = saga_id(event.source.as_str(), event.id.as_str());
        let span = info_span!("saga", saga_id = %id, external_id = %event.employee().external_id);
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        CALL_LOG
            .scope(
                calls.clone(),
                self.run_inner(id, event, delivery, outcomes, calls),
            )
            .instrument(span)
            .await
    }

    async fn run_inner<O: Outcomes>(
        &self,
        id: String,
        event: &Event,
        delivery: &Delivery,
        outcomes: &O,
        calls: Arc<std::sync::Mutex<Vec<CallRecord>>>,
    ) -> Verdict {
        let now = Utc::now();
        let Command::Terminate(termination) = &event.command else {
            return self.run_rescind(event, delivery, outcomes).await;
        };
        let loaded = match journal::load(self.store.as_ref(), &id).await {
            Ok(l) => l,
            Err(e) if e.is_transient() => {
                return Verdict::Park {
                    reason: format!("reading the journal: {e}"),
                };
            }
            Err(e) => {
                let mut stored = Stored {
                    journal: Journal::new(&id, event, now),
                    etag: None,
                };
                return self
                    .fail_stored(
                        &mut stored,
                        None,
                        ErrorClass::Permanent,
                        &e.to_string(),
                        outcomes,
                    )
                    .await;
            }
        };
        let due = !crate::event::is_future(termination.effective_at, now);
        let mut stored = match loaded {
            Some(stored) => stored,
            None => {
                let mut stored = Stored {
                    journal: Journal::new(&id, event, now),
                    etag: None,
                };
                // A rescind that arrived before its termination cancels it.
                match compensate::early_rescind(self, event).await {
                    Ok(Some(r)) => {
                        stored.journal.rescind = Some(r);
                        return self.cancel_or_compensate(stored, outcomes).await;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        return Verdict::Park {
                            reason: e.to_string(),
                        };
                    }
                }
                if !due {
                    return self
                        .schedule(stored, termination.effective_at, outcomes)
                        .await;
                }
                stored
            }
        };
        let j = &stored.journal;
        if j.state.is_final() {
            info!(state = ?j.state, "saga already finished; re-publishing its outcome");
            return self.republish(j, outcomes).await;
        }
        if j.rescind.is_some() {
            return self.cancel_or_compensate(stored, outcomes).await;
        }
        if !due {
            let secs = bucket_for(
                termination
                    .effective_at
                    .map(|t| (t.with_timezone(&Utc) - now).num_seconds())
                    .unwrap_or(1),
                &self.settings.worker.schedule_buckets_secs,
            );
            return Verdict::Defer {
                secs,
                reason: "scheduled".to_owned(),
            };
        }
        if j.leased_by_other(&self.owner, now) && !delivery.redelivered {
            info!(owner = ?j.lease.as_ref().map(|l| &l.owner), "saga leased by another worker; waiting");
            return Verdict::Wait;
        }
        if j.state == SagaState::Held && !delivery.released {
            info!("saga is held by the mass-deletion guard; keeping it held");
            return Verdict::Hold;
        }
        let released = j.state == SagaState::Held && delivery.released;
        let resumed = stored.journal.started();
        if stored.etag.is_some() {
            let j = &mut stored.journal;
            j.lease = Some(self.lease(now));
            j.state = SagaState::Running;
            j.error = None;
            // A failed (or scheduled, or held) saga resumes: its verdict is open again.
            if matches!(
                j.status,
                Some(FinalStatus::Failed | FinalStatus::Scheduled | FinalStatus::Held)
            ) {
                j.status = None;
            }
            j.completed_at = None;
            if released {
                j.guard = Some(GuardRecord {
                    how: "released".to_owned(),
                    at: now,
                });
            }
            for s in j.steps.iter_mut() {
                if s.status == StepStatus::Failed {
                    s.status = StepStatus::Pending;
                }
            }
            match journal::save(self.store.as_ref(), &mut stored).await {
                Ok(()) => {}
                Err(StoreError::Conflict { .. }) => return Verdict::Wait,
                Err(e) => {
                    return Verdict::Park {
                        reason: format!("taking the lease: {e}"),
                    };
                }
            }
        } else {
            stored.journal.lease = Some(self.lease(now));
        }
        let mut run = Run {
            deps: self,
            event,
            stored,
            resumed,
            plan: termination.options.dry_run,
            calls,
        };
        run.drive(delivery, outcomes).await
    }

    fn lease(&self, now: DateTime<Utc>) -> Lease {
        Lease {
            owner: self.owner.clone(),
            expires_at: now + chrono::Duration::seconds(LEASE_SECS),
        }
    }

    /// A future-dated termination: journal it, say so once, and wait in the bucketed queues.
    async fn schedule<O: Outcomes>(
        &self,
        mut stored: Stored,
        effective_at: Option<chrono::DateTime<chrono::FixedOffset>>,
        outcomes: &O,
    ) -> Verdict {
        stored.journal.state = SagaState::Scheduled;
        stored.journal.status = Some(FinalStatus::Scheduled);
        match journal::save(self.store.as_ref(), &mut stored).await {
            Ok(()) => {}
            Err(StoreError::Conflict { .. }) => return Verdict::Wait,
            Err(e) => {
                return Verdict::Park {
                    reason: format!("saving the schedule: {e}"),
                };
            }
        }
        if let Err(e) = self.write_index(&stored.journal).await {
            warn!(error = %e, "could not index the saga by employee");
        }
        let extra = json!({ "effective_at": stored.journal.event.effective_at });
        let out = outcome::build(&stored.journal, OutcomeType::Scheduled, Some(extra));
        if let Err(e) = outcomes.publish(&out).await {
            return Verdict::Park {
                reason: format!("publishing the scheduled outcome: {e}"),
            };
        }
        info!(effective_at = ?effective_at, "termination scheduled");
        let remaining = effective_at
            .map(|t| (t.with_timezone(&Utc) - Utc::now()).num_seconds())
            .unwrap_or(1);
        Verdict::Defer {
            secs: bucket_for(remaining, &self.settings.worker.schedule_buckets_secs),
            reason: "scheduled".to_owned(),
        }
    }

    /// Makes the saga findable by employee (for rescinds without a terminated_event_id).
    pub(crate) async fn write_index(&self, journal: &Journal) -> Result<(), StoreError> {
        let key = Journal::index_key(&journal.employee.external_id, &journal.saga_id);
        match self
            .store
            .put(
                &key,
                bytes::Bytes::from(journal.event.id.clone()),
                "text/plain",
                Write::Create,
            )
            .await
        {
            Ok(_) | Err(StoreError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn republish<O: Outcomes>(&self, journal: &Journal, outcomes: &O) -> Verdict {
        let (kind, extra) = match journal.state {
            SagaState::Planned => (OutcomeType::Planned, plan_extra(journal)),
            SagaState::Compensated | SagaState::Cancelled => {
                (OutcomeType::Compensated, compensation_extra(journal))
            }
            _ => (OutcomeType::Completed, None),
        };
        match outcomes
            .publish(&outcome::build(journal, kind, extra))
            .await
        {
            Ok(()) => Verdict::Settled,
            Err(e) => Verdict::Park {
                reason: format!("publishing the outcome: {e}"),
            },
        }
    }

    /// Fails a saga: journal (best effort), `saga.failed` outcome, dead letter.
    async fn fail_stored<O: Outcomes>(
        &self,
        stored: &mut Stored,
        step: Option<StepName>,
        class: ErrorClass,
        message: &str,
        outcomes: &O,
    ) -> Verdict {
        let record = ErrorRecord {
            step: step.map(|s| s.as_str().to_owned()),
            class: class.as_str().to_owned(),
            http_status: None,
            message: message.to_owned(),
        };
        let j = &mut stored.journal;
        j.state = SagaState::Failed;
        j.status = Some(FinalStatus::Failed);
        j.error = Some(record);
        j.completed_at = Some(Utc::now());
        let out = outcome::build(j, OutcomeType::Failed, None);
        if let Err(e) = outcomes.publish(&out).await {
            return Verdict::Park {
                reason: format!("publishing the failed outcome: {e}"),
            };
        }
        self.metrics.saga_finished(FinalStatus::Failed.as_str());
        Verdict::DeadLetter(DeadLetter {
            class,
            message: message.to_owned(),
            step: step.map(|s| s.as_str().to_owned()),
            saga_id: Some(stored.journal.saga_id.clone()),
        })
    }
}

fn plan_extra(journal: &Journal) -> Option<serde_json::Value> {
    Some(json!({ "plan": journal.plan }))
}

fn compensation_extra(journal: &Journal) -> Option<serde_json::Value> {
    Some(json!({ "compensation": journal.compensation }))
}

impl<C: Cxone, S: Store> Run<'_, C, S> {
    fn journal(&mut self) -> &mut Journal {
        &mut self.stored.journal
    }

    /// Saves the journal, carrying over the CXone calls made since the last save.
    pub(crate) async fn checkpoint(&mut self) -> Result<(), StoreError> {
        let new_calls: Vec<CallRecord> =
            std::mem::take(&mut *self.calls.lock().unwrap_or_else(|p| p.into_inner()));
        let now = Utc::now();
        let lease = self.deps.lease(now);
        let created = self.stored.etag.is_none();
        let j = self.journal();
        j.calls.extend(new_calls);
        if j.lease.is_some() {
            j.lease = Some(lease);
        }
        journal::save(self.deps.store.as_ref(), &mut self.stored).await?;
        if created && let Err(e) = self.deps.write_index(&self.stored.journal).await {
            warn!(error = %e, "could not index the saga by employee");
        }
        Ok(())
    }

    /// A checkpoint lost a race: a rescind (or another worker) changed the journal.
    async fn after_conflict<O: Outcomes>(&mut self, outcomes: &O) -> Verdict {
        match journal::load(self.deps.store.as_ref(), &self.stored.journal.saga_id).await {
            Ok(Some(current))
                if current.journal.rescind.is_some()
                    && current
                        .journal
                        .lease
                        .as_ref()
                        .is_some_and(|l| l.owner == self.deps.owner) =>
            {
                info!("a rescind arrived while the saga ran; stopping after this step");
                // Our in-memory progress is newer than the stored one: keep it, take the
                // rescind and the new ETag from the store.
                let mut mine = self.stored.journal.clone();
                mine.rescind = current.journal.rescind.clone();
                let stored = Stored {
                    journal: mine,
                    etag: current.etag,
                };
                self.deps.cancel_or_compensate(stored, outcomes).await
            }
            _ => Verdict::Wait,
        }
    }

    async fn drive<O: Outcomes>(&mut self, delivery: &Delivery, outcomes: &O) -> Verdict {
        while let Some(step) = self.stored.journal.next_step() {
            if step == StepName::Outcome {
                return self.complete(outcomes).await;
            }
            if delivery.draining.is_cancelled() && self.stored.etag.is_some() {
                return self.park_for_shutdown().await;
            }
            let started = Utc::now();
            {
                let rec = self.journal().step_mut(step);
                rec.attempts += 1;
                rec.started_at = Some(started);
                rec.error = None;
            }
            let span = info_span!("step", step = step.as_str());
            let result = steps::execute(self, step).instrument(span).await;
            let finished = Utc::now();
            self.deps.metrics.step_finished(
                step.as_str(),
                (finished - started).num_milliseconds() as f64 / 1000.0,
            );
            match result {
                Ok(outcome) => {
                    let absent = matches!(outcome, StepResult::Absent(_));
                    {
                        let j = self.journal();
                        let rec = j.step_mut(step);
                        rec.finished_at = Some(finished);
                        match outcome {
                            StepResult::Done(detail) => {
                                rec.status = StepStatus::Done;
                                rec.detail = detail;
                            }
                            StepResult::Skipped(why) | StepResult::Absent(why) => {
                                rec.status = StepStatus::Skipped;
                                rec.detail = Some(why);
                            }
                            StepResult::Planned(detail, plan) => {
                                rec.status = StepStatus::Planned;
                                rec.detail = Some(detail);
                                j.plan
                                    .get_or_insert_with(Default::default)
                                    .insert(step.as_str().to_owned(), plan);
                            }
                        }
                    }
                    if absent {
                        self.mark_absent();
                    }
                    if step == StepName::Resolve
                        && !absent
                        && !self.plan
                        && let Some(verdict) = self.admit(delivery, outcomes).await
                    {
                        return verdict;
                    }
                    if matches!(
                        step,
                        StepName::BlockLogin | StepName::Logout | StepName::RevokeKeys
                    ) && self.stored.journal.revoked_at.is_none()
                    {
                        self.record_revoked(finished);
                    }
                    if self.checkpoint_after(step) {
                        match self.checkpoint().await {
                            Ok(()) => {}
                            Err(StoreError::Conflict { .. }) => {
                                return self.after_conflict(outcomes).await;
                            }
                            Err(e) => {
                                return self
                                    .on_error(step, StepError::Store(e), delivery, outcomes)
                                    .await;
                            }
                        }
                    }
                }
                Err(StepError::Defer { secs, reason }) => {
                    let rec = self.journal().step_mut(step);
                    rec.finished_at = Some(finished);
                    rec.detail = Some(reason.clone());
                    // While the logout waits for a live call, API keys must not stay usable.
                    if step == StepName::Logout
                        && !self
                            .stored
                            .journal
                            .step(StepName::RevokeKeys)
                            .status
                            .is_settled()
                    {
                        let started = Utc::now();
                        self.journal().step_mut(StepName::RevokeKeys).attempts += 1;
                        self.journal().step_mut(StepName::RevokeKeys).started_at = Some(started);
                        match steps::execute(self, StepName::RevokeKeys).await {
                            Ok(StepResult::Done(detail)) => {
                                let rec = self.journal().step_mut(StepName::RevokeKeys);
                                rec.status = StepStatus::Done;
                                rec.detail = detail;
                                rec.finished_at = Some(Utc::now());
                            }
                            Ok(StepResult::Skipped(why)) => {
                                let rec = self.journal().step_mut(StepName::RevokeKeys);
                                rec.status = StepStatus::Skipped;
                                rec.detail = Some(why);
                                rec.finished_at = Some(Utc::now());
                            }
                            Ok(_) => {}
                            Err(e) => {
                                return self
                                    .on_error(StepName::RevokeKeys, e, delivery, outcomes)
                                    .await;
                            }
                        }
                    }
                    self.journal().lease = None;
                    self.journal().state = SagaState::Parked;
                    if let Err(e) = self.checkpoint().await {
                        warn!(error = %e, "could not save the journal before waiting");
                    }
                    info!(step = step.as_str(), secs, %reason, "step deferred");
                    return Verdict::Defer { secs, reason };
                }
                Err(StepError::Store(StoreError::Conflict { .. })) => {
                    return self.after_conflict(outcomes).await;
                }
                Err(e) => {
                    self.journal().step_mut(step).finished_at = Some(finished);
                    return self.on_error(step, e, delivery, outcomes).await;
                }
            }
        }
        self.complete(outcomes).await
    }

    fn mark_absent(&mut self) {
        self.journal().status = Some(FinalStatus::AlreadyAbsent);
        for s in StepName::ALL {
            if s > StepName::Resolve
                && !matches!(s, StepName::Manifest | StepName::Notify | StepName::Outcome)
            {
                let rec = self.journal().step_mut(s);
                rec.status = StepStatus::Skipped;
                rec.detail = Some("user not found in CXone".to_owned());
            }
        }
    }

    /// The mass-deletion guard, between resolve and the first destructive call.
    async fn admit<O: Outcomes>(&mut self, delivery: &Delivery, outcomes: &O) -> Option<Verdict> {
        if self.stored.journal.guard.is_some() {
            return None;
        }
        if delivery.released {
            self.journal().guard = Some(GuardRecord {
                how: "released".to_owned(),
                at: Utc::now(),
            });
            return None;
        }
        match self
            .deps
            .gate
            .admit(
                self.deps.store.as_ref(),
                &self.deps.settings.guard,
                &self.stored.journal.saga_id,
            )
            .await
        {
            Ok(true) => {
                self.journal().guard = Some(GuardRecord {
                    how: "admitted".to_owned(),
                    at: Utc::now(),
                });
                None
            }
            Ok(false) => {
                warn!("mass-deletion guard: window full; holding the saga for an operator");
                self.deps.metrics.saga_held();
                let j = self.journal();
                j.state = SagaState::Held;
                j.lease = None;
                if let Err(e) = self.checkpoint().await {
                    return Some(Verdict::Park {
                        reason: format!("saving the held journal: {e}"),
                    });
                }
                let extra = json!({
                    "guard": {
                        "max_destructive_per_window": self.deps.settings.guard.max_destructive_per_window,
                        "window_secs": self.deps.settings.guard.window_secs,
                    }
                });
                let out = outcome::build(&self.stored.journal, OutcomeType::Held, Some(extra));
                if let Err(e) = outcomes.publish(&out).await {
                    return Some(Verdict::Park {
                        reason: format!("publishing the held outcome: {e}"),
                    });
                }
                Some(Verdict::Hold)
            }
            Err(e) => Some(Verdict::Park {
                reason: format!("mass-deletion guard: {e}"),
            }),
        }
    }

    fn record_revoked(&mut self, at: DateTime<Utc>) {
        let j = self.journal();
        let revoked = [StepName::BlockLogin, StepName::Logout, StepName::RevokeKeys]
            .iter()
            .all(|s| matches!(j.step(*s).status, StepStatus::Done | StepStatus::Skipped));
        if revoked && j.status != Some(FinalStatus::AlreadyAbsent) {
            j.revoked_at = Some(at);
            let since = j
                .event
                .time
                .as_deref()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or(j.created_at);
            let secs = (at - since).num_milliseconds().max(0) as f64 / 1000.0;
            self.deps.metrics.time_to_revoke(secs);
        }
    }

    /// Journal writes happen where a crash would otherwise lose something (about five a saga).
    fn checkpoint_after(&self, step: StepName) -> bool {
        match step {
            // The first write: creates the journal with the before-images, before any change.
            StepName::Resolve => true,
            StepName::RevokeKeys => !self.plan,
            StepName::Archive => self.stored.journal.step(step).status == StepStatus::Done,
            _ => false,
        }
    }

    async fn park_for_shutdown(&mut self) -> Verdict {
        self.journal().lease = None;
        self.journal().state = SagaState::Parked;
        if let Err(e) = self.checkpoint().await {
            warn!(error = %e, "could not save progress before shutdown; resuming from the last save");
        }
        info!("shutting down: saga saved and handed back to the queue");
        Verdict::Requeue
    }

    async fn on_error<O: Outcomes>(
        &mut self,
        step: StepName,
        error: StepError,
        delivery: &Delivery,
        outcomes: &O,
    ) -> Verdict {
        let delays = self.deps.settings.worker.retry_delays_secs.len() as u32;
        if error.is_transient() && delivery.parks < delays {
            warn!(step = step.as_str(), error = %error, parks = delivery.parks, "transient failure; parking the saga");
            self.deps.metrics.saga_parked();
            let j = self.journal();
            j.step_mut(step).error = Some(ErrorRecord {
                step: Some(step.as_str().to_owned()),
                class: "transient".to_owned(),
                http_status: error.http_status(),
                message: error.to_string(),
            });
            j.state = SagaState::Parked;
            j.parks += 1;
            j.lease = None;
            if self.stored.etag.is_some()
                && let Err(e) = self.checkpoint().await
            {
                warn!(error = %e, "could not save the journal while parking");
            }
            return Verdict::Park {
                reason: format!("{step}: {error}"),
            };
        }
        let class = if error.is_transient() {
            ErrorClass::Exhausted
        } else {
            ErrorClass::Permanent
        };
        self.fail(step, class, &error, outcomes).await
    }

    async fn fail<O: Outcomes>(
        &mut self,
        step: StepName,
        class: ErrorClass,
        error: &StepError,
        outcomes: &O,
    ) -> Verdict {
        let message = match class {
            ErrorClass::Exhausted => format!("retries exhausted: {error}"),
            _ => error.to_string(),
        };
        warn!(step = step.as_str(), class = class.as_str(), error = %message, "saga failed; access stays as it is now");
        let record = ErrorRecord {
            step: Some(step.as_str().to_owned()),
            class: class.as_str().to_owned(),
            http_status: error.http_status(),
            message: message.clone(),
        };
        let now = Utc::now();
        {
            let j = self.journal();
            let rec = j.step_mut(step);
            rec.status = StepStatus::Failed;
            rec.error = Some(record.clone());
            j.state = SagaState::Failed;
            j.status = Some(FinalStatus::Failed);
            j.error = Some(record);
            j.lease = None;
            j.completed_at = Some(now);
        }
        // The journal may be unreachable (that may be why it failed): publish regardless.
        if let Err(e) = self.checkpoint().await {
            warn!(error = %e, "could not save the failed journal");
        }
        let out = outcome::build(&self.stored.journal, OutcomeType::Failed, None);
        if let Err(e) = outcomes.publish(&out).await {
            return Verdict::Park {
                reason: format!("publishing the failed outcome: {e}"),
            };
        }
        self.deps
            .metrics
            .saga_finished(FinalStatus::Failed.as_str());
        Verdict::DeadLetter(DeadLetter {
            class,
            message,
            step: Some(step.as_str().to_owned()),
            saga_id: Some(self.stored.journal.saga_id.clone()),
        })
    }

    async fn complete<O: Outcomes>(&mut self, outcomes: &O) -> Verdict {
        let now = Utc::now();
        let plan = self.plan;
        {
            let j = self.journal();
            if plan {
                j.status = Some(FinalStatus::Planned);
                j.state = SagaState::Planned;
            } else {
                if j.status.is_none() {
                    let delete = j.step(StepName::Delete);
                    j.status = Some(if delete.status == StepStatus::Done {
                        FinalStatus::Deleted
                    } else {
                        FinalStatus::DeactivatedOnly
                    });
                }
                j.state = SagaState::Completed;
            }
            j.lease = None;
            j.completed_at = Some(now);
            let rec = j.step_mut(StepName::Outcome);
            rec.status = if plan {
                StepStatus::Planned
            } else {
                StepStatus::Done
            };
            rec.attempts += 1;
            rec.started_at = Some(now);
            rec.finished_at = Some(now);
        }
        if let Err(e) = self.checkpoint().await {
            // Not saved: a redelivery resumes at the last save and ends here again.
            return Verdict::Park {
                reason: format!("saving the completed journal: {e}"),
            };
        }
        let (kind, extra) = if plan {
            (OutcomeType::Planned, plan_extra(&self.stored.journal))
        } else {
            (OutcomeType::Completed, None)
        };
        let out = outcome::build(&self.stored.journal, kind, extra);
        if let Err(e) = outcomes.publish(&out).await {
            return Verdict::Park {
                reason: format!("publishing the outcome: {e}"),
            };
        }
        let status = self
            .stored
            .journal
            .status
            .map(FinalStatus::as_str)
            .unwrap_or("DELETED");
        self.deps.metrics.saga_finished(status);
        info!(status, "saga finished");
        Verdict::Settled
    }
}

#[cfg(test)]
mod tests;
