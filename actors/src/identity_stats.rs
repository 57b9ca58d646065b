//! Counts how many live profiles are tied to a known person: the identity match rate of slide 19.
//! A scan of the store on a schedule (and on request), so the figure covers every profile, not
//! only those this process has seen.

use std::sync::Arc;
use std::time::Duration;

use crate::schedule::Schedule;
use chrono::Utc;
use cohort_adapters::{OperationalStore, StoreError};
use cohort_messages::msgs::{IdentityStats, IdentityStatsMsg};
use cohort_messages::{IdentifierKind, ProfileId};
use cohort_supervisors::Metrics;
use ractor::{Actor, ActorProcessingErr, ActorRef};

/// Profiles read per store call.
const PAGE: usize = 500;

/// Identifiers that name a person rather than a browser, device or visit.
fn is_known(kind: IdentifierKind) -> bool {
    matches!(
        kind,
        IdentifierKind::Email
            | IdentifierKind::Phone
            | IdentifierKind::UserId
            | IdentifierKind::SalesforceId
            | IdentifierKind::WhatsappId
    )
}

pub struct IdentityStatsActor;

pub struct IdentityStatsArgs {
    pub store: Arc<dyn OperationalStore>,
    pub metrics: Metrics,
    pub every: Duration,
}

pub struct IdentityStatsState {
    args: IdentityStatsArgs,
    latest: Option<IdentityStats>,
    _timer: Schedule,
}

impl Actor for IdentityStatsActor {
    type Msg = IdentityStatsMsg;
    type State = IdentityStatsState;
    type Arguments = IdentityStatsArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<IdentityStatsMsg>,
        args: IdentityStatsArgs,
    ) -> Result<IdentityStatsState, ActorProcessingErr> {
        let timer = Schedule::every(&myself, args.every, || IdentityStatsMsg::Compute { reply: None });
        Ok(IdentityStatsState { args, latest: None, _timer: timer })
    }

    async fn handle(
        &self,
        _myself: ActorRef<IdentityStatsMsg>,
        msg: IdentityStatsMsg,
        state: &mut IdentityStatsState,
    ) -> Result<(), ActorProcessingErr> {
        let (reply, fresh) = match msg {
            IdentityStatsMsg::Compute { reply } => (reply, true),
            IdentityStatsMsg::GetLatest(reply) => (Some(reply), false),
        };
        let result = match (&state.latest, fresh) {
            (Some(latest), false) => Ok(latest.clone()),
            _ => match count(&state.args).await {
                Ok(stats) => {
                    state.latest = Some(stats.clone());
                    Ok(stats)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "identity statistics not computed; the next run retries");
                    Err(e.to_string())
                }
            },
        };
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
        Ok(())
    }
}

async fn count(args: &IdentityStatsArgs) -> Result<IdentityStats, StoreError> {
    let (mut live, mut merged, mut known) = (0u64, 0u64, 0u64);
    let mut after: Option<ProfileId> = None;
    loop {
        let ids = args.store.list_profile_ids(after.as_ref(), PAGE).await?;
        let Some(last) = ids.last().cloned() else { break };
        for record in args.store.load_profiles(&ids).await? {
            if record.merged_into.is_some() {
                merged += 1;
                continue;
            }
            live += 1;
            if record.identifiers.iter().any(|i| is_known(i.identifier.kind)) {
                known += 1;
            }
        }
        if ids.len() < PAGE {
            break;
        }
        after = Some(last);
    }
    let match_rate = if live == 0 { 0.0 } else { known as f64 / live as f64 };
    let m = &args.metrics;
    m.identity_match_rate.set(match_rate);
    m.profiles_live.set(i64::try_from(live).unwrap_or(i64::MAX));
    m.profiles_known.set(i64::try_from(known).unwrap_or(i64::MAX));
    Ok(IdentityStats {
        live_profiles: live,
        merged_profiles: merged,
        known_profiles: known,
        match_rate,
        computed_at: Utc::now(),
    })
}
