//! Throughput of the CXone simulator: simple authenticated requests per second, rate
//! limiting off, over loopback.
//!
//! `cargo bench --bench sim_throughput -- [--duration SECS] [--connections N] [--users N]`
//! starts the simulator in-process and a keep-alive load generator for a bounded time, then
//! prints the rate. `-- --serve [--listen ADDR]` only serves (and prints a token) so an
//! external generator such as `wrk` can drive it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use cxone_offboard::sim::{SimOptions, spawn};

struct Args {
    duration: Duration,
    connections: usize,
    users: u64,
    serve: bool,
    listen: SocketAddr,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        duration: Duration::from_secs(10),
        connections: 64,
        users: 1000,
        serve: false,
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--duration" => args.duration = Duration::from_secs_f64(value()?.parse()?),
            "--connections" => args.connections = value()?.parse()?,
            "--users" => args.users = value()?.parse()?,
            "--listen" => args.listen = value()?.parse()?,
            "--serve" => args.serve = true,
            // Flags cargo passes to every bench target.
            "--bench" | "--test" => {}
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    Ok(args)
}

async fn token(http: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let body: serde_json::Value = http
        .post(format!("{base}/authentication/v1/token/access-key"))
        .json(&serde_json::json!({"accessKeyId": "sim-key", "accessKeySecret": "sim-secret"}))
        .send()
        .await?
        .json()
        .await?;
    body["access_token"]
        .as_str()
        .map(str::to_owned)
        .context("no access_token")
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let opts = SimOptions {
        users: args.users,
        token_ttl: Duration::from_secs(24 * 3600),
        ..SimOptions::default()
    };
    let server = spawn(opts, args.listen).await?;
    let base = server.base_url();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .build()?;
    let token = token(&http, &base).await?;
    if args.serve {
        println!("listening on http://{}", server.addr());
        println!("token {token}");
        tokio::signal::ctrl_c().await?;
        server.shutdown().await;
        return Ok(());
    }

    // Warm up: materialize the users and open the connections.
    let done = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(args.connections);
    for worker in 0..args.connections {
        let (http, base, token) = (http.clone(), base.clone(), token.clone());
        let (done, count, errors, measuring) = (
            done.clone(),
            count.clone(),
            errors.clone(),
            measuring.clone(),
        );
        let users = args.users;
        tasks.push(tokio::spawn(async move {
            let mut n = worker as u64;
            while !done.load(Ordering::Relaxed) {
                n = (n + 7) % users;
                let url = format!(
                    "{base}/inContactAPI/services/v31.0/agents/{}/states",
                    1001 + n
                );
                let ok = match http.get(&url).bearer_auth(&token).send().await {
                    Ok(response) => {
                        let ok = response.status().is_success();
                        ok && response.bytes().await.is_ok()
                    }
                    Err(_) => false,
                };
                if measuring.load(Ordering::Relaxed) {
                    if ok {
                        count.fetch_add(1, Ordering::Relaxed);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    measuring.store(true, Ordering::Relaxed);
    let began = Instant::now();
    tokio::time::sleep(args.duration).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = began.elapsed();
    done.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await?;
    }
    let served = count.load(Ordering::Relaxed);
    println!(
        "sim_throughput: {served} requests in {:.1} s = {:.0} requests/s ({} connections, {} errors)",
        elapsed.as_secs_f64(),
        served as f64 / elapsed.as_secs_f64(),
        args.connections,
        errors.load(Ordering::Relaxed),
    );
    server.shutdown().await;
    Ok(())
}
