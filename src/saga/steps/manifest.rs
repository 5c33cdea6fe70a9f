//! `manifest`: the write-once audit manifest (`manifests/{external_id}/{saga_id}.json`), built
//! from the journal as it was saved just before, so a resumed saga writes exactly the same
//! bytes; a rescind writes a second one (`….rescind.json`).

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};

use super::super::Deps;
use super::super::journal::{Journal, ManifestRecord, StepName};
use super::super::machine;
use super::{Run, StepError, StepResult};
use crate::cxone::Cxone;
use crate::evidence::{self, WriteOnceError};
use crate::store::{Store, keys};

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The manifest document of a journal (`kind`: `termination` or `rescind`), sealed.
pub(crate) fn document(journal: &Journal, kind: &str, extra: Option<Value>) -> Value {
    let plan = machine::is_plan(journal);
    // From the manifest's point of view its own step and those after it are still to come.
    let steps: Vec<Value> = journal
        .steps
        .iter()
        .map(|s| {
            if kind == "termination" && s.name >= StepName::Manifest {
                json!({ "name": s.name.as_str(), "status": "pending" })
            } else {
                json!({
                    "name": s.name.as_str(),
                    "status": s.status,
                    "attempts": s.attempts,
                    "started_at": s.started_at.map(ts),
                    "finished_at": s.finished_at.map(ts),
                    "detail": s.detail,
                })
            }
        })
        .collect();
    let calls: Vec<Value> = journal
        .calls
        .iter()
        .map(
            |c| json!({ "method": c.method, "route": c.route, "status": c.status, "at": ts(c.at), "count": c.count, "last_at": c.last_at.map(ts) }),
        )
        .collect();
    let status = match kind {
        "rescind" => "COMPENSATED",
        _ => machine::final_status(journal, plan).as_str(),
    };
    let prepared = journal
        .manifest_at
        .or(journal.completed_at)
        .unwrap_or(journal.updated_at);
    let mut m = json!({
        "kind": kind,
        "saga_id": journal.saga_id,
        "event": {
            "id": journal.event.id,
            "source": journal.event.source,
            "type": journal.event.kind,
            "time": journal.event.time,
            "effective_at": journal.event.effective_at,
            "reason": journal.event.reason,
            "options": journal.event.options,
        },
        "employee": {
            "external_id": journal.employee.external_id,
            "user_id": journal.employee.user_id,
            "agent_id": journal.employee.agent_id,
            "matched_by": journal.employee.matched_by,
        },
        "status": status,
        "received_at": ts(journal.received_at()),
        "revoked_at": journal.revoked_at.map(ts),
        "verified_at": journal.verified_at.map(ts),
        "verification": journal.verification,
        "sla": super::super::outcome::sla(journal),
        "steps": steps,
        "calls": calls,
        "compensating_records": {
            "user": journal.before.user,
            "agent_active": journal.before.agent.as_ref().map(|a| a.is_active),
            "agent": journal.before.agent,
            "scim": journal.before.scim,
            "skills": journal.before.skills,
            "access_key_ids": journal.before.access_keys.as_ref().map(|ks| ks.iter().map(|k| k.access_key_id.clone()).collect::<Vec<_>>()),
            "deleted_access_key_ids": journal.deleted_keys,
        },
        "archive": journal.archive.as_ref().map(|a| json!({
            "uri": a.uri, "sha256": a.sha256, "records": a.records, "bytes": a.bytes,
        })),
        "worker": { "version": crate::VERSION },
        "created_at": ts(journal.created_at),
        "written_at": ts(prepared),
    });
    if let (Some(Value::Object(extra)), Value::Object(map)) = (extra, &mut m) {
        for (k, v) in extra {
            map.insert(k, v);
        }
    }
    evidence::seal(m)
}

/// Writes a manifest once; a different one already there is a permanent error.
pub(crate) async fn write<S: Store>(
    store: &S,
    key: &str,
    manifest: &Value,
) -> Result<String, StepError> {
    evidence::write_once(store, key, manifest)
        .await
        .map_err(|e| match e {
            WriteOnceError::Store(s) => StepError::Store(s),
            other => StepError::Permanent(other.to_string()),
        })
}

/// The rescind manifest of a compensated journal (idempotent: built from the saved journal).
pub(crate) async fn write_rescind<C, S: Store>(
    deps: &Deps<C, S>,
    j: &Journal,
) -> Result<String, StepError> {
    let key = keys::rescind_manifest(&j.employee.external_id, &j.saga_id);
    let manifest = document(
        j,
        "rescind",
        Some(json!({ "compensation": j.compensation, "rescind": j.rescind })),
    );
    write(deps.store.as_ref(), &key, &manifest).await
}

pub(super) async fn run<C: Cxone, S: Store>(
    run: &mut Run<'_, C, S>,
) -> Result<StepResult, StepError> {
    if run.plan {
        return Ok(StepResult::Skipped("dry run: no manifest".to_owned()));
    }
    let j = run.journal();
    let key = keys::manifest(&j.employee.external_id, &j.saga_id);
    let manifest = document(j, "termination", None);
    let sha256 = write(run.deps.store.as_ref(), &key, &manifest).await?;
    run.journal_mut().manifest = Some(ManifestRecord {
        uri: keys::uri(&run.deps.settings.s3.bucket, &key),
        key,
        sha256,
    });
    Ok(StepResult::Done(None))
}
