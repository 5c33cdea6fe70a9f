//! Rescinds (`employee.termination_rescinded`). A rescind always takes effect, whatever the
//! timing, and never reports restored what CXone does not show restored:
//! - before its termination arrives: a rescind naming the event creates the saga's journal
//!   already cancelled (the termination's own create then loses and republishes that); an
//!   employee-wide one leaves a pending record that a later termination reads after its first
//!   write (and the rescind lists the employee's sagas after writing it, so one of the two
//!   always sees the other);
//! - while its saga runs: the rescind is recorded in the journal; the holder's next write
//!   loses the compare-and-swap, and the holder compensates;
//! - otherwise (scheduled, held, handed over, parked, failed or completed): the rescind takes
//!   the saga's lease like any delivery and compensates itself.
//!
//! Compensation reads CXone first and undoes what it finds done, in reverse (revive,
//! re-assign skills with their proficiency, re-activate), re-reads to confirm, and lists what
//! cannot be restored (deleted access keys, ended sessions, the archive kept as evidence).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::{info, warn};

use super::announce::republish;
use super::journal::write_indexes;
use super::journal::{
    self, Holder, Journal, JournalEvent, Lease, RescindRecord, SagaState, StepName, Stored,
};
use super::machine::{self, Holding};
use super::outcome::OutcomeType;
use super::ownership::holding;
use super::ports::Outcomes;
use super::{Deps, LEASE_SECS, StepError, Verdict};
use crate::config::{BlockLogin, Settings};
use crate::cxone::{CallLog, Cxone, SkillAssignment};
use crate::event::{Event, Rescind, TYPE_TERMINATED, saga_id};
use crate::store::{Store, StoreError, Write, keys};

/// A rescind without a `terminated_event_id` that arrived before any saga it could apply to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pending {
    pub event_id: String,
    pub source: String,
    pub external_id: String,
    #[serde(default)]
    pub terminated_event_id: Option<String>,
    pub time: Option<String>,
    pub received_at: DateTime<Utc>,
}

impl Pending {
    /// An employee-wide rescind covers terminations decided before it, not later ones (a
    /// genuine re-termination).
    pub fn covers(&self, terminated_at: Option<DateTime<Utc>>) -> bool {
        let rescinded = self
            .time
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or(self.received_at);
        terminated_at.is_some_and(|t| t < rescinded)
    }
}

/// What compensation did.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// `compensation` of the outcome and the journal.
    pub document: Value,
    /// CXone was never changed: the termination is simply cancelled.
    pub cancelled: bool,
}

fn cancelled_report() -> Report {
    Report {
        document: json!({
            "cancelled": true,
            "reason": "rescinded before anything in CXone changed",
            "undone": [],
            "not_restorable": {},
            "failed": [],
        }),
        cancelled: true,
    }
}

/// Reads CXone, undoes what differs from the before-images (in reverse), re-reads, reports.
/// What CXone shows decides, not the journal: a crash between a call and the next journal
/// write leaves the journal behind CXone.
pub(crate) async fn undo<C: Cxone>(
    cxone: &C,
    settings: &Settings,
    j: &Journal,
) -> Result<Report, StepError> {
    let recorded = [
        StepName::BlockLogin,
        StepName::Logout,
        StepName::RevokeKeys,
        StepName::UnassignSkills,
        StepName::Delete,
    ]
    .iter()
    .any(|s| j.step(*s).status == super::journal::StepStatus::Done);
    let Some(user_id) = j.employee.user_id.clone() else {
        // Never resolved: nothing in CXone can have changed.
        return Ok(cancelled_report());
    };
    // Read first.
    let user = super::steps::find_resolved(cxone, j).await?;
    let agent_id = j.employee.agent_id;
    let agent = match agent_id {
        Some(id) => cxone.get_agent(&id.to_string()).await?,
        None => None,
    };
    let skills_now = match agent_id {
        Some(id) => cxone.agent_skills(id).await?,
        None => Vec::new(),
    };
    let keys_now = match agent_id {
        Some(id) if j.before.access_keys.is_some() => cxone.access_keys(id).await?,
        _ => Vec::new(),
    };
    let scim_mode = settings.cxone.block_login == BlockLogin::Scim && j.before.scim.is_some();
    let scim_now = if scim_mode {
        cxone.scim_find(&j.employee.external_id).await?
    } else {
        None
    };

    let mut undone = Vec::new();
    let mut notes = Vec::new();
    let mut failed = Vec::new();
    // 1. The user: revived if CXone shows it deleted.
    if user.as_ref().is_some_and(|u| u.is_deleted()) {
        cxone.revive_user(&user_id).await?;
        let again = super::steps::find_resolved(cxone, j).await?;
        if again.as_ref().is_some_and(|u| !u.is_deleted()) {
            undone.push(json!({"step": "delete", "action": "user revived", "user_status": again.map(|u| u.status)}));
        } else {
            failed.push(json!({"step": "delete", "error": "CXone still shows the user DELETED after revive"}));
        }
    }
    // 2. Skills: what the before-image had and CXone no longer shows, with its proficiency.
    if let (Some(id), Some(before)) = (agent_id, &j.before.skills) {
        let missing: Vec<SkillAssignment> = before
            .iter()
            .filter(|s| !skills_now.iter().any(|n| n.skill_id == s.skill_id))
            .cloned()
            .collect();
        if !missing.is_empty() {
            cxone.assign_skills(id, &missing).await?;
            let after = cxone.agent_skills(id).await?;
            let (back, still): (Vec<&SkillAssignment>, Vec<&SkillAssignment>) = missing
                .iter()
                .partition(|s| after.iter().any(|a| a.skill_id == s.skill_id));
            if !back.is_empty() {
                undone.push(json!({
                    "step": "unassign_skills",
                    "action": "skills re-assigned with their proficiency",
                    "skills": back.iter().map(|s| json!({"skillId": s.skill_id, "proficiency": s.proficiency})).collect::<Vec<_>>(),
                }));
            }
            if !still.is_empty() {
                failed.push(json!({
                    "step": "unassign_skills",
                    "error": format!("CXone does not show skills {} after re-assigning", still.iter().map(|s| s.skill_id.to_string()).collect::<Vec<_>>().join(", ")),
                }));
            }
        }
    }
    // 3. Login: re-activated only if it was active before and CXone shows it inactive.
    if scim_mode {
        if let (Some(before), Some(now)) = (&j.before.scim, &scim_now) {
            if before.active && !now.active {
                cxone.scim_set_active(&now.id, true).await?;
                let again = cxone.scim_find(&j.employee.external_id).await?;
                if again.is_some_and(|u| u.active) {
                    undone.push(json!({"step": "block_login", "action": "SCIM user re-activated"}));
                } else {
                    failed.push(json!({"step": "block_login", "error": "CXone still shows the SCIM user inactive"}));
                }
            } else if !before.active {
                notes.push(
                    json!({"step": "block_login", "action": "was inactive before; left inactive"}),
                );
            }
        }
    } else if let (Some(before), Some(now)) = (&j.before.agent, &agent) {
        if before.is_active && !now.is_active {
            cxone.set_agent_active(now.agent_id, true, None).await?;
            let again = cxone.get_agent(&now.agent_id.to_string()).await?;
            if again.is_some_and(|a| a.is_active) {
                undone.push(json!({"step": "block_login", "action": "login re-activated"}));
            } else {
                failed.push(
                    json!({"step": "block_login", "error": "CXone still shows the agent inactive"}),
                );
            }
        } else if !before.is_active {
            notes.push(
                json!({"step": "block_login", "action": "was inactive before; left inactive"}),
            );
        }
    }
    let mut not_restorable = serde_json::Map::new();
    let deleted_keys: Vec<String> = j
        .before
        .access_keys
        .iter()
        .flatten()
        .filter(|k| !keys_now.iter().any(|n| n.access_key_id == k.access_key_id))
        .map(|k| k.access_key_id.clone())
        .collect();
    if !deleted_keys.is_empty() {
        not_restorable.insert(
            "access_keys".to_owned(),
            json!({
                "ids": deleted_keys,
                "why": "CXone cannot restore a deleted access key; issue new keys",
            }),
        );
    }
    if let Some(a) = &j.archive {
        not_restorable.insert(
            "archive".to_owned(),
            json!({"uri": a.uri, "why": "evidence is kept"}),
        );
    }
    if j.step(StepName::Logout).status == super::journal::StepStatus::Done {
        not_restorable.insert(
            "session".to_owned(),
            json!({"why": "the ended session stays ended; the agent logs in again"}),
        );
    }
    if !recorded && undone.is_empty() && failed.is_empty() && not_restorable.is_empty() {
        return Ok(cancelled_report());
    }
    undone.extend(notes);
    Ok(Report {
        document: json!({
            "cancelled": false,
            "undone": undone,
            "not_restorable": not_restorable,
            "failed": failed,
        }),
        cancelled: false,
    })
}

/// Handles `employee.termination_rescinded`.
pub(crate) async fn rescind<C: Cxone, S: Store, O: Outcomes>(
    deps: &Deps<C, S>,
    event: &Event,
    r: &Rescind,
    holder: &Holder,
    outcomes: &O,
) -> Verdict {
    let external_id = r.employee.external_id.as_str();
    let now = Utc::now();
    let record = RescindRecord {
        event_id: event.id.as_str().to_owned(),
        source: event.source.as_str().to_owned(),
        received_at: now,
    };
    let candidates: Vec<(String, Option<String>)> = match &r.terminated_event_id {
        Some(tid) => vec![(
            saga_id(event.source.as_str(), tid.as_str()),
            Some(tid.as_str().to_owned()),
        )],
        None => {
            // Pending first, then the index: a termination indexes itself before it reads the
            // pending record, so one of the two always sees the other.
            let pending = Pending {
                event_id: event.id.as_str().to_owned(),
                source: event.source.as_str().to_owned(),
                external_id: external_id.to_owned(),
                terminated_event_id: None,
                time: event.time.map(|t| t.to_rfc3339()),
                received_at: now,
            };
            let body = serde_json::to_vec_pretty(&pending).unwrap_or_default();
            if let Err(e) = deps
                .store
                .put(
                    &keys::pending_rescind(external_id),
                    bytes::Bytes::from(body),
                    "application/json",
                    Write::Always,
                )
                .await
            {
                return Verdict::Park {
                    reason: format!("recording the rescind: {e}"),
                };
            }
            let prefix = keys::employee_index_prefix(external_id);
            match deps.store.list(&prefix).await {
                Ok(keys) => keys
                    .into_iter()
                    .filter_map(|k| k.strip_prefix(&prefix).map(|s| (s.to_owned(), None)))
                    .collect(),
                Err(e) => {
                    return Verdict::Park {
                        reason: format!("finding the employee's sagas: {e}"),
                    };
                }
            }
        }
    };
    let rescinded_at = event.time.map(|t| t.with_timezone(&Utc)).unwrap_or(now);
    for (id, named_event) in candidates {
        let mut done = false;
        for _attempt in 0..5 {
            match one(
                deps,
                &id,
                named_event.as_deref(),
                event,
                external_id,
                &record,
                rescinded_at,
                holder,
                outcomes,
            )
            .await
            {
                Ok(true) => {
                    done = true;
                    break;
                }
                // Lost a race: read again.
                Ok(false) => continue,
                Err(verdict) => return verdict,
            }
        }
        if !done {
            return Verdict::Wait;
        }
    }
    Verdict::Settled
}

/// Applies the rescind to one saga. `Ok(false)`: a journal write lost a race, try again.
#[allow(clippy::too_many_arguments)]
async fn one<C: Cxone, S: Store, O: Outcomes>(
    deps: &Deps<C, S>,
    id: &str,
    named_event: Option<&str>,
    event: &Event,
    external_id: &str,
    record: &RescindRecord,
    rescinded_at: DateTime<Utc>,
    holder: &Holder,
    outcomes: &O,
) -> Result<bool, Verdict> {
    let now = Utc::now();
    let park = |what: &str, e: &dyn std::fmt::Display| Verdict::Park {
        reason: format!("{what}: {e}"),
    };
    let loaded = journal::load(deps.store.as_ref(), id)
        .await
        .map_err(|e| park("reading the journal", &e))?;
    let Some(mut stored) = loaded else {
        // The termination has not arrived: it is cancelled before it starts.
        let mut j = Journal::blank(
            id,
            JournalEvent {
                id: named_event.unwrap_or_default().to_owned(),
                source: event.source.as_str().to_owned(),
                kind: TYPE_TERMINATED.to_owned(),
                time: None,
                external_id: external_id.to_owned(),
                username: None,
                email: None,
                effective_at: None,
                reason: None,
                options: None,
                notify: None,
            },
            now,
        );
        machine::rescinded(&mut j, record.clone());
        let report = cancelled_report();
        machine::compensated(&mut j, report.document, true, now);
        write_indexes(deps.store.as_ref(), external_id, id, now)
            .await
            .map_err(|e| park("indexing the rescinded saga", &e))?;
        let mut stored = Stored {
            journal: j,
            etag: None,
        };
        return match journal::save(deps.store.as_ref(), &mut stored).await {
            Ok(()) => {
                info!(saga_id = %id, "rescinded before its termination arrived; it is cancelled");
                deps.metrics.saga_finished("COMPENSATED");
                finish(deps, &stored.journal, outcomes).await
            }
            Err(StoreError::Conflict { .. }) => Ok(false),
            Err(e) => Err(park("recording the rescind", &e)),
        };
    };
    if stored.journal.employee.external_id != external_id {
        warn!(saga_id = %id, "rescind names a saga of another employee; ignored");
        return Ok(true);
    }
    if named_event.is_none()
        && stored
            .journal
            .event_time()
            .is_some_and(|t| t >= rescinded_at)
    {
        info!(saga_id = %id, "termination decided after this rescind; not covered");
        return Ok(true);
    }
    match stored.journal.state {
        SagaState::Planned => {
            info!(saga_id = %id, "a dry run changed nothing; nothing to rescind");
            return Ok(true);
        }
        SagaState::Compensated | SagaState::Cancelled => {
            return finish(deps, &stored.journal, outcomes).await;
        }
        _ => {}
    }
    machine::rescinded(&mut stored.journal, record.clone());
    match holding(deps, &stored.journal, holder, now).await {
        Holding::Busy(h) => {
            // The holder's next journal write loses and it compensates.
            match journal::save(deps.store.as_ref(), &mut stored).await {
                Ok(()) => {
                    info!(saga_id = %id, holder = %h, "rescind recorded; the running saga stops and compensates");
                    Ok(true)
                }
                Err(StoreError::Conflict { .. }) => Ok(false),
                Err(e) => Err(park("recording the rescind", &e)),
            }
        }
        Holding::Free => {
            stored.journal.lease = Some(Lease {
                owner: holder.to_string(),
                expires_at: now + chrono::Duration::seconds(LEASE_SECS),
            });
            machine::reopen(&mut stored.journal, false, now);
            match journal::save(deps.store.as_ref(), &mut stored).await {
                Ok(()) => {}
                Err(StoreError::Conflict { .. }) => return Ok(false),
                Err(e) => return Err(park("taking the saga's lease", &e)),
            }
            let calls = CallLog::default();
            let report = undo(
                &deps.cxone.recording(calls.clone()),
                &deps.settings,
                &stored.journal,
            )
            .await;
            stored.journal.calls.extend(calls.take());
            let report = report.map_err(|e| park("compensating", &e))?;
            machine::compensated(
                &mut stored.journal,
                report.document,
                report.cancelled,
                Utc::now(),
            );
            match journal::save(deps.store.as_ref(), &mut stored).await {
                Ok(()) => {}
                Err(StoreError::Conflict { .. }) => return Ok(false),
                Err(e) => return Err(park("saving the compensated journal", &e)),
            }
            info!(saga_id = %id, cancelled = report.cancelled, "termination rescinded");
            deps.metrics.saga_finished("COMPENSATED");
            finish(deps, &stored.journal, outcomes).await
        }
    }
}

async fn finish<C: Cxone, S: Store, O: Outcomes>(
    deps: &Deps<C, S>,
    j: &Journal,
    outcomes: &O,
) -> Result<bool, Verdict> {
    match republish(deps, j, OutcomeType::Compensated, outcomes).await {
        Verdict::Settled => Ok(true),
        other => Err(other),
    }
}
