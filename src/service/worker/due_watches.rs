//! A due watch's handling: ask TIC, then publish the finished recording,
//! watch again, or park.

use lapin::message::Delivery;
use tracing::{info, warn};

use super::Context;
use super::handling::remember_lesson;
use super::lessons::publish_normalized;
use super::{Outcome, now, rescheduled};
use crate::decision::reason::{ReasonCode, Rejection};
use crate::decision::watch::Watch;
use crate::service::watches::WatchCheck;
use crate::telemetry::metrics::WatchEvent;

/// A due watch: ask TIC, then publish the finished recording, watch again,
/// or park.
pub(super) async fn check_watch(context: &Context, delivery: &Delivery) -> Outcome {
    let watch: Watch = match serde_json::from_slice(&delivery.data) {
        Ok(watch) => watch,
        Err(e) => {
            return Outcome::Park(Rejection::new(
                ReasonCode::InvalidJson,
                format!("not a watch: {e}"),
            ));
        }
    };
    let span = tracing::Span::current();
    tracing::record_all!(
        span,
        task_id = watch.task_id.as_str(),
        sdkappid = watch.sdkappid
    );
    remember_lesson(
        None,
        Some(&watch.task_id),
        watch.room_id,
        Some(watch.sdkappid),
    );
    let retry = watch.clone();
    match context.watcher.check(watch, now().unix_timestamp()).await {
        WatchCheck::Again(watch, delay) => Outcome::Watch(watch, delay),
        WatchCheck::Park(reason) => Outcome::Park(reason),
        WatchCheck::Finished(mut normalized) => {
            let recorded = context.media.recorded(&normalized.record).await;
            let now = now().unix_timestamp();
            if recorded == Some(false) && context.watcher.too_soon_to_tell(&normalized.record, now)
            {
                // Its callback may be on its way: do not race it.
                info!("watched task just finished and has no record yet: checked again soon");
                return rescheduled(context.watcher.recheck_soon(retry, now));
            }
            let event = match recorded {
                Some(true) => WatchEvent::AlreadyRecorded,
                Some(false) => WatchEvent::Reconciled,
                None => WatchEvent::Finished,
            };
            context.metrics.watch(event);
            match publish_normalized(context, &mut normalized, delivery).await {
                Outcome::Retry(reason) => {
                    warn!(reason = %reason.code, "watched recording not published yet: {}", reason.message);
                    rescheduled(context.watcher.after_failure(retry, now))
                }
                outcome => outcome,
            }
        }
    }
}

/// The watch of `delivery` again after the retry delay (a transient failure).
pub(super) fn retry_watch(context: &Context, delivery: &Delivery, reason: Rejection) -> Outcome {
    match serde_json::from_slice::<Watch>(&delivery.data) {
        Ok(watch) => {
            warn!(reason = %reason.code, "watch failed: {}", reason.message);
            rescheduled(context.watcher.after_failure(watch, now().unix_timestamp()))
        }
        Err(_) => Outcome::Park(reason),
    }
}
