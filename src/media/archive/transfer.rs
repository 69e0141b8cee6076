//! One file from the VOD origin into the store, as a pipeline.
//!
//! The file is opened with a range request for its first part. From an
//! origin with ranges and a validator, every part is then one range request
//! (`If-Match` the validator), up to `s3_upload_concurrency` parts in flight
//! on as many connections, each uploaded as soon as it is read: one file is
//! capped neither by one connection nor by waiting for each part's upload.
//! The MD5 (and the `moov` scan of the probe) must see the bytes in order:
//! parts finished early wait, holding their buffer, until the parts before
//! them are hashed (off the async threads). An origin without ranges is read
//! as one stream ([`Fetcher::stream`]), its parts still uploading side by
//! side while the next part is read.
//!
//! Every part's buffer is taken from the worker's budget, in part order,
//! before its request opens (`budget.rs` says why this cannot deadlock).
//! Whatever fails — a range, a part upload — ends the transfer; the caller
//! aborts the upload, and every range still in flight stops as its task is
//! dropped.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;

use bytes::Bytes;
use md5::{Digest, Md5};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::decision::record::Probe;
use crate::media::archive::Upload;
use crate::media::archive::budget::PartBuf;
use crate::media::fetch::{Download, FetchError, Fetcher, Opened, Source};
use crate::media::probe::MoovScanner;

/// Copy `url` into `upload`: the file's size checked against `declared` and
/// the size limit, its MD5 and probe computed on the way.
pub async fn copy(
    fetcher: &Fetcher,
    url: &str,
    declared: Option<i64>,
    upload: &mut Upload,
) -> Result<Download, FetchError> {
    let url = fetcher.check_url(url)?;
    let (budget, slots) = upload.buffers();
    let part_size = budget.part_size() as u64;
    // The first part's room before its request opens.
    let first = budget.take(&slots).await;
    let (response, source) = match fetcher.open(&url, part_size).await? {
        Opened::Whole(response) => {
            drop(first);
            return fetcher.stream(&url, declared, upload, response).await;
        }
        Opened::Ranged { response, source } => (response, source),
    };
    fetcher.check_size(source.total, declared)?;
    Ranged {
        fetcher,
        source: Arc::new(source),
        part_size,
        resumes: Arc::new(AtomicU32::new(0)),
    }
    .run(upload, first, response)
    .await
}

/// A file read by ranges, several at once.
struct Ranged<'a> {
    fetcher: &'a Fetcher,
    source: Arc<Source>,
    part_size: u64,
    /// Resumes of cut ranges, for the whole file (bounded by `fetch_max_resumes`).
    resumes: Arc<AtomicU32>,
}

/// A part read: its index (from 0), its bytes, and what crossed the network.
type Read = Result<(usize, Bytes, u64), FetchError>;

impl Ranged<'_> {
    async fn run(
        self,
        upload: &mut Upload,
        first: PartBuf,
        response: reqwest::Response,
    ) -> Result<Download, FetchError> {
        let total = self.source.total;
        let parts = total.div_ceil(self.part_size).max(1) as usize;
        if parts > 1 {
            // Create and journal the upload while the first part is read.
            upload.begin();
        }
        let (budget, slots) = upload.buffers();
        let mut reads: JoinSet<Read> = JoinSet::new();
        reads.spawn(self.read(0, first, Some(response)));
        let mut next = 1;
        let mut digest = InOrder::new();
        let mut transferred = 0;
        loop {
            tokio::select! {
                // Parts read go on at once: they hold buffers others wait for.
                biased;
                Some(read) = reads.join_next() => {
                    let (index, bytes, received) = read.unwrap_or_else(|e| {
                        Err(FetchError::Transport(format!("a range read task failed: {e}")))
                    })?;
                    transferred += received;
                    if parts == 1 {
                        // The whole file in one part: a single PUT.
                        digest.add(index, bytes.clone()).await;
                        upload.set_whole(bytes);
                        continue;
                    }
                    upload
                        .put_part(index as i32 + 1, bytes.clone())
                        .await
                        .map_err(FetchError::Sink)?;
                    digest.add(index, bytes).await;
                }
                part = budget.take(&slots), if next < parts => {
                    reads.spawn(self.read(next, part, None));
                    next += 1;
                }
                else => break,
            }
        }
        let (md5, probe, hashed) = digest.finish();
        if hashed != total {
            return Err(FetchError::SizeMismatch(format!(
                "read {hashed} bytes of a file of {total}"
            )));
        }
        Ok(Download {
            size: total,
            md5,
            transferred,
            resumes: self.resumes.load(std::sync::atomic::Ordering::Relaxed),
            probe,
        })
    }

    /// A task reading part `index` into `part`.
    fn read(
        &self,
        index: usize,
        mut part: PartBuf,
        first: Option<reqwest::Response>,
    ) -> impl Future<Output = Read> + Send + 'static {
        let fetcher = self.fetcher.clone();
        let (source, resumes) = (self.source.clone(), self.resumes.clone());
        let start = index as u64 * self.part_size;
        let len = self.part_size.min(source.total - start);
        async move {
            let received = fetcher
                .read_range(&source, start, len, part.buf(), first, &resumes)
                .await?;
            Ok((index, part.freeze(), received))
        }
        .in_current_span()
    }
}

/// The MD5 and the `moov` scan, fed the parts in file order whatever order
/// they arrive in; each part is hashed off the async threads.
struct InOrder {
    waiting: BTreeMap<usize, Bytes>,
    next: usize,
    state: Option<(Md5, MoovScanner, u64)>,
}

impl InOrder {
    fn new() -> InOrder {
        InOrder {
            waiting: BTreeMap::new(),
            next: 0,
            state: Some((Md5::new(), MoovScanner::new(), 0)),
        }
    }

    /// Part `index` is read: hash it and every part it was holding up.
    async fn add(&mut self, index: usize, bytes: Bytes) {
        self.waiting.insert(index, bytes);
        let mut ready = Vec::new();
        while let Some(bytes) = self.waiting.remove(&self.next) {
            ready.push(bytes);
            self.next += 1;
        }
        if ready.is_empty() {
            return;
        }
        let (mut md5, mut scanner, mut hashed) = self.state.take().expect("not finished");
        let state = tokio::task::spawn_blocking(move || {
            for bytes in ready {
                md5.update(&bytes);
                if !scanner.done() {
                    scanner.feed(&bytes);
                }
                hashed += bytes.len() as u64;
                // The part's buffer is released here if its upload is done.
            }
            (md5, scanner, hashed)
        })
        .await
        .expect("hashing never panics");
        self.state = Some(state);
    }

    /// The MD5 (hex), the probe, and how many bytes were hashed.
    fn finish(mut self) -> (String, Result<Probe, String>, u64) {
        let (md5, scanner, hashed) = self.state.take().expect("not finished");
        let hashed = if self.waiting.is_empty() { hashed } else { 0 };
        (hex::encode(md5.finalize()), scanner.finish(), hashed)
    }
}
