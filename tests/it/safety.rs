//! Safe offboarding: rescind and compensation, effective dates, dry runs, the mass-deletion
//! guard across two workers, and live-call-safe logout.

use std::time::{Duration, Instant};

use chrono::Utc;
use cxone_offboard::sim::SimOptions;
use serde_json::{Value, json};

use crate::helpers::{BROKER, Stack};

fn sim(users: u64, interactions: u64) -> SimOptions {
    SimOptions {
        users,
        interactions_per_user: interactions,
        ..SimOptions::default()
    }
}

fn of_type(outcomes: &[Value], ty: &str) -> Vec<Value> {
    outcomes
        .iter()
        .filter(|o| o["type"] == ty)
        .cloned()
        .collect()
}

async fn rescind(stack: &Stack, external_id: &str, terminated_event_id: Option<&str>) {
    let mut data = json!({"employee": {"external_id": external_id}});
    if let Some(t) = terminated_event_id {
        data["terminated_event_id"] = json!(t);
    }
    let event = json!({
        "specversion": "1.0",
        "id": uuid::Uuid::new_v4().to_string(),
        "source": "hris://test/acme",
        "type": "employee.termination_rescinded",
        "time": Utc::now().to_rfc3339(),
        "data": data,
    });
    let body = serde_json::to_vec(&event).expect("json");
    stack
        .outside
        .publish(
            &stack.names.events(),
            "employee.termination_rescinded",
            &body,
            Some("application/cloudevents+json"),
        )
        .await;
}

#[tokio::test]
async fn a_rescind_after_completion_restores_the_user_with_skills_and_proficiency() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(sim(5, 3), &[]).await;
    let before = stack.sim_get("/_sim/users/E000001").await;
    let id = stack.terminate("E000001", json!({})).await;
    let outcomes = stack.tap.wait(1, Duration::from_secs(60)).await;
    assert_eq!(outcomes[0]["data"]["status"], "DELETED");
    rescind(&stack, "E000001", Some(&id)).await;
    let outcomes = stack.tap.wait(2, Duration::from_secs(60)).await;
    let compensated = of_type(&outcomes, "offboard.saga.compensated");
    assert_eq!(compensated.len(), 1, "{outcomes:#?}");
    let c = &compensated[0];
    assert_eq!(c["data"]["status"], "COMPENSATED");
    let keys = &c["data"]["compensation"]["not_restorable"]["access_keys"]["ids"];
    assert_eq!(keys.as_array().map(Vec::len), Some(1), "{c}");
    let after = stack.sim_get("/_sim/users/E000001").await;
    assert_eq!(after["status"], "ACTIVE", "{after}");
    assert_eq!(after["agent_active"], true, "{after}");
    assert_eq!(
        after["skills"], before["skills"],
        "skills back with their proficiency"
    );
    assert_eq!(after["access_keys"].as_array().map(Vec::len), Some(0));
    assert!(
        c["data"]["rescind_manifest"]
            .as_str()
            .is_some_and(|u| u.ends_with(".rescind.json"))
    );
    // A second rescind changes nothing: it publishes the same outcome again (a duplicate
    // with the same id and body, which consumers drop).
    rescind(&stack, "E000001", Some(&id)).await;
    let all = stack.tap.wait(3, Duration::from_secs(30)).await;
    let again = of_type(&all, "offboard.saga.compensated");
    assert_eq!(again.len(), 2, "{all:#?}");
    assert_eq!(again[0], again[1]);
    assert_eq!(
        stack.sim_get("/_sim/users/E000001").await["writes"],
        after["writes"]
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_rescind_before_the_effective_date_cancels_without_touching_cxone() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(sim(5, 3), &[]).await;
    let effective = (Utc::now() + chrono::Duration::hours(2)).to_rfc3339();
    stack
        .terminate("E000002", json!({"effective_at": effective}))
        .await;
    let outcomes = stack.tap.wait(1, Duration::from_secs(30)).await;
    assert_eq!(outcomes[0]["type"], "offboard.saga.scheduled");
    assert_eq!(outcomes[0]["data"]["status"], "SCHEDULED");
    rescind(&stack, "E000002", None).await;
    let outcomes = stack.tap.wait(2, Duration::from_secs(30)).await;
    let compensated = of_type(&outcomes, "offboard.saga.compensated");
    assert_eq!(compensated.len(), 1, "{outcomes:#?}");
    assert_eq!(compensated[0]["data"]["compensation"]["cancelled"], true);
    let user = stack.sim_get("/_sim/users/E000002").await;
    assert_eq!(
        user["writes"],
        json!({}),
        "no CXone write for this user: {user}"
    );
    assert_eq!(user["status"], "ACTIVE");
    stack.stop().await;
}

#[tokio::test]
async fn a_future_dated_termination_runs_when_due() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(sim(5, 1), &[]).await;
    let effective = Utc::now() + chrono::Duration::seconds(4);
    // A time zone offset: +02:00 is the same instant.
    let local = effective.with_timezone(&chrono::FixedOffset::east_opt(2 * 3600).expect("tz"));
    stack
        .terminate("E000003", json!({"effective_at": local.to_rfc3339()}))
        .await;
    let first = stack.tap.wait(1, Duration::from_secs(10)).await;
    assert_eq!(first[0]["type"], "offboard.saga.scheduled");
    assert_eq!(
        stack.sim_get("/_sim/users/E000003").await["agent_active"],
        true
    );
    let outcomes = stack.tap.wait(2, Duration::from_secs(30)).await;
    let completed = of_type(&outcomes, "offboard.saga.completed");
    assert_eq!(completed.len(), 1, "{outcomes:#?}");
    assert_eq!(completed[0]["data"]["status"], "DELETED");
    let revoked = chrono::DateTime::parse_from_rfc3339(
        completed[0]["data"]["revoked_at"]
            .as_str()
            .expect("revoked_at"),
    )
    .expect("time");
    let late = (revoked.with_timezone(&Utc) - effective).num_milliseconds();
    assert!(late >= 0, "not before its time");
    assert!(
        late < 2500,
        "due time honoured within a bucket step: {late} ms late"
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_dry_run_for_fifty_users_writes_nothing_and_plans_everything() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(sim(50, 7), &[]).await;
    for n in 1..=50 {
        stack
            .terminate(&format!("E{n:06}"), json!({"options": {"dry_run": true}}))
            .await;
    }
    let outcomes = stack.tap.wait(50, Duration::from_secs(60)).await;
    let planned = of_type(&outcomes, "offboard.saga.planned");
    assert_eq!(planned.len(), 50);
    for p in &planned {
        assert_eq!(p["data"]["status"], "PLANNED");
        let plan = &p["data"]["plan"];
        assert_eq!(plan["unassign_skills"]["count"], 2, "{p}");
        assert_eq!(plan["revoke_keys"]["count"], 1, "{p}");
        assert_eq!(plan["archive"]["contacts"], 7, "{p}");
        assert_eq!(plan["block_login"]["action"], "deactivate_agent");
        assert_eq!(plan["delete"]["action"], "deactivate_user");
    }
    let stats = stack.sim_get("/_sim/stats").await;
    for (route, statuses) in stats["by_route"].as_object().expect("routes") {
        let write = ["PUT ", "DELETE ", "PATCH "]
            .iter()
            .any(|m| route.starts_with(m))
            || route.contains("deactivate")
            || route.contains("revive")
            || route.ends_with("/logout")
            || (route.starts_with("POST ") && route.ends_with("/skills"));
        assert!(!write, "a write call in a dry run: {route} {statuses}");
    }
    for n in [1, 25, 50] {
        let u = stack.sim_get(&format!("/_sim/users/E{n:06}")).await;
        assert_eq!(u["writes"], json!({}));
    }
    stack.stop().await;
}

#[tokio::test]
async fn the_guard_admits_exactly_its_limit_across_two_workers_and_releases_by_name() {
    let _shared = BROKER.read().await;
    let guard = [("OFFBOARD__GUARD__MAX_DESTRUCTIVE_PER_WINDOW", "10")];
    let stack = Stack::start(sim(25, 1), &guard).await;
    // A second worker process on the same queue, bucket and simulator.
    let second = crate::process::WorkerProcess::start(&stack.names, &stack.sim, &guard);
    second.wait_ready().await;
    for n in 1..=25 {
        stack.terminate(&format!("E{n:06}"), json!({})).await;
    }
    let outcomes = stack.tap.wait(25, Duration::from_secs(60)).await;
    assert_eq!(
        of_type(&outcomes, "offboard.saga.completed").len(),
        10,
        "{outcomes:#?}"
    );
    let held = of_type(&outcomes, "offboard.saga.held");
    assert_eq!(held.len(), 15);
    let n = stack
        .outside
        .wait_len(&stack.names.held(), 15, Duration::from_secs(10))
        .await;
    assert_eq!(n, 15);
    // Release five by name.
    let names: Vec<String> = held
        .iter()
        .take(5)
        .map(|o| o["subject"].as_str().expect("subject").to_owned())
        .collect();
    let file = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(file.path(), names.join("\n")).expect("write");
    let env = stack.names.env();
    let path = file.path().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_cxone-offboard"))
            .args(["guard", "release", "--employees"])
            .arg(path)
            .envs(env)
            .output()
    })
    .await
    .expect("join")
    .expect("binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let outcomes = stack.tap.wait(30, Duration::from_secs(60)).await;
    let completed: Vec<String> = of_type(&outcomes, "offboard.saga.completed")
        .iter()
        .map(|o| o["subject"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(completed.len(), 15, "{completed:?}");
    for name in &names {
        assert!(completed.contains(name), "{name} released and completed");
    }
    for o in of_type(&outcomes, "offboard.saga.completed") {
        assert_eq!(o["data"]["status"], "DELETED", "{o}");
    }
    assert_eq!(stack.outside.queue_len(&stack.names.held()).await, 10);
    second.kill9();
    stack.stop().await;
}

#[tokio::test]
async fn an_agent_on_a_call_is_logged_out_only_after_the_call_ends() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(
        sim(5, 1),
        &[
            ("OFFBOARD__SAFETY__LIVE_CONTACT_POLL_SECS", "1"),
            ("OFFBOARD__SAFETY__MAX_LIVE_CONTACT_WAIT_SECS", "120"),
        ],
    )
    .await;
    stack
        .sim_post(
            "/_sim/users/E000004/state",
            json!({"state": "InboundContact"}),
        )
        .await;
    stack
        .terminate("E000004", json!({"reason": "voluntary"}))
        .await;
    // Login is blocked at once; the call goes on.
    // Login blocked and keys revoked while the logout waits for the call.
    let u = crate::helpers::until(
        Duration::from_secs(15),
        || stack.sim_get("/_sim/users/E000004"),
        |u| u["access_keys"].as_array().is_some_and(Vec::is_empty),
    )
    .await;
    assert_eq!(u["agent_active"], false, "login blocked first: {u}");
    assert_eq!(u["logged_in"], true, "not cut off mid-call: {u}");
    assert_eq!(
        u["access_keys"].as_array().map(Vec::len),
        Some(0),
        "API keys revoked while the logout waits: {u}"
    );
    assert!(stack.tap.all().await.is_empty());
    // The call ends.
    stack
        .sim_post("/_sim/users/E000004/state", json!({"state": "Available"}))
        .await;
    let outcomes = stack.tap.wait(1, Duration::from_secs(30)).await;
    assert_eq!(outcomes[0]["data"]["status"], "DELETED");
    assert_eq!(
        stack.sim_get("/_sim/users/E000004").await["logged_in"],
        false
    );
    stack.stop().await;
}

#[tokio::test]
async fn the_live_call_wait_is_bounded_and_immediate_reasons_do_not_wait() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(
        sim(5, 1),
        &[
            ("OFFBOARD__SAFETY__LIVE_CONTACT_POLL_SECS", "1"),
            ("OFFBOARD__SAFETY__MAX_LIVE_CONTACT_WAIT_SECS", "3"),
        ],
    )
    .await;
    for id in ["E000001", "E000002"] {
        stack
            .sim_post(
                &format!("/_sim/users/{id}/state"),
                json!({"state": "OutboundContact"}),
            )
            .await;
    }
    let started = Instant::now();
    stack
        .terminate("E000001", json!({"reason": "security"}))
        .await;
    let first = stack.tap.wait(1, Duration::from_secs(20)).await;
    assert_eq!(first[0]["subject"], "E000001");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "immediate: no wait"
    );
    stack
        .terminate("E000002", json!({"reason": "voluntary"}))
        .await;
    let outcomes = stack.tap.wait(2, Duration::from_secs(30)).await;
    assert_eq!(outcomes.len(), 2);
    let logout = outcomes[1]["data"]["steps"][2]["detail"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(logout.contains("after waiting"), "{logout}");
    assert_eq!(
        stack.sim_get("/_sim/users/E000002").await["logged_in"],
        false
    );
    stack.stop().await;
}
