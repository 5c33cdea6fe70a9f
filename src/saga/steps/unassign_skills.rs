//! `unassign_skills`: hand the agent's skills (CXone's queues) back. The before-image, with
//! each skill's proficiency, is saved before anything is removed; that write also takes the
//! saga's lease for the housekeeping stage.

use serde_json::json;
use tracing::debug;

use super::{Run, StepError, StepResult};
use crate::cxone::Cxone;
use crate::store::Store;

pub(super) async fn run<C: Cxone, S: Store>(
    run: &mut Run<'_, C, S>,
) -> Result<StepResult, StepError> {
    let cxone = run.cxone.clone();
    let Some(agent_id) = run.journal().employee.agent_id else {
        return Ok(StepResult::Skipped("no agent record".to_owned()));
    };
    let skills = cxone.agent_skills(agent_id).await?;
    if skills.is_empty() {
        return Ok(StepResult::Skipped("no skills assigned".to_owned()));
    }
    if run.plan {
        let list: Vec<_> = skills
            .iter()
            .map(|s| json!({ "skillId": s.skill_id, "skillName": s.skill_name, "proficiency": s.proficiency }))
            .collect();
        return Ok(StepResult::Planned(
            format!("would remove {} skills", list.len()),
            json!({ "action": "remove_skills", "count": list.len(), "skills": list }),
        ));
    }
    if run.journal().before.skills.is_none() {
        run.journal_mut().before.skills = Some(skills.clone());
    }
    // The before-image durable and the lease this delivery's before any removal.
    run.save().await?;
    let ids: Vec<i64> = skills.iter().map(|s| s.skill_id).collect();
    let results = cxone.remove_skills(agent_id, &ids).await?;
    if results.iter().any(|r| !r.success) {
        // Read after write: skills that are gone count as removed, whatever the result said.
        let left = cxone.agent_skills(agent_id).await?;
        if !left.is_empty() {
            let names: Vec<String> = left.iter().map(|s| s.skill_id.to_string()).collect();
            return Err(StepError::Permanent(format!(
                "CXone kept skills {} after removal",
                names.join(", ")
            )));
        }
    }
    let j = run.journal_mut();
    for id in &ids {
        if !j.removed_skills.contains(id) {
            j.removed_skills.push(*id);
        }
    }
    debug!(count = ids.len(), "skills removed");
    Ok(StepResult::Done(Some(format!(
        "removed {} skills",
        ids.len()
    ))))
}
