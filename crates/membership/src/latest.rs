//! Per-thread copies of a watch channel's latest value, for values every operation reads (the
//! cluster view, the partition table). Reading a `watch` channel takes its lock and clones the
//! `Arc` it holds: both write to cache lines that every worker thread shares, which then move
//! between cores on every read. A thread's copy is checked with one load of the channel's version
//! and refreshed only when the value changed, so a read sees the latest value as `borrow` would.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::LocalKey;

use tokio::sync::watch;

/// Channels one thread keeps copies of at most (members in one process, as in tests).
const ENTRIES_MAX: usize = 8;

/// A new id for a channel read through [`with_latest`].
pub fn channel_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// One thread's copies, per channel id. Put it in a `thread_local!` of the value's type.
#[derive(Debug)]
pub struct LatestCache<T> {
    entries: Vec<(u64, watch::Receiver<T>, T)>,
}

impl<T> Default for LatestCache<T> {
    fn default() -> Self {
        LatestCache { entries: Vec::new() }
    }
}

impl<T: Clone> LatestCache<T> {
    /// Brings this thread's copy of channel `id` up to date; its index.
    fn refresh(&mut self, id: u64, tx: &watch::Sender<T>) -> usize {
        if let Some(i) = self.entries.iter().position(|(e, _, _)| *e == id) {
            let (_, rx, value) = &mut self.entries[i];
            if rx.has_changed().unwrap_or(true) {
                *value = rx.borrow_and_update().clone();
            }
            return i;
        }
        // Channels whose sender is gone (a stopped member) first, then the oldest.
        self.entries.retain(|(_, rx, _)| rx.has_changed().is_ok());
        if self.entries.len() >= ENTRIES_MAX {
            self.entries.remove(0);
        }
        let mut rx = tx.subscribe();
        let value = rx.borrow_and_update().clone();
        self.entries.push((id, rx, value));
        self.entries.len() - 1
    }
}

/// Calls `f` with the latest value of `tx` (whose id is `id`), from this thread's copy in `cache`.
/// `f` may read other channels (or this one) the same way; a nested read of a channel whose copy
/// is in use reads the channel itself.
pub fn with_latest<T: Clone + 'static, R>(
    cache: &'static LocalKey<RefCell<LatestCache<T>>>,
    id: u64,
    tx: &watch::Sender<T>,
    f: impl FnOnce(&T) -> R,
) -> R {
    cache.with(|cell| {
        let index = cell.try_borrow_mut().ok().map(|mut c| c.refresh(id, tx));
        let copies = index.and_then(|i| cell.try_borrow().ok().map(|c| (i, c)));
        match copies {
            Some((i, c)) => f(&c.entries[i].2),
            None => {
                let value = tx.borrow().clone();
                f(&value)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static CACHE: RefCell<LatestCache<u32>> = RefCell::default();
    }

    #[test]
    fn reads_follow_every_change_and_nested_reads_work() {
        let (tx, _) = watch::channel(1u32);
        let (other, _) = watch::channel(10u32);
        let (id, other_id) = (channel_id(), channel_id());
        assert_eq!(with_latest(&CACHE, id, &tx, |v| *v), 1);
        tx.send_replace(2);
        assert_eq!(with_latest(&CACHE, id, &tx, |v| *v), 2);
        let nested = with_latest(&CACHE, id, &tx, |v| {
            tx.send_replace(3);
            (*v, with_latest(&CACHE, id, &tx, |w| *w), with_latest(&CACHE, other_id, &other, |w| *w))
        });
        assert_eq!(nested, (2, 3, 10), "a nested read of a copy in use reads the channel");
        assert_eq!(with_latest(&CACHE, id, &tx, |v| *v), 3);
        assert_eq!(with_latest(&CACHE, other_id, &other, |v| *v), 10);
    }

    #[test]
    fn a_thread_keeps_a_bounded_number_of_copies() {
        let channels: Vec<_> = (0..ENTRIES_MAX as u32 * 2).map(|i| (channel_id(), watch::channel(i).0)).collect();
        for (i, (id, tx)) in channels.iter().enumerate() {
            assert_eq!(with_latest(&CACHE, *id, tx, |v| *v), i as u32);
        }
        assert!(CACHE.with(|c| c.borrow().entries.len()) <= ENTRIES_MAX);
        drop(channels);
        let (tx, _) = watch::channel(99u32);
        assert_eq!(with_latest(&CACHE, channel_id(), &tx, |v| *v), 99);
        assert_eq!(CACHE.with(|c| c.borrow().entries.len()), 1, "copies of dropped channels go first");
    }
}
