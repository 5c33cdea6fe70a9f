//! `worker`: consume termination events and run their sagas until SIGTERM/SIGINT, then drain.

use std::process::ExitCode;
use std::sync::Arc;

use super::{Cli, Failure};
use crate::app::App;
use crate::metrics::Metrics;
use crate::worker;

pub async fn run(cli: &Cli) -> Result<ExitCode, Failure> {
    let settings = Arc::new(super::load_settings(cli)?);
    crate::telemetry::init(&settings.log);
    let app = App::build(settings, Metrics::new()).await?;
    let shutdown = worker::shutdown_on_signals();
    let running = app.start(shutdown).await?;
    running.wait().await?;
    Ok(ExitCode::SUCCESS)
}
