//! Webhook events mid-schedule survive a worker SIGKILLed and the broker
//! restarted: every event is delivered once the endpoint answers, none
//! lost, none parked. A binary of its own: it stops and starts the project's
//! RabbitMQ 4 node (scripts/ensure-rabbitmq4.sh), which other tests of the
//! same run must not be using meanwhile (it is not in scripts/test.sh's
//! RabbitMQ 4 rerun); the machine's shared broker is never touched.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::receiver::{
    APP, Receiver, SECRET_A, assert_signed, lesson, publish_for, webhook_config,
};
use common::{Broker, WorkerProcess};
use secrecy::{ExposeSecret, SecretString};

/// The project's own RabbitMQ 4 node (scripts/ensure-rabbitmq4.sh): this
/// test restarts its broker, which must not be the machine's shared one.
fn own_broker() -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/ensure-rabbitmq4.sh");
    let out = std::process::Command::new(script)
        .output()
        .expect("the script runs");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_and_a_restarted_broker_lose_no_event_mid_schedule() {
    let receiver = Receiver::start(&[SECRET_A]);
    let mut config = webhook_config("webhooks-kill", &receiver.url("school"), &[SECRET_A]);
    config.amqp_url = SecretString::from(own_broker());
    config.webhook_delays_secs = vec![3, 5, 8];
    receiver.script("school", "s503").await;
    let broker = Broker::new(config.clone()).await;
    let mut worker = WorkerProcess::start(&config);
    const EVENTS: usize = 6;
    for n in 0..EVENTS {
        publish_for(&broker, APP, &lesson(&format!("kill-{n}"), 9500 + n as i64)).await;
    }
    // Every event failed once and waits in a delay queue (or is being tried).
    let first = receiver
        .wait_for("school", EVENTS, Duration::from_secs(60))
        .await;
    let ids: BTreeSet<String> = first
        .iter()
        .map(|r| r["webhook_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), EVENTS, "{first:#?}");
    worker.kill();
    // Closed, not cleaned up: its queues keep the events.
    let _ = broker.connection.close(200, "broker restarts".into()).await;
    drop(broker);
    let stop = std::process::Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/ensure-rabbitmq4.sh"
    ))
    .arg("stop")
    .status()
    .unwrap();
    assert!(stop.success());
    assert_eq!(own_broker(), config.amqp_url.expose_secret());
    receiver.script("school", "ok").await;
    let _worker = WorkerProcess::start(&config);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let log = receiver.log("school").await;
        let delivered: BTreeSet<String> = log
            .iter()
            .filter(|r| r["action"] == "ok")
            .map(|r| r["webhook_id"].as_str().unwrap().to_owned())
            .collect();
        if delivered == ids {
            assert_signed(&log, 1);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "delivered {delivered:?} of {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let broker = Broker::new(config).await;
    assert_eq!(
        broker.depth(&broker.config.parking_queue).await,
        0,
        "nothing parked"
    );
    broker.cleanup().await;
}
