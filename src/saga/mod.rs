//! The offboarding saga: one per termination event, steps in order (access cut first), a
//! journal in S3 so any worker can resume it, and a verdict the broker layer carries out.
//!
//! The saga knows neither lapin nor reqwest nor the AWS SDK: it talks to [`Cxone`],
//! [`Store`] and [`Outcomes`], with in-memory fakes in the unit tests.

pub mod handler;
pub mod journal;
pub mod outcome;
mod steps;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::broker::dead_letter::{DeadLetter, ErrorClass};
use crate::config::Settings;
use crate::cxone::{CALL_LOG, CallRecord, Cxone, CxoneError};
use crate::event::{Command, Event};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
use journal::{ErrorRecord, FinalStatus, Journal, Lease, SagaState, StepName, StepStatus, Stored};
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
}

impl StepError {
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Cxone(e) => e.is_transient(),
            Self::Store(e) => e.is_transient() || matches!(e, StoreError::Conflict { .. }),
            Self::Permanent(_) => false,
            Self::Transient(_) => true,
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
}

/// Everything a saga needs from the outside.
pub struct Deps<C, S> {
    pub cxone: Arc<C>,
    pub store: Arc<S>,
    pub settings: Arc<Settings>,
    /// This process's lease owner id.
    pub owner: String,
    pub metrics: Metrics,
}

impl<C, S> Clone for Deps<C, S> {
    fn clone(&self) -> Self {
        Self {
            cxone: self.cxone.clone(),
            store: self.store.clone(),
            settings: self.settings.clone(),
            owner: self.owner.clone(),
            metrics: self.metrics.clone(),
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
}

/// State of one run (one delivery) of a saga.
pub(crate) struct Run<'a, C, S> {
    pub deps: &'a Deps<C, S>,
    pub event: &'a Event,
    pub stored: Stored,
    /// The journal existed before this run: every write step reads first.
    pub resumed: bool,
    pub calls: Arc<std::sync::Mutex<Vec<CallRecord>>>,
}

/// What a step reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StepResult {
    Done(Option<String>),
    Skipped(String),
    /// `resolve` found nobody: the saga ends `ALREADY_ABSENT`.
    Absent(String),
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
        let loaded = match journal::load(self.store.as_ref(), &id).await {
            Ok(l) => l,
            Err(e) if e.is_transient() => {
                return Verdict::Park {
                    reason: format!("reading the journal: {e}"),
                };
            }
            Err(e) => {
                return self.fail_without_journal(
                    &id,
                    event,
                    None,
                    ErrorClass::Permanent,
                    &e.to_string(),
                );
            }
        };
        let (stored, resumed) = match loaded {
            Some(mut stored) => {
                let j = &stored.journal;
                if j.state.is_final() {
                    info!(state = ?j.state, "saga already finished; re-publishing its outcome");
                    return self.republish(&stored.journal, outcomes).await;
                }
                if j.leased_by_other(&self.owner, now) && !delivery.redelivered {
                    info!(owner = ?j.lease.as_ref().map(|l| &l.owner), "saga leased by another worker; waiting");
                    return Verdict::Wait;
                }
                let j = &mut stored.journal;
                j.lease = Some(self.lease(now));
                j.state = SagaState::Running;
                j.error = None;
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
                (stored, true)
            }
            None => {
                let mut j = Journal::new(&id, event, now);
                j.lease = Some(self.lease(now));
                (
                    Stored {
                        journal: j,
                        etag: None,
                    },
                    false,
                )
            }
        };
        let mut run = Run {
            deps: self,
            event,
            stored,
            resumed,
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

    async fn republish<O: Outcomes>(&self, journal: &Journal, outcomes: &O) -> Verdict {
        let kind = match journal.state {
            SagaState::Planned => OutcomeType::Planned,
            SagaState::Compensated => OutcomeType::Compensated,
            _ => OutcomeType::Completed,
        };
        match outcomes.publish(&outcome::build(journal, kind, None)).await {
            Ok(()) => Verdict::Settled,
            Err(e) => Verdict::Park {
                reason: format!("publishing the outcome: {e}"),
            },
        }
    }

    /// A failure before any journal exists (or could be read): still one outcome, one dead letter.
    fn fail_without_journal(
        &self,
        id: &str,
        _event: &Event,
        step: Option<StepName>,
        class: ErrorClass,
        message: &str,
    ) -> Verdict {
        self.metrics.saga_finished(FinalStatus::Failed.as_str());
        Verdict::DeadLetter(DeadLetter {
            class,
            message: message.to_owned(),
            step: step.map(|s| s.as_str().to_owned()),
            saga_id: Some(id.to_owned()),
        })
    }
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
        let j = self.journal();
        j.calls.extend(new_calls);
        if j.lease.is_some() {
            j.lease = Some(lease);
        }
        journal::save(self.deps.store.as_ref(), &mut self.stored).await
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
                        let rec = self.journal().step_mut(step);
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
                        }
                    }
                    if absent {
                        self.journal().status = Some(FinalStatus::AlreadyAbsent);
                        let later: Vec<StepName> = StepName::ALL
                            .into_iter()
                            .filter(|s| {
                                *s > StepName::Resolve
                                    && !matches!(
                                        s,
                                        StepName::Manifest | StepName::Notify | StepName::Outcome
                                    )
                            })
                            .collect();
                        for s in later {
                            let rec = self.journal().step_mut(s);
                            rec.status = StepStatus::Skipped;
                            rec.detail = Some("user not found in CXone".to_owned());
                        }
                    }
                    if step == StepName::RevokeKeys && self.stored.journal.revoked_at.is_none() {
                        self.record_revoked(finished);
                    }
                    if self.checkpoint_after(step)
                        && let Err(e) = self.checkpoint().await
                    {
                        return self
                            .on_error(step, StepError::Store(e), delivery, outcomes)
                            .await;
                    }
                }
                Err(e) => {
                    self.journal().step_mut(step).finished_at = Some(finished);
                    return self.on_error(step, e, delivery, outcomes).await;
                }
            }
        }
        self.complete(outcomes).await
    }

    fn record_revoked(&mut self, at: DateTime<Utc>) {
        let j = self.journal();
        let revoked = [StepName::BlockLogin, StepName::Logout, StepName::RevokeKeys]
            .iter()
            .all(|s| j.step(*s).status.is_settled());
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
            StepName::RevokeKeys => true,
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
        {
            let j = self.journal();
            if j.status.is_none() {
                let delete = j.step(StepName::Delete);
                j.status = Some(if delete.status == StepStatus::Done {
                    FinalStatus::Deleted
                } else {
                    FinalStatus::DeactivatedOnly
                });
            }
            j.state = SagaState::Completed;
            j.lease = None;
            j.completed_at = Some(now);
            let rec = j.step_mut(StepName::Outcome);
            rec.status = StepStatus::Done;
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
        let out = outcome::build(&self.stored.journal, OutcomeType::Completed, None);
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
        info!(status, "saga completed");
        Verdict::Settled
    }
}

/// Runs a rescind or termination according to its command. Rescinds are handled in
/// [`handler`]; this is the termination entry used by tests.
pub fn is_termination(event: &Event) -> bool {
    matches!(event.command, Command::Terminate(_))
}

#[cfg(test)]
mod tests;
