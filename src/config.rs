//! Settings: compiled-in defaults (`config/default.toml`), an optional `--config` file, then
//! `OFFBOARD__SECTION__KEY` environment variables; validated once at load.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// The defaults, compiled in so the binary behaves the same wherever it runs.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Prefix of environment overrides: `OFFBOARD__AMQP__URL` sets `amqp.url`.
pub const ENV_PREFIX: &str = "OFFBOARD";

/// A setting that is missing, malformed or out of range. Always names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("configuration: {0}")]
    Load(String),
}

impl ConfigError {
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub amqp: AmqpSettings,
    pub s3: S3Settings,
    pub cxone: CxoneSettings,
    #[serde(default)]
    pub hris: HrisSettings,
    pub guard: GuardSettings,
    pub safety: SafetySettings,
    pub replay: ReplaySettings,
    pub sla: SlaSettings,
    pub worker: WorkerSettings,
    pub http: HttpSettings,
    pub log: LogSettings,
    #[serde(default)]
    pub intake: IntakeSettings,
}

/// HTTP intake of signed CloudEvents webhooks (CONTRACT §13).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntakeSettings {
    /// Unset: no HTTP intake.
    #[serde(default)]
    pub listen: Option<String>,
    #[serde(default)]
    pub sources: BTreeMap<String, IntakeSource>,
    /// A request (body read, checks, broker confirms) that takes longer fails.
    #[serde(default = "default_intake_timeout")]
    pub request_timeout_secs: u64,
    /// A `webhook-id` seen again within this long is answered without publishing again.
    #[serde(default = "default_replay_window")]
    pub replay_window_secs: u64,
    /// A `webhook-timestamp` further than this from now is refused (Standard Webhooks: 5 min).
    #[serde(default = "default_timestamp_tolerance")]
    pub timestamp_tolerance_secs: u64,
}

impl Default for IntakeSettings {
    fn default() -> Self {
        Self {
            listen: None,
            sources: BTreeMap::new(),
            request_timeout_secs: default_intake_timeout(),
            replay_window_secs: default_replay_window(),
            timestamp_tolerance_secs: default_timestamp_tolerance(),
        }
    }
}

fn default_intake_timeout() -> u64 {
    10
}
fn default_replay_window() -> u64 {
    600
}
fn default_timestamp_tolerance() -> u64 {
    300
}

/// One HR system allowed to post events.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntakeSource {
    /// The Standard Webhooks signing secret (`whsec_` + base64). Secret: never logged.
    pub secret: Option<SecretString>,
    pub secret_file: Option<PathBuf>,
    /// Requests per second this source may send (429 with Retry-After beyond).
    #[serde(default = "default_source_rps")]
    pub requests_per_second: f64,
    #[serde(default = "default_source_burst")]
    pub burst: u32,
}

fn default_source_rps() -> f64 {
    20.0
}
fn default_source_burst() -> u32 {
    40
}

impl IntakeSource {
    /// The HMAC key: the base64 after `whsec_`, decoded.
    pub fn key(&self, name: &str) -> Result<Vec<u8>, ConfigError> {
        use base64::Engine as _;
        let field = format!("intake.sources.{name}.secret");
        let secret = read_secret(&field, self.secret.as_ref(), self.secret_file.as_deref())?
            .ok_or_else(|| ConfigError::invalid(&field, "is required (whsec_ + base64)"))?;
        let raw = secret.expose_secret();
        let b64 = raw.strip_prefix("whsec_").unwrap_or(raw);
        let key = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| {
                ConfigError::invalid(&field, "is not whsec_ followed by base64 (value not shown)")
            })?;
        if key.len() < 16 {
            return Err(ConfigError::invalid(
                &field,
                "is too short: at least 16 bytes of key after whsec_ (value not shown)",
            ));
        }
        Ok(key)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    /// The broker URL; it usually carries a password, so it is a secret.
    pub url: SecretString,
    pub prefetch: u16,
    pub events_exchange: String,
    pub requests_queue: String,
    pub requests_binding: String,
    pub dead_letter_exchange: String,
    pub dead_queue: String,
    pub outcomes_exchange: String,
    pub held_queue: String,
    /// The second stage's queue (CONTRACT §11).
    pub housekeeping_queue: String,
    /// basic.qos prefetch for the housekeeping queue.
    pub housekeeping_prefetch: u16,
    pub delay_queue_prefix: String,
    pub delivery_limit: u32,
    /// Signs the worker's own control headers (the trust boundary, CONTRACT §2). Unset: a
    /// random key is created once in the bucket and shared by every replica.
    pub control_key: Option<SecretString>,
    pub control_key_file: Option<PathBuf>,
    pub reconnect_initial_ms: u64,
    pub reconnect_max_ms: u64,
}

impl AmqpSettings {
    /// The URL(s) with any password replaced, fit for logs and error messages; several nodes
    /// of a cluster are joined with `,` as configured.
    pub fn redacted_url(&self) -> String {
        self.node_urls()
            .iter()
            .map(|u| redact_url(u))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The nodes of `amqp.url`: one URL, or several comma-separated URLs of one cluster, in
    /// the order given. Secret: each may carry a password.
    pub fn node_urls(&self) -> Vec<&str> {
        self.url
            .expose_secret()
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }

    /// The configured control-header key material, if any.
    pub fn control_key(&self) -> Result<Option<SecretString>, ConfigError> {
        read_secret(
            "amqp.control_key",
            self.control_key.as_ref(),
            self.control_key_file.as_deref(),
        )
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Settings {
    pub bucket: String,
    pub endpoint: Option<String>,
    pub region: String,
    /// Object Lock mode for manifests: `GOVERNANCE` or `COMPLIANCE`; unset = no lock.
    pub object_lock_mode: Option<String>,
    pub object_lock_days: Option<u32>,
    /// Bounds on every S3 request: a server that stops answering fails the request
    /// (transient) instead of holding a saga and a request slot forever.
    pub connect_timeout_secs: u64,
    pub read_timeout_secs: u64,
    pub attempt_timeout_secs: u64,
    pub operation_timeout_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockLogin {
    /// `PUT /agents/{id}` with `isActive: false`.
    Agent,
    /// SCIM `PATCH /Users/{id}` with `active: false`.
    Scim,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CxoneSettings {
    pub issuer: String,
    pub api_base_url: Option<String>,
    pub auth_base_url: Option<String>,
    pub access_key_id: Option<String>,
    pub access_key_secret: Option<SecretString>,
    pub access_key_secret_file: Option<PathBuf>,
    pub admin_api_version: String,
    pub block_login: BlockLogin,
    pub scim_base_url: Option<String>,
    pub auth_flow: AuthFlow,
    pub client_id: Option<String>,
    pub client_secret: Option<SecretString>,
    pub ca_bundle: Option<PathBuf>,
    pub request_timeout_secs: u64,
    pub connect_timeout_secs: u64,
    pub max_attempts: u32,
    pub max_retry_elapsed_secs: u64,
    pub breaker_failure_threshold: u32,
    pub breaker_open_secs: u64,
    /// While CXone refuses the access key, it is read again and tried this often.
    pub credentials_retry_secs: u64,
    pub rate_limit: RateLimitSettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthFlow {
    /// `POST {auth}/authentication/v1/token/access-key`.
    AccessKey,
    /// OAuth2 password grant with the access key as username/password.
    Password,
}

/// The CXone credentials, present and non-empty.
#[derive(Clone)]
pub struct CxoneCredentials {
    pub access_key_id: String,
    pub access_key_secret: SecretString,
}

impl std::fmt::Debug for CxoneCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CxoneCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("access_key_secret", &"[REDACTED]")
            .finish()
    }
}

impl CxoneSettings {
    /// The access key, required by every command that talks to CXone.
    pub fn credentials(&self) -> Result<CxoneCredentials, ConfigError> {
        let id = self
            .access_key_id
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                ConfigError::invalid(
                    "cxone.access_key_id",
                    "is required (set OFFBOARD__CXONE__ACCESS_KEY_ID)",
                )
            })?;
        let secret = read_secret(
            "cxone.access_key_secret",
            self.access_key_secret.as_ref(),
            self.access_key_secret_file.as_deref(),
        )?
        .ok_or_else(|| {
            ConfigError::invalid(
                "cxone.access_key_secret",
                "is required (set OFFBOARD__CXONE__ACCESS_KEY_SECRET or cxone.access_key_secret_file)",
            )
        })?;
        Ok(CxoneCredentials {
            access_key_id: id.to_owned(),
            access_key_secret: secret,
        })
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    pub requests_per_second: f64,
    pub burst: u32,
    /// The longest pause one 429 may cause, whatever its `Retry-After` says.
    pub max_retry_after_secs: u64,
    /// One token bucket for the tenant in Redis, shared by every replica (CONTRACT §11).
    /// May carry a password: never logged.
    #[serde(default)]
    pub redis_url: Option<SecretString>,
    #[serde(default)]
    pub redis_url_file: Option<PathBuf>,
    /// The Redis key prefix of the bucket. Unset: derived from the CXone tenant (the API host
    /// and access key id, hashed), so deployments of different tenants never share a bucket.
    #[serde(default)]
    pub redis_key: Option<String>,
    /// One Redis round trip slower than this counts as Redis being down: the worker falls
    /// back to its own limiter.
    #[serde(default = "default_redis_timeout_ms")]
    pub redis_timeout_ms: u64,
}

fn default_redis_timeout_ms() -> u64 {
    300
}

impl RateLimitSettings {
    /// The shared-bucket URL, if one is configured.
    pub fn redis_url(&self) -> Result<Option<SecretString>, ConfigError> {
        read_secret(
            "cxone.rate_limit.redis_url",
            self.redis_url.as_ref(),
            self.redis_url_file.as_deref(),
        )
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HrisSettings {
    #[serde(default)]
    pub endpoints: BTreeMap<String, HrisEndpoint>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HrisEndpoint {
    pub url: String,
    pub secret: Option<SecretString>,
    pub secret_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardSettings {
    pub max_destructive_per_window: u32,
    pub window_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SafetySettings {
    pub max_live_contact_wait_secs: u64,
    pub live_contact_poll_secs: u64,
    pub immediate_reasons: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplaySettings {
    pub max_count: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlaSettings {
    /// Access must be gone this long after `effective_at` (or the event's arrival).
    pub revoke_within_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    pub max_in_flight: usize,
    /// Sagas at once in the housekeeping stage (archives, deletion, evidence).
    pub housekeeping_max_in_flight: usize,
    /// One delivery archives for at most this long, then continues in a fresh one (well
    /// within RabbitMQ's `consumer_timeout`, 30 minutes by default).
    pub archive_slice_secs: u64,
    pub shutdown_grace_secs: u64,
    pub max_event_bytes: usize,
    pub archive_lookback_days: u32,
    pub retry_delays_secs: Vec<u64>,
    pub schedule_buckets_secs: Vec<u64>,
}

impl WorkerSettings {
    /// Every delay queue the worker needs: retries, schedule buckets and the live-call poll.
    pub fn all_delays(&self, safety: &SafetySettings) -> Vec<u64> {
        let mut all: Vec<u64> = self
            .retry_delays_secs
            .iter()
            .chain(&self.schedule_buckets_secs)
            .copied()
            .chain(std::iter::once(safety.live_contact_poll_secs))
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}

impl WorkerSettings {
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub listen: String,
}

impl HttpSettings {
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen
            .parse()
            .map_err(|e| ConfigError::invalid("http.listen", format!("`{}`: {e}", self.listen)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Auto,
    Json,
    Text,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub filter: String,
}

impl Settings {
    /// Loads defaults, then `file` if given, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// Like [`Settings::load`] with an explicit environment (tests use this).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::Load(format!(
                    "--config {}: no such file",
                    path.display()
                )));
            }
            builder = builder.add_source(
                config::File::from(path.to_path_buf()).format(config::FileFormat::Toml),
            );
        }
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("safety.immediate_reasons")
                .with_list_parse_key("worker.retry_delays_secs")
                .with_list_parse_key("worker.schedule_buckets_secs")
                .try_parsing(true)
                .source(Some(env)),
        );
        let raw = builder.build().map_err(map_config_error)?;
        let settings: Settings = raw.try_deserialize().map_err(map_config_error)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Range and shape checks that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let a = &self.amqp;
        let nodes = a.node_urls();
        if nodes.is_empty() {
            return Err(ConfigError::invalid(
                "amqp.url",
                "is empty: one amqp:// URL, or several comma-separated URLs of one cluster",
            ));
        }
        for node in nodes {
            check_url("amqp.url", node, &["amqp", "amqps"])?;
        }
        positive("amqp.prefetch", u64::from(a.prefetch))?;
        positive("amqp.delivery_limit", u64::from(a.delivery_limit))?;
        positive(
            "amqp.housekeeping_prefetch",
            u64::from(a.housekeeping_prefetch),
        )?;
        if let Some(key) = a.control_key()?
            && key.expose_secret().len() < 16
        {
            return Err(ConfigError::invalid(
                "amqp.control_key",
                "must be at least 16 characters of secret material",
            ));
        }
        positive("amqp.reconnect_initial_ms", a.reconnect_initial_ms)?;
        if a.reconnect_max_ms < a.reconnect_initial_ms {
            return Err(ConfigError::invalid(
                "amqp.reconnect_max_ms",
                "must be at least amqp.reconnect_initial_ms",
            ));
        }
        for (key, name) in [
            ("amqp.events_exchange", &a.events_exchange),
            ("amqp.requests_queue", &a.requests_queue),
            ("amqp.requests_binding", &a.requests_binding),
            ("amqp.dead_letter_exchange", &a.dead_letter_exchange),
            ("amqp.dead_queue", &a.dead_queue),
            ("amqp.outcomes_exchange", &a.outcomes_exchange),
            ("amqp.held_queue", &a.held_queue),
            ("amqp.housekeeping_queue", &a.housekeeping_queue),
            ("amqp.delay_queue_prefix", &a.delay_queue_prefix),
        ] {
            if name.is_empty() || name.len() > 200 {
                return Err(ConfigError::invalid(key, "must be 1-200 characters"));
            }
        }

        let bucket = &self.s3.bucket;
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            && !bucket.starts_with(['-', '.'])
            && !bucket.ends_with(['-', '.']);
        if !valid_bucket {
            return Err(ConfigError::invalid(
                "s3.bucket",
                format!("`{bucket}` is not a valid bucket name (3-63 of a-z 0-9 . -)"),
            ));
        }
        if let Some(endpoint) = &self.s3.endpoint {
            check_url("s3.endpoint", endpoint, &["http", "https"])?;
        }
        match (&self.s3.object_lock_mode, self.s3.object_lock_days) {
            (None, None) => {}
            (Some(mode), Some(days)) => {
                if mode != "GOVERNANCE" && mode != "COMPLIANCE" {
                    return Err(ConfigError::invalid(
                        "s3.object_lock_mode",
                        format!("`{mode}` is not GOVERNANCE or COMPLIANCE"),
                    ));
                }
                if !(1..=36_500).contains(&days) {
                    return Err(ConfigError::invalid(
                        "s3.object_lock_days",
                        "must be 1-36500",
                    ));
                }
            }
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "s3.object_lock_days",
                    "is required with s3.object_lock_mode",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "s3.object_lock_mode",
                    "is required with s3.object_lock_days",
                ));
            }
        }
        if self.s3.region.trim().is_empty() {
            return Err(ConfigError::invalid("s3.region", "must not be empty"));
        }
        positive("s3.connect_timeout_secs", self.s3.connect_timeout_secs)?;
        positive("s3.read_timeout_secs", self.s3.read_timeout_secs)?;
        positive("s3.attempt_timeout_secs", self.s3.attempt_timeout_secs)?;
        positive("s3.operation_timeout_secs", self.s3.operation_timeout_secs)?;
        if self.s3.operation_timeout_secs < self.s3.attempt_timeout_secs {
            return Err(ConfigError::invalid(
                "s3.operation_timeout_secs",
                "must be at least s3.attempt_timeout_secs",
            ));
        }
        positive("sla.revoke_within_secs", self.sla.revoke_within_secs)?;

        let c = &self.cxone;
        check_url("cxone.issuer", &c.issuer, &["http", "https"])?;
        for (key, value) in [
            ("cxone.api_base_url", &c.api_base_url),
            ("cxone.auth_base_url", &c.auth_base_url),
            ("cxone.scim_base_url", &c.scim_base_url),
        ] {
            if let Some(v) = value {
                check_url(key, v, &["http", "https"])?;
            }
        }
        let version_ok = c.admin_api_version.starts_with('v')
            && c.admin_api_version.len() <= 16
            && c.admin_api_version[1..]
                .chars()
                .all(|ch| ch.is_ascii_digit() || ch == '.')
            && c.admin_api_version.len() > 1;
        if !version_ok {
            return Err(ConfigError::invalid(
                "cxone.admin_api_version",
                format!("`{}` is not like v31.0", c.admin_api_version),
            ));
        }
        positive("cxone.request_timeout_secs", c.request_timeout_secs)?;
        positive("cxone.max_attempts", u64::from(c.max_attempts))?;
        positive("cxone.max_retry_elapsed_secs", c.max_retry_elapsed_secs)?;
        positive(
            "cxone.breaker_failure_threshold",
            u64::from(c.breaker_failure_threshold),
        )?;
        positive("cxone.breaker_open_secs", c.breaker_open_secs)?;
        if let Some(ca) = &c.ca_bundle
            && !ca.is_file()
        {
            return Err(ConfigError::invalid(
                "cxone.ca_bundle",
                format!("{} is not a readable file", ca.display()),
            ));
        }
        if c.auth_flow == AuthFlow::Password && c.client_id.as_deref().is_none_or(str::is_empty) {
            return Err(ConfigError::invalid(
                "cxone.client_id",
                "is required when cxone.auth_flow = \"password\"",
            ));
        }
        positive("cxone.connect_timeout_secs", c.connect_timeout_secs)?;
        let rps = c.rate_limit.requests_per_second;
        if !(rps.is_finite() && rps > 0.0 && rps <= 100_000.0) {
            return Err(ConfigError::invalid(
                "cxone.rate_limit.requests_per_second",
                "must be a number above 0 and at most 100000",
            ));
        }
        positive("cxone.rate_limit.burst", u64::from(c.rate_limit.burst))?;
        positive(
            "cxone.rate_limit.max_retry_after_secs",
            c.rate_limit.max_retry_after_secs,
        )?;
        positive("cxone.credentials_retry_secs", c.credentials_retry_secs)?;
        if let Some(url) = c.rate_limit.redis_url()? {
            let scheme = url.expose_secret().split("://").next().unwrap_or_default();
            // The message never repeats the URL: it may hold a password.
            if !matches!(scheme, "redis" | "rediss" | "redis+unix" | "unix")
                || redis::Client::open(url.expose_secret()).is_err()
            {
                return Err(ConfigError::invalid(
                    "cxone.rate_limit.redis_url",
                    "is not a Redis URL (redis://[:password@]host[:port][/db] or rediss://…)",
                ));
            }
        }
        if let Some(key) = &c.rate_limit.redis_key
            && (key.is_empty()
                || key.len() > 200
                || key.chars().any(|ch| ch.is_control() || ch.is_whitespace()))
        {
            return Err(ConfigError::invalid(
                "cxone.rate_limit.redis_key",
                "must be 1 to 200 characters without spaces or control characters",
            ));
        }
        if !(10..=10_000).contains(&c.rate_limit.redis_timeout_ms) {
            return Err(ConfigError::invalid(
                "cxone.rate_limit.redis_timeout_ms",
                "must be between 10 and 10000",
            ));
        }

        for (name, endpoint) in &self.hris.endpoints {
            let key = format!("hris.endpoints.{name}");
            if name.is_empty()
                || !name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
            {
                return Err(ConfigError::invalid(
                    key,
                    "endpoint names are letters, digits, '_' and '-'",
                ));
            }
            check_url(&format!("{key}.url"), &endpoint.url, &["http", "https"])?;
            if endpoint.secret()?.is_none() {
                return Err(ConfigError::invalid(
                    format!("{key}.secret"),
                    "is required to sign webhooks",
                ));
            }
        }

        if let Some(listen) = &self.intake.listen {
            listen
                .parse::<SocketAddr>()
                .map_err(|e| ConfigError::invalid("intake.listen", format!("`{listen}`: {e}")))?;
            if self.intake.sources.is_empty() {
                return Err(ConfigError::invalid(
                    "intake.sources",
                    "at least one source is needed when intake.listen is set",
                ));
            }
        }
        for (name, source) in &self.intake.sources {
            if name.is_empty()
                || !name.chars().all(|ch| {
                    ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_' || ch == '-'
                })
            {
                return Err(ConfigError::invalid(
                    format!("intake.sources.{name}"),
                    "source names are lower-case letters, digits, '_' and '-'",
                ));
            }
            source.key(name)?;
            let rps = source.requests_per_second;
            if !(rps.is_finite() && rps > 0.0) {
                return Err(ConfigError::invalid(
                    format!("intake.sources.{name}.requests_per_second"),
                    "must be a number above 0",
                ));
            }
            positive(
                &format!("intake.sources.{name}.burst"),
                u64::from(source.burst),
            )?;
        }
        positive(
            "intake.request_timeout_secs",
            self.intake.request_timeout_secs,
        )?;
        positive("intake.replay_window_secs", self.intake.replay_window_secs)?;
        positive(
            "intake.timestamp_tolerance_secs",
            self.intake.timestamp_tolerance_secs,
        )?;

        positive(
            "guard.max_destructive_per_window",
            u64::from(self.guard.max_destructive_per_window),
        )?;
        positive("guard.window_secs", self.guard.window_secs)?;
        positive("worker.max_in_flight", self.worker.max_in_flight as u64)?;
        positive(
            "worker.housekeeping_max_in_flight",
            self.worker.housekeeping_max_in_flight as u64,
        )?;
        positive("worker.archive_slice_secs", self.worker.archive_slice_secs)?;
        if self.worker.max_in_flight > 10_000 {
            return Err(ConfigError::invalid(
                "worker.max_in_flight",
                "must be at most 10000",
            ));
        }
        positive("worker.max_event_bytes", self.worker.max_event_bytes as u64)?;
        if !(1..=3650).contains(&self.worker.archive_lookback_days) {
            return Err(ConfigError::invalid(
                "worker.archive_lookback_days",
                "must be 1-3650",
            ));
        }
        if self.worker.retry_delays_secs.is_empty()
            || self
                .worker
                .retry_delays_secs
                .iter()
                .any(|d| *d == 0 || *d > 86_400)
        {
            return Err(ConfigError::invalid(
                "worker.retry_delays_secs",
                "must list 1 or more delays of 1-86400 seconds",
            ));
        }
        if self.worker.schedule_buckets_secs.is_empty()
            || self
                .worker
                .schedule_buckets_secs
                .iter()
                .any(|d| *d == 0 || *d > 86_400)
        {
            return Err(ConfigError::invalid(
                "worker.schedule_buckets_secs",
                "must list 1 or more buckets of 1-86400 seconds",
            ));
        }
        if !(1..=3600).contains(&self.safety.live_contact_poll_secs) {
            return Err(ConfigError::invalid(
                "safety.live_contact_poll_secs",
                "must be 1-3600",
            ));
        }
        self.http.listen_addr()?;
        Ok(())
    }

    /// Human-readable summary of the effective settings, secrets redacted.
    pub fn summary(&self) -> String {
        format!(
            "amqp {} (queue {}), s3 {}{}, cxone {}",
            self.amqp.redacted_url(),
            self.amqp.requests_queue,
            self.s3.bucket,
            self.s3
                .endpoint
                .as_deref()
                .map(|e| format!(" at {e}"))
                .unwrap_or_default(),
            self.cxone
                .api_base_url
                .as_deref()
                .unwrap_or(self.cxone.issuer.as_str()),
        )
    }
}

impl HrisEndpoint {
    pub fn secret(&self) -> Result<Option<SecretString>, ConfigError> {
        read_secret(
            "hris.endpoints.*.secret",
            self.secret.as_ref(),
            self.secret_file.as_deref(),
        )
    }
}

fn read_secret(
    key: &str,
    inline: Option<&SecretString>,
    file: Option<&Path>,
) -> Result<Option<SecretString>, ConfigError> {
    if let Some(s) = inline
        && !s.expose_secret().trim().is_empty()
    {
        return Ok(Some(s.clone()));
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::invalid(format!("{key}_file"), format!("{}: {e}", path.display()))
        })?;
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(ConfigError::invalid(
                format!("{key}_file"),
                format!("{} is empty", path.display()),
            ));
        }
        return Ok(Some(SecretString::from(trimmed.to_owned())));
    }
    Ok(None)
}

fn positive(key: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::invalid(key, "must be greater than 0"));
    }
    Ok(())
}

fn check_url(key: &str, value: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    match url::Url::parse(value) {
        Ok(u) if schemes.contains(&u.scheme()) && u.host_str().is_some() => Ok(()),
        Ok(u) => Err(ConfigError::invalid(
            key,
            format!(
                "`{}`: scheme must be one of {} with a host",
                redact_url(value),
                schemes
                    .join(", ")
                    .replace(&u.scheme().to_string(), u.scheme())
            ),
        )),
        Err(e) => Err(ConfigError::invalid(
            key,
            format!("`{}` is not a URL: {e}", redact_url(value)),
        )),
    }
}

/// Replaces the password of a URL, if any, with `***`.
pub fn redact_url(value: &str) -> String {
    match url::Url::parse(value) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparseable url>".to_owned(),
    }
}

/// The `config` crate names the key in its messages; keep them, and never echo a secret value.
fn map_config_error(err: config::ConfigError) -> ConfigError {
    let text = err.to_string();
    match extract_key(&text) {
        Some(key) => {
            let message = text
                .replace(&format!(" for key `{key}`"), "")
                .replace(&format!(" for key \"{key}\""), "");
            ConfigError::Invalid { key, message }
        }
        None => ConfigError::Load(text),
    }
}

fn extract_key(text: &str) -> Option<String> {
    for (open, close) in [("for key `", '`'), ("for key \"", '"')] {
        if let Some(start) = text.find(open) {
            let rest = &text[start + open.len()..];
            if let Some(end) = rest.find(close) {
                return Some(rest[..end].to_owned());
            }
        }
    }
    if let Some(rest) = text.strip_prefix("unknown field `") {
        return rest.split('`').next().map(str::to_owned);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::load_from(
            None,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn defaults_match_the_contract() {
        let s = load(&[]).expect("defaults load");
        assert_eq!(
            s.amqp.url.expose_secret(),
            "amqp://guest:guest@127.0.0.1:5672/%2f"
        );
        assert_eq!(s.amqp.prefetch, 32);
        assert_eq!(s.s3.bucket, "cxone-offboard");
        assert_eq!(s.s3.region, "us-east-1");
        assert!(s.s3.endpoint.is_none());
        assert_eq!(s.cxone.issuer, "https://cxone.niceincontact.com");
        assert_eq!(s.cxone.admin_api_version, "v31.0");
        assert_eq!(s.cxone.block_login, BlockLogin::Agent);
        assert_eq!(s.cxone.rate_limit.requests_per_second, 10.0);
        assert_eq!(s.cxone.rate_limit.burst, 20);
        assert_eq!(s.guard.max_destructive_per_window, 500);
        assert_eq!(s.guard.window_secs, 3600);
        assert_eq!(s.safety.max_live_contact_wait_secs, 600);
        assert_eq!(s.safety.immediate_reasons, vec!["involuntary", "security"]);
        assert_eq!(s.replay.max_count, 5);
        assert_eq!(s.worker.max_in_flight, 32);
        assert_eq!(s.worker.shutdown_grace_secs, 25);
        assert_eq!(s.http.listen, "0.0.0.0:9090");
    }

    #[test]
    fn environment_overrides_with_double_underscores() {
        let s = load(&[
            ("OFFBOARD__AMQP__PREFETCH", "7"),
            ("OFFBOARD__S3__ENDPOINT", "http://127.0.0.1:9000"),
            ("OFFBOARD__CXONE__RATE_LIMIT__REQUESTS_PER_SECOND", "200"),
            ("OFFBOARD__SAFETY__IMMEDIATE_REASONS", "security,fraud"),
            (
                "OFFBOARD__HRIS__ENDPOINTS__WORKDAY__URL",
                "http://127.0.0.1:1/h",
            ),
            ("OFFBOARD__HRIS__ENDPOINTS__WORKDAY__SECRET", "s3cr3t"),
            ("UNRELATED", "x"),
        ])
        .expect("loads");
        assert_eq!(s.amqp.prefetch, 7);
        assert_eq!(s.s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(s.cxone.rate_limit.requests_per_second, 200.0);
        assert_eq!(s.safety.immediate_reasons, vec!["security", "fraud"]);
        assert!(s.hris.endpoints.contains_key("workday"));
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let err = load(&[("OFFBOARD__AMQP__PREFETCH", "abc")]).expect_err("invalid");
        assert!(err.to_string().contains("amqp.prefetch"), "{err}");
        let err = load(&[("OFFBOARD__WORKER__MAX_IN_FLIGHT", "0")]).expect_err("invalid");
        assert!(err.to_string().contains("worker.max_in_flight"), "{err}");
        let err = load(&[("OFFBOARD__S3__BUCKET", "Bad_Bucket")]).expect_err("invalid");
        assert!(err.to_string().contains("s3.bucket"), "{err}");
        let err = load(&[("OFFBOARD__CXONE__BLOCK_LOGIN", "ldap")]).expect_err("invalid");
        assert!(err.to_string().contains("cxone.block_login"), "{err}");
        let err = load(&[("OFFBOARD__HTTP__LISTEN", "nowhere")]).expect_err("invalid");
        assert!(err.to_string().contains("http.listen"), "{err}");
    }

    #[test]
    fn secrets_are_never_printed() {
        let s = load(&[
            ("OFFBOARD__AMQP__URL", "amqp://u:hunter2@127.0.0.1:5672/%2f"),
            ("OFFBOARD__CXONE__ACCESS_KEY_ID", "key"),
            ("OFFBOARD__CXONE__ACCESS_KEY_SECRET", "topsecret"),
        ])
        .expect("loads");
        let debug = format!("{s:?} {:?} {}", s.cxone.credentials(), s.summary());
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(!debug.contains("topsecret"), "{debug}");
        let err = load(&[("OFFBOARD__AMQP__URL", "http://u:hunter2@h/")]).expect_err("scheme");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn credentials_are_required_by_name() {
        let s = load(&[]).expect("loads");
        let err = s.cxone.credentials().expect_err("missing");
        assert!(err.to_string().contains("cxone.access_key_id"));
        let s = load(&[("OFFBOARD__CXONE__ACCESS_KEY_ID", "k")]).expect("loads");
        let err = s.cxone.credentials().expect_err("missing");
        assert!(err.to_string().contains("cxone.access_key_secret"));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = load(&[("OFFBOARD__AMQP__PREFECH", "3")]).expect_err("typo");
        assert!(err.to_string().contains("prefech"), "{err}");
    }

    #[test]
    fn several_broker_urls_are_the_nodes_of_a_cluster_and_every_password_is_redacted() {
        let s = Settings::load_from(
            None,
            [(
                "OFFBOARD__AMQP__URL".to_owned(),
                "amqp://u:pw1@n1:5672/%2f, amqp://u:pw2@n2:5672/%2f,amqps://u:pw3@n3:5671/%2f"
                    .to_owned(),
            )]
            .into_iter()
            .collect::<std::collections::HashMap<String, String>>(),
        )
        .expect("valid");
        assert_eq!(s.amqp.node_urls().len(), 3);
        assert_eq!(s.amqp.node_urls()[1], "amqp://u:pw2@n2:5672/%2f");
        let shown = s.amqp.redacted_url();
        for pw in ["pw1", "pw2", "pw3"] {
            assert!(!shown.contains(pw), "{shown}");
        }
        assert_eq!(shown.matches("u:***@").count(), 3, "{shown}");
        let bad = Settings::load_from(
            None,
            [(
                "OFFBOARD__AMQP__URL".to_owned(),
                "amqp://u:pw1@n1:5672/%2f,http://u:pw2@n2/".to_owned(),
            )]
            .into_iter()
            .collect::<std::collections::HashMap<String, String>>(),
        )
        .expect_err("one node is not amqp");
        let text = bad.to_string();
        assert!(text.contains("amqp.url") && !text.contains("pw2"), "{text}");
    }
}
