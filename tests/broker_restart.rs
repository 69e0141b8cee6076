//! The broker goes away under a busy worker — restarted, or the worker's own
//! connection closed — while lessons are in flight. The same process
//! reconnects by itself (readiness false meanwhile), deliveries of the lost
//! connection are never acknowledged on the new one (the broker redelivers
//! them: some lessons are processed twice), and every lesson ends with its
//! record — a duplicate only as an identical copy — nothing parked, nothing left.
//!
//! The ingress under the same fault: no callback answered "ok" is lost.
//!
//! These tests stop and start the local RabbitMQ with `rabbitmqctl`: they
//! cannot run against another broker, and fail rather than pass when asked to.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::messages::{FASTSTART, one_camera};
use common::origin::{Faults, Origin};
use common::{Broker, isolated_config, spawn_ingress, spawn_worker_with, wait_until};
use lapin::types::FieldTable;
use lesson_replay::service::endpoints::Health;
use lesson_replay::telemetry::metrics::Metrics;
use serde_json::Value;

const LESSONS: usize = 12;

fn rabbitmqctl(args: &[&str]) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn local_broker_only() {
    assert!(
        std::env::var("TEST_AMQP_URL").is_err(),
        "this test restarts the local RabbitMQ with rabbitmqctl and cannot run against \
         TEST_AMQP_URL: unset it, or run the other tests with --skip broker_"
    );
}

/// Close the worker's own connection from the broker's side.
fn close_worker_connection() {
    let listing = rabbitmqctl(&["-q", "list_connections", "pid", "client_properties"]);
    let pids: Vec<&str> = listing
        .lines()
        .filter(|l| l.contains("lesson-replay worker"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    // The test's worker is the only one connected (test binaries run one
    // after the other); closing every worker connection closes it.
    assert!(!pids.is_empty(), "no worker connection in {listing}");
    for pid in pids {
        rabbitmqctl(&["close_connection", pid, "closed by the test"]);
    }
}

fn restart_broker() {
    rabbitmqctl(&["stop_app"]);
    std::thread::sleep(Duration::from_secs(1));
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
}

/// Lessons whose probes are slow, `fault` once some are in flight, then the
/// whole outcome checked.
async fn lessons_survive(name: &str, fault: fn()) {
    local_broker_only();
    let origin = Origin::start().await;
    let mut config = isolated_config(name);
    config.probe = true;
    let broker = Broker::new(config.clone()).await;
    let health = Health::default();
    let metrics = Metrics::default();
    let worker = spawn_worker_with(config.clone(), health.clone(), metrics.clone()).await;
    worker.wait_ready().await;
    // Every probe takes at least a second (a pause between two 16 KiB chunks).
    let slow = Faults {
        chunk_delay: Some(Duration::from_secs(1)),
        ..Faults::default()
    };
    let big: Vec<u8> = FASTSTART.iter().copied().cycle().take(64 * 1024).collect();
    let url = origin.add("/slow.mp4", big.clone(), slow);
    for i in 0..LESSONS {
        let body = one_camera(&format!("{name}-{i}"), 9, &url, big.len());
        broker.publish(&body, FieldTable::default()).await;
    }
    wait_until("probes are in flight", Duration::from_secs(20), || {
        origin.requests() > 0
    })
    .await;
    fault();
    wait_until("the worker reconnected", Duration::from_secs(90), || {
        metrics
            .render()
            .contains("lesson_replay_broker_reconnects_total 1")
            && health.is_ready()
    })
    .await;
    // A restart killed the test's connection too; a closed worker connection did not.
    let broker = if broker.connection.status().connected() {
        broker
    } else {
        Broker::new(config).await
    };
    let mut records: HashMap<String, Value> = HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while records.len() < LESSONS {
        assert!(
            std::time::Instant::now() < deadline,
            "{} records",
            records.len()
        );
        if let Some((record, _)) = broker
            .next(&broker.config.records_queue, Duration::from_secs(1))
            .await
        {
            let task = record["task_id"].as_str().unwrap().to_owned();
            if let Some(first) = records.get(&task) {
                assert_eq!(first, &record, "a duplicate is an identical copy");
            }
            records.insert(task, record);
        }
    }
    worker.stop().await;
    for (record, _) in broker.drain(&broker.config.records_queue).await {
        let task = record["task_id"].as_str().unwrap();
        assert_eq!(records[task], record, "a duplicate is an identical copy");
    }
    broker.assert_settled().await;
    // Lessons in flight at the fault were delivered again: more probes than lessons.
    assert!(
        origin.requests() > LESSONS as u64,
        "{} probe requests for {LESSONS} lessons: the fault hit no delivery",
        origin.requests()
    );
    broker.cleanup().await;
}

/// One test, the faults in turn: a restart would break another test's connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lessons_in_flight_survive_a_closed_connection_and_a_broker_restart() {
    lessons_survive("closed", close_worker_connection).await;
    lessons_survive("restart", restart_broker).await;
    callbacks_survive_a_broker_restart().await;
}

/// A stream of TIC callbacks to the ingress while the broker restarts: every
/// callback answered `{"error_code":0}` is in the queue; the others were
/// answered with an error and, sent again as TIC does, get through. None is
/// answered "ok" and lost.
async fn callbacks_survive_a_broker_restart() {
    local_broker_only();
    let config = isolated_config("ingress-outage");
    let broker = Broker::new(config.clone()).await;
    let ingress = spawn_ingress(config.clone(), Metrics::default()).await;
    ingress.wait_ready().await;
    let template = std::fs::read_to_string(format!(
        "{}/callback-record-finished.json",
        common::EXAMPLES
    ))
    .unwrap();
    let body = |i: usize| template.replace("g68cee8e90jcq4ogg8jb", &format!("outage-{i}"));
    let client = reqwest::Client::new();
    let send = |i: usize| {
        let request = client.post(&ingress.url).body(body(i)).send();
        async move {
            match request.await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let answer: serde_json::Value = r.json().await.unwrap_or_default();
                    status == 200 && answer["error_code"] == 0
                }
                Err(_) => false,
            }
        }
    };
    const CALLBACKS: usize = 80;
    let restart = std::thread::spawn(|| {
        std::thread::sleep(Duration::from_millis(500));
        restart_broker();
    });
    let mut ok = [false; CALLBACKS];
    for (i, answered) in ok.iter_mut().enumerate() {
        *answered = send(i).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    restart.join().unwrap();
    let refused: Vec<usize> = (0..CALLBACKS).filter(|i| !ok[*i]).collect();
    assert!(!refused.is_empty(), "the outage hit the stream");
    assert!(
        refused.len() < CALLBACKS,
        "some got through before or after"
    );
    // TIC retries what was not answered ok.
    ingress.wait_ready().await;
    for i in refused {
        let mut tries = 0;
        while !send(i).await {
            tries += 1;
            assert!(tries < 40, "callback {i} never accepted");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    ingress.stop().await;
    let broker = if broker.connection.status().connected() {
        broker
    } else {
        Broker::new(config).await
    };
    let mut found = std::collections::HashSet::new();
    for (message, _) in broker.drain(&broker.config.work_queue).await {
        found.insert(message["task_id"].as_str().unwrap().to_owned());
    }
    for i in 0..CALLBACKS {
        assert!(
            found.contains(&format!("outage-{i}")),
            "callback {i} answered ok and lost"
        );
    }
    broker.cleanup().await;
}
