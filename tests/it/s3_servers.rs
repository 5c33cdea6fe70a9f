//! The worker on s3s-fs (issue 17): an S3 server that verifies SigV4 and checksums and has no
//! `ListMultipartUploads` (501). `scripts/services.sh up` starts it on 127.0.0.1:9001.

use std::time::Duration;

use cxone_offboard::sim::SimOptions;
use serde_json::json;

use crate::helpers::{BROKER, Stack};

pub fn s3s_endpoint() -> String {
    std::env::var("OFFBOARD_TEST_S3S_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:9001".into())
}

/// Runs `cxone-offboard ARGS` against s3s-fs with the stack's names.
async fn cli(stack: &Stack, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_cxone-offboard"))
        .args(args)
        .envs(stack.names.env())
        .env("OFFBOARD__S3__ENDPOINT", s3s_endpoint())
        .env("OFFBOARD__CXONE__ACCESS_KEY_ID", "sim-key")
        .env("OFFBOARD__CXONE__ACCESS_KEY_SECRET", "sim-secret")
        .env("OFFBOARD__CXONE__ISSUER", stack.sim.base_url())
        .output()
        .await
        .expect("the binary runs")
}

#[tokio::test]
async fn the_happy_path_on_s3s_fs() {
    let _shared = BROKER.read().await;
    let endpoint = s3s_endpoint();
    let stack = Stack::start(
        SimOptions {
            users: 10,
            interactions_per_user: 4,
            ..SimOptions::default()
        },
        &[("OFFBOARD__S3__ENDPOINT", &endpoint)],
    )
    .await;
    // One leaver with a history large enough for a multipart archive (> 5 MiB).
    stack
        .sim_post(
            "/_sim/users",
            json!({"external_id": "BIG0001", "interactions": 20_000}),
        )
        .await;
    for n in 1..=10 {
        stack.terminate(&format!("E{n:06}"), json!({})).await;
    }
    stack.terminate("BIG0001", json!({})).await;
    let outcomes = stack.tap.wait(11, Duration::from_secs(120)).await;
    let completed: Vec<_> = outcomes
        .iter()
        .filter(|o| o["type"] == "offboard.saga.completed")
        .collect();
    assert_eq!(completed.len(), 11, "{outcomes:#?}");
    let big = completed
        .iter()
        .find(|o| o["subject"] == "BIG0001")
        .expect("the large archive");
    assert_eq!(big["data"]["archive"]["records"], 20_000);
    assert!(
        big["data"]["archive"]["bytes"].as_u64().unwrap_or(0) > 5 * 1024 * 1024,
        "multipart-sized: {big}"
    );
    for o in &completed {
        let uri = o["data"]["manifest"]["uri"].as_str().expect("manifest uri");
        let out = cli(&stack, &["verify", uri]).await;
        assert!(
            out.status.success(),
            "verify {uri} on s3s-fs: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let check = cli(&stack, &["check"]).await;
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        text.contains("conditional writes honoured") && text.contains("multipart"),
        "{text}"
    );
    assert_eq!(stack.outside.queue_len(&stack.names.dead()).await, 0);
    stack.stop().await;
}

#[tokio::test]
async fn kill_9_during_a_run_on_s3s_fs_loses_nothing() {
    let endpoint = s3s_endpoint();
    crate::process::kill_9_during_a_run(&[("OFFBOARD__S3__ENDPOINT", &endpoint)]).await;
}
