//! Event intake: invalid input is dead-lettered at once with CONTRACT §5 headers, valid input
//! reaches the handler, and the worker stays ready throughout.

use std::sync::Arc;
use std::time::Duration;

use cxone_offboard::broker::headers;
use serde_json::json;

use crate::helpers::{BROKER, Names, Outside, Recorder, metrics_text, spawn_worker, termination};

/// (name, routing key, content type, body, field expected in the error)
type Case = (
    &'static str,
    &'static str,
    Option<&'static str>,
    Vec<u8>,
    &'static str,
);

fn invalid_messages() -> Vec<Case> {
    let ok = termination("x", "E000001");
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = ok.clone();
        f(&mut v);
        serde_json::to_vec(&v).expect("json")
    };
    let rk = "employee.terminated";
    let cej = Some("application/cloudevents+json");
    vec![
        ("not json", rk, cej, b"this is not json".to_vec(), "body"),
        (
            "truncated json",
            rk,
            cej,
            b"{\"specversion\": \"1.0\", \"id\"".to_vec(),
            "body",
        ),
        ("empty body", rk, cej, Vec::new(), "body"),
        ("json array", rk, cej, b"[1,2,3]".to_vec(), "body"),
        (
            "invalid utf-8",
            rk,
            cej,
            vec![0xff, 0xfe, 0x7b, 0x7d],
            "body",
        ),
        (
            "wrong content type",
            rk,
            Some("text/plain"),
            with(&|_| {}),
            "content_type",
        ),
        (
            "oversize",
            rk,
            cej,
            {
                let mut v = ok.clone();
                v["data"]["padding"] = json!("x".repeat(300 * 1024));
                serde_json::to_vec(&v).expect("json")
            },
            "body",
        ),
        (
            "missing id",
            rk,
            cej,
            with(&|v| {
                v.as_object_mut().expect("o").remove("id");
            }),
            "id",
        ),
        (
            "id too long",
            rk,
            cej,
            with(&|v| v["id"] = json!("i".repeat(129))),
            "id",
        ),
        (
            "wrong specversion",
            rk,
            cej,
            with(&|v| v["specversion"] = json!("0.3")),
            "specversion",
        ),
        (
            "unknown type",
            "employee.hired",
            cej,
            with(&|v| v["type"] = json!("employee.hired")),
            "type",
        ),
        (
            "missing source",
            rk,
            cej,
            with(&|v| {
                v.as_object_mut().expect("o").remove("source");
            }),
            "source",
        ),
        (
            "missing data",
            rk,
            cej,
            with(&|v| {
                v.as_object_mut().expect("o").remove("data");
            }),
            "data",
        ),
        (
            "missing employee",
            rk,
            cej,
            with(&|v| v["data"] = json!({})),
            "data.employee",
        ),
        (
            "missing external id",
            rk,
            cej,
            with(&|v| v["data"]["employee"] = json!({"email": "a@b.c"})),
            "data.employee.external_id",
        ),
        (
            "path traversal id",
            rk,
            cej,
            with(&|v| v["data"]["employee"]["external_id"] = json!("../etc/passwd")),
            "data.employee.external_id",
        ),
        (
            "url trick id",
            rk,
            cej,
            with(&|v| v["data"]["employee"]["external_id"] = json!("E1?x=1#frag")),
            "data.employee.external_id",
        ),
        (
            "bad effective_at",
            rk,
            cej,
            with(&|v| v["data"]["effective_at"] = json!("next friday")),
            "data.effective_at",
        ),
        (
            "non-boolean option",
            rk,
            cej,
            with(&|v| v["data"]["options"] = json!({"dry_run": "yes"})),
            "data.options.dry_run",
        ),
        (
            "bad lookback",
            rk,
            cej,
            with(&|v| v["data"]["options"] = json!({"archive_lookback_days": 0})),
            "data.options.archive_lookback_days",
        ),
    ]
}

#[tokio::test]
async fn twenty_kinds_of_invalid_message_are_dead_lettered_with_reasons() {
    let _shared = BROKER.read().await;
    let names = Names::new();
    let recorder = Arc::new(Recorder::default());
    let worker = spawn_worker(names.settings(&[]), recorder.clone()).await;
    assert!(
        worker.wait_ready(200, Duration::from_secs(10)).await,
        "worker ready"
    );

    let outside = Outside::new().await;
    let cases = invalid_messages();
    assert_eq!(cases.len(), 20);
    for (_, rk, ct, body, _) in &cases {
        outside.publish(&names.events(), rk, body, *ct).await;
    }
    let n = outside
        .wait_len(&names.dead(), 20, Duration::from_secs(20))
        .await;
    assert_eq!(n, 20, "all invalid messages reach the dead queue");

    let dead = outside.drain(&names.dead()).await;
    assert_eq!(dead.len(), 20);
    // Handled concurrently, so match each case to its dead letter by body.
    for (name, _, _, body, field) in &cases {
        let msg = dead
            .iter()
            .find(|m| &m.delivery.data == body)
            .unwrap_or_else(|| panic!("{name}: not in the dead queue"));
        let h = msg.delivery.properties.headers().as_ref();
        assert_eq!(
            headers::get_str(h, headers::ERROR_CLASS).as_deref(),
            Some("invalid"),
            "{name}"
        );
        let error = headers::get_str(h, headers::ERROR).expect("x-offboard-error");
        assert!(error.len() <= 1024, "{name}: error header too long");
        assert!(
            error.contains(&format!("{field}:")),
            "{name}: error `{error}` should name `{field}`"
        );
    }
    assert!(
        recorder.seen.lock().await.is_empty(),
        "no invalid event reached the handler"
    );
    assert_eq!(
        outside.queue_len(&names.requests()).await,
        0,
        "nothing requeued"
    );
    assert_eq!(worker.readyz().await, 200, "still ready");

    // A valid event after all that still goes through.
    let valid = serde_json::to_vec(&termination("ok-1", "E000001")).expect("json");
    outside
        .publish(
            &names.events(),
            "employee.terminated",
            &valid,
            Some("application/json"),
        )
        .await;
    assert_eq!(recorder.wait_finished().await, vec!["ok-1".to_owned()]);
    let metrics = metrics_text(&worker.base).await;
    assert!(
        metrics.contains("offboard_messages_invalid_total 20"),
        "{metrics}"
    );
    assert!(
        metrics.contains("offboard_messages_received_total 21"),
        "{metrics}"
    );
    worker.stop().await.expect("clean stop");
    names.cleanup().await;
}

#[tokio::test]
async fn events_without_content_type_are_accepted() {
    let _shared = BROKER.read().await;
    let names = Names::new();
    let recorder = Arc::new(Recorder::default());
    let worker = spawn_worker(names.settings(&[]), recorder.clone()).await;
    assert!(worker.wait_ready(200, Duration::from_secs(10)).await);
    let outside = Outside::new().await;
    let body = serde_json::to_vec(&termination("no-ct", "E000002")).expect("json");
    outside
        .publish(&names.events(), "employee.terminated", &body, None)
        .await;
    assert_eq!(recorder.wait_finished().await, vec!["no-ct".to_owned()]);
    worker.stop().await.expect("clean stop");
    names.cleanup().await;
}

/// A message that crashed workers have returned close to the delivery limit is re-published
/// fresh once — its copy must not carry the broker's old `x-delivery-count`, or the copy would
/// be rescued again at once and use up every rescue (RELIABILITY.md finding 1).
#[tokio::test]
async fn a_message_near_the_delivery_limit_is_rescued_once_and_handled_once() {
    use lapin::options::{BasicGetOptions, BasicNackOptions};

    let _shared = BROKER.read().await;
    let names = Names::new();
    let settings = names.settings(&[("OFFBOARD__AMQP__DELIVERY_LIMIT", "5")]);
    crate::helpers::declare_topology(&settings).await;
    let outside = Outside::new().await;
    let body = serde_json::to_vec(&termination("near-limit", "E000003")).expect("json");
    outside
        .publish(
            &names.events(),
            "employee.terminated",
            &body,
            Some("application/cloudevents+json"),
        )
        .await;
    // Four real returns to the queue, as crashed workers would leave it (limit 5: rescued
    // from 3 on): the broker stamps the fifth delivery with x-delivery-count 4.
    let ch = outside.conn.create_channel().await.expect("channel");
    for _ in 0..4 {
        let m = loop {
            if let Some(m) = ch
                .basic_get(names.requests().as_str().into(), BasicGetOptions::default())
                .await
                .expect("get")
            {
                break m;
            }
        };
        m.delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await
            .expect("nack");
    }
    let _ = ch.close(200, "".into()).await;
    let recorder = Arc::new(Recorder::default());
    let worker = spawn_worker(settings, recorder.clone()).await;
    assert_eq!(
        recorder.wait_finished().await,
        vec!["near-limit".to_owned()]
    );
    // Handling the fresh copy comes after deciding not to rescue it again: one rescue.
    assert_eq!(
        rescued(&worker.base).await,
        vec!["offboard_messages_rescued_total 1"]
    );
    assert_eq!(outside.queue_len(&names.dead()).await, 0);
    worker.stop().await.expect("clean stop");
    names.cleanup().await;
}

async fn rescued(base: &str) -> Vec<String> {
    metrics_text(base)
        .await
        .lines()
        .filter(|l| l.starts_with("offboard_messages_rescued_total"))
        .map(str::to_owned)
        .collect()
}

/// Issue 17, item 1: `x-delivery-count` from a publisher made the worker rescue (and earlier
/// take over leases). On a first delivery it can only come from outside: ignored.
#[tokio::test]
async fn a_delivery_count_set_by_a_publisher_is_ignored() {
    use lapin::types::{AMQPValue, FieldTable};

    let _shared = BROKER.read().await;
    let names = Names::new();
    let recorder = Arc::new(Recorder::default());
    let settings = names.settings(&[("OFFBOARD__AMQP__DELIVERY_LIMIT", "5")]);
    let worker = spawn_worker(settings, recorder.clone()).await;
    assert!(worker.wait_ready(200, Duration::from_secs(10)).await);
    let outside = Outside::new().await;
    let body = serde_json::to_vec(&termination("forged-count", "E000003")).expect("json");
    let mut table = FieldTable::default();
    table.insert(headers::DELIVERY_COUNT.into(), AMQPValue::LongLongInt(4));
    outside
        .publish_with_headers(&names.events(), "employee.terminated", &body, table)
        .await;
    assert_eq!(
        recorder.wait_finished().await,
        vec!["forged-count".to_owned()]
    );
    assert_eq!(
        rescued(&worker.base).await,
        vec!["offboard_messages_rescued_total 0"]
    );
    worker.stop().await.expect("clean stop");
    names.cleanup().await;
}
