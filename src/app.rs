//! The worker as one value: [`App::build`] makes everything a worker needs from its settings
//! (CXone client, bucket, control-header key, HRIS notifier, broker sessions, the saga
//! handler) and [`App::start`] runs it until a shutdown token is cancelled. `worker`, `demo`
//! and the tests all start the worker this way.

use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::broker::control::ControlKey;
use crate::broker::handler::SagaHandler;
use crate::broker::sessions::BrokerSessions;
use crate::config::Settings;
use crate::cxone::Client;
use crate::hris::HttpNotifier;
use crate::metrics::Metrics;
use crate::saga::Deps;
use crate::store::{S3, Store, StoreError, Write, keys};
use crate::worker::{self, Running};

/// A worker, built and not yet running.
pub struct App {
    pub settings: Arc<Settings>,
    pub metrics: Metrics,
    pub cxone: Client,
    pub store: S3,
    pub control: ControlKey,
    pub handler: Arc<SagaHandler<Client, S3>>,
}

/// Why the store cannot carry the worker.
#[derive(Debug, thiserror::Error)]
#[error("the S3 store at {endpoint} cannot be used: {why}")]
pub struct UnfitStore {
    pub endpoint: String,
    pub why: String,
}

impl App {
    /// Builds the worker. Fails on a setting that cannot work and on a store that ignores
    /// conditional writes (fencing, the guard and write-once manifests depend on them).
    pub async fn build(settings: Arc<Settings>, metrics: Metrics) -> anyhow::Result<Self> {
        metrics.sla_limit(settings.sla.revoke_within_secs);
        let cxone = Client::new(&settings.cxone, metrics.clone())?;
        let store = S3::new(&settings.s3).await.with_metrics(metrics.clone());
        let caps = crate::store::probe_capabilities(&store).await;
        if let Err(why) = caps.conditional_writes() {
            return Err(UnfitStore {
                endpoint: settings
                    .s3
                    .endpoint
                    .clone()
                    .unwrap_or_else(|| "AWS".to_owned()),
                why: format!("{why} (bucket `{}`)", settings.s3.bucket),
            }
            .into());
        }
        let control = control_key(&settings, &store).await?;
        let notifier = HttpNotifier::new(&settings.hris)?;
        let sessions = BrokerSessions::new(Arc::new(settings.amqp.clone()));
        let deps = Deps::new(
            cxone.clone(),
            Arc::new(store.clone()),
            settings.clone(),
            metrics.clone(),
        )
        .with_notifier(Arc::new(notifier))
        .with_sessions(Arc::new(sessions));
        Ok(Self {
            handler: Arc::new(SagaHandler::new(deps)),
            settings,
            metrics,
            cxone,
            store,
            control,
        })
    }

    /// Starts the HTTP endpoints and the consumer; cancel `shutdown` to drain and stop.
    pub async fn start(self, shutdown: CancellationToken) -> anyhow::Result<Running> {
        info!(settings = %self.settings.summary(), version = crate::VERSION, "worker starting");
        worker::start(
            self.settings.clone(),
            self.handler.clone(),
            self.metrics.clone(),
            Some(self.cxone.intake_pause()),
            self.control.clone(),
            shutdown,
        )
        .await
    }
}

/// The key signing control headers: `amqp.control_key`, or the deployment's key in the bucket
/// (created once, with `If-None-Match: *`, by whichever replica starts first).
pub async fn control_key<S: Store>(settings: &Settings, store: &S) -> anyhow::Result<ControlKey> {
    use secrecy::ExposeSecret;
    if let Some(key) = settings.amqp.control_key()? {
        return Ok(ControlKey::derive(key.expose_secret().as_bytes()));
    }
    for _ in 0..3 {
        if let Some(obj) = store
            .get(keys::CONTROL_KEY)
            .await
            .context("reading the control-header key from the bucket")?
        {
            return Ok(ControlKey::derive(&obj.body));
        }
        match store
            .put(
                keys::CONTROL_KEY,
                Bytes::from(ControlKey::generate_material()),
                "application/octet-stream",
                Write::Create,
            )
            .await
        {
            Ok(_) => info!("created this deployment's control-header key in the bucket"),
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e).context("creating the control-header key in the bucket"),
        }
    }
    anyhow::bail!("the control-header key in the bucket could not be read back")
}
