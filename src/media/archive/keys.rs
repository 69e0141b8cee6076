//! Where each object goes. Keys are deterministic, so a redelivered message
//! finds what an earlier attempt wrote; every segment taken from a message is
//! sanitized, so a hostile id never writes outside its lesson's folder.

use crate::decision::record::{Kind, Record, Track};
use crate::media::archive::{Archiver, md5_hex};

/// The key prefix of every object unless `s3_prefix` says otherwise.
pub const DEFAULT_PREFIX: &str = "lesson-replay";

/// The folder (under the prefix) of each archived object's record — its size,
/// ETag, MD5 and probe — written after the upload, read by
/// [`Archiver::existing`]: `<records>/<MD5 of the object key>.json`. No key
/// segment of a lesson starts with a dot, so it never meets one.
pub(crate) const OBJECT_RECORDS: &str = ".lesson-replay-objects";

impl Archiver {
    /// The key of a track's copy.
    pub fn track_key(&self, record: &Record, track: &Track) -> String {
        let owner = match (track.kind, &track.user_id) {
            (_, Some(user)) => sanitize_segment(user),
            (Kind::Whiteboard | Kind::Mixed, None) | (_, None) => "board".to_owned(),
        };
        let name = format!(
            "{}-{}-{}.{}",
            track.kind.as_str(),
            owner,
            sanitize_segment(&track.track_id),
            sanitize_segment(&track.format)
        );
        format!("{}/{name}", self.lesson_folder(record))
    }

    /// The key of the record's `manifest.json`.
    pub fn manifest_key(&self, record: &Record) -> String {
        format!("{}/manifest.json", self.lesson_folder(record))
    }

    pub(crate) fn lesson_folder(&self, record: &Record) -> String {
        let app = record
            .sdkappid
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        self.under_prefix(&format!(
            "{app}/{}/{}",
            record.room_id,
            sanitize_segment(&record.replay_id)
        ))
    }

    /// The key of `key`'s object record.
    pub(crate) fn object_record_key(&self, key: &str) -> String {
        self.under_prefix(&format!("{OBJECT_RECORDS}/{}.json", md5_hex(key)))
    }

    /// `path` under this archiver's prefix.
    pub(crate) fn under_prefix(&self, path: &str) -> String {
        if self.prefix.is_empty() {
            path.to_owned()
        } else {
            format!("{}/{path}", self.prefix)
        }
    }
}

/// A key segment made safe: `[A-Za-z0-9._-]` only, no `..` anywhere, no
/// leading dot, at most 100 bytes.
pub fn sanitize_segment(raw: &str) -> String {
    let mut out: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    while out.contains("..") {
        out = out.replace("..", "__");
    }
    if out.is_empty() || out.starts_with('.') {
        out.insert(0, '_');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_segments_cannot_leave_their_folder() {
        for hostile in [
            "../../etc/passwd",
            "..",
            ".",
            "",
            "a/b",
            "evil\u{0}\n\r",
            "..\\..\\x",
            "/abs",
            "ünïcode 老师",
        ] {
            let s = sanitize_segment(hostile);
            assert!(
                !s.contains('/') && !s.contains('\\') && s != "." && s != "..",
                "{hostile:?} -> {s:?}"
            );
            assert!(
                !s.starts_with('.') && !s.contains(".."),
                "{hostile:?} -> {s:?}"
            );
            assert!(
                s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
                "{hostile:?} -> {s:?}"
            );
        }
        assert_eq!(sanitize_segment("ios_test1"), "ios_test1");
        assert_eq!(sanitize_segment(&"x".repeat(500)).len(), 100);
    }
}
