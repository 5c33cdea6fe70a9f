//! The middleware in front of the CXone API: content negotiation (`406`), bearer tokens
//! (`401`), the rate limiter (`429`), route-scoped faults, and the request counts of
//! `/_sim/stats`.

use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::Shared;
use super::auth::{TokenError, bearer};
use super::error::ApiError;
use super::limiter::retry_after;
use super::stats::RESET;

/// The `METHOD route-template` key of a request, available to handlers as an extension.
#[derive(Debug, Clone)]
pub(crate) struct RouteKey(pub String);

/// Marks a response whose connection must be dropped without an answer.
#[derive(Debug, Clone, Copy)]
struct ConnectionReset;

fn route_key(req: &Request) -> String {
    let template = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| req.uri().path(), MatchedPath::as_str);
    format!("{} {template}", req.method())
}

/// Counts requests to the auth and discovery endpoints (not in `total`).
pub(crate) async fn open(State(sim): State<Shared>, req: Request, next: Next) -> Response {
    let key = route_key(&req);
    let response = next.run(req).await;
    sim.stats().record(&key, response.status().as_str(), false);
    response
}

/// Gates every authenticated request and counts it.
pub(crate) async fn authenticated(State(sim): State<Shared>, req: Request, next: Next) -> Response {
    let key = route_key(&req);
    sim.stats().started(&key);
    let response = gate(&sim, key.clone(), req, next).await;
    sim.stats().finished(&key);
    let status = response.status();
    let status = if response.extensions().get::<ConnectionReset>().is_some() {
        RESET
    } else {
        status.as_str()
    };
    sim.stats().record(&key, status, true);
    response
}

/// True if the `Accept` header admits a JSON answer (absent admits everything).
fn accepts_json(req: &Request) -> bool {
    let mut values = req.headers().get_all(header::ACCEPT).iter().peekable();
    if values.peek().is_none() {
        return true;
    }
    values
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|range| {
            range
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .any(|range| {
            range.is_empty()
                || range == "*/*"
                || range == "application/*"
                || range == "application/json"
                || range.ends_with("+json")
        })
}

async fn gate(sim: &Shared, key: String, mut req: Request, next: Next) -> Response {
    if !accepts_json(&req) {
        return ApiError::new(StatusCode::NOT_ACCEPTABLE, "No known way to render data")
            .into_response();
    }
    let checked = bearer(req.headers()).and_then(|token| sim.tokens().check(token));
    if let Err(error) = checked {
        let description = match error {
            TokenError::Missing => "an Authorization: Bearer token is required",
            TokenError::Unknown => "the token is unknown or was revoked",
            TokenError::Expired => "the token has expired",
        };
        return ApiError::new(StatusCode::UNAUTHORIZED, description)
            .code("invalid_token")
            .into_response();
    }
    let (form, fixed) = {
        let f = sim.faults();
        (
            f.retry_after.unwrap_or(sim.opts.retry_after),
            f.retry_after_secs,
        )
    };
    let retry_after = |form, wait: std::time::Duration| match fixed {
        Some(secs) => HeaderValue::from_str(&secs.to_string()).ok(),
        None => retry_after(form, wait),
    };
    if let Some(limiter) = &sim.limiter {
        let taken = limiter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .try_take(Instant::now());
        if let Err(wait) = taken {
            sim.stats().throttled();
            let mut response =
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded").into_response();
            if let Some(value) = retry_after(form, wait) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            return response;
        }
    }
    let (latency, error, reset, malformed) = {
        let faults = sim.faults();
        if faults.applies_to(&key) {
            let roll = |rate: f64| rate > 0.0 && rand::random::<f64>() < rate;
            (
                faults.latency,
                roll(faults.error_rate).then_some(faults.status),
                roll(faults.reset_connections),
                roll(faults.malformed_json),
            )
        } else {
            Default::default()
        }
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if reset {
        return connection_reset();
    }
    if let Some(status) = error {
        let mut response = ApiError::status(status, "injected fault").into_response();
        if status == 429
            && let Some(value) = retry_after(form, std::time::Duration::from_secs(1))
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        return response;
    }
    req.extensions_mut().insert(RouteKey(key));
    let response = next.run(req).await;
    if malformed {
        return malform(response).await;
    }
    response
}

/// A response whose body fails before its first byte: hyper drops the connection without
/// writing the head, so the client sees a connection error rather than a status.
fn connection_reset() -> Response {
    let stream = futures_util::stream::once(async {
        Err::<bytes::Bytes, std::io::Error>(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "injected connection reset",
        ))
    });
    let mut response = Body::from_stream(stream).into_response();
    response.extensions_mut().insert(ConnectionReset);
    response
}

/// Replaces the body with its first half (at least a dangling `{"`): 200, not valid JSON.
async fn malform(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let mut truncated = bytes.slice(..bytes.len() / 2).to_vec();
    if truncated.len() < 2 {
        truncated = b"{\"".to_vec();
    }
    parts.status = StatusCode::OK;
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    Response::from_parts(parts, Body::from(truncated))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(accept: Option<&str>) -> Request {
        let mut builder = axum::http::Request::builder().uri("/x");
        if let Some(accept) = accept {
            builder = builder.header(header::ACCEPT, accept);
        }
        builder.body(Body::empty()).expect("request")
    }

    #[test]
    fn accept_is_lenient_but_refuses_explicit_non_json() {
        assert!(accepts_json(&request(None)));
        assert!(accepts_json(&request(Some("application/json"))));
        assert!(accepts_json(&request(Some("*/*"))));
        assert!(accepts_json(&request(Some(
            "text/html, application/scim+json;q=0.9"
        ))));
        assert!(!accepts_json(&request(Some("text/html"))));
        assert!(!accepts_json(&request(Some("application/xml"))));
    }
}
