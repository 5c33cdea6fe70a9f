//! Everything about calling NICE CXone (CXONE-API.md): typed operations, authentication,
//! the priority rate limiter, retries and the circuit breaker. The saga sees only the
//! [`Cxone`] trait and the domain types here.

pub mod auth;
pub mod breaker;
pub mod client;
pub mod error;
pub mod limiter;
pub mod quota;
pub mod retry;

use std::future::Future;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub use client::Client;
pub use error::{CxoneError, ErrorKind};
pub use limiter::Priority;

/// How to look a user up in UserHub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserFilter<'a> {
    ExternalIdentity(&'a str),
    UserName(&'a str),
    Email(&'a str),
}

/// A UserHub user (`/user-management/v2/users/search`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    pub id: String,
    #[serde(default)]
    pub user_name: Option<String>,
    #[serde(default)]
    pub email_address: Option<String>,
    #[serde(default)]
    pub external_identity: Option<String>,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub team_id: Option<serde_json::Value>,
}

impl User {
    /// A `DELETED` user counts as absent (CXONE-API.md §2).
    pub fn is_deleted(&self) -> bool {
        self.status.eq_ignore_ascii_case("DELETED")
    }
}

/// An agent record (`GET /agents/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Agent {
    pub agent_id: i64,
    #[serde(default, rename = "userID", alias = "userId")]
    pub user_id: Option<String>,
    #[serde(default)]
    pub user_name: Option<String>,
    #[serde(default)]
    pub is_active: bool,
    #[serde(default)]
    pub team_id: Option<serde_json::Value>,
    #[serde(default)]
    pub termination_date: Option<String>,
}

/// One skill assignment with the agent's proficiency (1 = highest … 5 = lowest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SkillAssignment {
    pub skill_id: i64,
    #[serde(default)]
    pub skill_name: Option<String>,
    #[serde(default = "default_true")]
    pub is_active: bool,
    #[serde(default, rename = "agentProficiencyValue", alias = "proficiency")]
    pub proficiency: Option<i64>,
}

fn default_true() -> bool {
    true
}

/// The per-skill result of `DELETE /agents/{id}/skills`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SkillResult {
    pub skill_id: i64,
    #[serde(default)]
    pub success: bool,
    #[serde(default)]
    pub error: Option<String>,
}

/// An API access key of an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessKey {
    pub access_key_id: String,
    #[serde(default)]
    pub is_active: bool,
}

/// The agent's real-time state (`GET /agents/{id}/states`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentState {
    #[serde(default)]
    pub agent_state_name: String,
    #[serde(default)]
    pub contact_id: Option<serde_json::Value>,
}

impl AgentState {
    /// In a contact, a consult or on the dialer: logging out would cut a customer off.
    pub fn on_live_interaction(&self) -> bool {
        let s = self.agent_state_name.as_str();
        s.ends_with("Contact") || s.ends_with("Consult") || s == "Dialer"
    }
}

/// One page of `/contacts/completed`: the records exactly as CXone sent them.
#[derive(Debug)]
pub struct ContactsPage {
    pub records: Vec<Box<RawValue>>,
    pub total: Option<u64>,
    /// The absolute `_links.next` URL, checked to point at the API host.
    pub next: Option<url::Url>,
}

/// A SCIM user resource (only what we need).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScimUser {
    pub id: String,
    #[serde(default)]
    pub external_id: Option<String>,
    #[serde(default)]
    pub active: bool,
}

/// What the deactivate call said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Deactivation {
    Deleted,
    /// The user id came back in `notDeletedUserIds`.
    Refused,
}

/// Outcome of deleting something that may already be gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Removal {
    Removed,
    AlreadyGone,
}

/// One request as it went out, for the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRecord {
    pub method: String,
    pub route: String,
    /// HTTP status, or 0 when no answer came back.
    pub status: u16,
    pub at: DateTime<Utc>,
    /// Consecutive identical calls (same method, route and status) are kept as one record:
    /// a 10,000-page archive is one line, not 10,000.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub count: u32,
    /// The last of those calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_at: Option<DateTime<Utc>>,
}

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

/// Where a client handle records the requests it sends (one per saga run), so the manifest
/// lists every call. Consecutive identical calls fold into one record.
#[derive(Debug, Clone, Default)]
pub struct CallLog(std::sync::Arc<std::sync::Mutex<Vec<CallRecord>>>);

impl CallLog {
    pub fn record(&self, method: &str, route: &str, status: u16) {
        let mut log = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Utc::now();
        if let Some(last) = log.last_mut()
            && last.method == method
            && last.route == route
            && last.status == status
        {
            last.count = last.count.saturating_add(1);
            last.last_at = Some(now);
            return;
        }
        log.push(CallRecord {
            method: method.to_owned(),
            route: route.to_owned(),
            status,
            at: now,
            count: 1,
            last_at: None,
        });
    }

    /// The records so far, leaving the log empty.
    pub fn take(&self) -> Vec<CallRecord> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The CXone operations the saga needs. One real implementation ([`Client`]) and fakes in tests.
pub trait Cxone: Clone + Send + Sync + 'static {
    /// A handle on the same client (same token, limiter and breaker) that records every
    /// request it sends into `log`.
    fn recording(&self, log: CallLog) -> Self;

    fn find_users(
        &self,
        by: UserFilter<'_>,
    ) -> impl Future<Output = Result<Vec<User>, CxoneError>> + Send;
    /// `None` when CXone answers 404.
    fn get_agent(&self, id: &str)
    -> impl Future<Output = Result<Option<Agent>, CxoneError>> + Send;
    fn set_agent_active(
        &self,
        agent_id: i64,
        active: bool,
        termination_date: Option<DateTime<Utc>>,
    ) -> impl Future<Output = Result<(), CxoneError>> + Send;
    fn scim_find(
        &self,
        external_id: &str,
    ) -> impl Future<Output = Result<Option<ScimUser>, CxoneError>> + Send;
    fn scim_set_active(
        &self,
        scim_id: &str,
        active: bool,
    ) -> impl Future<Output = Result<(), CxoneError>> + Send;
    fn agent_state(
        &self,
        agent_id: i64,
    ) -> impl Future<Output = Result<Option<AgentState>, CxoneError>> + Send;
    fn logout(&self, agent_id: i64) -> impl Future<Output = Result<(), CxoneError>> + Send;
    fn access_keys(
        &self,
        agent_id: i64,
    ) -> impl Future<Output = Result<Vec<AccessKey>, CxoneError>> + Send;
    fn delete_access_key(
        &self,
        key_id: &str,
    ) -> impl Future<Output = Result<Removal, CxoneError>> + Send;
    fn agent_skills(
        &self,
        agent_id: i64,
    ) -> impl Future<Output = Result<Vec<SkillAssignment>, CxoneError>> + Send;
    fn remove_skills(
        &self,
        agent_id: i64,
        skill_ids: &[i64],
    ) -> impl Future<Output = Result<Vec<SkillResult>, CxoneError>> + Send;
    fn assign_skills(
        &self,
        agent_id: i64,
        skills: &[SkillAssignment],
    ) -> impl Future<Output = Result<(), CxoneError>> + Send;
    fn contacts_page(
        &self,
        agent_id: i64,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        next: Option<&url::Url>,
    ) -> impl Future<Output = Result<ContactsPage, CxoneError>> + Send;
    fn deactivate_user(
        &self,
        user_id: &str,
    ) -> impl Future<Output = Result<Deactivation, CxoneError>> + Send;
    fn revive_user(&self, user_id: &str) -> impl Future<Output = Result<(), CxoneError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_from_the_api_doc_deserialize() {
        let a: Agent = serde_json::from_str(
            r#"{"agentId": 123, "userID": "u-1", "userName": "j", "isActive": true, "teamId": 5}"#,
        )
        .expect("agent");
        assert_eq!(a.agent_id, 123);
        assert_eq!(a.user_id.as_deref(), Some("u-1"));
        let s: SkillAssignment = serde_json::from_str(
            r#"{"skillId": 11, "skillName": "Sales", "isActive": true, "agentProficiencyValue": 2}"#,
        )
        .expect("skill");
        assert_eq!(s.proficiency, Some(2));
        let st: AgentState =
            serde_json::from_str(r#"{"agentStateName": "InboundContact"}"#).expect("state");
        assert!(st.on_live_interaction());
        let st: AgentState =
            serde_json::from_str(r#"{"agentStateName": "Available"}"#).expect("state");
        assert!(!st.on_live_interaction());
    }
}
