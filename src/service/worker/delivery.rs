//! One delivery's handling: its span, the panic guard, the handler of its
//! kind, and the settling of its outcome; and what the log lines of its
//! outcome say about it.

use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use futures_util::FutureExt;
use lapin::message::Delivery;
use tracing::field::Empty;
use tracing::{Instrument, error, info_span, warn};

use super::Context;
use super::disposition::{Outcome, settle};
use super::due_watches::{check_watch, retry_watch};
use super::lessons::process;
use super::session::Kind;
use super::webhooks;
use crate::broker::amqp;
use crate::broker::headers::{self, header_text};
use crate::decision::reason::{ReasonCode, Rejection};

/// Decide what one delivery becomes, carry it out, and settle it with the
/// broker only once the outcome is safe there.
pub(super) async fn handle_delivery(context: Arc<Context>, delivery: Delivery, kind: Kind) {
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
        // Lessons and watches: a webhook attempt has its own histogram.
        let lesson = !matches!(kind, Kind::Webhook { .. });
        let _in_flight = lesson.then(|| metrics.in_flight_guard());
        let timer = lesson.then(|| metrics.processing_timer());
        // A panic is a bug in one message's processing: caught, retried like a
        // transient failure, and the worker goes on.
        let processing = match kind {
            Kind::Message { .. } => {
                AssertUnwindSafe(process(&context, &delivery).boxed()).catch_unwind()
            }
            Kind::Watch => {
                AssertUnwindSafe(check_watch(&context, &delivery).boxed()).catch_unwind()
            }
            Kind::Webhook { .. } => {
                AssertUnwindSafe(webhooks::deliver(&context, &delivery).boxed()).catch_unwind()
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
        if let Some(timer) = timer {
            timer.observe_duration();
        }
    };
    let handling_state = Handling {
        started: Instant::now(),
        replay_id: None,
        task_id: None,
        room_id: None,
        app: match kind {
            Kind::Message { app } | Kind::Webhook { app } => app,
            Kind::Watch => None,
        },
    };
    HANDLING
        .scope(RefCell::new(handling_state), handling.instrument(span))
        .await
}

/// The delivery being handled, for its log lines.
pub(super) struct Handling {
    /// When its handler started: the `published` line says how long it took.
    started: Instant,
    /// The lesson it is about, once known: its outcome's log line carries
    /// `replay_id` and `task_id` as top-level fields, where log tools index
    /// them (JSON lines nest span fields); a `lesson.replay_failed` event
    /// carries them and the room.
    replay_id: Option<String>,
    task_id: Option<String>,
    room_id: Option<i64>,
    /// Its app, once known (its lane's, then its record's): the per-app metrics' label.
    app: Option<i64>,
}

tokio::task_local! {
    static HANDLING: RefCell<Handling>;
}

pub(super) fn remember_lesson(
    replay_id: Option<&str>,
    task_id: Option<&str>,
    room_id: i64,
    app: Option<i64>,
) {
    let _ = HANDLING.try_with(|handling| {
        let mut handling = handling.borrow_mut();
        handling.replay_id = replay_id.map(str::to_owned);
        handling.task_id = task_id.map(str::to_owned);
        handling.room_id = Some(room_id);
        handling.app = app.or(handling.app);
    });
}

/// The room of the delivery being handled, when known.
pub(super) fn lesson_room() -> Option<i64> {
    HANDLING
        .try_with(|handling| handling.borrow().room_id)
        .ok()
        .flatten()
}

/// The app of the delivery being handled, when known.
pub(super) fn lesson_app() -> Option<i64> {
    HANDLING
        .try_with(|handling| handling.borrow().app)
        .ok()
        .flatten()
}

/// The `replay_id` and `task_id` of the delivery being handled, when known.
pub(super) fn lesson_ids() -> (Option<String>, Option<String>) {
    HANDLING
        .try_with(|handling| {
            let handling = handling.borrow();
            (handling.replay_id.clone(), handling.task_id.clone())
        })
        .unwrap_or_default()
}

/// Milliseconds since the handler of the current delivery started (to 0.01).
pub(super) fn handling_ms() -> Option<f64> {
    HANDLING
        .try_with(|handling| handling.borrow().started.elapsed())
        .ok()
        .map(|elapsed| (elapsed.as_secs_f64() * 1e5).round() / 100.0)
}
