//! Outcome events (CONTRACT §4): CloudEvents on `offboard.outcomes`, one per saga transition,
//! with an id deterministic for (saga, type) so a re-publication is a droppable duplicate.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::{Value, json};

use super::journal::{ArchiveRecord, ErrorRecord, FinalStatus, Journal, ManifestRecord};
use crate::config::Settings;
use crate::store::keys;

/// Namespace of outcome ids (UUID v5 over `saga_id/type`).
const OUTCOME_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6f1f_d7a4_3c5e_4b7a_9d1e_0c8b_2a4f_5e61);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum OutcomeType {
    Completed,
    Failed,
    Compensated,
    Planned,
    Scheduled,
    Held,
}

impl OutcomeType {
    pub fn type_name(self) -> &'static str {
        match self {
            Self::Completed => "offboard.saga.completed",
            Self::Failed => "offboard.saga.failed",
            Self::Compensated => "offboard.saga.compensated",
            Self::Planned => "offboard.saga.planned",
            Self::Scheduled => "offboard.saga.scheduled",
            Self::Held => "offboard.saga.held",
        }
    }

    /// The routing key: the type without `offboard.`.
    pub fn routing_key(self) -> &'static str {
        &self.type_name()["offboard.".len()..]
    }
}

/// A ready-to-publish outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub kind: OutcomeType,
    pub body: Value,
}

impl Outcome {
    pub fn id(&self) -> &str {
        self.body["id"].as_str().unwrap_or_default()
    }
}

pub(crate) fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Builds the outcome of `journal` for `kind`. Deterministic: same journal, same bytes.
pub fn build(journal: &Journal, kind: OutcomeType, extra: Option<Value>) -> Outcome {
    let id = uuid::Uuid::new_v5(
        &OUTCOME_NAMESPACE,
        format!("{}/{}", journal.saga_id, kind.type_name()).as_bytes(),
    );
    let steps: Vec<Value> = journal
        .steps
        .iter()
        .map(|s| {
            let mut v = json!({
                "name": s.name.as_str(),
                "status": s.status,
                "attempts": s.attempts,
                "started_at": s.started_at.map(ts),
                "finished_at": s.finished_at.map(ts),
            });
            if let Some(d) = &s.detail {
                v["detail"] = json!(d);
            }
            v
        })
        .collect();
    let status = journal.status.unwrap_or(match kind {
        OutcomeType::Failed => FinalStatus::Failed,
        OutcomeType::Planned => FinalStatus::Planned,
        OutcomeType::Scheduled => FinalStatus::Scheduled,
        OutcomeType::Held => FinalStatus::Held,
        OutcomeType::Compensated => FinalStatus::Compensated,
        OutcomeType::Completed => FinalStatus::Deleted,
    });
    let time = journal.completed_at.unwrap_or(journal.updated_at);
    let duration_ms = (time - journal.created_at).num_milliseconds().max(0);
    let archive = journal.archive.as_ref().map(|a: &ArchiveRecord| {
        json!({ "uri": a.uri, "sha256": a.sha256, "records": a.records, "bytes": a.bytes })
    });
    let manifest = journal
        .manifest
        .as_ref()
        .map(|m: &ManifestRecord| json!({ "uri": m.uri, "sha256": m.sha256 }));
    let error = journal.error.as_ref().map(|e: &ErrorRecord| {
        let mut v = json!({ "step": e.step, "class": e.class, "message": e.message });
        if let Some(s) = e.http_status {
            v["http_status"] = json!(s);
        }
        v
    });
    let mut data = json!({
        "saga_id": journal.saga_id,
        "event_id": journal.event.id,
        "employee": {
            "external_id": journal.employee.external_id,
            "user_id": journal.employee.user_id,
            "agent_id": journal.employee.agent_id,
        },
        "status": status.as_str(),
        "steps": steps,
        "revoked_at": journal.revoked_at.map(ts),
        "verified_at": journal.verified_at.map(ts),
        "verification": journal.verification,
        "sla": sla(journal),
        "archive": archive,
        "manifest": manifest,
        "error": error,
        "duration_ms": duration_ms,
    });
    if !journal.warnings.is_empty() {
        data["warnings"] = json!(journal.warnings);
    }
    if let Some(Value::Object(extra)) = extra
        && let Value::Object(d) = &mut data
    {
        for (k, v) in extra {
            d.insert(k, v);
        }
    }
    let body = json!({
        "specversion": "1.0",
        "id": id.to_string(),
        "source": "cxone-offboard",
        "type": kind.type_name(),
        "subject": journal.employee.external_id,
        "time": ts(time),
        "datacontenttype": "application/json",
        "data": data,
    });
    Outcome { kind, body }
}

/// `sla` of outcomes and manifests (CONTRACT §4).
pub fn sla(journal: &Journal) -> Value {
    match &journal.sla {
        Some(s) => json!({
            "revoke_within_secs": s.revoke_within_secs,
            "due_at": ts(s.due_at),
            "met": s.met,
        }),
        None => Value::Null,
    }
}

/// The outcome of a journal, exactly as it was first published.
pub(crate) fn outcome_of(j: &Journal, kind: OutcomeType, settings: &Settings) -> Outcome {
    let bucket = &settings.s3.bucket;
    let extra = match kind {
        OutcomeType::Planned => Some(json!({ "plan": j.plan })),
        OutcomeType::Compensated => Some(json!({
            "compensation": j.compensation,
            "rescind_manifest": keys::uri(
                bucket,
                &keys::rescind_manifest(&j.employee.external_id, &j.saga_id)
            ),
        })),
        OutcomeType::Held => Some(json!({
            "guard": {
                "max_destructive_per_window": settings.guard.max_destructive_per_window,
                "window_secs": settings.guard.window_secs,
            }
        })),
        OutcomeType::Scheduled => Some(json!({ "effective_at": j.event.effective_at })),
        _ => None,
    };
    build(j, kind, extra)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Limits, parse};

    #[test]
    fn outcome_ids_are_deterministic_and_shaped_per_contract() {
        let e = parse(
            br#"{"specversion":"1.0","id":"e1","source":"s","type":"employee.terminated",
                 "data":{"employee":{"external_id":"E000042"}}}"#,
            Limits::default(),
        )
        .expect("valid");
        let mut j = Journal::new("saga-1", &e, Utc::now());
        j.step_mut(super::super::journal::StepName::Delete).status =
            super::super::journal::StepStatus::Done;
        super::super::machine::complete(&mut j, false, Utc::now());
        let a = build(&j, OutcomeType::Completed, None);
        let b = build(&j, OutcomeType::Completed, None);
        assert_eq!(a, b);
        let f = build(&j, OutcomeType::Failed, None);
        assert_ne!(a.id(), f.id());
        assert_eq!(a.kind.routing_key(), "saga.completed");
        assert_eq!(a.body["source"], "cxone-offboard");
        assert_eq!(a.body["subject"], "E000042");
        let data = &a.body["data"];
        for key in [
            "saga_id",
            "event_id",
            "employee",
            "status",
            "steps",
            "revoked_at",
            "verified_at",
            "verification",
            "sla",
            "archive",
            "manifest",
            "error",
            "duration_ms",
        ] {
            assert!(data.get(key).is_some(), "missing {key}");
        }
        assert_eq!(data["steps"].as_array().map(Vec::len), Some(10));
        assert_eq!(data["steps"][1]["name"], "block_login");
        assert_eq!(data["status"], "DELETED");
    }
}
