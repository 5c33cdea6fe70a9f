//! `verify`: recomputes a manifest's hash chain and the checksum, record count and size of the
//! archive it names (streamed, never held in memory).

use std::process::ExitCode;

use anyhow::Context;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{Cli, Failure};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Checks: the manifest is JSON; its hash chain (sha256 over each step's \
    canonical JSON, seeded with the saga id) matches hash_chain and chain_head; its SHA-256 over \
    the whole canonical document (integrity.sha256) matches, so no field was edited; the archive it \
    names exists and its SHA-256, line count and size match. Rescind manifests (*.rescind.json) \
    and sagas that archived nothing have no archive. Exit 1 on any mismatch.\n\n\
    Example:\n  cxone-offboard verify s3://cxone-offboard/manifests/E000042/0b6c1f7e-6a55-5d7e-9d3e-2f1c0a9b8e77.json"
)]
pub struct Args {
    /// s3://BUCKET/manifests/...json
    #[arg(value_name = "MANIFEST_URI")]
    pub uri: String,
}

use crate::store::keys::parse_uri as parse_s3_uri;

struct Report {
    failed: bool,
}

impl Report {
    fn line(&mut self, what: &str, ok: bool, detail: impl std::fmt::Display) {
        self.failed |= !ok;
        println!("{what:<16} {}  {detail}", if ok { "ok  " } else { "FAIL" });
    }
}

pub async fn run(cli: &Cli, args: &Args) -> Result<ExitCode, Failure> {
    let settings = super::load_settings(cli)?;
    let Some((bucket, key)) = parse_s3_uri(&args.uri) else {
        return Err(Failure {
            code: super::EXIT_USAGE,
            error: anyhow::anyhow!("`{}` is not s3://BUCKET/KEY", args.uri),
        });
    };
    let client = crate::store::client(&settings.s3).await;
    let mut report = Report { failed: false };

    let manifest = match client.get_object().bucket(bucket).key(key).send().await {
        Ok(out) => out
            .body
            .collect()
            .await
            .context("reading the manifest")?
            .into_bytes(),
        Err(e) => {
            report.line("manifest", false, crate::store::describe_sdk_error(&e));
            return Ok(ExitCode::from(super::EXIT_FAILURE));
        }
    };
    let sha = hex::encode(Sha256::digest(&manifest));
    let manifest: Value = match serde_json::from_slice(&manifest) {
        Ok(v) => v,
        Err(e) => {
            report.line("manifest", false, format!("not JSON: {e}"));
            return Ok(ExitCode::from(super::EXIT_FAILURE));
        }
    };
    report.line(
        "manifest",
        true,
        format!(
            "{} ({} manifest of saga {}, sha256 {sha})",
            args.uri,
            manifest["kind"].as_str().unwrap_or("?"),
            manifest["saga_id"].as_str().unwrap_or("?")
        ),
    );
    match crate::evidence::verify_manifest(&manifest) {
        Ok(()) => {
            let version = manifest["manifest_version"].as_u64().unwrap_or(1);
            report.line(
                "hash chain",
                true,
                format!(
                    "{} steps, head {}",
                    manifest["steps"].as_array().map_or(0, Vec::len),
                    manifest["chain_head"].as_str().unwrap_or("-")
                ),
            );
            if version >= 2 {
                report.line(
                    "document hash",
                    true,
                    format!(
                        "sha256 {} over the whole manifest",
                        manifest["integrity"]["sha256"].as_str().unwrap_or("-")
                    ),
                );
            } else {
                report.line(
                    "document hash",
                    true,
                    "none (a version-1 manifest: only its steps are chained)",
                );
            }
        }
        Err(e) => report.line("integrity", false, e),
    }

    let archive = &manifest["archive"];
    if archive.is_null() {
        let why = if key.ends_with(".rescind.json") {
            "none (rescind manifest)"
        } else {
            "none recorded (nothing was archived)"
        };
        report.line("archive", true, why);
    } else {
        check_archive(&client, archive, &mut report).await;
    }
    Ok(if report.failed {
        ExitCode::from(super::EXIT_FAILURE)
    } else {
        ExitCode::SUCCESS
    })
}

async fn check_archive(client: &aws_sdk_s3::Client, archive: &Value, report: &mut Report) {
    let uri = archive["uri"].as_str().unwrap_or_default();
    let Some((bucket, key)) = parse_s3_uri(uri) else {
        report.line(
            "archive",
            false,
            format!("uri `{uri}` is not s3://BUCKET/KEY"),
        );
        return;
    };
    let out = match client.get_object().bucket(bucket).key(key).send().await {
        Ok(out) => out,
        Err(e) => {
            report.line(
                "archive",
                false,
                format!("{uri}: {}", crate::store::describe_sdk_error(&e)),
            );
            return;
        }
    };
    let mut body = out.body;
    let mut hasher = Sha256::new();
    let (mut bytes, mut lines) = (0u64, 0u64);
    loop {
        match body.next().await {
            Some(Ok(chunk)) => {
                hasher.update(&chunk);
                bytes += chunk.len() as u64;
                lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
            }
            Some(Err(e)) => {
                report.line("archive", false, format!("{uri}: reading failed: {e}"));
                return;
            }
            None => break,
        }
    }
    report.line("archive", true, uri);
    let sha = hex::encode(hasher.finalize());
    let want_sha = archive["sha256"].as_str().unwrap_or_default();
    report.line(
        "archive sha256",
        sha == want_sha,
        format!("computed {sha}, manifest {want_sha}"),
    );
    let want_records = archive["records"].as_u64();
    report.line(
        "archive records",
        want_records == Some(lines),
        format!("counted {lines}, manifest {}", fmt_opt(want_records)),
    );
    let want_bytes = archive["bytes"].as_u64();
    report.line(
        "archive bytes",
        want_bytes == Some(bytes),
        format!("counted {bytes}, manifest {}", fmt_opt(want_bytes)),
    );
}

fn fmt_opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |n| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_uris() {
        assert_eq!(
            parse_s3_uri("s3://b/manifests/E1/s.json"),
            Some(("b", "manifests/E1/s.json"))
        );
        assert_eq!(parse_s3_uri("s3://b/"), None);
        assert_eq!(parse_s3_uri("https://b/k"), None);
    }
}
