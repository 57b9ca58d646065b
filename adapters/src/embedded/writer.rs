//! The single writer thread of the embedded store: group commit.
//!
//! redb allows one write transaction at a time and each durable commit costs an fsync, so
//! instead of one transaction per caller, every write is sent to one dedicated thread that
//! drains whatever is pending, applies it all in ONE write transaction, commits once, and only
//! then answers each caller. Under load many appends share one fsync; with a single caller it
//! degenerates to a plain commit.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use redb::{Database, Durability, ReadableTable, Table, WriteTransaction};
use tokio::sync::{oneshot, watch};

use super::erasure::ErasePlan;
use super::recent::Recent;
use super::tables::{
    decode, encode, encode_packed, merge_key, pack, BronzeRow, DbResult, AUDIT, BRONZE, BRONZE_BODY, CONSENTS,
    DEAD_LETTERS, DOCUMENTS, IDEMPOTENCY, IDEMPOTENCY_AT, IDENTITIES, JOURNAL, MERGES, META, META_AUDIT_ID,
    META_CHECKPOINT, META_DEAD_LETTER_ID, META_INDEXED_SEQ, META_JOURNAL_SEQ, META_OUTBOX_ID, META_RAW_SEQ, OUTBOX,
    PROFILES, REVIEWS, SAGAS, SUPPRESSIONS,
};
use super::unindexed::{Pending, Unindexed};
use crate::{AppendBatch, AppendOutcome, FlushBatch, NewDeadLetter, StoreError, WarehouseBatch};
use cohort_messages::{AuditEntry, CustomerEvent, ErasureCounts, NewAuditEntry, SagaRecord};

/// Rows of outbox data per stored outbox entry.
const OUTBOX_ENTRY_ROWS: usize = 2000;
/// Entries one expiry pass removes at most, so one pass never holds the writer for long.
const EXPIRE_LIMIT: usize = 50_000;

/// Upper bound on commands merged into one transaction, so one huge backlog cannot hold every
/// caller's acknowledgement hostage to a single enormous commit.
const MAX_GROUP: usize = 1024;

/// One write request and the channel its answer goes back on.
pub(super) struct Command {
    op: Op,
    reply: Reply,
}

impl Command {
    pub(super) fn append(batch: AppendBatch) -> (Self, oneshot::Receiver<Result<AppendOutcome, StoreError>>) {
        let (tx, rx) = oneshot::channel();
        (Self { op: Op::Append(batch), reply: Reply::Append(tx) }, rx)
    }

    pub(super) fn flush(batch: FlushBatch) -> (Self, oneshot::Receiver<Result<(), StoreError>>) {
        let (tx, rx) = oneshot::channel();
        (Self { op: Op::Flush(batch), reply: Reply::Flush(tx) }, rx)
    }

    pub(super) fn dead_letters(letters: Vec<NewDeadLetter>) -> (Self, oneshot::Receiver<Result<Vec<u64>, StoreError>>) {
        let (tx, rx) = oneshot::channel();
        (Self { op: Op::DeadLetters(letters), reply: Reply::Ids(tx) }, rx)
    }

    pub(super) fn audit(entries: Vec<NewAuditEntry>) -> (Self, oneshot::Receiver<Result<Vec<u64>, StoreError>>) {
        let (tx, rx) = oneshot::channel();
        (Self { op: Op::Audit(entries), reply: Reply::Ids(tx) }, rx)
    }

    /// Puts (`Some`) and deletes (`None`) documents of a keyed table.
    pub(super) fn docs(
        table: DocTable,
        docs: Vec<(String, Option<Vec<u8>>)>,
    ) -> (Self, oneshot::Receiver<Result<u64, StoreError>>) {
        let (tx, rx) = oneshot::channel();
        (Self { op: Op::Docs(table, docs), reply: Reply::Count(tx) }, rx)
    }

    pub(super) fn save_saga(saga: SagaRecord) -> (Self, oneshot::Receiver<Result<(), StoreError>>) {
        let (tx, rx) = oneshot::channel();
        (Self { op: Op::SaveSaga(Box::new(saga)), reply: Reply::Unit(tx) }, rx)
    }

    pub(super) fn ack_outbox(ids: Vec<u64>) -> (Self, oneshot::Receiver<Result<u64, StoreError>>) {
        let (tx, rx) = oneshot::channel();
        (Self { op: Op::AckOutbox(ids), reply: Reply::Count(tx) }, rx)
    }

    /// Deletes the keys a GDPR erasure found (see `embedded::erasure`).
    pub(super) fn erase(plan: ErasePlan) -> (Self, oneshot::Receiver<Result<ErasureCounts, StoreError>>) {
        let (tx, rx) = oneshot::channel();
        (Self { op: Op::Erase(Box::new(plan)), reply: Reply::Erased(tx) }, rx)
    }

    pub(super) fn expire(before: DateTime<Utc>, covered: u64) -> (Self, oneshot::Receiver<Result<u64, StoreError>>) {
        let (tx, rx) = oneshot::channel();
        (Self { op: Op::Expire { before, covered }, reply: Reply::Count(tx) }, rx)
    }
}

/// The result of one command inside a committed group, before it is sent back.
enum Applied {
    Append(AppendOutcome),
    Flush,
    Ids(Vec<u64>),
    Count(u64),
    Erased(ErasureCounts),
    /// A per-command outcome that must not abort the group (a saga version conflict).
    Unit(Result<(), StoreError>),
}

/// The keyed document tables written through [`Command::docs`].
#[derive(Debug, Clone, Copy)]
pub(super) enum DocTable {
    Consents,
    Suppressions,
    Reviews,
    Documents,
}

/// The counters kept in `meta`, loaded at the start of each transaction and written back with
/// it, so a failed commit can never leave a gap or a reused number behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counters {
    journal_seq: u64,
    raw_seq: u64,
    dead_letter_id: u64,
    checkpoint: u64,
    outbox_id: u64,
    audit_id: u64,
}

/// Every table of one write transaction, opened once per group.
struct Tables<'txn> {
    journal: Table<'txn, u64, &'static [u8]>,
    idempotency: Table<'txn, &'static str, u64>,
    idempotency_at: Table<'txn, (u64, &'static str), ()>,
    outbox: Table<'txn, u64, &'static [u8]>,
    bronze: Table<'txn, u64, &'static [u8]>,
    bronze_body: Table<'txn, u64, &'static [u8]>,
    profiles: Table<'txn, &'static str, &'static [u8]>,
    identities: Table<'txn, &'static str, &'static str>,
    merges: Table<'txn, &'static str, &'static [u8]>,
    dead_letters: Table<'txn, u64, &'static [u8]>,
    meta: Table<'txn, &'static str, u64>,
    /// What this transaction wrote that readers will want decoded, kept once it commits.
    fresh: Fresh,
}

/// Journal events and outbox batches of one transaction, with their stored sizes, and the
/// event ids it journaled.
#[derive(Default)]
struct Fresh {
    events: Vec<(u64, CustomerEvent, usize)>,
    outbox: Vec<(u64, WarehouseBatch, usize)>,
    ids: HashMap<String, Pending>,
    /// The ids kept before this transaction are in its idempotency rows.
    indexed_kept: bool,
    /// So are `ids`.
    indexed_own: bool,
}

impl Fresh {
    fn keep_in(self, recent: &Recent) {
        {
            let mut unindexed = recent.unindexed.lock();
            if self.indexed_kept {
                unindexed.clear();
            }
            if !self.indexed_own {
                unindexed.extend(self.ids);
            }
        }
        if !self.events.is_empty() {
            let mut kept = recent.events.lock();
            self.events.into_iter().for_each(|(seq, event, bytes)| kept.keep(seq, event, bytes));
        }
        if !self.outbox.is_empty() {
            let mut kept = recent.outbox.lock();
            self.outbox.into_iter().for_each(|(id, batch, bytes)| kept.keep(id, batch, bytes));
        }
    }
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            journal: txn.open_table(JOURNAL).ctx("open table")?,
            idempotency: txn.open_table(IDEMPOTENCY).ctx("open table")?,
            idempotency_at: txn.open_table(IDEMPOTENCY_AT).ctx("open table")?,
            outbox: txn.open_table(OUTBOX).ctx("open table")?,
            bronze: txn.open_table(BRONZE).ctx("open table")?,
            bronze_body: txn.open_table(BRONZE_BODY).ctx("open table")?,
            profiles: txn.open_table(PROFILES).ctx("open table")?,
            identities: txn.open_table(IDENTITIES).ctx("open table")?,
            merges: txn.open_table(MERGES).ctx("open table")?,
            dead_letters: txn.open_table(DEAD_LETTERS).ctx("open table")?,
            meta: txn.open_table(META).ctx("open table")?,
            fresh: Fresh::default(),
        })
    }

    fn meta(&self, key: &str) -> Result<u64, StoreError> {
        Ok(self.meta.get(key).ctx("read meta")?.map(|v| v.value()).unwrap_or(0))
    }

    fn counters(&self) -> Result<Counters, StoreError> {
        Ok(Counters {
            journal_seq: self.meta(META_JOURNAL_SEQ)?,
            raw_seq: self.meta(META_RAW_SEQ)?,
            dead_letter_id: self.meta(META_DEAD_LETTER_ID)?,
            checkpoint: self.meta(META_CHECKPOINT)?,
            outbox_id: self.meta(META_OUTBOX_ID)?,
            audit_id: self.meta(META_AUDIT_ID)?,
        })
    }

    fn save_counters(&mut self, before: Counters, after: Counters) -> Result<(), StoreError> {
        let pairs = [
            (META_JOURNAL_SEQ, before.journal_seq, after.journal_seq),
            (META_RAW_SEQ, before.raw_seq, after.raw_seq),
            (META_DEAD_LETTER_ID, before.dead_letter_id, after.dead_letter_id),
            (META_CHECKPOINT, before.checkpoint, after.checkpoint),
            (META_OUTBOX_ID, before.outbox_id, after.outbox_id),
            (META_AUDIT_ID, before.audit_id, after.audit_id),
        ];
        for (key, old, new) in pairs {
            if old != new {
                self.meta.insert(key, new).ctx("write meta")?;
            }
        }
        Ok(())
    }

    /// Journals the events that were never seen before, in order; Bronze gets its own seq.
    fn append(
        &mut self,
        c: &mut Counters,
        batch: AppendBatch,
        now_ms: u64,
        unindexed: &Unindexed,
    ) -> Result<AppendOutcome, StoreError> {
        let raw_seq = match batch.raw {
            Some(raw) => {
                c.raw_seq += 1;
                let row = encode("bronze record", &BronzeRow::of(&raw))?;
                self.bronze.insert(c.raw_seq, row.as_slice()).ctx("append")?;
                self.bronze_body.insert(c.raw_seq, raw.body.as_slice()).ctx("append")?;
                Some(c.raw_seq)
            }
            None => None,
        };
        let mut seqs = Vec::with_capacity(batch.events.len());
        for mut event in batch.events {
            // Also an id repeated earlier in the same batch or in another batch of the group.
            let id = event.event_id.as_str();
            if self.fresh.ids.contains_key(id)
                || unindexed.contains(id)
                || self.idempotency.get(id).ctx("append")?.is_some()
            {
                seqs.push(None);
                continue;
            }
            if raw_seq.is_some() {
                event.raw.seq = raw_seq;
            }
            let seq = c.journal_seq + 1;
            let bytes = encode("event", &event)?;
            self.journal.insert(seq, bytes.as_slice()).ctx("append")?;
            self.fresh.ids.insert(event.event_id.as_str().to_string(), Pending { seq, at_ms: now_ms });
            c.journal_seq = seq;
            seqs.push(Some(seq));
            self.fresh.events.push((seq, event, bytes.len()));
        }
        Ok(AppendOutcome { raw_seq, seqs })
    }

    /// Writes the ids kept before this transaction (unless it already did) and, with `own`,
    /// those it journaled itself; `through` is the journal seq they then cover.
    fn write_ids(&mut self, recent: &Recent, own: bool, through: u64) -> Result<(), StoreError> {
        let mut ids = if self.fresh.indexed_kept { Vec::new() } else { recent.unindexed.lock().copies() };
        if own {
            ids.extend(self.fresh.ids.iter().map(|(id, p)| (id.clone(), *p)));
        }
        if !ids.is_empty() {
            self.index(ids, through)?;
        }
        self.fresh.indexed_kept = true;
        self.fresh.indexed_own |= own;
        Ok(())
    }

    /// Writes journaled ids into the idempotency tables in key order (neighbours share pages),
    /// and how far the journal is indexed.
    fn index(&mut self, mut ids: Vec<(String, Pending)>, through: u64) -> Result<(), StoreError> {
        ids.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (id, p) in &ids {
            self.idempotency.insert(id.as_str(), p.seq).ctx("index")?;
        }
        ids.sort_unstable_by(|a, b| (a.1.at_ms, &a.0).cmp(&(b.1.at_ms, &b.0)));
        for (id, p) in &ids {
            self.idempotency_at.insert((p.at_ms, id.as_str()), ()).ctx("index")?;
        }
        self.meta.insert(META_INDEXED_SEQ, through).ctx("index")?;
        Ok(())
    }

    /// Upserts the write-behind state; the checkpoint only moves forward.
    fn flush(&mut self, c: &mut Counters, batch: FlushBatch, now_ms: u64) -> Result<(), StoreError> {
        for (identifier, profile) in &batch.identities {
            self.identities.insert(identifier.key().as_str(), profile.as_str()).ctx("flush")?;
        }
        for record in &batch.profiles {
            let bytes = encode_packed("profile", record)?;
            self.profiles.insert(record.profile_id.as_str(), bytes.as_slice()).ctx("flush")?;
        }
        for merge in &batch.merges {
            let bytes = encode("merge", merge)?;
            let survivor_key = merge_key(&merge.survivor, merge.seq, &merge.merged);
            self.merges.insert(survivor_key.as_str(), bytes.as_slice()).ctx("flush")?;
            if merge.merged != merge.survivor {
                let merged_key = merge_key(&merge.merged, merge.seq, &merge.survivor);
                self.merges.insert(merged_key.as_str(), bytes.as_slice()).ctx("flush")?;
            }
        }
        for id in &batch.event_ids {
            self.idempotency.insert(id.as_str(), 0).ctx("flush")?;
            self.idempotency_at.insert((now_ms, id.as_str()), ()).ctx("flush")?;
        }
        for part in batch.outbox.split(OUTBOX_ENTRY_ROWS) {
            c.outbox_id += 1;
            let json = encode("outbox batch", &part)?;
            self.outbox.insert(c.outbox_id, pack("outbox batch", &json)?.as_slice()).ctx("flush")?;
            self.fresh.outbox.push((c.outbox_id, part, json.len()));
        }
        if let Some(checkpoint) = batch.checkpoint {
            // A late or replayed flush must never move replay start backwards.
            c.checkpoint = c.checkpoint.max(checkpoint);
        }
        Ok(())
    }

    fn ack_outbox(&mut self, ids: &[u64]) -> Result<u64, StoreError> {
        let mut removed = 0;
        for id in ids {
            if self.outbox.remove(*id).ctx("ack outbox")?.is_some() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes idempotency keys recorded before `before`, then journal events received before
    /// it up to seq `covered` (what the pipeline has persisted), and the raw payloads only those
    /// events referenced (not one an event left behind still points at).
    fn expire(&mut self, before: DateTime<Utc>, covered: u64) -> Result<u64, StoreError> {
        let cutoff = u64::try_from(before.timestamp_millis()).unwrap_or(0);
        let mut keys: Vec<(u64, String)> = Vec::new();
        for entry in self.idempotency_at.range((0, "")..(cutoff, "")).ctx("expire")?.take(EXPIRE_LIMIT) {
            let (key, _) = entry.ctx("expire")?;
            let (at, id) = key.value();
            keys.push((at, id.to_string()));
        }
        for (at, id) in &keys {
            self.idempotency_at.remove((*at, id.as_str())).ctx("expire")?;
            self.idempotency.remove(id.as_str()).ctx("expire")?;
        }
        let mut expired_seqs = Vec::new();
        let mut last_raw = 0;
        for entry in self.journal.range(..=covered).ctx("expire")?.take(EXPIRE_LIMIT) {
            let (seq, bytes) = entry.ctx("expire")?;
            let event: CustomerEvent = decode("event", bytes.value())?;
            if event.received_at >= before {
                break;
            }
            last_raw = last_raw.max(event.raw.seq.unwrap_or(0));
            expired_seqs.push(seq.value());
        }
        for seq in expired_seqs {
            self.journal.remove(seq).ctx("expire")?;
        }
        // A payload's events are journaled together, in raw seq order: only the first event
        // left can still point at the last payload read (the expiry stopped inside its batch).
        if let Some(first) = self.journal.first().ctx("expire")? {
            let event: CustomerEvent = decode("event", first.1.value())?;
            if event.raw.seq == Some(last_raw) {
                last_raw = last_raw.saturating_sub(1);
            }
        }
        let raw: Vec<u64> = self
            .bronze
            .range(..=last_raw)
            .ctx("expire")?
            .take(EXPIRE_LIMIT)
            .map(|e| e.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()
            .ctx("expire")?;
        for seq in raw {
            self.bronze.remove(seq).ctx("expire")?;
            self.bronze_body.remove(seq).ctx("expire")?;
        }
        Ok(keys.len() as u64)
    }

    /// Deletes the keys of a GDPR erasure plan; counts what was really removed (a key gone
    /// meanwhile is not counted).
    fn erase(&mut self, txn: &WriteTransaction, plan: &ErasePlan) -> Result<ErasureCounts, StoreError> {
        // Removes each key, counting the ones that were there.
        macro_rules! removed {
            ($table:expr, $keys:expr) => {{
                let mut n = 0u64;
                for k in $keys {
                    n += u64::from($table.remove(k).ctx("erase")?.is_some());
                }
                n
            }};
        }
        let mut consents = txn.open_table(CONSENTS).ctx("erase")?;
        let mut reviews = txn.open_table(REVIEWS).ctx("erase")?;
        let mut c = ErasureCounts {
            profiles: removed!(self.profiles, plan.profiles.iter().map(String::as_str)),
            identities: removed!(self.identities, plan.identities.iter().map(String::as_str)),
            merges: removed!(self.merges, plan.merges.iter().map(String::as_str)),
            consents: removed!(consents, plan.consents.iter().map(String::as_str)),
            review_items: removed!(reviews, plan.reviews.iter().map(String::as_str)),
            dead_letters: removed!(self.dead_letters, plan.dead_letters.iter().copied()),
            journal_events: removed!(self.journal, plan.journal.iter().copied()),
            ..ErasureCounts::default()
        };
        for seq in &plan.bronze {
            let a = self.bronze.remove(*seq).ctx("erase")?.is_some();
            let b = self.bronze_body.remove(*seq).ctx("erase")?.is_some();
            c.raw_payloads += u64::from(a || b);
        }
        Ok(c)
    }

    fn dead_letters(&mut self, c: &mut Counters, letters: Vec<NewDeadLetter>) -> Result<Vec<u64>, StoreError> {
        let recorded_at = Utc::now();
        let mut ids = Vec::with_capacity(letters.len());
        for l in letters {
            c.dead_letter_id += 1;
            let letter = l.stored(c.dead_letter_id, recorded_at);
            let bytes = encode("dead letter", &letter)?;
            self.dead_letters.insert(letter.id, bytes.as_slice()).ctx("record dead letter")?;
            ids.push(letter.id);
        }
        Ok(ids)
    }
}

/// The writer thread's state: the database, the head to publish, the queue to drain.
pub(super) struct Writer {
    pub db: Arc<Database>,
    pub head: watch::Sender<u64>,
    pub commands: mpsc::Receiver<Command>,
    pub recent: Arc<Recent>,
}

impl Writer {
    /// Runs until every sender is gone (the store was closed or dropped), then releases the
    /// database so the file can be reopened.
    pub(super) fn run(self) {
        while let Ok(first) = self.commands.recv() {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match self.commands.try_recv() {
                    Ok(cmd) => group.push(cmd),
                    Err(_) => break,
                }
            }
            self.commit_group(group);
        }
        if let Err(e) = self.write_kept_ids() {
            tracing::warn!(error = %e, "event ids kept in memory not written at close; the next open reads them back");
        }
        tracing::debug!("embedded store writer stopped");
    }

    /// At a clean stop the ids kept in memory go into the idempotency tables, so the next open
    /// reads none back from the journal and an older binary finds them all.
    fn write_kept_ids(&self) -> Result<(), StoreError> {
        if self.recent.unindexed.lock().is_empty() {
            return Ok(());
        }
        let mut txn = self.db.begin_write().ctx("begin write")?;
        txn.set_durability(Durability::Immediate);
        let fresh = {
            let mut tables = Tables::open(&txn)?;
            let head = tables.counters()?.journal_seq;
            tables.write_ids(&self.recent, false, head)?;
            tables.fresh
        };
        txn.commit().ctx("commit")?;
        fresh.keep_in(&self.recent);
        Ok(())
    }

    /// Applies a group in one transaction and answers every caller after the commit.
    fn commit_group(&self, group: Vec<Command>) {
        let (ops, replies): (Vec<Op>, Vec<Reply>) = group.into_iter().map(|c| (c.op, c.reply)).unzip();
        let commands = ops.len();
        match self.apply(ops) {
            Ok((results, head)) => {
                tracing::trace!(commands, head, "embedded group committed");
                self.head.send_if_modified(|h| {
                    let advanced = head > *h;
                    if advanced {
                        *h = head;
                    }
                    advanced
                });
                for (reply, result) in replies.into_iter().zip(results) {
                    // A caller that gave up (dropped its future) simply misses the answer; the
                    // write is durable either way and a retry is a duplicate.
                    match (reply, result) {
                        (Reply::Append(tx), Applied::Append(outcome)) => {
                            let _ = tx.send(Ok(outcome));
                        }
                        (Reply::Flush(tx), Applied::Flush) => {
                            let _ = tx.send(Ok(()));
                        }
                        (Reply::Ids(tx), Applied::Ids(ids)) => {
                            let _ = tx.send(Ok(ids));
                        }
                        (Reply::Unit(tx), Applied::Unit(result)) => {
                            let _ = tx.send(result);
                        }
                        (Reply::Count(tx), Applied::Count(n)) => {
                            let _ = tx.send(Ok(n));
                        }
                        (Reply::Erased(tx), Applied::Erased(c)) => {
                            let _ = tx.send(Ok(c));
                        }
                        (reply, _) => {
                            reply.fail(StoreError::unavailable("embedded store: internal error pairing write results"))
                        }
                    }
                }
            }
            Err(err) => {
                tracing::error!(commands, error = %err, "embedded group commit failed");
                // Nothing of the group is durable: every caller must retry, whatever the cause.
                let err = StoreError::unavailable(format!("embedded store commit failed: {}", err.message));
                for reply in replies {
                    reply.fail(err.clone());
                }
            }
        }
    }

    /// One write transaction for the whole group; returns each command's result and the
    /// journal head after the commit.
    fn apply(&self, ops: Vec<Op>) -> Result<(Vec<Applied>, u64), StoreError> {
        let mut txn = self.db.begin_write().ctx("begin write")?;
        // Acknowledged means on disk: an HTTP 2xx follows this commit.
        txn.set_durability(Durability::Immediate);
        let mut results = Vec::with_capacity(ops.len());
        // The ids kept are written first when journal rows go: an expiry reads the idempotency
        // tables for what is old, and an open could not read an erased event's id back.
        let removes_rows = ops.iter().any(|op| matches!(op, Op::Expire { .. } | Op::Erase(_)));
        let (head, fresh) = {
            let mut tables = Tables::open(&txn)?;
            let before = tables.counters()?;
            let mut c = before;
            let now_ms = u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0);
            if removes_rows {
                tables.write_ids(&self.recent, false, c.journal_seq)?;
            }
            for op in ops {
                results.push(match op {
                    Op::Append(batch) => {
                        let unindexed = self.recent.unindexed.lock();
                        Applied::Append(tables.append(&mut c, batch, now_ms, &unindexed)?)
                    }
                    Op::Flush(batch) => {
                        tables.flush(&mut c, batch, now_ms)?;
                        Applied::Flush
                    }
                    Op::DeadLetters(letters) => Applied::Ids(tables.dead_letters(&mut c, letters)?),
                    Op::Audit(entries) => Applied::Ids(audit(&txn, &mut c, entries)?),
                    Op::Docs(table, docs) => Applied::Count(put_docs(&txn, table, docs)?),
                    Op::SaveSaga(saga) => Applied::Unit(save_saga(&txn, &saga)?),
                    Op::AckOutbox(ids) => {
                        self.recent.outbox.lock().forget(ids.iter().copied());
                        Applied::Count(tables.ack_outbox(&ids)?)
                    }
                    Op::Expire { before, covered } => {
                        // Whatever is covered was read long ago.
                        self.recent.events.lock().forget_through(covered);
                        Applied::Count(tables.expire(before, covered)?)
                    }
                    Op::Erase(plan) => {
                        self.recent.events.lock().forget(plan.journal.iter().copied());
                        Applied::Erased(tables.erase(&txn, &plan)?)
                    }
                });
            }
            // The kept ids are written once there are many or they are old, and this group's
            // with them.
            let due = {
                let unindexed = self.recent.unindexed.lock();
                let any = !unindexed.is_empty() || !tables.fresh.ids.is_empty();
                any && unindexed.due(tables.fresh.ids.len())
            };
            if due {
                tables.write_ids(&self.recent, true, c.journal_seq)?;
            }
            tables.save_counters(before, c)?;
            (c.journal_seq, tables.fresh)
        };
        txn.commit().ctx("commit")?;
        // Before the head moves: a reader woken by it finds them.
        fresh.keep_in(&self.recent);
        Ok((results, head))
    }
}

/// The data half of a [`Command`].
enum Op {
    Append(AppendBatch),
    Flush(FlushBatch),
    DeadLetters(Vec<NewDeadLetter>),
    Audit(Vec<NewAuditEntry>),
    Docs(DocTable, Vec<(String, Option<Vec<u8>>)>),
    SaveSaga(Box<SagaRecord>),
    AckOutbox(Vec<u64>),
    Expire { before: DateTime<Utc>, covered: u64 },
    Erase(Box<ErasePlan>),
}

/// The reply half of a [`Command`].
enum Reply {
    Append(oneshot::Sender<Result<AppendOutcome, StoreError>>),
    Flush(oneshot::Sender<Result<(), StoreError>>),
    Ids(oneshot::Sender<Result<Vec<u64>, StoreError>>),
    Unit(oneshot::Sender<Result<(), StoreError>>),
    Count(oneshot::Sender<Result<u64, StoreError>>),
    Erased(oneshot::Sender<Result<ErasureCounts, StoreError>>),
}

impl Reply {
    fn fail(self, err: StoreError) {
        let _ = match self {
            Reply::Append(tx) => tx.send(Err(err)).map_err(drop),
            Reply::Flush(tx) => tx.send(Err(err)).map_err(drop),
            Reply::Ids(tx) => tx.send(Err(err)).map_err(drop),
            Reply::Unit(tx) => tx.send(Err(err)).map_err(drop),
            Reply::Count(tx) => tx.send(Err(err)).map_err(drop),
            Reply::Erased(tx) => tx.send(Err(err)).map_err(drop),
        };
    }
}

/// Numbers and appends audit entries.
fn audit(txn: &WriteTransaction, c: &mut Counters, entries: Vec<NewAuditEntry>) -> Result<Vec<u64>, StoreError> {
    let mut table = txn.open_table(AUDIT).ctx("append audit")?;
    let mut ids = Vec::with_capacity(entries.len());
    for e in entries {
        c.audit_id += 1;
        let bytes = encode("audit entry", &AuditEntry::numbered(c.audit_id, e))?;
        table.insert(c.audit_id, bytes.as_slice()).ctx("append audit")?;
        ids.push(c.audit_id);
    }
    Ok(ids)
}

fn put_docs(txn: &WriteTransaction, table: DocTable, docs: Vec<(String, Option<Vec<u8>>)>) -> Result<u64, StoreError> {
    let def = match table {
        DocTable::Consents => CONSENTS,
        DocTable::Suppressions => SUPPRESSIONS,
        DocTable::Reviews => REVIEWS,
        DocTable::Documents => DOCUMENTS,
    };
    let mut t = txn.open_table(def).ctx("write documents")?;
    let mut changed = 0;
    for (key, doc) in docs {
        let had = match doc {
            Some(bytes) => t.insert(key.as_str(), bytes.as_slice()).ctx("write documents")?.is_some(),
            None => t.remove(key.as_str()).ctx("write documents")?.is_some(),
        };
        changed += u64::from(had);
    }
    Ok(changed)
}

/// Compare-and-set on the saga's version; a conflict is this command's answer, not the group's.
fn save_saga(txn: &WriteTransaction, saga: &SagaRecord) -> Result<Result<(), StoreError>, StoreError> {
    let mut t = txn.open_table(SAGAS).ctx("save saga")?;
    let stored = match t.get(saga.saga_id.as_str()).ctx("save saga")? {
        Some(bytes) => decode::<SagaRecord>("saga", bytes.value())?.version,
        None => 0,
    };
    if saga.version != stored + 1 {
        return Ok(Err(StoreError::conflict(format!(
            "saga {} is at version {stored}; version {} cannot follow it",
            saga.saga_id, saga.version
        ))));
    }
    let bytes = encode("saga", saga)?;
    t.insert(saga.saga_id.as_str(), bytes.as_slice()).ctx("save saga")?;
    Ok(Ok(()))
}

/// Creates every table (so readers never meet a missing one) and returns the journal head and
/// the ids of the journal events past the indexed seq, which the writer had kept in memory.
pub(super) fn initialize(db: &Database) -> Result<(u64, Vec<(String, Pending)>), StoreError> {
    let mut txn = db.begin_write().ctx("begin write")?;
    txn.set_durability(Durability::Immediate);
    let (head, unindexed) = {
        let mut tables = Tables::open(&txn)?;
        txn.open_table(CONSENTS).ctx("open table")?;
        txn.open_table(SUPPRESSIONS).ctx("open table")?;
        txn.open_table(SAGAS).ctx("open table")?;
        txn.open_table(AUDIT).ctx("open table")?;
        txn.open_table(REVIEWS).ctx("open table")?;
        txn.open_table(DOCUMENTS).ctx("open table")?;
        let head = tables.meta(META_JOURNAL_SEQ)?;
        let mut unindexed = Vec::new();
        let indexed = tables.meta.get(META_INDEXED_SEQ).ctx("read meta")?.map(|v| v.value());
        match indexed {
            // A file from before ids were kept: every journaled id is in the tables.
            None => {
                tables.meta.insert(META_INDEXED_SEQ, head).ctx("write meta")?;
            }
            // Dated now: the journal has no append time, and later is the safe side of the
            // deduplication window.
            Some(indexed) => {
                let at_ms = u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0);
                for entry in tables.journal.range(indexed.saturating_add(1)..).ctx("read journal")? {
                    let (seq, bytes) = entry.ctx("read journal")?;
                    let event: CustomerEvent = decode("event", bytes.value())?;
                    unindexed.push((event.event_id.as_str().to_string(), Pending { seq: seq.value(), at_ms }));
                }
            }
        }
        (head, unindexed)
    };
    txn.commit().ctx("initialize tables")?;
    Ok((head, unindexed))
}
