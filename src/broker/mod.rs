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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};

use crate::config::AmqpSettings;

/// The node of `amqp.url` this process last connected to: the next connection tries it first,
/// then the others in order, so a process whose node went away moves on at once (a refused or
/// silent node costs at most [`NODE_CONNECT_TIMEOUT`]) and does not wait for that node to return.
static PREFERRED_NODE: AtomicUsize = AtomicUsize::new(0);

/// How long one node may take to accept a connection before the next is tried.
pub const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a connection named after this process (visible in the management UI) to the first
/// node of `amqp.url` that answers (CONTRACT §7: several comma-separated URLs are the nodes of
/// one cluster).
pub async fn connect(settings: &AmqpSettings, role: &str) -> anyhow::Result<Connection> {
    let name = format!(
        "cxone-offboard {role} {}@{}",
        std::process::id(),
        crate::hostname()
    );
    let nodes = settings.node_urls();
    let start = PREFERRED_NODE.load(Ordering::Relaxed) % nodes.len().max(1);
    let mut failures = Vec::new();
    for i in (0..nodes.len()).map(|k| (start + k) % nodes.len()) {
        let props = ConnectionProperties::default().with_connection_name(name.clone().into());
        let attempt =
            tokio::time::timeout(NODE_CONNECT_TIMEOUT, Connection::connect(nodes[i], props)).await;
        match attempt {
            Ok(Ok(conn)) => {
                if i != start {
                    tracing::info!(
                        node = %crate::config::redact_url(nodes[i]),
                        "connected to another node of the cluster"
                    );
                }
                PREFERRED_NODE.store(i, Ordering::Relaxed);
                return Ok(conn);
            }
            Ok(Err(e)) => failures.push(format!(
                "{}: {}",
                crate::config::redact_url(nodes[i]),
                describe(&e)
            )),
            Err(_) => failures.push(format!(
                "{}: no answer within {} s",
                crate::config::redact_url(nodes[i]),
                NODE_CONNECT_TIMEOUT.as_secs()
            )),
        }
        // The next attempt starts after this node, even if this one is abandoned by a caller's
        // own deadline (an HTTP request's) before it reaches the next node.
        PREFERRED_NODE.store((i + 1) % nodes.len(), Ordering::Relaxed);
    }
    match failures.as_slice() {
        [one] => Err(anyhow::anyhow!("connecting to the broker at {one}")),
        _ => Err(anyhow::anyhow!(
            "connecting to the broker: no node answered ({})",
            failures.join("; ")
        )),
    }
}

/// A broker error in one line, its cause said once (lapin's message already includes its
/// source, so it is not chained again). The whole structure is logged at debug level.
pub fn describe(e: &lapin::Error) -> String {
    tracing::debug!(error = ?e, "broker error");
    e.to_string()
}

/// Publishes each `(routing_key, body)` to `exchange` as a persistent CloudEvent, mandatory,
/// and waits for every publisher confirm; per message, `Err(why)` when the broker refused it
/// (nack) or routed it nowhere (returned). One connection for the batch.
pub async fn publish_confirmed(
    settings: &AmqpSettings,
    role: &str,
    exchange: &str,
    messages: &[(String, Vec<u8>)],
) -> anyhow::Result<Vec<Result<(), String>>> {
    use anyhow::Context as _;
    use lapin::BasicProperties;
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let conn = connect(settings, role).await?;
    let channel = conn.create_channel().await.context("opening a channel")?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .context("enabling publisher confirms")?;
    let props = BasicProperties::default()
        .with_content_type("application/cloudevents+json".into())
        .with_delivery_mode(2);
    let mut confirms = Vec::with_capacity(messages.len());
    for (routing_key, body) in messages {
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                props.clone(),
            )
            .await
            .with_context(|| format!("publishing to `{exchange}`"))?;
        confirms.push(confirm);
    }
    let mut results = Vec::with_capacity(confirms.len());
    for confirm in confirms {
        let c = confirm.await.context("waiting for the broker's confirm")?;
        results.push(if c.is_nack() {
            Err("the broker refused it (nack)".to_owned())
        } else if c.take_message().is_some() {
            Err(format!(
                "no queue is bound for it on `{exchange}` (returned)"
            ))
        } else {
            Ok(())
        });
    }
    let _ = channel.close(200, "published".into()).await;
    let _ = conn.close(200, "published".into()).await;
    Ok(results)
}
