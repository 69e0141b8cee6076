//! Retry through the broker: where a message goes after a transient failure.
//!
//! A failed message is republished to a delay tier — a queue whose fixed
//! `x-message-ttl` dead-letters it back to the work queue — so no consumer slot
//! is held by a sleeping retry. The attempt count travels in our own header
//! (`x-death` cannot be trusted: RabbitMQ 3.13+ ignores a client-set one).
//! After the last tier, or once the message is older than the maximum age, it
//! is parked. Pure: the worker carries the decision out.

use std::time::Duration;

use time::OffsetDateTime;

/// The delay tiers and the age limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub tiers: Vec<Duration>,
    pub max_age: Duration,
}

/// What to do with a message that failed transiently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryStep {
    /// Republish to the delay tier with this index.
    Delay(usize),
    /// Out of tiers or too old: park it.
    Park(String),
}

impl RetryPolicy {
    /// The next step for a message that failed `attempts` broker-level retries
    /// ago, first seen failing at `first_seen`.
    pub fn next_step(
        &self,
        attempts: u32,
        first_seen: OffsetDateTime,
        now: OffsetDateTime,
    ) -> RetryStep {
        let age = now - first_seen;
        if age > self.max_age {
            return RetryStep::Park(format!(
                "gave up after {} attempts: older than the maximum age of {}s",
                attempts + 1,
                self.max_age.as_secs()
            ));
        }
        match usize::try_from(attempts)
            .ok()
            .filter(|a| *a < self.tiers.len())
        {
            Some(tier) => RetryStep::Delay(tier),
            None => RetryStep::Park(format!(
                "gave up after {} attempts: every delay tier used",
                attempts + 1
            )),
        }
    }
}

/// The queue name of delay tier `delay` for `work_queue`, e.g. `lesson-replay.recordings.retry.60s`.
pub fn tier_queue(work_queue: &str, delay: Duration) -> String {
    format!("{work_queue}.retry.{}s", delay.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            tiers: [10, 60, 300].map(Duration::from_secs).to_vec(),
            max_age: Duration::from_secs(3600),
        }
    }

    #[test]
    fn tiers_are_used_in_order_then_the_message_is_parked() {
        let t0 = datetime!(2026-01-01 0:00 UTC);
        assert_eq!(policy().next_step(0, t0, t0), RetryStep::Delay(0));
        assert_eq!(policy().next_step(2, t0, t0), RetryStep::Delay(2));
        assert!(
            matches!(policy().next_step(3, t0, t0), RetryStep::Park(m) if m.contains("4 attempts"))
        );
    }

    #[test]
    fn a_message_older_than_the_maximum_age_is_parked() {
        let t0 = datetime!(2026-01-01 0:00 UTC);
        let later = datetime!(2026-01-01 1:00:01 UTC);
        assert!(
            matches!(policy().next_step(0, t0, later), RetryStep::Park(m) if m.contains("maximum age"))
        );
    }

    #[test]
    fn tier_queues_are_named_after_the_work_queue() {
        assert_eq!(
            tier_queue("lesson-replay.recordings", Duration::from_secs(60)),
            "lesson-replay.recordings.retry.60s"
        );
    }
}
