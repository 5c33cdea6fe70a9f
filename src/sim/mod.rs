//! The CXone simulator: an HTTP server that speaks the real CXone API (CXONE-API.md §1–7)
//! plus the `/_sim/` control API (CONTRACT §10), for tests, the demo and benchmarks.
//!
//! Run it in-process with [`spawn`] (bind port 0, read [`SimServer::base_url`]) or as the
//! `sim` command through [`SimArgs`] and [`run`].
//!
//! # Layout
//! - [`world`](self::world): users, agents, skills, access keys, SCIM resources; seeded users
//!   are materialized lazily on first touch.
//! - [`contacts`](self::contacts): deterministic completed-contact histories, paged in O(page).
//! - [`auth`](self::auth): access-key and password-grant tokens, discovery documents.
//! - [`limiter`](self::limiter): the token bucket behind `429`.
//! - [`faults`](self::faults): injected errors, latency, malformed bodies, connection resets.
//! - [`stats`](self::stats): request counts per route template and status.
//! - [`gate`](self::gate): the middleware every CXone API request passes (auth, throttling,
//!   faults, stats).
//! - [`admin`](self::admin), [`userhub`](self::userhub), [`scim`](self::scim): the CXone API.
//! - [`control`](self::control): the `/_sim/` control API.
//! - [`error`](self::error): CXone and SCIM error bodies.

mod admin;
mod auth;
mod contacts;
mod control;
mod error;
mod faults;
mod gate;
mod limiter;
mod scim;
mod stats;
mod userhub;
mod world;

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::auth::Tokens;
use self::faults::Faults;
use self::limiter::Bucket;
use self::stats::Stats;
use self::world::{SeedIndex, World};

/// The form of the `Retry-After` header on `429` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryAfter {
    /// Delta-seconds: the ceiling of the time until a request would be admitted, at least 1.
    #[default]
    Seconds,
    /// An IMF-fixdate (RFC 9110 §5.6.7) at which a request would be admitted.
    HttpDate,
    /// No `Retry-After` header at all.
    None,
}

/// Settings of one simulator instance.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Seeded users `E000001` … `E{users:06}`.
    pub users: u64,
    /// Completed contacts generated for each seeded user.
    pub interactions_per_user: u64,
    /// Requests per second admitted over all authenticated requests; `None` or `<= 0` is unlimited.
    pub rate_limit: Option<f64>,
    /// Bucket capacity of the rate limiter.
    pub burst: u32,
    /// Lifetime of issued access tokens.
    pub token_ttl: Duration,
    /// Form of `Retry-After` on throttled requests.
    pub retry_after: RetryAfter,
    /// The access key accepted by both token endpoints.
    pub access_key_id: String,
    /// Its secret.
    pub access_key_secret: String,
    /// The `tenantId` claim of issued `id_token`s.
    pub tenant_id: String,
    /// Creation instant of seeded users (their contacts fall in the 300 days before it);
    /// `None` means the moment the simulator starts.
    pub epoch: Option<DateTime<Utc>>,
    /// Base URL advertised in discovery documents and `_links`; `None` derives it from the
    /// bound address (`0.0.0.0`/`::` become `127.0.0.1`).
    pub public_url: Option<String>,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            users: 100,
            interactions_per_user: 20,
            rate_limit: None,
            burst: 20,
            token_ttl: Duration::from_secs(3600),
            retry_after: RetryAfter::Seconds,
            access_key_id: "sim-key".to_owned(),
            access_key_secret: "sim-secret".to_owned(),
            tenant_id: "11eb0000-5151-4e00-8000-00000000c0de".to_owned(),
            epoch: None,
            public_url: None,
        }
    }
}

/// Command-line flags of `cxone-offboard sim` (CONTRACT §8, §10).
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8088")]
    pub listen: SocketAddr,
    /// Number of seeded users (E000001 …).
    #[arg(long, default_value_t = 100)]
    pub users: u64,
    /// Completed contacts per seeded user (generated on demand).
    #[arg(long, default_value_t = 20)]
    pub interactions_per_user: u64,
    /// Requests per second over all authenticated requests; 0 or absent is unlimited.
    #[arg(long)]
    pub rate_limit: Option<f64>,
    /// Token-bucket capacity of the rate limiter.
    #[arg(long, default_value_t = 20)]
    pub burst: u32,
    /// Lifetime of issued access tokens, in seconds.
    #[arg(long, default_value_t = 3600)]
    pub token_ttl_secs: u64,
    /// Form of `Retry-After` on 429 answers.
    #[arg(long, value_enum, default_value_t = RetryAfter::Seconds)]
    pub retry_after: RetryAfter,
    /// Access key id accepted by the token endpoints.
    #[arg(long, default_value = "sim-key")]
    pub access_key_id: String,
    /// Access key secret accepted by the token endpoints.
    #[arg(long, default_value = "sim-secret")]
    pub access_key_secret: String,
}

impl From<&SimArgs> for SimOptions {
    fn from(args: &SimArgs) -> Self {
        Self {
            users: args.users,
            interactions_per_user: args.interactions_per_user,
            rate_limit: args.rate_limit,
            burst: args.burst,
            token_ttl: Duration::from_secs(args.token_ttl_secs),
            retry_after: args.retry_after,
            access_key_id: args.access_key_id.clone(),
            access_key_secret: args.access_key_secret.clone(),
            ..Self::default()
        }
    }
}

/// Runs the simulator until SIGINT or SIGTERM; prints `listening on http://ADDR` when ready.
pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let server = spawn(SimOptions::from(&args), args.listen).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{}", server.addr()).context("writing to stdout")?;
        out.flush().context("flushing stdout")?;
    }
    shutdown_signal().await;
    server.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// A running simulator. Dropping it stops the server; [`SimServer::shutdown`] also waits.
#[derive(Debug)]
pub struct SimServer {
    addr: SocketAddr,
    base_url: String,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl SimServer {
    /// The address the listener is bound to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL of every endpoint, e.g. `http://127.0.0.1:40123` (no trailing slash).
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// Stops accepting connections, lets in-flight requests finish (at most 5 s) and returns.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take()
            && tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
        {
            tracing::warn!("simulator did not drain within 5 s");
        }
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Binds `listen` (port 0 picks a free port) and serves the simulator in a background task.
pub async fn spawn(opts: SimOptions, listen: SocketAddr) -> anyhow::Result<SimServer> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the simulator to {listen}"))?;
    let addr = listener
        .local_addr()
        .context("reading the simulator's bound address")?;
    let base_url = opts
        .public_url
        .clone()
        .map(|url| url.trim_end_matches('/').to_owned())
        .unwrap_or_else(|| default_base_url(addr));
    let sim = Arc::new(Sim::new(opts, base_url.clone()));
    let app = router(sim);
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
    });
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "simulator server failed");
        }
    });
    Ok(SimServer {
        addr,
        base_url,
        cancel,
        task: Some(task),
    })
}

fn default_base_url(addr: SocketAddr) -> String {
    let ip = if addr.ip().is_unspecified() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        addr.ip()
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// Everything one simulator instance knows, shared by all handlers.
pub(crate) struct Sim {
    opts: SimOptions,
    base_url: String,
    epoch: DateTime<Utc>,
    world: Mutex<World>,
    seed_index: OnceLock<SeedIndex>,
    tokens: Mutex<Tokens>,
    limiter: Option<Mutex<Bucket>>,
    faults: RwLock<Faults>,
    stats: Mutex<Stats>,
}

impl Sim {
    fn new(opts: SimOptions, base_url: String) -> Self {
        let epoch = opts.epoch.unwrap_or_else(Utc::now);
        let limiter = opts
            .rate_limit
            .filter(|rate| *rate > 0.0)
            .map(|rate| Mutex::new(Bucket::new(rate, opts.burst)));
        Self {
            world: Mutex::new(World::new(opts.users, opts.interactions_per_user, epoch)),
            seed_index: OnceLock::new(),
            tokens: Mutex::new(Tokens::default()),
            limiter,
            faults: RwLock::new(Faults::default()),
            stats: Mutex::new(Stats::default()),
            opts,
            base_url,
            epoch,
        }
    }

    /// The world, locked. Never hold it across an `.await`.
    fn world(&self) -> MutexGuard<'_, World> {
        self.world
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn tokens(&self) -> MutexGuard<'_, Tokens> {
        self.tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn stats(&self) -> MutexGuard<'_, Stats> {
        self.stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn faults(&self) -> RwLockReadGuard<'_, Faults> {
        self.faults
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_faults(&self, faults: Faults) {
        *self
            .faults
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = faults;
    }

    /// The reverse index of seeded users' UUIDs, built on first use.
    fn seed_index(&self) -> &SeedIndex {
        self.seed_index
            .get_or_init(|| SeedIndex::build(self.opts.users))
    }

    /// Restores the seeded state; clears faults, stats and the rate limiter. Tokens survive.
    fn reset(&self) {
        *self.world() = World::new(self.opts.users, self.opts.interactions_per_user, self.epoch);
        self.set_faults(Faults::default());
        *self.stats() = Stats::default();
        if let Some(limiter) = &self.limiter {
            limiter
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .refill();
        }
    }
}

type Shared = Arc<Sim>;

fn router(sim: Shared) -> Router {
    const ADMIN: &str = "/inContactAPI/services/{version}";
    let api = Router::new()
        .route("/user-management/v2/users/search", post(userhub::search))
        .route("/user-management/v3/users/{userId}", get(userhub::get_user))
        .route(
            "/user-management/v1/users/deactivate",
            post(userhub::deactivate),
        )
        .route(
            "/user-management/v1/users/{userId}/revive",
            post(userhub::revive),
        )
        .route(
            &format!("{ADMIN}/agents/{{agentId}}"),
            get(admin::get_agent).put(admin::put_agent),
        )
        .route(
            &format!("{ADMIN}/agents/{{agentId}}/skills"),
            get(admin::get_skills)
                .delete(admin::delete_skills)
                .post(admin::post_skills),
        )
        .route(
            &format!("{ADMIN}/agents/{{agentId}}/logout"),
            post(admin::logout),
        )
        .route(
            &format!("{ADMIN}/agents/{{agentId}}/states"),
            get(admin::states),
        )
        .route(
            &format!("{ADMIN}/access-keys"),
            get(admin::list_access_keys),
        )
        .route(
            &format!("{ADMIN}/access-keys/{{accessKeyId}}"),
            axum::routing::delete(admin::delete_access_key),
        )
        .route(
            &format!("{ADMIN}/contacts/completed"),
            get(admin::completed_contacts),
        )
        .route("/scim/v2/Users", get(scim::list))
        .route(
            "/scim/v2/Users/{id}",
            get(scim::get)
                .patch(scim::patch)
                .put(scim::put)
                .delete(scim::delete),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            sim.clone(),
            gate::authenticated,
        ));
    let open = Router::new()
        .route(
            "/authentication/v1/token/access-key",
            post(auth::access_key_token),
        )
        .route("/auth/token", post(auth::password_token))
        .route(
            "/.well-known/openid-configuration",
            get(auth::openid_configuration),
        )
        .route(
            "/.well-known/cxone-configuration",
            get(auth::cxone_configuration),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            sim.clone(),
            gate::open,
        ));
    let control = Router::new()
        .route("/_sim/users", post(control::create_user))
        .route("/_sim/users/{external_id}", get(control::get_user))
        .route("/_sim/users/{external_id}/state", post(control::set_state))
        .route(
            "/_sim/users/{external_id}/status",
            post(control::set_status),
        )
        .route("/_sim/stats", get(control::stats))
        .route(
            "/_sim/faults",
            get(control::get_faults).post(control::set_faults),
        )
        .route("/_sim/reset", post(control::reset));
    api.merge(open)
        .merge(control)
        .fallback(error::not_found_route)
        .method_not_allowed_fallback(error::method_not_allowed)
        .with_state(sim)
}
