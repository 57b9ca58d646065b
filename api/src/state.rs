//! What the handlers share.

use cohort_actors::normalize::NormalizeOptions;
use cohort_actors::segments::SegmentRegistry;
use cohort_actors::IdentityIndex;
use cohort_adapters::{EventBus, OperationalStore, Warehouse};
use cohort_config::Config;
use cohort_messages::msgs::{
    GdprMsg, IdentityStatsMsg, IngestMsg, JobsMsg, MatcherMsg, ProfilesMsg, ReverseEtlMsg, SegmentMsg,
};
use cohort_messages::Source;
use cohort_supervisors::{HealthRegistry, Metrics, QueueDepth, Slot};
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// What the handlers share. Axum clones the state for every extractor and middleware layer of
/// every request, so it is one reference count: cloning the fields (the metrics alone are
/// dozens of handles) took a third of the CPU at 5,000 Profile API requests/s.
#[derive(Clone)]
pub struct ApiState(Arc<ApiShared>);

impl ApiState {
    pub fn new(shared: ApiShared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for ApiState {
    type Target = ApiShared;

    fn deref(&self) -> &ApiShared {
        &self.0
    }
}

pub struct ApiShared {
    pub config: Arc<Config>,
    /// The bearer tokens accepted, with their scopes.
    pub credentials: Arc<crate::auth::Credentials>,
    pub ingest: Arc<HashMap<Source, (Slot<IngestMsg>, QueueDepth)>>,
    /// The ingest actor of each connector, by name.
    pub connector_ingest: Arc<HashMap<&'static str, (Slot<IngestMsg>, QueueDepth)>>,
    pub profiles: Slot<ProfilesMsg>,
    pub identity_stats: Slot<IdentityStatsMsg>,
    pub matcher: Slot<MatcherMsg>,
    pub segments: Arc<SegmentRegistry>,
    pub segment_engine: Slot<SegmentMsg>,
    pub reverse_etl: Slot<ReverseEtlMsg>,
    /// The GdprCoordinator, which runs deletion sagas.
    pub gdpr: Slot<GdprMsg>,
    /// The JobScheduler (scheduled jobs and their history).
    pub jobs: Slot<JobsMsg>,
    /// Erased people (their profiles answer 404).
    pub erasures: Arc<cohort_actors::Erasures>,
    pub index: Arc<IdentityIndex>,
    pub store: Arc<dyn OperationalStore>,
    /// The event bus (the embedded one streams segment changes to API subscribers).
    pub bus: Arc<dyn EventBus>,
    /// The warehouse, when one is configured (exports include the person's warehouse rows).
    pub warehouse: Option<Arc<dyn Warehouse>>,
    pub metrics: Metrics,
    pub health: HealthRegistry,
    pub normalize: Arc<NormalizeOptions>,
    pub sendgrid_key: Option<p256::ecdsa::VerifyingKey>,
    /// False while starting and while shutting down.
    pub ready: Arc<AtomicBool>,
    pub call_timeout: Duration,
    /// This replica's name and the membership's heartbeat TTL (`GET /v1/cluster`).
    pub membership: cohort_actors::cluster::MembershipSettings,
    /// Cluster mode: the profile partitions this replica owns (others' requests are forwarded).
    pub ownership: Option<Arc<cohort_adapters::cluster::Ownership>>,
    pub owners: Arc<crate::cluster::Owners>,
    /// For forwarding to peers.
    pub http: reqwest::Client,
}
