//! A WAN link of our own for scenario 9: a TCP proxy on 127.0.0.1 that adds a
//! one-way delay and caps the bandwidth, per connection and in total, in each
//! direction.
//!
//! It is a pipe with latency, not stop-and-wait. Each direction of each
//! connection runs two tasks:
//!
//! - a reader: reads a chunk (up to 64 KiB, whatever the socket has), waits
//!   for the per-connection and the shared token buckets to allow its bytes,
//!   stamps it due at `now + delay` and queues it;
//! - a writer: takes the chunks in order, sleeps until each one is due and
//!   writes it on.
//!
//! So while one chunk is "on the wire" the reader keeps reading: a transfer
//! runs at the link's bandwidth, and a request-response costs one delay each
//! way. The queue between the two is bounded in bytes (a semaphore of byte
//! permits) at twice the bandwidth-delay product, so the queue is never what
//! limits throughput but a stalled receiver still pushes back on the sender.
//! End of stream travels like data: the writer shuts its side down after the
//! last chunk, one delay after the reader saw it, so half-closes propagate.
//!
//! What it does not model: loss, reordering, TCP's slow start and congestion
//! window (each side talks TCP with the proxy over loopback). It is the delay
//! and the bandwidth, which is what an uploader's round trips pay for.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;

/// The largest chunk a reader takes at once.
const CHUNK: usize = 64 * 1024;

/// A link's properties, the same in both directions.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Link {
    /// One-way delay.
    pub(crate) delay: Duration,
    /// Bandwidth cap of one connection, bytes/s (each direction on its own).
    pub(crate) per_connection: Option<u64>,
    /// Bandwidth cap shared by all connections, bytes/s, per direction.
    pub(crate) total: Option<u64>,
}

impl Link {
    /// No delay, no caps: a plain pass-through.
    pub(crate) fn local() -> Link {
        Link {
            delay: Duration::ZERO,
            per_connection: None,
            total: None,
        }
    }

    /// Bytes a direction may hold queued: twice the bandwidth-delay product
    /// (at least 256 KiB). Uncapped, the delay is multiplied by 1 GB/s, more
    /// than loopback with a proxy in the middle carries on this machine.
    fn window(&self) -> usize {
        let rate = match (self.per_connection, self.total) {
            (Some(b), Some(t)) => b.min(t),
            (Some(r), None) | (None, Some(r)) => r,
            (None, None) => 1_000_000_000,
        };
        let bdp = rate as f64 * self.delay.as_secs_f64();
        ((2.0 * bdp) as usize).max(256 * 1024)
    }
}

/// A token bucket that may run into debt: taking `n` bytes always succeeds
/// and says how long to wait until the bucket has paid for them. Many takers
/// at once (the shared bucket) are served in the order they took, each
/// waiting for the debt in front of it.
struct Bucket {
    rate: f64,
    /// Bytes that may go at once after an idle spell (a chunk or two).
    burst: f64,
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        let burst = 2.0 * CHUNK as f64;
        Bucket {
            rate: rate as f64,
            burst,
            tokens: burst,
            updated: Instant::now(),
        }
    }

    /// Take `n` bytes; returns when they may go.
    fn take(&mut self, n: usize) -> Instant {
        let now = Instant::now();
        let elapsed = now.duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.updated = now;
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            now
        } else {
            now + Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// A running proxy; stops when dropped.
pub(crate) struct WanProxy {
    pub(crate) addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl Drop for WanProxy {
    fn drop(&mut self) {
        // Stops accepting; connections under way end with their peers.
        self.accept.abort();
    }
}

impl WanProxy {
    /// Listen on a free loopback port and forward every connection to
    /// `upstream` through `link`.
    pub(crate) async fn start(upstream: SocketAddr, link: Link) -> WanProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // One shared bucket per direction: "total" caps each direction.
        let shared = [(); 2].map(|_| link.total.map(|t| Arc::new(Mutex::new(Bucket::new(t)))));
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return; // the client sees its connection closed
                    };
                    // Small requests go out at once: the delay is the link's, not Nagle's.
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let [up, down] = shared;
                    let upward = direction(client_read, server_write, link, up);
                    let downward = direction(server_read, client_write, link, down);
                    tokio::join!(upward, downward);
                });
            }
        });
        WanProxy { addr, accept }
    }
}

/// What travels from a direction's reader to its writer.
enum Item {
    /// Bytes due at an instant, holding their share of the byte window.
    Data(Instant, Bytes, OwnedSemaphorePermit),
    /// End of stream (or a read error), due at an instant.
    End(Instant),
}

/// One direction of one connection, `from` → `to`, until end of stream.
async fn direction(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    link: Link,
    shared: Option<Arc<Mutex<Bucket>>>,
) {
    let window = Arc::new(Semaphore::new(link.window()));
    // Unbounded in items, bounded in bytes by `window`.
    let (tx, mut rx) = mpsc::unbounded_channel::<Item>();
    let mut own = link.per_connection.map(Bucket::new);
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            };
            if n == 0 {
                let _ = tx.send(Item::End(Instant::now() + link.delay));
                return;
            }
            // Pace by both buckets at once: the later of the two decides.
            let mut allowed = Instant::now();
            if let Some(bucket) = own.as_mut() {
                allowed = allowed.max(bucket.take(n));
            }
            if let Some(bucket) = &shared {
                allowed = allowed.max(bucket.lock().unwrap().take(n));
            }
            wait_until(allowed).await;
            let permit = window.clone().acquire_many_owned(n as u32).await.unwrap();
            let due = Instant::now() + link.delay;
            let chunk = Bytes::copy_from_slice(&buf[..n]);
            if tx.send(Item::Data(due, chunk, permit)).is_err() {
                return; // the writer gave up: the far side is gone
            }
        }
    };
    let writer = async move {
        while let Some(item) = rx.recv().await {
            match item {
                Item::Data(due, chunk, permit) => {
                    wait_until(due).await;
                    if to.write_all(&chunk).await.is_err() {
                        return;
                    }
                    drop(permit);
                }
                Item::End(due) => {
                    wait_until(due).await;
                    let _ = to.shutdown().await;
                    return;
                }
            }
        }
    };
    tokio::join!(reader, writer);
}

/// Sleep until `at`; no timer at all when it has passed (the pass-through case).
async fn wait_until(at: Instant) {
    if at > Instant::now() {
        tokio::time::sleep_until(at.into()).await;
    }
}

/// What the self-check measured through a proxy with the scenario's link.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SelfCheck {
    /// Median round trip of a 1-byte echo, ms (expected: 2 × delay).
    pub(crate) rtt_ms: f64,
    /// One connection streaming upward (client → upstream, as an upload to
    /// S3) and downward (upstream → client, as a download from the origin),
    /// MB/s (expected: the per-connection cap).
    pub(crate) one_up_mb_per_s: f64,
    pub(crate) one_down_mb_per_s: f64,
    /// `connections` streaming upward at once, all together, MB/s (expected:
    /// the total cap).
    pub(crate) all_up_mb_per_s: f64,
    pub(crate) connections: usize,
}

/// Check the proxy does what it says with `link`: a 1-byte echo costs ≈ 2 ×
/// delay; one connection streaming `bytes` reaches ≈ the per-connection cap
/// in each direction; `connections` streaming `bytes` each reach ≈ the total
/// cap together.
pub(crate) async fn self_check(link: Link, bytes: u64, connections: usize) -> SelfCheck {
    SelfCheck {
        rtt_ms: echo_rtt_ms(link).await,
        one_up_mb_per_s: stream_rate(link, bytes, 1, Way::Up).await,
        one_down_mb_per_s: stream_rate(link, bytes, 1, Way::Down).await,
        all_up_mb_per_s: stream_rate(link, bytes, connections, Way::Up).await,
        connections,
    }
}

/// Median of 11 round trips of 1 byte through the proxy to an echo server, ms.
async fn echo_rtt_ms(link: Link) -> f64 {
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = echo.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut stream, _) = echo.accept().await.unwrap();
        let _ = stream.set_nodelay(true);
        let mut byte = [0u8; 1];
        while let Ok(1) = stream.read(&mut byte).await {
            if stream.write_all(&byte).await.is_err() {
                break;
            }
        }
    });
    let proxy = WanProxy::start(upstream, link).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let mut rtts = Vec::new();
    let mut byte = [7u8; 1];
    for _ in 0..11 {
        let started = Instant::now();
        stream.write_all(&byte).await.unwrap();
        stream.read_exact(&mut byte).await.unwrap();
        rtts.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    // Our close reaches the echo server one delay later: it ends too.
    drop(stream);
    server.await.unwrap();
    crate::harness::median(rtts)
}

/// Which way a stream of the self-check flows.
#[derive(Clone, Copy, PartialEq)]
enum Way {
    /// Client → upstream.
    Up,
    /// Upstream → client.
    Down,
}

/// `connections` streams of `bytes` each through one proxy at once, all
/// flowing `way`: MB/s (10⁶ bytes/s) of all together, from the start to the
/// last byte received of all, less the one delay the first byte spends on the
/// link. Every stream must arrive whole, or the run fails.
async fn stream_rate(link: Link, bytes: u64, connections: usize, way: Way) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = WanProxy::start(listener.local_addr().unwrap(), link).await;
    let started = Instant::now();
    let upstream = tokio::spawn(async move {
        let mut ends = Vec::new();
        for _ in 0..connections {
            let (stream, _) = listener.accept().await.unwrap();
            ends.push(tokio::spawn(stream_end(stream, bytes, way == Way::Down)));
        }
        ends
    });
    let mut ends = Vec::new();
    for _ in 0..connections {
        let stream = TcpStream::connect(proxy.addr).await.unwrap();
        ends.push(tokio::spawn(stream_end(stream, bytes, way == Way::Up)));
    }
    ends.extend(upstream.await.unwrap());
    let mut finished = started;
    for end in ends {
        if let Some(at) = end.await.unwrap() {
            finished = finished.max(at);
        }
    }
    let seconds = finished.duration_since(started).as_secs_f64() - link.delay.as_secs_f64();
    (connections as u64 * bytes) as f64 / 1e6 / seconds.max(1e-6)
}

/// One end of a self-check stream: the sender writes `bytes` then shuts its
/// side down (returns `None`); the receiver reads to the end, checks it got
/// `bytes`, and returns when the end came.
async fn stream_end(mut stream: TcpStream, bytes: u64, sends: bool) -> Option<Instant> {
    let mut buf = vec![0x5au8; CHUNK];
    if sends {
        let mut left = bytes;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            stream.write_all(&buf[..n]).await.unwrap();
            left -= n as u64;
        }
        stream.shutdown().await.unwrap();
        // Keep the socket until the receiver has closed its side too.
        let _ = stream.read(&mut buf).await;
        return None;
    }
    let mut n = 0u64;
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k as u64,
        }
    }
    let at = Instant::now();
    assert_eq!(n, bytes, "the proxy lost or added bytes");
    Some(at)
}
