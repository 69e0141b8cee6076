//! The broker topology as data: every exchange, queue (with its arguments)
//! and binding the worker needs. [`crate::broker::amqp::declare_topology`] declares
//! it; [`definitions`] prints it in RabbitMQ's definitions format for operators
//! who pre-provision (`deploy/rabbitmq/definitions.json` is generated from it,
//! and a test keeps the two equal).
//!
//! ```text
//! tic.recordings (topic) --#--> lesson-replay.recordings (quorum, delivery limit)
//!                                  ^          | dead-letter (delivery limit reached)
//!        TTL expired: dead-letter  |          v
//!  lesson-replay.recordings.retry.<N>s    lesson-replay.parking (quorum, limit out of reach)
//!  (quorum, one per delay tier)
//!         | with [apps.<sdkappid>] tables: sorted by app into lanes
//!         v
//!  lesson-replay.recordings.app.<sdkappid> | .app.other (quorum, like the work queue)
//! lesson-replay.records (topic) --#--> lesson-replay.records (quorum)
//! lesson-replay.recordings.watch.<N>s --TTL--> lesson-replay.recordings.watch
//!  (quorum, one per watch delay)                (quorum: due watches, consumed)
//!
//! with a webhook URL (events published by the worker itself):
//! lesson-replay.webhooks (quorum) --sorted by app--> lesson-replay.webhooks.app.<sdkappid> | .app.other
//!        ^  TTL expired: dead-letter
//!  lesson-replay.webhooks.retry.<N>s (quorum, one per webhook delay)
//! ```
//!
//! Every queue is a quorum queue, replicated over the cluster: no queue lives
//! on one node. Operators list the parking queue by reading and requeueing,
//! which must never count towards a delivery limit and drop a parked message
//! (RabbitMQ 4 gives every quorum queue a default limit of 20). Its limit is
//! therefore the largest one: not -1, which RabbitMQ 4 reads as "no limit"
//! but 3.x reads as "drop at the first return" (measured on 3.10). One
//! declaration, the same on 3.10 and 4.x, with no version to detect.

use std::time::Duration;

use serde_json::{Value, json};

use crate::broker::retry::tier_queue;
use crate::decision::watch::{delay_queue, due_queue};

/// The names and limits the topology is built from.
#[derive(Debug, Clone)]
pub struct TopologySettings {
    pub inbound_exchange: String,
    pub work_queue: String,
    pub parking_queue: String,
    pub records_exchange: String,
    pub records_queue: String,
    /// Deliveries of one message before the broker dead-letters it to the parking queue.
    pub delivery_limit: u32,
    /// The delay of each retry tier; one queue per tier.
    pub retry_tiers: Vec<Duration>,
    /// Every delay a watch can wait; one queue per delay.
    pub watch_delays: Vec<Duration>,
    /// The apps with a lane of their own ([`app_queue`]). Empty: no lanes,
    /// the work queue is consumed as it is.
    pub apps: Vec<i64>,
    /// The webhook events' queues; `None` (no webhook URL anywhere): none.
    pub webhooks: Option<WebhookQueues>,
}

/// The queues of the webhook events.
#[derive(Debug, Clone)]
pub struct WebhookQueues {
    /// Events waiting to be sent (sorted into lanes when there are apps).
    pub queue: String,
    /// The delay of each retry tier; one queue each, back to `queue`.
    pub retry_tiers: Vec<Duration>,
}

/// The lane of app `app` (`None`: every app without one): a work queue of
/// its own, `lesson-replay.recordings.app.1400000001`, or
/// `lesson-replay.recordings.app.other`.
pub fn app_queue(work_queue: &str, app: Option<i64>) -> String {
    match app {
        Some(app) => format!("{work_queue}.app.{app}"),
        None => format!("{work_queue}.app.other"),
    }
}

/// Every lane of `config`, in declaration order (none without apps).
pub fn lanes(config: &TopologySettings) -> Vec<(Option<i64>, String)> {
    lanes_of(&config.work_queue, &config.apps)
}

/// Every lane of the webhook events (none without apps or webhooks).
pub fn webhook_lanes(config: &TopologySettings) -> Vec<(Option<i64>, String)> {
    match &config.webhooks {
        Some(webhooks) => lanes_of(&webhooks.queue, &config.apps),
        None => Vec::new(),
    }
}

fn lanes_of(base: &str, apps: &[i64]) -> Vec<(Option<i64>, String)> {
    if apps.is_empty() {
        return Vec::new();
    }
    apps.iter()
        .map(|app| Some(*app))
        .chain([None])
        .map(|app| (app, app_queue(base, app)))
        .collect()
}

/// A queue argument's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    Text(String),
    Int(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    pub name: String,
    pub arguments: Vec<(&'static str, Arg)>,
}

/// The queue argument of a quorum queue's delivery limit.
pub const DELIVERY_LIMIT: &str = "x-delivery-limit";

/// The parking queue's delivery limit: no listing ever reaches it.
pub const PARKING_DELIVERY_LIMIT: i64 = i32::MAX as i64;

impl QueueSpec {
    /// Whether the queue's delivery limit is out of reach.
    pub fn unlimited_delivery(&self) -> bool {
        self.arguments
            .contains(&(DELIVERY_LIMIT, Arg::Int(PARKING_DELIVERY_LIMIT)))
    }
}

/// Everything to declare, in order: exchanges, queues, bindings (queue, exchange, key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub exchanges: Vec<String>,
    pub queues: Vec<QueueSpec>,
    pub bindings: Vec<(String, String, String)>,
}

fn text(value: &str) -> Arg {
    Arg::Text(value.to_owned())
}

/// Dead-letter to `target` through the default exchange, at least once
/// (quorum queues, RabbitMQ 3.10+; it needs reject-publish overflow).
fn dead_letter_to(target: &str) -> [(&'static str, Arg); 4] {
    [
        ("x-dead-letter-exchange", text("")),
        ("x-dead-letter-routing-key", text(target)),
        ("x-dead-letter-strategy", text("at-least-once")),
        ("x-overflow", text("reject-publish")),
    ]
}

impl Topology {
    /// Every queue name, in declaration order.
    pub fn queue_names(&self) -> impl Iterator<Item = &str> {
        self.queues.iter().map(|q| q.name.as_str())
    }
}

/// A queue the workers consume: quorum, the delivery limit, and parked
/// when the limit is reached (a message that crashes every worker).
fn consumed(name: String, config: &TopologySettings) -> QueueSpec {
    let mut arguments = vec![
        ("x-queue-type", text("quorum")),
        (DELIVERY_LIMIT, Arg::Int(config.delivery_limit.into())),
    ];
    arguments.extend(dead_letter_to(&config.parking_queue));
    QueueSpec { name, arguments }
}

/// A delay queue: its messages wait `delay`, then dead-letter to `back_to`.
fn waiting(name: String, delay: Duration, back_to: &str) -> QueueSpec {
    let mut arguments = vec![
        ("x-queue-type", text("quorum")),
        (
            "x-message-ttl",
            Arg::Int(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
        ),
    ];
    arguments.extend(dead_letter_to(back_to));
    QueueSpec { name, arguments }
}

/// The topology `config` asks for.
pub fn plan(config: &TopologySettings) -> Topology {
    let mut queues = vec![QueueSpec {
        name: config.parking_queue.clone(),
        arguments: vec![
            ("x-queue-type", text("quorum")),
            (DELIVERY_LIMIT, Arg::Int(PARKING_DELIVERY_LIMIT)),
        ],
    }];
    // Lanes: like the work queue, which sorts into them.
    for (_, lane) in lanes(config) {
        queues.push(consumed(lane, config));
    }
    queues.push(consumed(config.work_queue.clone(), config));
    for &delay in &config.retry_tiers {
        let name = tier_queue(&config.work_queue, delay);
        queues.push(waiting(name, delay, &config.work_queue));
    }
    // Watches: delay queues dead-letter into the due queue the workers consume.
    let due = due_queue(&config.work_queue);
    queues.push(consumed(due.clone(), config));
    for &delay in &config.watch_delays {
        queues.push(waiting(delay_queue(&config.work_queue, delay), delay, &due));
    }
    // Webhook events: like the work queue (lanes, delay tiers back to it).
    if let Some(webhooks) = &config.webhooks {
        for (_, lane) in webhook_lanes(config) {
            queues.push(consumed(lane, config));
        }
        queues.push(consumed(webhooks.queue.clone(), config));
        for &delay in &webhooks.retry_tiers {
            let name = tier_queue(&webhooks.queue, delay);
            queues.push(waiting(name, delay, &webhooks.queue));
        }
    }
    // Read by consumers outside the worker: no delivery limit may drop a
    // record they put back (RabbitMQ 4 gives quorum queues one of 20).
    queues.push(QueueSpec {
        name: config.records_queue.clone(),
        arguments: vec![
            ("x-queue-type", text("quorum")),
            (DELIVERY_LIMIT, Arg::Int(PARKING_DELIVERY_LIMIT)),
        ],
    });
    Topology {
        exchanges: vec![
            config.inbound_exchange.clone(),
            config.records_exchange.clone(),
        ],
        queues,
        bindings: vec![
            (
                config.work_queue.clone(),
                config.inbound_exchange.clone(),
                "#".into(),
            ),
            (
                config.records_queue.clone(),
                config.records_exchange.clone(),
                "#".into(),
            ),
        ],
    }
}

/// The topology in RabbitMQ's definitions format (vhost `/`), for
/// `rabbitmqctl import_definitions` or `load_definitions`.
pub fn definitions(topology: &Topology) -> Value {
    let vhost = "/";
    let queues: Vec<Value> = topology
        .queues
        .iter()
        .map(|q| {
            let arguments: serde_json::Map<String, Value> = q
                .arguments
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        Arg::Text(t) => json!(t),
                        Arg::Int(i) => json!(i),
                    };
                    ((*k).to_owned(), v)
                })
                .collect();
            json!({"name": q.name, "vhost": vhost, "durable": true, "auto_delete": false, "arguments": arguments})
        })
        .collect();
    let exchanges: Vec<Value> = topology
        .exchanges
        .iter()
        .map(|name| {
            json!({"name": name, "vhost": vhost, "type": "topic", "durable": true,
                   "auto_delete": false, "internal": false, "arguments": {}})
        })
        .collect();
    let bindings: Vec<Value> = topology
        .bindings
        .iter()
        .map(|(queue, exchange, key)| {
            json!({"source": exchange, "vhost": vhost, "destination": queue,
                   "destination_type": "queue", "routing_key": key, "arguments": {}})
        })
        .collect();
    json!({"vhosts": [{"name": vhost}], "exchanges": exchanges, "queues": queues, "bindings": bindings})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_tiers_dead_letter_back_to_the_work_queue() {
        let settings = TopologySettings {
            inbound_exchange: "tic.recordings".into(),
            work_queue: "lesson-replay.recordings".into(),
            parking_queue: "lesson-replay.parking".into(),
            records_exchange: "lesson-replay.records".into(),
            records_queue: "lesson-replay.records".into(),
            delivery_limit: 20,
            retry_tiers: [10, 60, 300, 1800, 7200].map(Duration::from_secs).to_vec(),
            watch_delays: [60, 3600].map(Duration::from_secs).to_vec(),
            apps: Vec::new(),
            webhooks: None,
        };
        let topology = plan(&settings);
        let tier = topology
            .queues
            .iter()
            .find(|q| q.name == "lesson-replay.recordings.retry.60s")
            .unwrap();
        assert!(
            tier.arguments
                .contains(&("x-message-ttl", Arg::Int(60_000)))
        );
        assert!(tier.arguments.contains(&(
            "x-dead-letter-routing-key",
            text("lesson-replay.recordings")
        )));
        assert_eq!(topology.queues.len(), 1 + 1 + 5 + 1 + 2 + 1);
        // No queue lives on one node; the queues consumers outside the
        // worker read (parking, records) are unlimited.
        for queue in &topology.queues {
            assert!(queue.arguments.contains(&("x-queue-type", text("quorum"))));
            assert_eq!(
                queue.unlimited_delivery(),
                queue.name == settings.parking_queue || queue.name == settings.records_queue,
                "{}",
                queue.name
            );
        }
        let waiting = topology
            .queues
            .iter()
            .find(|q| q.name == "lesson-replay.recordings.watch.60s")
            .unwrap();
        assert!(waiting.arguments.contains(&(
            "x-dead-letter-routing-key",
            text("lesson-replay.recordings.watch")
        )));
    }

    #[test]
    fn each_app_gets_a_lane_like_the_work_queue_and_the_rest_share_one() {
        let mut settings = TopologySettings {
            inbound_exchange: "in".into(),
            work_queue: "wq".into(),
            parking_queue: "park".into(),
            records_exchange: "rx".into(),
            records_queue: "rq".into(),
            delivery_limit: 7,
            retry_tiers: vec![Duration::from_secs(10)],
            watch_delays: vec![Duration::from_secs(60)],
            apps: Vec::new(),
            webhooks: None,
        };
        let without = plan(&settings);
        assert!(lanes(&settings).is_empty());
        settings.apps = vec![1400000001, 1400000002];
        let with = plan(&settings);
        let names: Vec<&str> = with.queue_names().collect();
        assert_eq!(with.queues.len(), without.queues.len() + 3, "{names:?}");
        let work = with.queues.iter().find(|q| q.name == "wq").unwrap();
        for lane in ["wq.app.1400000001", "wq.app.1400000002", "wq.app.other"] {
            let spec = with.queues.iter().find(|q| q.name == lane).unwrap();
            // Quorum, the delivery limit, parked when it is reached.
            assert_eq!(spec.arguments, work.arguments, "{lane}");
            assert!(spec.arguments.contains(&(DELIVERY_LIMIT, Arg::Int(7))));
        }
        // Retries come back to the work queue, which sorts them again.
        let tier = with
            .queues
            .iter()
            .find(|q| q.name == "wq.retry.10s")
            .unwrap();
        assert!(
            tier.arguments
                .contains(&("x-dead-letter-routing-key", text("wq")))
        );
    }

    #[test]
    fn webhook_events_get_lanes_and_delay_tiers_of_their_own_only_when_asked() {
        let mut settings = TopologySettings {
            inbound_exchange: "in".into(),
            work_queue: "wq".into(),
            parking_queue: "park".into(),
            records_exchange: "rx".into(),
            records_queue: "rq".into(),
            delivery_limit: 7,
            retry_tiers: vec![Duration::from_secs(10)],
            watch_delays: vec![Duration::from_secs(60)],
            apps: vec![1400000001],
            webhooks: None,
        };
        let without = plan(&settings);
        assert!(!without.queue_names().any(|q| q.starts_with("wh")));
        settings.webhooks = Some(WebhookQueues {
            queue: "wh".into(),
            retry_tiers: [5, 300].map(Duration::from_secs).to_vec(),
        });
        let with = plan(&settings);
        let added: Vec<&str> = with.queue_names().filter(|q| q.starts_with("wh")).collect();
        assert_eq!(
            added,
            [
                "wh.app.1400000001",
                "wh.app.other",
                "wh",
                "wh.retry.5s",
                "wh.retry.300s"
            ]
        );
        let work = with.queues.iter().find(|q| q.name == "wq").unwrap();
        let intake = with.queues.iter().find(|q| q.name == "wh").unwrap();
        // A delivery limit, then parked, as the work queue.
        assert_eq!(intake.arguments, work.arguments);
        let tier = with
            .queues
            .iter()
            .find(|q| q.name == "wh.retry.300s")
            .unwrap();
        assert!(
            tier.arguments
                .contains(&("x-message-ttl", Arg::Int(300_000)))
        );
        assert!(
            tier.arguments
                .contains(&("x-dead-letter-routing-key", text("wh")))
        );
    }
}
