//! The worker as operators run it: a separate process, killed with -9 or stopped with SIGTERM
//! mid-run, restarted, and nothing lost.

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cxone_offboard::sim::{SimOptions, SimServer, spawn};
use cxone_offboard::store::{S3, Store};
use serde_json::{Value, json};

use crate::helpers::{BROKER, Names, OutcomeTap, Outside, Stack, eventually, termination, until};

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub(crate) struct WorkerProcess {
    pub(crate) child: Child,
    pub http: String,
}

impl WorkerProcess {
    pub(crate) fn start(names: &Names, sim: &SimServer, extra: &[(&str, &str)]) -> Self {
        Self::start_logged(names, sim, extra, None)
    }

    /// Like [`WorkerProcess::start`], appending stderr (the logs) to `log` when given.
    pub(crate) fn start_logged(
        names: &Names,
        sim: &SimServer,
        extra: &[(&str, &str)],
        log: Option<&std::path::Path>,
    ) -> Self {
        let port = free_port();
        let stderr = log
            .and_then(|p| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .ok()
            })
            .map_or_else(Stdio::null, Stdio::from);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cxone-offboard"));
        cmd.arg("worker")
            .stdout(Stdio::null())
            .stderr(stderr)
            .envs(names.env())
            .envs(Stack::sim_env(sim))
            .env("OFFBOARD__HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .env("OFFBOARD__LOG__FORMAT", "json");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("worker process starts");
        Self {
            child,
            http: format!("http://127.0.0.1:{port}"),
        }
    }

    pub(crate) async fn wait_ready(&self) {
        let url = format!("{}/readyz", self.http);
        eventually(
            "the worker process to be ready",
            Duration::from_secs(20),
            || async {
                let r = reqwest::get(&url).await.ok()?;
                (r.status().as_u16() == 200).then_some(())
            },
        )
        .await;
    }

    pub(crate) fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub(crate) fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    pub(crate) async fn wait_exit(mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        None
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn completed_sagas(outcomes: &[Value]) -> BTreeSet<String> {
    outcomes
        .iter()
        .filter(|o| o["type"] == "offboard.saga.completed")
        .filter_map(|o| o["data"]["saga_id"].as_str().map(str::to_owned))
        .collect()
}

/// Sets the simulator's faults (`{}` clears them).
pub(crate) async fn set_faults(sim: &SimServer, faults: Value) {
    reqwest::Client::new()
        .post(format!("{}/_sim/faults", sim.base_url()))
        .json(&faults)
        .send()
        .await
        .expect("faults");
}

pub(crate) async fn sim_user(sim: &SimServer, id: &str) -> Value {
    reqwest::get(format!("{}/_sim/users/{id}", sim.base_url()))
        .await
        .expect("sim")
        .json()
        .await
        .expect("json")
}

#[tokio::test]
async fn kill_9_during_a_run_loses_nothing_and_repeats_no_write() {
    kill_9_during_a_run(&[]).await;
}

/// Five kill -9s during 300 terminations; `extra` is the workers' environment on top (another
/// S3 server, say).
pub(crate) async fn kill_9_during_a_run(extra: &[(&str, &str)]) {
    let _shared = BROKER.read().await;
    let names = Names::new();
    names.create_bucket_for(&names.settings(extra)).await;
    let sim = spawn(
        SimOptions {
            users: 300,
            interactions_per_user: 3,
            ..SimOptions::default()
        },
        "127.0.0.1:0".parse().expect("addr"),
    )
    .await
    .expect("sim");
    // Slow CXone down a little so the kills land mid-saga.
    set_faults(&sim, json!({"latency_ms": 3})).await;
    // The workers' logs, kept for a failed run.
    let log = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("kill9-{}.log", names.bucket()));
    let first = WorkerProcess::start_logged(&names, &sim, extra, Some(&log));
    first.wait_ready().await;
    let tap = OutcomeTap::new(&names.outcomes()).await;
    let outside = Outside::new().await;
    for n in 1..=300 {
        let id = uuid::Uuid::new_v4().to_string();
        let body = serde_json::to_vec(&termination(&id, &format!("E{n:06}"))).expect("json");
        outside
            .publish(&names.events(), "employee.terminated", &body, None)
            .await;
    }
    let mut worker = first;
    let mut kills = 0;
    for pause_ms in [700u64, 1100, 900, 1300, 800] {
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        worker.kill9();
        kills += 1;
        worker = WorkerProcess::start_logged(&names, &sim, extra, Some(&log));
        worker.wait_ready().await;
    }
    let done = until(
        Duration::from_secs(180),
        || async { completed_sagas(&tap.all().await) },
        |done| done.len() == 300,
    )
    .await;
    if done.len() != 300 {
        let list = Command::new(env!("CARGO_BIN_EXE_cxone-offboard"))
            .args(["saga", "list"])
            .envs(names.env())
            .envs(extra.iter().map(|(k, v)| (*k, *v)))
            .output()
            .expect("saga list runs");
        panic!(
            "{} of 300 sagas complete after {kills} kills; worker logs in {}; sagas:\n{}",
            done.len(),
            log.display(),
            String::from_utf8_lossy(&list.stdout)
                .lines()
                .filter(|l| !l.contains("completed"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    assert_eq!(
        outside.queue_len(&names.dead()).await,
        0,
        "none dead-lettered"
    );
    assert_eq!(outside.queue_len(&names.requests()).await, 0, "none stuck");
    for n in 1..=300 {
        let u = sim_user(&sim, &format!("E{n:06}")).await;
        assert_eq!(u["status"], "DELETED", "{u}");
        for (route, count) in u["writes"].as_object().expect("writes") {
            assert_eq!(
                count.as_u64(),
                Some(1),
                "E{n:06}: {route} written {count} times"
            );
        }
    }
    // The logs are for a failed run.
    let _ = std::fs::remove_file(&log);
    worker.kill9();
    sim.shutdown().await;
    names.cleanup().await;
}

#[tokio::test]
async fn sigterm_under_load_drains_within_the_grace_and_loses_nothing() {
    let _shared = BROKER.read().await;
    let names = Names::new();
    names.create_bucket().await;
    let sim = spawn(
        SimOptions {
            users: 60,
            interactions_per_user: 2,
            ..SimOptions::default()
        },
        "127.0.0.1:0".parse().expect("addr"),
    )
    .await
    .expect("sim");
    set_faults(&sim, json!({"latency_ms": 40})).await;
    let grace = 4;
    let extra = [("OFFBOARD__WORKER__SHUTDOWN_GRACE_SECS", "4")];
    let worker = WorkerProcess::start(&names, &sim, &extra);
    worker.wait_ready().await;
    let tap = OutcomeTap::new(&names.outcomes()).await;
    let outside = Outside::new().await;
    for n in 1..=60 {
        let id = uuid::Uuid::new_v4().to_string();
        let body = serde_json::to_vec(&termination(&id, &format!("E{n:06}"))).expect("json");
        outside
            .publish(&names.events(), "employee.terminated", &body, None)
            .await;
    }
    // Under load: the first sagas are finishing.
    let before = crate::helpers::until(
        Duration::from_secs(30),
        || async { completed_sagas(&tap.all().await).len() },
        |n| *n >= 1,
    )
    .await;
    assert!(before < 60, "still under load when SIGTERM arrives");
    let stop = Instant::now();
    worker.sigterm();
    let status = worker
        .wait_exit(Duration::from_secs(grace + 5))
        .await
        .expect("exits inside the grace");
    assert!(status.success(), "clean exit: {status:?}");
    assert!(
        stop.elapsed() < Duration::from_secs(grace + 2),
        "{:?}",
        stop.elapsed()
    );
    // A new pod picks up whatever was handed back.
    let next = WorkerProcess::start(&names, &sim, &extra);
    next.wait_ready().await;
    let done = until(
        Duration::from_secs(120),
        || async { completed_sagas(&tap.all().await) },
        |done| done.len() == 60,
    )
    .await;
    assert_eq!(done.len(), 60, "every event completes; none lost");
    assert_eq!(outside.queue_len(&names.dead()).await, 0);
    next.kill9();
    sim.shutdown().await;
    names.cleanup().await;
}

#[tokio::test]
async fn kill_9_during_a_large_archive_leaves_one_clean_object() {
    let _shared = BROKER.read().await;
    let names = Names::new();
    names.create_bucket().await;
    let sim = spawn(
        SimOptions {
            users: 1,
            interactions_per_user: 0,
            ..SimOptions::default()
        },
        "127.0.0.1:0".parse().expect("addr"),
    )
    .await
    .expect("sim");
    let http = reqwest::Client::new();
    http.post(format!("{}/_sim/users", sim.base_url()))
        .json(&json!({"external_id": "BIG-KILL", "interactions": 60000}))
        .send()
        .await
        .expect("create user");
    http.post(format!("{}/_sim/faults", sim.base_url()))
        .json(&json!({"latency_ms": 4, "routes": ["GET /inContactAPI/services/{version}/contacts/completed"]}))
        .send()
        .await
        .expect("faults");
    let worker = WorkerProcess::start(&names, &sim, &[]);
    worker.wait_ready().await;
    let tap = OutcomeTap::new(&names.outcomes()).await;
    let outside = Outside::new().await;
    let id = uuid::Uuid::new_v4().to_string();
    let body = serde_json::to_vec(&termination(&id, "BIG-KILL")).expect("json");
    outside
        .publish(&names.events(), "employee.terminated", &body, None)
        .await;
    // Kill once more than two parts' worth of pages has gone by (5 MiB ≈ 14,000 contacts, 140
    // pages of 100).
    let pages = || async {
        let s: Value = http
            .get(format!("{}/_sim/stats", sim.base_url()))
            .send()
            .await
            .expect("stats")
            .json()
            .await
            .expect("json");
        s["by_route"]["GET /inContactAPI/services/{version}/contacts/completed"]["200"]
            .as_u64()
            .unwrap_or(0)
    };
    let before_kill = until(Duration::from_secs(60), pages, |n| *n > 300).await;
    assert!(
        before_kill > 300,
        "only {before_kill} pages before the kill"
    );
    worker.kill9();
    let again = WorkerProcess::start(&names, &sim, &[]);
    again.wait_ready().await;
    let outcomes = tap.wait(1, Duration::from_secs(120)).await;
    let o = outcomes.first().expect("an outcome");
    assert_eq!(o["type"], "offboard.saga.completed", "{o}");
    assert_eq!(o["data"]["archive"]["records"], 60000);
    let settings = names.settings(&[]);
    let store = S3::new(&settings.s3).await;
    let uri = o["data"]["archive"]["uri"].as_str().expect("uri");
    let key = uri
        .strip_prefix(&format!("s3://{}/", settings.s3.bucket))
        .expect("uri in bucket");
    let object = store.get(key).await.expect("get").expect("archive");
    let ids: Vec<String> = object
        .body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            let v: Value = serde_json::from_slice(l).expect("json line");
            v["contactId"].to_string()
        })
        .collect();
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(ids.len(), 60000);
    assert_eq!(unique.len(), 60000, "no duplicate lines");
    assert!(
        crate::helpers::open_uploads(&store, key).await.is_empty(),
        "no leftover multipart upload"
    );
    // Issue 17, item 12: the resumed archive continued from its last part instead of starting
    // over: at most one part's worth of pages (plus the one in flight) is fetched twice.
    let total = pages().await;
    assert!(
        total < 600 + 150,
        "{total} pages fetched for 600: the archive restarted from zero ({before_kill} before the kill)"
    );
    again.kill9();
    sim.shutdown().await;
    names.cleanup().await;
}
