//! The saga's outcomes on the outcomes exchange (CONTRACT §4), with publisher confirms. Published
//! `mandatory`: an outcome no queue takes comes back, is counted and logged, never silently gone.

use lapin::BasicProperties;
use tracing::warn;

use super::publisher::{PublishError, Publisher};
use crate::metrics::Metrics;
use crate::saga::outcome::Outcome;
use crate::saga::ports::{OutcomeError, Outcomes};

#[derive(Debug, Clone)]
pub struct AmqpOutcomes {
    pub publisher: Publisher,
    pub exchange: String,
    pub metrics: Metrics,
}

impl Outcomes for AmqpOutcomes {
    async fn publish(&self, outcome: &Outcome) -> Result<(), OutcomeError> {
        let body = serde_json::to_vec(&outcome.body).unwrap_or_default();
        let props = BasicProperties::default()
            .with_content_type("application/cloudevents+json".into())
            .with_delivery_mode(2)
            .with_message_id(outcome.id().into())
            .with_type(outcome.kind.type_name().into());
        let routing_key = outcome.kind.routing_key();
        match self
            .publisher
            .publish(&self.exchange, routing_key, &body, props, true)
            .await
        {
            Ok(()) => Ok(()),
            Err(PublishError::Unroutable { .. }) => {
                // Nobody subscribed to this kind of outcome: the saga is done all the same.
                self.metrics.outcome_unroutable(routing_key);
                warn!(
                    exchange = %self.exchange,
                    routing_key,
                    "no queue is bound for this outcome; it was returned by the broker (bind a \
                     queue to the outcomes exchange to keep outcomes)"
                );
                Ok(())
            }
            Err(e) => Err(OutcomeError::NotConfirmed(e.to_string())),
        }
    }
}
