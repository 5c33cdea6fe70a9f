//! The client-side rate limiter: a governor token bucket behind a dispatcher that serves the
//! *revoke* class before *housekeeping*, and an AIMD controller that pauses every caller on a
//! 429 until `Retry-After`, cuts the rate to just below the share of the quota this process
//! actually achieved while busy, and raises it additively on success up to the configured
//! ceiling (gently just after a cut, faster the longer no 429 arrives, faster for a small
//! share than for a large one). Replicas sharing a
//! tenant quota converge on it without talking to each other, as TCP flows share a link; see
//! docs/decisions.md for the numbers.

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

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Revoke => "revoke",
            Self::Housekeeping => "housekeeping",
        }
    }
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
    /// the tenant quota this process actually got), or of the current rate if lower. A share
    /// below half the ceiling is cut deeper, by `(1 − decrease) × √(ceiling / 2 / share)`, at
    /// most 15 %.
    pub decrease: f64,
    /// After a pause ends, the rate holds this long before rising again.
    pub hold: Duration,
    /// Repeated 429s double the hold up to this.
    pub max_hold: Duration,
    /// Probing after the hold: requests per second added per second, growing the longer no
    /// 429 arrives (`probe × (1 + (t / probe_ramp)³)`, times `ceiling / 2 / rate` up to 8 for
    /// a rate below half the ceiling): gentle just after a cut, where the
    /// quota was found, so one process alone meets a 429 rarely; fast once no 429 has come
    /// for a while, so a process whose neighbours have gone idle takes up the quota in
    /// seconds.
    pub probe: f64,
    pub probe_ramp: Duration,
    /// Pause when a 429 carries no `Retry-After`.
    pub default_retry_after: Duration,
    /// The longest pause one 429 may cause, whatever `Retry-After` says.
    pub max_retry_after: Duration,
    /// Up to this much is added at random to every pause, so replicas throttled together do
    /// not all resume in the same millisecond.
    pub max_jitter: Duration,
}

impl AimdConfig {
    pub fn new(ceiling: f64, burst: u32) -> Self {
        Self {
            ceiling,
            burst: burst.max(1),
            floor: (ceiling / 50.0).max(0.2),
            decrease: 0.95,
            hold: Duration::from_secs(1),
            max_hold: Duration::from_secs(4),
            probe: ceiling * 0.00125,
            probe_ramp: Duration::from_millis(3500),
            default_retry_after: Duration::from_secs(1),
            max_retry_after: Duration::from_secs(60),
            max_jitter: Duration::from_millis(200),
        }
    }
}

/// Successes per 100 ms slot over the last two seconds, and which slots saw a request sent:
/// the throughput achieved while there was work and permission to send. Idle time and
/// pauses do not dilute it.
const WINDOW_SLOTS: usize = 50;

#[derive(Debug, Clone)]
struct Throughput {
    slots: [u32; WINDOW_SLOTS],
    busy: [bool; WINDOW_SLOTS],
    /// Index of the slot of `slot_start`.
    head: usize,
    slot_start: Option<Instant>,
}

impl Throughput {
    const SLOT: Duration = Duration::from_millis(100);

    fn new() -> Self {
        Self {
            slots: [0; WINDOW_SLOTS],
            busy: [false; WINDOW_SLOTS],
            head: 0,
            slot_start: None,
        }
    }

    fn advance(&mut self, now: Instant) {
        let Some(mut start) = self.slot_start else {
            self.slot_start = Some(now);
            return;
        };
        let mut steps = 0;
        while now.saturating_duration_since(start) >= Self::SLOT && steps <= WINDOW_SLOTS {
            start += Self::SLOT;
            self.head = (self.head + 1) % self.slots.len();
            self.slots[self.head] = 0;
            self.busy[self.head] = false;
            steps += 1;
        }
        if steps > WINDOW_SLOTS {
            start = now;
        }
        self.slot_start = Some(start);
    }

    fn record(&mut self, now: Instant) {
        self.advance(now);
        self.slots[self.head] = self.slots[self.head].saturating_add(1);
    }

    fn sent(&mut self, now: Instant) {
        self.advance(now);
        self.busy[self.head] = true;
    }

    /// Successes per second of busy time, once at least 300 ms of it has been seen.
    fn rate(&mut self, now: Instant) -> Option<f64> {
        self.advance(now);
        let busy = self.busy.iter().filter(|b| **b).count();
        if busy < 3 {
            return None;
        }
        Some(f64::from(self.slots.iter().sum::<u32>()) / (busy as f64 * Self::SLOT.as_secs_f64()))
    }
}

/// The adaptive controller, pure: callers pass the time (and the jitter).
#[derive(Debug, Clone)]
pub struct Aimd {
    cfg: AimdConfig,
    rate: f64,
    last_success: Option<Instant>,
    last_decrease: Option<Instant>,
    pause_until: Option<Instant>,
    /// No increase before this; probing time counts from here.
    hold_until: Option<Instant>,
    hold: Duration,
    throughput: Throughput,
    first_send: Option<Instant>,
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
            first_send: None,
        }
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// The bucket's burst at the current rate: a process cut to a share of the quota bursts
    /// in proportion, so replicas resuming together do not empty the tenant's bucket at once.
    ///
    /// For the first second of sending, before any 429, the burst is one: replicas starting
    /// together must not each spend a full burst before any of them has heard the tenant.
    pub fn burst(&self, now: Instant) -> u32 {
        let starting = self.last_decrease.is_none()
            && self
                .first_send
                .is_none_or(|t| now.saturating_duration_since(t) < Duration::from_secs(1));
        if starting {
            return 1;
        }
        let scaled = f64::from(self.cfg.burst) * (self.rate / self.cfg.ceiling);
        (scaled.round() as u32).clamp(1, self.cfg.burst)
    }

    pub fn paused_until(&self, now: Instant) -> Option<Instant> {
        self.pause_until.filter(|t| *t > now)
    }

    /// A request is being sent now.
    pub fn on_send(&mut self, now: Instant) {
        self.first_send.get_or_insert(now);
        self.throughput.sent(now);
    }

    /// A call got through: count it, and past the hold raise the rate additively.
    pub fn on_success(&mut self, now: Instant) {
        self.throughput.record(now);
        let holding = self.hold_until.is_some_and(|h| now < h);
        if let Some(prev) = self.last_success
            && !holding
        {
            let dt = now
                .saturating_duration_since(prev)
                .min(Duration::from_secs(1))
                .as_secs_f64();
            let probing = self.hold_until.map_or(Duration::from_secs(3600), |h| {
                now.saturating_duration_since(h)
            });
            let x = probing.as_secs_f64() / self.cfg.probe_ramp.as_secs_f64();
            // A process holding a small part of the quota probes faster: its 429 pauses only
            // its own small share, and the quota it finds freed is what shortens a run's tail.
            let small = (self.cfg.ceiling / (2.0 * self.rate)).clamp(1.0, 8.0);
            let step = self.cfg.probe * small * (1.0 + x.powi(3));
            self.rate = (self.rate + step * dt).min(self.cfg.ceiling);
        }
        self.last_success = Some(now);
    }

    /// A 429: pause everyone until `retry_after` (plus `jitter`, capped by the config); cut
    /// to the share just achieved, once per throttling episode, and hold there after the
    /// pause before probing again.
    pub fn on_throttle(&mut self, now: Instant, retry_after: Option<Duration>, jitter: f64) {
        // A server may ask for an hour; one 429 pauses this process at most this long.
        let wait = retry_after
            .unwrap_or(self.cfg.default_retry_after)
            .min(self.cfg.max_retry_after);
        let jitter = self
            .cfg
            .max_jitter
            .min(wait / 5)
            .mul_f64(jitter.clamp(0.0, 1.0));
        let until = now + wait + jitter;
        self.pause_until = Some(self.pause_until.map_or(until, |p| p.max(until)));
        let episode = wait.max(Duration::from_secs(1));
        let fresh = self
            .last_decrease
            .is_none_or(|t| now.saturating_duration_since(t) >= episode);
        if fresh {
            let base = match self.throughput.rate(now) {
                Some(a) if a > 0.0 => a.min(self.rate),
                // Too little seen to know our share: halve.
                _ => self.rate * 0.5,
            };
            // A small share is cut deeper: with N replicas each holds about 1/N of the quota,
            // a 5 % cut of one of them barely lowers the sum, and the next 429 (a one-second
            // hole in someone's traffic) would follow at once.
            let small = (self.cfg.ceiling / (2.0 * base.max(self.cfg.floor))).clamp(1.0, 8.0);
            let cut = ((1.0 - self.cfg.decrease) * small.sqrt()).min(0.15);
            self.rate = (base * (1.0 - cut)).clamp(self.cfg.floor, self.cfg.ceiling);
            // 429s close together mean the probing is too eager: hold longer.
            let recent = self
                .last_decrease
                .is_some_and(|t| now.saturating_duration_since(t) < (self.hold + episode) * 2);
            self.hold = if recent {
                (self.hold * 2).min(self.cfg.max_hold)
            } else {
                self.cfg.hold
            };
            self.last_decrease = Some(now);
        }
        let paused_until = self.pause_until.unwrap_or(until);
        self.hold_until = Some(paused_until + self.hold);
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
        tokio::spawn(dispatch(Arc::downgrade(&inner)));
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

    /// When the pause after the last 429 ends, if one is on.
    pub fn paused_until(&self) -> Option<Instant> {
        lock(&self.inner.aimd).paused_until(Instant::now())
    }

    pub fn on_throttle(&self, retry_after: Option<Duration>) {
        let jitter = rand::random::<f64>();
        lock(&self.inner.aimd).on_throttle(Instant::now(), retry_after, jitter);
        self.inner.wake.notify_one();
    }

    /// The rate the limiter currently allows, requests per second.
    pub fn current_rate(&self) -> f64 {
        lock(&self.inner.aimd).rate()
    }

    /// Starts the controller afresh under a new ceiling: the share of the tenant's quota this
    /// process takes when it falls back from the shared bucket.
    pub fn reset(&self, ceiling: f64, burst: u32) {
        let mut aimd = lock(&self.inner.aimd);
        let mut cfg = AimdConfig::new(ceiling, burst);
        cfg.max_retry_after = aimd.cfg.max_retry_after;
        *aimd = Aimd::new(cfg);
        drop(aimd);
        self.inner.wake.notify_one();
    }

    /// The configuration the controller runs under now.
    pub fn config(&self) -> AimdConfig {
        lock(&self.inner.aimd).cfg
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

async fn dispatch(inner: Weak<Inner>) {
    let clock = DefaultClock::default();
    let (mut bucket_rate, mut bucket_burst) = match inner.upgrade() {
        Some(i) => {
            let aimd = lock(&i.aimd);
            (aimd.rate(), aimd.burst(Instant::now()))
        }
        None => return,
    };
    let mut limiter = bucket(bucket_rate, bucket_burst, false);
    let mut paused = false;
    loop {
        let Some(inner) = inner.upgrade() else { return };
        if lock(&inner.queues).is_empty() {
            // Re-check now and then so the task notices when every handle is gone.
            let _ = tokio::time::timeout(Duration::from_secs(1), inner.wake.notified()).await;
            continue;
        }
        let (rate, burst, pause) = {
            let aimd = lock(&inner.aimd);
            let now = Instant::now();
            (aimd.rate(), aimd.burst(now), aimd.paused_until(now))
        };
        if let Some(until) = pause {
            drop(inner);
            tokio::time::sleep_until(until).await;
            paused = true;
            continue;
        }
        // After a pause, start from an empty bucket: what accrued while paused must not come
        // out as one burst.
        if paused {
            limiter = bucket(rate, burst, true);
            bucket_rate = rate;
            bucket_burst = burst;
            paused = false;
        }
        match limiter.check() {
            Ok(()) => {
                // The rate moved: rebuild the bucket now, just after a token was taken, when an
                // empty bucket loses nothing. (Rebuilt at any other moment it would throw away
                // the part of a token accrued so far; at a few requests per second with the
                // rate rising every few milliseconds, that starved the process.)
                if (rate - bucket_rate).abs() / bucket_rate > 0.02 || burst != bucket_burst {
                    limiter = bucket(rate, burst, true);
                    bucket_rate = rate;
                    bucket_burst = burst;
                }
                let mut q = lock(&inner.queues);
                // A waiter that gave up (its future was dropped) does not use the token.
                while let Some(waiter) = q.pop() {
                    if waiter.send(()).is_ok() {
                        lock(&inner.aimd).on_send(Instant::now());
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

    /// `n` requests sent and answered, `every` apart from `t`; returns the time after them.
    fn busy(a: &mut Aimd, mut t: Instant, n: usize, every: Duration) -> Instant {
        for _ in 0..n {
            a.on_send(t);
            a.on_success(t);
            t += every;
        }
        t
    }

    #[test]
    fn aimd_cuts_to_the_achieved_share_holds_then_probes_back_to_the_ceiling() {
        let t0 = Instant::now();
        let mut a = Aimd::new(AimdConfig::new(100.0, 10));
        // Two seconds at 40 successes per second: our share of the quota.
        let mut t = t0;
        t = busy(&mut a, t, 80, Duration::from_millis(25));
        a.on_throttle(t, Some(Duration::from_secs(2)), 0.0);
        assert!(
            (a.rate() - 38.0).abs() < 2.5,
            "cut to ~0.95 x 40: {}",
            a.rate()
        );
        assert_eq!(a.paused_until(t), Some(t + Duration::from_secs(2)));
        let cut = a.rate();
        // More 429s of the same episode do not cut again.
        a.on_throttle(
            t + Duration::from_millis(10),
            Some(Duration::from_secs(1)),
            0.5,
        );
        assert_eq!(a.rate(), cut);
        // Held for the pause plus the hold: no increase.
        let mut u = t + Duration::from_secs(2);
        u = busy(&mut a, u, 10, Duration::from_millis(100));
        assert_eq!(a.rate(), cut, "holding");
        // Then it probes gently near the share it found…
        u = busy(&mut a, u, 10, Duration::from_millis(100));
        assert!(
            a.rate() > cut && a.rate() < cut + 0.5,
            "{} after {cut}",
            a.rate()
        );
        // …and ever faster on up to the ceiling, never beyond.
        busy(&mut a, u, 2000, Duration::from_millis(100));
        assert!((a.rate() - 100.0).abs() < 1e-9, "{}", a.rate());
    }

    #[test]
    fn an_early_429_halves_and_repeated_ones_lengthen_the_hold() {
        let t0 = Instant::now();
        let mut a = Aimd::new(AimdConfig::new(100.0, 10));
        a.on_throttle(t0, None, 0.0);
        assert!((a.rate() - 47.5).abs() < 1e-9, "{}", a.rate());
        assert_eq!(a.burst(t0), 5, "the burst shrinks with the rate");
        let first_hold = a.hold;
        a.on_throttle(t0 + Duration::from_secs(2), None, 0.0);
        assert!(a.hold > first_hold);
    }

    #[test]
    fn the_share_is_measured_over_the_time_not_spent_paused() {
        let mut a = Aimd::new(AimdConfig::new(100.0, 10));
        let mut t = Instant::now();
        t = busy(&mut a, t, 60, Duration::from_millis(25));
        a.on_throttle(t, Some(Duration::from_secs(1)), 0.0);
        assert!((a.rate() - 38.0).abs() < 2.5, "{}", a.rate());
        // After the pause, the same 40 per second again, then another 429.
        let mut u = t + Duration::from_secs(1);
        u = busy(&mut a, u, 24, Duration::from_millis(25));
        a.on_throttle(u, Some(Duration::from_secs(1)), 0.0);
        // 40 successes in the last 2 s, one of them paused: a share of 40/s, not 20/s.
        assert!(a.rate() > 34.0, "{}", a.rate());
    }

    #[test]
    fn probing_is_gentle_near_the_level_and_fast_once_the_quota_is_free() {
        let cfg = AimdConfig::new(400.0, 50);
        let mut a = Aimd::new(cfg);
        let mut t = Instant::now();
        t = busy(&mut a, t, 100, Duration::from_millis(20));
        // A share of about 50 per second, a quarter of half the ceiling: cut by 10 % (5 % ×
        // √4), paused 1 s, held 1 s.
        a.on_throttle(t, Some(Duration::from_secs(1)), 0.0);
        assert!(a.rate() > 43.0 && a.rate() < 46.0, "{}", a.rate());
        let cut = a.rate();
        let mut u = t + Duration::from_secs(2);
        let mut step = || {
            a.on_send(u);
            a.on_success(u);
            u += Duration::from_millis(10);
            a.rate()
        };
        // The first one and a half seconds of probing add a few requests per second (a small
        // share probes faster than a large one)…
        let mut r = 0.0;
        for _ in 0..150 {
            r = step();
        }
        assert!(r > cut + 1.0 && r < cut + 6.0, "{r} after {cut}");
        // The neighbours are gone: three times the share within 15 s, the ceiling later.
        for _ in 0..1350 {
            r = step();
        }
        assert!(r > 150.0, "{r}");
        for _ in 0..3000 {
            r = step();
        }
        assert!((r - 400.0).abs() < 1e-9, "{r}");
    }

    #[test]
    fn a_process_alone_at_the_quota_cuts_five_percent_and_probes_gently() {
        let mut a = Aimd::new(AimdConfig::new(400.0, 50));
        let mut t = Instant::now();
        t = busy(&mut a, t, 1000, Duration::from_millis(5));
        a.on_throttle(t, Some(Duration::from_secs(1)), 0.0);
        assert!((a.rate() - 190.0).abs() < 2.0, "{}", a.rate());
        let cut = a.rate();
        let u = t + Duration::from_secs(2);
        busy(&mut a, u, 300, Duration::from_millis(5));
        assert!(a.rate() < cut + 1.5, "{} after {cut}", a.rate());
    }

    #[test]
    fn the_burst_is_one_until_the_first_second_of_sending_has_passed() {
        let mut a = Aimd::new(AimdConfig::new(400.0, 50));
        let t = Instant::now();
        assert_eq!(a.burst(t), 1);
        a.on_send(t);
        assert_eq!(a.burst(t + Duration::from_millis(900)), 1);
        assert_eq!(a.burst(t + Duration::from_millis(1100)), 50);
        // A 429 ends the start: the burst follows the rate from then on.
        let mut b = Aimd::new(AimdConfig::new(400.0, 50));
        b.on_send(t);
        b.on_throttle(t, Some(Duration::from_secs(1)), 0.0);
        assert!(b.burst(t) > 1);
    }

    #[tokio::test]
    async fn a_low_rate_that_keeps_rising_still_hands_out_tokens() {
        // At a few requests per second with the rate rising every few milliseconds (successes
        // of earlier requests), the bucket used to be rebuilt empty before a token accrued.
        let limiter = Limiter::new(AimdConfig::new(400.0, 50));
        {
            let mut a = lock(&limiter.inner.aimd);
            a.rate = 10.0;
            a.first_send = Some(Instant::now() - Duration::from_secs(5));
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let rising = {
            let limiter = limiter.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    {
                        let mut a = lock(&limiter.inner.aimd);
                        // +0.5 % every 5 ms: 10 → about 27 per second over the second.
                        a.rate = (a.rate * 1.005).min(40.0);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        let started = std::time::Instant::now();
        let mut sent = 0;
        while started.elapsed() < Duration::from_secs(1) {
            if tokio::time::timeout(
                Duration::from_secs(1),
                limiter.acquire(Priority::Housekeeping),
            )
            .await
            .is_ok()
            {
                sent += 1;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = rising.await;
        assert!(sent >= 8, "{sent} tokens in a second at 10–27 per second");
    }

    #[test]
    fn a_pause_ends_within_the_jitter_cap_of_retry_after() {
        let mut a = Aimd::new(AimdConfig::new(100.0, 10));
        let t = Instant::now();
        a.on_throttle(t, Some(Duration::from_secs(3)), 1.0);
        assert_eq!(
            a.paused_until(t),
            Some(t + Duration::from_secs(3) + Duration::from_millis(200))
        );
    }

    #[test]
    fn idle_time_does_not_dilute_the_share() {
        let mut a = Aimd::new(AimdConfig::new(100.0, 10));
        let mut t = Instant::now();
        a.on_send(t);
        a.on_success(t);
        t += Duration::from_secs(10);
        t = busy(&mut a, t, 40, Duration::from_millis(25));
        a.on_throttle(t, Some(Duration::from_secs(1)), 0.0);
        assert!(a.rate() > 34.0 && a.rate() < 40.0, "{}", a.rate());
    }

    #[test]
    fn aimd_never_goes_below_the_floor() {
        let mut a = Aimd::new(AimdConfig::new(10.0, 1));
        let mut t = Instant::now();
        for _ in 0..100 {
            a.on_throttle(t, Some(Duration::ZERO), 1.0);
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
