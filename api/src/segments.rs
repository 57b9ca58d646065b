//! Segments and reverse ETL: definitions, members, a profile's segments, destination status.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use cohort_actors::segments::engine::{member_key, MEMBERS};
use cohort_actors::segments::{valid_name, SegmentDefinition};
use cohort_messages::msgs::{ProfileMsg, ReverseEtlMsg, SegmentMsg};
use ractor::rpc::CallResult;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::profiles::query;
use crate::{ApiError, ApiState};

fn definition_json(d: &SegmentDefinition) -> Value {
    serde_json::to_value(d).unwrap_or(Value::Null)
}

fn check_name(name: &str) -> Result<(), ApiError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!("segment name `{name}` must be 1-64 characters of a-z, 0-9, `_` and `-`")))
    }
}

#[utoipa::path(get, path = "/v1/segments", tag = "segments",
    responses((status = 200, description = "Every defined segment"), (status = 401)),
    security(("bearer" = ["segments:admin"]), ("bearer" = ["profiles:read"])))]
pub async fn list(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let segments: Vec<Value> = state.segments.snapshot().values().map(|s| definition_json(&s.definition)).collect();
    Ok(Json(json!({ "segments": segments })))
}

#[utoipa::path(get, path = "/v1/segments/{name}", tag = "segments",
    params(("name" = String, Path, description = "Segment name")),
    responses((status = 200, description = "The definition"), (status = 401), (status = 404)),
    security(("bearer" = ["segments:admin"]), ("bearer" = ["profiles:read"])))]
pub async fn get(State(state): State<ApiState>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let segments = state.segments.snapshot();
    let s = segments.get(&name).ok_or_else(|| ApiError::NotFound(format!("no segment {name}")))?;
    Ok(Json(definition_json(&s.definition)))
}

#[utoipa::path(put, path = "/v1/segments/{name}", tag = "segments",
    params(("name" = String, Path, description = "Segment name: a-z, 0-9, `_`, `-`")),
    request_body(content = String, description = "`{\"rule\": \"page_count(\\\"mba\\\", 7d) >= 3 and consent.email\"}`; or `kind` = `batch` with `sql` and `every_secs`, or `model` with `model` and `threshold`", content_type = "application/json"),
    responses((status = 200, description = "The stored definition; members are evaluated from now on (existing profiles in the background)"),
        (status = 400, description = "Invalid rule, with the column of the problem"), (status = 401), (status = 503)),
    security(("bearer" = ["segments:admin"])))]
pub async fn put(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: Result<Json<SegmentDefinition>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    check_name(&name)?;
    let Json(mut definition) =
        body.map_err(|e| ApiError::BadRequest(format!("invalid segment definition: {}", e.body_text())))?;
    if !definition.name.is_empty() && definition.name != name {
        return Err(ApiError::BadRequest(format!("the body names segment `{}`, the path `{name}`", definition.name)));
    }
    definition.name = name;
    let engine = state.segment_engine.get().ok_or_else(|| ApiError::Unavailable("segment engine restarting".into()))?;
    match engine.call(|reply| SegmentMsg::Define { definition, reply }, Some(state.call_timeout)).await {
        Ok(CallResult::Success(Ok(d))) => Ok(Json(definition_json(&d))),
        Ok(CallResult::Success(Err(e))) if e.starts_with("storage unavailable") => Err(ApiError::Unavailable(e)),
        Ok(CallResult::Success(Err(e))) => Err(ApiError::BadRequest(e)),
        _ => Err(ApiError::Unavailable("segment engine did not answer".into())),
    }
}

#[utoipa::path(delete, path = "/v1/segments/{name}", tag = "segments",
    params(("name" = String, Path, description = "Segment name")),
    responses((status = 204, description = "Deleted with its memberships"), (status = 401), (status = 404), (status = 503)),
    security(("bearer" = ["segments:admin"])))]
pub async fn delete(State(state): State<ApiState>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    check_name(&name)?;
    let engine = state.segment_engine.get().ok_or_else(|| ApiError::Unavailable("segment engine restarting".into()))?;
    match engine.call(|reply| SegmentMsg::Delete { name: name.clone(), reply }, Some(state.call_timeout)).await {
        Ok(CallResult::Success(Ok(true))) => Ok(StatusCode::NO_CONTENT),
        Ok(CallResult::Success(Ok(false))) => Err(ApiError::NotFound(format!("no segment {name}"))),
        Ok(CallResult::Success(Err(e))) => Err(ApiError::Unavailable(e)),
        _ => Err(ApiError::Unavailable("segment engine did not answer".into())),
    }
}

#[derive(Debug, Deserialize)]
pub struct MembersQuery {
    after: Option<String>,
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/v1/segments/{name}/members", tag = "segments",
    params(("name" = String, Path, description = "Segment name"),
        ("after" = Option<String>, Query, description = "Page after this profile id"),
        ("limit" = Option<usize>, Query, description = "Page size, 1-1000 (default 100)")),
    responses((status = 200, description = "Member profile ids with when they entered, in id order"), (status = 400), (status = 401), (status = 404), (status = 503)),
    security(("bearer" = ["segments:admin"]), ("bearer" = ["profiles:read"])))]
pub async fn members(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Query(q): Query<MembersQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest("limit must be between 1 and 1000".into()));
    }
    if !state.segments.snapshot().contains_key(&name) {
        return Err(ApiError::NotFound(format!("no segment {name}")));
    }
    let prefix = format!("{name}/");
    let after = q.after.as_deref().map(|a| format!("{prefix}{a}"));
    let page = state
        .store
        .list_documents(MEMBERS, &prefix, after.as_deref(), limit)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    let members: Vec<Value> = page
        .iter()
        .map(|(k, v)| json!({ "profile_id": k.strip_prefix(&prefix).unwrap_or(k), "since": v.get("since") }))
        .collect();
    let next = (members.len() == limit)
        .then(|| members.last().and_then(|m| m["profile_id"].as_str().map(String::from)))
        .flatten();
    Ok(Json(json!({ "segment": name, "members": members, "next_after": next })))
}

#[utoipa::path(get, path = "/v1/profiles/{ref}/segments", tag = "segments",
    params(("ref" = String, Path, description = "A profile id or `type:value`")),
    responses((status = 200, description = "The segments the profile is in, with when it entered"), (status = 401), (status = 404), (status = 503)),
    security(("bearer" = ["segments:admin"]), ("bearer" = ["profiles:read"])))]
pub async fn profile_segments(State(state): State<ApiState>, Path(r): Path<String>) -> Result<Json<Value>, ApiError> {
    let (id, view) = query(&state, &r, ProfileMsg::GetView).await?;
    let mut segments: serde_json::Map<String, Value> = view
        .segments
        .iter()
        .map(|(name, since)| (name.clone(), json!({ "since": since, "kind": "realtime" })))
        .collect();
    let batch = state.segments.batch_names();
    if !batch.is_empty() {
        let keys: Vec<String> = batch.iter().map(|s| member_key(s, &id)).collect();
        let found =
            state.store.get_documents(MEMBERS, &keys).await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
        for (name, doc) in batch.iter().zip(found) {
            if let Some(doc) = doc {
                segments.insert(name.clone(), json!({ "since": doc.get("since"), "kind": "batch" }));
            }
        }
    }
    Ok(Json(json!({ "profile_id": id, "segments": segments })))
}

async fn reverse_etl<T: Send + 'static>(
    state: &ApiState,
    make: impl FnOnce(ractor::RpcReplyPort<T>) -> ReverseEtlMsg,
) -> Result<T, ApiError> {
    let actor = state.reverse_etl.get().ok_or_else(|| ApiError::Unavailable("reverse ETL restarting".into()))?;
    match actor.call(make, Some(state.call_timeout)).await {
        Ok(CallResult::Success(v)) => Ok(v),
        _ => Err(ApiError::Unavailable("reverse ETL did not answer".into())),
    }
}

#[utoipa::path(get, path = "/v1/reverse-etl/status", tag = "reverse-etl",
    responses((status = 200, description = "Per destination: sent, failed, retries, skipped by reason, in flight, waiting, quota use, recent failures; batch runs held by Gate 4"), (status = 401), (status = 503)),
    security(("bearer" = ["segments:admin"])))]
pub async fn status(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(reverse_etl(&state, ReverseEtlMsg::Status).await?))
}

#[derive(Debug, Deserialize)]
pub struct RetryQuery {
    destination: Option<String>,
}

#[utoipa::path(post, path = "/v1/reverse-etl/retry", tag = "reverse-etl",
    params(("destination" = Option<String>, Query, description = "Only this destination's failed jobs")),
    responses((status = 200, description = "How many failed jobs were queued again"), (status = 401), (status = 503)),
    security(("bearer" = ["segments:admin"])))]
pub async fn retry(State(state): State<ApiState>, Query(q): Query<RetryQuery>) -> Result<Json<Value>, ApiError> {
    let destination = q.destination;
    let n = reverse_etl(&state, |reply| ReverseEtlMsg::Retry { destination, reply }).await?;
    Ok(Json(json!({ "requeued": n })))
}

#[utoipa::path(post, path = "/v1/reverse-etl/confirm/{activation}", tag = "reverse-etl",
    params(("activation" = String, Path, description = "The activation whose held batch may go")),
    responses((status = 200, description = "The held batch is sent"), (status = 401), (status = 404, description = "Nothing held"), (status = 503)),
    security(("bearer" = ["segments:admin"])))]
pub async fn confirm(State(state): State<ApiState>, Path(activation): Path<String>) -> Result<Json<Value>, ApiError> {
    let name = activation.clone();
    let confirmed = reverse_etl(&state, |reply| ReverseEtlMsg::Confirm { activation: name, reply })
        .await?
        .map_err(ApiError::Unavailable)?;
    if confirmed {
        Ok(Json(json!({ "confirmed": activation })))
    } else {
        Err(ApiError::NotFound(format!("no batch of {activation} is held")))
    }
}

#[utoipa::path(get, path = "/v1/segment-changes", tag = "segments",
    responses((status = 200, description = "Server-sent events, one `segment_change` per entry or exit (profile id, segment, entered or exited, time; no personal data); a `lagged` event says how many a slow reader missed"),
        (status = 401), (status = 404, description = "On Kafka: read the cdp.segment.change topic")),
    security(("bearer" = ["segments:admin"]), ("bearer" = ["profiles:read"])))]
pub async fn changes(
    State(state): State<ApiState>,
) -> Result<
    axum::response::Sse<impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>>,
    ApiError,
> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use tokio::sync::broadcast::error::RecvError;
    let rx = state
        .bus
        .subscribe_segment_changes()
        .ok_or_else(|| ApiError::NotFound("on Kafka, segment changes are on the cdp.segment.change topic".into()))?;
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            let event = match rx.recv().await {
                Ok(change) => match Event::default().event("segment_change").json_data(&change) {
                    Ok(e) => e,
                    Err(_) => continue,
                },
                Err(RecvError::Lagged(n)) => Event::default().event("lagged").data(n.to_string()),
                Err(RecvError::Closed) => return None,
            };
            return Some((Ok(event), rx));
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
