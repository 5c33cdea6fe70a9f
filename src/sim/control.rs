//! The control API under `/_sim/` (CONTRACT §10): inspect and create users, set agent states,
//! read request counts, set faults, reset. Not authenticated, not counted, not throttled.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::Shared;
use super::error::{ApiError, parse_json};
use super::faults::FaultsRequest;
use super::world::{AgentState, CreateError, Skill, Status};

fn unknown_user(external_id: &str) -> ApiError {
    ApiError::not_found(format!("no user with external id {external_id}"))
}

/// `GET /_sim/users/{external_id}`.
pub(crate) async fn get_user(
    State(sim): State<Shared>,
    Path(external_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let mut world = sim.world();
    let user = world
        .by_external_id(&external_id)
        .and_then(|index| world.user(index))
        .ok_or_else(|| unknown_user(&external_id))?;
    Ok(Json(user.control_view()))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SkillSpec {
    skill_id: i64,
    proficiency: Option<u8>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    /// `null` or absent: a service account without an external id.
    external_id: Option<String>,
    username: Option<String>,
    email: Option<String>,
    /// `ACTIVE` (default) or `DELETED`.
    status: Option<String>,
    interactions: Option<u64>,
    skills: Option<Vec<SkillSpec>>,
    state: Option<String>,
    refuse_delete: Option<bool>,
}

fn parse_state(name: &str) -> Result<AgentState, ApiError> {
    AgentState::parse(name).ok_or_else(|| {
        ApiError::bad_request(format!(
            "unknown state {name:?}; use LoggedOut, LoggedIn, Available, Unavailable, \
             InboundContact, OutboundContact, InboundConsult, OutboundConsult or Dialer"
        ))
    })
}

/// `POST /_sim/users` → 201 with the new user; 409 if the external id exists.
pub(crate) async fn create_user(
    State(sim): State<Shared>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let request: NewUser = parse_json(&body)?;
    let state = request.state.as_deref().map(parse_state).transpose()?;
    if request
        .interactions
        .is_some_and(|n| n > u64::from(u32::MAX))
    {
        return Err(ApiError::bad_request(
            "interactions must be at most 4294967295",
        ));
    }
    let mut skills = Vec::new();
    for skill in request.skills.iter().flatten() {
        let proficiency = skill.proficiency.unwrap_or(3);
        if skill.skill_id <= 0 || !(1..=5).contains(&proficiency) {
            return Err(ApiError::bad_request(
                "skills need a positive skillId and a proficiency in 1..=5",
            ));
        }
        skills.push((skill.skill_id, proficiency));
    }
    let status = match request.status.as_deref() {
        None => Status::Active,
        Some(s) => Status::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!("unknown status {s:?}; use ACTIVE or DELETED"))
        })?,
    };
    for (what, value) in [("username", &request.username), ("email", &request.email)] {
        if value
            .as_deref()
            .is_some_and(|v| v.is_empty() || v.len() > 256 || v.chars().any(char::is_control))
        {
            return Err(ApiError::bad_request(format!(
                "{what} must be 1-256 printable characters"
            )));
        }
    }
    let mut world = sim.world();
    let created = match &request.external_id {
        Some(id) => world.create(id, request.interactions),
        None => world.create_without_external_id(request.interactions),
    };
    let index = created
        .map_err(|error| match error {
            CreateError::Exists(_) => ApiError::new(StatusCode::CONFLICT, error.to_string()),
            CreateError::BadExternalId => ApiError::bad_request(error.to_string()),
        })?
        .index;
    if request.username.is_some() || request.email.is_some() {
        world.rename(index, request.username.clone(), request.email.clone());
    }
    let user = world
        .user(index)
        .ok_or_else(|| ApiError::not_found("the created user vanished"))?;
    if status == Status::Deleted {
        user.set_status(Status::Deleted);
    }
    if request.skills.is_some() {
        user.skills = skills
            .into_iter()
            .map(|(id, proficiency)| {
                (
                    id,
                    Skill {
                        proficiency,
                        is_active: true,
                    },
                )
            })
            .collect();
    }
    if let Some(state) = state {
        user.set_state(state);
    }
    user.refuse_delete = request.refuse_delete.unwrap_or(false);
    Ok((StatusCode::CREATED, Json(user.control_view())))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetStatus {
    status: String,
}

/// `POST /_sim/users/{external_id}/status` `{"status": "ACTIVE"}`: an administrator re-enables
/// the account by hand (UserHub ACTIVE, agent active again); `"DELETED"` deactivates it.
pub(crate) async fn set_status(
    State(sim): State<Shared>,
    Path(external_id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let request: SetStatus = parse_json(&body)?;
    let status = Status::parse(&request.status).ok_or_else(|| {
        ApiError::bad_request(format!(
            "unknown status {:?}; use ACTIVE or DELETED",
            request.status
        ))
    })?;
    let mut world = sim.world();
    let user = world
        .by_external_id(&external_id)
        .and_then(|index| world.user(index))
        .ok_or_else(|| unknown_user(&external_id))?;
    user.set_status(status);
    Ok(Json(user.control_view()))
}

#[derive(Deserialize)]
struct SetState {
    state: String,
}

/// `POST /_sim/users/{external_id}/state` `{"state": "InboundContact"}`.
pub(crate) async fn set_state(
    State(sim): State<Shared>,
    Path(external_id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let request: SetState = parse_json(&body)?;
    let state = parse_state(&request.state)?;
    let mut world = sim.world();
    let user = world
        .by_external_id(&external_id)
        .and_then(|index| world.user(index))
        .ok_or_else(|| unknown_user(&external_id))?;
    user.set_state(state);
    Ok(Json(user.control_view()))
}

/// `GET /_sim/stats`.
pub(crate) async fn stats(State(sim): State<Shared>) -> Json<Value> {
    Json(sim.stats().to_json())
}

/// `GET /_sim/faults`: the active faults.
pub(crate) async fn get_faults(State(sim): State<Shared>) -> Json<Value> {
    Json(sim.faults().to_json())
}

/// `POST /_sim/faults`: replaces all faults (`{}` clears them) and answers the active set.
pub(crate) async fn set_faults(
    State(sim): State<Shared>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let request: FaultsRequest = parse_json(&body)?;
    let revoke = request.revoke_tokens.unwrap_or(false);
    let faults = request.into_faults().map_err(ApiError::bad_request)?;
    if revoke {
        sim.tokens().revoke_all();
    }
    let view = faults.to_json();
    sim.set_faults(faults);
    Ok(Json(view))
}

/// `POST /_sim/reset`: seeded state back, faults and stats cleared (issued tokens stay valid).
pub(crate) async fn reset(State(sim): State<Shared>) -> Json<Value> {
    sim.reset();
    Json(json!({"reset": true}))
}
