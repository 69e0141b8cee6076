//! Archive: copies of the VOD files, and the record as `manifest.json`, in the
//! school's own S3-compatible bucket.
//!
//! Keys are deterministic — `{prefix}/{sdkappid}/{room_id}/{replay_id}/{kind}-{user or
//! "board"}-{track_id}.{format}` — so a redelivered message finds its objects
//! with a HEAD and skips the upload. Every segment taken from a message is
//! sanitized: a hostile user id never writes outside its lesson's folder.
//!
//! Uploads stream: the download feeds parts of `part_size` bytes into a
//! multipart upload (a small file is a single PUT), aborted on any failure so
//! no orphan parts remain. Memory per upload: about one part, its buffer
//! reused from part to part ([`PartPool`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::operation::head_object::HeadObjectOutput;
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    AbortIncompleteMultipartUpload, BucketLifecycleConfiguration, CompletedMultipartUpload,
    CompletedPart, ExpirationStatus, LifecycleExpiration, LifecycleRule, LifecycleRuleFilter,
    MetadataDirective, ServerSideEncryption, StorageClass,
};
use bytes::Bytes;
use secrecy::{ExposeSecret, SecretString};

use crate::decision::record::{Archive, Kind, Probe, Record, Track};
use crate::media::fetch::ChunkSink;
use crate::media::part_pool::PartPool;
use crate::media::s3_error::S3Error;
use crate::preview::page;
use crate::telemetry::metrics::{Metrics, S3Op, Target};
use tokio_util::task::TaskTracker;

/// Objects above this size cannot be copied in one request, so they keep no MD5 metadata.
const MAX_COPY_BYTES: u64 = 5 * 1024 * 1024 * 1024;
/// Object metadata written with every archived file.
const META_MD5: &str = "md5";
const META_DURATION: &str = "probe-duration-ms";
const META_WIDTH: &str = "probe-width";
const META_HEIGHT: &str = "probe-height";

/// The folder (under the prefix) of the upload journal: one small object per
/// multipart upload under way, `<journal>/<MD5 of the object key>/<MD5 of
/// the upload id>` holding the upload id — short names, since file-backed
/// stores cap a name's length — written when the upload starts and deleted
/// when it completes or is aborted. What a killed worker leaves there names the uploads to abort.
/// No key segment of a lesson starts with a dot, so it never meets one.
const JOURNAL: &str = ".lesson-replay-uploads";

/// The lifecycle rule that aborts uploads nobody finished: the backstop for
/// orphans no later attempt cleans (a lesson parked after its worker died).
pub const LIFECYCLE_RULE: &str = "lesson-replay-abort-incomplete-uploads";
/// The lifecycle rule that expires stale journal entries.
pub const JOURNAL_RULE: &str = "lesson-replay-expire-upload-journal";
/// Journal entries older than this are stale (their uploads long aborted).
const JOURNAL_EXPIRY_DAYS: i32 = 7;

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
    /// Send `UNSIGNED-PAYLOAD` instead of hashing every byte for SigV4.
    pub unsigned_payload: bool,
}

/// The S3 side of the worker.
#[derive(Clone)]
pub struct Archiver {
    client: Client,
    bucket: String,
    prefix: String,
    storage_class: Option<StorageClass>,
    sse: Option<ServerSideEncryption>,
    part_size: usize,
    /// Part buffers, reused from one part to the next.
    parts: Arc<PartPool>,
    unsigned_payload: bool,
    metrics: Metrics,
    /// Aborts of uploads dropped half-way (shutdown, panic), awaited before exit.
    cleanup: TaskTracker,
    /// Whether the store answered `ListMultipartUploads` with "not
    /// implemented" (s3s-fs): the journal alone finds orphans then.
    no_upload_listing: Arc<AtomicBool>,
}

impl Archiver {
    /// The archiver `settings` describe (no request is made: see [`Archiver::check`]).
    pub async fn new(settings: &ArchiveSettings, metrics: Metrics) -> Archiver {
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
        let s3_config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(settings.force_path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        Archiver {
            client: Client::from_conf(s3_config),
            bucket: settings.bucket.clone(),
            prefix: settings.prefix.trim_matches('/').to_owned(),
            storage_class: settings.storage_class.as_deref().map(StorageClass::from),
            sse: settings.sse.as_deref().map(ServerSideEncryption::from),
            part_size: settings.part_size,
            parts: PartPool::new(settings.part_size),
            unsigned_payload: settings.unsigned_payload,
            metrics,
            cleanup: TaskTracker::new(),
            no_upload_listing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Wait (at most `limit`) for the aborts of dropped uploads to finish.
    pub async fn wait_for_cleanup(&self, limit: std::time::Duration) {
        self.cleanup.close();
        let _ = tokio::time::timeout(limit, self.cleanup.wait()).await;
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Fail fast at start-up when the bucket or the credentials are wrong.
    pub async fn check(&self) -> Result<(), S3Error> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .timed(self.metrics.s3_timer(S3Op::Head))
            .await
            .observed(&self.metrics, || {
                format!(
                    "bucket {:?} is not usable (does it exist, are the credentials right?)",
                    self.bucket
                )
            })
            .map(|_| ())
    }

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

    fn lesson_folder(&self, record: &Record) -> String {
        let app = record
            .sdkappid
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let folder = format!(
            "{app}/{}/{}",
            record.room_id,
            sanitize_segment(&record.replay_id)
        );
        if self.prefix.is_empty() {
            folder
        } else {
            format!("{}/{folder}", self.prefix)
        }
    }

    /// Put the two rules of this archiver's prefix in the bucket's lifecycle
    /// configuration — abort uploads unfinished after `days`, expire the
    /// journal — replacing earlier versions of them and keeping every other
    /// rule. Returns the rule ids now in the bucket.
    pub async fn apply_lifecycle(&self, days: i32) -> Result<Vec<String>, S3Error> {
        let current = self
            .client
            .get_bucket_lifecycle_configuration()
            .bucket(&self.bucket)
            .send()
            .await;
        let mut rules: Vec<LifecycleRule> = match current {
            Ok(c) => c.rules().to_vec(),
            // No configuration yet: the usual answer of a bucket without rules.
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Vec::new(),
            Err(e) => Err(S3Error::from_sdk("reading the bucket's lifecycle rules", e))?,
        };
        rules.retain(|r| !matches!(r.id(), Some(LIFECYCLE_RULE | JOURNAL_RULE)));
        let prefix = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let rule = |id: &str, prefix: String| {
            LifecycleRule::builder()
                .id(id)
                .status(ExpirationStatus::Enabled)
                .filter(LifecycleRuleFilter::builder().prefix(prefix).build())
        };
        let abort = AbortIncompleteMultipartUpload::builder()
            .days_after_initiation(days)
            .build();
        rules.push(
            rule(LIFECYCLE_RULE, prefix.clone())
                .abort_incomplete_multipart_upload(abort)
                .build()
                .map_err(|e| S3Error::protocol("building the lifecycle rule", e.to_string()))?,
        );
        let expiry = LifecycleExpiration::builder()
            .days(JOURNAL_EXPIRY_DAYS)
            .build();
        rules.push(
            rule(JOURNAL_RULE, format!("{prefix}{JOURNAL}/"))
                .expiration(expiry)
                .build()
                .map_err(|e| S3Error::protocol("building the lifecycle rule", e.to_string()))?,
        );
        let ids = rules
            .iter()
            .filter_map(|r| r.id().map(str::to_owned))
            .collect();
        let configuration = BucketLifecycleConfiguration::builder()
            .set_rules(Some(rules))
            .build()
            .map_err(|e| S3Error::protocol("building the lifecycle rules", e.to_string()))?;
        self.client
            .put_bucket_lifecycle_configuration()
            .bucket(&self.bucket)
            .lifecycle_configuration(configuration)
            .send()
            .await
            .map_err(|e| S3Error::from_sdk("writing the bucket's lifecycle rules", e))?;
        Ok(ids)
    }

    /// The journal folder of `key`'s uploads, with its trailing slash.
    fn journal_folder(&self, key: &str) -> String {
        let folder = md5_hex(key);
        if self.prefix.is_empty() {
            format!("{JOURNAL}/{folder}/")
        } else {
            format!("{}/{JOURNAL}/{folder}/", self.prefix)
        }
    }

    /// The journal entry of one upload.
    fn journal_key(&self, key: &str, upload_id: &str) -> String {
        format!("{}{}", self.journal_folder(key), md5_hex(upload_id))
    }

    /// Abort every multipart upload of `key` still open: those an earlier
    /// attempt left when its worker was killed (or lost its node). Call it
    /// once `key` holds its copy: an upload of a duplicate delivery running
    /// right now is aborted too, and its next request fails transiently; its
    /// retry finds the copy in place. Found through the journal, and through
    /// the store's `ListMultipartUploads` where it has one (that also finds
    /// an upload killed before its journal entry was written). Failures are
    /// logged, never fatal: the bucket's lifecycle rule is the backstop.
    pub async fn abort_orphans(&self, key: &str) -> usize {
        let mut seen = std::collections::HashSet::new();
        let mut aborted = 0;
        for upload_id in self.journaled_uploads(key).await {
            if abort_upload(self.job(key, &upload_id)).await {
                aborted += 1;
            }
            seen.insert(upload_id);
        }
        for upload_id in self.listed_uploads(key).await {
            if !seen.contains(&upload_id) && abort_upload(self.job(key, &upload_id)).await {
                aborted += 1;
            }
        }
        for _ in 0..aborted {
            self.metrics.orphan_upload_aborted();
        }
        if aborted > 0 {
            tracing::warn!(%key, aborted, "aborted uploads an earlier attempt left unfinished");
        }
        aborted
    }

    /// Upload ids in `key`'s journal folder.
    async fn journaled_uploads(&self, key: &str) -> Vec<String> {
        let folder = self.journal_folder(key);
        let listed = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&folder)
            .send()
            .timed(self.metrics.s3_timer(S3Op::List))
            .await
            .observed(&self.metrics, || format!("listing {folder}"));
        let entries: Vec<String> = match listed {
            Ok(list) => list
                .contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_owned))
                .collect(),
            Err(e) => {
                tracing::warn!(%key, error = %e, "could not read the upload journal");
                return Vec::new();
            }
        };
        let mut ids = Vec::with_capacity(entries.len());
        for entry in entries {
            let read = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(&entry)
                .send()
                .timed(self.metrics.s3_timer(S3Op::Get))
                .await
                .observed(&self.metrics, || format!("GET {entry}"));
            let body = match read {
                Ok(object) => object.body.collect().await.map(|b| b.into_bytes()),
                Err(e) => {
                    tracing::warn!(%key, error = %e, "could not read an upload journal entry");
                    continue;
                }
            };
            match body.ok().and_then(|b| String::from_utf8(b.to_vec()).ok()) {
                Some(id) if !id.is_empty() => ids.push(id),
                _ => {
                    tracing::warn!(%entry, "unreadable upload journal entry: left to the lifecycle rule")
                }
            }
        }
        ids
    }

    /// Open uploads of exactly `key`, by the store's own listing.
    async fn listed_uploads(&self, key: &str) -> Vec<String> {
        if self.no_upload_listing.load(Ordering::Relaxed) {
            return Vec::new();
        }
        let listed = self
            .client
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .prefix(key)
            .send()
            .timed(self.metrics.s3_timer(S3Op::List))
            .await
            .observed(&self.metrics, || format!("listing the uploads of {key}"));
        match listed {
            Ok(list) => list
                .uploads()
                .iter()
                .filter(|u| u.key() == Some(key))
                .filter_map(|u| u.upload_id().map(str::to_owned))
                .collect(),
            Err(e) if e.status == Some(501) || e.code.as_deref() == Some("NotImplemented") => {
                tracing::info!(
                    "the store has no ListMultipartUploads: orphan uploads are found through the journal only"
                );
                self.no_upload_listing.store(true, Ordering::Relaxed);
                Vec::new()
            }
            Err(e) => {
                tracing::warn!(%key, error = %e, "could not list the uploads under way");
                Vec::new()
            }
        }
    }

    /// What aborting one upload of `key` needs, apart from this archiver.
    fn job(&self, key: &str, upload_id: &str) -> AbortJob {
        AbortJob {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: key.to_owned(),
            upload_id: upload_id.to_owned(),
            journal_key: self.journal_key(key, upload_id),
            metrics: self.metrics.clone(),
        }
    }

    fn uri(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    /// The copy already in the bucket, when it has the expected size and the
    /// MD5 metadata this worker writes: a redelivery costs a HEAD, not an upload.
    pub async fn existing(
        &self,
        key: &str,
        expected_size: Option<i64>,
    ) -> Result<Option<(Archive, Option<Probe>)>, S3Error> {
        let Some(head) = self.head(key).await? else {
            return Ok(None);
        };
        let size = head.content_length().unwrap_or(-1);
        let metadata = head.metadata().cloned().unwrap_or_default();
        let md5 = metadata.get(META_MD5).filter(|m| m.len() == 32);
        let (Some(md5), true) = (md5, expected_size.is_none_or(|e| e == size)) else {
            return Ok(None);
        };
        let number = |name: &str| metadata.get(name).and_then(|v| v.parse::<i64>().ok());
        let probe = number(META_DURATION).map(|duration_ms| Probe {
            duration_ms,
            width: number(META_WIDTH).and_then(|v| u32::try_from(v).ok()),
            height: number(META_HEIGHT).and_then(|v| u32::try_from(v).ok()),
        });
        let archive = Archive {
            uri: self.uri(key),
            bucket: self.bucket.clone(),
            key: key.to_owned(),
            size_bytes: size,
            md5: md5.clone(),
            etag: head.e_tag().map(str::to_owned),
        };
        Ok(Some((archive, probe)))
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

    /// A streaming upload to `key`: feed it with [`ChunkSink::write`], then
    /// [`Upload::finish`] or [`Upload::abort`].
    pub fn upload(&self, key: String) -> Upload<'_> {
        Upload {
            archiver: self,
            key,
            // Taken from the pool at the first byte.
            buf: Vec::new(),
            upload_id: None,
            parts: Vec::new(),
            uploaded: 0,
        }
    }

    /// Write the lesson's replay page as `index.html`, then the record as
    /// its `manifest.json` (last: a manifest means the lesson is complete).
    /// The page plays the tracks by their keys relative to the folder, so
    /// the folder plays itself wherever the bucket is served over HTTP.
    pub async fn put_manifest(&self, record: &Record) -> Result<String, S3Error> {
        let folder = format!("{}/", self.lesson_folder(record));
        let relative = |key: &str| key.strip_prefix(&folder).map(str::to_owned);
        let page = page::render(record, &page::archive_sources(record, relative));
        self.put_small(
            &format!("{folder}index.html"),
            "text/html; charset=utf-8",
            page.into_bytes(),
        )
        .await?;
        let key = self.manifest_key(record);
        let body = serde_json::to_vec_pretty(record).expect("a record always serializes");
        self.put_small(&key, "application/json", body).await?;
        Ok(key)
    }

    /// A presigned GET of `key`, valid for `valid`: a private bucket's copy a
    /// browser can play.
    pub async fn presigned_get(
        &self,
        key: &str,
        valid: std::time::Duration,
    ) -> Result<String, S3Error> {
        let config = PresigningConfig::expires_in(valid)
            .map_err(|e| S3Error::protocol(format!("presigning {key}"), e.to_string()))?;
        let request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(config)
            .await
            .map_err(|e| S3Error::from_sdk(format!("presigning {key}"), e))?;
        Ok(request.uri().to_owned())
    }

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

fn metadata(md5: &str, probe: Option<&Probe>) -> HashMap<String, String> {
    let mut meta = HashMap::from([(META_MD5.to_owned(), md5.to_owned())]);
    if let Some(p) = probe {
        meta.insert(META_DURATION.to_owned(), p.duration_ms.to_string());
        if let Some(w) = p.width {
            meta.insert(META_WIDTH.to_owned(), w.to_string());
        }
        if let Some(h) = p.height {
            meta.insert(META_HEIGHT.to_owned(), h.to_string());
        }
    }
    meta
}

/// One object being uploaded.
pub struct Upload<'a> {
    archiver: &'a Archiver,
    key: String,
    /// The part being filled: capacity 0 until the first byte.
    buf: Vec<u8>,
    upload_id: Option<String>,
    parts: Vec<CompletedPart>,
    uploaded: u64,
}

impl ChunkSink for Upload<'_> {
    async fn write(&mut self, chunk: Bytes) -> Result<(), S3Error> {
        // Fill the part buffer exactly to its capacity: it never reallocates.
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            // A part handed to the store leaves no buffer: the next byte takes one.
            if self.buf.capacity() == 0 {
                self.buf = self.archiver.parts.take();
            }
            let room = self.archiver.part_size - self.buf.len();
            let (now, later) = rest.split_at(room.min(rest.len()));
            self.buf.extend_from_slice(now);
            rest = later;
            if self.buf.len() == self.archiver.part_size {
                self.upload_part().await?;
            }
        }
        Ok(())
    }
}

impl Upload<'_> {
    async fn upload_part(&mut self) -> Result<(), S3Error> {
        let a = self.archiver;
        let upload_id = match &self.upload_id {
            Some(id) => id.clone(),
            None => {
                let created = a
                    .client
                    .create_multipart_upload()
                    .bucket(&a.bucket)
                    .key(&self.key)
                    .content_type("video/mp4")
                    .set_storage_class(a.storage_class.clone())
                    .set_server_side_encryption(a.sse.clone())
                    .send()
                    .timed(a.metrics.s3_timer(S3Op::CreateUpload))
                    .await
                    .observed(&a.metrics, || {
                        format!("starting the upload of {}", self.key)
                    })?;
                let id = created
                    .upload_id()
                    .ok_or_else(|| {
                        S3Error::protocol(
                            format!("starting the upload of {}", self.key),
                            "the store answered without an upload id",
                        )
                    })?
                    .to_owned();
                self.upload_id = Some(id.clone());
                // Journaled before any part: a killed worker's upload is
                // found and aborted by the next attempt. Unjournaled, the
                // upload is abandoned at once (dropped with the error).
                let journal = a.journal_key(&self.key, &id);
                a.client
                    .put_object()
                    .bucket(&a.bucket)
                    .key(&journal)
                    .body(ByteStream::from(id.clone().into_bytes()))
                    .send()
                    .timed(a.metrics.s3_timer(S3Op::Put))
                    .await
                    .observed(&a.metrics, || {
                        format!("journaling the upload of {}", self.key)
                    })?;
                id
            }
        };
        let part: Bytes = a.parts.part(std::mem::take(&mut self.buf));
        let number = self.parts.len() as i32 + 1;
        let size = part.len() as u64;
        let request = a
            .client
            .upload_part()
            .bucket(&a.bucket)
            .key(&self.key)
            .upload_id(upload_id)
            .part_number(number)
            .body(ByteStream::from(part))
            .customize();
        let answer = match a.unsigned_payload {
            true => request.disable_payload_signing(),
            false => request,
        }
        .send()
        .timed(a.metrics.s3_timer(S3Op::UploadPart))
        .await
        .observed(&a.metrics, || format!("part {number} of {}", self.key))?;
        self.parts.push(
            CompletedPart::builder()
                .part_number(number)
                .set_e_tag(answer.e_tag().map(str::to_owned))
                .build(),
        );
        self.uploaded += size;
        a.metrics.uploaded(size);
        Ok(())
    }

    /// Complete the object and store its MD5 (and probe) as metadata.
    pub async fn finish(mut self, md5: &str, probe: Option<&Probe>) -> Result<Archive, S3Error> {
        let a = self.archiver;
        let meta = metadata(md5, probe);
        let etag = match self.upload_id.clone() {
            None => {
                let size = self.buf.len() as u64;
                let body = a.parts.part(std::mem::take(&mut self.buf));
                let request = a
                    .client
                    .put_object()
                    .bucket(&a.bucket)
                    .key(&self.key)
                    .content_type("video/mp4")
                    .set_metadata(Some(meta))
                    .set_storage_class(a.storage_class.clone())
                    .set_server_side_encryption(a.sse.clone())
                    .body(ByteStream::from(body))
                    .customize();
                let put = match a.unsigned_payload {
                    true => request.disable_payload_signing(),
                    false => request,
                }
                .send()
                .timed(a.metrics.s3_timer(S3Op::Put))
                .await
                .observed(&a.metrics, || format!("PUT {}", self.key))?;
                self.uploaded = size;
                a.metrics.uploaded(size);
                put.e_tag().map(str::to_owned)
            }
            Some(upload_id) => {
                if !self.buf.is_empty() || self.parts.is_empty() {
                    self.upload_part().await?;
                }
                let done = CompletedMultipartUpload::builder()
                    .set_parts(Some(std::mem::take(&mut self.parts)))
                    .build();
                a.client
                    .complete_multipart_upload()
                    .bucket(&a.bucket)
                    .key(&self.key)
                    .upload_id(&upload_id)
                    .multipart_upload(done)
                    .send()
                    .timed(a.metrics.s3_timer(S3Op::Complete))
                    .await
                    .observed(&a.metrics, || format!("completing {}", self.key))?;
                self.upload_id = None;
                forget_upload(&a.job(&self.key, &upload_id)).await;
                self.store_metadata(meta).await?
            }
        };
        Ok(Archive {
            uri: a.uri(&self.key),
            bucket: a.bucket.clone(),
            key: self.key.clone(),
            size_bytes: self.uploaded as i64,
            md5: md5.to_owned(),
            etag,
        })
    }

    /// A multipart upload learns its MD5 only at the end: copy the object onto
    /// itself with the metadata (server-side, no bytes through the worker).
    async fn store_metadata(
        &self,
        meta: HashMap<String, String>,
    ) -> Result<Option<String>, S3Error> {
        let a = self.archiver;
        if self.uploaded > MAX_COPY_BYTES {
            tracing::warn!(key = %self.key, "object above 5 GiB: stored without MD5 metadata, a redelivery uploads it again");
            return Ok(None);
        }
        let source = format!("{}/{}", a.bucket, encode_key(&self.key));
        let copied = a
            .client
            .copy_object()
            .bucket(&a.bucket)
            .key(&self.key)
            .copy_source(source)
            .metadata_directive(MetadataDirective::Replace)
            .set_metadata(Some(meta))
            .content_type("video/mp4")
            .set_storage_class(a.storage_class.clone())
            .set_server_side_encryption(a.sse.clone())
            .send()
            .timed(a.metrics.s3_timer(S3Op::Copy))
            .await
            .observed(&a.metrics, || {
                format!("storing the metadata of {}", self.key)
            })?;
        Ok(copied
            .copy_object_result()
            .and_then(|r| r.e_tag())
            .map(str::to_owned))
    }

    /// Abandon the upload, deleting its parts.
    pub async fn abort(mut self) {
        if let Some(upload_id) = self.upload_id.take() {
            abort_upload(self.archiver.job(&self.key, &upload_id)).await;
        }
    }
}

/// An upload dropped half-way (its task aborted at shutdown, or a panic) is
/// aborted in the background, so no orphan parts remain.
impl Drop for Upload<'_> {
    fn drop(&mut self) {
        let (Some(upload_id), Ok(runtime)) =
            (self.upload_id.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let a = self.archiver;
        let abort = abort_upload(a.job(&self.key, &upload_id));
        a.cleanup.spawn_on(
            async move {
                abort.await;
            },
            &runtime,
        );
    }
}

/// One multipart upload to abort, and its journal entry.
struct AbortJob {
    client: Client,
    bucket: String,
    key: String,
    upload_id: String,
    journal_key: String,
    metrics: Metrics,
}

/// Abort the upload and forget its journal entry. True when this call
/// aborted it; an upload already gone (`NoSuchUpload`) is only forgotten.
async fn abort_upload(job: AbortJob) -> bool {
    let key = &job.key;
    let aborted = job
        .client
        .abort_multipart_upload()
        .bucket(&job.bucket)
        .key(key)
        .upload_id(&job.upload_id)
        .send()
        .timed(job.metrics.s3_timer(S3Op::Abort))
        .await
        .observed(&job.metrics, || format!("aborting the upload of {key}"));
    let done = match aborted {
        Ok(_) => {
            tracing::info!(%key, "multipart upload aborted");
            Some(true)
        }
        Err(e) if e.code.as_deref() == Some("NoSuchUpload") || e.status == Some(404) => Some(false),
        Err(e) => {
            tracing::warn!(%key, error = %e, "could not abort the multipart upload");
            None
        }
    };
    if done.is_some() {
        forget_upload(&job).await;
    }
    done == Some(true)
}

/// Delete an upload's journal entry (it completed, or is aborted).
async fn forget_upload(job: &AbortJob) {
    let deleted = job
        .client
        .delete_object()
        .bucket(&job.bucket)
        .key(&job.journal_key)
        .send()
        .timed(job.metrics.s3_timer(S3Op::Delete))
        .await
        .observed(&job.metrics, || format!("DELETE {}", job.journal_key));
    if let Err(e) = deleted {
        tracing::warn!(key = %job.key, error = %e, "could not delete the upload's journal entry");
    }
}

fn md5_hex(text: &str) -> String {
    use md5::{Digest, Md5};
    hex::encode(Md5::digest(text.as_bytes()))
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

/// Percent-encode a key for `x-amz-copy-source`, keeping the slashes.
fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
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

    #[test]
    fn copy_source_keys_are_encoded() {
        assert_eq!(
            encode_key("p/1/2/camera-a b+-3.mp4"),
            "p/1/2/camera-a%20b%2B-3.mp4"
        );
    }
}
