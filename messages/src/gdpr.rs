//! GDPR erasure (Art. 17): what a deletion request asks for, who it is about, and the state of
//! its saga. Plain data: the GdprCoordinator drives it and the store keeps it.

use crate::event::CustomerEvent;
use crate::ids::{Identifier, IdentifierKind, ProfileId};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeSet;

/// What a deletion request asks for (Segment's regulation types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Regulation {
    /// Erase everything held; the person may come back as a new profile later.
    Delete,
    /// Erase everything and drop the person's future events (the usual right-to-be-forgotten).
    SuppressWithDelete,
    /// Keep what is held, drop the person's future events.
    SuppressOnly,
}

impl Regulation {
    pub const ALL: [Regulation; 3] = [Regulation::Delete, Regulation::SuppressWithDelete, Regulation::SuppressOnly];

    pub fn as_str(self) -> &'static str {
        match self {
            Regulation::Delete => "delete",
            Regulation::SuppressWithDelete => "suppress_with_delete",
            Regulation::SuppressOnly => "suppress_only",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Whether the person's later events are dropped for good.
    pub fn suppresses(self) -> bool {
        !matches!(self, Regulation::Delete)
    }

    pub fn deletes(self) -> bool {
        !matches!(self, Regulation::SuppressOnly)
    }
}

/// Who a deletion is about, as every store needs to find them: the person's profile ids (the
/// root and every profile merged into it) and every identifier those profiles held. This is
/// personal data: the saga keeps it sealed and drops it when it ends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErasureTarget {
    pub profiles: Vec<ProfileId>,
    pub identifiers: Vec<Identifier>,
    /// Email addresses as the student wrote them (the email tool knows them that way, not in
    /// Cohort's canonical form).
    #[serde(default)]
    pub contact_emails: Vec<String>,
}

/// Shortest identifier value searched for in raw text: shorter ones match unrelated payloads.
const MIN_NEEDLE: usize = 5;

impl ErasureTarget {
    /// Whether the event is the person's: it carries one of their identifiers, unless all of
    /// those are of kinds several people share (a family tablet's device id) and it names
    /// someone else by a personal identifier. That is the other student's event, as ingest
    /// screening keeps it too; erasing it would lose their data.
    pub fn matches_event(&self, event: &CustomerEvent) -> bool {
        let theirs = |i: &Identifier| self.identifiers.contains(i);
        if !event.identifiers.iter().any(theirs) {
            return false;
        }
        let only_shared = event.identifiers.iter().filter(|i| theirs(i)).all(|i| i.kind.can_be_shared());
        let someone_else = event.identifiers.iter().any(|i| !theirs(i) && !i.kind.can_be_shared());
        !(only_shared && someone_else)
    }

    /// The strings a raw payload of the person contains: each identifier value, a phone's
    /// digits without `+` (form encoding turns `+` into `%2B`), and each email address as the
    /// student wrote it (identifiers are canonical: `Jana.Nowak+x@googlemail.com` is stored
    /// as `jananowak@gmail.com`, and a raw payload holds only the first).
    pub fn needles(&self) -> Vec<String> {
        let mut out: BTreeSet<String> =
            self.contact_emails.iter().filter(|e| e.len() >= MIN_NEEDLE).map(|e| e.to_ascii_lowercase()).collect();
        for id in &self.identifiers {
            if id.value.len() >= MIN_NEEDLE {
                out.insert(id.value.clone());
            }
            if matches!(id.kind, IdentifierKind::Phone | IdentifierKind::WhatsappId) {
                let digits: String = id.value.chars().filter(char::is_ascii_digit).collect();
                if digits.len() >= MIN_NEEDLE {
                    out.insert(digits);
                }
            }
        }
        out.into_iter().collect()
    }

    /// Whether raw bytes (a payload, a dead letter) mention the person.
    pub fn mentions(&self, needles: &[String], text: &[u8]) -> bool {
        needles.iter().any(|n| contains(text, n.as_bytes()))
    }

    /// Whether a text names one of the person's profile ids.
    pub fn names_profile(&self, text: &str) -> bool {
        self.profiles.iter().any(|p| text.contains(p.as_str()))
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

/// What an erasure removed from one store (or, in a verification sweep, what it still found).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ErasureCounts {
    pub profiles: u64,
    pub identities: u64,
    pub merges: u64,
    pub consents: u64,
    pub review_items: u64,
    pub dead_letters: u64,
    pub journal_events: u64,
    pub raw_payloads: u64,
    pub documents: u64,
}

impl ErasureCounts {
    pub fn total(&self) -> u64 {
        self.profiles
            + self.identities
            + self.merges
            + self.consents
            + self.review_items
            + self.dead_letters
            + self.journal_events
            + self.raw_payloads
            + self.documents
    }
}

/// The steps of a deletion saga, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeletionStep {
    /// Lists the identifiers' keyed hashes so ingest and resolution drop the person's events
    /// (for the whole saga; after it only when the regulation suppresses).
    Suppress,
    /// Stops the live ProfileActor and drops its unflushed state.
    StopActor,
    /// Profile, identity graph, merges, consent, review items.
    OperationalStore,
    /// Segment memberships, consent history, reverse-ETL sync state.
    Documents,
    /// The embedded journal's events and raw payloads (Kafka: tombstones, see `Tombstones`).
    EventLog,
    /// Warehouse Bronze, Silver and Gold rows.
    Warehouse,
    DeadLetters,
    /// Tombstones on the compacted `cdp.gdpr` topic.
    Tombstones,
    /// Deletes at the destinations (Salesforce Contact, SendGrid contact).
    Destinations,
    /// Feature and vector stores, when configured.
    FeatureStores,
    /// Queries every store again and records what remains (it must be nothing).
    Verify,
    /// An audit record: who asked, when, what was deleted, without personal data.
    Audit,
    /// Drops the personal data the saga itself held, and lifts the temporary suppression of a
    /// plain `delete`.
    Release,
}

impl DeletionStep {
    /// Every step, in the order a full erasure runs them.
    pub const ALL: [DeletionStep; 13] = [
        DeletionStep::Suppress,
        DeletionStep::StopActor,
        DeletionStep::OperationalStore,
        DeletionStep::Documents,
        DeletionStep::EventLog,
        DeletionStep::Warehouse,
        DeletionStep::DeadLetters,
        DeletionStep::Tombstones,
        DeletionStep::Destinations,
        DeletionStep::FeatureStores,
        DeletionStep::Verify,
        DeletionStep::Audit,
        DeletionStep::Release,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeletionStep::Suppress => "suppress",
            DeletionStep::StopActor => "stop_actor",
            DeletionStep::OperationalStore => "operational_store",
            DeletionStep::Documents => "documents",
            DeletionStep::EventLog => "event_log",
            DeletionStep::Warehouse => "warehouse",
            DeletionStep::DeadLetters => "dead_letters",
            DeletionStep::Tombstones => "tombstones",
            DeletionStep::Destinations => "destinations",
            DeletionStep::FeatureStores => "feature_stores",
            DeletionStep::Verify => "verify",
            DeletionStep::Audit => "audit",
            DeletionStep::Release => "release",
        }
    }

    /// The steps a regulation runs, in order.
    pub fn plan(regulation: Regulation) -> Vec<DeletionStep> {
        use DeletionStep::*;
        match regulation {
            Regulation::SuppressOnly => vec![Suppress, Verify, Audit, Release],
            // Declaration order is run order.
            Regulation::Delete | Regulation::SuppressWithDelete => Self::ALL.to_vec(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Pending,
    Done,
    /// Failed at least once and will be tried again.
    Retrying,
    /// Nothing to do here (no warehouse configured, say).
    Skipped,
}

/// One step's progress, as `GET /v1/gdpr/deletions/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepState {
    pub step: DeletionStep,
    pub status: StepStatus,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Counts and notes, never personal data.
    pub detail: Value,
}

impl StepState {
    pub fn pending(step: DeletionStep) -> Self {
        Self {
            step,
            status: StepStatus::Pending,
            attempts: 0,
            last_error: None,
            started_at: None,
            finished_at: None,
            detail: Value::Null,
        }
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.status, StepStatus::Done | StepStatus::Skipped)
    }
}

/// The state of a deletion saga (`SagaRecord::state` of kind [`DELETION_SAGA`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeletionState {
    pub regulation: Regulation,
    pub profile_id: ProfileId,
    /// The person's profile ids: pseudonymous, kept for the audit trail.
    pub profiles: Vec<ProfileId>,
    /// Keyed hashes of the person's identifiers (what suppression matches).
    pub identifier_hashes: Vec<String>,
    /// The [`ErasureTarget`] as JSON sealed with the store's data key; `None` once released.
    pub sealed_target: Option<String>,
    pub requested_by: String,
    pub requested_at: DateTime<Utc>,
    pub steps: Vec<StepState>,
    pub completed_at: Option<DateTime<Utc>>,
    /// The replica that may run the saga's steps, until when. Another replica takes the saga
    /// over only once the lease has expired (its owner died or stopped without releasing it).
    #[serde(default)]
    pub lease: Option<SagaLease>,
    /// Every replica that held the lease, in order (the status endpoint shows takeovers).
    #[serde(default)]
    pub owners: Vec<String>,
}

/// A replica's claim on a saga, renewed with every step it saves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaLease {
    pub owner: String,
    pub until: DateTime<Utc>,
}

impl DeletionState {
    /// Who holds the saga at `now`, if anyone other than `me`.
    pub fn held_elsewhere(&self, me: &str, now: DateTime<Utc>) -> Option<&SagaLease> {
        self.lease.as_ref().filter(|l| l.owner != me && l.until > now)
    }
}

/// `SagaRecord::kind` of deletion sagas.
pub const DELETION_SAGA: &str = "gdpr_deletion";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::IdentifierKind;

    #[test]
    fn regulations_round_trip_and_plan_their_steps() {
        for r in Regulation::ALL {
            assert_eq!(Regulation::parse(r.as_str()), Some(r));
        }
        assert_eq!(Regulation::parse("erase"), None);
        let only = DeletionStep::plan(Regulation::SuppressOnly);
        assert!(!only.contains(&DeletionStep::OperationalStore));
        let full = DeletionStep::plan(Regulation::SuppressWithDelete);
        assert_eq!(
            full.first(),
            Some(&DeletionStep::Suppress),
            "suppression comes first, so nothing re-creates the person"
        );
        assert_eq!(full.last(), Some(&DeletionStep::Release));
        assert!(
            full.iter().position(|s| *s == DeletionStep::Verify) < full.iter().position(|s| *s == DeletionStep::Audit)
        );
    }

    #[test]
    fn needles_find_the_person_in_raw_text_only() {
        let t = ErasureTarget {
            profiles: vec![],
            contact_emails: vec![],
            identifiers: vec![
                Identifier::new(IdentifierKind::Email, "jana.nowak@example.edu"),
                Identifier::new(IdentifierKind::Phone, "+4915112345678"),
                Identifier::new(IdentifierKind::SessionId, "s1"),
            ],
        };
        let n = t.needles();
        assert!(n.contains(&"4915112345678".to_string()));
        assert!(!n.contains(&"s1".to_string()), "too short to search raw text for");
        assert!(t.mentions(&n, b"From=whatsapp%3A%2B4915112345678&Body=hi"));
        assert!(t.mentions(&n, br#"{"email":"Jana.Nowak@example.edu"}"#));
        assert!(!t.mentions(&n, br#"{"email":"someone@example.edu"}"#));
    }

    #[test]
    fn a_siblings_event_on_the_shared_tablet_is_not_the_persons() {
        let t = ErasureTarget {
            profiles: vec![],
            contact_emails: vec![],
            identifiers: vec![
                Identifier::new(IdentifierKind::Email, "jana@uni.eu"),
                Identifier::new(IdentifierKind::DeviceId, "tab-1"),
            ],
        };
        let event = |ids: &[(IdentifierKind, &str)]| CustomerEvent {
            event_id: crate::EventId::new(crate::Source::Web, "e1"),
            source: crate::Source::Web,
            kind: crate::EventKind::Track,
            name: Some("Lesson Completed".into()),
            occurred_at: Utc::now(),
            received_at: Utc::now(),
            identifiers: ids.iter().map(|(k, v)| Identifier::new(*k, *v)).collect(),
            traits: Default::default(),
            properties: Default::default(),
            utm: Default::default(),
            trace: None,
            raw: crate::RawRef { seq: None, index: 0 },
        };
        assert!(t.matches_event(&event(&[(IdentifierKind::Email, "jana@uni.eu")])));
        assert!(t.matches_event(&event(&[(IdentifierKind::DeviceId, "tab-1")])), "the tablet alone is hers");
        let tom = event(&[(IdentifierKind::DeviceId, "tab-1"), (IdentifierKind::Email, "tom@uni.eu")]);
        assert!(!t.matches_event(&tom), "Tom's event on the shared tablet");
        let both = event(&[(IdentifierKind::Email, "jana@uni.eu"), (IdentifierKind::Email, "tom@uni.eu")]);
        assert!(t.matches_event(&both), "her personal identifier makes it hers");
        assert!(!t.matches_event(&event(&[(IdentifierKind::Email, "tom@uni.eu")])));
    }

    #[test]
    fn needles_find_an_address_as_written_not_only_in_its_canonical_form() {
        let t = ErasureTarget {
            profiles: vec![],
            contact_emails: vec!["Jana.Nowak+news@googlemail.com".into()],
            identifiers: vec![Identifier::new(IdentifierKind::Email, "jananowak@gmail.com")],
        };
        let n = t.needles();
        assert!(t.mentions(&n, br#"[{"email":"jana.nowak+news@googlemail.com","event":"open"}]"#));
        assert!(t.mentions(&n, br#"{"traits":{"email":"jananowak@gmail.com"}}"#));
    }
}
