//! What the saga needs from the outside, as small traits with one real implementation each
//! (in `broker` and `hris`) and fakes in the unit tests: where outcomes go, how the HRIS is
//! told, and whether the holder of a lease is still alive. The saga knows no transport.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::Value;

use super::outcome::Outcome;

/// Why an outcome did not reach its destination.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OutcomeError {
    /// Nobody takes outcomes of this kind (no queue bound): counted and logged, never silent.
    #[error("no consumer is bound for `{0}`; the outcome was returned by the broker")]
    Unroutable(String),
    #[error("the outcome was not confirmed: {0}")]
    NotConfirmed(String),
}

/// Where outcomes go: published with confirms by the broker adapter; collected in tests.
pub trait Outcomes: Send + Sync {
    fn publish(
        &self,
        outcome: &Outcome,
    ) -> impl std::future::Future<Output = Result<(), OutcomeError>> + Send;
}

/// What the HRIS is told when a saga completes.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub saga_id: String,
    pub body: Value,
}

/// Why a notification did not go out.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NotifyError {
    /// The endpoint is not configured (events naming one are invalid, so this is a bug).
    #[error("no HRIS endpoint named `{0}` is configured")]
    Unknown(String),
    /// The endpoint did not take it after the retry budget.
    #[error("{0}")]
    Failed(String),
}

/// The outgoing HRIS webhook, built once at start-up from configuration.
pub trait Notifier: Send + Sync {
    /// Is `endpoint` a configured endpoint?
    fn knows(&self, endpoint: &str) -> bool;
    /// Sends `notice` to `endpoint`; `Ok` carries a short description of what happened.
    fn notify<'a>(
        &'a self,
        endpoint: &'a str,
        notice: &'a Notice,
    ) -> BoxFuture<'a, Result<String, NotifyError>>;
}

/// A notifier that knows no endpoint (commands that never notify, and tests).
#[derive(Debug, Default)]
pub struct NoNotifier;

impl Notifier for NoNotifier {
    fn knows(&self, _endpoint: &str) -> bool {
        false
    }

    fn notify<'a>(
        &'a self,
        endpoint: &'a str,
        _notice: &'a Notice,
    ) -> BoxFuture<'a, Result<String, NotifyError>> {
        Box::pin(async move { Err(NotifyError::Unknown(endpoint.to_owned())) })
    }
}

/// Whether a broker session (the connection a delivery came through) is still open. A lease
/// whose holder's session closed (the process died, or lost its connection and with it every
/// delivery) is free at once, without waiting for it to expire.
pub trait Sessions: Send + Sync {
    /// `Err` when it cannot be told: callers then treat the session as alive.
    fn alive<'a>(&'a self, session: &'a str) -> BoxFuture<'a, Result<bool, String>>;
}

/// Sessions that are all alive (no broker: leases then free only by expiring).
#[derive(Debug, Default)]
pub struct AllAlive;

impl Sessions for AllAlive {
    fn alive<'a>(&'a self, _session: &'a str) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async { Ok(true) })
    }
}

/// The sagas this process is running now, by saga id, so two copies of one event in one
/// process never run side by side: the second waits for the first to finish.
#[derive(Debug, Default)]
pub struct Local {
    running: Mutex<HashMap<String, (String, Arc<tokio::sync::Notify>)>>,
}

/// A saga entered by one delivery of this process; leaving (drop) wakes those waiting.
#[derive(Debug)]
pub struct Entered {
    local: Arc<Local>,
    saga_id: String,
    delivery: String,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let mut running = self.local.lock();
        if running
            .get(&self.saga_id)
            .is_some_and(|(d, _)| *d == self.delivery)
            && let Some((_, notify)) = running.remove(&self.saga_id)
        {
            notify.notify_waiters();
        }
    }
}

impl Local {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (String, Arc<tokio::sync::Notify>)>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The delivery of this process running `saga_id`, if any.
    pub fn running(&self, saga_id: &str) -> Option<String> {
        self.lock().get(saga_id).map(|(d, _)| d.clone())
    }

    /// Enters `saga_id` for `delivery`, waiting up to `patience` for another delivery of this
    /// process to leave it. `None`: still busy after that.
    pub async fn enter(
        self: &Arc<Self>,
        saga_id: &str,
        delivery: &str,
        patience: Duration,
    ) -> Option<Entered> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let notify = {
                let mut running = self.lock();
                match running.get(saga_id) {
                    None => {
                        running.insert(
                            saga_id.to_owned(),
                            (delivery.to_owned(), Arc::new(tokio::sync::Notify::new())),
                        );
                        return Some(Entered {
                            local: self.clone(),
                            saga_id: saga_id.to_owned(),
                            delivery: delivery.to_owned(),
                        });
                    }
                    Some((_, notify)) => notify.clone(),
                }
            };
            let notified = notify.notified();
            tokio::pin!(notified);
            // Registered before the map is looked at again, so a leave in between is not lost.
            notified.as_mut().enable();
            if self.running(saga_id).is_none() {
                continue;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_second_copy_in_one_process_waits_for_the_first() {
        let local = Arc::new(Local::default());
        let first = local
            .enter("saga", "d1", Duration::ZERO)
            .await
            .expect("free");
        assert_eq!(local.running("saga").as_deref(), Some("d1"));
        // Busy past its patience: not entered.
        assert!(
            local
                .enter("saga", "d2", Duration::from_secs(5))
                .await
                .is_none()
        );
        let waiter = {
            let local = local.clone();
            tokio::spawn(async move {
                local
                    .enter("saga", "d3", Duration::from_secs(60))
                    .await
                    .map(|e| e.delivery.clone())
            })
        };
        tokio::task::yield_now().await;
        drop(first);
        assert_eq!(waiter.await.expect("join").as_deref(), Some("d3"));
        assert_eq!(local.running("saga"), None, "left again when dropped");
    }
}
