//! A supervisor of a fixed set of children, each restarted under the same policy.

use crate::health::{ChildStatus, HealthRegistry};
use crate::metrics::Metrics;
use crate::policy::{RestartDecision, RestartPolicy, RestartTracker};
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SpawnErr, SupervisionEvent};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

pub type SpawnFuture = Pin<Box<dyn Future<Output = Result<ActorCell, SpawnErr>> + Send>>;

/// How to (re)start one child: the spawn function links the child to the supervisor cell it is
/// given and publishes its new address (see [`crate::Slot`]).
#[derive(Clone)]
pub struct ChildSpec {
    pub name: String,
    pub kind: String,
    pub spawn: Arc<dyn Fn(ActorCell) -> SpawnFuture + Send + Sync>,
}

impl std::fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildSpec").field("name", &self.name).field("kind", &self.kind).finish()
    }
}

impl ChildSpec {
    pub fn new<F, Fut>(name: impl Into<String>, kind: impl Into<String>, spawn: F) -> Self
    where
        F: Fn(ActorCell) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<ActorCell, SpawnErr>> + Send + 'static,
    {
        Self { name: name.into(), kind: kind.into(), spawn: Arc::new(move |sup| Box::pin(spawn(sup))) }
    }
}

/// Which children restart when one fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Only the failed child (independent children, e.g. the per-source ingest actors).
    OneForOne,
    /// All children, in order (children that share in-memory state, e.g. the pipeline whose
    /// dispatcher must replay from the checkpoint whenever a downstream stage lost its queue).
    OneForAll,
}

#[derive(Clone)]
pub struct SupervisorArgs {
    /// This supervisor's path in the tree, e.g. `root/ingest`.
    pub path: String,
    pub strategy: Strategy,
    pub policy: RestartPolicy,
    pub children: Vec<ChildSpec>,
    pub health: HealthRegistry,
    pub metrics: Metrics,
}

pub struct SupervisorState {
    args: SupervisorArgs,
    running: HashMap<ActorId, String>,
    trackers: HashMap<String, RestartTracker>,
}

#[derive(Debug)]
pub enum SupervisorMsg {
    /// Start a child again once its backoff has passed (internal timer).
    RestartChild { name: String },
    /// Start every child again, in order (one-for-all).
    RestartAll,
}

/// Supervises static children with a restart policy; escalates by failing itself.
pub struct SupervisorActor;

impl SupervisorState {
    fn spec(&self, name: &str) -> Option<ChildSpec> {
        self.args.children.iter().find(|c| c.name == name).cloned()
    }

    fn child_path(&self, name: &str) -> String {
        format!("{}/{}", self.args.path, name)
    }

    async fn start_child(&mut self, myself: &ActorRef<SupervisorMsg>, spec: &ChildSpec) -> Result<(), SpawnErr> {
        let path = self.child_path(&spec.name);
        self.args.health.set_status(&path, &spec.kind, ChildStatus::Starting);
        let cell = (spec.spawn)(myself.get_cell()).await?;
        self.running.insert(cell.get_id(), spec.name.clone());
        self.args.health.set_status(&path, &spec.kind, ChildStatus::Running);
        Ok(())
    }

    /// Stops the siblings of a failed child (one-for-all); their exits are expected, not failures.
    async fn stop_all_children(&mut self, myself: &ActorRef<SupervisorMsg>) {
        self.running.clear();
        for spec in &self.args.children {
            let path = self.child_path(&spec.name);
            self.args.health.set_status(&path, &spec.kind, ChildStatus::Restarting);
        }
        myself.stop_children_and_wait(Some("sibling failed, restarting all".into()), None).await;
    }

    /// Applies the restart policy to a child that went down.
    async fn child_down(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        name: String,
        reason: String,
    ) -> Result<(), ActorProcessingErr> {
        let Some(spec) = self.spec(&name) else { return Ok(()) };
        let path = self.child_path(&name);
        self.args.health.record_failure(&path, &spec.kind, &reason);
        tracing::warn!(child = %path, kind = %spec.kind, reason = %reason, "supervised child failed");
        let key = match self.args.strategy {
            Strategy::OneForOne => name.clone(),
            Strategy::OneForAll => String::from("*"),
        };
        let tracker = self.trackers.entry(key).or_default();
        match tracker.decide(&self.args.policy, Instant::now()) {
            RestartDecision::Restart { after, attempt } => {
                tracing::info!(child = %path, attempt, backoff_ms = after.as_millis() as u64, "restarting child");
                match self.args.strategy {
                    Strategy::OneForOne => {
                        myself.send_after(after, move || SupervisorMsg::RestartChild { name });
                    }
                    Strategy::OneForAll => {
                        self.stop_all_children(myself).await;
                        myself.send_after(after, || SupervisorMsg::RestartAll);
                    }
                }
                Ok(())
            }
            RestartDecision::Escalate => {
                self.args.health.set_status(&path, &spec.kind, ChildStatus::Failed);
                self.args.metrics.actor_escalations.with_label_values(&[spec.kind.as_str()]).inc();
                tracing::error!(child = %path, kind = %spec.kind, "restart budget exhausted, escalating");
                myself.stop_children_and_wait(Some("supervisor escalating".into()), None).await;
                Err(format!("child {path} exceeded its restart budget: {reason}").into())
            }
        }
    }
}

impl Actor for SupervisorActor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let mut state = SupervisorState { args, running: HashMap::new(), trackers: HashMap::new() };
        let specs = state.args.children.clone();
        for spec in &specs {
            if let Err(e) = state.start_child(&myself, spec).await {
                myself.stop_children_and_wait(None, None).await;
                return Err(format!("starting {}: {e}", state.child_path(&spec.name)).into());
            }
        }
        Ok(state)
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        state.running.clear();
        myself.stop_children_and_wait(None, None).await;
        for spec in &state.args.children {
            let path = state.child_path(&spec.name);
            if state.args.health.get(&path).is_some_and(|h| h.status != ChildStatus::Failed) {
                state.args.health.set_status(&path, &spec.kind, ChildStatus::Stopped);
            }
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::RestartChild { name } => {
                let Some(spec) = state.spec(&name) else { return Ok(()) };
                match state.start_child(&myself, &spec).await {
                    Ok(()) => {
                        state.args.health.record_restart(&state.child_path(&name));
                        state.args.metrics.actor_restarts.with_label_values(&[spec.kind.as_str()]).inc();
                        Ok(())
                    }
                    Err(e) => state.child_down(&myself, name, format!("restart failed: {e}")).await,
                }
            }
            SupervisorMsg::RestartAll => {
                let specs = state.args.children.clone();
                for spec in &specs {
                    match state.start_child(&myself, spec).await {
                        Ok(()) => {
                            state.args.health.record_restart(&state.child_path(&spec.name));
                            state.args.metrics.actor_restarts.with_label_values(&[spec.kind.as_str()]).inc();
                        }
                        Err(e) => {
                            return state.child_down(&myself, spec.name.clone(), format!("restart failed: {e}")).await;
                        }
                    }
                }
                Ok(())
            }
        }
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                if let Some(name) = state.running.remove(&cell.get_id()) {
                    state.child_down(&myself, name, err.to_string()).await?;
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                // Children never stop on their own while the supervisor runs: an exit is a failure.
                if let Some(name) = state.running.remove(&cell.get_id()) {
                    let reason = reason.unwrap_or_else(|| "stopped unexpectedly".into());
                    state.child_down(&myself, name, format!("terminated: {reason}")).await?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slot::Slot;
    use ractor::RpcReplyPort;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    struct Flaky;
    enum FlakyMsg {
        Panic,
        Ping(RpcReplyPort<usize>),
    }
    impl Actor for Flaky {
        type Msg = FlakyMsg;
        type State = usize;
        type Arguments = usize;
        async fn pre_start(&self, _: ActorRef<FlakyMsg>, gen: usize) -> Result<usize, ActorProcessingErr> {
            Ok(gen)
        }
        async fn handle(
            &self,
            _: ActorRef<FlakyMsg>,
            msg: FlakyMsg,
            gen: &mut usize,
        ) -> Result<(), ActorProcessingErr> {
            match msg {
                FlakyMsg::Panic => panic!("injected failure"),
                FlakyMsg::Ping(r) => {
                    let _ = r.send(*gen);
                }
            }
            Ok(())
        }
    }

    fn flaky_spec(slot: Slot<FlakyMsg>, starts: Arc<AtomicUsize>) -> ChildSpec {
        ChildSpec::new("flaky", "flaky", move |sup| {
            let slot = slot.clone();
            let gen = starts.fetch_add(1, Ordering::SeqCst);
            async move {
                let (r, _) = Actor::spawn_linked(None, Flaky, gen, sup).await?;
                slot.set(r.clone());
                Ok(r.get_cell())
            }
        })
    }

    fn policy(max: u32) -> RestartPolicy {
        RestartPolicy {
            max_restarts: max,
            window: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(5),
            backoff_max: Duration::from_millis(20),
        }
    }

    async fn wait_for_gen(slot: &Slot<FlakyMsg>, gen: usize) {
        for _ in 0..200 {
            if let Some(r) = slot.get() {
                if let Ok(g) = ractor::call!(r, FlakyMsg::Ping) {
                    if g == gen {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("child generation {gen} never came up");
    }

    #[tokio::test]
    async fn restarts_a_panicking_child_and_counts_it() {
        let metrics = Metrics::new().unwrap();
        let health = HealthRegistry::new();
        let slot = Slot::default();
        let starts = Arc::new(AtomicUsize::new(0));
        let args = SupervisorArgs {
            path: "root".into(),
            strategy: Strategy::OneForOne,
            policy: policy(3),
            children: vec![flaky_spec(slot.clone(), starts.clone())],
            health: health.clone(),
            metrics: metrics.clone(),
        };
        let (sup, handle) = Actor::spawn(None, SupervisorActor, args).await.unwrap();
        wait_for_gen(&slot, 0).await;
        slot.get().unwrap().send_message(FlakyMsg::Panic).unwrap();
        wait_for_gen(&slot, 1).await;
        let h = health.get("root/flaky").unwrap();
        assert_eq!(h.restarts, 1);
        assert_eq!(h.status, ChildStatus::Running);
        assert!(h.last_failure.unwrap().reason.contains("injected failure"));
        assert_eq!(metrics.actor_restarts.with_label_values(&["flaky"]).get(), 1);
        assert!(health.is_ready());
        sup.stop(None);
        handle.await.unwrap();
    }

    #[tokio::test]
    async fn escalates_after_the_restart_budget() {
        let metrics = Metrics::new().unwrap();
        let health = HealthRegistry::new();
        let slot = Slot::default();
        let starts = Arc::new(AtomicUsize::new(0));
        let args = SupervisorArgs {
            path: "root/sub".into(),
            strategy: Strategy::OneForOne,
            policy: policy(2),
            children: vec![flaky_spec(slot.clone(), starts.clone())],
            health: health.clone(),
            metrics: metrics.clone(),
        };
        let (_sup, handle) = Actor::spawn(None, SupervisorActor, args).await.unwrap();
        for gen in 0..3 {
            wait_for_gen(&slot, gen).await;
            slot.get().unwrap().send_message(FlakyMsg::Panic).unwrap();
        }
        // the third failure exceeds a budget of two restarts: the supervisor fails itself
        tokio::time::timeout(Duration::from_secs(5), handle).await.unwrap().unwrap();
        assert_eq!(health.get("root/sub/flaky").unwrap().status, ChildStatus::Failed);
        assert_eq!(metrics.actor_escalations.with_label_values(&["flaky"]).get(), 1);
        assert_eq!(metrics.actor_restarts.with_label_values(&["flaky"]).get(), 2);
        assert!(!health.is_ready());
    }

    #[tokio::test]
    async fn one_for_all_restarts_the_siblings_too() {
        let metrics = Metrics::new().unwrap();
        let health = HealthRegistry::new();
        let (a, b) = (Slot::default(), Slot::default());
        let (sa, sb) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let mut spec_b = flaky_spec(b.clone(), sb.clone());
        spec_b.name = "flaky-b".into();
        let args = SupervisorArgs {
            path: "root/pipeline".into(),
            strategy: Strategy::OneForAll,
            policy: policy(3),
            children: vec![flaky_spec(a.clone(), sa.clone()), spec_b],
            health: health.clone(),
            metrics: metrics.clone(),
        };
        let (sup, handle) = Actor::spawn(None, SupervisorActor, args).await.unwrap();
        wait_for_gen(&a, 0).await;
        wait_for_gen(&b, 0).await;
        a.get().unwrap().send_message(FlakyMsg::Panic).unwrap();
        wait_for_gen(&a, 1).await;
        wait_for_gen(&b, 1).await;
        assert_eq!(health.get("root/pipeline/flaky-b").unwrap().restarts, 1);
        assert!(health.is_ready());
        sup.stop(None);
        handle.await.unwrap();
    }
}
