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
//! - **leaves**: [`disposition`] carries out the [`disposition::Outcome`] —
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

mod delivery;
mod disposition;
mod due_watches;
mod intake;
mod lessons;
mod session;
mod supervisor;
mod webhooks;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lapin::Channel;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::amqp::{BrokerSettings, DeclareError};
use crate::broker::retry::RetryPolicy;
use crate::config::settings::Config;
use crate::decision::decide::InputPolicy;
use crate::decision::record::Record;
use crate::media::enrich::{Media, MediaError};
use crate::service::endpoints::Health;
use crate::service::watches::Watcher;
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

/// What the delivery handlers of one broker session share.
pub(super) struct Context {
    pub(super) hooks: Hooks,
    pub(super) watcher: Arc<Watcher>,
    pub(super) config: Arc<Config>,
    pub(super) policy: Arc<InputPolicy>,
    pub(super) retry: Arc<RetryPolicy>,
    pub(super) media: Arc<Media>,
    pub(super) metrics: Metrics,
    pub(super) publisher: Channel,
    /// Cancelled when the grace period is over: handlers stop where they are.
    pub(super) abort: CancellationToken,
    /// The apps with a lane of their own.
    pub(super) lanes: Arc<Vec<i64>>,
    /// The webhook feed; `None` when no app's events go anywhere.
    pub(super) webhooks: Option<Arc<Webhooks>>,
}

/// Everything that outlives a broker session.
pub(super) struct Shared {
    pub(super) hooks: Hooks,
    pub(super) watcher: Arc<Watcher>,
    pub(super) config: Arc<Config>,
    pub(super) broker: BrokerSettings,
    pub(super) policy: Arc<InputPolicy>,
    pub(super) retry: Arc<RetryPolicy>,
    pub(super) media: Arc<Media>,
    pub(super) metrics: Metrics,
    pub(super) health: Health,
    pub(super) handlers: TaskTracker,
    pub(super) stop: CancellationToken,
    pub(super) abort: CancellationToken,
    pub(super) webhooks: Option<Arc<Webhooks>>,
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
    let webhooks = Webhooks::from_config(&config, metrics.clone())
        .map_err(WorkerError::Webhook)?
        .map(Arc::new);
    let shared = Shared {
        webhooks,
        hooks,
        watcher: Arc::new(watcher),
        broker: config.broker_settings(),
        policy: Arc::new(config.input_policy()),
        retry: Arc::new(config.retry_policy()),
        config: Arc::new(config),
        media: Arc::new(media),
        metrics,
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
    if let Some(webhooks) = shared.webhooks.clone() {
        let until = stop.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = every.tick() => webhooks.refresh(),
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
