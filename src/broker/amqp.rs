//! The RabbitMQ edge: connection, topology, confirmed publishing, and the
//! translation between AMQP properties and the decision's [`Envelope`].
//!
//! The topology itself is data: see [`crate::broker::topology`].

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind,
    ExchangeKind,
};
use secrecy::{ExposeSecret, SecretString};

use crate::broker::headers::{self, header_text};
use crate::broker::topology::{self, Arg, TopologySettings};
use crate::decision::decide::Envelope;

/// Where the broker is and what to declare on it: built from the settings by
/// `config::parts`.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// One AMQP URL, or several separated by commas (the nodes of a cluster).
    /// May contain a password: never logged.
    pub amqp_url: SecretString,
    pub topology: TopologySettings,
    /// How often a service blocked by a refused topology quietly tries again
    /// (an operator's fix then needs no restart).
    pub refused_recheck: Duration,
    /// The address the next connection tries first: random per process, so
    /// a fleet spreads over the nodes; after a connection, the one after it,
    /// so a lost node is not the first one tried again.
    next_address: Arc<AtomicUsize>,
}

impl BrokerSettings {
    pub fn new(amqp_url: SecretString, topology: TopologySettings) -> BrokerSettings {
        let start = RandomState::new().hash_one(std::process::id()) as usize;
        BrokerSettings {
            amqp_url,
            topology,
            refused_recheck: Duration::from_secs(60),
            next_address: Arc::new(AtomicUsize::new(start)),
        }
    }
}

/// The broker addresses in `amqp_url`: one AMQP URL, or several separated by
/// commas (a comma inside a password is written `%2C`).
pub fn addresses(amqp_url: &str) -> Vec<&str> {
    amqp_url
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect()
}

/// `host:port` of an AMQP URL, for logs: never its credentials.
pub fn node_of(url: &str) -> String {
    match url.parse::<lapin::uri::AMQPUri>() {
        Ok(uri) => format!("{}:{}", uri.authority.host, uri.authority.port),
        Err(_) => "(unparsable address)".to_owned(),
    }
}

/// How long one broker address gets to accept a connection before the next
/// is tried: a node that is down but not refusing (a lost host) is skipped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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

/// Connect to the first broker address that answers, trying them all in the
/// rotating order of [`BrokerSettings`], and name the connection so operators
/// can find it in the management UI. The error is the last address's.
pub async fn connect(settings: &BrokerSettings, name: &str) -> Result<Connection, lapin::Error> {
    let urls = addresses(settings.amqp_url.expose_secret());
    let start = settings.next_address.load(Ordering::Relaxed);
    let mut last = None;
    for step in 0..urls.len() {
        let index = start.wrapping_add(step) % urls.len();
        let url = urls[index];
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let attempt = tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, properties));
        let error = match attempt.await {
            Ok(Ok(connection)) => {
                settings
                    .next_address
                    .store(index.wrapping_add(1), Ordering::Relaxed);
                tracing::info!(node = %node_of(url), connection = name, "connected to the broker");
                return Ok(connection);
            }
            Ok(Err(e)) => e,
            Err(_) => std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer in {}s", CONNECT_TIMEOUT.as_secs()),
            )
            .into(),
        };
        if urls.len() > 1 {
            tracing::warn!(node = %node_of(url), error = %error, "broker node unreachable: trying the next");
        }
        last = Some(error);
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "amqp_url has no address").into()
    }))
}

/// A channel in publisher-confirm mode.
pub async fn confirm_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Why the topology could not be declared.
#[derive(Debug, thiserror::Error)]
pub enum DeclareError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    /// The broker refuses a declaration (an existing queue with other
    /// arguments, a missing permission): trying again changes nothing until
    /// an operator acts.
    #[error("the broker refuses to declare {what}: {why}")]
    Refused { what: String, why: String },
}

impl DeclareError {
    /// Whether only an operator can fix it.
    pub fn is_permanent(&self) -> bool {
        matches!(self, DeclareError::Refused { .. })
    }
}

/// A channel-level refusal of a declaration: 406 (precondition failed: other
/// arguments than the existing entity's, an argument the broker does not
/// accept) or 403 (access refused). Its text, when it is one.
fn refusal(error: &lapin::Error) -> Option<String> {
    let ErrorKind::ProtocolError(amqp) = error.kind() else {
        return None;
    };
    matches!(
        amqp.kind(),
        AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED | AMQPSoftError::ACCESSREFUSED)
    )
    .then(|| amqp.get_message().to_string())
}

/// Declare every exchange, queue and binding of [`topology::plan`], on a
/// channel of its own (a refusal closes the channel). Idempotent.
pub async fn declare_topology(
    connection: &Connection,
    settings: &TopologySettings,
) -> Result<(), DeclareError> {
    let plan = topology::plan(settings);
    let channel = connection.create_channel().await?;
    let exchange_options = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    for exchange in &plan.exchanges {
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                exchange_options,
                FieldTable::default(),
            )
            .await
            .map_err(|e| refused(e, format!("exchange {exchange:?}")))?;
    }
    for queue in &plan.queues {
        declare_queue(&channel, &queue.name, &queue.arguments)
            .await
            .map_err(|e| refused(e, format!("queue {:?}", queue.name)))?;
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
            .await
            .map_err(|e| refused(e, format!("the binding of {queue:?} to {exchange:?}")))?;
    }
    let _ = channel.close(200, "topology declared".into()).await;
    Ok(())
}

fn refused(error: lapin::Error, what: String) -> DeclareError {
    match refusal(&error) {
        Some(why) => DeclareError::Refused { what, why },
        None => DeclareError::Broker(error),
    }
}

async fn declare_queue(
    channel: &Channel,
    name: &str,
    arguments: &[(&'static str, Arg)],
) -> Result<(), lapin::Error> {
    let mut table = FieldTable::default();
    for (arg, value) in arguments {
        let value = match value {
            Arg::Text(t) => LongString::from(t.as_str()).into(),
            Arg::Int(i) => AMQPValue::LongLongInt(*i),
        };
        table.insert((*arg).into(), value);
    }
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(name.into(), options, table)
        .await
        .map(|_| ())
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
    fn a_list_of_addresses_is_split_on_commas() {
        assert_eq!(
            addresses(" amqp://u:p%2Cq@a:5672/%2f, amqp://u:p@b:5673/%2f ,,"),
            ["amqp://u:p%2Cq@a:5672/%2f", "amqp://u:p@b:5673/%2f"]
        );
        assert_eq!(node_of("amqp://u:secret@b:5673/%2f"), "b:5673");
        assert!(!node_of("amqp://u:secret@b:x/").contains("secret"));
    }

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
        // A byte array is read as text only when it is UTF-8.
        let mut table = FieldTable::default();
        table.insert(
            headers::TIC_SIGN.into(),
            AMQPValue::ByteArray(b"\xff\xfe".to_vec().into()),
        );
        let envelope = envelope_of(&BasicProperties::default().with_headers(table));
        assert_eq!(envelope.sign.as_deref(), Some(UNREADABLE));
    }

    #[test]
    fn byte_array_headers_holding_text_are_that_text() {
        let mut table = FieldTable::default();
        table.insert(
            headers::TIC_SIGN.into(),
            AMQPValue::ByteArray(b"0123abcd".to_vec().into()),
        );
        table.insert(
            headers::TIC_SDKAPPID.into(),
            AMQPValue::ByteArray(b"1400000001".to_vec().into()),
        );
        let envelope = envelope_of(&BasicProperties::default().with_headers(table));
        assert_eq!(envelope.sign.as_deref(), Some("0123abcd"));
        assert_eq!(envelope.sdkappid.as_deref(), Some("1400000001"));
    }
}
