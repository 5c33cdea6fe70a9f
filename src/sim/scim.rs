//! SCIM 2.0 Users under `/scim/v2` (RFC 7644): filter, get, PATCH and PUT of `active`; no
//! DELETE, as on CXone (CXONE-API.md §6).

use axum::Extension;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::admin::{check_step, query_pairs};
use super::error::{ApiError, parse_json};
use super::faults::Step;
use super::gate::RouteKey;
use super::world::{User, World};
use super::{Shared, Sim};

fn scim_json(status: StatusCode, body: Value, etag: Option<String>) -> Response {
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/scim+json"),
    );
    if let Some(value) = etag.and_then(|e| HeaderValue::from_str(&e).ok()) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}

/// A parsed `attribute eq "value"` filter.
fn parse_filter(filter: &str) -> Result<(String, String), ApiError> {
    let invalid = || {
        ApiError::bad_request(format!(
            "unsupported filter {filter:?}: use externalId, userName or id eq \"value\""
        ))
        .scim_type("invalidFilter")
    };
    let mut parts = filter.trim().splitn(3, char::is_whitespace);
    let attribute = parts.next().ok_or_else(invalid)?;
    let operator = parts.next().ok_or_else(invalid)?;
    let value = parts.next().ok_or_else(invalid)?.trim();
    if !operator.eq_ignore_ascii_case("eq") {
        return Err(invalid());
    }
    let value = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .ok_or_else(invalid)?;
    Ok((attribute.to_owned(), value.replace("\\\"", "\"")))
}

fn lookup(sim: &Sim, world: &World, attribute: &str, value: &str) -> Result<Option<u64>, ApiError> {
    Ok(match attribute.to_ascii_lowercase().as_str() {
        "externalid" => world
            .by_external_id(value)
            .filter(|n| world.has_external_id(*n)),
        "username" => world.by_user_name(value).into_iter().next(),
        "emails" | "emails.value" => world.by_email(value).into_iter().next(),
        "id" => Uuid::parse_str(value)
            .ok()
            .and_then(|id| world.by_scim_id(sim.seed_index(), id)),
        _ => {
            return Err(ApiError::bad_request(format!(
                "filtering on {attribute} is not supported"
            ))
            .scim_type("invalidFilter"));
        }
    })
}

/// `GET /scim/v2/Users?filter=…&startIndex&count` → `ListResponse` (never 404).
pub(crate) async fn list(
    State(sim): State<Shared>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(query.as_deref());
    let get = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let number = |name: &str, default: u64| -> Result<u64, ApiError> {
        get(name).map_or(Ok(default), |v| {
            v.parse().map_err(|_| {
                ApiError::bad_request(format!("{name} must be an integer"))
                    .scim_type("invalidValue")
            })
        })
    };
    let start_index = number("startIndex", 1)?.max(1);
    let count = number("count", 100)?.min(100);
    let mut world = sim.world();
    let indices: Vec<u64> = match get("filter") {
        Some(filter) => {
            let (attribute, value) = parse_filter(filter)?;
            lookup(&sim, &world, &attribute, &value)?
                .into_iter()
                .collect()
        }
        None => {
            let first = start_index;
            let last = first
                .saturating_add(count)
                .saturating_sub(1)
                .min(world.count());
            (first..=last).collect()
        }
    };
    let total = if get("filter").is_some() {
        indices.len() as u64
    } else {
        world.count()
    };
    let mut resources = Vec::new();
    for index in indices {
        if let Some(user) = world.user(index) {
            check_step(&sim, &user.external_id, Step::Resolve).map_err(ApiError::scim)?;
            resources.push(user.scim_view(&sim.base_url));
        }
    }
    let body = json!({
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:ListResponse"],
        "totalResults": total,
        "startIndex": start_index,
        "itemsPerPage": resources.len(),
        "Resources": resources,
    });
    Ok(scim_json(StatusCode::OK, body, None))
}

fn find<'w>(sim: &Sim, world: &'w mut World, id: &str) -> Result<&'w mut User, ApiError> {
    Uuid::parse_str(id)
        .ok()
        .and_then(|uuid| world.by_scim_id(sim.seed_index(), uuid))
        .and_then(|index| world.user(index))
        .ok_or_else(|| ApiError::not_found(format!("Resource {id} not found")).scim())
}

/// `GET /scim/v2/Users/{id}`.
pub(crate) async fn get(
    State(sim): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let mut world = sim.world();
    let user = find(&sim, &mut world, &id)?;
    check_step(&sim, &user.external_id, Step::Resolve).map_err(ApiError::scim)?;
    Ok(scim_json(
        StatusCode::OK,
        user.scim_view(&sim.base_url),
        Some(user.scim_etag()),
    ))
}

/// `412` unless `If-Match` is absent, `*` or the current version.
fn check_version(headers: &HeaderMap, user: &User) -> Result<(), ApiError> {
    let Some(expected) = headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let current = user.scim_etag();
    let matches = expected.split(',').map(str::trim).any(|tag| {
        tag == "*"
            || tag == current
            || tag.trim_start_matches("W/") == current.trim_start_matches("W/")
    });
    if matches {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            format!("version {expected} does not match {current}"),
        )
        .scim())
    }
}

#[derive(Deserialize)]
struct PatchOperation {
    op: String,
    path: Option<String>,
    value: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PatchRequest {
    #[serde(rename = "schemas")]
    schemas: Option<Vec<String>>,
    operations: Vec<PatchOperation>,
}

const PATCH_OP: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";

/// The new `active` value of a PATCH request (only `active` may be changed).
fn patched_active(request: &PatchRequest) -> Result<Option<bool>, ApiError> {
    if let Some(schemas) = &request.schemas
        && !schemas.iter().any(|s| s == PATCH_OP)
    {
        return Err(
            ApiError::bad_request(format!("schemas must contain {PATCH_OP}"))
                .scim_type("invalidSyntax"),
        );
    }
    let mut active = None;
    for operation in &request.operations {
        if !["replace", "add"].contains(&operation.op.to_ascii_lowercase().as_str()) {
            return Err(
                ApiError::bad_request(format!("op {} is not supported", operation.op))
                    .scim_type("invalidSyntax"),
            );
        }
        let value = match (operation.path.as_deref(), &operation.value) {
            (Some(path), Some(value)) if path.eq_ignore_ascii_case("active") => value.clone(),
            (None, Some(Value::Object(map))) => match map.get("active") {
                Some(value) => value.clone(),
                None => continue,
            },
            (Some(path), _) if !path.eq_ignore_ascii_case("active") => {
                return Err(
                    ApiError::bad_request(format!("path {path} cannot be modified"))
                        .scim_type("mutability"),
                );
            }
            _ => {
                return Err(
                    ApiError::bad_request("operation has no value").scim_type("invalidValue")
                );
            }
        };
        active = Some(match value {
            Value::Bool(b) => b,
            Value::String(s) if s.eq_ignore_ascii_case("true") => true,
            Value::String(s) if s.eq_ignore_ascii_case("false") => false,
            other => {
                return Err(ApiError::bad_request(format!(
                    "active must be a boolean, not {other}"
                ))
                .scim_type("invalidValue"));
            }
        });
    }
    Ok(active)
}

/// `PATCH /scim/v2/Users/{id}` with a PatchOp replacing `active` → 200 with the resource.
pub(crate) async fn patch(
    State(sim): State<Shared>,
    Extension(RouteKey(route)): Extension<RouteKey>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: PatchRequest = parse_json(&body).map_err(|e| e.scim_type("invalidSyntax"))?;
    let active = patched_active(&request)?;
    let mut world = sim.world();
    let user = find(&sim, &mut world, &id)?;
    check_step(&sim, &user.external_id, Step::BlockLogin).map_err(ApiError::scim)?;
    check_version(&headers, user)?;
    if let Some(active) = active {
        user.scim_active = active;
        user.scim_version += 1;
    }
    user.count_write(&route);
    Ok(scim_json(
        StatusCode::OK,
        user.scim_view(&sim.base_url),
        Some(user.scim_etag()),
    ))
}

/// `PUT /scim/v2/Users/{id}`: replaces the resource; only `active` is taken from it.
pub(crate) async fn put(
    State(sim): State<Shared>,
    Extension(RouteKey(route)): Extension<RouteKey>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let resource: Value = parse_json(&body).map_err(|e| e.scim_type("invalidSyntax"))?;
    let Value::Object(resource) = resource else {
        return Err(
            ApiError::bad_request("the body must be a User resource").scim_type("invalidSyntax")
        );
    };
    let active = match resource.get("active") {
        None => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(other) => {
            return Err(
                ApiError::bad_request(format!("active must be a boolean, not {other}"))
                    .scim_type("invalidValue"),
            );
        }
    };
    let mut world = sim.world();
    let user = find(&sim, &mut world, &id)?;
    check_step(&sim, &user.external_id, Step::BlockLogin).map_err(ApiError::scim)?;
    check_version(&headers, user)?;
    if let Some(external_id) = resource.get("externalId").and_then(Value::as_str)
        && external_id != user.external_id
    {
        return Err(ApiError::bad_request("externalId cannot be changed").scim_type("mutability"));
    }
    user.scim_active = active.unwrap_or(true);
    user.scim_version += 1;
    user.count_write(&route);
    Ok(scim_json(
        StatusCode::OK,
        user.scim_view(&sim.base_url),
        Some(user.scim_etag()),
    ))
}

/// `DELETE /scim/v2/Users/{id}`: CXone has no SCIM DELETE → 405.
pub(crate) async fn delete(Path(id): Path<String>) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("DELETE is not supported for Users/{id}; PATCH active=false instead"),
    )
    .scim()
}
