//! The broker restarts mid-run (`rabbitmqctl stop_app` / `start_app`): the same
//! worker process reconnects by itself, re-declares its topology, resumes
//! consuming, and nothing is lost. Alone in its binary: the restart would
//! disturb tests running beside it.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::messages::one_camera;
use common::{Broker, isolated_config, spawn_worker_with, wait_until};
use lapin::types::FieldTable;
use lesson_replay::service::endpoints::Health;
use lesson_replay::telemetry::metrics::Metrics;

fn rabbitmqctl(args: &[&str]) {
    let status = std::process::Command::new("rabbitmqctl")
        .args(args)
        .status()
        .expect("rabbitmqctl runs");
    assert!(status.success(), "rabbitmqctl {args:?}");
}

/// Lessons `restart-{i}` for every `i` of `range`.
async fn publish_lessons(broker: &Broker, range: std::ops::Range<usize>) {
    for i in range {
        let url = "http://1.vod2.myqcloud.com/a.mp4";
        let body = one_camera(&format!("restart-{i}"), 9, url, 1000);
        broker.publish(&body, FieldTable::default()).await;
    }
}

async fn take_ids(broker: &Broker, n: usize, ids: &mut HashSet<String>) {
    for (record, _) in broker.take(&broker.config.records_queue, n).await {
        ids.insert(record["task_id"].as_str().unwrap().to_owned());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_recovers_from_a_broker_restart_by_itself() {
    if std::env::var("LESSON_REPLAY_TEST_AMQP_URL").is_ok() {
        eprintln!("skipped: the broker is not the local one this test can restart");
        return;
    }
    let config = isolated_config("restart");
    let broker = Broker::new(config.clone()).await;
    let health = Health::default();
    let metrics = Metrics::default();
    let worker = spawn_worker_with(config.clone(), health.clone(), metrics.clone()).await;
    wait_until("the worker is ready", Duration::from_secs(10), || {
        health.is_ready()
    })
    .await;

    let mut ids = HashSet::new();
    publish_lessons(&broker, 0..20).await;
    take_ids(&broker, 20, &mut ids).await;

    // (The test's own connection dies with the broker too; it is replaced below.)
    rabbitmqctl(&["stop_app"]);
    wait_until(
        "readiness reports the loss",
        Duration::from_secs(10),
        || !health.is_ready(),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    wait_until("the worker reconnected", Duration::from_secs(60), || {
        health.is_ready()
    })
    .await;
    assert!(
        metrics
            .render()
            .contains("lesson_replay_broker_reconnects_total 1"),
        "{}",
        metrics.render()
    );

    let broker = Broker::new(config).await;
    publish_lessons(&broker, 20..40).await;
    take_ids(&broker, 20, &mut ids).await;
    assert_eq!(
        ids.len(),
        40,
        "every recording before and after the restart"
    );
    worker.stop().await;
    assert_eq!(broker.depth(&broker.config.work_queue).await, 0);
    broker.cleanup().await;
}
