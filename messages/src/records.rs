//! Records of the operational store beyond profiles: consent, the suppression list, saga state,
//! the audit log and the identity review queue. Plain data; the store keeps them.

use crate::ids::ProfileId;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;

/// A channel Cohort can reach a student on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Email,
    Sms,
    Whatsapp,
    Push,
}

impl Channel {
    pub const ALL: [Channel; 4] = [Channel::Email, Channel::Sms, Channel::Whatsapp, Channel::Push];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Sms => "sms",
            Channel::Whatsapp => "whatsapp",
            Channel::Push => "push",
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A student's consent decision for one purpose on one channel; the latest decision is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsentRecord {
    pub profile_id: ProfileId,
    /// What the consent is for: `marketing`, `analytics`, `personalization`, ...
    pub purpose: String,
    pub channel: Channel,
    pub granted: bool,
    /// Where the decision came from (`web_form`, `salesforce`, `sendgrid_unsubscribe`, ...).
    pub source: String,
    pub recorded_at: DateTime<Utc>,
}

/// Why an address may not be contacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SuppressionReason {
    Bounce,
    SpamReport,
    Unsubscribe,
    Erasure,
    Manual,
}

/// An address on the suppression list (normalized the way ingest normalizes identifiers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suppression {
    pub channel: Channel,
    pub address: String,
    pub reason: SuppressionReason,
    pub since: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaStatus {
    Running,
    Compensating,
    Completed,
    Failed,
}

/// The persisted state of a long-running saga (a GDPR erasure, say). `version` starts at 1 and
/// grows by one per save, so two writers can never both advance the same saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaRecord {
    pub saga_id: String,
    pub kind: String,
    /// What the saga is about, e.g. a profile id; free of personal data.
    pub subject: String,
    pub status: SagaStatus,
    pub version: u64,
    /// The saga's own step state.
    pub state: Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// An audit-log entry before the store numbers it. Never holds raw personal data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewAuditEntry {
    pub at: DateTime<Utc>,
    /// Who acted: an API token's name, `system`, a job name.
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub detail: Value,
}

/// A numbered, append-only audit-log entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: u64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub detail: Value,
}

impl AuditEntry {
    pub fn numbered(id: u64, e: NewAuditEntry) -> Self {
        Self { id, at: e.at, actor: e.actor, action: e.action, subject: e.subject, detail: e.detail }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReviewStatus {
    Open,
    Accepted,
    Rejected,
}

/// A decision a person has to make, such as whether two profiles are one student.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReviewItem {
    pub id: String,
    pub kind: String,
    pub profiles: Vec<ProfileId>,
    pub score: f64,
    pub evidence: Value,
    pub status: ReviewStatus,
    pub created_at: DateTime<Utc>,
    pub decided_at: Option<DateTime<Utc>>,
    pub decided_by: Option<String>,
}
