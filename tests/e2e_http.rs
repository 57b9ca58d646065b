//! End-to-end tests through the HTTP API on embedded defaults.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use chrono::Utc;
use cohort::demo::{fetch_profile, play_slide_18, DemoServer};
use cohort::payloads;
use cohort::SystemOptions;
use common::{series_sum, series_value};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;

async fn start() -> DemoServer {
    DemoServer::start(None, "", SystemOptions::default()).await.expect("cohort starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slide_18_becomes_one_profile_with_every_identifier_and_source() {
    let demo = start().await;
    play_slide_18(&demo.client).await.unwrap();
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let r = fetch_profile(&demo.client, "email:MAX@gmail.com").await.unwrap();
    let p = &r["profile"];
    let kinds: BTreeSet<&str> =
        p["identifiers"].as_array().unwrap().iter().filter_map(|i| i["kind"].as_str()).collect();
    for k in ["anonymous_id", "email", "user_id", "device_id", "salesforce_id", "phone", "whatsapp_id"] {
        assert!(kinds.contains(k), "missing identifier kind {k} in {kinds:?}");
    }
    let by_source = p["counters"]["by_source"].as_object().unwrap();
    for s in ["web", "mobile", "crm", "email", "whatsapp"] {
        assert!(by_source.get(s).and_then(Value::as_u64).unwrap_or(0) >= 1, "no {s} events: {by_source:?}");
    }
    assert_eq!(p["counters"]["events_total"], json!(6));
    // Salesforce wins contact fields over the web form, even though the form came first.
    assert_eq!(p["traits"]["first_name"]["value"], json!("Maximilian"));
    assert_eq!(p["traits"]["first_name"]["source"], json!("crm"));
    assert_eq!(p["traits"]["last_name"]["source"], json!("crm"));
    assert_eq!(p["traits"]["enrollment_status"]["value"], json!("inquiry"));
    // Web owns behaviour.
    assert_eq!(p["traits"]["last_page_path"]["value"], json!("/programmes/mba"));
    // Every ref form reaches the same live profile.
    let id = p["profile_id"].as_str().unwrap().to_string();
    for r in [id.as_str(), "phone:+49 1512 3456789", "device_id:dev_456", "anonymous_id:abc", "user_id:student-1001"] {
        let a = demo.client.get(&format!("/v1/profiles/{r}")).await.unwrap();
        assert_eq!(a.status, 200, "{r}: {}", a.body);
        assert_eq!(a.body["profile_id"], json!(id), "{r}");
    }
    let events = r["events"].as_array().unwrap();
    assert_eq!(events.len(), 6);
    // newest first
    let times: Vec<&str> = events.iter().map(|e| e["occurred_at"].as_str().unwrap()).collect();
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(times, sorted);
    // the WhatsApp message was understood
    let wa = events.iter().find(|e| e["source"] == json!("whatsapp")).unwrap();
    assert_eq!(wa["properties"]["intent"], json!("deadline_question"));
    assert!(wa["properties"]["entities"].as_array().unwrap().iter().any(|e| e == "MBA"));
    let traits = demo.client.get(&format!("/v1/profiles/{id}/traits")).await.unwrap();
    assert_eq!(traits.body["traits"]["email"]["value"], json!("max@gmail.com"));
    let ids = demo.client.get(&format!("/v1/profiles/{id}/identities")).await.unwrap();
    assert!(ids.body["identities"].as_array().unwrap().len() >= 7);
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_pages_newest_first() {
    let demo = start().await;
    let now = Utc::now();
    let batch: Vec<Value> = (0..12)
        .map(|i| {
            payloads::segment_track(
                &format!("pg-{i}"),
                "pager",
                "Lesson Completed",
                json!({"lesson": i}),
                now - chrono::Duration::seconds(100 - i),
            )
        })
        .collect();
    let a = demo.client.segment(true, "batch", &payloads::segment_batch(batch)).await.unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let p1 = demo.client.get("/v1/profiles/user_id:pager/events?limit=5").await.unwrap();
    let lessons: Vec<i64> =
        p1.body["events"].as_array().unwrap().iter().map(|e| e["properties"]["lesson"].as_i64().unwrap()).collect();
    assert_eq!(lessons, vec![11, 10, 9, 8, 7]);
    assert_eq!(p1.body["next_offset"], json!(5));
    let p3 = demo.client.get("/v1/profiles/user_id:pager/events?offset=10&limit=5").await.unwrap();
    assert_eq!(p3.body["events"].as_array().unwrap().len(), 2);
    assert_eq!(p3.body["next_offset"], Value::Null);
    let bad = demo.client.get("/v1/profiles/user_id:pager/events?limit=0").await.unwrap();
    assert_eq!(bad.status, 400);
    // A cursor page stays put while new events arrive: nothing shown twice, nothing skipped.
    let cursor = p1.body["next_cursor"].as_str().unwrap().to_string();
    let newer = payloads::segment_track("pg-new", "pager", "Lesson Completed", json!({"lesson": 99}), Utc::now());
    assert_eq!(demo.client.segment(true, "track", &newer).await.unwrap().status, 200);
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let lessons = |a: &cohort::client::Answer| -> Vec<i64> {
        a.body["events"].as_array().unwrap().iter().map(|e| e["properties"]["lesson"].as_i64().unwrap()).collect()
    };
    let p2 = demo.client.get(&format!("/v1/profiles/user_id:pager/events?limit=5&cursor={cursor}")).await.unwrap();
    assert_eq!(lessons(&p2), vec![6, 5, 4, 3, 2], "{}", p2.body);
    let cursor = p2.body["next_cursor"].as_str().unwrap();
    let p3 = demo.client.get(&format!("/v1/profiles/user_id:pager/events?limit=5&cursor={cursor}")).await.unwrap();
    assert_eq!(lessons(&p3), vec![1, 0]);
    assert_eq!(p3.body["next_cursor"], Value::Null);
    // The offset moved with the new event (what a cursor avoids).
    let shifted = demo.client.get("/v1/profiles/user_id:pager/events?offset=5&limit=1").await.unwrap();
    assert_eq!(lessons(&shifted), vec![7]);
    for bad in ["cursor=nonsense!", &format!("cursor={cursor}&offset=5")] {
        let a = demo.client.get(&format!("/v1/profiles/user_id:pager/events?{bad}")).await.unwrap();
        assert_eq!(a.status, 400, "{bad}: {}", a.body);
    }
    demo.stop().await.unwrap();
}

/// The profile body comes from the actor's cache: a new event replaces it at once, and so does
/// a computed trait's window sliding past an old event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_profile_view_follows_new_events_and_the_clock() {
    let demo = start().await;
    let page = |id: &str, path: &str, at| payloads::segment_page(id, "viewer", path, at);
    let aged = Utc::now() - chrono::Duration::days(7) + chrono::Duration::seconds(3);
    let a = demo.client.segment(false, "page", &page("cv-1", "/programmes/mba", aged)).await.unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let views = || async {
        let a = demo.client.get("/v1/profiles/anonymous_id:viewer").await.unwrap();
        assert_eq!(a.status, 200, "{}", a.body);
        // The cached body is sent as bytes: the JSON media type is set by the handler.
        assert_eq!(a.headers.get("content-type").and_then(|v| v.to_str().ok()), Some("application/json"));
        let c = &a.body["computed"];
        (c["page_views_7d"].as_u64().unwrap(), c["page_views_30d"].as_u64().unwrap())
    };
    assert_eq!(views().await, (1, 1));
    assert_eq!(views().await, (1, 1), "read again, from the cache");
    while Utc::now() < aged + chrono::Duration::days(7) + chrono::Duration::milliseconds(100) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(views().await, (0, 1), "the page view has left the 7-day window");
    let a = demo.client.segment(false, "page", &page("cv-2", "/campus", Utc::now())).await.unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    assert_eq!(views().await, (1, 2), "a new page view replaces the cached body");
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_event_ids_are_applied_once() {
    let demo = start().await;
    let ev = payloads::segment_track("dup-1", "student-dup", "Quiz Completed", json!({"score": 9}), Utc::now());
    let first = demo.client.segment(true, "track", &ev).await.unwrap();
    assert_eq!(first.body["accepted"], json!(1));
    let second = demo.client.segment(true, "track", &ev).await.unwrap();
    assert_eq!(second.status, 200);
    assert_eq!(second.body["accepted"], json!(0));
    assert_eq!(second.body["duplicates"], json!(1));
    // The same event inside a batch is a duplicate too.
    let batch = payloads::segment_batch(vec![ev.clone(), ev]);
    let third = demo.client.segment(true, "batch", &batch).await.unwrap();
    assert_eq!(third.body["duplicates"], json!(2));
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let p = demo.client.get("/v1/profiles/user_id:student-dup").await.unwrap();
    assert_eq!(p.body["counters"]["events_total"], json!(1));
    let m = demo.client.get("/metrics").await.unwrap();
    let text = m.body.as_str().unwrap();
    assert!(text.contains("cohort_ingest_events_duplicate_total{source=\"mobile\"} 3"), "{text}");
    assert!(text.contains("cohort_consumer_lag_events{partition=\"0\",topic=\"journal\"}"), "{text}");
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_401_and_never_reach_the_pipeline() {
    let demo = start().await;
    let c = &demo.client;
    let ev = payloads::segment_track("auth-1", "u1", "X", json!({}), Utc::now());
    let mut wrong = c.clone();
    wrong.web_key = "not-a-key".into();
    assert_eq!(wrong.segment(false, "track", &ev).await.unwrap().status, 401);
    // no credentials at all
    let r = c.http.post(format!("{}/v1/track", c.base)).json(&ev).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // write key in the body is accepted, as Segment does
    let mut with_key = ev.clone();
    with_key["writeKey"] = json!(c.web_key);
    let r = c.http.post(format!("{}/v1/track", c.base)).json(&with_key).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Twilio: missing and invalid signatures
    let form = payloads::twilio_whatsapp_form("SMx1", "+4915100000001", "Hallo", "A");
    let body = serde_urlencoded::to_string(&form).unwrap();
    let url = format!("{}/webhooks/twilio/whatsapp", c.base);
    let r = c
        .http
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .http
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-twilio-signature", "bm90IGEgc2lnbmF0dXJl")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let mut twilio_wrong = c.clone();
    twilio_wrong.twilio_token = "another-auth-token".into();
    assert_eq!(twilio_wrong.twilio(&form).await.unwrap().status, 401);
    assert_eq!(c.twilio(&form).await.unwrap().status, 200);
    // Salesforce relay and Profile API need their bearer tokens
    let mut crm_wrong = c.clone();
    crm_wrong.crm_token = "wrong-token".into();
    let cdc = payloads::salesforce_contact_cdc(1, "003A", "CREATE", json!({"Email": "a@b.de"}), Utc::now());
    assert_eq!(crm_wrong.salesforce_cdc(&cdc).await.unwrap().status, 401);
    let mut api_wrong = c.clone();
    api_wrong.api_token = "wrong-token".into();
    let a = api_wrong.get("/v1/profiles/user_id:u1").await.unwrap();
    assert_eq!(a.status, 401);
    assert_eq!(a.body["error"]["code"], json!("unauthorized"));
    assert_eq!(api_wrong.get("/v1/dlq").await.unwrap().status, 401);
    assert_eq!(api_wrong.get("/v1/supervisors").await.unwrap().status, 401);
    // Rejected credentials leave no dead letters: nothing unauthenticated is stored.
    let dlq = c.get("/v1/dlq").await.unwrap();
    assert_eq!(dlq.body["total"], json!(0));
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_payloads_are_refused_and_dead_lettered() {
    let demo = start().await;
    let c = &demo.client;
    // invalid JSON → 400 with a JSON error body
    let auth = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("{}:", c.web_key));
    let r = c
        .http
        .post(format!("{}/v1/track", c.base))
        .header("authorization", format!("Basic {auth}"))
        .header("content-type", "application/json")
        .body("{\"type\": \"track\", \"userId\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], json!("bad_request"));
    assert!(body["error"]["message"].as_str().unwrap().len() > 5);
    // a batch with one bad element: the rest is accepted, the bad one dead-lettered
    let good = payloads::segment_track("mixed-1", "u-mixed", "Lesson Completed", json!({}), Utc::now());
    let bad = json!({"type": "track", "event": "No identity", "messageId": "mixed-2"});
    let a = c.segment(false, "batch", &payloads::segment_batch(vec![good, bad])).await.unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["accepted"], json!(1));
    assert_eq!(a.body["rejected"].as_array().unwrap().len(), 1);
    // SendGrid body that is not an array
    let a = c.sendgrid(&json!({"email": "x@y.de"})).await.unwrap();
    assert_eq!(a.status, 400);
    // CDC without a change event header
    let a = c.salesforce_cdc(&json!({"data": {"payload": {}}})).await.unwrap();
    assert_eq!(a.status, 400);
    // over Segment's 500 KB request limit → 413
    let huge = json!({"type": "track", "userId": "u", "event": "big", "properties": {"blob": "x".repeat(600_000)}});
    let a = c.segment(false, "track", &huge).await.unwrap();
    assert_eq!(a.status, 413);
    assert_eq!(a.header("connection"), Some("close"), "the client must not reuse this connection");
    // unknown profile → 404, bad ref → 400
    assert_eq!(c.get("/v1/profiles/email:nobody@example.org").await.unwrap().status, 404);
    assert_eq!(c.get("/v1/profiles/prof_000000000000000000000000").await.unwrap().status, 404);
    assert_eq!(c.get("/v1/profiles/shoe:12").await.unwrap().status, 400);
    let dlq = c.get("/v1/dlq").await.unwrap();
    let letters = dlq.body["dead_letters"].as_array().unwrap();
    assert_eq!(dlq.body["total"], json!(4), "{}", dlq.body);
    assert!(letters.iter().all(|l| l["stage"] == json!("validation")));
    assert!(letters.iter().any(|l| l["payload"].as_str().unwrap().contains("\"userId\": ")));
    assert!(letters.iter().any(|l| l["reason"].as_str().unwrap().starts_with("element 1")));
    let m = c.get("/metrics").await.unwrap();
    let text = m.body.as_str().unwrap();
    assert!(text.contains("cohort_dead_letters_total{stage=\"validation\"} 4"), "{text}");
    assert!(text.contains("cohort_ingest_events_rejected_total{reason=\"invalid\",source=\"web\"} 2"), "{text}");
    demo.stop().await.unwrap();
}

/// A body that is not UTF-8 is refused and dead-lettered with a bounded, marked sample of it:
/// decoded whole, each bad byte would take three, past what a store takes in one record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_utf8_is_dead_lettered_as_a_bounded_sample() {
    let demo = start().await;
    let c = &demo.client;
    let r = c
        .http
        .post(format!("{}/v1/batch", c.base))
        .basic_auth(&c.web_key, Some(""))
        .header("content-type", "application/json")
        .body(vec![0xFFu8; 200_000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let dlq = c.get("/v1/dlq").await.unwrap().body;
    assert_eq!(dlq["total"], 1, "{dlq}");
    let payload = dlq["dead_letters"][0]["payload"].as_str().unwrap();
    assert!(payload.starts_with("(not UTF-8, 200000 bytes; the first 65536 decoded lossily) "), "{}", &payload[..80]);
    assert!(payload.len() < 65_536 * 3 + 100, "bounded: {} bytes", payload.len());
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_endpoints_answer() {
    let demo = start().await;
    let c = &demo.client;
    assert_eq!(c.get("/health/live").await.unwrap().status, 200);
    let ready = c.get("/health/ready").await.unwrap();
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(ready.body["consumer_groups_joined"], true, "the embedded bus has no groups to wait for");
    let sup = c.get("/v1/supervisors").await.unwrap();
    let paths: Vec<&str> = sup.body["children"].as_array().unwrap().iter().filter_map(|c| c["path"].as_str()).collect();
    for p in [
        "root/ingest",
        "root/ingest/web",
        "root/ingest/whatsapp",
        "root/pipeline",
        "root/pipeline/profiles",
        "root/pipeline/identity",
        "root/pipeline/dispatcher",
    ] {
        assert!(paths.contains(&p), "{p} missing from {paths:?}");
    }
    assert!(paths.contains(&"root/jobs/membership"), "{paths:?}");
    // One replica on the embedded backends: it is the whole cluster and consumes the journal.
    // (Its first heartbeat may precede the end of start-up; the next one says ready.)
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let cluster = loop {
        let cluster = c.get("/v1/cluster").await.unwrap();
        assert_eq!(cluster.status, 200, "{}", cluster.body);
        if cluster.body["members"][0]["ready"] == true || std::time::Instant::now() > deadline {
            break cluster;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(cluster.body["alive"], 1, "{}", cluster.body);
    let me = &cluster.body["members"][0];
    assert_eq!(me["name"], cluster.body["self"], "{}", cluster.body);
    assert_eq!((&me["self"], &me["alive"], &me["ready"]), (&json!(true), &json!(true), &json!(true)), "{me}");
    assert_eq!(me["partitions"], json!(["journal/0"]), "{me}");
    let openapi = c.get("/openapi.json").await.unwrap();
    assert_eq!(openapi.status, 200);
    let doc_paths = openapi.body["paths"].as_object().unwrap();
    for p in [
        "/v1/{call}",
        "/webhooks/twilio/whatsapp",
        "/v1/profiles/{ref}",
        "/v1/profiles/{ref}/events",
        "/v1/dlq",
        "/metrics",
    ] {
        assert!(doc_paths.contains_key(p), "{p} missing from the OpenAPI document");
    }
    play_slide_18(c).await.unwrap();
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let m = c.get("/metrics").await.unwrap();
    let text = m.body.as_str().unwrap();
    for needle in [
        "cohort_ingest_events_received_total{source=\"whatsapp\"} 1",
        "cohort_ingest_events_accepted_total{source=\"crm\"} 1",
        "cohort_profile_actors_live",
        "cohort_mailbox_depth",
        "cohort_api_request_duration_seconds_bucket",
        "cohort_event_to_profile_seconds_count",
        "cohort_profiles_created_total",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}:\n{text}");
    }
    // Every applied event passed each stage once, and each stage later than the one before.
    let applied = series_value(text, "cohort_event_to_profile_seconds_count");
    assert_eq!(applied, series_sum(text, "cohort_ingest_events_accepted_total"), "{text}");
    let mut since_receipt = 0.0;
    for stage in cohort_supervisors::PIPELINE_STAGES {
        let count = series_value(text, &format!("cohort_pipeline_stage_seconds_count{{stage=\"{stage}\"}}"));
        assert_eq!(count, applied, "{stage}:\n{text}");
        let sum = series_value(text, &format!("cohort_pipeline_stage_seconds_sum{{stage=\"{stage}\"}}"));
        assert!(sum >= since_receipt, "{stage} sums {sum} s, before an earlier stage's {since_receipt} s");
        since_receipt = sum;
    }
    assert!(
        since_receipt > 0.0 && since_receipt <= series_value(text, "cohort_event_to_profile_seconds_sum"),
        "{text}"
    );
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gmail_mailbox_written_three_ways_is_one_student() {
    let demo = start().await;
    let c = &demo.client;
    let t = Utc::now();
    let form = payloads::segment_identify(
        "gm-1",
        Some("anon-gm"),
        None,
        json!({ "email": "Lena.Fischer+open-day@gmail.com", "firstName": "Lena" }),
        None,
        t,
    );
    assert_eq!(c.segment(false, "identify", &form).await.unwrap().status, 200);
    let open = payloads::sendgrid_event("Z20tb3Blbi0x", "lenafischer@googlemail.com", "open", t);
    assert_eq!(c.sendgrid(&open).await.unwrap().status, 200);
    let other = payloads::segment_identify(
        "gm-2",
        Some("anon-other"),
        None,
        json!({ "email": "lena.fischer@uni-hamburg.de" }),
        None,
        t,
    );
    assert_eq!(c.segment(false, "identify", &other).await.unwrap().status, 200);
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();

    // Any spelling of the mailbox finds the one profile; the trait keeps the address as given.
    let a = c.get("/v1/profiles/email:LENA.FISCHER@gmail.com").await.unwrap();
    let b = c.get("/v1/profiles/email:lenafischer+x@googlemail.com").await.unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["profile_id"], b.body["profile_id"]);
    assert_eq!(a.body["counters"]["events_total"], json!(2), "{}", a.body);
    assert_eq!(a.body["traits"]["email"]["value"], json!("lena.fischer+open-day@gmail.com"));
    // A university address is a different mailbox, whatever it shares with the name.
    let uni = c.get("/v1/profiles/email:lena.fischer@uni-hamburg.de").await.unwrap();
    assert_ne!(uni.body["profile_id"], a.body["profile_id"]);
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_addresses_never_merge_strangers_and_alone_are_dead_lettered() {
    let demo = start().await;
    let c = &demo.client;
    let t = Utc::now();
    for (n, name) in [(1, "Anna"), (2, "Ben")] {
        let signup = payloads::segment_identify(
            &format!("blk-{n}"),
            Some(&format!("anon-blk-{n}")),
            None,
            json!({ "email": "TEST@example.com", "firstName": name }),
            None,
            t,
        );
        assert_eq!(c.segment(false, "identify", &signup).await.unwrap().status, 200);
    }
    let only_blocked = payloads::sendgrid_event("YmxvY2tlZC0x", "test@example.com", "open", t);
    assert_eq!(c.sendgrid(&only_blocked).await.unwrap().status, 200);
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();

    let anna = c.get("/v1/profiles/anonymous_id:anon-blk-1").await.unwrap();
    let ben = c.get("/v1/profiles/anonymous_id:anon-blk-2").await.unwrap();
    assert_eq!((anna.status.as_u16(), ben.status.as_u16()), (200, 200));
    assert_ne!(anna.body["profile_id"], ben.body["profile_id"], "a shared test address merged two people");
    assert_eq!(c.get("/v1/profiles/email:test@example.com").await.unwrap().status, 404, "never linked");

    let dlq = c.get("/v1/dlq?limit=100").await.unwrap().body;
    let reasons: Vec<&str> =
        dlq["dead_letters"].as_array().unwrap().iter().filter_map(|d| d["reason"].as_str()).collect();
    assert!(reasons.iter().any(|r| r.contains("blocked")), "{dlq}");
    let m = c.get("/metrics").await.unwrap();
    assert!(
        m.body.as_str().unwrap().contains("cohort_identity_blocked_identifiers_total{kind=\"email\"} 3"),
        "{}",
        m.body
    );
    demo.stop().await.unwrap();
}

#[tokio::test]
async fn a_blocked_identifier_that_is_not_one_stops_the_start() {
    let config = cohort_config::Config::from_toml_str("[identity]\nblocked = [\"email:not an address\"]\n").unwrap();
    let err = match cohort::Cohort::start(config, SystemOptions::default()).await {
        Ok(_) => panic!("started with a bad identity.blocked entry"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("identity.blocked") && err.contains("not an address"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_match_rate_counts_live_profiles_tied_to_a_known_person() {
    let demo = start().await;
    let c = &demo.client;
    play_slide_18(c).await.unwrap();
    // Two anonymous-only visitors: live profiles nobody can name yet.
    for n in 1..=2 {
        let visit = payloads::segment_page(&format!("anon-visit-{n}"), &format!("anon-only-{n}"), "/", Utc::now());
        assert_eq!(c.segment(false, "page", &visit).await.unwrap().status, 200);
    }
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let stats = c.get("/v1/profiles/stats").await.unwrap();
    assert_eq!(stats.status, 200, "{}", stats.body);
    let s = &stats.body["identity"];
    assert_eq!((s["live_profiles"].as_u64(), s["known_profiles"].as_u64()), (Some(3), Some(1)), "{s}");
    let rate = s["match_rate"].as_f64().unwrap();
    assert!((rate - 1.0 / 3.0).abs() < 1e-9, "{rate}");
    let m = c.get("/metrics").await.unwrap().body.as_str().unwrap().to_string();
    assert!(m.contains("cohort_profiles_live 3") && m.contains("cohort_profiles_known 1"), "{m}");
    assert!(m.contains("cohort_identity_match_rate 0.333"), "{m}");
    let anonymous = cohort::client::CohortClient::new(
        &demo.base,
        &cohort_config::Config::from_toml_str("[auth]\napi_tokens = [\"someone-else\"]\n").unwrap(),
    )
    .unwrap();
    assert_eq!(anonymous.get("/v1/profiles/stats").await.unwrap().status, 401);
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_carries_a_request_id_for_correlation() {
    let demo = start().await;
    let http = reqwest::Client::new();
    let fresh = http.get(format!("{}/health/live", demo.base)).send().await.unwrap();
    let id = fresh.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert_eq!(id.len(), 36, "a new UUID when the caller sends none: {id:?}");
    let mine = http
        .get(format!("{}/v1/profiles/user_id:nobody", demo.base))
        .header("x-request-id", "ticket-4711-retry-2")
        .bearer_auth("dev-api-token")
        .send()
        .await
        .unwrap();
    assert_eq!(mine.status(), 404);
    assert_eq!(mine.headers().get("x-request-id").unwrap(), "ticket-4711-retry-2", "the caller's id comes back");
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abuse_limits_answer_429_per_credential_and_503_when_overloaded() {
    let extra = "[server]\napi_requests_per_second = 5\ningest_requests_per_second = 3\n\
                 [auth]\napi_tokens = [\"dev-api-token\", \"second-token-123\"]\n";
    let demo = DemoServer::start(None, extra, SystemOptions::default()).await.unwrap();
    let http = reqwest::Client::new();
    let get = |token: &'static str, path: &'static str| {
        let (http, url) = (http.clone(), format!("{}{path}", demo.base));
        async move { http.get(url).bearer_auth(token).send().await.unwrap() }
    };
    let mut limited = None;
    for _ in 0..12 {
        let r = get("dev-api-token", "/v1/segments").await;
        if r.status() == 429 {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status(), 200);
    }
    let limited = limited.expect("12 requests at once exceed 5 per second");
    let retry: u64 = limited.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1, "{retry}");
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    assert_eq!(get("second-token-123", "/v1/segments").await.status(), 200, "another credential has its own quota");
    for _ in 0..20 {
        assert_eq!(get("dev-api-token", "/health/live").await.status(), 200, "probes are never limited");
    }
    // Ingest has its own quota per write key.
    let mut ingest_limited = false;
    for i in 0..10 {
        let ev = payloads::segment_track(&format!("rl-{i}"), "u-rl", "X", json!({}), Utc::now());
        let a = demo.client.segment(false, "track", &ev).await.unwrap();
        ingest_limited |= a.status == 429;
    }
    assert!(ingest_limited, "10 ingest calls at once exceed 3 per second");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(get("dev-api-token", "/v1/segments").await.status(), 200, "the quota refills");
    let text = demo.client.get("/metrics").await.unwrap().body.as_str().unwrap().to_string();
    assert!(text.contains("cohort_api_refused_total{route=\"/v1/segments\"}"), "{text}");
    demo.stop().await.unwrap();

    // Load shedding: one request at a time; concurrent job runs beyond it are refused at once.
    let extra = "[server]\nmax_in_flight = 1\n";
    let demo = DemoServer::start(None, extra, SystemOptions::default()).await.unwrap();
    play_slide_18(&demo.client).await.unwrap();
    let calls: Vec<_> = (0..30)
        .map(|_| {
            let c = demo.client.clone();
            tokio::spawn(async move { c.post("/v1/jobs/gold_reconcile/run", &Value::Null).await.unwrap() })
        })
        .collect();
    let mut shed = 0;
    for call in calls {
        let a = call.await.unwrap();
        if a.status == 503 && a.body["error"]["code"] == "overloaded" {
            shed += 1;
        }
    }
    assert!(shed >= 1, "30 concurrent runs never exceeded one in flight");
    demo.stop().await.unwrap();
}

/// A WhatsApp sender is found the way the webhook stored them: by the number as sent (also one
/// the phone database does not know) and by the WhatsApp id as Twilio gives it, without `+`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatsapp_senders_are_found_by_their_number_and_their_whatsapp_id_as_sent() {
    let demo = start().await;
    let c = &demo.client;
    for (sid, number) in
        [("SMlookup000000000000000000000001", "+4915123456789"), ("SMlookup000000000000000000000002", "+999123456789")]
    {
        let form = payloads::twilio_whatsapp_form(sid, number, "Hallo", "Kim");
        assert_eq!(c.twilio(&form).await.unwrap().status, 200);
    }
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    for r in [
        "phone:+4915123456789",
        "whatsapp_id:4915123456789",
        "whatsapp_id:+4915123456789",
        "phone:+999123456789",
        "whatsapp_id:999123456789",
    ] {
        let a = c.get(&format!("/v1/profiles/{}", r.replace('+', "%2B"))).await.unwrap();
        assert_eq!(a.status, 200, "{r}: {}", a.body);
    }
    assert_eq!(c.get("/v1/profiles/phone:not-a-number").await.unwrap().status, 400);
    demo.stop().await.unwrap();
}
