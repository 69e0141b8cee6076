//! One object's upload, its parts in flight side by side.
//!
//! Parts are numbered when they are handed over, upload as tasks of their own
//! (up to the transfer's `s3_upload_concurrency`, within the worker's
//! [`PartBudget`](super::budget::PartBudget)), finish in any order, and are
//! listed in part order for the completion. A file that fits in one part is a
//! single PUT carrying its MD5 as metadata. A larger one starts its multipart
//! upload (create, then journal) as soon as its size is known, while its
//! first part is still being read.
//!
//! While the upload lives its journal entry's lease is renewed
//! ([`Lease`]), so no other delivery aborts it. Any failure, and a drop
//! half-way (shutdown, panic, a sibling track's failure), waits for the parts
//! in flight to end and then aborts the upload until it is gone: a part that
//! lands after an abort would stay in the store.

use std::sync::Arc;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio::task::{JoinError, JoinHandle, JoinSet};
use tracing::Instrument;

use crate::decision::record::{Archive, Probe};
use crate::media::archive::budget::{PartBudget, PartBuf};
use crate::media::archive::manifest::metadata;
use crate::media::archive::orphans::{Lease, abort_until_gone, forget_upload};
use crate::media::archive::{Archiver, Observed, Timed, attempt_timeout};
use crate::media::fetch::ChunkSink;
use crate::media::s3_error::S3Error;
use crate::telemetry::metrics::S3Op;

/// Whether the multipart upload exists yet.
enum Started {
    /// No: a single PUT, unless a part is handed over.
    No,
    /// Its creation (and journal entry) is under way.
    Starting(JoinHandle<Result<(String, Lease), S3Error>>),
    /// Created and journaled, its lease renewed.
    Id(String, Lease),
}

/// A part uploaded: its number, ETag and size.
struct Uploaded {
    part: CompletedPart,
    size: u64,
}

/// One object being uploaded.
pub struct Upload {
    store: Archiver,
    key: String,
    /// This transfer's parts in flight (read, waiting, or uploading), at most.
    slots: Arc<Semaphore>,
    /// The part being filled by a streaming download.
    filling: Option<PartBuf>,
    /// The whole file, read in one part by a ranged transfer.
    whole: Option<Bytes>,
    /// Parts handed over so far (a streaming download numbers them in order).
    handed: i32,
    started: Started,
    in_flight: JoinSet<Result<Uploaded, S3Error>>,
    done: Vec<Uploaded>,
}

impl ChunkSink for Upload {
    fn expect(&mut self, size: Option<u64>) {
        if size.is_some_and(|s| s > self.store.part_size() as u64) {
            self.begin();
        }
    }

    async fn write(&mut self, chunk: Bytes) -> Result<(), S3Error> {
        self.reap()?;
        // Fill the part buffer exactly to its capacity: it never reallocates.
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            // Room for a whole part is taken before its first byte, never
            // while a half-filled part is held (budget.rs).
            let part = match &mut self.filling {
                Some(part) => part,
                None => {
                    let part = self.store.budget.take(&self.slots).await;
                    self.reap()?;
                    self.filling.insert(part)
                }
            };
            let (now, later) = rest.split_at(part.room().min(rest.len()));
            part.buf().extend_from_slice(now);
            rest = later;
            if part.room() == 0 {
                let full = self.filling.take().expect("a part is being filled");
                self.put_part(self.handed + 1, full.freeze()).await?;
            }
        }
        Ok(())
    }
}

impl Upload {
    pub(crate) fn new(store: Archiver, key: String, slots: Arc<Semaphore>) -> Upload {
        Upload {
            store,
            key,
            slots,
            filling: None,
            whole: None,
            handed: 0,
            started: Started::No,
            in_flight: JoinSet::new(),
            done: Vec::new(),
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// The worker's budget and this transfer's slots: where a ranged
    /// transfer takes each part's buffer before it opens the part's request.
    pub fn buffers(&self) -> (Arc<PartBudget>, Arc<Semaphore>) {
        (self.store.budget.clone(), self.slots.clone())
    }

    /// Start the multipart upload now (create, then journal), in the
    /// background: the first part does not wait for it to be read.
    pub fn begin(&mut self) {
        if !matches!(self.started, Started::No) {
            return;
        }
        let (store, key) = (self.store.clone(), self.key.clone());
        let start = async move {
            let created = store
                .client
                .create_multipart_upload()
                .bucket(&store.bucket)
                .key(&key)
                .content_type("video/mp4")
                .set_storage_class(store.storage_class.clone())
                .set_server_side_encryption(store.sse.clone())
                .send()
                .timed(store.metrics.s3_timer(S3Op::CreateUpload))
                .await
                .observed(&store.metrics, || format!("starting the upload of {key}"))?;
            let id = created
                .upload_id()
                .ok_or_else(|| {
                    S3Error::protocol(
                        format!("starting the upload of {key}"),
                        "the store answered without an upload id",
                    )
                })?
                .to_owned();
            // Journaled before any part: a killed worker's upload is found
            // and aborted once its lease runs out. If the journal fails, the
            // upload is abandoned at once (no part was sent).
            if let Err(e) = store.journal(&key, &id).await {
                abort_until_gone(store.job(&key, &id)).await;
                return Err(e);
            }
            let lease = Lease::start(store.clone(), key, id.clone());
            Ok((id, lease))
        };
        self.started = Started::Starting(tokio::spawn(start.in_current_span()));
    }

    /// The upload's id, once it is created and journaled.
    async fn id(&mut self) -> Result<String, S3Error> {
        self.begin();
        if let Started::Starting(handle) = &mut self.started {
            let id = match handle.await {
                Ok(result) => result,
                Err(e) => Err(joined(&self.key, "starting the upload", e)),
            };
            // Failed: nothing to abort (the start task cleaned up after itself).
            return match id {
                Ok((id, lease)) => {
                    self.started = Started::Id(id.clone(), lease);
                    Ok(id)
                }
                Err(e) => {
                    self.started = Started::No;
                    Err(e)
                }
            };
        }
        match &self.started {
            Started::Id(id, _) => Ok(id.clone()),
            _ => unreachable!("begun above"),
        }
    }

    /// The whole file, read in one part: a single PUT at [`Upload::finish`].
    pub fn set_whole(&mut self, body: Bytes) {
        self.whole = Some(body);
    }

    /// Upload part `number` (from 1) in a task of its own; a failure shows
    /// at the next call, or at [`Upload::finish`].
    pub async fn put_part(&mut self, number: i32, body: Bytes) -> Result<(), S3Error> {
        self.reap()?;
        self.handed = self.handed.max(number);
        let upload_id = self.id().await?;
        let (store, key) = (self.store.clone(), self.key.clone());
        let size = body.len() as u64;
        let send = async move {
            let request = store
                .client
                .upload_part()
                .bucket(&store.bucket)
                .key(&key)
                .upload_id(upload_id)
                .part_number(number)
                .body(ByteStream::from(body))
                .customize()
                .config_override(store.part_config());
            let answer = match store.unsigned_payload {
                true => request.disable_payload_signing(),
                false => request,
            }
            .send()
            .timed(store.metrics.s3_timer(S3Op::UploadPart))
            .await
            .observed(&store.metrics, || format!("part {number} of {key}"))?;
            store.metrics.uploaded(store.app, size);
            Ok(Uploaded {
                part: CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(answer.e_tag().map(str::to_owned))
                    .build(),
                size,
            })
        };
        self.in_flight.spawn(send.in_current_span());
        Ok(())
    }

    /// Collect the parts uploaded so far; the first failure, if any.
    fn reap(&mut self) -> Result<(), S3Error> {
        while let Some(joined_part) = self.in_flight.try_join_next() {
            self.record(joined_part)?;
        }
        Ok(())
    }

    fn record(
        &mut self,
        part: Result<Result<Uploaded, S3Error>, JoinError>,
    ) -> Result<(), S3Error> {
        match part {
            Ok(Ok(part)) => {
                self.done.push(part);
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(e) => Err(joined(&self.key, "a part upload", e)),
        }
    }

    /// Complete the object: the parts in order, then its record (MD5 and
    /// probe) beside it; a small file is one PUT with them as metadata.
    pub async fn finish(mut self, md5: &str, probe: Option<&Probe>) -> Result<Archive, S3Error> {
        self.reap()?;
        let store = self.store.clone();
        if matches!(self.started, Started::No) && self.handed == 0 {
            return self.put_whole(md5, probe).await;
        }
        if let Some(last) = self.filling.take() {
            self.put_part(self.handed + 1, last.freeze()).await?;
        } else if self.handed == 0 {
            // Begun for a file announced large that turned out empty.
            self.put_part(1, Bytes::new()).await?;
        }
        while let Some(part) = self.in_flight.join_next().await {
            self.record(part)?;
        }
        let upload_id = self.id().await?;
        let mut parts: Vec<CompletedPart> = Vec::with_capacity(self.done.len());
        let mut size = 0;
        self.done.sort_by_key(|d| d.part.part_number());
        for done in self.done.drain(..) {
            size += done.size;
            parts.push(done.part);
        }
        let numbers: Vec<i32> = parts.iter().filter_map(|p| p.part_number()).collect();
        if numbers != (1..=self.handed).collect::<Vec<_>>() {
            return Err(S3Error::protocol(
                format!("completing {}", self.key),
                format!("parts {numbers:?} of {} handed over", self.handed),
            ));
        }
        let completed = store
            .client
            .complete_multipart_upload()
            .bucket(&store.bucket)
            .key(&self.key)
            .upload_id(&upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .timed(store.metrics.s3_timer(S3Op::Complete))
            .await
            .observed(&store.metrics, || format!("completing {}", self.key))?;
        if let Started::Id(_, lease) = std::mem::replace(&mut self.started, Started::No) {
            lease.end().await;
        }
        let archive = store.archive(&self.key, size, md5, completed.e_tag());
        let job = store.job(&self.key, &upload_id);
        let (_, recorded) = tokio::join!(
            forget_upload(&job),
            store.put_object_record(&archive, probe)
        );
        if let Err(e) = recorded {
            // The copy is whole and named by the record; only a redelivery
            // would upload it again.
            tracing::warn!(key = %self.key, error = %e, "could not write the object's record");
        }
        Ok(archive)
    }

    /// The whole file as one PUT, its MD5 and probe as metadata.
    async fn put_whole(mut self, md5: &str, probe: Option<&Probe>) -> Result<Archive, S3Error> {
        let store = self.store.clone();
        let body = match (self.whole.take(), self.filling.take()) {
            (Some(whole), _) => whole,
            (None, filling) => filling.map_or_else(Bytes::new, PartBuf::freeze),
        };
        let size = body.len() as u64;
        let request = store
            .client
            .put_object()
            .bucket(&store.bucket)
            .key(&self.key)
            .content_type("video/mp4")
            .set_metadata(Some(metadata(md5, probe)))
            .set_storage_class(store.storage_class.clone())
            .set_server_side_encryption(store.sse.clone())
            .body(ByteStream::from(body))
            .customize()
            .config_override(store.part_config());
        let put = match store.unsigned_payload {
            true => request.disable_payload_signing(),
            false => request,
        }
        .send()
        .timed(store.metrics.s3_timer(S3Op::Put))
        .await
        .observed(&store.metrics, || format!("PUT {}", self.key))?;
        store.metrics.uploaded(store.app, size);
        Ok(store.archive(&self.key, size, md5, put.e_tag()))
    }

    /// Abandon the upload: let the parts in flight end, then abort it until
    /// it is gone.
    pub async fn abort(mut self) {
        let parts = std::mem::take(&mut self.in_flight);
        let started = std::mem::replace(&mut self.started, Started::No);
        abort_started(self.store.clone(), self.key.clone(), started, parts).await;
    }
}

/// Abort the multipart upload `started` describes, once its parts in flight
/// have ended (landed or failed) and its creation (if under way) has an id;
/// nothing when none was started. Its lease ends first: a renewal must not
/// write the entry again after the abort forgets it.
async fn abort_started(
    store: Archiver,
    key: String,
    started: Started,
    mut parts: JoinSet<Result<Uploaded, S3Error>>,
) {
    while parts.join_next().await.is_some() {}
    let (id, lease) = match started {
        Started::No => return,
        Started::Id(id, lease) => (id, lease),
        Started::Starting(handle) => match handle.await {
            Ok(Ok(started)) => started,
            // Not created, or its start task aborted it already.
            _ => return,
        },
    };
    lease.end().await;
    abort_until_gone(store.job(&key, &id)).await;
}

/// An upload dropped half-way (its task aborted at shutdown, a sibling
/// track's failure, a panic) is aborted in the background, once its parts
/// in flight have ended (each within the part deadline), so no orphan parts
/// remain.
impl Drop for Upload {
    fn drop(&mut self) {
        let parts = std::mem::take(&mut self.in_flight);
        let started = std::mem::replace(&mut self.started, Started::No);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let abort = abort_started(self.store.clone(), self.key.clone(), started, parts);
        self.store.cleanup.spawn_on(abort, &runtime);
    }
}

impl Archiver {
    /// The SDK's settings for a request carrying a part: its own deadline.
    fn part_config(&self) -> aws_sdk_s3::config::Builder {
        aws_sdk_s3::config::Builder::default().timeout_config(attempt_timeout(self.part_timeout))
    }
}

/// A task that panicked or was cancelled, as a failure of `what`.
fn joined(key: &str, what: &str, e: JoinError) -> S3Error {
    let why = if e.is_panic() {
        "panicked"
    } else {
        "was cancelled"
    };
    S3Error::protocol(format!("{what} of {key}"), format!("the task {why}"))
}
