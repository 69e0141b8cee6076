//! One broker connection: its channels, the topology, one consumer per feed,
//! and the loop that hands each delivery to its handler.

use std::sync::Arc;

use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tracing::{info, warn};

use super::delivery::handle_delivery;
use super::intake::sort;
use super::supervisor::{close, drain};
use super::{Context, Shared, WorkerError};
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
        hooks: shared.hooks.clone(),
        watcher: shared.watcher.clone(),
        config: shared.config.clone(),
        policy: shared.policy.clone(),
        retry: shared.retry.clone(),
        media: shared.media.clone(),
        metrics: shared.metrics.clone(),
        publisher: publisher.clone(),
        abort: shared.abort.clone(),
        lanes: Arc::new(config.app_ids()),
        webhooks: shared.webhooks.clone(),
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

/// What a consumer's deliveries go to.
#[derive(Debug, Clone, Copy)]
pub(super) enum Feed {
    /// A queue with lanes: each delivery is moved to its app's lane.
    Sort(Lanes),
    /// Processed here, as this kind.
    Handle(Kind),
}

/// Which lanes a sorted queue feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lanes {
    /// The work queue's messages, by the app their body names.
    Lessons,
    /// The webhook events, by the app of their header.
    Webhooks,
}
