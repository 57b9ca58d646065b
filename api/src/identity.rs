//! Identity endpoints: why two profiles are (or are not) likely one student.

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::Json;
use cohort_actors::matching::{compare, MatchModel, MatchRecord};
use cohort_messages::msgs::ProfileMsg;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::require_bearer;
use crate::profiles::{ask, resolve_ref};
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
    security(("bearer" = [])))]
pub async fn explain(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<ExplainQuery>,
) -> Result<Json<Value>, ApiError> {
    require_bearer(&headers, &state.config.auth.api_tokens)?;
    let a = resolve_ref(&state, &q.a).await?;
    let b = resolve_ref(&state, &q.b).await?;
    // Live views, so a comparison sees what was applied a moment ago.
    let (a, view_a) = ask(&state, a, ProfileMsg::GetView).await?;
    let (b, view_b) = ask(&state, b, ProfileMsg::GetView).await?;
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
