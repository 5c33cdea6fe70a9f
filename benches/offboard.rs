//! End-to-end benchmarks of issue 10: the release worker binary, as separate processes, against
//! the simulator (a separate process), the real RabbitMQ broker and an S3 server (moto).
//!
//! ```text
//! cargo bench --bench offboard -- [--quick] [--runs N] [--out FILE] [--svg-dir DIR]
//!                                 [--only layoff,client,scaleout,overhead,memory,startup,simtp]
//!                                 [--python PATH]
//! ```
//! `make bench` writes BENCHMARKS.md and docs/bench/*.svg; `make bench-quick` runs a scaled-down
//! version of every workload into target/bench-quick/. Requests and 429s are counted by the
//! simulator (`/_sim/stats`) and cross-checked against the worker's own `/metrics`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_cxone-offboard");
const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The tenant quota of workloads 1–3.
const R: f64 = 200.0;
const SIM_BURST: u32 = 50;
const REVOKE_ROUTES: [&str; 7] = [
    "POST /user-management/v2/users/search",
    "GET /inContactAPI/services/{version}/agents/{agentId}",
    "GET /inContactAPI/services/{version}/access-keys",
    "PUT /inContactAPI/services/{version}/agents/{agentId}",
    "GET /inContactAPI/services/{version}/agents/{agentId}/states",
    "POST /inContactAPI/services/{version}/agents/{agentId}/logout",
    "DELETE /inContactAPI/services/{version}/access-keys/{accessKeyId}",
];
/// Worker settings used for the layoff, scale-out and overhead workloads.
const IN_FLIGHT: usize = 2000;
const PREFETCH: usize = 2000;

#[derive(Clone)]
struct Opts {
    quick: bool,
    runs: usize,
    out: PathBuf,
    svg_dir: PathBuf,
    only: Option<Vec<String>>,
    python: PathBuf,
    work: PathBuf,
    /// `s3s-fs` or `moto`; unset: s3s-fs for one worker process, moto for several.
    s3: Option<String>,
}

fn parse_args() -> anyhow::Result<Opts> {
    let mut o = Opts {
        quick: false,
        runs: 3,
        out: PathBuf::from("BENCHMARKS.md"),
        svg_dir: PathBuf::from("docs/bench"),
        only: None,
        python: PathBuf::from("python3"),
        work: std::env::temp_dir().join(format!("cxone-bench-{}", std::process::id())),
        s3: None,
    };
    let mut out_set = false;
    let mut svg_set = false;
    let mut runs_set = false;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--quick" => o.quick = true,
            "--runs" => {
                o.runs = value()?.parse()?;
                runs_set = true;
            }
            "--out" => {
                o.out = PathBuf::from(value()?);
                out_set = true;
            }
            "--svg-dir" => {
                o.svg_dir = PathBuf::from(value()?);
                svg_set = true;
            }
            "--only" => o.only = Some(value()?.split(',').map(str::to_owned).collect()),
            "--python" => o.python = PathBuf::from(value()?),
            "--s3" => {
                let v = value()?;
                if !matches!(v.as_str(), "s3s-fs" | "moto") {
                    bail!("--s3 takes s3s-fs or moto");
                }
                o.s3 = Some(v);
            }
            "--bench" | "--test" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    if o.quick {
        if !out_set {
            o.out = PathBuf::from("target/bench-quick/bench-quick.md");
        }
        if !svg_set {
            o.svg_dir = PathBuf::from("target/bench-quick");
        }
        if !runs_set {
            o.runs = 1;
        }
    }
    Ok(o)
}

impl Opts {
    fn wants(&self, name: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|l| l.iter().any(|x| x == name))
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

struct Proc {
    name: String,
    child: Child,
    pid: u32,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<Self> {
        let file = std::fs::File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let pid = child.id();
        Ok(Self {
            name: name.to_owned(),
            child,
            pid,
        })
    }

    /// user+sys CPU seconds so far.
    fn cpu_secs(&self) -> Option<f64> {
        cpu_of(self.pid)
    }

    /// Peak resident set (VmHWM), KiB.
    fn hwm_kib(&self) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        s.lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// SIGKILL at once (a crash, not a shutdown).
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL after `grace`.
    fn stop(&mut self, grace: Duration) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status();
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("[bench] {} did not stop in {grace:?}; killing", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn cpu_of(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clk_tck())
}

/// `PUT /{bucket}` on a local S3 server that takes unsigned requests (moto).
fn put_bucket(url: &str) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").context("http url")?;
    let (host, path) = rest.split_once('/').context("path")?;
    let mut conn = std::net::TcpStream::connect(host)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        conn,
        "PUT /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    if !answer.starts_with("HTTP/1.1 200") && !answer.starts_with("HTTP/1.0 200") {
        bail!("PUT {url}: {}", answer.lines().next().unwrap_or(""));
    }
    Ok(())
}

/// s3s-fs from PATH or `~/.cargo/bin` (`scripts/services.sh up s3s-fs` installs it).
fn s3s_fs_binary() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let cargo = home.join(".cargo/bin/s3s-fs");
    if cargo.exists() {
        cargo
    } else {
        PathBuf::from("s3s-fs")
    }
}

/// A Redis of one run's own, on a free port (the shared quota of workloads 7 and 8).
fn start_redis(dir: &Path) -> anyhow::Result<(Proc, String)> {
    let port = free_port()?;
    let redis = Proc::spawn(
        "redis",
        Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null()),
        &dir.join("redis.log"),
    )?;
    wait_port(port, Duration::from_secs(10))?;
    Ok((redis, format!("redis://127.0.0.1:{port}/0")))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_port(port: u16, within: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("port {port} did not open within {within:?}")
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Total and idle CPU ticks of the machine (`/proc/stat`).
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // idle + iowait
    Some((v.iter().sum(), v.get(3)? + v.get(4).copied().unwrap_or(0)))
}

/// Waits (bounded by `within`) until the machine is quiet — at least 90 % of the CPU idle over
/// a one-second sample — so runs are comparable, and says how busy it was. (The 1-minute load
/// average, used at first, decays too slowly after a run to say when the machine is quiet.)
fn settle(max_busy: f64, within: Duration) -> String {
    let until = Instant::now() + within;
    let mut busy = f64::NAN;
    loop {
        if let Some((t0, i0)) = cpu_ticks() {
            std::thread::sleep(Duration::from_secs(1));
            if let Some((t1, i1)) = cpu_ticks() {
                let dt = t1.saturating_sub(t0).max(1) as f64;
                busy = 1.0 - (i1.saturating_sub(i0)) as f64 / dt;
            }
        } else {
            std::thread::sleep(Duration::from_secs(1));
        }
        if busy.is_nan() || busy <= max_busy || Instant::now() >= until {
            break;
        }
    }
    format!("{:.0} % CPU busy, load {}", 100.0 * busy, loadavg())
}

/// Starts `cxone-offboard sim` with these users and quota; returns it with its base URL.
fn start_sim(dir: &Path, sim: &SimArgs) -> anyhow::Result<(Proc, String)> {
    let sim_port = free_port()?;
    let mut cmd = Command::new(BIN);
    cmd.args(["sim", "--listen", &format!("127.0.0.1:{sim_port}")])
        .args(["--users", &sim.users.to_string()])
        .args(["--interactions-per-user", &sim.interactions.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped());
    if let Some((rate, burst)) = sim.rate_limit {
        cmd.args([
            "--rate-limit",
            &rate.to_string(),
            "--burst",
            &burst.to_string(),
        ]);
    }
    let mut simp = Proc::spawn("sim", &mut cmd, &dir.join("sim.log"))?;
    let stdout = simp.child.stdout.take().context("sim stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        // Keep draining so the simulator never blocks on a full pipe.
        for _ in lines {}
    });
    let line = rx
        .recv_timeout(Duration::from_secs(10))
        .context("simulator did not print its address")?;
    let sim_url = line
        .trim()
        .strip_prefix("listening on ")
        .context("unexpected simulator banner")?
        .to_owned();
    Ok((simp, sim_url))
}

// ---------------------------------------------------------------------------------------------
// One run's services

struct Stack {
    dir: PathBuf,
    prefix: String,
    bucket: String,
    s3: Proc,
    s3_url: String,
    sim: Proc,
    sim_url: String,
}

struct SimArgs {
    users: u64,
    interactions: u64,
    rate_limit: Option<(f64, u32)>,
}

impl Stack {
    fn start(opts: &Opts, tag: &str, sim: &SimArgs, workers: usize) -> anyhow::Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let short = &id[..10];
        let dir = opts.work.join(format!("{tag}-{short}"));
        std::fs::create_dir_all(&dir)?;
        let bucket = format!("bench-{short}");
        let s3_port = free_port()?;
        // A fresh S3 server per run = a fresh store. s3s-fs (Rust, files on disk) for one
        // worker process: it is not what is measured. Its conditional writes are not atomic
        // (SERVICES.md): processes racing on the guard window made it keep one PUT's checksum
        // with another's body, and every read after failed its checksum — so several worker
        // processes get moto (one Python process, atomic). `--s3` chooses for all runs.
        let kind = opts
            .s3
            .clone()
            .unwrap_or_else(|| if workers > 1 { "moto" } else { "s3s-fs" }.to_owned());
        let s3 = if kind == "moto" {
            let s3 = Proc::spawn(
                "moto",
                Command::new(&opts.python)
                    .args([
                        "-m",
                        "moto.server",
                        "-H",
                        "127.0.0.1",
                        "-p",
                        &s3_port.to_string(),
                    ])
                    .stdout(Stdio::null()),
                &dir.join("moto.log"),
            )?;
            wait_port(s3_port, Duration::from_secs(20))?;
            let created = put_bucket(&format!("http://127.0.0.1:{s3_port}/{bucket}"));
            created.with_context(|| format!("creating bucket {bucket}"))?;
            s3
        } else {
            let root = dir.join("s3");
            // A bucket is a directory to s3s-fs.
            std::fs::create_dir_all(root.join(&bucket))?;
            let s3 = Proc::spawn(
                "s3s-fs",
                Command::new(s3s_fs_binary())
                    .args([
                        "--host",
                        "127.0.0.1",
                        "--port",
                        &s3_port.to_string(),
                        "--access-key",
                        "test",
                        "--secret-key",
                        "test",
                    ])
                    .arg(&root)
                    .stdout(Stdio::null()),
                &dir.join("s3s-fs.log"),
            )?;
            wait_port(s3_port, Duration::from_secs(20))?;
            s3
        };
        let (simp, sim_url) = start_sim(&dir, sim)?;
        Ok(Self {
            dir,
            prefix: format!("bench-{short}."),
            bucket,
            s3,
            s3_url: format!("http://127.0.0.1:{s3_port}"),
            sim: simp,
            sim_url,
        })
    }

    fn name(&self, base: &str) -> String {
        format!("{}{base}", self.prefix)
    }

    fn worker_env(&self, w: &WorkerCfg, http_port: u16) -> Vec<(String, String)> {
        let p = |s: &str| self.name(s);
        [
            ("OFFBOARD__AMQP__URL", AMQP_URL.to_owned()),
            ("OFFBOARD__AMQP__EVENTS_EXCHANGE", p("hr.events")),
            ("OFFBOARD__AMQP__REQUESTS_QUEUE", p("offboard.requests")),
            ("OFFBOARD__AMQP__DEAD_LETTER_EXCHANGE", p("offboard.dlx")),
            ("OFFBOARD__AMQP__DEAD_QUEUE", p("offboard.dead")),
            ("OFFBOARD__AMQP__OUTCOMES_EXCHANGE", p("offboard.outcomes")),
            ("OFFBOARD__AMQP__HELD_QUEUE", p("offboard.held")),
            ("OFFBOARD__AMQP__DELAY_QUEUE_PREFIX", p("offboard.delay")),
            (
                "OFFBOARD__AMQP__HOUSEKEEPING_QUEUE",
                p("offboard.housekeeping"),
            ),
            ("OFFBOARD__HTTP__LISTEN", format!("127.0.0.1:{http_port}")),
            ("OFFBOARD__S3__ENDPOINT", self.s3_url.clone()),
            ("OFFBOARD__S3__BUCKET", self.bucket.clone()),
            ("OFFBOARD__S3__REGION", "us-east-1".to_owned()),
            ("OFFBOARD__CXONE__ISSUER", self.sim_url.clone()),
            ("OFFBOARD__CXONE__ACCESS_KEY_ID", "sim-key".to_owned()),
            (
                "OFFBOARD__CXONE__ACCESS_KEY_SECRET",
                "sim-secret".to_owned(),
            ),
            (
                "OFFBOARD__CXONE__RATE_LIMIT__REQUESTS_PER_SECOND",
                w.rps.to_string(),
            ),
            ("OFFBOARD__CXONE__RATE_LIMIT__BURST", w.burst.to_string()),
            (
                "OFFBOARD__GUARD__MAX_DESTRUCTIVE_PER_WINDOW",
                "100000".to_owned(),
            ),
            ("OFFBOARD__LOG__FORMAT", "json".to_owned()),
            (
                "OFFBOARD__LOG__FILTER",
                std::env::var("BENCH_LOG").unwrap_or_else(|_| "warn".to_owned()),
            ),
            ("AWS_ACCESS_KEY_ID", "test".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .chain(
            [
                w.prefetch
                    .map(|n| ("OFFBOARD__AMQP__PREFETCH", n.to_string())),
                w.in_flight
                    .map(|n| ("OFFBOARD__WORKER__MAX_IN_FLIGHT", n.to_string())),
                w.redis
                    .clone()
                    .map(|url| ("OFFBOARD__CXONE__RATE_LIMIT__REDIS_URL", url)),
                w.redis.as_ref().map(|_| {
                    (
                        "OFFBOARD__CXONE__RATE_LIMIT__REDIS_KEY",
                        self.prefix.clone(),
                    )
                }),
            ]
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.to_owned(), v)),
        )
        .collect()
    }

    /// Starts a worker and waits for `/readyz` = 200; returns it with its start-up time.
    async fn worker(&self, w: &WorkerCfg, n: usize) -> anyhow::Result<Worker> {
        let port = free_port()?;
        let mut cmd = Command::new(BIN);
        cmd.arg("worker")
            .env_remove("RUST_LOG")
            .envs(self.worker_env(w, port))
            .stdout(Stdio::null());
        let began = Instant::now();
        let proc = Proc::spawn(
            &format!("worker{n}"),
            &mut cmd,
            &self.dir.join(format!("worker{n}.log")),
        )?;
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let until = began + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(format!("{url}/readyz")).send().await
                && r.status().as_u16() == 200
            {
                break;
            }
            if Instant::now() > until {
                bail!(
                    "worker {n} not ready within 30 s; see {}",
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(Worker {
            proc,
            url,
            ready_after: began.elapsed(),
        })
    }

    async fn cleanup(self) {
        if let Ok(conn) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await
            && let Ok(ch) = conn.create_channel().await
        {
            let mut queues: Vec<String> = [
                "offboard.requests",
                "offboard.housekeeping",
                "offboard.dead",
                "offboard.held",
            ]
            .iter()
            .map(|q| self.name(q))
            .collect();
            // Delay queues are declared on first use, one per stage and delay.
            for secs in [
                1, 2, 4, 5, 8, 10, 16, 30, 32, 60, 64, 120, 300, 600, 1800, 3600, 86400,
            ] {
                for stage in ["requests", "housekeeping"] {
                    queues.push(self.name(&format!("offboard.delay.{stage}.{secs}s")));
                }
            }
            for q in queues {
                let _ = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            for e in ["hr.events", "offboard.dlx", "offboard.outcomes"] {
                let _ = ch
                    .exchange_delete(self.name(e).as_str().into(), Default::default())
                    .await;
            }
            let _ = conn.close(200, "bench cleanup".into()).await;
        }
        let Self {
            dir,
            mut s3,
            mut sim,
            ..
        } = self;
        sim.stop(Duration::from_secs(5));
        s3.stop(Duration::from_secs(5));
        if std::env::var_os("BENCH_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

#[derive(Clone)]
struct WorkerCfg {
    rps: f64,
    burst: u32,
    /// `None`: the worker's defaults.
    in_flight: Option<usize>,
    prefetch: Option<usize>,
    /// The shared quota's Redis.
    redis: Option<String>,
}

struct Worker {
    proc: Proc,
    url: String,
    ready_after: Duration,
}

// ---------------------------------------------------------------------------------------------
// Simulator and worker counters

#[derive(Debug, Clone, Default)]
struct SimStats {
    total: u64,
    throttled: u64,
    by_route: BTreeMap<String, BTreeMap<String, u64>>,
}

async fn sim_stats(http: &reqwest::Client, sim_url: &str) -> anyhow::Result<SimStats> {
    let v: Value = http
        .get(format!("{sim_url}/_sim/stats"))
        .send()
        .await?
        .json()
        .await?;
    let mut by_route = BTreeMap::new();
    if let Some(m) = v["by_route"].as_object() {
        for (route, statuses) in m {
            let mut s = BTreeMap::new();
            if let Some(o) = statuses.as_object() {
                for (status, n) in o {
                    s.insert(status.clone(), n.as_u64().unwrap_or(0));
                }
            }
            by_route.insert(route.clone(), s);
        }
    }
    Ok(SimStats {
        total: v["total"].as_u64().unwrap_or(0),
        throttled: v["throttled"].as_u64().unwrap_or(0),
        by_route,
    })
}

impl SimStats {
    /// Non-429 answers on the revocation routes.
    fn revoke_requests(&self) -> u64 {
        REVOKE_ROUTES
            .iter()
            .filter_map(|r| self.by_route.get(*r))
            .flat_map(|s| {
                s.iter()
                    .filter(|(k, _)| k.as_str() != "429")
                    .map(|(_, n)| n)
            })
            .sum()
    }
}

/// (requests, throttled) from a worker's Prometheus text.
async fn worker_counts(http: &reqwest::Client, url: &str) -> Option<(f64, f64)> {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(client_scaleout::parse_counts(&text))
}

// ---------------------------------------------------------------------------------------------
// Publishing and the outcome tap

#[derive(Debug, Clone)]
struct Outcome {
    kind: String,
    event_id: String,
    revoked_at: Option<DateTime<Utc>>,
    time: Option<DateTime<Utc>>,
    received: SystemTime,
}

struct Tap {
    _conn: Connection,
    got: Arc<Mutex<Vec<Outcome>>>,
}

fn parse_ts(v: &Value) -> Option<DateTime<Utc>> {
    v.as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

impl Tap {
    async fn new(exchange: &str) -> anyhow::Result<Self> {
        let conn = Connection::connect(AMQP_URL, ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        ch.queue_bind(
            q.name().clone(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let mut consumer = ch
            .basic_consume(
                q.name().clone(),
                "bench-tap".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let received = SystemTime::now();
                if let Ok(v) = serde_json::from_slice::<Value>(&d.data) {
                    let o = Outcome {
                        kind: v["type"].as_str().unwrap_or_default().to_owned(),
                        event_id: v["data"]["event_id"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                        revoked_at: parse_ts(&v["data"]["revoked_at"]),
                        time: parse_ts(&v["time"]),
                        received,
                    };
                    if let Ok(mut g) = sink.lock() {
                        g.push(o);
                    }
                }
            }
        });
        Ok(Self { _conn: conn, got })
    }

    fn terminal(&self) -> usize {
        self.got.lock().map_or(0, |g| {
            g.iter()
                .filter(|o| {
                    o.kind.ends_with("completed")
                        || o.kind.ends_with("failed")
                        || o.kind.ends_with("held")
                })
                .count()
        })
    }

    fn all(&self) -> Vec<Outcome> {
        self.got.lock().map(|g| g.clone()).unwrap_or_default()
    }
}

/// Publishes one termination per employee, `time` = the publish instant; waits for confirms.
async fn publish(
    exchange: &str,
    run: &str,
    employees: &[u64],
) -> anyhow::Result<HashMap<String, DateTime<Utc>>> {
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut sent = HashMap::with_capacity(employees.len());
    let mut confirms = Vec::with_capacity(employees.len());
    for n in employees {
        let id = format!("bench-{run}-{n}");
        let now = Utc::now();
        let body = serde_json::json!({
            "specversion": "1.0",
            "id": id,
            "source": format!("hris://bench/{run}"),
            "type": "employee.terminated",
            "time": now.to_rfc3339_opts(SecondsFormat::Micros, true),
            "datacontenttype": "application/json",
            "data": {
                "employee": { "external_id": format!("E{n:06}") },
                "reason": "involuntary"
            }
        });
        let bytes = serde_json::to_vec(&body)?;
        let c = ch
            .basic_publish(
                exchange.into(),
                "employee.terminated".into(),
                BasicPublishOptions::default(),
                &bytes,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/cloudevents+json".into()),
            )
            .await?;
        confirms.push(c);
        sent.insert(id, now);
    }
    for c in confirms {
        let confirm = c.await?;
        if !confirm.is_ack() {
            bail!("broker nacked a benchmark event");
        }
    }
    let _ = conn.close(200, "published".into()).await;
    Ok(sent)
}

// ---------------------------------------------------------------------------------------------
// A saga run: N workers, M events, sampling while it runs

struct Sample {
    t: f64,
    sim_total: u64,
    sim_throttled: u64,
    /// Cumulative (requests, throttled) per worker.
    workers: Vec<(f64, f64)>,
}

struct SagaRun {
    /// S3 requests the workers sent (their `offboard_s3_requests_total`).
    s3_requests: f64,
    /// Every worker answered `/readyz` 200 at the end of the run.
    all_ready: bool,
    wall: f64,
    sagas: usize,
    completed: usize,
    failed: usize,
    held: usize,
    sim: SimStats,
    worker_requests: f64,
    worker_throttled: f64,
    worker_cpu: Vec<f64>,
    worker_hwm_kib: Vec<u64>,
    other_cpu: Vec<(String, f64)>,
    ttr: Vec<f64>,
    ttc: Vec<f64>,
    samples: Vec<Sample>,
    load: String,
}

struct SagaSpec<'a> {
    tag: &'a str,
    sim: SimArgs,
    workers: usize,
    worker: WorkerCfg,
    employees: Vec<u64>,
    timeout: Duration,
    /// A Redis of the run's own for the shared quota.
    redis: bool,
    /// kill -9 that Redis this long after the first publish (and leave it down).
    redis_stop_at: Option<Duration>,
}

fn beam_pid() -> Option<u32> {
    let out = Command::new("pgrep")
        .args(["-o", "beam.smp"])
        .output()
        .ok()?;
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

async fn saga_run(opts: &Opts, spec: &SagaSpec<'_>) -> anyhow::Result<SagaRun> {
    let load = settle(0.1, Duration::from_secs(if opts.quick { 5 } else { 30 }));
    let stack = Stack::start(opts, spec.tag, &spec.sim, spec.workers)?;
    let mut worker = spec.worker.clone();
    let mut redis = None;
    if spec.redis {
        let (proc, url) = start_redis(&stack.dir)?;
        worker.redis = Some(url);
        redis = Some(proc);
    }
    let result = saga_run_on(&stack, spec, &worker, redis.as_mut(), load).await;
    if result.is_err() {
        eprintln!("[bench] run failed; logs were in {}", stack.dir.display());
    }
    drop(redis);
    stack.cleanup().await;
    result
}

/// Sums the samples of every series of `metric` in a worker's Prometheus text.
async fn worker_sum(http: &reqwest::Client, url: &str, metric: &str) -> f64 {
    let Ok(resp) = http.get(format!("{url}/metrics")).send().await else {
        return 0.0;
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn saga_run_on(
    stack: &Stack,
    spec: &SagaSpec<'_>,
    worker_cfg: &WorkerCfg,
    mut redis: Option<&mut Proc>,
    load: String,
) -> anyhow::Result<SagaRun> {
    let http = reqwest::Client::new();
    let mut workers = Vec::new();
    for n in 0..spec.workers {
        workers.push(stack.worker(worker_cfg, n).await?);
    }
    let tap = Tap::new(&stack.name("offboard.outcomes")).await?;
    let beam = beam_pid();
    let cpu0: Vec<(String, Option<f64>)> = [
        ("simulator".to_owned(), Some(stack.sim.pid)),
        ("S3 server".to_owned(), Some(stack.s3.pid)),
        ("rabbitmq (beam.smp)".to_owned(), beam),
    ]
    .into_iter()
    .map(|(n, p)| (n, p.and_then(cpu_of)))
    .collect();
    let started = Instant::now();
    let run_id = stack.prefix.trim_end_matches('.').to_owned();
    let sent = publish(&stack.name("hr.events"), &run_id, &spec.employees).await?;
    let mut samples = Vec::new();
    let deadline = started + spec.timeout;
    let mut next = started;
    loop {
        let t = started.elapsed().as_secs_f64();
        let s = sim_stats(&http, &stack.sim_url).await?;
        let mut w = Vec::new();
        for worker in &workers {
            w.push(
                worker_counts(&http, &worker.url)
                    .await
                    .unwrap_or((0.0, 0.0)),
            );
        }
        samples.push(Sample {
            t,
            sim_total: s.total,
            sim_throttled: s.throttled,
            workers: w,
        });
        if let Some(at) = spec.redis_stop_at
            && started.elapsed() >= at
            && let Some(r) = redis.take()
        {
            eprintln!(
                "[bench]   Redis killed at {:.1} s",
                started.elapsed().as_secs_f64()
            );
            r.kill9();
        }
        if tap.terminal() >= spec.employees.len() {
            break;
        }
        if Instant::now() > deadline {
            eprintln!(
                "[bench] {}: timed out with {} of {} outcomes",
                spec.tag,
                tap.terminal(),
                spec.employees.len()
            );
            break;
        }
        next += Duration::from_millis(250);
        tokio::time::sleep_until(next.into()).await;
    }
    let outcomes = tap.all();
    let last = outcomes
        .iter()
        .map(|o| o.received)
        .max()
        .unwrap_or_else(SystemTime::now);
    let first: SystemTime = sent
        .values()
        .min()
        .map_or_else(SystemTime::now, |t| (*t).into());
    let wall = last.duration_since(first).unwrap_or_default().as_secs_f64();
    // Let the counters settle, then read them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sim = sim_stats(&http, &stack.sim_url).await?;
    let mut s3_requests = 0.0;
    let mut all_ready = true;
    for w in &workers {
        s3_requests += worker_sum(&http, &w.url, "offboard_s3_requests_total").await;
        let ready = http
            .get(format!("{}/readyz", w.url))
            .send()
            .await
            .is_ok_and(|r| r.status().as_u16() == 200);
        all_ready &= ready;
    }
    let mut worker_requests = 0.0;
    let mut worker_throttled = 0.0;
    let mut worker_cpu = Vec::new();
    let mut worker_hwm_kib = Vec::new();
    for w in &workers {
        if let Some((r, t)) = worker_counts(&http, &w.url).await {
            worker_requests += r;
            worker_throttled += t;
        }
        worker_cpu.push(w.proc.cpu_secs().unwrap_or(f64::NAN));
        worker_hwm_kib.push(w.proc.hwm_kib().unwrap_or(0));
    }
    let other_cpu = cpu0
        .into_iter()
        .filter_map(|(n, c0)| {
            let pid = match n.as_str() {
                "simulator" => Some(stack.sim.pid),
                "S3 server" => Some(stack.s3.pid),
                _ => beam,
            }?;
            Some((n, cpu_of(pid)? - c0?))
        })
        .collect();
    let mut ttr = Vec::new();
    let mut ttc = Vec::new();
    let (mut completed, mut failed, mut held) = (0, 0, 0);
    for o in &outcomes {
        if o.kind.ends_with("completed") {
            completed += 1;
        } else if o.kind.ends_with("failed") {
            failed += 1;
        } else if o.kind.ends_with("held") {
            held += 1;
        }
        let Some(t0) = sent.get(&o.event_id) else {
            continue;
        };
        if o.kind.ends_with("completed") {
            if let Some(r) = o.revoked_at {
                ttr.push((r - *t0).num_microseconds().unwrap_or(0) as f64 / 1e6);
            }
            let done = o.time.unwrap_or_else(|| o.received.into());
            ttc.push((done - *t0).num_microseconds().unwrap_or(0) as f64 / 1e6);
        }
    }
    ttr.sort_by(f64::total_cmp);
    ttc.sort_by(f64::total_cmp);
    for mut w in workers {
        w.proc.stop(Duration::from_secs(30));
    }
    Ok(SagaRun {
        s3_requests,
        all_ready,
        wall,
        sagas: spec.employees.len(),
        completed,
        failed,
        held,
        sim,
        worker_requests,
        worker_throttled,
        worker_cpu,
        worker_hwm_kib,
        other_cpu,
        ttr,
        ttc,
        samples,
        load,
    })
}

/// `BENCH_TRACE=1`: a line per second of a run — accepted and 429 answers at the simulator,
/// then accepted/429 per worker process (their `/metrics`). A tuning aid for the limiter.
fn trace(run: &SagaRun) {
    let mut prev: Option<&Sample> = None;
    for s in &run.samples {
        if let Some(p) = prev {
            if s.t - p.t < 1.0 {
                continue;
            }
            let dt = s.t - p.t;
            let mut line = format!(
                "[trace] t={:5.1} sim ok {:4.0} 429 {:3.0} |",
                s.t,
                ((s.sim_total - s.sim_throttled) - (p.sim_total - p.sim_throttled)) as f64 / dt,
                (s.sim_throttled - p.sim_throttled) as f64 / dt
            );
            for (w, pw) in s.workers.iter().zip(&p.workers) {
                let _ = write!(
                    line,
                    " {:4.0}/{:2.0}",
                    ((w.0 - w.1) - (pw.0 - pw.1)) / dt,
                    (w.1 - pw.1) / dt
                );
            }
            eprintln!("{line}");
        }
        prev = Some(s);
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics and reporting

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Median, min, max.
fn mmm(values: &[f64]) -> (f64, f64, f64) {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (med, v[0], v[n - 1])
}

fn fmt_mmm(values: &[f64], digits: usize, unit: &str) -> String {
    let (m, lo, hi) = mmm(values);
    if values.len() <= 1 {
        format!("{m:.digits$}{unit}")
    } else {
        format!("**{m:.digits$}{unit}** ({lo:.digits$}–{hi:.digits$})")
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "✅ met" } else { "❌ missed" }
}

/// The run whose `key` is the median (for plots).
fn median_index(values: &[f64]) -> usize {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|a, b| values[*a].total_cmp(&values[*b]));
    idx.get(values.len() / 2).copied().unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// A minimal SVG line chart (no dependency; a reader gets axes, a grid, a legend)

struct Series {
    name: String,
    color: &'static str,
    points: Vec<(f64, f64)>,
    dashed: bool,
}

const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#7f7f7f",
];

fn nice_step(range: f64) -> f64 {
    let raw = range / 6.0;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f < 1.5 {
        1.0
    } else if f < 3.5 {
        2.0
    } else if f < 7.5 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn svg_chart(
    path: &Path,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[Series],
) -> anyhow::Result<()> {
    let (w, h) = (760.0, 420.0);
    let (l, r, t, b) = (70.0, 20.0, 40.0, 55.0);
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut xmax, mut ymax) = (0f64, 0f64);
    for (x, y) in pts {
        if x.is_finite() {
            xmax = xmax.max(*x);
        }
        if y.is_finite() {
            ymax = ymax.max(*y);
        }
    }
    let xmax = if xmax <= 0.0 { 1.0 } else { xmax };
    let ystep = nice_step(if ymax <= 0.0 { 1.0 } else { ymax * 1.08 });
    let ymax = ((ymax * 1.08 / ystep).ceil() * ystep).max(ystep);
    let xstep = nice_step(xmax);
    let xmax = (xmax / xstep).ceil() * xstep;
    let px = |x: f64| l + (x / xmax) * (w - l - r);
    let py = |y: f64| h - b - (y / ymax) * (h - t - b);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        w / 2.0,
        esc(title)
    );
    let mut y = 0.0;
    while y <= ymax + 1e-9 {
        let _ = writeln!(
            s,
            r##"<line x1="{l}" x2="{}" y1="{py:.1}" y2="{py:.1}" stroke="#e0e0e0"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            w - r,
            l - 6.0,
            py(y) + 4.0,
            fmt_tick(y),
            py = py(y)
        );
        y += ystep;
    }
    let mut x = 0.0;
    while x <= xmax + 1e-9 {
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" x2="{px:.1}" y1="{t}" y2="{}" stroke="#eeeeee"/><text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"##,
            h - b,
            h - b + 16.0,
            fmt_tick(x),
            px = px(x)
        );
        x += xstep;
    }
    let _ = writeln!(
        s,
        r#"<line x1="{l}" x2="{l}" y1="{t}" y2="{}" stroke="black"/><line x1="{l}" x2="{}" y1="{}" y2="{}" stroke="black"/>"#,
        h - b,
        w - r,
        h - b,
        h - b
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (l + w - r) / 2.0,
        h - 14.0,
        esc(xlabel)
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
        (t + h - b) / 2.0,
        esc(ylabel)
    );
    for (i, se) in series.iter().enumerate() {
        let mut d = String::new();
        for (k, (x, y)) in se
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .enumerate()
        {
            let _ = write!(
                d,
                "{}{:.1},{:.1} ",
                if k == 0 { "M" } else { "L" },
                px(*x),
                py(*y)
            );
        }
        let dash = if se.dashed {
            r#" stroke-dasharray="6,4""#
        } else {
            ""
        };
        let _ = writeln!(
            s,
            r#"<path d="{d}" fill="none" stroke="{}" stroke-width="1.8"{dash}/>"#,
            se.color
        );
        let ly = t + 8.0 + 16.0 * i as f64;
        let lx = l + 12.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{}" stroke-width="2.5"{dash}/><text x="{}" y="{}">{}</text>"#,
            lx + 22.0,
            se.color,
            lx + 28.0,
            ly + 4.0,
            esc(&se.name)
        );
    }
    s.push_str("</svg>\n");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, s)?;
    Ok(())
}

fn fmt_tick(v: f64) -> String {
    if v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}").trim_end_matches('0').to_owned()
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn cdf(sorted: &[f64]) -> Vec<(f64, f64)> {
    let n = sorted.len().max(1) as f64;
    let step = (sorted.len() / 400).max(1);
    let mut v: Vec<(f64, f64)> = sorted
        .iter()
        .enumerate()
        .filter(|(i, _)| i % step == 0 || *i + 1 == sorted.len())
        .map(|(i, x)| (*x, (i + 1) as f64 / n))
        .collect();
    v.insert(0, (0.0, 0.0));
    v
}

/// Per-second rates from cumulative samples, smoothed over `window` seconds.
fn rates(points: &[(f64, f64)], window: f64) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    let mut j = 0;
    for i in 0..points.len() {
        while j < i && points[i].0 - points[j].0 > window {
            j += 1;
        }
        if i > j {
            let dt = points[i].0 - points[j].0;
            if dt > 0.0 {
                out.push((points[i].0, (points[i].1 - points[j].1) / dt));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Workloads

struct Report {
    md: String,
    summary: Vec<[String; 4]>,
    svg_dir: PathBuf,
    svg_rel: String,
}

impl Report {
    fn row(&mut self, what: &str, target: &str, measured: String, ok: Option<bool>) {
        self.summary.push([
            what.to_owned(),
            target.to_owned(),
            measured,
            ok.map(verdict).unwrap_or("—").to_owned(),
        ]);
    }
    fn svg(&self, name: &str) -> (PathBuf, String) {
        (self.svg_dir.join(name), format!("{}/{name}", self.svg_rel))
    }
}

async fn layoff(opts: &Opts, rep: &mut Report) -> anyhow::Result<Vec<SagaRun>> {
    let n: u64 = if opts.quick { 200 } else { 2000 };
    let contacts = 20;
    let cfg = WorkerCfg {
        rps: R,
        burst: SIM_BURST,
        // Issue 18: the worker's default concurrency must deliver revoke-first.
        in_flight: None,
        prefetch: None,
        redis: None,
    };
    let mut runs = Vec::new();
    for i in 0..opts.runs {
        eprintln!("[bench] layoff run {}/{} ({n} sagas)", i + 1, opts.runs);
        let r = saga_run(
            opts,
            &SagaSpec {
                tag: "layoff",
                sim: SimArgs {
                    users: n,
                    interactions: contacts,
                    rate_limit: Some((R, SIM_BURST)),
                },
                workers: 1,
                worker: cfg.clone(),
                employees: (1..=n).collect(),
                timeout: Duration::from_secs(n / 2 + 120),
                redis: false,
                redis_stop_at: None,
            },
        )
        .await?;
        eprintln!(
            "[bench]   wall {:.1}s total {} 429 {} B {:.1}s p99 ttr {:.1}s",
            r.wall,
            r.sim.total,
            r.sim.throttled,
            r.sim.total as f64 / R,
            percentile(&r.ttr, 99.0)
        );
        runs.push(r);
    }
    let walls: Vec<f64> = runs.iter().map(|r| r.wall).collect();
    let bs: Vec<f64> = runs.iter().map(|r| r.sim.total as f64 / R).collect();
    let ratio: Vec<f64> = runs
        .iter()
        .map(|r| r.wall / (r.sim.total as f64 / R))
        .collect();
    let thr: Vec<f64> = runs
        .iter()
        .map(|r| 100.0 * r.sim.throttled as f64 / r.sim.total.max(1) as f64)
        .collect();
    let rev_b: Vec<f64> = runs
        .iter()
        .map(|r| r.sim.revoke_requests() as f64 / R)
        .collect();
    let p99: Vec<f64> = runs.iter().map(|r| percentile(&r.ttr, 99.0)).collect();
    let p50: Vec<f64> = runs.iter().map(|r| percentile(&r.ttr, 50.0)).collect();
    let p99c: Vec<f64> = runs.iter().map(|r| percentile(&r.ttc, 99.0)).collect();
    let rev_ratio: Vec<f64> = runs
        .iter()
        .map(|r| percentile(&r.ttr, 99.0) / (r.sim.revoke_requests() as f64 / R))
        .collect();
    let hwm: Vec<f64> = runs
        .iter()
        .map(|r| r.worker_hwm_kib.iter().copied().max().unwrap_or(0) as f64 / 1024.0)
        .collect();
    let per_saga: Vec<f64> = runs
        .iter()
        .map(|r| r.sim.total as f64 / r.sagas as f64)
        .collect();
    let s3_per_saga: Vec<f64> = runs
        .iter()
        .map(|r| r.s3_requests / r.sagas as f64)
        .collect();
    let cpu_per_saga: Vec<f64> = runs
        .iter()
        .map(|r| 1000.0 * r.worker_cpu.iter().sum::<f64>() / r.sagas as f64)
        .collect();
    let cross: Vec<String> = runs
        .iter()
        .map(|r| {
            format!(
                "sim {} / worker {:.0} requests, sim {} / worker {:.0} 429s",
                r.sim.total, r.worker_requests, r.sim.throttled, r.worker_throttled
            )
        })
        .collect();
    let (mr, ..) = mmm(&ratio);
    let (mt, ..) = mmm(&thr);
    let (mrr, ..) = mmm(&rev_ratio);
    let (mh, ..) = mmm(&hwm);
    let (cdf_path, cdf_rel) = rep.svg("layoff-cdf.svg");
    let (rate_path, rate_rel) = rep.svg("layoff-rate.svg");
    let m = &mut rep.md;
    let _ = writeln!(
        m,
        "\n## 1. Layoff: {n} terminations at once, R = {R} req/s (burst {SIM_BURST}), {contacts} contacts each\n"
    );
    let _ = writeln!(
        m,
        "Worker: 1 process with the **default concurrency** (`worker.max_in_flight`, `amqp.prefetch`, `worker.housekeeping_max_in_flight` and `amqp.housekeeping_prefetch` not set), `cxone.rate_limit.requests_per_second={R}`, `burst={SIM_BURST}`, `guard.max_destructive_per_window=100000`. All {n} events are published (with confirms) before the clock matters; wall time = first publish → last terminal outcome seen on `offboard.outcomes`. The revocation bound is the revocation requests (resolve, block login, logout, revoke keys, the verification re-read) divided by R: no leaver can be locked out sooner than that at this quota.\n"
    );
    let _ = writeln!(
        m,
        "| metric | target | measured: median (min–max) of {} runs | |",
        runs.len()
    );
    let _ = writeln!(m, "|---|---|---|---|");
    let _ = writeln!(
        m,
        "| CXone requests (sim `total`) | — | {} | |",
        fmt_mmm(
            &runs.iter().map(|r| r.sim.total as f64).collect::<Vec<_>>(),
            0,
            ""
        )
    );
    let _ = writeln!(
        m,
        "| requests per saga | — | {} | |",
        fmt_mmm(&per_saga, 2, "")
    );
    let _ = writeln!(m, "| B = total / R | — | {} | |", fmt_mmm(&bs, 1, " s"));
    let _ = writeln!(
        m,
        "| wall time | ≤ 1.05 × B | {} | |",
        fmt_mmm(&walls, 1, " s")
    );
    let _ = writeln!(
        m,
        "| wall / B | ≤ 1.05 | {} | {} |",
        fmt_mmm(&ratio, 3, ""),
        verdict(mr <= 1.05)
    );
    let _ = writeln!(
        m,
        "| 429 share (sim `throttled` / `total`) | ≤ 1 % | {} | {} |",
        fmt_mmm(&thr, 2, " %"),
        verdict(mt <= 1.0)
    );
    let _ = writeln!(
        m,
        "| revocation requests / R | — | {} | |",
        fmt_mmm(&rev_b, 1, " s")
    );
    let _ = writeln!(
        m,
        "| time-to-revoke p50 | — | {} | |",
        fmt_mmm(&p50, 1, " s")
    );
    let _ = writeln!(
        m,
        "| time-to-revoke p99 | ≤ 1.1 × revocation requests / R | {} | |",
        fmt_mmm(&p99, 1, " s")
    );
    let _ = writeln!(
        m,
        "| p99 time-to-revoke / (revocation requests / R) | ≤ 1.1 | {} | {} |",
        fmt_mmm(&rev_ratio, 3, ""),
        verdict(mrr <= 1.1)
    );
    let _ = writeln!(
        m,
        "| time-to-complete p99 | — | {} | |",
        fmt_mmm(&p99c, 1, " s")
    );
    let _ = writeln!(
        m,
        "| S3 requests per saga (worker `offboard_s3_requests_total`) | — | {} | |",
        fmt_mmm(&s3_per_saga, 1, "")
    );
    let _ = writeln!(
        m,
        "| worker CPU per saga (utime+stime / sagas) | ≤ 2 ms | {} | {} |",
        fmt_mmm(&cpu_per_saga, 2, " ms"),
        verdict(mmm(&cpu_per_saga).0 <= 2.0)
    );
    let _ = writeln!(
        m,
        "| worker peak RSS (VmHWM) | < 128 MiB | {} | {} |",
        fmt_mmm(&hwm, 1, " MiB"),
        verdict(mh < 128.0)
    );
    let _ = writeln!(
        m,
        "\nOutcomes per run (completed/failed/held of {n}): {}. Cross-check, simulator vs the worker's `/metrics`: {}. machine before each run: {}.\n",
        runs.iter()
            .map(|r| format!("{}/{}/{}", r.completed, r.failed, r.held))
            .collect::<Vec<_>>()
            .join(", "),
        cross.join("; "),
        runs.iter()
            .map(|r| r.load.clone())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(m, "Requests by route (median run, from `/_sim/stats`):\n");
    let mi = median_index(&walls);
    if let Some(r) = runs.get(mi) {
        let _ = writeln!(m, "| route | answers | class |\n|---|---|---|");
        for (route, st) in &r.sim.by_route {
            let class = if REVOKE_ROUTES.contains(&route.as_str()) {
                "revoke"
            } else {
                "housekeeping / auth"
            };
            let answers = st
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(m, "| `{route}` | {answers} | {class} |");
        }
        let (p, rel) = (&cdf_path, &cdf_rel);
        svg_chart(
            p,
            &format!("Layoff ({n} sagas, R = {R}/s): CDF of time from publish"),
            "seconds since the event was published",
            "share of sagas",
            &[
                Series {
                    name: "time-to-revoke (revoked_at − time)".into(),
                    color: COLORS[1],
                    points: cdf(&r.ttr),
                    dashed: false,
                },
                Series {
                    name: "time-to-complete (saga.completed)".into(),
                    color: COLORS[0],
                    points: cdf(&r.ttc),
                    dashed: false,
                },
                Series {
                    name: "target: 1.1 × revocation requests / R".into(),
                    color: COLORS[5],
                    points: vec![
                        (1.1 * r.sim.revoke_requests() as f64 / R, 0.0),
                        (1.1 * r.sim.revoke_requests() as f64 / R, 1.0),
                    ],
                    dashed: true,
                },
            ],
        )?;
        let _ = writeln!(m, "\n![time-to-revoke and time-to-complete CDF]({rel})\n");
        let tot: Vec<(f64, f64)> = r
            .samples
            .iter()
            .map(|s| (s.t, (s.sim_total - s.sim_throttled) as f64))
            .collect();
        let thr: Vec<(f64, f64)> = r
            .samples
            .iter()
            .map(|s| (s.t, s.sim_throttled as f64))
            .collect();
        let (p, rel) = (&rate_path, &rate_rel);
        let end = r.samples.last().map_or(1.0, |s| s.t);
        svg_chart(
            p,
            &format!("Layoff: requests the simulator accepted per second (R = {R})"),
            "seconds since the first publish",
            "requests / s (1 s window)",
            &[
                Series {
                    name: "accepted (non-429)".into(),
                    color: COLORS[0],
                    points: rates(&tot, 1.0),
                    dashed: false,
                },
                Series {
                    name: "429 answers".into(),
                    color: COLORS[1],
                    points: rates(&thr, 1.0),
                    dashed: false,
                },
                Series {
                    name: "quota R".into(),
                    color: COLORS[5],
                    points: vec![(0.0, R), (end, R)],
                    dashed: true,
                },
            ],
        )?;
        let _ = writeln!(m, "![request rate during the layoff]({rel})\n");
    }
    rep.row(
        "1. Layoff wall time / B",
        "≤ 1.05",
        fmt_mmm(&ratio, 3, ""),
        Some(mr <= 1.05),
    );
    rep.row(
        "1. Layoff 429 share",
        "≤ 1 %",
        fmt_mmm(&thr, 2, " %"),
        Some(mt <= 1.0),
    );
    rep.row(
        "2. p99 time-to-revoke / (revocation requests / R)",
        "≤ 1.1",
        fmt_mmm(&rev_ratio, 3, ""),
        Some(mrr <= 1.1),
    );
    rep.row(
        "1. Layoff S3 requests per saga",
        "—",
        fmt_mmm(&s3_per_saga, 1, ""),
        None,
    );
    rep.row(
        "1. Layoff worker CPU per saga",
        "≤ 2 ms",
        fmt_mmm(&cpu_per_saga, 2, " ms"),
        Some(mmm(&cpu_per_saga).0 <= 2.0),
    );
    rep.row(
        "5b. Peak RSS during the layoff",
        "< 128 MiB",
        fmt_mmm(&hwm, 1, " MiB"),
        Some(mh < 128.0),
    );
    Ok(runs)
}

async fn scaleout(opts: &Opts, rep: &mut Report) -> anyhow::Result<()> {
    let n: u64 = if opts.quick { 200 } else { 1000 };
    let m0 = &mut rep.md;
    let _ = writeln!(
        m0,
        "\n## 3b. Scale-out of the whole worker: 1, 2 and 4 worker processes, each configured for 2R = {} req/s, against one quota R = {R}\n",
        2.0 * R
    );
    let _ = writeln!(
        m0,
        "{n} terminations (20 contacts each) per run, shared by the processes through the one work queue. Each process: `requests_per_second={}`, `burst={SIM_BURST}`, `max_in_flight={IN_FLIGHT}`, `prefetch={PREFETCH}`. Utilisation = requests the simulator accepted (non-429) / (R × wall time), wall time = first publish → last outcome.\n",
        2.0 * R
    );
    let _ = writeln!(
        m0,
        "| processes | utilisation (target ≥ 0.90) | 429 share (target < 2 %) | wall time | sim total / worker total requests | S3 server CPU, cores | machine before |\n|---|---|---|---|---|---|---|"
    );
    let mut plots = Vec::new();
    // `BENCH_SCALEOUT_PROCS=4` (a tuning aid): only those process counts.
    let counts: Vec<usize> = std::env::var("BENCH_SCALEOUT_PROCS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 4]);
    for procs in counts {
        let mut runs = Vec::new();
        for i in 0..opts.runs {
            eprintln!(
                "[bench] scale-out {procs} process(es) run {}/{}",
                i + 1,
                opts.runs
            );
            let r = saga_run(
                opts,
                &SagaSpec {
                    tag: "scaleout",
                    sim: SimArgs {
                        users: n,
                        interactions: 20,
                        rate_limit: Some((R, SIM_BURST)),
                    },
                    workers: procs,
                    worker: WorkerCfg {
                        rps: 2.0 * R,
                        burst: SIM_BURST,
                        in_flight: Some(IN_FLIGHT),
                        prefetch: Some(PREFETCH),
                        redis: None,
                    },
                    employees: (1..=n).collect(),
                    timeout: Duration::from_secs(n / 2 + 120),
                    redis: false,
                    redis_stop_at: None,
                },
            )
            .await?;
            eprintln!(
                "[bench]   wall {:.1}s accepted {} 429 {} util {:.3}",
                r.wall,
                r.sim.total - r.sim.throttled,
                r.sim.throttled,
                (r.sim.total - r.sim.throttled) as f64 / (R * r.wall)
            );
            if std::env::var_os("BENCH_TRACE").is_some() {
                trace(&r);
            }
            runs.push(r);
        }
        let util: Vec<f64> = runs
            .iter()
            .map(|r| (r.sim.total - r.sim.throttled) as f64 / (R * r.wall))
            .collect();
        let thr: Vec<f64> = runs
            .iter()
            .map(|r| 100.0 * r.sim.throttled as f64 / r.sim.total.max(1) as f64)
            .collect();
        let walls: Vec<f64> = runs.iter().map(|r| r.wall).collect();
        let (u, t) = scale_verdicts(
            rep,
            &format!("3b. Whole worker, {procs} process(es) at 2R"),
            &util,
            &thr,
        );
        let _ = writeln!(
            rep.md,
            "| {procs} | {u} | {t} | {} | {} | {} | {} |",
            fmt_mmm(&walls, 1, " s"),
            runs.iter()
                .map(|r| format!("{}/{:.0}", r.sim.total, r.worker_requests))
                .collect::<Vec<_>>()
                .join(", "),
            fmt_mmm(
                &runs
                    .iter()
                    .map(|r| {
                        r.other_cpu
                            .iter()
                            .find(|(n, _)| n.starts_with("S3"))
                            .map_or(f64::NAN, |(_, c)| c / r.wall)
                    })
                    .collect::<Vec<_>>(),
                2,
                ""
            ),
            runs.iter()
                .map(|r| r.load.split(' ').next().unwrap_or("").to_owned())
                .collect::<Vec<_>>()
                .join(", "),
        );
        let mi = median_index(&util);
        if let Some(r) = runs.get(mi) {
            let per_proc: Vec<Vec<(f64, f64)>> = (0..procs)
                .map(|p| {
                    r.samples
                        .iter()
                        .map(|s| (s.t, s.workers.get(p).map_or(0.0, |w| w.0 - w.1)))
                        .collect()
                })
                .collect();
            let sim: Vec<(f64, f64, f64)> = r
                .samples
                .iter()
                .map(|s| {
                    (
                        s.t,
                        (s.sim_total - s.sim_throttled) as f64,
                        s.sim_throttled as f64,
                    )
                })
                .collect();
            let rel = rate_chart(
                rep,
                &format!("scaleout-{procs}.svg"),
                &format!("Scale-out: {procs} process(es) at 2R each vs quota R = {R}"),
                "seconds since the first publish",
                &per_proc,
                &sim,
            )?;
            plots.push(format!(
                "![{procs} process(es): request rate per process]({rel})\n"
            ));
        }
    }
    rep.md.push('\n');
    for p in plots {
        rep.md.push_str(&p);
        rep.md.push('\n');
    }
    Ok(())
}

/// Issue 4's scale-out targets for one process count: utilisation ≥ 0.90 of R and fewer than
/// 2 % of requests answered 429. Adds the two summary rows; returns the two table cells.
fn scale_verdicts(rep: &mut Report, label: &str, util: &[f64], thr: &[f64]) -> (String, String) {
    let (mu, ..) = mmm(util);
    let (mt, ..) = mmm(thr);
    rep.row(
        &format!("{label}: utilisation"),
        "≥ 0.90",
        fmt_mmm(util, 3, ""),
        Some(mu >= 0.90),
    );
    rep.row(
        &format!("{label}: 429 share"),
        "< 2 %",
        fmt_mmm(thr, 2, " %"),
        Some(mt < 2.0),
    );
    (
        format!("{} {}", fmt_mmm(util, 3, ""), verdict(mu >= 0.90)),
        format!("{} {}", fmt_mmm(thr, 2, " %"), verdict(mt < 2.0)),
    )
}

/// A chart of a scale-out run: accepted requests per second of each process (cumulative
/// `(t, n)` samples), all accepted and 429 answers at the simulator (`(t, accepted, 429s)`),
/// and the quota. Returns the path to link from the report.
fn rate_chart(
    rep: &Report,
    file: &str,
    title: &str,
    x_label: &str,
    per_proc: &[Vec<(f64, f64)>],
    sim: &[(f64, f64, f64)],
) -> anyhow::Result<String> {
    let mut series = Vec::new();
    for (p, pts) in per_proc.iter().enumerate() {
        series.push(Series {
            name: format!("process {} (non-429, its own count)", p + 1),
            color: COLORS[(p + 2) % 5],
            points: rates(pts, 1.0),
            dashed: false,
        });
    }
    let ok: Vec<(f64, f64)> = sim.iter().map(|(t, a, _)| (*t, *a)).collect();
    let thr: Vec<(f64, f64)> = sim.iter().map(|(t, _, x)| (*t, *x)).collect();
    let end = sim.last().map_or(1.0, |s| s.0);
    series.push(Series {
        name: "all, accepted by the simulator".into(),
        color: COLORS[0],
        points: rates(&ok, 1.0),
        dashed: false,
    });
    series.push(Series {
        name: "429 answers (simulator)".into(),
        color: COLORS[1],
        points: rates(&thr, 1.0),
        dashed: false,
    });
    series.push(Series {
        name: "quota R".into(),
        color: COLORS[5],
        points: vec![(0.0, R), (end, R)],
        dashed: true,
    });
    let (p, rel) = rep.svg(file);
    svg_chart(&p, title, x_label, "requests / s (1 s window)", &series)?;
    Ok(rel)
}

/// Issue 18: 1, 2, 4 and 8 worker processes sharing one tenant quota through Redis
/// (`cxone.rate_limit.redis_url`), each configured with the tenant-wide R and the worker's
/// default concurrency. Utilisation, 429s and the revocation bound across all replicas.
async fn shared_quota(opts: &Opts, rep: &mut Report) -> anyhow::Result<()> {
    let n: u64 = if opts.quick { 200 } else { 1000 };
    let counts: Vec<usize> = std::env::var("BENCH_QUOTA_PROCS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 4, 8]);
    let _ = writeln!(
        rep.md,
        "\n## 7. One quota shared through Redis: 1, 2, 4 and 8 worker processes, R = {R} req/s tenant-wide\n"
    );
    let _ = writeln!(
        rep.md,
        "{n} terminations (20 contacts each) per run, shared by the processes through the two queues. Every process: `requests_per_second={R}` (the tenant-wide rate: the bucket is in Redis), `burst={SIM_BURST}`, `redis_url` = a Redis of the run's own, default concurrency. Utilisation = requests the simulator accepted (non-429) / (R × wall time). The revocation bound = revocation requests / R.\n"
    );
    let _ = writeln!(
        rep.md,
        "| processes | utilisation (target ≥ 0.95) | 429 share (target ≤ 0.5 %) | p99 time-to-revoke / revocation bound (target ≤ 1.1) | wall time | S3 requests per saga | worker CPU per saga (target ≤ 2 ms) | machine before |\n|---|---|---|---|---|---|---|---|"
    );
    let mut plots = Vec::new();
    let last = counts.last().copied().unwrap_or(1);
    for procs in counts {
        let mut runs = Vec::new();
        for i in 0..opts.runs {
            eprintln!(
                "[bench] shared quota, {procs} process(es), run {}/{}",
                i + 1,
                opts.runs
            );
            let r = saga_run(opts, &quota_spec(n, procs, None)).await?;
            eprintln!(
                "[bench]   wall {:.1}s accepted {} 429 {} util {:.3} p99 ttr {:.1}s bound {:.1}s",
                r.wall,
                r.sim.total - r.sim.throttled,
                r.sim.throttled,
                (r.sim.total - r.sim.throttled) as f64 / (R * r.wall),
                percentile(&r.ttr, 99.0),
                r.sim.revoke_requests() as f64 / R
            );
            if std::env::var_os("BENCH_TRACE").is_some() {
                trace(&r);
            }
            runs.push(r);
        }
        let f = QuotaFigures::of(&runs);
        let label = format!("7. Shared quota, {procs} process(es)");
        rep.row(
            &format!("{label}: utilisation"),
            "≥ 0.95",
            fmt_mmm(&f.util, 3, ""),
            Some(mmm(&f.util).0 >= 0.95),
        );
        rep.row(
            &format!("{label}: 429 share"),
            "≤ 0.5 %",
            fmt_mmm(&f.throttled, 2, " %"),
            Some(mmm(&f.throttled).0 <= 0.5),
        );
        rep.row(
            &format!("{label}: p99 time-to-revoke / revocation bound"),
            "≤ 1.1",
            fmt_mmm(&f.ttr_ratio, 3, ""),
            Some(mmm(&f.ttr_ratio).0 <= 1.1),
        );
        let _ = writeln!(
            rep.md,
            "| {procs} | {} {} | {} {} | {} {} | {} | {} | {} {} | {} |",
            fmt_mmm(&f.util, 3, ""),
            verdict(mmm(&f.util).0 >= 0.95),
            fmt_mmm(&f.throttled, 2, " %"),
            verdict(mmm(&f.throttled).0 <= 0.5),
            fmt_mmm(&f.ttr_ratio, 3, ""),
            verdict(mmm(&f.ttr_ratio).0 <= 1.1),
            fmt_mmm(&f.walls, 1, " s"),
            fmt_mmm(&f.s3_per_saga, 1, ""),
            fmt_mmm(&f.cpu_ms, 2, " ms"),
            verdict(mmm(&f.cpu_ms).0 <= 2.0),
            runs.iter()
                .map(|r| r.load.split(' ').next().unwrap_or("").to_owned())
                .collect::<Vec<_>>()
                .join(", "),
        );
        if procs == last
            && let Some(r) = runs.get(median_index(&f.util))
        {
            plots.extend(quota_plots(rep, r, procs, "quota")?);
        }
    }
    rep.md.push('\n');
    for p in plots {
        rep.md.push_str(&p);
        rep.md.push('\n');
    }
    Ok(())
}

/// Issue 18: the shared-quota run with its Redis killed 10 s in (and left down): every
/// process falls back to its own limiter at its share of R.
async fn quota_redis_down(opts: &Opts, rep: &mut Report) -> anyhow::Result<()> {
    let n: u64 = if opts.quick { 200 } else { 1000 };
    let procs = 4;
    let at = Duration::from_secs(10);
    let mut runs = Vec::new();
    for i in 0..opts.runs {
        eprintln!(
            "[bench] shared quota, Redis killed at {}s, {procs} processes, run {}/{}",
            at.as_secs(),
            i + 1,
            opts.runs
        );
        let r = saga_run(opts, &quota_spec(n, procs, Some(at))).await?;
        eprintln!(
            "[bench]   wall {:.1}s completed {} of {} 429 {} of {} ready {}",
            r.wall, r.completed, r.sagas, r.sim.throttled, r.sim.total, r.all_ready
        );
        if std::env::var_os("BENCH_TRACE").is_some() {
            trace(&r);
        }
        runs.push(r);
    }
    let f = QuotaFigures::of(&runs);
    let lost: Vec<f64> = runs
        .iter()
        .map(|r| r.sagas.saturating_sub(r.completed + r.failed + r.held) as f64)
        .collect();
    let ready = runs.iter().all(|r| r.all_ready);
    let _ = writeln!(
        rep.md,
        "\n## 8. The shared quota with Redis killed {} s into the run: {procs} processes, R = {R} req/s\n",
        at.as_secs()
    );
    let _ = writeln!(
        rep.md,
        "As section 7 with {procs} processes; `kill -9` of the run's Redis {} s after the first publish, left down. Each process falls back to its own adaptive limiter at R / (replicas it last saw in Redis) within a second (`offboard_quota_shared` 0) and keeps going.\n",
        at.as_secs()
    );
    let _ = writeln!(
        rep.md,
        "| metric | target | measured: median (min–max) of {} runs | |\n|---|---|---|---|",
        runs.len()
    );
    let (ml, ..) = mmm(&lost);
    let _ = writeln!(
        rep.md,
        "| sagas without a terminal outcome | 0 | {} | {} |",
        fmt_mmm(&lost, 0, ""),
        verdict(ml == 0.0)
    );
    let _ = writeln!(
        rep.md,
        "| 429 share | ≤ 5 % | {} | {} |",
        fmt_mmm(&f.throttled, 2, " %"),
        verdict(mmm(&f.throttled).0 <= 5.0)
    );
    let _ = writeln!(
        rep.md,
        "| every worker ready (`/readyz` 200) at the end | yes | {} | {} |",
        if ready { "yes" } else { "no" },
        verdict(ready)
    );
    let _ = writeln!(
        rep.md,
        "| utilisation | — | {} | |",
        fmt_mmm(&f.util, 3, "")
    );
    let _ = writeln!(
        rep.md,
        "| p99 time-to-revoke / revocation bound | — | {} | |",
        fmt_mmm(&f.ttr_ratio, 3, "")
    );
    let _ = writeln!(
        rep.md,
        "| wall time | — | {} | |",
        fmt_mmm(&f.walls, 1, " s")
    );
    let label = "8. Shared quota, Redis killed at 10 s";
    rep.row(
        &format!("{label}: sagas lost"),
        "0",
        fmt_mmm(&lost, 0, ""),
        Some(ml == 0.0),
    );
    rep.row(
        &format!("{label}: 429 share"),
        "≤ 5 %",
        fmt_mmm(&f.throttled, 2, " %"),
        Some(mmm(&f.throttled).0 <= 5.0),
    );
    rep.row(
        &format!("{label}: every worker ready"),
        "yes",
        (if ready { "yes" } else { "no" }).to_owned(),
        Some(ready),
    );
    if let Some(r) = runs.get(median_index(&f.util)) {
        for p in quota_plots(rep, r, procs, "quota-redis-down")? {
            rep.md.push('\n');
            rep.md.push_str(&p);
        }
        rep.md.push('\n');
    }
    Ok(())
}

fn quota_spec(n: u64, procs: usize, redis_stop_at: Option<Duration>) -> SagaSpec<'static> {
    SagaSpec {
        tag: "quota",
        sim: SimArgs {
            users: n,
            interactions: 20,
            rate_limit: Some((R, SIM_BURST)),
        },
        workers: procs,
        worker: WorkerCfg {
            rps: R,
            burst: SIM_BURST,
            in_flight: None,
            prefetch: None,
            redis: None,
        },
        employees: (1..=n).collect(),
        timeout: Duration::from_secs(n / 2 + 180),
        redis: true,
        redis_stop_at,
    }
}

/// Per-run figures of a shared-quota workload.
struct QuotaFigures {
    util: Vec<f64>,
    throttled: Vec<f64>,
    ttr_ratio: Vec<f64>,
    walls: Vec<f64>,
    s3_per_saga: Vec<f64>,
    cpu_ms: Vec<f64>,
}

impl QuotaFigures {
    fn of(runs: &[SagaRun]) -> Self {
        Self {
            util: runs
                .iter()
                .map(|r| (r.sim.total - r.sim.throttled) as f64 / (R * r.wall))
                .collect(),
            throttled: runs
                .iter()
                .map(|r| 100.0 * r.sim.throttled as f64 / r.sim.total.max(1) as f64)
                .collect(),
            ttr_ratio: runs
                .iter()
                .map(|r| percentile(&r.ttr, 99.0) / (r.sim.revoke_requests() as f64 / R))
                .collect(),
            walls: runs.iter().map(|r| r.wall).collect(),
            s3_per_saga: runs
                .iter()
                .map(|r| r.s3_requests / r.sagas as f64)
                .collect(),
            cpu_ms: runs
                .iter()
                .map(|r| 1000.0 * r.worker_cpu.iter().sum::<f64>() / r.sagas as f64)
                .collect(),
        }
    }
}

/// The rate per process over time and the time-to-revoke CDF of one run.
fn quota_plots(rep: &Report, r: &SagaRun, procs: usize, file: &str) -> anyhow::Result<Vec<String>> {
    let per_proc: Vec<Vec<(f64, f64)>> = (0..procs)
        .map(|p| {
            r.samples
                .iter()
                .map(|s| (s.t, s.workers.get(p).map_or(0.0, |w| w.0 - w.1)))
                .collect()
        })
        .collect();
    let sim: Vec<(f64, f64, f64)> = r
        .samples
        .iter()
        .map(|s| {
            (
                s.t,
                (s.sim_total - s.sim_throttled) as f64,
                s.sim_throttled as f64,
            )
        })
        .collect();
    let rate_rel = rate_chart(
        rep,
        &format!("{file}-{procs}-rate.svg"),
        &format!("Shared quota: {procs} process(es), one bucket in Redis, R = {R}"),
        "seconds since the first publish",
        &per_proc,
        &sim,
    )?;
    let (cdf_path, cdf_rel) = rep.svg(&format!("{file}-{procs}-cdf.svg"));
    let bound = 1.1 * r.sim.revoke_requests() as f64 / R;
    svg_chart(
        &cdf_path,
        &format!("Shared quota, {procs} process(es): CDF of time from publish"),
        "seconds since the event was published",
        "share of sagas",
        &[
            Series {
                name: "time-to-revoke".into(),
                color: COLORS[1],
                points: cdf(&r.ttr),
                dashed: false,
            },
            Series {
                name: "time-to-complete".into(),
                color: COLORS[0],
                points: cdf(&r.ttc),
                dashed: false,
            },
            Series {
                name: "target: 1.1 × revocation requests / R".into(),
                color: COLORS[5],
                points: vec![(bound, 0.0), (bound, 1.0)],
                dashed: true,
            },
        ],
    )?;
    Ok(vec![
        format!("![{procs} process(es): request rate per process]({rate_rel})\n"),
        format!("![{procs} process(es): time-to-revoke CDF]({cdf_rel})\n"),
    ])
}

async fn overhead(opts: &Opts, rep: &mut Report) -> anyhow::Result<()> {
    let n: u64 = if opts.quick { 400 } else { 2000 };
    let mut runs = Vec::new();
    for i in 0..opts.runs {
        eprintln!(
            "[bench] overhead run {}/{} ({n} sagas, unthrottled)",
            i + 1,
            opts.runs
        );
        let r = saga_run(
            opts,
            &SagaSpec {
                tag: "overhead",
                sim: SimArgs {
                    users: n,
                    interactions: 20,
                    rate_limit: None,
                },
                workers: 1,
                worker: WorkerCfg {
                    rps: 100_000.0,
                    burst: 1000,
                    in_flight: Some(IN_FLIGHT),
                    prefetch: Some(PREFETCH),
                    redis: None,
                },
                employees: (1..=n).collect(),
                timeout: Duration::from_secs(n / 4 + 120),
                redis: false,
                redis_stop_at: None,
            },
        )
        .await?;
        eprintln!(
            "[bench]   wall {:.1}s worker cpu {:.1}s others {:?}",
            r.wall,
            r.worker_cpu.iter().sum::<f64>(),
            r.other_cpu
        );
        runs.push(r);
    }
    let cpu_ms: Vec<f64> = runs
        .iter()
        .map(|r| 1000.0 * r.worker_cpu.iter().sum::<f64>() / r.sagas as f64)
        .collect();
    let rate: Vec<f64> = runs.iter().map(|r| r.completed as f64 / r.wall).collect();
    let walls: Vec<f64> = runs.iter().map(|r| r.wall).collect();
    let worker_cores: Vec<f64> = runs
        .iter()
        .map(|r| r.worker_cpu.iter().sum::<f64>() / r.wall)
        .collect();
    let (mc, ..) = mmm(&cpu_ms);
    let m = &mut rep.md;
    let _ = writeln!(
        m,
        "\n## 4. Overhead: simulator unthrottled, {n} sagas (20 contacts each), 1 worker\n"
    );
    let _ = writeln!(
        m,
        "Worker: `requests_per_second=100000`, `burst=1000`, `max_in_flight={IN_FLIGHT}`, `prefetch={PREFETCH}`. CPU = utime+stime of the worker process from `/proc/PID/stat` (includes its start-up and idle time), divided by the number of sagas.\n"
    );
    let _ = writeln!(
        m,
        "| metric | target | measured: median (min–max) of {} runs | |\n|---|---|---|---|",
        runs.len()
    );
    let _ = writeln!(
        m,
        "| worker CPU per saga | ≤ 2 ms | {} | {} |",
        fmt_mmm(&cpu_ms, 2, " ms"),
        verdict(mc <= 2.0)
    );
    let _ = writeln!(
        m,
        "| sagas per second (completed / wall) | — | {} | |",
        fmt_mmm(&rate, 1, "/s")
    );
    let _ = writeln!(m, "| wall time | — | {} | |", fmt_mmm(&walls, 1, " s"));
    let _ = writeln!(
        m,
        "| worker CPU use (cores) | — | {} | |",
        fmt_mmm(&worker_cores, 2, "")
    );
    let mut names: Vec<String> = runs
        .iter()
        .flat_map(|r| r.other_cpu.iter().map(|(n, _)| n.clone()))
        .collect();
    names.sort();
    names.dedup();
    for name in &names {
        let cores: Vec<f64> = runs
            .iter()
            .filter_map(|r| {
                r.other_cpu
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, c)| c / r.wall)
            })
            .collect();
        let _ = writeln!(
            m,
            "| {name} CPU use (cores) | — | {} | |",
            fmt_mmm(&cores, 2, "")
        );
    }
    let _ = writeln!(
        m,
        "\nOutcomes per run (completed/failed/held): {}. CXone requests per run: {}. Load before each run: {}.\n",
        runs.iter()
            .map(|r| format!("{}/{}/{}", r.completed, r.failed, r.held))
            .collect::<Vec<_>>()
            .join(", "),
        runs.iter()
            .map(|r| r.sim.total.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        runs.iter()
            .map(|r| r.load.clone())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    rep.row(
        "4. Worker CPU per saga (unthrottled)",
        "≤ 2 ms",
        fmt_mmm(&cpu_ms, 2, " ms"),
        Some(mc <= 2.0),
    );
    rep.row(
        "4. Sagas per second (unthrottled)",
        "—",
        fmt_mmm(&rate, 1, "/s"),
        None,
    );
    Ok(())
}

async fn memory(opts: &Opts, rep: &mut Report) -> anyhow::Result<()> {
    let contacts: u64 = if opts.quick { 100_000 } else { 1_000_000 };
    let mut hwm = Vec::new();
    let mut walls = Vec::new();
    let mut outcomes = Vec::new();
    let mut loads = Vec::new();
    for i in 0..opts.runs {
        eprintln!(
            "[bench] memory run {}/{} ({contacts} contacts, one user)",
            i + 1,
            opts.runs
        );
        let r = saga_run(
            opts,
            &SagaSpec {
                tag: "memory",
                sim: SimArgs {
                    users: 1,
                    interactions: contacts,
                    rate_limit: None,
                },
                workers: 1,
                worker: WorkerCfg {
                    rps: 100_000.0,
                    burst: 1000,
                    in_flight: None,
                    prefetch: None,
                    redis: None,
                },
                employees: vec![1],
                timeout: Duration::from_secs(900),
                redis: false,
                redis_stop_at: None,
            },
        )
        .await?;
        let h = r.worker_hwm_kib.iter().copied().max().unwrap_or(0) as f64 / 1024.0;
        eprintln!("[bench]   wall {:.1}s VmHWM {h:.1} MiB", r.wall);
        hwm.push(h);
        walls.push(r.wall);
        outcomes.push(format!("{}/{}", r.completed, r.failed));
        loads.push(r.load);
    }
    let (mh, ..) = mmm(&hwm);
    let m = &mut rep.md;
    let _ = writeln!(
        m,
        "\n## 5. Memory: archiving {contacts} contacts of one user\n"
    );
    let _ = writeln!(
        m,
        "Simulator `--users 1 --interactions-per-user {contacts}`, unthrottled; worker defaults (`max_in_flight=32`) with `requests_per_second=100000`. Peak RSS = `VmHWM` of the worker process after the saga completed (the archive is streamed to S3 as a multipart upload of 8 MiB parts).\n"
    );
    let _ = writeln!(
        m,
        "| metric | target | measured: median (min–max) of {} runs | |\n|---|---|---|---|",
        hwm.len()
    );
    let _ = writeln!(
        m,
        "| worker peak RSS | < 64 MiB | {} | {} |",
        fmt_mmm(&hwm, 1, " MiB"),
        verdict(mh < 64.0)
    );
    let _ = writeln!(m, "| saga wall time | — | {} | |", fmt_mmm(&walls, 1, " s"));
    let _ = writeln!(
        m,
        "\nOutcomes (completed/failed): {}. Load before each run: {}. Peak RSS during workload 1 is in section 1.\n",
        outcomes.join(", "),
        loads.join(" | ")
    );
    rep.row(
        &format!("5a. Peak RSS archiving {contacts} contacts"),
        "< 64 MiB",
        fmt_mmm(&hwm, 1, " MiB"),
        Some(mh < 64.0),
    );
    Ok(())
}

/// Workload 10: `evidence export` over 20,000 stored sagas (20 days of 1,000), the whole period
/// and one day of it, with the release binary against s3s-fs. The journals are written
/// directly through the library (with their day index), as completed sagas would leave them.
async fn evidence_export(opts: &Opts, rep: &mut Report) -> anyhow::Result<()> {
    use cxone_offboard::saga::journal::{self, FinalStatus, SagaState, Stored};
    let days: i64 = 20;
    let per_day: i64 = if opts.quick { 100 } else { 1000 };
    let total = days * per_day;
    let stack = Stack::start(
        opts,
        "export",
        &SimArgs {
            users: 1,
            interactions: 1,
            rate_limit: None,
        },
        1,
    )?;
    let env: Vec<(String, String)> = vec![
        ("OFFBOARD__S3__ENDPOINT".to_owned(), stack.s3_url.clone()),
        ("OFFBOARD__S3__BUCKET".to_owned(), stack.bucket.clone()),
        ("AWS_ACCESS_KEY_ID".to_owned(), "test".to_owned()),
        ("AWS_SECRET_ACCESS_KEY".to_owned(), "test".to_owned()),
        ("AWS_REGION".to_owned(), "us-east-1".to_owned()),
        ("AWS_EC2_METADATA_DISABLED".to_owned(), "true".to_owned()),
    ];
    let settings = cxone_offboard::config::Settings::load_from(
        None,
        env.iter()
            .cloned()
            .collect::<std::collections::HashMap<String, String>>(),
    )
    .context("settings for the export workload")?;
    let store = Arc::new(cxone_offboard::store::S3::new(&settings.s3).await);
    let first_day = (Utc::now() - chrono::Duration::days(days + 1)).date_naive();
    let day0 = first_day
        .and_hms_opt(0, 0, 0)
        .context("midnight")?
        .and_utc();
    let seeding = Instant::now();
    let rules = cxone_offboard::event::Rules::default();
    let jobs: Vec<(i64, cxone_offboard::event::Event)> = (0..total)
        .map(|i| {
            let body = serde_json::json!({
                "specversion": "1.0", "id": format!("bench-export-{i}"), "source": "hris://bench",
                "type": "employee.terminated",
                "data": {"employee": {"external_id": format!("E{i:06}")}, "reason": "involuntary"}
            });
            (
                i,
                rules
                    .parse(body.to_string().as_bytes())
                    .expect("valid event"),
            )
        })
        .collect();
    let results: Vec<anyhow::Result<()>> = futures_util::stream::iter(jobs)
        .map(|(i, event)| {
            let store = store.clone();
            async move {
                let day = i / per_day;
                let at = day0
                    + chrono::Duration::days(day)
                    + chrono::Duration::seconds((i % per_day) * 60);
                let saga_id = event.saga_id();
                let mut j = journal::Journal::new(&saga_id, &event, at);
                j.revoked_at = Some(at + chrono::Duration::seconds(30 + i % 90));
                j.verified_at = j.revoked_at;
                j.state = SagaState::Completed;
                j.status = Some(FinalStatus::Deleted);
                let mut stored = Stored {
                    journal: j,
                    etag: None,
                };
                journal::save(store.as_ref(), &mut stored).await?;
                journal::write_indexes(store.as_ref(), &format!("E{i:06}"), &saga_id, at).await?;
                Ok(())
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    for r in results {
        r?;
    }
    let seed_secs = seeding.elapsed().as_secs_f64();
    let load = settle(0.1, Duration::from_secs(if opts.quick { 5 } else { 30 }));
    let export = |since: DateTime<Utc>, until: DateTime<Utc>| -> anyhow::Result<(f64, usize)> {
        let out = stack.dir.join("export.csv");
        let began = Instant::now();
        let status = Command::new(BIN)
            .args([
                "evidence",
                "export",
                "--since",
                &since.to_rfc3339_opts(SecondsFormat::Secs, true),
                "--until",
                &until.to_rfc3339_opts(SecondsFormat::Secs, true),
                "--format",
                "csv",
                "--out",
            ])
            .arg(&out)
            .envs(env.iter().cloned())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        let secs = began.elapsed().as_secs_f64();
        if !status.success() {
            bail!("evidence export exited {status}");
        }
        let rows = std::fs::read_to_string(&out)?
            .lines()
            .count()
            .saturating_sub(1);
        Ok((secs, rows))
    };
    let whole_until = day0 + chrono::Duration::days(days);
    let one_since = day0 + chrono::Duration::days(days / 2);
    let one_until = one_since + chrono::Duration::days(1);
    let mut all = Vec::new();
    let mut one = Vec::new();
    let mut rows = (0, 0);
    let runs = if opts.quick { 1 } else { opts.runs };
    for _ in 0..runs {
        let (t, n) = export(day0, whole_until)?;
        all.push(t);
        rows.0 = n;
        let (t, n) = export(one_since, one_until)?;
        one.push(t);
        rows.1 = n;
    }
    stack.cleanup().await;
    if rows.0 != total as usize || rows.1 != per_day as usize {
        bail!(
            "export rows {} and {} instead of {total} and {per_day}",
            rows.0,
            rows.1
        );
    }
    let (m_all, ..) = mmm(&all);
    let m = &mut rep.md;
    let _ = writeln!(
        m,
        "\n## 10. Evidence export: {total} stored sagas, the whole period and one day\n"
    );
    let _ = writeln!(
        m,
        "{total} completed sagas over {days} days ({per_day} a day), written with their day index \
         to s3s-fs in {seed_secs:.0} s (64 at a time), then `cxone-offboard evidence export \
         --format csv` (release binary, a new process each time) for the {days} days and for \
         one day of them. The sagas carry no manifest, so no manifest is verified: with \
         manifests, add one GET per saga (the export verifies 16 at a time). Load before: {load}.\n"
    );
    let _ = writeln!(
        m,
        "| export | rows | measured: median (min–max) of {runs} run(s) |\n|---|---|---|"
    );
    let _ = writeln!(
        m,
        "| {days} days | {} | {} |",
        rows.0,
        fmt_mmm(&all, 2, " s")
    );
    let _ = writeln!(m, "| 1 day | {} | {} |", rows.1, fmt_mmm(&one, 2, " s"));
    rep.row(
        &format!("10. Evidence export of {total} sagas"),
        "—",
        format!(
            "{} (one day of them: {})",
            fmt_mmm(&all, 1, " s"),
            fmt_mmm(&one, 2, " s")
        ),
        None,
    );
    let _ = m_all;
    Ok(())
}

async fn startup(opts: &Opts, rep: &mut Report) -> anyhow::Result<()> {
    let runs = if opts.quick { 3 } else { 5.max(opts.runs) };
    let load = settle(0.1, Duration::from_secs(if opts.quick { 5 } else { 30 }));
    let stack = Stack::start(
        opts,
        "startup",
        &SimArgs {
            users: 10,
            interactions: 1,
            rate_limit: None,
        },
        1,
    )?;
    let cfg = WorkerCfg {
        rps: R,
        burst: SIM_BURST,
        in_flight: None,
        prefetch: None,
        redis: None,
    };
    let mut times = Vec::new();
    let mut err = None;
    for i in 0..runs {
        match stack.worker(&cfg, i).await {
            Ok(mut w) => {
                times.push(w.ready_after.as_secs_f64() * 1000.0);
                w.proc.stop(Duration::from_secs(30));
            }
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    stack.cleanup().await;
    if let Some(e) = err {
        return Err(e);
    }
    let (mt, ..) = mmm(&times);
    let m = &mut rep.md;
    let _ = writeln!(
        m,
        "\n## 6. Start-up: process start → `/readyz` = 200 with the local broker\n"
    );
    let _ = writeln!(
        m,
        "The release binary spawned as `cxone-offboard worker`; `/readyz` polled every 5 ms. The first start declares the topology; later ones find it. Load before: {load}.\n"
    );
    let _ = writeln!(
        m,
        "| metric | target | measured: median (min–max) of {} starts | |\n|---|---|---|---|",
        times.len()
    );
    let _ = writeln!(
        m,
        "| start → ready | < 1 s | {} | {} |",
        fmt_mmm(&times, 0, " ms"),
        verdict(mt < 1000.0)
    );
    let _ = writeln!(
        m,
        "\nEach start (ms): {}.\n",
        times
            .iter()
            .map(|t| format!("{t:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    rep.row(
        "6. Start-up to /readyz",
        "< 1 s",
        fmt_mmm(&times, 0, " ms"),
        Some(mt < 1000.0),
    );
    Ok(())
}

async fn sim_throughput(opts: &Opts, rep: &mut Report) -> anyhow::Result<()> {
    let secs = if opts.quick { 2.0 } else { 10.0 };
    let conns = 64;
    let mut rates_v = Vec::new();
    let mut loads = Vec::new();
    for i in 0..opts.runs {
        eprintln!("[bench] simulator throughput run {}/{}", i + 1, opts.runs);
        loads.push(settle(
            0.1,
            Duration::from_secs(if opts.quick { 5 } else { 30 }),
        ));
        let stack = Stack::start(
            opts,
            "simtp",
            &SimArgs {
                users: 1000,
                interactions: 1,
                rate_limit: None,
            },
            1,
        )?;
        let res = hammer(&stack.sim_url, conns, Duration::from_secs_f64(secs)).await;
        stack.cleanup().await;
        let (ok, errors, rate) = res?;
        eprintln!("[bench]   {rate:.0} req/s ({ok} ok, {errors} errors)");
        rates_v.push(rate);
    }
    let (mr, ..) = mmm(&rates_v);
    let m = &mut rep.md;
    let _ = writeln!(m, "\n## Simulator throughput (issue 3)\n");
    let _ = writeln!(
        m,
        "`GET /inContactAPI/services/v31.0/agents/{{id}}/states` with a bearer token, rate limiting off, {conns} keep-alive connections from a reqwest generator in the bench process ({secs} s after 1 s warm-up); the simulator runs as its own release process and shares the 2 cores with the generator.\n"
    );
    let _ = writeln!(
        m,
        "| metric | target | measured: median (min–max) of {} runs | |\n|---|---|---|---|",
        rates_v.len()
    );
    let _ = writeln!(
        m,
        "| simple requests / s | ≥ 20,000 | {} | {} |",
        fmt_mmm(&rates_v, 0, ""),
        verdict(mr >= 20_000.0)
    );
    let _ = writeln!(
        m,
        "\nLoad before each run: {}. The earlier in-process figure (`cargo bench --bench sim_throughput`, docs/simulator.md) was 41,792 req/s; with `wrk` 60,363 req/s.\n",
        loads.join(" | ")
    );
    rep.row(
        "Simulator throughput (issue 3)",
        "≥ 20,000 req/s",
        fmt_mmm(&rates_v, 0, " req/s"),
        Some(mr >= 20_000.0),
    );
    Ok(())
}

async fn hammer(base: &str, conns: usize, dur: Duration) -> anyhow::Result<(u64, u64, f64)> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(conns)
        .build()?;
    let body: Value = http
        .post(format!("{base}/authentication/v1/token/access-key"))
        .json(&serde_json::json!({"accessKeyId": "sim-key", "accessKeySecret": "sim-secret"}))
        .send()
        .await?
        .json()
        .await?;
    let token = body["access_token"]
        .as_str()
        .context("no token")?
        .to_owned();
    let done = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (http, token, base) = (http.clone(), token.clone(), base.to_owned());
        let (done, measuring, ok, errors) =
            (done.clone(), measuring.clone(), ok.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = c as u64;
            while !done.load(Ordering::Relaxed) {
                n = (n + 7) % 1000;
                let url = format!(
                    "{base}/inContactAPI/services/v31.0/agents/{}/states",
                    1001 + n
                );
                let good = match http.get(&url).bearer_auth(&token).send().await {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if measuring.load(Ordering::Relaxed) {
                    if good {
                        ok.fetch_add(1, Ordering::Relaxed)
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed)
                    };
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    measuring.store(true, Ordering::Relaxed);
    let began = Instant::now();
    tokio::time::sleep(dur).await;
    measuring.store(false, Ordering::Relaxed);
    let el = began.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let served = ok.load(Ordering::Relaxed);
    Ok((served, errors.load(Ordering::Relaxed), served as f64 / el))
}

// ---------------------------------------------------------------------------------------------

fn cmd_out(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8(if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            })
            .ok()
        })
        .map(|s| s.lines().next().unwrap_or("").trim().to_owned())
        .unwrap_or_else(|| "?".to_owned())
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .map_or("?".to_owned(), |k| format!("{:.1} GiB", k / 1048576.0));
    let rabbit = cmd_out("rabbitmqctl", &["version"]);
    format!(
        "| | |\n|---|---|\n| CPU | {cores} cores, {model} |\n| memory | {mem} |\n| OS | {} |\n| rustc | {} |\n| cxone-offboard | {} (git {}) |\n| RabbitMQ | {rabbit} (local, 127.0.0.1:5672) |\n| S3 server | {} (local, a fresh directory and bucket per run) |\n",
        cmd_out("uname", &["-sr"]),
        cmd_out("rustc", &["-V"]),
        env!("CARGO_PKG_VERSION"),
        cmd_out("git", &["rev-parse", "--short", "HEAD"]),
        "moto_server (moto[server] from PyPI, one fresh in-memory instance per run)",
    )
}

#[path = "offboard/client_scaleout.rs"]
mod client_scaleout;

const NOTES: &str = include_str!("offboard_notes.md");

fn main() -> anyhow::Result<()> {
    if let Ok(spec) = std::env::var(client_scaleout::CHILD_ENV) {
        return client_scaleout::child(&spec);
    }
    let opts = parse_args()?;
    std::fs::create_dir_all(&opts.work)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let began = Instant::now();
    let svg_rel = {
        let out_dir = opts.out.parent().map(Path::to_path_buf).unwrap_or_default();
        let rel = opts
            .svg_dir
            .strip_prefix(&out_dir)
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| opts.svg_dir.clone());
        let s = rel.display().to_string();
        if s.is_empty() { ".".to_owned() } else { s }
    };
    let mut rep = Report {
        md: String::new(),
        summary: Vec::new(),
        svg_dir: opts.svg_dir.clone(),
        svg_rel,
    };
    let result = runtime.block_on(async {
        if opts.wants("layoff") {
            layoff(&opts, &mut rep).await?;
        }
        if opts.wants("client") {
            client_scaleout::client_scaleout(&opts, &mut rep).await?;
        }
        if opts.wants("scaleout") {
            scaleout(&opts, &mut rep).await?;
        }
        if opts.wants("quota") {
            shared_quota(&opts, &mut rep).await?;
        }
        if opts.wants("quota-down") {
            quota_redis_down(&opts, &mut rep).await?;
        }
        if opts.wants("overhead") {
            overhead(&opts, &mut rep).await?;
        }
        if opts.wants("memory") {
            memory(&opts, &mut rep).await?;
        }
        if opts.wants("startup") {
            startup(&opts, &mut rep).await?;
        }
        if opts.wants("simtp") {
            sim_throughput(&opts, &mut rep).await?;
        }
        if opts.wants("export") {
            evidence_export(&opts, &mut rep).await?;
        }
        anyhow::Ok(())
    });
    if std::env::var_os("BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&opts.work);
    }
    result?;
    let mut md = String::new();
    let title = if opts.quick {
        "Benchmarks (quick, scaled down: CI smoke, not the reference figures)"
    } else {
        "Benchmarks"
    };
    let _ = writeln!(md, "# {title}\n");
    let _ = writeln!(
        md,
        "Generated by `{}` on {} in {:.0} s. Do not edit by hand: edit `benches/offboard.rs` / `benches/offboard_notes.md` and re-run.\n",
        if opts.quick {
            "make bench-quick"
        } else {
            "make bench"
        },
        Utc::now().format("%Y-%m-%d %H:%M UTC"),
        began.elapsed().as_secs_f64()
    );
    let _ = writeln!(
        md,
        "Everything runs on one machine over loopback: the release `cxone-offboard worker` process(es), the simulator (`cxone-offboard sim`, its own process), RabbitMQ and moto (S3). Requests and 429s are counted by the simulator (`/_sim/stats`) and cross-checked against the worker's `/metrics`. Each figure is the median of {} run(s) with min–max in brackets.\n",
        opts.runs
    );
    let _ = writeln!(
        md,
        "## Summary\n\n| workload | target | measured | |\n|---|---|---|---|"
    );
    for [a, b, c, d] in &rep.summary {
        let _ = writeln!(md, "| {a} | {b} | {c} | {d} |");
    }
    let _ = writeln!(md, "\n## Machine and versions\n\n{}", machine());
    let _ = writeln!(
        md,
        "## Reproduce\n\n```sh\nmake bench         # all workloads, 3 runs each; writes BENCHMARKS.md and docs/bench/*.svg (~40 min)\nmake bench-quick   # scaled down, 1 run each; writes target/bench-quick/ (~3 min)\n# one workload: scripts/bench.sh --only layoff   (layoff,client,scaleout,quota,quota-down,overhead,memory,startup,simtp,export)\n```\n\n`scripts/bench.sh` starts RabbitMQ and installs moto if needed (`scripts/services.sh up`), then runs `cargo bench --bench offboard -- ARGS`. Each run uses a fresh moto instance and bucket, random broker-name prefixes (deleted afterwards), its own simulator process, and waits (≤ 30 s) for the machine to be quiet first (≥ 90 % of the CPU idle over one second).\n"
    );
    md.push_str(&rep.md);
    md.push('\n');
    md.push_str(NOTES);
    if let Some(dir) = opts.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&opts.out, md)?;
    eprintln!(
        "[bench] wrote {} in {:.0} s",
        opts.out.display(),
        began.elapsed().as_secs_f64()
    );
    Ok(())
}
