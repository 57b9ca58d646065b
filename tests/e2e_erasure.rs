//! The right to be forgotten on the embedded backends: a deletion saga erases the person from
//! every store and every destination, keeps them out afterwards, survives a crash half-way and
//! runs while ingest goes on.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;
#[path = "common/faulty_warehouse.rs"]
mod faulty_warehouse;
use faulty_warehouse::FaultyWarehouse;
#[path = "common/destinations.rs"]
mod destinations;

use chrono::Utc;
use cohort::client::CohortClient;
use cohort::demo::DemoServer;
use cohort::payloads;
use cohort::SystemOptions;
use cohort_adapters::AppendBatch;
use cohort_messages::msgs::MatcherMsg;
use common::erasure::{
    assert_nothing_left, assert_present, completed, deletion_during_load, jana_writes_again, request_deletion,
    saga_survives_sigkill, seed, seed_both, step, target_of, wait_deletion, ERASURE_TOML, JANA, MAX,
};
use common::series_value as metric;
use destinations::Destinations;
use serde_json::{json, Value};
use std::time::Duration;

/// Destinations, quick saga retries, and a segment with an activation (see [`ERASURE_TOML`]).
fn config_toml(d: &Destinations) -> String {
    format!("{}\n{ERASURE_TOML}", d.config_toml())
}

/// Destinations and a demo server on them, with Jana and Max in every store.
async fn seeded() -> (Destinations, DemoServer) {
    let d = Destinations::start().await;
    let demo = DemoServer::start(None, &config_toml(&d), SystemOptions::default()).await.unwrap();
    seed_both(&demo).await;
    (d, demo)
}

/// The newest dead letter, which must keep its reason but not the payload naming an erased
/// person (`hidden` appears nowhere in it); with the number of letters.
async fn newest_letter_withheld(c: &CohortClient, hidden: &str) -> (Value, Value) {
    let letters = c.get("/v1/dlq?limit=1000").await.unwrap().body;
    let newest = letters["dead_letters"].as_array().unwrap().last().cloned().unwrap();
    assert!(newest["payload"].as_str().unwrap().contains("erased person"), "{newest}");
    assert!(!newest.to_string().contains(hidden), "{newest}");
    (newest, letters["total"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_erases_the_person_from_every_store_and_destination_and_keeps_them_out() {
    let (d, demo) = seeded().await;
    let c = &demo.client;
    let jana_ref = format!("email:{}", JANA.email);
    let target = target_of(c, &jana_ref).await;
    let (store, bus) = (demo.cohort.ctx.store.as_ref(), demo.cohort.ctx.bus.as_ref());
    let warehouse = demo.cohort.ctx.warehouse.as_deref();
    assert_present(store, warehouse, &target).await;
    let max_before = c.get(&format!("/v1/profiles/email:{}", MAX.email)).await.unwrap().body;
    assert!(!d.received("sendgrid").is_empty(), "the activation synced the students");

    let matcher = demo.cohort.ctx.matcher.get().unwrap();
    let indexed = || async {
        let stats = matcher.call(MatcherMsg::Sync, Some(Duration::from_secs(10))).await.unwrap();
        match stats {
            ractor::rpc::CallResult::Success(s) => s.indexed_profiles,
            _ => panic!("the matcher did not answer"),
        }
    };
    let indexed_before = indexed().await;
    assert!(indexed_before >= 2, "both students are in the matcher's index");

    // An exit of hers recorded for the reverse-ETL catch-up goes with her too.
    let exit_key = format!("mba_interest/{}", target.profiles[0]);
    let exit = serde_json::json!({ "at": chrono::Utc::now() });
    store.put_documents("segment_exits", vec![(exit_key.clone(), Some(exit))]).await.unwrap();

    let url = request_deletion(c, &jana_ref, "suppress_with_delete").await;
    let done = wait_deletion(c, &url, Duration::from_secs(30), completed).await;
    assert_eq!(store.get_documents("segment_exits", &[exit_key]).await.unwrap(), vec![None]);
    assert_eq!(indexed().await, indexed_before - 1, "her person fields left the matcher's memory");
    for s in done["steps"].as_array().unwrap() {
        assert!(s["status"] == "done" || s["status"] == "skipped", "{s}");
        assert!(s["started_at"].is_string() && s["finished_at"].is_string(), "{s}");
    }
    assert_eq!(step(&done, "verify")["detail"]["remnants"], 0, "{done}");
    assert!(step(&done, "operational_store")["detail"]["profiles"].as_u64().unwrap() >= 1, "{done}");
    assert!(step(&done, "warehouse")["detail"]["rows_deleted"].as_u64().unwrap() >= 5, "{done}");
    assert!(step(&done, "documents")["detail"]["documents"].as_u64().unwrap() >= 1, "{done}");
    assert!(step(&done, "dead_letters")["detail"]["dead_letters"].as_u64().unwrap() >= 1, "{done}");
    assert!(step(&done, "event_log")["detail"]["erased"]["journal_events"].as_u64().unwrap() >= 5, "{done}");
    assert_eq!(step(&done, "tombstones")["status"], "skipped", "no compacted topic on the embedded bus");
    assert_eq!(step(&done, "destinations")["detail"]["salesforce"]["contacts_deleted"], 1, "{done}");
    assert_eq!(step(&done, "destinations")["detail"]["sendgrid"]["contacts_deleted"], 1, "{done}");
    assert!(done["duration_ms"].as_i64().is_some(), "{done}");
    let status_text = done.to_string();
    for n in JANA.needles() {
        assert!(!status_text.contains(&n), "the status shows `{n}`");
    }

    // Nothing left anywhere; the Profile API and the export know nobody.
    assert_nothing_left(store, bus, warehouse, &target, &JANA).await;
    for r in [jana_ref.clone(), target.profiles[0].to_string(), format!("phone:{}", JANA.phone)] {
        assert_eq!(c.get(&format!("/v1/profiles/{r}")).await.unwrap().status, 404, "{r}");
    }
    assert_eq!(c.get(&format!("/v1/gdpr/exports/{jana_ref}")).await.unwrap().status, 404);
    // The destinations were told: Salesforce Contact deleted, SendGrid contact searched and deleted.
    let sf: Vec<_> = d.received("salesforce").into_iter().filter(|r| r.method == "DELETE").collect();
    assert_eq!(sf.len(), 1);
    assert_eq!(sf[0].path, format!("Contact/{}", JANA.salesforce_id));
    let sg = d.received("sendgrid");
    let search = sg.iter().rev().find(|r| r.path == "search").unwrap();
    assert!(search.body["emails"].to_string().contains(JANA.email), "{}", search.body);
    assert!(sg.iter().any(|r| r.method == "DELETE" && r.path == "contacts"));
    // The audit record says who asked and what went, without the person.
    let audit = store.list_audit(0, 1000).await.unwrap();
    let entry = audit.iter().find(|e| e.action == "gdpr.deletion").unwrap();
    assert_eq!(entry.actor, "dpo-ticket-4711");
    assert_eq!(entry.subject, target.profiles[0].to_string());
    assert!(entry.detail["deleted"]["operational_store"]["profiles"].as_u64().unwrap() >= 1, "{}", entry.detail);

    // Max is untouched.
    let max_after = c.get(&format!("/v1/profiles/email:{}", MAX.email)).await.unwrap().body;
    assert_eq!(max_after["counters"], max_before["counters"]);
    assert_eq!(max_after["identifiers"], max_before["identifiers"]);

    // Jana's sources send her again: dropped at ingest, counted, never recreated.
    let profiles_before = store.count_profiles().await.unwrap();
    let a = jana_writes_again(c, "jana-again", "anon-jana-new-device").await;
    assert_eq!((&a["suppressed"], &a["accepted"]), (&json!(1), &json!(0)), "{a}");
    // Beside a refused element, a batch naming her is dead-lettered without its body.
    let named = payloads::segment_identify(
        "jana-batch",
        Some("anon-x"),
        None,
        json!({ "email": JANA.email }),
        None,
        Utc::now(),
    );
    let batch = json!({ "batch": [named, { "type": "track", "userId": "someone-else" }] });
    let a = c.segment(false, "batch", &batch).await.unwrap();
    assert_eq!((a.status.as_u16(), &a.body["suppressed"]), (200, &json!(1)), "{}", a.body);
    let (newest, total) = newest_letter_withheld(c, JANA.email).await;
    assert!(newest["reason"].as_str().unwrap().starts_with("element 1: "), "{newest}");
    // Her event is dropped even when Gate 1 would refuse it (a timestamp a month ahead): never
    // a dead letter naming her.
    let ahead = Utc::now() + chrono::Duration::days(30);
    let later =
        payloads::segment_identify("jana-ahead", Some("anon-y"), None, json!({ "email": JANA.email }), None, ahead);
    let a = c.segment(false, "identify", &later).await.unwrap();
    assert_eq!((a.status.as_u16(), &a.body["suppressed"]), (200, &json!(1)), "{}", a.body);
    let now = c.get("/v1/dlq?limit=1000").await.unwrap().body;
    assert_eq!(now["total"], total, "{now}");
    // A batch whose refused element names her (an identify without ids) keeps her address
    // neither in Bronze nor in its letter, though nothing of hers was read as an event.
    let refused = json!({ "type": "identify", "traits": { "email": JANA.email } });
    // Beside it, an element of Max's (no new profile).
    let other = payloads::segment_identify(
        "max-batch",
        Some("anon-max-x"),
        None,
        json!({ "email": MAX.email }),
        None,
        Utc::now(),
    );
    let a = c.segment(false, "batch", &json!({ "batch": [other, refused] })).await.unwrap();
    assert_eq!((a.status.as_u16(), &a.body["accepted"]), (200, &json!(1)), "{}", a.body);
    assert_eq!(bus.person_remnants(&target).await.unwrap(), Default::default(), "nothing of hers in the log");
    newest_letter_withheld(c, JANA.email).await;
    // A payload refused whole (unreadable as a batch) that names her keeps only its reason.
    let broken = json!({ "batch": { "traits": { "email": JANA.email } } });
    assert_eq!(c.segment(false, "batch", &broken).await.unwrap().status, 400);
    newest_letter_withheld(c, JANA.email).await;
    // So does one whose refused element has only her number, written as people write it.
    let refused = json!({ "type": "identify", "traits": { "phone": "0151 1234 5678" } });
    let other = payloads::segment_page("max-batch-2", "anon-max-x", "/programs/mba", Utc::now());
    let a = c.segment(false, "batch", &json!({ "batch": [other, refused] })).await.unwrap();
    assert_eq!((a.status.as_u16(), &a.body["accepted"]), (200, &json!(1)), "{}", a.body);
    newest_letter_withheld(c, "1234 5678").await;
    let form = payloads::twilio_whatsapp_form("SMjanaagain00000000000000000001", JANA.phone, "hello again", "Jana");
    assert_eq!(c.twilio(&form).await.unwrap().status, 200, "Twilio gets its TwiML answer");
    // An event already on the bus (a replay, a redelivery) is dropped by the resolver.
    let mut replayed = cohort_messages::CustomerEvent::clone(&{
        let page = payloads::segment_page("jana-replayed", "anon-jana", "/programs/mba", Utc::now());
        let opts = &demo.cohort.api.normalize;
        let raw = cohort_messages::msgs::RawPayload {
            source: cohort_messages::Source::Web,
            format: cohort_messages::msgs::PayloadFormat::Segment { call: cohort_messages::msgs::SegmentCall::Page },
            content_type: "application/json".into(),
            received_at: Utc::now(),
            body: serde_json::to_vec(&page).unwrap().into(),
        };
        cohort_actors::normalize::normalize(&raw, opts).unwrap().events.remove(0)
    });
    replayed.raw.seq = None;
    bus.publish(AppendBatch { raw: None, events: vec![replayed] }).await.unwrap();
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    demo.cohort.flush().await.unwrap();
    assert_eq!(store.count_profiles().await.unwrap(), profiles_before, "no profile was created");
    assert_eq!(c.get(&format!("/v1/profiles/{jana_ref}")).await.unwrap().status, 404);
    assert_eq!(c.get("/v1/profiles/anonymous_id:anon-jana-new-device").await.unwrap().status, 404);
    let metrics = c.get("/metrics").await.unwrap().body;
    let text = metrics.as_str().map(str::to_string).unwrap_or_else(|| metrics.to_string());
    assert!(metric(&text, "cohort_gdpr_suppressed_events_total{stage=\"ingest\"}") >= 2.0, "{text}");
    assert!(metric(&text, "cohort_gdpr_suppressed_events_total{stage=\"resolver\"}") >= 1.0, "{text}");
    assert_eq!(metric(&text, "cohort_gdpr_saga_duration_seconds_count{regulation=\"suppress_with_delete\"}"), 1.0);
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_delete_lets_the_person_come_back_and_suppress_only_keeps_the_data() {
    let d = Destinations::start().await;
    let demo = DemoServer::start(None, &config_toml(&d), SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    seed_both(&demo).await;

    // suppress_only: nothing is deleted, but her new events are dropped.
    let max_ref = format!("email:{}", MAX.email);
    let url = request_deletion(c, &max_ref, "suppress_only").await;
    let done = wait_deletion(c, &url, Duration::from_secs(30), completed).await;
    let steps: Vec<&str> = done["steps"].as_array().unwrap().iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(steps, ["suppress", "verify", "audit", "release"]);
    assert_eq!(c.get(&format!("/v1/profiles/{max_ref}")).await.unwrap().status, 200, "data kept");
    let page = payloads::segment_page("max-later", "anon-max", "/programs/msc", Utc::now());
    assert_eq!(c.segment(false, "page", &page).await.unwrap().body["suppressed"], 1);

    // delete: everything goes, and she may come back later as a new profile.
    let jana_ref = format!("email:{}", JANA.email);
    let target = target_of(c, &jana_ref).await;
    let url = request_deletion(c, &jana_ref, "delete").await;
    let done = wait_deletion(c, &url, Duration::from_secs(30), completed).await;
    assert_eq!(step(&done, "release")["detail"]["suppression_lifted"], true, "{done}");
    assert_nothing_left(
        demo.cohort.ctx.store.as_ref(),
        demo.cohort.ctx.bus.as_ref(),
        demo.cohort.ctx.warehouse.as_deref(),
        &target,
        &JANA,
    )
    .await;
    let a = jana_writes_again(c, "jana-new", "anon-jana-2").await;
    assert_eq!((&a["accepted"], &a["suppressed"]), (&json!(1), &json!(0)), "{a}");
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let back = c.get(&format!("/v1/profiles/{jana_ref}")).await.unwrap();
    assert_eq!(back.status, 200);
    assert_ne!(back.body["profile_id"], json!(target.profiles[0].to_string()), "a new profile, not the old one");
    assert_eq!(back.body["counters"]["events_total"], 1, "nothing of the old one came back");
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_during_ingest_load_erases_the_person_and_loses_nobody_elses_events() {
    let d = Destinations::start().await;
    let demo = DemoServer::start(None, &config_toml(&d), SystemOptions::default()).await.unwrap();
    deletion_during_load(&demo).await;
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_interrupted_by_sigkill_resumes_where_it_stopped_after_the_restart() {
    let d = Destinations::start().await;
    let dir = tempfile::tempdir().unwrap();
    let storage = format!("[storage]\nurl = \"embedded://{}\"\n", dir.path().join("cohort.redb").display());
    let fail = |n| d.fail_next("salesforce", n);
    saga_survives_sigkill(dir.path(), &format!("{storage}{}", config_toml(&d)), fail).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_deletion_requests_get_clear_errors() {
    let demo = DemoServer::start(None, "", SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    let cases = [
        (json!({ "profile": "email:nobody@uni.eu" }), 404),
        (json!({ "profile": "email:nobody@uni.eu", "regulation": "erase" }), 400),
        (json!({ "profile": "not a ref" }), 400),
        (json!({ "profile": "email:a@b.eu", "surprise": 1 }), 400),
        (json!({ "profile": "email:a@b.eu", "requested_by": "" }), 400),
    ];
    for (body, status) in cases {
        let a = c.post("/v1/gdpr/deletions", &body).await.unwrap();
        assert_eq!(a.status, status, "{body}: {}", a.body);
        assert!(a.body["error"].is_object() || a.body["error"].is_string(), "{}", a.body);
    }
    assert_eq!(c.get("/v1/gdpr/deletions/del_unknown").await.unwrap().status, 404);
    let unauth = reqwest::Client::new().get(format!("{}/v1/gdpr/deletions", demo.base)).send().await.unwrap();
    assert_eq!(unauth.status(), 401);
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warehouse_refusing_dml_on_fresh_rows_is_retried_until_the_rows_are_gone() {
    let d = Destinations::start().await;
    let options =
        SystemOptions { warehouse_wrapper: Some(FaultyWarehouse::wrapper(3, None)), ..SystemOptions::default() };
    let demo = DemoServer::start(None, &config_toml(&d), options).await.unwrap();
    let c = &demo.client;
    seed_both(&demo).await;
    let jana_ref = format!("email:{}", JANA.email);
    let target = target_of(c, &jana_ref).await;
    let url = request_deletion(c, &jana_ref, "suppress_with_delete").await;
    let refused = wait_deletion(c, &url, Duration::from_secs(30), |v| {
        step(v, "warehouse")["status"] == "retrying" || v["status"] == "completed"
    })
    .await;
    assert_eq!(step(&refused, "warehouse")["status"], "retrying", "{refused}");
    assert!(step(&refused, "warehouse")["last_error"].as_str().unwrap().contains("streaming buffer"), "{refused}");
    let done = wait_deletion(c, &url, Duration::from_secs(30), completed).await;
    assert_eq!(step(&done, "warehouse")["attempts"], 4, "three refusals, then the delete: {done}");
    assert!(step(&done, "warehouse")["detail"]["rows_deleted"].as_u64().unwrap() >= 5, "{done}");
    let ctx = &demo.cohort.ctx;
    assert_nothing_left(ctx.store.as_ref(), ctx.bus.as_ref(), ctx.warehouse.as_deref(), &target, &JANA).await;
    let metrics = c.get("/metrics").await.unwrap().body;
    let text = metrics.as_str().unwrap_or_default();
    assert_eq!(metric(text, "cohort_gdpr_step_failures_total{step=\"warehouse\"}"), 3.0);
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_request_retrying_when_the_person_is_erased_is_dropped_not_sent() {
    let d = Destinations::start().await;
    let toml = config_toml(&d).replacen("[reverse_etl]\n", "[reverse_etl]\nmax_attempts = 1000\n", 1);
    let demo = DemoServer::start(None, &toml, SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    d.fail_next("sendgrid", 1_000_000);
    seed(c, &JANA, 1).await;
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let engine = demo.cohort.ctx.segment_engine.get().unwrap();
    engine.call(cohort_messages::msgs::SegmentMsg::Sync, Some(Duration::from_secs(10))).await.unwrap();
    // The list addition is in flight, failing and retrying.
    let retried = "cohort_reverse_etl_requests_total{destination=\"sendgrid\",outcome=\"retried\"}";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metric(c.get("/metrics").await.unwrap().body.as_str().unwrap_or_default(), retried) < 2.0 {
        assert!(std::time::Instant::now() < deadline, "the job never retried");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let jana_ref = format!("email:{}", JANA.email);
    let target = target_of(c, &jana_ref).await;
    let url = request_deletion(c, &jana_ref, "suppress_with_delete").await;
    // Once her actor is stopped she is erased for every part of Cohort; then SendGrid recovers
    // (the saga's own contact delete needs it too).
    wait_deletion(c, &url, Duration::from_secs(30), |v| step(v, "stop_actor")["status"] == "done").await;
    d.fail_next("sendgrid", 0);
    wait_deletion(c, &url, Duration::from_secs(30), completed).await;
    let skipped = "cohort_reverse_etl_skipped_total{destination=\"sendgrid\",reason=\"erased\"}";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metric(c.get("/metrics").await.unwrap().body.as_str().unwrap_or_default(), skipped) < 1.0 {
        assert!(std::time::Instant::now() < deadline, "the retrying job was not dropped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The saga searched and deleted her contact; the list addition never went out.
    let added: Vec<_> = d.received("sendgrid").into_iter().filter(|r| r.method == "PUT").collect();
    assert!(added.is_empty(), "the erased person was added to a list: {added:?}");
    let ctx = &demo.cohort.ctx;
    assert_nothing_left(ctx.store.as_ref(), ctx.bus.as_ref(), ctx.warehouse.as_deref(), &target, &JANA).await;
    demo.stop().await.unwrap();
}

/// Two resolver shards meeting a new student at once create two profiles, merged a moment
/// later. A deletion asked for in between (the merge recorded, the survivor not yet holding the
/// merged profile in `merged_from`) erases both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_while_a_merge_is_on_its_way_erases_the_merged_profile_too() {
    let (_d, demo) = seeded().await;
    let c = &demo.client;
    let jana_ref = format!("email:{}", JANA.email);
    let survivor = target_of(c, &jana_ref).await.profiles[0].clone();
    let store = demo.cohort.ctx.store.clone();
    let mut merged = store.load_profile(&survivor).await.unwrap().unwrap();
    merged.profile_id = cohort_messages::ProfileId::derive_from_event(
        &cohort_messages::EventId::new(cohort_messages::Source::Web, "jana-other-shard"),
        Utc::now(),
    );
    merged.merged_into = Some(survivor.clone());
    // A phone only the merged half holds yet.
    let phone = "+4915199990000";
    merged.identifiers.push(cohort_messages::LinkedIdentifier {
        identifier: cohort_messages::Identifier::new(cohort_messages::IdentifierKind::Phone, phone),
        source: cohort_messages::Source::Whatsapp,
        first_seen: Utc::now(),
    });
    let merge = cohort_messages::msgs::IdentityMerged {
        survivor: survivor.clone(),
        merged: merged.profile_id.clone(),
        evidence: Vec::new(),
        at: Utc::now(),
        seq: 0,
        reason: Default::default(),
    };
    let batch =
        cohort_adapters::FlushBatch { profiles: vec![merged.clone()], merges: vec![merge], ..Default::default() };
    store.commit_flush(batch).await.unwrap();

    let url = request_deletion(c, &jana_ref, "suppress_with_delete").await;
    let done = wait_deletion(c, &url, Duration::from_secs(30), completed).await;
    let profiles: Vec<&str> = done["profiles"].as_array().unwrap().iter().filter_map(|p| p.as_str()).collect();
    assert!(profiles.contains(&merged.profile_id.as_str()), "{done}");
    assert!(store.load_profile(&merged.profile_id).await.unwrap().is_none(), "the merged half was left");
    assert!(store.load_profile(&survivor).await.unwrap().is_none());
    // Its phone is hers too: suppressed, so her next message is dropped at ingest.
    let suppressed = "cohort_gdpr_suppressed_events_total{stage=\"ingest\"}";
    let before = metric(c.get("/metrics").await.unwrap().body.as_str().unwrap_or_default(), suppressed);
    let form = payloads::twilio_whatsapp_form("SMjanamerged000000000000000000001", phone, "hi", "Jana");
    assert_eq!(c.twilio(&form).await.unwrap().status, 200);
    let after = metric(c.get("/metrics").await.unwrap().body.as_str().unwrap_or_default(), suppressed);
    assert_eq!(after - before, 1.0, "the merged half's phone was not suppressed");
    demo.stop().await.unwrap();
}
