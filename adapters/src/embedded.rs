//! The embedded backend: journal, Bronze layer and operational store in one redb database.
//!
//! This is what lets `cohort` run with nothing installed. Writes go through one writer thread
//! that group-commits (see `embedded::writer`); reads run in read transactions on tokio's blocking
//! pool, so neither ever stalls the async runtime.

mod erasure;
mod recent;
mod tables;
mod unindexed;
mod writer;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use async_trait::async_trait;
use cohort_messages::{msgs::IdentityMerged, DeadLetter, Identifier, ProfileId, ProfileRecord};
use parking_lot::RwLock;
use redb::backends::InMemoryBackend;
use redb::{Database, DatabaseError, ReadTransaction, ReadableTable, ReadableTableMetadata};
use std::ops::Bound;
use tokio::sync::{oneshot, watch};

use self::recent::Recent;
use self::tables::{
    db_err, decode, decode_packed, decode_packed_within, encode, merge_range, outbox_key, BronzeRow, DbResult, AUDIT,
    BRONZE, BRONZE_BODY, CONSENTS, DEAD_LETTERS, DOCUMENTS, IDEMPOTENCY, IDENTITIES, JOURNAL, MERGES, META,
    META_CHECKPOINT, OUTBOX, PROFILES, REVIEWS, SAGAS, SUPPRESSIONS,
};
use self::writer::{Command, DocTable, Writer};
use crate::store::{consent_key, document_key, suppression_key, DocumentRange};
use crate::{
    AppendBatch, AppendOutcome, BronzeRecord, EventLog, FlushBatch, JournaledEvent, NewDeadLetter, OperationalStore,
    OutboxId, StoreError, WarehouseBatch,
};
use chrono::{DateTime, Utc};
use cohort_messages::{
    AuditEntry, Channel, ConsentRecord, ErasureCounts, ErasureTarget, NewAuditEntry, ReviewItem, ReviewStatus,
    SagaRecord, Suppression,
};

/// URL scheme of a file-backed store: `embedded:///abs/path.redb` or `embedded://rel/path.redb`.
pub const EMBEDDED_SCHEME: &str = "embedded://";
/// URL of an in-memory store (nothing survives the process).
pub const MEMORY_URL: &str = "memory://";

/// Where the database lives; kept for logs and `Debug`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    File(PathBuf),
    Memory,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::File(p) => write!(f, "{}", p.display()),
            Location::Memory => f.write_str(MEMORY_URL),
        }
    }
}

/// What an open store holds; taken out as a whole on close so the file lock is released.
struct Open {
    db: Arc<Database>,
    commands: mpsc::Sender<Command>,
    writer: JoinHandle<()>,
}

/// The embedded [`EventLog`] and [`OperationalStore`], backed by a single redb database.
///
/// Cheap to share as `Arc<EmbeddedStore>` (coerces to both trait objects). Dropping the last
/// `Arc`, or calling [`EmbeddedStore::close`], stops the writer thread and releases the file,
/// so the same path can be opened again in the same process.
pub struct EmbeddedStore {
    location: Location,
    state: RwLock<Option<Open>>,
    head: watch::Sender<u64>,
    recent: Arc<Recent>,
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("location", &self.location)
            .field("open", &self.state.read().is_some())
            .field("head", &*self.head.borrow())
            .finish()
    }
}

impl EmbeddedStore {
    /// Opens (or creates) a durable store at `path`, creating missing parent directories, with a
    /// page cache of `cache_bytes` (`storage.cache_mb`; redb's own default is 1 GiB per file).
    ///
    /// Blocking: opening may have to repair the file after a crash; call it at startup or from
    /// a blocking context. Fails with `Unavailable` if the file is already open elsewhere.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Arc<Self>, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::unavailable(format!(
                    "cannot create directory {} for the embedded store: {e}",
                    parent.display()
                ))
            })?;
        }
        let db = Database::builder().set_cache_size(cache_bytes).create(path).map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => StoreError::unavailable(format!(
                "embedded store {} is already open (by this or another process)",
                path.display()
            )),
            other => db_err("open the embedded store", other),
        })?;
        Self::start(db, Location::File(path.to_path_buf()))
    }

    /// Opens an empty store held in memory: for tests and throwaway runs.
    pub fn in_memory() -> Result<Arc<Self>, StoreError> {
        let db = Database::builder().create_with_backend(InMemoryBackend::new()).ctx("create the in-memory store")?;
        Self::start(db, Location::Memory)
    }

    /// Opens the store named by a `storage.url`: `embedded://PATH` (a redb file, absolute with
    /// `embedded:///abs/...`, else relative to the working directory) or `memory://`; a file
    /// gets a page cache of `cache_bytes`.
    pub fn open_url(url: &str, cache_bytes: usize) -> Result<Arc<Self>, StoreError> {
        match parse_url(url)? {
            Location::File(path) => Self::open(&path, cache_bytes),
            Location::Memory => Self::in_memory(),
        }
    }

    /// Stops the writer after it finished the pending writes and releases the database file.
    ///
    /// Afterwards every operation fails with `Unavailable`. Idempotent. Reads still running on
    /// the blocking pool keep the database alive until they finish.
    pub async fn close(&self) {
        let Some(open) = self.state.write().take() else {
            return;
        };
        let Open { db, commands, writer } = open;
        drop(commands);
        drop(db);
        match tokio::task::spawn_blocking(move || writer.join()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                tracing::error!(location = %self.location, "embedded store writer panicked")
            }
            Err(e) => {
                tracing::error!(location = %self.location, error = %e, "embedded store close failed")
            }
        }
        // Personal data in the copies goes with the store, not with the last handle.
        self.recent.clear();
        tracing::info!(location = %self.location, "embedded store closed");
    }

    /// Creates the tables, reads the head and starts the writer thread.
    fn start(db: Database, location: Location) -> Result<Arc<Self>, StoreError> {
        let (head_seq, unindexed) = writer::initialize(&db)?;
        let db = Arc::new(db);
        let (head, _) = watch::channel(head_seq);
        let (commands, queue) = mpsc::channel();
        let recent = Arc::new(Recent::default());
        recent.unindexed.lock().extend(unindexed);
        let writer = Writer { db: Arc::clone(&db), head: head.clone(), commands: queue, recent: Arc::clone(&recent) };
        let writer = std::thread::Builder::new()
            .name("cohort-embedded-writer".to_string())
            .spawn(move || writer.run())
            .map_err(|e| StoreError::unavailable(format!("cannot start the embedded writer thread: {e}")))?;
        tracing::info!(location = %location, head = head_seq, "embedded store opened");
        Ok(Arc::new(Self { location, state: RwLock::new(Some(Open { db, commands, writer })), head, recent }))
    }

    fn closed(&self) -> StoreError {
        StoreError::unavailable(format!("embedded store {} is closed", self.location))
    }

    /// Hands a write to the writer thread and waits for its group to commit.
    async fn submit<T>(
        &self,
        (command, answer): (Command, oneshot::Receiver<Result<T, StoreError>>),
    ) -> Result<T, StoreError> {
        {
            let state = self.state.read();
            let open = state.as_ref().ok_or_else(|| self.closed())?;
            open.commands.send(command).map_err(|_| StoreError::unavailable("embedded store writer has stopped"))?;
        }
        answer.await.map_err(|_| StoreError::unavailable("embedded store writer stopped before answering"))?
    }

    /// Runs `f` in a read transaction on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&ReadTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        let db = {
            let state = self.state.read();
            Arc::clone(&state.as_ref().ok_or_else(|| self.closed())?.db)
        };
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().ctx("begin read")?;
            f(&txn)
        })
        .await
        .map_err(|e| StoreError::unavailable(format!("embedded store read task failed: {e}")))?
    }
}

impl Drop for EmbeddedStore {
    /// Stops the writer and waits for it, so the database file is unlocked when the last
    /// handle is gone. The wait is at most one in-flight commit, and writing the event ids kept
    /// in memory.
    fn drop(&mut self) {
        if let Some(Open { db, commands, writer }) = self.state.get_mut().take() {
            drop(commands);
            drop(db);
            if writer.join().is_err() {
                tracing::error!(location = %self.location, "embedded store writer panicked");
            }
        }
    }
}

/// Parses a storage URL into a location; errors name the URL and the accepted schemes.
fn parse_url(url: &str) -> Result<Location, StoreError> {
    let invalid = |why: &str| {
        StoreError::invalid(format!(
            "storage url `{url}` {why}: expected embedded://PATH (e.g. embedded://.cohort-data/cohort.redb \
             or embedded:///var/lib/cohort/cohort.redb) or memory://"
        ))
    };
    if url == MEMORY_URL {
        return Ok(Location::Memory);
    }
    if let Some(path) = url.strip_prefix(EMBEDDED_SCHEME) {
        if path.is_empty() || path.ends_with('/') {
            return Err(invalid("has no file path"));
        }
        return Ok(Location::File(PathBuf::from(path)));
    }
    Err(invalid("has an unsupported scheme"))
}

fn range_after(after: u64) -> (Bound<u64>, Bound<u64>) {
    (Bound::Excluded(after), Bound::Unbounded)
}

#[async_trait]
impl EventLog for EmbeddedStore {
    async fn append(&self, batch: AppendBatch) -> Result<AppendOutcome, StoreError> {
        if batch.raw.is_none() && batch.events.is_empty() {
            return Ok(AppendOutcome { raw_seq: None, seqs: Vec::new() });
        }
        self.submit(Command::append(batch)).await
    }

    async fn read_after(&self, after: u64, limit: usize) -> Result<Vec<JournaledEvent>, StoreError> {
        let recent = Arc::clone(&self.recent);
        self.read(move |txn| {
            let journal = txn.open_table(JOURNAL).ctx("open journal")?;
            let mut out = Vec::with_capacity(limit.min(1024));
            for entry in journal.range(range_after(after)).ctx("read journal")?.take(limit) {
                let (seq, bytes) = entry.ctx("read journal")?;
                let seq = seq.value();
                // Not held while decoding: the writer takes this lock after every commit.
                let kept = recent.events.lock().take(seq);
                let event = match kept {
                    Some(event) => event,
                    None => decode("event", bytes.value())?,
                };
                out.push(JournaledEvent { seq, event });
            }
            if let Some(last) = out.last() {
                // Kept after this read decoded them (its snapshot began before the keep): nobody
                // reads them again.
                recent.events.lock().forget_through(last.seq);
            }
            Ok(out)
        })
        .await
    }

    fn watch_head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    async fn read_bronze_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, BronzeRecord)>, StoreError> {
        self.read(move |txn| {
            let rows = txn.open_table(BRONZE).ctx("open bronze")?;
            let bodies = txn.open_table(BRONZE_BODY).ctx("open bronze")?;
            let mut out = Vec::with_capacity(limit.min(1024));
            for entry in rows.range(range_after(after)).ctx("read bronze")?.take(limit) {
                let (seq, bytes) = entry.ctx("read bronze")?;
                let seq = seq.value();
                let row: BronzeRow = decode("bronze record", bytes.value())?;
                let body = bodies
                    .get(seq)
                    .ctx("read bronze")?
                    .ok_or_else(|| StoreError::corrupt(format!("bronze record {seq} has no body")))?
                    .value()
                    .to_vec();
                out.push((seq, row.into_record(body)));
            }
            Ok(out)
        })
        .await
    }

    async fn erase_matching(&self, target: &ErasureTarget) -> Result<ErasureCounts, StoreError> {
        let t = target.clone();
        let plan = self.read(move |txn| erasure::plan_journal(txn, &t)).await?;
        if plan.is_empty() {
            return Ok(ErasureCounts::default());
        }
        self.submit(Command::erase(plan)).await
    }

    async fn count_matching(&self, target: &ErasureTarget) -> Result<ErasureCounts, StoreError> {
        let t = target.clone();
        self.read(move |txn| erasure::plan_journal(txn, &t).map(|p| p.counts())).await
    }

    async fn compact(&self, before: DateTime<Utc>, covered: u64) -> Result<u64, StoreError> {
        self.submit(Command::expire(before, covered)).await
    }
}

#[async_trait]
impl OperationalStore for EmbeddedStore {
    async fn load_profile(&self, id: &ProfileId) -> Result<Option<ProfileRecord>, StoreError> {
        let id = id.clone();
        self.read(move |txn| {
            let profiles = txn.open_table(PROFILES).ctx("read profiles")?;
            let found = profiles.get(id.as_str()).ctx("read profiles")?;
            found.map(|bytes| decode_packed("profile", bytes.value())).transpose()
        })
        .await
    }

    async fn seen_event_ids(&self, ids: &[String]) -> Result<Vec<bool>, StoreError> {
        // The ids kept in memory before the read transaction starts: one that has left them
        // since was written by a commit that transaction sees.
        let kept: Vec<bool> = {
            let unindexed = self.recent.unindexed.lock();
            ids.iter().map(|id| unindexed.contains(id)).collect()
        };
        let ids = ids.to_vec();
        self.read(move |txn| {
            let table = txn.open_table(IDEMPOTENCY).ctx("read idempotency keys")?;
            ids.iter()
                .zip(kept)
                .map(|(id, kept)| Ok(kept || table.get(id.as_str()).ctx("read idempotency keys")?.is_some()))
                .collect()
        })
        .await
    }

    async fn lookup_identity(&self, identifier: &Identifier) -> Result<Option<ProfileId>, StoreError> {
        Ok(self.lookup_identities(std::slice::from_ref(identifier)).await?.pop().flatten())
    }

    async fn lookup_identities(&self, identifiers: &[Identifier]) -> Result<Vec<Option<ProfileId>>, StoreError> {
        let keys: Vec<String> = identifiers.iter().map(Identifier::key).collect();
        self.read(move |txn| {
            let identities = txn.open_table(IDENTITIES).ctx("read identities")?;
            keys.iter()
                .map(|key| {
                    let found = identities.get(key.as_str()).ctx("read identities")?;
                    found
                        .map(|id| {
                            ProfileId::parse(id.value())
                                .ok_or_else(|| StoreError::corrupt("identity points to a malformed profile id"))
                        })
                        .transpose()
                })
                .collect()
        })
        .await
    }

    async fn commit_flush(&self, batch: FlushBatch) -> Result<(), StoreError> {
        if batch.identities.is_empty()
            && batch.profiles.is_empty()
            && batch.merges.is_empty()
            && batch.event_ids.is_empty()
            && batch.outbox.is_empty()
            && batch.checkpoint.is_none()
        {
            return Ok(());
        }
        self.submit(Command::flush(batch)).await
    }

    async fn checkpoint(&self) -> Result<u64, StoreError> {
        self.read(|txn| {
            let meta = txn.open_table(META).ctx("read checkpoint")?;
            let value = meta.get(META_CHECKPOINT).ctx("read checkpoint")?;
            Ok(value.map(|v| v.value()).unwrap_or(0))
        })
        .await
    }

    async fn put_dead_letters(&self, letters: Vec<NewDeadLetter>) -> Result<Vec<u64>, StoreError> {
        if letters.is_empty() {
            return Ok(Vec::new());
        }
        self.submit(Command::dead_letters(letters)).await
    }

    async fn list_dead_letters(&self, after: u64, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.read(move |txn| {
            let letters = txn.open_table(DEAD_LETTERS).ctx("read dead letters")?;
            let mut out = Vec::with_capacity(limit.min(1024));
            for entry in letters.range(range_after(after)).ctx("read dead letters")?.take(limit) {
                let (_, bytes) = entry.ctx("read dead letters")?;
                out.push(decode("dead letter", bytes.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn count_dead_letters(&self) -> Result<u64, StoreError> {
        self.read(|txn| txn.open_table(DEAD_LETTERS).ctx("count dead letters")?.len().ctx("count dead letters")).await
    }

    /// Counts stored profile records, including those merged away (they remain as redirects).
    async fn count_profiles(&self) -> Result<u64, StoreError> {
        self.read(|txn| txn.open_table(PROFILES).ctx("count profiles")?.len().ctx("count profiles")).await
    }

    async fn list_profile_ids(&self, after: Option<&ProfileId>, limit: usize) -> Result<Vec<ProfileId>, StoreError> {
        let after = after.map(|id| id.as_str().to_string());
        self.read(move |txn| {
            let profiles = txn.open_table(PROFILES).ctx("list profiles")?;
            let lower = match after.as_deref() {
                Some(after) => Bound::Excluded(after),
                None => Bound::Unbounded,
            };
            let mut out = Vec::with_capacity(limit.min(1024));
            for entry in profiles.range::<&str>((lower, Bound::Unbounded)).ctx("list profiles")?.take(limit) {
                let (id, _) = entry.ctx("list profiles")?;
                let id = ProfileId::parse(id.value())
                    .ok_or_else(|| StoreError::corrupt("profile stored under a malformed id"))?;
                out.push(id);
            }
            Ok(out)
        })
        .await
    }

    async fn list_merges(&self, profile: &ProfileId) -> Result<Vec<IdentityMerged>, StoreError> {
        let (lo, hi) = merge_range(profile);
        self.read(move |txn| {
            let merges = txn.open_table(MERGES).ctx("read merges")?;
            let mut out = Vec::new();
            for entry in merges.range::<&str>(lo.as_str()..hi.as_str()).ctx("read merges")? {
                let (_, bytes) = entry.ctx("read merges")?;
                out.push(decode("merge", bytes.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|txn| txn.open_table(META).ctx("ping").map(drop)).await
    }

    async fn load_profiles(&self, ids: &[ProfileId]) -> Result<Vec<ProfileRecord>, StoreError> {
        let ids = ids.to_vec();
        self.read(move |txn| {
            let profiles = txn.open_table(PROFILES).ctx("read profiles")?;
            let mut out = Vec::with_capacity(ids.len());
            for id in &ids {
                if let Some(bytes) = profiles.get(id.as_str()).ctx("read profiles")? {
                    out.push(decode_packed("profile", bytes.value())?);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn read_outbox(&self, limit: usize) -> Result<Vec<(OutboxId, WarehouseBatch)>, StoreError> {
        let recent = Arc::clone(&self.recent);
        self.read(move |txn| {
            let outbox = txn.open_table(OUTBOX).ctx("read outbox")?;
            let mut out = Vec::with_capacity(limit.min(256));
            for entry in outbox.iter().ctx("read outbox")?.take(limit) {
                let (id, bytes) = entry.ctx("read outbox")?;
                let id = id.value();
                let kept = recent.outbox.lock().take(id);
                let batch = match kept {
                    Some(batch) => batch,
                    None => decode_packed_within("outbox batch", bytes.value(), crate::zstd_frame::MAX_OUTBOX_BYTES)?,
                };
                out.push((outbox_key(id), batch));
            }
            Ok(out)
        })
        .await
    }

    async fn ack_outbox(&self, ids: &[OutboxId]) -> Result<(), StoreError> {
        let ids: Vec<u64> = ids.iter().filter_map(|id| id.parse().ok()).collect();
        if ids.is_empty() {
            return Ok(());
        }
        self.submit(Command::ack_outbox(ids)).await.map(drop)
    }

    async fn outbox_len(&self) -> Result<u64, StoreError> {
        self.read(|txn| txn.open_table(OUTBOX).ctx("count outbox")?.len().ctx("count outbox")).await
    }

    async fn expire_before(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        // The store file holds no journal, so `covered` 0 removes keys only.
        self.submit(Command::expire(before, 0)).await
    }

    async fn record_consents(&self, consents: Vec<ConsentRecord>) -> Result<(), StoreError> {
        let docs = consents
            .iter()
            .map(|c| Ok((consent_key(c), Some(encode("consent", c)?))))
            .collect::<Result<_, StoreError>>()?;
        self.submit(Command::docs(DocTable::Consents, docs)).await.map(drop)
    }

    async fn consents(&self, profile: &ProfileId) -> Result<Vec<ConsentRecord>, StoreError> {
        let (lo, hi) = (format!("{profile}/"), format!("{profile}0"));
        self.read(move |txn| {
            let table = txn.open_table(CONSENTS).ctx("read consents")?;
            let mut out = Vec::new();
            for entry in table.range::<&str>(lo.as_str()..hi.as_str()).ctx("read consents")? {
                out.push(decode("consent", entry.ctx("read consents")?.1.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn suppress(&self, entries: Vec<Suppression>) -> Result<(), StoreError> {
        let docs = entries
            .iter()
            .map(|e| Ok((suppression_key(e.channel, &e.address), Some(encode("suppression", e)?))))
            .collect::<Result<_, StoreError>>()?;
        self.submit(Command::docs(DocTable::Suppressions, docs)).await.map(drop)
    }

    async fn unsuppress(&self, addresses: &[(Channel, String)]) -> Result<(), StoreError> {
        let docs = addresses.iter().map(|(c, a)| (suppression_key(*c, a), None)).collect();
        self.submit(Command::docs(DocTable::Suppressions, docs)).await.map(drop)
    }

    async fn suppressed(&self, addresses: &[(Channel, String)]) -> Result<Vec<Option<Suppression>>, StoreError> {
        let keys: Vec<String> = addresses.iter().map(|(c, a)| suppression_key(*c, a)).collect();
        self.read(move |txn| {
            let table = txn.open_table(SUPPRESSIONS).ctx("read suppressions")?;
            keys.iter()
                .map(|k| {
                    let found = table.get(k.as_str()).ctx("read suppressions")?;
                    found.map(|v| decode("suppression", v.value())).transpose()
                })
                .collect()
        })
        .await
    }

    async fn save_saga(&self, saga: &SagaRecord) -> Result<(), StoreError> {
        self.submit(Command::save_saga(saga.clone())).await
    }

    async fn load_saga(&self, saga_id: &str) -> Result<Option<SagaRecord>, StoreError> {
        let id = saga_id.to_string();
        self.read(move |txn| {
            let table = txn.open_table(SAGAS).ctx("read sagas")?;
            let found = table.get(id.as_str()).ctx("read sagas")?;
            found.map(|v| decode("saga", v.value())).transpose()
        })
        .await
    }

    async fn list_sagas(&self, after: Option<&str>, limit: usize) -> Result<Vec<SagaRecord>, StoreError> {
        let after = after.map(str::to_string);
        self.read(move |txn| {
            let table = txn.open_table(SAGAS).ctx("list sagas")?;
            let lower = after.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
            let mut out = Vec::with_capacity(limit.min(1024));
            for entry in table.range::<&str>((lower, Bound::Unbounded)).ctx("list sagas")?.take(limit) {
                out.push(decode("saga", entry.ctx("list sagas")?.1.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn append_audit(&self, entries: Vec<NewAuditEntry>) -> Result<Vec<u64>, StoreError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        self.submit(Command::audit(entries)).await
    }

    async fn list_audit(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        self.read(move |txn| {
            let table = txn.open_table(AUDIT).ctx("read audit log")?;
            let mut out = Vec::with_capacity(limit.min(1024));
            for entry in table.range(range_after(after)).ctx("read audit log")?.take(limit) {
                out.push(decode("audit entry", entry.ctx("read audit log")?.1.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn put_review_items(&self, items: Vec<ReviewItem>) -> Result<(), StoreError> {
        let docs = items
            .iter()
            .map(|i| Ok((i.id.clone(), Some(encode("review item", i)?))))
            .collect::<Result<_, StoreError>>()?;
        self.submit(Command::docs(DocTable::Reviews, docs)).await.map(drop)
    }

    async fn review_item(&self, id: &str) -> Result<Option<ReviewItem>, StoreError> {
        let id = id.to_string();
        self.read(move |txn| {
            let table = txn.open_table(REVIEWS).ctx("read review queue")?;
            let found = table.get(id.as_str()).ctx("read review queue")?;
            found.map(|v| decode("review item", v.value())).transpose()
        })
        .await
    }

    async fn put_documents(
        &self,
        collection: &str,
        docs: Vec<(String, Option<serde_json::Value>)>,
    ) -> Result<(), StoreError> {
        let docs = docs
            .into_iter()
            .map(|(k, v)| Ok((document_key(collection, &k), v.map(|v| encode("document", &v)).transpose()?)))
            .collect::<Result<_, StoreError>>()?;
        self.submit(Command::docs(DocTable::Documents, docs)).await.map(drop)
    }

    async fn get_documents(
        &self,
        collection: &str,
        keys: &[String],
    ) -> Result<Vec<Option<serde_json::Value>>, StoreError> {
        let keys: Vec<String> = keys.iter().map(|k| document_key(collection, k)).collect();
        self.read(move |txn| {
            let table = txn.open_table(DOCUMENTS).ctx("read documents")?;
            keys.iter()
                .map(|k| {
                    table.get(k.as_str()).ctx("read documents")?.map(|v| decode("document", v.value())).transpose()
                })
                .collect()
        })
        .await
    }

    async fn list_documents(
        &self,
        collection: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, serde_json::Value)>, StoreError> {
        let range = DocumentRange::new(collection, prefix, after);
        self.read(move |txn| {
            let table = txn.open_table(DOCUMENTS).ctx("read documents")?;
            let lo = if range.inclusive {
                Bound::Included(range.lower.as_str())
            } else {
                Bound::Excluded(range.lower.as_str())
            };
            let mut out = Vec::with_capacity(limit.min(1024));
            for entry in
                table.range::<&str>((lo, Bound::Excluded(range.upper.as_str()))).ctx("read documents")?.take(limit)
            {
                let (k, v) = entry.ctx("read documents")?;
                out.push((range.key_of(k.value()), decode("document", v.value())?));
            }
            Ok(out)
        })
        .await
    }

    async fn erase_person(&self, target: &ErasureTarget) -> Result<ErasureCounts, StoreError> {
        let t = target.clone();
        let plan = self.read(move |txn| erasure::plan_store(txn, &t)).await?;
        if plan.is_empty() {
            return Ok(ErasureCounts::default());
        }
        self.submit(Command::erase(plan)).await
    }

    async fn delete_dead_letters(&self, ids: &[u64]) -> Result<u64, StoreError> {
        Ok(self.submit(Command::erase(erasure::ErasePlan::dead_letters(ids))).await?.dead_letters)
    }

    async fn person_remnants(&self, target: &ErasureTarget) -> Result<ErasureCounts, StoreError> {
        let t = target.clone();
        let mut counts = self.read(move |txn| erasure::plan_store(txn, &t).map(|p| p.counts())).await?;
        counts.dead_letters = crate::dead_letters_mentioning(self, target).await?.len() as u64;
        Ok(counts)
    }

    async fn list_review_items(
        &self,
        status: Option<ReviewStatus>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ReviewItem>, StoreError> {
        let after = after.map(str::to_string);
        self.read(move |txn| {
            let table = txn.open_table(REVIEWS).ctx("read review queue")?;
            let lower = after.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
            let mut out = Vec::with_capacity(limit.min(1024));
            for entry in table.range::<&str>((lower, Bound::Unbounded)).ctx("read review queue")? {
                if out.len() >= limit {
                    break;
                }
                let item: ReviewItem = decode("review item", entry.ctx("read review queue")?.1.value())?;
                if status.is_none_or(|s| s == item.status) {
                    out.push(item);
                }
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_map_to_locations() {
        assert_eq!(parse_url("memory://").ok(), Some(Location::Memory));
        assert_eq!(
            parse_url("embedded:///var/lib/cohort/cohort.redb").ok(),
            Some(Location::File(PathBuf::from("/var/lib/cohort/cohort.redb")))
        );
        assert_eq!(
            parse_url("embedded://.cohort-data/cohort.redb").ok(),
            Some(Location::File(PathBuf::from(".cohort-data/cohort.redb")))
        );
    }

    #[test]
    fn bad_urls_name_the_url_and_the_schemes() {
        for url in ["ftp://x", "embedded://", "embedded:///tmp/", "memory://x", "mongodb://h/db", ""] {
            let err = parse_url(url).err();
            let Some(err) = err else {
                panic!("`{url}` must be rejected");
            };
            assert_eq!(err.kind, crate::StoreErrorKind::Invalid);
            assert!(err.message.contains(&format!("`{url}`")), "{}", err.message);
            assert!(err.message.contains("embedded://") && err.message.contains("memory://"));
        }
    }

    fn tracked(id: &str, email: &str) -> cohort_messages::CustomerEvent {
        let at = DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default();
        cohort_messages::CustomerEvent {
            event_id: cohort_messages::EventId::new(cohort_messages::Source::Web, id),
            source: cohort_messages::Source::Web,
            kind: cohort_messages::EventKind::Track,
            name: Some("quiz_completed".into()),
            occurred_at: at,
            received_at: at,
            identifiers: vec![Identifier::new(cohort_messages::IdentifierKind::Email, email)],
            traits: Default::default(),
            properties: Default::default(),
            utm: Default::default(),
            trace: None,
            raw: cohort_messages::RawRef { seq: None, index: 0 },
        }
    }

    fn profile(n: &str) -> ProfileId {
        let at = DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default();
        ProfileId::derive_from_event(&cohort_messages::EventId::new(cohort_messages::Source::Crm, n), at)
    }

    fn kept(store: &EmbeddedStore) -> (usize, usize) {
        (store.recent.events.lock().len(), store.recent.outbox.lock().len())
    }

    /// Expiry covering part of one payload's events keeps that payload for the events left.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn expiry_inside_a_payloads_events_keeps_the_payload_for_the_rest() {
        let store = EmbeddedStore::in_memory().unwrap();
        let raw = || BronzeRecord {
            source: cohort_messages::Source::Web,
            format: "segment:batch".into(),
            content_type: "application/json".into(),
            received_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default(),
            body: b"{}".to_vec(),
        };
        let events = vec![tracked("e1", "a@example.edu"), tracked("e2", "b@example.edu")];
        store.append(AppendBatch { raw: Some(raw()), events }).await.unwrap();
        let events = vec![tracked("e3", "a@example.edu"), tracked("e4", "b@example.edu")];
        store.append(AppendBatch { raw: Some(raw()), events }).await.unwrap();
        let later = Utc::now();
        let bronze = |store: Arc<EmbeddedStore>| async move {
            store.read_bronze_after(0, 10).await.unwrap().into_iter().map(|(seq, _)| seq).collect::<Vec<_>>()
        };

        store.compact(later, 3).await.unwrap();
        assert_eq!(store.read_after(0, 10).await.unwrap().len(), 1, "e4 is left");
        assert_eq!(bronze(store.clone()).await, vec![2], "the first payload went, e4's stays");
        store.compact(later, 4).await.unwrap();
        assert_eq!(bronze(store.clone()).await, Vec::<u64>::new());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_take_what_the_writer_kept_and_erasures_and_acks_drop_it() {
        let store = EmbeddedStore::in_memory().unwrap();
        let events =
            vec![tracked("e1", "a@example.edu"), tracked("e2", "b@example.edu"), tracked("e3", "a@example.edu")];
        store.append(AppendBatch { raw: None, events }).await.unwrap();
        let outbox = WarehouseBatch { gold: vec![profile("p1")], ..WarehouseBatch::default() };
        store.commit_flush(FlushBatch { outbox, ..FlushBatch::default() }).await.unwrap();
        assert_eq!(kept(&store), (3, 1), "the commit keeps its events and outbox batch");

        assert_eq!(store.read_after(0, 1).await.unwrap().len(), 1);
        assert_eq!(kept(&store), (2, 1), "a read takes what it returns");

        let target = ErasureTarget {
            profiles: vec![],
            identifiers: vec![Identifier::new(cohort_messages::IdentifierKind::Email, "a@example.edu")],
            contact_emails: vec![],
        };
        assert_eq!(store.erase_matching(&target).await.unwrap().journal_events, 2);
        assert_eq!(kept(&store), (1, 1), "an erased event is not kept in memory either");
        let left = store.read_after(0, 10).await.unwrap();
        assert_eq!(left.iter().map(|j| j.event.event_id.as_str()).collect::<Vec<_>>(), vec!["web:e2"]);

        let ids: Vec<OutboxId> = store.read_outbox(10).await.unwrap().into_iter().map(|(id, _)| id).collect();
        assert_eq!(kept(&store), (0, 0));
        store
            .commit_flush(FlushBatch {
                outbox: WarehouseBatch { gold: vec![profile("p2")], ..WarehouseBatch::default() },
                ..FlushBatch::default()
            })
            .await
            .unwrap();
        let second = format!("{:020}", 2);
        store.ack_outbox(&[ids[0].clone(), second]).await.unwrap();
        assert_eq!(kept(&store), (0, 0), "an acknowledged batch is dropped unread");
        assert_eq!(store.outbox_len().await.unwrap(), 0);

        // A copy kept after a read went past it (its snapshot began before the keep) is dropped
        // by the next read; expiry drops what it covers; closing drops everything.
        store.recent.events.lock().keep(1, tracked("late", "c@example.edu"), 10);
        let events =
            vec![tracked("e4", "d@example.edu"), tracked("e5", "d@example.edu"), tracked("e6", "d@example.edu")];
        store.append(AppendBatch { raw: None, events }).await.unwrap();
        assert_eq!(kept(&store).0, 4);
        assert_eq!(store.read_after(3, 1).await.unwrap().len(), 1);
        assert_eq!(kept(&store).0, 2, "the read took seq 4 and dropped the late copy below it");
        store.compact(DateTime::from_timestamp(0, 0).unwrap_or_default(), 5).await.unwrap();
        assert_eq!(kept(&store).0, 1, "seq 5 is covered");
        store.close().await;
        assert_eq!(kept(&store), (0, 0));
    }
}
