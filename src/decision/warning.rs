//! The warning-code vocabulary: what a record says about the repairs and
//! doubts behind it. A warning never stops a record; it tells the consumer
//! (and the operator reading the logs) what was assumed. Listed once here,
//! serialised as the snake_case strings of the schema's `warnings[].code`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a record carries a warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WarningCode {
    /// The recording lists no video files.
    NoTracks,
    /// A mixed video is listed together with separate tracks.
    MixedWithOtherTracks,
    /// No `group_id`: the room id is used, as TIC does by default.
    GroupIdDefaulted,
    /// No stop time or total time: the timeline is taken from the tracks.
    SpanUnknown,
    /// Start == stop: the timeline is taken from the tracks.
    ZeroSpan,
    /// The recording stops before it starts: the timeline is taken from the tracks.
    NegativeSpan,
    /// `stop_time - start_time` is implausible in seconds and read as ms.
    SpanUnitMs,
    /// The declared span is implausible either way; kept.
    SpanImplausible,
    /// A whiteboard or mixed video named a user: dropped.
    UserIdDropped,
    /// The declared format contradicts the URL's extension; the extension wins.
    FormatMismatch,
    /// No `video_format`: guessed from the URL, else `mp4`.
    FormatAssumed,
    /// `video_duration` is implausible in ms and read as seconds.
    DurationUnitSeconds,
    /// `video_duration` is implausible in ms and in s; kept as ms.
    DurationImplausible,
    /// The same file is listed twice: kept once.
    DuplicateTrack,
    /// Two different files share an id: the second is renamed.
    TrackIdCollision,
    /// More than 16 cameras at once: only the first 16 are tiled.
    TooManyCameras,
    /// The probed length differs from the declared one; the file's is used.
    DurationProbed,
    /// The file could not be probed (not an MP4, unreadable `moov`).
    ProbeFailed,
    /// The file's size differs from the declared `video_size`.
    SizeMismatch,
}

impl WarningCode {
    /// Every code, in documentation order.
    pub const ALL: [WarningCode; 19] = [
        WarningCode::NoTracks,
        WarningCode::MixedWithOtherTracks,
        WarningCode::GroupIdDefaulted,
        WarningCode::SpanUnknown,
        WarningCode::ZeroSpan,
        WarningCode::NegativeSpan,
        WarningCode::SpanUnitMs,
        WarningCode::SpanImplausible,
        WarningCode::UserIdDropped,
        WarningCode::FormatMismatch,
        WarningCode::FormatAssumed,
        WarningCode::DurationUnitSeconds,
        WarningCode::DurationImplausible,
        WarningCode::DuplicateTrack,
        WarningCode::TrackIdCollision,
        WarningCode::TooManyCameras,
        WarningCode::DurationProbed,
        WarningCode::ProbeFailed,
        WarningCode::SizeMismatch,
    ];

    /// The stable wire name (snake_case), as serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            WarningCode::NoTracks => "no_tracks",
            WarningCode::MixedWithOtherTracks => "mixed_with_other_tracks",
            WarningCode::GroupIdDefaulted => "group_id_defaulted",
            WarningCode::SpanUnknown => "span_unknown",
            WarningCode::ZeroSpan => "zero_span",
            WarningCode::NegativeSpan => "negative_span",
            WarningCode::SpanUnitMs => "span_unit_ms",
            WarningCode::SpanImplausible => "span_implausible",
            WarningCode::UserIdDropped => "user_id_dropped",
            WarningCode::FormatMismatch => "format_mismatch",
            WarningCode::FormatAssumed => "format_assumed",
            WarningCode::DurationUnitSeconds => "duration_unit_seconds",
            WarningCode::DurationImplausible => "duration_implausible",
            WarningCode::DuplicateTrack => "duplicate_track",
            WarningCode::TrackIdCollision => "track_id_collision",
            WarningCode::TooManyCameras => "too_many_cameras",
            WarningCode::DurationProbed => "duration_probed",
            WarningCode::ProbeFailed => "probe_failed",
            WarningCode::SizeMismatch => "size_mismatch",
        }
    }
}

impl fmt::Display for WarningCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_are_the_serialised_names_and_unique() {
        let mut seen = std::collections::HashSet::new();
        for code in WarningCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert!(seen.insert(code.as_str()), "{code} listed twice");
        }
    }

    #[test]
    fn the_contract_docs_list_every_code_once() {
        let mut documented = crate::decision::reason::documented_codes(
            include_str!("../../docs/contract.md"),
            "warning-codes",
        );
        let mut listed: Vec<String> = WarningCode::ALL.iter().map(|c| c.to_string()).collect();
        documented.sort();
        listed.sort();
        assert_eq!(documented, listed, "docs/contract.md's warning codes");
    }
}
