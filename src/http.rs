//! The worker's HTTP surface: `/healthz` (alive), `/readyz` (connected and not draining),
//! `/metrics` (Prometheus text).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// What `/readyz` reports: ready while the broker consumer is up and shutdown has not begun.
#[derive(Debug, Default)]
pub struct Readiness {
    connected: AtomicBool,
    draining: AtomicBool,
    paused: std::sync::Mutex<Option<String>>,
}

impl Readiness {
    pub fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::SeqCst);
    }
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }
    /// Consumption paused on purpose (the CXone circuit is open, CXone refuses the key): the
    /// pod stays ready — another pod would be paused the same way.
    pub fn set_paused(&self, why: Option<String>) {
        *self.paused.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }
    pub fn is_ready(&self) -> bool {
        self.connected.load(Ordering::SeqCst) && !self.draining.load(Ordering::SeqCst)
    }
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
    fn reason(&self) -> String {
        if self.draining.load(Ordering::SeqCst) {
            "draining".to_owned()
        } else if !self.connected.load(Ordering::SeqCst) {
            "broker disconnected".to_owned()
        } else if let Some(why) = self
            .paused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
        {
            format!("ready (consumption paused: {why})")
        } else {
            "ready".to_owned()
        }
    }
}

#[derive(Clone)]
struct AppState {
    readiness: Arc<Readiness>,
    metrics: Metrics,
}

pub fn router(readiness: Arc<Readiness>, metrics: Metrics) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { readiness, metrics })
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let reason = state.readiness.reason();
    if state.readiness.is_ready() {
        (StatusCode::OK, format!("{reason}\n"))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n"))
    }
}

async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// Binds `addr` and serves until `shutdown` is cancelled. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    readiness: Arc<Readiness>,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding http.listen {addr}"))?;
    let local = listener.local_addr()?;
    let app = router(readiness, metrics);
    let handle = tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(err) = result {
            tracing::error!(error = %err, "http server failed");
        }
    });
    Ok((local, handle))
}
