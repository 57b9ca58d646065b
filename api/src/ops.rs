//! Health probes, the supervision tree, metrics and the dead-letter store.

use crate::error::ApiError;
use crate::state::ApiState;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;

#[utoipa::path(get, path = "/health/live", tag = "ops", responses((status = 200, description = "The process is up")))]
pub async fn live() -> Json<Value> {
    Json(json!({ "status": "live" }))
}

#[utoipa::path(get, path = "/health/ready", tag = "ops",
    responses((status = 200, description = "Ready for traffic"), (status = 503, description = "Starting (including: not yet given partitions by its Kafka consumer groups), degraded or stopping")))]
pub async fn ready(State(state): State<ApiState>) -> Response {
    let started = state.ready.load(Ordering::SeqCst);
    let supervised = state.health.is_ready();
    let store = state.store.ping().await.is_ok();
    let joined = state.bus.joined();
    let ok = started && supervised && store && joined;
    let body = Json(
        json!({ "ready": ok, "started": started, "supervision": supervised, "store": store, "consumer_groups_joined": joined }),
    );
    if ok {
        (StatusCode::OK, body).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], body).into_response()
    }
}

#[utoipa::path(get, path = "/v1/supervisors", tag = "ops",
    responses((status = 200, description = "Every supervised child: status, restarts, last failure"), (status = 401)),
    security(("bearer" = ["ops:read"])))]
pub async fn supervisors(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "ready": state.health.is_ready(), "children": state.health.snapshot() })))
}

#[utoipa::path(get, path = "/v1/cluster", tag = "ops",
    responses((status = 200, description = "The replicas sharing this store: name, address, partitions consumed, health, last heartbeat and whether it is recent"),
        (status = 401), (status = 503, description = "The store cannot be read")),
    security(("bearer" = ["ops:read"])))]
pub async fn cluster(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let m = &state.membership;
    let now = chrono::Utc::now();
    let listed = cohort_actors::cluster::members(state.store.as_ref(), now, m.ttl())
        .await
        .map_err(|e| ApiError::Unavailable(format!("cluster membership unavailable: {e}")))?;
    let alive = listed.iter().filter(|(_, a)| *a).count();
    let members: Vec<Value> = listed
        .into_iter()
        .map(|(r, alive)| {
            let mut v = serde_json::to_value(&r).unwrap_or(Value::Null);
            if let Some(o) = v.as_object_mut() {
                o.insert("alive".into(), json!(alive));
                o.insert("self".into(), json!(r.name == m.name));
            }
            v
        })
        .collect();
    Ok(Json(json!({
        "self": m.name,
        "alive": alive,
        "member_ttl_secs": m.ttl.as_secs(),
        "members": members,
    })))
}

#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "Prometheus text format"), (status = 401), (status = 403)),
    security(("bearer" = ["metrics:read"]), ("bearer" = ["ops:read"])))]
pub async fn metrics(State(state): State<ApiState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

#[derive(Debug, Deserialize)]
pub struct DlqQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/v1/dlq", tag = "ops",
    params(("after" = Option<u64>, Query, description = "Return records with id greater than this"),
        ("limit" = Option<usize>, Query, description = "Page size, 1-1000 (default 100)")),
    responses((status = 200, description = "Dead letters, oldest first, with raw payload and reason"), (status = 401)),
    security(("bearer" = ["ops:read"])))]
pub async fn dlq(State(state): State<ApiState>, Query(q): Query<DlqQuery>) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest("limit must be between 1 and 1000".into()));
    }
    let after = q.after.unwrap_or(0);
    let letters =
        state.store.list_dead_letters(after, limit).await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
    let total = state.store.count_dead_letters().await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
    let next = if letters.len() == limit { letters.last().map(|l| l.id) } else { None };
    Ok(Json(json!({ "dead_letters": letters, "total": total, "next_after": next })))
}
