//! The intake's one broker connection: a channel in confirm mode, opened on first use and
//! again after any failure. A request is answered 202 only once the broker has confirmed
//! every one of its events.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::Mutex;

use crate::config::AmqpSettings;

pub struct Publisher {
    settings: AmqpSettings,
    exchange: String,
    link: Mutex<Option<(Connection, Channel)>>,
}

/// Why nothing (or not everything) was confirmed: the broker is unavailable or refused. The
/// text is for the log (it names nodes and hosts); [`Unavailable::public`] is for the sender.
#[derive(Debug, Clone)]
pub struct Unavailable(pub String);

/// What the sender is told when the reason is not about its request.
const NOT_FOR_THE_SENDER: &str = "the broker is unavailable";

impl Unavailable {
    /// The reason without broker addresses: only reasons about the events themselves are
    /// told as they are.
    pub fn public(&self) -> &str {
        if self.0.starts_with("no queue is bound") || self.0.starts_with("the broker refused") {
            &self.0
        } else {
            NOT_FOR_THE_SENDER
        }
    }
}

impl Publisher {
    pub fn new(settings: &AmqpSettings) -> Self {
        Self {
            settings: settings.clone(),
            exchange: settings.events_exchange.clone(),
            link: Mutex::new(None),
        }
    }

    async fn channel(&self) -> Result<Channel, Unavailable> {
        let mut link = self.link.lock().await;
        if let Some((conn, ch)) = link.as_ref()
            && conn.status().connected()
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        *link = None;
        // `connect` bounds each node; several nodes are tried in turn.
        let conn = crate::broker::connect(&self.settings, "intake")
            .await
            .map_err(|e| Unavailable(format!("{e:#}")))?;
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| Unavailable(crate::broker::describe(&e)))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| Unavailable(crate::broker::describe(&e)))?;
        *link = Some((conn, ch.clone()));
        Ok(ch)
    }

    /// Connected now (or able to connect): what the intake's `/readyz` reports.
    pub async fn ready(&self) -> bool {
        self.channel().await.is_ok()
    }

    /// Publishes every `(routing_key, body)` and waits for all confirms. `Err` when any was
    /// not confirmed: the caller answers 503 and the sender retries the whole request (event
    /// ids make the retry a duplicate the saga recognises, never a second termination).
    pub async fn publish_all(&self, messages: &[(&str, &[u8])]) -> Result<(), Unavailable> {
        let ch = self.channel().await?;
        let props = BasicProperties::default()
            .with_content_type("application/cloudevents+json".into())
            .with_delivery_mode(2);
        let mut confirms = Vec::with_capacity(messages.len());
        for (routing_key, body) in messages {
            match ch
                .basic_publish(
                    self.exchange.as_str().into(),
                    (*routing_key).into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body,
                    props.clone(),
                )
                .await
            {
                Ok(c) => confirms.push(c),
                Err(e) => {
                    self.reset().await;
                    return Err(Unavailable(crate::broker::describe(&e)));
                }
            }
        }
        for c in confirms {
            match c.await {
                Ok(c) if c.is_nack() => {
                    return Err(Unavailable("the broker refused an event (nack)".to_owned()));
                }
                Ok(c) => {
                    if c.take_message().is_some() {
                        return Err(Unavailable(format!(
                            "no queue is bound for the event on `{}` (is a worker deployed?)",
                            self.exchange
                        )));
                    }
                }
                Err(e) => {
                    self.reset().await;
                    return Err(Unavailable(crate::broker::describe(&e)));
                }
            }
        }
        Ok(())
    }

    async fn reset(&self) {
        if let Some((conn, _)) = self.link.lock().await.take() {
            let _ = conn.close(200, "resetting".into()).await;
        }
    }
}
