//! The worker on s3s-fs (issue 17): an S3 server that verifies SigV4 and checksums and has no
//! `ListMultipartUploads` (501). `scripts/services.sh up` starts it on 127.0.0.1:9001.

use std::time::Duration;

use bytes::Bytes;
use cxone_offboard::sim::SimOptions;
use cxone_offboard::store::{S3, Store, Write};
use serde_json::json;

use crate::helpers::{BROKER, Names, Stack, eventually};

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

/// An s3s-fs of one test's own, on a fresh directory.
struct OwnS3s {
    child: std::process::Child,
    dir: tempfile::TempDir,
    endpoint: String,
}

impl OwnS3s {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let port = crate::process::free_port();
        let child = std::process::Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", "test", "--secret-key", "test"])
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("s3s-fs starts (scripts/services.sh installs it)");
        let me = Self {
            child,
            dir,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        eventually("s3s-fs to answer", Duration::from_secs(30), || async {
            reqwest::get(&me.endpoint).await.ok().map(|_| ())
        })
        .await;
        me
    }

    /// The file where s3s-fs keeps an object's ETag and checksums.
    fn internal_info(&self, bucket: &str, key: &str) -> std::path::PathBuf {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        self.dir.path().join(format!(
            ".bucket-{}.object-{}.internal.json",
            b64(bucket),
            b64(key)
        ))
    }
}

impl Drop for OwnS3s {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// s3s-fs renames a new body into place before it saves that body's ETag and checksum, and
/// drops the request when its client goes away: a worker killed in between leaves a journal
/// whose stored checksum is the previous version's. Found by the kill -9 run in CI (295 of
/// 300): the SDK refused every read of such a journal, and its saga parked for ever.
#[tokio::test]
async fn a_journal_write_cut_off_by_a_kill_on_s3s_fs_is_read_and_written_again() {
    let server = OwnS3s::start().await;
    let names = Names::new();
    std::fs::create_dir_all(server.dir.path().join(names.bucket())).expect("bucket dir");
    let settings = names.settings(&[("OFFBOARD__S3__ENDPOINT", &server.endpoint)]);
    let store = S3::new(&settings.s3).await;
    let key = "sagas/cut-off.json";
    let json = "application/json";
    let first = store
        .put(key, Bytes::from_static(b"{\"v\":1}"), json, Write::Create)
        .await
        .expect("first version");
    let info = server.internal_info(&names.bucket(), key);
    let first_info = std::fs::read(&info).expect("s3s-fs keeps the ETag beside the object");
    store
        .put(
            key,
            Bytes::from_static(b"{\"v\":2}"),
            json,
            Write::Replace(first),
        )
        .await
        .expect("second version");
    // What the cut-off write leaves: the new body, the old ETag and checksum.
    std::fs::write(&info, first_info).expect("restore");
    let read = store
        .get(key)
        .await
        .expect("the journal is readable")
        .expect("it exists");
    assert_eq!(&read.body[..], b"{\"v\":2}");
    store
        .put(
            key,
            Bytes::from_static(b"{\"v\":3}"),
            json,
            Write::Replace(read.etag),
        )
        .await
        .expect("and can be written again");
    let read = store.get(key).await.expect("readable").expect("exists");
    assert_eq!(&read.body[..], b"{\"v\":3}");
}

/// The same cut-off write seen by a saga: its journal's body no longer matches the checksum
/// s3s-fs keeps for it. The saga goes on once CXone answers again, instead of parking for ever.
#[tokio::test]
async fn a_saga_whose_journal_write_was_cut_off_on_s3s_fs_completes() {
    let _shared = BROKER.read().await;
    let server = OwnS3s::start().await;
    let stack = Stack::start(
        SimOptions {
            users: 1,
            interactions_per_user: 2,
            ..SimOptions::default()
        },
        &[("OFFBOARD__S3__ENDPOINT", &server.endpoint)],
    )
    .await;
    stack
        .sim_post(
            "/_sim/faults",
            json!({"users": {"E000001": {"logout": 503}}}),
        )
        .await;
    stack.terminate("E000001", json!({})).await;
    crate::helpers::wait_parked(&stack.worker.base, "the saga parked").await;
    // The worker stops (its parked copy waits in a delay queue), so nothing rewrites the
    // journal while it is changed.
    let Stack {
        names,
        sim,
        worker,
        tap,
        ..
    } = stack;
    worker.stop().await.expect("the worker stops");
    let sagas = server.dir.path().join(names.bucket()).join("sagas");
    let journal = std::fs::read_dir(&sagas)
        .expect("the journal directory")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "json"))
        .expect("the saga's journal");
    // The body changes, its stored checksum does not: what a write cut off by a kill leaves.
    let mut body = std::fs::read(&journal).expect("journal");
    body.push(b'\n');
    let edited = server.dir.path().join("edited.tmp");
    std::fs::write(&edited, body).expect("write");
    std::fs::rename(&edited, &journal).expect("rename");
    crate::process::set_faults(&sim, json!({})).await;
    let worker = crate::process::WorkerProcess::start(
        &names,
        &sim,
        &[("OFFBOARD__S3__ENDPOINT", &server.endpoint)],
    );
    worker.wait_ready().await;
    let outcomes = tap.wait(1, Duration::from_secs(60)).await;
    assert_eq!(
        outcomes.first().map(|o| o["type"].clone()),
        Some(json!("offboard.saga.completed")),
        "{outcomes:#?}"
    );
    worker.kill9();
    sim.shutdown().await;
    names.cleanup().await;
}
