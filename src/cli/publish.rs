//! `publish`: turns an HR export (CSV or JSON lines) into termination CloudEvents on the events
//! exchange, with publisher confirms, a progress bar, and a per-line report of bad rows.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use super::{Cli, Failure};
use crate::event::{self, Rules};
use crate::hr_export::{BadRow, DEFAULT_SOURCE, read_csv, read_jsonl};
use anyhow::Context;
use chrono::{SecondsFormat, Utc};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lapin::BasicProperties;
use lapin::PublisherConfirm;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};

/// Confirms awaited at once; enough to keep the broker busy, small enough to report promptly.
const WINDOW: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A header row, then one termination per row.
    Csv,
    /// One whole CloudEvent (JSON object) per line, published as-is once valid.
    Jsonl,
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "CSV columns (header row required; only external_id is mandatory; empty \
    cells are left out): external_id, username, email, effective_at (RFC 3339), reason, \
    terminate_sessions, archive_interactions, archive_lookback_days, delete_user, dry_run \
    (true/false/yes/no/1/0), notify.\n\
    Every row is checked exactly as the worker checks events; a bad row is reported with its \
    line number and field and is not published. Event ids are UUID v5 of (source, row), so \
    publishing the same file again publishes the same ids and the worker runs no saga twice.\n\
    Exit codes: 0 all published, 1 some rows bad or a publish failed, 2 usage (missing file, \
    bad header).\n\n\
    Examples:\n  \
    cxone-offboard publish --file leavers.csv\n  \
    cxone-offboard publish --file leavers.csv --rate 50 --source hris://workday/acme\n  \
    cxone-offboard publish --file events.jsonl --format jsonl"
)]
pub struct Args {
    /// The HR export to publish.
    #[arg(long, value_name = "FILE")]
    pub file: PathBuf,
    /// File format; by default from the extension (.jsonl/.ndjson: jsonl, otherwise csv).
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Publish at most this many events per second.
    #[arg(long, value_name = "N")]
    pub rate: Option<f64>,
    /// CloudEvents `source` of CSV rows (part of each event id and saga id).
    #[arg(long, value_name = "S", default_value = DEFAULT_SOURCE)]
    pub source: String,
}

fn usage(message: String) -> Failure {
    Failure {
        code: super::EXIT_USAGE,
        error: anyhow::anyhow!(message),
    }
}

pub async fn run(cli: &Cli, args: &Args) -> Result<ExitCode, Failure> {
    let settings = super::load_settings(cli)?;
    if let Some(rate) = args.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        return Err(usage("--rate must be a number above 0".to_owned()));
    }
    event::Source::parse("--source", &args.source).map_err(|e| usage(e.to_string()))?;
    let text = std::fs::read(&args.file)
        .map_err(|e| usage(format!("--file {}: {e}", args.file.display())))?;
    let format = args.format.unwrap_or_else(|| guess_format(&args.file));
    let rules = Rules::from_settings(&settings);
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
    let rows = match format {
        Format::Csv => {
            read_csv(&text, &args.source, &now, &rules).map_err(|e| usage(format!("{e}")))?
        }
        Format::Jsonl => read_jsonl(&text, &rules),
    };
    let total = rows.len() as u64;

    let amqp = &settings.amqp;
    let conn = crate::broker::connect(amqp, "publish").await?;
    let channel = conn.create_channel().await.context("opening a channel")?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .context("enabling publisher confirms")?;

    let bar = progress_bar(total);
    let started = Instant::now();
    let pace = args.rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let mut bad: Vec<BadRow> = Vec::new();
    let mut failed: Vec<BadRow> = Vec::new();
    let mut published = 0u64;
    let mut sent = 0u64;
    let mut pending: VecDeque<(u64, PublisherConfirm)> = VecDeque::new();
    let props = BasicProperties::default()
        .with_content_type("application/cloudevents+json".into())
        .with_delivery_mode(2);

    for row in rows {
        let ready = match row {
            Ok(r) => r,
            Err(b) => {
                bar.suspend(|| eprintln!("bad row: {b}"));
                bar.inc(1);
                bad.push(b);
                continue;
            }
        };
        if let Some(pace) = pace {
            tokio::time::sleep_until((started + pace.mul_f64(sent as f64)).into()).await;
        }
        let confirm = channel
            .basic_publish(
                amqp.events_exchange.as_str().into(),
                ready.routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &ready.body,
                props.clone(),
            )
            .await
            .with_context(|| format!("publishing to `{}`", amqp.events_exchange))?;
        sent += 1;
        pending.push_back((ready.line, confirm));
        if pending.len() >= WINDOW
            && let Some((line, confirm)) = pending.pop_front()
        {
            settle(line, confirm, &mut published, &mut failed, &bar).await?;
        }
    }
    while let Some((line, confirm)) = pending.pop_front() {
        settle(line, confirm, &mut published, &mut failed, &bar).await?;
    }
    bar.finish_and_clear();
    let _ = channel.close(200, "publish done".into()).await;
    let _ = conn.close(200, "publish done".into()).await;

    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "published {published} of {total} event(s) from {} to `{}` in {elapsed:.1}s ({:.0}/s); \
         {} bad row(s) not published; {} refused by the broker",
        args.file.display(),
        amqp.events_exchange,
        published as f64 / elapsed.max(0.001),
        bad.len(),
        failed.len(),
    );
    if !bad.is_empty() || !failed.is_empty() {
        eprintln!("rows not published:");
        for b in bad.iter().chain(&failed) {
            eprintln!("  {b}");
        }
        return Ok(ExitCode::from(super::EXIT_FAILURE));
    }
    Ok(ExitCode::SUCCESS)
}

async fn settle(
    line: u64,
    confirm: PublisherConfirm,
    published: &mut u64,
    failed: &mut Vec<BadRow>,
    bar: &ProgressBar,
) -> anyhow::Result<()> {
    let confirmation = confirm.await.context("waiting for the broker's confirm")?;
    bar.inc(1);
    let why = if confirmation.is_nack() {
        Some("the broker refused it (nack)")
    } else if confirmation.take_message().is_some() {
        Some("no queue is bound for it on the events exchange (returned)")
    } else {
        None
    };
    match why {
        None => *published += 1,
        Some(reason) => {
            let b = BadRow {
                line,
                field: "publish".to_owned(),
                reason: reason.to_owned(),
            };
            bar.suspend(|| eprintln!("not published: {b}"));
            failed.push(b);
        }
    }
    Ok(())
}

fn progress_bar(total: u64) -> ProgressBar {
    if !std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stdout());
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:40.cyan/blue} {pos}/{len} events  {per_sec}  ETA {eta}  {elapsed}",
    ) {
        bar.set_style(style);
    }
    bar
}

fn guess_format(path: &Path) -> Format {
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl" | "ndjson") => Format::Jsonl,
        _ => Format::Csv,
    }
}
