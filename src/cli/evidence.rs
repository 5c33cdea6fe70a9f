//! `evidence export` (CONTRACT §12) and `evidence backfill`.

use std::collections::BTreeMap;
use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use chrono::{SecondsFormat, Utc};
use futures_util::{StreamExt as _, stream};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use super::{Cli, Failure};
use crate::audit::export::{self, Period, Row};
use crate::audit::html;
use crate::store::S3;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: EvidenceCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum EvidenceCommand {
    /// The auditor's pack: one row per saga whose event arrived in [--since, --until), each
    /// manifest verified as `verify` does.
    #[command(
        after_help = "Columns: saga_id, external_id, event_id, reason, effective_at, received_at, \
        revoked_at, verified_at, completed_at, status, time_to_revoke_secs, sla_due_at, sla_met, \
        manifest_uri, manifest_sha256, manifest_verified. time_to_revoke_secs and the SLA count \
        from effective_at (or the arrival). A period is read through the per-day index: one LIST \
        per day, one GET per saga of the period. Exit 1 when a manifest fails verification \
        (the report is written all the same).\n\n\
        Examples:\n  cxone-offboard evidence export --since 2026-10-01T00:00:00Z --until 2026-11-01T00:00:00Z --out october.csv\n  \
        cxone-offboard evidence export --since 30d --sample 25 --seed 7 --format html --out sample.html"
    )]
    Export(ExportArgs),
    /// Writes the per-day and per-employee index entries of journals written before the index
    /// existed (once, after an upgrade from 0.1); safe to run again.
    Backfill,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Csv,
    Json,
    Html,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Start (inclusive): RFC 3339, or an age like 7d, 12h, 30m. Default: everything indexed.
    #[arg(long, value_name = "T")]
    pub since: Option<String>,
    /// End (exclusive): RFC 3339 or an age. Default: now.
    #[arg(long, value_name = "T")]
    pub until: Option<String>,
    /// Pick N sagas at random, as an auditor samples terminations.
    #[arg(long, value_name = "N")]
    pub sample: Option<usize>,
    /// Seed of the sample: the same seed picks the same sagas (default: random, printed).
    #[arg(long, value_name = "S", requires = "sample")]
    pub seed: Option<u64>,
    #[arg(long, value_enum, default_value = "csv")]
    pub format: Format,
    /// Write here instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Skip the manifest checks (manifest_verified left empty): a quick listing.
    #[arg(long)]
    pub no_verify: bool,
}

pub async fn run(cli: &Cli, args: &Args) -> Result<ExitCode, Failure> {
    let settings = super::load_settings(cli)?;
    let store = S3::new(&settings.s3).await;
    match &args.command {
        EvidenceCommand::Export(a) => export_cmd(&store, &settings.s3.bucket, a).await,
        EvidenceCommand::Backfill => backfill_cmd(&store).await,
    }
}

fn usage(message: String) -> Failure {
    Failure {
        code: super::EXIT_USAGE,
        error: anyhow::anyhow!(message),
    }
}

fn bar(total: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(&format!(
        "{{bar:40.cyan/blue}} {{pos}}/{{len}} {what}  {{per_sec}}  ETA {{eta}}"
    )) {
        bar.set_style(style);
    }
    bar
}

/// The period of `--since`/`--until`.
pub fn period(since: Option<&str>, until: Option<&str>) -> Result<Period, Failure> {
    let now = Utc::now();
    let parse = |flag: &str, s: &str| {
        super::replay::parse_when(s, now).map_err(|e| usage(format!("{flag} {s}: {e}")))
    };
    let since = since.map(|s| parse("--since", s)).transpose()?;
    let until = until
        .map(|s| parse("--until", s))
        .transpose()?
        .unwrap_or(now);
    if let Some(s) = since
        && s >= until
    {
        return Err(usage(format!(
            "--since {} is not before --until {}",
            s.to_rfc3339_opts(SecondsFormat::Secs, true),
            until.to_rfc3339_opts(SecondsFormat::Secs, true)
        )));
    }
    Ok(Period { since, until })
}

/// A manifest's verdict and the SHA-256 of its bytes.
type Checked = (bool, Option<String>);

/// Fills `manifest_verified` of every row with a manifest: the check of `verify`, and the
/// bytes must be the ones the saga wrote and reported (`manifest_sha256`).
pub async fn verify_rows(store: &S3, rows: &mut [Row]) {
    let verifying = bar(
        rows.iter().filter(|r| r.manifest_uri.is_some()).count() as u64,
        "manifests verified",
    );
    let client = store.sdk();
    let checked: Vec<(usize, Option<Checked>)> = stream::iter(rows.iter().enumerate())
        .map(|(i, r)| {
            let verifying = &verifying;
            async move {
                let Some(uri) = &r.manifest_uri else {
                    return (i, None);
                };
                let v = crate::audit::verify::manifest(client, uri).await;
                verifying.inc(1);
                let same = v.manifest_sha256.is_some() && v.manifest_sha256 == r.manifest_sha256;
                (i, Some((v.ok() && same, v.manifest_sha256)))
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    verifying.finish_and_clear();
    for (i, result) in checked {
        if let Some((ok, computed)) = result {
            rows[i].manifest_verified = Some(ok);
            if rows[i].manifest_sha256.is_none() {
                rows[i].manifest_sha256 = computed;
            }
        }
    }
}

async fn export_cmd(store: &S3, bucket: &str, args: &ExportArgs) -> Result<ExitCode, Failure> {
    if args.sample == Some(0) {
        return Err(usage("--sample must be at least 1".to_owned()));
    }
    let period = period(args.since.as_deref(), args.until.as_deref())?;
    let now = Utc::now();
    let ids = export::sagas_in(store, &period)
        .await
        .map_err(|e| anyhow::anyhow!("listing the day index: {e}"))?;
    let loading = bar(ids.len() as u64, "journals");
    let journals = export::journals(store, ids, &period, || loading.inc(1))
        .await
        .map_err(|e| anyhow::anyhow!("reading journals: {e}"))?;
    loading.finish_and_clear();
    let mut limits: BTreeMap<u64, usize> = BTreeMap::new();
    for j in &journals {
        if let Some(s) = &j.sla {
            *limits.entry(s.revoke_within_secs).or_default() += 1;
        }
    }
    let mut rows: Vec<Row> = journals
        .iter()
        .map(|j| export::row(j, bucket, now))
        .collect();
    let population = rows.len();
    let sample = args.sample.map(|n| {
        let seed = args.seed.unwrap_or_else(rand::random);
        (n.min(population), seed)
    });
    if let Some((n, seed)) = sample {
        rows = export::sample(rows, n, seed);
        eprintln!(
            "sampled {n} of {population} saga(s) with seed {seed} (the same --seed picks the same sample)"
        );
    }
    if !args.no_verify {
        verify_rows(store, &mut rows).await;
    }
    let counts = export::counts(&rows);
    let period_text = match period.since {
        Some(s) => format!(
            "from {} to {}",
            s.to_rfc3339_opts(SecondsFormat::Secs, true),
            period.until.to_rfc3339_opts(SecondsFormat::Secs, true)
        ),
        None => format!(
            "until {}",
            period.until.to_rfc3339_opts(SecondsFormat::Secs, true)
        ),
    };
    let bytes = match args.format {
        Format::Csv => export::csv(&rows)?,
        Format::Json => {
            let doc = json!({
                "period": {
                    "since": period.since.map(|s| s.to_rfc3339_opts(SecondsFormat::Secs, true)),
                    "until": period.until.to_rfc3339_opts(SecondsFormat::Secs, true),
                },
                "generated_at": now.to_rfc3339_opts(SecondsFormat::Secs, true),
                "sample": sample.map(|(n, seed)| json!({"n": n, "seed": seed, "population": population})),
                "counts": counts,
                "rows": rows,
            });
            let mut v = serde_json::to_vec_pretty(&doc).map_err(anyhow::Error::from)?;
            v.push(b'\n');
            v
        }
        Format::Html => {
            let meta = html::Meta {
                title: "Access removal evidence",
                period: period_text.clone(),
                generated_at: now,
                bucket,
                sla_secs: limits
                    .iter()
                    .max_by_key(|(_, n)| **n)
                    .map(|(secs, _)| *secs),
                sample,
                population,
            };
            html::render(&meta, &rows, &counts).into_bytes()
        }
    };
    match &args.out {
        Some(path) => std::fs::write(path, &bytes)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?,
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(&bytes)
                .and_then(|()| out.flush())
                .map_err(|e| anyhow::anyhow!("writing to stdout: {e}"))?;
        }
    }
    eprintln!(
        "{} saga(s) {period_text}{}: SLA met {}, breached {}, pending {}; manifests verified {}, failed {}, none {}",
        counts.sagas,
        args.out
            .as_ref()
            .map(|p| format!(" → {}", p.display()))
            .unwrap_or_default(),
        counts.sla_met,
        counts.sla_breached,
        counts.sla_pending,
        counts.manifests_verified,
        counts.manifests_failed,
        counts.without_manifest,
    );
    if counts.manifests_failed > 0 {
        eprintln!(
            "error: {} manifest(s) failed verification; run `cxone-offboard verify MANIFEST_URI` on each for the details",
            counts.manifests_failed
        );
        return Ok(ExitCode::from(super::EXIT_FAILURE));
    }
    Ok(ExitCode::SUCCESS)
}

async fn backfill_cmd(store: &S3) -> Result<ExitCode, Failure> {
    let progress = bar(0, "journals indexed");
    let (listed, indexed) = export::backfill(store, || progress.inc(1))
        .await
        .map_err(|e| anyhow::anyhow!("backfilling the index: {e}"))?;
    progress.finish_and_clear();
    println!("{indexed} of {listed} journal(s) indexed by day and employee");
    Ok(ExitCode::SUCCESS)
}
