//! Segment definitions and the changes segments publish.

use crate::ids::ProfileId;
use crate::profile::LinkedIdentifier;
use crate::profile::TraitValue;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How a segment's members are found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SegmentKind {
    /// A rule evaluated on every profile change and when a window slides.
    #[default]
    Realtime,
    /// SQL over the warehouse on a schedule, diffed against the last membership.
    Batch,
    /// A threshold on a model's score, evaluated like a real-time rule.
    Model,
}

/// A segment as defined in config or through `PUT /v1/segments/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentDefinition {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub kind: SegmentKind,
    /// Real-time: the rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Batch: a query returning a `profile_id` column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
    /// Batch: how often, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_secs: Option<u64>,
    /// Model: the scorer and the score from which a profile is a member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
}

/// Entering or leaving a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Entered,
    Exited,
}

/// What destinations may need of a profile when it enters or leaves a segment: a snapshot taken
/// at evaluation, so reverse ETL never asks the profile again.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ActivationProfile {
    pub identifiers: Vec<LinkedIdentifier>,
    pub traits: BTreeMap<String, TraitValue>,
    /// Computed traits at evaluation (`engagement_score`, `funnel_stage`, ...).
    pub computed: serde_json::Map<String, serde_json::Value>,
}

/// Published when a profile entered or left a segment (`cdp.segment.change`, keyed by profile).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentChanged {
    pub profile_id: ProfileId,
    pub segment: String,
    pub change: Change,
    pub at: DateTime<Utc>,
    /// Not published: for destinations inside this process.
    #[serde(skip)]
    pub profile: std::sync::Arc<ActivationProfile>,
    /// When the event that caused the change was received (for trigger latency).
    #[serde(skip)]
    pub caused_at: Option<DateTime<Utc>>,
    /// The `traceparent` of the profile update that caused the change (tracing on).
    #[serde(skip)]
    pub trace: Option<String>,
}
