//! Shared test plumbing: unique broker names per test, an in-process worker on port 0, and an
//! outside AMQP client that publishes and inspects queues like an HRIS or an operator would.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cxone_offboard::broker::consumer::{Context, Handler, Message, Settle};
use cxone_offboard::config::Settings;
use cxone_offboard::metrics::Metrics;
use cxone_offboard::worker::{self, Running};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::sync::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;

/// Polls `probe` until it gives `Some`, and returns that; panics naming `what` after `within`.
/// The one way tests wait: for a condition, with a deadline, never a bare sleep.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "gave up after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Like [`eventually`], but gives the last value instead of panicking (for tests that then
/// say what was missing).
pub async fn until<T, F, Fut>(within: Duration, mut probe: F, done: impl Fn(&T) -> bool) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let deadline = Instant::now() + within;
    loop {
        let v = probe().await;
        if done(&v) || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The nodes `rabbitmqctl` should ask (`-n`): `OFFBOARD_TEST_RABBITMQ_NODES` (comma-separated,
/// set for the cluster scenarios), else the machine's own broker.
pub fn rabbitmq_nodes() -> Vec<Option<String>> {
    match std::env::var("OFFBOARD_TEST_RABBITMQ_NODES") {
        Ok(v) if !v.trim().is_empty() => v.split(',').map(|n| Some(n.trim().to_owned())).collect(),
        _ => vec![None],
    }
}

/// Runs `rabbitmqctl` quietly; true when it succeeded.
pub fn rabbitmqctl(args: &[&str]) -> bool {
    std::process::Command::new("rabbitmqctl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Tests that restart the broker take this for writing; every other broker test for reading.
pub static BROKER: RwLock<()> = RwLock::const_new(());

pub fn amqp_url() -> String {
    std::env::var("OFFBOARD_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

pub fn s3_endpoint() -> String {
    std::env::var("OFFBOARD_TEST_S3_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:9000".to_owned())
}

/// Broker names with a random prefix, so tests never see each other's messages.
#[derive(Debug, Clone)]
pub struct Names {
    pub prefix: String,
}

impl Names {
    pub fn new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self {
            prefix: format!("t{}.", &id[..10]),
        }
    }
    pub fn events(&self) -> String {
        format!("{}hr.events", self.prefix)
    }
    pub fn requests(&self) -> String {
        format!("{}offboard.requests", self.prefix)
    }
    pub fn dlx(&self) -> String {
        format!("{}offboard.dlx", self.prefix)
    }
    pub fn dead(&self) -> String {
        format!("{}offboard.dead", self.prefix)
    }
    pub fn outcomes(&self) -> String {
        format!("{}offboard.outcomes", self.prefix)
    }
    pub fn held(&self) -> String {
        format!("{}offboard.held", self.prefix)
    }
    pub fn housekeeping(&self) -> String {
        format!("{}offboard.housekeeping", self.prefix)
    }
    /// The delay queue of a stage (`requests` or `housekeeping`) for `secs`.
    pub fn delay(&self, stage: &str, secs: u64) -> String {
        format!("{}offboard.delay.{stage}.{secs}s", self.prefix)
    }
    /// A bucket of this test's own, so journals and the guard window are never shared.
    pub fn bucket(&self) -> String {
        format!("it-{}", self.prefix.trim_end_matches('.'))
    }

    /// Creates this test's bucket on the local S3 server.
    pub async fn create_bucket(&self) {
        self.create_bucket_for(&self.settings(&[])).await;
    }

    /// Creates this test's bucket on the S3 server `settings` name.
    pub async fn create_bucket_for(&self, settings: &Settings) {
        let client = cxone_offboard::store::client(&settings.s3).await;
        client
            .create_bucket()
            .bucket(self.bucket())
            .send()
            .await
            .expect("test bucket created");
    }

    /// Environment overrides pointing a worker at these names, port 0 for HTTP.
    pub fn env(&self) -> Vec<(String, String)> {
        let p = &self.prefix;
        [
            ("OFFBOARD__AMQP__URL", amqp_url()),
            ("OFFBOARD__AMQP__EVENTS_EXCHANGE", self.events()),
            ("OFFBOARD__AMQP__REQUESTS_QUEUE", self.requests()),
            ("OFFBOARD__AMQP__DEAD_LETTER_EXCHANGE", self.dlx()),
            ("OFFBOARD__AMQP__DEAD_QUEUE", self.dead()),
            ("OFFBOARD__AMQP__OUTCOMES_EXCHANGE", self.outcomes()),
            ("OFFBOARD__AMQP__HELD_QUEUE", self.held()),
            ("OFFBOARD__AMQP__HOUSEKEEPING_QUEUE", self.housekeeping()),
            (
                "OFFBOARD__AMQP__DELAY_QUEUE_PREFIX",
                format!("{p}offboard.delay"),
            ),
            ("OFFBOARD__AMQP__RECONNECT_INITIAL_MS", "100".to_owned()),
            // Few schedule buckets: every delay is a quorum queue, and a single test broker
            // runs hundreds of tests' queues.
            (
                "OFFBOARD__WORKER__SCHEDULE_BUCKETS_SECS",
                "3600,60,10,1".to_owned(),
            ),
            ("OFFBOARD__AMQP__RECONNECT_MAX_MS", "1000".to_owned()),
            ("OFFBOARD__HTTP__LISTEN", "127.0.0.1:0".to_owned()),
            ("OFFBOARD__S3__ENDPOINT", s3_endpoint()),
            ("OFFBOARD__S3__BUCKET", self.bucket()),
            ("OFFBOARD__LOG__FORMAT", "text".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    pub fn settings(&self, extra: &[(&str, &str)]) -> Settings {
        let mut env: HashMap<String, String> = self.env().into_iter().collect();
        for (k, v) in extra {
            env.insert((*k).to_owned(), (*v).to_owned());
        }
        Settings::load_from(None, env).expect("test settings are valid")
    }

    /// Deletes everything these names created (best effort).
    pub async fn cleanup(&self) {
        let Ok(conn) = connect().await else { return };
        let Ok(ch) = conn.create_channel().await else {
            return;
        };
        let mut queues = vec![
            self.requests(),
            self.dead(),
            self.held(),
            self.housekeeping(),
        ];
        let settings = self.settings(&[]);
        queues.extend(
            cxone_offboard::broker::topology::Delays::of(&settings).queue_names(&settings.amqp),
        );
        for stage in ["requests", "housekeeping"] {
            for secs in [
                1, 2, 4, 8, 10, 16, 30, 32, 60, 64, 300, 600, 1800, 3600, 86400,
            ] {
                queues.push(self.delay(stage, secs));
            }
        }
        for q in queues {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for e in [self.events(), self.dlx(), self.outcomes()] {
            let _ = ch
                .exchange_delete(e.as_str().into(), Default::default())
                .await;
        }
        let _ = conn.close(200, "cleanup".into()).await;
    }
}

/// Connects to the test broker; with a comma-separated `OFFBOARD_TEST_AMQP_URL` (a cluster),
/// to the first node that answers.
pub async fn connect() -> lapin::Result<Connection> {
    let urls = amqp_url();
    let mut last = None;
    for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        match tokio::time::timeout(
            Duration::from_secs(5),
            Connection::connect(url, ConnectionProperties::default()),
        )
        .await
        {
            Ok(Ok(c)) => return Ok(c),
            Ok(Err(e)) => last = Some(e),
            Err(_) => {}
        }
    }
    Err(last.unwrap_or_else(|| {
        lapin::Error::from(lapin::ErrorKind::IOError(std::sync::Arc::new(
            std::io::Error::new(std::io::ErrorKind::TimedOut, "no broker node answered"),
        )))
    }))
}

/// An outside publisher (the HRIS), with confirms.
pub struct Outside {
    pub conn: Connection,
    pub channel: lapin::Channel,
}

impl Outside {
    pub async fn new() -> Self {
        let conn = connect().await.expect("broker reachable");
        let channel = conn.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        Self { conn, channel }
    }

    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        content_type: Option<&str>,
    ) {
        let mut props = BasicProperties::default().with_delivery_mode(2);
        if let Some(ct) = content_type {
            props = props.with_content_type(ct.into());
        }
        self.publish_props(exchange, routing_key, body, props).await;
    }

    /// A persistent CloudEvents message carrying `headers`, confirmed.
    pub async fn publish_with_headers(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        headers: lapin::types::FieldTable,
    ) {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/cloudevents+json".into())
            .with_headers(headers);
        self.publish_props(exchange, routing_key, body, props).await;
    }

    async fn publish_props(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack(), "broker nacked a test publish");
    }

    pub async fn queue_len(&self, queue: &str) -> u32 {
        let ch = self.conn.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::default().passive(),
                FieldTable::default(),
            )
            .await
            .expect("queue exists");
        let _ = ch.close(200, "".into()).await;
        q.message_count()
    }

    /// Takes (and acks) every message now in `queue`.
    pub async fn drain(&self, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
        let ch = self.conn.create_channel().await.expect("channel");
        let mut out = Vec::new();
        while let Some(m) = ch
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .expect("basic_get")
        {
            m.delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .expect("ack");
            out.push(m);
        }
        let _ = ch.close(200, "".into()).await;
        out
    }

    /// Waits until `queue` holds `n` messages (or the deadline passes) and returns the count.
    pub async fn wait_len(&self, queue: &str, n: u32, within: Duration) -> u32 {
        until(within, || self.queue_len(queue), |len| *len >= n).await
    }
}

/// A valid termination event for `external_id`.
pub fn termination(id: &str, external_id: &str) -> serde_json::Value {
    serde_json::json!({
        "specversion": "1.0",
        "id": id,
        "source": "hris://test/acme",
        "type": "employee.terminated",
        "time": "2026-11-22T10:00:00Z",
        "data": { "employee": { "external_id": external_id } }
    })
}

/// A handler for consumer tests: records event ids, optionally sleeping first.
#[derive(Default)]
pub struct Recorder {
    pub delay: Duration,
    /// Events whose id starts with "slow" take this long instead.
    pub slow_delay: Duration,
    pub seen: Mutex<Vec<String>>,
    pub finished: Mutex<Vec<String>>,
}

impl Recorder {
    /// Waits (up to 5 s) until at least one event has finished; returns those finished.
    pub async fn wait_finished(&self) -> Vec<String> {
        self.wait_finished_n(1, Duration::from_secs(5)).await
    }

    /// Waits until `n` events have finished (or `within` passed); returns those finished.
    pub async fn wait_finished_n(&self, n: usize, within: Duration) -> Vec<String> {
        until(
            within,
            || async { self.finished.lock().await.clone() },
            |f| f.len() >= n,
        )
        .await
    }
}

/// The Prometheus text a worker serves at `{base}/metrics`.
pub async fn metrics_text(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text")
}

/// The value of one metric line (`name{labels} value`), 0 when absent.
pub fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Waits until the worker serving `base` has parked a saga (`what` names the wait).
pub async fn wait_parked(base: &str, what: &str) {
    eventually(what, Duration::from_secs(60), || async {
        (metric(&metrics_text(base).await, "offboard_sagas_parked_total ") >= 1.0).then_some(())
    })
    .await;
}

/// Declares a topic exchange as the worker declares its own (durable).
pub async fn declare_topic_exchange(ch: &lapin::Channel, name: &str) {
    ch.exchange_declare(
        name.into(),
        lapin::ExchangeKind::Topic,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("exchange");
}

impl Handler for Recorder {
    async fn handle(&self, message: Message, _ctx: Context) -> Settle {
        let id = message.event.id.as_str().to_owned();
        self.seen.lock().await.push(id.clone());
        let delay = if id.starts_with("slow") {
            self.slow_delay
        } else {
            self.delay
        };
        tokio::time::sleep(delay).await;
        self.finished.lock().await.push(id);
        Settle::Ack
    }
}

pub struct TestWorker {
    pub running: Running,
    pub shutdown: CancellationToken,
    pub base: String,
}

impl TestWorker {
    pub async fn readyz(&self) -> u16 {
        match reqwest::get(format!("{}/readyz", self.base)).await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    pub async fn wait_ready(&self, want: u16, within: Duration) -> bool {
        until(within, || self.readyz(), |s| *s == want).await == want
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.running.wait().await
    }
}

/// The control-header key of workers started with [`spawn_worker`].
pub fn test_control_key() -> cxone_offboard::broker::control::ControlKey {
    cxone_offboard::broker::control::ControlKey::derive(b"integration tests")
}

/// Starts a worker in-process with `handler` (zero-to-production's `spawn_app`).
pub async fn spawn_worker<H: Handler>(settings: Settings, handler: Arc<H>) -> TestWorker {
    spawn_worker_with_pause(settings, handler, None).await
}

/// Like [`spawn_worker`], pausing intake while `pause` holds a reason.
pub async fn spawn_worker_with_pause<H: Handler>(
    settings: Settings,
    handler: Arc<H>,
    pause: Option<cxone_offboard::broker::consumer::PauseSignal>,
) -> TestWorker {
    let shutdown = CancellationToken::new();
    let running = worker::start(
        Arc::new(settings),
        handler,
        Metrics::new(),
        pause,
        test_control_key(),
        shutdown.clone(),
    )
    .await
    .expect("worker starts");
    let base = format!("http://{}", running.http_addr);
    TestWorker {
        running,
        shutdown,
        base,
    }
}

/// Taps the outcomes exchange: every outcome published after `new` returns.
pub struct OutcomeTap {
    _conn: Connection,
    received: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl OutcomeTap {
    pub async fn new(exchange: &str) -> Self {
        use futures_util::StreamExt;
        use lapin::options::{BasicConsumeOptions, QueueBindOptions};
        let conn = connect().await.expect("broker");
        let ch = conn.create_channel().await.expect("channel");
        // A tap may be bound before any worker has declared the exchange.
        declare_topic_exchange(&ch, exchange).await;
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("tap queue");
        ch.queue_bind(
            q.name().clone(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind tap");
        let mut consumer = ch
            .basic_consume(
                q.name().clone(),
                "tap".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume tap");
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&d.data) {
                    sink.lock().await.push(v);
                }
            }
        });
        Self {
            _conn: conn,
            received,
        }
    }

    pub async fn all(&self) -> Vec<serde_json::Value> {
        self.received.lock().await.clone()
    }

    /// A tap bound to nothing (it hears no outcome).
    pub async fn detached() -> Self {
        Self {
            _conn: connect().await.expect("broker"),
            received: Arc::default(),
        }
    }

    /// Waits until `n` outcomes arrived (or the deadline) and returns them all.
    pub async fn wait(&self, n: usize, within: Duration) -> Vec<serde_json::Value> {
        until(within, || self.all(), |got| got.len() >= n).await
    }
}

/// A simulator plus a worker running the real saga against it, the broker and S3.
pub struct Stack {
    pub names: Names,
    pub sim: cxone_offboard::sim::SimServer,
    pub worker: TestWorker,
    pub tap: OutcomeTap,
    pub outside: Outside,
    pub settings: Settings,
}

impl Stack {
    pub fn sim_env(sim: &cxone_offboard::sim::SimServer) -> Vec<(String, String)> {
        [
            ("OFFBOARD__CXONE__ISSUER", sim.base_url()),
            ("OFFBOARD__CXONE__ACCESS_KEY_ID", "sim-key".to_owned()),
            (
                "OFFBOARD__CXONE__ACCESS_KEY_SECRET",
                "sim-secret".to_owned(),
            ),
            (
                "OFFBOARD__CXONE__RATE_LIMIT__REQUESTS_PER_SECOND",
                "2000".to_owned(),
            ),
            ("OFFBOARD__CXONE__RATE_LIMIT__BURST", "200".to_owned()),
            ("OFFBOARD__WORKER__RETRY_DELAYS_SECS", "1,2,4".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    pub async fn start(sim_opts: cxone_offboard::sim::SimOptions, extra: &[(&str, &str)]) -> Self {
        Self::start_with(sim_opts, extra, true).await
    }

    /// Like [`Stack::start`]; without `tap` nothing is bound to the outcomes exchange.
    pub async fn start_with(
        sim_opts: cxone_offboard::sim::SimOptions,
        extra: &[(&str, &str)],
        tap: bool,
    ) -> Self {
        Self::start_full(Names::new(), sim_opts, extra, tap).await
    }

    /// Like [`Stack::start`] on broker names (and a bucket) chosen by the test.
    pub async fn start_on(
        names: Names,
        sim_opts: cxone_offboard::sim::SimOptions,
        extra: &[(&str, &str)],
    ) -> Self {
        Self::start_full(names, sim_opts, extra, true).await
    }

    async fn start_full(
        names: Names,
        sim_opts: cxone_offboard::sim::SimOptions,
        extra: &[(&str, &str)],
        tap: bool,
    ) -> Self {
        assert!(
            std::env::var_os("AWS_ACCESS_KEY_ID").is_some()
                && std::env::var_os("AWS_EC2_METADATA_DISABLED").is_some(),
            "S3 tests need the local server's credentials and no metadata lookups: run them \
             through `make test` (it exports AWS_ACCESS_KEY_ID=test, AWS_EC2_METADATA_DISABLED=true)"
        );
        let sim = cxone_offboard::sim::spawn(sim_opts, "127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("simulator starts");
        let mut env: Vec<(String, String)> = Self::sim_env(&sim);
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let settings = names.settings(&pairs);
        names.create_bucket_for(&settings).await;
        // The tap listens before the worker starts: a message already waiting (a test that
        // fills a queue first) may be finished before the worker reports ready.
        let tap = if tap {
            OutcomeTap::new(&names.outcomes()).await
        } else {
            OutcomeTap::detached().await
        };
        let app = cxone_offboard::app::App::build(Arc::new(settings.clone()), Metrics::new())
            .await
            .expect("the worker builds");
        let shutdown = CancellationToken::new();
        let running = app.start(shutdown.clone()).await.expect("worker starts");
        let base = format!("http://{}", running.http_addr);
        let worker = TestWorker {
            running,
            shutdown,
            base,
        };
        assert!(
            worker.wait_ready(200, Duration::from_secs(15)).await,
            "worker ready"
        );
        let outside = Outside::new().await;
        Self {
            names,
            sim,
            worker,
            tap,
            outside,
            settings,
        }
    }

    /// Publishes a termination for `external_id` with a fresh event id; returns the id.
    pub async fn terminate(&self, external_id: &str, data_extra: serde_json::Value) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let mut event = termination(&id, external_id);
        if let serde_json::Value::Object(extra) = data_extra {
            for (k, v) in extra {
                event["data"][k] = v;
            }
        }
        self.publish_event(&event).await;
        id
    }

    pub async fn publish_event(&self, event: &serde_json::Value) {
        let body = serde_json::to_vec(event).expect("json");
        self.outside
            .publish(
                &self.names.events(),
                "employee.terminated",
                &body,
                Some("application/cloudevents+json"),
            )
            .await;
    }

    pub async fn sim_get(&self, path: &str) -> serde_json::Value {
        reqwest::get(format!("{}{path}", self.sim.base_url()))
            .await
            .expect("sim answers")
            .json()
            .await
            .expect("sim json")
    }

    pub async fn sim_post(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let resp = reqwest::Client::new()
            .post(format!("{}{path}", self.sim.base_url()))
            .json(&body)
            .send()
            .await
            .expect("sim answers");
        assert!(resp.status().is_success(), "sim {path}: {}", resp.status());
        resp.json().await.unwrap_or(serde_json::Value::Null)
    }

    pub async fn stop(self) {
        self.worker.stop().await.expect("worker stops cleanly");
        self.sim.shutdown().await;
        self.names.cleanup().await;
    }
}

/// Unfinished multipart uploads of `key` (a test-only look: the worker never lists uploads).
pub async fn open_uploads(store: &cxone_offboard::store::S3, key: &str) -> Vec<String> {
    store
        .sdk()
        .list_multipart_uploads()
        .bucket(store.bucket())
        .prefix(key)
        .send()
        .await
        .expect("list uploads")
        .uploads()
        .iter()
        .filter(|u| u.key() == Some(key))
        .filter_map(|u| u.upload_id().map(str::to_owned))
        .collect()
}

/// Declares the worker's topology for `settings` (for tests that fill queues before any worker
/// runs).
pub async fn declare_topology(settings: &Settings) {
    let conn = connect().await.expect("broker");
    let ch = conn.create_channel().await.expect("channel");
    cxone_offboard::broker::topology::declare(
        &ch,
        &settings.amqp,
        &cxone_offboard::broker::topology::Delays::of(settings),
    )
    .await
    .expect("topology");
    let _ = conn.close(200, "".into()).await;
}

/// The first ```sh block after `heading` in a Markdown document (the README, the guides):
/// examples that tests run as a reader would.
pub fn sh_block<'a>(doc: &'a str, heading: &str) -> &'a str {
    let start = doc.find(heading).expect("section exists");
    let rest = &doc[start..];
    let block = rest.find("```sh").expect("a sh block") + "```sh".len();
    let end = rest[block..].find("```").expect("block ends") + block;
    &rest[block..end]
}

/// Publishes one termination for each of E000001…E{n}, as an HRIS would; returns the event ids.
pub async fn publish_leavers(names: &Names, n: usize) -> std::collections::BTreeSet<String> {
    let outside = Outside::new().await;
    let mut ids = std::collections::BTreeSet::new();
    for i in 1..=n {
        let id = uuid::Uuid::new_v4().to_string();
        let body = serde_json::to_vec(&termination(&id, &format!("E{i:06}"))).expect("json");
        outside
            .publish(&names.events(), "employee.terminated", &body, None)
            .await;
        ids.insert(id);
    }
    ids
}

/// A TCP relay in front of the broker (127.0.0.1:5672) for one test's connections: it can be
/// cut (the broker goes away) or frozen (connections stay open and nothing gets through, as
/// with a frozen or partitioned node).
pub struct Relay {
    pub port: u16,
    /// Connections accepted so far.
    pub accepted: Arc<std::sync::atomic::AtomicUsize>,
    frozen: tokio::sync::watch::Sender<bool>,
    tasks: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Listens on `port` (0: any free port).
    pub async fn start(port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("relay binds");
        let port = listener.local_addr().expect("addr").port();
        let (frozen, _) = tokio::sync::watch::channel(false);
        let gate = frozen.clone();
        let tasks: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let t = tasks.clone();
        let accepted: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let count = accepted.clone();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Ok(outbound) = tokio::net::TcpStream::connect("127.0.0.1:5672").await else {
                    continue;
                };
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                let mut t = t.lock().expect("lock");
                t.push(tokio::spawn(pump(ri, wo, gate.subscribe())));
                t.push(tokio::spawn(pump(ro, wi, gate.subscribe())));
            }
        });
        Self {
            port,
            accepted,
            frozen,
            tasks,
            accept,
        }
    }

    /// A broker URL through this relay.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Nothing gets through until [`Relay::thaw`]; the connections stay open.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    /// Closes every connection and stops listening; returns the port.
    pub fn cut(self) -> u16 {
        self.accept.abort();
        for t in self.tasks.lock().expect("lock").drain(..) {
            t.abort();
        }
        self.port
    }
}

/// Copies `from` to `to`, holding what it read while the relay is frozen.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if frozen.wait_for(|f| !*f).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}
