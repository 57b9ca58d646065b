//! The Profile API, answered by the live ProfileActor.

use crate::error::ApiError;
use crate::state::ApiState;
use axum::extract::{Path, Query, State};
use axum::Json;
use cohort_actors::normalize::contact::trusted_e164;
use cohort_actors::normalize::{normalize_email, normalize_phone};
use cohort_messages::msgs::{IdentityStatsMsg, ProfileMsg, ProfileRecordReply, ProfilesMsg};
use cohort_messages::{Identifier, IdentifierKind, ProfileId, ProfileRef};
use ractor::rpc::CallResult;
use ractor::RpcReplyPort;
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Duration;

/// Normalizes an identifier from a URL the way ingest normalizes it.
fn normalize_ref_identifier(state: &ApiState, id: Identifier) -> Result<Identifier, ApiError> {
    let value = match id.kind {
        IdentifierKind::Email => normalize_email(&id.value).map(|e| state.normalize.email_key(&e)),
        // As the Twilio webhook stores them: a number the phone database does not know is
        // kept as sent in E.164, and a WhatsApp id comes without its `+`.
        IdentifierKind::Phone => normalize_phone(&id.value, &state.normalize.default_region).or_else(|| {
            id.value.trim().starts_with('+').then(|| trusted_e164(&id.value, &state.normalize.default_region)).flatten()
        }),
        IdentifierKind::WhatsappId => trusted_e164(&id.value, &state.normalize.default_region),
        _ => Some(id.value.clone()),
    };
    value
        .map(|v| Identifier::new(id.kind, v))
        .ok_or_else(|| ApiError::BadRequest(format!("`{}` is not a valid {}", id.value, id.kind)))
}

/// Resolves `{ref}` to a profile id.
pub async fn resolve_ref(state: &ApiState, raw: &str) -> Result<ProfileId, ApiError> {
    let parsed: ProfileRef = raw.parse().map_err(|e| ApiError::BadRequest(format!("invalid profile ref: {e}")))?;
    match parsed {
        ProfileRef::Id(id) => Ok(id),
        ProfileRef::Identifier(id) => {
            let id = normalize_ref_identifier(state, id)?;
            state
                .index
                .resolve(&id)
                .await
                .map_err(|e| ApiError::Unavailable(e.to_string()))?
                .ok_or_else(|| ApiError::NotFound(format!("no profile with {}", id.kind)))
        }
    }
}

/// Asks the live ProfileActor for a change, following merges to the survivor.
pub async fn ask<T: Send + 'static>(
    state: &ApiState,
    id: ProfileId,
    make: impl Fn(RpcReplyPort<ProfileRecordReply<T>>) -> ProfileMsg,
) -> Result<(ProfileId, T), ApiError> {
    ask_with(state, id, make, false).await
}

/// Asks the live ProfileActor a question. A query whose actor stops before answering (it was
/// passivated, or its partition moved) is asked again: a fresh actor loads the stored record.
/// A change is not: it may have been applied by the actor that stopped.
pub async fn ask_read<T: Send + 'static>(
    state: &ApiState,
    id: ProfileId,
    make: impl Fn(RpcReplyPort<ProfileRecordReply<T>>) -> ProfileMsg,
) -> Result<(ProfileId, T), ApiError> {
    ask_with(state, id, make, true).await
}

async fn ask_with<T: Send + 'static>(
    state: &ApiState,
    mut id: ProfileId,
    make: impl Fn(RpcReplyPort<ProfileRecordReply<T>>) -> ProfileMsg,
    retry_stopped: bool,
) -> Result<(ProfileId, T), ApiError> {
    let directory = state.profiles.get().ok_or_else(|| ApiError::Unavailable("profiles restarting".into()))?;
    let mut stopped = 0;
    for _ in 0..8 {
        if state.erasures.is_erased(&id) {
            return Err(ApiError::NotFound(format!("no profile {id}: it was erased")));
        }
        let target = id.clone();
        let result = directory
            .call(|reply| ProfilesMsg::Deliver { profile_id: target, msg: make(reply) }, Some(state.call_timeout))
            .await;
        match result {
            Ok(CallResult::Success(ProfileRecordReply::Found(v))) => return Ok((id, v)),
            Ok(CallResult::Success(ProfileRecordReply::MergedInto(s))) => {
                // A change for a survivor another replica owns would reach only a read-only
                // copy here, which no flush stores: it goes to the owner when sent again.
                if !retry_stopped && !owns(state, &s) {
                    state.index.learn_redirect(&id, &s);
                    return Err(ApiError::Unavailable(
                        "the profile was merged into one another replica holds; send the request again".into(),
                    ));
                }
                id = s
            }
            Ok(CallResult::Success(ProfileRecordReply::NotFound)) => {
                return Err(ApiError::NotFound(format!("no profile {id}")))
            }
            Ok(CallResult::Timeout) => return Err(ApiError::Unavailable("profile actor timed out".into())),
            Ok(CallResult::SenderError) | Err(_) if retry_stopped && stopped < 2 => {
                stopped += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(CallResult::SenderError) | Err(_) => {
                return Err(ApiError::Unavailable("profile actor restarting".into()))
            }
        }
    }
    Err(ApiError::Unavailable("too many merge redirects".into()))
}

/// Whether this replica holds the live actor of `id` (always, outside cluster mode).
fn owns(state: &ApiState, id: &ProfileId) -> bool {
    state.ownership.as_ref().is_none_or(|o| o.owns_profile(id))
}

/// The shared path of every Profile API read: token, ref resolution, live-actor query.
pub(crate) async fn query<T: Send + 'static>(
    state: &ApiState,
    reference: &str,
    make: impl Fn(RpcReplyPort<ProfileRecordReply<T>>) -> ProfileMsg,
) -> Result<(ProfileId, T), ApiError> {
    let id = resolve_ref(state, reference).await?;
    ask_read(state, id, make).await
}

#[utoipa::path(get, path = "/v1/profiles/stats", tag = "profiles",
    responses((status = 200, description = "Live, merged and known profiles and the identity match rate"),
        (status = 401), (status = 503)),
    security(("bearer" = ["profiles:read"])))]
pub async fn get_stats(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let job = state.identity_stats.get().ok_or_else(|| ApiError::Unavailable("statistics job restarting".into()))?;
    // A first count scans every profile: allow it more than a profile read.
    match job.call(IdentityStatsMsg::GetLatest, Some(state.call_timeout * 6)).await {
        Ok(CallResult::Success(Ok(stats))) => Ok(Json(json!({ "identity": stats }))),
        Ok(CallResult::Success(Err(e))) => Err(ApiError::Unavailable(e)),
        _ => Err(ApiError::Unavailable("statistics job did not answer".into())),
    }
}

#[utoipa::path(get, path = "/v1/profiles/{ref}", tag = "profiles",
    params(("ref" = String, Path, description = "A profile id or `type:value`, e.g. `email:max@gmail.com`")),
    responses((status = 200, description = "The golden record"), (status = 401), (status = 404), (status = 503)),
    security(("bearer" = ["profiles:read"])))]
pub async fn get_profile(
    State(state): State<ApiState>,
    Path(r): Path<String>,
) -> Result<impl axum::response::IntoResponse, ApiError> {
    // The actor's cached JSON: computing the traits and encoding the view was a sixth of the
    // CPU at 5,000 requests/s, though a profile changes far less often than it is read.
    let (_, body) = query(&state, &r, ProfileMsg::GetViewJson).await?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], body))
}

#[utoipa::path(get, path = "/v1/profiles/{ref}/traits", tag = "profiles",
    params(("ref" = String, Path, description = "A profile id or `type:value`")),
    responses((status = 200, description = "Traits with their source and update time"), (status = 401), (status = 404), (status = 503)),
    security(("bearer" = ["profiles:read"])))]
pub async fn get_traits(State(state): State<ApiState>, Path(r): Path<String>) -> Result<Json<Value>, ApiError> {
    let (id, view) = query(&state, &r, ProfileMsg::GetView).await?;
    Ok(Json(json!({ "profile_id": id, "traits": view.traits })))
}

#[utoipa::path(get, path = "/v1/profiles/{ref}/features", tag = "profiles",
    params(("ref" = String, Path, description = "A profile id or `type:value`")),
    responses((status = 200, description = "The feature job's latest snapshot of the profile's computed traits"),
        (status = 401), (status = 404, description = "No such profile, or no snapshot yet"), (status = 503)),
    security(("bearer" = ["profiles:read"])))]
pub async fn get_features(State(state): State<ApiState>, Path(r): Path<String>) -> Result<Json<Value>, ApiError> {
    // The survivor's snapshot for a merged id, and nothing for an erased one, as on every
    // other profile route.
    let id = resolve_ref(&state, &r).await?;
    let id = state.index.root(&id).await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
    if state.erasures.is_erased(&id) {
        return Err(ApiError::NotFound(format!("no profile {id}: it was erased")));
    }
    let doc = cohort_actors::features::features_of(state.store.as_ref(), &id)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?
        .ok_or_else(|| {
            ApiError::NotFound(format!("no feature snapshot for {id} yet (the `features` job computes them)"))
        })?;
    Ok(Json(json!({ "profile_id": id, "computed_at": doc["computed_at"], "features": doc["features"] })))
}

#[derive(Debug, Deserialize)]
pub struct Paging {
    offset: Option<usize>,
    cursor: Option<String>,
    limit: Option<usize>,
}

/// A page cursor: the last event's time and id, opaque to clients (base64url).
fn cursor_of(e: &cohort_messages::EventSummary) -> String {
    use base64::Engine;
    let raw = format!("{}|{}", e.occurred_at.timestamp_micros(), e.event_id);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

fn parse_cursor(cursor: &str) -> Option<(chrono::DateTime<chrono::Utc>, cohort_messages::EventId)> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(cursor.trim()).ok()?;
    let (micros, id) = std::str::from_utf8(&raw).ok()?.split_once('|')?;
    let at = chrono::DateTime::from_timestamp_micros(micros.parse().ok()?)?;
    Some((at, cohort_messages::EventId::from_raw(id)))
}

#[utoipa::path(get, path = "/v1/profiles/{ref}/events", tag = "profiles",
    params(("ref" = String, Path, description = "A profile id or `type:value`"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the page before: the page after it, unmoved by events that arrived since"),
        ("offset" = Option<usize>, Query, description = "Events to skip (default 0); new events shift it, so follow `next_cursor` to page"),
        ("limit" = Option<usize>, Query, description = "Page size, 1-500 (default 50)")),
    responses((status = 200, description = "Recent events, newest first"), (status = 400), (status = 401), (status = 404), (status = 503)),
    security(("bearer" = ["profiles:read"])))]
pub async fn get_events(
    State(state): State<ApiState>,
    Path(r): Path<String>,
    Query(p): Query<Paging>,
) -> Result<Json<Value>, ApiError> {
    // Authenticate before validating, so the answer to a stranger is always 401.
    let offset = p.offset.unwrap_or(0);
    let limit = p.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::BadRequest("limit must be between 1 and 500".into()));
    }
    let after = match p.cursor.as_deref() {
        None => None,
        Some(c) => Some(Box::new(
            parse_cursor(c).ok_or_else(|| ApiError::BadRequest("cursor is not one this API gave".into()))?,
        )),
    };
    if after.is_some() && p.offset.is_some() {
        return Err(ApiError::BadRequest("give a cursor or an offset, not both".into()));
    }
    let (id, events) =
        query(&state, &r, |reply| ProfileMsg::GetEvents { offset, after: after.clone(), limit, reply }).await?;
    let full = events.len() == limit;
    let next_offset = (full && after.is_none()).then_some(offset + limit);
    let next_cursor = events.last().filter(|_| full).map(cursor_of);
    Ok(Json(json!({
        "profile_id": id, "events": events, "offset": offset, "next_offset": next_offset, "next_cursor": next_cursor,
    })))
}

#[utoipa::path(get, path = "/v1/profiles/{ref}/identities", tag = "profiles",
    params(("ref" = String, Path, description = "A profile id or `type:value`")),
    responses((status = 200, description = "Linked identifiers"), (status = 401), (status = 404), (status = 503)),
    security(("bearer" = ["profiles:read"])))]
pub async fn get_identities(State(state): State<ApiState>, Path(r): Path<String>) -> Result<Json<Value>, ApiError> {
    let (id, ids) = query(&state, &r, ProfileMsg::GetIdentities).await?;
    Ok(Json(json!({ "profile_id": id, "identities": ids })))
}
