//! The circuit breaker: when CXone keeps failing, stop calling it (and tell the consumer to
//! stop taking deliveries) instead of burning every saga's retries; a probe closes it again.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    /// Consecutive transient failures (not 429s) that open the circuit.
    pub failure_threshold: u32,
    /// How long it stays open before a probe; doubles on a failed probe up to `max_open`.
    pub open_for: Duration,
    pub max_open: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 20,
            open_for: Duration::from_secs(15),
            max_open: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed { failures: u32 },
    Open { until: Instant, open_for: Duration },
    HalfOpen { open_for: Duration },
}

/// The state machine; `watch` carries "open" (true while not closed) to the consumer.
#[derive(Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    state: Mutex<State>,
    open_tx: watch::Sender<bool>,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig) -> Self {
        let (open_tx, _) = watch::channel(false);
        Self {
            cfg,
            state: Mutex::new(State::Closed { failures: 0 }),
            open_tx,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `true` while the circuit is open or half-open.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.open_tx.subscribe()
    }

    pub fn state(&self) -> State {
        *self.lock()
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state(), State::Closed { .. })
    }

    /// May a request go out now? An expired open state lets requests probe (half-open).
    pub fn allow(&self, now: Instant) -> bool {
        let mut s = self.lock();
        match *s {
            State::Closed { .. } | State::HalfOpen { .. } => true,
            State::Open { until, open_for } if now >= until => {
                *s = State::HalfOpen { open_for };
                true
            }
            State::Open { .. } => false,
        }
    }

    /// When the open state ends, if open.
    pub fn open_until(&self) -> Option<Instant> {
        match self.state() {
            State::Open { until, .. } => Some(until),
            _ => None,
        }
    }

    pub fn on_success(&self) {
        let mut s = self.lock();
        let was_closed = matches!(*s, State::Closed { .. });
        *s = State::Closed { failures: 0 };
        drop(s);
        if !was_closed {
            tracing::info!("CXone circuit closed");
            self.open_tx.send_replace(false);
        }
    }

    pub fn on_failure(&self, now: Instant) {
        let mut s = self.lock();
        let next = match *s {
            State::Closed { failures } if failures + 1 >= self.cfg.failure_threshold => {
                Some(self.cfg.open_for)
            }
            State::Closed { failures } => {
                *s = State::Closed {
                    failures: failures + 1,
                };
                None
            }
            State::HalfOpen { open_for } => Some((open_for * 2).min(self.cfg.max_open)),
            State::Open { .. } => None,
        };
        if let Some(open_for) = next {
            *s = State::Open {
                until: now + open_for,
                open_for,
            };
            drop(s);
            tracing::warn!(
                open_secs = open_for.as_secs(),
                "CXone circuit open: pausing intake"
            );
            self.open_tx.send_replace(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_and_closes_after_a_good_probe() {
        let b = Breaker::new(BreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_secs(10),
            max_open: Duration::from_secs(40),
        });
        let rx = b.subscribe();
        let t0 = Instant::now();
        b.on_failure(t0);
        b.on_failure(t0);
        assert!(b.allow(t0));
        b.on_failure(t0);
        assert!(*rx.borrow());
        assert!(!b.allow(t0 + Duration::from_secs(5)));
        // Half-open after the period; a failed probe doubles the wait.
        assert!(b.allow(t0 + Duration::from_secs(10)));
        b.on_failure(t0 + Duration::from_secs(10));
        assert_eq!(b.open_until(), Some(t0 + Duration::from_secs(30)));
        assert!(b.allow(t0 + Duration::from_secs(30)));
        b.on_success();
        assert!(b.is_closed());
        assert!(!*rx.borrow());
    }

    #[test]
    fn a_success_resets_the_count() {
        let b = Breaker::new(BreakerConfig {
            failure_threshold: 2,
            ..BreakerConfig::default()
        });
        let t0 = Instant::now();
        b.on_failure(t0);
        b.on_success();
        b.on_failure(t0);
        assert!(b.is_closed());
    }
}
