//! `notify`: tell the HRIS endpoint the event named (configured endpoints only; an event naming
//! another is invalid input). A notification that does not go through after its retries does
//! not fail an offboarding that happened: the saga completes with a warning.

use serde_json::json;
use tracing::warn;

use super::super::machine;
use super::super::ports::Notice;
use super::{Run, StepError, StepResult};
use crate::cxone::Cxone;
use crate::store::Store;

pub(super) async fn run<C: Cxone, S: Store>(
    run: &mut Run<'_, C, S>,
) -> Result<StepResult, StepError> {
    let Some(name) = run.termination.notify.clone() else {
        return Ok(StepResult::Skipped("no notify endpoint named".to_owned()));
    };
    if run.plan {
        return Ok(StepResult::Skipped(
            "dry run: the HRIS is not notified".to_owned(),
        ));
    }
    let j = run.journal();
    let body = json!({
        "type": "offboard.saga.completed",
        "saga_id": j.saga_id,
        "event_id": j.event.id,
        "employee": {
            "external_id": j.employee.external_id,
            "user_id": j.employee.user_id,
            "agent_id": j.employee.agent_id,
        },
        "status": machine::final_status(j, false).as_str(),
        "revoked_at": j.revoked_at,
        "verified_at": j.verified_at,
        "archive": j.archive.as_ref().map(|a| json!({"uri": a.uri, "sha256": a.sha256, "records": a.records})),
        "manifest": j.manifest.as_ref().map(|m| json!({"uri": m.uri, "sha256": m.sha256})),
        "steps": j.steps.iter().map(|s| json!({"name": s.name.as_str(), "status": s.status})).collect::<Vec<_>>(),
    });
    let notice = Notice {
        saga_id: j.saga_id.clone(),
        body,
    };
    let notifier = run.deps.notifier.clone();
    match notifier.notify(&name, &notice).await {
        Ok(detail) => Ok(StepResult::Done(Some(detail))),
        Err(e) => {
            let shown: String = name.chars().take(64).filter(|c| !c.is_control()).collect();
            let warning = format!("notify `{shown}`: {e}");
            warn!("{warning}");
            run.journal_mut().warnings.push(warning.clone());
            Ok(StepResult::Skipped(warning))
        }
    }
}
