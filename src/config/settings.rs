//! The settings: defaults, then an optional TOML file, then `LESSON_REPLAY_*`
//! environment variables (each setting's variable is its name in upper case,
//! e.g. `amqp_url` → `LESSON_REPLAY_AMQP_URL`), validated as a whole at load
//! time so that `lesson-replay config` catches every mistake it can. Secrets
//! are wrapped so that `Debug` and serialized output never show them.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

use crate::broker::amqp::addresses;
use crate::config::apps::{self, Apps, Resolved};
pub use crate::config::forms::{ENV_PREFIX, env_var};
use crate::config::forms::{
    REDACTED, env_text, exposed_list, list, optional_secret, quoted, redacted, redacted_list,
    secret, secret_list,
};
use crate::decision::url_policy::TIC_VOD_HOSTS;
use crate::decision::verify::{SignatureMode, TicKeys};
use crate::media::archive::keys::DEFAULT_PREFIX;
use crate::tic::client::DEFAULT_API_BASE;

/// S3's limits on a multipart part.
const MIN_PART_BYTES: usize = 5 * 1024 * 1024;
/// Delay tiers, at most: each is a queue and a value of a metric label.
const MAX_RETRY_TIERS: usize = 10;
/// Parts of one multipart upload, at most (S3's limit).
const MAX_PARTS: u64 = 10_000;
const MAX_PART_BYTES: usize = 5 * 1024 * 1024 * 1024;

/// Every setting of the product. Each field is described once, in
/// [`SETTINGS`](crate::config::reference::SETTINGS); a test keeps the two equal.
/// Serializing it (as `lesson-replay config` does) redacts the secrets.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    #[serde(serialize_with = "redacted_url", deserialize_with = "secret")]
    pub amqp_url: SecretString,
    pub inbound_exchange: String,
    pub work_queue: String,
    pub parking_queue: String,
    pub records_exchange: String,
    pub records_queue: String,
    pub delivery_limit: u32,
    pub topology_recheck_secs: u64,
    pub concurrency: u16,
    pub signature: SignatureMode,
    pub tic_keys: TicKeysSetting,
    pub shutdown_grace_secs: u64,
    pub log_format: LogFormat,
    pub metrics_addr: String,
    pub probe: bool,
    pub fetch_connect_timeout_secs: u64,
    pub fetch_idle_timeout_secs: u64,
    pub fetch_attempts: usize,
    pub fetch_max_resumes: u32,
    pub max_file_bytes: u64,
    pub archive: bool,
    pub s3_endpoint: Option<String>,
    pub s3_region: String,
    pub s3_force_path_style: bool,
    #[serde(serialize_with = "redacted", deserialize_with = "optional_secret")]
    pub s3_access_key_id: Option<SecretString>,
    #[serde(serialize_with = "redacted", deserialize_with = "optional_secret")]
    pub s3_secret_access_key: Option<SecretString>,
    pub s3_bucket: Option<String>,
    pub s3_prefix: String,
    pub s3_storage_class: Option<String>,
    pub s3_sse: Option<String>,
    pub s3_part_size_bytes: usize,
    pub s3_payload_signing: PayloadSigning,
    pub s3_upload_concurrency: usize,
    pub archive_memory_bytes: u64,
    pub archive_parallel_tracks: usize,
    pub s3_request_timeout_secs: u64,
    pub s3_part_timeout_secs: u64,
    #[serde(deserialize_with = "list")]
    pub retry_delays_secs: Vec<u64>,
    pub retry_max_age_secs: u64,
    pub stage_budget_secs: u64,
    #[serde(deserialize_with = "list")]
    pub vod_allowed_hosts: Vec<String>,
    pub vod_allow_private_networks: bool,
    pub max_body_bytes: usize,
    pub max_tracks: usize,
    pub max_string_bytes: usize,
    pub ingress_addr: String,
    pub ingress_path: String,
    pub ingress_signature: SignatureMode,
    pub ingress_publish_timeout_ms: u64,
    pub ingress_request_timeout_ms: u64,
    pub ingress_header_timeout_ms: u64,
    pub ingress_max_connections: usize,
    pub ingress_drain_secs: u64,
    pub ingress_max_in_flight: usize,
    pub tic_api_base: String,
    pub tic_sign_ttl_secs: u64,
    pub tic_api_timeout_secs: u64,
    pub tic_api_attempts: usize,
    pub watch_lessons: bool,
    pub watch_first_check_secs: u64,
    #[serde(deserialize_with = "list")]
    pub watch_delays_secs: Vec<u64>,
    pub watch_retry_secs: u64,
    pub watch_max_age_secs: u64,
    pub watch_callback_grace_secs: u64,
    pub webhook_url: Option<String>,
    #[serde(serialize_with = "redacted_list", deserialize_with = "secret_list")]
    pub webhook_secrets: Vec<SecretString>,
    pub webhook_queue: String,
    #[serde(deserialize_with = "list")]
    pub webhook_delays_secs: Vec<u64>,
    pub webhook_timeout_secs: u64,
    pub webhook_concurrency: u16,
    pub webhook_max_record_bytes: usize,
    pub apps: Apps,
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
            topology_recheck_secs: 60,
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
            s3_prefix: DEFAULT_PREFIX.into(),
            s3_storage_class: None,
            s3_sse: None,
            s3_part_size_bytes: 8 * 1024 * 1024,
            s3_payload_signing: PayloadSigning::Auto,
            s3_upload_concurrency: 8,
            archive_memory_bytes: 128 * 1024 * 1024,
            archive_parallel_tracks: 4,
            s3_request_timeout_secs: 120,
            s3_part_timeout_secs: 300,
            retry_delays_secs: vec![10, 60, 300, 1800, 7200],
            retry_max_age_secs: 12 * 3600,
            stage_budget_secs: 60,
            vod_allowed_hosts: vec![TIC_VOD_HOSTS.into()],
            vod_allow_private_networks: false,
            max_body_bytes: 1024 * 1024,
            max_tracks: 500,
            max_string_bytes: 4096,
            ingress_addr: "0.0.0.0:8080".into(),
            ingress_path: "/tic/callback".into(),
            ingress_signature: SignatureMode::Off,
            ingress_publish_timeout_ms: 5000,
            ingress_request_timeout_ms: 10_000,
            ingress_header_timeout_ms: 10_000,
            ingress_max_connections: 1024,
            ingress_drain_secs: 15,
            ingress_max_in_flight: 256,
            tic_api_base: DEFAULT_API_BASE.into(),
            tic_sign_ttl_secs: 300,
            tic_api_timeout_secs: 10,
            tic_api_attempts: 3,
            watch_lessons: true,
            watch_first_check_secs: 3600,
            watch_delays_secs: vec![1800, 3600, 7200, 14400],
            watch_retry_secs: 60,
            watch_max_age_secs: 2 * 24 * 3600,
            watch_callback_grace_secs: 20 * 60,
            webhook_url: None,
            webhook_secrets: Vec::new(),
            webhook_queue: "lesson-replay.webhooks".into(),
            // The schedule of the Standard Webhooks specification.
            webhook_delays_secs: vec![5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400],
            webhook_timeout_secs: 15,
            webhook_concurrency: 4,
            webhook_max_record_bytes: 256 * 1024,
            apps: Apps::new(),
        }
    }
}

/// Whether uploads sign their bytes (SigV4's SHA-256 of every part) or send
/// `UNSIGNED-PAYLOAD`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadSigning {
    /// Unsigned over HTTPS (TLS protects the bytes, as AWS's own tools do),
    /// signed over plain HTTP.
    #[default]
    Auto,
    Signed,
    Unsigned,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
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

/// Shown with the sdkappids only: `{"1400000001": "[REDACTED]"}`.
impl Serialize for TicKeysSetting {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let ids: BTreeMap<String, &str> = match self.parse() {
            Ok(keys) => keys.ids().map(|id| (id.to_string(), REDACTED)).collect(),
            Err(_) => BTreeMap::from([("invalid".to_owned(), REDACTED)]),
        };
        ids.serialize(serializer)
    }
}

fn invalid<T>(why: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid(why.into()))
}

/// The broker URL with its password masked: `amqp://user:***@host:5672/%2f`.
fn redacted_url<S: Serializer>(url: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    mask_password(url.expose_secret()).serialize(s)
}

/// `url` without its password; the whole URL is redacted when it cannot be parsed.
pub fn mask_password(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => REDACTED.to_owned(),
    }
}

impl TicKeysSetting {
    pub fn parse(&self) -> Result<TicKeys, String> {
        match self {
            TicKeysSetting::List(list) => TicKeys::parse_list(list.expose_secret()),
            TicKeysSetting::Table(table) => {
                let mut keys = TicKeys::default();
                for (id, key) in table {
                    let id = id.parse().ok().filter(|id: &i64| *id > 0).ok_or_else(|| {
                        "tic_keys: a key of the table is not an sdkappid (a positive integer)"
                            .to_owned()
                    })?;
                    keys.insert(id, key.clone());
                }
                Ok(keys)
            }
        }
    }

    /// The `ID=KEY,...` form, keys exposed (for handing settings to a child process).
    fn as_list(&self) -> String {
        match self {
            TicKeysSetting::List(list) => list.expose_secret().to_owned(),
            TicKeysSetting::Table(table) => table
                .iter()
                .map(|(id, key)| format!("{id}={}", key.expose_secret()))
                .collect::<Vec<_>>()
                .join(","),
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
        // `__` nests: LESSON_REPLAY_APPS__1400000001__S3_BUCKET is apps.1400000001.s3_bucket.
        let env = Env::prefixed(ENV_PREFIX)
            .filter(|key| key != "config" && !key.as_str().starts_with("test_"))
            .split("__");
        figment = figment.merge(env);
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Everything that can be checked without the network, so that
    /// `lesson-replay config` catches it before a deploy does. [`Config::load`]
    /// calls it; so does every service, for settings built in code.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_counts()?;
        self.validate_addresses()?;
        self.validate_archive()?;
        apps::validate(
            &self.apps,
            &self.defaults(),
            self.tic_keys.parse().ok().as_ref(),
        )
        .map_err(ConfigError::Invalid)?;
        if let Some(url) = &self.webhook_url {
            apps::check_webhook(url, &self.webhook_secrets)
                .map_err(|why| ConfigError::Invalid(format!("webhook_url: {why}")))?;
        } else if !self.webhook_secrets.is_empty() {
            return invalid(
                "webhook_secrets is set but webhook_url is not: secrets belong to their endpoint",
            );
        }
        let keys = self.keys().map_err(ConfigError::Invalid)?;
        if self.signature == SignatureMode::Required && keys.is_empty() {
            return invalid("signature = required but no tic_keys are configured");
        }
        if self.vod_allowed_hosts.is_empty() {
            return invalid("vod_allowed_hosts is empty: no recording could ever be fetched");
        }
        if self.ingress_signature != SignatureMode::Off && keys.is_empty() {
            // TIC signs every callback: without keys, every one would be refused.
            return invalid("ingress_signature judges signatures but no tic_keys are configured");
        }
        let path_ok = self.ingress_path.starts_with('/')
            && self
                .ingress_path
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "/-_.".contains(c));
        if !path_ok {
            return invalid(format!(
                "ingress_path {:?} must start with / and hold only letters, digits, /, -, _ and .",
                self.ingress_path
            ));
        }
        if !matches!(url::Url::parse(&self.tic_api_base), Ok(u) if matches!(u.scheme(), "http" | "https"))
        {
            return invalid(format!(
                "tic_api_base {:?} is not an http(s) URL",
                self.tic_api_base
            ));
        }
        Ok(())
    }

    /// Counts, sizes and durations that make no sense at zero.
    fn validate_counts(&self) -> Result<(), ConfigError> {
        for (name, value) in [
            ("concurrency", u64::from(self.concurrency)),
            ("delivery_limit", u64::from(self.delivery_limit)),
            ("topology_recheck_secs", self.topology_recheck_secs),
            ("fetch_attempts", self.fetch_attempts as u64),
            (
                "fetch_connect_timeout_secs",
                self.fetch_connect_timeout_secs,
            ),
            ("fetch_idle_timeout_secs", self.fetch_idle_timeout_secs),
            ("max_file_bytes", self.max_file_bytes),
            ("s3_upload_concurrency", self.s3_upload_concurrency as u64),
            (
                "archive_parallel_tracks",
                self.archive_parallel_tracks as u64,
            ),
            ("s3_request_timeout_secs", self.s3_request_timeout_secs),
            ("s3_part_timeout_secs", self.s3_part_timeout_secs),
            ("max_body_bytes", self.max_body_bytes as u64),
            ("max_tracks", self.max_tracks as u64),
            ("max_string_bytes", self.max_string_bytes as u64),
            ("retry_max_age_secs", self.retry_max_age_secs),
            (
                "ingress_publish_timeout_ms",
                self.ingress_publish_timeout_ms,
            ),
            (
                "ingress_request_timeout_ms",
                self.ingress_request_timeout_ms,
            ),
            ("ingress_header_timeout_ms", self.ingress_header_timeout_ms),
            (
                "ingress_max_connections",
                self.ingress_max_connections as u64,
            ),
            ("ingress_max_in_flight", self.ingress_max_in_flight as u64),
            ("tic_sign_ttl_secs", self.tic_sign_ttl_secs),
            ("tic_api_timeout_secs", self.tic_api_timeout_secs),
            ("tic_api_attempts", self.tic_api_attempts as u64),
            ("watch_first_check_secs", self.watch_first_check_secs),
            ("watch_retry_secs", self.watch_retry_secs),
            ("watch_max_age_secs", self.watch_max_age_secs),
            ("webhook_timeout_secs", self.webhook_timeout_secs),
            ("webhook_concurrency", u64::from(self.webhook_concurrency)),
        ] {
            if value == 0 {
                return invalid(format!("{name} must be at least 1"));
            }
        }
        // Each delay is a queue and a value of the `tier` metric label.
        if self.retry_delays_secs.len() > MAX_RETRY_TIERS {
            return invalid(format!(
                "retry_delays_secs has {} delays: at most {MAX_RETRY_TIERS}",
                self.retry_delays_secs.len()
            ));
        }
        if self.retry_delays_secs.contains(&0) {
            return invalid("retry_delays_secs must all be at least 1");
        }
        if self.webhook_delays_secs.len() > MAX_RETRY_TIERS
            || self.webhook_delays_secs.is_empty()
            || self.webhook_delays_secs.contains(&0)
        {
            return invalid(format!(
                "webhook_delays_secs needs 1 to {MAX_RETRY_TIERS} delays, each at least 1"
            ));
        }
        if self.watch_delays_secs.is_empty() || self.watch_delays_secs.contains(&0) {
            return invalid("watch_delays_secs needs at least one delay, each at least 1");
        }
        Ok(())
    }

    /// The broker URL as the AMQP client will read it, and the listener.
    fn validate_addresses(&self) -> Result<(), ConfigError> {
        let urls = addresses(self.amqp_url.expose_secret());
        if urls.is_empty() {
            return invalid("amqp_url is empty: one AMQP URL, or several separated by commas");
        }
        for (n, url) in urls.iter().enumerate() {
            if let Err(why) = lapin::uri::AMQPUri::from_str(url) {
                // The parser may quote the URL: never echo its password.
                let why = why.replace(url, REDACTED);
                return invalid(format!(
                    "amqp_url: address {} of {} is not a valid AMQP URL: {why}",
                    n + 1,
                    urls.len()
                ));
            }
        }
        let has_port = |addr: &str| {
            addr.rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
        };
        let addr = self.metrics_addr.trim();
        if !addr.is_empty() && !has_port(addr) {
            return invalid(format!(
                "metrics_addr {addr:?} is not HOST:PORT, like 0.0.0.0:9090 (empty: no listener)"
            ));
        }
        if !has_port(self.ingress_addr.trim()) {
            return invalid(format!(
                "ingress_addr {:?} is not HOST:PORT, like 0.0.0.0:8080",
                self.ingress_addr
            ));
        }
        Ok(())
    }

    fn validate_archive(&self) -> Result<(), ConfigError> {
        if self.archive && self.s3_bucket.as_deref().is_none_or(str::is_empty) {
            return invalid("archive = true needs s3_bucket");
        }
        if !(MIN_PART_BYTES..=MAX_PART_BYTES).contains(&self.s3_part_size_bytes) {
            return invalid(
                "s3_part_size_bytes must be between 5 MiB and 5 GiB (S3's part limits)",
            );
        }
        // S3 allows 10 000 parts: a larger file would fail at part 10 001,
        // after the transfer of 10 000 parts.
        let largest = self.s3_part_size_bytes as u64 * MAX_PARTS;
        let any_archives = self.archive
            || self
                .app_ids()
                .into_iter()
                .any(|app| self.resolved(Some(app)).archive);
        if any_archives && self.max_file_bytes > largest {
            return invalid(format!(
                "max_file_bytes ({}) is more than s3_part_size_bytes x 10 000 ({largest}), \
                 the largest object a multipart upload can hold: raise s3_part_size_bytes \
                 or lower max_file_bytes",
                self.max_file_bytes
            ));
        }
        if (self.archive_memory_bytes as u128) < self.s3_part_size_bytes as u128 {
            return invalid(
                "archive_memory_bytes must hold at least one part of s3_part_size_bytes",
            );
        }
        if self.s3_access_key_id.is_some() != self.s3_secret_access_key.is_some() {
            return invalid("set both s3_access_key_id and s3_secret_access_key, or neither");
        }
        if let Some(endpoint) = &self.s3_endpoint
            && !matches!(url::Url::parse(endpoint), Ok(u) if matches!(u.scheme(), "http" | "https"))
        {
            return invalid(format!("s3_endpoint {endpoint:?} is not an http(s) URL"));
        }
        Ok(())
    }

    /// Every setting as the environment variable that sets it, secrets
    /// included: how a parent process (a test, a supervisor) hands a child
    /// exactly this configuration.
    pub fn to_environment(&self) -> Vec<(String, String)> {
        let Ok(serde_json::Value::Object(values)) = serde_json::to_value(self) else {
            unreachable!("Config serializes to an object");
        };
        let mut out = Vec::new();
        for (name, value) in values {
            if name == "apps" {
                continue;
            }
            let text = match self.exposed_secret(&name) {
                Some(exposed) => exposed.map(|text| quoted(&text)),
                None => env_text(&value),
            };
            if let Some(text) = text {
                out.push((env_var(&name), text));
            }
        }
        out.extend(apps::environment(&self.apps, &self.defaults()));
        out
    }

    /// Every TicKey: `tic_keys` and each app's `tic_key`.
    pub fn keys(&self) -> Result<TicKeys, String> {
        let mut keys = self.tic_keys.parse()?;
        for (app, key) in apps::keys(&self.apps) {
            keys.insert(app, key.clone());
        }
        Ok(keys)
    }

    /// The sdkappids with an `[apps.<sdkappid>]` table, in order.
    pub fn app_ids(&self) -> Vec<i64> {
        apps::ids(&self.apps)
    }

    /// The settings of app `sdkappid` (`None`: the default, for apps without
    /// a table and messages without an app).
    pub fn resolved(&self, sdkappid: Option<i64>) -> Resolved {
        let table = sdkappid.and_then(|id| self.apps.get(&id.to_string()));
        apps::resolve(table, &self.defaults())
    }

    /// What every app's table falls back on.
    fn defaults(&self) -> apps::Defaults<'_> {
        apps::Defaults {
            archive: self.archive,
            concurrency: self.concurrency,
            s3_bucket: self.s3_bucket.as_deref(),
            s3_prefix: &self.s3_prefix,
            s3_endpoint: self.s3_endpoint.as_deref(),
            s3_region: &self.s3_region,
            s3_force_path_style: self.s3_force_path_style,
            s3_storage_class: self.s3_storage_class.as_deref(),
            s3_sse: self.s3_sse.as_deref(),
            credentials: self
                .s3_access_key_id
                .as_ref()
                .zip(self.s3_secret_access_key.as_ref()),
            webhook_url: self.webhook_url.as_deref(),
            webhook_secrets: &self.webhook_secrets,
        }
    }

    /// The value of a secret setting (`Some(None)`: unset); `None` for a
    /// setting that is not secret. A test checks this knows every setting
    /// the reference marks secret.
    pub(crate) fn exposed_secret(&self, name: &str) -> Option<Option<String>> {
        let exposed = |s: &Option<SecretString>| s.as_ref().map(|s| s.expose_secret().to_owned());
        match name {
            "amqp_url" => Some(Some(self.amqp_url.expose_secret().to_owned())),
            "tic_keys" => Some(Some(self.tic_keys.as_list())),
            "s3_access_key_id" => Some(exposed(&self.s3_access_key_id)),
            "s3_secret_access_key" => Some(exposed(&self.s3_secret_access_key)),
            "webhook_secrets" => Some(exposed_list(&self.webhook_secrets)),
            _ => None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error.
mod tests {
    use super::*;

    #[test]
    fn a_file_limit_beyond_ten_thousand_parts_is_refused_when_archiving() {
        let mut config = Config {
            archive: true,
            s3_bucket: Some("b".into()),
            s3_part_size_bytes: 5 * 1024 * 1024,
            max_file_bytes: 5 * 1024 * 1024 * 10_000,
            ..Config::default()
        };
        assert!(config.validate().is_ok(), "exactly 10 000 parts fit");
        config.max_file_bytes += 1;
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("max_file_bytes") && err.contains("s3_part_size_bytes"),
            "{err}"
        );
        config.archive = false;
        assert!(config.validate().is_ok(), "only archiving has the limit");
        config.archive = true;
        config.s3_part_size_bytes = 8 * 1024 * 1024;
        assert!(config.validate().is_ok(), "larger parts hold the file");
        config.archive_memory_bytes = 1024;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("archive_memory_bytes"), "{err}");
    }

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
    fn secrets_stay_out_of_debug_and_printed_output() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("LESSON_REPLAY_AMQP_URL", "amqp://user:hunter2@broker/%2f");
            jail.set_env("LESSON_REPLAY_TIC_KEYS", "1400000001=TOPSECRETKEY");
            jail.set_env("LESSON_REPLAY_S3_ACCESS_KEY_ID", "S3KEYIDVALUE");
            jail.set_env("LESSON_REPLAY_S3_SECRET_ACCESS_KEY", "S3SECRETVALUE");
            let config = Config::load(None).expect("loads");
            let debug = format!("{config:?}");
            let printed = serde_json::to_string(&config).unwrap();
            for shown in [&debug, &printed] {
                for secret in ["hunter2", "TOPSECRETKEY", "S3KEYIDVALUE", "S3SECRETVALUE"] {
                    assert!(!shown.contains(secret), "{secret} in {shown}");
                }
            }
            // What an operator needs to check them is still there.
            assert!(printed.contains("amqp://user:***@broker/%2f"), "{printed}");
            assert!(
                printed.contains(r#""1400000001":"[REDACTED]""#),
                "{printed}"
            );
            assert_eq!(config.input_policy().keys.len(), 1);
            Ok(())
        });
    }

    #[test]
    fn the_environment_form_gives_back_the_same_settings() {
        let config = Config {
            amqp_url: SecretString::from("amqp://u:p%40ss@broker:5673/vh"),
            tic_keys: TicKeysSetting::List(SecretString::from("1400000001=K1,1400000002=K2")),
            s3_access_key_id: Some(SecretString::from("id")),
            s3_secret_access_key: Some(SecretString::from("secret")),
            archive: true,
            s3_bucket: Some("2024".into()),
            s3_prefix: "true".into(),
            retry_delays_secs: vec![1, 2],
            vod_allowed_hosts: vec!["a.example".into(), "*.b.example".into()],
            signature: SignatureMode::Required,
            metrics_addr: String::new(),
            ..Config::default()
        };
        let env = config.to_environment();
        figment::Jail::expect_with(|jail| {
            for (name, value) in &env {
                jail.set_env(name, value);
            }
            let loaded = Config::load(None).expect("loads");
            assert_eq!(
                serde_json::to_value(&loaded).unwrap(),
                serde_json::to_value(&config).unwrap()
            );
            assert_eq!(
                loaded.amqp_url.expose_secret(),
                "amqp://u:p%40ss@broker:5673/vh"
            );
            assert_eq!(
                loaded
                    .s3_secret_access_key
                    .as_ref()
                    .map(|s| s.expose_secret()),
                Some("secret")
            );
            assert_eq!(loaded.input_policy().keys.len(), 2);
            Ok(())
        });
    }

    /// The error message of loading with `name` = `value`.
    fn load_error(name: &str, value: &str) -> String {
        let mut message = String::new();
        figment::Jail::expect_with(|jail| {
            jail.set_env(name, value);
            message = Config::load(None).expect_err(name).to_string();
            Ok(())
        });
        message
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

    #[test]
    fn what_can_be_checked_at_load_time_is() {
        let half = load_error("LESSON_REPLAY_S3_ACCESS_KEY_ID", "id-only");
        assert!(
            half.contains("both s3_access_key_id and s3_secret_access_key"),
            "{half}"
        );
        let query = load_error(
            "LESSON_REPLAY_AMQP_URL",
            "amqp://u:hunter2@broker/%2f?heartbeat=often",
        );
        assert!(
            query.contains("amqp_url: address 1 of 1 is not a valid AMQP URL"),
            "{query}"
        );
        let second = load_error(
            "LESSON_REPLAY_AMQP_URL",
            "amqp://u:hunter2@a/%2f,amqp://u:hunter2@b:nope/%2f",
        );
        assert!(
            second.contains("address 2 of 2") && !second.contains("hunter2"),
            "{second}"
        );
        let empty = load_error("LESSON_REPLAY_AMQP_URL", " , ");
        assert!(empty.contains("amqp_url is empty"), "{empty}");
        assert!(
            !query.contains("hunter2"),
            "the password is echoed: {query}"
        );
        let scheme = load_error("LESSON_REPLAY_AMQP_URL", "http://u:hunter2@broker/");
        assert!(
            scheme.contains("amqp_url") && !scheme.contains("hunter2"),
            "{scheme}"
        );
        let part = load_error("LESSON_REPLAY_S3_PART_SIZE_BYTES", "6000000000");
        assert!(part.contains("s3_part_size_bytes"), "{part}");
        let small = load_error("LESSON_REPLAY_S3_PART_SIZE_BYTES", "1024");
        assert!(small.contains("s3_part_size_bytes"), "{small}");
        let addr = load_error("LESSON_REPLAY_METRICS_ADDR", "localhost");
        assert!(addr.contains("metrics_addr"), "{addr}");
        let endpoint = load_error("LESSON_REPLAY_S3_ENDPOINT", "minio:9000");
        assert!(endpoint.contains("s3_endpoint"), "{endpoint}");
        let zero = load_error("LESSON_REPLAY_MAX_TRACKS", "0");
        assert!(zero.contains("max_tracks"), "{zero}");
    }
}
