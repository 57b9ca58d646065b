//! GDPR: access and portability (Art. 15 and 20: everything Cohort holds about a person, as
//! JSON), consent, and erasure (Art. 17) through deletion sagas.

use axum::extract::{Path, State};
use axum::Json;
use chrono::Utc;
use cohort_actors::profile::CONSENT_HISTORY;
use cohort_actors::segments::engine::{member_key, MEMBERS};
use cohort_adapters::{all_documents, all_review_items, Layer, QueryValue};
use cohort_messages::msgs::{ConsentDecision, DeletionRequest, GdprMsg, ProfileMsg};
use cohort_messages::profile::{CONSENT_KEYS, LEGAL_BASES};
use cohort_messages::{
    DeletionState, ErasureTarget, IdentifierKind, NewAuditEntry, ProfileId, Regulation, SagaRecord, DELETION_SAGA,
};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;

use crate::profiles::{ask, ask_read, query, resolve_ref};
use crate::{ApiError, ApiState};

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::Unavailable(e.to_string())
}

#[utoipa::path(get, path = "/v1/gdpr/exports/{ref}", tag = "gdpr",
    params(("ref" = String, Path, description = "A profile id or `type:value`")),
    responses((status = 200, description = "Everything held about the person: the golden record with its identifiers, traits, consent, computed traits and history; consent decisions; merges; segment memberships; identity reviews naming the profile; the person's events in the warehouse"),
        (status = 401), (status = 404), (status = 503)),
    security(("bearer" = ["gdpr:admin"])))]
pub async fn export(State(state): State<ApiState>, Path(r): Path<String>) -> Result<Json<Value>, ApiError> {
    let (id, view) = query(&state, &r, ProfileMsg::GetView).await?;
    let limit = state.config.profiles.history_limit;
    let (_, events) =
        query(&state, id.as_str(), |reply| ProfileMsg::GetEvents { offset: 0, after: None, limit, reply }).await?;
    let store = &state.store;
    // The profiles merged into this one were this person too: their own records count.
    let mut ids = vec![id.clone()];
    ids.extend(view.merged_from.iter().cloned());
    let mut consents = Vec::new();
    for p in &ids {
        consents.extend(store.consents(p).await.map_err(unavailable)?);
    }
    let merges = store.list_merges(&id).await.map_err(unavailable)?;
    // Memberships: real-time ones are on the record; batch ones in the membership documents.
    let mut segments: serde_json::Map<String, Value> =
        view.segments.iter().map(|(name, since)| (name.clone(), json!({ "since": since }))).collect();
    let names: Vec<String> = state.segments.snapshot().keys().cloned().collect();
    let keys: Vec<String> = names.iter().map(|n| member_key(n, &id)).collect();
    for (name, doc) in names.iter().zip(store.get_documents(MEMBERS, &keys).await.map_err(unavailable)?) {
        if let Some(doc) = doc {
            segments.entry(name.clone()).or_insert(doc);
        }
    }
    let reviews: Vec<_> = all_review_items(store.as_ref())
        .await
        .map_err(unavailable)?
        .into_iter()
        .filter(|i| i.profiles.contains(&id))
        .collect();
    let warehouse_events = match &state.warehouse {
        None => Value::Null,
        Some(w) => {
            // Before the first relay the tables may not exist yet: then there is nothing in them.
            w.ensure_schema().await.map_err(unavailable)?;
            let names: Vec<String> = (0..ids.len()).map(|i| format!("@p{i}")).collect();
            let sql = format!(
                "SELECT * FROM {} WHERE profile_id IN ({}) ORDER BY occurred_at",
                w.table(Layer::Silver),
                names.join(", ")
            );
            let params: Vec<(String, QueryValue)> =
                ids.iter().enumerate().map(|(i, p)| (format!("p{i}"), QueryValue::String(p.to_string()))).collect();
            let result = w.query(&sql, &params).await.map_err(unavailable)?;
            let rows: Vec<Value> = result
                .rows
                .iter()
                .map(|row| Value::Object(result.columns.iter().cloned().zip(row.iter().cloned()).collect()))
                .collect();
            json!(rows)
        }
    };
    let generated_at = Utc::now();
    let audit = NewAuditEntry {
        at: generated_at,
        actor: "api".into(),
        action: "gdpr.export".into(),
        subject: id.to_string(),
        detail: json!({ "sections": ["profile", "events", "consents", "merges", "segments", "identity_reviews", "warehouse_events"] }),
    };
    store.append_audit(vec![audit]).await.map_err(unavailable)?;
    Ok(Json(json!({
        "profile_id": id,
        "generated_at": generated_at,
        "profile": view,
        "events": events,
        "consents": consents,
        "merges": merges,
        "segments": segments,
        "identity_reviews": reviews,
        "warehouse_events": warehouse_events,
    })))
}

#[utoipa::path(get, path = "/v1/profiles/{ref}/consent", tag = "gdpr",
    params(("ref" = String, Path, description = "A profile id or `type:value`")),
    responses((status = 200, description = "Current consent per channel or purpose (granted, time, version, legal basis, source) and every decision so far, oldest first"),
        (status = 401), (status = 404), (status = 503)),
    security(("bearer" = ["gdpr:admin"]), ("bearer" = ["profiles:read"])))]
pub async fn get_consent(State(state): State<ApiState>, Path(r): Path<String>) -> Result<Json<Value>, ApiError> {
    let (id, view) = query(&state, &r, ProfileMsg::GetView).await?;
    let mut history = Vec::new();
    for p in std::iter::once(&id).chain(view.merged_from.iter()) {
        let prefix = format!("{p}/");
        for (key, mut doc) in
            all_documents(state.store.as_ref(), CONSENT_HISTORY, &prefix).await.map_err(unavailable)?
        {
            let channel = key.strip_prefix(&prefix).and_then(|k| k.split('/').next()).unwrap_or_default().to_string();
            if let Value::Object(m) = &mut doc {
                m.insert("channel".into(), Value::String(channel));
                m.insert("profile_id".into(), Value::String(p.to_string()));
            }
            history.push(doc);
        }
    }
    history.sort_by(|a, b| a["at"].as_str().cmp(&b["at"].as_str()));
    Ok(Json(json!({ "profile_id": id, "consent": view.consent, "history": history })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentInput {
    granted: bool,
    legal_basis: Option<String>,
    source: Option<String>,
}

#[utoipa::path(put, path = "/v1/profiles/{ref}/consent", tag = "gdpr",
    params(("ref" = String, Path, description = "A profile id or `type:value`")),
    request_body(content = String, description = "`{\"email\": {\"granted\": false, \"legal_basis\": \"consent\", \"source\": \"support_ticket\"}}`: channels and purposes email, whatsapp, sms, push, analytics, advertising", content_type = "application/json"),
    responses((status = 200, description = "The consent now in force; stored and audited before the answer"),
        (status = 400), (status = 401), (status = 404), (status = 503)),
    security(("bearer" = ["gdpr:admin"])))]
pub async fn put_consent(
    State(state): State<ApiState>,
    Path(r): Path<String>,
    body: Result<Json<BTreeMap<String, ConsentInput>>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(body) = body.map_err(|e| ApiError::BadRequest(format!("invalid consent: {}", e.body_text())))?;
    if body.is_empty() {
        return Err(ApiError::BadRequest("name at least one channel".into()));
    }
    let mut decisions = Vec::new();
    for (key, input) in body {
        if !CONSENT_KEYS.contains(&key.as_str()) {
            return Err(ApiError::BadRequest(format!("unknown channel `{key}` (known: {})", CONSENT_KEYS.join(", "))));
        }
        let legal_basis = input.legal_basis.unwrap_or_else(|| "consent".into());
        if !LEGAL_BASES.contains(&legal_basis.as_str()) {
            return Err(ApiError::BadRequest(format!(
                "unknown legal basis `{legal_basis}` (known: {})",
                LEGAL_BASES.join(", ")
            )));
        }
        let source = input.source.unwrap_or_else(|| "api".into());
        if source.trim().is_empty() || source.len() > 100 || source.chars().any(char::is_control) {
            return Err(ApiError::BadRequest("source must be 1-100 printable characters".into()));
        }
        decisions.push(ConsentDecision { key, granted: input.granted, legal_basis, source });
    }
    let id = resolve_ref(&state, &r).await?;
    let at = Utc::now();
    let (id, consent) =
        ask(&state, id, |reply| ProfileMsg::SetConsent { decisions: decisions.clone(), at, reply: Some(reply) })
            .await?;
    crate::identity::flushed(&state).await?;
    let detail: Vec<Value> = decisions
        .iter()
        .map(|d| json!({ "channel": d.key, "granted": d.granted, "legal_basis": d.legal_basis }))
        .collect();
    let audit = NewAuditEntry {
        at,
        actor: "api".into(),
        action: "consent.update".into(),
        subject: id.to_string(),
        detail: json!(detail),
    };
    state.store.append_audit(vec![audit]).await.map_err(unavailable)?;
    Ok(Json(json!({ "profile_id": id, "consent": consent })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeletionInput {
    /// A profile id or `type:value`.
    profile: String,
    regulation: Option<String>,
    /// Who asked (an operator, a ticket); kept in the audit record.
    requested_by: Option<String>,
}

/// A saga as the status endpoint shows it: steps and timings, never the person's identifiers.
fn deletion_view(saga: &SagaRecord) -> Result<Value, ApiError> {
    let state: DeletionState = serde_json::from_value(saga.state.clone())
        .map_err(|e| ApiError::Unavailable(format!("deletion {} is unreadable: {e}", saga.saga_id)))?;
    let duration_ms = state.completed_at.map(|c| (c - state.requested_at).num_milliseconds());
    Ok(json!({
        "id": saga.saga_id,
        "status": saga.status,
        "regulation": state.regulation,
        "profile_id": state.profile_id,
        "profiles": state.profiles,
        "requested_by": state.requested_by,
        "requested_at": state.requested_at,
        "updated_at": saga.updated_at,
        "completed_at": state.completed_at,
        "duration_ms": duration_ms,
        "steps": state.steps,
        // Which replica runs it (until when), and every replica that has: a takeover shows here.
        "lease": state.lease,
        "owners": state.owners,
    }))
}

#[utoipa::path(post, path = "/v1/gdpr/deletions", tag = "gdpr",
    request_body(content = String, description = "`{\"profile\": \"email:max@example.edu\", \"regulation\": \"suppress_with_delete\", \"requested_by\": \"dpo-ticket-4711\"}`; regulation `delete`, `suppress_with_delete` (default) or `suppress_only`", content_type = "application/json"),
    responses((status = 202, description = "The deletion saga is persisted and running; `Location` names its status"),
        (status = 400), (status = 401), (status = 404), (status = 503)),
    security(("bearer" = ["gdpr:admin"])))]
pub async fn request_deletion(
    State(state): State<ApiState>,
    body: Result<Json<DeletionInput>, axum::extract::rejection::JsonRejection>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let Json(input) = body.map_err(|e| ApiError::BadRequest(format!("invalid deletion request: {}", e.body_text())))?;
    let regulation = match input.regulation.as_deref() {
        None => Regulation::SuppressWithDelete,
        Some(r) => Regulation::parse(r).ok_or_else(|| {
            let known: Vec<&str> = Regulation::ALL.iter().map(|r| r.as_str()).collect();
            ApiError::BadRequest(format!("unknown regulation `{r}` (known: {})", known.join(", ")))
        })?,
    };
    let requested_by = input.requested_by.unwrap_or_else(|| "api".into());
    if requested_by.trim().is_empty() || requested_by.len() > 100 || requested_by.chars().any(char::is_control) {
        return Err(ApiError::BadRequest("requested_by must be 1-100 printable characters".into()));
    }
    let id = resolve_ref(&state, &input.profile).await?;
    let (id, view) = view_for_deletion(&state, id).await?;
    let mut profiles = vec![id.clone()];
    profiles.extend(view.merged_from.iter().cloned());
    merging_into(&state, &mut profiles).await?;
    let mut identifiers: Vec<_> = view.identifiers.iter().map(|l| l.identifier.clone()).collect();
    let mut emails: Vec<String> =
        view.traits.get("email").and_then(|t| t.value.as_str()).map(str::to_string).into_iter().collect();
    // A profile whose merge has not reached the survivor's record yet holds identifiers of its
    // own: they are the person's too (suppressed, searched for, verified gone).
    for merged in profiles.iter().filter(|p| **p != id && !view.merged_from.contains(p)) {
        let Some(record) = state.store.load_profile(merged).await.map_err(unavailable)? else { continue };
        for linked in record.identifiers {
            if !identifiers.contains(&linked.identifier) {
                identifiers.push(linked.identifier);
            }
        }
        emails.extend(record.traits.get("email").and_then(|t| t.value.as_str()).map(str::to_string));
    }
    let mut contact_emails: Vec<String> = emails
        .into_iter()
        .filter(|e| !identifiers.iter().any(|i| i.kind == IdentifierKind::Email && i.value == *e))
        .collect();
    contact_emails.sort();
    contact_emails.dedup();
    let request = DeletionRequest {
        profile_id: id,
        target: ErasureTarget { profiles, identifiers, contact_emails },
        regulation,
        requested_by,
    };
    let coordinator = state.gdpr.get().ok_or_else(|| ApiError::Unavailable("GDPR coordinator restarting".into()))?;
    let saga =
        match coordinator.call(|reply| GdprMsg::RequestDeletion { request, reply }, Some(state.call_timeout)).await {
            Ok(ractor::rpc::CallResult::Success(Ok(saga))) => saga,
            Ok(ractor::rpc::CallResult::Success(Err(e))) => return Err(ApiError::Unavailable(e)),
            _ => return Err(ApiError::Unavailable("GDPR coordinator did not answer".into())),
        };
    let location = format!("/v1/gdpr/deletions/{}", saga.saga_id);
    let body = deletion_view(&saga)?;
    Ok((axum::http::StatusCode::ACCEPTED, [(axum::http::header::LOCATION, location)], Json(body)).into_response())
}

/// Adds the profiles merged into these whose merge has not reached the survivor's record yet
/// (its `merged_from`): the merge records already name them, and their events are the person's
/// (two resolver shards meeting a new student at once create two profiles, merged a moment
/// later; a deletion in between left one of them, Silver rows included). Those an unmerge
/// declared another student stay out.
async fn merging_into(state: &ApiState, profiles: &mut Vec<ProfileId>) -> Result<(), ApiError> {
    const MAX_PROFILES: usize = 1_000;
    let mut i = 0;
    while i < profiles.len() && profiles.len() < MAX_PROFILES {
        let survivor = profiles[i].clone();
        i += 1;
        let merges = state.store.list_merges(&survivor).await.map_err(unavailable)?;
        if merges.is_empty() {
            continue;
        }
        let record = state.store.load_profile(&survivor).await.map_err(unavailable)?;
        let apart = record.map(|r| r.kept_apart).unwrap_or_default();
        for m in merges {
            if m.survivor == survivor && !apart.contains(&m.merged) && !profiles.contains(&m.merged) {
                profiles.push(m.merged);
            }
        }
    }
    Ok(())
}

/// The profile to erase, as its actor sees it. In cluster mode a replica that does not own the
/// profile reads the stored record, which lags its owner by one flush: a profile that is not
/// there yet is asked for again for a second before the answer is 404.
async fn view_for_deletion(
    state: &ApiState,
    id: ProfileId,
) -> Result<(ProfileId, cohort_messages::profile::ProfileView), ApiError> {
    let mut tries = 0;
    loop {
        match ask_read(state, id.clone(), ProfileMsg::GetView).await {
            Err(ApiError::NotFound(_)) if state.ownership.is_some() && tries < 10 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

#[utoipa::path(get, path = "/v1/gdpr/deletions/{id}", tag = "gdpr",
    params(("id" = String, Path, description = "The id `POST /v1/gdpr/deletions` answered")),
    responses((status = 200, description = "The saga: status, and per step its state, attempts, last error, timestamps and what it removed (counts)"),
        (status = 401), (status = 404), (status = 503)),
    security(("bearer" = ["gdpr:admin"])))]
pub async fn get_deletion(State(state): State<ApiState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let saga = state.store.load_saga(&id).await.map_err(unavailable)?;
    match saga {
        Some(s) if s.kind == DELETION_SAGA => Ok(Json(deletion_view(&s)?)),
        _ => Err(ApiError::NotFound(format!("no deletion {id}"))),
    }
}

#[derive(Debug, Deserialize)]
pub struct DeletionPage {
    after: Option<String>,
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/v1/gdpr/deletions", tag = "gdpr",
    params(("after" = Option<String>, Query, description = "The last id of the previous page"),
        ("limit" = Option<usize>, Query, description = "At most this many (default 100, at most 1000)")),
    responses((status = 200, description = "Deletion sagas in id (request) order"), (status = 401), (status = 503)),
    security(("bearer" = ["gdpr:admin"])))]
pub async fn list_deletions(
    State(state): State<ApiState>,
    axum::extract::Query(page): axum::extract::Query<DeletionPage>,
) -> Result<Json<Value>, ApiError> {
    let limit = page.limit.unwrap_or(100).clamp(1, 1000);
    let sagas = state.store.list_sagas(page.after.as_deref(), limit).await.map_err(unavailable)?;
    let items = sagas.iter().filter(|s| s.kind == DELETION_SAGA).map(deletion_view).collect::<Result<Vec<_>, _>>()?;
    let next = (sagas.len() == limit).then(|| sagas.last().map(|s| s.saga_id.clone())).flatten();
    Ok(Json(json!({ "deletions": items, "next_after": next })))
}
