//! The saga end to end: simulator over HTTP, real broker, real S3 server.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cxone_offboard::broker::headers;
use cxone_offboard::evidence;
use cxone_offboard::sim::SimOptions;
use cxone_offboard::store::{S3, Store};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::helpers::{BROKER, Stack};

fn sim(users: u64, interactions: u64) -> SimOptions {
    SimOptions {
        users,
        interactions_per_user: interactions,
        ..SimOptions::default()
    }
}

fn eid(n: usize) -> String {
    format!("E{n:06}")
}

fn by_type<'a>(outcomes: &'a [Value], ty: &str) -> Vec<&'a Value> {
    outcomes.iter().filter(|o| o["type"] == ty).collect()
}

#[tokio::test]
async fn a_hundred_terminations_all_complete_and_every_user_is_gone() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(sim(100, 5), &[]).await;
    for n in 1..=100 {
        stack.terminate(&eid(n), json!({})).await;
    }
    let outcomes = stack.tap.wait(100, Duration::from_secs(90)).await;
    let completed = by_type(&outcomes, "offboard.saga.completed");
    assert_eq!(
        completed.len(),
        100,
        "{:#?}",
        by_type(&outcomes, "offboard.saga.failed")
    );
    for o in &completed {
        assert_eq!(o["data"]["status"], "DELETED", "{o}");
        assert!(o["data"]["revoked_at"].is_string());
        assert_eq!(o["data"]["archive"]["records"], 5);
    }
    for n in 1..=100 {
        let u = stack.sim_get(&format!("/_sim/users/{}", eid(n))).await;
        assert_eq!(u["status"], "DELETED", "{u}");
        assert_eq!(u["agent_active"], false, "{u}");
        assert_eq!(u["logged_in"], false, "{u}");
        assert_eq!(u["skills"].as_array().map(Vec::len), Some(0), "{u}");
        assert_eq!(u["access_keys"].as_array().map(Vec::len), Some(0), "{u}");
    }
    assert_eq!(stack.outside.queue_len(&stack.names.dead()).await, 0);
    stack.stop().await;
}

#[tokio::test]
async fn duplicates_and_redeliveries_run_one_saga_and_write_once() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(sim(10, 3), &[]).await;
    let id = uuid::Uuid::new_v4().to_string();
    let event = crate::helpers::termination(&id, "E000004");
    stack.publish_event(&event).await;
    stack.publish_event(&event).await;
    let outcomes = stack.tap.wait(2, Duration::from_secs(60)).await;
    assert_eq!(outcomes.len(), 2);
    assert_eq!(outcomes[0]["id"], outcomes[1]["id"], "same CloudEvents id");
    assert_eq!(
        outcomes[0]["data"], outcomes[1]["data"],
        "identical re-publication"
    );
    // Re-published after completion: still the same outcome, no new CXone write.
    let before = stack.sim_get("/_sim/users/E000004").await;
    stack.publish_event(&event).await;
    let outcomes = stack.tap.wait(3, Duration::from_secs(30)).await;
    assert_eq!(outcomes.len(), 3);
    assert_eq!(outcomes[2]["id"], outcomes[0]["id"]);
    let after = stack.sim_get("/_sim/users/E000004").await;
    assert_eq!(before["writes"], after["writes"]);
    let writes: BTreeMap<String, u64> =
        serde_json::from_value(after["writes"].clone()).expect("writes map");
    assert!(!writes.is_empty());
    for (route, n) in &writes {
        assert_eq!(*n, 1, "{route} written {n} times: {writes:?}");
    }
    stack.stop().await;
}

#[tokio::test]
async fn a_403_on_block_login_fails_that_saga_only_and_dead_letters_it() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(sim(10, 2), &[]).await;
    stack
        .sim_post(
            "/_sim/faults",
            json!({"users": {"E000007": {"block_login": 403}}}),
        )
        .await;
    for n in 6..=8 {
        stack.terminate(&eid(n), json!({})).await;
    }
    let outcomes = stack.tap.wait(3, Duration::from_secs(60)).await;
    assert_eq!(by_type(&outcomes, "offboard.saga.completed").len(), 2);
    let failed = by_type(&outcomes, "offboard.saga.failed");
    assert_eq!(failed.len(), 1);
    let f = failed[0];
    assert_eq!(f["subject"], "E000007");
    assert_eq!(f["data"]["status"], "FAILED");
    assert_eq!(f["data"]["error"]["step"], "block_login");
    assert_eq!(f["data"]["error"]["http_status"], 403);
    assert_eq!(f["data"]["error"]["class"], "permanent");
    let n = stack
        .outside
        .wait_len(&stack.names.dead(), 1, Duration::from_secs(10))
        .await;
    assert_eq!(n, 1);
    let dead = stack.outside.drain(&stack.names.dead()).await;
    let h = dead[0].delivery.properties.headers().as_ref();
    assert_eq!(
        headers::get_str(h, headers::ERROR_CLASS).as_deref(),
        Some("permanent")
    );
    assert_eq!(
        headers::get_str(h, headers::STEP).as_deref(),
        Some("block_login")
    );
    assert_eq!(
        headers::get_str(h, headers::SAGA_ID).as_deref(),
        f["data"]["saga_id"].as_str()
    );
    assert!(
        headers::get_str(h, headers::ERROR)
            .expect("error")
            .contains("403")
    );
    // The others are gone; E000007 keeps whatever the failure left (access not restored).
    let u = stack.sim_get("/_sim/users/E000006").await;
    assert_eq!(u["status"], "DELETED");
    stack.stop().await;
}

#[tokio::test]
async fn a_user_whose_deletion_is_refused_ends_deactivated_only_with_access_revoked() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(sim(10, 2), &[]).await;
    stack
        .sim_post(
            "/_sim/faults",
            json!({"users": {"E000009": {"delete": "refuse"}}}),
        )
        .await;
    stack.terminate("E000009", json!({})).await;
    let outcomes = stack.tap.wait(1, Duration::from_secs(60)).await;
    assert_eq!(outcomes[0]["type"], "offboard.saga.completed");
    assert_eq!(outcomes[0]["data"]["status"], "DEACTIVATED_ONLY");
    assert!(outcomes[0]["data"]["revoked_at"].is_string());
    let u = stack.sim_get("/_sim/users/E000009").await;
    assert_eq!(u["agent_active"], false);
    assert_eq!(u["access_keys"].as_array().map(Vec::len), Some(0));
    assert_ne!(u["status"], "DELETED");
    stack.stop().await;
}

#[tokio::test]
async fn an_unknown_employee_is_already_absent() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(sim(3, 1), &[]).await;
    stack.terminate("NOBODY-1", json!({})).await;
    let outcomes = stack.tap.wait(1, Duration::from_secs(30)).await;
    assert_eq!(outcomes[0]["data"]["status"], "ALREADY_ABSENT");
    stack.stop().await;
}

#[tokio::test]
async fn an_outage_parks_sagas_and_they_finish_when_cxone_recovers() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(
        sim(10, 2),
        &[
            ("OFFBOARD__CXONE__MAX_ATTEMPTS", "2"),
            ("OFFBOARD__CXONE__MAX_RETRY_ELAPSED_SECS", "2"),
            ("OFFBOARD__CXONE__BREAKER_FAILURE_THRESHOLD", "5"),
            ("OFFBOARD__CXONE__BREAKER_OPEN_SECS", "1"),
            ("OFFBOARD__WORKER__RETRY_DELAYS_SECS", "2,3,5,8,13"),
        ],
    )
    .await;
    stack
        .sim_post("/_sim/faults", json!({"error_rate": 1.0, "status": 503}))
        .await;
    for n in 1..=5 {
        stack.terminate(&eid(n), json!({})).await;
    }
    // Every saga parked at least once during the outage ...
    let base = stack.worker.base.clone();
    let n = crate::helpers::until(
        Duration::from_secs(60),
        || async {
            crate::helpers::metric(
                &crate::helpers::metrics_text(&base).await,
                "offboard_sagas_parked_total ",
            )
        },
        |n| *n >= 5.0,
    )
    .await;
    assert!(n >= 5.0, "{n} parked");
    // ... and none finished.
    assert!(
        stack.tap.all().await.is_empty(),
        "nothing finishes during the outage"
    );
    stack.sim_post("/_sim/faults", json!({})).await;
    let outcomes = stack.tap.wait(5, Duration::from_secs(60)).await;
    let completed = by_type(&outcomes, "offboard.saga.completed");
    assert_eq!(completed.len(), 5, "{outcomes:#?}");
    assert_eq!(stack.outside.queue_len(&stack.names.dead()).await, 0);
    assert_eq!(stack.worker.readyz().await, 200);
    stack.stop().await;
}

#[tokio::test]
async fn a_large_history_is_archived_streamed_checksummed_and_chained() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(sim(2, 0), &[]).await;
    stack
        .sim_post(
            "/_sim/users",
            json!({"external_id": "BIG-25K", "interactions": 25000}),
        )
        .await;
    stack.terminate("BIG-25K", json!({})).await;
    let outcomes = stack.tap.wait(1, Duration::from_secs(120)).await;
    let o = &outcomes[0];
    assert_eq!(o["type"], "offboard.saga.completed", "{o}");
    let archive_out = &o["data"]["archive"];
    assert_eq!(archive_out["records"], 25000);
    let store = S3::new(&stack.settings.s3).await;
    let uri = archive_out["uri"].as_str().expect("uri");
    let key = uri
        .strip_prefix(&format!("s3://{}/", stack.settings.s3.bucket))
        .expect("bucket uri");
    let body = store
        .get(key)
        .await
        .expect("get")
        .expect("archive exists")
        .body;
    let lines: Vec<&[u8]> = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(lines.len(), 25000);
    let mut ids = BTreeSet::new();
    for line in &lines {
        let v: Value = serde_json::from_slice(line).expect("each line is JSON");
        ids.insert(v["contactId"].to_string());
    }
    assert_eq!(ids.len(), 25000, "no duplicate lines");
    let sha = hex::encode(Sha256::digest(&body));
    assert_eq!(archive_out["sha256"], sha);
    assert_eq!(archive_out["bytes"], body.len());
    assert!(crate::helpers::open_uploads(&store, key).await.is_empty());
    // The manifest agrees and its chain verifies.
    let m_uri = o["data"]["manifest"]["uri"].as_str().expect("manifest uri");
    let m_key = m_uri
        .strip_prefix(&format!("s3://{}/", stack.settings.s3.bucket))
        .expect("bucket uri");
    let m = store.get(m_key).await.expect("get").expect("manifest");
    assert_eq!(
        o["data"]["manifest"]["sha256"],
        hex::encode(Sha256::digest(&m.body))
    );
    let manifest: Value = serde_json::from_slice(&m.body).expect("manifest json");
    assert_eq!(manifest["archive"]["sha256"], sha);
    evidence::verify_manifest(&manifest).expect("the manifest verifies");
    assert!(!manifest["calls"].as_array().expect("calls").is_empty());
    assert_eq!(
        manifest["compensating_records"]["skills"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    stack.stop().await;
}

/// A webhook receiver that records what it gets.
async fn receiver() -> (
    String,
    std::sync::Arc<tokio::sync::Mutex<Vec<(axum::http::HeaderMap, bytes::Bytes)>>>,
) {
    let got = std::sync::Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: bytes::Bytes| {
            let sink = sink.clone();
            async move {
                sink.lock().await.push((headers, body));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), got)
}

/// Issue 17, item 2: an event naming an unknown endpoint (or a URL) was offboarded and only
/// warned about at the notify step. It is invalid input: dead-lettered, no CXone call.
#[tokio::test]
async fn the_hris_webhook_is_signed_and_only_configured_endpoints_are_called() {
    let _shared = BROKER.read().await;
    let (base, got) = receiver().await;
    let url = format!("{base}/hook");
    let stack = Stack::start(
        sim(10, 1),
        &[
            ("OFFBOARD__HRIS__ENDPOINTS__WORKDAY__URL", url.as_str()),
            ("OFFBOARD__HRIS__ENDPOINTS__WORKDAY__SECRET", "whsec-test"),
        ],
    )
    .await;
    stack
        .terminate("E000001", json!({"notify": "workday"}))
        .await;
    stack
        .terminate("E000002", json!({"notify": "bamboo"}))
        .await;
    stack.terminate("E000003", json!({"notify": url})).await;
    let outcomes = stack.tap.wait(1, Duration::from_secs(60)).await;
    assert_eq!(
        by_type(&outcomes, "offboard.saga.completed").len(),
        1,
        "{outcomes:#?}"
    );
    assert_eq!(
        stack
            .outside
            .wait_len(&stack.names.dead(), 2, Duration::from_secs(30))
            .await,
        2
    );
    let dead = stack.outside.drain(&stack.names.dead()).await;
    for m in &dead {
        let h = m.delivery.properties.headers().as_ref();
        assert_eq!(
            cxone_offboard::broker::headers::get_str(h, "x-offboard-error-class").as_deref(),
            Some("invalid")
        );
        let why =
            cxone_offboard::broker::headers::get_str(h, "x-offboard-error").unwrap_or_default();
        assert!(why.contains("data.notify"), "{why}");
        assert!(why.contains("not a configured HRIS endpoint"), "{why}");
    }
    for user in ["E000002", "E000003"] {
        let u = stack.sim_get(&format!("/_sim/users/{user}")).await;
        assert_eq!(u["agent_active"], true, "no CXone call for {user}");
    }
    let requests = got.lock().await.clone();
    assert_eq!(requests.len(), 1, "only the configured endpoint was called");
    let (h, body) = &requests[0];
    let ts = h["x-offboard-timestamp"].to_str().expect("ts");
    let sig = h["x-offboard-signature"].to_str().expect("sig");
    assert!(cxone_offboard::hris::verify(b"whsec-test", ts, body, sig));
    assert!(!cxone_offboard::hris::verify(b"wrong", ts, body, sig));
    let sent: Value = serde_json::from_slice(body).expect("json body");
    assert_eq!(sent["employee"]["external_id"], "E000001");
    stack.stop().await;
}

/// Issue 17, item 3: `write_once` accepted any manifest already at the key whose ids matched
/// and whose chain verified. Evidence is never replaced and never adopted: only a manifest
/// byte for byte equal to what this saga writes is accepted (a crash right after writing it);
/// a different one fails the saga and stays as it is.
#[tokio::test]
async fn a_different_manifest_already_in_s3_fails_the_saga_and_is_kept() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(sim(10, 1), &[]).await;
    let event_id = uuid::Uuid::new_v4().to_string();
    let saga_id = cxone_offboard::event::saga_id("hris://test/acme", &event_id);
    // Someone wrote a manifest for this saga: same ids, a valid chain, other content.
    let earlier = evidence::seal(json!({
        "saga_id": saga_id, "event": {"id": event_id}, "status": "DELETED",
        "steps": [{"name": "resolve", "status": "done"}], "written_by": "someone else",
    }));
    let store = S3::new(&stack.settings.s3).await;
    let key = cxone_offboard::store::keys::manifest("E000002", &saga_id);
    let body = serde_json::to_vec_pretty(&earlier).expect("json");
    let earlier_sha = hex::encode(Sha256::digest(&body));
    store
        .put(
            &key,
            body.into(),
            "application/json",
            cxone_offboard::store::Write::Create,
        )
        .await
        .expect("pre-write");
    stack
        .publish_event(&crate::helpers::termination(&event_id, "E000002"))
        .await;
    let outcomes = stack.tap.wait(1, Duration::from_secs(60)).await;
    let o = &outcomes[0];
    assert_eq!(o["type"], "offboard.saga.failed", "{o}");
    assert_eq!(o["data"]["error"]["step"], "manifest", "{o}");
    assert_eq!(o["data"]["error"]["class"], "permanent", "{o}");
    let message = o["data"]["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("a different manifest already exists"),
        "{message}"
    );
    // Access was revoked all the same, and the evidence there was not overwritten.
    assert!(o["data"]["revoked_at"].is_string());
    let kept = store.get(&key).await.expect("get").expect("manifest");
    assert_eq!(hex::encode(Sha256::digest(&kept.body)), earlier_sha);
    stack.stop().await;
}

#[tokio::test]
async fn a_paging_loop_fails_the_archive_as_permanent() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(sim(5, 250), &[]).await;
    stack
        .sim_post("/_sim/faults", json!({"paging_loop": true}))
        .await;
    stack.terminate("E000001", json!({})).await;
    let outcomes = stack.tap.wait(1, Duration::from_secs(60)).await;
    assert_eq!(outcomes[0]["type"], "offboard.saga.failed");
    assert_eq!(outcomes[0]["data"]["error"]["step"], "archive");
    assert!(
        outcomes[0]["data"]["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("paging loops")
    );
    // Access was still revoked before the archive.
    assert!(outcomes[0]["data"]["revoked_at"].is_string());
    stack.stop().await;
}

#[tokio::test]
async fn manifests_are_written_under_object_lock_when_configured() {
    let _shared = BROKER.read().await;
    let bucket = format!(
        "it-lock-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let plain = crate::helpers::Names::new().settings(&[]);
    let client = cxone_offboard::store::client(&plain.s3).await;
    client
        .create_bucket()
        .bucket(&bucket)
        .object_lock_enabled_for_bucket(true)
        .send()
        .await
        .expect("bucket with object lock");
    let stack = Stack::start(
        sim(3, 2),
        &[
            ("OFFBOARD__S3__BUCKET", bucket.as_str()),
            ("OFFBOARD__S3__OBJECT_LOCK_MODE", "GOVERNANCE"),
            ("OFFBOARD__S3__OBJECT_LOCK_DAYS", "30"),
        ],
    )
    .await;
    stack.terminate("E000001", json!({})).await;
    let outcomes = stack.tap.wait(1, Duration::from_secs(60)).await;
    assert_eq!(
        outcomes[0]["type"], "offboard.saga.completed",
        "{}",
        outcomes[0]
    );
    let uri = outcomes[0]["data"]["manifest"]["uri"]
        .as_str()
        .expect("uri");
    let key = uri
        .strip_prefix(&format!("s3://{bucket}/"))
        .expect("in the lock bucket");
    let head = client
        .head_object()
        .bucket(&bucket)
        .key(key)
        .send()
        .await
        .expect("head manifest");
    assert_eq!(
        head.object_lock_mode().map(|m| m.as_str()),
        Some("GOVERNANCE")
    );
    let until = head
        .object_lock_retain_until_date()
        .expect("retention date");
    let days = (until.secs() - chrono::Utc::now().timestamp()) / 86_400;
    assert!((29..=30).contains(&days), "{days}");
    stack.stop().await;
}
