//! The event bus: where ingest makes events durable and the pipeline reads them back.
//!
//! A position is packed into a `u64` (`stream << 40 | offset`): a stream is one ordered log (the
//! embedded journal is stream 0; a Kafka topic partition is a stream), so the pipeline tracks
//! progress per stream without caring which bus it runs on.

use crate::store::{AppendBatch, AppendOutcome, BronzeRecord, EventLog, JournaledEvent, OperationalStore};
use crate::{SilverRow, StoreError};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cohort_messages::{msgs::IdentityEvent, segment::SegmentChanged, DeadLetter, ErasureCounts, ErasureTarget};
use std::sync::Arc;
use std::time::Duration;

const STREAM_SHIFT: u32 = 40;
const OFFSET_MASK: u64 = (1 << STREAM_SHIFT) - 1;

/// Packs a stream and an offset into one position.
pub fn pack(stream: u32, offset: u64) -> u64 {
    ((stream as u64) << STREAM_SHIFT) | (offset & OFFSET_MASK)
}

/// Splits a position into its stream and offset.
pub fn unpack(position: u64) -> (u32, u64) {
    ((position >> STREAM_SHIFT) as u32, position & OFFSET_MASK)
}

/// How far the pipeline has durably processed each stream: `(stream, last processed offset)`.
pub type StreamPositions = Vec<(u32, u64)>;

/// A record on the bus that is not a Cohort event (written by something else, or corrupted):
/// it is dead-lettered, never allowed to stop the pipeline.
#[derive(Debug, Clone)]
pub struct Undecodable {
    pub seq: u64,
    pub source: Option<cohort_messages::Source>,
    pub payload: String,
    pub reason: String,
}

/// One poll's worth of records, in position order per stream.
#[derive(Debug, Clone, Default)]
pub struct Polled {
    pub events: Vec<JournaledEvent>,
    pub undecodable: Vec<Undecodable>,
    /// Raw payloads (Bronze) of these events, keyed by the `raw.seq` the events carry.
    pub raw: Vec<(u64, BronzeRecord)>,
}

impl Polled {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.undecodable.is_empty()
    }
}

#[async_trait]
pub trait EventBus: Send + Sync + 'static {
    /// Makes a batch durable (broker-acknowledged or committed) before returning.
    async fn publish(&self, batch: AppendBatch) -> Result<AppendOutcome, StoreError>;
    /// Opens the pipeline's subscription, starting after the durable positions. With
    /// `with_raw`, polls also return the events' raw payloads (only the warehouse needs them).
    async fn subscribe(&self, with_raw: bool) -> Result<Box<dyn Subscription>, StoreError>;
    /// Records that everything up to these positions is reflected in the store. Buses whose
    /// positions live in the store itself (the embedded journal) do nothing here.
    async fn commit(&self, positions: &StreamPositions) -> Result<(), StoreError>;
    /// Whether the checkpoint is written with the store's flush (embedded) or committed to the bus.
    fn checkpoint_in_store(&self) -> bool;
    /// Whether `publish` already refuses event ids it has seen (embedded) or the consumer must
    /// deduplicate with the store's idempotency keys (Kafka).
    fn deduplicates_on_publish(&self) -> bool;
    /// The highest position this process has published to, per stream (for draining).
    fn published(&self) -> StreamPositions;
    /// Whether each consumer group this process subscribed to has given it an assignment (an
    /// empty one counts) since start. Readiness waits for it, so a rollout replaces the next
    /// replica only after this one has joined.
    fn joined(&self) -> bool {
        true
    }
    /// Every partition (`topic/partition`) of the topics this process's consumer groups
    /// subscribe to, from the broker's metadata; empty without groups.
    fn group_partitions(&self) -> Vec<String> {
        Vec::new()
    }
    /// Leaves and rejoins the consumer groups that consume any of `partitions`, which makes the
    /// group rebalance anew: the repair for a broker that left partitions with no live member.
    async fn rejoin(&self, _partitions: &[String]) -> Result<(), StoreError> {
        Ok(())
    }
    /// Of `positions`, those this process consumes now. A replica stopping in a consumer group
    /// waits only for its own partitions: the others' are drained by their owners.
    fn consumed_here(&self, positions: StreamPositions) -> StreamPositions {
        positions
    }
    /// The partitions this process consumes now (`topic/partition`), for the cluster view.
    fn assignment(&self) -> Vec<String>;
    /// Cluster mode: produces changes to `cdp.processed.events`, each to the partition of its
    /// profile ([`cohort_messages::cluster::partition_of`]), and waits for every delivery.
    async fn publish_routed(&self, _changes: &[cohort_messages::cluster::RoutedChange]) -> Result<(), StoreError> {
        Err(no_cluster_mode())
    }
    /// Cluster mode: consumes `cdp.processed.events` in the group `{group_id}.profiles`;
    /// rebalances assign and revoke partitions in `ownership`. `commit` then also commits these
    /// positions, for owned partitions only.
    async fn subscribe_routed(
        &self,
        _ownership: Arc<crate::cluster::Ownership>,
    ) -> Result<Box<dyn RoutedSubscription>, StoreError> {
        Err(no_cluster_mode())
    }
    /// Publishes events attributed to their profiles (`cdp.processed.events`, keyed by profile
    /// id) for downstream consumers. A bus without such a stream accepts and keeps nothing.
    async fn publish_processed(&self, rows: &[SilverRow]) -> Result<(), StoreError>;
    /// Publishes stored dead letters (`cdp.dlq`, keyed by source) for operators' tooling. A bus
    /// without such a stream accepts and keeps nothing: the store is the record either way.
    async fn publish_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), StoreError>;
    /// Publishes persisted identity-graph changes (`IdentityMerged`, `IdentityUnmerged`) to
    /// `cdp.identity`, keyed by the survivor; the embedded bus has no such stream (the store's
    /// merge records and audit log are the record there).
    async fn publish_identity(&self, events: &[IdentityEvent]) -> Result<(), StoreError>;
    /// Publishes segment entries and exits: on Kafka to `cdp.segment.change`, keyed by profile;
    /// on the embedded bus to its in-process stream ([`EventBus::subscribe_segment_changes`]).
    async fn publish_segment_changes(&self, changes: &[SegmentChanged]) -> Result<(), StoreError>;
    /// The embedded bus's segment-change stream for in-process subscribers (`None` on Kafka:
    /// consumers read `cdp.segment.change`).
    fn subscribe_segment_changes(&self) -> Option<tokio::sync::broadcast::Receiver<SegmentChanged>> {
        None
    }
    /// Retention of a bus that keeps its own log (the embedded journal): forgets what was
    /// received before `before` and is covered by `covered`. Kafka's retention is the broker's.
    async fn apply_retention(&self, before: DateTime<Utc>, covered: &StreamPositions) -> Result<u64, StoreError>;
    fn name(&self) -> &'static str;
    /// GDPR erasure of what the bus itself keeps: the embedded journal removes the person's
    /// events and raw payloads. Kafka topics are append-only (their records expire with the
    /// topic's retention), so Kafka removes nothing here and answers zeros.
    async fn erase_person(&self, target: &ErasureTarget) -> Result<ErasureCounts, StoreError>;
    /// What [`EventBus::erase_person`] would still find.
    async fn person_remnants(&self, target: &ErasureTarget) -> Result<ErasureCounts, StoreError>;
    /// Writes keyed records to the compacted `cdp.gdpr` topic; `None` is a tombstone (consumers
    /// delete what they hold under that key). Returns how many were written; the embedded bus
    /// has no such topic and writes none.
    async fn publish_gdpr(&self, records: &[(String, Option<Vec<u8>>)]) -> Result<u64, StoreError>;
}

/// One poll of `cdp.processed.events` (cluster mode), in position order per partition.
#[derive(Debug, Default)]
pub struct RoutedPolled {
    pub changes: Vec<(u64, cohort_messages::cluster::RoutedChange)>,
    pub undecodable: Vec<Undecodable>,
}

#[async_trait]
pub trait RoutedSubscription: Send + 'static {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<RoutedPolled, StoreError>;
}

fn no_cluster_mode() -> StoreError {
    StoreError::invalid("cluster mode needs the Kafka bus (bus.url = \"kafka://...\")")
}

#[async_trait]
pub trait Subscription: Send + 'static {
    /// Where consumption starts: per stream, the last offset already processed.
    fn start(&self) -> StreamPositions;
    /// The next events in position order per stream; waits up to `wait` when there are none.
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Polled, StoreError>;
    /// Records published but not yet read, per (topic, partition), from what the client knows
    /// without a round trip (for the consumer-lag metric).
    fn lag(&self) -> Vec<(String, i32, i64)> {
        Vec::new()
    }
}

/// The embedded bus: the journal in the embedded store, one stream, checkpoint in the store.
pub struct EmbeddedBus {
    log: Arc<dyn EventLog>,
    store: Arc<dyn OperationalStore>,
    /// Segment entries and exits for in-process subscribers (the embedded `cdp.segment.change`).
    segment_changes: tokio::sync::broadcast::Sender<SegmentChanged>,
}

/// Changes a slow subscriber may fall behind by before it misses some (it is told how many).
const SEGMENT_CHANGE_BUFFER: usize = 4096;

impl EmbeddedBus {
    pub fn new(log: Arc<dyn EventLog>, store: Arc<dyn OperationalStore>) -> Self {
        let (segment_changes, _) = tokio::sync::broadcast::channel(SEGMENT_CHANGE_BUFFER);
        Self { log, store, segment_changes }
    }
}

#[async_trait]
impl EventBus for EmbeddedBus {
    async fn publish(&self, batch: AppendBatch) -> Result<AppendOutcome, StoreError> {
        self.log.append(batch).await
    }

    async fn subscribe(&self, with_raw: bool) -> Result<Box<dyn Subscription>, StoreError> {
        let checkpoint = self.store.checkpoint().await?;
        Ok(Box::new(JournalSubscription {
            log: self.log.clone(),
            next_after: checkpoint,
            head: self.log.watch_head(),
            with_raw,
        }))
    }

    async fn commit(&self, _positions: &StreamPositions) -> Result<(), StoreError> {
        Ok(())
    }

    fn checkpoint_in_store(&self) -> bool {
        true
    }

    fn deduplicates_on_publish(&self) -> bool {
        true
    }

    fn published(&self) -> StreamPositions {
        vec![(0, *self.log.watch_head().borrow())]
    }

    fn assignment(&self) -> Vec<String> {
        // One process owns the journal file.
        vec!["journal/0".to_string()]
    }

    fn name(&self) -> &'static str {
        "embedded"
    }

    async fn publish_processed(&self, _rows: &[SilverRow]) -> Result<(), StoreError> {
        Ok(())
    }

    async fn publish_dead_letters(&self, _letters: &[DeadLetter]) -> Result<(), StoreError> {
        Ok(())
    }

    async fn publish_identity(&self, _events: &[IdentityEvent]) -> Result<(), StoreError> {
        Ok(())
    }

    async fn publish_segment_changes(&self, changes: &[SegmentChanged]) -> Result<(), StoreError> {
        for c in changes {
            // No subscriber is not an error: the membership documents are the record.
            let _ = self.segment_changes.send(c.clone());
        }
        Ok(())
    }

    fn subscribe_segment_changes(&self) -> Option<tokio::sync::broadcast::Receiver<SegmentChanged>> {
        Some(self.segment_changes.subscribe())
    }

    async fn apply_retention(&self, before: DateTime<Utc>, covered: &StreamPositions) -> Result<u64, StoreError> {
        let covered = covered.iter().find(|(s, _)| *s == 0).map_or(0, |(_, o)| *o);
        self.log.compact(before, covered).await
    }

    async fn erase_person(&self, target: &ErasureTarget) -> Result<ErasureCounts, StoreError> {
        self.log.erase_matching(target).await
    }

    async fn person_remnants(&self, target: &ErasureTarget) -> Result<ErasureCounts, StoreError> {
        self.log.count_matching(target).await
    }

    async fn publish_gdpr(&self, _records: &[(String, Option<Vec<u8>>)]) -> Result<u64, StoreError> {
        Ok(0)
    }
}

struct JournalSubscription {
    log: Arc<dyn EventLog>,
    next_after: u64,
    head: tokio::sync::watch::Receiver<u64>,
    with_raw: bool,
}

#[async_trait]
impl Subscription for JournalSubscription {
    fn start(&self) -> StreamPositions {
        vec![(0, self.next_after)]
    }

    fn lag(&self) -> Vec<(String, i32, i64)> {
        let head = *self.head.borrow();
        vec![("journal".to_string(), 0, head.saturating_sub(self.next_after) as i64)]
    }

    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Polled, StoreError> {
        let mut events = self.log.read_after(self.next_after, max).await?;
        if events.is_empty() {
            let _ = tokio::time::timeout(wait, self.head.changed()).await;
            events = self.log.read_after(self.next_after, max).await?;
        }
        // Bronze seqs grow with journal seqs, so one range read finds every payload referenced.
        let seqs = events.iter().filter_map(|e| e.event.raw.seq);
        let raw = match (self.with_raw, seqs.clone().min(), seqs.max()) {
            (true, Some(lo), Some(hi)) => {
                let span = usize::try_from(hi - lo + 1).unwrap_or(usize::MAX);
                self.log.read_bronze_after(lo - 1, span).await?
            }
            _ => Vec::new(),
        };
        // Only once the whole poll succeeded: a failed one is polled again from the same place.
        if let Some(last) = events.last() {
            self.next_after = last.seq;
        }
        Ok(Polled { events, undecodable: Vec::new(), raw })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_pack_and_unpack() {
        for (s, o) in [(0u32, 0u64), (0, 42), (3, 7), (1023, OFFSET_MASK)] {
            assert_eq!(unpack(pack(s, o)), (s, o));
        }
        // the embedded journal's seq is its own position
        assert_eq!(pack(0, 12345), 12345);
        assert!(pack(1, 0) > pack(0, OFFSET_MASK));
    }

    /// The journal, with reads of raw payloads failing while `fail_bronze` is set.
    struct FlakyBronze {
        inner: Arc<crate::EmbeddedStore>,
        fail_bronze: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl EventLog for FlakyBronze {
        async fn append(&self, batch: AppendBatch) -> Result<AppendOutcome, StoreError> {
            self.inner.append(batch).await
        }
        async fn read_after(&self, after: u64, limit: usize) -> Result<Vec<JournaledEvent>, StoreError> {
            self.inner.read_after(after, limit).await
        }
        fn watch_head(&self) -> tokio::sync::watch::Receiver<u64> {
            self.inner.watch_head()
        }
        async fn read_bronze_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, BronzeRecord)>, StoreError> {
            if self.fail_bronze.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::unavailable("bronze read failed"));
            }
            self.inner.read_bronze_after(after, limit).await
        }
        async fn erase_matching(&self, target: &ErasureTarget) -> Result<ErasureCounts, StoreError> {
            self.inner.erase_matching(target).await
        }
        async fn count_matching(&self, target: &ErasureTarget) -> Result<ErasureCounts, StoreError> {
            self.inner.count_matching(target).await
        }
        async fn compact(&self, before: DateTime<Utc>, covered: u64) -> Result<u64, StoreError> {
            self.inner.compact(before, covered).await
        }
    }

    /// A poll whose raw payloads could not be read fails as a whole: the next poll returns the
    /// same events instead of going on after them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_poll_that_failed_reading_raw_payloads_returns_its_events_again() {
        let inner = crate::EmbeddedStore::in_memory().unwrap();
        let at = DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default();
        let event = cohort_messages::CustomerEvent {
            event_id: cohort_messages::EventId::new(cohort_messages::Source::Web, "e1"),
            source: cohort_messages::Source::Web,
            kind: cohort_messages::EventKind::Track,
            name: Some("quiz_completed".into()),
            occurred_at: at,
            received_at: at,
            identifiers: vec![],
            traits: Default::default(),
            properties: Default::default(),
            utm: Default::default(),
            trace: None,
            raw: cohort_messages::RawRef { seq: None, index: 0 },
        };
        let raw = BronzeRecord {
            source: cohort_messages::Source::Web,
            format: "segment:track".into(),
            content_type: "application/json".into(),
            received_at: at,
            body: b"{}".to_vec(),
        };
        inner.append(AppendBatch { raw: Some(raw), events: vec![event] }).await.unwrap();
        let log = Arc::new(FlakyBronze { inner, fail_bronze: true.into() });
        let mut sub = JournalSubscription { log: log.clone(), next_after: 0, head: log.watch_head(), with_raw: true };
        assert!(sub.poll(10, Duration::from_millis(10)).await.is_err());
        log.fail_bronze.store(false, std::sync::atomic::Ordering::SeqCst);
        let polled = sub.poll(10, Duration::from_millis(10)).await.unwrap();
        assert_eq!(polled.events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1], "the event is not skipped");
        assert_eq!(polled.raw.len(), 1);
    }
}
