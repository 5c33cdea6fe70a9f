//! The saga as a broker [`Handler`]: runs the saga of each event and turns its [`Verdict`]
//! into broker actions — ack, dead-letter, or a confirmed copy in a delay queue (parking) or
//! back on the work queue (shutdown) before the original is acked.

use lapin::BasicProperties;

use super::outcome::AmqpOutcomes;
use super::{Delivery, Deps, Verdict};
use crate::broker::consumer::{Context, Handler, Message, Settle};
use crate::broker::headers;
use crate::broker::topology::delay_queue_name;
use crate::cxone::Cxone;
use crate::store::Store;

/// Header counting how often a message was parked after transient failures.
pub const PARK_COUNT: &str = "x-offboard-park-count";
pub const PARK_REASON: &str = "x-offboard-park-reason";
/// Set by `guard release` on messages an operator let through the mass-deletion guard.
pub const GUARD_RELEASED: &str = "x-offboard-guard-released";
/// When the guard held the message.
pub const HELD_AT: &str = "x-offboard-held-at";
/// Header counting how often a message waited for another worker's lease.
pub const LEASE_WAITS: &str = "x-offboard-lease-waits";

pub struct SagaHandler<C, S> {
    pub deps: Deps<C, S>,
}

impl<C: Cxone, S: Store> SagaHandler<C, S> {
    pub fn new(deps: Deps<C, S>) -> Self {
        Self { deps }
    }

    /// Publishes a copy of `msg` to the default exchange with `routing_key` (a queue name),
    /// with extra headers, and waits for the confirm.
    async fn copy_to(
        &self,
        ctx: &Context,
        msg: &Message,
        queue: &str,
        set: &[(&str, String)],
        incr: Option<&str>,
    ) -> Result<(), crate::broker::publisher::PublishError> {
        let mut table = headers::for_republish(msg.properties.headers().as_ref());
        if headers::get_str(Some(&table), headers::ORIGINAL_EXCHANGE).is_none() {
            headers::set_str(&mut table, headers::ORIGINAL_EXCHANGE, &msg.exchange);
            headers::set_str(&mut table, headers::ORIGINAL_ROUTING_KEY, &msg.routing_key);
        }
        for (k, v) in set {
            headers::set_str(&mut table, k, v);
        }
        if let Some(key) = incr {
            let n = headers::get_int(Some(&table), key).unwrap_or(0);
            headers::set_int(&mut table, key, n + 1);
        }
        let props: BasicProperties = msg
            .properties
            .clone()
            .with_headers(table)
            .with_delivery_mode(2);
        ctx.publisher
            .publish("", queue, &msg.body, props, true)
            .await
    }

    async fn settle(&self, verdict: Verdict, msg: &Message, ctx: &Context, parks: u32) -> Settle {
        let settings = &self.deps.settings;
        match verdict {
            Verdict::Settled => Settle::Ack,
            Verdict::DeadLetter(dl) => Settle::DeadLetter(dl),
            Verdict::Park { reason } => {
                let delays = &settings.worker.retry_delays_secs;
                let idx = (parks as usize).min(delays.len().saturating_sub(1));
                let Some(secs) = delays.get(idx) else {
                    return Settle::Requeue;
                };
                let queue = delay_queue_name(&settings.amqp, &format!("{secs}s"));
                let reason = headers::truncate_bytes(&reason, 512);
                match self
                    .copy_to(ctx, msg, &queue, &[(PARK_REASON, reason)], Some(PARK_COUNT))
                    .await
                {
                    Ok(()) => {
                        tracing::info!(delay_secs = secs, "saga parked");
                        Settle::Ack
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not park; returning the message to the queue");
                        Settle::Requeue
                    }
                }
            }
            Verdict::Wait => {
                let secs = settings
                    .worker
                    .retry_delays_secs
                    .first()
                    .copied()
                    .unwrap_or(30);
                let queue = delay_queue_name(&settings.amqp, &format!("{secs}s"));
                match self.copy_to(ctx, msg, &queue, &[], Some(LEASE_WAITS)).await {
                    Ok(()) => Settle::Ack,
                    Err(_) => Settle::Requeue,
                }
            }
            Verdict::Defer { secs, reason } => {
                let queue = delay_queue_name(&settings.amqp, &format!("{secs}s"));
                let reason = headers::truncate_bytes(&reason, 256);
                match self
                    .copy_to(ctx, msg, &queue, &[(PARK_REASON, reason)], None)
                    .await
                {
                    Ok(()) => Settle::Ack,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not defer; returning the message to the queue");
                        Settle::Requeue
                    }
                }
            }
            Verdict::Hold => {
                let at = chrono::Utc::now().to_rfc3339();
                match self
                    .copy_to(ctx, msg, &settings.amqp.held_queue, &[(HELD_AT, at)], None)
                    .await
                {
                    Ok(()) => Settle::Ack,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not hold; returning the message to the queue");
                        Settle::Requeue
                    }
                }
            }
            Verdict::Requeue => {
                match self
                    .copy_to(ctx, msg, &settings.amqp.requests_queue, &[], None)
                    .await
                {
                    Ok(()) => Settle::Ack,
                    Err(_) => Settle::Requeue,
                }
            }
        }
    }
}

impl<C: Cxone, S: Store> Handler for SagaHandler<C, S> {
    async fn handle(&self, msg: Message, ctx: Context) -> Settle {
        let parks = headers::get_int(msg.properties.headers().as_ref(), PARK_COUNT)
            .unwrap_or(0)
            .clamp(0, i64::from(u32::MAX)) as u32;
        let outcomes = AmqpOutcomes {
            publisher: ctx.publisher.clone(),
            exchange: self.deps.settings.amqp.outcomes_exchange.clone(),
        };
        let delivery = Delivery {
            redelivered: msg.redelivered || msg.delivery_count() > 0,
            parks,
            draining: ctx.draining.clone(),
            released: msg.header(GUARD_RELEASED).is_some(),
        };
        let verdict = self
            .deps
            .run_termination(&msg.event, &delivery, &outcomes)
            .await;
        self.settle(verdict, &msg, &ctx, parks).await
    }
}
