//! Issue 17: the trust boundary and the hardening items, each against the real broker, S3
//! server and simulator (or a small fake server where the failure is the server's).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use cxone_offboard::broker::headers;
use cxone_offboard::cxone::{Client, Cxone};
use cxone_offboard::metrics::Metrics;
use cxone_offboard::sim::SimOptions;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::helpers::{
    BROKER, Names, Recorder, Stack, connect, eventually, metric, metrics_text,
    spawn_worker_with_pause, termination, wait_parked,
};

fn sim(users: u64) -> SimOptions {
    SimOptions {
        users,
        interactions_per_user: 2,
        ..SimOptions::default()
    }
}

async fn readyz_text(stack: &Stack) -> (u16, String) {
    let r = reqwest::get(format!("{}/readyz", stack.worker.base))
        .await
        .expect("readyz");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

fn of_type<'a>(outcomes: &'a [Value], ty: &str) -> Vec<&'a Value> {
    outcomes.iter().filter(|o| o["type"] == ty).collect()
}

/// A server that records every request it gets.
async fn recorder_server() -> (String, Arc<Mutex<Vec<String>>>) {
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = got.clone();
    let app = Router::new().fallback(move |req: axum::extract::Request| {
        let sink = sink.clone();
        async move {
            sink.lock()
                .await
                .push(format!("{} {}", req.method(), req.uri()));
            StatusCode::OK
        }
    });
    serve(app)
        .await
        .map(move |base| (base, got))
        .expect("serves")
}

async fn serve(app: Router) -> std::io::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(format!("http://{addr}"))
}

/// Item 4: the CXone client followed redirects, so a 307 from the auth host re-posted the
/// access key secret to wherever it pointed.
#[tokio::test]
async fn a_redirect_from_the_token_endpoint_is_not_followed() {
    let (elsewhere, got) = recorder_server().await;
    let target = format!("{elsewhere}/collect");
    let redirector = serve(Router::new().fallback(move || {
        let target = target.clone();
        async move {
            (
                StatusCode::TEMPORARY_REDIRECT,
                [(axum::http::header::LOCATION, target)],
            )
                .into_response()
        }
    }))
    .await
    .expect("serves");
    let names = Names::new();
    let settings = names.settings(&[
        ("OFFBOARD__CXONE__ISSUER", redirector.as_str()),
        ("OFFBOARD__CXONE__AUTH_BASE_URL", redirector.as_str()),
        ("OFFBOARD__CXONE__API_BASE_URL", redirector.as_str()),
        ("OFFBOARD__CXONE__ACCESS_KEY_ID", "key-id"),
        (
            "OFFBOARD__CXONE__ACCESS_KEY_SECRET",
            "do-not-leak-this-secret",
        ),
        ("OFFBOARD__CXONE__MAX_ATTEMPTS", "1"),
    ]);
    let client = Client::new(&settings.cxone, Metrics::new()).expect("client");
    let err = client.connect().await.expect_err("a redirect is an error");
    let text = err.to_string();
    assert!(text.contains("redirect"), "{text}");
    assert!(!text.contains("do-not-leak-this-secret"), "{text}");
    assert!(
        got.lock().await.is_empty(),
        "nothing reached the other host"
    );
    // An API call redirected elsewhere is not followed either (it carries the bearer token).
    assert!(client.get_agent("1001").await.is_err());
    assert!(got.lock().await.is_empty(), "{:?}", got.lock().await);
}

/// Item 8: token-endpoint failures bypassed the breaker, so an auth outage burned every saga's
/// retries into the dead-letter queue. They count now: the circuit opens, intake pauses, and
/// the sagas finish once the tenant is back.
#[tokio::test]
async fn an_auth_outage_opens_the_circuit_instead_of_dead_lettering() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(
        sim(5),
        &[
            ("OFFBOARD__WORKER__RETRY_DELAYS_SECS", "1,2"),
            ("OFFBOARD__CXONE__BREAKER_FAILURE_THRESHOLD", "3"),
            ("OFFBOARD__CXONE__BREAKER_OPEN_SECS", "1"),
            ("OFFBOARD__CXONE__MAX_ATTEMPTS", "2"),
        ],
    )
    .await;
    stack
        .sim_post("/_sim/faults", json!({"token_status": 503}))
        .await;
    for n in 1..=5 {
        stack.terminate(&format!("E{n:06}"), json!({})).await;
    }
    let (status, text) = eventually(
        "intake paused by the circuit",
        Duration::from_secs(30),
        || async {
            let (status, text) = readyz_text(&stack).await;
            text.contains("circuit open").then_some((status, text))
        },
    )
    .await;
    assert_eq!(status, 200, "still ready: {text}");
    stack.sim_post("/_sim/faults", json!({})).await;
    let outcomes = stack.tap.wait(5, Duration::from_secs(90)).await;
    assert_eq!(
        of_type(&outcomes, "offboard.saga.completed").len(),
        5,
        "{outcomes:#?}"
    );
    assert_eq!(stack.outside.queue_len(&stack.names.dead()).await, 0);
    stack.stop().await;
}

/// Item 8: a 401/403 from the token endpoint (a rotated key) failed the whole queue as
/// permanent within seconds. Now intake pauses, readiness stays, a metric and an error log say
/// what to fix, no saga fails, and the worker resumes by itself once the key works.
#[tokio::test]
async fn a_refused_access_key_pauses_intake_and_fails_no_saga() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(sim(3), &[("OFFBOARD__CXONE__CREDENTIALS_RETRY_SECS", "1")]).await;
    stack
        .sim_post("/_sim/faults", json!({"token_status": 401}))
        .await;
    for n in 1..=3 {
        stack.terminate(&format!("E{n:06}"), json!({})).await;
    }
    let (status, text) = eventually(
        "intake paused for the key",
        Duration::from_secs(30),
        || async {
            let (status, text) = readyz_text(&stack).await;
            text.contains("refused the access key")
                .then_some((status, text))
        },
    )
    .await;
    assert_eq!(status, 200, "still ready: {text}");
    let m = metrics_text(&stack.worker.base).await;
    assert_eq!(
        metric(&m, "offboard_cxone_credentials_rejected "),
        1.0,
        "{m}"
    );
    assert!(
        stack.tap.all().await.is_empty(),
        "no saga failed or finished"
    );
    assert_eq!(stack.outside.queue_len(&stack.names.dead()).await, 0);
    // The key is fixed (rotated back): intake resumes without a restart.
    stack.sim_post("/_sim/faults", json!({})).await;
    let outcomes = stack.tap.wait(3, Duration::from_secs(60)).await;
    assert_eq!(
        of_type(&outcomes, "offboard.saga.completed").len(),
        3,
        "{outcomes:#?}"
    );
    let m = metrics_text(&stack.worker.base).await;
    assert_eq!(
        metric(&m, "offboard_cxone_credentials_rejected "),
        0.0,
        "{m}"
    );
    stack.stop().await;
}

/// Item 11: a `Retry-After` of an hour paused the whole process for an hour and skipped the
/// step's time budget. One 429 now pauses at most `max_retry_after_secs`, and a pause longer
/// than the budget ends the call.
#[tokio::test]
async fn an_hour_long_retry_after_pauses_a_bounded_time() {
    let sim = cxone_offboard::sim::spawn(sim(2), "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("sim");
    let names = Names::new();
    let mut env = Stack::sim_env(&sim);
    env.extend(
        [
            ("OFFBOARD__CXONE__RATE_LIMIT__MAX_RETRY_AFTER_SECS", "2"),
            ("OFFBOARD__CXONE__MAX_RETRY_ELAPSED_SECS", "5"),
            ("OFFBOARD__CXONE__MAX_ATTEMPTS", "20"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let settings = names.settings(&pairs);
    let client = Client::new(&settings.cxone, Metrics::new()).expect("client");
    client.get_agent("1001").await.expect("warm up");
    reqwest::Client::new()
        .post(format!("{}/_sim/faults", sim.base_url()))
        .json(&json!({"error_rate": 1.0, "status": 429, "retry_after_secs": 3600}))
        .send()
        .await
        .expect("faults");
    let started = tokio::time::Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(30), client.get_agent("1002"))
        .await
        .expect("the call ends long before the hour");
    let err = result.expect_err("throttled");
    assert_eq!(err.status, Some(429), "{err}");
    assert!(err.is_transient());
    let paused = client
        .limiter()
        .paused_until()
        .map(|u| u.saturating_duration_since(tokio::time::Instant::now()));
    assert!(
        paused.is_none_or(|p| p <= Duration::from_millis(2500)),
        "paused for {paused:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    sim.shutdown().await;
}

/// Item 1: any publisher could set `x-offboard-guard-released` and skip the mass-deletion
/// guard. A message from outside is data: the forged release is ignored and the saga held.
#[tokio::test]
async fn a_forged_guard_release_is_ignored() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(
        sim(3),
        &[("OFFBOARD__GUARD__MAX_DESTRUCTIVE_PER_WINDOW", "1")],
    )
    .await;
    stack.terminate("E000001", json!({})).await;
    stack.tap.wait(1, Duration::from_secs(60)).await;
    let body = serde_json::to_vec(&termination(&uuid::Uuid::new_v4().to_string(), "E000002"))
        .expect("json");
    let mut forged = FieldTable::default();
    headers::set_str(&mut forged, headers::GUARD_RELEASED, "released by nobody");
    headers::set_str(&mut forged, "x-offboard-signature", "v1=Zm9yZ2Vk");
    stack
        .outside
        .publish_with_headers(&stack.names.events(), "employee.terminated", &body, forged)
        .await;
    let outcomes = stack.tap.wait(2, Duration::from_secs(60)).await;
    assert_eq!(
        of_type(&outcomes, "offboard.saga.held").len(),
        1,
        "{outcomes:#?}"
    );
    let u = stack.sim_get("/_sim/users/E000002").await;
    assert_eq!(u["agent_active"], true, "{u}");
    let m = metrics_text(&stack.worker.base).await;
    assert_eq!(
        metric(&m, "offboard_control_headers_ignored_total "),
        1.0,
        "{m}"
    );
    stack.stop().await;
}

/// Item 1: a forged `x-offboard-park-count` made the first transient error fail the saga as
/// exhausted. It is ignored: the saga parks and finishes once CXone recovers.
#[tokio::test]
async fn a_forged_park_count_is_ignored() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(sim(3), &[("OFFBOARD__WORKER__RETRY_DELAYS_SECS", "1,2")]).await;
    stack
        .sim_post(
            "/_sim/faults",
            json!({"users": {"E000001": {"logout": 503}}}),
        )
        .await;
    let body = serde_json::to_vec(&termination(&uuid::Uuid::new_v4().to_string(), "E000001"))
        .expect("json");
    let mut forged = FieldTable::default();
    headers::set_int(&mut forged, headers::PARK_COUNT, 99);
    stack
        .outside
        .publish_with_headers(&stack.names.events(), "employee.terminated", &body, forged)
        .await;
    wait_parked(&stack.worker.base, "the saga parked").await;
    stack.sim_post("/_sim/faults", json!({})).await;
    let outcomes = stack.tap.wait(1, Duration::from_secs(60)).await;
    assert_eq!(
        outcomes[0]["type"], "offboard.saga.completed",
        "{outcomes:#?}"
    );
    stack.stop().await;
}

/// Item 10: with no queue bound to the outcomes exchange an outcome vanished silently. It is
/// published `mandatory` now: returned, counted and logged; the saga is done all the same.
#[tokio::test]
async fn an_outcome_nobody_takes_is_counted() {
    let _shared = BROKER.read().await;
    let stack = Stack::start_with(sim(2), &[], false).await;
    let id = stack.terminate("E000001", json!({})).await;
    let base = stack.worker.base.clone();
    eventually(
        "the unroutable outcome counted",
        Duration::from_secs(60),
        || async {
            let m = metrics_text(&base).await;
            (metric(
                &m,
                "offboard_outcomes_unroutable_total{routing_key=\"saga.completed\"}",
            ) >= 1.0)
                .then_some(())
        },
    )
    .await;
    let saga = cxone_offboard::event::saga_id("hris://test/acme", &id);
    let store = cxone_offboard::store::S3::new(&stack.settings.s3).await;
    let j = cxone_offboard::saga::journal::load(&store, &saga)
        .await
        .expect("load")
        .expect("journal");
    assert_eq!(
        j.journal.state,
        cxone_offboard::saga::journal::SagaState::Completed
    );
    assert_eq!(stack.outside.queue_len(&stack.names.dead()).await, 0);
    stack.stop().await;
}

/// Item 7: a worker pausing intake (the circuit open) waited for its in-flight sagas without
/// a limit and ignored SIGTERM. Shutdown is honoured there: the grace, no more.
#[tokio::test]
async fn shutdown_is_honoured_while_intake_is_paused() {
    let _shared = BROKER.read().await;
    let names = Names::new();
    let recorder = Arc::new(Recorder {
        slow_delay: Duration::from_secs(60),
        ..Recorder::default()
    });
    let settings = names.settings(&[("OFFBOARD__WORKER__SHUTDOWN_GRACE_SECS", "2")]);
    let (pause_tx, pause_rx) = tokio::sync::watch::channel(None);
    let worker = spawn_worker_with_pause(settings, recorder.clone(), Some(pause_rx)).await;
    assert!(worker.wait_ready(200, Duration::from_secs(10)).await);
    let outside = crate::helpers::Outside::new().await;
    let body = serde_json::to_vec(&termination("slow-1", "E000001")).expect("json");
    outside
        .publish(&names.events(), "employee.terminated", &body, None)
        .await;
    eventually(
        "the slow saga in flight",
        Duration::from_secs(10),
        || async { (!recorder.seen.lock().await.is_empty()).then_some(()) },
    )
    .await;
    pause_tx.send_replace(Some("test pause".to_owned()));
    let stopping = tokio::time::Instant::now();
    worker.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), worker.running.wait())
        .await
        .expect("stops within the grace, not after the 60 s saga")
        .expect("clean stop");
    assert!(stopping.elapsed() < Duration::from_secs(15));
    // The unfinished message went back to the queue.
    assert_eq!(
        outside
            .wait_len(&names.requests(), 1, Duration::from_secs(10))
            .await,
        1
    );
    names.cleanup().await;
}

/// Item 7: S3 had no operation timeout: a server that stops answering held a saga (and one of
/// the request slots) forever. The request times out (transient) and the saga parks.
#[tokio::test]
async fn faults_s3_that_stops_answering_parks_the_saga() {
    let _shared = BROKER.read().await;
    let s3 = crate::chaos::OwnS3::start().await;
    let stack = Stack::start(
        sim(2),
        &[
            ("OFFBOARD__S3__ENDPOINT", s3.endpoint.as_str()),
            ("OFFBOARD__S3__READ_TIMEOUT_SECS", "2"),
            ("OFFBOARD__S3__ATTEMPT_TIMEOUT_SECS", "3"),
            ("OFFBOARD__S3__OPERATION_TIMEOUT_SECS", "4"),
            ("OFFBOARD__WORKER__RETRY_DELAYS_SECS", "1,2,4,8,16"),
        ],
    )
    .await;
    s3.freeze();
    stack.terminate("E000001", json!({})).await;
    wait_parked(&stack.worker.base, "the saga parked while S3 is frozen").await;
    s3.thaw();
    let outcomes = stack.tap.wait(1, Duration::from_secs(90)).await;
    assert_eq!(
        outcomes[0]["type"], "offboard.saga.completed",
        "{outcomes:#?}"
    );
    stack.stop().await;
}

/// Item 9: a publisher channel that died was never noticed: sagas ran, could not publish,
/// requeued and looped to the delivery limit. The session now reconnects (and declares the
/// topology again) when its publisher dies.
#[tokio::test]
async fn a_dead_publisher_channel_is_replaced() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(sim(2), &[]).await;
    // Publishing to a deleted exchange closes the worker's publisher channel.
    let conn = connect().await.expect("broker");
    let ch = conn.create_channel().await.expect("channel");
    ch.exchange_delete(stack.names.outcomes().as_str().into(), Default::default())
        .await
        .expect("delete the outcomes exchange");
    stack.terminate("E000001", json!({})).await;
    // The worker reconnects and declares the exchange again ...
    let check = conn.create_channel().await.expect("channel");
    let exchange = stack.names.outcomes();
    eventually(
        "the outcomes exchange declared again",
        Duration::from_secs(60),
        || async {
            let probe = conn.create_channel().await.ok()?;
            probe
                .exchange_declare(
                    exchange.as_str().into(),
                    lapin::ExchangeKind::Topic,
                    lapin::options::ExchangeDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .ok()
        },
    )
    .await;
    let _ = check.close(200, "".into()).await;
    // ... and the saga's outcome is published again on the new connection (to the new exchange,
    // which nothing is bound to yet: returned and counted).
    let base = stack.worker.base.clone();
    eventually(
        "the outcome published again",
        Duration::from_secs(90),
        || async {
            let m = metrics_text(&base).await;
            (metric(
                &m,
                "offboard_outcomes_unroutable_total{routing_key=\"saga.completed\"}",
            ) >= 1.0)
                .then_some(())
        },
    )
    .await;
    let m = metrics_text(&stack.worker.base).await;
    assert!(
        metric(&m, "offboard_broker_reconnects_total ") >= 1.0,
        "{m}"
    );
    assert_eq!(stack.outside.queue_len(&stack.names.dead()).await, 0);
    let _ = conn.close(200, "".into()).await;
    stack.stop().await;
}

/// Item 6: the delay queues were classic queues with at-most-once dead-lettering: a scheduled
/// termination waiting weeks was lost with a broker node. They are quorum queues now, and the
/// classic ones of an earlier version are drained into the work queue at start-up.
#[tokio::test]
async fn delay_queues_are_quorum_and_classic_ones_are_migrated() {
    let _exclusive = BROKER.write().await;
    let names = Names::new();
    // What an earlier version left: a classic delay queue holding a saga for an hour.
    let conn = connect().await.expect("broker");
    let ch = conn.create_channel().await.expect("channel");
    let classic = format!("{}offboard.delay.3600s", names.prefix);
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-message-ttl"),
        AMQPValue::LongLongInt(3_600_000),
    );
    args.insert(
        ShortString::from("x-dead-letter-exchange"),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        ShortString::from("x-dead-letter-routing-key"),
        AMQPValue::LongString(names.requests().as_str().into()),
    );
    ch.queue_declare(
        classic.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await
    .expect("classic delay queue");
    let outside = crate::helpers::Outside::new().await;
    let id = uuid::Uuid::new_v4().to_string();
    let body = serde_json::to_vec(&termination(&id, "E000001")).expect("json");
    outside
        .publish("", &classic, &body, Some("application/cloudevents+json"))
        .await;
    let stack = Stack::start_on(names.clone(), sim(2), &[]).await;
    let outcomes = stack.tap.wait(1, Duration::from_secs(60)).await;
    assert_eq!(
        outcomes.first().map(|o| o["type"].clone()),
        Some(serde_json::json!("offboard.saga.completed")),
        "moved, not waiting an hour: {outcomes:#?}"
    );
    // The classic queue is gone.
    let gone = conn.create_channel().await.expect("channel");
    assert!(
        gone.queue_declare(
            classic.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .is_err(),
        "the classic queue was deleted once empty"
    );
    // A saga parks: its delay queue is declared on first use, as a quorum queue.
    stack
        .sim_post(
            "/_sim/faults",
            json!({"users": {"E000002": {"logout": 503}}}),
        )
        .await;
    stack.terminate("E000002", json!({})).await;
    wait_parked(&stack.worker.base, "the saga parked").await;
    stack.sim_post("/_sim/faults", json!({})).await;
    stack.tap.wait(2, Duration::from_secs(60)).await;
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "--no-table-headers", "name", "type"])
        .output()
        .expect("rabbitmqctl");
    let listing = String::from_utf8_lossy(&out.stdout);
    let delays: Vec<&str> = listing
        .lines()
        .filter(|l| l.starts_with(&format!("{}offboard.delay.", names.prefix)))
        .collect();
    assert!(!delays.is_empty(), "{listing}");
    for line in delays {
        assert!(line.ends_with("quorum"), "{line}");
    }
    let _ = ch
        .queue_delete(classic.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "".into()).await;
    stack.stop().await;
}

/// A fake S3 server that ignores every precondition (and stores nothing).
async fn careless_s3() -> String {
    let app = Router::new().fallback(|req: axum::extract::Request| async move {
        match *req.method() {
            // The bucket exists; no key does.
            axum::http::Method::HEAD
                if req.uri().path().trim_matches('/').split('/').count() == 1 =>
            {
                StatusCode::OK.into_response()
            }
            axum::http::Method::GET | axum::http::Method::HEAD => (
                StatusCode::NOT_FOUND,
                [("content-type", "application/xml")],
                "<?xml version=\"1.0\"?><Error><Code>NoSuchKey</Code><Message>no</Message></Error>",
            )
                .into_response(),
            axum::http::Method::POST => (
                StatusCode::OK,
                [("content-type", "application/xml")],
                "<?xml version=\"1.0\"?><InitiateMultipartUploadResult><Bucket>b</Bucket><Key>k</Key><UploadId>u1</UploadId></InitiateMultipartUploadResult>",
            )
                .into_response(),
            axum::http::Method::DELETE => StatusCode::NO_CONTENT.into_response(),
            _ => (StatusCode::OK, [("etag", "\"1\"")]).into_response(),
        }
    });
    serve(app).await.expect("serves")
}

/// Item 13: a store that ignores conditional writes (fencing, the guard and write-once
/// manifests depend on them) was used as if it did not. The worker refuses to start on it,
/// naming what the store does; `check` names it too.
#[tokio::test]
async fn a_store_that_ignores_conditional_writes_is_refused() {
    let endpoint = careless_s3().await;
    let names = Names::new();
    let worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_cxone-offboard"))
        .arg("worker")
        .envs(names.env())
        .env("OFFBOARD__S3__ENDPOINT", &endpoint)
        .env("OFFBOARD__CXONE__ACCESS_KEY_ID", "k")
        .env("OFFBOARD__CXONE__ACCESS_KEY_SECRET", "s")
        .env("OFFBOARD__CXONE__API_BASE_URL", "http://127.0.0.1:9")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), worker)
        .await
        .expect("exits")
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("ignores `If-None-Match: *`"), "{stderr}");
    let check = tokio::process::Command::new(env!("CARGO_BIN_EXE_cxone-offboard"))
        .arg("check")
        .envs(names.env())
        .env("OFFBOARD__S3__ENDPOINT", &endpoint)
        .env("OFFBOARD__CXONE__ACCESS_KEY_ID", "k")
        .env("OFFBOARD__CXONE__ACCESS_KEY_SECRET", "s")
        .env("OFFBOARD__CXONE__API_BASE_URL", "http://127.0.0.1:9")
        .output()
        .await
        .expect("check runs");
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("ignores `If-None-Match: *`"), "{stdout}");
    assert!(stdout.contains("ignores `If-Match`"), "{stdout}");
}

async fn run_cli(args: &[&str], env: &[(&str, &str)], unset: &[&str]) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_cxone-offboard"));
    cmd.args(args).envs(env.iter().copied());
    for k in unset {
        cmd.env_remove(k);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("finishes")
        .expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Item 14: when something outside fails an operator reads one line that says what and what
/// to do — not the AWS SDK's debug structures, not lapin's log lines, not a cause said twice.
#[tokio::test]
async fn errors_people_read_are_one_line() {
    let no_creds = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"];
    let s3 = [
        ("OFFBOARD__S3__ENDPOINT", "http://127.0.0.1:9000"),
        ("AWS_CONFIG_FILE", "/nonexistent"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
    ];
    let noise = [
        "DispatchFailure",
        "ConnectorError",
        "SdkError",
        "{ ",
        "lapin::",
    ];
    // `check` without AWS credentials: a line per check, the S3 one saying what to set.
    let (code, stdout, stderr) = run_cli(&["check"], &s3, &no_creds).await;
    assert_eq!(code, 1, "{stdout}{stderr}");
    let s3_line = stdout
        .lines()
        .find(|l| l.starts_with("s3 "))
        .unwrap_or_default();
    assert!(
        s3_line.contains("no AWS credentials: set AWS_ACCESS_KEY_ID"),
        "{stdout}"
    );
    for n in noise {
        assert!(
            !stdout.contains(n) && !stderr.contains(n),
            "{n}: {stdout}{stderr}"
        );
    }
    // `guard status` without AWS credentials: one line on stderr.
    let (code, _, stderr) = run_cli(&["guard", "status"], &s3, &no_creds).await;
    assert_eq!(code, 1);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no AWS credentials"), "{stderr}");
    // `dlq list` with the broker down: one line, the cause once.
    let (code, _, stderr) = run_cli(
        &["dlq", "list"],
        &[(
            "OFFBOARD__AMQP__URL",
            "amqp://guest:secret-pw@127.0.0.1:9/%2f",
        )],
        &[],
    )
    .await;
    assert_eq!(code, 1);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert_eq!(stderr.matches("Connection refused").count(), 1, "{stderr}");
    assert!(!stderr.contains("secret-pw"), "{stderr}");
}

/// A lease check on a broker node that keeps its connection open and answers nothing (frozen,
/// partitioned) gives up within its bound and the next check starts on a new connection.
/// It used to wait for the AMQP heartbeat (60 s or more), and every lease check of the
/// process queued behind it.
#[tokio::test]
async fn a_lease_check_on_a_silent_broker_gives_up_and_the_next_one_reconnects() {
    use cxone_offboard::broker::sessions::{ANSWER_WITHIN, BrokerSessions};
    use cxone_offboard::saga::ports::Sessions;
    let _shared = BROKER.read().await;
    let relay = crate::helpers::Relay::start(0).await;
    let names = Names::new();
    let settings = names.settings(&[("OFFBOARD__AMQP__URL", relay.url().as_str())]);
    let sessions = BrokerSessions::new(Arc::new(settings.amqp.clone()));
    assert_eq!(sessions.alive("nobody").await, Ok(false), "a gone session");
    let accepted = || relay.accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(accepted(), 1);
    relay.freeze();
    // Two checks at once: the one asking and the one queued behind it both give up, well
    // below the heartbeat's minute and well above the check's own bound.
    let (first, second) = tokio::time::timeout(
        ANSWER_WITHIN * 4,
        futures_util::future::join(sessions.alive("nobody"), sessions.alive("other")),
    )
    .await
    .expect("the checks give up by themselves");
    assert!(first.is_err(), "a silent broker is no answer: {first:?}");
    assert!(second.is_err(), "nor for the check behind it: {second:?}");
    relay.thaw();
    assert_eq!(
        sessions.alive("nobody").await,
        Ok(false),
        "answered again once the broker speaks"
    );
    // (The check queued behind may have tried a connection of its own while frozen.)
    assert!(
        accepted() >= 2,
        "on a new connection, not the one that fell silent"
    );
}
