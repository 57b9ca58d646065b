//! Quality gates (slide 12): the result of one checkpoint run, shaped like a Great Expectations
//! validation result so the report reads the same way: one entry per expectation, with what was
//! observed, what was expected and a few offending ids (never values).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `SagaRecord::kind` of quality runs; their ids start with `quality:`.
pub const QUALITY_RUN: &str = "quality_run";

/// The four gates of slide 12.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gate {
    /// Ingestion: failures become dead letters.
    Ingestion,
    /// Bronze → Silver: a failure fails the batch (the Gold build) and raises the alert.
    BronzeToSilver,
    /// Silver → Gold: a failure fails the batch and raises the alert.
    SilverToGold,
    /// Before reverse ETL: a failure holds the sync (stale but safe).
    PreReverseEtl,
}

impl Gate {
    pub const ALL: [Gate; 4] = [Gate::Ingestion, Gate::BronzeToSilver, Gate::SilverToGold, Gate::PreReverseEtl];

    pub fn number(self) -> u8 {
        match self {
            Gate::Ingestion => 1,
            Gate::BronzeToSilver => 2,
            Gate::SilverToGold => 3,
            Gate::PreReverseEtl => 4,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        Gate::ALL.into_iter().find(|g| g.number() == n)
    }

    /// What a failure does, as the slide says.
    pub fn on_failure(self) -> &'static str {
        match self {
            Gate::Ingestion => "failing records go to the dead-letter store",
            Gate::BronzeToSilver | Gate::SilverToGold => "the batch fails and cohort_quality_gate_failing alerts",
            Gate::PreReverseEtl => "reverse ETL is held: destinations stay stale but safe",
        }
    }
}

/// One expectation's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpectationResult {
    /// e.g. `expect_column_values_to_not_be_null`.
    pub expectation: String,
    /// The column or subject it applies to.
    pub column: Option<String>,
    pub success: bool,
    /// What was measured (counts, ratios).
    pub observed: Value,
    /// The configured bound.
    pub expected: Value,
    /// Rows that failed it.
    #[serde(default)]
    pub unexpected_count: u64,
    /// A few failing row ids (event or profile ids, never personal values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unexpected_sample: Vec<String>,
}

/// One run of one gate's checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QualityRun {
    pub id: String,
    pub gate: Gate,
    /// What was checked: `silver`, `gold_profiles`, an activation, ...
    pub checkpoint: String,
    /// What started it: a job run id, `manual`, a segment's batch run.
    pub trigger: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub success: bool,
    /// Rows or records examined.
    pub evaluated: u64,
    pub results: Vec<ExpectationResult>,
    /// What the failure did (empty on success).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub action: String,
}

impl QualityRun {
    /// The record id: sorts by time, so the newest runs are found by paging from the end.
    pub fn make_id(gate: Gate, at: DateTime<Utc>, checkpoint: &str) -> String {
        format!("quality:{}:{}:{}", at.format("%Y%m%dT%H%M%S%.6fZ"), gate.number(), checkpoint)
    }

    /// The expectations that failed.
    pub fn failures(&self) -> impl Iterator<Item = &ExpectationResult> {
        self.results.iter().filter(|r| !r.success)
    }
}
