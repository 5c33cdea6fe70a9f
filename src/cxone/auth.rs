//! Tokens and endpoints. One token per process, refreshed before expiry by exactly one task
//! while the others wait; a 401 invalidates it so the next caller refreshes (once).
//! Without `cxone.api_base_url` the API host is discovered from the issuer (CXONE-API.md §1).

use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::time::Instant;
use url::Url;

use super::error::{CxoneError, ErrorKind};
use crate::config::{AuthFlow, CxoneCredentials, CxoneSettings};

const TOKEN_ROUTE: &str = "token";

/// Where to send requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// The tenant's API host, e.g. `https://api-na1.niceincontact.com`.
    pub api_base: Url,
    pub scim_base: Url,
    pub token_url: Url,
}

/// A bearer token with its expiry. The value is a secret.
#[derive(Clone)]
pub struct Token {
    pub value: SecretString,
    pub generation: u64,
    refresh_at: Instant,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    id_token: Option<String>,
}

#[derive(Deserialize)]
struct OpenIdConfiguration {
    token_endpoint: String,
}

#[derive(Deserialize)]
struct CxoneConfiguration {
    api_endpoint: String,
}

pub struct Auth {
    http: reqwest::Client,
    settings: CxoneSettings,
    credentials: Mutex<CxoneCredentials>,
    client_secret: Option<SecretString>,
    endpoints: tokio::sync::OnceCell<Endpoints>,
    cached: Mutex<Option<Token>>,
    refresh: tokio::sync::Mutex<()>,
    generation: std::sync::atomic::AtomicU64,
    /// Token requests made, for tests and metrics.
    pub token_requests: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("issuer", &self.settings.issuer)
            .field("access_key_id", &self.access_key_id())
            .finish_non_exhaustive()
    }
}

fn perm(message: impl Into<String>) -> CxoneError {
    CxoneError::new(ErrorKind::Permanent, "POST", TOKEN_ROUTE, None, message)
}

fn join(base: &str, path: &str) -> Result<Url, CxoneError> {
    let base = base.trim_end_matches('/');
    Url::parse(&format!("{base}{path}")).map_err(|e| perm(format!("bad URL {base}{path}: {e}")))
}

impl Auth {
    pub fn new(
        http: reqwest::Client,
        settings: CxoneSettings,
        credentials: CxoneCredentials,
    ) -> Self {
        let client_secret = settings.client_secret.clone();
        Self {
            http,
            settings,
            credentials: Mutex::new(credentials),
            client_secret,
            endpoints: tokio::sync::OnceCell::new(),
            cached: Mutex::new(None),
            refresh: tokio::sync::Mutex::new(()),
            generation: std::sync::atomic::AtomicU64::new(0),
            token_requests: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn access_key_id(&self) -> String {
        self.credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .access_key_id
            .clone()
    }

    /// Reads the credentials again (a Kubernetes secret mounted as a file changes in place when
    /// the key is rotated) and forgets the token, so the next call tries them.
    pub fn reload_credentials(&self) -> Result<(), crate::config::ConfigError> {
        let fresh = self.settings.credentials()?;
        *self.credentials.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }

    fn cached(&self) -> Option<Token> {
        let guard = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        guard.clone().filter(|t| Instant::now() < t.refresh_at)
    }

    /// The endpoints, discovered on first use when not configured.
    pub async fn endpoints(&self) -> Result<&Endpoints, CxoneError> {
        self.endpoints
            .get_or_try_init(|| async {
                let token_url = self.token_url().await?;
                let api_base = match &self.settings.api_base_url {
                    Some(api) => {
                        Url::parse(api).map_err(|e| perm(format!("cxone.api_base_url: {e}")))?
                    }
                    None => {
                        let (_, id_token) = self.fetch_token(&token_url).await?;
                        self.discover_api(id_token.as_deref()).await?
                    }
                };
                let scim_base = match &self.settings.scim_base_url {
                    Some(s) => {
                        Url::parse(s).map_err(|e| perm(format!("cxone.scim_base_url: {e}")))?
                    }
                    None => join(api_base.as_str(), "/scim/v2")?,
                };
                Ok(Endpoints {
                    api_base,
                    scim_base,
                    token_url,
                })
            })
            .await
    }

    async fn token_url(&self) -> Result<Url, CxoneError> {
        match self.settings.auth_flow {
            AuthFlow::AccessKey => {
                let base = self
                    .settings
                    .auth_base_url
                    .as_deref()
                    .unwrap_or(self.settings.issuer.as_str());
                join(base, "/authentication/v1/token/access-key")
            }
            AuthFlow::Password => {
                let url = join(&self.settings.issuer, "/.well-known/openid-configuration")?;
                let doc: OpenIdConfiguration = self.get_json(url, "openid-configuration").await?;
                Url::parse(&doc.token_endpoint)
                    .map_err(|e| perm(format!("token_endpoint in discovery: {e}")))
            }
        }
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: Url,
        what: &str,
    ) -> Result<T, CxoneError> {
        let resp = self
            .http
            .get(url)
            .header("Accept", "application/json")
            .send()
            .await
            .map_err(|e| {
                CxoneError::new(
                    ErrorKind::Transient,
                    "GET",
                    "discovery",
                    None,
                    format!("{what}: {}", super::error::describe_reqwest(&e)),
                )
            })?;
        let status = resp.status().as_u16();
        if !resp.status().is_success() {
            return Err(CxoneError::new(
                super::error::classify_status(status),
                "GET",
                "discovery",
                Some(status),
                format!("{what} answered {status}"),
            ));
        }
        resp.json().await.map_err(|_| {
            CxoneError::new(
                ErrorKind::Permanent,
                "GET",
                "discovery",
                Some(status),
                format!("{what}: malformed JSON"),
            )
        })
    }

    async fn discover_api(&self, id_token: Option<&str>) -> Result<Url, CxoneError> {
        let tenant = id_token.and_then(tenant_from_id_token).ok_or_else(|| {
            perm("the token carries no tenantId to discover the API host; set cxone.api_base_url")
        })?;
        let mut url = join(&self.settings.issuer, "/.well-known/cxone-configuration")?;
        url.query_pairs_mut().append_pair("tenantId", &tenant);
        let doc: CxoneConfiguration = self.get_json(url, "cxone-configuration").await?;
        Url::parse(&doc.api_endpoint).map_err(|e| perm(format!("api_endpoint in discovery: {e}")))
    }

    /// A valid token: the cached one, or a fresh one fetched by exactly one caller.
    pub async fn token(&self) -> Result<Token, CxoneError> {
        if let Some(t) = self.cached() {
            return Ok(t);
        }
        let _guard = self.refresh.lock().await;
        if let Some(t) = self.cached() {
            return Ok(t);
        }
        let url = self.endpoints().await?.token_url.clone();
        let (token, _) = self.fetch_token(&url).await?;
        Ok(token)
    }

    /// Drops the token of `generation` (after a 401) so the next caller fetches a new one.
    pub fn invalidate(&self, generation: u64) {
        let mut guard = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if guard.as_ref().is_some_and(|t| t.generation == generation) {
            *guard = None;
        }
    }

    async fn fetch_token(&self, url: &Url) -> Result<(Token, Option<String>), CxoneError> {
        self.token_requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let credentials = self
            .credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let id = &credentials.access_key_id;
        let secret = credentials.access_key_secret.expose_secret();
        let request = match self.settings.auth_flow {
            AuthFlow::AccessKey => self.http.post(url.clone()).json(&serde_json::json!({
                "accessKeyId": id,
                "accessKeySecret": secret,
            })),
            AuthFlow::Password => {
                let client_id = self.settings.client_id.clone().unwrap_or_default();
                let client_secret = self
                    .client_secret
                    .as_ref()
                    .map(|s| s.expose_secret().to_owned())
                    .unwrap_or_default();
                self.http
                    .post(url.clone())
                    .basic_auth(client_id, Some(client_secret))
                    .form(&[
                        ("grant_type", "password"),
                        ("username", id.as_str()),
                        ("password", secret),
                    ])
            }
        };
        let started = Instant::now();
        let resp = request
            .header("Accept", "application/json")
            .send()
            .await
            .map_err(|e| {
                CxoneError::new(
                    ErrorKind::Transient,
                    "POST",
                    TOKEN_ROUTE,
                    None,
                    super::error::describe_reqwest(&e),
                )
            })?;
        let status = resp.status().as_u16();
        if resp.status().is_redirection() {
            // Never followed: a redirect would re-send the access key secret somewhere else.
            return Err(CxoneError::new(
                ErrorKind::Permanent,
                "POST",
                TOKEN_ROUTE,
                Some(status),
                "the token endpoint answered with a redirect, which is not followed (the \
                 access key is only ever sent to the configured host); check \
                 cxone.auth_base_url and cxone.issuer",
            ));
        }
        if !resp.status().is_success() {
            // The body of a failed token request is never echoed: it may repeat credentials.
            let (kind, message) = if status == 401 || status == 403 {
                (
                    ErrorKind::Permanent,
                    "CXone refused the access key: check cxone.access_key_id and \
                     cxone.access_key_secret",
                )
            } else {
                (
                    super::error::classify_status(status),
                    "the token endpoint failed",
                )
            };
            return Err(CxoneError::new(
                kind,
                "POST",
                TOKEN_ROUTE,
                Some(status),
                message,
            ));
        }
        let body: TokenResponse = resp.json().await.map_err(|_| {
            CxoneError::new(
                ErrorKind::Transient,
                "POST",
                TOKEN_ROUTE,
                Some(status),
                "malformed token response",
            )
        })?;
        let lifetime = Duration::from_secs(body.expires_in.unwrap_or(3600).max(1));
        // Refresh early: a fifth of the lifetime, at most a minute.
        let margin = (lifetime / 5).min(Duration::from_secs(60));
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        let token = Token {
            value: SecretString::from(body.access_token),
            generation,
            refresh_at: started + lifetime - margin,
        };
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some(token.clone());
        tracing::debug!(
            lifetime_secs = lifetime.as_secs(),
            generation,
            "CXone token refreshed"
        );
        Ok((token, body.id_token))
    }
}

/// The `tenantId` claim of an id_token (not verified: only used to find the API host, over
/// TLS, from the token endpoint we just authenticated to).
pub fn tenant_from_id_token(jwt: &str) -> Option<String> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims
        .get("tenantId")
        .or_else(|| claims.get("tenant_id"))
        .and_then(|v| v.as_str())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_claim_is_read() {
        let b64 = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let jwt = format!(
            "{}.{}.sig",
            b64(r#"{"alg":"none"}"#),
            b64(r#"{"tenantId":"11ee-abc","iss":"x"}"#)
        );
        assert_eq!(tenant_from_id_token(&jwt).as_deref(), Some("11ee-abc"));
        assert_eq!(tenant_from_id_token("garbage"), None);
        assert_eq!(tenant_from_id_token("a.!!!.c"), None);
    }
}
