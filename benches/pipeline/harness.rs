//! What every scenario shares: the sizes of a run, loading the broker,
//! reading a worker's memory and metrics, describing the machine.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lapin::options::BasicPublishOptions;
use lesson_replay::broker::amqp;
use lesson_replay::config::settings::Config;
use serde_json::{Value, json};

use crate::common::messages::{finished, video};
use crate::common::{Broker, WorkerProcess, isolated_config};

pub(crate) const MIB: u64 = 1024 * 1024;

/// Sizes of one run.
pub(crate) struct Plan {
    pub(crate) records: usize,
    pub(crate) archive_files: usize,
    pub(crate) archive_file_bytes: u64,
    pub(crate) probe_file_bytes: u64,
    pub(crate) latency_seconds: f64,
    /// How long scenario 8 runs at the model's peak.
    pub(crate) model_seconds: f64,
    pub(crate) concurrency: u16,
    pub(crate) archive_concurrency: u16,
    /// Alternating rounds of the archive scenario and its plain copy.
    pub(crate) archive_rounds: usize,
    pub(crate) part_size: usize,
    /// The worker's `archive_memory_bytes` in scenarios 2 and 3: the default
    /// in a full run; in a smoke run small enough that the tiny files fill it
    /// too (memory is flat only once the files outgrow the budget).
    pub(crate) archive_memory_bytes: u64,
    /// Callbacks sent to the ingress (scenario 7).
    pub(crate) callbacks: usize,
    /// Scenario 9: the one-file lesson's file, each of the 3-track lesson's
    /// files, and what each connection streams in the proxy's self-check.
    pub(crate) wan_file_bytes: u64,
    pub(crate) wan_track_bytes: u64,
    pub(crate) wan_check_bytes: u64,
    /// Scenario A: app A's lessons and each one's file size, app B's
    /// lessons and each one's file size.
    pub(crate) fairness: (usize, u64, usize, u64),
    /// Scenario B: lessons of the cost runs; app A's events (its endpoint
    /// hanging) and app B's lessons of the fairness runs.
    pub(crate) webhook_lessons: usize,
    pub(crate) webhook_fairness: (usize, usize),
}

impl Plan {
    pub(crate) fn full() -> Plan {
        Plan {
            records: 20_000,
            archive_files: 8,
            archive_file_bytes: 256 * MIB,
            probe_file_bytes: 1024 * MIB,
            latency_seconds: 10.0,
            model_seconds: 60.0,
            concurrency: 16,
            archive_concurrency: 4,
            archive_rounds: 3,
            part_size: 8 * MIB as usize,
            archive_memory_bytes: Config::default().archive_memory_bytes,
            callbacks: 20_000,
            wan_file_bytes: 512 * MIB,
            wan_track_bytes: 256 * MIB,
            wan_check_bytes: 64 * MIB,
            fairness: (200, 24 * MIB, 10, MIB),
            webhook_lessons: 5_000,
            webhook_fairness: (64, 20),
        }
    }

    pub(crate) fn smoke() -> Plan {
        Plan {
            records: 300,
            archive_files: 2,
            archive_file_bytes: 12 * MIB,
            probe_file_bytes: 64 * MIB,
            latency_seconds: 1.0,
            model_seconds: 5.0,
            concurrency: 16,
            archive_concurrency: 2,
            archive_rounds: 1,
            part_size: 5 * MIB as usize,
            archive_memory_bytes: 4 * 5 * MIB,
            callbacks: 500,
            wan_file_bytes: 12 * MIB,
            wan_track_bytes: 6 * MIB,
            wan_check_bytes: 8 * MIB,
            fairness: (12, 6 * MIB, 3, MIB),
            webhook_lessons: 200,
            webhook_fairness: (16, 5),
        }
    }
}

/// A lesson of the benchmark: one video per `(url, size, video_type)`, half a
/// second apart, each 2 s long.
pub(crate) fn lesson(task: &str, videos: &[(String, usize, i64)]) -> Vec<u8> {
    let videos = videos
        .iter()
        .enumerate()
        .map(|(i, (url, size, kind))| {
            let user = if *kind == 2 {
                String::new()
            } else {
                format!("user{i}")
            };
            video(
                url,
                &format!("{task}-{i}"),
                *kind,
                &user,
                *size,
                2000,
                i as i64 * 500,
            )
        })
        .collect();
    finished(task, 4242, videos)
}

/// Publish many messages, confirms pipelined.
/// A worker's `/metrics` text.
pub(crate) async fn scrape(port: u16) -> String {
    let url = format!("http://127.0.0.1:{port}/metrics");
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// Publish `body` to `exchange` without waiting: the confirm to await.
pub(crate) async fn publish_unconfirmed(
    channel: &lapin::Channel,
    exchange: &str,
    body: &[u8],
) -> lapin::PublisherConfirm {
    channel
        .basic_publish(
            exchange.into(),
            "bench".into(),
            BasicPublishOptions::default(),
            body,
            amqp::json_properties(),
        )
        .await
        .unwrap()
}

pub(crate) async fn preload(broker: &Broker, bodies: impl Iterator<Item = Vec<u8>>) {
    let mut pending = Vec::new();
    for body in bodies {
        let confirm =
            publish_unconfirmed(&broker.channel, &broker.config.inbound_exchange, &body).await;
        pending.push(confirm);
        if pending.len() == 1000 {
            for c in pending.drain(..) {
                c.await.unwrap();
            }
        }
    }
    for c in pending {
        c.await.unwrap();
    }
}

pub(crate) async fn wait_for_depth(broker: &Broker, queue: &str, want: u32, limit: Duration) {
    let deadline = Instant::now() + limit;
    while broker.depth(queue).await < want {
        assert!(
            Instant::now() < deadline,
            "{queue} did not reach {want} messages"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) fn quiet() -> std::process::Stdio {
    std::process::Stdio::null()
}

/// A worker process logging as in production: JSON lines at `info` (the
/// tests' harness asks for text), to nowhere — or appended to the file
/// `BENCH_WORKER_LOG` names, to follow records in time.
pub(crate) fn start_worker(config: &Config) -> WorkerProcess {
    let log = match std::env::var("BENCH_WORKER_LOG") {
        Ok(path) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("BENCH_WORKER_LOG: cannot open the file")
            .into(),
        Err(_) => quiet(),
    };
    WorkerProcess::start_with_env(
        "worker",
        config,
        "info",
        log,
        &[("LESSON_REPLAY_LOG_FORMAT", "json")],
    )
}

/// Peak resident set size of a process, MiB (VmHWM).
pub(crate) fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Give the worker a metrics listener on a free loopback port; returns the port.
pub(crate) fn serve_metrics(config: &mut Config) -> u16 {
    let port = crate::common::free_port();
    config.metrics_addr = format!("127.0.0.1:{port}");
    port
}

/// The records path's settings: the defaults, probing every track, with the
/// plan's concurrency.
pub(crate) fn records_config(plan: &Plan) -> Config {
    let mut config = isolated_config("bench");
    config.probe = true;
    config.concurrency = plan.concurrency;
    config.shutdown_grace_secs = 10;
    config
}

/// Mean seconds per observation of each `*_duration_seconds` series, from a
/// worker's `/metrics` text, keyed by metric and label (e.g. `stage="probe"`).
pub(crate) fn mean_durations(metrics: &str) -> Value {
    let mut sums: HashMap<String, f64> = HashMap::new();
    let mut counts: HashMap<String, f64> = HashMap::new();
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let value: f64 = value.parse().unwrap_or(0.0);
        if let Some(key) = series
            .split_once("_sum")
            .map(|(name, labels)| format!("{name}{labels}"))
        {
            *sums.entry(key).or_default() += value;
        } else if let Some(key) = series
            .split_once("_count")
            .map(|(name, labels)| format!("{name}{labels}"))
        {
            *counts.entry(key).or_default() += value;
        }
    }
    let means: serde_json::Map<String, Value> = sums
        .iter()
        .filter(|(k, _)| counts.get(*k).is_some_and(|c| *c > 0.0))
        .map(|(k, s)| {
            let short = k
                .replace("lesson_replay_", "")
                .replace("_duration_seconds", "");
            (short, json!(round(s / counts[k] * 1000.0, 3)))
        })
        .collect();
    Value::Object(means)
}

pub(crate) fn command_output(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

pub(crate) fn machine() -> Value {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let rabbit = std::process::Command::new("rabbitmqctl")
        .args(["eval", "rabbit_misc:version()."])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .trim_matches('"')
                .to_owned()
        })
        .unwrap_or_default();
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_gib": (mem_gib * 10.0).round() / 10.0,
        "rustc": command_output("rustc", &["--version"]),
        "rabbitmq": rabbit,
        "s3_server": "s3s-fs 0.14.1",
        "lesson_replay": env!("CARGO_PKG_VERSION"),
    })
}

/// The median of `values` (the upper one of an even count); 0 when empty.
pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    percentile(&mut values, 0.5)
}

/// The medians of (p50, p99) pairs.
pub(crate) fn medians(rounds: &[(f64, f64)]) -> (f64, f64) {
    (
        median(rounds.iter().map(|r| r.0).collect()),
        median(rounds.iter().map(|r| r.1).collect()),
    )
}

pub(crate) fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// The `q` quantile (0..1) of `values`, sorted in place; 0 when empty.
pub(crate) fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let index = ((values.len() - 1) as f64 * q).round() as usize;
    values[index]
}

/// CPU seconds (user + system) a process has used so far, from `/proc`.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 14th field.
    let after = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf only reads a system constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / per_second.max(1.0)
}

/// The machine's CPU counters (`/proc/stat`, all cores): busy and total ticks.
#[derive(Clone, Copy)]
pub(crate) struct CpuTicks {
    busy: u64,
    total: u64,
}

impl CpuTicks {
    pub(crate) fn now() -> CpuTicks {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let ticks: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|t| t.parse().ok())
            .collect();
        let total: u64 = ticks.iter().sum();
        // idle + iowait: waiting, not working.
        let waiting = ticks.get(3).unwrap_or(&0) + ticks.get(4).unwrap_or(&0);
        CpuTicks {
            busy: total - waiting,
            total,
        }
    }

    /// The share of all cores' time that was busy since `self`, 0 to 1.
    pub(crate) fn busy_share_since(self) -> f64 {
        let now = CpuTicks::now();
        let total = now.total.saturating_sub(self.total);
        if total == 0 {
            return 0.0;
        }
        now.busy.saturating_sub(self.busy) as f64 / total as f64
    }
}
