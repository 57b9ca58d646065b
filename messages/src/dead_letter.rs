//! Dead letters: what was accepted for inspection but could not be applied, with the reason.

use crate::ids::Source;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Where in the pipeline a payload or event was given up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterStage {
    /// Gate 1: authenticated but malformed or invalid.
    Validation,
    /// Identity resolution could not place the event.
    Identity,
    /// The profile actor failed on the event more often than allowed (a poison event).
    Profile,
}

impl DeadLetterStage {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterStage::Validation => "validation",
            DeadLetterStage::Identity => "identity",
            DeadLetterStage::Profile => "profile",
        }
    }
}

/// One dead-letter record. `payload` is the raw payload as received (or the normalized event for
/// later stages), kept so an operator can fix and replay it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: u64,
    pub source: Source,
    pub stage: DeadLetterStage,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    pub payload: String,
    pub content_type: String,
    pub received_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
    pub attempts: u32,
}
