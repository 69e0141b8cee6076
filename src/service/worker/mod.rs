//! The worker: where a message enters, is decided and leaves.
//!
//! - **enters**: [`session`] consumes one queue per feed ([`session::consumed`]):
//!   the work queue (sorted into the apps' lanes by [`intake`] when there are
//!   apps), each lane, the due watches, and — with a webhook URL — the
//!   webhook events and their lanes;
//! - **is decided**: [`delivery`] runs each delivery's handler under a panic
//!   guard: a lesson ([`lessons`]: [`crate::decision::decide::decide`], then
//!   [`crate::media::enrich`]), a due watch ([`due_watches`]), a webhook event
//!   ([`webhooks`]);
//! - **leaves**: [`disposition`] carries out the [`Outcome`] —
//!   the record to the records exchange, a retry to a delay tier, or the
//!   parking queue — and only then acknowledges.
//!
//! The input is acknowledged only after its outcome is confirmed by the
//! broker, so a crash at any point redelivers it: at-least-once, with records
//! that downstream deduplicates by `message_id` (= replay_id), and webhook
//! events that receivers deduplicate by `webhook-id`.
//!
//! A supervisor loop ([`supervisor`]) owns the broker session: when the
//! connection, a channel or the consumer is lost, it rebuilds all of them with
//! backoff and resumes, without a process restart. Deliveries of a lost
//! session are never acked on the new one: their acks fail with the old
//! channel and the broker redelivers.
//!
//! Below, the words every file of the worker uses: [`Outcome`], [`Kind`],
//! [`Lanes`]; [`handling`] keeps what the delivery being handled is about.

mod delivery;
mod disposition;
mod due_watches;
mod handling;
mod intake;
mod lessons;
mod session;
mod supervisor;
mod webhooks;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lapin::Channel;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::amqp::{BrokerSettings, DeclareError};
use crate::broker::retry::RetryPolicy;
use crate::config::settings::Config;
use crate::decision::decide::InputPolicy;
use crate::decision::reason::Rejection;
use crate::decision::record::Record;
use crate::decision::watch::Watch;
use crate::media::enrich::{Media, MediaError};
use crate::service::endpoints::Health;
use crate::service::watches::{WatchCheck, Watcher};
use crate::telemetry::metrics::Metrics;
use crate::tic::client::TicError;

pub use lessons::record_routing_key;
pub use session::watch_prefetch;
use supervisor::supervise;
use webhooks::Webhooks;

/// After the grace period, how long aborted handlers get to clean up
/// (abort multipart uploads) before the channels close.
pub(super) const ABORT_CLEANUP: Duration = Duration::from_secs(5);

/// The longest wait between two attempts to reach the broker (every address
/// of `amqp_url` is tried at each): readiness returns within about this long
/// of any node being usable again.
pub(super) const MAX_RECONNECT_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error(transparent)]
    Topology(#[from] DeclareError),
    #[error("the broker cancelled the consumer of {0}")]
    ConsumerCancelled(String),
    #[error(transparent)]
    Media(#[from] MediaError),
    #[error("TIC client: {0}")]
    Tic(#[from] TicError),
    #[error("{0}")]
    Webhook(String),
}

/// Code a test runs with each record before it is published.
pub type RecordHook = Arc<dyn Fn(&Record) + Send + Sync>;

/// Seams for tests: code run at fixed points of processing. Production
/// passes none; a test may, for instance, panic on purpose.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Called with every record just before it is published.
    pub before_publish: Option<RecordHook>,
}

/// What every delivery's handler needs, built once for the worker's life.
pub(super) struct Deps {
    pub(super) hooks: Hooks,
    pub(super) watcher: Watcher,
    pub(super) config: Arc<Config>,
    pub(super) policy: InputPolicy,
    pub(super) retry: RetryPolicy,
    pub(super) media: Arc<Media>,
    pub(super) metrics: Metrics,
    /// The apps with a lane of their own.
    pub(super) lanes: Vec<i64>,
    /// The webhook feed; `None` when no app's events go anywhere.
    pub(super) webhooks: Option<Webhooks>,
}

/// What the delivery handlers of one broker session share: the worker's
/// [`Deps`] and the session's confirm channel.
pub(super) struct Context {
    pub(super) deps: Arc<Deps>,
    pub(super) publisher: Channel,
    /// Cancelled when the grace period is over: handlers stop where they are.
    pub(super) abort: CancellationToken,
}

/// Everything that outlives a broker session.
pub(super) struct Shared {
    pub(super) deps: Arc<Deps>,
    pub(super) broker: BrokerSettings,
    pub(super) health: Health,
    pub(super) handlers: TaskTracker,
    pub(super) stop: CancellationToken,
    pub(super) abort: CancellationToken,
}

impl std::ops::Deref for Context {
    type Target = Deps;
    fn deref(&self) -> &Deps {
        &self.deps
    }
}

impl std::ops::Deref for Shared {
    type Target = Deps;
    fn deref(&self) -> &Deps {
        &self.deps
    }
}

/// Run the worker until `shutdown` completes, then stop in order: cancel the
/// consumer, let in-flight messages finish within the grace period (abort the
/// rest, aborting their uploads), close the channels and the connection.
/// Unfinished messages are requeued by the broker.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
    health: Health,
    metrics: Metrics,
    hooks: Hooks,
) -> Result<(), WorkerError> {
    let media = Media::new(config.media_settings(), metrics.clone()).await?;
    let watcher = Watcher::from_config(&config, metrics.clone())?;
    metrics.set_concurrency(config.concurrency);
    metrics.expect_tiers(&config.retry_policy().tiers);
    metrics.expect_apps(&config.app_ids());
    let webhooks = Webhooks::from_config(&config, metrics.clone()).map_err(WorkerError::Webhook)?;
    let deps = Deps {
        webhooks,
        hooks,
        watcher,
        policy: config.input_policy(),
        retry: config.retry_policy(),
        lanes: config.app_ids(),
        media: Arc::new(media),
        config: Arc::new(config),
        metrics,
    };
    let shared = Shared {
        broker: deps.config.broker_settings(),
        deps: Arc::new(deps),
        health,
        handlers: TaskTracker::new(),
        stop: CancellationToken::new(),
        abort: CancellationToken::new(),
    };
    let (stop, health) = (shared.stop.clone(), shared.health.clone());
    // What killed workers left in the upload journals, swept on a timer.
    let (sweeping, until) = (shared.media.clone(), stop.clone());
    tokio::spawn(async move { sweeping.sweep_journals(until).await });
    // The oldest pending event's age grows between attempts: kept current.
    if shared.webhooks.is_some() {
        let (deps, until) = (shared.deps.clone(), stop.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = every.tick() => deps.webhooks.iter().for_each(Webhooks::refresh),
                    () = until.cancelled() => return,
                }
            }
        });
    }
    let supervisor = supervise(&shared);
    tokio::pin!(supervisor);
    tokio::select! {
        () = shutdown => {
            // Not ready from the first signal on, while in-flight work finishes.
            health.drain();
            stop.cancel();
        }
        result = &mut supervisor => return result,
    }
    supervisor.await
}

/// What to do with a delivery once its processing is over.
pub(super) enum Outcome {
    /// Its record is published (or it was skipped): acknowledge.
    Done,
    /// Permanent failure: copy it to the parking queue, then acknowledge.
    Park(Rejection),
    /// Transient failure: retry it later through a delay tier.
    Retry(Rejection),
    /// Transient failure, and the other side asked for at least this long
    /// (`Retry-After`): the first delay tier that is as long, else the longest.
    RetryNoSooner(Rejection, Duration),
    /// Watch this task: publish the watch to the delay queue of this delay,
    /// then acknowledge.
    Watch(Watch, Duration),
}

/// Which queue a delivery came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// A TIC message to process: from the work queue (no apps configured) or
    /// from the lane of `app` (`None`: the lane of every other app).
    Message { app: Option<i64> },
    /// A due watch.
    Watch,
    /// A webhook event to send: from the webhook queue (no apps) or from
    /// the webhook lane of `app` (`None`: of every other app).
    Webhook { app: Option<i64> },
}

/// Which lanes a sorted queue feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lanes {
    /// The work queue's messages, by the app their body names.
    Lessons,
    /// The webhook events, by the app of their header.
    Webhooks,
}

/// The time now, UTC.
pub(super) fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

pub(super) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// The outcome of a watch that is not checked now: watched later, or parked.
pub(super) fn rescheduled(check: WatchCheck) -> Outcome {
    match check {
        WatchCheck::Again(watch, delay) => Outcome::Watch(watch, delay),
        WatchCheck::Park(reason) => Outcome::Park(reason),
        WatchCheck::Finished(_) => unreachable!("only a query finds a task finished"),
    }
}
