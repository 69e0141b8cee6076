//! Nothing left behind by a killed worker: the multipart uploads a crash
//! leaves open are aborted when the lesson is processed again — found
//! through the worker's upload journal (s3s-fs has no upload listing) and
//! through the store's `ListMultipartUploads` (moto's server has one) — and
//! the bucket's lifecycle rule, the backstop, is applied by a command.

mod common;

use std::time::{Duration, Instant};

use common::messages::one_camera;
use common::moto::MotoServer;
use common::origin::{Faults, Origin};
use common::s3::S3Server;
use common::{Broker, WorkerProcess, isolated_config, metric, spawn_worker_with};
use lapin::types::FieldTable;
use lesson_replay::media::archive::{JOURNAL_RULE, LIFECYCLE_RULE};
use lesson_replay::service::endpoints::Health;
use lesson_replay::telemetry::metrics::Metrics;
use md5::{Digest, Md5};

const MIB: usize = 1024 * 1024;

/// Every key in `bucket`.
async fn keys(client: &aws_sdk_s3::Client, bucket: &str) -> Vec<String> {
    let listed = client
        .list_objects_v2()
        .bucket(bucket)
        .send()
        .await
        .unwrap();
    let mut keys: Vec<String> = listed
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_owned))
        .collect();
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_uploads_are_aborted_when_its_lessons_come_back() {
    let s3 = S3Server::start("school");
    let origin = Origin::start().await;
    let mut config = isolated_config("orphans");
    s3.configure(&mut config, "school");
    config.s3_part_size_bytes = 5 * MIB;
    config.concurrency = 3;
    let broker = Broker::new(config).await;
    // 12 MiB at about 1.6 MB/s each: a part is uploaded long before the end.
    let big: Vec<u8> = (0..12 * MIB as u32).map(|i| (i % 251) as u8).collect();
    let slow = Faults {
        chunk_delay: Some(Duration::from_millis(10)),
        ..Faults::default()
    };
    let lessons = 3;
    for i in 0..lessons {
        let url = origin.add(&format!("/l{i}.mp4"), big.clone(), slow.clone());
        let body = one_camera(&format!("orphan-{i}"), 7, &url, big.len());
        broker.publish(&body, FieldTable::default()).await;
    }

    let client = s3.client();
    let journal = |keys: Vec<String>| -> Vec<String> {
        keys.into_iter()
            .filter(|k| k.contains("/.lesson-replay-uploads/"))
            .collect()
    };
    let mut worker = WorkerProcess::start(&broker.config);
    let deadline = Instant::now() + Duration::from_secs(60);
    while journal(keys(&client, "school").await).len() < lessons {
        assert!(Instant::now() < deadline, "the uploads did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.kill();
    // The positive control: a crash leaves its uploads open (their parts in
    // the store), one journal entry each.
    assert!(!s3.incomplete_uploads().is_empty(), "parts after SIGKILL");
    assert_eq!(journal(keys(&client, "school").await).len(), lessons);

    for i in 0..lessons {
        origin.add(&format!("/l{i}.mp4"), big.clone(), Faults::default());
    }
    let metrics = Metrics::default();
    let worker = spawn_worker_with(broker.config.clone(), Health::default(), metrics.clone()).await;
    let records = broker.take(&broker.config.records_queue, lessons).await;
    worker.stop().await;

    let md5 = hex::encode(Md5::digest(&big));
    for (record, _) in &records {
        assert_eq!(record["tracks"][0]["archive"]["md5"], md5.as_str());
    }
    assert_eq!(
        s3.incomplete_uploads(),
        Vec::<String>::new(),
        "no upload left open, no stray part"
    );
    assert_eq!(
        metric(&metrics, "lesson_replay_orphan_uploads_aborted_total"),
        lessons as u64
    );
    let left = keys(&client, "school").await;
    assert_eq!(
        journal(left.clone()),
        Vec::<String>::new(),
        "the journal is empty"
    );
    // Exactly each lesson's track, page and manifest, and the track's object
    // record: nothing else in the bucket.
    let records = left
        .iter()
        .filter(|k| k.contains("/.lesson-replay-objects/"))
        .count();
    assert_eq!(records, lessons, "{left:?}");
    assert_eq!(left.len(), 4 * lessons, "{left:?}");
    broker.assert_settled().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_the_store_lists_is_aborted_even_without_a_journal_entry() {
    let moto = MotoServer::start("school").await;
    let origin = Origin::start().await;
    let mut config = isolated_config("orphans-listed");
    moto.configure(&mut config, "school");
    config.probe = true;
    let broker = Broker::new(config).await;
    let file = common::messages::FASTSTART.to_vec();
    let url = origin.add("/cam.mp4", file.clone(), Faults::default());
    let lesson = one_camera("listed", 7, &url, file.len());
    let metrics = Metrics::default();
    let worker = spawn_worker_with(broker.config.clone(), Health::default(), metrics.clone()).await;
    broker.publish(&lesson, FieldTable::default()).await;
    let (record, _) = broker.take(&broker.config.records_queue, 1).await.remove(0);
    let key = record["tracks"][0]["archive"]["key"]
        .as_str()
        .unwrap()
        .to_owned();

    // An upload of the same object that no journal knows (its worker died
    // between starting it and journaling it), with a part.
    moto.open_upload("school", &key).await;
    assert_eq!(moto.uploads("school").await, vec![key.clone()]);

    // The lesson again (TIC sends duplicates by design): found archived,
    // and the open upload of its key is aborted.
    broker.publish(&lesson, FieldTable::default()).await;
    let (again, _) = broker.take(&broker.config.records_queue, 1).await.remove(0);
    worker.stop().await;
    assert_eq!(again, record, "the same record");
    assert_eq!(moto.uploads("school").await, Vec::<String>::new());
    assert_eq!(
        metric(&metrics, "lesson_replay_orphan_uploads_aborted_total"),
        1
    );
    broker.cleanup().await;
}

/// `lesson-replay lifecycle` with `config`'s settings.
fn lifecycle(config: &lesson_replay::config::settings::Config, days: &str) -> std::process::Output {
    common::lesson_replay(config, &["lifecycle", "--days", days])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lifecycle_rules_join_the_buckets_own_rules() {
    use aws_sdk_s3::types::{
        BucketLifecycleConfiguration, ExpirationStatus, LifecycleExpiration, LifecycleRule,
        LifecycleRuleFilter,
    };
    let moto = MotoServer::start("school").await;
    let client = moto.client();
    let own = LifecycleRule::builder()
        .id("school-own")
        .status(ExpirationStatus::Enabled)
        .filter(LifecycleRuleFilter::builder().prefix("tmp/").build())
        .expiration(LifecycleExpiration::builder().days(30).build())
        .build()
        .unwrap();
    client
        .put_bucket_lifecycle_configuration()
        .bucket("school")
        .lifecycle_configuration(
            BucketLifecycleConfiguration::builder()
                .rules(own)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let mut config = isolated_config("lifecycle");
    moto.configure(&mut config, "school");

    for days in [2, 3] {
        let out = lifecycle(&config, &days.to_string());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rules = client
            .get_bucket_lifecycle_configuration()
            .bucket("school")
            .send()
            .await
            .unwrap()
            .rules()
            .to_vec();
        let mut ids: Vec<&str> = rules.iter().filter_map(|r| r.id()).collect();
        ids.sort();
        let mut want = vec!["school-own", LIFECYCLE_RULE, JOURNAL_RULE];
        want.sort();
        assert_eq!(ids, want, "applied twice: replaced, not added again");
        let ours = rules
            .iter()
            .find(|r| r.id() == Some(LIFECYCLE_RULE))
            .unwrap();
        assert_eq!(
            ours.abort_incomplete_multipart_upload()
                .and_then(|a| a.days_after_initiation()),
            Some(days)
        );
        assert_eq!(
            ours.filter().and_then(|f| f.prefix()),
            Some("lesson-replay/")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_without_lifecycle_rules_gets_a_clear_error() {
    let s3 = S3Server::start("school");
    let mut config = isolated_config("lifecycle-unsupported");
    s3.configure(&mut config, "school");
    let out = lifecycle(&config, "1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("lifecycle rules"), "{stderr}");
    assert!(!stderr.contains(common::s3::SECRET_KEY), "{stderr}");
}
