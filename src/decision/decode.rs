//! Decode: the bytes of an inbound message become an [`Announcement`].
//!
//! Four JSON formats arrive on the same queue (contract §3) and are told apart
//! by their keys, never by configuration:
//!
//! | format          | recognised by            | case       |
//! |-----------------|--------------------------|------------|
//! | callback        | `callback_type`          | snake_case |
//! | query answer    | `status`                 | snake_case |
//! | post-class      | `RoomId` or `VideoInfos` | PascalCase |
//! | result record   | `room_id` or `video_info`| snake_case |
//!
//! Integer fields also accept decimal strings (upstreams re-encode JSON); any
//! other wrong type is rejected with the path of the field, e.g.
//! `video_info[1].video_size: invalid type: ...`.

use serde::Deserialize;
use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde_json::Value;

use crate::decision::reason::{ReasonCode, Rejection};

/// Which of the four upstream formats a message was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Callback,
    QueryAnswer,
    ResultRecord,
    PostClass,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Callback => "callback",
            Format::QueryAnswer => "query_answer",
            Format::ResultRecord => "result_record",
            Format::PostClass => "post_class",
        }
    }
}

/// A decoded message: what signature verification needs, plus either a
/// finished recording or the reason there is none.
#[derive(Debug, Clone)]
pub struct Announcement {
    pub format: Format,
    /// `sdkappid` from the body, where the format has it.
    pub sdkappid: Option<i64>,
    /// Signature expiry (Unix seconds), callbacks only.
    pub expire_time: Option<i64>,
    /// When TIC sent the callback (Unix seconds), the body's `timestamp`.
    pub sent_at: Option<i64>,
    pub payload: Payload,
}

#[derive(Debug, Clone)]
pub enum Payload {
    Finished(Recording),
    /// No finished recording (yet).
    NotFinished(Unfinished),
}

/// A message that announces no finished recording, and what it says of the
/// recording it is about.
#[derive(Debug, Clone)]
pub struct Unfinished {
    /// Why there is no record: `recording_started` or `not_finished`.
    pub reason: Rejection,
    pub task_id: Option<String>,
    pub room_id: i64,
    /// Recording start (Unix seconds), when the message says.
    pub start_time: Option<i64>,
    /// The recording is under way and will finish: a `record_started`
    /// callback, or a query answer with status `recording` or `prepared`.
    pub in_progress: bool,
}

/// A finished recording as the upstream declared it, before normalization.
#[derive(Debug, Clone, PartialEq)]
pub struct Recording {
    pub post_class: bool,
    pub task_id: Option<String>,
    pub record_user_id: Option<String>,
    pub room_id: i64,
    pub group_id: Option<String>,
    /// Recording start, Unix seconds.
    pub start_time: i64,
    /// Recording stop, Unix seconds (real-time formats).
    pub stop_time: Option<i64>,
    /// Length of the replay in ms (post-class `TotalTime`).
    pub total_time_ms: Option<i64>,
    pub videos: Vec<VideoInfo>,
}

/// One VOD file (contract §3.4); PascalCase names are accepted as aliases.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VideoInfo {
    #[serde(alias = "VideoPlayTime", deserialize_with = "int")]
    pub video_play_time: i64,
    #[serde(alias = "VideoSize", default, deserialize_with = "opt_int")]
    pub video_size: Option<i64>,
    #[serde(alias = "VideoFormat", default)]
    pub video_format: Option<String>,
    /// Unit ambiguous (contract §6.1): resolved by normalization.
    #[serde(alias = "VideoDuration", deserialize_with = "int")]
    pub video_duration: i64,
    #[serde(alias = "VideoUrl")]
    pub video_url: String,
    #[serde(alias = "VideoId", default)]
    pub video_id: Option<String>,
    #[serde(alias = "VideoType", deserialize_with = "int")]
    pub video_type: i64,
    #[serde(alias = "UserId", default)]
    pub user_id: Option<String>,
}

/// The three snake_case formats share one field set.
#[derive(Debug, Deserialize)]
struct RealtimeBody {
    #[serde(default, deserialize_with = "opt_int")]
    sdkappid: Option<i64>,
    #[serde(default, deserialize_with = "opt_int")]
    expire_time: Option<i64>,
    #[serde(default, deserialize_with = "opt_int")]
    error_code: Option<i64>,
    #[serde(default)]
    error_msg: Option<String>,
    #[serde(default, deserialize_with = "opt_int")]
    timestamp: Option<i64>,
    #[serde(default)]
    task_id: Option<String>,
    #[serde(default)]
    callback_type: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    record_user_id: Option<String>,
    #[serde(deserialize_with = "int")]
    room_id: i64,
    #[serde(default)]
    group_id: Option<String>,
    #[serde(default, deserialize_with = "opt_int")]
    start_time: Option<i64>,
    #[serde(default, deserialize_with = "opt_int")]
    stop_time: Option<i64>,
    #[serde(default)]
    video_info: Option<Vec<VideoInfo>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PostClassBody {
    #[serde(default, deserialize_with = "opt_int")]
    sdk_app_id: Option<i64>,
    #[serde(default)]
    task_id: Option<String>,
    #[serde(deserialize_with = "int")]
    room_id: i64,
    #[serde(default)]
    group_id: Option<String>,
    #[serde(deserialize_with = "int")]
    record_start_time: i64,
    #[serde(default, deserialize_with = "opt_int")]
    total_time: Option<i64>,
    video_infos: Vec<VideoInfo>,
}

/// Size limits on hostile input, each with its own reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_tracks: usize,
    pub max_string_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1024 * 1024,
            max_tracks: 500,
            max_string_bytes: 4096,
        }
    }
}

/// Which of the four formats a JSON object is, by the keys it has; `None`:
/// none of them.
pub fn detect_format(map: &serde_json::Map<String, Value>) -> Option<Format> {
    let has = |key: &str| map.contains_key(key);
    if has("callback_type") {
        Some(Format::Callback)
    } else if has("status") {
        Some(Format::QueryAnswer)
    } else if has("RoomId") || has("VideoInfos") {
        Some(Format::PostClass)
    } else if has("room_id") || has("video_info") {
        Some(Format::ResultRecord)
    } else {
        None
    }
}

/// Decode one message body.
pub fn decode(body: &[u8], limits: &Limits) -> Result<Announcement, Rejection> {
    if body.len() > limits.max_body_bytes {
        return Err(Rejection::new(
            ReasonCode::BodyTooLarge,
            format!(
                "{} bytes, the limit is {}",
                body.len(),
                limits.max_body_bytes
            ),
        ));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| Rejection::new(ReasonCode::InvalidJson, e.to_string()))?;
    if let Some(path) = find_long_string(&value, limits.max_string_bytes) {
        return Err(Rejection::new(
            ReasonCode::FieldTooLong,
            format!("{path}: longer than {} bytes", limits.max_string_bytes),
        ));
    }
    let Value::Object(map) = &value else {
        return Err(Rejection::new(
            ReasonCode::UnknownFormat,
            format!("expected a JSON object, found {}", json_kind(&value)),
        ));
    };
    let Some(format) = detect_format(map) else {
        return Err(Rejection::new(
            ReasonCode::UnknownFormat,
            "none of callback_type, status, room_id/video_info or RoomId/VideoInfos is present",
        ));
    };
    let announcement = match format {
        Format::PostClass => decode_post_class(value),
        _ => decode_realtime(format, value),
    }?;
    if let Payload::Finished(recording) = &announcement.payload
        && recording.videos.len() > limits.max_tracks
    {
        return Err(Rejection::new(
            ReasonCode::TooManyTracks,
            format!(
                "{} video files, the limit is {}",
                recording.videos.len(),
                limits.max_tracks
            ),
        ));
    }
    Ok(announcement)
}

/// The path of the first string (or key) longer than `max` bytes. Nothing is
/// allocated unless one is found: the path is built on the way back up.
fn find_long_string(value: &Value, max: usize) -> Option<String> {
    use std::fmt::Write;
    let mut steps = Vec::new();
    let long_key = long_string_steps(value, max, &mut steps)?;
    let mut path = String::new();
    for step in steps.iter().rev() {
        match step {
            Step::Index(i) => {
                let _ = write!(path, "[{i}]");
            }
            Step::Key(k) => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
            }
        }
    }
    Some(match (long_key, path.is_empty()) {
        (true, _) => format!("{}…", &path[..path.floor_char_boundary(64)]),
        (false, true) => ".".into(),
        (false, false) => path,
    })
}

/// One step of a JSON path, innermost first in [`long_string_steps`]'s output.
enum Step<'a> {
    Index(usize),
    Key(&'a str),
}

/// `Some(is_key)` when a string (or a key) longer than `max` is found, with the
/// steps leading to it pushed innermost first.
fn long_string_steps<'a>(value: &'a Value, max: usize, steps: &mut Vec<Step<'a>>) -> Option<bool> {
    match value {
        Value::String(s) if s.len() > max => Some(false),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, v)| {
            let found = long_string_steps(v, max, steps)?;
            steps.push(Step::Index(i));
            Some(found)
        }),
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            let found = if k.len() > max {
                true
            } else {
                long_string_steps(v, max, steps)?
            };
            steps.push(Step::Key(k));
            Some(found)
        }),
        _ => None,
    }
}

fn decode_post_class(value: Value) -> Result<Announcement, Rejection> {
    let body: PostClassBody = from_value(value)?;
    Ok(Announcement {
        format: Format::PostClass,
        sdkappid: body.sdk_app_id,
        expire_time: None,
        sent_at: None,
        payload: Payload::Finished(Recording {
            post_class: true,
            task_id: body.task_id,
            record_user_id: None,
            room_id: body.room_id,
            group_id: body.group_id,
            start_time: body.record_start_time,
            stop_time: None,
            total_time_ms: body.total_time,
            videos: body.video_infos,
        }),
    })
}

fn decode_realtime(format: Format, value: Value) -> Result<Announcement, Rejection> {
    let mut body: RealtimeBody = from_value(value)?;
    // TIC writes these in lower case; another case is the same word.
    body.callback_type = body.callback_type.map(|t| t.to_ascii_lowercase());
    body.status = body.status.map(|t| t.to_ascii_lowercase());
    if let Some(app) = body.sdkappid
        && app <= 0
    {
        return Err(Rejection::field(
            "sdkappid",
            format!("must be positive, got {app}"),
        ));
    }
    let not_finished = match (
        format,
        body.callback_type.as_deref(),
        body.status.as_deref(),
    ) {
        (Format::Callback, Some("record_finished"), _) => None,
        (Format::Callback, Some("record_started"), _) => Some(Rejection::new(
            ReasonCode::RecordingStarted,
            format!(
                "record_started callback for task {}",
                body.task_id.as_deref().unwrap_or("?")
            ),
        )),
        (Format::Callback, other, _) => {
            return Err(Rejection::field(
                "callback_type",
                format!(
                    "unknown value {other:?}, expected \"record_finished\" or \"record_started\""
                ),
            ));
        }
        (Format::QueryAnswer, _, Some("finished")) => None,
        (Format::QueryAnswer, _, status) => Some(Rejection::new(
            ReasonCode::NotFinished,
            format!(
                "query answer with status \"{}\", not \"finished\"",
                status.unwrap_or("")
            ),
        )),
        _ => None,
    };
    let (sdkappid, expire_time, sent_at) = (body.sdkappid, body.expire_time, body.timestamp);
    let announcement = |payload| Announcement {
        format,
        sdkappid,
        expire_time,
        sent_at,
        payload,
    };
    if let Some(reason) = not_finished {
        let in_progress = matches!(
            (
                format,
                body.callback_type.as_deref(),
                body.status.as_deref()
            ),
            (Format::Callback, Some("record_started"), _)
                | (Format::QueryAnswer, _, Some("recording" | "prepared"))
        );
        return Ok(announcement(Payload::NotFinished(Unfinished {
            reason,
            task_id: body.task_id.filter(|t| !t.is_empty()),
            room_id: body.room_id,
            start_time: body.start_time.or(body.timestamp),
            in_progress,
        })));
    }
    if let Some(code) = body.error_code.filter(|c| *c != 0) {
        return Err(Rejection::new(
            ReasonCode::UpstreamError,
            format!(
                "TIC reported error_code {code}: {}",
                body.error_msg.as_deref().unwrap_or("")
            ),
        ));
    }
    let start_time = body
        .start_time
        .ok_or_else(|| Rejection::field("start_time", "missing field"))?;
    let videos = body
        .video_info
        .ok_or_else(|| Rejection::field("video_info", "missing field"))?;
    Ok(announcement(Payload::Finished(Recording {
        post_class: false,
        task_id: body.task_id,
        record_user_id: body.record_user_id,
        room_id: body.room_id,
        group_id: body.group_id,
        start_time,
        stop_time: body.stop_time,
        total_time_ms: None,
        videos,
    })))
}

/// Deserialize with the failing field's path in the error.
fn from_value<T: de::DeserializeOwned>(value: Value) -> Result<T, Rejection> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let text = inner.to_string();
        // A missing top-level field: named as the path, like every other field.
        let missing = text
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(name, _)| name.to_owned());
        if let (".", Some(name)) = (path.as_str(), missing) {
            Rejection::field(&name, "missing field")
        } else if path == "." {
            Rejection::new(ReasonCode::InvalidField, text)
        } else {
            Rejection::field(&path, inner)
        }
    })
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// An integer that may also arrive as a decimal string (`"1234"`).
struct LenientInt(i64);

impl<'de> Deserialize<'de> for LenientInt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = LenientInt;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an integer or a decimal string")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<LenientInt, E> {
                Ok(LenientInt(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<LenientInt, E> {
                i64::try_from(v).map(LenientInt).map_err(|_| {
                    E::invalid_value(Unexpected::Unsigned(v), &"an integer below 2^63")
                })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<LenientInt, E> {
                let digits = v.strip_prefix('-').unwrap_or(v);
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(E::invalid_value(Unexpected::Str(v), &self));
                }
                v.parse()
                    .map(LenientInt)
                    .map_err(|_| E::invalid_value(Unexpected::Str(v), &"an integer below 2^63"))
            }
        }
        d.deserialize_any(V)
    }
}

fn int<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    LenientInt::deserialize(d).map(|v| v.0)
}

fn opt_int<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    Option::<LenientInt>::deserialize(d).map(|v| v.map(|v| v.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(body: &[u8]) -> Result<Announcement, Rejection> {
        decode(body, &Limits::default())
    }

    fn finished(body: &str) -> Recording {
        match dec(body.as_bytes()).expect("decodes").payload {
            Payload::Finished(r) => r,
            Payload::NotFinished(u) => panic!("not finished: {}", u.reason),
        }
    }

    const VIDEO: &str = r#"{"video_play_time":"25915","video_size":1431138,"video_format":"mp4",
        "video_duration":22504,"video_url":"http://1.vod2.myqcloud.com/f0.mp4","video_type":0}"#;

    #[test]
    fn integers_accept_decimal_strings() {
        let r = finished(&format!(
            r#"{{"room_id":"1234","start_time":"1557891712","video_info":[{VIDEO}]}}"#
        ));
        assert_eq!(r.room_id, 1234);
        assert_eq!(r.start_time, 1557891712);
        assert_eq!(r.videos[0].video_play_time, 25915);
    }

    #[test]
    fn wrong_types_name_the_field_path() {
        let video = VIDEO.replace("1431138", "\"1.4 MB\"");
        let err = dec(
            format!(r#"{{"room_id":1,"start_time":1,"video_info":[{VIDEO},{video}]}}"#).as_bytes(),
        )
        .unwrap_err();
        assert_eq!(err.code, ReasonCode::InvalidField);
        assert!(
            err.message.starts_with("video_info[1].video_size: "),
            "{}",
            err.message
        );

        let err = dec(br#"{"room_id":12.5,"video_info":[]}"#).unwrap_err();
        assert!(err.message.starts_with("room_id: "), "{}", err.message);

        let err =
            dec(br#"{"RoomId":1,"RecordStartTime":1,"VideoInfos":[{"VideoType":0}]}"#).unwrap_err();
        assert_eq!(err.code, ReasonCode::InvalidField);
        assert!(
            err.message.starts_with("VideoInfos[0]: missing field"),
            "{}",
            err.message
        );
    }

    #[test]
    fn formats_are_detected_by_their_keys() {
        let cases = [
            (
                r#"{"callback_type":"record_started","room_id":1}"#,
                Format::Callback,
            ),
            (r#"{"status":"recording","room_id":1}"#, Format::QueryAnswer),
            (
                r#"{"RoomId":1,"RecordStartTime":1,"VideoInfos":[]}"#,
                Format::PostClass,
            ),
            (
                r#"{"room_id":1,"start_time":1,"video_info":[]}"#,
                Format::ResultRecord,
            ),
        ];
        for (body, format) in cases {
            assert_eq!(dec(body.as_bytes()).unwrap().format, format, "{body}");
        }
        assert_eq!(dec(b"[1,2]").unwrap_err().code, ReasonCode::UnknownFormat);
        assert_eq!(
            dec(br#"{"hello":1}"#).unwrap_err().code,
            ReasonCode::UnknownFormat
        );
        assert_eq!(
            dec(b"{\"room_id\":1,}").unwrap_err().code,
            ReasonCode::InvalidJson
        );
    }

    #[test]
    fn unfinished_messages_carry_a_skip_reason() {
        let a = dec(br#"{"callback_type":"record_started","room_id":1,"task_id":"t"}"#).unwrap();
        assert!(
            matches!(a.payload, Payload::NotFinished(ref u) if u.reason.code == ReasonCode::RecordingStarted && u.in_progress)
        );
        let a = dec(br#"{"status":"prepared","room_id":1}"#).unwrap();
        assert!(
            matches!(a.payload, Payload::NotFinished(ref u) if u.reason.code == ReasonCode::NotFinished)
        );
    }

    #[test]
    fn an_upstream_error_code_is_rejected() {
        let err = dec(
            br#"{"callback_type":"record_finished","error_code":20099,"error_msg":"internal","room_id":1}"#,
        )
        .unwrap_err();
        assert_eq!(err.code, ReasonCode::UpstreamError);
        assert!(err.message.contains("20099"));
    }

    #[test]
    fn limits_have_their_own_reason_codes() {
        let limits = Limits {
            max_body_bytes: 200,
            max_tracks: 1,
            max_string_bytes: 10,
        };
        let big = format!(r#"{{"room_id":1,"pad":"{}"}}"#, " ".repeat(300));
        assert_eq!(
            decode(big.as_bytes(), &limits).unwrap_err().code,
            ReasonCode::BodyTooLarge
        );
        let err = decode(
            br#"{"room_id":1,"video_info":[{"user_id":"0123456789abc"}]}"#,
            &limits,
        )
        .unwrap_err();
        assert_eq!(err.code, ReasonCode::FieldTooLong);
        assert!(
            err.message.starts_with("video_info[0].user_id: "),
            "{}",
            err.message
        );
        let two = format!(r#"{{"room_id":1,"start_time":1,"video_info":[{VIDEO},{VIDEO}]}}"#);
        let limits = Limits {
            max_body_bytes: 10_000,
            max_tracks: 1,
            max_string_bytes: 100,
        };
        assert_eq!(
            decode(two.as_bytes(), &limits).unwrap_err().code,
            ReasonCode::TooManyTracks
        );
    }

    #[test]
    fn huge_and_negative_strings_are_checked() {
        let err = dec(br#"{"room_id":"99999999999999999999","video_info":[]}"#).unwrap_err();
        assert!(err.message.starts_with("room_id: "), "{}", err.message);
        let err = dec(br#"{"room_id":"12a","video_info":[]}"#).unwrap_err();
        assert!(err.message.starts_with("room_id: "), "{}", err.message);
        assert_eq!(
            finished(r#"{"room_id":"-5","start_time":0,"video_info":[]}"#).room_id,
            -5
        );
    }
}
