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
    /// On a 429 the rate drops to this fraction of the throughput just achieved (the share of
    /// the tenant quota this process actually got), or of the current rate if lower.
    pub decrease: f64,
    /// After a cut, the rate holds this long (past the pause) before rising again.
    pub hold: Duration,
    pub max_hold: Duration,
    /// Recovery: multiplicative increase per second while below the level that was throttled.
    pub recover_per_sec: f64,
    /// Probing: multiplicative increase per second once back at that level.
    pub increase_per_sec: f64,
    /// Pause when a 429 carries no `Retry-After`.
    pub default_retry_after: Duration,
}

impl AimdConfig {
    pub fn new(ceiling: f64, burst: u32) -> Self {
        Self {
            ceiling,
            burst: burst.max(1),
            floor: (ceiling / 50.0).max(0.2),
            decrease: 0.95,
            hold: Duration::from_secs(2),
            max_hold: Duration::from_secs(8),
            recover_per_sec: 0.05,
            increase_per_sec: 0.01,
            default_retry_after: Duration::from_secs(1),
        }
    }
}

/// Successes per 100 ms slot over the last two seconds: the throughput actually achieved.
#[derive(Debug, Clone)]
struct Throughput {
    slots: [u32; 20],
    /// Index of the slot of `slot_start`.
    head: usize,
    slot_start: Option<Instant>,
    since: Option<Instant>,
}

impl Throughput {
    const SLOT: Duration = Duration::from_millis(100);

    fn new() -> Self {
        Self {
            slots: [0; 20],
            head: 0,
            slot_start: None,
            since: None,
        }
    }

    fn advance(&mut self, now: Instant) {
        let Some(mut start) = self.slot_start else {
            self.slot_start = Some(now);
            self.since = Some(now);
            return;
        };
        let mut steps = 0;
        while now.saturating_duration_since(start) >= Self::SLOT && steps < 21 {
            start += Self::SLOT;
            self.head = (self.head + 1) % self.slots.len();
            self.slots[self.head] = 0;
            steps += 1;
        }
        if steps >= 21 {
            start = now;
        }
        self.slot_start = Some(start);
    }

    fn record(&mut self, now: Instant) {
        self.advance(now);
        self.slots[self.head] = self.slots[self.head].saturating_add(1);
    }

    /// Requests per second over the window, once at least a second has been observed.
    fn rate(&mut self, now: Instant) -> Option<f64> {
        self.advance(now);
        let observed = now.saturating_duration_since(self.since?);
        if observed < Duration::from_secs(1) {
            return None;
        }
        let window = observed.min(Duration::from_secs(2)).as_secs_f64();
        Some(f64::from(self.slots.iter().sum::<u32>()) / window)
    }

    fn reset(&mut self) {
        *self = Self::new();
    }
}

/// The adaptive controller, pure: callers pass the time.
#[derive(Debug, Clone)]
pub struct Aimd {
    cfg: AimdConfig,
    rate: f64,
    last_success: Option<Instant>,
    last_decrease: Option<Instant>,
    pause_until: Option<Instant>,
    hold_until: Option<Instant>,
    hold: Duration,
    throughput: Throughput,
    /// The share achieved when last throttled: recover quickly to just below it, then probe.
    level: Option<f64>,
}

impl Aimd {
    pub fn new(cfg: AimdConfig) -> Self {
        Self {
            rate: cfg.ceiling,
            hold: cfg.hold,
            cfg,
            last_success: None,
            last_decrease: None,
            pause_until: None,
            hold_until: None,
            throughput: Throughput::new(),
            level: None,
        }
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    pub fn paused_until(&self, now: Instant) -> Option<Instant> {
        self.pause_until.filter(|t| *t > now)
    }

    /// A call got through: count it, and past the hold probe upward.
    pub fn on_success(&mut self, now: Instant) {
        self.throughput.record(now);
        let holding = self.hold_until.is_some_and(|h| now < h);
        if let Some(prev) = self.last_success
            && !holding
        {
            let dt = now
                .saturating_duration_since(prev)
                .min(Duration::from_secs(1));
            let grown = self.rate * (1.0 + self.cfg.increase_per_sec * dt.as_secs_f64());
            self.rate = grown.min(self.cfg.ceiling);
        }
        self.last_success = Some(now);
    }

    /// A 429: pause everyone until `retry_after`; cut to the share just achieved, once per
    /// throttling episode, and hold there before probing again.
    pub fn on_throttle(&mut self, now: Instant, retry_after: Option<Duration>) {
        let wait = retry_after.unwrap_or(self.cfg.default_retry_after);
        let until = now + wait;
        self.pause_until = Some(self.pause_until.map_or(until, |p| p.max(until)));
        let episode = wait.max(Duration::from_secs(1));
        let fresh = self
            .last_decrease
            .is_none_or(|t| now.saturating_duration_since(t) >= episode);
        if fresh {
            let achieved = self.throughput.rate(now);
            let base = match achieved {
                Some(a) if a > 0.0 => a.min(self.rate),
                // Too early to know our share: halve.
                _ => self.rate * 0.5,
            };
            self.level = Some(base);
            self.rate = (base * self.cfg.decrease).clamp(self.cfg.floor, self.cfg.ceiling);
            // 429s close together mean the probing is too eager: hold longer.
            let recent = self
                .last_decrease
                .is_some_and(|t| now.saturating_duration_since(t) < self.hold * 4);
            self.hold = if recent {
                (self.hold * 2).min(self.cfg.max_hold)
            } else {
                self.cfg.hold
            };
            self.last_decrease = Some(now);
            self.hold_until = Some(until + self.hold);
            self.throughput.reset();
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
    fn aimd_cuts_to_the_achieved_share_holds_then_probes_back_to_the_ceiling() {
        let t0 = Instant::now();
        let mut a = Aimd::new(AimdConfig::new(100.0, 10));
        // Two seconds at 40 successes per second: our share of the quota.
        let mut t = t0;
        for _ in 0..80 {
            a.on_success(t);
            t += Duration::from_millis(25);
        }
        a.on_throttle(t, Some(Duration::from_secs(2)));
        assert!(
            (a.rate() - 38.0).abs() < 2.5,
            "cut to ~0.95 x 40: {}",
            a.rate()
        );
        assert_eq!(a.paused_until(t), Some(t + Duration::from_secs(2)));
        let cut = a.rate();
        // More 429s of the same episode do not cut again.
        a.on_throttle(t + Duration::from_millis(10), Some(Duration::from_secs(1)));
        assert_eq!(a.rate(), cut);
        // Held for the pause plus the hold: no increase.
        let mut u = t + Duration::from_secs(2);
        for _ in 0..15 {
            a.on_success(u);
            u += Duration::from_millis(100);
        }
        assert_eq!(a.rate(), cut, "holding");
        // Then it recovers quickly to just below the throttled share…
        for _ in 0..30 {
            a.on_success(u);
            u += Duration::from_millis(100);
        }
        assert!(
            a.rate() > 37.0 && a.rate() <= 0.99 * 40.0 + 1.0,
            "{}",
            a.rate()
        );
        // …and probes slowly on up to the ceiling, never beyond.
        for _ in 0..2000 {
            a.on_success(u);
            u += Duration::from_millis(100);
        }
        assert!((a.rate() - 100.0).abs() < 1e-9, "{}", a.rate());
    }

    #[test]
    fn an_early_429_halves_and_repeated_ones_lengthen_the_hold() {
        let t0 = Instant::now();
        let mut a = Aimd::new(AimdConfig::new(100.0, 10));
        a.on_throttle(t0, None);
        assert!((a.rate() - 47.5).abs() < 1e-9, "{}", a.rate());
        let first_hold = a.hold;
        a.on_throttle(t0 + Duration::from_secs(2), None);
        assert!(a.hold > first_hold);
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
