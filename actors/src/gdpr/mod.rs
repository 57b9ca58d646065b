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

/// Who has been erased, in memory in front of the store: identifier hashes whose events are
/// dropped, and profile ids that must never be started again.
pub struct Erasures {
    hasher: KeyedHasher,
    suppressed: DashSet<String>,
    erased: DashSet<ProfileId>,
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
        Self { hasher, suppressed: DashSet::new(), erased: DashSet::new() }
    }

    /// The keyed hash suppression matches an identifier by.
    pub fn hash(&self, id: &Identifier) -> String {
        self.hasher.hash(id.kind.as_str(), &id.value)
    }

    /// Whether the event carries an identifier of a suppressed person.
    pub fn suppresses(&self, event: &CustomerEvent) -> bool {
        !self.suppressed.is_empty() && event.identifiers.iter().any(|i| self.suppressed.contains(&self.hash(i)))
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
    /// take effect here too). Only adds: a lifted entry disappears at the next start.
    pub async fn load(&self, store: &dyn OperationalStore) -> Result<(), StoreError> {
        for (hash, _) in all_documents(store, SUPPRESSED, "").await? {
            self.suppressed.insert(hash);
        }
        for (id, _) in all_documents(store, ERASED, "").await? {
            if let Some(p) = ProfileId::parse(&id) {
                self.erased.insert(p);
            }
        }
        Ok(())
    }

    /// Persists and applies a suppression.
    pub async fn record_suppression(
        &self,
        store: &dyn OperationalStore,
        saga_id: &str,
        hashes: &[String],
        permanent: bool,
    ) -> Result<(), StoreError> {
        let at = chrono::Utc::now();
        let docs = hashes
            .iter()
            .map(|h| (h.clone(), Some(json!({ "saga_id": saga_id, "permanent": permanent, "since": at }))))
            .collect();
        store.put_documents(SUPPRESSED, docs).await?;
        self.suppress(hashes.iter().cloned());
        Ok(())
    }

    /// Persists and applies the end of a temporary suppression.
    pub async fn lift_suppression(&self, store: &dyn OperationalStore, hashes: &[String]) -> Result<(), StoreError> {
        store.put_documents(SUPPRESSED, hashes.iter().map(|h| (h.clone(), None)).collect()).await?;
        self.lift(hashes);
        Ok(())
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
