//! What every pipeline actor shares: backends, metrics and the pipeline's progress markers.

use crate::identity::IdentityIndex;
use crate::segments::SegmentRegistry;
use crate::watermark::{Checkpoints, PendingIds, Watermark};
use cohort_adapters::cluster::Ownership;
use cohort_adapters::{BronzeRow, EventBus, OperationalStore, Warehouse};
use cohort_messages::cluster::RoutedChange;
use cohort_messages::msgs::{MatcherMsg, SegmentMsg};
use cohort_messages::{CustomerEvent, ProfileId};
use cohort_supervisors::{Metrics, RestartPolicy, Slot};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;

/// Test hook: lets a test make a ProfileActor fail on chosen events (supervision tests).
pub trait FaultInjector: Send + Sync + 'static {
    /// Called before a profile applies an event; a panic here is a profile actor crash.
    fn before_apply(&self, profile: &ProfileId, event: &CustomerEvent);
}

/// Profile settings taken from configuration.
#[derive(Debug, Clone)]
pub struct ProfileSettings {
    pub history_limit: usize,
    pub passivate_after: Duration,
    pub flush_interval: Duration,
    /// A timed flush defers a profile it snapshotted less than this ago.
    pub snapshot_min_interval: Duration,
    pub max_event_attempts: u32,
    pub restart_policy: RestartPolicy,
    /// Events after a merge for which it can still be undone (`identity.unmerge_window`).
    pub unmerge_window: usize,
    /// How long a flush waits for one profile's snapshot; one that does not answer is flushed
    /// later (its actor is stuck in a slow event, say).
    pub snapshot_timeout: Duration,
}

impl ProfileSettings {
    /// The default `snapshot_timeout`.
    pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(10);
}

#[derive(Clone)]
pub struct PipelineContext {
    pub store: Arc<dyn OperationalStore>,
    pub bus: Arc<dyn EventBus>,
    pub metrics: Metrics,
    pub watermark: Arc<Watermark>,
    pub index: Arc<IdentityIndex>,
    /// The durable checkpoints: per stream, every event up to them is in persisted profiles.
    pub checkpoints: Arc<Checkpoints>,
    pub pending_ids: Arc<PendingIds>,
    pub profiles: ProfileSettings,
    pub fault: Option<Arc<dyn FaultInjector>>,
    /// The warehouse, when one is configured: flushes then write outbox rows for it.
    pub warehouse: Option<Arc<dyn Warehouse>>,
    /// Raw payloads read from the bus, waiting for the next flush's outbox.
    pub staged_bronze: Arc<Mutex<Vec<BronzeRow>>>,
    /// The probabilistic matcher, told about flushed profiles when it runs.
    pub matcher: Slot<MatcherMsg>,
    /// The segments profiles evaluate, and the engine they report changes to.
    pub segments: Arc<SegmentRegistry>,
    pub segment_engine: Slot<SegmentMsg>,
    /// Per profile, a hash of the person fields the last flush saw (matcher and identity only
    /// look at profiles whose fields changed).
    pub person_fingerprints: Arc<dashmap::DashMap<ProfileId, u64>>,
    /// Erased people: their events are dropped, their profiles never started again.
    pub erasures: Arc<crate::gdpr::Erasures>,
    /// Cluster mode: changes for profiles this stage does not apply itself, produced to
    /// `cdp.processed.events` by the stage's next flush before it commits its offsets.
    pub outbound: Option<Arc<Mutex<Vec<RoutedChange>>>>,
    /// Cluster mode, profile stage: the partitions whose profiles this replica owns.
    pub ownership: Option<Arc<Ownership>>,
}

impl PipelineContext {
    /// Whether this replica applies the profile's changes itself (always, outside cluster mode).
    pub fn owns(&self, profile: &ProfileId) -> bool {
        self.ownership.as_ref().is_none_or(|o| o.owns_profile(profile))
    }

    /// Everything buffered for `cdp.processed.events`, for a flush to produce.
    pub fn take_outbound(&self) -> Vec<RoutedChange> {
        self.outbound.as_ref().map(|o| std::mem::take(&mut *o.lock())).unwrap_or_default()
    }

    /// Puts back changes a failed flush took, ahead of those buffered since (order kept).
    pub fn requeue_outbound(&self, changes: Vec<RoutedChange>) {
        if let Some(o) = &self.outbound {
            let mut buffer = o.lock();
            let later = std::mem::replace(&mut *buffer, changes);
            buffer.extend(later);
        }
    }
}

#[cfg(test)]
impl PipelineContext {
    /// One process on an in-memory store: no warehouse, no cluster, no fault injector, and
    /// flushes only when asked for.
    pub(crate) fn for_tests(store: Arc<cohort_adapters::EmbeddedStore>) -> Self {
        let dyn_store: Arc<dyn OperationalStore> = store.clone();
        Self {
            store: dyn_store.clone(),
            bus: Arc::new(cohort_adapters::EmbeddedBus::new(store, dyn_store.clone())),
            metrics: Metrics::new().expect("metrics register once per registry"),
            watermark: Arc::new(Watermark::default()),
            index: Arc::new(IdentityIndex::new(dyn_store)),
            checkpoints: Arc::new(Checkpoints::default()),
            pending_ids: Arc::new(PendingIds::default()),
            profiles: ProfileSettings {
                history_limit: 100,
                passivate_after: Duration::from_secs(3600),
                flush_interval: Duration::from_secs(3600),
                snapshot_min_interval: Duration::ZERO,
                max_event_attempts: 3,
                restart_policy: RestartPolicy::default(),
                unmerge_window: 10,
                snapshot_timeout: ProfileSettings::SNAPSHOT_TIMEOUT,
            },
            fault: None,
            warehouse: None,
            staged_bronze: Arc::default(),
            matcher: Default::default(),
            segments: Arc::new(SegmentRegistry::default()),
            segment_engine: Default::default(),
            person_fingerprints: Arc::default(),
            erasures: Arc::new(crate::gdpr::Erasures::new(
                cohort_adapters::crypto::KeyedHasher::from_secret(&[7u8; 32]).expect("a 32-byte secret"),
            )),
            outbound: None,
            ownership: None,
        }
    }
}

impl std::fmt::Debug for PipelineContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineContext").field("profiles", &self.profiles).finish_non_exhaustive()
    }
}
