//! The saga as a broker [`Handler`]: runs the saga of each event and turns its [`Verdict`]
//! into broker actions — ack, dead-letter, or a confirmed copy in a delay queue (parking), the
//! held queue, the housekeeping queue (hand-over) or its own queue (shutdown, long archives)
//! before the original is acked. Every copy's control headers are signed.

use lapin::BasicProperties;

use super::consumer::{Context, Handler, Message, Settle};
use super::dead_letter::DeadLetter;
use super::headers::{self, GUARD_RELEASED, HELD_AT, LEASE_WAITS, PARK_COUNT, PARK_REASON};
use super::outcomes::AmqpOutcomes;
use super::publisher::PublishError;
use super::topology::stage_queue;
use crate::cxone::Cxone;
use crate::saga::{Deps, Holder, Stage, Verdict, runner};
use crate::store::Store;

pub struct SagaHandler<C, S> {
    pub deps: Deps<C, S>,
}

/// What to do to the headers of a copy.
enum Headers<'a> {
    /// Keep them, set these and count one more of `incr`.
    Keep {
        set: &'a [(&'a str, String)],
        incr: Option<&'a str>,
    },
    /// Start afresh (a new retry budget): a hand-over to the next stage.
    Fresh,
}

impl<C: Cxone, S: Store> SagaHandler<C, S> {
    pub fn new(deps: Deps<C, S>) -> Self {
        Self { deps }
    }

    /// Publishes a copy of `msg` to `queue` through the default exchange, confirmed.
    async fn copy_to(
        &self,
        ctx: &Context,
        msg: &Message,
        queue: &str,
        change: Headers<'_>,
    ) -> Result<(), PublishError> {
        let current = msg.properties.headers().as_ref();
        let mut table = match change {
            Headers::Keep { .. } => headers::for_republish(current),
            Headers::Fresh => headers::fresh(current),
        };
        if headers::get_str(Some(&table), headers::ORIGINAL_EXCHANGE).is_none() {
            headers::set_str(&mut table, headers::ORIGINAL_EXCHANGE, &msg.exchange);
            headers::set_str(&mut table, headers::ORIGINAL_ROUTING_KEY, &msg.routing_key);
        }
        if let Headers::Keep { set, incr } = change {
            for (k, v) in set {
                headers::set_str(&mut table, k, v);
            }
            if let Some(key) = incr {
                let n = headers::get_int(Some(&table), key).unwrap_or(0);
                headers::set_int(&mut table, key, n + 1);
            }
        }
        ctx.control.sign(&mut table, &msg.body);
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
        let amqp = &settings.amqp;
        let delay = |stage, secs| async move {
            match ctx.delays.ensure(stage, secs).await {
                Ok(q) => Some(q),
                Err(e) => {
                    tracing::warn!(error = %e, "could not declare a delay queue");
                    None
                }
            }
        };
        let (queue, change, what) = match verdict {
            Verdict::Settled => return Settle::Ack,
            Verdict::DeadLetter(failed) => {
                return Settle::DeadLetter(DeadLetter {
                    class: failed.class.into(),
                    message: failed.message,
                    step: failed.step,
                    saga_id: failed.saga_id,
                });
            }
            Verdict::Park { reason } => {
                self.deps.metrics.saga_parked();
                let delays = &settings.worker.retry_delays_secs;
                let idx = (parks as usize).min(delays.len().saturating_sub(1));
                let Some(secs) = delays.get(idx) else {
                    return Settle::Requeue;
                };
                let Some(q) = delay(ctx.stage, *secs).await else {
                    return Settle::Requeue;
                };
                (
                    q,
                    vec![(PARK_REASON, headers::truncate_bytes(&reason, 512))],
                    Some(PARK_COUNT),
                )
            }
            Verdict::Wait => {
                let secs = settings
                    .worker
                    .retry_delays_secs
                    .first()
                    .copied()
                    .unwrap_or(30);
                let Some(q) = delay(ctx.stage, secs).await else {
                    return Settle::Requeue;
                };
                (q, vec![], Some(LEASE_WAITS))
            }
            // Schedules and live calls are waited for in access removal only.
            Verdict::Defer { secs, reason } => {
                let Some(q) = delay(Stage::Access, secs).await else {
                    return Settle::Requeue;
                };
                (
                    q,
                    vec![(PARK_REASON, headers::truncate_bytes(&reason, 256))],
                    None,
                )
            }
            Verdict::Hold => (
                amqp.held_queue.clone(),
                vec![(HELD_AT, chrono::Utc::now().to_rfc3339())],
                None,
            ),
            Verdict::Requeue => (stage_queue(amqp, ctx.stage).to_owned(), vec![], None),
            Verdict::HandOver => {
                let queue = stage_queue(amqp, Stage::Housekeeping).to_owned();
                return match self.copy_to(ctx, msg, &queue, Headers::Fresh).await {
                    Ok(()) => Settle::Ack,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not hand over; returning the message to the queue");
                        Settle::Requeue
                    }
                };
            }
        };
        let change = Headers::Keep {
            set: &change,
            incr: what,
        };
        match self.copy_to(ctx, msg, &queue, change).await {
            Ok(()) => Settle::Ack,
            Err(e) => {
                tracing::warn!(error = %e, %queue, "could not move the message; returning it to the queue");
                Settle::Requeue
            }
        }
    }
}

impl<C: Cxone, S: Store> Handler for SagaHandler<C, S> {
    async fn handle(&self, msg: Message, ctx: Context) -> Settle {
        // The consumer removed control headers this deployment did not sign.
        let parks = headers::get_int(msg.properties.headers().as_ref(), PARK_COUNT)
            .unwrap_or(0)
            .clamp(0, i64::from(u32::MAX)) as u32;
        let outcomes = AmqpOutcomes {
            publisher: ctx.publisher.clone(),
            exchange: self.deps.settings.amqp.outcomes_exchange.clone(),
            metrics: self.deps.metrics.clone(),
        };
        let delivery = crate::saga::Delivery {
            holder: Holder::new(
                ctx.session.clone(),
                uuid::Uuid::new_v4().simple().to_string(),
            ),
            stage: ctx.stage,
            parks,
            draining: ctx.draining.clone(),
            released: msg.header(GUARD_RELEASED).is_some(),
        };
        let verdict = runner::run(&self.deps, &msg.event, &delivery, &outcomes).await;
        self.settle(verdict, &msg, &ctx, parks).await
    }
}
