//! Authentication: the access-key token endpoint, the OAuth2 password grant, the bearer
//! tokens they issue (with a configurable lifetime) and the discovery documents.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use hmac::{Hmac, Mac as _};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Sha256;

use super::Shared;
use super::error::{ApiError, parse_json};

/// Why a bearer token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TokenError {
    #[error("no bearer token")]
    Missing,
    #[error("unknown or revoked token")]
    Unknown,
    #[error("token expired")]
    Expired,
}

/// Issued access tokens and their expiry.
#[derive(Debug, Default)]
pub(crate) struct Tokens {
    live: HashMap<String, Instant>,
}

impl Tokens {
    /// Issues a fresh random token valid for `ttl`.
    pub fn issue(&mut self, ttl: Duration) -> String {
        let now = Instant::now();
        if self.live.len() > 10_000 {
            self.live.retain(|_, expiry| *expiry > now);
        }
        let token = hex::encode(rand::random::<[u8; 24]>());
        self.live.insert(token.clone(), now + ttl);
        token
    }

    pub fn check(&self, token: &str) -> Result<(), TokenError> {
        match self.live.get(token) {
            None => Err(TokenError::Unknown),
            Some(expiry) if *expiry <= Instant::now() => Err(TokenError::Expired),
            Some(_) => Ok(()),
        }
    }

    /// Invalidates every token issued so far.
    pub fn revoke_all(&mut self) {
        self.live.clear();
    }
}

/// Extracts the token of an `Authorization: Bearer` header.
pub(crate) fn bearer(headers: &HeaderMap) -> Result<&str, TokenError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(TokenError::Missing)?;
    let (scheme, token) = value.split_once(' ').ok_or(TokenError::Missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(TokenError::Missing);
    }
    Ok(token.trim())
}

/// Issues a token and renders the token response of both endpoints.
fn token_response(sim: &Shared) -> Response {
    let ttl = sim.faults().token_ttl.unwrap_or(sim.opts.token_ttl);
    let token = sim.tokens().issue(ttl);
    let expires_in = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    let body = json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": expires_in,
        "id_token": id_token(sim, ttl),
        "refresh_token": hex::encode(rand::random::<[u8; 16]>()),
        "scope": "RealTimeApi AdminApi ReportingApi",
    });
    (StatusCode::OK, Json(body)).into_response()
}

/// An HS256 JWT (keyed with the access key secret) carrying `tenantId`, `iss` and `exp`.
fn id_token(sim: &Shared, ttl: Duration) -> String {
    let now = chrono::Utc::now().timestamp();
    let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2);
    let header = json!({"alg": "HS256", "typ": "JWT"});
    let payload = json!({
        "iss": sim.base_url,
        "sub": format!("user:{}", sim.opts.access_key_id),
        "aud": "cxone-offboard",
        "tenantId": sim.opts.tenant_id,
        "name": sim.opts.access_key_id,
        "iat": now,
        "exp": now.saturating_add(ttl_secs),
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(payload.to_string())
    );
    let signature = match Hmac::<Sha256>::new_from_slice(sim.opts.access_key_secret.as_bytes()) {
        Ok(mut mac) => {
            mac.update(signing_input.as_bytes());
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        }
        Err(_) => String::new(),
    };
    format!("{signing_input}.{signature}")
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AccessKeyRequest {
    access_key_id: String,
    access_key_secret: String,
}

/// The token endpoints answer a fault status when one is set.
fn token_fault(sim: &Shared) -> Option<Response> {
    let status = sim.faults().token_status?;
    let status = StatusCode::from_u16(status).ok()?;
    Some(ApiError::new(status, "injected token endpoint fault").into_response())
}

/// `POST /authentication/v1/token/access-key`.
pub(crate) async fn access_key_token(State(sim): State<Shared>, body: Bytes) -> Response {
    if let Some(fault) = token_fault(&sim) {
        return fault;
    }
    let request: AccessKeyRequest = match parse_json(&body) {
        Ok(request) => request,
        Err(error) => return error.code("invalid_request").into_response(),
    };
    if request.access_key_id != sim.opts.access_key_id
        || request.access_key_secret != sim.opts.access_key_secret
    {
        return ApiError::new(StatusCode::UNAUTHORIZED, "invalid access key id or secret")
            .code("invalid_client")
            .into_response();
    }
    token_response(&sim)
}

/// `POST /auth/token`: the OAuth2 password grant (form body, any HTTP Basic client).
pub(crate) async fn password_token(
    State(sim): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(fault) = token_fault(&sim) {
        return fault;
    }
    if let Some(basic) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let valid = basic
            .strip_prefix("Basic ")
            .and_then(|b64| STANDARD.decode(b64.trim()).ok())
            .is_some_and(|raw| raw.contains(&b':'));
        if !valid {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "malformed HTTP Basic client credentials",
            )
            .code("invalid_client")
            .into_response();
        }
    }
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    match form.get("grant_type").map(String::as_str) {
        Some("password") => {}
        Some(other) => {
            return ApiError::bad_request(format!("grant_type {other} is not supported"))
                .code("unsupported_grant_type")
                .into_response();
        }
        None => {
            return ApiError::bad_request("grant_type is required")
                .code("invalid_request")
                .into_response();
        }
    }
    let (Some(username), Some(password)) = (form.get("username"), form.get("password")) else {
        return ApiError::bad_request("username and password are required")
            .code("invalid_request")
            .into_response();
    };
    if *username != sim.opts.access_key_id || *password != sim.opts.access_key_secret {
        return ApiError::bad_request("invalid username or password")
            .code("invalid_grant")
            .into_response();
    }
    token_response(&sim)
}

/// `GET /.well-known/openid-configuration`.
pub(crate) async fn openid_configuration(State(sim): State<Shared>) -> Json<Value> {
    let base = &sim.base_url;
    Json(json!({
        "issuer": base,
        "token_endpoint": format!("{base}/auth/token"),
        "authorization_endpoint": format!("{base}/auth/authorize"),
        "jwks_uri": format!("{base}/.well-known/jwks"),
        "grant_types_supported": ["password", "authorization_code", "refresh_token"],
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["HS256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic"],
    }))
}

/// `GET /.well-known/cxone-configuration?tenantId=…`.
pub(crate) async fn cxone_configuration(
    State(sim): State<Shared>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let tenant = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(key, _)| key == "tenantId")
        .map(|(_, value)| value.into_owned())
        .filter(|value| !value.is_empty())
        .ok_or_else(|| ApiError::bad_request("the tenantId query parameter is required"))?;
    let base = &sim.base_url;
    Ok(Json(json!({
        "private": false,
        "area": "na1",
        "cluster": "sim",
        "domain": "sim.example",
        "tenantId": tenant,
        "api_endpoint": base,
        "auth_endpoint": base,
        "ui_endpoint": base,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_expire_and_can_be_revoked() {
        let mut tokens = Tokens::default();
        let short = tokens.issue(Duration::ZERO);
        let long = tokens.issue(Duration::from_secs(60));
        assert_eq!(tokens.check(&short), Err(TokenError::Expired));
        assert_eq!(tokens.check(&long), Ok(()));
        assert_eq!(tokens.check("nope"), Err(TokenError::Unknown));
        tokens.revoke_all();
        assert_eq!(tokens.check(&long), Err(TokenError::Unknown));
    }

    #[test]
    fn bearer_headers_are_parsed() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer(&headers), Err(TokenError::Missing));
        headers.insert(header::AUTHORIZATION, "bearer abc".parse().expect("header"));
        assert_eq!(bearer(&headers), Ok("abc"));
        headers.insert(header::AUTHORIZATION, "Basic abc".parse().expect("header"));
        assert_eq!(bearer(&headers), Err(TokenError::Missing));
    }
}
