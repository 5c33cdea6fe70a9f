//! Issue 16 end to end: the saga races and the wrong-person fallback against the real broker,
//! S3 server and simulator. A call is held in the simulator (added latency on its route) and
//! the test waits until the simulator shows it in progress before the competing event goes in,
//! so each race happens in the order it names, every run.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{BROKER, Stack, eventually, termination};

const PUT_AGENT: &str = "PUT /inContactAPI/services/{version}/agents/{agentId}";
const DEACTIVATE: &str = "POST /user-management/v1/users/deactivate";
const SEARCH: &str = "POST /user-management/v2/users/search";

fn sim(users: u64) -> cxone_offboard::sim::SimOptions {
    cxone_offboard::sim::SimOptions {
        users,
        interactions_per_user: 3,
        ..cxone_offboard::sim::SimOptions::default()
    }
}

/// Holds every call of `route` in the simulator for `ms`.
async fn slow(stack: &Stack, route: &str, ms: u64) {
    stack
        .sim_post("/_sim/faults", json!({"latency_ms": ms, "routes": [route]}))
        .await;
}

/// Waits until the simulator is serving a call of `route`.
async fn wait_in_progress(stack: &Stack, route: &str) {
    eventually(route, Duration::from_secs(30), || async {
        let stats = stack.sim_get("/_sim/stats").await;
        (stats["in_flight"][route].as_u64().unwrap_or(0) > 0).then_some(())
    })
    .await;
}

async fn publish_rescind(stack: &Stack, external_id: &str, terminated: Option<&str>) {
    let mut data = json!({"employee": {"external_id": external_id}});
    if let Some(t) = terminated {
        data["terminated_event_id"] = json!(t);
    }
    let event = json!({
        "specversion": "1.0",
        "id": uuid::Uuid::new_v4().to_string(),
        "source": "hris://test/acme",
        "type": "employee.termination_rescinded",
        "time": chrono::Utc::now().to_rfc3339(),
        "data": data,
    });
    stack
        .outside
        .publish(
            &stack.names.events(),
            "employee.termination_rescinded",
            &serde_json::to_vec(&event).expect("json"),
            Some("application/cloudevents+json"),
        )
        .await;
}

fn of_type<'a>(outcomes: &'a [Value], ty: &str) -> Vec<&'a Value> {
    outcomes.iter().filter(|o| o["type"] == ty).collect()
}

/// Every outcome of one id is the same document (re-publications only as copies).
fn assert_copies(outcomes: &[&Value]) {
    for o in outcomes {
        assert_eq!(*o, outcomes[0], "one id, one document");
    }
}

/// Waits until `check` holds of the simulator's view of `user`.
async fn wait_user(stack: &Stack, user: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let path = format!("/_sim/users/{user}");
    eventually(what, Duration::from_secs(60), || async {
        let u = stack.sim_get(&path).await;
        check(&u).then_some(u)
    })
    .await
}

/// Defect 1a: a rescind beside its running termination in one worker was handled as if
/// nothing had changed (`cancelled`), and the termination then went on to block, log out and
/// revoke. Now CXone and the one compensated outcome agree.
#[tokio::test]
async fn a_rescind_while_login_is_being_blocked_ends_as_cxone_shows() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(sim(3), &[]).await;
    slow(&stack, PUT_AGENT, 2000).await;
    let id = stack.terminate("E000001", json!({})).await;
    wait_in_progress(&stack, PUT_AGENT).await;
    publish_rescind(&stack, "E000001", Some(&id)).await;
    let outcomes = stack.tap.wait(1, Duration::from_secs(60)).await;
    // Whatever was published before the call returned, the saga is settled only once the
    // termination stopped: wait until CXone shows the login usable again.
    let user = wait_user(&stack, "E000001", "login never re-activated", |u| {
        u["agent_active"] == true && u["writes"][PUT_AGENT].as_u64() == Some(2)
    })
    .await;
    let all = stack.tap.all().await;
    assert!(
        of_type(&all, "offboard.saga.completed").is_empty(),
        "{all:#?}"
    );
    let compensated = of_type(&all, "offboard.saga.compensated");
    assert!(!compensated.is_empty(), "{outcomes:#?}");
    assert_copies(&compensated);
    let c = &compensated[0]["data"]["compensation"];
    assert_eq!(c["cancelled"], false, "{c}");
    assert!(
        c["undone"].to_string().contains("login re-activated"),
        "{c}"
    );
    assert_eq!(user["status"], "ACTIVE");
    stack.stop().await;
}

/// Defect 1b: a rescind while housekeeping deletes the user; the user ended DELETED and was
/// reported compensated. Now the user is revived and the outcome says so.
#[tokio::test]
async fn a_rescind_while_the_user_is_being_deleted_revives_the_user() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(sim(3), &[]).await;
    slow(&stack, DEACTIVATE, 2000).await;
    let id = stack.terminate("E000002", json!({})).await;
    wait_in_progress(&stack, DEACTIVATE).await;
    publish_rescind(&stack, "E000002", Some(&id)).await;
    stack.tap.wait(1, Duration::from_secs(60)).await;
    wait_user(&stack, "E000002", "the delete never finished", |u| {
        u["writes"][DEACTIVATE].as_u64() == Some(1)
    })
    .await;
    let compensated = eventually("a compensated outcome", Duration::from_secs(30), || async {
        let all = stack.tap.all().await;
        of_type(&all, "offboard.saga.compensated")
            .first()
            .map(|o| (*o).clone())
    })
    .await;
    let c = &compensated["data"]["compensation"];
    assert!(c["undone"].to_string().contains("user revived"), "{c}");
    let user = wait_user(&stack, "E000002", "the user stayed deleted", |u| {
        u["status"] == "ACTIVE"
    })
    .await;
    assert_eq!(user["agent_active"], true, "{user}");
    let all = stack.tap.all().await;
    assert!(
        of_type(&all, "offboard.saga.completed").is_empty(),
        "{all:#?}"
    );
    stack.stop().await;
}

/// Defect 1c: a rescind that arrived while the termination was still reading CXone (before
/// its first journal write) did not stop it. Now the termination is cancelled and CXone is
/// never changed.
#[tokio::test]
async fn a_rescind_while_the_termination_reads_cxone_cancels_it() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(sim(3), &[]).await;
    slow(&stack, SEARCH, 2000).await;
    let id = stack.terminate("E000003", json!({})).await;
    wait_in_progress(&stack, SEARCH).await;
    publish_rescind(&stack, "E000003", Some(&id)).await;
    // The rescind's outcome, and the termination's copy of it once its search returns.
    let outcomes = stack.tap.wait(2, Duration::from_secs(60)).await;
    let compensated = of_type(&outcomes, "offboard.saga.compensated");
    assert_eq!(compensated.len(), 2, "{outcomes:#?}");
    assert_copies(&compensated);
    assert_eq!(compensated[0]["data"]["compensation"]["cancelled"], true);
    let u = stack.sim_get("/_sim/users/E000003").await;
    assert_eq!(u["writes"], json!({}), "CXone untouched: {u}");
    assert_eq!(u["agent_active"], true);
    stack.stop().await;
}

/// Defect 2: two copies of one event in one worker ran side by side, writing twice. Now the
/// second waits for the first and every destructive call happens once.
#[tokio::test]
async fn two_copies_of_one_event_in_one_worker_change_cxone_once() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(sim(3), &[]).await;
    slow(&stack, PUT_AGENT, 1500).await;
    let event = termination(&uuid::Uuid::new_v4().to_string(), "E000001");
    stack.publish_event(&event).await;
    wait_in_progress(&stack, PUT_AGENT).await;
    // The HRIS sends the same event again while the first copy blocks the login.
    stack.publish_event(&event).await;
    let outcomes = stack.tap.wait(2, Duration::from_secs(90)).await;
    let completed = of_type(&outcomes, "offboard.saga.completed");
    assert_eq!(completed.len(), 2, "{outcomes:#?}");
    assert_copies(&completed);
    let ids: BTreeSet<&str> = outcomes.iter().filter_map(|o| o["id"].as_str()).collect();
    assert_eq!(ids.len(), 1, "one outcome id: {outcomes:#?}");
    let u = stack.sim_get("/_sim/users/E000001").await;
    for (route, n) in u["writes"].as_object().expect("writes") {
        assert_eq!(n, 1, "{route} written {n} times: {u}");
    }
    stack.stop().await;
}

/// Defect 3: the username fallback offboarded whoever held the username, even someone with
/// another external id (a rehire under a new HR id). Now that is refused, loudly.
#[tokio::test]
async fn the_username_fallback_never_offboards_someone_else() {
    let _shared = BROKER.read().await;
    let stack = Stack::start(sim(3), &[]).await;
    stack
        .sim_post(
            "/_sim/users",
            json!({"external_id": "REHIRE-2", "username": "jane@acme.example"}),
        )
        .await;
    let mut event = termination(&uuid::Uuid::new_v4().to_string(), "GONE-1");
    event["data"]["employee"]["username"] = json!("jane@acme.example");
    stack.publish_event(&event).await;
    let outcomes = stack.tap.wait(1, Duration::from_secs(60)).await;
    let o = &outcomes[0];
    assert_eq!(o["type"], "offboard.saga.failed", "{o}");
    assert_eq!(o["data"]["error"]["class"], "permanent");
    let message = o["data"]["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("another person's account"), "{message}");
    assert!(message.contains("REHIRE-2"), "{message}");
    let rehire = stack.sim_get("/_sim/users/REHIRE-2").await;
    assert_eq!(rehire["agent_active"], true);
    assert_eq!(rehire["status"], "ACTIVE");
    assert_eq!(rehire["writes"], json!({}), "{rehire}");
    stack.stop().await;
}
