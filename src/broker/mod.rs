//! RabbitMQ: the topology of CONTRACT §2, the consumer of both stages, confirmed publishing,
//! dead-lettering, the trust boundary on control headers, session liveness, and the saga's
//! adapter ([`handler`], [`outcomes`]). Nothing outside this module sees lapin types except
//! message headers.

pub mod consumer;
pub mod control;
pub mod dead_letter;
pub mod handler;
pub mod headers;
pub mod inspect;
pub mod outcomes;
pub mod publisher;
pub mod sessions;
pub mod topology;

use lapin::{Connection, ConnectionProperties};
use secrecy::ExposeSecret;

use crate::config::AmqpSettings;

/// Opens a connection named after this process (visible in the management UI).
pub async fn connect(settings: &AmqpSettings, role: &str) -> anyhow::Result<Connection> {
    let name = format!(
        "cxone-offboard {role} {}@{}",
        std::process::id(),
        crate::hostname()
    );
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(settings.url.expose_secret(), props)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "connecting to the broker at {}: {}",
                settings.redacted_url(),
                describe(&e)
            )
        })
}

/// A broker error in one line, its cause said once (lapin's message already includes its
/// source, so it is not chained again). The whole structure is logged at debug level.
pub fn describe(e: &lapin::Error) -> String {
    tracing::debug!(error = ?e, "broker error");
    e.to_string()
}
