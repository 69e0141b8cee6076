//! The events a school's backend is told, as the bodies sent: the Standard
//! Webhooks shape `{"type", "timestamp", "data"}`. Each event's id is
//! derived from what it is about, so the same event — sent again after a
//! retry, a redelivery or a second worker's duplicate — always carries the
//! same `webhook-id`, and the receiver keeps one.
//!
//! - `lesson.replay_ready`: a lesson's record was published; `data.record`
//!   is the record itself, unless its JSON is larger than the limit
//!   (`webhook_max_record_bytes`): then `data.record` is null and `data`
//!   says where the whole record is (the archive's `manifest.json` when the
//!   lesson is archived; always the records queue).
//! - `lesson.replay_failed`: a lesson's message was parked: no record will
//!   come until an operator replays it.
//! - `webhook.test`: sent by `lesson-replay webhook test`.

use serde::Serialize;
use serde_json::json;
use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::decision::record::Record;

/// The AMQP `type` of an event waiting to be sent.
pub const WEBHOOK_TYPE: &str = "lesson-replay.webhook.v1";

/// The event types.
pub const REPLAY_READY: &str = "lesson.replay_ready";
pub const REPLAY_FAILED: &str = "lesson.replay_failed";
pub const TEST: &str = "webhook.test";

/// The namespace of event ids (a fixed UUID: ids are stable across versions).
const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6c65_7373_6f6e_2d72_6570_6c61_792d_7768);

/// One event: its id, the app it is for, and the exact bytes to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// `msg_` + 32 hex digits: the `webhook-id`.
    pub id: String,
    /// The event's type (`lesson.replay_ready`, ...).
    pub kind: &'static str,
    /// The app whose endpoint is told (`None`: an app unknown, told to the
    /// top-level `webhook_url`).
    pub app: Option<i64>,
    pub body: Vec<u8>,
}

/// Why a lesson has no record: what a school needs to act or to ask support.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Failure {
    pub sdkappid: Option<i64>,
    pub room_id: Option<i64>,
    pub task_id: Option<String>,
    pub replay_id: Option<String>,
    /// The reason code (docs/operations.md lists them).
    pub reason: String,
    pub message: String,
    /// Attempts made before it was parked.
    pub attempts: u32,
    /// When it first failed (RFC 3339), when known.
    pub first_failed_at: Option<String>,
    /// The MD5 of the parked message's body: what `lesson-replay dlq list`
    /// prints, for support to find it.
    pub message_md5: String,
}

fn id_of(parts: &[&str]) -> String {
    let name = parts.join("\u{1f}");
    format!(
        "msg_{}",
        Uuid::new_v5(&ID_NAMESPACE, name.as_bytes()).simple()
    )
}

/// The body of every event: `{"type", "timestamp", "data"}`.
#[derive(Serialize)]
struct Envelope<'a, T> {
    #[serde(rename = "type")]
    kind: &'a str,
    timestamp: String,
    data: T,
}

fn body<T: Serialize>(kind: &str, at: OffsetDateTime, data: T) -> Vec<u8> {
    let envelope = Envelope {
        kind,
        timestamp: at.format(&Rfc3339).unwrap_or_default(),
        data,
    };
    serde_json::to_vec(&envelope).expect("an event always serializes")
}

/// `data` of `lesson.replay_ready`.
#[derive(Serialize)]
struct Ready<'a> {
    replay_id: &'a str,
    sdkappid: Option<i64>,
    room_id: i64,
    task_id: Option<&'a str>,
    started_at: &'a str,
    duration_ms: i64,
    tracks: usize,
    record_bytes: usize,
    /// The record as published, or null when larger than the limit.
    record: Option<&'a RawValue>,
    /// Only when the record is not carried: where the archive keeps it.
    #[serde(skip_serializing_if = "Option::is_none")]
    manifest_uri: Option<Option<String>>,
}

/// The event of a published record, given as `record` and as the JSON
/// published (`record_json`, carried as it is, not serialized again).
/// `max_record_bytes` bounds the record carried in the body.
pub fn replay_ready(
    record: &Record,
    record_json: &[u8],
    at: OffsetDateTime,
    max_record_bytes: usize,
) -> Event {
    let carried = record_json.len() <= max_record_bytes;
    let raw = carried
        .then(|| serde_json::from_slice::<&RawValue>(record_json).ok())
        .flatten();
    let data = Ready {
        replay_id: &record.replay_id,
        sdkappid: record.sdkappid,
        room_id: record.room_id,
        task_id: record.task_id.as_deref(),
        started_at: &record.started_at,
        duration_ms: record.duration_ms,
        tracks: record.tracks.len(),
        record_bytes: record_json.len(),
        record: raw,
        manifest_uri: (!carried).then(|| manifest_uri(record)),
    };
    Event {
        id: id_of(&[REPLAY_READY, &record.replay_id]),
        kind: REPLAY_READY,
        app: record.sdkappid,
        body: body(REPLAY_READY, at, data),
    }
}

/// Where the archive keeps the whole record: beside its tracks, as
/// `manifest.json` (the layout of [`crate::media::archive::Archiver::manifest_key`]).
fn manifest_uri(record: &Record) -> Option<String> {
    let archived = record.tracks.iter().find_map(|t| t.archive.as_ref())?;
    let (folder, _) = archived.key.rsplit_once('/')?;
    Some(format!("s3://{}/{folder}/manifest.json", archived.bucket))
}

/// The event of a lesson parked. Its id names the lesson (or the message)
/// and the reason: parked again for the same reason, it is the same event.
pub fn replay_failed(failure: &Failure, at: OffsetDateTime) -> Event {
    let about = failure
        .replay_id
        .clone()
        .or_else(|| {
            failure
                .task_id
                .as_ref()
                .map(|t| format!("{}/{t}", failure.sdkappid.unwrap_or_default()))
        })
        .unwrap_or_else(|| failure.message_md5.clone());
    Event {
        id: id_of(&[REPLAY_FAILED, &about, &failure.reason]),
        kind: REPLAY_FAILED,
        app: failure.sdkappid,
        body: body(REPLAY_FAILED, at, failure),
    }
}

/// A test event for app `app`'s endpoint: a new id each time.
pub fn test(app: Option<i64>, at: OffsetDateTime) -> Event {
    let nonce = format!("{}", at.unix_timestamp_nanos());
    let data = json!({
        "sdkappid": app,
        "message": "a test event from lesson-replay: verify its signature, answer 2xx",
    });
    Event {
        id: id_of(&[TEST, &nonce]),
        kind: TEST,
        app,
        body: body(TEST, at, data),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::record::{Archive, Kind, Record, SCHEMA_VERSION, Source, Track};
    use serde_json::Value;
    use time::macros::datetime;

    fn ready(record: &Record, at: OffsetDateTime, max: usize) -> Event {
        replay_ready(record, &serde_json::to_vec(record).unwrap(), at, max)
    }

    fn record(tracks: usize) -> Record {
        Record {
            schema_version: SCHEMA_VERSION,
            replay_id: "rp_1".into(),
            source: Source::Realtime,
            sdkappid: Some(1400000001),
            room_id: 42,
            group_id: "42".into(),
            task_id: Some("task".into()),
            record_user_id: None,
            started_at: "2026-12-07T10:00:00Z".into(),
            duration_ms: 3_600_000,
            mixed: false,
            tracks: (0..tracks)
                .map(|n| Track {
                    track_id: format!("file{n}"),
                    kind: Kind::Camera,
                    user_id: Some(format!("student{n}")),
                    offset_ms: 0,
                    duration_ms: 3_600_000,
                    size_bytes: Some(1),
                    format: "mp4".into(),
                    source_url: format!("https://vod.example/{n}.mp4"),
                    vod_file_id: None,
                    archive: Some(Archive {
                        uri: format!("s3://school/lesson-replay/1400000001/42/rp_1/camera-{n}.mp4"),
                        bucket: "school".into(),
                        key: format!("lesson-replay/1400000001/42/rp_1/camera-{n}.mp4"),
                        size_bytes: 1,
                        md5: "0".repeat(32),
                        etag: None,
                    }),
                    probe: None,
                })
                .collect(),
            layout: Vec::new(),
            warnings: Vec::new(),
        }
    }

    #[test]
    fn the_same_lesson_is_the_same_event_whenever_it_is_sent() {
        let (t0, t1) = (
            datetime!(2026-12-07 10:00 UTC),
            datetime!(2026-12-08 10:00 UTC),
        );
        let a = ready(&record(1), t0, 20_000);
        let b = ready(&record(1), t1, 20_000);
        assert_eq!(a.id, b.id);
        assert!(a.id.starts_with("msg_") && a.id.len() == 36, "{}", a.id);
        let mut other = record(1);
        other.replay_id = "rp_2".into();
        assert_ne!(ready(&other, t0, 20_000).id, a.id);
        let failure = Failure {
            replay_id: Some("rp_1".into()),
            reason: "vod_not_found".into(),
            ..Failure::default()
        };
        let failed = replay_failed(&failure, t0);
        assert_eq!(failed.id, replay_failed(&failure, t1).id);
        assert_ne!(failed.id, a.id);
        let other_reason = Failure {
            reason: "archive_denied".into(),
            ..failure.clone()
        };
        assert_ne!(replay_failed(&other_reason, t0).id, failed.id);
        assert_ne!(test(None, t0).id, test(None, t1).id);
    }

    #[test]
    fn a_record_over_the_limit_is_told_where_it_is_not_carried() {
        let at = datetime!(2026-12-07 10:00 UTC);
        let small = ready(&record(2), at, 20_000);
        let body: Value = serde_json::from_slice(&small.body).unwrap();
        assert_eq!(body["type"], REPLAY_READY);
        assert_eq!(body["timestamp"], "2026-12-07T10:00:00Z");
        assert_eq!(
            body["data"]["record"]["tracks"].as_array().unwrap().len(),
            2
        );
        let large = ready(&record(200), at, 20_000);
        assert!(large.body.len() < 2_000, "{}", large.body.len());
        let body: Value = serde_json::from_slice(&large.body).unwrap();
        assert!(body["data"]["record"].is_null());
        assert!(body["data"]["record_bytes"].as_u64().unwrap() > 20_000);
        assert_eq!(body["data"]["tracks"], 200);
        assert_eq!(
            body["data"]["manifest_uri"],
            "s3://school/lesson-replay/1400000001/42/rp_1/manifest.json"
        );
    }
}
