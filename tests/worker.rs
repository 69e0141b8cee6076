//! The worker against the real RabbitMQ: messages published to the inbound
//! exchange come out as records on the records queue, rejected messages land in
//! the parking queue with their reason, and the worker keeps serving.

mod common;

use std::collections::HashSet;

use common::{Broker, EXAMPLES, assert_valid_record, header, isolated_config, spawn_worker};
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicNackOptions};
use lapin::types::FieldTable;
use lesson_replay::broker::headers::{callback_headers, header_text};
use lesson_replay::decision::verify::{SignatureMode, compute_sign};
use secrecy::SecretString;
use serde_json::Value;

fn example(name: &str) -> Vec<u8> {
    std::fs::read(format!("{EXAMPLES}/{name}.json")).unwrap()
}

const GOOD: &str = r#"{"callback_type":"record_finished","error_code":0,"expire_time":1700000600,
  "timestamp":1700000500,"task_id":"task-good","room_id":42,"group_id":"42","record_user_id":"tic_record_user_42_1",
  "start_time":1700000000,"stop_time":1700000060,"video_info":[{"video_play_time":0,"video_size":1000,
  "video_format":"mp4","video_duration":60000,"video_url":"http://1.vod2.myqcloud.com/a.mp4",
  "video_id":"v1","video_type":0,"user_id":"teacher"}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_contract_example_becomes_a_record_or_is_parked() {
    let broker = Broker::new(isolated_config("examples")).await;
    let worker = spawn_worker(broker.config.clone()).await;

    let finished = [
        "realtime-result-record",
        "realtime-query-finished",
        "callback-record-finished",
        "post-class-unmixed",
        "post-class-mixed",
    ];
    let skipped = ["callback-record-started", "realtime-query-recording"];
    let broken = [
        "callback-record-finished.doc",
        "callback-record-started.doc",
    ];
    for name in finished.iter().chain(&skipped).chain(&broken) {
        broker
            .publish(
                &example(name),
                callback_headers(None, None, Some("1400042982")),
            )
            .await;
    }

    let records = broker
        .take(&broker.config.records_queue, finished.len())
        .await;
    let mut ids = HashSet::new();
    for (record, properties) in &records {
        assert_valid_record(record);
        assert_eq!(
            record["sdkappid"], 1400042982,
            "sdkappid from the header or the body"
        );
        let message_id = properties.message_id().as_ref().unwrap().as_str();
        assert_eq!(message_id, record["replay_id"].as_str().unwrap());
        assert_eq!(
            properties.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(*properties.delivery_mode(), Some(2));
        ids.insert(message_id.to_owned());
    }
    // The callback and the query answer of the contract share task g68cee8e90jcq4ogg8jb,
    // so they are one recording with one id; the other three are distinct recordings.
    assert_eq!(ids.len(), finished.len() - 1);

    let parked = broker
        .take(&broker.config.parking_queue, broken.len())
        .await;
    for (body, properties) in &parked {
        assert_eq!(
            header(properties, "x-lesson-replay-reason").as_deref(),
            Some("invalid_json")
        );
        assert!(header(properties, "x-lesson-replay-error").is_some_and(|e| !e.is_empty()));
        assert_eq!(
            header(properties, "x-tic-sdkappid").as_deref(),
            Some("1400042982"),
            "original headers kept"
        );
        assert!(
            body.is_string(),
            "the original, unparsable body is kept as is"
        );
    }
    worker.stop().await;
    assert_eq!(broker.depth(&broker.config.records_queue).await, 0);
    assert_eq!(
        broker.depth(&broker.config.work_queue).await,
        0,
        "skipped messages are acknowledged"
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_message_is_parked_and_the_next_one_still_processed() {
    let broker = Broker::new(isolated_config("park")).await;
    let worker = spawn_worker(broker.config.clone()).await;

    let bad = GOOD.replace(r#""video_type":0"#, r#""video_type":"camera""#);
    broker.publish(bad.as_bytes(), FieldTable::default()).await;
    broker
        .publish(b"\x00\xffnot json", FieldTable::default())
        .await;
    broker.publish(GOOD.as_bytes(), FieldTable::default()).await;

    let (record, _) = broker.take(&broker.config.records_queue, 1).await.remove(0);
    assert_eq!(record["task_id"], "task-good");
    let parked = broker.take(&broker.config.parking_queue, 2).await;
    let reasons: HashSet<_> = parked
        .iter()
        .map(|(_, p)| {
            (
                header(p, "x-lesson-replay-reason").unwrap(),
                header(p, "x-lesson-replay-error").unwrap(),
            )
        })
        .collect();
    assert!(
        reasons
            .iter()
            .any(|(r, e)| r == "invalid_field" && e.starts_with("video_info[0].video_type: ")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|(r, _)| r == "invalid_json"),
        "{reasons:?}"
    );
    worker.stop().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_and_repeated_messages_keep_their_replay_id() {
    let broker = Broker::new(isolated_config("redeliver")).await;
    broker.publish(GOOD.as_bytes(), FieldTable::default()).await;

    // A consumer that dies without acking: the broker redelivers the message.
    let channel = broker.connection.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            broker.config.work_queue.as_str().into(),
            "flaky".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let first = consumer.next().await.unwrap().unwrap();
    first
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    channel
        .close(200, "flaky consumer gone".into())
        .await
        .unwrap();

    let worker = spawn_worker(broker.config.clone()).await;
    // TIC retries a callback up to 10 times: the same body again.
    broker.publish(GOOD.as_bytes(), FieldTable::default()).await;
    broker.publish(GOOD.as_bytes(), FieldTable::default()).await;
    let records = broker.take(&broker.config.records_queue, 3).await;
    let bodies: HashSet<String> = records.iter().map(|(r, _)| r.to_string()).collect();
    assert_eq!(bodies.len(), 1, "identical records for one recording");
    let ids: HashSet<String> = records
        .iter()
        .map(|(_, p)| p.message_id().as_ref().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 1);
    worker.stop().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_signatures_are_enforced_over_the_broker() {
    let mut config = isolated_config("signature");
    config.signature = SignatureMode::Required;
    config.tic_keys = lesson_replay::config::settings::TicKeysSetting::List(SecretString::from(
        "1400000001=9016607A382749C69D4F4B00C61DD083".to_owned(),
    ));
    let broker = Broker::new(config).await;
    let worker = spawn_worker(broker.config.clone()).await;

    let sign = compute_sign("9016607A382749C69D4F4B00C61DD083", 1700000600);
    broker
        .publish(
            GOOD.as_bytes(),
            callback_headers(Some(&sign), Some("526919"), Some("1400000001")),
        )
        .await;
    broker
        .publish(
            GOOD.as_bytes(),
            callback_headers(None, None, Some("1400000001")),
        )
        .await;
    broker
        .publish(
            GOOD.as_bytes(),
            callback_headers(Some(&"0".repeat(32)), None, Some("1400000001")),
        )
        .await;

    // The same signed callback from a publisher that sends its text headers
    // as AMQP byte arrays (Go's amqp091 does for []byte).
    let mut as_bytes = callback_headers(Some(&sign), Some("526919"), Some("1400000001"));
    for name in [
        lesson_replay::broker::headers::TIC_SIGN,
        lesson_replay::broker::headers::TIC_SDKAPPID,
    ] {
        let text = header_text(Some(&as_bytes), name).unwrap();
        as_bytes.insert(
            name.into(),
            lapin::types::AMQPValue::ByteArray(text.into_bytes().into()),
        );
    }
    broker.publish(GOOD.as_bytes(), as_bytes).await;

    for (record, _) in broker.take(&broker.config.records_queue, 2).await {
        assert_eq!(record["sdkappid"], 1400000001);
    }
    let parked = broker.take(&broker.config.parking_queue, 2).await;
    let mut reasons: Vec<String> = parked
        .iter()
        .map(|(_, p)| header(p, "x-lesson-replay-reason").unwrap())
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["signature_invalid", "signature_missing"]);
    for (_, p) in &parked {
        let error = header(p, "x-lesson-replay-error").unwrap();
        assert!(
            !error.contains("9016607A"),
            "keys never appear in errors: {error}"
        );
    }
    worker.stop().await;
    assert_eq!(broker.depth(&broker.config.records_queue).await, 0);
    broker.assert_settled().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_command_sends_files_with_callback_headers() {
    let broker = Broker::new(isolated_config("publish-cmd")).await;
    let c = &broker.config;
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_lesson-replay"))
        .args([
            "publish",
            &format!("{EXAMPLES}/realtime-query-finished.json"),
            "--sdkappid",
            "1400000009",
        ])
        .args(["--sign", "abc", "--random", "526919"])
        .envs(common::worker_env(c))
        .status()
        .unwrap();
    assert!(status.success());
    let (body, properties) = broker.take(&c.work_queue, 1).await.remove(0);
    assert_eq!(body["task_id"], "g68cee8e90jcq4ogg8jb");
    assert_eq!(
        header(&properties, "x-tic-sdkappid").as_deref(),
        Some("1400000009")
    );
    assert_eq!(header(&properties, "x-tic-sign").as_deref(), Some("abc"));
    assert_eq!(
        header(&properties, "x-tic-random").as_deref(),
        Some("526919")
    );
    assert!(properties.timestamp().is_some());
    let _: Value = body;
    broker.cleanup().await;
}
