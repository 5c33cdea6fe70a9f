//! `verify`: recomputes a manifest's hash chain and the checksum, record count and size of the
//! archive it names (streamed, never held in memory).

use std::process::ExitCode;

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

pub async fn run(cli: &Cli, args: &Args) -> Result<ExitCode, Failure> {
    let settings = super::load_settings(cli)?;
    if parse_s3_uri(&args.uri).is_none() {
        return Err(Failure {
            code: super::EXIT_USAGE,
            error: anyhow::anyhow!("`{}` is not s3://BUCKET/KEY", args.uri),
        });
    }
    let client = crate::store::client(&settings.s3).await;
    let verification = crate::audit::verify::manifest(&client, &args.uri).await;
    for c in &verification.checks {
        println!(
            "{:<16} {}  {}",
            c.what,
            if c.ok { "ok  " } else { "FAIL" },
            c.detail
        );
    }
    Ok(if verification.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_FAILURE)
    })
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
