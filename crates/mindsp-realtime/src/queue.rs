//! A small bounded queue for the two sides of one connection: the hub filling a
//! connection's events while its writer empties them, or a connection's reader handing
//! replies to its writer.
//!
//! A server holds one or two per connection, mostly empty, so it is made to cost little
//! when empty: a `VecDeque` behind a mutex (no allocation until something is queued, and
//! a large buffer given back once drained) and two `Notify`. A tokio channel allocates a
//! first block of 32 slots and counters padded to cache lines on creation: about 600
//! bytes to 1.5 KiB for every idle connection.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

/// A queue with one consumer. Bounds are given per push, so that one queue can take
/// some items only while it is half empty.
pub struct Queue<T> {
    items: Mutex<VecDeque<T>>,
    /// Slots a drained queue keeps rather than freeing them.
    kept: usize,
    /// An item was queued.
    ready: Notify,
    /// An item was taken.
    room: Notify,
}

impl<T> Queue<T> {
    /// An empty queue that, once drained, keeps at most `kept` slots allocated (a busy
    /// queue would otherwise allocate again for every item).
    pub fn new(kept: usize) -> Self {
        Self {
            items: Mutex::new(VecDeque::new()),
            kept,
            ready: Notify::new(),
            room: Notify::new(),
        }
    }

    fn items(&self) -> MutexGuard<'_, VecDeque<T>> {
        self.items.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `item` unless `limit` items are queued already; then gives it back.
    pub fn try_push(&self, item: T, limit: usize) -> Result<(), T> {
        self.try_push_or(item, limit, || {})
    }

    /// [`Self::try_push`], calling `refused` while the queue is still locked when it
    /// refuses: a consumer that empties the queue afterwards sees what `refused` did.
    pub fn try_push_or(&self, item: T, limit: usize, refused: impl FnOnce()) -> Result<(), T> {
        let mut items = self.items();
        if items.len() >= limit {
            refused();
            return Err(item);
        }
        items.push_back(item);
        drop(items);
        // Kept as a permit if the consumer is not waiting yet: never lost.
        self.ready.notify_one();
        Ok(())
    }

    /// Queues `item` once fewer than `limit` items are queued.
    pub async fn push(&self, mut item: T, limit: usize) {
        loop {
            match self.try_push(item, limit) {
                Ok(()) => return,
                Err(back) => item = back,
            }
            self.room.notified().await;
        }
    }

    /// The next item, if one is queued.
    pub fn try_pop(&self) -> Option<T> {
        let mut items = self.items();
        let next = items.pop_front();
        if items.is_empty() && items.capacity() > self.kept {
            *items = VecDeque::new();
        }
        drop(items);
        if next.is_some() {
            self.room.notify_one();
        }
        next
    }

    /// The next item, waiting for one. Cancel-safe: an item leaves the queue only in the
    /// poll that returns it.
    pub async fn pop(&self) -> T {
        loop {
            if let Some(item) = self.try_pop() {
                return item;
            }
            self.ready.notified().await;
        }
    }

    /// Number of items queued.
    pub fn len(&self) -> usize {
        self.items().len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.items().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn bounded_per_push_in_order_and_freed_once_drained() {
        let q = Queue::new(2);
        for i in 0..8 {
            q.try_push(i, 8).unwrap();
        }
        assert_eq!(q.try_push(8, 8), Err(8));
        assert_eq!(q.try_push(8, 4), Err(8), "a lower bound refuses earlier");
        assert_eq!(q.len(), 8);
        for i in 0..8 {
            assert_eq!(q.pop().await, i);
        }
        assert_eq!(q.try_pop(), None);
        assert_eq!(
            q.items().capacity(),
            0,
            "a drained queue gives its buffer back"
        );
    }

    /// A pop dropped after it was woken (a `select!` that took another branch) leaves
    /// the item for the next pop, and so does a push dropped while it waited.
    #[tokio::test]
    async fn dropped_waiters_lose_nothing() {
        let q = Queue::new(0);
        {
            let mut pop = std::pin::pin!(q.pop());
            assert!(
                tokio::time::timeout(Duration::from_millis(10), &mut pop)
                    .await
                    .is_err()
            );
            q.try_push(1, 1).unwrap();
            // Dropped without being polled again, though woken.
        }
        assert_eq!(q.try_pop(), Some(1));
        q.try_push(2, 1).unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(10), q.push(3, 1)).await;
        assert!(waited.is_err(), "full: the push waited and was dropped");
        assert_eq!(q.pop().await, 2);
        assert_eq!(q.try_pop(), None, "the dropped push queued nothing");
        q.try_push(4, 1).unwrap();
        assert_eq!(q.pop().await, 4);
    }

    #[tokio::test]
    async fn a_waiting_pusher_and_popper_are_woken() {
        let q = Arc::new(Queue::new(0));
        q.try_push(1, 1).unwrap();
        let pusher = tokio::spawn({
            let q = q.clone();
            async move { q.push(2, 1).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!pusher.is_finished(), "full: the pusher waits");
        assert_eq!(q.pop().await, 1);
        tokio::time::timeout(Duration::from_secs(5), pusher)
            .await
            .expect("woken by the pop")
            .unwrap();
        assert_eq!(q.pop().await, 2);
        let popper = tokio::spawn({
            let q = q.clone();
            async move { q.pop().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        q.try_push(3, 1).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), popper).await;
        assert_eq!(got.expect("woken by the push").unwrap(), 3);
    }
}
