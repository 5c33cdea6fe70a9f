//! The verification re-read after `revoke_keys` (CONTRACT §4 `verification`): is the agent
//! inactive (or the SCIM user), is the session gone, is no access key left? Reads at
//! revocation priority; the machine decides what the answer means.

use super::super::journal::Verification;
use super::{Run, StepError};
use crate::config::BlockLogin;
use crate::cxone::Cxone;
use crate::store::Store;

pub(crate) async fn read<C: Cxone, S: Store>(
    run: &mut Run<'_, C, S>,
) -> Result<Verification, StepError> {
    let cxone = run.cxone.clone();
    let j = run.journal();
    let agent_id = j.employee.agent_id;
    let user = super::find_resolved(&cxone, j).await?;
    let user_status = user
        .map(|u| u.status)
        .unwrap_or_else(|| "NOT_FOUND".to_owned());
    let (agent_active, active_access_keys, logged_in) = match agent_id {
        Some(id) => {
            let agent = cxone.get_agent(&id.to_string()).await?;
            let keys = cxone.access_keys(id).await?;
            let state = cxone.agent_state(id).await?;
            (
                agent.is_some_and(|a| a.is_active),
                u32::try_from(keys.iter().filter(|k| k.is_active).count()).unwrap_or(u32::MAX),
                state.is_some_and(|s| !s.agent_state_name.eq_ignore_ascii_case("LoggedOut")),
            )
        }
        None => (false, 0, false),
    };
    let scim_active = match (run.deps.settings.cxone.block_login, &j.before.scim) {
        (BlockLogin::Scim, Some(_)) => Some(
            cxone
                .scim_find(&j.employee.external_id)
                .await?
                .is_some_and(|u| u.active),
        ),
        _ => None,
    };
    Ok(Verification {
        agent_active,
        user_status,
        active_access_keys,
        logged_in,
        scim_active,
    })
}
