//! The one CXone client of a process: every request goes breaker → limiter → token → HTTP,
//! with transient failures retried in place and every answer classified once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::Method;
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use tokio::time::Instant;
use url::Url;

use super::auth::{Auth, Endpoints};
use super::breaker::{Breaker, BreakerConfig};
use super::error::{CxoneError, ErrorKind, classify_status, describe_reqwest};
use super::limiter::Priority;
use super::quota::Quota;
use super::retry::{RetryPolicy, parse_retry_after};
use super::{
    AccessKey, Agent, AgentState, CallLog, ContactsPage, Cxone, Deactivation, Removal, ScimUser,
    SkillAssignment, SkillResult, User, UserFilter,
};
use crate::config::CxoneSettings;
use crate::metrics::Metrics;

/// Route templates: what errors, metrics and manifests name (never concrete ids).
pub mod routes {
    pub const USER_SEARCH: &str = "/user-management/v2/users/search";
    pub const USER_DEACTIVATE: &str = "/user-management/v1/users/deactivate";
    pub const USER_REVIVE: &str = "/user-management/v1/users/{userId}/revive";
    pub const AGENT: &str = "/inContactAPI/services/{version}/agents/{agentId}";
    pub const AGENT_STATES: &str = "/inContactAPI/services/{version}/agents/{agentId}/states";
    pub const AGENT_LOGOUT: &str = "/inContactAPI/services/{version}/agents/{agentId}/logout";
    pub const AGENT_SKILLS: &str = "/inContactAPI/services/{version}/agents/{agentId}/skills";
    pub const ACCESS_KEYS: &str = "/inContactAPI/services/{version}/access-keys";
    pub const ACCESS_KEY: &str = "/inContactAPI/services/{version}/access-keys/{accessKeyId}";
    pub const CONTACTS_COMPLETED: &str = "/inContactAPI/services/{version}/contacts/completed";
    pub const SCIM_USERS: &str = "/scim/v2/Users";
    pub const SCIM_USER: &str = "/scim/v2/Users/{id}";
}

/// The probe that closes an open circuit: a search that matches nobody.
const PROBE_EXTERNAL_ID: &str = "cxone-offboard-circuit-probe";

/// Largest error body excerpt kept in an error message.
const BODY_EXCERPT: usize = 200;

enum Body {
    Json(serde_json::Value),
    Scim(serde_json::Value),
}

struct Req {
    method: Method,
    route: &'static str,
    url: Url,
    body: Option<Body>,
    priority: Priority,
    /// Statuses handed back to the caller instead of being treated as errors (404 always is).
    pass: &'static [u16],
}

/// A 2xx, a 404 or a status listed in `pass`.
struct Answer {
    status: u16,
    body: Bytes,
}

impl Answer {
    fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

struct Inner {
    http: reqwest::Client,
    auth: Auth,
    limiter: Quota,
    breaker: Breaker,
    retry: RetryPolicy,
    version: String,
    metrics: Metrics,
    requests: AtomicU64,
    /// `Some(why)` while intake should pause: the circuit is open, or CXone refuses the key.
    pause: tokio::sync::watch::Sender<Option<String>>,
    /// CXone's token endpoint refused the access key (401/403).
    rejected: std::sync::atomic::AtomicBool,
    /// How often a refused key is read again and tried.
    credentials_retry: Duration,
}

/// What the consumer is told while intake should pause.
fn pause_reason(inner: &Inner) -> Option<String> {
    if inner.rejected.load(Ordering::SeqCst) {
        Some("CXone refused the access key".to_owned())
    } else if !inner.breaker.is_closed() {
        Some("CXone circuit open".to_owned())
    } else {
        None
    }
}

fn update_pause(inner: &Inner) {
    let reason = pause_reason(inner);
    inner.metrics.cxone_breaker_open(!inner.breaker.is_closed());
    inner.pause.send_if_modified(|current| {
        if *current == reason {
            false
        } else {
            *current = reason;
            true
        }
    });
}

/// Cheap to clone: all clones share one token, one limiter and one breaker.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    /// Where this handle records its requests (see [`Cxone::recording`]).
    log: Option<CallLog>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("auth", &self.inner.auth)
            .finish_non_exhaustive()
    }
}

fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let clean: String = text
        .chars()
        .filter(|c| !c.is_control())
        .take(BODY_EXCERPT)
        .collect();
    clean
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

impl Client {
    /// Builds the client from settings; credentials are required. Must run inside tokio.
    pub fn new(settings: &CxoneSettings, metrics: Metrics) -> anyhow::Result<Self> {
        let credentials = settings.credentials()?;
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            // Never follow a redirect: the token request carries the access key secret, and
            // every call carries the bearer token; both go only where configuration says.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(settings.request_timeout())
            .connect_timeout(settings.connect_timeout())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .user_agent(concat!("cxone-offboard/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &settings.ca_bundle {
            let pem = std::fs::read(path)
                .with_context(|| format!("reading cxone.ca_bundle {}", path.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("parsing cxone.ca_bundle {}", path.display()))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().context("building the HTTP client")?;
        let redis_url = settings.rate_limit.redis_url()?;
        let limiter = Quota::new(settings, redis_url.as_ref(), metrics.clone())?;
        metrics.cxone_rate(limiter.current_rate());
        let breaker = Breaker::new(BreakerConfig {
            failure_threshold: settings.breaker_failure_threshold,
            open_for: Duration::from_secs(settings.breaker_open_secs),
            max_open: Duration::from_secs(settings.breaker_open_secs.saturating_mul(8)),
        });
        let inner = Arc::new(Inner {
            auth: Auth::new(http.clone(), settings.clone(), credentials),
            http,
            limiter,
            breaker,
            retry: RetryPolicy {
                max_attempts: settings.max_attempts,
                max_elapsed: Duration::from_secs(settings.max_retry_elapsed_secs),
                ..RetryPolicy::default()
            },
            version: settings.admin_api_version.clone(),
            metrics,
            requests: AtomicU64::new(0),
            pause: tokio::sync::watch::channel(None).0,
            rejected: std::sync::atomic::AtomicBool::new(false),
            credentials_retry: Duration::from_secs(settings.credentials_retry_secs),
        });
        inner.metrics.cxone_credentials_rejected(false);
        inner.metrics.cxone_breaker_open(false);
        tokio::spawn(probe_loop(Arc::downgrade(&inner)));
        tokio::spawn(pause_loop(Arc::downgrade(&inner)));
        Ok(Self { inner, log: None })
    }

    /// `true` while the circuit is open.
    pub fn circuit_open(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.breaker.subscribe()
    }

    /// `Some(why)` while the consumer should take no new deliveries: the circuit is open, or
    /// CXone refuses the access key.
    pub fn intake_pause(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.inner.pause.subscribe()
    }

    /// CXone's token endpoint refused the key: pause intake (readiness stays), say what to fix
    /// once, and try the key again (read afresh) until it works. No saga fails for it.
    fn credentials_rejected(&self, e: &CxoneError) {
        let inner = &self.inner;
        if inner.rejected.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::error!(
            status = e.status,
            retry_secs = inner.credentials_retry.as_secs(),
            "CXone refused the access key at its token endpoint: intake is paused and no saga \
             is failed for it. Fix cxone.access_key_id / cxone.access_key_secret (or the file \
             cxone.access_key_secret_file names); the key is read again and tried every \
             retry_secs, and intake resumes by itself"
        );
        inner.metrics.cxone_credentials_rejected(true);
        update_pause(inner);
        tokio::spawn(credentials_loop(Arc::downgrade(inner)));
    }

    pub fn limiter(&self) -> &Quota {
        &self.inner.limiter
    }

    /// Token requests made so far.
    pub fn token_requests(&self) -> u64 {
        self.inner.auth.token_requests.load(Ordering::Relaxed)
    }

    /// API requests sent so far (every attempt).
    pub fn requests_sent(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// One UserHub search (`POST …/users/search`): the filter, a page, and whose turn it is.
    async fn search_users(
        &self,
        filter: serde_json::Value,
        skip: u64,
        top: u64,
        priority: Priority,
    ) -> Result<SearchAnswer, CxoneError> {
        let url = self
            .api_url(&["user-management", "v2", "users", "search"])
            .await?;
        let answer = self
            .send(Req {
                method: Method::POST,
                route: routes::USER_SEARCH,
                url,
                body: Some(Body::Json(
                    json!({ "filter": filter, "skip": skip, "top": top }),
                )),
                priority,
                pass: &[],
            })
            .await?;
        Self::must_exist("POST", routes::USER_SEARCH, &answer)?;
        self.parse("POST", routes::USER_SEARCH, &answer)
    }

    /// One page of every UserHub user (`reconcile`): `(totalRecords, users)`. Housekeeping
    /// priority: a reconciliation never delays a revocation.
    pub async fn users_page(&self, skip: u64, top: u64) -> Result<(u64, Vec<User>), CxoneError> {
        let parsed = self
            .search_users(json!({}), skip, top, Priority::Housekeeping)
            .await?;
        let total = parsed
            .total_records
            .unwrap_or(skip + parsed.users.len() as u64);
        Ok((total, parsed.users))
    }

    /// Gets a token and the endpoints: what `check` reports.
    pub async fn connect(&self) -> Result<Endpoints, CxoneError> {
        let endpoints = self.inner.auth.endpoints().await?.clone();
        self.inner.auth.token().await?;
        Ok(endpoints)
    }

    /// The endpoints, with a failure to authenticate classified (see [`Client::auth_failed`]).
    async fn endpoints(&self) -> Result<&Endpoints, CxoneError> {
        match self.inner.auth.endpoints().await {
            Ok(e) => Ok(e),
            Err(e) => Err(self.auth_failed(e)),
        }
    }

    /// Getting a token (or discovering the API host with one) failed. A refused key pauses
    /// intake; an outage counts for the breaker like any other failure, so an auth outage
    /// opens the circuit instead of burning every saga's retries. The saga sees a transient
    /// error either way: it parks and is not failed for it.
    fn auth_failed(&self, e: CxoneError) -> CxoneError {
        if matches!(e.status, Some(401 | 403)) {
            self.credentials_rejected(&e);
            return CxoneError::new(
                ErrorKind::Transient,
                e.method,
                e.route,
                e.status,
                "CXone refuses the access key; intake is paused until it is fixed",
            );
        }
        if e.is_transient() {
            self.inner.breaker.on_failure(Instant::now());
            update_pause(&self.inner);
        }
        e
    }

    async fn api_url(&self, segments: &[&str]) -> Result<Url, CxoneError> {
        let base = &self.endpoints().await?.api_base;
        Ok(extend(base, segments))
    }

    async fn admin_url(&self, segments: &[&str]) -> Result<Url, CxoneError> {
        let mut all = vec!["inContactAPI", "services", self.inner.version.as_str()];
        all.extend_from_slice(segments);
        self.api_url(&all).await
    }

    async fn scim_url(&self, segments: &[&str]) -> Result<Url, CxoneError> {
        let base = &self.endpoints().await?.scim_base;
        Ok(extend(base, segments))
    }

    fn record(&self, method: &Method, route: &'static str, status: u16, priority: Priority) {
        self.inner.requests.fetch_add(1, Ordering::Relaxed);
        self.inner
            .metrics
            .cxone_request(route, status, priority.as_str());
        if let Some(log) = &self.log {
            log.record(method.as_str(), route, status);
        }
    }

    /// Sends with retries. Returns 2xx, 404 and `pass` statuses; everything else is an error.
    ///
    /// Boxed: thousands of sagas may be parked at once, and each would otherwise carry the
    /// whole HTTP machinery inline in its future, waiting or not.
    async fn send(&self, req: Req) -> Result<Answer, CxoneError> {
        Box::pin(self.send_inner(req)).await
    }

    async fn send_inner(&self, req: Req) -> Result<Answer, CxoneError> {
        let inner = &self.inner;
        let method_name: &'static str = method_str(&req.method);
        let err = |kind, status, message: String| {
            CxoneError::new(kind, method_name, req.route, status, message)
        };
        let started = Instant::now();
        let mut attempts = 0u32;
        let mut refreshed = false;
        'call: loop {
            if !inner.breaker.allow(Instant::now()) {
                return Err(err(
                    ErrorKind::Transient,
                    None,
                    "circuit open: CXone has been failing; not calling it".to_owned(),
                ));
            }
            inner.limiter.acquire(req.priority).await;
            let failure: CxoneError = 'attempt: {
                let token = match inner.auth.token().await {
                    Ok(t) => t,
                    Err(e) => {
                        let refused = matches!(e.status, Some(401 | 403));
                        let e = self.auth_failed(e);
                        if e.is_transient() && !refused {
                            // An outage: retried in place like any transient failure.
                            break 'attempt e;
                        }
                        return Err(e);
                    }
                };
                let mut rb = inner
                    .http
                    .request(req.method.clone(), req.url.clone())
                    .bearer_auth(token.value.expose_secret())
                    .header("Accept", "application/json");
                match &req.body {
                    Some(Body::Json(v)) => rb = rb.json(v),
                    Some(Body::Scim(v)) => {
                        rb = rb
                            .header("Content-Type", "application/scim+json")
                            .body(v.to_string());
                    }
                    None => {}
                }
                match rb.send().await {
                    Err(e) => {
                        self.record(&req.method, req.route, 0, req.priority);
                        inner.breaker.on_failure(Instant::now());
                        err(ErrorKind::Transient, None, describe_reqwest(&e))
                    }
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        self.record(&req.method, req.route, status, req.priority);
                        let retry_after = resp
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| parse_retry_after(v, SystemTime::now()));
                        if (200..300).contains(&status)
                            || status == 404
                            || req.pass.contains(&status)
                        {
                            match resp.bytes().await {
                                // A garbled answer to a read is transport damage: retry it here.
                                Ok(body)
                                    if (req.method == Method::GET
                                        || req.route == routes::USER_SEARCH)
                                        && (200..300).contains(&status)
                                        && !body.is_empty()
                                        && serde_json::from_slice::<serde::de::IgnoredAny>(
                                            &body,
                                        )
                                        .is_err() =>
                                {
                                    inner.limiter.on_success();
                                    err(
                                        ErrorKind::Transient,
                                        Some(status),
                                        "malformed JSON in the answer".to_owned(),
                                    )
                                }
                                Ok(body) => {
                                    inner.limiter.on_success();
                                    inner.breaker.on_success();
                                    inner.metrics.cxone_rate(inner.limiter.current_rate());
                                    return Ok(Answer { status, body });
                                }
                                Err(e) => {
                                    inner.breaker.on_failure(Instant::now());
                                    err(ErrorKind::Transient, Some(status), describe_reqwest(&e))
                                }
                            }
                        } else if status == 401 {
                            if refreshed {
                                return Err(err(
                                    ErrorKind::Permanent,
                                    Some(401),
                                    "unauthorized even with a fresh token".to_owned(),
                                ));
                            }
                            inner.auth.invalidate(token.generation);
                            refreshed = true;
                            continue 'call;
                        } else if status == 429 {
                            inner.limiter.on_throttle(retry_after);
                            inner.metrics.cxone_throttled(req.priority.as_str());
                            inner.metrics.cxone_rate(inner.limiter.current_rate());
                            let mut e = err(
                                ErrorKind::Transient,
                                Some(429),
                                "throttled by CXone".to_owned(),
                            );
                            e.retry_after = retry_after;
                            // A 429 says "slow down", not "broken": bounded by time, not attempts.
                            // A pause that would outlast the step's budget ends the call now (the
                            // saga parks) instead of waiting it out.
                            let paused = inner
                                .limiter
                                .paused_until()
                                .map(|u| u.saturating_duration_since(Instant::now()))
                                .unwrap_or_default();
                            if started.elapsed() + paused >= inner.retry.max_elapsed {
                                return Err(e);
                            }
                            continue 'call;
                        } else {
                            let body = resp.bytes().await.unwrap_or_default();
                            let kind = classify_status(status);
                            let mut e = err(kind, Some(status), {
                                let text = excerpt(&body);
                                if text.is_empty() {
                                    "request failed".to_owned()
                                } else {
                                    text
                                }
                            });
                            e.retry_after = retry_after;
                            if kind == ErrorKind::Permanent {
                                // CXone answered: it is up.
                                inner.breaker.on_success();
                                return Err(e);
                            }
                            inner.breaker.on_failure(Instant::now());
                            e
                        }
                    }
                }
            };
            update_pause(inner);
            attempts += 1;
            if attempts >= inner.retry.max_attempts {
                return Err(failure);
            }
            let wait = inner
                .retry
                .backoff(attempts - 1)
                .max(failure.retry_after.unwrap_or_default());
            if started.elapsed() + wait > inner.retry.max_elapsed {
                return Err(failure);
            }
            tokio::time::sleep(wait).await;
        }
    }

    fn parse<T: serde::de::DeserializeOwned>(
        &self,
        method: &'static str,
        route: &'static str,
        answer: &Answer,
    ) -> Result<T, CxoneError> {
        serde_json::from_slice(&answer.body).map_err(|e| {
            // Garbled bodies are usually truncated in transit: worth another try.
            CxoneError::new(
                ErrorKind::Transient,
                method,
                route,
                Some(answer.status),
                format!("malformed JSON in the answer: {e}"),
            )
        })
    }

    fn must_exist(
        method: &'static str,
        route: &'static str,
        answer: &Answer,
    ) -> Result<(), CxoneError> {
        if answer.status == 404 {
            return Err(CxoneError::new(
                ErrorKind::Permanent,
                method,
                route,
                Some(404),
                "not found".to_owned(),
            ));
        }
        Ok(())
    }
}

fn method_str(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        _ => "OTHER",
    }
}

/// Appends path segments, each percent-encoded (`/`, `?`, `#`, `%` and `..` cannot escape).
fn extend(base: &Url, segments: &[&str]) -> Url {
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty();
        for s in segments {
            if *s == "." || *s == ".." {
                path.push(&s.replace('.', "%2E"));
            } else {
                path.push(s);
            }
        }
    }
    url
}

/// Keeps paging on the API host: a `_links.next` elsewhere is refused.
fn check_same_origin(base: &Url, next: &Url, route: &'static str) -> Result<(), CxoneError> {
    if next.scheme() == base.scheme()
        && next.host_str() == base.host_str()
        && next.port_or_known_default() == base.port_or_known_default()
    {
        Ok(())
    } else {
        Err(CxoneError::new(
            ErrorKind::Permanent,
            "GET",
            route,
            None,
            "paging link points outside the CXone API host".to_owned(),
        ))
    }
}

/// Follows the breaker into the intake pause.
async fn pause_loop(inner: Weak<Inner>) {
    let mut rx = match inner.upgrade() {
        Some(i) => i.breaker.subscribe(),
        None => return,
    };
    while rx.changed().await.is_ok() {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        update_pause(&strong);
    }
}

/// While CXone refuses the key: read it again and try it, until it is accepted.
async fn credentials_loop(inner: Weak<Inner>) {
    loop {
        let Some(wait) = inner.upgrade().map(|i| i.credentials_retry) else {
            return;
        };
        tokio::time::sleep(wait).await;
        let Some(strong) = inner.upgrade() else {
            return;
        };
        if let Err(e) = strong.auth.reload_credentials() {
            tracing::warn!(error = %e, "reading the CXone credentials again failed");
            continue;
        }
        match strong.auth.token().await {
            Ok(_) => {
                strong.rejected.store(false, Ordering::SeqCst);
                strong.metrics.cxone_credentials_rejected(false);
                update_pause(&strong);
                tracing::info!("CXone accepted the access key; intake resumes");
                return;
            }
            Err(e) => tracing::debug!(error = %e, "CXone still refuses the access key"),
        }
    }
}

async fn probe_loop(inner: Weak<Inner>) {
    let mut rx = match inner.upgrade() {
        Some(i) => i.breaker.subscribe(),
        None => return,
    };
    loop {
        if rx.wait_for(|open| *open).await.is_err() {
            return;
        }
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let until = strong.breaker.open_until();
        drop(strong);
        if let Some(until) = until {
            tokio::time::sleep_until(until).await;
        }
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let client = Client {
            inner: strong,
            log: None,
        };
        let result = client
            .find_users(UserFilter::ExternalIdentity(PROBE_EXTERNAL_ID))
            .await;
        tracing::info!(ok = result.is_ok(), "CXone circuit probe");
        drop(client);
        if result.is_err() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[derive(Deserialize)]
struct SearchAnswer {
    #[serde(default)]
    users: Vec<User>,
    #[serde(default, rename = "totalRecords")]
    total_records: Option<u64>,
}

#[derive(Deserialize)]
struct AgentsAnswer {
    #[serde(default)]
    agents: Vec<Agent>,
    #[serde(default)]
    agent: Option<Agent>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StatesAnswer {
    #[serde(default)]
    agent_states: Vec<AgentState>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeysAnswer {
    #[serde(default)]
    access_keys: Vec<AccessKey>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SkillsAnswer {
    #[serde(default)]
    agent_skill_assignments: Vec<SkillAssignment>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResultSet {
    #[serde(default)]
    skill_results: Vec<SkillResult>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RemoveAnswer {
    result_set: Option<ResultSet>,
}

#[derive(Deserialize)]
struct Links {
    #[serde(default)]
    next: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContactsAnswer<'a> {
    #[serde(default)]
    total_records: Option<u64>,
    #[serde(default, borrow)]
    completed_contacts: Vec<&'a RawValue>,
    #[serde(default, rename = "_links")]
    links: Option<Links>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeactivateAnswer {
    #[serde(default)]
    not_deleted_user_ids: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ScimList {
    #[serde(default)]
    resources: Vec<ScimUser>,
}

impl Cxone for Client {
    fn recording(&self, log: CallLog) -> Self {
        Self {
            inner: self.inner.clone(),
            log: Some(log),
        }
    }

    async fn find_users(&self, by: UserFilter<'_>) -> Result<Vec<User>, CxoneError> {
        let (key, value) = match by {
            UserFilter::ExternalIdentity(v) => ("externalIdentity", v),
            UserFilter::UserName(v) => ("userName", v),
            UserFilter::Email(v) => ("emailAddress", v),
        };
        let parsed = self
            .search_users(json!({ key: [value] }), 0, 10, Priority::Revoke)
            .await?;
        // Search may match loosely; keep exact matches only.
        Ok(parsed
            .users
            .into_iter()
            .filter(|u| match by {
                UserFilter::ExternalIdentity(v) => u.external_identity.as_deref() == Some(v),
                UserFilter::UserName(v) => u
                    .user_name
                    .as_deref()
                    .is_some_and(|n| n.eq_ignore_ascii_case(v)),
                UserFilter::Email(v) => u
                    .email_address
                    .as_deref()
                    .is_some_and(|n| n.eq_ignore_ascii_case(v)),
            })
            .collect())
    }

    async fn get_agent(&self, id: &str) -> Result<Option<Agent>, CxoneError> {
        let url = self.admin_url(&["agents", id]).await?;
        let answer = self
            .send(Req {
                method: Method::GET,
                route: routes::AGENT,
                url,
                body: None,
                priority: Priority::Revoke,
                pass: &[],
            })
            .await?;
        if answer.status == 404 || answer.status == 204 {
            return Ok(None);
        }
        let parsed: AgentsAnswer = self.parse("GET", routes::AGENT, &answer)?;
        Ok(parsed.agent.or_else(|| parsed.agents.into_iter().next()))
    }

    async fn set_agent_active(
        &self,
        agent_id: i64,
        active: bool,
        termination_date: Option<DateTime<Utc>>,
    ) -> Result<(), CxoneError> {
        let url = self.admin_url(&["agents", &agent_id.to_string()]).await?;
        let mut agent = json!({ "isActive": active });
        if let Some(t) = termination_date {
            agent["terminationDate"] = json!(rfc3339(t));
        }
        let answer = self
            .send(Req {
                method: Method::PUT,
                route: routes::AGENT,
                url,
                body: Some(Body::Json(json!({ "agent": agent }))),
                priority: if active {
                    Priority::Housekeeping
                } else {
                    Priority::Revoke
                },
                pass: &[],
            })
            .await?;
        Self::must_exist("PUT", routes::AGENT, &answer)
    }

    async fn scim_find(&self, external_id: &str) -> Result<Option<ScimUser>, CxoneError> {
        let mut url = self.scim_url(&["Users"]).await?;
        url.query_pairs_mut()
            .append_pair("filter", &format!("externalId eq \"{external_id}\""));
        let answer = self
            .send(Req {
                method: Method::GET,
                route: routes::SCIM_USERS,
                url,
                body: None,
                priority: Priority::Revoke,
                pass: &[],
            })
            .await?;
        if answer.status == 404 {
            return Ok(None);
        }
        let list: ScimList = self.parse("GET", routes::SCIM_USERS, &answer)?;
        Ok(list
            .resources
            .into_iter()
            .find(|u| u.external_id.as_deref().is_none_or(|e| e == external_id)))
    }

    async fn scim_set_active(&self, scim_id: &str, active: bool) -> Result<(), CxoneError> {
        let url = self.scim_url(&["Users", scim_id]).await?;
        let priority = if active {
            Priority::Housekeeping
        } else {
            Priority::Revoke
        };
        let patch = json!({
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{ "op": "replace", "path": "active", "value": active }],
        });
        let answer = self
            .send(Req {
                method: Method::PATCH,
                route: routes::SCIM_USER,
                url: url.clone(),
                body: Some(Body::Scim(patch)),
                priority,
                pass: &[405, 501],
            })
            .await?;
        if answer.is_success() {
            return Ok(());
        }
        if answer.status == 404 {
            return Err(CxoneError::new(
                ErrorKind::Permanent,
                "PATCH",
                routes::SCIM_USER,
                Some(404),
                "SCIM user not found",
            ));
        }
        // PATCH not supported: replace the whole resource.
        let current = self
            .send(Req {
                method: Method::GET,
                route: routes::SCIM_USER,
                url: url.clone(),
                body: None,
                priority,
                pass: &[],
            })
            .await?;
        Self::must_exist("GET", routes::SCIM_USER, &current)?;
        let mut resource: serde_json::Value = self.parse("GET", routes::SCIM_USER, &current)?;
        resource["active"] = json!(active);
        if let Some(obj) = resource.as_object_mut() {
            obj.remove("meta");
        }
        let put = self
            .send(Req {
                method: Method::PUT,
                route: routes::SCIM_USER,
                url,
                body: Some(Body::Scim(resource)),
                priority,
                pass: &[],
            })
            .await?;
        Self::must_exist("PUT", routes::SCIM_USER, &put)
    }

    async fn agent_state(&self, agent_id: i64) -> Result<Option<AgentState>, CxoneError> {
        let url = self
            .admin_url(&["agents", &agent_id.to_string(), "states"])
            .await?;
        let answer = self
            .send(Req {
                method: Method::GET,
                route: routes::AGENT_STATES,
                url,
                body: None,
                priority: Priority::Revoke,
                pass: &[],
            })
            .await?;
        if answer.status == 404 || answer.status == 204 {
            return Ok(None);
        }
        let parsed: StatesAnswer = self.parse("GET", routes::AGENT_STATES, &answer)?;
        Ok(parsed.agent_states.into_iter().next())
    }

    async fn logout(&self, agent_id: i64) -> Result<(), CxoneError> {
        let url = self
            .admin_url(&["agents", &agent_id.to_string(), "logout"])
            .await?;
        // A 404 means there is no session (or no agent) left to end: done.
        self.send(Req {
            method: Method::POST,
            route: routes::AGENT_LOGOUT,
            url,
            body: None,
            priority: Priority::Revoke,
            pass: &[],
        })
        .await
        .map(|_| ())
    }

    async fn access_keys(&self, agent_id: i64) -> Result<Vec<AccessKey>, CxoneError> {
        let mut url = self.admin_url(&["access-keys"]).await?;
        url.query_pairs_mut()
            .append_pair("agentId", &agent_id.to_string());
        let answer = self
            .send(Req {
                method: Method::GET,
                route: routes::ACCESS_KEYS,
                url,
                body: None,
                priority: Priority::Revoke,
                pass: &[],
            })
            .await?;
        if answer.status == 404 || answer.status == 204 {
            return Ok(Vec::new());
        }
        let parsed: KeysAnswer = self.parse("GET", routes::ACCESS_KEYS, &answer)?;
        Ok(parsed.access_keys)
    }

    async fn delete_access_key(&self, key_id: &str) -> Result<Removal, CxoneError> {
        let url = self.admin_url(&["access-keys", key_id]).await?;
        let answer = self
            .send(Req {
                method: Method::DELETE,
                route: routes::ACCESS_KEY,
                url,
                body: None,
                priority: Priority::Revoke,
                pass: &[],
            })
            .await?;
        Ok(if answer.status == 404 {
            Removal::AlreadyGone
        } else {
            Removal::Removed
        })
    }

    async fn agent_skills(&self, agent_id: i64) -> Result<Vec<SkillAssignment>, CxoneError> {
        let url = self
            .admin_url(&["agents", &agent_id.to_string(), "skills"])
            .await?;
        let answer = self
            .send(Req {
                method: Method::GET,
                route: routes::AGENT_SKILLS,
                url,
                body: None,
                priority: Priority::Housekeeping,
                pass: &[],
            })
            .await?;
        if answer.status == 404 || answer.status == 204 || answer.body.is_empty() {
            return Ok(Vec::new());
        }
        let parsed: SkillsAnswer = self.parse("GET", routes::AGENT_SKILLS, &answer)?;
        Ok(parsed.agent_skill_assignments)
    }

    async fn remove_skills(
        &self,
        agent_id: i64,
        skill_ids: &[i64],
    ) -> Result<Vec<SkillResult>, CxoneError> {
        let url = self
            .admin_url(&["agents", &agent_id.to_string(), "skills"])
            .await?;
        let skills: Vec<_> = skill_ids
            .iter()
            .map(|id| json!({ "skillId": id }))
            .collect();
        let answer = self
            .send(Req {
                method: Method::DELETE,
                route: routes::AGENT_SKILLS,
                url,
                body: Some(Body::Json(json!({ "skills": skills }))),
                priority: Priority::Housekeeping,
                pass: &[],
            })
            .await?;
        if answer.status == 404 || answer.body.is_empty() {
            // Nothing to remove any more (or no per-skill detail): treat all as removed.
            return Ok(skill_ids
                .iter()
                .map(|id| SkillResult {
                    skill_id: *id,
                    success: true,
                    error: None,
                })
                .collect());
        }
        let parsed: RemoveAnswer = self.parse("DELETE", routes::AGENT_SKILLS, &answer)?;
        Ok(parsed
            .result_set
            .map(|r| r.skill_results)
            .unwrap_or_default())
    }

    async fn assign_skills(
        &self,
        agent_id: i64,
        skills: &[SkillAssignment],
    ) -> Result<(), CxoneError> {
        let url = self
            .admin_url(&["agents", &agent_id.to_string(), "skills"])
            .await?;
        let body: Vec<_> = skills
            .iter()
            .map(|s| {
                let mut v = json!({ "skillId": s.skill_id, "isActive": s.is_active });
                if let Some(p) = s.proficiency {
                    v["proficiency"] = json!(p);
                }
                v
            })
            .collect();
        let answer = self
            .send(Req {
                method: Method::POST,
                route: routes::AGENT_SKILLS,
                url,
                body: Some(Body::Json(json!({ "skills": body }))),
                priority: Priority::Housekeeping,
                pass: &[],
            })
            .await?;
        Self::must_exist("POST", routes::AGENT_SKILLS, &answer)
    }

    async fn contacts_page(
        &self,
        agent_id: i64,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        next: Option<&Url>,
    ) -> Result<ContactsPage, CxoneError> {
        let api_base = self.inner.auth.endpoints().await?.api_base.clone();
        let url = match next {
            Some(n) => {
                check_same_origin(&api_base, n, routes::CONTACTS_COMPLETED)?;
                n.clone()
            }
            None => {
                let mut url = self.admin_url(&["contacts", "completed"]).await?;
                url.query_pairs_mut()
                    .append_pair("agentId", &agent_id.to_string())
                    .append_pair("startDate", &rfc3339(start))
                    .append_pair("endDate", &rfc3339(end))
                    .append_pair("skip", "0")
                    .append_pair("top", "100");
                url
            }
        };
        let answer = self
            .send(Req {
                method: Method::GET,
                route: routes::CONTACTS_COMPLETED,
                url,
                body: None,
                priority: Priority::Housekeeping,
                pass: &[],
            })
            .await?;
        if answer.status == 404 || answer.status == 204 || answer.body.is_empty() {
            return Ok(ContactsPage {
                records: Vec::new(),
                total: Some(0),
                next: None,
            });
        }
        let parsed: ContactsAnswer<'_> = serde_json::from_slice(&answer.body).map_err(|e| {
            CxoneError::new(
                ErrorKind::Transient,
                "GET",
                routes::CONTACTS_COMPLETED,
                Some(answer.status),
                format!("malformed JSON in the answer: {e}"),
            )
        })?;
        let next = match parsed.links.and_then(|l| l.next) {
            Some(n) if !n.is_empty() => {
                let url = api_base.join(&n).map_err(|_| {
                    CxoneError::new(
                        ErrorKind::Permanent,
                        "GET",
                        routes::CONTACTS_COMPLETED,
                        Some(answer.status),
                        "unparseable _links.next",
                    )
                })?;
                check_same_origin(&api_base, &url, routes::CONTACTS_COMPLETED)?;
                Some(url)
            }
            _ => None,
        };
        Ok(ContactsPage {
            records: parsed
                .completed_contacts
                .into_iter()
                .map(|r| r.to_owned())
                .collect(),
            total: parsed.total_records,
            next,
        })
    }

    async fn deactivate_user(&self, user_id: &str) -> Result<Deactivation, CxoneError> {
        let url = self
            .api_url(&["user-management", "v1", "users", "deactivate"])
            .await?;
        let answer = self
            .send(Req {
                method: Method::POST,
                route: routes::USER_DEACTIVATE,
                url,
                body: Some(Body::Json(json!({ "userIds": [user_id] }))),
                priority: Priority::Housekeeping,
                pass: &[],
            })
            .await?;
        Self::must_exist("POST", routes::USER_DEACTIVATE, &answer)?;
        if answer.body.is_empty() {
            return Ok(Deactivation::Deleted);
        }
        let parsed: DeactivateAnswer = self.parse("POST", routes::USER_DEACTIVATE, &answer)?;
        Ok(
            if parsed.not_deleted_user_ids.iter().any(|id| id == user_id) {
                Deactivation::Refused
            } else {
                Deactivation::Deleted
            },
        )
    }

    async fn revive_user(&self, user_id: &str) -> Result<(), CxoneError> {
        let url = self
            .api_url(&["user-management", "v1", "users", user_id, "revive"])
            .await?;
        let answer = self
            .send(Req {
                method: Method::POST,
                route: routes::USER_REVIVE,
                url,
                body: None,
                priority: Priority::Housekeeping,
                pass: &[],
            })
            .await?;
        Self::must_exist("POST", routes::USER_REVIVE, &answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_encoded() {
        let base = Url::parse("https://api.example.com/").expect("url");
        let u = extend(&base, &["agents", "../x"]);
        assert_eq!(u.as_str(), "https://api.example.com/agents/..%2Fx");
        let u = extend(&base, &["access-keys", "a/b?c#d%2e"]);
        assert_eq!(
            u.as_str(),
            "https://api.example.com/access-keys/a%2Fb%3Fc%23d%252e"
        );
        let u = extend(&base, &["agents", ".."]);
        assert!(!u.path().ends_with("/.."), "{u}");
        let base = Url::parse("https://api.example.com/prefix").expect("url");
        assert_eq!(
            extend(&base, &["a"]).as_str(),
            "https://api.example.com/prefix/a"
        );
    }

    #[test]
    fn paging_stays_on_the_api_host() {
        let base = Url::parse("https://api.example.com").expect("url");
        let ok = Url::parse("https://api.example.com/x?skip=100").expect("url");
        let bad = Url::parse("https://evil.example.com/x").expect("url");
        assert!(check_same_origin(&base, &ok, "r").is_ok());
        assert!(check_same_origin(&base, &bad, "r").is_err());
    }
}
