//! Scenario 9: archiving over a WAN. The worker fetches from the VOD origin
//! and uploads to S3 through a proxy of our own in front of each
//! ([`crate::wan_proxy`]), with a 20 ms one-way delay, 50 MB/s per connection
//! and 250 MB/s in all; then the same files with no delay and no caps. The
//! baseline is what a user would pick to do the same copy: `rclone copyurl`,
//! default settings, through the same proxies, the same bytes.
//!
//! Workloads: (a) one lesson of one 512 MiB video, against one
//! `rclone copyurl`; (b) one lesson of three 256 MiB videos, against three
//! `rclone copyurl` processes at once. Every rclone copy is read back and its
//! MD5 checked against the source; every object the worker archived is
//! checked for its size and its recorded MD5. A wrong copy fails the run.
//!
//! Throughputs here are MB/s of 10⁶ bytes, the unit of the link's caps.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lesson_replay::config::settings::{Config, PayloadSigning};
use md5::{Digest, Md5};

use crate::common::Broker;
use crate::common::origin::{Body, Faults, Origin};
use crate::common::s3::{ACCESS_KEY, S3Server, SECRET_KEY, configure_store};
use crate::harness::{
    CpuTicks, MIB, Plan, cpu_seconds, lesson, peak_rss_mib, preload, records_config, round,
    start_worker, wait_for_depth,
};
use crate::wan_proxy::{Link, SelfCheck, WanProxy, self_check};

/// The WAN of the scenario: 20 ms each way (40 ms round trip), 50 MB/s per
/// connection, 250 MB/s shared by all connections, in each direction.
pub(crate) const WAN: Link = Link {
    delay: Duration::from_millis(20),
    per_connection: Some(50_000_000),
    total: Some(250_000_000),
};

/// Connections streaming at once in the proxy's self-check of the total cap:
/// 8 × 50 MB/s is more than the 250 MB/s total.
const CHECK_CONNECTIONS: usize = 8;

/// The bucket of every run (s3s-fs creates it at start).
const BUCKET: &str = "bench";

/// Every worker setting of this scenario, in one place (scenario 10's too).
pub(crate) fn archive_settings(config: &mut Config, plan: &Plan) {
    config.concurrency = plan.archive_concurrency;
    config.s3_part_size_bytes = plan.part_size;
    config.fetch_idle_timeout_secs = 120;
    // As archive.rs: production's `auto` sends UNSIGNED-PAYLOAD over HTTPS;
    // this s3s-fs speaks plain HTTP, where `auto` would sign every byte.
    config.s3_payload_signing = PayloadSigning::Unsigned;
    // The pipeline at its defaults (parts in flight per file, the worker's
    // memory budget); BENCH_UPLOAD_CONCURRENCY and BENCH_ARCHIVE_MEMORY_BYTES
    // try other values.
    let number = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
    if let Some(n) = number("BENCH_UPLOAD_CONCURRENCY") {
        config.s3_upload_concurrency = n as usize;
    }
    if let Some(n) = number("BENCH_ARCHIVE_MEMORY_BYTES") {
        config.archive_memory_bytes = n;
    }
}

/// One copy's figures: throughput and the copying process's cost.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Measure {
    /// Bytes copied / wall time from the process start to the last copy done.
    pub(crate) mb_per_s: f64,
    /// Peak RSS of the copying process (the largest of rclone's processes).
    pub(crate) peak_rss_mib: f64,
    /// CPU time (user + system, start-up included) per GB (10⁹ bytes) copied,
    /// all the run's processes together.
    pub(crate) cpu_s_per_gb: f64,
    /// The machine's busy share (both cores, 0 to 1) during the copy: the
    /// proxies, origin and S3 server run here too. Near 1, the copy waited
    /// for CPU, not for the link.
    pub(crate) machine_busy: f64,
}

/// The worker and rclone on one workload.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Pair {
    pub(crate) worker: Measure,
    pub(crate) rclone: Measure,
}

impl Pair {
    /// Worker MB/s over rclone MB/s.
    pub(crate) fn ratio(&self) -> f64 {
        self.worker.mb_per_s / self.rclone.mb_per_s
    }
}

/// Both workloads over one link.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct LinkRuns {
    /// (a) one 512 MiB file vs one `rclone copyurl`.
    pub(crate) one_file: Pair,
    /// (b) one lesson of 3 × 256 MiB vs three `rclone copyurl` at once.
    pub(crate) lesson: Pair,
}

/// Everything scenario 9 measured.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct WanResults {
    /// The proxy measured with the WAN link, before the runs.
    pub(crate) check: SelfCheck,
    /// Through the proxies with [`WAN`].
    pub(crate) wan: LinkRuns,
    /// Through the proxies with no delay and no caps.
    pub(crate) local: LinkRuns,
}

/// Run scenario 9.
pub(crate) async fn run(plan: &Plan, origin: &Origin) -> WanResults {
    let check = self_check(WAN, plan.wan_check_bytes, CHECK_CONNECTIONS).await;
    eprintln!(
        "   proxy check (2D = {} ms, B = {} MB/s, T = {} MB/s): round trip {:.1} ms; \
         1 connection up {:.1} / down {:.1} MB/s; {} connections up {:.1} MB/s",
        2 * WAN.delay.as_millis(),
        WAN.per_connection.unwrap_or(0) / 1_000_000,
        WAN.total.unwrap_or(0) / 1_000_000,
        check.rtt_ms,
        check.one_up_mb_per_s,
        check.one_down_mb_per_s,
        check.connections,
        check.all_up_mb_per_s
    );
    let file = Source::new(origin, plan.wan_file_bytes).await;
    let track = Source::new(origin, plan.wan_track_bytes).await;
    let mut results = WanResults {
        check,
        ..WanResults::default()
    };
    for (name, link) in [("WAN", WAN), ("D=0", Link::local())] {
        let runs = LinkRuns {
            one_file: Pair {
                worker: worker_run(plan, &file, link, 1).await,
                rclone: rclone_run(&file, link, 1).await,
            },
            lesson: Pair {
                worker: worker_run(plan, &track, link, 3).await,
                rclone: rclone_run(&track, link, 3).await,
            },
        };
        eprintln!(
            "   {name}: 1 file worker {:.1} / rclone {:.1} MB/s; 3 tracks worker {:.1} / \
             3 rclone {:.1} MB/s; worker RSS {:.0}/{:.0} MiB, CPU {:.2}/{:.2} s/GB",
            runs.one_file.worker.mb_per_s,
            runs.one_file.rclone.mb_per_s,
            runs.lesson.worker.mb_per_s,
            runs.lesson.rclone.mb_per_s,
            runs.one_file.worker.peak_rss_mib,
            runs.lesson.worker.peak_rss_mib,
            runs.one_file.worker.cpu_s_per_gb,
            runs.lesson.worker.cpu_s_per_gb,
        );
        if name == "WAN" {
            results.wan = runs;
        } else {
            results.local = runs;
        }
    }
    results
}

/// The scenario's figures for summary.json.
pub(crate) fn summary(r: &WanResults) -> serde_json::Value {
    let measure = |m: &Measure| {
        serde_json::json!({"mb_per_s": round(m.mb_per_s, 1),
            "peak_rss_mib": round(m.peak_rss_mib, 1), "cpu_s_per_gb": round(m.cpu_s_per_gb, 2),
            "machine_busy": round(m.machine_busy, 2)})
    };
    let pair = |p: &Pair| {
        serde_json::json!({"worker": measure(&p.worker), "rclone": measure(&p.rclone),
            "ratio": round(p.ratio(), 3)})
    };
    let runs = |l: &LinkRuns| serde_json::json!({"one_file": pair(&l.one_file), "lesson_3_tracks": pair(&l.lesson)});
    serde_json::json!({
        "link": {"delay_ms": WAN.delay.as_millis() as u64,
                 "per_connection_mb_per_s": WAN.per_connection.unwrap_or(0) / 1_000_000,
                 "total_mb_per_s": WAN.total.unwrap_or(0) / 1_000_000},
        "proxy_check": {"rtt_ms": round(r.check.rtt_ms, 2),
                        "one_connection_up_mb_per_s": round(r.check.one_up_mb_per_s, 1),
                        "one_connection_down_mb_per_s": round(r.check.one_down_mb_per_s, 1),
                        "connections": r.check.connections,
                        "all_connections_up_mb_per_s": round(r.check.all_up_mb_per_s, 1)},
        "wan": runs(&r.wan),
        "d0": runs(&r.local),
    })
}

/// A size of file served by the origin, with its MD5 (every file of a size
/// has the same bytes: the origin's synthetic body).
struct Source<'a> {
    origin: &'a Origin,
    bytes: u64,
    md5: String,
}

impl<'a> Source<'a> {
    async fn new(origin: &'a Origin, bytes: u64) -> Source<'a> {
        let md5 = tokio::task::spawn_blocking(move || {
            let body = synthetic(bytes);
            let mut hasher = Md5::new();
            let mut chunk = vec![0u8; MIB as usize];
            let mut offset = 0;
            while offset < bytes {
                let n = (bytes - offset).min(MIB) as usize;
                body.read_at(offset, &mut chunk[..n]);
                hasher.update(&chunk[..n]);
                offset += n as u64;
            }
            hex::encode(hasher.finalize())
        })
        .await
        .unwrap();
        Source { origin, bytes, md5 }
    }

    /// Serve a new file of this size; its URL through `proxy`.
    fn serve(&self, name: &str, proxy: &WanProxy) -> String {
        let url = self.origin.add_body(
            &format!("/wan-{name}.mp4"),
            synthetic(self.bytes),
            Faults::default(),
        );
        url.replacen(&self.origin.base, &format!("http://{}", proxy.addr), 1)
    }
}

fn synthetic(bytes: u64) -> Body {
    Body::Synthetic {
        head: vec![],
        filler_len: bytes,
        tail: vec![],
    }
}

/// A fresh S3 server, and proxies with `link` in front of it and of the origin.
pub(crate) async fn links(origin: &Origin, link: Link) -> (S3Server, WanProxy, WanProxy) {
    let s3 = S3Server::start(BUCKET);
    let s3_proxy = WanProxy::start(loopback(s3.port), link).await;
    let origin_port = origin.base.rsplit_once(':').unwrap().1.parse().unwrap();
    let origin_proxy = WanProxy::start(loopback(origin_port), link).await;
    (s3, s3_proxy, origin_proxy)
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Run names unique within the process (the origin is shared by all runs).
fn unique(what: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{what}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// The worker archives one lesson of `tracks` videos of `source`'s size.
async fn worker_run(plan: &Plan, source: &Source<'_>, link: Link, tracks: usize) -> Measure {
    let (s3, s3_proxy, origin_proxy) = links(source.origin, link).await;
    let mut config = records_config(plan);
    configure_store(&mut config, &format!("http://{}", s3_proxy.addr), BUCKET);
    archive_settings(&mut config, plan);
    let broker = Broker::new(config).await;
    let task = unique("wan-worker");
    let videos: Vec<(String, usize, i64)> = (0..tracks)
        .map(|i| {
            let url = source.serve(&format!("{task}-{i}"), &origin_proxy);
            (url, source.bytes as usize, 0)
        })
        .collect();
    preload(&broker, std::iter::once(lesson(&task, &videos))).await;
    let started = Instant::now();
    let ticks = CpuTicks::now();
    let mut worker = start_worker(&broker.config);
    let records = &broker.config.records_queue;
    wait_for_depth(&broker, records, 1, Duration::from_secs(1800)).await;
    let seconds = started.elapsed().as_secs_f64();
    let machine_busy = ticks.busy_share_since();
    let (rss, cpu) = (peak_rss_mib(worker.pid()), cpu_seconds(worker.pid()));
    worker.terminate();
    worker.wait_exit(Duration::from_secs(30));
    // The record names every archived copy: each must be whole.
    let (record, _) = broker.take(records, 1).await.remove(0);
    let client = s3.client();
    let archived = record["tracks"].as_array().unwrap();
    assert_eq!(archived.len(), tracks, "tracks in the record: {record:#}");
    for track in archived {
        let archive = &track["archive"];
        let key = archive["key"]
            .as_str()
            .unwrap_or_else(|| panic!("a track was not archived: {track:#}"));
        let head = client
            .head_object()
            .bucket(BUCKET)
            .key(key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("HEAD {key}: {e}"));
        assert_eq!(
            head.content_length(),
            Some(source.bytes as i64),
            "{key}: the archived object's size"
        );
        assert_eq!(archive["md5"], source.md5.as_str(), "{key}: recorded MD5");
    }
    broker.cleanup().await;
    let total = (tracks as u64 * source.bytes) as f64;
    Measure {
        mb_per_s: total / 1e6 / seconds,
        peak_rss_mib: rss,
        cpu_s_per_gb: cpu / (total / 1e9),
        machine_busy,
    }
}

/// `copies` `rclone copyurl` processes at once, each copying a file of
/// `source`'s size from the origin to S3, both through `link`.
async fn rclone_run(source: &Source<'_>, link: Link, copies: usize) -> Measure {
    let (s3, s3_proxy, origin_proxy) = links(source.origin, link).await;
    let name = unique("wan-rclone");
    let jobs: Vec<(String, String)> = (0..copies)
        .map(|i| {
            let url = source.serve(&format!("{name}-{i}"), &origin_proxy);
            (url, format!("rclone/{name}-{i}.mp4"))
        })
        .collect();
    let endpoint = format!("http://{}", s3_proxy.addr);
    let started = Instant::now();
    let ticks = CpuTicks::now();
    let runs: Vec<_> = jobs
        .iter()
        .map(|(url, key)| {
            let child = rclone(&endpoint)
                .args(["copyurl", url, &format!("bench:{BUCKET}/{key}")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("rclone runs (scripts/ensure-rclone.sh installs it)");
            tokio::task::spawn_blocking(move || reap(child))
        })
        .collect();
    let (mut cpu, mut rss) = (0.0, 0f64);
    for (run, (url, _)) in runs.into_iter().zip(&jobs) {
        let exit = run.await.unwrap();
        assert!(exit.success, "rclone copyurl {url} failed: {}", exit.stderr);
        cpu += exit.cpu_seconds;
        rss = rss.max(exit.peak_rss_mib);
    }
    let seconds = started.elapsed().as_secs_f64();
    let machine_busy = ticks.busy_share_since();
    // Read every copy back (straight from the server, not through the link).
    let client = s3.client();
    for (_, key) in &jobs {
        let md5 = object_md5(&client, key).await;
        assert_eq!(
            md5, source.md5,
            "{key}: rclone's copy differs from the source"
        );
    }
    let total = (copies as u64 * source.bytes) as f64;
    Measure {
        mb_per_s: total / 1e6 / seconds,
        peak_rss_mib: rss,
        cpu_s_per_gb: cpu / (total / 1e9),
        machine_busy,
    }
}

/// An rclone command whose remote `bench:` is the S3 store behind `endpoint`,
/// configured by environment alone (no config file), every other setting
/// rclone's default.
fn rclone(endpoint: &str) -> Command {
    let mut command = Command::new("rclone");
    // An empty config file path: rclone reads no config file of this machine's.
    command.env("RCLONE_CONFIG", "");
    // A CA bundle named by the machine's environment makes rclone 1.60's S3
    // client fail before its first request ("unable to load custom CA bundle,
    // HTTPClient's transport unsupported type"); the store here speaks plain
    // HTTP and needs none. No rclone flag is needed against s3s-fs 0.14.
    command.env_remove("AWS_CA_BUNDLE");
    for (key, value) in [
        ("TYPE", "s3"),
        ("PROVIDER", "Other"),
        ("ENDPOINT", endpoint),
        ("ACCESS_KEY_ID", ACCESS_KEY),
        ("SECRET_ACCESS_KEY", SECRET_KEY),
        ("FORCE_PATH_STYLE", "true"),
        ("REGION", "us-east-1"),
    ] {
        command.env(format!("RCLONE_CONFIG_BENCH_{key}"), value);
    }
    command
}

/// How a child process ended, and what it cost.
struct Exit {
    success: bool,
    stderr: String,
    cpu_seconds: f64,
    peak_rss_mib: f64,
}

/// Wait for `child` to exit (blocking) and read its resource usage, which
/// `std::process::Child::wait` does not give: `wait4` reaps it instead.
fn reap(mut child: std::process::Child) -> Exit {
    use std::io::Read;
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    let mut status = 0;
    // SAFETY: rusage is plain integers, for which all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child (not reaped elsewhere: `Child::wait` is
    // never called); both pointers are to live locals the call fills.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert!(pid > 0, "wait4 on rclone failed");
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Exit {
        success: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        stderr,
        cpu_seconds: seconds(usage.ru_utime) + seconds(usage.ru_stime),
        // ru_maxrss is in KiB on Linux.
        peak_rss_mib: usage.ru_maxrss as f64 / 1024.0,
    }
}

/// The MD5 of an object, streamed (objects of hundreds of MiB).
async fn object_md5(client: &aws_sdk_s3::Client, key: &str) -> String {
    let mut body = client
        .get_object()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {key}: {e}"))
        .body;
    let mut hasher = Md5::new();
    while let Some(chunk) = body.next().await {
        hasher.update(chunk.unwrap());
    }
    hex::encode(hasher.finalize())
}
