//! HTTP intake (CONTRACT §13) against the real broker: every answer for every content mode,
//! signatures made here with `hmac` + `sha2` (not with the code under test), a replayed
//! `webhook-id`, an all-or-none batch, a broker that goes away, and a signed webhook that
//! offboards a user through the worker and the simulator.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use cxone_offboard::metrics::Metrics;
use cxone_offboard::sim::SimOptions;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::helpers::{BROKER, Names, Outside, Stack, declare_topology, termination};

/// The Standard Webhooks specification's example secret.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn signature(id: &str, ts: i64, body: &[u8]) -> String {
    let key = B64
        .decode(SECRET.trim_start_matches("whsec_"))
        .expect("secret");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("key");
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
}

#[derive(Clone, Copy)]
enum Sign {
    Good,
    None,
    Wrong,
    Stale,
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
    text: String,
}

async fn post(
    base: &str,
    source: &str,
    id: &str,
    content_type: &str,
    extra: &[(&str, String)],
    body: Vec<u8>,
    sign: Sign,
) -> Answer {
    let now = chrono::Utc::now().timestamp();
    let ts = if matches!(sign, Sign::Stale) {
        now - 600
    } else {
        now
    };
    let mut req = reqwest::Client::new()
        .post(format!("{base}/v1/sources/{source}/events"))
        .header("content-type", content_type)
        .timeout(Duration::from_secs(30));
    for (k, v) in extra {
        req = req.header(*k, v);
    }
    match sign {
        Sign::None => {}
        Sign::Good | Sign::Stale => {
            req = req
                .header("webhook-id", id)
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", signature(id, ts, &body));
        }
        Sign::Wrong => {
            let mut other = body.clone();
            other.push(b' ');
            req = req
                .header("webhook-id", id)
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", signature(id, ts, &other));
        }
    }
    let resp = req.body(body).send().await.expect("intake answers");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
        text,
    }
}

fn fresh_id() -> String {
    format!("msg_{}", uuid::Uuid::new_v4().simple())
}

fn event(external_id: &str) -> Value {
    termination(&uuid::Uuid::new_v4().to_string(), external_id)
}

/// One request in each content mode: (content type, ce-headers, body, events in it).
fn request(mode: &str, external_ids: &[&str]) -> (String, Vec<(&'static str, String)>, Vec<u8>) {
    match mode {
        "structured" => (
            "application/cloudevents+json".to_owned(),
            vec![],
            serde_json::to_vec(&event(external_ids[0])).expect("json"),
        ),
        "binary" => {
            let e = event(external_ids[0]);
            let mut headers = vec![];
            for (k, name) in [
                ("specversion", "ce-specversion"),
                ("id", "ce-id"),
                ("source", "ce-source"),
                ("type", "ce-type"),
                ("time", "ce-time"),
            ] {
                if let Some(v) = e[k].as_str() {
                    headers.push((name, v.to_owned()));
                }
            }
            (
                "application/json".to_owned(),
                headers,
                serde_json::to_vec(&e["data"]).expect("json"),
            )
        }
        _ => (
            "application/cloudevents-batch+json".to_owned(),
            vec![],
            serde_json::to_vec(&external_ids.iter().map(|x| event(x)).collect::<Vec<_>>())
                .expect("json"),
        ),
    }
}

struct Intake {
    base: String,
    stop: CancellationToken,
    task: JoinHandle<()>,
    metrics: Metrics,
}

async fn intake(names: &Names, extra: &[(&str, &str)]) -> Intake {
    let mut env = vec![
        ("OFFBOARD__INTAKE__LISTEN", "127.0.0.1:0"),
        ("OFFBOARD__INTAKE__SOURCES__WORKDAY__SECRET", SECRET),
        ("OFFBOARD__INTAKE__SOURCES__SLOW__SECRET", SECRET),
        (
            "OFFBOARD__INTAKE__SOURCES__SLOW__REQUESTS_PER_SECOND",
            "0.01",
        ),
        ("OFFBOARD__INTAKE__SOURCES__SLOW__BURST", "1"),
    ];
    env.extend_from_slice(extra);
    let settings = names.settings(&env);
    let metrics = Metrics::new();
    let stop = CancellationToken::new();
    let (addr, task) = cxone_offboard::intake::serve(&settings, metrics.clone(), stop.clone())
        .await
        .expect("intake serves");
    Intake {
        base: format!("http://{addr}"),
        stop,
        task,
        metrics,
    }
}

impl Intake {
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

fn assert_problem(a: &Answer, status: u16) {
    assert_eq!(a.status, status, "{}", a.text);
    assert_eq!(
        a.headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/problem+json"),
        "{}",
        a.text
    );
    assert_eq!(a.body["status"], status, "{}", a.text);
    assert!(
        !a.text.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        "{}",
        a.text
    );
}

#[tokio::test]
async fn every_answer_of_the_contract_for_every_content_mode() {
    let _shared = BROKER.read().await;
    let names = Names::new();
    declare_topology(&names.settings(&[])).await;
    let intake = intake(&names, &[]).await;
    let base = intake.base.as_str();
    let outside = Outside::new().await;
    let mut published = 0;
    for mode in ["structured", "binary", "batch"] {
        // 202, and the same webhook-id again: 202 with the same answer, nothing published.
        let (ct, ce, body) = request(mode, &["E000001", "E000002"]);
        let id = fresh_id();
        let ok = post(base, "workday", &id, &ct, &ce, body.clone(), Sign::Good).await;
        assert_eq!(ok.status, 202, "{mode}: {}", ok.text);
        let accepted = ok.body["accepted"].as_array().expect("accepted").clone();
        assert_eq!(
            accepted.len(),
            if mode == "batch" { 2 } else { 1 },
            "{mode}"
        );
        for a in &accepted {
            assert!(a["id"].is_string() && a["saga_id"].is_string(), "{a}");
        }
        published += accepted.len() as u32;
        let again = post(base, "workday", &id, &ct, &ce, body.clone(), Sign::Good).await;
        assert_eq!(again.status, 202, "{mode}");
        assert_eq!(
            again.body, ok.body,
            "{mode}: a replay answers as the first time"
        );
        // The same webhook-id for another body: 409, nothing published.
        let (_, _, other) = request(mode, &["E000009", "E000010"]);
        let reused = post(base, "workday", &id, &ct, &ce, other, Sign::Good).await;
        assert_problem(&reused, 409);
        assert_eq!(reused.body["field"], "webhook-id", "{}", reused.text);

        // 400 naming the field; in a batch, one bad member and none is published.
        let (ct, ce, body) = request(mode, &["E000003", "E 0004"]);
        let bad_body = if mode == "batch" {
            body
        } else {
            let (_, _, b) = request(mode, &["E 0004"]);
            b
        };
        let bad = post(base, "workday", &fresh_id(), &ct, &ce, bad_body, Sign::Good).await;
        assert_problem(&bad, 400);
        let want = if mode == "batch" {
            "[1].data.employee.external_id"
        } else {
            "data.employee.external_id"
        };
        assert_eq!(bad.body["field"], want, "{mode}: {}", bad.text);

        // 401: unsigned, wrong signature, stale timestamp.
        let (ct, ce, body) = request(mode, &["E000005"]);
        for sign in [Sign::None, Sign::Wrong, Sign::Stale] {
            let a = post(base, "workday", &fresh_id(), &ct, &ce, body.clone(), sign).await;
            assert_problem(&a, 401);
            assert!(a.headers.contains_key("www-authenticate"));
        }
        // 404: a source nobody configured.
        let a = post(
            base,
            "nobody",
            &fresh_id(),
            &ct,
            &ce,
            body.clone(),
            Sign::Good,
        )
        .await;
        assert_problem(&a, 404);
        // 413: over 256 KiB.
        let mut huge = body.clone();
        huge.resize(300 * 1024, b' ');
        let a = post(base, "workday", &fresh_id(), &ct, &ce, huge, Sign::Good).await;
        assert_problem(&a, 413);
        // 415: another content type.
        let a = post(
            base,
            "workday",
            &fresh_id(),
            "text/plain",
            &ce,
            body.clone(),
            Sign::Good,
        )
        .await;
        assert_problem(&a, 415);
    }
    // 429 with Retry-After once a source is over its rate (0.01/s, burst 1).
    let (ct, ce, body) = request("structured", &["E000006"]);
    let first = post(base, "slow", &fresh_id(), &ct, &ce, body, Sign::Good).await;
    assert_eq!(first.status, 202, "{}", first.text);
    published += 1;
    let (ct, ce, body) = request("structured", &["E000007"]);
    let limited = post(base, "slow", &fresh_id(), &ct, &ce, body, Sign::Good).await;
    assert_problem(&limited, 429);
    let retry: u64 = limited
        .headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in seconds");
    assert!(retry >= 1, "{retry}");

    // Exactly the accepted events reached the work queue (confirmed before 202, so no waiting).
    assert_eq!(outside.queue_len(&names.requests()).await, published);
    let metrics = intake.metrics.render();
    for line in [
        r#"offboard_intake_requests_total{source="workday",code="202"} 6"#,
        r#"offboard_intake_requests_total{source="workday",code="401"} 9"#,
        r#"offboard_intake_requests_total{source="unknown",code="404"} 3"#,
        r#"offboard_intake_requests_total{source="slow",code="429"} 1"#,
    ] {
        assert!(metrics.contains(line), "missing `{line}` in\n{metrics}");
    }
    intake.stop().await;
    names.cleanup().await;
}

#[tokio::test]
async fn a_broker_that_goes_away_gets_503_and_nothing_is_published() {
    let _shared = BROKER.read().await;
    let names = Names::new();
    declare_topology(&names.settings(&[])).await;
    let relay = crate::helpers::Relay::start(0).await;
    let url = relay.url();
    let intake = intake(&names, &[("OFFBOARD__AMQP__URL", url.as_str())]).await;
    let base = intake.base.as_str();
    let outside = Outside::new().await;
    let (ct, ce, body) = request("batch", &["E000001", "E000002"]);
    let ok = post(base, "workday", &fresh_id(), &ct, &ce, body, Sign::Good).await;
    assert_eq!(ok.status, 202, "{}", ok.text);
    let ready = reqwest::get(format!("{base}/readyz"))
        .await
        .expect("readyz");
    assert_eq!(ready.status().as_u16(), 200);

    let port = relay.cut();
    let (ct, ce, body) = request("batch", &["E000003", "E000004", "E000005"]);
    let id = fresh_id();
    let down = post(base, "workday", &id, &ct, &ce, body.clone(), Sign::Good).await;
    assert_problem(&down, 503);
    let ready = reqwest::get(format!("{base}/readyz"))
        .await
        .expect("readyz");
    assert_eq!(ready.status().as_u16(), 503);
    assert_eq!(
        outside.queue_len(&names.requests()).await,
        2,
        "nothing of the 503 batch"
    );

    // The broker is back: the sender's retry of the same request is taken, once.
    let _relay = crate::helpers::Relay::start(port).await;
    let back = post(base, "workday", &id, &ct, &ce, body, Sign::Good).await;
    assert_eq!(back.status, 202, "{}", back.text);
    assert_eq!(outside.queue_len(&names.requests()).await, 5);
    intake.stop().await;
    names.cleanup().await;
}

#[tokio::test]
async fn events_nobody_would_consume_are_503_not_202() {
    let _shared = BROKER.read().await;
    let names = Names::new();
    // The exchange exists, no queue is bound: an accepted event would be dropped.
    let conn = crate::helpers::connect().await.expect("broker");
    let ch = conn.create_channel().await.expect("channel");
    crate::helpers::declare_topic_exchange(&ch, &names.events()).await;
    let intake = intake(&names, &[]).await;
    let (ct, ce, body) = request("structured", &["E000001"]);
    let a = post(
        &intake.base,
        "workday",
        &fresh_id(),
        &ct,
        &ce,
        body,
        Sign::Good,
    )
    .await;
    assert_problem(&a, 503);
    assert!(a.text.contains("no queue is bound"), "{}", a.text);
    intake.stop().await;
    let _ = conn.close(200, "".into()).await;
    names.cleanup().await;
}

#[tokio::test]
async fn a_signed_webhook_offboards_the_user_and_a_replay_does_not_run_it_twice() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(
        SimOptions {
            users: 3,
            interactions_per_user: 2,
            ..SimOptions::default()
        },
        &[
            ("OFFBOARD__INTAKE__LISTEN", "127.0.0.1:0"),
            ("OFFBOARD__INTAKE__SOURCES__BAMBOOHR__SECRET", SECRET),
        ],
    )
    .await;
    let base = format!(
        "http://{}",
        stack
            .worker
            .running
            .intake_addr
            .expect("the worker serves the intake")
    );
    let (ct, ce, body) = request("binary", &["E000002"]);
    let id = fresh_id();
    let a = post(&base, "bamboohr", &id, &ct, &ce, body.clone(), Sign::Good).await;
    assert_eq!(a.status, 202, "{}", a.text);
    let again = post(&base, "bamboohr", &id, &ct, &ce, body, Sign::Good).await;
    assert_eq!(again.status, 202);
    let outcomes = stack.tap.wait(1, Duration::from_secs(60)).await;
    assert_eq!(
        outcomes[0]["type"], "offboard.saga.completed",
        "{}",
        outcomes[0]
    );
    assert_eq!(
        outcomes[0]["data"]["saga_id"], a.body["accepted"][0]["saga_id"],
        "{}",
        outcomes[0]
    );
    let user = stack.sim_get("/_sim/users/E000002").await;
    assert_ne!(user["status"], "ACTIVE", "{user}");
    // The replay published nothing: one event went to the broker for two requests.
    let metrics = crate::helpers::metrics_text(&stack.worker.base).await;
    assert!(
        metrics.contains(r#"offboard_intake_events_published_total{source="bamboohr"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"offboard_intake_requests_total{source="bamboohr",code="202"} 2"#),
        "{metrics}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn the_curl_and_openssl_example_in_the_operations_guide_is_accepted() {
    let _shared = BROKER.read().await;
    let names = Names::new();
    declare_topology(&names.settings(&[])).await;
    let intake = intake(&names, &[]).await;
    let guide = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .expect("docs/operations.md");
    let script = format!(
        "set -eu\n{}",
        crate::helpers::sh_block(&guide, "### Signing a request by hand")
            .replace("http://127.0.0.1:8080", &intake.base)
    );
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .output()
        .await
        .expect("sh runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script}\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_str(&stdout).expect("json answer");
    assert_eq!(answer["accepted"][0]["id"], "wd-evt-000042", "{stdout}");
    let outside = Outside::new().await;
    assert_eq!(outside.queue_len(&names.requests()).await, 1);
    intake.stop().await;
    names.cleanup().await;
}
