//! The lesson-replay record, schema v1: what the worker publishes, one per
//! recording. Pinned as JSON Schema in `proto/lesson-replay.v1.schema.json`;
//! changing a field here means changing the schema (the tests check both agree).

use serde::{Deserialize, Serialize};

use crate::decision::warning::WarningCode;

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub schema_version: u32,
    /// Deterministic: the same recording always gets the same id.
    pub replay_id: String,
    pub source: Source,
    pub sdkappid: Option<i64>,
    pub room_id: i64,
    pub group_id: String,
    pub task_id: Option<String>,
    pub record_user_id: Option<String>,
    /// RFC 3339, UTC.
    pub started_at: String,
    /// Length of the lesson timeline.
    pub duration_ms: i64,
    /// The recording is a single mixed video.
    pub mixed: bool,
    pub tracks: Vec<Track>,
    pub layout: Vec<Segment>,
    pub warnings: Vec<Warning>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Realtime,
    PostClass,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Realtime => "realtime",
            Source::PostClass => "post_class",
        }
    }
}

/// What a track shows; the declaration order is the sort order of tracks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Camera,
    ScreenShare,
    Whiteboard,
    Mixed,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Camera => "camera",
            Kind::ScreenShare => "screen_share",
            Kind::Whiteboard => "whiteboard",
            Kind::Mixed => "mixed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Track {
    /// Unique within the record: the VOD file id where present.
    pub track_id: String,
    pub kind: Kind,
    /// Null for whiteboard and mixed videos.
    pub user_id: Option<String>,
    /// Position on the lesson timeline.
    pub offset_ms: i64,
    pub duration_ms: i64,
    pub size_bytes: Option<i64>,
    /// Lowercase container format.
    pub format: String,
    pub source_url: String,
    pub vod_file_id: Option<String>,
    /// Where the archived copy is (filled when archiving is on).
    pub archive: Option<Archive>,
    /// What the file itself says (filled when the file is probed).
    pub probe: Option<Probe>,
}

impl Track {
    pub fn end_ms(&self) -> i64 {
        self.offset_ms.saturating_add(self.duration_ms)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Archive {
    pub uri: String,
    pub bucket: String,
    pub key: String,
    pub size_bytes: i64,
    pub md5: String,
    pub etag: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    pub duration_ms: i64,
    pub width: Option<u32>,
    pub height: Option<u32>,
}

/// A stretch of the timeline in which the set of visible tracks is constant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    pub from_ms: i64,
    pub to_ms: i64,
    pub main: Option<Placement>,
    pub tiles: Vec<Placement>,
}

/// A track's box on the canvas, in fractions of the canvas size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub track_id: String,
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
}

/// Something normalization had to assume or repair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Warning {
    pub code: WarningCode,
    pub message: String,
    /// The track the warning is about (its `track_id`); absent for a
    /// warning about the whole lesson.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_id: Option<String>,
}

impl Warning {
    pub fn new(code: WarningCode, message: impl Into<String>) -> Self {
        Warning {
            code,
            message: message.into(),
            track_id: None,
        }
    }

    /// The warning tied to the track `track_id`.
    pub fn on_track(mut self, track_id: &str) -> Self {
        self.track_id = Some(track_id.to_owned());
        self
    }
}
