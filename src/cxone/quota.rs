//! The tenant's CXone quota as this process sees it (CONTRACT §11).
//!
//! Without `cxone.rate_limit.redis_url` this is the process's own adaptive [`Limiter`].
//! With it, every replica takes its tokens from one bucket in Redis (`quota.lua`, run
//! atomically): `requests_per_second` is the tenant-wide rate, a replica leases a few tokens
//! per round trip (only as many as it has callers waiting, so nothing is hoarded), revocation
//! demand from any replica keeps every replica's housekeeping below a reserve, and a 429
//! pauses all replicas and lowers the shared rate. When Redis errors or answers slower than
//! `redis_timeout_ms`, waiting callers move to the local limiter at once — running at the
//! tenant rate divided by the replicas last seen — and a probe returns them to the shared
//! bucket within a second of Redis answering again.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;

use super::limiter::{AimdConfig, Limiter, Priority};
use crate::config::CxoneSettings;
use crate::metrics::Metrics;

/// How often a replica reports itself and, while Redis is away, tries it again.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The share of a second's tokens one round trip may lease.
const LEASE_SHARE: f64 = 0.02;

/// The Lua script that keeps the bucket.
const SCRIPT: &str = include_str!("quota.lua");

/// Where this process takes permission to call CXone.
#[derive(Clone)]
pub struct Quota {
    local: Limiter,
    shared: Option<Arc<Shared>>,
}

impl std::fmt::Debug for Quota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quota")
            .field("shared", &self.is_shared())
            .field("rate", &self.current_rate())
            .finish()
    }
}

enum Grant {
    /// A token from the shared bucket: send.
    Token,
    /// Redis went away while waiting: ask the local limiter.
    Local,
}

#[derive(Default)]
struct Waiters {
    revoke: VecDeque<oneshot::Sender<Grant>>,
    housekeeping: VecDeque<oneshot::Sender<Grant>>,
}

impl Waiters {
    fn pop(&mut self) -> Option<oneshot::Sender<Grant>> {
        self.revoke
            .pop_front()
            .or_else(|| self.housekeeping.pop_front())
    }
}

struct Shared {
    client: redis::Client,
    conn: Mutex<Option<MultiplexedConnection>>,
    script: redis::Script,
    keys: Keys,
    replica: String,
    timeout: Duration,
    rate: f64,
    burst: u32,
    /// Tokens one round trip may lease.
    batch: u32,
    /// Tokens housekeeping leaves in the bucket while revocation waits anywhere.
    reserve: u32,
    up: AtomicBool,
    /// Set once the first attempt to reach Redis is over (either way).
    tried: watch::Sender<bool>,
    waiters: Mutex<Waiters>,
    wake: Notify,
    /// When the pause after the last 429 (any replica's) ends.
    pause_until: Mutex<Option<Instant>>,
    /// The shared rate after 429 cuts, in milli-requests per second.
    rate_milli: AtomicU64,
    /// Replicas that reported themselves in the last five seconds.
    replicas: AtomicUsize,
    default_retry_after: Duration,
    max_retry_after: Duration,
    local: Limiter,
    metrics: Metrics,
}

struct Keys {
    bucket: String,
    pause: String,
    demand: String,
    replicas: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        // One hash tag: on a Redis Cluster every key of the script lives in one slot.
        let tag = format!("{{{prefix}}}");
        Self {
            bucket: format!("{tag}:bucket"),
            pause: format!("{tag}:pause"),
            demand: format!("{tag}:revoke-demand"),
            replicas: format!("{tag}:replicas"),
        }
    }
}

/// The bucket's key prefix for a tenant: its API host and access key id, hashed (the id is
/// not a secret, but it need not sit in Redis either).
pub fn tenant_key(settings: &CxoneSettings) -> String {
    if let Some(key) = &settings.rate_limit.redis_key {
        return key.clone();
    }
    let base = settings.api_base_url.as_deref().unwrap_or(&settings.issuer);
    let id = settings.access_key_id.as_deref().unwrap_or_default();
    let digest = Sha256::digest(format!("{base}\n{id}").as_bytes());
    format!("cxone-offboard:quota:{}", &hex::encode(digest)[..16])
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What Redis said, as one line without the URL (it may carry a password).
fn describe(e: &redis::RedisError) -> String {
    let kind = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connection_refusal() {
        "connection refused".to_owned()
    } else if e.is_io_error() || e.is_connection_dropped() {
        "connection lost".to_owned()
    } else {
        e.category().to_owned()
    };
    match e.detail() {
        Some(d) => format!("{kind}: {}", d.lines().next().unwrap_or_default()),
        None => kind,
    }
}

impl Quota {
    /// The process's quota: local only, or shared through Redis when `redis_url` is set.
    /// Must run inside tokio (it starts the dispatcher and the probe).
    pub fn new(
        settings: &CxoneSettings,
        url: Option<&SecretString>,
        metrics: Metrics,
    ) -> anyhow::Result<Self> {
        let rl = &settings.rate_limit;
        let mut cfg = AimdConfig::new(rl.requests_per_second, rl.burst);
        cfg.max_retry_after = Duration::from_secs(rl.max_retry_after_secs);
        let local = Limiter::new(cfg);
        metrics.quota_shared(false);
        let Some(url) = url else {
            return Ok(Self {
                local,
                shared: None,
            });
        };
        let client = redis::Client::open(url.expose_secret()).map_err(|_| {
            anyhow::anyhow!("cxone.rate_limit.redis_url is not a Redis URL (value not shown)")
        })?;
        let rate = rl.requests_per_second;
        let burst = rl.burst.max(1);
        let batch = ((rate * LEASE_SHARE).ceil() as u32).clamp(1, burst);
        let replica = format!(
            "{}-{}-{:08x}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".to_owned()),
            std::process::id(),
            rand::random::<u32>()
        );
        let shared = Arc::new(Shared {
            client,
            conn: Mutex::new(None),
            script: redis::Script::new(SCRIPT),
            keys: Keys::new(&tenant_key(settings)),
            replica,
            timeout: Duration::from_millis(rl.redis_timeout_ms),
            rate,
            burst,
            batch,
            reserve: batch,
            up: AtomicBool::new(false),
            tried: watch::channel(false).0,
            waiters: Mutex::new(Waiters::default()),
            wake: Notify::new(),
            pause_until: Mutex::new(None),
            rate_milli: AtomicU64::new((rate * 1000.0) as u64),
            replicas: AtomicUsize::new(1),
            default_retry_after: cfg.default_retry_after,
            max_retry_after: cfg.max_retry_after,
            local: local.clone(),
            metrics,
        });
        tokio::spawn(probe(Arc::downgrade(&shared)));
        tokio::spawn(dispatch(Arc::downgrade(&shared)));
        Ok(Self {
            local,
            shared: Some(shared),
        })
    }

    /// Waits for permission to send one request.
    pub async fn acquire(&self, priority: Priority) {
        if let Some(shared) = &self.shared {
            // The first second of a process: wait for Redis's first answer rather than send
            // at the whole tenant's rate on our own.
            let mut tried = shared.tried.subscribe();
            let _ = tried.wait_for(|t| *t).await;
            if shared.up.load(Ordering::SeqCst) {
                let (tx, rx) = oneshot::channel();
                {
                    let mut w = lock(&shared.waiters);
                    match priority {
                        Priority::Revoke => w.revoke.push_back(tx),
                        Priority::Housekeeping => w.housekeeping.push_back(tx),
                    }
                }
                shared.wake.notify_one();
                if let Ok(Grant::Token) = rx.await {
                    return;
                }
            }
        }
        self.local.acquire(priority).await;
    }

    /// `true` while tokens come from the shared bucket.
    pub fn is_shared(&self) -> bool {
        self.shared
            .as_ref()
            .is_some_and(|s| s.up.load(Ordering::SeqCst))
    }

    /// Replicas seen sharing the bucket in the last five seconds (1 without Redis).
    pub fn replicas(&self) -> usize {
        self.shared
            .as_ref()
            .map_or(1, |s| s.replicas.load(Ordering::Relaxed))
    }

    pub fn on_success(&self) {
        if !self.is_shared() {
            self.local.on_success();
        }
    }

    /// A 429: with the shared bucket, every replica pauses until `Retry-After` and the shared
    /// rate drops; otherwise the local controller pauses and cuts.
    pub fn on_throttle(&self, retry_after: Option<Duration>) {
        match &self.shared {
            Some(shared) if shared.up.load(Ordering::SeqCst) => {
                let wait = retry_after
                    .unwrap_or(shared.default_retry_after)
                    .min(shared.max_retry_after);
                shared.paused(Instant::now() + wait);
                let shared = Arc::clone(shared);
                tokio::spawn(async move {
                    if let Err(e) = shared.pause(wait).await {
                        shared.fail_over(&e);
                    }
                });
            }
            _ => self.local.on_throttle(retry_after),
        }
    }

    /// When the pause after the last 429 ends, if one is on.
    pub fn paused_until(&self) -> Option<Instant> {
        match &self.shared {
            Some(shared) if shared.up.load(Ordering::SeqCst) => {
                lock(&shared.pause_until).filter(|t| *t > Instant::now())
            }
            _ => self.local.paused_until(),
        }
    }

    /// Requests per second allowed now: the tenant-wide rate of the shared bucket, or the
    /// local limiter's.
    pub fn current_rate(&self) -> f64 {
        match &self.shared {
            Some(shared) if shared.up.load(Ordering::SeqCst) => {
                shared.rate_milli.load(Ordering::Relaxed) as f64 / 1000.0
            }
            _ => self.local.current_rate(),
        }
    }

    /// Callers waiting now, by class.
    pub fn waiting(&self) -> (usize, usize) {
        let (mut r, mut h) = self.local.waiting();
        if let Some(shared) = &self.shared {
            let w = lock(&shared.waiters);
            r += w.revoke.len();
            h += w.housekeeping.len();
        }
        (r, h)
    }
}

/// What one script call answered.
struct Answer {
    granted: u32,
    wait: Duration,
    paused: bool,
}

impl Shared {
    fn connection(&self) -> Option<MultiplexedConnection> {
        lock(&self.conn).clone()
    }

    async fn connect(&self) -> redis::RedisResult<MultiplexedConnection> {
        if let Some(c) = self.connection() {
            return Ok(c);
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let c = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        *lock(&self.conn) = Some(c.clone());
        Ok(c)
    }

    async fn run(&self, invocation: redis::ScriptInvocation<'_>) -> redis::RedisResult<Answer> {
        let Some(mut conn) = self.connection() else {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "not connected",
            )));
        };
        let answer = tokio::time::timeout(
            self.timeout,
            invocation.invoke_async::<(u64, u64, u64, u64)>(&mut conn),
        )
        .await
        .map_err(|_| {
            redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer in time",
            ))
        })??;
        let (granted, wait_ms, paused, rate_milli) = answer;
        if rate_milli > 0 {
            self.rate_milli.store(rate_milli, Ordering::Relaxed);
            self.metrics.cxone_rate(rate_milli as f64 / 1000.0);
        }
        let wait = Duration::from_millis(wait_ms);
        if paused == 1 {
            self.paused(Instant::now() + wait);
        }
        Ok(Answer {
            granted: u32::try_from(granted).unwrap_or(u32::MAX),
            wait,
            paused: paused == 1,
        })
    }

    fn invocation(&self) -> redis::ScriptInvocation<'_> {
        let mut inv = self.script.prepare_invoke();
        inv.key(&self.keys.bucket)
            .key(&self.keys.pause)
            .key(&self.keys.demand)
            .key(&self.keys.replicas);
        inv
    }

    async fn take(&self, class: Priority, want: u32) -> redis::RedisResult<Answer> {
        let mut inv = self.invocation();
        inv.arg("take")
            .arg(self.rate)
            .arg(self.burst)
            .arg(want)
            .arg(match class {
                Priority::Revoke => "revoke",
                Priority::Housekeeping => "housekeeping",
            })
            .arg(self.reserve);
        self.run(inv).await
    }

    async fn pause(&self, wait: Duration) -> redis::RedisResult<Answer> {
        let mut inv = self.invocation();
        inv.arg("pause")
            .arg(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX))
            .arg(self.rate);
        self.run(inv).await
    }

    async fn beat(&self) -> redis::RedisResult<usize> {
        self.connect().await?;
        let mut inv = self.invocation();
        inv.arg("beat").arg(&self.replica);
        let answer = self.run(inv).await?;
        Ok((answer.granted as usize).max(1))
    }

    fn paused(&self, until: Instant) {
        let mut p = lock(&self.pause_until);
        *p = Some(p.map_or(until, |old| old.max(until)));
    }

    /// Redis failed: every waiter and every new caller goes to the local limiter, which
    /// starts afresh at this replica's share of the tenant rate.
    fn fail_over(&self, e: &redis::RedisError) {
        *lock(&self.conn) = None;
        if self.up.swap(false, Ordering::SeqCst) {
            let replicas = self.replicas.load(Ordering::Relaxed).max(1);
            let share = self.rate / replicas as f64;
            let burst = (self.burst / replicas as u32).max(1);
            self.local.reset(share, burst);
            self.metrics.quota_shared(false);
            self.metrics.quota_fallback();
            self.metrics.cxone_rate(share);
            tracing::warn!(
                error = %describe(e),
                replicas,
                local_rate = share,
                "shared CXone quota unavailable (Redis): pacing on this replica's own limiter \
                 at its share of the tenant rate until Redis answers again"
            );
        }
        let mut w = lock(&self.waiters);
        while let Some(waiter) = w.pop() {
            let _ = waiter.send(Grant::Local);
        }
    }

    fn back(&self, replicas: usize) {
        self.replicas.store(replicas, Ordering::Relaxed);
        self.metrics.quota_replicas(replicas);
        if !self.up.swap(true, Ordering::SeqCst) {
            self.metrics.quota_shared(true);
            tracing::info!(
                replicas,
                rate = self.rate,
                "using the shared CXone quota in Redis (tenant-wide rate)"
            );
        }
    }

    /// Hands `n` tokens to the callers waiting longest, revocation first. A caller that gave
    /// up does not use one.
    fn hand_out(&self, mut n: u32) {
        let mut w = lock(&self.waiters);
        while n > 0 {
            let Some(waiter) = w.pop() else { break };
            if waiter.send(Grant::Token).is_ok() {
                n -= 1;
            }
        }
    }
}

/// Leases tokens for the callers waiting in this process, revocation first.
async fn dispatch(shared: Weak<Shared>) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        let next = {
            let w = lock(&s.waiters);
            if !w.revoke.is_empty() {
                Some((Priority::Revoke, w.revoke.len()))
            } else if !w.housekeeping.is_empty() {
                Some((Priority::Housekeeping, w.housekeeping.len()))
            } else {
                None
            }
        };
        let Some((class, waiting)) = next else {
            // Re-check now and then so the task notices when every handle is gone.
            let _ = tokio::time::timeout(PROBE_EVERY, s.wake.notified()).await;
            continue;
        };
        if !s.up.load(Ordering::SeqCst) {
            s.fail_over(&redis::RedisError::from((
                redis::ErrorKind::Io,
                "not connected",
            )));
            continue;
        }
        let pause = lock(&s.pause_until).filter(|t| *t > Instant::now());
        if let Some(until) = pause {
            drop(s);
            tokio::time::sleep_until(until).await;
            continue;
        }
        let want = u32::try_from(waiting).unwrap_or(u32::MAX).min(s.batch);
        match s.take(class, want).await {
            Ok(answer) if answer.granted > 0 => s.hand_out(answer.granted),
            Ok(answer) => {
                let wait = answer.wait.clamp(Duration::from_millis(1), PROBE_EVERY);
                if answer.paused || class == Priority::Revoke {
                    drop(s);
                    tokio::time::sleep(wait).await;
                } else {
                    // Housekeeping waits for revocation elsewhere; a revocation call of our
                    // own arriving meanwhile is asked for at once.
                    let _ = tokio::time::timeout(wait, s.wake.notified()).await;
                }
            }
            Err(e) => s.fail_over(&e),
        }
    }
}

/// Reports this replica every second and, while Redis is away, tries it again.
async fn probe(shared: Weak<Shared>) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        match s.beat().await {
            Ok(replicas) => s.back(replicas),
            Err(e) => {
                // Never reached yet: say so once, as the fail-over would.
                if !*s.tried.borrow() {
                    tracing::warn!(
                        error = %describe(&e),
                        "shared CXone quota unavailable (Redis) at start: pacing on this \
                         replica's own limiter until Redis answers"
                    );
                    s.metrics.quota_shared(false);
                }
                s.fail_over(&e);
            }
        }
        s.tried.send_replace(true);
        drop(s);
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// What `check` reports: Redis answers, runs the script, and how many replicas share the
/// bucket now. `Ok(None)` without `redis_url`.
pub async fn check(settings: &CxoneSettings) -> Result<Option<String>, String> {
    let Some(url) = settings.rate_limit.redis_url().map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let client = redis::Client::open(url.expose_secret())
        .map_err(|_| "cxone.rate_limit.redis_url is not a Redis URL".to_owned())?;
    let timeout = Duration::from_millis(settings.rate_limit.redis_timeout_ms.max(1000));
    let keys = Keys::new(&tenant_key(settings));
    let work = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::Script::new(SCRIPT)
            .prepare_invoke()
            .load_async(&mut conn)
            .await?;
        let now_ms: u64 = redis::cmd("TIME")
            .query_async::<(u64, u64)>(&mut conn)
            .await
            .map(|(s, us)| s * 1000 + us / 1000)?;
        let replicas: u64 = redis::cmd("ZCOUNT")
            .arg(&keys.replicas)
            .arg(now_ms.saturating_sub(5000))
            .arg("+inf")
            .query_async(&mut conn)
            .await?;
        redis::RedisResult::Ok(replicas)
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(replicas)) => Ok(Some(format!(
            "shared bucket {} in Redis; {replicas} replica(s) sharing it now",
            keys.bucket
        ))),
        Ok(Err(e)) => Err(format!("Redis: {}", describe(&e))),
        Err(_) => Err(format!("Redis: no answer within {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag_per_tenant() {
        let k = Keys::new("cxone-offboard:quota:abc");
        for key in [&k.bucket, &k.pause, &k.demand, &k.replicas] {
            assert!(key.starts_with("{cxone-offboard:quota:abc}:"), "{key}");
        }
    }
}
