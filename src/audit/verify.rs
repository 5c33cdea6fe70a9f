//! The manifest check `verify` prints and `evidence export` reports as `manifest_verified`:
//! the manifest's hash chain and document hash recomputed, and the archive it names streamed
//! (never held in memory) and its SHA-256, line count and size compared.

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::store::keys::parse_uri;

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Check {
    pub what: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// Everything checked about one manifest.
#[derive(Debug, Clone, Default)]
pub struct Verification {
    /// SHA-256 of the manifest object's bytes, when it could be read.
    pub manifest_sha256: Option<String>,
    pub checks: Vec<Check>,
}

impl Verification {
    /// Every check passed (and there was at least one).
    pub fn ok(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.ok)
    }

    fn line(&mut self, what: &'static str, ok: bool, detail: impl Into<String>) {
        self.checks.push(Check {
            what,
            ok,
            detail: detail.into(),
        });
    }
}

/// Checks the manifest at `uri` (`s3://bucket/key`).
pub async fn manifest(client: &aws_sdk_s3::Client, uri: &str) -> Verification {
    let mut v = Verification::default();
    let Some((bucket, key)) = parse_uri(uri) else {
        v.line("manifest", false, format!("`{uri}` is not s3://BUCKET/KEY"));
        return v;
    };
    let bytes = match client.get_object().bucket(bucket).key(key).send().await {
        Ok(out) => match out.body.collect().await {
            Ok(b) => b.into_bytes(),
            Err(e) => {
                v.line("manifest", false, format!("{uri}: reading failed: {e}"));
                return v;
            }
        },
        Err(e) => {
            v.line("manifest", false, crate::store::describe_sdk_error(&e));
            return v;
        }
    };
    let sha = hex::encode(Sha256::digest(&bytes));
    v.manifest_sha256 = Some(sha.clone());
    let doc: Value = match serde_json::from_slice(&bytes) {
        Ok(doc) => doc,
        Err(e) => {
            v.line("manifest", false, format!("not JSON: {e}"));
            return v;
        }
    };
    v.line(
        "manifest",
        true,
        format!(
            "{uri} ({} manifest of saga {}, sha256 {sha})",
            doc["kind"].as_str().unwrap_or("?"),
            doc["saga_id"].as_str().unwrap_or("?")
        ),
    );
    match crate::evidence::verify_manifest(&doc) {
        Ok(()) => {
            v.line(
                "hash chain",
                true,
                format!(
                    "{} steps, head {}",
                    doc["steps"].as_array().map_or(0, Vec::len),
                    doc["chain_head"].as_str().unwrap_or("-")
                ),
            );
            let detail = if doc["manifest_version"].as_u64().unwrap_or(1) >= 2 {
                format!(
                    "sha256 {} over the whole manifest",
                    doc["integrity"]["sha256"].as_str().unwrap_or("-")
                )
            } else {
                "none (a version-1 manifest: only its steps are chained)".to_owned()
            };
            v.line("document hash", true, detail);
        }
        Err(e) => v.line("integrity", false, e),
    }
    let archive = &doc["archive"];
    if archive.is_null() {
        let why = if key.ends_with(".rescind.json") {
            "none (rescind manifest)"
        } else {
            "none recorded (nothing was archived)"
        };
        v.line("archive", true, why);
    } else {
        check_archive(client, archive, &mut v).await;
    }
    v
}

async fn check_archive(client: &aws_sdk_s3::Client, archive: &Value, v: &mut Verification) {
    let uri = archive["uri"].as_str().unwrap_or_default();
    let Some((bucket, key)) = parse_uri(uri) else {
        v.line(
            "archive",
            false,
            format!("uri `{uri}` is not s3://BUCKET/KEY"),
        );
        return;
    };
    let out = match client.get_object().bucket(bucket).key(key).send().await {
        Ok(out) => out,
        Err(e) => {
            v.line(
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
            None => break,
            Some(Err(e)) => {
                v.line("archive", false, format!("{uri}: reading failed: {e}"));
                return;
            }
        }
    }
    v.line("archive", true, uri);
    let sha = hex::encode(hasher.finalize());
    let want_sha = archive["sha256"].as_str().unwrap_or_default();
    v.line(
        "archive sha256",
        sha == want_sha,
        format!("computed {sha}, manifest {want_sha}"),
    );
    let want_records = archive["records"].as_u64();
    v.line(
        "archive records",
        want_records == Some(lines),
        format!("counted {lines}, manifest {}", fmt_opt(want_records)),
    );
    let want_bytes = archive["bytes"].as_u64();
    v.line(
        "archive bytes",
        want_bytes == Some(bytes),
        format!("counted {bytes}, manifest {}", fmt_opt(want_bytes)),
    );
}

fn fmt_opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |n| n.to_string())
}
