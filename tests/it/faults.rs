//! The CXone fault matrix (issue 11): the whole worker (broker, S3, saga) against the simulator
//! with one fault class at a time. Each run ends with every saga completed or failed with the
//! right class, nothing lost or left in a queue; the breaker opens on an outage and closes.

use std::collections::BTreeMap;
use std::time::Duration;

use cxone_offboard::sim::{RetryAfter, SimOptions};
use serde_json::{Value, json};

use crate::chaos::{Figures, is_terminal};
use crate::helpers::{BROKER, Stack, metrics_text, until};

fn sim(users: u64) -> SimOptions {
    SimOptions {
        users,
        interactions_per_user: 150,
        ..SimOptions::default()
    }
}

/// Fast retries so a case takes seconds: 3 in-call attempts, parks of 1 and 2 s.
const FAST: [(&str, &str); 5] = [
    ("OFFBOARD__CXONE__MAX_ATTEMPTS", "3"),
    ("OFFBOARD__CXONE__MAX_RETRY_ELAPSED_SECS", "5"),
    ("OFFBOARD__CXONE__REQUEST_TIMEOUT_SECS", "1"),
    ("OFFBOARD__WORKER__RETRY_DELAYS_SECS", "1,2,4"),
    ("OFFBOARD__CXONE__BREAKER_FAILURE_THRESHOLD", "1000"),
];

fn with<'a>(more: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut v: Vec<(&str, &str)> = FAST.to_vec();
    for (k, val) in more {
        v.retain(|(key, _)| key != k);
        v.push((k, val));
    }
    v
}

async fn publish_all(stack: &Stack, n: u64) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 1..=n {
        ids.push(stack.terminate(&format!("E{i:06}"), json!({})).await);
    }
    ids
}

/// Waits for one terminal outcome per event; returns the terminal outcomes by event id.
async fn terminal(stack: &Stack, ids: &[String], within: Duration) -> BTreeMap<String, Value> {
    until(
        within,
        || async {
            stack
                .tap
                .all()
                .await
                .into_iter()
                .filter(is_terminal)
                .filter_map(|o| Some((o["data"]["event_id"].as_str()?.to_owned(), o)))
                .collect::<BTreeMap<String, Value>>()
        },
        |got| ids.iter().all(|i| got.contains_key(i)),
    )
    .await
}

/// Counts and checks a finished case, reports it, stops the stack.
async fn finish(
    stack: Stack,
    name: &str,
    ids: &[String],
    got: &BTreeMap<String, Value>,
) -> (Figures, Value) {
    let stats = stack.sim_get("/_sim/stats").await;
    let all = stack.tap.all().await;
    let mut f = Figures {
        scenario: format!("faults/{name}"),
        events: ids.len(),
        outcome_messages: all.len(),
        lost: ids.iter().filter(|i| !got.contains_key(*i)).count(),
        completed: got
            .values()
            .filter(|o| o["type"] == "offboard.saga.completed")
            .count(),
        failed: got
            .values()
            .filter(|o| o["type"] == "offboard.saga.failed")
            .count(),
        cxone_requests: stats["total"].as_u64().unwrap_or(0),
        workers: 1,
        ..Figures::default()
    };
    let distinct: std::collections::BTreeSet<&str> =
        all.iter().filter_map(|o| o["id"].as_str()).collect();
    f.distinct_outcome_ids = distinct.len();
    f.duplicated = all.len() - distinct.len();
    // A failed saga's dead letter follows its outcome: wait for one per failure.
    let failed = u32::try_from(f.failed).unwrap_or(u32::MAX);
    f.dead_lettered = u64::from(
        stack
            .outside
            .wait_len(&stack.names.dead(), failed, Duration::from_secs(10))
            .await,
    );
    f.stuck = u64::from(stack.outside.queue_len(&stack.names.requests()).await)
        + u64::from(stack.outside.queue_len(&stack.names.held()).await)
        + u64::from(stack.outside.queue_len(&stack.names.housekeeping()).await);
    f.report();
    for o in got.values().filter(|o| o["type"] == "offboard.saga.failed") {
        println!("{name}: failed: {}", o["data"]["error"]);
    }
    println!("sim stats for {name}: {stats}");
    stack.stop().await;
    assert_eq!(f.lost, 0, "{name}: {f:?}");
    assert_eq!(f.stuck, 0, "{name}: {f:?}");
    (f, stats)
}

fn throttled(stats: &Value) -> u64 {
    stats["throttled"].as_u64().unwrap_or(0)
}

async fn storm(retry_after: RetryAfter, name: &str) {
    let _shared = BROKER.read().await;
    // The tenant admits 15 requests/s; the worker believes it may send 2000/s.
    let stack = Stack::start(
        SimOptions {
            rate_limit: Some(15.0),
            burst: 3,
            retry_after,
            ..sim(8)
        },
        &with(&[
            ("OFFBOARD__CXONE__MAX_ATTEMPTS", "8"),
            ("OFFBOARD__CXONE__MAX_RETRY_ELAPSED_SECS", "30"),
        ]),
    )
    .await;
    let ids = publish_all(&stack, 8).await;
    let got = terminal(&stack, &ids, Duration::from_secs(120)).await;
    let (f, stats) = finish(stack, name, &ids, &got).await;
    assert!(throttled(&stats) > 0, "a storm happened: {stats}");
    assert_eq!(f.completed, 8, "every saga rides out the storm: {f:?}");
}

#[tokio::test]
async fn faults_429_storm_with_retry_after() {
    storm(RetryAfter::Seconds, "429-storm-retry-after").await;
}

#[tokio::test]
async fn faults_429_storm_without_retry_after() {
    storm(RetryAfter::None, "429-storm-no-retry-after").await;
}

#[tokio::test]
async fn faults_5xx_at_20_percent() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(sim(20), &with(&[])).await;
    stack
        .sim_post("/_sim/faults", json!({"error_rate": 0.2, "status": 503}))
        .await;
    let ids = publish_all(&stack, 20).await;
    let got = terminal(&stack, &ids, Duration::from_secs(120)).await;
    let (f, stats) = finish(stack, "5xx-20pct", &ids, &got).await;
    let n503: u64 = stats["by_route"]
        .as_object()
        .map(|m| m.values().filter_map(|s| s["503"].as_u64()).sum())
        .unwrap_or(0);
    assert!(n503 > 10, "faults were injected: {stats}");
    assert_eq!(f.completed, 20, "{f:?}");
    assert_eq!(f.dead_lettered, 0, "{f:?}");
}

#[tokio::test]
async fn faults_timeouts_recover_and_persistent_ones_fail_as_exhausted() {
    let _shared = BROKER.read().await;
    let logout = "POST /inContactAPI/services/{version}/agents/{agentId}/logout";
    let stack = Stack::start(sim(6), &with(&[])).await;
    // Every logout times out (1.5 s answer, 1 s timeout) ...
    stack
        .sim_post(
            "/_sim/faults",
            json!({"latency_ms": 1500, "routes": [logout]}),
        )
        .await;
    let first = publish_all(&stack, 3).await;
    // ... until it has been tried a few times; then the tenant recovers.
    // ... each tried more than once (a timed-out call answers nothing: status 0) ...
    let timeouts = format!(
        "offboard_cxone_requests_total{{route=\"{}\",status=\"0\",class=\"revoke\"}}",
        logout.trim_start_matches("POST ")
    );
    let count = |text: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(&timeouts))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    let base = stack.worker.base.clone();
    let seen = until(
        Duration::from_secs(30),
        || async { count(&metrics_text(&base).await) },
        |n| *n >= 6,
    )
    .await;
    assert!(seen >= 6, "logouts timed out {seen} times");
    assert!(
        stack.tap.all().await.is_empty(),
        "nothing finished while timing out"
    );
    stack.sim_post("/_sim/faults", json!({})).await;
    let got = terminal(&stack, &first, Duration::from_secs(60)).await;
    assert!(
        got.values().all(|o| o["type"] == "offboard.saga.completed"),
        "{got:?}"
    );
    // A timeout that never ends: the saga fails as exhausted at logout, and is dead-lettered.
    stack
        .sim_post(
            "/_sim/faults",
            json!({"latency_ms": 1500, "routes": [logout]}),
        )
        .await;
    let id = stack.terminate("E000006", json!({})).await;
    let last = terminal(&stack, std::slice::from_ref(&id), Duration::from_secs(90)).await;
    let o = &last[&id];
    assert_eq!(o["type"], "offboard.saga.failed", "{o}");
    assert_eq!(o["data"]["error"]["step"], "logout", "{o}");
    assert_eq!(o["data"]["error"]["class"], "exhausted", "{o}");
    let mut all = first.clone();
    all.push(id);
    let mut got = got;
    got.extend(last);
    let (f, _) = finish(stack, "timeouts", &all, &got).await;
    assert_eq!((f.completed, f.failed, f.dead_lettered), (3, 1, 1), "{f:?}");
}

#[tokio::test]
async fn faults_token_expiry_every_two_seconds_and_revocation() {
    let _shared = BROKER.read().await;
    // The "every 30 s", compressed: tokens live 2 s, the run lasts ~8 s.
    let stack = Stack::start(
        SimOptions {
            token_ttl: Duration::from_secs(2),
            ..sim(30)
        },
        &with(&[
            ("OFFBOARD__CXONE__RATE_LIMIT__REQUESTS_PER_SECOND", "60"),
            // A small burst, so the run really lasts several token lifetimes (~6 s).
            ("OFFBOARD__CXONE__RATE_LIMIT__BURST", "5"),
        ]),
    )
    .await;
    let ids = publish_all(&stack, 30).await;
    // Mid-run: some sagas finished, most not yet.
    let early = terminal(&stack, &ids[..3], Duration::from_secs(60)).await;
    assert!(early.len() < ids.len(), "revoked mid-run");
    stack
        .sim_post("/_sim/faults", json!({"revoke_tokens": true}))
        .await;
    let got = terminal(&stack, &ids, Duration::from_secs(120)).await;
    let (f, stats) = finish(stack, "token-expiry", &ids, &got).await;
    let tokens: u64 = stats["by_route"]["POST /authentication/v1/token/access-key"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0);
    assert!(tokens >= 3, "tokens were refreshed ({tokens}): {stats}");
    assert_eq!(f.completed, 30, "{f:?}");
}

#[tokio::test]
async fn faults_malformed_json_is_retried() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(sim(15), &with(&[])).await;
    stack
        .sim_post("/_sim/faults", json!({"malformed_json": 0.2}))
        .await;
    let ids = publish_all(&stack, 15).await;
    let got = terminal(&stack, &ids, Duration::from_secs(120)).await;
    let (f, _) = finish(stack, "malformed-json-20pct", &ids, &got).await;
    // Malformed answers are retried only by parking the whole saga, not in the call (finding 2
    // in RELIABILITY.md): some sagas run out of parks. They must fail as `exhausted`, naming it.
    assert_eq!(f.completed + f.failed, 15, "{f:?}");
    for o in got.values().filter(|o| o["type"] == "offboard.saga.failed") {
        assert_eq!(o["data"]["error"]["class"], "exhausted", "{o}");
        let msg = o["data"]["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains("malformed JSON"), "{o}");
    }
    assert_eq!(f.dead_lettered, f.failed as u64, "{f:?}");
}

#[tokio::test]
async fn faults_paging_loop_fails_the_archive_as_permanent() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(sim(3), &with(&[])).await;
    stack
        .sim_post("/_sim/faults", json!({"paging_loop": true}))
        .await;
    let ids = publish_all(&stack, 3).await;
    let got = terminal(&stack, &ids, Duration::from_secs(60)).await;
    for o in got.values() {
        assert_eq!(o["type"], "offboard.saga.failed", "{o}");
        assert_eq!(o["data"]["error"]["step"], "archive", "{o}");
        assert_eq!(o["data"]["error"]["class"], "permanent", "{o}");
    }
    let (f, _) = finish(stack, "paging-loop", &ids, &got).await;
    assert_eq!((f.failed, f.dead_lettered), (3, 3), "{f:?}");
}

#[tokio::test]
async fn faults_connection_resets_are_retried() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(sim(15), &with(&[])).await;
    stack
        .sim_post("/_sim/faults", json!({"reset_connections": 0.2}))
        .await;
    let ids = publish_all(&stack, 15).await;
    let got = terminal(&stack, &ids, Duration::from_secs(120)).await;
    let resets: u64 = stack.sim_get("/_sim/stats").await["by_route"]
        .as_object()
        .map(|m| m.values().filter_map(|s| s["reset"].as_u64()).sum())
        .unwrap_or(0);
    let (f, _) = finish(stack, "connection-resets-20pct", &ids, &got).await;
    assert!(resets > 0, "resets injected");
    assert_eq!(f.completed, 15, "{f:?}");
    // A reset request never ran, so nothing destructive was repeated.
}

async fn readyz_text(stack: &Stack) -> String {
    match reqwest::get(format!("{}/readyz", stack.worker.base)).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

#[tokio::test]
async fn faults_the_breaker_opens_on_an_outage_and_closes_after_it() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(
        sim(10),
        &with(&[
            ("OFFBOARD__CXONE__BREAKER_FAILURE_THRESHOLD", "5"),
            ("OFFBOARD__CXONE__BREAKER_OPEN_SECS", "1"),
            ("OFFBOARD__WORKER__RETRY_DELAYS_SECS", "1,2,4,8,16"),
        ]),
    )
    .await;
    stack
        .sim_post("/_sim/faults", json!({"error_rate": 1.0, "status": 503}))
        .await;
    let ids = publish_all(&stack, 10).await;
    crate::helpers::eventually(
        "the breaker to open and pause consumption",
        Duration::from_secs(20),
        || async {
            readyz_text(&stack)
                .await
                .contains("circuit open")
                .then_some(())
        },
    )
    .await;
    stack.sim_post("/_sim/faults", json!({})).await;
    let got = terminal(&stack, &ids, Duration::from_secs(90)).await;
    let text = readyz_text(&stack).await;
    assert!(!text.contains("circuit open"), "closed again: {text}");
    let (f, _) = finish(stack, "breaker-outage", &ids, &got).await;
    assert_eq!(f.completed, 10, "{f:?}");
}
