//! The one event type every source normalizes to.

use crate::ids::{EventId, Identifier, Source};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// What happened, independent of the source's vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Segment `identify`: who the visitor is.
    Identify,
    /// Segment `track`: a named action.
    Track,
    /// Segment `page`: a website page view.
    Page,
    /// Segment `screen`: a mobile app screen view.
    Screen,
    /// Segment `group`: membership of an account or cohort.
    Group,
    /// Segment `alias`: two user ids are the same person.
    Alias,
    /// Salesforce CDC create/update/undelete, or a bulk CSV row.
    ContactChanged,
    /// Salesforce CDC delete.
    ContactDeleted,
    /// Salesforce CDC gap event: the records must be re-read, no field values are carried.
    ContactGap,
    /// SendGrid event webhook entry (open, click, bounce, unsubscribe...).
    EmailActivity,
    /// An inbound WhatsApp message.
    MessageReceived,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Identify => "identify",
            EventKind::Track => "track",
            EventKind::Page => "page",
            EventKind::Screen => "screen",
            EventKind::Group => "group",
            EventKind::Alias => "alias",
            EventKind::ContactChanged => "contact_changed",
            EventKind::ContactDeleted => "contact_deleted",
            EventKind::ContactGap => "contact_gap",
            EventKind::EmailActivity => "email_activity",
            EventKind::MessageReceived => "message_received",
        }
    }
}

/// UTM campaign parameters (Segment `context.campaign`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Utm {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub medium: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub campaign: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub term: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

impl Utm {
    pub fn is_empty(&self) -> bool {
        self.source.is_none()
            && self.medium.is_none()
            && self.campaign.is_none()
            && self.term.is_none()
            && self.content.is_none()
    }
}

/// Where the raw payload this event came from is kept (Bronze).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawRef {
    /// Journal sequence number of the raw payload, once it is durable.
    pub seq: Option<u64>,
    /// Index of this event within its payload (a batch or a CDC record list).
    pub index: u32,
}

/// A normalized event: UTC timestamps, normalized identifiers, canonical trait names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomerEvent {
    pub event_id: EventId,
    pub source: Source,
    pub kind: EventKind,
    /// The action's name: the track event, page or screen name, SendGrid event type, or the
    /// WhatsApp message intent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub identifiers: Vec<Identifier>,
    /// Contact traits under canonical snake_case names (email, phone, first_name, last_name,
    /// enrollment_status, ...); unknown vendor traits are kept under their own names.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub traits: Map<String, Value>,
    /// Event properties (page path, quiz score, campaign id, intent and sentiment, ...).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub properties: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Utm::is_empty")]
    pub utm: Utm,
    pub raw: RawRef,
    /// W3C `traceparent` of the ingest that produced the event, when tracing is on: the
    /// pipeline's spans for it join that trace (also sent as a Kafka header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

impl CustomerEvent {
    /// The identifier that routes this event to a resolver shard: the strongest one it carries.
    pub fn routing_identifier(&self) -> Option<&Identifier> {
        self.identifiers.iter().max_by_key(|i| (i.kind.strength(), &i.value))
    }

    /// The partitioning and shard key: the strongest identifier, or the event id when the event
    /// carries none (so it still reaches a worker that dead-letters it).
    pub fn routing_key(&self) -> String {
        match self.routing_identifier() {
            Some(id) => id.key(),
            None => self.event_id.to_string(),
        }
    }
}
