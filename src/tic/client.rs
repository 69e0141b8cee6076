//! A client of TIC's real-time recording API: `start`, `stop`, `query` and
//! `callback` (contract §2). Every request is a JSON POST to
//! `{tic_api_base}{action}?sdkappid=…&sign=…&random=…` with `expire_time` in
//! the body, signed `md5(TicKey + expire_time)` — the same
//! [`compute_sign`] the worker checks callbacks with — and a fresh `random` (a
//! positive int32 TIC support asks for). Timeouts, 5xx and TIC's 20099
//! (internal error) are retried with backoff; every other error code becomes a
//! [`TicError::Api`] that says what it means.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value, json};

use crate::decision::verify::compute_sign;

/// TIC's documented base URL.
pub const DEFAULT_API_BASE: &str = "https://iclass.api.qcloud.com/record/v1/online/";

/// How to reach TIC and as which app: built from the settings by `config::parts`.
#[derive(Debug, Clone)]
pub struct TicSettings {
    /// Ends with `/`; actions are appended.
    pub api_base: String,
    pub sdkappid: i64,
    pub key: SecretString,
    /// `expire_time` = now + this.
    pub sign_ttl: Duration,
    /// Longest wait for one answer.
    pub timeout: Duration,
    /// Attempts of one call, transient failures retried with backoff.
    pub attempts: usize,
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum TicError {
    /// TIC answered with an error code.
    #[error("TIC error {code} ({meaning}): {message}")]
    Api {
        code: i64,
        meaning: &'static str,
        message: String,
    },
    #[error("TIC answered HTTP {0}")]
    Status(u16),
    /// No answer. `connected`: the request may have reached TIC.
    #[error("no answer from TIC: {reason}")]
    Transport { reason: String, connected: bool },
    #[error("TIC's answer is not what the contract describes: {0}")]
    BadAnswer(String),
    /// The answer is larger than [`MAX_ANSWER_BYTES`]: refused, not read whole.
    #[error(
        "TIC's answer is larger than {limit} bytes: refused (no answer of the contract comes near)"
    )]
    TooLarge { limit: usize },
    /// Refused before sending: the request breaks a rule of the contract.
    #[error("{0}")]
    InvalidRequest(String),
}

impl TicError {
    /// Can the same call succeed later?
    pub fn is_transient(&self) -> bool {
        match self {
            TicError::Api { code, .. } => *code == 20099,
            TicError::Status(status) => *status >= 500 || *status == 429 || *status == 408,
            TicError::Transport { .. } => true,
            TicError::BadAnswer(_) | TicError::InvalidRequest(_) | TicError::TooLarge { .. } => {
                false
            }
        }
    }

    /// TIC's error code, when it gave one.
    pub fn code(&self) -> Option<i64> {
        match self {
            TicError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// What a TIC error code means (contract §2).
pub fn error_meaning(code: i64) -> &'static str {
    match code {
        20000 => "the recording service is not enabled for this sdkappid",
        20001 => "signature expired: check the clock and tic_sign_ttl_secs",
        20002 => "signature invalid: check the TicKey in tic_keys for this sdkappid",
        20003 => "bad parameters",
        20004 => "the callback URL is unreachable or did not answer {\"error_code\":0}",
        20005 => "data read failed: check the task id (or TIC no longer keeps its data)",
        20011 => "the task had already ended when stop was sent",
        20099 => "TIC internal error: retried",
        20006..=20010 | 20012..=20098 => "an error code the contract does not list",
        _ => "not a TIC error code",
    }
}

/// What `start` needs (contract §2).
#[derive(Debug, Clone)]
pub struct StartRequest {
    pub room_id: i64,
    /// Must start with `tic_record_user_{room_id}` and be unique per recording.
    pub user_id: String,
    pub user_sig: SecretString,
    /// Defaults to the room id at TIC.
    pub group_id: Option<String>,
    /// Whiteboard size (TIC's default: 1280×960).
    pub whiteboard: Option<(u32, u32)>,
}

/// The contract's rule on the recording user: `tic_record_user_{room_id}…`.
pub fn check_user_id(room_id: i64, user_id: &str) -> Result<(), TicError> {
    let prefix = format!("tic_record_user_{room_id}");
    if user_id.starts_with(&prefix) {
        Ok(())
    } else {
        Err(TicError::InvalidRequest(format!(
            "user_id must start with {prefix:?} (contract §2), got {user_id:?}"
        )))
    }
}

/// A fresh positive int32 for TIC's `random` parameter (support tracing, not secrecy).
fn random() -> u32 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (hasher.finish() as u32 & 0x7fff_ffff).max(1)
}

/// TIC's real-time recording API, for one sdkappid.
#[derive(Clone)]
pub struct TicClient {
    http: reqwest::Client,
    settings: TicSettings,
}

impl TicClient {
    pub fn new(settings: TicSettings) -> Result<TicClient, TicError> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            // A redirect would carry the signed URL to another host.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("lesson-replay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| transport(&e))?;
        Ok(TicClient { http, settings })
    }

    /// Start recording a room; returns TIC's `task_id`.
    pub async fn start(&self, request: &StartRequest) -> Result<String, TicError> {
        check_user_id(request.room_id, &request.user_id)?;
        let mut body = Map::new();
        body.insert("room_id".into(), json!(request.room_id));
        body.insert("user_id".into(), json!(request.user_id));
        body.insert("user_sig".into(), json!(request.user_sig.expose_secret()));
        if let Some(group) = &request.group_id {
            body.insert("group_id".into(), json!(group));
        }
        if let Some((width, height)) = request.whiteboard {
            body.insert(
                "whiteboard".into(),
                json!({"width": width, "height": height}),
            );
        }
        // A start that may have reached TIC is not sent again: it would
        // start a second recording. Only a refused connection is retried.
        let answer = self
            .call_with("start", body, |e| {
                matches!(
                    e,
                    TicError::Transport {
                        connected: false,
                        ..
                    }
                )
            })
            .await?;
        let task = parse(&answer)?
            .get("task_id")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .map(str::to_owned);
        task.ok_or_else(|| TicError::BadAnswer("start answered without a task_id".into()))
    }

    /// Stop a recording.
    pub async fn stop(&self, task_id: &str) -> Result<(), TicError> {
        self.call("stop", task_body(task_id)).await.map(|_| ())
    }

    /// The state of a recording, as TIC sent it (contract §3.2): with status
    /// `finished`, a message the worker can turn into a record.
    pub async fn query(&self, task_id: &str) -> Result<Bytes, TicError> {
        self.call("query", task_body(task_id)).await
    }

    /// Register the callback URL (TIC sends it a test request first); an
    /// empty URL deletes the registration.
    pub async fn set_callback(&self, url: &str) -> Result<(), TicError> {
        let mut body = Map::new();
        body.insert("callback".into(), json!(url));
        self.call("callback", body).await.map(|_| ())
    }

    /// One signed call, retried while it fails transiently; the answer's
    /// bytes when TIC said `error_code` 0.
    async fn call(&self, action: &str, body: Map<String, Value>) -> Result<Bytes, TicError> {
        self.call_with(action, body, TicError::is_transient).await
    }

    async fn call_with(
        &self,
        action: &str,
        body: Map<String, Value>,
        retry_when: impl FnMut(&TicError) -> bool,
    ) -> Result<Bytes, TicError> {
        let attempt = || self.call_once(action, body.clone());
        attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(5))
                    .with_max_times(self.settings.attempts.saturating_sub(1))
                    .with_jitter(),
            )
            .sleep(tokio::time::sleep)
            .when(retry_when)
            .notify(
                |e, wait| tracing::warn!(%action, error = %e, ?wait, "TIC call failed, retrying"),
            )
            .await
    }

    async fn call_once(
        &self,
        action: &str,
        mut body: Map<String, Value>,
    ) -> Result<Bytes, TicError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let expire_time = now + self.settings.sign_ttl.as_secs() as i64;
        body.insert("expire_time".into(), json!(expire_time));
        let sign = compute_sign(self.settings.key.expose_secret(), expire_time);
        let random = random();
        let url = format!("{}{action}", self.settings.api_base);
        tracing::debug!(%action, random, "calling TIC");
        let response = self
            .http
            .post(&url)
            .query(&[
                ("sdkappid", self.settings.sdkappid.to_string()),
                ("sign", sign),
                ("random", random.to_string()),
            ])
            .json(&body)
            .send()
            .await
            .map_err(|e| transport(&e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(TicError::Status(status.as_u16()));
        }
        let answer = read_bounded(response, MAX_ANSWER_BYTES).await?;
        let parsed = parse(&answer)?;
        let code = parsed
            .get("error_code")
            .map(|c| {
                c.as_i64()
                    .ok_or_else(|| TicError::BadAnswer(format!("error_code {c}")))
            })
            .transpose()?
            .unwrap_or(0);
        if code != 0 {
            let message = parsed
                .get("error_msg")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            return Err(TicError::Api {
                code,
                meaning: error_meaning(code),
                message,
            });
        }
        Ok(answer)
    }
}

/// The largest answer read from TIC: its answers are a few KB (a query with
/// hundreds of videos, well under 1 MiB); anything larger is refused unread,
/// not held in memory nor printed.
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// The answer's body, at most `limit` bytes.
async fn read_bounded(mut response: reqwest::Response, limit: usize) -> Result<Bytes, TicError> {
    if response
        .content_length()
        .is_some_and(|len| len > limit as u64)
    {
        return Err(TicError::TooLarge { limit });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| transport(&e))? {
        if body.len() + chunk.len() > limit {
            return Err(TicError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

/// A transport failure, without the request's URL: it holds the signature.
fn transport(e: &reqwest::Error) -> TicError {
    let mut reason = String::new();
    let mut cause: Option<&dyn std::error::Error> = Some(e);
    while let Some(c) = cause {
        if !reason.is_empty() {
            reason.push_str(": ");
        }
        reason.push_str(&c.to_string());
        cause = c.source();
    }
    // reqwest names the URL in its own text: keep only what comes before it.
    let reason = match e.url() {
        Some(url) => reason.replace(url.as_str(), "[the TIC API URL]"),
        None => reason,
    };
    TicError::Transport {
        reason,
        connected: !e.is_connect(),
    }
}

fn task_body(task_id: &str) -> Map<String, Value> {
    let mut body = Map::new();
    body.insert("task_id".into(), json!(task_id));
    body
}

fn parse(answer: &[u8]) -> Result<Map<String, Value>, TicError> {
    match serde_json::from_slice(answer) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(TicError::BadAnswer("not a JSON object".into())),
        Err(e) => Err(TicError::BadAnswer(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_follow_the_contract() {
        assert!(check_user_id(1234, "tic_record_user_1234_01").is_ok());
        assert!(check_user_id(1234, "tic_record_user_1234").is_ok());
        assert!(check_user_id(1234, "tic_record_user_123").is_err());
        assert!(check_user_id(1234, "teacher").is_err());
    }

    #[test]
    fn every_documented_code_has_its_meaning_and_only_20099_is_retried() {
        for code in [20000, 20001, 20002, 20003, 20004, 20005, 20011, 20099] {
            let meaning = error_meaning(code);
            assert!(!meaning.contains("does not list"), "{code}");
            let error = TicError::Api {
                code,
                meaning,
                message: String::new(),
            };
            assert_eq!(error.is_transient(), code == 20099, "{code}");
        }
        assert!(error_meaning(20050).contains("does not list"));
        assert!(TicError::Status(502).is_transient());
        assert!(!TicError::Status(404).is_transient());
    }

    #[test]
    fn random_is_a_positive_int32() {
        for _ in 0..100 {
            let r = random();
            assert!(r > 0 && r <= i32::MAX as u32);
        }
    }
}
