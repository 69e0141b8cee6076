//! What an HTTP callback from TIC is, decided from its body alone, before it
//! is published: a TIC message, TIC's test request, or not JSON at all. Pure:
//! the ingress calls [`classify`] and carries out what it says.
//!
//! TIC sends a test request when a callback URL is registered (contract §2,
//! seed §4.4) and requires `{"error_code":0}`; its body is not documented. The
//! rule: **a test request is a body that is empty, or a JSON object with none
//! of the keys that identify a TIC message** (`callback_type`, `status`,
//! `room_id`, `video_info`, `RoomId`, `VideoInfos` — the keys
//! [`detect_format`] reads). Every recording message has at least one of them,
//! so none can be taken for a test request; a body that has one is published
//! as it came, even when the worker will park it.

use serde_json::Value;

use crate::decision::decode::{Format, detect_format};
use crate::decision::reason::Rejection;
use crate::decision::verify::{SignatureMode, SignedFields, TicKeys, verify};

/// What a callback body is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallbackBody {
    /// TIC's test request: answer `{"error_code":0}`, publish nothing.
    Test,
    /// A TIC message: publish it, byte for byte.
    Message(CallbackFacts),
    /// Not JSON (or JSON that is not an object): refuse, so TIC retries and
    /// the sender sees it.
    NotJson(String),
}

/// What the ingress reads of a message: its routing, the fields its logs and
/// an edge signature check need. Lenient: a field of the wrong type is `None`
/// here and judged by the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackFacts {
    pub format: Format,
    pub callback_type: Option<String>,
    pub task_id: Option<String>,
    pub expire_time: Option<i64>,
    /// The body's `timestamp`: when TIC sent it.
    pub sent_at: Option<i64>,
    pub sdkappid: Option<i64>,
}

impl CallbackFacts {
    /// The routing key on the inbound exchange: `tic.<callback_type>` for
    /// callbacks (`tic.record_finished`, `tic.record_started`), else
    /// `tic.<format>` (`tic.query_answer`, `tic.result_record`,
    /// `tic.post_class`), so consumers can bind by kind.
    pub fn routing_key(&self) -> String {
        let kind = match (&self.callback_type, self.format) {
            (Some(t), Format::Callback) if is_word(t) => t.as_str(),
            (_, Format::Callback) => "unknown_callback",
            (_, format) => format.as_str(),
        };
        format!("tic.{kind}")
    }
}

/// A routing-key word: short, lowercase letters, digits and `_`.
fn is_word(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 64
        && text
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Tell a test request from a message from garbage.
pub fn classify(body: &[u8]) -> CallbackBody {
    if body.iter().all(u8::is_ascii_whitespace) {
        return CallbackBody::Test;
    }
    let value: Value = match serde_json::from_slice(body) {
        Ok(value) => value,
        Err(e) => return CallbackBody::NotJson(e.to_string()),
    };
    let Value::Object(map) = &value else {
        return CallbackBody::NotJson("the body is JSON but not an object".into());
    };
    let Some(format) = detect_format(map) else {
        return CallbackBody::Test;
    };
    let text = |key: &str| map.get(key).and_then(Value::as_str).map(str::to_owned);
    let int = |key: &str| {
        map.get(key).and_then(|v| match v {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        })
    };
    CallbackBody::Message(CallbackFacts {
        format,
        callback_type: text("callback_type"),
        task_id: text("task_id"),
        expire_time: int("expire_time"),
        sent_at: int("timestamp"),
        sdkappid: int("sdkappid").or_else(|| int("SdkAppId")),
    })
}

/// The edge check of `ingress_signature = required`: the same `verify` as
/// the worker's, on the URL's `sign` and `sdkappid` and the body's
/// `expire_time`; `received_at` stands in for a missing `timestamp`.
pub fn check_signature(
    facts: &CallbackFacts,
    sign: Option<&str>,
    sdkappid: Option<i64>,
    keys: &TicKeys,
    received_at: i64,
) -> Result<(), Rejection> {
    verify(
        SignatureMode::Required,
        keys,
        SignedFields {
            sdkappid: facts.sdkappid.or(sdkappid),
            sign,
            expire_time: facts.expire_time,
            sent_at: Some(facts.sent_at.unwrap_or(received_at)),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::reason::ReasonCode;
    use crate::decision::verify::compute_sign;

    const FINISHED: &str = include_str!("../../examples/tic/callback-record-finished.json");
    const STARTED: &str = include_str!("../../examples/tic/callback-record-started.json");

    #[test]
    fn test_requests_are_empty_or_carry_no_message_key() {
        for body in [
            "",
            "  \n",
            "{}",
            r#"{"test":true}"#,
            r#"{"hello":"tic","error_code":0}"#,
        ] {
            assert_eq!(classify(body.as_bytes()), CallbackBody::Test, "{body}");
        }
    }

    #[test]
    fn every_message_of_the_contract_is_a_message_never_a_test() {
        for name in [
            "callback-record-finished.json",
            "callback-record-started.json",
            "realtime-query-finished.json",
            "realtime-query-recording.json",
            "realtime-result-record.json",
            "post-class-mixed.json",
            "post-class-unmixed.json",
        ] {
            let body = std::fs::read(format!(
                "{}/examples/tic/{name}",
                env!("CARGO_MANIFEST_DIR")
            ))
            .unwrap();
            assert!(
                matches!(classify(&body), CallbackBody::Message(_)),
                "{name}"
            );
        }
        // One key is enough, whatever else is wrong with the body.
        for body in [
            r#"{"room_id":"x"}"#,
            r#"{"callback_type":5}"#,
            r#"{"VideoInfos":null}"#,
        ] {
            assert!(
                matches!(classify(body.as_bytes()), CallbackBody::Message(_)),
                "{body}"
            );
        }
    }

    #[test]
    fn garbage_is_not_json() {
        for body in ["{", "<html>", "[1,2]", "\"text\"", "{\"a\":1,}"] {
            assert!(
                matches!(classify(body.as_bytes()), CallbackBody::NotJson(_)),
                "{body}"
            );
        }
    }

    #[test]
    fn routing_keys_name_the_kind() {
        let key = |body: &str| match classify(body.as_bytes()) {
            CallbackBody::Message(facts) => facts.routing_key(),
            other => panic!("{other:?}"),
        };
        assert_eq!(key(FINISHED), "tic.record_finished");
        assert_eq!(key(STARTED), "tic.record_started");
        assert_eq!(key(r#"{"status":"finished"}"#), "tic.query_answer");
        assert_eq!(key(r#"{"RoomId":1}"#), "tic.post_class");
        assert_eq!(key(r#"{"callback_type":"a.#*"}"#), "tic.unknown_callback");
    }

    #[test]
    fn the_edge_signature_check_is_the_workers() {
        let keys = TicKeys::parse_list("1400000001=SECRETKEY").unwrap();
        let CallbackBody::Message(facts) = classify(FINISHED.as_bytes()) else {
            panic!("a message");
        };
        let expire = facts.expire_time.unwrap();
        let good = compute_sign("SECRETKEY", expire);
        let now = facts.sent_at.unwrap();
        assert!(check_signature(&facts, Some(&good), Some(1400000001), &keys, now).is_ok());
        let code = |sign: Option<&str>, app| {
            check_signature(&facts, sign, app, &keys, now)
                .unwrap_err()
                .code
        };
        assert_eq!(code(None, Some(1400000001)), ReasonCode::SignatureMissing);
        assert_eq!(
            code(Some("forged"), Some(1400000001)),
            ReasonCode::SignatureInvalid
        );
        assert_eq!(code(Some(&good), Some(99)), ReasonCode::NoKey);
        let mut late = facts.clone();
        late.sent_at = Some(expire + 1);
        assert_eq!(
            check_signature(&late, Some(&good), Some(1400000001), &keys, now)
                .unwrap_err()
                .code,
            ReasonCode::SignatureExpired
        );
    }
}
