//! `reconcile --roster FILE [--publish] [--json]` (CONTRACT §12).

use std::io::IsTerminal as _;
use std::process::ExitCode;

use chrono::{SecondsFormat, Utc};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use super::{Cli, Failure};
use crate::audit::reconcile::{self, Finding, Roster};
use crate::store::keys::parse_uri;

/// Exit code when findings remain (CONTRACT §12).
pub const EXIT_FINDINGS: u8 = 3;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Findings: leaver = an ACTIVE CXone user whose external id is not on the \
    roster; reactivated = the same, offboarded earlier by a completed saga of this tool (someone \
    re-enabled the account); unmatched = ACTIVE without a usable external id (service accounts: \
    listed, never acted on). --publish sends an employee.terminated event (source \
    cxone-offboard://reconcile, reason reconciliation, one id per employee and day) for each \
    leaver and reactivated user through the events exchange, so the mass-deletion guard and every \
    safety rule apply. A summary outcome `offboard.reconcile.finished` goes to the outcomes \
    exchange. Exit 0: no leaver or reactivated user, or all published; 3: findings remain; 1/2 \
    as usual.\n\n\
    Examples:\n  cxone-offboard reconcile --roster active-employees.csv\n  \
    cxone-offboard reconcile --roster s3://hr-exports/roster.csv --publish --json"
)]
pub struct Args {
    /// CSV with a header row and an `external_id` column: the people who should have access.
    /// A local path or s3://BUCKET/KEY.
    #[arg(long, value_name = "FILE")]
    pub roster: String,
    /// Offboard each leaver and reactivated user (through the events exchange).
    #[arg(long)]
    pub publish: bool,
    /// Print {"leaver", "reactivated", "unmatched", "published"} as JSON.
    #[arg(long)]
    pub json: bool,
}

fn usage(message: String) -> Failure {
    Failure {
        code: super::EXIT_USAGE,
        error: anyhow::anyhow!(message),
    }
}

async fn read_roster(
    settings: &crate::config::Settings,
    location: &str,
) -> Result<Roster, Failure> {
    let bytes = if let Some((bucket, key)) = parse_uri(location) {
        let client = crate::store::client(&settings.s3).await;
        let out = client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "reading the roster {location}: {}",
                    crate::store::describe_sdk_error(&e)
                )
            })?;
        out.body
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the roster {location}: {e}"))?
            .into_bytes()
            .to_vec()
    } else {
        std::fs::read(location).map_err(|e| usage(format!("--roster {location}: {e}")))?
    };
    let roster =
        reconcile::parse_roster(&bytes).map_err(|e| usage(format!("--roster {location}: {e}")))?;
    if roster.ids.is_empty() {
        // Everybody would be a leaver.
        return Err(usage(format!(
            "--roster {location} lists nobody: refusing to call every CXone user a leaver"
        )));
    }
    Ok(roster)
}

pub async fn run(cli: &Cli, args: &Args) -> Result<ExitCode, Failure> {
    let settings = super::load_settings(cli)?;
    let roster = read_roster(&settings, &args.roster).await?;
    let client = crate::cxone::Client::new(&settings.cxone, crate::metrics::Metrics::new())?;
    let store = crate::store::S3::new(&settings.s3).await;

    let bar = if std::io::stderr().is_terminal() && !args.json {
        let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        if let Ok(style) =
            ProgressStyle::with_template("{bar:40.cyan/blue} {pos}/{len} CXone users read")
        {
            b.set_style(style);
        }
        b
    } else {
        ProgressBar::hidden()
    };
    let users = reconcile::all_users(&client, |read, total| {
        bar.set_length(total);
        bar.set_position(read);
    })
    .await
    .map_err(|e| anyhow::anyhow!("reading CXone users: {e}"))?;
    bar.finish_and_clear();
    let findings = reconcile::classify(&store, &users, &roster)
        .await
        .map_err(|e| anyhow::anyhow!("reading the saga index: {e}"))?;

    let actionable: Vec<&Finding> = findings
        .leaver
        .iter()
        .chain(&findings.reactivated)
        .collect();
    let now = Utc::now();
    let mut published = 0usize;
    let mut refused: Vec<(String, String)> = Vec::new();
    if args.publish && !actionable.is_empty() {
        let messages: Vec<(String, Vec<u8>)> = actionable
            .iter()
            .filter_map(|f| f.external_id.as_deref())
            .map(|id| {
                let body =
                    serde_json::to_vec(&reconcile::termination_event(id, now)).unwrap_or_default();
                ("employee.terminated".to_owned(), body)
            })
            .collect();
        let results = crate::broker::publish_confirmed(
            &settings.amqp,
            "reconcile",
            &settings.amqp.events_exchange,
            &messages,
        )
        .await?;
        for (f, r) in actionable.iter().zip(results) {
            match r {
                Ok(()) => published += 1,
                Err(why) => refused.push((f.external_id.clone().unwrap_or_default(), why)),
            }
        }
    }
    // The summary, for whoever watches the outcomes (a SIEM, HR): best effort.
    let summary = json!({
        "specversion": "1.0",
        "id": uuid::Uuid::new_v4().to_string(),
        "source": "cxone-offboard",
        "type": "offboard.reconcile.finished",
        "time": now.to_rfc3339_opts(SecondsFormat::Secs, true),
        "datacontenttype": "application/json",
        "data": {
            "users_read": findings.users_read,
            "roster": roster.ids.len(),
            "leaver": findings.leaver.len(),
            "reactivated": findings.reactivated.len(),
            "unmatched": findings.unmatched.len(),
            "published": published,
        }
    });
    if let Err(e) = crate::broker::publish_confirmed(
        &settings.amqp,
        "reconcile",
        &settings.amqp.outcomes_exchange,
        &[(
            "reconcile.finished".to_owned(),
            serde_json::to_vec(&summary).unwrap_or_default(),
        )],
    )
    .await
    {
        eprintln!("warning: the summary outcome was not published: {e:#}");
    }

    if args.json {
        let doc = json!({
            "leaver": findings.leaver,
            "reactivated": findings.reactivated,
            "unmatched": findings.unmatched,
            "published": published,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).map_err(anyhow::Error::from)?
        );
    } else {
        println!(
            "{:<12} {:<20} {:<36} {:<30} DETAIL",
            "FINDING", "EXTERNAL ID", "CXONE USER", "USERNAME"
        );
        let line = |kind: &str, f: &Finding, detail: String| {
            println!(
                "{kind:<12} {:<20} {:<36} {:<30} {detail}",
                super::dlq::clip(f.external_id.as_deref().unwrap_or("-"), 20),
                f.user_id,
                super::dlq::clip(f.username.as_deref().unwrap_or("-"), 30),
            );
        };
        for f in &findings.leaver {
            line("leaver", f, "not on the roster".to_owned());
        }
        for f in &findings.reactivated {
            line(
                "reactivated",
                f,
                format!(
                    "offboarded by saga {}, ACTIVE again",
                    f.saga_id.as_deref().unwrap_or("?")
                ),
            );
        }
        for f in &findings.unmatched {
            line(
                "unmatched",
                f,
                f.note
                    .clone()
                    .unwrap_or_else(|| "no external id: not acted on".to_owned()),
            );
        }
        println!(
            "{} CXone user(s) read, {} on the roster: {} leaver(s), {} reactivated, {} unmatched; {} termination(s) published",
            findings.users_read,
            roster.ids.len(),
            findings.leaver.len(),
            findings.reactivated.len(),
            findings.unmatched.len(),
            published
        );
        if !args.publish && !actionable.is_empty() {
            println!("run again with --publish to offboard the leavers and reactivated users");
        }
    }
    for (id, why) in &refused {
        eprintln!("not published: {id}: {why}");
    }
    Ok(
        if actionable.is_empty() || (args.publish && refused.is_empty()) {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(EXIT_FINDINGS)
        },
    )
}
