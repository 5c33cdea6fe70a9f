//! `worker`: consume termination events and run their sagas until SIGTERM/SIGINT, then drain.

use std::process::ExitCode;
use std::sync::Arc;

use tracing::info;

use super::{Cli, Failure};
use crate::cxone::Client;
use crate::metrics::Metrics;
use crate::saga::Deps;
use crate::saga::handler::SagaHandler;
use crate::store::S3;
use crate::worker;

/// A lease owner id unique to this process.
pub fn owner_id() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{}-{}-{}", crate::hostname(), std::process::id(), &id[..8])
}

/// Builds the saga handler for these settings (shared by `worker` and `demo`).
pub async fn build_handler(
    settings: Arc<crate::config::Settings>,
    metrics: Metrics,
) -> Result<(SagaHandler<Client, S3>, Client), Failure> {
    let cxone = Client::new(&settings.cxone, metrics.clone())?;
    let store = S3::new(&settings.s3).await;
    let deps = Deps::new(
        Arc::new(cxone.clone()),
        Arc::new(store),
        settings,
        owner_id(),
        metrics,
    );
    Ok((SagaHandler::new(deps), cxone))
}

pub async fn run(cli: &Cli) -> Result<ExitCode, Failure> {
    let settings = Arc::new(super::load_settings(cli)?);
    crate::telemetry::init(&settings.log);
    let metrics = Metrics::new();
    let (handler, cxone) = build_handler(settings.clone(), metrics.clone()).await?;
    info!(settings = %settings.summary(), version = crate::VERSION, "worker starting");
    let shutdown = worker::shutdown_on_signals();
    let running = worker::start(
        settings,
        Arc::new(handler),
        metrics,
        Some(cxone.circuit_open()),
        shutdown,
    )
    .await?;
    running.wait().await?;
    Ok(ExitCode::SUCCESS)
}
