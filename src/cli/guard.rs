//! `guard status` and `guard release`: the mass-deletion guard's window and the sagas it holds
//! in `offboard.held`, and letting some or all of them through.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use chrono::Utc;

use super::{Cli, Failure};
use crate::broker::headers::{self, GUARD_RELEASED, HELD_AT};
use crate::broker::inspect::DeadReader;
use crate::broker::publisher::Publisher;
use crate::saga::guard;
use crate::store::S3;

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  cxone-offboard guard status\n  \
    cxone-offboard guard release --employees approved-layoff.txt\n  \
    cxone-offboard guard release --count 100 --dry-run\n  cxone-offboard guard release --all")]
pub struct Args {
    #[command(subcommand)]
    pub command: GuardCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum GuardCommand {
    /// Show the window (admitted, capacity, when a slot frees up) and the held sagas.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Let held sagas through: all, those of the employees in a file, or the first N.
    Release(ReleaseArgs),
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["all", "employees", "count"])))]
pub struct ReleaseArgs {
    /// Release every held saga.
    #[arg(long)]
    pub all: bool,
    /// Release the sagas of the employees listed in FILE (one external id per line, `#` comments).
    #[arg(long, value_name = "FILE")]
    pub employees: Option<PathBuf>,
    /// Release the N oldest held sagas.
    #[arg(long, value_name = "N")]
    pub count: Option<usize>,
    /// Show what would be released; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

fn usage(message: String) -> Failure {
    Failure {
        code: super::EXIT_USAGE,
        error: anyhow::anyhow!(message),
    }
}

fn read_employees(path: &PathBuf) -> Result<BTreeSet<String>, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| usage(format!("--employees {}: {e}", path.display())))?;
    let mut out = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let id = line.split('#').next().unwrap_or("").trim();
        if id.is_empty() {
            continue;
        }
        crate::event::ExternalId::parse("external_id", id).map_err(|e| {
            usage(format!(
                "--employees {} line {}: {e}",
                path.display(),
                n + 1
            ))
        })?;
        out.insert(id.to_owned());
    }
    Ok(out)
}

pub async fn run(cli: &Cli, args: &Args) -> Result<ExitCode, Failure> {
    let settings = super::load_settings(cli)?;
    match &args.command {
        GuardCommand::Status { json } => status(&settings, *json).await,
        GuardCommand::Release(r) => release(&settings, r).await,
    }
}

async fn status(settings: &crate::config::Settings, json: bool) -> Result<ExitCode, Failure> {
    let store = S3::new(&settings.s3).await;
    let window = guard::read(&store, &settings.guard)
        .await
        .context("reading the guard window")?;
    let conn = crate::broker::connect(&settings.amqp, "guard").await?;
    let mut reader = DeadReader::open(&conn, &settings.amqp.held_queue).await?;
    let mut held = Vec::new();
    while let Some(m) = reader.next().await? {
        held.push(serde_json::json!({
            "position": m.position,
            "employee": m.info.employee,
            "saga_id": m.info.saga_id,
            "held_at": headers::get_str(m.properties.headers().as_ref(), HELD_AT),
        }));
    }
    reader.close().await?;
    let _ = conn.close(200, "guard status".into()).await;
    let max = settings.guard.max_destructive_per_window;
    let next_free = window.next_free(settings.guard.window_secs);
    if json {
        let doc = serde_json::json!({
            "max_destructive_per_window": max,
            "window_secs": settings.guard.window_secs,
            "admitted_in_window": window.admitted.len(),
            "next_slot_frees_at": next_free,
            "held": held,
        });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "window     {} of {max} destructive sagas admitted in the last {}s{}",
        window.admitted.len(),
        settings.guard.window_secs,
        match (window.admitted.len() as u32 >= max, next_free) {
            (true, Some(t)) => format!(" (full; a slot frees at {})", t.to_rfc3339()),
            _ => String::new(),
        }
    );
    println!(
        "held       {} in `{}`",
        held.len(),
        settings.amqp.held_queue
    );
    for h in &held {
        println!(
            "  #{:<5} {:<24} saga {}  held at {}",
            h["position"],
            h["employee"].as_str().unwrap_or("-"),
            h["saga_id"].as_str().unwrap_or("-"),
            h["held_at"].as_str().unwrap_or("-"),
        );
    }
    if !held.is_empty() {
        println!("release with: cxone-offboard guard release --employees FILE | --count N | --all");
    }
    Ok(ExitCode::SUCCESS)
}

async fn release(
    settings: &crate::config::Settings,
    args: &ReleaseArgs,
) -> Result<ExitCode, Failure> {
    let wanted = match &args.employees {
        Some(path) => Some(read_employees(path)?),
        None => None,
    };
    let amqp = &settings.amqp;
    let control = super::control_key(settings).await?;
    let conn = crate::broker::connect(amqp, "guard").await?;
    let publisher = Publisher::open(&conn)
        .await
        .context("opening a confirm channel")?;
    let mut reader = DeadReader::open(&conn, &amqp.held_queue).await?;
    let stamp = format!(
        "released by {}@{} at {}",
        std::env::var("USER").unwrap_or_else(|_| "operator".to_owned()),
        crate::hostname(),
        Utc::now().to_rfc3339()
    );
    let limit = args.count.unwrap_or(usize::MAX);
    let mut released = 0usize;
    let mut seen = BTreeSet::new();
    let verb = if args.dry_run {
        "would release"
    } else {
        "released"
    };
    let outcome: anyhow::Result<()> = async {
        while released < limit {
            let Some(m) = reader.next().await? else { break };
            let employee = m.info.employee.clone().unwrap_or_default();
            let matches = match &wanted {
                Some(set) => set.contains(&employee),
                None => true,
            };
            if !matches {
                continue;
            }
            seen.insert(employee.clone());
            if !args.dry_run {
                let mut table = headers::for_republish(m.properties.headers().as_ref());
                headers::set_str(&mut table, GUARD_RELEASED, &stamp);
                control.sign(&mut table, &m.body);
                let props = m.properties.clone().with_headers(table);
                publisher
                    .publish("", &amqp.requests_queue, &m.body, props, true)
                    .await
                    .with_context(|| format!("publishing to `{}`", amqp.requests_queue))?;
                // The copy is confirmed: only now does the held message go.
                reader.ack(&m).await?;
            }
            released += 1;
            println!(
                "{verb:<14} {employee:<24} saga {}",
                m.info.saga_id.as_deref().unwrap_or("-")
            );
        }
        Ok(())
    }
    .await;
    let closed = reader.close().await;
    publisher.close().await;
    let _ = conn.close(200, "guard release".into()).await;
    outcome?;
    closed?;
    println!("{verb} {released} held saga(s)");
    if let Some(set) = &wanted {
        let missing: Vec<&String> = set.difference(&seen).collect();
        if !missing.is_empty() {
            println!(
                "not held (already through, never held, or unknown): {}",
                missing
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
