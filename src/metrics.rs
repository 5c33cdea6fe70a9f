//! Every Prometheus metric the process exports, one small method per event (vector's
//! `internal_events`), so the logic never touches metric types. Names start with `offboard_`.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
    pub status: String,
    /// `revoke` or `housekeeping`: the limiter queue the call waited in.
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IntakeLabel {
    pub source: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    pub stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

/// Sagas in this process that have not yet revoked access, by when their clock started.
#[derive(Default)]
struct Unrevoked {
    next: u64,
    since: std::collections::HashMap<u64, chrono::DateTime<chrono::Utc>>,
}

/// Holds one saga in `offboard_oldest_unrevoked_age_seconds` until dropped.
pub struct UnrevokedGuard {
    id: u64,
    set: Arc<std::sync::Mutex<Unrevoked>>,
}

impl Drop for UnrevokedGuard {
    fn drop(&mut self) {
        if let Ok(mut set) = self.set.lock() {
            set.since.remove(&self.id);
        }
    }
}

/// The process's metrics. Cheap to clone (all handles are shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    received: Counter,
    invalid: Counter,
    acked: Counter,
    requeued: Counter,
    rescued: Counter,
    dead_lettered: Family<ClassLabel, Counter>,
    in_flight: Family<StageLabel, Gauge>,
    broker_connected: Gauge,
    broker_reconnects: Counter,
    draining: Gauge,
    cxone_requests: Family<RouteLabel, Counter>,
    cxone_throttled: Family<ClassLabel, Counter>,
    cxone_rate: Gauge<f64, std::sync::atomic::AtomicU64>,
    sagas: Family<StatusLabel, Counter>,
    sagas_parked: Counter,
    sagas_held: Counter,
    step_seconds: Family<StepLabel, Histogram>,
    time_to_revoke: Histogram,
    s3_requests: Family<OperationLabel, Counter>,
    outcomes_unroutable: Family<RoutingKeyLabel, Counter>,
    control_headers_ignored: Counter,
    cxone_credentials_rejected: Gauge,
    cxone_breaker_open: Gauge,
    quota_shared: Gauge,
    intake_paused: Gauge,
    quota_replicas: Gauge,
    quota_fallbacks: Counter,
    sagas_handed_over: Counter,
    intake_requests: Family<IntakeLabel, Counter>,
    intake_published: Family<SourceLabel, Counter>,
    sla_revocations: Family<ResultLabel, Counter>,
    sla_limit: Gauge,
    oldest_unrevoked: Gauge<f64, std::sync::atomic::AtomicU64>,
    unrevoked: Arc<std::sync::Mutex<Unrevoked>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabel {
    pub operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoutingKeyLabel {
    pub routing_key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabel {
    pub step: String,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("offboard");
        let received = Counter::default();
        registry.register(
            "messages_received",
            "Deliveries taken from the work queue",
            received.clone(),
        );
        let invalid = Counter::default();
        registry.register(
            "messages_invalid",
            "Deliveries rejected as invalid input and dead-lettered",
            invalid.clone(),
        );
        let acked = Counter::default();
        registry.register(
            "messages_acked",
            "Deliveries acknowledged after their outcome was settled",
            acked.clone(),
        );
        let requeued = Counter::default();
        registry.register(
            "messages_requeued",
            "Deliveries returned to the queue unsettled",
            requeued.clone(),
        );
        let rescued = Counter::default();
        registry.register(
            "messages_rescued",
            "Messages returned by crashed workers, re-published fresh before the delivery limit",
            rescued.clone(),
        );
        let dead_lettered = Family::<ClassLabel, Counter>::default();
        registry.register(
            "messages_dead_lettered",
            "Deliveries dead-lettered by the worker, by error class",
            dead_lettered.clone(),
        );
        // Every class and status exists from the start at 0, so rate() and increase() see the
        // first dead letter or failure of each.
        for class in ["invalid", "permanent", "exhausted", "guard"] {
            let _ = dead_lettered.get_or_create(&ClassLabel {
                class: class.to_owned(),
            });
        }
        let in_flight = Family::<StageLabel, Gauge>::default();
        registry.register(
            "in_flight",
            "Deliveries being handled now, by stage (access, housekeeping)",
            in_flight.clone(),
        );
        for stage in ["access", "housekeeping"] {
            let _ = in_flight.get_or_create(&StageLabel {
                stage: stage.to_owned(),
            });
        }
        let broker_connected = Gauge::default();
        registry.register(
            "broker_connected",
            "1 while the broker connection and consumer are up",
            broker_connected.clone(),
        );
        let broker_reconnects = Counter::default();
        registry.register(
            "broker_reconnects",
            "Broker connections re-established after a loss",
            broker_reconnects.clone(),
        );
        let draining = Gauge::default();
        registry.register("draining", "1 once shutdown has begun", draining.clone());
        let cxone_requests = Family::<RouteLabel, Counter>::default();
        registry.register(
            "cxone_requests",
            "CXone requests by route template and HTTP status (0 = no answer)",
            cxone_requests.clone(),
        );
        let cxone_throttled = Family::<ClassLabel, Counter>::default();
        registry.register(
            "cxone_throttled",
            "CXone answers 429, by class (revoke, housekeeping)",
            cxone_throttled.clone(),
        );
        for class in ["revoke", "housekeeping"] {
            let _ = cxone_throttled.get_or_create(&ClassLabel {
                class: class.to_owned(),
            });
        }
        let cxone_rate = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "cxone_rate_limit_requests_per_second",
            "Requests per second the limiter allows now (the tenant-wide rate on the shared quota)",
            cxone_rate.clone(),
        );
        let sagas = Family::<StatusLabel, Counter>::default();
        registry.register("sagas", "Sagas finished, by final status", sagas.clone());
        for status in [
            "DELETED",
            "DEACTIVATED_ONLY",
            "ALREADY_ABSENT",
            "FAILED",
            "COMPENSATED",
            "PLANNED",
        ] {
            let _ = sagas.get_or_create(&StatusLabel {
                status: status.to_owned(),
            });
        }
        let sagas_parked = Counter::default();
        registry.register(
            "sagas_parked",
            "Sagas parked in a delay queue after transient failures",
            sagas_parked.clone(),
        );
        let sagas_held = Counter::default();
        registry.register(
            "sagas_held",
            "Sagas held by the mass-deletion guard",
            sagas_held.clone(),
        );
        let step_seconds = Family::<StepLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 16))
        });
        registry.register(
            "step_duration_seconds",
            "Duration of saga steps",
            step_seconds.clone(),
        );
        let time_to_revoke = Histogram::new(exponential_buckets(0.05, 2.0, 18));
        registry.register(
            "time_to_revoke_seconds",
            "From the event's time to login blocked, sessions ended and keys revoked",
            time_to_revoke.clone(),
        );
        let s3_requests = Family::<OperationLabel, Counter>::default();
        registry.register(
            "s3_requests",
            "S3 requests sent, by operation",
            s3_requests.clone(),
        );
        let outcomes_unroutable = Family::<RoutingKeyLabel, Counter>::default();
        registry.register(
            "outcomes_unroutable",
            "Outcomes the broker returned because no queue is bound for them",
            outcomes_unroutable.clone(),
        );
        let control_headers_ignored = Counter::default();
        registry.register(
            "control_headers_ignored",
            "Messages from outside whose x-offboard-* or x-delivery-count headers were ignored",
            control_headers_ignored.clone(),
        );
        let cxone_credentials_rejected = Gauge::default();
        registry.register(
            "cxone_credentials_rejected",
            "1 while CXone's token endpoint refuses the access key (intake paused)",
            cxone_credentials_rejected.clone(),
        );
        let cxone_breaker_open = Gauge::default();
        registry.register(
            "cxone_breaker_open",
            "1 while the CXone circuit breaker is open or probing (intake paused)",
            cxone_breaker_open.clone(),
        );
        let quota_shared = Gauge::default();
        registry.register(
            "quota_shared",
            "1 while CXone tokens come from the shared bucket in Redis, 0 on the local limiter",
            quota_shared.clone(),
        );
        let intake_paused = Gauge::default();
        registry.register(
            "intake_paused",
            "1 while the worker takes no deliveries on purpose (CXone circuit open or access key refused); the broker connection is closed meanwhile",
            intake_paused.clone(),
        );
        let quota_replicas = Gauge::default();
        registry.register(
            "quota_replicas",
            "Replicas sharing the Redis bucket, as last seen (heartbeats in the last 5 s)",
            quota_replicas.clone(),
        );
        let quota_fallbacks = Counter::default();
        registry.register(
            "quota_fallbacks",
            "Times Redis failed and this process fell back to its own limiter",
            quota_fallbacks.clone(),
        );
        let intake_requests = Family::<IntakeLabel, Counter>::default();
        registry.register(
            "intake_requests",
            "HTTP intake requests by source and answer code",
            intake_requests.clone(),
        );
        let intake_published = Family::<SourceLabel, Counter>::default();
        registry.register(
            "intake_events_published",
            "Events the HTTP intake published (broker-confirmed), by source",
            intake_published.clone(),
        );
        let sagas_handed_over = Counter::default();
        registry.register(
            "sagas_handed_over",
            "Sagas whose access removal was verified and handed over to housekeeping",
            sagas_handed_over.clone(),
        );
        let sla_revocations = Family::<ResultLabel, Counter>::default();
        registry.register(
            "sla_revocations",
            "Revocations by SLA result (met, breached): revoked_at against sla.due_at",
            sla_revocations.clone(),
        );
        for result in ["met", "breached"] {
            let _ = sla_revocations.get_or_create(&ResultLabel {
                result: result.to_owned(),
            });
        }
        let sla_limit = Gauge::default();
        registry.register(
            "sla_revoke_within_seconds",
            "The configured revocation SLA (sla.revoke_within_secs)",
            sla_limit.clone(),
        );
        let oldest_unrevoked = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "oldest_unrevoked_age_seconds",
            "Age (from effective_at or arrival) of the oldest saga this process is running that has not revoked access yet; 0 when none",
            oldest_unrevoked.clone(),
        );
        Self {
            registry: Arc::new(registry),
            sagas_handed_over,
            intake_requests,
            intake_published,
            sla_revocations,
            sla_limit,
            oldest_unrevoked,
            unrevoked: Arc::default(),
            quota_shared,
            intake_paused,
            quota_replicas,
            quota_fallbacks,
            cxone_credentials_rejected,
            cxone_breaker_open,
            s3_requests,
            outcomes_unroutable,
            control_headers_ignored,
            sagas,
            sagas_parked,
            sagas_held,
            step_seconds,
            time_to_revoke,
            cxone_requests,
            cxone_throttled,
            cxone_rate,
            received,
            invalid,
            acked,
            requeued,
            rescued,
            dead_lettered,
            in_flight,
            broker_connected,
            broker_reconnects,
            draining,
        }
    }

    /// Prometheus text exposition of everything registered.
    pub fn render(&self) -> String {
        let oldest = self
            .unrevoked
            .lock()
            .ok()
            .and_then(|set| set.since.values().min().copied());
        let age = oldest.map_or(0.0, |since| {
            (chrono::Utc::now() - since).num_milliseconds().max(0) as f64 / 1000.0
        });
        self.oldest_unrevoked.set(age);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn message_received(&self) {
        self.received.inc();
    }
    pub fn message_invalid(&self) {
        self.invalid.inc();
    }
    pub fn message_acked(&self) {
        self.acked.inc();
    }
    pub fn message_rescued(&self) {
        self.rescued.inc();
    }
    pub fn message_requeued(&self) {
        self.requeued.inc();
    }
    pub fn message_dead_lettered(&self, class: &str) {
        self.dead_lettered
            .get_or_create(&ClassLabel {
                class: class.to_owned(),
            })
            .inc();
    }
    pub fn handling_started(&self, stage: &str) {
        self.in_flight
            .get_or_create(&StageLabel {
                stage: stage.to_owned(),
            })
            .inc();
    }
    pub fn handling_finished(&self, stage: &str) {
        self.in_flight
            .get_or_create(&StageLabel {
                stage: stage.to_owned(),
            })
            .dec();
    }
    /// Deliveries being handled now, both stages.
    pub fn in_flight(&self) -> i64 {
        ["access", "housekeeping"]
            .iter()
            .map(|s| {
                self.in_flight
                    .get_or_create(&StageLabel {
                        stage: (*s).to_owned(),
                    })
                    .get()
            })
            .sum()
    }
    pub fn intake_request(&self, source: &str, code: u16) {
        self.intake_requests
            .get_or_create(&IntakeLabel {
                source: source.to_owned(),
                code: code.to_string(),
            })
            .inc();
    }
    pub fn intake_published(&self, source: &str, events: usize) {
        self.intake_published
            .get_or_create(&SourceLabel {
                source: source.to_owned(),
            })
            .inc_by(events as u64);
    }
    pub fn saga_handed_over(&self) {
        self.sagas_handed_over.inc();
    }
    /// A saga revoked access: count it against its SLA.
    pub fn sla_revocation(&self, met: bool) {
        self.sla_revocations
            .get_or_create(&ResultLabel {
                result: if met { "met" } else { "breached" }.to_owned(),
            })
            .inc();
    }
    pub fn sla_limit(&self, secs: u64) {
        self.sla_limit.set(i64::try_from(secs).unwrap_or(i64::MAX));
    }
    /// Counts a saga without revoked access, its clock started at `since`, until the guard
    /// is dropped.
    pub fn unrevoked(&self, since: chrono::DateTime<chrono::Utc>) -> UnrevokedGuard {
        let mut set = self
            .unrevoked
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        set.next += 1;
        let id = set.next;
        set.since.insert(id, since);
        UnrevokedGuard {
            id,
            set: self.unrevoked.clone(),
        }
    }
    pub fn broker_up(&self, up: bool) {
        self.broker_connected.set(i64::from(up));
    }
    pub fn broker_reconnected(&self) {
        self.broker_reconnects.inc();
    }
    pub fn cxone_request(&self, route: &str, status: u16, class: &str) {
        self.cxone_requests
            .get_or_create(&RouteLabel {
                route: route.to_owned(),
                status: status.to_string(),
                class: class.to_owned(),
            })
            .inc();
    }
    pub fn cxone_throttled(&self, class: &str) {
        self.cxone_throttled
            .get_or_create(&ClassLabel {
                class: class.to_owned(),
            })
            .inc();
    }
    pub fn cxone_rate(&self, rate: f64) {
        self.cxone_rate.set(rate);
    }
    pub fn saga_finished(&self, status: &str) {
        self.sagas
            .get_or_create(&StatusLabel {
                status: status.to_owned(),
            })
            .inc();
    }
    pub fn saga_held(&self) {
        self.sagas_held.inc();
    }
    pub fn saga_parked(&self) {
        self.sagas_parked.inc();
    }
    pub fn step_finished(&self, step: &str, seconds: f64) {
        self.step_seconds
            .get_or_create(&StepLabel {
                step: step.to_owned(),
            })
            .observe(seconds);
    }
    pub fn time_to_revoke(&self, seconds: f64) {
        self.time_to_revoke.observe(seconds);
    }
    pub fn drain_started(&self) {
        self.draining.set(1);
    }
    pub fn s3_request(&self, operation: &str) {
        self.s3_requests
            .get_or_create(&OperationLabel {
                operation: operation.to_owned(),
            })
            .inc();
    }
    pub fn outcome_unroutable(&self, routing_key: &str) {
        self.outcomes_unroutable
            .get_or_create(&RoutingKeyLabel {
                routing_key: routing_key.to_owned(),
            })
            .inc();
    }
    pub fn cxone_credentials_rejected(&self, rejected: bool) {
        self.cxone_credentials_rejected.set(i64::from(rejected));
    }
    pub fn quota_shared(&self, shared: bool) {
        self.quota_shared.set(i64::from(shared));
    }
    pub fn intake_paused(&self, paused: bool) {
        self.intake_paused.set(i64::from(paused));
    }
    pub fn quota_replicas(&self, replicas: usize) {
        self.quota_replicas
            .set(i64::try_from(replicas).unwrap_or(i64::MAX));
    }
    pub fn quota_fallback(&self) {
        self.quota_fallbacks.inc();
    }
    pub fn cxone_breaker_open(&self, open: bool) {
        self.cxone_breaker_open.set(i64::from(open));
    }
    pub fn control_headers_ignored(&self) {
        self.control_headers_ignored.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prefixed_names() {
        let m = Metrics::new();
        m.message_received();
        m.message_dead_lettered("invalid");
        let text = m.render();
        assert!(
            text.contains("offboard_messages_received_total 1"),
            "{text}"
        );
        assert!(
            text.contains("offboard_messages_dead_lettered_total{class=\"invalid\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("offboard_in_flight{stage=\"access\"} 0"),
            "{text}"
        );
    }
}
