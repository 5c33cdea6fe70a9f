//! cxone-offboard turns HR termination events into complete, rate-limited, audited
//! de-provisioning of NICE CXone contact-center users.
//!
//! HR systems publish CloudEvents to RabbitMQ; the worker validates them, runs one saga per
//! person against the CXone API, keeps its journal and evidence in S3 and publishes an outcome.
//!
//! # Layout
//! - [`config`]: layered settings (TOML, `--config`, `OFFBOARD__SECTION__KEY`), validated at load.
//! - [`telemetry`]: structured logs.
//! - [`metrics`]: every Prometheus metric the process exports, in one place.
//! - [`http`]: `/healthz`, `/readyz`, `/metrics`.
//! - [`cxone`]: the CXone client: auth, priority rate limiter, retries, circuit breaker.
//! - [`event`]: the wire types of termination events, parsed into validated newtypes.
//! - [`broker`]: RabbitMQ topology, the consumer of both stages, publishing, dead-lettering,
//!   the trust boundary, session liveness and the saga's broker adapter.
//! - [`saga`]: the offboarding saga: pure transitions, the runner, one file per step, the
//!   journal, rescinds, the mass-deletion guard and its ports (no transport types).
//! - [`evidence`]: the resumable interaction archive and the write-once audit manifest.
//! - [`hr_export`]: HR exports (CSV, JSON lines) read into validated events.
//! - [`app`]: builds and starts the worker (for `worker`, `demo` and the tests).
//! - [`hris`]: the signed HRIS webhook.
//! - [`store`]: the S3 bucket.
//! - [`worker`]: wires broker, handler and HTTP together and drains on shutdown.
//! - [`sim`]: the CXone simulator (`cxone-offboard sim`): the real CXone API plus a `/_sim/` control API.
//! - [`cli`]: one module per command of the binary.

pub mod app;
pub mod audit;
pub mod broker;
pub mod cli;
pub mod config;
pub mod cxone;
pub mod event;
pub mod evidence;
pub mod hr_export;
pub mod hris;
pub mod http;
pub mod intake;
pub mod metrics;
pub mod saga;
pub mod sim;
pub mod store;
pub mod telemetry;
pub mod worker;

/// This host's name, for consumer tags, connection names and manifests.
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned())
}

/// The version of this build, as written into outcomes and manifests.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
