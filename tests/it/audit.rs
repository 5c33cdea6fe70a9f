//! `evidence export` and `reconcile` as an auditor and an identity team run them (issue 19):
//! the binary against the real broker, S3 server and simulator.

use std::process::Output;
use std::time::Duration;

use chrono::Utc;
use cxone_offboard::metrics::Metrics;
use cxone_offboard::saga::journal::{self, Journal};
use cxone_offboard::sim::SimOptions;
use cxone_offboard::store::{S3, Store};
use serde_json::{Value, json};

use crate::helpers::{BROKER, Stack, eventually, until};

const BIN: &str = env!("CARGO_BIN_EXE_cxone-offboard");

async fn cli(stack: &Stack, args: &[&str]) -> Output {
    tokio::process::Command::new(BIN)
        .args(args)
        .envs(stack.names.env())
        .envs(Stack::sim_env(&stack.sim))
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("the binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sim(users: u64) -> SimOptions {
    SimOptions {
        users,
        interactions_per_user: 2,
        ..SimOptions::default()
    }
}

fn completed(outcomes: &[Value]) -> Vec<&Value> {
    outcomes
        .iter()
        .filter(|o| o["type"] == "offboard.saga.completed")
        .collect()
}

fn csv_rows(body: &[u8]) -> Vec<std::collections::BTreeMap<String, String>> {
    let mut r = csv::Reader::from_reader(body);
    let headers = r.headers().expect("header").clone();
    r.records()
        .map(|rec| {
            let rec = rec.expect("row");
            headers
                .iter()
                .zip(rec.iter())
                .map(|(h, v)| (h.to_owned(), v.to_owned()))
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn evidence_export_proves_each_termination_and_flags_tampering_and_a_late_one() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(sim(6), &[]).await;
    for n in 1..=5 {
        stack.terminate(&format!("E{n:06}"), json!({})).await;
    }
    // HR sends a termination effective five hours ago: past the 4-hour SLA on arrival.
    let late = (Utc::now() - chrono::Duration::hours(5)).to_rfc3339();
    stack
        .terminate(
            "E000006",
            json!({"effective_at": late, "reason": "voluntary"}),
        )
        .await;
    let outcomes = stack.tap.wait(6, Duration::from_secs(60)).await;
    assert_eq!(completed(&outcomes).len(), 6, "{outcomes:#?}");
    let e6 = completed(&outcomes)
        .into_iter()
        .find(|o| o["subject"] == "E000006")
        .expect("E000006");
    assert_eq!(e6["data"]["sla"]["met"], false, "{e6}");

    // Someone edits E000002's manifest in the bucket (a step's status), keeping it valid JSON.
    let store = S3::new(&stack.settings.s3).await;
    let uri = completed(&outcomes)
        .into_iter()
        .find(|o| o["subject"] == "E000002")
        .and_then(|o| o["data"]["manifest"]["uri"].as_str())
        .expect("manifest uri")
        .to_owned();
    let key = uri.splitn(4, '/').nth(3).expect("key").to_owned();
    let original = store.get(&key).await.expect("get").expect("manifest");
    let mut doc: Value = serde_json::from_slice(&original.body).expect("json");
    doc["steps"][0]["status"] = json!("skipped");
    store
        .sdk()
        .put_object()
        .bucket(store.bucket())
        .key(&key)
        .body(serde_json::to_vec(&doc).expect("json").into())
        .send()
        .await
        .expect("tampered");

    let dir = tempfile::tempdir().expect("dir");
    let csv_path = dir.path().join("export.csv");
    let out = cli(
        &stack,
        &[
            "evidence",
            "export",
            "--since",
            "1h",
            "--out",
            csv_path.to_str().expect("path"),
        ],
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed manifest is exit 1: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("1 manifest(s) failed verification"),
        "{}",
        text(&out.stderr)
    );
    let rows = csv_rows(&std::fs::read(&csv_path).expect("csv"));
    assert_eq!(rows.len(), 6, "{rows:#?}");
    let columns: Vec<&str> = rows[0].keys().map(String::as_str).collect();
    for c in cxone_offboard::audit::export::COLUMNS {
        assert!(columns.contains(&c), "column {c} in {columns:?}");
    }
    for r in &rows {
        let id = r["external_id"].as_str();
        assert_eq!(r["status"], "DELETED", "{r:?}");
        assert!(
            !r["revoked_at"].is_empty() && !r["verified_at"].is_empty(),
            "{r:?}"
        );
        assert_eq!(
            r["manifest_verified"],
            if id == "E000002" { "false" } else { "true" },
            "{r:?}"
        );
        assert_eq!(
            r["sla_met"],
            if id == "E000006" { "false" } else { "true" },
            "{r:?}"
        );
        let ttr: f64 = r["time_to_revoke_secs"].parse().expect("ttr");
        if id == "E000006" {
            assert!(
                ttr > 5.0 * 3600.0 - 60.0,
                "counted from effective_at: {ttr}"
            );
            assert_eq!(r["reason"], "voluntary");
        } else {
            assert!(ttr < 600.0, "{ttr}");
        }
    }

    // JSON: the same rows and the counts.
    let out = cli(
        &stack,
        &["evidence", "export", "--since", "1h", "--format", "json"],
    )
    .await;
    let doc: Value = serde_json::from_slice(&out.stdout).expect("json on stdout");
    assert_eq!(doc["rows"].as_array().map(Vec::len), Some(6));
    assert_eq!(doc["counts"]["sla_breached"], 1);
    assert_eq!(doc["counts"]["sla_met"], 5);
    assert_eq!(doc["counts"]["manifests_failed"], 1);

    // HTML: one file, nothing fetched from anywhere.
    let html_path = dir.path().join("report.html");
    cli(
        &stack,
        &[
            "evidence",
            "export",
            "--since",
            "1h",
            "--format",
            "html",
            "--out",
            html_path.to_str().expect("path"),
        ],
    )
    .await;
    let html = std::fs::read_to_string(&html_path).expect("html");
    assert!(html.contains("<svg") && html.contains("E000006"));
    for needle in [
        "src=\"http",
        "href=\"http",
        "url(http",
        "@import",
        "<script",
    ] {
        assert!(!html.contains(needle), "self-contained: found {needle}");
    }

    // The auditor's sample: reproducible with the seed.
    let sample = |seed: &'static str| {
        let stack = &stack;
        async move {
            let out = cli(
                stack,
                &[
                    "evidence",
                    "export",
                    "--since",
                    "1h",
                    "--sample",
                    "3",
                    "--seed",
                    seed,
                    "--no-verify",
                ],
            )
            .await;
            assert!(out.status.success(), "{}", text(&out.stderr));
            csv_rows(&out.stdout)
                .into_iter()
                .map(|r| r["saga_id"].clone())
                .collect::<Vec<_>>()
        }
    };
    let a = sample("7").await;
    assert_eq!(a.len(), 3);
    assert_eq!(a, sample("7").await, "same seed, same sample");

    // A period with nothing in it.
    let out = cli(
        &stack,
        &["evidence", "export", "--since", "3h", "--until", "2h"],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(csv_rows(&out.stdout).len(), 0);
    // Bad input names the flag.
    let out = cli(&stack, &["evidence", "export", "--since", "soon"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--since"),
        "{}",
        text(&out.stderr)
    );
    stack.stop().await;
}

/// Issue 19: listing a period reads that period only, on the real S3 server. Journals dated
/// on three days (as sagas of those days would have written them); exporting one day lists
/// one day's index and reads that day's journals.
#[tokio::test]
async fn a_period_reads_only_its_own_index_and_journals() {
    let names = crate::helpers::Names::new();
    names.create_bucket().await;
    let settings = names.settings(&[]);
    let metrics = Metrics::new();
    let store = S3::new(&settings.s3).await.with_metrics(metrics.clone());
    let body = br#"{"specversion":"1.0","id":"e","source":"s","type":"employee.terminated",
                    "data":{"employee":{"external_id":"E1"}}}"#;
    let event = cxone_offboard::event::parse(body, cxone_offboard::event::Limits::default())
        .expect("event");
    let base = chrono::DateTime::parse_from_rfc3339("2026-10-01T08:00:00Z")
        .expect("time")
        .with_timezone(&Utc);
    for i in 0..60i64 {
        let created = base + chrono::Duration::days(i % 3) + chrono::Duration::seconds(i);
        let saga_id = uuid::Uuid::new_v4().to_string();
        let mut stored = journal::Stored {
            journal: Journal::new(&saga_id, &event, created),
            etag: None,
        };
        journal::save(&store, &mut stored).await.expect("save");
        journal::write_indexes(&store, "E1", &saga_id, created)
            .await
            .expect("index");
    }
    let count = |op: &str| {
        let needle = format!("offboard_s3_requests_total{{operation=\"{op}\"}} ");
        metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(&needle).and_then(|v| v.parse::<u64>().ok()))
            .unwrap_or(0)
    };
    let (list0, get0) = (count("LIST"), count("GET"));
    let period = cxone_offboard::audit::export::Period {
        since: Some(base + chrono::Duration::days(1) - chrono::Duration::hours(8)),
        until: base + chrono::Duration::days(2) - chrono::Duration::hours(8),
    };
    let ids = cxone_offboard::audit::export::sagas_in(&store, &period)
        .await
        .expect("ids");
    let rows = cxone_offboard::audit::export::journals(&store, ids, &period, || {})
        .await
        .expect("journals");
    assert_eq!(rows.len(), 20);
    assert_eq!(count("LIST") - list0, 1, "one LIST of one day's index");
    assert_eq!(count("GET") - get0, 20, "one GET per saga of that day");
    names.cleanup().await;
}

#[tokio::test]
async fn reconcile_finds_a_leaver_a_reactivated_user_and_a_service_account_and_offboards_two() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(sim(5), &[]).await;
    // E000005 is offboarded by this tool, then an administrator re-enables the account.
    stack.terminate("E000005", json!({})).await;
    let first = stack.tap.wait(1, Duration::from_secs(60)).await;
    assert_eq!(completed(&first).len(), 1, "{first:#?}");
    stack
        .sim_post("/_sim/users/E000005/status", json!({"status": "ACTIVE"}))
        .await;
    // A service account without an external id.
    let svc = stack
        .sim_post(
            "/_sim/users",
            json!({"external_id": null, "username": "svc-dialer"}),
        )
        .await;
    assert!(svc["external_id"].is_null(), "{svc}");
    // The roster: E000001-3 stay; E000004 left and nobody told us.
    let dir = tempfile::tempdir().expect("dir");
    let roster = dir.path().join("roster.csv");
    std::fs::write(
        &roster,
        "name,external_id\nAda,E000001\nBo,E000002\nCy,E000003\n",
    )
    .expect("roster");
    let roster = roster.to_str().expect("path");

    let out = cli(&stack, &["reconcile", "--roster", roster, "--json"]).await;
    assert_eq!(
        out.status.code(),
        Some(3),
        "findings remain: {}",
        text(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).expect("json");
    let ids = |kind: &str| -> Vec<String> {
        doc[kind]
            .as_array()
            .expect("list")
            .iter()
            .map(|f| f["external_id"].as_str().unwrap_or("-").to_owned())
            .collect()
    };
    assert_eq!(ids("leaver"), ["E000004"], "{doc:#}");
    assert_eq!(ids("reactivated"), ["E000005"], "{doc:#}");
    assert_eq!(ids("unmatched"), ["-"], "{doc:#}");
    assert_eq!(doc["unmatched"][0]["username"], "svc-dialer");
    assert_eq!(doc["published"], 0);

    let out = cli(
        &stack,
        &["reconcile", "--roster", roster, "--publish", "--json"],
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "all published: {}",
        text(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(doc["published"], 2);
    let outcomes = until(
        Duration::from_secs(60),
        || async { stack.tap.all().await },
        |o| completed(o).len() >= 3,
    )
    .await;
    let done: Vec<&str> = completed(&outcomes)
        .iter()
        .filter_map(|o| o["subject"].as_str())
        .collect();
    assert_eq!(done.len(), 3, "{outcomes:#?}");
    assert!(done.contains(&"E000004") && done.iter().filter(|s| **s == "E000005").count() == 2);
    for id in ["E000001", "E000002", "E000003"] {
        let u = stack.sim_get(&format!("/_sim/users/{id}")).await;
        assert_eq!(u["status"], "ACTIVE", "on the roster, untouched: {u}");
    }
    let handle = svc["handle"].as_str().expect("handle");
    let s = stack.sim_get(&format!("/_sim/users/{handle}")).await;
    assert_eq!(
        s["status"], "ACTIVE",
        "a service account is never acted on: {s}"
    );
    // The summary outcome of each run.
    let summaries: Vec<&Value> = outcomes
        .iter()
        .filter(|o| o["type"] == "offboard.reconcile.finished")
        .collect();
    assert_eq!(summaries.len(), 2);
    assert_eq!(summaries[1]["data"]["published"], 2);

    // Nothing left to find once both are offboarded.
    eventually(
        "E000004 and E000005 gone",
        Duration::from_secs(30),
        || async {
            let out = cli(&stack, &["reconcile", "--roster", roster, "--json"]).await;
            (out.status.code() == Some(0)).then_some(())
        },
    )
    .await;
    // A roster without the column is refused, naming it.
    std::fs::write(dir.path().join("bad.csv"), "id\nE000001\n").expect("write");
    let bad = dir.path().join("bad.csv");
    let out = cli(
        &stack,
        &["reconcile", "--roster", bad.to_str().expect("path")],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("external_id"),
        "{}",
        text(&out.stderr)
    );
    stack.stop().await;
}
