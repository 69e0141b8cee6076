//! One delivery's handling: its span, the panic guard, the handler of its
//! kind, and the settling of its outcome.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use lapin::message::Delivery;
use tracing::field::Empty;
use tracing::{Instrument, error, info_span, warn};

use super::Context;
use super::disposition::settle;
use super::due_watches::{check_watch, retry_watch};
use super::lessons::process;
use super::{Kind, Outcome, handling, webhooks};
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
    let app = match kind {
        Kind::Message { app } | Kind::Webhook { app } => app,
        Kind::Watch => None,
    };
    handling::scope(app, handling.instrument(span)).await
}
