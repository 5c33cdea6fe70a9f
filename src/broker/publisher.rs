//! Publishing with publisher confirms: a publish returns only once the broker has taken
//! responsibility for the message, so the caller may then ack what caused it.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection};

/// Why a publish did not land.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker refused the message (nack) on `{exchange}` / `{routing_key}`")]
    Nacked {
        exchange: String,
        routing_key: String,
    },
    #[error("no queue is bound for `{routing_key}` on `{exchange}`; the message was returned")]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
    #[error("broker error while publishing to `{exchange}`: {source}")]
    Broker {
        exchange: String,
        #[source]
        source: lapin::Error,
    },
}

/// A confirm-mode channel. Cheap to clone; all clones share the channel.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("channel", &self.channel.id())
            .finish()
    }
}

impl Publisher {
    pub async fn open(connection: &Connection) -> Result<Self, lapin::Error> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self { channel })
    }

    pub fn is_usable(&self) -> bool {
        self.channel.status().connected()
    }

    /// Publishes and waits for the broker's confirm. With `mandatory`, a message no queue
    /// takes is an error rather than silently dropped.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        let broker = |source| PublishError::Broker {
            exchange: exchange.to_owned(),
            source,
        };
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await
            .map_err(broker)?
            .await
            .map_err(broker)?;
        if confirm.is_nack() {
            return Err(PublishError::Nacked {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
            });
        }
        if confirm.take_message().is_some() {
            return Err(PublishError::Unroutable {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
            });
        }
        Ok(())
    }

    pub async fn close(&self) {
        let _ = self.channel.close(200, "bye".into()).await;
    }
}
