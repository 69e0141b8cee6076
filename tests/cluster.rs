//! A worker on a three-node RabbitMQ cluster, nodes lost for real: the node
//! of a queue's leader (the parking queue's when it is not the worker's own),
//! then the worker's own node. Nothing is lost, nothing is parked for a wrong
//! reason, a bad message is parked while a node is down, and the worker is
//! ready again within seconds of losing its node, on another.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::messages::one_camera;
use common::{Broker, header, isolated_config, spawn_worker_with, wait_until};
use lapin::types::FieldTable;
use lesson_replay::broker::headers;
use lesson_replay::config::settings::Config;
use lesson_replay::service::endpoints::Health;
use lesson_replay::telemetry::metrics::Metrics;
use secrecy::SecretString;
use serde_json::Value;

const URL: &str = "https://1400000000.vod2.myqcloud.com/cluster/cam.mp4";

/// Publish lessons `range` of the run.
async fn publish(broker: &Broker, range: std::ops::Range<usize>) {
    for i in range {
        let body = one_camera(&format!("cluster-{i}"), 7, URL, 1000);
        broker.publish(&body, FieldTable::default()).await;
    }
}

/// Collect records until `want` distinct lessons, each duplicate identical.
async fn collect(broker: &Broker, want: usize, seen: &mut HashMap<String, Value>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < want {
        assert!(
            Instant::now() < deadline,
            "{} of {want} records",
            seen.len()
        );
        if let Some((record, _)) = broker
            .next(&broker.config.records_queue, Duration::from_millis(200))
            .await
        {
            let task = record["task_id"].as_str().unwrap().to_owned();
            if let Some(first) = seen.get(&task) {
                assert_eq!(first, &record, "a duplicate is an identical copy");
            }
            seen.insert(task, record);
        }
    }
}

/// How long until `health` is ready again, polled every 20 ms.
async fn ready_again(health: &Health, limit: Duration) -> Duration {
    let lost = Instant::now();
    // The loss itself is seen first (the node closes its connections).
    wait_until(
        "the worker sees its node go",
        Duration::from_secs(10),
        || !health.is_ready(),
    )
    .await;
    wait_until("the worker is ready on another node", limit, || {
        health.is_ready()
    })
    .await;
    lost.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_rides_out_the_loss_of_any_node() {
    let cluster = Cluster::start("cluster");
    let mut config: Config = isolated_config("cluster");
    config.amqp_url = SecretString::from(cluster.amqp_url());
    config.concurrency = 4;
    let health = Health::default();
    let metrics = Metrics::default();
    let worker = spawn_worker_with(config.clone(), health.clone(), metrics).await;
    worker.wait_ready().await;

    // Every queue of the topology is replicated: none is a classic queue.
    let types = cluster.queue_types(0);
    assert!(types.len() >= 5, "{types:?}");
    assert!(types.iter().all(|(_, t)| t == "quorum"), "{types:?}");

    let own = cluster
        .node_of_connection("lesson-replay worker", 0)
        .expect("the worker's connection is listed");
    // The parking queue's leader, unless it is the worker's node; then
    // another node with a leader of the topology on it, or the next one.
    let parking_leader = cluster.leader(&config.parking_queue, own);
    let other = if parking_leader != own {
        parking_leader
    } else {
        (own + 1) % 3
    };
    let third = 3 - own - other;
    // The test's own connection: to the node never stopped.
    let mut test_config = config.clone();
    test_config.amqp_url = SecretString::from(cluster.url(third));
    let broker = Broker::new(test_config.clone()).await;

    let mut seen = HashMap::new();
    publish(&broker, 0..10).await;
    collect(&broker, 10, &mut seen).await;

    // 1. A node that is not the worker's goes: work goes on, a bad message
    //    is parked with its reason while the node is down.
    cluster.stop(other);
    publish(&broker, 10..20).await;
    broker
        .publish(b"{\"callback_type\": not json", FieldTable::default())
        .await;
    collect(&broker, 20, &mut seen).await;
    let parked = broker.take_raw(&config.parking_queue, 1).await;
    assert_eq!(
        header(&parked[0].1, headers::REASON).as_deref(),
        Some("invalid_json")
    );
    assert!(health.is_ready(), "ready all along");
    cluster.resume(other);

    // 2. The worker's own node goes: it moves to another at once.
    cluster.stop(own);
    let took = ready_again(&health, Duration::from_secs(10)).await;
    eprintln!("ready again {took:?} after its node was stopped");
    let moved = cluster.node_of_connection("lesson-replay worker", third);
    assert!(
        moved.is_some_and(|n| n != own),
        "connected to {moved:?}, not to the stopped node {own}"
    );
    publish(&broker, 20..30).await;
    // The test reads records with basic.get, which RabbitMQ 3.10 answers
    // with a connection error on a channel that knew the lost leader: a
    // new connection once the queue has a new leader.
    wait_until(
        "the records queue has a leader",
        Duration::from_secs(30),
        || cluster.leader(&config.records_queue, third) != own,
    )
    .await;
    let broker = Broker::new(test_config).await;
    collect(&broker, 30, &mut seen).await;

    // Checked with the worker's node still down: two of three replicas
    // hold every queue.
    worker.stop().await;
    assert_eq!(seen.len(), 30, "no lesson lost");
    for (record, _) in broker.drain(&config.records_queue).await {
        let task = record["task_id"].as_str().unwrap();
        assert_eq!(seen[task], record, "a duplicate is an identical copy");
    }
    assert_eq!(broker.depth(&config.work_queue).await, 0);
    assert_eq!(
        broker.depth(&config.parking_queue).await,
        0,
        "nothing parked but the bad message (taken above)"
    );
}
