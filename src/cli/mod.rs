//! The command line: one module per command. `main.rs` only parses and calls [`run`].

pub mod check;
pub mod completions;
pub mod demo;
pub mod dlq;
pub mod evidence;
pub mod guard;
pub mod intake;
pub mod publish;
pub mod reconcile;
pub mod replay;
pub mod saga;
pub mod status;
pub mod verify;
pub mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{ConfigError, Settings};

/// Exit code for usage and configuration errors (CONTRACT §8).
pub const EXIT_USAGE: u8 = 2;
/// Exit code for runtime failures.
pub const EXIT_FAILURE: u8 = 1;

#[derive(Debug, Parser)]
#[command(
    name = "cxone-offboard",
    version,
    about = "Turns HR termination events into rate-limited, audited de-provisioning of NICE CXone users",
    long_about = None,
    after_help = "Configuration: config/default.toml (compiled in), then --config PATH, then \
                  OFFBOARD__SECTION__KEY environment variables (e.g. OFFBOARD__AMQP__URL).\n\
                  Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error."
)]
pub struct Cli {
    /// A TOML file whose keys override the defaults.
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume termination events and run their sagas until SIGTERM/SIGINT, then drain.
    #[command(
        after_help = "Example:\n  OFFBOARD__CXONE__ACCESS_KEY_ID=... OFFBOARD__CXONE__ACCESS_KEY_SECRET=... \\\n  OFFBOARD__S3__ENDPOINT=http://127.0.0.1:9000 cxone-offboard worker"
    )]
    Worker,
    /// Run the CXone simulator: the real CXone API plus a /_sim/ control API, for tests and demos.
    #[command(
        after_help = "Example:\n  cxone-offboard sim --listen 127.0.0.1:8088 --users 1000 --rate-limit 200 --burst 50\n  curl -s http://127.0.0.1:8088/_sim/users/E000001"
    )]
    Sim(crate::sim::SimArgs),
    /// Verify configuration, broker, bucket and CXone access; print what fails.
    #[command(
        after_help = "Example:\n  OFFBOARD__S3__ENDPOINT=http://127.0.0.1:9000 cxone-offboard check"
    )]
    Check,
    /// Print a shell completion script.
    #[command(
        after_help = "Example:\n  cxone-offboard completions bash > /etc/bash_completion.d/cxone-offboard"
    )]
    Completions(completions::Args),
    /// Publish termination events in bulk from an HR export (CSV or JSON lines), with a progress bar.
    Publish(publish::Args),
    /// Inspect the dead-letter queue without consuming it.
    #[command(after_help = "Example:\n  cxone-offboard dlq list --limit 50")]
    Dlq(dlq::Args),
    /// Move matching dead letters back to the work queue (each copy confirmed before its original is removed).
    Replay(replay::Args),
    /// Read saga journals from S3.
    #[command(
        after_help = "Examples:\n  cxone-offboard saga list --status failed\n  cxone-offboard saga show SAGA_ID"
    )]
    Saga(saga::Args),
    /// Recompute a manifest's hash chain and its archive's checksum; exit 1 on mismatch.
    Verify(verify::Args),
    /// Run the simulator and a worker in one process, publish N terminations, print a summary.
    Demo(demo::Args),
    /// Inspect and release sagas held by the mass-deletion guard.
    Guard(guard::Args),
    /// The auditor's pack: per termination, when access went against the SLA, and the proof.
    Evidence(evidence::Args),
    /// Find leavers who still have access: CXone users not on the roster, or re-enabled by hand.
    Reconcile(reconcile::Args),
    /// Serve the HTTP intake alone: signed CloudEvents webhooks from HR systems, published to the events exchange.
    Intake(intake::Args),
    /// Layoff-day progress: sagas per stage and status, rate and ETA, time to revoke, SLA, what is held or failed.
    Status(status::Args),
}

/// A failure with the exit code it deserves.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        let code = if error.downcast_ref::<ConfigError>().is_some()
            || error
                .downcast_ref::<crate::broker::topology::TopologyConflict>()
                .is_some()
            || error.downcast_ref::<crate::app::UnfitStore>().is_some()
        {
            EXIT_USAGE
        } else {
            EXIT_FAILURE
        };
        Self { code, error }
    }
}

impl From<ConfigError> for Failure {
    fn from(error: ConfigError) -> Self {
        Self {
            code: EXIT_USAGE,
            error: error.into(),
        }
    }
}

/// Loads settings for commands that need them; a bad setting is exit 2.
pub fn load_settings(cli: &Cli) -> Result<Settings, Failure> {
    Ok(Settings::load(cli.config.as_deref())?)
}

/// The deployment's control-header key (for commands that republish as the worker does).
pub async fn control_key(
    settings: &Settings,
) -> Result<crate::broker::control::ControlKey, Failure> {
    if settings.amqp.control_key()?.is_none() {
        let store = crate::store::S3::new(&settings.s3).await;
        return Ok(crate::app::control_key(settings, &store).await?);
    }
    let store = crate::store::Memory::default();
    Ok(crate::app::control_key(settings, &store).await?)
}

/// Runs the parsed command line and maps the result to an exit code.
pub async fn run(cli: Cli) -> ExitCode {
    let result = match &cli.command {
        Command::Worker => worker::run(&cli).await,
        Command::Check => check::run(&cli).await,
        Command::Sim(args) => crate::sim::run(args.clone())
            .await
            .map(|()| ExitCode::SUCCESS)
            .map_err(Failure::from),
        Command::Completions(args) => completions::run(args),
        Command::Publish(args) => publish::run(&cli, args).await,
        Command::Dlq(args) => dlq::run(&cli, args).await,
        Command::Replay(args) => replay::run(&cli, args).await,
        Command::Saga(args) => saga::run(&cli, args).await,
        Command::Verify(args) => verify::run(&cli, args).await,
        Command::Guard(args) => guard::run(&cli, args).await,
        Command::Demo(args) => demo::run(&cli, args).await,
        Command::Evidence(args) => evidence::run(&cli, args).await,
        Command::Reconcile(args) => reconcile::run(&cli, args).await,
        Command::Intake(args) => intake::run(&cli, args).await,
        Command::Status(args) => status::run(&cli, args).await,
    };
    match result {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("error: {:#}", failure.error);
            ExitCode::from(failure.code)
        }
    }
}
