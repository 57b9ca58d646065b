//! The SegmentEngine: keeps definitions (config and API), records memberships, publishes
//! changes on `cdp.segment.change`, hands them to reverse ETL, re-evaluates profiles when a
//! window slides (timers, so exits happen on time without new events), and runs batch segments.

use super::{Segment, SegmentDefinition, SegmentKind, SegmentRegistry};
use chrono::{DateTime, Utc};
use cohort_adapters::{all_documents, delete_documents, EventBus, OperationalStore, QueryValue, StoreError, Warehouse};
use cohort_messages::msgs::{BatchRun, ProfileMsg, ProfilesMsg, ReverseEtlMsg, SegmentMsg, SegmentStats};
use cohort_messages::segment::{ActivationProfile, Change, SegmentChanged};
use cohort_messages::ProfileId;
use cohort_supervisors::{Metrics, Slot};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

/// Stored definitions (`name` → definition).
pub const DEFINITIONS: &str = "segments";
/// Memberships (`segment/profile` → `{"since": ...}`).
pub const MEMBERS: &str = "segment_members";
/// Exits recorded (`segment/profile` → `{"at"}`), written before the membership goes: the
/// reverse-ETL catch-up sends an exit's triggers after a crash lost them, as it does entries'
/// (not while the student is a member again), and forgets exits older than a week.
pub const EXITS: &str = "segment_exits";

const BACKFILL_PAGE: usize = 500;
/// When each profile is next to be evaluated again because time passed (`profile id` →
/// `{"at"}`): an idle profile has no actor to tell the engine again after a restart.
pub const SCHEDULES: &str = "segment_schedules";

pub struct SegmentEngine;

pub struct SegmentEngineArgs {
    pub store: Arc<dyn OperationalStore>,
    pub bus: Arc<dyn EventBus>,
    pub warehouse: Option<Arc<dyn Warehouse>>,
    pub registry: Arc<SegmentRegistry>,
    pub directory: Slot<ProfilesMsg>,
    pub reverse_etl: Slot<ReverseEtlMsg>,
    pub metrics: Metrics,
    /// Definitions from the config file (stored ones of the same name win: the API edited them).
    pub configured: Vec<SegmentDefinition>,
    pub tick: Duration,
    /// Cluster mode: how often the stored definitions are read again. Another replica's API may
    /// define, change or delete a segment, and the profiles this replica owns must follow.
    pub refresh: Option<Duration>,
    /// Cluster mode: batch segments run on their timers only on the first live member.
    pub leader: Option<crate::cluster::MembershipSettings>,
    /// Erased profiles: no schedule of theirs is stored (a deletion removes those there are).
    pub erasures: Arc<crate::gdpr::Erasures>,
}

pub struct SegmentEngineState {
    args: SegmentEngineArgs,
    due: BTreeSet<(DateTime<Utc>, ProfileId)>,
    scheduled: HashMap<ProfileId, DateTime<Utc>>,
    /// Schedule changes not yet stored (`None`: none any more); written once per tick. One
    /// replica only: in cluster mode a replica learns its profiles' schedules from their actors.
    unsaved: HashMap<ProfileId, Option<DateTime<Utc>>>,
    batch_timers: HashMap<String, JoinHandle<()>>,
    timers: Vec<JoinHandle<()>>,
    changes: u64,
    backfilling: bool,
    /// A definition changed while a pass was running: run another after it.
    backfill_again: bool,
}

/// The definitions stored through the API, by name: `None` for one this version cannot read
/// (logged), which a refresh must not take for deleted.
async fn stored_definitions(
    store: &dyn OperationalStore,
) -> Result<BTreeMap<String, Option<SegmentDefinition>>, StoreError> {
    let mut out = BTreeMap::new();
    for (name, doc) in all_documents(store, DEFINITIONS, "").await? {
        let definition = serde_json::from_value::<SegmentDefinition>(doc)
            .inspect_err(
                |e| tracing::error!(segment = %name, error = %e, "stored segment definition unreadable; skipped"),
            )
            .ok();
        out.insert(name, definition);
    }
    Ok(out)
}

/// A time a segment document holds in `field` (a membership's `since`, an exit's or a
/// schedule's `at`).
pub fn doc_time(doc: &serde_json::Value, field: &str) -> Option<DateTime<Utc>> {
    doc.get(field).and_then(|v| serde_json::from_value(v.clone()).ok())
}

/// The key of a membership document.
pub fn member_key(segment: &str, profile: &ProfileId) -> String {
    format!("{segment}/{profile}")
}

impl SegmentEngineState {
    async fn record(&mut self, changes: &[SegmentChanged]) -> Result<(), StoreError> {
        let changes = self.as_first_recorded(changes).await?;
        if changes.is_empty() {
            return Ok(());
        }
        self.store_and_publish(&changes).await?;
        if let Some(retl) = self.args.reverse_etl.get() {
            let _ = retl.send_message(ReverseEtlMsg::Dispatch(changes));
        }
        Ok(())
    }

    /// A profile that replays events after a restart re-evaluates its segments. An entry
    /// already recorded keeps the time it was first recorded: its triggers' keys then match,
    /// so one already sent is not sent again. An exit from a membership no longer recorded was
    /// recorded before, and is dropped.
    async fn as_first_recorded(&self, changes: &[SegmentChanged]) -> Result<Vec<SegmentChanged>, StoreError> {
        let keys: Vec<String> = changes.iter().map(|c| member_key(&c.segment, &c.profile_id)).collect();
        let docs = self.args.store.get_documents(MEMBERS, &keys).await?;
        Ok(changes
            .iter()
            .zip(docs)
            .filter_map(|(c, doc)| match c.change {
                Change::Entered => {
                    let since = doc.as_ref().and_then(|d| doc_time(d, "since"));
                    Some(SegmentChanged { at: since.unwrap_or(c.at), ..c.clone() })
                }
                Change::Exited => doc.is_some().then(|| c.clone()),
            })
            .collect())
    }

    async fn store_and_publish(&mut self, changes: &[SegmentChanged]) -> Result<(), StoreError> {
        let exits: Vec<(String, Option<serde_json::Value>)> = changes
            .iter()
            .filter(|c| c.change == Change::Exited)
            .map(|c| (member_key(&c.segment, &c.profile_id), Some(json!({ "at": c.at }))))
            .collect();
        if !exits.is_empty() {
            self.args.store.put_documents(EXITS, exits).await?;
        }
        let docs = changes
            .iter()
            .map(|c| {
                let doc = match c.change {
                    Change::Entered => Some(json!({ "since": c.at })),
                    Change::Exited => None,
                };
                (member_key(&c.segment, &c.profile_id), doc)
            })
            .collect();
        self.args.store.put_documents(MEMBERS, docs).await?;
        for c in changes {
            let change = match c.change {
                Change::Entered => "entered",
                Change::Exited => "exited",
            };
            self.args.metrics.segment_changes.with_label_values(&[change]).inc();
        }
        self.changes += changes.len() as u64;
        if let Err(e) = self.args.bus.publish_segment_changes(changes).await {
            tracing::warn!(error = %e, changes = changes.len(), "segment changes not published to the bus");
        }
        Ok(())
    }

    fn schedule(&mut self, profile: ProfileId, at: Option<DateTime<Utc>>) {
        if self.persists_schedules() {
            self.unsaved.insert(profile.clone(), at);
        }
        if let Some(old) = self.scheduled.remove(&profile) {
            self.due.remove(&(old, profile.clone()));
        }
        if let Some(at) = at {
            self.due.insert((at, profile.clone()));
            self.scheduled.insert(profile, at);
        }
    }

    fn persists_schedules(&self) -> bool {
        self.args.refresh.is_none()
    }

    /// Stores the schedule changes since the last tick (kept for the next one if the store is
    /// away).
    async fn save_schedules(&mut self) {
        if self.unsaved.is_empty() {
            return;
        }
        let erasures = &self.args.erasures;
        let docs: Vec<(String, Option<serde_json::Value>)> = self
            .unsaved
            .iter()
            .map(|(p, at)| (p.to_string(), at.filter(|_| !erasures.is_erased(p)).map(|at| json!({ "at": at }))))
            .collect();
        match self.args.store.put_documents(SCHEDULES, docs).await {
            Ok(()) => self.unsaved.clear(),
            Err(e) => {
                tracing::warn!(error = %e, pending = self.unsaved.len(), "segment schedules not stored; retrying")
            }
        }
    }

    /// The schedules stored before a restart; one already due fires at the next tick.
    async fn load_schedules(&mut self) -> Result<(), StoreError> {
        if !self.persists_schedules() {
            return Ok(());
        }
        for (key, doc) in all_documents(self.args.store.as_ref(), SCHEDULES, "").await? {
            if let (Some(profile), Some(at)) = (ProfileId::parse(&key), doc_time(&doc, "at")) {
                if !self.scheduled.contains_key(&profile) {
                    self.due.insert((at, profile.clone()));
                    self.scheduled.insert(profile, at);
                }
            }
        }
        Ok(())
    }

    fn start_batch_timer(&mut self, myself: &ActorRef<SegmentMsg>, definition: &SegmentDefinition) {
        if let Some(old) = self.batch_timers.remove(&definition.name) {
            old.abort();
        }
        let every = Duration::from_secs(definition.every_secs.unwrap_or(3600).clamp(10, super::MAX_EVERY_SECS));
        let name = definition.name.clone();
        let handle = myself.send_interval(every, move || SegmentMsg::RunScheduledBatch { name: name.clone() });
        self.batch_timers.insert(definition.name.clone(), handle);
    }

    /// Cluster mode: makes this replica's segments agree with what the other replicas' APIs
    /// stored. A stored definition that differs from the one here replaces it; one here that is
    /// no longer stored, and is not this replica's configured definition, was deleted, and the
    /// memberships profiles here recorded since are removed too. A segment from the config file
    /// that another replica deleted stays here: a deletion leaves no record.
    async fn refresh(&mut self, myself: &ActorRef<SegmentMsg>) -> Result<(), StoreError> {
        let stored = stored_definitions(self.args.store.as_ref()).await?;
        let here = self.args.registry.snapshot();
        let mut realtime_changed = false;
        for (name, definition) in stored.iter().filter_map(|(n, d)| Some((n, d.as_ref()?))) {
            if here.get(name).is_some_and(|s| s.definition == *definition) {
                continue;
            }
            match Segment::compile(definition.clone(), &self.args.registry.models) {
                Ok(segment) => {
                    tracing::info!(segment = %name, kind = ?definition.kind, "segment definition from another replica applied");
                    realtime_changed |= self.apply(myself, segment);
                }
                Err(e) => tracing::error!(segment = %name, error = %e, "stored segment definition invalid; skipped"),
            }
        }
        for (name, segment) in here.iter() {
            let configured = self.args.configured.iter().any(|d| d.name == *name && *d == segment.definition);
            if !stored.contains_key(name) && !configured {
                tracing::info!(segment = %name, "segment deleted on another replica; removed here");
                self.forget(name).await?;
            }
        }
        if realtime_changed {
            // Every stored profile, not only those owned here: another replica's pass reached
            // some before their owners knew the rule, and partitions may move meanwhile.
            self.request_backfill(myself)
                .map_err(|e| StoreError::unavailable(format!("segment engine cannot message itself: {e}")))?;
        }
        Ok(())
    }

    /// Makes `segment` the one evaluated under its name, its batch timer started (or stopped,
    /// for a segment that is no longer batch); whether it has a rule, so that the stored profiles
    /// need evaluating again.
    fn apply(&mut self, myself: &ActorRef<SegmentMsg>, segment: Segment) -> bool {
        let realtime = segment.expr.is_some();
        let definition = segment.definition.clone();
        self.args.registry.put(segment);
        match definition.kind {
            SegmentKind::Batch => self.start_batch_timer(myself, &definition),
            _ => self.stop_batch_timer(&definition.name),
        }
        realtime
    }

    /// Stops evaluating `name` and deletes its memberships; whether it was defined here.
    async fn forget(&mut self, name: &str) -> Result<bool, StoreError> {
        let had = self.args.registry.remove(name);
        self.stop_batch_timer(name);
        self.clear_members(name).await?;
        Ok(had)
    }

    /// Deletes every membership document of `segment`.
    async fn clear_members(&self, segment: &str) -> Result<(), StoreError> {
        let store = self.args.store.as_ref();
        let members = self.members(segment).await?;
        delete_documents(store, MEMBERS, members.iter().map(|p| member_key(segment, p))).await?;
        // A segment defined again under this name must not send the old one's exits.
        let exits = all_documents(store, EXITS, &format!("{segment}/")).await?;
        delete_documents(store, EXITS, exits.into_iter().map(|(k, _)| k)).await
    }

    fn stop_batch_timer(&mut self, name: &str) {
        if let Some(t) = self.batch_timers.remove(name) {
            t.abort();
        }
    }

    /// Starts re-evaluating the stored profiles, or, when a pass is running, another pass after
    /// it: profiles the running pass has already passed were evaluated without the new definition.
    fn request_backfill(&mut self, myself: &ActorRef<SegmentMsg>) -> Result<(), ActorProcessingErr> {
        if self.backfilling {
            self.backfill_again = true;
            return Ok(());
        }
        self.backfilling = true;
        myself.send_message(SegmentMsg::Backfill { after: None })?;
        Ok(())
    }

    async fn members(&self, segment: &str) -> Result<BTreeSet<ProfileId>, StoreError> {
        let prefix = format!("{segment}/");
        let docs = all_documents(self.args.store.as_ref(), MEMBERS, &prefix).await?;
        Ok(docs.iter().filter_map(|(key, _)| key.strip_prefix(&prefix).and_then(ProfileId::parse)).collect())
    }

    /// One page of start-up reconciliation: real-time memberships a stored profile has but no
    /// document records are stored and dispatched as the entries they were (same time, so the
    /// same idempotency key). Returns where the next page starts.
    async fn reconcile(&mut self, after: Option<&ProfileId>) -> Result<Option<ProfileId>, StoreError> {
        let ids = self.args.store.list_profile_ids(after, BACKFILL_PAGE).await?;
        let segments = self.args.registry.snapshot();
        let realtime: Vec<&String> = segments.iter().filter(|(_, s)| s.expr.is_some()).map(|(n, _)| n).collect();
        if realtime.is_empty() {
            return Ok(None);
        }
        let records = self.args.store.load_profiles(&ids).await?;
        let now = Utc::now();
        let mut changes = Vec::new();
        for r in records.iter().filter(|r| r.merged_into.is_none()) {
            let keys: Vec<String> = realtime.iter().map(|n| member_key(n, &r.profile_id)).collect();
            let docs = self.args.store.get_documents(MEMBERS, &keys).await?;
            let mut profile = None;
            for (name, doc) in realtime.iter().zip(docs) {
                // Only entries: a document ahead of a stored profile is the profile's flush
                // lagging (the replay that follows brings the profile up to date), not an exit.
                let change = match (r.segments.get(*name), doc) {
                    (Some(since), None) => Some((Change::Entered, *since)),
                    _ => None,
                };
                if let Some((change, at)) = change {
                    let p = profile.get_or_insert_with(|| Arc::new(activation_profile(r, now))).clone();
                    changes.push(SegmentChanged {
                        profile_id: r.profile_id.clone(),
                        segment: (*name).clone(),
                        change,
                        at,
                        profile: p,
                        caused_at: None,
                        trace: None,
                    });
                }
            }
        }
        if !changes.is_empty() {
            tracing::info!(changes = changes.len(), "segment memberships reconciled with stored profiles");
            self.record(&changes).await?;
        }
        Ok(ids.last().cloned().filter(|_| ids.len() == BACKFILL_PAGE))
    }

    /// A batch segment's SQL must run and return a `profile_id` column, checked on a run that
    /// returns no rows: a definition that never could run is refused when it is given, not
    /// logged later. An unreachable warehouse is `storage unavailable` (try again).
    async fn check_batch_sql(&self, definition: &SegmentDefinition) -> Result<(), String> {
        let Some(sql) = definition.sql.as_deref().filter(|_| definition.kind == SegmentKind::Batch) else {
            return Ok(());
        };
        let warehouse = self.args.warehouse.clone().ok_or("batch segments need a warehouse (warehouse.url)")?;
        // The layers' tables and views exist before the first relay writes to them.
        warehouse
            .ensure_schema()
            .await
            .map_err(|e| format!("storage unavailable: the warehouse did not answer: {e}"))?;
        let probe = format!("SELECT * FROM (\n{}\n) AS candidate LIMIT 0", sql.trim().trim_end_matches(';'));
        match warehouse.query(&probe, &[] as &[(String, QueryValue)]).await {
            Err(e) if e.is_retryable() => Err(format!("storage unavailable: the warehouse did not answer: {e}")),
            Err(e) => Err(format!("the query does not run: {e}")),
            Ok(r) if !r.columns.is_empty() && !r.columns.iter().any(|c| c == "profile_id") => {
                Err(format!("the query must return a profile_id column (it returns {})", r.columns.join(", ")))
            }
            Ok(_) => Ok(()),
        }
    }

    /// Runs a batch segment's SQL and applies the difference with the stored membership.
    async fn run_batch(&mut self, name: &str) -> Result<BatchRun, String> {
        let segments = self.args.registry.snapshot();
        let segment = segments.get(name).ok_or_else(|| format!("no segment {name}"))?;
        let sql = segment.definition.sql.clone().filter(|_| segment.definition.kind == SegmentKind::Batch);
        let sql = sql.ok_or_else(|| format!("{name} is not a batch segment"))?;
        let warehouse = self.args.warehouse.clone().ok_or("batch segments need a warehouse (warehouse.url)")?;
        let result = warehouse.query(&sql, &[] as &[(String, QueryValue)]).await.map_err(|e| e.to_string())?;
        let column = result.column("profile_id").ok_or("the query must return a profile_id column")?;
        let now: BTreeSet<ProfileId> = column.iter().filter_map(|v| v.as_str()).filter_map(ProfileId::parse).collect();
        let before = self.members(name).await.map_err(|e| e.to_string())?;
        let entered: Vec<ProfileId> = now.difference(&before).cloned().collect();
        let exited: Vec<ProfileId> = before.difference(&now).cloned().collect();
        let at = Utc::now();
        let mut changes = Vec::with_capacity(entered.len() + exited.len());
        for chunk in
            entered.chunks(500).map(|c| (c, Change::Entered)).chain(exited.chunks(500).map(|c| (c, Change::Exited)))
        {
            let (ids, change) = chunk;
            let records = self.args.store.load_profiles(ids).await.map_err(|e| e.to_string())?;
            let by_id: HashMap<&ProfileId, &cohort_messages::ProfileRecord> =
                records.iter().map(|r| (&r.profile_id, r)).collect();
            for id in ids {
                let profile = by_id.get(id).map(|r| activation_profile(r, at)).unwrap_or_default();
                changes.push(SegmentChanged {
                    profile_id: id.clone(),
                    segment: name.to_string(),
                    change,
                    at,
                    profile: Arc::new(profile),
                    caused_at: None,
                    trace: None,
                });
            }
        }
        for chunk in changes.chunks(500) {
            self.store_and_publish(chunk).await.map_err(|e| e.to_string())?;
        }
        if let (Some(retl), false) = (self.args.reverse_etl.get(), changes.is_empty()) {
            let _ = retl.send_message(ReverseEtlMsg::DispatchBatch { segment: name.to_string(), changes });
        }
        Ok(BatchRun { members: now.len(), entered: entered.len(), exited: exited.len() })
    }
}

/// The snapshot destinations get of a profile.
pub fn activation_profile(record: &cohort_messages::ProfileRecord, now: DateTime<Utc>) -> ActivationProfile {
    let computed = match serde_json::to_value(super::computed::compute(record, now)) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    ActivationProfile { identifiers: record.identifiers.clone(), traits: record.traits.clone(), computed }
}

impl Actor for SegmentEngine {
    type Msg = SegmentMsg;
    type State = SegmentEngineState;
    type Arguments = SegmentEngineArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<SegmentMsg>,
        args: SegmentEngineArgs,
    ) -> Result<SegmentEngineState, ActorProcessingErr> {
        let mut definitions: BTreeMap<String, SegmentDefinition> =
            args.configured.iter().map(|d| (d.name.clone(), d.clone())).collect();
        definitions
            .extend(stored_definitions(args.store.as_ref()).await?.into_iter().filter_map(|(n, d)| Some((n, d?))));
        for (name, definition) in definitions {
            match Segment::compile(definition, &args.registry.models) {
                Ok(segment) => args.registry.put(segment),
                Err(e) => tracing::error!(segment = %name, error = %e, "segment definition invalid; skipped"),
            }
        }
        Ok(SegmentEngineState {
            args,
            due: BTreeSet::new(),
            scheduled: HashMap::new(),
            unsaved: HashMap::new(),
            batch_timers: HashMap::new(),
            timers: Vec::new(),
            changes: 0,
            backfilling: false,
            backfill_again: false,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<SegmentMsg>,
        state: &mut SegmentEngineState,
    ) -> Result<(), ActorProcessingErr> {
        if let Err(e) = state.load_schedules().await {
            // Without them an idle profile's time-based change waits for its next event.
            tracing::warn!(error = %e, "stored segment schedules not read");
        }
        state.timers.push(myself.send_interval(state.args.tick, || SegmentMsg::Tick));
        if let Some(every) = state.args.refresh {
            state.timers.push(myself.send_interval(every, || SegmentMsg::Refresh));
        }
        myself.send_message(SegmentMsg::Reconcile { after: None })?;
        let batch: Vec<SegmentDefinition> = state
            .args
            .registry
            .snapshot()
            .values()
            .filter(|s| s.definition.kind == SegmentKind::Batch)
            .map(|s| s.definition.clone())
            .collect();
        for d in &batch {
            state.start_batch_timer(&myself, d);
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<SegmentMsg>,
        state: &mut SegmentEngineState,
    ) -> Result<(), ActorProcessingErr> {
        for t in state.timers.drain(..) {
            t.abort();
        }
        state.save_schedules().await;
        for (_, t) in state.batch_timers.drain() {
            t.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<SegmentMsg>,
        msg: SegmentMsg,
        state: &mut SegmentEngineState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SegmentMsg::Changed(changes) => {
                let mut backoff = Duration::from_millis(50);
                // Memberships must not be dropped: hold the engine until the store answers.
                while let Err(e) = state.record(&changes).await {
                    if !e.is_retryable() {
                        tracing::error!(error = %e, "segment memberships not stored");
                        break;
                    }
                    tracing::warn!(error = %e, "segment store unavailable, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
            SegmentMsg::ConsentGranted { profile_id, profile, channels, mut changes } => {
                // Every batch segment, as if entered now: reverse ETL keeps those the profile is
                // a stored member of, with the stored entry time (so the original jobs' keys).
                for segment in state.args.registry.batch_names() {
                    changes.push(SegmentChanged {
                        profile_id: profile_id.clone(),
                        segment,
                        change: Change::Entered,
                        at: Utc::now(),
                        profile: profile.clone(),
                        caused_at: None,
                        trace: None,
                    });
                }
                if let (Some(retl), false) = (state.args.reverse_etl.get(), changes.is_empty()) {
                    let _ = retl.send_message(ReverseEtlMsg::ConsentGranted { channels, changes });
                }
            }
            SegmentMsg::Schedule { profile_id, at } => state.schedule(profile_id, at),
            SegmentMsg::Tick => {
                let now = Utc::now();
                let directory = state.args.directory.get();
                while let Some((at, profile)) = state.due.first().cloned() {
                    if at > now {
                        break;
                    }
                    state.due.remove(&(at, profile.clone()));
                    state.scheduled.remove(&profile);
                    if state.args.erasures.is_erased(&profile) {
                        state.unsaved.insert(profile, None);
                        continue;
                    }
                    // Its stored schedule stays until its actor answers with the next one: a
                    // restart before that fires it again (one more re-evaluation, not a lost one).
                    if let Some(d) = &directory {
                        let _ =
                            d.send_message(ProfilesMsg::Deliver { profile_id: profile, msg: ProfileMsg::Reevaluate });
                    }
                }
                state.save_schedules().await;
            }
            SegmentMsg::Define { definition, reply } => {
                let compiled = match Segment::compile(definition, &state.args.registry.models) {
                    Err(e) => Err(e.to_string()),
                    Ok(segment) => state.check_batch_sql(&segment.definition).await.map(|()| segment),
                };
                let answer = match compiled {
                    Err(e) => Err(e),
                    Ok(segment) => {
                        let d = segment.definition.clone();
                        let doc = serde_json::to_value(&d).map_err(|e| e.to_string());
                        match doc {
                            Err(e) => Err(e),
                            Ok(doc) => match state
                                .args
                                .store
                                .put_documents(DEFINITIONS, vec![(d.name.clone(), Some(doc))])
                                .await
                            {
                                Err(e) => Err(format!("storage unavailable: {e}")),
                                Ok(()) => {
                                    if state.apply(&myself, segment) {
                                        state.request_backfill(&myself)?;
                                    }
                                    if d.kind == SegmentKind::Batch {
                                        myself
                                            .send_message(SegmentMsg::RunBatch { name: d.name.clone(), reply: None })?;
                                    }
                                    Ok(d)
                                }
                            },
                        }
                    }
                };
                let _ = reply.send(answer);
            }
            SegmentMsg::Delete { name, reply } => {
                // Stored first: a deletion the store refused leaves the segment defined here too,
                // where a refresh would otherwise put it back and enter its members again.
                let result = match state.args.store.put_documents(DEFINITIONS, vec![(name.clone(), None)]).await {
                    Ok(()) => state.forget(&name).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(result.map_err(|e| format!("storage unavailable: {e}")));
            }
            SegmentMsg::Backfill { after } => {
                let ids = state.args.store.list_profile_ids(after.as_ref(), BACKFILL_PAGE).await;
                match ids {
                    Ok(ids) => {
                        if let Some(d) = state.args.directory.get() {
                            for id in &ids {
                                let _ = d.send_message(ProfilesMsg::Deliver {
                                    profile_id: id.clone(),
                                    msg: ProfileMsg::Reevaluate,
                                });
                            }
                        }
                        match ids.last() {
                            Some(last) if ids.len() == BACKFILL_PAGE => {
                                myself.send_message(SegmentMsg::Backfill { after: Some(last.clone()) })?
                            }
                            _ if std::mem::take(&mut state.backfill_again) => {
                                myself.send_message(SegmentMsg::Backfill { after: None })?
                            }
                            _ => state.backfilling = false,
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "segment backfill paused; retrying");
                        myself.send_after(Duration::from_secs(1), move || SegmentMsg::Backfill { after });
                    }
                }
            }
            SegmentMsg::Reconcile { after } => match state.reconcile(after.as_ref()).await {
                Ok(Some(last)) => myself.send_message(SegmentMsg::Reconcile { after: Some(last) })?,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "segment reconciliation paused; retrying");
                    myself.send_after(Duration::from_secs(1), move || SegmentMsg::Reconcile { after });
                }
            },
            SegmentMsg::RunBatch { name, reply } => {
                let result = state.run_batch(&name).await;
                if let Err(e) = &result {
                    tracing::warn!(segment = %name, error = %e, "batch segment run failed");
                }
                if let Some(r) = reply {
                    let _ = r.send(result);
                }
            }
            SegmentMsg::RunScheduledBatch { name } => {
                // In a cluster every replica keeps the timer, and one runs it: concurrent runs
                // would enter the same profiles at different times, so under different job keys.
                let store = state.args.store.as_ref();
                if crate::cluster::leads(store, state.args.leader.as_ref(), "batch segment").await {
                    myself.send_message(SegmentMsg::RunBatch { name, reply: None })?;
                }
            }
            SegmentMsg::Refresh => {
                if let Err(e) = state.refresh(&myself).await {
                    tracing::warn!(error = %e, "segment definitions not refreshed; the next interval retries");
                }
            }
            SegmentMsg::Sync(reply) => {
                let _ = reply.send(SegmentStats {
                    defined: state.args.registry.snapshot().len(),
                    scheduled: state.scheduled.len(),
                    changes: state.changes,
                    backfilling: state.backfilling,
                    batch_timers: state.batch_timers.len(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use cohort_adapters::EmbeddedStore;

    #[tokio::test]
    async fn a_stored_definition_this_version_cannot_read_is_listed_as_unreadable_not_missing() {
        let store: Arc<dyn OperationalStore> = EmbeddedStore::in_memory().unwrap();
        let good = json!({ "name": "mba", "rule": r#"page_count("mba", 7d) >= 1"# });
        let newer = json!({ "name": "later", "rule": "1 == 1", "field_from_a_newer_version": true });
        store
            .put_documents(DEFINITIONS, vec![("mba".into(), Some(good)), ("later".into(), Some(newer))])
            .await
            .unwrap();
        let stored = stored_definitions(store.as_ref()).await.unwrap();
        assert_eq!(stored.get("mba").and_then(|d| d.as_ref()).map(|d| d.name.as_str()), Some("mba"));
        // Present but unreadable: a refresh keeps the segment rather than taking it for deleted.
        assert_eq!(stored.get("later").map(Option::is_none), Some(true));
    }
}
