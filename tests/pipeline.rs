//! The archive pipeline against real servers on loopback (the test VOD
//! origin, s3s-fs, moto): parts read by ranges side by side, in one memory
//! budget, and its faults — a range cut, a file replaced half-way, a store
//! gone mid-upload, a store that never answers, a budget far smaller than the
//! uploads that share it.

mod common;

use std::time::Duration;

use common::isolated_config;
use common::moto::MotoServer;
use common::origin::{Faults, Origin, noise};
use common::s3::S3Server;
use lesson_replay::config::settings::Config;
use lesson_replay::media::archive::{Archiver, transfer};
use lesson_replay::media::fetch::{FetchError, Fetcher};
use lesson_replay::media::s3_error::S3Fault;
use lesson_replay::telemetry::metrics::Metrics;
use md5::{Digest, Md5};

const MIB: usize = 1024 * 1024;

fn md5_hex(bytes: &[u8]) -> String {
    hex::encode(Md5::digest(bytes))
}

/// 5 MiB parts, `concurrency` of them in flight per file.
fn config(test: &str, endpoint: &str, concurrency: usize) -> Config {
    let mut config = isolated_config(test);
    common::s3::configure_store(&mut config, endpoint, "lessons");
    config.s3_part_size_bytes = 5 * MIB;
    config.s3_upload_concurrency = concurrency;
    config.fetch_idle_timeout_secs = 5;
    config
}

async fn parts(config: &Config) -> (Fetcher, Archiver) {
    let media = config.media_settings();
    let fetcher = Fetcher::new(media.fetch, Metrics::default()).unwrap();
    let archiver = Archiver::new(&media.archive.unwrap(), Metrics::default()).await;
    archiver.check().await.unwrap();
    (fetcher, archiver)
}

async fn stored(s3: &S3Server, key: &str) -> Vec<u8> {
    common::s3::object(&s3.client(), "lessons", key).await
}

/// Slow enough (a pause per 16 KiB) that parts overlap if they can.
fn slow() -> Faults {
    Faults {
        chunk_delay: Some(Duration::from_millis(1)),
        ..Faults::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_is_read_by_ranges_side_by_side_and_stored_byte_for_byte() {
    let s3 = S3Server::start("lessons");
    let origin = Origin::start().await;
    let file = noise(23 * MIB);
    let url = origin.add("/big.mp4", file.clone(), slow());
    let (fetcher, archiver) = parts(&config("ranges", &s3.endpoint, 4)).await;

    let mut upload = archiver.upload("l/big.mp4".into());
    let download = transfer::copy(&fetcher, &url, Some(file.len() as i64), &mut upload)
        .await
        .unwrap();
    assert_eq!(download.md5, md5_hex(&file), "hashed in file order");
    assert_eq!(download.size, file.len() as u64);
    let archive = upload.finish(&download.md5, None).await.unwrap();
    assert_eq!(archive.size_bytes, file.len() as i64);
    assert!(
        stored(&s3, "l/big.mp4").await == file,
        "stored byte for byte"
    );
    assert_eq!(origin.requests(), 5, "one range request per 5 MiB part");
    assert!(
        origin.peak_concurrent() >= 2,
        "parts were read side by side (peak {})",
        origin.peak_concurrent()
    );
    let (found, _) = archiver
        .existing("l/big.mp4", Some(file.len() as i64))
        .await
        .unwrap()
        .expect("a redelivery finds the multipart copy without any copy of it");
    assert_eq!((found.md5, found.etag), (archive.md5, archive.etag));
    assert!(s3.incomplete_uploads().is_empty());
}

/// The control of the test above: one part in flight, one range at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_part_in_flight_ranges_are_read_one_at_a_time() {
    let s3 = S3Server::start("lessons");
    let origin = Origin::start().await;
    let file = noise(12 * MIB);
    let url = origin.add("/one.mp4", file.clone(), slow());
    let (fetcher, archiver) = parts(&config("one-range", &s3.endpoint, 1)).await;
    let mut upload = archiver.upload("l/one.mp4".into());
    let download = transfer::copy(&fetcher, &url, None, &mut upload)
        .await
        .unwrap();
    upload.finish(&download.md5, None).await.unwrap();
    assert_eq!(origin.peak_concurrent(), 1);
    assert!(stored(&s3, "l/one.mp4").await == file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_without_ranges_is_read_as_one_stream() {
    let s3 = S3Server::start("lessons");
    let origin = Origin::start().await;
    let file = noise(12 * MIB);
    let no_ranges = Faults {
        no_ranges: true,
        ..Faults::default()
    };
    let url = origin.add("/plain.mp4", file.clone(), no_ranges);
    let (fetcher, archiver) = parts(&config("no-ranges", &s3.endpoint, 4)).await;
    let mut upload = archiver.upload("l/plain.mp4".into());
    let download = transfer::copy(&fetcher, &url, None, &mut upload)
        .await
        .unwrap();
    upload.finish(&download.md5, None).await.unwrap();
    assert_eq!(origin.requests(), 1, "the whole file in one response");
    assert_eq!(download.md5, md5_hex(&file));
    assert!(stored(&s3, "l/plain.mp4").await == file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_file_from_a_ranged_origin_is_one_request_and_one_put() {
    let s3 = S3Server::start("lessons");
    let origin = Origin::start().await;
    let file = noise(MIB);
    let url = origin.add("/small.mp4", file.clone(), Faults::default());
    let (fetcher, archiver) = parts(&config("small", &s3.endpoint, 4)).await;
    let mut upload = archiver.upload("l/small.mp4".into());
    let download = transfer::copy(&fetcher, &url, Some(MIB as i64), &mut upload)
        .await
        .unwrap();
    upload.finish(&download.md5, None).await.unwrap();
    assert_eq!(origin.requests(), 1);
    let head = s3
        .client()
        .head_object()
        .bucket("lessons")
        .key("l/small.mp4")
        .send()
        .await
        .unwrap();
    assert_eq!(
        head.metadata().and_then(|m| m.get("md5")),
        Some(&md5_hex(&file)),
        "a single PUT carries its MD5"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_cut_mid_body_is_resumed_for_what_is_left() {
    let s3 = S3Server::start("lessons");
    let origin = Origin::start().await;
    let file = noise(12 * MIB);
    let cut = Faults {
        cut_after: Some(MIB as u64),
        cuts: 2,
        reset: true,
        ..Faults::default()
    };
    let url = origin.add("/cut.mp4", file.clone(), cut);
    let (fetcher, archiver) = parts(&config("range-cut", &s3.endpoint, 4)).await;
    let mut upload = archiver.upload("l/cut.mp4".into());
    let download = transfer::copy(&fetcher, &url, None, &mut upload)
        .await
        .unwrap();
    assert_eq!(download.resumes, 2);
    assert_eq!(download.md5, md5_hex(&file));
    upload.finish(&download.md5, None).await.unwrap();
    assert!(stored(&s3, "l/cut.mp4").await == file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_replaced_on_the_origin_mid_transfer_fails_and_leaves_no_parts() {
    let s3 = S3Server::start("lessons");
    let origin = Origin::start().await;
    let url = origin.add("/moving.mp4", noise(20 * MIB), slow());
    let (fetcher, archiver) = parts(&config("replaced", &s3.endpoint, 2)).await;
    let mut upload = archiver.upload("l/moving.mp4".into());
    let replace = {
        let origin = origin.clone();
        async move {
            while origin.served() < 6 * MIB as u64 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Another file at the same URL: another size, another ETag.
            origin.add("/moving.mp4", noise(21 * MIB), slow());
            std::future::pending::<()>().await
        }
    };
    let copied = tokio::select! {
        copied = transfer::copy(&fetcher, &url, None, &mut upload) => copied,
        () = replace => unreachable!(),
    };
    let err = copied.unwrap_err();
    assert!(
        matches!(err, FetchError::Interrupted { .. }) && err.is_transient(),
        "{err}"
    );
    upload.abort().await;
    assert!(s3.incomplete_uploads().is_empty(), "the parts were aborted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_gone_mid_upload_fails_transiently_and_the_abort_leaves_nothing() {
    let mut s3 = S3Server::start("lessons");
    let origin = Origin::start().await;
    let url = origin.add("/gone.mp4", noise(30 * MIB), slow());
    let (fetcher, archiver) = parts(&config("store-gone", &s3.endpoint, 2)).await;
    let mut upload = archiver.upload("l/gone.mp4".into());
    let copy = tokio::spawn(async move {
        let copied = transfer::copy(&fetcher, &url, None, &mut upload).await;
        (copied, upload)
    });
    while origin.served() < 12 * MIB as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        !s3.incomplete_uploads().is_empty(),
        "an upload is under way"
    );
    s3.stop();
    let (copied, upload) = copy.await.unwrap();
    let err = copied.unwrap_err();
    assert!(
        matches!(&err, FetchError::Sink(e) if e.fault == S3Fault::Transient),
        "{err}"
    );
    s3.restart();
    upload.abort().await;
    assert!(s3.incomplete_uploads().is_empty(), "orphan parts remain");
}

/// Eight uploads of three parts each, and room for one part in the whole
/// worker: each waits its turn, none deadlocks, every copy is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_sharing_a_one_part_budget_all_finish() {
    let s3 = S3Server::start("lessons");
    let origin = Origin::start().await;
    let mut config = config("tight-budget", &s3.endpoint, 4);
    config.archive_memory_bytes = 5 * MIB as u64;
    let (fetcher, archiver) = parts(&config).await;
    let mut files = Vec::new();
    let mut copies = tokio::task::JoinSet::new();
    for i in 0..8 {
        let file = noise(12 * MIB + i);
        let faults = Faults {
            // Half of them streamed (no ranges), half by ranges.
            no_ranges: i % 2 == 0,
            ..Faults::default()
        };
        let url = origin.add(&format!("/f{i}.mp4"), file.clone(), faults);
        files.push(file);
        let (fetcher, archiver) = (fetcher.clone(), archiver.clone());
        copies.spawn(async move {
            let mut upload = archiver.upload(format!("l/f{i}.mp4"));
            let download = transfer::copy(&fetcher, &url, None, &mut upload)
                .await
                .unwrap();
            upload.finish(&download.md5, None).await.unwrap();
        });
    }
    let all = async {
        while let Some(done) = copies.join_next().await {
            done.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(120), all)
        .await
        .expect("every upload made progress within the budget");
    for (i, file) in files.iter().enumerate() {
        assert!(
            stored(&s3, &format!("l/f{i}.mp4")).await == *file,
            "file {i}"
        );
    }
}

/// The journal entry is written like every other object: with the store's
/// encryption setting (a bucket policy refusing unencrypted writes would
/// refuse it, and park every multipart upload while small files pass).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upload_journal_is_encrypted_like_every_other_write() {
    let moto = MotoServer::start("lessons").await;
    let origin = Origin::start().await;
    let mut config = config("journal-sse", &moto.endpoint, 2);
    config.s3_sse = Some("AES256".into());
    config.s3_prefix = "p".into();
    let (fetcher, archiver) = parts(&config).await;
    let url = origin.add("/j.mp4", noise(12 * MIB), slow());
    let mut upload = archiver.upload("p/l/j.mp4".into());
    let copy = tokio::spawn(async move {
        let copied = transfer::copy(&fetcher, &url, None, &mut upload).await;
        (copied, upload)
    });
    let client = moto.client();
    let journal = loop {
        let listed = client
            .list_objects_v2()
            .bucket("lessons")
            .prefix("p/.lesson-replay-uploads/")
            .send()
            .await
            .unwrap();
        if let Some(key) = listed.contents().first().and_then(|o| o.key()) {
            break key.to_owned();
        }
        assert!(
            !copy.is_finished(),
            "the upload was journaled while under way"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let head = client
        .head_object()
        .bucket("lessons")
        .key(&journal)
        .send()
        .await
        .unwrap();
    assert_eq!(
        head.server_side_encryption().map(|s| s.as_str()),
        Some("AES256"),
        "journal entry {journal}"
    );
    let (copied, upload) = copy.await.unwrap();
    upload.finish(&copied.unwrap().md5, None).await.unwrap();
}

/// A store that accepts connections and never answers: every request ends at
/// its deadline, as a transient failure, instead of holding its handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_never_answers_fails_at_the_request_deadline() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let mut config = config("silent-store", &endpoint, 2);
    config.s3_request_timeout_secs = 1;
    let settings = config.media_settings().archive.unwrap();
    let archiver = Archiver::new(&settings, Metrics::default()).await;
    let checked = tokio::time::timeout(Duration::from_secs(30), archiver.check())
        .await
        .expect("the request ended at its deadline, not never");
    let err = checked.unwrap_err();
    assert_eq!(err.fault, S3Fault::Transient, "{err}");
}

/// An origin that answers every range with less than was asked (a whole,
/// valid 206 of at most 1 MiB): the rest is asked for, no resume is spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_capping_its_range_answers_is_read_whole() {
    let s3 = S3Server::start("lessons");
    let origin = Origin::start().await;
    let file = noise(12 * MIB);
    let capped = Faults {
        range_cap: Some(MIB as u64),
        ..Faults::default()
    };
    let url = origin.add("/capped.mp4", file.clone(), capped);
    let (fetcher, archiver) = parts(&config("range-cap", &s3.endpoint, 4)).await;
    let mut upload = archiver.upload("l/capped.mp4".into());
    let download = transfer::copy(&fetcher, &url, None, &mut upload)
        .await
        .unwrap();
    assert_eq!(download.resumes, 0, "a short answer is no cut");
    assert_eq!(download.md5, md5_hex(&file));
    upload.finish(&download.md5, None).await.unwrap();
    assert!(stored(&s3, "l/capped.mp4").await == file);
    assert_eq!(origin.requests(), 12, "1 MiB per answer");
}
