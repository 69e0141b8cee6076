//! The one description of every setting: its name, what it means, whether it
//! is a secret. The `--help` text and the table in `docs/configuration.md`
//! are generated from [`SETTINGS`] with the defaults of
//! [`Config::default`](crate::config::settings::Config), and tests fail when
//! the table, the struct and the documentation drift apart.

use serde_json::Value;

use crate::config::settings::{Config, env_var};

/// One setting, as documented.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// The TOML key; the environment variable is `LESSON_REPLAY_` + the name in upper case.
    pub name: &'static str,
    pub meaning: &'static str,
    /// Never logged, never printed: redacted by `lesson-replay config`.
    pub secret: bool,
}

const fn setting(name: &'static str, meaning: &'static str) -> Setting {
    Setting {
        name,
        meaning,
        secret: false,
    }
}

const fn secret(name: &'static str, meaning: &'static str) -> Setting {
    Setting {
        name,
        meaning,
        secret: true,
    }
}

/// Every setting, in documentation order.
pub const SETTINGS: &[Setting] = &[
    secret(
        "amqp_url",
        "broker URL; several, comma-separated, for the nodes of a cluster (tried in a shuffled order per process)",
    ),
    setting(
        "inbound_exchange",
        "topic exchange the callback service publishes TIC messages to",
    ),
    setting(
        "work_queue",
        "the quorum queue workers consume, bound to `inbound_exchange` with `#`",
    ),
    setting("parking_queue", "rejected messages, with their reason"),
    setting(
        "records_exchange",
        "topic exchange records are published to",
    ),
    setting(
        "records_queue",
        "bound to `records_exchange` with `#`: keeps records before any consumer binds",
    ),
    setting(
        "delivery_limit",
        "deliveries of one message before the broker parks it (`delivery_limit` in `dlq list`)",
    ),
    setting(
        "topology_recheck_secs",
        "how often a worker or ingress whose topology the broker refuses (not ready, the reason in `/readyz`) declares it again, so an operator's fix needs no restart",
    ),
    setting(
        "concurrency",
        "messages in flight per worker (the consumer prefetch)",
    ),
    setting(
        "signature",
        "`required`, `if-present` or `off`: when a TIC signature is demanded",
    ),
    secret(
        "tic_keys",
        "TicKeys per sdkappid: `SDKAPPID=TICKEY,...` in the environment, a `[tic_keys]` table in TOML",
    ),
    setting(
        "shutdown_grace_secs",
        "time in-flight messages get on shutdown (below Kubernetes' 30 s)",
    ),
    setting(
        "log_format",
        "`json`, `text`, or `auto` (JSON unless stderr is a terminal); level from `RUST_LOG`",
    ),
    setting(
        "metrics_addr",
        "`/metrics`, `/healthz`, `/readyz` listener; empty to disable",
    ),
    setting(
        "probe",
        "probe every track's MP4 for its real duration and picture size",
    ),
    setting(
        "fetch_connect_timeout_secs",
        "seconds to connect to the VOD origin",
    ),
    setting(
        "fetch_idle_timeout_secs",
        "longest wait, in seconds, for response headers or the next chunk",
    ),
    setting(
        "fetch_attempts",
        "attempts per file within one delivery (exponential backoff, jitter)",
    ),
    setting(
        "fetch_max_resumes",
        "range resumes within one download attempt",
    ),
    setting(
        "max_file_bytes",
        "larger files are refused (`file_too_large`)",
    ),
    setting("archive", "copy every track into the S3-compatible bucket"),
    setting(
        "s3_endpoint",
        "endpoint URL of a non-AWS store, e.g. `http://minio:9000`; unset: AWS",
    ),
    setting("s3_region", "region"),
    setting(
        "s3_force_path_style",
        "path-style addressing (`endpoint/bucket/key`); `true` for MinIO and most non-AWS stores",
    ),
    secret(
        "s3_access_key_id",
        "static credentials, set with `s3_secret_access_key` or not at all; unset: the standard AWS chain",
    ),
    secret("s3_secret_access_key", "the secret of `s3_access_key_id`"),
    setting("s3_bucket", "the bucket (required with `archive`)"),
    setting("s3_prefix", "key prefix of every object"),
    setting(
        "s3_storage_class",
        "e.g. `STANDARD_IA`; unset: the bucket's default",
    ),
    setting(
        "s3_sse",
        "server-side encryption: `AES256` or `aws:kms`; unset: none requested",
    ),
    setting(
        "s3_part_size_bytes",
        "multipart part size: 5 MiB to 5 GiB (at most 16 MiB for MinIO)",
    ),
    setting(
        "s3_payload_signing",
        "`auto` (unsigned over HTTPS, where TLS protects the bytes; signed over plain HTTP), `signed` or `unsigned`: whether uploads hash every byte for SigV4 (SHA-256, about a CPU-second per GB) or send `UNSIGNED-PAYLOAD`",
    ),
    setting(
        "s3_upload_concurrency",
        "parts of one file in flight at once: range requests to the VOD origin and part uploads to the store, side by side (one file is not capped by one connection)",
    ),
    setting(
        "archive_memory_bytes",
        "all part buffers of all uploads of the worker together, at most (at least one part); an upload waits for room before it reads its next part, so one lesson gets the whole budget and many share it",
    ),
    setting(
        "archive_parallel_tracks",
        "tracks of one lesson archived side by side, within the same memory budget",
    ),
    setting(
        "s3_request_timeout_secs",
        "longest wait for one S3 request without a large body (HEAD, create, complete, manifest, list, abort), per attempt",
    ),
    setting(
        "s3_part_timeout_secs",
        "longest wait for one part upload (or a small file's single PUT), per attempt; also paces the upload journal: an entry's lease is two of it, renewed every third of it, and the journal is swept every one of it",
    ),
    setting(
        "retry_delays_secs",
        "delay tiers of broker-level retries, comma-separated (changing them adds tier queues)",
    ),
    setting(
        "retry_max_age_secs",
        "a message failing for longer is parked",
    ),
    setting(
        "stage_budget_secs",
        "longest total backoff of one stage's in-process retries",
    ),
    setting(
        "vod_allowed_hosts",
        "hosts VOD files may come from: exact names or `*.suffix`, comma-separated",
    ),
    setting(
        "vod_allow_private_networks",
        "allow VOD hosts resolving to loopback, private, link-local addresses (SSRF risk)",
    ),
    setting(
        "max_body_bytes",
        "larger messages are parked (`body_too_large`)",
    ),
    setting(
        "max_tracks",
        "recordings with more video files are parked (`too_many_tracks`)",
    ),
    setting(
        "max_string_bytes",
        "longer strings in a message are parked (`field_too_long`)",
    ),
    setting(
        "ingress_addr",
        "where `lesson-replay ingress` listens for TIC's callbacks (`max_body_bytes` bounds each: 413)",
    ),
    setting(
        "ingress_path",
        "the callback path registered with TIC (`tic set-callback`)",
    ),
    setting(
        "ingress_signature",
        "`off` (the worker judges signatures), `if-present` or `required`: refuse bad signatures at the edge (401)",
    ),
    setting(
        "ingress_publish_timeout_ms",
        "longest wait for the broker's confirm before TIC is answered 503 (and retries)",
    ),
    setting(
        "ingress_request_timeout_ms",
        "longest time one callback may take, body included (408 beyond)",
    ),
    setting(
        "ingress_header_timeout_ms",
        "longest wait for a request's headers, and for the next request on an idle keep-alive connection: a slow or idle client's connection is closed then",
    ),
    setting(
        "ingress_max_connections",
        "open connections of the ingress at most; more wait in the listen backlog until one closes",
    ),
    setting(
        "ingress_drain_secs",
        "after SIGTERM: not ready at once (`/readyz` 503), still serving this long so that a load balancer takes the endpoint out before the listener closes; then in-flight callbacks finish (Kubernetes: keep `terminationGracePeriodSeconds` above this + `ingress_request_timeout_ms`)",
    ),
    setting(
        "ingress_max_in_flight",
        "callbacks handled at once; more are answered 503 at once, never queued in memory",
    ),
    setting("tic_api_base", "base URL of TIC's real-time recording API"),
    setting(
        "tic_sign_ttl_secs",
        "`expire_time` of API requests = now + this",
    ),
    setting(
        "watch_lessons",
        "watch every recording under way (a `record_started` callback) until its record exists, asking TIC (`query`); needs the app's key in `tic_keys`",
    ),
    setting(
        "watch_first_check_secs",
        "first query of a watched task, after its start",
    ),
    setting(
        "watch_delays_secs",
        "the following queries while the task is still recording, comma-separated; the last repeats",
    ),
    setting(
        "watch_retry_secs",
        "the next query after a transient failure (timeout, 5xx, TIC's 20099)",
    ),
    setting(
        "watch_max_age_secs",
        "a task still unfinished this long after its start is parked (`watch_expired`)",
    ),
    setting(
        "watch_callback_grace_secs",
        "a finished task without a record is checked again if it stopped less than this ago: its callback may be on its way (TIC retries for 10 min)",
    ),
    setting(
        "tic_api_timeout_secs",
        "longest wait for one answer of TIC's API",
    ),
    setting(
        "tic_api_attempts",
        "attempts of one call to TIC's API (commands and watches), transient failures retried with backoff; answers larger than 1 MiB are refused unread",
    ),
    setting(
        "webhook_url",
        "where `lesson.replay_ready` and `lesson.replay_failed` events are POSTed (http or https), signed as Standard Webhooks says; unset: no webhooks (docs/operations.md, \"Webhooks\")",
    ),
    secret(
        "webhook_secrets",
        "the endpoint's secrets, `whsec_` + base64 of 24–64 random bytes, comma-separated; each signs every event (several while one is rotated)",
    ),
    setting(
        "webhook_queue",
        "the quorum queue of events waiting to be sent (with a lane per app and delay queues `.retry.<N>s`); declared only when a webhook URL is set",
    ),
    setting(
        "webhook_delays_secs",
        "the waits after each failed attempt, comma-separated (each is a queue; up to 20 % shorter, at random); after the last the event is parked as `webhook_failed`",
    ),
    setting(
        "webhook_timeout_secs",
        "longest attempt: connecting, sending and reading the answer (its body read to 64 KiB, then dropped)",
    ),
    setting(
        "webhook_concurrency",
        "events sent at once per lane per worker: a slow endpoint holds at most this many of one app's",
    ),
    setting(
        "webhook_max_record_bytes",
        "a record larger than this as JSON is not carried by `lesson.replay_ready`: `data.record` is null and `data.manifest_uri` says where the archive keeps it (a 16-track lesson's record is 24–28 KB, a 58-track one's 187 KB)",
    ),
    setting(
        "apps",
        "one table per TIC app, `[apps.<sdkappid>]`, with the settings below that differ for it; each app with a table gets a lane of its own (docs/operations.md, \"Many apps\")",
    ),
];

/// What an `[apps.<sdkappid>]` table may set; each field left out is the
/// top-level setting of the same name.
pub const APP_SETTINGS: &[Setting] = &[
    secret(
        "tic_key",
        "the app's TicKey (the same as its entry in `tic_keys`; either place)",
    ),
    setting("archive", "whether the app's recordings are archived"),
    setting(
        "concurrency",
        "messages of the app in flight per worker (its lane's prefetch)",
    ),
    setting("s3_bucket", "the app's bucket"),
    setting("s3_prefix", "key prefix in the app's bucket"),
    setting(
        "s3_endpoint",
        "the app's store; an app naming a store of its own must have its own credentials",
    ),
    setting("s3_region", "the app's region"),
    setting(
        "s3_force_path_style",
        "path-style requests to the app's store",
    ),
    setting("s3_storage_class", "storage class of the app's objects"),
    setting("s3_sse", "server-side encryption of the app's objects"),
    secret("s3_access_key_id", "the app's access key id"),
    secret("s3_secret_access_key", "the app's secret access key"),
    setting(
        "webhook_url",
        "the app's webhook endpoint; an app naming its own must have its own secrets",
    ),
    secret("webhook_secrets", "the secrets of the app's endpoint"),
];

/// The environment variable of an app's setting.
pub fn app_env_var(name: &str) -> String {
    format!(
        "{}__<SDKAPPID>__{}",
        env_var("apps"),
        name.to_ascii_uppercase()
    )
}

/// The defaults, as `lesson-replay config` would print them.
fn defaults() -> serde_json::Map<String, Value> {
    match serde_json::to_value(Config::default()) {
        Ok(Value::Object(map)) => map,
        _ => unreachable!("Config serializes to an object"),
    }
}

/// A default value as a person writes it.
fn show(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "unset".into(),
        Some(Value::String(s)) if s.is_empty() => "empty".into(),
        Some(Value::Array(items)) if items.is_empty() => "none".into(),
        Some(Value::String(s)) => format!("`{s}`"),
        Some(Value::Array(items)) => {
            let items: Vec<String> = items
                .iter()
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                .collect();
            format!("`{}`", items.join(","))
        }
        Some(Value::Object(map)) if map.is_empty() => "none".into(),
        Some(other) => format!("`{other}`"),
    }
}

/// The settings table of `docs/configuration.md`.
pub fn markdown_table() -> String {
    let defaults = defaults();
    let mut out =
        String::from("| setting | environment | default | meaning |\n|---|---|---|---|\n");
    for s in SETTINGS {
        let meaning = if s.secret {
            format!("{} (secret: never logged or printed)", s.meaning)
        } else {
            s.meaning.to_owned()
        };
        out.push_str(&format!(
            "| `{}` | `{}` | {} | {meaning} |\n",
            s.name,
            env_var(s.name),
            show(defaults.get(s.name)),
        ));
    }
    out.push_str(
        "\nIn an `[apps.<sdkappid>]` table (unset: the top-level setting of the same name):\n\n\
         | app setting | environment | meaning |\n|---|---|---|\n",
    );
    for s in APP_SETTINGS {
        let secret = if s.secret { " (secret)" } else { "" };
        out.push_str(&format!(
            "| `{}` | `{}` | {}{secret} |\n",
            s.name,
            app_env_var(s.name),
            s.meaning
        ));
    }
    out
}

/// The settings part of `--help`: every variable, its default and meaning.
pub fn help_text() -> String {
    let defaults = defaults();
    let mut out = String::from(
        "Settings come from defaults, then the TOML file given by --config, then\n\
         LESSON_REPLAY_* environment variables (docs/configuration.md has the table):\n",
    );
    for s in SETTINGS {
        let default = show(defaults.get(s.name)).replace('`', "");
        let meaning = s.meaning.replace('`', "");
        let secret = if s.secret { " (secret)" } else { "" };
        out.push_str(&format!(
            "  {} [{default}]{secret}\n      {meaning}\n",
            env_var(s.name)
        ));
    }
    out.push_str("  In an [apps.<sdkappid>] table, each unset is the setting above:\n");
    for s in APP_SETTINGS {
        let secret = if s.secret { " (secret)" } else { "" };
        out.push_str(&format!(
            "  {}{secret}\n      {}\n",
            app_env_var(s.name),
            s.meaning.replace('`', "")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::settings::env_var;

    /// The field names of `Config`, as serde sees them.
    fn config_fields() -> Vec<String> {
        defaults().keys().cloned().collect()
    }

    #[test]
    fn every_field_is_documented_once_and_nothing_else() {
        let mut documented: Vec<String> = SETTINGS.iter().map(|s| s.name.to_owned()).collect();
        let count = documented.len();
        documented.sort();
        documented.dedup();
        assert_eq!(documented.len(), count, "a setting is documented twice");
        let mut fields = config_fields();
        fields.sort();
        assert_eq!(documented, fields);
        let mut app_documented: Vec<&str> = APP_SETTINGS.iter().map(|s| s.name).collect();
        app_documented.sort();
        let app_fields = match serde_json::to_value(crate::config::apps::AppSettings::default()) {
            Ok(Value::Object(map)) => map.keys().cloned().collect::<Vec<_>>(),
            _ => unreachable!("AppSettings serializes to an object"),
        };
        assert_eq!(app_documented, app_fields);
    }

    #[test]
    fn the_documentation_table_is_the_generated_one() {
        let doc = include_str!("../../docs/configuration.md");
        let begin = "<!-- settings:begin -->\n";
        let end = "<!-- settings:end -->";
        let start = doc
            .find(begin)
            .expect("docs/configuration.md has the begin marker")
            + begin.len();
        let stop = doc
            .find(end)
            .expect("docs/configuration.md has the end marker");
        assert_eq!(
            &doc[start..stop],
            markdown_table(),
            "regenerate with: lesson-replay config --reference (between the markers)"
        );
    }

    #[test]
    fn secrets_never_show_their_default_value() {
        let text = help_text();
        assert!(!text.contains("guest:guest"), "{text}");
        assert!(text.contains("LESSON_REPLAY_AMQP_URL"));
        assert!(
            text.contains("[amqp://guest:***@127.0.0.1:5672/%2f]"),
            "{text}"
        );
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error.
    fn every_secret_setting_is_hidden_when_shown_and_kept_when_handed_on() {
        // What each secret holds, found again by its mark.
        let mark = |name: &str| match name {
            // A webhook secret is base64: no `-` or `_` in it.
            "webhook_secrets" => "SENTINELwebhooksecrets0000000000".to_owned(),
            other => format!("SENTINEL-{other}"),
        };
        let sentinel = |name: &str| match name {
            "amqp_url" => "amqp://user:SENTINEL-amqp_url@broker/%2f".to_owned(),
            "tic_keys" => "1400000001=SENTINEL-tic_keys".to_owned(),
            "webhook_secrets" => format!("whsec_{}", mark(name)),
            other => mark(other),
        };
        figment::Jail::expect_with(|jail| {
            let secrets: Vec<&Setting> = SETTINGS.iter().filter(|s| s.secret).collect();
            assert!(secrets.len() >= 4);
            for s in &secrets {
                jail.set_env(env_var(s.name), sentinel(s.name));
            }
            jail.set_env(env_var("webhook_url"), "https://school.example/hooks");
            let config = Config::load(None).expect("loads");
            let shown = [
                format!("{config:?}"),
                serde_json::to_string(&config).unwrap(),
            ];
            for s in &secrets {
                let exposed = config
                    .exposed_secret(s.name)
                    .unwrap_or_else(|| panic!("{} is secret but not known as such", s.name))
                    .expect("set");
                assert!(exposed.contains(&mark(s.name)), "{exposed}");
                for text in &shown {
                    assert!(!text.contains("SENTINEL"), "{} shown: {text}", s.name);
                }
            }
            let env = config.to_environment();
            for s in &secrets {
                let (_, value) = env.iter().find(|(k, _)| *k == env_var(s.name)).unwrap();
                assert!(value.contains(&mark(s.name)), "{value}");
            }
            Ok(())
        });
    }
}
