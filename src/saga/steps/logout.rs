//! `logout`: end the agent's live session. An agent in a live contact is not cut off unless
//! the reason is immediate: login is already blocked and keys are revoked meanwhile, and the
//! logout waits up to `safety.max_live_contact_wait_secs`.

use chrono::Utc;
use serde_json::json;

use super::{Run, StepError, StepResult};
use crate::cxone::Cxone;
use crate::store::Store;

pub(super) async fn run<C: Cxone, S: Store>(
    run: &mut Run<'_, C, S>,
) -> Result<StepResult, StepError> {
    if !run.termination.options.terminate_sessions {
        return Ok(StepResult::Skipped("terminate_sessions=false".to_owned()));
    }
    let cxone = run.cxone.clone();
    let Some(agent_id) = run.journal().employee.agent_id else {
        return Ok(StepResult::Skipped("no agent record".to_owned()));
    };
    let state = cxone.agent_state(agent_id).await?;
    let name = state
        .as_ref()
        .map(|s| s.agent_state_name.clone())
        .unwrap_or_default();
    if state.is_none() || name.eq_ignore_ascii_case("LoggedOut") {
        if run.plan {
            return Ok(StepResult::Planned(
                "no live session to end".to_owned(),
                json!({ "action": "none", "state": name }),
            ));
        }
        return Ok(StepResult::Done(Some("no live session".to_owned())));
    }
    let live = state.as_ref().is_some_and(|s| s.on_live_interaction());
    if run.plan {
        return Ok(StepResult::Planned(
            format!("would end the session (agent is {name})"),
            json!({ "action": "logout", "state": name, "live_contact": live }),
        ));
    }
    let safety = &run.deps.settings.safety;
    let immediate = run.termination.reason.as_deref().is_some_and(|r| {
        safety
            .immediate_reasons
            .iter()
            .any(|i| i.eq_ignore_ascii_case(r))
    });
    let mut waited = None;
    if live && !immediate {
        let now = Utc::now();
        let since = *run.journal_mut().live_contact_since.get_or_insert(now);
        let secs = (now - since).num_seconds().max(0);
        if secs < i64::try_from(safety.max_live_contact_wait_secs).unwrap_or(i64::MAX) {
            return Err(StepError::Defer {
                secs: safety.live_contact_poll_secs,
                reason: format!(
                    "agent is in a live contact ({name}); login is blocked, logout waits \
                     (waited {secs}s of {}s)",
                    safety.max_live_contact_wait_secs
                ),
            });
        }
        waited = Some(secs);
    }
    cxone.logout(agent_id).await?;
    let detail = match waited {
        Some(secs) => format!("session ended after waiting {secs}s for a live contact ({name})"),
        None if live => format!("session ended at once (reason is immediate; was {name})"),
        None => format!("session ended (was {name})"),
    };
    Ok(StepResult::Done(Some(detail)))
}
