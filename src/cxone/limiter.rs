//! The client-side rate limiter: a governor token bucket behind a dispatcher that serves the
//! *revoke* class before *housekeeping*, and an AIMD controller that pauses every caller on a
//! 429 until `Retry-After`, cuts the rate multiplicatively, and raises it additively on
//! success up to the configured ceiling. Replicas sharing a tenant quota converge on it
//! without talking to each other, as TCP flows share a link.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{Quota, RateLimiter};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

/// Which queue a call waits in. Locking a leaver out beats archiving their history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// resolve, block login, logout, revoke keys.
    Revoke,
    /// skills, archive pages, delete, compensation.
    Housekeeping,
}

/// Tuning of the adaptive controller.
#[derive(Debug, Clone, Copy)]
pub struct AimdConfig {
    /// Configured requests per second: the ceiling.
    pub ceiling: f64,
    pub burst: u32,
    /// Lowest rate a cut can reach.
    pub floor: f64,
    /// Multiplier applied on a 429 (at most once per `decrease_interval`).
    pub decrease: f64,
    /// Additive increase, as a fraction of the ceiling per second of unthrottled traffic.
    pub increase_per_sec: f64,
    /// Pause when a 429 carries no `Retry-After`.
    pub default_retry_after: Duration,
    /// Gentler cut for a 429 met at (or beyond) the rate of the previous cut: a probe that
    /// found the limit again, not a rate far above it.
    pub probe_decrease: f64,
    /// Harder cut for a 429 within a second of the previous pause ending: the last cut did
    /// not get near the quota (several replicas starting at once).
    pub repeat_decrease: f64,
    /// After a cut the rate follows `w_max · (1 − c · (K − t)³)`, t = seconds of successful
    /// traffic since the cut: back to the rate that was throttled (`w_max`) quickly, a long
    /// plateau just below it, then an accelerating probe beyond. `c` is relative to `w_max`
    /// (s⁻³), so N replicas together probe at the pace of one.
    pub cubic: f64,
}

impl AimdConfig {
    pub fn new(ceiling: f64, burst: u32) -> Self {
        Self {
            ceiling,
            burst: burst.max(1),
            floor: (ceiling / 50.0).max(0.2),
            decrease: 0.7,
            increase_per_sec: 0.03,
            default_retry_after: Duration::from_secs(1),
            probe_decrease: 0.85,
            repeat_decrease: 0.4,
            cubic: 0.0005,
        }
    }
}

/// The AIMD state machine, pure: callers pass the time.
#[derive(Debug, Clone)]
pub struct Aimd {
    cfg: AimdConfig,
    rate: f64,
    last_success: Option<Instant>,
    last_decrease: Option<Instant>,
    pause_until: Option<Instant>,
    /// The rate at the last cut (None until the first 429).
    w_max: Option<f64>,
    /// Seconds of successful traffic since the last cut, and the cubic's `K`.
    epoch: f64,
    k: f64,
}

impl Aimd {
    pub fn new(cfg: AimdConfig) -> Self {
        Self {
            rate: cfg.ceiling,
            cfg,
            last_success: None,
            last_decrease: None,
            pause_until: None,
            w_max: None,
            epoch: 0.0,
            k: 0.0,
        }
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    pub fn paused_until(&self, now: Instant) -> Option<Instant> {
        self.pause_until.filter(|t| *t > now)
    }

    /// A call got through: raise the rate in proportion to the time since the last success.
    pub fn on_success(&mut self, now: Instant) {
        if let Some(prev) = self.last_success {
            let dt = now
                .saturating_duration_since(prev)
                .min(Duration::from_secs(1));
            match self.w_max {
                // Never throttled: additive increase up to the ceiling.
                None => {
                    let step = self.cfg.ceiling * self.cfg.increase_per_sec * dt.as_secs_f64();
                    self.rate = (self.rate + step).min(self.cfg.ceiling);
                }
                Some(w_max) => {
                    self.epoch += dt.as_secs_f64();
                    let x = self.epoch - self.k;
                    let target = w_max * (1.0 + self.cfg.cubic * x * x * x);
                    self.rate = target.clamp(self.cfg.floor, self.cfg.ceiling);
                }
            }
        }
        self.last_success = Some(now);
    }

    /// A 429: pause everyone until `retry_after` and cut the rate, once per throttling episode.
    pub fn on_throttle(&mut self, now: Instant, retry_after: Option<Duration>) {
        let wait = retry_after.unwrap_or(self.cfg.default_retry_after);
        let until = now + wait;
        let previous_pause = self.pause_until;
        self.pause_until = Some(self.pause_until.map_or(until, |p| p.max(until)));
        let episode = wait.max(Duration::from_secs(1));
        let fresh = self
            .last_decrease
            .is_none_or(|t| now.saturating_duration_since(t) >= episode);
        if fresh {
            let repeated = previous_pause.is_some_and(|p| {
                now > p && now.saturating_duration_since(p) < Duration::from_secs(1)
            });
            let factor = match self.w_max {
                _ if repeated => self.cfg.repeat_decrease,
                Some(w) if self.rate >= 0.97 * w => self.cfg.probe_decrease,
                _ => self.cfg.decrease,
            };
            let before = self.rate;
            self.rate = (self.rate * factor).max(self.cfg.floor);
            self.w_max = Some(before);
            self.epoch = 0.0;
            self.k = ((1.0 - self.rate / before).max(0.0) / self.cfg.cubic).cbrt();
            self.last_decrease = Some(now);
        }
        // Successes during the pause must not count as time spent unthrottled.
        self.last_success = None;
    }
}

type Waiter = oneshot::Sender<()>;

#[derive(Default)]
struct Queues {
    revoke: VecDeque<Waiter>,
    housekeeping: VecDeque<Waiter>,
}

impl Queues {
    fn pop(&mut self) -> Option<Waiter> {
        self.revoke
            .pop_front()
            .or_else(|| self.housekeeping.pop_front())
    }
    fn is_empty(&self) -> bool {
        self.revoke.is_empty() && self.housekeeping.is_empty()
    }
}

struct Inner {
    queues: Mutex<Queues>,
    aimd: Mutex<Aimd>,
    wake: Notify,
}

/// A shared handle; the dispatcher task ends when the last handle is dropped.
#[derive(Clone)]
pub struct Limiter {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("rate", &self.current_rate())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Limiter {
    /// Starts the dispatcher on the current tokio runtime.
    pub fn new(cfg: AimdConfig) -> Self {
        let inner = Arc::new(Inner {
            queues: Mutex::new(Queues::default()),
            aimd: Mutex::new(Aimd::new(cfg)),
            wake: Notify::new(),
        });
        tokio::spawn(dispatch(Arc::downgrade(&inner), cfg.burst));
        Self { inner }
    }

    /// Waits for permission to send one request.
    pub async fn acquire(&self, priority: Priority) {
        let (tx, rx) = oneshot::channel();
        {
            let mut q = lock(&self.inner.queues);
            match priority {
                Priority::Revoke => q.revoke.push_back(tx),
                Priority::Housekeeping => q.housekeeping.push_back(tx),
            }
        }
        self.inner.wake.notify_one();
        // The dispatcher only drops a sender when it is shutting down.
        let _ = rx.await;
    }

    pub fn on_success(&self) {
        lock(&self.inner.aimd).on_success(Instant::now());
    }

    pub fn on_throttle(&self, retry_after: Option<Duration>) {
        lock(&self.inner.aimd).on_throttle(Instant::now(), retry_after);
        self.inner.wake.notify_one();
    }

    /// The rate the limiter currently allows, requests per second.
    pub fn current_rate(&self) -> f64 {
        lock(&self.inner.aimd).rate()
    }

    /// Callers waiting now, by class.
    pub fn waiting(&self) -> (usize, usize) {
        let q = lock(&self.inner.queues);
        (q.revoke.len(), q.housekeeping.len())
    }
}

type Bucket = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    DefaultClock,
    governor::middleware::NoOpMiddleware,
>;

fn bucket(rate: f64, burst: u32, drained: bool) -> Bucket {
    let period = Duration::from_secs_f64(1.0 / rate.max(0.01));
    let burst = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
    let quota = Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst);
    let limiter = RateLimiter::direct(quota);
    if drained {
        // A rebuilt bucket starts empty: a rate cut must not hand out a fresh burst.
        for _ in 0..burst.get() {
            let _ = limiter.check();
        }
    }
    limiter
}

async fn dispatch(inner: Weak<Inner>, burst: u32) {
    let clock = DefaultClock::default();
    let mut bucket_rate = match inner.upgrade() {
        Some(i) => lock(&i.aimd).rate(),
        None => return,
    };
    let mut limiter = bucket(bucket_rate, burst, false);
    loop {
        let Some(inner) = inner.upgrade() else { return };
        if lock(&inner.queues).is_empty() {
            // Re-check now and then so the task notices when every handle is gone.
            let _ = tokio::time::timeout(Duration::from_secs(1), inner.wake.notified()).await;
            continue;
        }
        let (rate, pause) = {
            let aimd = lock(&inner.aimd);
            (aimd.rate(), aimd.paused_until(Instant::now()))
        };
        if let Some(until) = pause {
            drop(inner);
            tokio::time::sleep_until(until).await;
            continue;
        }
        if (rate - bucket_rate).abs() / bucket_rate > 0.02 {
            limiter = bucket(rate, burst, true);
            bucket_rate = rate;
        }
        match limiter.check() {
            Ok(()) => {
                let mut q = lock(&inner.queues);
                // A waiter that gave up (its future was dropped) does not use the token.
                while let Some(waiter) = q.pop() {
                    if waiter.send(()).is_ok() {
                        break;
                    }
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(clock.now());
                drop(inner);
                tokio::time::sleep(wait.max(Duration::from_micros(100))).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aimd_cuts_once_per_episode_and_recovers_to_the_ceiling() {
        let t0 = Instant::now();
        let mut a = Aimd::new(AimdConfig::new(100.0, 10));
        a.on_throttle(t0, Some(Duration::from_secs(2)));
        assert!((a.rate() - 70.0).abs() < 1e-9);
        assert_eq!(a.paused_until(t0), Some(t0 + Duration::from_secs(2)));
        // More 429s of the same episode do not cut again.
        a.on_throttle(t0 + Duration::from_millis(10), Some(Duration::from_secs(1)));
        assert!((a.rate() - 70.0).abs() < 1e-9);
        assert_eq!(
            a.paused_until(t0 + Duration::from_millis(10)),
            Some(t0 + Duration::from_secs(2))
        );
        // A later episode does.
        a.on_throttle(t0 + Duration::from_secs(3), None);
        assert!((a.rate() - 49.0).abs() < 1e-9);
        // Additive increase: 3% of the ceiling per second of successes.
        let mut t = t0 + Duration::from_secs(4);
        for _ in 0..200 {
            a.on_success(t);
            t += Duration::from_millis(100);
        }
        assert!((a.rate() - 100.0).abs() < 1e-9, "{}", a.rate());
    }

    #[test]
    fn aimd_returns_near_the_throttled_rate_plateaus_and_cuts_gently_at_it() {
        let t0 = Instant::now();
        let mut a = Aimd::new(AimdConfig::new(100.0, 10));
        a.on_throttle(t0, Some(Duration::from_secs(1)));
        assert!((a.rate() - 70.0).abs() < 1e-9);
        // Successes every 100 ms from t0 + 1 s: concave return towards 100.
        let mut t = t0 + Duration::from_secs(1);
        for _ in 0..=50 {
            a.on_success(t);
            t += Duration::from_millis(100);
        }
        assert!(a.rate() > 90.0 && a.rate() < 100.0, "{}", a.rate());
        for _ in 0..30 {
            a.on_success(t);
            t += Duration::from_millis(100);
        }
        // Around K the rate sits on the plateau just below the throttled rate.
        assert!(a.rate() > 97.0 && a.rate() <= 100.0, "{}", a.rate());
        // A 429 there is a probe that found the limit: a gentle cut.
        a.on_throttle(t, Some(Duration::from_secs(1)));
        let expected = 0.85 * 100.0;
        assert!(
            a.rate() > expected - 3.0 && a.rate() <= expected,
            "{}",
            a.rate()
        );
    }

    #[test]
    fn aimd_cuts_hard_when_throttled_again_right_after_a_pause() {
        let t0 = Instant::now();
        let mut a = Aimd::new(AimdConfig::new(400.0, 50));
        a.on_throttle(t0, Some(Duration::from_secs(1)));
        assert!((a.rate() - 280.0).abs() < 1e-9);
        // 0.2 s after the pause ended: still far above the quota.
        a.on_throttle(
            t0 + Duration::from_millis(1200),
            Some(Duration::from_secs(1)),
        );
        assert!((a.rate() - 112.0).abs() < 1e-9, "{}", a.rate());
    }

    #[test]
    fn aimd_never_goes_below_the_floor() {
        let mut a = Aimd::new(AimdConfig::new(10.0, 1));
        let mut t = Instant::now();
        for _ in 0..100 {
            a.on_throttle(t, Some(Duration::ZERO));
            t += Duration::from_secs(2);
        }
        assert!(a.rate() >= 0.2);
    }

    #[tokio::test]
    async fn revoke_is_served_before_housekeeping() {
        let limiter = Limiter::new(AimdConfig::new(20.0, 1));
        // Saturate with housekeeping waiters.
        let mut handles = Vec::new();
        for _ in 0..20 {
            let l = limiter.clone();
            handles.push(tokio::spawn(async move {
                l.acquire(Priority::Housekeeping).await;
            }));
        }
        tokio::time::sleep(Duration::from_millis(120)).await;
        let started = std::time::Instant::now();
        limiter.acquire(Priority::Revoke).await;
        let waited = started.elapsed();
        // One token interval is 50 ms; allow scheduling slack.
        assert!(
            waited < Duration::from_millis(90),
            "revoke waited {waited:?}"
        );
        for h in handles {
            h.abort();
        }
    }

    #[tokio::test]
    async fn the_rate_is_enforced() {
        let limiter = Limiter::new(AimdConfig::new(50.0, 5));
        let started = std::time::Instant::now();
        for _ in 0..30 {
            limiter.acquire(Priority::Housekeeping).await;
        }
        // 5 from the burst, 25 at 50/s = 0.5 s.
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(450), "{took:?}");
        assert!(took < Duration::from_millis(900), "{took:?}");
    }

    #[tokio::test]
    async fn a_throttle_pauses_everyone() {
        let limiter = Limiter::new(AimdConfig::new(1000.0, 10));
        limiter.on_throttle(Some(Duration::from_millis(300)));
        let started = std::time::Instant::now();
        limiter.acquire(Priority::Revoke).await;
        assert!(started.elapsed() >= Duration::from_millis(280));
        assert!(limiter.current_rate() < 1000.0);
    }
}
