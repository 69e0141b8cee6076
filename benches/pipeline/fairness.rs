//! Scenario 10: fairness between apps. App A publishes a backlog of lessons
//! to archive; once the worker is busy with it, app B publishes a few small
//! lessons, one every 200 ms. B's lesson wait (its publish to its record) is
//! compared with the same lessons on an idle worker, in the same run; A's
//! throughput with B against a run of A alone. The same A + B run on one
//! queue (no `[apps]` tables, first come first served) shows what the lanes
//! change. Each app archives to a bucket of its own on one store.
//!
//! Every run goes twice: through scenario 9's WAN proxies in front of the
//! origin and the store (as in production, where both are across the
//! internet), and with no delay and no caps (D = 0), where the origin, the
//! store, the broker and the worker share this machine's two cores.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use lesson_replay::broker::headers::callback_headers;
use lesson_replay::broker::topology;
use lesson_replay::config::apps::AppSettings;

use crate::common::Broker;
use crate::common::origin::{Body, Faults, Origin};
use crate::common::s3::configure_store;
use crate::harness::{
    CpuTicks, MIB, Plan, lesson, percentile, records_config, round, start_worker,
};
use crate::wan::{WAN, archive_settings, links};
use crate::wan_proxy::{Link, WanProxy};

const APP_A: i64 = 1400000101;
const APP_B: i64 = 1400000102;
/// B's lessons arrive this far apart.
const B_SPACING: Duration = Duration::from_millis(200);

/// What scenario 10 measured, over one link.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FairnessRuns {
    /// B's wait on an idle worker, ms.
    pub(crate) idle_p50_ms: f64,
    pub(crate) idle_p90_ms: f64,
    /// B's wait during A's backlog, with lanes, ms.
    pub(crate) lanes_p50_ms: f64,
    pub(crate) lanes_p90_ms: f64,
    /// B's wait during A's backlog on one queue, ms.
    pub(crate) one_queue_p50_ms: f64,
    pub(crate) one_queue_p90_ms: f64,
    /// A's lessons per second alone, and with B's lessons arriving.
    pub(crate) a_alone_per_s: f64,
    pub(crate) a_with_b_per_s: f64,
}

impl FairnessRuns {
    pub(crate) fn b_p90_within_2x(&self) -> bool {
        self.lanes_p90_ms <= 2.0 * self.idle_p90_ms
    }

    pub(crate) fn a_throughput_ratio(&self) -> f64 {
        self.a_with_b_per_s / self.a_alone_per_s
    }
}

/// Scenario 10 over the WAN link and with none.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FairnessResults {
    pub(crate) a_lessons: usize,
    pub(crate) b_lessons: usize,
    pub(crate) wan: FairnessRuns,
    pub(crate) local: FairnessRuns,
}

/// Run scenario 10.
pub(crate) async fn run(plan: &Plan, origin: &Origin) -> FairnessResults {
    let (a_lessons, a_bytes, b_lessons, b_bytes) = plan.fairness;
    let a_urls: Vec<String> = (0..a_lessons)
        .map(|i| synthetic(origin, &format!("/fair-a-{i}.mp4"), a_bytes))
        .collect();
    let b_urls: Vec<String> = (0..b_lessons)
        .map(|i| synthetic(origin, &format!("/fair-b-{i}.mp4"), b_bytes))
        .collect();
    let a = Lessons {
        app: "a",
        urls: &a_urls,
        bytes: a_bytes,
    };
    let b = Lessons {
        app: "b",
        urls: &b_urls,
        bytes: b_bytes,
    };
    let none = Lessons { urls: &[], ..a };
    let mut results = FairnessResults {
        a_lessons,
        b_lessons,
        ..FairnessResults::default()
    };
    for (name, link) in [("WAN", WAN), ("D=0", Link::local())] {
        eprintln!("   {name}: B alone (idle worker) ...");
        let idle = round_of(plan, origin, link, true, &none, &b, &format!("{name}-idle")).await;
        eprintln!(
            "   {name}: A alone ({a_lessons} lessons of {} MiB) ...",
            a_bytes / MIB
        );
        let alone = round_of(
            plan,
            origin,
            link,
            true,
            &a,
            &none,
            &format!("{name}-alone"),
        )
        .await;
        eprintln!("   {name}: A, then B, with lanes ...");
        let lanes = round_of(plan, origin, link, true, &a, &b, &format!("{name}-lanes")).await;
        eprintln!("   {name}: A, then B, on one queue ...");
        let one_queue = round_of(plan, origin, link, false, &a, &b, &format!("{name}-one")).await;
        let p = |waits: &[f64], q: f64| percentile(&mut waits.to_vec(), q);
        let runs = FairnessRuns {
            idle_p50_ms: p(&idle.b_waits_ms, 0.5),
            idle_p90_ms: p(&idle.b_waits_ms, 0.9),
            lanes_p50_ms: p(&lanes.b_waits_ms, 0.5),
            lanes_p90_ms: p(&lanes.b_waits_ms, 0.9),
            one_queue_p50_ms: p(&one_queue.b_waits_ms, 0.5),
            one_queue_p90_ms: p(&one_queue.b_waits_ms, 0.9),
            a_alone_per_s: alone.a_per_s,
            a_with_b_per_s: lanes.a_per_s,
        };
        eprintln!(
            "   {name}: B wait p50/p90 ms: idle {:.0}/{:.0}, lanes {:.0}/{:.0}, one queue {:.0}/{:.0}; \
             A {:.2}/s alone, {:.2}/s with B; machine busy {:.0} % (lanes)",
            runs.idle_p50_ms,
            runs.idle_p90_ms,
            runs.lanes_p50_ms,
            runs.lanes_p90_ms,
            runs.one_queue_p50_ms,
            runs.one_queue_p90_ms,
            runs.a_alone_per_s,
            runs.a_with_b_per_s,
            lanes.machine_busy * 100.0
        );
        if name == "WAN" {
            results.wan = runs;
        } else {
            results.local = runs;
        }
    }
    results
}

/// One app's lessons of a round: one file each.
#[derive(Clone, Copy)]
struct Lessons<'a> {
    app: &'static str,
    urls: &'a [String],
    bytes: u64,
}

impl Lessons<'_> {
    /// The callbacks of round `tag`, their files reached through `proxy`.
    fn bodies(&self, origin: &Origin, proxy: &WanProxy, tag: &str) -> Vec<Vec<u8>> {
        self.urls
            .iter()
            .enumerate()
            .map(|(i, url)| {
                let url = url.replacen(&origin.base, &format!("http://{}", proxy.addr), 1);
                lesson(
                    &format!("{}-{tag}-{i}", self.app),
                    &[(url, self.bytes as usize, 0)],
                )
            })
            .collect()
    }
}

fn synthetic(origin: &Origin, path: &str, bytes: u64) -> String {
    origin.add_body(
        path,
        Body::Synthetic {
            head: vec![],
            filler_len: bytes,
            tail: vec![],
        },
        Faults::default(),
    )
}

struct Round {
    /// Each of B's lessons, from its publish to its record, ms.
    b_waits_ms: Vec<f64>,
    /// A's lessons per second, from the worker's start to A's last record.
    a_per_s: f64,
    /// The machine's busy share from the worker's start to the last record.
    machine_busy: f64,
}

/// One worker process (with a lane per app, or one queue), A's lessons
/// queued before it starts, B's published one by one once A's are under way.
async fn round_of(
    plan: &Plan,
    origin: &Origin,
    link: Link,
    lanes: bool,
    a: &Lessons<'_>,
    b: &Lessons<'_>,
    tag: &str,
) -> Round {
    let (s3, s3_proxy, origin_proxy) = links(origin, link).await;
    for bucket in ["app-a", "app-b"] {
        std::fs::create_dir_all(s3.root.join(bucket)).unwrap();
    }
    let (a, b) = (
        a.bodies(origin, &origin_proxy, tag),
        b.bodies(origin, &origin_proxy, tag),
    );
    let mut config = records_config(plan);
    configure_store(&mut config, &format!("http://{}", s3_proxy.addr), "app-a");
    // As scenario 9 (BENCH_UPLOAD_CONCURRENCY, BENCH_ARCHIVE_MEMORY_BYTES apply).
    archive_settings(&mut config, plan);
    if lanes {
        let b_table = AppSettings {
            s3_bucket: Some("app-b".into()),
            ..AppSettings::default()
        };
        config
            .apps
            .insert(APP_A.to_string(), AppSettings::default());
        config.apps.insert(APP_B.to_string(), b_table);
    }
    let broker = Broker::new(config).await;
    let (a_count, b_count) = (a.len(), b.len());
    let a_header = APP_A.to_string();
    for body in &a {
        broker
            .publish(body, callback_headers(None, None, Some(&a_header)))
            .await;
    }
    let arrivals = watch_records(&broker).await;
    let started = Instant::now();
    let ticks = CpuTicks::now();
    let mut worker = start_worker(&broker.config);
    // B arrives once the worker consumes B's queue (its lane, or the one
    // queue), and once A's backlog is under way: its first record is out.
    let b_queue = match lanes {
        true => topology::app_queue(&broker.config.work_queue, Some(APP_B)),
        false => broker.config.work_queue.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while broker.consumers(&b_queue).await == 0 {
        assert!(
            Instant::now() < deadline,
            "scenario 10: the worker did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if a_count > 0 {
        wait_for(
            &arrivals,
            |seen| seen.keys().any(|t| t.starts_with("a-")),
            600,
        )
        .await;
    }
    let b_header = APP_B.to_string();
    let mut published = HashMap::new();
    for (i, body) in b.iter().enumerate() {
        let task = serde_json::from_slice::<serde_json::Value>(body).unwrap()["task_id"]
            .as_str()
            .unwrap()
            .to_owned();
        published.insert(task, Instant::now());
        broker
            .publish(body, callback_headers(None, None, Some(&b_header)))
            .await;
        if i + 1 < b.len() {
            tokio::time::sleep(B_SPACING).await;
        }
    }
    wait_for(&arrivals, |seen| seen.len() == a_count + b_count, 1800).await;
    let machine_busy = ticks.busy_share_since();
    let seen = arrivals.lock().unwrap().clone();
    let b_waits_ms = published
        .iter()
        .map(|(task, at)| (seen[task] - *at).as_secs_f64() * 1000.0)
        .collect();
    let a_last = seen
        .iter()
        .filter(|(t, _)| t.starts_with("a-"))
        .map(|(_, at)| *at)
        .max();
    let a_per_s = a_last.map_or(0.0, |last| a_count as f64 / (last - started).as_secs_f64());
    worker.terminate();
    worker.wait_exit(Duration::from_secs(30));
    broker.cleanup().await;
    Round {
        b_waits_ms,
        a_per_s,
        machine_busy,
    }
}

type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

/// When each record arrives, by task id, consumed as they come.
async fn watch_records(broker: &Broker) -> Arrivals {
    let arrivals: Arrivals = Arc::default();
    let channel = broker.connection.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            broker.config.records_queue.as_str().into(),
            "fairness".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let seen = arrivals.clone();
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let at = Instant::now();
            let record: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap();
            if let Some(task) = record["task_id"].as_str() {
                seen.lock().unwrap().insert(task.to_owned(), at);
            }
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        }
    });
    arrivals
}

async fn wait_for(
    arrivals: &Arrivals,
    done: impl Fn(&HashMap<String, Instant>) -> bool,
    limit_secs: u64,
) {
    let deadline = Instant::now() + Duration::from_secs(limit_secs);
    while !done(&arrivals.lock().unwrap()) {
        assert!(Instant::now() < deadline, "scenario 10: records missing");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The summary's part for scenario 10.
pub(crate) fn summary(r: &FairnessResults) -> serde_json::Value {
    let runs = |f: &FairnessRuns| {
        serde_json::json!({
            "b_wait_idle_p50_ms": round(f.idle_p50_ms, 1), "b_wait_idle_p90_ms": round(f.idle_p90_ms, 1),
            "b_wait_lanes_p50_ms": round(f.lanes_p50_ms, 1), "b_wait_lanes_p90_ms": round(f.lanes_p90_ms, 1),
            "b_wait_one_queue_p50_ms": round(f.one_queue_p50_ms, 1),
            "b_wait_one_queue_p90_ms": round(f.one_queue_p90_ms, 1),
            "a_alone_per_s": round(f.a_alone_per_s, 2), "a_with_b_per_s": round(f.a_with_b_per_s, 2),
            "a_throughput_ratio": round(f.a_throughput_ratio(), 3),
        })
    };
    serde_json::json!({"a_lessons": r.a_lessons, "b_lessons": r.b_lessons,
        "wan": runs(&r.wan), "d0": runs(&r.local)})
}
