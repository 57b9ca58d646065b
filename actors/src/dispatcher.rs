//! Reads the bus from the durable checkpoints and feeds the identity resolver pool.

use crate::context::PipelineContext;
use crate::dead_letters;
use crate::identity::{shard_of, IdentityFactoryMsg};
use crate::watermark::describe;
use chrono::Utc;
use cohort_adapters::{BronzeRow, NewDeadLetter, StoreError, Subscription, Undecodable};
use cohort_messages::msgs::IdentityMsg;
use cohort_messages::{CustomerEvent, DeadLetterStage, Source};
use cohort_supervisors::{PipelineStages, Slot};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::sync::Arc;
use std::time::Duration;

pub struct Dispatcher;

pub struct DispatcherArgs {
    pub ctx: PipelineContext,
    pub resolvers: Slot<IdentityFactoryMsg>,
    /// The resolver pool's size: a polled batch goes to it as one message per shard.
    pub shards: usize,
    /// Events read from the bus per step.
    pub batch: usize,
    /// Backpressure: stop reading while this many events are between bus and profiles.
    pub max_in_flight: usize,
}

pub struct DispatcherState {
    args: DispatcherArgs,
    subscription: Box<dyn Subscription>,
    lag_reported: std::time::Instant,
}

#[derive(Debug)]
pub enum DispatcherMsg {
    /// Read and dispatch the next batch (self-sent).
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
        // Restart point: everything up to the durable checkpoints is already in stored profiles.
        let subscription = args.ctx.bus.subscribe(args.ctx.warehouse.is_some()).await?;
        let start = subscription.start();
        args.ctx.checkpoints.advance(&start);
        args.ctx.watermark.reset(&start);
        args.ctx.pending_ids.reset();
        tracing::info!(bus = args.ctx.bus.name(), start = %describe(&start), "pipeline dispatcher starting");
        // Reported on the first pump, then every second.
        let lag_reported =
            std::time::Instant::now().checked_sub(Duration::from_secs(1)).unwrap_or_else(std::time::Instant::now);
        Ok(DispatcherState { args, subscription, lag_reported })
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
        if state.lag_reported.elapsed() >= Duration::from_secs(1) {
            state.lag_reported = std::time::Instant::now();
            for (topic, partition, lag) in state.subscription.lag() {
                ctx.metrics.consumer_lag.with_label_values(&[&topic, &partition.to_string()]).set(lag);
            }
        }
        // Bounded wait when idle, so stop signals are seen promptly.
        let polled = match state.subscription.poll(state.args.batch, Duration::from_millis(200)).await {
            Ok(p) => p,
            Err(e) if e.is_retryable() => {
                // A bus outage is not a dispatcher failure: wait and read again.
                tracing::warn!(error = %e, "bus unavailable, retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                myself.send_message(DispatcherMsg::Pump)?;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        dead_letter_undecodable(ctx, &polled.undecodable, DeadLetterStage::Validation, "bus record").await;
        if ctx.warehouse.is_some() && !polled.raw.is_empty() {
            // Staged before the events are delivered, so the flush covering them carries them.
            // A payload of an erased person's event is not kept raw (the resolver drops the event).
            let erased: std::collections::HashSet<u64> = polled
                .events
                .iter()
                .filter(|e| ctx.erasures.screen(&e.event) != crate::gdpr::Screen::Keep)
                .filter_map(|e| e.event.raw.seq)
                .collect();
            let rows = polled
                .raw
                .iter()
                .filter(|(seq, _)| !erased.contains(seq))
                .map(|(seq, rec)| BronzeRow::from_record(*seq, rec));
            ctx.staged_bronze.lock().extend(rows);
        }
        let mut events = polled.events;
        for je in &events {
            ctx.watermark.dispatched(je.seq);
            PipelineStages::observe(&ctx.metrics.stages.polled, je.event.received_at, 1);
        }
        if !ctx.bus.deduplicates_on_publish() && !events.is_empty() {
            // The events are already taken from the bus: hold them until the store answers.
            let ids: Vec<String> = events.iter().map(|e| e.event.event_id.to_string()).collect();
            let seen = until_available("idempotency keys", || ctx.store.seen_event_ids(&ids)).await?;
            events = events
                .into_iter()
                .zip(seen)
                .filter(|(je, seen)| claim_fresh(ctx, je.seq, &je.event, *seen))
                .map(|(je, _)| je)
                .collect();
        }
        if !events.is_empty() {
            // One store round trip for the batch's unknown identifiers instead of one each;
            // on failure the resolvers look them up themselves.
            if let Err(e) = ctx.index.prefetch(events.iter().flat_map(|je| je.event.identifiers.iter())).await {
                tracing::debug!(error = %e, "identity prefetch failed");
            }
            let resolvers = state.args.resolvers.get().ok_or("identity resolver pool is not running")?;
            let shards = state.args.shards.max(1);
            let mut batches: Vec<Vec<(u64, Arc<CustomerEvent>)>> = (0..shards).map(|_| Vec::new()).collect();
            for je in events {
                let shard = shard_of(&je.event, shards);
                batches[shard].push((je.seq, Arc::new(je.event)));
            }
            for (shard, events) in batches.into_iter().enumerate().filter(|(_, b)| !b.is_empty()) {
                resolvers
                    .dispatch(shard, IdentityMsg::Resolve { events })
                    .map_err(|e| format!("identity pool unavailable: {e}"))?;
            }
        }
        myself.send_message(DispatcherMsg::Pump)?;
        Ok(())
    }
}

/// Records that something else wrote to the bus as dead letters, and moves the watermark past
/// it: a foreign record never stops the pipeline.
pub(crate) async fn dead_letter_undecodable(
    ctx: &PipelineContext,
    undecodable: &[Undecodable],
    stage: DeadLetterStage,
    what: &str,
) {
    if undecodable.is_empty() {
        return;
    }
    let letters = undecodable
        .iter()
        .map(|u| {
            ctx.watermark.dispatched(u.seq);
            NewDeadLetter {
                source: u.source.unwrap_or(Source::Web),
                stage,
                reason: format!("undecodable {what}: {}", u.reason),
                event_id: None,
                payload: u.payload.clone(),
                content_type: "application/octet-stream".into(),
                received_at: Utc::now(),
                attempts: 1,
            }
        })
        .collect();
    dead_letters::record(ctx.store.as_ref(), ctx.bus.as_ref(), &ctx.metrics, letters).await;
    for u in undecodable {
        ctx.watermark.delivered(u.seq);
    }
}

/// Drops events whose id was applied before (a redelivery, or a client re-sending): one store
/// look-up per batch, and the ids dispatched since the last flush.
/// On a store failure the events come back with the error, to be tried again.
/// Whether an event read at `seq` (already counted dispatched) is new: not applied before
/// (`seen`, from the store) and not dispatched since the last flush. A duplicate is counted and
/// delivered at once, so the watermark moves past it.
pub(crate) fn claim_fresh(ctx: &PipelineContext, seq: u64, event: &CustomerEvent, seen: bool) -> bool {
    if !seen && ctx.pending_ids.claim(seq, event.event_id.as_str()) {
        return true;
    }
    ctx.watermark.delivered(seq);
    ctx.metrics.events_duplicate.with_label_values(&[event.source.as_str()]).inc();
    false
}

/// A store call the pipeline cannot go on without: a retryable failure (an outage) waits, 50 ms
/// doubling up to 5 s, and asks again; any other failure is returned.
pub(crate) async fn until_available<T, Fut>(what: &str, mut call: impl FnMut() -> Fut) -> Result<T, StoreError>
where
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut backoff = Duration::from_millis(50);
    loop {
        match call().await {
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, what, backoff_ms = backoff.as_millis() as u64, "store unavailable, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}
