//! Orphan uploads: multipart uploads an attempt started and never finished
//! (its worker was killed, or lost its node). Three layers find them: the
//! journal (one small object per upload under way, written when it starts,
//! renewed while it lives, deleted when it completes or is gone), the store's
//! own upload listing where it has one, and the bucket's lifecycle rule
//! ([`super::lifecycle`]).
//!
//! Two rules keep an abort from leaving parts behind:
//! - **Never abort a live upload from outside.** A journal entry is its
//!   owner's lease: renewed every third of the part deadline while the upload
//!   lives, it runs out two part deadlines after its owner died. Another
//!   delivery of the same lesson leaves an upload under a live lease alone;
//!   its owner finishes it (the same bytes) or aborts it itself. A store may
//!   write a part still in flight after an abort (s3s-fs does, and AWS warns
//!   of it), and nothing removes that part afterwards.
//! - **Abort until it is gone.** The owner first waits for its own parts in
//!   flight; then abort, and where the store lists parts (`ListParts`) check
//!   that none is left, and abort again if some are. The journal entry is
//!   deleted only when the store says the upload is gone; otherwise it stays,
//!   counted (`lesson_replay_orphan_uploads_left_total`), for the next sweep.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::media::archive::{Archiver, Observed, Timed, md5_hex};
use crate::media::s3_error::S3Error;
use crate::telemetry::metrics::{Metrics, S3Op};

/// The folder (under the prefix) of the upload journal: one small object per
/// multipart upload under way, `<journal>/<MD5 of the object key>/<MD5 of
/// the upload id>` holding an [`Entry`] — short names, since file-backed
/// stores cap a name's length. What a killed worker leaves there names the
/// uploads to abort. No key segment of a lesson starts with a dot, so it
/// never meets one.
pub(crate) const JOURNAL: &str = ".lesson-replay-uploads";

/// Aborts (each checked by a listing of the parts) before an upload is
/// counted as left.
const ABORT_ROUNDS: u32 = 3;

/// One journal entry: which upload, of which object, held until when.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub key: String,
    pub upload_id: String,
    /// Its owner's lease, renewed while the upload lives (Unix ms).
    pub lease_until_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An entry read back: the upload, and whether its owner's lease ran out.
struct Journaled {
    upload_id: String,
    key: Option<String>,
    abandoned: bool,
}

/// What became of an abort.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cleared {
    /// Aborted now, and nothing of it is left.
    Aborted,
    /// It was gone already (completed, or aborted by another).
    Gone,
    /// Refused, or the store keeps parts of it: its journal entry stays.
    Left,
}

impl Archiver {
    /// Journal the upload `upload_id` of `key`, held for two part deadlines:
    /// written before any part, and renewed by the owner's [`Lease`]. With
    /// the store's encryption setting, as every other write: a bucket policy
    /// that refuses unencrypted writes refuses an unencrypted entry too.
    pub(crate) async fn journal(&self, key: &str, upload_id: &str) -> Result<(), S3Error> {
        let entry = self.journal_key(key, upload_id);
        let body = serde_json::to_vec(&Entry {
            key: key.to_owned(),
            upload_id: upload_id.to_owned(),
            lease_until_ms: now_ms() + self.lease().as_millis() as u64,
        })
        .expect("an entry serializes");
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&entry)
            .content_type("application/json")
            .body(ByteStream::from(body))
            .set_server_side_encryption(self.sse.clone())
            .send()
            .timed(self.metrics.s3_timer(S3Op::Put))
            .await
            .observed(&self.metrics, || format!("journaling the upload of {key}"))?;
        Ok(())
    }

    /// How long an entry holds its upload without a renewal: two part
    /// deadlines, so a renewal held up by a slow store (each is cut at a
    /// third of one) or clocks a little apart never let a live upload go.
    fn lease(&self) -> Duration {
        self.part_timeout * 2
    }

    /// The journal folder of every object, with its trailing slash.
    fn journal_root(&self) -> String {
        self.under_prefix(&format!("{JOURNAL}/"))
    }

    /// The journal folder of `key`'s uploads, with its trailing slash.
    fn journal_folder(&self, key: &str) -> String {
        self.under_prefix(&format!("{JOURNAL}/{}/", md5_hex(key)))
    }

    /// The journal entry of one upload.
    fn journal_key(&self, key: &str, upload_id: &str) -> String {
        format!("{}{}", self.journal_folder(key), md5_hex(upload_id))
    }

    /// Abort the uploads of `key` that their owners abandoned: those an
    /// earlier attempt left when its worker was killed (or lost its node).
    /// Called once `key` holds its copy. An upload whose owner still holds
    /// its lease (a duplicate delivery running right now) is left to its
    /// owner. Found through the journal, and through the store's
    /// `ListMultipartUploads` where it has one (that also finds an upload
    /// killed before its journal entry was written, once it is older than a
    /// lease). Failures are logged, never fatal: the next sweep
    /// ([`Archiver::sweep_journal`]) and the bucket's lifecycle rule remain.
    pub async fn abort_orphans(&self, key: &str) -> usize {
        // The journal and the store's listing, read side by side (one round trip).
        let (journaled, listed) =
            tokio::join!(self.journaled_uploads(key), self.listed_uploads(key));
        let mut seen = std::collections::HashSet::new();
        let mut abandoned = Vec::new();
        let journal_read = journaled.is_some();
        let (names, entries) = journaled.unwrap_or_default();
        for entry in entries {
            seen.insert(entry.upload_id.clone());
            if entry.abandoned {
                abandoned.push(entry.upload_id);
            }
        }
        // Listed without an entry: its creation was never journaled (no part
        // was sent: parts wait for the entry). Only when the journal was
        // listed, when no entry of that name exists (even one that could not
        // be read), and when the upload is older than a lease.
        let old = SystemTime::now() - self.lease();
        for (upload_id, initiated) in listed {
            if journal_read
                && !names.contains(&self.journal_key(key, &upload_id))
                && initiated.is_none_or(|t| t < old)
                && seen.insert(upload_id.clone())
            {
                abandoned.push(upload_id);
            }
        }
        let mut aborted = 0;
        for upload_id in abandoned {
            if abort_until_gone(self.job(key, &upload_id)).await == Cleared::Aborted {
                aborted += 1;
            }
        }
        self.count_aborted(key, aborted);
        aborted
    }

    /// Every abandoned upload of the journal, whatever its object: what
    /// killed workers left of lessons that never came back. Each worker runs
    /// it every part deadline (`Archiver::sweep_every`); two sweeps meeting
    /// on one upload both find it gone. The number aborted.
    pub async fn sweep_journal(&self) -> usize {
        let Some(entries) = self.list_journal(&self.journal_root()).await else {
            return 0;
        };
        let mut aborted = 0;
        for (entry, modified) in &entries {
            let Some(found) = self.read_entry(entry, *modified).await else {
                continue;
            };
            if !found.abandoned {
                continue;
            }
            // An entry of the first format names no object: its own
            // object's sweep ([`Archiver::abort_orphans`]) aborts it.
            let Some(key) = &found.key else {
                tracing::warn!(%entry, upload_id = %found.upload_id,
                    "an abandoned upload journaled by an older version: aborted only when its lesson comes back");
                continue;
            };
            let job = self.job(key, &found.upload_id);
            if job.journal_key == *entry && abort_until_gone(job).await == Cleared::Aborted {
                aborted += 1;
                self.count_aborted(key, 1);
            }
        }
        aborted
    }

    /// How often [`Archiver::sweep_journal`] runs: every part deadline (a
    /// lease runs out two part deadlines after its owner's last renewal).
    pub fn sweep_every(&self) -> Duration {
        self.part_timeout.max(Duration::from_secs(1))
    }

    fn count_aborted(&self, key: &str, aborted: usize) {
        for _ in 0..aborted {
            self.metrics.orphan_upload_aborted();
        }
        if aborted > 0 {
            tracing::warn!(%key, aborted, "aborted uploads an earlier attempt left unfinished");
        }
    }

    /// The entry names in `key`'s journal folder and the uploads read from
    /// them; `None` when the folder cannot be listed.
    async fn journaled_uploads(&self, key: &str) -> Option<(Vec<String>, Vec<Journaled>)> {
        let entries = self.list_journal(&self.journal_folder(key)).await?;
        let mut found = Vec::with_capacity(entries.len());
        for (entry, modified) in &entries {
            found.extend(self.read_entry(entry, *modified).await);
        }
        Some((entries.into_iter().map(|(name, _)| name).collect(), found))
    }

    /// The journal entries under `folder` (every page), with when each was
    /// last written; `None` when it cannot be listed.
    async fn list_journal(&self, folder: &str) -> Option<Vec<(String, Option<SystemTime>)>> {
        let mut entries = Vec::new();
        let mut token = None;
        loop {
            let listed = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(folder)
                .set_continuation_token(token.take())
                .send()
                .timed(self.metrics.s3_timer(S3Op::List))
                .await
                .observed(&self.metrics, || format!("listing {folder}"));
            let page = match listed {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(%folder, error = %e, "could not read the upload journal");
                    return None;
                }
            };
            entries.extend(page.contents().iter().filter_map(|o| {
                let modified = o
                    .last_modified()
                    .and_then(|t| SystemTime::try_from(*t).ok());
                o.key().map(|k| (k.to_owned(), modified))
            }));
            match page.next_continuation_token() {
                Some(next) if page.is_truncated() == Some(true) => token = Some(next.to_owned()),
                _ => return Some(entries),
            }
        }
    }

    /// One journal entry. The first format held the bare upload id, and no
    /// lease: it counts as held for a lease after it was written.
    async fn read_entry(&self, entry: &str, modified: Option<SystemTime>) -> Option<Journaled> {
        let read = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(entry)
            .send()
            .timed(self.metrics.s3_timer(S3Op::Get))
            .await
            .observed(&self.metrics, || format!("GET {entry}"));
        let body = match read {
            Ok(object) => object.body.collect().await.map(|b| b.into_bytes()).ok()?,
            Err(e) => {
                // Gone since the listing (its upload finished): nothing to do.
                if e.status != Some(404) {
                    tracing::warn!(%entry, error = %e, "could not read an upload journal entry");
                }
                return None;
            }
        };
        if let Ok(parsed) = serde_json::from_slice::<Entry>(&body) {
            return Some(Journaled {
                abandoned: parsed.lease_until_ms < now_ms(),
                upload_id: parsed.upload_id,
                key: Some(parsed.key),
            });
        }
        match String::from_utf8(body.to_vec()) {
            Ok(id) if !id.is_empty() && !id.starts_with('{') => Some(Journaled {
                upload_id: id,
                key: None,
                abandoned: modified.is_none_or(|t| t + self.lease() < SystemTime::now()),
            }),
            _ => {
                tracing::warn!(%entry, "unreadable upload journal entry: left to the lifecycle rule");
                None
            }
        }
    }

    /// Open uploads of exactly `key`, by the store's own listing, with when
    /// each was started (where the store says).
    async fn listed_uploads(&self, key: &str) -> Vec<(String, Option<SystemTime>)> {
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
                .filter_map(|u| {
                    let initiated = u.initiated().and_then(|t| SystemTime::try_from(*t).ok());
                    u.upload_id().map(|id| (id.to_owned(), initiated))
                })
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
            store: self.clone(),
            key: key.to_owned(),
            upload_id: upload_id.to_owned(),
            journal_key: self.journal_key(key, upload_id),
        }
    }
}

/// One multipart upload to abort, and its journal entry.
pub(crate) struct AbortJob {
    store: Archiver,
    key: String,
    upload_id: String,
    journal_key: String,
}

impl AbortJob {
    fn client(&self) -> &Client {
        &self.store.client
    }

    fn metrics(&self) -> &Metrics {
        &self.store.metrics
    }
}

/// The owner's hold on its journaled upload: renews the entry's lease every
/// third of the part deadline until [`Lease::end`].
pub(crate) struct Lease {
    stop: Option<oneshot::Sender<()>>,
    renewing: JoinHandle<()>,
}

impl Lease {
    pub(crate) fn start(store: Archiver, key: String, upload_id: String) -> Lease {
        let (stop, mut stopped) = oneshot::channel::<()>();
        let every = store.part_timeout / 3;
        let renew = async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    () = tokio::time::sleep(every) => {}
                }
                // Each renewal is cut at a third of a part deadline; one that
                // fails is tried again next time. The lease (two deadlines)
                // outlives five failures in a row; after that a sweep may
                // abort this upload, and its next part fails transiently.
                match tokio::time::timeout(every, store.journal(&key, &upload_id)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(%key, error = %e, "could not renew the upload's lease")
                    }
                    Err(_) => tracing::warn!(%key, "the upload's lease renewal timed out"),
                }
            }
        };
        Lease {
            stop: Some(stop),
            renewing: tokio::spawn(renew.in_current_span()),
        }
    }

    /// Stop renewing, once a renewal under way has landed (it would write
    /// the entry again after its deletion).
    pub(crate) async fn end(mut self) {
        drop(self.stop.take());
        let _ = (&mut self.renewing).await;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Dropped without `end` (the runtime going away): renew no more.
        self.renewing.abort();
    }
}

/// Abort the upload until the store says it is gone, then forget its journal
/// entry. The caller's own parts in flight must have ended. Left (refused,
/// or parts the store keeps): the entry stays for the next sweep, counted.
pub(crate) async fn abort_until_gone(job: AbortJob) -> Cleared {
    let key = &job.key;
    let mut aborted = false;
    for round in 0..ABORT_ROUNDS {
        if round > 0 {
            tokio::time::sleep(Duration::from_millis(250 << round)).await;
        }
        let answer = job
            .client()
            .abort_multipart_upload()
            .bucket(&job.store.bucket)
            .key(key)
            .upload_id(&job.upload_id)
            .send()
            .timed(job.metrics().s3_timer(S3Op::Abort))
            .await
            .observed(job.metrics(), || format!("aborting the upload of {key}"));
        // A 403 may be a refusal, or a store saying the upload is no more
        // (s3s-fs, once its metadata is gone): the parts' listing tells.
        let refused = match answer {
            Ok(_) => {
                aborted = true;
                false
            }
            Err(e) if gone(&e) => false,
            Err(e) if e.status == Some(403) => true,
            // Another sweep aborting the same upload at once (s3s-fs then
            // answers 500 for a part file the other deleted first), or a
            // store failing for a moment: the next round looks again.
            Err(e) => {
                tracing::info!(%key, upload_id = %job.upload_id, error = %e, round, "could not abort the multipart upload");
                continue;
            }
        };
        match parts_left(&job).await {
            Some(0) => {
                forget_upload(&job).await;
                if aborted {
                    tracing::info!(%key, "multipart upload aborted");
                    return Cleared::Aborted;
                }
                return Cleared::Gone;
            }
            Some(parts) => {
                tracing::info!(%key, upload_id = %job.upload_id, parts, round, "parts remain after the abort: aborting again");
            }
            // The listing failed for a moment: the next round looks again.
            None if !job.store.no_part_listing.load(Ordering::Relaxed) => {
                tracing::info!(%key, upload_id = %job.upload_id, round, "could not list the parts: trying again");
            }
            // No listing to check by: the abort's word is taken.
            None if !refused => {
                forget_upload(&job).await;
                return if aborted {
                    Cleared::Aborted
                } else {
                    Cleared::Gone
                };
            }
            None => {
                tracing::warn!(%key, upload_id = %job.upload_id, "the store refused to abort the multipart upload");
                return left(&job);
            }
        }
    }
    left(&job)
}

fn left(job: &AbortJob) -> Cleared {
    tracing::warn!(
        key = %job.key, upload_id = %job.upload_id, entry = %job.journal_key,
        "a multipart upload could not be cleared: its journal entry is kept for the next sweep"
    );
    job.metrics().orphan_upload_left();
    Cleared::Left
}

/// Whether the store's answer says there is no such upload.
fn gone(e: &S3Error) -> bool {
    e.code.as_deref() == Some("NoSuchUpload") || e.status == Some(404)
}

/// How many parts of the upload the store still holds: `Some(0)` when it
/// says the upload is gone; `None` when it cannot tell (no `ListParts`, or
/// the listing failed).
async fn parts_left(job: &AbortJob) -> Option<usize> {
    if job.store.no_part_listing.load(Ordering::Relaxed) {
        return None;
    }
    let key = &job.key;
    let listed = job
        .client()
        .list_parts()
        .bucket(&job.store.bucket)
        .key(key)
        .upload_id(&job.upload_id)
        .send()
        .timed(job.metrics().s3_timer(S3Op::ListParts))
        .await;
    match listed {
        Ok(list) => {
            job.metrics()
                .http_response(crate::telemetry::metrics::Target::S3, Some(200));
            Some(list.parts().len())
        }
        Err(e) => {
            let status = e.raw_response().map(|r| r.status().as_u16());
            let e = S3Error::from_sdk(format!("listing the parts of {key}"), e);
            if gone(&e) {
                // The expected answer after an abort: not counted as a
                // failing store.
                return Some(0);
            }
            job.metrics()
                .http_response(crate::telemetry::metrics::Target::S3, status);
            if e.status == Some(501) || e.code.as_deref() == Some("NotImplemented") {
                tracing::info!("the store has no ListParts: an abort is taken at its word");
                job.store.no_part_listing.store(true, Ordering::Relaxed);
            } else {
                tracing::warn!(%key, error = %e, "could not list the parts of an aborted upload");
            }
            None
        }
    }
}

/// Delete an upload's journal entry (it completed, or is gone).
pub(crate) async fn forget_upload(job: &AbortJob) {
    let deleted = job
        .client()
        .delete_object()
        .bucket(&job.store.bucket)
        .key(&job.journal_key)
        .send()
        .timed(job.metrics().s3_timer(S3Op::Delete))
        .await
        .observed(job.metrics(), || format!("DELETE {}", job.journal_key));
    if let Err(e) = deleted {
        tracing::warn!(key = %job.key, error = %e, "could not delete the upload's journal entry");
    }
}
