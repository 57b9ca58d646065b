//! Reads the journal from the durable checkpoint and feeds the identity resolver pool.

use crate::context::PipelineContext;
use crate::identity::{routing_key, IdentityFactoryMsg};
use cohort_messages::msgs::IdentityMsg;
use cohort_supervisors::Slot;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

pub struct Dispatcher;

pub struct DispatcherArgs {
    pub ctx: PipelineContext,
    pub resolvers: Slot<IdentityFactoryMsg>,
    /// Events read from the journal per step.
    pub batch: usize,
    /// Backpressure: stop reading while this many events are between journal and profiles.
    pub max_in_flight: usize,
}

pub struct DispatcherState {
    args: DispatcherArgs,
    next_after: u64,
    head: watch::Receiver<u64>,
}

#[derive(Debug)]
pub enum DispatcherMsg {
    /// Read and dispatch the next journal batch (self-sent).
    Pump,
}

impl Actor for Dispatcher {
    type Msg = DispatcherMsg;
    type State = DispatcherState;
    type Arguments = DispatcherArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<DispatcherMsg>,
        args: DispatcherArgs,
    ) -> Result<DispatcherState, ActorProcessingErr> {
        // Restart point: everything up to the durable checkpoint is already in stored profiles.
        let checkpoint = args.ctx.store.checkpoint().await?;
        args.ctx.checkpoint.fetch_max(checkpoint, Ordering::SeqCst);
        args.ctx.watermark.reset(checkpoint);
        tracing::info!(checkpoint, "pipeline dispatcher starting from checkpoint");
        let head = args.ctx.log.watch_head();
        Ok(DispatcherState { args, next_after: checkpoint, head })
    }

    async fn post_start(
        &self,
        myself: ActorRef<DispatcherMsg>,
        _state: &mut DispatcherState,
    ) -> Result<(), ActorProcessingErr> {
        myself.send_message(DispatcherMsg::Pump)?;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<DispatcherMsg>,
        _msg: DispatcherMsg,
        state: &mut DispatcherState,
    ) -> Result<(), ActorProcessingErr> {
        let ctx = &state.args.ctx;
        let in_flight = ctx.watermark.in_flight();
        ctx.metrics.mailbox_depth.with_label_values(&["identity"]).set(in_flight as i64);
        if in_flight >= state.args.max_in_flight {
            tokio::time::sleep(Duration::from_millis(1)).await;
            myself.send_message(DispatcherMsg::Pump)?;
            return Ok(());
        }
        let events = ctx.log.read_after(state.next_after, state.args.batch).await?;
        if events.is_empty() {
            // Caught up: wait for the next append (bounded, so stop signals are seen promptly).
            let _ = tokio::time::timeout(Duration::from_millis(200), state.head.changed()).await;
            myself.send_message(DispatcherMsg::Pump)?;
            return Ok(());
        }
        let resolvers = state.args.resolvers.get().ok_or("identity resolver pool is not running")?;
        for je in events {
            let seq = je.seq;
            let key = routing_key(&je.event);
            ctx.watermark.dispatched(seq);
            resolvers
                .dispatch(key, IdentityMsg::Resolve { seq, event: Arc::new(je.event) })
                .map_err(|e| format!("identity pool unavailable: {e}"))?;
            state.next_after = seq;
        }
        myself.send_message(DispatcherMsg::Pump)?;
        Ok(())
    }
}
