//! The HRIS webhook: a signed POST to an endpoint named in configuration (never a URL from an
//! event). `X-Offboard-Signature: sha256=<hex HMAC-SHA256 of "timestamp.body">`.

use std::time::Duration;

use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use serde_json::json;
use sha2::Sha256;
use tracing::{info, warn};

use crate::cxone::Cxone;
use crate::cxone::retry::RetryPolicy;
use crate::saga::{Run, StepError, StepResult};
use crate::store::Store;

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

/// The worker's webhook client (`Deps::webhook`), built on first use.
fn http_client(
    cell: &std::sync::OnceLock<Result<reqwest::Client, String>>,
) -> Result<reqwest::Client, StepError> {
    cell.get_or_init(|| {
        reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5))
            // Never follow a redirect: the endpoint is exactly what configuration says.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("cxone-offboard/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())
    })
    .clone()
    .map_err(|e| StepError::Permanent(format!("webhook client: {e}")))
}

/// The `notify` step. Failure after the retry budget does not fail an offboarding that
/// happened: the saga completes with a warning.
pub(crate) async fn notify_step<C: Cxone, S: Store>(
    run: &mut Run<'_, C, S>,
    name: Option<&str>,
) -> Result<StepResult, StepError> {
    let Some(name) = name else {
        return Ok(StepResult::Skipped("no notify endpoint named".to_owned()));
    };
    let Some(endpoint) = run.deps.settings.hris.endpoints.get(name) else {
        let shown: String = name.chars().take(64).filter(|c| !c.is_control()).collect();
        let warning = format!(
            "notify: no HRIS endpoint named `{shown}` in configuration; nobody was notified"
        );
        warn!("{warning}");
        run.stored.journal.warnings.push(warning.clone());
        return Ok(StepResult::Skipped(warning));
    };
    let secret = endpoint
        .secret()
        .map_err(|e| StepError::Permanent(e.to_string()))?
        .ok_or_else(|| StepError::Permanent(format!("hris.endpoints.{name}.secret is not set")))?;
    let j = &run.stored.journal;
    let body = json!({
        "type": "offboard.saga.completed",
        "saga_id": j.saga_id,
        "event_id": j.event.id,
        "employee": {
            "external_id": j.employee.external_id,
            "user_id": j.employee.user_id,
            "agent_id": j.employee.agent_id,
        },
        "status": crate::archive::final_status(j).as_str(),
        "revoked_at": j.revoked_at,
        "archive": j.archive.as_ref().map(|a| json!({"uri": a.uri, "sha256": a.sha256, "records": a.records})),
        "manifest": j.manifest.as_ref().map(|m| json!({"uri": m.uri, "sha256": m.sha256})),
        "steps": j.steps.iter().map(|s| json!({"name": s.name.as_str(), "status": s.status})).collect::<Vec<_>>(),
    });
    let body = serde_json::to_vec(&body).unwrap_or_default();
    let client = http_client(&run.deps.webhook)?;
    let policy = RetryPolicy {
        max_attempts: 4,
        base: Duration::from_millis(300),
        cap: Duration::from_secs(5),
        max_elapsed: Duration::from_secs(30),
    };
    let mut last = String::new();
    for attempt in 0..policy.max_attempts {
        if attempt > 0 {
            tokio::time::sleep(policy.backoff(attempt - 1)).await;
        }
        let timestamp = chrono::Utc::now().timestamp().to_string();
        let signature = sign(secret.expose_secret().as_bytes(), &timestamp, &body);
        let result = client
            .post(&endpoint.url)
            .header("Content-Type", "application/json")
            .header(TIMESTAMP_HEADER, &timestamp)
            .header(SIGNATURE_HEADER, signature)
            .header("X-Offboard-Saga-Id", &run.stored.journal.saga_id)
            .body(body.clone())
            .send()
            .await;
        match result {
            Ok(r) if r.status().is_success() => {
                info!(endpoint = name, "HRIS notified");
                return Ok(StepResult::Done(Some(format!("notified `{name}`"))));
            }
            Ok(r) => last = format!("HTTP {}", r.status().as_u16()),
            Err(e) => last = crate::cxone::client::describe_reqwest(&e),
        }
    }
    let warning = format!(
        "notify `{name}` failed after {} attempts: {last}",
        policy.max_attempts
    );
    warn!("{warning}");
    run.stored.journal.warnings.push(warning.clone());
    Ok(StepResult::Skipped(warning))
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
