//! Structured logs: JSON for machines, a readable format on a terminal.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. `RUST_LOG` wins over `log.filter`. Logs go to stderr so that
/// command output on stdout stays clean.
pub fn init(settings: &LogSettings) {
    let mut filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // lapin logs every channel the broker closes at ERROR, and the worker closes channels on
    // purpose (a passive declare of a lease holder's session queue, of a delay queue that may
    // not exist): the worker reports what matters itself. `lapin` named in the filter wins.
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| settings.filter.clone());
    if !spec.contains("lapin")
        && let Ok(quiet) = "lapin::channel=off".parse()
    {
        filter = filter.add_directive(quiet);
    }
    let json = match settings.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_span_events(FmtSpan::NONE);
    let result = if json {
        builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init()
    } else {
        builder
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
    // A second init (tests, `demo`) keeps the first subscriber.
    let _ = result;
}
