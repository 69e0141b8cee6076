//! The delivery guarantees of docs/operations.md, each broken from outside
//! against the real worker and the real broker: a record the broker does not
//! confirm, a panic in processing, signals, the retry bookkeeping. Every test
//! ends with exact queue depths after the worker stopped, never with "nothing
//! arrived for a while".

mod common;

use common::metric;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::messages::{FASTSTART, one_camera};
use common::origin::{Faults, Origin, noise};
use common::s3::S3Server;
use common::{
    Broker, WorkerProcess, header, isolated_config, spawn_worker_hooked, spawn_worker_with,
    wait_until,
};
use lapin::options::QueueBindOptions;
use lapin::types::FieldTable;
use lesson_replay::broker::headers::set_header;
use lesson_replay::decision::record::Record;
use lesson_replay::service::endpoints::Health;
use lesson_replay::service::worker::Hooks;
use lesson_replay::telemetry::metrics::Metrics;

/// A lesson the worker turns into a record without any fetch (probe is off).
fn lesson(task: &str) -> Vec<u8> {
    one_camera(task, 11, "http://1.vod2.myqcloud.com/a.mp4", 1000)
}

/// The text of one `lesson_replay_messages_total` series.
fn messages_series(outcome: &str, reason: &str) -> String {
    format!(r#"lesson_replay_messages_total{{outcome="{outcome}",reason="{reason}"}}"#)
}

/// Guarantee 1, broker returns the record: with `mandatory`, a record that
/// reaches no queue comes back, is not a success, and the inbound message is
/// not acknowledged as done: it is retried and published once a route exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_record_is_not_acknowledged_and_is_published_later() {
    let broker = Broker::new(isolated_config("unroutable")).await;
    let c = broker.config.clone();
    let metrics = Metrics::default();
    let worker = spawn_worker_with(c.clone(), Health::default(), metrics.clone()).await;
    worker.wait_ready().await;
    // The records queue loses its binding after the worker declared it.
    broker
        .channel
        .queue_unbind(
            c.records_queue.as_str().into(),
            c.records_exchange.as_str().into(),
            "#".into(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    broker
        .publish(&lesson("unroutable"), FieldTable::default())
        .await;
    let refused = messages_series("retried", "publish_failed");
    wait_until(
        "the returned record is retried",
        Duration::from_secs(20),
        || metric(&metrics, &refused) >= 1,
    )
    .await;
    assert_eq!(metric(&metrics, &messages_series("published", "")), 0);
    bind_records(&broker).await;
    let (record, _) = broker.take(&c.records_queue, 1).await.remove(0);
    assert_eq!(record["task_id"], "unroutable");
    worker.stop().await;
    assert_eq!(broker.depth(&c.records_queue).await, 0, "one record only");
    broker.assert_settled().await;
    broker.cleanup().await;
}

async fn bind_records(broker: &Broker) {
    let c = &broker.config;
    broker
        .channel
        .queue_bind(
            c.records_queue.as_str().into(),
            c.records_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}

/// Guarantee 1, broker nacks the record: a queue that refuses every message
/// (`x-max-length` 0, `reject-publish`) makes the broker nack the publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_record_is_not_acknowledged_and_is_published_later() {
    let broker = Broker::new(isolated_config("nacked")).await;
    let c = broker.config.clone();
    let full = broker.refusing_queue(&c.records_exchange).await;
    let metrics = Metrics::default();
    let worker = spawn_worker_with(c.clone(), Health::default(), metrics.clone()).await;
    broker
        .publish(&lesson("nacked"), FieldTable::default())
        .await;
    let refused = messages_series("retried", "publish_failed");
    wait_until(
        "the nacked record is retried",
        Duration::from_secs(20),
        || metric(&metrics, &refused) >= 1,
    )
    .await;
    assert_eq!(metric(&metrics, &messages_series("published", "")), 0);
    broker.delete_queue(&full).await;
    let published = messages_series("published", "");
    wait_until("the retry is published", Duration::from_secs(20), || {
        metric(&metrics, &published) == 1
    })
    .await;
    worker.stop().await;
    // A nack is per publish: the records queue may have kept the nacked copy,
    // so a duplicate is allowed, as long as it is the same record.
    let records = broker.drain(&c.records_queue).await;
    assert!(!records.is_empty());
    for (record, _) in &records {
        assert_eq!(record["task_id"], "nacked");
        assert_eq!(record["replay_id"], records[0].0["replay_id"]);
    }
    broker.assert_settled().await;
    broker.cleanup().await;
}

/// Guarantee 7: a panic while processing one message is caught, retried as
/// `internal_error` like a transient failure, parked once the tiers are used
/// up; the worker goes on with the other messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_is_retried_as_internal_error_and_the_worker_goes_on() {
    let broker = Broker::new(isolated_config("panic")).await;
    let c = broker.config.clone();
    let once = Arc::new(AtomicUsize::new(0));
    let seen = once.clone();
    let hooks = Hooks {
        before_publish: Some(Arc::new(move |record: &Record| {
            match record.task_id.as_deref() {
                Some("panics-always") => panic!("on purpose, always"),
                Some("panics-once") if seen.fetch_add(1, Ordering::SeqCst) == 0 => {
                    panic!("on purpose, once")
                }
                _ => {}
            }
        })),
    };
    let metrics = Metrics::default();
    let worker = spawn_worker_hooked(c.clone(), Health::default(), metrics.clone(), hooks).await;
    for task in ["panics-always", "panics-once", "calm"] {
        broker.publish(&lesson(task), FieldTable::default()).await;
    }
    let (_, parked) = broker.take(&c.parking_queue, 1).await.remove(0);
    assert_eq!(
        header(&parked, "x-lesson-replay-reason").as_deref(),
        Some("internal_error")
    );
    let error = header(&parked, "x-lesson-replay-error").unwrap();
    assert!(
        error.contains("processing panicked: on purpose, always"),
        "{error}"
    );
    // Two delay tiers, then parked: three attempts.
    assert_eq!(
        header(&parked, "x-lesson-replay-attempt").as_deref(),
        Some("3")
    );
    let mut tasks: Vec<String> = broker
        .take(&c.records_queue, 2)
        .await
        .into_iter()
        .map(|(r, _)| r["task_id"].as_str().unwrap().to_owned())
        .collect();
    tasks.sort();
    assert_eq!(tasks, ["calm", "panics-once"]);
    worker.stop().await;
    assert_eq!(
        metric(&metrics, &messages_series("retried", "internal_error")),
        3
    );
    assert_eq!(
        metric(&metrics, &messages_series("parked", "internal_error")),
        1
    );
    assert_eq!(broker.depth(&c.records_queue).await, 0);
    broker.assert_settled().await;
    broker.cleanup().await;
}

/// Guarantee 5: the first signal stops consumption at once (in-flight work may
/// finish); a second quits at once with exit code 130, and what was in flight
/// goes back to the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_signal_stops_consuming_and_a_second_quits_with_130() {
    let s3 = S3Server::start("school");
    let origin = Origin::start().await;
    let mut config = isolated_config("signals");
    s3.configure(&mut config, "school");
    config.shutdown_grace_secs = 60;
    let port = common::free_port();
    config.metrics_addr = format!("127.0.0.1:{port}");
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    let broker = Broker::new(config).await;
    let c = broker.config.clone();
    // An archive download of 64 chunks, a second apart: in flight for a minute.
    let slow = Faults {
        chunk_delay: Some(Duration::from_secs(1)),
        ..Faults::default()
    };
    let body = noise(1024 * 1024);
    let url = origin.add("/slow.mp4", body.clone(), slow);
    broker
        .publish(
            &one_camera("in-flight", 11, &url, body.len()),
            FieldTable::default(),
        )
        .await;
    let mut worker = WorkerProcess::start_with(&c, "info", std::process::Stdio::piped());
    let log = worker.log_lines();
    let wait_for_line = |text: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match log.recv_timeout(left) {
                Ok(line) if line.contains(text) => return,
                Ok(_) => {}
                Err(e) => panic!("no log line {text:?}: {e}"),
            }
        }
    };
    wait_for_line("consuming");
    wait_until("the download started", Duration::from_secs(30), || {
        origin.served() > 0
    })
    .await;

    let ready = reqwest::get(&readyz).await.unwrap();
    assert_eq!(ready.status(), 200, "ready while consuming");

    worker.terminate();
    wait_for_line("consumer cancelled: no new deliveries");
    assert!(worker.is_running(), "the in-flight message holds the stop");
    // Not ready from the first signal on, while the in-flight work finishes.
    let ready = reqwest::get(&readyz).await.unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(ready.text().await.unwrap(), "not ready: shutting down\n");
    broker
        .publish(&lesson("after-the-signal"), FieldTable::default())
        .await;

    worker.terminate();
    let status = worker.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(130), "{status:?}");
    // Neither message was processed; the one in flight went back to the queue
    // (redelivered), the one sent after the first signal was never delivered.
    let mut redelivered = std::collections::BTreeMap::new();
    for _ in 0..2 {
        let got = broker
            .channel
            .basic_get(c.work_queue.as_str().into(), Default::default())
            .await
            .unwrap()
            .expect("both messages wait in the work queue");
        let body: serde_json::Value = serde_json::from_slice(&got.delivery.data).unwrap();
        redelivered.insert(
            body["task_id"].as_str().unwrap().to_owned(),
            got.delivery.redelivered,
        );
    }
    let expected = [
        ("after-the-signal".to_owned(), false),
        ("in-flight".to_owned(), true),
    ];
    assert_eq!(redelivered, expected.into_iter().collect());
    assert_eq!(broker.depth(&c.records_queue).await, 0);
    assert_eq!(broker.depth(&c.parking_queue).await, 0);
    broker.cleanup().await;
}

/// A message waiting in a delay tier holds no consumer slot: with one slot,
/// a failing message waits in its tier while the next one is processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_waits_in_its_tier_without_holding_a_consumer_slot() {
    let origin = Origin::start().await;
    let mut config = isolated_config("slot");
    config.probe = true;
    config.concurrency = 1;
    config.fetch_attempts = 1;
    config.retry_delays_secs = vec![600];
    let broker = Broker::new(config).await;
    let c = broker.config.clone();
    let down = Faults {
        fail_first: u32::MAX,
        ..Faults::default()
    };
    let failing = origin.add("/down.mp4", FASTSTART.to_vec(), down);
    let fine = origin.add("/fine.mp4", FASTSTART.to_vec(), Faults::default());
    let worker = spawn_worker_with(c.clone(), Health::default(), Metrics::default()).await;
    broker
        .publish(
            &one_camera("waits", 11, &failing, FASTSTART.len()),
            FieldTable::default(),
        )
        .await;
    broker
        .publish(
            &one_camera("goes-on", 11, &fine, FASTSTART.len()),
            FieldTable::default(),
        )
        .await;
    let (record, _) = broker.take(&c.records_queue, 1).await.remove(0);
    assert_eq!(record["task_id"], "goes-on");
    worker.stop().await;
    let tier = format!("{}.retry.600s", c.work_queue);
    assert_eq!(
        broker.depth(&tier).await,
        1,
        "the failing message waits in its tier"
    );
    assert_eq!(broker.depth(&c.work_queue).await, 0);
    assert_eq!(broker.depth(&c.parking_queue).await, 0);
    broker.cleanup().await;
}

/// A message failing for longer than `retry_max_age_secs` is parked with its
/// real reason, whatever tiers remain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_older_than_the_maximum_age_is_parked_with_its_reason() {
    let origin = Origin::start().await;
    let mut config = isolated_config("max-age");
    config.probe = true;
    config.fetch_attempts = 1;
    config.retry_max_age_secs = 3600;
    let broker = Broker::new(config).await;
    let c = broker.config.clone();
    let down = Faults {
        fail_first: u32::MAX,
        ..Faults::default()
    };
    let url = origin.add("/down.mp4", FASTSTART.to_vec(), down);
    let mut headers = FieldTable::default();
    set_header(&mut headers, "x-lesson-replay-attempt", "1");
    set_header(
        &mut headers,
        "x-lesson-replay-first-seen",
        "2020-01-01T00:00:00Z",
    );
    let worker = spawn_worker_with(c.clone(), Health::default(), Metrics::default()).await;
    broker
        .publish(&one_camera("old", 11, &url, FASTSTART.len()), headers)
        .await;
    let (_, parked) = broker.take(&c.parking_queue, 1).await.remove(0);
    worker.stop().await;
    assert_eq!(
        header(&parked, "x-lesson-replay-reason").as_deref(),
        Some("fetch_failed")
    );
    let error = header(&parked, "x-lesson-replay-error").unwrap();
    assert!(
        error.contains("older than the maximum age of 3600s"),
        "{error}"
    );
    assert_eq!(
        header(&parked, "x-lesson-replay-attempt").as_deref(),
        Some("2")
    );
    assert_eq!(
        header(&parked, "x-lesson-replay-first-seen").as_deref(),
        Some("2020-01-01T00:00:00Z"),
        "the first failure's time is kept"
    );
    broker.assert_settled().await;
    broker.cleanup().await;
}

/// `dlq replay` gives a parked message back to the work queue as it first
/// came: same body, same headers, without the retry and parking bookkeeping,
/// so its attempt count starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_resets_the_attempt_count_and_keeps_the_message() {
    let broker = Broker::new(isolated_config("replay-reset")).await;
    let c = broker.config.clone();
    let body = lesson("replayed");
    let mut headers = FieldTable::default();
    set_header(&mut headers, "x-tic-sign", "abc");
    for (name, value) in [
        ("x-lesson-replay-attempt", "3"),
        ("x-lesson-replay-first-seen", "2026-01-01T00:00:00Z"),
        ("x-lesson-replay-last-reason", "fetch_failed"),
        ("x-lesson-replay-reason", "fetch_failed"),
        ("x-lesson-replay-error", "gave up"),
        ("x-lesson-replay-parked-at", "2026-01-01T01:00:00Z"),
    ] {
        set_header(&mut headers, name, value);
    }
    let properties = lesson_replay::broker::amqp::json_properties().with_headers(headers);
    lesson_replay::broker::amqp::publish_confirmed(
        &broker.channel,
        "",
        &c.parking_queue,
        &body,
        properties,
    )
    .await
    .unwrap();
    let moved = lesson_replay::broker::dlq::replay(&c.broker_settings(), None, None)
        .await
        .unwrap();
    assert_eq!(moved, 1);
    let got = broker
        .channel
        .basic_get(c.work_queue.as_str().into(), Default::default())
        .await
        .unwrap()
        .expect("the message is back in the work queue");
    assert_eq!(got.delivery.data, body, "the body is byte-identical");
    let table = got
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    let names: Vec<String> = table
        .inner()
        .keys()
        .map(|k| k.to_string())
        // Set by the quorum work queue on every delivery, not by anyone upstream.
        .filter(|k| k != "x-delivery-count")
        .collect();
    assert_eq!(names, ["x-tic-sign"], "only the original headers remain");
    assert_eq!(broker.depth(&c.parking_queue).await, 0);
    broker.cleanup().await;
}

/// Parking the broker cannot confirm (the parking queue unreachable: here
/// deleted, in a cluster a queue without its majority) is no busy loop: the
/// message waits in a delay queue, holding no consumer slot and no
/// redelivery, and is parked with its real reason once parking works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parking_the_broker_does_not_confirm_waits_and_keeps_its_reason() {
    let mut config = isolated_config("park-deferred");
    config.retry_delays_secs = vec![1, 2];
    let broker = Broker::new(config).await;
    let metrics = Metrics::default();
    let worker = spawn_worker_with(broker.config.clone(), Health::default(), metrics.clone()).await;
    worker.wait_ready().await;
    broker.delete_queue(&broker.config.parking_queue).await;

    broker.publish(b"{not json", FieldTable::default()).await;
    let deferred = || metric(&metrics, "lesson_replay_parking_deferred_total");
    wait_until("two parkings deferred", Duration::from_secs(20), || {
        deferred() >= 2
    })
    .await;
    // Meanwhile the consumer slot serves other messages.
    broker
        .publish(&lesson("beside"), FieldTable::default())
        .await;
    let (record, _) = broker.take(&broker.config.records_queue, 1).await.remove(0);
    assert_eq!(record["task_id"], "beside");

    lesson_replay::broker::amqp::declare_topology(
        &broker.connection,
        &broker.config.broker_settings().topology,
    )
    .await
    .unwrap();
    let parked = broker.take_raw(&broker.config.parking_queue, 1).await;
    worker.stop().await;
    let properties = &parked[0].1;
    assert_eq!(parked[0].0, b"{not json");
    assert_eq!(
        header(properties, "x-lesson-replay-reason").as_deref(),
        Some("invalid_json"),
        "parked by the worker with its real reason (the broker's delivery limit sets none)"
    );
    let attempts: u32 = header(properties, "x-lesson-replay-attempt")
        .unwrap()
        .parse()
        .unwrap();
    assert!(attempts >= 3, "parked after {attempts} attempts");
    assert_eq!(
        metric(&metrics, &messages_series("parked", "invalid_json")),
        1
    );
    broker.assert_settled().await;
    broker.cleanup().await;
}

/// A topology the broker refuses — here the classic parking queue of an
/// older deployment — is said once and shown in `/readyz`; the worker is not
/// ready and does not spin on the declaration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topology_the_broker_refuses_blocks_readiness_with_its_reason() {
    use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
    let mut config = isolated_config("refused");
    config.metrics_addr = "127.0.0.1:0".into();
    // Declared again every second while refused (`topology_recheck_secs`).
    config.topology_recheck_secs = 1;
    let connection = lapin::Connection::connect(&common::amqp_url(), Default::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut classic = FieldTable::default();
    set_header(&mut classic, "x-queue-type", "classic");
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(config.parking_queue.as_str().into(), durable, classic)
        .await
        .unwrap();

    let health = Health::default();
    let worker = spawn_worker_with(config.clone(), health.clone(), Metrics::default()).await;
    wait_until(
        "the worker says why it is blocked",
        Duration::from_secs(20),
        || health.blocked().is_some(),
    )
    .await;
    let why = health.blocked().unwrap();
    assert!(
        why.contains(&config.parking_queue) && why.contains("x-queue-type"),
        "{why}"
    );
    let base = format!("http://{}", worker.endpoint.unwrap());
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    let body = ready.text().await.unwrap();
    assert!(
        body.starts_with("not ready: ") && body.contains("x-queue-type"),
        "{body}"
    );
    assert!(!health.is_ready());
    worker.stop().await;

    // The ingress the same way: blocked with the reason, callbacks refused.
    let ingress = common::spawn_ingress(config.clone(), Metrics::default()).await;
    let ingress_health = ingress.health.clone();
    wait_until(
        "the ingress says why it is blocked",
        Duration::from_secs(30),
        || ingress_health.blocked().is_some(),
    )
    .await;
    assert!(ingress_health.blocked().unwrap().contains("x-queue-type"));
    let answer = reqwest::Client::new()
        .post(&ingress.url)
        .body(lesson("refused"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 503, "TIC is told to retry");
    ingress.stop().await;

    // The operator's fix (the classic queue deleted): a blocked worker sees it
    // at its next recheck and becomes ready, with no restart.
    let health = Health::default();
    let worker = spawn_worker_with(config.clone(), health.clone(), Metrics::default()).await;
    wait_until("blocked again", Duration::from_secs(20), || {
        health.blocked().is_some()
    })
    .await;
    channel
        .queue_delete(
            config.parking_queue.as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    wait_until(
        "ready at the next recheck, seconds later",
        Duration::from_secs(15),
        || health.is_ready(),
    )
    .await;
    assert!(health.blocked().is_none());
    worker.stop().await;
    common::delete_topology(&channel, &config).await;
}

/// What the worker hands on stays until its consumer takes it, however often
/// that consumer puts it back: a record, and a parked message (whose listing
/// puts it back each time). RabbitMQ 4 gives a quorum queue declared without
/// a delivery limit one of 20, and drops a message redelivered more often
/// (3.x has none): every queue a consumer outside the worker reads declares
/// a limit out of reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_and_parked_messages_survive_their_consumers_putting_them_back() {
    use lapin::options::{BasicGetOptions, BasicNackOptions};
    let broker = Broker::new(isolated_config("requeues")).await;
    let worker =
        spawn_worker_with(broker.config.clone(), Health::default(), Metrics::default()).await;
    broker
        .publish(&lesson("requeued-record"), FieldTable::default())
        .await;
    broker.publish(b"{not json", FieldTable::default()).await;
    let (records, parking) = (
        broker.config.records_queue.clone(),
        broker.config.parking_queue.clone(),
    );
    for queue in [&records, &parking] {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while broker.depth(queue).await < 1 {
            assert!(std::time::Instant::now() < deadline, "{queue} stays empty");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    worker.stop().await;
    for queue in [&records, &parking] {
        for round in 0..25 {
            let got = broker
                .channel
                .basic_get(queue.as_str().into(), BasicGetOptions::default())
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("{queue}: gone after {round} deliveries"));
            got.delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await
                .unwrap();
        }
        // Still there after 25 returns (taken and acknowledged now).
        let kept = broker.next_raw(queue, Duration::from_secs(5)).await;
        assert!(
            kept.is_some(),
            "{queue} dropped its message after 25 returns"
        );
    }
    broker.cleanup().await;
}
