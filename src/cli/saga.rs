//! `saga list` and `saga show`: read the saga journals in S3 (`sagas/{saga_id}.json`).

use std::collections::BTreeMap;
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use futures_util::{StreamExt, stream};
use serde_json::{Value, json};

use super::{Cli, Failure};
use crate::saga::journal::{self, Journal};
use crate::store::{S3, Store};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: SagaCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum SagaCommand {
    /// List sagas with their state, and counts by state and final status.
    #[command(
        after_help = "--status matches the journal state (running, parked, completed, \
        failed, planned, compensated, scheduled, held, cancelled) or the final status (DELETED, \
        DEACTIVATED_ONLY, ALREADY_ABSENT, FAILED, ...), case-insensitively. --since is RFC 3339 \
        or relative (30m, 2h, 7d) and applies to when the saga was created; it reads the \
        per-day index (sagas from before 0.2 need `evidence backfill` once).\n\n\
        Examples:\n  cxone-offboard saga list\n  cxone-offboard saga list --status failed --since 1d\n  \
        cxone-offboard saga list --json | jq '.counts'"
    )]
    List(ListArgs),
    /// Show one saga: employee, steps, revocation time, archive, manifest, errors.
    #[command(
        after_help = "Examples:\n  cxone-offboard saga show 0b6c1f7e-6a55-5d7e-9d3e-2f1c0a9b8e77\n  \
        cxone-offboard saga show 0b6c1f7e-6a55-5d7e-9d3e-2f1c0a9b8e77 --json"
    )]
    Show(ShowArgs),
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only sagas in this state or with this final status.
    #[arg(long, value_name = "S")]
    pub status: Option<String>,
    /// Only sagas created at or after this time.
    #[arg(long, value_name = "T")]
    pub since: Option<String>,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The saga id.
    pub id: String,
    /// Print the journal as stored (JSON).
    #[arg(long)]
    pub json: bool,
}

pub async fn run(cli: &Cli, args: &Args) -> Result<ExitCode, Failure> {
    let settings = super::load_settings(cli)?;
    let store = S3::new(&settings.s3).await;
    match &args.command {
        SagaCommand::List(list) => run_list(&store, list).await,
        SagaCommand::Show(show) => run_show(&store, show).await,
    }
}

fn state_name(j: &Journal) -> String {
    serde_json::to_value(j.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

async fn run_list(store: &S3, args: &ListArgs) -> Result<ExitCode, Failure> {
    let since = args
        .since
        .as_deref()
        .map(|s| {
            super::replay::parse_when(s, Utc::now()).map_err(|e| Failure {
                code: super::EXIT_USAGE,
                error: anyhow::anyhow!("--since {s}: {e}"),
            })
        })
        .transpose()?;
    // With --since, only the days since then: the per-day index, not every journal.
    let ids: Vec<String> = match since {
        Some(since) => {
            let period = crate::audit::export::Period {
                since: Some(since),
                until: Utc::now() + chrono::Duration::minutes(1),
            };
            crate::audit::export::sagas_in(store, &period)
                .await
                .map_err(|e| anyhow::anyhow!("listing the day index: {e}"))?
        }
        None => store
            .list("sagas/")
            .await
            .map_err(|e| anyhow::anyhow!("listing sagas/: {e}"))?
            .iter()
            .filter_map(|k| k.strip_prefix("sagas/")?.strip_suffix(".json"))
            .map(str::to_owned)
            .collect(),
    };
    let loaded: Vec<(String, Result<Option<journal::Stored>, String>)> = stream::iter(ids)
        .map(|id| async move {
            let r = journal::load(store, &id).await.map_err(|e| e.to_string());
            (id, r)
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut journals = Vec::new();
    let mut unreadable = Vec::new();
    for (id, r) in loaded {
        match r {
            Ok(Some(s)) => journals.push(s.journal),
            Ok(None) => {}
            Err(e) => unreadable.push((id, e)),
        }
    }
    let wanted = args.status.as_deref().map(str::to_ascii_lowercase);
    journals.retain(|j| {
        since.is_none_or(|t| j.created_at >= t)
            && wanted.as_deref().is_none_or(|w| {
                state_name(j) == w
                    || j.status
                        .is_some_and(|s| s.as_str().to_ascii_lowercase() == w)
            })
    });
    journals.sort_by(|a, b| {
        a.created_at
            .cmp(&b.created_at)
            .then(a.saga_id.cmp(&b.saga_id))
    });
    let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    for j in &journals {
        *by_state.entry(state_name(j)).or_default() += 1;
        let status = j.status.map_or("-", |s| s.as_str());
        *by_status.entry(status.to_owned()).or_default() += 1;
    }

    if args.json {
        let sagas: Vec<Value> = journals
            .iter()
            .map(|j| {
                json!({
                    "saga_id": j.saga_id,
                    "external_id": j.employee.external_id,
                    "event_id": j.event.id,
                    "type": j.event.kind,
                    "state": state_name(j),
                    "status": j.status.map(|s| s.as_str()),
                    "next_step": j.next_step().map(|s| s.as_str()),
                    "error": j.error,
                    "created_at": j.created_at,
                    "updated_at": j.updated_at,
                })
            })
            .collect();
        let unreadable: Vec<Value> = unreadable
            .iter()
            .map(|(id, e)| json!({"saga_id": id, "error": e}))
            .collect();
        let doc = json!({
            "sagas": sagas,
            "counts": { "state": by_state, "status": by_status },
            "unreadable": unreadable,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).map_err(anyhow::Error::from)?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<36}  {:<20}  {:<11}  {:<16}  {:<15}  {:<20}  ERROR",
        "SAGA", "EMPLOYEE", "STATE", "STATUS", "NEXT STEP", "CREATED"
    );
    for j in &journals {
        println!(
            "{:<36}  {:<20}  {:<11}  {:<16}  {:<15}  {:<20}  {}",
            j.saga_id,
            super::dlq::clip(&j.employee.external_id, 20),
            state_name(j),
            j.status.map_or("-", |s| s.as_str()),
            j.next_step().map_or("-", |s| s.as_str()),
            j.created_at.format("%Y-%m-%d %H:%M:%S"),
            j.error
                .as_ref()
                .map(|e| super::dlq::clip(&format!("{}: {}", e.class, e.message), 80))
                .unwrap_or_else(|| "-".into()),
        );
    }
    let fmt = |m: &BTreeMap<String, usize>| {
        m.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("{} saga(s)", journals.len());
    println!("by state:  {}", fmt(&by_state));
    println!("by status: {}", fmt(&by_status));
    for (id, e) in &unreadable {
        eprintln!("unreadable journal {id}: {e}");
    }
    Ok(ExitCode::SUCCESS)
}

fn ts(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(
        || "-".to_owned(),
        |t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
    )
}

async fn run_show(store: &S3, args: &ShowArgs) -> Result<ExitCode, Failure> {
    let stored = journal::load(store, &args.id)
        .await
        .map_err(|e| anyhow::anyhow!("reading the journal of saga {}: {e}", args.id))?;
    let Some(stored) = stored else {
        return Err(Failure {
            code: super::EXIT_FAILURE,
            error: anyhow::anyhow!(
                "no journal for saga {} at s3://{}/{}",
                args.id,
                store.bucket(),
                crate::store::keys::journal(&args.id)
            ),
        });
    };
    let j = stored.journal;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&j).map_err(anyhow::Error::from)?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("saga        {}", j.saga_id);
    println!(
        "event       {} {} from {} (time {})",
        j.event.kind,
        j.event.id,
        j.event.source,
        j.event.time.as_deref().unwrap_or("-")
    );
    println!(
        "employee    {} user_id={} agent_id={}",
        j.employee.external_id,
        j.employee.user_id.as_deref().unwrap_or("-"),
        j.employee
            .agent_id
            .map_or_else(|| "-".to_owned(), |a| a.to_string())
    );
    if let Some(reason) = &j.event.reason {
        println!("reason      {reason}");
    }
    if let Some(at) = &j.event.effective_at {
        println!("effective   {at}");
    }
    println!(
        "state       {} (status {})",
        state_name(&j),
        j.status.map_or("-", |s| s.as_str())
    );
    println!(
        "created     {}   updated {}   completed {}",
        ts(Some(j.created_at)),
        ts(Some(j.updated_at)),
        ts(j.completed_at)
    );
    println!("revoked_at  {}", ts(j.revoked_at));
    println!();
    println!(
        "  {:<16} {:<11} {:>8}  {:<23}  {:>9}  DETAIL",
        "STEP", "STATUS", "ATTEMPTS", "STARTED", "DURATION"
    );
    for s in &j.steps {
        let status = serde_json::to_value(s.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let duration = match (s.started_at, s.finished_at) {
            (Some(a), Some(b)) => format!("{}ms", (b - a).num_milliseconds()),
            _ => "-".to_owned(),
        };
        let mut detail = s.detail.clone().unwrap_or_default();
        if let Some(e) = &s.error {
            detail = format!("{detail} [{}: {}]", e.class, e.message);
        }
        println!(
            "  {:<16} {:<11} {:>8}  {:<23}  {:>9}  {}",
            s.name.as_str(),
            status,
            s.attempts,
            ts(s.started_at),
            duration,
            detail.trim()
        );
    }
    println!();
    match &j.archive {
        Some(a) => println!(
            "archive     {} ({} records, {} bytes, sha256 {})",
            a.uri, a.records, a.bytes, a.sha256
        ),
        None => println!("archive     -"),
    }
    match &j.manifest {
        Some(m) => {
            println!("manifest    {} (sha256 {})", m.uri, m.sha256);
            let check = match store.get(&m.key).await {
                Ok(Some(o)) => match serde_json::from_slice::<Value>(&o.body) {
                    Ok(v) => match crate::evidence::verify_manifest(&v) {
                        Ok(()) => format!(
                            "hash chain ok, head {}",
                            v["chain_head"].as_str().unwrap_or("-")
                        ),
                        Err(e) => format!("hash chain FAIL: {e}"),
                    },
                    Err(e) => format!("not JSON: {e}"),
                },
                Ok(None) => "missing from the bucket".to_owned(),
                Err(e) => format!("unreadable: {e}"),
            };
            println!("            {check}");
        }
        None => println!("manifest    -"),
    }
    if let Some(e) = &j.error {
        println!(
            "error       {} at {}{}: {}",
            e.class,
            e.step.as_deref().unwrap_or("-"),
            e.http_status
                .map(|s| format!(" (HTTP {s})"))
                .unwrap_or_default(),
            e.message
        );
    }
    for w in &j.warnings {
        println!("warning     {w}");
    }
    if j.parks > 0 {
        println!("parked      {} time(s)", j.parks);
    }
    if let Some(l) = &j.lease {
        println!("lease       {} until {}", l.owner, ts(Some(l.expires_at)));
    }
    Ok(ExitCode::SUCCESS)
}
