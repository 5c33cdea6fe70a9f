//! Declares the broker topology of CONTRACT §2, idempotently. A queue that already exists with
//! other arguments is reported as a [`TopologyConflict`], a start-up error an operator can fix.

use lapin::options::{
    BasicAckOptions, BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ExchangeKind};
use tracing::{info, warn};

use crate::config::AmqpSettings;
use crate::saga::Stage;

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

/// The delay queue of `stage` for `secs`: `offboard.delay.requests.30s`,
/// `offboard.delay.housekeeping.30s`. Each dead-letters back to its stage's queue.
pub fn delay_queue_name(settings: &AmqpSettings, stage: Stage, secs: u64) -> String {
    format!(
        "{}.{}.{secs}s",
        settings.delay_queue_prefix,
        match stage {
            Stage::Access => "requests",
            Stage::Housekeeping => "housekeeping",
        }
    )
}

/// The delay queues each stage needs (seconds): access removal waits for retries, schedules
/// and live calls; housekeeping only for retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delays {
    pub access: Vec<u64>,
    pub housekeeping: Vec<u64>,
}

impl Delays {
    pub fn of(settings: &crate::config::Settings) -> Self {
        let mut housekeeping = settings.worker.retry_delays_secs.clone();
        housekeeping.sort_unstable();
        housekeeping.dedup();
        Self {
            access: settings.worker.all_delays(&settings.safety),
            housekeeping,
        }
    }

    /// Every delay queue name of these delays.
    pub fn queue_names(&self, s: &AmqpSettings) -> Vec<String> {
        let access = self
            .access
            .iter()
            .map(|secs| delay_queue_name(s, Stage::Access, *secs));
        let housekeeping = self
            .housekeeping
            .iter()
            .map(|secs| delay_queue_name(s, Stage::Housekeeping, *secs));
        access.chain(housekeeping).collect()
    }
}

/// The queue of a stage.
pub fn stage_queue(settings: &AmqpSettings, stage: Stage) -> &str {
    match stage {
        Stage::Access => &settings.requests_queue,
        Stage::Housekeeping => &settings.housekeeping_queue,
    }
}

/// The classic delay queues of earlier versions (`offboard.delay.30s`), migrated at start-up.
fn classic_delay_queue_name(settings: &AmqpSettings, secs: u64) -> String {
    format!("{}.{secs}s", settings.delay_queue_prefix)
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

/// A delay queue: messages expire after `secs` and dead-letter straight back to their stage's
/// queue (through the default exchange). One queue per delay, so no message waits behind a
/// longer one. Quorum, with at-least-once dead-lettering: a scheduled termination may wait
/// here for weeks and must survive the loss of a broker node (RabbitMQ 3.10+).
fn delay_args(target_queue: &str, secs: u64) -> FieldTable {
    let mut args = quorum_args(Some(""), None);
    args.insert(
        ShortString::from("x-message-ttl"),
        AMQPValue::LongLongInt(i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)),
    );
    args.insert(
        ShortString::from("x-dead-letter-routing-key"),
        AMQPValue::LongString(target_queue.into()),
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
/// The delay queues, declared on first use (a deployment creates only the delays it needs:
/// each is a quorum queue, and a broker carries every one of them at a cost).
#[derive(Clone)]
pub struct DelayQueues {
    channel: Channel,
    settings: AmqpSettings,
    declared: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl std::fmt::Debug for DelayQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DelayQueues").finish_non_exhaustive()
    }
}

impl DelayQueues {
    /// Declares on `channel` (one of its own: a refused declaration closes it).
    pub fn new(channel: Channel, settings: AmqpSettings) -> Self {
        Self {
            channel,
            settings,
            declared: std::sync::Arc::default(),
        }
    }

    /// The delay queue of `stage` for `secs`, declared if this session has not yet.
    pub async fn ensure(&self, stage: Stage, secs: u64) -> anyhow::Result<String> {
        let name = delay_queue_name(&self.settings, stage, secs);
        let known = self
            .declared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&name);
        if !known {
            queue(
                &self.channel,
                &name,
                "amqp.delay_queue_prefix",
                delay_args(stage_queue(&self.settings, stage), secs),
            )
            .await?;
            self.declared
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.clone());
        }
        Ok(name)
    }
}

/// Declares the exchanges, the queues and bindings that always exist, and the delay queues
/// in `delays` (the worker passes none: it declares each on first use, see [`DelayQueues`]).
pub async fn declare(channel: &Channel, s: &AmqpSettings, delays: &Delays) -> anyhow::Result<()> {
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
    queue(
        channel,
        &s.housekeeping_queue,
        "amqp.housekeeping_queue",
        quorum_args(Some(&s.dead_letter_exchange), Some(s.delivery_limit)),
    )
    .await?;
    for (stage, secs) in [
        (Stage::Access, &delays.access),
        (Stage::Housekeeping, &delays.housekeeping),
    ] {
        for secs in secs {
            let name = delay_queue_name(s, stage, *secs);
            queue(
                channel,
                &name,
                "amqp.delay_queue_prefix",
                delay_args(stage_queue(s, stage), *secs),
            )
            .await?;
        }
    }
    Ok(())
}

/// Moves what waits in the classic delay queues of earlier versions (at-most-once
/// dead-lettering: lost with their node) back to the work queue, each copy confirmed before its
/// original is acked, and deletes them once empty. A moved saga finds its journal and goes
/// back into the new quorum delay queues for what remains of its wait. Safe to run from every
/// worker at once; a no-op when there is nothing to move.
pub async fn migrate_classic_delays(
    connection: &Connection,
    s: &AmqpSettings,
    delays_secs: &[u64],
) {
    for secs in delays_secs {
        let name = classic_delay_queue_name(s, *secs);
        if let Err(e) = migrate_one(connection, s, &name).await {
            warn!(queue = %name, error = %e, "could not migrate a classic delay queue; will try at the next start");
        }
    }
}

async fn migrate_one(connection: &Connection, s: &AmqpSettings, name: &str) -> anyhow::Result<()> {
    // A passive declare of a missing queue closes its channel: one channel per look.
    let probe = connection.create_channel().await?;
    let exists = probe
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok();
    if probe.status().connected() {
        let _ = probe.close(200, "probed".into()).await;
    }
    if !exists {
        return Ok(());
    }
    let publisher = super::publisher::Publisher::open(connection).await?;
    let channel = connection.create_channel().await?;
    let mut moved = 0u64;
    while let Some(m) = channel
        .basic_get(name.into(), BasicGetOptions::default())
        .await?
    {
        let table = super::headers::for_republish(m.delivery.properties.headers().as_ref());
        let props = m.delivery.properties.clone().with_headers(table);
        publisher
            .publish("", &s.requests_queue, &m.delivery.data, props, true)
            .await?;
        m.delivery.acker.ack(BasicAckOptions::default()).await?;
        moved += 1;
    }
    let deleted = channel
        .queue_delete(
            name.into(),
            QueueDeleteOptions {
                if_empty: true,
                ..QueueDeleteOptions::default()
            },
        )
        .await
        .is_ok();
    publisher.close().await;
    if channel.status().connected() {
        let _ = channel.close(200, "migrated".into()).await;
    }
    info!(queue = %name, moved, deleted, "migrated a classic delay queue of an earlier version");
    Ok(())
}
