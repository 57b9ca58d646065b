//! Replaying dead letters once their cause is fixed (a mapping, a bound, a bug).
//!
//! A payload refused at Gate 1 goes through ingest again exactly as first received: events that
//! were accepted then are duplicates now and count once, and anything still invalid becomes a
//! new dead letter. An event given up on later (identity, profile) was journaled but never
//! applied, so it is published again under a replay id of its own, which idempotency would
//! otherwise swallow. Either way the old letter is removed once its replay is durable.

use crate::error::ApiError;
use crate::ingest::submit;
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
fn format_of(letter: &DeadLetter) -> Result<PayloadFormat, String> {
    if let Some(name) = letter.content_type.split(';').find_map(|p| p.trim().strip_prefix("connector=")) {
        return Ok(PayloadFormat::Connector { name: cohort_messages::msgs::ConnectorName::intern(name) });
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

/// Replays one letter; the outcome as JSON, or why it stays.
async fn replay_one(state: &ApiState, letter: &DeadLetter) -> Result<Value, String> {
    match letter.stage {
        DeadLetterStage::Validation => {
            let format = format_of(letter)?;
            let content_type = letter.content_type.split(';').next().unwrap_or_default().trim().to_string();
            let payload = RawPayload {
                source: letter.source,
                format,
                body: letter.payload.as_bytes().to_vec().into(),
                content_type: if matches!(format, PayloadFormat::Connector { .. }) {
                    content_type
                } else {
                    letter.content_type.clone()
                },
                received_at: letter.received_at,
            };
            match submit(state, payload).await {
                Ok(r) => Ok(json!({
                    "outcome": if r.rejected.is_empty() { "accepted" } else { "rejected_again" },
                    "accepted": r.accepted, "duplicates": r.duplicates, "rejected": r.rejected.len(),
                    "suppressed": r.suppressed,
                })),
                // Refused whole again: ingest kept it as a new dead letter.
                Err(ApiError::BadRequest(m)) | Err(ApiError::PayloadTooLarge(m)) => {
                    Ok(json!({ "outcome": "rejected_again", "reason": m }))
                }
                Err(e) => Err(e.to_string()),
            }
        }
        DeadLetterStage::Identity | DeadLetterStage::Profile => {
            let mut event: CustomerEvent =
                serde_json::from_str(&letter.payload).map_err(|e| format!("the stored event does not parse: {e}"))?;
            let original = event.event_id.as_str().to_string();
            event.event_id = EventId::new(event.source, &format!("replay-{}:{original}", letter.id));
            let (kept, _) = state.erasures.apply(event);
            let Some(event) = kept else {
                return Ok(json!({ "outcome": "suppressed" }));
            };
            let event_id = event.event_id.as_str().to_string();
            let outcome =
                state.bus.publish(AppendBatch { raw: None, events: vec![event] }).await.map_err(|e| e.to_string())?;
            let fresh = outcome.seqs.first().is_some_and(Option::is_some);
            Ok(json!({ "outcome": if fresh { "republished" } else { "duplicate" }, "event_id": event_id }))
        }
    }
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
    let (mut replayed, mut kept) = (0u64, 0u64);
    let mut done = Vec::new();
    for letter in letters.iter().filter(|l| req.stage.is_none_or(|s| s == l.stage)) {
        match replay_one(&state, letter).await {
            Ok(mut r) => {
                replayed += 1;
                done.push(letter.id);
                r["id"] = json!(letter.id);
                results.push(r);
            }
            Err(reason) => {
                kept += 1;
                results.push(json!({ "id": letter.id, "outcome": "kept", "reason": reason }));
            }
        }
    }
    let missing: Vec<u64> = req.ids.iter().copied().filter(|id| !letters.iter().any(|l| l.id == *id)).collect();
    let removed = if done.is_empty() { 0 } else { store.delete_dead_letters(&done).await.map_err(unavailable)? };
    tracing::info!(replayed, kept, removed, "dead letters replayed");
    let next = if req.ids.is_empty() && letters.len() == limit { letters.last().map(|l| l.id) } else { None };
    Ok(Json(json!({
        "replayed": replayed, "kept": kept, "removed": removed, "not_found": missing,
        "results": results, "next_after": next,
    })))
}
