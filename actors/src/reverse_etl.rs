//! Reverse ETL (slides 10 and 17): activations turn segment entries and exits into requests to
//! Salesforce, Twilio WhatsApp, SendGrid and FCM push.
//!
//! Every destination is a bulkhead: its own rate limiter, daily quota, in-flight limit and
//! counters, so a slow or failing destination holds back nothing else. Before each request the
//! job checks, in the store and at that moment, the student's consent for the channel and the
//! suppression list, then Gate 4 (no personal data outside the fields allowed to carry it, every
//! mapped field filled, Salesforce field names valid). Requests carry an idempotency key; sent
//! keys are remembered so a re-delivered change is not sent twice; failures after the retries
//! are kept and can be sent again.

use crate::segments::engine::{doc_time, member_key, EXITS, MEMBERS};
use chrono::{DateTime, Utc};
use cohort_adapters::{all_documents, OperationalStore};
use cohort_config::{ActivationConfig, DestinationConfig, ReverseEtlConfig};
use cohort_messages::msgs::{DestinationMsg, ReverseEtlMsg};
use cohort_messages::segment::{ActivationProfile, Change, SegmentChanged};
use cohort_messages::{Channel, IdentifierKind, ProfileId};
use cohort_supervisors::{Metrics, RestartDecision, RestartPolicy, RestartTracker};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use parking_lot::Mutex;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use rand::Rng;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Idempotency keys of jobs a destination accepted.
pub const SENT: &str = "reverse_etl_sent";
/// Jobs that failed after their retries, waiting for `POST /v1/reverse-etl/retry`.
pub const FAILED: &str = "reverse_etl_failed";
/// The size of each activation's last batch run (Gate 4's ±20%).
pub const RUNS: &str = "reverse_etl_runs";
/// The Contact fields last written per activation and profile: updates send only what changed.
pub const FIELDS: &str = "reverse_etl_fields";
/// Batch runs Gate 4 holds, with what their jobs render (`activation/000000`, ... parts):
/// stored, so a restart keeps them and any replica can show, confirm or respect them.
pub const HELD: &str = "reverse_etl_held";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Destination {
    Salesforce,
    Sendgrid,
    Twilio,
    Push,
}

impl Destination {
    pub const ALL: [Destination; 4] =
        [Destination::Salesforce, Destination::Sendgrid, Destination::Twilio, Destination::Push];

    pub fn as_str(self) -> &'static str {
        match self {
            Destination::Salesforce => "salesforce",
            Destination::Sendgrid => "sendgrid",
            Destination::Twilio => "twilio",
            Destination::Push => "push",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.as_str() == s)
    }

    fn config(self, c: &ReverseEtlConfig) -> &DestinationConfig {
        match self {
            Destination::Salesforce => &c.salesforce,
            Destination::Sendgrid => &c.sendgrid,
            Destination::Twilio => &c.twilio,
            Destination::Push => &c.push,
        }
    }
}

/// A job: one activation for one segment change.
#[derive(Debug, Clone)]
struct Job {
    key: String,
    activation: Arc<ActivationConfig>,
    destination: Destination,
    change: SegmentChanged,
}

/// Why a job ended without a request.
#[derive(Debug, Clone, PartialEq)]
enum Skip {
    Consent,
    Suppressed,
    NoAddress(&'static str),
    Duplicate,
    /// A Contact update with nothing new since the last one.
    Unchanged,
    /// The person was erased after the job was queued.
    Erased,
    /// The membership changed again before the request went (an entry's student left the
    /// segment, or an exit's came back): a later change's job speaks for her now.
    Superseded,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
enum JobError {
    #[error("gate 4: {0}")]
    Gate(String),
    #[error("{0}")]
    Permanent(String),
    #[error("{0}")]
    Transient(String),
    #[error("daily limit of {0} requests reached")]
    Quota(u64),
    /// Found while the request was retrying: it is no longer to be made (the person was erased,
    /// consent withdrawn, the address suppressed, the membership moved on).
    #[error("no longer to be sent: {0:?}")]
    Skipped(Skip),
}

/// The request a job sends.
#[derive(Debug, Clone)]
struct Request {
    method: reqwest::Method,
    path: String,
    body: Body,
}

#[derive(Debug, Clone)]
enum Body {
    Json(Value),
    Form(Vec<(String, String)>),
    None,
}

#[derive(Debug, Default, Clone, Serialize)]
struct FailureRecord {
    key: String,
    activation: String,
    profile_id: String,
    segment: String,
    error: String,
    at: Option<DateTime<Utc>>,
}

#[derive(Debug, Default, Serialize)]
struct LaneStats {
    sent: u64,
    failed: u64,
    retries: u64,
    skipped: BTreeMap<String, u64>,
    last_error: Option<String>,
    recent_failures: VecDeque<FailureRecord>,
    day: Option<chrono::NaiveDate>,
    today: u64,
}

/// One destination's bulkhead.
struct Lane {
    destination: Destination,
    config: DestinationConfig,
    http: reqwest::Client,
    limiter: DefaultDirectRateLimiter,
    permits: Semaphore,
    waiting: AtomicU64,
    in_flight: AtomicU64,
    stats: Mutex<LaneStats>,
    /// Requests of today's quota this process reserved and has not used yet.
    quota: tokio::sync::Mutex<QuotaBlock>,
}

impl Lane {
    /// Whether a job is queued or running. `waiting` is read first: a job counts as in flight
    /// before it stops waiting, so one moving between the two is never missed.
    fn busy(&self) -> bool {
        self.waiting.load(Ordering::SeqCst) > 0 || self.in_flight.load(Ordering::SeqCst) > 0
    }
}

#[derive(Default)]
struct QuotaBlock {
    day: Option<chrono::NaiveDate>,
    left: u64,
}

/// `SagaRecord::kind` of a destination's daily quota record (`quota:DESTINATION:DAY`): the
/// requests reserved that day by every process, so a restart or another replica cannot send
/// past the destination's limit (Salesforce's is organisation-wide).
pub const QUOTA_RECORD: &str = "reverse_etl_quota";

/// Reserves up to a block of today's quota in the store (a compare-and-set on the versioned
/// record); 0 when the day's limit is used up. A block spares a store write per request; what a
/// process reserved and did not use before it stopped is lost for that day.
async fn reserve_quota(
    store: &dyn OperationalStore,
    destination: Destination,
    day: chrono::NaiveDate,
    limit: u64,
) -> Result<u64, cohort_adapters::StoreError> {
    let id = format!("quota:{}:{day}", destination.as_str());
    // Each conflict is another process's success, so this ends; the bound guards against a
    // record this code cannot advance.
    for _ in 0..20 {
        let stored = store.load_saga(&id).await?;
        let (used, version, created_at) = match &stored {
            Some(r) => (r.state.get("used").and_then(Value::as_u64).unwrap_or(0), r.version, r.created_at),
            None => (0, 0, Utc::now()),
        };
        if used >= limit {
            return Ok(0);
        }
        let grant = (limit / 100).clamp(1, 50).min(limit - used);
        let record = cohort_messages::SagaRecord {
            saga_id: id.clone(),
            kind: QUOTA_RECORD.into(),
            subject: destination.as_str().into(),
            status: cohort_messages::SagaStatus::Running,
            version: version + 1,
            state: json!({ "used": used + grant, "limit": limit }),
            created_at,
            updated_at: Utc::now(),
        };
        match store.save_saga(&record).await {
            Ok(()) => return Ok(grant),
            // Another process reserved meanwhile: read again.
            Err(e) if e.kind == cohort_adapters::StoreErrorKind::Conflict => continue,
            Err(e) => return Err(e),
        }
    }
    Err(cohort_adapters::StoreError::unavailable(format!("quota record {id} kept changing; not reserved")))
}

struct Shared {
    store: Arc<dyn OperationalStore>,
    metrics: Metrics,
    settings: ReverseEtlConfig,
    /// Keys of jobs running now: the same change reaching a lane twice (catch-up and
    /// reconciliation at start) runs once.
    running: Mutex<std::collections::HashSet<String>>,
    erasures: Arc<crate::gdpr::Erasures>,
    gate4: cohort_config::Gate4Config,
    /// (activation, reason) of Gate 4 refusals already stored: a broken mapping refuses every
    /// job, and one run per kind of refusal says it without a store write per event.
    refusals_recorded: Mutex<std::collections::HashSet<(String, String)>>,
}

pub struct ReverseEtlActor;

pub struct ReverseEtlArgs {
    pub store: Arc<dyn OperationalStore>,
    pub metrics: Metrics,
    pub config: ReverseEtlConfig,
    pub activations: Vec<ActivationConfig>,
    /// How failed destination actors are restarted.
    pub policy: RestartPolicy,
    /// Erased people: a job for one of them (queued or retrying when the erasure ran) is dropped.
    pub erasures: Arc<crate::gdpr::Erasures>,
    /// Gate 4's row-count tolerance (`quality.gate4`).
    pub gate4: cohort_config::Gate4Config,
    /// Held batches the store has not taken yet; made once by the caller, so they outlive a
    /// restart of the actor.
    pub unsaved: Arc<UnsavedHolds>,
}

/// Held jobs the store has not taken yet, by activation (see [`ReverseEtlArgs::unsaved`]).
#[derive(Default)]
pub struct UnsavedHolds(Mutex<BTreeMap<String, Vec<Job>>>);

impl UnsavedHolds {
    fn add(&self, activation: String, jobs: Vec<Job>) {
        self.0.lock().entry(activation).or_default().extend(jobs);
    }
}

/// The router: matches changes to activations and supervises one [`DestinationActor`] per
/// configured destination.
pub struct ReverseEtlState {
    shared: Arc<Shared>,
    activations: Vec<Arc<ActivationConfig>>,
    /// Every configured destination (a lane whose URL is set).
    destinations: HashMap<Destination, Child>,
    policy: RestartPolicy,
    /// Held jobs the store has not taken yet: held all the same (statuses, re-offers and the
    /// catch-up see them), and stored by `SaveHolds` retries.
    unsaved: Arc<UnsavedHolds>,
    /// Whether a `SaveHolds` retry is already scheduled.
    save_scheduled: bool,
}

impl ReverseEtlState {
    /// The job keys of every batch run Gate 4 holds, by activation, from the index (no personal
    /// data, so cheap to read whole); also sets Gate 4's gauge (1 while any is held).
    async fn held_keys(&self) -> Result<BTreeMap<String, Vec<String>>, cohort_adapters::StoreError> {
        let mut held = held_index(self.shared.store.as_ref()).await?;
        for (activation, jobs) in self.unsaved.0.lock().iter() {
            held.entry(activation.clone()).or_default().extend(jobs.iter().map(|j| j.key.clone()));
        }
        let failing = i64::from(held.values().any(|keys| !keys.is_empty()));
        self.shared.metrics.quality_gate_failing.with_label_values(&["4"]).set(failing);
        Ok(held)
    }

    /// Every held job key, whatever its activation: what consent re-offers and the start-up
    /// catch-up must leave alone.
    async fn held_key_set(&self) -> Result<std::collections::HashSet<String>, cohort_adapters::StoreError> {
        Ok(self.held_keys().await?.into_values().flatten().collect())
    }

    /// The held jobs of `activation`, with the snapshots their requests render (none when it is
    /// no longer configured: its hold is left as it is).
    async fn held_jobs(&self, activation: &str) -> Result<Vec<Job>, cohort_adapters::StoreError> {
        let Some(config) = self.activations.iter().find(|a| a.name == activation) else { return Ok(Vec::new()) };
        let Some(destination) = Destination::parse(&config.destination) else { return Ok(Vec::new()) };
        let held = held_jobs_of(self.shared.store.as_ref(), activation).await?;
        Ok(held
            .into_iter()
            .map(|h| Job {
                key: h.key,
                activation: config.clone(),
                destination,
                change: SegmentChanged { profile: Arc::new(h.profile), ..h.change },
            })
            .collect())
    }

    /// Holds `jobs` for `activation` on top of what it already holds: the members of an earlier
    /// held run are stored members now, and only a confirmation may send them.
    async fn hold(&self, activation: &str, jobs: &[Job]) -> Result<(), cohort_adapters::StoreError> {
        let store = self.shared.store.as_ref();
        let newer = jobs
            .iter()
            .map(|j| HeldJob { key: j.key.clone(), profile: (*j.change.profile).clone(), change: j.change.clone() })
            .collect();
        let _writing = HELD_WRITES.lock().await;
        let stored = held_jobs_of(store, activation).await?;
        let unstored = listed_only(store, activation, &stored).await?;
        let held = add_to_hold(stored, newer);
        write_held(store, activation, &held, &unstored).await
    }

    /// Stores the holds the store has not taken yet; what it still refuses is retried in a
    /// second, without holding up anything else the actor does meanwhile.
    async fn save_holds(&mut self, myself: &ActorRef<ReverseEtlMsg>) {
        let waiting: Vec<(String, Vec<Job>)> =
            self.unsaved.0.lock().iter().map(|(a, jobs)| (a.clone(), jobs.clone())).collect();
        for (activation, jobs) in waiting {
            match self.hold(&activation, &jobs).await {
                Ok(()) => {
                    // Only what was stored: jobs held meanwhile (none, within this actor) stay.
                    let mut unsaved = self.unsaved.0.lock();
                    if let Some(left) = unsaved.get_mut(&activation) {
                        left.retain(|j| !jobs.iter().any(|s| s.key == j.key));
                        if left.is_empty() {
                            unsaved.remove(&activation);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(activation = %activation, error = %e, "held batch not stored yet; held in memory, retrying")
                }
            }
        }
        if !self.unsaved.0.lock().is_empty() && !self.save_scheduled {
            self.save_scheduled = true;
            myself.send_after(Duration::from_secs(1), || ReverseEtlMsg::SaveHolds);
        }
    }
}

/// What a hold holds after another held run: the older run's jobs (their members are stored
/// members now, and only a confirmation may send them), then the newer run's, one per key.
fn add_to_hold(mut older: Vec<HeldJob>, newer: Vec<HeldJob>) -> Vec<HeldJob> {
    let keys: std::collections::HashSet<String> = newer.iter().map(|j| j.key.clone()).collect();
    older.retain(|j| !keys.contains(&j.key));
    older.extend(newer);
    older
}

/// Held jobs per document at most: a batch of many members stays well inside MongoDB's
/// document size (16 MiB); parts are cut at [`HELD_PART_BYTES`] of JSON as well.
const HELD_PART_JOBS: usize = 500;
const HELD_PART_BYTES: usize = 4 << 20;
/// Job keys per index document (about 70 bytes each).
const HELD_INDEX_KEYS: usize = 10_000;

/// The job keys of each part of every hold (`activation/000000` -> `{"keys": [...]}`): what
/// statuses, the gauge, consent re-offers and the start-up catch-up need, without the snapshots.
pub const HELD_INDEX: &str = "reverse_etl_held_index";

/// Serializes this process's writes of holds: the reverse ETL actor's holds and confirmations
/// and the erasure saga's rewrites would otherwise read and rewrite one hold at the same time.
static HELD_WRITES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The activation a part key (`activation/000000`) belongs to.
fn part_activation(key: &str) -> &str {
    key.rsplit_once('/').map_or(key, |(name, _)| name)
}

/// Keys the index lists for `activation` that no readable part holds (a write cut short, a
/// damaged part): still held, so a rewrite of the hold keeps them listed.
async fn listed_only(
    store: &dyn OperationalStore,
    activation: &str,
    stored: &[HeldJob],
) -> Result<Vec<String>, cohort_adapters::StoreError> {
    let stored: std::collections::HashSet<&str> = stored.iter().map(|j| j.key.as_str()).collect();
    let mut keys = Vec::new();
    for (_, doc) in held_parts(store, HELD_INDEX, activation).await? {
        keys.extend(index_keys(&doc).into_iter().filter(|k| !stored.contains(k.as_str())));
    }
    Ok(keys)
}

/// The job keys one index document lists.
fn index_keys(doc: &Value) -> Vec<String> {
    doc.get("keys").cloned().and_then(|k| serde_json::from_value(k).ok()).unwrap_or_default()
}

/// Job keys by activation, from the index.
async fn held_index(
    store: &dyn OperationalStore,
) -> Result<BTreeMap<String, Vec<String>>, cohort_adapters::StoreError> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (key, doc) in all_documents(store, HELD_INDEX, "").await? {
        let keys = index_keys(&doc);
        if !keys.is_empty() {
            out.entry(part_activation(&key).to_string()).or_default().extend(keys);
        }
    }
    Ok(out)
}

/// The part documents of `activation`'s hold in `collection` (`activation/000000`, ...), not
/// those of another activation whose name starts with `activation/`.
async fn held_parts(
    store: &dyn OperationalStore,
    collection: &str,
    activation: &str,
) -> Result<Vec<(String, Value)>, cohort_adapters::StoreError> {
    let parts = all_documents(store, collection, &format!("{activation}/")).await?;
    Ok(parts.into_iter().filter(|(k, _)| part_activation(k) == activation).collect())
}

/// The jobs in one part; an unreadable part is logged and read as empty, so one damaged
/// document cannot stop every later hold, confirmation or erasure.
fn part_jobs(key: &str, doc: &Value) -> Vec<HeldJob> {
    match doc.get("jobs").cloned().map(serde_json::from_value::<Vec<HeldJob>>).transpose() {
        Ok(jobs) => jobs.unwrap_or_default(),
        Err(e) => {
            tracing::error!(part = %key, error = %e, "held batch part unreadable; skipped");
            Vec::new()
        }
    }
}

/// Every job of `activation`'s hold, as stored.
async fn held_jobs_of(
    store: &dyn OperationalStore,
    activation: &str,
) -> Result<Vec<HeldJob>, cohort_adapters::StoreError> {
    let parts = held_parts(store, HELD, activation).await?;
    Ok(parts.iter().flat_map(|(key, doc)| part_jobs(key, doc)).collect())
}

/// Makes `held` what `activation` holds (empty: releases it). The index is written first: a
/// hold that grows and fails half-way leaves listed jobs whose parts are missing (held, never
/// sent unconfirmed), and one that shrinks (a release, an erasure) drops only jobs leaving it.
async fn write_held(
    store: &dyn OperationalStore,
    activation: &str,
    held: &[HeldJob],
    unstored: &[String],
) -> Result<(), cohort_adapters::StoreError> {
    let mut parts: Vec<Vec<&HeldJob>> = Vec::new();
    let mut bytes = 0;
    for job in held {
        let size = serde_json::to_vec(job).map(|v| v.len()).unwrap_or(0);
        match parts.last_mut() {
            Some(part) if part.len() < HELD_PART_JOBS && bytes + size <= HELD_PART_BYTES => part.push(job),
            _ => {
                parts.push(vec![job]);
                bytes = 0;
            }
        }
        bytes += size;
    }
    let keys: Vec<&str> = held.iter().map(|j| j.key.as_str()).chain(unstored.iter().map(String::as_str)).collect();
    let index = keys.chunks(HELD_INDEX_KEYS).map(|k| json!({ "keys": k })).collect();
    put_parts(store, HELD_INDEX, activation, index).await?;
    put_parts(store, HELD, activation, parts.iter().map(|p| json!({ "jobs": p })).collect()).await
}

/// Writes `docs` as `activation`'s parts in `collection` and deletes the parts beyond them.
async fn put_parts(
    store: &dyn OperationalStore,
    collection: &str,
    activation: &str,
    docs: Vec<Value>,
) -> Result<(), cohort_adapters::StoreError> {
    let mut writes: Vec<(String, Option<Value>)> =
        docs.into_iter().enumerate().map(|(n, d)| (format!("{activation}/{n:06}"), Some(d))).collect();
    let written: std::collections::HashSet<String> = writes.iter().map(|(k, _)| k.clone()).collect();
    for (stale, _) in held_parts(store, collection, activation).await? {
        if !written.contains(&stale) {
            writes.push((stale, None));
        }
    }
    if writes.is_empty() {
        return Ok(());
    }
    store.put_documents(collection, writes).await
}

/// Takes the jobs of `target`'s profiles out of every held batch, or (`dry_run`) only counts
/// them: a held job keeps the person's snapshot, which an erasure must not leave behind. Reads
/// the parts themselves, not the index, so nothing stored escapes it.
pub async fn erase_held(
    store: &dyn OperationalStore,
    target: &cohort_messages::ErasureTarget,
    dry_run: bool,
) -> Result<u64, cohort_adapters::StoreError> {
    let _writing = HELD_WRITES.lock().await;
    let mut by_activation: BTreeMap<String, Vec<HeldJob>> = BTreeMap::new();
    for (key, doc) in all_documents(store, HELD, "").await? {
        by_activation.entry(part_activation(&key).to_string()).or_default().extend(part_jobs(&key, &doc));
    }
    let mut taken = 0;
    for (activation, mut held) in by_activation {
        // Job keys name the profile (`activation:profile:...`).
        let before = held.len();
        held.retain(|j| !target.names_profile(&j.key));
        let theirs = before - held.len();
        taken += theirs as u64;
        if theirs > 0 && !dry_run {
            let mut unstored = listed_only(store, &activation, &held).await?;
            unstored.retain(|k| !target.names_profile(k));
            write_held(store, &activation, &held, &unstored).await?;
        }
    }
    Ok(taken)
}

/// A held job as stored: the change and the profile snapshot its request renders (which the
/// change's own serialization leaves out).
#[derive(Serialize, serde::Deserialize)]
struct HeldJob {
    key: String,
    change: SegmentChanged,
    profile: ActivationProfile,
}

/// A supervised destination actor; jobs wait here while it restarts.
struct Child {
    lane: Arc<Lane>,
    actor: Option<ActorRef<DestinationMsg>>,
    tracker: RestartTracker,
    pending: Vec<Job>,
}

impl Child {
    fn new(lane: Arc<Lane>) -> Self {
        Self { lane, actor: None, tracker: RestartTracker::default(), pending: Vec::new() }
    }

    /// Hands a (counted) job to the actor, or keeps it until the actor is back.
    fn deliver(&mut self, job: Job) {
        let msg = || DestinationMsg::Send {
            key: job.key.clone(),
            activation: job.activation.name.clone(),
            change: job.change.clone(),
        };
        let sent = self.actor.as_ref().is_some_and(|a| a.send_message(msg()).is_ok());
        if !sent {
            self.pending.push(job);
        }
    }
}

/// One destination's ReverseEtl actor: takes jobs from its own mailbox and runs each in its
/// lane (rate limit, quota, in-flight limit), so nothing another destination does reaches it.
pub struct DestinationActor;

pub struct DestinationArgs {
    shared: Arc<Shared>,
    lane: Arc<Lane>,
    activations: HashMap<String, Arc<ActivationConfig>>,
}

impl Actor for DestinationActor {
    type Msg = DestinationMsg;
    type State = DestinationArgs;
    type Arguments = DestinationArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<DestinationMsg>,
        args: DestinationArgs,
    ) -> Result<DestinationArgs, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<DestinationMsg>,
        msg: DestinationMsg,
        state: &mut DestinationArgs,
    ) -> Result<(), ActorProcessingErr> {
        let DestinationMsg::Send { key, activation, change } = msg;
        let Some(activation) = state.activations.get(&activation).cloned() else {
            state.lane.waiting.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(activation = %activation, "job for an activation this destination does not know");
            return Ok(());
        };
        let job = Job { key, activation, destination: state.lane.destination, change };
        tokio::spawn(run(state.shared.clone(), state.lane.clone(), job));
        Ok(())
    }
}

fn job_key(activation: &str, c: &SegmentChanged) -> String {
    let change = match c.change {
        Change::Entered => "enter",
        Change::Exited => "exit",
    };
    format!("{activation}:{}:{}:{change}:{}", c.profile_id, c.segment, c.at.timestamp_millis())
}

/// `{{traits.first_name}}` and friends, from the profile snapshot of the change.
fn render(template: &str, change: &SegmentChanged) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or_else(|| format!("unclosed placeholder in `{template}`"))?;
        let path = after[..end].trim();
        out.push_str(&lookup(path, change)?);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Number(n) => {
            n.as_f64().filter(|f| f.fract() != 0.0).map_or_else(|| n.to_string(), |f| format!("{f:.2}"))
        }
        other => other.to_string(),
    }
}

fn lookup(path: &str, c: &SegmentChanged) -> Result<String, String> {
    let p: &ActivationProfile = &c.profile;
    Ok(match path.split_once('.') {
        Some(("traits", name)) => p.traits.get(name).map(|t| scalar(&t.value)).unwrap_or_default(),
        Some(("computed", name)) => p.computed.get(name).map(scalar).unwrap_or_default(),
        None if path == "segment" => c.segment.clone(),
        None if path == "entered_at" || path == "changed_at" => c.at.to_rfc3339(),
        None if path == "profile_id" => c.profile_id.to_string(),
        _ => {
            return Err(format!(
                "unknown placeholder `{{{{{path}}}}}` (traits.NAME, computed.NAME, segment, changed_at, profile_id)"
            ))
        }
    })
}

fn identifier(p: &ActivationProfile, kind: IdentifierKind) -> Option<String> {
    p.identifiers.iter().find(|l| l.identifier.kind == kind).map(|l| l.identifier.value.clone())
}

/// Whether a value looks like an email address or a phone number.
fn looks_personal(value: &str) -> bool {
    let email = value.split_whitespace().any(|w| {
        w.split_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.') && !domain.ends_with('.'))
    });
    // A phone number: 9-15 digits with the usual separators, not shaped like a date.
    let phone = value
        .split(|c: char| !(c.is_ascii_digit() || matches!(c, ' ' | '+' | '-' | '(' | ')' | '/' | '.')))
        .map(str::trim)
        .any(|run| {
            let digits = run.chars().filter(char::is_ascii_digit).count();
            let b = run.as_bytes();
            let shape = |pattern: &str| {
                b.len() >= pattern.len()
                    && pattern.bytes().zip(b).all(|(p, c)| if p == b'9' { c.is_ascii_digit() } else { p == *c })
            };
            let date = shape("9999-99-99") || shape("99.99.9999") || shape("99/99/9999");
            (9..=15).contains(&digits) && !date
        });
    email || phone
}

/// Standard fields the Salesforce activations may write (custom fields end in `__c`).
const SALESFORCE_TASK_FIELDS: &[&str] =
    &["Subject", "Priority", "Status", "Description", "ActivityDate", "OwnerId", "WhatId", "Type", "CallDisposition"];
const SALESFORCE_CONTACT_FIELDS: &[&str] = &["Description", "LeadSource", "Title", "Department", "HasOptedOutOfEmail"];

/// Gate 4: renders the mapped fields, checks the mapping and keeps personal data where allowed.
fn mapped_fields(job: &Job) -> Result<BTreeMap<String, String>, JobError> {
    let a = &job.activation;
    let mut out = BTreeMap::new();
    for (field, template) in &a.fields {
        if job.destination == Destination::Salesforce {
            let valid_name = field.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                && field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            let known = if a.action == "create_task" { SALESFORCE_TASK_FIELDS } else { SALESFORCE_CONTACT_FIELDS };
            if !valid_name || !(known.contains(&field.as_str()) || field.ends_with("__c")) {
                return Err(JobError::Gate(format!(
                    "`{field}` is not a writable Salesforce {} field",
                    if a.action == "create_task" { "Task" } else { "Contact" }
                )));
            }
        }
        let value = render(template, &job.change).map_err(JobError::Gate)?;
        if value.trim().is_empty() {
            return Err(JobError::Gate(format!("mapped field `{field}` has no value for this profile")));
        }
        if looks_personal(&value) && !a.pii_fields.contains(field) {
            return Err(JobError::Gate(format!("personal data in `{field}`, which is not listed in pii_fields")));
        }
        out.insert(field.clone(), value);
    }
    Ok(out)
}

/// What the job's channel needs before anything is sent: the consent to check (if any) and the
/// address to check against the suppression list.
fn channel_of(job: &Job) -> Option<Channel> {
    channel_for(job.destination, &job.activation.action)
}

/// The consent channel an action on a destination needs, if any.
fn channel_for(destination: Destination, action: &str) -> Option<Channel> {
    match (destination, action) {
        (Destination::Sendgrid, "add_to_list") => Some(Channel::Email),
        (Destination::Twilio, _) => Some(Channel::Whatsapp),
        (Destination::Push, _) => Some(Channel::Push),
        // CRM updates are the school's own records; removing someone from a list is always allowed.
        _ => None,
    }
}

fn address(job: &Job) -> Result<String, Skip> {
    let p = &job.change.profile;
    match job.destination {
        Destination::Salesforce => identifier(p, IdentifierKind::SalesforceId).ok_or(Skip::NoAddress("salesforce_id")),
        Destination::Sendgrid => identifier(p, IdentifierKind::Email).ok_or(Skip::NoAddress("email")),
        Destination::Twilio => identifier(p, IdentifierKind::WhatsappId)
            .or_else(|| identifier(p, IdentifierKind::Phone))
            .ok_or(Skip::NoAddress("whatsapp_or_phone")),
        Destination::Push => p
            .traits
            .get("push_token")
            .map(|t| scalar(&t.value))
            .filter(|t| !t.is_empty())
            .ok_or(Skip::NoAddress("push_token")),
    }
}

/// The email address a profile's record shows (traits keep it as written; identifiers are
/// canonical mailboxes, which the email tool would not recognize for Gmail dots).
fn email_as_written(p: &ActivationProfile, canonical: &str) -> String {
    p.traits.get("email").map(|t| scalar(&t.value)).filter(|e| !e.is_empty()).unwrap_or_else(|| canonical.to_string())
}

/// The contact fields SendGrid's Marketing Campaigns API takes on the contact itself; others
/// go under `custom_fields`, keyed by the custom field's id (`e1_T`).
const SENDGRID_RESERVED_FIELDS: &[&str] = &[
    "address_line_1",
    "address_line_2",
    "alternate_emails",
    "city",
    "country",
    "first_name",
    "last_name",
    "postal_code",
    "state_province_region",
    "phone_number",
    "whatsapp",
    "line",
    "facebook",
    "unique_name",
    "external_id",
];

fn build(job: &Job, lane: &Lane, to: &str, fields: BTreeMap<String, String>) -> Vec<Request> {
    let c = &lane.config;
    let a = &job.activation;
    match (job.destination, a.action.as_str()) {
        (Destination::Salesforce, "create_task") => {
            let mut body: serde_json::Map<String, Value> =
                fields.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
            body.insert("WhoId".into(), Value::String(to.into()));
            vec![Request {
                method: reqwest::Method::POST,
                path: format!("/services/data/{}/sobjects/Task", c.api_version),
                body: Body::Json(Value::Object(body)),
            }]
        }
        (Destination::Salesforce, _) => vec![Request {
            method: reqwest::Method::PATCH,
            path: format!("/services/data/{}/sobjects/Contact/{to}", c.api_version),
            body: Body::Json(json!(fields)),
        }],
        (Destination::Sendgrid, "add_to_list") => {
            // Reserved fields sit on the contact; any other is a custom field, by its id.
            let (reserved, custom): (Vec<_>, Vec<_>) =
                fields.into_iter().partition(|(k, _)| SENDGRID_RESERVED_FIELDS.contains(&k.as_str()));
            let mut contact: serde_json::Map<String, Value> =
                reserved.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
            if !custom.is_empty() {
                let custom: serde_json::Map<String, Value> =
                    custom.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
                contact.insert("custom_fields".into(), Value::Object(custom));
            }
            contact.insert("email".into(), Value::String(email_as_written(&job.change.profile, to)));
            vec![Request {
                method: reqwest::Method::PUT,
                path: "/v3/marketing/contacts".into(),
                body: Body::Json(json!({ "list_ids": [a.list_id], "contacts": [contact] })),
            }]
        }
        (Destination::Sendgrid, _) => vec![Request {
            method: reqwest::Method::POST,
            path: "/v3/marketing/contacts/search/emails".into(),
            body: Body::Json(json!({ "emails": [email_as_written(&job.change.profile, to)] })),
        }],
        (Destination::Twilio, _) => {
            let variables = serde_json::to_string(&fields).unwrap_or_else(|_| "{}".into());
            let to = if to.starts_with("whatsapp:") { to.to_string() } else { format!("whatsapp:{to}") };
            vec![Request {
                method: reqwest::Method::POST,
                path: format!("/2010-04-01/Accounts/{}/Messages.json", c.account_sid),
                body: Body::Form(vec![
                    ("To".into(), to),
                    ("From".into(), c.from.clone()),
                    ("ContentSid".into(), a.template_sid.clone()),
                    ("ContentVariables".into(), variables),
                ]),
            }]
        }
        (Destination::Push, _) => {
            let mut data = fields;
            let title = data.remove("title").unwrap_or_default();
            let body = data.remove("body").unwrap_or_default();
            vec![Request {
                method: reqwest::Method::POST,
                path: format!("/v1/projects/{}/messages:send", c.project),
                body: Body::Json(
                    json!({ "message": { "token": to, "notification": { "title": title, "body": body }, "data": data } }),
                ),
            }]
        }
    }
}

impl Lane {
    fn new(destination: Destination, config: DestinationConfig, timeout: Duration) -> Option<Arc<Lane>> {
        if config.url.trim().is_empty() {
            return None;
        }
        let rate = NonZeroU32::new(config.requests_per_second).unwrap_or(NonZeroU32::MIN);
        let http = reqwest::Client::builder().timeout(timeout).build().ok()?;
        Some(Arc::new(Lane {
            destination,
            limiter: RateLimiter::direct(Quota::per_second(rate)),
            permits: Semaphore::new(config.max_in_flight.max(1)),
            http,
            config,
            waiting: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            stats: Mutex::new(LaneStats::default()),
            quota: tokio::sync::Mutex::new(QuotaBlock::default()),
        }))
    }

    fn skip(&self, shared: &Shared, reason: &str) {
        *self.stats.lock().skipped.entry(reason.to_string()).or_default() += 1;
        shared.metrics.reverse_etl_skipped.with_label_values(&[self.destination.as_str(), reason]).inc();
    }

    /// Counts a request against the daily quota, which every process shares through the
    /// store; refuses past it.
    async fn take_quota(&self, store: &dyn OperationalStore) -> Result<(), JobError> {
        let limit = self.config.daily_limit;
        let today = Utc::now().date_naive();
        if limit > 0 {
            let mut block = self.quota.lock().await;
            if block.day != Some(today) {
                *block = QuotaBlock { day: Some(today), left: 0 };
            }
            if block.left == 0 {
                block.left = reserve_quota(store, self.destination, today, limit).await.map_err(|e| {
                    let message = format!("daily quota unavailable: {e}");
                    if e.is_retryable() {
                        JobError::Transient(message)
                    } else {
                        JobError::Permanent(message)
                    }
                })?;
            }
            if block.left == 0 {
                return Err(JobError::Quota(limit));
            }
            block.left -= 1;
        }
        let mut s = self.stats.lock();
        if s.day != Some(today) {
            s.day = Some(today);
            s.today = 0;
        }
        s.today += 1;
        Ok(())
    }

    async fn send_once(&self, req: &Request, key: &str) -> Result<Value, JobError> {
        let url = format!("{}{}", self.config.url.trim_end_matches('/'), req.path);
        let mut builder = self.http.request(req.method.clone(), &url).header("Idempotency-Key", key);
        builder = match self.destination {
            Destination::Twilio => builder.basic_auth(&self.config.account_sid, Some(&self.config.auth_token)),
            _ => builder.bearer_auth(&self.config.token),
        };
        builder = match &req.body {
            Body::Json(v) => builder.json(v),
            Body::Form(f) => builder.form(f),
            Body::None => builder,
        };
        let response = builder.send().await.map_err(|e| JobError::Transient(format!("request failed: {e}")))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if status.is_success() {
            return Ok(serde_json::from_str(&text).unwrap_or(Value::Null));
        }
        // Only the status: a destination's answer may echo what we sent (personal data), and
        // this message is logged and kept in the status.
        drop(text);
        let message = format!("{} answered {status}", self.destination.as_str());
        if status.as_u16() == 429 || status.is_server_error() || status.as_u16() == 408 {
            Err(JobError::Transient(message))
        } else {
            Err(JobError::Permanent(message))
        }
    }

    /// Sends with rate limiting, the daily quota and capped exponential backoff with jitter.
    async fn send(
        &self,
        shared: &Shared,
        req: &Request,
        job: &Job,
        first: &mut Option<DateTime<Utc>>,
    ) -> Result<Value, JobError> {
        let (s, key) = (&shared.settings, job.key.as_str());
        let mut delay = Duration::from_millis(s.backoff_initial_ms.max(1));
        let mut attempt = 1;
        loop {
            // An erasure that ran while this request was retrying ends it, and so does a consent
            // withdrawn or an address suppressed meanwhile (a STOP reply, say).
            if shared.erasures.is_erased(&job.change.profile_id) {
                return Err(JobError::Skipped(Skip::Erased));
            }
            if attempt > 1 {
                if let Some(skip) = contact_refused(shared.store.as_ref(), job).await? {
                    return Err(JobError::Skipped(skip));
                }
            }
            self.limiter.until_ready().await;
            // An unreachable quota record is retried like a failed request; a used-up day is not.
            let sent = match self.take_quota(shared.store.as_ref()).await {
                Ok(()) => {
                    first.get_or_insert_with(Utc::now);
                    self.send_once(req, key).await
                }
                Err(e) => Err(e),
            };
            match sent {
                Ok(v) => return Ok(v),
                Err(JobError::Transient(e)) if attempt < s.max_attempts => {
                    self.stats.lock().retries += 1;
                    shared
                        .metrics
                        .reverse_etl_requests
                        .with_label_values(&[self.destination.as_str(), "retried"])
                        .inc();
                    tracing::info!(destination = self.destination.as_str(), attempt, error = %e, "destination request failed; retrying");
                    let jitter = rand::thread_rng().gen_range(0.5..1.5);
                    tokio::time::sleep(delay.mul_f64(jitter)).await;
                    delay = (delay * 2).min(Duration::from_millis(s.backoff_max_ms.max(1)));
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Counts a job in flight for as long as it lives.
struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Holds a job's key in `Shared::running` until the job's outcome is recorded.
struct RunningKey<'a>(&'a Shared, &'a str);

impl Drop for RunningKey<'_> {
    fn drop(&mut self) {
        self.0.running.lock().remove(self.1);
    }
}

/// Runs a job; the router counted it as waiting when it was queued.
async fn run(shared: Arc<Shared>, lane: Arc<Lane>, job: Job) {
    // The same change can reach a lane twice (catch-up and live, or offered again after a
    // consent grant). The second waits for the first to end and then checks for itself: a
    // duplicate if it was sent, a send if it was skipped for a consent granted meanwhile.
    while !shared.running.lock().insert(job.key.clone()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _running = RunningKey(&shared, &job.key);
    let permit = lane.permits.acquire().await;
    // In flight before it stops waiting, so a drain (which reads `waiting` first) never sees
    // the job in neither count; in flight until its outcome is recorded and counted (dropped at
    // the end), so a drain never sees a job finished whose failure is not yet stored for retry.
    lane.in_flight.fetch_add(1, Ordering::SeqCst);
    let _in_flight = InFlight(&lane.in_flight);
    lane.waiting.fetch_sub(1, Ordering::SeqCst);
    let Ok(_permit) = permit else { return };
    // Tracing: the destination request ends the trace of the event that caused it.
    let span = tracing::debug_span!("destination.send", destination = lane.destination.as_str());
    crate::trace::continue_from(&span, job.change.trace.as_deref());
    let outcome = attempt(&shared, &lane, &job).await;
    // Erased mid-way: a skip, never a failure record (which would keep the person's snapshot).
    let outcome = match outcome {
        Err(JobError::Skipped(skip)) => Ok(Some(skip)),
        other => other,
    };
    let store = &shared.store;
    let d = lane.destination.as_str();
    match outcome {
        Ok(None) => {}
        Ok(Some(skip)) => {
            let reason = match skip {
                Skip::Consent => "consent".to_string(),
                Skip::Suppressed => "suppressed".into(),
                Skip::NoAddress(what) => format!("no_{what}"),
                Skip::Duplicate => "duplicate".into(),
                Skip::Unchanged => "unchanged".into(),
                Skip::Erased => "erased".into(),
                Skip::Superseded => "superseded".into(),
            };
            tracing::debug!(destination = d, activation = %job.activation.name, reason = %reason, "activation skipped");
            lane.skip(&shared, &reason);
        }
        Err(e) => {
            if let JobError::Gate(reason) = &e {
                let first = shared.refusals_recorded.lock().insert((job.activation.name.clone(), reason.clone()));
                if first {
                    let run =
                        crate::quality::gate4_refusal(&job.activation.name, job.change.profile_id.as_str(), reason);
                    if let Err(e) = crate::quality::record_run(store.as_ref(), &shared.metrics, &run, false).await {
                        tracing::warn!(error = %e, "gate 4 refusal not stored");
                    }
                }
                lane.skip(&shared, "gate4");
            }
            shared.metrics.reverse_etl_requests.with_label_values(&[d, "failed"]).inc();
            tracing::warn!(destination = d, activation = %job.activation.name, profile_id = %job.change.profile_id, error = %e, "activation failed");
            let record = FailureRecord {
                key: job.key.clone(),
                activation: job.activation.name.clone(),
                profile_id: job.change.profile_id.to_string(),
                segment: job.change.segment.clone(),
                error: e.to_string(),
                at: Some(Utc::now()),
            };
            // Kept for a retry before the failure is counted, so whoever sees the count can retry
            // it; a Gate 4 refusal is a configuration problem, retried once fixed.
            let doc = json!({
                "activation": job.activation.name, "destination": d, "error": record.error, "at": record.at,
                "change": job.change, "profile": &*job.change.profile,
            });
            if let Err(e) = store.put_documents(FAILED, vec![(job.key.clone(), Some(doc))]).await {
                tracing::warn!(error = %e, "failed activation not stored for retry");
            }
            {
                let mut s = lane.stats.lock();
                s.failed += 1;
                s.last_error = Some(record.error.clone());
                s.recent_failures.push_back(record.clone());
                while s.recent_failures.len() > 50 {
                    s.recent_failures.pop_front();
                }
            }
        }
    }
}

/// A store error while a job decides: it is retried like a failed request.
fn store_unavailable(e: cohort_adapters::StoreError) -> JobError {
    JobError::Transient(format!("store unavailable: {e}"))
}

/// Whether the membership moved on since the change: an entry whose membership is gone or newer
/// (a retry backing off, a manual retry, a held batch confirmed late), or an exit whose student is
/// a member again. Per profile, only the latest change's requests go out.
async fn superseded(store: &dyn OperationalStore, job: &Job) -> Result<Option<Skip>, JobError> {
    let key = member_key(&job.change.segment, &job.change.profile_id);
    let doc = store.get_documents(MEMBERS, &[key]).await.map_err(store_unavailable)?.into_iter().next().flatten();
    let moved_on = match job.change.change {
        Change::Entered => doc.as_ref().and_then(member_since).is_none_or(|since| since != job.change.at),
        Change::Exited => doc.is_some(),
    };
    Ok(moved_on.then_some(Skip::Superseded))
}

/// Why the job may not contact the person now: no address, no marketing consent or a
/// suppressed address on its channel, else the membership moved on. Asked before the first
/// request and before every retry; the person's own refusals come first, so a job without
/// consent is skipped for consent however soon her profile merges (and a grant re-offers it).
async fn contact_refused(store: &dyn OperationalStore, job: &Job) -> Result<Option<Skip>, JobError> {
    match channel_refused(store, job).await? {
        Some(skip) => Ok(Some(skip)),
        None => superseded(store, job).await,
    }
}

/// No address, no marketing consent, or a suppressed address on the job's channel.
async fn channel_refused(store: &dyn OperationalStore, job: &Job) -> Result<Option<Skip>, JobError> {
    let Some(channel) = channel_of(job) else { return Ok(None) };
    let to = match address(job) {
        Ok(a) => a,
        Err(skip) => return Ok(Some(skip)),
    };
    let consents = store.consents(&job.change.profile_id).await.map_err(store_unavailable)?;
    if !consents.iter().any(|c| c.channel == channel && c.purpose == "marketing" && c.granted) {
        return Ok(Some(Skip::Consent));
    }
    let listed = store.suppressed(&[(channel, to)]).await.map_err(store_unavailable)?;
    if listed.first().is_some_and(Option::is_some) {
        return Ok(Some(Skip::Suppressed));
    }
    Ok(None)
}

/// One job: idempotency, consent, suppression, Gate 4, then the request(s).
async fn attempt(shared: &Shared, lane: &Lane, job: &Job) -> Result<Option<Skip>, JobError> {
    let store = &shared.store;
    if shared.erasures.is_erased(&job.change.profile_id) {
        return Ok(Some(Skip::Erased));
    }
    if store
        .get_documents(SENT, std::slice::from_ref(&job.key))
        .await
        .map_err(store_unavailable)?
        .first()
        .is_some_and(Option::is_some)
    {
        return Ok(Some(Skip::Duplicate));
    }
    let to = match address(job) {
        Ok(a) => a,
        Err(skip) => return Ok(Some(skip)),
    };
    if let Some(skip) = contact_refused(store.as_ref(), job).await? {
        return Ok(Some(skip));
    }
    let mut fields = mapped_fields(job)?;
    // Incremental: a Contact update sends only the fields that differ from the last one written.
    let fields_key = format!("{}/{}", job.activation.name, job.change.profile_id);
    let incremental = job.destination == Destination::Salesforce && job.activation.action == "update_contact";
    let all_fields = fields.clone();
    if incremental {
        let last = store.get_documents(FIELDS, std::slice::from_ref(&fields_key)).await.map_err(store_unavailable)?;
        if let Some(Some(Value::Object(last))) = last.into_iter().next() {
            fields.retain(|k, v| last.get(k).and_then(Value::as_str) != Some(v.as_str()));
        }
        if fields.is_empty() {
            return Ok(Some(Skip::Unchanged));
        }
    }
    let requests = build(job, lane, &to, fields);
    let mut first_sent = None;
    for req in &requests {
        let answer = lane.send(shared, req, job, &mut first_sent).await?;
        // SendGrid removes list members by contact id: look it up, then delete.
        if job.destination == Destination::Sendgrid && job.activation.action == "remove_from_list" {
            let email = email_as_written(&job.change.profile, &to);
            let id = answer
                .pointer(&format!("/result/{}/contact/id", email.replace('~', "~0").replace('/', "~1")))
                .and_then(Value::as_str)
                .map(str::to_string);
            let Some(id) = id else { return Ok(Some(Skip::NoAddress("sendgrid_contact"))) };
            let delete = Request {
                method: reqwest::Method::DELETE,
                path: format!("/v3/marketing/lists/{}/contacts?contact_ids={id}", job.activation.list_id),
                body: Body::None,
            };
            lane.send(shared, &delete, job, &mut first_sent).await?;
        }
    }
    if let (Some(sent), Some(caused)) = (first_sent, job.change.caused_at) {
        shared.metrics.trigger_latency.observe((sent - caused).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6);
    }
    lane.stats.lock().sent += 1;
    shared.metrics.reverse_etl_requests.with_label_values(&[lane.destination.as_str(), "sent"]).inc();
    // Erased while the request was on its way: keep no sync state naming the person.
    if shared.erasures.is_erased(&job.change.profile_id) {
        return Ok(None);
    }
    if incremental {
        store.put_documents(FIELDS, vec![(fields_key, Some(json!(all_fields)))]).await.map_err(store_unavailable)?;
    }
    store
        .put_documents(SENT, vec![(job.key.clone(), Some(json!({ "at": Utc::now() })))])
        .await
        .map_err(store_unavailable)?;
    Ok(None)
}

impl ReverseEtlState {
    fn jobs(&self, changes: &[SegmentChanged]) -> Vec<Job> {
        let mut jobs = Vec::new();
        for c in changes {
            let on = match c.change {
                Change::Entered => "enter",
                Change::Exited => "exit",
            };
            for a in self.activations.iter().filter(|a| a.segment == c.segment && a.on == on) {
                let Some(destination) = Destination::parse(&a.destination) else { continue };
                jobs.push(Job { key: job_key(&a.name, c), activation: a.clone(), destination, change: c.clone() });
            }
        }
        jobs
    }

    fn spawn(&mut self, job: Job) {
        let Some(child) = self.destinations.get_mut(&job.destination) else {
            tracing::warn!(destination = job.destination.as_str(), "activation for a destination that is off");
            return;
        };
        // Counted as waiting from the moment it is queued (the router's drain sees it).
        child.lane.waiting.fetch_add(1, Ordering::SeqCst);
        child.deliver(job);
    }

    /// Starts (or restarts) a destination actor under the router and hands it the jobs that
    /// waited meanwhile.
    async fn start_destination(
        &mut self,
        myself: &ActorRef<ReverseEtlMsg>,
        d: Destination,
    ) -> Result<(), ActorProcessingErr> {
        let activations = self
            .activations
            .iter()
            .filter(|a| a.destination == d.as_str())
            .map(|a| (a.name.clone(), a.clone()))
            .collect();
        let Some(child) = self.destinations.get_mut(&d) else { return Ok(()) };
        let args = DestinationArgs { shared: self.shared.clone(), lane: child.lane.clone(), activations };
        let (actor, _) = Actor::spawn_linked(None, DestinationActor, args, myself.get_cell()).await?;
        child.actor = Some(actor);
        for job in std::mem::take(&mut child.pending) {
            child.deliver(job);
        }
        Ok(())
    }

    fn status(&self) -> Value {
        let mut out = serde_json::Map::new();
        for d in Destination::ALL {
            let v = match self.destinations.get(&d).map(|c| &c.lane) {
                None => json!({ "enabled": false }),
                Some(l) => {
                    let s = l.stats.lock();
                    json!({
                        "enabled": true,
                        "sent": s.sent, "failed": s.failed, "retries": s.retries, "skipped": s.skipped,
                        "in_flight": l.in_flight.load(Ordering::SeqCst), "waiting": l.waiting.load(Ordering::SeqCst),
                        "requests_per_second": l.config.requests_per_second,
                        "daily_limit": l.config.daily_limit, "used_today": s.today,
                        "last_error": s.last_error, "recent_failures": s.recent_failures,
                    })
                }
            };
            out.insert(d.as_str().into(), v);
        }
        json!({ "destinations": out })
    }

    fn busy(&self) -> bool {
        self.destinations.values().any(|c| c.lane.busy())
    }
}

/// When a stored membership (`segment_members` document) began.
fn member_since(doc: &Value) -> Option<DateTime<Utc>> {
    doc_time(doc, "since")
}

/// For each job key, whether no destination has sent it nor recorded it as failed.
async fn still_open(store: &dyn OperationalStore, keys: &[String]) -> Result<Vec<bool>, cohort_adapters::StoreError> {
    let sent = store.get_documents(SENT, keys).await?;
    let failed = store.get_documents(FAILED, keys).await?;
    Ok(sent.into_iter().zip(failed).map(|(s, f)| s.is_none() && f.is_none()).collect())
}

impl ReverseEtlState {
    /// A consent grant on `channels`: the `enter` jobs on those channels of the memberships
    /// the store holds (at the entry time it holds, so the keys are the original jobs'), unless
    /// sent or failed already; a failed one waits for an operator's retry as before.
    async fn offer_again(
        &mut self,
        channels: &[Channel],
        changes: &[SegmentChanged],
    ) -> Result<(), cohort_adapters::StoreError> {
        let store = self.shared.store.clone();
        // Only memberships an `enter` job on a granted channel would use are looked up: the
        // engine offers every batch segment, most of them with nothing for these channels.
        let offered = |a: &ActivationConfig| {
            a.on == "enter"
                && Destination::parse(&a.destination)
                    .and_then(|d| channel_for(d, &a.action))
                    .is_some_and(|c| channels.contains(&c))
        };
        let wanted: Vec<&SegmentChanged> = changes
            .iter()
            .filter(|c| self.activations.iter().any(|a| a.segment == c.segment && offered(a.as_ref())))
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = wanted.iter().map(|c| member_key(&c.segment, &c.profile_id)).collect();
        let members = store.get_documents(MEMBERS, &keys).await?;
        let stored: Vec<SegmentChanged> = wanted
            .into_iter()
            .zip(members)
            .filter_map(|(c, doc)| Some(SegmentChanged { at: member_since(&doc?)?, ..c.clone() }))
            .collect();
        let jobs: Vec<Job> =
            self.jobs(&stored).into_iter().filter(|j| channel_of(j).is_some_and(|c| channels.contains(&c))).collect();
        if jobs.is_empty() {
            return Ok(());
        }
        // A batch run Gate 4 holds waits for a person, whatever consent says (and wherever it
        // was held: the store has it).
        let held = self.held_key_set().await?;
        let jobs: Vec<Job> = jobs.into_iter().filter(|j| !held.contains(&j.key)).collect();
        if jobs.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = jobs.iter().map(|j| j.key.clone()).collect();
        let open = still_open(store.as_ref(), &keys).await?;
        for (job, open) in jobs.into_iter().zip(open) {
            if open {
                self.spawn(job);
            }
        }
        Ok(())
    }

    /// Memberships whose `enter` activations, and recorded exits whose `exit` activations, have
    /// neither been sent nor recorded as failed (a crash between the engine's write and the
    /// request); then forgets exits recorded over [`EXIT_KEPT_DAYS`] ago.
    async fn catch_up(&mut self) -> Result<usize, cohort_adapters::StoreError> {
        let store = self.shared.store.clone();
        let activations = self.activations.clone();
        // Members of a batch run Gate 4 holds are stored, but wait for a person all the same.
        let held = self.held_key_set().await?;
        let mut spawned = 0;
        for a in activations.iter().filter(|a| a.on == "enter" || a.on == "exit") {
            let Some(destination) = Destination::parse(&a.destination) else { continue };
            let (collection, kind) = match a.on.as_str() {
                "exit" => (EXITS, Change::Exited),
                _ => (MEMBERS, Change::Entered),
            };
            let prefix = format!("{}/", a.segment);
            let mut after: Option<String> = None;
            loop {
                let mut page = store.list_documents(collection, &prefix, after.as_deref(), 500).await?;
                let Some((last, _)) = page.last() else { break };
                after = Some(last.clone());
                let full = page.len() == 500;
                if kind == Change::Exited {
                    // A student who entered again since: her exit is over, and its record too.
                    let keys: Vec<String> = page.iter().map(|(k, _)| k.clone()).collect();
                    let members = store.get_documents(MEMBERS, &keys).await?;
                    let back = keys.into_iter().zip(&members).filter(|(_, m)| m.is_some()).map(|(k, _)| k);
                    cohort_adapters::delete_documents(store.as_ref(), EXITS, back).await?;
                    page = page.into_iter().zip(members).filter(|(_, m)| m.is_none()).map(|(p, _)| p).collect();
                }
                let mut pending = Vec::new();
                for (key, doc) in &page {
                    let profile = key.strip_prefix(&prefix).and_then(ProfileId::parse);
                    let at = match kind {
                        Change::Entered => member_since(doc),
                        Change::Exited => exited_at(doc),
                    };
                    let (Some(profile_id), Some(at)) = (profile, at) else { continue };
                    let change = SegmentChanged {
                        profile_id,
                        segment: a.segment.clone(),
                        change: kind,
                        at,
                        profile: Arc::default(),
                        caused_at: None,
                        trace: None,
                    };
                    pending.push((job_key(&a.name, &change), change));
                }
                let keys: Vec<String> = pending.iter().map(|(k, _)| k.clone()).collect();
                let open = still_open(store.as_ref(), &keys).await?;
                let todo: Vec<(String, SegmentChanged)> = pending
                    .into_iter()
                    .zip(open)
                    .filter(|((key, _), open)| *open && !held.contains(key))
                    .map(|(p, _)| p)
                    .collect();
                if !todo.is_empty() {
                    let ids: Vec<ProfileId> = todo.iter().map(|(_, c)| c.profile_id.clone()).collect();
                    let records = store.load_profiles(&ids).await?;
                    let now = Utc::now();
                    for (key, mut change) in todo {
                        let Some(r) = records.iter().find(|r| r.profile_id == change.profile_id) else { continue };
                        change.profile = Arc::new(crate::segments::engine::activation_profile(r, now));
                        self.spawn(Job { key, activation: a.clone(), destination, change });
                        spawned += 1;
                    }
                }
                if !full {
                    break;
                }
            }
        }
        forget_old_exits(store.as_ref()).await?;
        Ok(spawned)
    }
}

/// How long a recorded exit is kept for the catch-up.
const EXIT_KEPT_DAYS: i64 = 7;

fn exited_at(doc: &Value) -> Option<DateTime<Utc>> {
    doc_time(doc, "at")
}

/// Removes the exits recorded over [`EXIT_KEPT_DAYS`] ago: their triggers went long since, or
/// never will.
async fn forget_old_exits(store: &dyn OperationalStore) -> Result<(), cohort_adapters::StoreError> {
    let cutoff = Utc::now() - chrono::Duration::days(EXIT_KEPT_DAYS);
    let exits = all_documents(store, EXITS, "").await?;
    let old = exits.into_iter().filter(|(_, doc)| exited_at(doc).is_none_or(|at| at < cutoff)).map(|(k, _)| k);
    cohort_adapters::delete_documents(store, EXITS, old).await
}

impl Actor for ReverseEtlActor {
    type Msg = ReverseEtlMsg;
    type State = ReverseEtlState;
    type Arguments = ReverseEtlArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<ReverseEtlMsg>,
        args: ReverseEtlArgs,
    ) -> Result<ReverseEtlState, ActorProcessingErr> {
        let timeout = Duration::from_millis(args.config.timeout_ms.max(1));
        let destinations = Destination::ALL
            .into_iter()
            .filter_map(|d| Lane::new(d, d.config(&args.config).clone(), timeout).map(|lane| (d, Child::new(lane))))
            .collect();
        Ok(ReverseEtlState {
            shared: Arc::new(Shared {
                store: args.store,
                metrics: args.metrics,
                settings: args.config,
                running: Mutex::default(),
                erasures: args.erasures,
                gate4: args.gate4,
                refusals_recorded: Mutex::default(),
            }),
            activations: args.activations.into_iter().map(Arc::new).collect(),
            destinations,
            policy: args.policy,
            unsaved: args.unsaved,
            save_scheduled: false,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<ReverseEtlMsg>,
        state: &mut ReverseEtlState,
    ) -> Result<(), ActorProcessingErr> {
        let enabled: Vec<Destination> = state.destinations.keys().copied().collect();
        for d in enabled {
            state.start_destination(&myself, d).await?;
        }
        myself.send_message(ReverseEtlMsg::CatchUp)?;
        // Gate 4's gauge for holds from before a restart.
        if let Err(e) = state.held_keys().await {
            tracing::warn!(error = %e, "held batches not read; gate 4's gauge waits for the next batch");
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<ReverseEtlMsg>,
        evt: SupervisionEvent,
        state: &mut ReverseEtlState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => (cell, reason.unwrap_or_else(|| "stopped".into())),
            _ => return Ok(()),
        };
        let failed = state
            .destinations
            .iter()
            .find(|(_, c)| c.actor.as_ref().is_some_and(|a| a.get_id() == cell.get_id()))
            .map(|(d, _)| *d);
        let Some(d) = failed else { return Ok(()) };
        let policy = state.policy;
        let metrics = state.shared.metrics.clone();
        let Some(child) = state.destinations.get_mut(&d) else { return Ok(()) };
        child.actor = None;
        tracing::warn!(destination = d.as_str(), reason = %reason, "destination actor failed");
        metrics.actor_restarts.with_label_values(&["reverse_etl_destination"]).inc();
        match child.tracker.decide(&policy, std::time::Instant::now()) {
            RestartDecision::Restart { after, .. } => {
                let destination = d.as_str().to_string();
                myself.send_after(after, move || ReverseEtlMsg::Respawn { destination });
                Ok(())
            }
            RestartDecision::Escalate => {
                metrics.actor_escalations.with_label_values(&["reverse_etl_destination"]).inc();
                Err(format!("destination {} exceeded its restart budget: {reason}", d.as_str()).into())
            }
        }
    }

    async fn handle(
        &self,
        myself: ActorRef<ReverseEtlMsg>,
        msg: ReverseEtlMsg,
        state: &mut ReverseEtlState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ReverseEtlMsg::Dispatch(changes) => {
                for job in state.jobs(&changes) {
                    state.spawn(job);
                }
            }
            ReverseEtlMsg::ConsentGranted { channels, changes } => {
                if let Err(e) = state.offer_again(&channels, &changes).await {
                    // Kept, like the engine keeps memberships: asked again until the store answers.
                    tracing::warn!(error = %e, "activations after a consent grant not checked yet; retrying");
                    myself.send_after(Duration::from_secs(1), move || ReverseEtlMsg::ConsentGranted {
                        channels,
                        changes,
                    });
                }
            }
            ReverseEtlMsg::DispatchBatch { segment, changes } => {
                let jobs = state.jobs(&changes);
                let mut by_activation: BTreeMap<String, Vec<Job>> = BTreeMap::new();
                for job in jobs {
                    by_activation.entry(job.activation.name.clone()).or_default().push(job);
                }
                for (activation, jobs) in by_activation {
                    let size = jobs.len() as u64;
                    let previous = match state.shared.store.get_documents(RUNS, std::slice::from_ref(&activation)).await
                    {
                        Ok(previous) => previous,
                        Err(e) => {
                            // Gate 4 cannot judge the run: it waits for a person, as a moved one does.
                            tracing::warn!(activation = %activation, error = %e, "last batch size unreadable; held for confirmation");
                            state.unsaved.add(activation, jobs);
                            continue;
                        }
                    };
                    let previous =
                        previous.first().cloned().flatten().and_then(|v| v.get("size").and_then(Value::as_u64));
                    // Gate 4: a run whose size moved beyond the tolerance waits for a person.
                    let trigger = format!("batch segment {segment}");
                    let run =
                        crate::quality::gate4_row_count(&state.shared.gate4, &activation, &trigger, size, previous);
                    let (store, metrics) = (state.shared.store.as_ref(), &state.shared.metrics);
                    if let Err(e) = crate::quality::record_run(store, metrics, &run, false).await {
                        tracing::warn!(activation = %activation, error = %e, "gate 4 result not stored");
                    }
                    if !run.success {
                        tracing::warn!(activation = %activation, segment = %segment, size, previous, "batch size moved beyond the gate 4 tolerance; held for confirmation");
                        // Held in memory until stored: sent, they would pass the gate; dropped,
                        // the start-up catch-up would send them later.
                        state.unsaved.add(activation, jobs);
                        continue;
                    }
                    let baseline = vec![(activation.clone(), Some(json!({ "size": size })))];
                    if let Err(e) = state.shared.store.put_documents(RUNS, baseline).await {
                        // The run passed: it goes, and the next run is judged against the older size.
                        tracing::warn!(activation = %activation, error = %e, "gate 4's batch size not stored");
                    }
                    for job in jobs {
                        state.spawn(job);
                    }
                }
                state.save_holds(&myself).await;
                if let Err(e) = state.held_keys().await {
                    tracing::warn!(error = %e, "gate 4's gauge not refreshed");
                }
            }
            ReverseEtlMsg::SaveHolds => {
                state.save_scheduled = false;
                state.save_holds(&myself).await;
            }
            ReverseEtlMsg::Confirm { activation, reply } => {
                state.save_holds(&myself).await;
                let configured = state.activations.iter().any(|a| a.name == activation);
                let released = async {
                    if state.unsaved.0.lock().contains_key(&activation) {
                        return Err("the held batch is not stored yet; try again shortly".to_string());
                    }
                    let store = state.shared.store.as_ref();
                    let listed = held_parts(store, HELD_INDEX, &activation).await.map_err(|e| e.to_string())?;
                    let held = listed.iter().any(|(_, doc)| !index_keys(doc).is_empty());
                    if held && !configured {
                        return Err(format!("activation {activation} is not configured on this replica"));
                    }
                    let _writing = HELD_WRITES.lock().await;
                    let jobs = state.held_jobs(&activation).await.map_err(|e| e.to_string())?;
                    if !held && jobs.is_empty() {
                        return Ok(None);
                    }
                    // Taken out before the jobs go: a confirmation repeated here finds nothing.
                    write_held(store, &activation, &[], &[]).await.map_err(|e| e.to_string())?;
                    if jobs.is_empty() {
                        // Listed, but its parts never got stored: nothing to send, and the size
                        // Gate 4 compares against stays the last one sent.
                        return Ok(None);
                    }
                    let size = json!({ "size": jobs.len() });
                    store
                        .put_documents(RUNS, vec![(activation.clone(), Some(size))])
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(Some(jobs))
                }
                .await;
                let answer = match released {
                    Ok(Some(jobs)) => {
                        jobs.into_iter().for_each(|job| state.spawn(job));
                        Ok(true)
                    }
                    Ok(None) => Ok(false),
                    Err(e) => Err(e),
                };
                if let Err(e) = state.held_keys().await {
                    tracing::warn!(error = %e, "gate 4's gauge not refreshed");
                }
                let _ = reply.send(answer);
            }
            ReverseEtlMsg::Retry { destination, reply } => {
                let mut count = 0;
                for (key, doc) in all_documents(state.shared.store.as_ref(), FAILED, "").await? {
                    let dest = doc.get("destination").and_then(Value::as_str).unwrap_or_default();
                    if destination.as_deref().is_some_and(|d| d != dest) {
                        continue;
                    }
                    let name = doc.get("activation").and_then(Value::as_str).unwrap_or_default();
                    let activation = state.activations.iter().find(|a| a.name == name).cloned();
                    let change: Option<SegmentChanged> =
                        doc.get("change").cloned().and_then(|c| serde_json::from_value(c).ok());
                    let profile: Option<ActivationProfile> =
                        doc.get("profile").cloned().and_then(|p| serde_json::from_value(p).ok());
                    let (Some(activation), Some(mut change), Some(profile), Some(d)) =
                        (activation, change, profile, Destination::parse(dest))
                    else {
                        tracing::warn!(job = %key, "failed activation no longer configured; left as it is");
                        continue;
                    };
                    change.profile = Arc::new(profile);
                    state.shared.store.put_documents(FAILED, vec![(key.clone(), None)]).await?;
                    state.spawn(Job { key, activation, destination: d, change });
                    count += 1;
                }
                let _ = reply.send(count);
            }
            ReverseEtlMsg::CatchUp => match state.catch_up().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(jobs = n, "reverse ETL caught up with memberships no destination had seen"),
                Err(e) => tracing::warn!(error = %e, "reverse ETL catch-up failed; memberships stay as they are"),
            },
            ReverseEtlMsg::Respawn { destination } => {
                if let Some(d) = Destination::parse(&destination) {
                    if state.destinations.get(&d).is_some_and(|c| c.actor.is_none()) {
                        state.start_destination(&myself, d).await?;
                    }
                }
            }
            ReverseEtlMsg::Status(reply) => {
                let mut status = state.status();
                // Unreadable store: the destinations' figures still answer, without the holds.
                let held = match state.held_keys().await {
                    Ok(held) => json!(held.iter().map(|(a, keys)| (a.clone(), keys.len())).collect::<BTreeMap<_, _>>()),
                    Err(e) => json!({ "error": format!("storage unavailable: {e}") }),
                };
                status["held_for_confirmation"] = held;
                let _ = reply.send(status);
            }
            ReverseEtlMsg::Drain(reply) => {
                let lanes: Vec<Arc<Lane>> = state.destinations.values().map(|c| c.lane.clone()).collect();
                let busy = state.busy();
                tokio::spawn(async move {
                    let mut busy = busy;
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                    while busy && tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        busy = lanes.iter().any(|l| l.busy());
                    }
                    let _ = reply.send(());
                });
            }
        }
        Ok(())
    }
}

/// The profile id of a failed job (for tests and tooling).
pub fn failed_profile(doc: &Value) -> Option<ProfileId> {
    doc.pointer("/change/profile_id").and_then(Value::as_str).and_then(ProfileId::parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_job(activation: &str, n: usize) -> HeldJob {
        let change = SegmentChanged {
            profile_id: ProfileId::parse(&format!("prof_{n:024x}")).unwrap(),
            segment: "quiz".into(),
            change: Change::Entered,
            at: Utc::now(),
            profile: Arc::default(),
            caused_at: None,
            trace: None,
        };
        HeldJob { key: job_key(activation, &change), change, profile: ActivationProfile::default() }
    }

    #[test]
    fn a_newer_held_run_adds_to_the_older_one() {
        let keys = |jobs: &[HeldJob]| jobs.iter().map(|j| j.key.clone()).collect::<Vec<_>>();
        let older: Vec<HeldJob> = (0..3).map(|n| held_job("a", n)).collect();
        let newer: Vec<HeldJob> = (2..5).map(|n| held_job("a", n)).collect();
        let want = [keys(&older[..2]), keys(&newer)].concat();
        assert_eq!(keys(&add_to_hold(older, newer)), want, "all five, the shared one once");
    }

    /// Parts are cut by count, a smaller hold leaves no stale part behind, an activation named
    /// like another's prefix keeps its own hold, and an erasure empties the index with the parts.
    #[tokio::test]
    async fn held_batches_are_parted_replaced_kept_apart_and_erased() {
        let store: Arc<dyn OperationalStore> = cohort_adapters::EmbeddedStore::in_memory().unwrap();
        let store = store.as_ref();
        let many: Vec<HeldJob> = (0..1_200).map(|n| held_job("a", n)).collect();
        write_held(store, "a", &many, &[]).await.unwrap();
        write_held(store, "a/b", &[held_job("a/b", 5_000)], &[]).await.unwrap();
        assert_eq!(held_parts(store, HELD, "a").await.unwrap().len(), 3, "500 jobs a part");
        assert_eq!(held_index(store).await.unwrap()["a"].len(), 1_200);
        write_held(store, "a", &many[..10], &[]).await.unwrap();
        assert_eq!(held_parts(store, HELD, "a").await.unwrap().len(), 1, "stale parts removed");
        assert_eq!(held_parts(store, HELD, "a/b").await.unwrap().len(), 1, "another activation's hold is kept");

        let target = |n: usize| cohort_messages::ErasureTarget {
            profiles: vec![ProfileId::parse(&format!("prof_{n:024x}")).unwrap()],
            identifiers: Vec::new(),
            contact_emails: Vec::new(),
        };
        assert_eq!(erase_held(store, &target(3), true).await.unwrap(), 1, "counted");
        assert_eq!(held_index(store).await.unwrap()["a"].len(), 10, "a dry run changes nothing");
        assert_eq!(erase_held(store, &target(3), false).await.unwrap(), 1);
        let index = held_index(store).await.unwrap();
        assert_eq!(index["a"].len(), 9);
        let parts = held_parts(store, HELD, "a").await.unwrap();
        assert!(!parts[0].1.to_string().contains(&format!("prof_{:024x}", 3)), "the snapshot is gone too");
        assert_eq!(erase_held(store, &target(5_000), false).await.unwrap(), 1);
        assert!(!held_index(store).await.unwrap().contains_key("a/b"), "an emptied hold is released");
        assert!(held_parts(store, HELD, "a/b").await.unwrap().is_empty());
        assert!(held_parts(store, HELD_INDEX, "a/b").await.unwrap().is_empty());

        // A key listed without a stored job (a write cut short) stays held through a rewrite.
        write_held(store, "d", &[held_job("d", 6_000), held_job("d", 6_001)], &["d:cut-short".into()]).await.unwrap();
        assert_eq!(erase_held(store, &target(6_000), false).await.unwrap(), 1);
        let listed = held_index(store).await.unwrap().remove("d").unwrap_or_default();
        assert_eq!(listed.len(), 2, "{listed:?}");
        assert!(listed.contains(&"d:cut-short".to_string()), "{listed:?}");
        assert!(listed.iter().any(|k| k.contains(&format!("prof_{:024x}", 6_001))), "{listed:?}");

        // A damaged part is skipped, not an error that stops every later hold and erasure.
        let bad = vec![("c/000000".to_string(), Some(json!({ "jobs": "not a list" })))];
        store.put_documents(HELD, bad).await.unwrap();
        assert!(held_jobs_of(store, "c").await.unwrap().is_empty());
        assert_eq!(erase_held(store, &target(1), false).await.unwrap(), 1, "the readable holds are still erased");
    }

    /// Three processes on one store (replicas, or one process before and after a restart)
    /// reserve from the same daily quota: together they never pass the limit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn processes_sharing_a_store_never_pass_the_daily_limit_together() {
        let store: Arc<dyn OperationalStore> = cohort_adapters::EmbeddedStore::in_memory().unwrap();
        let config = DestinationConfig { url: "http://127.0.0.1:9".into(), daily_limit: 7, ..Default::default() };
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let lane = Lane::new(Destination::Salesforce, config.clone(), Duration::from_secs(1)).unwrap();
                let store = store.clone();
                tokio::spawn(async move {
                    let mut taken = 0;
                    while lane.take_quota(store.as_ref()).await.is_ok() {
                        taken += 1;
                    }
                    taken
                })
            })
            .collect();
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        assert_eq!(total, 7);
        let record = store.load_saga(&format!("quota:salesforce:{}", Utc::now().date_naive())).await.unwrap().unwrap();
        assert_eq!((record.kind.as_str(), record.state["used"].as_u64()), (QUOTA_RECORD, Some(7)));
        // A later process finds the day used up at once.
        let late = Lane::new(Destination::Salesforce, config, Duration::from_secs(1)).unwrap();
        assert!(matches!(late.take_quota(store.as_ref()).await, Err(JobError::Quota(7))));
    }

    /// Blocks: a process reserves 1% of the limit (at most 50) at a time, and what it holds
    /// unused is not the others' to take.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_quota_is_reserved_in_blocks_that_bind_the_other_processes() {
        let store: Arc<dyn OperationalStore> = cohort_adapters::EmbeddedStore::in_memory().unwrap();
        let config = DestinationConfig { url: "http://127.0.0.1:9".into(), daily_limit: 5000, ..Default::default() };
        let first = Lane::new(Destination::Salesforce, config.clone(), Duration::from_secs(1)).unwrap();
        first.take_quota(store.as_ref()).await.unwrap();
        let second = Lane::new(Destination::Salesforce, config, Duration::from_secs(1)).unwrap();
        let mut taken = 0;
        while second.take_quota(store.as_ref()).await.is_ok() {
            taken += 1;
        }
        assert_eq!(taken, 4950, "the first process holds a block of 50");
        for _ in 0..49 {
            first.take_quota(store.as_ref()).await.unwrap();
        }
        assert!(matches!(first.take_quota(store.as_ref()).await, Err(JobError::Quota(5000))));
    }

    #[test]
    fn personal_data_is_recognized_in_free_text() {
        assert!(looks_personal("write to max.muster@gmail.com"));
        assert!(looks_personal("+49 151 2345 6789"));
        assert!(looks_personal("call 0151-23456789 today"));
        assert!(!looks_personal("MBA follow-up, engagement 72.5"));
        assert!(!looks_personal("since 2026-11-27T10:00:00Z"));
        assert!(!looks_personal("@handle"));
    }
}
