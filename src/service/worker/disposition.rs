//! Where a delivery leaves: its [`super::Outcome`] carried out (a retry to a delay
//! tier, the parking queue, a watch scheduled), then the ack — or, when the
//! broker did not take the outcome, a nack that requeues it.

use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::FieldTable;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing::{error, info, warn};

use super::Context;
use super::handling::{lesson_app, lesson_ids, lesson_room};
use super::{Kind, Outcome, now, rfc3339, webhooks};
use crate::broker::amqp::{self, PublishError};
use crate::broker::headers::{self, header_text, set_header};
use crate::broker::retry::{self, RetryPolicy, RetryStep};
use crate::decision::decide::named;
use crate::decision::reason::Rejection;
use crate::decision::watch::{WATCH_TYPE, Watch, delay_queue};
use crate::telemetry::metrics::{WatchEvent, WebhookOutcome};
use crate::webhook::event::{self, Failure};

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
        Outcome::Retry(reason) => {
            retry_later(context, delivery, &reason, attempt, kind, None).await
        }
        Outcome::RetryNoSooner(reason, wait) => {
            retry_later(context, delivery, &reason, attempt, kind, Some(wait)).await
        }
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
/// queue `queue` (confirmed): its TTL brings it back — or `expires`, when
/// given, if that is sooner (a message's own TTL; the broker drops it when
/// it dead-letters the message, so it never travels further).
pub(super) async fn send_to_wait(
    context: &Context,
    delivery: &Delivery,
    reason: &Rejection,
    failures: u32,
    queue: &str,
    expires: Option<Duration>,
) -> Result<(), PublishError> {
    let table = failure_headers(delivery, reason, failures);
    let mut properties = delivery.properties.clone().with_headers(table);
    if let Some(expires) = expires {
        properties = properties.with_expiration(expires.as_millis().to_string().into());
    }
    amqp::publish_confirmed(&context.publisher, "", queue, &delivery.data, properties).await
}

/// Republish to the next delay tier (confirmed), or park when out of tiers.
/// A webhook event waits in the webhook tiers, with a TTL of its own up to a
/// fifth shorter than the tier's, at random (never shorter than `at_least`,
/// which moves it to a longer tier). The broker expires a message only at
/// the head of its queue, so this spreads events that failed apart in time,
/// not a burst that failed together: what bounds a burst towards an endpoint
/// is its lane's `webhook_concurrency`.
pub(super) async fn retry_later(
    context: &Context,
    delivery: &Delivery,
    reason: &Rejection,
    attempt: u32,
    kind: Kind,
    at_least: Option<Duration>,
) -> Result<(), PublishError> {
    let first_seen = header_text(delivery.properties.headers().as_ref(), headers::FIRST_SEEN)
        .and_then(|t| OffsetDateTime::parse(&t, &Rfc3339).ok())
        .unwrap_or_else(now);
    let (policy, base) = retries_of(context, kind);
    match policy.next_step(attempt, first_seen, now()) {
        RetryStep::Park(why) => {
            let reason = Rejection::new(reason.code, format!("{}; {why}", reason.message));
            park_or_defer(context, delivery, &reason, attempt, kind).await
        }
        RetryStep::Delay(tier) => {
            let delay = no_sooner_than(&policy.tiers, policy.tiers[tier], at_least);
            let queue = retry::tier_queue(base, delay);
            let (replay_id, task_id) = lesson_ids();
            if let Kind::Webhook { .. } = kind {
                // Never sooner than the receiver asked (`Retry-After`).
                let jittered = delay
                    .mul_f64(1.0 - fastrand::f64() / 5.0)
                    .max(at_least.unwrap_or_default())
                    .min(delay);
                send_to_wait(
                    context,
                    delivery,
                    reason,
                    attempt + 1,
                    &queue,
                    Some(jittered),
                )
                .await?;
                warn!(reason = %reason.code, delay_secs = jittered.as_secs(), attempt = attempt + 1,
                    "webhook not delivered: tried again later: {}", reason.message);
                let app = webhooks::app_of_event(delivery);
                context
                    .metrics
                    .webhook_delivery(app, WebhookOutcome::Retried);
                if let Some(webhooks) = &context.webhooks {
                    webhooks.waiting(delivery, app, jittered);
                }
                return Ok(());
            }
            send_to_wait(context, delivery, reason, attempt + 1, &queue, None).await?;
            warn!(replay_id, task_id, reason = %reason.code, delay_secs = delay.as_secs(), "retrying later: {}", reason.message);
            context.metrics.retried(reason.code, delay);
            context.metrics.app_failed(lesson_app(), false, reason.code);
            Ok(())
        }
    }
}

/// The retry policy of `kind`'s deliveries and the base name of its tiers.
fn retries_of(context: &Context, kind: Kind) -> (&RetryPolicy, &str) {
    match (kind, &context.webhooks) {
        (Kind::Webhook { .. }, Some(webhooks)) => (&webhooks.policy, webhooks.queue.as_str()),
        _ => (&context.retry, context.config.work_queue.as_str()),
    }
}

/// `delay`, or when `at_least` is longer, the first of `tiers` as long as
/// it (the longest when none is).
fn no_sooner_than(tiers: &[Duration], delay: Duration, at_least: Option<Duration>) -> Duration {
    match at_least {
        Some(wait) if wait > delay => {
            let mut longer: Vec<Duration> = tiers.iter().copied().filter(|t| *t >= wait).collect();
            longer.sort();
            longer
                .first()
                .copied()
                .unwrap_or_else(|| tiers.iter().copied().max().unwrap_or(delay))
        }
        _ => delay,
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
    let Err(e) = park_message(context, delivery, reason, attempt + 1, kind).await else {
        return Ok(());
    };
    let queue = match kind {
        Kind::Message { .. } | Kind::Webhook { .. } => shortest_tier(context, kind),
        // A watch waits among the watches: the retry tiers lead to the work queue.
        Kind::Watch => {
            let delays = context.config.watch_schedule().delays();
            delay_queue(&context.config.work_queue, delays[0])
        }
    };
    send_to_wait(context, delivery, reason, attempt + 1, &queue, None).await?;
    let (replay_id, task_id) = lesson_ids();
    warn!(replay_id, task_id, reason = %reason.code, error = %e, %queue,
        "parking not confirmed: the message waits in a delay queue and is parked when it comes back");
    context.metrics.parking_deferred();
    Ok(())
}

/// The shortest delay tier's queue of `kind`: it dead-letters back to the
/// work queue (the webhook queue).
pub(super) fn shortest_tier(context: &Context, kind: Kind) -> String {
    let (policy, base) = retries_of(context, kind);
    let shortest = policy.tiers.iter().min().copied().unwrap_or_default();
    retry::tier_queue(base, shortest)
}

/// Copy the message — original body and headers, plus the reason, the attempt
/// count and the times — to the parking queue. A lesson's school is told
/// first (`lesson.replay_failed`, when its app has a webhook endpoint).
pub(super) async fn park_message(
    context: &Context,
    delivery: &Delivery,
    reason: &Rejection,
    failures: u32,
    kind: Kind,
) -> Result<(), PublishError> {
    let is_lesson = !matches!(kind, Kind::Webhook { .. });
    if is_lesson
        && context.webhooks.is_some()
        && let Some(failure) = failure_of(context, delivery, reason, failures)
    {
        webhooks::publish_event(context, event::replay_failed(&failure, now())).await?;
    }
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
    if !is_lesson {
        let app = webhooks::app_of_event(delivery);
        warn!(reason = %reason.code, "webhook event parked: {}", reason.message);
        context
            .metrics
            .webhook_delivery(app, WebhookOutcome::Parked);
        webhooks::parked(context, delivery);
        return Ok(());
    }
    let (replay_id, task_id) = lesson_ids();
    warn!(replay_id, task_id, reason = %reason.code, "parked: {}", reason.message);
    context.metrics.parked(reason.code);
    context.metrics.app_failed(lesson_app(), true, reason.code);
    Ok(())
}

/// What a school is told of a lesson parked; `None` when nothing names a
/// lesson (no app, no replay or task id: a body nobody could read).
fn failure_of(
    context: &Context,
    delivery: &Delivery,
    reason: &Rejection,
    failures: u32,
) -> Option<Failure> {
    let (replay_id, task_id) = lesson_ids();
    // Rejected before it became a record: what its body says, if readable.
    let envelope = amqp::envelope_of(&delivery.properties);
    let body = named(&delivery.data, &envelope, &context.policy.limits);
    let app = lesson_app().or(body.app);
    let task_id = task_id.or(body.task_id);
    if app.is_none() && replay_id.is_none() && task_id.is_none() {
        return None;
    }
    let table = delivery.properties.headers().as_ref();
    Some(Failure {
        sdkappid: app,
        room_id: lesson_room().or(body.room_id),
        task_id,
        replay_id,
        reason: reason.code.as_str().to_owned(),
        message: reason.message.clone(),
        attempts: failures,
        first_failed_at: header_text(table, headers::FIRST_SEEN).or_else(|| Some(rfc3339(now()))),
        message_md5: amqp::body_md5(&delivery.data),
    })
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
