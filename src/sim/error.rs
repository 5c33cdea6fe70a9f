//! Error answers: CXone-style `{"error", "error_description"}` bodies for the admin, UserHub
//! and auth APIs, RFC 7644 error bodies for SCIM.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde_json::json;

/// Which API's error body to render.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavor {
    Cxone,
    Scim,
}

/// An error answer of the simulated API.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub description: String,
    pub flavor: Flavor,
    pub scim_type: Option<&'static str>,
    pub error_code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, description: impl Into<String>) -> Self {
        Self {
            status,
            description: description.into(),
            flavor: Flavor::Cxone,
            scim_type: None,
            error_code: None,
        }
    }

    pub fn bad_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, description)
    }

    pub fn not_found(description: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, description)
    }

    /// An arbitrary status (from an injected fault), falling back to 500 if out of range.
    pub fn status(status: u16, description: impl Into<String>) -> Self {
        Self::new(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            description,
        )
    }

    /// Sets the OAuth-style `error` code (otherwise the status's reason phrase).
    pub fn code(mut self, code: &'static str) -> Self {
        self.error_code = Some(code);
        self
    }

    /// Renders as an RFC 7644 error.
    pub fn scim(mut self) -> Self {
        self.flavor = Flavor::Scim;
        self
    }

    pub fn scim_type(mut self, scim_type: &'static str) -> Self {
        self.flavor = Flavor::Scim;
        self.scim_type = Some(scim_type);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (body, content_type) = match self.flavor {
            Flavor::Cxone => (
                json!({
                    "error": self.error_code.unwrap_or_else(|| self.status.canonical_reason().unwrap_or("Error")),
                    "error_description": self.description,
                }),
                "application/json; charset=utf-8",
            ),
            Flavor::Scim => {
                let mut body = json!({
                    "schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"],
                    "status": self.status.as_u16().to_string(),
                    "detail": self.description,
                });
                if let (Some(kind), Some(map)) = (self.scim_type, body.as_object_mut()) {
                    map.insert("scimType".to_owned(), json!(kind));
                }
                (body, "application/scim+json")
            }
        };
        let mut response = (self.status, body.to_string()).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
        }
        response
    }
}

/// Parses a JSON request body, whatever its `Content-Type`; `400` with a JSON error otherwise.
pub(crate) fn parse_json<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("a JSON request body is required"));
    }
    serde_json::from_slice(body)
        .map_err(|error| ApiError::bad_request(format!("malformed JSON body: {error}")))
}

/// `404` for a path no route matches.
pub(crate) async fn not_found_route(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no resource at {}", uri.path()))
}

/// `405` for a known path with an unsupported method.
pub(crate) async fn method_not_allowed(
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not supported on {}", uri.path()),
    )
}
