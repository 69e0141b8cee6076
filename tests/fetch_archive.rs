//! Fetching, probing and archiving against real servers on loopback: the test
//! VOD origin (with faults) and an s3s-fs S3 server.

mod common;

use std::time::Duration;

use common::isolated_config;
use common::messages::{FASTSTART, MOOV_AT_END};
use common::origin::{Faults, Origin, noise};
use common::s3::S3Server;
use lesson_replay::decision::reason::ReasonCode;
use lesson_replay::decision::url_policy::UrlPolicy;
use lesson_replay::media::archive::Archiver;
use lesson_replay::media::fetch::{Discard, FetchError, FetchSettings, Fetcher};
use lesson_replay::media::probe::parse_box_header;
use lesson_replay::media::s3_error::S3Fault;
use lesson_replay::telemetry::metrics::Metrics;
use md5::{Digest, Md5};

const MIB: usize = 1024 * 1024;

fn settings() -> FetchSettings {
    FetchSettings {
        connect_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(2),
        max_file_bytes: 1 << 30,
        max_resumes: 3,
        url_policy: isolated_config("fetch").media_settings().fetch.url_policy,
    }
}

fn fetcher() -> Fetcher {
    Fetcher::new(settings(), Metrics::default()).unwrap()
}

fn md5_hex(bytes: &[u8]) -> String {
    hex::encode(Md5::digest(bytes))
}

/// The top-level boxes of an MP4 file.
fn boxes(file: &[u8]) -> Vec<(&[u8; 4], &[u8])> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < file.len() {
        let header = parse_box_header(&file[offset..]).unwrap().unwrap();
        let size = header.size.unwrap() as usize;
        let kind: &[u8; 4] = file[offset + 4..offset + 8].try_into().unwrap();
        out.push((kind, &file[offset..offset + size]));
        offset += size;
    }
    out
}

/// A real MP4 with `mdat_len` bytes of media data: moov before (faststart) or after it.
fn mp4_with_mdat(mdat_len: usize, faststart: bool) -> Vec<u8> {
    let source = boxes(MOOV_AT_END);
    let find = |kind: &[u8; 4]| source.iter().find(|(k, _)| *k == kind).unwrap().1;
    let mut mdat = ((mdat_len + 8) as u32).to_be_bytes().to_vec();
    mdat.extend_from_slice(b"mdat");
    mdat.extend_from_slice(&noise(mdat_len));
    let mut file = find(b"ftyp").to_vec();
    if faststart {
        file.extend_from_slice(find(b"moov"));
        file.extend_from_slice(&mdat);
    } else {
        file.extend_from_slice(&mdat);
        file.extend_from_slice(find(b"moov"));
    }
    file
}

#[tokio::test]
async fn a_dropped_connection_resumes_with_a_range_request() {
    let origin = Origin::start().await;
    let body = noise(4 * MIB);
    let faults = Faults {
        cut_after: Some(3 * MIB as u64),
        cuts: 1,
        ..Faults::default()
    };
    let url = origin.add("/cut.mp4", body.clone(), faults);
    let download = fetcher()
        .download(&url, Some(body.len() as i64), &mut Discard)
        .await
        .unwrap();
    assert_eq!(download.size, body.len() as u64);
    assert_eq!(download.md5, md5_hex(&body));
    assert_eq!(download.resumes, 1);
    let served = origin.served();
    assert!(
        served < body.len() as u64 * 12 / 10,
        "served {served} for {} bytes",
        body.len()
    );
    assert_eq!(download.transferred, served);
}

#[tokio::test]
async fn connection_resets_are_resumed_too() {
    let origin = Origin::start().await;
    let body = noise(MIB);
    let faults = Faults {
        cut_after: Some(100_000),
        cuts: 2,
        reset: true,
        ..Faults::default()
    };
    let url = origin.add("/short.mp4", body.clone(), faults);
    let download = fetcher().download(&url, None, &mut Discard).await.unwrap();
    assert_eq!((download.size, download.resumes), (body.len() as u64, 2));
    assert_eq!(download.md5, md5_hex(&body));
}

#[tokio::test]
async fn without_range_support_a_resume_reads_past_what_it_has() {
    let origin = Origin::start().await;
    let body = noise(MIB);
    let faults = Faults {
        cut_after: Some(300_000),
        cuts: 1,
        no_ranges: true,
        ..Faults::default()
    };
    let url = origin.add("/noranges.mp4", body.clone(), faults);
    let download = fetcher().download(&url, None, &mut Discard).await.unwrap();
    assert_eq!(download.md5, md5_hex(&body));
    assert_eq!(
        download.transferred,
        300_000 + body.len() as u64,
        "the first 300 000 bytes twice"
    );
    assert_eq!(origin.requests(), 2);
}

#[tokio::test]
async fn without_a_validator_a_cut_download_fails_as_transient() {
    let origin = Origin::start().await;
    let faults = Faults {
        cut_after: Some(1000),
        cuts: 1,
        no_validator: true,
        ..Faults::default()
    };
    let url = origin.add("/novalidator.mp4", noise(100_000), faults);
    let err = fetcher()
        .download(&url, None, &mut Discard)
        .await
        .unwrap_err();
    assert!(
        matches!(err, FetchError::Interrupted { received: 1000, .. }),
        "{err}"
    );
    assert!(err.is_transient());
    // The next attempt (the origin no longer cuts) completes, whole.
    let body = noise(100_000);
    let download = fetcher().download(&url, None, &mut Discard).await.unwrap();
    assert_eq!(download.size, body.len() as u64);
    assert_eq!(download.md5, md5_hex(&body));
}

#[tokio::test]
async fn origin_errors_are_classified() {
    let origin = Origin::start().await;
    let missing = format!("{}/missing.mp4", origin.base);
    let err = fetcher()
        .download(&missing, None, &mut Discard)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), ReasonCode::VodNotFound);
    assert!(!err.is_transient());

    let url = origin.add(
        "/busy.mp4",
        noise(1000),
        Faults {
            fail_first: 1,
            ..Faults::default()
        },
    );
    let err = fetcher()
        .download(&url, None, &mut Discard)
        .await
        .unwrap_err();
    assert!(
        matches!(err, FetchError::Status(503)) && err.is_transient(),
        "{err}"
    );

    let err = fetcher()
        .download(&url, Some(999), &mut Discard)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), ReasonCode::SizeMismatch);
    assert!(
        err.to_string().contains("Content-Length"),
        "seen in the headers, before the body: {err}"
    );

    let mut small = settings();
    small.max_file_bytes = 500;
    let err = Fetcher::new(small, Metrics::default())
        .unwrap()
        .download(&url, None, &mut Discard)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), ReasonCode::FileTooLarge);
}

#[tokio::test]
async fn a_stalled_origin_times_out() {
    let origin = Origin::start().await;
    let faults = Faults {
        chunk_delay: Some(Duration::from_secs(5)),
        ..Faults::default()
    };
    let url = origin.add("/slow.mp4", noise(100_000), faults);
    let mut quick = settings();
    quick.idle_timeout = Duration::from_millis(300);
    quick.max_resumes = 0;
    let err = Fetcher::new(quick, Metrics::default())
        .unwrap()
        .download(&url, None, &mut Discard)
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("no data"), "{err}");
}

#[tokio::test]
async fn a_moov_at_end_probe_reads_a_small_fraction_of_the_file() {
    let origin = Origin::start().await;
    let file = mp4_with_mdat(8 * MIB, false);
    let url = origin.add("/lesson.mp4", file.clone(), Faults::default());
    let read = fetcher().probe_by_ranges(&url).await.unwrap();
    let probe = read.probe.unwrap();
    assert!((4950..=5100).contains(&probe.duration_ms), "{probe:?}");
    assert_eq!((probe.width, probe.height), (Some(160), Some(120)));
    assert_eq!(read.total_size, Some(file.len() as u64));
    assert_eq!(read.bytes_read, origin.served());
    assert!(
        read.bytes_read * 50 < file.len() as u64,
        "read {} of {}",
        read.bytes_read,
        file.len()
    );
    // The first window, then the rest past `mdat` (the moov) in one request.
    assert_eq!(read.requests, 2);
}

#[tokio::test]
async fn a_large_box_after_the_moov_is_skipped_by_its_header() {
    let origin = Origin::start().await;
    // ftyp, mdat, then a 2 MiB free box before the moov: the rest past
    // `mdat` is too much to read whole.
    let source = boxes(MOOV_AT_END);
    let find = |kind: &[u8; 4]| source.iter().find(|(k, _)| *k == kind).unwrap().1;
    let mut file = find(b"ftyp").to_vec();
    for (kind, len) in [(b"mdat", MIB), (b"free", 2 * MIB)] {
        file.extend_from_slice(&((len + 8) as u32).to_be_bytes());
        file.extend_from_slice(kind);
        file.extend_from_slice(&noise(len));
    }
    file.extend_from_slice(find(b"moov"));
    let url = origin.add("/lesson.mp4", file.clone(), Faults::default());
    let read = fetcher().probe_by_ranges(&url).await.unwrap();
    let probe = read.probe.unwrap();
    assert!((4950..=5100).contains(&probe.duration_ms), "{probe:?}");
    assert!(
        read.bytes_read < 64 * 1024,
        "read {} of {}",
        read.bytes_read,
        file.len()
    );
    // Window, free's header (2 MiB + moov left: too far to take whole), moov.
    assert_eq!(read.requests, 3);
}

#[tokio::test]
async fn a_probe_without_range_support_stops_once_moov_went_past() {
    let origin = Origin::start().await;
    let file = mp4_with_mdat(8 * MIB, true);
    let url = origin.add(
        "/faststart.mp4",
        file.clone(),
        Faults {
            no_ranges: true,
            ..Faults::default()
        },
    );
    let read = fetcher().probe_by_ranges(&url).await.unwrap();
    assert!((4950..=5100).contains(&read.probe.unwrap().duration_ms));
    assert!(
        read.bytes_read * 4 < file.len() as u64,
        "read {} of {}",
        read.bytes_read,
        file.len()
    );
}

#[tokio::test]
async fn a_file_that_is_not_an_mp4_gives_a_probe_error_not_a_crash() {
    let origin = Origin::start().await;
    let url = origin.add(
        "/page.html",
        b"<html>this is not a video</html>".to_vec(),
        Faults::default(),
    );
    let read = fetcher().probe_by_ranges(&url).await.unwrap();
    let why = read.probe.unwrap_err();
    assert!(why.contains("MP4") || why.contains("box"), "{why}");
    let download = fetcher().download(&url, None, &mut Discard).await.unwrap();
    let why = download.probe.unwrap_err();
    assert!(why.contains("box"), "{why}");
}

async fn archiver_for(s3: &S3Server, bucket: &str) -> Archiver {
    let mut config = isolated_config("archive");
    s3.configure(&mut config, bucket);
    config.s3_part_size_bytes = 5 * MIB;
    let settings = config.media_settings().archive.expect("archiving is on");
    let archiver = Archiver::new(&settings, Metrics::default()).await;
    archiver.check().await.unwrap();
    archiver
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_file_streams_into_a_multipart_upload() {
    let s3 = S3Server::start("lessons");
    let archiver = archiver_for(&s3, "lessons").await;
    let origin = Origin::start().await;
    let file = mp4_with_mdat(12 * MIB, true);
    let url = origin.add("/big.mp4", file.clone(), Faults::default());

    let mut upload = archiver.upload("p/big.mp4".into());
    let download = fetcher()
        .download(&url, Some(file.len() as i64), &mut upload)
        .await
        .unwrap();
    let probe = download.probe.as_ref().unwrap().clone();
    let archive = upload.finish(&download.md5, Some(&probe)).await.unwrap();
    assert_eq!(archive.size_bytes, file.len() as i64);
    assert_eq!(archive.md5, md5_hex(&file));

    let object = s3
        .client()
        .get_object()
        .bucket("lessons")
        .key("p/big.mp4")
        .send()
        .await
        .unwrap();
    let bytes = object.body.collect().await.unwrap().into_bytes();
    assert!(bytes == file, "the archived bytes equal the source");

    assert!(archive.etag.is_some(), "the completion's ETag is kept");
    // A redelivery finds it (its HEAD and its object record), probe included.
    let (found, found_probe) = archiver
        .existing("p/big.mp4", Some(file.len() as i64))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.md5, archive.md5);
    assert_eq!(found.etag, archive.etag);
    assert_eq!(found_probe, Some(probe));
    assert!(
        archiver
            .existing("p/big.mp4", Some(1))
            .await
            .unwrap()
            .is_none(),
        "a size change means re-upload"
    );
    assert!(
        archiver
            .existing("p/other.mp4", None)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_download_aborts_the_multipart_upload() {
    let s3 = S3Server::start("lessons");
    let archiver = archiver_for(&s3, "lessons").await;
    let origin = Origin::start().await;
    let faults = Faults {
        cut_after: Some(7 * MIB as u64),
        cuts: 1,
        no_validator: true,
        ..Faults::default()
    };
    let url = origin.add("/cut.mp4", noise(12 * MIB), faults);

    let mut upload = archiver.upload("p/cut.mp4".into());
    let err = fetcher()
        .download(&url, None, &mut upload)
        .await
        .unwrap_err();
    assert!(err.is_transient());
    assert!(
        !s3.incomplete_uploads().is_empty(),
        "a part was uploaded before the cut"
    );
    upload.abort().await;
    let leftovers = s3.incomplete_uploads();
    assert!(leftovers.is_empty(), "orphan parts: {leftovers:?}");
    assert!(
        archiver
            .existing("p/cut.mp4", None)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn a_wrong_bucket_fails_the_start_up_check_as_misconfigured() {
    let s3 = S3Server::start("lessons");
    let mut config = isolated_config("bucket-check");
    s3.configure(&mut config, "no-such-bucket");
    let settings = config.media_settings().archive.unwrap();
    let archiver = Archiver::new(&settings, Metrics::default()).await;
    let err = archiver.check().await.unwrap_err();
    assert!(err.to_string().contains("no-such-bucket"), "{err}");
    assert_eq!((err.fault, err.status), (S3Fault::Misconfigured, Some(404)));
    assert_eq!(err.reason(), ReasonCode::ArchiveMisconfigured);
}

#[tokio::test]
async fn a_wrong_secret_is_denied_not_retried() {
    let s3 = S3Server::start("lessons");
    let mut config = isolated_config("wrong-secret");
    s3.configure(&mut config, "lessons");
    config.s3_secret_access_key = Some("not-the-secret".to_owned().into());
    let settings = config.media_settings().archive.unwrap();
    let archiver = Archiver::new(&settings, Metrics::default()).await;
    let err = archiver.check().await.unwrap_err();
    assert_eq!(
        (err.fault, err.status),
        (S3Fault::Denied, Some(403)),
        "{err}"
    );

    // A request with a body: the store names its refusal, and it is kept.
    let mut upload = archiver.upload("lesson/a.mp4".into());
    use lesson_replay::media::fetch::ChunkSink;
    upload.write(vec![1u8; 1024].into()).await.unwrap();
    let err = upload.finish("00", None).await.unwrap_err();
    assert_eq!(err.fault, S3Fault::Denied, "{err}");
    assert_eq!(err.code.as_deref(), Some("SignatureDoesNotMatch"), "{err}");
    let shown = err.to_string();
    assert!(
        !shown.contains(common::s3::ACCESS_KEY),
        "the key id is shown: {shown}"
    );
    assert_eq!(err.reason(), ReasonCode::ArchiveDenied);
    assert!(!err.is_transient());
}

#[tokio::test]
async fn a_store_that_is_down_is_a_transient_failure() {
    let mut s3 = S3Server::start("lessons");
    let archiver = archiver_for(&s3, "lessons").await;
    s3.stop();
    let err = archiver.check().await.unwrap_err();
    assert_eq!((err.fault, err.status), (S3Fault::Transient, None), "{err}");
    assert_eq!(err.reason(), ReasonCode::ArchiveFailed);
}

#[tokio::test]
async fn a_small_faststart_file_is_probed_in_one_range_read() {
    let origin = Origin::start().await;
    let url = origin.add("/small.mp4", FASTSTART.to_vec(), Faults::default());
    let read = fetcher().probe_by_ranges(&url).await.unwrap();
    let probe = read.probe.unwrap();
    assert_eq!((probe.width, probe.height), (Some(320), Some(240)));
    assert_eq!(read.requests, 1);
}

#[tokio::test]
async fn redirects_are_checked_hop_by_hop() {
    let origin = Origin::start().await;
    let target = origin.add("/real.mp4", FASTSTART.to_vec(), Faults::default());
    let redirect = |to: &str| Faults {
        redirect_to: Some(to.to_owned()),
        ..Faults::default()
    };
    let hop = origin.add("/hop.mp4", vec![], redirect(&target));
    let download = fetcher().download(&hop, None, &mut Discard).await.unwrap();
    assert_eq!(
        download.md5,
        md5_hex(FASTSTART),
        "an allowed redirect is followed"
    );

    let away = origin.add(
        "/away.mp4",
        vec![],
        redirect("http://evil.example.com/steal.mp4"),
    );
    let err = fetcher()
        .download(&away, None, &mut Discard)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), ReasonCode::UrlNotAllowed, "{err}");
    assert!(!err.is_transient());

    // A redirect to another scheme is refused as a URL, not taken for an HTTP answer.
    for (i, to) in ["file:///etc/passwd", "gopher://127.0.0.1:70/"]
        .iter()
        .enumerate()
    {
        let elsewhere = origin.add(&format!("/scheme{i}.mp4"), vec![], redirect(to));
        let err = fetcher()
            .download(&elsewhere, None, &mut Discard)
            .await
            .unwrap_err();
        assert_eq!(err.reason(), ReasonCode::UrlNotAllowed, "{to}: {err}");
    }

    // At most 3 hops, exactly: a chain of 3 is followed, a chain of 4 is not.
    let mut next = target.clone();
    for i in 1..=4 {
        next = origin.add(&format!("/chain{i}.mp4"), vec![], redirect(&next));
        let result = fetcher().download(&next, None, &mut Discard).await;
        match i {
            1..=3 => assert_eq!(result.unwrap().md5, md5_hex(FASTSTART), "{i} hops"),
            _ => {
                let err = result.unwrap_err();
                assert_eq!(err.reason(), ReasonCode::UrlNotAllowed, "{i} hops: {err}");
                assert!(err.to_string().contains("more than 3 redirects"), "{err}");
            }
        }
    }

    // A loop: refused after a few hops, never followed forever.
    let looping = origin.add("/loop.mp4", vec![], Faults::default());
    origin.add("/loop.mp4", vec![], redirect(&looping));
    let err = fetcher()
        .download(&looping, None, &mut Discard)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), ReasonCode::UrlNotAllowed, "{err}");
}

#[tokio::test]
async fn private_addresses_are_refused_unless_allowed() {
    let origin = Origin::start().await;
    let url = origin.add("/a.mp4", FASTSTART.to_vec(), Faults::default());
    let mut strict = settings();
    strict.url_policy = std::sync::Arc::new(UrlPolicy {
        allowed_hosts: vec!["127.0.0.1".into(), "localhost".into()],
        allow_private_networks: false,
    });
    let fetcher = Fetcher::new(strict, Metrics::default()).unwrap();
    let err = fetcher
        .download(&url, None, &mut Discard)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), ReasonCode::UrlNotAllowed, "{err}");
    let by_name = url.replace("127.0.0.1", "localhost");
    let err = fetcher.probe_by_ranges(&by_name).await.unwrap_err();
    assert_eq!(
        err.reason(),
        ReasonCode::UrlNotAllowed,
        "a name resolving to loopback: {err}"
    );
    assert_eq!(origin.requests(), 0, "nothing was fetched");
}
