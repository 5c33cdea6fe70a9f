//! Worker lifecycle: topology declaration, drain on shutdown, broker restarts, bad settings.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cxone_offboard::broker::topology::TopologyConflict;
use cxone_offboard::config::Settings;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use crate::helpers::{
    BROKER, Names, Outside, Recorder, connect, eventually, rabbitmqctl, spawn_worker, termination,
    until,
};

#[tokio::test]
async fn declaring_the_topology_twice_succeeds() {
    let _shared = BROKER.read().await;
    let names = Names::new();
    for _ in 0..2 {
        let worker = spawn_worker(names.settings(&[]), Arc::new(Recorder::default())).await;
        assert!(worker.wait_ready(200, Duration::from_secs(10)).await);
        worker.stop().await.expect("clean stop");
    }
    // Two workers at once as well.
    let a = spawn_worker(names.settings(&[]), Arc::new(Recorder::default())).await;
    let b = spawn_worker(names.settings(&[]), Arc::new(Recorder::default())).await;
    assert!(a.wait_ready(200, Duration::from_secs(10)).await);
    assert!(b.wait_ready(200, Duration::from_secs(10)).await);
    a.stop().await.expect("stop a");
    b.stop().await.expect("stop b");
    names.cleanup().await;
}

#[tokio::test]
async fn a_conflicting_queue_is_a_clear_startup_error() {
    let _shared = BROKER.read().await;
    let names = Names::new();
    // Someone created the work queue as a classic queue without our arguments.
    let conn = connect().await.expect("broker");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        names.requests().as_str().into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .expect("pre-declare");
    let worker = spawn_worker(names.settings(&[]), Arc::new(Recorder::default())).await;
    let started = Instant::now();
    let result = worker.running.wait().await;
    let err = result.expect_err("conflict is fatal");
    let conflict = err
        .downcast_ref::<TopologyConflict>()
        .expect("a TopologyConflict");
    assert_eq!(conflict.name, names.requests());
    let text = err.to_string();
    assert!(text.contains("amqp.requests_queue"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(10), "no retry loop");
    names.cleanup().await;
    let _ = conn.close(200, "".into()).await;
}

#[tokio::test]
async fn shutdown_finishes_work_inside_the_grace_and_returns_the_rest() {
    let _shared = BROKER.read().await;
    let names = Names::new();
    let recorder = Arc::new(Recorder {
        delay: Duration::from_millis(500),
        slow_delay: Duration::from_secs(60),
        ..Recorder::default()
    });
    let settings = names.settings(&[
        ("OFFBOARD__WORKER__SHUTDOWN_GRACE_SECS", "3"),
        ("OFFBOARD__WORKER__MAX_IN_FLIGHT", "10"),
        ("OFFBOARD__AMQP__PREFETCH", "10"),
    ]);
    let worker = spawn_worker(settings, recorder.clone()).await;
    assert!(worker.wait_ready(200, Duration::from_secs(10)).await);
    let outside = Outside::new().await;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(format!("fast-{i}"));
    }
    for i in 0..3 {
        ids.push(format!("slow-{i}"));
    }
    for id in &ids {
        let body = serde_json::to_vec(&termination(id, "E000001")).expect("json");
        outside
            .publish(&names.events(), "employee.terminated", &body, None)
            .await;
    }
    eventually("every event in flight", Duration::from_secs(10), || async {
        (recorder.seen.lock().await.len() == ids.len()).then_some(())
    })
    .await;

    let stop_started = Instant::now();
    worker.shutdown.cancel();
    // Readiness drops as soon as shutdown begins.
    assert!(worker.wait_ready(503, Duration::from_secs(1)).await);
    worker.running.wait().await.expect("clean stop");
    let took = stop_started.elapsed();
    assert!(
        took < Duration::from_secs(3 + 4),
        "stopped within the grace: {took:?}"
    );

    let finished: BTreeSet<String> = recorder.finished.lock().await.iter().cloned().collect();
    let fast: BTreeSet<String> = ids
        .iter()
        .filter(|i| i.starts_with("fast"))
        .cloned()
        .collect();
    assert_eq!(finished, fast, "work inside the grace finished");
    // The slow ones were never acked: they are back in the queue. Nothing lost.
    let back = outside
        .wait_len(&names.requests(), 3, Duration::from_secs(10))
        .await;
    assert_eq!(back, 3);
    let returned = outside.drain(&names.requests()).await;
    let returned: BTreeSet<String> = returned
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.delivery.data).expect("json");
            v["id"].as_str().expect("id").to_owned()
        })
        .collect();
    assert_eq!(returned.len() + finished.len(), ids.len());
    assert!(returned.iter().all(|i| i.starts_with("slow")));
    names.cleanup().await;
}

/// Restarts the broker app, waiting until it accepts connections again.
async fn restart_broker() {
    assert!(rabbitmqctl(&["-q", "stop_app"]), "rabbitmqctl stop_app");
    // The broker stays down for a second: the outage the test is about.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(rabbitmqctl(&["-q", "start_app"]), "rabbitmqctl start_app");
    assert!(
        rabbitmqctl(&["-q", "await_startup"]),
        "rabbitmqctl await_startup"
    );
}

#[tokio::test]
async fn the_worker_survives_broker_restarts_and_loses_nothing() {
    let _exclusive = BROKER.write().await;
    let names = Names::new();
    let recorder = Arc::new(Recorder {
        delay: Duration::from_millis(150),
        ..Recorder::default()
    });
    let settings = names.settings(&[
        ("OFFBOARD__WORKER__MAX_IN_FLIGHT", "4"),
        ("OFFBOARD__AMQP__PREFETCH", "4"),
    ]);
    let worker = spawn_worker(settings, recorder.clone()).await;
    assert!(worker.wait_ready(200, Duration::from_secs(10)).await);

    // While idle.
    assert!(rabbitmqctl(&["-q", "stop_app"]));
    assert!(
        worker.wait_ready(503, Duration::from_secs(15)).await,
        "readiness false while the broker is down"
    );
    assert!(rabbitmqctl(&["-q", "start_app"]));
    assert!(rabbitmqctl(&["-q", "await_startup"]));
    assert!(
        worker.wait_ready(200, Duration::from_secs(30)).await,
        "readiness back after the broker returns"
    );

    // While consuming.
    let outside = Outside::new().await;
    let ids: Vec<String> = (0..40).map(|i| format!("r-{i}")).collect();
    for id in &ids {
        let body = serde_json::to_vec(&termination(id, "E000003")).expect("json");
        outside
            .publish(&names.events(), "employee.terminated", &body, None)
            .await;
    }
    drop(outside);
    recorder.wait_finished_n(5, Duration::from_secs(10)).await;
    restart_broker().await;
    assert!(worker.wait_ready(200, Duration::from_secs(30)).await);

    let done: BTreeSet<String> = until(
        Duration::from_secs(60),
        || async { recorder.finished.lock().await.iter().cloned().collect() },
        |done: &BTreeSet<String>| done.len() == ids.len(),
    )
    .await;
    let want: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(done, want, "every event handled after the restart");
    let outside = Outside::new().await;
    let left = outside
        .wait_len(&names.requests(), 1, Duration::from_millis(500))
        .await;
    assert_eq!(left, 0, "nothing stuck in the queue");
    assert_eq!(
        outside.queue_len(&names.dead()).await,
        0,
        "nothing dead-lettered"
    );
    worker.stop().await.expect("clean stop");
    names.cleanup().await;
}

#[test]
fn a_bad_setting_exits_2_naming_the_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_cxone-offboard"))
        .arg("check")
        .env("OFFBOARD__AMQP__PREFETCH", "abc")
        .output()
        .expect("binary runs");
    assert_eq!(out.status.code(), Some(2));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("amqp.prefetch"), "{text}");
    // The worker itself refuses to start the same way, before touching the broker.
    let out = Command::new(env!("CARGO_BIN_EXE_cxone-offboard"))
        .arg("worker")
        .env("OFFBOARD__AMQP__PREFETCH", "abc")
        .output()
        .expect("binary runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("amqp.prefetch"));
    // Straight from the loader as well.
    let err = Settings::load_from(
        None,
        [(
            "OFFBOARD__WORKER__SHUTDOWN_GRACE_SECS".to_owned(),
            "-1".to_owned(),
        )],
    )
    .expect_err("invalid");
    assert!(
        err.to_string().contains("worker.shutdown_grace_secs"),
        "{err}"
    );
}
