//! Scenario A: fairness between apps. App A publishes a backlog of lessons
//! to archive; once the worker is busy with it, app B publishes a few small
//! lessons, one every 200 ms. B's lesson wait (its publish to its record) is
//! compared with the same lessons on an idle worker, in the same run; A's
//! throughput with B against a run of A alone. The same A + B run on one
//! queue (no `[apps]` tables, first come first served) shows what the lanes
//! change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use lesson_replay::broker::headers::callback_headers;
use lesson_replay::config::apps::AppSettings;
use lesson_replay::config::settings::{Config, PayloadSigning};

use crate::common::Broker;
use crate::common::origin::{Body, Faults, Origin};
use crate::common::s3::S3Server;
use crate::harness::{MIB, Plan, lesson, percentile, records_config, round, start_worker};

const APP_A: i64 = 1400000101;
const APP_B: i64 = 1400000102;
/// B's lessons arrive this far apart.
const B_SPACING: Duration = Duration::from_millis(200);

/// What scenario A measured.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FairnessResults {
    pub(crate) a_lessons: usize,
    pub(crate) b_lessons: usize,
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

impl FairnessResults {
    pub(crate) fn b_p90_within_2x(&self) -> bool {
        self.lanes_p90_ms <= 2.0 * self.idle_p90_ms
    }

    pub(crate) fn a_throughput_ratio(&self) -> f64 {
        self.a_with_b_per_s / self.a_alone_per_s
    }
}

/// Run scenario A.
pub(crate) async fn run(plan: &Plan, origin: &Origin) -> FairnessResults {
    let (a_lessons, a_bytes, b_lessons, b_bytes) = plan.fairness;
    let a_urls: Vec<String> = (0..a_lessons)
        .map(|i| synthetic(origin, &format!("/fair-a-{i}.mp4"), a_bytes))
        .collect();
    let b_urls: Vec<String> = (0..b_lessons)
        .map(|i| synthetic(origin, &format!("/fair-b-{i}.mp4"), b_bytes))
        .collect();
    let a = |round: &str| -> Vec<Vec<u8>> {
        a_urls
            .iter()
            .enumerate()
            .map(|(i, url)| {
                lesson(
                    &format!("a-{round}-{i}"),
                    &[(url.clone(), a_bytes as usize, 0)],
                )
            })
            .collect()
    };
    let b = |round: &str| -> Vec<Vec<u8>> {
        b_urls
            .iter()
            .enumerate()
            .map(|(i, url)| {
                lesson(
                    &format!("b-{round}-{i}"),
                    &[(url.clone(), b_bytes as usize, 0)],
                )
            })
            .collect()
    };
    eprintln!("   B alone (idle worker) ...");
    let idle = round_of(plan, true, Vec::new(), b("idle")).await;
    eprintln!(
        "   A alone ({a_lessons} lessons of {} MiB) ...",
        a_bytes / MIB
    );
    let alone = round_of(plan, true, a("alone"), Vec::new()).await;
    eprintln!("   A, then B, with lanes ...");
    let lanes = round_of(plan, true, a("lanes"), b("lanes")).await;
    eprintln!("   A, then B, on one queue ...");
    let one_queue = round_of(plan, false, a("one"), b("one")).await;
    let p = |waits: &[f64], q: f64| percentile(&mut waits.to_vec(), q);
    let results = FairnessResults {
        a_lessons,
        b_lessons,
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
        "   B wait p50/p90 ms: idle {:.0}/{:.0}, lanes {:.0}/{:.0}, one queue {:.0}/{:.0}; A {:.2}/s alone, {:.2}/s with B",
        results.idle_p50_ms,
        results.idle_p90_ms,
        results.lanes_p50_ms,
        results.lanes_p90_ms,
        results.one_queue_p50_ms,
        results.one_queue_p90_ms,
        results.a_alone_per_s,
        results.a_with_b_per_s
    );
    results
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
}

/// One worker process (with a lane per app, or one queue), A's lessons
/// queued before it starts, B's published one by one once A's are under way.
async fn round_of(plan: &Plan, lanes: bool, a: Vec<Vec<u8>>, b: Vec<Vec<u8>>) -> Round {
    let s3 = S3Server::start("app-a");
    std::fs::create_dir_all(s3.root.join("app-b")).unwrap();
    let mut config = records_config(plan);
    s3.configure(&mut config, "app-a");
    settings(&mut config, plan);
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
    let mut worker = start_worker(&broker.config);
    // B arrives once A's backlog is under way: its first record is out.
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
    }
}

/// The worker settings of every round.
fn settings(config: &mut Config, plan: &Plan) {
    config.concurrency = plan.archive_concurrency;
    config.s3_part_size_bytes = plan.part_size;
    config.fetch_idle_timeout_secs = 120;
    // As archive.rs: s3s-fs speaks plain HTTP, where `auto` would sign every byte.
    config.s3_payload_signing = PayloadSigning::Unsigned;
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
        assert!(Instant::now() < deadline, "scenario A: records missing");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The summary's part for scenario A.
pub(crate) fn summary(r: &FairnessResults) -> serde_json::Value {
    serde_json::json!({
        "a_lessons": r.a_lessons, "b_lessons": r.b_lessons,
        "b_wait_idle_p50_ms": round(r.idle_p50_ms, 1), "b_wait_idle_p90_ms": round(r.idle_p90_ms, 1),
        "b_wait_lanes_p50_ms": round(r.lanes_p50_ms, 1), "b_wait_lanes_p90_ms": round(r.lanes_p90_ms, 1),
        "b_wait_one_queue_p50_ms": round(r.one_queue_p50_ms, 1),
        "b_wait_one_queue_p90_ms": round(r.one_queue_p90_ms, 1),
        "a_alone_per_s": round(r.a_alone_per_s, 2), "a_with_b_per_s": round(r.a_with_b_per_s, 2),
        "a_throughput_ratio": round(r.a_throughput_ratio(), 3),
    })
}
