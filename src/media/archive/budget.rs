//! The memory of the archive: one budget of part buffers for the whole worker.
//!
//! Every part of every upload — read from the origin, waiting to be hashed,
//! in flight to the store — lives in a buffer of exactly one part, and every
//! buffer holds a permit of the worker's [`PartBudget`]: all uploads together
//! never hold more than `archive_memory_bytes`. A lone lesson gets the whole
//! budget; sixteen lessons share it.
//!
//! It cannot deadlock (rclone's shared pool once did: transfers held buffers
//! while waiting for more). A permit is taken for a whole part before its
//! first byte is read, never while a half-filled part is held; within a
//! transfer permits are taken in part order, so the lowest unfinished part of
//! every transfer already holds its buffer, and a part in flight needs nothing
//! more to finish. Whoever waits, waits for something that ends on its own.
//! The semaphore is fair (first come, first served) and is the only queue:
//! while an upload waits for room, its download is not read — TCP back-pressure.
//!
//! Buffers are reused: a fresh buffer of several MiB is mmapped (the binary
//! fixes the allocator's mmap threshold, `src/main.rs`) — every page faults
//! and is zeroed on first touch, and the whole is unmapped on free, 13 % of
//! the worker's CPU while archiving, measured (BENCHMARKS.md). A buffer comes
//! back when the store has taken its part (every clone of the body dropped,
//! SDK retries included), and the next part fills it again. The pool never
//! holds more buffers than were in use at once, and buffers idle for [`IDLE`]
//! are returned to the system: an idle worker does not keep its peak memory.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::telemetry::metrics::Metrics;

/// How long a free buffer is kept for the next part.
pub const IDLE: Duration = Duration::from_secs(30);

/// The worker's part buffers: at most `parts` in use at once.
pub struct PartBudget {
    part_size: usize,
    /// Permits: one per part buffer the budget allows.
    room: Arc<Semaphore>,
    parts: usize,
    /// Free buffers, each with when it came back.
    free: Mutex<Vec<(Vec<u8>, Instant)>>,
    metrics: Option<Metrics>,
}

/// An empty buffer with room for exactly one part, and the permits it holds.
pub struct PartBuf {
    inner: Pooled,
}

impl PartBudget {
    /// A budget of `memory_bytes` (at least one part) in buffers of
    /// `part_size` bytes. With a tokio runtime, a task returns idle buffers to
    /// the system; it ends with the budget.
    pub fn new(part_size: usize, memory_bytes: u64, metrics: Option<Metrics>) -> Arc<PartBudget> {
        let parts = usize::try_from(memory_bytes / part_size as u64)
            .unwrap_or(usize::MAX)
            .clamp(1, Semaphore::MAX_PERMITS);
        let budget = Arc::new(PartBudget {
            part_size,
            room: Arc::new(Semaphore::new(parts)),
            parts,
            free: Mutex::new(Vec::new()),
            metrics,
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(trim_while_alive(Arc::downgrade(&budget)));
        }
        budget
    }

    pub fn part_size(&self) -> usize {
        self.part_size
    }

    /// Part buffers the budget allows at once.
    pub fn parts(&self) -> usize {
        self.parts
    }

    /// Part buffers in use now.
    pub fn in_use(&self) -> usize {
        self.parts - self.room.available_permits()
    }

    /// A buffer for one part, once the transfer (`slots`: its own limit of
    /// parts in flight) and then the worker's budget have room. Waits, and
    /// while it waits its caller holds no half-filled part.
    pub async fn take(self: &Arc<Self>, slots: &Arc<Semaphore>) -> PartBuf {
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("a transfer's slots are never closed");
        let room = self
            .room
            .clone()
            .acquire_owned()
            .await
            .expect("the budget is never closed");
        let buf = self
            .lock()
            .pop()
            .map(|(buf, _)| buf)
            .unwrap_or_else(|| Vec::with_capacity(self.part_size));
        self.observe();
        PartBuf {
            inner: Pooled {
                buf,
                budget: self.clone(),
                permits: Some((room, slot)),
            },
        }
    }

    /// Drop the buffers free for longer than `idle`.
    pub fn trim(&self, idle: Duration) {
        self.lock().retain(|(_, since)| since.elapsed() < idle);
    }

    /// Free buffers held now.
    #[cfg(test)]
    fn free(&self) -> usize {
        self.lock().len()
    }

    fn give_back(&self, mut buf: Vec<u8>) {
        // Only whole-part buffers: anything else would grow on the next fill.
        if buf.capacity() == self.part_size {
            buf.clear();
            self.lock().push((buf, Instant::now()));
        }
    }

    fn observe(&self) {
        if let Some(m) = &self.metrics {
            m.archive_memory_in_use((self.in_use() * self.part_size) as u64);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Vec<u8>, Instant)>> {
        // A panic while holding the lock leaves a valid list of buffers.
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl PartBuf {
    /// The bytes read so far; filled up to its capacity, never beyond.
    pub fn buf(&mut self) -> &mut Vec<u8> {
        &mut self.inner.buf
    }

    pub fn len(&self) -> usize {
        self.inner.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.buf.is_empty()
    }

    /// Room left in the part.
    pub fn room(&self) -> usize {
        self.inner.budget.part_size - self.inner.buf.len()
    }

    /// The part as a body: its buffer and permits come back once every clone
    /// of it is dropped (uploaded and hashed, retries included).
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self.inner)
    }
}

async fn trim_while_alive(budget: Weak<PartBudget>) {
    loop {
        tokio::time::sleep(IDLE / 2).await;
        match budget.upgrade() {
            Some(budget) => budget.trim(IDLE),
            None => return,
        }
    }
}

/// A part's bytes, owned by its body; the permits go with the buffer.
struct Pooled {
    buf: Vec<u8>,
    budget: Arc<PartBudget>,
    /// (the budget's, the transfer's), released once the buffer is back.
    permits: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.budget.give_back(std::mem::take(&mut self.buf));
        drop(self.permits.take());
        self.budget.observe();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(n: usize) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(n))
    }

    #[tokio::test]
    async fn a_part_buffer_comes_back_when_its_body_is_dropped() {
        let budget = PartBudget::new(1024, 4096, None);
        let slots = slots(4);
        let mut part = budget.take(&slots).await;
        let first = part.buf().as_ptr();
        part.buf().extend_from_slice(&[7; 1024]);
        assert_eq!(part.room(), 0);
        let body = part.freeze();
        let retry = body.clone();
        assert_eq!(&body[..], &[7; 1024][..]);
        drop(body);
        assert_eq!(budget.free(), 0, "a clone still holds the bytes");
        assert_eq!(budget.in_use(), 1);
        drop(retry);
        assert_eq!(budget.free(), 1);
        assert_eq!(budget.in_use(), 0);
        let mut again = budget.take(&slots).await;
        assert_eq!(again.buf().as_ptr(), first, "the same allocation is reused");
        assert!(again.is_empty());
        assert_eq!(again.buf().capacity(), 1024);
    }

    #[tokio::test]
    async fn the_budget_bounds_buffers_in_use_and_waits_for_room() {
        // Room for two parts; each transfer may hold three.
        let budget = PartBudget::new(1024, 2 * 1024 + 100, None);
        assert_eq!(budget.parts(), 2);
        let (a, b) = (slots(3), slots(3));
        let first = budget.take(&a).await.freeze();
        let _second = budget.take(&b).await;
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.take(&a).await.len() }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "a third buffer waits for room");
        drop(first);
        let took = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert_eq!(
            took.unwrap().unwrap(),
            0,
            "room came back with the first body"
        );
    }

    #[tokio::test]
    async fn a_transfer_holds_no_more_than_its_slots() {
        let budget = PartBudget::new(64, 64 * 10, None);
        let own = slots(1);
        let held = budget.take(&own).await;
        let more = tokio::time::timeout(Duration::from_millis(50), budget.take(&own)).await;
        assert!(more.is_err(), "one slot: the second part waits");
        // Another transfer is not held up by this one's limit.
        let other = slots(1);
        let _theirs = budget.take(&other).await;
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), budget.take(&own))
            .await
            .expect("the slot came back");
    }

    #[tokio::test]
    async fn the_pool_holds_no_more_than_was_in_use_and_trims_idle_buffers() {
        let budget = PartBudget::new(64, 64 * 8, None);
        let s = slots(8);
        let mut bodies = Vec::new();
        for _ in 0..3 {
            bodies.push(budget.take(&s).await.freeze());
        }
        drop(bodies);
        assert_eq!(budget.free(), 3);
        budget.trim(Duration::from_secs(3600));
        assert_eq!(budget.free(), 3);
        budget.trim(Duration::ZERO);
        assert_eq!(budget.free(), 0);
    }

    #[tokio::test]
    async fn a_budget_below_one_part_still_allows_one() {
        let budget = PartBudget::new(1024, 10, None);
        assert_eq!(budget.parts(), 1);
        let _one = budget.take(&slots(1)).await;
    }
}
