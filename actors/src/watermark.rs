//! Which journal events are still on their way to a profile.

use parking_lot::Mutex;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};

/// Tracks dispatched events until they have been handed to the profile directory. The low
/// watermark is the highest seq such that every event up to it has been delivered: a flush that
/// starts after reading it covers all of those events.
#[derive(Debug, Default)]
pub struct Watermark {
    in_flight: Mutex<BTreeSet<u64>>,
    highest: AtomicU64,
}

impl Watermark {
    pub fn new(start: u64) -> Self {
        Self { in_flight: Mutex::new(BTreeSet::new()), highest: AtomicU64::new(start) }
    }

    /// Registers a dispatched event.
    pub fn dispatched(&self, seq: u64) {
        self.in_flight.lock().insert(seq);
        self.highest.fetch_max(seq, Ordering::SeqCst);
    }

    /// Marks an event delivered (or dead-lettered).
    pub fn delivered(&self, seq: u64) {
        self.in_flight.lock().remove(&seq);
    }

    pub fn low(&self) -> u64 {
        let guard = self.in_flight.lock();
        match guard.first() {
            Some(first) => first.saturating_sub(1),
            None => self.highest.load(Ordering::SeqCst),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.lock().len()
    }

    /// Forgets everything in flight and restarts from `seq` (pipeline restart).
    pub fn reset(&self, seq: u64) {
        let mut guard = self.in_flight.lock();
        guard.clear();
        self.highest.store(seq, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_watermark_waits_for_the_oldest_event() {
        let w = Watermark::new(10);
        assert_eq!(w.low(), 10);
        w.dispatched(11);
        w.dispatched(12);
        w.dispatched(13);
        w.delivered(12);
        assert_eq!(w.low(), 10);
        w.delivered(11);
        assert_eq!(w.low(), 12);
        w.delivered(13);
        assert_eq!(w.low(), 13);
    }
}
