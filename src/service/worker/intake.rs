//! The queues with lanes: each message (or webhook event) moved to its
//! app's lane.

use std::sync::Arc;

use lapin::message::Delivery;
use tracing::warn;

use super::Context;
use super::disposition::{ack_or_requeue, shortest_tier};
use super::webhooks::app_of_event;
use super::{Kind, Lanes};
use crate::broker::amqp;
use crate::broker::topology;
use crate::decision::decide::app_of;

/// Move a message from the work queue (or an event from the webhook queue)
/// to its app's lane (confirmed), then acknowledge it; when the lane does
/// not confirm, the shortest delay tier takes it; only when that fails too
/// is it put back. Only its app is read: the lane's consumer decides the
/// rest, and parks what is bad.
pub(super) async fn sort(context: Arc<Context>, delivery: Delivery, lanes: Lanes) {
    let (app, base, kind) = match lanes {
        Lanes::Lessons => {
            let envelope = amqp::envelope_of(&delivery.properties);
            let app = app_of(&delivery.data, &envelope, &context.policy.limits);
            let kind = Kind::Message { app: None };
            (app, context.config.work_queue.as_str(), kind)
        }
        Lanes::Webhooks => {
            let kind = Kind::Webhook { app: None };
            (
                app_of_event(&delivery),
                context.config.webhook_queue.as_str(),
                kind,
            )
        }
    };
    let app = app.filter(|app| context.lanes.contains(app));
    let lane = topology::app_queue(base, app);
    let moved = amqp::publish_confirmed(
        &context.publisher,
        "",
        &lane,
        &delivery.data,
        delivery.properties.clone(),
    )
    .await;
    // A lane that cannot take it (no majority, the link failing): the
    // message waits in the shortest delay tier, which brings it back here,
    // rather than going round the work queue's delivery limit.
    let moved = match moved {
        Err(e) => {
            let tier = shortest_tier(&context, kind);
            warn!(error = %e, %lane, %tier, "could not move the message to its lane: it waits in a delay tier");
            amqp::publish_confirmed(
                &context.publisher,
                "",
                &tier,
                &delivery.data,
                delivery.properties.clone(),
            )
            .await
        }
        ok => ok,
    };
    ack_or_requeue(&delivery, moved).await;
}
