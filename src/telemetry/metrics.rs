//! Metrics: every Prometheus metric of the product, defined here once with
//! its help text.
//!
//! Names follow the Prometheus conventions: one `lesson_replay_` prefix, base
//! units, `_total` counters, `_seconds`/`_bytes` suffixes. Labels are
//! low-cardinality, closed sets — [`Outcome`] × [`ReasonCode`], [`Stage`],
//! [`Target`] × [`StatusClass`], the delay tier — never a room, task or user
//! id. Call sites emit named events (`metrics.parked(reason)`,
//! `metrics.uploaded(bytes)`); no handle and no label string leaves this file.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramTimer, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::decision::reason::ReasonCode;

/// What became of one inbound message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Its record is published.
    Published,
    /// No finished recording: acknowledged without a record.
    Skipped,
    /// Sent to a delay tier for a later attempt.
    Retried,
    /// Copied to the parking queue.
    Parked,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Published,
        Outcome::Skipped,
        Outcome::Retried,
        Outcome::Parked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Published => "published",
            Outcome::Skipped => "skipped",
            Outcome::Retried => "retried",
            Outcome::Parked => "parked",
        }
    }
}

/// A timed stage of processing one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Decode, verify, normalize: the decision.
    Parse,
    /// Range-read probes of every track.
    Probe,
    /// Download and upload of one track.
    Archive,
    /// Publishing the record, until confirmed.
    Publish,
}

impl Stage {
    pub const ALL: [Stage; 4] = [Stage::Parse, Stage::Probe, Stage::Archive, Stage::Publish];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Parse => "parse",
            Stage::Probe => "probe",
            Stage::Archive => "archive",
            Stage::Publish => "publish",
        }
    }
}

/// Whom an HTTP request went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The VOD origin (downloads and probes).
    Vod,
    /// The S3-compatible store.
    S3,
    /// A school's webhook endpoint.
    Webhook,
}

impl Target {
    pub const ALL: [Target; 3] = [Target::Vod, Target::S3, Target::Webhook];

    pub fn as_str(self) -> &'static str {
        match self {
            Target::Vod => "vod",
            Target::S3 => "s3",
            Target::Webhook => "webhook",
        }
    }
}

/// What became of one attempt to deliver a webhook event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookOutcome {
    /// Answered 2xx.
    Delivered,
    /// Failed: sent to a webhook delay tier.
    Retried,
    /// Parked: 410 Gone, or the last attempt failed.
    Parked,
}

impl WebhookOutcome {
    pub const ALL: [WebhookOutcome; 3] = [
        WebhookOutcome::Delivered,
        WebhookOutcome::Retried,
        WebhookOutcome::Parked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WebhookOutcome::Delivered => "delivered",
            WebhookOutcome::Retried => "retried",
            WebhookOutcome::Parked => "parked",
        }
    }
}

/// The webhook events' types, for the events counter.
const WEBHOOK_EVENTS: [&str; 2] = [
    crate::webhook::event::REPLAY_READY,
    crate::webhook::event::REPLAY_FAILED,
];

/// An HTTP answer's status class, or no answer at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    Informational,
    Success,
    Redirect,
    ClientError,
    ServerError,
    /// No response: connection refused, reset, timeout.
    Error,
}

impl StatusClass {
    pub const ALL: [StatusClass; 6] = [
        StatusClass::Informational,
        StatusClass::Success,
        StatusClass::Redirect,
        StatusClass::ClientError,
        StatusClass::ServerError,
        StatusClass::Error,
    ];

    pub fn of(status: Option<u16>) -> StatusClass {
        match status {
            Some(100..=199) => StatusClass::Informational,
            Some(200..=299) => StatusClass::Success,
            Some(300..=399) => StatusClass::Redirect,
            Some(400..=499) => StatusClass::ClientError,
            Some(500..=599) => StatusClass::ServerError,
            _ => StatusClass::Error,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StatusClass::Informational => "1xx",
            StatusClass::Success => "2xx",
            StatusClass::Redirect => "3xx",
            StatusClass::ClientError => "4xx",
            StatusClass::ServerError => "5xx",
            StatusClass::Error => "error",
        }
    }
}

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
    processing_seconds: Histogram,
    stage_seconds: HistogramVec,
    downloaded_bytes: IntCounter,
    uploaded_bytes: IntCounter,
    uploads_skipped: IntCounter,
    orphan_uploads_aborted: IntCounter,
    orphan_uploads_left: IntCounter,
    parking_deferred: IntCounter,
    range_resumes: IntCounter,
    probe_bytes: IntCounter,
    in_flight: IntGauge,
    archive_memory: IntGauge,
    concurrency: IntGauge,
    retries: IntCounterVec,
    /// The `tier` labels of the configured delay tiers: any other delay is
    /// counted as `other`, so the label's values stay bounded.
    tiers: Arc<std::sync::RwLock<Vec<String>>>,
    broker_connected: IntGauge,
    broker_reconnects: IntCounter,
    publish_confirm_seconds: Histogram,
    http_responses: IntCounterVec,
    s3_seconds: HistogramVec,
    message_age_seconds: Histogram,
    freshness_seconds: Histogram,
    ingress_requests: IntCounterVec,
    ingress_confirm_seconds: Histogram,
    ingress_in_flight: IntGauge,
    /// Registered by the first [`Metrics::set_ingress_connected`]: exported
    /// by the ingress only, so a worker's 0 does not read as a lost ingress.
    ingress_connected: IntGauge,
    ingress_connected_registered: Arc<std::sync::Once>,
    watches: IntCounterVec,
    webhook_events: IntCounterVec,
    apps: AppSeries,
}

/// The series by app. The `app` label takes the sdkappids with a table of
/// their own ([`Metrics::expect_apps`]) and `other` for every other app, so
/// its values stay as bounded as the configuration.
#[derive(Clone)]
struct AppSeries {
    known: Arc<std::sync::RwLock<Vec<i64>>>,
    records: IntCounterVec,
    failures: IntCounterVec,
    uploaded: IntCounterVec,
    wait: HistogramVec,
    webhook_deliveries: IntCounterVec,
    webhook_attempt_seconds: HistogramVec,
    webhook_oldest_pending: prometheus::GaugeVec,
}

/// The `app` label of everything not configured.
pub const OTHER_APP: &str = "other";

/// An S3 operation, for its latency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S3Op {
    Head,
    Put,
    CreateUpload,
    UploadPart,
    Complete,
    Abort,
    List,
    ListParts,
    Delete,
    Get,
}

impl S3Op {
    pub const ALL: [S3Op; 10] = [
        S3Op::Head,
        S3Op::Put,
        S3Op::CreateUpload,
        S3Op::UploadPart,
        S3Op::Complete,
        S3Op::Abort,
        S3Op::List,
        S3Op::ListParts,
        S3Op::Delete,
        S3Op::Get,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            S3Op::Head => "head",
            S3Op::Put => "put",
            S3Op::CreateUpload => "create_upload",
            S3Op::UploadPart => "upload_part",
            S3Op::Complete => "complete",
            S3Op::Abort => "abort",
            S3Op::List => "list",
            S3Op::ListParts => "list_parts",
            S3Op::Delete => "delete",
            S3Op::Get => "get",
        }
    }
}

/// The outcomes a message can have with `reason`: their series exist from
/// start-up. Every code is named (no catch-all), so a new one does not
/// compile until it is placed here.
pub fn outcomes_with(reason: ReasonCode) -> &'static [Outcome] {
    use ReasonCode as R;
    match reason {
        R::RecordingStarted | R::NotFinished => &[Outcome::Skipped],
        // An app without a key: its record_started is skipped (nothing to
        // watch), its finished recording parked.
        R::NoKey => &[Outcome::Skipped, Outcome::Parked],
        R::FetchFailed | R::ArchiveFailed | R::PublishFailed | R::InternalError => {
            &[Outcome::Retried, Outcome::Parked]
        }
        R::InvalidJson
        | R::UnknownFormat
        | R::InvalidField
        | R::SignatureMissing
        | R::SignatureInvalid
        | R::SignatureExpired
        | R::UpstreamError
        | R::VodNotFound
        | R::VodUnavailable
        | R::FileTooLarge
        | R::SizeMismatch
        | R::ArchiveDenied
        | R::ArchiveMisconfigured
        | R::BodyTooLarge
        | R::TooManyTracks
        | R::FieldTooLong
        | R::UrlNotAllowed
        | R::WatchNoKey
        | R::WatchTaskNotFound
        | R::WatchDenied
        | R::WatchExpired => &[Outcome::Parked],
        // Webhook events are not inbound messages: counted by
        // `lesson_replay_webhook_deliveries_total`.
        R::WebhookFailed | R::WebhookGone => &[],
    }
}

/// The `tier` label of a delay tier: `60s`.
fn tier_label(delay: Duration) -> String {
    format!("{}s", delay.as_secs())
}

/// Buckets for how long a lesson waits, in seconds: a second to two days.
const WAIT_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0,
    172800.0,
];

/// What happened to a watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEvent {
    /// A watch was made (or remade for the next check).
    Scheduled,
    /// A watch came due and TIC was asked.
    Due,
    /// TIC said finished and the lesson already had its record (its manifest
    /// was in the archive): the callback path worked.
    AlreadyRecorded,
    /// TIC said finished and the lesson had no record yet: the callback path
    /// missed it, the watch made it.
    Reconciled,
    /// TIC said finished; without archiving the worker cannot tell whether a
    /// record existed.
    Finished,
    /// TIC said the task is still recording.
    StillRecording,
    /// The query failed transiently: asked again later.
    Retried,
    /// Given up: parked with its reason.
    Parked,
}

impl WatchEvent {
    pub const ALL: [WatchEvent; 8] = [
        WatchEvent::Scheduled,
        WatchEvent::Due,
        WatchEvent::AlreadyRecorded,
        WatchEvent::Reconciled,
        WatchEvent::Finished,
        WatchEvent::StillRecording,
        WatchEvent::Retried,
        WatchEvent::Parked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WatchEvent::Scheduled => "scheduled",
            WatchEvent::Due => "due",
            WatchEvent::AlreadyRecorded => "already_recorded",
            WatchEvent::Reconciled => "reconciled",
            WatchEvent::Finished => "finished",
            WatchEvent::StillRecording => "still_recording",
            WatchEvent::Retried => "retried",
            WatchEvent::Parked => "parked",
        }
    }
}

/// How the ingress answered one callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngressOutcome {
    /// Published and confirmed: answered `{"error_code":0}`.
    Accepted,
    /// TIC's test request: answered `{"error_code":0}`, nothing published.
    TestRequest,
    /// Not JSON: 400.
    NotJson,
    /// Larger than `max_body_bytes`: 413.
    TooLarge,
    /// Signature refused at the edge: 401.
    Unauthorized,
    /// The broker is down, slow, returned or refused the message: 503.
    BrokerUnavailable,
    /// `ingress_max_in_flight` callbacks already in hand: 503.
    Busy,
    /// The request took longer than `ingress_request_timeout_ms`: 408.
    Timeout,
}

impl IngressOutcome {
    pub const ALL: [IngressOutcome; 8] = [
        IngressOutcome::Accepted,
        IngressOutcome::TestRequest,
        IngressOutcome::NotJson,
        IngressOutcome::TooLarge,
        IngressOutcome::Unauthorized,
        IngressOutcome::BrokerUnavailable,
        IngressOutcome::Busy,
        IngressOutcome::Timeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            IngressOutcome::Accepted => "accepted",
            IngressOutcome::TestRequest => "test_request",
            IngressOutcome::NotJson => "not_json",
            IngressOutcome::TooLarge => "too_large",
            IngressOutcome::Unauthorized => "unauthorized",
            IngressOutcome::BrokerUnavailable => "broker_unavailable",
            IngressOutcome::Busy => "busy",
            IngressOutcome::Timeout => "timeout",
        }
    }
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
    // Long on purpose: the one list of every series, each with its help text.
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

        let metrics = Metrics {
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
            orphan_uploads_aborted: counter(
                &r,
                "lesson_replay_orphan_uploads_aborted_total",
                "Multipart uploads left unfinished by an earlier attempt (a killed worker) and aborted.",
            ),
            orphan_uploads_left: counter(
                &r,
                "lesson_replay_orphan_uploads_left_total",
                "Aborts of a multipart upload (abandoned, or given up by its owner) that did not clear it (the store refused, or kept parts): counted at each try; its journal entry is kept for the next sweep.",
            ),
            parking_deferred: counter(
                &r,
                "lesson_replay_parking_deferred_total",
                "Messages whose parking the broker did not confirm: sent to a delay queue to be parked again later.",
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
            archive_memory: gauge(
                &r,
                "lesson_replay_archive_memory_bytes",
                "Bytes of part buffers in use by uploads now (at most archive_memory_bytes).",
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
            tiers: Arc::default(),
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
            ingress_requests: counter_vec(
                &r,
                "lesson_replay_ingress_requests_total",
                "TIC callbacks received by the ingress, by how they were answered (accepted and test_request with error_code 0, the rest with an error TIC retries).",
                &["outcome"],
            ),
            ingress_confirm_seconds: histogram(
                &r,
                "lesson_replay_ingress_publish_confirm_duration_seconds",
                "Time from publishing a callback to the broker's confirm (or the deadline).",
                DURATION_BUCKETS,
            ),
            ingress_in_flight: gauge(
                &r,
                "lesson_replay_ingress_in_flight_requests",
                "Callbacks being handled right now.",
            ),
            ingress_connected: IntGauge::new(
                "lesson_replay_ingress_broker_connected",
                "1 while the ingress holds a confirm channel to the broker, else 0.",
            )
            .expect("valid metric"),
            ingress_connected_registered: Arc::new(std::sync::Once::new()),
            watches: counter_vec(
                &r,
                "lesson_replay_watches_total",
                "Watches of recordings under way, by event (scheduled, due, already_recorded, reconciled, finished, still_recording, retried, parked).",
                &["event"],
            ),
            s3_seconds: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "lesson_replay_s3_request_duration_seconds",
                        "Time of one request to the S3-compatible store, by operation (head, put, create_upload, upload_part, complete, abort, list, delete, get).",
                    )
                    .buckets(DURATION_BUCKETS.to_vec()),
                    &["operation"],
                )
                .expect("valid metric");
                r.register(Box::new(h.clone())).expect("unique metric");
                h
            },
            message_age_seconds: histogram(
                &r,
                "lesson_replay_message_age_seconds",
                "Time from a message's arrival (its AMQP timestamp, else its first failure) to its record being published: queueing and delay tiers included.",
                WAIT_BUCKETS,
            ),
            freshness_seconds: histogram(
                &r,
                "lesson_replay_record_freshness_seconds",
                "Time from a recording's end (its stop time) to its record being published.",
                WAIT_BUCKETS,
            ),
            webhook_events: counter_vec(
                &r,
                "lesson_replay_webhook_events_total",
                "Webhook events made, by type (lesson.replay_ready, lesson.replay_failed), for apps whose events go to an endpoint.",
                &["event"],
            ),
            apps: AppSeries {
                webhook_deliveries: counter_vec(
                    &r,
                    "lesson_replay_webhook_deliveries_total",
                    "Attempts to deliver a webhook event, by app and outcome (delivered, retried, parked).",
                    &["app", "outcome"],
                ),
                webhook_attempt_seconds: {
                    let h = HistogramVec::new(
                        HistogramOpts::new(
                            "lesson_replay_webhook_attempt_duration_seconds",
                            "Time of one attempt to deliver a webhook event, by app: from the request to the answer read, or the failure.",
                        )
                        .buckets(DURATION_BUCKETS.to_vec()),
                        &["app"],
                    )
                    .expect("valid metric");
                    r.register(Box::new(h.clone())).expect("unique metric");
                    h
                },
                webhook_oldest_pending: {
                    let g = prometheus::GaugeVec::new(
                        Opts::new(
                            "lesson_replay_webhook_oldest_pending_seconds",
                            "Age of the oldest webhook event of the app this worker saw fail and not yet delivered or parked (0: none). Across workers, the largest value is the app's oldest.",
                        ),
                        &["app"],
                    )
                    .expect("valid metric");
                    r.register(Box::new(g.clone())).expect("unique metric");
                    g
                },
                known: Arc::default(),
                records: counter_vec(
                    &r,
                    "lesson_replay_app_records_total",
                    "Records published, by app (configured sdkappids, else other).",
                    &["app"],
                ),
                failures: counter_vec(
                    &r,
                    "lesson_replay_app_failures_total",
                    "Messages retried or parked, by app, outcome and reason code (archive_denied: the app's store refuses its credentials).",
                    &["app", "outcome", "reason"],
                ),
                uploaded: counter_vec(
                    &r,
                    "lesson_replay_app_uploaded_bytes_total",
                    "Bytes uploaded to each app's archive destination.",
                    &["app"],
                ),
                wait: {
                    let h = HistogramVec::new(
                        HistogramOpts::new(
                            "lesson_replay_app_lesson_wait_seconds",
                            "Time from a message's arrival to its record being published, by app: what a backlog of another app would add to.",
                        )
                        .buckets(WAIT_BUCKETS.to_vec()),
                        &["app"],
                    )
                    .expect("valid metric");
                    r.register(Box::new(h.clone())).expect("unique metric");
                    h
                },
            },
            registry: r,
        };
        for outcome in IngressOutcome::ALL {
            metrics
                .ingress_requests
                .with_label_values(&[outcome.as_str()]);
        }
        for event in WatchEvent::ALL {
            metrics.watches.with_label_values(&[event.as_str()]);
        }
        for event in WEBHOOK_EVENTS {
            metrics.webhook_events.with_label_values(&[event]);
        }
        metrics.precreate();
        // `other` from the start; the worker adds its configured apps.
        metrics.expect_apps(&[]);
        #[cfg(target_os = "linux")]
        metrics
            .registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        metrics
    }

    /// Every series whose labels are known in advance exists from start-up,
    /// at zero, so `rate()` and `increase()` see the first increment: each
    /// outcome with each reason it can occur with, each stage, each target ×
    /// status class, each S3 operation. (Delay tiers: [`Metrics::expect_tiers`].)
    fn precreate(&self) {
        self.messages
            .with_label_values(&[Outcome::Published.as_str(), ""]);
        for reason in ReasonCode::ALL {
            for outcome in outcomes_with(reason) {
                self.messages
                    .with_label_values(&[outcome.as_str(), reason.as_str()]);
            }
        }
        for stage in Stage::ALL {
            self.stage_seconds.with_label_values(&[stage.as_str()]);
        }
        for target in Target::ALL {
            for class in StatusClass::ALL {
                self.http_responses
                    .with_label_values(&[target.as_str(), class.as_str()]);
            }
        }
        for op in S3Op::ALL {
            self.s3_seconds.with_label_values(&[op.as_str()]);
        }
    }

    /// The delay tiers the worker will use: their series exist from start-up.
    pub fn expect_tiers(&self, tiers: &[Duration]) {
        let labels: Vec<String> = tiers.iter().map(|d| tier_label(*d)).collect();
        for label in &labels {
            self.retries.with_label_values(&[label.as_str()]);
        }
        *self.tiers.write().unwrap_or_else(|e| e.into_inner()) = labels;
    }

    /// The apps with a table of their own: each is an `app` label value
    /// from start-up (with `other`), every other app counts as `other`.
    pub fn expect_apps(&self, apps: &[i64]) {
        *self.apps.known.write().unwrap_or_else(|e| e.into_inner()) = apps.to_vec();
        let labels = apps
            .iter()
            .map(i64::to_string)
            .chain([OTHER_APP.to_owned()]);
        for app in labels {
            let app = app.as_str();
            self.apps.records.with_label_values(&[app]);
            self.apps.uploaded.with_label_values(&[app]);
            self.apps.wait.with_label_values(&[app]);
            for outcome in WebhookOutcome::ALL {
                self.apps
                    .webhook_deliveries
                    .with_label_values(&[app, outcome.as_str()]);
            }
            self.apps.webhook_attempt_seconds.with_label_values(&[app]);
            self.apps.webhook_oldest_pending.with_label_values(&[app]);
            for reason in [ReasonCode::ArchiveDenied, ReasonCode::ArchiveFailed] {
                self.apps.failures.with_label_values(&[
                    app,
                    Outcome::Parked.as_str(),
                    reason.as_str(),
                ]);
            }
        }
    }

    /// The `app` label of `sdkappid`: itself when configured, else `other`.
    pub fn app_label(&self, sdkappid: Option<i64>) -> String {
        let known = self.apps.known.read().unwrap_or_else(|e| e.into_inner());
        match sdkappid {
            Some(app) if known.contains(&app) => app.to_string(),
            _ => OTHER_APP.to_owned(),
        }
    }

    /// App `sdkappid` had a record published, `wait` after its message arrived.
    pub fn app_published(&self, sdkappid: Option<i64>, wait: Option<Duration>) {
        let app = self.app_label(sdkappid);
        self.apps.records.with_label_values(&[&app]).inc();
        if let Some(wait) = wait {
            self.apps
                .wait
                .with_label_values(&[&app])
                .observe(wait.as_secs_f64());
        }
    }

    /// A message of app `sdkappid` was retried (`parked` false) or parked.
    pub fn app_failed(&self, sdkappid: Option<i64>, parked: bool, reason: ReasonCode) {
        let outcome = if parked {
            Outcome::Parked
        } else {
            Outcome::Retried
        };
        self.apps
            .failures
            .with_label_values(&[&self.app_label(sdkappid), outcome.as_str(), reason.as_str()])
            .inc();
    }

    /// A webhook event of type `event` was made.
    pub fn webhook_event(&self, event: &str) {
        self.webhook_events.with_label_values(&[event]).inc();
    }

    /// One attempt to deliver an event of `sdkappid` ended with `status`
    /// (`None`: no answer) after `elapsed`.
    pub fn webhook_attempt(&self, sdkappid: Option<i64>, status: Option<u16>, elapsed: Duration) {
        self.apps
            .webhook_attempt_seconds
            .with_label_values(&[&self.app_label(sdkappid)])
            .observe(elapsed.as_secs_f64());
        self.http_response(Target::Webhook, status);
    }

    /// What became of an attempt to deliver an event of `sdkappid`.
    pub fn webhook_delivery(&self, sdkappid: Option<i64>, outcome: WebhookOutcome) {
        self.apps
            .webhook_deliveries
            .with_label_values(&[&self.app_label(sdkappid), outcome.as_str()])
            .inc();
    }

    /// The age of the oldest event pending on this worker of the apps of
    /// `app_label` ([`Metrics::app_label`]).
    pub fn webhook_oldest_pending(&self, app_label: &str, seconds: f64) {
        self.apps
            .webhook_oldest_pending
            .with_label_values(&[app_label])
            .set(seconds);
    }

    /// Time one S3 request.
    pub fn s3_timer(&self, op: S3Op) -> HistogramTimer {
        self.s3_seconds
            .with_label_values(&[op.as_str()])
            .start_timer()
    }

    /// A record was published `age` after its message arrived and
    /// `freshness` after its recording ended (each when known).
    pub fn record_timing(&self, age: Option<Duration>, freshness: Option<Duration>) {
        if let Some(age) = age {
            self.message_age_seconds.observe(age.as_secs_f64());
        }
        if let Some(freshness) = freshness {
            self.freshness_seconds.observe(freshness.as_secs_f64());
        }
    }

    fn message(&self, outcome: Outcome, reason: Option<ReasonCode>) {
        // A combination [`outcomes_with`] does not list would be a series
        // born above zero: the tests that take that path stop here.
        debug_assert!(
            reason.map_or(outcome == Outcome::Published, |r| outcomes_with(r)
                .contains(&outcome)),
            "{outcome:?} with {reason:?} is not among the series made at start-up"
        );
        let reason = reason.map_or("", ReasonCode::as_str);
        self.messages
            .with_label_values(&[outcome.as_str(), reason])
            .inc();
    }

    /// A record was published for a message.
    pub fn published(&self) {
        self.message(Outcome::Published, None);
    }

    /// A message without a finished recording was acknowledged.
    pub fn skipped(&self, reason: ReasonCode) {
        self.message(Outcome::Skipped, Some(reason));
    }

    /// A message was sent to the delay tier of `delay`.
    pub fn retried(&self, reason: ReasonCode, delay: Duration) {
        self.message(Outcome::Retried, Some(reason));
        let label = tier_label(delay);
        let known = self.tiers.read().unwrap_or_else(|e| e.into_inner());
        let label = match known.is_empty() || known.contains(&label) {
            true => label.as_str(),
            false => "other",
        };
        self.retries.with_label_values(&[label]).inc();
    }

    /// A message was copied to the parking queue.
    pub fn parked(&self, reason: ReasonCode) {
        self.message(Outcome::Parked, Some(reason));
    }

    /// Time one stage: observed when the timer is dropped or observed.
    pub fn stage_timer(&self, stage: Stage) -> HistogramTimer {
        self.stage_seconds
            .with_label_values(&[stage.as_str()])
            .start_timer()
    }

    /// Time one message from delivery to settlement.
    pub fn processing_timer(&self) -> HistogramTimer {
        self.processing_seconds.start_timer()
    }

    /// Time one publish until the broker's confirm.
    pub fn publish_confirm_timer(&self) -> HistogramTimer {
        self.publish_confirm_seconds.start_timer()
    }

    /// Count an HTTP response (`status` None: no response at all).
    pub fn http_response(&self, target: Target, status: Option<u16>) {
        self.http_responses
            .with_label_values(&[target.as_str(), StatusClass::of(status).as_str()])
            .inc();
    }

    /// Bytes received from a VOD origin.
    pub fn downloaded(&self, bytes: u64) {
        self.downloaded_bytes.inc_by(bytes);
    }

    /// Bytes uploaded to the destination of app `sdkappid` (`None`: the default one).
    pub fn uploaded(&self, sdkappid: Option<i64>, bytes: u64) {
        self.uploaded_bytes.inc_by(bytes);
        self.apps
            .uploaded
            .with_label_values(&[&self.app_label(sdkappid)])
            .inc_by(bytes);
    }

    /// Bytes of part buffers in use now.
    pub fn archive_memory_in_use(&self, bytes: u64) {
        self.archive_memory
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// A track was found already archived.
    pub fn upload_skipped(&self) {
        self.uploads_skipped.inc();
    }

    /// An upload an earlier attempt left unfinished was aborted.
    pub fn orphan_upload_aborted(&self) {
        self.orphan_uploads_aborted.inc();
    }

    /// An abort did not clear an abandoned upload: it stays journaled.
    pub fn orphan_upload_left(&self) {
        self.orphan_uploads_left.inc();
    }

    /// A message's parking was not confirmed: it waits in a delay queue.
    pub fn parking_deferred(&self) {
        self.parking_deferred.inc();
    }

    /// A download resumed with a Range request.
    pub fn range_resumed(&self) {
        self.range_resumes.inc();
    }

    /// Bytes read by a range-read probe.
    pub fn probed(&self, bytes: u64) {
        self.probe_bytes.inc_by(bytes);
    }

    /// The configured number of messages processed at once.
    pub fn set_concurrency(&self, concurrency: u16) {
        self.concurrency.set(i64::from(concurrency));
    }

    /// Connected to the broker and consuming, or not.
    pub fn set_broker_connected(&self, connected: bool) {
        self.broker_connected.set(i64::from(connected));
    }

    /// A broker session was rebuilt after a loss.
    pub fn broker_reconnected(&self) {
        self.broker_reconnects.inc();
    }

    /// How the ingress answered one callback. Every outcome's series exists
    /// from the start, at zero, so the first error is seen by `rate()`.
    pub fn ingress_answered(&self, outcome: IngressOutcome) {
        self.ingress_requests
            .with_label_values(&[outcome.as_str()])
            .inc();
    }

    /// Time one ingress publish until the broker's confirm.
    pub fn ingress_confirm_timer(&self) -> HistogramTimer {
        self.ingress_confirm_seconds.start_timer()
    }

    /// Something happened to a watch.
    pub fn watch(&self, event: WatchEvent) {
        self.watches.with_label_values(&[event.as_str()]).inc();
    }

    /// The ingress holds a broker session, or not.
    pub fn set_ingress_connected(&self, connected: bool) {
        self.ingress_connected_registered.call_once(|| {
            self.registry
                .register(Box::new(self.ingress_connected.clone()))
                .expect("unique metric");
        });
        self.ingress_connected.set(i64::from(connected));
    }

    /// Counts a callback as in hand until dropped.
    pub fn ingress_in_flight_guard(&self) -> InFlight {
        self.ingress_in_flight.inc();
        InFlight(self.ingress_in_flight.clone())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tier_label_takes_only_the_configured_delays() {
        let metrics = Metrics::new();
        metrics.expect_tiers(&[Duration::from_secs(10), Duration::from_secs(60)]);
        metrics.retried(ReasonCode::FetchFailed, Duration::from_secs(60));
        metrics.retried(ReasonCode::FetchFailed, Duration::from_secs(12345));
        let text = metrics.render();
        assert!(
            text.contains(r#"lesson_replay_retries_total{tier="60s"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lesson_replay_retries_total{tier="other"} 1"#),
            "{text}"
        );
        assert!(!text.contains("12345s"), "{text}");
    }

    #[test]
    fn the_app_label_takes_only_the_configured_apps() {
        let metrics = Metrics::new();
        metrics.expect_apps(&[1400000001]);
        let text = metrics.render();
        // Each configured app and `other` exist from start-up.
        for app in ["1400000001", "other"] {
            let series = format!("lesson_replay_app_records_total{{app=\"{app}\"}} 0");
            assert!(text.contains(&series), "{series} in {text}");
        }
        metrics.app_published(Some(1400000001), Some(Duration::from_secs(3)));
        // A thousand other apps (a hostile publisher's sdkappids) share one label.
        for app in 0..1000 {
            metrics.app_published(Some(1500000000 + app), None);
            metrics.app_failed(Some(1500000000 + app), true, ReasonCode::ArchiveDenied);
        }
        metrics.app_published(None, None);
        metrics.uploaded(Some(1400000001), 10);
        metrics.uploaded(None, 5);
        let text = metrics.render();
        for series in [
            r#"lesson_replay_app_records_total{app="1400000001"} 1"#,
            r#"lesson_replay_app_records_total{app="other"} 1001"#,
            r#"lesson_replay_app_failures_total{app="other",outcome="parked",reason="archive_denied"} 1000"#,
            r#"lesson_replay_app_uploaded_bytes_total{app="1400000001"} 10"#,
            r#"lesson_replay_app_uploaded_bytes_total{app="other"} 5"#,
            r#"lesson_replay_app_lesson_wait_seconds_count{app="1400000001"} 1"#,
            "lesson_replay_uploaded_bytes_total 15",
        ] {
            assert!(text.contains(series), "{series} in {text}");
        }
        assert!(
            !text.contains("15000"),
            "an unconfigured app became a label"
        );
    }

    #[test]
    fn names_follow_the_conventions() {
        let metrics = Metrics::new();
        metrics.published();
        metrics.retried(ReasonCode::FetchFailed, Duration::from_secs(10));
        metrics.http_response(Target::Vod, Some(503));
        let text = metrics.render();
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut parts = line.split(' ').skip(2);
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            // The process collector's standard names, and ours.
            if name.starts_with("process_") {
                continue;
            }
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
    fn every_known_series_exists_from_start_up() {
        let metrics = Metrics::new();
        metrics.expect_tiers(&[Duration::from_secs(10), Duration::from_secs(60)]);
        let text = metrics.render();
        let mut series = vec![
            r#"lesson_replay_messages_total{outcome="published",reason=""} 0"#.to_owned(),
            r#"lesson_replay_retries_total{tier="60s"} 0"#.to_owned(),
            r#"lesson_replay_ingress_requests_total{outcome="broker_unavailable"} 0"#.to_owned(),
            r#"lesson_replay_watches_total{event="reconciled"} 0"#.to_owned(),
            "lesson_replay_orphan_uploads_left_total 0".to_owned(),
        ];
        // Every reason with every outcome it can have, every target with
        // every status class, every stage and S3 operation: a new one is
        // covered as soon as it is listed in its `ALL`.
        for reason in ReasonCode::ALL {
            for outcome in outcomes_with(reason) {
                series.push(format!(
                    r#"lesson_replay_messages_total{{outcome="{}",reason="{}"}} 0"#,
                    outcome.as_str(),
                    reason.as_str()
                ));
            }
        }
        for target in Target::ALL {
            for class in StatusClass::ALL {
                series.push(format!(
                    r#"lesson_replay_http_responses_total{{class="{}",target="{}"}} 0"#,
                    class.as_str(),
                    target.as_str()
                ));
            }
        }
        for stage in Stage::ALL {
            series.push(format!(
                r#"lesson_replay_stage_duration_seconds_count{{stage="{}"}} 0"#,
                stage.as_str()
            ));
        }
        for op in S3Op::ALL {
            series.push(format!(
                r#"lesson_replay_s3_request_duration_seconds_count{{operation="{}"}} 0"#,
                op.as_str()
            ));
        }
        for series in &series {
            assert!(text.contains(series.as_str()), "{series} missing");
        }
        assert!(series.contains(
            &r#"lesson_replay_messages_total{outcome="skipped",reason="no_key"} 0"#.to_owned()
        ));
        // Combinations that cannot occur are not made up.
        assert!(!text.contains(r#"outcome="retried",reason="invalid_json""#));
        assert!(!text.contains(r#"outcome="parked",reason="recording_started""#));
        #[cfg(target_os = "linux")]
        assert!(text.contains("process_resident_memory_bytes"));
    }

    #[test]
    fn the_outcomes_of_a_reason_follow_whether_it_is_transient() {
        for reason in ReasonCode::ALL {
            assert_eq!(
                outcomes_with(reason).contains(&Outcome::Retried),
                reason.is_transient() && !reason.is_webhook(),
                "{reason:?}"
            );
        }
    }

    #[test]
    fn status_classes_cover_every_status() {
        assert_eq!(StatusClass::of(Some(204)), StatusClass::Success);
        assert_eq!(StatusClass::of(Some(404)), StatusClass::ClientError);
        assert_eq!(StatusClass::of(Some(503)), StatusClass::ServerError);
        assert_eq!(StatusClass::of(Some(700)), StatusClass::Error);
        assert_eq!(StatusClass::of(None), StatusClass::Error);
    }

    #[test]
    fn in_flight_counts_until_dropped() {
        let metrics = Metrics::new();
        let guard = metrics.in_flight_guard();
        assert_eq!(metrics.in_flight.get(), 1);
        drop(guard);
        assert_eq!(metrics.in_flight.get(), 0);
    }

    #[test]
    fn the_metrics_docs_list_every_metric() {
        let mut documented = crate::decision::reason::documented_codes(
            include_str!("../../docs/metrics.md"),
            "metrics",
        );
        let metrics = Metrics::new();
        // Registered by the ingress when it first reports its session.
        metrics.set_ingress_connected(false);
        let text = metrics.render();
        let mut exported: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .filter(|name| !name.starts_with("process_"))
            .map(str::to_owned)
            .collect();
        // Labelled series appear once used: use each once.
        for name in [
            "lesson_replay_messages_total",
            "lesson_replay_stage_duration_seconds",
            "lesson_replay_retries_total",
            "lesson_replay_http_responses_total",
        ] {
            if !exported.iter().any(|e| e == name) {
                exported.push(name.to_owned());
            }
        }
        documented.sort();
        exported.sort();
        assert_eq!(documented, exported, "docs/metrics.md's metrics table");
    }
}
