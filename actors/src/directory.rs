//! The ProfileActor directory: one actor per student, spawned on demand, passivated when idle,
//! restarted from the store after a failure, and persisted write-behind.
//!
//! Every message for a profile passes through here, so the directory knows which state changes
//! a ProfileActor holds only in memory (its *unflushed* queue). A snapshot requested through the
//! same mailbox covers exactly the changes queued before it; after a crash the directory restarts
//! the actor from its persisted record and re-delivers that queue, so nothing applied is lost.

use crate::context::PipelineContext;
use crate::dead_letters;
use crate::identity::{identity_events, Person};
use crate::profile::{ProfileActor, ProfileArgs};
use cohort_adapters::cluster::{Ownership, Tenure};
use cohort_adapters::kafka::processed_partition;
use cohort_adapters::{FlushBatch, GoldProfileRow, SilverRow, WarehouseBatch};
use cohort_messages::msgs::{
    ConsentDecision, FlushReport, MatchCandidate, MatcherMsg, PendingSnapshot, ProfileMsg, ProfileSnapshot,
    ProfilesMsg, ProfilesStats,
};
use cohort_messages::{CustomerEvent, DeadLetterStage, IdentifierKind, ProfileId, ProfileRecord};
use cohort_supervisors::{PipelineStages, RestartDecision, RestartTracker};
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// A state change held in a ProfileActor's memory until the next successful flush.
#[derive(Debug, Clone)]
enum Change {
    Apply {
        seq: u64,
        event: Arc<CustomerEvent>,
    },
    MergeInto {
        survivor: ProfileId,
    },
    BeginMerge {
        merged: ProfileId,
    },
    Absorb {
        record: Box<ProfileRecord>,
    },
    Unmerge {
        merged: ProfileId,
    },
    Restore {
        record: Box<ProfileRecord>,
        from: ProfileId,
    },
    Reevaluate,
    SetConsent {
        decisions: Vec<ConsentDecision>,
        at: chrono::DateTime<chrono::Utc>,
    },
    /// An event the actor kept failing on, now a dead letter. It keeps its place: a flush in
    /// flight drains the changes its snapshots covered by count, as `forwarded_upto` counts.
    DeadLettered,
}

impl Change {
    /// What re-delivers this change to a restarted actor (nothing for a dead letter).
    fn to_msg(&self) -> Option<ProfileMsg> {
        Some(match self {
            Change::Apply { seq, event } => ProfileMsg::Apply { seq: *seq, event: event.clone() },
            Change::MergeInto { survivor } => ProfileMsg::MergeInto { survivor: survivor.clone() },
            Change::BeginMerge { merged } => ProfileMsg::BeginMerge { merged: merged.clone() },
            Change::Absorb { record } => ProfileMsg::Absorb { record: record.clone() },
            // Re-delivered after a restart: the answer went out with the first delivery.
            Change::Unmerge { merged } => ProfileMsg::Unmerge { merged: merged.clone(), reply: None },
            Change::Restore { record, from } => ProfileMsg::Restore { record: record.clone(), from: from.clone() },
            Change::Reevaluate => ProfileMsg::Reevaluate,
            Change::SetConsent { decisions, at } => {
                ProfileMsg::SetConsent { decisions: decisions.clone(), at: *at, reply: None }
            }
            Change::DeadLettered => return None,
        })
    }
}

/// Whether a delivery is an event's first arrival at the directory or a merged profile sending
/// it on to its survivor: only the first is a pipeline stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    First,
    Forwarded,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Live,
    Passivating,
    Restarting,
}

struct Entry {
    actor: Option<ActorRef<ProfileMsg>>,
    status: Status,
    last_used: Instant,
    unflushed: VecDeque<Change>,
    /// When the last flush took this profile's snapshot: a timed flush defers a profile it
    /// snapshotted less than `snapshot_min_interval` ago (see [`defers`]).
    snapshot_at: Option<Instant>,
    /// Queries that arrived while the actor was passivating or restarting.
    waiting: Vec<ProfileMsg>,
    in_progress: Arc<AtomicU64>,
    tracker: RestartTracker,
    attempts: HashMap<u64, u32>,
    /// The flush in flight took a snapshot of this profile: (flush, round, changes covered).
    taken: Option<(u64, u32, usize)>,
    /// One replica: how many queued changes, from the front, reach the last change another
    /// profile sent on to this one (0: none queued; see `take_snapshots`).
    forwarded_upto: usize,
    /// Cluster mode: started for a read while another replica owned the profile, so it may hold
    /// a state from before that owner's last flush; never kept once this replica owns it.
    unowned: bool,
}

impl Entry {
    fn new() -> Self {
        Self {
            actor: None,
            status: Status::Live,
            last_used: Instant::now(),
            unflushed: VecDeque::new(),
            snapshot_at: None,
            waiting: Vec::new(),
            in_progress: Arc::new(AtomicU64::new(0)),
            tracker: RestartTracker::default(),
            attempts: HashMap::new(),
            taken: None,
            forwarded_upto: 0,
            unowned: false,
        }
    }
}

pub struct ProfilesDirectory;

pub struct ProfilesArgs {
    pub ctx: PipelineContext,
}

pub struct ProfilesState {
    ctx: PipelineContext,
    entries: HashMap<ProfileId, Entry>,
    by_actor: HashMap<ActorId, ProfileId>,
    flushing: bool,
    /// The flush in flight (counting from 1) and its round of snapshots.
    flush_number: u64,
    flush_round: u32,
    /// One replica: changes sent on from one profile to another (from, to) while a flush is in
    /// flight, since its last round of snapshots.
    forwards: Vec<(ProfileId, ProfileId)>,
    /// Cluster mode: partitions that arrived while a flush was in flight, taken when it ends.
    arrivals: Vec<(Vec<i32>, RpcReplyPort<()>)>,
    /// Answered by the flush in flight: they asked before it took its snapshots.
    flush_waiters: Vec<RpcReplyPort<Result<FlushReport, String>>>,
    /// Asked while a flush was in flight: that one may miss what they expect written, so the
    /// next one answers them.
    next_flush_waiters: Vec<RpcReplyPort<Result<FlushReport, String>>>,
    flush_again: bool,
    /// Erasures answered once the flush in flight (which may carry their state) has landed.
    erase_waiters: Vec<(RpcReplyPort<usize>, usize)>,
    /// Cluster mode: erasures read from the topic, confirmed (in the store) on the same terms.
    erase_acks: Vec<(String, ProfileId)>,
    timers: Vec<JoinHandle<()>>,
    restarts: u64,
    poison_events: u64,
}

fn change_of(msg: &ProfileMsg) -> Option<Change> {
    match msg {
        ProfileMsg::Apply { seq, event } => Some(Change::Apply { seq: *seq, event: event.clone() }),
        ProfileMsg::MergeInto { survivor } => Some(Change::MergeInto { survivor: survivor.clone() }),
        ProfileMsg::BeginMerge { merged } => Some(Change::BeginMerge { merged: merged.clone() }),
        ProfileMsg::Absorb { record } => Some(Change::Absorb { record: record.clone() }),
        ProfileMsg::Unmerge { merged, .. } => Some(Change::Unmerge { merged: merged.clone() }),
        ProfileMsg::Restore { record, from } => Some(Change::Restore { record: record.clone(), from: from.clone() }),
        ProfileMsg::Reevaluate => Some(Change::Reevaluate),
        ProfileMsg::SetConsent { decisions, at, .. } => {
            Some(Change::SetConsent { decisions: decisions.clone(), at: *at })
        }
        _ => None,
    }
}

impl ProfilesState {
    fn spawn(&mut self, myself: &ActorRef<ProfilesMsg>, profile_id: &ProfileId) -> Result<(), ActorProcessingErr> {
        let Some(entry) = self.entries.get_mut(profile_id) else { return Ok(()) };
        let args = ProfileArgs {
            profile_id: profile_id.clone(),
            ctx: self.ctx.clone(),
            directory: myself.clone(),
            in_progress: entry.in_progress.clone(),
        };
        let (actor, started) = ractor::ActorRuntime::spawn_linked_instant(None, ProfileActor, args, myself.get_cell())?;
        self.by_actor.insert(actor.get_id(), profile_id.clone());
        entry.actor = Some(actor);
        entry.status = Status::Live;
        self.ctx.metrics.profile_actors_live.inc();
        let directory = myself.clone();
        let id = profile_id.clone();
        tokio::spawn(async move {
            let failed = match started.await {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(reason) = failed {
                let _ = directory.send_message(ProfilesMsg::SpawnFailed { profile_id: id, reason });
            }
        });
        Ok(())
    }

    /// Starts the actor again and re-delivers what it held only in memory, then held queries.
    fn respawn(&mut self, myself: &ActorRef<ProfilesMsg>, profile_id: &ProfileId) -> Result<(), ActorProcessingErr> {
        self.spawn(myself, profile_id)?;
        if let Some(entry) = self.entries.get_mut(profile_id) {
            if let Some(actor) = &entry.actor {
                for msg in entry.unflushed.iter().filter_map(Change::to_msg) {
                    let _ = actor.send_message(msg);
                }
                for q in entry.waiting.drain(..) {
                    let _ = actor.send_message(q);
                }
            }
        }
        Ok(())
    }

    fn deliver(
        &mut self,
        myself: &ActorRef<ProfilesMsg>,
        profile_id: ProfileId,
        msg: ProfileMsg,
        arrival: Arrival,
    ) -> Result<(), ActorProcessingErr> {
        if self.ctx.erasures.is_erased(&profile_id) {
            // Erased: never started again. Queries get no answer (their caller sees the profile
            // gone); an event still counts as delivered so the checkpoint moves on.
            if let ProfileMsg::Apply { seq, .. } = &msg {
                self.ctx.watermark.delivered(*seq);
                self.ctx.metrics.gdpr_suppressed_events.with_label_values(&["profile"]).inc();
            }
            return Ok(());
        }
        let owned = self.ctx.owns(&profile_id);
        if owned && self.entries.get(&profile_id).is_some_and(|e| e.unowned) {
            // Its partition came here since that read: start again from what the last owner stored.
            self.drop_profiles(std::slice::from_ref(&profile_id), "partition now owned here");
        }
        let entry = self.entries.entry(profile_id.clone()).or_insert_with(|| Entry { unowned: !owned, ..Entry::new() });
        entry.last_used = Instant::now();
        let change = change_of(&msg);
        if let Some(c) = &change {
            entry.unflushed.push_back(c.clone());
            if arrival == Arrival::Forwarded && self.ctx.outbound.is_none() {
                entry.forwarded_upto = entry.unflushed.len();
            }
        }
        if let ProfileMsg::Apply { seq, event } = &msg {
            // Now in the unflushed queue, so any flush handled after this message covers it.
            self.ctx.watermark.delivered(*seq);
            if arrival == Arrival::First {
                PipelineStages::observe(&self.ctx.metrics.stages.delivered, event.received_at, 1);
            }
        }
        match entry.status {
            Status::Live => {
                if entry.actor.is_none() {
                    self.spawn(myself, &profile_id)?;
                }
                if let Some(actor) = self.entries.get(&profile_id).and_then(|e| e.actor.clone()) {
                    // A send to a dying actor fails; the failure handler re-delivers changes.
                    let _ = actor.send_message(msg);
                }
            }
            Status::Passivating | Status::Restarting => {
                if change.is_none() {
                    entry.waiting.push(msg);
                }
            }
        }
        Ok(())
    }

    /// Applies the restart policy to a failed profile actor.
    async fn failed(
        &mut self,
        myself: &ActorRef<ProfilesMsg>,
        profile_id: ProfileId,
        reason: String,
    ) -> Result<(), ActorProcessingErr> {
        let max_attempts = self.ctx.profiles.max_event_attempts;
        let policy = self.ctx.profiles.restart_policy;
        let Some(entry) = self.entries.get_mut(&profile_id) else { return Ok(()) };
        self.ctx.metrics.profile_actors_live.dec();
        entry.actor = None;
        let seq = entry.in_progress.swap(0, Ordering::SeqCst);
        let mut poison = None;
        if seq != 0 {
            let n = entry.attempts.entry(seq).or_insert(0);
            *n += 1;
            if *n >= max_attempts {
                let attempts = *n;
                let event = entry.unflushed.iter().find_map(|c| match c {
                    Change::Apply { seq: s, event } if *s == seq => Some(event.clone()),
                    _ => None,
                });
                poison = event.map(|e| (e, attempts));
            }
        }
        tracing::warn!(profile_id = %profile_id, seq, reason = %reason, "profile actor failed");
        self.restarts += 1;
        self.ctx.metrics.actor_restarts.with_label_values(&["profile"]).inc();
        // The letter first, for a short while only (this loop serves every student): while it
        // is not stored the event stays queued, so no flush checkpoints past it, and its next
        // failure tries again.
        let mut dead_lettered = None;
        if let Some((event, attempts)) = poison {
            let why = format!("profile actor failed {attempts} times on this event: {reason}");
            if dead_letters::record_event_briefly(&self.ctx, DeadLetterStage::Profile, &event, &why, attempts).await {
                self.poison_events += 1;
                dead_lettered = Some(attempts);
            }
        }
        let Some(entry) = self.entries.get_mut(&profile_id) else { return Ok(()) };
        if let Some(attempts) = dead_lettered {
            entry.attempts.remove(&seq);
            if let Some(change) =
                entry.unflushed.iter_mut().find(|c| matches!(c, Change::Apply { seq: s, .. } if *s == seq))
            {
                *change = Change::DeadLettered;
            }
            // The event's earlier attempts go with it: several poison events for one student
            // must not spend the budget meant for a profile that keeps failing and escalate
            // the whole pipeline (whose replay would deliver them again, and again).
            entry.tracker.forgive(attempts.saturating_sub(1) as usize);
        }
        let decision = entry.tracker.decide(&policy, Instant::now());
        match decision {
            RestartDecision::Restart { after, .. } => {
                entry.status = Status::Restarting;
                let id = profile_id.clone();
                myself.send_after(after, move || ProfilesMsg::Respawn { profile_id: id });
                Ok(())
            }
            RestartDecision::Escalate => {
                self.ctx.metrics.actor_escalations.with_label_values(&["profile"]).inc();
                // A failing actor's `post_stop` does not run: its live actors are uncounted here.
                let live = self.entries.values().filter(|e| e.actor.is_some()).count() as i64;
                self.ctx.metrics.profile_actors_live.sub(live);
                for e in self.entries.values_mut() {
                    e.actor = None;
                }
                myself.stop_children_and_wait(Some("directory escalating".into()), None).await;
                Err(format!("profile {profile_id} exceeded its restart budget: {reason}").into())
            }
        }
    }

    /// GDPR erasure: never started again, actors stopped, unflushed state and the matcher's
    /// person fields forgotten. Returns how many actors ran.
    fn erase(&mut self, profiles: &[ProfileId]) -> usize {
        self.ctx.erasures.mark_erased(profiles.iter().cloned());
        let stopped = self.drop_profiles(profiles, "erased");
        // The matcher's index holds their person fields: a profile "merged away" leaves it.
        if let Some(matcher) = self.ctx.matcher.get() {
            let gone = profiles
                .iter()
                .map(|p| MatchCandidate {
                    profile_id: p.clone(),
                    merged: true,
                    traits: Default::default(),
                    identifiers: Vec::new(),
                })
                .collect();
            let _ = matcher.send_message(MatcherMsg::ProfilesChanged(gone));
        }
        tracing::info!(profiles = profiles.len(), stopped, "profiles erased from the directory");
        stopped
    }

    /// Writes the confirmations of erasures read from the topic (no flush in flight carries
    /// their state any more). A failed write is retried by the saga, which asks again.
    fn confirm_erasures(&mut self) {
        if self.erase_acks.is_empty() {
            return;
        }
        let acks = std::mem::take(&mut self.erase_acks);
        let store = self.ctx.store.clone();
        tokio::spawn(async move {
            let at = chrono::Utc::now();
            let docs = acks
                .iter()
                .map(|(request, p)| (crate::gdpr::erase_ack_key(request, p), Some(serde_json::json!({ "at": at }))))
                .collect();
            if let Err(e) = store.put_documents(crate::gdpr::ERASE_ACKS, docs).await {
                tracing::warn!(error = %e, "erasure confirmations not written; their sagas ask again");
            }
        });
    }

    /// Cluster mode: partitions that have come here (or back) start afresh. Their actors are from
    /// an earlier tenure or started for reads meanwhile (another replica may have written their
    /// profiles since); their unrecorded ids and delivered offsets are from an earlier tenure too:
    /// their events are read again from the committed offset. Only then are they owned. No flush
    /// is in flight (it could hold their ids or name their profiles), and none starts halfway.
    fn arrive(&mut self, partitions: Vec<i32>, reply: RpcReplyPort<()>) {
        if let Some(ownership) = self.ctx.ownership.clone() {
            let n = ownership.partitions();
            let stale: Vec<ProfileId> = self
                .entries
                .keys()
                .filter(|id| partitions.contains(&cohort_messages::cluster::partition_of(id, n)))
                .cloned()
                .collect();
            let stopped = self.drop_profiles(&stale, "partition arrived afresh");
            let arriving = |pos: u64| processed_partition(pos).is_some_and(|p| partitions.contains(&p));
            self.ctx.pending_ids.release_where(arriving);
            let stream = |s: u32| arriving(cohort_adapters::pack(s, 0));
            self.ctx.watermark.forget(stream);
            self.ctx.checkpoints.forget(stream);
            ownership.arrived(&partitions);
            tracing::info!(?partitions, actors = stopped, "processed-event partitions owned");
        }
        let _ = reply.send(());
    }

    /// Stops these profiles' actors and forgets what they held in memory; returns how many ran.
    fn drop_profiles(&mut self, profiles: &[ProfileId], why: &str) -> usize {
        let mut stopped = 0;
        for id in profiles {
            let Some(entry) = self.entries.remove(id) else { continue };
            if let Some(actor) = entry.actor {
                self.by_actor.remove(&actor.get_id());
                self.ctx.metrics.profile_actors_live.dec();
                actor.stop(Some(why.into()));
                stopped += 1;
            }
            self.ctx.person_fingerprints.remove(id);
        }
        stopped
    }

    /// The next round of the flush in flight: snapshots of the profiles that the last round's
    /// profiles sent changes on to (and that have changes the flush has not covered); whether
    /// each of them could be asked. A change sent on by a profile after its snapshot is left
    /// to a later flush, so a profile that keeps sending on cannot keep a flush going; one sent
    /// on by a profile the flush has not taken is kept, as a later round may take that profile.
    fn snapshot_forwarded(&mut self) -> (Vec<PendingSnapshot>, bool) {
        let last = (self.flush_number, self.flush_round);
        self.flush_round += 1;
        let mark = (self.flush_number, self.flush_round);
        let mut targets: Vec<ProfileId> = Vec::new();
        for (from, to) in std::mem::take(&mut self.forwards) {
            let taken = self.entries.get(&from).and_then(|e| e.taken).filter(|(f, _, _)| *f == last.0);
            match taken {
                None => self.forwards.push((from, to)),
                Some((_, round, _)) if round == last.1 => targets.push(to),
                Some(_) => {}
            }
        }
        targets.sort();
        targets.dedup();
        let (now, warehouse) = (Instant::now(), self.ctx.warehouse.is_some());
        let mut pending = Vec::new();
        let mut all_asked = true;
        for id in targets {
            // Gone (erased) or nothing new since this flush took it: nothing to add.
            let Some(entry) = self.entries.get_mut(&id).filter(|e| e.unflushed.len() > covered_by(e, mark.0)) else {
                continue;
            };
            match request_snapshot(&id, entry, mark, now, warehouse) {
                Some(p) => pending.push(p),
                None => all_asked = false,
            }
        }
        (pending, all_asked)
    }

    /// `paced`: a timed flush, which may defer profiles it snapshotted moments ago; a flush
    /// somebody asked for takes every change.
    fn start_flush(&mut self, myself: &ActorRef<ProfilesMsg>, paced: bool) {
        // Cluster mode: the partitions' tenures as this flush takes its snapshots; what it drops
        // now or a revocation drops later must not be recorded for a partition that came back.
        let tenure = self.ctx.ownership.as_ref().map(|o| o.tenure());
        if self.ctx.ownership.is_some() {
            // Cluster mode: profiles whose partition moved are the new owner's now; it replays
            // their unflushed changes from the committed offset.
            let moved: Vec<ProfileId> = self.entries.keys().filter(|id| !self.ctx.owns(id)).cloned().collect();
            if !moved.is_empty() {
                let n = self.drop_profiles(&moved, "partition moved");
                tracing::info!(profiles = moved.len(), actors = n, "profiles of moved partitions dropped");
            }
        }
        self.flushing = true;
        self.flush_number += 1;
        self.flush_round = 1;
        self.forwards.clear();
        let mark = (self.flush_number, self.flush_round);
        let mut lows = self.ctx.watermark.lows();
        let durable = self.ctx.checkpoints.get();
        // Not in cluster mode: a merged profile's forwards are published with every flush and
        // get new positions there, so replaying a deferred one would apply them twice.
        let min_interval = match (paced, &self.ctx.ownership) {
            (true, None) => self.ctx.profiles.snapshot_min_interval,
            _ => Duration::ZERO,
        };
        let now = Instant::now();
        let warehouse = self.ctx.warehouse.is_some();
        let bronze = if warehouse { std::mem::take(&mut *self.ctx.staged_bronze.lock()) } else { Vec::new() };
        let mut complete = true;
        let mut pending = Vec::new();
        // A profile holding changes sent on to it that cannot be asked: a redirect this flush
        // writes may depend on them, so it writes nothing.
        let mut whole = true;
        // Tracing: each traced event's trace records the write that made it durable.
        let mut traced: Vec<String> = Vec::new();
        let mut deferred = 0usize;
        for (id, entry) in &mut self.entries {
            if entry.unflushed.is_empty() {
                continue;
            }
            if defers(entry, now, min_interval, &durable) {
                // Its events stay above this flush's checkpoint until a later flush covers them.
                for change in &entry.unflushed {
                    if let Change::Apply { seq, .. } = change {
                        cap_below(&mut lows, *seq);
                    }
                }
                deferred += 1;
                continue;
            }
            match request_snapshot(id, entry, mark, now, warehouse) {
                Some(p) => {
                    for change in &entry.unflushed {
                        if let Change::Apply { event, .. } = change {
                            traced.extend(event.trace.clone());
                        }
                    }
                    pending.push(p);
                }
                None => {
                    complete = false;
                    whole &= entry.forwarded_upto == 0;
                }
            }
        }
        self.ctx.metrics.flush_deferred_profiles.set(deferred as i64);
        let ctx = self.ctx.clone();
        let directory = myself.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let _store_spans: Vec<tracing::Span> = traced
                .iter()
                .map(|t| {
                    let span = tracing::debug_span!("store.flush");
                    crate::trace::continue_from(&span, Some(t));
                    span
                })
                .collect();
            let taken = take_snapshots(&ctx, &directory, pending, whole).await;
            let (mut covered, profiles, applied) = (taken.covered, taken.profiles, taken.applied);
            complete &= taken.complete;
            // Cluster mode: the resolver stage stores the claims it made (before committing the
            // raw offsets they depend on).
            let (identities, merges) =
                if ctx.ownership.is_some() { (Vec::new(), Vec::new()) } else { ctx.index.take_pending() };
            let unmerges = ctx.index.take_unmerges();
            let ids = if complete { ctx.pending_ids.take_covered(&lows) } else { Vec::new() };
            let in_store = ctx.bus.checkpoint_in_store();
            let checkpoint = match (complete, in_store) {
                (true, true) => lows.iter().find(|(s, _)| *s == 0).map(|(_, o)| *o),
                _ => None,
            };
            let outbox = if warehouse {
                // A snapshot that timed out is flushed later; its events go with it then.
                WarehouseBatch {
                    bronze: bronze.clone(),
                    silver: applied.iter().map(|(id, event)| SilverRow::from_event(event, id)).collect(),
                    gold: Vec::new(),
                    gold_rows: profiles.iter().map(GoldProfileRow::from_record).collect(),
                }
            } else {
                WarehouseBatch::default()
            };
            let batch = FlushBatch {
                identities: identities.clone(),
                profiles,
                merges: merges.clone(),
                checkpoint,
                event_ids: ids.iter().map(|(_, id)| id.clone()).collect(),
                outbox,
            };
            let n_profiles = batch.profiles.len();
            // Person fields rarely change: only profiles whose fingerprint moved are looked at.
            // Not when nothing is written: the fingerprints would take changes never stored.
            let changed: Vec<&ProfileRecord> = match taken.whole {
                true => batch.profiles.iter().filter(|p| person_changed(&ctx.person_fingerprints, p)).collect(),
                false => Vec::new(),
            };
            for p in changed.iter().filter(|p| p.merged_into.is_none()) {
                ctx.index.note_person(&p.profile_id, Person::from_traits(|k| p.traits.get(k).map(|t| &t.value)));
            }
            let candidates = if ctx.matcher.get().is_some() { match_candidates(&changed) } else { Vec::new() };
            // Cluster mode: what these snapshots' changes sent to other profiles goes out first;
            // and no write for a partition revoked meanwhile (the gate waits out this write).
            let outbound = ctx.take_outbound();
            let sent = if outbound.is_empty() { Ok(()) } else { ctx.bus.publish_routed(&outbound).await };
            // Cluster mode: what this flush leaves out because its partition was revoked since
            // the snapshots (even if assigned back since, as an eager rebalance does).
            let mut lapsed = Lapsed::default();
            let written = match (sent, &ctx.ownership) {
                // A merged profile's redirect without the survivor that took its state in would
                // lose that state in a crash: nothing is written, and the next flush tries again.
                _ if !taken.whole => Err(cohort_adapters::StoreError::unavailable(
                    "a profile that received changes sent on during the flush could not be snapshotted",
                )),
                (Err(e), _) => Err(e),
                (Ok(()), None) => ctx.store.commit_flush(batch).await,
                (Ok(()), Some(ownership)) => {
                    let _writing = ownership.writing().await;
                    let tenure = tenure.clone().unwrap_or_default();
                    let mut batch = batch;
                    lapsed = Lapsed::sort_out(ownership, &tenure, &mut batch, &ids);
                    ctx.store.commit_flush(batch).await
                }
            };
            if written.is_err() {
                ctx.requeue_outbound(outbound);
            }
            let result = match written {
                Ok(()) => {
                    // Lapsed ids are released as well as recorded ones: the partition's next
                    // tenure (here, starting afresh, or elsewhere) reads their events again.
                    ctx.pending_ids.persisted(&ids);
                    lapsed.report();
                    covered.retain(|(id, _)| !lapsed.profiles.contains(id));
                    if let (Some(matcher), false) = (ctx.matcher.get(), candidates.is_empty()) {
                        let _ = matcher.send_message(MatcherMsg::ProfilesChanged(candidates));
                    }
                    ctx.index.publish_identity_events(ctx.bus.as_ref(), identity_events(&merges, &unmerges)).await;
                    // The store has the effects; only now may the bus forget the events. A failed
                    // commit (a rebalance, say) only delays it: the next flush commits further.
                    // Offsets and checkpoints only for partitions held all along (see `tenure`).
                    let lows: cohort_adapters::StreamPositions = match (&ctx.ownership, &tenure) {
                        (Some(o), Some(t)) => lows
                            .iter()
                            .copied()
                            .filter(|(s, _)| o.position_held_since(t, cohort_adapters::pack(*s, 0)))
                            .collect(),
                        _ => lows,
                    };
                    let committed = if complete && !in_store {
                        match ctx.bus.commit(&lows).await {
                            Ok(()) => true,
                            Err(e) => {
                                tracing::warn!(error = %e, "bus offsets not committed; the next flush retries");
                                false
                            }
                        }
                    } else {
                        complete
                    };
                    if committed {
                        ctx.checkpoints.advance(&lows);
                        let total: u64 = ctx.checkpoints.get().iter().map(|(_, o)| *o).sum();
                        ctx.metrics.checkpoint.set(total as i64);
                    }
                    ctx.metrics.flush_duration.observe(started.elapsed().as_secs_f64());
                    ctx.metrics.flush_profiles_written.inc_by(n_profiles as u64);
                    Ok(FlushReport {
                        profiles: n_profiles,
                        identities: identities.len(),
                        checkpoint: ctx.checkpoints.stream0(),
                    })
                }
                Err(e) => {
                    ctx.staged_bronze.lock().extend(bronze);
                    ctx.index.restore_pending(identities, merges);
                    ctx.index.restore_unmerges(unmerges);
                    ctx.pending_ids.restore(ids);
                    if taken.whole {
                        ctx.metrics.flush_failures.inc();
                        tracing::warn!(error = %e, "profile flush failed, will retry");
                    } else {
                        ctx.metrics.flush_postponed.inc();
                        tracing::info!(reason = %e, "profile flush postponed, will retry");
                    }
                    covered.clear();
                    Err(e.to_string())
                }
            };
            let _ = directory.send_message(ProfilesMsg::Flushed { result, covered });
        });
    }
}

/// Asks a profile's actor for a snapshot of everything queued for it, for round `mark` of a
/// flush; an earlier round of that flush may have covered the first changes. `None` when the
/// actor cannot answer now.
fn request_snapshot(
    id: &ProfileId,
    entry: &mut Entry,
    mark: (u64, u32),
    now: Instant,
    warehouse: bool,
) -> Option<PendingSnapshot> {
    let actor = match (&entry.actor, entry.status) {
        (Some(actor), Status::Live | Status::Passivating) => actor,
        _ => return None,
    };
    let (tx, rx) = ractor::concurrency::oneshot();
    actor.send_message(ProfileMsg::TakeSnapshot(tx.into())).ok()?;
    let from = covered_by(entry, mark.0);
    let covers = entry.unflushed.len();
    entry.snapshot_at = Some(now);
    entry.taken = Some((mark.0, mark.1, covers));
    let applied = if warehouse {
        let events = entry.unflushed.iter().skip(from);
        events.filter_map(|c| if let Change::Apply { event, .. } = c { Some(event.clone()) } else { None }).collect()
    } else {
        Vec::new()
    };
    let holds_forwarded = entry.forwarded_upto > 0;
    Some(PendingSnapshot { profile_id: id.clone(), covers, applied, holds_forwarded, reply: rx })
}

/// How many of the entry's queued changes flush `flush` has taken a snapshot of.
fn covered_by(entry: &Entry, flush: u64) -> usize {
    entry.taken.filter(|(f, _, _)| *f == flush).map_or(0, |(_, _, n)| n)
}

/// Rounds of snapshots one flush takes after its first (a chain of merges needs one per link).
const MAX_SNAPSHOT_ROUNDS: usize = 8;

/// What a flush's snapshots gave.
struct Taken {
    /// How many queued changes each snapshot covers.
    covered: Vec<(ProfileId, usize)>,
    profiles: Vec<ProfileRecord>,
    /// The events to write as Silver rows, with the profile that holds each.
    applied: Vec<(ProfileId, Arc<CustomerEvent>)>,
    /// Every profile asked answered.
    complete: bool,
    /// Every profile that received changes sent on by a snapshotted one was snapshotted after
    /// them: without that, nothing may be written.
    whole: bool,
}

/// Waits for a flush's snapshots. A profile sends on what it no longer holds before it answers
/// (a merged profile its record and events, a survivor the part an unmerge restores), so the
/// profiles those went to are snapshotted next, in further rounds along a chain of merges (one
/// replica only; in cluster mode those changes travel through the partition with this flush).
/// Without that, a flush could store a merged profile's redirect while its state was still on
/// its way to the survivor, and a crash before the next flush would lose it. For the same
/// reason a flush is not `whole` when a profile still holding changes sent on to it (perhaps
/// during an earlier flush that wrote nothing) could not be taken.
async fn take_snapshots(
    ctx: &PipelineContext,
    directory: &ActorRef<ProfilesMsg>,
    first: Vec<PendingSnapshot>,
    whole: bool,
) -> Taken {
    let mut taken = Taken { covered: Vec::new(), profiles: Vec::new(), applied: Vec::new(), complete: true, whole };
    let mut rounds = 0;
    let mut round = first;
    // Taken again after its snapshot timed out, a profile's later snapshot would cover
    // changes whose Silver rows went with the lost one.
    let mut timed_out = std::collections::HashSet::new();
    loop {
        let last = rounds > 0 && round.is_empty();
        for p in round {
            if timed_out.contains(&p.profile_id) {
                taken.whole = false;
            }
            let Ok(Ok(ProfileSnapshot { record })) = tokio::time::timeout(ctx.profiles.snapshot_timeout, p.reply).await
            else {
                taken.complete = false;
                taken.whole &= !p.holds_forwarded;
                timed_out.insert(p.profile_id);
                continue;
            };
            taken.profiles.extend(record);
            taken.applied.extend(p.applied.into_iter().map(|e| (p.profile_id.clone(), e)));
            taken.covered.push((p.profile_id, p.covers));
        }
        if last || ctx.outbound.is_some() {
            break;
        }
        if rounds == MAX_SNAPSHOT_ROUNDS {
            // Still sending on: what comes of it goes with a later flush, and nothing now.
            taken.whole = false;
            break;
        }
        rounds += 1;
        let asked =
            directory.call(|reply| ProfilesMsg::SnapshotForwarded { reply }, Some(Duration::from_secs(10))).await;
        match asked {
            Ok(ractor::rpc::CallResult::Success((next, all_asked))) => {
                taken.whole &= all_asked;
                round = next;
            }
            _ => {
                taken.whole = false;
                break;
            }
        }
    }
    if rounds > 1 {
        // A profile taken twice: its later snapshot covers the earlier one.
        keep_last(&mut taken.profiles, |r| r.profile_id.clone());
        keep_last(&mut taken.covered, |(id, _)| id.clone());
    }
    file_under_holders(&mut taken);
    if !taken.whole {
        taken.complete = false;
    }
    taken
}

/// An event a redirect sent on has a Silver row from each profile it passed through; only the
/// row of the profile that holds it stays.
fn file_under_holders(taken: &mut Taken) {
    let redirects: std::collections::HashSet<&ProfileId> =
        taken.profiles.iter().filter(|r| r.merged_into.is_some()).map(|r| &r.profile_id).collect();
    if redirects.is_empty() || taken.applied.is_empty() {
        return;
    }
    let passed: std::collections::HashSet<&cohort_messages::EventId> =
        taken.applied.iter().filter(|(id, _)| redirects.contains(id)).map(|(_, e)| &e.event_id).collect();
    let held: std::collections::HashSet<cohort_messages::EventId> = taken
        .applied
        .iter()
        .filter(|(id, e)| !redirects.contains(id) && passed.contains(&e.event_id))
        .map(|(_, e)| e.event_id.clone())
        .collect();
    if held.is_empty() {
        return;
    }
    let redirects: std::collections::HashSet<ProfileId> = redirects.into_iter().cloned().collect();
    taken.applied.retain(|(id, e)| !(redirects.contains(id) && held.contains(&e.event_id)));
}

/// Keeps the last item for each key, in order.
fn keep_last<T, K: std::hash::Hash + Eq>(items: &mut Vec<T>, key: impl Fn(&T) -> K) {
    let mut seen = std::collections::HashSet::new();
    let mut kept: Vec<T> = std::mem::take(items).into_iter().rev().filter(|t| seen.insert(key(t))).collect();
    kept.reverse();
    *items = kept;
}

/// Most changes a deferred profile may hold: past it, the next timed flush takes its snapshot.
const MAX_DEFERRED_CHANGES: usize = 256;

/// Whether a timed flush leaves this profile for a later one. A profile that keeps changing
/// would otherwise be cloned, sealed, encoded and written by every flush, every
/// `flush_interval`; deferring it for `min_interval` bounds that work per profile, not per
/// event. Only plain event applications wait, and only those after the durable checkpoint (a
/// forwarded event may sit below it); merges, consent and restores go out with the next flush.
/// One replica only (see `start_flush`).
fn defers(entry: &Entry, now: Instant, min_interval: Duration, durable: &cohort_adapters::StreamPositions) -> bool {
    entry.status == Status::Live
        && entry.actor.is_some()
        && entry.unflushed.len() < MAX_DEFERRED_CHANGES
        && entry.snapshot_at.is_some_and(|at| now.saturating_duration_since(at) < min_interval)
        && entry.unflushed.iter().all(|c| match c {
            Change::Apply { seq, .. } => {
                let (stream, offset) = cohort_adapters::unpack(*seq);
                durable.iter().find(|(s, _)| *s == stream).is_none_or(|(_, done)| offset > *done)
            }
            _ => false,
        })
}

/// Lowers the stream's low watermark below `position`, so a checkpoint taken from it leaves the
/// event to be replayed after a crash.
fn cap_below(lows: &mut cohort_adapters::StreamPositions, position: u64) {
    let (stream, offset) = cohort_adapters::unpack(position);
    if let Some((_, low)) = lows.iter_mut().find(|(s, _)| *s == stream) {
        *low = (*low).min(offset.saturating_sub(1));
    }
}

impl Actor for ProfilesDirectory {
    type Msg = ProfilesMsg;
    type State = ProfilesState;
    type Arguments = ProfilesArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<ProfilesMsg>,
        args: ProfilesArgs,
    ) -> Result<ProfilesState, ActorProcessingErr> {
        // The only directory of the process starts with no actor: one that failed (a panic)
        // never ran its `post_stop` to uncount its own.
        args.ctx.metrics.profile_actors_live.set(0);
        // The pipeline restarts one for all, this directory first: until the new dispatcher
        // sets them from its subscription, the positions delivered to the directory that died
        // must not stand for events this one holds (a flush would checkpoint past them).
        args.ctx.watermark.reset(&Vec::new());
        args.ctx.pending_ids.reset();
        Ok(ProfilesState {
            ctx: args.ctx,
            entries: HashMap::new(),
            by_actor: HashMap::new(),
            flushing: false,
            flush_number: 0,
            flush_round: 0,
            forwards: Vec::new(),
            flush_waiters: Vec::new(),
            next_flush_waiters: Vec::new(),
            flush_again: false,
            erase_waiters: Vec::new(),
            erase_acks: Vec::new(),
            arrivals: Vec::new(),
            timers: Vec::new(),
            restarts: 0,
            poison_events: 0,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<ProfilesMsg>,
        state: &mut ProfilesState,
    ) -> Result<(), ActorProcessingErr> {
        let flush_every = state.ctx.profiles.flush_interval;
        let sweep_every = (state.ctx.profiles.passivate_after / 4).max(Duration::from_millis(250));
        state.timers.push(myself.send_interval(flush_every, || ProfilesMsg::Flush { reply: None }));
        state.timers.push(myself.send_interval(sweep_every, || ProfilesMsg::PassivateIdle));
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<ProfilesMsg>,
        state: &mut ProfilesState,
    ) -> Result<(), ActorProcessingErr> {
        for t in state.timers.drain(..) {
            t.abort();
        }
        let live = state.entries.values().filter(|e| e.actor.is_some()).count() as i64;
        state.ctx.metrics.profile_actors_live.sub(live);
        state.by_actor.clear();
        myself.stop_children_and_wait(None, None).await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<ProfilesMsg>,
        msg: ProfilesMsg,
        state: &mut ProfilesState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ProfilesMsg::Deliver { profile_id, msg } => {
                let routed = state
                    .ctx
                    .outbound
                    .as_ref()
                    .and_then(|o| cohort_messages::cluster::RoutedChange::of(&profile_id, &msg).map(|r| (o, r)));
                match routed {
                    // Cluster mode: a change asked for here goes through its profile's partition.
                    Some((outbound, change)) => outbound.lock().push(change),
                    None => state.deliver(&myself, profile_id, msg, Arrival::First)?,
                }
            }
            ProfilesMsg::Forward { from, profile_id, msg } => {
                if state.flushing && state.ctx.outbound.is_none() {
                    state.forwards.push((from, profile_id.clone()));
                }
                state.deliver(&myself, profile_id, msg, Arrival::Forwarded)?
            }
            ProfilesMsg::DeliverRouted { profile_id, msg, seq, forwarded } => {
                if state.ctx.owns(&profile_id) {
                    let is_apply = matches!(msg, ProfileMsg::Apply { .. });
                    let arrival = if forwarded { Arrival::Forwarded } else { Arrival::First };
                    state.deliver(&myself, profile_id, msg, arrival)?;
                    if !is_apply {
                        state.ctx.watermark.delivered(seq);
                    }
                } else {
                    // Its partition moved while it was on its way: the new owner reads it again,
                    // and its id, claimed on the way, must not be recorded as applied.
                    state.ctx.pending_ids.release(seq);
                    state.ctx.watermark.delivered(seq);
                }
            }
            ProfilesMsg::Flush { reply } => {
                if state.flushing {
                    state.next_flush_waiters.extend(reply);
                    state.flush_again = true;
                } else {
                    let paced = reply.is_none();
                    state.flush_waiters.extend(reply);
                    state.start_flush(&myself, paced);
                }
            }
            ProfilesMsg::SnapshotForwarded { reply } => {
                let _ = reply.send(state.snapshot_forwarded());
            }
            ProfilesMsg::Flushed { result, covered } => {
                for (id, n) in covered {
                    if let Some(e) = state.entries.get_mut(&id) {
                        let n = n.min(e.unflushed.len());
                        e.unflushed.drain(..n);
                        e.forwarded_upto = e.forwarded_upto.saturating_sub(n);
                    }
                }
                state.flushing = false;
                for w in state.flush_waiters.drain(..) {
                    let _ = w.send(result.clone());
                }
                for (w, n) in state.erase_waiters.drain(..) {
                    let _ = w.send(n);
                }
                state.confirm_erasures();
                for (partitions, reply) in std::mem::take(&mut state.arrivals) {
                    state.arrive(partitions, reply);
                }
                if state.flush_again {
                    state.flush_again = false;
                    state.flush_waiters = std::mem::take(&mut state.next_flush_waiters);
                    let paced = state.flush_waiters.is_empty();
                    state.start_flush(&myself, paced);
                }
            }
            ProfilesMsg::Respawn { profile_id } => {
                if state.entries.get(&profile_id).is_some_and(|e| e.status == Status::Restarting) {
                    state.respawn(&myself, &profile_id)?;
                }
            }
            ProfilesMsg::SpawnFailed { profile_id, reason } => {
                if let Some(actor) = state.entries.get(&profile_id).and_then(|e| e.actor.clone()) {
                    state.by_actor.remove(&actor.get_id());
                }
                state.failed(&myself, profile_id, format!("start failed: {reason}")).await?;
            }
            ProfilesMsg::PassivateIdle => {
                let idle = state.ctx.profiles.passivate_after;
                for entry in state.entries.values_mut() {
                    let quiet = entry.status == Status::Live
                        && entry.unflushed.is_empty()
                        && entry.waiting.is_empty()
                        && entry.last_used.elapsed() >= idle;
                    if let (true, Some(actor)) = (quiet, &entry.actor) {
                        entry.status = Status::Passivating;
                        // Drain: messages already queued are processed, later sends fail.
                        let _ = actor.drain();
                    }
                }
            }
            ProfilesMsg::Erase { profiles, reply } => {
                let stopped = state.erase(&profiles);
                if state.flushing {
                    state.erase_waiters.push((reply, stopped));
                } else {
                    let _ = reply.send(stopped);
                }
            }
            ProfilesMsg::PartitionsArrived { partitions, reply } => {
                if state.flushing {
                    // The flush in flight may hold their ids and name their profiles: it ends first.
                    state.arrivals.push((partitions, reply));
                } else {
                    state.arrive(partitions, reply);
                }
            }
            ProfilesMsg::EraseRouted { profile_id, request, seq } => {
                state.ctx.watermark.delivered(seq);
                // Not owned here: its partition moved, and the new owner reads the erasure again.
                if state.ctx.owns(&profile_id) {
                    state.erase(std::slice::from_ref(&profile_id));
                    state.erase_acks.push((request, profile_id));
                    if !state.flushing {
                        state.confirm_erasures();
                    }
                }
            }
            ProfilesMsg::GetStats(reply) => {
                let _ = reply.send(ProfilesStats {
                    live: state.entries.values().filter(|e| e.actor.is_some()).count(),
                    passivating: state.entries.values().filter(|e| e.status == Status::Passivating).count(),
                    unflushed_events: state.entries.values().map(|e| e.unflushed.len()).sum(),
                    restarts: state.restarts,
                    poison_events: state.poison_events,
                });
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<ProfilesMsg>,
        evt: SupervisionEvent,
        state: &mut ProfilesState,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                if let Some(id) = state.by_actor.remove(&cell.get_id()) {
                    state.failed(&myself, id, err.to_string()).await?;
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                if let Some(id) = state.by_actor.remove(&cell.get_id()) {
                    let passivated = state.entries.get(&id).is_some_and(|e| e.status == Status::Passivating);
                    if passivated {
                        state.ctx.metrics.profile_actors_live.dec();
                        let resume =
                            state.entries.get(&id).is_some_and(|e| !e.unflushed.is_empty() || !e.waiting.is_empty());
                        if resume {
                            if let Some(e) = state.entries.get_mut(&id) {
                                e.actor = None;
                            }
                            state.respawn(&myself, &id)?;
                        } else {
                            state.entries.remove(&id);
                        }
                    } else {
                        let why = reason.unwrap_or_else(|| "stopped unexpectedly".into());
                        state.failed(&myself, id, why).await?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Traits the probabilistic matcher compares.
const MATCH_TRAITS: &[&str] =
    &["first_name", "last_name", "date_of_birth", "postal_code", "city", "street", "address", "national_id"];

/// Whether a flushed profile's person fields (or its merged state) differ from the last flush
/// that looked at them; remembers the new fingerprint.
/// Cluster mode: what a flush left out because its partition was revoked after it took its
/// snapshots. The partition's next tenure (here, starting afresh, or elsewhere) reads those events
/// again, so nothing of them may be recorded: not the snapshots, not the ids, not the offsets.
#[derive(Default)]
struct Lapsed {
    /// Snapshots not written: they stay unflushed until the actors are dropped (the next flush
    /// drops them while the partition is not owned, its arrival does when it comes back).
    profiles: std::collections::HashSet<ProfileId>,
    /// How many event ids were not recorded (all are released after the write).
    ids: usize,
}

impl Lapsed {
    /// Takes out of `batch` what belongs to partitions not held all along since `tenure`.
    fn sort_out(ownership: &Ownership, tenure: &Tenure, batch: &mut FlushBatch, ids: &[(u64, String)]) -> Self {
        let mut lapsed = Self::default();
        batch.profiles.retain(|p| {
            let held = ownership.profile_held_since(tenure, &p.profile_id);
            if !held {
                lapsed.profiles.insert(p.profile_id.clone());
            }
            held
        });
        batch.outbox.silver.retain(|row| !lapsed.profiles.contains(&row.profile_id));
        batch.outbox.gold.retain(|id| !lapsed.profiles.contains(id));
        batch.outbox.gold_rows.retain(|row| !lapsed.profiles.contains(&row.profile_id));
        batch.event_ids = Vec::new();
        for (pos, id) in ids {
            if ownership.position_held_since(tenure, *pos) {
                batch.event_ids.push(id.clone());
            } else {
                lapsed.ids += 1;
            }
        }
        lapsed
    }

    fn report(&self) {
        if !self.profiles.is_empty() || self.ids > 0 {
            tracing::info!(
                profiles = self.profiles.len(),
                events = self.ids,
                "a partition was revoked during the flush: its events are left to its next tenure"
            );
        }
    }
}

fn person_changed(seen: &dashmap::DashMap<ProfileId, u64>, p: &ProfileRecord) -> bool {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    p.merged_into.hash(&mut h);
    for k in MATCH_TRAITS {
        if let Some(t) = p.traits.get(*k) {
            k.hash(&mut h);
            t.value.to_string().hash(&mut h);
        }
    }
    for l in &p.identifiers {
        if matches!(l.identifier.kind, IdentifierKind::Email | IdentifierKind::Phone) {
            l.identifier.hash(&mut h);
        }
    }
    let fingerprint = h.finish();
    seen.insert(p.profile_id.clone(), fingerprint) != Some(fingerprint)
}

/// What the matcher needs of flushed profiles: the person fields of those that have a name or a
/// date of birth, and the ids of those merged away (to forget them).
fn match_candidates(profiles: &[&ProfileRecord]) -> Vec<MatchCandidate> {
    profiles
        .iter()
        .filter_map(|p| {
            if p.merged_into.is_some() {
                return Some(MatchCandidate {
                    profile_id: p.profile_id.clone(),
                    merged: true,
                    traits: Default::default(),
                    identifiers: Vec::new(),
                });
            }
            let person = ["first_name", "last_name", "date_of_birth"].iter().any(|k| p.traits.contains_key(*k));
            person.then(|| MatchCandidate {
                profile_id: p.profile_id.clone(),
                merged: false,
                traits: MATCH_TRAITS
                    .iter()
                    .filter_map(|k| p.traits.get(*k).map(|t| (k.to_string(), t.clone())))
                    .collect(),
                identifiers: p
                    .identifiers
                    .iter()
                    .filter(|l| matches!(l.identifier.kind, IdentifierKind::Email | IdentifierKind::Phone))
                    .cloned()
                    .collect(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::context::{FaultInjector, ProfileSettings};
    use cohort_adapters::{pack, EmbeddedStore, OperationalStore};
    use cohort_messages::cluster::partition_of;
    use cohort_messages::{EventId, EventKind, Identifier, RawRef, Source, Utm};
    use std::sync::mpsc;

    /// Holds the profile actor inside `before_apply` of the event named "held" until released,
    /// so a flush's snapshot request waits behind it; one named "slow" takes half a second, and
    /// one named "boom" fails the actor, and one named "flaky" fails it when applied again.
    struct Hold(parking_lot::Mutex<Option<mpsc::Receiver<()>>>, std::sync::atomic::AtomicU32);

    impl FaultInjector for Hold {
        fn before_apply(&self, _profile: &ProfileId, event: &CustomerEvent) {
            match event.name.as_deref() {
                Some("held") => {
                    if let Some(release) = self.0.lock().take() {
                        tokio::task::block_in_place(|| release.recv().ok());
                    }
                }
                Some("slow") => tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(500))),
                Some("boom") => panic!("injected failure"),
                Some("flaky") if self.1.fetch_add(1, Ordering::SeqCst) > 0 => panic!("injected failure"),
                _ => {}
            }
        }
    }

    fn event(id: &str, name: &str) -> CustomerEvent {
        CustomerEvent {
            event_id: EventId::new(Source::Web, id),
            source: Source::Web,
            kind: EventKind::Track,
            name: Some(name.into()),
            occurred_at: chrono::Utc::now(),
            received_at: chrono::Utc::now(),
            identifiers: vec![Identifier::new(IdentifierKind::AnonymousId, "anon-1")],
            traits: Default::default(),
            properties: Default::default(),
            utm: Utm::default(),
            trace: None,
            raw: RawRef { seq: None, index: 0 },
        }
    }

    /// Event `id`, named `name`, at journal seq `n`.
    fn apply_named(n: u64, id: &str, name: &str) -> ProfileMsg {
        ProfileMsg::Apply { seq: pack(0, n), event: Arc::new(event(id, name)) }
    }

    fn apply(n: u64, id: &str) -> ProfileMsg {
        apply_named(n, id, "Lesson Completed")
    }

    /// A position of `cdp.processed.events` partition `partition`.
    fn processed(partition: i32, offset: u64) -> u64 {
        (0..8192).map(|s| pack(s, offset)).find(|p| processed_partition(*p) == Some(partition)).unwrap()
    }

    struct Stage {
        ctx: PipelineContext,
        store: Arc<EmbeddedStore>,
        ownership: Arc<Ownership>,
        directory: ActorRef<ProfilesMsg>,
        release: mpsc::Sender<()>,
    }

    /// A profile stage owning all three partitions, its timed flushes out of the way.
    async fn stage() -> Stage {
        stage_of(true, false).await
    }

    /// The same, as one replica runs it (`cluster` false): no partitions, no outbound topic;
    /// with an in-memory warehouse if `warehouse`, so flushes write outbox rows.
    async fn stage_of(cluster: bool, warehouse: bool) -> Stage {
        stage_with(cluster, warehouse, Duration::ZERO).await
    }

    /// The same, its timed flushes deferring a profile snapshotted less than `min_interval` ago.
    async fn stage_with(cluster: bool, warehouse: bool, min_interval: Duration) -> Stage {
        stage_with_settings(cluster, warehouse, |p| ProfileSettings { snapshot_min_interval: min_interval, ..p }).await
    }

    /// The same, with the profile settings `settings` makes of the defaults.
    async fn stage_with_settings(
        cluster: bool,
        warehouse: bool,
        settings: impl FnOnce(ProfileSettings) -> ProfileSettings,
    ) -> Stage {
        let warehouse = match warehouse {
            true => Some(cohort_adapters::open_warehouse("memory://").await.unwrap()),
            false => None,
        };
        let store = EmbeddedStore::in_memory().unwrap();
        let ownership = Arc::new(Ownership::new(3));
        ownership.assign(&[0, 1, 2]);
        ownership.arrived(&[0, 1, 2]);
        let (release, held) = mpsc::channel();
        let base = PipelineContext::for_tests(store.clone());
        let ctx = PipelineContext {
            profiles: settings(base.profiles.clone()),
            fault: Some(Arc::new(Hold(parking_lot::Mutex::new(Some(held)), Default::default()))),
            warehouse,
            outbound: cluster.then(Arc::default),
            ownership: cluster.then(|| ownership.clone()),
            ..base
        };
        let (directory, _) = Actor::spawn(None, ProfilesDirectory, ProfilesArgs { ctx: ctx.clone() }).await.unwrap();
        Stage { ctx, store, ownership, directory, release }
    }

    /// One replica's stage whose profiles dead-letter an event at its first failure, and
    /// restart `backoff` after it.
    async fn stage_dead_lettering_at_once(backoff: Duration) -> Stage {
        stage_with_settings(false, false, |p| ProfileSettings {
            max_event_attempts: 1,
            restart_policy: cohort_supervisors::RestartPolicy { backoff_initial: backoff, ..p.restart_policy },
            ..p
        })
        .await
    }

    impl Stage {
        /// Reads `event` from the profile's partition at `offset`, as the routed dispatcher does.
        fn read(&self, profile: &ProfileId, offset: u64, event: CustomerEvent) -> u64 {
            let seq = processed(partition_of(profile, 3), offset);
            self.ctx.watermark.dispatched(seq);
            assert!(self.ctx.pending_ids.claim(seq, event.event_id.as_str()));
            let msg = ProfileMsg::Apply { seq, event: Arc::new(event) };
            self.directory
                .send_message(ProfilesMsg::DeliverRouted { profile_id: profile.clone(), msg, seq, forwarded: false })
                .unwrap();
            seq
        }

        fn flush(&self) -> tokio::task::JoinHandle<Result<FlushReport, String>> {
            let directory = self.directory.clone();
            tokio::spawn(async move {
                ractor::call_t!(directory, |reply| ProfilesMsg::Flush { reply: Some(reply) }, 20_000).unwrap()
            })
        }

        /// Sends `msg` to `profile` through the directory, as the resolver does.
        fn send(&self, profile: &ProfileId, msg: ProfileMsg) {
            self.directory.send_message(ProfilesMsg::Deliver { profile_id: profile.clone(), msg }).unwrap();
        }

        /// Two profiles of different partitions, each with one event (e1, e2): the survivor and
        /// the merged profile of the merge tests.
        fn two_students(&self) -> (ProfileId, ProfileId) {
            let survivor = ProfileId::derive_from_event(&EventId::new(Source::Web, "a"), chrono::Utc::now());
            let merged = elsewhere(&survivor);
            self.send(&survivor, apply(1, "e1"));
            self.send(&merged, apply(2, "e2"));
            (survivor, merged)
        }

        /// A flush asked for from this task, so it follows the messages this task sent.
        async fn flush_now(&self) -> Result<FlushReport, String> {
            ractor::call_t!(self.directory, |reply| ProfilesMsg::Flush { reply: Some(reply) }, 20_000).unwrap()
        }

        /// Asks for a flush, then releases the held event, and waits for the flush.
        async fn flush_then_release(&self) -> Result<FlushReport, String> {
            let (tx, rx) = ractor::concurrency::oneshot();
            self.directory.send_message(ProfilesMsg::Flush { reply: Some(tx.into()) }).unwrap();
            self.release.send(()).unwrap();
            tokio::time::timeout(Duration::from_secs(20), rx).await.unwrap().unwrap()
        }

        /// Returns once the directory has handled every message sent to it before.
        async fn handled(&self) {
            ractor::call_t!(self.directory, ProfilesMsg::GetStats, 5_000).unwrap();
        }

        /// Delivers `event` to `profile` at journal seq `n`, as the dispatcher does.
        fn deliver(&self, profile: &ProfileId, n: u64, event: CustomerEvent) {
            self.ctx.watermark.dispatched(pack(0, n));
            let msg = ProfileMsg::Apply { seq: pack(0, n), event: Arc::new(event) };
            self.directory.send_message(ProfilesMsg::Deliver { profile_id: profile.clone(), msg }).unwrap();
        }

        /// Sends a timer's flush and waits (up to 10 s) until `expected` changes are unflushed;
        /// returns how many are.
        async fn timed_flush_leaving(&self, expected: usize) -> usize {
            self.directory.send_message(ProfilesMsg::Flush { reply: None }).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut unflushed = usize::MAX;
            while unflushed != expected && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
                unflushed = ractor::call_t!(self.directory, ProfilesMsg::GetStats, 5_000).unwrap().unflushed_events;
            }
            unflushed
        }
    }

    /// Starts a flush whose snapshot of `profile` (two events read) waits until the partition
    /// has been revoked, and assigned back if `back`; returns the flush's answer.
    async fn flush_across_a_rebalance(s: &Stage, profile: &ProfileId, back: bool) -> Result<FlushReport, String> {
        s.read(profile, 1, event("e1", "Lesson Completed"));
        s.read(profile, 2, event("e2", "held"));
        let flushing = s.flush();
        s.handled().await;
        let partition = partition_of(profile, 3);
        s.ownership.revoke(&[partition]);
        if back {
            s.ownership.assign(&[partition]);
        }
        s.release.send(()).unwrap();
        flushing.await.unwrap()
    }

    impl Stage {
        /// The partitions' arrival, as the routed dispatcher announces it.
        async fn arrive(&self, partitions: Vec<i32>) {
            ractor::call_t!(self.directory, |reply| ProfilesMsg::PartitionsArrived { partitions, reply }, 5_000)
                .unwrap();
        }

        /// The same, asked without waiting (it waits for a flush in flight).
        fn arriving(
            &self,
            partitions: Vec<i32>,
        ) -> tokio::task::JoinHandle<Result<(), ractor::RactorErr<ProfilesMsg>>> {
            let directory = self.directory.clone();
            tokio::spawn(async move {
                ractor::call_t!(directory, |reply| ProfilesMsg::PartitionsArrived { partitions, reply }, 5_000)
            })
        }

        /// Event e1 for `profile`, and a held event for a profile of another partition (its
        /// snapshot keeps a flush in flight until released); returns that other profile.
        async fn one_event_and_one_held(&self, profile: &ProfileId) -> ProfileId {
            let other = elsewhere(profile);
            self.read(profile, 1, event("e1", "Lesson Completed"));
            self.read(&other, 1, event("q1", "held"));
            self.handled().await;
            other
        }

        /// Reads an event again from the committed offset, as the dispatcher does: skipped if
        /// its id is recorded as applied.
        async fn replay(&self, profile: &ProfileId, offset: u64, event: CustomerEvent) {
            let id = event.event_id.to_string();
            if !self.store.seen_event_ids(&[id]).await.unwrap()[0] {
                self.read(profile, offset, event);
            }
        }

        async fn events_of(&self, profile: &ProfileId) -> Vec<String> {
            let stored = self.store.load_profile(profile).await.unwrap();
            stored.map(|r| r.recent_events.iter().map(|e| e.event_id.to_string()).collect()).unwrap_or_default()
        }
    }

    /// A profile of another partition than `of`'s.
    fn elsewhere(of: &ProfileId) -> ProfileId {
        (0..100)
            .map(|i| ProfileId::derive_from_event(&EventId::new(Source::Web, &format!("q{i}")), chrono::Utc::now()))
            .find(|q| partition_of(q, 3) != partition_of(of, 3))
            .unwrap()
    }

    /// A directory restarted with the pipeline checkpoints nothing its predecessor held until
    /// the new dispatcher has set the positions again: the shared watermark still said what
    /// was delivered to the directory that died, and a flush would have stored past it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restarted_directory_does_not_checkpoint_what_the_one_before_it_held() {
        let s = stage_of(false, false).await;
        for seq in 1..=5 {
            s.ctx.watermark.dispatched(seq);
            s.ctx.watermark.delivered(seq);
        }
        assert!(!s.ctx.watermark.lows().is_empty());
        s.directory.stop(None);
        let (again, _) = Actor::spawn(None, ProfilesDirectory, ProfilesArgs { ctx: s.ctx.clone() }).await.unwrap();
        ractor::call_t!(again, |reply| ProfilesMsg::Flush { reply: Some(reply) }, 20_000).unwrap().unwrap();
        assert_eq!(s.store.checkpoint().await.unwrap(), 0, "nothing of the dead directory's is stored");
        again.stop(None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_asked_for_while_one_is_in_flight_covers_what_came_before_the_asking() {
        let s = stage().await;
        let first = ProfileId::derive_from_event(&EventId::new(Source::Web, "e1"), chrono::Utc::now());
        let second = elsewhere(&first);
        s.read(&first, 1, event("e1", "held"));
        let in_flight = s.flush();
        s.handled().await;
        // Delivered after that flush took its snapshots, before this one was asked for (a
        // deletion saga's flush before it erases the warehouse, say).
        s.read(&second, 1, event("q1", "slow"));
        let asked = s.flush();
        s.handled().await;
        s.release.send(()).unwrap();
        in_flight.await.unwrap().unwrap();
        asked.await.unwrap().unwrap();
        assert_eq!(s.events_of(&second).await, vec!["web:q1".to_string()], "answered before it was written");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partition_revoked_and_assigned_back_during_a_flush_starts_afresh_and_loses_nothing() {
        let s = stage().await;
        let profile = ProfileId::derive_from_event(&EventId::new(Source::Web, "e1"), chrono::Utc::now());
        flush_across_a_rebalance(&s, &profile, true).await.unwrap();
        // Its tenure ended during that flush: nothing of it may be recorded by it.
        assert!(s.store.load_profile(&profile).await.unwrap().is_none(), "written by the lapsed flush");
        let ids = vec!["web:e1".to_string(), "web:e2".to_string()];
        assert_eq!(s.store.seen_event_ids(&ids).await.unwrap(), vec![false, false]);
        // Back here, it starts afresh: the stale actor goes, the events are read again from the
        // committed offset and are not taken for duplicates.
        s.arrive(vec![partition_of(&profile, 3)]).await;
        s.replay(&profile, 1, event("e1", "Lesson Completed")).await;
        s.replay(&profile, 2, event("e2", "held")).await;
        s.flush().await.unwrap().unwrap();
        assert_eq!(s.events_of(&profile).await.len(), 2);
        assert_eq!(s.store.seen_event_ids(&ids).await.unwrap(), vec![true, true], "ids recorded with it");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partition_arriving_during_a_flush_starts_afresh_once_the_flush_has_ended() {
        let s = stage().await;
        let profile = ProfileId::derive_from_event(&EventId::new(Source::Web, "e1"), chrono::Utc::now());
        s.one_event_and_one_held(&profile).await;
        let flushing = s.flush();
        s.handled().await;
        // An eager rebalance gives the partition straight back while that flush is in flight.
        let partition = partition_of(&profile, 3);
        s.ownership.revoke(&[partition]);
        s.ownership.assign(&[partition]);
        let arriving = s.arriving(vec![partition]);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!arriving.is_finished(), "arrived while a flush holding its ids was in flight");
        assert!(!s.ownership.owns(partition));
        s.release.send(()).unwrap();
        flushing.await.unwrap().unwrap();
        arriving.await.unwrap().unwrap();
        assert!(s.ownership.owns(partition));
        // Its earlier tenure's offsets no longer stand for it: nothing is committed past e1
        // before it is read again.
        let stream = cohort_adapters::unpack(processed(partition, 1)).0;
        assert!(s.ctx.watermark.lows().iter().all(|(st, _)| *st != stream), "{:?}", s.ctx.watermark.lows());
        s.replay(&profile, 1, event("e1", "Lesson Completed")).await;
        s.flush().await.unwrap().unwrap();
        assert_eq!(s.events_of(&profile).await, vec!["web:e1".to_string()]);
        assert_eq!(s.store.seen_event_ids(&["web:e1".to_string()]).await.unwrap(), vec![true]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_begun_while_a_partition_was_revoked_records_none_of_it_though_it_came_back() {
        let s = stage().await;
        let profile = ProfileId::derive_from_event(&EventId::new(Source::Web, "e1"), chrono::Utc::now());
        let other = s.one_event_and_one_held(&profile).await;
        // Between an eager revocation and the next assignment a flush begins: it drops the
        // revoked partition's actor, and its snapshot of the other profile keeps it in flight.
        let partition = partition_of(&profile, 3);
        s.ownership.revoke(&[partition]);
        let flushing = s.flush();
        s.handled().await;
        s.ownership.assign(&[partition]);
        // Its arrival waits for that flush to end.
        let arriving = s.arriving(vec![partition]);
        s.release.send(()).unwrap();
        flushing.await.unwrap().unwrap();
        arriving.await.unwrap().unwrap();
        // The partition is owned again when that flush writes, but was not when it began (its
        // actor was dropped): e1's id must not be recorded, or the replay below would skip it.
        // (`Ownership::held_since` requires the partition owned at the tenure for the case where
        // the flush takes the ids before the arrival; here the arrival releases them first.)
        assert_eq!(s.store.seen_event_ids(&["web:e1".to_string()]).await.unwrap(), vec![false]);
        s.replay(&profile, 1, event("e1", "Lesson Completed")).await;
        s.flush().await.unwrap().unwrap();
        assert_eq!(s.events_of(&profile).await, vec!["web:e1".to_string()]);
        assert_eq!(s.events_of(&other).await, vec!["web:q1".to_string()]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partition_moved_away_during_a_flush_is_left_to_its_new_owner() {
        let s = stage().await;
        let profile = ProfileId::derive_from_event(&EventId::new(Source::Web, "e1"), chrono::Utc::now());
        flush_across_a_rebalance(&s, &profile, false).await.unwrap();
        s.flush().await.unwrap().unwrap();
        assert!(s.store.load_profile(&profile).await.unwrap().is_none(), "written after its partition moved");
        let ids = vec!["web:e1".to_string(), "web:e2".to_string()];
        assert_eq!(s.store.seen_event_ids(&ids).await.unwrap(), vec![false, false]);
        let stats = ractor::call_t!(s.directory, ProfilesMsg::GetStats, 5_000).unwrap();
        assert_eq!(stats.live, 0, "the moved profile's actor is stopped");
        // Its ids are released: when the partition comes back, a replay is applied, not skipped.
        let replayed = processed(partition_of(&profile, 3), 1);
        assert!(s.ctx.pending_ids.claim(replayed, "web:e1"));
    }

    /// An event that reaches a profile after it was merged is sent on to the survivor and
    /// applied there once; the `delivered` stage counts its arrival once, not once per hop.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_sent_on_by_a_merged_profile_is_one_arrival_at_the_delivered_stage() {
        let s = stage_of(false, false).await;
        let (survivor, merged) = s.two_students();
        s.send(&merged, ProfileMsg::MergeInto { survivor: survivor.clone() });
        s.send(&merged, apply(3, "e3"));
        let applied = &s.ctx.metrics.event_to_profile_latency;
        let deadline = Instant::now() + Duration::from_secs(10);
        while applied.get_sample_count() < 3 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        s.handled().await;
        assert_eq!(applied.get_sample_count(), 3, "every event applied once");
        let view = ractor::call_t!(
            s.directory,
            |reply| ProfilesMsg::Deliver { profile_id: survivor.clone(), msg: ProfileMsg::GetView(reply) },
            5_000
        )
        .unwrap();
        let cohort_messages::msgs::ProfileRecordReply::Found(view) = view else {
            panic!("the survivor answers: {view:?}")
        };
        assert_eq!(view.recent_events, 3, "the survivor holds e1, e2 (absorbed) and e3 (sent on)");
        assert_eq!(view.merged_from, vec![merged]);
        assert_eq!(s.ctx.metrics.stages.delivered.get_sample_count(), 3, "one arrival per event, not per hop");
    }

    /// A flush that takes a merged profile's redirect also takes its survivor with what the
    /// merged profile sent it, through a chain of merges, so that no crash between two flushes
    /// can find a stored redirect whose state reached no stored profile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_flush_writes_a_merged_profile_and_its_survivor_with_what_it_absorbed() {
        let s = stage_of(false, true).await;
        let first = ProfileId::derive_from_event(&EventId::new(Source::Web, "a"), chrono::Utc::now());
        let middle = elsewhere(&first);
        let last = ProfileId::derive_from_event(&EventId::new(Source::Web, "z"), chrono::Utc::now());
        s.send(&first, apply(1, "e1"));
        s.send(&middle, apply(2, "e2"));
        s.send(&last, apply(3, "e3"));
        s.flush().await.unwrap().unwrap();
        let written: Vec<_> = s.store.read_outbox(10).await.unwrap().into_iter().map(|(k, _)| k).collect();
        s.store.ack_outbox(&written).await.unwrap();

        // `first` sends nothing on before the flush is asked for: it is held in an event.
        s.send(&first, apply_named(4, "h4", "held"));
        s.send(&first, ProfileMsg::MergeInto { survivor: last.clone() });
        s.send(&middle, ProfileMsg::MergeInto { survivor: first.clone() });
        let report = s.flush_then_release().await.unwrap();
        assert_eq!(report.profiles, 3, "both redirects and the survivor, in that one flush");

        let mut stored = s.events_of(&last).await;
        stored.sort();
        assert_eq!(stored, vec!["web:e1", "web:e2", "web:e3", "web:h4"], "the survivor as stored by that one flush");
        for merged in [&middle, &first] {
            let record = s.store.load_profile(merged).await.unwrap().unwrap();
            assert!(record.merged_into.is_some(), "{merged} is stored as a redirect");
        }
        let stats = ractor::call_t!(s.directory, ProfilesMsg::GetStats, 5_000).unwrap();
        assert_eq!(stats.unflushed_events, 0, "nothing is left for a later flush");
        let outbox = s.store.read_outbox(10).await.unwrap();
        let gold: Vec<u64> = outbox
            .iter()
            .flat_map(|(_, b)| &b.gold_rows)
            .filter(|r| r.profile_id == last)
            .map(|r| r.events_total)
            .collect();
        assert_eq!(gold, vec![4], "one Gold row for the survivor, with everything it absorbed");
    }

    /// An event sent on through two redirects, the second of which the flush had not taken
    /// when it sent it on, still reaches the stored survivor in that one flush.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_flush_follows_an_event_through_a_redirect_it_had_not_taken() {
        let s = stage_of(false, true).await;
        let id = |tag: &str| ProfileId::derive_from_event(&EventId::new(Source::Web, tag), chrono::Utc::now());
        let (x, m, survivor, slow) = (id("x"), id("m"), id("s"), id("y"));
        s.send(&survivor, apply(1, "e1"));
        s.send(&m, apply(2, "e2"));
        s.send(&x, apply(3, "e3"));
        s.send(&x, ProfileMsg::MergeInto { survivor: m.clone() });
        s.flush_now().await.unwrap();
        s.send(&m, ProfileMsg::MergeInto { survivor: survivor.clone() });
        s.flush_now().await.unwrap();
        assert_eq!(s.events_of(&survivor).await.len(), 3);

        // The slow profile holds the flush's first round for half a second, long after `m`
        // has sent the event on to the survivor.
        s.send(&slow, apply_named(4, "y4", "slow"));
        s.send(&x, apply(5, "e5"));
        let report = s.flush_now().await.unwrap();
        assert_eq!(report.profiles, 4, "the slow profile, both redirects and the survivor");
        assert!(s.events_of(&survivor).await.contains(&"web:e5".to_string()), "{:?}", s.events_of(&survivor).await);
        // One Silver row, filed under the profile that holds the event, not the redirects.
        let outbox = s.store.read_outbox(10).await.unwrap();
        let filed: Vec<&ProfileId> = outbox
            .iter()
            .flat_map(|(_, b)| &b.silver)
            .filter(|r| r.event_id.to_string() == "web:e5")
            .map(|r| &r.profile_id)
            .collect();
        assert_eq!(filed, vec![&survivor]);
    }

    /// A flush whose merged profile sent its state to a survivor that is restarting writes
    /// nothing (the redirect alone would lose that state in a crash); a flush once the survivor
    /// is back writes both.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_that_cannot_take_a_survivor_writes_nothing_until_it_can() {
        let s = stage_dead_lettering_at_once(Duration::from_secs(1)).await;
        let (survivor, merged) = s.two_students();
        s.flush_now().await.unwrap();
        s.send(&survivor, apply_named(3, "b3", "boom"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while ractor::call_t!(s.directory, ProfilesMsg::GetStats, 5_000).unwrap().restarts == 0 {
            assert!(Instant::now() < deadline, "the survivor never failed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        s.send(&merged, ProfileMsg::MergeInto { survivor: survivor.clone() });
        assert!(s.flush_now().await.is_err(), "the survivor is restarting: nothing is written");
        assert_eq!((s.ctx.metrics.flush_postponed.get(), s.ctx.metrics.flush_failures.get()), (1, 0));
        let stored = s.store.load_profile(&merged).await.unwrap().unwrap();
        assert_eq!(stored.merged_into, None, "no redirect without its survivor");
        assert_eq!(s.events_of(&survivor).await, vec!["web:e1"]);

        let written = loop {
            match s.flush_now().await {
                Ok(report) => break report,
                Err(_) => {
                    assert!(Instant::now() < deadline, "the survivor never came back");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        assert_eq!(written.profiles, 2, "the redirect and the survivor together");
        assert_eq!(s.store.load_profile(&merged).await.unwrap().unwrap().merged_into.as_ref(), Some(&survivor));
        let mut kept = s.events_of(&survivor).await;
        kept.sort();
        assert_eq!(kept, vec!["web:e1", "web:e2"], "the failed event is a dead letter, the absorbed one kept");
    }

    /// An event dead-lettered while a flush is in flight, after that flush's snapshot covered it
    /// (it failed only when re-delivered after a restart), leaves the changes after it queued
    /// for the next flush: the flush drains by count what its snapshots covered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_dead_lettered_during_a_flush_leaves_the_changes_after_it_for_the_next() {
        let s = stage_dead_lettering_at_once(Duration::from_millis(10)).await;
        let profile = ProfileId::derive_from_event(&EventId::new(Source::Web, "a"), chrono::Utc::now());
        let other = elsewhere(&profile);
        s.send(&profile, apply_named(1, "a1", "flaky"));
        s.send(&other, apply_named(2, "q2", "held"));
        s.handled().await;
        // The snapshot covers a1 alone; b3 then fails the actor, and a1 fails when re-delivered.
        let (tx, flushed) = ractor::concurrency::oneshot();
        s.directory.send_message(ProfilesMsg::Flush { reply: Some(tx.into()) }).unwrap();
        s.send(&profile, apply_named(3, "b3", "boom"));
        s.send(&profile, apply(4, "c4"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while ractor::call_t!(s.directory, ProfilesMsg::GetStats, 5_000).unwrap().poison_events < 2 {
            assert!(Instant::now() < deadline, "the profile never failed on both events");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        s.release.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(20), flushed).await.unwrap().unwrap().unwrap();
        let stats = ractor::call_t!(s.directory, ProfilesMsg::GetStats, 5_000).unwrap();
        assert!(stats.unflushed_events > 0, "c4 was drained with what the snapshot covered");
        assert_eq!(s.events_of(&profile).await, vec!["web:a1"], "the snapshot taken before the failures");
        while ractor::call_t!(s.directory, ProfilesMsg::GetStats, 5_000).unwrap().live < 2 {
            assert!(Instant::now() < deadline, "the profile never came back");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let written = s.flush_now().await.unwrap();
        assert_eq!(written.profiles, 1);
        // a1 is in it if the actor came back after the first flush stored its snapshot.
        let stored = s.events_of(&profile).await;
        assert!(stored.contains(&"web:c4".to_string()) && !stored.contains(&"web:b3".to_string()), "{stored:?}");
        assert_eq!(ractor::call_t!(s.directory, ProfilesMsg::GetStats, 5_000).unwrap().unflushed_events, 0);
    }

    /// A survivor stuck in an event while holding the state its merged profile sent on: its
    /// snapshot times out, so the flush writes nothing (not the redirect alone); once it is
    /// free, the next flush writes both.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_that_times_out_holding_a_merged_state_keeps_the_redirect_unwritten() {
        let s = stage_with_settings(false, false, |p| ProfileSettings {
            snapshot_timeout: Duration::from_millis(300),
            ..p
        })
        .await;
        let (survivor, merged) = s.two_students();
        assert_eq!(s.flush_now().await.unwrap().profiles, 2);

        s.send(&survivor, apply_named(3, "h3", "held"));
        s.send(&survivor, ProfileMsg::BeginMerge { merged: merged.clone() });
        s.send(&merged, ProfileMsg::MergeInto { survivor: survivor.clone() });
        // Queued before the flush: h3, the merge, the merged state, and the redirect.
        let deadline = Instant::now() + Duration::from_secs(10);
        while ractor::call_t!(s.directory, ProfilesMsg::GetStats, 5_000).unwrap().unflushed_events < 4 {
            assert!(Instant::now() < deadline, "the merged profile never sent its state on");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let started = Instant::now();
        assert!(s.flush_now().await.is_err(), "the survivor's snapshot timed out: nothing is written");
        assert!(started.elapsed() < Duration::from_secs(5), "the flush waited out the short timeout, not 10 s");
        assert_eq!(s.ctx.metrics.flush_postponed.get(), 1, "counted as postponed");
        assert_eq!(s.ctx.metrics.flush_failures.get(), 0, "not as a store failure");
        let stored = s.store.load_profile(&merged).await.unwrap().unwrap();
        assert_eq!(stored.merged_into, None, "no redirect without its survivor");

        s.release.send(()).unwrap();
        let written = s.flush_now().await.unwrap();
        assert_eq!(written.profiles, 2, "the redirect and the survivor together");
        assert_eq!(s.store.load_profile(&merged).await.unwrap().unwrap().merged_into.as_ref(), Some(&survivor));
        let mut kept = s.events_of(&survivor).await;
        kept.sort();
        assert_eq!(kept, vec!["web:e1", "web:e2", "web:h3"]);
    }

    /// An unmerge asked for just before a flush: that flush stores the survivor without the
    /// unmerged profile's part and the unmerged profile with it, not a redirect to the survivor.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_flush_writes_both_profiles_of_an_unmerge() {
        let s = stage_of(false, true).await;
        let (survivor, merged) = s.two_students();
        s.send(&survivor, ProfileMsg::BeginMerge { merged: merged.clone() });
        s.send(&merged, ProfileMsg::MergeInto { survivor: survivor.clone() });
        assert_eq!(s.flush_now().await.unwrap().profiles, 2, "the redirect and the survivor");
        assert_eq!(s.events_of(&survivor).await.len(), 2, "merged and stored");

        // The survivor sends nothing on before the flush is asked for: it is held in an event.
        s.send(&survivor, apply_named(3, "h3", "held"));
        s.send(&survivor, ProfileMsg::Unmerge { merged: merged.clone(), reply: None });
        assert_eq!(s.flush_then_release().await.unwrap().profiles, 2, "the survivor and the restored profile");
        let restored = s.store.load_profile(&merged).await.unwrap().unwrap();
        assert_eq!(restored.merged_into, None, "stored as a profile of its own again");
        let (kept, back) = (s.events_of(&survivor).await, s.events_of(&merged).await);
        assert!(kept.contains(&"web:e1".to_string()) && !kept.contains(&"web:e2".to_string()), "{kept:?}");
        assert!(back.contains(&"web:e2".to_string()) && !back.contains(&"web:e1".to_string()), "{back:?}");
    }

    /// A flush's outbox carries the Gold row of each profile it writes, as the flush took it,
    /// and names no profile for the relay to load.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_puts_the_gold_row_of_each_profile_it_writes_in_the_outbox() {
        let s = stage_of(false, true).await;
        let profile = ProfileId::derive_from_event(&EventId::new(Source::Web, "a"), chrono::Utc::now());
        for (n, id) in [(1, "e1"), (2, "e2")] {
            let msg = ProfileMsg::Apply { seq: pack(0, n), event: Arc::new(event(id, "Lesson Completed")) };
            s.directory.send_message(ProfilesMsg::Deliver { profile_id: profile.clone(), msg }).unwrap();
        }
        s.flush().await.unwrap().unwrap();
        let outbox = s.store.read_outbox(10).await.unwrap();
        assert!(outbox.iter().all(|(_, b)| b.gold.is_empty()), "{outbox:?}");
        let gold: Vec<(&ProfileId, u64)> =
            outbox.iter().flat_map(|(_, b)| &b.gold_rows).map(|r| (&r.profile_id, r.events_total)).collect();
        assert_eq!(gold, vec![(&profile, 2)]);
    }

    /// A timed flush leaves a profile it snapshotted moments ago for a later flush and keeps
    /// the checkpoint below that profile's events, so a crash replays them; a profile never
    /// snapshotted goes out at once, and a flush somebody asks for takes everything.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_timed_flush_defers_a_profile_it_just_took_and_keeps_the_checkpoint_below_its_events() {
        let s = stage_with(false, true, Duration::from_secs(3600)).await;
        let hot = ProfileId::derive_from_event(&EventId::new(Source::Web, "a"), chrono::Utc::now());
        let fresh = elsewhere(&hot);
        let apply = |profile: &ProfileId, n: u64, id: &str| s.deliver(profile, n, event(id, "Lesson Completed"));
        let stored_events = |profile: ProfileId| {
            let store = s.store.clone();
            async move { store.load_profile(&profile).await.unwrap().map_or(0, |r| r.counters.events_total) }
        };
        let written = || s.ctx.metrics.flush_profiles_written.get();
        apply(&hot, 1, "e1");
        s.flush().await.unwrap().unwrap();
        assert_eq!(s.ctx.checkpoints.stream0(), 1);
        assert_eq!(written(), 1);

        apply(&hot, 2, "e2");
        apply(&fresh, 3, "e3");
        let unflushed = s.timed_flush_leaving(1).await;
        assert_eq!(unflushed, 1, "the timed flush took the fresh profile and left e2 with the hot one");
        assert_eq!(s.ctx.metrics.flush_deferred_profiles.get(), 1);
        assert_eq!(written(), 2, "only the fresh profile was written");
        assert_eq!(s.ctx.checkpoints.stream0(), 1, "e2 is not in the store yet, so the checkpoint stays below it");
        assert_eq!(stored_events(hot.clone()).await, 1);
        assert_eq!(stored_events(fresh.clone()).await, 1);
        let silver = |outbox: Vec<(cohort_adapters::OutboxId, WarehouseBatch)>| -> Vec<String> {
            outbox.iter().flat_map(|(_, b)| &b.silver).map(|r| r.event_id.as_str().to_string()).collect()
        };
        assert_eq!(silver(s.store.read_outbox(10).await.unwrap()), vec!["web:e1", "web:e3"]);

        s.flush().await.unwrap().unwrap();
        assert_eq!(s.ctx.checkpoints.stream0(), 3);
        assert_eq!(stored_events(hot).await, 2);
        assert_eq!(s.ctx.metrics.flush_deferred_profiles.get(), 0);
        assert_eq!(written(), 3);
        assert_eq!(silver(s.store.read_outbox(10).await.unwrap()), vec!["web:e1", "web:e3", "web:e2"]);
    }

    /// An event a merged profile sends on may sit below the durable checkpoint already; the
    /// profile holding it is never deferred, or a crash would lose it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_timed_flush_takes_a_profile_holding_an_event_from_below_the_checkpoint() {
        let s = stage_with(false, true, Duration::from_secs(3600)).await;
        let hot = ProfileId::derive_from_event(&EventId::new(Source::Web, "a"), chrono::Utc::now());
        s.deliver(&hot, 2, event("e2", "Lesson Completed"));
        s.flush().await.unwrap().unwrap();
        assert_eq!(s.ctx.checkpoints.stream0(), 2);

        let e1 = ProfileMsg::Apply { seq: pack(0, 1), event: Arc::new(event("e1", "Lesson Completed")) };
        s.directory.send_message(ProfilesMsg::Forward { from: hot.clone(), profile_id: hot.clone(), msg: e1 }).unwrap();
        s.directory.send_message(ProfilesMsg::Flush { reply: None }).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stored = 0;
        while stored != 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
            stored = s.store.load_profile(&hot).await.unwrap().map_or(0, |r| r.counters.events_total);
        }
        assert_eq!(stored, 2, "the timed flush wrote the profile though it had just been written");
        assert_eq!(s.ctx.metrics.flush_deferred_profiles.get(), 0);
    }

    /// In cluster mode a timed flush defers nothing: forwards are published with every flush
    /// at new positions, so replaying a deferred merged profile would apply them twice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_timed_flush_in_cluster_mode_takes_every_profile() {
        let s = stage_with(true, false, Duration::from_secs(3600)).await;
        let profile = ProfileId::derive_from_event(&EventId::new(Source::Web, "a"), chrono::Utc::now());
        s.read(&profile, 1, event("e1", "Lesson Completed"));
        s.flush().await.unwrap().unwrap();
        s.read(&profile, 2, event("e2", "Lesson Completed"));
        let unflushed = s.timed_flush_leaving(0).await;
        assert_eq!(unflushed, 0, "the profile written moments ago was written again");
        assert_eq!(s.ctx.metrics.flush_deferred_profiles.get(), 0);
    }

    /// A profile deferred long enough to gather `MAX_DEFERRED_CHANGES` changes is taken by the
    /// next timed flush however recently it was written: what waits in memory stays bounded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_timed_flush_takes_a_profile_holding_too_many_changes() {
        let s = stage_with(false, false, Duration::from_secs(3600)).await;
        let hot = ProfileId::derive_from_event(&EventId::new(Source::Web, "a"), chrono::Utc::now());
        let apply = |n: u64| s.deliver(&hot, n, event(&format!("e{n}"), "Page Viewed"));
        apply(1);
        s.flush().await.unwrap().unwrap();
        let last = 1 + MAX_DEFERRED_CHANGES as u64;
        (2..=last).for_each(apply);
        assert_eq!(s.timed_flush_leaving(0).await, 0, "{MAX_DEFERRED_CHANGES} changes waiting: written");
        assert_eq!(s.ctx.checkpoints.stream0(), last);
    }
}
