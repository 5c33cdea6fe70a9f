//! The worker process: HTTP endpoints, the consumer and a handler, stopped by a token and
//! drained within the grace period.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::broker::consumer::{Consumer, Handler, PauseSignal};
use crate::broker::control::ControlKey;
use crate::config::Settings;
use crate::http::{self, Readiness};
use crate::metrics::Metrics;

/// A started worker.
pub struct Running {
    pub http_addr: SocketAddr,
    /// Where the HTTP intake listens, when `intake.listen` is set.
    pub intake_addr: Option<SocketAddr>,
    pub readiness: Arc<Readiness>,
    pub metrics: Metrics,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Waits until the worker has stopped (after `shutdown` is cancelled and it drained).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await?
    }
}

/// Starts the HTTP endpoints and the consumer. Cancel `shutdown` to drain and stop.
pub async fn start<H: Handler>(
    settings: Arc<Settings>,
    handler: Arc<H>,
    metrics: Metrics,
    pause: Option<PauseSignal>,
    control: ControlKey,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    let readiness = Arc::new(Readiness::default());
    let http_stop = CancellationToken::new();
    let (http_addr, http_task) = http::serve(
        settings.http.listen_addr()?,
        readiness.clone(),
        metrics.clone(),
        http_stop.clone(),
    )
    .await?;
    info!(%http_addr, "http endpoints up: /healthz /readyz /metrics");
    // The HTTP intake stops taking webhooks the moment shutdown begins (the sender retries
    // against another replica); the consumer drains after.
    let intake = match settings.intake.listen {
        Some(_) => {
            Some(crate::intake::serve(&settings, metrics.clone(), shutdown.child_token()).await?)
        }
        None => None,
    };
    let intake_addr = intake.as_ref().map(|(a, _)| *a);
    let mut consumer = Consumer::new(
        settings,
        handler,
        readiness.clone(),
        metrics.clone(),
        control,
    );
    if let Some(p) = pause {
        consumer = consumer.with_pause(p);
    }
    let readiness_for_task = readiness.clone();
    let metrics_for_task = metrics.clone();
    let task = tokio::spawn(async move {
        let drain_watch = {
            let shutdown = shutdown.clone();
            let readiness = readiness_for_task.clone();
            let metrics = metrics_for_task.clone();
            tokio::spawn(async move {
                shutdown.cancelled().await;
                readiness.set_draining();
                metrics.drain_started();
                info!("shutdown requested: readiness off, draining");
            })
        };
        let result = consumer.run(shutdown).await;
        drain_watch.abort();
        if let Some((_, task)) = intake {
            let _ = task.await;
        }
        http_stop.cancel();
        let _ = http_task.await;
        info!("worker stopped");
        result
    });
    Ok(Running {
        http_addr,
        intake_addr,
        readiness,
        metrics,
        task,
    })
}

/// A token cancelled by the first SIGTERM or SIGINT.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("signal received");
        t.cancel();
    });
    token
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
