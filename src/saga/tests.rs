//! The saga against in-memory fakes: transitions, idempotency, classification.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::journal::{self, FinalStatus, SagaState, StepName, StepStatus};
use super::outcome::{Outcome, Outcomes};
use super::{Delivery, Deps, Verdict};
use crate::broker::dead_letter::ErrorClass;
use crate::broker::publisher::PublishError;
use crate::config::Settings;
use crate::cxone::{
    AccessKey, Agent, AgentState, ContactsPage, Cxone, CxoneError, Deactivation, ErrorKind,
    Removal, ScimUser, SkillAssignment, SkillResult, User, UserFilter,
};
use crate::event::{Event, Limits, parse};
use crate::metrics::Metrics;
use crate::store::Memory;

#[derive(Debug, Clone)]
struct FakeUser {
    user: User,
    agent: Agent,
    skills: Vec<SkillAssignment>,
    keys: Vec<String>,
    logged_in: bool,
    refuse_delete: bool,
}

#[derive(Default)]
struct FakeCxone {
    users: Mutex<HashMap<String, FakeUser>>,
    writes: Mutex<Vec<String>>,
    /// (operation, error) to fail with, once per entry.
    failures: Mutex<Vec<(&'static str, CxoneError)>>,
}

impl FakeCxone {
    fn with_user(external_id: &str, agent_id: i64) -> Self {
        let f = FakeCxone::default();
        f.add(external_id, agent_id);
        f
    }

    fn add(&self, external_id: &str, agent_id: i64) {
        let user = User {
            id: format!("u-{external_id}"),
            user_name: Some(format!("{external_id}@x")),
            email_address: None,
            external_identity: Some(external_id.to_owned()),
            status: "ACTIVE".to_owned(),
            team_id: None,
        };
        let agent = Agent {
            agent_id,
            user_id: Some(user.id.clone()),
            user_name: None,
            is_active: true,
            team_id: None,
            termination_date: None,
        };
        let skills = vec![
            SkillAssignment {
                skill_id: 11,
                skill_name: None,
                is_active: true,
                proficiency: Some(2),
            },
            SkillAssignment {
                skill_id: 12,
                skill_name: None,
                is_active: true,
                proficiency: Some(4),
            },
        ];
        self.users.lock().expect("lock").insert(
            external_id.to_owned(),
            FakeUser {
                user,
                agent,
                skills,
                keys: vec![format!("key-{agent_id}")],
                logged_in: true,
                refuse_delete: false,
            },
        );
    }

    fn fail(&self, op: &'static str, status: u16) {
        let kind = crate::cxone::error::classify_status(status);
        self.failures.lock().expect("lock").push((
            op,
            CxoneError::new(kind, "X", "/fake", Some(status), "injected"),
        ));
    }

    fn check(&self, op: &'static str) -> Result<(), CxoneError> {
        let mut f = self.failures.lock().expect("lock");
        if let Some(i) = f.iter().position(|(o, _)| *o == op) {
            return Err(f.remove(i).1);
        }
        Ok(())
    }

    fn write(&self, what: String) {
        self.writes.lock().expect("lock").push(what);
    }

    fn by_agent<T>(&self, agent_id: i64, f: impl FnOnce(&mut FakeUser) -> T) -> Option<T> {
        let mut users = self.users.lock().expect("lock");
        users
            .values_mut()
            .find(|u| u.agent.agent_id == agent_id)
            .map(f)
    }

    fn user(&self, external_id: &str) -> FakeUser {
        self.users.lock().expect("lock")[external_id].clone()
    }
}

impl Cxone for FakeCxone {
    async fn find_users(&self, by: UserFilter<'_>) -> Result<Vec<User>, CxoneError> {
        self.check("find_users")?;
        let users = self.users.lock().expect("lock");
        Ok(users
            .values()
            .filter(|u| match by {
                UserFilter::ExternalIdentity(v) => u.user.external_identity.as_deref() == Some(v),
                UserFilter::UserName(v) => u.user.user_name.as_deref() == Some(v),
                UserFilter::Email(v) => u.user.email_address.as_deref() == Some(v),
            })
            .map(|u| u.user.clone())
            .collect())
    }
    async fn get_agent(&self, id: &str) -> Result<Option<Agent>, CxoneError> {
        self.check("get_agent")?;
        let users = self.users.lock().expect("lock");
        Ok(users
            .values()
            .find(|u| u.user.id == id || u.agent.agent_id.to_string() == id)
            .map(|u| u.agent.clone()))
    }
    async fn set_agent_active(
        &self,
        agent_id: i64,
        active: bool,
        _t: Option<DateTime<Utc>>,
    ) -> Result<(), CxoneError> {
        self.check("set_agent_active")?;
        self.write(format!("set_agent_active {agent_id} {active}"));
        self.by_agent(agent_id, |u| u.agent.is_active = active);
        Ok(())
    }
    async fn scim_find(&self, _external_id: &str) -> Result<Option<ScimUser>, CxoneError> {
        Ok(None)
    }
    async fn scim_set_active(&self, _id: &str, _active: bool) -> Result<(), CxoneError> {
        Ok(())
    }
    async fn agent_state(&self, agent_id: i64) -> Result<Option<AgentState>, CxoneError> {
        self.check("agent_state")?;
        Ok(self.by_agent(agent_id, |u| AgentState {
            agent_state_name: if u.logged_in {
                "Available"
            } else {
                "LoggedOut"
            }
            .to_owned(),
            contact_id: None,
        }))
    }
    async fn logout(&self, agent_id: i64) -> Result<(), CxoneError> {
        self.check("logout")?;
        self.write(format!("logout {agent_id}"));
        self.by_agent(agent_id, |u| u.logged_in = false);
        Ok(())
    }
    async fn access_keys(&self, agent_id: i64) -> Result<Vec<AccessKey>, CxoneError> {
        Ok(self
            .by_agent(agent_id, |u| {
                u.keys
                    .iter()
                    .map(|k| AccessKey {
                        access_key_id: k.clone(),
                        is_active: true,
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
    async fn delete_access_key(&self, key_id: &str) -> Result<Removal, CxoneError> {
        self.check("delete_access_key")?;
        self.write(format!("delete_access_key {key_id}"));
        let mut users = self.users.lock().expect("lock");
        for u in users.values_mut() {
            if let Some(i) = u.keys.iter().position(|k| k == key_id) {
                u.keys.remove(i);
                return Ok(Removal::Removed);
            }
        }
        Ok(Removal::AlreadyGone)
    }
    async fn agent_skills(&self, agent_id: i64) -> Result<Vec<SkillAssignment>, CxoneError> {
        self.check("agent_skills")?;
        Ok(self
            .by_agent(agent_id, |u| u.skills.clone())
            .unwrap_or_default())
    }
    async fn remove_skills(
        &self,
        agent_id: i64,
        ids: &[i64],
    ) -> Result<Vec<SkillResult>, CxoneError> {
        self.check("remove_skills")?;
        self.write(format!("remove_skills {agent_id}"));
        self.by_agent(agent_id, |u| {
            u.skills.retain(|s| !ids.contains(&s.skill_id))
        });
        Ok(ids
            .iter()
            .map(|id| SkillResult {
                skill_id: *id,
                success: true,
                error: None,
            })
            .collect())
    }
    async fn assign_skills(
        &self,
        agent_id: i64,
        skills: &[SkillAssignment],
    ) -> Result<(), CxoneError> {
        self.write(format!("assign_skills {agent_id}"));
        self.by_agent(agent_id, |u| u.skills.extend_from_slice(skills));
        Ok(())
    }
    async fn contacts_page(
        &self,
        _agent_id: i64,
        _start: DateTime<Utc>,
        _end: DateTime<Utc>,
        next: Option<&url::Url>,
    ) -> Result<ContactsPage, CxoneError> {
        self.check("contacts_page")?;
        let page = if next.is_some() { 1 } else { 0 };
        let records = (0..3)
            .map(|i| {
                serde_json::value::RawValue::from_string(format!(
                    "{{\"contactId\":{}}}",
                    page * 3 + i
                ))
                .expect("raw")
            })
            .collect();
        Ok(ContactsPage {
            records,
            total: Some(6),
            next: if page == 0 {
                Some(url::Url::parse("http://fake/contacts?skip=3").expect("url"))
            } else {
                None
            },
        })
    }
    async fn deactivate_user(&self, user_id: &str) -> Result<Deactivation, CxoneError> {
        self.check("deactivate_user")?;
        self.write(format!("deactivate_user {user_id}"));
        let mut users = self.users.lock().expect("lock");
        let u = users
            .values_mut()
            .find(|u| u.user.id == user_id)
            .ok_or_else(|| CxoneError::new(ErrorKind::Permanent, "POST", "/x", Some(404), "nf"))?;
        if u.refuse_delete {
            return Ok(Deactivation::Refused);
        }
        u.user.status = "DELETED".to_owned();
        Ok(Deactivation::Deleted)
    }
    async fn revive_user(&self, user_id: &str) -> Result<(), CxoneError> {
        self.write(format!("revive_user {user_id}"));
        Ok(())
    }
}

#[derive(Default)]
struct Collected(Mutex<Vec<Outcome>>);

impl Outcomes for Collected {
    async fn publish(&self, outcome: &Outcome) -> Result<(), PublishError> {
        self.0.lock().expect("lock").push(outcome.clone());
        Ok(())
    }
}

fn event(id: &str, external_id: &str, options: &str) -> Event {
    let body = format!(
        r#"{{"specversion":"1.0","id":"{id}","source":"hris://test","type":"employee.terminated",
            "time":"2026-11-22T10:00:00Z",
            "data":{{"employee":{{"external_id":"{external_id}"}},"options":{{{options}}}}}}}"#
    );
    parse(body.as_bytes(), Limits::default()).expect("valid event")
}

fn deps(cxone: FakeCxone) -> Deps<FakeCxone, Memory> {
    let settings = Settings::load_from(
        None,
        [(
            "OFFBOARD__WORKER__RETRY_DELAYS_SECS".to_owned(),
            "1,2".to_owned(),
        )],
    )
    .expect("settings");
    Deps::new(
        Arc::new(cxone),
        Arc::new(Memory::default()),
        Arc::new(settings),
        "test-worker".to_owned(),
        Metrics::new(),
    )
}

fn delivery(parks: u32) -> Delivery {
    Delivery {
        parks,
        ..Delivery::new(CancellationToken::new())
    }
}

#[tokio::test]
async fn a_termination_runs_every_step_and_deletes() {
    let d = deps(FakeCxone::with_user("E1", 1001));
    let out = Collected::default();
    let e = event("ev1", "E1", "");
    let verdict = d.run_termination(&e, &delivery(0), &out).await;
    assert_eq!(verdict, Verdict::Settled);
    let u = d.cxone.user("E1");
    assert_eq!(u.user.status, "DELETED");
    assert!(!u.agent.is_active);
    assert!(!u.logged_in);
    assert!(u.skills.is_empty());
    assert!(u.keys.is_empty());
    let outcomes = out.0.lock().expect("lock").clone();
    assert_eq!(outcomes.len(), 1);
    let data = &outcomes[0].body["data"];
    assert_eq!(outcomes[0].body["type"], "offboard.saga.completed");
    assert_eq!(data["status"], "DELETED");
    assert!(data["revoked_at"].is_string());
    assert_eq!(data["archive"]["records"], 6);
    assert!(data["manifest"]["sha256"].is_string());
    let id = super::saga_id("hris://test", "ev1");
    let j = journal::load(d.store.as_ref(), &id)
        .await
        .expect("load")
        .expect("journal");
    assert_eq!(j.journal.state, SagaState::Completed);
    assert!(
        j.journal.steps.iter().all(|s| s.status.is_settled()),
        "{:?}",
        j.journal.steps
    );
    assert_eq!(j.journal.before.skills.as_ref().map(Vec::len), Some(2));
    assert_eq!(j.journal.deleted_keys, vec!["key-1001"]);
    let keys = d.store.keys();
    assert!(keys.iter().any(|k| k.starts_with("archives/E1/")));
    assert!(keys.iter().any(|k| k.starts_with("manifests/E1/")));
}

#[tokio::test]
async fn redelivery_after_completion_only_republishes() {
    let d = deps(FakeCxone::with_user("E1", 1001));
    let out = Collected::default();
    let e = event("ev1", "E1", "");
    assert_eq!(
        d.run_termination(&e, &delivery(0), &out).await,
        Verdict::Settled
    );
    let writes = d.cxone.writes.lock().expect("lock").len();
    let mut again = delivery(0);
    again.redelivered = true;
    assert_eq!(d.run_termination(&e, &again, &out).await, Verdict::Settled);
    assert_eq!(
        d.cxone.writes.lock().expect("lock").len(),
        writes,
        "no second write"
    );
    let outcomes = out.0.lock().expect("lock").clone();
    assert_eq!(outcomes.len(), 2);
    assert_eq!(
        outcomes[0].body, outcomes[1].body,
        "identical re-publication"
    );
}

#[tokio::test]
async fn nobody_found_is_already_absent() {
    let d = deps(FakeCxone::default());
    let out = Collected::default();
    let verdict = d
        .run_termination(&event("ev1", "E404", ""), &delivery(0), &out)
        .await;
    assert_eq!(verdict, Verdict::Settled);
    let o = &out.0.lock().expect("lock")[0];
    assert_eq!(o.body["data"]["status"], "ALREADY_ABSENT");
    assert!(o.body["data"]["revoked_at"].is_null());
    assert!(d.cxone.writes.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn a_refused_delete_is_deactivated_only_with_access_revoked() {
    let fake = FakeCxone::with_user("E1", 1001);
    fake.users
        .lock()
        .expect("lock")
        .get_mut("E1")
        .expect("u")
        .refuse_delete = true;
    let d = deps(fake);
    let out = Collected::default();
    d.run_termination(&event("ev1", "E1", ""), &delivery(0), &out)
        .await;
    let o = &out.0.lock().expect("lock")[0];
    assert_eq!(o.body["data"]["status"], "DEACTIVATED_ONLY");
    assert!(o.body["data"]["revoked_at"].is_string());
    assert!(!d.cxone.user("E1").agent.is_active);
}

#[tokio::test]
async fn delete_user_false_is_deactivated_only() {
    let d = deps(FakeCxone::with_user("E1", 1001));
    let out = Collected::default();
    d.run_termination(
        &event(
            "ev1",
            "E1",
            r#""delete_user": false, "archive_interactions": false"#,
        ),
        &delivery(0),
        &out,
    )
    .await;
    let o = &out.0.lock().expect("lock")[0];
    assert_eq!(o.body["data"]["status"], "DEACTIVATED_ONLY");
    assert_eq!(d.cxone.user("E1").user.status, "ACTIVE");
    assert!(o.body["data"]["archive"].is_null());
}

#[tokio::test]
async fn a_permanent_error_fails_and_dead_letters_without_restoring_access() {
    let fake = FakeCxone::with_user("E1", 1001);
    fake.fail("logout", 403);
    let d = deps(fake);
    let out = Collected::default();
    let verdict = d
        .run_termination(&event("ev1", "E1", ""), &delivery(0), &out)
        .await;
    let Verdict::DeadLetter(dl) = verdict else {
        panic!("dead letter expected, got {verdict:?}");
    };
    assert_eq!(dl.class, ErrorClass::Permanent);
    assert_eq!(dl.step.as_deref(), Some("logout"));
    let o = &out.0.lock().expect("lock")[0];
    assert_eq!(o.body["type"], "offboard.saga.failed");
    assert_eq!(o.body["data"]["error"]["step"], "logout");
    assert_eq!(o.body["data"]["error"]["http_status"], 403);
    assert_eq!(o.body["data"]["error"]["class"], "permanent");
    // Login stays blocked.
    assert!(!d.cxone.user("E1").agent.is_active);
}

#[tokio::test]
async fn transient_errors_park_and_the_next_run_resumes_without_repeating_writes() {
    let fake = FakeCxone::with_user("E1", 1001);
    fake.fail("contacts_page", 503);
    let d = deps(fake);
    let out = Collected::default();
    let e = event("ev1", "E1", "");
    let verdict = d.run_termination(&e, &delivery(0), &out).await;
    assert!(matches!(verdict, Verdict::Park { .. }), "{verdict:?}");
    let writes_before: Vec<String> = d.cxone.writes.lock().expect("lock").clone();
    assert!(
        writes_before
            .iter()
            .any(|w| w.starts_with("set_agent_active"))
    );
    // The parked copy comes back.
    let verdict = d.run_termination(&e, &delivery(1), &out).await;
    assert_eq!(verdict, Verdict::Settled);
    let writes = d.cxone.writes.lock().expect("lock").clone();
    let blocks = writes
        .iter()
        .filter(|w| w.starts_with("set_agent_active"))
        .count();
    assert_eq!(blocks, 1, "block_login not repeated: {writes:?}");
    let id = super::saga_id("hris://test", "ev1");
    let j = journal::load(d.store.as_ref(), &id)
        .await
        .expect("load")
        .expect("j");
    assert_eq!(j.journal.step(StepName::Archive).attempts, 2);
    assert_eq!(j.journal.step(StepName::BlockLogin).attempts, 1);
    assert_eq!(j.journal.status, Some(FinalStatus::Deleted));
}

#[tokio::test]
async fn transient_errors_past_the_last_delay_fail_as_exhausted() {
    let fake = FakeCxone::with_user("E1", 1001);
    fake.fail("deactivate_user", 503);
    let d = deps(fake);
    let out = Collected::default();
    // Two delays configured: the third park attempt fails.
    let verdict = d
        .run_termination(&event("ev1", "E1", ""), &delivery(2), &out)
        .await;
    let Verdict::DeadLetter(dl) = verdict else {
        panic!("dead letter expected");
    };
    assert_eq!(dl.class, ErrorClass::Exhausted);
    assert_eq!(dl.step.as_deref(), Some("delete"));
}

#[tokio::test]
async fn a_lease_held_elsewhere_waits_unless_redelivered() {
    let d = deps(FakeCxone::with_user("E1", 1001));
    let out = Collected::default();
    let e = event("ev1", "E1", "");
    let id = super::saga_id("hris://test", "ev1");
    let mut j = journal::Journal::new(&id, &e, Utc::now());
    j.lease = Some(journal::Lease {
        owner: "someone-else".into(),
        expires_at: Utc::now() + chrono::Duration::seconds(60),
    });
    let mut stored = journal::Stored {
        journal: j,
        etag: None,
    };
    journal::save(d.store.as_ref(), &mut stored)
        .await
        .expect("save");
    assert_eq!(
        d.run_termination(&e, &delivery(0), &out).await,
        Verdict::Wait
    );
    let mut redelivered = delivery(0);
    redelivered.redelivered = true;
    assert_eq!(
        d.run_termination(&e, &redelivered, &out).await,
        Verdict::Settled
    );
}

#[tokio::test]
async fn draining_parks_between_steps() {
    let d = deps(FakeCxone::with_user("E1", 1001));
    let out = Collected::default();
    let e = event("ev1", "E1", "");
    let del = delivery(0);
    del.draining.cancel();
    let verdict = d.run_termination(&e, &del, &out).await;
    // Resolve ran (it creates the journal), then the saga stopped.
    assert_eq!(verdict, Verdict::Requeue);
    let id = super::saga_id("hris://test", "ev1");
    let j = journal::load(d.store.as_ref(), &id)
        .await
        .expect("load")
        .expect("j");
    assert_eq!(j.journal.step(StepName::Resolve).status, StepStatus::Done);
    assert_eq!(
        j.journal.step(StepName::BlockLogin).status,
        StepStatus::Pending
    );
    assert!(j.journal.lease.is_none());
}
