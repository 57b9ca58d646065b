//! Retention: forgets idempotency keys older than the deduplication window and compacts the
//! embedded journal behind the pipeline's checkpoint, so neither grows without bound.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use cohort_adapters::{EventBus, OperationalStore, StoreError};
use cohort_messages::msgs::RetentionMsg;
use cohort_supervisors::Metrics;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::schedule::Schedule;
use crate::watermark::Checkpoints;

pub struct RetentionActor;

pub struct RetentionArgs {
    pub store: Arc<dyn OperationalStore>,
    pub bus: Arc<dyn EventBus>,
    pub checkpoints: Arc<Checkpoints>,
    pub metrics: Metrics,
    /// How long an event id is remembered (and the embedded journal kept).
    pub keep: Duration,
    pub every: Duration,
}

pub struct RetentionState {
    args: RetentionArgs,
    _timer: Schedule,
}

impl Actor for RetentionActor {
    type Msg = RetentionMsg;
    type State = RetentionState;
    type Arguments = RetentionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RetentionMsg>,
        args: RetentionArgs,
    ) -> Result<RetentionState, ActorProcessingErr> {
        let timer = Schedule::every(&myself, args.every, || RetentionMsg::Expire { reply: None });
        Ok(RetentionState { args, _timer: timer })
    }

    async fn handle(
        &self,
        _myself: ActorRef<RetentionMsg>,
        msg: RetentionMsg,
        state: &mut RetentionState,
    ) -> Result<(), ActorProcessingErr> {
        let RetentionMsg::Expire { reply } = msg;
        let result = expire(&state.args).await;
        match &result {
            Ok(n) => tracing::info!(expired = n, "retention pass done"),
            Err(e) => tracing::warn!(error = %e, "retention pass failed; the next one retries"),
        }
        if let Some(reply) = reply {
            let _ = reply.send(result.map_err(|e| e.to_string()));
        }
        Ok(())
    }
}

/// How long event ids are remembered (`retention.idempotency_hours`): the deduplication window.
pub fn idempotency_keep(hours: u64) -> Duration {
    Duration::from_secs(hours.saturating_mul(3600))
}

/// The start of the deduplication window at `now`: ids of events received before it are
/// forgotten, so such an event sent again (a replay) would count a second time.
pub fn dedup_window_start(keep: Duration, now: chrono::DateTime<Utc>) -> chrono::DateTime<Utc> {
    let keep = chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::MAX);
    now.checked_sub_signed(keep).unwrap_or(chrono::DateTime::<Utc>::MIN_UTC)
}

async fn expire(args: &RetentionArgs) -> Result<u64, StoreError> {
    let before = dedup_window_start(args.keep, Utc::now());
    let from_store = args.store.expire_before(before).await?;
    let from_bus = args.bus.apply_retention(before, &args.checkpoints.get()).await?;
    let n = from_store + from_bus;
    args.metrics.idempotency_expired.inc_by(n);
    Ok(n)
}
