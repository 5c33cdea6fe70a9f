//! The mass-deletion guard: at most `guard.max_destructive_per_window` sagas start destroying
//! access within any `guard.window_secs`, counted across every replica through one S3 object
//! updated with compare-and-swap (`guard/window.json`). Past the limit, sagas are held for an
//! operator (`cxone-offboard guard release`).

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::config::GuardSettings;
use crate::store::{Store, StoreError, Write, keys};

pub const WINDOW_KEY: &str = keys::GUARD_WINDOW;

/// Why an admission could not be decided.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GuardError {
    /// The window object exists but cannot be read: the guard fails closed (sagas are held).
    #[error("the guard window {WINDOW_KEY} is unreadable ({0}); sagas are held until it is fixed")]
    Unreadable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn parse(body: &[u8]) -> Result<Window, GuardError> {
    serde_json::from_slice(body).map_err(|e| GuardError::Unreadable(e.to_string()))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admission {
    pub saga_id: String,
    pub at: DateTime<Utc>,
}

/// The sliding window: admissions younger than `window_secs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub admitted: Vec<Admission>,
}

impl Window {
    pub fn prune(&mut self, now: DateTime<Utc>, window_secs: u64) {
        let horizon =
            now - chrono::Duration::seconds(i64::try_from(window_secs).unwrap_or(i64::MAX / 4));
        self.admitted.retain(|a| a.at > horizon);
    }

    /// When the oldest admission leaves the window (a slot frees up).
    pub fn next_free(&self, window_secs: u64) -> Option<DateTime<Utc>> {
        self.admitted
            .iter()
            .map(|a| a.at)
            .min()
            .map(|t| t + chrono::Duration::seconds(i64::try_from(window_secs).unwrap_or(0)))
    }
}

/// Reads the window now (for `guard status`).
pub async fn read<S: Store>(store: &S, settings: &GuardSettings) -> Result<Window, GuardError> {
    let mut w = match store.get(WINDOW_KEY).await? {
        Some(obj) => parse(&obj.body)?,
        None => Window::default(),
    };
    w.prune(Utc::now(), settings.window_secs);
    Ok(w)
}

type Waiter = (
    String,
    tokio::sync::oneshot::Sender<Result<bool, GuardError>>,
);

/// Coalesces the admissions of one process: sagas asking at the same time are admitted in one
/// compare-and-swap, so the window object is contended by replicas, not by every saga.
#[derive(Default)]
pub struct Gate {
    waiting: std::sync::Mutex<Vec<Waiter>>,
    turn: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").finish_non_exhaustive()
    }
}

impl Gate {
    /// Admits `saga_id` if the window has room (idempotent); `false` means hold it.
    pub async fn admit<S: Store>(
        &self,
        store: &S,
        settings: &GuardSettings,
        saga_id: &str,
    ) -> Result<bool, GuardError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((saga_id.to_owned(), tx));
        {
            let _turn = self.turn.lock().await;
            let batch: Vec<Waiter> =
                std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|p| p.into_inner()));
            if !batch.is_empty() {
                let ids: Vec<String> = batch.iter().map(|(id, _)| id.clone()).collect();
                match admit_all(store, settings, &ids).await {
                    Ok(admitted) => {
                        for ((_, tx), ok) in batch.into_iter().zip(admitted) {
                            let _ = tx.send(Ok(ok));
                        }
                    }
                    Err(e) => {
                        for (_, tx) in batch {
                            let _ = tx.send(Err(e.clone()));
                        }
                    }
                }
            }
        }
        rx.await.unwrap_or_else(|_| {
            Err(GuardError::Store(StoreError::Transient {
                op: "PUT",
                key: WINDOW_KEY.to_owned(),
                message: "admission abandoned".to_owned(),
            }))
        })
    }
}

/// Admits `saga_id` if the window has room (idempotent); `false` means hold it.
pub async fn admit<S: Store>(
    store: &S,
    settings: &GuardSettings,
    saga_id: &str,
) -> Result<bool, GuardError> {
    Ok(admit_all(store, settings, &[saga_id.to_owned()])
        .await?
        .first()
        .copied()
        .unwrap_or(false))
}

/// Admits as many of `saga_ids` as the window has room for, in order, in one write.
pub async fn admit_all<S: Store>(
    store: &S,
    settings: &GuardSettings,
    saga_ids: &[String],
) -> Result<Vec<bool>, GuardError> {
    // Every replica admits through this one object: under contention, back off (jittered,
    // growing) for up to ADMIT_PATIENCE rather than a fixed number of attempts; the sagas
    // that arrive meanwhile join the next batch of this process.
    let deadline = tokio::time::Instant::now() + ADMIT_PATIENCE;
    let mut attempt = 0u32;
    let mut unreadable = 0u32;
    loop {
        attempt += 1;
        let now = Utc::now();
        // A failed read or write is tried again like a lost race: S3 may answer 5xx, and a
        // PUT that timed out may have landed (the next read then shows these sagas admitted).
        let object = match store.get(WINDOW_KEY).await {
            Ok(o) => o,
            Err(e) if e.is_transient() => {
                backoff(attempt, deadline, e).await?;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let (mut window, write) = match object {
            Some(obj) => match parse(&obj.body) {
                Ok(w) => (w, Write::Replace(obj.etag)),
                // Read twice more before calling it corrupt: a store that is not atomic
                // (s3s-fs) can hand out a body mid-write.
                Err(e) if unreadable < 2 => {
                    unreadable += 1;
                    backoff(
                        attempt,
                        deadline,
                        StoreError::Transient {
                            op: "GET",
                            key: WINDOW_KEY.to_owned(),
                            message: e.to_string(),
                        },
                    )
                    .await?;
                    continue;
                }
                Err(e) => return Err(e),
            },
            None => (Window::default(), Write::Create),
        };
        window.prune(now, settings.window_secs);
        let mut results = Vec::with_capacity(saga_ids.len());
        let mut changed = false;
        for id in saga_ids {
            if window.admitted.iter().any(|a| &a.saga_id == id) {
                results.push(true);
            } else if window.admitted.len() < settings.max_destructive_per_window as usize {
                window.admitted.push(Admission {
                    saga_id: id.clone(),
                    at: now,
                });
                changed = true;
                results.push(true);
            } else {
                results.push(false);
            }
        }
        if !changed {
            return Ok(results);
        }
        let body = serde_json::to_vec(&window).unwrap_or_default();
        match store
            .put(WINDOW_KEY, Bytes::from(body), "application/json", write)
            .await
        {
            Ok(_) => return Ok(results),
            // Someone else admitted a saga meanwhile (or S3 stumbled): read again, after a
            // jittered pause.
            Err(e) if e.is_conflict() || e.is_transient() => {
                let e = if e.is_conflict() {
                    StoreError::Transient {
                        op: "PUT",
                        key: WINDOW_KEY.to_owned(),
                        message: format!(
                            "too much contention on the guard window ({attempt} attempts)"
                        ),
                    }
                } else {
                    e
                };
                backoff(attempt, deadline, e).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits a jittered, growing pause before the next attempt; past the deadline, `last` is
/// the error.
async fn backoff(
    attempt: u32,
    deadline: tokio::time::Instant,
    last: StoreError,
) -> Result<(), GuardError> {
    if tokio::time::Instant::now() >= deadline {
        return Err(GuardError::Store(last));
    }
    let cap = 10 * u64::from(attempt.min(8)).pow(2);
    let ms = rand::rng().random_range(1..=cap.max(2));
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(())
}

/// How long one admission may contend for the guard window before the saga parks.
const ADMIT_PATIENCE: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Memory;
    use std::sync::Arc;

    /// S3 stumbling on the window (a 5xx, a timed-out PUT) is tried again, not a park.
    #[tokio::test(start_paused = true)]
    async fn transient_window_failures_are_tried_again() {
        let store = Memory::default();
        let settings = GuardSettings {
            max_destructive_per_window: 10,
            window_secs: 3600,
        };
        store.fail_next_writes("guard/", 5);
        let admitted = admit(&store, &settings, "s1").await.expect("admitted");
        assert!(admitted);
        // For good: a window that cannot be written parks the saga after the patience.
        store.fail_writes(Some("guard/"));
        let err = admit(&store, &settings, "s2")
            .await
            .expect_err("not admitted");
        assert!(
            matches!(err, GuardError::Store(StoreError::Transient { .. })),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_gate_batches_and_still_admits_exactly_the_limit() {
        let store = Arc::new(Memory::default());
        let gate = Arc::new(Gate::default());
        let settings = GuardSettings {
            max_destructive_per_window: 10,
            window_secs: 3600,
        };
        let mut tasks = Vec::new();
        for i in 0..25 {
            let (store, gate, settings) = (store.clone(), gate.clone(), settings.clone());
            tasks.push(tokio::spawn(async move {
                gate.admit(store.as_ref(), &settings, &format!("saga-{i}"))
                    .await
            }));
        }
        let mut admitted = 0;
        for t in tasks {
            if t.await.expect("join").expect("admit") {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 10);
    }

    #[tokio::test]
    async fn exactly_the_limit_is_admitted_under_concurrency() {
        let store = Arc::new(Memory::default());
        let settings = GuardSettings {
            max_destructive_per_window: 10,
            window_secs: 3600,
        };
        let mut tasks = Vec::new();
        for i in 0..25 {
            let store = store.clone();
            let settings = settings.clone();
            tasks.push(tokio::spawn(async move {
                admit(store.as_ref(), &settings, &format!("saga-{i}")).await
            }));
        }
        let mut admitted = 0;
        for t in tasks {
            if t.await.expect("join").expect("admit") {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 10);
        // Idempotent for an admitted saga.
        let w = read(store.as_ref(), &settings).await.expect("read");
        let first = w.admitted[0].saga_id.clone();
        assert!(
            admit(store.as_ref(), &settings, &first)
                .await
                .expect("admit")
        );
        assert_eq!(
            read(store.as_ref(), &settings)
                .await
                .expect("read")
                .admitted
                .len(),
            10
        );
    }

    #[tokio::test]
    async fn an_unreadable_window_fails_closed() {
        let store = Memory::default();
        store.overwrite(WINDOW_KEY, bytes::Bytes::from_static(b"{not json"));
        let settings = GuardSettings {
            max_destructive_per_window: 10,
            window_secs: 3600,
        };
        assert!(matches!(
            admit(&store, &settings, "saga-1").await,
            Err(GuardError::Unreadable(_))
        ));
        assert!(matches!(
            read(&store, &settings).await,
            Err(GuardError::Unreadable(_))
        ));
    }

    #[test]
    fn old_admissions_leave_the_window() {
        let now = Utc::now();
        let mut w = Window {
            admitted: vec![
                Admission {
                    saga_id: "old".into(),
                    at: now - chrono::Duration::seconds(100),
                },
                Admission {
                    saga_id: "new".into(),
                    at: now - chrono::Duration::seconds(10),
                },
            ],
        };
        w.prune(now, 60);
        assert_eq!(w.admitted.len(), 1);
        assert_eq!(w.admitted[0].saga_id, "new");
    }
}
