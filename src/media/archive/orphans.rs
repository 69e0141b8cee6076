//! Orphan uploads: multipart uploads an attempt started and never finished
//! (its worker was killed, or lost its node). Three layers find them: the
//! journal (one small object per upload under way, written when it starts,
//! deleted when it completes or is aborted), the store's own upload listing
//! where it has one, and the bucket's lifecycle rule ([`super::lifecycle`]).

use std::sync::atomic::Ordering;

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;

use crate::media::archive::{Archiver, Observed, Timed, md5_hex};
use crate::media::s3_error::S3Error;
use crate::telemetry::metrics::{Metrics, S3Op};

/// The folder (under the prefix) of the upload journal: one small object per
/// multipart upload under way, `<journal>/<MD5 of the object key>/<MD5 of
/// the upload id>` holding the upload id — short names, since file-backed
/// stores cap a name's length. What a killed worker leaves there names the
/// uploads to abort. No key segment of a lesson starts with a dot, so it
/// never meets one.
pub(crate) const JOURNAL: &str = ".lesson-replay-uploads";

impl Archiver {
    /// Journal the upload `upload_id` of `key`: written before any part, so a
    /// killed worker's upload is found and aborted by the next attempt. With
    /// the store's encryption setting, as every other write: a bucket policy
    /// that refuses unencrypted writes refuses an unencrypted entry too.
    pub(crate) async fn journal(&self, key: &str, upload_id: &str) -> Result<(), S3Error> {
        let entry = self.journal_key(key, upload_id);
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&entry)
            .body(ByteStream::from(upload_id.as_bytes().to_vec()))
            .set_server_side_encryption(self.sse.clone())
            .send()
            .timed(self.metrics.s3_timer(S3Op::Put))
            .await
            .observed(&self.metrics, || format!("journaling the upload of {key}"))?;
        Ok(())
    }

    /// The journal folder of `key`'s uploads, with its trailing slash.
    fn journal_folder(&self, key: &str) -> String {
        self.under_prefix(&format!("{JOURNAL}/{}/", md5_hex(key)))
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
        // The journal and the store's listing, read side by side (one round trip).
        let (journaled, listed) =
            tokio::join!(self.journaled_uploads(key), self.listed_uploads(key));
        let mut seen = std::collections::HashSet::new();
        let mut aborted = 0;
        for upload_id in journaled.into_iter().chain(listed) {
            if seen.insert(upload_id.clone()) && abort_upload(self.job(key, &upload_id)).await {
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
    pub(crate) fn job(&self, key: &str, upload_id: &str) -> AbortJob {
        AbortJob {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: key.to_owned(),
            upload_id: upload_id.to_owned(),
            journal_key: self.journal_key(key, upload_id),
            metrics: self.metrics.clone(),
        }
    }
}

/// One multipart upload to abort, and its journal entry.
pub(crate) struct AbortJob {
    client: Client,
    bucket: String,
    key: String,
    upload_id: String,
    journal_key: String,
    metrics: Metrics,
}

/// Abort the upload and forget its journal entry. True when this call
/// aborted it; an upload already gone (`NoSuchUpload`) is only forgotten.
pub(crate) async fn abort_upload(job: AbortJob) -> bool {
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
pub(crate) async fn forget_upload(job: &AbortJob) {
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
