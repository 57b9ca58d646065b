//! The warehouse sink: relays the outbox that profile flushes fill to the warehouse (Bronze,
//! Silver, Gold) and to the processed-events stream, and reconciles Gold with the operational
//! store on a schedule (slide 8).
//!
//! The outbox lives in the operational store and is written in the same flush as the profiles
//! it describes, so rows are never lost and a warehouse outage never stalls the real-time path:
//! the outbox grows, failed relays back off, and everything is caught up when the warehouse
//! answers again. Every layer has a natural key, so relaying a batch twice is harmless.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::schedule::Schedule;
use cohort_adapters::warehouse::format_timestamp;
use cohort_adapters::{
    EventBus, GoldProfileRow, Layer, OperationalStore, QueryValue, SilverRow, StoreError, Warehouse, WarehouseBatch,
};
use cohort_messages::msgs::{ReconcileReport, RelayReport, WarehouseMsg};
use cohort_messages::ProfileId;
use cohort_supervisors::Metrics;
use ractor::{Actor, ActorProcessingErr, ActorRef};

/// Outbox batches merged into one warehouse write.
const BATCHES_PER_WRITE: usize = 16;
/// Outbox batches per write while a timed relay keeps up. An embedded warehouse works on the
/// event path's cores, and one large write took a core long enough to push the event-to-profile
/// p99 at 10,000 events/s to 110–680 ms; small writes with a pause after each brought it to
/// 90–220 ms (BENCHMARKS.md, session 19).
const PACED_BATCHES_PER_WRITE: usize = 2;
/// Above this many batches waiting, a timed relay writes flat out: the backlog must not grow
/// without bound, and warehouse freshness then comes first.
const PACED_BACKLOG: u64 = 64;
/// The longest pause between paced writes, so one slow write (a checkpoint) does not stall the
/// relay.
const MAX_PAUSE: Duration = Duration::from_millis(250);
/// Profiles loaded (and snapshotted) per store call.
const PROFILE_PAGE: usize = 500;
/// Longest wait between relay attempts while the warehouse keeps failing.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

pub struct WarehouseSink;

pub struct WarehouseSinkArgs {
    pub store: Arc<dyn OperationalStore>,
    pub bus: Arc<dyn EventBus>,
    pub warehouse: Arc<dyn Warehouse>,
    pub metrics: Metrics,
    pub relay_interval: Duration,
    /// `None`: reconciliation only runs when asked.
    pub reconcile_interval: Option<Duration>,
    /// Erased people: outbox rows of theirs written before the erasure are dropped, not relayed.
    pub erasures: Arc<crate::gdpr::Erasures>,
    /// Set when the warehouse gets tokens instead of personal data (`warehouse.pii`).
    pub tokenize: Option<Arc<cohort_adapters::Pii>>,
    /// Cluster mode: the outbox and Gold are shared, so timed relays and reconciliations run on
    /// the first live replica (by name) only; asked-for ones run anywhere.
    pub leader: Option<crate::cluster::MembershipSettings>,
}

pub struct WarehouseSinkState {
    args: WarehouseSinkArgs,
    _timers: Vec<Schedule>,
    failures: u32,
    next_relay: Instant,
    /// Tables are created on the first successful contact, not at start: a warehouse that is
    /// down when Cohort starts must not keep the rest from running.
    schema_ready: bool,
}

impl Actor for WarehouseSink {
    type Msg = WarehouseMsg;
    type State = WarehouseSinkState;
    type Arguments = WarehouseSinkArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<WarehouseMsg>,
        args: WarehouseSinkArgs,
    ) -> Result<WarehouseSinkState, ActorProcessingErr> {
        let mut timers = vec![Schedule::every(&myself, args.relay_interval, || WarehouseMsg::Relay { reply: None })];
        if let Some(every) = args.reconcile_interval {
            timers.push(Schedule::every(&myself, every, || WarehouseMsg::Reconcile { reply: None }));
        }
        tracing::info!(backend = args.warehouse.backend(), "warehouse sink started");
        Ok(WarehouseSinkState { args, _timers: timers, failures: 0, next_relay: Instant::now(), schema_ready: false })
    }

    async fn handle(
        &self,
        _myself: ActorRef<WarehouseMsg>,
        msg: WarehouseMsg,
        state: &mut WarehouseSinkState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WarehouseMsg::Relay { reply } => {
                // Timer ticks wait out the backoff; an explicit request always tries.
                if reply.is_none() && (Instant::now() < state.next_relay || !state.leads().await) {
                    return Ok(());
                }
                let pass = if reply.is_some() { Pass::ALL } else { Pass::timed(&state.args) };
                let result = state.relay(pass).await.map_err(|e| e.to_string());
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            WarehouseMsg::Reconcile { reply } => {
                if reply.is_none() && !state.leads().await {
                    return Ok(());
                }
                let result = match state.relay(Pass::ALL).await {
                    Ok(_) => reconcile(&state.args).await,
                    Err(e) => Err(e),
                };
                match &result {
                    Ok(r) => tracing::info!(
                        checked = r.profiles_checked,
                        missing = r.missing,
                        stale = r.stale,
                        orphaned = r.orphaned,
                        repaired = r.repaired,
                        "Gold reconciled with the operational store"
                    ),
                    Err(e) => tracing::warn!(error = %e, "Gold reconciliation failed; next run retries"),
                }
                if let Some(reply) = reply {
                    let _ = reply.send(result.map_err(|e| e.to_string()));
                }
            }
        }
        Ok(())
    }
}

impl WarehouseSinkState {
    /// Whether timed work is this replica's: always outside cluster mode, and when the
    /// membership cannot be read (a duplicate relay is harmless, a missing one is not).
    async fn leads(&self) -> bool {
        crate::cluster::leads(self.args.store.as_ref(), self.args.leader.as_ref(), "warehouse relay").await
    }

    fn set_outbox_gauge(&self, batches: u64) {
        self.args.metrics.warehouse_outbox.set(i64::try_from(batches).unwrap_or(i64::MAX));
    }

    /// One relay pass with its bookkeeping: metrics, and backoff after a failure.
    async fn relay(&mut self, pass: Pass) -> Result<RelayReport, StoreError> {
        let attempt = async {
            if !self.schema_ready {
                self.args.warehouse.ensure_schema().await?;
                self.schema_ready = true;
            }
            relay(&self.args, pass).await
        };
        match attempt.await {
            Ok(report) => {
                self.set_outbox_gauge(report.remaining);
                self.failures = 0;
                self.next_relay = Instant::now();
                Ok(report)
            }
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                let wait = self.args.relay_interval.saturating_mul(1 << self.failures.min(10)).min(MAX_BACKOFF);
                self.next_relay = Instant::now() + wait;
                self.args.metrics.warehouse_failures.inc();
                // Operators alert on this gauge during an outage, when no relay moves anything:
                // count what waits after a failure too.
                match self.args.store.outbox_len().await {
                    Ok(n) => self.set_outbox_gauge(n),
                    Err(e) => tracing::debug!(error = %e, "outbox length unreadable"),
                }
                tracing::warn!(
                    error = %e,
                    failures = self.failures,
                    retry_in_ms = wait.as_millis() as u64,
                    "warehouse relay failed; the outbox keeps the rows"
                );
                Err(e)
            }
        }
    }
}

/// Removes the rows of erased profiles (and the raw payloads their events came from) from a
/// batch about to be relayed: the outbox may still hold rows written before the erasure.
fn drop_erased(erasures: &crate::gdpr::Erasures, batch: &mut WarehouseBatch) -> Vec<u64> {
    let erased_raw: std::collections::HashSet<u64> =
        batch.silver.iter().filter(|r| erasures.is_erased(&r.profile_id)).filter_map(|r| r.raw_seq).collect();
    batch.silver.retain(|r| !erasures.is_erased(&r.profile_id));
    batch.gold.retain(|p| !erasures.is_erased(p));
    batch.gold_rows.retain(|row| !erasures.is_erased(&row.profile_id));
    batch.bronze.retain(|b| !erased_raw.contains(&b.raw_seq));
    erased_raw.into_iter().collect()
}

/// How one relay pass runs.
#[derive(Debug, Clone, Copy)]
struct Pass {
    /// Small writes with pauses while the backlog is small (see [`PACED_BATCHES_PER_WRITE`]).
    paced: bool,
    /// Stop after the write that passes this, and leave the rest to the next tick: under steady
    /// load a pass would otherwise never end, and explicit requests, reconciliations and the
    /// outbox gauge would wait behind it.
    until: Option<Instant>,
}

impl Pass {
    /// An explicit request (a deletion saga, shutdown, a replay): everything, now.
    const ALL: Pass = Pass { paced: false, until: None };

    /// A timer tick: one relay interval's worth of work, paced when the warehouse shares our cores.
    fn timed(args: &WarehouseSinkArgs) -> Pass {
        Pass { paced: args.warehouse.runs_in_process(), until: Some(Instant::now() + args.relay_interval) }
    }
}

/// The size of the next write and whether to pause after it, with `waiting` outbox batches known
/// to wait (0 before the first write, so an idle tick asks for no count, and a pass starts small).
fn pacing(paced: bool, waiting: u64) -> (usize, bool) {
    if paced && waiting <= PACED_BACKLOG {
        (PACED_BATCHES_PER_WRITE, true)
    } else {
        (BATCHES_PER_WRITE, false)
    }
}

/// Moves what the outbox holds, oldest first: all of it, or until `pass.until`. A paced pass
/// pauses after each write as long as the write's round (read, write, acknowledgement) took.
async fn relay(args: &WarehouseSinkArgs, pass: Pass) -> Result<RelayReport, StoreError> {
    let paced = pass.paced;
    let mut report = RelayReport::default();
    let mut waiting = 0;
    loop {
        let (per_write, pause) = pacing(paced, waiting);
        let started = Instant::now();
        let batches = args.store.read_outbox(per_write).await?;
        if batches.is_empty() {
            break;
        }
        let full = batches.len() == per_write;
        let mut merged = WarehouseBatch::default();
        let mut ids = Vec::with_capacity(batches.len());
        for (id, batch) in batches {
            ids.push(id);
            merged.extend(batch);
        }
        let dropped = drop_erased(&args.erasures, &mut merged);
        crate::quality::record_erased_bronze(args.store.as_ref(), &dropped).await?;
        let counts = write(args, merged).await?;
        args.store.ack_outbox(&ids).await?;
        report.batches += ids.len();
        report.bronze += counts.0;
        report.silver += counts.1;
        report.gold += counts.2;
        if !full || pass.until.is_some_and(|t| Instant::now() >= t) {
            break;
        }
        if pause {
            tokio::time::sleep(started.elapsed().min(MAX_PAUSE)).await;
        }
        if paced {
            waiting = args.store.outbox_len().await?;
        }
    }
    // An idle tick found the outbox empty already: no count query every relay interval.
    report.remaining = if report.batches == 0 { 0 } else { args.store.outbox_len().await? };
    Ok(report)
}

/// Writes one merged batch: processed events, then Bronze, Silver and Gold.
async fn write(args: &WarehouseSinkArgs, batch: WarehouseBatch) -> Result<(usize, usize, usize), StoreError> {
    let WarehouseBatch { mut bronze, mut silver, gold, gold_rows } = batch;
    let (n_bronze, n_silver) = (bronze.len(), silver.len());
    if !silver.is_empty() {
        args.bus.publish_processed(&silver).await?;
        args.metrics.processed_published.inc_by(n_silver as u64);
    }
    if let Some(pii) = &args.tokenize {
        for row in &mut silver {
            tokenize_silver(pii, row);
        }
        for row in &mut bronze {
            row.payload = pii.seal_text(&row.payload);
        }
    }
    if !bronze.is_empty() {
        timed(args, "bronze", args.warehouse.write_bronze(bronze)).await?;
        args.metrics.warehouse_rows.with_label_values(&["bronze"]).inc_by(n_bronze as u64);
    }
    if !silver.is_empty() {
        timed(args, "silver", args.warehouse.write_silver(silver)).await?;
        args.metrics.warehouse_rows.with_label_values(&["silver"]).inc_by(n_silver as u64);
    }
    // Older outbox entries name profiles instead: their current records are loaded.
    let mut seen = HashSet::new();
    let ids: Vec<ProfileId> = gold.into_iter().filter(|id| seen.insert(id.clone())).collect();
    let mut rows = Vec::new();
    for page in ids.chunks(PROFILE_PAGE) {
        rows.extend(args.store.load_profiles(page).await?.iter().map(GoldProfileRow::from_record));
    }
    rows.extend(gold_rows);
    let rows = newest_per_profile(rows);
    let n_gold = rows.len();
    if n_gold > 0 {
        let rows = rows.into_iter().map(|row| tokenize_gold(args, row)).collect();
        timed(args, "gold", args.warehouse.write_gold_profiles(rows)).await?;
        args.metrics.warehouse_rows.with_label_values(&["gold"]).inc_by(n_gold as u64);
    }
    Ok((n_bronze, n_silver, n_gold))
}

/// One Gold row per profile, the latest snapshot, in first-seen order: a profile several
/// flushes changed is written once per relay cycle. Of equal times the later row wins: a merge
/// changes a record without moving its time, and the outbox is in flush order.
fn newest_per_profile(rows: Vec<GoldProfileRow>) -> Vec<GoldProfileRow> {
    let mut at: HashMap<ProfileId, usize> = HashMap::with_capacity(rows.len());
    let mut out: Vec<GoldProfileRow> = Vec::with_capacity(rows.len());
    for row in rows {
        match at.get(&row.profile_id) {
            Some(&i) => {
                if let Some(kept) = out.get_mut(i).filter(|kept| row.snapshot_at >= kept.snapshot_at) {
                    *kept = row;
                }
            }
            None => {
                at.insert(row.profile_id.clone(), out.len());
                out.push(row);
            }
        }
    }
    out
}

/// Replaces a Silver row's personal data by tokens (`warehouse.pii = "tokenize"`).
pub fn tokenize_silver(pii: &cohort_adapters::Pii, row: &mut SilverRow) {
    pii.tokenize(&mut row.identifiers);
    pii.tokenize(&mut row.traits);
    pii.tokenize(&mut row.properties);
}

/// Runs one warehouse write and records its latency and outcome.
async fn timed(
    args: &WarehouseSinkArgs,
    layer: &str,
    write: impl std::future::Future<Output = Result<(), StoreError>>,
) -> Result<(), StoreError> {
    let started = Instant::now();
    let result = write.await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    args.metrics.warehouse_write_duration.with_label_values(&[layer, outcome]).observe(started.elapsed().as_secs_f64());
    result
}

/// A Gold row, tokenized when the warehouse gets no personal data.
fn tokenize_gold(args: &WarehouseSinkArgs, mut row: GoldProfileRow) -> GoldProfileRow {
    if let Some(pii) = &args.tokenize {
        pii.tokenize(&mut row.traits);
        pii.tokenize(&mut row.identifiers);
    }
    row
}

/// Latest Gold snapshot time per profile id in `(after, upto]` (`upto` `None`: no upper bound).
async fn gold_snapshots(
    warehouse: &dyn Warehouse,
    after: &str,
    upto: Option<&str>,
) -> Result<HashMap<String, (String, Option<u64>)>, StoreError> {
    let gold = warehouse.table(Layer::Gold);
    let mut params = vec![("after".to_string(), QueryValue::String(after.to_string()))];
    let columns = "profile_id, snapshot_at, events_total";
    let sql = match upto {
        Some(upto) => {
            params.push(("upto".to_string(), QueryValue::String(upto.to_string())));
            format!("SELECT {columns} FROM {gold} WHERE profile_id > @after AND profile_id <= @upto")
        }
        None => format!("SELECT {columns} FROM {gold} WHERE profile_id > @after"),
    };
    let result = warehouse.query(&sql, &params).await?;
    let mut out = HashMap::with_capacity(result.rows.len());
    for row in result.rows {
        if let (Some(id), Some(at)) = (row.first().and_then(|v| v.as_str()), row.get(1).and_then(|v| v.as_str())) {
            let events = row.get(2).and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok()));
            out.insert(id.to_string(), (at.to_string(), events));
        }
    }
    Ok(out)
}

/// Compares every stored profile with its latest Gold snapshot, page by page, and writes a new
/// snapshot where Gold is missing or differs. Gold profiles the store does not have are only
/// reported: absence in the store is not proof enough to destroy analytics data (erasure
/// deletes from the warehouse explicitly).
async fn reconcile(args: &WarehouseSinkArgs) -> Result<ReconcileReport, StoreError> {
    let mut report = ReconcileReport::default();
    let mut after: Option<ProfileId> = None;
    loop {
        let ids = args.store.list_profile_ids(after.as_ref(), PROFILE_PAGE).await?;
        let lower = after.as_ref().map_or("", ProfileId::as_str).to_string();
        let Some(last) = ids.last().cloned() else {
            let tail = gold_snapshots(args.warehouse.as_ref(), &lower, None).await?;
            report.orphaned += tail.len() as u64;
            break;
        };
        let gold = gold_snapshots(args.warehouse.as_ref(), &lower, Some(last.as_str())).await?;
        let known: HashSet<&str> = ids.iter().map(ProfileId::as_str).collect();
        report.orphaned += gold.keys().filter(|id| !known.contains(id.as_str())).count() as u64;
        let records = args.store.load_profiles(&ids).await?;
        let mut repair = Vec::new();
        // An erased profile's record may still be read before its deletion reaches the store;
        // writing it would bring the person back into Gold.
        for record in records.iter().filter(|r| !args.erasures.is_erased(&r.profile_id)) {
            report.profiles_checked += 1;
            match gold.get(record.profile_id.as_str()) {
                None => report.missing += 1,
                // A merge adds events without moving the survivor's time.
                Some((at, events))
                    if *at != format_timestamp(record.updated_at) || *events != Some(record.counters.events_total) =>
                {
                    report.stale += 1
                }
                Some(_) => continue,
            }
            repair.push(tokenize_gold(args, GoldProfileRow::from_record(record)));
        }
        if !repair.is_empty() {
            let n = repair.len() as u64;
            args.warehouse.write_gold_profiles(repair).await?;
            report.repaired += n;
        }
        if ids.len() < PROFILE_PAGE {
            let tail = gold_snapshots(args.warehouse.as_ref(), last.as_str(), None).await?;
            report.orphaned += tail.len() as u64;
            break;
        }
        after = Some(last);
    }
    let m = &args.metrics;
    m.reconcile_runs.inc();
    m.reconcile_repaired.inc_by(report.repaired);
    for (kind, n) in [("missing", report.missing), ("stale", report.stale), ("orphaned", report.orphaned)] {
        m.reconcile_drift.with_label_values(&[kind]).set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use cohort_adapters::crypto::KeyedHasher;
    use cohort_adapters::{open_warehouse, EmbeddedBus, EmbeddedStore, FlushBatch, WarehouseBatch};
    use cohort_messages::{EventId, ProfileRecord, Source};

    fn record(name: &str, events: u64, secs: i64) -> ProfileRecord {
        let at = chrono::DateTime::from_timestamp(1_764_000_000 + secs, 0).unwrap();
        let id = ProfileId::derive_from_event(&EventId::new(Source::Web, name), chrono::DateTime::UNIX_EPOCH);
        let mut r = ProfileRecord::new(id, at);
        r.counters.events_total = events;
        r.updated_at = at;
        r
    }

    /// A sink on an in-memory store and `warehouse`, with no timers of its own.
    fn args(store: &Arc<EmbeddedStore>, warehouse: Arc<dyn Warehouse>, metrics: &Metrics) -> WarehouseSinkArgs {
        let dyn_store: Arc<dyn OperationalStore> = store.clone();
        WarehouseSinkArgs {
            store: dyn_store.clone(),
            bus: Arc::new(EmbeddedBus::new(store.clone(), dyn_store)),
            warehouse,
            metrics: metrics.clone(),
            relay_interval: Duration::from_secs(3600),
            reconcile_interval: None,
            erasures: Arc::new(crate::gdpr::Erasures::new(KeyedHasher::from_secret(&[7u8; 32]).unwrap())),
            tokenize: None,
            leader: None,
        }
    }

    /// An in-memory store and DuckDB warehouse (schema made), and a sink's arguments on them.
    async fn sink() -> (Arc<EmbeddedStore>, Arc<dyn Warehouse>, Metrics, WarehouseSinkArgs) {
        let store = EmbeddedStore::in_memory().unwrap();
        let warehouse = open_warehouse("memory://").await.unwrap();
        warehouse.ensure_schema().await.unwrap();
        let metrics = Metrics::new().unwrap();
        let args = args(&store, warehouse.clone(), &metrics);
        (store, warehouse, metrics, args)
    }

    /// `n` outbox batches of one Gold row each, for profiles named `{prefix}{i}`.
    async fn fill_outbox(store: &Arc<EmbeddedStore>, prefix: &str, n: usize) {
        for i in 0..n {
            let row = GoldProfileRow::from_record(&record(&format!("{prefix}{i}"), 1, i as i64));
            let outbox = WarehouseBatch { gold_rows: vec![row], ..WarehouseBatch::default() };
            store.commit_flush(FlushBatch { outbox, ..FlushBatch::default() }).await.unwrap();
        }
    }

    /// Successful Gold writes so far: one per relay write.
    fn gold_writes(metrics: &Metrics) -> u64 {
        metrics.warehouse_write_duration.with_label_values(&["gold", "ok"]).get_sample_count()
    }

    /// Gold travels in the outbox as the flush took it: the relay writes the newest snapshot per
    /// profile without loading a record, and still loads the profiles older entries name.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_relay_writes_the_newest_gold_row_per_profile_and_loads_only_what_old_entries_name() {
        let (store, warehouse, _metrics, args) = sink().await;
        // Never stored: only the outbox knows this profile, at two flushes.
        let (older, newer) = (record("ana", 1, 0), record("ana", 2, 5));
        // Stored, and named by an entry of the earlier format.
        let named = record("ben", 7, 3);
        let flushes = [
            WarehouseBatch { gold_rows: vec![GoldProfileRow::from_record(&older)], ..WarehouseBatch::default() },
            WarehouseBatch { gold_rows: vec![GoldProfileRow::from_record(&newer)], ..WarehouseBatch::default() },
            WarehouseBatch { gold: vec![named.profile_id.clone()], ..WarehouseBatch::default() },
        ];
        store.commit_flush(FlushBatch { profiles: vec![named.clone()], ..FlushBatch::default() }).await.unwrap();
        for outbox in flushes.into_iter().rev() {
            store.commit_flush(FlushBatch { outbox, ..FlushBatch::default() }).await.unwrap();
        }
        let report = relay(&args, Pass::ALL).await.unwrap();
        assert_eq!((report.batches, report.gold, report.remaining), (3, 2, 0));
        let gold = warehouse
            .query("SELECT profile_id, events_total FROM gold_profiles_latest ORDER BY events_total", &[])
            .await
            .unwrap();
        let expected =
            [(&newer, 2), (&named, 7)].map(|(r, n)| vec![serde_json::json!(r.profile_id), serde_json::json!(n)]);
        assert_eq!(gold.rows, expected);
    }

    /// The outbox gauge is what an outage alert watches, so a relay that fails still counts what
    /// waits: a warehouse down from the start must not read as an empty outbox.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_relay_still_reports_the_batches_waiting_in_the_outbox() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.duckdb");
        let store = EmbeddedStore::in_memory().unwrap();
        let warehouse = open_warehouse(&format!("duckdb://{}", file.display())).await.unwrap();
        // The file goes away and a folder takes its name: every later opening fails.
        tokio::time::sleep(Duration::from_millis(600)).await;
        std::fs::remove_file(&file).unwrap();
        std::fs::create_dir(&file).unwrap();
        let metrics = Metrics::new().unwrap();
        let args = args(&store, warehouse, &metrics);
        fill_outbox(&store, "p", 3).await;
        let mut state = WarehouseSinkState {
            args,
            _timers: Vec::new(),
            failures: 0,
            next_relay: Instant::now(),
            schema_ready: false,
        };
        assert!(state.relay(Pass::timed(&state.args)).await.is_err(), "the warehouse file cannot be opened");
        assert_eq!(metrics.warehouse_outbox.get(), 3);
        assert_eq!(metrics.warehouse_failures.get(), 1);
        assert!(state.next_relay > Instant::now(), "the next relay waits out a backoff");
        // The warehouse back: a relay that moves everything leaves the gauge at 0.
        std::fs::remove_dir(&file).unwrap();
        state.relay(Pass::timed(&state.args)).await.unwrap();
        assert_eq!(metrics.warehouse_outbox.get(), 0);
    }

    #[test]
    fn a_timed_relay_writes_small_and_pauses_only_while_it_keeps_up() {
        assert_eq!(pacing(true, 0), (PACED_BATCHES_PER_WRITE, true), "a tick starts small");
        assert_eq!(pacing(true, PACED_BACKLOG), (PACED_BATCHES_PER_WRITE, true));
        assert_eq!(pacing(true, PACED_BACKLOG + 1), (BATCHES_PER_WRITE, false), "a backlog goes flat out");
        assert_eq!(pacing(false, 0), (BATCHES_PER_WRITE, false), "an explicit request goes flat out");
    }

    /// A paced pass still moves everything that waits, in several small writes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paced_relay_moves_the_whole_outbox() {
        let (store, warehouse, metrics, args) = sink().await;
        assert!(warehouse.runs_in_process(), "DuckDB shares our cores: its timed relays are paced");
        let n = 2 * PACED_BATCHES_PER_WRITE + 1;
        fill_outbox(&store, "p", n).await;
        let report = relay(&args, Pass { paced: true, until: None }).await.unwrap();
        assert_eq!((report.batches, report.gold, report.remaining), (n, n, 0));
        assert_eq!(gold_writes(&metrics), 3, "{n} batches in writes of {PACED_BATCHES_PER_WRITE}");
        let gold = warehouse.query("SELECT count(*) FROM gold_profiles_latest", &[]).await.unwrap();
        assert_eq!(gold.rows, vec![vec![serde_json::json!(n)]]);
        // A timed pass past its deadline stops after one write, leaving the rest to the next tick.
        fill_outbox(&store, "q", n).await;
        let report = relay(&args, Pass { paced: true, until: Some(Instant::now()) }).await.unwrap();
        let left = (n - PACED_BATCHES_PER_WRITE) as u64;
        assert_eq!((report.batches, report.remaining), (PACED_BATCHES_PER_WRITE, left));
    }

    /// Behind a backlog a paced pass writes flat out until the backlog is small again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paced_relay_behind_a_backlog_writes_flat_out_until_it_is_small() {
        let (store, _warehouse, metrics, args) = sink().await;
        let n = PACED_BACKLOG as usize + 6;
        fill_outbox(&store, "p", n).await;
        let report = relay(&args, Pass { paced: true, until: None }).await.unwrap();
        assert_eq!((report.batches, report.remaining), (n, 0));
        // 70 waiting: one small write (68 left, above the backlog), one flat-out write (52 left),
        // then small writes for the rest.
        let flat_out = n - PACED_BATCHES_PER_WRITE - BATCHES_PER_WRITE;
        let expected = 2 + flat_out.div_ceil(PACED_BATCHES_PER_WRITE);
        assert_eq!(gold_writes(&metrics), expected as u64);
    }

    /// The actor paces its timer's passes on an in-process warehouse, never a relay somebody
    /// asked for (a deletion saga or shutdown waits on it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_sink_paces_timed_relays_and_never_asked_for_ones() {
        let (store, _warehouse, metrics, args) = sink().await;
        let (sink, _) = Actor::spawn(None, WarehouseSink, args).await.unwrap();
        let asked = || async { ractor::call_t!(sink, |reply| WarehouseMsg::Relay { reply: Some(reply) }, 10_000) };
        let n = 2 * PACED_BATCHES_PER_WRITE + 1;
        fill_outbox(&store, "p", n).await;
        sink.send_message(WarehouseMsg::Relay { reply: None }).unwrap();
        // Answered after the tick's pass, which went first.
        let report = asked().await.unwrap().unwrap();
        assert_eq!(report.batches, 0, "the tick moved everything");
        assert_eq!(gold_writes(&metrics), 3, "the tick wrote {n} batches {PACED_BATCHES_PER_WRITE} at a time");
        fill_outbox(&store, "q", n).await;
        let report = asked().await.unwrap().unwrap();
        assert_eq!((report.batches, report.remaining), (n, 0));
        assert_eq!(gold_writes(&metrics), 4, "the asked-for relay wrote all {n} at once");
        sink.stop(None);
    }

    #[test]
    fn of_several_snapshots_of_a_profile_the_latest_is_kept_in_first_seen_order() {
        let (a1, b, a2, a0) = (record("a", 1, 1), record("b", 1, 1), record("a", 2, 2), record("a", 0, 0));
        // Flushed after a merge that kept the time of `a2`.
        let a3 = record("a", 3, 2);
        let rows = [&a1, &b, &a2, &a0, &a3].map(GoldProfileRow::from_record).to_vec();
        let kept = newest_per_profile(rows);
        assert_eq!(kept.iter().map(|r| r.events_total).collect::<Vec<_>>(), vec![3, 1]);
        assert_eq!(kept[0].profile_id, a1.profile_id);
    }

    /// A Gold row as old as the record by its time but not by its content (a merge kept the
    /// survivor's time) is stale: reconcile writes it again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reconcile_repairs_a_gold_row_whose_time_matches_but_whose_content_is_behind() {
        let (store, warehouse, _metrics, args) = sink().await;
        let (before, merged) = (record("ana", 1, 5), record("ana", 3, 5));
        warehouse.write_gold_profiles(vec![GoldProfileRow::from_record(&before)]).await.unwrap();
        store.commit_flush(FlushBatch { profiles: vec![merged], ..FlushBatch::default() }).await.unwrap();
        let report = reconcile(&args).await.unwrap();
        assert_eq!((report.stale, report.repaired), (1, 1), "{report:?}");
        let gold = warehouse.query("SELECT events_total FROM gold_profiles_latest", &[]).await.unwrap();
        assert_eq!(gold.rows, vec![vec![serde_json::json!(3)]]);
        let again = reconcile(&args).await.unwrap();
        assert_eq!((again.stale, again.repaired), (0, 0), "{again:?}");
    }

    /// Reconcile never writes an erased profile back, though its record is still in the store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reconcile_leaves_erased_profiles_out_of_gold() {
        let (store, warehouse, _metrics, args) = sink().await;
        let (gone, kept) = (record("ana", 1, 5), record("ben", 1, 5));
        store
            .commit_flush(FlushBatch { profiles: vec![gone.clone(), kept.clone()], ..FlushBatch::default() })
            .await
            .unwrap();
        args.erasures.mark_erased([gone.profile_id.clone()]);
        let report = reconcile(&args).await.unwrap();
        assert_eq!((report.missing, report.repaired), (1, 1), "{report:?}");
        let gold = warehouse.query("SELECT profile_id FROM gold_profiles_latest", &[]).await.unwrap();
        assert_eq!(gold.rows, vec![vec![serde_json::json!(kept.profile_id)]]);
    }
}
