//! Personal data at rest: a decorator around any [`OperationalStore`] that seals email, phone,
//! names and message text with the data key before they are written, opens them when read, and
//! replaces identifiers by keyed hashes where the store looks them up (the identity graph, the
//! suppression list). The backends below never see those values in the clear, and the shared
//! store suite runs through this decorator as through any backend.
//!
//! Sealing walks the JSON form of each record, so new record types are covered by naming their
//! personal fields in `PII_KEYS`, not by new code. Profiles and outbox batches, sealed on every
//! flush, are sealed field by field instead, at the same places (tests compare the two).

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cohort_messages::{
    msgs::IdentityMerged, AuditEntry, Channel, ConsentRecord, DeadLetter, ErasureCounts, ErasureTarget, Identifier,
    IdentifierKind, LedgerEntry, NewAuditEntry, ProfileId, ProfileRecord, ReviewItem, ReviewStatus, SagaRecord,
    Suppression,
};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::{Map, Value};

use crate::crypto::{is_sealed, Envelope, KeyedHasher};
use crate::store::{dead_letters_mentioning, FlushBatch, NewDeadLetter, OperationalStore, OutboxId};
use crate::warehouse::WarehouseBatch;
use crate::StoreError;

/// Field names (lower-cased, without `_`) whose string values are personal data wherever they
/// appear: traits, event properties, review evidence, stored activation snapshots.
const PII_KEYS: &[&str] = &[
    "email",
    "phone",
    "mobilephone",
    "firstname",
    "lastname",
    "name",
    "fullname",
    "profilename",
    "body",
    "message",
    "text",
    "street",
    "address",
    "dateofbirth",
    "birthday",
];

/// Whether a field name is personal, ignoring case and underscores (`First_Name`). Called for
/// every key of every record sealed by a flush (5% of the event path's CPU when it folded
/// Unicode for every key), so an ASCII name is folded into a stack buffer first.
fn is_pii_key(key: &str) -> bool {
    let mut folded = [0u8; PII_KEY_MAX];
    let mut len = 0;
    // Every personal name is ASCII and at most PII_KEY_MAX long: anything else rules a key out.
    let mut push = |l: char| match (folded.get_mut(len), l.is_ascii()) {
        (Some(slot), true) => {
            *slot = l as u8;
            len += 1;
            true
        }
        _ => false,
    };
    for c in key.chars().filter(|c| *c != '_') {
        // Unicode folding can turn a non-ASCII letter into an ASCII one (`K`, Kelvin).
        let kept = if c.is_ascii() { push(c.to_ascii_lowercase()) } else { c.to_lowercase().all(&mut push) };
        if !kept {
            return false;
        }
    }
    PII_KEYS.iter().any(|pii| pii.as_bytes() == &folded[..len])
}

/// The longest name in [`PII_KEYS`].
const PII_KEY_MAX: usize = 11;

/// Identifier kinds whose values are personal data (the others are pseudonymous ids).
pub fn is_pii_kind(kind: IdentifierKind) -> bool {
    matches!(kind, IdentifierKind::Email | IdentifierKind::Phone | IdentifierKind::WhatsappId)
}

fn is_pii_kind_name(kind: &str) -> bool {
    matches!(kind, "email" | "phone" | "whatsapp_id")
}

/// Calls `f` on every personal string in a JSON tree: values of [`PII_KEYS`] (or their
/// `{"value": ...}` when the field holds a trait), and `value` of `{"kind": "email", ...}`.
fn each_personal(v: &mut Value, f: &mut impl FnMut(&mut String)) {
    match v {
        Value::Object(m) => each_personal_in(m, f),
        Value::Array(a) => a.iter_mut().for_each(|c| each_personal(c, f)),
        _ => {}
    }
}

/// The parts of an outbox batch that sealing covers, named once for sealing and opening: strings
/// sealed whole (raw payloads, event names), and JSON fields whose personal strings are sealed.
fn batch_parts(batch: &mut WarehouseBatch) -> (Vec<&mut String>, Vec<&mut Value>) {
    let mut whole: Vec<&mut String> = batch.bronze.iter_mut().map(|r| &mut r.payload).collect();
    let mut json: Vec<&mut Value> = Vec::new();
    for r in &mut batch.silver {
        whole.extend(r.name.as_mut());
        json.extend([&mut r.identifiers, &mut r.traits, &mut r.properties, &mut r.utm]);
    }
    for r in &mut batch.gold_rows {
        json.extend([&mut r.identifiers, &mut r.traits]);
    }
    (whole, json)
}

/// [`each_personal`] on one JSON object.
fn each_personal_in(m: &mut Map<String, Value>, f: &mut impl FnMut(&mut String)) {
    let identifier = m.get("kind").and_then(Value::as_str).is_some_and(is_pii_kind_name);
    for (k, child) in m.iter_mut() {
        if identifier && k == "value" {
            if let Value::String(s) = child {
                f(s);
            }
        } else if is_pii_key(k) {
            match child {
                Value::String(s) => f(s),
                Value::Object(o) => match o.get_mut("value") {
                    Some(Value::String(s)) => f(s),
                    _ => each_personal(child, f),
                },
                other => each_personal(other, f),
            }
        } else {
            each_personal(child, f);
        }
    }
}

fn each_string(v: &mut Value, f: &mut impl FnMut(&mut String)) {
    match v {
        Value::String(s) => f(s),
        Value::Object(m) => m.values_mut().for_each(|c| each_string(c, f)),
        Value::Array(a) => a.iter_mut().for_each(|c| each_string(c, f)),
        _ => {}
    }
}

/// The data key's two uses: sealing (reversible) and keyed hashing (look-ups, tokens).
pub struct Pii {
    envelope: Arc<Envelope>,
    hasher: KeyedHasher,
}

impl std::fmt::Debug for Pii {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pii")
    }
}

fn codec(e: impl std::fmt::Display) -> StoreError {
    StoreError::invalid(format!("sealing personal data: {e}"))
}

impl Pii {
    pub fn new(envelope: Arc<Envelope>) -> Self {
        let hasher = KeyedHasher::derive(&envelope);
        Self { envelope, hasher }
    }

    /// Seals a string unless it already is.
    fn seal_str(&self, s: &mut String) {
        if !s.is_empty() && !is_sealed(s) {
            *s = self.envelope.seal(s);
        }
    }

    fn open_str(&self, s: &mut String) -> Result<(), StoreError> {
        if is_sealed(s) {
            *s = self.envelope.open(s).map_err(|e| StoreError::corrupt(format!("cannot open a sealed value: {e}")))?;
        }
        Ok(())
    }

    /// The record with its personal strings sealed.
    pub fn seal<T: Serialize + DeserializeOwned>(&self, record: &T) -> Result<T, StoreError> {
        let mut v = serde_json::to_value(record).map_err(codec)?;
        each_personal(&mut v, &mut |s| self.seal_str(s));
        serde_json::from_value(v).map_err(codec)
    }

    /// The record with every sealed string opened (whatever field it is in).
    pub fn open<T: Serialize + DeserializeOwned>(&self, record: T) -> Result<T, StoreError> {
        let v = serde_json::to_value(&record).map_err(codec)?;
        serde_json::from_value(self.open_json(v)?).map_err(codec)
    }

    fn open_json(&self, mut v: Value) -> Result<Value, StoreError> {
        self.open_strings(&mut v)?;
        Ok(v)
    }

    /// Opens every sealed string in a JSON tree.
    fn open_strings(&self, v: &mut Value) -> Result<(), StoreError> {
        let mut failed = None;
        each_string(v, &mut |s| {
            if let Err(e) = self.open_str(s) {
                failed = Some(e);
            }
        });
        failed.map_or(Ok(()), Err)
    }

    /// The identifier as the store keys it: personal kinds by keyed hash, others as they are.
    pub fn lookup_key(&self, id: &Identifier) -> Identifier {
        if is_pii_kind(id.kind) {
            Identifier::new(id.kind, self.hasher.hash(id.kind.as_str(), &id.value))
        } else {
            id.clone()
        }
    }

    /// A stable pseudonym for the warehouse (`tok_...`): joins work, reading does not.
    pub fn token(&self, kind: &str, value: &str) -> String {
        self.hasher.token(kind, value)
    }

    /// Replaces personal strings by tokens (`tok_...`), keyed by field so equal values in one
    /// field join. For warehouse rows.
    pub fn tokenize(&self, v: &mut Value) {
        each_personal(v, &mut |s| {
            if !s.is_empty() && !s.starts_with("tok_") {
                *s = self.hasher.token("pii", s);
            }
        });
    }

    pub fn seal_text(&self, s: &str) -> String {
        self.envelope.seal(s)
    }

    pub fn open_text(&self, s: &str) -> Result<String, StoreError> {
        let mut s = s.to_string();
        self.open_str(&mut s)?;
        Ok(s)
    }

    /// Seals an outbox batch field by field: the same values [`Pii::seal`] would seal (the
    /// event name, personal strings of identifiers, traits, properties and UTM fields) plus the
    /// raw payload, without a round trip of every row through a JSON tree.
    fn seal_batch(&self, mut sealed: WarehouseBatch) -> WarehouseBatch {
        let (whole, json) = batch_parts(&mut sealed);
        whole.into_iter().for_each(|s| self.seal_str(s));
        for v in json {
            each_personal(v, &mut |s| self.seal_str(s));
        }
        sealed
    }

    /// Opens what [`Pii::seal_batch`] sealed.
    fn open_batch(&self, mut batch: WarehouseBatch) -> Result<WarehouseBatch, StoreError> {
        let (whole, json) = batch_parts(&mut batch);
        whole.into_iter().try_for_each(|s| self.open_str(s))?;
        json.into_iter().try_for_each(|v| self.open_strings(v))?;
        Ok(batch)
    }

    /// Seals a profile in place, field by field: what the generic walk of [`Pii::seal`] seals
    /// (personal identifier values, personal traits, event names and personal properties in the
    /// history, the same inside the merge ledger), without a round trip through a JSON tree,
    /// which cost a tenth of the pipeline's CPU. Timestamps are never sealed: the generic walk
    /// sealed the entry time of a segment named like a personal field (`email`), which then no
    /// longer parsed as a time, so sealing, and every flush holding such a member, failed.
    fn seal_profile(&self, r: &mut ProfileRecord) -> Result<(), StoreError> {
        // Every field named, so a new one is a compile error here until someone decides
        // whether it holds personal data.
        let ProfileRecord {
            profile_id: _,
            created_at: _,
            updated_at: _,
            identifiers,
            traits,
            counters: _,
            recent_events,
            applied_seqs: _,
            merged_into: _,
            merged_from: _,
            ledger,
            kept_apart: _,
            activity: _,
            consent: _,
            segments: _,
        } = r;
        let seal = &mut |s: &mut String| self.seal_str(s);
        for linked in identifiers {
            if is_pii_kind(linked.identifier.kind) {
                seal(&mut linked.identifier.value);
            }
        }
        for (key, t) in traits {
            match &mut t.value {
                Value::String(s) if is_pii_key(key) => seal(s),
                other => each_personal(other, seal),
            }
        }
        for e in recent_events {
            if let Some(name) = &mut e.name {
                seal(name);
            }
            each_personal_in(&mut e.properties, seal);
        }
        if let Some(ledger) = ledger {
            self.seal_profile(&mut ledger.base)?;
            for entry in &mut ledger.entries {
                match entry {
                    LedgerEntry::Merging { .. } => {}
                    LedgerEntry::Applied { event, .. } => **event = self.seal(&**event)?,
                    LedgerEntry::Absorbed { record } => self.seal_profile(record)?,
                }
            }
        }
        Ok(())
    }

    /// Opens in place what [`Pii::seal_profile`], or before it the generic walk, sealed.
    fn open_profile(&self, r: &mut ProfileRecord) -> Result<(), StoreError> {
        for linked in &mut r.identifiers {
            self.open_str(&mut linked.identifier.value)?;
        }
        for t in r.traits.values_mut() {
            self.open_strings(&mut t.value)?;
        }
        for e in &mut r.recent_events {
            if let Some(name) = &mut e.name {
                self.open_str(name)?;
            }
            e.properties.values_mut().try_for_each(|v| self.open_strings(v))?;
        }
        if let Some(ledger) = &mut r.ledger {
            self.open_profile(&mut ledger.base)?;
            for entry in &mut ledger.entries {
                match entry {
                    LedgerEntry::Merging { .. } => {}
                    LedgerEntry::Applied { event, .. } => **event = self.open((**event).clone())?,
                    LedgerEntry::Absorbed { record } => self.open_profile(record)?,
                }
            }
        }
        Ok(())
    }

    fn seal_letter(&self, mut l: NewDeadLetter) -> NewDeadLetter {
        self.seal_str(&mut l.payload);
        self.seal_str(&mut l.reason);
        l
    }

    fn open_letter(&self, mut l: DeadLetter) -> Result<DeadLetter, StoreError> {
        self.open_str(&mut l.payload)?;
        self.open_str(&mut l.reason)?;
        Ok(l)
    }

    fn hashed_target(&self, target: &ErasureTarget) -> ErasureTarget {
        ErasureTarget {
            profiles: target.profiles.clone(),
            identifiers: target.identifiers.iter().map(|i| self.lookup_key(i)).collect(),
            contact_emails: Vec::new(),
        }
    }

    fn suppression_key(&self, channel: Channel, address: &str) -> String {
        self.hasher.hash(channel.as_str(), address)
    }
}

/// Runs sealing or opening of many records on the blocking pool: on an async worker it would
/// hold up every actor and request scheduled there.
async fn off_workers<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| StoreError::unavailable(format!("{what} task failed: {e}")))?
}

/// An [`OperationalStore`] whose backend never holds personal data in the clear.
pub struct SealedStore {
    inner: Arc<dyn OperationalStore>,
    pii: Arc<Pii>,
}

impl SealedStore {
    pub fn new(inner: Arc<dyn OperationalStore>, pii: Arc<Pii>) -> Self {
        Self { inner, pii }
    }
}

#[async_trait]
impl OperationalStore for SealedStore {
    async fn load_profile(&self, id: &ProfileId) -> Result<Option<ProfileRecord>, StoreError> {
        self.inner.load_profile(id).await?.map(|mut r| self.pii.open_profile(&mut r).map(|()| r)).transpose()
    }

    async fn lookup_identity(&self, identifier: &Identifier) -> Result<Option<ProfileId>, StoreError> {
        self.inner.lookup_identity(&self.pii.lookup_key(identifier)).await
    }

    async fn lookup_identities(&self, identifiers: &[Identifier]) -> Result<Vec<Option<ProfileId>>, StoreError> {
        let keys: Vec<Identifier> = identifiers.iter().map(|i| self.pii.lookup_key(i)).collect();
        self.inner.lookup_identities(&keys).await
    }

    async fn claim_identities(&self, claims: &[(Identifier, ProfileId)]) -> Result<Vec<ProfileId>, StoreError> {
        let keyed: Vec<(Identifier, ProfileId)> =
            claims.iter().map(|(i, p)| (self.pii.lookup_key(i), p.clone())).collect();
        self.inner.claim_identities(&keyed).await
    }

    async fn commit_flush(&self, batch: FlushBatch) -> Result<(), StoreError> {
        let pii = self.pii.clone();
        // A large flush seals thousands of values: off the async workers, so it never stalls
        // ingest or the Profile API.
        let sealed = off_workers("sealing", move || {
            Ok(FlushBatch {
                identities: batch.identities.iter().map(|(i, p)| (pii.lookup_key(i), p.clone())).collect(),
                profiles: batch
                    .profiles
                    .into_iter()
                    .map(|mut p| pii.seal_profile(&mut p).map(|()| p))
                    .collect::<Result<_, _>>()?,
                merges: batch.merges.iter().map(|m| pii.seal(m)).collect::<Result<_, _>>()?,
                checkpoint: batch.checkpoint,
                event_ids: batch.event_ids,
                outbox: pii.seal_batch(batch.outbox),
            })
        })
        .await?;
        self.inner.commit_flush(sealed).await
    }

    async fn checkpoint(&self) -> Result<u64, StoreError> {
        self.inner.checkpoint().await
    }

    async fn seen_event_ids(&self, ids: &[String]) -> Result<Vec<bool>, StoreError> {
        self.inner.seen_event_ids(ids).await
    }

    async fn put_dead_letters(&self, letters: Vec<NewDeadLetter>) -> Result<Vec<u64>, StoreError> {
        self.inner.put_dead_letters(letters.into_iter().map(|l| self.pii.seal_letter(l)).collect()).await
    }

    async fn list_dead_letters(&self, after: u64, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.inner.list_dead_letters(after, limit).await?.into_iter().map(|l| self.pii.open_letter(l)).collect()
    }

    async fn count_dead_letters(&self) -> Result<u64, StoreError> {
        self.inner.count_dead_letters().await
    }

    async fn count_profiles(&self) -> Result<u64, StoreError> {
        self.inner.count_profiles().await
    }

    async fn list_profile_ids(&self, after: Option<&ProfileId>, limit: usize) -> Result<Vec<ProfileId>, StoreError> {
        self.inner.list_profile_ids(after, limit).await
    }

    async fn list_merges(&self, profile: &ProfileId) -> Result<Vec<IdentityMerged>, StoreError> {
        self.inner.list_merges(profile).await?.into_iter().map(|m| self.pii.open(m)).collect()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }

    async fn load_profiles(&self, ids: &[ProfileId]) -> Result<Vec<ProfileRecord>, StoreError> {
        let records = self.inner.load_profiles(ids).await?;
        let pii = self.pii.clone();
        off_workers("opening", move || records.into_iter().map(|mut r| pii.open_profile(&mut r).map(|()| r)).collect())
            .await
    }

    async fn read_outbox(&self, limit: usize) -> Result<Vec<(OutboxId, WarehouseBatch)>, StoreError> {
        let batches = self.inner.read_outbox(limit).await?;
        let pii = self.pii.clone();
        // Thousands of rows per read: opening them on an async worker stalled the Profile API
        // for hundreds of milliseconds while the warehouse caught up after a burst.
        off_workers("opening", move || batches.into_iter().map(|(id, b)| Ok((id, pii.open_batch(b)?))).collect()).await
    }

    async fn ack_outbox(&self, ids: &[OutboxId]) -> Result<(), StoreError> {
        self.inner.ack_outbox(ids).await
    }

    async fn outbox_len(&self) -> Result<u64, StoreError> {
        self.inner.outbox_len().await
    }

    fn max_raw_payload_bytes(&self) -> Option<usize> {
        self.inner.max_raw_payload_bytes()
    }

    async fn expire_before(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        self.inner.expire_before(before).await
    }

    async fn record_consents(&self, consents: Vec<ConsentRecord>) -> Result<(), StoreError> {
        self.inner.record_consents(consents).await
    }

    async fn consents(&self, profile: &ProfileId) -> Result<Vec<ConsentRecord>, StoreError> {
        self.inner.consents(profile).await
    }

    async fn suppress(&self, entries: Vec<Suppression>) -> Result<(), StoreError> {
        let hashed = entries
            .into_iter()
            .map(|e| Suppression { address: self.pii.suppression_key(e.channel, &e.address), ..e })
            .collect();
        self.inner.suppress(hashed).await
    }

    async fn unsuppress(&self, addresses: &[(Channel, String)]) -> Result<(), StoreError> {
        let hashed: Vec<(Channel, String)> =
            addresses.iter().map(|(c, a)| (*c, self.pii.suppression_key(*c, a))).collect();
        self.inner.unsuppress(&hashed).await
    }

    async fn suppressed(&self, addresses: &[(Channel, String)]) -> Result<Vec<Option<Suppression>>, StoreError> {
        let hashed: Vec<(Channel, String)> =
            addresses.iter().map(|(c, a)| (*c, self.pii.suppression_key(*c, a))).collect();
        let found = self.inner.suppressed(&hashed).await?;
        // The caller asked by address; it gets its address back, not the hash.
        Ok(found
            .into_iter()
            .zip(addresses)
            .map(|(s, (_, address))| s.map(|s| Suppression { address: address.clone(), ..s }))
            .collect())
    }

    async fn save_saga(&self, saga: &SagaRecord) -> Result<(), StoreError> {
        self.inner.save_saga(saga).await
    }

    async fn load_saga(&self, saga_id: &str) -> Result<Option<SagaRecord>, StoreError> {
        self.inner.load_saga(saga_id).await
    }

    async fn list_sagas(&self, after: Option<&str>, limit: usize) -> Result<Vec<SagaRecord>, StoreError> {
        self.inner.list_sagas(after, limit).await
    }

    async fn append_audit(&self, entries: Vec<NewAuditEntry>) -> Result<Vec<u64>, StoreError> {
        self.inner.append_audit(entries).await
    }

    async fn list_audit(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        self.inner.list_audit(after, limit).await
    }

    async fn put_review_items(&self, items: Vec<ReviewItem>) -> Result<(), StoreError> {
        self.inner.put_review_items(items.iter().map(|i| self.pii.seal(i)).collect::<Result<_, _>>()?).await
    }

    async fn review_item(&self, id: &str) -> Result<Option<ReviewItem>, StoreError> {
        self.inner.review_item(id).await?.map(|i| self.pii.open(i)).transpose()
    }

    async fn erase_person(&self, target: &ErasureTarget) -> Result<ErasureCounts, StoreError> {
        self.inner.erase_person(&self.pii.hashed_target(target)).await
    }

    async fn delete_dead_letters(&self, ids: &[u64]) -> Result<u64, StoreError> {
        self.inner.delete_dead_letters(ids).await
    }

    async fn person_remnants(&self, target: &ErasureTarget) -> Result<ErasureCounts, StoreError> {
        let mut counts = self.inner.person_remnants(&self.pii.hashed_target(target)).await?;
        // The backend cannot read sealed payloads; this store can.
        counts.dead_letters = dead_letters_mentioning(self, target).await?.len() as u64;
        Ok(counts)
    }

    async fn put_documents(&self, collection: &str, docs: Vec<(String, Option<Value>)>) -> Result<(), StoreError> {
        let sealed = docs
            .into_iter()
            .map(|(k, d)| {
                let d = d.map(|mut v| {
                    each_personal(&mut v, &mut |s| self.pii.seal_str(s));
                    v
                });
                (k, d)
            })
            .collect();
        self.inner.put_documents(collection, sealed).await
    }

    async fn get_documents(&self, collection: &str, keys: &[String]) -> Result<Vec<Option<Value>>, StoreError> {
        let found = self.inner.get_documents(collection, keys).await?;
        found.into_iter().map(|d| d.map(|v| self.pii.open_json(v)).transpose()).collect()
    }

    async fn list_documents(
        &self,
        collection: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Value)>, StoreError> {
        let found = self.inner.list_documents(collection, prefix, after, limit).await?;
        found.into_iter().map(|(k, v)| Ok((k, self.pii.open_json(v)?))).collect()
    }

    async fn list_review_items(
        &self,
        status: Option<ReviewStatus>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ReviewItem>, StoreError> {
        let items = self.inner.list_review_items(status, after, limit).await?;
        items.into_iter().map(|i| self.pii.open(i)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pii() -> Pii {
        Pii::new(Arc::new(Envelope::generate().0))
    }

    #[test]
    fn personal_strings_are_sealed_and_everything_else_is_kept() {
        let p = pii();
        let record = json!({
            "identifiers": [
                { "kind": "email", "value": "jana@uni.eu", "source": "web" },
                { "kind": "anonymous_id", "value": "anon-1" }
            ],
            "traits": { "first_name": { "value": "Jana", "source": "crm" }, "plan": { "value": "MBA" } },
            "history": [{ "properties": { "Body": "my passport is X1", "page": "/mba" }, "lastName": "Novak" }],
            "count": 3
        });
        let sealed: Value = p.seal(&record).unwrap();
        let text = sealed.to_string();
        for secret in ["jana@uni.eu", "Jana", "passport", "Novak"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        for kept in ["anon-1", "MBA", "/mba", "\"count\":3", "\"source\":\"crm\""] {
            assert!(text.contains(kept), "{kept} missing from {text}");
        }
        assert_eq!(p.seal(&sealed).unwrap(), sealed, "sealing is idempotent");
        assert_eq!(p.open(sealed).unwrap(), record);
    }

    #[test]
    fn look_up_keys_hash_personal_kinds_only_and_tokens_are_stable() {
        let p = pii();
        let email = Identifier::new(IdentifierKind::Email, "jana@uni.eu");
        let key = p.lookup_key(&email);
        assert!(key.value.starts_with("h1:") && key.kind == IdentifierKind::Email);
        assert_eq!(p.lookup_key(&email), key);
        let anon = Identifier::new(IdentifierKind::AnonymousId, "anon-1");
        assert_eq!(p.lookup_key(&anon), anon);
        let mut row = json!({ "email": "jana@uni.eu", "page": "/mba" });
        p.tokenize(&mut row);
        assert!(row["email"].as_str().unwrap().starts_with("tok_"));
        assert_eq!(row["page"], "/mba");
        let mut again = json!({ "email": "jana@uni.eu" });
        p.tokenize(&mut again);
        assert_eq!(again["email"], row["email"], "the same value gets the same token");
    }

    #[test]
    fn a_value_sealed_with_another_key_is_an_error_not_garbage() {
        let (a, b) = (pii(), pii());
        let sealed: Value = a.seal(&json!({ "email": "x@y.eu" })).unwrap();
        assert!(b.open(sealed).is_err());
    }

    fn opened(p: &Pii, mut r: ProfileRecord) -> Result<ProfileRecord, StoreError> {
        p.open_profile(&mut r).map(|()| r)
    }

    /// Every sealed string replaced by one marker, so two sealings (fresh nonces) compare.
    fn sealed_shape(mut v: Value) -> Value {
        each_string(&mut v, &mut |s| {
            if is_sealed(s) {
                *s = "<sealed>".into();
            }
        });
        v
    }

    #[test]
    fn outbox_batches_are_sealed_field_by_field_exactly_where_the_generic_walk_seals() {
        let p = pii();
        let batch: WarehouseBatch = serde_json::from_value(json!({
            "bronze": [{
                "raw_seq": 7, "source": "web", "format": "segment:batch", "content_type": "application/json",
                "received_at": "2026-11-28T10:00:00Z", "payload_encoding": "utf8",
                "payload": "{\"traits\":{\"email\":\"jana@uni.eu\"}}"
            }],
            "silver": [{
                "event_id": "evt-1", "profile_id": "prof_a", "source": "whatsapp", "kind": "track",
                "name": "Message Received", "occurred_at": "2026-11-28T10:00:00Z",
                "received_at": "2026-11-28T10:00:01Z",
                "identifiers": [{"kind": "email", "value": "jana@uni.eu"}, {"kind": "device_id", "value": "dev-9"},
                                {"kind": "whatsapp_id", "value": "whatsapp:+4915112345678"}],
                "traits": {"First_Name": "Jana", "programme": "MBA", "address": {"street": "Hauptstr. 1", "city": "Berlin"},
                           "phone": {"value": "+4915112345678", "source": "crm"}},
                "properties": {"body": "I want to enrol", "intent": "enrollment_inquiry", "tags": ["a", {"email": "x@y.eu"}]},
                "utm": {"source": "newsletter"}, "raw_seq": 7
            }, {
                "event_id": "evt-2", "profile_id": "prof_b", "source": "web", "kind": "page", "name": null,
                "occurred_at": "2026-11-28T10:00:00Z", "received_at": "2026-11-28T10:00:01Z",
                "identifiers": [], "traits": {}, "properties": {"path": "/mba"}, "utm": null, "raw_seq": null
            }],
            "gold": ["prof_a", "prof_b"],
            "gold_rows": [{
                "profile_id": "prof_c", "snapshot_at": "2026-11-28T10:00:02Z",
                "traits": {"email": "ana@uni.eu", "LastName": "Kowalska", "programme": "MSc Data"},
                "counters": {"events_total": 3, "by_source": {"crm": 1, "web": 2}},
                "identifiers": [{"kind": "phone", "value": "+48601234567", "source": "crm",
                                 "first_seen": "2026-11-28T10:00:00Z"},
                                {"kind": "anonymous_id", "value": "anon-c", "source": "web",
                                 "first_seen": "2026-11-28T10:00:00Z"}],
                "events_total": 3, "first_seen": "2026-11-28T10:00:00Z", "last_seen": "2026-11-28T10:00:02Z",
                "merged_into": null
            }]
        }))
        .unwrap();
        let typed = p.seal_batch(batch.clone());
        let mut generic = p.seal(&batch).unwrap();
        generic.bronze.iter_mut().for_each(|row| p.seal_str(&mut row.payload));
        let shape = |b: &WarehouseBatch| sealed_shape(serde_json::to_value(b).unwrap());
        assert_eq!(shape(&typed), shape(&generic));
        let text = serde_json::to_string(&typed).unwrap();
        for secret in [
            "jana@uni.eu",
            "Jana",
            "Hauptstr",
            "I want to enrol",
            "x@y.eu",
            "4915112345678",
            "Message Received",
            "ana@uni.eu",
            "Kowalska",
            "48601234567",
        ] {
            assert!(!text.contains(secret), "{secret} left in the clear");
        }
        for kept in
            ["dev-9", "MBA", "Berlin", "enrollment_inquiry", "newsletter", "/mba", "prof_a", "MSc Data", "anon-c"]
        {
            assert!(text.contains(kept), "{kept} should stay readable");
        }
        assert_eq!(p.open_batch(typed).unwrap(), batch);
        // Outbox entries written by the generic sealing still open.
        assert_eq!(p.open_batch(generic).unwrap(), batch);
        let mut tampered = p.seal_batch(batch);
        tampered.silver[0].traits["First_Name"] = json!(pii().seal_text("Jana"));
        assert!(p.open_batch(tampered).is_err(), "a value sealed with another key is an error");
    }

    fn event(n: u32, kind: &str) -> cohort_messages::CustomerEvent {
        serde_json::from_value(json!({
            "event_id": format!("web:e{n}"), "source": "web", "kind": kind, "name": "Applied Online",
            "occurred_at": "2026-11-28T10:00:00Z", "received_at": "2026-11-28T10:00:01Z",
            "identifiers": [{"kind": "email", "value": format!("jana{n}@uni.eu")}, {"kind": "device_id", "value": "dev-9"},
                            {"kind": "phone", "value": "+4915112345678"}],
            "traits": {"first_name": "Jana", "last_name": "Novak", "programme": "MBA",
                       "address": {"street": "Hauptstr. 1", "city": "Berlin"}},
            "properties": {"body": "I want to enrol", "page": "/mba", "nested": [{"email": "x@y.eu"}, "plain"],
                           "contact": {"kind": "whatsapp_id", "value": "whatsapp:+4915112345678"}},
            "utm": {"source": "newsletter"}, "raw": {"seq": 7, "index": 0}
        }))
        .unwrap()
    }

    /// A profile using every part of the record that can hold personal data, plus the parts
    /// that cannot, built by applying events as the pipeline does.
    fn rich_profile(n: u32) -> ProfileRecord {
        let id = ProfileId::derive_from_event(
            &cohort_messages::EventId::new(cohort_messages::Source::Web, &format!("p{n}")),
            Utc::now(),
        );
        let mut r = ProfileRecord::new(id, Utc::now());
        for (i, kind) in ["identify", "track", "page"].into_iter().enumerate() {
            r.apply(u64::from(n) * 10 + i as u64, &event(n * 10 + i as u32, kind), 10);
        }
        r.set_trait("phone", json!("+4915112345678"), cohort_messages::Source::Crm, Utc::now());
        r.consent.insert(
            "email".into(),
            serde_json::from_value(json!({"granted": true, "source": "web", "at": "2026-11-28T10:00:00Z"})).unwrap(),
        );
        r.segments.insert("mba_leads".into(), Utc::now());
        r
    }

    #[test]
    fn profiles_are_sealed_field_by_field_exactly_where_the_generic_walk_seals() {
        let p = pii();
        let mut record = rich_profile(1);
        record.ledger = Some(cohort_messages::MergeLedger {
            base: Box::new(rich_profile(2)),
            entries: vec![
                LedgerEntry::Merging { merged: rich_profile(3).profile_id },
                LedgerEntry::Applied { seq: 40, event: Box::new(event(4, "track")) },
                LedgerEntry::Absorbed { record: Box::new(rich_profile(5)) },
            ],
        });
        let mut typed = record.clone();
        p.seal_profile(&mut typed).unwrap();
        let generic = p.seal(&record).unwrap();
        let shape = |r: &ProfileRecord| sealed_shape(serde_json::to_value(r).unwrap());
        assert_eq!(shape(&typed), shape(&generic));
        let text = serde_json::to_string(&typed).unwrap();
        for secret in
            ["jana", "Jana", "Novak", "Hauptstr", "I want to enrol", "x@y.eu", "4915112345678", "Applied Online"]
        {
            assert!(!text.contains(secret), "{secret} left in the clear");
        }
        for kept in ["dev-9", "MBA", "Berlin", "/mba", "plain", "newsletter", "mba_leads", "\"source\":\"crm\""] {
            assert!(text.contains(kept), "{kept} should stay readable");
        }
        let mut again = typed.clone();
        p.seal_profile(&mut again).unwrap();
        assert_eq!(again, typed, "sealing is idempotent");
        assert_eq!(opened(&p, typed).unwrap(), record);
        // Records written by the generic sealing still open.
        assert_eq!(opened(&p, generic).unwrap(), record);
        let mut tampered = record.clone();
        p.seal_profile(&mut tampered).unwrap();
        tampered.recent_events[0].name = Some(pii().seal_text("Applied Online"));
        assert!(opened(&p, tampered).is_err(), "a value sealed with another key is an error");
    }

    #[test]
    fn a_segment_named_like_a_personal_field_keeps_its_entry_time() {
        let p = pii();
        let mut record = rich_profile(1);
        for name in ["email", "name", "phone"] {
            record.segments.insert(name.into(), Utc::now());
        }
        let mut sealed = record.clone();
        p.seal_profile(&mut sealed).unwrap();
        assert_eq!(sealed.segments, record.segments, "timestamps are not personal data");
        assert_eq!(opened(&p, sealed).unwrap(), record);
    }

    #[test]
    fn personal_field_names_match_whatever_their_case_and_underscores() {
        for key in ["email", "Email", "EMAIL", "first_name", "FirstName", "MobilePhone", "mobile_phone", "_phone_"] {
            assert!(is_pii_key(key), "{key}");
        }
        for key in ["", "_", "emails", "mail", "e", "phone_type", "first", "namespace", "page", "utm_source"] {
            assert!(!is_pii_key(key), "{key}");
        }
        // The longest names, and one letter more; names with other letters are folded too.
        for key in ["date_of_birth", "DateOfBirth", "mobile_phone", "profile_name", "Émail", "ＥＭＡＩＬ"] {
            assert_eq!(is_pii_key(key), key.is_ascii(), "{key}");
        }
        for key in ["dateofbirths", "mobilephone2", "a_very_long_field_name_indeed"] {
            assert!(!is_pii_key(key), "{key}");
        }
        assert!(PII_KEYS.iter().all(|k| k.len() <= PII_KEY_MAX && k.bytes().all(|b| b.is_ascii_lowercase())));
        assert!(PII_KEYS.iter().any(|k| k.len() == PII_KEY_MAX));
    }
}
