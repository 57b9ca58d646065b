//! Logs never contain raw personal data: the real binary, logging at debug level, plays slide 18
//! plus a merge, an unmerge, a refused payload, a segment entry and a failing destination; then
//! every log line is searched for the personal values it was given.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use cohort::client::CohortClient;
use cohort::demo::play_slide_18;
use cohort::payloads;
use cohort_config::Config;
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;
use common::{free_port, wait_ready, Proc};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_line_carries_an_email_a_phone_a_name_or_message_text() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("cohort.log");
    let port = free_port();
    // A destination that refuses everything, so failure paths log too.
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_url = format!("http://{}", sink.local_addr().unwrap());
    tokio::spawn(async move {
        let app = axum::Router::new()
            .fallback(|| async { (axum::http::StatusCode::SERVICE_UNAVAILABLE, "busy, retry max@gmail.com later") });
        let _ = axum::serve(sink, app).await;
    });
    let config_file = dir.path().join("cohort.toml");
    std::fs::write(
        &config_file,
        format!(
            "[segments]\ntick_ms = 250\n[[segments.define]]\nname = \"known\"\nrule = 'has(\"salesforce_id\")'\n\
             [reverse_etl]\nmax_attempts = 2\nbackoff_initial_ms = 10\n\
             [reverse_etl.salesforce]\nurl = \"{sink_url}\"\ntoken = \"t\"\n\
             [[activations]]\nname = \"crm\"\nsegment = \"known\"\ndestination = \"salesforce\"\naction = \"update_contact\"\n\
             fields = {{ Description = \"In segment {{{{segment}}}}\" }}\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_cohort"))
        .args(["--config", config_file.to_str().unwrap(), "serve"])
        .env("COHORT__SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("COHORT__STORAGE__URL", format!("embedded://{}", dir.path().join("cohort.redb").display()))
        .env("COHORT__TELEMETRY__LOG_FILTER", "debug,h2=info,hyper=info,reqwest=info,rustls=info")
        .env("COHORT__TELEMETRY__LOG_FORMAT", "json")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let proc = Proc(child);
    let config = Config::from_toml_str("").unwrap();
    let c = CohortClient::new(format!("http://127.0.0.1:{port}"), &config).unwrap();
    wait_ready(&c).await;

    play_slide_18(&c).await.unwrap();
    // A second student on the same tablet, merged, then unmerged.
    let other = payloads::segment_identify(
        "logs-2",
        Some("anon-logs"),
        None,
        json!({ "email": "ingrid.holm@uni.eu", "firstName": "Ingrid", "phone": "+47 412 34 567" }),
        Some("dev_456"),
        chrono::Utc::now(),
    );
    assert_eq!(c.segment(true, "identify", &other).await.unwrap().status, 200);
    // A payload with a refused element (dead letter) that carries personal data.
    let bad = json!({ "batch": [{ "type": "track", "event": "No Identity", "messageId": "logs-bad", "properties": { "note": "call Ingrid Holm on +47 412 34 567" } }] });
    let _ = c.segment(false, "batch", &bad).await.unwrap();
    let wa = payloads::twilio_whatsapp_form(
        "SMlogs0000000000000000000000000001",
        "+4741234567",
        "Jeg vil avbryte studiet mitt, Ingrid",
        "Ingrid Holm",
    );
    let _ = c.twilio(&wa).await.unwrap();
    // A tablet first seen alone, then with Max's account: a real merge to undo.
    let tablet = payloads::segment_identify(
        "logs-t1",
        Some("anon-tablet"),
        None,
        json!({ "city": "Oslo" }),
        Some("tablet-log"),
        chrono::Utc::now(),
    );
    assert_eq!(c.segment(true, "identify", &tablet).await.unwrap().status, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bridge = payloads::segment_identify(
        "logs-t2",
        None,
        Some("student-1001"),
        json!({}),
        Some("tablet-log"),
        chrono::Utc::now(),
    );
    assert_eq!(c.segment(true, "identify", &bridge).await.unwrap().status, 200);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let merges = c.get("/v1/profiles/email:max@gmail.com/merges").await.unwrap().body;
    let m = merges["merges"].as_array().and_then(|m| m.last()).cloned().expect("the tablet was merged");
    let survivor = m["survivor"].as_str().unwrap();
    let split = c.post(&format!("/v1/profiles/{survivor}/unmerge"), &json!({ "merged": m["merged"] })).await.unwrap();
    assert_eq!(split.status, 200, "{} {merges}", split.body);
    let _ = c.get("/v1/gdpr/exports/email:max@gmail.com").await.unwrap();
    // The right to be forgotten, then the person writing again: the saga's and suppression's
    // log lines are scanned too.
    let erase = json!({ "profile": "email:max@gmail.com", "requested_by": "dpo" });
    let deletion = c.post("/v1/gdpr/deletions", &erase).await.unwrap();
    assert_eq!(deletion.status, 202, "{}", deletion.body);
    let url = format!("/v1/gdpr/deletions/{}", deletion.body["id"].as_str().unwrap());
    // Salesforce refuses everything here, so the saga erases every store and then keeps
    // retrying the Contact delete (its failures are logged too).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = c.get(&url).await.unwrap().body;
        let steps = status["steps"].as_array().cloned().unwrap_or_default();
        let destinations = steps.iter().find(|s| s["step"] == "destinations").cloned().unwrap_or_default();
        if destinations["attempts"].as_u64().unwrap_or(0) >= 2 {
            assert_eq!(destinations["status"], "retrying", "{status}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the deletion did not reach the destinations: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = payloads::segment_identify(
        "logs-again",
        None,
        Some("max-again"),
        json!({ "email": "Max@Gmail.com", "lastName": "Mustermann" }),
        None,
        chrono::Utc::now(),
    );
    assert_eq!(c.segment(true, "identify", &again).await.unwrap().body["suppressed"], 1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(proc);

    let text = std::fs::read_to_string(&log_path).unwrap();
    let lines = text.lines().count();
    assert!(lines > 10, "the scenario logged little ({lines} lines)");
    for expected in [
        "profiles merged",
        "profiles unmerged",
        "activation failed",
        "destination request failed; retrying",
        "deletion saga requested",
        "deletion step done",
        "deletion step failed; will retry",
        "events of erased people dropped at ingest",
    ] {
        assert!(text.contains(expected), "the scenario did not reach `{expected}`:\n{text}");
    }
    // JSON lines carry the request id of the HTTP request they were written for.
    assert!(
        text.lines().any(|l| l.contains("\"request_id\":\"") && l.contains("\"route\":\"/v1/gdpr/deletions\"")),
        "no log line of the deletion request carries its request id"
    );
    let secrets = [
        "max@gmail.com",
        "Max@Gmail.com",
        "Mustermann",
        "Maximilian",
        "1512 3456789",
        "15123456789",
        "deadline for MBA",
        "ingrid.holm",
        "Ingrid",
        "Holm",
        "412 34 567",
        "4741234567",
        "avbryte",
    ];
    for line in text.lines() {
        for s in secrets {
            assert!(!line.contains(s), "log line carries `{s}`: {line}");
        }
    }
}
