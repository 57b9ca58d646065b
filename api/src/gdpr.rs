//! GDPR access and portability (Art. 15 and 20): everything Cohort holds about a person, as JSON.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use chrono::Utc;
use cohort_actors::segments::engine::{member_key, MEMBERS};
use cohort_adapters::{Layer, QueryValue};
use cohort_messages::msgs::ProfileMsg;
use cohort_messages::NewAuditEntry;
use serde_json::{json, Value};

use crate::profiles::query;
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
    // Review items are few; the queue is read a page at a time.
    let mut reviews = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.list_review_items(None, after.as_deref(), 500).await.map_err(unavailable)?;
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        let full = page.len() == 500;
        reviews.extend(page.into_iter().filter(|i| i.profiles.contains(&id)));
        if !full {
            break;
        }
    }
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
