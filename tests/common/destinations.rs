//! Local stand-ins for Salesforce, SendGrid, Twilio and FCM that check the request shapes and
//! auth headers of the public APIs and record what they accepted. A request of the wrong shape
//! gets the 4xx the real API would give, so a broken client fails its test.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, patch, post, put};
use axum::{Json, Router};
use base64::Engine;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub const SF_TOKEN: &str = "00Dxx0000001gEP!sf-test-token";
pub const SG_KEY: &str = "SG.test-key";
pub const TWILIO_SID: &str = "AC0123456789abcdef0123456789abcdef";
pub const TWILIO_TOKEN: &str = "twilio-test-token";
pub const FCM_TOKEN: &str = "ya29.fcm-test-token";
pub const FCM_PROJECT: &str = "campus-app";

#[derive(Debug, Clone)]
#[allow(dead_code)] // each test reads what it checks
pub struct Received {
    pub api: &'static str,
    pub method: String,
    pub path: String,
    pub body: Value,
    pub idempotency_key: Option<String>,
    pub at: Instant,
}

#[derive(Default)]
pub struct Inner {
    pub received: Vec<Received>,
    /// API name → how many more requests to answer 503 (failure injection).
    pub fail_next: HashMap<&'static str, u32>,
    /// API name → delay before answering (a slow destination).
    pub delay_ms: HashMap<&'static str, u64>,
}

#[derive(Clone, Default)]
pub struct Destinations {
    pub inner: Arc<Mutex<Inner>>,
    pub base: String,
}

fn bad(message: &str) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!([{ "message": message, "errorCode": "INVALID_REQUEST" }]))).into_response()
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!([{ "message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID" }])),
    )
        .into_response()
}

fn bearer(headers: &HeaderMap, token: &str) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {token}"))
}

/// The bearer token checked (the API's own 401 when wrong), then the JSON body parsed.
fn authorized_json(
    headers: &HeaderMap,
    body: &Bytes,
    token: &str,
    unauthorized: Response,
) -> Result<Value, Box<Response>> {
    if !bearer(headers, token) {
        return Err(Box::new(unauthorized));
    }
    json_body(headers, body)
}

fn json_body(headers: &HeaderMap, body: &Bytes) -> Result<Value, Box<Response>> {
    let ct = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !ct.starts_with("application/json") {
        return Err(Box::new(bad("Content-Type must be application/json")));
    }
    serde_json::from_slice(body).map_err(|_| Box::new(bad("malformed JSON")))
}

impl Destinations {
    /// Starts the servers on one local port.
    pub async fn start() -> Destinations {
        let mut d = Destinations::default();
        let app = Router::new()
            .route("/services/data/{version}/sobjects/Task", post(sf_task))
            .route("/services/data/{version}/sobjects/Contact/{id}", patch(sf_contact).delete(sf_contact_delete))
            .route("/v3/marketing/contacts", put(sg_upsert).delete(sg_delete))
            .route("/v3/marketing/contacts/search/emails", post(sg_search))
            .route("/v3/marketing/lists/{id}/contacts", delete(sg_remove))
            .route("/2010-04-01/Accounts/{sid}/Messages.json", post(twilio_message))
            .route("/v1/projects/{project}/messages:send", post(fcm_send))
            .with_state(d.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind destinations");
        d.base = format!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        d
    }

    /// The `[reverse_etl.*]` config pointing every destination here.
    pub fn config_toml(&self) -> String {
        let b = &self.base;
        format!(
            "[reverse_etl]\nbackoff_initial_ms = 20\nbackoff_max_ms = 100\n\
             [reverse_etl.salesforce]\nurl = \"{b}\"\ntoken = \"{SF_TOKEN}\"\n\
             [reverse_etl.sendgrid]\nurl = \"{b}\"\ntoken = \"{SG_KEY}\"\n\
             [reverse_etl.twilio]\nurl = \"{b}\"\naccount_sid = \"{TWILIO_SID}\"\nauth_token = \"{TWILIO_TOKEN}\"\nfrom = \"whatsapp:+493012345678\"\n\
             [reverse_etl.push]\nurl = \"{b}\"\nproject = \"{FCM_PROJECT}\"\ntoken = \"{FCM_TOKEN}\"\n"
        )
    }

    pub fn received(&self, api: &str) -> Vec<Received> {
        self.inner.lock().unwrap().received.iter().filter(|r| r.api == api).cloned().collect()
    }

    #[allow(dead_code)] // not every test crate makes a destination fail
    pub fn fail_next(&self, api: &'static str, n: u32) {
        self.inner.lock().unwrap().fail_next.insert(api, n);
    }

    #[allow(dead_code)] // not every test crate slows a destination down
    pub fn delay(&self, api: &'static str, ms: u64) {
        self.inner.lock().unwrap().delay_ms.insert(api, ms);
    }

    /// Failure injection and slowness, then records the accepted request.
    async fn accept(
        &self,
        api: &'static str,
        method: &str,
        path: String,
        body: Value,
        headers: &HeaderMap,
    ) -> Option<Response> {
        let delay = self.inner.lock().unwrap().delay_ms.get(api).copied();
        if let Some(ms) = delay {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        {
            let mut inner = self.inner.lock().unwrap();
            if let Some(n) = inner.fail_next.get_mut(api).filter(|n| **n > 0) {
                *n -= 1;
                return Some((StatusCode::SERVICE_UNAVAILABLE, "try later").into_response());
            }
            inner.received.push(Received {
                api,
                method: method.into(),
                path,
                body,
                idempotency_key: headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(String::from),
                at: Instant::now(),
            });
        }
        None
    }
}

async fn sf_task(
    State(d): State<Destinations>,
    Path(version): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let v = match authorized_json(&headers, &body, SF_TOKEN, unauthorized()) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    if !version.starts_with('v') {
        return (StatusCode::NOT_FOUND, "unknown API version").into_response();
    }
    let Some(obj) = v.as_object() else { return bad("body must be an object") };
    if !obj
        .get("WhoId")
        .and_then(Value::as_str)
        .is_some_and(|w| w.starts_with("003") && (w.len() == 15 || w.len() == 18))
    {
        return bad("WhoId must be a Contact id");
    }
    if obj.get("Subject").and_then(Value::as_str).is_none_or(str::is_empty) {
        return bad("Required fields are missing: [Subject]");
    }
    if let Some(r) = d.accept("salesforce", "POST", "Task".into(), v, &headers).await {
        return r;
    }
    (StatusCode::CREATED, Json(json!({ "id": "00T5e00000AbCdEAAV", "success": true, "errors": [] }))).into_response()
}

async fn sf_contact(
    State(d): State<Destinations>,
    Path((_v, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let v = match authorized_json(&headers, &body, SF_TOKEN, unauthorized()) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    if !id.starts_with("003") {
        return (StatusCode::NOT_FOUND, "entity not found").into_response();
    }
    if v.as_object().is_none_or(|o| o.is_empty() || o.contains_key("Id")) {
        return bad("fields to update, without Id");
    }
    if let Some(r) = d.accept("salesforce", "PATCH", format!("Contact/{id}"), v, &headers).await {
        return r;
    }
    StatusCode::NO_CONTENT.into_response()
}

/// `DELETE /sobjects/Contact/{id}`: 204, or 404 `ENTITY_IS_DELETED` the second time.
async fn sf_contact_delete(
    State(d): State<Destinations>,
    Path((version, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if !bearer(&headers, SF_TOKEN) {
        return unauthorized();
    }
    if !version.starts_with('v') || !id.starts_with("003") || !(id.len() == 15 || id.len() == 18) {
        return (StatusCode::NOT_FOUND, Json(json!([{ "message": "Provided external ID field does not exist or is not accessible", "errorCode": "NOT_FOUND" }]))).into_response();
    }
    let path = format!("Contact/{id}");
    let deleted_before = d.received("salesforce").iter().any(|r| r.method == "DELETE" && r.path == path);
    if let Some(r) = d.accept("salesforce", "DELETE", path, Value::Null, &headers).await {
        return r;
    }
    if deleted_before {
        return (
            StatusCode::NOT_FOUND,
            Json(json!([{ "message": "entity is deleted", "errorCode": "ENTITY_IS_DELETED" }])),
        )
            .into_response();
    }
    StatusCode::NO_CONTENT.into_response()
}

/// `DELETE /v3/marketing/contacts?ids=a,b`: 202 with a job id.
async fn sg_delete(
    State(d): State<Destinations>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if !bearer(&headers, SG_KEY) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let Some(ids) = q.get("ids").filter(|i| !i.is_empty() && !i.contains(' ')) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({ "errors": [{ "field": "ids", "message": "ids or delete_all_contacts required" }] })),
        )
            .into_response();
    };
    if let Some(r) = d.accept("sendgrid", "DELETE", "contacts".into(), json!({ "ids": ids }), &headers).await {
        return r;
    }
    (StatusCode::ACCEPTED, Json(json!({ "job_id": "d7a0b1c2-delete" }))).into_response()
}

async fn sg_upsert(State(d): State<Destinations>, headers: HeaderMap, body: Bytes) -> Response {
    let v = match authorized_json(
        &headers,
        &body,
        SG_KEY,
        (StatusCode::UNAUTHORIZED, Json(json!({ "errors": [{ "message": "authorization required" }] })))
            .into_response(),
    ) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let lists_ok = v["list_ids"].as_array().is_some_and(|l| l.iter().all(Value::is_string));
    // Reserved fields on the contact, others only under `custom_fields` (an object).
    const RESERVED: &[&str] = &[
        "email",
        "address_line_1",
        "address_line_2",
        "alternate_emails",
        "city",
        "country",
        "first_name",
        "last_name",
        "postal_code",
        "state_province_region",
        "phone_number",
        "whatsapp",
        "line",
        "facebook",
        "unique_name",
        "external_id",
        "custom_fields",
    ];
    let contact_ok = |c: &Value| {
        c["email"].as_str().is_some_and(|e| e.contains('@'))
            && c.as_object().is_some_and(|o| o.keys().all(|k| RESERVED.contains(&k.as_str())))
            && (c.get("custom_fields").is_none() || c["custom_fields"].is_object())
    };
    let contacts_ok = v["contacts"].as_array().is_some_and(|c| !c.is_empty() && c.iter().all(contact_ok));
    if !lists_ok || !contacts_ok {
        return (StatusCode::BAD_REQUEST, Json(json!({ "errors": [{ "field": "contacts", "message": "invalid" }] })))
            .into_response();
    }
    if let Some(r) = d.accept("sendgrid", "PUT", "contacts".into(), v, &headers).await {
        return r;
    }
    (StatusCode::ACCEPTED, Json(json!({ "job_id": "2387e363-4104-4225-8960-4a5758492351" }))).into_response()
}

async fn sg_search(State(d): State<Destinations>, headers: HeaderMap, body: Bytes) -> Response {
    let v = match authorized_json(&headers, &body, SG_KEY, StatusCode::UNAUTHORIZED.into_response()) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let Some(emails) = v["emails"].as_array() else { return bad("emails required") };
    let mut result = serde_json::Map::new();
    for e in emails.iter().filter_map(Value::as_str) {
        result.insert(e.into(), json!({ "contact": { "id": format!("contact-{}", e.len()), "email": e } }));
    }
    if let Some(r) = d.accept("sendgrid", "POST", "search".into(), v, &headers).await {
        return r;
    }
    Json(json!({ "result": result })).into_response()
}

async fn sg_remove(
    State(d): State<Destinations>,
    Path(list): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if !bearer(&headers, SG_KEY) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let Some(ids) = q.get("contact_ids").filter(|i| !i.is_empty()) else { return bad("contact_ids required") };
    if let Some(r) =
        d.accept("sendgrid", "DELETE", format!("lists/{list}"), json!({ "contact_ids": ids }), &headers).await
    {
        return r;
    }
    (StatusCode::ACCEPTED, Json(json!({ "job_id": "ab-12" }))).into_response()
}

async fn twilio_message(
    State(d): State<Destinations>,
    Path(sid): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let expected =
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{TWILIO_SID}:{TWILIO_TOKEN}")));
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) || sid != TWILIO_SID {
        return (StatusCode::UNAUTHORIZED, Json(json!({ "code": 20003, "message": "Authenticate" }))).into_response();
    }
    let ct = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !ct.starts_with("application/x-www-form-urlencoded") {
        return bad("form encoding expected");
    }
    let form: HashMap<String, String> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let whatsapp = |k: &str| form.get(k).is_some_and(|v| v.starts_with("whatsapp:+"));
    let template = form.get("ContentSid").is_some_and(|v| v.starts_with("HX"));
    let variables =
        form.get("ContentVariables").is_none_or(|v| serde_json::from_str::<Value>(v).is_ok_and(|j| j.is_object()));
    if !whatsapp("To") || !whatsapp("From") || !(template || form.contains_key("Body")) || !variables {
        return (StatusCode::BAD_REQUEST, Json(json!({ "code": 21211, "message": "invalid parameters" })))
            .into_response();
    }
    if let Some(r) = d.accept("twilio", "POST", "Messages".into(), json!(form), &headers).await {
        return r;
    }
    (StatusCode::CREATED, Json(json!({ "sid": "SM0123456789abcdef0123456789abcdef", "status": "queued" })))
        .into_response()
}

async fn fcm_send(
    State(d): State<Destinations>,
    Path(project): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !bearer(&headers, FCM_TOKEN) || project != FCM_PROJECT {
        return (StatusCode::UNAUTHORIZED, Json(json!({ "error": { "code": 401, "status": "UNAUTHENTICATED" } })))
            .into_response();
    }
    let v = match json_body(&headers, &body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let m = &v["message"];
    let ok = m["token"].as_str().is_some_and(|t| !t.is_empty())
        && m["notification"]["title"].is_string()
        && m["data"].as_object().is_none_or(|o| o.values().all(Value::is_string));
    if !ok {
        return (StatusCode::BAD_REQUEST, Json(json!({ "error": { "code": 400, "status": "INVALID_ARGUMENT" } })))
            .into_response();
    }
    if let Some(r) = d.accept("push", "POST", "messages:send".into(), v, &headers).await {
        return r;
    }
    Json(json!({ "name": format!("projects/{FCM_PROJECT}/messages/0:1500415314455276%31bd1c9631bd1c96") }))
        .into_response()
}
