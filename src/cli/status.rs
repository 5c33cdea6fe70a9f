//! `status [--since T] [--watch] [--interval SECS] [--json]`: layoff-day progress in the
//! terminal — sagas per stage and status, revocations per second and the ETA, time to revoke,
//! SLA, what is held or failed and the command to run next. Reads the saga journals of the
//! period (through the day index) and the broker's queue depths, never a worker's memory.

use std::collections::HashMap;
use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde::Serialize;
use serde_json::json;

use super::{Cli, Failure};
use crate::audit::export::{self, Period};
use crate::audit::html::human;
use crate::audit::status::{Progress, progress};
use crate::broker::topology::Delays;
use crate::config::Settings;
use crate::saga::journal::Journal;
use crate::store::S3;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Counts the sagas whose event arrived since --since (default 24h) from \
    their journals in S3, and reads the work, housekeeping, held, dead-letter and delay queues \
    of the broker. Stages: revoking (access not yet removed), housekeeping (access removed and \
    verified; skills, archive, deletion, manifest to do), done. The rate is revocations per \
    second over the last minute; the ETA is the sagas still revoking at that pace.\n\n\
    Examples:\n  cxone-offboard status\n  cxone-offboard status --watch --since 2h\n  \
    cxone-offboard status --json | jq .progress.revoking"
)]
pub struct Args {
    /// Sagas whose event arrived at or after this (RFC 3339 or a duration back: 30m, 6h, 2d).
    #[arg(long, default_value = "24h", value_name = "T")]
    pub since: String,
    /// Redraw until Ctrl-C.
    #[arg(long)]
    pub watch: bool,
    /// Seconds between redraws with --watch.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub interval: u64,
    /// One JSON document (with --watch: one per line).
    #[arg(long)]
    pub json: bool,
}

/// One queue as the broker reports it.
#[derive(Debug, Clone, Serialize)]
pub struct QueueDepth {
    pub role: &'static str,
    pub queue: String,
    pub messages: u32,
    pub consumers: u32,
}

/// Everything one screen shows.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub at: String,
    pub since: String,
    pub progress: Progress,
    /// `Err` text when the broker could not be read.
    #[serde(serialize_with = "broker_view")]
    pub queues: Result<Vec<QueueDepth>, String>,
    pub quota_requests_per_second: f64,
    pub quota_shared: bool,
    pub sla_secs: u64,
    pub next: Vec<String>,
}

/// `{"queues": [...], "error": null}` rather than serde's `{"Ok": ...}`.
fn broker_view<S: serde::Serializer>(
    queues: &Result<Vec<QueueDepth>, String>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let view = match queues {
        Ok(q) => json!({ "queues": q, "error": null }),
        Err(e) => json!({ "queues": [], "error": e }),
    };
    view.serialize(serializer)
}

/// Journals that will not change again, kept across redraws (`--watch` re-reads only the rest).
#[derive(Default)]
pub struct Cache {
    finished: HashMap<String, Journal>,
}

/// The queue depths, each by a passive declare on a channel of its own (a missing queue
/// closes its channel).
pub async fn queue_depths(settings: &Settings) -> Result<Vec<QueueDepth>, String> {
    let amqp = &settings.amqp;
    // `connect` bounds each node (and tries every node of a cluster).
    let conn = crate::broker::connect(amqp, "status")
        .await
        .map_err(|e| format!("{e:#}"))?;
    let mut wanted: Vec<(&'static str, String)> = vec![
        ("work", amqp.requests_queue.clone()),
        ("housekeeping", amqp.housekeeping_queue.clone()),
        ("held", amqp.held_queue.clone()),
        ("dead", amqp.dead_queue.clone()),
    ];
    wanted.extend(
        Delays::of(settings)
            .queue_names(amqp)
            .into_iter()
            .map(|q| ("delay", q)),
    );
    let mut out = Vec::new();
    for (role, queue) in wanted {
        let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
        if let Ok(q) = ch
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
        {
            out.push(QueueDepth {
                role,
                queue,
                messages: q.message_count(),
                consumers: q.consumer_count(),
            });
        }
        if ch.status().connected() {
            let _ = ch.close(200, "looked".into()).await;
        }
    }
    let _ = conn.close(200, "status".into()).await;
    Ok(out)
}

/// The sagas of `period`, re-reading only journals that may still change.
pub async fn journals(
    store: &S3,
    period: &Period,
    cache: &mut Cache,
) -> Result<Vec<Journal>, crate::store::StoreError> {
    let ids = export::sagas_in(store, period).await?;
    let unread: Vec<String> = ids
        .iter()
        .filter(|id| !cache.finished.contains_key(*id))
        .cloned()
        .collect();
    let fresh = export::journals(store, unread, period, || {}).await?;
    let mut all: Vec<Journal> = ids
        .iter()
        .filter_map(|id| cache.finished.get(id).cloned())
        .collect();
    for j in fresh {
        if j.state.is_final() {
            cache.finished.insert(j.saga_id.clone(), j.clone());
        }
        all.push(j);
    }
    Ok(all)
}

fn next_commands(p: &Progress, queues: &Result<Vec<QueueDepth>, String>) -> Vec<String> {
    let mut next = Vec::new();
    let depth = |role: &str| {
        queues.as_ref().map_or(0, |qs| {
            qs.iter()
                .filter(|q| q.role == role)
                .map(|q| q.messages)
                .sum::<u32>()
        })
    };
    if p.held > 0 || depth("held") > 0 {
        next.push("cxone-offboard guard status".to_owned());
        next.push(format!(
            "cxone-offboard guard release --count {}",
            p.held.max(depth("held") as usize)
        ));
    }
    if p.failed > 0 {
        next.push("cxone-offboard saga list --status failed".to_owned());
    }
    if depth("dead") > 0 {
        next.push("cxone-offboard dlq list".to_owned());
        next.push("cxone-offboard replay --dry-run".to_owned());
    }
    if queues
        .as_ref()
        .is_ok_and(|qs| qs.iter().any(|q| q.role == "work" && q.consumers == 0))
        && p.revoking > 0
    {
        next.push("no worker consumes the work queue: kubectl get pods -l app.kubernetes.io/component=worker".to_owned());
    }
    next
}

/// Reads everything once.
pub async fn snapshot(
    settings: &Settings,
    store: &S3,
    since: DateTime<Utc>,
    cache: &mut Cache,
) -> Result<Snapshot, Failure> {
    let now = Utc::now();
    let period = Period {
        since: Some(since),
        until: now + chrono::Duration::seconds(1),
    };
    let (journals, queues) = tokio::join!(journals(store, &period, cache), queue_depths(settings));
    let journals = journals.map_err(|e| anyhow::anyhow!("reading the saga index: {e}"))?;
    let mut progress = progress(&journals, now);
    // Events still in the work queue have no journal yet: they count for the ETA too.
    let waiting: u32 = queues.as_ref().map_or(0, |qs| {
        qs.iter()
            .filter(|q| q.role == "work")
            .map(|q| q.messages)
            .sum()
    });
    if waiting > 0 {
        progress.eta_secs = (progress.revocations_per_sec > 0.0)
            .then(|| (progress.revoking + waiting as usize) as f64 / progress.revocations_per_sec);
    }
    let next = next_commands(&progress, &queues);
    Ok(Snapshot {
        at: now.to_rfc3339_opts(SecondsFormat::Secs, true),
        since: since.to_rfc3339_opts(SecondsFormat::Secs, true),
        progress,
        queues,
        quota_requests_per_second: settings.cxone.rate_limit.requests_per_second,
        quota_shared: settings
            .cxone
            .rate_limit
            .redis_url()
            .ok()
            .flatten()
            .is_some(),
        sla_secs: settings.sla.revoke_within_secs,
        next,
    })
}

fn secs(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_owned(), human)
}

/// The table (the demo prints the same).
pub fn render(s: &Snapshot) -> String {
    let p = &s.progress;
    let mut out = String::new();
    let mut line = |l: String| {
        out.push_str(&l);
        out.push('\n');
    };
    line(format!("sagas since {} (as of {})", s.since, s.at));
    line(String::new());
    let depth = |role: &str| -> Option<(u32, u32)> {
        s.queues.as_ref().ok().map(|qs| {
            qs.iter()
                .filter(|q| q.role == role)
                .fold((0, 0), |(m, c), q| (m + q.messages, c + q.consumers))
        })
    };
    let queue_note = |role: &str, what: &str| match depth(role) {
        Some((m, c)) if role == "work" || role == "housekeeping" => {
            format!("   {what}: {m} waiting, {c} consumers")
        }
        Some((m, _)) => format!("   {what}: {m}"),
        None => String::new(),
    };
    line(format!("{:<22}{:>7}", "stage", "sagas"));
    let parked = p.by_status.get("PARKED").copied().unwrap_or(0);
    line(format!(
        "{:<22}{:>7}{}{}",
        "revoking access",
        p.revoking,
        queue_note("work", "work queue"),
        if parked > 0 {
            format!("; {parked} parked for a retry")
        } else {
            String::new()
        }
    ));
    line(format!(
        "{:<22}{:>7}{}",
        "housekeeping",
        p.housekeeping,
        queue_note("housekeeping", "queue")
    ));
    line(format!("{:<22}{:>7}", "done", p.done));
    line(format!(
        "{:<22}{:>7}{}",
        "held by the guard",
        p.held,
        queue_note("held", "held queue")
    ));
    line(format!(
        "{:<22}{:>7}{}",
        "scheduled",
        p.scheduled,
        queue_note("delay", "in delay queues")
    ));
    line(format!(
        "{:<22}{:>7}{}",
        "failed",
        p.failed,
        queue_note("dead", "dead letters")
    ));
    line(String::new());
    line(format!("{:<22}{:>7}", "status", "sagas"));
    for (status, n) in &p.by_status {
        line(format!("{status:<22}{n:>7}"));
    }
    line(String::new());
    let waiting = depth("work").map_or(0, |(m, _)| m as usize);
    let left = match waiting {
        0 => format!("the {} still revoking", p.revoking),
        w => format!("the {} still revoking and {w} waiting", p.revoking),
    };
    // Held and failed sagas whose access is not gone: no pace will revoke them.
    let stuck = [(p.held, "held by the guard"), (p.failed, "failed")]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect::<Vec<_>>();
    let eta = match (p.revoking + waiting, p.eta_secs) {
        (0, _) if p.revoked < p.sagas && !stuck.is_empty() => format!(
            "nothing in progress; {} still to decide (see next)",
            stuck.join(", ")
        ),
        (0, _) => "nothing left to revoke".to_owned(),
        (_, Some(eta)) => format!("ETA {} for {left}", human(eta)),
        (_, None) => format!("{left}; none revoked in the last minute"),
    };
    line(format!(
        "{:<22}{} of {}   {:.2}/s   {eta}",
        "revoked", p.revoked, p.sagas, p.revocations_per_sec
    ));
    line(format!(
        "{:<22}p50 {}   p99 {}",
        "time to revoke",
        secs(p.time_to_revoke_p50_secs),
        secs(p.time_to_revoke_p99_secs)
    ));
    line(format!(
        "{:<22}met {}   breached {}   due within the hour {}",
        format!("SLA ({})", human(s.sla_secs as f64)),
        p.sla_met,
        p.sla_breached,
        p.sla_due_within_hour
    ));
    line(format!(
        "{:<22}{} req/s{}",
        "CXone quota",
        s.quota_requests_per_second,
        if s.quota_shared {
            " (tenant-wide, shared in Redis)"
        } else {
            " per replica"
        }
    ));
    if let Err(e) = &s.queues {
        line(format!("broker                unavailable: {e}"));
    }
    for (saga, employee) in &p.held_sagas {
        line(format!("held                  {employee}  saga {saga}"));
    }
    for (saga, employee) in &p.failed_sagas {
        line(format!("failed                {employee}  saga {saga}"));
    }
    if !s.next.is_empty() {
        line(String::new());
        line("next:".to_owned());
        for n in &s.next {
            line(format!("  {n}"));
        }
    }
    out
}

/// Resolves at the next SIGINT; never without a listener.
async fn interrupted(listener: Option<&mut tokio::signal::unix::Signal>) {
    match listener {
        Some(l) => {
            l.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

pub async fn run(cli: &Cli, args: &Args) -> Result<ExitCode, Failure> {
    let settings = super::load_settings(cli)?;
    let since = super::replay::parse_when(&args.since, Utc::now()).map_err(|e| Failure {
        code: super::EXIT_USAGE,
        error: anyhow::anyhow!("--since {}: {e}", args.since),
    })?;
    let store = S3::new(&settings.s3).await;
    let mut cache = Cache::default();
    let terminal = std::io::stdout().is_terminal();
    // With --watch, Ctrl-C ends the loop cleanly (exit 0) whenever it comes: one listener for
    // the whole run, so a SIGINT during a redraw is not lost. Without --watch, the default.
    let mut interrupt = if args.watch {
        Some(
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .map_err(|e| anyhow::anyhow!("listening for Ctrl-C: {e}"))?,
        )
    } else {
        None
    };
    loop {
        let s = tokio::select! {
            s = snapshot(&settings, &store, since, &mut cache) => s?,
            () = interrupted(interrupt.as_mut()) => return Ok(ExitCode::SUCCESS),
        };
        let mut stdout = std::io::stdout().lock();
        if args.json {
            let _ = writeln!(stdout, "{}", json!(s));
        } else {
            if args.watch && terminal {
                // Home and clear: one screen, redrawn in place.
                let _ = write!(stdout, "\x1b[H\x1b[2J");
            }
            let _ = write!(
                stdout,
                "cxone-offboard status{}\n{}",
                if args.watch {
                    format!(" (every {} s, Ctrl-C to stop)", args.interval)
                } else {
                    String::new()
                },
                render(&s)
            );
        }
        let _ = stdout.flush();
        drop(stdout);
        if !args.watch {
            return Ok(if s.queues.is_err() {
                ExitCode::from(super::EXIT_FAILURE)
            } else {
                ExitCode::SUCCESS
            });
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(args.interval)) => {}
            () = interrupted(interrupt.as_mut()) => return Ok(ExitCode::SUCCESS),
        }
    }
}
