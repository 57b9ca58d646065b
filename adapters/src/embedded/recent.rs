//! What the writer committed lately, kept decoded for the reads that follow within
//! milliseconds: the dispatcher polling the journal's tail and the warehouse relay reading the
//! outbox. Both used to decode what the writer had just encoded (the outbox after
//! decompressing it), a few percent of the pipeline's CPU.
//!
//! The database stays the truth. A read still walks its table and only takes from here the
//! entries it finds there, so an entry erased, expired or acknowledged since is never served,
//! and anything missing here (taken by an earlier read, evicted, or from before a restart) is
//! decoded as before.

use std::collections::BTreeMap;

use cohort_messages::CustomerEvent;
use parking_lot::Mutex;

use super::unindexed::Unindexed;
use crate::WarehouseBatch;

/// Journal events kept at most, by the size of their stored JSON (decoded, they take a few
/// times that). The dispatcher's window (20,000 events) lags the head by less than this under
/// saturation.
const EVENT_BYTES: usize = 32 << 20;
/// Outbox batches kept at most, by the size of their JSON before compression. A flush at
/// saturation writes tens of MiB (Gold rows, Bronze payloads); at 32 MiB a third of them were
/// still decoded.
const OUTBOX_BYTES: usize = 128 << 20;

/// The journal events and outbox batches of recent commits, by seq and outbox id.
/// Also the event ids journaled but not yet in the idempotency tables, which unlike the
/// copies are part of the truth until written (see `unindexed`).
pub(super) struct Recent {
    pub events: Mutex<Kept<CustomerEvent>>,
    pub outbox: Mutex<Kept<WarehouseBatch>>,
    pub unindexed: Mutex<Unindexed>,
}

impl Default for Recent {
    fn default() -> Self {
        Self {
            events: Mutex::new(Kept::new(EVENT_BYTES)),
            outbox: Mutex::new(Kept::new(OUTBOX_BYTES)),
            unindexed: Mutex::new(Unindexed::default()),
        }
    }
}

impl Recent {
    /// Drops everything (the store closed).
    pub(super) fn clear(&self) {
        *self.events.lock() = Kept::new(EVENT_BYTES);
        *self.outbox.lock() = Kept::new(OUTBOX_BYTES);
        self.unindexed.lock().clear();
    }
}

/// Values by key, bounded by the stored size they stand for. Full, it keeps nothing new: the
/// readers go in key order, so while they lag they find the oldest kept and decode the rest,
/// and the copies never grow past the cap.
pub(super) struct Kept<T> {
    entries: BTreeMap<u64, (T, usize)>,
    bytes: usize,
    cap: usize,
}

impl<T> Kept<T> {
    pub(super) fn new(cap: usize) -> Self {
        Self { entries: BTreeMap::new(), bytes: 0, cap }
    }

    /// Keeps `value`, which stands for `bytes` stored bytes, if it fits under the cap.
    pub(super) fn keep(&mut self, key: u64, value: T, bytes: usize) {
        self.take(key);
        if self.bytes + bytes <= self.cap {
            self.entries.insert(key, (value, bytes));
            self.bytes += bytes;
        }
    }

    /// Takes the value kept under `key`: each is read once, a second read decodes.
    pub(super) fn take(&mut self, key: u64) -> Option<T> {
        let (value, bytes) = self.entries.remove(&key)?;
        self.bytes -= bytes;
        Some(value)
    }

    /// Drops these keys (erased or acknowledged entries), so nothing outlives its row.
    pub(super) fn forget(&mut self, keys: impl IntoIterator<Item = u64>) {
        for key in keys {
            self.take(key);
        }
    }

    /// Drops every key up to `last`, inclusive (expired journal events).
    pub(super) fn forget_through(&mut self, last: u64) {
        let rest = self.entries.split_off(&last.saturating_add(1));
        let dropped = std::mem::replace(&mut self.entries, rest);
        self.bytes -= dropped.values().map(|(_, b)| *b).sum::<usize>();
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_values_are_taken_once_and_nothing_new_is_kept_over_the_cap() {
        let mut kept = Kept::new(10);
        kept.keep(1, "a", 4);
        kept.keep(2, "b", 4);
        assert_eq!(kept.take(1), Some("a"));
        assert_eq!(kept.take(1), None, "a value is served once");
        kept.keep(3, "c", 4);
        kept.keep(4, "d", 4);
        assert_eq!(kept.take(4), None, "over the cap, the new value was not kept");
        assert_eq!((kept.take(2), kept.take(3)), (Some("b"), Some("c")), "the oldest stay for the lagging reader");
        kept.keep(5, "e", 4);
        kept.keep(5, "too big", 11);
        assert_eq!(kept.take(5), None, "a value larger than the cap is not kept, nor the one it replaced");
        assert_eq!(kept.bytes, 0);
    }

    #[test]
    fn forgotten_keys_are_gone_and_their_bytes_freed() {
        let mut kept = Kept::new(100);
        for k in 1..=6 {
            kept.keep(k, k, 10);
        }
        kept.forget([2, 9]);
        kept.forget_through(4);
        assert_eq!(kept.len(), 2);
        assert_eq!(kept.bytes, 20);
        assert_eq!((kept.take(5), kept.take(6)), (Some(5), Some(6)));
    }
}
