//! GDPR access and portability (Art. 15 and 20): everything Cohort holds about a person, as JSON.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use chrono::Utc;
use cohort_actors::profile::CONSENT_HISTORY;
use cohort_actors::segments::engine::{member_key, MEMBERS};
use cohort_adapters::{all_documents, all_review_items, Layer, QueryValue};
use cohort_messages::msgs::{ConsentDecision, ProfileMsg};
use cohort_messages::profile::{CONSENT_KEYS, LEGAL_BASES};
use cohort_messages::NewAuditEntry;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;

use crate::auth::require_bearer;
use crate::profiles::{ask, query, resolve_ref};
use crate::{ApiError, ApiState};

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::Unavailable(e.to_string())
}

#[utoipa::path(get, path = "/v1/gdpr/exports/{ref}", tag = "gdpr",
    params(("ref" = String, Path, description = "A profile id or `type:value`")),
    responses((status = 200, description = "Everything held about the person: the golden record with its identifiers, traits, consent, computed traits and history; consent decisions; merges; segment memberships; identity reviews naming the profile; the person's events in the warehouse"),
        (status = 401), (status = 404), (status = 503)),
    security(("bearer" = [])))]
pub async fn export(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(r): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (id, view) = query(&state, &headers, &r, ProfileMsg::GetView).await?;
    let limit = state.config.profiles.history_limit;
    let (_, events) =
        query(&state, &headers, id.as_str(), |reply| ProfileMsg::GetEvents { offset: 0, limit, reply }).await?;
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
    security(("bearer" = [])))]
pub async fn get_consent(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(r): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (id, view) = query(&state, &headers, &r, ProfileMsg::GetView).await?;
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
    security(("bearer" = [])))]
pub async fn put_consent(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(r): Path<String>,
    body: Result<Json<BTreeMap<String, ConsentInput>>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    require_bearer(&headers, &state.config.auth.api_tokens)?;
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
