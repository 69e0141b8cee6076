//! The operator's side of the parking queue: list, replay, purge.
//!
//! Messages are read with `basic.get` and left unacknowledged until the end:
//! what is not replayed goes back to the queue, in place, when the channel
//! closes. Replayed messages return to the work queue with their original body
//! and headers, minus the parking and retry headers (the attempt count starts
//! again), and are acknowledged only after the broker confirmed the copy.

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use serde::Serialize;

use crate::broker::{self, HEADER_ERROR, HEADER_PARKED_AT, HEADER_REASON, header_text};
use crate::config::Config;
use crate::retry::{HEADER_ATTEMPT, HEADER_FIRST_SEEN, HEADER_LAST_ERROR_AT, RETRY_HEADERS};

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
    /// The start of the body, for recognising it.
    pub body_preview: String,
}

fn summarize(properties: &BasicProperties, body: &[u8]) -> ParkedMessage {
    let headers = properties.headers().as_ref();
    let text = |name| header_text(headers, name);
    let reason = text(HEADER_REASON)
        .unwrap_or_else(|| death_reason(headers).unwrap_or_else(|| "unknown".into()));
    let preview: String = String::from_utf8_lossy(&body[..body.len().min(120)])
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    ParkedMessage {
        reason,
        error: text(HEADER_ERROR),
        attempts: text(HEADER_ATTEMPT).and_then(|a| a.parse().ok()),
        first_seen: text(HEADER_FIRST_SEEN),
        last_error_at: text(HEADER_LAST_ERROR_AT),
        parked_at: text(HEADER_PARKED_AT),
        message_id: properties.message_id().as_ref().map(|m| m.to_string()),
        bytes: body.len(),
        body_preview: preview,
    }
}

/// The broker's own reason (`x-death[0].reason`), for messages it dead-lettered.
fn death_reason(headers: Option<&FieldTable>) -> Option<String> {
    use lapin::types::AMQPValue;
    let AMQPValue::FieldArray(deaths) = headers?.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    header_text(Some(first), "reason")
}

async fn open(config: &Config) -> Result<(lapin::Connection, Channel, u32), lapin::Error> {
    let connection = broker::connect(config, "lesson-replay dlq").await?;
    let channel = broker::confirm_channel(&connection).await?;
    broker::declare_topology(&channel, config).await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let queue = channel
        .queue_declare(
            config.parking_queue.as_str().into(),
            passive,
            FieldTable::default(),
        )
        .await?;
    Ok((connection, channel, queue.message_count()))
}

/// Every parked message (or those with `reason`), the queue left unchanged.
pub async fn list(
    config: &Config,
    reason: Option<&str>,
) -> Result<Vec<ParkedMessage>, lapin::Error> {
    let (connection, channel, count) = open(config).await?;
    let mut out = Vec::new();
    for _ in 0..count {
        let Some(message) = channel
            .basic_get(
                config.parking_queue.as_str().into(),
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
/// work queue with their attempt count reset. Returns how many moved.
pub async fn replay(
    config: &Config,
    reason: Option<&str>,
    limit: Option<usize>,
) -> Result<usize, String> {
    let (connection, channel, count) = open(config).await.map_err(|e| e.to_string())?;
    let mut moved = 0;
    for _ in 0..count {
        if limit.is_some_and(|l| moved >= l) {
            break;
        }
        let got = channel
            .basic_get(
                config.parking_queue.as_str().into(),
                BasicGetOptions::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
        let Some(message) = got else { break };
        let delivery = &message.delivery;
        if reason.is_some_and(|r| r != summarize(&delivery.properties, &delivery.data).reason) {
            continue;
        }
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        let mut inner = headers.inner().clone();
        for name in
            RETRY_HEADERS
                .iter()
                .chain(&[HEADER_REASON, HEADER_ERROR, HEADER_PARKED_AT, "x-death"])
        {
            inner.remove(&ShortString::from(*name));
        }
        headers = FieldTable::from(inner);
        let properties = delivery.properties.clone().with_headers(headers);
        broker::publish_confirmed(&channel, "", &config.work_queue, &delivery.data, properties)
            .await
            .map_err(|e| e.to_string())?;
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        moved += 1;
    }
    channel
        .close(200, "replayed".into())
        .await
        .map_err(|e| e.to_string())?;
    connection
        .close(200, "done".into())
        .await
        .map_err(|e| e.to_string())?;
    Ok(moved)
}

/// Delete every parked message. Returns how many there were.
pub async fn purge(config: &Config) -> Result<u32, lapin::Error> {
    let (connection, channel, _) = open(config).await?;
    let purged = channel
        .queue_purge(
            config.parking_queue.as_str().into(),
            QueuePurgeOptions::default(),
        )
        .await?;
    connection.close(200, "done".into()).await?;
    Ok(purged)
}
