//! Chaos (issue 11): real worker processes against the real broker, a private S3 server and the
//! CXone simulator, while workers are killed with -9, the broker is restarted and S3 freezes.
//! After each run every event must have exactly one terminal outcome id (re-publications only
//! as byte-identical copies), no message may be lost, dead-lettered or left in a queue, each
//! manifest must exist once, and no simulated user may have seen a destructive write twice.
//!
//! These tests are `#[ignore]`d so `make test` stays fast; `scripts/reliability.sh` runs them
//! (`OFFBOARD_CHAOS_EVENTS` sets the size: 120 in CI, 500 for `make reliability`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cxone_offboard::sim::{SimOptions, SimServer, spawn};
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use rand::Rng;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::helpers::{BROKER, Names, Outside, connect, rabbitmqctl};
use crate::process::{WorkerProcess, free_port, sim_user};
use crate::redis_server::RedisServer;

pub(crate) fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A moto S3 server of this test's own (so freezing it disturbs nobody else).
pub(crate) struct OwnS3 {
    child: Child,
    pub endpoint: String,
}

impl OwnS3 {
    pub(crate) async fn start() -> Self {
        let port = free_port();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto starts (pip install 'moto[server]')");
        // From here on Drop reaps the process, whatever happens.
        let me = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let url = format!("{}/moto-api/", me.endpoint);
        crate::helpers::eventually("moto to answer", Duration::from_secs(30), || async {
            reqwest::get(&url).await.ok().map(|_| ())
        })
        .await;
        me
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status();
    }

    /// Freezes the server (SIGSTOP): connections are accepted by the kernel, never answered.
    pub(crate) fn freeze(&self) {
        self.signal("-STOP");
    }

    pub(crate) fn thaw(&self) {
        self.signal("-CONT");
    }

    /// Creates `names`' bucket on this server.
    pub(crate) async fn create_bucket(&self, names: &Names) {
        let settings = names.settings(&[("OFFBOARD__S3__ENDPOINT", &self.endpoint)]);
        cxone_offboard::store::client(&settings.s3)
            .await
            .create_bucket()
            .bucket(names.bucket())
            .send()
            .await
            .expect("bucket on own S3");
    }
}

impl Drop for OwnS3 {
    fn drop(&mut self) {
        self.thaw();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Brings the broker back even when a test panics between stop and start.
struct BrokerBack;

impl Drop for BrokerBack {
    fn drop(&mut self) {
        rabbitmqctl(&["-q", "start_app"]);
        rabbitmqctl(&["-q", "await_startup"]);
    }
}

async fn restart_broker(down_for: Duration) {
    tokio::task::spawn_blocking(move || {
        let back = BrokerBack;
        assert!(rabbitmqctl(&["-q", "stop_app"]), "rabbitmqctl stop_app");
        std::thread::sleep(down_for);
        drop(back);
    })
    .await
    .expect("join");
}

/// `(name, ready, unacked)` of every queue whose name starts with `prefix`.
pub(crate) fn queues(prefix: &str) -> Vec<(String, u64, u64)> {
    // In a cluster, ask the first node that answers; if none does, the count would be an
    // empty list that hides stuck messages: fail instead.
    let mut stdout = None;
    for node in crate::helpers::rabbitmq_nodes() {
        let mut cmd = Command::new("rabbitmqctl");
        if let Some(n) = &node {
            // The cluster's nodes share the system broker's Erlang cookie.
            cmd.args(["-n", n]).env("HOME", "/var/lib/rabbitmq");
        }
        let out = cmd
            .args([
                "-q",
                "list_queues",
                "--no-table-headers",
                "name",
                "messages_ready",
                "messages_unacknowledged",
            ])
            .output()
            .expect("rabbitmqctl list_queues");
        if out.status.success() {
            stdout = Some(out.stdout);
            break;
        }
    }
    let stdout = stdout.expect("rabbitmqctl list_queues answered on no node");
    String::from_utf8_lossy(&stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let name = f.next()?.trim().to_owned();
            let ready = f.next()?.trim().parse().ok()?;
            let unacked = f.next()?.trim().parse().ok()?;
            name.starts_with(prefix).then_some((name, ready, unacked))
        })
        .collect()
}

/// Deletes every queue and exchange with `names`' prefix.
pub(crate) async fn cleanup(names: &Names) {
    names.cleanup().await;
    let Ok(conn) = connect().await else { return };
    let Ok(ch) = conn.create_channel().await else {
        return;
    };
    for (q, _, _) in queues(&names.prefix) {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    let _ = conn.close(200, "cleanup".into()).await;
}

/// A durable queue bound to the outcomes exchange: survives broker restarts, drained by polling.
pub(crate) struct DurableTap {
    queue: String,
    pub bodies: Vec<Vec<u8>>,
}

impl DurableTap {
    /// Binds after the worker declared the exchange.
    pub(crate) async fn new(names: &Names) -> Self {
        let queue = format!("{}chaos.tap", names.prefix);
        let conn = connect().await.expect("broker");
        let ch = conn.create_channel().await.expect("channel");
        // A quorum queue: in a cluster it survives the loss of any one node.
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            lapin::types::AMQPValue::LongString("quorum".into()),
        );
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .expect("tap queue");
        ch.queue_bind(
            queue.as_str().into(),
            names.outcomes().as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind tap");
        let _ = conn.close(200, "".into()).await;
        Self {
            queue,
            bodies: Vec::new(),
        }
    }

    /// Moves whatever is in the queue now into `bodies`; broker errors are ignored (try later).
    pub(crate) async fn poll(&mut self) {
        let Ok(conn) = connect().await else { return };
        if let Ok(ch) = conn.create_channel().await {
            while let Ok(Some(m)) = ch
                .basic_get(self.queue.as_str().into(), BasicGetOptions::default())
                .await
            {
                if m.delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .is_err()
                {
                    break;
                }
                self.bodies.push(m.delivery.data.clone());
            }
        }
        let _ = conn.close(200, "".into()).await;
    }

    pub(crate) fn outcomes(&self) -> Vec<Value> {
        self.bodies
            .iter()
            .filter_map(|b| serde_json::from_slice(b).ok())
            .collect()
    }

    pub(crate) fn terminal_events(&self) -> BTreeSet<String> {
        self.outcomes()
            .iter()
            .filter(|o| is_terminal(o))
            .filter_map(|o| o["data"]["event_id"].as_str().map(str::to_owned))
            .collect()
    }
}

pub(crate) fn is_terminal(o: &Value) -> bool {
    matches!(
        o["type"].as_str(),
        Some("offboard.saga.completed" | "offboard.saga.failed")
    )
}

/// The figures a scenario reports (and RELIABILITY.md records).
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct Figures {
    pub scenario: String,
    pub events: usize,
    pub outcome_messages: usize,
    pub distinct_outcome_ids: usize,
    pub completed: usize,
    pub failed: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub non_identical_duplicates: usize,
    pub events_with_several_terminal_ids: usize,
    pub dead_lettered: u64,
    pub dead_reasons: BTreeMap<String, usize>,
    pub stuck: u64,
    pub manifests: usize,
    pub manifests_not_once: usize,
    pub repeated_destructive_writes: usize,
    pub users_not_deleted: usize,
    pub cxone_requests: u64,
    pub kills: usize,
    pub kills_mid_run: usize,
    pub broker_restarts: usize,
    pub redis_kills: usize,
    pub s3_outage_secs: u64,
    pub leader_kills: usize,
    pub node_stop_secs: u64,
    /// Worker connections that moved to another node of the cluster (from the workers' logs).
    pub failovers: usize,
    /// Per fault, seconds from the fault until the fleet acked its next delivery.
    pub recovery_secs: Vec<f64>,
    /// Per fault, seconds from the fault to the next outcome on the outcomes exchange (with
    /// revocation first, completions only start once most access is removed).
    pub first_outcome_secs: Vec<f64>,
    pub workers: usize,
    pub seconds: u64,
}

impl Figures {
    /// Prints the figures and appends them to `$OFFBOARD_RELIABILITY_REPORT` (JSON lines).
    pub(crate) fn report(&self) {
        let line = serde_json::to_string(self).expect("json");
        println!("RELIABILITY {line}");
        if let Ok(path) = std::env::var("OFFBOARD_RELIABILITY_REPORT") {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = writeln!(f, "{line}");
            }
        }
    }
}

/// Fills the outcome figures from the tap: per outcome id the bodies must be identical; per
/// event exactly one terminal outcome id.
pub(crate) fn outcome_figures(f: &mut Figures, tap: &DurableTap, events: &BTreeSet<String>) {
    let mut by_id: BTreeMap<String, Vec<&Vec<u8>>> = BTreeMap::new();
    let mut terminal_ids: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for body in &tap.bodies {
        let Ok(o) = serde_json::from_slice::<Value>(body) else {
            continue;
        };
        let id = o["id"].as_str().unwrap_or_default().to_owned();
        by_id.entry(id.clone()).or_default().push(body);
        if is_terminal(&o) {
            let event = o["data"]["event_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            terminal_ids.entry(event).or_default().insert(id);
        }
    }
    f.outcome_messages = tap.bodies.len();
    f.distinct_outcome_ids = by_id.len();
    f.duplicated = tap.bodies.len() - by_id.len();
    f.non_identical_duplicates = by_id
        .values()
        .filter(|bodies| bodies.iter().any(|b| *b != bodies[0]))
        .count();
    // Completed/failed by distinct id, not by message.
    for bodies in by_id.values() {
        if let Ok(o) = serde_json::from_slice::<Value>(bodies[0]) {
            match o["type"].as_str() {
                Some("offboard.saga.completed") => f.completed += 1,
                Some("offboard.saga.failed") => f.failed += 1,
                _ => {}
            }
        }
    }
    f.lost = events
        .iter()
        .filter(|e| !terminal_ids.contains_key(*e))
        .count();
    f.events_with_several_terminal_ids = terminal_ids.values().filter(|s| s.len() > 1).count();
}

/// Why messages were dead-lettered: the worker's error class or the broker's death reason.
pub(crate) async fn dead_reasons(names: &Names) -> BTreeMap<String, usize> {
    use cxone_offboard::broker::headers;
    let mut out = BTreeMap::new();
    let outside = Outside::new().await;
    for m in outside.drain(&names.dead()).await {
        let h = m.delivery.properties.headers().as_ref();
        let reason = headers::get_str(h, headers::ERROR_CLASS)
            .or_else(|| headers::get_str(h, "x-first-death-reason"))
            .unwrap_or_else(|| "unknown".to_owned());
        *out.entry(reason).or_default() += 1;
    }
    out
}

/// Manifests in the bucket, per employee: each must exist exactly once.
pub(crate) async fn manifest_figures(f: &mut Figures, names: &Names, s3: &str, n: usize) {
    let settings = names.settings(&[("OFFBOARD__S3__ENDPOINT", s3)]);
    let client = cxone_offboard::store::client(&settings.s3).await;
    let mut keys = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let resp = client
            .list_objects_v2()
            .bucket(names.bucket())
            .prefix("manifests/")
            .set_continuation_token(token.clone())
            .send()
            .await
            .expect("list manifests");
        keys.extend(
            resp.contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_owned)),
        );
        token = resp.next_continuation_token().map(str::to_owned);
        if token.is_none() {
            break;
        }
    }
    let mut per_user: BTreeMap<String, usize> = BTreeMap::new();
    for k in &keys {
        if let Some(user) = k.split('/').nth(1) {
            *per_user.entry(user.to_owned()).or_default() += 1;
        }
    }
    f.manifests = keys.len();
    f.manifests_not_once = (1..=n)
        .filter(|i| per_user.get(&format!("E{i:06}")).copied().unwrap_or(0) != 1)
        .count();
}

/// Simulator view: every user deleted, no destructive route written more than once.
pub(crate) async fn sim_figures(f: &mut Figures, sim: &SimServer, n: usize) {
    let stats: Value = reqwest::get(format!("{}/_sim/stats", sim.base_url()))
        .await
        .expect("stats")
        .json()
        .await
        .expect("json");
    f.cxone_requests = stats["total"].as_u64().unwrap_or(0);
    for i in 1..=n {
        let u = sim_user(sim, &format!("E{i:06}")).await;
        if u["status"] != "DELETED" {
            f.users_not_deleted += 1;
        }
        if let Some(w) = u["writes"].as_object()
            && w.values().any(|c| c.as_u64().unwrap_or(0) > 1)
        {
            f.repeated_destructive_writes += 1;
            println!("repeated write: E{i:06} {w:?}");
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Kill,
    RestartBroker,
    KillRedis,
    /// kill -9 of the cluster node leading the work queue, restarted 3 s later.
    KillLeader,
    /// One cluster node stopped cleanly for the given time, then started again.
    StopNode(Duration),
}

/// `scripts/cluster.sh ARGS`; its stdout.
fn cluster(args: &[&str]) -> String {
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh"))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/cluster.sh runs");
    assert!(out.status.success(), "scripts/cluster.sh {args:?} failed");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Deliveries acked so far by every worker of the fleet (their `/metrics`).
async fn acked(urls: &[String]) -> u64 {
    let mut sum = 0.0;
    for url in urls {
        if let Ok(r) = reqwest::get(format!("{url}/metrics")).await
            && let Ok(text) = r.text().await
        {
            sum += text
                .lines()
                .filter(|l| l.starts_with("offboard_messages_acked_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
        }
    }
    sum as u64
}

/// Seconds from `since` until the fleet acks another delivery (a hand-over, an outcome, a
/// park): the work going on again after a fault.
async fn progressed(urls: &[String], since: Instant) -> Option<f64> {
    let before = acked(urls).await;
    let deadline = Instant::now() + Duration::from_secs(180);
    while Instant::now() < deadline {
        if acked(urls).await > before {
            return Some(since.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Seconds from `since` until the next outcome (of any kind) arrives after the `before` seen.
async fn recovered(tap: &Mutex<DurableTap>, since: Instant, n: usize) -> Option<f64> {
    let (before, terminal) = {
        let mut t = tap.lock().await;
        t.poll().await;
        (t.bodies.len(), t.terminal_events().len())
    };
    if terminal >= n {
        return None;
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    while Instant::now() < deadline {
        let seen = {
            let mut t = tap.lock().await;
            t.poll().await;
            t.bodies.len()
        };
        if seen > before {
            return Some(since.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

struct Scenario {
    name: &'static str,
    workers: usize,
    kills: usize,
    broker_restarts: usize,
    /// kill -9 of the Redis holding the shared quota, back 2 s later.
    redis_kills: usize,
    s3_outage: Option<Duration>,
    /// Cluster scenarios (`OFFBOARD_TEST_AMQP_URL` = the nodes of `scripts/cluster.sh`):
    /// kill -9 of the work queue's leader, and one node stopped for a while.
    leader_kills: usize,
    node_stop: Option<Duration>,
}

fn worker_env(s3: &str, rps: u64, redis: &str) -> Vec<(&'static str, String)> {
    vec![
        // Every scenario runs on the shared quota (a Redis of the run's own): `rps` is the
        // rate for all workers together.
        ("OFFBOARD__CXONE__RATE_LIMIT__REDIS_URL", redis.to_owned()),
        (
            "OFFBOARD__CXONE__RATE_LIMIT__REQUESTS_PER_SECOND",
            rps.to_string(),
        ),
        ("OFFBOARD__CXONE__RATE_LIMIT__BURST", "5".to_owned()),
        // RabbitMQ 3.x counts a delivery returned by a dead consumer against the quorum queue's
        // delivery limit (default 5), so ten kills would dead-letter messages that were merely
        // prefetched (RELIABILITY.md, finding 1). OFFBOARD_CHAOS_DELIVERY_LIMIT=5 reproduces it.
        (
            "OFFBOARD__AMQP__DELIVERY_LIMIT",
            env_num("OFFBOARD_CHAOS_DELIVERY_LIMIT", 20).to_string(),
        ),
        ("OFFBOARD__S3__ENDPOINT", s3.to_owned()),
        (
            "OFFBOARD__WORKER__RETRY_DELAYS_SECS",
            "1,2,4,8,16,32,64".to_owned(),
        ),
        (
            "OFFBOARD__GUARD__MAX_DESTRUCTIVE_PER_WINDOW",
            "100000".to_owned(),
        ),
        ("OFFBOARD__CXONE__REQUEST_TIMEOUT_SECS", "5".to_owned()),
        ("OFFBOARD__WORKER__SHUTDOWN_GRACE_SECS", "5".to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ]
}

struct Fleet {
    names: Names,
    env: Vec<(&'static str, String)>,
    log: PathBuf,
    workers: Vec<WorkerProcess>,
    spawned: std::sync::atomic::AtomicUsize,
}

impl Fleet {
    fn spawn_one(&self, sim: &SimServer) -> WorkerProcess {
        let mut extra: Vec<(&str, String)> =
            self.env.iter().map(|(k, v)| (*k, v.clone())).collect();
        // In a cluster, each new worker starts on another node (the URL list rotated), so
        // workers run on different nodes as they would behind a load balancer.
        let urls: Vec<String> = crate::helpers::amqp_url()
            .split(',')
            .map(str::to_owned)
            .collect();
        if urls.len() > 1 {
            let k = self
                .spawned
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                % urls.len();
            let mut rotated = urls[k..].to_vec();
            rotated.extend_from_slice(&urls[..k]);
            extra.push(("OFFBOARD__AMQP__URL", rotated.join(",")));
        }
        let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
        WorkerProcess::start_logged(&self.names, sim, &extra, Some(&self.log))
    }
}

async fn ready_within(w: &WorkerProcess, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(r) = reqwest::get(format!("{}/readyz", w.http)).await
            && r.status().as_u16() == 200
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn log_dir() -> PathBuf {
    let dir = std::env::var("OFFBOARD_RELIABILITY_LOGS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir().join("offboard-reliability"));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

async fn run(scenario: Scenario) -> Figures {
    let n = usize::try_from(env_num("OFFBOARD_CHAOS_EVENTS", 120)).unwrap_or(120);
    let started = Instant::now();
    let names = Names::new();
    let s3 = Arc::new(OwnS3::start().await);
    s3.create_bucket(&names).await;
    let sim = spawn(
        SimOptions {
            users: n as u64,
            interactions_per_user: 3,
            ..SimOptions::default()
        },
        "127.0.0.1:0".parse().expect("addr"),
    )
    .await
    .expect("sim");
    // Stretch the run over about OFFBOARD_CHAOS_RUN_SECS so the chaos lands mid-run: a saga
    // makes about 16 CXone requests, and each worker's rate limit is set to match.
    let run_secs = env_num("OFFBOARD_CHAOS_RUN_SECS", 30).max(1);
    let rps = (n as u64 * 16 / run_secs).max(20);
    let latency = env_num("OFFBOARD_CHAOS_LATENCY_MS", 5);
    reqwest::Client::new()
        .post(format!("{}/_sim/faults", sim.base_url()))
        .json(&json!({ "latency_ms": latency }))
        .send()
        .await
        .expect("faults");
    let mut redis = RedisServer::start().await;
    let log = log_dir().join(format!("{}-{}.log", scenario.name, names.prefix));
    let mut fleet = Fleet {
        names: names.clone(),
        env: worker_env(&s3.endpoint, rps, &redis.url()),
        log: log.clone(),
        workers: Vec::new(),
        spawned: std::sync::atomic::AtomicUsize::new(0),
    };
    for _ in 0..scenario.workers {
        let w = fleet.spawn_one(&sim);
        w.wait_ready().await;
        fleet.workers.push(w);
    }
    let tap = Arc::new(Mutex::new(DurableTap::new(&names).await));
    let events = crate::helpers::publish_leavers(&names, n).await;

    let mut f = Figures {
        scenario: scenario.name.to_owned(),
        events: n,
        workers: scenario.workers,
        s3_outage_secs: scenario.s3_outage.map_or(0, |d| d.as_secs()),
        ..Figures::default()
    };

    // The S3 outage runs alongside the kills and restarts.
    let outage = scenario.s3_outage.map(|d| {
        let s3 = s3.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            s3.freeze();
            tokio::time::sleep(d).await;
            s3.thaw();
        })
    });

    let mut actions: Vec<Action> = std::iter::repeat_n(Action::Kill, scenario.kills)
        .chain(std::iter::repeat_n(
            Action::RestartBroker,
            scenario.broker_restarts,
        ))
        .chain(std::iter::repeat_n(Action::KillRedis, scenario.redis_kills))
        .chain(std::iter::repeat_n(
            Action::KillLeader,
            scenario.leader_kills,
        ))
        .chain(scenario.node_stop.map(Action::StopNode))
        .collect();
    {
        let mut rng = rand::rng();
        for i in (1..actions.len()).rev() {
            let j = rng.random_range(0..=i);
            actions.swap(i, j);
        }
    }
    for action in actions {
        let pause = rand::rng().random_range(300..2500u64);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let done = {
            let mut t = tap.lock().await;
            t.poll().await;
            t.terminal_events().len()
        };
        match action {
            Action::Kill => {
                let victim = rand::rng().random_range(0..fleet.workers.len());
                let w = fleet.workers.swap_remove(victim);
                w.kill9();
                f.kills += 1;
                if done < n {
                    f.kills_mid_run += 1;
                }
                let w = fleet.spawn_one(&sim);
                // During the S3 outage a new worker may not get ready at once; do not wait forever.
                let _ = ready_within(&w, Duration::from_secs(15)).await;
                fleet.workers.push(w);
            }
            Action::RestartBroker => {
                restart_broker(Duration::from_secs(2)).await;
                f.broker_restarts += 1;
            }
            Action::KillRedis => {
                redis.kill9();
                tokio::time::sleep(Duration::from_secs(2)).await;
                redis.restart().await;
                f.redis_kills += 1;
            }
            Action::KillLeader => {
                let queue = names.requests();
                let leader = tokio::task::spawn_blocking(move || cluster(&["leader", &queue]))
                    .await
                    .expect("join");
                let at = Instant::now();
                let l = leader.clone();
                tokio::task::spawn_blocking(move || cluster(&["kill", &l]))
                    .await
                    .expect("join");
                println!("killed node c{leader}, the leader of the work queue");
                f.leader_kills += 1;
                let urls: Vec<String> = fleet.workers.iter().map(|w| w.http.clone()).collect();
                if let Some(s) = progressed(&urls, at).await {
                    f.recovery_secs.push((s * 10.0).round() / 10.0);
                }
                if let Some(s) = recovered(&tap, at, n).await {
                    f.first_outcome_secs.push((s * 10.0).round() / 10.0);
                }
                tokio::time::sleep(Duration::from_secs(3)).await;
                tokio::task::spawn_blocking(move || cluster(&["start", &leader]))
                    .await
                    .expect("join");
            }
            Action::StopNode(down_for) => {
                // Not node 1: the first worker's node goes on; the second worker's node stops.
                let at = Instant::now();
                tokio::task::spawn_blocking(|| cluster(&["stop", "2"]))
                    .await
                    .expect("join");
                println!("stopped node c2 for {down_for:?}");
                let urls: Vec<String> = fleet.workers.iter().map(|w| w.http.clone()).collect();
                if let Some(s) = progressed(&urls, at).await {
                    f.recovery_secs.push((s * 10.0).round() / 10.0);
                }
                if let Some(s) = recovered(&tap, at, n).await {
                    f.first_outcome_secs.push((s * 10.0).round() / 10.0);
                }
                tokio::time::sleep(down_for.saturating_sub(at.elapsed())).await;
                tokio::task::spawn_blocking(|| cluster(&["start", "2"]))
                    .await
                    .expect("join");
                f.node_stop_secs = down_for.as_secs();
            }
        }
    }
    if let Some(o) = outage {
        o.await.expect("outage task");
    }

    // Wait for every event to reach a terminal outcome.
    let budget = Duration::from_secs(env_num("OFFBOARD_CHAOS_WAIT_SECS", 300));
    let deadline = Instant::now() + budget;
    loop {
        let done = {
            let mut t = tap.lock().await;
            t.poll().await;
            t.terminal_events()
        };
        let dead: u64 = queues(&names.dead()).iter().map(|(_, r, u)| r + u).sum();
        if events.is_subset(&done)
            || done.len() + usize::try_from(dead).unwrap_or(0) >= n
            || Instant::now() > deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // A re-publication happens before its original is acked, so once nothing is unacked (the
    // loop below) none is still to come.
    // Nothing stuck: with the workers still running nothing may be ready or unacked
    // (rabbitmqctl's quorum-queue counters lag by a few seconds: poll until they settle) ...
    let mut stuck_running = u64::MAX;
    let settle = Instant::now() + Duration::from_secs(15);
    while Instant::now() < settle {
        stuck_running = queues(&names.prefix)
            .iter()
            .filter(|(q, _, _)| *q != names.dead() && !q.ends_with("chaos.tap"))
            .map(|(_, r, u)| r + u)
            .sum();
        if stuck_running == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // ... then stop them and count what the queues hold, exactly (a passive declare): an unacked
    // delivery would be back as ready now.
    for w in fleet.workers.drain(..) {
        w.sigterm();
        let _ = w.wait_exit(Duration::from_secs(15)).await;
    }
    let outside = Outside::new().await;
    let mut stuck_after: u64 = 0;
    for (q, _, _) in queues(&names.prefix) {
        if q == names.dead() || q.ends_with("chaos.tap") {
            continue;
        }
        let n = u64::from(outside.queue_len(&q).await);
        if n > 0 {
            println!("stuck: {q} holds {n}");
        }
        stuck_after += n;
    }
    let dead = u64::from(outside.queue_len(&names.dead()).await);
    drop(outside);
    if stuck_running > 0 {
        println!("while running: {stuck_running} ready or unacked (rabbitmqctl)");
    }
    f.stuck = stuck_running.max(stuck_after);
    f.dead_lettered = dead;
    {
        let mut t = tap.lock().await;
        t.poll().await;
        outcome_figures(&mut f, &t, &events);
    }
    f.dead_reasons = dead_reasons(&names).await;
    manifest_figures(&mut f, &names, &s3.endpoint, n).await;
    sim_figures(&mut f, &sim, n).await;
    f.failovers = std::fs::read_to_string(&log)
        .map(|l| {
            l.matches("connected to another node of the cluster")
                .count()
        })
        .unwrap_or(0);
    f.seconds = started.elapsed().as_secs();
    f.report();
    println!("worker logs: {}", log.display());
    sim.shutdown().await;
    cleanup(&names).await;
    drop(s3);
    f
}

fn assert_clean(f: &Figures) {
    assert_eq!(f.lost, 0, "lost events: {f:?}");
    assert_eq!(f.events_with_several_terminal_ids, 0, "{f:?}");
    assert_eq!(f.non_identical_duplicates, 0, "{f:?}");
    assert_eq!(f.completed, f.events, "every saga completes: {f:?}");
    assert_eq!(f.dead_lettered, 0, "{f:?}");
    assert_eq!(f.stuck, 0, "messages left in queues: {f:?}");
    assert_eq!(f.manifests_not_once, 0, "{f:?}");
    assert_eq!(f.manifests, f.events, "{f:?}");
    assert_eq!(f.repeated_destructive_writes, 0, "{f:?}");
    assert_eq!(f.users_not_deleted, 0, "{f:?}");
}

fn outage() -> Duration {
    Duration::from_secs(env_num("OFFBOARD_CHAOS_S3_OUTAGE_SECS", 60))
}

#[tokio::test]
#[ignore = "chaos: run by scripts/reliability.sh (make reliability, .ci/run)"]
async fn chaos_a_kill_9_ten_times() {
    let _shared = BROKER.read().await;
    let f = run(Scenario {
        name: "a-kill9x10",
        workers: 1,
        kills: 10,
        broker_restarts: 0,
        redis_kills: 0,
        s3_outage: None,
        leader_kills: 0,
        node_stop: None,
    })
    .await;
    assert_clean(&f);
    assert!(f.kills_mid_run >= 5, "kills must land mid-run: {f:?}");
}

#[tokio::test]
#[ignore = "chaos: run by scripts/reliability.sh (make reliability, .ci/run)"]
async fn chaos_b_broker_restarts_three_times() {
    let _exclusive = BROKER.write().await;
    let f = run(Scenario {
        name: "b-broker-restart-x3",
        workers: 1,
        kills: 0,
        broker_restarts: 3,
        redis_kills: 0,
        s3_outage: None,
        leader_kills: 0,
        node_stop: None,
    })
    .await;
    assert_clean(&f);
}

#[tokio::test]
#[ignore = "chaos: run by scripts/reliability.sh (make reliability, .ci/run)"]
async fn chaos_c_s3_outage() {
    let _shared = BROKER.read().await;
    let f = run(Scenario {
        name: "c-s3-outage",
        workers: 1,
        kills: 0,
        broker_restarts: 0,
        redis_kills: 0,
        s3_outage: Some(outage()),
        leader_kills: 0,
        node_stop: None,
    })
    .await;
    assert_clean(&f);
}

#[tokio::test]
#[ignore = "chaos: run by scripts/reliability.sh (make reliability, .ci/run)"]
async fn chaos_d_all_three_with_two_workers() {
    let _exclusive = BROKER.write().await;
    let f = run(Scenario {
        name: "d-all-two-workers",
        workers: 2,
        kills: 10,
        broker_restarts: 3,
        redis_kills: 2,
        s3_outage: Some(outage()),
        leader_kills: 0,
        node_stop: None,
    })
    .await;
    assert_clean(&f);
}

/// The cluster scenarios need the nodes of `scripts/cluster.sh`: run on one broker they would
/// prove nothing, so they fail rather than pass.
fn require_cluster() {
    assert!(
        crate::helpers::amqp_url().contains(','),
        "not a cluster: run through `scripts/reliability.sh cluster` \
         (OFFBOARD_TEST_AMQP_URL=$(scripts/cluster.sh url))"
    );
}

#[tokio::test]
#[ignore = "cluster chaos: run by scripts/reliability.sh on scripts/cluster.sh"]
async fn chaos_cluster_e_leader_killed_three_times() {
    require_cluster();
    let f = run(Scenario {
        name: "e-cluster-leader-kill-x3",
        workers: 2,
        kills: 0,
        broker_restarts: 0,
        redis_kills: 0,
        s3_outage: None,
        leader_kills: usize::try_from(env_num("OFFBOARD_CHAOS_LEADER_KILLS", 3)).unwrap_or(3),
        node_stop: None,
    })
    .await;
    assert_clean(&f);
}

#[tokio::test]
#[ignore = "cluster chaos: run by scripts/reliability.sh on scripts/cluster.sh"]
async fn chaos_cluster_f_one_node_stopped() {
    require_cluster();
    let f = run(Scenario {
        name: "f-cluster-node-stopped",
        workers: 2,
        kills: 0,
        broker_restarts: 0,
        redis_kills: 0,
        s3_outage: None,
        leader_kills: 0,
        node_stop: Some(Duration::from_secs(env_num(
            "OFFBOARD_CHAOS_NODE_STOP_SECS",
            60,
        ))),
    })
    .await;
    assert_clean(&f);
    // The worker that started on the stopped node moved to another one.
    assert!(f.failovers >= 1, "no worker moved to another node: {f:?}");
}

#[tokio::test]
#[ignore = "cluster chaos: run by scripts/reliability.sh on scripts/cluster.sh"]
async fn chaos_cluster_g_leader_redis_and_s3() {
    require_cluster();
    let f = run(Scenario {
        name: "g-cluster-leader-redis-s3",
        workers: 3,
        kills: 0,
        broker_restarts: 0,
        redis_kills: 2,
        s3_outage: Some(Duration::from_secs(30)),
        leader_kills: 1,
        node_stop: None,
    })
    .await;
    assert_clean(&f);
}
