//! Cluster membership: every replica writes a heartbeat record to the shared store, so peers
//! (and operators, through `GET /v1/cluster`) know who is alive, where to reach them and which
//! bus partitions they consume. A replica that stops removes its record; one that dies stops
//! beating and is considered gone after `cluster.member_ttl_secs`.

use chrono::{DateTime, Utc};
use cohort_adapters::{all_documents, EventBus, OperationalStore, StoreError};
use cohort_messages::cluster::{MemberRecord, MembershipMsg, MEMBERS};
use cohort_supervisors::{HealthRegistry, Metrics};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::schedule::Schedule;

/// How this replica takes part in the membership.
#[derive(Debug, Clone)]
pub struct MembershipSettings {
    pub name: String,
    pub advertise_url: String,
    pub heartbeat: Duration,
    /// A member whose last heartbeat is older than this is gone.
    pub ttl: Duration,
    /// How long a consumer-group partition may be held by no live member before the first live
    /// member (by name) rejoins the groups to force a rebalance. A broker rebalances when a
    /// member's session expires; some (Tansu) do not, and the partition would stay unconsumed.
    pub rejoin_after: Duration,
}

impl MembershipSettings {
    pub fn ttl(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.ttl).unwrap_or(chrono::Duration::MAX)
    }
}

pub struct MembershipActor;

/// How often a replica checks whether its partitions changed, to list the change at once.
const WATCH_EVERY: Duration = Duration::from_millis(100);

pub struct MembershipArgs {
    pub store: Arc<dyn OperationalStore>,
    pub bus: Arc<dyn EventBus>,
    pub health: HealthRegistry,
    pub metrics: Metrics,
    pub settings: MembershipSettings,
    /// The profile partitions this replica owns and is taking over, for its record.
    pub ownership: Option<Arc<cohort_adapters::cluster::Ownership>>,
}

pub struct MembershipState {
    args: MembershipArgs,
    started_at: DateTime<Utc>,
    /// Since when each group partition without a live member has had none (short gaps on
    /// different partitions during ordinary rebalances do not add up), and the last rejoin.
    orphaned_since: HashMap<String, std::time::Instant>,
    last_rejoin: Option<std::time::Instant>,
    /// Rejoins since partitions were last all held: each waits twice as long as the one before.
    rejoins_in_a_row: u32,
    /// The partitions the last record written listed.
    listed: Vec<String>,
    _timer: Schedule,
    _watch: Schedule,
}

impl MembershipState {
    fn record(&self) -> MemberRecord {
        let a = &self.args;
        let failing = a
            .health
            .snapshot()
            .into_iter()
            .filter(|c| c.status != cohort_supervisors::ChildStatus::Running)
            .map(|c| c.path)
            .collect();
        MemberRecord {
            name: a.settings.name.clone(),
            advertise_url: a.settings.advertise_url.clone(),
            started_at: self.started_at,
            heartbeat_at: Utc::now(),
            partitions: a.bus.assignment(),
            ready: a.health.is_ready(),
            failing,
            arriving: a.ownership.as_ref().map(|o| o.arriving()).unwrap_or_default(),
        }
    }

    async fn beat(&mut self) -> Result<(), StoreError> {
        let record = self.record();
        let value = serde_json::to_value(&record).map_err(|e| StoreError::invalid(e.to_string()))?;
        self.args.store.put_documents(MEMBERS, vec![(record.name, Some(value))]).await?;
        self.listed = record.partitions;
        Ok(())
    }

    /// Finds group partitions no live member has held for `rejoin_after` and, on the first live
    /// member only (one rebalance, not one per replica), rejoins the groups that own them.
    async fn repair_orphans(&mut self) -> Result<(), StoreError> {
        let expected = self.args.bus.group_partitions();
        if expected.is_empty() || self.args.settings.rejoin_after.is_zero() {
            return Ok(());
        }
        let listed = members(self.args.store.as_ref(), Utc::now(), self.args.settings.ttl()).await?;
        let live: Vec<&MemberRecord> = listed.iter().filter(|(_, alive)| *alive).map(|(m, _)| m).collect();
        let held: std::collections::HashSet<&String> = live.iter().flat_map(|m| &m.partitions).collect();
        let orphaned: Vec<String> = expected.into_iter().filter(|p| !held.contains(p)).collect();
        if orphaned.is_empty() {
            self.orphaned_since.clear();
            self.rejoins_in_a_row = 0;
            return Ok(());
        }
        let now = std::time::Instant::now();
        self.orphaned_since.retain(|p, _| orphaned.contains(p));
        for p in &orphaned {
            self.orphaned_since.entry(p.clone()).or_insert(now);
        }
        let since = self.orphaned_since.values().min().copied().unwrap_or(now);
        let after = self.args.settings.rejoin_after;
        let first = live.iter().map(|m| &m.name).min() == Some(&self.args.settings.name);
        let cooldown = after.saturating_mul(1 << self.rejoins_in_a_row.min(5));
        let cooled = self.last_rejoin.is_none_or(|t| now.duration_since(t) >= cooldown);
        if now.duration_since(since) < after || !first || !cooled {
            return Ok(());
        }
        tracing::warn!(partitions = ?orphaned, waited_secs = now.duration_since(since).as_secs(),
            "consumer-group partitions have had no live member; rejoining the groups to force a rebalance");
        self.last_rejoin = Some(now);
        self.orphaned_since.clear();
        self.rejoins_in_a_row += 1;
        // Rejoining waits for the revocation (seconds): off this actor, so heartbeats go on.
        let (bus, metrics) = (self.args.bus.clone(), self.args.metrics.clone());
        tokio::spawn(async move {
            let outcome = bus.rejoin(&orphaned).await;
            let label = if outcome.is_ok() { "ok" } else { "failed" };
            metrics.cluster_rejoins.with_label_values(&[label]).inc();
            if let Err(e) = outcome {
                tracing::warn!(error = %e, "rejoining the consumer groups failed; the next heartbeat may try again");
            }
        });
        Ok(())
    }
}

impl Actor for MembershipActor {
    type Msg = MembershipMsg;
    type State = MembershipState;
    type Arguments = MembershipArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<MembershipMsg>,
        args: MembershipArgs,
    ) -> Result<MembershipState, ActorProcessingErr> {
        let timer = Schedule::every(&myself, args.settings.heartbeat, || MembershipMsg::Beat);
        let watch = Schedule::every(&myself, WATCH_EVERY.min(args.settings.heartbeat), || MembershipMsg::Watch);
        Ok(MembershipState {
            args,
            started_at: Utc::now(),
            orphaned_since: HashMap::new(),
            last_rejoin: None,
            rejoins_in_a_row: 0,
            listed: Vec::new(),
            _timer: timer,
            _watch: watch,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<MembershipMsg>,
        _state: &mut MembershipState,
    ) -> Result<(), ActorProcessingErr> {
        // Known at once, not one interval later.
        myself.send_message(MembershipMsg::Beat)?;
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<MembershipMsg>,
        msg: MembershipMsg,
        state: &mut MembershipState,
    ) -> Result<(), ActorProcessingErr> {
        if matches!(msg, MembershipMsg::Watch) && state.args.bus.assignment() == state.listed {
            return Ok(());
        }
        match state.beat().await {
            Ok(()) => state.args.metrics.cluster_heartbeats.with_label_values(&["ok"]).inc(),
            Err(e) => {
                state.args.metrics.cluster_heartbeats.with_label_values(&["failed"]).inc();
                tracing::warn!(error = %e, "cluster heartbeat failed; peers see this replica go stale");
            }
        }
        if matches!(msg, MembershipMsg::Watch) {
            return Ok(());
        }
        if let Err(e) = state.repair_orphans().await {
            tracing::warn!(error = %e, "orphaned partitions not repaired; the next heartbeat retries");
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<MembershipMsg>,
        state: &mut MembershipState,
    ) -> Result<(), ActorProcessingErr> {
        // Leaving: peers stop counting on this replica at once instead of after the TTL.
        let name = state.args.settings.name.clone();
        let leave = state.args.store.put_documents(MEMBERS, vec![(name, None)]);
        if !matches!(tokio::time::timeout(Duration::from_secs(5), leave).await, Ok(Ok(()))) {
            tracing::warn!("could not remove this replica's membership record; it expires with its TTL");
        }
        Ok(())
    }
}

/// Every member record in the store, with whether it is alive at `now`, by name.
pub async fn members(
    store: &dyn OperationalStore,
    now: DateTime<Utc>,
    ttl: chrono::Duration,
) -> Result<Vec<(MemberRecord, bool)>, StoreError> {
    let mut out = Vec::new();
    for (key, value) in all_documents(store, MEMBERS, "").await? {
        match serde_json::from_value::<MemberRecord>(value) {
            Ok(m) => {
                let alive = m.is_alive(now, ttl);
                out.push((m, alive));
            }
            Err(e) => tracing::warn!(member = %key, error = %e, "unreadable membership record skipped"),
        }
    }
    Ok(out)
}

/// Whether timed once-only work is this replica's: always outside cluster mode (`me` is
/// `None`), else when it is the first live member by name, and when the membership cannot be
/// read (`what` names the work for the log: a duplicate run is harmless, a missing one is not).
pub async fn leads(store: &dyn OperationalStore, me: Option<&MembershipSettings>, what: &str) -> bool {
    let Some(me) = me else { return true };
    match members(store, Utc::now(), me.ttl()).await {
        Ok(listed) => listed.iter().filter(|(_, alive)| *alive).map(|(m, _)| &m.name).min() == Some(&me.name),
        Err(e) => {
            tracing::debug!(error = %e, work = what, "membership unreadable; running anyway");
            true
        }
    }
}

/// Whether the named replica is alive: its record exists and its heartbeat is recent.
pub async fn is_alive(
    store: &dyn OperationalStore,
    name: &str,
    now: DateTime<Utc>,
    ttl: chrono::Duration,
) -> Result<bool, StoreError> {
    let doc = store.get_documents(MEMBERS, &[name.to_string()]).await?.into_iter().next().flatten();
    Ok(doc.and_then(|d| serde_json::from_value::<MemberRecord>(d).ok()).is_some_and(|m| m.is_alive(now, ttl)))
}

// ---------------------------------------------------------------------------------------------
// Cluster mode's pipeline: the resolver stage hands its changes to a ProfileRouter, which
// produces them to `cdp.processed.events`; the profile stage reads the partitions this replica
// owns with a RoutedDispatcher and feeds the ProfilesDirectory.

use crate::context::PipelineContext;
use crate::dispatcher::{claim_fresh, dead_letter_undecodable, until_available};
use crate::identity::{identity_events, MergeRefused};
use cohort_adapters::kafka::processed_partition;
use cohort_adapters::{FlushBatch, RoutedSubscription, WarehouseBatch};
use cohort_messages::cluster::{RoutedChange, RoutedKind};
use cohort_messages::msgs::MergeReason;
use cohort_messages::msgs::{FlushReport, ProfileMsg, ProfilesMsg, ProfilesStats};
use cohort_messages::DeadLetterStage;
use cohort_messages::{Identifier, ProfileId};
use cohort_supervisors::Slot;

/// The resolver stage's end in cluster mode: takes the directory's place for the resolvers.
pub struct ProfileRouter;

pub struct ProfileRouterArgs {
    /// The resolver stage's context (its watermark covers the raw topics).
    pub ctx: PipelineContext,
}

pub struct ProfileRouterState {
    ctx: PipelineContext,
    _timer: Schedule,
}

impl ProfileRouterState {
    /// Produces the changes resolved so far, stores the identity claims and merges they rest
    /// on (and the Bronze rows staged with them), and only then commits the raw offsets.
    async fn flush(&mut self) -> Result<FlushReport, StoreError> {
        let ctx = &self.ctx;
        let lows = ctx.watermark.lows();
        if ctx.outbound.is_none() {
            return Ok(FlushReport::default());
        }
        // Claims first: an identifier another replica stored first stays with its profile, and
        // the profile this replica created for it merges with that one (before the raw offsets
        // of the events behind it are committed).
        let (claims, earlier_merges) = ctx.index.take_pending();
        let kept = match self.settle_claims(&claims).await {
            Ok(kept) => kept,
            Err(e) => {
                ctx.index.restore_pending(claims, earlier_merges);
                return Err(e);
            }
        };
        let (later, merges_now) = ctx.index.take_pending();
        ctx.index.restore_pending(later, Vec::new());
        let merges: Vec<_> = earlier_merges.into_iter().chain(merges_now).collect();
        let changes = ctx.take_outbound();
        if let Err(e) = ctx.bus.publish_routed(&changes).await {
            ctx.requeue_outbound(changes);
            return Err(e);
        }
        let identities = kept;
        let bronze = std::mem::take(&mut *ctx.staged_bronze.lock());
        let n_identities = identities.len();
        if !identities.is_empty() || !merges.is_empty() || !bronze.is_empty() {
            let batch = FlushBatch {
                identities: identities.clone(),
                profiles: Vec::new(),
                merges: merges.clone(),
                checkpoint: None,
                event_ids: Vec::new(),
                outbox: WarehouseBatch { bronze: bronze.clone(), ..WarehouseBatch::default() },
            };
            if let Err(e) = ctx.store.commit_flush(batch).await {
                ctx.index.restore_pending(identities, merges);
                ctx.staged_bronze.lock().extend(bronze);
                return Err(e);
            }
            ctx.index.publish_identity_events(ctx.bus.as_ref(), identity_events(&merges, &[])).await;
        }
        // The ids were claimed for deduplication at this stage; the profile stage keeps its own.
        let _ = ctx.pending_ids.take_covered(&lows);
        match ctx.bus.commit(&lows).await {
            Ok(()) => ctx.checkpoints.advance(&lows),
            Err(e) => tracing::warn!(error = %e, "raw offsets not committed; the next flush retries"),
        }
        Ok(FlushReport { profiles: changes.len(), identities: n_identities, checkpoint: 0 })
    }
}

impl ProfileRouterState {
    /// Claims the identifiers in the store; returns the entries still to write as given (those
    /// that re-point an identifier on purpose). A claim lost to another replica's profile merges
    /// the two, the older surviving, through their partitions.
    async fn settle_claims(
        &self,
        claims: &[(Identifier, ProfileId)],
    ) -> Result<Vec<(Identifier, ProfileId)>, StoreError> {
        let ctx = &self.ctx;
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let owners = ctx.store.claim_identities(claims).await?;
        let mut rewrite = Vec::new();
        for ((identifier, ours), owner) in claims.iter().zip(owners) {
            if &owner == ours {
                continue;
            }
            if ctx.index.root(&owner).await? == ctx.index.root(ours).await? {
                // Already one person (a merge re-pointed it): keep the newer entry.
                rewrite.push((identifier.clone(), ours.clone()));
                continue;
            }
            match ctx.index.merge_pair(&owner, ours, MergeReason::SharedIdentifier).await {
                Ok(Some(merge)) => {
                    ctx.metrics.cluster_claims_lost.with_label_values(&["merged"]).inc();
                    tracing::info!(survivor = %merge.survivor, merged = %merge.merged, kind = %identifier.kind, "two replicas created one student; merged");
                    if let Some(outbound) = &ctx.outbound {
                        let mut out = outbound.lock();
                        out.push(RoutedChange {
                            profile_id: merge.survivor.clone(),
                            change: RoutedKind::BeginMerge { merged: merge.merged.clone() },
                        });
                        out.push(RoutedChange {
                            profile_id: merge.merged.clone(),
                            change: RoutedKind::MergeInto { survivor: merge.survivor.clone() },
                        });
                    }
                }
                Ok(None) => {}
                // An unmerge declared them two students: the identifier goes where it was put.
                Err(MergeRefused::KeptApart) => rewrite.push((identifier.clone(), ours.clone())),
                Err(e) => {
                    ctx.metrics.cluster_claims_lost.with_label_values(&["kept"]).inc();
                    tracing::warn!(kind = %identifier.kind, error = %e, "identifier stays with the profile that stored it first");
                }
            }
        }
        Ok(rewrite)
    }
}

impl Actor for ProfileRouter {
    type Msg = ProfilesMsg;
    type State = ProfileRouterState;
    type Arguments = ProfileRouterArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ProfilesMsg>,
        args: ProfileRouterArgs,
    ) -> Result<ProfileRouterState, ActorProcessingErr> {
        let every = args.ctx.profiles.flush_interval;
        let timer = Schedule::every(&myself, every, || ProfilesMsg::Flush { reply: None });
        Ok(ProfileRouterState { ctx: args.ctx, _timer: timer })
    }

    async fn handle(
        &self,
        _myself: ActorRef<ProfilesMsg>,
        msg: ProfilesMsg,
        state: &mut ProfileRouterState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ProfilesMsg::Deliver { profile_id, msg } => {
                let seq = match &msg {
                    ProfileMsg::Apply { seq, .. } => Some(*seq),
                    _ => None,
                };
                match (RoutedChange::of(&profile_id, &msg), &state.ctx.outbound) {
                    (Some(change), Some(outbound)) => outbound.lock().push(change),
                    _ => {
                        tracing::warn!(profile_id = %profile_id, "a message the resolver stage cannot route was dropped")
                    }
                }
                // In the buffer the next flush produces before it commits: covered.
                if let Some(seq) = seq {
                    state.ctx.watermark.delivered(seq);
                }
            }
            ProfilesMsg::Flush { reply } => {
                let result = state.flush().await;
                if let Err(e) = &result {
                    state.ctx.metrics.flush_failures.inc();
                    tracing::warn!(error = %e, "resolver-stage flush failed, will retry");
                }
                if let Some(reply) = reply {
                    let _ = reply.send(result.map_err(|e| e.to_string()));
                }
            }
            ProfilesMsg::GetStats(reply) => {
                let _ = reply.send(ProfilesStats::default());
            }
            ProfilesMsg::Erase { reply, .. } => {
                let _ = reply.send(0);
            }
            _ => {}
        }
        Ok(())
    }
}

/// Which of these arriving partitions of `cdp.processed.events` no other live member lists any
/// more: their previous holder has seen its revocation, so its last flush has landed and a
/// profile loaded now includes it. A holder that still lists one `rejoin_after` after it began
/// arriving is stuck and the group has moved on without it; it is taken over then, with a
/// warning. One read of the membership records; none on a store error.
async fn handed_over(
    store: &dyn OperationalStore,
    settings: &MembershipSettings,
    arriving: &HashMap<i32, std::time::Instant>,
) -> Vec<i32> {
    let listed = match members(store, Utc::now(), settings.ttl()).await {
        Ok(listed) => listed,
        Err(e) => {
            tracing::warn!(error = %e, "membership unreadable; partitions handed over wait");
            return Vec::new();
        }
    };
    let patience = settings.rejoin_after.max(2 * settings.ttl);
    let mut free = Vec::new();
    for (partition, since) in arriving {
        let holders: Vec<&str> = listed
            .iter()
            .filter(|(m, alive)| *alive && m.name != settings.name)
            .filter(|(m, _)| m.processed_partitions().any(|p| p == *partition))
            .map(|(m, _)| m.name.as_str())
            .collect();
        let waited_ms = since.elapsed().as_millis() as u64;
        if holders.is_empty() {
            tracing::info!(partition, waited_ms, "processed-event partition handed over");
            free.push(*partition);
        } else if since.elapsed() >= patience {
            tracing::warn!(partition, ?holders, waited_ms, "previous holders still list the partition; taking it over");
            free.push(*partition);
        }
    }
    free.sort_unstable();
    free
}

/// The profile stage's reader in cluster mode: the partitions of `cdp.processed.events` this
/// replica owns, into the ProfilesDirectory.
pub struct RoutedDispatcher;

pub struct RoutedDispatcherArgs {
    /// The profile stage's context (its watermark covers `cdp.processed.events`).
    pub ctx: PipelineContext,
    /// This replica's name and the membership timings, to see partitions handed over.
    pub membership: MembershipSettings,
    pub directory: Slot<ProfilesMsg>,
    pub batch: usize,
    pub max_in_flight: usize,
}

pub struct RoutedDispatcherState {
    args: RoutedDispatcherArgs,
    subscription: Box<dyn RoutedSubscription>,
    /// The partitions owned when erasures were last read from the store.
    erasures_for: Vec<i32>,
    /// Partitions arriving, and what was read from them meanwhile.
    arrivals: Arrivals,
}

/// The bookkeeping of partitions arriving here: records read from them, in the order read, held
/// back until they have arrived; since when each has been arriving; when the membership records
/// were last read for them.
#[derive(Default)]
struct Arrivals {
    held: Vec<(u64, RoutedChange)>,
    since: HashMap<i32, std::time::Instant>,
    checked: Option<std::time::Instant>,
}

impl Arrivals {
    /// Notes the partitions arriving now and keeps back their records; returns the others.
    /// Records held for a partition revoked before it arrived are dropped: its next owner reads
    /// them again from the committed offset.
    fn hold(&mut self, arriving: &[i32], changes: Vec<(u64, RoutedChange)>) -> Vec<(u64, RoutedChange)> {
        self.since.retain(|p, _| arriving.contains(p));
        for p in arriving {
            self.since.entry(*p).or_insert_with(std::time::Instant::now);
        }
        self.held.retain(|(seq, _)| arriving.contains(&partition(*seq)));
        let (wait, ready): (Vec<_>, Vec<_>) =
            changes.into_iter().partition(|(seq, _)| arriving.contains(&partition(*seq)));
        self.held.extend(wait);
        ready
    }

    /// Whether the membership records are due to be read again for the partitions arriving.
    fn due(&mut self) -> bool {
        let due = !self.since.is_empty() && self.checked.is_none_or(|t| t.elapsed() >= HANDOVER_CHECK_EVERY);
        if due {
            self.checked = Some(std::time::Instant::now());
        }
        due
    }

    /// The records held for these partitions, now arrived, in the order read.
    fn release(&mut self, arrived: &[i32]) -> Vec<(u64, RoutedChange)> {
        let (now, still) =
            std::mem::take(&mut self.held).into_iter().partition(|(seq, _)| arrived.contains(&partition(*seq)));
        self.held = still;
        now
    }
}

/// The partition of `cdp.processed.events` a position was read from (-1 for other topics).
fn partition(seq: u64) -> i32 {
    processed_partition(seq).unwrap_or(-1)
}

impl RoutedDispatcherState {
    /// Keeps back what was read from partitions still arriving, and returns it ahead of `changes`
    /// once they have arrived. It does not wait: polling goes on meanwhile, so this replica
    /// still sees its own revocations (a waiting replica that did not could hold up another
    /// waiting for it).
    async fn hand_over(
        &mut self,
        changes: Vec<(u64, RoutedChange)>,
    ) -> Result<Vec<(u64, RoutedChange)>, ActorProcessingErr> {
        let Some(ownership) = self.args.ctx.ownership.clone() else { return Ok(changes) };
        let mut ready = self.arrivals.hold(&ownership.arriving(), changes);
        if !self.arrivals.due() {
            return Ok(ready);
        }
        let free = handed_over(self.args.ctx.store.as_ref(), &self.args.membership, &self.arrivals.since).await;
        if free.is_empty() {
            return Ok(ready);
        }
        // The directory drops what it holds of them and owns them, before any of their records.
        let directory = self.args.directory.get().ok_or("profile directory is not running")?;
        let partitions = free.clone();
        // Waits for a flush in flight to end (at most its snapshots' and write's time-outs).
        ractor::call_t!(directory, |reply| ProfilesMsg::PartitionsArrived { partitions, reply }, 120_000)?;
        let mut out = self.arrivals.release(&free);
        out.append(&mut ready);
        Ok(out)
    }
}

/// How often the membership records are read while partitions are arriving.
const HANDOVER_CHECK_EVERY: Duration = Duration::from_millis(50);

#[derive(Debug)]
pub enum RoutedDispatcherMsg {
    Pump,
}

impl Actor for RoutedDispatcher {
    type Msg = RoutedDispatcherMsg;
    type State = RoutedDispatcherState;
    type Arguments = RoutedDispatcherArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RoutedDispatcherMsg>,
        args: RoutedDispatcherArgs,
    ) -> Result<RoutedDispatcherState, ActorProcessingErr> {
        let ownership = args.ctx.ownership.clone().ok_or("the routed dispatcher runs in cluster mode only")?;
        let subscription = args.ctx.bus.subscribe_routed(ownership).await?;
        args.ctx.watermark.reset(&Vec::new());
        args.ctx.pending_ids.reset();
        myself.send_message(RoutedDispatcherMsg::Pump)?;
        Ok(RoutedDispatcherState { args, subscription, erasures_for: Vec::new(), arrivals: Arrivals::default() })
    }

    async fn handle(
        &self,
        myself: ActorRef<RoutedDispatcherMsg>,
        _msg: RoutedDispatcherMsg,
        state: &mut RoutedDispatcherState,
    ) -> Result<(), ActorProcessingErr> {
        let ctx = &state.args.ctx.clone();
        if ctx.watermark.in_flight() >= state.args.max_in_flight {
            tokio::time::sleep(Duration::from_millis(1)).await;
            myself.send_message(RoutedDispatcherMsg::Pump)?;
            return Ok(());
        }
        let polled = match state.subscription.poll(state.args.batch, Duration::from_millis(200)).await {
            Ok(p) => p,
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, "bus unavailable, retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                myself.send_message(RoutedDispatcherMsg::Pump)?;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let what = "processed-events record";
        dead_letter_undecodable(ctx, &polled.undecodable, DeadLetterStage::Profile, what).await;
        let changes = state.hand_over(polled.changes).await?;
        if changes.is_empty() {
            myself.send_message(RoutedDispatcherMsg::Pump)?;
            return Ok(());
        }
        for (seq, _) in &changes {
            ctx.watermark.dispatched(*seq);
        }
        // An event resolved twice (its resolver stage crashed before committing) arrives twice:
        // the applied ids in the store and those claimed since the last flush catch it.
        let ids: Vec<String> = changes
            .iter()
            .filter_map(|(_, c)| match &c.change {
                RoutedKind::Apply { event, forwarded: false } => Some(event.event_id.to_string()),
                _ => None,
            })
            .collect();
        let mut seen = until_available("idempotency keys", || ctx.store.seen_event_ids(&ids)).await?.into_iter();
        // A partition that just came here may carry events for profiles erased elsewhere since
        // this replica last read the erasures: read them again before applying anything.
        let owned = ctx.ownership.as_ref().map(|o| o.owned()).unwrap_or_default();
        if owned != state.erasures_for {
            until_available("erasures", || ctx.erasures.load(ctx.store.as_ref())).await?;
            state.erasures_for = owned;
        }
        let directory = state.args.directory.get().ok_or("profile directory is not running")?;
        for (seq, change) in changes {
            if let RoutedKind::Apply { event, forwarded: false } = &change.change {
                if !claim_fresh(ctx, seq, event, seen.next().unwrap_or(false)) {
                    continue;
                }
            }
            directory.send_message(change.into_directory_msg(seq))?;
        }
        myself.send_message(RoutedDispatcherMsg::Pump)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use cohort_adapters::EmbeddedStore;

    fn settings() -> MembershipSettings {
        MembershipSettings {
            name: "me/1/a".into(),
            advertise_url: "http://me".into(),
            heartbeat: Duration::from_millis(100),
            ttl: Duration::from_secs(2),
            rejoin_after: Duration::from_secs(30),
        }
    }

    async fn list(store: &dyn OperationalStore, name: &str, partitions: &[&str], beat: DateTime<Utc>) {
        let record = MemberRecord {
            name: name.into(),
            advertise_url: format!("http://{name}"),
            started_at: beat,
            heartbeat_at: beat,
            partitions: partitions.iter().map(|p| format!("t.cdp.processed.events/{p}")).collect(),
            ready: true,
            failing: Vec::new(),
            arriving: Vec::new(),
        };
        store.put_documents(MEMBERS, vec![(name.into(), Some(serde_json::to_value(record).unwrap()))]).await.unwrap();
    }

    fn since(partitions: &[i32], ago: Duration) -> HashMap<i32, std::time::Instant> {
        partitions.iter().map(|p| (*p, std::time::Instant::now() - ago)).collect()
    }

    #[tokio::test]
    async fn a_partition_is_taken_over_once_its_previous_holder_no_longer_lists_it() {
        let store: Arc<dyn OperationalStore> = EmbeddedStore::in_memory().unwrap();
        // The previous holder of 1 has not seen its revocation yet; this replica's own record
        // does not count, nor a dead member's.
        list(store.as_ref(), "old/1/b", &["1", "2"], Utc::now()).await;
        list(store.as_ref(), "me/1/a", &["0", "1"], Utc::now()).await;
        list(store.as_ref(), "gone/1/c", &["0"], Utc::now() - chrono::Duration::seconds(10)).await;
        let arriving = since(&[0, 1], Duration::ZERO);
        assert_eq!(handed_over(store.as_ref(), &settings(), &arriving).await, vec![0]);
        list(store.as_ref(), "old/1/b", &["2"], Utc::now()).await;
        assert_eq!(handed_over(store.as_ref(), &settings(), &arriving).await, vec![0, 1]);
    }

    #[test]
    fn records_of_an_arriving_partition_wait_and_come_first_once_it_has_arrived() {
        let at = |p: i32, off: u64| {
            (0..8192).map(|s| cohort_adapters::pack(s, off)).find(|q| processed_partition(*q) == Some(p)).unwrap()
        };
        let change = |n: u32| RoutedChange {
            profile_id: ProfileId::parse(&format!("prof_{n:024x}")).unwrap(),
            change: RoutedKind::Reevaluate,
        };
        let positions = |v: &[(u64, RoutedChange)]| v.iter().map(|(s, _)| *s).collect::<Vec<_>>();
        let mut a = Arrivals::default();
        assert!(!a.due(), "nothing arriving, nothing to read");
        let ready = a.hold(&[1, 2], vec![(at(0, 5), change(1)), (at(1, 7), change(2)), (at(2, 3), change(3))]);
        assert_eq!(positions(&ready), vec![at(0, 5)], "only the owned partition's record goes on");
        assert!(a.due());
        assert!(!a.due(), "read at most every {HANDOVER_CHECK_EVERY:?}");
        // Partition 2 is revoked before it arrives: its held record is its next owner's.
        let ready = a.hold(&[1], vec![(at(1, 8), change(4))]);
        assert!(ready.is_empty());
        assert_eq!(positions(&a.release(&[1])), vec![at(1, 7), at(1, 8)], "in the order read");
        assert!(a.release(&[1, 2]).is_empty());
    }

    #[tokio::test]
    async fn once_only_work_is_the_first_live_members_by_name() {
        let store: Arc<dyn OperationalStore> = EmbeddedStore::in_memory().unwrap();
        let me = settings();
        assert!(leads(store.as_ref(), None, "t").await, "outside cluster mode every replica leads");
        list(store.as_ref(), "me/1/a", &[], Utc::now()).await;
        list(store.as_ref(), "zeta/1/z", &[], Utc::now()).await;
        assert!(leads(store.as_ref(), Some(&me), "t").await);
        list(store.as_ref(), "alpha/1/a", &[], Utc::now() - chrono::Duration::seconds(10)).await;
        assert!(leads(store.as_ref(), Some(&me), "t").await, "a dead member leads nothing");
        list(store.as_ref(), "alpha/1/a", &[], Utc::now()).await;
        assert!(!leads(store.as_ref(), Some(&me), "t").await, "a live member before it by name leads");
    }

    #[tokio::test]
    async fn a_holder_that_never_lets_go_is_passed_over_after_the_groups_moved_on() {
        let store: Arc<dyn OperationalStore> = EmbeddedStore::in_memory().unwrap();
        list(store.as_ref(), "stuck/1/d", &["2"], Utc::now()).await;
        assert!(handed_over(store.as_ref(), &settings(), &since(&[2], Duration::from_secs(29))).await.is_empty());
        assert_eq!(handed_over(store.as_ref(), &settings(), &since(&[2], Duration::from_secs(31))).await, vec![2]);
    }
}
