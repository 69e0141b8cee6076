//! A real HTTP/1.1 VOD origin on 127.0.0.1 serving files from memory, with
//! faults on demand: 503s, connections cut mid-body, bodies shorter than their
//! Content-Length, no range support, 404, slow chunks, bytes withheld until
//! released. It counts what it serves. Pages (`.html`) are served as HTML, so
//! a page and its videos can come from one origin.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Faults of one file.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Answer 503 to this many requests first.
    pub fail_first: u32,
    /// Close the connection after this many body bytes (fewer than the
    /// Content-Length promised), for the next `cuts` responses.
    pub cut_after: Option<u64>,
    pub cuts: u32,
    /// Cut with a TCP reset instead of a clean close: bytes in flight are lost.
    pub reset: bool,
    /// Ignore Range headers (always 200 with the whole file).
    pub no_ranges: bool,
    /// Answer a range request with at most this many bytes (a whole, valid
    /// 206 for less than was asked, as some CDNs do).
    pub range_cap: Option<u64>,
    /// Send no ETag or Last-Modified.
    pub no_validator: bool,
    /// Pause between 16 KiB chunks.
    pub chunk_delay: Option<Duration>,
    /// Answer 302 with this Location instead of the file.
    pub redirect_to: Option<String>,
    /// Send no byte from this offset on while the gate is shut, in every
    /// response (as a stalled CDN does).
    pub withhold: Option<Withhold>,
}

/// A gate on a file's bytes from `from` on: shut while `shut` is true.
#[derive(Debug, Clone)]
pub struct Withhold {
    pub from: u64,
    pub shut: Arc<AtomicBool>,
}

/// A file's bytes: in memory, or generated (for files of many GB).
pub enum Body {
    Memory(Vec<u8>),
    /// `head`, then `filler_len` bytes repeating a 1 MiB pattern, then `tail`.
    Synthetic {
        head: Vec<u8>,
        filler_len: u64,
        tail: Vec<u8>,
    },
}

/// Bytes that are not all alike (so a misplaced range shows in an MD5).
pub fn noise(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// The repeating pattern of synthetic bodies.
fn pattern() -> &'static [u8] {
    static PATTERN: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    PATTERN.get_or_init(|| noise(1 << 20))
}

impl Body {
    pub fn len(&self) -> u64 {
        match self {
            Body::Memory(v) => v.len() as u64,
            Body::Synthetic {
                head,
                filler_len,
                tail,
            } => head.len() as u64 + filler_len + tail.len() as u64,
        }
    }

    /// Fill `out` with the bytes from `offset`.
    pub fn read_at(&self, offset: u64, out: &mut [u8]) {
        match self {
            Body::Memory(v) => {
                out.copy_from_slice(&v[offset as usize..offset as usize + out.len()])
            }
            Body::Synthetic {
                head,
                filler_len,
                tail,
            } => {
                let (h, f) = (head.len() as u64, *filler_len);
                let mut done = 0usize;
                while done < out.len() {
                    let at = offset + done as u64;
                    let rest = &mut out[done..];
                    let n = if at < h {
                        let n = rest.len().min((h - at) as usize);
                        rest[..n].copy_from_slice(&head[at as usize..at as usize + n]);
                        n
                    } else if at < h + f {
                        let in_pattern = ((at - h) % (1 << 20)) as usize;
                        let n = rest
                            .len()
                            .min((h + f - at) as usize)
                            .min((1 << 20) - in_pattern);
                        rest[..n].copy_from_slice(&pattern()[in_pattern..in_pattern + n]);
                        n
                    } else {
                        let from = (at - h - f) as usize;
                        let n = rest.len().min(tail.len() - from);
                        rest[..n].copy_from_slice(&tail[from..from + n]);
                        n
                    };
                    done += n;
                }
            }
        }
    }
}

#[derive(Default)]
struct State {
    files: HashMap<String, (Arc<Body>, Faults)>,
}

#[derive(Clone)]
pub struct Origin {
    pub base: String,
    state: Arc<Mutex<State>>,
    served: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    /// Responses being sent now, and the most at once.
    sending: Arc<AtomicU64>,
    peak_sending: Arc<AtomicU64>,
}

/// One response being sent: counted while it lives.
struct Sending(Arc<AtomicU64>);

impl Drop for Sending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Origin {
    pub async fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let origin = Origin {
            base,
            state: Arc::default(),
            served: Arc::default(),
            requests: Arc::default(),
            sending: Arc::default(),
            peak_sending: Arc::default(),
        };
        let server = origin.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                // Like a CDN: no Nagle delay between the headers and a small body.
                let _ = stream.set_nodelay(true);
                let server = server.clone();
                tokio::spawn(async move { server.serve(stream).await });
            }
        });
        origin
    }

    /// The origin on a thread and runtime of its own, like a separate server:
    /// its latency does not depend on what the caller's runtime is doing.
    pub fn start_detached() -> Origin {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                tx.send(Origin::start().await).unwrap();
                std::future::pending::<()>().await;
            });
        });
        rx.recv().unwrap()
    }

    /// Serve `body` at `path` (which starts with `/`), returning its URL.
    pub fn add(&self, path: &str, body: Vec<u8>, faults: Faults) -> String {
        self.add_body(path, Body::Memory(body), faults)
    }

    pub fn add_body(&self, path: &str, body: Body, faults: Faults) -> String {
        self.state
            .lock()
            .unwrap()
            .files
            .insert(path.to_owned(), (Arc::new(body), faults));
        format!("{}{path}", self.base)
    }

    /// Body bytes served so far, all files and requests.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// The most file bodies this origin was sending at once.
    pub fn peak_concurrent(&self) -> u64 {
        self.peak_sending.load(Ordering::SeqCst)
    }

    /// One connection, kept alive across requests (HTTP/1.1) until a fault cuts it.
    async fn serve(&self, mut stream: TcpStream) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let end = loop {
                if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break pos + 4;
                }
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end);
            if !self.respond(&mut stream, &head).await {
                return;
            }
        }
    }

    // Long on purpose: the test origin's whole HTTP behaviour (ranges,
    // validators, every injected fault) in one match, read top to bottom.
    /// Answer one request; `false` when the connection must close.
    async fn respond(&self, stream: &mut TcpStream, head: &str) -> bool {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let mut lines = head.split("\r\n");
        let path = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .unwrap_or("/")
            .to_owned();
        let headers: HashMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();

        let found = {
            let mut state = self.state.lock().unwrap();
            state.files.get_mut(&path).map(|(body, faults)| {
                let snapshot = faults.clone();
                if faults.fail_first > 0 {
                    faults.fail_first -= 1;
                } else if faults.cuts > 0 {
                    faults.cuts -= 1;
                }
                (body.clone(), snapshot)
            })
        };
        let Some((body, faults)) = found else {
            let _ = stream
                .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                .await;
            return true;
        };
        if let Some(location) = &faults.redirect_to {
            let response =
                format!("HTTP/1.1 302 Found\r\nlocation: {location}\r\ncontent-length: 0\r\n\r\n");
            let _ = stream.write_all(response.as_bytes()).await;
            return true;
        }
        if faults.fail_first > 0 {
            let _ = stream
                .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
                .await;
            return true;
        }
        let etag = format!("\"len-{}\"", body.len());
        let total = body.len();
        let range = headers
            .get("range")
            .filter(|_| !faults.no_ranges)
            .filter(|_| headers.get("if-range").is_none_or(|v| *v == etag))
            .and_then(|r| parse_range(r, total));
        let (status, start, end) = match range {
            Some((s, e)) => (
                "206 Partial Content",
                s,
                faults.range_cap.map_or(e, |cap| e.min(s + cap)),
            ),
            None => ("200 OK", 0, total),
        };
        let content_type = if path.ends_with(".html") {
            "text/html; charset=utf-8"
        } else {
            "video/mp4"
        };
        let mut response = format!(
            "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\naccept-ranges: {}\r\n",
            end - start,
            if faults.no_ranges { "none" } else { "bytes" }
        );
        if range.is_some() {
            response.push_str(&format!(
                "content-range: bytes {start}-{}/{total}\r\n",
                end.max(start + 1) - 1
            ));
        }
        if !faults.no_validator {
            response.push_str(&format!("etag: {etag}\r\n"));
        }
        response.push_str("\r\n");
        if stream.write_all(response.as_bytes()).await.is_err() {
            return false;
        }
        let cut = if faults.cuts > 0 {
            faults.cut_after
        } else {
            None
        };
        let now = self.sending.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak_sending.fetch_max(now, Ordering::SeqCst);
        let _sending = Sending(self.sending.clone());
        let mut sent = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        let mut offset = start;
        while offset < end {
            let mut len = ((end - offset) as usize).min(if faults.chunk_delay.is_some() {
                16 * 1024
            } else {
                buf.len()
            });
            if let Some(limit) = cut {
                if sent >= limit {
                    break;
                }
                len = len.min((limit - sent) as usize);
            }
            if let Some(gate) = &faults.withhold {
                if offset < gate.from {
                    len = len.min((gate.from - offset) as usize);
                } else {
                    while gate.shut.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            let chunk = &mut buf[..len];
            body.read_at(offset, chunk);
            if stream.write_all(chunk).await.is_err() {
                return false;
            }
            offset += len as u64;
            sent += len as u64;
            self.served.fetch_add(len as u64, Ordering::SeqCst);
            if let Some(delay) = faults.chunk_delay {
                tokio::time::sleep(delay).await;
            }
        }
        if offset == end {
            return true; // complete: the connection stays open for the next request
        }
        if faults.reset {
            let _ = stream.set_zero_linger();
        } else {
            let _ = stream.shutdown().await;
        }
        false
    }
}

/// `bytes=START-` or `bytes=START-END` → [start, end).
fn parse_range(value: &str, total: u64) -> Option<(u64, u64)> {
    let (start, end) = value.strip_prefix("bytes=")?.split_once('-')?;
    let start: u64 = start.parse().ok()?;
    let end = if end.is_empty() {
        total
    } else {
        (end.parse::<u64>().ok()? + 1).min(total)
    };
    (start < total && start < end).then_some((start, end))
}
