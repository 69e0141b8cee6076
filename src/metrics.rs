//! Metrics: every Prometheus metric of the worker, defined here once with its
//! help text, and the HTTP listener serving `/metrics`, `/healthz` and `/readyz`.
//!
//! Names follow the Prometheus conventions: one `lesson_replay_` prefix, base
//! units, `_total` counters, `_seconds`/`_bytes` suffixes. Labels are
//! low-cardinality only — outcome, reason code, stage, tier, target, status
//! class — never a room, task or user id. Call sites use the named methods
//! below, never raw label strings of their own.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramTimer, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::worker::Health;

/// Buckets for whole-message and stage durations, in seconds.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 900.0,
];

/// The worker's metrics. Cloning is cheap: clones share the same series.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    messages: IntCounterVec,
    pub processing_seconds: Histogram,
    stage_seconds: HistogramVec,
    pub downloaded_bytes: IntCounter,
    pub uploaded_bytes: IntCounter,
    pub uploads_skipped: IntCounter,
    pub range_resumes: IntCounter,
    pub probe_bytes: IntCounter,
    in_flight: IntGauge,
    pub concurrency: IntGauge,
    retries: IntCounterVec,
    pub broker_connected: IntGauge,
    pub broker_reconnects: IntCounter,
    pub publish_confirm_seconds: Histogram,
    http_responses: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("valid metric");
    registry
        .register(Box::new(h.clone()))
        .expect("unique metric");
    h
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let stage_seconds = HistogramVec::new(
            HistogramOpts::new(
                "lesson_replay_stage_duration_seconds",
                "Time spent in one stage of processing a message (parse, probe, archive, publish).",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["stage"],
        )
        .expect("valid metric");
        r.register(Box::new(stage_seconds.clone()))
            .expect("unique metric");

        let build_info = IntGaugeVec::new(
            Opts::new(
                "lesson_replay_build_info",
                "Always 1; the labels name the running build.",
            ),
            &["version", "revision"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("LR_GIT_REVISION")])
            .set(1);
        r.register(Box::new(build_info)).expect("unique metric");

        Metrics {
            messages: counter_vec(
                &r,
                "lesson_replay_messages_total",
                "Inbound messages by outcome (published, skipped, retried, parked) and reason code.",
                &["outcome", "reason"],
            ),
            processing_seconds: histogram(
                &r,
                "lesson_replay_processing_duration_seconds",
                "End-to-end time from delivery to settlement of one message.",
                DURATION_BUCKETS,
            ),
            stage_seconds,
            downloaded_bytes: counter(
                &r,
                "lesson_replay_downloaded_bytes_total",
                "Bytes received from VOD origins, resumes included.",
            ),
            uploaded_bytes: counter(
                &r,
                "lesson_replay_uploaded_bytes_total",
                "Bytes uploaded to the S3-compatible store.",
            ),
            uploads_skipped: counter(
                &r,
                "lesson_replay_uploads_skipped_total",
                "Tracks found already archived (same size and MD5): upload skipped.",
            ),
            range_resumes: counter(
                &r,
                "lesson_replay_range_resumes_total",
                "Downloads resumed with a Range request after a dropped connection.",
            ),
            probe_bytes: counter(
                &r,
                "lesson_replay_probe_bytes_total",
                "Bytes read by range-read probes of MP4 files.",
            ),
            in_flight: gauge(
                &r,
                "lesson_replay_in_flight_messages",
                "Messages being processed right now.",
            ),
            concurrency: gauge(
                &r,
                "lesson_replay_concurrency",
                "Configured concurrency (the consumer prefetch).",
            ),
            retries: counter_vec(
                &r,
                "lesson_replay_retries_total",
                "Messages sent to a delay tier for a later attempt, by tier.",
                &["tier"],
            ),
            broker_connected: gauge(
                &r,
                "lesson_replay_broker_connected",
                "1 while connected to the broker and consuming, else 0.",
            ),
            broker_reconnects: counter(
                &r,
                "lesson_replay_broker_reconnects_total",
                "Broker sessions rebuilt after a loss.",
            ),
            publish_confirm_seconds: histogram(
                &r,
                "lesson_replay_publish_confirm_duration_seconds",
                "Time from publishing a record to the broker's confirm.",
                DURATION_BUCKETS,
            ),
            http_responses: counter_vec(
                &r,
                "lesson_replay_http_responses_total",
                "HTTP responses from the VOD origin and the S3 store, by status class (2xx, 4xx, 5xx, error).",
                &["target", "class"],
            ),
            registry: r,
        }
    }

    /// Count one message's outcome.
    pub fn message(&self, outcome: &str, reason: &str) {
        self.messages.with_label_values(&[outcome, reason]).inc();
    }

    /// Count a retry through the delay tier of `delay`.
    pub fn retry(&self, delay: Duration) {
        self.retries
            .with_label_values(&[&format!("{}s", delay.as_secs())])
            .inc();
    }

    /// Time one stage: observed when the timer is dropped or observed.
    pub fn stage_timer(&self, stage: &str) -> HistogramTimer {
        self.stage_seconds.with_label_values(&[stage]).start_timer()
    }

    /// Count an HTTP response (`status` None: no response at all).
    pub fn http_response(&self, target: &str, status: Option<u16>) {
        let class = match status {
            Some(s) => format!("{}xx", s / 100),
            None => "error".into(),
        };
        self.http_responses
            .with_label_values(&[target, &class])
            .inc();
    }

    /// Counts a message as in flight until dropped.
    pub fn in_flight_guard(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding never fails");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

pub struct InFlight(IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[derive(Clone)]
struct Endpoints {
    metrics: Metrics,
    health: Health,
}

/// Serve `/metrics`, `/healthz` (alive) and `/readyz` (consuming) on
/// `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
    let app = Router::new()
        .route("/metrics", get(metrics_endpoint))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready_endpoint))
        .with_state(Arc::new(Endpoints { metrics, health }));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics_endpoint(State(endpoints): State<Arc<Endpoints>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        endpoints.metrics.render(),
    )
}

async fn ready_endpoint(State(endpoints): State<Arc<Endpoints>>) -> impl IntoResponse {
    if endpoints.health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_conventions() {
        let metrics = Metrics::new();
        metrics.message("published", "");
        metrics.retry(Duration::from_secs(10));
        metrics.http_response("vod", Some(503));
        let text = metrics.render();
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut parts = line.split(' ').skip(2);
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(name.starts_with("lesson_replay_"), "{name}");
            assert_eq!(
                kind == "counter",
                name.ends_with("_total"),
                "{name} is a {kind}"
            );
        }
        assert!(
            text.contains(r#"lesson_replay_retries_total{tier="10s"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lesson_replay_http_responses_total{class="5xx",target="vod"} 1"#),
            "{text}"
        );
        assert!(text.contains("lesson_replay_build_info{"), "{text}");
    }

    #[test]
    fn in_flight_counts_until_dropped() {
        let metrics = Metrics::new();
        let guard = metrics.in_flight_guard();
        assert_eq!(metrics.in_flight.get(), 1);
        drop(guard);
        assert_eq!(metrics.in_flight.get(), 0);
    }
}
