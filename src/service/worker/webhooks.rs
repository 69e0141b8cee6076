//! The webhook feed: events published by the worker itself (a record
//! published → `lesson.replay_ready`; a lesson parked →
//! `lesson.replay_failed`) wait in the webhook queue, are sorted into their
//! app's lane, and each is sent to its app's endpoint by one attempt
//! ([`crate::webhook::send`]). What an attempt's answer means becomes an
//! [`Outcome`] like any other delivery's: delivered → acknowledged; a
//! failure → a webhook delay tier (the broker keeps it through kills and
//! restarts), `Retry-After` honoured; `410 Gone` or the last attempt failed
//! → parked with its reason, for `dlq replay`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::types::FieldTable;
use time::OffsetDateTime;
use tracing::info;

use super::Context;
use super::{Outcome, now};
use crate::broker::amqp::{self, PublishError};
use crate::broker::headers::{self, header_text, set_header};
use crate::broker::retry::RetryPolicy;
use crate::config::settings::Config;
use crate::decision::reason::{ReasonCode, Rejection};
use crate::telemetry::metrics::{Metrics, WebhookOutcome};
use crate::webhook::event::{Event, WEBHOOK_TYPE};
use crate::webhook::send::{Destination, Sender, Verdict};

/// How long after its next attempt was due an event this worker saw fail
/// still counts as pending here: by then another worker has tried it (and
/// counts it, when it failed again).
const PENDING_SLACK: Duration = Duration::from_secs(120);

/// What the webhook feed needs, built once per worker.
pub(in crate::service) struct Webhooks {
    pub(super) sender: Sender,
    pub(super) policy: RetryPolicy,
    /// The queue events wait in (and the base of their lanes and tiers).
    pub(super) queue: String,
    pub(super) max_record_bytes: usize,
    /// Each app's endpoint, resolved once: the apps with a table, then the
    /// top level's for every other app (`None`: nowhere).
    endpoints: HashMap<i64, Option<Destination>>,
    default_endpoint: Option<Destination>,
    pending: Pending,
}

impl Webhooks {
    /// The feed of `config`; `None` when no app's events go anywhere.
    pub(super) fn from_config(config: &Config, metrics: Metrics) -> Result<Option<Self>, String> {
        if !config.webhooks_enabled() {
            return Ok(None);
        }
        Ok(Some(Webhooks {
            sender: Sender::new(Duration::from_secs(config.webhook_timeout_secs))?,
            policy: config.webhook_policy(),
            queue: config.webhook_queue.clone(),
            max_record_bytes: config.webhook_max_record_bytes,
            endpoints: config
                .app_ids()
                .into_iter()
                .map(|app| (app, config.webhook_destination(Some(app))))
                .collect(),
            default_endpoint: config.webhook_destination(None),
            pending: Pending {
                metrics,
                events: Mutex::default(),
            },
        }))
    }

    /// Where app `app`'s events go, as [`Config::webhook_destination`] says.
    fn endpoint(&self, app: Option<i64>) -> Option<&Destination> {
        match app.and_then(|app| self.endpoints.get(&app)) {
            Some(own) => own.as_ref(),
            None => self.default_endpoint.as_ref(),
        }
    }

    /// Whether app `app`'s events go anywhere.
    pub(super) fn tells(&self, app: Option<i64>) -> bool {
        self.endpoint(app).is_some()
    }

    /// An event of app `app` waits `delay` for its next attempt.
    pub(super) fn waiting(&self, delivery: &Delivery, app: Option<i64>, delay: Duration) {
        if let Some(id) = delivery.properties.message_id() {
            let created = created_at(delivery).unwrap_or_else(now);
            self.pending
                .waiting(app, id.as_str(), created, delay + PENDING_SLACK);
        }
    }

    /// The pending ages, brought up to date (expired entries forgotten).
    pub(super) fn refresh(&self) {
        self.pending.refresh(None);
    }
}

/// The events this worker saw fail and not yet delivered or parked, per
/// app: the age of the oldest is the `oldest pending` gauge. An entry is
/// forgotten once its next attempt is well past due (another worker took
/// it); across a cluster, the largest value of the gauge is the oldest.
struct Pending {
    metrics: Metrics,
    events: Mutex<PendingEvents>,
}

/// By app label, by event id: when the event was made, when to forget it.
type PendingEvents = HashMap<String, HashMap<String, (OffsetDateTime, OffsetDateTime)>>;

impl Pending {
    fn waiting(&self, app: Option<i64>, id: &str, created: OffsetDateTime, for_at_most: Duration) {
        let forget_at = now() + for_at_most;
        let label = self.metrics.app_label(app);
        self.lock()
            .entry(label.clone())
            .or_default()
            .insert(id.to_owned(), (created, forget_at));
        self.refresh(Some(&label));
    }

    fn settled(&self, app: Option<i64>, id: Option<&str>) {
        let label = self.metrics.app_label(app);
        if let Some(id) = id
            && let Some(events) = self.lock().get_mut(&label)
        {
            events.remove(id);
        }
        self.refresh(Some(&label));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PendingEvents> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Set the gauge of the app label `only` (every label: `None`).
    fn refresh(&self, only: Option<&str>) {
        let now = now();
        let mut all = self.lock();
        for (label, events) in all.iter_mut() {
            if only.is_some_and(|o| o != label) {
                continue;
            }
            events.retain(|_, (_, forget_at)| *forget_at > now);
            let oldest = events.values().map(|(created, _)| *created).min();
            let age = oldest.map_or(0.0, |c| (now - c).as_seconds_f64().max(0.0));
            self.metrics.webhook_oldest_pending(label, age);
        }
    }
}

/// When the event was made (its AMQP timestamp).
fn created_at(delivery: &Delivery) -> Option<OffsetDateTime> {
    let seconds = i64::try_from(delivery.properties.timestamp().as_ref().copied()?).ok()?;
    OffsetDateTime::from_unix_timestamp(seconds).ok()
}

/// The app an event is for, from its header (`None`: no app, or not a number).
pub(super) fn app_of_event(delivery: &Delivery) -> Option<i64> {
    header_text(delivery.properties.headers().as_ref(), headers::WEBHOOK_APP)
        .and_then(|app| app.trim().parse().ok())
}

/// Publish `event` (confirmed) to the webhook queue when its app's events
/// go somewhere; without an endpoint, nothing is published.
pub(super) async fn publish_event(context: &Context, event: Event) -> Result<(), PublishError> {
    let Some(webhooks) = &context.webhooks else {
        return Ok(());
    };
    if !webhooks.tells(event.app) {
        return Ok(());
    }
    let mut table = FieldTable::default();
    if let Some(app) = event.app {
        set_header(&mut table, headers::WEBHOOK_APP, &app.to_string());
    }
    set_header(&mut table, headers::WEBHOOK_EVENT, event.kind);
    let properties = amqp::json_properties()
        .with_message_id(event.id.as_str().into())
        .with_type(WEBHOOK_TYPE.into())
        .with_timestamp(now().unix_timestamp().max(0) as u64)
        .with_headers(table);
    amqp::publish_confirmed(
        &context.publisher,
        "",
        &webhooks.queue,
        &event.body,
        properties,
    )
    .await?;
    context.metrics.webhook_event(event.kind);
    Ok(())
}

/// One attempt to deliver the event of `delivery` to its app's endpoint.
pub(super) async fn deliver(context: &Context, delivery: &Delivery) -> Outcome {
    let webhooks = context
        .webhooks
        .as_ref()
        .expect("the webhook feed is consumed only with webhooks configured");
    let app = app_of_event(delivery);
    let span = tracing::Span::current();
    tracing::record_all!(span, sdkappid = app);
    let Some(id) = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.to_string())
    else {
        return Outcome::Park(Rejection::new(
            ReasonCode::InvalidField,
            "not a webhook event: no message_id (its webhook-id)",
        ));
    };
    let event = header_text(
        delivery.properties.headers().as_ref(),
        headers::WEBHOOK_EVENT,
    )
    .unwrap_or_default();
    let Some(destination) = webhooks.endpoint(app) else {
        // Not in this worker's settings (another worker's, during a rolling
        // change; or removed since): kept and tried again, parked after the
        // last attempt, never dropped.
        return Outcome::Retry(Rejection::new(
            ReasonCode::WebhookFailed,
            format!(
                "{event} event of app {}: no webhook endpoint in this worker's settings",
                app.map_or_else(|| "unknown".to_owned(), |a| a.to_string())
            ),
        ));
    };
    let attempt = webhooks.sender.send(destination, &id, &delivery.data).await;
    context
        .metrics
        .webhook_attempt(app, attempt.status, attempt.elapsed);
    let host = destination.url.host_str().unwrap_or_default().to_owned();
    match attempt.verdict {
        Verdict::Delivered => {
            info!(webhook_id = %id, %event, %host, status = attempt.status,
                elapsed_ms = attempt.elapsed.as_millis() as u64, "webhook delivered");
            context
                .metrics
                .webhook_delivery(app, WebhookOutcome::Delivered);
            webhooks.pending.settled(app, Some(&id));
            Outcome::Done
        }
        Verdict::Gone => Outcome::Park(Rejection::new(
            ReasonCode::WebhookGone,
            format!(
                "{host} {}: the endpoint asks never to be sent this again; fix webhook_url, then `dlq replay --reason webhook_gone`",
                attempt.explanation
            ),
        )),
        Verdict::Retry { at_least } => {
            let reason = Rejection::new(
                ReasonCode::WebhookFailed,
                format!("{host} {}", attempt.explanation),
            );
            match at_least {
                Some(wait) => Outcome::RetryNoSooner(reason, wait),
                None => Outcome::Retry(reason),
            }
        }
    }
}

/// An event parked: no longer pending here.
pub(super) fn parked(context: &Context, delivery: &Delivery) {
    if let Some(webhooks) = &context.webhooks {
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.to_string());
        webhooks
            .pending
            .settled(app_of_event(delivery), id.as_deref());
    }
}
