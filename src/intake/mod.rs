//! HTTP intake (CONTRACT §13): `POST /v1/sources/{name}/events` takes CloudEvents from HR
//! systems that send webhooks, signed with Standard Webhooks, and answers `202` only once the
//! broker has confirmed every event of the request on the events exchange. The worker serves
//! it when `intake.listen` is set; `cxone-offboard intake` serves it alone.
//!
//! Checks, in order: the source exists (404), the body fits 256 KiB (413), the content type is
//! a CloudEvents one (415), the signature is valid and fresh (401), the source is within its
//! rate (429), the `webhook-id` was not already accepted (202 again, nothing published; 409
//! when it came with another body), every
//! event is valid (400, all or none), the broker confirms them all (202; 503 otherwise).

pub mod binding;
pub mod publisher;
pub mod webhook;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use governor::clock::{Clock, DefaultClock};
use governor::{Quota, RateLimiter};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Settings;
use crate::event::Rules;
use crate::metrics::Metrics;

use self::publisher::Publisher;
use self::webhook::Verifier;

/// The largest request body (CONTRACT §13).
pub const MAX_BODY: usize = 256 * 1024;

type Limiter = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    DefaultClock,
    governor::middleware::NoOpMiddleware,
>;

struct Source {
    verifier: Verifier,
    limiter: Limiter,
}

/// Accepted `webhook-id`s of the last `replay_window_secs`, with the answer they got and the
/// SHA-256 of the body they came with.
#[derive(Default)]
struct Seen {
    answers: HashMap<(String, String), (Instant, Value, [u8; 32])>,
    order: VecDeque<(Instant, (String, String))>,
}

impl Seen {
    fn prune(&mut self, now: Instant) {
        while let Some((expires, _)) = self.order.front() {
            if *expires > now {
                break;
            }
            if let Some((_, key)) = self.order.pop_front()
                && self.answers.get(&key).is_some_and(|(e, _, _)| *e <= now)
            {
                self.answers.remove(&key);
            }
        }
    }
}

/// Everything a request needs.
pub struct Intake {
    sources: HashMap<String, Source>,
    rules: Rules,
    publisher: Publisher,
    seen: Mutex<Seen>,
    window: Duration,
    timeout: Duration,
    metrics: Metrics,
}

impl std::fmt::Debug for Intake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intake")
            .field("sources", &self.sources.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Intake {
    pub fn new(settings: &Settings, metrics: Metrics) -> anyhow::Result<Self> {
        let intake = &settings.intake;
        let mut sources = HashMap::new();
        for (name, s) in &intake.sources {
            let period = Duration::from_secs_f64(1.0 / s.requests_per_second);
            let quota = Quota::with_period(period)
                .context("intake source rate")?
                .allow_burst(NonZeroU32::new(s.burst).unwrap_or(NonZeroU32::MIN));
            sources.insert(
                name.clone(),
                Source {
                    verifier: Verifier::new(s.key(name)?, intake.timestamp_tolerance_secs),
                    limiter: RateLimiter::direct(quota),
                },
            );
        }
        Ok(Self {
            sources,
            rules: Rules::from_settings(settings),
            publisher: Publisher::new(&settings.amqp),
            seen: Mutex::new(Seen::default()),
            window: Duration::from_secs(intake.replay_window_secs),
            timeout: Duration::from_secs(intake.request_timeout_secs),
            metrics,
        })
    }
}

/// An `application/problem+json` answer (RFC 9457). Never carries a secret or a signature.
fn problem(status: StatusCode, slug: &str, detail: impl Into<String>, extra: Value) -> Response {
    let mut body = json!({
        "type": format!("urn:cxone-offboard:problem:{slug}"),
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "detail": detail.into(),
    });
    if let (Some(b), Value::Object(extra)) = (body.as_object_mut(), extra) {
        b.extend(extra);
    }
    let mut resp = (status, body.to_string()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    resp
}

fn accepted(body: &Value) -> Response {
    let mut resp = (StatusCode::ACCEPTED, body.to_string()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

pub fn router(intake: Arc<Intake>) -> Router {
    Router::new()
        .route("/v1/sources/{name}/events", post(post_events))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(intake)
}

async fn readyz(State(intake): State<Arc<Intake>>) -> Response {
    if intake.publisher.ready().await {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "broker unavailable\n").into_response()
    }
}

async fn metrics_text(State(intake): State<Arc<Intake>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        intake.metrics.render(),
    )
        .into_response()
}

async fn post_events(
    State(intake): State<Arc<Intake>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Unknown names are not labels: any string could be one.
    let label = if intake.sources.contains_key(&name) {
        name.clone()
    } else {
        "unknown".to_owned()
    };
    let resp = match tokio::time::timeout(intake.timeout, handle(&intake, &name, &headers, body))
        .await
    {
        Ok(resp) => resp,
        Err(_) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!(
                "the request did not complete within {} s; nothing is known to be published: retry it",
                intake.timeout.as_secs()
            ),
            Value::Null,
        ),
    };
    intake
        .metrics
        .intake_request(&label, resp.status().as_u16());
    resp
}

async fn handle(intake: &Intake, name: &str, headers: &HeaderMap, body: Body) -> Response {
    let Some(source) = intake.sources.get(name) else {
        return problem(
            StatusCode::NOT_FOUND,
            "unknown-source",
            "no such source is configured (intake.sources.<name>)",
            Value::Null,
        );
    };
    let too_large = || {
        problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            format!("the body is over {} KiB", MAX_BODY / 1024),
            json!({ "max_bytes": MAX_BODY }),
        )
    };
    if header_str(headers, "content-length")
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > MAX_BODY)
    {
        return too_large();
    }
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => return too_large(),
    };
    let mode = match binding::mode(headers) {
        Ok(m) => m,
        Err(media) => {
            return problem(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                format!(
                    "content type `{}` is not application/cloudevents+json, \
                     application/cloudevents-batch+json or application/json (binary mode)",
                    crate::event::truncate(&media, 100)
                ),
                Value::Null,
            );
        }
    };
    let id = header_str(headers, "webhook-id");
    let now = chrono::Utc::now().timestamp();
    if let Err(why) = source.verifier.verify(
        id,
        header_str(headers, "webhook-timestamp"),
        header_str(headers, "webhook-signature"),
        &body,
        now,
    ) {
        warn!(source = %name, %why, "webhook refused");
        let mut resp = problem(
            StatusCode::UNAUTHORIZED,
            "signature",
            why.to_string(),
            Value::Null,
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Standard-Webhooks"),
        );
        return resp;
    }
    let id = id.unwrap_or_default().to_owned();
    if let Err(not_until) = source.limiter.check() {
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let mut resp = problem(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            format!("this source sends faster than it may; retry in {secs} s"),
            Value::Null,
        );
        if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return resp;
    }
    let key = (name.to_owned(), id.clone());
    let body_digest: [u8; 32] = {
        use sha2::Digest as _;
        sha2::Sha256::digest(&body).into()
    };
    {
        let mut seen = lock(&intake.seen);
        seen.prune(Instant::now());
        if let Some((_, answer, digest)) = seen.answers.get(&key) {
            if *digest == body_digest {
                info!(source = %name, webhook_id = %id, "webhook-id seen before; answered again, nothing published");
                return accepted(answer);
            }
            // The same message id for another body: a sender bug, or someone replaying an id
            // with a body of their own (the signature covers both, so it is the sender's key).
            warn!(source = %name, webhook_id = %id, "webhook-id reused for another body; refused");
            return problem(
                StatusCode::CONFLICT,
                "webhook-id-reused",
                "this webhook-id was accepted within the replay window for another body; \
                 send new events with a new webhook-id",
                json!({ "field": "webhook-id" }),
            );
        }
    }
    let ready = match binding::events(mode, headers, &body, &intake.rules) {
        Ok(r) => r,
        Err(invalid) => {
            let mut extra = json!({ "field": invalid.field() });
            if let Some(i) = invalid.index {
                extra["index"] = json!(i);
            }
            return problem(
                StatusCode::BAD_REQUEST,
                "invalid-event",
                format!(
                    "{}: {} (nothing was published)",
                    invalid.field(),
                    invalid.error.reason
                ),
                extra,
            );
        }
    };
    let messages: Vec<(&str, &[u8])> = ready
        .iter()
        .map(|r| (r.routing_key, r.body.as_slice()))
        .collect();
    if let Err(e) = intake.publisher.publish_all(&messages).await {
        warn!(source = %name, webhook_id = %id, error = %e.0, "events not confirmed by the broker; answered 503");
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker-unavailable",
            format!(
                "the broker did not confirm every event ({}); retry the same request: event ids \
                 make a retry safe",
                e.public()
            ),
            Value::Null,
        );
    }
    intake.metrics.intake_published(name, ready.len());
    let answer = json!({
        "accepted": ready
            .iter()
            .map(|r| json!({ "id": r.event.id, "saga_id": r.event.saga_id() }))
            .collect::<Vec<_>>()
    });
    info!(source = %name, webhook_id = %id, events = ready.len(), "webhook accepted");
    let expires = Instant::now() + intake.window;
    let mut seen = lock(&intake.seen);
    seen.answers
        .insert(key.clone(), (expires, answer.clone(), body_digest));
    seen.order.push_back((expires, key));
    accepted(&answer)
}

/// Binds `intake.listen` and serves until `shutdown`; returns the bound address.
pub async fn serve(
    settings: &Settings,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listen = settings
        .intake
        .listen
        .as_deref()
        .context("intake.listen is not set")?;
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("intake.listen `{listen}`"))?;
    let intake = Arc::new(Intake::new(settings, metrics)?);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding intake.listen {addr}"))?;
    let local = listener.local_addr()?;
    let app = router(intake);
    let handle = tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = result {
            warn!(error = %e, "intake server stopped with an error");
        }
    });
    info!(%local, sources = settings.intake.sources.len(), "HTTP intake up: POST /v1/sources/<name>/events");
    Ok((local, handle))
}
