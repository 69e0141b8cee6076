//! The worker end to end with real parts: RabbitMQ, the test VOD origin and an
//! s3s-fs bucket. Records come out with `probe` and `archive` filled, the
//! bucket holds verified copies and a manifest equal to the record, and a
//! redelivery costs no second download or upload.

mod common;

use std::time::Duration;

use common::messages::{FASTSTART, MOOV_AT_END, finished, video};
use common::origin::{Faults, Origin};
use common::s3::S3Server;
use common::{Broker, assert_valid_record, header, isolated_config, metric, spawn_worker};
use lesson_replay::broker::headers::callback_headers;
use lesson_replay::telemetry::metrics::Metrics;
use md5::{Digest, Md5};
use serde_json::Value;

// Long on purpose: one lesson end to end, then its redelivery, against
// the same bucket; the second half only means something after the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recordings_are_archived_verified_and_not_uploaded_twice() {
    let s3 = S3Server::start("school");
    let origin = Origin::start().await;
    let mut config = isolated_config("archive-e2e");
    s3.configure(&mut config, "school");
    config.probe = true;
    let broker = Broker::new(config).await;
    let worker = spawn_worker(broker.config.clone()).await;

    // The camera's origin is busy at first; its owner's id is hostile.
    let camera = origin.add(
        "/cam.mp4",
        FASTSTART.to_vec(),
        Faults {
            fail_first: 2,
            ..Faults::default()
        },
    );
    let board = origin.add("/board.mp4", MOOV_AT_END.to_vec(), Faults::default());
    let body = finished(
        "task-archive",
        42,
        vec![
            video(
                &camera,
                "cam1",
                0,
                "../../../escape/teacher",
                FASTSTART.len(),
                2000,
                0,
            ),
            // Declared 4 s, the file lasts 5 s: the probe wins.
            video(&board, "board1", 2, "", MOOV_AT_END.len(), 4000, 500),
        ],
    );
    broker
        .publish(&body, callback_headers(None, None, Some("1400000001")))
        .await;
    let (record, _) = broker.take(&broker.config.records_queue, 1).await.remove(0);
    assert_valid_record(&record);
    let replay_id = record["replay_id"].as_str().unwrap().to_owned();
    let folder = format!("lesson-replay/1400000001/42/{replay_id}/");

    let client = s3.client();
    for (t, source) in record["tracks"]
        .as_array()
        .unwrap()
        .iter()
        .zip([FASTSTART, MOOV_AT_END])
    {
        let probe = &t["probe"];
        assert!(probe["duration_ms"].as_i64().unwrap() > 1900, "{t:#}");
        let archive = &t["archive"];
        let key = archive["key"].as_str().unwrap();
        assert!(
            key.starts_with(&folder) && !key[folder.len()..].contains('/') && !key.contains(".."),
            "{key}"
        );
        assert_eq!(archive["md5"], hex::encode(Md5::digest(source)));
        assert_eq!(archive["size_bytes"], source.len());
        assert_eq!(archive["uri"], format!("s3://school/{key}"));
        let bytes = common::s3::object(&client, "school", key).await;
        assert!(
            bytes == source,
            "{key}: archived bytes differ from the origin's"
        );
    }
    assert_eq!(record["tracks"][0]["probe"]["width"], 320);
    assert_eq!(
        record["tracks"][1]["duration_ms"].as_i64().unwrap() / 100,
        50
    );
    assert!(
        record["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["code"] == "duration_probed")
    );

    let manifest = client
        .get_object()
        .bucket("school")
        .key(format!("{folder}manifest.json"))
        .send()
        .await
        .unwrap();
    let manifest: Value =
        serde_json::from_slice(&manifest.body.collect().await.unwrap().into_bytes()).unwrap();
    assert_eq!(
        manifest, record,
        "manifest.json equals the published record"
    );

    // The same callback again (TIC retries): same record, no download, no upload.
    let requests_before = origin.requests();
    broker
        .publish(&body, callback_headers(None, None, Some("1400000001")))
        .await;
    let (again, properties) = broker.take(&broker.config.records_queue, 1).await.remove(0);
    assert_eq!(again, record);
    assert_eq!(
        properties.message_id().as_ref().unwrap().as_str(),
        replay_id
    );
    assert_eq!(
        origin.requests(),
        requests_before,
        "the redelivery read nothing from the origin"
    );
    worker.stop().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_archiving_every_track_is_probed_by_range_reads() {
    let origin = Origin::start().await;
    let mut config = isolated_config("probe-only");
    config.probe = true;
    let broker = Broker::new(config).await;
    let worker = spawn_worker(broker.config.clone()).await;
    let board = origin.add("/board.mp4", MOOV_AT_END.to_vec(), Faults::default());
    let html = origin.add(
        "/page.mp4",
        b"<html>oops</html>".to_vec(),
        Faults::default(),
    );
    let body = finished(
        "task-probe",
        42,
        vec![
            video(&board, "b", 2, "", MOOV_AT_END.len() + 1, 5000, 0),
            video(&html, "h", 0, "u", 17, 1000, 0),
        ],
    );
    broker.publish(&body, Default::default()).await;
    let (record, _) = broker.take(&broker.config.records_queue, 1).await.remove(0);
    assert_valid_record(&record);
    let board = record["tracks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["track_id"] == "b")
        .unwrap();
    assert_eq!(board["probe"]["width"], 160);
    assert!(board["archive"].is_null());
    let codes: Vec<&str> = record["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["code"].as_str().unwrap())
        .collect();
    assert!(codes.contains(&"size_mismatch"), "{codes:?}");
    assert!(
        codes.contains(&"probe_failed"),
        "not an MP4: a warning, not a crash: {codes:?}"
    );
    worker.stop().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_fetch_failures_are_parked_with_their_reason() {
    let s3 = S3Server::start("school");
    let origin = Origin::start().await;
    let mut config = isolated_config("fetch-park");
    s3.configure(&mut config, "school");
    config.max_file_bytes = 100_000;
    let broker = Broker::new(config).await;
    let worker = spawn_worker(broker.config.clone()).await;

    let missing = format!("{}/gone.mp4", origin.base);
    broker
        .publish(
            &finished(
                "t-404",
                42,
                vec![video(&missing, "g", 0, "u", 100, 1000, 0)],
            ),
            Default::default(),
        )
        .await;
    let board = origin.add("/board.mp4", MOOV_AT_END.to_vec(), Faults::default());
    broker
        .publish(
            &finished(
                "t-size",
                42,
                vec![video(&board, "b", 2, "", MOOV_AT_END.len() - 1, 5000, 0)],
            ),
            Default::default(),
        )
        .await;

    // Above max_file_bytes, announced honestly or not: refused either way.
    let big = common::origin::noise(200_000);
    let large = origin.add("/large.mp4", big.clone(), Faults::default());
    for (task, declared) in [("t-large", big.len()), ("t-large-understated", 1000)] {
        let body = finished(
            task,
            42,
            vec![video(&large, "l", 0, "u", declared, 5000, 0)],
        );
        broker.publish(&body, Default::default()).await;
    }

    let parked = broker.take(&broker.config.parking_queue, 4).await;
    let mut reasons: Vec<String> = parked
        .iter()
        .map(|(_, p)| header(p, "x-lesson-replay-reason").unwrap())
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            "file_too_large",
            "file_too_large",
            "size_mismatch",
            "vod_not_found"
        ]
    );
    worker.stop().await;
    assert_eq!(broker.depth(&broker.config.records_queue).await, 0);
    broker.assert_settled().await;
    broker.cleanup().await;
}

/// Store faults no retry can fix reach an operator at once: parked on the
/// first attempt with a reason of their own, not sent through the delay tiers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_refusing_the_credentials_parks_at_once_as_denied() {
    let mut s3 = S3Server::start("school");
    let origin = Origin::start().await;
    let mut config = isolated_config("store-refusals");
    s3.configure(&mut config, "school");
    let broker = Broker::new(config).await;
    let worker = spawn_worker(broker.config.clone()).await;
    // Past its start-up check of the bucket.
    worker.wait_ready().await;
    let board = origin.add("/board.mp4", MOOV_AT_END.to_vec(), Faults::default());
    let lesson = |task: &str| {
        finished(
            task,
            42,
            vec![video(&board, "b", 2, "", MOOV_AT_END.len(), 5000, 0)],
        )
    };

    // The store's keys are rotated under the running worker. (s3s-fs
    // recreates a deleted bucket on upload, so a bucket vanishing at run time
    // cannot be staged here; the start-up check's NoSuchBucket is tested in
    // tests/fetch_archive.rs, its classification in media::s3_error.)
    s3.restart_with_secret("rotated-secret");
    broker
        .publish(&lesson("t-denied"), Default::default())
        .await;
    let (_, parked) = broker.take(&broker.config.parking_queue, 1).await.remove(0);
    assert_eq!(
        header(&parked, "x-lesson-replay-reason").as_deref(),
        Some("archive_denied")
    );
    assert_eq!(
        header(&parked, "x-lesson-replay-attempt").as_deref(),
        Some("1")
    );
    worker.stop().await;

    // Neither went through a delay tier, and no record was published.
    for delay in &broker.config.retry_delays_secs {
        let tier = format!("{}.retry.{delay}s", broker.config.work_queue);
        assert_eq!(broker.depth(&tier).await, 0, "{tier}");
    }
    assert_eq!(broker.depth(&broker.config.records_queue).await, 0);
    broker.cleanup().await;
}

/// Wrong credentials stop the worker at start-up, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_refused_credentials_does_not_start() {
    let s3 = S3Server::start("school");
    let mut config = isolated_config("refused-start");
    s3.configure(&mut config, "school");
    config.s3_secret_access_key = Some("wrong".to_owned().into());
    let service =
        lesson_replay::service::run::Service::bind(config, Default::default(), Default::default())
            .await
            .unwrap();
    let stopped = tokio::time::timeout(
        Duration::from_secs(30),
        service.run_worker(std::future::pending()),
    )
    .await
    .expect("start-up fails fast");
    let error = stopped.expect_err("refused credentials stop the start-up");
    let message = error.to_string();
    assert!(message.contains("HTTP 403"), "{message}");
    assert!(message.contains("\"school\""), "{message}");
    assert!(
        !message.contains("wrong"),
        "the secret is echoed: {message}"
    );
}

/// A download that fails after parts were uploaded: the worker aborts its own
/// multipart upload before the message goes to a delay tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_aborts_the_upload_of_a_failed_download() {
    let s3 = S3Server::start("school");
    let origin = Origin::start().await;
    let mut config = isolated_config("own-abort");
    s3.configure(&mut config, "school");
    config.s3_part_size_bytes = 5 * 1024 * 1024;
    config.fetch_attempts = 1;
    config.retry_delays_secs = vec![600];
    let broker = Broker::new(config).await;
    let metrics = lesson_replay::telemetry::metrics::Metrics::default();
    let worker =
        common::spawn_worker_with(broker.config.clone(), Default::default(), metrics.clone()).await;
    // Cut after 7 MiB, without a validator to resume with: a transient failure.
    // Two cut responses: the first range answer (5 MiB, not cut) has no
    // validator, so the file is asked again whole, and that answer is cut.
    let cut = Faults {
        cut_after: Some(7 * 1024 * 1024),
        cuts: 2,
        no_validator: true,
        ..Faults::default()
    };
    let body = common::origin::noise(12 * 1024 * 1024);
    let url = origin.add("/cut.mp4", body.clone(), cut);
    broker
        .publish(
            &finished(
                "t-cut",
                42,
                vec![video(&url, "c", 0, "u", body.len(), 5000, 0)],
            ),
            Default::default(),
        )
        .await;
    let tier = format!("{}.retry.600s", broker.config.work_queue);
    common::wait_until(
        "the message waits in its tier",
        Duration::from_secs(30),
        || {
            metrics
                .render()
                .contains(r#"lesson_replay_retries_total{tier="600s"} 1"#)
        },
    )
    .await;
    worker.stop().await;
    // The control: the upload had begun (its parts in flight are stopped
    // with it), and was aborted.
    let count = |op: &str| {
        common::metric(
            &metrics,
            &format!(r#"lesson_replay_s3_request_duration_seconds_count{{operation="{op}"}}"#),
        )
    };
    assert!(count("create_upload") >= 1, "an upload had begun");
    assert!(count("abort") >= 1, "and was aborted");
    let leftovers = s3.incomplete_uploads();
    assert!(
        leftovers.is_empty(),
        "the worker left its upload behind: {leftovers:?}"
    );
    assert_eq!(broker.depth(&tier).await, 1);
    broker.cleanup().await;
}

/// `s3_payload_signing = unsigned`: parts and small files go as
/// `UNSIGNED-PAYLOAD` (no SHA-256 of every byte); the store accepts them and
/// the stored bytes are exactly the origin's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_payloads_store_the_same_bytes() {
    use lesson_replay::config::settings::PayloadSigning;
    let s3 = S3Server::start("school");
    let origin = Origin::start().await;
    let mut config = isolated_config("unsigned");
    s3.configure(&mut config, "school");
    config.s3_payload_signing = PayloadSigning::Unsigned;
    config.s3_part_size_bytes = 5 * 1024 * 1024;
    let broker = Broker::new(config).await;
    let worker = spawn_worker(broker.config.clone()).await;
    let big: Vec<u8> = (0..12 * 1024 * 1024u32).map(|i| (i % 241) as u8).collect();
    let files = [big, FASTSTART.to_vec()];
    let videos = files
        .iter()
        .enumerate()
        .map(|(i, bytes)| {
            let url = origin.add(&format!("/u{i}.mp4"), bytes.clone(), Faults::default());
            video(
                &url,
                &format!("u{i}"),
                0,
                &format!("user{i}"),
                bytes.len(),
                2000,
                0,
            )
        })
        .collect();
    broker
        .publish(&finished("unsigned", 7, videos), Default::default())
        .await;
    let (record, _) = broker.take(&broker.config.records_queue, 1).await.remove(0);
    worker.stop().await;
    let client = s3.client();
    for (track, bytes) in record["tracks"].as_array().unwrap().iter().zip(&files) {
        let key = track["archive"]["key"].as_str().unwrap();
        let stored = common::s3::object(&client, "school", key).await;
        assert!(stored == *bytes, "{key}: the stored bytes differ");
        assert_eq!(track["archive"]["md5"], hex::encode(Md5::digest(bytes)));
    }
    broker.cleanup().await;
}

/// A lesson one of whose tracks is gone for good is parked; the copies of
/// its other tracks, archived first, are deleted with their records: no
/// manifest would ever name them. One track at a time, so the good track is
/// archived whole before the gone one fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_track_gone_for_good_parks_the_lesson_and_deletes_its_other_copies() {
    let s3 = S3Server::start("school");
    let origin = Origin::start().await;
    let mut config = isolated_config("track-gone");
    s3.configure(&mut config, "school");
    config.s3_part_size_bytes = 5 * 1024 * 1024;
    config.archive_parallel_tracks = 1;
    let broker = Broker::new(config).await;
    let metrics = lesson_replay::telemetry::metrics::Metrics::default();
    let worker =
        common::spawn_worker_with(broker.config.clone(), Default::default(), metrics.clone()).await;
    let big = common::origin::noise(11 * 1024 * 1024);
    let good = origin.add("/good.mp4", big.clone(), Faults::default());
    let small = origin.add("/small.mp4", FASTSTART.to_vec(), Faults::default());
    let gone = format!("{}/gone.mp4", origin.base);
    let body = finished(
        "t-gone",
        42,
        vec![
            video(&good, "good", 0, "u1", big.len(), 5000, 0),
            video(&small, "small", 0, "u2", FASTSTART.len(), 2000, 0),
            video(&gone, "gone", 0, "u3", 100, 1000, 0),
        ],
    );
    broker.publish(&body, Default::default()).await;
    let (_, parked) = broker.take(&broker.config.parking_queue, 1).await.remove(0);
    assert_eq!(
        header(&parked, "x-lesson-replay-reason").as_deref(),
        Some("vod_not_found")
    );
    worker.stop().await;
    assert!(
        common::metric(&metrics, "lesson_replay_uploaded_bytes_total") >= big.len() as u64,
        "the good track was archived before the gone one failed"
    );
    let client = s3.client();
    let listed = client
        .list_objects_v2()
        .bucket("school")
        .send()
        .await
        .unwrap();
    let left: Vec<&str> = listed
        .contents()
        .iter()
        .filter_map(|o| o.key())
        .filter(|k| !k.contains("/.lesson-replay-uploads/"))
        .collect();
    assert!(
        left.is_empty(),
        "copies of a parked lesson remain: {left:?}"
    );
    assert!(s3.incomplete_uploads().is_empty());
    broker.cleanup().await;
}

/// A duplicate delivery of a lesson finishes its key first while the
/// worker's own upload of it has parts in flight (eight at once), then
/// sweeps for orphans. The worker's upload is alive (its owner holds the
/// journal entry's lease): the sweep leaves it alone. Aborting it, as the
/// sweep once did, let parts in flight land after the abort, where nothing
/// can remove them (s3s-fs keeps them; AWS warns of the same). The worker
/// finishes its upload of the same bytes and publishes; nothing is left: no
/// part, no open upload, no journal entry. Here the test plays the
/// duplicate, with the worker's own library, while the worker's upload is
/// under way.
async fn a_duplicate_finishing_first_leaves_nothing_behind(
    store: &str,
    endpoint: &str,
    uploads_under_way: impl Fn() -> bool,
) {
    use lesson_replay::decision::decide::{Decision, decide};
    use lesson_replay::media::archive::{Archiver, transfer};
    use lesson_replay::media::fetch::Fetcher;
    let origin = Origin::start().await;
    let mut config = isolated_config(&format!("overtaken-{store}"));
    common::s3::configure_store(&mut config, endpoint, "school");
    config.s3_part_size_bytes = 5 * 1024 * 1024;
    config.s3_upload_concurrency = 8;
    let file = common::origin::noise(40 * 1024 * 1024);
    let slow = Faults {
        chunk_delay: Some(Duration::from_millis(1)),
        ..Faults::default()
    };
    let url = origin.add("/lesson.mp4", file.clone(), slow);
    let fast = origin.add("/same-bytes.mp4", file.clone(), Faults::default());
    let body = finished(
        "t-overtaken",
        42,
        vec![video(&url, "cam", 0, "u1", file.len(), 5000, 0)],
    );
    // The key the worker uploads to, as it computes it.
    let Decision::Publish(normalized) = decide(&body, &Default::default(), &config.input_policy())
    else {
        panic!("the lesson is publishable");
    };
    let media = config.media_settings();
    let sweeper = Metrics::default();
    let archiver = Archiver::new(&media.archive.clone().unwrap(), sweeper.clone()).await;
    let key = archiver.track_key(&normalized.record, &normalized.record.tracks[0]);

    let broker = Broker::new(config.clone()).await;
    let metrics = Metrics::default();
    let worker = common::spawn_worker_with(
        broker.config.clone(),
        lesson_replay::service::endpoints::Health::default(),
        metrics.clone(),
    )
    .await;
    broker.publish(&body, Default::default()).await;
    common::wait_until(
        "the worker's upload is under way",
        Duration::from_secs(30),
        uploads_under_way,
    )
    .await;
    // The duplicate: the same bytes, archived to the same key, then the sweep.
    let fetcher = Fetcher::new(media.fetch, Metrics::default()).unwrap();
    let mut upload = archiver.upload(key.clone());
    let copied = transfer::copy(&fetcher, &fast, Some(file.len() as i64), &mut upload)
        .await
        .unwrap();
    upload
        .finish(&copied.md5, copied.probe.as_ref().ok())
        .await
        .unwrap();
    assert_eq!(
        archiver.abort_orphans(&key).await,
        0,
        "the sweep aborted the worker's live upload"
    );

    let (record, _) = broker.take(&broker.config.records_queue, 1).await.remove(0);
    assert_eq!(record["tracks"][0]["archive"]["key"], key.as_str());
    assert_eq!(
        record["tracks"][0]["archive"]["md5"],
        hex::encode(Md5::digest(&file))
    );
    worker.stop().await;
    assert_eq!(
        broker.depth(&broker.config.parking_queue).await,
        0,
        "not parked"
    );
    // The object holds the lesson's bytes, whoever completed it last.
    let client = common::s3::client_for(endpoint);
    let stored = common::s3::object(&client, "school", &key).await;
    assert_eq!(
        hex::encode(Md5::digest(&stored)),
        hex::encode(Md5::digest(&file))
    );
    assert_eq!(
        common::s3::journal_entries(&client, "school").await,
        Vec::<String>::new(),
        "journal entries left"
    );
    for metrics in [&metrics, &sweeper] {
        assert_eq!(
            metric(metrics, "lesson_replay_orphan_uploads_left_total"),
            0
        );
    }
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_finishing_first_leaves_nothing_behind_on_s3s_fs() {
    let s3 = S3Server::start("school");
    let root = s3.root.clone();
    a_duplicate_finishing_first_leaves_nothing_behind("s3s", &s3.endpoint, move || {
        std::fs::read_dir(&root).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".upload")
        })
    })
    .await;
    assert_eq!(
        s3.incomplete_uploads(),
        Vec::<String>::new(),
        "parts or uploads left in the store"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_finishing_first_leaves_nothing_behind_on_moto() {
    let moto = common::moto::MotoServer::start("school").await;
    let client = moto.client();
    let under_way = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch = under_way.clone();
    let lister = client.clone();
    let watcher = tokio::spawn(async move {
        loop {
            let listed = lister
                .list_multipart_uploads()
                .bucket("school")
                .send()
                .await;
            if listed.is_ok_and(|l| !l.uploads().is_empty()) {
                watch.store(true, std::sync::atomic::Ordering::SeqCst);
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let seen = under_way.clone();
    a_duplicate_finishing_first_leaves_nothing_behind("moto", &moto.endpoint, move || {
        seen.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    watcher.abort();
    let open = client
        .list_multipart_uploads()
        .bucket("school")
        .send()
        .await
        .unwrap();
    assert!(open.uploads().is_empty(), "uploads left open: {open:?}");
}
