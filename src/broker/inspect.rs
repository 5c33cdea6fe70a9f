//! Reading the dead-letter queue without losing or reordering it: messages are taken with
//! `basic.get` and left unacked; at the end each one still held is handed back with
//! `basic.nack(requeue)`, one at a time in delivery order, and then the channel is closed.
//! `dlq list` only looks; `replay` acks the ones whose copy it has published.
//!
//! How the order is kept, on every broker version: a channel close returns a quorum queue's
//! unacked messages in one batch whose order RabbitMQ before 3.13 does not keep (measured on
//! 3.10: 50 messages came back shuffled), and a requeueing nack puts the message at the tail
//! there (4.x puts it back in its original position). So [`DeadReader::close`] first takes the
//! rest of the snapshot, then nacks every message still held one at a time in delivery order:
//! the whole snapshot goes back in its original order. Dead letters that arrive during the read
//! may end up ahead of it on old brokers. If the process dies mid-read the broker still returns
//! everything (nothing is lost), but on old brokers the order of those messages may change.

use anyhow::Context;
use chrono::{DateTime, Utc};
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;

use super::headers;

/// One message taken from the dead queue and not yet settled.
#[derive(Debug, Clone)]
pub struct DeadMessage {
    /// 0-based position in the queue when the read started.
    pub position: usize,
    pub delivery_tag: u64,
    pub properties: BasicProperties,
    pub body: Vec<u8>,
    pub info: DeadInfo,
}

/// What an operator wants to know about a dead letter, read from its headers and body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadInfo {
    /// `x-offboard-dead-lettered-at`, else the time of the broker's `x-death` record.
    pub dead_lettered_at: Option<DateTime<Utc>>,
    /// `data.employee.external_id` when the body is JSON that has it.
    pub employee: Option<String>,
    /// `x-offboard-error-class`, else the broker's `x-death` reason (e.g. `delivery_limit`).
    pub class: String,
    pub step: Option<String>,
    pub error: Option<String>,
    /// `x-offboard-saga-id`, else derived from the body's `source` and `id`.
    pub saga_id: Option<String>,
    pub event_id: Option<String>,
    /// `x-death[0].count`: times the broker dead-lettered it (0 when the worker did).
    pub death_count: i64,
    /// `x-offboard-replay-count`: times an operator replayed it.
    pub replay_count: i64,
}

impl DeadInfo {
    /// Reads a message's headers and body; never fails (unknown parts stay `None`).
    pub fn read(properties: &BasicProperties, body: &[u8]) -> Self {
        let table = properties.headers().as_ref();
        let death = first_death(table);
        let death_field = |key: &str| death.and_then(|d| d.inner().get(key));
        let body_json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        let employee = body_json
            .as_ref()
            .and_then(|v| v["data"]["employee"]["external_id"].as_str())
            .map(str::to_owned);
        let event_id = body_json
            .as_ref()
            .and_then(|v| v["id"].as_str())
            .map(str::to_owned);
        let saga_id = headers::get_str(table, headers::SAGA_ID).or_else(|| {
            let v = body_json.as_ref()?;
            Some(crate::saga::saga_id(
                v["source"].as_str()?,
                v["id"].as_str()?,
            ))
        });
        let dead_lettered_at = headers::get_str(table, headers::DEAD_LETTERED_AT)
            .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
            .map(|t| t.with_timezone(&Utc))
            .or_else(|| match death_field("time") {
                Some(AMQPValue::Timestamp(secs)) => {
                    DateTime::from_timestamp(i64::try_from(*secs).ok()?, 0)
                }
                _ => None,
            });
        let class = headers::get_str(table, headers::ERROR_CLASS)
            .or_else(|| death_field("reason").and_then(headers::value_to_string))
            .unwrap_or_else(|| "unknown".to_owned());
        let error = headers::get_str(table, headers::ERROR).or_else(|| {
            let reason = death_field("reason").and_then(headers::value_to_string)?;
            let queue = death_field("queue")
                .and_then(headers::value_to_string)
                .unwrap_or_default();
            Some(format!(
                "dead-lettered by the broker ({reason}) from {queue}"
            ))
        });
        let death_count = death
            .and_then(|d| headers::get_int(Some(d), "count"))
            .unwrap_or(0);
        Self {
            dead_lettered_at,
            employee,
            class,
            step: headers::get_str(table, headers::STEP),
            error,
            saga_id,
            event_id,
            death_count,
            replay_count: headers::get_int(table, headers::REPLAY_COUNT).unwrap_or(0),
        }
    }
}

fn first_death(table: Option<&FieldTable>) -> Option<&FieldTable> {
    match table?.inner().get("x-death")? {
        AMQPValue::FieldArray(items) => match items.as_slice().first()? {
            AMQPValue::FieldTable(t) => Some(t),
            _ => None,
        },
        _ => None,
    }
}

/// A one-pass reader over a snapshot of the dead queue. Every message it hands out stays
/// unacked (and so safe) until [`DeadReader::ack`]; [`DeadReader::close`] returns the rest.
pub struct DeadReader {
    channel: Channel,
    queue: String,
    snapshot: u32,
    taken: usize,
    /// Delivery tags handed out and not acked, in delivery order.
    held: std::collections::BTreeSet<u64>,
}

impl DeadReader {
    /// Opens a channel and notes how many messages the queue holds now: the reader never
    /// looks at more than that, so it ends even while new dead letters arrive.
    pub async fn open(connection: &Connection, queue: &str) -> anyhow::Result<Self> {
        let channel = connection
            .create_channel()
            .await
            .context("opening a channel")?;
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::default().passive(),
                FieldTable::default(),
            )
            .await
            .with_context(|| {
                format!("queue `{queue}` does not exist (the worker declares it at start)")
            })?;
        Ok(Self {
            channel,
            queue: queue.to_owned(),
            snapshot: declared.message_count(),
            taken: 0,
            held: std::collections::BTreeSet::new(),
        })
    }

    /// Messages in the queue when the reader opened.
    pub fn snapshot(&self) -> u32 {
        self.snapshot
    }

    async fn get(&mut self) -> anyhow::Result<Option<lapin::message::Delivery>> {
        if self.taken >= self.snapshot as usize {
            return Ok(None);
        }
        let got = self
            .channel
            .basic_get(
                self.queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .with_context(|| format!("reading `{}`", self.queue))?;
        Ok(got.map(|g| g.delivery))
    }

    /// Takes the next message only to hold it (for [`DeadReader::close`]).
    async fn next_tag(&mut self) -> anyhow::Result<Option<u64>> {
        let Some(d) = self.get().await? else {
            return Ok(None);
        };
        self.taken += 1;
        self.held.insert(d.delivery_tag);
        Ok(Some(d.delivery_tag))
    }

    /// The next message, unacked; `None` at the end of the snapshot.
    pub async fn next(&mut self) -> anyhow::Result<Option<DeadMessage>> {
        let Some(d) = self.get().await? else {
            return Ok(None);
        };
        let info = DeadInfo::read(&d.properties, &d.data);
        let message = DeadMessage {
            position: self.taken,
            delivery_tag: d.delivery_tag,
            properties: d.properties,
            body: d.data,
            info,
        };
        self.taken += 1;
        self.held.insert(message.delivery_tag);
        Ok(Some(message))
    }

    /// Removes a message from the dead queue for good (call only once its copy is safe).
    pub async fn ack(&mut self, message: &DeadMessage) -> anyhow::Result<()> {
        self.channel
            .basic_ack(message.delivery_tag, BasicAckOptions::default())
            .await
            .with_context(|| format!("acking a message of `{}`", self.queue))?;
        self.held.remove(&message.delivery_tag);
        Ok(())
    }

    /// Hands every message not acked back to the queue, in its original order, and closes the
    /// channel (which would return anything a failed nack left behind). Takes the rest of the
    /// snapshot first, so the whole of it is returned in order (see the module docs).
    pub async fn close(mut self) -> anyhow::Result<()> {
        while self.next_tag().await?.is_some() {}
        let requeue = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        for tag in &self.held {
            if let Err(e) = self.channel.basic_nack(*tag, requeue).await {
                tracing::warn!(error = %e, "a nack failed; closing the channel returns the rest");
                break;
            }
        }
        self.channel
            .close(200, "dead-letter read done".into())
            .await
            .context("closing the reading channel")
    }
}

/// A copy of `properties` with `x-offboard-replay-count` set to `count`; everything else kept.
pub fn with_replay_count(properties: &BasicProperties, count: i64) -> BasicProperties {
    let mut table = properties.headers().clone().unwrap_or_default();
    headers::set_int(&mut table, headers::REPLAY_COUNT, count);
    properties.clone().with_headers(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, ShortString};

    #[test]
    fn worker_dead_letters_are_read_from_their_headers() {
        let mut t = FieldTable::default();
        headers::set_str(&mut t, headers::ERROR_CLASS, "permanent");
        headers::set_str(&mut t, headers::STEP, "block_login");
        headers::set_str(&mut t, headers::ERROR, "HTTP 403");
        headers::set_str(&mut t, headers::DEAD_LETTERED_AT, "2026-01-02T03:04:05Z");
        headers::set_int(&mut t, headers::REPLAY_COUNT, 2);
        let props = BasicProperties::default().with_headers(t);
        let body = br#"{"id":"e1","source":"s","data":{"employee":{"external_id":"E1"}}}"#;
        let info = DeadInfo::read(&props, body);
        assert_eq!(info.class, "permanent");
        assert_eq!(info.step.as_deref(), Some("block_login"));
        assert_eq!(info.employee.as_deref(), Some("E1"));
        assert_eq!(info.replay_count, 2);
        assert_eq!(info.death_count, 0);
        assert_eq!(info.saga_id, Some(crate::saga::saga_id("s", "e1")));
        assert_eq!(
            info.dead_lettered_at.map(|t| t.to_rfc3339()).as_deref(),
            Some("2026-01-02T03:04:05+00:00")
        );
    }

    #[test]
    fn broker_dead_letters_are_read_from_x_death() {
        let mut death = FieldTable::default();
        death.insert(ShortString::from("count"), AMQPValue::LongLongInt(1));
        death.insert(
            ShortString::from("reason"),
            AMQPValue::LongString("delivery_limit".into()),
        );
        death.insert(
            ShortString::from("queue"),
            AMQPValue::LongString("offboard.requests".into()),
        );
        death.insert(
            ShortString::from("time"),
            AMQPValue::Timestamp(1_700_000_000),
        );
        let mut t = FieldTable::default();
        t.insert(
            ShortString::from("x-death"),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        let info = DeadInfo::read(&BasicProperties::default().with_headers(t), b"not json");
        assert_eq!(info.class, "delivery_limit");
        assert_eq!(info.death_count, 1);
        assert_eq!(info.employee, None);
        assert!(info.error.unwrap_or_default().contains("offboard.requests"));
        assert_eq!(
            info.dead_lettered_at.map(|t| t.timestamp()),
            Some(1_700_000_000)
        );
    }
}
