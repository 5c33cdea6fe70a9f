//! `delete`: UserHub deactivate (CXone's soft delete). A resumed saga first looks the user up
//! the way `resolve` found them; a user already `DELETED` counts as done. CXone may refuse
//! (`notDeletedUserIds`): the saga then ends `DEACTIVATED_ONLY`, access still revoked.

use serde_json::json;

use super::{Run, StepError, StepResult};
use crate::cxone::{Cxone, Deactivation};
use crate::store::Store;

pub(super) async fn run<C: Cxone, S: Store>(
    run: &mut Run<'_, C, S>,
) -> Result<StepResult, StepError> {
    if !run.termination.options.delete_user {
        return Ok(StepResult::Skipped(
            "delete_user=false: deactivated only".to_owned(),
        ));
    }
    let Some(user_id) = run.journal().employee.user_id.clone() else {
        return Ok(StepResult::Skipped("no CXone user".to_owned()));
    };
    if run.plan {
        return Ok(StepResult::Planned(
            format!("would deactivate (soft-delete) user {user_id}"),
            json!({ "action": "deactivate_user", "user_id": user_id }),
        ));
    }
    let cxone = run.cxone.clone();
    if run.resumed
        && let Some(user) = super::find_resolved(&cxone, run.journal()).await?
        && user.is_deleted()
    {
        return Ok(StepResult::Done(Some("user already DELETED".to_owned())));
    }
    match cxone.deactivate_user(&user_id).await? {
        Deactivation::Deleted => Ok(StepResult::Done(Some(
            "user deactivated (soft delete)".to_owned(),
        ))),
        Deactivation::Refused => Ok(StepResult::Refused(
            "CXone refused the deletion (notDeletedUserIds); access stays revoked".to_owned(),
        )),
    }
}
