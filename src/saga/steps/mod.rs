//! The steps, one file each. A step reads before it writes when the saga is resumed, so
//! anything already done (an inactive agent, a removed skill, a deleted user, a 404 on a
//! deleted key) counts as done. Steps add the data they find to the journal; only the
//! machine changes the saga's state or status.

mod archive;
mod block_login;
mod delete;
mod logout;
pub(crate) mod manifest;
mod notify;
mod resolve;
mod revoke_keys;
mod unassign_skills;
pub(crate) mod verify;

use super::journal::{MatchedBy, StepName};
use super::run::Run;
use super::{StepError, StepResult};
use crate::cxone::{Cxone, User, UserFilter};
use crate::store::Store;

pub(crate) async fn execute<C: Cxone, S: Store>(
    run: &mut Run<'_, C, S>,
    step: StepName,
) -> Result<StepResult, StepError> {
    match step {
        StepName::Resolve => resolve::run(run).await,
        StepName::BlockLogin => block_login::run(run).await,
        StepName::Logout => logout::run(run).await,
        StepName::RevokeKeys => revoke_keys::run(run).await,
        StepName::UnassignSkills => unassign_skills::run(run).await,
        StepName::Archive => archive::run(run).await,
        StepName::Delete => delete::run(run).await,
        StepName::Manifest => manifest::run(run).await,
        StepName::Notify => notify::run(run).await,
        StepName::Outcome => Ok(StepResult::Done(None)),
    }
}

/// Looks the resolved user up again the way `resolve` found them, by id among the matches.
pub(crate) async fn find_resolved<C: Cxone>(
    cxone: &C,
    journal: &super::journal::Journal,
) -> Result<Option<User>, StepError> {
    let Some(user_id) = journal.employee.user_id.as_deref() else {
        return Ok(None);
    };
    let event = &journal.event;
    let filter = match journal.employee.matched_by {
        Some(MatchedBy::Username) => event.username.as_deref().map(UserFilter::UserName),
        Some(MatchedBy::Email) => event.email.as_deref().map(UserFilter::Email),
        Some(MatchedBy::ExternalId) | None => Some(UserFilter::ExternalIdentity(
            journal.employee.external_id.as_str(),
        )),
    };
    let Some(filter) = filter else {
        return Ok(None);
    };
    Ok(cxone
        .find_users(filter)
        .await?
        .into_iter()
        .find(|u| u.id == user_id))
}
