//! The reason-code vocabulary: one short string per way a message can fail to
//! become a record. The same strings appear in CLI errors, in the headers of
//! parked messages and in logs, so an operator can grep one word end to end.

use std::fmt;

/// Why a message was not turned into a published record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReasonCode {
    /// The body is not valid JSON (or nests deeper than the parser allows).
    InvalidJson,
    /// Valid JSON, but none of the four TIC message formats.
    UnknownFormat,
    /// A field is missing, has the wrong type, or holds an impossible value.
    InvalidField,
    /// `signature=required` and the message carries no `x-tic-sign`.
    SignatureMissing,
    /// The signature does not match, or cannot be checked (no `expire_time`).
    SignatureInvalid,
    /// The message's app (sdkappid) has no TicKey in `tic_keys`: its
    /// signature cannot be checked, its recording under way cannot be watched.
    NoKey,
    /// `expire_time` is earlier than the time the callback was sent.
    SignatureExpired,
    /// TIC reported a failed recording (`error_code` other than 0).
    UpstreamError,
    /// The VOD origin answered 404 or 410: the file is gone.
    VodNotFound,
    /// The VOD origin refused the file (another 4xx).
    VodUnavailable,
    /// The file is larger than `max_file_bytes`.
    FileTooLarge,
    /// The bytes received differ from `Content-Length` or the declared `video_size`.
    SizeMismatch,
    /// Download failed for a reason a retry may cure (5xx, 429, timeout, reset).
    FetchFailed,
    /// The S3-compatible store failed in a way a retry may cure (throttling, 5xx, timeouts).
    ArchiveFailed,
    /// The S3-compatible store refused the credentials or the policy refused the call (401/403).
    ArchiveDenied,
    /// The bucket does not exist, or the store rejects a setting (storage class, encryption).
    ArchiveMisconfigured,
    /// The broker did not confirm the record.
    PublishFailed,
    /// The body is larger than `max_body_bytes`.
    BodyTooLarge,
    /// The recording lists more than `max_tracks` files.
    TooManyTracks,
    /// A string is longer than `max_string_bytes`.
    FieldTooLong,
    /// A VOD URL is not http(s), not on an allowed host, or points at a private address.
    UrlNotAllowed,
    /// Processing panicked: a bug, retried like a transient failure.
    InternalError,
    /// A `record_started` callback: no finished recording yet (skipped, not an error).
    RecordingStarted,
    /// A query answer whose `status` is not `finished` (skipped, not an error).
    NotFinished,
    /// A due watch for an sdkappid without a TicKey in `tic_keys`: TIC cannot be asked.
    WatchNoKey,
    /// TIC does not know the watched task (20005), or no longer keeps its data.
    WatchTaskNotFound,
    /// TIC refused the query: service not enabled, or the signature (20000–20002).
    WatchDenied,
    /// The watched task was still not finished after `watch_max_age_secs`.
    WatchExpired,
    /// A webhook event's endpoint did not take it (no answer in time, a
    /// non-2xx answer, a redirect): tried again on `webhook_delays_secs`,
    /// parked after the last.
    WebhookFailed,
    /// A webhook event's endpoint answered 410 Gone: parked at once.
    WebhookGone,
}

impl ReasonCode {
    /// Every code, in documentation order.
    pub const ALL: [ReasonCode; 30] = [
        ReasonCode::InvalidJson,
        ReasonCode::UnknownFormat,
        ReasonCode::InvalidField,
        ReasonCode::SignatureMissing,
        ReasonCode::SignatureInvalid,
        ReasonCode::SignatureExpired,
        ReasonCode::NoKey,
        ReasonCode::UpstreamError,
        ReasonCode::VodNotFound,
        ReasonCode::VodUnavailable,
        ReasonCode::FileTooLarge,
        ReasonCode::SizeMismatch,
        ReasonCode::FetchFailed,
        ReasonCode::ArchiveFailed,
        ReasonCode::ArchiveDenied,
        ReasonCode::ArchiveMisconfigured,
        ReasonCode::PublishFailed,
        ReasonCode::BodyTooLarge,
        ReasonCode::TooManyTracks,
        ReasonCode::FieldTooLong,
        ReasonCode::UrlNotAllowed,
        ReasonCode::InternalError,
        ReasonCode::RecordingStarted,
        ReasonCode::NotFinished,
        ReasonCode::WatchNoKey,
        ReasonCode::WatchTaskNotFound,
        ReasonCode::WatchDenied,
        ReasonCode::WatchExpired,
        ReasonCode::WebhookFailed,
        ReasonCode::WebhookGone,
    ];

    /// The stable wire name (snake_case).
    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::InvalidJson => "invalid_json",
            ReasonCode::UnknownFormat => "unknown_format",
            ReasonCode::InvalidField => "invalid_field",
            ReasonCode::SignatureMissing => "signature_missing",
            ReasonCode::SignatureInvalid => "signature_invalid",
            ReasonCode::SignatureExpired => "signature_expired",
            ReasonCode::NoKey => "no_key",
            ReasonCode::UpstreamError => "upstream_error",
            ReasonCode::VodNotFound => "vod_not_found",
            ReasonCode::VodUnavailable => "vod_unavailable",
            ReasonCode::FileTooLarge => "file_too_large",
            ReasonCode::SizeMismatch => "size_mismatch",
            ReasonCode::FetchFailed => "fetch_failed",
            ReasonCode::ArchiveFailed => "archive_failed",
            ReasonCode::ArchiveDenied => "archive_denied",
            ReasonCode::ArchiveMisconfigured => "archive_misconfigured",
            ReasonCode::PublishFailed => "publish_failed",
            ReasonCode::BodyTooLarge => "body_too_large",
            ReasonCode::TooManyTracks => "too_many_tracks",
            ReasonCode::FieldTooLong => "field_too_long",
            ReasonCode::UrlNotAllowed => "url_not_allowed",
            ReasonCode::InternalError => "internal_error",
            ReasonCode::RecordingStarted => "recording_started",
            ReasonCode::NotFinished => "not_finished",
            ReasonCode::WatchNoKey => "watch_no_key",
            ReasonCode::WatchTaskNotFound => "watch_task_not_found",
            ReasonCode::WatchDenied => "watch_denied",
            ReasonCode::WatchExpired => "watch_expired",
            ReasonCode::WebhookFailed => "webhook_failed",
            ReasonCode::WebhookGone => "webhook_gone",
        }
    }
}

impl ReasonCode {
    /// A failure a later attempt may cure: retried, never parked at once.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ReasonCode::FetchFailed
                | ReasonCode::ArchiveFailed
                | ReasonCode::PublishFailed
                | ReasonCode::InternalError
                | ReasonCode::WebhookFailed
        )
    }

    /// A reason of a webhook event, not of a lesson: counted by the webhook
    /// metrics, never told to a school as a lesson's failure.
    pub fn is_webhook(self) -> bool {
        matches!(self, ReasonCode::WebhookFailed | ReasonCode::WebhookGone)
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A reason code with a human-readable explanation.
///
/// Used both for rejections (the message is parked) and for skips (the message
/// is acknowledged and counted). The message never contains secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Rejection {
    pub code: ReasonCode,
    pub message: String,
}

impl Rejection {
    pub fn new(code: ReasonCode, message: impl Into<String>) -> Self {
        Rejection {
            code,
            message: message.into(),
        }
    }

    /// A field-level error, always naming the field's path.
    pub fn field(path: &str, problem: impl fmt::Display) -> Self {
        Rejection::new(ReasonCode::InvalidField, format!("{path}: {problem}"))
    }
}

/// An error with its causes, as a reason's message says it: reqwest's own
/// text says only "error sending request", its causes are in `source()`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The backticked first column of the Markdown table between
/// `<!-- {name}:begin -->` and `<!-- {name}:end -->` in `doc`.
#[cfg(test)]
pub(crate) fn documented_codes(doc: &str, name: &str) -> Vec<String> {
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let start = doc.find(&begin).expect("begin marker") + begin.len();
    let stop = doc.find(&end).expect("end marker");
    doc[start..stop]
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split('`').next())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_are_unique_snake_case() {
        let names: std::collections::HashSet<_> =
            ReasonCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), ReasonCode::ALL.len());
        for name in names {
            assert!(
                name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{name}"
            );
        }
    }

    #[test]
    fn the_operations_docs_list_every_code_once() {
        let mut documented =
            documented_codes(include_str!("../../docs/operations.md"), "reason-codes");
        let mut listed: Vec<&str> = ReasonCode::ALL.iter().map(|c| c.as_str()).collect();
        documented.sort();
        listed.sort();
        assert_eq!(documented, listed, "docs/operations.md's reason codes");
    }
}
