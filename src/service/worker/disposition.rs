//! Where a delivery leaves: its [`Outcome`] carried out (a retry to a delay
//! tier, the parking queue, a watch scheduled), then the ack — or, when the
//! broker did not take the outcome, a nack that requeues it.

use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::FieldTable;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing::{error, warn};

use super::Context;
use super::delivery::{lesson_app, lesson_ids};
use super::due_watches::schedule_watch;
use super::session::Kind;
use crate::broker::amqp::{self, PublishError};
use crate::broker::headers::{self, header_text, set_header};
use crate::broker::retry::{self, RetryStep};
use crate::decision::reason::Rejection;
use crate::decision::watch::{Watch, delay_queue};

/// What to do with a delivery once its processing is over.
pub(super) enum Outcome {
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

/// Carry out the outcome, then ack — or, when that failed, nack with requeue
/// so the broker gives the message to another attempt.
pub(super) async fn settle(
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
pub(super) async fn ack_or_requeue(delivery: &Delivery, carried_out: Result<(), PublishError>) {
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

pub(super) fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

pub(super) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// The message's headers with the retry bookkeeping of one more failure.
pub(super) fn failure_headers(
    delivery: &Delivery,
    reason: &Rejection,
    failures: u32,
) -> FieldTable {
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
pub(super) async fn send_to_wait(
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
pub(super) async fn retry_later(
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
pub(super) async fn park_or_defer(
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
pub(super) fn shortest_tier(context: &Context) -> String {
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
pub(super) async fn park_message(
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
