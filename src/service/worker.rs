//! The worker: where a message enters ([`run`] consumes the work queue), is
//! decided ([`crate::decision::decide::decide`]), checked against its files
//! ([`crate::media::enrich`]) and leaves — `publish_record` to the records exchange,
//! `retry_later` to a delay tier, or `park_message` to the parking queue.
//!
//! The input is acknowledged only after its outcome is confirmed by the
//! broker, so a crash at any point redelivers it: at-least-once, with records
//! that downstream deduplicates by `message_id` (= replay_id).
//!
//! A supervisor loop owns the broker session: when the connection, a channel
//! or the consumer is lost, it rebuilds all of them with backoff and resumes,
//! without a process restart. Deliveries of a lost session are never acked on
//! the new one: their acks fail with the old channel and the broker redelivers.

use std::cell::RefCell;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::field::Empty;
use tracing::{Instrument, error, info, info_span, warn};

use crate::broker::amqp::{self, BrokerSettings, DeclareError, PublishError};
use crate::broker::headers::{self, header_text, set_header};
use crate::broker::retry::{self, RetryPolicy, RetryStep};
use crate::broker::topology;
use crate::config::settings::Config;
use crate::decision::decide::{Decision, InputPolicy, app_of, decide};
use crate::decision::normalize::Normalized;
use crate::decision::reason::{ReasonCode, Rejection};
use crate::decision::record::Record;
use crate::decision::watch::{WATCH_TYPE, Watch, delay_queue, due_queue};
use crate::media::enrich::{Media, MediaError};
use crate::service::endpoints::Health;
use crate::service::watches::{WatchCheck, Watcher};
use crate::telemetry::metrics::{Metrics, Stage, WatchEvent};
use crate::tic::client::TicError;

/// After the grace period, how long aborted handlers get to clean up
/// (abort multipart uploads) before the channels close.
const ABORT_CLEANUP: Duration = Duration::from_secs(5);

/// The longest wait between two attempts to reach the broker (every address
/// of `amqp_url` is tried at each): readiness returns within about this long
/// of any node being usable again.
const MAX_RECONNECT_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error(transparent)]
    Topology(#[from] DeclareError),
    #[error("the broker cancelled the consumer of {0}")]
    ConsumerCancelled(String),
    #[error(transparent)]
    Media(#[from] MediaError),
    #[error("TIC client: {0}")]
    Tic(#[from] TicError),
}

/// Code a test runs with each record before it is published.
pub type RecordHook = Arc<dyn Fn(&Record) + Send + Sync>;

/// Seams for tests: code run at fixed points of processing. Production
/// passes none; a test may, for instance, panic on purpose.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Called with every record just before it is published.
    pub before_publish: Option<RecordHook>,
}

/// What the delivery handlers of one broker session share.
struct Context {
    hooks: Hooks,
    watcher: Arc<Watcher>,
    config: Arc<Config>,
    policy: Arc<InputPolicy>,
    retry: Arc<RetryPolicy>,
    media: Arc<Media>,
    metrics: Metrics,
    publisher: Channel,
    /// Cancelled when the grace period is over: handlers stop where they are.
    abort: CancellationToken,
    /// The apps with a lane of their own.
    lanes: Arc<Vec<i64>>,
}

/// Everything that outlives a broker session.
struct Shared {
    hooks: Hooks,
    watcher: Arc<Watcher>,
    config: Arc<Config>,
    broker: BrokerSettings,
    policy: Arc<InputPolicy>,
    retry: Arc<RetryPolicy>,
    media: Arc<Media>,
    metrics: Metrics,
    health: Health,
    handlers: TaskTracker,
    stop: CancellationToken,
    abort: CancellationToken,
}

/// Run the worker until `shutdown` completes, then stop in order: cancel the
/// consumer, let in-flight messages finish within the grace period (abort the
/// rest, aborting their uploads), close the channels and the connection.
/// Unfinished messages are requeued by the broker.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
    health: Health,
    metrics: Metrics,
    hooks: Hooks,
) -> Result<(), WorkerError> {
    let media = Media::new(config.media_settings(), metrics.clone()).await?;
    let watcher = Watcher::from_config(&config, metrics.clone())?;
    metrics.set_concurrency(config.concurrency);
    metrics.expect_tiers(&config.retry_policy().tiers);
    metrics.expect_apps(&config.app_ids());
    let shared = Shared {
        hooks,
        watcher: Arc::new(watcher),
        broker: config.broker_settings(),
        policy: Arc::new(config.input_policy()),
        retry: Arc::new(config.retry_policy()),
        config: Arc::new(config),
        media: Arc::new(media),
        metrics,
        health,
        handlers: TaskTracker::new(),
        stop: CancellationToken::new(),
        abort: CancellationToken::new(),
    };
    let (stop, health) = (shared.stop.clone(), shared.health.clone());
    // What killed workers left in the upload journals, swept on a timer.
    let (sweeping, until) = (shared.media.clone(), stop.clone());
    tokio::spawn(async move { sweeping.sweep_journals(until).await });
    let supervisor = supervise(&shared);
    tokio::pin!(supervisor);
    tokio::select! {
        () = shutdown => {
            // Not ready from the first signal on, while in-flight work finishes.
            health.drain();
            stop.cancel();
        }
        result = &mut supervisor => return result,
    }
    supervisor.await
}

/// Keep a broker session running, rebuilding it with backoff whenever it is
/// lost. A topology the broker refuses is said once, shown in `/readyz`, and
/// tried again only now and then: it is not a loop.
async fn supervise(shared: &Shared) -> Result<(), WorkerError> {
    let reconnect = || {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(250))
            .with_max_delay(MAX_RECONNECT_WAIT)
            .without_max_times()
            .with_jitter()
            .build()
    };
    let mut delays = reconnect();
    let mut sessions = 0u64;
    let mut refused = false;
    loop {
        let on_connected = || {
            delays = reconnect();
            if std::mem::take(&mut refused) {
                info!("the broker accepts the topology now");
            }
            if sessions > 0 {
                shared.metrics.broker_reconnected();
                info!("reconnected to the broker");
            }
            sessions += 1;
        };
        let result = session(shared, on_connected).await;
        shared.health.set_ready(false, &shared.metrics);
        match result {
            Ok(()) => return Ok(()),
            Err(e) if shared.stop.is_cancelled() => {
                warn!(error = %e, "broker session ended during shutdown");
                drain(shared).await;
                return Ok(());
            }
            Err(WorkerError::Topology(e)) if e.is_permanent() => {
                let why = e.to_string();
                if shared.health.block(&why, &shared.metrics) {
                    error!(error = %why, recheck_secs = shared.broker.refused_recheck.as_secs(),
                        "not ready: the broker refuses the topology; an operator must act (docs/operations.md)");
                }
                refused = true;
                tokio::select! {
                    () = tokio::time::sleep(shared.broker.refused_recheck) => {},
                    () = shared.stop.cancelled() => return Ok(()),
                }
            }
            Err(e) => {
                let wait = delays.next().unwrap_or(MAX_RECONNECT_WAIT);
                error!(error = %e, ?wait, "broker session lost: reconnecting");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {},
                    () = shared.stop.cancelled() => {
                        drain(shared).await;
                        return Ok(());
                    },
                }
            }
        }
    }
}

/// One connection: channels, topology, QoS and consumer, until it fails or the
/// worker stops. `Ok` only after a clean, ordered stop.
async fn session(shared: &Shared, connected: impl FnOnce()) -> Result<(), WorkerError> {
    let config = &shared.config;
    let connection = amqp::connect(&shared.broker, "lesson-replay worker").await?;
    if let Err(e) = amqp::declare_topology(&connection, &shared.broker.topology).await {
        let _ = connection.close(200, "topology not declared".into()).await;
        return Err(e.into());
    }
    let consumer_channel = connection.create_channel().await?;
    let publisher = amqp::confirm_channel(&connection).await?;
    let consumer_tag = format!("lesson-replay-{}", std::process::id());
    // Every queue this worker consumes, each with a prefetch of its own
    // (RabbitMQ applies `basic_qos` to the consumers created after it).
    let mut consumers = Vec::new();
    let mut tags = Vec::new();
    for (n, (queue, prefetch, feed)) in consumed(config).into_iter().enumerate() {
        consumer_channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let tag = format!("{consumer_tag}-{n}");
        let consumer = consumer_channel
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        info!(%queue, prefetch, "consuming");
        tags.push(tag);
        // A consumer's end is an item too: the broker cancelled it.
        let ended = futures_util::stream::once(async move { None });
        consumers.push(
            consumer
                .map(Some)
                .chain(ended)
                .map(move |next| (feed, queue.clone(), next))
                .boxed(),
        );
    }
    let mut deliveries = futures_util::stream::select_all(consumers);
    shared.health.set_ready(true, &shared.metrics);
    connected();

    let context = Arc::new(Context {
        hooks: shared.hooks.clone(),
        watcher: shared.watcher.clone(),
        config: shared.config.clone(),
        policy: shared.policy.clone(),
        retry: shared.retry.clone(),
        media: shared.media.clone(),
        metrics: shared.metrics.clone(),
        publisher: publisher.clone(),
        abort: shared.abort.clone(),
        lanes: Arc::new(config.app_ids()),
    });
    loop {
        tokio::select! {
            () = shared.stop.cancelled() => break,
            next = deliveries.next() => match next {
                Some((Feed::Sort, _, Some(Ok(delivery)))) => {
                    shared.handlers.spawn(sort(context.clone(), delivery));
                }
                Some((Feed::Handle(kind), _, Some(Ok(delivery)))) => {
                    shared.handlers.spawn(handle_delivery(context.clone(), delivery, kind));
                }
                Some((_, _, Some(Err(e)))) => return Err(WorkerError::Broker(e)),
                Some((_, queue, None)) => return Err(WorkerError::ConsumerCancelled(queue)),
                None => return Err(WorkerError::ConsumerCancelled(config.work_queue.clone())),
            },
        }
    }

    info!("stopping: cancelling the consumer");
    shared.health.set_ready(false, &shared.metrics);
    let mut cancelled = Ok(());
    for tag in &tags {
        let done = consumer_channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await;
        cancelled = cancelled.and(done);
    }
    match cancelled {
        Ok(()) => info!("consumer cancelled: no new deliveries"),
        Err(e) => warn!(error = %e, "could not cancel the consumer"),
    }
    drain(shared).await;
    close(&connection, [&consumer_channel, &publisher]).await;
    info!("stopped");
    Ok(())
}

/// The queues a worker consumes, each with its prefetch and what its
/// deliveries are. Without apps: the work queue, processed. With apps: the
/// work queue only sorts ([`sort`]) into the lanes — one per app with a
/// table, one for every other app — and each lane is processed with a
/// prefetch of its own, so one app's backlog never holds another's lessons.
/// And the due watches, always.
fn consumed(config: &Config) -> Vec<(String, u16, Feed)> {
    let topology = &config.broker_settings().topology;
    let lanes = topology::lanes(topology);
    let mut queues = Vec::new();
    if lanes.is_empty() {
        queues.push((
            config.work_queue.clone(),
            config.concurrency,
            Feed::Handle(Kind::Message { app: None }),
        ));
    } else {
        queues.push((config.work_queue.clone(), config.concurrency, Feed::Sort));
        for (app, queue) in lanes {
            let prefetch = config.resolved(app).concurrency;
            queues.push((queue, prefetch, Feed::Handle(Kind::Message { app })));
        }
    }
    queues.push((
        due_queue(&config.work_queue),
        watch_prefetch(config.concurrency),
        Feed::Handle(Kind::Watch),
    ));
    queues
}

/// Due watches handled at once: a quarter of `concurrency`, at least one.
/// Memory is bounded by `concurrency` + this, times a part.
pub fn watch_prefetch(concurrency: u16) -> u16 {
    (concurrency / 4).max(1)
}

/// Let in-flight handlers finish within the grace period; abort the rest.
async fn drain(shared: &Shared) {
    shared.handlers.close();
    let grace = shared.config.shutdown_grace();
    if tokio::time::timeout(grace, shared.handlers.wait())
        .await
        .is_err()
    {
        warn!(
            grace_secs = grace.as_secs(),
            "in-flight messages did not finish in time: aborted, the broker requeues them"
        );
        shared.abort.cancel();
        let _ = tokio::time::timeout(ABORT_CLEANUP, shared.handlers.wait()).await;
    }
    shared.media.wait_for_cleanup(ABORT_CLEANUP).await;
}

async fn close<const N: usize>(connection: &Connection, channels: [&Channel; N]) {
    for channel in channels {
        let _ = channel.close(200, "shutdown".into()).await;
    }
    let _ = connection.close(200, "shutdown".into()).await;
}

/// What to do with a delivery once its processing is over.
enum Outcome {
    /// Its record is published (or it was skipped): acknowledge.
    Done,
    /// Permanent failure: copy it to the parking queue, then acknowledge.
    Park(Rejection),
    /// Transient failure: retry it later through a delay tier.
    Retry(Rejection),
    /// Watch this task: publish the watch to the delay queue of this delay,
    /// then acknowledge.
    Watch(Watch, Duration),
}

/// Which queue a delivery came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A TIC message to process: from the work queue (no apps configured) or
    /// from the lane of `app` (`None`: the lane of every other app).
    Message { app: Option<i64> },
    /// A due watch.
    Watch,
}

/// What a consumer's deliveries go to.
#[derive(Debug, Clone, Copy)]
enum Feed {
    /// The work queue, with lanes: each message is moved to its app's lane.
    Sort,
    /// Processed here, as this kind.
    Handle(Kind),
}

/// Move a message from the work queue to its app's lane (confirmed), then
/// acknowledge it; when the lane does not confirm, the shortest delay tier
/// takes it; only when that fails too is it put back. Only its app is read:
/// the lane's consumer decides the rest, and parks what is bad.
async fn sort(context: Arc<Context>, delivery: Delivery) {
    let envelope = amqp::envelope_of(&delivery.properties);
    let app = app_of(&delivery.data, &envelope, &context.policy.limits)
        .filter(|app| context.lanes.contains(app));
    let lane = topology::app_queue(&context.config.work_queue, app);
    let moved = amqp::publish_confirmed(
        &context.publisher,
        "",
        &lane,
        &delivery.data,
        delivery.properties.clone(),
    )
    .await;
    // A lane that cannot take it (no majority, the link failing): the
    // message waits in the shortest delay tier, which brings it back here,
    // rather than going round the work queue's delivery limit.
    let moved = match moved {
        Err(e) => {
            let tier = shortest_tier(&context);
            warn!(error = %e, %lane, %tier, "could not move the message to its lane: it waits in a delay tier");
            amqp::publish_confirmed(
                &context.publisher,
                "",
                &tier,
                &delivery.data,
                delivery.properties.clone(),
            )
            .await
        }
        ok => ok,
    };
    ack_or_requeue(&delivery, moved).await;
}

/// Decide what one delivery becomes, carry it out, and settle it with the
/// broker only once the outcome is safe there.
async fn handle_delivery(context: Arc<Context>, delivery: Delivery, kind: Kind) {
    let attempt = header_text(delivery.properties.headers().as_ref(), headers::ATTEMPT)
        .and_then(|a| a.parse::<u32>().ok())
        .unwrap_or(0);
    let tic_random = header_text(delivery.properties.headers().as_ref(), headers::TIC_RANDOM);
    let span = info_span!(
        "delivery",
        replay_id = Empty,
        task_id = Empty,
        room_id = Empty,
        sdkappid = Empty,
        attempt,
        redelivered = delivery.redelivered,
        // What finds the message again in the parking queue (`dlq list`
        // prints the same hash), even when its body is not JSON.
        body_md5 = %amqp::body_md5(&delivery.data),
        message_id = delivery.properties.message_id().as_ref().map(|m| m.as_str()),
        // TIC's per-request `random`, which its support asks for.
        tic_random = tic_random.as_deref()
    );
    let handling = async move {
        let metrics = &context.metrics;
        let _in_flight = metrics.in_flight_guard();
        let timer = metrics.processing_timer();
        // A panic is a bug in one message's processing: caught, retried like a
        // transient failure, and the worker goes on.
        let processing = match kind {
            Kind::Message { .. } => {
                AssertUnwindSafe(process(&context, &delivery).boxed()).catch_unwind()
            }
            Kind::Watch => {
                AssertUnwindSafe(check_watch(&context, &delivery).boxed()).catch_unwind()
            }
        };
        let outcome = tokio::select! {
            result = processing => result.unwrap_or_else(|panic| {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                error!(panic = %why, "processing panicked");
                Outcome::Retry(Rejection::new(ReasonCode::InternalError, format!("processing panicked: {why}")))
            }),
            () = context.abort.cancelled() => {
                warn!("shutdown: processing aborted, the broker requeues the message");
                return;
            }
        };
        let outcome = match (kind, outcome) {
            // A watch is retried on the watch schedule, never through the
            // message tiers (they lead back to the work queue).
            (Kind::Watch, Outcome::Retry(reason)) => retry_watch(&context, &delivery, reason),
            (_, outcome) => outcome,
        };
        settle(&context, &delivery, outcome, attempt, kind).await;
        timer.observe_duration();
    };
    let handling_state = Handling {
        started: Instant::now(),
        lesson: None,
        app: match kind {
            Kind::Message { app } => app,
            Kind::Watch => None,
        },
    };
    HANDLING
        .scope(RefCell::new(handling_state), handling.instrument(span))
        .await
}

/// The delivery being handled, for its log lines.
struct Handling {
    /// When its handler started: the `published` line says how long it took.
    started: Instant,
    /// The lesson it is about, once known: its outcome's log line carries
    /// `replay_id` and `task_id` as top-level fields, where log tools index
    /// them (JSON lines nest span fields).
    lesson: Option<(String, Option<String>)>,
    /// Its app, once known (its lane's, then its record's): the per-app metrics' label.
    app: Option<i64>,
}

tokio::task_local! {
    static HANDLING: RefCell<Handling>;
}

fn remember_lesson(replay_id: &str, task_id: Option<&str>, app: Option<i64>) {
    let _ = HANDLING.try_with(|handling| {
        let mut handling = handling.borrow_mut();
        handling.lesson = Some((replay_id.to_owned(), task_id.map(str::to_owned)));
        handling.app = app.or(handling.app);
    });
}

/// The app of the delivery being handled, when known.
fn lesson_app() -> Option<i64> {
    HANDLING
        .try_with(|handling| handling.borrow().app)
        .ok()
        .flatten()
}

/// The `replay_id` and `task_id` of the delivery being handled, when known.
fn lesson_ids() -> (Option<String>, Option<String>) {
    HANDLING
        .try_with(|handling| handling.borrow().lesson.clone())
        .ok()
        .flatten()
        .map_or((None, None), |(replay, task)| (Some(replay), task))
}

/// Milliseconds since the handler of the current delivery started (to 0.01).
fn handling_ms() -> Option<f64> {
    HANDLING
        .try_with(|handling| handling.borrow().started.elapsed())
        .ok()
        .map(|elapsed| (elapsed.as_secs_f64() * 1e5).round() / 100.0)
}

async fn process(context: &Context, delivery: &Delivery) -> Outcome {
    let envelope = amqp::envelope_of(&delivery.properties);
    let stage = context.metrics.stage_timer(Stage::Parse);
    let decision = decide(&delivery.data, &envelope, &context.policy);
    stage.observe_duration();
    let mut normalized = match decision {
        Decision::Publish(normalized) => normalized,
        Decision::Skip(reason) => {
            info!(reason = %reason.code, "skipped: {}", reason.message);
            context.metrics.skipped(reason.code);
            return Outcome::Done;
        }
        Decision::Watch { reason, watch } => {
            if !context.watcher.can_ask(watch.sdkappid) {
                // Counted under its own reason: an alert on `no_key` finds
                // every app whose lessons cannot be watched.
                context.metrics.skipped(ReasonCode::NoKey);
                warn!(reason = %ReasonCode::NoKey, task = %watch.task_id, sdkappid = watch.sdkappid,
                    "recording under way, not watched: no TicKey for its sdkappid in tic_keys");
                return Outcome::Done;
            }
            context.metrics.skipped(reason.code);
            info!(reason = %reason.code, task = %watch.task_id, "recording under way: watched");
            return rescheduled(context.watcher.first(watch, now().unix_timestamp()));
        }
        Decision::Reject(reason) => return Outcome::Park(reason),
    };
    publish_normalized(context, &mut normalized, delivery).await
}

/// Check the tracks of a decided recording, publish its record, and say
/// what becomes of the delivery.
async fn publish_normalized(
    context: &Context,
    normalized: &mut Normalized,
    delivery: &Delivery,
) -> Outcome {
    let record = &normalized.record;
    // One call: a JSON log layer re-renders the span's fields on each.
    let span = tracing::Span::current();
    tracing::record_all!(
        span,
        replay_id = record.replay_id.as_str(),
        room_id = record.room_id,
        task_id = record.task_id.as_deref(),
        sdkappid = record.sdkappid
    );
    remember_lesson(
        &record.replay_id,
        record.task_id.as_deref(),
        record.sdkappid,
    );
    match context.media.enrich(normalized).await {
        Ok(()) => {}
        Err(reason) if reason.code.is_transient() => return Outcome::Retry(reason),
        Err(reason) => return Outcome::Park(reason),
    }
    let record = &normalized.record;
    if let Some(hook) = &context.hooks.before_publish {
        hook(record);
    }
    let stage = context.metrics.stage_timer(Stage::Publish);
    let published = publish_record(context, record, delivery).await;
    stage.observe_duration();
    match published {
        Ok(()) => {
            let (replay_id, task_id) = lesson_ids();
            info!(
                replay_id,
                task_id,
                tracks = record.tracks.len(),
                warnings = record.warnings.len(),
                // From the handler's start to the record's confirm: a slow
                // record is found in the log, beside the stage histograms.
                elapsed_ms = handling_ms(),
                "published"
            );
            context.metrics.published();
            let now = now();
            let age = message_age(delivery, now);
            context.metrics.record_timing(age, freshness(record, now));
            context.metrics.app_published(record.sdkappid, age);
            Outcome::Done
        }
        Err(e) => Outcome::Retry(Rejection::new(ReasonCode::PublishFailed, e.to_string())),
    }
}

/// A due watch: ask TIC, then publish the finished recording, watch again,
/// or park.
async fn check_watch(context: &Context, delivery: &Delivery) -> Outcome {
    let watch: Watch = match serde_json::from_slice(&delivery.data) {
        Ok(watch) => watch,
        Err(e) => {
            return Outcome::Park(Rejection::new(
                ReasonCode::InvalidJson,
                format!("not a watch: {e}"),
            ));
        }
    };
    let span = tracing::Span::current();
    tracing::record_all!(
        span,
        task_id = watch.task_id.as_str(),
        sdkappid = watch.sdkappid
    );
    let retry = watch.clone();
    match context.watcher.check(watch, now().unix_timestamp()).await {
        WatchCheck::Again(watch, delay) => Outcome::Watch(watch, delay),
        WatchCheck::Park(reason) => Outcome::Park(reason),
        WatchCheck::Finished(mut normalized) => {
            let recorded = context.media.recorded(&normalized.record).await;
            let now = now().unix_timestamp();
            if recorded == Some(false) && context.watcher.too_soon_to_tell(&normalized.record, now)
            {
                // Its callback may be on its way: do not race it.
                info!("watched task just finished and has no record yet: checked again soon");
                return rescheduled(context.watcher.recheck_soon(retry, now));
            }
            let event = match recorded {
                Some(true) => WatchEvent::AlreadyRecorded,
                Some(false) => WatchEvent::Reconciled,
                None => WatchEvent::Finished,
            };
            context.metrics.watch(event);
            match publish_normalized(context, &mut normalized, delivery).await {
                Outcome::Retry(reason) => {
                    warn!(reason = %reason.code, "watched recording not published yet: {}", reason.message);
                    rescheduled(context.watcher.after_failure(retry, now))
                }
                outcome => outcome,
            }
        }
    }
}

/// The watch of `delivery` again after the retry delay (a transient failure).
fn retry_watch(context: &Context, delivery: &Delivery, reason: Rejection) -> Outcome {
    match serde_json::from_slice::<Watch>(&delivery.data) {
        Ok(watch) => {
            warn!(reason = %reason.code, "watch failed: {}", reason.message);
            rescheduled(context.watcher.after_failure(watch, now().unix_timestamp()))
        }
        Err(_) => Outcome::Park(reason),
    }
}

/// The outcome of a watch that is not checked now: watched later, or parked.
fn rescheduled(check: WatchCheck) -> Outcome {
    match check {
        WatchCheck::Again(watch, delay) => Outcome::Watch(watch, delay),
        WatchCheck::Park(reason) => Outcome::Park(reason),
        WatchCheck::Finished(_) => unreachable!("only a query finds a task finished"),
    }
}

/// Publish `watch` to the delay queue of `delay`, confirmed.
async fn schedule_watch(
    context: &Context,
    watch: &Watch,
    delay: Duration,
) -> Result<(), PublishError> {
    let body = serde_json::to_vec(watch).expect("a watch always serializes");
    let properties = amqp::json_properties()
        .with_type(WATCH_TYPE.into())
        .with_timestamp(now().unix_timestamp().max(0) as u64);
    let queue = delay_queue(&context.config.work_queue, delay);
    amqp::publish_confirmed(&context.publisher, "", &queue, &body, properties).await?;
    info!(task = %watch.task_id, delay_secs = delay.as_secs(), checks = watch.checks, "watch scheduled");
    context.metrics.watch(WatchEvent::Scheduled);
    Ok(())
}

/// Carry out the outcome, then ack — or, when that failed, nack with requeue
/// so the broker gives the message to another attempt.
async fn settle(
    context: &Context,
    delivery: &Delivery,
    outcome: Outcome,
    attempt: u32,
    kind: Kind,
) {
    let carried_out = match outcome {
        Outcome::Done => Ok(()),
        Outcome::Park(reason) => park_or_defer(context, delivery, &reason, attempt, kind).await,
        Outcome::Retry(reason) => retry_later(context, delivery, &reason, attempt, kind).await,
        Outcome::Watch(watch, delay) => schedule_watch(context, &watch, delay).await,
    };
    ack_or_requeue(delivery, carried_out).await;
}

/// Ack once the message's outcome is safe in the broker; else nack with
/// requeue, so the broker gives the message to another attempt.
async fn ack_or_requeue(delivery: &Delivery, carried_out: Result<(), PublishError>) {
    let settled = match carried_out {
        Ok(()) => delivery.acker.ack(BasicAckOptions::default()).await,
        Err(e) => {
            error!(error = %e, "could not move the message on: requeued");
            // A short pause keeps a broken broker link from spinning the CPU.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            delivery.acker.nack(requeue).await
        }
    };
    if let Err(e) = settled {
        warn!(error = %e, "ack/nack failed (channel gone): the broker redelivers the message");
    }
}

/// How long ago the message arrived: its AMQP `timestamp` (set by the ingress
/// and `publish` at receipt), else when it first failed.
fn message_age(delivery: &Delivery, now: OffsetDateTime) -> Option<Duration> {
    let arrived = delivery
        .properties
        .timestamp()
        .and_then(|t| i64::try_from(t).ok())
        .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
        .or_else(|| {
            header_text(delivery.properties.headers().as_ref(), headers::FIRST_SEEN)
                .and_then(|t| OffsetDateTime::parse(&t, &Rfc3339).ok())
        })?;
    (now - arrived).try_into().ok()
}

/// How long ago the recording ended.
fn freshness(record: &Record, now: OffsetDateTime) -> Option<Duration> {
    let started = OffsetDateTime::parse(&record.started_at, &Rfc3339).ok()?;
    let stopped = started + time::Duration::milliseconds(record.duration_ms);
    (now - stopped).try_into().ok()
}

/// The routing key of a record: `v1.<source>.<sdkappid or "unknown">`.
pub fn record_routing_key(record: &Record) -> String {
    let app = record
        .sdkappid
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into());
    format!("v1.{}.{app}", record.source.as_str())
}

/// Publish the record, confirmed, with `message_id` = replay_id for deduplication.
async fn publish_record(
    context: &Context,
    record: &Record,
    delivery: &Delivery,
) -> Result<(), PublishError> {
    let body = serde_json::to_vec(record).expect("a record always serializes");
    let mut properties = amqp::json_properties()
        .with_message_id(record.replay_id.as_str().into())
        .with_type("lesson-replay.v1".into())
        .with_app_id("lesson-replay".into())
        .with_timestamp(now().unix_timestamp().max(0) as u64);
    let inbound = delivery.properties.headers().as_ref();
    let mut table = FieldTable::default();
    // Copied only when it is a W3C trace context: a record never carries
    // text a publisher made up (3 000 characters, line breaks).
    if let Some(traceparent) =
        header_text(inbound, headers::TRACEPARENT).filter(|t| headers::is_traceparent(t))
    {
        set_header(&mut table, headers::TRACEPARENT, &traceparent);
    }
    properties = properties.with_headers(table);
    if let Some(inbound_id) = delivery.properties.message_id() {
        properties = properties.with_correlation_id(inbound_id.clone());
    }
    let timer = context.metrics.publish_confirm_timer();
    let published = amqp::publish_confirmed(
        &context.publisher,
        &context.config.records_exchange,
        &record_routing_key(record),
        &body,
        properties,
    )
    .await;
    timer.observe_duration();
    published
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// The message's headers with the retry bookkeeping of one more failure.
fn failure_headers(delivery: &Delivery, reason: &Rejection, failures: u32) -> FieldTable {
    let mut table = delivery.properties.headers().clone().unwrap_or_default();
    let at = rfc3339(now());
    if header_text(Some(&table), headers::FIRST_SEEN).is_none() {
        set_header(&mut table, headers::FIRST_SEEN, &at);
    }
    set_header(&mut table, headers::ATTEMPT, &failures.to_string());
    set_header(&mut table, headers::LAST_ERROR_AT, &at);
    set_header(&mut table, headers::LAST_REASON, reason.code.as_str());
    set_header(&mut table, headers::LAST_ERROR, &reason.message);
    table
}

/// Copy the message, with the bookkeeping of its `failures`, to the delay
/// queue `queue` (confirmed): its TTL brings it back.
async fn send_to_wait(
    context: &Context,
    delivery: &Delivery,
    reason: &Rejection,
    failures: u32,
    queue: &str,
) -> Result<(), PublishError> {
    let table = failure_headers(delivery, reason, failures);
    let properties = delivery.properties.clone().with_headers(table);
    amqp::publish_confirmed(&context.publisher, "", queue, &delivery.data, properties).await
}

/// Republish to the next delay tier (confirmed), or park when out of tiers.
async fn retry_later(
    context: &Context,
    delivery: &Delivery,
    reason: &Rejection,
    attempt: u32,
    kind: Kind,
) -> Result<(), PublishError> {
    let first_seen = header_text(delivery.properties.headers().as_ref(), headers::FIRST_SEEN)
        .and_then(|t| OffsetDateTime::parse(&t, &Rfc3339).ok())
        .unwrap_or_else(now);
    match context.retry.next_step(attempt, first_seen, now()) {
        RetryStep::Park(why) => {
            let reason = Rejection::new(reason.code, format!("{}; {why}", reason.message));
            park_or_defer(context, delivery, &reason, attempt, kind).await
        }
        RetryStep::Delay(tier) => {
            let delay = context.retry.tiers[tier];
            let queue = retry::tier_queue(&context.config.work_queue, delay);
            send_to_wait(context, delivery, reason, attempt + 1, &queue).await?;
            let (replay_id, task_id) = lesson_ids();
            warn!(replay_id, task_id, reason = %reason.code, delay_secs = delay.as_secs(), "retrying later: {}", reason.message);
            context.metrics.retried(reason.code, delay);
            context.metrics.app_failed(lesson_app(), false, reason.code);
            Ok(())
        }
    }
}

/// Park the message; when the broker does not confirm the parking (the
/// parking queue has no majority, the link is failing), send it to the
/// shortest delay queue instead, with its real reason: it comes back, is
/// decided the same way and parked then. No consumer slot is held meanwhile,
/// no redelivery counts towards the work queue's delivery limit (which would
/// park it later as `delivery_limit`, its reason lost).
async fn park_or_defer(
    context: &Context,
    delivery: &Delivery,
    reason: &Rejection,
    attempt: u32,
    kind: Kind,
) -> Result<(), PublishError> {
    let Err(e) = park_message(context, delivery, reason, attempt + 1).await else {
        return Ok(());
    };
    let queue = match kind {
        Kind::Message { .. } => shortest_tier(context),
        // A watch waits among the watches: the retry tiers lead to the work queue.
        Kind::Watch => {
            let delays = context.config.watch_schedule().delays();
            delay_queue(&context.config.work_queue, delays[0])
        }
    };
    send_to_wait(context, delivery, reason, attempt + 1, &queue).await?;
    let (replay_id, task_id) = lesson_ids();
    warn!(replay_id, task_id, reason = %reason.code, error = %e, %queue,
        "parking not confirmed: the message waits in a delay queue and is parked when it comes back");
    context.metrics.parking_deferred();
    Ok(())
}

/// The shortest delay tier's queue: it dead-letters back to the work queue.
fn shortest_tier(context: &Context) -> String {
    let shortest = context
        .retry
        .tiers
        .iter()
        .min()
        .copied()
        .unwrap_or_default();
    retry::tier_queue(&context.config.work_queue, shortest)
}

/// Copy the message — original body and headers, plus the reason, the attempt
/// count and the times — to the parking queue.
async fn park_message(
    context: &Context,
    delivery: &Delivery,
    reason: &Rejection,
    failures: u32,
) -> Result<(), PublishError> {
    let mut table = failure_headers(delivery, reason, failures);
    set_header(&mut table, headers::REASON, reason.code.as_str());
    set_header(&mut table, headers::ERROR, &reason.message);
    set_header(&mut table, headers::PARKED_AT, &rfc3339(now()));
    let properties = delivery
        .properties
        .clone()
        .with_headers(table)
        .with_delivery_mode(2);
    amqp::publish_confirmed(
        &context.publisher,
        "",
        &context.config.parking_queue,
        &delivery.data,
        properties,
    )
    .await?;
    let (replay_id, task_id) = lesson_ids();
    warn!(replay_id, task_id, reason = %reason.code, "parked: {}", reason.message);
    context.metrics.parked(reason.code);
    context.metrics.app_failed(lesson_app(), true, reason.code);
    Ok(())
}
