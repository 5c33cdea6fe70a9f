//! One quota for the tenant, shared through Redis (CONTRACT §11, issue 18), and the two
//! stages across a kill -9: real Redis, real broker, worker processes, the simulator.
//! These checks are loose on purpose; the figures belong to `make bench`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use cxone_offboard::cxone::Priority;
use cxone_offboard::cxone::quota::Quota;
use cxone_offboard::metrics::Metrics;
use cxone_offboard::sim::{SimOptions, SimServer, spawn};
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::helpers::{BROKER, Names, OutcomeTap, Outside, eventually, until};
use crate::process::{WorkerProcess, sim_user};
use crate::redis_server::{RedisServer, shared_url};

const SKILLS: &str = "GET /inContactAPI/services/{version}/agents/{agentId}/skills";

fn quota_settings(names: &Names, rps: u32, burst: u32) -> cxone_offboard::config::Settings {
    let key = format!("it-quota:{}", names.prefix);
    names.settings(&[
        ("OFFBOARD__CXONE__ISSUER", "http://127.0.0.1:9"),
        ("OFFBOARD__CXONE__ACCESS_KEY_ID", "k"),
        ("OFFBOARD__CXONE__ACCESS_KEY_SECRET", "s"),
        (
            "OFFBOARD__CXONE__RATE_LIMIT__REQUESTS_PER_SECOND",
            &rps.to_string(),
        ),
        ("OFFBOARD__CXONE__RATE_LIMIT__BURST", &burst.to_string()),
        ("OFFBOARD__CXONE__RATE_LIMIT__REDIS_KEY", &key),
    ])
}

/// Callers that take tokens of one class as fast as they come, counting them.
struct Load {
    taken: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Load {
    fn start(quota: &Quota, class: Priority, callers: usize) -> Self {
        let taken = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        for _ in 0..callers {
            let (q, taken, stop) = (quota.clone(), taken.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    q.acquire(class).await;
                    taken.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        Self { taken, stop }
    }
    fn taken(&self) -> u64 {
        self.taken.load(Ordering::SeqCst)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

async fn shared(quota: &Quota, replicas: usize) {
    eventually("the shared bucket", Duration::from_secs(10), || async {
        (quota.is_shared() && quota.replicas() >= replicas).then_some(())
    })
    .await;
}

#[tokio::test]
async fn two_replicas_share_one_bucket_and_revocation_goes_first() {
    let names = Names::new();
    let settings = quota_settings(&names, 50, 5);
    let url = SecretString::from(shared_url());
    let a = Quota::new(&settings.cxone, Some(&url), Metrics::new()).expect("quota a");
    let b = Quota::new(&settings.cxone, Some(&url), Metrics::new()).expect("quota b");
    shared(&a, 2).await;
    shared(&b, 2).await;

    // Replica A has only housekeeping to do, replica B only revocations.
    let housekeeping = Load::start(&a, Priority::Housekeeping, 20);
    let revoke = Load::start(&b, Priority::Revoke, 20);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (h0, r0, t0) = (
        housekeeping.taken(),
        revoke.taken(),
        std::time::Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (h1, r1, secs) = (
        housekeeping.taken(),
        revoke.taken(),
        t0.elapsed().as_secs_f64(),
    );
    let (h, r) = (h1 - h0, r1 - r0);
    let rate = (h + r) as f64 / secs;
    println!("two replicas: {rate:.1}/s, {r} revoke, {h} housekeeping");
    assert!(
        rate <= 50.0 * 1.15,
        "both replicas together stay near the tenant rate: {rate:.1}/s ({r} revoke, {h} housekeeping)"
    );
    assert!(
        rate >= 50.0 * 0.6,
        "and use it: {rate:.1}/s ({r} revoke, {h} housekeeping)"
    );
    assert!(
        h * 10 <= h + r,
        "housekeeping on A waits while B has revocations: {h} housekeeping vs {r} revoke"
    );

    // B's revocations are done: A's housekeeping gets the quota.
    drop(revoke);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (h2, t2) = (housekeeping.taken(), std::time::Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let alone = (housekeeping.taken() - h2) as f64 / t2.elapsed().as_secs_f64();
    assert!(
        alone >= 50.0 * 0.6,
        "housekeeping takes the whole quota once revocations are done: {alone:.1}/s"
    );
}

#[tokio::test]
async fn a_429_on_one_replica_pauses_every_replica() {
    let names = Names::new();
    let settings = quota_settings(&names, 100, 10);
    let url = SecretString::from(shared_url());
    let a = Quota::new(&settings.cxone, Some(&url), Metrics::new()).expect("quota a");
    let b = Quota::new(&settings.cxone, Some(&url), Metrics::new()).expect("quota b");
    shared(&a, 2).await;
    shared(&b, 2).await;
    a.acquire(Priority::Revoke).await;
    a.on_throttle(Some(Duration::from_secs(2)));
    // The pause reaches Redis in one round trip; B's next token waits for it to end.
    eventually("the pause in Redis", Duration::from_secs(5), || async {
        let client = redis::Client::open(shared_url()).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        let key = format!("{{it-quota:{}}}:pause", names.prefix);
        let v: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .ok()?;
        v.map(|_| ())
    })
    .await;
    let started = std::time::Instant::now();
    b.acquire(Priority::Revoke).await;
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "B waited for A's Retry-After: {:?}",
        started.elapsed()
    );
    assert!(b.current_rate() < 100.0, "the shared rate was cut");
}

#[tokio::test]
async fn without_redis_a_replica_paces_itself_and_returns_when_redis_does() {
    let names = Names::new();
    let mut redis = RedisServer::start().await;
    let settings = quota_settings(&names, 100, 10);
    let url = SecretString::from(redis.url());
    let metrics = Metrics::new();
    let quota = Quota::new(&settings.cxone, Some(&url), metrics.clone()).expect("quota");
    shared(&quota, 1).await;
    assert!(metrics.render().contains("offboard_quota_shared 1"));
    let load = Load::start(&quota, Priority::Revoke, 8);

    redis.kill9();
    eventually(
        "the fall-back to the local limiter",
        Duration::from_secs(3),
        || async { (!quota.is_shared()).then_some(()) },
    )
    .await;
    assert!(metrics.render().contains("offboard_quota_shared 0"));
    let before = load.taken();
    eventually("tokens without Redis", Duration::from_secs(5), || async {
        (load.taken() > before + 20).then_some(())
    })
    .await;

    redis.restart().await;
    eventually(
        "the shared bucket again",
        Duration::from_secs(5),
        || async { quota.is_shared().then_some(()) },
    )
    .await;
    assert!(metrics.render().contains("offboard_quota_shared 1"));
    assert!(
        metrics
            .render()
            .contains("offboard_quota_fallbacks_total 1")
    );
    let before = load.taken();
    eventually(
        "tokens from Redis again",
        Duration::from_secs(5),
        || async { (load.taken() > before + 20).then_some(()) },
    )
    .await;
}

async fn metric(w: &WorkerProcess, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("{}/metrics", w.http))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

async fn sim(users: u64, rate: Option<f64>) -> SimServer {
    spawn(
        SimOptions {
            users,
            interactions_per_user: 3,
            rate_limit: rate,
            burst: 10,
            ..SimOptions::default()
        },
        "127.0.0.1:0".parse().expect("addr"),
    )
    .await
    .expect("sim")
}

fn completed(outcomes: &[Value]) -> Vec<&Value> {
    let mut seen = BTreeSet::new();
    outcomes
        .iter()
        .filter(|o| o["type"] == "offboard.saga.completed")
        .filter(|o| seen.insert(o["data"]["saga_id"].to_string()))
        .collect()
}

async fn assert_each_user_written_once(sim: &SimServer, n: usize) {
    for i in 1..=n {
        let u = sim_user(sim, &format!("E{i:06}")).await;
        assert_eq!(u["status"], "DELETED", "{u}");
        for (route, count) in u["writes"].as_object().expect("writes") {
            assert_eq!(
                count.as_u64(),
                Some(1),
                "E{i:06}: {route} written {count} times"
            );
        }
    }
}

#[tokio::test]
async fn a_saga_crosses_the_hand_over_after_a_kill_9() {
    let _shared = BROKER.read().await;
    let names = Names::new();
    names.create_bucket().await;
    let sim = sim(3, None).await;
    // Housekeeping's first call hangs: the saga is handed over and housekeeping has begun
    // when the worker dies.
    reqwest::Client::new()
        .post(format!("{}/_sim/faults", sim.base_url()))
        .json(&json!({"latency_ms": 60_000, "routes": [SKILLS]}))
        .send()
        .await
        .expect("faults");
    let first = WorkerProcess::start(&names, &sim, &[]);
    first.wait_ready().await;
    let tap = OutcomeTap::new(&names.outcomes()).await;
    crate::helpers::publish_leavers(&names, 3).await;
    eventually("housekeeping to begin", Duration::from_secs(30), || async {
        let stats: Value = reqwest::get(format!("{}/_sim/stats", sim.base_url()))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (stats["in_flight"][SKILLS].as_u64().unwrap_or(0) >= 3).then_some(())
    })
    .await;
    let outside = Outside::new().await;
    assert_eq!(
        outside.queue_len(&names.requests()).await,
        0,
        "access removal acked"
    );
    for i in 1..=3 {
        let u = sim_user(&sim, &format!("E{i:06}")).await;
        assert_eq!(u["agent_active"], false, "locked out before the kill: {u}");
    }
    first.kill9();

    crate::process::set_faults(&sim, json!({})).await;
    let second = WorkerProcess::start(&names, &sim, &[]);
    second.wait_ready().await;
    let outcomes = until(
        Duration::from_secs(60),
        || async { tap.all().await },
        |o| completed(o).len() == 3,
    )
    .await;
    let done = completed(&outcomes);
    assert_eq!(
        done.len(),
        3,
        "every saga completes after the kill: {outcomes:?}"
    );
    for o in &done {
        assert!(o["data"]["verified_at"].is_string(), "{o}");
        let steps: Vec<&str> = o["data"]["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .filter_map(|s| s["name"].as_str())
            .collect();
        assert_eq!(
            steps,
            [
                "resolve",
                "block_login",
                "logout",
                "revoke_keys",
                "unassign_skills",
                "archive",
                "delete",
                "manifest",
                "notify",
                "outcome"
            ]
        );
    }
    assert_each_user_written_once(&sim, 3).await;
    for q in [names.requests(), names.housekeeping(), names.dead()] {
        assert_eq!(outside.queue_len(&q).await, 0, "{q} is empty");
    }
    second.kill9();
    sim.shutdown().await;
    names.cleanup().await;
}

fn redis_env(url: &str, key: &str, rps: u32) -> Vec<(&'static str, String)> {
    vec![
        ("OFFBOARD__CXONE__RATE_LIMIT__REDIS_URL", url.to_owned()),
        ("OFFBOARD__CXONE__RATE_LIMIT__REDIS_KEY", key.to_owned()),
        (
            "OFFBOARD__CXONE__RATE_LIMIT__REQUESTS_PER_SECOND",
            rps.to_string(),
        ),
        ("OFFBOARD__CXONE__RATE_LIMIT__BURST", "10".to_owned()),
        (
            "OFFBOARD__GUARD__MAX_DESTRUCTIVE_PER_WINDOW",
            "100000".to_owned(),
        ),
    ]
}

fn start(names: &Names, sim: &SimServer, env: &[(&'static str, String)]) -> WorkerProcess {
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    WorkerProcess::start(names, sim, &pairs)
}

#[tokio::test]
async fn two_workers_on_one_redis_bucket_stay_under_the_rate_with_revocations_first() {
    let _shared = BROKER.read().await;
    let names = Names::new();
    names.create_bucket().await;
    let n = 100;
    let rate = 60.0;
    let sim = sim(n as u64, Some(rate)).await;
    let env = redis_env(&shared_url(), &format!("it-quota:{}", names.prefix), 60);
    let workers = [start(&names, &sim, &env), start(&names, &sim, &env)];
    for w in &workers {
        w.wait_ready().await;
    }
    let tap = OutcomeTap::new(&names.outcomes()).await;
    for w in &workers {
        eventually(
            "both replicas on the shared bucket",
            Duration::from_secs(10),
            || async {
                (metric(w, "offboard_quota_shared").await == Some(1.0)
                    && metric(w, "offboard_quota_replicas").await == Some(2.0))
                .then_some(())
            },
        )
        .await;
    }
    crate::helpers::publish_leavers(&names, n).await;
    let outcomes = until(
        Duration::from_secs(120),
        || async { tap.all().await },
        |o| completed(o).len() == n,
    )
    .await;
    let done = completed(&outcomes);
    assert_eq!(done.len(), n, "every saga completes");

    let stats: Value = reqwest::get(format!("{}/_sim/stats", sim.base_url()))
        .await
        .expect("stats")
        .json()
        .await
        .expect("json");
    let (total, throttled) = (
        stats["total"].as_u64().unwrap_or(0),
        stats["throttled"].as_u64().unwrap_or(0),
    );
    assert!(
        throttled * 50 <= total,
        "the two replicas stay under the tenant's rate: {throttled} of {total} throttled"
    );
    // Revocations first: while leavers still had access, housekeeping barely ran. Count the
    // sagas whose deletion finished before the last leaver was locked out.
    let time = |v: &Value| {
        v.as_str()
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .expect("a timestamp")
    };
    let last_revoked = done
        .iter()
        .map(|o| time(&o["data"]["revoked_at"]))
        .max()
        .expect("revocations");
    let deleted_early = done
        .iter()
        .filter(|o| {
            o["data"]["steps"]
                .as_array()
                .expect("steps")
                .iter()
                .find(|s| s["name"] == "delete")
                .is_some_and(|s| time(&s["finished_at"]) < last_revoked)
        })
        .count();
    println!("two workers: {throttled} of {total} throttled, {deleted_early} of {n} deleted early");
    assert!(
        deleted_early * 5 <= n,
        "{deleted_early} of {n} sagas reached deletion before the last leaver was locked out"
    );
    assert_each_user_written_once(&sim, n).await;
    drop(workers);
    sim.shutdown().await;
    names.cleanup().await;
}

#[tokio::test]
async fn redis_killed_mid_run_the_work_goes_on() {
    let _shared = BROKER.read().await;
    let names = Names::new();
    names.create_bucket().await;
    let n = 60;
    let sim = sim(n as u64, Some(80.0)).await;
    let mut redis = RedisServer::start().await;
    let env = redis_env(&redis.url(), "it-quota", 80);
    let worker = start(&names, &sim, &env);
    worker.wait_ready().await;
    let tap = OutcomeTap::new(&names.outcomes()).await;
    eventually("the shared bucket", Duration::from_secs(10), || async {
        (metric(&worker, "offboard_quota_shared").await == Some(1.0)).then_some(())
    })
    .await;
    crate::helpers::publish_leavers(&names, n).await;
    until(
        Duration::from_secs(60),
        || async { tap.all().await.len() },
        |c| *c >= 5,
    )
    .await;
    redis.kill9();
    eventually("the fall-back", Duration::from_secs(5), || async {
        (metric(&worker, "offboard_quota_shared").await == Some(0.0)).then_some(())
    })
    .await;
    let ready = reqwest::get(format!("{}/readyz", worker.http))
        .await
        .expect("readyz")
        .status()
        .as_u16();
    assert_eq!(ready, 200, "readiness does not depend on Redis");
    let outcomes = until(
        Duration::from_secs(120),
        || async { tap.all().await },
        |o| completed(o).len() == n,
    )
    .await;
    assert_eq!(
        completed(&outcomes).len(),
        n,
        "the work went on without Redis"
    );
    redis.restart().await;
    eventually(
        "the shared bucket again",
        Duration::from_secs(10),
        || async { (metric(&worker, "offboard_quota_shared").await == Some(1.0)).then_some(()) },
    )
    .await;
    assert_each_user_written_once(&sim, n).await;
    drop(worker);
    sim.shutdown().await;
    names.cleanup().await;
}
