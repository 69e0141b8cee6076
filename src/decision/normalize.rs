//! Normalize: a declared [`Recording`] becomes a [`Record`] a replay player can
//! use. Every repair of the upstream's known traps (contract §6) is recorded as
//! a warning in the record, never done silently.

use std::collections::HashMap;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::decision::decode::{Recording, VideoInfo};
use crate::decision::layout::compute_layout;
use crate::decision::reason::Rejection;
use crate::decision::record::{Kind, Probe, Record, SCHEMA_VERSION, Source, Track, Warning};
use crate::decision::warning::WarningCode;

/// Namespace of the v5 UUIDs used as replay ids. Never change it: ids would change.
const REPLAY_NAMESPACE: Uuid = Uuid::from_u128(0x6c65_7373_6f6e_4a72_a570_6c61_7900_0001);

/// Above this bitrate a millisecond reading of `video_duration` is implausible.
const MAX_PLAUSIBLE_BITS_PER_S: f64 = 20_000_000.0;
/// How far a track may end beyond the recording span before its duration is suspect.
const SPAN_TOLERANCE: f64 = 1.05;
/// No lesson recording lasts a day; a longer declared span is a unit mistake.
const MAX_PLAUSIBLE_SPAN_MS: i64 = 24 * 3600 * 1000;
/// Recording times (Unix seconds) a real lesson can have: 2000 to 2100.
const PLAUSIBLE_UNIX_TIMES: std::ops::Range<i64> = 946_684_800..4_102_444_800;
/// Offsets and durations beyond a week (in ms: longer still in s) are refused.
const MAX_PLAUSIBLE_TIMELINE_MS: i64 = 7 * 24 * 3600 * 1000;
/// A probed duration further than this from the declared one replaces it.
const PROBE_TOLERANCE: f64 = 0.02;

/// The replay id of a recording: a UUID v5, stable across formats and redeliveries.
///
/// With a task id it derives from `(sdkappid, task_id)` only, so a callback and
/// a query answer for the same task agree. Without one (result records,
/// post-class results without `TaskId`) it derives from
/// `(source, sdkappid, room_id, start_time, mixed or not)`.
pub fn replay_id(sdkappid: Option<i64>, recording: &Recording) -> String {
    let app = sdkappid.map(|a| a.to_string()).unwrap_or_default();
    let name = match recording.task_id.as_deref().filter(|t| !t.is_empty()) {
        Some(task) => format!("task:{app}:{task}"),
        None => {
            // A mixed and an unmixed post-class recording of one lesson are two recordings.
            let mixed =
                !recording.videos.is_empty() && recording.videos.iter().all(|v| v.video_type == 3);
            format!(
                "recording:{}:{app}:{}:{}:{}",
                source_of(recording).as_str(),
                recording.room_id,
                recording.start_time,
                if mixed { "mixed" } else { "tracks" }
            )
        }
    };
    Uuid::new_v5(&REPLAY_NAMESPACE, name.as_bytes()).to_string()
}

fn source_of(recording: &Recording) -> Source {
    if recording.post_class {
        Source::PostClass
    } else {
        Source::Realtime
    }
}

/// A record with what it was derived from that later stages still need.
#[derive(Debug, Clone)]
pub struct Normalized {
    pub record: Record,
    /// The declared span of the recording, when usable.
    pub span_ms: Option<i64>,
}

impl Normalized {
    /// Recompute the timeline length and the layout after track durations changed.
    pub fn relayout(&mut self) {
        let record = &mut self.record;
        let last_end = record.tracks.iter().map(Track::end_ms).max().unwrap_or(0);
        record.duration_ms = self.span_ms.unwrap_or(0).max(last_end);
        let (layout, warnings) = compute_layout(&record.tracks, record.duration_ms);
        record.layout = layout;
        record
            .warnings
            .retain(|w| w.code != WarningCode::TooManyCameras);
        record.warnings.extend(warnings);
    }

    /// Record what the file says about track `index`; the probed duration wins
    /// when it disagrees with the declared one by more than 2 %.
    pub fn apply_probe(&mut self, index: usize, probe: Probe) {
        let track = &mut self.record.tracks[index];
        let declared = track.duration_ms;
        let off_by = (probe.duration_ms - declared).abs() as f64;
        if off_by > PROBE_TOLERANCE * declared.max(1) as f64 {
            let warning = Warning::new(
                WarningCode::DurationProbed,
                format!(
                    "track {}: the file lasts {} ms, not the {} ms declared; the file's length is used",
                    track.track_id, probe.duration_ms, declared
                ),
            ).on_track(&track.track_id);
            track.duration_ms = probe.duration_ms;
            self.record.warnings.push(warning);
        }
        self.record.tracks[index].probe = Some(probe);
    }
}

/// Build the record for a finished recording.
pub fn normalize(recording: &Recording, sdkappid: Option<i64>) -> Result<Normalized, Rejection> {
    let mut warnings = Vec::new();
    if recording.room_id < 0 {
        return Err(Rejection::field(
            field_name(recording, "room_id"),
            "must not be negative",
        ));
    }
    let started_at = OffsetDateTime::from_unix_timestamp(recording.start_time)
        .ok()
        .filter(|_| PLAUSIBLE_UNIX_TIMES.contains(&recording.start_time))
        .and_then(|t| t.format(&Rfc3339).ok())
        .ok_or_else(|| {
            Rejection::field(
                field_name(recording, "start_time"),
                "not a Unix time (seconds) between 2000 and 2100",
            )
        })?;
    if let Some(stop) = recording.stop_time
        && !PLAUSIBLE_UNIX_TIMES.contains(&stop)
    {
        return Err(Rejection::field(
            "stop_time",
            "not a Unix time (seconds) between 2000 and 2100",
        ));
    }
    let texts = [
        ("task_id", &recording.task_id),
        ("group_id", &recording.group_id),
        ("record_user_id", &recording.record_user_id),
    ];
    for (field, value) in texts {
        check_text(value.as_deref())
            .map_err(|problem| Rejection::field(field_name(recording, field), problem))?;
    }
    let span_ms = recording_span(recording, &mut warnings);
    let tracks = normalize_tracks(recording, span_ms, &mut warnings)?;
    let mixed = !tracks.is_empty() && tracks.iter().all(|t| t.kind == Kind::Mixed);
    if !mixed && tracks.iter().any(|t| t.kind == Kind::Mixed) {
        warnings.push(Warning::new(
            WarningCode::MixedWithOtherTracks,
            "a mixed video is listed together with separate tracks",
        ));
    }

    let group_id = match recording.group_id.as_deref().filter(|g| !g.is_empty()) {
        Some(g) => g.to_owned(),
        None => {
            warnings.push(Warning::new(
                WarningCode::GroupIdDefaulted,
                "no group_id: the room id is used, as TIC does by default",
            ));
            recording.room_id.to_string()
        }
    };
    let record = Record {
        schema_version: SCHEMA_VERSION,
        replay_id: replay_id(sdkappid, recording),
        source: source_of(recording),
        sdkappid,
        room_id: recording.room_id,
        group_id,
        task_id: recording.task_id.clone().filter(|t| !t.is_empty()),
        record_user_id: recording.record_user_id.clone().filter(|u| !u.is_empty()),
        started_at,
        duration_ms: 0, // set by relayout()
        mixed,
        tracks,
        layout: Vec::new(),
        warnings,
    };
    let mut normalized = Normalized { record, span_ms };
    normalized.relayout();
    Ok(normalized)
}

fn field_name(recording: &Recording, snake: &'static str) -> &'static str {
    match (recording.post_class, snake) {
        (true, "room_id") => "RoomId",
        (true, "start_time") => "RecordStartTime",
        (true, "group_id") => "GroupId",
        (true, "total_time") => "TotalTime",
        _ => snake,
    }
}

/// A track field as the post-class format spells it: `user_id` → `UserId`.
fn pascal_case(snake: &str) -> String {
    snake
        .split('_')
        .map(|word| {
            let mut chars = word.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect()
}

/// The declared length of the recording in ms, when the upstream gave a usable one.
fn recording_span(recording: &Recording, warnings: &mut Vec<Warning>) -> Option<i64> {
    let declared = if recording.post_class {
        recording.total_time_ms
    } else {
        recording.stop_time.map(|stop| {
            stop.saturating_sub(recording.start_time)
                .saturating_mul(1000)
        })
    };
    match declared {
        None => {
            warnings.push(Warning::new(
                WarningCode::SpanUnknown,
                "no stop time or total time: the timeline is taken from the tracks",
            ));
            None
        }
        Some(0) => {
            warnings.push(Warning::new(
 WarningCode::ZeroSpan,
                "the recording declares a zero length (start == stop): the timeline is taken from the tracks",
            ));
            None
        }
        Some(ms) if ms < 0 => {
            warnings.push(Warning::new(
                WarningCode::NegativeSpan,
                "the recording stops before it starts: the timeline is taken from the tracks",
            ));
            None
        }
        Some(ms) if ms > MAX_PLAUSIBLE_SPAN_MS && !recording.post_class => {
            // The contract's own result example has stop - start = 1 440 000 "s":
            // a millisecond length added to a seconds timestamp. Read it as ms
            // when the tracks (declared ms) fit that reading.
            let as_ms = ms / 1000;
            let tracks_end = recording
                .videos
                .iter()
                .map(|v| v.video_play_time.saturating_add(v.video_duration))
                .max()
                .unwrap_or(0);
            if tracks_end > 0 && tracks_end as f64 <= as_ms as f64 * SPAN_TOLERANCE {
                warnings.push(Warning::new(
                    WarningCode::SpanUnitMs,
                    format!(
                        "stop_time - start_time = {as_ms} is implausible in seconds, read as ms"
                    ),
                ));
                Some(as_ms)
            } else {
                warnings.push(Warning::new(
                    WarningCode::SpanImplausible,
                    format!("the recording declares {} hours", ms / 3_600_000),
                ));
                Some(ms)
            }
        }
        Some(ms) => Some(ms),
    }
}

type FieldError = (&'static str, String);

/// Ids and names are printable text: control characters are refused (any
/// other Unicode, e.g. a Chinese user name, is fine).
/// Characters that are not control characters to Unicode but act like them
/// in a log line or a page: bidirectional overrides and isolates (they
/// reorder what a reader sees) and the line and paragraph separators.
fn is_invisible_control(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
            | '\u{2028}' | '\u{2029}'
    )
}

fn check_text(value: Option<&str>) -> Result<(), String> {
    match value.and_then(|v| {
        v.chars()
            .find(|c| c.is_control() || is_invisible_control(*c))
    }) {
        Some(c) => Err(format!("contains the control character {:?}", c)),
        None => Ok(()),
    }
}

/// Every video of the recording as a track: checked, repaired, without
/// duplicates, in timeline order (offset, kind, user, id).
fn normalize_tracks(
    recording: &Recording,
    span_ms: Option<i64>,
    warnings: &mut Vec<Warning>,
) -> Result<Vec<Track>, Rejection> {
    let list = if recording.post_class {
        "VideoInfos"
    } else {
        "video_info"
    };
    let mut tracks = Vec::with_capacity(recording.videos.len());
    for (i, video) in recording.videos.iter().enumerate() {
        let track = normalize_track(video, i, span_ms, warnings).map_err(|(field, problem)| {
            let field = if recording.post_class {
                pascal_case(field)
            } else {
                field.to_owned()
            };
            Rejection::field(&format!("{list}[{i}].{field}"), problem)
        })?;
        tracks.push(track);
    }
    let mut tracks = dedupe_tracks(tracks, warnings);
    tracks.sort_by(|a, b| {
        (a.offset_ms, a.kind, &a.user_id, &a.track_id).cmp(&(
            b.offset_ms,
            b.kind,
            &b.user_id,
            &b.track_id,
        ))
    });
    if tracks.is_empty() {
        warnings.push(Warning::new(
            WarningCode::NoTracks,
            "the recording lists no video files",
        ));
    }
    Ok(tracks)
}

// Long by nature: one repair per field of a video, in the order of the
// contract's table, each with its warning; split, the order would be lost.
fn normalize_track(
    video: &VideoInfo,
    index: usize,
    span_ms: Option<i64>,
    warnings: &mut Vec<Warning>,
) -> Result<Track, FieldError> {
    let non_negative = |field: &'static str, v: i64| {
        if v < 0 {
            Err((field, format!("must not be negative, got {v}")))
        } else {
            Ok(v)
        }
    };
    // A week, in ms: no lesson's file lasts or starts later than that.
    let plausible = |field: &'static str, v: i64| {
        if v > MAX_PLAUSIBLE_TIMELINE_MS {
            Err((field, format!("{v} is more than a week, in ms or in s")))
        } else {
            Ok(v)
        }
    };
    let offset_ms = non_negative("video_play_time", video.video_play_time)
        .and_then(|v| plausible("video_play_time", v))?;
    let declared_duration = non_negative("video_duration", video.video_duration)
        .and_then(|v| plausible("video_duration", v))?;
    let size_bytes = video
        .video_size
        .map(|s| non_negative("video_size", s))
        .transpose()?;
    let kind = match video.video_type {
        0 => Kind::Camera,
        1 => Kind::ScreenShare,
        2 => Kind::Whiteboard,
        3 => Kind::Mixed,
        other => {
            return Err((
                "video_type",
                format!("unknown value {other} (0, 1, 2 or 3)"),
            ));
        }
    };
    let url =
        url::Url::parse(&video.video_url).map_err(|e| ("video_url", format!("not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err((
            "video_url",
            format!("scheme {:?} is not http or https", url.scheme()),
        ));
    }
    for (field, value) in [
        ("video_id", &video.video_id),
        ("user_id", &video.user_id),
        ("video_format", &video.video_format),
    ] {
        check_text(value.as_deref()).map_err(|problem| (field, problem))?;
    }
    let vod_file_id = video.video_id.clone().filter(|id| !id.is_empty());
    let track_id = vod_file_id
        .clone()
        .unwrap_or_else(|| format!("track-{}", index + 1));

    let mut user_id = video.user_id.clone().filter(|u| !u.is_empty());
    if let (Kind::Whiteboard | Kind::Mixed, Some(user)) = (kind, &user_id) {
        warnings.push(
            Warning::new(
                WarningCode::UserIdDropped,
                format!(
                    "track {track_id}: a {} video has no owner, user {user:?} dropped",
                    kind.as_str()
                ),
            )
            .on_track(&track_id),
        );
        user_id = None;
    }
    let format = resolve_format(video.video_format.as_deref(), &url, &track_id, warnings);
    let duration_ms = resolve_duration(
        declared_duration,
        size_bytes,
        offset_ms,
        span_ms,
        &track_id,
        warnings,
    );
    Ok(Track {
        track_id,
        kind,
        user_id,
        offset_ms,
        duration_ms,
        size_bytes,
        format,
        source_url: video.video_url.clone(),
        vod_file_id,
        archive: None,
        probe: None,
    })
}

/// The container format: declared, lowercased; the URL's extension wins when
/// the two disagree (the contract shows `flv` declared for `.mp4` files).
fn resolve_format(
    declared: Option<&str>,
    url: &url::Url,
    track_id: &str,
    warnings: &mut Vec<Warning>,
) -> String {
    let from_url = url
        .path_segments()
        .and_then(|mut s| s.next_back())
        .and_then(|name| name.rsplit_once('.'))
        .map(|(_, ext)| ext.to_ascii_lowercase())
        .filter(|ext| matches!(ext.as_str(), "mp4" | "flv" | "m3u8" | "mov" | "webm"));
    let declared = declared
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(str::to_ascii_lowercase);
    match (declared, from_url) {
        (Some(d), Some(u)) if d != u => {
            warnings.push(
                Warning::new(
                    WarningCode::FormatMismatch,
                    format!("track {track_id}: format {d:?} declared for a .{u} URL, {u:?} used"),
                )
                .on_track(track_id),
            );
            u
        }
        (Some(d), _) => d,
        (None, guess) => {
            let guess = guess.unwrap_or_else(|| "mp4".to_owned());
            warnings.push(
                Warning::new(
                    WarningCode::FormatAssumed,
                    format!("track {track_id}: no video_format, {guess:?} assumed"),
                )
                .on_track(track_id),
            );
            guess
        }
    }
}

/// Is `duration_ms` a believable length for this file at this offset?
fn plausible_ms(
    duration_ms: i64,
    size_bytes: Option<i64>,
    offset_ms: i64,
    span_ms: Option<i64>,
) -> bool {
    let bitrate_ok = match size_bytes {
        Some(size) if duration_ms > 0 => {
            (size as f64 * 8.0) / (duration_ms as f64 / 1000.0) <= MAX_PLAUSIBLE_BITS_PER_S
        }
        _ => true,
    };
    let fits_span = match span_ms {
        Some(span) => (offset_ms as f64 + duration_ms as f64) <= span as f64 * SPAN_TOLERANCE,
        None => true,
    };
    bitrate_ok && fits_span
}

/// `video_duration` in ms (contract §6.1): milliseconds, unless that reading
/// is implausible and the seconds reading is not.
pub fn resolve_duration(
    declared: i64,
    size_bytes: Option<i64>,
    offset_ms: i64,
    span_ms: Option<i64>,
    track_id: &str,
    warnings: &mut Vec<Warning>,
) -> i64 {
    if plausible_ms(declared, size_bytes, offset_ms, span_ms) {
        return declared;
    }
    let as_seconds = declared.saturating_mul(1000);
    if plausible_ms(as_seconds, size_bytes, offset_ms, span_ms) {
        warnings.push(Warning::new(
            WarningCode::DurationUnitSeconds,
            format!(
                "track {track_id}: video_duration {declared} is implausible in ms, read as seconds"
            ),
        ).on_track(track_id));
        return as_seconds;
    }
    warnings.push(Warning::new(
        WarningCode::DurationImplausible,
        format!(
            "track {track_id}: video_duration {declared} is implausible in ms and in s, kept as ms"
        ),
    ).on_track(track_id));
    declared
}

/// Drop exact repeats of a file; give colliding ids distinct suffixes.
fn dedupe_tracks(tracks: Vec<Track>, warnings: &mut Vec<Warning>) -> Vec<Track> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out: Vec<Track> = Vec::with_capacity(tracks.len());
    for mut track in tracks {
        if out.contains(&track) {
            warnings.push(
                Warning::new(
                    WarningCode::DuplicateTrack,
                    format!("track {} is listed twice, kept once", track.track_id),
                )
                .on_track(&track.track_id),
            );
            continue;
        }
        let count = seen.entry(track.track_id.clone()).or_insert(0);
        *count += 1;
        if *count > 1 {
            let renamed = format!("{}-{}", track.track_id, count);
            warnings.push(Warning::new(
                WarningCode::TrackIdCollision,
                format!(
                    "two different files share id {}: the second is {renamed}",
                    track.track_id
                ),
            ));
            track.track_id = renamed;
        }
        out.push(track);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::reason::ReasonCode;

    fn video(play: i64, size: i64, duration: i64, kind: i64, user: &str) -> VideoInfo {
        VideoInfo {
            video_play_time: play,
            video_size: Some(size),
            video_format: Some("mp4".into()),
            video_duration: duration,
            video_url: format!("http://1.vod2.myqcloud.com/{kind}{user}.mp4"),
            video_id: Some(format!("{kind}{user}{play}")),
            video_type: kind,
            user_id: Some(user.into()),
        }
    }

    fn recording(stop_after_s: i64, videos: Vec<VideoInfo>) -> Recording {
        Recording {
            post_class: false,
            task_id: Some("task-1".into()),
            record_user_id: Some("tic_record_user_1_1".into()),
            room_id: 1,
            group_id: Some("1".into()),
            start_time: 1_600_000_000,
            stop_time: Some(1_600_000_000 + stop_after_s),
            total_time_ms: None,
            videos,
        }
    }

    fn codes(record: &Record) -> Vec<&str> {
        record.warnings.iter().map(|w| w.code.as_str()).collect()
    }

    #[test]
    fn plausible_milliseconds_are_kept() {
        // 22.5 s for 1.4 MB: ~0.5 Mbit/s.
        let r = normalize(
            &recording(60, vec![video(0, 1_431_138, 22_504, 0, "a")]),
            None,
        )
        .unwrap()
        .record;
        assert_eq!(r.tracks[0].duration_ms, 22_504);
        assert!(codes(&r).is_empty(), "{:?}", r.warnings);
    }

    #[test]
    fn bitrate_implausible_in_ms_is_read_as_seconds() {
        // 1 GB in 3.6 s would be 2.2 Gbit/s; in 3600 s it is 2.2 Mbit/s.
        let r = normalize(
            &recording(4000, vec![video(0, 1_000_000_000, 3600, 0, "a")]),
            None,
        )
        .unwrap()
        .record;
        assert_eq!(r.tracks[0].duration_ms, 3_600_000);
        assert_eq!(codes(&r), ["duration_unit_seconds"]);
        assert_eq!(r.duration_ms, 4_000_000);
    }

    #[test]
    fn the_span_limits_both_readings() {
        // 2 MB in "3000" at a 1 h span: 3 s is fine by bitrate (5.3 Mbit/s) and span.
        let r = normalize(
            &recording(3600, vec![video(0, 2_000_000, 3000, 0, "a")]),
            None,
        )
        .unwrap()
        .record;
        assert_eq!(r.tracks[0].duration_ms, 3000);
        // 50 MB in "3000": 133 Mbit/s in ms; in s 133 kbit/s and 3000 s fits the hour.
        let r = normalize(
            &recording(3600, vec![video(0, 50_000_000, 3000, 0, "a")]),
            None,
        )
        .unwrap()
        .record;
        assert_eq!(r.tracks[0].duration_ms, 3_000_000);
        assert_eq!(codes(&r), ["duration_unit_seconds"]);
        // The same file in a 60 s recording: 3000 s would end far past the span.
        let r = normalize(
            &recording(60, vec![video(0, 50_000_000, 3000, 0, "a")]),
            None,
        )
        .unwrap()
        .record;
        assert_eq!(r.tracks[0].duration_ms, 3000);
        assert_eq!(codes(&r), ["duration_implausible"]);
        // 90 s of video in a 60 s recording: past the span by more than 5 %.
        let r = normalize(&recording(60, vec![video(0, 1000, 90_000, 0, "a")]), None)
            .unwrap()
            .record;
        assert_eq!(codes(&r), ["duration_implausible"]);
        // 62 s is within the 5 % tolerance.
        let r = normalize(&recording(60, vec![video(0, 1000, 62_000, 0, "a")]), None)
            .unwrap()
            .record;
        assert!(codes(&r).is_empty());
    }

    #[test]
    fn implausible_both_ways_is_kept_with_a_warning() {
        // 10 GB for "100": 800 Gbit/s as ms, 800 Mbit/s as s.
        let r = normalize(
            &recording(3600, vec![video(0, 10_000_000_000, 100, 0, "a")]),
            None,
        )
        .unwrap()
        .record;
        assert_eq!(r.tracks[0].duration_ms, 100);
        assert_eq!(codes(&r), ["duration_implausible"]);
    }

    #[test]
    fn a_span_of_days_matching_the_tracks_in_ms_is_read_as_ms() {
        // Contract §2.5: stop - start = 1 440 000, tracks end at 1 440 000 ms.
        let r = normalize(
            &recording(1_440_000, vec![video(120_000, 1241, 1_320_000, 2, "")]),
            None,
        )
        .unwrap()
        .record;
        assert_eq!(r.duration_ms, 1_440_000);
        assert_eq!(codes(&r), ["span_unit_ms"]);
        // Two days with a ten-minute track: 172.8 s cannot hold it, keep it and say so.
        let r = normalize(
            &recording(172_800, vec![video(0, 1000, 600_000, 0, "a")]),
            None,
        )
        .unwrap()
        .record;
        assert_eq!(r.duration_ms, 172_800_000);
        assert_eq!(codes(&r), ["span_implausible"]);
    }

    #[test]
    fn probes_replace_durations_that_are_off_by_more_than_two_percent() {
        let mut n = normalize(
            &recording(
                0,
                vec![video(0, 10, 10_000, 0, "a"), video(0, 10, 10_000, 2, "")],
            ),
            None,
        )
        .unwrap();
        let probe = |ms| Probe {
            duration_ms: ms,
            width: Some(320),
            height: Some(240),
        };
        n.apply_probe(0, probe(10_150)); // 1.5 %: declared kept
        n.apply_probe(1, probe(20_000));
        n.relayout();
        let r = &n.record;
        assert_eq!(
            (r.tracks[0].duration_ms, r.tracks[1].duration_ms),
            (10_000, 20_000)
        );
        assert_eq!(r.tracks[0].probe.as_ref().unwrap().duration_ms, 10_150);
        assert_eq!(codes(r), ["zero_span", "duration_probed"]);
        assert_eq!(r.duration_ms, 20_000);
        assert_eq!(r.layout.last().unwrap().to_ms, 20_000);
    }

    #[test]
    fn traps_are_repaired_with_warnings() {
        let mut board = video(0, 100, 5000, 2, "pc_test1");
        board.video_format = Some("FLV".into());
        let r = normalize(&recording(0, vec![board]), None).unwrap().record;
        let t = &r.tracks[0];
        assert_eq!((t.user_id.as_deref(), t.format.as_str()), (None, "mp4"));
        assert_eq!(
            codes(&r),
            ["zero_span", "user_id_dropped", "format_mismatch"]
        );
        assert_eq!(r.duration_ms, 5000);
    }

    #[test]
    fn replay_id_is_stable_and_keyed_by_task() {
        let a = recording(60, vec![video(0, 10, 1000, 0, "a")]);
        let mut b = recording(99, vec![]);
        b.room_id = 7;
        assert_eq!(replay_id(Some(5), &a), replay_id(Some(5), &b));
        assert_ne!(replay_id(Some(5), &a), replay_id(Some(6), &a));
        b.task_id = None;
        assert_ne!(replay_id(Some(5), &a), replay_id(Some(5), &b));
        assert_eq!(replay_id(Some(5), &b), replay_id(Some(5), &b.clone()));
    }

    #[test]
    fn tracks_are_sorted_and_ids_unique() {
        let mut twin = video(0, 10, 1000, 0, "b");
        twin.video_id = Some("0a0".into());
        let r = normalize(
            &recording(
                60,
                vec![
                    video(500, 10, 1000, 0, "z"),
                    video(0, 10, 1000, 0, "a"),
                    twin,
                    video(0, 10, 1000, 0, "a"),
                ],
            ),
            None,
        )
        .unwrap()
        .record;
        let ids: Vec<&str> = r.tracks.iter().map(|t| t.track_id.as_str()).collect();
        assert_eq!(ids, ["0a0", "0a0-2", "0z500"]);
        assert_eq!(codes(&r), ["track_id_collision", "duplicate_track"]);
    }

    #[test]
    fn control_characters_in_ids_are_refused_but_unicode_is_fine() {
        let mut evil = video(0, 10, 1000, 0, "a");
        evil.user_id = Some("teacher\u{0}\r\n".into());
        let err = normalize(&recording(60, vec![evil]), None).unwrap_err();
        assert!(
            err.message
                .starts_with("video_info[0].user_id: contains the control"),
            "{}",
            err.message
        );
        let mut chinese = video(0, 10, 1000, 0, "a");
        chinese.user_id = Some("王老师 👩‍🏫".into());
        let r = normalize(&recording(60, vec![chinese]), None)
            .unwrap()
            .record;
        assert_eq!(r.tracks[0].user_id.as_deref(), Some("王老师 👩‍🏫"));
        let mut bad_task = recording(60, vec![]);
        bad_task.task_id = Some("t\u{7}".into());
        assert!(
            normalize(&bad_task, None)
                .unwrap_err()
                .message
                .starts_with("task_id: ")
        );
    }

    #[test]
    fn impossible_values_name_their_field() {
        let err = normalize(&recording(60, vec![video(-1, 10, 1000, 0, "a")]), None).unwrap_err();
        assert_eq!(err.code, ReasonCode::InvalidField);
        assert!(
            err.message.starts_with("video_info[0].video_play_time"),
            "{}",
            err.message
        );
        let err = normalize(&recording(60, vec![video(0, 10, 1000, 9, "a")]), None).unwrap_err();
        assert!(
            err.message.starts_with("video_info[0].video_type"),
            "{}",
            err.message
        );
        let mut bad_url = video(0, 10, 1000, 0, "a");
        bad_url.video_url = "file:///etc/passwd".into();
        let err = normalize(&recording(60, vec![bad_url]), None).unwrap_err();
        assert!(
            err.message.starts_with("video_info[0].video_url"),
            "{}",
            err.message
        );
    }
}
