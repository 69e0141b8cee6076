//! Scenarios 2 and 3: archive throughput and the worker's peak memory
//! against a plain streaming copy origin → S3 with the same part size and
//! concurrency.

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use futures_util::StreamExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::Broker;
use crate::common::origin::{Body, Faults, Origin};
use crate::common::s3::S3Server;
use crate::harness::{
    MIB, Plan, cpu_seconds, lesson, peak_rss_mib, preload, records_config, start_worker,
    wait_for_depth,
};

/// What one archive run measured.
pub(crate) struct ArchiveRun {
    pub(crate) mb_per_s: f64,
    pub(crate) peak_rss_mib: f64,
    /// The worker's CPU time (user + system, start-up included) per GB archived.
    pub(crate) cpu_s_per_gb: f64,
}

/// Scenarios 2 and 3: archive MB/s, the worker's peak RSS and CPU per GB.
pub(crate) async fn archive_rate(
    plan: &Plan,
    origin: &Origin,
    files: usize,
    bytes: u64,
) -> ArchiveRun {
    let s3 = S3Server::start("bench");
    let mut config = records_config(plan);
    s3.configure(&mut config, "bench");
    config.concurrency = plan.archive_concurrency;
    config.s3_part_size_bytes = plan.part_size;
    config.archive_memory_bytes = plan.archive_memory_bytes;
    config.fetch_idle_timeout_secs = 120;
    // As production runs against HTTPS stores (`auto`); s3s-fs here speaks
    // plain HTTP, where `auto` would sign every byte.
    config.s3_payload_signing = lesson_replay::config::settings::PayloadSigning::Unsigned;
    let broker = Broker::new(config).await;
    let bodies = (0..files).map(|i| {
        let url = origin.add_body(
            &format!("/big-{bytes}-{i}.mp4"),
            Body::Synthetic {
                head: vec![],
                filler_len: bytes,
                tail: vec![],
            },
            Faults::default(),
        );
        lesson(&format!("arch-{bytes}-{i}"), &[(url, bytes as usize, 0)])
    });
    preload(&broker, bodies).await;
    let started = Instant::now();
    let mut worker = start_worker(&broker.config);
    wait_for_depth(
        &broker,
        &broker.config.records_queue,
        files as u32,
        Duration::from_secs(1800),
    )
    .await;
    let mb_per_s = (files as u64 * bytes) as f64 / MIB as f64 / started.elapsed().as_secs_f64();
    let rss = peak_rss_mib(worker.pid());
    let cpu = cpu_seconds(worker.pid());
    worker.terminate();
    worker.wait_exit(Duration::from_secs(30));
    broker.cleanup().await;
    ArchiveRun {
        mb_per_s,
        peak_rss_mib: rss,
        cpu_s_per_gb: cpu / ((files as u64 * bytes) as f64 / 1e9),
    }
}

/// The floor of archiving's CPU: the MD5 the record must carry, computed by
/// the same crate over the same kind of bytes in memory, CPU-seconds per GB
/// (one thread kept busy: its wall time is its CPU time).
pub(crate) async fn md5_floor_cpu_s_per_gb(bytes: u64) -> f64 {
    tokio::task::spawn_blocking(move || {
        use md5::{Digest, Md5};
        let chunk: Vec<u8> = (0..MIB as u32).map(|i| (i % 251) as u8).collect();
        let mut hasher = Md5::new();
        let started = Instant::now();
        for _ in 0..bytes / MIB {
            hasher.update(&chunk);
        }
        std::hint::black_box(hasher.finalize());
        started.elapsed().as_secs_f64() / ((bytes / MIB * MIB) as f64 / 1e9)
    })
    .await
    .unwrap()
}

// Long on purpose: the baseline is a whole, minimal copy loop written out
// in full, so a reader can see it does nothing the worker does not.
/// Scenario 2 baseline: stream origin → S3 multipart, same part size and
/// concurrency, nothing else (no HEAD, MD5, probe, metadata or manifest).
pub(crate) async fn copy_baseline(plan: &Plan, origin: &Origin, files: usize, bytes: u64) -> f64 {
    let s3 = S3Server::start("bench");
    let client = s3.client();
    let http = reqwest::Client::new();
    let urls: Vec<String> = (0..files)
        .map(|i| {
            origin.add_body(
                &format!("/copy-{i}.mp4"),
                Body::Synthetic {
                    head: vec![],
                    filler_len: bytes,
                    tail: vec![],
                },
                Faults::default(),
            )
        })
        .collect();
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..plan.archive_concurrency {
        let (client, http, urls, next, part_size) = (
            client.clone(),
            http.clone(),
            urls.clone(),
            next.clone(),
            plan.part_size,
        );
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(url) = urls.get(i) else { return };
                let key = format!("copy/{i}.mp4");
                let upload = client
                    .create_multipart_upload()
                    .bucket("bench")
                    .key(&key)
                    .send()
                    .await
                    .unwrap();
                let id = upload.upload_id().unwrap().to_owned();
                let mut body = http.get(url).send().await.unwrap().bytes_stream();
                let mut buf = bytes::BytesMut::with_capacity(part_size);
                let mut parts = Vec::new();
                loop {
                    let chunk = body.next().await;
                    if let Some(chunk) = &chunk {
                        buf.extend_from_slice(chunk.as_ref().unwrap());
                    }
                    if buf.len() >= part_size || (chunk.is_none() && !buf.is_empty()) {
                        let n = parts.len() as i32 + 1;
                        let part = client
                            .upload_part()
                            .bucket("bench")
                            .key(&key)
                            .upload_id(&id)
                            .part_number(n)
                            .body(ByteStream::from(buf.split().freeze()))
                            .send()
                            .await
                            .unwrap();
                        parts.push(
                            CompletedPart::builder()
                                .part_number(n)
                                .set_e_tag(part.e_tag().map(str::to_owned))
                                .build(),
                        );
                    }
                    if chunk.is_none() {
                        break;
                    }
                }
                client
                    .complete_multipart_upload()
                    .bucket("bench")
                    .key(&key)
                    .upload_id(&id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts))
                            .build(),
                    )
                    .send()
                    .await
                    .unwrap();
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    (files as u64 * bytes) as f64 / MIB as f64 / started.elapsed().as_secs_f64()
}
