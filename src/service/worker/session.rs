//! One broker connection: its channels, the topology, one consumer per feed,
//! the loop that hands each delivery to its handler, and its ordered stop
//! (drain the handlers within the grace period, then close).

use std::sync::Arc;

use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tracing::{info, warn};

use super::delivery::handle_delivery;
use super::intake::sort;
use super::{ABORT_CLEANUP, Context, Kind, Lanes, Shared, WorkerError};
use crate::broker::amqp;
use crate::broker::topology;
use crate::config::settings::Config;
use crate::decision::watch::due_queue;

/// One connection: channels, topology, QoS and consumer, until it fails or the
/// worker stops. `Ok` only after a clean, ordered stop.
pub(super) async fn session(shared: &Shared, connected: impl FnOnce()) -> Result<(), WorkerError> {
    let config = &shared.config;
    let connection = amqp::connect(&shared.broker, "lesson-replay worker").await?;
    if let Err(e) = amqp::declare_topology(&connection, &shared.broker.topology).await {
        let _ = connection.close(200, "topology not declared".into()).await;
        return Err(e.into());
    }
    let consumer_channel = connection.create_channel().await?;
    let publisher = amqp::confirm_channel(&connection).await?;
    let consumer_tag = format!("lesson-replay-{}", std::process::id());
    // Every queue this worker consumes, each with a prefetch of its own
    // (RabbitMQ applies `basic_qos` to the consumers created after it).
    let mut consumers = Vec::new();
    let mut tags = Vec::new();
    for (n, (queue, prefetch, feed)) in consumed(config).into_iter().enumerate() {
        consumer_channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let tag = format!("{consumer_tag}-{n}");
        let consumer = consumer_channel
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        info!(%queue, prefetch, "consuming");
        tags.push(tag);
        // A consumer's end is an item too: the broker cancelled it.
        let ended = futures_util::stream::once(async move { None });
        consumers.push(
            consumer
                .map(Some)
                .chain(ended)
                .map(move |next| (feed, queue.clone(), next))
                .boxed(),
        );
    }
    let mut deliveries = futures_util::stream::select_all(consumers);
    shared.health.set_ready(true, &shared.metrics);
    connected();

    let context = Arc::new(Context {
        deps: shared.deps.clone(),
        publisher: publisher.clone(),
        abort: shared.abort.clone(),
    });
    loop {
        tokio::select! {
            () = shared.stop.cancelled() => break,
            next = deliveries.next() => match next {
                Some((Feed::Sort(lanes), _, Some(Ok(delivery)))) => {
                    shared.handlers.spawn(sort(context.clone(), delivery, lanes));
                }
                Some((Feed::Handle(kind), _, Some(Ok(delivery)))) => {
                    shared.handlers.spawn(handle_delivery(context.clone(), delivery, kind));
                }
                Some((_, _, Some(Err(e)))) => return Err(WorkerError::Broker(e)),
                Some((_, queue, None)) => return Err(WorkerError::ConsumerCancelled(queue)),
                None => return Err(WorkerError::ConsumerCancelled(config.work_queue.clone())),
            },
        }
    }

    info!("stopping: cancelling the consumer");
    shared.health.set_ready(false, &shared.metrics);
    let mut cancelled = Ok(());
    for tag in &tags {
        let done = consumer_channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await;
        cancelled = cancelled.and(done);
    }
    match cancelled {
        Ok(()) => info!("consumer cancelled: no new deliveries"),
        Err(e) => warn!(error = %e, "could not cancel the consumer"),
    }
    drain(shared).await;
    close(&connection, [&consumer_channel, &publisher]).await;
    info!("stopped");
    Ok(())
}

/// The queues a worker consumes, each with its prefetch and what its
/// deliveries are. Without apps: the work queue, processed. With apps: the
/// work queue only sorts ([`sort`]) into the lanes — one per app with a
/// table, one for every other app — and each lane is processed with a
/// prefetch of its own, so one app's backlog never holds another's lessons.
/// And the due watches, always. With a webhook URL, the webhook events the
/// same way: sorted into a lane per app when there are apps, each lane
/// sending `webhook_concurrency` at once, so an endpoint that hangs holds
/// only its own app's events.
pub(super) fn consumed(config: &Config) -> Vec<(String, u16, Feed)> {
    let topology = &config.broker_settings().topology;
    let lanes = topology::lanes(topology);
    let mut queues = Vec::new();
    if lanes.is_empty() {
        queues.push((
            config.work_queue.clone(),
            config.concurrency,
            Feed::Handle(Kind::Message { app: None }),
        ));
    } else {
        queues.push((
            config.work_queue.clone(),
            config.concurrency,
            Feed::Sort(Lanes::Lessons),
        ));
        for (app, queue) in lanes {
            let prefetch = config.resolved(app).concurrency;
            queues.push((queue, prefetch, Feed::Handle(Kind::Message { app })));
        }
    }
    queues.push((
        due_queue(&config.work_queue),
        watch_prefetch(config.concurrency),
        Feed::Handle(Kind::Watch),
    ));
    if config.webhooks_enabled() {
        let prefetch = config.webhook_concurrency;
        let lanes = topology::webhook_lanes(topology);
        if lanes.is_empty() {
            let feed = Feed::Handle(Kind::Webhook { app: None });
            queues.push((config.webhook_queue.clone(), prefetch, feed));
        } else {
            // Sorting is one publish each: the lessons' concurrency.
            let feed = Feed::Sort(Lanes::Webhooks);
            queues.push((config.webhook_queue.clone(), config.concurrency, feed));
            for (app, queue) in lanes {
                queues.push((queue, prefetch, Feed::Handle(Kind::Webhook { app })));
            }
        }
    }
    queues
}

/// Due watches handled at once: a quarter of `concurrency`, at least one.
/// Memory is bounded by `concurrency` + this, times a part.
pub fn watch_prefetch(concurrency: u16) -> u16 {
    (concurrency / 4).max(1)
}

/// What a consumer's deliveries go to.
#[derive(Debug, Clone, Copy)]
pub(super) enum Feed {
    /// A queue with lanes: each delivery is moved to its app's lane.
    Sort(Lanes),
    /// Processed here, as this kind.
    Handle(Kind),
}

/// Let in-flight handlers finish within the grace period; abort the rest.
pub(super) async fn drain(shared: &Shared) {
    shared.handlers.close();
    let grace = shared.config.shutdown_grace();
    if tokio::time::timeout(grace, shared.handlers.wait())
        .await
        .is_err()
    {
        warn!(
            grace_secs = grace.as_secs(),
            "in-flight messages did not finish in time: aborted, the broker requeues them"
        );
        shared.abort.cancel();
        let _ = tokio::time::timeout(ABORT_CLEANUP, shared.handlers.wait()).await;
    }
    shared.media.wait_for_cleanup(ABORT_CLEANUP).await;
}

pub(super) async fn close<const N: usize>(connection: &Connection, channels: [&Channel; N]) {
    for channel in channels {
        let _ = channel.close(200, "shutdown".into()).await;
    }
    let _ = connection.close(200, "shutdown".into()).await;
}
