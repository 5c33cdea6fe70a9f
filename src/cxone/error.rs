//! The one error type of CXone calls. Every failure is classified once, here: transient ones
//! are worth retrying, permanent ones are not. Messages never carry a secret.

use std::time::Duration;

/// Retry intent, decided by the client (apalis's `RetryAfterError` / `AbortError` idea).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorKind {
    /// Timeouts, connection failures, 408, 425, 429, 5xx, an open circuit: try again later.
    Transient,
    /// 400, 401 after a refresh, 403, 404 on something that must exist, 409, 422, a malformed
    /// answer: retrying cannot help.
    Permanent,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{method} {route}: {message}{}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
pub struct CxoneError {
    pub kind: ErrorKind,
    /// The HTTP status, when there was an answer.
    pub status: Option<u16>,
    pub method: &'static str,
    /// The route template, e.g. `/agents/{agentId}` — never a concrete URL with ids or tokens.
    pub route: &'static str,
    pub message: String,
    /// What the server asked us to wait, for 429 and 503.
    pub retry_after: Option<Duration>,
}

impl CxoneError {
    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }

    pub(crate) fn new(
        kind: ErrorKind,
        method: &'static str,
        route: &'static str,
        status: Option<u16>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            status,
            method,
            route,
            message: message.into(),
            retry_after: None,
        }
    }
}

/// A short, secret-free description of a transport error.
pub fn describe_reqwest(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "connection dropped while reading the answer"
    } else if e.is_request() {
        "request failed"
    } else {
        "transport error"
    };
    // The source chain names the I/O cause (reset, refused…); URLs carry no secrets.
    let mut cause = String::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    if cause.is_empty() {
        what.to_owned()
    } else {
        format!("{what}: {cause}")
    }
}

/// The class of an HTTP status (CXONE-API.md §7). 401 is handled before this (refresh once).
pub fn classify_status(status: u16) -> ErrorKind {
    match status {
        408 | 425 | 429 | 500..=599 => ErrorKind::Transient,
        _ => ErrorKind::Permanent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_as_the_api_doc_says() {
        for s in [408, 425, 429, 500, 502, 503, 504] {
            assert_eq!(classify_status(s), ErrorKind::Transient, "{s}");
        }
        for s in [400, 401, 403, 404, 405, 409, 422] {
            assert_eq!(classify_status(s), ErrorKind::Permanent, "{s}");
        }
    }

    #[test]
    fn display_names_route_and_status() {
        let e = CxoneError::new(
            ErrorKind::Permanent,
            "PUT",
            "/agents/{agentId}",
            Some(403),
            "forbidden",
        );
        assert_eq!(e.to_string(), "PUT /agents/{agentId}: forbidden (HTTP 403)");
    }
}
