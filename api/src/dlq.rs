//! Replaying dead letters once their cause is fixed (a mapping, a bound, a bug).
//!
//! A payload refused at Gate 1 goes through ingest again exactly as first received, once for
//! all its letters (one per refused element): events accepted then are duplicates now and count
//! once. A replay writes no new letters: a letter whose element is refused again stays as it is,
//! the others are removed as soon as their replay is durable, so replaying never grows the store
//! and paging through it ends. An event given up on later (identity, profile) was journaled but
//! never applied, so it is published again under a replay id of its own, which idempotency would
//! otherwise swallow.

use crate::error::ApiError;
use crate::ingest::submit_as;
use crate::state::ApiState;
use axum::extract::State;
use axum::Json;
use cohort_adapters::AppendBatch;
use cohort_messages::msgs::{PayloadFormat, RawPayload, SegmentCall};
use cohort_messages::{CustomerEvent, DeadLetter, DeadLetterStage, EventId, Source};
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct ReplayRequest {
    /// These dead letters; or, without ids, a page from `after`.
    #[serde(default)]
    ids: Vec<u64>,
    after: Option<u64>,
    limit: Option<usize>,
    /// Only letters of this stage (`validation`, `identity`, `profile`).
    #[schema(value_type = Option<String>)]
    stage: Option<DeadLetterStage>,
}

/// The wire format a Gate 1 letter was received in, from its source and body.
fn format_of(state: &ApiState, letter: &DeadLetter) -> Result<PayloadFormat, String> {
    if let Some(name) = letter.content_type.split(';').find_map(|p| p.trim().strip_prefix("connector=")) {
        // Only a connector this build runs, on the channel the letter came from.
        let c =
            state.normalize.connectors.get(name).filter(|c| c.channel() == letter.source).ok_or_else(|| {
                format!("names connector `{name}`, which this build does not run on {}", letter.source)
            })?;
        return Ok(cohort_actors::normalize::connector::format_of(c.as_ref()));
    }
    Ok(match letter.source {
        Source::Whatsapp => PayloadFormat::TwilioForm,
        Source::Email => PayloadFormat::SendgridEvents,
        Source::Crm if letter.content_type.contains("csv") => PayloadFormat::SalesforceCsv,
        Source::Crm => PayloadFormat::SalesforceCdc,
        Source::Web | Source::Mobile => {
            let body: Value = serde_json::from_str(&letter.payload)
                .map_err(|_| "not JSON: fix the payload and send it again yourself".to_string())?;
            let call = if body.get("batch").is_some() {
                Some(SegmentCall::Batch)
            } else {
                body.get("type").and_then(Value::as_str).and_then(SegmentCall::parse)
            };
            PayloadFormat::Segment {
                call: call.ok_or_else(|| "no Segment call type (`type` or `batch`) in the payload".to_string())?,
            }
        }
    })
}

/// Replays one payload's Gate 1 letters (they share it): which of them stay, and the outcome.
async fn replay_payload(state: &ApiState, group: &[&DeadLetter]) -> Result<(Vec<u64>, Value), String> {
    let Some(first) = group.first() else { return Ok((Vec::new(), json!({}))) };
    // A letter carries its whole payload: replayed after its events' ids were forgotten, the
    // elements accepted the first time would count again.
    let keep = cohort_actors::retention::idempotency_keep(state.config.retention.idempotency_hours);
    if first.received_at < cohort_actors::retention::dedup_window_start(keep, chrono::Utc::now()) {
        return Err(format!(
            "received before the deduplication window (retention.idempotency_hours = {}): replayed, the payload's accepted events would count twice; send the refused elements yourself",
            state.config.retention.idempotency_hours
        ));
    }
    let format = format_of(state, first)?;
    // The connector and format marks are Cohort's, not the payload's.
    let content_type = first
        .content_type
        .split(';')
        .filter(|p| !p.trim().starts_with("connector=") && !p.trim().starts_with("format="))
        .collect::<Vec<_>>();
    let payload = RawPayload {
        source: first.source,
        format,
        body: first.payload.as_bytes().to_vec().into(),
        content_type: content_type.join(";"),
        received_at: first.received_at,
    };
    match submit_as(state, payload, false).await {
        Ok(r) => {
            let refused: Vec<usize> = r.rejected.iter().filter_map(|x| x.index).collect();
            let mut unindexed = r.rejected.iter().filter(|x| x.index.is_none()).count();
            let kept: Vec<u64> = group
                .iter()
                .filter(|l| match l.element() {
                    // A letter standing for all of the payload's rejections stays while any does.
                    None if l.summarized().is_some() => !r.rejected.is_empty(),
                    Some(i) => refused.contains(&i),
                    None if unindexed > 0 => {
                        unindexed -= 1;
                        true
                    }
                    None => false,
                })
                .map(|l| l.id)
                .collect();
            let outcome = json!({
                "outcome": if kept.is_empty() { "accepted" } else { "rejected_again" },
                "accepted": r.accepted, "duplicates": r.duplicates, "rejected": r.rejected.len(),
                "suppressed": r.suppressed,
            });
            Ok((kept, outcome))
        }
        // Refused whole again: every letter stays.
        Err(ApiError::BadRequest(m)) | Err(ApiError::PayloadTooLarge(m)) => {
            Ok((group.iter().map(|l| l.id).collect(), json!({ "outcome": "rejected_again", "reason": m })))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Publishes a dead-lettered event again under a replay id.
async fn replay_event(state: &ApiState, letter: &DeadLetter) -> Result<Value, String> {
    let mut event: CustomerEvent =
        serde_json::from_str(&letter.payload).map_err(|e| format!("the stored event does not parse: {e}"))?;
    let original = event.event_id.as_str().to_string();
    event.event_id = EventId::new(event.source, &format!("replay-{}:{original}", letter.id));
    let (kept, _) = state.erasures.apply(event);
    let Some(event) = kept else {
        return Ok(json!({ "outcome": "suppressed" }));
    };
    let event_id = event.event_id.as_str().to_string();
    let outcome = state.bus.publish(AppendBatch { raw: None, events: vec![event] }).await.map_err(|e| e.to_string())?;
    let fresh = outcome.seqs.first().is_some_and(Option::is_some);
    Ok(json!({ "outcome": if fresh { "republished" } else { "duplicate" }, "event_id": event_id }))
}

#[utoipa::path(post, path = "/v1/dlq/replay", tag = "ops",
    request_body(content = ReplayRequest, description = "`ids`, or a page (`after`, `limit`), optionally of one `stage`"),
    responses((status = 200, description = "Per letter: replayed (and removed) or kept with the reason"),
        (status = 400), (status = 401), (status = 403), (status = 503)),
    security(("bearer" = ["ops:admin"])))]
pub async fn replay(State(state): State<ApiState>, Json(req): Json<ReplayRequest>) -> Result<Json<Value>, ApiError> {
    let limit = req.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) || req.ids.len() > 1000 {
        return Err(ApiError::BadRequest("at most 1000 letters per request".into()));
    }
    let store = state.store.as_ref();
    let unavailable = |e: cohort_adapters::StoreError| ApiError::Unavailable(e.to_string());
    let letters: Vec<DeadLetter> = if req.ids.is_empty() {
        store.list_dead_letters(req.after.unwrap_or(0), limit).await.map_err(unavailable)?
    } else {
        let (lo, hi) = (req.ids.iter().min().copied().unwrap_or(0), req.ids.iter().max().copied().unwrap_or(0));
        let mut found = Vec::new();
        let mut after = lo.saturating_sub(1);
        while after < hi {
            let page = store.list_dead_letters(after, 1000).await.map_err(unavailable)?;
            let Some(last) = page.last().map(|d| d.id) else { break };
            found.extend(page.into_iter().filter(|d| req.ids.contains(&d.id)));
            after = last;
        }
        found
    };
    let mut results = Vec::new();
    let (mut replayed, mut kept, mut removed) = (0u64, 0u64, 0u64);
    let chosen: Vec<&DeadLetter> = letters.iter().filter(|l| req.stage.is_none_or(|s| s == l.stage)).collect();
    // One payload's Gate 1 letters are replayed together, once.
    let mut groups: Vec<Vec<&DeadLetter>> = Vec::new();
    for l in &chosen {
        let same = |g: &&mut Vec<&DeadLetter>| {
            g.first().is_some_and(|f| {
                f.stage == DeadLetterStage::Validation
                    && l.stage == DeadLetterStage::Validation
                    && f.source == l.source
                    && f.received_at == l.received_at
                    && f.content_type == l.content_type
                    && f.payload == l.payload
            })
        };
        match groups.iter_mut().find(|g| same(g)) {
            Some(g) => g.push(l),
            None => groups.push(vec![l]),
        }
    }
    for group in groups {
        let outcome = match group.first().map(|l| l.stage) {
            Some(DeadLetterStage::Validation) => replay_payload(&state, &group).await,
            _ => match group.first() {
                Some(l) => replay_event(&state, l).await.map(|v| (Vec::new(), v)),
                None => continue,
            },
        };
        match outcome {
            Ok((stays, outcome)) => {
                let done: Vec<u64> = group.iter().map(|l| l.id).filter(|id| !stays.contains(id)).collect();
                // Removed at once: a request cut short later leaves no replayed letter behind.
                if !done.is_empty() {
                    removed += store.delete_dead_letters(&done).await.map_err(unavailable)?;
                }
                replayed += done.len() as u64;
                kept += stays.len() as u64;
                for l in &group {
                    let mut r = outcome.clone();
                    r["id"] = json!(l.id);
                    if stays.contains(&l.id) {
                        r["outcome"] = json!("kept");
                        r["reason"] = json!("refused again");
                    }
                    results.push(r);
                }
            }
            Err(reason) => {
                kept += group.len() as u64;
                results.extend(group.iter().map(|l| json!({ "id": l.id, "outcome": "kept", "reason": reason })));
            }
        }
    }
    let missing: Vec<u64> = req.ids.iter().copied().filter(|id| !letters.iter().any(|l| l.id == *id)).collect();
    tracing::info!(replayed, kept, removed, "dead letters replayed");
    let next = if req.ids.is_empty() && letters.len() == limit { letters.last().map(|l| l.id) } else { None };
    Ok(Json(json!({
        "replayed": replayed, "kept": kept, "removed": removed, "not_found": missing,
        "results": results, "next_after": next,
    })))
}
