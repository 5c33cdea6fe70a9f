//! `resolve`: find the leaver in CXone (UserHub search, then `GET /agents/{userId}` and the
//! agent's access keys) and keep the before-images. Identity is the external id; the username
//! and email fallbacks accept only a user with no external id or the same one, never another
//! person's account.

use tracing::info;

use super::super::journal::MatchedBy;
use super::{Run, StepError, StepResult};
use crate::config::BlockLogin;
use crate::cxone::{Cxone, User, UserFilter};
use crate::store::Store;

/// What one search says about who the leaver is.
#[derive(Debug, PartialEq)]
pub(crate) enum Match {
    One(User),
    Nobody,
    /// A user with this external id exists but is `DELETED`.
    Deleted,
}

fn dedup(mut users: Vec<User>) -> Vec<User> {
    users.sort_by(|a, b| a.id.cmp(&b.id));
    users.dedup_by(|a, b| a.id == b.id);
    users
}

/// The users found by the external id.
pub(crate) fn by_external_id(users: Vec<User>, external_id: &str) -> Result<Match, StepError> {
    let (deleted, live): (Vec<User>, Vec<User>) =
        dedup(users).into_iter().partition(User::is_deleted);
    match live.len() {
        0 if deleted.is_empty() => Ok(Match::Nobody),
        0 => Ok(Match::Deleted),
        1 => Ok(live.into_iter().next().map_or(Match::Nobody, Match::One)),
        n => Err(StepError::Permanent(format!(
            "{n} live CXone users have external id {external_id}; refusing to guess which one \
             leaves"
        ))),
    }
}

/// The users found by a username or email fallback: only a user without an external id or
/// with this one is the leaver; a user with another external id is another person.
pub(crate) fn by_fallback(
    users: Vec<User>,
    external_id: &str,
    what: &str,
) -> Result<Match, StepError> {
    let live: Vec<User> = dedup(users)
        .into_iter()
        .filter(|u| !u.is_deleted())
        .collect();
    let (ours, others): (Vec<User>, Vec<User>) = live.into_iter().partition(|u| {
        u.external_identity
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == external_id)
    });
    if let Some(other) = others.first() {
        return Err(StepError::Permanent(format!(
            "the {what} matches CXone user {} whose external id is {}, not {external_id}: \
             refusing to act on another person's account (check the HR record or the CXone \
             user, then replay)",
            other.id,
            other.external_identity.as_deref().unwrap_or("?"),
        )));
    }
    match ours.len() {
        0 => Ok(Match::Nobody),
        1 => Ok(ours.into_iter().next().map_or(Match::Nobody, Match::One)),
        n => Err(StepError::Permanent(format!(
            "{n} CXone users without an external id match the {what}; refusing to guess which \
             one leaves"
        ))),
    }
}

pub(super) async fn run<C: Cxone, S: Store>(
    run: &mut Run<'_, C, S>,
) -> Result<StepResult, StepError> {
    let employee = run.event.employee().clone();
    let external_id = employee.external_id.as_str();
    let cxone = run.cxone.clone();
    let mut found = match by_external_id(
        cxone
            .find_users(UserFilter::ExternalIdentity(external_id))
            .await?,
        external_id,
    )? {
        Match::Deleted => {
            info!("the CXone user with this external id is already DELETED");
            return Ok(StepResult::Absent(
                "the CXone user with this external id is already DELETED".to_owned(),
            ));
        }
        Match::One(u) => Some((u, MatchedBy::ExternalId)),
        Match::Nobody => None,
    };
    if found.is_none()
        && let Some(name) = &employee.username
        && let Match::One(u) = by_fallback(
            cxone.find_users(UserFilter::UserName(name)).await?,
            external_id,
            "username",
        )?
    {
        found = Some((u, MatchedBy::Username));
    }
    if found.is_none()
        && let Some(email) = &employee.email
        && let Match::One(u) = by_fallback(
            cxone.find_users(UserFilter::Email(email)).await?,
            external_id,
            "email",
        )?
    {
        found = Some((u, MatchedBy::Email));
    }
    let Some((user, matched_by)) = found else {
        info!("no live CXone user for this employee");
        return Ok(StepResult::Absent(
            "no CXone user with this external id, username or email".to_owned(),
        ));
    };
    let agent = cxone.get_agent(&user.id).await?;
    let keys = match &agent {
        Some(a) => Some(cxone.access_keys(a.agent_id).await?),
        None => None,
    };
    let scim = match run.deps.settings.cxone.block_login {
        BlockLogin::Scim => cxone.scim_find(external_id).await?,
        BlockLogin::Agent => None,
    };
    let detail = format!(
        "user {} ({}) found by {}, agent {}",
        user.id,
        user.status,
        match matched_by {
            MatchedBy::ExternalId => "external id",
            MatchedBy::Username => "username (it has no external id)",
            MatchedBy::Email => "email (it has no external id)",
        },
        agent
            .as_ref()
            .map(|a| a.agent_id.to_string())
            .unwrap_or_else(|| "none".to_owned())
    );
    let j = run.journal_mut();
    j.employee.user_id = Some(user.id.clone());
    j.employee.agent_id = agent.as_ref().map(|a| a.agent_id);
    j.employee.matched_by = Some(matched_by);
    j.before.user = Some(user);
    j.before.agent = agent;
    j.before.access_keys = keys;
    j.before.scim = scim;
    Ok(StepResult::Done(Some(detail)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str, ext: Option<&str>, status: &str) -> User {
        User {
            id: id.to_owned(),
            user_name: Some("jane@acme.example".to_owned()),
            email_address: None,
            external_identity: ext.map(str::to_owned),
            status: status.to_owned(),
            team_id: None,
        }
    }

    #[test]
    fn a_deleted_user_with_the_external_id_is_already_absent() {
        assert_eq!(
            by_external_id(vec![user("u1", Some("E1"), "DELETED")], "E1").expect("ok"),
            Match::Deleted
        );
        assert_eq!(by_external_id(vec![], "E1").expect("ok"), Match::Nobody);
        assert!(matches!(
            by_external_id(
                vec![
                    user("u1", Some("E1"), "ACTIVE"),
                    user("u2", Some("E1"), "ACTIVE")
                ],
                "E1"
            ),
            Err(StepError::Permanent(_))
        ));
    }

    #[test]
    fn the_fallback_never_takes_another_persons_account() {
        // A rehire under a new HR id owns the username now.
        let err = by_fallback(vec![user("u2", Some("E2"), "ACTIVE")], "E1", "username")
            .expect_err("someone else");
        assert!(err.to_string().contains("not E1"), "{err}");
        // No external id, or the same one: that is the leaver.
        assert!(matches!(
            by_fallback(vec![user("u1", None, "ACTIVE")], "E1", "username"),
            Ok(Match::One(u)) if u.id == "u1"
        ));
        assert!(matches!(
            by_fallback(vec![user("u1", Some(""), "ACTIVE")], "E1", "username"),
            Ok(Match::One(_))
        ));
        // Deleted ones are ignored; two candidates are ambiguous.
        assert_eq!(
            by_fallback(vec![user("u3", Some("E9"), "DELETED")], "E1", "email").expect("ok"),
            Match::Nobody
        );
        assert!(
            by_fallback(
                vec![user("u1", None, "ACTIVE"), user("u4", None, "ACTIVE")],
                "E1",
                "email"
            )
            .is_err()
        );
    }
}
