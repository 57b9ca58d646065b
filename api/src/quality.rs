//! Quality gates: stored checkpoint runs, and a data-docs style HTML report of them.

use crate::error::ApiError;
use crate::state::ApiState;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use cohort_actors::quality::{get_run, list_runs, report_html};
use cohort_messages::{Gate, QualityRun};
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Debug, Deserialize)]
pub struct RunsQuery {
    gate: Option<u8>,
    since: Option<DateTime<Utc>>,
    limit: Option<usize>,
}

async fn runs_of(state: &ApiState, q: &RunsQuery) -> Result<Vec<QualityRun>, ApiError> {
    let gate = match q.gate {
        None => None,
        Some(n) => Some(Gate::from_number(n).ok_or_else(|| ApiError::BadRequest("gate must be 1, 2, 3 or 4".into()))?),
    };
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest("limit must be between 1 and 1000".into()));
    }
    let since = q.since.unwrap_or_else(|| Utc::now() - ChronoDuration::days(7));
    list_runs(state.store.as_ref(), gate, since, limit).await.map_err(|e| ApiError::Unavailable(e.to_string()))
}

#[utoipa::path(get, path = "/v1/quality/runs", tag = "ops",
    params(("gate" = Option<u8>, Query, description = "Only this gate (1-4)"),
        ("since" = Option<String>, Query, description = "RFC 3339; default 7 days ago"),
        ("limit" = Option<usize>, Query, description = "At most this many, newest first (default 100, at most 1000)")),
    responses((status = 200, description = "Quality gate runs, newest first: gate, checkpoint, trigger, success, each expectation's observed and expected values and failing ids"),
        (status = 400), (status = 401), (status = 403), (status = 503)),
    security(("bearer" = ["ops:read"])))]
pub async fn runs(State(state): State<ApiState>, Query(q): Query<RunsQuery>) -> Result<Json<Value>, ApiError> {
    let runs = runs_of(&state, &q).await?;
    let failing: Vec<u8> = cohort_actors::quality::latest_per_gate(&runs)
        .into_iter()
        .filter(|(_, r)| !r.success)
        .map(|(g, _)| g)
        .collect();
    Ok(Json(json!({ "runs": runs, "failing_gates": failing })))
}

#[utoipa::path(get, path = "/v1/quality/runs/{id}", tag = "ops",
    params(("id" = String, Path, description = "A run id (`quality:...`)")),
    responses((status = 200, description = "One run"), (status = 401), (status = 403), (status = 404), (status = 503)),
    security(("bearer" = ["ops:read"])))]
pub async fn run(State(state): State<ApiState>, Path(id): Path<String>) -> Result<Json<QualityRun>, ApiError> {
    get_run(state.store.as_ref(), &id)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no quality run `{id}`")))
}

#[utoipa::path(get, path = "/v1/quality/report", tag = "ops",
    params(("gate" = Option<u8>, Query, description = "Only this gate (1-4)"),
        ("since" = Option<String>, Query, description = "RFC 3339; default 7 days ago"),
        ("limit" = Option<usize>, Query, description = "At most this many runs (default 100)")),
    responses((status = 200, description = "An HTML report of the runs (like Great Expectations' data docs)", content_type = "text/html"),
        (status = 401), (status = 403), (status = 503)),
    security(("bearer" = ["ops:read"])))]
pub async fn report(State(state): State<ApiState>, Query(q): Query<RunsQuery>) -> Result<Response, ApiError> {
    let runs = runs_of(&state, &q).await?;
    Ok(([(header::CONTENT_TYPE, "text/html; charset=utf-8")], report_html(&runs)).into_response())
}
