//! The outgoing HRIS webhook: a signed POST to an endpoint named in configuration (never a URL
//! from an event). `X-Offboard-Signature: sha256=<hex HMAC-SHA256 of "timestamp.body">`. The
//! saga sees it as its [`Notifier`] port.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use futures_util::future::BoxFuture;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use tracing::{info, warn};

use crate::config::HrisSettings;
use crate::cxone::retry::RetryPolicy;
use crate::saga::ports::{Notice, Notifier, NotifyError};

pub const TIMESTAMP_HEADER: &str = "X-Offboard-Timestamp";
pub const SIGNATURE_HEADER: &str = "X-Offboard-Signature";

/// `sha256=<hex>` over `"{timestamp}.{body}"`.
pub fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    // HMAC accepts keys of any length.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Constant-time check of a signature header (what a receiver does).
pub fn verify(secret: &[u8], timestamp: &str, body: &[u8], header: &str) -> bool {
    let Some(hex_sig) = header.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// The HRIS endpoints of the configuration, with one HTTP client shared by every saga of the
/// worker (a layoff's thousands of notifications reuse its connections). Built at start-up,
/// so a bad endpoint stops the worker before the first message.
pub struct HttpNotifier {
    client: reqwest::Client,
    endpoints: BTreeMap<String, (String, SecretString)>,
    policy: RetryPolicy,
}

impl std::fmt::Debug for HttpNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpNotifier")
            .field("endpoints", &self.endpoints.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl HttpNotifier {
    pub fn new(settings: &HrisSettings) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5))
            // Never follow a redirect: the endpoint is exactly what configuration says.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("cxone-offboard/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the webhook client")?;
        let mut endpoints = BTreeMap::new();
        for (name, endpoint) in &settings.endpoints {
            let secret = endpoint.secret()?.ok_or_else(|| {
                anyhow::anyhow!("configuration key `hris.endpoints.{name}.secret`: is required")
            })?;
            endpoints.insert(name.clone(), (endpoint.url.clone(), secret));
        }
        Ok(Self {
            client,
            endpoints,
            policy: RetryPolicy {
                max_attempts: 4,
                base: Duration::from_millis(300),
                cap: Duration::from_secs(5),
                max_elapsed: Duration::from_secs(30),
            },
        })
    }

    async fn send(&self, name: &str, notice: &Notice) -> Result<String, NotifyError> {
        let Some((url, secret)) = self.endpoints.get(name) else {
            return Err(NotifyError::Unknown(name.to_owned()));
        };
        let body = serde_json::to_vec(&notice.body).unwrap_or_default();
        let mut last = String::new();
        for attempt in 0..self.policy.max_attempts {
            if attempt > 0 {
                tokio::time::sleep(self.policy.backoff(attempt - 1)).await;
            }
            let timestamp = chrono::Utc::now().timestamp().to_string();
            let signature = sign(secret.expose_secret().as_bytes(), &timestamp, &body);
            let result = self
                .client
                .post(url)
                .header("Content-Type", "application/json")
                .header(TIMESTAMP_HEADER, &timestamp)
                .header(SIGNATURE_HEADER, signature)
                .header("X-Offboard-Saga-Id", &notice.saga_id)
                // The same id on every retry of one notification: receivers can drop repeats.
                .header("Idempotency-Key", &notice.saga_id)
                .body(body.clone())
                .send()
                .await;
            match result {
                Ok(r) if r.status().is_success() => {
                    info!(endpoint = name, "HRIS notified");
                    return Ok(format!("notified `{name}`"));
                }
                Ok(r) => last = format!("HTTP {}", r.status().as_u16()),
                Err(e) => last = crate::cxone::error::describe_reqwest(&e),
            }
        }
        Err(NotifyError::Failed(format!(
            "failed after {} attempts: {last}",
            self.policy.max_attempts
        )))
    }
}

impl Notifier for HttpNotifier {
    fn knows(&self, endpoint: &str) -> bool {
        self.endpoints.contains_key(endpoint)
    }

    fn notify<'a>(
        &'a self,
        endpoint: &'a str,
        notice: &'a Notice,
    ) -> BoxFuture<'a, Result<String, NotifyError>> {
        Box::pin(async move {
            let r = self.send(endpoint, notice).await;
            if let Err(e) = &r {
                warn!(endpoint, error = %e, "HRIS notification failed");
            }
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_detect_tampering() {
        let sig = sign(b"s3cr3t", "1700000000", b"{\"a\":1}");
        assert!(sig.starts_with("sha256="));
        assert!(verify(b"s3cr3t", "1700000000", b"{\"a\":1}", &sig));
        assert!(!verify(b"s3cr3t", "1700000001", b"{\"a\":1}", &sig));
        assert!(!verify(b"other", "1700000000", b"{\"a\":1}", &sig));
        assert!(!verify(b"s3cr3t", "1700000000", b"{\"a\":2}", &sig));
        assert!(!verify(b"s3cr3t", "1700000000", b"{\"a\":1}", "md5=00"));
    }
}
