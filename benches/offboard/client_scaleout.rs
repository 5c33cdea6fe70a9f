//! Workload 3a: the CXone client alone, in 1, 2 and 4 separate processes, each configured for
//! 2R against one simulator quota R — issue 4's target, measured without RabbitMQ and S3 in
//! the way (3b runs the same through the whole worker).
//!
//! The bench binary re-executes itself as the client processes (`OFFBOARD_BENCH_CLIENT` set):
//! each builds one `cxone_offboard::cxone::Client` from the worker's own settings, fetches its
//! token, prints `ready`, waits for `go` on stdin and then runs, for each user the parent hands
//! it (`u N`; the parent keeps 32 with each process, as a worker's prefetch does, until `end`),
//! the CXone calls of a saga through the typed client (resolve, keys, block login, state,
//! logout, revoke keys, skills, the contact history, delete), printing `fin` for each user
//! done, its cumulative requests and 429s every 250 ms and a `done` line at the end.

use super::*;

use cxone_offboard::config::Settings;
use cxone_offboard::cxone::{Client, Cxone, UserFilter};
use cxone_offboard::metrics::Metrics;

/// Set in a child: "SIM_URL RPS BURST".
pub const CHILD_ENV: &str = "OFFBOARD_BENCH_CLIENT";

/// Users one process runs at once: the worker's default `amqp.prefetch` and
/// `worker.max_in_flight`.
const CLIENT_IN_FLIGHT: usize = 32;

/// Cumulative (requests, 429s) in a Prometheus text rendering of the metrics.
pub fn parse_counts(text: &str) -> (f64, f64) {
    let mut req = 0.0;
    let mut thr = 0.0;
    for line in text.lines() {
        let value = || {
            line.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        if line.starts_with("offboard_cxone_requests_total{") {
            req += value();
        } else if line.starts_with("offboard_cxone_throttled_total") {
            thr += value();
        }
    }
    (req, thr)
}

/// The CXone calls of one saga, through the typed client, as the saga makes them.
async fn one_saga(c: &Client, n: u64) -> anyhow::Result<()> {
    let ext = format!("E{n:06}");
    let user = c
        .find_users(UserFilter::ExternalIdentity(&ext))
        .await?
        .into_iter()
        .next()
        .with_context(|| format!("{ext}: no such user"))?;
    let agent = c
        .get_agent(&user.id)
        .await?
        .with_context(|| format!("{ext}: no agent"))?;
    let id = agent.agent_id;
    let keys = c.access_keys(id).await?;
    c.set_agent_active(id, false, Some(Utc::now())).await?;
    let state = c.agent_state(id).await?;
    if state
        .as_ref()
        .is_some_and(|s| !s.agent_state_name.eq_ignore_ascii_case("LoggedOut"))
    {
        c.logout(id).await?;
    }
    for key in &keys {
        c.delete_access_key(&key.access_key_id).await?;
    }
    let skills: Vec<i64> = c
        .agent_skills(id)
        .await?
        .iter()
        .map(|s| s.skill_id)
        .collect();
    if !skills.is_empty() {
        c.remove_skills(id, &skills).await?;
    }
    let end = Utc::now();
    let start = end - chrono::Duration::days(365);
    let mut next = None;
    loop {
        let page = c.contacts_page(id, start, end, next.as_ref()).await?;
        match page.next {
            Some(url) => next = Some(url),
            None => break,
        }
    }
    c.deactivate_user(&user.id).await?;
    Ok(())
}

/// The child process: see the module comment.
pub fn child(spec: &str) -> anyhow::Result<()> {
    let v: Vec<&str> = spec.split_whitespace().collect();
    let [sim_url, rps, burst] = v[..] else {
        bail!("{CHILD_ENV}: expected \"SIM_URL RPS BURST\", got {spec:?}");
    };
    let env: HashMap<String, String> = [
        ("OFFBOARD__CXONE__ISSUER", sim_url),
        ("OFFBOARD__CXONE__ACCESS_KEY_ID", "sim-key"),
        ("OFFBOARD__CXONE__ACCESS_KEY_SECRET", "sim-secret"),
        ("OFFBOARD__CXONE__RATE_LIMIT__REQUESTS_PER_SECOND", rps),
        ("OFFBOARD__CXONE__RATE_LIMIT__BURST", burst),
        ("OFFBOARD__S3__BUCKET", "unused"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let settings = Settings::load_from(None, env)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let metrics = Metrics::new();
        let client = Client::new(&settings.cxone, metrics.clone())?;
        client.connect().await?;
        // The token, fetched before the clock starts.
        let _ = client.get_agent("1").await;
        println!("ready");
        // stdin: "go", then "u N" (run employee N) as the parent hands out work, then "end".
        let (tx, mut work) = tokio::sync::mpsc::unbounded_channel::<Option<u64>>();
        let (go_tx, go) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut go_tx = Some(go_tx);
            for line in std::io::stdin().lines() {
                let Ok(line) = line else { break };
                let line = line.trim();
                if line == "go" {
                    if let Some(g) = go_tx.take() {
                        let _ = g.send(());
                    }
                } else if let Some(n) = line.strip_prefix("u ").and_then(|n| n.parse().ok()) {
                    let _ = tx.send(Some(n));
                } else if line == "end" {
                    let _ = tx.send(None);
                    break;
                }
            }
        });
        go.await?;
        let started = Instant::now();
        let ticker = {
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let mut next = started;
                loop {
                    next += Duration::from_millis(250);
                    tokio::time::sleep_until(next.into()).await;
                    let (req, thr) = parse_counts(&metrics.render());
                    println!("tick {:.3} {req} {thr}", started.elapsed().as_secs_f64());
                }
            })
        };
        let mut set = tokio::task::JoinSet::new();
        let mut failed = 0;
        let mut ended = false;
        while !(ended && set.is_empty()) {
            tokio::select! {
                msg = work.recv(), if !ended => match msg {
                    Some(Some(n)) => {
                        let c = client.clone();
                        set.spawn(async move { one_saga(&c, n).await });
                    }
                    _ => ended = true,
                },
                Some(r) = set.join_next() => {
                    match r {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            failed += 1;
                            eprintln!("[client] {e:#}");
                        }
                        Err(e) => {
                            failed += 1;
                            eprintln!("[client] task: {e}");
                        }
                    }
                    println!("fin");
                }
            }
        }
        let wall = started.elapsed().as_secs_f64();
        ticker.abort();
        let (req, thr) = parse_counts(&metrics.render());
        println!("done {wall:.3} {req} {thr} {failed}");
        anyhow::Ok(())
    })
}

/// What the parent hears from one child.
enum Heard {
    Ready,
    Tick(usize, f64, f64, f64),
    Fin(usize),
    Done(usize, f64, f64, f64, u64),
}

struct ClientRun {
    wall: f64,
    accepted: u64,
    throttled: u64,
    client_requests: f64,
    failed: u64,
    /// Per process: (t, cumulative non-429 requests).
    per_proc: Vec<Vec<(f64, f64)>>,
    /// Simulator: (t, cumulative accepted, cumulative 429s).
    sim: Vec<(f64, f64, f64)>,
}

async fn client_run(opts: &Opts, procs: usize, n: u64) -> anyhow::Result<ClientRun> {
    settle(0.1, Duration::from_secs(if opts.quick { 5 } else { 30 }));
    let id = uuid::Uuid::new_v4().simple().to_string();
    let dir = opts.work.join(format!("client-{}", &id[..10]));
    std::fs::create_dir_all(&dir)?;
    let (_sim, sim_url) = start_sim(
        &dir,
        &SimArgs {
            users: n,
            interactions: 20,
            rate_limit: Some((R, SIM_BURST)),
        },
    )?;
    let exe = std::env::current_exe()?;
    let (tx, rx) = std::sync::mpsc::channel();
    let mut children = Vec::new();
    let mut stdins = Vec::new();
    for p in 0..procs {
        let spec = format!("{sim_url} {} {SIM_BURST}", 2.0 * R);
        let log = std::fs::File::create(dir.join(format!("client-{p}.log")))?;
        let spawned = Command::new(&exe)
            .env(CHILD_ENV, spec)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("starting a client process")?;
        let mut child = Proc {
            name: format!("client {}", p + 1),
            pid: spawned.id(),
            child: spawned,
        };
        stdins.push(child.child.stdin.take().context("child stdin")?);
        let stdout = child.child.stdout.take().context("child stdout")?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let f: Vec<&str> = line.split_whitespace().collect();
                let num = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
                let heard = match f.first().copied() {
                    Some("ready") => Heard::Ready,
                    Some("tick") => Heard::Tick(p, num(1), num(2), num(3)),
                    Some("fin") => Heard::Fin(p),
                    Some("done") => Heard::Done(p, num(1), num(2), num(3), num(4) as u64),
                    _ => continue,
                };
                if tx.send(heard).is_err() {
                    break;
                }
            }
        });
        children.push(child);
    }
    drop(tx);
    let mut ready = 0;
    while ready < procs {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Heard::Ready) => ready += 1,
            Ok(_) => {}
            Err(_) => bail!(
                "client processes did not get ready; logs in {}",
                dir.display()
            ),
        }
    }
    // Let the simulator's bucket refill from the warm-up calls.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let http = reqwest::Client::new();
    let base = sim_stats(&http, &sim_url).await?;
    let started = Instant::now();
    // The work queue: each process holds up to `CLIENT_IN_FLIGHT` users, as a worker with
    // that prefetch holds messages, and gets the next one when it finishes one.
    for stdin in &mut stdins {
        use std::io::Write as _;
        writeln!(stdin, "go")?;
    }
    let mut next_user = 1;
    let mut ended = vec![false; procs];
    let mut hand_out = |p: usize| -> std::io::Result<()> {
        use std::io::Write as _;
        if ended[p] {
            return Ok(());
        }
        if next_user <= n {
            writeln!(stdins[p], "u {next_user}")?;
            next_user += 1;
        } else {
            writeln!(stdins[p], "end")?;
            ended[p] = true;
        }
        stdins[p].flush()
    };
    for _ in 0..CLIENT_IN_FLIGHT {
        for p in 0..procs {
            hand_out(p)?;
        }
    }
    let mut per_proc = vec![vec![(0.0, 0.0)]; procs];
    let mut sim = vec![(0.0, 0.0, 0.0)];
    let mut done = 0;
    let (mut wall, mut client_requests, mut failed) = (0.0_f64, 0.0, 0);
    let mut next_sample = started + Duration::from_millis(250);
    let deadline = started + Duration::from_secs(n / 2 + 120);
    while done < procs {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Heard::Tick(p, t, req, thr)) => per_proc[p].push((t, req - thr)),
            Ok(Heard::Fin(p)) => hand_out(p)?,
            Ok(Heard::Done(p, t, req, thr, f)) => {
                per_proc[p].push((t, req - thr));
                // The clock of the slowest process, from the moment it was told to go.
                wall = wall.max(started.elapsed().as_secs_f64());
                client_requests += req;
                failed += f;
                done += 1;
            }
            Ok(Heard::Ready) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                bail!("a client process exited early; logs in {}", dir.display())
            }
        }
        if Instant::now() >= next_sample {
            next_sample += Duration::from_millis(250);
            let s = sim_stats(&http, &sim_url).await?;
            sim.push((
                started.elapsed().as_secs_f64(),
                ((s.total - s.throttled) - (base.total - base.throttled)) as f64,
                (s.throttled - base.throttled) as f64,
            ));
        }
        if Instant::now() > deadline {
            bail!("client processes timed out; logs in {}", dir.display());
        }
    }
    let end = sim_stats(&http, &sim_url).await?;
    for mut c in children {
        c.stop(Duration::from_secs(5));
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ClientRun {
        wall,
        accepted: (end.total - end.throttled) - (base.total - base.throttled),
        throttled: end.throttled - base.throttled,
        client_requests,
        failed,
        per_proc,
        sim,
    })
}

pub async fn client_scaleout(opts: &Opts, rep: &mut Report) -> anyhow::Result<()> {
    let n: u64 = if opts.quick { 200 } else { 1000 };
    let _ = writeln!(
        rep.md,
        "\n## 3a. Scale-out of the CXone client: 1, 2 and 4 processes, each configured for 2R = {} req/s, against one quota R = {R}\n",
        2.0 * R
    );
    let _ = writeln!(
        rep.md,
        "Issue 4's target, measured on the client alone. Each process is a separate OS process holding one `cxone::Client` built from the worker's settings (`requests_per_second={}`, `burst={SIM_BURST}`) and runs, for each user it is handed, the CXone calls of a saga through the typed client (resolve, access keys, block login, agent state, logout, revoke keys, skills, the contact history, delete). The {n} simulated users (20 contacts each) come from one shared queue: each process holds {CLIENT_IN_FLIGHT} at a time and is handed the next one when it finishes one, as a worker with the default `amqp.prefetch` = `worker.max_in_flight` = {CLIENT_IN_FLIGHT} takes messages. Utilisation = requests the simulator accepted (non-429) / (R × wall time); wall time = `go` → the last process done. Section 3b runs the same through the whole worker.\n",
        2.0 * R
    );
    let _ = writeln!(
        rep.md,
        "| processes | utilisation (target ≥ 0.90) | 429 share (target < 2 %) | wall time | accepted / 429 / client-counted requests (per run) |\n|---|---|---|---|---|"
    );
    let counts: Vec<usize> = std::env::var("BENCH_SCALEOUT_PROCS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 4]);
    let mut plots = Vec::new();
    for procs in counts {
        let mut runs = Vec::new();
        for i in 0..opts.runs {
            eprintln!(
                "[bench] client scale-out {procs} process(es) run {}/{}",
                i + 1,
                opts.runs
            );
            let r = client_run(opts, procs, n).await?;
            eprintln!(
                "[bench]   wall {:.1}s accepted {} 429 {} util {:.3} failed {}",
                r.wall,
                r.accepted,
                r.throttled,
                r.accepted as f64 / (R * r.wall),
                r.failed
            );
            if r.failed > 0 {
                bail!("{} of the client sagas failed", r.failed);
            }
            if std::env::var_os("BENCH_TRACE").is_some() {
                trace_client(&r);
            }
            runs.push(r);
        }
        let util: Vec<f64> = runs
            .iter()
            .map(|r| r.accepted as f64 / (R * r.wall))
            .collect();
        let thr: Vec<f64> = runs
            .iter()
            .map(|r| 100.0 * r.throttled as f64 / (r.accepted + r.throttled).max(1) as f64)
            .collect();
        let walls: Vec<f64> = runs.iter().map(|r| r.wall).collect();
        let (u, t) = scale_verdicts(
            rep,
            &format!("3a. CXone client, {procs} process(es) at 2R"),
            &util,
            &thr,
        );
        let _ = writeln!(
            rep.md,
            "| {procs} | {u} | {t} | {} | {} |",
            fmt_mmm(&walls, 1, " s"),
            runs.iter()
                .map(|r| format!("{}/{}/{:.0}", r.accepted, r.throttled, r.client_requests))
                .collect::<Vec<_>>()
                .join(", "),
        );
        let Some(r) = runs.get(median_index(&util)) else {
            continue;
        };
        let rel = rate_chart(
            rep,
            &format!("client-scaleout-{procs}.svg"),
            &format!("CXone client: {procs} process(es) at 2R each vs quota R = {R}"),
            "seconds since go",
            &r.per_proc,
            &r.sim,
        )?;
        plots.push(format!(
            "![client, {procs} process(es): request rate per process]({rel})\n"
        ));
    }
    rep.md.push('\n');
    for p in plots {
        rep.md.push_str(&p);
        rep.md.push('\n');
    }
    Ok(())
}

/// `BENCH_TRACE=1`: accepted and 429s per second at the simulator and per process.
fn trace_client(r: &ClientRun) {
    let sim = rates(
        &r.sim.iter().map(|(t, a, _)| (*t, *a)).collect::<Vec<_>>(),
        1.0,
    );
    let thr = rates(
        &r.sim.iter().map(|(t, _, x)| (*t, *x)).collect::<Vec<_>>(),
        1.0,
    );
    let per: Vec<Vec<(f64, f64)>> = r.per_proc.iter().map(|p| rates(p, 1.0)).collect();
    let mut last = -1.0;
    for ((t, ok), (_, th)) in sim.iter().zip(&thr) {
        if t - last < 1.0 {
            continue;
        }
        last = *t;
        let mut line = format!("[trace] t={t:5.1} sim ok {ok:4.0} 429 {th:3.0} |");
        for p in &per {
            let v = p
                .iter()
                .rev()
                .find(|(pt, _)| pt <= t)
                .map_or(0.0, |(_, v)| *v);
            let _ = write!(line, " {v:4.0}");
        }
        eprintln!("{line}");
    }
}
