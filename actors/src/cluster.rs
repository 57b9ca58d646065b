//! Cluster membership: every replica writes a heartbeat record to the shared store, so peers
//! (and operators, through `GET /v1/cluster`) know who is alive, where to reach them and which
//! bus partitions they consume. A replica that stops removes its record; one that dies stops
//! beating and is considered gone after `cluster.member_ttl_secs`.

use chrono::{DateTime, Utc};
use cohort_adapters::{all_documents, EventBus, OperationalStore, StoreError};
use cohort_messages::cluster::{MemberRecord, MembershipMsg, MEMBERS};
use cohort_supervisors::{HealthRegistry, Metrics};
use ractor::{Actor, ActorProcessingErr, ActorRef};
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
}

impl MembershipSettings {
    pub fn ttl(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.ttl).unwrap_or(chrono::Duration::MAX)
    }
}

pub struct MembershipActor;

pub struct MembershipArgs {
    pub store: Arc<dyn OperationalStore>,
    pub bus: Arc<dyn EventBus>,
    pub health: HealthRegistry,
    pub metrics: Metrics,
    pub settings: MembershipSettings,
}

pub struct MembershipState {
    args: MembershipArgs,
    started_at: DateTime<Utc>,
    _timer: Schedule,
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
        }
    }

    async fn beat(&self) -> Result<(), StoreError> {
        let record = self.record();
        let value = serde_json::to_value(&record).map_err(|e| StoreError::invalid(e.to_string()))?;
        self.args.store.put_documents(MEMBERS, vec![(record.name, Some(value))]).await
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
        Ok(MembershipState { args, started_at: Utc::now(), _timer: timer })
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
        let MembershipMsg::Beat = msg;
        match state.beat().await {
            Ok(()) => state.args.metrics.cluster_heartbeats.with_label_values(&["ok"]).inc(),
            Err(e) => {
                state.args.metrics.cluster_heartbeats.with_label_values(&["failed"]).inc();
                tracing::warn!(error = %e, "cluster heartbeat failed; peers see this replica go stale");
            }
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
