//! Many apps, one deployment, with real parts: RabbitMQ, the test VOD origin,
//! an s3s-fs store and a moto store with different credentials. Each app's
//! lessons land in its own bucket; a store refusing one app's credentials
//! parks that app's lessons only; one app's backlog does not hold another's
//! lessons; `lifecycle` and `preview` act on the app's own bucket.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::messages::{FASTSTART, one_camera};
use common::moto::MotoServer;
use common::origin::{Faults, Origin};
use common::s3::S3Server;
use common::{Broker, header, isolated_config, metric, spawn_worker_with};
use lesson_replay::broker::headers::callback_headers;
use lesson_replay::config::apps::AppSettings;
use lesson_replay::config::settings::Config;
use lesson_replay::service::endpoints::Health;
use lesson_replay::telemetry::metrics::Metrics;
use secrecy::SecretString;
use serde_json::Value;

const ONE: i64 = 1400000001;
const TWO: i64 = 1400000002;
const THREE: i64 = 1400000003;

/// App `id`'s table: archiving to `bucket` on the store at `endpoint`, with
/// its own credentials.
fn app_on(endpoint: &str, bucket: &str, key_id: &str, secret: &str) -> AppSettings {
    AppSettings {
        archive: Some(true),
        s3_endpoint: Some(endpoint.to_owned()),
        s3_bucket: Some(bucket.to_owned()),
        s3_force_path_style: Some(true),
        s3_access_key_id: Some(SecretString::from(key_id)),
        s3_secret_access_key: Some(SecretString::from(secret)),
        ..AppSettings::default()
    }
}

fn add_app(config: &mut Config, id: i64, app: AppSettings) {
    config.apps.insert(id.to_string(), app);
}

// Long on purpose: the second half (a store refusing one app) only means
// something once the first showed both apps archiving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_app_archives_to_its_own_bucket_and_a_refusing_store_parks_only_its_lessons() {
    let mut s3 = S3Server::start("school-one");
    let moto = MotoServer::start("school-two").await;
    let origin = Origin::start().await;
    let mut config = isolated_config("apps-buckets");
    // The default: no archive (app three has no table).
    config.archive = false;
    config.probe = true;
    add_app(
        &mut config,
        ONE,
        app_on(
            &s3.endpoint,
            "school-one",
            common::s3::ACCESS_KEY,
            common::s3::SECRET_KEY,
        ),
    );
    add_app(
        &mut config,
        TWO,
        app_on(&moto.endpoint, "school-two", "two-key-id", "two-secret"),
    );
    config.validate().expect("valid settings");
    let broker = Broker::new(config).await;
    let metrics = Metrics::new();
    let worker = spawn_worker_with(broker.config.clone(), Health::default(), metrics.clone()).await;

    let url = origin.add("/cam.mp4", FASTSTART.to_vec(), Faults::default());
    let lessons = [
        (ONE, "one-a"),
        (ONE, "one-b"),
        (TWO, "two-a"),
        (TWO, "two-b"),
        (THREE, "three-a"),
    ];
    for (n, (app, task)) in lessons.iter().enumerate() {
        let body = one_camera(task, 100 + n as i64, &url, FASTSTART.len());
        let app = app.to_string();
        broker
            .publish(&body, callback_headers(None, None, Some(&app)))
            .await;
    }
    let records = broker
        .take(&broker.config.records_queue, lessons.len())
        .await;
    let mut by_task: BTreeMap<String, Value> = BTreeMap::new();
    for (record, _) in records {
        by_task.insert(record["task_id"].as_str().unwrap().to_owned(), record);
    }
    for (app, task) in lessons {
        let record = &by_task[task];
        assert_eq!(record["sdkappid"], app, "{task}");
        let archive = &record["tracks"][0]["archive"];
        match app {
            ONE => assert_eq!(archive["bucket"], "school-one", "{task}: {archive}"),
            TWO => assert_eq!(archive["bucket"], "school-two", "{task}: {archive}"),
            // No table: the default, which does not archive.
            _ => assert!(archive.is_null(), "{task}: {archive}"),
        }
    }
    // Each bucket holds its app's lessons (tracks and manifests), nothing else.
    let one_keys = common::s3::keys(&s3.client(), "school-one").await;
    let two_keys = common::s3::keys(&moto.client(), "school-two").await;
    for (keys, own, other) in [(&one_keys, ONE, TWO), (&two_keys, TWO, ONE)] {
        let lessons: Vec<&String> = keys
            .iter()
            .filter(|k| k.ends_with("manifest.json"))
            .collect();
        assert_eq!(lessons.len(), 2, "{keys:?}");
        assert!(
            keys.iter()
                .filter(|k| !k.contains("/.lesson-replay-"))
                .all(|k| k.starts_with(&format!("lesson-replay/{own}/"))),
            "{keys:?}"
        );
        assert!(
            !keys.iter().any(|k| k.contains(&format!("/{other}/"))),
            "{keys:?}"
        );
    }
    assert!(
        metric(
            &metrics,
            &format!("lesson_replay_app_uploaded_bytes_total{{app=\"{ONE}\"}}")
        ) >= 2 * FASTSTART.len() as u64
    );
    assert_eq!(
        metric(
            &metrics,
            &format!("lesson_replay_app_records_total{{app=\"{TWO}\"}}")
        ),
        2
    );
    assert_eq!(
        metric(&metrics, "lesson_replay_app_records_total{app=\"other\"}"),
        1
    );

    // A redelivery of app two's lesson finds its copy in app two's bucket.
    let two_uploaded = format!("lesson_replay_app_uploaded_bytes_total{{app=\"{TWO}\"}}");
    let before = metric(&metrics, &two_uploaded);
    assert!(before >= 2 * FASTSTART.len() as u64);
    let again = one_camera("two-a", 102, &url, FASTSTART.len());
    broker
        .publish(&again, callback_headers(None, None, Some(&TWO.to_string())))
        .await;
    let (record, _) = broker.take(&broker.config.records_queue, 1).await.remove(0);
    assert_eq!(record, by_task["two-a"]);
    assert_eq!(metric(&metrics, &two_uploaded), before, "uploaded again");
    assert!(metric(&metrics, "lesson_replay_uploads_skipped_total") >= 1);

    // App one's store now refuses its credentials (its keys were rotated).
    s3.restart_with_secret("rotated-secret");
    for (n, (app, task)) in [(ONE, "one-refused"), (TWO, "two-after")]
        .iter()
        .enumerate()
    {
        let body = one_camera(task, 200 + n as i64, &url, FASTSTART.len());
        let app = app.to_string();
        broker
            .publish(&body, callback_headers(None, None, Some(&app)))
            .await;
    }
    let (record, _) = broker.take(&broker.config.records_queue, 1).await.remove(0);
    assert_eq!(record["task_id"], "two-after");
    assert_eq!(record["tracks"][0]["archive"]["bucket"], "school-two");
    let (parked, properties) = broker
        .next(&broker.config.parking_queue, Duration::from_secs(60))
        .await
        .expect("app one's lesson is parked");
    assert_eq!(parked["task_id"], "one-refused");
    assert_eq!(
        header(&properties, "x-lesson-replay-reason").as_deref(),
        Some("archive_denied")
    );
    assert_eq!(
        metric(
            &metrics,
            &format!(
                "lesson_replay_app_failures_total{{app=\"{ONE}\",outcome=\"parked\",reason=\"archive_denied\"}}"
            )
        ),
        1
    );
    assert_eq!(
        metric(
            &metrics,
            &format!(
                "lesson_replay_app_failures_total{{app=\"{TWO}\",outcome=\"parked\",reason=\"archive_denied\"}}"
            )
        ),
        0
    );
    // Nothing more: no other record, nothing else parked.
    assert!(
        broker
            .next(&broker.config.records_queue, Duration::from_millis(500))
            .await
            .is_none()
    );
    assert_eq!(broker.depth(&broker.config.parking_queue).await, 0);
    worker.stop().await;
    broker.cleanup().await;
}

/// App one publishes a backlog of slow lessons, then app two one quick
/// lesson: with a lane each, app two's record comes before most of app
/// one's; on one queue (no tables), it comes last. Each lane processes one
/// lesson at a time, so the order is certain, not a race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_apps_backlog_does_not_hold_another_apps_lessons() {
    let origin = Origin::start().await;
    // Every lesson of app one takes about 0.4 s to fetch.
    let slow = origin.add(
        "/slow.mp4",
        FASTSTART.to_vec(),
        Faults {
            chunk_delay: Some(Duration::from_millis(400)),
            no_ranges: true,
            ..Faults::default()
        },
    );
    let quick = origin.add("/quick.mp4", FASTSTART.to_vec(), Faults::default());
    let backlog = 6;
    let mut positions = Vec::new();
    for lanes in [true, false] {
        let mut config = isolated_config("apps-fair");
        config.probe = true;
        config.concurrency = 1;
        if lanes {
            add_app(&mut config, ONE, AppSettings::default());
            add_app(&mut config, TWO, AppSettings::default());
        }
        let broker = Broker::new(config).await;
        for n in 0..backlog {
            let body = one_camera(&format!("one-{n}"), n, &slow, FASTSTART.len());
            broker
                .publish(&body, callback_headers(None, None, Some(&ONE.to_string())))
                .await;
        }
        let body = one_camera("two-quick", 99, &quick, FASTSTART.len());
        broker
            .publish(&body, callback_headers(None, None, Some(&TWO.to_string())))
            .await;
        let started = Instant::now();
        let worker = common::spawn_worker(broker.config.clone()).await;
        let records = broker
            .take(&broker.config.records_queue, backlog as usize + 1)
            .await;
        let position = records
            .iter()
            .position(|(r, _)| r["task_id"] == "two-quick")
            .unwrap();
        positions.push((lanes, position, started.elapsed()));
        worker.stop().await;
        broker.cleanup().await;
    }
    let [(_, with_lanes, _), (_, one_queue, _)] = positions[..] else {
        unreachable!()
    };
    assert!(
        with_lanes <= 1,
        "with a lane each, app two waited: {positions:?}"
    );
    assert_eq!(
        one_queue, backlog as usize,
        "one queue is first come, first served: {positions:?}"
    );
}

/// `lifecycle --sdkappid` acts on that app's bucket only; without it, on
/// every bucket of the configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_acts_on_each_apps_own_bucket() {
    use lesson_replay::media::archive::LIFECYCLE_RULE;
    use lesson_replay::media::archive::lifecycle::rule_ids;
    let moto = MotoServer::start("school-default").await;
    let client = moto.client();
    client
        .create_bucket()
        .bucket("school-two")
        .send()
        .await
        .unwrap();
    let mut config = isolated_config("apps-lifecycle");
    moto.configure(&mut config, "school-default");
    add_app(
        &mut config,
        TWO,
        AppSettings {
            s3_bucket: Some("school-two".into()),
            s3_prefix: Some("two".into()),
            ..AppSettings::default()
        },
    );
    // App one shares the default bucket, under a prefix of its own.
    add_app(
        &mut config,
        ONE,
        AppSettings {
            s3_prefix: Some("one".into()),
            ..AppSettings::default()
        },
    );
    let rules = async |bucket: &str| -> Vec<(String, String)> {
        match client
            .get_bucket_lifecycle_configuration()
            .bucket(bucket)
            .send()
            .await
        {
            Ok(got) => got
                .rules()
                .iter()
                .map(|r| {
                    let prefix = r.filter().and_then(|f| f.prefix()).unwrap_or_default();
                    (r.id().unwrap_or_default().to_owned(), prefix.to_owned())
                })
                .collect(),
            Err(_) => Vec::new(),
        }
    };
    let out = common::lesson_replay(
        &config,
        &["lifecycle", "--days", "2", "--sdkappid", &TWO.to_string()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let two = rules("school-two").await;
    assert!(
        two.contains(&(rule_ids("two").0, "two/".to_owned())),
        "{two:?}"
    );
    assert!(
        rules("school-default").await.is_empty(),
        "only app two's bucket"
    );

    let out = common::lesson_replay(&config, &["lifecycle", "--days", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let default = rules("school-default").await;
    // Both prefixes of the shared bucket keep their rules.
    for (id, prefix) in [
        (LIFECYCLE_RULE.to_owned(), "lesson-replay/"),
        (rule_ids("one").0, "one/"),
        (rule_ids("one").1, "one/.lesson-replay-uploads/"),
    ] {
        assert!(default.contains(&(id, prefix.to_owned())), "{default:?}");
    }
    assert_eq!(default.len(), 4, "{default:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("school-two") && stderr.contains("school-default"),
        "{stderr}"
    );
}

/// `preview --presign-hours` presigns each copy on the store of the
/// record's app: app two's copy, on moto, plays; the default store (s3s-fs)
/// has no such object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_presigns_on_the_store_of_the_records_app() {
    let s3 = S3Server::start("school-default");
    let moto = MotoServer::start("school-two").await;
    let key = format!("lesson-replay/{TWO}/7/r/camera-t-c.mp4");
    moto.client()
        .put_object()
        .bucket("school-two")
        .key(&key)
        .body(FASTSTART.to_vec().into())
        .send()
        .await
        .unwrap();
    let mut config = isolated_config("apps-preview");
    s3.configure(&mut config, "school-default");
    add_app(
        &mut config,
        TWO,
        app_on(&moto.endpoint, "school-two", "two-key-id", "two-secret"),
    );
    let record = record_with_archive(&config, TWO, "school-two", &key);
    let dir = std::env::temp_dir().join(format!("lr-apps-preview-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("record.json");
    std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();
    let out = common::lesson_replay(
        &config,
        &["preview", "--presign-hours", "1", path.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = String::from_utf8(out.stdout).unwrap();
    let presigned = page
        .split('"')
        .find(|s| s.contains("X-Amz-Signature="))
        .expect("a presigned URL")
        .replace("\\u0026", "&");
    assert!(presigned.starts_with(&moto.endpoint), "{presigned}");
    let fetched = reqwest::get(&presigned).await.unwrap();
    assert_eq!(fetched.status(), 200, "{presigned}");
    assert_eq!(fetched.bytes().await.unwrap().as_ref(), FASTSTART);
}

/// The record of a one-camera lesson of app `app`, its track archived at
/// `bucket`/`key`, as the worker would publish it.
fn record_with_archive(config: &Config, app: i64, bucket: &str, key: &str) -> Value {
    use lesson_replay::decision::decide::{Decision, Envelope, decide};
    let body = one_camera("c", 7, "https://a.vod2.myqcloud.com/c.mp4", FASTSTART.len());
    let envelope = Envelope {
        sdkappid: Some(app.to_string()),
        ..Envelope::default()
    };
    let Decision::Publish(normalized) = decide(&body, &envelope, &config.input_policy()) else {
        panic!("a finished lesson is published");
    };
    let mut record = serde_json::to_value(&normalized.record).unwrap();
    record["tracks"][0]["archive"] = serde_json::json!({"uri": format!("s3://{bucket}/{key}"),
        "bucket": bucket, "key": key, "size_bytes": FASTSTART.len(), "md5": "0".repeat(32), "etag": null});
    record
}

/// With lanes, the guarantees hold as on one queue: a transient failure goes
/// round a delay tier and back through the intake to its app's lane, to be
/// published; bad input, whatever app it claims, is parked with its reason;
/// every message ends somewhere and no lane keeps one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_lanes_retries_come_back_to_their_lane_and_bad_input_is_parked() {
    let origin = Origin::start().await;
    let mut config = isolated_config("apps-guarantees");
    config.probe = true;
    add_app(&mut config, ONE, AppSettings::default());
    let broker = Broker::new(config).await;
    let metrics = Metrics::new();
    let worker = spawn_worker_with(broker.config.clone(), Health::default(), metrics.clone()).await;
    // Busy at first: both attempts of the first delivery fail.
    let busy = origin.add(
        "/busy.mp4",
        FASTSTART.to_vec(),
        Faults {
            fail_first: 2,
            ..Faults::default()
        },
    );
    let one = ONE.to_string();
    broker
        .publish(
            &one_camera("retried", 1, &busy, FASTSTART.len()),
            callback_headers(None, None, Some(&one)),
        )
        .await;
    broker
        .publish(b"{not json", callback_headers(None, None, Some(&one)))
        .await;
    broker
        .publish(
            &one_camera("bad-app", 2, &busy, FASTSTART.len()),
            callback_headers(None, None, Some("14000000\n01")),
        )
        .await;
    let (record, _) = broker.take(&broker.config.records_queue, 1).await.remove(0);
    assert_eq!(record["task_id"], "retried");
    // Retried as app one's (a 503 from the origin, whichever reason it is counted under).
    let retried = format!("lesson_replay_app_failures_total{{app=\"{ONE}\",outcome=\"retried\"");
    let text = metrics.render();
    assert!(
        text.lines()
            .filter(|l| l.starts_with(&retried))
            .any(|l| !l.ends_with(" 0")),
        "{text}"
    );
    let parked = broker.take_raw(&broker.config.parking_queue, 2).await;
    let mut reasons: Vec<String> = parked
        .iter()
        .map(|(_, p)| header(p, "x-lesson-replay-reason").unwrap())
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["invalid_field", "invalid_json"]);
    let topology = broker.config.broker_settings().topology;
    for (_, lane) in lesson_replay::broker::topology::lanes(&topology) {
        assert_eq!(broker.depth(&lane).await, 0, "{lane}");
    }
    assert_eq!(broker.depth(&broker.config.work_queue).await, 0);
    worker.stop().await;
    broker.cleanup().await;
}

/// Orphan cleanup in the app's own bucket: an upload of a lesson's object
/// left open in app two's store (moto, which lists uploads) is aborted when
/// the lesson comes again, and the default store is never asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_left_open_in_an_apps_bucket_is_aborted_there() {
    let s3 = S3Server::start("school-default");
    let moto = MotoServer::start("school-two").await;
    let origin = Origin::start().await;
    let mut config = isolated_config("apps-orphans");
    s3.configure(&mut config, "school-default");
    config.probe = true;
    add_app(
        &mut config,
        TWO,
        app_on(&moto.endpoint, "school-two", "two-key-id", "two-secret"),
    );
    let broker = Broker::new(config).await;
    let metrics = Metrics::new();
    let worker = spawn_worker_with(broker.config.clone(), Health::default(), metrics.clone()).await;
    let url = origin.add("/cam.mp4", FASTSTART.to_vec(), Faults::default());
    let lesson = one_camera("orphan-two", 7, &url, FASTSTART.len());
    let two = TWO.to_string();
    broker
        .publish(&lesson, callback_headers(None, None, Some(&two)))
        .await;
    let (record, _) = broker.take(&broker.config.records_queue, 1).await.remove(0);
    let key = record["tracks"][0]["archive"]["key"]
        .as_str()
        .unwrap()
        .to_owned();
    // An upload of the same object no journal knows, with a part.
    moto.open_upload("school-two", &key).await;
    assert_eq!(moto.uploads("school-two").await, vec![key.clone()]);
    broker
        .publish(&lesson, callback_headers(None, None, Some(&two)))
        .await;
    let (again, _) = broker.take(&broker.config.records_queue, 1).await.remove(0);
    worker.stop().await;
    assert_eq!(again, record);
    assert_eq!(moto.uploads("school-two").await, Vec::<String>::new());
    assert_eq!(
        metric(&metrics, "lesson_replay_orphan_uploads_aborted_total"),
        1
    );
    assert!(
        common::s3::keys(&s3.client(), "school-default")
            .await
            .is_empty(),
        "the default store holds nothing of app two"
    );
    broker.cleanup().await;
}
