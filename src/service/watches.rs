//! Checking a due watch: ask TIC how the watched task stands and say what
//! follows — its finished recording (which then takes the path of a
//! `record_finished` callback in the worker), another check later, or a
//! reason to park the watch. The schedule and the watch format are in
//! [`crate::decision::watch`]; the worker carries out what this says.

use std::collections::HashMap;
use std::time::Duration;

use time::format_description::well_known::Rfc3339;
use tracing::{info, warn};

use crate::config::settings::Config;
use crate::decision::decide::{Decision, Envelope, InputPolicy, decide};
use crate::decision::normalize::Normalized;
use crate::decision::reason::{ReasonCode, Rejection};
use crate::decision::record::Record;
use crate::decision::verify::SignatureMode;
use crate::decision::watch::{Watch, WatchSchedule, WatchStep};
use crate::telemetry::metrics::{Metrics, WatchEvent};
use crate::tic::client::{TicClient, TicError};

/// What a due watch leads to.
#[derive(Debug)]
pub enum WatchCheck {
    /// TIC says finished: this is the recording, to enrich and publish.
    Finished(Box<Normalized>),
    /// Ask again after the delay (the watch's counts updated).
    Again(Watch, Duration),
    /// Give up, for this reason.
    Park(Rejection),
}

/// TIC's API per sdkappid, and what answers must satisfy.
pub struct Watcher {
    clients: HashMap<i64, TicClient>,
    /// The configured input policy, signatures off: the answer comes from
    /// TIC's API over a signed request, not from a callback.
    policy: InputPolicy,
    pub schedule: WatchSchedule,
    metrics: Metrics,
}

impl Watcher {
    /// One client per app of `tic_keys`.
    pub fn from_config(config: &Config, metrics: Metrics) -> Result<Watcher, TicError> {
        let mut clients = HashMap::new();
        let keys = config.keys().unwrap_or_default();
        for app in keys.ids() {
            // validate() has checked the settings; an app listed has its key.
            if let Ok(settings) = config.tic_settings(Some(app)) {
                clients.insert(app, TicClient::new(settings)?);
            }
        }
        let mut policy = config.input_policy();
        policy.mode = SignatureMode::Off;
        policy.watch = true;
        Ok(Watcher {
            clients,
            policy,
            schedule: config.watch_schedule(),
            metrics,
        })
    }

    /// Whether TIC can be asked about the tasks of `sdkappid` (its TicKey is
    /// configured). Watches are made only for those.
    pub fn can_ask(&self, sdkappid: i64) -> bool {
        self.clients.contains_key(&sdkappid)
    }

    /// The first check of a new watch. A `since` in the future (a clock in
    /// milliseconds, a hostile body) is taken as now, so the watch expires.
    pub fn first(&self, mut watch: Watch, now: i64) -> WatchCheck {
        watch.since = watch.since.min(now);
        self.again(watch, now, false)
    }

    /// Ask TIC about `watch` and say what follows.
    pub async fn check(&self, watch: Watch, now: i64) -> WatchCheck {
        self.metrics.watch(WatchEvent::Due);
        let Some(client) = self.clients.get(&watch.sdkappid) else {
            return self.park(Rejection::new(
                ReasonCode::WatchNoKey,
                format!(
                    "no TicKey in tic_keys for sdkappid {}: TIC cannot be asked about task {}",
                    watch.sdkappid, watch.task_id
                ),
            ));
        };
        let answer = match client.query(&watch.task_id).await {
            Ok(answer) => answer,
            Err(e) if e.is_transient() => {
                warn!(task = %watch.task_id, error = %e, "watch query failed: asking again later");
                return self.after_failure(watch, now);
            }
            Err(e) => return self.park(refusal(&watch, &e)),
        };
        let envelope = Envelope {
            sdkappid: Some(watch.sdkappid.to_string()),
            ..Envelope::default()
        };
        match decide(&answer, &envelope, &self.policy) {
            Decision::Publish(normalized) => {
                info!(task = %watch.task_id, checks = watch.checks, "watched task finished");
                WatchCheck::Finished(normalized)
            }
            Decision::Watch { .. } => {
                self.metrics.watch(WatchEvent::StillRecording);
                let checked = Watch {
                    checks: watch.checks + 1,
                    ..watch
                };
                self.again(checked, now, false)
            }
            Decision::Skip(reason) => self.park(Rejection::new(
                ReasonCode::UpstreamError,
                format!("task {}: {}", watch.task_id, reason.message),
            )),
            Decision::Reject(reason) => self.park(reason),
        }
    }

    /// A finished lesson without its record, stopped so recently that its
    /// `record_finished` callback may still be on its way (TIC retries for
    /// ten minutes, then our own delay tiers): watched once more rather than
    /// counted as a callback the path missed.
    pub fn too_soon_to_tell(&self, record: &Record, now: i64) -> bool {
        let started = time::OffsetDateTime::parse(&record.started_at, &Rfc3339)
            .map(|t| t.unix_timestamp())
            .unwrap_or(0);
        let stopped = started.saturating_add(record.duration_ms / 1000);
        now.saturating_sub(stopped) < self.schedule.callback_grace.as_secs() as i64
    }

    /// `watch` checked again soon (after `watch_retry_secs`): it was found
    /// finished too recently to tell.
    pub fn recheck_soon(&self, watch: Watch, now: i64) -> WatchCheck {
        let checked = Watch {
            checks: watch.checks + 1,
            ..watch
        };
        self.again(checked, now, true)
    }

    /// `watch` asked again after `watch_retry_secs`: the query, or what
    /// followed it, failed transiently.
    pub fn after_failure(&self, watch: Watch, now: i64) -> WatchCheck {
        self.metrics.watch(WatchEvent::Retried);
        let failed = Watch {
            failures: watch.failures + 1,
            ..watch
        };
        self.again(failed, now, true)
    }

    fn again(&self, watch: Watch, now: i64, after_failure: bool) -> WatchCheck {
        match self.schedule.next(&watch, now, after_failure) {
            WatchStep::After(delay) => WatchCheck::Again(watch, delay),
            WatchStep::Expired(why) => self.park(Rejection::new(ReasonCode::WatchExpired, why)),
        }
    }

    fn park(&self, reason: Rejection) -> WatchCheck {
        self.metrics.watch(WatchEvent::Parked);
        WatchCheck::Park(reason)
    }
}

/// The reason code of a query TIC refused for good.
fn refusal(watch: &Watch, error: &TicError) -> Rejection {
    let code = match error.code() {
        Some(20005) => ReasonCode::WatchTaskNotFound,
        Some(20000..=20002) => ReasonCode::WatchDenied,
        _ => ReasonCode::UpstreamError,
    };
    Rejection::new(code, format!("query of task {}: {error}", watch.task_id))
}
