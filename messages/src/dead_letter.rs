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

/// Most bytes of raw payload a payload's Gate 1 letters may hold together. Each letter carries
/// the whole payload (a replay sends it again), so past this one letter stands for all of a
/// payload's rejections: 2,500 bad elements of a 500 KB batch would otherwise store 1.25 GB.
pub const GATE1_LETTER_BYTES: usize = 1 << 20;

/// Reasons a summary letter lists; the rest are counted.
const SUMMARY_REASONS: usize = 20;
const SUMMARY_MARK: &str = " rejections in this payload: ";

/// A Gate 1 reason about one element of a payload (`element 3: missing userId`).
pub fn element_reason(index: Option<usize>, reason: &str) -> String {
    match index {
        Some(i) => format!("element {i}: {reason}"),
        None => reason.to_string(),
    }
}

/// The reason of the one letter standing for `reasons.len()` rejections of a payload
/// (`2500 rejections in this payload: element 0: ...; element 1: ...; and 2480 more`).
pub fn summary_reason(reasons: &[String]) -> String {
    let listed: Vec<&str> = reasons.iter().take(SUMMARY_REASONS).map(String::as_str).collect();
    let more = reasons.len().saturating_sub(SUMMARY_REASONS);
    let tail = if more > 0 { format!("; and {more} more") } else { String::new() };
    format!("{}{SUMMARY_MARK}{}{tail}", reasons.len(), listed.join("; "))
}

impl DeadLetter {
    /// The element of its payload a Gate 1 letter is about, if it names one.
    pub fn element(&self) -> Option<usize> {
        self.reason.strip_prefix("element ")?.split_once(':')?.0.parse().ok()
    }

    /// How many rejections a summary letter (see [`summary_reason`]) stands for.
    pub fn summarized(&self) -> Option<u64> {
        self.reason.split_once(SUMMARY_MARK)?.0.parse().ok()
    }

    /// The first reason a letter gives, without its element or summary prefix.
    pub fn first_reason(&self) -> &str {
        let listed = self.reason.split_once(SUMMARY_MARK).map_or(self.reason.as_str(), |(_, r)| r);
        let first = if self.summarized().is_some() { listed.split("; ").next().unwrap_or(listed) } else { listed };
        match first.strip_prefix("element ").and_then(|r| r.split_once(": ")) {
            Some((i, r)) if i.parse::<usize>().is_ok() => r,
            _ => first,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(reason: String) -> DeadLetter {
        DeadLetter {
            id: 1,
            source: Source::Web,
            stage: DeadLetterStage::Validation,
            reason,
            event_id: None,
            payload: String::new(),
            content_type: "application/json".into(),
            received_at: Utc::now(),
            recorded_at: Utc::now(),
            attempts: 1,
        }
    }

    #[test]
    fn an_element_letter_names_its_element_and_a_summary_its_count() {
        let one = letter(element_reason(Some(3), "missing `type`"));
        assert_eq!((one.element(), one.summarized(), one.first_reason()), (Some(3), None, "missing `type`"));
        let plain = letter(element_reason(None, "timestamp: in the future"));
        assert_eq!(
            (plain.element(), plain.summarized(), plain.first_reason()),
            (None, None, "timestamp: in the future")
        );

        let reasons: Vec<String> = (0..25).map(|i| element_reason(Some(i), "must be an object")).collect();
        let summary = letter(summary_reason(&reasons));
        assert_eq!(summary.summarized(), Some(25));
        assert_eq!(summary.element(), None, "a summary is about no single element");
        assert_eq!(summary.first_reason(), "must be an object");
        assert!(summary.reason.contains("element 19: ") && !summary.reason.contains("element 20: "));
        assert!(summary.reason.ends_with("; and 5 more"), "{}", summary.reason);
    }
}
