//! One delivery's run of a termination saga: what the steps see (the client handle, the
//! journal, the options) and how progress is made durable. The runner drives it.

use chrono::Utc;

use super::journal::{self, Journal, Lease, Stored};
use super::machine::RunFacts;
use super::{Delivery, Deps, LEASE_SECS};
use crate::cxone::{CallLog, Cxone};
use crate::event::{Event, Termination};
use crate::store::{Store, StoreError};

/// One delivery's run of a termination saga.
pub struct Run<'a, C, S> {
    pub deps: &'a Deps<C, S>,
    /// The client handle of this run: records every call into `calls`.
    pub cxone: C,
    pub calls: CallLog,
    pub event: &'a Event,
    pub termination: &'a Termination,
    pub delivery: &'a Delivery,
    pub stored: Stored,
    /// The saga had started before this run: every write step reads first.
    pub resumed: bool,
    /// Dry run: read everything, write nothing in CXone or the archive.
    pub plan: bool,
    /// This run has written the journal: the lease in the store is this delivery's.
    pub(crate) leased: bool,
    /// Journal writes this run lost.
    pub(crate) conflicts: u32,
    /// When this delivery started: long steps stop after `worker.archive_slice_secs`.
    pub started: tokio::time::Instant,
}

impl<C: Cxone, S: Store> Run<'_, C, S> {
    pub fn journal(&self) -> &Journal {
        &self.stored.journal
    }

    pub fn journal_mut(&mut self) -> &mut Journal {
        &mut self.stored.journal
    }

    pub(crate) fn facts(&self) -> RunFacts {
        RunFacts {
            stage: self.delivery.stage,
            stored: self.stored.etag.is_some(),
            leased: self.leased,
            plan: self.plan,
        }
    }

    pub(crate) fn lease(&self) -> Lease {
        Lease {
            owner: self.delivery.holder.to_string(),
            expires_at: Utc::now() + chrono::Duration::seconds(LEASE_SECS),
        }
    }

    /// Writes the journal as it is, with the calls made since the last write.
    pub(crate) async fn write(&mut self) -> Result<(), StoreError> {
        let calls = self.calls.take();
        self.stored.journal.calls.extend(calls);
        journal::save(self.deps.store.as_ref(), &mut self.stored).await
    }

    /// Gives up this delivery's lease when it ends with the saga unfinished (parked, deferred,
    /// requeued): another replica may take the saga at once instead of waiting for the lease
    /// to expire — a live session says nothing about a delivery that has ended.
    pub(crate) async fn release(&mut self) {
        if !self.leased {
            return;
        }
        self.leased = false;
        let mine = self.delivery.holder.to_string();
        if self
            .stored
            .journal
            .lease
            .as_ref()
            .is_none_or(|l| l.owner != mine)
        {
            return;
        }
        self.stored.journal.lease = None;
        if let Err(e) = self.write().await {
            // A conflict means someone else wrote since: the lease is not ours to clear. Any
            // other failure leaves it to expire.
            tracing::info!(error = %e, "could not release the saga's lease");
        }
    }

    /// Writes the journal holding (or renewing) this delivery's lease. Steps call this to make
    /// progress durable (before-images, archive parts).
    pub async fn save(&mut self) -> Result<(), StoreError> {
        self.stored.journal.lease = Some(self.lease());
        self.write().await?;
        self.leased = true;
        Ok(())
    }
}
