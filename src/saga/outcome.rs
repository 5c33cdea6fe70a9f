//! Outcome events (CONTRACT §4): CloudEvents on `offboard.outcomes`, one per saga transition,
//! with an id deterministic for (saga, type) so a re-publication is a droppable duplicate.

use std::future::Future;

use chrono::{DateTime, SecondsFormat, Utc};
use lapin::BasicProperties;
use serde::Serialize;
use serde_json::{Value, json};

use super::journal::{ArchiveRecord, ErrorRecord, FinalStatus, Journal, ManifestRecord};
use crate::broker::publisher::{PublishError, Publisher};

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

fn ts(t: DateTime<Utc>) -> String {
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

/// Where outcomes go. The real one publishes with confirms; tests collect them.
pub trait Outcomes: Send + Sync {
    fn publish(&self, outcome: &Outcome) -> impl Future<Output = Result<(), PublishError>> + Send;
}

/// Outcomes on the broker's outcomes exchange.
#[derive(Debug, Clone)]
pub struct AmqpOutcomes {
    pub publisher: Publisher,
    pub exchange: String,
}

impl Outcomes for AmqpOutcomes {
    async fn publish(&self, outcome: &Outcome) -> Result<(), PublishError> {
        let body = serde_json::to_vec(&outcome.body).unwrap_or_default();
        let props = BasicProperties::default()
            .with_content_type("application/cloudevents+json".into())
            .with_delivery_mode(2)
            .with_message_id(outcome.id().into())
            .with_type(outcome.kind.type_name().into());
        self.publisher
            .publish(
                &self.exchange,
                outcome.kind.routing_key(),
                &body,
                props,
                false,
            )
            .await
    }
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
        j.status = Some(FinalStatus::Deleted);
        j.completed_at = Some(Utc::now());
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
