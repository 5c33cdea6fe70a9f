//! Rescinds: a termination HR takes back. A scheduled saga is cancelled outright; a saga that
//! changed CXone is compensated in reverse from its journal (revive, re-assign skills with
//! their proficiency, re-activate), with what cannot be undone listed; a second manifest and a
//! `saga.compensated` outcome are written. A rescind that finds no saga is recorded, so a
//! termination arriving after it is cancelled too.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{info, warn};

use super::journal::{
    self, FinalStatus, Journal, RescindRecord, SagaState, StepName, StepStatus, Stored,
};
use super::outcome::{self, OutcomeType, Outcomes};
use super::{Delivery, Deps, Verdict, saga_id};
use crate::config::BlockLogin;
use crate::cxone::Cxone;
use crate::event::{Command, Event};
use crate::store::{Store, StoreError, Write};

/// A rescind that arrived before any saga it could apply to.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    event_id: String,
    source: String,
    external_id: String,
    terminated_event_id: Option<String>,
    time: Option<String>,
    received_at: DateTime<Utc>,
}

fn by_event_key(saga: &str) -> String {
    format!("rescinds/by-saga/{saga}.json")
}

fn by_employee_key(external_id: &str) -> String {
    format!("rescinds/by-employee/{external_id}.json")
}

fn event_time(t: Option<&str>) -> Option<DateTime<Utc>> {
    t.and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// Was this new termination rescinded before it arrived?
pub(crate) async fn early_rescind<C: Cxone, S: Store>(
    deps: &Deps<C, S>,
    event: &Event,
) -> Result<Option<RescindRecord>, StoreError> {
    let id = saga_id(event.source.as_str(), event.id.as_str());
    let external_id = event.employee().external_id.as_str();
    let (event_key, employee_key) = (by_event_key(&id), by_employee_key(external_id));
    let (by_event, by_employee) =
        tokio::join!(deps.store.get(&event_key), deps.store.get(&employee_key));
    let record = |p: Pending| RescindRecord {
        event_id: p.event_id,
        source: p.source,
        received_at: p.received_at,
    };
    if let Some(obj) = by_event?
        && let Ok(p) = serde_json::from_slice::<Pending>(&obj.body)
    {
        info!("this termination was rescinded before it arrived");
        return Ok(Some(record(p)));
    }
    if let Some(obj) = by_employee?
        && let Ok(p) = serde_json::from_slice::<Pending>(&obj.body)
    {
        // An employee-wide rescind covers terminations decided before it, not later ones.
        let terminated = event.time.map(|t| t.with_timezone(&Utc));
        let rescinded = event_time(p.time.as_deref()).unwrap_or(p.received_at);
        if terminated.is_some_and(|t| t < rescinded) {
            info!("an earlier rescind for this employee covers this termination");
            return Ok(Some(record(p)));
        }
    }
    Ok(None)
}

impl<C: Cxone, S: Store> Deps<C, S> {
    /// Handles `employee.termination_rescinded`.
    pub(crate) async fn run_rescind<O: Outcomes>(
        &self,
        event: &Event,
        _delivery: &Delivery,
        outcomes: &O,
    ) -> Verdict {
        let Command::Rescind(r) = &event.command else {
            return Verdict::Settled;
        };
        let external_id = r.employee.external_id.as_str();
        let candidates: Vec<String> = match &r.terminated_event_id {
            Some(tid) => vec![saga_id(event.source.as_str(), tid.as_str())],
            None => {
                let prefix = format!("index/employees/{external_id}/");
                match self.store.list(&prefix).await {
                    Ok(keys) => keys
                        .into_iter()
                        .filter_map(|k| k.strip_prefix(&prefix).map(str::to_owned))
                        .collect(),
                    Err(e) => {
                        return Verdict::Park {
                            reason: format!("finding sagas: {e}"),
                        };
                    }
                }
            }
        };
        let record = RescindRecord {
            event_id: event.id.as_str().to_owned(),
            source: event.source.as_str().to_owned(),
            received_at: Utc::now(),
        };
        let mut found = false;
        for id in candidates {
            for _attempt in 0..5 {
                let stored = match journal::load(self.store.as_ref(), &id).await {
                    Ok(Some(s)) => s,
                    Ok(None) => break,
                    Err(e) => {
                        return Verdict::Park {
                            reason: format!("reading {id}: {e}"),
                        };
                    }
                };
                if stored.journal.employee.external_id != external_id {
                    warn!(saga_id = %id, "rescind names a saga of another employee; ignored");
                    break;
                }
                found = true;
                let state = stored.journal.state;
                if matches!(
                    state,
                    SagaState::Planned | SagaState::Compensated | SagaState::Cancelled
                ) {
                    break;
                }
                let mut stored = stored;
                if stored.journal.rescind.is_none() {
                    stored.journal.rescind = Some(record.clone());
                }
                let running_elsewhere = state == SagaState::Running
                    && stored.journal.leased_by_other(&self.owner, Utc::now());
                if running_elsewhere {
                    // The running saga notices at its next journal write and compensates.
                    match journal::save(self.store.as_ref(), &mut stored).await {
                        Ok(()) => {
                            info!(saga_id = %id, "rescind recorded; the running saga will stop and compensate");
                            break;
                        }
                        Err(StoreError::Conflict { .. }) => continue,
                        Err(e) => {
                            return Verdict::Park {
                                reason: format!("recording the rescind: {e}"),
                            };
                        }
                    }
                }
                match self.cancel_or_compensate(stored, outcomes).await {
                    Verdict::Settled => break,
                    Verdict::Wait => continue,
                    other => return other,
                }
            }
        }
        if !found {
            let pending = Pending {
                event_id: event.id.as_str().to_owned(),
                source: event.source.as_str().to_owned(),
                external_id: external_id.to_owned(),
                terminated_event_id: r
                    .terminated_event_id
                    .as_ref()
                    .map(|t| t.as_str().to_owned()),
                time: event.time.map(|t| t.to_rfc3339()),
                received_at: Utc::now(),
            };
            let key = match &r.terminated_event_id {
                Some(tid) => by_event_key(&saga_id(event.source.as_str(), tid.as_str())),
                None => by_employee_key(external_id),
            };
            let body = serde_json::to_vec_pretty(&pending).unwrap_or_default();
            match self
                .store
                .put(&key, Bytes::from(body), "application/json", Write::Always)
                .await
            {
                Ok(_) => info!(
                    "rescind matches no saga yet; recorded so a later termination is cancelled"
                ),
                Err(e) => {
                    return Verdict::Park {
                        reason: format!("recording the rescind: {e}"),
                    };
                }
            }
        }
        Verdict::Settled
    }

    /// Cancels a saga that never touched CXone, or compensates one that did.
    pub(crate) async fn cancel_or_compensate<O: Outcomes>(
        &self,
        mut stored: Stored,
        outcomes: &O,
    ) -> Verdict {
        let now = Utc::now();
        let touched = stored
            .journal
            .steps
            .iter()
            .any(|s| s.status == StepStatus::Done && s.name != StepName::Resolve);
        let compensation = if !touched {
            stored.journal.state = SagaState::Cancelled;
            json!({
                "cancelled": true,
                "reason": "rescinded before anything in CXone changed",
                "undone": [],
                "not_restorable": {},
            })
        } else {
            match self.undo(&mut stored.journal).await {
                Ok(c) => c,
                Err(v) => return v,
            }
        };
        let j = &mut stored.journal;
        if j.state != SagaState::Cancelled {
            j.state = SagaState::Compensated;
        }
        j.status = Some(FinalStatus::Compensated);
        j.compensation = Some(compensation.clone());
        j.lease = None;
        j.completed_at = Some(now);
        let manifest = crate::archive::build_manifest(
            j,
            "rescind",
            Some(json!({ "compensation": compensation, "rescind": j.rescind })),
        );
        let key = crate::archive::rescind_manifest_key(&j.employee.external_id, &j.saga_id);
        if let Err(e) = crate::archive::write_once(self.store.as_ref(), &key, &manifest).await {
            return Verdict::Park {
                reason: format!("writing the rescind manifest: {e}"),
            };
        }
        let save = if stored.etag.is_some() {
            journal::save(self.store.as_ref(), &mut stored).await
        } else {
            let r = journal::save(self.store.as_ref(), &mut stored).await;
            if r.is_ok() {
                let _ = self.write_index(&stored.journal).await;
            }
            r
        };
        match save {
            Ok(()) => {}
            Err(StoreError::Conflict { .. }) => return Verdict::Wait,
            Err(e) => {
                return Verdict::Park {
                    reason: format!("saving the compensated journal: {e}"),
                };
            }
        }
        let extra = json!({ "compensation": compensation, "rescind_manifest": format!("s3://{}/{key}", self.settings.s3.bucket) });
        let out = outcome::build(&stored.journal, OutcomeType::Compensated, Some(extra));
        if let Err(e) = outcomes.publish(&out).await {
            return Verdict::Park {
                reason: format!("publishing the compensated outcome: {e}"),
            };
        }
        self.metrics
            .saga_finished(FinalStatus::Compensated.as_str());
        info!(saga_id = %stored.journal.saga_id, "termination rescinded");
        Verdict::Settled
    }

    /// Runs the compensations in reverse order. Transient failures park the rescind.
    async fn undo(&self, j: &mut Journal) -> Result<serde_json::Value, Verdict> {
        let park = |what: &str, e: &dyn std::fmt::Display| Verdict::Park {
            reason: format!("compensating {what}: {e}"),
        };
        let mut undone = Vec::new();
        let mut failed = Vec::new();
        let done = |j: &Journal, s: StepName| j.step(s).status == StepStatus::Done;
        if done(j, StepName::Delete)
            && let Some(user_id) = j.employee.user_id.clone()
        {
            match self.cxone.revive_user(&user_id).await {
                Ok(()) => {
                    j.step_mut(StepName::Delete).status = StepStatus::Compensated;
                    undone.push(json!({"step": "delete", "action": "user revived"}));
                }
                Err(e) if e.is_transient() => return Err(park("delete", &e)),
                Err(e) => failed.push(json!({"step": "delete", "error": e.to_string()})),
            }
        }
        if done(j, StepName::UnassignSkills)
            && let (Some(agent_id), Some(skills)) = (j.employee.agent_id, j.before.skills.clone())
            && !skills.is_empty()
        {
            match self.cxone.assign_skills(agent_id, &skills).await {
                Ok(()) => {
                    j.step_mut(StepName::UnassignSkills).status = StepStatus::Compensated;
                    undone.push(json!({
                        "step": "unassign_skills",
                        "action": "skills re-assigned with their proficiency",
                        "skills": skills.iter().map(|s| json!({"skillId": s.skill_id, "proficiency": s.proficiency})).collect::<Vec<_>>(),
                    }));
                }
                Err(e) if e.is_transient() => return Err(park("unassign_skills", &e)),
                Err(e) => failed.push(json!({"step": "unassign_skills", "error": e.to_string()})),
            }
        }
        if done(j, StepName::BlockLogin) {
            let result = match (self.settings.cxone.block_login, &j.before.scim) {
                (BlockLogin::Scim, Some(scim)) if scim.active => {
                    Some(self.cxone.scim_set_active(&scim.id, true).await)
                }
                _ => match &j.before.agent {
                    Some(agent) if agent.is_active => Some(
                        self.cxone
                            .set_agent_active(agent.agent_id, true, None)
                            .await,
                    ),
                    _ => None,
                },
            };
            match result {
                Some(Ok(())) => {
                    j.step_mut(StepName::BlockLogin).status = StepStatus::Compensated;
                    undone.push(json!({"step": "block_login", "action": "login re-activated"}));
                }
                Some(Err(e)) if e.is_transient() => return Err(park("block_login", &e)),
                Some(Err(e)) => failed.push(json!({"step": "block_login", "error": e.to_string()})),
                None => undone.push(
                    json!({"step": "block_login", "action": "was inactive before; left inactive"}),
                ),
            }
        }
        let mut not_restorable = serde_json::Map::new();
        if !j.deleted_keys.is_empty() {
            not_restorable.insert(
                "access_keys".to_owned(),
                json!({
                    "ids": j.deleted_keys,
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
        if done(j, StepName::Logout) {
            not_restorable.insert(
                "session".to_owned(),
                json!({"why": "the ended session stays ended; the agent logs in again"}),
            );
        }
        Ok(json!({
            "cancelled": false,
            "undone": undone,
            "not_restorable": not_restorable,
            "failed": failed,
        }))
    }
}
