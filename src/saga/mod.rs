//! The offboarding saga: one per termination event, in two stages (access removal, then
//! housekeeping), a journal in S3 so any worker can resume it, one owner at a time, and a
//! verdict the broker adapter carries out.
//!
//! - [`machine`]: pure decisions; the only code that changes a saga's state or status.
//! - [`runner`]: carries them out (steps, journal writes, outcomes).
//! - [`steps`]: one file per step.
//! - [`journal`], [`compensate`] (rescinds), [`guard`] (mass deletions), [`ports`] (what the
//!   saga needs from outside), [`outcome`] (the outcome documents).
//!
//! The saga knows no transport (no AMQP, HTTP or S3 client types): it talks to [`Cxone`],
//! [`Store`], [`ports::Outcomes`], [`ports::Notifier`] and [`ports::Sessions`].

pub mod announce;
pub mod compensate;
pub mod guard;
pub mod journal;
pub mod machine;
pub mod outcome;
pub mod ownership;
pub mod ports;
pub mod run;
pub mod runner;
pub mod steps;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::cxone::{Cxone, CxoneError};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
pub use journal::Holder;
pub use machine::Stage;

/// How long a lease holds without being renewed by a journal write. A lease whose holder's
/// broker session is gone is free at once; this bound covers holders that are alive but
/// stopped without releasing it.
pub const LEASE_SECS: i64 = 300;

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
    /// Worth another try later.
    #[error("{0}")]
    Transient(String),
    /// Not now: come back in `secs` (e.g. the agent is on a live call).
    #[error("{reason}")]
    Defer { secs: u64, reason: String },
    /// The step saved its progress and used up its time slice (a long archive): continue in
    /// a fresh delivery, well within the broker's `consumer_timeout`.
    #[error("time slice used up; progress saved")]
    Slice,
}

impl StepError {
    pub fn is_conflict(&self) -> bool {
        matches!(self, Self::Store(StoreError::Conflict { .. }))
    }

    /// How the machine sees this failure.
    pub fn failure(&self) -> machine::Failure {
        let http_status = match self {
            Self::Cxone(e) => e.status,
            _ => None,
        };
        let transient = match self {
            Self::Cxone(e) => e.is_transient(),
            Self::Store(e) => e.is_transient() || e.is_conflict(),
            Self::Permanent(_) => false,
            Self::Transient(_) | Self::Defer { .. } | Self::Slice => true,
        };
        match self {
            Self::Defer { secs, reason } => machine::Failure::Defer {
                secs: *secs,
                reason: reason.clone(),
            },
            _ if transient => machine::Failure::Transient {
                message: self.to_string(),
                http_status,
            },
            _ => machine::Failure::Permanent {
                message: self.to_string(),
                http_status,
            },
        }
    }
}

/// What a step reports.
#[derive(Debug, Clone, PartialEq)]
pub enum StepResult {
    Done(Option<String>),
    Skipped(String),
    /// `resolve` found nobody: the saga ends `ALREADY_ABSENT`.
    Absent(String),
    /// `delete`: CXone refused the deletion; the saga ends `DEACTIVATED_ONLY`.
    Refused(String),
    /// Dry run: what the step would do.
    Planned(String, serde_json::Value),
}

/// Why a saga failed (CONTRACT §4 `error.class`, §5 `x-offboard-error-class`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureClass {
    Invalid,
    Permanent,
    Exhausted,
    Guard,
}

impl FailureClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::Permanent => "permanent",
            Self::Exhausted => "exhausted",
            Self::Guard => "guard",
        }
    }
}

/// A failed saga, for the dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    pub class: FailureClass,
    pub message: String,
    pub step: Option<String>,
    pub saga_id: Option<String>,
}

/// What the broker adapter must do with the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Done and published: ack.
    Settled,
    /// Failed and its `saga.failed` outcome published: dead-letter with these facts.
    DeadLetter(Failed),
    /// A transient failure: park in the next delay queue (or fail as exhausted there).
    Park { reason: String },
    /// Another delivery holds the saga: come back after the shortest delay.
    Wait,
    /// Progress is saved: put a fresh copy on this stage's queue at once (shutdown, or a long
    /// archive continuing in a new delivery).
    Requeue,
    /// Not due yet (scheduled, or waiting for a live contact to end): back in `secs`.
    Defer { secs: u64, reason: String },
    /// The mass-deletion guard stopped it: park in the held queue for an operator.
    Hold,
    /// Access is gone and verified: put the saga on the housekeeping queue, then ack.
    HandOver,
}

/// Everything a saga needs from the outside.
pub struct Deps<C, S> {
    pub cxone: C,
    pub store: Arc<S>,
    pub settings: Arc<Settings>,
    pub metrics: Metrics,
    /// Batches this process's admissions through the mass-deletion guard.
    pub gate: Arc<guard::Gate>,
    pub notifier: Arc<dyn ports::Notifier>,
    pub sessions: Arc<dyn ports::Sessions>,
    pub local: Arc<ports::Local>,
}

impl<C: Clone, S> Clone for Deps<C, S> {
    fn clone(&self) -> Self {
        Self {
            cxone: self.cxone.clone(),
            store: self.store.clone(),
            settings: self.settings.clone(),
            metrics: self.metrics.clone(),
            gate: self.gate.clone(),
            notifier: self.notifier.clone(),
            sessions: self.sessions.clone(),
            local: self.local.clone(),
        }
    }
}

impl<C: Cxone, S: Store> Deps<C, S> {
    /// Deps with no HRIS endpoints and no broker sessions (leases then free only by expiring).
    pub fn new(cxone: C, store: Arc<S>, settings: Arc<Settings>, metrics: Metrics) -> Self {
        Self {
            cxone,
            store,
            settings,
            metrics,
            gate: Arc::new(guard::Gate::default()),
            notifier: Arc::new(ports::NoNotifier),
            sessions: Arc::new(ports::AllAlive),
            local: Arc::new(ports::Local::default()),
        }
    }

    pub fn with_notifier(mut self, notifier: Arc<dyn ports::Notifier>) -> Self {
        self.notifier = notifier;
        self
    }

    pub fn with_sessions(mut self, sessions: Arc<dyn ports::Sessions>) -> Self {
        self.sessions = sessions;
        self
    }
}

/// About one delivery of the event.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// This delivery: what the lease names while it runs the saga.
    pub holder: Holder,
    /// The queue it came from.
    pub stage: Stage,
    /// Times this message was parked after transient failures (from the worker's own,
    /// verified headers; 0 for anything from outside).
    pub parks: u32,
    /// Cancelled when shutdown begins: stop between steps.
    pub draining: CancellationToken,
    /// An operator released it from the mass-deletion guard (a verified header).
    pub released: bool,
}

impl Delivery {
    pub fn new(holder: Holder, stage: Stage, draining: CancellationToken) -> Self {
        Self {
            holder,
            stage,
            parks: 0,
            draining,
            released: false,
        }
    }
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

#[cfg(test)]
mod tests;
