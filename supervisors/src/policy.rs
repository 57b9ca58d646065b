//! Restart budget and backoff.

use cohort_config::SupervisionConfig;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// At most `max_restarts` restarts within `window`, each after a capped exponential backoff;
/// past that budget the failure escalates to the parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    pub max_restarts: u32,
    pub window: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl RestartPolicy {
    pub fn from_config(c: &SupervisionConfig) -> Self {
        Self {
            max_restarts: c.max_restarts,
            window: Duration::from_secs(c.window_secs),
            backoff_initial: Duration::from_millis(c.backoff_initial_ms),
            backoff_max: Duration::from_millis(c.backoff_max_ms),
        }
    }

    /// Backoff before restart number `n` (0-based) within the window: initial × 2ⁿ, capped.
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX);
        self.backoff_initial.saturating_mul(factor).min(self.backoff_max)
    }
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restarts: 10,
            window: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartDecision {
    Restart { after: Duration, attempt: u32 },
    Escalate,
}

/// Remembers recent restarts of one child.
#[derive(Debug, Clone, Default)]
pub struct RestartTracker {
    recent: VecDeque<Instant>,
}

impl RestartTracker {
    pub fn decide(&mut self, policy: &RestartPolicy, now: Instant) -> RestartDecision {
        while self.recent.front().is_some_and(|t| now.duration_since(*t) > policy.window) {
            self.recent.pop_front();
        }
        let n = self.recent.len() as u32;
        if n >= policy.max_restarts {
            return RestartDecision::Escalate;
        }
        self.recent.push_back(now);
        RestartDecision::Restart { after: policy.backoff(n), attempt: n + 1 }
    }

    /// Takes back the `n` newest restarts: they were spent on a cause that is gone (a poison
    /// event now dead-lettered), not on a child that keeps failing.
    pub fn forgive(&mut self, n: usize) {
        for _ in 0..n {
            self.recent.pop_back();
        }
    }

    pub fn restarts_in_window(&self) -> usize {
        self.recent.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RestartPolicy {
            max_restarts: 5,
            window: Duration::from_secs(60),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(600),
        };
        let got: Vec<u64> = (0..12).map(|n| p.backoff(n).as_secs()).collect();
        assert_eq!(got, vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600]);
        assert_eq!(p.backoff(40).as_secs(), 600);
    }

    #[test]
    fn escalates_past_budget_and_forgets_old_restarts() {
        let p = RestartPolicy {
            max_restarts: 3,
            window: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_secs(1),
        };
        let mut t = RestartTracker::default();
        let t0 = Instant::now();
        assert_eq!(t.decide(&p, t0), RestartDecision::Restart { after: Duration::from_millis(10), attempt: 1 });
        assert_eq!(t.decide(&p, t0), RestartDecision::Restart { after: Duration::from_millis(20), attempt: 2 });
        assert_eq!(t.decide(&p, t0), RestartDecision::Restart { after: Duration::from_millis(40), attempt: 3 });
        assert_eq!(t.decide(&p, t0), RestartDecision::Escalate);
        // after the window the budget is back
        let later = t0 + Duration::from_secs(11);
        assert_eq!(t.decide(&p, later), RestartDecision::Restart { after: Duration::from_millis(10), attempt: 1 });
    }
}
