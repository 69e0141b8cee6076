//! Nothing left behind by a killed worker: the multipart uploads a crash
//! leaves open are aborted when the lesson is processed again — found
//! through the worker's upload journal (s3s-fs has no upload listing) and
//! through the store's `ListMultipartUploads` (moto's server has one) — and
//! the bucket's lifecycle rule, the backstop, is applied by a command.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::messages::one_camera;
use common::moto::MotoServer;
use common::origin::{Faults, Origin};
use common::s3::{S3Server, journal_entries, keys};
use common::{Broker, WorkerProcess, isolated_config, metric, spawn_worker_with};
use lapin::types::FieldTable;
use lesson_replay::media::archive::{JOURNAL_RULE, LIFECYCLE_RULE};
use lesson_replay::service::endpoints::Health;
use lesson_replay::telemetry::metrics::Metrics;
use md5::{Digest, Md5};

const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_uploads_are_aborted_when_its_lessons_come_back() {
    let s3 = S3Server::start("school");
    let origin = Origin::start().await;
    let mut config = isolated_config("orphans");
    s3.configure(&mut config, "school");
    config.s3_part_size_bytes = 5 * MIB;
    config.concurrency = 3;
    // A journal entry is its owner's lease, held one part deadline: short
    // here, so the dead worker's leases run out within the test.
    config.s3_part_timeout_secs = 3;
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
    let mut worker = WorkerProcess::start(&broker.config);
    let deadline = Instant::now() + Duration::from_secs(60);
    while journal_entries(&client, "school").await.len() < lessons {
        assert!(Instant::now() < deadline, "the uploads did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.kill();
    // The positive control: a crash leaves its uploads open (their parts in
    // the store), one journal entry each.
    assert!(!s3.incomplete_uploads().is_empty(), "parts after SIGKILL");
    assert_eq!(journal_entries(&client, "school").await.len(), lessons);

    for i in 0..lessons {
        origin.add(&format!("/l{i}.mp4"), big.clone(), Faults::default());
    }
    let metrics = Metrics::default();
    let worker = spawn_worker_with(broker.config.clone(), Health::default(), metrics.clone()).await;
    let records = broker.take(&broker.config.records_queue, lessons).await;
    // The dead worker's uploads are aborted once their leases run out: by
    // the lesson's own sweep, or the worker's timed sweep of the journal.
    common::wait_until(
        "the dead worker's uploads are aborted",
        Duration::from_secs(30),
        || metric(&metrics, "lesson_replay_orphan_uploads_aborted_total") >= lessons as u64,
    )
    .await;
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
        journal_entries(&client, "school").await,
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

/// The uploads s3s-fs holds in its root, by id: whether the upload itself
/// is there (`.upload-<id>.json`), and how many part files it has
/// (`.upload_id-<id>.part-<n>`).
fn on_disk(s3: &S3Server) -> BTreeMap<String, (bool, usize)> {
    let mut uploads: BTreeMap<String, (bool, usize)> = BTreeMap::new();
    for name in s3.incomplete_uploads() {
        if let Some(id) = name
            .strip_prefix(".upload-")
            .and_then(|n| n.strip_suffix(".json"))
        {
            uploads.entry(id.to_owned()).or_default().0 = true;
        } else if let Some(id) = name
            .strip_prefix(".upload_id-")
            .and_then(|n| n.split(".part-").next())
        {
            uploads.entry(id.to_owned()).or_default().1 += 1;
        }
    }
    uploads
}

/// Whether a kill now would land mid-part: every upload is journaled (an
/// entry's name is the MD5 of its upload id), none is being completed (its
/// parts still there, the upload gone), and none has three or more of its
/// five parts written (its completion could begin before the kill lands).
fn mid_part(s3: &S3Server, entries: &[String]) -> bool {
    on_disk(s3).iter().all(|(id, (open, parts))| {
        let named = hex::encode(Md5::digest(id.as_bytes()));
        *open && *parts < 3 && entries.iter().any(|e| e.ends_with(&named))
    })
}

/// The run that once left parts behind, in small: two workers, every lesson
/// sent twice (the duplicates running side by side on the two workers), and
/// each worker SIGKILLed in turn while parts are in flight. Every lesson
/// gets its record with the right bytes, and in the end the store holds no
/// part file and the journal no entry (an open upload may stay only when a
/// kill met its creation: empty, and unknown to the journal): live uploads
/// were left to their owners, dead ones aborted once their leases ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_and_kills_mid_part_leave_no_part_behind() {
    let s3 = S3Server::start("school");
    let origin = Origin::start().await;
    let mut config = isolated_config("orphans-chaos");
    s3.configure(&mut config, "school");
    config.s3_part_size_bytes = 5 * MIB;
    config.s3_upload_concurrency = 8;
    config.concurrency = 4;
    // Leases of 10 s (two part deadlines), renewed every 1.7 s: short
    // enough for the test, long enough that a worker starved of CPU on a
    // busy machine keeps its own.
    config.s3_part_timeout_secs = 5;
    config.retry_delays_secs = vec![1, 2, 3];
    let broker = Broker::new(config).await;
    let lessons = 6;
    let size = 24 * MIB;
    let paced = Faults {
        chunk_delay: Some(Duration::from_millis(1)),
        ..Faults::default()
    };
    let mut bodies = Vec::new();
    for i in 0..lessons {
        let mut bytes = common::origin::noise(size);
        bytes[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let url = origin.add(&format!("/c{i}.mp4"), bytes.clone(), paced.clone());
        let body = one_camera(&format!("chaos-{i}"), 7, &url, size);
        bodies.push((body, hex::encode(Md5::digest(&bytes))));
    }
    for (body, _) in bodies.iter().chain(bodies.iter()) {
        broker.publish(body, FieldTable::default()).await;
    }
    let client = s3.client();
    // Each worker's log, kept past its kill.
    let mut logs = Vec::new();
    let mut start = || {
        let mut worker =
            WorkerProcess::start_with(&broker.config, "info", std::process::Stdio::piped());
        logs.push(worker.log_lines());
        worker
    };
    let mut first = start();
    let mut second = start();
    // Kill each worker in turn with uploads under way, and start it again.
    for round in 0..2 {
        // Mid-part: not mid-completion (s3s-fs completes by deleting the
        // upload, then appending its parts one by one, and stops where its
        // client went away; what it has not appended then stays, and no
        // call can remove it), nor between starting an upload and
        // journaling it (one round trip, before any part: a store without
        // an upload listing cannot show that upload to anyone). The docs
        // say what those two windows leave.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let entries = journal_entries(&client, "school").await;
            if entries.len() >= 2 && s3.incomplete_uploads().len() >= 4 && mid_part(&s3, &entries) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: no uploads under way"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let killed = if round == 0 { &mut first } else { &mut second };
        killed.kill();
        *killed = start();
    }
    let mut seen = std::collections::HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while seen.len() < lessons {
        assert!(Instant::now() < deadline, "records: {}", seen.len());
        if let Some((record, _)) = broker
            .next(&broker.config.records_queue, Duration::from_millis(200))
            .await
        {
            let task = record["task_id"].as_str().unwrap().to_owned();
            seen.insert(task, record);
        }
    }
    for (i, (_, md5)) in bodies.iter().enumerate() {
        let record = &seen[&format!("chaos-{i}")];
        assert_eq!(record["tracks"][0]["archive"]["md5"], md5.as_str());
        let key = record["tracks"][0]["archive"]["key"].as_str().unwrap();
        let stored = common::s3::object(&client, "school", key).await;
        assert_eq!(&hex::encode(Md5::digest(&stored)), md5, "{key}");
    }
    // The dead workers' uploads are aborted once their leases run out. A
    // kill can still meet a create in flight: s3s-fs makes the upload after
    // its client died, no entry ever names it, and nothing can find it on a
    // store without an upload listing (docs/operations.md, promise 10). It
    // holds no part (parts wait for the entry): only such empty uploads may
    // stay, and no part file at all.
    let empty = |uploads: &BTreeMap<String, (bool, usize)>| {
        uploads.values().all(|(open, parts)| *open && *parts == 0)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (uploads, entries) = (on_disk(&s3), journal_entries(&client, "school").await);
        if empty(&uploads) && entries.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: uploads (open, parts) {uploads:?}, journal entries {entries:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    first.terminate();
    second.terminate();
    assert!(first.wait_exit(Duration::from_secs(30)).success());
    assert!(second.wait_exit(Duration::from_secs(30)).success());
    let uploads = on_disk(&s3);
    assert!(empty(&uploads), "parts left: {uploads:?}");
    if !uploads.is_empty() {
        eprintln!("empty uploads a kill met in creation: {uploads:?}");
    }
    // No live upload was aborted from outside: no delivery found its upload
    // refused because another had finished the key first.
    let overtaken: Vec<String> = logs
        .iter()
        .flat_map(|lines| lines.try_iter())
        .filter(|l| l.contains("another delivery finished it first"))
        .collect();
    assert_eq!(overtaken, Vec::<String>::new(), "live uploads aborted");
    broker.cleanup().await;
}

/// An abandoned upload that aborts cannot clear: the state a killed client
/// leaves when s3s-fs was completing (the upload gone, later parts still on
/// disk, no call able to remove them). The sweep aborts an ordinary
/// abandoned upload beside it, but this one it counts as left, keeps its
/// journal entry for the next sweep, and never calls it clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_the_store_keeps_are_counted_and_stay_journaled() {
    use lesson_replay::media::archive::Archiver;
    let s3 = S3Server::start("school");
    let mut config = isolated_config("orphans-left");
    s3.configure(&mut config, "school");
    let metrics = Metrics::default();
    let archiver = Archiver::new(&config.media_settings().archive.unwrap(), metrics.clone()).await;
    let client = s3.client();
    // Two uploads of two objects, a part each, journaled by a worker whose
    // lease ran out long ago.
    let mut entries = Vec::new();
    let mut ids = Vec::new();
    for name in ["cut", "plain"] {
        let key = format!("lesson-replay/1/2/{name}/camera-u-t.mp4");
        let id = client
            .create_multipart_upload()
            .bucket("school")
            .key(&key)
            .send()
            .await
            .unwrap()
            .upload_id()
            .unwrap()
            .to_owned();
        client
            .upload_part()
            .bucket("school")
            .key(&key)
            .upload_id(&id)
            .part_number(1)
            .body(vec![7u8; MIB].into())
            .send()
            .await
            .unwrap();
        let md5 = |text: &str| hex::encode(Md5::digest(text.as_bytes()));
        let entry = format!(
            "lesson-replay/.lesson-replay-uploads/{}/{}",
            md5(&key),
            md5(&id)
        );
        let body = serde_json::json!({"key": key, "upload_id": id, "lease_until_ms": 1});
        client
            .put_object()
            .bucket("school")
            .key(&entry)
            .body(body.to_string().into_bytes().into())
            .send()
            .await
            .unwrap();
        entries.push(entry);
        ids.push(id);
    }
    // The first one's completion was cut short: the upload is gone, its part stays.
    std::fs::remove_file(s3.root.join(format!(".upload-{}.json", ids[0]))).unwrap();

    assert_eq!(archiver.sweep_journal().await, 1, "the plain one aborted");
    assert_eq!(
        metric(&metrics, "lesson_replay_orphan_uploads_left_total"),
        1
    );
    assert_eq!(
        metric(&metrics, "lesson_replay_orphan_uploads_aborted_total"),
        1
    );
    let left = keys(&client, "school").await;
    assert_eq!(
        left,
        vec![entries[0].clone()],
        "only the cut one's entry stays"
    );
    assert_eq!(
        s3.incomplete_uploads(),
        vec![format!(".upload_id-{}.part-1", ids[0])]
    );
    // The next sweep tries again, and counts again: the alert stays while
    // the parts do.
    assert_eq!(archiver.sweep_journal().await, 0);
    assert_eq!(
        metric(&metrics, "lesson_replay_orphan_uploads_left_total"),
        2
    );
}
