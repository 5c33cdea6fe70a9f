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

use anyhow::Context;
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
        .with_context(|| format!("connecting to the broker at {}", settings.redacted_url()))
}
