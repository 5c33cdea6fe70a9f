//! The saga's decisions, as pure functions of the journal and what just happened: the only
//! code that changes a saga's `state` or `status` (the runner carries out what these return;
//! steps only add the data they found). Unit-tested without a runtime, like temporal
//! sdk-core's state machines.
//!
//! A saga runs in two stages (CONTRACT §11): access removal (`resolve`, `block_login`,
//! `logout`, `revoke_keys`, then a verification re-read of CXone) from the work queue, and
//! housekeeping (`unassign_skills`, `archive`, `delete`, `manifest`, `notify`, `outcome`)
//! from the housekeeping queue.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::journal::{
    ErrorRecord, FinalStatus, GuardRecord, Holder, Journal, RescindRecord, SagaState, StepName,
    StepStatus, Verification,
};
use super::outcome::OutcomeType;
use super::{FailureClass, StepResult};

/// Which queue a delivery came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// `offboard.requests`: access removal.
    Access,
    /// `offboard.housekeeping`: everything after access is gone.
    Housekeeping,
}

/// Who holds the saga, as far as a delivery can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holding {
    /// Nobody: no lease, an expired one, or one whose holder is gone.
    Free,
    /// Another delivery that is still running.
    Busy(Holder),
}

/// What to do with a termination that just arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arrival {
    /// No journal: a new saga.
    New,
    /// Finished: publish its outcome again (a duplicate consumers drop) and settle.
    Republish(OutcomeType),
    /// Access removal is finished: make sure the housekeeping stage has the saga, and settle.
    HandOverAgain,
    /// Scheduled and not due yet.
    NotDue,
    /// Held by the mass-deletion guard and not released by an operator.
    StillHeld,
    /// Another live delivery runs the saga: do not run beside it.
    Busy(Holder),
    /// A rescind was recorded and nobody runs the saga: undo what CXone shows done.
    Compensate,
    /// Go on from the first step that is not settled.
    Resume,
}

/// The kind of outcome a finished journal stands for.
pub fn final_outcome(j: &Journal) -> Option<OutcomeType> {
    match j.state {
        SagaState::Completed => Some(OutcomeType::Completed),
        SagaState::Planned => Some(OutcomeType::Planned),
        SagaState::Compensated | SagaState::Cancelled => Some(OutcomeType::Compensated),
        _ => None,
    }
}

/// A dry run: reads only, nothing changes in CXone.
pub fn is_plan(j: &Journal) -> bool {
    j.event.options.as_ref().is_some_and(|o| o.dry_run)
}

/// Access removal is over: revoked and verified, or there was nothing to revoke, or a dry run.
pub fn access_complete(j: &Journal) -> bool {
    j.access_settled()
        && (j.verified_at.is_some() || j.status == Some(FinalStatus::AlreadyAbsent) || is_plan(j))
}

pub fn arrive(
    j: Option<&Journal>,
    stage: Stage,
    holding: &Holding,
    due: bool,
    released: bool,
) -> Arrival {
    let Some(j) = j else {
        return Arrival::New;
    };
    if let Some(kind) = final_outcome(j) {
        return Arrival::Republish(kind);
    }
    if let Holding::Busy(h) = holding {
        // A rescind recorded meanwhile is the holder's to carry out at its next write.
        return Arrival::Busy(h.clone());
    }
    if j.rescind.is_some() {
        return Arrival::Compensate;
    }
    if j.state == SagaState::Scheduled && !due {
        return Arrival::NotDue;
    }
    if j.state == SagaState::Held && !released {
        return Arrival::StillHeld;
    }
    if stage == Stage::Access && access_complete(j) {
        return Arrival::HandOverAgain;
    }
    Arrival::Resume
}

/// Why the journal must be written before going on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveFor {
    /// The first write of a new saga: the before-images and the lease, before any change.
    Create,
    /// The lease must be this delivery's before a destructive call.
    Lease,
    /// The manifest is built from the journal as saved now, so a resumed saga rebuilds it
    /// byte for byte.
    Manifest,
}

/// What the runner does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Step(StepName),
    Save(SaveFor),
    /// Ask the mass-deletion guard before the first destructive call.
    Admit,
    /// Re-read CXone: is access really gone?
    Verify,
    /// Access removal done: save and hand the saga to the housekeeping queue.
    HandOver,
    /// A rescind is recorded: undo what CXone shows done.
    Compensate,
    /// Everything settled: save the final state and publish the outcome.
    Complete,
}

/// What the runner knows about its own run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunFacts {
    pub stage: Stage,
    /// The journal exists in the store.
    pub stored: bool,
    /// This run has written the journal (so the lease in the store is this delivery's).
    pub leased: bool,
    pub plan: bool,
}

pub fn next(j: &Journal, run: RunFacts) -> Next {
    if j.rescind.is_some() {
        return Next::Compensate;
    }
    let resolved = j.step(StepName::Resolve).status.is_settled();
    if resolved && !run.stored {
        return Next::Save(SaveFor::Create);
    }
    if run.stage == Stage::Access && access_complete(j) {
        return Next::HandOver;
    }
    if j.access_settled() && !access_complete(j) {
        return Next::Verify;
    }
    let Some(step) = j.next_step() else {
        return Next::Complete;
    };
    let absent = j.status == Some(FinalStatus::AlreadyAbsent);
    if step.is_destructive() && !run.plan && !absent {
        if j.guard.is_none() {
            return Next::Admit;
        }
        // `unassign_skills` takes the lease with the skills' before-image in one write.
        if !run.leased && step != StepName::UnassignSkills {
            return Next::Save(SaveFor::Lease);
        }
    }
    match step {
        StepName::Manifest if j.manifest_at.is_none() && !run.plan => Next::Save(SaveFor::Manifest),
        StepName::Outcome => Next::Complete,
        _ => Next::Step(step),
    }
}

/// Records what a step did.
pub fn step_done(j: &mut Journal, step: StepName, result: StepResult, now: DateTime<Utc>) {
    let rec = j.step_mut(step);
    rec.finished_at = Some(now);
    rec.error = None;
    match result {
        StepResult::Done(detail) => {
            rec.status = StepStatus::Done;
            rec.detail = detail;
        }
        StepResult::Skipped(why) => {
            rec.status = StepStatus::Skipped;
            rec.detail = Some(why);
        }
        StepResult::Planned(detail, plan) => {
            rec.status = StepStatus::Planned;
            rec.detail = Some(detail);
            j.plan
                .get_or_insert_with(Default::default)
                .insert(step.as_str().to_owned(), plan);
        }
        StepResult::Absent(why) => {
            rec.status = StepStatus::Skipped;
            rec.detail = Some(why);
            j.status = Some(FinalStatus::AlreadyAbsent);
            for s in StepName::ALL {
                if s > StepName::Resolve
                    && !matches!(s, StepName::Manifest | StepName::Notify | StepName::Outcome)
                {
                    let rec = j.step_mut(s);
                    rec.status = StepStatus::Skipped;
                    rec.detail = Some("user not found in CXone".to_owned());
                }
            }
        }
        StepResult::Refused(why) => {
            rec.status = StepStatus::Skipped;
            rec.detail = Some(why);
            j.status = Some(FinalStatus::DeactivatedOnly);
        }
    }
    if StepName::ACCESS[1..].contains(&step) {
        record_revoked(j, now);
    }
}

/// `revoked_at` is the instant the last of block_login, logout and revoke_keys settled.
fn record_revoked(j: &mut Journal, now: DateTime<Utc>) {
    if j.revoked_at.is_some() || j.status == Some(FinalStatus::AlreadyAbsent) || is_plan(j) {
        return;
    }
    let revoked = StepName::ACCESS[1..]
        .iter()
        .all(|s| matches!(j.step(*s).status, StepStatus::Done | StepStatus::Skipped));
    if revoked {
        j.revoked_at = Some(now);
        if let Some(sla) = &mut j.sla {
            sla.met = Some(now <= sla.due_at);
        }
    }
}

/// Seconds from the event (its `time`, else its arrival) to `revoked_at`.
pub fn time_to_revoke(j: &Journal) -> Option<f64> {
    let revoked = j.revoked_at?;
    let since = j.event_time().unwrap_or(j.created_at);
    Some((revoked - since).num_milliseconds().max(0) as f64 / 1000.0)
}

/// The verification re-read. `Ok` when access is gone; otherwise the steps whose effect CXone
/// does not show are set to run again and the error says what is still there.
pub fn verified(
    j: &mut Journal,
    seen: Verification,
    terminate_sessions: bool,
    now: DateTime<Utc>,
) -> Result<(), String> {
    let mut left = Vec::new();
    let mut again = Vec::new();
    // Where login is blocked through SCIM, the SCIM user's `active` is what counts.
    let login_active = seen.scim_active.unwrap_or(seen.agent_active);
    if login_active {
        left.push(if seen.scim_active == Some(true) {
            "SCIM user active".to_owned()
        } else {
            "agent active".to_owned()
        });
        again.push(StepName::BlockLogin);
    }
    if seen.logged_in && terminate_sessions {
        left.push("agent still logged in".to_owned());
        again.push(StepName::Logout);
    }
    if seen.active_access_keys > 0 {
        left.push(format!("{} active access key(s)", seen.active_access_keys));
        again.push(StepName::RevokeKeys);
    }
    j.verification = Some(seen);
    if left.is_empty() {
        j.verified_at = Some(now);
        return Ok(());
    }
    for s in again {
        let rec = j.step_mut(s);
        rec.status = StepStatus::Pending;
        rec.detail = Some("CXone still showed access at verification; runs again".to_owned());
    }
    j.revoked_at = None;
    if let Some(sla) = &mut j.sla {
        sla.met = None;
    }
    Err(format!(
        "CXone still shows access after revocation: {}",
        left.join(", ")
    ))
}

/// How a step (or the verification) failed, as the runner classified it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Worth another try later.
    Transient {
        message: String,
        http_status: Option<u16>,
    },
    /// Retrying cannot help.
    Permanent {
        message: String,
        http_status: Option<u16>,
    },
    /// Not now: come back in `secs` (the agent is on a live call).
    Defer { secs: u64, reason: String },
}

/// What a failure leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// Park in the next delay queue.
    Park { reason: String },
    /// Come back in `secs`.
    Defer { secs: u64, reason: String },
    /// The saga failed: publish `saga.failed`, dead-letter the message.
    Fail {
        class: FailureClass,
        message: String,
    },
}

/// Decides what a failed step means for the saga and records it. `parks` is how often this
/// message was parked already; after `max_parks` a transient failure is final.
pub fn step_failed(
    j: &mut Journal,
    step: StepName,
    failure: Failure,
    parks: u32,
    max_parks: u32,
    now: DateTime<Utc>,
) -> Stop {
    j.lease = None;
    match failure {
        Failure::Defer { secs, reason } => {
            let rec = j.step_mut(step);
            rec.finished_at = Some(now);
            rec.detail = Some(reason.clone());
            j.state = SagaState::Parked;
            Stop::Defer { secs, reason }
        }
        Failure::Transient {
            message,
            http_status,
        } if parks < max_parks => {
            let rec = j.step_mut(step);
            rec.finished_at = Some(now);
            rec.error = Some(ErrorRecord {
                step: Some(step.as_str().to_owned()),
                class: "transient".to_owned(),
                http_status,
                message: message.clone(),
            });
            j.state = SagaState::Parked;
            j.parks += 1;
            Stop::Park {
                reason: format!("{step}: {message}"),
            }
        }
        Failure::Transient {
            message,
            http_status,
        } => fail(
            j,
            Some(step),
            FailureClass::Exhausted,
            format!("retries exhausted: {message}"),
            http_status,
            now,
        ),
        Failure::Permanent {
            message,
            http_status,
        } => fail(
            j,
            Some(step),
            FailureClass::Permanent,
            message,
            http_status,
            now,
        ),
    }
}

/// Marks the saga failed. Access stays as it is: a failure never restores it.
pub fn fail(
    j: &mut Journal,
    step: Option<StepName>,
    class: FailureClass,
    message: String,
    http_status: Option<u16>,
    now: DateTime<Utc>,
) -> Stop {
    let record = ErrorRecord {
        step: step.map(|s| s.as_str().to_owned()),
        class: class.as_str().to_owned(),
        http_status,
        message: message.clone(),
    };
    if let Some(step) = step {
        let rec = j.step_mut(step);
        rec.status = StepStatus::Failed;
        rec.finished_at.get_or_insert(now);
        rec.error = Some(record.clone());
    }
    j.state = SagaState::Failed;
    j.status = Some(FinalStatus::Failed);
    j.error = Some(record);
    j.lease = None;
    j.completed_at = Some(now);
    Stop::Fail { class, message }
}

/// A saga that stopped (parked, failed, scheduled, held) runs again: its verdict is open.
pub fn reopen(j: &mut Journal, released: bool, now: DateTime<Utc>) {
    if j.state == SagaState::Held && released {
        j.guard = Some(GuardRecord {
            how: "released".to_owned(),
            at: now,
        });
    }
    j.state = SagaState::Running;
    j.error = None;
    if matches!(
        j.status,
        Some(FinalStatus::Failed | FinalStatus::Scheduled | FinalStatus::Held)
    ) {
        j.status = None;
    }
    j.completed_at = None;
    for s in j.steps.iter_mut() {
        if s.status == StepStatus::Failed {
            s.status = StepStatus::Pending;
        }
    }
}

/// A future-dated termination waits.
pub fn schedule(j: &mut Journal) {
    j.state = SagaState::Scheduled;
    j.status = Some(FinalStatus::Scheduled);
    j.lease = None;
}

/// The mass-deletion guard admitted the saga (or an operator released it).
pub fn admitted(j: &mut Journal, how: &str, now: DateTime<Utc>) {
    j.guard = Some(GuardRecord {
        how: how.to_owned(),
        at: now,
    });
}

/// The guard's window is full: an operator decides.
pub fn hold(j: &mut Journal) {
    j.state = SagaState::Held;
    j.status = Some(FinalStatus::Held);
    j.lease = None;
}

/// Access is gone and verified: the housekeeping stage takes over.
pub fn hand_over(j: &mut Journal) {
    j.state = SagaState::HandedOver;
    j.lease = None;
}

/// Fixes the instant the manifest is built from.
pub fn prepare_manifest(j: &mut Journal, now: DateTime<Utc>) {
    j.manifest_at = Some(now);
}

/// The status a saga ends with (what the manifest states and the outcome reports).
pub fn final_status(j: &Journal, plan: bool) -> FinalStatus {
    if plan {
        return FinalStatus::Planned;
    }
    match j.status {
        Some(s @ (FinalStatus::AlreadyAbsent | FinalStatus::DeactivatedOnly)) => s,
        _ if j.step(StepName::Delete).status == StepStatus::Done => FinalStatus::Deleted,
        _ => FinalStatus::DeactivatedOnly,
    }
}

/// Every step settled: the saga completes (or, a dry run, is planned).
pub fn complete(j: &mut Journal, plan: bool, now: DateTime<Utc>) -> OutcomeType {
    j.status = Some(final_status(j, plan));
    j.state = if plan {
        SagaState::Planned
    } else {
        SagaState::Completed
    };
    j.lease = None;
    j.completed_at = Some(now);
    let rec = j.step_mut(StepName::Outcome);
    rec.status = if plan {
        StepStatus::Planned
    } else {
        StepStatus::Done
    };
    rec.attempts += 1;
    rec.started_at = Some(now);
    rec.finished_at = Some(now);
    if plan {
        OutcomeType::Planned
    } else {
        OutcomeType::Completed
    }
}

/// A rescind arrived for this saga.
pub fn rescinded(j: &mut Journal, record: RescindRecord) {
    if j.rescind.is_none() {
        j.rescind = Some(record);
    }
}

/// A rescind was carried out. `cancelled`: CXone was never changed.
pub fn compensated(j: &mut Journal, report: Value, cancelled: bool, now: DateTime<Utc>) {
    j.state = if cancelled {
        SagaState::Cancelled
    } else {
        SagaState::Compensated
    };
    j.status = Some(FinalStatus::Compensated);
    j.compensation = Some(report);
    j.lease = None;
    j.completed_at = Some(now);
    j.error = None;
}

/// A journal write lost a race: someone else moved the saga. What now?
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterConflict {
    /// The saga is finished: its outcome is what the journal says.
    Republish(OutcomeType),
    /// A rescind was recorded while this delivery held the saga: this delivery compensates,
    /// keeping its own (newer) progress.
    Compensate,
    /// Someone else holds the saga now: step aside.
    Yield,
}

pub fn after_conflict(theirs: &Journal, me: &Holder) -> AfterConflict {
    if let Some(kind) = final_outcome(theirs) {
        return AfterConflict::Republish(kind);
    }
    let mine = theirs.lease.as_ref().is_some_and(|l| l.holder() == *me);
    if mine && theirs.rescind.is_some() {
        return AfterConflict::Compensate;
    }
    AfterConflict::Yield
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Limits, parse};
    use crate::saga::journal::{Lease, Sla};
    use serde_json::json;

    fn journal() -> Journal {
        let e = parse(
            br#"{"specversion":"1.0","id":"e1","source":"s","type":"employee.terminated",
                 "time":"2026-11-27T10:00:00Z",
                 "data":{"employee":{"external_id":"E000042"}}}"#,
            Limits::default(),
        )
        .expect("valid");
        Journal::new("saga-1", &e, t(0))
    }

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-27T10:00:00Z")
            .expect("time")
            .with_timezone(&Utc)
            + chrono::Duration::seconds(secs)
    }

    fn me() -> Holder {
        Holder::new("session-a", "delivery-1")
    }

    fn run(stage: Stage, stored: bool, leased: bool) -> RunFacts {
        RunFacts {
            stage,
            stored,
            leased,
            plan: false,
        }
    }

    fn done(j: &mut Journal, steps: &[StepName]) {
        for s in steps {
            step_done(j, *s, StepResult::Done(None), t(1));
        }
    }

    fn gone() -> Verification {
        Verification {
            agent_active: false,
            user_status: "ACTIVE".into(),
            active_access_keys: 0,
            logged_in: false,
            scim_active: None,
        }
    }

    #[test]
    fn a_new_saga_resolves_saves_admits_then_revokes_then_hands_over() {
        let mut j = journal();
        assert_eq!(
            arrive(None, Stage::Access, &Holding::Free, true, false),
            Arrival::New
        );
        assert_eq!(
            next(&j, run(Stage::Access, false, false)),
            Next::Step(StepName::Resolve)
        );
        done(&mut j, &[StepName::Resolve]);
        assert_eq!(
            next(&j, run(Stage::Access, false, false)),
            Next::Save(SaveFor::Create)
        );
        assert_eq!(next(&j, run(Stage::Access, true, true)), Next::Admit);
        admitted(&mut j, "admitted", t(1));
        assert_eq!(
            next(&j, run(Stage::Access, true, true)),
            Next::Step(StepName::BlockLogin)
        );
        done(&mut j, &[StepName::BlockLogin, StepName::Logout]);
        assert!(j.revoked_at.is_none(), "keys still live");
        done(&mut j, &[StepName::RevokeKeys]);
        assert_eq!(j.revoked_at, Some(t(1)));
        assert_eq!(next(&j, run(Stage::Access, true, true)), Next::Verify);
        assert_eq!(verified(&mut j, gone(), true, t(2)), Ok(()));
        assert_eq!(next(&j, run(Stage::Access, true, true)), Next::HandOver);
        hand_over(&mut j);
        assert_eq!(j.state, SagaState::HandedOver);
        assert!(j.lease.is_none());
    }

    #[test]
    fn housekeeping_takes_the_lease_with_the_skills_and_saves_before_the_manifest() {
        let mut j = journal();
        done(&mut j, &StepName::ACCESS);
        admitted(&mut j, "admitted", t(1));
        verified(&mut j, gone(), true, t(2)).expect("gone");
        hand_over(&mut j);
        assert_eq!(
            arrive(Some(&j), Stage::Access, &Holding::Free, true, false),
            Arrival::HandOverAgain
        );
        assert_eq!(
            arrive(Some(&j), Stage::Housekeeping, &Holding::Free, true, false),
            Arrival::Resume
        );
        let hk = |leased| run(Stage::Housekeeping, true, leased);
        assert_eq!(next(&j, hk(false)), Next::Step(StepName::UnassignSkills));
        done(&mut j, &[StepName::UnassignSkills, StepName::Archive]);
        assert_eq!(next(&j, hk(false)), Next::Save(SaveFor::Lease));
        assert_eq!(next(&j, hk(true)), Next::Step(StepName::Delete));
        done(&mut j, &[StepName::Delete]);
        assert_eq!(next(&j, hk(true)), Next::Save(SaveFor::Manifest));
        prepare_manifest(&mut j, t(3));
        assert_eq!(next(&j, hk(true)), Next::Step(StepName::Manifest));
        done(&mut j, &[StepName::Manifest, StepName::Notify]);
        assert_eq!(next(&j, hk(true)), Next::Complete);
        assert_eq!(complete(&mut j, false, t(4)), OutcomeType::Completed);
        assert_eq!(j.status, Some(FinalStatus::Deleted));
        assert_eq!(final_outcome(&j), Some(OutcomeType::Completed));
    }

    #[test]
    fn verification_that_still_sees_access_sends_the_steps_back_and_clears_revoked_at() {
        let mut j = journal();
        done(&mut j, &StepName::ACCESS);
        let seen = Verification {
            agent_active: true,
            active_access_keys: 1,
            ..gone()
        };
        let err = verified(&mut j, seen, true, t(2)).expect_err("access left");
        assert!(err.contains("agent active"), "{err}");
        assert!(err.contains("1 active access key"), "{err}");
        assert_eq!(j.step(StepName::BlockLogin).status, StepStatus::Pending);
        assert_eq!(j.step(StepName::Logout).status, StepStatus::Done);
        assert_eq!(j.step(StepName::RevokeKeys).status, StepStatus::Pending);
        assert!(j.revoked_at.is_none() && j.verified_at.is_none());
        // A session left on purpose (terminate_sessions=false) is not access left.
        let mut k = journal();
        done(&mut k, &StepName::ACCESS);
        let seen = Verification {
            logged_in: true,
            ..gone()
        };
        assert_eq!(verified(&mut k, seen, false, t(2)), Ok(()));
    }

    #[test]
    fn the_sla_is_met_when_access_goes_before_the_due_time() {
        for (due, met) in [(t(10), true), (t(0), false)] {
            let mut j = journal();
            j.sla = Some(Sla {
                revoke_within_secs: 10,
                due_at: due,
                met: None,
            });
            done(&mut j, &StepName::ACCESS);
            assert_eq!(j.sla.as_ref().and_then(|s| s.met), Some(met));
        }
    }

    #[test]
    fn absent_users_skip_everything_but_the_evidence() {
        let mut j = journal();
        step_done(
            &mut j,
            StepName::Resolve,
            StepResult::Absent("nobody".into()),
            t(1),
        );
        assert_eq!(j.status, Some(FinalStatus::AlreadyAbsent));
        assert!(access_complete(&j));
        assert!(j.revoked_at.is_none());
        // No guard, no lease save: nothing destructive is left.
        assert_eq!(
            next(&j, run(Stage::Housekeeping, true, false)),
            Next::Save(SaveFor::Manifest)
        );
        assert_eq!(final_status(&j, false), FinalStatus::AlreadyAbsent);
    }

    #[test]
    fn a_busy_holder_wins_over_everything_but_a_finished_saga() {
        let mut j = journal();
        j.rescind = Some(RescindRecord {
            event_id: "r".into(),
            source: "s".into(),
            received_at: t(0),
        });
        let busy = Holding::Busy(Holder::new("other", "d"));
        assert_eq!(
            arrive(Some(&j), Stage::Access, &busy, true, false),
            Arrival::Busy(Holder::new("other", "d"))
        );
        assert_eq!(
            arrive(Some(&j), Stage::Access, &Holding::Free, true, false),
            Arrival::Compensate
        );
        compensated(&mut j, json!({}), false, t(1));
        assert_eq!(
            arrive(Some(&j), Stage::Access, &busy, true, false),
            Arrival::Republish(OutcomeType::Compensated)
        );
    }

    #[test]
    fn scheduled_and_held_sagas_wait_until_due_or_released() {
        let mut j = journal();
        schedule(&mut j);
        assert_eq!(
            arrive(Some(&j), Stage::Access, &Holding::Free, false, false),
            Arrival::NotDue
        );
        assert_eq!(
            arrive(Some(&j), Stage::Access, &Holding::Free, true, false),
            Arrival::Resume
        );
        hold(&mut j);
        assert_eq!(
            arrive(Some(&j), Stage::Access, &Holding::Free, true, false),
            Arrival::StillHeld
        );
        assert_eq!(
            arrive(Some(&j), Stage::Access, &Holding::Free, true, true),
            Arrival::Resume
        );
        reopen(&mut j, true, t(5));
        assert_eq!(j.state, SagaState::Running);
        assert_eq!(j.status, None);
        assert_eq!(j.guard.as_ref().map(|g| g.how.as_str()), Some("released"));
    }

    #[test]
    fn transient_failures_park_until_the_budget_is_spent_then_fail_as_exhausted() {
        let mut j = journal();
        let failure = || Failure::Transient {
            message: "503".into(),
            http_status: Some(503),
        };
        assert!(matches!(
            step_failed(&mut j, StepName::Archive, failure(), 2, 3, t(1)),
            Stop::Park { .. }
        ));
        assert_eq!(j.state, SagaState::Parked);
        assert_eq!(j.status, None);
        let stop = step_failed(&mut j, StepName::Archive, failure(), 3, 3, t(2));
        assert!(matches!(
            stop,
            Stop::Fail {
                class: FailureClass::Exhausted,
                ..
            }
        ));
        assert_eq!(j.status, Some(FinalStatus::Failed));
        assert_eq!(j.step(StepName::Archive).status, StepStatus::Failed);
        assert_eq!(
            j.error.as_ref().map(|e| e.class.as_str()),
            Some("exhausted")
        );
        // A failed saga is not final: a replay reopens it.
        assert_eq!(
            arrive(Some(&j), Stage::Housekeeping, &Holding::Free, true, false),
            Arrival::Resume
        );
        reopen(&mut j, false, t(3));
        assert_eq!(j.step(StepName::Archive).status, StepStatus::Pending);
    }

    #[test]
    fn a_conflict_means_someone_else_moved_the_saga() {
        let mut theirs = journal();
        theirs.lease = Some(Lease {
            owner: me().to_string(),
            expires_at: t(100),
        });
        assert_eq!(after_conflict(&theirs, &me()), AfterConflict::Yield);
        theirs.rescind = Some(RescindRecord {
            event_id: "r".into(),
            source: "s".into(),
            received_at: t(0),
        });
        assert_eq!(after_conflict(&theirs, &me()), AfterConflict::Compensate);
        theirs.lease = Some(Lease {
            owner: Holder::new("other", "x").to_string(),
            expires_at: t(100),
        });
        assert_eq!(after_conflict(&theirs, &me()), AfterConflict::Yield);
        compensated(&mut theirs, json!({}), true, t(1));
        assert_eq!(
            after_conflict(&theirs, &me()),
            AfterConflict::Republish(OutcomeType::Compensated)
        );
    }

    #[test]
    fn a_refused_delete_ends_deactivated_only() {
        let mut j = journal();
        step_done(
            &mut j,
            StepName::Delete,
            StepResult::Refused("notDeletedUserIds".into()),
            t(1),
        );
        assert_eq!(final_status(&j, false), FinalStatus::DeactivatedOnly);
        assert_eq!(complete(&mut j, false, t(2)), OutcomeType::Completed);
        assert_eq!(j.status, Some(FinalStatus::DeactivatedOnly));
    }
}
