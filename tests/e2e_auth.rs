//! Scoped API tokens: every route in the OpenAPI document refuses a missing token, a token
//! without its scope and a revoked token, and tokens rotate without a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use cohort::demo::DemoServer;
use cohort::SystemOptions;
use cohort_api::auth::token_digest;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

/// Every scope but `*`, each held by its own token `tok-<scope>`.
fn scopes() -> Vec<&'static str> {
    cohort_config::SCOPES.iter().copied().filter(|s| *s != "*").collect()
}

fn entry(name: &str, secret: &str, scopes: &[&str], revoked: bool) -> String {
    let scopes: Vec<String> = scopes.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "[[tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\nscopes = [{}]\nrevoked = {revoked}\n\n",
        token_digest(secret),
        scopes.join(", ")
    )
}

async fn start(tokens_file: &Path) -> DemoServer {
    let extra = format!("[auth]\ntokens_file = \"{}\"\nreload_interval_secs = 1\n", tokens_file.display());
    DemoServer::start(None, &extra, SystemOptions::default()).await.expect("cohort starts")
}

async fn call(demo: &DemoServer, method: &Method, path: &str, token: Option<&str>) -> StatusCode {
    let mut req = demo.client.http.request(method.clone(), format!("{}{path}", demo.base));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if *method == Method::POST || *method == Method::PUT {
        req = req.header("content-type", "application/json").body("{}");
    }
    req.send().await.unwrap().status()
}

/// A concrete path for a route template; the values name nothing that exists.
fn concrete(template: &str) -> String {
    template
        .replace("{call}", "track")
        .replace("{ref}", "email:nobody@example.invalid")
        .replace("{id}", "00000000-0000-0000-0000-000000000000")
        .replace("{decision}", "approve")
        .replace("{name}", "no_such_thing")
        .replace("{activation}", "no-such-activation")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_in_the_openapi_document_refuses_missing_wrong_scope_and_revoked_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.toml");
    let mut text: String = scopes().iter().map(|s| entry(s, &format!("tok-{s}"), &[s], false)).collect();
    text += &entry("revoked", "tok-revoked", &["*"], true);
    std::fs::write(&file, text).unwrap();
    let demo = start(&file).await;

    let doc = demo.client.get("/openapi.json").await.unwrap();
    assert_eq!(doc.status, 200);
    let paths = doc.body["paths"].as_object().unwrap();
    let mut checked = 0;
    let mut open = BTreeSet::new();
    for (template, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            let method: Method = method.to_uppercase().parse().unwrap();
            let path = concrete(template);
            let security = op["security"].as_array().cloned().unwrap_or_default();
            if security.is_empty() {
                open.insert(template.clone());
                continue;
            }
            // The scopes any one alternative accepts; other schemes are the source's own credential.
            let allowed: BTreeSet<String> = security
                .iter()
                .filter_map(|alt| alt.get("bearer"))
                .flat_map(|s| s.as_array().cloned().unwrap_or_default())
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect();
            assert!(!allowed.is_empty(), "{method} {template}: no bearer scope in the document");
            let route = format!("{method} {template}");

            assert_eq!(call(&demo, &method, &path, None).await, StatusCode::UNAUTHORIZED, "{route} without a token");
            assert_eq!(
                call(&demo, &method, &path, Some("tok-revoked")).await,
                StatusCode::UNAUTHORIZED,
                "{route} with a revoked token"
            );
            assert_eq!(
                call(&demo, &method, &path, Some("not-a-token-at-all")).await,
                StatusCode::UNAUTHORIZED,
                "{route} with an unknown token"
            );
            for scope in scopes() {
                let status = call(&demo, &method, &path, Some(&format!("tok-{scope}"))).await;
                if allowed.contains(scope) {
                    assert!(
                        status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                        "{route} refused its own scope {scope}: {status}"
                    );
                } else {
                    assert_eq!(status, StatusCode::FORBIDDEN, "{route} let in a token with only {scope}");
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 37, "only {checked} operations were walked");
    assert_eq!(
        open,
        BTreeSet::from(["/health/live".to_string(), "/health/ready".to_string()]),
        "only the health probes may be open"
    );
    // The document itself needs a token (any scope).
    assert_eq!(call(&demo, &Method::GET, "/openapi.json", None).await, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&demo, &Method::GET, "/openapi.json", Some("tok-ops:read")).await, StatusCode::OK);
    // Refusals are counted by reason.
    let metrics = demo.client.get("/metrics").await.unwrap();
    let text = metrics.body.as_str().unwrap();
    for reason in ["missing", "revoked", "invalid", "scope"] {
        assert!(text.contains(&format!("cohort_api_auth_denied_total{{reason=\"{reason}\"}}")), "{reason}");
    }
    demo.stop().await.unwrap();
}

async fn wait_for(demo: &DemoServer, token: &str, want: StatusCode) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = call(demo, &Method::GET, "/v1/dlq", Some(token)).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{token}: still {got}, expected {want}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_rotates_without_a_restart_old_and_new_side_by_side_then_the_old_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.toml");
    std::fs::write(&file, entry("ops-v1", "ops-secret-v1", &["ops:read"], false)).unwrap();
    let demo = start(&file).await;
    assert_eq!(call(&demo, &Method::GET, "/v1/dlq", Some("ops-secret-v1")).await, StatusCode::OK);
    assert_eq!(call(&demo, &Method::GET, "/v1/dlq", Some("ops-secret-v2")).await, StatusCode::UNAUTHORIZED);

    // Step 1: the new token is added beside the old one.
    let both = entry("ops-v1", "ops-secret-v1", &["ops:read"], false)
        + &entry("ops-v2", "ops-secret-v2", &["ops:read"], false);
    std::fs::write(&file, both).unwrap();
    wait_for(&demo, "ops-secret-v2", StatusCode::OK).await;
    assert_eq!(call(&demo, &Method::GET, "/v1/dlq", Some("ops-secret-v1")).await, StatusCode::OK);

    // Step 2: the old one is revoked.
    let rotated =
        entry("ops-v1", "ops-secret-v1", &["ops:read"], true) + &entry("ops-v2", "ops-secret-v2", &["ops:read"], false);
    std::fs::write(&file, rotated).unwrap();
    wait_for(&demo, "ops-secret-v1", StatusCode::UNAUTHORIZED).await;
    assert_eq!(call(&demo, &Method::GET, "/v1/dlq", Some("ops-secret-v2")).await, StatusCode::OK);

    // A broken file keeps the tokens in force rather than locking everyone out.
    std::fs::write(&file, "[[tokens]]\nname = \"x\"\nsha256 = \"nope\"\nscopes = [\"ops:read\"]\n").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(call(&demo, &Method::GET, "/v1/dlq", Some("ops-secret-v2")).await, StatusCode::OK);
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_ingest_tokens_stand_in_for_the_sources_own_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.toml");
    let text = entry("mobile-relay", "mobile-relay-secret", &["ingest:mobile"], false)
        + &entry("email-relay", "email-relay-secret", &["ingest:email"], false);
    std::fs::write(&file, text).unwrap();
    let demo = start(&file).await;
    let body = serde_json::json!({
        "userId": "auth-student-1", "event": "Brochure Downloaded", "messageId": "auth-m-1",
        "timestamp": chrono::Utc::now().to_rfc3339(),
    });
    let r = demo
        .client
        .http
        .post(format!("{}/v1/track", demo.base))
        .bearer_auth("mobile-relay-secret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // SendGrid without a verification key: no token, no entry; the email relay's token gets in.
    let events = serde_json::json!([{ "email": "auth@example.com", "event": "open", "sg_event_id": "auth-e-1",
        "timestamp": chrono::Utc::now().timestamp() }]);
    let url = format!("{}/webhooks/sendgrid/events", demo.base);
    let r = demo.client.http.post(&url).json(&events).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = demo.client.http.post(&url).bearer_auth("email-relay-secret").json(&events).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let p = demo.client.get("/v1/profiles/user_id:auth-student-1").await.unwrap();
    assert_eq!(p.status, 200, "{}", p.body);
    let by_source = &p.body["counters"]["by_source"];
    assert_eq!(by_source["mobile"], Value::from(1), "a token with only ingest:mobile files its events as mobile");
    demo.stop().await.unwrap();
}
