//! Who runs a saga now. A lease names one delivery; it counts while it is unexpired and its
//! holder is alive: its broker session open (another process), or still running (this
//! process, where a second copy first waits for the first).

use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::{info, warn};

use super::Deps;
use super::journal::{Holder, Journal};
use super::machine::Holding;

/// How long a second copy of an event waits for the first to finish in this process before
/// it steps aside into a delay queue.
pub const LOCAL_PATIENCE: Duration = Duration::from_secs(10);

/// Who holds the saga of `stored`, as seen by `me`: a lease of another delivery counts only
/// while it is unexpired and its holder is alive (its broker session open, or, in this
/// process, still running).
pub(crate) async fn holding<C, S>(
    deps: &Deps<C, S>,
    j: &Journal,
    me: &Holder,
    now: DateTime<Utc>,
) -> Holding {
    let Some(other) = j.other_holder(me, now) else {
        return Holding::Free;
    };
    if other.session == me.session {
        return match deps.local.running(&j.saga_id) {
            Some(d) if d == other.delivery => Holding::Busy(other),
            _ => Holding::Free,
        };
    }
    match deps.sessions.alive(&other.session).await {
        Ok(false) => {
            info!(holder = %other, "the saga's holder is gone (its broker session closed); taking over");
            Holding::Free
        }
        Ok(true) => Holding::Busy(other),
        Err(e) => {
            warn!(error = %e, "cannot tell whether the saga's holder is alive; assuming it is");
            Holding::Busy(other)
        }
    }
}
