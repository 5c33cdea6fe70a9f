//! `replay`: moves matching dead letters back to the work queue. Each copy is published with
//! confirms before its original is acked, so a crash loses nothing and duplicates at most one
//! message; messages that do not match are never acked and go back in their order.

use std::collections::HashSet;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};

use super::{Cli, Failure};
use crate::broker::inspect::{DeadInfo, DeadReader, replay_copy};
use crate::broker::publisher::Publisher;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Filters combine with AND; a repeated filter matches any of its values. \
    Times are RFC 3339 (2026-11-22T10:00:00Z) or relative to now (90s, 30m, 2h, 7d) and apply \
    to when the message was dead-lettered.\n\
    Copies go to the work queue (amqp.requests_queue) through the default exchange as a fresh \
    start: the old park count, error and death headers are dropped (a new retry budget; a new \
    failure is reported as it happens), x-offboard-replay-count is incremented, and the control \
    headers are signed. A message already replayed replay.max_count times is refused unless \
    --force.\n\n\
    Examples:\n  \
    cxone-offboard replay --class permanent --step block_login --dry-run\n  \
    cxone-offboard replay --class exhausted --since 2h --rate 20\n  \
    cxone-offboard replay --employee E000042 --employee @rehired.txt\n  \
    cxone-offboard replay --saga 0b6c1f7e-6a55-5d7e-9d3e-2f1c0a9b8e77 --force"
)]
pub struct Args {
    /// Error class: invalid, permanent, exhausted, guard, or a broker reason such as delivery_limit.
    #[arg(long, value_name = "CLASS")]
    pub class: Vec<String>,
    /// Saga step that failed (x-offboard-step), e.g. block_login.
    #[arg(long, value_name = "STEP")]
    pub step: Vec<String>,
    /// Employee external id, or @FILE with one id per line.
    #[arg(long, value_name = "ID|@FILE")]
    pub employee: Vec<String>,
    /// Only messages dead-lettered at or after this time.
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only messages dead-lettered before this time.
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Saga id (x-offboard-saga-id, or derived from the event's source and id).
    #[arg(long, value_name = "SAGA_ID")]
    pub saga: Vec<String>,
    /// Replay at most this many messages.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Replay at most this many messages per second.
    #[arg(long, value_name = "N")]
    pub rate: Option<f64>,
    /// Print what would be replayed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Replay messages even past replay.max_count.
    #[arg(long)]
    pub force: bool,
}

/// The filters, parsed.
#[derive(Debug, Default)]
pub struct Filter {
    pub classes: HashSet<String>,
    pub steps: HashSet<String>,
    pub employees: HashSet<String>,
    pub sagas: HashSet<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

impl Filter {
    pub fn from_args(args: &Args, now: DateTime<Utc>) -> Result<Self, Failure> {
        let mut employees = HashSet::new();
        for value in &args.employee {
            if let Some(path) = value.strip_prefix('@') {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| usage(format!("--employee @{path}: {e}")))?;
                employees.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(str::to_owned),
                );
            } else {
                employees.insert(value.clone());
            }
        }
        let when = |flag: &str, v: &Option<String>| -> Result<Option<DateTime<Utc>>, Failure> {
            v.as_deref()
                .map(|s| parse_when(s, now).map_err(|e| usage(format!("{flag} {s}: {e}"))))
                .transpose()
        };
        Ok(Self {
            classes: args.class.iter().cloned().collect(),
            steps: args.step.iter().cloned().collect(),
            employees,
            sagas: args.saga.iter().cloned().collect(),
            since: when("--since", &args.since)?,
            until: when("--until", &args.until)?,
        })
    }

    pub fn matches(&self, info: &DeadInfo) -> bool {
        let any = |set: &HashSet<String>, value: Option<&str>| {
            set.is_empty() || value.is_some_and(|v| set.contains(v))
        };
        let at = info.dead_lettered_at;
        any(&self.classes, Some(&info.class))
            && any(&self.steps, info.step.as_deref())
            && any(&self.employees, info.employee.as_deref())
            && any(&self.sagas, info.saga_id.as_deref())
            && self.since.is_none_or(|s| at.is_some_and(|t| t >= s))
            && self.until.is_none_or(|u| at.is_some_and(|t| t < u))
    }
}

fn usage(message: String) -> Failure {
    Failure {
        code: super::EXIT_USAGE,
        error: anyhow::anyhow!(message),
    }
}

/// An RFC 3339 instant, or a duration before `now`: `90s`, `30m`, `2h`, `7d`, `1w`.
pub fn parse_when(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or("a relative time needs a unit: s, m, h, d or w")?;
    let (n, unit) = s.split_at(split);
    let n: i64 = n
        .parse()
        .map_err(|_| "expected RFC 3339 or a number with a unit, e.g. 2h".to_owned())?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(format!("unknown unit `{unit}` (use s, m, h, d or w)")),
    };
    Ok(now - chrono::Duration::seconds(n.saturating_mul(secs)))
}

pub async fn run(cli: &Cli, args: &Args) -> Result<ExitCode, Failure> {
    let settings = super::load_settings(cli)?;
    let filter = Filter::from_args(args, Utc::now())?;
    if let Some(rate) = args.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        return Err(usage("--rate must be a number above 0".to_owned()));
    }
    let amqp = &settings.amqp;
    let max_count = i64::from(settings.replay.max_count);
    let limit = args.limit.unwrap_or(usize::MAX);
    let control = if args.dry_run {
        None
    } else {
        Some(super::control_key(&settings).await?)
    };
    let conn = crate::broker::connect(amqp, "replay").await?;
    let publisher = Publisher::open(&conn)
        .await
        .context("opening a confirm channel")?;
    let mut reader = DeadReader::open(&conn, &amqp.dead_queue).await?;
    let snapshot = reader.snapshot();
    let pace = args.rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let started = Instant::now();
    let verb = if args.dry_run {
        "would replay"
    } else {
        "replayed"
    };

    let (mut examined, mut replayed, mut refused) = (0usize, 0usize, 0usize);
    let outcome: anyhow::Result<()> = async {
        while replayed < limit {
            let Some(message) = reader.next().await? else {
                break;
            };
            examined += 1;
            let info = &message.info;
            if !filter.matches(info) {
                continue;
            }
            let line = format!(
                "#{:<5} employee={} class={} step={} saga={} replays={}",
                message.position,
                info.employee.as_deref().unwrap_or("-"),
                info.class,
                info.step.as_deref().unwrap_or("-"),
                info.saga_id.as_deref().unwrap_or("-"),
                info.replay_count,
            );
            if info.replay_count >= max_count && !args.force {
                refused += 1;
                println!("refused      {line} (replay.max_count {max_count}; use --force)");
                continue;
            }
            if !args.dry_run {
                if let Some(pace) = pace {
                    let due = started + pace.mul_f64(replayed as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let Some(control) = &control else {
                    anyhow::bail!("no control-header key");
                };
                let props = replay_copy(
                    &message.properties,
                    &message.body,
                    info.replay_count + 1,
                    control,
                );
                publisher
                    .publish("", &amqp.requests_queue, &message.body, props, true)
                    .await
                    .with_context(|| format!("publishing to `{}`", amqp.requests_queue))?;
                // Only now, with the copy confirmed, does the original leave the dead queue.
                reader.ack(&message).await?;
            }
            replayed += 1;
            println!("{verb:<12} {line}");
        }
        Ok(())
    }
    .await;
    // Everything not acked (non-matching, refused, or unsent after an error) goes back in order.
    let closed = reader.close().await;
    publisher.close().await;
    let _ = conn.close(200, "replay done".into()).await;
    outcome?;
    closed?;

    println!(
        "{verb} {replayed} message(s) to `{}`; examined {examined} of {snapshot} in `{}`; \
         {refused} refused over replay.max_count; {:.1}s{}",
        amqp.requests_queue,
        amqp.dead_queue,
        started.elapsed().as_secs_f64(),
        if args.dry_run {
            " (dry run: nothing changed)"
        } else {
            ""
        }
    );
    Ok(if refused > 0 {
        ExitCode::from(super::EXIT_FAILURE)
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_and_absolute_times() {
        let now = DateTime::parse_from_rfc3339("2026-01-02T12:00:00Z")
            .expect("t")
            .with_timezone(&Utc);
        assert_eq!(
            parse_when("2h", now).expect("2h").to_rfc3339(),
            "2026-01-02T10:00:00+00:00"
        );
        assert_eq!(
            parse_when("1d", now).expect("1d").to_rfc3339(),
            "2026-01-01T12:00:00+00:00"
        );
        assert_eq!(
            parse_when("2026-01-01T00:00:00+01:00", now)
                .expect("rfc3339")
                .to_rfc3339(),
            "2025-12-31T23:00:00+00:00"
        );
        assert!(parse_when("2x", now).is_err());
        assert!(parse_when("yesterday", now).is_err());
        assert!(parse_when("12", now).is_err());
    }

    #[test]
    fn filters_combine_with_and() {
        let filter = Filter {
            classes: ["permanent".to_owned()].into(),
            steps: ["block_login".to_owned()].into(),
            ..Filter::default()
        };
        let mut info = DeadInfo {
            dead_lettered_at: None,
            employee: Some("E1".into()),
            class: "permanent".into(),
            step: Some("block_login".into()),
            error: None,
            saga_id: None,
            event_id: None,
            death_count: 0,
            replay_count: 0,
        };
        assert!(filter.matches(&info));
        info.step = Some("delete".into());
        assert!(!filter.matches(&info));
        info.step = None;
        assert!(!filter.matches(&info));
        let since = Filter {
            since: Some(Utc::now()),
            ..Filter::default()
        };
        // No timestamp: a time filter cannot match it.
        assert!(!since.matches(&info));
        assert!(Filter::default().matches(&info));
    }
}
