//! The consumer: one connection at a time, reconnecting with backoff, consuming both stages'
//! queues (access removal from the work queue, housekeeping from the housekeeping queue) with
//! separate in-flight limits. Every delivery passes the trust boundary (control headers from
//! outside removed), is decoded and validated (invalid ones dead-lettered at once), handed to
//! a [`Handler`], and acked only once the handler has settled it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use rand::Rng;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::control::ControlKey;
use super::dead_letter::{self, DeadLetter, ErrorClass, Original};
use super::headers;
use super::publisher::Publisher;
use super::topology::{self, TopologyConflict};
use crate::config::Settings;
use crate::event::{Event, Rules};
use crate::http::Readiness;
use crate::metrics::Metrics;
use crate::saga::Stage;

/// A valid event with what the broker said about its delivery.
#[derive(Debug, Clone)]
pub struct Message {
    pub event: Event,
    pub exchange: String,
    pub routing_key: String,
    pub redelivered: bool,
    /// The properties after the trust boundary: control headers only if this deployment
    /// signed them.
    pub properties: BasicProperties,
    pub body: Arc<[u8]>,
}

impl Message {
    /// Deliveries so far according to the quorum queue (absent on the first: 0).
    pub fn delivery_count(&self) -> i64 {
        headers::get_int(self.properties.headers().as_ref(), headers::DELIVERY_COUNT).unwrap_or(0)
    }

    /// How often an operator replayed this message from the dead-letter queue.
    pub fn replay_count(&self) -> i64 {
        headers::get_int(self.properties.headers().as_ref(), headers::REPLAY_COUNT).unwrap_or(0)
    }

    pub fn header(&self, key: &str) -> Option<String> {
        headers::get_str(self.properties.headers().as_ref(), key)
    }

    pub fn original(&self) -> Original<'_> {
        Original {
            exchange: &self.exchange,
            routing_key: &self.routing_key,
            properties: &self.properties,
            body: &self.body,
        }
    }
}

/// What the handler decided; the consumer carries it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// Done: everything the handler had to publish is confirmed. Ack.
    Ack,
    /// Publish a copy to the dead-letter exchange with these reasons, then ack.
    DeadLetter(DeadLetter),
    /// Give it back to the queue (counts as a delivery on a quorum queue).
    Requeue,
}

/// What a handler gets besides the message.
#[derive(Debug, Clone)]
pub struct Context {
    /// A confirm-mode channel on the current connection.
    pub publisher: Publisher,
    /// Cancelled when the connection is lost or the shutdown grace runs out: stop soon, the
    /// message will be redelivered.
    pub abort: CancellationToken,
    /// Cancelled when shutdown begins: finish the current step, then park.
    pub draining: CancellationToken,
    /// Cancelled by a handler whose publish found the publisher channel dead: the session
    /// reconnects at once (its unacked messages return with one more delivery each) instead of
    /// requeueing them in a loop to the delivery limit.
    pub broken: CancellationToken,
    /// The queue the message came from.
    pub stage: Stage,
    /// Declares delay queues on first use.
    pub delays: super::topology::DelayQueues,
    /// This connection's session id (its marker queue lives as long as the connection).
    pub session: String,
    /// Signs the control headers of the worker's own republications.
    pub control: ControlKey,
}

/// Handles valid events. The saga implements it; tests plug in their own.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, message: Message, ctx: Context) -> impl Future<Output = Settle> + Send;
}

/// Pauses consumption while the value is `Some(why)` (the CXone circuit is open, CXone refuses
/// the access key).
pub type PauseSignal = watch::Receiver<Option<String>>;

/// How a consuming session ended.
enum SessionEnd {
    Shutdown,
    Lost(String),
    Paused,
}

pub struct Consumer<H> {
    settings: Arc<Settings>,
    handler: Arc<H>,
    readiness: Arc<Readiness>,
    metrics: Metrics,
    tracker: TaskTracker,
    pause: Option<PauseSignal>,
    control: ControlKey,
    rules: Arc<Rules>,
    /// Prefix of this process's session ids.
    instance: String,
}

impl<H: Handler> Consumer<H> {
    pub fn new(
        settings: Arc<Settings>,
        handler: Arc<H>,
        readiness: Arc<Readiness>,
        metrics: Metrics,
        control: ControlKey,
    ) -> Self {
        let rules = Arc::new(Rules::from_settings(&settings));
        Self {
            settings,
            handler,
            readiness,
            metrics,
            tracker: TaskTracker::new(),
            pause: None,
            control,
            rules,
            instance: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
        }
    }

    /// Stop taking deliveries while `pause` holds `true`; in-flight work continues.
    pub fn with_pause(mut self, pause: PauseSignal) -> Self {
        self.pause = Some(pause);
        self
    }

    /// Consumes until `shutdown` is cancelled, then drains in-flight work for up to
    /// `worker.shutdown_grace_secs`. Returns an error only for what reconnecting cannot fix.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let amqp = &self.settings.amqp;
        let mut backoff = Backoff::new(
            Duration::from_millis(amqp.reconnect_initial_ms),
            Duration::from_millis(amqp.reconnect_max_ms),
        );
        let mut sessions = 0u64;
        let mut pause = self.pause.clone();
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let why = pause.as_ref().and_then(|p| p.borrow().clone());
            if let (Some(p), Some(why)) = (pause.as_mut(), why) {
                info!(%why, "consumption paused; waiting to resume");
                self.readiness.set_paused(Some(why));
                self.metrics.broker_up(false);
                self.metrics.intake_paused(true);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = p.wait_for(Option::is_none) => {}
                }
                info!("consumption resumes");
                self.metrics.intake_paused(false);
            }
            match self.session(&shutdown, sessions).await {
                Ok(SessionEnd::Shutdown) => break,
                Ok(SessionEnd::Paused) => {
                    sessions += 1;
                    continue;
                }
                Ok(SessionEnd::Lost(why)) => {
                    // It had connected: start the backoff over.
                    sessions += 1;
                    backoff.reset();
                    self.lost(&why);
                }
                Err(err) if err.downcast_ref::<TopologyConflict>().is_some() => {
                    self.readiness.set_connected(false);
                    self.metrics.broker_up(false);
                    return Err(err);
                }
                Err(err) => {
                    sessions += 1;
                    self.lost(&format!("{err:#}"));
                }
            }
            let wait = backoff.next_delay();
            debug!(?wait, "reconnecting after backoff");
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        self.readiness.set_connected(false);
        self.metrics.broker_up(false);
        Ok(())
    }

    fn lost(&self, why: &str) {
        self.readiness.set_connected(false);
        self.metrics.broker_up(false);
        warn!(error = %why, "broker connection lost; in-flight messages will be redelivered");
    }

    async fn session(
        &self,
        shutdown: &CancellationToken,
        previous_sessions: u64,
    ) -> anyhow::Result<SessionEnd> {
        let amqp = &self.settings.amqp;
        let connection = super::connect(amqp, "worker").await?;
        // Declarations get their own channel: a refused one closes it.
        let setup = connection.create_channel().await?;
        let delays = topology::Delays::of(&self.settings);
        topology::declare(
            &setup,
            amqp,
            &topology::Delays {
                access: Vec::new(),
                housekeeping: Vec::new(),
            },
        )
        .await?;
        let session = format!("{}-{previous_sessions}", self.instance);
        super::sessions::declare(&setup, amqp, &session).await?;
        let delay_queues =
            topology::DelayQueues::new(connection.create_channel().await?, amqp.clone());
        let _ = setup.close(200, "declared".into()).await;
        topology::migrate_classic_delays(&connection, amqp, &delays.access).await;

        let publisher = Publisher::open(&connection).await?;
        let tag = format!(
            "cxone-offboard-{}-{}-{}",
            crate::hostname(),
            std::process::id(),
            previous_sessions
        );
        let mut streams = Vec::new();
        for (stage, queue, prefetch) in [
            (Stage::Access, &amqp.requests_queue, amqp.prefetch),
            (
                Stage::Housekeeping,
                &amqp.housekeeping_queue,
                amqp.housekeeping_prefetch,
            ),
        ] {
            let channel = connection.create_channel().await?;
            channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await?;
            let stage_tag = format!("{tag}-{}", stage_name(stage));
            let consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    stage_tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            streams.push((stage, channel, stage_tag, consumer));
        }
        let abort = CancellationToken::new();
        self.readiness.set_connected(true);
        self.readiness.set_paused(None);
        self.metrics.broker_up(true);
        if previous_sessions > 0 {
            self.metrics.broker_reconnected();
        }
        info!(
            queue = %amqp.requests_queue,
            housekeeping = %amqp.housekeeping_queue,
            prefetch = amqp.prefetch,
            housekeeping_prefetch = amqp.housekeeping_prefetch,
            %session,
            "consuming"
        );

        let mut pause = self.pause.clone();
        let paused = async {
            match pause.as_mut() {
                Some(p) => {
                    let _ = p.wait_for(Option::is_some).await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::pin!(paused);
        let slots = [
            Arc::new(tokio::sync::Semaphore::new(
                self.settings.worker.max_in_flight,
            )),
            Arc::new(tokio::sync::Semaphore::new(
                self.settings.worker.housekeeping_max_in_flight,
            )),
        ];
        let draining = CancellationToken::new();
        let broken = CancellationToken::new();
        let mut health = tokio::time::interval(Duration::from_secs(1));
        let (access_stream, hk_stream) = {
            let mut it = streams.iter_mut();
            let a = it.next().map(|s| &mut s.3);
            let h = it.next().map(|s| &mut s.3);
            match (a, h) {
                (Some(a), Some(h)) => (a, h),
                _ => return Ok(SessionEnd::Lost("consumers missing".into())),
            }
        };

        let end = loop {
            let (stage, next) = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break SessionEnd::Shutdown,
                _ = &mut paused => break SessionEnd::Paused,
                _ = broken.cancelled() => break SessionEnd::Lost("the publisher channel closed".into()),
                _ = health.tick() => {
                    if !publisher.is_usable() {
                        break SessionEnd::Lost("the publisher channel closed".into());
                    }
                    continue;
                }
                next = access_stream.next() => (Stage::Access, next),
                next = hk_stream.next() => (Stage::Housekeeping, next),
            };
            match next {
                Some(Ok(delivery)) => {
                    let sem = slots[stage as usize].clone();
                    let permit = tokio::select! {
                        p = sem.acquire_owned() => p,
                        _ = shutdown.cancelled() => {
                            // Not started: give it straight back.
                            let _ = delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
                            break SessionEnd::Shutdown;
                        }
                    };
                    let Ok(permit) = permit else {
                        break SessionEnd::Lost("semaphore closed".into());
                    };
                    self.metrics.message_received();
                    let queue = match stage {
                        Stage::Access => amqp.requests_queue.clone(),
                        Stage::Housekeeping => amqp.housekeeping_queue.clone(),
                    };
                    let task = Task {
                        handler: self.handler.clone(),
                        metrics: self.metrics.clone(),
                        ctx: Context {
                            publisher: publisher.clone(),
                            abort: abort.clone(),
                            draining: draining.clone(),
                            broken: broken.clone(),
                            stage,
                            delays: delay_queues.clone(),
                            session: session.clone(),
                            control: self.control.clone(),
                        },
                        dead_letter_exchange: amqp.dead_letter_exchange.clone(),
                        rules: self.rules.clone(),
                        rescue: Rescue {
                            queue,
                            at: (i64::from(amqp.delivery_limit) - 2).max(1),
                        },
                    };
                    self.tracker.spawn(async move {
                        task.run(delivery).await;
                        drop(permit);
                    });
                }
                Some(Err(err)) => break SessionEnd::Lost(err.to_string()),
                None => break SessionEnd::Lost("the broker cancelled a consumer".into()),
            }
        };

        match end {
            SessionEnd::Shutdown | SessionEnd::Paused => {
                for (_, channel, tag, _) in &streams {
                    let _ = channel
                        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                        .await;
                }
                let mut end = end;
                if matches!(end, SessionEnd::Paused) {
                    // Deliveries already prefetched go back; in-flight ones finish, unless
                    // shutdown begins meanwhile: then they get the shutdown grace, no more.
                    self.tracker.close();
                    tokio::select! {
                        _ = self.tracker.wait() => {}
                        _ = shutdown.cancelled() => end = SessionEnd::Shutdown,
                    }
                    self.tracker.reopen();
                    if matches!(end, SessionEnd::Paused) {
                        for (_, channel, _, _) in &streams {
                            let _ = channel.close(200, "paused".into()).await;
                        }
                        publisher.close().await;
                        let _ = connection.close(200, "paused".into()).await;
                        return Ok(SessionEnd::Paused);
                    }
                }
                self.readiness.set_draining();
                draining.cancel();
                let grace = self.settings.worker.shutdown_grace();
                info!(
                    in_flight = self.metrics.in_flight(),
                    grace_secs = grace.as_secs(),
                    "draining"
                );
                self.wait_in_flight(grace, &abort).await;
                // Anything not acked by now is returned to the queue by closing.
                for (_, channel, _, _) in &streams {
                    let _ = channel.close(200, "shutting down".into()).await;
                }
                publisher.close().await;
                let _ = connection.close(200, "shutting down".into()).await;
                Ok(SessionEnd::Shutdown)
            }
            SessionEnd::Lost(why) => {
                // Stop handlers of this session: their acks cannot land any more.
                abort.cancel();
                let _ = connection.close(200, "reconnecting".into()).await;
                Ok(SessionEnd::Lost(why))
            }
        }
    }

    /// Waits for in-flight handlers up to `grace`; past it they are aborted and their messages
    /// left unacked.
    async fn wait_in_flight(&self, grace: Duration, abort: &CancellationToken) {
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                in_flight = self.metrics.in_flight(),
                "shutdown grace ran out; unfinished messages return to the queue"
            );
            abort.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(2), self.tracker.wait()).await;
        }
        self.tracker.reopen();
    }
}

fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Access => "access",
        Stage::Housekeeping => "housekeeping",
    }
}

/// One delivery's life: trust boundary, decode, handle, settle.
struct Task<H> {
    handler: Arc<H>,
    metrics: Metrics,
    ctx: Context,
    dead_letter_exchange: String,
    rules: Arc<Rules>,
    rescue: Rescue,
}

/// Messages returned to the queue by crashed or killed workers count as deliveries; with
/// prefetch, one pod kill charges every message it held. Before such a message nears the
/// delivery limit it is re-published fresh (confirmed, then acked), at most [`MAX_RESCUES`]
/// times, so healthy work survives repeated pod kills while a message that really crashes
/// workers still reaches the dead-letter queue.
#[derive(Debug, Clone)]
struct Rescue {
    queue: String,
    /// Delivery count from which a message is re-published fresh.
    at: i64,
}

/// Times a message may be re-published fresh before the delivery limit applies.
pub const MAX_RESCUES: i64 = 3;
/// Header counting those re-publications.
pub const RESCUES: &str = "x-offboard-rescues";

impl<H: Handler> Task<H> {
    async fn run(self, delivery: Delivery) {
        let stage = match self.ctx.stage {
            Stage::Access => "access",
            Stage::Housekeeping => "housekeeping",
        };
        self.metrics.handling_started(stage);
        let span = info_span!(
            "message",
            event_id = tracing::field::Empty,
            external_id = tracing::field::Empty,
            routing_key = %delivery.routing_key.as_str(),
        );
        self.run_inner(delivery).instrument(span).await;
        self.metrics.handling_finished(stage);
    }

    /// Re-publishes a message that crashed workers keep returning, before the limit hits.
    async fn rescued(&self, delivery: &Delivery, properties: &BasicProperties) -> bool {
        let table = properties.headers().as_ref();
        let count = headers::get_int(table, headers::DELIVERY_COUNT).unwrap_or(0);
        let rescues = headers::get_int(table, RESCUES).unwrap_or(0);
        if count < self.rescue.at || rescues >= MAX_RESCUES {
            return false;
        }
        let mut fresh = headers::for_republish(table);
        headers::set_int(&mut fresh, RESCUES, rescues + 1);
        if headers::get_str(Some(&fresh), headers::ORIGINAL_EXCHANGE).is_none() {
            headers::set_str(
                &mut fresh,
                headers::ORIGINAL_EXCHANGE,
                delivery.exchange.as_str(),
            );
            headers::set_str(
                &mut fresh,
                headers::ORIGINAL_ROUTING_KEY,
                delivery.routing_key.as_str(),
            );
        }
        self.ctx.control.sign(&mut fresh, &delivery.data);
        let props = properties.clone().with_headers(fresh);
        match self
            .ctx
            .publisher
            .publish("", &self.rescue.queue, &delivery.data, props, true)
            .await
        {
            Ok(()) => {
                info!(
                    delivery_count = count,
                    rescues = rescues + 1,
                    "message returned by crashed workers re-published fresh"
                );
                self.metrics.message_rescued();
                self.ack(delivery).await;
                true
            }
            Err(e) => {
                warn!(error = %e, "could not re-publish a returned message; handling it as is");
                false
            }
        }
    }

    async fn run_inner(&self, delivery: Delivery) {
        // The trust boundary: nothing below reads a control header the worker did not sign.
        let (properties, forged) =
            self.ctx
                .control
                .sanitize(&delivery.properties, &delivery.data, delivery.redelivered);
        if !forged.is_empty() {
            self.metrics.control_headers_ignored();
            warn!(headers = ?forged, "control headers on a message from outside ignored");
        }
        if self.rescued(&delivery, &properties).await {
            return;
        }
        let content_type = properties
            .content_type()
            .as_ref()
            .map(|c| c.as_str().to_owned());
        let parsed = self
            .rules
            .parse_message(content_type.as_deref(), &delivery.data);
        let settle = match parsed {
            Err(invalid) => {
                self.metrics.message_invalid();
                warn!(error = %invalid, "invalid event; dead-lettering");
                Settle::DeadLetter(DeadLetter {
                    class: ErrorClass::Invalid,
                    message: format!("invalid event: {invalid}"),
                    step: None,
                    saga_id: None,
                })
            }
            Ok(event) => {
                let span = tracing::Span::current();
                span.record("event_id", event.id.as_str());
                span.record("external_id", event.employee().external_id.as_str());
                let message = Message {
                    event,
                    exchange: delivery.exchange.as_str().to_owned(),
                    routing_key: delivery.routing_key.as_str().to_owned(),
                    redelivered: delivery.redelivered,
                    properties: properties.clone(),
                    body: Arc::from(delivery.data.as_slice()),
                };
                tokio::select! {
                    settle = self.handler.handle(message, self.ctx.clone()) => settle,
                    _ = self.ctx.abort.cancelled() => {
                        debug!("handler aborted; the message stays unacked");
                        return;
                    }
                }
            }
        };
        self.settle(&delivery, &properties, settle).await;
    }

    async fn settle(&self, delivery: &Delivery, properties: &BasicProperties, settle: Settle) {
        match settle {
            Settle::Ack => self.ack(delivery).await,
            Settle::DeadLetter(why) => {
                let original = Original {
                    exchange: delivery.exchange.as_str(),
                    routing_key: delivery.routing_key.as_str(),
                    properties,
                    body: &delivery.data,
                };
                match dead_letter::publish(
                    &self.ctx.publisher,
                    &self.dead_letter_exchange,
                    &original,
                    &why,
                    &self.ctx.control,
                )
                .await
                {
                    Ok(()) => {
                        self.metrics.message_dead_lettered(why.class.as_str());
                        self.ack(delivery).await;
                    }
                    Err(err) => {
                        error!(error = %err, "dead-letter copy not confirmed; returning the message to the queue");
                        self.requeue(delivery).await;
                    }
                }
            }
            Settle::Requeue => self.requeue(delivery).await,
        }
    }

    async fn ack(&self, delivery: &Delivery) {
        match delivery.acker.ack(BasicAckOptions::default()).await {
            Ok(_) => self.metrics.message_acked(),
            Err(err) => warn!(error = %err, "ack failed; the broker will redeliver"),
        }
    }

    async fn requeue(&self, delivery: &Delivery) {
        if !self.ctx.publisher.is_usable() {
            // Requeueing now would only loop the message to its delivery limit: reconnect, and
            // let the closing connection return it.
            warn!("the publisher channel is closed; reconnecting before this message is retried");
            self.ctx.broken.cancel();
            return;
        }
        self.metrics.message_requeued();
        let options = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        if let Err(err) = delivery.acker.nack(options).await {
            warn!(error = %err, "nack failed; the broker will redeliver");
        }
    }
}

/// Exponential backoff with full jitter, reset by a success.
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            attempt: 0,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let exp = self
            .initial
            .saturating_mul(2u32.saturating_pow(self.attempt.min(20)));
        let cap = exp.min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let millis = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX).max(1);
        Duration::from_millis(rand::rng().random_range(millis / 2..=millis))
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let delays: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] <= Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(1000)));
        assert!(delays[7] >= Duration::from_millis(500));
    }
}
