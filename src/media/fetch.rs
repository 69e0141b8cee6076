//! Fetch: the VOD files over HTTP, streamed — never held whole in memory.
//!
//! [`Fetcher::download`] streams a file into a [`ChunkSink`] (the archive
//! upload), computing its MD5 and probing its `moov` as the bytes pass, and
//! resumes with `Range` + `If-Range` when the connection drops mid-body.
//! [`Fetcher::probe_by_ranges`] reads only the box headers and the `moov` box.
//! Errors carry their reason code and whether a retry can help.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use md5::{Digest, Md5};
use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap};

use crate::decision::reason::{ReasonCode, error_chain};
use crate::decision::record::Probe;
use crate::decision::url_policy::UrlPolicy;
use crate::media::guard::{GuardedResolver, Refused};
use crate::media::probe::{MAX_MOOV_BYTES, MoovScanner, parse_box_header, parse_moov};
use crate::media::s3_error::S3Error;
use crate::telemetry::metrics::{Metrics, Target};

/// First range read of a probe: enough for `ftyp` and a small faststart `moov`.
const PROBE_WINDOW: u64 = 32 * 1024;
/// After the first window, a rest of the file this small is read in one
/// request: past `mdat` it is usually just the `moov` box, so the box header
/// and the box come in one round trip instead of two.
const TAIL_WINDOW: u64 = 1024 * 1024;
/// Top-level boxes walked before a probe gives up.
const MAX_BOXES: usize = 64;
/// Redirect hops followed, each checked against the URL policy.
const MAX_REDIRECTS: usize = 3;

#[derive(Debug, Clone)]
pub struct FetchSettings {
    pub connect_timeout: Duration,
    /// Longest wait for the response headers or for the next chunk of the body.
    pub idle_timeout: Duration,
    pub max_file_bytes: u64,
    /// Range resumes within one download before it counts as failed.
    pub max_resumes: u32,
    /// Which URLs may be fetched at all.
    pub url_policy: Arc<UrlPolicy>,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("the VOD origin answered HTTP {0}: the file is gone")]
    NotFound(u16),
    #[error("the VOD origin answered HTTP {0}")]
    Status(u16),
    #[error("the file has {size} bytes, more than the limit of {max}")]
    TooLarge { size: u64, max: u64 },
    #[error("size mismatch: {0}")]
    SizeMismatch(String),
    #[error("download interrupted after {received} bytes: {why}")]
    Interrupted { received: u64, why: String },
    #[error("no data from the VOD origin for {0:?}")]
    IdleTimeout(Duration),
    #[error("HTTP: {0}")]
    Transport(String),
    #[error("archive: {0}")]
    Sink(#[from] S3Error),
    #[error("URL not allowed: {0}")]
    NotAllowed(String),
    /// Stopped because another track of the lesson failed.
    #[error("{0}")]
    Cancelled(String),
}

impl FetchError {
    pub fn reason(&self) -> ReasonCode {
        match self {
            FetchError::NotFound(_) => ReasonCode::VodNotFound,
            FetchError::Status(s) if !retryable_status(*s) => ReasonCode::VodUnavailable,
            FetchError::TooLarge { .. } => ReasonCode::FileTooLarge,
            FetchError::SizeMismatch(_) => ReasonCode::SizeMismatch,
            FetchError::Sink(e) => e.reason(),
            FetchError::NotAllowed(_) => ReasonCode::UrlNotAllowed,
            FetchError::Status(_)
            | FetchError::Interrupted { .. }
            | FetchError::IdleTimeout(_)
            | FetchError::Transport(_)
            | FetchError::Cancelled(_) => ReasonCode::FetchFailed,
        }
    }

    /// Can trying again help?
    pub fn is_transient(&self) -> bool {
        self.reason().is_transient()
    }
}

fn retryable_status(status: u16) -> bool {
    status == 408 || status == 429 || status >= 500
}

/// Where downloaded bytes go, in order: an archive upload, or nowhere.
pub trait ChunkSink: Send {
    /// The file's size, when the origin announced it (before any byte).
    fn expect(&mut self, _size: Option<u64>) {}

    fn write(&mut self, chunk: Bytes) -> impl Future<Output = Result<(), S3Error>> + Send;
}

/// A sink that keeps nothing (probing and checksumming only).
pub struct Discard;

impl ChunkSink for Discard {
    async fn write(&mut self, _chunk: Bytes) -> Result<(), S3Error> {
        Ok(())
    }
}

/// What a completed download saw.
#[derive(Debug)]
pub struct Download {
    pub size: u64,
    pub md5: String,
    /// Bytes received over the network, resumes included.
    pub transferred: u64,
    pub resumes: u32,
    pub probe: Result<Probe, String>,
}

/// What a range probe read.
#[derive(Debug)]
pub struct RangeProbe {
    pub probe: Result<Probe, String>,
    pub bytes_read: u64,
    pub requests: u32,
    /// The file's size, from `Content-Range`.
    pub total_size: Option<u64>,
}

#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    settings: FetchSettings,
    metrics: Metrics,
}

impl Fetcher {
    pub fn new(settings: FetchSettings, metrics: Metrics) -> Result<Fetcher, FetchError> {
        // Every redirect hop is checked like the first URL.
        let policy = settings.url_policy.clone();
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            // `previous()` holds the first URL and every hop before this
            // one: following this redirect makes it hop number `len()`.
            if attempt.previous().len() > MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            match policy.check(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(why) => attempt.error(format!("redirect refused: {why}")),
            }
        });
        let client = reqwest::Client::builder()
            // No proxy from HTTP_PROXY & co: a proxy resolves host names
            // itself, past the resolver that refuses private addresses.
            .no_proxy()
            .connect_timeout(settings.connect_timeout)
            .redirect(redirects)
            .dns_resolver(Arc::new(GuardedResolver(settings.url_policy.clone())))
            .user_agent(concat!("lesson-replay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| FetchError::Transport(e.to_string()))?;
        Ok(Fetcher {
            client,
            settings,
            metrics,
        })
    }

    /// Refuse a URL whose scheme or host the policy forbids, before any
    /// request. The addresses a host name resolves to are checked by the
    /// client's resolver when it connects, so pooled connections cost no
    /// lookup and a rebinding DNS answer cannot slip past.
    pub fn check_url(&self, url: &str) -> Result<url::Url, FetchError> {
        self.settings
            .url_policy
            .check_str(url)
            .map_err(FetchError::NotAllowed)
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, FetchError> {
        let response = tokio::time::timeout(self.settings.idle_timeout, request.send())
            .await
            .map_err(|_| FetchError::IdleTimeout(self.settings.idle_timeout))?
            .inspect(|r| {
                self.metrics
                    .http_response(Target::Vod, Some(r.status().as_u16()))
            })
            .inspect_err(|_| self.metrics.http_response(Target::Vod, None))
            .map_err(|e| {
                if e.is_redirect() || refused_by_guard(&e) {
                    FetchError::NotAllowed(error_chain(&e))
                } else {
                    FetchError::Transport(error_chain(&e))
                }
            })?;
        let status = response.status();
        if status.is_redirection() {
            // The client follows every redirect it may; one it hands back
            // leads somewhere it must not go (another scheme, no Location).
            let to = response
                .headers()
                .get(header::LOCATION)
                .map(|l| String::from_utf8_lossy(l.as_bytes()).into_owned());
            return Err(FetchError::NotAllowed(format!(
                "HTTP {} redirect to {to:?} not followed: only http(s) URLs on allowed hosts",
                status.as_u16()
            )));
        }
        if status == StatusCode::NOT_FOUND || status == StatusCode::GONE {
            return Err(FetchError::NotFound(status.as_u16()));
        }
        if !status.is_success() {
            return Err(FetchError::Status(status.as_u16()));
        }
        Ok(response)
    }

    // Long on purpose: one loop owns the resume state (offset, validator,
    // bytes to skip, MD5, moov scanner); split, it would travel in six
    // arguments between functions that only make sense together.
    /// Stream `url` into `sink`, verifying its size against `Content-Length` and
    /// `declared_size`, resuming after a dropped connection where the origin allows.
    pub async fn download<S: ChunkSink>(
        &self,
        url: &str,
        declared_size: Option<i64>,
        sink: &mut S,
    ) -> Result<Download, FetchError> {
        let url = self.check_url(url)?;
        let first = self.send(self.client.get(url.clone())).await?;
        self.stream(&url, declared_size, sink, first).await
    }

    /// [`Fetcher::download`] from its first response, `first` (a whole-file
    /// answer: 200, or a 206 covering the whole file).
    pub async fn stream<S: ChunkSink>(
        &self,
        url: &url::Url,
        declared_size: Option<i64>,
        sink: &mut S,
        first: reqwest::Response,
    ) -> Result<Download, FetchError> {
        let mut first = Some(first);
        let mut md5 = Md5::new();
        let mut scanner = MoovScanner::new();
        let mut received: u64 = 0;
        let mut transferred: u64 = 0;
        let mut resumes = 0;
        let mut total: Option<u64> = None;
        let mut validator: Option<String> = None;
        loop {
            let mut request = self.client.get(url.clone());
            if received > 0 {
                let guard = validator.clone().expect("resume only with a validator");
                request = request
                    .header(header::RANGE, format!("bytes={received}-"))
                    .header(header::IF_RANGE, guard);
            }
            let response = match first.take() {
                Some(first) => first,
                None => self.send(request).await?,
            };
            // Bytes of this response to drop: the origin ignored our Range.
            let mut skip: u64 = 0;
            if received == 0 {
                total = response.content_length();
                validator = resume_validator(response.headers());
                if let Some(size) = total {
                    check_size(size, declared_size, self.settings.max_file_bytes)?;
                }
                sink.expect(total);
            } else if response.status() == StatusCode::PARTIAL_CONTENT {
                let start = content_range(response.headers()).map(|r| r.0);
                if start != Some(received) {
                    return Err(FetchError::Interrupted {
                        received,
                        why: "the origin resumed at the wrong offset".into(),
                    });
                }
            } else if resume_validator(response.headers()) == validator {
                skip = received; // Same file, no range support: read past what we have.
            } else {
                return Err(FetchError::Interrupted {
                    received,
                    why: "the file changed on the origin".into(),
                });
            }

            let mut body = response.bytes_stream();
            let cut = loop {
                let mut chunk = match self.next_chunk(&mut body).await {
                    Ok(Some(chunk)) => chunk,
                    Ok(None) => break None,
                    Err(why) => break Some(why),
                };
                transferred += chunk.len() as u64;
                if skip > 0 {
                    let drop = skip.min(chunk.len() as u64);
                    skip -= drop;
                    chunk = chunk.slice(drop as usize..);
                    if chunk.is_empty() {
                        continue;
                    }
                }
                received += chunk.len() as u64;
                if received > self.settings.max_file_bytes {
                    return Err(FetchError::TooLarge {
                        size: received,
                        max: self.settings.max_file_bytes,
                    });
                }
                if let Some(t) = total
                    && received > t
                {
                    return Err(FetchError::SizeMismatch(format!(
                        "the origin sent more than its Content-Length of {t}"
                    )));
                }
                md5.update(&chunk);
                if !scanner.done() {
                    scanner.feed(&chunk);
                }
                sink.write(chunk).await.map_err(FetchError::Sink)?;
            };
            let complete = match (&cut, total) {
                (None, Some(t)) => received == t,
                (None, None) => true,
                (Some(_), _) => false,
            };
            if complete {
                break;
            }
            let why = match cut {
                Some(why) => why,
                None => format!("body ended at {received} of {} bytes", total.unwrap_or(0)),
            };
            if validator.is_none() || resumes >= self.settings.max_resumes {
                return Err(FetchError::Interrupted { received, why });
            }
            resumes += 1;
            self.metrics.range_resumed();
            tracing::info!(received, resumes, %why, "connection dropped mid-body: resuming with a range request");
        }
        if let Some(declared) = declared_size
            && u64::try_from(declared).ok() != Some(received)
        {
            return Err(FetchError::SizeMismatch(format!(
                "received {received} bytes, video_size declares {declared}"
            )));
        }
        Ok(Download {
            size: received,
            md5: hex::encode(md5.finalize()),
            transferred,
            resumes,
            probe: scanner.finish(),
        })
    }

    /// Probe `url` reading only box headers and the `moov` box with range
    /// requests: a few KB even when `moov` sits at the end of a multi-GB file.
    pub async fn probe_by_ranges(&self, url: &str) -> Result<RangeProbe, FetchError> {
        let url = self.check_url(url)?;
        let mut reader = RangeReader {
            fetcher: self,
            url: &url,
            start: 0,
            buf: Vec::new(),
            total: None,
            bytes_read: 0,
            requests: 0,
        };
        let probe = match reader.find_moov().await {
            Ok(found) => found.and_then(|(ftyp, moov)| parse_moov(&ftyp, &moov)),
            Err(RangeError::NoRanges) => {
                // The origin ignores Range: stream from the start until moov went past.
                return self
                    .probe_by_streaming(&url, reader.bytes_read, reader.requests)
                    .await;
            }
            Err(RangeError::Fetch(e)) => return Err(e),
        };
        Ok(RangeProbe {
            probe,
            bytes_read: reader.bytes_read,
            requests: reader.requests,
            total_size: reader.total,
        })
    }

    async fn probe_by_streaming(
        &self,
        url: &url::Url,
        already_read: u64,
        requests: u32,
    ) -> Result<RangeProbe, FetchError> {
        let response = self.send(self.client.get(url.clone())).await?;
        let total_size = response.content_length();
        let mut body = response.bytes_stream();
        let mut scanner = MoovScanner::new();
        let mut bytes_read = already_read;
        while !scanner.done() {
            match tokio::time::timeout(self.settings.idle_timeout, body.next()).await {
                Err(_) => return Err(FetchError::IdleTimeout(self.settings.idle_timeout)),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(FetchError::Transport(error_chain(&e))),
                Ok(Some(Ok(chunk))) => {
                    bytes_read += chunk.len() as u64;
                    self.metrics.probed(chunk.len() as u64);
                    self.metrics.downloaded(chunk.len() as u64);
                    scanner.feed(&chunk);
                }
            }
        }
        Ok(RangeProbe {
            probe: scanner.finish(),
            bytes_read,
            requests: requests + 1,
            total_size,
        })
    }
}

/// A file that can be read by ranges: its size and the validator every
/// range must match (the same file, not one replaced half-way).
#[derive(Debug, Clone)]
pub struct Source {
    pub url: url::Url,
    pub total: u64,
    pub validator: String,
}

/// The first answer of a transfer.
pub enum Opened {
    /// 206 for the first range, from an origin with ranges and a validator:
    /// the rest can be read by ranges, several at once.
    Ranged {
        response: reqwest::Response,
        source: Source,
    },
    /// The whole file in one stream (200: the origin ignores ranges, or a
    /// range answer without a size or a validator, asked again whole).
    Whole(reqwest::Response),
}

impl Fetcher {
    /// Open `url` for a transfer: ask for its first `first_len` bytes by
    /// range. One request either way when the origin has ranges or ignores
    /// them; two when it answers a range without a size or a validator.
    pub async fn open(&self, url: &url::Url, first_len: u64) -> Result<Opened, FetchError> {
        let request = self
            .client
            .get(url.clone())
            .header(header::RANGE, format!("bytes=0-{}", first_len.max(1) - 1));
        let response = match self.send(request).await {
            // An empty file has no first byte to ask for: read it whole.
            Err(FetchError::Status(416)) => {
                return Ok(Opened::Whole(
                    self.send(self.client.get(url.clone())).await?,
                ));
            }
            other => other?,
        };
        if response.status() != StatusCode::PARTIAL_CONTENT {
            return Ok(Opened::Whole(response));
        }
        let total = content_range(response.headers()).and_then(|(start, total)| match start {
            0 => total,
            _ => None,
        });
        match (total, resume_validator(response.headers())) {
            (Some(total), Some(validator)) => Ok(Opened::Ranged {
                response,
                source: Source {
                    url: url.clone(),
                    total,
                    validator,
                },
            }),
            _ => {
                drop(response);
                let whole = self.send(self.client.get(url.clone())).await?;
                Ok(Opened::Whole(whole))
            }
        }
    }

    /// Read bytes `[start, start + len)` of `source` into `buf` (whose
    /// capacity holds them), from `first` when given (the answer that opened
    /// the file), resuming a cut range with a range of what is left. Every
    /// answer must be a 206 at the asked offset with the file's size and
    /// validator: a changed file is a transient failure (the next attempt
    /// starts over). Returns the bytes received over the network.
    pub async fn read_range(
        &self,
        source: &Source,
        start: u64,
        len: u64,
        buf: &mut Vec<u8>,
        first: Option<reqwest::Response>,
        resumes: &std::sync::atomic::AtomicU32,
    ) -> Result<u64, FetchError> {
        let mut first = first;
        let mut transferred = 0u64;
        let end = start + len;
        loop {
            let at = start + buf.len() as u64;
            let response = match first.take() {
                Some(response) => response,
                None => {
                    // If-Match, not If-Range: a changed file must fail the
                    // range, not answer 200 with the whole new file.
                    let condition = match source.validator.starts_with('"') {
                        true => header::IF_MATCH,
                        false => header::IF_UNMODIFIED_SINCE,
                    };
                    let request = self
                        .client
                        .get(source.url.clone())
                        .header(header::RANGE, format!("bytes={at}-{}", end - 1))
                        .header(condition, source.validator.clone());
                    match self.send(request).await {
                        Err(FetchError::Status(412)) => {
                            return Err(FetchError::Interrupted {
                                received: at,
                                why: "the file changed on the origin (412)".into(),
                            });
                        }
                        other => other?,
                    }
                }
            };
            let range = content_range(response.headers());
            if response.status() != StatusCode::PARTIAL_CONTENT
                || range.map(|r| r.0) != Some(at)
                || range.and_then(|r| r.1) != Some(source.total)
            {
                return Err(FetchError::Interrupted {
                    received: at,
                    why: format!(
                        "the origin answered the range at {at} with HTTP {} {:?}",
                        response.status().as_u16(),
                        response.headers().get(header::CONTENT_RANGE)
                    ),
                });
            }
            if resume_validator(response.headers()).as_deref() != Some(&source.validator) {
                return Err(FetchError::Interrupted {
                    received: at,
                    why: "the file changed on the origin".into(),
                });
            }
            // Where this answer's bytes end (exclusive), as it says.
            let promised_end = range_end(response.headers());
            let before = buf.len();
            let mut body = response.bytes_stream();
            let cut = loop {
                let chunk = match self.next_chunk(&mut body).await {
                    Ok(Some(chunk)) => chunk,
                    Ok(None) => break None,
                    Err(why) => break Some(why),
                };
                transferred += chunk.len() as u64;
                if buf.len() as u64 + chunk.len() as u64 > len {
                    // An origin's quirk, not the file's fault: the next
                    // attempt starts over.
                    return Err(FetchError::Interrupted {
                        received: start + buf.len() as u64,
                        why: format!("the origin sent more than the {len} bytes asked at {start}"),
                    });
                }
                buf.extend_from_slice(&chunk);
            };
            if buf.len() as u64 == len {
                return Ok(transferred);
            }
            // An origin may answer less than the range asked, whole (its
            // Content-Range says so): ask for the rest, no resume spent.
            if cut.is_none() && buf.len() > before && promised_end == Some(start + buf.len() as u64)
            {
                continue;
            }
            let why = cut
                .unwrap_or_else(|| format!("range ended at {} of {end}", start + buf.len() as u64));
            let so_far = resumes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if so_far >= self.settings.max_resumes {
                return Err(FetchError::Interrupted {
                    received: start + buf.len() as u64,
                    why,
                });
            }
            self.metrics.range_resumed();
            tracing::info!(at = start + buf.len() as u64, %why, "range cut mid-body: resuming");
        }
    }

    /// The body's next chunk, counted as downloaded; `None` at its end,
    /// `Err(why)` when the connection is cut or idle past
    /// `fetch_idle_timeout_secs`.
    async fn next_chunk(
        &self,
        body: &mut (impl futures_util::Stream<Item = reqwest::Result<Bytes>> + Unpin),
    ) -> Result<Option<Bytes>, String> {
        match tokio::time::timeout(self.settings.idle_timeout, body.next()).await {
            Err(_) => Err(format!("no data for {:?}", self.settings.idle_timeout)),
            Ok(None) => Ok(None),
            Ok(Some(Err(e))) => Err(error_chain(&e)),
            Ok(Some(Ok(chunk))) => {
                self.metrics.downloaded(chunk.len() as u64);
                Ok(Some(chunk))
            }
        }
    }

    /// Refuse a file larger than allowed, or than its message declares.
    pub fn check_size(&self, size: u64, declared: Option<i64>) -> Result<(), FetchError> {
        check_size(size, declared, self.settings.max_file_bytes)
    }
}

enum RangeError {
    /// The origin answered a range request with the whole file.
    NoRanges,
    Fetch(FetchError),
}

impl From<FetchError> for RangeError {
    fn from(e: FetchError) -> Self {
        RangeError::Fetch(e)
    }
}

/// Reads byte ranges of one file through a small window buffer.
struct RangeReader<'a> {
    fetcher: &'a Fetcher,
    /// Checked against the URL policy once, parsed once.
    url: &'a url::Url,
    /// File offset of `buf[0]`.
    start: u64,
    buf: Vec<u8>,
    total: Option<u64>,
    bytes_read: u64,
    requests: u32,
}

impl RangeReader<'_> {
    /// Make sure `[offset, offset + len)` (clipped to the file) is in the buffer.
    async fn ensure(&mut self, offset: u64, len: u64) -> Result<(), RangeError> {
        // Saturating: box sizes come from the file, a hostile one is 2^64 - 1.
        let wanted = offset.saturating_add(len);
        let end = self.total.map_or(wanted, |t| wanted.min(t));
        let have_end = self.start + self.buf.len() as u64;
        if offset >= self.start && end <= have_end {
            return Ok(());
        }
        // Keep what is already there when the new range continues it.
        let from = if offset >= self.start && offset <= have_end {
            have_end
        } else {
            offset
        };
        if from != have_end {
            self.start = offset;
            self.buf.clear();
        }
        let request = self.fetcher.client.get(self.url.clone()).header(
            header::RANGE,
            format!("bytes={from}-{}", end.max(from.saturating_add(1)) - 1),
        );
        let response = self.fetcher.send(request).await?;
        self.requests += 1;
        if response.status() != StatusCode::PARTIAL_CONTENT {
            return Err(RangeError::NoRanges);
        }
        if let Some((_, total)) = content_range(response.headers()) {
            self.total = total.or(self.total);
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|e| FetchError::Transport(error_chain(&e)))?;
        self.bytes_read += bytes.len() as u64;
        self.fetcher.metrics.probed(bytes.len() as u64);
        self.fetcher.metrics.downloaded(bytes.len() as u64);
        self.buf.extend_from_slice(&bytes);
        Ok(())
    }

    fn slice(&self, offset: u64, len: u64) -> &[u8] {
        let from = (offset - self.start) as usize;
        let to = (from + len as usize).min(self.buf.len());
        &self.buf[from.min(to)..to]
    }

    /// Walk the top-level boxes; `Ok(Ok((ftyp, moov)))` when both are found.
    async fn find_moov(&mut self) -> Result<Result<(Vec<u8>, Vec<u8>), String>, RangeError> {
        let mut offset = 0u64;
        let mut ftyp = None;
        for _ in 0..MAX_BOXES {
            if self.total.is_some_and(|t| offset >= t) {
                break;
            }
            let window = match self.total {
                _ if offset == 0 => PROBE_WINDOW,
                Some(total) if total - offset <= TAIL_WINDOW => total - offset,
                _ => 16,
            };
            self.ensure(offset, window).await?;
            let header = match parse_box_header(self.slice(offset, 16)) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(Err("file ends inside a box header".into())),
                Err(e) => return Ok(Err(e)),
            };
            let Some(size) = header.size else {
                return Ok(Err(
                    "no moov box before a box that runs to the end of the file".into(),
                ));
            };
            if header.is(b"moov") || header.is(b"ftyp") {
                if size > MAX_MOOV_BYTES {
                    return Ok(Err(format!("{size}-byte box is too large to probe")));
                }
                self.ensure(offset, size).await?;
                let bytes = self.slice(offset, size).to_vec();
                if (bytes.len() as u64) < size {
                    return Ok(Err("file ends inside the moov box".into()));
                }
                if header.is(b"ftyp") {
                    ftyp = Some(bytes);
                } else {
                    return Ok(match ftyp {
                        Some(ftyp) => Ok((ftyp, bytes)),
                        None => Err("no ftyp box before moov: not an MP4 file".into()),
                    });
                }
            }
            let Some(next) = offset.checked_add(size) else {
                return Ok(Err("a box size runs past any file".into()));
            };
            offset = next;
        }
        Ok(Err("no moov box found".into()))
    }
}

/// The validator that makes a resume safe: a strong ETag, else Last-Modified.
fn resume_validator(headers: &HeaderMap) -> Option<String> {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &header::HeaderValue| v.to_str().ok())
            .map(str::to_owned)
    };
    text(header::ETAG)
        .filter(|e| !e.starts_with("W/"))
        .or_else(|| text(header::LAST_MODIFIED))
}

/// `Content-Range: bytes START-END/TOTAL` → END + 1.
fn range_end(headers: &HeaderMap) -> Option<u64> {
    let value = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let range = value.strip_prefix("bytes ")?.split_once('/')?.0;
    range.split_once('-')?.1.parse::<u64>().ok()?.checked_add(1)
}

/// `Content-Range: bytes START-END/TOTAL` → (START, TOTAL).
fn content_range(headers: &HeaderMap) -> Option<(u64, Option<u64>)> {
    let value = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let rest = value.strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let start = range.split_once('-')?.0.parse().ok()?;
    Some((start, total.parse().ok()))
}

fn check_size(size: u64, declared: Option<i64>, max: u64) -> Result<(), FetchError> {
    if size > max {
        return Err(FetchError::TooLarge { size, max });
    }
    match declared {
        Some(d) if u64::try_from(d).ok() != Some(size) => Err(FetchError::SizeMismatch(format!(
            "Content-Length is {size}, video_size declares {d}"
        ))),
        _ => Ok(()),
    }
}

/// Did the guard's resolver refuse every address of the host?
fn refused_by_guard(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<Refused>() {
            return true;
        }
        cause = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::s3_error::S3Fault;
    use reqwest::header::HeaderValue;

    #[test]
    fn content_range_is_parsed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_static("bytes 100-199/5000"),
        );
        assert_eq!(content_range(&headers), Some((100, Some(5000))));
        headers.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_static("bytes 0-9/*"),
        );
        assert_eq!(content_range(&headers), Some((0, None)));
        assert_eq!(range_end(&headers), Some(10));
    }

    #[test]
    fn weak_etags_do_not_guard_a_resume() {
        let mut headers = HeaderMap::new();
        headers.insert(header::ETAG, HeaderValue::from_static("W/\"abc\""));
        assert_eq!(resume_validator(&headers), None);
        headers.insert(
            header::LAST_MODIFIED,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(
            resume_validator(&headers).as_deref(),
            Some("Wed, 21 Oct 2015 07:28:00 GMT")
        );
        headers.insert(header::ETAG, HeaderValue::from_static("\"strong\""));
        assert_eq!(resume_validator(&headers).as_deref(), Some("\"strong\""));
    }

    #[test]
    fn errors_are_classified() {
        assert_eq!(FetchError::NotFound(404).reason(), ReasonCode::VodNotFound);
        assert!(!FetchError::NotFound(410).is_transient());
        assert!(FetchError::Status(503).is_transient());
        assert!(FetchError::Status(429).is_transient());
        assert!(!FetchError::Status(403).is_transient());
        assert!(!FetchError::SizeMismatch(String::new()).is_transient());
        assert!(FetchError::IdleTimeout(Duration::from_secs(1)).is_transient());
        let store = |fault| {
            let mut e = S3Error::protocol("PUT k", "refused");
            e.fault = fault;
            FetchError::Sink(e)
        };
        assert!(store(S3Fault::Transient).is_transient());
        assert_eq!(store(S3Fault::Denied).reason(), ReasonCode::ArchiveDenied);
        assert!(!store(S3Fault::Misconfigured).is_transient());
        assert_eq!(
            FetchError::NotAllowed(String::new()).reason(),
            ReasonCode::UrlNotAllowed
        );
        assert!(!FetchError::NotAllowed(String::new()).is_transient());
        assert!(matches!(
            check_size(10, Some(11), 100),
            Err(FetchError::SizeMismatch(_))
        ));
        assert!(matches!(
            check_size(200, None, 100),
            Err(FetchError::TooLarge { .. })
        ));
        assert!(check_size(10, Some(10), 100).is_ok());
    }
}
