//! Watches: how a lesson is found even when every `record_finished` callback
//! is lost. A `record_started` callback (or a query answer saying the task is
//! still recording) names a task that will need a record; a **watch** for
//! `(sdkappid, task_id)` is a small message that waits in a delay queue and,
//! when due, makes the worker ask TIC (`query`) how the task stands:
//! finished → the answer takes the path of a `record_finished` callback;
//! still recording → watched again, on a growing schedule, until
//! `watch_max_age_secs`. Pure: the schedule and the watch's own format.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The AMQP `type` of a watch message (the work queue's messages have none).
pub const WATCH_TYPE: &str = "lesson-replay.watch.v1";

/// One watched task: the body of a watch message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watch {
    pub sdkappid: i64,
    pub task_id: String,
    pub room_id: i64,
    /// Since when the task is watched (Unix seconds): the recording's start
    /// when known, else when the watch was made. Its age decides expiry.
    pub since: i64,
    /// Queries that found the task still recording.
    #[serde(default)]
    pub checks: u32,
    /// Queries that failed transiently (timeouts, 5xx, TIC's 20099).
    #[serde(default)]
    pub failures: u32,
}

/// When watches are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchSchedule {
    /// The first check, after the watch is made.
    pub first: Duration,
    /// The following checks; the last repeats.
    pub then: Vec<Duration>,
    /// After a transient failure of the query.
    pub retry: Duration,
    /// Older watches are given up (parked as `watch_expired`).
    pub max_age: Duration,
    /// How long after a recording stopped its `record_finished` callback may
    /// still come (TIC retries for ten minutes): a finished task without a
    /// record is checked again within this time rather than taken as missed.
    pub callback_grace: Duration,
}

/// What to do with a watch next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchStep {
    /// Check it again after this delay (one of [`WatchSchedule::delays`]).
    After(Duration),
    /// Too old: give up, with this explanation.
    Expired(String),
}

impl WatchSchedule {
    /// Every delay a watch can wait: one delay queue each, ascending.
    pub fn delays(&self) -> Vec<Duration> {
        let mut all: Vec<Duration> = [self.first, self.retry]
            .into_iter()
            .chain(self.then.iter().copied())
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// The next step of `watch` at `now` (Unix seconds): its first check, a
    /// later one after `checks` found it recording, or a retry after a failure.
    pub fn next(&self, watch: &Watch, now: i64, after_failure: bool) -> WatchStep {
        let age = now.saturating_sub(watch.since);
        if age > self.max_age.as_secs() as i64 {
            return WatchStep::Expired(format!(
                "task {} still not finished after {age} s (watch_max_age_secs is {})",
                watch.task_id,
                self.max_age.as_secs()
            ));
        }
        if after_failure {
            return WatchStep::After(self.retry);
        }
        match watch.checks {
            0 => WatchStep::After(self.first),
            n => {
                let index = (n as usize - 1).min(self.then.len().saturating_sub(1));
                WatchStep::After(self.then.get(index).copied().unwrap_or(self.first))
            }
        }
    }
}

/// The queue where due watches wait for a worker: `<work_queue>.watch`.
pub fn due_queue(work_queue: &str) -> String {
    format!("{work_queue}.watch")
}

/// The delay queue of `delay`: `<work_queue>.watch.<N>s`.
pub fn delay_queue(work_queue: &str, delay: Duration) -> String {
    format!("{work_queue}.watch.{}s", delay.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> WatchSchedule {
        WatchSchedule {
            first: Duration::from_secs(3600),
            then: [900, 1800].map(Duration::from_secs).to_vec(),
            retry: Duration::from_secs(60),
            max_age: Duration::from_secs(86400),
            callback_grace: Duration::from_secs(1200),
        }
    }

    fn watch(checks: u32) -> Watch {
        Watch {
            sdkappid: 1,
            task_id: "t".into(),
            room_id: 1,
            since: 1000,
            checks,
            failures: 0,
        }
    }

    #[test]
    fn checks_follow_the_schedule_and_the_last_delay_repeats() {
        let s = schedule();
        let at = |checks| s.next(&watch(checks), 2000, false);
        assert_eq!(at(0), WatchStep::After(Duration::from_secs(3600)));
        assert_eq!(at(1), WatchStep::After(Duration::from_secs(900)));
        assert_eq!(at(2), WatchStep::After(Duration::from_secs(1800)));
        assert_eq!(at(9), WatchStep::After(Duration::from_secs(1800)));
        assert_eq!(
            s.next(&watch(3), 2000, true),
            WatchStep::After(Duration::from_secs(60))
        );
    }

    #[test]
    fn old_watches_expire() {
        let s = schedule();
        assert!(
            matches!(s.next(&watch(5), 1000 + 86401, false), WatchStep::Expired(m) if m.contains("86400"))
        );
        assert!(matches!(
            s.next(&watch(5), 1000 + 86400, false),
            WatchStep::After(_)
        ));
    }

    #[test]
    fn every_delay_has_its_queue() {
        assert_eq!(
            schedule().delays(),
            [60, 900, 1800, 3600].map(Duration::from_secs).to_vec()
        );
        assert_eq!(delay_queue("w", Duration::from_secs(60)), "w.watch.60s");
        assert_eq!(due_queue("w"), "w.watch");
    }

    #[test]
    fn a_watch_message_round_trips_and_tolerates_missing_counts() {
        let w = watch(2);
        let text = serde_json::to_string(&w).unwrap();
        assert_eq!(serde_json::from_str::<Watch>(&text).unwrap(), w);
        let bare: Watch =
            serde_json::from_str(r#"{"sdkappid":1,"task_id":"t","room_id":1,"since":5}"#).unwrap();
        assert_eq!((bare.checks, bare.failures), (0, 0));
    }
}
