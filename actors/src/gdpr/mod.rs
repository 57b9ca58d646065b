//! GDPR erasure: the registry of erased people every pipeline stage consults, and the
//! GdprCoordinator that runs deletion sagas.
//!
//! Suppression works on keyed hashes (HMAC under a key derived from the store's data key), so
//! the list of erased people is itself no list of personal data.

pub mod destinations;
pub mod saga;

use cohort_adapters::crypto::KeyedHasher;
use cohort_adapters::{all_documents, OperationalStore, StoreError};
use cohort_messages::{CustomerEvent, Identifier, ProfileId};
use dashmap::DashSet;
use serde_json::json;

/// Documents: keyed hash of an identifier → `{saga_id, permanent, since}`.
pub const SUPPRESSED: &str = "gdpr_suppressed";
/// Documents: erased profile id → `{saga_id, at}`. A message for one of these is dropped.
pub const ERASED: &str = "gdpr_erased_profiles";
/// Documents: `{request}:{profile_id}` → `{at}`, written by a profile's owner (cluster mode) once
/// it has erased the profile for a saga's attempt (`request`); the saga waits for them, then
/// removes them.
pub const ERASE_ACKS: &str = "gdpr_erase_acks";

/// The key of an owner's confirmation that it erased `profile` for `request`.
pub fn erase_ack_key(request: &str, profile: &ProfileId) -> String {
    format!("{request}:{profile}")
}

/// The verdict of [`Erasures::screen`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Screen {
    Keep,
    Drop,
    /// Another student's event: keep it with only these identifiers.
    Strip(Vec<Identifier>),
}

/// Who has been erased, in memory in front of the store: identifier hashes whose events are
/// dropped, and profile ids that must never be started again.
pub struct Erasures {
    hasher: KeyedHasher,
    suppressed: DashSet<String>,
    erased: DashSet<ProfileId>,
    /// What the last [`Erasures::load`] read: a hash in it and gone from the store since was
    /// lifted (by another replica's saga, say), unless this replica recorded it again meanwhile.
    loaded: parking_lot::Mutex<std::collections::HashSet<String>>,
    /// Hashes this replica recorded since the last load began.
    recorded: parking_lot::Mutex<std::collections::HashSet<String>>,
}

impl std::fmt::Debug for Erasures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Erasures")
            .field("suppressed", &self.suppressed.len())
            .field("erased", &self.erased.len())
            .finish_non_exhaustive()
    }
}

impl Erasures {
    pub fn new(hasher: KeyedHasher) -> Self {
        Self {
            hasher,
            suppressed: DashSet::new(),
            erased: DashSet::new(),
            loaded: Default::default(),
            recorded: Default::default(),
        }
    }

    /// The keyed hash suppression matches an identifier by.
    pub fn hash(&self, id: &Identifier) -> String {
        self.hasher.hash(id.kind.as_str(), &id.value)
    }

    /// What to do with an event, given the suppressed people.
    ///
    /// An event carrying a suppressed identifier is the erased person's and is dropped, with
    /// one exception: when everything suppressed about it is of a kind several people share (a
    /// family tablet's device id, a kiosk's anonymous id) and it also names someone else by a
    /// personal identifier (their email, user id, Salesforce id), it is that other student's
    /// event: it goes on without the shared identifiers.
    pub fn screen(&self, event: &CustomerEvent) -> Screen {
        if self.suppressed.is_empty() {
            return Screen::Keep;
        }
        let hit: Vec<bool> = event.identifiers.iter().map(|i| self.suppresses_identifier(i)).collect();
        if !hit.contains(&true) {
            return Screen::Keep;
        }
        let only_shared = event.identifiers.iter().zip(&hit).all(|(i, h)| !h || i.kind.can_be_shared());
        let someone_else = event.identifiers.iter().zip(&hit).any(|(i, h)| !h && !i.kind.can_be_shared());
        if only_shared && someone_else {
            let kept = event.identifiers.iter().zip(&hit).filter(|(_, h)| !**h).map(|(i, _)| i.clone()).collect();
            Screen::Strip(kept)
        } else {
            Screen::Drop
        }
    }

    /// Whether this identifier is a suppressed person's.
    pub fn suppresses_identifier(&self, id: &Identifier) -> bool {
        !self.suppressed.is_empty() && self.suppressed.contains(&self.hash(id))
    }

    /// Whether the event belongs to a suppressed person (see [`Erasures::screen`]).
    pub fn suppresses(&self, event: &CustomerEvent) -> bool {
        matches!(self.screen(event), Screen::Drop)
    }

    /// The event as it may go on, or `None` when it is dropped; `true` when it was changed.
    pub fn apply(&self, event: CustomerEvent) -> (Option<CustomerEvent>, bool) {
        match self.screen(&event) {
            Screen::Keep => (Some(event), false),
            Screen::Drop => (None, true),
            Screen::Strip(identifiers) => (Some(CustomerEvent { identifiers, ..event }), true),
        }
    }

    pub fn is_erased(&self, profile: &ProfileId) -> bool {
        !self.erased.is_empty() && self.erased.contains(profile)
    }

    pub fn suppress(&self, hashes: impl IntoIterator<Item = String>) {
        for h in hashes {
            self.suppressed.insert(h);
        }
    }

    pub fn lift(&self, hashes: &[String]) {
        for h in hashes {
            self.suppressed.remove(h);
        }
    }

    pub fn mark_erased(&self, profiles: impl IntoIterator<Item = ProfileId>) {
        for p in profiles {
            self.erased.insert(p);
        }
    }

    pub fn suppressed_len(&self) -> usize {
        self.suppressed.len()
    }

    /// Loads what the store says (at start, and periodically so sagas run by another replica
    /// take effect here too): new suppressions, and the end of those the last load saw that the
    /// store no longer holds. One recorded here after this read began is in neither, so it stays.
    pub async fn load(&self, store: &dyn OperationalStore) -> Result<(), StoreError> {
        self.recorded.lock().clear();
        let now: std::collections::HashSet<String> =
            all_documents(store, SUPPRESSED, "").await?.into_iter().map(|(hash, _)| hash).collect();
        {
            let mut loaded = self.loaded.lock();
            let recorded = self.recorded.lock();
            for lifted in loaded.difference(&now).filter(|h| !recorded.contains(*h)) {
                self.suppressed.remove(lifted);
            }
            for hash in &now {
                self.suppressed.insert(hash.clone());
            }
            *loaded = now;
        }
        for (id, _) in all_documents(store, ERASED, "").await? {
            if let Some(p) = ProfileId::parse(&id) {
                self.erased.insert(p);
            }
        }
        Ok(())
    }

    /// Persists and applies a suppression. A temporary one (a plain delete) never replaces a
    /// permanent one another saga recorded: its end would lift that too.
    pub async fn record_suppression(
        &self,
        store: &dyn OperationalStore,
        saga_id: &str,
        hashes: &[String],
        permanent: bool,
    ) -> Result<(), StoreError> {
        let at = chrono::Utc::now();
        let held = match permanent {
            true => vec![None; hashes.len()],
            false => store.get_documents(SUPPRESSED, hashes).await?,
        };
        let docs = hashes
            .iter()
            .zip(held)
            .filter(|(_, held)| !held.as_ref().is_some_and(|d| d["permanent"] == json!(true)))
            .map(|(h, _)| (h.clone(), Some(json!({ "saga_id": saga_id, "permanent": permanent, "since": at }))))
            .collect();
        self.recorded.lock().extend(hashes.iter().cloned());
        store.put_documents(SUPPRESSED, docs).await?;
        self.suppress(hashes.iter().cloned());
        Ok(())
    }

    /// Persists and applies the end of saga `saga_id`'s temporary suppression: only what it
    /// recorded itself, never a permanent suppression or one a later saga recorded. Returns the
    /// hashes lifted.
    pub async fn lift_suppression(
        &self,
        store: &dyn OperationalStore,
        saga_id: &str,
        hashes: &[String],
    ) -> Result<Vec<String>, StoreError> {
        let held = store.get_documents(SUPPRESSED, hashes).await?;
        let ours: Vec<String> = hashes
            .iter()
            .zip(held)
            .filter(|(_, d)| {
                d.as_ref().is_some_and(|d| d["saga_id"] == json!(saga_id) && d["permanent"] != json!(true))
            })
            .map(|(h, _)| h.clone())
            .collect();
        store.put_documents(SUPPRESSED, ours.iter().map(|h| (h.clone(), None)).collect()).await?;
        self.lift(&ours);
        Ok(ours)
    }

    /// Persists and applies erased profile ids.
    pub async fn record_erased(
        &self,
        store: &dyn OperationalStore,
        saga_id: &str,
        profiles: &[ProfileId],
    ) -> Result<(), StoreError> {
        let at = chrono::Utc::now();
        let docs = profiles.iter().map(|p| (p.to_string(), Some(json!({ "saga_id": saga_id, "at": at })))).collect();
        store.put_documents(ERASED, docs).await?;
        self.mark_erased(profiles.iter().cloned());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_messages::{EventId, EventKind, IdentifierKind, RawRef, Source, Utm};

    fn event(ids: &[(IdentifierKind, &str)]) -> CustomerEvent {
        CustomerEvent {
            event_id: EventId::new(Source::Web, "e1"),
            source: Source::Web,
            kind: EventKind::Identify,
            name: None,
            occurred_at: chrono::Utc::now(),
            received_at: chrono::Utc::now(),
            identifiers: ids.iter().map(|(k, v)| Identifier::new(*k, *v)).collect(),
            traits: Default::default(),
            properties: Default::default(),
            utm: Utm::default(),
            trace: None,
            raw: RawRef { seq: None, index: 0 },
        }
    }

    /// A plain delete filed after a suppressing request for the same person neither downgrades
    /// nor ends that suppression; a plain delete's own suppression ends with it, and only with it.
    #[tokio::test]
    async fn a_temporary_suppression_never_ends_a_permanent_one() {
        let store = cohort_adapters::EmbeddedStore::in_memory().unwrap();
        let secret = [7u8; 32];
        let e = Erasures::new(KeyedHasher::from_secret(&secret).unwrap());
        let hash = |v: &str| vec![e.hash(&Identifier::new(IdentifierKind::Email, v))];
        let jana = hash("jana@uni.eu");
        e.record_suppression(store.as_ref(), "saga-a", &jana, true).await.unwrap();
        e.record_suppression(store.as_ref(), "saga-b", &jana, false).await.unwrap();
        assert_eq!(e.lift_suppression(store.as_ref(), "saga-b", &jana).await.unwrap(), Vec::<String>::new());
        assert_eq!(e.suppressed_len(), 1);
        let reloaded = Erasures::new(KeyedHasher::from_secret(&secret).unwrap());
        reloaded.load(store.as_ref()).await.unwrap();
        assert_eq!(reloaded.suppressed_len(), 1, "still permanent in the store");

        let tom = hash("tom@uni.eu");
        e.record_suppression(store.as_ref(), "saga-c", &tom, false).await.unwrap();
        assert!(e.lift_suppression(store.as_ref(), "saga-d", &tom).await.unwrap().is_empty(), "not saga-d's");
        assert_eq!(e.lift_suppression(store.as_ref(), "saga-c", &tom).await.unwrap(), tom);
        assert_eq!(e.suppressed_len(), 1, "only Jana's is left");
    }

    /// Another replica's saga lifting a plain delete's suppression takes effect here at the next
    /// load, not only at the next start; a suppression it never saw is left alone.
    #[tokio::test]
    async fn a_suppression_lifted_elsewhere_ends_here_at_the_next_load() {
        let store = cohort_adapters::EmbeddedStore::in_memory().unwrap();
        let secret = [7u8; 32];
        let (here, there) = (
            Erasures::new(KeyedHasher::from_secret(&secret).unwrap()),
            Erasures::new(KeyedHasher::from_secret(&secret).unwrap()),
        );
        let jana = vec![here.hash(&Identifier::new(IdentifierKind::Email, "jana@uni.eu"))];
        there.record_suppression(store.as_ref(), "saga-x", &jana, false).await.unwrap();
        here.load(store.as_ref()).await.unwrap();
        assert_eq!(here.suppressed_len(), 1);
        there.lift_suppression(store.as_ref(), "saga-x", &jana).await.unwrap();
        // Recorded here only in memory (as if its store write raced this load): kept.
        here.suppress(vec!["local-only".to_string()]);
        here.load(store.as_ref()).await.unwrap();
        assert_eq!(here.suppressed_len(), 1, "Jana's lifted, the unseen one kept");
        assert!(!here.suppressed.contains(&jana[0]));
    }

    #[test]
    fn the_erased_persons_events_are_dropped_and_a_sibling_on_the_shared_tablet_is_kept() {
        let e = Erasures::new(KeyedHasher::from_secret(&[7u8; 32]).unwrap());
        let (email, tablet, anon) = (IdentifierKind::Email, IdentifierKind::DeviceId, IdentifierKind::AnonymousId);
        let jana =
            [Identifier::new(email, "jana@uni.eu"), Identifier::new(tablet, "tab-1"), Identifier::new(anon, "a1")];
        assert_eq!(e.screen(&event(&[(email, "jana@uni.eu")])), Screen::Keep, "nothing suppressed yet");
        e.suppress(jana.iter().map(|i| e.hash(i)));
        assert_eq!(e.screen(&event(&[(email, "jana@uni.eu")])), Screen::Drop);
        assert_eq!(e.screen(&event(&[(anon, "a1")])), Screen::Drop, "her browser alone is her");
        assert_eq!(e.screen(&event(&[(anon, "a1"), (IdentifierKind::SessionId, "s9")])), Screen::Drop);
        assert_eq!(e.screen(&event(&[(email, "jana@uni.eu"), (IdentifierKind::UserId, "u2")])), Screen::Drop);
        // Her brother signs in on the family tablet: his event, without her device id.
        let brother = e.screen(&event(&[(email, "tom@uni.eu"), (tablet, "tab-1")]));
        assert_eq!(brother, Screen::Strip(vec![Identifier::new(email, "tom@uni.eu")]));
        assert_eq!(e.screen(&event(&[(email, "tom@uni.eu")])), Screen::Keep);
        e.lift(&[e.hash(&jana[0])]);
        assert_eq!(e.screen(&event(&[(email, "jana@uni.eu")])), Screen::Keep, "a lifted suppression");
    }
}
