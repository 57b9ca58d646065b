//! The event journal (the embedded event bus) and the operational store.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cohort_messages::{
    msgs::IdentityMerged, AuditEntry, Channel, ConsentRecord, CustomerEvent, DeadLetter, DeadLetterStage,
    ErasureCounts, ErasureTarget, Identifier, NewAuditEntry, ProfileId, ProfileRecord, ReviewItem, ReviewStatus,
    SagaRecord, Source, Suppression,
};
use tokio::sync::watch;

use crate::warehouse::WarehouseBatch;
use crate::StoreError;

/// A raw payload exactly as received: the Bronze layer.
#[derive(Debug, Clone, PartialEq)]
pub struct BronzeRecord {
    pub source: Source,
    /// `segment:track`, `twilio_form`, `sendgrid_events`, `salesforce_cdc`, `salesforce_csv`.
    pub format: String,
    pub content_type: String,
    pub received_at: DateTime<Utc>,
    pub body: Vec<u8>,
}

/// One ingest: the raw payload and the events normalized from it, made durable together.
#[derive(Debug, Clone)]
pub struct AppendBatch {
    pub raw: Option<BronzeRecord>,
    pub events: Vec<CustomerEvent>,
}

/// Result of an append: one entry per event, `None` where the event id had been journaled
/// before (a duplicate, applied once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendOutcome {
    pub raw_seq: Option<u64>,
    pub seqs: Vec<Option<u64>>,
}

/// A journaled event with its sequence number.
#[derive(Debug, Clone)]
pub struct JournaledEvent {
    pub seq: u64,
    pub event: CustomerEvent,
}

/// The durable, ordered journal of normalized events: Cohort's embedded event bus.
///
/// An HTTP 2xx is only sent after `append` returned, so the journal is the source of truth for
/// what was acknowledged. Consumers read from their checkpoint and re-apply idempotently.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Appends atomically and durably; concurrent calls are committed together (group commit).
    async fn append(&self, batch: AppendBatch) -> Result<AppendOutcome, StoreError>;
    /// Events with `seq > after`, in order, at most `limit`.
    async fn read_after(&self, after: u64, limit: usize) -> Result<Vec<JournaledEvent>, StoreError>;
    /// The highest journaled seq, updated on every append (0 when empty).
    fn watch_head(&self) -> watch::Receiver<u64>;
    /// Bronze records with `seq > after`, in order, at most `limit` (for replay and audit).
    async fn read_bronze_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, BronzeRecord)>, StoreError>;
    /// GDPR erasure: removes the journal events carrying one of the person's identifiers, their
    /// raw payloads and any other raw payload mentioning the person. Returns what was removed.
    async fn erase_matching(&self, target: &ErasureTarget) -> Result<ErasureCounts, StoreError>;
    /// What [`EventLog::erase_matching`] would remove now.
    async fn count_matching(&self, target: &ErasureTarget) -> Result<ErasureCounts, StoreError>;
    /// Retention: forgets the idempotency keys of events journaled before `before`, and the
    /// journal events and raw payloads received before it up to seq `covered` (the pipeline's
    /// checkpoint; nothing it has not persisted is removed). Returns the keys removed.
    async fn compact(&self, before: DateTime<Utc>, covered: u64) -> Result<u64, StoreError>;
}

/// What a write-behind cycle persists, in one transaction.
#[derive(Debug, Clone, Default)]
pub struct FlushBatch {
    pub identities: Vec<(Identifier, ProfileId)>,
    pub profiles: Vec<ProfileRecord>,
    pub merges: Vec<IdentityMerged>,
    /// All journal events up to this seq are reflected in persisted profiles.
    pub checkpoint: Option<u64>,
    /// Ids of events whose effects this flush persists, for buses that cannot refuse duplicates
    /// when publishing (Kafka): a redelivered or re-sent event with one of these ids is skipped.
    pub event_ids: Vec<String>,
    /// Warehouse rows describing this flush, stored with it (a transactional outbox) and relayed
    /// to the warehouse later, so a warehouse outage neither stalls profiles nor loses rows.
    pub outbox: WarehouseBatch,
}

/// Key of one stored outbox batch; ordered by when it was written.
pub type OutboxId = String;

/// A dead letter before the store assigns its id.
#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    pub source: Source,
    pub stage: DeadLetterStage,
    pub reason: String,
    pub event_id: Option<String>,
    pub payload: String,
    pub content_type: String,
    pub received_at: DateTime<Utc>,
    pub attempts: u32,
}

impl NewDeadLetter {
    /// The letter as stored, under the id the store gave it.
    pub fn stored(self, id: u64, recorded_at: DateTime<Utc>) -> DeadLetter {
        DeadLetter {
            id,
            source: self.source,
            stage: self.stage,
            reason: self.reason,
            event_id: self.event_id,
            payload: self.payload,
            content_type: self.content_type,
            received_at: self.received_at,
            recorded_at,
            attempts: self.attempts,
        }
    }
}

/// Profiles, the identity graph, merges, dead letters and the pipeline checkpoint.
#[async_trait]
pub trait OperationalStore: Send + Sync + 'static {
    async fn load_profile(&self, id: &ProfileId) -> Result<Option<ProfileRecord>, StoreError>;
    async fn lookup_identity(&self, identifier: &Identifier) -> Result<Option<ProfileId>, StoreError>;
    /// [`OperationalStore::lookup_identity`] for many identifiers in one round trip, in order.
    async fn lookup_identities(&self, identifiers: &[Identifier]) -> Result<Vec<Option<ProfileId>>, StoreError>;
    /// Stores each identifier for its profile unless the store already holds it, and returns
    /// every identifier's owner afterwards (the claimer's own id where the claim won). Atomic
    /// per identifier on MongoDB, where replicas claim concurrently; the embedded store serves
    /// one process, whose claims the identity index already serializes.
    async fn claim_identities(&self, claims: &[(Identifier, ProfileId)]) -> Result<Vec<ProfileId>, StoreError> {
        let ids: Vec<Identifier> = claims.iter().map(|(i, _)| i.clone()).collect();
        let existing = self.lookup_identities(&ids).await?;
        let fresh: Vec<(Identifier, ProfileId)> =
            claims.iter().zip(&existing).filter(|(_, e)| e.is_none()).map(|(c, _)| c.clone()).collect();
        if !fresh.is_empty() {
            self.commit_flush(FlushBatch { identities: fresh, ..FlushBatch::default() }).await?;
        }
        Ok(claims.iter().zip(existing).map(|((_, p), e)| e.unwrap_or_else(|| p.clone())).collect())
    }
    async fn commit_flush(&self, batch: FlushBatch) -> Result<(), StoreError>;
    async fn checkpoint(&self) -> Result<u64, StoreError>;
    /// For each id, whether a flush already recorded it in `event_ids`.
    async fn seen_event_ids(&self, ids: &[String]) -> Result<Vec<bool>, StoreError>;
    async fn put_dead_letters(&self, letters: Vec<NewDeadLetter>) -> Result<Vec<u64>, StoreError>;
    /// Dead letters with `id > after`, oldest first, at most `limit`.
    async fn list_dead_letters(&self, after: u64, limit: usize) -> Result<Vec<DeadLetter>, StoreError>;
    async fn count_dead_letters(&self) -> Result<u64, StoreError>;
    async fn count_profiles(&self) -> Result<u64, StoreError>;
    /// Profile ids with `id > after`, in id order, at most `limit` (for scans and exports).
    async fn list_profile_ids(&self, after: Option<&ProfileId>, limit: usize) -> Result<Vec<ProfileId>, StoreError>;
    async fn list_merges(&self, profile: &ProfileId) -> Result<Vec<IdentityMerged>, StoreError>;
    /// Cheap liveness check used by `/health/ready`.
    async fn ping(&self) -> Result<(), StoreError>;
    /// The stored records of these profiles (missing ones are skipped), in one round trip.
    async fn load_profiles(&self, ids: &[ProfileId]) -> Result<Vec<ProfileRecord>, StoreError>;
    /// The oldest outbox batches not yet acknowledged, at most `limit`.
    async fn read_outbox(&self, limit: usize) -> Result<Vec<(OutboxId, WarehouseBatch)>, StoreError>;
    /// Forgets outbox batches the warehouse has stored (unknown ids are ignored).
    async fn ack_outbox(&self, ids: &[OutboxId]) -> Result<(), StoreError>;
    /// Outbox batches waiting for the warehouse.
    async fn outbox_len(&self) -> Result<u64, StoreError>;
    /// The largest request body whose raw payload one outbox record can hold, where the backend
    /// limits a record's size; requests above it are refused at the edge (413). `None`: no limit.
    fn max_raw_payload_bytes(&self) -> Option<usize> {
        None
    }
    /// Forgets the idempotency keys flushes recorded (`FlushBatch::event_ids`) before `before`.
    /// Returns how many were removed. An event redelivered after its key expired counts again:
    /// the retention is the deduplication window.
    async fn expire_before(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Stores consent decisions; one per (profile, purpose, channel), the latest replaces.
    async fn record_consents(&self, consents: Vec<ConsentRecord>) -> Result<(), StoreError>;
    /// A profile's consent decisions, by purpose then channel.
    async fn consents(&self, profile: &ProfileId) -> Result<Vec<ConsentRecord>, StoreError>;
    /// Adds addresses to the suppression list (an address listed again keeps the new reason).
    async fn suppress(&self, entries: Vec<Suppression>) -> Result<(), StoreError>;
    /// Takes addresses off the suppression list (absent ones are ignored).
    async fn unsuppress(&self, addresses: &[(Channel, String)]) -> Result<(), StoreError>;
    /// For each address, its suppression entry if it is listed.
    async fn suppressed(&self, addresses: &[(Channel, String)]) -> Result<Vec<Option<Suppression>>, StoreError>;
    /// Saves a saga whose `version` is one more than the stored one (1 for a new saga); any
    /// other version is a `Conflict`: another writer advanced it.
    async fn save_saga(&self, saga: &SagaRecord) -> Result<(), StoreError>;
    async fn load_saga(&self, saga_id: &str) -> Result<Option<SagaRecord>, StoreError>;
    /// Sagas with `saga_id > after`, in id order, at most `limit`.
    async fn list_sagas(&self, after: Option<&str>, limit: usize) -> Result<Vec<SagaRecord>, StoreError>;
    /// Appends to the audit log; returns the ids given, increasing.
    async fn append_audit(&self, entries: Vec<NewAuditEntry>) -> Result<Vec<u64>, StoreError>;
    /// Audit entries with `id > after`, oldest first, at most `limit`.
    async fn list_audit(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError>;
    /// Creates or replaces review items (by id).
    async fn put_review_items(&self, items: Vec<ReviewItem>) -> Result<(), StoreError>;
    async fn review_item(&self, id: &str) -> Result<Option<ReviewItem>, StoreError>;

    /// Writes small JSON documents of a named collection (segment definitions, memberships,
    /// destination sync state): `Some` creates or replaces, `None` deletes. Atomic per call.
    async fn put_documents(
        &self,
        collection: &str,
        docs: Vec<(String, Option<serde_json::Value>)>,
    ) -> Result<(), StoreError>;
    /// The documents with these keys, in order (`None` where absent).
    async fn get_documents(
        &self,
        collection: &str,
        keys: &[String],
    ) -> Result<Vec<Option<serde_json::Value>>, StoreError>;
    /// Documents whose key starts with `prefix` and sorts after `after`, in key order, at most
    /// `limit`.
    async fn list_documents(
        &self,
        collection: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, serde_json::Value)>, StoreError>;
    /// GDPR erasure of one person: their profile records, identity-graph entries keyed by one of
    /// their identifiers or pointing at one of their profiles, merges on either side, consent
    /// decisions and review items naming them. Idempotent; returns what was removed.
    async fn erase_person(&self, target: &ErasureTarget) -> Result<ErasureCounts, StoreError>;
    /// Deletes dead letters by id; returns how many there were.
    async fn delete_dead_letters(&self, ids: &[u64]) -> Result<u64, StoreError>;
    /// What [`OperationalStore::erase_person`] and [`erase_dead_letters`] would remove now:
    /// the verification sweep expects nothing.
    async fn person_remnants(&self, target: &ErasureTarget) -> Result<ErasureCounts, StoreError>;
    /// Review items with `id > after` (and the given status), in id order, at most `limit`.
    async fn list_review_items(
        &self,
        status: Option<ReviewStatus>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ReviewItem>, StoreError>;
}

/// Rows per page when a helper below reads a whole listing.
const PAGE: usize = 500;

/// Every document of `collection` whose key starts with `prefix`, read a page at a time.
pub async fn all_documents(
    store: &dyn OperationalStore,
    collection: &str,
    prefix: &str,
) -> Result<Vec<(String, serde_json::Value)>, StoreError> {
    let mut out: Vec<(String, serde_json::Value)> = Vec::new();
    loop {
        let after = out.last().map(|(k, _)| k.clone());
        let page = store.list_documents(collection, prefix, after.as_deref(), PAGE).await?;
        let full = page.len() == PAGE;
        out.extend(page);
        if !full {
            return Ok(out);
        }
    }
}

/// Deletes `keys` of a document collection, a bounded batch per write.
pub async fn delete_documents(
    store: &dyn OperationalStore,
    collection: &str,
    keys: impl IntoIterator<Item = String>,
) -> Result<(), StoreError> {
    let deletes: Vec<(String, Option<serde_json::Value>)> = keys.into_iter().map(|k| (k, None)).collect();
    for chunk in deletes.chunks(1000) {
        store.put_documents(collection, chunk.to_vec()).await?;
    }
    Ok(())
}

/// Ids of the dead letters whose payload mentions the person (or whose reason names one of
/// their profiles), read a page at a time. Payloads are raw text, so this is a scan.
pub async fn dead_letters_mentioning(
    store: &dyn OperationalStore,
    target: &ErasureTarget,
) -> Result<Vec<u64>, StoreError> {
    let needles = target.needles();
    let mut found = Vec::new();
    let mut after = 0;
    loop {
        let page = store.list_dead_letters(after, PAGE).await?;
        let full = page.len() == PAGE;
        for l in &page {
            if target.mentions(&needles, l.payload.as_bytes()) || target.names_profile(&l.reason) {
                found.push(l.id);
            }
        }
        match page.last() {
            Some(last) if full => after = last.id,
            _ => return Ok(found),
        }
    }
}

/// GDPR erasure of the dead letters mentioning the person; returns how many were deleted.
pub async fn erase_dead_letters(store: &dyn OperationalStore, target: &ErasureTarget) -> Result<u64, StoreError> {
    let ids = dead_letters_mentioning(store, target).await?;
    if ids.is_empty() {
        return Ok(0);
    }
    store.delete_dead_letters(&ids).await
}

/// Every review item, whatever its status, read a page at a time.
pub async fn all_review_items(store: &dyn OperationalStore) -> Result<Vec<ReviewItem>, StoreError> {
    let mut out: Vec<ReviewItem> = Vec::new();
    loop {
        let after = out.last().map(|i| i.id.clone());
        let page = store.list_review_items(None, after.as_deref(), PAGE).await?;
        let full = page.len() == PAGE;
        out.extend(page);
        if !full {
            return Ok(out);
        }
    }
}

/// The stored key of a document: its collection, a separator no key contains, its key.
pub fn document_key(collection: &str, key: &str) -> String {
    format!("{collection}\u{1}{key}")
}

/// The stored keys a document listing covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentRange {
    pub lower: String,
    /// Whether `lower` itself is in the range (no `after`, or `after` before the prefix).
    pub inclusive: bool,
    /// Exclusive.
    pub upper: String,
    /// Bytes to strip from a stored key to get the document's key.
    pub strip: usize,
}

impl DocumentRange {
    pub fn new(collection: &str, prefix: &str, after: Option<&str>) -> Self {
        let (lower, inclusive) = match after {
            Some(a) if a >= prefix => (document_key(collection, a), false),
            // Everything with the prefix: the prefix itself sorts first.
            _ => (format!("{collection}\u{1}{prefix}"), true),
        };
        Self {
            lower,
            inclusive,
            upper: format!("{collection}\u{1}{prefix}\u{10FFFF}"),
            strip: document_key(collection, "").len(),
        }
    }

    /// The document's key of a stored key.
    pub fn key_of(&self, stored: &str) -> String {
        stored.get(self.strip..).unwrap_or_default().to_string()
    }
}

/// Key of a suppression entry: `channel:address`.
pub fn suppression_key(channel: Channel, address: &str) -> String {
    format!("{}:{address}", channel.as_str())
}

/// Key of a consent decision: `profile/purpose/channel` (a profile's decisions share a prefix).
pub fn consent_key(c: &ConsentRecord) -> String {
    format!("{}/{}/{}", c.profile_id, c.purpose, c.channel.as_str())
}
