//! Event ids the journal holds but the idempotency tables do not yet.
//!
//! Event ids are random, so each insert into the idempotency table lands on a page of its own,
//! and every page a commit touches is copied and written whole. Per journaled event that cost
//! more than the journal row itself, and it grows with the table: about 7 µs per id with
//! 100,000 ids stored, 26–40 µs with 3 million. The writer therefore keeps new ids here and
//! writes them in key order, many per commit, where neighbours share pages. Until then a
//! duplicate is found here; after a crash, the journal past `META_INDEXED_SEQ` holds them again.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Ids kept before they are written, and what a restart reads back from the journal at most
/// (plus one group). Writing them holds the writer, and every journal append queued behind it,
/// for about 2.6 µs per id: 4,096 keep that near 10 ms (16,384 added 20-25 ms to the
/// journaled p99 at 10,000 events/s).
const INDEX_BATCH: usize = 4_096;
/// Longest an id waits to be written while the writer is busy at all.
const INDEX_INTERVAL: Duration = Duration::from_millis(250);

/// Where and when an id was journaled: its idempotency row and its expiry key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Pending {
    pub seq: u64,
    pub at_ms: u64,
}

#[derive(Default)]
pub(super) struct Unindexed {
    ids: HashMap<String, Pending>,
    since: Option<Instant>,
}

impl Unindexed {
    pub(super) fn contains(&self, id: &str) -> bool {
        self.ids.contains_key(id)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub(super) fn extend(&mut self, ids: impl IntoIterator<Item = (String, Pending)>) {
        self.ids.extend(ids);
        if !self.ids.is_empty() && self.since.is_none() {
            self.since = Some(Instant::now());
        }
    }

    /// Whether the ids kept, with `more` about to join them, are to be written now.
    pub(super) fn due(&self, more: usize) -> bool {
        self.ids.len() + more >= INDEX_BATCH || self.since.is_some_and(|s| s.elapsed() >= INDEX_INTERVAL)
    }

    /// Copies of the ids kept; they stay until the commit writing them has succeeded.
    pub(super) fn copies(&self) -> Vec<(String, Pending)> {
        self.ids.iter().map(|(id, p)| (id.clone(), *p)).collect()
    }

    pub(super) fn clear(&mut self) {
        self.ids.clear();
        self.since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_due_when_many_or_old() {
        let mut u = Unindexed::default();
        assert!(!u.due(0));
        assert!(u.due(INDEX_BATCH), "a batch that fills it on its own");
        u.extend([("a".to_string(), Pending { seq: 1, at_ms: 5 })]);
        assert!(u.contains("a") && !u.contains("b"));
        assert!(!u.due(0));
        assert!(u.due(INDEX_BATCH - 1));
        u.since = Instant::now().checked_sub(INDEX_INTERVAL);
        assert!(u.due(0), "kept for the interval");
        assert_eq!(u.copies(), vec![("a".to_string(), Pending { seq: 1, at_ms: 5 })]);
        u.clear();
        assert!(u.is_empty() && !u.due(0));
    }
}
