//! The steps. Each reads before it writes when the saga is resumed, so anything already done
//! (an inactive agent, a removed skill, a deleted user, a 404 on a deleted key) counts as done.

use chrono::Utc;
use serde_json::json;
use tracing::{debug, info};

use super::journal::StepName;
use super::{Run, StepError, StepResult};
use crate::config::BlockLogin;
use crate::cxone::{Cxone, Deactivation, Removal, User, UserFilter};
use crate::event::Command;
use crate::store::Store;

pub(crate) async fn execute<C: Cxone, S: Store>(
    run: &mut Run<'_, C, S>,
    step: StepName,
) -> Result<StepResult, StepError> {
    let Command::Terminate(t) = &run.event.command else {
        return Err(StepError::Permanent("not a termination event".to_owned()));
    };
    let options = t.options.clone();
    match step {
        StepName::Resolve => resolve(run).await,
        StepName::BlockLogin => block_login(run).await,
        StepName::Logout => {
            if !options.terminate_sessions {
                return Ok(StepResult::Skipped("terminate_sessions=false".to_owned()));
            }
            logout(run, t.reason.as_deref()).await
        }
        StepName::RevokeKeys => revoke_keys(run).await,
        StepName::UnassignSkills => unassign_skills(run).await,
        StepName::Archive => {
            if !options.archive_interactions {
                return Ok(StepResult::Skipped("archive_interactions=false".to_owned()));
            }
            if run.plan {
                return plan_archive(run, options.archive_lookback_days).await;
            }
            crate::archive::archive_step(run, options.archive_lookback_days).await
        }
        StepName::Delete => {
            if !options.delete_user {
                return Ok(StepResult::Skipped(
                    "delete_user=false: deactivated only".to_owned(),
                ));
            }
            if run.plan {
                let user = run
                    .stored
                    .journal
                    .employee
                    .user_id
                    .clone()
                    .unwrap_or_default();
                return Ok(StepResult::Planned(
                    format!("would deactivate (soft-delete) user {user}"),
                    json!({ "action": "deactivate_user", "user_id": user }),
                ));
            }
            delete(run).await
        }
        StepName::Manifest if run.plan => {
            Ok(StepResult::Skipped("dry run: no manifest".to_owned()))
        }
        StepName::Notify if run.plan => Ok(StepResult::Skipped(
            "dry run: the HRIS is not notified".to_owned(),
        )),
        StepName::Manifest => crate::archive::manifest_step(run).await,
        StepName::Notify => crate::hris::notify_step(run, t.notify.as_deref()).await,
        StepName::Outcome => Ok(StepResult::Done(None)),
    }
}

/// Exactly one live user, or none. Two different users for one id is a data problem.
fn pick(users: Vec<User>, what: &str) -> Result<Option<User>, StepError> {
    let mut live: Vec<User> = users.into_iter().filter(|u| !u.is_deleted()).collect();
    live.dedup_by(|a, b| a.id == b.id);
    match live.len() {
        0 => Ok(None),
        1 => Ok(live.pop()),
        n => Err(StepError::Permanent(format!(
            "{n} CXone users match {what}; refusing to guess which one leaves"
        ))),
    }
}

async fn resolve<C: Cxone, S: Store>(run: &mut Run<'_, C, S>) -> Result<StepResult, StepError> {
    let cxone = run.deps.cxone.clone();
    let employee = run.event.employee().clone();
    let mut user = pick(
        cxone
            .find_users(UserFilter::ExternalIdentity(employee.external_id.as_str()))
            .await?,
        "the external id",
    )?;
    if user.is_none()
        && let Some(name) = &employee.username
    {
        user = pick(
            cxone.find_users(UserFilter::UserName(name)).await?,
            "the username",
        )?;
    }
    if user.is_none()
        && let Some(email) = &employee.email
    {
        user = pick(
            cxone.find_users(UserFilter::Email(email)).await?,
            "the email",
        )?;
    }
    let Some(user) = user else {
        info!("no live CXone user for this employee");
        return Ok(StepResult::Absent(
            "no CXone user with this external id, username or email (or already deleted)"
                .to_owned(),
        ));
    };
    let agent = cxone.get_agent(&user.id).await?;
    let keys = match &agent {
        Some(a) => Some(cxone.access_keys(a.agent_id).await?),
        None => None,
    };
    let scim = match run.deps.settings.cxone.block_login {
        BlockLogin::Scim => cxone.scim_find(employee.external_id.as_str()).await?,
        BlockLogin::Agent => None,
    };
    let j = &mut run.stored.journal;
    j.employee.user_id = Some(user.id.clone());
    j.employee.agent_id = agent.as_ref().map(|a| a.agent_id);
    let detail = format!(
        "user {} ({}), agent {}",
        user.id,
        user.status,
        agent
            .as_ref()
            .map(|a| a.agent_id.to_string())
            .unwrap_or_else(|| "none".to_owned())
    );
    j.before.user = Some(user);
    j.before.agent = agent;
    j.before.access_keys = keys;
    j.before.scim = scim;
    Ok(StepResult::Done(Some(detail)))
}

async fn block_login<C: Cxone, S: Store>(run: &mut Run<'_, C, S>) -> Result<StepResult, StepError> {
    let cxone = run.deps.cxone.clone();
    if run.deps.settings.cxone.block_login == BlockLogin::Scim
        && let Some(scim) = run.stored.journal.before.scim.clone()
    {
        let active = if run.resumed {
            cxone
                .scim_find(&run.stored.journal.employee.external_id)
                .await?
                .map(|u| u.active)
                .unwrap_or(false)
        } else {
            scim.active
        };
        if !active {
            return Ok(StepResult::Done(Some(
                "SCIM user already inactive".to_owned(),
            )));
        }
        cxone.scim_set_active(&scim.id, false).await?;
        return Ok(StepResult::Done(Some("SCIM active=false".to_owned())));
    }
    let Some(agent) = run.stored.journal.before.agent.clone() else {
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

async fn logout<C: Cxone, S: Store>(
    run: &mut Run<'_, C, S>,
    reason: Option<&str>,
) -> Result<StepResult, StepError> {
    let cxone = run.deps.cxone.clone();
    let Some(agent_id) = run.stored.journal.employee.agent_id else {
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
    let immediate = reason.is_some_and(|r| {
        safety
            .immediate_reasons
            .iter()
            .any(|i| i.eq_ignore_ascii_case(r))
    });
    let mut waited = None;
    if live && !immediate {
        let now = Utc::now();
        let since = *run.stored.journal.live_contact_since.get_or_insert(now);
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

async fn revoke_keys<C: Cxone, S: Store>(run: &mut Run<'_, C, S>) -> Result<StepResult, StepError> {
    let cxone = run.deps.cxone.clone();
    let Some(agent_id) = run.stored.journal.employee.agent_id else {
        return Ok(StepResult::Skipped("no agent record".to_owned()));
    };
    let keys = if run.resumed {
        cxone.access_keys(agent_id).await?
    } else {
        run.stored
            .journal
            .before
            .access_keys
            .clone()
            .unwrap_or_default()
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
        if !run.stored.journal.deleted_keys.contains(&key.access_key_id) {
            run.stored
                .journal
                .deleted_keys
                .push(key.access_key_id.clone());
        }
    }
    Ok(StepResult::Done(Some(format!(
        "deleted {removed} of {} access keys",
        keys.len()
    ))))
}

async fn unassign_skills<C: Cxone, S: Store>(
    run: &mut Run<'_, C, S>,
) -> Result<StepResult, StepError> {
    let cxone = run.deps.cxone.clone();
    let Some(agent_id) = run.stored.journal.employee.agent_id else {
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
    // Keep the before-image (with proficiency) durable before removing anything.
    if run.stored.journal.before.skills.is_none() {
        run.stored.journal.before.skills = Some(skills.clone());
        run.checkpoint().await?;
    }
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
    for id in &ids {
        if !run.stored.journal.removed_skills.contains(id) {
            run.stored.journal.removed_skills.push(*id);
        }
    }
    debug!(count = ids.len(), "skills removed");
    Ok(StepResult::Done(Some(format!(
        "removed {} skills",
        ids.len()
    ))))
}

async fn plan_archive<C: Cxone, S: Store>(
    run: &mut Run<'_, C, S>,
    lookback_days: u32,
) -> Result<StepResult, StepError> {
    let Some(agent_id) = run.stored.journal.employee.agent_id else {
        return Ok(StepResult::Skipped("no agent record".to_owned()));
    };
    let end = Utc::now();
    let start = end - chrono::Duration::days(i64::from(lookback_days));
    let page = run
        .deps
        .cxone
        .contacts_page(agent_id, start, end, None)
        .await?;
    let count = page.total.unwrap_or(page.records.len() as u64);
    Ok(StepResult::Planned(
        format!("would archive {count} contacts from the last {lookback_days} days"),
        json!({ "action": "archive", "contacts": count, "lookback_days": lookback_days }),
    ))
}

async fn delete<C: Cxone, S: Store>(run: &mut Run<'_, C, S>) -> Result<StepResult, StepError> {
    let cxone = run.deps.cxone.clone();
    let Some(user_id) = run.stored.journal.employee.user_id.clone() else {
        return Ok(StepResult::Skipped("no CXone user".to_owned()));
    };
    if run.resumed {
        let users = cxone
            .find_users(UserFilter::ExternalIdentity(
                &run.stored.journal.employee.external_id,
            ))
            .await?;
        if users.iter().any(|u| u.id == user_id && u.is_deleted()) {
            return Ok(StepResult::Done(Some("user already DELETED".to_owned())));
        }
    }
    match cxone.deactivate_user(&user_id).await? {
        Deactivation::Deleted => Ok(StepResult::Done(Some(
            "user deactivated (soft delete)".to_owned(),
        ))),
        Deactivation::Refused => {
            run.stored.journal.status = Some(super::journal::FinalStatus::DeactivatedOnly);
            Ok(StepResult::Skipped(
                "CXone refused the deletion (notDeletedUserIds); access stays revoked".to_owned(),
            ))
        }
    }
}
