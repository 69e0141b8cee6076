//! Watches against the mock TIC (tests/common/tic_mock.rs), which sends its
//! callbacks itself, over HTTP, to the real ingress: a lesson whose
//! `record_started` reached us gets its record even when every
//! `record_finished` callback is lost.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::messages::FASTSTART;
use common::origin::{Faults, Origin, noise};
use common::s3::S3Server;
use common::tic_mock::{
    APP, KEY, TaskScript, TicMock, finished_answer, record_finished, record_started,
};
use common::{
    Broker, RunningIngress, RunningWorker, WorkerProcess, header, isolated_config, spawn_ingress,
    spawn_worker_with, wait_until, worker_env,
};
use lapin::types::{AMQPValue, FieldTable};
use lesson_replay::config::settings::{Config, TicKeysSetting};
use lesson_replay::service::endpoints::Health;
use lesson_replay::telemetry::metrics::Metrics;
use serde_json::Value;

/// Settings that make watches quick and ask the mock.
fn watching(test: &str, mock: &TicMock, first_check_secs: u64) -> Config {
    let mut config = isolated_config(test);
    config.tic_keys = TicKeysSetting::List(format!("{APP}={KEY}").into());
    config.tic_api_base = mock.api_base.clone();
    config.watch_first_check_secs = first_check_secs;
    config.watch_delays_secs = vec![1];
    config.watch_retry_secs = 1;
    // Two calls per check: two 500s exhaust a check, which is retried later.
    config.tic_api_attempts = 2;
    config.watch_max_age_secs = 600;
    // The mock's lessons stop as the test starts: no wait for late callbacks.
    config.watch_callback_grace_secs = 0;
    config
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn watch_events(metrics: &Metrics, event: &str) -> u64 {
    common::metric(
        metrics,
        &format!(r#"lesson_replay_watches_total{{event="{event}"}}"#),
    )
}

/// The test's broker, then a worker (its metrics) and an ingress, both ready.
async fn services(config: &Config) -> (Broker, Metrics, RunningWorker, RunningIngress) {
    let broker = Broker::new(config.clone()).await;
    let metrics = Metrics::default();
    let worker = spawn_worker_with(config.clone(), Health::default(), metrics.clone()).await;
    let ingress = spawn_ingress(config.clone(), Metrics::default()).await;
    ingress.wait_ready().await;
    worker.wait_ready().await;
    (broker, metrics, worker, ingress)
}

/// Records until `want` distinct tasks have one (a duplicate must be identical).
async fn collect(broker: &Broker, want: usize, limit: Duration) -> HashMap<String, Value> {
    let mut records: HashMap<String, Value> = HashMap::new();
    let deadline = std::time::Instant::now() + limit;
    while records.len() < want {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {want} records",
            records.len()
        );
        if let Some((record, _)) = broker
            .next(&broker.config.records_queue, Duration::from_millis(500))
            .await
        {
            let task = record["task_id"].as_str().unwrap().to_owned();
            if let Some(first) = records.get(&task) {
                assert_eq!(first, &record, "the second record of {task} is identical");
            }
            records.insert(task, record);
        }
    }
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_lessons_get_their_records_though_twenty_callbacks_are_lost() {
    let s3 = S3Server::start("school");
    let origin = Origin::start().await;
    let mock = TicMock::start().await;
    let mut config = watching("watch-fifty", &mock, 5);
    s3.configure(&mut config, "school");
    config.probe = true;
    let (broker, metrics, worker, ingress) = services(&config).await;

    let url = origin.add("/lesson.mp4", FASTSTART.to_vec(), Faults::default());
    let start = now();
    let lessons: Vec<(String, Value)> = (0..50)
        .map(|i| {
            let task = format!("lesson-{i}");
            let answer = finished_answer(&task, 100 + i, start, &url, FASTSTART.len());
            (task, answer)
        })
        .collect();
    for (i, (task, answer)) in lessons.iter().enumerate() {
        let script = TaskScript {
            finished: Some(answer.to_string()),
            ..TaskScript::default()
        };
        mock.script(task, script);
        let started = record_started(task, 100 + i as i64, start);
        assert_eq!(mock.send_callback(&ingress.url, &started).await, 200);
    }
    // TIC's record_finished callbacks reach us for 30 lessons only.
    let lost = |i: usize| i % 5 < 2;
    for (i, (_, answer)) in lessons.iter().enumerate().filter(|(i, _)| !lost(*i)) {
        let finished = record_finished(answer);
        assert_eq!(
            mock.send_callback(&ingress.url, &finished).await,
            200,
            "{i}"
        );
    }

    let records = collect(&broker, 50, Duration::from_secs(90)).await;
    wait_until("every watch was checked", Duration::from_secs(60), || {
        watch_events(&metrics, "already_recorded") + watch_events(&metrics, "reconciled") == 50
    })
    .await;
    worker.stop().await;
    ingress.stop().await;
    for (record, _) in broker.drain(&broker.config.records_queue).await {
        let task = record["task_id"].as_str().unwrap();
        assert_eq!(
            records[task], record,
            "the second record of {task} is identical"
        );
    }
    // The 20 lessons whose callback was lost were found by their watch; the
    // watches of the others found their records already there.
    assert!(watch_events(&metrics, "reconciled") >= 20);
    assert!(watch_events(&metrics, "already_recorded") >= 1);
    // The lessons "stop" ten seconds after the test starts: a watch that finds
    // one finished before then, without its record, checks again.
    assert!(watch_events(&metrics, "scheduled") >= 50);
    // One upload per lesson: a watch that finds the copy uploads nothing.
    let uploaded = common::metric(&metrics, "lesson_replay_uploaded_bytes_total");
    assert_eq!(uploaded, 50 * FASTSTART.len() as u64);
    broker.assert_settled().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tasks_are_parked_and_failing_or_unfinished_ones_checked_again() {
    let mock = TicMock::start().await;
    let config = watching("watch-faults", &mock, 1);
    let broker = Broker::new(config.clone()).await;
    let metrics = Metrics::default();
    let worker = spawn_worker_with(config.clone(), Health::default(), metrics.clone()).await;
    let url = "http://1.vod2.myqcloud.com/a.mp4";
    let start = now();
    let finished = |task: &str| Some(finished_answer(task, 9, start, url, 1000).to_string());
    mock.script(
        "flaky",
        TaskScript {
            fail_first: 2,
            finished: finished("flaky"),
            ..TaskScript::default()
        },
    );
    mock.script(
        "late",
        TaskScript {
            recording_first: 2,
            finished: finished("late"),
            ..TaskScript::default()
        },
    );
    // record_started as the callback service publishes it, sdkappid in the header.
    let mut headers = FieldTable::default();
    headers.insert("x-tic-sdkappid".into(), AMQPValue::LongLongInt(APP));
    for task in ["flaky", "late"] {
        let body = serde_json::to_vec(&record_started(task, 9, start)).unwrap();
        broker.publish(&body, headers.clone()).await;
    }
    // A task known from elsewhere, watched by hand: TIC does not know it.
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_lesson-replay"))
        .args(["watch", "ghost", "--sdkappid", &APP.to_string()])
        .env_clear()
        .envs(worker_env(&config))
        .status()
        .await
        .unwrap();
    assert!(status.success());

    let records = collect(&broker, 2, Duration::from_secs(60)).await;
    assert!(records.contains_key("flaky") && records.contains_key("late"));
    let (body, parked) = broker.take(&config.parking_queue, 1).await.remove(0);
    assert_eq!(body["task_id"], "ghost");
    assert_eq!(
        header(&parked, "x-lesson-replay-reason").as_deref(),
        Some("watch_task_not_found")
    );
    worker.stop().await;
    assert_eq!(mock.queries("flaky"), 3, "two 500s, then the answer");
    assert_eq!(mock.queries("late"), 3, "recording twice, then finished");
    assert!(watch_events(&metrics, "retried") >= 1);
    assert_eq!(watch_events(&metrics, "still_recording"), 2);
    // Without archiving, the worker cannot tell whether a record existed.
    assert_eq!(watch_events(&metrics, "finished"), 2);
    broker.assert_settled().await;
    broker.cleanup().await;
}

/// A worker killed while it handles a due watch loses nothing: the watch was
/// not acknowledged, and another worker finishes it.
/// A watch asks whether the lesson has its record where the lesson's app
/// archives: an app with a table and a store of its own (moto, its own keys),
/// the default archiving nothing. Looking in the default destination, it
/// could not tell (`finished`); in the app's bucket it finds the manifest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_looks_for_the_record_in_its_apps_bucket() {
    use lesson_replay::config::apps::AppSettings;
    let moto = common::moto::MotoServer::start("school-app").await;
    let origin = Origin::start().await;
    let mock = TicMock::start().await;
    let mut config = watching("watch-app", &mock, 3);
    config.probe = true;
    config.archive = false;
    let table = AppSettings {
        archive: Some(true),
        s3_endpoint: Some(moto.endpoint.clone()),
        s3_bucket: Some("school-app".into()),
        s3_force_path_style: Some(true),
        s3_access_key_id: Some("app-key-id".into()),
        s3_secret_access_key: Some("app-secret".into()),
        ..AppSettings::default()
    };
    config.apps.insert(APP.to_string(), table);
    let (broker, metrics, worker, ingress) = services(&config).await;

    let url = origin.add("/app.mp4", FASTSTART.to_vec(), Faults::default());
    let start = now();
    let answer = finished_answer("app-lesson", 7, start, &url, FASTSTART.len());
    mock.script(
        "app-lesson",
        TaskScript {
            finished: Some(answer.to_string()),
            ..TaskScript::default()
        },
    );
    let started = record_started("app-lesson", 7, start);
    assert_eq!(mock.send_callback(&ingress.url, &started).await, 200);
    assert_eq!(
        mock.send_callback(&ingress.url, &record_finished(&answer))
            .await,
        200
    );
    let records = collect(&broker, 1, Duration::from_secs(60)).await;
    assert_eq!(
        records["app-lesson"]["tracks"][0]["archive"]["bucket"],
        "school-app"
    );
    wait_until("the watch was checked", Duration::from_secs(60), || {
        watch_events(&metrics, "already_recorded") + watch_events(&metrics, "finished") >= 1
    })
    .await;
    assert_eq!(watch_events(&metrics, "already_recorded"), 1);
    assert_eq!(watch_events(&metrics, "finished"), 0);
    worker.stop().await;
    ingress.stop().await;
    // The watch's record is the same, and its copy was found, not uploaded again.
    for (record, _) in broker.drain(&broker.config.records_queue).await {
        assert_eq!(record, records["app-lesson"]);
    }
    let uploaded = format!("lesson_replay_app_uploaded_bytes_total{{app=\"{APP}\"}}");
    assert_eq!(common::metric(&metrics, &uploaded), FASTSTART.len() as u64);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_survives_a_killed_worker() {
    let s3 = S3Server::start("school");
    let origin = Origin::start().await;
    let mock = TicMock::start().await;
    let mut config = watching("watch-kill", &mock, 1);
    s3.configure(&mut config, "school");
    let broker = Broker::new(config.clone()).await;
    // A download of 64 chunks, a tenth of a second apart: in flight for seconds.
    let body = noise(1024 * 1024);
    let slow = Faults {
        chunk_delay: Some(Duration::from_millis(100)),
        ..Faults::default()
    };
    let url = origin.add("/slow.mp4", body.clone(), slow);
    let answer = finished_answer("killed", 5, now(), &url, body.len());
    mock.script(
        "killed",
        TaskScript {
            finished: Some(answer.to_string()),
            ..TaskScript::default()
        },
    );
    let mut first = WorkerProcess::start(&config);
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_lesson-replay"))
        .args([
            "watch",
            "killed",
            "--sdkappid",
            &APP.to_string(),
            "--room-id",
            "5",
        ])
        .env_clear()
        .envs(worker_env(&config))
        .status()
        .await
        .unwrap();
    assert!(status.success());
    wait_until(
        "the watched lesson is being archived",
        Duration::from_secs(30),
        || origin.served() > 64 * 1024,
    )
    .await;
    first.kill();
    let mut second = WorkerProcess::start(&config);
    let records = collect(&broker, 1, Duration::from_secs(60)).await;
    assert_eq!(records["killed"]["room_id"], 5);
    second.terminate();
    assert!(second.wait_exit(Duration::from_secs(30)).success());
    assert!(origin.requests() >= 2, "the kill hit the watch mid-way");
    assert!(mock.queries("killed") >= 2, "the watch was checked again");
    broker.assert_settled().await;
    broker.cleanup().await;
}

/// An app without a TicKey: its unsigned `record_started` is skipped and its
/// signed callback parked, both under reason `no_key` (counted, so an alert
/// can fire), naming the app — not hidden as a plain skip or a bad signature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lessons_of_an_app_without_a_key_are_counted_and_parked_as_no_key() {
    let mock = TicMock::start().await;
    let config = watching("no-key", &mock, 1);
    let broker = Broker::new(config.clone()).await;
    let metrics = Metrics::default();
    let worker = spawn_worker_with(config.clone(), Health::default(), metrics.clone()).await;
    let other_app = APP + 1;
    let start = now();
    let mut headers = FieldTable::default();
    headers.insert("x-tic-sdkappid".into(), AMQPValue::LongLongInt(other_app));
    let started = serde_json::to_vec(&record_started("keyless", 9, start)).unwrap();
    broker.publish(&started, headers.clone()).await;
    // Signed (as TIC signs every callback), by a key the workers do not have.
    let mut signed = headers.clone();
    let sign = lesson_replay::decision::verify::compute_sign(KEY, start + 600);
    signed.insert(
        "x-tic-sign".into(),
        AMQPValue::LongString(sign.as_str().into()),
    );
    broker.publish(&started, signed).await;

    let (_, parked) = broker.take(&config.parking_queue, 1).await.remove(0);
    assert_eq!(
        header(&parked, "x-lesson-replay-reason").as_deref(),
        Some("no_key")
    );
    let error = header(&parked, "x-lesson-replay-error").unwrap();
    assert!(error.contains(&other_app.to_string()), "{error}");
    let skipped = r#"lesson_replay_messages_total{outcome="skipped",reason="no_key"}"#;
    wait_until(
        "the unsigned one is counted",
        Duration::from_secs(30),
        || common::metric(&metrics, skipped) == 1,
    )
    .await;
    worker.stop().await;
    assert_eq!(
        watch_events(&metrics, "scheduled"),
        0,
        "no watch for an app TIC cannot be asked about"
    );
    assert_eq!(mock.queries("keyless"), 0);
    broker.cleanup().await;
}
