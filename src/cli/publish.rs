//! `publish`: turns an HR export (CSV or JSON lines) into termination CloudEvents on the events
//! exchange, with publisher confirms, a progress bar, and a per-line report of bad rows.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{SecondsFormat, Utc};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lapin::BasicProperties;
use lapin::PublisherConfirm;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use serde_json::{Map, Value, json};

use super::{Cli, Failure};
use crate::event::{self, InvalidEvent, Limits};

/// Namespace of the event ids `publish` derives (UUID v5 over source + row).
const EVENT_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6f1d_2a90_c4b7_4e3a_8d55_0b9e_71c3_a2f4);

/// Default CloudEvents `source` of published rows.
pub const DEFAULT_SOURCE: &str = "cxone-offboard://publish";

/// Columns a CSV may have; only `external_id` is required.
pub const COLUMNS: [&str; 11] = [
    "external_id",
    "username",
    "email",
    "effective_at",
    "reason",
    "terminate_sessions",
    "archive_interactions",
    "archive_lookback_days",
    "delete_user",
    "dry_run",
    "notify",
];

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

/// One row that could not become an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    pub line: u64,
    pub field: String,
    pub reason: String,
}

impl std::fmt::Display for BadRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.field, self.reason)
    }
}

/// An event ready to publish.
#[derive(Debug, Clone)]
pub struct Ready {
    pub line: u64,
    pub routing_key: &'static str,
    pub body: Vec<u8>,
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
    let limits = Limits {
        max_bytes: settings.worker.max_event_bytes,
        default_lookback_days: settings.worker.archive_lookback_days,
    };
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
    let rows = match format {
        Format::Csv => {
            read_csv(&text, &args.source, &now, limits).map_err(|e| usage(format!("{e}")))?
        }
        Format::Jsonl => read_jsonl(&text, limits),
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

/// A header that cannot be read as the columns above.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("the CSV header cannot be read: {0}")]
    Unreadable(String),
    #[error("the CSV header has no `external_id` column (columns: {})", COLUMNS.join(", "))]
    NoExternalId,
    #[error("unknown CSV column `{0}` (columns: {cols})", cols = COLUMNS.join(", "))]
    Unknown(String),
    #[error("CSV column `{0}` appears twice")]
    Twice(String),
}

/// Reads a CSV export: each row becomes a validated event or a [`BadRow`].
pub fn read_csv(
    text: &[u8],
    source: &str,
    time: &str,
    limits: Limits,
) -> Result<Vec<Result<Ready, BadRow>>, HeaderError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(text);
    let header = reader
        .headers()
        .map_err(|e| HeaderError::Unreadable(e.to_string()))?
        .clone();
    let mut columns: Vec<&'static str> = Vec::new();
    for name in header.iter() {
        let lower = name.trim_start_matches('\u{feff}').to_ascii_lowercase();
        let known = COLUMNS
            .iter()
            .find(|c| **c == lower)
            .ok_or_else(|| HeaderError::Unknown(name.to_owned()))?;
        if columns.contains(known) {
            return Err(HeaderError::Twice(name.to_owned()));
        }
        columns.push(known);
    }
    if !columns.contains(&"external_id") {
        return Err(HeaderError::NoExternalId);
    }
    let mut out = Vec::new();
    for record in reader.records() {
        match record {
            Ok(record) => {
                let line = record.position().map_or(0, |p| p.line());
                let cells: Vec<(&str, &str)> = columns
                    .iter()
                    .copied()
                    .zip(record.iter())
                    .filter(|(_, v)| !v.is_empty())
                    .collect();
                if cells.is_empty() {
                    continue; // a blank line
                }
                let content: Vec<&str> = record.iter().collect();
                out.push(row_event(
                    line,
                    &cells,
                    &content.join("\u{1f}"),
                    source,
                    time,
                    limits,
                ));
            }
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                let reason = match e.kind() {
                    csv::ErrorKind::UnequalLengths {
                        expected_len, len, ..
                    } => format!("has {len} fields, the header has {expected_len}"),
                    csv::ErrorKind::Utf8 { .. } => "is not UTF-8".to_owned(),
                    _ => e.to_string(),
                };
                out.push(Err(BadRow {
                    line,
                    field: "row".to_owned(),
                    reason,
                }));
            }
        }
    }
    Ok(out)
}

/// The event id of a CSV row: the same row from the same source gives the same id.
pub fn row_event_id(source: &str, content: &str) -> String {
    uuid::Uuid::new_v5(&EVENT_NAMESPACE, format!("{source}\n{content}").as_bytes()).to_string()
}

fn row_event(
    line: u64,
    cells: &[(&str, &str)],
    content: &str,
    source: &str,
    time: &str,
    limits: Limits,
) -> Result<Ready, BadRow> {
    let bad = |field: &str, reason: String| BadRow {
        line,
        field: field.to_owned(),
        reason,
    };
    let mut employee = Map::new();
    let mut data = Map::new();
    let mut options = Map::new();
    for (column, value) in cells {
        let v = (*value).to_owned();
        match *column {
            "external_id" | "username" | "email" => {
                employee.insert((*column).to_owned(), Value::String(v));
            }
            "effective_at" | "reason" | "notify" => {
                data.insert((*column).to_owned(), Value::String(v));
            }
            "archive_lookback_days" => {
                let days: u64 = value
                    .parse()
                    .map_err(|_| bad(column, format!("`{value}` is not a whole number of days")))?;
                options.insert((*column).to_owned(), json!(days));
            }
            flag => {
                let b = parse_bool(value)
                    .ok_or_else(|| bad(flag, format!("`{value}` is not true or false")))?;
                options.insert(flag.to_owned(), Value::Bool(b));
            }
        }
    }
    data.insert("employee".to_owned(), Value::Object(employee));
    if !options.is_empty() {
        data.insert("options".to_owned(), Value::Object(options));
    }
    let event = json!({
        "specversion": "1.0",
        "id": row_event_id(source, content),
        "source": source,
        "type": event::TYPE_TERMINATED,
        "time": time,
        "datacontenttype": "application/json",
        "data": data,
    });
    let body = serde_json::to_vec(&event).map_err(|e| bad("row", e.to_string()))?;
    event::parse(&body, limits).map_err(|e| bad(&column_of(&e), e.reason))?;
    Ok(Ready {
        line,
        routing_key: event::TYPE_TERMINATED,
        body,
    })
}

/// The CSV column an event field came from (`data.employee.email` -> `email`).
fn column_of(e: &InvalidEvent) -> String {
    e.field.rsplit('.').next().unwrap_or(&e.field).to_owned()
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "yes" | "y" | "1" => Some(true),
        "false" | "no" | "n" | "0" => Some(false),
        _ => None,
    }
}

/// Reads JSON lines: each non-blank line must be a valid CloudEvent and is published as-is.
pub fn read_jsonl(text: &[u8], limits: Limits) -> Vec<Result<Ready, BadRow>> {
    let mut out = Vec::new();
    for (i, raw) in text.split(|b| *b == b'\n').enumerate() {
        let line = i as u64 + 1;
        let trimmed = raw.trim_ascii();
        if trimmed.is_empty() {
            continue;
        }
        out.push(match event::parse(trimmed, limits) {
            Ok(e) => Ok(Ready {
                line,
                routing_key: e.type_name(),
                body: trimmed.to_vec(),
            }),
            Err(e) => Err(BadRow {
                line,
                field: e.field,
                reason: e.reason,
            }),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csv(text: &str) -> Vec<Result<Ready, BadRow>> {
        read_csv(
            text.as_bytes(),
            "src",
            "2026-01-01T00:00:00Z",
            Limits::default(),
        )
        .expect("header")
    }

    #[test]
    fn rows_become_valid_events_with_stable_ids() {
        let rows = csv("external_id,email,delete_user,archive_lookback_days\n\
                        E1,a@b.example,no,30\nE2,,,\n");
        assert_eq!(rows.len(), 2);
        let first = rows[0].as_ref().expect("valid");
        assert_eq!(first.line, 2);
        let v: Value = serde_json::from_slice(&first.body).expect("json");
        assert_eq!(v["data"]["employee"]["external_id"], "E1");
        assert_eq!(v["data"]["options"]["delete_user"], false);
        assert_eq!(v["data"]["options"]["archive_lookback_days"], 30);
        let again = csv("external_id,email,delete_user,archive_lookback_days\n\
                         E1,a@b.example,no,30\n");
        let v2: Value =
            serde_json::from_slice(&again[0].as_ref().expect("valid").body).expect("json");
        assert_eq!(v["id"], v2["id"]);
        let second: Value =
            serde_json::from_slice(&rows[1].as_ref().expect("valid").body).expect("json");
        assert_ne!(v["id"], second["id"]);
    }

    #[test]
    fn bad_rows_name_line_and_field() {
        let rows = csv("external_id,email,dry_run,effective_at\n\
                        E1,,,\n\
                        E 2,,,\n\
                        E3,not-an-email,,\n\
                        E4,,maybe,\n\
                        E5,,,yesterday\n\
                        E6,too,many,fields,here\n");
        let bad: Vec<String> = rows
            .iter()
            .filter_map(|r| r.as_ref().err())
            .map(|b| format!("{}:{}", b.line, b.field))
            .collect();
        assert_eq!(
            bad,
            [
                "3:external_id",
                "4:email",
                "5:dry_run",
                "6:effective_at",
                "7:row"
            ]
        );
    }

    #[test]
    fn headers_are_checked() {
        let limits = Limits::default();
        assert!(matches!(
            read_csv(b"email\nx@y.example\n", "s", "t", limits),
            Err(HeaderError::NoExternalId)
        ));
        assert!(matches!(
            read_csv(b"external_id,emial\nE1,x\n", "s", "t", limits),
            Err(HeaderError::Unknown(_))
        ));
    }

    #[test]
    fn jsonl_lines_are_validated() {
        let good = r#"{"specversion":"1.0","id":"1","source":"s","type":"employee.terminated","data":{"employee":{"external_id":"E1"}}}"#;
        let text = format!("{good}\n\n{{\"specversion\":\"1.0\"}}\n");
        let rows = read_jsonl(text.as_bytes(), Limits::default());
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].as_ref().expect("valid").body, good.as_bytes());
        assert_eq!(rows[1].as_ref().expect_err("invalid").line, 3);
    }
}
