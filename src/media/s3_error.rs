//! The S3 store's failures, classified once. Every S3 call of [`archive`]
//! turns the SDK's error into an [`S3Error`] that keeps what the store said
//! (the SDK's error kind, the HTTP status, the store's error code) and decides,
//! here only, whether a retry can help:
//!
//! - **transient** (`archive_failed`): throttling, 5xx, timeouts, connection
//!   errors, a response cut short — retried, then sent through the delay tiers;
//! - **denied** (`archive_denied`): 401/403, wrong key id, wrong secret, a
//!   policy that refuses the call — parked at once, no retry can fix it;
//! - **misconfigured** (`archive_misconfigured`): the bucket does not exist, an
//!   invalid storage class or encryption setting, another 4xx that a retry
//!   cannot cure — parked at once.
//!
//! [`archive`]: crate::media::archive

use std::fmt;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::RequestId;

use crate::decision::reason::ReasonCode;

/// Whether (and why not) a retry can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S3Fault {
    /// A later attempt may succeed.
    Transient,
    /// The store refuses the credentials or the policy refuses the call.
    Denied,
    /// The bucket or a setting is wrong.
    Misconfigured,
}

/// How the SDK failed, before any classification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SdkFailure {
    /// The request could not be built (not sent).
    Construction,
    /// No answer in time.
    Timeout,
    /// No answer at all: connection refused or reset, DNS.
    Dispatch,
    /// A caller error found while dispatching (an invalid request).
    DispatchUser,
    /// An answer that could not be read.
    Response,
    /// An error answer from the store.
    Service,
}

/// One failed S3 call.
#[derive(Debug, Clone, thiserror::Error)]
pub struct S3Error {
    /// What was being done, e.g. `PUT p/1/2/manifest.json`.
    pub operation: String,
    pub failure: SdkFailure,
    /// The HTTP status, when the store answered.
    pub status: Option<u16>,
    /// The store's error code (`AccessDenied`, `NoSuchBucket`, ...), when it sent one.
    pub code: Option<String>,
    pub fault: S3Fault,
    /// The SDK's full explanation, cause chain included.
    detail: String,
}

impl fmt::Display for S3Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.operation)?;
        match (self.status, &self.code) {
            (Some(status), Some(code)) => write!(f, "HTTP {status} {code}: ")?,
            (Some(status), None) => write!(f, "HTTP {status}: ")?,
            _ => {}
        }
        f.write_str(&self.detail)
    }
}

impl S3Error {
    /// Keep what the SDK said about a failed `operation`, and classify it.
    pub fn from_sdk<E>(operation: impl Into<String>, error: SdkError<E, HttpResponse>) -> S3Error
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let failure = match &error {
            SdkError::ConstructionFailure(_) => SdkFailure::Construction,
            SdkError::TimeoutError(_) => SdkFailure::Timeout,
            SdkError::DispatchFailure(d) if d.is_user() => SdkFailure::DispatchUser,
            SdkError::DispatchFailure(_) => SdkFailure::Dispatch,
            SdkError::ResponseError(_) => SdkFailure::Response,
            SdkError::ServiceError(_) => SdkFailure::Service,
            _ => SdkFailure::Dispatch,
        };
        let status = error.raw_response().map(|r| r.status().as_u16());
        let code = error.code().map(str::to_owned);
        S3Error {
            operation: operation.into(),
            failure,
            status,
            fault: classify(failure, status, code.as_deref()),
            detail: explain(&error),
            code,
        }
    }

    /// A failure the SDK did not report (e.g. an answer without an upload id).
    pub fn protocol(operation: impl Into<String>, detail: impl Into<String>) -> S3Error {
        S3Error {
            operation: operation.into(),
            failure: SdkFailure::Response,
            status: None,
            code: None,
            fault: S3Fault::Transient,
            detail: detail.into(),
        }
    }

    /// The reason code a message failing with this error gets.
    pub fn reason(&self) -> ReasonCode {
        match self.fault {
            S3Fault::Transient => ReasonCode::ArchiveFailed,
            S3Fault::Denied => ReasonCode::ArchiveDenied,
            S3Fault::Misconfigured => ReasonCode::ArchiveMisconfigured,
        }
    }

    pub fn is_transient(&self) -> bool {
        self.fault == S3Fault::Transient
    }
}

/// What went wrong, without the raw answer: a store's error body can quote
/// the request (on AWS, `SignatureDoesNotMatch` carries the access key id and
/// the string to sign), so only its code, message and request id are kept,
/// or, without an answer, the cause chain.
fn explain<E>(error: &SdkError<E, HttpResponse>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    if let SdkError::ServiceError(_) = error {
        let message = error.message().unwrap_or("no message");
        return match error.meta().request_id() {
            Some(id) => format!("{message} (request id {id})"),
            None => message.to_owned(),
        };
    }
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

/// Store error codes that mean "these credentials may not do this".
const DENIED_CODES: &[&str] = &[
    "AccessDenied",
    "AccountProblem",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "InvalidSecurity",
    "InvalidToken",
    "NotSignedUp",
    "SignatureDoesNotMatch",
    "UnauthorizedAccess",
];

/// 4xx codes a later attempt can cure: the request or the upload raced with
/// something, or the clock or a temporary token needs a refresh.
const TRANSIENT_4XX_CODES: &[&str] = &[
    "BadDigest",
    "ExpiredToken",
    "IncompleteBody",
    "NoSuchKey",
    "NoSuchUpload",
    "OperationAborted",
    "RequestTimeTooSkewed",
    "RequestTimeout",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "TokenRefreshRequired",
];

/// The one place that decides whether an S3 failure is worth a retry.
pub fn classify(failure: SdkFailure, status: Option<u16>, code: Option<&str>) -> S3Fault {
    match failure {
        SdkFailure::Construction | SdkFailure::DispatchUser => return S3Fault::Misconfigured,
        SdkFailure::Timeout | SdkFailure::Dispatch => return S3Fault::Transient,
        // An answer the SDK could not read: cut short (transient), unless
        // its status already says what it is (a proxy's 403 page).
        SdkFailure::Response if status.is_none_or(|s| s >= 500) => return S3Fault::Transient,
        SdkFailure::Response | SdkFailure::Service => {}
    }
    if code.is_some_and(|c| DENIED_CODES.contains(&c)) || matches!(status, Some(401 | 403)) {
        return S3Fault::Denied;
    }
    if code.is_some_and(|c| TRANSIENT_4XX_CODES.contains(&c)) {
        return S3Fault::Transient;
    }
    match status {
        Some(408 | 409 | 425 | 429) => S3Fault::Transient,
        // A redirect (wrong region or endpoint) or another refusal.
        Some(300..=499) => S3Fault::Misconfigured,
        // 5xx, or an error answer without a status: the store's trouble.
        _ => S3Fault::Transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(status: u16, code: Option<&str>) -> S3Fault {
        classify(SdkFailure::Service, Some(status), code)
    }

    #[test]
    fn credentials_and_policy_refusals_are_denied() {
        assert_eq!(service(403, Some("AccessDenied")), S3Fault::Denied);
        assert_eq!(service(403, Some("SignatureDoesNotMatch")), S3Fault::Denied);
        assert_eq!(service(403, Some("InvalidAccessKeyId")), S3Fault::Denied);
        // A HEAD answer has no body, hence no code: the status decides.
        assert_eq!(service(403, None), S3Fault::Denied);
        assert_eq!(service(401, None), S3Fault::Denied);
    }

    #[test]
    fn wrong_buckets_and_settings_are_misconfigured() {
        assert_eq!(service(404, Some("NoSuchBucket")), S3Fault::Misconfigured);
        assert_eq!(service(404, None), S3Fault::Misconfigured);
        assert_eq!(
            service(400, Some("InvalidStorageClass")),
            S3Fault::Misconfigured
        );
        assert_eq!(
            service(400, Some("InvalidArgument")),
            S3Fault::Misconfigured
        );
        assert_eq!(service(400, Some("EntityTooSmall")), S3Fault::Misconfigured);
        assert_eq!(service(501, Some("NotImplemented")), S3Fault::Transient);
        assert_eq!(
            classify(SdkFailure::Construction, None, None),
            S3Fault::Misconfigured
        );
    }

    #[test]
    fn throttling_server_errors_and_network_failures_are_transient() {
        assert_eq!(service(503, Some("SlowDown")), S3Fault::Transient);
        assert_eq!(service(500, Some("InternalError")), S3Fault::Transient);
        assert_eq!(service(429, None), S3Fault::Transient);
        assert_eq!(service(400, Some("RequestTimeout")), S3Fault::Transient);
        assert_eq!(service(404, Some("NoSuchUpload")), S3Fault::Transient);
        assert_eq!(service(409, Some("OperationAborted")), S3Fault::Transient);
        for failure in [
            SdkFailure::Timeout,
            SdkFailure::Dispatch,
            SdkFailure::Response,
        ] {
            assert_eq!(classify(failure, None, None), S3Fault::Transient);
        }
    }

    #[test]
    fn each_fault_has_its_reason_code() {
        let error = |fault| S3Error {
            operation: "PUT k".into(),
            failure: SdkFailure::Service,
            status: Some(403),
            code: Some("AccessDenied".into()),
            fault,
            detail: "refused".into(),
        };
        assert_eq!(error(S3Fault::Denied).reason(), ReasonCode::ArchiveDenied);
        assert_eq!(
            error(S3Fault::Misconfigured).reason(),
            ReasonCode::ArchiveMisconfigured
        );
        assert_eq!(
            error(S3Fault::Transient).reason(),
            ReasonCode::ArchiveFailed
        );
        assert!(!ReasonCode::ArchiveDenied.is_transient());
        assert!(!ReasonCode::ArchiveMisconfigured.is_transient());
        assert_eq!(
            error(S3Fault::Denied).to_string(),
            "PUT k: HTTP 403 AccessDenied: refused"
        );
    }
}
