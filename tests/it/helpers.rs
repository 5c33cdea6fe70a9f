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
            (
                "OFFBOARD__AMQP__DELAY_QUEUE_PREFIX",
                format!("{p}offboard.delay"),
            ),
            ("OFFBOARD__AMQP__RECONNECT_INITIAL_MS", "100".to_owned()),
            ("OFFBOARD__AMQP__RECONNECT_MAX_MS", "1000".to_owned()),
            ("OFFBOARD__HTTP__LISTEN", "127.0.0.1:0".to_owned()),
            ("OFFBOARD__S3__ENDPOINT", s3_endpoint()),
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
        for q in [self.requests(), self.dead(), self.held()] {
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

pub async fn connect() -> lapin::Result<Connection> {
    Connection::connect(&amqp_url(), ConnectionProperties::default()).await
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
        let deadline = Instant::now() + within;
        loop {
            let len = self.queue_len(queue).await;
            if len >= n || Instant::now() > deadline {
                return len;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.readyz().await == want {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.running.wait().await
    }
}

/// Starts a worker in-process with `handler` (zero-to-production's `spawn_app`).
pub async fn spawn_worker<H: Handler>(settings: Settings, handler: Arc<H>) -> TestWorker {
    let shutdown = CancellationToken::new();
    let running = worker::start(
        Arc::new(settings),
        handler,
        Metrics::new(),
        None,
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
