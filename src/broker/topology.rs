//! Declares the broker topology of CONTRACT §2, idempotently. A queue that already exists with
//! other arguments is reported as a [`TopologyConflict`], a start-up error an operator can fix.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::config::AmqpSettings;

/// A declaration the broker refused because the object exists with different settings.
#[derive(Debug, thiserror::Error)]
#[error(
    "broker object `{name}` already exists with different settings ({detail}); delete it \
     or point `{key}` at another name"
)]
pub struct TopologyConflict {
    pub name: String,
    pub key: &'static str,
    pub detail: String,
}

/// The delay queues used for parked retries, shortest first.
pub fn delay_queue_name(settings: &AmqpSettings, label: &str) -> String {
    format!("{}.{label}", settings.delay_queue_prefix)
}

fn quorum_args(dead_letter_exchange: Option<&str>, delivery_limit: Option<u32>) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString("quorum".into()),
    );
    if let Some(dlx) = dead_letter_exchange {
        args.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString(dlx.into()),
        );
        args.insert(
            ShortString::from("x-dead-letter-strategy"),
            AMQPValue::LongString("at-least-once".into()),
        );
        // at-least-once dead-lettering requires reject-publish overflow.
        args.insert(
            ShortString::from("x-overflow"),
            AMQPValue::LongString("reject-publish".into()),
        );
    }
    if let Some(limit) = delivery_limit {
        args.insert(
            ShortString::from("x-delivery-limit"),
            AMQPValue::LongInt(i32::try_from(limit).unwrap_or(i32::MAX)),
        );
    }
    args
}

/// A delay queue: messages expire after `secs` and dead-letter straight back to the work
/// queue (through the default exchange). One queue per delay, so no message waits behind a
/// longer one.
fn delay_args(s: &AmqpSettings, secs: u64) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-message-ttl"),
        AMQPValue::LongLongInt(i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)),
    );
    args.insert(
        ShortString::from("x-dead-letter-exchange"),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        ShortString::from("x-dead-letter-routing-key"),
        AMQPValue::LongString(s.requests_queue.as_str().into()),
    );
    args
}

fn conflict_or(err: lapin::Error, name: &str, key: &'static str) -> anyhow::Error {
    if let lapin::ErrorKind::ProtocolError(amqp) = err.kind()
        && matches!(
            amqp.kind(),
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
        )
    {
        return TopologyConflict {
            name: name.to_owned(),
            key,
            detail: amqp.get_message().as_str().to_owned(),
        }
        .into();
    }
    anyhow::Error::new(err).context(format!("declaring `{name}`"))
}

async fn exchange(channel: &Channel, name: &str, key: &'static str) -> anyhow::Result<()> {
    channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| conflict_or(e, name, key))
}

async fn queue(
    channel: &Channel,
    name: &str,
    key: &'static str,
    args: FieldTable,
) -> anyhow::Result<()> {
    channel
        .queue_declare(name.into(), QueueDeclareOptions::durable(), args)
        .await
        .map(|_| ())
        .map_err(|e| conflict_or(e, name, key))
}

async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    routing_key: &str,
) -> anyhow::Result<()> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| anyhow::Error::new(e).context(format!("binding `{queue}` to `{exchange}`")))
}

/// Declares every exchange, queue and binding. Safe to run from any number of workers at once.
///
/// A refused declaration closes the channel, so callers use a dedicated channel and open a new
/// one afterwards.
pub async fn declare(
    channel: &Channel,
    s: &AmqpSettings,
    delays_secs: &[u64],
) -> anyhow::Result<()> {
    exchange(channel, &s.events_exchange, "amqp.events_exchange").await?;
    exchange(
        channel,
        &s.dead_letter_exchange,
        "amqp.dead_letter_exchange",
    )
    .await?;
    exchange(channel, &s.outcomes_exchange, "amqp.outcomes_exchange").await?;
    queue(
        channel,
        &s.requests_queue,
        "amqp.requests_queue",
        quorum_args(Some(&s.dead_letter_exchange), Some(s.delivery_limit)),
    )
    .await?;
    bind(
        channel,
        &s.requests_queue,
        &s.events_exchange,
        &s.requests_binding,
    )
    .await?;
    queue(
        channel,
        &s.dead_queue,
        "amqp.dead_queue",
        quorum_args(None, None),
    )
    .await?;
    bind(channel, &s.dead_queue, &s.dead_letter_exchange, "#").await?;
    queue(
        channel,
        &s.held_queue,
        "amqp.held_queue",
        quorum_args(None, None),
    )
    .await?;
    for secs in delays_secs {
        let name = delay_queue_name(s, &format!("{secs}s"));
        queue(
            channel,
            &name,
            "amqp.delay_queue_prefix",
            delay_args(s, *secs),
        )
        .await?;
    }
    Ok(())
}
