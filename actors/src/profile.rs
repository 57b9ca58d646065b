//! One ProfileActor per student: the live golden record.

use crate::context::PipelineContext;
use chrono::Utc;
use cohort_messages::msgs::{ProfileMsg, ProfileRecordReply, ProfileSnapshot, ProfilesMsg};
use cohort_messages::{ProfileId, ProfileRecord};
use ractor::{Actor, ActorProcessingErr, ActorRef};
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
    /// `None` until the first event creates the profile.
    record: Option<ProfileRecord>,
    ctx: PipelineContext,
    directory: ActorRef<ProfilesMsg>,
    in_progress: Arc<AtomicU64>,
}

impl ProfileState {
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
        self.directory.send_message(ProfilesMsg::Deliver { profile_id: to, msg })?;
        Ok(())
    }
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
        let record = if args.ctx.index.take_created(&args.profile_id) {
            None
        } else {
            args.ctx.store.load_profile(&args.profile_id).await?
        };
        Ok(ProfileState {
            profile_id: args.profile_id,
            record,
            ctx: args.ctx,
            directory: args.directory,
            in_progress: args.in_progress,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<ProfileMsg>,
        msg: ProfileMsg,
        state: &mut ProfileState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ProfileMsg::Apply { seq, event } => {
                if let Some(survivor) = state.survivor() {
                    return state.forward(survivor, ProfileMsg::Apply { seq, event });
                }
                state.in_progress.store(seq, Ordering::SeqCst);
                if let Some(fault) = &state.ctx.fault {
                    fault.before_apply(&state.profile_id, &event);
                }
                let limit = state.ctx.profiles.history_limit;
                let record =
                    state.record.get_or_insert_with(|| ProfileRecord::new(state.profile_id.clone(), event.received_at));
                if record.apply(seq, &event, limit) {
                    let latency = (Utc::now() - event.received_at).to_std().unwrap_or_default();
                    state.ctx.metrics.event_to_profile_latency.observe(latency.as_secs_f64());
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
            ProfileMsg::Absorb { record } => {
                if let Some(survivor) = state.survivor() {
                    return state.forward(survivor, ProfileMsg::Absorb { record });
                }
                let limit = state.ctx.profiles.history_limit;
                let created = record.created_at;
                let own = state.record.get_or_insert_with(|| ProfileRecord::new(state.profile_id.clone(), created));
                own.absorb(*record, limit);
            }
            ProfileMsg::GetView(reply) => {
                let _ = reply.send(state.reply(|r| r.view()));
            }
            ProfileMsg::GetEvents { offset, limit, reply } => {
                let _ = reply.send(state.reply(|r| r.recent_events.iter().skip(offset).take(limit).cloned().collect()));
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
