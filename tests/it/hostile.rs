//! Hostile input and security checks (issue 11): a corpus of malicious events that a real worker
//! process must dead-letter as invalid without a single CXone request; secrets that must appear
//! nowhere (logs at debug, outcomes, dead letters, S3 objects, /metrics); outbound connections
//! only to configured hosts; ids percent-encoded; no way to switch TLS verification off.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cxone_offboard::broker::headers;
use cxone_offboard::config::Settings;
use cxone_offboard::event;
use cxone_offboard::sim::{SimOptions, spawn};
use serde_json::{Value, json};

use crate::chaos::{DurableTap, Figures};
use crate::helpers::{BROKER, Names, OutcomeTap, Outside, termination};
use crate::process::WorkerProcess;

/// `(name, body, content type)` of every hostile event; each must be invalid.
pub(crate) fn corpus() -> Vec<(String, Vec<u8>, Option<&'static str>)> {
    let mut out: Vec<(String, Vec<u8>, Option<&'static str>)> = Vec::new();
    let mut push = |name: &str, body: Vec<u8>| out.push((name.to_owned(), body, None));
    let with_ext = |ext: Value| {
        let mut e = termination("hostile-1", "E000001");
        e["data"]["employee"]["external_id"] = ext;
        serde_json::to_vec(&e).expect("json")
    };
    // Path traversal and URL tricks in the employee id (the only id that reaches a CXone URL).
    for (n, ext) in [
        "../x",
        "..",
        ".",
        "a/b",
        "/etc/passwd",
        "..\\x",
        "a\\b",
        "%2e%2e",
        "%2e%2e%2fx",
        "E1%2fx",
        "E1?x=1",
        "E1#frag",
        "E1&agentId=1",
        "E1;x",
        "http://evil.example/x",
        "//evil.example",
        "E1 E2",
        " E1",
        "E1\n",
        "E1\r\nX-Injected: 1",
        "E1\u{0}",
        "Е000001", // Cyrillic Е: a look-alike
        "E1\u{202e}",
        "",
    ]
    .into_iter()
    .enumerate()
    {
        push(&format!("external_id #{n} {ext:?}"), with_ext(json!(ext)));
    }
    push("external_id 129 chars", with_ext(json!("A".repeat(129))));
    push("external_id 100 KiB", with_ext(json!("A".repeat(100_000))));
    push("external_id a number", with_ext(json!(1)));
    push("external_id an array", with_ext(json!(["E000001"])));
    push("external_id an object", with_ext(json!({"$ne": ""})));
    push("external_id null", with_ext(Value::Null));
    // Huge strings and bodies.
    let mut e = termination(&"i".repeat(300_000), "E000001");
    push(
        "300 KB id (over the body limit)",
        serde_json::to_vec(&e).expect("json"),
    );
    e = termination(&"i".repeat(129), "E000001");
    push("event id 129 chars", serde_json::to_vec(&e).expect("json"));
    e = termination("hostile-1", "E000001");
    e["source"] = json!("s".repeat(257));
    push("source 257 chars", serde_json::to_vec(&e).expect("json"));
    e = termination("hostile\u{0}1", "E000001");
    push(
        "NUL in event id (escaped)",
        serde_json::to_vec(&e).expect("json"),
    );
    // Deep nesting.
    let deep = format!(
        "{{\"specversion\":\"1.0\",\"id\":\"d\",\"source\":\"s\",\"type\":\"employee.terminated\",\"data\":{}{}}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    push("10,000-deep array", deep.into_bytes());
    let deep_obj = format!(
        "{}\"employee\":{{\"external_id\":\"E000001\"}}{}",
        "{\"a\":".repeat(5_000),
        "}".repeat(5_000)
    );
    push("5,000-deep object", deep_obj.into_bytes());
    // Encoding.
    let valid = serde_json::to_vec(&termination("hostile-1", "E000001")).expect("json");
    let mut bad = valid.clone();
    bad.insert(10, 0xff);
    push("invalid UTF-8 byte", bad);
    let text = String::from_utf8(valid.clone()).expect("utf8");
    push(
        "invalid UTF-8 inside the external id",
        text.replace("E000001", "E00\u{FFFD}001")
            .into_bytes()
            .into_iter()
            .map(|b| if b == 0xEF { 0xC0 } else { b })
            .collect(),
    );
    push(
        "raw NUL byte in the body",
        text.replacen("{", "{\u{0}", 1).into_bytes(),
    );
    push(
        "raw NUL inside the external id",
        text.replace("E000001", "E00\u{0}0001").into_bytes(),
    );
    let mut bom = vec![0xEF, 0xBB, 0xBF];
    bom.extend_from_slice(&valid);
    push("UTF-8 BOM", bom);
    push(
        "UTF-16 body",
        text.encode_utf16().flat_map(u16::to_le_bytes).collect(),
    );
    push("empty body", Vec::new());
    push("whitespace", b" \n\t ".to_vec());
    push("JSON null", b"null".to_vec());
    push("JSON array", b"[]".to_vec());
    push("truncated JSON", valid[..valid.len() / 2].to_vec());
    push("trailing garbage", [valid.as_slice(), b"}{"].concat());
    // Type and value tricks.
    let mut e = termination("hostile-1", "E000001");
    e["specversion"] = json!("0.3");
    push("specversion 0.3", serde_json::to_vec(&e).expect("json"));
    e = termination("hostile-1", "E000001");
    e["type"] = json!("employee.hired");
    push("unknown type", serde_json::to_vec(&e).expect("json"));
    e = termination("hostile-1", "E000001");
    e["data"] = json!("E000001");
    push("data a string", serde_json::to_vec(&e).expect("json"));
    e = termination("hostile-1", "E000001");
    e["data"]["options"] = json!({"archive_lookback_days": -1});
    push("negative lookback", serde_json::to_vec(&e).expect("json"));
    e = termination("hostile-1", "E000001");
    e["data"]["options"] = json!({"archive_lookback_days": 1e300});
    push("lookback 1e300", serde_json::to_vec(&e).expect("json"));
    e = termination("hostile-1", "E000001");
    e["time"] = json!("yesterday");
    push("bad time", serde_json::to_vec(&e).expect("json"));
    e = termination("hostile-1", "E000001");
    e["data"]["effective_at"] = json!("9999-99-99T00:00:00Z");
    push("bad effective_at", serde_json::to_vec(&e).expect("json"));
    e = termination("hostile-1", "E000001");
    e["data"]["employee"]["email"] = json!("a@b.c\r\nBcc: victim@x");
    push("CRLF in email", serde_json::to_vec(&e).expect("json"));
    e = termination("hostile-1", "E000001");
    e["data"]["notify"] = json!("hr\u{0}");
    push("NUL in notify", serde_json::to_vec(&e).expect("json"));
    // `notify` must name a configured endpoint (none is, here), never a URL.
    e = termination("hostile-1", "E000001");
    e["data"]["notify"] = json!("payroll");
    push(
        "notify names no configured endpoint",
        serde_json::to_vec(&e).expect("json"),
    );
    e = termination("hostile-1", "E000001");
    e["data"]["notify"] = json!("https://evil.example/hook");
    push("notify is a URL", serde_json::to_vec(&e).expect("json"));
    out.push((
        "text/html content type".to_owned(),
        valid.clone(),
        Some("text/html"),
    ));
    out.push((
        "application/xml content type".to_owned(),
        valid,
        Some("application/xml"),
    ));
    out
}

#[test]
fn hostile_corpus_is_rejected_by_the_parser() {
    for (name, body, ct) in corpus() {
        let r = event::Rules::default().parse_message(ct, &body);
        assert!(r.is_err(), "{name} was accepted: {r:?}");
    }
}

#[tokio::test]
async fn hostile_events_are_dead_lettered_as_invalid_with_zero_cxone_requests() {
    let _shared = BROKER.read().await;
    let names = Names::new();
    names.create_bucket().await;
    let sim = spawn(SimOptions::default(), "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("sim");
    let worker = WorkerProcess::start(&names, &sim, &[]);
    worker.wait_ready().await;
    let tap = OutcomeTap::new(&names.outcomes()).await;
    let outside = Outside::new().await;
    let cases = corpus();
    for (_, body, ct) in &cases {
        outside
            .publish(&names.events(), "employee.terminated", body, *ct)
            .await;
    }
    let n = u32::try_from(cases.len()).expect("small");
    let dead = outside
        .wait_len(&names.dead(), n, Duration::from_secs(60))
        .await;
    // Every one is dead-lettered before it is acked: nothing of them is still in handling.
    let stats: Value = reqwest::get(format!("{}/_sim/stats", sim.base_url()))
        .await
        .expect("stats")
        .json()
        .await
        .expect("json");
    let letters = outside.drain(&names.dead()).await;
    let classes: Vec<String> = letters
        .iter()
        .map(|m| {
            headers::get_str(
                m.delivery.properties.headers().as_ref(),
                headers::ERROR_CLASS,
            )
            .unwrap_or_default()
        })
        .collect();
    let f = Figures {
        scenario: "hostile-corpus".to_owned(),
        events: cases.len(),
        outcome_messages: tap.all().await.len(),
        dead_lettered: u64::from(dead),
        stuck: u64::from(outside.queue_len(&names.requests()).await),
        cxone_requests: stats["total"].as_u64().unwrap_or(u64::MAX),
        workers: 1,
        ..Figures::default()
    };
    f.report();
    assert_eq!(dead, n, "every hostile event dead-lettered");
    assert!(classes.iter().all(|c| c == "invalid"), "{classes:?}");
    assert_eq!(f.outcome_messages, 0, "no outcome for invalid input");
    assert_eq!(f.stuck, 0);
    assert_eq!(f.cxone_requests, 0, "zero CXone requests: {stats}");
    worker.kill9();
    sim.shutdown().await;
    names.cleanup().await;
}

/// Control headers a publisher might forge, each on an otherwise valid termination: the
/// worker ignores every one (counted), and the sagas run as if they were absent.
pub(crate) fn forged_headers() -> Vec<(&'static str, lapin::types::FieldTable)> {
    use lapin::types::{AMQPValue, FieldTable};
    let mut out = Vec::new();
    let mut with = |name: &'static str, key: &str, value: AMQPValue| {
        let mut t = FieldTable::default();
        t.insert(key.into(), value);
        out.push((name, t));
    };
    with(
        "guard released",
        headers::GUARD_RELEASED,
        AMQPValue::LongString("released by nobody".into()),
    );
    with(
        "park count",
        headers::PARK_COUNT,
        AMQPValue::LongLongInt(99),
    );
    with(
        "rescues spent",
        "x-offboard-rescues",
        AMQPValue::LongLongInt(3),
    );
    with(
        "lease waits",
        headers::LEASE_WAITS,
        AMQPValue::LongLongInt(50),
    );
    with(
        "replay count",
        headers::REPLAY_COUNT,
        AMQPValue::LongLongInt(4),
    );
    with(
        "a delivery count on a first delivery",
        headers::DELIVERY_COUNT,
        AMQPValue::LongLongInt(4),
    );
    with(
        "a signature of another key",
        "x-offboard-signature",
        AMQPValue::LongString("v1=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into()),
    );
    out
}

#[tokio::test]
async fn hostile_control_headers_from_a_publisher_are_ignored() {
    let _shared = BROKER.read().await;
    let stack = crate::helpers::Stack::start(
        SimOptions {
            users: 10,
            interactions_per_user: 1,
            ..SimOptions::default()
        },
        &[],
    )
    .await;
    let cases = forged_headers();
    for (i, (_, table)) in cases.iter().enumerate() {
        let body = serde_json::to_vec(&termination(
            &format!("forged-{i}"),
            &format!("E{:06}", i + 1),
        ))
        .expect("json");
        stack
            .outside
            .publish_with_headers(
                &stack.names.events(),
                "employee.terminated",
                &body,
                table.clone(),
            )
            .await;
    }
    let outcomes = stack.tap.wait(cases.len(), Duration::from_secs(120)).await;
    for (i, (name, _)) in cases.iter().enumerate() {
        let o = outcomes
            .iter()
            .find(|o| o["data"]["event_id"] == format!("forged-{i}"))
            .unwrap_or_else(|| panic!("{name}: no outcome"));
        assert_eq!(o["type"], "offboard.saga.completed", "{name}: {o}");
    }
    let m = crate::helpers::metrics_text(&stack.worker.base).await;
    let ignored: f64 = m
        .lines()
        .find(|l| l.starts_with("offboard_control_headers_ignored_total "))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    assert_eq!(ignored as usize, cases.len(), "{m}");
    stack.stop().await;
}

/// A local HTTP endpoint that counts requests (the HRIS webhook receiver).
async fn receiver() -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let h = h.clone();
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            "ok"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), hits)
}

/// Remote `ip:port`s of the TCP connections `pid` has open now.
fn peers(pid: u32) -> BTreeSet<String> {
    let out = Command::new("ss")
        .args(["-tnpH"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let tag = format!("pid={pid},");
    out.lines()
        .filter(|l| l.contains(&tag))
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn security_no_secret_anywhere_and_only_configured_hosts_are_contacted() {
    let _shared = BROKER.read().await;
    let names = Names::new();
    names.create_bucket().await;
    let cxone_secret = format!("cxs-{}", uuid::Uuid::new_v4().simple());
    let hook_secret = format!("hks-{}", uuid::Uuid::new_v4().simple());
    let amqp_password = format!("amq-{}", uuid::Uuid::new_v4().simple());
    let amqp_user = format!("rel-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    assert!(crate::helpers::rabbitmqctl(&[
        "-q",
        "add_user",
        &amqp_user,
        &amqp_password
    ]));
    assert!(crate::helpers::rabbitmqctl(&[
        "-q",
        "set_permissions",
        "-p",
        "/",
        &amqp_user,
        ".*",
        ".*",
        ".*"
    ]));
    let sim = spawn(
        SimOptions {
            users: 10,
            interactions_per_user: 5,
            access_key_secret: cxone_secret.clone(),
            ..SimOptions::default()
        },
        "127.0.0.1:0".parse().expect("addr"),
    )
    .await
    .expect("sim");
    // One per-user fault, so failures (and their error texts) are part of the run.
    reqwest::Client::new()
        .post(format!("{}/_sim/faults", sim.base_url()))
        .json(&json!({"users": {"E000005": {"block_login": 403}}}))
        .send()
        .await
        .expect("faults");
    let (hook, hook_hits) = receiver().await;
    let (decoy, decoy_hits) = receiver().await;
    let log = std::env::temp_dir().join(format!("security-{}.log", names.prefix));
    let amqp_url = format!("amqp://{amqp_user}:{amqp_password}@127.0.0.1:5672/%2f");
    let hook_url = format!("{hook}/hooks/offboard");
    let worker = WorkerProcess::start_logged(
        &names,
        &sim,
        &[
            ("RUST_LOG", "debug"),
            ("OFFBOARD__AMQP__URL", &amqp_url),
            ("OFFBOARD__CXONE__ACCESS_KEY_SECRET", &cxone_secret),
            ("OFFBOARD__HRIS__ENDPOINTS__HR__URL", &hook_url),
            ("OFFBOARD__HRIS__ENDPOINTS__HR__SECRET", &hook_secret),
            ("OFFBOARD__WORKER__RETRY_DELAYS_SECS", "1,2"),
        ],
        Some(&log),
    );
    worker.wait_ready().await;
    let pid = worker.child.id();
    let tap = DurableTap::new(&names).await;
    let mut tap = tap;
    let outside = Outside::new().await;
    let mut ids = Vec::new();
    for i in 1..=6 {
        let id = uuid::Uuid::new_v4().to_string();
        let mut e = termination(&id, &format!("E{i:06}"));
        // Event-supplied URLs must never be contacted.
        e["data"]["notify"] = json!(if i == 6 {
            format!("{decoy}/steal")
        } else {
            "hr".to_owned()
        });
        e["dataschema"] = json!(format!("{decoy}/schema"));
        e["source"] = json!(format!("{decoy}/source"));
        outside
            .publish(
                &names.events(),
                "employee.terminated",
                &serde_json::to_vec(&e).expect("json"),
                None,
            )
            .await;
        ids.push(id);
    }
    // An unknown employee and an invalid event, too.
    let body = serde_json::to_vec(&termination("sec-x", "NOBODY")).expect("json");
    outside
        .publish(&names.events(), "employee.terminated", &body, None)
        .await;
    let body = serde_json::to_vec(&termination("sec-y", "../x")).expect("json");
    outside
        .publish(&names.events(), "employee.terminated", &body, None)
        .await;
    let mut seen_peers = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        seen_peers.extend(peers(pid));
        tap.poll().await;
        if tap.terminal_events().len() >= 7 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    seen_peers.extend(peers(pid));
    let metrics = crate::helpers::metrics_text(&worker.http).await;
    worker.sigterm();
    let _ = worker.wait_exit(Duration::from_secs(10)).await;
    tap.poll().await;
    let outcomes = tap.outcomes();
    let letters = outside.drain(&names.dead()).await;
    let mut dead_text = String::new();
    for m in &letters {
        dead_text.push_str(&format!("{:?}", m.delivery.properties.headers()));
        dead_text.push_str(&String::from_utf8_lossy(&m.delivery.data));
    }
    // Every object in the bucket: journals, archives, manifests.
    let settings = names.settings(&[]);
    let s3 = cxone_offboard::store::client(&settings.s3).await;
    let listed = s3
        .list_objects_v2()
        .bucket(names.bucket())
        .send()
        .await
        .expect("list");
    let mut objects = String::new();
    let mut manifests = 0;
    for o in listed.contents() {
        let key = o.key().unwrap_or_default().to_owned();
        manifests += usize::from(key.starts_with("manifests/"));
        let body = s3
            .get_object()
            .bucket(names.bucket())
            .key(&key)
            .send()
            .await
            .expect("get")
            .body
            .collect()
            .await
            .expect("body")
            .into_bytes();
        objects.push_str(&key);
        objects.push_str(&String::from_utf8_lossy(&body));
    }
    let logs = std::fs::read_to_string(&log).expect("log");
    let outcome_text = serde_json::to_string(&outcomes).expect("json");
    let _ = crate::helpers::rabbitmqctl(&["-q", "delete_user", &amqp_user]);

    assert!(
        logs.contains("DEBUG")
            || logs.contains("\"debug\"")
            || logs.contains("\"level\":\"DEBUG\""),
        "debug logs captured"
    );
    assert!(manifests >= 4, "manifests were written: {manifests}");
    assert!(
        outcomes.iter().any(|o| o["type"] == "offboard.saga.failed"),
        "a failure is part of the run: {outcome_text}"
    );
    for (what, secret) in [
        ("CXone access key secret", &cxone_secret),
        ("HRIS webhook secret", &hook_secret),
        ("AMQP password", &amqp_password),
    ] {
        for (place, text) in [
            ("worker stderr (RUST_LOG=debug)", &logs),
            ("outcomes", &outcome_text),
            ("dead letters", &dead_text),
            ("S3 objects", &objects),
            ("/metrics", &metrics),
        ] {
            assert!(!text.contains(secret.as_str()), "{what} found in {place}");
        }
    }
    // Outbound: only the simulator, the broker, S3 and the configured webhook.
    let port = |u: &str| u.rsplit(':').next().unwrap_or_default().to_owned();
    let allowed: BTreeSet<String> = [
        port(&sim.base_url()),
        "5672".to_owned(),
        port(&crate::helpers::s3_endpoint()),
        port(&hook),
    ]
    .into_iter()
    .collect();
    let remote: BTreeSet<String> = seen_peers
        .iter()
        .filter(|p| {
            p.starts_with("127.0.0.1:")
                || p.starts_with("[::1]:")
                || p.starts_with("[::ffff:127.0.0.1]:")
        })
        .map(|p| port(p))
        .collect();
    let foreign: Vec<&String> = seen_peers
        .iter()
        .filter(|p| {
            !(p.starts_with("127.0.0.1:")
                || p.starts_with("[::1]:")
                || p.starts_with("[::ffff:127.0.0.1]:"))
        })
        .collect();
    assert!(foreign.is_empty(), "connections off the host: {foreign:?}");
    assert!(
        remote.is_subset(&allowed),
        "unexpected peers {remote:?}, allowed {allowed:?}"
    );
    assert_eq!(
        decoy_hits.load(Ordering::SeqCst),
        0,
        "an event URL was contacted"
    );
    assert!(
        hook_hits.load(Ordering::SeqCst) >= 4,
        "the configured webhook was called"
    );
    let f = Figures {
        scenario: "security-secrets-and-hosts".to_owned(),
        events: 8,
        outcome_messages: outcomes.len(),
        dead_lettered: letters.len() as u64,
        cxone_requests: 0,
        manifests,
        ..Figures::default()
    };
    f.report();
    sim.shutdown().await;
    crate::chaos::cleanup(&names).await;
    let _ = std::fs::remove_file(&log);
}

#[tokio::test]
async fn security_ids_with_url_significant_characters_are_encoded() {
    let _shared = BROKER.read().await;
    // `+` means a space in a query string and `@` is special in URLs: an unencoded SCIM filter
    // would look up someone else (or nobody).
    let stack = crate::helpers::Stack::start(
        SimOptions {
            users: 2,
            interactions_per_user: 2,
            ..SimOptions::default()
        },
        &[("OFFBOARD__CXONE__BLOCK_LOGIN", "scim")],
    )
    .await;
    for ext in ["j+1@x.y", "a.b_c-d+e@f"] {
        stack
            .sim_post(
                "/_sim/users",
                json!({"external_id": ext, "interactions": 3}),
            )
            .await;
    }
    let a = stack.terminate("j+1@x.y", json!({})).await;
    let b = stack.terminate("a.b_c-d+e@f", json!({})).await;
    let outcomes = stack.tap.wait(2, Duration::from_secs(60)).await;
    for id in [&a, &b] {
        let o = outcomes
            .iter()
            .find(|o| o["data"]["event_id"] == id.as_str())
            .expect("outcome");
        assert_eq!(o["type"], "offboard.saga.completed", "{o}");
        assert_eq!(o["data"]["status"], "DELETED", "{o}");
    }
    for ext in ["j+1@x.y", "a.b_c-d+e@f"] {
        let u = stack.sim_get(&format!("/_sim/users/{ext}")).await;
        assert_eq!(u["status"], "DELETED", "{u}");
        assert_eq!(u["scim_active"], false, "{u}");
    }
    stack.stop().await;
}

#[test]
fn security_tls_verification_cannot_be_switched_off() {
    for key in [
        "OFFBOARD__CXONE__DANGER_ACCEPT_INVALID_CERTS",
        "OFFBOARD__CXONE__ACCEPT_INVALID_CERTS",
        "OFFBOARD__CXONE__INSECURE",
        "OFFBOARD__CXONE__INSECURE_SKIP_VERIFY",
        "OFFBOARD__CXONE__TLS_VERIFY",
        "OFFBOARD__CXONE__VERIFY_TLS",
        "OFFBOARD__CXONE__TLS__VERIFY",
        "OFFBOARD__HRIS__ENDPOINTS__HR__INSECURE",
        "OFFBOARD__S3__INSECURE",
    ] {
        let mut env = vec![(key.to_owned(), "false".to_owned())];
        if key.contains("__HR__") {
            env.push((
                "OFFBOARD__HRIS__ENDPOINTS__HR__URL".to_owned(),
                "https://hr.example".to_owned(),
            ));
        }
        let err = Settings::load_from(None, env).expect_err(key);
        assert!(
            err.to_string().contains("unknown"),
            "{key} rejected as unknown: {err}"
        );
    }
    // Nothing in the source turns verification off either.
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut stack = vec![src];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("src").flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&p).expect("read");
                for needle in [
                    "danger_accept_invalid",
                    "dangerous()",
                    "NoCertificateVerification",
                ] {
                    assert!(!text.contains(needle), "{} contains {needle}", p.display());
                }
            }
        }
    }
}

#[test]
fn security_the_container_runs_as_non_root() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).expect("Dockerfile");
    let user = dockerfile
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with("USER "))
        .expect("a USER line");
    assert!(user.contains("10001"), "{user}");
    let values =
        std::fs::read_to_string(root.join("helm/cxone-offboard/values.yaml")).expect("values.yaml");
    assert!(values.contains("runAsNonRoot: true"));
    // tests/helm/test_rendered.py::test_no_container_runs_as_root checks the rendered chart.
}
