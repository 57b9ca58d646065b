//! Identity endpoints: why two profiles are (or are not) likely one student.

use axum::extract::{Path, Query, State};
use axum::Json;
use chrono::Utc;
use cohort_actors::matching::{compare, MatchModel, MatchRecord};
use cohort_messages::msgs::{MatcherMsg, ProfileMsg, ProfilesMsg, ReviewError};
use cohort_messages::{NewAuditEntry, ProfileId, ReviewStatus, UnmergeError};
use ractor::rpc::CallResult;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::profiles::{ask, ask_read, query, resolve_ref};
use crate::{ApiError, ApiState};

#[derive(Debug, Deserialize)]
pub struct ExplainQuery {
    a: String,
    b: String,
}

#[utoipa::path(get, path = "/v1/identity/explain", tag = "identity",
    params(("a" = String, Query, description = "A profile ref: a profile id or `type:value`"),
        ("b" = String, Query, description = "The other profile ref")),
    responses((status = 200, description = "Field-by-field comparison, weights (bits) and match score"),
        (status = 400), (status = 401), (status = 404), (status = 503)),
    security(("bearer" = ["identity:review"]), ("bearer" = ["profiles:read"])))]
pub async fn explain(State(state): State<ApiState>, Query(q): Query<ExplainQuery>) -> Result<Json<Value>, ApiError> {
    let a = resolve_ref(&state, &q.a).await?;
    let b = resolve_ref(&state, &q.b).await?;
    // Live views, so a comparison sees what was applied a moment ago.
    let (a, view_a) = ask_read(&state, a, ProfileMsg::GetView).await?;
    let (b, view_b) = ask_read(&state, b, ProfileMsg::GetView).await?;
    let model = MatchModel::default();
    let explanation = compare(
        &MatchRecord::from_parts(&view_a.traits, &view_a.identifiers),
        &MatchRecord::from_parts(&view_b.traits, &view_b.identifiers),
        &model,
    );
    Ok(Json(json!({
        "a": a,
        "b": b,
        "same_profile": a == b,
        "score": explanation.score,
        "weight_bits": explanation.weight,
        "comparisons": explanation.comparisons,
        "model": model,
    })))
}

#[derive(Debug, Deserialize)]
pub struct ReviewQuery {
    status: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/v1/identity/reviews", tag = "identity",
    params(("status" = Option<String>, Query, description = "`open` (default), `accepted`, `rejected` or `all`"),
        ("after" = Option<String>, Query, description = "Page after this review id"),
        ("limit" = Option<usize>, Query, description = "Page size, 1-500 (default 50)")),
    responses((status = 200, description = "Probable duplicates with their score and field comparisons"),
        (status = 400), (status = 401), (status = 503)),
    security(("bearer" = ["identity:review"])))]
pub async fn list_reviews(
    State(state): State<ApiState>,
    Query(q): Query<ReviewQuery>,
) -> Result<Json<Value>, ApiError> {
    let status = match q.status.as_deref().unwrap_or("open") {
        "open" => Some(ReviewStatus::Open),
        "accepted" => Some(ReviewStatus::Accepted),
        "rejected" => Some(ReviewStatus::Rejected),
        "all" => None,
        other => return Err(ApiError::BadRequest(format!("unknown status `{other}` (open, accepted, rejected, all)"))),
    };
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::BadRequest("limit must be between 1 and 500".into()));
    }
    let items = state
        .store
        .list_review_items(status, q.after.as_deref(), limit)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    let next = (items.len() == limit).then(|| items.last().map(|i| i.id.clone())).flatten();
    Ok(Json(json!({ "reviews": items, "next_after": next })))
}

/// An optional body naming who decided (kept in the review item and the audit log).
#[derive(Debug, Default, Deserialize)]
pub struct Decision {
    reviewer: Option<String>,
}

fn reviewer(body: Option<Json<Decision>>) -> Result<String, ApiError> {
    let name = body.and_then(|Json(d)| d.reviewer).unwrap_or_else(|| "api".into());
    let name = name.trim().to_string();
    if name.is_empty() || name.len() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::BadRequest("reviewer must be 1-100 printable characters".into()));
    }
    Ok(name)
}

/// Waits for the next profile flush, so an answered decision is durable.
pub(crate) async fn flushed(state: &ApiState) -> Result<(), ApiError> {
    let directory = state.profiles.get().ok_or_else(|| ApiError::Unavailable("profiles restarting".into()))?;
    match directory.call(|r| ProfilesMsg::Flush { reply: Some(r) }, Some(state.call_timeout)).await {
        Ok(CallResult::Success(Ok(_))) => Ok(()),
        Ok(CallResult::Success(Err(e))) => {
            Err(ApiError::Unavailable(format!("decision applied but not yet stored: {e}")))
        }
        _ => Err(ApiError::Unavailable("decision applied but the flush did not answer; it is retried".into())),
    }
}

#[utoipa::path(post, path = "/v1/identity/reviews/{id}/{decision}", tag = "identity",
    params(("id" = String, Path, description = "Review item id"),
        ("decision" = String, Path, description = "`approve` (merges the two profiles) or `reject`")),
    request_body(content = Option<String>, description = "Optional `{\"reviewer\": \"name\"}`", content_type = "application/json"),
    responses((status = 200, description = "The decided review item"), (status = 400), (status = 401),
        (status = 404), (status = 409, description = "Already decided, or the profiles cannot be merged"), (status = 503)),
    security(("bearer" = ["identity:review"])))]
pub async fn decide_review(
    State(state): State<ApiState>,
    Path((id, decision)): Path<(String, String)>,
    body: Option<Json<Decision>>,
) -> Result<Json<Value>, ApiError> {
    let approve = match decision.as_str() {
        "approve" => true,
        "reject" => false,
        other => return Err(ApiError::NotFound(format!("no review action `{other}` (approve, reject)"))),
    };
    let by = reviewer(body)?;
    let matcher =
        state.matcher.get().ok_or_else(|| ApiError::Unavailable("the identity matcher is off or restarting".into()))?;
    let result =
        matcher.call(|reply| MatcherMsg::Decide { review_id: id, approve, by, reply }, Some(state.call_timeout)).await;
    let item = match result {
        Ok(CallResult::Success(Ok(item))) => item,
        Ok(CallResult::Success(Err(e))) => {
            return Err(match e {
                ReviewError::NotFound(_) => ApiError::NotFound(e.to_string()),
                ReviewError::AlreadyDecided(_) | ReviewError::Refused(_) => ApiError::Conflict(e.to_string()),
                ReviewError::Unavailable(_) => ApiError::Unavailable(e.to_string()),
            })
        }
        _ => return Err(ApiError::Unavailable("the identity matcher did not answer".into())),
    };
    if approve {
        flushed(&state).await?;
    }
    Ok(Json(json!({ "review": item })))
}

#[derive(Debug, Deserialize)]
pub struct UnmergeRequest {
    /// The profile whose merge into `{ref}` is undone.
    merged: String,
    reviewer: Option<String>,
}

#[utoipa::path(post, path = "/v1/profiles/{ref}/unmerge", tag = "identity",
    params(("ref" = String, Path, description = "The surviving profile: a profile id or `type:value`")),
    request_body(content = String, description = "`{\"merged\": \"prof_...\"}`: the merge to undo, named by the profile merged in", content_type = "application/json"),
    responses((status = 200, description = "The two profiles, each with its own events and traits again"),
        (status = 400), (status = 401), (status = 404),
        (status = 409, description = "The merge is final (older than identity.unmerge_window) or nested"), (status = 503)),
    security(("bearer" = ["identity:review"])))]
pub async fn unmerge(
    State(state): State<ApiState>,
    Path(r): Path<String>,
    Json(body): Json<UnmergeRequest>,
) -> Result<Json<Value>, ApiError> {
    let merged = ProfileId::parse(body.merged.trim())
        .ok_or_else(|| ApiError::BadRequest("`merged` must be a profile id (prof_...)".into()))?;
    let by = reviewer(Some(Json(Decision { reviewer: body.reviewer })))?;
    let id = resolve_ref(&state, &r).await?;
    // Following merges to the survivor, like every Profile API call.
    let (_, outcome) =
        ask(&state, id, |reply| ProfileMsg::Unmerge { merged: merged.clone(), reply: Some(reply) }).await?;
    let report = outcome.map_err(|e| match e {
        UnmergeError::NotMerged(_) => ApiError::NotFound(e.to_string()),
        UnmergeError::Final(_) | UnmergeError::Nested { .. } => ApiError::Conflict(e.to_string()),
    })?;
    // Audited whether or not the flush answers in time: the split is applied, the next flush
    // stores it, and the audit log is the only lasting record of who undid the merge.
    let stored = flushed(&state).await;
    let audit = NewAuditEntry {
        at: Utc::now(),
        actor: by,
        action: "identity.unmerge".into(),
        subject: report.survivor.to_string(),
        detail: json!({ "restored": report.restored, "stored_when_answered": stored.is_ok() }),
    };
    if let Err(e) = state.store.append_audit(vec![audit]).await {
        tracing::warn!(error = %e, "unmerge not written to the audit log");
    }
    stored?;
    Ok(Json(serde_json::to_value(&report).unwrap_or(Value::Null)))
}

#[utoipa::path(get, path = "/v1/profiles/{ref}/merges", tag = "identity",
    params(("ref" = String, Path, description = "A profile id or `type:value`")),
    responses((status = 200, description = "The merges this profile took part in, oldest first, with their evidence and reason"),
        (status = 401), (status = 404), (status = 503)),
    security(("bearer" = ["identity:review"]), ("bearer" = ["profiles:read"])))]
pub async fn merges(State(state): State<ApiState>, Path(r): Path<String>) -> Result<Json<Value>, ApiError> {
    // The live profile, so a merged id answers with its survivor's history.
    let (id, _) = query(&state, &r, ProfileMsg::GetIdentities).await?;
    let merges = state.store.list_merges(&id).await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok(Json(json!({ "profile_id": id, "merges": merges })))
}
