//! Configuration: defaults, then an optional TOML file, then `LESSON_REPLAY_*`
//! environment variables (each setting's variable is its name in upper case,
//! e.g. `amqp_url` → `LESSON_REPLAY_AMQP_URL`). Secrets are wrapped so that
//! `Debug` output never shows them.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::pipeline::InputPolicy;
use crate::verify::{SignatureMode, TicKeys};

pub const ENV_PREFIX: &str = "LESSON_REPLAY_";

/// Every setting of the worker. The README's settings table mirrors this struct.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// AMQP URL of the broker (may contain a password).
    pub amqp_url: SecretString,
    /// Topic exchange the upstream publishes TIC messages to.
    pub inbound_exchange: String,
    /// Quorum queue the workers consume, bound to `inbound_exchange` with `#`.
    pub work_queue: String,
    /// Queue where rejected messages are parked, with their reason.
    pub parking_queue: String,
    /// Topic exchange records are published to.
    pub records_exchange: String,
    /// Queue bound to `records_exchange` with `#`, so records are kept before any consumer binds.
    pub records_queue: String,
    /// Deliveries of one message before the broker dead-letters it to the parking queue.
    pub delivery_limit: u32,
    /// Messages processed at once (the consumer prefetch).
    pub concurrency: u16,
    /// `required`, `if-present` or `off`.
    pub signature: SignatureMode,
    /// TicKeys per sdkappid: `1400042982=KEY,...` or, in TOML, a table.
    pub tic_keys: TicKeysSetting,
    /// Seconds in-flight messages get to finish on shutdown.
    pub shutdown_grace_secs: u64,
    /// `auto` (JSON unless stderr is a terminal), `json` or `text`.
    pub log_format: LogFormat,
    /// Address of the `/metrics`, `/healthz`, `/readyz` listener; empty: none.
    pub metrics_addr: String,

    /// Probe every track's MP4 for its real duration and picture size.
    pub probe: bool,
    /// Seconds to wait for a TCP/TLS connection to the VOD origin.
    pub fetch_connect_timeout_secs: u64,
    /// Seconds without a byte from the VOD origin before the transfer counts as stalled.
    pub fetch_idle_timeout_secs: u64,
    /// Attempts per file (download or probe) within one delivery, with backoff.
    pub fetch_attempts: usize,
    /// Range resumes within one download attempt.
    pub fetch_max_resumes: u32,
    /// Larger files are refused (`file_too_large`).
    pub max_file_bytes: u64,

    /// Copy every track into the S3-compatible bucket.
    pub archive: bool,
    /// Endpoint URL of a non-AWS store (MinIO, COS, OSS, R2, ...).
    pub s3_endpoint: Option<String>,
    pub s3_region: String,
    /// Path-style addressing (`endpoint/bucket/key`), needed by most non-AWS stores.
    pub s3_force_path_style: bool,
    /// Static credentials; without them the standard AWS chain is used.
    pub s3_access_key_id: Option<SecretString>,
    pub s3_secret_access_key: Option<SecretString>,
    pub s3_bucket: Option<String>,
    /// Key prefix of every object.
    pub s3_prefix: String,
    pub s3_storage_class: Option<String>,
    /// Server-side encryption: `AES256` or `aws:kms`.
    pub s3_sse: Option<String>,
    /// Multipart part size in bytes (5 MiB ≤ size; ≤ 16 MiB for MinIO).
    pub s3_part_size_bytes: usize,

    /// Delay tiers of broker-level retries, in seconds (`10,60,300` in the environment).
    #[serde(deserialize_with = "list")]
    pub retry_delays_secs: Vec<u64>,
    /// A message failing for longer than this is parked.
    pub retry_max_age_secs: u64,
    /// Longest total backoff of the quick in-process retries of one stage.
    pub stage_budget_secs: u64,
    /// Hosts VOD files may come from: exact names or `*.suffix` patterns.
    #[serde(deserialize_with = "list")]
    pub vod_allowed_hosts: Vec<String>,
    /// Allow VOD hosts resolving to loopback, private, link-local, unspecified or
    /// multicast addresses (refused by default: server-side request forgery).
    pub vod_allow_private_networks: bool,
    /// Larger message bodies are parked (`body_too_large`).
    pub max_body_bytes: usize,
    /// Recordings with more tracks are parked (`too_many_tracks`).
    pub max_tracks: usize,
    /// Longer strings in a message are parked (`field_too_long`).
    pub max_string_bytes: usize,
}

/// A list given as a TOML array or as a comma-separated string (environment).
fn list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + std::str::FromStr,
    T::Err: std::fmt::Display,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form<T> {
        List(Vec<T>),
        Text(String),
        One(u64),
    }
    match Form::<T>::deserialize(d)? {
        Form::List(items) => Ok(items),
        Form::Text(text) => text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().map_err(serde::de::Error::custom))
            .collect(),
        Form::One(n) => n
            .to_string()
            .parse()
            .map(|v| vec![v])
            .map_err(serde::de::Error::custom),
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            amqp_url: SecretString::from("amqp://guest:guest@127.0.0.1:5672/%2f"),
            inbound_exchange: "tic.recordings".into(),
            work_queue: "lesson-replay.recordings".into(),
            parking_queue: "lesson-replay.parking".into(),
            records_exchange: "lesson-replay.records".into(),
            records_queue: "lesson-replay.records".into(),
            delivery_limit: 20,
            concurrency: 16,
            signature: SignatureMode::IfPresent,
            tic_keys: TicKeysSetting::default(),
            shutdown_grace_secs: 25,
            log_format: LogFormat::Auto,
            metrics_addr: "0.0.0.0:9090".into(),
            probe: true,
            fetch_connect_timeout_secs: 10,
            fetch_idle_timeout_secs: 30,
            fetch_attempts: 4,
            fetch_max_resumes: 5,
            max_file_bytes: 20 * 1024 * 1024 * 1024,
            archive: false,
            s3_endpoint: None,
            s3_region: "us-east-1".into(),
            s3_force_path_style: false,
            s3_access_key_id: None,
            s3_secret_access_key: None,
            s3_bucket: None,
            s3_prefix: "lesson-replay".into(),
            s3_storage_class: None,
            s3_sse: None,
            s3_part_size_bytes: 8 * 1024 * 1024,
            retry_delays_secs: vec![10, 60, 300, 1800, 7200],
            retry_max_age_secs: 12 * 3600,
            stage_budget_secs: 60,
            vod_allowed_hosts: vec!["*.vod2.myqcloud.com".into()],
            vod_allow_private_networks: false,
            max_body_bytes: 1024 * 1024,
            max_tracks: 500,
            max_string_bytes: 4096,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Auto,
    Json,
    Text,
}

/// TicKeys as configured: a `ID=KEY,...` list (environment) or a table (TOML).
#[derive(Clone, Deserialize)]
#[serde(untagged)]
pub enum TicKeysSetting {
    List(SecretString),
    Table(BTreeMap<String, SecretString>),
}

impl Default for TicKeysSetting {
    fn default() -> Self {
        TicKeysSetting::Table(BTreeMap::new())
    }
}

impl std::fmt::Debug for TicKeysSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl TicKeysSetting {
    pub fn parse(&self) -> Result<TicKeys, String> {
        match self {
            TicKeysSetting::List(list) => TicKeys::parse_list(list.expose_secret()),
            TicKeysSetting::Table(table) => {
                let mut keys = TicKeys::default();
                for (id, key) in table {
                    let id = id
                        .parse()
                        .map_err(|_| format!("tic_keys: sdkappid {id:?} is not an integer"))?;
                    keys.insert(id, key.clone());
                }
                Ok(keys)
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Load defaults, then `file` (when given), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::new();
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::Invalid(format!(
                    "config file {} not found",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file(file));
        }
        // LESSON_REPLAY_CONFIG names the file; LESSON_REPLAY_TEST_* belong to the tests.
        let env = Env::prefixed(ENV_PREFIX)
            .filter(|key| key != "config" && !key.as_str().starts_with("test_"));
        figment = figment.merge(env);
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.concurrency == 0 {
            return Err(ConfigError::Invalid(
                "concurrency must be at least 1".into(),
            ));
        }
        if self.delivery_limit == 0 {
            return Err(ConfigError::Invalid(
                "delivery_limit must be at least 1".into(),
            ));
        }
        if self.s3_part_size_bytes < 5 * 1024 * 1024 {
            return Err(ConfigError::Invalid(
                "s3_part_size_bytes must be at least 5 MiB (S3's minimum part)".into(),
            ));
        }
        if self.archive && self.s3_bucket.as_deref().is_none_or(str::is_empty) {
            return Err(ConfigError::Invalid(
                "archive = true needs s3_bucket".into(),
            ));
        }
        if self.retry_delays_secs.contains(&0) {
            return Err(ConfigError::Invalid(
                "retry_delays_secs must all be at least 1".into(),
            ));
        }
        if self.fetch_attempts == 0 {
            return Err(ConfigError::Invalid(
                "fetch_attempts must be at least 1".into(),
            ));
        }
        let keys = self.tic_keys.parse().map_err(ConfigError::Invalid)?;
        if self.signature == SignatureMode::Required && keys.is_empty() {
            return Err(ConfigError::Invalid(
                "signature = required but no tic_keys are configured".into(),
            ));
        }
        Ok(())
    }

    pub fn input_policy(&self) -> InputPolicy {
        InputPolicy {
            mode: self.signature,
            // validate() has parsed it already.
            keys: self.tic_keys.parse().unwrap_or_default(),
            limits: self.limits(),
        }
    }

    pub fn fetch_settings(&self) -> crate::fetch::FetchSettings {
        crate::fetch::FetchSettings {
            connect_timeout: Duration::from_secs(self.fetch_connect_timeout_secs),
            idle_timeout: Duration::from_secs(self.fetch_idle_timeout_secs),
            max_file_bytes: self.max_file_bytes,
            max_resumes: self.fetch_max_resumes,
            url_policy: std::sync::Arc::new(crate::guard::UrlPolicy {
                allowed_hosts: self.vod_allowed_hosts.clone(),
                allow_private_networks: self.vod_allow_private_networks,
            }),
        }
    }

    pub fn retry_policy(&self) -> crate::retry::RetryPolicy {
        crate::retry::RetryPolicy {
            tiers: self
                .retry_delays_secs
                .iter()
                .map(|s| Duration::from_secs(*s))
                .collect(),
            max_age: Duration::from_secs(self.retry_max_age_secs),
        }
    }

    pub fn limits(&self) -> crate::decode::Limits {
        crate::decode::Limits {
            max_body_bytes: self.max_body_bytes,
            max_tracks: self.max_tracks,
            max_string_bytes: self.max_string_bytes,
        }
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error.
mod tests {
    use super::*;

    #[test]
    fn file_then_environment_override_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "lr.toml",
                "concurrency = 4\nwork_queue = \"from-file\"\n[tic_keys]\n1400000001 = \"FILEKEY\"\n",
            )?;
            jail.set_env("LESSON_REPLAY_WORK_QUEUE", "from-env");
            jail.set_env("LESSON_REPLAY_SIGNATURE", "required");
            jail.set_env("LESSON_REPLAY_RETRY_DELAYS_SECS", "1,2,3");
            jail.set_env(
                "LESSON_REPLAY_VOD_ALLOWED_HOSTS",
                "*.vod2.myqcloud.com, cdn.example.org",
            );
            let config = Config::load(Some(Path::new("lr.toml"))).expect("loads");
            assert_eq!(config.retry_delays_secs, [1, 2, 3]);
            assert_eq!(
                config.vod_allowed_hosts,
                ["*.vod2.myqcloud.com", "cdn.example.org"]
            );
            assert_eq!(config.concurrency, 4);
            assert_eq!(config.work_queue, "from-env");
            assert_eq!(config.signature, SignatureMode::Required);
            assert_eq!(config.records_queue, "lesson-replay.records");
            assert_eq!(config.tic_keys.parse().unwrap().len(), 1);
            Ok(())
        });
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("LESSON_REPLAY_AMQP_URL", "amqp://user:hunter2@broker/%2f");
            jail.set_env("LESSON_REPLAY_TIC_KEYS", "1400000001=TOPSECRETKEY");
            jail.set_env("LESSON_REPLAY_S3_SECRET_ACCESS_KEY", "S3SECRETVALUE");
            let config = Config::load(None).expect("loads");
            let shown = format!("{config:?}");
            assert!(
                !shown.contains("hunter2") && !shown.contains("TOPSECRETKEY"),
                "{shown}"
            );
            assert_eq!(config.input_policy().keys.len(), 1);
            Ok(())
        });
    }

    #[test]
    fn unknown_settings_and_bad_values_are_errors() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "concurency = 4\n")?;
            assert!(Config::load(Some(Path::new("bad.toml"))).is_err());
            jail.set_env("LESSON_REPLAY_SIGNATURE", "required");
            assert!(Config::load(None).is_err(), "required without keys");
            Ok(())
        });
    }
}
