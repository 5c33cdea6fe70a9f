//! The saga journal, `sagas/{saga_id}.json`: the event, each step's status, attempts, timings
//! and compensating record, and a lease naming the one delivery that runs the saga. Written
//! with `If-None-Match: *` once and `If-Match` on the previous ETag after that.
//!
//! Journals written by earlier versions stay readable: every field added since is optional.
//! Only [`super::machine`] changes `state` and `status`.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::cxone::{AccessKey, Agent, CallRecord, ScimUser, SkillAssignment, User};
use crate::event::{Command, Event, Options};
use crate::evidence::UploadState;
use crate::store::{Store, StoreError, Write, keys};

pub const FORMAT_VERSION: u32 = 1;

/// The steps, in order (CONTRACT §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepName {
    Resolve,
    BlockLogin,
    Logout,
    RevokeKeys,
    UnassignSkills,
    Archive,
    Delete,
    Manifest,
    Notify,
    Outcome,
}

impl StepName {
    pub const ALL: [StepName; 10] = [
        StepName::Resolve,
        StepName::BlockLogin,
        StepName::Logout,
        StepName::RevokeKeys,
        StepName::UnassignSkills,
        StepName::Archive,
        StepName::Delete,
        StepName::Manifest,
        StepName::Notify,
        StepName::Outcome,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Resolve => "resolve",
            Self::BlockLogin => "block_login",
            Self::Logout => "logout",
            Self::RevokeKeys => "revoke_keys",
            Self::UnassignSkills => "unassign_skills",
            Self::Archive => "archive",
            Self::Delete => "delete",
            Self::Manifest => "manifest",
            Self::Notify => "notify",
            Self::Outcome => "outcome",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|n| n.as_str() == s)
    }

    /// The steps of the first stage (access removal, CONTRACT §11).
    pub const ACCESS: [StepName; 4] = [
        StepName::Resolve,
        StepName::BlockLogin,
        StepName::Logout,
        StepName::RevokeKeys,
    ];

    /// Steps that change CXone.
    pub fn is_destructive(self) -> bool {
        matches!(
            self,
            Self::BlockLogin
                | Self::Logout
                | Self::RevokeKeys
                | Self::UnassignSkills
                | Self::Delete
        )
    }
}

impl std::fmt::Display for StepName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Pending,
    Done,
    Skipped,
    Failed,
    Compensated,
    Planned,
}

impl StepStatus {
    /// Nothing left to do for this step.
    pub fn is_settled(self) -> bool {
        matches!(
            self,
            Self::Done | Self::Skipped | Self::Compensated | Self::Planned
        )
    }
}

/// `error` of outcomes and journals (CONTRACT §4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorRecord {
    pub step: Option<String>,
    pub class: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    pub name: StepName,
    pub status: StepStatus,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// What the step did or found, in words (e.g. "removed 2 skills").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorRecord>,
}

/// Terminal and intermediate states of a saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaState {
    Running,
    Parked,
    /// Access is gone and verified; the saga waits in (or runs from) the housekeeping queue.
    HandedOver,
    Completed,
    Failed,
    Planned,
    Compensated,
    Scheduled,
    Held,
    Cancelled,
}

impl SagaState {
    /// Finished for good: a redelivery only re-publishes the outcome.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Planned | Self::Compensated | Self::Cancelled
        )
    }
}

/// Outcome `status` values (CONTRACT §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FinalStatus {
    Deleted,
    DeactivatedOnly,
    AlreadyAbsent,
    Failed,
    Compensated,
    Planned,
    Scheduled,
    Held,
}

impl FinalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deleted => "DELETED",
            Self::DeactivatedOnly => "DEACTIVATED_ONLY",
            Self::AlreadyAbsent => "ALREADY_ABSENT",
            Self::Failed => "FAILED",
            Self::Compensated => "COMPENSATED",
            Self::Planned => "PLANNED",
            Self::Scheduled => "SCHEDULED",
            Self::Held => "HELD",
        }
    }
}

/// The event as the journal keeps it (plain values; it was validated on the way in).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEvent {
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    pub external_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub effective_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub options: Option<Options>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notify: Option<String>,
}

impl JournalEvent {
    pub fn from_event(e: &Event) -> Self {
        let employee = e.employee();
        let (effective_at, reason, options, notify) = match &e.command {
            Command::Terminate(t) => (
                t.effective_at.map(|d| d.to_rfc3339()),
                t.reason.clone(),
                Some(t.options.clone()),
                t.notify.clone(),
            ),
            Command::Rescind(_) => (None, None, None, None),
        };
        Self {
            id: e.id.as_str().to_owned(),
            source: e.source.as_str().to_owned(),
            kind: e.type_name().to_owned(),
            time: e.time.map(|t| t.to_rfc3339()),
            external_id: employee.external_id.as_str().to_owned(),
            username: employee.username.clone(),
            email: employee.email.clone(),
            effective_at,
            reason,
            options,
            notify,
        }
    }
}

/// The CXone ids of the employee once resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmployeeIds {
    pub external_id: String,
    pub user_id: Option<String>,
    pub agent_id: Option<i64>,
    /// How `resolve` found the user; later lookups (a resumed `delete`, a rescind) use the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched_by: Option<MatchedBy>,
}

/// The UserHub filter that found the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchedBy {
    ExternalId,
    Username,
    Email,
}

/// What the verification re-read saw after revocation (CONTRACT §4 `verification`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    pub agent_active: bool,
    pub user_status: String,
    pub active_access_keys: u32,
    pub logged_in: bool,
    /// SCIM `active`, when login is blocked through SCIM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scim_active: Option<bool>,
}

/// The revocation deadline (CONTRACT §4 `sla`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sla {
    pub revoke_within_secs: u64,
    pub due_at: DateTime<Utc>,
    /// `revoked_at <= due_at`; unknown until access is revoked.
    pub met: Option<bool>,
}

/// A multipart archive in progress: the window it covers, the next page to fetch and the
/// upload's resume point. Saved after every part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveProgress {
    pub key: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    /// `_links.next` of the last page whose records are in the uploaded parts.
    pub next: Option<String>,
    pub upload: UploadState,
}

/// Before-images: what compensation would restore.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Before {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<User>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<Agent>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scim: Option<ScimUser>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skills: Option<Vec<SkillAssignment>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_keys: Option<Vec<AccessKey>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveRecord {
    pub uri: String,
    pub key: String,
    pub sha256: String,
    pub records: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRecord {
    pub uri: String,
    pub key: String,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RescindRecord {
    pub event_id: String,
    pub source: String,
    pub received_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardRecord {
    /// `admitted` by the window count, or `released` by an operator.
    pub how: String,
    pub at: DateTime<Utc>,
}

/// Who holds a saga: one delivery of one message, in one broker session of one worker.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Holder {
    /// The broker session (connection) the delivery came through; it dies with the process.
    pub session: String,
    /// This handling of the message.
    pub delivery: String,
}

impl Holder {
    pub fn new(session: impl Into<String>, delivery: impl Into<String>) -> Self {
        Self {
            session: session.into(),
            delivery: delivery.into(),
        }
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}|{}", self.session, self.delivery)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// `{session}|{delivery}` (earlier versions wrote a process id: read as a session).
    pub owner: String,
    pub expires_at: DateTime<Utc>,
}

impl Lease {
    pub fn holder(&self) -> Holder {
        match self.owner.split_once('|') {
            Some((session, delivery)) => Holder::new(session, delivery),
            None => Holder::new(self.owner.clone(), ""),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Journal {
    pub format: u32,
    pub saga_id: String,
    pub event: JournalEvent,
    pub state: SagaState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<FinalStatus>,
    pub employee: EmployeeIds,
    pub steps: Vec<StepRecord>,
    #[serde(default)]
    pub before: Before,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleted_keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_skills: Vec<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive: Option<ArchiveRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<ManifestRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calls: Vec<CallRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
    /// Times the saga was parked after transient failures.
    #[serde(default)]
    pub parks: u32,
    /// Dry run: what each write step would have done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<serde_json::Map<String, serde_json::Value>>,
    /// When the agent was first seen in a live contact by the logout step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_contact_since: Option<DateTime<Utc>>,
    /// A rescind for this saga arrived (it is cancelled or compensated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rescind: Option<RescindRecord>,
    /// Admitted by the mass-deletion guard (or released by an operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<GuardRecord>,
    /// What a rescind undid and what it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<serde_json::Value>,
    /// When the verification re-read saw access gone, and what it saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sla: Option<Sla>,
    /// A multipart archive in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_progress: Option<ArchiveProgress>,
    /// When the manifest was prepared: it is built from the journal saved at that instant, so
    /// a resumed saga writes byte for byte the same manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<DateTime<Utc>>,
}

impl Journal {
    pub fn new(saga_id: &str, event: &Event, now: DateTime<Utc>) -> Self {
        let mut j = Self::blank(saga_id, JournalEvent::from_event(event), now);
        j.employee.external_id = event.employee().external_id.as_str().to_owned();
        j
    }

    /// A journal with nothing done yet.
    pub fn blank(saga_id: &str, event: JournalEvent, now: DateTime<Utc>) -> Self {
        Self {
            format: FORMAT_VERSION,
            saga_id: saga_id.to_owned(),
            employee: EmployeeIds {
                external_id: event.external_id.clone(),
                ..EmployeeIds::default()
            },
            event,
            state: SagaState::Running,
            status: None,
            steps: StepName::ALL
                .iter()
                .map(|name| StepRecord {
                    name: *name,
                    status: StepStatus::Pending,
                    attempts: 0,
                    started_at: None,
                    finished_at: None,
                    detail: None,
                    error: None,
                })
                .collect(),
            before: Before::default(),
            deleted_keys: Vec::new(),
            removed_skills: Vec::new(),
            revoked_at: None,
            archive: None,
            manifest: None,
            calls: Vec::new(),
            error: None,
            warnings: Vec::new(),
            lease: None,
            parks: 0,
            plan: None,
            live_contact_since: None,
            rescind: None,
            guard: None,
            compensation: None,
            verified_at: None,
            verification: None,
            sla: None,
            archive_progress: None,
            manifest_at: None,
            created_at: now,
            updated_at: now,
            completed_at: None,
        }
    }

    pub fn step(&self, name: StepName) -> &StepRecord {
        // Every journal holds every step (constructed so, and checked on load).
        &self.steps[name as usize]
    }

    pub fn step_mut(&mut self, name: StepName) -> &mut StepRecord {
        &mut self.steps[name as usize]
    }

    /// The first step that is not settled: where a redelivery resumes.
    pub fn next_step(&self) -> Option<StepName> {
        self.steps
            .iter()
            .find(|s| !s.status.is_settled())
            .map(|s| s.name)
    }

    /// The holder of an unexpired lease other than `me`.
    pub fn other_holder(&self, me: &Holder, now: DateTime<Utc>) -> Option<Holder> {
        let lease = self.lease.as_ref()?;
        let holder = lease.holder();
        (holder != *me && lease.expires_at > now).then_some(holder)
    }

    /// When the event arrived: the journal's creation (the SLA clock starts at `effective_at`
    /// when there is one).
    pub fn received_at(&self) -> DateTime<Utc> {
        self.created_at
    }

    /// The event's `time`, if it had one.
    pub fn event_time(&self) -> Option<DateTime<Utc>> {
        self.event
            .time
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
    }

    /// The event's `effective_at`, if it had one.
    pub fn effective_at(&self) -> Option<DateTime<Utc>> {
        self.event
            .effective_at
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
    }

    /// The access-removal steps are settled (done, skipped, planned).
    pub fn access_settled(&self) -> bool {
        StepName::ACCESS
            .iter()
            .all(|s| self.step(*s).status.is_settled())
    }

    /// Was any step ever attempted (so a run must read before it writes)?
    pub fn started(&self) -> bool {
        self.steps.iter().any(|s| s.attempts > 0)
    }

    fn check(&self) -> Result<(), String> {
        if self.steps.len() != StepName::ALL.len()
            || self
                .steps
                .iter()
                .zip(StepName::ALL)
                .any(|(s, n)| s.name != n)
        {
            return Err("journal steps do not match this version's saga".to_owned());
        }
        Ok(())
    }
}

/// A journal with the ETag it was read or written with.
#[derive(Debug, Clone)]
pub struct Stored {
    pub journal: Journal,
    pub etag: Option<String>,
}

/// Reads a journal; `None` if the saga never got that far.
pub async fn load<S: Store>(store: &S, saga_id: &str) -> Result<Option<Stored>, StoreError> {
    let key = keys::journal(saga_id);
    let Some(object) = store.get(&key).await? else {
        return Ok(None);
    };
    let journal: Journal =
        serde_json::from_slice(&object.body).map_err(|e| StoreError::Permanent {
            op: "GET",
            key: key.clone(),
            message: format!("unreadable journal: {e}"),
        })?;
    journal.check().map_err(|message| StoreError::Permanent {
        op: "GET",
        key,
        message,
    })?;
    Ok(Some(Stored {
        journal,
        etag: Some(object.etag),
    }))
}

/// Writes the journal: create when it has no ETag yet, else replace that exact version.
pub async fn save<S: Store>(store: &S, stored: &mut Stored) -> Result<(), StoreError> {
    stored.journal.updated_at = Utc::now();
    let body = serde_json::to_vec_pretty(&stored.journal).map_err(|e| StoreError::Permanent {
        op: "PUT",
        key: keys::journal(&stored.journal.saga_id),
        message: e.to_string(),
    })?;
    let write = match &stored.etag {
        None => Write::Create,
        Some(etag) => Write::Replace(etag.clone()),
    };
    let etag = store
        .put(
            &keys::journal(&stored.journal.saga_id),
            Bytes::from(body),
            "application/json",
            write,
        )
        .await?;
    stored.etag = Some(etag);
    Ok(())
}

/// The per-employee and per-day index entries of a new saga (idempotent).
pub async fn write_indexes<S: Store>(
    store: &S,
    external_id: &str,
    saga_id: &str,
    received_at: DateTime<Utc>,
) -> Result<(), StoreError> {
    let put = |key: String| async move {
        match store
            .put(
                &key,
                bytes::Bytes::from(saga_id.to_owned()),
                "text/plain",
                Write::Create,
            )
            .await
        {
            Ok(_) | Err(StoreError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    };
    let (a, b) = tokio::join!(
        put(keys::employee_index(external_id, saga_id)),
        put(keys::day_index(received_at.date_naive(), saga_id))
    );
    a.and(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Limits, parse};
    use crate::store::Memory;

    fn event() -> Event {
        parse(
            br#"{"specversion":"1.0","id":"e1","source":"s","type":"employee.terminated",
                 "data":{"employee":{"external_id":"E000001"}}}"#,
            Limits::default(),
        )
        .expect("valid")
    }

    #[tokio::test]
    async fn create_then_replace_with_etags() {
        let store = Memory::default();
        let mut s = Stored {
            journal: Journal::new("abc", &event(), Utc::now()),
            etag: None,
        };
        save(&store, &mut s).await.expect("create");
        let mut other = load(&store, "abc").await.expect("load").expect("exists");
        s.journal.step_mut(StepName::Resolve).status = StepStatus::Done;
        save(&store, &mut s).await.expect("replace");
        // A stale writer loses.
        assert!(matches!(
            save(&store, &mut other).await,
            Err(StoreError::Conflict { .. })
        ));
        let back = load(&store, "abc").await.expect("load").expect("exists");
        assert_eq!(back.journal.next_step(), Some(StepName::BlockLogin));
    }

    #[test]
    fn step_names_roundtrip() {
        for n in StepName::ALL {
            assert_eq!(StepName::parse(n.as_str()), Some(n));
            assert_eq!(
                n as usize,
                StepName::ALL.iter().position(|m| *m == n).expect("in")
            );
        }
    }
}
