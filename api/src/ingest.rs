//! Ingest endpoints, speaking each source's real format.

use crate::auth::{basic_user, ct_eq, Principal};
use crate::error::ApiError;
use crate::state::ApiState;
use axum::body::Bytes;
use axum::extract::{Extension, OriginalUri, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use cohort_actors::normalize::signature::{verify_sendgrid, verify_twilio};
use cohort_messages::msgs::{IngestError, IngestMsg, IngestReceipt, PayloadFormat, RawPayload, SegmentCall};
use cohort_messages::Source;
use ractor::rpc::CallResult;
use serde::Deserialize;
use serde_json::json;

/// Hands a payload to its source's IngestActor and waits until it is durable.
pub async fn submit(state: &ApiState, payload: RawPayload) -> Result<IngestReceipt, ApiError> {
    submit_as(state, payload, true).await
}

/// [`submit`]; `dead_letters` false keeps refusals out of the dead-letter store (a replay).
pub async fn submit_as(state: &ApiState, payload: RawPayload, dead_letters: bool) -> Result<IngestReceipt, ApiError> {
    let (slot, queue) = match payload.format {
        PayloadFormat::Connector { name } => state.connector_ingest.get(name.as_str()),
        _ => state.ingest.get(&payload.source),
    }
    .ok_or_else(|| ApiError::Unavailable(format!("no ingest actor for {}", payload.source)))?;
    let actor = slot.get().ok_or_else(|| ApiError::Unavailable("ingest actor restarting".into()))?;
    queue.enqueued();
    let trace = cohort_actors::trace::current();
    let result =
        actor.call(|reply| IngestMsg::Receive { payload, trace, dead_letters, reply }, Some(state.call_timeout)).await;
    match result {
        Ok(CallResult::Success(Ok(receipt))) => Ok(receipt),
        Ok(CallResult::Success(Err(IngestError::Malformed(m)))) => Err(ApiError::BadRequest(m)),
        Ok(CallResult::Success(Err(IngestError::TooLarge(m)))) => Err(ApiError::PayloadTooLarge(m)),
        Ok(CallResult::Success(Err(IngestError::Unavailable(m)))) => Err(ApiError::Unavailable(m)),
        Ok(CallResult::Timeout) => Err(ApiError::Unavailable("ingest timed out".into())),
        Ok(CallResult::SenderError) => Err(ApiError::Unavailable("ingest actor stopped".into())),
        Err(_) => {
            queue.dequeued();
            Err(ApiError::Unavailable("ingest actor unavailable".into()))
        }
    }
}

fn receipt_json(r: &IngestReceipt) -> Json<serde_json::Value> {
    Json(json!({
        "success": true,
        "accepted": r.accepted,
        "duplicates": r.duplicates,
        "rejected": r.rejected,
        "suppressed": r.suppressed,
    }))
}

/// The request's content type, without any `connector=` parameter: that one is Cohort's own
/// mark on a connector's dead letters, and a client must not be able to forge it.
fn content_type(headers: &HeaderMap) -> String {
    let raw = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    raw.split(';')
        .filter(|p| !p.trim().to_ascii_lowercase().starts_with("connector="))
        .take(8)
        .collect::<Vec<_>>()
        .join(";")
        .chars()
        .take(200)
        .collect()
}

/// An authenticated request body, stamped with its receipt time.
fn raw(source: Source, format: PayloadFormat, headers: &HeaderMap, body: &Bytes) -> RawPayload {
    RawPayload {
        source,
        format,
        body: body.to_vec().into(),
        content_type: content_type(headers),
        received_at: Utc::now(),
    }
}

/// Submits and answers with the receipt.
async fn ingest_json(state: &ApiState, payload: RawPayload) -> Result<Response, ApiError> {
    let receipt = submit(state, payload).await?;
    Ok(receipt_json(&receipt).into_response())
}

#[derive(Deserialize)]
struct WriteKeyOnly {
    #[serde(rename = "writeKey")]
    write_key: Option<String>,
}

/// Which source a Segment call is for: the source its write key belongs to, or for a bearer
/// token (already checked for `ingest:web` or `ingest:mobile`) the first of the two it holds.
fn segment_source(
    state: &ApiState,
    principal: Option<&Principal>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Source, ApiError> {
    if let Some(p) = principal {
        return Ok(if p.allows("ingest:web") { Source::Web } else { Source::Mobile });
    }
    let key = match basic_user(headers) {
        Some(k) => k,
        None => serde_json::from_slice::<WriteKeyOnly>(body).ok().and_then(|w| w.write_key).ok_or_else(|| {
            ApiError::Unauthorized("missing write key (Basic auth `writeKey:` or body `writeKey`)".into())
        })?,
    };
    let s = &state.config.sources;
    if ct_eq(&key, &s.web.write_key) {
        Ok(Source::Web)
    } else if ct_eq(&key, &s.mobile.write_key) {
        Ok(Source::Mobile)
    } else {
        Err(ApiError::Unauthorized("invalid write key".into()))
    }
}

/// Segment HTTP Tracking API: `POST /v1/{identify,track,page,screen,group,alias,batch}`.
#[utoipa::path(post, path = "/v1/{call}", tag = "ingest",
    params(("call" = String, Path, description = "identify, track, page, screen, group, alias or batch")),
    request_body(content = serde_json::Value, description = "A Segment Spec call or batch", content_type = "application/json"),
    responses((status = 200, description = "Accepted and durable"), (status = 400, description = "Malformed"),
        (status = 401, description = "Wrong write key"), (status = 413, description = "Over Segment's size limits"),
        (status = 503, description = "Storage unavailable, retry")),
    security(("writeKey" = []), ("bearer" = ["ingest:web"]), ("bearer" = ["ingest:mobile"])))]
pub async fn segment(
    State(state): State<ApiState>,
    Path(call): Path<String>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let call = SegmentCall::parse(&call).ok_or_else(|| ApiError::NotFound(format!("no Segment call `{call}`")))?;
    let source = segment_source(&state, principal.as_deref(), &headers, &body)?;
    ingest_json(&state, raw(source, PayloadFormat::Segment { call }, &headers, &body)).await
}

/// The URL Twilio signed: the configured public URL, or the one the request was sent to.
fn twilio_url(state: &ApiState, headers: &HeaderMap, uri: &axum::http::Uri) -> String {
    let path_q = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let public = state.config.sources.whatsapp.public_url.trim_end_matches('/');
    if !public.is_empty() {
        return format!("{public}{path_q}");
    }
    let proto = headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()).unwrap_or("http");
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("localhost");
    format!("{proto}://{host}{path_q}")
}

/// Twilio inbound WhatsApp message webhook (form-encoded, `X-Twilio-Signature`).
#[utoipa::path(post, path = "/webhooks/twilio/whatsapp", tag = "ingest",
    request_body(content = String, description = "Twilio webhook form", content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, description = "Accepted (empty TwiML)"), (status = 400, description = "Malformed"),
        (status = 401, description = "Missing or invalid signature"), (status = 503, description = "Retry")),
    security(("twilioSignature" = []), ("bearer" = ["ingest:whatsapp"])))]
pub async fn twilio(
    State(state): State<ApiState>,
    OriginalUri(uri): OriginalUri,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    // A relay holding an `ingest:whatsapp` token (checked before this handler) needs no signature.
    if principal.is_none() {
        let signature = headers
            .get("x-twilio-signature")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ApiError::Unauthorized("missing X-Twilio-Signature".into()))?;
        let params: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
        let url = twilio_url(&state, &headers, &uri);
        if !verify_twilio(&state.config.sources.whatsapp.auth_token, &url, &params, signature) {
            return Err(ApiError::Unauthorized("invalid X-Twilio-Signature".into()));
        }
    }
    let payload = raw(Source::Whatsapp, PayloadFormat::TwilioForm, &headers, &body);
    submit(&state, payload).await?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/xml")],
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response></Response>",
    )
        .into_response())
}

/// SendGrid Event Webhook (JSON array; ECDSA-signed when a key is configured).
#[utoipa::path(post, path = "/webhooks/sendgrid/events", tag = "ingest",
    request_body(content = serde_json::Value, description = "Array of SendGrid events", content_type = "application/json"),
    responses((status = 200, description = "Accepted"), (status = 400, description = "Malformed"),
        (status = 401, description = "Missing or invalid signature"), (status = 503, description = "Retry")),
    security(("sendgridSignature" = []), ("bearer" = ["ingest:email"])))]
pub async fn sendgrid(
    State(state): State<ApiState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    if principal.is_some() {
        // An `ingest:email` token (SendGrid's OAuth option), checked before this handler.
    } else if let Some(key) = &state.sendgrid_key {
        let sig = headers.get("x-twilio-email-event-webhook-signature").and_then(|v| v.to_str().ok());
        let ts = headers.get("x-twilio-email-event-webhook-timestamp").and_then(|v| v.to_str().ok());
        match (sig, ts) {
            (Some(sig), Some(ts)) if verify_sendgrid(key, &body, sig, ts) => {
                // A valid signature over an old timestamp is a recorded request played again.
                let max_age = state.config.sources.email.signature_max_age_secs;
                let age = ts.trim().parse::<i64>().map(|t| (chrono::Utc::now().timestamp() - t).unsigned_abs());
                if age.map_or(true, |a| a > max_age) {
                    return Err(ApiError::Unauthorized(format!(
                        "SendGrid signature timestamp is more than {max_age} s from now (a replay, or a clock far off)"
                    )));
                }
            }
            (None, _) | (_, None) => return Err(ApiError::Unauthorized("missing SendGrid signature headers".into())),
            _ => return Err(ApiError::Unauthorized("invalid SendGrid signature".into())),
        }
    } else if !state.config.sources.email.allow_unsigned {
        return Err(ApiError::Unauthorized(
            "no SendGrid verification key is configured: send a bearer token with `ingest:email`".into(),
        ));
    }
    let payload = raw(Source::Email, PayloadFormat::SendgridEvents, &headers, &body);
    ingest_json(&state, payload).await
}

/// Salesforce Change Data Capture event, relayed as JSON (bearer token of the CRM source).
#[utoipa::path(post, path = "/webhooks/salesforce/cdc", tag = "ingest",
    request_body(content = serde_json::Value, description = "A ChangeEvent", content_type = "application/json"),
    responses((status = 200, description = "Accepted"), (status = 400, description = "Malformed"),
        (status = 401, description = "Wrong token"), (status = 503, description = "Retry")),
    security(("bearer" = ["ingest:crm"])))]
pub async fn salesforce_cdc(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let payload = raw(Source::Crm, PayloadFormat::SalesforceCdc, &headers, &body);
    ingest_json(&state, payload).await
}

/// A chunk of a Salesforce Bulk API 2.0 CSV export (header row first).
#[utoipa::path(post, path = "/v1/import/salesforce/contacts", tag = "ingest",
    request_body(content = String, description = "CSV with a header row of field API names", content_type = "text/csv"),
    responses((status = 200, description = "Rows accepted, duplicates and rejected rows"), (status = 400, description = "Malformed"),
        (status = 401, description = "Wrong token"), (status = 413, description = "Chunk too large"), (status = 503, description = "Retry")),
    security(("bearer" = ["ingest:crm"])))]
pub async fn salesforce_csv(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let payload = raw(Source::Crm, PayloadFormat::SalesforceCsv, &headers, &body);
    ingest_json(&state, payload).await
}

/// A connector's webhook: the body in the connector's own format (`generate-connector`).
#[utoipa::path(post, path = "/webhooks/connectors/{name}", tag = "ingest",
    params(("name" = String, Path, description = "The connector's name")),
    request_body(content = String, description = "The connector's records: JSON, NDJSON, CSV or logfmt"),
    responses((status = 200, description = "Accepted and durable; per-record rejections listed"), (status = 400, description = "Malformed"),
        (status = 401), (status = 403), (status = 404, description = "No such connector"), (status = 413), (status = 503, description = "Retry")),
    security(("bearer" = ["ingest:{name}"])))]
pub async fn connector(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let connector =
        state.normalize.connectors.get(&name).ok_or_else(|| ApiError::NotFound(format!("no connector `{name}`")))?;
    let format = cohort_actors::normalize::connector::format_of(connector.as_ref());
    let payload = raw(connector.channel(), format, &headers, &body);
    ingest_json(&state, payload).await
}
