//! Scheduled jobs: what is scheduled, each job's run history, and running one now.

use crate::error::ApiError;
use crate::state::ApiState;
use axum::extract::{Path, Query, State};
use axum::Json;
use cohort_actors::jobs::job_runs;
use cohort_messages::msgs::JobsMsg;
use ractor::rpc::CallResult;
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Duration;

#[utoipa::path(get, path = "/v1/jobs", tag = "ops",
    responses((status = 200, description = "Every scheduled job: cron schedule (UTC), next run, whether it runs now, its last run on this replica"),
        (status = 401), (status = 503)),
    security(("bearer" = ["ops:read"])))]
pub async fn list(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let scheduler = state.jobs.get().ok_or_else(|| ApiError::Unavailable("job scheduler restarting".into()))?;
    match scheduler.call(JobsMsg::List, Some(state.call_timeout)).await {
        Ok(CallResult::Success(jobs)) => Ok(Json(json!({ "jobs": jobs }))),
        _ => Err(ApiError::Unavailable("job scheduler did not answer".into())),
    }
}

#[derive(Debug, Deserialize)]
pub struct RunsPage {
    after: Option<String>,
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/v1/jobs/{name}/runs", tag = "ops",
    params(("name" = String, Path, description = "A job name"),
        ("after" = Option<String>, Query, description = "The last run id of the previous page"),
        ("limit" = Option<usize>, Query, description = "At most this many (default 100, at most 1000)")),
    responses((status = 200, description = "The job's runs on every replica, oldest first: due time, owner, status, timings, error or summary"),
        (status = 401), (status = 503)),
    security(("bearer" = ["ops:read"])))]
pub async fn runs(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Query(page): Query<RunsPage>,
) -> Result<Json<Value>, ApiError> {
    let limit = page.limit.unwrap_or(100).clamp(1, 1000);
    let runs = job_runs(state.store.as_ref(), &name, page.after.as_deref(), limit)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    let next = (runs.len() == limit).then(|| runs.last().map(|r| r.run_id.clone())).flatten();
    Ok(Json(json!({ "job": name, "runs": runs, "next_after": next })))
}

#[utoipa::path(post, path = "/v1/jobs/{name}/run", tag = "ops",
    params(("name" = String, Path, description = "A job name")),
    responses((status = 200, description = "The run, once finished (also recorded in the history)"),
        (status = 401), (status = 404), (status = 409, description = "Running already"), (status = 503)),
    security(("bearer" = ["ops:admin"])))]
pub async fn run_now(State(state): State<ApiState>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let scheduler = state.jobs.get().ok_or_else(|| ApiError::Unavailable("job scheduler restarting".into()))?;
    let job = name.clone();
    // A job may take long (a reconciliation of every profile); the caller waits for it.
    match scheduler.call(|reply| JobsMsg::RunNow { job, reply }, Some(Duration::from_secs(3600))).await {
        Ok(CallResult::Success(Ok(run))) => Ok(Json(json!(run))),
        Ok(CallResult::Success(Err(e))) if e.starts_with("no job") => Err(ApiError::NotFound(e)),
        Ok(CallResult::Success(Err(e))) if e.contains("already") || e.contains("elsewhere") => {
            Err(ApiError::Conflict(e))
        }
        Ok(CallResult::Success(Err(e))) => Err(ApiError::Unavailable(e)),
        _ => Err(ApiError::Unavailable("job scheduler did not answer".into())),
    }
}
