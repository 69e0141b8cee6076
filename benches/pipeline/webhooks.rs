//! Scenario 11 (`BENCH_ONLY=b`): webhooks. A receiver in this process (axum,
//! answering 204 at once) stands for the school's endpoint.
//!
//! - **Cost**: N lessons (probing off) go through the worker twice: records
//!   only, then with a webhook URL (each record then also a signed POST).
//!   Records/s and deliveries/s side by side; the worker's CPU per lesson in
//!   each run, their difference is the CPU of one delivery.
//! - **Fairness**: app A's endpoint hangs (never answers: each attempt ends
//!   at `webhook_timeout_secs`); once A's events are in flight, app B's
//!   lessons arrive one every 200 ms. B's wait, from its lesson's publish to
//!   its event received, against B alone on an idle worker — with a lane per
//!   app, and on one queue (no `[apps]` tables: one endpoint that hangs for
//!   A's events) to show what the lanes change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use lesson_replay::broker::headers::callback_headers;
use lesson_replay::config::apps::AppSettings;
use lesson_replay::config::settings::Config;
use secrecy::SecretString;

use crate::common::Broker;
use crate::harness::{
    CpuTicks, Plan, cpu_seconds, lesson, percentile, preload, round, start_worker,
};

const APP_A: i64 = 1400000201;
const APP_B: i64 = 1400000202;
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// B's lessons arrive this far apart.
const B_SPACING: Duration = Duration::from_millis(200);

/// What scenario 11 measured.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct WebhookResults {
    pub(crate) lessons: usize,
    /// Records only: records/s and the worker's CPU per record, ms.
    pub(crate) records_per_s: f64,
    pub(crate) records_cpu_ms: f64,
    /// With a webhook: events delivered per second (the run's last delivery),
    /// and the worker's CPU per lesson (record and delivery), ms.
    pub(crate) deliveries_per_s: f64,
    pub(crate) with_webhook_cpu_ms: f64,
    /// The machine's busy share in each run.
    pub(crate) records_busy: f64,
    pub(crate) webhook_busy: f64,
    /// B's wait, publish to event received, ms: idle, with lanes, one queue.
    pub(crate) idle_p50_ms: f64,
    pub(crate) idle_p90_ms: f64,
    pub(crate) lanes_p50_ms: f64,
    pub(crate) lanes_p90_ms: f64,
    pub(crate) one_queue_p50_ms: f64,
    pub(crate) one_queue_p90_ms: f64,
}

impl WebhookResults {
    pub(crate) fn cpu_ms_per_delivery(&self) -> f64 {
        self.with_webhook_cpu_ms - self.records_cpu_ms
    }

    pub(crate) fn b_p90_within_2x(&self) -> bool {
        self.lanes_p90_ms <= 2.0 * self.idle_p90_ms.max(1.0)
    }
}

/// When each event arrived, by the task of its lesson.
type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

#[derive(Clone)]
struct Endpoint {
    arrivals: Arrivals,
    /// The app whose events are never answered.
    hang: Option<i64>,
}

async fn receive(
    State(endpoint): State<Endpoint>,
    Path(_name): Path<String>,
    body: Bytes,
) -> StatusCode {
    let event: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let data = &event["data"];
    if endpoint.hang.is_some() && data["sdkappid"].as_i64() == endpoint.hang {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    if let Some(task) = data["task_id"].as_str() {
        endpoint
            .arrivals
            .lock()
            .unwrap()
            .insert(task.to_owned(), Instant::now());
    }
    StatusCode::NO_CONTENT
}

/// Start a receiver; its base URL and what it records.
async fn receiver(hang: Option<i64>) -> (String, Arrivals) {
    let arrivals: Arrivals = Arc::default();
    let endpoint = Endpoint {
        arrivals: arrivals.clone(),
        hang,
    };
    let app = Router::new()
        .route("/{name}", post(receive))
        .with_state(endpoint);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, arrivals)
}

fn config(plan: &Plan) -> Config {
    let mut config = crate::harness::records_config(plan);
    config.probe = false;
    config.webhook_queue = format!("{}.webhooks", config.work_queue);
    config
}

fn with_webhook(config: &mut Config, url: String) {
    config.webhook_url = Some(url);
    config.webhook_secrets = vec![SecretString::from(SECRET)];
}

fn app_endpoint(config: &mut Config, app: i64, url: String) {
    config.apps.insert(
        app.to_string(),
        AppSettings {
            webhook_url: Some(url),
            webhook_secrets: Some(vec![SecretString::from(SECRET)]),
            ..AppSettings::default()
        },
    );
}

fn bodies(prefix: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let url = format!("https://1500.vod2.myqcloud.com/{prefix}/{i}.mp4");
            lesson(&format!("{prefix}-{i}"), &[(url, 1000, 0)])
        })
        .collect()
}

/// Scenario 11.
pub(crate) async fn run(plan: &Plan) -> WebhookResults {
    let n = plan.webhook_lessons;
    let mut results = WebhookResults {
        lessons: n,
        ..WebhookResults::default()
    };
    eprintln!("   cost: {n} lessons, records only ...");
    (
        results.records_per_s,
        results.records_cpu_ms,
        results.records_busy,
    ) = cost_round(plan, n, false).await;
    eprintln!("   cost: {n} lessons with a webhook each ...");
    (
        results.deliveries_per_s,
        results.with_webhook_cpu_ms,
        results.webhook_busy,
    ) = cost_round(plan, n, true).await;
    let (a, b) = plan.webhook_fairness;
    eprintln!("   fairness: B alone ({b} lessons) ...");
    (results.idle_p50_ms, results.idle_p90_ms) = fairness_round(plan, 0, b, true).await;
    eprintln!("   fairness: A ({a} events, endpoint hanging), then B, with lanes ...");
    (results.lanes_p50_ms, results.lanes_p90_ms) = fairness_round(plan, a, b, true).await;
    eprintln!("   fairness: the same on one queue ...");
    (results.one_queue_p50_ms, results.one_queue_p90_ms) = fairness_round(plan, a, b, false).await;
    results
}

/// `n` lessons preloaded, then one worker: per second (records, or events
/// delivered), the worker's CPU per lesson (ms), the machine's busy share.
async fn cost_round(plan: &Plan, n: usize, webhook: bool) -> (f64, f64, f64) {
    let (base, arrivals) = receiver(None).await;
    let mut config = config(plan);
    if webhook {
        with_webhook(&mut config, format!("{base}/school"));
    }
    let broker = Broker::new(config).await;
    preload(&broker, bodies("cost", n).into_iter()).await;
    let ticks = CpuTicks::now();
    let started = Instant::now();
    let mut worker = start_worker(&broker.config);
    let records = &broker.config.records_queue;
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let done = if webhook {
            arrivals.lock().unwrap().len() >= n
        } else {
            broker.depth(records).await as usize >= n
        };
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "scenario 11: lessons missing");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(worker.pid());
    let busy = ticks.busy_share_since();
    worker.terminate();
    worker.wait_exit(Duration::from_secs(30));
    broker.cleanup().await;
    (n as f64 / elapsed, cpu * 1000.0 / n as f64, busy)
}

/// A's `a` events to an endpoint that hangs, then B's `b` lessons one by
/// one: B's wait p50 and p90, ms.
async fn fairness_round(plan: &Plan, a: usize, b: usize, lanes: bool) -> (f64, f64) {
    let (base, arrivals) = receiver(Some(APP_A)).await;
    let mut config = config(plan);
    // The specification's deadline: a hanging endpoint holds each attempt 15 s.
    config.webhook_timeout_secs = 15;
    if lanes {
        app_endpoint(&mut config, APP_A, format!("{base}/a"));
        app_endpoint(&mut config, APP_B, format!("{base}/b"));
    } else {
        with_webhook(&mut config, format!("{base}/school"));
    }
    let broker = Broker::new(config).await;
    let mut worker = start_worker(&broker.config);
    let a_header = APP_A.to_string();
    for body in bodies("fair-a", a) {
        broker
            .publish(&body, callback_headers(None, None, Some(&a_header)))
            .await;
    }
    // A's events are in flight (their records are out) before B's lessons come.
    let deadline = Instant::now() + Duration::from_secs(120);
    while (broker.depth(&broker.config.records_queue).await as usize) < a {
        assert!(
            Instant::now() < deadline,
            "scenario 11: A's records missing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b_header = APP_B.to_string();
    let mut published = HashMap::new();
    for (i, body) in bodies("fair-b", b).into_iter().enumerate() {
        published.insert(format!("fair-b-{i}"), Instant::now());
        broker
            .publish(&body, callback_headers(None, None, Some(&b_header)))
            .await;
        tokio::time::sleep(B_SPACING).await;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let seen = arrivals.lock().unwrap().clone();
        if published.keys().all(|t| seen.contains_key(t)) {
            let mut waits: Vec<f64> = published
                .iter()
                .map(|(t, at)| (seen[t] - *at).as_secs_f64() * 1000.0)
                .collect();
            worker.kill();
            broker.cleanup().await;
            return (percentile(&mut waits, 0.5), percentile(&mut waits, 0.9));
        }
        assert!(Instant::now() < deadline, "scenario 11: B's events missing");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The summary's part for scenario 11.
pub(crate) fn summary(r: &WebhookResults) -> serde_json::Value {
    serde_json::json!({
        "lessons": r.lessons,
        "records_per_s": round(r.records_per_s, 1),
        "deliveries_per_s": round(r.deliveries_per_s, 1),
        "records_cpu_ms_per_lesson": round(r.records_cpu_ms, 3),
        "with_webhook_cpu_ms_per_lesson": round(r.with_webhook_cpu_ms, 3),
        "cpu_ms_per_delivery": round(r.cpu_ms_per_delivery(), 3),
        "records_machine_busy": round(r.records_busy, 2),
        "webhook_machine_busy": round(r.webhook_busy, 2),
        "b_wait_idle_p50_ms": round(r.idle_p50_ms, 1), "b_wait_idle_p90_ms": round(r.idle_p90_ms, 1),
        "b_wait_lanes_p50_ms": round(r.lanes_p50_ms, 1), "b_wait_lanes_p90_ms": round(r.lanes_p90_ms, 1),
        "b_wait_one_queue_p50_ms": round(r.one_queue_p50_ms, 1),
        "b_wait_one_queue_p90_ms": round(r.one_queue_p90_ms, 1),
    })
}

/// Scenario 11's rows.
pub(crate) fn rows(r: &WebhookResults) -> Vec<(&'static str, String, String, String)> {
    vec![
        (
            "webhooks: per second",
            format!("{:.0}", r.deliveries_per_s),
            format!("records only {:.0}", r.records_per_s),
            format!("{} lessons, a delivery each", r.lessons),
        ),
        (
            "webhooks: CPU ms/lesson",
            format!("{:.3}", r.with_webhook_cpu_ms),
            format!("records only {:.3}", r.records_cpu_ms),
            format!("{:.3} ms per delivery", r.cpu_ms_per_delivery()),
        ),
        (
            "webhooks: B wait p50/p90",
            format!("{:.0} / {:.0} ms", r.lanes_p50_ms, r.lanes_p90_ms),
            format!("idle {:.0} / {:.0}", r.idle_p50_ms, r.idle_p90_ms),
            format!(
                "1 queue {:.0}/{:.0}; A hangs; target p90 <= 2x idle",
                r.one_queue_p50_ms, r.one_queue_p90_ms
            ),
        ),
    ]
}
