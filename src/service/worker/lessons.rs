//! A lesson's handling: decide, check its files, publish its record.

use std::time::Duration;

use lapin::message::Delivery;
use lapin::types::FieldTable;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing::{info, warn};

use super::Context;
use super::handling::{handling_ms, lesson_ids, remember_lesson};
use super::webhooks::publish_event;
use super::{Outcome, now, rescheduled};
use crate::broker::amqp::{self, PublishError};
use crate::broker::headers::{self, header_text, set_header};
use crate::decision::decide::{Decision, decide};
use crate::decision::normalize::Normalized;
use crate::decision::reason::{ReasonCode, Rejection};
use crate::decision::record::Record;
use crate::telemetry::metrics::Stage;
use crate::webhook;

pub(super) async fn process(context: &Context, delivery: &Delivery) -> Outcome {
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
pub(super) async fn publish_normalized(
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
        Some(&record.replay_id),
        record.task_id.as_deref(),
        record.room_id,
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
    // The record, then its event for the school's endpoint (when it has
    // one): both confirmed before the ack. A failure in between sends the
    // record again later (records are deduplicated by `message_id`).
    let json = serde_json::to_vec(record).expect("a record always serializes");
    let published = match (
        publish_record(context, record, &json, delivery).await,
        &context.webhooks,
    ) {
        (Ok(()), Some(webhooks)) if webhooks.tells(record.sdkappid) => {
            let limit = webhooks.max_record_bytes;
            let event = webhook::event::replay_ready(record, &json, now(), limit);
            publish_event(context, event)
                .await
                .map_err(|e| format!("the record is published but not its webhook event: {e}"))
        }
        (Ok(()), _) => Ok(()),
        (Err(e), _) => Err(e.to_string()),
    };
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
        Err(e) => Outcome::Retry(Rejection::new(ReasonCode::PublishFailed, e)),
    }
}

/// How long ago the message arrived: its AMQP `timestamp` (set by the ingress
/// and `publish` at receipt), else when it first failed.
pub(super) fn message_age(delivery: &Delivery, now: OffsetDateTime) -> Option<Duration> {
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
pub(super) fn freshness(record: &Record, now: OffsetDateTime) -> Option<Duration> {
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

/// Publish the record (its JSON, `body`), confirmed, with `message_id` =
/// replay_id for deduplication.
pub(super) async fn publish_record(
    context: &Context,
    record: &Record,
    body: &[u8],
    delivery: &Delivery,
) -> Result<(), PublishError> {
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
        body,
        properties,
    )
    .await;
    timer.observe_duration();
    published
}
