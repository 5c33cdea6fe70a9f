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
        let mut conn = self.conn.lock().await;
        if conn.as_ref().is_none_or(|c| !c.status().connected()) {
            *conn = Some(
                super::connect(&self.settings, "lease-check")
                    .await
                    .map_err(|e| format!("{e:#}"))?,
            );
        }
        let Some(c) = conn.as_ref() else {
            return Err("no connection".to_owned());
        };
        // A refused passive declare closes its channel: one channel per question.
        let channel = c.create_channel().await.map_err(|e| e.to_string())?;
        let result = channel
            .queue_declare(
                queue(&self.settings, session).as_str().into(),
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
}

impl Sessions for BrokerSessions {
    fn alive<'a>(&'a self, session: &'a str) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(self.check(session))
    }
}
