//! The ingress: TIC's HTTP callbacks in, AMQP messages out — the edge where
//! lessons used to get lost. A callback enters at [`callback`], is classified
//! by [`crate::decision::callback::classify`] (message, test request, not
//! JSON), and leaves as a message on `inbound_exchange`, byte for byte, with
//! the URL's `sign`, `random` and `sdkappid` as the headers the worker reads.
//!
//! TIC is answered `{"error_code":0}` **only after the broker confirmed** the
//! message (publisher confirms, `mandatory`); when the broker is down, slow
//! beyond `ingress_publish_timeout_ms`, returns or refuses the message, the
//! answer is a 503 whose `error_code` is not 0, so TIC retries (once a minute,
//! ten times). Requests in hand are bounded (`ingress_max_in_flight`); beyond
//! it the answer is an immediate 503, never a queue in memory.
//!
//! One connection and one confirm channel serve every request (confirms are
//! pipelined on it); a supervisor rebuilds them when lost, and readiness is
//! false meanwhile.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::{Channel, Connection, ConnectionStatus};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, field::Empty, info, info_span, warn};

use crate::broker::amqp::{self, BrokerSettings, DeclareError, PublishError};
use crate::broker::headers::{self};
use crate::config::settings::Config;
use crate::decision::callback::{CallbackBody, CallbackFacts, check_signature, classify};
use crate::decision::reason::ReasonCode;
use crate::decision::verify::{SignatureMode, TicKeys};
use crate::service::endpoints::Health;
use crate::telemetry::metrics::{IngressOutcome, Metrics};

/// The longest wait between two attempts to reach the broker.
const MAX_RECONNECT_WAIT: Duration = Duration::from_secs(5);
/// The longest wait for the broker to accept a connection and the topology
/// (each address of a list gets its own, shorter limit in `amqp::connect`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// A session that lived this long resets the reconnect backoff.
const STABLE_SESSION: Duration = Duration::from_secs(5);
/// With `ingress_signature` on, a callback whose own `timestamp` is further
/// than this from its time of receipt is refused as expired: the signature
/// covers only `expire_time`, so the sender's clock is not trusted further.
const MAX_CLOCK_SKEW_SECS: i64 = 600;

/// What the ingress needs of the settings.
#[derive(Debug, Clone)]
pub struct IngressSettings {
    pub path: String,
    pub signature: SignatureMode,
    pub keys: TicKeys,
    pub max_body_bytes: usize,
    pub publish_timeout: Duration,
    pub request_timeout: Duration,
    pub max_in_flight: usize,
    /// Longest wait for a request's headers, and for the next request on an
    /// idle keep-alive connection: a slow or idle client is closed then.
    pub header_timeout: Duration,
    /// Open connections at most; more wait in the listen backlog.
    pub max_connections: usize,
    /// After the shutdown signal: not ready, still serving, this long.
    pub drain: Duration,
}

impl IngressSettings {
    pub fn from_config(config: &Config) -> IngressSettings {
        IngressSettings {
            path: config.ingress_path.clone(),
            signature: config.ingress_signature,
            keys: config.keys().unwrap_or_default(),
            max_body_bytes: config.max_body_bytes,
            publish_timeout: Duration::from_millis(config.ingress_publish_timeout_ms),
            request_timeout: Duration::from_millis(config.ingress_request_timeout_ms),
            max_in_flight: config.ingress_max_in_flight,
            header_timeout: Duration::from_millis(config.ingress_header_timeout_ms),
            max_connections: config.ingress_max_connections,
            drain: Duration::from_secs(config.ingress_drain_secs),
        }
    }
}

/// What every request shares.
struct Ingress {
    settings: IngressSettings,
    exchange: String,
    /// The current broker session and its confirm channel; `None` while there is none.
    channel: watch::Receiver<Option<(ConnectionStatus, Channel)>>,
    in_flight: Semaphore,
    metrics: Metrics,
}

/// Serve callbacks on `listener` until `shutdown`, then stop accepting, let
/// the callbacks in hand finish their publishes, and close the broker session.
pub async fn run(
    config: &Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    health: Health,
    metrics: Metrics,
) -> std::io::Result<()> {
    let settings = IngressSettings::from_config(config);
    let (channel_tx, channel_rx) = watch::channel(None);
    let stop_broker = CancellationToken::new();
    let broker = tokio::spawn(keep_channel(
        config.broker_settings(),
        channel_tx,
        health.clone(),
        metrics.clone(),
        stop_broker.clone(),
    ));
    let ingress = Arc::new(Ingress {
        in_flight: Semaphore::new(settings.max_in_flight),
        exchange: config.inbound_exchange.clone(),
        channel: channel_rx,
        metrics,
        settings: settings.clone(),
    });
    let app = Router::new()
        .route(&settings.path, post(callback).fallback(method_not_allowed))
        .fallback(not_found)
        .with_state(ingress);
    info!(addr = %listener.local_addr()?, path = %settings.path, "receiving TIC callbacks");
    // The hand-over: not ready at once, still serving while the load
    // balancer takes the endpoint out, then the listener closes.
    let drain = settings.drain;
    let stop_accepting = async move {
        shutdown.await;
        health.drain();
        info!(
            drain_secs = drain.as_secs(),
            "shutting down: not ready, serving while the endpoint is taken out"
        );
        tokio::time::sleep(drain).await;
    };
    let served = serve(listener, app, &settings, stop_accepting).await;
    info!("callbacks drained: closing the broker session");
    stop_broker.cancel();
    let _ = broker.await;
    served
}

/// Serve `app` on `listener` until `stop`, then close the listener and let
/// the requests in hand finish. A client has `header_timeout` to send a
/// request's headers, and an idle keep-alive connection is closed after as
/// long (HTTP/1.1, as TIC calls); at most `max_connections` are open, the
/// others wait in the listen backlog.
async fn serve(
    listener: TcpListener,
    app: Router,
    settings: &IngressSettings,
    stop: impl Future<Output = ()>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .keep_alive(true);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(settings.max_connections.max(1)));
    tokio::pin!(stop);
    loop {
        let slot = tokio::select! {
            () = &mut stop => break,
            slot = slots.clone().acquire_owned() => slot.expect("the slots are never closed"),
        };
        let stream = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, a connection reset before
                    // accept: the listener itself is fine.
                    warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _ = connection.await;
            drop(slot);
        });
    }
    drop(listener);
    // The requests in hand finish within their own deadline; a connection
    // still sending its headers is not waited for past it.
    let last = settings.request_timeout + Duration::from_secs(2);
    if tokio::time::timeout(last, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(waited = ?last, "connections still open at shutdown: closed");
    }
    Ok(())
}

/// Keep one connection and one confirm channel open, rebuilding them with a
/// capped backoff whenever they are lost; readiness follows.
async fn keep_channel(
    broker: BrokerSettings,
    channel: watch::Sender<Option<(ConnectionStatus, Channel)>>,
    health: Health,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let backoff = || {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(MAX_RECONNECT_WAIT)
            .without_max_times()
            .with_jitter()
            .build()
    };
    let mut delays = backoff();
    while !stop.is_cancelled() {
        let opened = tokio::select! {
            () = stop.cancelled() => break,
            opened = tokio::time::timeout(CONNECT_TIMEOUT, open_session(&broker)) => opened,
        };
        let opened = opened.unwrap_or_else(|_| {
            Err(DeclareError::Broker(lapin::Error::from(
                std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer from the broker"),
            )))
        });
        match opened {
            Ok((connection, confirm)) => {
                let since = std::time::Instant::now();
                channel.send_replace(Some((connection.status().clone(), confirm.clone())));
                health.set(true);
                metrics.set_ingress_connected(true);
                info!("ingress connected to the broker");
                while !stop.is_cancelled() && confirm.status().connected() {
                    tokio::select! {
                        () = stop.cancelled() => {},
                        () = tokio::time::sleep(Duration::from_millis(250)) => {},
                    }
                }
                channel.send_replace(None);
                health.set(false);
                metrics.set_ingress_connected(false);
                let _ = confirm.close(200, "ingress stopping".into()).await;
                let _ = connection.close(200, "ingress stopping".into()).await;
                if !stop.is_cancelled() {
                    warn!("ingress lost its broker session: reconnecting");
                }
                if since.elapsed() >= STABLE_SESSION {
                    delays = backoff();
                } else {
                    // A session that dies at once: wait before the next.
                    let wait = delays.next().unwrap_or(MAX_RECONNECT_WAIT);
                    tokio::select! {
                        () = stop.cancelled() => {},
                        () = tokio::time::sleep(wait) => {},
                    }
                }
            }
            Err(e) if e.is_permanent() => {
                // Only an operator can fix it: said once, shown in /readyz,
                // looked at again now and then.
                let why = e.to_string();
                if health.block_reason(&why) {
                    error!(error = %why, "not ready: the broker refuses the topology; an operator must act (docs/operations.md)");
                }
                tokio::select! {
                    () = stop.cancelled() => {},
                    () = tokio::time::sleep(broker.refused_recheck) => {},
                }
            }
            Err(e) => {
                let wait = delays.next().unwrap_or(MAX_RECONNECT_WAIT);
                warn!(error = %e, ?wait, "ingress cannot reach the broker");
                tokio::select! {
                    () = stop.cancelled() => {},
                    () = tokio::time::sleep(wait) => {},
                }
            }
        }
    }
}

async fn open_session(broker: &BrokerSettings) -> Result<(Connection, Channel), DeclareError> {
    let connection = amqp::connect(broker, "lesson-replay ingress").await?;
    // The topology makes the work queue exist before the first callback, so a
    // `mandatory` publish is routed, not returned.
    amqp::declare_topology(&connection, &broker.topology).await?;
    let channel = amqp::confirm_channel(&connection).await?;
    Ok((connection, channel))
}

/// An answer TIC reads: `{"error_code":0}` only for success.
fn answer(status: StatusCode, error_code: i64, message: &str) -> Response {
    let body = if error_code == 0 {
        json!({"error_code": 0})
    } else {
        json!({"error_code": error_code, "error_msg": message})
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn not_found() -> Response {
    answer(StatusCode::NOT_FOUND, 404, "no such path")
}

async fn method_not_allowed() -> Response {
    answer(StatusCode::METHOD_NOT_ALLOWED, 405, "callbacks are POSTed")
}

/// One callback, from its first byte to TIC's answer.
async fn callback(
    State(ingress): State<Arc<Ingress>>,
    Query(params): Query<HashMap<String, String>>,
    request: Request,
) -> Response {
    let span = info_span!(
        "callback",
        random = params.get("random").map(String::as_str),
        task_id = Empty,
        callback_type = Empty
    );
    let received = time::OffsetDateTime::now_utc().unix_timestamp().max(0) as u64;
    let metrics = ingress.metrics.clone();
    let Ok(_permit) = ingress.in_flight.try_acquire() else {
        metrics.ingress_answered(IngressOutcome::Busy);
        return answer(
            StatusCode::SERVICE_UNAVAILABLE,
            503,
            "too many callbacks at once",
        );
    };
    let _in_flight = metrics.ingress_in_flight_guard();
    let limit = ingress.settings.request_timeout;
    let handled = tokio::time::timeout(
        limit,
        handle(&ingress, &params, request.into_body(), received),
    );
    let (outcome, response) = match handled.instrument(span).await {
        Ok(done) => done,
        Err(_) => (
            IngressOutcome::Timeout,
            answer(
                StatusCode::REQUEST_TIMEOUT,
                408,
                "the callback took too long",
            ),
        ),
    };
    metrics.ingress_answered(outcome);
    response
}

async fn handle(
    ingress: &Ingress,
    params: &HashMap<String, String>,
    body: Body,
    received: u64,
) -> (IngressOutcome, Response) {
    let max = ingress.settings.max_body_bytes;
    let Ok(body) = axum::body::to_bytes(body, max).await else {
        warn!(
            max_body_bytes = max,
            "callback refused: body too large (or cut short)"
        );
        return (
            IngressOutcome::TooLarge,
            answer(
                StatusCode::PAYLOAD_TOO_LARGE,
                413,
                "body larger than max_body_bytes",
            ),
        );
    };
    let facts = match classify(&body) {
        CallbackBody::Test => {
            info!(bytes = body.len(), preview = %preview(&body), "TIC test request answered");
            return (IngressOutcome::TestRequest, answer(StatusCode::OK, 0, ""));
        }
        CallbackBody::NotJson(why) => {
            warn!(%why, preview = %preview(&body), "callback refused: not JSON (TIC will retry it)");
            return (
                IngressOutcome::NotJson,
                answer(StatusCode::BAD_REQUEST, 400, "the body is not JSON"),
            );
        }
        CallbackBody::Message(facts) => facts,
    };
    let span = tracing::Span::current();
    if let Some(task) = &facts.task_id {
        span.record("task_id", task.as_str());
    }
    if let Some(kind) = &facts.callback_type {
        span.record("callback_type", kind.as_str());
    }
    if let Some(refused) = refuse_signature(ingress, params, &facts) {
        return (IngressOutcome::Unauthorized, refused);
    }
    match publish(ingress, params, &facts, &body, received).await {
        Ok(()) => {
            info!(routing_key = %facts.routing_key(), "callback published");
            (IngressOutcome::Accepted, answer(StatusCode::OK, 0, ""))
        }
        Err(why) => {
            warn!(%why, "callback not confirmed by the broker: answered 503, TIC retries");
            (
                IngressOutcome::BrokerUnavailable,
                answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    503,
                    "not stored yet: please retry",
                ),
            )
        }
    }
}

/// With `ingress_signature` on, the 401 of a bad signature (TIC's codes:
/// 20001 expired, 20002 missing or invalid).
fn refuse_signature(
    ingress: &Ingress,
    params: &HashMap<String, String>,
    facts: &CallbackFacts,
) -> Option<Response> {
    let sign = params.get("sign").map(String::as_str);
    match (ingress.settings.signature, sign) {
        (SignatureMode::Off, _) | (SignatureMode::IfPresent, None) => return None,
        _ => {}
    }
    let sdkappid = params.get("sdkappid").and_then(|a| a.trim().parse().ok());
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if let Some(sent) = facts.sent_at
        && (sent - now).abs() > MAX_CLOCK_SKEW_SECS
    {
        warn!(
            sent,
            now, "callback refused: its timestamp is too far from now"
        );
        return Some(answer(StatusCode::UNAUTHORIZED, 20001, "signature_expired"));
    }
    let refused = check_signature(facts, sign, sdkappid, &ingress.settings.keys, now).err()?;
    warn!(reason = %refused.code, "callback refused: {}", refused.message);
    let code = match refused.code {
        ReasonCode::SignatureExpired => 20001,
        _ => 20002,
    };
    Some(answer(
        StatusCode::UNAUTHORIZED,
        code,
        refused.code.as_str(),
    ))
}

/// Publish the body as it came, confirmed, within the deadline.
async fn publish(
    ingress: &Ingress,
    params: &HashMap<String, String>,
    facts: &CallbackFacts,
    body: &[u8],
    received: u64,
) -> Result<(), String> {
    let Some((connection, channel)) = ingress.channel.borrow().clone() else {
        return Err("not connected to the broker".into());
    };
    if connection.blocked() {
        // A blocked broker (memory or disk alarm) holds publishes: refuse at
        // once rather than pile bodies up in memory.
        return Err("the broker is blocked (resource alarm)".into());
    }
    let properties = amqp::json_properties()
        .with_headers(headers::callback_headers(
            params.get("sign").map(String::as_str),
            params.get("random").map(String::as_str),
            params.get("sdkappid").map(String::as_str),
        ))
        .with_timestamp(received);
    let timer = ingress.metrics.ingress_confirm_timer();
    let confirmed = tokio::time::timeout(
        ingress.settings.publish_timeout,
        amqp::publish_confirmed(
            &channel,
            &ingress.exchange,
            &facts.routing_key(),
            body,
            properties,
        ),
    )
    .await;
    timer.observe_duration();
    match confirmed {
        Ok(Ok(())) => Ok(()),
        Ok(Err(PublishError::Amqp(e))) => Err(format!("broker: {e}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "no confirm within {} ms",
            ingress.settings.publish_timeout.as_millis()
        )),
    }
}

/// The start of a body, printable, for the logs.
fn preview(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(200)])
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}
