//! `block_login`: `PUT /agents/{id}` with `isActive: false` (or SCIM `active: false`).

use chrono::Utc;
use serde_json::json;

use super::{Run, StepError, StepResult};
use crate::config::BlockLogin;
use crate::cxone::Cxone;
use crate::store::Store;

pub(super) async fn run<C: Cxone, S: Store>(
    run: &mut Run<'_, C, S>,
) -> Result<StepResult, StepError> {
    let cxone = run.cxone.clone();
    if run.deps.settings.cxone.block_login == BlockLogin::Scim
        && let Some(scim) = run.journal().before.scim.clone()
    {
        let active = if run.resumed {
            cxone
                .scim_find(&run.journal().employee.external_id)
                .await?
                .map(|u| u.active)
                .unwrap_or(false)
        } else {
            scim.active
        };
        if run.plan {
            return Ok(StepResult::Planned(
                if active {
                    "would set SCIM active=false".to_owned()
                } else {
                    "SCIM user is already inactive".to_owned()
                },
                json!({ "action": "scim_deactivate", "currently_active": active }),
            ));
        }
        if !active {
            return Ok(StepResult::Done(Some(
                "SCIM user already inactive".to_owned(),
            )));
        }
        cxone.scim_set_active(&scim.id, false).await?;
        return Ok(StepResult::Done(Some("SCIM active=false".to_owned())));
    }
    let Some(agent) = run.journal().before.agent.clone() else {
        return Ok(StepResult::Skipped("no agent record".to_owned()));
    };
    if run.plan {
        let detail = if agent.is_active {
            format!("would set isActive=false on agent {}", agent.agent_id)
        } else {
            format!("agent {} is already inactive", agent.agent_id)
        };
        return Ok(StepResult::Planned(
            detail,
            json!({ "action": "deactivate_agent", "agent_id": agent.agent_id, "currently_active": agent.is_active }),
        ));
    }
    let active = if run.resumed {
        match cxone.get_agent(&agent.agent_id.to_string()).await? {
            Some(a) => a.is_active,
            None => false,
        }
    } else {
        agent.is_active
    };
    if !active {
        return Ok(StepResult::Done(Some("agent already inactive".to_owned())));
    }
    cxone
        .set_agent_active(agent.agent_id, false, Some(Utc::now()))
        .await?;
    Ok(StepResult::Done(Some("agent isActive=false".to_owned())))
}
