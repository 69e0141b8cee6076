//! The settings of each part, built from [`Config`] in one place and one way:
//! the lower rooms (decision, media, broker) never see `Config`, only the
//! typed settings they need, so they can be used and tested on their own.

use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::broker::amqp::BrokerSettings;
use crate::broker::retry::RetryPolicy;
use crate::broker::topology::{TopologySettings, WebhookQueues};
use crate::config::settings::{Config, ConfigError, PayloadSigning};
use crate::decision::decide::InputPolicy;
use crate::decision::decode::Limits;
use crate::decision::url_policy::UrlPolicy;
use crate::decision::watch::WatchSchedule;
use crate::media::archive::ArchiveSettings;
use crate::media::enrich::MediaSettings;
use crate::media::fetch::FetchSettings;
use crate::tic::client::TicSettings;
use crate::webhook::send::Destination;
use crate::webhook::sign::Secret;

impl Config {
    /// What the decision demands of every inbound message.
    pub fn input_policy(&self) -> InputPolicy {
        InputPolicy {
            mode: self.signature,
            // validate() has parsed it already.
            keys: self.keys().unwrap_or_default(),
            limits: Limits {
                max_body_bytes: self.max_body_bytes,
                max_tracks: self.max_tracks,
                max_string_bytes: self.max_string_bytes,
            },
            urls: self.url_policy(),
            watch: self.watch_lessons,
        }
    }

    /// When watched tasks are queried.
    pub fn watch_schedule(&self) -> WatchSchedule {
        WatchSchedule {
            first: Duration::from_secs(self.watch_first_check_secs),
            then: self
                .watch_delays_secs
                .iter()
                .map(|s| Duration::from_secs(*s))
                .collect(),
            retry: Duration::from_secs(self.watch_retry_secs),
            max_age: Duration::from_secs(self.watch_max_age_secs),
            callback_grace: Duration::from_secs(self.watch_callback_grace_secs),
        }
    }

    pub fn url_policy(&self) -> UrlPolicy {
        UrlPolicy {
            allowed_hosts: self.vod_allowed_hosts.clone(),
            allow_private_networks: self.vod_allow_private_networks,
        }
    }

    /// The broker address and every name of the topology.
    pub fn broker_settings(&self) -> BrokerSettings {
        let mut settings = BrokerSettings::new(
            self.amqp_url.clone(),
            TopologySettings {
                inbound_exchange: self.inbound_exchange.clone(),
                work_queue: self.work_queue.clone(),
                parking_queue: self.parking_queue.clone(),
                records_exchange: self.records_exchange.clone(),
                records_queue: self.records_queue.clone(),
                delivery_limit: self.delivery_limit,
                retry_tiers: self.retry_policy().tiers,
                watch_delays: self.watch_schedule().delays(),
                apps: self.app_ids(),
                webhooks: self.webhooks_enabled().then(|| WebhookQueues {
                    queue: self.webhook_queue.clone(),
                    retry_tiers: self.webhook_policy().tiers,
                }),
            },
        );
        settings.refused_recheck = Duration::from_secs(self.topology_recheck_secs);
        settings
    }

    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            tiers: self
                .retry_delays_secs
                .iter()
                .map(|s| Duration::from_secs(*s))
                .collect(),
            max_age: Duration::from_secs(self.retry_max_age_secs),
        }
    }

    /// Whether any app's events go anywhere: the top-level URL or a table's.
    pub fn webhooks_enabled(&self) -> bool {
        self.webhook_url.is_some() || self.apps.values().any(|a| a.webhook_url.is_some())
    }

    /// When failed webhook attempts are tried again: the delays, and an age
    /// past which nothing is retried, never reached before the last attempt
    /// (every wait the longest — `Retry-After` each time — and a day).
    pub fn webhook_policy(&self) -> RetryPolicy {
        let tiers: Vec<Duration> = self
            .webhook_delays_secs
            .iter()
            .map(|s| Duration::from_secs(*s))
            .collect();
        let longest = tiers.iter().max().copied().unwrap_or_default();
        let max_age = longest * tiers.len() as u32 + Duration::from_secs(24 * 3600);
        RetryPolicy { tiers, max_age }
    }

    /// Where app `sdkappid`'s events go (`None`: nowhere).
    pub fn webhook_destination(&self, sdkappid: Option<i64>) -> Option<Destination> {
        let target = self.resolved(sdkappid).webhook?;
        // validate() has checked both.
        Some(Destination {
            url: url::Url::parse(&target.url).ok()?,
            secrets: target
                .secrets
                .iter()
                .filter_map(|s| Secret::parse(s.expose_secret()).ok())
                .collect(),
        })
    }

    /// How tracks are fetched, probed and archived.
    pub fn media_settings(&self) -> MediaSettings {
        MediaSettings {
            fetch: FetchSettings {
                connect_timeout: Duration::from_secs(self.fetch_connect_timeout_secs),
                idle_timeout: Duration::from_secs(self.fetch_idle_timeout_secs),
                max_file_bytes: self.max_file_bytes,
                max_resumes: self.fetch_max_resumes,
                url_policy: Arc::new(self.url_policy()),
            },
            archive: self.archive.then(|| self.archive_settings(None)),
            apps: self
                .app_ids()
                .into_iter()
                .map(|app| {
                    let on = self.resolved(Some(app)).archive;
                    (app, on.then(|| self.archive_settings(Some(app))))
                })
                .collect(),
            probe: self.probe,
            parallel_tracks: self.archive_parallel_tracks,
            attempts: self.fetch_attempts,
            budget: Duration::from_secs(self.stage_budget_secs),
        }
    }

    /// The bucket and store of app `sdkappid` (`None`: the default), for
    /// commands that act on the bucket itself (`lesson-replay lifecycle`,
    /// `preview --presign-hours`); `None` when it has no bucket.
    pub fn bucket_settings(&self, sdkappid: Option<i64>) -> Option<ArchiveSettings> {
        self.resolved(sdkappid)
            .s3_bucket
            .as_deref()
            .is_some_and(|b| !b.is_empty())
            .then(|| self.archive_settings(sdkappid))
    }

    /// Every distinct bucket of the configuration: the default one (when it
    /// has a bucket) and each app's that differs from it.
    pub fn destinations(&self) -> Vec<(Option<i64>, ArchiveSettings)> {
        let mut out: Vec<(Option<i64>, ArchiveSettings)> = Vec::new();
        let apps = self.app_ids().into_iter().map(Some);
        for app in std::iter::once(None).chain(apps) {
            let Some(settings) = self.bucket_settings(app) else {
                continue;
            };
            let same = |(_, known): &(Option<i64>, ArchiveSettings)| {
                (&known.endpoint, &known.bucket, &known.prefix)
                    == (&settings.endpoint, &settings.bucket, &settings.prefix)
            };
            if !out.iter().any(same) {
                out.push((app, settings));
            }
        }
        out
    }

    /// Where app `sdkappid` archives (`None`: the default destination). The
    /// transfer settings (part size, concurrency, memory, deadlines) are the
    /// worker's, shared by every app.
    fn archive_settings(&self, sdkappid: Option<i64>) -> ArchiveSettings {
        let app = self.resolved(sdkappid);
        let credentials: Option<(SecretString, SecretString)> = app.credentials;
        ArchiveSettings {
            // validate() refuses archive = true without a bucket.
            bucket: app.s3_bucket.unwrap_or_default(),
            endpoint: app.s3_endpoint.clone(),
            region: app.s3_region,
            force_path_style: app.s3_force_path_style,
            credentials,
            prefix: app.s3_prefix.trim_matches('/').to_owned(),
            storage_class: app.s3_storage_class,
            sse: app.s3_sse,
            part_size: self.s3_part_size_bytes,
            concurrency: self.s3_upload_concurrency,
            memory_bytes: self.archive_memory_bytes,
            request_timeout: Duration::from_secs(self.s3_request_timeout_secs),
            part_timeout: Duration::from_secs(self.s3_part_timeout_secs),
            unsigned_payload: match self.s3_payload_signing {
                PayloadSigning::Signed => false,
                PayloadSigning::Unsigned => true,
                // No endpoint: AWS, always HTTPS.
                PayloadSigning::Auto => app
                    .s3_endpoint
                    .as_deref()
                    .is_none_or(|e| e.trim().to_ascii_lowercase().starts_with("https://")),
            },
        }
    }

    /// TIC's API as app `sdkappid`, or as the only app of `tic_keys`.
    pub fn tic_settings(&self, sdkappid: Option<i64>) -> Result<TicSettings, ConfigError> {
        let keys = self.keys().map_err(ConfigError::Invalid)?;
        let app = match (sdkappid, keys.ids().collect::<Vec<_>>().as_slice()) {
            (Some(app), _) => app,
            (None, [only]) => *only,
            (None, []) => {
                return Err(ConfigError::Invalid(
                    "TIC's API needs a TicKey: set tic_keys".into(),
                ));
            }
            (None, several) => {
                return Err(ConfigError::Invalid(format!(
                    "tic_keys has {} apps: choose one with --sdkappid",
                    several.len()
                )));
            }
        };
        let key = keys.get(app).cloned().ok_or_else(|| {
            ConfigError::Invalid(format!("no TicKey in tic_keys for sdkappid {app}"))
        })?;
        let mut api_base = self.tic_api_base.clone();
        if !api_base.ends_with('/') {
            api_base.push('/');
        }
        Ok(TicSettings {
            api_base,
            sdkappid: app,
            key,
            sign_ttl: Duration::from_secs(self.tic_sign_ttl_secs),
            timeout: Duration::from_secs(self.tic_api_timeout_secs),
            attempts: self.tic_api_attempts,
        })
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::broker::topology::{definitions, plan};

    #[test]
    fn the_committed_definitions_match_the_default_topology() {
        let committed: Value =
            serde_json::from_str(include_str!("../../deploy/rabbitmq/definitions.json"))
                .expect("deploy/rabbitmq/definitions.json is JSON");
        let generated = definitions(&plan(&Config::default().broker_settings().topology));
        assert_eq!(
            committed, generated,
            "regenerate with: cargo run -- topology --print-definitions > deploy/rabbitmq/definitions.json"
        );
    }

    #[test]
    fn payloads_are_unsigned_by_default_only_over_tls() {
        let with = |endpoint: Option<&str>, signing: PayloadSigning| {
            let config = Config {
                archive: true,
                s3_bucket: Some("b".into()),
                s3_endpoint: endpoint.map(str::to_owned),
                s3_payload_signing: signing,
                ..Config::default()
            };
            config.media_settings().archive.unwrap().unsigned_payload
        };
        assert!(with(None, PayloadSigning::Auto), "AWS: HTTPS");
        assert!(with(Some("https://cos.example"), PayloadSigning::Auto));
        assert!(!with(Some("http://minio:9000"), PayloadSigning::Auto));
        assert!(with(Some("http://minio:9000"), PayloadSigning::Unsigned));
        assert!(!with(None, PayloadSigning::Signed));
    }

    #[test]
    fn archiving_off_builds_no_archive_settings() {
        let config = Config::default();
        assert!(config.media_settings().archive.is_none());
        let on = Config {
            archive: true,
            s3_bucket: Some("b".into()),
            s3_prefix: "/p/".into(),
            ..Config::default()
        };
        let archive = on.media_settings().archive.expect("archive settings");
        assert_eq!(
            (archive.bucket.as_str(), archive.prefix.as_str()),
            ("b", "p")
        );
        assert!(archive.credentials.is_none());
    }
}
