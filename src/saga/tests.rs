//! The saga against in-memory fakes: both stages, idempotency, classification, and the races
//! of issue 16, made deterministic with gates (a fake CXone call that waits until the test
//! lets it go) and paused time.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::journal::{self, FinalStatus, Holder, SagaState, StepName, StepStatus};
use super::outcome::Outcome;
use super::ports::{OutcomeError, Outcomes, Sessions};
use super::{Delivery, Deps, FailureClass, Stage, Verdict, runner};
use crate::config::Settings;
use crate::cxone::{
    AccessKey, Agent, AgentState, CallLog, ContactsPage, Cxone, CxoneError, Deactivation,
    ErrorKind, Removal, ScimUser, SkillAssignment, SkillResult, User, UserFilter,
};
use crate::event::{Event, Limits, parse};
use crate::metrics::Metrics;
use crate::store::{Memory, Store, keys};

#[derive(Debug, Clone)]
struct FakeUser {
    user: User,
    agent: Agent,
    skills: Vec<SkillAssignment>,
    keys: Vec<String>,
    logged_in: bool,
    refuse_delete: bool,
}

/// A call that waits: `arrived` fires when the call is reached, `release` lets it continue.
#[derive(Default)]
struct Gate {
    arrived: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

#[derive(Default)]
struct FakeState {
    users: Mutex<HashMap<String, FakeUser>>,
    writes: Mutex<Vec<String>>,
    /// (operation, error) to fail with, once per entry.
    failures: Mutex<Vec<(&'static str, CxoneError)>>,
    /// Operations that wait at a gate (once each).
    gates: Mutex<Vec<(&'static str, Arc<Gate>)>>,
    /// Operations CXone accepts and then ignores (once each).
    ignored: Mutex<Vec<&'static str>>,
}

#[derive(Clone, Default)]
struct FakeCxone(Arc<FakeState>);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeCxone {
    fn with_user(external_id: &str, agent_id: i64) -> Self {
        let f = FakeCxone::default();
        f.add(external_id, agent_id);
        f
    }

    fn add(&self, external_id: &str, agent_id: i64) {
        self.add_as(
            external_id,
            agent_id,
            &format!("u-{external_id}"),
            Some(external_id),
        );
    }

    fn add_as(&self, key: &str, agent_id: i64, user_id: &str, external_id: Option<&str>) {
        let user = User {
            id: user_id.to_owned(),
            user_name: Some(format!("{key}@x")),
            email_address: None,
            external_identity: external_id.map(str::to_owned),
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
        lock(&self.0.users).insert(
            key.to_owned(),
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
        lock(&self.0.failures).push((
            op,
            CxoneError::new(kind, "X", "/fake", Some(status), "injected"),
        ));
    }

    fn gate(&self, op: &'static str) -> Arc<Gate> {
        let gate = Arc::new(Gate::default());
        lock(&self.0.gates).push((op, gate.clone()));
        gate
    }

    fn ignore_once(&self, op: &'static str) {
        lock(&self.0.ignored).push(op);
    }

    async fn check(&self, op: &'static str) -> Result<(), CxoneError> {
        let gate = {
            let mut gates = lock(&self.0.gates);
            gates
                .iter()
                .position(|(o, _)| *o == op)
                .map(|i| gates.remove(i).1)
        };
        if let Some(gate) = gate {
            let released = gate.release.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            gate.arrived.notify_one();
            released.await;
        }
        let mut f = lock(&self.0.failures);
        if let Some(i) = f.iter().position(|(o, _)| *o == op) {
            return Err(f.remove(i).1);
        }
        Ok(())
    }

    fn ignored(&self, op: &'static str) -> bool {
        let mut ignored = lock(&self.0.ignored);
        match ignored.iter().position(|o| *o == op) {
            Some(i) => {
                ignored.remove(i);
                true
            }
            None => false,
        }
    }

    fn write(&self, what: String) {
        lock(&self.0.writes).push(what);
    }

    fn writes(&self) -> Vec<String> {
        lock(&self.0.writes).clone()
    }

    fn writes_of(&self, prefix: &str) -> usize {
        self.writes()
            .iter()
            .filter(|w| w.starts_with(prefix))
            .count()
    }

    fn by_agent<T>(&self, agent_id: i64, f: impl FnOnce(&mut FakeUser) -> T) -> Option<T> {
        let mut users = lock(&self.0.users);
        users
            .values_mut()
            .find(|u| u.agent.agent_id == agent_id)
            .map(f)
    }

    fn user(&self, key: &str) -> FakeUser {
        lock(&self.0.users)[key].clone()
    }
}

impl Cxone for FakeCxone {
    fn recording(&self, _log: CallLog) -> Self {
        self.clone()
    }
    async fn find_users(&self, by: UserFilter<'_>) -> Result<Vec<User>, CxoneError> {
        self.check("find_users").await?;
        let users = lock(&self.0.users);
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
        self.check("get_agent").await?;
        let users = lock(&self.0.users);
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
        self.check("set_agent_active").await?;
        self.write(format!("set_agent_active {agent_id} {active}"));
        if !self.ignored("set_agent_active") {
            self.by_agent(agent_id, |u| u.agent.is_active = active);
        }
        Ok(())
    }
    async fn scim_find(&self, _external_id: &str) -> Result<Option<ScimUser>, CxoneError> {
        Ok(None)
    }
    async fn scim_set_active(&self, _id: &str, _active: bool) -> Result<(), CxoneError> {
        Ok(())
    }
    async fn agent_state(&self, agent_id: i64) -> Result<Option<AgentState>, CxoneError> {
        self.check("agent_state").await?;
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
        self.check("logout").await?;
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
        self.check("delete_access_key").await?;
        self.write(format!("delete_access_key {key_id}"));
        let mut users = lock(&self.0.users);
        for u in users.values_mut() {
            if let Some(i) = u.keys.iter().position(|k| k == key_id) {
                u.keys.remove(i);
                return Ok(Removal::Removed);
            }
        }
        Ok(Removal::AlreadyGone)
    }
    async fn agent_skills(&self, agent_id: i64) -> Result<Vec<SkillAssignment>, CxoneError> {
        self.check("agent_skills").await?;
        Ok(self
            .by_agent(agent_id, |u| u.skills.clone())
            .unwrap_or_default())
    }
    async fn remove_skills(
        &self,
        agent_id: i64,
        ids: &[i64],
    ) -> Result<Vec<SkillResult>, CxoneError> {
        self.check("remove_skills").await?;
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
        self.check("contacts_page").await?;
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
        self.check("deactivate_user").await?;
        self.write(format!("deactivate_user {user_id}"));
        let mut users = lock(&self.0.users);
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
        let mut users = lock(&self.0.users);
        if let Some(u) = users.values_mut().find(|u| u.user.id == user_id) {
            u.user.status = "ACTIVE".to_owned();
        }
        Ok(())
    }
}

#[derive(Default)]
struct Collected(Mutex<Vec<Outcome>>);

impl Collected {
    fn all(&self) -> Vec<Outcome> {
        lock(&self.0).clone()
    }
    fn types(&self) -> Vec<String> {
        self.all()
            .iter()
            .map(|o| o.body["type"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

impl Outcomes for Collected {
    async fn publish(&self, outcome: &Outcome) -> Result<(), OutcomeError> {
        lock(&self.0).push(outcome.clone());
        Ok(())
    }
}

/// Sessions the test declares dead; all others are alive.
#[derive(Default)]
struct FakeSessions(Mutex<HashSet<String>>);

impl Sessions for FakeSessions {
    fn alive<'a>(&'a self, session: &'a str) -> BoxFuture<'a, Result<bool, String>> {
        let dead = lock(&self.0).contains(session);
        Box::pin(async move { Ok(!dead) })
    }
}

const SOURCE: &str = "hris://test";

fn event(id: &str, external_id: &str, options: &str) -> Event {
    let body = format!(
        r#"{{"specversion":"1.0","id":"{id}","source":"{SOURCE}","type":"employee.terminated",
            "time":"2026-11-22T10:00:00Z",
            "data":{{"employee":{{"external_id":"{external_id}"}},"options":{{{options}}}}}}}"#
    );
    parse(body.as_bytes(), Limits::default()).expect("valid event")
}

fn rescind(id: &str, external_id: &str, terminated: Option<&str>) -> Event {
    let named = terminated
        .map(|t| format!(r#","terminated_event_id":"{t}""#))
        .unwrap_or_default();
    let body = format!(
        r#"{{"specversion":"1.0","id":"{id}","source":"{SOURCE}","type":"employee.termination_rescinded",
            "time":"2026-11-22T11:00:00Z",
            "data":{{"employee":{{"external_id":"{external_id}"}}{named}}}}}"#
    );
    parse(body.as_bytes(), Limits::default()).expect("valid rescind")
}

fn settings() -> Settings {
    Settings::load_from(
        None,
        [(
            "OFFBOARD__WORKER__RETRY_DELAYS_SECS".to_owned(),
            "1,2".to_owned(),
        )],
    )
    .expect("settings")
}

struct World {
    deps: Deps<FakeCxone, Memory>,
    sessions: Arc<FakeSessions>,
}

fn deps(cxone: FakeCxone) -> World {
    let sessions = Arc::new(FakeSessions::default());
    let deps = Deps::new(
        cxone,
        Arc::new(Memory::default()),
        Arc::new(settings()),
        Metrics::new(),
    )
    .with_sessions(sessions.clone());
    World { deps, sessions }
}

/// A process sharing the store and CXone of `w` (another worker).
fn other_process(w: &World) -> Deps<FakeCxone, Memory> {
    Deps::new(
        w.deps.cxone.clone(),
        w.deps.store.clone(),
        w.deps.settings.clone(),
        Metrics::new(),
    )
    .with_sessions(w.sessions.clone())
}

fn delivery(session: &str, stage: Stage, parks: u32) -> Delivery {
    Delivery {
        parks,
        ..Delivery::new(
            Holder::new(session, uuid::Uuid::new_v4().simple().to_string()),
            stage,
            CancellationToken::new(),
        )
    }
}

async fn run(d: &Deps<FakeCxone, Memory>, e: &Event, stage: Stage, out: &Collected) -> Verdict {
    runner::run(d, e, &delivery("s1", stage, 0), out).await
}

/// Both stages, as the broker would carry a termination through them.
async fn both(d: &Deps<FakeCxone, Memory>, e: &Event, out: &Collected) -> Verdict {
    match run(d, e, Stage::Access, out).await {
        Verdict::HandOver => run(d, e, Stage::Housekeeping, out).await,
        other => other,
    }
}

/// Runs `e` in the background (to be stopped at a gate).
fn spawn_run(
    d: &Arc<Deps<FakeCxone, Memory>>,
    out: &Arc<Collected>,
    e: &Event,
    stage: Stage,
) -> tokio::task::JoinHandle<Verdict> {
    let (d, out, e) = (d.clone(), out.clone(), e.clone());
    tokio::spawn(async move { run(&d, &e, stage, &out).await })
}

async fn stored(d: &Deps<FakeCxone, Memory>, e: &Event) -> journal::Journal {
    journal::load(d.store.as_ref(), &e.saga_id())
        .await
        .expect("load")
        .expect("journal")
        .journal
}

#[tokio::test]
async fn access_removal_hands_over_and_housekeeping_completes() {
    let w = deps(FakeCxone::with_user("E1", 1001));
    let d = &w.deps;
    let out = Collected::default();
    let e = event("ev1", "E1", "");
    assert_eq!(run(d, &e, Stage::Access, &out).await, Verdict::HandOver);
    let j = stored(d, &e).await;
    assert_eq!(j.state, SagaState::HandedOver);
    assert!(j.verified_at.is_some() && j.revoked_at.is_some());
    assert_eq!(
        j.verification
            .as_ref()
            .map(|v| (v.agent_active, v.active_access_keys)),
        Some((false, 0))
    );
    assert_eq!(j.step(StepName::UnassignSkills).status, StepStatus::Pending);
    assert!(out.all().is_empty(), "no outcome before the end");
    let u = d.cxone.user("E1");
    assert!(!u.agent.is_active && !u.logged_in && u.keys.is_empty());
    assert_eq!(u.skills.len(), 2, "housekeeping has not started");

    assert_eq!(
        run(d, &e, Stage::Housekeeping, &out).await,
        Verdict::Settled
    );
    let u = d.cxone.user("E1");
    assert_eq!(u.user.status, "DELETED");
    assert!(u.skills.is_empty());
    let outcomes = out.all();
    assert_eq!(outcomes.len(), 1);
    let data = &outcomes[0].body["data"];
    assert_eq!(outcomes[0].body["type"], "offboard.saga.completed");
    assert_eq!(data["status"], "DELETED");
    assert!(data["revoked_at"].is_string() && data["verified_at"].is_string());
    assert_eq!(data["verification"]["agent_active"], false);
    assert_eq!(data["sla"]["revoke_within_secs"], 14400);
    assert_eq!(data["archive"]["records"], 6);
    assert!(data["manifest"]["sha256"].is_string());
    let j = stored(d, &e).await;
    assert_eq!(j.state, SagaState::Completed);
    assert!(
        j.steps.iter().all(|s| s.status.is_settled()),
        "{:?}",
        j.steps
    );
    assert_eq!(j.before.skills.as_ref().map(Vec::len), Some(2));
    assert_eq!(j.deleted_keys, vec!["key-1001"]);
    let keys = d.store.keys();
    assert!(keys.iter().any(|k| k.starts_with("archives/E1/")));
    assert!(keys.iter().any(|k| k.starts_with("manifests/E1/")));
    assert!(keys.iter().any(|k| k.starts_with("index/days/")));
    assert!(keys.iter().any(|k| k.starts_with("index/employees/E1/")));
}

#[tokio::test]
async fn a_saga_writes_its_journal_five_times() {
    let w = deps(FakeCxone::with_user("E1", 1001));
    let out = Collected::default();
    let e = event("ev1", "E1", "");
    assert_eq!(both(&w.deps, &e, &out).await, Verdict::Settled);
    // create, hand-over, skills' before-image (the stage-2 lease), before the manifest, final
    // (plus two index entries, the guard window, the archive and the manifest).
    let r = w.deps.store.requests();
    assert_eq!(r.get("PUT").copied(), Some(5 + 2 + 1 + 1 + 1), "{r:?}");
    assert_eq!(r.get("GET").copied(), Some(1 + 1 + 1 + 1), "{r:?}");
    assert_eq!(r.get("LIST"), None, "no listing on the happy path: {r:?}");
}

#[tokio::test]
async fn redelivery_after_completion_only_republishes() {
    let w = deps(FakeCxone::with_user("E1", 1001));
    let d = &w.deps;
    let out = Collected::default();
    let e = event("ev1", "E1", "");
    assert_eq!(both(d, &e, &out).await, Verdict::Settled);
    let writes = d.cxone.writes().len();
    assert_eq!(run(d, &e, Stage::Access, &out).await, Verdict::Settled);
    assert_eq!(d.cxone.writes().len(), writes, "no second write");
    let outcomes = out.all();
    assert_eq!(outcomes.len(), 2);
    assert_eq!(
        outcomes[0].body, outcomes[1].body,
        "identical re-publication"
    );
}

#[tokio::test]
async fn nobody_found_is_already_absent() {
    let w = deps(FakeCxone::default());
    let out = Collected::default();
    assert_eq!(
        both(&w.deps, &event("ev1", "E404", ""), &out).await,
        Verdict::Settled
    );
    let o = &out.all()[0];
    assert_eq!(o.body["data"]["status"], "ALREADY_ABSENT");
    assert!(o.body["data"]["revoked_at"].is_null());
    assert!(w.deps.cxone.writes().is_empty());
}

#[tokio::test]
async fn a_deleted_user_with_the_external_id_is_already_absent_not_a_username_match() {
    let fake = FakeCxone::with_user("E1", 1001);
    lock(&fake.0.users).get_mut("E1").expect("u").user.status = "DELETED".to_owned();
    // Someone else now has a live account under a username the event also names.
    fake.add_as("rehire", 2002, "u-rehire", Some("E2"));
    let w = deps(fake);
    let out = Collected::default();
    let body =
        br#"{"specversion":"1.0","id":"ev1","source":"hris://test","type":"employee.terminated",
        "data":{"employee":{"external_id":"E1","username":"rehire@x"}}}"#;
    let e = parse(body, Limits::default()).expect("valid");
    assert_eq!(both(&w.deps, &e, &out).await, Verdict::Settled);
    assert_eq!(out.all()[0].body["data"]["status"], "ALREADY_ABSENT");
    assert!(
        w.deps.cxone.user("rehire").agent.is_active,
        "the rehire is untouched"
    );
    assert!(w.deps.cxone.writes().is_empty());
}

#[tokio::test]
async fn the_username_fallback_refuses_another_persons_account() {
    let fake = FakeCxone::default();
    fake.add_as("rehire", 2002, "u-rehire", Some("E2"));
    let w = deps(fake);
    let out = Collected::default();
    let body =
        br#"{"specversion":"1.0","id":"ev1","source":"hris://test","type":"employee.terminated",
        "data":{"employee":{"external_id":"E1","username":"rehire@x"}}}"#;
    let e = parse(body, Limits::default()).expect("valid");
    let Verdict::DeadLetter(f) = run(&w.deps, &e, Stage::Access, &out).await else {
        panic!("a permanent failure expected");
    };
    assert_eq!(f.class, FailureClass::Permanent);
    assert_eq!(f.step.as_deref(), Some("resolve"));
    assert!(f.message.contains("not E1"), "{}", f.message);
    assert!(w.deps.cxone.user("rehire").agent.is_active);
    assert!(w.deps.cxone.writes().is_empty());
}

#[tokio::test]
async fn a_user_without_an_external_id_found_by_username_is_offboarded_and_found_again() {
    let fake = FakeCxone::default();
    fake.add_as("legacy", 3003, "u-legacy", None);
    let w = deps(fake);
    let out = Collected::default();
    let body =
        br#"{"specversion":"1.0","id":"ev1","source":"hris://test","type":"employee.terminated",
        "data":{"employee":{"external_id":"E3","username":"legacy@x"}}}"#;
    let e = parse(body, Limits::default()).expect("valid");
    assert_eq!(
        run(&w.deps, &e, Stage::Access, &out).await,
        Verdict::HandOver
    );
    // The delete fails once and resumes: it must find the user the way resolve did.
    w.deps.cxone.fail("deactivate_user", 503);
    let d = &w.deps;
    assert!(matches!(
        runner::run(d, &e, &delivery("s1", Stage::Housekeeping, 0), &out).await,
        Verdict::Park { .. }
    ));
    assert_eq!(
        runner::run(d, &e, &delivery("s1", Stage::Housekeeping, 1), &out).await,
        Verdict::Settled
    );
    assert_eq!(d.cxone.user("legacy").user.status, "DELETED");
    assert_eq!(out.all()[0].body["data"]["status"], "DELETED");
    let j = stored(d, &e).await;
    assert_eq!(j.employee.matched_by, Some(journal::MatchedBy::Username));
}

#[tokio::test]
async fn a_refused_delete_is_deactivated_only_with_access_revoked() {
    let fake = FakeCxone::with_user("E1", 1001);
    lock(&fake.0.users).get_mut("E1").expect("u").refuse_delete = true;
    let w = deps(fake);
    let out = Collected::default();
    both(&w.deps, &event("ev1", "E1", ""), &out).await;
    let o = &out.all()[0];
    assert_eq!(o.body["data"]["status"], "DEACTIVATED_ONLY");
    assert!(o.body["data"]["revoked_at"].is_string());
    assert!(!w.deps.cxone.user("E1").agent.is_active);
}

#[tokio::test]
async fn a_permanent_error_fails_and_dead_letters_without_restoring_access() {
    let fake = FakeCxone::with_user("E1", 1001);
    fake.fail("logout", 403);
    let w = deps(fake);
    let out = Collected::default();
    let verdict = run(&w.deps, &event("ev1", "E1", ""), Stage::Access, &out).await;
    let Verdict::DeadLetter(f) = verdict else {
        panic!("dead letter expected, got {verdict:?}");
    };
    assert_eq!(f.class, FailureClass::Permanent);
    assert_eq!(f.step.as_deref(), Some("logout"));
    let o = &out.all()[0];
    assert_eq!(o.body["type"], "offboard.saga.failed");
    assert_eq!(o.body["data"]["error"]["step"], "logout");
    assert_eq!(o.body["data"]["error"]["http_status"], 403);
    assert_eq!(o.body["data"]["error"]["class"], "permanent");
    assert!(
        !w.deps.cxone.user("E1").agent.is_active,
        "login stays blocked"
    );
}

#[tokio::test]
async fn transient_errors_park_and_the_next_run_resumes_without_repeating_writes() {
    let fake = FakeCxone::with_user("E1", 1001);
    fake.fail("contacts_page", 503);
    let w = deps(fake);
    let d = &w.deps;
    let out = Collected::default();
    let e = event("ev1", "E1", "");
    assert_eq!(run(d, &e, Stage::Access, &out).await, Verdict::HandOver);
    let verdict = runner::run(d, &e, &delivery("s1", Stage::Housekeeping, 0), &out).await;
    assert!(matches!(verdict, Verdict::Park { .. }), "{verdict:?}");
    let verdict = runner::run(d, &e, &delivery("s1", Stage::Housekeeping, 1), &out).await;
    assert_eq!(verdict, Verdict::Settled);
    assert_eq!(d.cxone.writes_of("set_agent_active"), 1);
    assert_eq!(
        d.cxone.writes_of("remove_skills"),
        1,
        "{:?}",
        d.cxone.writes()
    );
    let j = stored(d, &e).await;
    assert_eq!(j.step(StepName::Archive).attempts, 2);
    assert_eq!(j.step(StepName::BlockLogin).attempts, 1);
    assert_eq!(j.status, Some(FinalStatus::Deleted));
}

#[tokio::test]
async fn transient_errors_past_the_last_delay_fail_as_exhausted() {
    let fake = FakeCxone::with_user("E1", 1001);
    fake.fail("deactivate_user", 503);
    let w = deps(fake);
    let out = Collected::default();
    let e = event("ev1", "E1", "");
    assert_eq!(
        run(&w.deps, &e, Stage::Access, &out).await,
        Verdict::HandOver
    );
    // Two delays configured: the third park attempt fails.
    let verdict = runner::run(&w.deps, &e, &delivery("s1", Stage::Housekeeping, 2), &out).await;
    let Verdict::DeadLetter(f) = verdict else {
        panic!("dead letter expected");
    };
    assert_eq!(f.class, FailureClass::Exhausted);
    assert_eq!(f.step.as_deref(), Some("delete"));
}

#[tokio::test]
async fn verification_that_still_sees_access_parks_and_revokes_again() {
    let fake = FakeCxone::with_user("E1", 1001);
    // CXone answers the PUT but keeps the agent active.
    fake.ignore_once("set_agent_active");
    let w = deps(fake);
    let d = &w.deps;
    let out = Collected::default();
    let e = event("ev1", "E1", "");
    let verdict = run(d, &e, Stage::Access, &out).await;
    let Verdict::Park { reason } = verdict else {
        panic!("park expected, got {verdict:?}");
    };
    assert!(reason.contains("agent active"), "{reason}");
    let j = stored(d, &e).await;
    assert!(j.verified_at.is_none() && j.revoked_at.is_none());
    assert!(out.all().is_empty());
    let verdict = runner::run(d, &e, &delivery("s1", Stage::Access, 1), &out).await;
    assert_eq!(verdict, Verdict::HandOver);
    assert!(!d.cxone.user("E1").agent.is_active);
    assert_eq!(d.cxone.writes_of("set_agent_active"), 2);
    let j = stored(d, &e).await;
    assert!(j.verified_at.is_some());
}

#[tokio::test]
async fn a_lease_of_a_live_holder_waits_and_one_of_a_gone_holder_is_taken_at_once() {
    let fake = FakeCxone::with_user("E1", 1001);
    let w = deps(fake);
    let d = &w.deps;
    let out = Collected::default();
    let e = event("ev1", "E1", "");
    let mut j = journal::Journal::new(&e.saga_id(), &e, Utc::now());
    j.lease = Some(journal::Lease {
        owner: Holder::new("other-session", "d9").to_string(),
        expires_at: Utc::now() + chrono::Duration::seconds(60),
    });
    let mut s = journal::Stored {
        journal: j,
        etag: None,
    };
    journal::save(d.store.as_ref(), &mut s).await.expect("save");
    assert_eq!(run(d, &e, Stage::Access, &out).await, Verdict::Wait);
    assert!(d.cxone.writes().is_empty());
    // The holder's process died: its broker session is gone.
    lock(&w.sessions.0).insert("other-session".to_owned());
    assert_eq!(run(d, &e, Stage::Access, &out).await, Verdict::HandOver);
}

/// Defect (issue 18 bench, four replicas): a delivery that parked outside a step (the guard
/// window could not be written) kept its lease, and every other replica's delivery of the
/// saga waited for it — the holder's session was alive — until the lease expired (300 s).
#[tokio::test(start_paused = true)]
async fn a_delivery_that_parks_gives_up_its_lease_so_another_replica_goes_on_at_once() {
    let w = deps(FakeCxone::with_user("E1", 1001));
    let d = &w.deps;
    let out = Collected::default();
    let e = event("ev1", "E1", "");
    d.store.fail_writes(Some("guard/"));
    let first = runner::run(d, &e, &delivery("replica-a", Stage::Access, 0), &out).await;
    assert!(matches!(first, Verdict::Park { .. }), "{first:?}");
    assert!(
        stored(d, &e).await.lease.is_none(),
        "the parked delivery's lease is gone"
    );
    d.store.fail_writes(None);
    // Replica A is alive; its delivery has ended. Replica B takes the saga at once.
    let b = other_process(&w);
    let second = runner::run(&b, &e, &delivery("replica-b", Stage::Access, 1), &out).await;
    assert_eq!(second, Verdict::HandOver);
}

#[tokio::test]
async fn draining_parks_between_steps() {
    let w = deps(FakeCxone::with_user("E1", 1001));
    let d = &w.deps;
    let out = Collected::default();
    let e = event("ev1", "E1", "");
    assert_eq!(run(d, &e, Stage::Access, &out).await, Verdict::HandOver);
    let del = delivery("s1", Stage::Housekeeping, 0);
    del.draining.cancel();
    assert_eq!(runner::run(d, &e, &del, &out).await, Verdict::Requeue);
    let j = stored(d, &e).await;
    assert_eq!(j.step(StepName::UnassignSkills).status, StepStatus::Pending);
    assert!(j.lease.is_none());
}

#[tokio::test]
async fn a_dry_run_changes_nothing_and_plans() {
    let w = deps(FakeCxone::with_user("E1", 1001));
    let out = Collected::default();
    let e = event("ev1", "E1", r#""dry_run": true"#);
    assert_eq!(both(&w.deps, &e, &out).await, Verdict::Settled);
    assert!(w.deps.cxone.writes().is_empty());
    let o = &out.all()[0];
    assert_eq!(o.body["type"], "offboard.saga.planned");
    assert_eq!(
        o.body["data"]["plan"]["block_login"]["action"],
        "deactivate_agent"
    );
}

/// A termination (from `stage`) stopped inside the CXone call `op`; a rescind arrives and
/// settles; then the call goes on. Returns the world, the outcomes and the termination's
/// verdict.
async fn rescind_during(
    op: &'static str,
    stage: Stage,
    terminated: Option<&str>,
) -> (Arc<Deps<FakeCxone, Memory>>, Arc<Collected>, Verdict) {
    let w = deps(FakeCxone::with_user("E1", 1001));
    let d = Arc::new(w.deps.clone());
    let out = Arc::new(Collected::default());
    let e = event("ev1", "E1", "");
    if stage == Stage::Housekeeping {
        assert_eq!(run(&d, &e, Stage::Access, &out).await, Verdict::HandOver);
    }
    let gate = d.cxone.gate(op);
    let t = spawn_run(&d, &out, &e, stage);
    gate.arrived.notified().await;
    let r = rescind("r1", "E1", terminated);
    assert_eq!(run(&d, &r, Stage::Access, &out).await, Verdict::Settled);
    gate.release.notify_one();
    let verdict = t.await.expect("join");
    (d, out, verdict)
}

/// Issue 16, defect 1a: a rescind beside its running termination in one worker. Before, the
/// rescind took a lease held by its own process as free, published `saga.compensated` and
/// the termination went on to block, log out and revoke. Now the rescind records itself; the
/// termination's next write loses, and it compensates from what CXone shows.
#[tokio::test]
async fn a_rescind_beside_a_running_termination_in_one_process_is_carried_out_by_it() {
    // The termination is inside block_login; the rescind arrives in the same process.
    let (d, out, verdict) = rescind_during("set_agent_active", Stage::Access, Some("ev1")).await;
    assert_eq!(verdict, Verdict::Settled);
    let e = event("ev1", "E1", "");
    let outcomes = out.all();
    assert_eq!(out.types(), vec!["offboard.saga.compensated"]);
    let c = &outcomes[0].body["data"]["compensation"];
    assert_eq!(c["cancelled"], false);
    assert!(
        c["undone"]
            .as_array()
            .is_some_and(|u| u.iter().any(|x| x["action"] == "login re-activated")),
        "{c}"
    );
    assert!(c["not_restorable"]["access_keys"].is_object(), "{c}");
    // CXone shows what the outcome says: login usable again.
    assert!(d.cxone.user("E1").agent.is_active);
    let j = stored(&d, &e).await;
    assert_eq!(j.state, SagaState::Compensated);
}

/// Issue 16, defect 1b: a rescind while housekeeping deletes the user. Before, a 412 on the
/// final write parked and the redelivered copy compensated from a stale journal: the user
/// stayed deleted but was reported compensated. Now the holder compensates, reading CXone.
#[tokio::test]
async fn a_rescind_during_the_delete_revives_the_user_it_reports_revived() {
    let (d, out, verdict) =
        rescind_during("deactivate_user", Stage::Housekeeping, Some("ev1")).await;
    assert_eq!(verdict, Verdict::Settled);
    let e = event("ev1", "E1", "");
    assert_eq!(out.types(), vec!["offboard.saga.compensated"]);
    let c = &out.all()[0].body["data"]["compensation"];
    assert!(
        c["undone"]
            .as_array()
            .is_some_and(|u| u.iter().any(|x| x["action"] == "user revived")),
        "{c}"
    );
    let u = d.cxone.user("E1");
    assert_eq!(u.user.status, "ACTIVE");
    assert!(u.agent.is_active);
    assert_eq!(u.skills.len(), 2, "skills back with their proficiency");
    // No manifest of a completed termination was written.
    assert!(
        !d.store.keys().contains(&keys::manifest("E1", &e.saga_id())),
        "{:?}",
        d.store.keys()
    );
}

/// Issue 16, defect 1c: a rescind that arrives while the termination reads CXone, before its
/// first journal write. Before, the rescind's pending record was only checked when a journal
/// was loaded empty, so the termination went ahead. Now the rescind creates the journal
/// cancelled and the termination's create loses.
#[tokio::test]
async fn a_rescind_before_the_first_write_cancels_the_termination() {
    let (d, out, verdict) = rescind_during("get_agent", Stage::Access, Some("ev1")).await;
    assert_eq!(verdict, Verdict::Settled);
    assert!(
        d.cxone.writes().is_empty(),
        "CXone untouched: {:?}",
        d.cxone.writes()
    );
    let outcomes = out.all();
    assert_eq!(
        outcomes.len(),
        2,
        "the rescind's outcome and the termination's copy"
    );
    assert_eq!(outcomes[0].body, outcomes[1].body);
    assert_eq!(outcomes[0].body["data"]["compensation"]["cancelled"], true);
}

#[tokio::test]
async fn an_employee_wide_rescind_before_the_first_write_cancels_the_termination() {
    let (d, out, verdict) = rescind_during("get_agent", Stage::Access, None).await;
    assert_eq!(verdict, Verdict::Settled);
    assert!(
        d.cxone.writes().is_empty(),
        "CXone untouched: {:?}",
        d.cxone.writes()
    );
    let types = out.types();
    assert_eq!(
        types.last().map(String::as_str),
        Some("offboard.saga.compensated")
    );
    assert!(!types.iter().any(|t| t == "offboard.saga.completed"));
}

/// Issue 16, defect 2: two copies of one event in one worker ran side by side. Now the
/// second waits for the first (then steps aside into a delay queue), and nothing is written
/// twice.
#[tokio::test(start_paused = true)]
async fn two_copies_of_one_event_in_one_process_never_run_side_by_side() {
    let fake = FakeCxone::with_user("E1", 1001);
    let gate = fake.gate("set_agent_active");
    let w = deps(fake);
    let d = Arc::new(w.deps.clone());
    let out = Arc::new(Collected::default());
    let e = event("ev1", "E1", "");
    let first = spawn_run(&d, &out, &e, Stage::Access);
    gate.arrived.notified().await;
    // The copy waits its patience (paused time moves on), then steps aside.
    assert_eq!(run(&d, &e, Stage::Access, &out).await, Verdict::Wait);
    gate.release.notify_one();
    assert_eq!(first.await.expect("join"), Verdict::HandOver);
    // The copy comes back from the delay queue: the saga moved on; it hands over again.
    assert_eq!(run(&d, &e, Stage::Access, &out).await, Verdict::HandOver);
    assert_eq!(d.cxone.writes_of("set_agent_active"), 1);
    assert_eq!(d.cxone.writes_of("logout"), 1);
    assert_eq!(d.cxone.writes_of("delete_access_key"), 1);
    // Two hand-over copies: the second housekeeping run republishes the first's outcome.
    assert_eq!(
        run(&d, &e, Stage::Housekeeping, &out).await,
        Verdict::Settled
    );
    assert_eq!(
        run(&d, &e, Stage::Housekeeping, &out).await,
        Verdict::Settled
    );
    assert_eq!(d.cxone.writes_of("remove_skills"), 1);
    assert_eq!(d.cxone.writes_of("deactivate_user"), 1);
    let outcomes = out.all();
    assert_eq!(outcomes.len(), 2);
    assert_eq!(outcomes[0].body, outcomes[1].body);
}

/// Issue 16, defect 2: `fail()` published `saga.failed` after its own journal write lost, so a
/// saga could end both failed and completed. Now a delivery whose failure write loses re-reads
/// and reports what the journal says.
#[tokio::test]
async fn a_failure_whose_journal_write_lost_publishes_nothing_of_its_own() {
    let fake = FakeCxone::with_user("E1", 1001);
    let gate = fake.gate("logout");
    let w = deps(fake);
    let d = Arc::new(w.deps.clone());
    let out = Arc::new(Collected::default());
    let e = event("ev1", "E1", "");
    let first = {
        let (d, out, e) = (d.clone(), out.clone(), e.clone());
        tokio::spawn(async move {
            runner::run(&d, &e, &delivery("s-old", Stage::Access, 0), &*out).await
        })
    };
    gate.arrived.notified().await;
    // The first worker looks dead (its broker session closed); another takes over and
    // finishes the saga while the first is still inside its call.
    lock(&w.sessions.0).insert("s-old".to_owned());
    let d2 = other_process(&w);
    let (access, housekeeping) = (
        delivery("s-new", Stage::Access, 0),
        delivery("s-new", Stage::Housekeeping, 0),
    );
    assert_eq!(
        runner::run(&d2, &e, &access, &*out).await,
        Verdict::HandOver
    );
    assert_eq!(
        runner::run(&d2, &e, &housekeeping, &*out).await,
        Verdict::Settled
    );
    // The first one's logout fails permanently; its failure write loses to the finished saga.
    d.cxone.fail("logout", 403);
    gate.release.notify_one();
    assert_eq!(first.await.expect("join"), Verdict::Settled);
    let types = out.types();
    assert!(
        !types.iter().any(|t| t == "offboard.saga.failed"),
        "{types:?}"
    );
    assert_eq!(
        types,
        vec!["offboard.saga.completed", "offboard.saga.completed"]
    );
    let outcomes = out.all();
    assert_eq!(outcomes[0].body, outcomes[1].body);
}

#[tokio::test]
async fn a_rescind_after_completion_revives_reassigns_and_reactivates() {
    let w = deps(FakeCxone::with_user("E1", 1001));
    let d = &w.deps;
    let out = Collected::default();
    let e = event("ev1", "E1", "");
    assert_eq!(both(d, &e, &out).await, Verdict::Settled);
    let r = rescind("r1", "E1", None);
    assert_eq!(run(d, &r, Stage::Access, &out).await, Verdict::Settled);
    let u = d.cxone.user("E1");
    assert_eq!(u.user.status, "ACTIVE");
    assert!(u.agent.is_active);
    assert_eq!(
        u.skills
            .iter()
            .map(|s| (s.skill_id, s.proficiency))
            .collect::<Vec<_>>(),
        vec![(11, Some(2)), (12, Some(4))]
    );
    assert_eq!(
        out.types(),
        vec!["offboard.saga.completed", "offboard.saga.compensated"]
    );
    let keys = d.store.keys();
    assert!(keys.contains(&keys::rescind_manifest("E1", &e.saga_id())));
    // A second copy of the rescind republishes the same outcome.
    assert_eq!(run(d, &r, Stage::Access, &out).await, Verdict::Settled);
    let all = out.all();
    assert_eq!(all[1].body, all[2].body);
}

/// A journal written by version 0.1 (a saga parked at `unassign_skills`, one stage, no
/// verification) resumes: the access stage verifies and hands over, housekeeping finishes.
#[tokio::test]
async fn a_journal_of_the_previous_version_resumes() {
    let fixture =
        include_bytes!("../../tests/fixtures/journal-v0.1-parked-at-unassign_skills.json");
    let old: serde_json::Value = serde_json::from_slice(fixture).expect("fixture json");
    let user_id = old["employee"]["user_id"].as_str().expect("user id");
    let fake = FakeCxone::default();
    fake.add_as("E000003", 1003, user_id, Some("E000003"));
    // CXone as the old saga left it: login blocked, logged out, key deleted.
    {
        let mut users = lock(&fake.0.users);
        let u = users.get_mut("E000003").expect("u");
        u.agent.is_active = false;
        u.logged_in = false;
        u.keys.clear();
    }
    let w = deps(fake);
    let d = &w.deps;
    let saga = old["saga_id"].as_str().expect("saga id");
    d.store
        .put(
            &keys::journal(saga),
            bytes::Bytes::from_static(fixture),
            "application/json",
            crate::store::Write::Create,
        )
        .await
        .expect("stored");
    let body = br#"{"specversion":"1.0","id":"fixture-3","source":"hris://fixture/acme","type":"employee.terminated","time":"2026-11-20T10:00:00Z","data":{"employee":{"external_id":"E000003"},"reason":"voluntary"}}"#;
    let e = parse(body, Limits::default()).expect("valid");
    assert_eq!(e.saga_id(), saga);
    let out = Collected::default();
    assert_eq!(run(d, &e, Stage::Access, &out).await, Verdict::HandOver);
    assert_eq!(
        run(d, &e, Stage::Housekeeping, &out).await,
        Verdict::Settled
    );
    assert_eq!(d.cxone.writes_of("set_agent_active"), 0, "not repeated");
    assert_eq!(d.cxone.user("E000003").user.status, "DELETED");
    let o = &out.all()[0];
    assert_eq!(o.body["data"]["status"], "DELETED");
    let j = stored(d, &e).await;
    assert_eq!(j.step(StepName::BlockLogin).attempts, 1);
    assert!(j.verified_at.is_some());
}

#[tokio::test]
async fn a_saga_held_by_the_guard_waits_for_a_release() {
    let fake = FakeCxone::with_user("E1", 1001);
    fake.add("E2", 1002);
    let mut s = settings();
    s.guard.max_destructive_per_window = 1;
    let w = deps(fake);
    let d = Deps {
        settings: Arc::new(s),
        ..w.deps.clone()
    };
    let out = Collected::default();
    let (e1, e2) = (event("ev1", "E1", ""), event("ev2", "E2", ""));
    assert_eq!(run(&d, &e1, Stage::Access, &out).await, Verdict::HandOver);
    assert_eq!(run(&d, &e2, Stage::Access, &out).await, Verdict::Hold);
    assert!(d.cxone.user("E2").agent.is_active);
    assert_eq!(out.types(), vec!["offboard.saga.held"]);
    assert_eq!(
        run(&d, &e2, Stage::Access, &out).await,
        Verdict::Hold,
        "still held"
    );
    let mut released = delivery("s1", Stage::Access, 0);
    released.released = true;
    assert_eq!(
        runner::run(&d, &e2, &released, &out).await,
        Verdict::HandOver
    );
    assert!(!d.cxone.user("E2").agent.is_active);
    let _ = Duration::ZERO;
}
