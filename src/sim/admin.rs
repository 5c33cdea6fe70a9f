//! The Admin, Real-time and Reporting API under `/inContactAPI/services/{version}`: agents,
//! skills, logout, agent states, access keys and completed contacts (CXONE-API.md §3–4).

use axum::Extension;
use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chrono::{DateTime, NaiveDate, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{ApiError, parse_json};
use super::faults::{Step, StepFault};
use super::gate::RouteKey;
use super::world::{Skill, User, World};
use super::{Shared, Sim};

/// Answers with the status configured for this user's step, if any (`refuse` is not a status).
pub(crate) fn check_step(sim: &Sim, external_id: &str, step: Step) -> Result<(), ApiError> {
    match sim.faults().step(external_id, step) {
        Some(StepFault::Status(status)) => Err(ApiError::status(
            status,
            format!("injected {} failure for {external_id}", step.name()),
        )),
        Some(StepFault::Refuse) | None => Ok(()),
    }
}

/// The user behind an agent reference (numeric agent id or user UUID); 404 if none.
pub(crate) fn find_agent<'w>(
    sim: &Sim,
    world: &'w mut World,
    reference: &str,
) -> Result<&'w mut User, ApiError> {
    world
        .by_agent_ref(|| sim.seed_index(), reference)
        .and_then(|index| world.user(index))
        .ok_or_else(|| ApiError::not_found(format!("agent {reference} was not found")))
}

/// Query parameters as a list of pairs (never fails on odd input).
pub(crate) fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

fn param<'q>(pairs: &'q [(String, String)], name: &str) -> Option<&'q str> {
    pairs
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.as_str())
}

fn number_param(pairs: &[(String, String)], name: &str) -> Result<Option<u64>, ApiError> {
    param(pairs, name)
        .map(|value| {
            value.trim().parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!(
                    "{name} must be a non-negative integer, not {value:?}"
                ))
            })
        })
        .transpose()
}

fn date_param(pairs: &[(String, String)], name: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
    let Some(value) = param(pairs, name).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    if let Ok(at) = DateTime::parse_from_rfc3339(value) {
        return Ok(Some(at.with_timezone(&Utc)));
    }
    NaiveDate::parse_from_str(value, "%Y-%m-%d")
        .ok()
        .and_then(|day| day.and_hms_opt(0, 0, 0))
        .map(|at| Some(at.and_utc()))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "{name} must be an RFC 3339 date-time, not {value:?}"
            ))
        })
}

/// `GET /agents/{agentId}`: by numeric agent id or user UUID.
pub(crate) async fn get_agent(
    State(sim): State<Shared>,
    Path((_version, agent)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let mut world = sim.world();
    let user = find_agent(&sim, &mut world, &agent)?;
    check_step(&sim, &user.external_id, Step::Resolve)?;
    Ok(Json(json!({"agents": [user.agent_view()]})))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AgentUpdate {
    is_active: Option<bool>,
    termination_date: Option<String>,
}

#[derive(Deserialize)]
struct PutAgent {
    agent: AgentUpdate,
}

/// `PUT /agents/{agentId}` with `{"agent": {"isActive", "terminationDate"?}}`.
pub(crate) async fn put_agent(
    State(sim): State<Shared>,
    Extension(RouteKey(route)): Extension<RouteKey>,
    Path((_version, agent)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let PutAgent { agent: update } = parse_json(&body)?;
    if let Some(date) = &update.termination_date
        && DateTime::parse_from_rfc3339(date).is_err()
        && NaiveDate::parse_from_str(date, "%Y-%m-%d").is_err()
    {
        return Err(ApiError::bad_request(format!(
            "terminationDate must be an RFC 3339 date, not {date:?}"
        )));
    }
    let mut world = sim.world();
    let user = find_agent(&sim, &mut world, &agent)?;
    check_step(&sim, &user.external_id, Step::BlockLogin)?;
    if let Some(active) = update.is_active {
        user.agent_active = active;
        if active && update.termination_date.is_none() {
            user.termination_date = None;
        }
    }
    if update.termination_date.is_some() {
        user.termination_date = update.termination_date;
    }
    user.count_write(&route);
    Ok(Json(json!({"agents": [user.agent_view()]})))
}

fn skills_view(user: &User) -> Value {
    let assignments: Vec<Value> = user
        .skills
        .iter()
        .map(|(id, skill)| {
            json!({
                "agentId": user.agent_id(),
                "skillId": id,
                "skillName": format!("Skill {id}"),
                "isActive": skill.is_active,
                "agentProficiencyValue": skill.proficiency,
                "agentProficiencyName": proficiency_name(skill.proficiency),
            })
        })
        .collect();
    json!({"agentSkillAssignments": assignments})
}

fn proficiency_name(value: u8) -> &'static str {
    match value {
        1 => "1 - Highest",
        2 => "2 - High",
        3 => "3 - Medium",
        4 => "4 - Low",
        _ => "5 - Lowest",
    }
}

/// `GET /agents/{agentId}/skills`.
pub(crate) async fn get_skills(
    State(sim): State<Shared>,
    Path((_version, agent)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let mut world = sim.world();
    let user = find_agent(&sim, &mut world, &agent)?;
    Ok(Json(skills_view(user)))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SkillRef {
    skill_id: i64,
    is_active: Option<bool>,
    proficiency: Option<u8>,
}

#[derive(Deserialize)]
struct SkillsBody {
    skills: Vec<SkillRef>,
}

fn result_set(results: Vec<Value>) -> Json<Value> {
    let errors = results
        .iter()
        .filter(|r| r["success"] != Value::Bool(true))
        .count();
    Json(json!({"resultSet": {"errorCount": errors, "skillResults": results}}))
}

/// `DELETE /agents/{agentId}/skills` with `{"skills": [{"skillId"}]}`: per-skill results.
pub(crate) async fn delete_skills(
    State(sim): State<Shared>,
    Extension(RouteKey(route)): Extension<RouteKey>,
    Path((_version, agent)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let request: SkillsBody = parse_json(&body)?;
    let mut world = sim.world();
    let user = find_agent(&sim, &mut world, &agent)?;
    check_step(&sim, &user.external_id, Step::UnassignSkills)?;
    let results = request
        .skills
        .iter()
        .map(|skill| {
            if user.skills.remove(&skill.skill_id).is_some() {
                json!({"skillId": skill.skill_id, "success": true})
            } else {
                json!({
                    "skillId": skill.skill_id,
                    "success": false,
                    "error": format!("skill {} is not assigned to agent {}", skill.skill_id, user.agent_id()),
                })
            }
        })
        .collect();
    user.count_write(&route);
    Ok(result_set(results))
}

/// `POST /agents/{agentId}/skills` with `{"skills": [{"skillId", "isActive", "proficiency"}]}`.
pub(crate) async fn post_skills(
    State(sim): State<Shared>,
    Extension(RouteKey(route)): Extension<RouteKey>,
    Path((_version, agent)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let request: SkillsBody = parse_json(&body)?;
    let mut world = sim.world();
    let user = find_agent(&sim, &mut world, &agent)?;
    let results = request
        .skills
        .iter()
        .map(|skill| {
            let proficiency = skill.proficiency.unwrap_or(3);
            if !(1..=5).contains(&proficiency) || skill.skill_id <= 0 {
                return json!({
                    "skillId": skill.skill_id,
                    "success": false,
                    "error": "skillId must be positive and proficiency in 1..=5",
                });
            }
            user.skills.insert(
                skill.skill_id,
                Skill {
                    proficiency,
                    is_active: skill.is_active.unwrap_or(true),
                },
            );
            json!({"skillId": skill.skill_id, "success": true})
        })
        .collect();
    user.count_write(&route);
    Ok(result_set(results))
}

/// `POST /agents/{agentId}/logout`: ends the session (202, also when already logged out).
pub(crate) async fn logout(
    State(sim): State<Shared>,
    Extension(RouteKey(route)): Extension<RouteKey>,
    Path((_version, agent)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let mut world = sim.world();
    let user = find_agent(&sim, &mut world, &agent)?;
    check_step(&sim, &user.external_id, Step::Logout)?;
    user.set_state(super::world::AgentState::LoggedOut);
    user.count_write(&route);
    Ok(StatusCode::ACCEPTED)
}

/// `GET /agents/{agentId}/states`.
pub(crate) async fn states(
    State(sim): State<Shared>,
    Path((_version, agent)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let mut world = sim.world();
    let user = find_agent(&sim, &mut world, &agent)?;
    let mut state = json!({
        "agentId": user.agent_id(),
        "agentStateId": user.state.id(),
        "agentStateName": user.state.name(),
        "startDate": user.state_since.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "teamId": user.team_id,
        "isActive": user.agent_active,
    });
    if user.state.on_interaction()
        && let Some(map) = state.as_object_mut()
    {
        map.insert(
            "contactId".to_owned(),
            json!((user.index << 32) | 0xFFFF_FFFF),
        );
    }
    Ok(Json(json!({"agentStates": [state]})))
}

/// `GET /access-keys?agentId=`.
pub(crate) async fn list_access_keys(
    State(sim): State<Shared>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let pairs = query_pairs(query.as_deref());
    let agent = param(&pairs, "agentId")
        .ok_or_else(|| ApiError::bad_request("the agentId query parameter is required"))?;
    let mut world = sim.world();
    let user = find_agent(&sim, &mut world, agent)?;
    let keys: Vec<Value> = user
        .access_keys
        .iter()
        .map(|id| json!({"accessKeyId": id, "agentId": user.agent_id(), "isActive": true}))
        .collect();
    Ok(Json(json!({"accessKeys": keys})))
}

/// `DELETE /access-keys/{accessKeyId}`: 204, or 404 if unknown or already deleted.
pub(crate) async fn delete_access_key(
    State(sim): State<Shared>,
    Extension(RouteKey(route)): Extension<RouteKey>,
    Path((_version, key)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let mut world = sim.world();
    let missing = || ApiError::not_found(format!("access key {key} was not found"));
    let index = world.by_access_key(&key).ok_or_else(missing)?;
    let user = world.user(index).ok_or_else(missing)?;
    check_step(&sim, &user.external_id, Step::RevokeKeys)?;
    let before = user.access_keys.len();
    user.access_keys.retain(|id| *id != key);
    if user.access_keys.len() == before {
        return Err(missing());
    }
    user.count_write(&route);
    Ok(StatusCode::NO_CONTENT)
}

/// Page size of `/contacts/completed` when `top` is absent or 0, and its maximum.
pub(crate) const MAX_TOP: u64 = 100;

/// `GET /contacts/completed?agentId&startDate&endDate&skip&top`, paged by `_links.next`.
pub(crate) async fn completed_contacts(
    State(sim): State<Shared>,
    axum::extract::OriginalUri(uri): axum::extract::OriginalUri,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(query.as_deref());
    let agent_id = number_param(&pairs, "agentId")?
        .ok_or_else(|| ApiError::bad_request("the agentId query parameter is required"))?;
    let start = date_param(&pairs, "startDate")?;
    let end = date_param(&pairs, "endDate")?;
    if let (Some(start), Some(end)) = (start, end)
        && end < start
    {
        return Err(ApiError::bad_request("endDate is before startDate"));
    }
    let skip = number_param(&pairs, "skip")?.unwrap_or(0);
    let top = match number_param(&pairs, "top")? {
        None | Some(0) => MAX_TOP,
        Some(top) => top.min(MAX_TOP),
    };
    let history = {
        let mut world = sim.world();
        let user = world
            .by_agent_id(agent_id)
            .and_then(|index| world.user(index))
            .ok_or_else(|| ApiError::not_found(format!("agent {agent_id} was not found")))?;
        check_step(&sim, &user.external_id, Step::Archive)?;
        user.history()
    };
    let range = history.range(start, end);
    let total = range.end - range.start;
    let first = range.start.saturating_add(skip).min(range.end);
    let last = first.saturating_add(top).min(range.end);
    let contacts: Vec<Value> = (first..last).map(|i| history.contact(i)).collect();
    let page_url = |skip: u64| {
        let mut url = format!("{}{}?", sim.base_url, uri.path());
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        query.append_pair("agentId", &agent_id.to_string());
        for name in ["startDate", "endDate"] {
            if let Some(value) = param(&pairs, name) {
                query.append_pair(name, value);
            }
        }
        query.append_pair("skip", &skip.to_string());
        query.append_pair("top", &top.to_string());
        url.push_str(&query.finish());
        url
    };
    let mut links = json!({"self": page_url(skip)});
    let next = if sim.faults().paging_loop {
        Some(page_url(skip))
    } else {
        (skip.saturating_add(top) < total).then(|| page_url(skip + top))
    };
    if let (Some(next), Some(map)) = (next, links.as_object_mut()) {
        map.insert("next".to_owned(), json!(next));
    }
    let body = json!({
        "totalRecords": total,
        "businessUnitId": 4_600_000,
        "completedContacts": contacts,
        "_links": links,
    });
    Ok(Json(body).into_response())
}
