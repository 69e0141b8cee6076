//! Upload part buffers, reused. A fresh buffer of several MiB is mmapped (the
//! binary fixes the allocator's mmap threshold, `src/main.rs`): every 4 KiB
//! page faults and is zeroed on first touch, and the whole is unmapped on
//! free — 13 % of the worker's CPU while archiving, measured (BENCHMARKS.md).
//! A buffer comes back here when the store has taken its part, and the next
//! part fills it again.
//!
//! The pool never holds more buffers than were in use at once (a buffer is
//! made only when none is free), and buffers idle for [`IDLE`] are returned
//! to the system: an idle worker does not keep its peak memory.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// How long a free buffer is kept for the next part.
pub const IDLE: Duration = Duration::from_secs(30);

/// Free part buffers of one size.
#[derive(Debug)]
pub struct PartPool {
    part_size: usize,
    /// Free buffers, each with when it came back.
    free: Mutex<Vec<(Vec<u8>, Instant)>>,
}

impl PartPool {
    /// A pool of `part_size`-byte buffers. With a tokio runtime, a task returns
    /// idle buffers to the system; it ends with the pool.
    pub fn new(part_size: usize) -> Arc<PartPool> {
        let pool = Arc::new(PartPool {
            part_size,
            free: Mutex::new(Vec::new()),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(trim_while_alive(Arc::downgrade(&pool)));
        }
        pool
    }

    /// An empty buffer with room for exactly one part.
    pub fn take(&self) -> Vec<u8> {
        self.lock()
            .pop()
            .map(|(buf, _)| buf)
            .unwrap_or_else(|| Vec::with_capacity(self.part_size))
    }

    /// `buf` as a part body; its buffer comes back to the pool once every
    /// clone of the body is dropped (the request is over, retries included).
    pub fn part(self: &Arc<Self>, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled {
            buf,
            pool: self.clone(),
        })
    }

    /// Free buffers held now.
    #[cfg(test)]
    fn free(&self) -> usize {
        self.lock().len()
    }

    /// Drop the buffers free for longer than `idle`.
    pub fn trim(&self, idle: Duration) {
        self.lock().retain(|(_, since)| since.elapsed() < idle);
    }

    fn give_back(&self, mut buf: Vec<u8>) {
        // Only whole-part buffers: anything else would grow on the next fill.
        if buf.capacity() == self.part_size {
            buf.clear();
            self.lock().push((buf, Instant::now()));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Vec<u8>, Instant)>> {
        // A panic while holding the lock leaves a valid list of buffers.
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn trim_while_alive(pool: Weak<PartPool>) {
    loop {
        tokio::time::sleep(IDLE / 2).await;
        match pool.upgrade() {
            Some(pool) => pool.trim(IDLE),
            None => return,
        }
    }
}

/// A part's bytes, owned by the body handed to the store.
struct Pooled {
    buf: Vec<u8>,
    pool: Arc<PartPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_buffer_comes_back_when_its_body_is_dropped() {
        let pool = PartPool::new(1024);
        let mut buf = pool.take();
        let first = buf.as_ptr();
        buf.extend_from_slice(&[7; 1024]);
        let body = pool.part(buf);
        let retry = body.clone();
        assert_eq!(&body[..], &[7; 1024][..]);
        drop(body);
        assert_eq!(pool.free(), 0, "a clone still holds the bytes");
        drop(retry);
        assert_eq!(pool.free(), 1);
        let again = pool.take();
        assert_eq!(again.as_ptr(), first, "the same allocation is reused");
        assert!(again.is_empty());
        assert_eq!(again.capacity(), 1024);
    }

    #[test]
    fn the_pool_holds_no_more_than_was_in_use_and_trims_idle_buffers() {
        let pool = PartPool::new(64);
        let bodies: Vec<Bytes> = (0..3).map(|_| pool.part(pool.take())).collect();
        drop(bodies);
        assert_eq!(pool.free(), 3);
        let a = pool.take();
        let b = pool.take();
        assert_eq!(pool.free(), 1);
        drop((pool.part(a), pool.part(b)));
        pool.trim(Duration::from_secs(3600));
        assert_eq!(pool.free(), 3);
        pool.trim(Duration::ZERO);
        assert_eq!(pool.free(), 0);
    }

    #[test]
    fn a_buffer_of_another_size_is_not_kept() {
        let pool = PartPool::new(64);
        drop(pool.part(Vec::with_capacity(128)));
        assert_eq!(pool.free(), 0);
    }
}
