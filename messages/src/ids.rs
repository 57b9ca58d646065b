//! Identifiers: of students (profiles), of events, of sources, and the identity keys that link them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

/// The five silos Cohort ingests from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Web,
    Mobile,
    Crm,
    Email,
    Whatsapp,
}

impl Source {
    pub const ALL: [Source; 5] = [Source::Web, Source::Mobile, Source::Crm, Source::Email, Source::Whatsapp];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Web => "web",
            Source::Mobile => "mobile",
            Source::Crm => "crm",
            Source::Email => "email",
            Source::Whatsapp => "whatsapp",
        }
    }

    /// Behavioural sources own behaviour traits in the golden record.
    pub fn is_behavioural(self) -> bool {
        matches!(self, Source::Web | Source::Mobile)
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Source::ALL
            .into_iter()
            .find(|src| src.as_str() == s)
            .ok_or_else(|| format!("unknown source `{s}` (expected one of web, mobile, crm, email, whatsapp)"))
    }
}

/// Kinds of identifier that deterministic identity resolution links on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentifierKind {
    Email,
    Phone,
    DeviceId,
    SessionId,
    AnonymousId,
    UserId,
    SalesforceId,
    WhatsappId,
}

impl IdentifierKind {
    pub const ALL: [IdentifierKind; 8] = [
        IdentifierKind::Email,
        IdentifierKind::Phone,
        IdentifierKind::DeviceId,
        IdentifierKind::SessionId,
        IdentifierKind::AnonymousId,
        IdentifierKind::UserId,
        IdentifierKind::SalesforceId,
        IdentifierKind::WhatsappId,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            IdentifierKind::Email => "email",
            IdentifierKind::Phone => "phone",
            IdentifierKind::DeviceId => "device_id",
            IdentifierKind::SessionId => "session_id",
            IdentifierKind::AnonymousId => "anonymous_id",
            IdentifierKind::UserId => "user_id",
            IdentifierKind::SalesforceId => "salesforce_id",
            IdentifierKind::WhatsappId => "whatsapp_id",
        }
    }

    /// Whether values of this kind are personal data that logs must never show.
    pub fn is_pii(self) -> bool {
        matches!(self, IdentifierKind::Email | IdentifierKind::Phone | IdentifierKind::WhatsappId)
    }

    /// Kinds a family, a shared tablet or a lab computer hands to several people: linking
    /// through one of them is checked against the person fields of both profiles.
    pub fn can_be_shared(self) -> bool {
        matches!(
            self,
            IdentifierKind::Phone
                | IdentifierKind::WhatsappId
                | IdentifierKind::DeviceId
                | IdentifierKind::AnonymousId
                | IdentifierKind::SessionId
        )
    }

    /// Routing priority: the strongest identifier of an event decides its resolver shard.
    pub fn strength(self) -> u8 {
        match self {
            IdentifierKind::SalesforceId => 8,
            IdentifierKind::UserId => 7,
            IdentifierKind::Email => 6,
            IdentifierKind::Phone => 5,
            IdentifierKind::WhatsappId => 4,
            IdentifierKind::DeviceId => 3,
            IdentifierKind::AnonymousId => 2,
            IdentifierKind::SessionId => 1,
        }
    }
}

impl fmt::Display for IdentifierKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for IdentifierKind {
    type Err = ParseIdentifierError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        // Short aliases accepted in profile refs.
        let canonical = match s.as_str() {
            "device" => "device_id",
            "session" => "session_id",
            "anonymous" | "anon" => "anonymous_id",
            "user" => "user_id",
            "sf" | "sf_id" | "salesforce" => "salesforce_id",
            "whatsapp" | "wa_id" => "whatsapp_id",
            other => other,
        };
        IdentifierKind::ALL.into_iter().find(|k| k.as_str() == canonical).ok_or(ParseIdentifierError::UnknownKind(s))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseIdentifierError {
    #[error("unknown identifier type `{0}` (expected email, phone, device_id, session_id, anonymous_id, user_id, salesforce_id or whatsapp_id)")]
    UnknownKind(String),
    #[error("identifier must look like `type:value`")]
    MissingSeparator,
    #[error("identifier value is empty")]
    EmptyValue,
}

/// A normalized identifier value of one kind, e.g. `email:max@gmail.com`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Identifier {
    pub kind: IdentifierKind,
    pub value: String,
}

impl Identifier {
    pub fn new(kind: IdentifierKind, value: impl Into<String>) -> Self {
        Self { kind, value: value.into() }
    }

    /// The storage and routing key, `kind:value`.
    pub fn key(&self) -> String {
        format!("{}:{}", self.kind.as_str(), self.value)
    }

    /// A log-safe rendering: PII values are replaced by a short hash.
    pub fn redacted(&self) -> String {
        if self.kind.is_pii() {
            let digest = Sha256::digest(self.value.as_bytes());
            format!("{}:#{:02x}{:02x}{:02x}{:02x}", self.kind, digest[0], digest[1], digest[2], digest[3])
        } else {
            self.key()
        }
    }
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl FromStr for Identifier {
    type Err = ParseIdentifierError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, value) = s.split_once(':').ok_or(ParseIdentifierError::MissingSeparator)?;
        let kind: IdentifierKind = kind.parse()?;
        if value.trim().is_empty() {
            return Err(ParseIdentifierError::EmptyValue);
        }
        Ok(Identifier::new(kind, value.trim()))
    }
}

/// A student's profile id: `prof_`, 12 hex digits of the creating event's receipt time in
/// milliseconds, then 12 hex digits of a hash of its event id.
///
/// Ids are derived from the event that created the profile, so replaying the same journal after a
/// crash recreates the same ids and never splits one student in two; and ids sort by age, so the
/// survivor of a merge (the older profile) is simply the smaller id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ProfileId(String);

impl ProfileId {
    pub const PREFIX: &'static str = "prof_";

    /// The id of a profile created by the event with this id, received at `received_at`.
    pub fn derive_from_event(event_id: &EventId, received_at: DateTime<Utc>) -> Self {
        let digest = Sha256::digest(event_id.as_str().as_bytes());
        let millis = received_at.timestamp_millis().clamp(0, 0xffff_ffff_ffff);
        let mut s = String::with_capacity(Self::PREFIX.len() + 24);
        s.push_str(Self::PREFIX);
        s.push_str(&format!("{millis:012x}"));
        for b in &digest[..6] {
            s.push_str(&format!("{b:02x}"));
        }
        ProfileId(s)
    }

    pub fn parse(s: &str) -> Option<Self> {
        let rest = s.strip_prefix(Self::PREFIX)?;
        (rest.len() == 24 && rest.bytes().all(|b| b.is_ascii_hexdigit())).then(|| ProfileId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProfileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An event id: the source's idempotency key (`messageId`, `sg_event_id`, `MessageSid`, CDC
/// `replayId`), namespaced by source, or a content hash when the source gives none.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(String);

impl EventId {
    pub fn new(source: Source, source_key: &str) -> Self {
        EventId(format!("{}:{}", source.as_str(), source_key))
    }

    /// A connector's record: `web+lms:1001`. The `+` keeps connectors out of their channel's own
    /// namespace (`web:<messageId>`), so no Segment call can claim a connector's id.
    pub fn for_connector(channel: Source, connector: &str, key: &str) -> Self {
        EventId(format!("{}+{connector}:{key}", channel.as_str()))
    }

    /// An id for payloads without a key of their own: a hash of their content.
    pub fn from_content(source: Source, parts: &[&[u8]]) -> Self {
        let mut h = Sha256::new();
        for p in parts {
            h.update((p.len() as u64).to_le_bytes());
            h.update(p);
        }
        let digest = h.finalize();
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        EventId(format!("{}:h:{hex}", source.as_str()))
    }

    pub fn from_raw(s: impl Into<String>) -> Self {
        EventId(s.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How an API caller names a profile: its id, or one of its identifiers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProfileRef {
    Id(ProfileId),
    Identifier(Identifier),
}

impl FromStr for ProfileRef {
    type Err = ParseIdentifierError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(id) = ProfileId::parse(s) {
            return Ok(ProfileRef::Id(id));
        }
        Ok(ProfileRef::Identifier(s.parse()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_ref_parses_ids_and_identifiers() {
        let id = ProfileId::derive_from_event(&EventId::new(Source::Web, "m1"), Utc::now());
        assert_eq!(id.as_str().parse::<ProfileRef>(), Ok(ProfileRef::Id(id.clone())));
        assert_eq!(
            "email:max@gmail.com".parse::<ProfileRef>(),
            Ok(ProfileRef::Identifier(Identifier::new(IdentifierKind::Email, "max@gmail.com")))
        );
        assert_eq!(
            "sf:003xx".parse::<ProfileRef>(),
            Ok(ProfileRef::Identifier(Identifier::new(IdentifierKind::SalesforceId, "003xx")))
        );
        assert!(matches!("nonsense".parse::<ProfileRef>(), Err(ParseIdentifierError::MissingSeparator)));
        assert!(matches!("shoe:1".parse::<ProfileRef>(), Err(ParseIdentifierError::UnknownKind(_))));
        assert!(matches!("email:".parse::<ProfileRef>(), Err(ParseIdentifierError::EmptyValue)));
    }

    #[test]
    fn derived_profile_ids_are_stable_and_well_formed() {
        let e = EventId::new(Source::Crm, "replay:42");
        let t0 = DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap_or_default();
        let t1 = DateTime::<Utc>::from_timestamp(1_700_000_001, 0).unwrap_or_default();
        let a = ProfileId::derive_from_event(&e, t0);
        assert_eq!(a, ProfileId::derive_from_event(&e, t0));
        assert!(ProfileId::parse(a.as_str()).is_some());
        let b = ProfileId::derive_from_event(&EventId::new(Source::Crm, "replay:43"), t0);
        assert_ne!(a, b);
        // ids sort by age: the older profile is the smaller id
        assert!(a < ProfileId::derive_from_event(&EventId::new(Source::Crm, "replay:1"), t1));
    }

    #[test]
    fn redaction_hides_pii_values() {
        let email = Identifier::new(IdentifierKind::Email, "max@gmail.com");
        assert!(!email.redacted().contains("max"));
        let device = Identifier::new(IdentifierKind::DeviceId, "dev_456");
        assert_eq!(device.redacted(), "device_id:dev_456");
    }
}
