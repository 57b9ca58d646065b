//! The message enum of every actor. Commands are verbs, queries carry an `RpcReplyPort`,
//! events are in the past tense.

use crate::dead_letter::DeadLetter;
use crate::event::CustomerEvent;
use crate::ids::{Identifier, ProfileId, Source};
use crate::profile::{EventSummary, LinkedIdentifier, ProfileRecord, ProfileView, UnmergeError};
use chrono::{DateTime, Utc};
use ractor::RpcReplyPort;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A connector's name, interned so that payload formats stay `Copy`. Names are few (the
/// connectors compiled in) and live as long as the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectorName(&'static str);

static INTERNED: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());

impl ConnectorName {
    pub fn new(name: &'static str) -> Self {
        ConnectorName(name)
    }

    /// The name read back from storage: the same `&'static str` every time for one name.
    pub fn intern(name: &str) -> Self {
        let mut names = match INTERNED.lock() {
            Ok(n) => n,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(n) = names.iter().find(|n| **n == name) {
            return ConnectorName(n);
        }
        let leaked: &'static str = Box::leak(name.to_string().into_boxed_str());
        names.push(leaked);
        ConnectorName(leaked)
    }

    pub fn as_str(self) -> &'static str {
        self.0
    }
}

impl Serialize for ConnectorName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0)
    }
}

impl<'de> Deserialize<'de> for ConnectorName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(ConnectorName::intern(&s))
    }
}

/// The wire shape of a payload handed to an ingest actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormat {
    /// A Segment HTTP API call; `call` is the endpoint (`identify`, `track`, ..., `batch`).
    Segment { call: SegmentCall },
    /// A Twilio inbound-message webhook (form-encoded).
    TwilioForm,
    /// A SendGrid event-webhook array.
    SendgridEvents,
    /// A Salesforce Change Data Capture event (JSON).
    SalesforceCdc,
    /// A chunk of a Salesforce Bulk API 2.0 CSV export, header row first.
    SalesforceCsv,
    /// A body for a connector (a source added with `generate-connector`).
    Connector { name: ConnectorName },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SegmentCall {
    Identify,
    Track,
    Page,
    Screen,
    Group,
    Alias,
    Batch,
}

impl SegmentCall {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "identify" => SegmentCall::Identify,
            "track" => SegmentCall::Track,
            "page" => SegmentCall::Page,
            "screen" => SegmentCall::Screen,
            "group" => SegmentCall::Group,
            "alias" => SegmentCall::Alias,
            "batch" => SegmentCall::Batch,
            _ => return None,
        })
    }
}

/// An authenticated payload, exactly as received.
#[derive(Debug, Clone)]
pub struct RawPayload {
    pub source: Source,
    pub format: PayloadFormat,
    pub body: Arc<[u8]>,
    pub content_type: String,
    pub received_at: DateTime<Utc>,
}

/// Why (part of) a payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// Index of the event in the payload (batch element, CSV data row), when it applies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub reason: String,
}

/// The answer of an ingest actor once the accepted events are durable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestReceipt {
    pub accepted: usize,
    pub duplicates: usize,
    pub rejected: Vec<Rejection>,
    /// Events of erased people (GDPR suppression), dropped and counted, never stored.
    pub suppressed: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    /// Nothing in the payload could be accepted; it went to the dead-letter store.
    #[error("{0}")]
    Malformed(String),
    /// The payload exceeds a source limit (HTTP 413).
    #[error("{0}")]
    TooLarge(String),
    /// The journal could not make the events durable; the caller should retry.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
}

/// Per-source ingest actor.
#[derive(Debug)]
pub enum IngestMsg {
    /// Validate, normalize and journal a payload; reply when durable.
    Receive {
        payload: RawPayload,
        /// The HTTP request's `traceparent` when tracing is on.
        trace: Option<String>,
        /// False for a dead-letter replay: what is refused again keeps its old letter rather than
        /// gaining a new one.
        dead_letters: bool,
        reply: RpcReplyPort<Result<IngestReceipt, IngestError>>,
    },
}

/// Sharded identity resolver worker.
#[derive(Debug)]
pub enum IdentityMsg {
    /// Place journaled events, in journal order, on profiles (creating, linking or merging) and
    /// deliver them. One message per shard and polled batch, not per event: at saturation the
    /// per-message cost of the factory was as large as resolution itself.
    Resolve { events: Vec<(u64, Arc<CustomerEvent>)> },
}

/// One student's live profile.
#[derive(Debug)]
pub enum ProfileMsg {
    /// Apply a journaled event (idempotent by `seq`).
    Apply {
        seq: u64,
        event: Arc<CustomerEvent>,
    },
    /// Resolution decided to merge `merged` into this profile; its state follows (`Absorb`).
    BeginMerge {
        merged: ProfileId,
    },
    /// Hand this profile's state to `survivor` and become a redirect to it.
    MergeInto {
        survivor: ProfileId,
    },
    /// Absorb the state of a profile merged into this one.
    Absorb {
        record: Box<ProfileRecord>,
    },
    GetView(RpcReplyPort<ProfileRecordReply<ProfileView>>),
    /// The view as the Profile API's JSON body. The actor keeps it until the record changes or
    /// a computed trait's time window slides, so repeated reads skip computing and encoding.
    GetViewJson(RpcReplyPort<ProfileRecordReply<bytes::Bytes>>),
    GetEvents {
        offset: usize,
        /// Start after this event (`occurred_at`, id) instead of at `offset`: pages stay put
        /// while new events arrive at the front.
        after: Option<Box<(DateTime<Utc>, crate::EventId)>>,
        limit: usize,
        reply: RpcReplyPort<ProfileRecordReply<Vec<EventSummary>>>,
    },
    GetIdentities(RpcReplyPort<ProfileRecordReply<Vec<LinkedIdentifier>>>),
    /// Undo the merge of `merged` into this profile (`reply` is `None` when the directory
    /// re-delivers it after a restart).
    Unmerge {
        merged: ProfileId,
        reply: Option<RpcReplyPort<ProfileRecordReply<Result<UnmergeReport, UnmergeError>>>>,
    },
    /// Take back the state an unmerge rebuilt for this profile, if it still redirects to `from`.
    Restore {
        record: Box<ProfileRecord>,
        from: ProfileId,
    },
    /// Evaluate the real-time segments again (a window slid, a definition was added).
    Reevaluate,
    /// Record consent decisions made through the API (at `at`, so a re-delivery repeats them
    /// exactly); `reply` is `None` when the directory re-delivers it after a restart.
    SetConsent {
        decisions: Vec<ConsentDecision>,
        at: DateTime<Utc>,
        reply:
            Option<RpcReplyPort<ProfileRecordReply<std::collections::BTreeMap<String, crate::profile::ConsentState>>>>,
    },
    /// Write-behind: the state to persist and the seqs applied since the previous snapshot.
    TakeSnapshot(RpcReplyPort<ProfileSnapshot>),
}

/// One consent decision from the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsentDecision {
    pub key: String,
    pub granted: bool,
    pub legal_basis: String,
    pub source: String,
}

/// A query answer, or the survivor this profile was merged into.
#[derive(Debug, Clone, PartialEq)]
pub enum ProfileRecordReply<T> {
    Found(T),
    MergedInto(ProfileId),
    NotFound,
}

/// Write-behind: the state to persist (`None` for a profile that does not exist).
#[derive(Debug, Clone)]
pub struct ProfileSnapshot {
    pub record: Option<ProfileRecord>,
}

/// A snapshot the directory asked a ProfileActor for on a flush's behalf.
#[derive(Debug)]
pub struct PendingSnapshot {
    pub profile_id: ProfileId,
    /// How many of the profile's queued changes the snapshot covers.
    pub covers: usize,
    /// Events among them that this flush has not yet taken (its Silver rows).
    pub applied: Vec<Arc<CustomerEvent>>,
    /// Among them are changes another profile sent on: a flush without this snapshot must not
    /// write the sender's side.
    pub holds_forwarded: bool,
    pub reply: ractor::concurrency::OneshotReceiver<ProfileSnapshot>,
}

/// Directory and supervisor of all ProfileActors: spawns on demand, passivates idle ones,
/// restarts failed ones from the store and re-delivers their unflushed messages.
#[derive(Debug)]
pub enum ProfilesMsg {
    /// Deliver a message to the profile's actor, spawning (and rehydrating) it if needed.
    Deliver {
        profile_id: ProfileId,
        msg: ProfileMsg,
    },
    /// A merged profile sends on a change addressed to it to its survivor: delivered as
    /// `Deliver` is, but not a new arrival, so the pipeline stage is not observed twice.
    Forward {
        /// The profile sending it on.
        from: ProfileId,
        profile_id: ProfileId,
        msg: ProfileMsg,
    },
    /// Cluster mode: a change read from `cdp.processed.events` at `seq`, applied here (this
    /// replica owns its partition) and counted delivered once queued. `forwarded` as `Forward`.
    DeliverRouted {
        profile_id: ProfileId,
        msg: ProfileMsg,
        seq: u64,
        forwarded: bool,
    },
    /// Write-behind cycle: snapshot profiles with unflushed changes, persist them with the
    /// identity graph, then advance the checkpoint.
    Flush {
        reply: Option<RpcReplyPort<Result<FlushReport, String>>>,
    },
    /// A flush in flight has its last round of snapshots. What those profiles sent on while
    /// handling the changes they cover (a merged profile's record and its events to the
    /// survivor, a restored part to an unmerged profile) reached this mailbox before they
    /// answered: snapshot the profiles it went to as well, so that one write holds both sides.
    /// The answer is empty when nothing was sent on, and says whether every such profile could
    /// be asked.
    SnapshotForwarded {
        reply: RpcReplyPort<(Vec<PendingSnapshot>, bool)>,
    },
    /// A flush task finished; `covered` says how many queued changes each snapshot covered.
    Flushed {
        result: Result<FlushReport, String>,
        covered: Vec<(ProfileId, usize)>,
    },
    /// Restart a failed profile actor once its backoff has passed.
    Respawn {
        profile_id: ProfileId,
    },
    /// A profile actor could not start (its state could not be loaded).
    SpawnFailed {
        profile_id: ProfileId,
        reason: String,
    },
    /// Stop actors idle for longer than the configured time (timer).
    PassivateIdle,
    GetStats(RpcReplyPort<ProfilesStats>),
    /// GDPR erasure: stop these profiles' actors, drop what they held only in memory, and never
    /// start them again. Answers once no flush still carrying their state can land later.
    Erase {
        profiles: Vec<ProfileId>,
        reply: RpcReplyPort<usize>,
    },
    /// Cluster mode: these partitions of `cdp.processed.events` have come here (or back). Their
    /// profiles start afresh: live actors are dropped, ids not yet recorded are released (their
    /// events are read again from the committed offset), and only then are they owned.
    PartitionsArrived {
        partitions: Vec<i32>,
        reply: RpcReplyPort<()>,
    },
    /// Cluster mode: an erasure read from `cdp.processed.events` at `seq`. The owner erases as
    /// `Erase` does and confirms once no flush carrying the profile can land later.
    EraseRouted {
        profile_id: ProfileId,
        /// The saga and attempt asking (see `RoutedKind::Erase`).
        request: String,
        seq: u64,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlushReport {
    pub profiles: usize,
    pub identities: usize,
    pub checkpoint: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfilesStats {
    pub live: usize,
    pub passivating: usize,
    pub unflushed_events: usize,
    pub restarts: u64,
    pub poison_events: u64,
}

/// The warehouse sink: relays the outbox to the warehouse and the processed-events stream, and
/// reconciles Gold with the operational store.
#[derive(Debug)]
pub enum WarehouseMsg {
    /// Relay what the outbox holds (timer, or a caller that waits for the outcome).
    Relay { reply: Option<RpcReplyPort<Result<RelayReport, String>>> },
    /// Compare operational profiles with Gold and repair drift (timer, or a caller).
    Reconcile { reply: Option<RpcReplyPort<Result<ReconcileReport, String>>> },
}

/// What one relay pass moved.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayReport {
    pub batches: usize,
    pub bronze: usize,
    pub silver: usize,
    pub gold: usize,
    /// Outbox batches still waiting afterwards.
    pub remaining: u64,
}

/// What one reconciliation found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileReport {
    pub profiles_checked: u64,
    /// Profiles with no Gold snapshot.
    pub missing: u64,
    /// Profiles whose latest Gold snapshot is older than the stored record.
    pub stale: u64,
    /// Gold profiles the operational store no longer has (erased): removed from Gold.
    pub orphaned: u64,
    /// Snapshots written and orphans removed.
    pub repaired: u64,
}

/// The identity statistics job: how many live profiles are tied to a known person.
#[derive(Debug)]
pub enum IdentityStatsMsg {
    /// Count now (timer, or a caller that waits for the figures).
    Compute { reply: Option<RpcReplyPort<Result<IdentityStats, String>>> },
    /// The last figures, computing them first if there are none yet.
    GetLatest(RpcReplyPort<Result<IdentityStats, String>>),
}

/// Identity match rate (slide 19: > 85%): the share of live profiles (not merged away) that hold
/// at least one identifier of a known person (email, phone, user id, Salesforce id, WhatsApp id),
/// as opposed to anonymous-only ones (device, anonymous and session ids).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdentityStats {
    pub live_profiles: u64,
    pub merged_profiles: u64,
    pub known_profiles: u64,
    /// `known / live`; 0 when there are no profiles.
    pub match_rate: f64,
    pub computed_at: DateTime<Utc>,
}

/// The retention job: forgets expired idempotency keys and compacts the embedded journal.
#[derive(Debug)]
pub enum RetentionMsg {
    Expire { reply: Option<RpcReplyPort<Result<u64, String>>> },
}

/// Published when two profiles turned out to be one student.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdentityMerged {
    pub survivor: ProfileId,
    pub merged: ProfileId,
    /// The identifiers that linked them (empty for a probabilistic merge).
    pub evidence: Vec<Identifier>,
    pub at: DateTime<Utc>,
    /// The journal position of the linking event (0 for a probabilistic merge).
    pub seq: u64,
    #[serde(default)]
    pub reason: MergeReason,
}

/// Why two profiles were merged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MergeReason {
    /// An event carried identifiers of both.
    #[default]
    SharedIdentifier,
    /// A person approved a probabilistic match from the review queue.
    ReviewApproved { review_id: String, score: f64, by: String },
    /// A probabilistic match scored at or above `identity.auto_merge_threshold`.
    AutoMerged { score: f64 },
}

/// Published when an unmerge split a profile in two again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdentityUnmerged {
    pub survivor: ProfileId,
    pub restored: ProfileId,
    pub at: DateTime<Utc>,
}

/// Changes to the identity graph, as other components and the bus see them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum IdentityEvent {
    IdentityMerged(IdentityMerged),
    IdentityUnmerged(IdentityUnmerged),
}

impl IdentityEvent {
    /// The profile the event is keyed by (the survivor).
    pub fn key(&self) -> &ProfileId {
        match self {
            IdentityEvent::IdentityMerged(m) => &m.survivor,
            IdentityEvent::IdentityUnmerged(u) => &u.survivor,
        }
    }
}

/// What an unmerge left.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnmergeReport {
    pub survivor: ProfileId,
    pub restored: ProfileId,
    pub survivor_events: u64,
    pub restored_events: u64,
    pub restored_identifiers: Vec<Identifier>,
}

/// The probabilistic matcher: finds candidate duplicates of changed profiles and queues them
/// for review (or merges them, when automatic merging is on).
#[derive(Debug)]
pub enum MatcherMsg {
    /// Profiles whose matching fields may have changed (sent by the flush).
    ProfilesChanged(Vec<MatchCandidate>),
    /// Rebuild the blocking index from the store, a page at a time (start-up).
    Rebuild { after: Option<ProfileId> },
    /// Decide a review item: approval merges the two profiles.
    Decide {
        review_id: String,
        approve: bool,
        by: String,
        reply: RpcReplyPort<Result<crate::records::ReviewItem, ReviewError>>,
    },
    /// Wait until every message sent before this one was handled (tests, shutdown).
    Sync(RpcReplyPort<MatcherStats>),
}

/// The person fields of a flushed profile, or a profile merged away (`merged`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatchCandidate {
    pub profile_id: ProfileId,
    pub merged: bool,
    pub traits: std::collections::BTreeMap<String, crate::profile::TraitValue>,
    pub identifiers: Vec<LinkedIdentifier>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MatcherStats {
    pub indexed_profiles: usize,
    pub pairs_compared: u64,
    pub reviews_opened: u64,
    pub auto_merges: u64,
    pub rebuilt: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    #[error("no review item {0}")]
    NotFound(String),
    #[error("review item {0} was already decided")]
    AlreadyDecided(String),
    #[error("the profiles cannot be merged: {0}")]
    Refused(String),
    #[error("{0}")]
    Unavailable(String),
}

/// Published when an event was given up on.
#[derive(Debug, Clone)]
pub struct EventDeadLettered {
    pub letter: DeadLetter,
}

/// The segment engine: memberships, change publication, timers for windows, batch runs.
#[derive(Debug)]
pub enum SegmentMsg {
    /// Profiles entered or left segments (sent by ProfileActors).
    Changed(Vec<crate::segment::SegmentChanged>),
    /// Evaluate this profile again at `at` (a window slides), or never (`None`).
    Schedule { profile_id: ProfileId, at: Option<DateTime<Utc>> },
    /// Timer: re-evaluate the profiles that are due.
    Tick,
    /// Validate and store a definition; real-time ones are evaluated for every profile.
    Define {
        definition: crate::segment::SegmentDefinition,
        reply: RpcReplyPort<Result<crate::segment::SegmentDefinition, String>>,
    },
    /// Remove a definition and its memberships.
    Delete { name: String, reply: RpcReplyPort<Result<bool, String>> },
    /// Re-evaluate stored profiles after `after` (a page at a time) for a new definition.
    Backfill { after: Option<ProfileId> },
    /// Timer (cluster mode): apply the definitions other replicas' APIs stored or deleted.
    Refresh,
    /// Start-up: make the membership documents agree with the stored profiles' segments (a
    /// crash may have come between a profile's flush and the engine's write), a page at a time.
    Reconcile { after: Option<ProfileId> },
    /// Run a batch segment's query now and apply the difference.
    RunBatch { name: String, reply: Option<RpcReplyPort<Result<BatchRun, String>>> },
    /// Timer: a batch segment's interval passed; run it if this replica leads the cluster.
    RunScheduledBatch { name: String },
    /// Wait until everything sent before was handled.
    Sync(RpcReplyPort<SegmentStats>),
    /// A profile's marketing consent for `channels` was granted: the real-time memberships it
    /// had before and still has, as `Entered` changes, for reverse ETL to offer again (sent by
    /// ProfileActors; nothing is stored or published). The engine adds the batch segments, whose
    /// memberships only the store knows, with `profile` as their snapshot.
    ConsentGranted {
        profile_id: crate::ProfileId,
        profile: std::sync::Arc<crate::segment::ActivationProfile>,
        channels: Vec<crate::Channel>,
        changes: Vec<crate::segment::SegmentChanged>,
    },
}

/// One destination's ReverseEtl actor (Salesforce, SendGrid, Twilio, push): a bulkhead with
/// its own rate limit, quota, in-flight limit and counters.
#[derive(Debug)]
pub enum DestinationMsg {
    /// Send what activation `activation` asks for this change (`key` is its idempotency key).
    Send { key: String, activation: String, change: crate::segment::SegmentChanged },
}

/// What a batch segment run changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRun {
    pub members: usize,
    pub entered: usize,
    pub exited: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentStats {
    pub defined: usize,
    pub scheduled: usize,
    pub changes: u64,
    pub backfilling: bool,
    /// Batch segments whose timed runs are scheduled here.
    pub batch_timers: usize,
}

/// Reverse ETL: activations route segment changes to destination lanes.
#[derive(Debug)]
pub enum ReverseEtlMsg {
    Dispatch(Vec<crate::segment::SegmentChanged>),
    /// Every change of one batch segment run, together (Gate 4 compares its size with the
    /// previous run's).
    DispatchBatch {
        segment: String,
        changes: Vec<crate::segment::SegmentChanged>,
    },
    /// Every destination's counters, queue and recent failures.
    Status(RpcReplyPort<serde_json::Value>),
    /// Queue the failed jobs again; answers how many.
    Retry {
        destination: Option<String>,
        reply: RpcReplyPort<usize>,
    },
    /// Timer: store the held batches the store refused before.
    SaveHolds,
    /// Allow the held batch of an activation whose size moved more than 20% (Gate 4).
    Confirm {
        activation: String,
        /// Whether a batch was held (and is now sent); an error when the store did not answer.
        reply: RpcReplyPort<Result<bool, String>>,
    },
    /// Wait until every job queued before has finished (tests, shutdown).
    Drain(RpcReplyPort<()>),
    /// Start-up: send the entries stored as memberships that no destination has seen yet
    /// (changes a crash caught between the membership write and the request).
    CatchUp,
    /// Restart a failed destination actor once its backoff has passed.
    Respawn {
        destination: String,
    },
    /// A member's marketing consent for `channels` was granted: its `enter` activations on
    /// those channels that no destination has sent or failed yet go out now (one skipped for
    /// want of consent is not retried otherwise). Entry times come from the stored memberships,
    /// so the keys are the original jobs'.
    ConsentGranted {
        channels: Vec<crate::Channel>,
        changes: Vec<crate::segment::SegmentChanged>,
    },
}

/// A deletion request as the API hands it to the GdprCoordinator.
#[derive(Debug, Clone)]
pub struct DeletionRequest {
    pub profile_id: ProfileId,
    pub target: crate::gdpr::ErasureTarget,
    pub regulation: crate::gdpr::Regulation,
    /// Who asked (an API token's name); kept in the audit record.
    pub requested_by: String,
}

/// The GdprCoordinator: deletion sagas.
#[derive(Debug)]
pub enum GdprMsg {
    /// Persist a new deletion saga and start it; the reply (the API's 202) follows the write.
    RequestDeletion { request: DeletionRequest, reply: RpcReplyPort<Result<crate::records::SagaRecord, String>> },
    /// Run the saga's next step (sent to itself; after a failure, once its backoff has passed).
    Advance { saga_id: String },
    /// Pick up suppressions and erasures recorded elsewhere, and sagas left running (timer).
    Refresh,
}

/// The outcome of one scheduled job occurrence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobRunStatus {
    Running,
    Succeeded,
    Failed,
}

/// One run of a scheduled job, as stored (a `job_run` saga record) and shown by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRun {
    pub job: String,
    pub run_id: String,
    /// The occurrence this run is for (its schedule time, or the request time of a manual run).
    pub due: DateTime<Utc>,
    /// The replica that won the occurrence's lease and ran it.
    pub owner: String,
    pub status: JobRunStatus,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    pub detail: serde_json::Value,
}

/// A scheduled job as `GET /v1/jobs` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub name: String,
    pub schedule: String,
    pub next_run: Option<DateTime<Utc>>,
    pub running: bool,
    /// The last run this replica saw finish.
    pub last_run: Option<JobRun>,
}

/// The JobScheduler: cron-scheduled jobs, each occurrence run once cluster-wide.
#[derive(Debug)]
pub enum JobsMsg {
    /// Timer: start the jobs that are due.
    Tick,
    /// Run a job now (an operator's request); the reply comes when it has finished.
    RunNow {
        job: String,
        reply: RpcReplyPort<Result<JobRun, String>>,
    },
    /// A run finished (sent by the task that ran it).
    Finished {
        run: Box<JobRun>,
    },
    List(RpcReplyPort<Vec<JobStatus>>),
}
