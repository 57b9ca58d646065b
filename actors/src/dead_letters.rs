//! Writing dead letters: never lose what was given up on, always count it.

use crate::context::PipelineContext;
use chrono::Utc;
use cohort_adapters::{EventBus, NewDeadLetter, OperationalStore};
use cohort_messages::{CustomerEvent, DeadLetter, DeadLetterStage};
use cohort_supervisors::Metrics;
use std::time::Duration;

/// Persists dead letters, retrying while the store is unavailable (they must not be lost), then
/// publishes them to the bus's dead-letter stream (`cdp.dlq` on Kafka) for operators' tooling;
/// the store stays the record, so a failed publish is logged, not retried.
pub async fn record(store: &dyn OperationalStore, bus: &dyn EventBus, metrics: &Metrics, letters: Vec<NewDeadLetter>) {
    let stages: Vec<DeadLetterStage> = letters.iter().map(|l| l.stage).collect();
    if !store_letters(store, bus, letters, 50).await {
        tracing::error!(count = stages.len(), "dead letters could not be stored");
    }
    for s in stages {
        metrics.dead_letters.with_label_values(&[s.as_str()]).inc();
    }
}

/// Stores letters, retrying `retries` times while the store is unavailable, then publishes
/// them; whether they were stored.
async fn store_letters(
    store: &dyn OperationalStore,
    bus: &dyn EventBus,
    letters: Vec<NewDeadLetter>,
    retries: u32,
) -> bool {
    if letters.is_empty() {
        return true;
    }
    let mut backoff = Duration::from_millis(20);
    for attempt in 0.. {
        match store.put_dead_letters(letters.clone()).await {
            Ok(ids) => {
                let recorded_at = Utc::now();
                let stored: Vec<DeadLetter> =
                    ids.into_iter().zip(letters).map(|(id, l)| l.stored(id, recorded_at)).collect();
                if let Err(e) = bus.publish_dead_letters(&stored).await {
                    tracing::warn!(error = %e, count = stored.len(), "dead letters stored but not published to the bus");
                }
                return true;
            }
            Err(e) if e.is_retryable() && attempt < retries => {
                tracing::warn!(error = %e, attempt, "dead-letter store unavailable, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                tracing::warn!(error = %e, count = letters.len(), "dead letters not stored");
                return false;
            }
        }
    }
    false
}

/// [`record_event`] retrying only briefly (about 0.6 s), for a caller that must not stall and
/// keeps the event while it is not stored; counted only when stored.
pub async fn record_event_briefly(
    ctx: &PipelineContext,
    stage: DeadLetterStage,
    event: &CustomerEvent,
    reason: &str,
    attempts: u32,
) -> bool {
    let letter = event_dead_letter(event, stage, reason, attempts);
    let stored = store_letters(ctx.store.as_ref(), ctx.bus.as_ref(), vec![letter], 5).await;
    if stored {
        tracing::warn!(event_id = %event.event_id, source = %event.source, stage = stage.as_str(), reason, "event dead-lettered");
        ctx.metrics.dead_letters.with_label_values(&[stage.as_str()]).inc();
    }
    stored
}

pub async fn record_event(
    ctx: &PipelineContext,
    stage: DeadLetterStage,
    event: &CustomerEvent,
    reason: &str,
    attempts: u32,
) {
    tracing::warn!(event_id = %event.event_id, source = %event.source, stage = stage.as_str(), reason, "event dead-lettered");
    record(ctx.store.as_ref(), ctx.bus.as_ref(), &ctx.metrics, vec![event_dead_letter(event, stage, reason, attempts)])
        .await;
}

/// Builds a dead letter for an event that could not be placed.
fn event_dead_letter(event: &CustomerEvent, stage: DeadLetterStage, reason: &str, attempts: u32) -> NewDeadLetter {
    NewDeadLetter {
        source: event.source,
        stage,
        reason: reason.to_string(),
        event_id: Some(event.event_id.to_string()),
        payload: serde_json::to_string(event).unwrap_or_default(),
        content_type: "application/json".into(),
        received_at: event.received_at,
        attempts,
    }
}
