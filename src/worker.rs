//! The worker: where a message enters ([`run`] consumes the work queue), is
//! decided ([`crate::pipeline::decide`]) and leaves ([`publish_record`] to the
//! records exchange, or [`park_message`] to the parking queue).
//!
//! The input is acknowledged only after its outcome is confirmed by the
//! broker, so a crash at any point redelivers it: at-least-once, with records
//! that downstream deduplicates by `message_id` (= replay_id).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::task::TaskTracker;
use tracing::field::Empty;
use tracing::{Instrument, error, info, info_span, warn};

use crate::broker::{self, PublishError};
use crate::config::Config;
use crate::media::Media;
use crate::pipeline::{Decision, SignaturePolicy, decide};
use crate::reason::{ReasonCode, Rejection};
use crate::record::Record;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker cancelled the consumer of {0}")]
    ConsumerCancelled(String),
    #[error("{0}")]
    Startup(String),
}

/// What every delivery handler shares.
struct Context {
    config: Config,
    policy: SignaturePolicy,
    media: Media,
    publisher: Channel,
}

/// Run the worker until `shutdown` completes, then stop in order: cancel the
/// consumer, let in-flight messages finish within the grace period, close the
/// channels and the connection. Unfinished messages are requeued by the broker.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
    let media = Media::from_config(&config)
        .await
        .map_err(WorkerError::Startup)?;
    let connection = broker::connect(&config, "lesson-replay worker").await?;
    let consumer_channel = connection.create_channel().await?;
    broker::declare_topology(&consumer_channel, &config).await?;
    consumer_channel
        .basic_qos(config.concurrency, BasicQosOptions::default())
        .await?;
    let publisher = broker::confirm_channel(&connection).await?;
    let consumer_tag = format!("lesson-replay-{}", std::process::id());
    let mut deliveries = consumer_channel
        .basic_consume(
            config.work_queue.as_str().into(),
            consumer_tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    info!(queue = %config.work_queue, concurrency = config.concurrency, "consuming");

    let grace = config.shutdown_grace();
    let context = Arc::new(Context {
        policy: config.signature_policy(),
        media,
        publisher,
        config,
    });
    let tracker = TaskTracker::new();
    tokio::pin!(shutdown);
    let outcome = loop {
        tokio::select! {
            () = &mut shutdown => break Ok(()),
            next = deliveries.next() => match next {
                Some(Ok(delivery)) => {
                    tracker.spawn(handle_delivery(context.clone(), delivery));
                }
                Some(Err(e)) => break Err(WorkerError::Broker(e)),
                None => break Err(WorkerError::ConsumerCancelled(context.config.work_queue.clone())),
            },
        }
    };

    info!("stopping: cancelling the consumer");
    if let Err(e) = consumer_channel
        .basic_cancel(consumer_tag.as_str().into(), BasicCancelOptions::default())
        .await
    {
        warn!(error = %e, "could not cancel the consumer");
    }
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(
            grace_secs = grace.as_secs(),
            "in-flight messages did not finish in time: the broker requeues them"
        );
    }
    let _ = consumer_channel.close(200, "shutdown".into()).await;
    let _ = context.publisher.close(200, "shutdown".into()).await;
    let _ = connection.close(200, "shutdown".into()).await;
    info!("stopped");
    outcome
}

/// What to do with a delivery once its processing is over.
enum Outcome {
    /// Its record is published (or it was skipped): acknowledge.
    Done,
    /// Permanent failure: copy it to the parking queue, then acknowledge.
    Park(Rejection),
    /// Transient failure: give it back to the broker for a later attempt.
    Retry(Rejection),
}

/// Decide what one delivery becomes, carry it out, and settle it with the
/// broker only once the outcome is safe there.
async fn handle_delivery(context: Arc<Context>, delivery: Delivery) {
    let span = info_span!(
        "delivery",
        replay_id = Empty,
        task_id = Empty,
        room_id = Empty,
        sdkappid = Empty,
        redelivered = delivery.redelivered
    );
    async move {
        let outcome = process(&context, &delivery).await;
        settle(&context, &delivery, outcome).await;
    }
    .instrument(span)
    .await
}

async fn process(context: &Context, delivery: &Delivery) -> Outcome {
    let envelope = broker::envelope_of(&delivery.properties);
    let mut normalized = match decide(&delivery.data, &envelope, &context.policy) {
        Decision::Publish(normalized) => normalized,
        Decision::Skip(reason) => {
            info!(reason = %reason.code, "skipped: {}", reason.message);
            return Outcome::Done;
        }
        Decision::Reject(reason) => return Outcome::Park(reason),
    };
    let record = &normalized.record;
    let span = tracing::Span::current();
    span.record("replay_id", record.replay_id.as_str());
    span.record("room_id", record.room_id);
    if let Some(task) = &record.task_id {
        span.record("task_id", task.as_str());
    }
    if let Some(app) = record.sdkappid {
        span.record("sdkappid", app);
    }
    match context.media.enrich(&mut normalized).await {
        Ok(()) => {}
        Err(reason) if reason.code.is_transient() => return Outcome::Retry(reason),
        Err(reason) => return Outcome::Park(reason),
    }
    let record = &normalized.record;
    match publish_record(context, record, delivery).await {
        Ok(()) => {
            info!(
                tracks = record.tracks.len(),
                warnings = record.warnings.len(),
                "published"
            );
            Outcome::Done
        }
        Err(e) => Outcome::Retry(Rejection::new(ReasonCode::PublishFailed, e.to_string())),
    }
}

async fn settle(context: &Context, delivery: &Delivery, outcome: Outcome) {
    let outcome = match outcome {
        Outcome::Park(reason) => match park_message(context, delivery, &reason).await {
            Ok(()) => {
                warn!(reason = %reason.code, "parked: {}", reason.message);
                Outcome::Done
            }
            Err(e) => Outcome::Retry(Rejection::new(
                ReasonCode::PublishFailed,
                format!("parking failed: {e}"),
            )),
        },
        other => other,
    };
    let settled = match outcome {
        Outcome::Done => delivery.acker.ack(BasicAckOptions::default()).await,
        Outcome::Park(_) => unreachable!("parked above"),
        Outcome::Retry(reason) => {
            error!(reason = %reason.code, "not finished, requeued: {}", reason.message);
            // A short pause keeps a broken downstream from spinning the CPU.
            tokio::time::sleep(Duration::from_millis(500)).await;
            delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await
        }
    };
    if let Err(e) = settled {
        warn!(error = %e, "ack/nack failed: the broker redelivers the message");
    }
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
    let mut properties = broker::json_properties()
        .with_message_id(record.replay_id.as_str().into())
        .with_type("lesson-replay.v1".into())
        .with_app_id("lesson-replay".into())
        .with_timestamp(now_unix());
    if let Some(inbound_id) = delivery.properties.message_id() {
        properties = properties.with_correlation_id(inbound_id.clone());
    }
    broker::publish_confirmed(
        &context.publisher,
        &context.config.records_exchange,
        &record_routing_key(record),
        &body,
        properties,
    )
    .await
}

/// Copy the message, unchanged but for the reason headers, to the parking queue.
async fn park_message(
    context: &Context,
    delivery: &Delivery,
    reason: &Rejection,
) -> Result<(), PublishError> {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    broker::set_header(&mut headers, broker::HEADER_REASON, reason.code.as_str());
    broker::set_header(&mut headers, broker::HEADER_ERROR, &reason.message);
    let parked_at = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default();
    broker::set_header(&mut headers, broker::HEADER_PARKED_AT, &parked_at);
    let properties = delivery
        .properties
        .clone()
        .with_headers(headers)
        .with_delivery_mode(2);
    broker::publish_confirmed(
        &context.publisher,
        "",
        &context.config.parking_queue,
        &delivery.data,
        properties,
    )
    .await
}

fn now_unix() -> u64 {
    OffsetDateTime::now_utc().unix_timestamp().max(0) as u64
}
