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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_is_read_and_changed_through_the_api_with_its_history_and_from_the_sources() {
    let demo = DemoServer::start(None, "", SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    let mut id =
        payloads::segment_identify("lu-id", Some("anon-lu"), None, json!({ "email": "lu@uni.eu" }), None, Utc::now());
    id["context"]["consent"] = json!({ "categoryPreferences": { "email": true, "whatsapp": false } });
    assert_eq!(c.segment(false, "identify", &id).await.unwrap().status, 200);
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let got = c.get("/v1/profiles/email:lu@uni.eu/consent").await.unwrap();
    assert_eq!(got.status, 200, "{}", got.body);
    assert_eq!(got.body["consent"]["email"]["granted"], true);
    assert_eq!(got.body["consent"]["email"]["version"], 1);
    assert_eq!(got.body["consent"]["email"]["source"], "web");
    assert_eq!(got.body["consent"]["email"]["legal_basis"], "consent");
    assert_eq!(got.body["history"].as_array().unwrap().len(), 2);

    let bad =
        c.call("PUT", "/v1/profiles/email:lu@uni.eu/consent", &json!({ "fax": { "granted": true } })).await.unwrap();
    assert_eq!(bad.status, 400, "{}", bad.body);
    let bad = c
        .call(
            "PUT",
            "/v1/profiles/email:lu@uni.eu/consent",
            &json!({ "email": { "granted": true, "legal_basis": "vibes" } }),
        )
        .await
        .unwrap();
    assert_eq!(bad.status, 400, "{}", bad.body);
    let put = c
        .call(
            "PUT",
            "/v1/profiles/email:lu@uni.eu/consent",
            &json!({ "email": { "granted": false, "source": "support_ticket" },
                     "analytics": { "granted": true, "legal_basis": "legitimate_interest" } }),
        )
        .await
        .unwrap();
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(put.body["consent"]["email"]["granted"], false);
    assert_eq!(put.body["consent"]["email"]["version"], 2);
    assert_eq!(put.body["consent"]["email"]["source"], "support_ticket");
    assert_eq!(put.body["consent"]["analytics"]["legal_basis"], "legitimate_interest");
    // Reverse ETL's check reads the store: the refusal is there already.
    let profile = cohort_messages::ProfileId::parse(put.body["profile_id"].as_str().unwrap()).unwrap();
    let stored = demo.cohort.ctx.store.consents(&profile).await.unwrap();
    assert!(stored.iter().any(|s| s.channel == cohort_messages::Channel::Email && !s.granted), "{stored:?}");

    // The source itself changes it again: she re-subscribes on the website, then unsubscribes by email.
    let mut again = payloads::segment_identify("lu-id2", Some("anon-lu"), None, json!({}), None, Utc::now());
    again["context"]["consent"] = json!({ "categoryPreferences": { "email": true } });
    assert_eq!(c.segment(false, "identify", &again).await.unwrap().status, 200);
    let unsub =
        payloads::sendgrid_event("sg-lu-unsub", "lu@uni.eu", "unsubscribe", Utc::now() + chrono::Duration::seconds(1));
    assert_eq!(c.sendgrid(&unsub).await.unwrap().status, 200);
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let got = c.get("/v1/profiles/email:lu@uni.eu/consent").await.unwrap().body;
    assert_eq!(got["consent"]["email"]["granted"], false, "{got}");
    assert_eq!(got["consent"]["email"]["version"], 4, "{got}");
    assert_eq!(got["consent"]["email"]["source"], "email");
    let history: Vec<(String, bool)> = got["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["channel"] == "email")
        .map(|h| (h["source"].as_str().unwrap().to_string(), h["granted"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        history,
        vec![("web".into(), true), ("support_ticket".into(), false), ("web".into(), true), ("email".into(), false)]
    );
    let audit = demo.cohort.ctx.store.list_audit(0, 10).await.unwrap();
    let entry = audit.iter().find(|a| a.action == "consent.update").expect("audited");
    assert!(!entry.detail.to_string().contains("lu@uni.eu"));
    assert_eq!(c.get("/v1/profiles/email:ghost@uni.eu/consent").await.unwrap().status, 404);
    demo.stop().await.unwrap();
}
