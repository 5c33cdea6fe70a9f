//! `intake [--listen ADDR]`: serve the HTTP intake alone (CONTRACT §13), without consuming.

use std::process::ExitCode;

use super::{Cli, Failure};
use crate::metrics::Metrics;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Serves POST /v1/sources/<name>/events (and /healthz, /readyz, /metrics) on \
    intake.listen until SIGTERM/SIGINT. Each source needs intake.sources.<name>.secret (whsec_…) \
    or .secret_file. Events are answered 202 only once the broker has confirmed them on the \
    events exchange.\n\n\
    Example:\n  OFFBOARD__INTAKE__SOURCES__WORKDAY__SECRET=whsec_... cxone-offboard intake --listen 0.0.0.0:8080"
)]
pub struct Args {
    /// Overrides intake.listen.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
}

pub async fn run(cli: &Cli, args: &Args) -> Result<ExitCode, Failure> {
    let mut settings = super::load_settings(cli)?;
    if let Some(listen) = &args.listen {
        settings.intake.listen = Some(listen.clone());
    }
    let Some(listen) = settings.intake.listen.clone() else {
        return Err(Failure {
            code: super::EXIT_USAGE,
            error: anyhow::anyhow!(
                "intake.listen is not set: pass --listen ADDR or set OFFBOARD__INTAKE__LISTEN"
            ),
        });
    };
    if settings.intake.sources.is_empty() {
        return Err(Failure {
            code: super::EXIT_USAGE,
            error: anyhow::anyhow!(
                "intake.sources is empty: configure at least one source \
                 (intake.sources.<name>.secret or OFFBOARD__INTAKE__SOURCES__<NAME>__SECRET)"
            ),
        });
    }
    if listen.parse::<std::net::SocketAddr>().is_err() {
        return Err(Failure {
            code: super::EXIT_USAGE,
            error: anyhow::anyhow!(
                "intake.listen `{listen}` is not an address (e.g. 0.0.0.0:8080)"
            ),
        });
    }
    crate::telemetry::init(&settings.log);
    let shutdown = crate::worker::shutdown_on_signals();
    let (_, task) = crate::intake::serve(&settings, Metrics::new(), shutdown).await?;
    task.await.map_err(|e| Failure::from(anyhow::anyhow!(e)))?;
    Ok(ExitCode::SUCCESS)
}
