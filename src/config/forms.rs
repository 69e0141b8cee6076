//! How a setting's value is read and written, for every table of settings:
//! secrets as text whatever the loader made of them, lists from TOML arrays
//! or comma-separated text, secrets redacted when shown, and the environment
//! form a parent hands a child.

use secrecy::SecretString;
use serde::{Deserialize, Serialize, Serializer};

pub const ENV_PREFIX: &str = "LESSON_REPLAY_";

/// The environment variable of a setting: `amqp_url` → `LESSON_REPLAY_AMQP_URL`.
pub fn env_var(name: &str) -> String {
    format!("{ENV_PREFIX}{}", name.to_ascii_uppercase())
}

/// What is shown in place of a secret.
pub const REDACTED: &str = "[REDACTED]";

/// A secret as text, whatever the loader made of it: the environment form of
/// an all-digit secret reads as a number, and a type error would print it.
pub fn secret<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SecretString, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        Text(String),
        Int(i64),
        Uint(u64),
        Float(f64),
        Bool(bool),
    }
    let text = match Form::deserialize(d)
        .map_err(|_| serde::de::Error::custom("a secret must be text (its value is not shown)"))?
    {
        Form::Text(t) => t,
        Form::Int(n) => n.to_string(),
        Form::Uint(n) => n.to_string(),
        Form::Float(f) => f.to_string(),
        Form::Bool(b) => b.to_string(),
    };
    Ok(SecretString::from(text))
}

pub fn optional_secret<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<SecretString>, D::Error> {
    secret(d).map(Some)
}

/// A list given as a TOML array or as a comma-separated string (environment).
pub fn list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
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

/// An optional secret, shown as `[REDACTED]` when set.
pub fn redacted<S: Serializer>(secret: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    secret.as_ref().map(|_| REDACTED).serialize(s)
}

/// A string as the environment form of a setting: quoted, so that a value
/// that looks like a number or a boolean (`2024`, `true`) stays a string.
pub fn quoted(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A serialized setting as an environment variable's text; `None` when unset.
pub fn env_text(value: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    match value {
        Value::Null => None,
        Value::String(s) => Some(quoted(s)),
        Value::Array(items) => Some(
            items
                .iter()
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                .collect::<Vec<_>>()
                .join(","),
        ),
        other => Some(other.to_string()),
    }
}

/// Secrets given as a TOML array or as text separated by commas or spaces
/// (environment); each as text, never shown in an error.
pub fn secret_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<SecretString>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        List(Vec<String>),
        Text(String),
    }
    let items = match Form::deserialize(d).map_err(|_| {
        serde::de::Error::custom("secrets must be text (their values are not shown)")
    })? {
        Form::List(items) => items,
        Form::Text(text) => text
            .split(|c: char| c == ',' || c.is_whitespace())
            .map(str::to_owned)
            .collect(),
    };
    Ok(items
        .into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .map(SecretString::from)
        .collect())
}

pub fn optional_secret_list<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<SecretString>>, D::Error> {
    secret_list(d).map(Some)
}

/// Secrets shown as one `[REDACTED]` each: how many, never what.
pub fn redacted_list<S: Serializer>(secrets: &[SecretString], s: S) -> Result<S::Ok, S::Error> {
    vec![REDACTED; secrets.len()].serialize(s)
}

pub fn optional_redacted_list<S: Serializer>(
    secrets: &Option<Vec<SecretString>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    secrets
        .as_ref()
        .map(|list| vec![REDACTED; list.len()])
        .serialize(s)
}

/// The environment form of a list of secrets, exposed.
pub fn exposed_list(secrets: &[SecretString]) -> Option<String> {
    use secrecy::ExposeSecret;
    (!secrets.is_empty()).then(|| {
        secrets
            .iter()
            .map(|s| s.expose_secret())
            .collect::<Vec<_>>()
            .join(",")
    })
}
