//! What `/v1/supervisors` and the readiness probe show.

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use serde::Serialize;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChildStatus {
    Starting,
    Running,
    Restarting,
    /// Gave up: the failure escalated past this supervisor.
    Failed,
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailureRecord {
    pub at: DateTime<Utc>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChildHealth {
    /// Slash-separated path in the tree, e.g. `root/ingest/web`.
    pub path: String,
    pub kind: String,
    pub status: ChildStatus,
    pub restarts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<FailureRecord>,
    pub since: DateTime<Utc>,
}

/// Shared registry of every supervised child's health.
#[derive(Debug, Clone, Default)]
pub struct HealthRegistry {
    children: Arc<DashMap<String, ChildHealth>>,
}

impl HealthRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_status(&self, path: &str, kind: &str, status: ChildStatus) {
        let now = Utc::now();
        let mut entry = self.children.entry(path.to_string()).or_insert_with(|| ChildHealth {
            path: path.to_string(),
            kind: kind.to_string(),
            status,
            restarts: 0,
            last_failure: None,
            since: now,
        });
        if entry.status != status {
            entry.status = status;
            entry.since = now;
        }
    }

    pub fn record_failure(&self, path: &str, kind: &str, reason: &str) {
        self.set_status(path, kind, ChildStatus::Restarting);
        if let Some(mut e) = self.children.get_mut(path) {
            e.last_failure = Some(FailureRecord { at: Utc::now(), reason: truncate(reason, 500) });
        }
    }

    pub fn record_restart(&self, path: &str) {
        if let Some(mut e) = self.children.get_mut(path) {
            e.restarts += 1;
        }
    }

    pub fn remove(&self, path: &str) {
        self.children.remove(path);
    }

    /// Every child, sorted by path (parents before their children).
    pub fn snapshot(&self) -> Vec<ChildHealth> {
        let mut v: Vec<ChildHealth> = self.children.iter().map(|e| e.value().clone()).collect();
        v.sort_by(|a, b| a.path.cmp(&b.path));
        v
    }

    pub fn get(&self, path: &str) -> Option<ChildHealth> {
        self.children.get(path).map(|e| e.value().clone())
    }

    /// Ready when nothing has escalated to `Failed` and nothing is stuck restarting.
    pub fn is_ready(&self) -> bool {
        self.children.iter().all(|e| matches!(e.status, ChildStatus::Running | ChildStatus::Stopped))
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
