//! The RabbitMQ edge: connection, topology, confirmed publishing, and the
//! translation between AMQP properties and the pipeline's [`Envelope`].
//!
//! Topology (names configurable), declared idempotently at start:
//!
//! ```text
//! tic.recordings (topic) --#--> lesson-replay.recordings (quorum, delivery limit)
//!                                  ^          | dead-letter (delivery limit reached)
//!        TTL expired: dead-letter  |          v
//!  lesson-replay.recordings.retry.<N>s    lesson-replay.parking (classic)
//!  (quorum, one per delay tier)
//! lesson-replay.records (topic) --#--> lesson-replay.records (quorum)
//! ```
//!
//! The parking queue is a classic queue: operators list and replay it by
//! reading and requeueing, which a quorum queue would count towards its
//! delivery limit (20 by default in RabbitMQ 4) and eventually drop.
//!
//! Every argument used here exists in RabbitMQ 3.10 and 4.x.

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use secrecy::ExposeSecret;

use crate::config::Config;
use crate::pipeline::Envelope;

/// Headers carrying the callback's URL parameters.
pub const HEADER_SIGN: &str = "x-tic-sign";
pub const HEADER_RANDOM: &str = "x-tic-random";
pub const HEADER_SDKAPPID: &str = "x-tic-sdkappid";
/// Headers added to a parked message.
pub const HEADER_REASON: &str = "x-lesson-replay-reason";
pub const HEADER_ERROR: &str = "x-lesson-replay-error";
pub const HEADER_PARKED_AT: &str = "x-lesson-replay-parked-at";
/// W3C trace context, copied from the inbound message to its record.
pub const HEADER_TRACEPARENT: &str = "traceparent";

/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("broker refused the message (nack)")]
    Nacked,
    #[error("message unroutable: {0}")]
    Unroutable(String),
    #[error("publisher confirms are not enabled on this channel")]
    NotConfirmed,
}

/// Connect, naming the connection so operators can find it in the management UI.
pub async fn connect(config: &Config, name: &str) -> Result<Connection, lapin::Error> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(config.amqp_url.expose_secret(), properties).await
}

/// A channel in publisher-confirm mode.
pub async fn confirm_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

fn queue_type(kind: &str) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), LongString::from(kind).into());
    args
}

/// Dead-letter to `target` through the default exchange, at least once
/// (quorum queues, RabbitMQ 3.10+; it needs reject-publish overflow).
fn dead_letter_to(args: &mut FieldTable, target: &str) {
    args.insert("x-dead-letter-exchange".into(), LongString::from("").into());
    args.insert(
        "x-dead-letter-routing-key".into(),
        LongString::from(target).into(),
    );
    args.insert(
        "x-dead-letter-strategy".into(),
        LongString::from("at-least-once").into(),
    );
    args.insert(
        "x-overflow".into(),
        LongString::from("reject-publish").into(),
    );
}

/// Declare every exchange, queue and binding the worker uses. Idempotent.
pub async fn declare_topology(channel: &Channel, config: &Config) -> Result<(), lapin::Error> {
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    for exchange in [&config.inbound_exchange, &config.records_exchange] {
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                durable_exchange,
                FieldTable::default(),
            )
            .await?;
    }
    channel
        .queue_declare(
            config.parking_queue.as_str().into(),
            durable_queue,
            queue_type("classic"),
        )
        .await?;
    let mut work = queue_type("quorum");
    work.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(config.delivery_limit.into()),
    );
    dead_letter_to(&mut work, &config.parking_queue);
    channel
        .queue_declare(config.work_queue.as_str().into(), durable_queue, work)
        .await?;
    for delay in config.retry_policy().tiers {
        let mut tier = queue_type("quorum");
        let ttl_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        tier.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl_ms));
        dead_letter_to(&mut tier, &config.work_queue);
        let name = crate::retry::tier_queue(&config.work_queue, delay);
        channel
            .queue_declare(name.as_str().into(), durable_queue, tier)
            .await?;
    }
    channel
        .queue_declare(
            config.records_queue.as_str().into(),
            durable_queue,
            queue_type("quorum"),
        )
        .await?;
    let bindings = [
        (&config.work_queue, &config.inbound_exchange),
        (&config.records_queue, &config.records_exchange),
    ];
    for (queue, exchange) in bindings {
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Publish with `mandatory` and wait for the broker's confirm: `Ok` means the
/// message is routed to at least one queue and stored.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), PublishError> {
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let confirmation = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            options,
            body,
            properties,
        )
        .await?
        .await?;
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) => Err(PublishError::Unroutable(format!(
            "exchange {exchange:?}, routing key {routing_key:?}: {}",
            returned.reply_text
        ))),
        Confirmation::Nack(_) => Err(PublishError::Nacked),
        Confirmation::NotRequested => Err(PublishError::NotConfirmed),
    }
}

/// Properties of a persistent JSON message.
pub fn json_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(PERSISTENT)
}

/// The header as text, whatever AMQP type the publisher chose.
pub fn header_text(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    let value = headers?.inner().get(name)?;
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::ShortShortInt(v) => Some(v.to_string()),
        AMQPValue::ShortShortUInt(v) => Some(v.to_string()),
        AMQPValue::ShortInt(v) => Some(v.to_string()),
        AMQPValue::ShortUInt(v) => Some(v.to_string()),
        AMQPValue::LongInt(v) => Some(v.to_string()),
        AMQPValue::LongUInt(v) => Some(v.to_string()),
        AMQPValue::LongLongInt(v) => Some(v.to_string()),
        AMQPValue::Timestamp(v) => Some(v.to_string()),
        _ => None,
    }
}

/// The pipeline's view of a delivery's properties.
pub fn envelope_of(properties: &BasicProperties) -> Envelope {
    let headers = properties.headers().as_ref();
    Envelope {
        sign: header_text(headers, HEADER_SIGN),
        random: header_text(headers, HEADER_RANDOM),
        sdkappid: header_text(headers, HEADER_SDKAPPID),
        timestamp: properties.timestamp().and_then(|t| i64::try_from(t).ok()),
    }
}

/// Set a text header, replacing any previous value.
pub fn set_header(headers: &mut FieldTable, name: &str, value: &str) {
    headers.insert(ShortString::from(name), LongString::from(value).into());
}
