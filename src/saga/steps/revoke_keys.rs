//! `revoke_keys`: delete the agent's API access keys (listed by `resolve`; listed again when
//! resumed). A key already gone answers 404 and counts as done. Deleted keys cannot be
//! restored.

use serde_json::json;

use super::{Run, StepError, StepResult};
use crate::cxone::{Cxone, Removal};
use crate::store::Store;

pub(super) async fn run<C: Cxone, S: Store>(
    run: &mut Run<'_, C, S>,
) -> Result<StepResult, StepError> {
    let cxone = run.cxone.clone();
    let Some(agent_id) = run.journal().employee.agent_id else {
        return Ok(StepResult::Skipped("no agent record".to_owned()));
    };
    let keys = if run.resumed {
        cxone.access_keys(agent_id).await?
    } else {
        run.journal().before.access_keys.clone().unwrap_or_default()
    };
    if keys.is_empty() {
        return Ok(StepResult::Skipped("no access keys".to_owned()));
    }
    if run.plan {
        let ids: Vec<&str> = keys.iter().map(|k| k.access_key_id.as_str()).collect();
        return Ok(StepResult::Planned(
            format!("would delete {} access keys", ids.len()),
            json!({ "action": "delete_access_keys", "count": ids.len(), "access_key_ids": ids }),
        ));
    }
    let mut removed = 0;
    for key in &keys {
        if cxone.delete_access_key(&key.access_key_id).await? == Removal::Removed {
            removed += 1;
        }
        let j = run.journal_mut();
        if !j.deleted_keys.contains(&key.access_key_id) {
            j.deleted_keys.push(key.access_key_id.clone());
        }
    }
    Ok(StepResult::Done(Some(format!(
        "deleted {removed} of {} access keys",
        keys.len()
    ))))
}
