//! Cohort's HTTP surface (axum): ingest webhooks in the sources' real formats, the Profile API,
//! and operations endpoints.

pub mod auth;
pub mod cluster;
mod dlq;
pub mod error;
mod gdpr;
pub mod identity;
pub mod ingest;
mod jobs;
mod limits;
pub mod ops;
pub mod profiles;
mod quality;
mod segments;
pub mod serve;
pub mod state;

pub use error::ApiError;
pub use state::{ApiShared, ApiState};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        // Bearer tokens carry scopes (`auth.tokens`); the sources' own credentials are the others.
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "writeKey",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Basic)
                    .description(Some("Segment write key as the Basic auth user"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "twilioSignature",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-Twilio-Signature"))),
        );
        components.add_security_scheme(
            "sendgridSignature",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-Twilio-Email-Event-Webhook-Signature"))),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Cohort", description = "Real-time customer data platform for education"),
    paths(
        ingest::segment, ingest::twilio, ingest::sendgrid, ingest::salesforce_cdc, ingest::salesforce_csv, ingest::connector,
        profiles::get_stats, profiles::get_profile, profiles::get_traits, profiles::get_events, profiles::get_identities, profiles::get_features,
        identity::explain, identity::list_reviews, identity::decide_review, identity::unmerge, identity::merges,
        segments::list, segments::get, segments::put, segments::delete, segments::members, segments::profile_segments,
        segments::status, segments::retry, segments::confirm, segments::changes, gdpr::export, gdpr::get_consent, gdpr::put_consent,
        gdpr::request_deletion, gdpr::get_deletion, gdpr::list_deletions,
        ops::live, ops::ready, ops::supervisors, ops::cluster, ops::metrics, ops::dlq, jobs::list, jobs::runs, jobs::run_now,
        quality::runs, quality::run, quality::report, dlq::replay,
    ),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

async fn openapi() -> impl IntoResponse {
    Json(ApiDoc::openapi())
}

/// The method as a metric label: any client may send a made-up method, and each would be a
/// series of its own.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Records every request's latency by route template, method and status.
async fn track_latency(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let method = method_label(req.method());
    let http1 = req.version() <= axum::http::Version::HTTP_11;
    let mut resp = next.run(req).await;
    if http1 && resp.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        // A body refused for its size may not have been read to its end (streamed, or over
        // what `refuse_oversized` drains), so the server closes the connection after answering. Saying so keeps a keep-alive client from sending its next
        // request into the closed socket (a broken pipe).
        resp.headers_mut().insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
    }
    let status = resp.status().as_u16().to_string();
    state
        .metrics
        .api_latency
        .with_label_values(&[route.as_str(), method, status.as_str()])
        .observe(started.elapsed().as_secs_f64());
    resp
}

/// The most of an oversized body read and thrown away before the 413, and for how long.
const DRAIN_BYTES: u64 = 64 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// A body its Content-Length puts over the route's limit is refused before anything reads it.
/// It is read to its end and thrown away first (up to [`DRAIN_BYTES`], within [`DRAIN_TIME`]):
/// a client still sending it when the server answers and closes would get a broken pipe instead
/// of the 413.
async fn refuse_oversized(State(limit): State<usize>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let Some(length) = declared.filter(|n| *n > limit as u64) else { return next.run(req).await };
    if length <= DRAIN_BYTES {
        use futures::StreamExt;
        let mut body = req.into_body().into_data_stream();
        let _ = tokio::time::timeout(DRAIN_TIME, async { while let Some(Ok(_)) = body.next().await {} }).await;
    }
    ApiError::PayloadTooLarge(format!("the request body ({length} bytes) is over this route's limit of {limit} bytes"))
        .into_response()
}

/// Bodies over `limit` get a 413: announced ones before anything reads them (drained first),
/// streamed ones as they pass it.
fn limit_bodies(routes: Router<ApiState>, limit: usize) -> Router<ApiState> {
    routes.route_layer(middleware::from_fn_with_state(limit, refuse_oversized)).layer(DefaultBodyLimit::max(limit))
}

/// The whole HTTP API.
pub fn router(state: ApiState) -> Router {
    let cfg = &state.config.server;
    let body_limit = cfg.max_body_bytes;
    // The store (MongoDB) or the warehouse (BigQuery) may hold less in one record than the
    // configuration allows; the CLI importer halves its chunks when refused.
    let import_limit =
        [state.store.max_raw_payload_bytes(), state.warehouse.as_ref().and_then(|w| w.max_raw_payload_bytes())]
            .into_iter()
            .flatten()
            .fold(cfg.max_import_body_bytes, usize::min);
    let timeout = Duration::from_millis(cfg.request_timeout_ms);
    let import = Router::new().route("/v1/import/salesforce/contacts", post(ingest::salesforce_csv));
    let import = limit_bodies(import, import_limit);
    let api = Router::new()
        .route("/v1/{call}", post(ingest::segment))
        .route("/webhooks/twilio/whatsapp", post(ingest::twilio))
        .route("/webhooks/sendgrid/events", post(ingest::sendgrid))
        .route("/webhooks/salesforce/cdc", post(ingest::salesforce_cdc))
        .route("/webhooks/connectors/{name}", post(ingest::connector))
        .route("/v1/profiles/stats", get(profiles::get_stats))
        .route("/v1/profiles/{ref}", get(profiles::get_profile))
        .route("/v1/profiles/{ref}/traits", get(profiles::get_traits))
        .route("/v1/profiles/{ref}/events", get(profiles::get_events))
        .route("/v1/profiles/{ref}/identities", get(profiles::get_identities))
        .route("/v1/profiles/{ref}/features", get(profiles::get_features))
        .route("/v1/identity/explain", get(identity::explain))
        .route("/v1/identity/reviews", get(identity::list_reviews))
        .route("/v1/identity/reviews/{id}/{decision}", post(identity::decide_review))
        .route("/v1/profiles/{ref}/unmerge", post(identity::unmerge))
        .route("/v1/profiles/{ref}/merges", get(identity::merges))
        .route("/v1/profiles/{ref}/segments", get(segments::profile_segments))
        .route("/v1/segments", get(segments::list))
        .route("/v1/segment-changes", get(segments::changes))
        .route("/v1/segments/{name}", get(segments::get).put(segments::put).delete(segments::delete))
        .route("/v1/segments/{name}/members", get(segments::members))
        .route("/v1/reverse-etl/status", get(segments::status))
        .route("/v1/gdpr/exports/{ref}", get(gdpr::export))
        .route("/v1/gdpr/deletions", post(gdpr::request_deletion).get(gdpr::list_deletions))
        .route("/v1/gdpr/deletions/{id}", get(gdpr::get_deletion))
        .route("/v1/profiles/{ref}/consent", get(gdpr::get_consent).put(gdpr::put_consent))
        .route("/v1/reverse-etl/retry", post(segments::retry))
        .route("/v1/reverse-etl/confirm/{activation}", post(segments::confirm))
        .route("/v1/dlq", get(ops::dlq))
        .route("/v1/dlq/replay", post(dlq::replay))
        .route("/v1/jobs", get(jobs::list))
        .route("/v1/jobs/{name}/runs", get(jobs::runs))
        .route("/v1/jobs/{name}/run", post(jobs::run_now))
        .route("/v1/quality/runs", get(quality::runs))
        .route("/v1/quality/runs/{id}", get(quality::run))
        .route("/v1/quality/report", get(quality::report))
        .route("/v1/supervisors", get(ops::supervisors))
        .route("/v1/cluster", get(ops::cluster))
        .route("/health/live", get(ops::live))
        .route("/health/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(openapi));
    let api = limit_bodies(api, body_limit);
    let limits =
        Arc::new(limits::Limits::new(cfg.ingest_requests_per_second, cfg.api_requests_per_second, cfg.max_in_flight));
    api.merge(import)
        .layer(middleware::from_fn_with_state(state.clone(), cluster::route_to_owner))
        .layer(middleware::from_fn_with_state(state.clone(), auth::authorize))
        .layer(middleware::from_fn_with_state((state.clone(), limits), limits::limit))
        .layer(middleware::from_fn_with_state(state.clone(), track_latency))
        .layer(TimeoutLayer::with_status_code(axum::http::StatusCode::SERVICE_UNAVAILABLE, timeout))
        .layer(middleware::from_fn(error::json_errors))
        // Correlation: every request gets an `x-request-id` (the caller's, or a new UUID), which
        // every log line written while handling it carries and the response returns.
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("");
                    let route = req.extensions().get::<MatchedPath>().map(MatchedPath::as_str).unwrap_or("unmatched");
                    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), route = %route);
                    // A caller's W3C trace context makes this request part of its trace.
                    let parent = req.headers().get("traceparent").and_then(|v| v.to_str().ok());
                    cohort_actors::trace::continue_from(&span, parent);
                    span
                })
                .on_response(tower_http::trace::DefaultOnResponse::new().level(tracing::Level::DEBUG)),
        )
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;
    use std::collections::BTreeSet;

    /// Made-up methods share one label; the usual ones keep theirs.
    #[test]
    fn unknown_methods_share_one_metric_label() {
        let m = |s: &str| super::method_label(&axum::http::Method::from_bytes(s.as_bytes()).unwrap());
        assert_eq!((m("GET"), m("PUT"), m("HEAD")), ("GET", "PUT", "HEAD"));
        assert_eq!((m("R1234"), m("PURGE"), m("X")), ("other", "other", "other"));
    }

    /// The document and the enforced policy agree on every operation's scopes.
    #[test]
    fn every_documented_operation_has_the_policy_its_document_states() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
        let paths = doc["paths"].as_object().cloned().unwrap_or_default();
        assert!(!paths.is_empty());
        for (template, item) in paths {
            for (method, op) in item.as_object().cloned().unwrap_or_default() {
                let m: Method = method.to_uppercase().parse().unwrap_or(Method::OPTIONS);
                let documented: BTreeSet<String> = op["security"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|alt| alt.get("bearer").and_then(|s| s.as_array()).cloned())
                    .flatten()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect();
                let enforced = match auth::policy(&m, &template) {
                    Some(auth::Policy::Scoped(s)) | Some(auth::Policy::SourceOrScoped(s)) => {
                        s.iter().map(|s| s.to_string()).collect()
                    }
                    Some(auth::Policy::Connector) => BTreeSet::from(["ingest:{name}".to_string()]),
                    Some(auth::Policy::Open) => BTreeSet::new(),
                    other => panic!("{method} {template}: policy {other:?}"),
                };
                assert_eq!(documented, enforced, "{method} {template}");
            }
        }
    }
}
