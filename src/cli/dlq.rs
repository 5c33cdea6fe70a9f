//! `dlq list`: the dead letters in `offboard.dead`, read without consuming or reordering them.

use std::process::ExitCode;

use chrono::Utc;
use serde_json::json;

use super::{Cli, Failure};
use crate::broker::inspect::{DeadInfo, DeadReader};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// Show dead letters (oldest first) without consuming them.
    #[command(
        after_help = "The messages are taken unacknowledged and handed back one by one in \
                  their order (basic.nack with requeue), so nothing is lost and the order is \
                  kept; the whole queue is read even with --limit, because older brokers put \
                  requeued messages at the tail. A listing may count as a delivery in the \
                  quorum queue's x-delivery-count; the dead queue has no delivery limit, so that \
                  is harmless (see docs/operations.md).\n\n\
                  Examples:\n  cxone-offboard dlq list\n  cxone-offboard dlq list --limit 20\n  \
                  cxone-offboard dlq list --json | jq '.[] | select(.class == \"permanent\")'"
    )]
    List(ListArgs),
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Show at most this many messages (from the head of the queue).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// One JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(cli: &Cli, args: &Args) -> Result<ExitCode, Failure> {
    match &args.command {
        DlqCommand::List(list) => run_list(cli, list).await,
    }
}

async fn run_list(cli: &Cli, args: &ListArgs) -> Result<ExitCode, Failure> {
    let settings = super::load_settings(cli)?;
    let conn = crate::broker::connect(&settings.amqp, "dlq").await?;
    let mut reader = DeadReader::open(&conn, &settings.amqp.dead_queue).await?;
    let total = reader.snapshot();
    let limit = args.limit.unwrap_or(usize::MAX);
    let mut rows = Vec::new();
    while rows.len() < limit {
        match reader.next().await? {
            Some(m) => rows.push((m.position, m.info)),
            None => break,
        }
    }
    reader.close().await?;
    let _ = conn.close(200, "dlq list done".into()).await;

    if args.json {
        let items: Vec<serde_json::Value> = rows
            .iter()
            .map(|(position, info)| {
                let mut v = json!({ "position": position });
                if let (Some(map), Ok(serde_json::Value::Object(fields))) =
                    (v.as_object_mut(), serde_json::to_value(info))
                {
                    map.extend(fields);
                }
                v
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&items).map_err(anyhow::Error::from)?
        );
        return Ok(ExitCode::SUCCESS);
    }
    print_table(&settings.amqp.dead_queue, total, &rows);
    Ok(ExitCode::SUCCESS)
}

fn print_table(queue: &str, total: u32, rows: &[(usize, DeadInfo)]) {
    println!(
        "{:>5}  {:>6}  {:<20}  {:<14}  {:<15}  {:>6}  {:>7}  ERROR",
        "#", "AGE", "EMPLOYEE", "CLASS", "STEP", "DEATHS", "REPLAYS"
    );
    for (position, info) in rows {
        println!(
            "{:>5}  {:>6}  {:<20}  {:<14}  {:<15}  {:>6}  {:>7}  {}",
            position,
            info.dead_lettered_at.map(age).unwrap_or_else(|| "?".into()),
            clip(info.employee.as_deref().unwrap_or("-"), 20),
            clip(&info.class, 14),
            clip(info.step.as_deref().unwrap_or("-"), 15),
            info.death_count,
            info.replay_count,
            clip(info.error.as_deref().unwrap_or("-"), 100),
        );
    }
    println!(
        "{} of {total} dead letters in `{queue}` shown; nothing was consumed",
        rows.len()
    );
}

/// "42s", "17m", "5h", "3d".
pub fn age(at: chrono::DateTime<Utc>) -> String {
    let secs = (Utc::now() - at).num_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Cuts `s` to `max` characters with an ellipsis; one line.
pub fn clip(s: &str, max: usize) -> String {
    let one_line = s.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut out: String = one_line.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}
