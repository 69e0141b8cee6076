//! The RabbitMQ edge: connection, topology, confirmed publishing, and the
//! translation between AMQP properties and the pipeline's [`Envelope`].
//!
//! The topology itself is data: see [`crate::topology`].

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
use crate::topology::{self, Arg};

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

/// Declare every exchange, queue and binding of [`topology::plan`]. Idempotent.
pub async fn declare_topology(channel: &Channel, config: &Config) -> Result<(), lapin::Error> {
    let plan = topology::plan(config);
    let exchange_options = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let queue_options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    for exchange in &plan.exchanges {
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                exchange_options,
                FieldTable::default(),
            )
            .await?;
    }
    for queue in &plan.queues {
        let mut arguments = FieldTable::default();
        for (name, value) in &queue.arguments {
            let value = match value {
                Arg::Text(t) => LongString::from(t.as_str()).into(),
                Arg::Int(i) => AMQPValue::LongLongInt(*i),
            };
            arguments.insert((*name).into(), value);
        }
        channel
            .queue_declare(queue.name.as_str().into(), queue_options, arguments)
            .await?;
    }
    for (queue, exchange, key) in &plan.bindings {
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                key.as_str().into(),
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
        sdkappid: header_text(headers, HEADER_SDKAPPID),
        timestamp: properties.timestamp().and_then(|t| i64::try_from(t).ok()),
    }
}

/// Set a text header, replacing any previous value.
pub fn set_header(headers: &mut FieldTable, name: &str, value: &str) {
    headers.insert(ShortString::from(name), LongString::from(value).into());
}
