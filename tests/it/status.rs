//! `cxone-offboard status` as an operator runs it, against a worker that has completed, held
//! and failed sagas: the counts come from the journals in S3 and the broker's queues (another
//! process than the worker), the next commands are named, `--json` is one document, and
//! `--watch` redraws until interrupted.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{BROKER, Stack, eventually};

fn sim(users: u64) -> cxone_offboard::sim::SimOptions {
    cxone_offboard::sim::SimOptions {
        users,
        interactions_per_user: 1,
        ..cxone_offboard::sim::SimOptions::default()
    }
}

async fn status(stack: &Stack, args: &[&str]) -> (i32, String, String) {
    let env = stack.names.env();
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_cxone-offboard"))
            .arg("status")
            .args(args)
            .envs(env)
            .output()
    })
    .await
    .expect("join")
    .expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn status_counts_done_held_and_failed_and_names_the_next_commands() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(
        sim(6),
        &[("OFFBOARD__GUARD__MAX_DESTRUCTIVE_PER_WINDOW", "3")],
    )
    .await;
    stack
        .sim_post(
            "/_sim/faults",
            json!({"users": {"E000001": {"block_login": 403}}}),
        )
        .await;
    // E000001 first: it takes one of the guard's 3 admissions and fails (403). Of the other
    // five, two are admitted and three held.
    stack.terminate("E000001", json!({})).await;
    stack.tap.wait(1, Duration::from_secs(60)).await;
    for n in 2..=6 {
        stack.terminate(&format!("E{n:06}"), json!({})).await;
    }
    stack.tap.wait(6, Duration::from_secs(60)).await;
    let doc: Value = eventually(
        "status shows every saga",
        Duration::from_secs(20),
        || async {
            let (code, stdout, stderr) = status(&stack, &["--json", "--since", "10m"]).await;
            assert_eq!(code, 0, "{stdout}\n{stderr}");
            let doc: Value = serde_json::from_str(stdout.trim()).expect("one JSON document");
            (doc["progress"]["sagas"] == 6 && doc["progress"]["held"] == 3).then_some(doc)
        },
    )
    .await;
    let p = &doc["progress"];
    assert_eq!(p["failed"], 1, "{doc:#}");
    assert_eq!(p["done"], 2, "{doc:#}");
    assert_eq!(p["revoking"], 0, "{doc:#}");
    assert_eq!(p["failed_sagas"][0][1], "E000001", "{doc:#}");
    let queues = doc["queues"]["queues"].as_array().expect("queues");
    let depth = |role: &str| {
        queues
            .iter()
            .filter(|q| q["role"] == role)
            .map(|q| q["messages"].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    assert_eq!(depth("held"), 3, "{doc:#}");
    assert_eq!(depth("dead"), 1, "{doc:#}");
    let next: Vec<&str> = doc["next"]
        .as_array()
        .expect("next")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for want in [
        "cxone-offboard guard release --count 3",
        "cxone-offboard saga list --status failed",
        "cxone-offboard dlq list",
    ] {
        assert!(next.contains(&want), "{want} in {next:?}");
    }

    // The table an operator reads.
    let (code, table, _) = status(&stack, &["--since", "10m"]).await;
    assert_eq!(code, 0);
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let has = |want: &[&str]| rows.iter().any(|r| r.starts_with(want));
    assert!(
        has(&["held", "by", "the", "guard", "3", "held", "queue:", "3"]),
        "{table}"
    );
    assert!(has(&["failed", "1", "dead", "letters:", "1"]), "{table}");
    assert!(has(&["FAILED", "1"]), "{table}");
    assert!(
        table.contains("cxone-offboard guard release --count 3"),
        "{table}"
    );

    // --watch redraws until Ctrl-C, then exits 0.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cxone-offboard"))
        .args([
            "status",
            "--watch",
            "--json",
            "--interval",
            "1",
            "--since",
            "10m",
        ])
        .envs(stack.names.env())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("status --watch runs");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    for _ in 0..2 {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("a redraw within 20 s")
            .expect("read")
            .expect("a line");
        let doc: Value = serde_json::from_str(&line).expect("json per redraw");
        assert_eq!(doc["progress"]["sagas"], 6);
    }
    let pid = child.id().expect("pid");
    let sent = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits after Ctrl-C")
        .expect("wait");
    assert!(status.success(), "{status:?}");
    stack.stop().await;
}

#[tokio::test]
async fn status_without_a_broker_still_shows_the_journals_and_exits_1() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(sim(1), &[]).await;
    stack.terminate("E000001", json!({})).await;
    stack.tap.wait(1, Duration::from_secs(60)).await;
    let mut env = stack.names.env();
    env.push((
        "OFFBOARD__AMQP__URL".to_owned(),
        "amqp://guest:guest@127.0.0.1:1/%2f".to_owned(),
    ));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_cxone-offboard"))
            .args(["status", "--since", "10m"])
            .envs(env)
            .output()
    })
    .await
    .expect("join")
    .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("broker                unavailable"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("guest:guest"),
        "no credentials shown: {stdout}"
    );
    assert!(stdout.contains("DELETED"), "{stdout}");
    stack.stop().await;
}
