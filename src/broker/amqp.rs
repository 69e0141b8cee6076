//! The RabbitMQ edge: connection, topology, confirmed publishing, and the
//! translation between AMQP properties and the decision's [`Envelope`].
//!
//! The topology itself is data: see [`crate::broker::topology`].

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use secrecy::{ExposeSecret, SecretString};

use crate::broker::headers::{self, header_text};
use crate::broker::topology::{self, Arg, TopologySettings};
use crate::decision::decide::Envelope;

/// Where the broker is and what to declare on it: built from the settings by
/// `config::parts`.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// May contain a password: never logged.
    pub amqp_url: SecretString,
    pub topology: TopologySettings,
}

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
pub async fn connect(settings: &BrokerSettings, name: &str) -> Result<Connection, lapin::Error> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(settings.amqp_url.expose_secret(), properties).await
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
pub async fn declare_topology(
    channel: &Channel,
    settings: &TopologySettings,
) -> Result<(), lapin::Error> {
    let plan = topology::plan(settings);
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

/// The MD5 of a message body, hex: what finds a message again — the worker's
/// log lines carry it, `dlq list` prints it — even when the body is not JSON.
pub fn body_md5(body: &[u8]) -> String {
    use md5::{Digest, Md5};
    hex::encode(Md5::digest(body))
}

/// What an unreadable header reads as: never a valid signature or sdkappid.
const UNREADABLE: &str = "(unreadable header)";

/// The decision's view of a delivery's properties.
pub fn envelope_of(properties: &BasicProperties) -> Envelope {
    let table = properties.headers().as_ref();
    // A header present in a form that is not text or a number is not taken
    // as absent: under `if-present`, an unreadable signature must not pass as
    // "no signature", and an unreadable sdkappid is refused, not ignored.
    let read = |name: &str| {
        header_text(table, name).or_else(|| {
            table
                .filter(|t| t.inner().contains_key(name))
                .map(|_| UNREADABLE.to_owned())
        })
    };
    Envelope {
        sign: read(headers::TIC_SIGN),
        sdkappid: read(headers::TIC_SDKAPPID),
        timestamp: properties.timestamp().and_then(|t| i64::try_from(t).ok()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_header_is_not_an_absent_one() {
        let mut table = FieldTable::default();
        table.insert(headers::TIC_SIGN.into(), AMQPValue::Boolean(true));
        table.insert(headers::TIC_SDKAPPID.into(), AMQPValue::Double(1.4e9));
        let envelope = envelope_of(&BasicProperties::default().with_headers(table));
        assert_eq!(envelope.sign.as_deref(), Some(UNREADABLE));
        assert_eq!(envelope.sdkappid.as_deref(), Some(UNREADABLE));
        let absent = envelope_of(&BasicProperties::default());
        assert_eq!((absent.sign, absent.sdkappid), (None, None));
    }
}
