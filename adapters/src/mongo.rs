//! The MongoDB backend of the operational store: profiles, the identity graph, merges, dead
//! letters and the pipeline checkpoint in one database (document layouts: `mongo/codec.rs`).
//!
//! Only [`OperationalStore`]: in production the journal is the event bus (Kafka), so there is no
//! MongoDB `EventLog`. Flushes are batched with `bulkWrite` (MongoDB 8.0+), because one round trip
//! per profile would cap the pipeline at a few thousand profiles per second; the checkpoint is
//! written only after everything else of its flush, so a failure half-way never moves replay
//! start past data that is not stored. Every write is an idempotent upsert or an insert whose
//! duplicate is harmless (event ids, outbox rows), so retrying a failed flush is always safe.

mod codec;
mod errors;

use std::fmt;
use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cohort_messages::{
    msgs::IdentityMerged, DeadLetter, ErasureCounts, ErasureTarget, Identifier, ProfileId, ProfileRecord,
};
use futures::TryStreamExt;
use mongodb::bson::{doc, oid::ObjectId, spec::BinarySubtype, Binary, Bson, Document};
use mongodb::options::{ClientOptions, InsertOneModel, ReplaceOneModel, ReturnDocument, UpdateOneModel, WriteModel};
use mongodb::{Client, Collection, Database, IndexModel, Namespace};

use self::codec::{
    as_u64, dead_letter_doc, dead_letter_from_doc, identity_doc, merge_docs, merge_from_doc, outbox_docs,
    outbox_from_doc, profile_doc, profile_from_doc, profile_id_of, record_doc, record_from_doc, to_i64, AUDIT,
    CONSENTS, DEAD_LETTERS, DOCUMENTS, EVENT_IDS, IDENTITIES, MERGES, META, META_AUDIT_ID, META_CHECKPOINT,
    META_DEAD_LETTER_ID, OUTBOX, OUTBOX_DOC_BYTES, PROFILES, REVIEWS, SAGAS, SUPPRESSIONS,
};
use self::errors::{store_error, DUPLICATE_KEY};
use crate::store::{consent_key, document_key, suppression_key, DocumentRange};
use crate::{FlushBatch, NewDeadLetter, OperationalStore, OutboxId, StoreError, WarehouseBatch};
use cohort_messages::{
    AuditEntry, Channel, ConsentRecord, NewAuditEntry, ReviewItem, ReviewStatus, SagaRecord, Suppression,
};

/// Rows of outbox data per outbox document, well under MongoDB's 16 MB document limit.
const OUTBOX_DOC_ROWS: usize = 1000;
/// See [`OperationalStore::max_raw_payload_bytes`] on [`MongoStore`].
const MAX_RAW_PAYLOAD_BYTES: usize = 8 << 20;

/// How long the driver looks for a usable server before an operation fails: an unreachable
/// database must turn into a quick, retryable `Unavailable` (and a failing readiness probe),
/// not a request that hangs. Applied unless the URL sets its own.
pub const SERVER_SELECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP + TLS handshake limit for one connection (unless the URL sets `connectTimeoutMS`).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound on one operation (one bulk chunk, one query with its cursor): a server that
/// accepts connections but never answers must not stall the pipeline forever.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Write models per `bulkWrite` call: large enough to amortise round trips, small enough that
/// one call stays well inside the operation timeout and the 48 MB message limit.
pub const BULK_CHUNK: usize = 1000;
/// Attempts at reserving dead-letter ids when the server answers an increment without its result.
const RESERVE_ATTEMPTS: usize = 3;

/// The MongoDB [`OperationalStore`]. Cheap to share as `Arc<MongoStore>`; the driver pools
/// connections internally.
pub struct MongoStore {
    client: Client,
    db: Database,
    profiles: Collection<Document>,
    identities: Collection<Document>,
    merges: Collection<Document>,
    /// Ids of events whose effects are persisted (idempotency keys for buses that redeliver).
    event_ids: Collection<Document>,
    dead_letters: Collection<Document>,
    meta: Collection<Document>,
    outbox: Collection<Document>,
    consents: Collection<Document>,
    suppressions: Collection<Document>,
    sagas: Collection<Document>,
    audit: Collection<Document>,
    reviews: Collection<Document>,
    documents: Collection<Document>,
}

impl fmt::Debug for MongoStore {
    /// Names the database only: the URL may carry credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MongoStore").field("database", &self.db.name()).finish_non_exhaustive()
    }
}

impl MongoStore {
    /// Connects to `url` (`mongodb://...` or `mongodb+srv://...`), checks the server answers and
    /// creates the indexes (idempotent), so a misconfigured store fails at startup.
    ///
    /// An unreachable server gives `Unavailable` after about [`SERVER_SELECTION_TIMEOUT`]; a
    /// malformed URL or database name gives `Invalid`.
    pub async fn connect(url: &str, database: &str) -> Result<Arc<Self>, StoreError> {
        if !(url.starts_with("mongodb://") || url.starts_with("mongodb+srv://")) {
            return Err(StoreError::invalid(
                "MongoDB url must start with mongodb:// or mongodb+srv:// (e.g. mongodb://127.0.0.1:27017)",
            ));
        }
        validate_database_name(database)?;
        // Parsing resolves SRV and TXT records for mongodb+srv://, so it can hang on DNS too.
        let mut options = timed("parse the MongoDB url", ClientOptions::parse(url)).await?;
        options.server_selection_timeout.get_or_insert(SERVER_SELECTION_TIMEOUT);
        options.connect_timeout.get_or_insert(CONNECT_TIMEOUT);
        options.app_name.get_or_insert_with(|| "cohort".to_string());
        let client = Client::with_options(options).map_err(|e| store_error("create the MongoDB client", e))?;
        let db = client.database(database);
        let store = Self {
            profiles: db.collection(PROFILES),
            identities: db.collection(IDENTITIES),
            merges: db.collection(MERGES),
            event_ids: db.collection(EVENT_IDS),
            dead_letters: db.collection(DEAD_LETTERS),
            meta: db.collection(META),
            outbox: db.collection(OUTBOX),
            consents: db.collection(CONSENTS),
            suppressions: db.collection(SUPPRESSIONS),
            sagas: db.collection(SAGAS),
            audit: db.collection(AUDIT),
            reviews: db.collection(REVIEWS),
            documents: db.collection(DOCUMENTS),
            db,
            client,
        };
        store.ping().await?;
        store.create_indexes().await?;
        store.seed_counter(META_DEAD_LETTER_ID).await?;
        store.seed_counter(META_AUDIT_ID).await?;
        tracing::info!(database, "MongoDB operational store connected");
        Ok(Arc::new(store))
    }

    /// The database this store lives in.
    pub fn database_name(&self) -> &str {
        self.db.name()
    }

    /// Drops the whole database: for tests, each of which uses a database of its own.
    pub async fn drop_database(&self) -> Result<(), StoreError> {
        timed("drop the database", self.db.drop()).await
    }

    /// `_id` already indexes every natural key (profile id, `kind:value`, merge key, dead-letter
    /// id); these serve the other access paths.
    async fn create_indexes(&self) -> Result<(), StoreError> {
        // The reverse lookup, all identifiers of one profile: what a merge has to re-point.
        let by_profile = IndexModel::builder().keys(doc! { "profile_id": 1 }).build();
        timed("create the identities index", self.identities.create_index(by_profile)).await?;
        // A profile's merges in seq order (the `_id` suffix) without a sort in memory.
        let by_profile = IndexModel::builder().keys(doc! { "profile": 1, "_id": 1 }).build();
        timed("create the merges index", self.merges.create_index(by_profile)).await?;
        // Expiry deletes idempotency keys by age.
        let by_age = IndexModel::builder().keys(doc! { "at": 1 }).build();
        timed("create the event ids index", self.event_ids.create_index(by_age)).await?;
        let by_profile = IndexModel::builder().keys(doc! { "profile_id": 1, "_id": 1 }).build();
        timed("create the consents index", self.consents.create_index(by_profile)).await?;
        let by_status = IndexModel::builder().keys(doc! { "status": 1, "_id": 1 }).build();
        timed("create the review queue index", self.reviews.create_index(by_status)).await?;
        let by_status = IndexModel::builder().keys(doc! { "status": 1 }).build();
        timed("create the sagas index", self.sagas.create_index(by_status)).await?;
        Ok(())
    }

    /// Runs ordered upserts in chunks of [`BULK_CHUNK`]; stops at the first failure.
    async fn bulk_upsert(&self, mut models: Vec<WriteModel>) -> Result<(), StoreError> {
        let mut offset = 0;
        while !models.is_empty() {
            let rest = models.split_off(models.len().min(BULK_CHUNK));
            let chunk = std::mem::replace(&mut models, rest);
            let len = chunk.len();
            timed("write the flush", self.client.bulk_write(chunk).ordered(true)).await.map_err(|mut e| {
                e.message.push_str(&format!(" (in the chunk starting at write {offset})"));
                e
            })?;
            offset += len;
        }
        Ok(())
    }

    /// Records applied event ids as plain inserts: an upsert costs the database about four times
    /// an insert (BENCHMARKS, session 11), and an id is only ever written once unless a flush is
    /// retried, when the id already there is exactly what is wanted. So duplicate-key refusals are
    /// success; any other failure fails the flush (and it is retried).
    async fn record_event_ids(&self, ids: &[String]) -> Result<(), StoreError> {
        let at = mongodb::bson::DateTime::now();
        for chunk in ids.chunks(BULK_CHUNK) {
            let docs = chunk.iter().map(|id| doc! { "_id": id.as_str(), "at": at });
            const ACTION: &str = "record applied event ids";
            match answered(ACTION, self.event_ids.insert_many(docs).ordered(false)).await? {
                Ok(_) => {}
                Err(e) if only_duplicate_keys(&e) => {}
                Err(e) => return Err(store_error(ACTION, e)),
            }
        }
        Ok(())
    }

    /// Creates a counter (`meta` document) if it is missing, before any concurrent use:
    /// concurrent `findAndModify` upserts racing to create one document can answer "no document"
    /// although their `$inc` was applied (seen on SecantusDB), which would cost a retry and a gap.
    async fn seed_counter(&self, counter: &'static str) -> Result<(), StoreError> {
        let seed =
            self.meta.update_one(doc! { "_id": counter }, doc! { "$setOnInsert": { "value": 0_i64 } }).upsert(true);
        timed("create a counter", seed).await.map(drop)
    }

    /// Reserves `n` consecutive ids of a counter and returns the first: one atomic `$inc` per
    /// batch, so concurrent writers (also in other processes) never share an id.
    async fn reserve_ids(&self, counter: &'static str, n: u64) -> Result<u64, StoreError> {
        let step = to_i64("id batch size", n)?;
        for _ in 0..RESERVE_ATTEMPTS {
            let reserve = self
                .meta
                .find_one_and_update(doc! { "_id": counter }, doc! { "$inc": { "value": step } })
                .upsert(true)
                .return_document(ReturnDocument::After);
            // No answer: the increment may still have happened, so those ids are skipped (a gap),
            // never guessed; a fresh `$inc` gets a block nobody else has.
            let Some(doc) = timed("reserve ids", reserve).await? else { continue };
            let last = as_u64(counter, doc.get("value"))?;
            return last.checked_sub(n).map(|before| before + 1).ok_or_else(|| {
                StoreError::corrupt(format!("counter {counter} at {last} is below the batch size {n}"))
            });
        }
        Err(StoreError::unavailable(format!("MongoDB: the counter {counter} did not answer with its new value")))
    }

    /// Upserts documents by `_id` in one bulk write.
    async fn upsert_docs(&self, collection: &Collection<Document>, docs: Vec<Document>) -> Result<(), StoreError> {
        if docs.is_empty() {
            return Ok(());
        }
        let ns = collection.namespace();
        let models = docs.into_iter().map(|d| replace_one(&ns, d)).collect::<Result<Vec<_>, _>>()?;
        self.bulk_upsert(models).await
    }

    /// Runs a find with sort and limit and decodes every document; `limit == 0` is "nothing",
    /// not MongoDB's "no limit".
    /// The filters selecting one person's documents, per collection (GDPR erasure).
    fn person_filters(target: &ErasureTarget) -> [(&'static str, Document); 5] {
        let ids: Vec<&str> = target.profiles.iter().map(ProfileId::as_str).collect();
        let keys: Vec<String> = target.identifiers.iter().map(Identifier::key).collect();
        [
            ("profiles", doc! { "_id": { "$in": ids.clone() } }),
            ("identities", doc! { "$or": [ { "_id": { "$in": keys } }, { "profile_id": { "$in": ids.clone() } } ] }),
            (
                "merges",
                doc! { "$or": [
                    { "profile": { "$in": ids.clone() } },
                    { "merge.survivor": { "$in": ids.clone() } },
                    { "merge.merged": { "$in": ids.clone() } },
                ] },
            ),
            ("consents", doc! { "profile_id": { "$in": ids.clone() } }),
            ("review_items", doc! { "profiles": { "$in": ids } }),
        ]
    }

    fn person_collection(&self, name: &str) -> &Collection<Document> {
        match name {
            "profiles" => &self.profiles,
            "identities" => &self.identities,
            "merges" => &self.merges,
            "consents" => &self.consents,
            _ => &self.reviews,
        }
    }

    async fn find_sorted<T>(
        &self,
        action: &'static str,
        collection: &Collection<Document>,
        filter: Document,
        projection: Option<Document>,
        limit: Option<usize>,
        decode: impl Fn(Document) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        if limit == Some(0) {
            return Ok(Vec::new());
        }
        let docs: Vec<Document> = timed(action, async {
            let find = collection.find(filter).sort(doc! { "_id": 1 });
            let find = match projection {
                Some(projection) => find.projection(projection),
                None => find,
            };
            let find = match limit {
                Some(limit) => find.limit(i64::try_from(limit).unwrap_or(i64::MAX)),
                None => find,
            };
            find.await?.try_collect().await
        })
        .await?;
        docs.into_iter().map(decode).collect()
    }
}

/// Adds one collection's count (named as in `person_filters`) to an erasure account.
fn count_into(counts: &mut ErasureCounts, collection: &str, n: u64) {
    match collection {
        "profiles" => counts.profiles = n,
        "identities" => counts.identities = n,
        "merges" => counts.merges = n,
        "consents" => counts.consents = n,
        _ => counts.review_items = n,
    }
}

/// Runs a driver operation under [`OPERATION_TIMEOUT`], mapping both failure kinds.
async fn timed<T, F>(action: &'static str, operation: F) -> Result<T, StoreError>
where
    F: IntoFuture<Output = mongodb::error::Result<T>>,
    F::IntoFuture: Future<Output = mongodb::error::Result<T>>,
{
    answered(action, operation).await?.map_err(|e| store_error(action, e))
}

/// The driver's own result, or unavailable when MongoDB gives no answer in time.
async fn answered<T, F>(action: &'static str, operation: F) -> Result<mongodb::error::Result<T>, StoreError>
where
    F: IntoFuture<Output = mongodb::error::Result<T>>,
    F::IntoFuture: Future<Output = mongodb::error::Result<T>>,
{
    tokio::time::timeout(OPERATION_TIMEOUT, operation.into_future()).await.map_err(|_| {
        StoreError::unavailable(format!("MongoDB: cannot {action}: no answer within {} s", OPERATION_TIMEOUT.as_secs()))
    })
}

/// A unique-index violation: for inserts that claim an id, someone else claimed it first.
fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    matches!(&*e.kind, ErrorKind::Write(WriteFailure::WriteError(w)) if w.code == DUPLICATE_KEY)
}

/// An unordered insert refused only because some of its `_id`s exist already.
fn only_duplicate_keys(e: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, InsertManyError};
    match &*e.kind {
        ErrorKind::InsertMany(InsertManyError { write_errors: Some(errors), write_concern_error: None, .. }) => {
            !errors.is_empty() && errors.iter().all(|w| w.code == DUPLICATE_KEY)
        }
        _ => is_duplicate_key(e),
    }
}

/// MongoDB refuses these names only at the first write; checking up front gives a clear error.
fn validate_database_name(name: &str) -> Result<(), StoreError> {
    let bad = name.is_empty() || name.len() > 63 || name.chars().any(|c| "/\\. \"$\0".contains(c));
    if bad {
        return Err(StoreError::invalid(format!(
            "`{name}` is not a valid MongoDB database name (1-63 characters, none of / \\ . space \" $)"
        )));
    }
    Ok(())
}

fn replace_one(namespace: &Namespace, doc: Document) -> Result<WriteModel, StoreError> {
    let id = doc.get("_id").cloned().ok_or_else(|| StoreError::invalid("MongoDB: a document to write has no _id"))?;
    Ok(ReplaceOneModel::builder()
        .namespace(namespace.clone())
        .filter(doc! { "_id": id })
        .replacement(doc)
        .upsert(true)
        .build()
        .into())
}

#[async_trait]
impl OperationalStore for MongoStore {
    async fn load_profile(&self, id: &ProfileId) -> Result<Option<ProfileRecord>, StoreError> {
        let found = timed("load a profile", self.profiles.find_one(doc! { "_id": id.as_str() })).await?;
        found.map(profile_from_doc).transpose()
    }

    async fn seen_event_ids(&self, ids: &[String]) -> Result<Vec<bool>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let cursor = timed(
            "look up event ids",
            self.event_ids.find(doc! { "_id": { "$in": ids.to_vec() } }).projection(doc! { "_id": 1 }),
        )
        .await?;
        let found: Vec<Document> = timed("read event ids", futures::TryStreamExt::try_collect(cursor)).await?;
        let seen: std::collections::HashSet<&str> = found.iter().filter_map(|d| d.get_str("_id").ok()).collect();
        Ok(ids.iter().map(|id| seen.contains(id.as_str())).collect())
    }

    async fn lookup_identity(&self, identifier: &Identifier) -> Result<Option<ProfileId>, StoreError> {
        let found = timed(
            "look up an identity",
            self.identities.find_one(doc! { "_id": identifier.key() }).projection(doc! { "profile_id": 1 }),
        )
        .await?;
        found.map(|doc| profile_id_of(&doc, "profile_id")).transpose()
    }

    async fn lookup_identities(&self, identifiers: &[Identifier]) -> Result<Vec<Option<ProfileId>>, StoreError> {
        if identifiers.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = identifiers.iter().map(Identifier::key).collect();
        let found = self
            .find_sorted(
                "look up identities",
                &self.identities,
                doc! { "_id": { "$in": keys.clone() } },
                Some(doc! { "profile_id": 1 }),
                None,
                |d| {
                    let key = d.get_str("_id").map_err(|_| StoreError::corrupt("an identity has no string _id"))?;
                    Ok((key.to_string(), profile_id_of(&d, "profile_id")?))
                },
            )
            .await?;
        let found: std::collections::HashMap<String, ProfileId> = found.into_iter().collect();
        Ok(keys.iter().map(|k| found.get(k).cloned()).collect())
    }

    async fn claim_identities(&self, claims: &[(Identifier, ProfileId)]) -> Result<Vec<ProfileId>, StoreError> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        // `$setOnInsert` on the unique `_id`: of two replicas claiming one identifier, the first
        // inserts and the other's upsert matches it and changes nothing.
        let identities = self.identities.namespace();
        let models = claims
            .iter()
            .map(|(identifier, profile)| {
                let mut fields = identity_doc(identifier, profile);
                fields.remove("_id");
                UpdateOneModel::builder()
                    .namespace(identities.clone())
                    .filter(doc! { "_id": identifier.key() })
                    .update(doc! { "$setOnInsert": fields })
                    .upsert(true)
                    .build()
                    .into()
            })
            .collect();
        self.bulk_upsert(models).await?;
        let ids: Vec<Identifier> = claims.iter().map(|(i, _)| i.clone()).collect();
        let owners = self.lookup_identities(&ids).await?;
        claims
            .iter()
            .zip(owners)
            .map(|((i, _), o)| {
                o.ok_or_else(|| StoreError::corrupt(format!("claimed identifier {} is not stored", i.kind)))
            })
            .collect()
    }

    /// Profiles first, then the identities pointing at them, then merges, then the checkpoint:
    /// after a failure half-way an identity may be missing (the replay from the checkpoint
    /// re-creates it) but never points at a profile that was not written.
    async fn commit_flush(&self, batch: FlushBatch) -> Result<(), StoreError> {
        // Encode everything before the first write, so a record that cannot be stored fails the
        // flush without writing any of it.
        let mut models = Vec::with_capacity(batch.profiles.len() + batch.identities.len() + 2 * batch.merges.len());
        let (profiles, identities, merges) =
            (self.profiles.namespace(), self.identities.namespace(), self.merges.namespace());
        for record in &batch.profiles {
            models.push(replace_one(&profiles, profile_doc(record)?)?);
        }
        for (identifier, profile) in &batch.identities {
            models.push(replace_one(&identities, identity_doc(identifier, profile))?);
        }
        for merge in &batch.merges {
            for doc in merge_docs(merge)? {
                models.push(replace_one(&merges, doc)?);
            }
        }
        // A retried flush inserts its outbox rows again; the warehouse's keys absorb that.
        let outbox = self.outbox.namespace();
        for bytes in outbox_docs(batch.outbox, OUTBOX_DOC_ROWS, OUTBOX_DOC_BYTES)? {
            let document = doc! {
                "_id": ObjectId::new(),
                "batch": Binary { subtype: BinarySubtype::Generic, bytes },
            };
            models.push(InsertOneModel::builder().namespace(outbox.clone()).document(document).build().into());
        }
        let checkpoint = batch.checkpoint.map(|c| to_i64("checkpoint", c)).transpose()?;

        let started = std::time::Instant::now();
        let writes = models.len() + batch.event_ids.len();
        self.bulk_upsert(models).await?;
        // After the effects, before the checkpoint: an id is only recorded once what it did is.
        self.record_event_ids(&batch.event_ids).await?;
        if let Some(checkpoint) = checkpoint {
            // `$max`: a late or replayed flush never moves replay start backwards.
            timed(
                "advance the checkpoint",
                self.meta
                    .update_one(doc! { "_id": META_CHECKPOINT }, doc! { "$max": { "value": checkpoint } })
                    .upsert(true),
            )
            .await?;
        }
        tracing::debug!(writes, checkpoint, elapsed_ms = started.elapsed().as_millis() as u64, "MongoDB flush");
        Ok(())
    }

    async fn checkpoint(&self) -> Result<u64, StoreError> {
        let found = timed("read the checkpoint", self.meta.find_one(doc! { "_id": META_CHECKPOINT })).await?;
        found.map_or(Ok(0), |doc| as_u64("checkpoint", doc.get("value")))
    }

    async fn put_dead_letters(&self, letters: Vec<NewDeadLetter>) -> Result<Vec<u64>, StoreError> {
        if letters.is_empty() {
            return Ok(Vec::new());
        }
        let first = self.reserve_ids(META_DEAD_LETTER_ID, letters.len() as u64).await?;
        let recorded_at = Utc::now();
        let mut ids = Vec::with_capacity(letters.len());
        let mut docs = Vec::with_capacity(letters.len());
        for (id, l) in (first..).zip(letters) {
            let letter = l.stored(id, recorded_at);
            docs.push(dead_letter_doc(&letter)?);
            ids.push(id);
        }
        // A failure here leaves a gap in the ids (they stay reserved), never a reused id.
        timed("record dead letters", self.dead_letters.insert_many(docs).ordered(true)).await?;
        Ok(ids)
    }

    async fn list_dead_letters(&self, after: u64, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let Ok(after) = i64::try_from(after) else {
            return Ok(Vec::new());
        };
        self.find_sorted(
            "list dead letters",
            &self.dead_letters,
            doc! { "_id": { "$gt": after } },
            None,
            Some(limit),
            dead_letter_from_doc,
        )
        .await
    }

    async fn count_dead_letters(&self) -> Result<u64, StoreError> {
        timed("count dead letters", self.dead_letters.count_documents(doc! {})).await
    }

    /// Counts stored profile records, including those merged away (they remain as redirects).
    async fn count_profiles(&self) -> Result<u64, StoreError> {
        timed("count profiles", self.profiles.count_documents(doc! {})).await
    }

    async fn list_profile_ids(&self, after: Option<&ProfileId>, limit: usize) -> Result<Vec<ProfileId>, StoreError> {
        let filter = match after {
            Some(after) => doc! { "_id": { "$gt": after.as_str() } },
            None => doc! {},
        };
        self.find_sorted("list profile ids", &self.profiles, filter, Some(doc! { "_id": 1 }), Some(limit), |doc| {
            profile_id_of(&doc, "_id")
        })
        .await
    }

    async fn list_merges(&self, profile: &ProfileId) -> Result<Vec<IdentityMerged>, StoreError> {
        self.find_sorted("list merges", &self.merges, doc! { "profile": profile.as_str() }, None, None, merge_from_doc)
            .await
    }

    /// A Bronze payload travels whole in one outbox document (at most 15 MiB of its 16). Sealed,
    /// it is base64 of ciphertext, which does not compress, and a body that is not UTF-8 is
    /// base64 before that: 8 MiB becomes at most 14.3 MiB. Larger imports were accepted, and the
    /// flush holding them failed, and every retry with it.
    fn max_raw_payload_bytes(&self) -> Option<usize> {
        Some(MAX_RAW_PAYLOAD_BYTES)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        timed("ping", self.db.run_command(doc! { "ping": 1 })).await.map(drop)
    }

    async fn load_profiles(&self, ids: &[ProfileId]) -> Result<Vec<ProfileRecord>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = ids.iter().map(ProfileId::as_str).collect();
        self.find_sorted("load profiles", &self.profiles, doc! { "_id": { "$in": ids } }, None, None, profile_from_doc)
            .await
    }

    async fn read_outbox(&self, limit: usize) -> Result<Vec<(OutboxId, WarehouseBatch)>, StoreError> {
        self.find_sorted("read the warehouse outbox", &self.outbox, doc! {}, None, Some(limit), |d| {
            let id = d
                .get_object_id("_id")
                .map_err(|_| StoreError::corrupt("an outbox document has no ObjectId _id"))?
                .to_hex();
            let bytes = match d.get("batch") {
                Some(Bson::Binary(b)) => &b.bytes,
                _ => return Err(StoreError::corrupt(format!("outbox document {id} has no binary batch"))),
            };
            let batch = outbox_from_doc(bytes)
                .map_err(|e| StoreError::corrupt(format!("outbox document {id} does not decode: {e}")))?;
            Ok((id, batch))
        })
        .await
    }

    async fn ack_outbox(&self, ids: &[OutboxId]) -> Result<(), StoreError> {
        let ids: Vec<ObjectId> = ids.iter().filter_map(|id| ObjectId::parse_str(id).ok()).collect();
        if ids.is_empty() {
            return Ok(());
        }
        timed("acknowledge outbox batches", self.outbox.delete_many(doc! { "_id": { "$in": ids } })).await.map(drop)
    }

    async fn outbox_len(&self) -> Result<u64, StoreError> {
        timed("count the warehouse outbox", self.outbox.count_documents(doc! {})).await
    }

    async fn record_consents(&self, consents: Vec<ConsentRecord>) -> Result<(), StoreError> {
        let docs = consents.iter().map(|c| record_doc("consent", consent_key(c), c)).collect::<Result<_, _>>()?;
        self.upsert_docs(&self.consents, docs).await
    }

    async fn consents(&self, profile: &ProfileId) -> Result<Vec<ConsentRecord>, StoreError> {
        let filter = doc! { "profile_id": profile.as_str() };
        self.find_sorted("read consents", &self.consents, filter, None, None, |d| record_from_doc("consent", d)).await
    }

    async fn suppress(&self, entries: Vec<Suppression>) -> Result<(), StoreError> {
        let docs = entries
            .iter()
            .map(|e| record_doc("suppression", suppression_key(e.channel, &e.address), e))
            .collect::<Result<_, _>>()?;
        self.upsert_docs(&self.suppressions, docs).await
    }

    async fn unsuppress(&self, addresses: &[(Channel, String)]) -> Result<(), StoreError> {
        if addresses.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = addresses.iter().map(|(c, a)| suppression_key(*c, a)).collect();
        timed("unsuppress", self.suppressions.delete_many(doc! { "_id": { "$in": keys } })).await.map(drop)
    }

    async fn suppressed(&self, addresses: &[(Channel, String)]) -> Result<Vec<Option<Suppression>>, StoreError> {
        if addresses.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = addresses.iter().map(|(c, a)| suppression_key(*c, a)).collect();
        let filter = doc! { "_id": { "$in": keys.clone() } };
        let found: Vec<Suppression> = self
            .find_sorted("read suppressions", &self.suppressions, filter, None, None, |d| {
                record_from_doc("suppression", d)
            })
            .await?;
        let by_key: std::collections::HashMap<String, Suppression> =
            found.into_iter().map(|s| (suppression_key(s.channel, &s.address), s)).collect();
        Ok(keys.iter().map(|k| by_key.get(k).cloned()).collect())
    }

    /// Version 1 inserts (a duplicate `_id` means someone else created it); later versions
    /// replace only the document still at the previous version.
    async fn save_saga(&self, saga: &SagaRecord) -> Result<(), StoreError> {
        let doc = record_doc("saga", saga.saga_id.clone(), saga)?;
        let conflict = || StoreError::conflict(format!("saga {} was advanced by another writer", saga.saga_id));
        if saga.version <= 1 {
            if saga.version == 0 {
                return Err(StoreError::invalid("saga versions start at 1"));
            }
            let insert = tokio::time::timeout(OPERATION_TIMEOUT, self.sagas.insert_one(doc).into_future()).await;
            return match insert {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) if is_duplicate_key(&e) => Err(conflict()),
                Ok(Err(e)) => Err(store_error("create a saga", e)),
                Err(_) => Err(StoreError::unavailable("MongoDB: cannot create a saga: no answer in time")),
            };
        }
        let previous = to_i64("saga version", saga.version - 1)?;
        let replaced = timed(
            "save a saga",
            self.sagas.replace_one(doc! { "_id": saga.saga_id.as_str(), "version": previous }, doc),
        )
        .await?;
        if replaced.matched_count == 0 {
            return Err(conflict());
        }
        Ok(())
    }

    async fn load_saga(&self, saga_id: &str) -> Result<Option<SagaRecord>, StoreError> {
        let found = timed("load a saga", self.sagas.find_one(doc! { "_id": saga_id })).await?;
        found.map(|d| record_from_doc("saga", d)).transpose()
    }

    async fn list_sagas(&self, after: Option<&str>, limit: usize) -> Result<Vec<SagaRecord>, StoreError> {
        let filter = after.map_or_else(Document::new, |a| doc! { "_id": { "$gt": a } });
        self.find_sorted("list sagas", &self.sagas, filter, None, Some(limit), |d| record_from_doc("saga", d)).await
    }

    async fn append_audit(&self, entries: Vec<NewAuditEntry>) -> Result<Vec<u64>, StoreError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let first = self.reserve_ids(META_AUDIT_ID, entries.len() as u64).await?;
        let mut ids = Vec::with_capacity(entries.len());
        let mut docs = Vec::with_capacity(entries.len());
        for (id, e) in (first..).zip(entries) {
            docs.push(record_doc("audit entry", to_i64("audit id", id)?, &AuditEntry::numbered(id, e))?);
            ids.push(id);
        }
        timed("append to the audit log", self.audit.insert_many(docs).ordered(true)).await?;
        Ok(ids)
    }

    async fn list_audit(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let Ok(after) = i64::try_from(after) else { return Ok(Vec::new()) };
        self.find_sorted("read the audit log", &self.audit, doc! { "_id": { "$gt": after } }, None, Some(limit), |d| {
            record_from_doc("audit entry", d)
        })
        .await
    }

    async fn put_review_items(&self, items: Vec<ReviewItem>) -> Result<(), StoreError> {
        let docs = items.iter().map(|i| record_doc("review item", i.id.clone(), i)).collect::<Result<_, _>>()?;
        self.upsert_docs(&self.reviews, docs).await
    }

    async fn review_item(&self, id: &str) -> Result<Option<ReviewItem>, StoreError> {
        let found = timed("read a review item", self.reviews.find_one(doc! { "_id": id })).await?;
        found.map(|d| record_from_doc("review item", d)).transpose()
    }

    async fn put_documents(
        &self,
        collection: &str,
        docs: Vec<(String, Option<serde_json::Value>)>,
    ) -> Result<(), StoreError> {
        if docs.is_empty() {
            return Ok(());
        }
        let ns = self.documents.namespace();
        let mut models = Vec::with_capacity(docs.len());
        for (key, value) in docs {
            let id = document_key(collection, &key);
            models.push(match value {
                Some(v) => {
                    let json = serde_json::to_string(&v)
                        .map_err(|e| StoreError::invalid(format!("encoding a document: {e}")))?;
                    replace_one(&ns, doc! { "_id": id, "c": collection, "j": json })?
                }
                None => mongodb::options::DeleteOneModel::builder()
                    .namespace(ns.clone())
                    .filter(doc! { "_id": id })
                    .build()
                    .into(),
            });
        }
        self.bulk_upsert(models).await
    }

    async fn get_documents(
        &self,
        collection: &str,
        keys: &[String],
    ) -> Result<Vec<Option<serde_json::Value>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = keys.iter().map(|k| document_key(collection, k)).collect();
        let found: std::collections::HashMap<String, serde_json::Value> = self
            .find_sorted(
                "read documents",
                &self.documents,
                doc! { "_id": { "$in": ids.clone() } },
                None,
                None,
                document_from,
            )
            .await?
            .into_iter()
            .collect();
        Ok(ids.iter().map(|id| found.get(id).cloned()).collect())
    }

    async fn list_documents(
        &self,
        collection: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, serde_json::Value)>, StoreError> {
        let range = DocumentRange::new(collection, prefix, after);
        let op = if range.inclusive { "$gte" } else { "$gt" };
        let filter = doc! { "_id": { op: range.lower.as_str(), "$lt": range.upper.as_str() } };
        let docs =
            self.find_sorted("list documents", &self.documents, filter, None, Some(limit), document_from).await?;
        Ok(docs.into_iter().map(|(id, v)| (range.key_of(&id), v)).collect())
    }

    async fn erase_person(&self, target: &ErasureTarget) -> Result<ErasureCounts, StoreError> {
        let mut counts = ErasureCounts::default();
        for (name, filter) in Self::person_filters(target) {
            let n = timed("erase a person", self.person_collection(name).delete_many(filter)).await?.deleted_count;
            count_into(&mut counts, name, n);
        }
        Ok(counts)
    }

    async fn delete_dead_letters(&self, ids: &[u64]) -> Result<u64, StoreError> {
        let ids: Vec<i64> = ids.iter().filter_map(|i| i64::try_from(*i).ok()).collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let deleted =
            timed("delete dead letters", self.dead_letters.delete_many(doc! { "_id": { "$in": ids } })).await?;
        Ok(deleted.deleted_count)
    }

    async fn person_remnants(&self, target: &ErasureTarget) -> Result<ErasureCounts, StoreError> {
        let mut counts = ErasureCounts::default();
        for (name, filter) in Self::person_filters(target) {
            let n = timed("count a person's remnants", self.person_collection(name).count_documents(filter)).await?;
            count_into(&mut counts, name, n);
        }
        counts.dead_letters = crate::dead_letters_mentioning(self, target).await?.len() as u64;
        Ok(counts)
    }

    async fn list_review_items(
        &self,
        status: Option<ReviewStatus>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ReviewItem>, StoreError> {
        let mut filter = after.map_or_else(Document::new, |a| doc! { "_id": { "$gt": a } });
        if let Some(status) = status {
            let status = mongodb::bson::to_bson(&status)
                .map_err(|e| StoreError::invalid(format!("cannot encode a review status: {e}")))?;
            filter.insert("status", status);
        }
        self.find_sorted("read the review queue", &self.reviews, filter, None, Some(limit), |d| {
            record_from_doc("review item", d)
        })
        .await
    }

    async fn expire_before(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let before = mongodb::bson::DateTime::from_millis(before.timestamp_millis());
        let deleted =
            timed("expire idempotency keys", self.event_ids.delete_many(doc! { "at": { "$lt": before } })).await?;
        Ok(deleted.deleted_count)
    }
}

/// A stored document: its full key and its JSON.
fn document_from(doc: Document) -> Result<(String, serde_json::Value), StoreError> {
    let id = doc.get_str("_id").map_err(|_| StoreError::corrupt("a document without a string key"))?.to_string();
    let json = doc.get_str("j").map_err(|_| StoreError::corrupt("a document without its JSON"))?;
    let value =
        serde_json::from_str(json).map_err(|e| StoreError::corrupt(format!("a stored document is not JSON: {e}")))?;
    Ok((id, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refusals_of_existing_ids_count_as_recorded() {
        use errors::tests::insert_many_error;
        assert!(only_duplicate_keys(&insert_many_error(&[11000])));
        assert!(only_duplicate_keys(&insert_many_error(&[11000, 11000, 11000])));
        assert!(!only_duplicate_keys(&insert_many_error(&[11000, 121])), "a validation refusal is not recorded");
        assert!(!only_duplicate_keys(&insert_many_error(&[])), "no write error: a write concern failure");
        let io = mongodb::error::Error::from(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"));
        assert!(!only_duplicate_keys(&io));
    }

    #[test]
    fn database_names_are_checked_before_connecting() {
        for ok in ["cohort", "cohort_test_1", "Cohort-Prod"] {
            assert!(validate_database_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a.b", "a/b", "a b", "a$b", &"x".repeat(64)] {
            assert!(validate_database_name(bad).is_err(), "{bad}");
        }
    }
}
