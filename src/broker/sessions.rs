//! Broker sessions as liveness markers. Each consuming session declares an exclusive queue
//! (`{requests_queue}.session.{id}`) that the broker deletes the moment the session's
//! connection closes, whether the process exited, was killed or lost its network. A saga
//! lease names the session of its holder, so another worker can tell a live holder (the queue
//! exists, locked to its owner) from a dead one (404) with one passive declare, and take over
//! at once instead of waiting for the lease to expire.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use lapin::options::QueueDeclareOptions;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::Mutex;

use crate::config::AmqpSettings;
use crate::saga::ports::Sessions;

/// The marker queue of a session.
pub fn queue(settings: &AmqpSettings, session: &str) -> String {
    format!("{}.session.{session}", settings.requests_queue)
}

/// Declares this session's marker queue on its connection.
pub async fn declare(
    channel: &Channel,
    settings: &AmqpSettings,
    session: &str,
) -> lapin::Result<()> {
    channel
        .queue_declare(
            queue(settings, session).as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|_| ())
}

/// Answers "is this session alive?" over a connection of its own.
pub struct BrokerSessions {
    settings: Arc<AmqpSettings>,
    conn: Mutex<Option<Connection>>,
}

impl BrokerSessions {
    pub fn new(settings: Arc<AmqpSettings>) -> Self {
        Self {
            settings,
            conn: Mutex::new(None),
        }
    }

    async fn check(&self, session: &str) -> Result<bool, String> {
        // Callers queue here; none waits longer than one question's bound for its turn.
        let mut conn = tokio::time::timeout(ANSWER_WITHIN, self.conn.lock())
            .await
            .map_err(|_| "another lease check is waiting for the broker".to_owned())?;
        if conn.as_ref().is_none_or(|c| !c.status().connected()) {
            // `connect` bounds each node itself.
            *conn = Some(
                super::connect(&self.settings, "lease-check")
                    .await
                    .map_err(|e| format!("{e:#}"))?,
            );
        }
        let Some(c) = conn.as_ref() else {
            return Err("no connection".to_owned());
        };
        match tokio::time::timeout(ANSWER_WITHIN, ask(c, &self.settings, session)).await {
            Ok(answer) => answer,
            Err(_) => {
                // A node that holds the connection open and answers nothing (frozen,
                // partitioned): the next question starts on a new connection.
                if let Some(stale) = conn.take() {
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(
                            ANSWER_WITHIN,
                            stale.close(200, "no answer".into()),
                        )
                        .await;
                    });
                }
                Err(format!(
                    "the broker did not answer within {} s",
                    ANSWER_WITHIN.as_secs()
                ))
            }
        }
    }
}

/// How long one lease check may wait for the broker. The saga treats a check that fails as a
/// live holder and comes back after the shortest delay, so a silent node costs seconds, not
/// the AMQP heartbeat's minute or two, and never holds deliveries in a queue behind it.
pub const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// One passive declare of `session`'s marker queue on `c`.
async fn ask(c: &Connection, settings: &AmqpSettings, session: &str) -> Result<bool, String> {
    // A refused passive declare closes its channel: one channel per question.
    let channel = c.create_channel().await.map_err(|e| e.to_string())?;
    let result = channel
        .queue_declare(
            queue(settings, session).as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    let answer = match result {
        Ok(_) => Ok(true),
        Err(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
                AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => Ok(false),
                // Exclusive to a live connection.
                AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED) => Ok(true),
                _ => Err(e.to_string()),
            },
            _ => Err(e.to_string()),
        },
    };
    if channel.status().connected() {
        let _ = channel.close(200, "checked".into()).await;
    }
    answer
}

impl Sessions for BrokerSessions {
    fn alive<'a>(&'a self, session: &'a str) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(self.check(session))
    }
}
