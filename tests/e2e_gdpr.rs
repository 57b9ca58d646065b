//! GDPR access and portability through the HTTP API: one request returns everything held.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use chrono::Utc;
use cohort::demo::DemoServer;
use cohort::payloads;
use cohort::SystemOptions;
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_holds_everything_kept_about_the_person() {
    let extra = "[[segments.define]]\nname = \"mba\"\nrule = 'page_count(\"mba\") >= 1'\n";
    let demo = DemoServer::start(None, extra, SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    let cdc = payloads::salesforce_contact_cdc(
        5,
        "0035e00000KimAAAAA",
        "CREATE",
        json!({ "Email": "kim.lee@uni.eu", "FirstName": "Kim", "LastName": "Lee" }),
        Utc::now(),
    );
    assert_eq!(c.salesforce_cdc(&cdc).await.unwrap().status, 200);
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    // An anonymous visitor who browses, then identifies as Kim: two profiles, merged.
    let page = payloads::segment_page("kim-p1", "anon-kim", "/programs/mba", Utc::now());
    assert_eq!(c.segment(false, "page", &page).await.unwrap().status, 200);
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let mut id = payloads::segment_identify(
        "kim-id",
        Some("anon-kim"),
        None,
        json!({ "email": "kim.lee@uni.eu" }),
        None,
        Utc::now(),
    );
    id["context"]["consent"] = json!({ "categoryPreferences": { "email": true } });
    assert_eq!(c.segment(false, "identify", &id).await.unwrap().status, 200);
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    demo.cohort.flush().await.unwrap();
    demo.cohort.relay_warehouse().await.unwrap();

    let export = c.get("/v1/gdpr/exports/email:kim.lee@uni.eu").await.unwrap();
    assert_eq!(export.status, 200, "{}", export.body);
    let e = &export.body;
    let text = e.to_string();
    for needle in ["kim.lee@uni.eu", "0035e00000KimAAAAA", "anon-kim", "\"Kim\""] {
        assert!(text.contains(needle), "{needle} missing from the export");
    }
    assert_eq!(e["profile"]["counters"]["events_total"], 3);
    assert_eq!(e["events"].as_array().unwrap().len(), 3);
    assert_eq!(e["consents"][0]["channel"], "email");
    assert_eq!(e["consents"][0]["granted"], true);
    assert_eq!(e["merges"].as_array().unwrap().len(), 1, "{}", e["merges"]);
    assert!(e["segments"]["mba"].is_object(), "{}", e["segments"]);
    assert_eq!(e["warehouse_events"].as_array().unwrap().len(), 3, "{}", e["warehouse_events"]);
    assert!(e["profile"]["computed"]["page_views_30d"].is_number());

    let audit = demo.cohort.ctx.store.list_audit(0, 10).await.unwrap();
    let entry = audit.iter().find(|a| a.action == "gdpr.export").expect("the export is audited");
    assert_eq!(entry.subject, e["profile_id"].as_str().unwrap());
    assert!(!entry.detail.to_string().contains("kim.lee"), "no personal data in the audit log");
    assert_eq!(c.get("/v1/gdpr/exports/email:nobody@uni.eu").await.unwrap().status, 404);
    demo.stop().await.unwrap();
}
