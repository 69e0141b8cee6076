//! The operator's side of the parking queue: list, replay, purge.
//!
//! Messages are read with `basic.get` and left unacknowledged until the end:
//! what is not replayed goes back to the queue, in place, when the channel
//! closes. Replayed messages return to the work queue with their original body
//! and headers, minus the parking and retry headers (the attempt count starts
//! again), and are acknowledged only after the broker confirmed the copy.

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use serde::Serialize;

use crate::broker::amqp::{self, BrokerSettings, DeclareError, PublishError};
use crate::broker::headers::{self, header_text};
use crate::decision::watch::{WATCH_TYPE, due_queue};
use crate::webhook::event::WEBHOOK_TYPE;

/// Why a `dlq` command failed.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error(transparent)]
    Topology(#[from] DeclareError),
    #[error("moving a message back to the work queue: {0}")]
    Replay(#[from] PublishError),
}

/// One parked message, as `dlq list` prints it (one JSON object per line).
#[derive(Debug, Clone, Serialize)]
pub struct ParkedMessage {
    /// Reason code; for messages the broker parked after its delivery limit,
    /// `delivery_limit` (from `x-death`).
    pub reason: String,
    pub error: Option<String>,
    pub attempts: Option<u32>,
    pub first_seen: Option<String>,
    pub last_error_at: Option<String>,
    pub parked_at: Option<String>,
    pub message_id: Option<String>,
    pub bytes: usize,
    /// The MD5 of the body: the `body_md5` of the worker's log lines about it.
    pub body_md5: String,
    /// The start of the body, for recognising it.
    pub body_preview: String,
}

fn summarize(properties: &BasicProperties, body: &[u8]) -> ParkedMessage {
    let table = properties.headers().as_ref();
    let text = |name| header_text(table, name);
    let reason = text(headers::REASON)
        .unwrap_or_else(|| death_reason(table).unwrap_or_else(|| "unknown".into()));
    let preview: String = String::from_utf8_lossy(&body[..body.len().min(120)])
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    ParkedMessage {
        reason,
        error: text(headers::ERROR),
        attempts: text(headers::ATTEMPT).and_then(|a| a.parse().ok()),
        first_seen: text(headers::FIRST_SEEN),
        last_error_at: text(headers::LAST_ERROR_AT),
        parked_at: text(headers::PARKED_AT),
        message_id: properties.message_id().as_ref().map(|m| m.to_string()),
        bytes: body.len(),
        body_md5: amqp::body_md5(body),
        body_preview: preview,
    }
}

/// The broker's own reason (`x-death[0].reason`), for messages it dead-lettered.
fn death_reason(table: Option<&FieldTable>) -> Option<String> {
    use lapin::types::AMQPValue;
    let AMQPValue::FieldArray(deaths) = table?.inner().get(headers::X_DEATH)? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    header_text(Some(first), "reason")
}

async fn open(broker: &BrokerSettings) -> Result<(lapin::Connection, Channel, u32), DlqError> {
    let connection = amqp::connect(broker, "lesson-replay dlq").await?;
    amqp::declare_topology(&connection, &broker.topology).await?;
    let channel = amqp::confirm_channel(&connection).await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let queue = channel
        .queue_declare(
            broker.topology.parking_queue.as_str().into(),
            passive,
            FieldTable::default(),
        )
        .await?;
    Ok((connection, channel, queue.message_count()))
}

/// Every parked message (or those with `reason`), the queue left unchanged.
pub async fn list(
    broker: &BrokerSettings,
    reason: Option<&str>,
) -> Result<Vec<ParkedMessage>, DlqError> {
    let (connection, channel, count) = open(broker).await?;
    let mut out = Vec::new();
    for _ in 0..count {
        let Some(message) = channel
            .basic_get(
                broker.topology.parking_queue.as_str().into(),
                BasicGetOptions::default(),
            )
            .await?
        else {
            break;
        };
        let parked = summarize(&message.delivery.properties, &message.delivery.data);
        if reason.is_none_or(|r| r == parked.reason) {
            out.push(parked);
        }
    }
    // Closing without acks puts every message back.
    channel.close(200, "listed".into()).await?;
    connection.close(200, "done".into()).await?;
    Ok(out)
}

/// Move parked messages (those with `reason`, at most `limit`) back to the
/// work queue — parked watches to the due watches, webhook events to the
/// webhook queue — with their attempt count reset. Returns how many moved.
pub async fn replay(
    broker: &BrokerSettings,
    reason: Option<&str>,
    limit: Option<usize>,
) -> Result<usize, DlqError> {
    let (connection, channel, count) = open(broker).await?;
    let queues = &broker.topology;
    let mut moved = 0;
    for _ in 0..count {
        if limit.is_some_and(|l| moved >= l) {
            break;
        }
        let got = channel
            .basic_get(
                queues.parking_queue.as_str().into(),
                BasicGetOptions::default(),
            )
            .await?;
        let Some(message) = got else { break };
        let delivery = &message.delivery;
        if reason.is_some_and(|r| r != summarize(&delivery.properties, &delivery.data).reason) {
            continue;
        }
        let original = delivery.properties.headers().clone().unwrap_or_default();
        let properties = delivery
            .properties
            .clone()
            .with_headers(headers::without_bookkeeping(&original));
        // A parked watch goes back to the due watches, a webhook event to
        // the webhook queue (left parked while no webhook URL is set), a
        // message to the work queue.
        let target = match delivery.properties.kind() {
            Some(kind) if kind.as_str() == WATCH_TYPE => due_queue(&queues.work_queue),
            Some(kind) if kind.as_str() == WEBHOOK_TYPE => match &queues.webhooks {
                Some(webhooks) => webhooks.queue.clone(),
                None => continue,
            },
            _ => queues.work_queue.clone(),
        };
        amqp::publish_confirmed(&channel, "", &target, &delivery.data, properties).await?;
        delivery.acker.ack(BasicAckOptions::default()).await?;
        moved += 1;
    }
    channel.close(200, "replayed".into()).await?;
    connection.close(200, "done".into()).await?;
    Ok(moved)
}

/// Delete every parked message. Returns how many there were.
pub async fn purge(broker: &BrokerSettings) -> Result<u32, DlqError> {
    let (connection, channel, _) = open(broker).await?;
    let purged = channel
        .queue_purge(
            broker.topology.parking_queue.as_str().into(),
            QueuePurgeOptions::default(),
        )
        .await?;
    connection.close(200, "done".into()).await?;
    Ok(purged)
}
