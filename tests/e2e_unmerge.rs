//! Reversible identity: unmerge, the probabilistic review queue and automatic merging, through
//! the HTTP API of an in-process Cohort on embedded defaults.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

#[path = "common/people.rs"]
mod people;

use chrono::Utc;
use cohort::client::CohortClient;
use cohort::demo::DemoServer;
use cohort::SystemOptions;
use cohort_messages::msgs::MatcherMsg;
use people::{identify, metric, profile, profile_id};
use serde_json::json;
use std::time::Duration;

async fn settle(demo: &DemoServer) {
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
}

/// Waits until the matcher has handled what the last flush told it.
async fn matcher_synced(demo: &DemoServer) {
    settle(demo).await;
    let matcher = demo.cohort.ctx.matcher.get().expect("matcher runs");
    matcher.call(MatcherMsg::Sync, Some(Duration::from_secs(10))).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmerge_gives_each_student_back_their_own_events_and_traits_and_keeps_them_apart() {
    let dir = tempfile::tempdir().unwrap();
    let demo = DemoServer::start(Some(dir.path().to_path_buf()), "", SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    identify(c, "anna-1", Some("anna"), json!({ "firstName": "Anna", "city": "Berlin" }), None).await;
    settle(&demo).await;
    identify(c, "ben-1", None, json!({ "city": "Wien" }), Some("tablet-9")).await;
    settle(&demo).await;
    let anna = profile_id(c, "user_id:anna").await;
    let ben = profile_id(c, "device_id:tablet-9").await;
    assert_ne!(anna, ben);
    // Anna logs in once on Ben's tablet: the shared device merges them (the mistake to undo).
    identify(c, "bridge", Some("anna"), json!({}), Some("tablet-9")).await;
    settle(&demo).await;
    identify(c, "ben-2", None, json!({ "city": "Graz" }), Some("tablet-9")).await;
    settle(&demo).await;
    assert_eq!(profile_id(c, "device_id:tablet-9").await, anna, "merged into the older profile");
    assert_eq!(profile(c, "user_id:anna").await["counters"]["events_total"], 4);

    let merges = c.get("/v1/profiles/device_id:tablet-9/merges").await.unwrap();
    assert_eq!(merges.status, 200, "{}", merges.body);
    assert_eq!(merges.body["profile_id"], json!(anna));
    let listed = merges.body["merges"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{}", merges.body);
    assert_eq!((&listed[0]["survivor"], &listed[0]["merged"]), (&json!(anna), &json!(ben)));
    assert_eq!(listed[0]["reason"]["type"], "shared_identifier");
    assert!(listed[0]["evidence"].to_string().contains("tablet-9"), "{}", merges.body);
    let wrong = c.post("/v1/profiles/user_id:anna/unmerge", &json!({ "merged": "not-a-profile" })).await.unwrap();
    assert_eq!(wrong.status, 400, "{}", wrong.body);
    let split = c.post("/v1/profiles/user_id:anna/unmerge", &json!({ "merged": ben })).await.unwrap();
    assert_eq!(split.status, 200, "{}", split.body);
    assert_eq!(split.body["restored"], json!(ben));
    assert_eq!((split.body["survivor_events"].as_u64(), split.body["restored_events"].as_u64()), (Some(2), Some(2)));

    let check = |c: &CohortClient| {
        let (c, anna, ben) = (c.clone(), anna.clone(), ben.clone());
        async move {
            assert_eq!(profile_id(&c, "device_id:tablet-9").await, ben);
            assert_eq!(profile_id(&c, "user_id:anna").await, anna);
            let a = profile(&c, "user_id:anna").await;
            let b = profile(&c, "device_id:tablet-9").await;
            assert_eq!(a["traits"]["city"]["value"], "Berlin", "{a}");
            assert_eq!(a["traits"]["first_name"]["value"], "Anna");
            assert_eq!(b["traits"]["city"]["value"], "Graz", "{b}");
            assert!(b["traits"].get("first_name").is_none(), "{b}");
            assert_eq!(a["counters"]["events_total"], 2);
            assert_eq!(b["counters"]["events_total"], 2);
            assert!(!a["identifiers"].to_string().contains("tablet-9"), "{a}");
            let events = c.get(&format!("/v1/profiles/{ben}/events")).await.unwrap().body;
            let ids: Vec<&str> =
                events["events"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap()).collect();
            assert_eq!(ids, vec!["mobile:ben-2", "mobile:ben-1"]);
        }
    };
    check(c).await;

    // The same shared device again: an unmerge is a decision, they are not merged back.
    identify(c, "bridge-2", Some("anna"), json!({}), Some("tablet-9")).await;
    settle(&demo).await;
    assert_ne!(profile_id(c, "device_id:tablet-9").await, profile_id(c, "user_id:anna").await);
    let m = c.get("/metrics").await.unwrap().body.as_str().unwrap().to_string();
    assert_eq!(metric(&m, "cohort_identity_links_refused_total{kind=\"device_id\",reason=\"kept_apart\"} "), 1, "{m}");
    assert_eq!(metric(&m, "cohort_identity_unmerges_total "), 1, "{m}");
    let again = c.post(&format!("/v1/profiles/{anna}/unmerge"), &json!({ "merged": ben })).await.unwrap();
    assert_eq!(again.status, 404, "{}", again.body);

    let audit = demo.cohort.ctx.store.list_audit(0, 10).await.unwrap();
    assert!(audit.iter().any(|e| e.action == "identity.unmerge" && e.subject == anna), "{audit:?}");
    demo.stop().await.unwrap();

    // Durable: a restart reads the split from the store.
    let demo = DemoServer::start(Some(dir.path().to_path_buf()), "", SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    let a = profile(c, "user_id:anna").await;
    assert_eq!(a["counters"]["events_total"], 3, "bridge-2 went to Anna only: {a}");
    assert_eq!(profile_id(c, "device_id:tablet-9").await, ben);
    assert_eq!(profile(c, "device_id:tablet-9").await["traits"]["city"]["value"], "Graz");
    identify(c, "bridge-3", Some("anna"), json!({}), Some("tablet-9")).await;
    settle(&demo).await;
    assert_ne!(
        profile_id(c, "device_id:tablet-9").await,
        profile_id(c, "user_id:anna").await,
        "kept apart after a restart"
    );
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probable_duplicates_wait_in_the_review_queue_and_approval_merges_them() {
    let demo = DemoServer::start(None, "", SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    let lena = json!({ "firstName": "Lena", "lastName": "Müller", "birthday": "03.04.2001",
        "address": { "street": "Grindelallee 12", "postalCode": "20146", "city": "Hamburg" } });
    identify(c, "crm-lena", Some("lena-7"), lena, None).await;
    let lena2 = json!({ "email": "lena.m@web.de", "firstName": "LENA", "lastName": "Mueller", "birthday": "2001-04-03",
        "address": { "street": "Grindelallee 12", "postalCode": "20146", "city": "Hamburg" } });
    identify(c, "web-lena", None, lena2, None).await;
    // Same name, different birthday and town: not a candidate worth a person's time.
    let other = json!({ "email": "l.mueller@uni-koeln.de", "firstName": "Lena", "lastName": "Müller", "birthday": "1999-11-20",
        "address": { "postalCode": "50923", "city": "Köln" } });
    identify(c, "web-other", None, other, None).await;
    matcher_synced(&demo).await;

    let reviews = c.get("/v1/identity/reviews").await.unwrap();
    assert_eq!(reviews.status, 200, "{}", reviews.body);
    let items = reviews.body["reviews"].as_array().unwrap().clone();
    assert_eq!(items.len(), 1, "{}", reviews.body);
    let item = &items[0];
    let a = profile_id(c, "user_id:lena-7").await;
    let b = profile_id(c, "email:lena.m@web.de").await;
    assert_ne!(a, b, "a probabilistic match never merges on its own by default");
    let mut pair = vec![a.clone(), b.clone()];
    pair.sort();
    assert_eq!(item["profiles"], json!(pair));
    assert!(item["score"].as_f64().unwrap() >= 0.85, "{item}");
    assert_eq!(item["status"], "open");
    let fields: Vec<&str> =
        item["evidence"]["comparisons"].as_array().unwrap().iter().map(|c| c["field"].as_str().unwrap()).collect();
    assert!(fields.contains(&"date_of_birth") && fields.contains(&"last_name"), "{item}");
    assert!(!item.to_string().contains("Grindelallee"), "evidence carries weights, not raw values: {item}");

    let id = item["id"].as_str().unwrap();
    let bad = c.post(&format!("/v1/identity/reviews/{id}/maybe"), &json!({})).await.unwrap();
    assert_eq!(bad.status, 404);
    let approved =
        c.post(&format!("/v1/identity/reviews/{id}/approve"), &json!({ "reviewer": "registrar" })).await.unwrap();
    assert_eq!(approved.status, 200, "{}", approved.body);
    assert_eq!(approved.body["review"]["status"], "accepted");
    assert_eq!(approved.body["review"]["decided_by"], "registrar");
    settle(&demo).await;
    assert_eq!(profile_id(c, "email:lena.m@web.de").await, a, "approval merged into the older profile");
    assert_eq!(profile(c, "user_id:lena-7").await["counters"]["events_total"], 2);
    let twice = c.post(&format!("/v1/identity/reviews/{id}/approve"), &json!({})).await.unwrap();
    assert_eq!(twice.status, 409, "{}", twice.body);
    assert_eq!(c.get("/v1/identity/reviews").await.unwrap().body["reviews"], json!([]));
    let accepted = c.get("/v1/identity/reviews?status=accepted").await.unwrap().body;
    assert_eq!(accepted["reviews"].as_array().unwrap().len(), 1);
    let merges = demo.cohort.ctx.store.list_merges(&cohort_messages::ProfileId::parse(&a).unwrap()).await.unwrap();
    assert!(
        merges.iter().any(
            |m| matches!(&m.reason, cohort_messages::msgs::MergeReason::ReviewApproved { by, .. } if by == "registrar")
        ),
        "{merges:?}"
    );
    // An approved merge is undone like any other.
    let split = c.post(&format!("/v1/profiles/{a}/unmerge"), &json!({ "merged": b })).await.unwrap();
    assert_eq!(split.status, 200, "{}", split.body);
    assert_eq!(profile_id(c, "email:lena.m@web.de").await, b);
    demo.stop().await.unwrap();
}

/// Two students alike enough to be reviewed (Jonas Weber with two university addresses); the
/// open review item's id.
async fn twins_in_review(demo: &DemoServer) -> String {
    let c = &demo.client;
    let twin = |email: &str| {
        json!({ "email": email, "firstName": "Jonas", "lastName": "Weber", "birthday": "2002-07-01",
            "address": { "postalCode": "80331", "city": "München" } })
    };
    identify(c, "t1", None, twin("jonas.weber@tum.de"), None).await;
    identify(c, "t2", None, twin("j.weber@lmu.de"), None).await;
    matcher_synced(demo).await;
    let items = c.get("/v1/identity/reviews").await.unwrap().body["reviews"].as_array().unwrap().clone();
    assert_eq!(items.len(), 1);
    items[0]["id"].as_str().unwrap().to_string()
}

/// A pair one of whom is being erased is never merged on approval: the survivor could be the
/// erased profile, and the other's data would go with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approving_a_pair_with_an_erased_profile_is_refused() {
    let demo = DemoServer::start(None, "", SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    let id = twins_in_review(&demo).await;
    let kept = profile_id(c, "email:jonas.weber@tum.de").await;
    let gone = cohort_messages::ProfileId::parse(&profile_id(c, "email:j.weber@lmu.de").await).unwrap();
    // As the deletion saga's first step does, before the review items are deleted.
    demo.cohort.ctx.erasures.mark_erased([gone]);
    let approved = c.post(&format!("/v1/identity/reviews/{id}/approve"), &json!({})).await.unwrap();
    assert_eq!(approved.status, 409, "{}", approved.body);
    settle(&demo).await;
    assert_eq!(profile_id(c, "email:jonas.weber@tum.de").await, kept, "not merged into the erased profile");
    let open = c.get("/v1/identity/reviews").await.unwrap().body;
    assert_eq!(open["reviews"][0]["status"], "open", "{open}");
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_pair_stays_apart_and_is_not_asked_again() {
    let demo = DemoServer::start(None, "", SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    let id = twins_in_review(&demo).await;
    let rejected = c.post(&format!("/v1/identity/reviews/{id}/reject"), &json!({})).await.unwrap();
    assert_eq!(rejected.status, 200, "{}", rejected.body);
    assert_eq!(rejected.body["review"]["status"], "rejected");
    // New events on both profiles do not reopen the question.
    identify(c, "t3", None, json!({ "email": "j.weber@lmu.de", "city": "Muenchen" }), None).await;
    matcher_synced(&demo).await;
    assert_eq!(c.get("/v1/identity/reviews").await.unwrap().body["reviews"], json!([]));
    assert_ne!(profile_id(c, "email:jonas.weber@tum.de").await, profile_id(c, "email:j.weber@lmu.de").await);
    let m = c.get("/metrics").await.unwrap().body.as_str().unwrap().to_string();
    assert_eq!(metric(&m, "cohort_identity_reviews_opened_total "), 1, "{m}");
    assert_eq!(metric(&m, "cohort_identity_reviews_decided_total{outcome=\"rejected\"} "), 1, "{m}");
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_merging_above_its_threshold_merges_without_review() {
    let extra = "[identity]\nauto_merge_threshold = 0.999\n";
    let demo = DemoServer::start(None, extra, SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    let person = |email: &str| {
        json!({ "email": email, "firstName": "Sofia", "lastName": "Rossi", "birthday": "2000-02-29",
            "address": { "street": "Via Roma 3", "postalCode": "10121", "city": "Torino" } })
    };
    identify(c, "s1", None, person("sofia.rossi@unito.it"), None).await;
    settle(&demo).await;
    identify(c, "s2", None, person("sofia.r@gmail.com"), None).await;
    matcher_synced(&demo).await;
    settle(&demo).await;
    assert_eq!(profile_id(c, "email:sofia.r@gmail.com").await, profile_id(c, "email:sofia.rossi@unito.it").await);
    let accepted = c.get("/v1/identity/reviews?status=accepted").await.unwrap().body;
    assert_eq!(accepted["reviews"][0]["decided_by"], "auto_merge", "{accepted}");
    let m = c.get("/metrics").await.unwrap().body.as_str().unwrap().to_string();
    assert_eq!(metric(&m, "cohort_identity_reviews_decided_total{outcome=\"auto_merged\"} "), 1, "{m}");
    demo.stop().await.unwrap();

    let refused = DemoServer::start(None, "[identity]\nauto_merge_threshold = 0.5\n", SystemOptions::default()).await;
    let err = refused.err().map(|e| format!("{e:#}")).unwrap_or_default();
    assert!(err.contains("identity.auto_merge_threshold"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_after_a_merge_is_the_most_restrictive_of_both_profiles() {
    use cohort_messages::{Channel, ConsentRecord, ProfileId};
    let demo = DemoServer::start(None, "", SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    identify(c, "c-1", Some("mia"), json!({ "email": "mia@uni.eu" }), None).await;
    settle(&demo).await;
    identify(c, "c-2", None, json!({}), Some("phone-mia")).await;
    settle(&demo).await;
    let (mia, phone) = (profile_id(c, "user_id:mia").await, profile_id(c, "device_id:phone-mia").await);
    let id = |s: &str| ProfileId::parse(s).unwrap();
    let consent = |p: &str, purpose: &str, channel, granted| ConsentRecord {
        profile_id: id(p),
        purpose: purpose.into(),
        channel,
        granted,
        source: "web_form".into(),
        recorded_at: Utc::now(),
    };
    let store = demo.cohort.ctx.store.clone();
    store
        .record_consents(vec![
            consent(&mia, "marketing", Channel::Email, true),
            consent(&mia, "analytics", Channel::Email, true),
            consent(&phone, "marketing", Channel::Email, false),
            consent(&phone, "marketing", Channel::Push, true),
            consent(&phone, "analytics", Channel::Email, true),
        ])
        .await
        .unwrap();
    identify(c, "c-3", Some("mia"), json!({}), Some("phone-mia")).await;
    settle(&demo).await;
    assert_eq!(profile_id(c, "device_id:phone-mia").await, mia);
    let after = store.consents(&id(&mia)).await.unwrap();
    let decision = |purpose: &str, channel| {
        after.iter().find(|c| c.purpose == purpose && c.channel == channel).map(|c| (c.granted, c.source.clone()))
    };
    assert_eq!(
        decision("marketing", Channel::Email),
        Some((false, "merge:web_form".into())),
        "a refusal wins: {after:?}"
    );
    assert_eq!(
        decision("marketing", Channel::Push).map(|d| d.0),
        Some(true),
        "a decision only one side made carries over"
    );
    assert_eq!(
        decision("analytics", Channel::Email),
        Some((true, "web_form".into())),
        "agreeing grants stay as they were"
    );
    demo.stop().await.unwrap();
}
