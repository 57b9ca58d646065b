//! One ProfileActor per student: the live golden record.

use crate::context::PipelineContext;
use crate::segments::computed::{compute, stable_until};
use crate::segments::engine::activation_profile;
use crate::segments::{evaluate, Evaluation};
use chrono::DateTime;
use chrono::Utc;
use cohort_adapters::{OperationalStore, StoreError};
use cohort_messages::msgs::SegmentMsg;
use cohort_messages::msgs::{ProfileMsg, ProfileRecordReply, ProfileSnapshot, ProfilesMsg, UnmergeReport};
use cohort_messages::profile::ConsentState;
use cohort_messages::segment::{Change, SegmentChanged};
use cohort_messages::{
    Channel, ConsentRecord, CustomerEvent, EventKind, IdentifierKind, ProfileId, ProfileRecord, ProfileView,
    Suppression, SuppressionReason,
};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub struct ProfileActor;

pub struct ProfileArgs {
    pub profile_id: ProfileId,
    pub ctx: PipelineContext,
    pub directory: ActorRef<ProfilesMsg>,
    /// The seq being applied right now (0 when idle), read by the directory after a crash to
    /// find the poison event.
    pub in_progress: Arc<AtomicU64>,
}

pub struct ProfileState {
    profile_id: ProfileId,
    /// When the segment engine was last asked to re-evaluate this profile.
    next_evaluation: Option<DateTime<Utc>>,
    /// `None` until the first event creates the profile.
    record: Option<ProfileRecord>,
    ctx: PipelineContext,
    directory: ActorRef<ProfilesMsg>,
    in_progress: Arc<AtomicU64>,
    /// `GetViewJson`'s last answer and the instant it stops being exact; any message that may
    /// change the record drops it.
    view_json: Option<(bytes::Bytes, DateTime<Utc>)>,
}

/// The Profile API's view at `now`, computed traits included.
fn view_at(record: &ProfileRecord, now: DateTime<Utc>) -> ProfileView {
    let mut view = record.view();
    if let Ok(serde_json::Value::Object(m)) = serde_json::to_value(compute(record, now)) {
        view.computed = m;
    }
    view
}

impl ProfileState {
    /// `GetViewJson`: the cached body while it is exact, else a fresh one (then cached). A
    /// body is only cached for a live record, and every message that could change that drops it.
    fn view_json(&mut self) -> Option<ProfileRecordReply<bytes::Bytes>> {
        let now = Utc::now();
        if let Some((json, _)) = self.view_json.as_ref().filter(|(_, until)| now < *until) {
            return Some(ProfileRecordReply::Found(json.clone()));
        }
        match self.reply(|r| (serde_json::to_vec(&view_at(r, now)), stable_until(r, now))) {
            ProfileRecordReply::Found((Ok(body), until)) => {
                let body = bytes::Bytes::from(body);
                self.view_json = Some((body.clone(), until));
                Some(ProfileRecordReply::Found(body))
            }
            ProfileRecordReply::Found((Err(e), _)) => {
                tracing::error!(profile_id = %self.profile_id, error = %e, "profile view did not encode");
                None
            }
            ProfileRecordReply::MergedInto(s) => Some(ProfileRecordReply::MergedInto(s)),
            ProfileRecordReply::NotFound => Some(ProfileRecordReply::NotFound),
        }
    }

    fn reply<T>(&self, f: impl FnOnce(&ProfileRecord) -> T) -> ProfileRecordReply<T> {
        match &self.record {
            None => ProfileRecordReply::NotFound,
            Some(r) => match &r.merged_into {
                Some(s) => ProfileRecordReply::MergedInto(s.clone()),
                None => ProfileRecordReply::Found(f(r)),
            },
        }
    }

    /// Where messages for a merged profile go instead.
    fn survivor(&self) -> Option<ProfileId> {
        self.record.as_ref().and_then(|r| r.merged_into.clone())
    }

    fn forward(&self, to: ProfileId, msg: ProfileMsg) -> Result<(), ActorProcessingErr> {
        if let Some(outbound) = &self.ctx.outbound {
            // Cluster mode: through the profile's partition, queued before this actor answers
            // its next snapshot request, so the flush that covers the cause also sends this.
            if let Some(routed) = cohort_messages::cluster::RoutedChange::of(&to, &msg) {
                outbound.lock().push(routed.forwarded());
                return Ok(());
            }
        }
        let from = self.profile_id.clone();
        self.directory.send_message(ProfilesMsg::Forward { from, profile_id: to, msg })?;
        Ok(())
    }

    /// In cluster mode a change with a reply for a merged profile is answered with the survivor
    /// (`None` here): sent on, it could only reach the survivor through this replica's
    /// directory, which holds a read-only copy when the survivor's partition is another
    /// replica's, and the caller would hear "done" for a change no flush stores. The caller
    /// asks where the survivor lives instead. Otherwise the reply goes on with the change.
    fn answer_merged<T>(
        &self,
        survivor: &ProfileId,
        reply: Option<ractor::RpcReplyPort<ProfileRecordReply<T>>>,
    ) -> Option<Option<ractor::RpcReplyPort<ProfileRecordReply<T>>>> {
        match reply {
            Some(reply) if self.ctx.outbound.is_some() => {
                let _ = reply.send(ProfileRecordReply::MergedInto(survivor.clone()));
                None
            }
            reply => Some(reply),
        }
    }

    /// After a consent grant on `channels`: the memberships the profile had before the change
    /// and still has after evaluating it, offered to reverse ETL again, since an `enter`
    /// activation skipped for want of consent is not retried by itself. Segments entered by the
    /// same change went out through `evaluate_segments` as usual.
    fn offer_memberships_again(&self, before: &BTreeMap<String, DateTime<Utc>>, channels: Vec<Channel>) {
        if channels.is_empty() {
            return;
        }
        let Some(record) = self.record.as_ref().filter(|r| r.merged_into.is_none()) else { return };
        let kept: Vec<(&String, &DateTime<Utc>)> =
            record.segments.iter().filter(|(s, _)| before.contains_key(*s)).collect();
        // Batch memberships are not in the record: the engine looks them up.
        if kept.is_empty() && !self.ctx.segments.has_batch() {
            return;
        }
        let Some(engine) = self.ctx.segment_engine.get() else { return };
        let profile = Arc::new(activation_profile(record, Utc::now()));
        let changes = kept
            .into_iter()
            .map(|(segment, since)| SegmentChanged {
                profile_id: self.profile_id.clone(),
                segment: segment.clone(),
                change: Change::Entered,
                at: *since,
                profile: profile.clone(),
                caused_at: None,
                trace: None,
            })
            .collect();
        let _ = engine.send_message(SegmentMsg::ConsentGranted {
            profile_id: self.profile_id.clone(),
            profile,
            channels,
            changes,
        });
    }

    /// Re-evaluates the real-time segments after a change and reports entries, exits and when
    /// a window will slide next to the segment engine.
    fn evaluate_segments(&mut self, caused_at: Option<DateTime<Utc>>, trace: Option<String>) {
        let registry = self.ctx.segments.clone();
        let Some(record) = self.record.as_mut() else { return };
        if record.segments.is_empty() && !registry.has_realtime() {
            return;
        }
        let Some(engine) = self.ctx.segment_engine.get() else { return };
        let now = Utc::now();
        let evaluation = if record.merged_into.is_some() {
            // A merged profile is in no segment: the survivor is.
            let exited = std::mem::take(&mut record.segments).into_keys().collect();
            Evaluation { exited, ..Evaluation::default() }
        } else {
            self.ctx.metrics.segment_evaluations.inc();
            evaluate(record, &registry, now)
        };
        if !evaluation.entered.is_empty() || !evaluation.exited.is_empty() {
            let profile = Arc::new(activation_profile(record, now));
            let changes = evaluation
                .entered
                .iter()
                .map(|s| (s, Change::Entered))
                .chain(evaluation.exited.iter().map(|s| (s, Change::Exited)))
                .map(|(segment, change)| SegmentChanged {
                    profile_id: self.profile_id.clone(),
                    segment: segment.clone(),
                    change,
                    at: now,
                    profile: profile.clone(),
                    caused_at,
                    trace: trace.clone(),
                })
                .collect();
            let _ = engine.send_message(SegmentMsg::Changed(changes));
        }
        if evaluation.next_change != self.next_evaluation {
            self.next_evaluation = evaluation.next_change;
            let _ = engine
                .send_message(SegmentMsg::Schedule { profile_id: self.profile_id.clone(), at: evaluation.next_change });
        }
    }
}

/// Writes the consent decisions that changed: channel consents to the consent store (what
/// reverse ETL checks) and every change to the history (`consent_history`).
async fn store_consents(
    ctx: &PipelineContext,
    profile: &ProfileId,
    before: &BTreeMap<String, ConsentState>,
    record: &ProfileRecord,
) -> Result<(), StoreError> {
    let mut consents = Vec::new();
    let mut history = Vec::new();
    for (key, state) in &record.consent {
        if before.get(key) == Some(state) {
            continue;
        }
        let doc = serde_json::to_value(state).map_err(|e| StoreError::invalid(format!("encoding consent: {e}")))?;
        history.push((consent_history_key(profile, key, state.at), Some(doc)));
        if let Some(channel) = Channel::ALL.into_iter().find(|c| c.as_str() == key) {
            consents.push(ConsentRecord {
                profile_id: profile.clone(),
                purpose: "marketing".into(),
                channel,
                granted: state.granted,
                source: state.source.clone(),
                recorded_at: state.at,
            });
        }
    }
    if !history.is_empty() {
        ctx.store.put_documents(CONSENT_HISTORY, history).await?;
    }
    if !consents.is_empty() {
        ctx.store.record_consents(consents).await?;
    }
    Ok(())
}

/// The channels whose marketing consent went from not given (or refused) to granted.
fn granted_channels(before: &BTreeMap<String, ConsentState>, after: &BTreeMap<String, ConsentState>) -> Vec<Channel> {
    Channel::ALL
        .into_iter()
        .filter(|c| {
            let key = c.as_str();
            after.get(key).is_some_and(|s| s.granted) && !before.get(key).is_some_and(|s| s.granted)
        })
        .collect()
}

/// Every consent decision, kept (`profile/key/time`).
pub const CONSENT_HISTORY: &str = "consent_history";

pub fn consent_history_key(profile: &ProfileId, key: &str, at: DateTime<Utc>) -> String {
    format!("{profile}/{key}/{:020}", at.timestamp_micros().max(0))
}

/// Consent and suppression changes an event states are written to the store at once, before
/// anything can be sent on their evidence: reverse ETL checks the store at send time.
async fn record_consent_effects(
    ctx: &PipelineContext,
    profile: &ProfileId,
    before: &BTreeMap<String, ConsentState>,
    record: &ProfileRecord,
    event: &CustomerEvent,
) -> Result<(), StoreError> {
    store_consents(ctx, profile, before, record).await?;
    let reason = match (event.kind, event.name.as_deref()) {
        (EventKind::EmailActivity, Some("bounce" | "dropped")) => Some((Channel::Email, SuppressionReason::Bounce)),
        (EventKind::EmailActivity, Some("spamreport")) => Some((Channel::Email, SuppressionReason::SpamReport)),
        (EventKind::EmailActivity, Some("unsubscribe" | "group_unsubscribe")) => {
            Some((Channel::Email, SuppressionReason::Unsubscribe))
        }
        (EventKind::MessageReceived, _)
            if event.properties.get("consent_change").and_then(|c| c.get("status")).and_then(|s| s.as_str())
                == Some("opted_out") =>
        {
            Some((Channel::Whatsapp, SuppressionReason::Unsubscribe))
        }
        _ => None,
    };
    if let Some((channel, reason)) = reason {
        let kinds: &[IdentifierKind] = match channel {
            Channel::Email => &[IdentifierKind::Email],
            _ => &[IdentifierKind::WhatsappId, IdentifierKind::Phone],
        };
        let entries: Vec<Suppression> = event
            .identifiers
            .iter()
            .filter(|i| kinds.contains(&i.kind))
            .map(|i| Suppression { channel, address: i.value.clone(), reason, since: event.occurred_at })
            .collect();
        if !entries.is_empty() {
            ctx.store.suppress(entries).await?;
        }
    }
    Ok(())
}

impl Actor for ProfileActor {
    type Msg = ProfileMsg;
    type State = ProfileState;
    type Arguments = ProfileArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<ProfileMsg>,
        args: ProfileArgs,
    ) -> Result<ProfileState, ActorProcessingErr> {
        // In cluster mode the resolver that created it may run on another replica.
        let record = if args.ctx.ownership.is_none() && args.ctx.index.take_created(&args.profile_id) {
            None
        } else {
            args.ctx.store.load_profile(&args.profile_id).await?
        };
        Ok(ProfileState {
            next_evaluation: None,
            profile_id: args.profile_id,
            record,
            ctx: args.ctx,
            directory: args.directory,
            in_progress: args.in_progress,
            view_json: None,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<ProfileMsg>,
        msg: ProfileMsg,
        state: &mut ProfileState,
    ) -> Result<(), ActorProcessingErr> {
        let read_only = matches!(
            msg,
            ProfileMsg::GetView(_)
                | ProfileMsg::GetViewJson(_)
                | ProfileMsg::GetEvents { .. }
                | ProfileMsg::GetIdentities(_)
        );
        if !read_only {
            state.view_json = None;
        }
        match msg {
            ProfileMsg::Apply { seq, event } => {
                if let Some(survivor) = state.survivor() {
                    return state.forward(survivor, ProfileMsg::Apply { seq, event });
                }
                state.in_progress.store(seq, Ordering::SeqCst);
                // Tracing: this update continues the event's trace; what it triggers, this one.
                let span = tracing::debug_span!("profile.apply", seq);
                crate::trace::continue_from(&span, event.trace.as_deref());
                let trace = event.trace.as_ref().and_then(|_| crate::trace::of(&span));
                if let Some(fault) = &state.ctx.fault {
                    fault.before_apply(&state.profile_id, &event);
                }
                let limit = state.ctx.profiles.history_limit;
                let record =
                    state.record.get_or_insert_with(|| ProfileRecord::new(state.profile_id.clone(), event.received_at));
                let consent_before = record.consent.clone();
                if record.apply(seq, &event, limit) {
                    let latency = (Utc::now() - event.received_at).to_std().unwrap_or_default();
                    state.ctx.metrics.event_to_profile_latency.observe(latency.as_secs_f64());
                    record.trim_ledger(state.ctx.profiles.unmerge_window, limit);
                    let changed = record.consent != consent_before
                        || event.kind == EventKind::EmailActivity
                        || event.properties.contains_key("consent_change");
                    if changed {
                        let effects =
                            record_consent_effects(&state.ctx, &state.profile_id, &consent_before, record, &event)
                                .await;
                        if let Err(e) = effects {
                            if e.is_retryable() {
                                // The store failed, not the event: the restart delivers it again
                                // without counting an attempt towards dead-lettering it.
                                state.in_progress.store(0, Ordering::SeqCst);
                            }
                            return Err(e.into());
                        }
                    }
                    let granted = granted_channels(&consent_before, &record.consent);
                    // Only a grant needs them (an event rarely carries one).
                    let segments_before = if granted.is_empty() { BTreeMap::new() } else { record.segments.clone() };
                    state.evaluate_segments(Some(event.received_at), trace);
                    state.offer_memberships_again(&segments_before, granted);
                }
                state.in_progress.store(0, Ordering::SeqCst);
            }
            ProfileMsg::MergeInto { survivor } => {
                if let Some(current) = state.survivor() {
                    if current != survivor {
                        // Already merged elsewhere: let our survivor merge with theirs.
                        let (a, b) = if current < survivor { (current, survivor) } else { (survivor, current) };
                        state.forward(b, ProfileMsg::MergeInto { survivor: a })?;
                    }
                    return Ok(());
                }
                if survivor == state.profile_id {
                    return Ok(());
                }
                if let Some(record) = state.record.as_mut() {
                    record.merged_into = Some(survivor.clone());
                    state.evaluate_segments(None, None);
                    if let Some(record) = state.record.as_mut() {
                        record.merged_into = None;
                    }
                }
                let now = Utc::now();
                let mut stub = ProfileRecord::new(state.profile_id.clone(), now);
                stub.merged_into = Some(survivor.clone());
                match state.record.replace(stub) {
                    Some(mut full) => {
                        if let Some(stub) = state.record.as_mut() {
                            stub.created_at = full.created_at;
                            stub.identifiers = full.identifiers.clone();
                        }
                        full.merged_into = None;
                        state.forward(survivor, ProfileMsg::Absorb { record: Box::new(full) })?;
                    }
                    None => {
                        // The merged profile had no state yet; only the redirect remains.
                    }
                }
            }
            ProfileMsg::BeginMerge { merged } => {
                if let Some(survivor) = state.survivor() {
                    return state.forward(survivor, ProfileMsg::BeginMerge { merged });
                }
                if let Some(record) = state.record.as_mut() {
                    record.begin_merge(&merged);
                }
            }
            ProfileMsg::Absorb { record } => {
                if let Some(survivor) = state.survivor() {
                    return state.forward(survivor, ProfileMsg::Absorb { record });
                }
                let limit = state.ctx.profiles.history_limit;
                let created = record.created_at;
                let merged = record.profile_id.clone();
                let own = state.record.get_or_insert_with(|| ProfileRecord::new(state.profile_id.clone(), created));
                let segments_before = own.segments.clone();
                if own.absorb(*record, limit) {
                    own.trim_ledger(state.ctx.profiles.unmerge_window, limit);
                }
                // Idempotent, so a re-delivered Absorb after a restart repeats it harmlessly.
                let granted = merge_consents(state.ctx.store.as_ref(), &state.profile_id, &merged).await?;
                state.evaluate_segments(None, None);
                state.offer_memberships_again(&segments_before, granted);
            }
            ProfileMsg::Unmerge { merged, reply } => {
                if let Some(survivor) = state.survivor() {
                    let Some(reply) = state.answer_merged(&survivor, reply) else { return Ok(()) };
                    return state.forward(survivor, ProfileMsg::Unmerge { merged, reply });
                }
                let limit = state.ctx.profiles.history_limit;
                let outcome = state.record.as_ref().map(|r| r.unmerge(&merged, limit, Utc::now()));
                let answer = match outcome {
                    None => ProfileRecordReply::NotFound,
                    Some(Err(e)) => ProfileRecordReply::Found(Err(e)),
                    Some(Ok(split)) => {
                        let report = UnmergeReport {
                            survivor: state.profile_id.clone(),
                            restored: merged.clone(),
                            survivor_events: split.survivor.counters.events_total,
                            restored_events: split.restored.counters.events_total,
                            restored_identifiers: split
                                .restored
                                .identifiers
                                .iter()
                                .map(|l| l.identifier.clone())
                                .collect(),
                        };
                        // Sent before the graph changes, so events resolved to the restored
                        // profile afterwards reach it after its state.
                        state.forward(
                            merged.clone(),
                            ProfileMsg::Restore {
                                record: Box::new(split.restored.clone()),
                                from: state.profile_id.clone(),
                            },
                        )?;
                        state.ctx.index.unmerge(&split.survivor, &split.restored);
                        state.ctx.metrics.identity_unmerges.inc();
                        tracing::info!(survivor = %state.profile_id, restored = %merged, "profiles unmerged");
                        state.record = Some(split.survivor);
                        state.evaluate_segments(None, None);
                        ProfileRecordReply::Found(Ok(report))
                    }
                };
                if let Some(reply) = reply {
                    let _ = reply.send(answer);
                }
            }
            ProfileMsg::Restore { record, from } => {
                let redirects_to_from = state.record.as_ref().is_some_and(|r| r.merged_into.as_ref() == Some(&from));
                if redirects_to_from {
                    state.record = Some(*record);
                    state.evaluate_segments(None, None);
                }
            }
            ProfileMsg::SetConsent { decisions, at, reply } => {
                if let Some(survivor) = state.survivor() {
                    let Some(reply) = state.answer_merged(&survivor, reply) else { return Ok(()) };
                    return state.forward(survivor, ProfileMsg::SetConsent { decisions, at, reply });
                }
                let Some(record) = state.record.as_mut() else {
                    if let Some(r) = reply {
                        let _ = r.send(ProfileRecordReply::NotFound);
                    }
                    return Ok(());
                };
                let before = record.consent.clone();
                for d in &decisions {
                    record.set_consent(&d.key, d.granted, &d.source, &d.legal_basis, at);
                }
                let record_now = record.clone();
                store_consents(&state.ctx, &state.profile_id, &before, &record_now).await?;
                let granted = granted_channels(&before, &record_now.consent);
                state.evaluate_segments(None, None);
                state.offer_memberships_again(&record_now.segments, granted);
                if let Some(r) = reply {
                    let _ = r.send(ProfileRecordReply::Found(record_now.consent));
                }
            }
            ProfileMsg::Reevaluate => {
                if let Some(survivor) = state.survivor() {
                    return state.forward(survivor, ProfileMsg::Reevaluate);
                }
                // The engine dropped the schedule that brought us here: whatever comes next is new.
                state.next_evaluation = None;
                state.evaluate_segments(None, None);
            }
            ProfileMsg::GetView(reply) => {
                let _ = reply.send(state.reply(|r| view_at(r, Utc::now())));
            }
            ProfileMsg::GetViewJson(reply) => {
                // Without an answer the caller sees the port dropped (503), never a wrong body.
                if let Some(answer) = state.view_json() {
                    let _ = reply.send(answer);
                }
            }
            ProfileMsg::GetEvents { offset, after, limit, reply } => {
                let _ = reply.send(state.reply(|r| {
                    let start = match &after {
                        None => offset,
                        // After the cursor's event; if it left the history, after its time.
                        Some(cursor) => match r.recent_events.iter().position(|e| e.event_id == cursor.1) {
                            Some(i) => i + 1,
                            None => r.recent_events.iter().position(|e| e.occurred_at < cursor.0).unwrap_or(usize::MAX),
                        },
                    };
                    r.recent_events.iter().skip(start).take(limit).cloned().collect()
                }));
            }
            ProfileMsg::GetIdentities(reply) => {
                let _ = reply.send(state.reply(|r| r.identifiers.clone()));
            }
            ProfileMsg::TakeSnapshot(reply) => {
                if let Some(r) = state.record.as_mut() {
                    // Positions covered by a durable checkpoint are never replayed again.
                    let checkpoints = &state.ctx.checkpoints;
                    r.applied_seqs.retain(|p| !checkpoints.covers(*p));
                }
                let _ = reply.send(ProfileSnapshot { record: state.record.clone() });
            }
        }
        Ok(())
    }
}

/// Consent after a merge is the most restrictive of the two profiles' (architecture brief): a
/// refusal on either side wins; a decision only one side made carries over. Written under the
/// survivor; the merged profile keeps its own decisions (an unmerge restores them unchanged, and
/// never loosens the survivor's).
/// Returns the channels of the grants that carried over (the survivor had made no decision).
async fn merge_consents(
    store: &dyn OperationalStore,
    survivor: &ProfileId,
    merged: &ProfileId,
) -> Result<Vec<Channel>, StoreError> {
    let theirs = store.consents(merged).await?;
    if theirs.is_empty() {
        return Ok(Vec::new());
    }
    let ours: BTreeMap<(String, &'static str), ConsentRecord> =
        store.consents(survivor).await?.into_iter().map(|c| ((c.purpose.clone(), c.channel.as_str()), c)).collect();
    let mut changes = Vec::new();
    for c in theirs {
        let stricter = match ours.get(&(c.purpose.clone(), c.channel.as_str())) {
            None => true,
            Some(own) => own.granted && !c.granted,
        };
        if stricter {
            changes.push(ConsentRecord { profile_id: survivor.clone(), source: format!("merge:{}", c.source), ..c });
        }
    }
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    let granted = changes.iter().filter(|c| c.granted && c.purpose == "marketing").map(|c| c.channel).collect();
    store.record_consents(changes).await?;
    Ok(granted)
}
