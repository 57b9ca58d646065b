//! Pipeline progress per stream: what is still on its way to a profile, and what is durable.

use cohort_adapters::{unpack, StreamPositions};
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap, HashSet};

#[derive(Debug, Default, Clone)]
struct StreamMark {
    in_flight: BTreeSet<u64>,
    highest: u64,
}

/// Tracks dispatched events until they have been handed to the profile directory. Per stream,
/// the low watermark is the highest offset such that every event up to it has been delivered: a
/// flush that starts after reading it covers all of those events.
#[derive(Debug, Default)]
pub struct Watermark {
    streams: Mutex<HashMap<u32, StreamMark>>,
}

impl Watermark {
    pub fn new(start: &StreamPositions) -> Self {
        let w = Self::default();
        w.reset(start);
        w
    }

    /// Registers a dispatched event.
    pub fn dispatched(&self, position: u64) {
        let (stream, offset) = unpack(position);
        let mut streams = self.streams.lock();
        let mark = streams.entry(stream).or_default();
        mark.in_flight.insert(offset);
        mark.highest = mark.highest.max(offset);
    }

    /// Marks an event delivered (or dead-lettered).
    pub fn delivered(&self, position: u64) {
        let (stream, offset) = unpack(position);
        if let Some(mark) = self.streams.lock().get_mut(&stream) {
            mark.in_flight.remove(&offset);
        }
    }

    /// Per stream, the offset up to which everything has been delivered.
    pub fn lows(&self) -> StreamPositions {
        let mut v: StreamPositions = self
            .streams
            .lock()
            .iter()
            .map(|(s, m)| (*s, m.in_flight.first().map_or(m.highest, |f| f.saturating_sub(1))))
            .collect();
        v.sort_unstable();
        v
    }

    /// Whether every event up to `positions` (per stream) has been delivered.
    pub fn covers(&self, positions: &StreamPositions) -> bool {
        let lows = self.lows();
        positions.iter().all(|(s, off)| *off == 0 || lows.iter().any(|(ls, lo)| ls == s && lo >= off))
    }

    pub fn in_flight(&self) -> usize {
        self.streams.lock().values().map(|m| m.in_flight.len()).sum()
    }

    /// Forgets the streams matching: a partition starting afresh is read again from its
    /// committed offset, and the offsets delivered in its earlier tenure must not stand for it.
    pub fn forget(&self, matches: impl Fn(u32) -> bool) {
        self.streams.lock().retain(|s, _| !matches(*s));
    }

    /// Forgets everything in flight and restarts from `start` (pipeline restart).
    pub fn reset(&self, start: &StreamPositions) {
        let mut streams = self.streams.lock();
        streams.clear();
        for (s, off) in start {
            streams.insert(*s, StreamMark { in_flight: BTreeSet::new(), highest: *off });
        }
    }
}

/// The durable checkpoints: per stream, every event up to the offset is in persisted profiles.
#[derive(Debug, Default)]
pub struct Checkpoints {
    streams: Mutex<HashMap<u32, u64>>,
}

impl Checkpoints {
    pub fn new(start: &StreamPositions) -> Self {
        let c = Self::default();
        c.advance(start);
        c
    }

    /// Moves checkpoints forward (never back).
    pub fn advance(&self, positions: &StreamPositions) {
        let mut streams = self.streams.lock();
        for (s, off) in positions {
            let e = streams.entry(*s).or_insert(0);
            *e = (*e).max(*off);
        }
    }

    /// Whether the event at `position` is covered by a durable checkpoint (never replayed again).
    pub fn covers(&self, position: u64) -> bool {
        let (s, off) = unpack(position);
        self.streams.lock().get(&s).is_some_and(|c| off <= *c)
    }

    pub fn get(&self) -> StreamPositions {
        let mut v: StreamPositions = self.streams.lock().iter().map(|(s, o)| (*s, *o)).collect();
        v.sort_unstable();
        v
    }

    /// Forgets the streams matching (see [`Watermark::forget`]).
    pub fn forget(&self, matches: impl Fn(u32) -> bool) {
        self.streams.lock().retain(|s, _| !matches(*s));
    }

    /// The checkpoint of the embedded journal (stream 0).
    pub fn stream0(&self) -> u64 {
        self.streams.lock().get(&0).copied().unwrap_or(0)
    }
}

/// Event ids dispatched but not yet recorded by a flush, for buses that redeliver (Kafka): the
/// dispatcher skips an id seen here or in the store, and the flush records ids whose effects it
/// persists.
#[derive(Debug, Default)]
pub struct PendingIds {
    inner: Mutex<PendingInner>,
}

#[derive(Debug, Default)]
struct PendingInner {
    /// Ids dispatched and not yet known to be in the store.
    claimed: HashSet<String>,
    /// `(position, id)` not yet handed to a flush.
    unrecorded: Vec<(u64, String)>,
}

impl PendingIds {
    /// Claims an id; false if it was already dispatched since the last flush.
    pub fn claim(&self, position: u64, id: &str) -> bool {
        let mut g = self.inner.lock();
        if !g.claimed.insert(id.to_string()) {
            return false;
        }
        g.unrecorded.push((position, id.to_string()));
        true
    }

    /// Takes the ids of events covered by `lows` (their effects are in this flush).
    pub fn take_covered(&self, lows: &StreamPositions) -> Vec<(u64, String)> {
        let mut g = self.inner.lock();
        let (covered, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut g.unrecorded).into_iter().partition(|(p, _)| {
            let (s, off) = unpack(*p);
            lows.iter().any(|(ls, lo)| *ls == s && off <= *lo)
        });
        g.unrecorded = rest;
        covered
    }

    /// Forgets ids the store now holds.
    pub fn persisted(&self, ids: &[(u64, String)]) {
        let mut g = self.inner.lock();
        for (_, id) in ids {
            g.claimed.remove(id);
        }
    }

    /// Forgets the id claimed at `position`: its event was skipped, not applied.
    pub fn release(&self, position: u64) {
        self.release_where(|p| p == position);
    }

    /// Releases every id not yet recorded whose position matches (a partition starting afresh:
    /// its events are read again and must not be taken for duplicates).
    pub fn release_where(&self, matches: impl Fn(u64) -> bool) {
        let mut g = self.inner.lock();
        let mut released = Vec::new();
        g.unrecorded.retain(|(p, id)| {
            let keep = !matches(*p);
            if !keep {
                released.push(id.clone());
            }
            keep
        });
        for id in released {
            g.claimed.remove(&id);
        }
    }

    /// Puts back ids a failed flush took.
    pub fn restore(&self, ids: Vec<(u64, String)>) {
        self.inner.lock().unrecorded.extend(ids);
    }

    /// Forgets everything (pipeline restart: all of it is replayed).
    pub fn reset(&self) {
        *self.inner.lock() = Default::default();
    }
}

/// The positions of `lows` as packed values, for logs.
pub fn describe(positions: &StreamPositions) -> String {
    positions.iter().map(|(s, o)| format!("{s}:{o}")).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_adapters::pack;

    #[test]
    fn a_released_id_is_neither_recorded_nor_taken_for_a_duplicate() {
        let ids = PendingIds::default();
        assert!(ids.claim(pack(7, 1), "web:a"));
        assert!(ids.claim(pack(7, 2), "web:b"));
        ids.release(pack(7, 2));
        let taken = ids.take_covered(&vec![(7, 5)]);
        assert_eq!(taken, vec![(pack(7, 1), "web:a".to_string())], "only the applied one is recorded");
        assert!(ids.claim(pack(7, 3), "web:b"), "a replay of the skipped event is not a duplicate");
        assert!(!ids.claim(pack(7, 4), "web:a"), "the applied one still is, until persisted");
    }

    #[test]
    fn low_watermark_waits_for_the_oldest_event_per_stream() {
        let w = Watermark::new(&vec![(0, 10)]);
        assert_eq!(w.lows(), vec![(0, 10)]);
        w.dispatched(11);
        w.dispatched(12);
        w.dispatched(13);
        w.delivered(12);
        assert_eq!(w.lows(), vec![(0, 10)]);
        w.delivered(11);
        assert_eq!(w.lows(), vec![(0, 12)]);
        w.delivered(13);
        assert_eq!(w.lows(), vec![(0, 13)]);
        // a second stream is independent
        w.dispatched(pack(2, 5));
        assert_eq!(w.lows(), vec![(0, 13), (2, 4)]);
        w.delivered(pack(2, 5));
        assert_eq!(w.lows(), vec![(0, 13), (2, 5)]);
        assert!(w.covers(&vec![(0, 13), (2, 5)]));
        assert!(!w.covers(&vec![(0, 14)]));
    }

    #[test]
    fn checkpoints_only_move_forward() {
        let c = Checkpoints::new(&vec![(0, 5)]);
        c.advance(&vec![(0, 3), (1, 9)]);
        assert_eq!(c.get(), vec![(0, 5), (1, 9)]);
        assert!(c.covers(5));
        assert!(!c.covers(6));
        assert!(c.covers(pack(1, 9)));
        assert!(!c.covers(pack(2, 1)));
    }
}
