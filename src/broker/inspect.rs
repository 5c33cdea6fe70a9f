//! Reading a parked-message queue (`offboard.dead`, `offboard.held`) without losing or
//! reordering anything. Messages are taken with `basic.get` and left unacked; one the caller
//! keeps is *rotated* — a confirmed copy to the tail of the same queue, then the ack — and the
//! rest of the snapshot is rotated at the end, so after a pass the queue holds the same messages
//! in the same order. `dlq list` only looks; `replay` and `guard release` ack the ones whose
//! copy they have published elsewhere.
//!
//! Why rotation and not requeue: a channel close returns a quorum queue's unacked messages in
//! a batch whose order RabbitMQ before 3.13 does not keep, and a requeueing nack puts a message
//! at the tail on 3.x (measured on 3.10: 50 messages came back shuffled or rotated). Rotation
//! relies on nothing but publish order. It costs one publish per message kept; a crash mid-pass
//! loses nothing and doubles at most the one message between its copy and its ack. Messages
//! that arrive during a pass end up between rotated ones.

use anyhow::Context;
use chrono::{DateTime, Utc};
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
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
            Some(crate::event::saga_id(
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

/// A one-pass reader over a snapshot of a queue (the dead queue, the held queue). A message it
/// hands out stays unacked until the caller either [`DeadReader::ack`]s it (its copy is safe
/// elsewhere) or asks for the next one; then the message it kept is *rotated*: a copy with the
/// same properties is published to the tail of the same queue, confirmed, and only then is the
/// original acked. After a full pass the snapshot is back in its original order, on every
/// broker version, and a crash anywhere loses nothing (at worst one message is doubled).
pub struct DeadReader {
    channel: Channel,
    publisher: super::publisher::Publisher,
    queue: String,
    snapshot: u32,
    taken: usize,
    /// The message last handed out, not yet acked or rotated.
    pending: Option<(u64, BasicProperties, Vec<u8>)>,
}

impl DeadReader {
    /// Opens channels and notes how many messages the queue holds now: the reader never
    /// looks at more than that, so it ends even while new messages arrive.
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
        let publisher = super::publisher::Publisher::open(connection)
            .await
            .context("opening a confirm channel")?;
        Ok(Self {
            channel,
            publisher,
            queue: queue.to_owned(),
            snapshot: declared.message_count(),
            taken: 0,
            pending: None,
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

    /// Moves the kept message to the tail: confirmed copy first, then the ack.
    async fn rotate(&mut self) -> anyhow::Result<()> {
        let Some((tag, properties, body)) = self.pending.take() else {
            return Ok(());
        };
        self.publisher
            .publish("", &self.queue, &body, properties, true)
            .await
            .with_context(|| format!("keeping a message in `{}`", self.queue))?;
        self.channel
            .basic_ack(tag, BasicAckOptions::default())
            .await
            .with_context(|| format!("acking a message of `{}`", self.queue))?;
        Ok(())
    }

    /// The next message, unacked; `None` at the end of the snapshot. A message returned by
    /// the previous call and not acked stays in the queue (rotated, in order).
    pub async fn next(&mut self) -> anyhow::Result<Option<DeadMessage>> {
        self.rotate().await?;
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
        self.pending = Some((
            message.delivery_tag,
            message.properties.clone(),
            message.body.clone(),
        ));
        Ok(Some(message))
    }

    /// Removes a message from the queue for good (call only once its copy is safe).
    pub async fn ack(&mut self, message: &DeadMessage) -> anyhow::Result<()> {
        self.channel
            .basic_ack(message.delivery_tag, BasicAckOptions::default())
            .await
            .with_context(|| format!("acking a message of `{}`", self.queue))?;
        if self
            .pending
            .as_ref()
            .is_some_and(|(tag, _, _)| *tag == message.delivery_tag)
        {
            self.pending = None;
        }
        Ok(())
    }

    /// Rotates the rest of the snapshot so the whole of it keeps its order, then closes.
    pub async fn close(mut self) -> anyhow::Result<()> {
        self.rotate().await?;
        while let Some(d) = self.get().await? {
            self.taken += 1;
            self.pending = Some((d.delivery_tag, d.properties, d.data));
            self.rotate().await?;
        }
        self.publisher.close().await;
        self.channel
            .close(200, "read done".into())
            .await
            .context("closing the reading channel")
    }
}

/// The properties of a replayed copy: a fresh start (no park count, no old error or death
/// facts, so the saga gets a new retry budget and a new failure is reported as it is), the
/// original exchange and routing key kept, `x-offboard-replay-count` set to `count`, signed.
pub fn replay_copy(
    properties: &BasicProperties,
    body: &[u8],
    count: i64,
    control: &super::control::ControlKey,
) -> BasicProperties {
    let fresh = headers::fresh(properties.headers().as_ref());
    let mut table = FieldTable::from(
        fresh
            .inner()
            .iter()
            .filter(|(k, _)| {
                !matches!(
                    k.as_str(),
                    "x-death"
                        | "x-first-death-exchange"
                        | "x-first-death-queue"
                        | "x-first-death-reason"
                        | "x-last-death-exchange"
                        | "x-last-death-queue"
                        | "x-last-death-reason"
                )
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<std::collections::BTreeMap<_, _>>(),
    );
    headers::set_int(&mut table, headers::REPLAY_COUNT, count);
    control.sign(&mut table, body);
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
        assert_eq!(info.saga_id, Some(crate::event::saga_id("s", "e1")));
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
