//! Archive: copies of the VOD files, and the record as `manifest.json`, in the
//! school's own S3-compatible bucket.
//!
//! Keys are deterministic ([`keys`]) — `{prefix}/{sdkappid}/{room_id}/{replay_id}/{kind}-{user or
//! "board"}-{track_id}.{format}` — so a redelivered message finds its objects
//! ([`Archiver::existing`]: a HEAD and a read of the object's small record,
//! side by side) and skips the upload. Every segment taken from a message is
//! sanitized: a hostile user id never writes outside its lesson's folder.
//!
//! The rooms:
//! - [`transfer`]: one file from the VOD origin into the store, as a pipeline
//!   — parts read (by ranges, several at once, where the origin allows) while
//!   earlier parts upload, the MD5 computed in order;
//! - [`upload`]: one object's upload, parts in flight side by side;
//! - [`budget`]: the worker's one memory budget of part buffers;
//! - [`orphans`]: the journal of uploads under way (each entry its owner's
//!   lease), and aborting, until it is gone, what a killed worker left;
//! - [`manifest`]: the lesson's `manifest.json` and `index.html`, and each
//!   object's record (size, ETag, MD5, probe), written after the upload
//!   instead of copying the whole object onto itself;
//! - [`lifecycle`]: the bucket's rules that clean what no attempt did;
//! - [`keys`]: where each object goes.

pub mod budget;
pub mod keys;
pub mod lifecycle;
pub mod manifest;
pub mod orphans;
pub mod transfer;
pub mod upload;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::operation::head_object::HeadObjectOutput;
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ServerSideEncryption, StorageClass};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::decision::record::Archive;
use crate::media::s3_error::S3Error;
use crate::telemetry::metrics::{Metrics, S3Op, Target};
use budget::PartBudget;

pub use keys::sanitize_segment;
pub use lifecycle::{JOURNAL_RULE, LIFECYCLE_RULE};
pub use upload::Upload;

type SdkError<E> = aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>;

/// Times a request: its latency observed when it completes.
trait Timed: std::future::Future + Sized {
    async fn timed(self, timer: prometheus::HistogramTimer) -> Self::Output {
        let output = self.await;
        timer.observe_duration();
        output
    }
}

impl<F: std::future::Future> Timed for F {}

/// Counts every S3 response by status class, and keeps what a failure said.
trait Observed<T> {
    fn observed(self, metrics: &Metrics, operation: impl FnOnce() -> String) -> Result<T, S3Error>;
}

impl<T, E> Observed<T> for Result<T, SdkError<E>>
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    fn observed(self, metrics: &Metrics, operation: impl FnOnce() -> String) -> Result<T, S3Error> {
        let status = match &self {
            Ok(_) => Some(200),
            Err(e) => e.raw_response().map(|r| r.status().as_u16()),
        };
        metrics.http_response(Target::S3, status);
        self.map_err(|e| S3Error::from_sdk(operation(), e))
    }
}

/// Where and how to archive: built from the settings by `config::parts`.
#[derive(Debug, Clone)]
pub struct ArchiveSettings {
    pub bucket: String,
    /// Endpoint URL of a non-AWS store; `None`: AWS.
    pub endpoint: Option<String>,
    pub region: String,
    pub force_path_style: bool,
    /// Static credentials (key id, secret); `None`: the standard AWS chain.
    pub credentials: Option<(SecretString, SecretString)>,
    /// Key prefix of every object, without surrounding slashes.
    pub prefix: String,
    pub storage_class: Option<String>,
    pub sse: Option<String>,
    pub part_size: usize,
    /// Parts of one file in flight at once (range reads and part uploads).
    pub concurrency: usize,
    /// All part buffers of the worker together, at most.
    pub memory_bytes: u64,
    /// Longest attempt of a request without a large body.
    pub request_timeout: Duration,
    /// Longest attempt of a part upload (or a small file's single PUT).
    pub part_timeout: Duration,
    /// Send `UNSIGNED-PAYLOAD` instead of hashing every byte for SigV4.
    pub unsigned_payload: bool,
}

/// The S3 side of the worker: owned and cheap to clone (the client and the
/// budget are shared), so part uploads run as tasks of their own.
#[derive(Clone)]
pub struct Archiver {
    client: Client,
    bucket: String,
    prefix: String,
    storage_class: Option<StorageClass>,
    sse: Option<ServerSideEncryption>,
    /// Part buffers of every upload of the worker, within one budget (one
    /// for every app's destination).
    budget: Arc<PartBudget>,
    /// The app whose destination this is (`None`: the default), for the
    /// per-app metrics.
    app: Option<i64>,
    concurrency: usize,
    part_timeout: Duration,
    unsigned_payload: bool,
    metrics: Metrics,
    /// Aborts of uploads dropped half-way (shutdown, panic), awaited before exit.
    cleanup: TaskTracker,
    /// Whether the store answered `ListMultipartUploads` with "not
    /// implemented" (s3s-fs): the journal alone finds orphans then.
    no_upload_listing: Arc<AtomicBool>,
    /// Whether the store answered `ListParts` with "not implemented": an
    /// abort is then taken at its word.
    no_part_listing: Arc<AtomicBool>,
}

impl Archiver {
    /// The archiver `settings` describe, with a memory budget of its own (no
    /// request is made: see [`Archiver::check`]).
    pub async fn new(settings: &ArchiveSettings, metrics: Metrics) -> Archiver {
        let budget = PartBudget::new(
            settings.part_size,
            settings.memory_bytes,
            Some(metrics.clone()),
        );
        Archiver::for_app(settings, metrics, budget, None).await
    }

    /// App `app`'s archiver (`None`: the default destination), its part
    /// buffers drawn from `budget`, which every destination of the worker shares.
    pub async fn for_app(
        settings: &ArchiveSettings,
        metrics: Metrics,
        budget: Arc<PartBudget>,
        app: Option<i64>,
    ) -> Archiver {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(Region::new(settings.region.clone()));
        if let Some(endpoint) = &settings.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some((id, secret)) = &settings.credentials {
            loader = loader.credentials_provider(Credentials::new(
                id.expose_secret(),
                secret.expose_secret(),
                None,
                None,
                "lesson-replay settings",
            ));
        }
        let shared = loader.load().await;
        // Since aws-sdk-s3 1.69 the default checksums break MinIO, COS, OSS, R2, Garage.
        // Every attempt has a deadline: a store that never answers a HEAD or
        // a Complete does not hold the handler until shutdown. Part uploads
        // get their own, longer one (`Upload`).
        let s3_config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(settings.force_path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(attempt_timeout(settings.request_timeout))
            .build();
        Archiver {
            client: Client::from_conf(s3_config),
            bucket: settings.bucket.clone(),
            prefix: settings.prefix.trim_matches('/').to_owned(),
            storage_class: settings.storage_class.as_deref().map(StorageClass::from),
            sse: settings.sse.as_deref().map(ServerSideEncryption::from),
            budget,
            app,
            concurrency: settings.concurrency.max(1),
            part_timeout: settings.part_timeout,
            unsigned_payload: settings.unsigned_payload,
            metrics,
            cleanup: TaskTracker::new(),
            no_upload_listing: Arc::new(AtomicBool::new(false)),
            no_part_listing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Wait (at most `limit`) for the aborts of dropped uploads to finish.
    pub async fn wait_for_cleanup(&self, limit: Duration) {
        self.cleanup.close();
        let _ = tokio::time::timeout(limit, self.cleanup.wait()).await;
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The app whose destination this is (`None`: the default).
    pub fn app(&self) -> Option<i64> {
        self.app
    }

    /// The memory budget of its part buffers, to share with other destinations.
    pub fn budget(&self) -> Arc<PartBudget> {
        self.budget.clone()
    }

    pub fn part_size(&self) -> usize {
        self.budget.part_size()
    }

    /// Fail fast at start-up when the bucket or the credentials are wrong.
    /// Not counted among the store's answers: it comes before the first
    /// scrape, and a series first seen above zero hides its first events
    /// from `rate()` and `increase()`.
    pub async fn check(&self) -> Result<(), S3Error> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| {
                S3Error::from_sdk(
                    format!(
                        "bucket {:?} is not usable (does it exist, are the credentials right?)",
                        self.bucket
                    ),
                    e,
                )
            })
            .map(|_| ())
    }

    /// A streaming upload to `key`, its parts within this worker's budget:
    /// feed it (`ChunkSink::write`, or parts by number from a ranged
    /// transfer), then [`Upload::finish`] or [`Upload::abort`].
    pub fn upload(&self, key: String) -> Upload {
        Upload::new(
            self.clone(),
            key,
            Arc::new(Semaphore::new(self.concurrency)),
        )
    }

    /// Where a copy is, as the record says it.
    fn archive(&self, key: &str, size: u64, md5: &str, etag: Option<&str>) -> Archive {
        Archive {
            uri: format!("s3://{}/{key}", self.bucket),
            bucket: self.bucket.clone(),
            key: key.to_owned(),
            size_bytes: size as i64,
            md5: md5.to_owned(),
            etag: etag.map(str::to_owned),
        }
    }

    /// Whether `key` exists in the bucket.
    pub async fn exists(&self, key: &str) -> Result<bool, S3Error> {
        Ok(self.head(key).await?.is_some())
    }

    /// `key`'s HEAD; `None` when there is no such object — an answer (the
    /// expected 404 of a first upload), not a failure.
    async fn head(&self, key: &str) -> Result<Option<HeadObjectOutput>, S3Error> {
        let head = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .timed(self.metrics.s3_timer(S3Op::Head))
            .await;
        match head {
            // Expected, and not an error: not counted among the store's
            // answers (it would read as a failing store).
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            other => other
                .observed(&self.metrics, || format!("HEAD {key}"))
                .map(Some),
        }
    }

    /// Delete `key` (an object this attempt wrote for a lesson that failed);
    /// a key that holds nothing is no failure.
    pub async fn delete(&self, key: &str) -> Result<(), S3Error> {
        let deleted = self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .timed(self.metrics.s3_timer(S3Op::Delete))
            .await;
        match deleted {
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(()),
            other => other
                .observed(&self.metrics, || format!("DELETE {key}"))
                .map(|_| ()),
        }
    }

    /// A presigned GET of `key` in `bucket` (where the record says the copy
    /// is, on this destination's store), valid for `valid`: a private
    /// bucket's copy a browser can play.
    pub async fn presigned_get(
        &self,
        bucket: &str,
        key: &str,
        valid: Duration,
    ) -> Result<String, S3Error> {
        let config = PresigningConfig::expires_in(valid)
            .map_err(|e| S3Error::protocol(format!("presigning {key}"), e.to_string()))?;
        let request = self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .presigned(config)
            .await
            .map_err(|e| S3Error::from_sdk(format!("presigning {key}"), e))?;
        Ok(request.uri().to_owned())
    }

    /// A small object, written whole: the store's settings (storage class,
    /// encryption) as for every other write.
    async fn put_small(&self, key: &str, content_type: &str, body: Vec<u8>) -> Result<(), S3Error> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body))
            .set_storage_class(self.storage_class.clone())
            .set_server_side_encryption(self.sse.clone())
            .send()
            .timed(self.metrics.s3_timer(S3Op::Put))
            .await
            .observed(&self.metrics, || format!("PUT {key}"))?;
        Ok(())
    }
}

/// A deadline for each attempt of a request (the SDK retries within it).
fn attempt_timeout(limit: Duration) -> TimeoutConfig {
    TimeoutConfig::builder()
        .operation_attempt_timeout(limit)
        .build()
}

fn md5_hex(text: &str) -> String {
    use md5::{Digest, Md5};
    hex::encode(Md5::digest(text.as_bytes()))
}
