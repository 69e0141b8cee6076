//! Faults injected for real — worker processes killed, the S3 server stopped,
//! the origin failing, SIGTERM mid-upload — and nothing lost.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::messages::{FASTSTART, MOOV_AT_END, one_camera};
use common::origin::{Faults, Origin};
use common::s3::S3Server;
use common::{Broker, WorkerProcess, header, isolated_config, spawn_worker_with};
use lapin::types::FieldTable;
use lesson_replay::config::settings::Config;
use lesson_replay::service::endpoints::Health;
use lesson_replay::telemetry::metrics::Metrics;
use md5::{Digest, Md5};
use serde_json::Value;

/// Collect records until `want` distinct replay ids arrived (or the deadline).
async fn collect_records(
    broker: &Broker,
    want: usize,
    limit: Duration,
    seen: &mut HashMap<String, Value>,
) {
    let deadline = Instant::now() + limit;
    while seen.len() < want && Instant::now() < deadline {
        if let Some((record, _)) = broker
            .next(&broker.config.records_queue, Duration::from_millis(200))
            .await
        {
            let id = record["replay_id"].as_str().unwrap().to_owned();
            if let Some(first) = seen.get(&id) {
                assert_eq!(first, &record, "a duplicate record is an identical copy");
            }
            seen.insert(id, record);
        }
    }
}

/// Work, delay-tier and parking queues are all empty.
async fn assert_nothing_left(broker: &Broker) {
    broker.assert_settled().await;
}

/// Every track of every record is archived completely and correctly.
async fn assert_archives_match(
    s3: &S3Server,
    bucket: &str,
    records: &HashMap<String, Value>,
    source: &[u8],
) {
    let client = s3.client();
    let md5 = hex::encode(Md5::digest(source));
    for record in records.values() {
        for track in record["tracks"].as_array().unwrap() {
            let key = track["archive"]["key"].as_str().unwrap();
            assert_eq!(track["archive"]["md5"], md5.as_str(), "{key}");
            let bytes = common::s3::object(&client, bucket, key).await;
            assert_eq!(
                hex::encode(Md5::digest(&bytes)),
                md5,
                "{key}: the stored bytes"
            );
        }
    }
}

fn archiving_config(test: &str, s3: &S3Server) -> Config {
    let mut config = isolated_config(test);
    s3.configure(&mut config, "school");
    config.probe = true;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_workers_lose_nothing() {
    let s3 = S3Server::start("school");
    let origin = Origin::start().await;
    let mut config = archiving_config("crash", &s3);
    config.concurrency = 8;
    let broker = Broker::new(config).await;
    let total = 200;
    for i in 0..total {
        let url = origin.add(&format!("/r{i}.mp4"), FASTSTART.to_vec(), Faults::default());
        broker
            .publish(
                &one_camera(&format!("crash-{i}"), 7, &url, FASTSTART.len()),
                FieldTable::default(),
            )
            .await;
    }

    let mut seen = HashMap::new();
    // Three crashes (SIGKILL) while working, each after some progress.
    for round in 1..=3 {
        let mut worker = WorkerProcess::start(&broker.config);
        collect_records(&broker, round * 25, Duration::from_secs(60), &mut seen).await;
        worker.kill();
    }
    let kills_at = seen.len();
    assert!(
        kills_at < total,
        "the crashes happened mid-run ({kills_at} done)"
    );
    // The last worker's log shows what the broker gave back.
    let mut worker =
        WorkerProcess::start_with(&broker.config, "info", std::process::Stdio::piped());
    let lines = worker.log_lines();
    collect_records(&broker, total, Duration::from_secs(120), &mut seen).await;
    worker.terminate();
    assert!(worker.wait_exit(Duration::from_secs(30)).success());
    let redelivered = lines
        .try_iter()
        .filter(|l| l.contains("redelivered=true"))
        .count();

    assert_eq!(seen.len(), total, "exactly one replay id per recording");
    let expected: HashSet<String> = (0..total).map(|i| format!("crash-{i}")).collect();
    let tasks: HashSet<String> = seen
        .values()
        .map(|r| r["task_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(tasks, expected);
    // The kills hit messages in flight: the broker redelivered some (fetched
    // again, or found archived already when the kill came after the upload).
    assert!(
        redelivered > 0 || origin.requests() > total as u64,
        "no redelivery, {} downloads for {total} recordings: no kill hit an unacknowledged message",
        origin.requests()
    );
    for (record, _) in broker.drain(&broker.config.records_queue).await {
        let id = record["replay_id"].as_str().unwrap();
        assert_eq!(seen[id], record, "a duplicate record is an identical copy");
    }
    assert_nothing_left(&broker).await;
    assert_archives_match(&s3, "school", &seen, FASTSTART).await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_outage_delays_messages_without_losing_them() {
    let mut s3 = S3Server::start("school");
    let origin = Origin::start().await;
    let mut config = archiving_config("s3-outage", &s3);
    config.retry_delays_secs = vec![1, 2, 3, 4, 5, 5];
    config.stage_budget_secs = 1;
    let broker = Broker::new(config).await;
    let metrics = Metrics::default();
    let worker = spawn_worker_with(broker.config.clone(), Health::default(), metrics.clone()).await;
    let url = origin.add("/board.mp4", MOOV_AT_END.to_vec(), Faults::default());

    for i in 0..3 {
        broker
            .publish(
                &one_camera(&format!("before-{i}"), 7, &url, MOOV_AT_END.len()),
                FieldTable::default(),
            )
            .await;
    }
    let mut seen = HashMap::new();
    collect_records(&broker, 3, Duration::from_secs(30), &mut seen).await;
    assert_eq!(seen.len(), 3);

    s3.stop();
    for i in 0..10 {
        broker
            .publish(
                &one_camera(&format!("during-{i}"), 7, &url, MOOV_AT_END.len()),
                FieldTable::default(),
            )
            .await;
    }
    // While S3 is down, messages go through the delay tiers; nothing is parked.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !metrics
        .render()
        .contains(r#"lesson_replay_retries_total{tier="1s"}"#)
    {
        assert!(Instant::now() < deadline, "no retry through a delay tier");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nothing got past the outage: no record, nothing parked.
    assert_eq!(broker.depth(&broker.config.records_queue).await, 0);
    assert_eq!(broker.depth(&broker.config.parking_queue).await, 0);
    s3.restart();

    collect_records(&broker, 13, Duration::from_secs(60), &mut seen).await;
    assert_eq!(seen.len(), 13);
    worker.stop().await;
    assert_nothing_left(&broker).await;
    assert_archives_match(&s3, "school", &seen, MOOV_AT_END).await;
    broker.cleanup().await;
}

// Long on purpose: three origins failing in three ways, one worker, one
// set of assertions over what became of each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_failures_retry_through_the_delay_tiers_then_park() {
    let origin = Origin::start().await;
    let mut config = isolated_config("origin-tiers");
    config.probe = true;
    let broker = Broker::new(config).await;
    let metrics = Metrics::default();
    let worker = spawn_worker_with(broker.config.clone(), Health::default(), metrics.clone()).await;

    // Busy for 3 requests: both in-process attempts fail, the tier retry succeeds.
    let flaky = origin.add(
        "/flaky.mp4",
        FASTSTART.to_vec(),
        Faults {
            fail_first: 3,
            ..Faults::default()
        },
    );
    broker
        .publish(
            &one_camera("flaky", 7, &flaky, FASTSTART.len()),
            FieldTable::default(),
        )
        .await;
    let (record, _) = broker.take(&broker.config.records_queue, 1).await.remove(0);
    assert_eq!(record["tracks"][0]["probe"]["width"], 320);
    assert!(
        metrics
            .render()
            .contains(r#"lesson_replay_messages_total{outcome="retried",reason="fetch_failed"} 1"#)
    );

    // Slow and cut connections recover within the delivery.
    let cut = Faults {
        cut_after: Some(3000),
        cuts: 1,
        chunk_delay: Some(Duration::from_millis(50)),
        ..Faults::default()
    };
    let cutting = origin.add("/cut.mp4", FASTSTART.to_vec(), cut);
    broker
        .publish(
            &one_camera("cut", 7, &cutting, FASTSTART.len()),
            FieldTable::default(),
        )
        .await;
    let (record, _) = broker.take(&broker.config.records_queue, 1).await.remove(0);
    assert_eq!(record["task_id"], "cut");

    // Always busy: after the last tier (1 s, 2 s) it is parked with its history.
    let down = origin.add(
        "/down.mp4",
        FASTSTART.to_vec(),
        Faults {
            fail_first: 1000,
            ..Faults::default()
        },
    );
    broker
        .publish(
            &one_camera("down", 7, &down, FASTSTART.len()),
            FieldTable::default(),
        )
        .await;
    let (_, parked) = broker.take(&broker.config.parking_queue, 1).await.remove(0);
    assert_eq!(
        header(&parked, "x-lesson-replay-reason").as_deref(),
        Some("fetch_failed")
    );
    assert_eq!(
        header(&parked, "x-lesson-replay-attempt").as_deref(),
        Some("3")
    );
    assert!(header(&parked, "x-lesson-replay-first-seen").is_some());
    assert!(header(&parked, "x-lesson-replay-last-error-at").is_some());
    assert!(
        header(&parked, "x-lesson-replay-error")
            .unwrap()
            .contains("every delay tier used")
    );
    worker.stop().await;
    assert_nothing_left(&broker).await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_long_upload_requeues_it_and_a_new_worker_completes_it() {
    let s3 = S3Server::start("school");
    let origin = Origin::start().await;
    let mut config = archiving_config("sigterm", &s3);
    config.s3_part_size_bytes = 5 * 1024 * 1024;
    config.shutdown_grace_secs = 2;
    let broker = Broker::new(config).await;

    // 12 MiB at about 1.6 MB/s: far longer than the grace period.
    let big: Vec<u8> = (0..12 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let slow = Faults {
        chunk_delay: Some(Duration::from_millis(10)),
        ..Faults::default()
    };
    let url = origin.add("/long.mp4", big.clone(), slow);
    broker
        .publish(
            &one_camera("long", 7, &url, big.len()),
            FieldTable::default(),
        )
        .await;

    let mut worker = WorkerProcess::start(&broker.config);
    // Wait until the first part is uploaded, then stop the worker.
    let deadline = Instant::now() + Duration::from_secs(30);
    while origin.served() < 6 * 1024 * 1024 {
        assert!(Instant::now() < deadline, "the download did not progress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !s3.incomplete_uploads().is_empty(),
        "a multipart upload is under way"
    );
    let stopped_at = Instant::now();
    worker.terminate();
    let status = worker.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "exit code {status:?}");
    assert!(
        stopped_at.elapsed() < Duration::from_secs(2 + 5 + 2),
        "stopped within the grace period"
    );
    assert!(
        s3.incomplete_uploads().is_empty(),
        "the cut-short upload was aborted"
    );
    assert_eq!(
        broker.depth(&broker.config.work_queue).await,
        1,
        "the message is back in the work queue"
    );

    // A new worker (the origin now fast) completes it.
    origin.add("/long.mp4", big.clone(), Faults::default());
    let mut worker = WorkerProcess::start(&broker.config);
    let (record, _) = broker.take(&broker.config.records_queue, 1).await.remove(0);
    assert_eq!(
        record["tracks"][0]["archive"]["md5"],
        hex::encode(Md5::digest(&big))
    );
    worker.terminate();
    assert!(worker.wait_exit(Duration::from_secs(15)).success());
    assert_nothing_left(&broker).await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_work_finish_within_the_grace_period() {
    let s3 = S3Server::start("school");
    let origin = Origin::start().await;
    let mut config = archiving_config("sigterm-finish", &s3);
    config.shutdown_grace_secs = 20;
    let broker = Broker::new(config).await;
    let slow = Faults {
        chunk_delay: Some(Duration::from_millis(300)),
        ..Faults::default()
    };
    let big: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 13) as u8).collect();
    let url = origin.add("/slowish.mp4", big.clone(), slow);
    broker
        .publish(
            &one_camera("slowish", 7, &url, big.len()),
            FieldTable::default(),
        )
        .await;

    let mut worker = WorkerProcess::start(&broker.config);
    let deadline = Instant::now() + Duration::from_secs(30);
    while origin.served() == 0 {
        assert!(Instant::now() < deadline, "the download did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.terminate();
    assert!(worker.wait_exit(Duration::from_secs(25)).success());
    let (record, _) = broker.take(&broker.config.records_queue, 1).await.remove(0);
    assert_eq!(record["task_id"], "slowish");
    assert_nothing_left(&broker).await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_messages_are_listed_replayed_and_purged_by_the_operator() {
    let origin = Origin::start().await;
    let mut config = isolated_config("dlq");
    config.probe = true;
    let broker = Broker::new(config).await;
    let worker =
        spawn_worker_with(broker.config.clone(), Health::default(), Metrics::default()).await;

    let missing = format!("{}/late.mp4", origin.base);
    broker
        .publish(
            &one_camera("late", 7, &missing, FASTSTART.len()),
            FieldTable::default(),
        )
        .await;
    broker.publish(b"not json", FieldTable::default()).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while broker.depth(&broker.config.parking_queue).await < 2 {
        assert!(Instant::now() < deadline, "not parked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let dlq = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lesson-replay"))
            .arg("dlq")
            .args(args)
            .env_clear()
            .envs(common::worker_env(&broker.config))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let listed: Vec<Value> = dlq(&["list"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut reasons: Vec<&str> = listed
        .iter()
        .map(|m| m["reason"].as_str().unwrap())
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["invalid_json", "vod_not_found"]);
    // The body's MD5, as the worker's log lines about it carry it.
    let garbage = listed
        .iter()
        .find(|m| m["reason"] == "invalid_json")
        .unwrap();
    assert_eq!(garbage["body_md5"], hex::encode(Md5::digest(b"not json")));
    assert_eq!(
        broker.depth(&broker.config.parking_queue).await,
        2,
        "listing leaves the queue unchanged"
    );
    let only: Vec<Value> = dlq(&["list", "--reason", "vod_not_found"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(only.len(), 1);
    assert_eq!(only[0]["attempts"], 1);

    // The file appears on the origin; the operator replays that message.
    origin.add("/late.mp4", FASTSTART.to_vec(), Faults::default());
    dlq(&["replay", "--reason", "vod_not_found", "--limit", "5"]);
    let (record, _) = broker.take(&broker.config.records_queue, 1).await.remove(0);
    assert_eq!(record["task_id"], "late");
    assert_eq!(broker.depth(&broker.config.parking_queue).await, 1);
    dlq(&["purge"]);
    assert_eq!(broker.depth(&broker.config.parking_queue).await, 0);
    worker.stop().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_keeps_crashing_workers_is_parked_by_the_broker() {
    use futures_util::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicNackOptions};
    let mut config = isolated_config("delivery-limit");
    config.delivery_limit = 2;
    let broker = Broker::new(config).await;
    broker
        .publish(
            &one_camera("poison", 7, "http://1.vod2.myqcloud.com/a.mp4", 1),
            FieldTable::default(),
        )
        .await;

    // Workers that die holding the message: each death is a redelivery.
    let channel = broker.connection.create_channel().await.unwrap();
    let mut deliveries = channel
        .basic_consume(
            broker.config.work_queue.as_str().into(),
            "crashing".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let requeue = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    for _ in 0..3 {
        match tokio::time::timeout(Duration::from_secs(5), deliveries.next()).await {
            Ok(Some(Ok(delivery))) => assert!(delivery.acker.nack(requeue).await.unwrap()),
            _ => break, // dead-lettered: nothing more to deliver
        }
    }
    let _ = channel.close(200, "done".into()).await;

    let deadline = Instant::now() + Duration::from_secs(10);
    while broker.depth(&broker.config.parking_queue).await == 0 {
        assert!(
            Instant::now() < deadline,
            "the delivery limit did not park the message"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lesson-replay"))
        .args(["dlq", "list"])
        .env_clear()
        .envs(common::worker_env(&broker.config))
        .output()
        .unwrap();
    let listed: Value =
        serde_json::from_slice(out.stdout.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(listed["reason"], "delivery_limit", "{listed}");
    assert_eq!(broker.depth(&broker.config.work_queue).await, 0);
    broker.cleanup().await;
}
