//! `demo`: the whole product in one process — the CXone simulator, a worker against the
//! configured broker and S3, N terminations published like an HRIS would, live progress and a
//! summary of what happened and where the evidence is.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use lapin::BasicProperties;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{Cli, Failure};
use crate::metrics::Metrics;
use crate::sim::{SimOptions, spawn};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  make demo                         # services up, then this with 50 users\n  \
    cxone-offboard demo --users 200 --rate-limit 100\n\n\
    Uses the configured broker and bucket (OFFBOARD__AMQP__URL, OFFBOARD__S3__ENDPOINT, …) with\n\
    broker names of its own (demo.<run>.*, deleted afterwards); journals, archives and\n\
    manifests stay in the bucket for `saga show` and `verify`. The mass-deletion guard admits\n\
    at least N sagas per minute during a demo."
)]
pub struct Args {
    /// Terminations to publish (simulated users E000001…).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub users: u64,
    /// Completed contacts each simulated user has (archived by the saga).
    #[arg(long, default_value_t = 20)]
    pub interactions: u64,
    /// The simulated tenant's API quota, requests per second (the worker is set to match).
    #[arg(long, default_value_t = 200.0)]
    pub rate_limit: f64,
    /// Send the terminations as an HR system would over HTTP: signed CloudEvents batches to
    /// the worker's intake (CONTRACT §13) instead of publishing to the broker. Also on with
    /// DEMO_INTAKE=1.
    #[arg(long, env = "DEMO_INTAKE", value_parser = clap::builder::FalseyValueParser::new())]
    pub intake: bool,
}

/// Events per signed intake request in `--intake` mode.
const INTAKE_BATCH: usize = 100;

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn secs_between(from: Option<&str>, to: Option<&str>) -> Option<f64> {
    let from = DateTime::parse_from_rfc3339(from?).ok()?;
    let to = DateTime::parse_from_rfc3339(to?).ok()?;
    Some((to - from).num_milliseconds() as f64 / 1000.0)
}

pub async fn run(cli: &Cli, args: &Args) -> Result<ExitCode, Failure> {
    if !(args.rate_limit.is_finite() && args.rate_limit > 0.0) {
        return Err(Failure {
            code: super::EXIT_USAGE,
            error: anyhow::anyhow!("--rate-limit must be above 0"),
        });
    }
    let mut settings = super::load_settings(cli)?;
    if std::env::var_os("RUST_LOG").is_none() {
        settings.log.filter = "warn,lapin=off".to_owned();
    }
    crate::telemetry::init(&settings.log);
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let prefix = format!("demo.{run_id}.");
    {
        let a = &mut settings.amqp;
        for name in [
            &mut a.events_exchange,
            &mut a.requests_queue,
            &mut a.dead_letter_exchange,
            &mut a.dead_queue,
            &mut a.outcomes_exchange,
            &mut a.held_queue,
            &mut a.housekeeping_queue,
            &mut a.delay_queue_prefix,
        ] {
            *name = format!("{prefix}{name}");
        }
    }
    let sim = spawn(
        SimOptions {
            users: args.users,
            interactions_per_user: args.interactions,
            rate_limit: Some(args.rate_limit),
            burst: 50,
            ..SimOptions::default()
        },
        "127.0.0.1:0".parse().context("simulator address")?,
    )
    .await?;
    // One simulated leaver's account is IdP-managed: CXone refuses to delete it.
    let refusing = format!("E{:06}", args.users.min(7));
    let http = reqwest::Client::new();
    http.post(format!("{}/_sim/faults", sim.base_url()))
        .json(&json!({ "users": { refusing.clone(): { "delete": "refuse" } } }))
        .send()
        .await
        .context("configuring the simulator")?;
    settings.cxone.issuer = sim.base_url();
    settings.cxone.api_base_url = None;
    settings.cxone.auth_base_url = None;
    settings.cxone.scim_base_url = None;
    settings.cxone.access_key_id = Some("sim-key".to_owned());
    settings.cxone.access_key_secret = Some(SecretString::from("sim-secret".to_owned()));
    settings.cxone.rate_limit.requests_per_second = args.rate_limit;
    settings.cxone.rate_limit.burst = 20;
    settings.http.listen = "127.0.0.1:0".to_owned();
    settings.guard.max_destructive_per_window = settings
        .guard
        .max_destructive_per_window
        .max(u32::try_from(args.users).unwrap_or(u32::MAX));
    // Demo runs come one after another: their own admissions should not hold the next run.
    settings.guard.window_secs = settings.guard.window_secs.min(60);
    settings.worker.max_in_flight = settings.worker.max_in_flight.max(64);
    // A signing secret of this run's own for the HTTP intake (never printed).
    let intake_secret = if args.intake {
        use base64::Engine as _;
        let key: [u8; 32] = rand::random();
        let secret = format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(key)
        );
        settings.intake.listen = Some("127.0.0.1:0".to_owned());
        settings.intake.sources.insert(
            "demo".to_owned(),
            crate::config::IntakeSource {
                secret: Some(SecretString::from(secret)),
                secret_file: None,
                requests_per_second: 1000.0,
                burst: 1000,
            },
        );
        Some(key.to_vec())
    } else {
        None
    };
    settings.amqp.prefetch = settings.amqp.prefetch.max(64);
    let bucket = settings.s3.bucket.clone();

    println!(
        "cxone-offboard demo: {} terminations against a simulated CXone tenant at {} \
         ({} req/s quota), broker {}, bucket s3://{bucket}",
        args.users,
        sim.base_url(),
        args.rate_limit,
        settings.amqp.redacted_url()
    );

    let settings = Arc::new(settings);
    let metrics = Metrics::new();
    let app = crate::app::App::build(settings.clone(), metrics).await?;
    let cxone = app.cxone.clone();
    let shutdown = CancellationToken::new();
    let running = app.start(shutdown.clone()).await?;
    // Wait for the worker to declare the topology.
    let ready_deadline = Instant::now() + Duration::from_secs(30);
    while !running.readiness.is_ready() {
        if Instant::now() > ready_deadline {
            return Err(
                anyhow::anyhow!("the worker did not connect to the broker within 30 s").into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let conn = crate::broker::connect(&settings.amqp, "demo").await?;
    let tap = conn.create_channel().await.context("channel")?;
    let queue = tap
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .context("declaring the outcome tap")?;
    tap.queue_bind(
        queue.name().clone(),
        settings.amqp.outcomes_exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .context("binding the outcome tap")?;
    let mut outcomes_stream = tap
        .basic_consume(
            queue.name().clone(),
            "demo-tap".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .context("consuming outcomes")?;

    let started = Instant::now();
    let since = Utc::now() - chrono::Duration::seconds(1);
    let mut published: BTreeMap<String, String> = BTreeMap::new();
    let mut events = Vec::with_capacity(usize::try_from(args.users).unwrap_or_default());
    for n in 1..=args.users {
        events.push(json!({
            "specversion": "1.0",
            "id": format!("demo-{run_id}-{n}"),
            "source": "hris://demo/acme",
            "type": "employee.terminated",
            "time": published
                .entry(format!("E{n:06}"))
                .or_insert_with(|| Utc::now().to_rfc3339())
                .clone(),
            "data": {
                "employee": { "external_id": format!("E{n:06}") },
                "reason": "involuntary",
            }
        }));
    }
    match (&intake_secret, running.intake_addr) {
        (Some(key), Some(addr)) => {
            let url = format!("http://{addr}/v1/sources/demo/events");
            println!(
                "sending {} terminations as signed CloudEvents batches of {INTAKE_BATCH} to {url}",
                args.users
            );
            send_over_intake(&http, &url, key, &run_id, &events).await?;
        }
        _ => {
            let publisher = conn.create_channel().await.context("channel")?;
            publisher
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .context("confirms")?;
            for event in &events {
                let body = serde_json::to_vec(event).context("event json")?;
                publisher
                    .basic_publish(
                        settings.amqp.events_exchange.as_str().into(),
                        "employee.terminated".into(),
                        BasicPublishOptions::default(),
                        &body,
                        BasicProperties::default()
                            .with_content_type("application/cloudevents+json".into())
                            .with_delivery_mode(2),
                    )
                    .await
                    .context("publishing")?;
            }
            publisher
                .wait_for_confirms()
                .await
                .context("waiting for publish confirms")?;
        }
    }

    let bar = if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        ProgressBar::new(args.users)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} sagas finished  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let timeout = Duration::from_secs_f64(args.users as f64 * 15.0 / args.rate_limit + 120.0);
    let mut finished: BTreeMap<String, Value> = BTreeMap::new();
    let mut revoked = 0u64;
    while (finished.len() as u64) < args.users && started.elapsed() < timeout {
        let next = tokio::time::timeout(Duration::from_millis(500), outcomes_stream.next()).await;
        if let Ok(Some(Ok(delivery))) = next
            && let Ok(v) = serde_json::from_slice::<Value>(&delivery.data)
        {
            let ty = v["type"].as_str().unwrap_or_default();
            if matches!(
                ty,
                "offboard.saga.completed" | "offboard.saga.failed" | "offboard.saga.held"
            ) {
                if v["data"]["revoked_at"].is_string() {
                    revoked += 1;
                }
                let subject = v["subject"].as_str().unwrap_or_default().to_owned();
                if finished.insert(subject, v).is_none() {
                    bar.inc(1);
                }
            }
        }
        let rps = cxone.limiter().current_rate();
        bar.set_message(format!("{revoked} locked out · limiter {rps:.0} req/s"));
    }
    bar.finish_and_clear();
    let wall = started.elapsed();

    shutdown.cancel();
    let _ = running.wait().await;
    // What `cxone-offboard status` shows for this run (read before the run's queues go).
    let status_table = {
        let store = crate::store::S3::new(&settings.s3).await;
        let mut cache = super::status::Cache::default();
        super::status::snapshot(&settings, &store, since, &mut cache)
            .await
            .map(|s| super::status::render(&s))
    };
    let stats: Value = match http
        .get(format!("{}/_sim/stats", sim.base_url()))
        .send()
        .await
    {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    cleanup(&conn, &settings.amqp).await;
    let _ = conn.close(200, "demo done".into()).await;
    sim.shutdown().await;

    // Summary.
    let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
    let mut revoke_times = Vec::new();
    let mut complete_times = Vec::new();
    let (mut records, mut bytes) = (0u64, 0u64);
    let mut manifest_example = None;
    let mut saga_example = None;
    for v in finished.values() {
        let d = &v["data"];
        *by_status
            .entry(d["status"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
        let event_time = published
            .get(v["subject"].as_str().unwrap_or_default())
            .map(String::as_str);
        if let Some(t) = secs_between(event_time, d["revoked_at"].as_str()) {
            revoke_times.push(t);
        }
        if let Some(t) = secs_between(event_time, v["time"].as_str()) {
            complete_times.push(t);
        }
        records += d["archive"]["records"].as_u64().unwrap_or(0);
        bytes += d["archive"]["bytes"].as_u64().unwrap_or(0);
        if manifest_example.is_none() {
            manifest_example = d["manifest"]["uri"].as_str().map(str::to_owned);
            saga_example = d["saga_id"].as_str().map(str::to_owned);
        }
    }
    revoke_times.sort_by(|a, b| a.total_cmp(b));
    complete_times.sort_by(|a, b| a.total_cmp(b));
    println!();
    match status_table {
        Ok(table) => print!("{table}"),
        Err(e) => eprintln!("warning: no status table: {:#}", e.error),
    }
    if by_status.contains_key("DEACTIVATED_ONLY") {
        println!(
            "                      DEACTIVATED_ONLY: {refusing}'s account is IdP-managed, CXone \
             refused the deletion; access is revoked"
        );
    }
    println!(
        "not finished          {}",
        args.users - finished.len() as u64
    );
    println!();
    println!(
        "published → revoked    p50 {:>6.2} s   p99 {:>6.2} s   (the HR system's view: login blocked, sessions ended, keys deleted)",
        pct(&revoke_times, 50.0),
        pct(&revoke_times, 99.0)
    );
    println!(
        "published → completed  p50 {:>6.2} s   p99 {:>6.2} s",
        pct(&complete_times, 50.0),
        pct(&complete_times, 99.0)
    );
    println!(
        "wall time              {:.1} s for {} sagas; CXone requests {} ({} answered 429)",
        wall.as_secs_f64(),
        finished.len(),
        stats["total"].as_u64().unwrap_or(0),
        stats["throttled"].as_u64().unwrap_or(0)
    );
    println!(
        "archives               {records} contacts, {} KiB under s3://{bucket}/archives/",
        bytes / 1024
    );
    if let (Some(m), Some(s)) = (&manifest_example, &saga_example) {
        println!(
            "manifests              s3://{bucket}/manifests/<external_id>/<saga_id>.json, e.g."
        );
        println!("                       {m}");
        println!();
        println!("look closer:           cxone-offboard saga show {s}");
        println!("                       cxone-offboard verify {m}");
        println!("                       cxone-offboard saga list --since 1h");
    }
    // The auditor's view of this run: the same report as `evidence export --format html`.
    let saga_ids: Vec<String> = finished
        .values()
        .filter_map(|v| v["data"]["saga_id"].as_str().map(str::to_owned))
        .collect();
    match evidence_report(&settings, saga_ids).await {
        Ok(path) => println!(
            "evidence report        {path} (open it in a browser; for any period: \
             cxone-offboard evidence export --since 1d --format html --out FILE)"
        ),
        Err(e) => eprintln!("warning: no evidence report: {e:#}"),
    }
    let all_done = finished.len() as u64 == args.users
        && finished
            .values()
            .all(|v| v["type"] == "offboard.saga.completed");
    Ok(if all_done {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_FAILURE)
    })
}

/// Writes `target/demo-evidence.html` for these sagas; returns its path.
async fn evidence_report(
    settings: &crate::config::Settings,
    saga_ids: Vec<String>,
) -> anyhow::Result<String> {
    use crate::audit::{export, html};
    let store = crate::store::S3::new(&settings.s3).await;
    let now = chrono::Utc::now();
    let period = export::Period {
        since: None,
        until: now + chrono::Duration::minutes(1),
    };
    let journals = export::journals(&store, saga_ids, &period, || {})
        .await
        .map_err(|e| anyhow::anyhow!("reading journals: {e}"))?;
    let mut rows: Vec<export::Row> = journals
        .iter()
        .map(|j| export::row(j, &settings.s3.bucket, now))
        .collect();
    super::evidence::verify_rows(&store, &mut rows).await;
    let counts = export::counts(&rows);
    let meta = html::Meta {
        title: "Access removal evidence (demo run)",
        period: format!(
            "in this demo run, up to {}",
            now.format("%Y-%m-%d %H:%M UTC")
        ),
        generated_at: now,
        bucket: &settings.s3.bucket,
        sla_secs: Some(settings.sla.revoke_within_secs),
        sample: None,
        population: rows.len(),
    };
    let dir = std::path::Path::new("target");
    std::fs::create_dir_all(dir)?;
    let path = dir.join("demo-evidence.html");
    std::fs::write(&path, html::render(&meta, &rows, &counts))?;
    Ok(path.display().to_string())
}

/// Posts `events` to the intake in signed batches, as an HR system would; every batch must be
/// answered 202 (the broker has it).
async fn send_over_intake(
    http: &reqwest::Client,
    url: &str,
    key: &[u8],
    run_id: &str,
    events: &[serde_json::Value],
) -> anyhow::Result<()> {
    let signer = crate::intake::webhook::Verifier::new(key.to_vec(), 300);
    for (i, batch) in events.chunks(INTAKE_BATCH).enumerate() {
        let body = serde_json::to_vec(batch).context("batch json")?;
        let id = format!("demo-{run_id}-batch-{i}");
        let ts = Utc::now().timestamp();
        let resp = http
            .post(url)
            .header("content-type", "application/cloudevents-batch+json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signer.sign(&id, ts, &body))
            .body(body)
            .send()
            .await
            .context("posting to the intake")?;
        let status = resp.status();
        if status != reqwest::StatusCode::ACCEPTED {
            let text = resp.text().await.unwrap_or_default();
            anyhow::bail!("the intake answered {status}: {text}");
        }
    }
    Ok(())
}

async fn cleanup(conn: &lapin::Connection, amqp: &crate::config::AmqpSettings) {
    let Ok(ch) = conn.create_channel().await else {
        return;
    };
    let mut queues = vec![
        amqp.requests_queue.clone(),
        amqp.dead_queue.clone(),
        amqp.held_queue.clone(),
        amqp.housekeeping_queue.clone(),
    ];
    for stage in [crate::saga::Stage::Access, crate::saga::Stage::Housekeeping] {
        for secs in [1u64, 10, 30, 60, 300, 600, 1800, 3600, 86400] {
            queues.push(crate::broker::topology::delay_queue_name(amqp, stage, secs));
        }
    }
    for q in queues {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for e in [
        &amqp.events_exchange,
        &amqp.dead_letter_exchange,
        &amqp.outcomes_exchange,
    ] {
        let _ = ch
            .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}
