//! `generate-connector`: the committed example connectors are exactly what the generator writes
//! (each passes its own generated test in the workspace run), and a connector is a source like
//! the others: scoped tokens, dead letters and their replay.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use cohort::demo::DemoServer;
use cohort::scaffold::{Format, Kind, Scaffold};
use cohort::SystemOptions;
use cohort_api::auth::token_digest;
use cohort_connector_example_lms::ExampleLmsConnector;
use cohort_messages::Source;
use serde_json::json;
use std::sync::Arc;

fn examples() -> Vec<Scaffold> {
    let s = |name: &str, kind, format, channel| Scaffold { name: name.into(), kind, format, channel, register: false };
    vec![
        s("example_lms", Kind::Webhook, Format::Json, Source::Web),
        s("example_sis", Kind::Streaming, Format::Csv, Source::Crm),
        s("example_logs", Kind::Streaming, Format::Text, Source::Mobile),
    ]
}

#[test]
fn the_committed_examples_are_exactly_what_the_generator_writes() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for example in examples() {
        for (rel, text) in example.files() {
            let path = root.join("connectors").join(&example.name).join(&rel);
            let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(committed, text, "{} differs from the generator's output", path.display());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_takes_only_its_own_scope_and_its_dead_letters_replay_through_it() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    let entry = |name: &str, secret: &str, scope: &str| {
        format!("[[tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\nscopes = [\"{scope}\"]\n", token_digest(secret))
    };
    std::fs::write(
        &tokens,
        entry("lms", "lms-secret-1", "ingest:example_lms") + &entry("web", "web-secret-1", "ingest:web"),
    )
    .unwrap();
    let extra = format!("[auth]\ntokens_file = \"{}\"\n", tokens.display());
    let options = SystemOptions { connectors: vec![Arc::new(ExampleLmsConnector)], ..SystemOptions::default() };
    let demo = DemoServer::start(None, &extra, options).await.unwrap();
    let at = chrono::Utc::now().to_rfc3339();
    let body = json!([
        { "id": "c1", "event": "course_viewed", "timestamp": at, "user_id": "lms-student" },
        { "id": "c2", "event": "course_viewed", "user_id": "lms-student" },
    ]);
    let post = |path: &str, token: &str| {
        demo.client.http.post(format!("{}{path}", demo.base)).bearer_auth(token).json(&body).send()
    };
    // A Segment call cannot claim a connector record's id (its messageId is the record's key).
    let squat = cohort::payloads::segment_track("example_lms:c1", "squatter", "x", json!({}), chrono::Utc::now());
    assert_eq!(demo.client.segment(false, "track", &squat).await.unwrap().status, 200);
    assert_eq!(post("/webhooks/connectors/example_lms", "web-secret-1").await.unwrap().status(), 403);
    assert_eq!(post("/webhooks/connectors/nope", "lms-secret-1").await.unwrap().status(), 403);
    assert_eq!(post("/webhooks/connectors/nope", "dev-api-token").await.unwrap().status(), 404);
    let r = post("/webhooks/connectors/example_lms", "lms-secret-1").await.unwrap();
    assert_eq!(r.status(), 200);
    let receipt: serde_json::Value = r.json().await.unwrap();
    assert_eq!((receipt["accepted"].as_u64(), receipt["duplicates"].as_u64()), (Some(1), Some(0)), "{receipt}");
    assert!(receipt["rejected"][0]["reason"].as_str().unwrap().contains("timestamp"), "{receipt}");

    // The refused record's letter names its connector, so a replay reads it with the connector
    // again (and, unfixed, refuses it again) instead of guessing a built-in format.
    let dlq = demo.client.get("/v1/dlq").await.unwrap().body;
    assert_eq!(dlq["total"], 1);
    assert!(dlq["dead_letters"][0]["content_type"].as_str().unwrap().ends_with("connector=example_lms"), "{dlq}");
    let replay = demo.client.post("/v1/dlq/replay", &json!({})).await.unwrap();
    assert_eq!(replay.body["results"][0]["outcome"], "kept", "{}", replay.body);
    assert_eq!(replay.body["results"][0]["duplicates"], 1, "the good record counted once: {}", replay.body);
    assert_eq!(demo.client.get("/v1/dlq").await.unwrap().body["total"], 1, "no new letter");

    // A client cannot forge the connector mark: a Segment call claiming `connector=` in its
    // content type is stored without it and never replays into the connector.
    let forged = demo
        .client
        .http
        .post(format!("{}/v1/track", demo.base))
        .basic_auth("dev-web-write-key", Some(""))
        .header("content-type", "application/json; connector=example_lms")
        .body(r#"{"id": "c9", "event": "x", "timestamp": 1, "user_id": "victim"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 400, "not a Segment call");
    let dlq = demo.client.get("/v1/dlq").await.unwrap().body;
    let letter = dlq["dead_letters"].as_array().unwrap().last().unwrap().clone();
    assert!(!letter["content_type"].as_str().unwrap().contains("connector"), "{letter}");
    demo.stop().await.unwrap();
}
