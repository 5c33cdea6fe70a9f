//! UserHub under `/user-management`: search, get, deactivate (a soft delete) and revive
//! (CXONE-API.md §2, §5).

use std::collections::BTreeSet;

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use bytes::Bytes;
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::Shared;
use super::admin::check_step;
use super::error::{ApiError, parse_json};
use super::faults::{Step, StepFault};
use super::gate::RouteKey;
use super::world::{Status, World};

/// Largest `top` of a search; larger values are clamped.
const MAX_TOP: u64 = 100;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Filter {
    external_identity: Option<Vec<String>>,
    user_name: Option<Vec<String>>,
    email_address: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
struct SearchRequest {
    #[serde(default)]
    filter: Filter,
    skip: Option<u64>,
    top: Option<u64>,
}

/// Indices matching every present filter key (any value within a key).
fn matching(world: &World, filter: &Filter) -> Option<BTreeSet<u64>> {
    let mut result: Option<BTreeSet<u64>> = None;
    type Lookup = fn(&World, &str) -> Vec<u64>;
    let keys: [(&Option<Vec<String>>, Lookup); 3] = [
        (&filter.external_identity, |w, v| {
            w.by_external_id(v)
                .into_iter()
                .filter(|n| w.has_external_id(*n))
                .collect()
        }),
        (&filter.user_name, World::by_user_name),
        (&filter.email_address, World::by_email),
    ];
    for (values, lookup) in keys {
        let Some(values) = values else { continue };
        let found: BTreeSet<u64> = values.iter().flat_map(|v| lookup(world, v)).collect();
        result = Some(match result {
            None => found,
            Some(previous) => previous.intersection(&found).copied().collect(),
        });
    }
    result
}

/// `POST /user-management/v2/users/search`: DELETED users are returned too, with their status.
pub(crate) async fn search(
    State(sim): State<Shared>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let request: SearchRequest = if body.iter().all(u8::is_ascii_whitespace) {
        SearchRequest::default()
    } else {
        parse_json(&body)?
    };
    let skip = request.skip.unwrap_or(0);
    let top = request
        .top
        .filter(|t| *t > 0)
        .unwrap_or(MAX_TOP)
        .min(MAX_TOP);
    let mut world = sim.world();
    let (total, indices): (u64, Vec<u64>) = match matching(&world, &request.filter) {
        Some(set) => {
            let total = set.len() as u64;
            let page = set
                .into_iter()
                .skip(usize::try_from(skip).unwrap_or(usize::MAX))
                .take(usize::try_from(top).unwrap_or(usize::MAX))
                .collect();
            (total, page)
        }
        None => {
            let total = world.count();
            let first = skip.saturating_add(1);
            let last = skip.saturating_add(top).min(total);
            (total, (first..=last).collect())
        }
    };
    let mut users = Vec::with_capacity(indices.len());
    for index in indices {
        if let Some(user) = world.user(index) {
            check_step(&sim, &user.external_id, Step::Resolve)?;
            users.push(user.userhub_view());
        }
    }
    Ok(Json(json!({
        "totalRecords": total,
        "skip": skip,
        "top": top,
        "users": users,
    })))
}

fn parse_user_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::not_found(format!("user {id} was not found")))
}

/// `GET /user-management/v3/users/{userId}` → `{"user": {...}}`.
pub(crate) async fn get_user(
    State(sim): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let uuid = parse_user_id(&id)?;
    let mut world = sim.world();
    let user = world
        .by_user_uuid(sim.seed_index(), uuid)
        .and_then(|index| world.user(index))
        .ok_or_else(|| ApiError::not_found(format!("user {id} was not found")))?;
    check_step(&sim, &user.external_id, Step::Resolve)?;
    Ok(Json(json!({"user": user.userhub_view()})))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeactivateRequest {
    user_ids: Vec<String>,
}

/// `POST /user-management/v1/users/deactivate` → `{"notDeletedUserIds": [...]}`.
pub(crate) async fn deactivate(
    State(sim): State<Shared>,
    Extension(RouteKey(route)): Extension<RouteKey>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let request: DeactivateRequest = parse_json(&body)?;
    if request.user_ids.is_empty() {
        return Err(ApiError::bad_request("userIds must not be empty"));
    }
    let mut world = sim.world();
    let mut indices = Vec::with_capacity(request.user_ids.len());
    for id in &request.user_ids {
        let index = Uuid::parse_str(id)
            .ok()
            .and_then(|uuid| world.by_user_uuid(sim.seed_index(), uuid))
            .ok_or_else(|| ApiError::not_found(format!("user {id} was not found")))?;
        let user = world
            .user(index)
            .ok_or_else(|| ApiError::not_found(format!("user {id} was not found")))?;
        check_step(&sim, &user.external_id, Step::Delete)?;
        indices.push((index, id));
    }
    let mut not_deleted = Vec::new();
    for (index, id) in indices {
        let Some(user) = world.user(index) else {
            continue;
        };
        let refused = user.refuse_delete
            || sim.faults().step(&user.external_id, Step::Delete) == Some(StepFault::Refuse);
        if refused {
            not_deleted.push(id.clone());
        } else if user.status != Status::Deleted {
            user.status = Status::Deleted;
            user.deleted_date = Some(Utc::now());
        }
        user.count_write(&route);
    }
    Ok(Json(json!({"notDeletedUserIds": not_deleted})))
}

/// `POST /user-management/v1/users/{userId}/revive` → `{"success": true, "uuid"}`.
pub(crate) async fn revive(
    State(sim): State<Shared>,
    Extension(RouteKey(route)): Extension<RouteKey>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let uuid = parse_user_id(&id)?;
    let mut world = sim.world();
    let user = world
        .by_user_uuid(sim.seed_index(), uuid)
        .and_then(|index| world.user(index))
        .ok_or_else(|| ApiError::not_found(format!("user {id} was not found")))?;
    user.status = Status::Active;
    user.deleted_date = None;
    user.count_write(&route);
    Ok(Json(json!({"success": true, "uuid": user.user_id})))
}
