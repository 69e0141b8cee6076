//! Per-app settings: one `[apps.<sdkappid>]` table per TIC app (or
//! `LESSON_REPLAY_APPS__<SDKAPPID>__<FIELD>` in the environment, the form a
//! Kubernetes Secret's keys take) holding what differs between apps — its
//! TicKey, whether to archive, and where. A field left out is the top-level
//! setting of the same name: the top level is the default of every app.
//!
//! One rule guards the credentials: an app that names a store of its own
//! (`s3_endpoint`) and no credentials is refused, so the default
//! credentials are never sent to another store.

use std::collections::BTreeMap;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::config::forms::{ENV_PREFIX, env_text, exposed_list, quoted};
use crate::decision::verify::TicKeys;

/// What one app overrides. Every field is optional: unset, the top-level
/// setting of the same name applies.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AppSettings {
    #[serde(
        serialize_with = "crate::config::forms::redacted",
        deserialize_with = "crate::config::forms::optional_secret"
    )]
    pub tic_key: Option<SecretString>,
    pub archive: Option<bool>,
    pub concurrency: Option<u16>,
    pub s3_bucket: Option<String>,
    pub s3_prefix: Option<String>,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub s3_force_path_style: Option<bool>,
    pub s3_storage_class: Option<String>,
    pub s3_sse: Option<String>,
    #[serde(
        serialize_with = "crate::config::forms::redacted",
        deserialize_with = "crate::config::forms::optional_secret"
    )]
    pub s3_access_key_id: Option<SecretString>,
    #[serde(
        serialize_with = "crate::config::forms::redacted",
        deserialize_with = "crate::config::forms::optional_secret"
    )]
    pub s3_secret_access_key: Option<SecretString>,
    pub webhook_url: Option<String>,
    #[serde(
        serialize_with = "crate::config::forms::optional_redacted_list",
        deserialize_with = "crate::config::forms::optional_secret_list"
    )]
    pub webhook_secrets: Option<Vec<SecretString>>,
}

/// The apps of the configuration, by sdkappid (the table's keys are text in
/// TOML and in the environment; [`validate`] checks each is an id).
pub type Apps = BTreeMap<String, AppSettings>;

/// The top-level settings a table falls back on (`Config` gives them).
#[derive(Debug, Clone, Copy)]
pub struct Defaults<'a> {
    pub archive: bool,
    pub concurrency: u16,
    pub s3_bucket: Option<&'a str>,
    pub s3_prefix: &'a str,
    pub s3_endpoint: Option<&'a str>,
    pub s3_region: &'a str,
    pub s3_force_path_style: bool,
    pub s3_storage_class: Option<&'a str>,
    pub s3_sse: Option<&'a str>,
    pub credentials: Option<(&'a SecretString, &'a SecretString)>,
    pub webhook_url: Option<&'a str>,
    pub webhook_secrets: &'a [SecretString],
}

/// One app's settings with the defaults filled in.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub archive: bool,
    pub concurrency: u16,
    pub s3_bucket: Option<String>,
    pub s3_prefix: String,
    pub s3_endpoint: Option<String>,
    pub s3_region: String,
    pub s3_force_path_style: bool,
    pub s3_storage_class: Option<String>,
    pub s3_sse: Option<String>,
    pub credentials: Option<(SecretString, SecretString)>,
    /// Where the app's events go; `None`: nowhere.
    pub webhook: Option<WebhookTarget>,
}

/// A webhook endpoint and the secrets its events are signed with.
#[derive(Debug, Clone)]
pub struct WebhookTarget {
    pub url: String,
    pub secrets: Vec<SecretString>,
}

/// The sdkappids with a table of their own, in order.
pub fn ids(apps: &Apps) -> Vec<i64> {
    apps.keys().filter_map(|id| parse_id(id)).collect()
}

/// The settings of `app`'s table over `defaults` (`None`: no table, the
/// defaults as they are).
pub fn resolve(app: Option<&AppSettings>, d: &Defaults) -> Resolved {
    let text = |own: Option<&String>, default: Option<&str>| {
        own.cloned().or_else(|| default.map(str::to_owned))
    };
    let credentials = match app {
        Some(AppSettings {
            s3_access_key_id: Some(id),
            s3_secret_access_key: Some(secret),
            ..
        }) => Some((id.clone(), secret.clone())),
        _ => d
            .credentials
            .map(|(id, secret)| (id.clone(), secret.clone())),
    };
    Resolved {
        archive: app.and_then(|a| a.archive).unwrap_or(d.archive),
        concurrency: app.and_then(|a| a.concurrency).unwrap_or(d.concurrency),
        s3_bucket: text(app.and_then(|a| a.s3_bucket.as_ref()), d.s3_bucket),
        s3_prefix: text(app.and_then(|a| a.s3_prefix.as_ref()), Some(d.s3_prefix))
            .unwrap_or_default(),
        s3_endpoint: text(app.and_then(|a| a.s3_endpoint.as_ref()), d.s3_endpoint),
        s3_region: text(app.and_then(|a| a.s3_region.as_ref()), Some(d.s3_region))
            .unwrap_or_default(),
        s3_force_path_style: app
            .and_then(|a| a.s3_force_path_style)
            .unwrap_or(d.s3_force_path_style),
        s3_storage_class: text(
            app.and_then(|a| a.s3_storage_class.as_ref()),
            d.s3_storage_class,
        ),
        s3_sse: text(app.and_then(|a| a.s3_sse.as_ref()), d.s3_sse),
        credentials,
        // An endpoint and its secrets go together: an app naming its own
        // URL signs with its own secrets (`validate` makes sure it has some).
        webhook: match app.and_then(|a| a.webhook_url.as_ref()) {
            Some(url) => Some(WebhookTarget {
                url: url.clone(),
                secrets: app
                    .and_then(|a| a.webhook_secrets.clone())
                    .unwrap_or_default(),
            }),
            None => d.webhook_url.map(|url| WebhookTarget {
                url: url.to_owned(),
                secrets: d.webhook_secrets.to_vec(),
            }),
        },
    }
}

/// Each app's table, checked: its id, its fields, its destination, its
/// TicKey against `listed` (`tic_keys`). Messages name the app and the
/// field, never a secret's value.
pub fn validate(apps: &Apps, d: &Defaults, listed: Option<&TicKeys>) -> Result<(), String> {
    for (id, app) in apps {
        let Some(sdkappid) = parse_id(id).filter(|n| n.to_string() == *id) else {
            return Err(format!(
                "apps.{}: the table's name must be an sdkappid (a positive integer, written plainly)",
                printable(id)
            ));
        };
        let field = |name: &str| format!("apps.{sdkappid}.{name}");
        if app.concurrency == Some(0) {
            return Err(format!("{} must be at least 1", field("concurrency")));
        }
        if app.s3_access_key_id.is_some() != app.s3_secret_access_key.is_some() {
            return Err(format!(
                "set both {} and {}, or neither",
                field("s3_access_key_id"),
                field("s3_secret_access_key")
            ));
        }
        if let Some(endpoint) = &app.s3_endpoint {
            if !matches!(url::Url::parse(endpoint), Ok(u) if matches!(u.scheme(), "http" | "https"))
            {
                return Err(format!(
                    "{} {endpoint:?} is not an http(s) URL",
                    field("s3_endpoint")
                ));
            }
            // Credentials belong to their store: an app on a store of its
            // own brings its own, never the default ones (static or the
            // ambient chain's).
            let own_creds = app.s3_access_key_id.is_some();
            if !own_creds && Some(endpoint.as_str()) != d.s3_endpoint {
                return Err(format!(
                    "{} names a store of its own but the app has no credentials: set {} and \
                     {} (the default credentials are never sent to another store)",
                    field("s3_endpoint"),
                    field("s3_access_key_id"),
                    field("s3_secret_access_key")
                ));
            }
        }
        for (name, value) in [("s3_bucket", &app.s3_bucket), ("s3_region", &app.s3_region)] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(format!("{} is empty", field(name)));
            }
        }
        if let Some(url) = &app.webhook_url {
            check_webhook(url, app.webhook_secrets.as_deref().unwrap_or_default())
                .map_err(|why| format!("{}: {why}", field("webhook_url")))?;
        } else if app.webhook_secrets.is_some() {
            return Err(format!(
                "{} is set but {} is not: secrets belong to their endpoint",
                field("webhook_secrets"),
                field("webhook_url")
            ));
        }
        let resolved = resolve(Some(app), d);
        if resolved.archive && resolved.s3_bucket.as_deref().is_none_or(str::is_empty) {
            return Err(format!(
                "{} is on but the app has no bucket: set {} (or s3_bucket)",
                field("archive"),
                field("s3_bucket")
            ));
        }
        if let (Some(own), Some(listed)) = (&app.tic_key, listed.and_then(|k| k.get(sdkappid)))
            && own.expose_secret() != listed.expose_secret()
        {
            return Err(format!(
                "{} and tic_keys give app {sdkappid} two different TicKeys: keep one",
                field("tic_key")
            ));
        }
    }
    Ok(())
}

/// A webhook endpoint's URL and secrets, checked: an http(s) URL, at least
/// one secret, each `whsec_` + base64 of 24 to 64 bytes. Never shows a secret.
pub fn check_webhook(url: &str, secrets: &[SecretString]) -> Result<(), String> {
    match url::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
        _ => return Err(format!("{:?} is not an http(s) URL", printable(url))),
    }
    if secrets.is_empty() {
        return Err(
            "an endpoint needs at least one webhook secret (whsec_...): events are always signed"
                .into(),
        );
    }
    for (n, secret) in secrets.iter().enumerate() {
        crate::webhook::sign::Secret::parse(secret.expose_secret())
            .map_err(|why| format!("secret {} of {}: {why}", n + 1, secrets.len()))?;
    }
    Ok(())
}

/// Every app's TicKey (`tic_key`), by sdkappid.
pub fn keys(apps: &Apps) -> impl Iterator<Item = (i64, &SecretString)> {
    apps.iter()
        .filter_map(|(id, app)| Some((parse_id(id)?, app.tic_key.as_ref()?)))
}

/// The environment form of every app's settings, secrets included (how a
/// parent hands a child the same configuration).
pub fn environment(apps: &Apps, d: &Defaults) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (id, app) in apps {
        let var = |field: &str| format!("{ENV_PREFIX}APPS__{id}__{}", field.to_ascii_uppercase());
        let Ok(serde_json::Value::Object(values)) = serde_json::to_value(app) else {
            unreachable!("AppSettings serializes to an object");
        };
        let before = out.len();
        for (name, value) in values {
            let secret = match name.as_str() {
                "tic_key" => Some(&app.tic_key),
                "s3_access_key_id" => Some(&app.s3_access_key_id),
                "s3_secret_access_key" => Some(&app.s3_secret_access_key),
                _ => None,
            };
            let text = match (secret, name.as_str()) {
                (Some(s), _) => s.as_ref().map(|s| quoted(s.expose_secret())),
                (None, "webhook_secrets") => app
                    .webhook_secrets
                    .as_deref()
                    .and_then(exposed_list)
                    .map(|list| quoted(&list)),
                (None, _) => env_text(&value),
            };
            if let Some(text) = text {
                out.push((var(&name), text));
            }
        }
        if out.len() == before {
            // A table with nothing in it still gives the app its lane.
            out.push((var("archive"), resolve(Some(app), d).archive.to_string()));
        }
    }
    out
}

fn parse_id(id: &str) -> Option<i64> {
    id.trim().parse().ok().filter(|id: &i64| *id > 0)
}

/// A table name as an error may show it: short, printable.
fn printable(text: &str) -> String {
    text.chars()
        .take(40)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error.
mod tests {
    use std::path::Path;

    use secrecy::ExposeSecret;

    use crate::config::settings::Config;

    const TWO_APPS: &str = r#"
archive = true
s3_bucket = "school-default"
s3_endpoint = "http://store-a:9000"
s3_access_key_id = "DEFAULTID"
s3_secret_access_key = "DEFAULTSECRET"
concurrency = 8

[tic_keys]
1400000001 = "KEYONE"

[apps.1400000001]
s3_bucket = "school-one"
s3_prefix = "replays"

[apps.1400000002]
tic_key = "KEYTWO"
s3_endpoint = "http://store-b:5000"
s3_bucket = "school-two"
s3_access_key_id = "TWOID"
s3_secret_access_key = "TWOSECRET"
s3_sse = "AES256"
concurrency = 2
webhook_url = "https://two.example/hooks"
webhook_secrets = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]
"#;

    #[test]
    fn an_app_table_overrides_what_it_names_and_inherits_the_rest() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("apps.toml", TWO_APPS)?;
            let config = Config::load(Some(Path::new("apps.toml"))).expect("loads");
            assert_eq!(config.app_ids(), [1400000001, 1400000002]);
            let one = config.resolved(Some(1400000001));
            assert_eq!(one.s3_bucket.as_deref(), Some("school-one"));
            assert_eq!(one.s3_prefix, "replays");
            // Same store as the default: its credentials too.
            assert_eq!(one.s3_endpoint.as_deref(), Some("http://store-a:9000"));
            let (id, _) = one.credentials.expect("inherited");
            assert_eq!(id.expose_secret(), "DEFAULTID");
            assert_eq!(one.concurrency, 8);
            let two = config.resolved(Some(1400000002));
            assert_eq!(two.s3_endpoint.as_deref(), Some("http://store-b:5000"));
            let (id, secret) = two.credentials.expect("its own");
            assert_eq!(
                (id.expose_secret(), secret.expose_secret()),
                ("TWOID", "TWOSECRET")
            );
            assert_eq!(two.s3_sse.as_deref(), Some("AES256"));
            assert_eq!(two.concurrency, 2);
            // Apps without a table, and messages without an app: the default.
            for other in [Some(1400000003), None] {
                let default = config.resolved(other);
                assert_eq!(default.s3_bucket.as_deref(), Some("school-default"));
                assert_eq!(default.s3_prefix, "lesson-replay");
            }
            // Each app's destination, as the worker builds it.
            let media = config.media_settings();
            let buckets: Vec<_> = media
                .apps
                .iter()
                .map(|(app, a)| (*app, a.as_ref().map(|a| a.bucket.clone())))
                .collect();
            assert_eq!(
                buckets,
                [
                    (1400000001, Some("school-one".to_owned())),
                    (1400000002, Some("school-two".to_owned()))
                ]
            );
            // Both TicKeys sign and query, from either place.
            let keys = config.keys().unwrap();
            assert_eq!(keys.get(1400000002).unwrap().expose_secret(), "KEYTWO");
            assert_eq!(keys.get(1400000001).unwrap().expose_secret(), "KEYONE");
            assert_eq!(
                config.tic_settings(Some(1400000002)).unwrap().sdkappid,
                1400000002
            );
            // Three buckets, each once.
            assert_eq!(config.destinations().len(), 3);
            Ok(())
        });
    }

    #[test]
    fn the_environment_form_sets_an_app_as_a_secret_s_keys_would() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("LESSON_REPLAY_ARCHIVE", "false");
            jail.set_env("LESSON_REPLAY_APPS__1400000002__ARCHIVE", "true");
            jail.set_env("LESSON_REPLAY_APPS__1400000002__S3_BUCKET", "school-two");
            jail.set_env("LESSON_REPLAY_APPS__1400000002__TIC_KEY", "123456");
            jail.set_env("LESSON_REPLAY_APPS__1400000002__S3_ACCESS_KEY_ID", "2024");
            jail.set_env(
                "LESSON_REPLAY_APPS__1400000002__S3_SECRET_ACCESS_KEY",
                "s3cr3t",
            );
            jail.set_env(
                "LESSON_REPLAY_APPS__1400000002__WEBHOOK_URL",
                "https://two.example/hooks",
            );
            // Two secrets while one is rotated.
            jail.set_env(
                "LESSON_REPLAY_APPS__1400000002__WEBHOOK_SECRETS",
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw,whsec_BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=",
            );
            let config = Config::load(None).expect("loads");
            let two = config.resolved(Some(1400000002));
            assert!(two.archive && !config.resolved(None).archive);
            assert_eq!(two.s3_bucket.as_deref(), Some("school-two"));
            // All-digit secrets stay text.
            let (id, _) = two.credentials.unwrap();
            assert_eq!(id.expose_secret(), "2024");
            assert_eq!(tic_key(&config, 1400000002), "123456");
            // And back: the environment a parent hands a child gives the same.
            let env = config.to_environment();
            jail.clear_env();
            for (name, value) in &env {
                jail.set_env(name, value);
            }
            let again = Config::load(None).expect("loads again");
            assert_eq!(
                serde_json::to_value(&again).unwrap(),
                serde_json::to_value(&config).unwrap()
            );
            assert_eq!(tic_key(&again, 1400000002), "123456");
            let hook = again
                .resolved(Some(1400000002))
                .webhook
                .expect("an endpoint");
            assert_eq!(hook.url, "https://two.example/hooks");
            let secrets: Vec<&str> = hook.secrets.iter().map(|s| s.expose_secret()).collect();
            assert_eq!(
                secrets,
                [
                    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                    "whsec_BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc="
                ]
            );
            // Apps without an endpoint of their own: none at the top level either.
            assert!(again.resolved(None).webhook.is_none());
            Ok(())
        });
    }

    #[test]
    fn app_secrets_stay_out_of_what_is_shown() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("apps.toml", TWO_APPS)?;
            let config = Config::load(Some(Path::new("apps.toml"))).expect("loads");
            let shown = [
                format!("{config:?}"),
                serde_json::to_string(&config).unwrap(),
            ];
            for text in &shown {
                for secret in [
                    "KEYTWO",
                    "TWOID",
                    "TWOSECRET",
                    "DEFAULTSECRET",
                    "KEYONE",
                    "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                ] {
                    assert!(!text.contains(secret), "{secret} in {text}");
                }
            }
            assert!(
                shown[1].contains(r#""s3_bucket":"school-two""#),
                "{}",
                shown[1]
            );
            Ok(())
        });
    }

    /// App `app`'s TicKey, as the worker sees it.
    fn tic_key(config: &Config, app: i64) -> String {
        config
            .keys()
            .unwrap()
            .get(app)
            .unwrap()
            .expose_secret()
            .to_owned()
    }

    /// The error of loading `toml`.
    fn refused(toml: &str) -> String {
        let mut message = String::new();
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", toml)?;
            message = Config::load(Some(Path::new("bad.toml")))
                .expect_err(toml)
                .to_string();
            Ok(())
        });
        message
    }

    #[test]
    fn a_bad_table_is_refused_naming_the_app_and_the_field_never_a_secret() {
        let cases = [
            ("[apps.school]\narchive = true\n", "apps.school"),
            ("[apps.1400000001]\ns3_buckett = \"b\"\n", "s3_buckett"),
            (
                "[apps.1400000001]\narchive = true\n",
                "apps.1400000001.archive",
            ),
            (
                "[apps.1400000001]\nconcurrency = 0\n",
                "apps.1400000001.concurrency",
            ),
            (
                "[apps.1400000001]\ns3_access_key_id = \"HALFSECRET\"\n",
                "apps.1400000001.s3_access_key_id",
            ),
            (
                "[apps.1400000001]\ns3_endpoint = \"store:9000\"\n",
                "apps.1400000001.s3_endpoint",
            ),
            (
                "s3_access_key_id = \"DEFAULTID\"\ns3_secret_access_key = \"DEFAULTSECRET\"\n\
                 [apps.1400000001]\ns3_endpoint = \"https://elsewhere.example\"\n",
                "the default credentials are never sent to another store",
            ),
            // Nor the ambient chain's.
            (
                "[apps.1400000001]\ns3_endpoint = \"https://elsewhere.example\"\n",
                "the default credentials are never sent to another store",
            ),
            ("[apps.01400000001]\narchive = false\n", "apps.01400000001"),
            (
                "[tic_keys]\n1400000001 = \"LISTEDKEY\"\n[apps.1400000001]\ntic_key = \"OTHERKEY\"\n",
                "apps.1400000001.tic_key",
            ),
            // An endpoint signs with its own secrets, always.
            (
                "[apps.1400000001]\nwebhook_url = \"https://one.example/hooks\"\n",
                "apps.1400000001.webhook_url: an endpoint needs at least one webhook secret",
            ),
            (
                "[apps.1400000001]\nwebhook_secrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\n",
                "apps.1400000001.webhook_secrets is set but",
            ),
            (
                "webhook_url = \"https://one.example/hooks\"\nwebhook_secrets = \"whsec_SHORTSECRET\"\n",
                "webhook_url: secret 1 of 1",
            ),
            (
                "webhook_url = \"https://one.example/hooks\"\nwebhook_secrets = \"HALFSECRETMfKQ9r8GKYqrTwjUPD8ILPZIo2La\"\n",
                "starts with whsec_",
            ),
            (
                "webhook_url = \"one.example:8080/hooks\"\nwebhook_secrets = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n",
                "is not an http(s) URL",
            ),
            (
                "webhook_secrets = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n",
                "webhook_secrets is set but webhook_url is not",
            ),
        ];
        for (toml, named) in cases {
            let error = refused(toml);
            assert!(error.contains(named), "{toml}: {error}");
            for secret in [
                "HALFSECRET",
                "DEFAULTSECRET",
                "LISTEDKEY",
                "OTHERKEY",
                "SHORTSECRET",
                "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            ] {
                assert!(!error.contains(secret), "{secret} in {error}");
            }
        }
    }
}
