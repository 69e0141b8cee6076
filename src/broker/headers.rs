//! Every AMQP header the product reads or writes, named once, with the two
//! helpers that read and write them. Three families:
//!
//! - `x-tic-*`: the TIC callback's URL parameters, set by whoever publishes the
//!   callback (the school's callback service, `lesson-replay publish`);
//! - `x-lesson-replay-*`: the worker's own retry and parking bookkeeping;
//! - headers of others: the broker's `x-death`, W3C `traceparent`.

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// The callback's `sign` URL parameter.
pub const TIC_SIGN: &str = "x-tic-sign";
/// The callback's `random` URL parameter (TIC support asks for it).
pub const TIC_RANDOM: &str = "x-tic-random";
/// The callback's `sdkappid` URL parameter.
pub const TIC_SDKAPPID: &str = "x-tic-sdkappid";

/// Broker-level retries already made (0 on the first delivery).
pub const ATTEMPT: &str = "x-lesson-replay-attempt";
/// When the message first failed (RFC 3339).
pub const FIRST_SEEN: &str = "x-lesson-replay-first-seen";
/// When it last failed (RFC 3339).
pub const LAST_ERROR_AT: &str = "x-lesson-replay-last-error-at";
/// The reason code of the last failure.
pub const LAST_REASON: &str = "x-lesson-replay-last-reason";
/// The explanation of the last failure.
pub const LAST_ERROR: &str = "x-lesson-replay-last-error";

/// Reason code of a parked message.
pub const REASON: &str = "x-lesson-replay-reason";
/// Explanation of why it was parked.
pub const ERROR: &str = "x-lesson-replay-error";
/// When it was parked (RFC 3339).
pub const PARKED_AT: &str = "x-lesson-replay-parked-at";

/// The sdkappid a webhook event is for (absent: an app unknown).
pub const WEBHOOK_APP: &str = "x-lesson-replay-app";
/// A webhook event's type (`lesson.replay_ready`, ...), for logs.
pub const WEBHOOK_EVENT: &str = "x-lesson-replay-event";

/// The broker's dead-lettering history (RabbitMQ sets it, never the product).
pub const X_DEATH: &str = "x-death";
/// W3C trace context, copied from the inbound message to its record.
pub const TRACEPARENT: &str = "traceparent";

/// Every header of the retry and parking bookkeeping, removed when an operator
/// replays a parked message (its attempt count starts again).
pub const BOOKKEEPING: [&str; 9] = [
    ATTEMPT,
    FIRST_SEEN,
    LAST_ERROR_AT,
    LAST_REASON,
    LAST_ERROR,
    REASON,
    ERROR,
    PARKED_AT,
    X_DEATH,
];

/// The header as text, whatever AMQP type the publisher chose.
pub fn header_text(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    let value = headers?.inner().get(name)?;
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        // Go's amqp091 sends a []byte as a byte array (`x`): text when it is
        // UTF-8, unreadable otherwise.
        AMQPValue::ByteArray(b) => std::str::from_utf8(b.as_slice()).ok().map(str::to_owned),
        AMQPValue::ShortShortInt(v) => Some(v.to_string()),
        AMQPValue::ShortShortUInt(v) => Some(v.to_string()),
        AMQPValue::ShortInt(v) => Some(v.to_string()),
        AMQPValue::ShortUInt(v) => Some(v.to_string()),
        AMQPValue::LongInt(v) => Some(v.to_string()),
        AMQPValue::LongUInt(v) => Some(v.to_string()),
        AMQPValue::LongLongInt(v) => Some(v.to_string()),
        AMQPValue::Timestamp(v) => Some(v.to_string()),
        _ => None,
    }
}

/// Set a text header, replacing any previous value.
pub fn set_header(headers: &mut FieldTable, name: &str, value: &str) {
    headers.insert(ShortString::from(name), LongString::from(value).into());
}

/// A W3C `traceparent`: `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`,
/// lower case, ids not all zero, version not `ff`.
pub fn is_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    matches!(parts.as_slice(), [version, trace, span, flags]
        if hex(version, 2) && *version != "ff" && hex(trace, 32) && nonzero(trace)
            && hex(span, 16) && nonzero(span) && hex(flags, 2))
}

/// The callback's URL parameters as the headers the worker reads. An
/// sdkappid that is an integer travels as one; any other text is kept as
/// sent, for the worker to refuse with a reason.
pub fn callback_headers(
    sign: Option<&str>,
    random: Option<&str>,
    sdkappid: Option<&str>,
) -> FieldTable {
    let mut table = FieldTable::default();
    if let Some(sign) = sign {
        set_header(&mut table, TIC_SIGN, sign);
    }
    if let Some(random) = random {
        set_header(&mut table, TIC_RANDOM, random);
    }
    if let Some(app) = sdkappid {
        match app.trim().parse::<i64>() {
            Ok(id) => {
                table.insert(ShortString::from(TIC_SDKAPPID), AMQPValue::LongLongInt(id));
            }
            Err(_) => set_header(&mut table, TIC_SDKAPPID, app),
        }
    }
    table
}

/// `headers` without the retry and parking bookkeeping.
pub fn without_bookkeeping(headers: &FieldTable) -> FieldTable {
    let mut inner = headers.inner().clone();
    for name in BOOKKEEPING {
        inner.remove(&ShortString::from(name));
    }
    FieldTable::from(inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bookkeeping_is_removed_and_the_rest_kept() {
        let mut headers = FieldTable::default();
        for name in BOOKKEEPING {
            set_header(&mut headers, name, "x");
        }
        set_header(&mut headers, TIC_SIGN, "sig");
        set_header(&mut headers, TRACEPARENT, "00-abc");
        let kept = without_bookkeeping(&headers);
        assert_eq!(kept.inner().len(), 2);
        assert_eq!(header_text(Some(&kept), TIC_SIGN).as_deref(), Some("sig"));
    }

    #[test]
    fn only_w3c_trace_contexts_pass() {
        assert!(is_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nX: 1",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            &"a".repeat(3000),
        ] {
            assert!(!is_traceparent(bad), "{bad:?}");
        }
    }

    #[test]
    fn numeric_headers_read_as_text() {
        let mut headers = FieldTable::default();
        headers.insert(TIC_SDKAPPID.into(), AMQPValue::LongLongInt(1400000001));
        assert_eq!(
            header_text(Some(&headers), TIC_SDKAPPID).as_deref(),
            Some("1400000001")
        );
    }
}
