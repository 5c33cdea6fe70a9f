//! Operator commands run as the real binary against the real broker and S3: `publish`,
//! `dlq list`, `replay` (including a kill halfway) and `verify`.

use std::collections::BTreeSet;
use std::process::{Output, Stdio};
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use cxone_offboard::broker::headers;
use cxone_offboard::event::{Limits, parse};
use cxone_offboard::evidence::{self, ArchiveWriter};
use cxone_offboard::saga::journal::{ArchiveRecord, Journal, StepStatus};
use cxone_offboard::store::keys;
use cxone_offboard::store::{S3, Store, Write};
use lapin::types::{AMQPValue, FieldArray, FieldTable, ShortString};
use serde_json::{Value, json};
use tokio::process::Command;

use crate::helpers::{BROKER, Names, Outside, connect, termination, until};

const BIN: &str = env!("CARGO_BIN_EXE_cxone-offboard");

fn command(names: &Names, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .envs(names.env())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
    ] {
        if std::env::var(k).is_err() {
            cmd.env(k, v);
        }
    }
    cmd
}

async fn run(names: &Names, args: &[&str]) -> Output {
    command(names, args).output().await.expect("binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Declares the topology the worker would, and its bucket (where the control-header key
/// lives), so the commands have something to work on.
async fn declare(names: &Names) {
    names.create_bucket().await;
    let conn = connect().await.expect("broker");
    let ch = conn.create_channel().await.expect("channel");
    let settings = names.settings(&[]);
    let none = cxone_offboard::broker::topology::Delays {
        access: vec![],
        housekeeping: vec![],
    };
    cxone_offboard::broker::topology::declare(&ch, &settings.amqp, &none)
        .await
        .expect("topology");
    let _ = conn.close(200, "".into()).await;
}

/// A dead letter as the worker (or the broker) would have left it.
#[derive(Clone)]
enum Dead {
    Worker {
        class: &'static str,
        step: Option<&'static str>,
        replays: i64,
    },
    DeliveryLimit,
}

async fn put_dead(outside: &Outside, names: &Names, i: usize, kind: &Dead) {
    let mut table = FieldTable::default();
    match kind {
        Dead::Worker {
            class,
            step,
            replays,
        } => {
            headers::set_str(&mut table, headers::ERROR_CLASS, class);
            headers::set_str(&mut table, headers::ERROR, &format!("failure {i}"));
            if let Some(step) = step {
                headers::set_str(&mut table, headers::STEP, step);
            }
            headers::set_str(
                &mut table,
                headers::DEAD_LETTERED_AT,
                &Utc::now().to_rfc3339(),
            );
            headers::set_int(&mut table, headers::PARK_COUNT, 3);
            if *replays > 0 {
                headers::set_int(&mut table, headers::REPLAY_COUNT, *replays);
            }
        }
        Dead::DeliveryLimit => {
            let mut death = FieldTable::default();
            death.insert(ShortString::from("count"), AMQPValue::LongLongInt(1));
            death.insert(
                ShortString::from("reason"),
                AMQPValue::LongString("delivery_limit".into()),
            );
            death.insert(
                ShortString::from("queue"),
                AMQPValue::LongString(names.requests().as_str().into()),
            );
            table.insert(
                ShortString::from("x-death"),
                AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
            );
        }
    }
    headers::set_str(&mut table, "x-custom", "kept");
    let body = serde_json::to_vec(&termination(&format!("ev-{i}"), &employee(i))).expect("json");
    outside
        .publish_with_headers(&names.dlx(), "employee.terminated", &body, table)
        .await;
}

fn employee(i: usize) -> String {
    format!("E{i:06}")
}

async fn dlq_json(names: &Names) -> Vec<Value> {
    let out = run(names, &["dlq", "list", "--json"]).await;
    assert!(out.status.success(), "dlq list: {}", text(&out.stderr));
    serde_json::from_slice::<Vec<Value>>(&out.stdout).expect("a JSON array")
}

fn employees(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|v| v["employee"].as_str().unwrap_or("-").to_owned())
        .collect()
}

/// The employee of each message taken (and acked) from `queue`, in order.
async fn drain_employees(outside: &Outside, queue: &str) -> Vec<(String, i64)> {
    outside
        .drain(queue)
        .await
        .iter()
        .map(|m| {
            let v: Value = serde_json::from_slice(&m.delivery.data).expect("json body");
            let replays = headers::get_int(
                m.delivery.properties.headers().as_ref(),
                headers::REPLAY_COUNT,
            )
            .unwrap_or(0);
            (
                v["data"]["employee"]["external_id"]
                    .as_str()
                    .unwrap_or("-")
                    .to_owned(),
                replays,
            )
        })
        .collect()
}

#[tokio::test]
async fn publish_reports_bad_rows_by_line_and_publishes_the_rest() {
    let _shared = BROKER.read().await;
    let names = Names::new();
    declare(&names).await;
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("leavers.csv");
    let mut csv = String::from("external_id,username,email,reason,delete_user,dry_run\n");
    for i in 0..1000 {
        let row = match i {
            100 => format!("E{i:06},user{i},not-an-email,involuntary,true,false\n"),
            500 => format!("E {i},user{i},u{i}@acme.example,voluntary,true,false\n"),
            900 => format!("E{i:06},user{i},u{i}@acme.example,voluntary,true,maybe\n"),
            _ => format!("E{i:06},user{i},u{i}@acme.example,voluntary,true,false\n"),
        };
        csv.push_str(&row);
    }
    std::fs::write(&file, csv).expect("write csv");
    let path = file.to_str().expect("utf-8 path");
    let out = run(&names, &["publish", "--file", path]).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // Data row i is on line i + 2 (line 1 is the header).
    for expected in [
        "line 102: email:",
        "line 502: external_id:",
        "line 902: dry_run:",
    ] {
        assert!(stderr.contains(expected), "{expected} in {stderr}");
    }
    assert!(
        text(&out.stdout).contains("published 997 of 1000"),
        "{}",
        text(&out.stdout)
    );
    let outside = Outside::new().await;
    let len = outside
        .wait_len(&names.requests(), 997, Duration::from_secs(10))
        .await;
    assert_eq!(len, 997);
    let messages = outside.drain(&names.requests()).await;
    assert_eq!(messages.len(), 997, "nothing partial, nothing extra");
    let ids: BTreeSet<String> = messages
        .iter()
        .map(|m| {
            assert_eq!(
                m.delivery
                    .properties
                    .content_type()
                    .as_ref()
                    .map(|c| c.as_str()),
                Some("application/cloudevents+json")
            );
            assert_eq!(m.delivery.properties.delivery_mode(), &Some(2));
            let v: Value = serde_json::from_slice(&m.delivery.data).expect("json");
            v["id"].as_str().expect("id").to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 997, "one id per row");

    // The same file again gives the same ids (the worker dedups by saga id).
    let again = run(&names, &["publish", "--file", path]).await;
    assert_eq!(again.status.code(), Some(1));
    outside
        .wait_len(&names.requests(), 997, Duration::from_secs(10))
        .await;
    let ids_again: BTreeSet<String> = outside
        .drain(&names.requests())
        .await
        .iter()
        .map(|m| {
            let v: Value = serde_json::from_slice(&m.delivery.data).expect("json");
            v["id"].as_str().expect("id").to_owned()
        })
        .collect();
    assert_eq!(ids, ids_again);

    // A missing file and a bad header are usage errors.
    let missing = run(&names, &["publish", "--file", "/nonexistent.csv"]).await;
    assert_eq!(missing.status.code(), Some(2));
    let bad_header = dir.path().join("bad.csv");
    std::fs::write(&bad_header, "employee,email\nE1,a@b.example\n").expect("write");
    let out = run(
        &names,
        &["publish", "--file", bad_header.to_str().expect("path")],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    names.cleanup().await;
}

/// 50 dead letters: every 5th is permanent at block_login; the rest a mix.
fn mixed(i: usize) -> Dead {
    match i % 5 {
        0 => Dead::Worker {
            class: "permanent",
            step: Some("block_login"),
            replays: 0,
        },
        1 => Dead::Worker {
            class: "permanent",
            step: Some("delete"),
            replays: 0,
        },
        2 => Dead::Worker {
            class: "invalid",
            step: None,
            replays: 0,
        },
        3 => Dead::Worker {
            class: "exhausted",
            step: Some("block_login"),
            replays: 0,
        },
        _ => Dead::DeliveryLimit,
    }
}

#[tokio::test]
async fn dlq_list_keeps_order_and_replay_moves_exactly_the_matching_ones() {
    let _shared = BROKER.read().await;
    let names = Names::new();
    declare(&names).await;
    let outside = Outside::new().await;
    for i in 0..50 {
        put_dead(&outside, &names, i, &mixed(i)).await;
    }
    assert_eq!(
        outside
            .wait_len(&names.dead(), 50, Duration::from_secs(10))
            .await,
        50
    );
    let all: Vec<String> = (0..50).map(employee).collect();
    let first = dlq_json(&names).await;
    assert_eq!(employees(&first), all, "listed in queue order");
    assert_eq!(first[4]["class"], "delivery_limit");
    assert_eq!(first[4]["death_count"], 1);
    assert_eq!(first[0]["class"], "permanent");
    assert_eq!(first[0]["step"], "block_login");
    // Listing consumed nothing and changed no order.
    assert_eq!(employees(&dlq_json(&names).await), all);
    let table = run(&names, &["dlq", "list", "--limit", "3"]).await;
    assert!(table.status.success());
    assert!(text(&table.stdout).contains("3 of 50 dead letters"));

    let matching: Vec<String> = (0..50).filter(|i| i % 5 == 0).map(employee).collect();
    let dry = run(
        &names,
        &[
            "replay",
            "--class",
            "permanent",
            "--step",
            "block_login",
            "--dry-run",
        ],
    )
    .await;
    let stdout = text(&dry.stdout);
    assert!(dry.status.success(), "{stdout} {}", text(&dry.stderr));
    let listed: Vec<String> = stdout
        .lines()
        .filter(|l| l.starts_with("would replay"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("employee="))
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(listed, matching, "{stdout}");
    assert_eq!(
        employees(&dlq_json(&names).await),
        all,
        "dry run changed nothing"
    );
    assert_eq!(outside.queue_len(&names.requests()).await, 0);

    let real = run(
        &names,
        &["replay", "--class", "permanent", "--step", "block_login"],
    )
    .await;
    assert!(real.status.success(), "{}", text(&real.stderr));
    let moved = drain_employees(&outside, &names.requests()).await;
    assert_eq!(
        moved,
        matching.iter().map(|e| (e.clone(), 1)).collect::<Vec<_>>(),
        "the matching ones, in order, replay count incremented"
    );
    let rest: Vec<String> = (0..50).filter(|i| i % 5 != 0).map(employee).collect();
    let after = dlq_json(&names).await;
    assert_eq!(employees(&after), rest, "the rest unchanged, in order");
    assert!(after.iter().all(|v| v["replay_count"] == 0));
    names.cleanup().await;
}

/// Issue 17, item 5: replay kept the old park count, error class and time, so a replayed saga
/// had no retry budget left and a new failure was reported with stale facts. A replayed copy
/// is a fresh start: custom headers and the original route kept, old attempt facts dropped,
/// the replay counted and the control headers signed.
#[tokio::test]
async fn replayed_copies_start_afresh_and_keep_the_original_headers() {
    let _shared = BROKER.read().await;
    let names = Names::new();
    declare(&names).await;
    let outside = Outside::new().await;
    put_dead(&outside, &names, 7, &mixed(0)).await;
    outside
        .wait_len(&names.dead(), 1, Duration::from_secs(10))
        .await;
    let out = run(&names, &["replay", "--employee", "E000007"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got = outside.drain(&names.requests()).await;
    assert_eq!(got.len(), 1);
    let h = got[0].delivery.properties.headers().as_ref();
    assert_eq!(headers::get_str(h, "x-custom").as_deref(), Some("kept"));
    for stale in [
        headers::ERROR_CLASS,
        headers::ERROR,
        headers::STEP,
        headers::DEAD_LETTERED_AT,
        headers::PARK_COUNT,
        "x-death",
    ] {
        assert_eq!(headers::get_str(h, stale), None, "{stale} dropped");
    }
    assert_eq!(headers::get_int(h, headers::REPLAY_COUNT), Some(1));
    // Signed with the deployment's key: the worker believes its replay count.
    let settings = names.settings(&[]);
    let store = cxone_offboard::store::S3::new(&settings.s3).await;
    let key = cxone_offboard::app::control_key(&settings, &store)
        .await
        .expect("key");
    assert!(key.verify(h, &got[0].delivery.data));
    let body: Value = serde_json::from_slice(&got[0].delivery.data).expect("json");
    assert_eq!(body["id"], "ev-7");
    names.cleanup().await;
}

#[tokio::test]
async fn killing_a_replay_halfway_loses_nothing() {
    let _shared = BROKER.read().await;
    let names = Names::new();
    declare(&names).await;
    let outside = Outside::new().await;
    // 30 matching (permanent) and 10 not (invalid), interleaved.
    let total = 40;
    for i in 0..total {
        let kind = if i % 4 == 3 {
            Dead::Worker {
                class: "invalid",
                step: None,
                replays: 0,
            }
        } else {
            Dead::Worker {
                class: "permanent",
                step: Some("block_login"),
                replays: 0,
            }
        };
        put_dead(&outside, &names, i, &kind).await;
    }
    outside
        .wait_len(&names.dead(), total as u32, Duration::from_secs(10))
        .await;
    let mut child = command(&names, &["replay", "--class", "permanent", "--rate", "5"])
        .spawn()
        .expect("spawn");
    // Killed once a few copies are through.
    outside
        .wait_len(&names.requests(), 3, Duration::from_secs(30))
        .await;
    child.start_kill().expect("kill -9");
    let _ = child.wait().await;
    // The broker returns the dead connection's unacked messages.
    until(
        Duration::from_secs(15),
        || async {
            outside.queue_len(&names.requests()).await + outside.queue_len(&names.dead()).await
        },
        |n| *n >= total as u32,
    )
    .await;

    let moved = drain_employees(&outside, &names.requests()).await;
    let remaining = drain_employees(&outside, &names.dead()).await;
    assert!(
        !moved.is_empty() && moved.len() < 30,
        "killed halfway: {} moved",
        moved.len()
    );
    let seen: BTreeSet<String> = moved
        .iter()
        .chain(&remaining)
        .map(|(e, _)| e.clone())
        .collect();
    assert_eq!(seen.len(), total, "nothing lost");
    let duplicates = moved.len() + remaining.len() - total;
    assert!(duplicates <= 1, "{duplicates} duplicates");
    // Order is not asserted here: a killed process cannot nack, and RabbitMQ before 3.13 returns
    // a dead connection's quorum-queue messages in no particular order (see broker::inspect).
    names.cleanup().await;
}

#[tokio::test]
async fn replay_refuses_a_message_over_max_count_without_force() {
    let _shared = BROKER.read().await;
    let names = Names::new();
    declare(&names).await;
    let outside = Outside::new().await;
    let tired = Dead::Worker {
        class: "permanent",
        step: Some("block_login"),
        replays: 5,
    };
    put_dead(&outside, &names, 1, &tired).await;
    put_dead(&outside, &names, 2, &mixed(0)).await;
    outside
        .wait_len(&names.dead(), 2, Duration::from_secs(10))
        .await;
    let out = run(&names, &["replay", "--class", "permanent"]).await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("refused") && stdout.contains("E000001"),
        "{stdout}"
    );
    assert_eq!(
        drain_employees(&outside, &names.requests()).await,
        vec![("E000002".to_owned(), 1)]
    );
    assert_eq!(employees(&dlq_json(&names).await), ["E000001"]);

    let forced = run(&names, &["replay", "--class", "permanent", "--force"]).await;
    assert!(forced.status.success(), "{}", text(&forced.stdout));
    assert_eq!(
        drain_employees(&outside, &names.requests()).await,
        vec![("E000001".to_owned(), 6)]
    );
    assert_eq!(outside.queue_len(&names.dead()).await, 0);
    names.cleanup().await;
}

#[tokio::test]
async fn verify_detects_an_edited_step_and_a_changed_archive_byte() {
    let names = Names::new();
    names.create_bucket().await;
    let settings = names.settings(&[]);
    let store = S3::new(&settings.s3).await;
    let external_id = format!("V{}", &names.prefix[1..11]);
    let event_body = serde_json::to_vec(&termination("verify-1", &external_id)).expect("json");
    let event = parse(&event_body, Limits::default()).expect("valid");
    let saga_id = event.saga_id();
    let now = Utc::now();
    let mut journal = Journal::new(&saga_id, &event, now);
    for step in journal.steps.iter_mut() {
        step.status = StepStatus::Done;
        step.attempts = 1;
        step.started_at = Some(now);
        step.finished_at = Some(now);
    }
    let archive_key = keys::archive(&external_id, &saga_id);
    let mut writer = ArchiveWriter::begin(&store, archive_key.clone());
    for n in 0..3 {
        writer.push(json!({"contactId": n, "agentId": 7}).to_string().as_bytes());
    }
    let summary = writer.finish().await.expect("finish");
    journal.archive = Some(ArchiveRecord {
        uri: store.uri(&archive_key),
        key: archive_key.clone(),
        sha256: summary.sha256.clone(),
        records: summary.records,
        bytes: summary.bytes,
    });
    let manifest_of = |archive: Option<&ArchiveRecord>| {
        evidence::seal(json!({
            "kind": "termination",
            "saga_id": saga_id,
            "event": {"id": journal.event.id, "source": journal.event.source},
            "employee": {"external_id": external_id},
            "status": "DELETED",
            "steps": journal.steps.iter().map(|s| json!({"name": s.name.as_str(), "status": s.status})).collect::<Vec<_>>(),
            "archive": archive.map(|a| json!({"uri": a.uri, "sha256": a.sha256, "records": a.records, "bytes": a.bytes})),
        }))
    };
    let manifest = manifest_of(journal.archive.as_ref());
    let manifest_key = keys::manifest(&external_id, &saga_id);
    evidence::write_once(&store, &manifest_key, &manifest)
        .await
        .expect("written");
    let uri = store.uri(&manifest_key);

    let ok = run(&names, &["verify", &uri]).await;
    let stdout = text(&ok.stdout);
    assert!(ok.status.success(), "{stdout} {}", text(&ok.stderr));
    assert!(!stdout.contains("FAIL"), "{stdout}");
    assert!(stdout.contains("archive records  ok"), "{stdout}");

    // One step edited after the fact.
    let mut edited = manifest.clone();
    edited["steps"][1]["status"] = json!("skipped");
    put_json(&store, &manifest_key, &edited).await;
    let out = run(&names, &["verify", &uri]).await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("integrity        FAIL  hash chain breaks at step 1"),
        "{stdout}"
    );

    // Fields outside the steps edited (issue 17, item 3: the chain covered only the steps,
    // so these passed).
    for (field, value) in [
        ("status", json!("COMPENSATED")),
        ("employee", json!({"external_id": "SOMEONE-ELSE"})),
        (
            "archive",
            json!({"uri": "s3://elsewhere/x", "sha256": "00", "records": 0, "bytes": 0}),
        ),
    ] {
        let mut edited = manifest.clone();
        edited[field] = value;
        put_json(&store, &manifest_key, &edited).await;
        let out = run(&names, &["verify", &uri]).await;
        let stdout = text(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{field}: {stdout}");
        assert!(
            stdout.contains("changed after it was written"),
            "{field}: {stdout}"
        );
    }

    // The manifest intact again, one byte of the archive changed.
    put_json(&store, &manifest_key, &manifest).await;
    let original = store
        .get(&archive_key)
        .await
        .expect("get")
        .expect("archive");
    let mut changed = original.body.to_vec();
    changed[2] ^= 0x01;
    store
        .put(
            &archive_key,
            Bytes::from(changed),
            evidence::NDJSON,
            Write::Always,
        )
        .await
        .expect("tamper");
    let out = run(&names, &["verify", &uri]).await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("archive sha256   FAIL"), "{stdout}");
    assert!(stdout.contains("hash chain       ok"), "{stdout}");

    // A rescind manifest without an archive verifies.
    let rescind_key = keys::rescind_manifest(&external_id, &saga_id);
    let mut rescind = manifest_of(None);
    rescind["kind"] = json!("rescind");
    let rescind = evidence::seal(rescind);
    put_json(&store, &rescind_key, &rescind).await;
    let out = run(&names, &["verify", &store.uri(&rescind_key)]).await;
    assert!(out.status.success(), "{}", text(&out.stdout));

    // Not an s3:// URI: usage error.
    assert_eq!(
        run(&names, &["verify", "manifest.json"])
            .await
            .status
            .code(),
        Some(2)
    );
    for key in [&manifest_key, &archive_key, &rescind_key] {
        let _ = store.delete(key).await;
    }
}

async fn put_json(store: &S3, key: &str, value: &Value) {
    let body = serde_json::to_vec_pretty(value).expect("json");
    store
        .put(key, Bytes::from(body), "application/json", Write::Always)
        .await
        .expect("put");
}

#[tokio::test]
async fn after_the_fault_is_fixed_a_replayed_saga_resumes_and_completes() {
    let _shared = BROKER.read().await;
    let stack = crate::helpers::Stack::start(
        cxone_offboard::sim::SimOptions {
            users: 5,
            interactions_per_user: 2,
            ..cxone_offboard::sim::SimOptions::default()
        },
        &[],
    )
    .await;
    stack
        .sim_post(
            "/_sim/faults",
            serde_json::json!({"users": {"E000003": {"unassign_skills": 403}}}),
        )
        .await;
    stack.terminate("E000003", serde_json::json!({})).await;
    let first = stack.tap.wait(1, Duration::from_secs(60)).await;
    assert_eq!(first[0]["type"], "offboard.saga.failed");
    assert_eq!(first[0]["data"]["error"]["step"], "unassign_skills");
    assert_eq!(
        stack
            .outside
            .wait_len(&stack.names.dead(), 1, Duration::from_secs(10))
            .await,
        1
    );
    let writes_before = stack.sim_get("/_sim/users/E000003").await["writes"].clone();
    // The operator fixes the cause, then replays.
    stack.sim_post("/_sim/faults", serde_json::json!({})).await;
    let out = run(
        &stack.names,
        &[
            "replay",
            "--class",
            "permanent",
            "--step",
            "unassign_skills",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let outcomes = stack.tap.wait(2, Duration::from_secs(60)).await;
    assert_eq!(
        outcomes[1]["type"], "offboard.saga.completed",
        "{}",
        outcomes[1]
    );
    assert_eq!(outcomes[1]["data"]["status"], "DELETED");
    let steps = &outcomes[1]["data"]["steps"];
    assert_eq!(steps[1]["name"], "block_login");
    assert_eq!(steps[1]["attempts"], 1, "block_login was not run again");
    assert_eq!(steps[4]["attempts"], 2, "unassign_skills resumed");
    let after = stack.sim_get("/_sim/users/E000003").await;
    assert_eq!(
        after["writes"]["PUT /inContactAPI/services/{version}/agents/{agentId}"],
        writes_before["PUT /inContactAPI/services/{version}/agents/{agentId}"],
        "no second block_login write"
    );
    assert_eq!(after["status"], "DELETED");
    assert_eq!(stack.outside.queue_len(&stack.names.dead()).await, 0);
    stack.stop().await;
}
