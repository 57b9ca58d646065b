//! Connector `example_sis`: its normalizer on a sample body, then end to end through a Cohort.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use cohort::demo::DemoServer;
use cohort::SystemOptions;
use cohort_actors::normalize::connector::{format_of, Connector, ConnectorSet};
use cohort_actors::normalize::{normalize, NormalizeOptions};
use cohort_connector_example_sis::ExampleSisConnector;
use cohort_messages::msgs::RawPayload;
use cohort_messages::IdentifierKind;
use std::sync::Arc;
use std::time::Duration;

/// Two good records and one without `id` and `timestamp`.
fn sample() -> String {
    let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    "id,event,timestamp,user_id,email,course\nr1,course_viewed,{at},stu-1, Ana.Lima@Example.EDU ,MBA-101\nr2,quiz_submitted,{at},stu-1,,MBA-101\n,course_viewed,,stu-2,,\n".replace("{at}", &at)
}

#[test]
fn the_sample_becomes_two_events_and_one_refusal() {
    let connectors = ConnectorSet::new(vec![Arc::new(ExampleSisConnector)]).unwrap();
    let opts = NormalizeOptions { connectors, ..NormalizeOptions::default() };
    let payload = RawPayload {
        source: ExampleSisConnector.channel(),
        format: format_of(&ExampleSisConnector),
        body: sample().into_bytes().into(),
        content_type: "text/csv".into(),
        received_at: chrono::Utc::now(),
    };
    let out = normalize(&payload, &opts).unwrap();
    assert_eq!(out.events.len(), 2, "{:?}", out.rejected);
    assert_eq!(out.rejected.len(), 1);
    assert_eq!(out.rejected[0].index, Some(2));
    assert!(out.rejected[0].reason.contains("schema"), "{}", out.rejected[0].reason);
    let first = &out.events[0];
    assert_eq!(first.event_id.as_str(), "crm+example_sis:r1");
    assert_eq!(first.name.as_deref(), Some("course_viewed"));
    assert_eq!(first.properties["connector"], "example_sis");
    assert_eq!(first.properties["course"], "MBA-101");
    let kinds: Vec<IdentifierKind> = first.identifiers.iter().map(|i| i.kind).collect();
    assert!(kinds.contains(&IdentifierKind::UserId) && kinds.contains(&IdentifierKind::Email), "{kinds:?}");
    assert_eq!(first.traits["email"], "ana.lima@example.edu", "emails are normalized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_sent_to_the_webhook_reach_a_live_profile() {
    let options = SystemOptions { connectors: vec![Arc::new(ExampleSisConnector)], ..SystemOptions::default() };
    let demo = DemoServer::start(None, "", options).await.unwrap();
    let url = format!("{}/webhooks/connectors/example_sis", demo.base);
    let post = |token: &'static str| {
        demo.client.http.post(&url).bearer_auth(token).header("content-type", "text/csv").body(sample()).send()
    };
    assert_eq!(post("wrong-token").await.unwrap().status(), 401);
    let answer = post("dev-api-token").await.unwrap();
    assert_eq!(answer.status(), 200);
    let receipt: serde_json::Value = answer.json().await.unwrap();
    assert_eq!((receipt["accepted"].as_u64(), receipt["rejected"].as_array().map(Vec::len)), (Some(2), Some(1)));
    // The same body again: nothing new.
    let again: serde_json::Value = post("dev-api-token").await.unwrap().json().await.unwrap();
    assert_eq!(again["duplicates"], 2);

    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let profile = demo.client.get("/v1/profiles/user_id:stu-1").await.unwrap();
    assert_eq!(profile.status, 200, "{}", profile.body);
    assert_eq!(profile.body["counters"]["events_total"], 2);
    assert_eq!(profile.body["counters"]["by_source"]["crm"], 2);
    let dlq = demo.client.get("/v1/dlq").await.unwrap();
    assert_eq!(dlq.body["total"], 2, "the refused record, once per send: {}", dlq.body);
    demo.stop().await.unwrap();
}
