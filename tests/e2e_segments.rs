//! Real-time segments, triggers and reverse ETL through the HTTP API of an in-process Cohort,
//! against local HTTP servers that check the destinations' request shapes (tests/common).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

#[path = "common/destinations.rs"]
mod destinations;

use chrono::{Duration as Span, Utc};
use cohort::client::CohortClient;
use cohort::demo::DemoServer;
use cohort::payloads;
use cohort::SystemOptions;
use cohort_messages::msgs::{ReverseEtlMsg, SegmentMsg};
use destinations::Destinations;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const RULE: &str = r#"page_count("mba", 7d) >= 3 and event_count("Brochure Downloaded", 30d) >= 1 and enrollment_status == "inquiry" and consent.email"#;

fn use_case_toml(d: &Destinations) -> String {
    format!(
        r#"{}
[[segments.define]]
name = "high_intent_mba"
rule = '{RULE}'

[[activations]]
name = "mba_task"
segment = "high_intent_mba"
destination = "salesforce"
action = "create_task"
fields = {{ Subject = "MBA follow-up: {{{{traits.first_name}}}}", Priority = "High", Description = "Engagement score {{{{computed.engagement_score}}}}" }}
pii_fields = ["Subject"]

[[activations]]
name = "mba_list"
segment = "high_intent_mba"
destination = "sendgrid"
action = "add_to_list"
list_id = "7c1a2b3c-mba-prospects"
fields = {{ first_name = "{{{{traits.first_name}}}}", e1_T = "MBA" }}

[[activations]]
name = "mba_advisor"
segment = "high_intent_mba"
destination = "twilio"
action = "send_template"
template_sid = "HX0123456789abcdef0123456789abcdef"
fields = {{ "1" = "{{{{traits.first_name}}}}" }}
"#,
        d.config_toml()
    )
}

async fn ok(a: cohort::client::Answer) -> Value {
    assert!(a.status.is_success(), "{} {}", a.status, a.body);
    a.body
}

/// The student of slide 17's first use case, up to (not including) the brochure download.
async fn prospect(c: &CohortClient, who: &str, email: &str, contact: &str, email_consent: bool) {
    let now = Utc::now();
    let cdc = payloads::salesforce_contact_cdc(
        rand_replay(who),
        contact,
        "CREATE",
        json!({ "Email": email, "FirstName": "Anna", "LastName": "Schmidt", "MobilePhone": "+49 151 23456789",
                "Enrollment_Status__c": "Inquiry" }),
        now,
    );
    ok(c.salesforce_cdc(&cdc).await.unwrap()).await;
    let mut identify = payloads::segment_identify(
        &format!("{who}-id"),
        Some(&format!("anon-{who}")),
        None,
        json!({ "email": email }),
        None,
        now,
    );
    identify["context"]["consent"] = json!({ "categoryPreferences": { "email": email_consent, "whatsapp": false } });
    ok(c.segment(false, "identify", &identify).await.unwrap()).await;
    for (i, page) in ["/programs/mba", "/programs/mba/curriculum", "/programs/mba/fees"].iter().enumerate() {
        let p =
            payloads::segment_page(&format!("{who}-p{i}"), &format!("anon-{who}"), page, now - Span::hours(i as i64));
        ok(c.segment(false, "page", &p).await.unwrap()).await;
    }
}

/// A visitor who consents to email and views the MBA page now.
async fn consenting_mba_visitor(c: &CohortClient, who: &str, email: &str) {
    let anon = format!("anon-{who}");
    let mut identify = payloads::segment_identify(
        &format!("{who}-id"),
        Some(&anon),
        None,
        json!({ "email": email }),
        None,
        Utc::now(),
    );
    identify["context"]["consent"] = json!({ "categoryPreferences": { "email": true } });
    ok(c.segment(false, "identify", &identify).await.unwrap()).await;
    let page = payloads::segment_page(&format!("{who}-p1"), &anon, "/programs/mba", Utc::now());
    ok(c.segment(false, "page", &page).await.unwrap()).await;
}

fn rand_replay(who: &str) -> u64 {
    who.bytes().fold(1000u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
}

fn brochure(who: &str) -> Value {
    json!({ "type": "track", "messageId": format!("{who}-brochure"), "anonymousId": format!("anon-{who}"),
        "event": "Brochure Downloaded", "properties": { "programme": "MBA" }, "timestamp": Utc::now().to_rfc3339() })
}

async fn drained(demo: &DemoServer) {
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let engine = demo.cohort.ctx.segment_engine.get().unwrap();
    engine.call(SegmentMsg::Sync, Some(Duration::from_secs(10))).await.unwrap();
    let retl = demo.cohort.reverse_etl.get().unwrap();
    retl.call(ReverseEtlMsg::Drain, Some(Duration::from_secs(70))).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_case_1_a_high_intent_mba_prospect_gets_a_task_and_an_email_list_but_no_whatsapp_within_a_second() {
    let d = Destinations::start().await;
    let demo = DemoServer::start(None, &use_case_toml(&d), SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    prospect(c, "anna", "anna.schmidt@gmail.com", "0035e00000AnnaAAAA", true).await;
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    assert!(d.received("salesforce").is_empty(), "not before the brochure");

    let sent = Instant::now();
    ok(c.segment(false, "track", &brochure("anna")).await.unwrap()).await;
    // Within one second of the acknowledgement: the Task and the list addition.
    let deadline = sent + Duration::from_secs(1);
    while (d.received("salesforce").is_empty() || d.received("sendgrid").is_empty()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let task = d.received("salesforce");
    let list = d.received("sendgrid");
    assert_eq!(task.len(), 1, "a Salesforce Task within a second");
    assert_eq!(list.len(), 1, "a SendGrid list addition within a second");
    assert!(task[0].at.duration_since(sent) < Duration::from_secs(1));
    assert_eq!(task[0].body["WhoId"], "0035e00000AnnaAAAA");
    assert_eq!(task[0].body["Subject"], "MBA follow-up: Anna");
    assert_eq!(task[0].body["Priority"], "High");
    assert!(task[0].body["Description"].as_str().unwrap().starts_with("Engagement score "));
    assert!(task[0].idempotency_key.as_deref().is_some_and(|k| k.starts_with("mba_task:")));
    assert_eq!(list[0].body["list_ids"], json!(["7c1a2b3c-mba-prospects"]));
    assert_eq!(list[0].body["contacts"][0]["email"], "anna.schmidt@gmail.com");
    assert_eq!(list[0].body["contacts"][0]["first_name"], "Anna");
    assert_eq!(list[0].body["contacts"][0]["custom_fields"], json!({ "e1_T": "MBA" }), "a custom field by its id");

    drained(&demo).await;
    assert!(d.received("twilio").is_empty(), "no WhatsApp: she did not consent to it");
    let status = ok(c.get("/v1/reverse-etl/status").await.unwrap()).await;
    let dest = &status["destinations"];
    assert_eq!(dest["salesforce"]["sent"], 1, "{status}");
    assert_eq!(dest["sendgrid"]["sent"], 1, "{status}");
    assert_eq!(dest["twilio"]["sent"], 0, "{status}");
    assert_eq!(dest["twilio"]["skipped"]["consent"], 1, "{status}");

    // Her segments, the members, the computed traits.
    let segs = ok(c.get("/v1/profiles/email:anna.schmidt@gmail.com/segments").await.unwrap()).await;
    assert!(segs["segments"]["high_intent_mba"]["since"].is_string(), "{segs}");
    let members = ok(c.get("/v1/segments/high_intent_mba/members").await.unwrap()).await;
    assert_eq!(members["members"].as_array().unwrap().len(), 1, "{members}");
    let profile = ok(c.get("/v1/profiles/email:anna.schmidt@gmail.com").await.unwrap()).await;
    assert_eq!(profile["computed"]["page_views_by_topic_7d"]["mba"], 3, "{profile}");
    assert_eq!(profile["computed"]["funnel_stage"], "inquiry");
    assert_eq!(profile["consent"]["email"]["granted"], true);

    // The same change is not sent twice, and a student without email consent gets nothing.
    prospect(c, "ben", "ben.k@gmail.com", "0035e00000BenAAAAA", false).await;
    ok(c.segment(false, "track", &brochure("ben")).await.unwrap()).await;
    drained(&demo).await;
    assert_eq!(d.received("salesforce").len(), 1);
    assert_eq!(d.received("sendgrid").len(), 1);
    demo.stop().await.unwrap();
}

/// The identify a student opts in (or out) of channels with.
fn consent_update(who: &str, email: &str, n: u32, whatsapp: bool) -> Value {
    let mut identify = payloads::segment_identify(
        &format!("{who}-consent-{n}"),
        Some(&format!("anon-{who}")),
        None,
        json!({ "email": email }),
        None,
        Utc::now(),
    );
    identify["context"]["consent"] = json!({ "categoryPreferences": { "email": true, "whatsapp": whatsapp } });
    identify
}

/// A member whose activation was skipped for want of consent gets it once she consents: the
/// grant offers her memberships again, and nothing that already went out goes twice (nor does
/// a failed one, which waits for an operator's retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_skipped_for_want_of_consent_goes_out_once_consent_is_granted() {
    let d = Destinations::start().await;
    let demo = DemoServer::start(None, &use_case_toml(&d), SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    let email = "cara.m@gmail.com";
    d.fail_next("sendgrid", 1_000_000);
    prospect(c, "cara", email, "0035e00000CaraAAAA", true).await;
    ok(c.segment(false, "track", &brochure("cara")).await.unwrap()).await;
    drained(&demo).await;
    assert!(d.received("twilio").is_empty(), "no WhatsApp consent yet");
    assert_eq!(d.received("salesforce").len(), 1);
    let failed = |status: &Value| status["destinations"]["sendgrid"]["failed"].clone();
    let status = ok(c.get("/v1/reverse-etl/status").await.unwrap()).await;
    assert_eq!(failed(&status), 1, "{status}");

    ok(c.segment(false, "identify", &consent_update("cara", email, 1, true)).await.unwrap()).await;
    drained(&demo).await;
    let wa = d.received("twilio");
    assert_eq!(wa.len(), 1, "the advisor template once she consented");
    assert_eq!(wa[0].body["To"], "whatsapp:+4915123456789", "{:?}", wa[0].body);
    assert_eq!(wa[0].body["ContentSid"], "HX0123456789abcdef0123456789abcdef");
    assert_eq!(d.received("salesforce").len(), 1, "nothing went twice");
    let status = ok(c.get("/v1/reverse-etl/status").await.unwrap()).await;
    assert_eq!(failed(&status), 1, "the failed list addition was not tried again: {status}");

    // Withdrawn and granted again: the template went out already.
    ok(c.segment(false, "identify", &consent_update("cara", email, 2, false)).await.unwrap()).await;
    ok(c.segment(false, "identify", &consent_update("cara", email, 3, true)).await.unwrap()).await;
    drained(&demo).await;
    assert_eq!(d.received("twilio").len(), 1);
    let status = ok(c.get("/v1/reverse-etl/status").await.unwrap()).await;
    assert_eq!(status["destinations"]["twilio"]["sent"], 1, "{status}");
    demo.stop().await.unwrap();
}

/// Any page about the MBA puts a student in the segment; its SendGrid list needs email consent.
fn mba_list_toml(d: &Destinations) -> String {
    format!(
        "{}\n[[segments.define]]\nname = \"mba_interest\"\nrule = 'page_count(\"mba\") >= 1'\n\n\
         [[activations]]\nname = \"mba_list\"\nsegment = \"mba_interest\"\ndestination = \"sendgrid\"\n\
         action = \"add_to_list\"\nlist_id = \"list-mba\"\n",
        d.config_toml()
    )
}

/// A CRM contact who reads about the MBA: in the segment, her list addition skipped (no consent).
async fn member_without_consent(demo: &DemoServer, who: &str, email: &str) {
    let c = &demo.client;
    let contact = format!("0035e0000{:0>9}", who.to_uppercase());
    let cdc =
        payloads::salesforce_contact_cdc(rand_replay(who), &contact, "CREATE", json!({ "Email": email }), Utc::now());
    ok(c.salesforce_cdc(&cdc).await.unwrap()).await;
    let mut page =
        payloads::segment_page(&format!("{who}-p1"), &format!("anon-{who}-web"), "/programs/mba", Utc::now());
    page["context"]["traits"] = json!({ "email": email });
    ok(c.segment(false, "page", &page).await.unwrap()).await;
    drained(demo).await;
}

/// SendGrid got exactly one list addition, for `email`.
fn assert_one_list_addition(d: &Destinations, email: &str, why: &str) {
    let list = d.received("sendgrid");
    assert_eq!(list.len(), 1, "{why}");
    assert_eq!(list[0].body["contacts"][0]["email"], email);
}

fn sendgrid_skips(status: &Value, reason: &str) -> u64 {
    status["destinations"]["sendgrid"]["skipped"][reason].as_u64().unwrap_or(0)
}

/// The same when the consent comes with a merge: the survivor, in the segment without consent,
/// takes over the grant the merged profile had, and its activation goes out. A grant on another
/// channel before that does not touch it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_skipped_for_want_of_consent_goes_out_once_a_merge_brings_the_consent() {
    let d = Destinations::start().await;
    let demo = DemoServer::start(None, &mba_list_toml(&d), SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    let email = "dana.k@uni.eu";
    member_without_consent(&demo, "dana", email).await;
    let status = ok(c.get("/v1/reverse-etl/status").await.unwrap()).await;
    assert_eq!(sendgrid_skips(&status, "consent"), 1, "{status}");
    // WhatsApp consent is not what the list needs: the skipped job is not run again.
    let mut whatsapp =
        payloads::segment_identify("dana-wa", Some("anon-dana-web"), None, json!({ "email": email }), None, Utc::now());
    whatsapp["context"]["consent"] = json!({ "categoryPreferences": { "whatsapp": true } });
    ok(c.segment(false, "identify", &whatsapp).await.unwrap()).await;
    drained(&demo).await;
    let status = ok(c.get("/v1/reverse-etl/status").await.unwrap()).await;
    assert_eq!(sendgrid_skips(&status, "consent"), 1, "only grants on the job's channel offer it: {status}");
    // An anonymous app visitor consents to email, then logs in with the same address: merged.
    let now = Utc::now();
    let mut optin = payloads::segment_identify("dana-app-1", Some("anon-dana-app"), None, json!({}), None, now);
    optin["context"]["consent"] = json!({ "categoryPreferences": { "email": true } });
    ok(c.segment(true, "identify", &optin).await.unwrap()).await;
    drained(&demo).await;
    let login =
        payloads::segment_identify("dana-app-2", Some("anon-dana-app"), None, json!({ "email": email }), None, now);
    ok(c.segment(true, "identify", &login).await.unwrap()).await;
    drained(&demo).await;

    let metrics = ok(c.get("/metrics").await.unwrap()).await;
    assert!(metrics.as_str().unwrap_or_default().contains("cohort_identity_merges_total 1"), "one merge");
    // The survivor absorbs the merged record after the login event is settled: its offer may
    // reach reverse ETL after `drained` returned.
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.received("sendgrid").is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drained(&demo).await;
    assert_one_list_addition(&d, email, "the list addition once the merge brought the consent");
    demo.stop().await.unwrap();
}

/// And when the consent is recorded through the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_skipped_for_want_of_consent_goes_out_once_consent_is_recorded_through_the_api() {
    let d = Destinations::start().await;
    let demo = DemoServer::start(None, &mba_list_toml(&d), SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    let email = "emil.b@uni.eu";
    member_without_consent(&demo, "emil", email).await;
    assert!(d.received("sendgrid").is_empty());
    let put = c
        .call(
            "PUT",
            &format!("/v1/profiles/email:{email}/consent"),
            &json!({ "email": { "granted": true, "source": "advisor_call" } }),
        )
        .await
        .unwrap();
    assert_eq!(put.status, 200, "{}", put.body);
    drained(&demo).await;
    assert_one_list_addition(&d, email, "the list addition once consent was recorded");
    demo.stop().await.unwrap();
}

/// Consent withdrawn while a request is backing off after a failure: the retry is not sent,
/// and the job ends as skipped for want of consent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_withdrawn_while_a_request_retries_stops_the_retry() {
    let d = Destinations::start().await;
    let slow = mba_list_toml(&d).replacen("backoff_initial_ms = 20", "backoff_initial_ms = 1500", 1);
    let demo = DemoServer::start(
        None,
        &slow.replacen("backoff_max_ms = 100", "backoff_max_ms = 2000", 1),
        SystemOptions::default(),
    )
    .await
    .unwrap();
    let c = &demo.client;
    d.fail_next("sendgrid", 1);
    prospect(c, "wren", "wren.m@uni.eu", "0035e00000WrenAAAA", true).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = ok(c.get("/v1/reverse-etl/status").await.unwrap()).await;
        if status["destinations"]["sendgrid"]["retries"].as_u64() == Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "the first request never failed: {status}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let put = c
        .call(
            "PUT",
            "/v1/profiles/email:wren.m@uni.eu/consent",
            &json!({ "email": { "granted": false, "source": "unsubscribe" } }),
        )
        .await
        .unwrap();
    assert_eq!(put.status, 200, "{}", put.body);
    drained(&demo).await;
    assert!(d.received("sendgrid").is_empty(), "the retry went out after consent was withdrawn");
    let status = ok(c.get("/v1/reverse-etl/status").await.unwrap()).await;
    assert_eq!(sendgrid_skips(&status, "consent"), 1, "{status}");
    assert_eq!(status["destinations"]["sendgrid"]["failed"].as_u64(), Some(0), "{status}");
    demo.stop().await.unwrap();
}

/// An exit that is due because time passed comes on time after a restart too, though the
/// profile has no event and no actor to tell the new process when.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_due_with_time_happens_after_a_restart_without_new_events() {
    let dir = tempfile::tempdir().unwrap();
    let d = Destinations::start().await;
    let demo =
        DemoServer::start(Some(dir.path().to_path_buf()), &d.config_toml(), SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    let rule = json!({ "rule": r#"page_count("mba", 6s) >= 1"# });
    assert_eq!(c.call("PUT", "/v1/segments/just_now", &rule).await.unwrap().status, 200);
    let view = payloads::segment_page("r-1", "anon-r", "/programs/mba", Utc::now());
    ok(c.segment(false, "page", &view).await.unwrap()).await;
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let members = |c: CohortClient| async move {
        ok(c.get("/v1/segments/just_now/members").await.unwrap()).await["members"].as_array().map_or(0, Vec::len)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while members(c.clone()).await != 1 {
        assert!(Instant::now() < deadline, "never entered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    demo.stop().await.unwrap();

    let demo =
        DemoServer::start(Some(dir.path().to_path_buf()), &d.config_toml(), SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    assert_eq!(members(c.clone()).await, 1, "still a member after the restart");
    let out_by = Instant::now() + Duration::from_secs(12);
    while members(c.clone()).await != 0 {
        assert!(Instant::now() < out_by, "the exit never came");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    demo.stop().await.unwrap();
}

/// Fails a profile actor once, on the first event named "Flaky".
#[derive(Default)]
struct FailOnce(std::sync::atomic::AtomicBool);

impl cohort_actors::FaultInjector for FailOnce {
    fn before_apply(&self, _profile: &cohort_messages::ProfileId, event: &cohort_messages::CustomerEvent) {
        if event.name.as_deref() == Some("Flaky") && !self.0.swap(true, std::sync::atomic::Ordering::SeqCst) {
            panic!("injected failure");
        }
    }
}

/// A profile actor that fails after entering a segment, before that entry was flushed, replays
/// the event on restart and enters again: the trigger already sent is not sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_replayed_after_a_restart_does_not_send_its_trigger_twice() {
    let d = Destinations::start().await;
    let toml = format!("{}\n[profiles]\nflush_interval_ms = 60000\n", mba_list_toml(&d));
    let options = SystemOptions { fault: Some(std::sync::Arc::new(FailOnce::default())), ..SystemOptions::default() };
    let demo = DemoServer::start(None, &toml, options).await.unwrap();
    let c = &demo.client;
    let email = "rhea.k@uni.eu";
    let mut identify =
        payloads::segment_identify("rhea-id", Some("anon-rhea"), None, json!({ "email": email }), None, Utc::now());
    identify["context"]["consent"] = json!({ "categoryPreferences": { "email": true } });
    ok(c.segment(false, "identify", &identify).await.unwrap()).await;
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();

    // Entered and sent, not yet flushed; then the actor fails and replays the page view.
    let page = payloads::segment_page("rhea-p1", "anon-rhea", "/programs/mba", Utc::now());
    ok(c.segment(false, "page", &page).await.unwrap()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.received("sendgrid").is_empty() {
        assert!(Instant::now() < deadline, "the entry's list addition never went out");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let flaky = json!({ "type": "track", "messageId": "rhea-flaky", "anonymousId": "anon-rhea", "event": "Flaky",
        "timestamp": Utc::now().to_rfc3339() });
    ok(c.segment(false, "track", &flaky).await.unwrap()).await;
    drained(&demo).await;
    assert_eq!(demo.cohort.profile_stats().await.unwrap().restarts, 1, "the actor failed once");
    assert_one_list_addition(&d, email, "the replayed entry did not send again");
    demo.stop().await.unwrap();
}

/// An entry's request backing off after a failure while its student leaves the segment is not
/// sent afterwards: the exit speaks for her now, and the list is left as the exit left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_retrying_after_its_student_left_the_segment_is_not_sent() {
    let d = Destinations::start().await;
    let toml = format!(
        "{}\n[[segments.define]]\nname = \"just_now\"\nrule = 'page_count(\"mba\", 2s) >= 1'\n\n\
         [[activations]]\nname = \"now_list\"\nsegment = \"just_now\"\ndestination = \"sendgrid\"\n\
         action = \"add_to_list\"\nlist_id = \"list-now\"\n",
        d.config_toml().replacen("backoff_initial_ms = 20", "backoff_initial_ms = 10000", 1).replacen(
            "backoff_max_ms = 100",
            "backoff_max_ms = 10000",
            1
        )
    );
    let demo = DemoServer::start(None, &toml, SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    d.fail_next("sendgrid", 1);
    consenting_mba_visitor(c, "pia", "pia@uni.eu").await;
    // In, the request failed once and backs off (5 to 15 s); out after 2 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let members = ok(c.get("/v1/segments/just_now/members").await.unwrap()).await;
        let status = ok(c.get("/v1/reverse-etl/status").await.unwrap()).await;
        let retrying = status["destinations"]["sendgrid"]["retries"].as_u64() == Some(1);
        if retrying && members["members"].as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(Instant::now() < deadline, "never failed and left: {status} {members}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drained(&demo).await;
    assert!(d.received("sendgrid").is_empty(), "the entry went out after she had left");
    let status = ok(c.get("/v1/reverse-etl/status").await.unwrap()).await;
    assert_eq!(sendgrid_skips(&status, "superseded"), 1, "{status}");
    demo.stop().await.unwrap();
}

/// Members of the batch segment `quiz` go on the SendGrid list `quiz` (email consent needed).
fn quiz_list_toml(d: &Destinations) -> String {
    format!(
        "{}\n[[activations]]\nname = \"quiz_list\"\nsegment = \"quiz\"\ndestination = \"sendgrid\"\naction = \"add_to_list\"\nlist_id = \"quiz\"\n",
        d.config_toml()
    )
}

/// And for a batch segment, whose memberships only the store knows: the grant offers them too,
/// once, with the entry the run recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_member_skipped_for_want_of_consent_gets_the_activation_once_consent_is_granted() {
    let d = Destinations::start().await;
    let demo = DemoServer::start(None, &quiz_list_toml(&d), SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    let email = "fay.q@uni.eu";
    let id = payloads::segment_identify("fay-id", None, Some("fay"), json!({ "email": email }), None, Utc::now());
    ok(c.segment(true, "identify", &id).await.unwrap()).await;
    let quiz = payloads::segment_track("fay-quiz", "fay", "Quiz Completed", json!({}), Utc::now());
    ok(c.segment(true, "track", &quiz).await.unwrap()).await;
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    demo.cohort.relay_warehouse().await.unwrap();
    let sql = "SELECT DISTINCT profile_id FROM silver_dedup WHERE name = 'Quiz Completed'";
    let define = json!({ "kind": "batch", "sql": sql, "every_secs": 3600 });
    assert_eq!(c.call("PUT", "/v1/segments/quiz", &define).await.unwrap().status, 200);
    assert_eq!(demo.cohort.run_batch_segment("quiz").await.unwrap().members, 1);
    drained(&demo).await;
    assert!(d.received("sendgrid").is_empty(), "no email consent yet");
    let status = ok(c.get("/v1/reverse-etl/status").await.unwrap()).await;
    assert_eq!(sendgrid_skips(&status, "consent"), 1, "{status}");

    let grant = json!({ "email": { "granted": true, "source": "advisor_call" } });
    let put = c.call("PUT", &format!("/v1/profiles/email:{email}/consent"), &grant).await.unwrap();
    assert_eq!(put.status, 200, "{}", put.body);
    drained(&demo).await;
    assert_one_list_addition(&d, email, "the list addition once consent was recorded");
    // Withdrawn and granted again: it went out already.
    let withdraw = json!({ "email": { "granted": false, "source": "advisor_call" } });
    for body in [&withdraw, &grant] {
        let put = c.call("PUT", &format!("/v1/profiles/email:{email}/consent"), body).await.unwrap();
        assert_eq!(put.status, 200, "{}", put.body);
    }
    drained(&demo).await;
    assert_one_list_addition(&d, email, "nothing went twice");
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_are_defined_validated_and_listed_through_the_api_and_exits_happen_on_time() {
    let d = Destinations::start().await;
    let demo = DemoServer::start(None, &d.config_toml(), SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    let bad = c
        .call("PUT", "/v1/segments/recent_mba", &json!({ "rule": r#"page_count("mba", 7d) >= and x"# }))
        .await
        .unwrap();
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(bad.body["error"]["message"].as_str().unwrap().contains("at column 26"), "{}", bad.body);
    let bad_name = c.call("PUT", "/v1/segments/Recent MBA", &json!({ "rule": "1 == 1" })).await.unwrap();
    assert_eq!(bad_name.status, 400);
    for (sql, why) in
        [("SELEC profile_id FRM nowhere", "the query does not run"), ("SELECT 1 AS x", "profile_id column")]
    {
        let batch = json!({ "kind": "batch", "sql": sql, "every_secs": 3600 });
        let refused = c.call("PUT", "/v1/segments/never_runs", &batch).await.unwrap();
        assert_eq!(refused.status, 400, "{}", refused.body);
        assert!(refused.body["error"]["message"].as_str().unwrap().contains(why), "{}", refused.body);
    }
    assert_eq!(c.get("/v1/segments/never_runs").await.unwrap().status, 404, "nothing stored");
    for every in [json!(5), json!(u64::MAX)] {
        let batch = json!({ "kind": "batch", "sql": "SELECT profile_id FROM gold_profiles", "every_secs": every });
        let bad_period = c.call("PUT", "/v1/segments/yearly", &batch).await.unwrap();
        assert_eq!(bad_period.status, 400, "{}", bad_period.body);
        assert!(bad_period.body["error"]["message"].as_str().unwrap().contains("every_secs"), "{}", bad_period.body);
    }

    // A student with one MBA view a few seconds "ago" in a 3-second window: in, then out on time.
    let now = Utc::now();
    let view = payloads::segment_page("w-1", "anon-w", "/programs/mba", now);
    ok(c.segment(false, "page", &view).await.unwrap()).await;
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let defined = c
        .call(
            "PUT",
            "/v1/segments/recent_mba",
            &json!({ "rule": r#"page_count("mba", 3s) >= 1"#, "description": "viewed MBA just now" }),
        )
        .await
        .unwrap();
    assert_eq!(defined.status, 200, "{}", defined.body);
    assert_eq!(ok(c.get("/v1/segments/recent_mba").await.unwrap()).await["rule"], r#"page_count("mba", 3s) >= 1"#);
    // Existing profiles are evaluated for a new definition.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut members = Value::Null;
    while Instant::now() < deadline {
        members = ok(c.get("/v1/segments/recent_mba/members").await.unwrap()).await;
        if members["members"].as_array().is_some_and(|m| m.len() == 1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(members["members"].as_array().map(Vec::len), Some(1), "{members}");
    // No new event: the timer takes her out once the view is older than 3 s.
    let out_by = Instant::now() + Duration::from_secs(6);
    loop {
        let m = ok(c.get("/v1/segments/recent_mba/members").await.unwrap()).await;
        if m["members"].as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(Instant::now() < out_by, "still a member: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listed = ok(c.get("/v1/segments").await.unwrap()).await;
    assert_eq!(listed["segments"].as_array().unwrap().len(), 1);
    let store = demo.cohort.ctx.store.clone();
    let exits = || store.list_documents("segment_exits", "recent_mba/", None, 10);
    assert_eq!(exits().await.unwrap().len(), 1, "her exit is recorded");
    assert_eq!(c.call("DELETE", "/v1/segments/recent_mba", &json!({})).await.unwrap().status, 204);
    assert!(exits().await.unwrap().is_empty(), "a deleted segment's exits go with it");
    assert_eq!(c.get("/v1/segments/recent_mba").await.unwrap().status, 404);
    assert_eq!(c.call("DELETE", "/v1/segments/recent_mba", &json!({})).await.unwrap().status, 404);
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_destination_is_retried_then_kept_for_a_manual_retry_and_holds_nothing_else_back() {
    let d = Destinations::start().await;
    let extra = use_case_toml(&d).replacen("[reverse_etl]\n", "[reverse_etl]\nmax_attempts = 2\n", 1);
    let demo = DemoServer::start(None, &extra, SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    // Salesforce is down (and slow) for this student; SendGrid must not wait for it.
    d.fail_next("salesforce", 100);
    d.delay("salesforce", 300);
    prospect(c, "cleo", "cleo@gmail.com", "0035e00000CleoAAAA", true).await;
    let sent = Instant::now();
    ok(c.segment(false, "track", &brochure("cleo")).await.unwrap()).await;
    while d.received("sendgrid").is_empty() && sent.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(d.received("sendgrid").len(), 1);
    assert!(
        d.received("sendgrid")[0].at.duration_since(sent) < Duration::from_millis(500),
        "not held back by Salesforce"
    );
    drained(&demo).await;
    let status = ok(c.get("/v1/reverse-etl/status").await.unwrap()).await;
    let sf = &status["destinations"]["salesforce"];
    assert_eq!(
        (sf["sent"].as_u64(), sf["failed"].as_u64(), sf["retries"].as_u64()),
        (Some(0), Some(1), Some(1)),
        "{status}"
    );
    assert!(sf["last_error"].as_str().unwrap().contains("503"), "{status}");
    assert_eq!(sf["recent_failures"][0]["activation"], "mba_task");

    // Salesforce is back: one call sends what failed, exactly once.
    d.fail_next("salesforce", 0);
    d.delay("salesforce", 0);
    let retried = ok(c.post("/v1/reverse-etl/retry?destination=salesforce", &json!({})).await.unwrap()).await;
    assert_eq!(retried["requeued"], 1);
    drained(&demo).await;
    assert_eq!(d.received("salesforce").len(), 1);
    assert_eq!(d.received("salesforce")[0].body["WhoId"], "0035e00000CleoAAAA");
    let again = ok(c.post("/v1/reverse-etl/retry", &json!({})).await.unwrap()).await;
    assert_eq!(again["requeued"], 0);
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_4_keeps_personal_data_out_of_fields_not_meant_for_it() {
    let d = Destinations::start().await;
    let extra = format!(
        "{}\n[[segments.define]]\nname = \"any\"\nrule = 'page_views() >= 1'\n\n[[activations]]\nname = \"leaky\"\nsegment = \"any\"\ndestination = \"salesforce\"\naction = \"update_contact\"\nfields = {{ Description = \"Reach {{{{traits.email}}}}\" }}\n",
        d.config_toml()
    );
    let demo = DemoServer::start(None, &extra, SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    let cdc = payloads::salesforce_contact_cdc(
        77,
        "0035e00000DoraAAAA",
        "CREATE",
        json!({ "Email": "dora@uni.eu", "FirstName": "Dora" }),
        Utc::now(),
    );
    ok(c.salesforce_cdc(&cdc).await.unwrap()).await;
    let mut page = payloads::segment_page("dora-p", "anon-dora", "/campus", Utc::now());
    page["userId"] = json!("dora");
    let id = payloads::segment_identify(
        "dora-id",
        Some("anon-dora"),
        None,
        json!({ "email": "dora@uni.eu" }),
        None,
        Utc::now(),
    );
    ok(c.segment(false, "identify", &id).await.unwrap()).await;
    ok(c.segment(false, "page", &page).await.unwrap()).await;
    drained(&demo).await;
    assert!(d.received("salesforce").is_empty(), "an email address in Description is refused");
    let status = ok(c.get("/v1/reverse-etl/status").await.unwrap()).await;
    assert_eq!(status["destinations"]["salesforce"]["skipped"]["gate4"], 1, "{status}");
    assert!(status["destinations"]["salesforce"]["last_error"]
        .as_str()
        .unwrap()
        .contains("personal data in `Description`"));
    // The refusal is a stored Gate 4 run naming the profile, not the value.
    let runs = ok(c.get("/v1/quality/runs?gate=4").await.unwrap()).await;
    let refusal = &runs["runs"][0];
    assert_eq!(refusal["success"], false, "{runs}");
    let result = &refusal["results"][0];
    assert!(result["observed"]["reason"].as_str().unwrap().contains("`Description`"), "{result}");
    assert!(!runs.to_string().contains("dora@uni.eu"), "no personal value in the run");
    assert_eq!(result["unexpected_sample"].as_array().unwrap().len(), 1);
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_and_model_segments_reach_whatsapp_push_and_email_lists_and_respect_suppression() {
    let d = Destinations::start().await;
    let extra = format!(
        r#"{}
[models.churn_risk]
bias = -4.0
[models.churn_risk.weights]
days_since_last_login = 1.0
whatsapp_sentiment_avg = -3.0

[[segments.define]]
name = "at_risk"
kind = "model"
model = "churn_risk"
threshold = 0.75

[[segments.define]]
name = "quiz_takers"
kind = "batch"
sql = "SELECT DISTINCT profile_id FROM silver_dedup WHERE name = 'Quiz Completed'"
every_secs = 3600

[[activations]]
name = "advisor"
segment = "at_risk"
destination = "twilio"
action = "send_template"
template_sid = "HX11112222333344445555666677778888"
fields = {{ "1" = "{{{{traits.first_name}}}}" }}

[[activations]]
name = "nudge"
segment = "at_risk"
destination = "push"
action = "send_push"
fields = {{ title = "We miss you", body = "Your next module is ready" }}

[[activations]]
name = "quiz_list"
segment = "quiz_takers"
destination = "sendgrid"
action = "add_to_list"
list_id = "quiz-list"

[[activations]]
name = "quiz_list_exit"
segment = "quiz_takers"
destination = "sendgrid"
action = "remove_from_list"
on = "exit"
list_id = "quiz-list"
"#,
        d.config_toml()
    );
    let demo = DemoServer::start(None, &extra, SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    let long_ago = Utc::now() - Span::days(10);
    // Eva logged in ten days ago and wrote an unhappy WhatsApp message: churn risk.
    let id = payloads::segment_identify(
        "eva-id",
        None,
        Some("eva"),
        json!({ "firstName": "Eva", "email": "eva@uni.eu", "phone": "+49 151 99887766" }),
        Some("eva-phone"),
        long_ago,
    );
    let mut id = id;
    id["context"]["device"]["token"] = json!("fcm-token-eva");
    id["context"]["consent"] = json!({ "categoryPreferences": { "whatsapp": true, "push": true, "email": true } });
    ok(c.segment(true, "identify", &id).await.unwrap()).await;
    ok(c.segment(true, "track", &payloads::segment_track("eva-login", "eva", "Logged In", json!({}), long_ago))
        .await
        .unwrap())
    .await;
    let form = payloads::twilio_whatsapp_form(
        "SMeva1",
        "+4915199887766",
        "This course is terrible and I want to quit, so frustrated",
        "Eva",
    );
    ok(c.twilio(&form).await.unwrap()).await;
    drained(&demo).await;
    let wa = d.received("twilio");
    assert_eq!(wa.len(), 1, "{:?}", d.received("twilio"));
    assert_eq!(wa[0].body["To"], "whatsapp:+4915199887766");
    assert_eq!(wa[0].body["ContentSid"], "HX11112222333344445555666677778888");
    assert_eq!(
        serde_json::from_str::<Value>(wa[0].body["ContentVariables"].as_str().unwrap()).unwrap(),
        json!({ "1": "Eva" })
    );
    let push = d.received("push");
    assert_eq!(push.len(), 1);
    assert_eq!(push[0].body["message"]["token"], "fcm-token-eva");
    assert_eq!(push[0].body["message"]["notification"]["title"], "We miss you");

    // Batch: SQL over the warehouse, diffed against the last run.
    for (who, mid) in [("eva", "q-eva"), ("finn", "q-finn")] {
        let mut t = payloads::segment_track(mid, who, "Quiz Completed", json!({}), Utc::now());
        t["context"] = json!({ "consent": { "categoryPreferences": { "email": true } } });
        ok(c.segment(true, "track", &t).await.unwrap()).await;
    }
    ok(c.segment(
        true,
        "identify",
        &payloads::segment_identify("finn-id", None, Some("finn"), json!({ "email": "finn@uni.eu" }), None, Utc::now()),
    )
    .await
    .unwrap())
    .await;
    // Finn's address bounced: suppressed, so never added to a list.
    let bounce = payloads::sendgrid_event("sg-finn-bounce", "finn@uni.eu", "bounce", Utc::now());
    ok(c.sendgrid(&bounce).await.unwrap()).await;
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    demo.cohort.flush().await.unwrap();
    demo.cohort.relay_warehouse().await.unwrap();
    let run = demo.cohort.run_batch_segment("quiz_takers").await.unwrap();
    assert_eq!((run.members, run.entered, run.exited), (2, 2, 0));
    drained(&demo).await;
    let lists = d.received("sendgrid");
    assert_eq!(lists.len(), 1, "{lists:?}");
    assert_eq!(lists[0].body["contacts"][0]["email"], "eva@uni.eu");
    let status = ok(c.get("/v1/reverse-etl/status").await.unwrap()).await;
    assert_eq!(status["destinations"]["sendgrid"]["skipped"]["suppressed"], 1, "{status}");
    let eva = ok(c.get("/v1/profiles/user_id:eva/segments").await.unwrap()).await;
    assert_eq!(eva["segments"]["quiz_takers"]["kind"], "batch", "{eva}");
    assert_eq!(eva["segments"]["at_risk"]["kind"], "realtime", "{eva}");
    // A second run with the same data changes nothing; deleting the segment's data exits members.
    let again = demo.cohort.run_batch_segment("quiz_takers").await.unwrap();
    assert_eq!((again.entered, again.exited), (0, 0));
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_segments_and_activations_fail_at_start_naming_the_key() {
    let d = Destinations::start().await;
    let start = |extra: String| async move {
        DemoServer::start(None, &extra, SystemOptions::default())
            .await
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default()
    };
    let err =
        start(format!("{}\n[[segments.define]]\nname = \"x\"\nrule = 'page_count(\"mba\" 7d) > 1'\n", d.config_toml()))
            .await;
    assert!(err.contains("segments.define[0]") && err.contains("column 18"), "{err}");
    let err = start(format!(
        "{}\n[[activations]]\nname = \"a\"\nsegment = \"s\"\ndestination = \"sendgrid\"\naction = \"create_task\"\n",
        d.config_toml()
    ))
    .await;
    assert!(err.contains("activations[0].action"), "{err}");
    let err = start(
        "[[activations]]\nname = \"a\"\nsegment = \"s\"\ndestination = \"salesforce\"\naction = \"create_task\"\n"
            .into(),
    )
    .await;
    assert!(err.contains("reverse_etl.salesforce.url is not set"), "{err}");
    let err = start("[models.m]\n[models.m.weights]\nshoe_size = 1.0\n".into()).await;
    assert!(err.contains("models.m.weights") && err.contains("shoe_size"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_run_whose_size_moved_more_than_20_percent_waits_for_confirmation() {
    let d = Destinations::start().await;
    let sql = |cohort: &str| {
        format!("SELECT DISTINCT profile_id FROM silver_dedup WHERE name = 'Quiz Completed' AND (properties ->> '$.cohort') = '{cohort}'")
    };
    let extra = format!(
        "{}\n[[activations]]\nname = \"quiz_list_exit\"\nsegment = \"quiz\"\non = \"exit\"\ndestination = \"sendgrid\"\naction = \"remove_from_list\"\nlist_id = \"quiz\"\n",
        quiz_list_toml(&d)
    );
    let dir = tempfile::tempdir().unwrap();
    let demo = DemoServer::start(Some(dir.path().to_path_buf()), &extra, SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    for i in 0..13 {
        let who = format!("q{i}");
        let cohort = if i < 10 { "a" } else { "b" };
        let mut t = payloads::segment_track(
            &format!("{who}-quiz"),
            &who,
            "Quiz Completed",
            json!({ "cohort": cohort }),
            Utc::now(),
        );
        // q12 gives no email consent: a grant must not get round Gate 4's hold (below).
        let consent = json!({ "categoryPreferences": { "email": (i != 12) } });
        t["context"] = json!({ "consent": consent, "traits": { "email": format!("{who}@uni.eu") } });
        ok(c.segment(true, "track", &t).await.unwrap()).await;
        let id = payloads::segment_identify(
            &format!("{who}-id"),
            None,
            Some(&who),
            json!({ "email": format!("{who}@uni.eu") }),
            None,
            Utc::now(),
        );
        ok(c.segment(true, "identify", &id).await.unwrap()).await;
    }
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    demo.cohort.flush().await.unwrap();
    demo.cohort.relay_warehouse().await.unwrap();
    let define = |cohort: &str| json!({ "kind": "batch", "sql": sql(cohort), "every_secs": 3600 });
    assert_eq!(c.call("PUT", "/v1/segments/quiz", &define("a")).await.unwrap().status, 200);
    let first = demo.cohort.run_batch_segment("quiz").await.unwrap();
    assert_eq!(first.members, 10);
    drained(&demo).await;
    let adds = |d: &Destinations| d.received("sendgrid").iter().filter(|r| r.method == "PUT").count();
    assert_eq!(adds(&d), 10, "the first run sets the baseline");
    // The query changes: three entries where the last run had ten. Held until a person agrees.
    assert_eq!(c.call("PUT", "/v1/segments/quiz", &define("b")).await.unwrap().status, 200);
    // Defining runs the query at once; this run finds that done and changes nothing more.
    let second = demo.cohort.run_batch_segment("quiz").await.unwrap();
    assert_eq!((second.members, second.entered, second.exited), (3, 0, 0));
    drained(&demo).await;
    assert_eq!(adds(&d), 10, "held by Gate 4");
    // The ten who left are removed from the list: looked up by email, then deleted by contact id.
    let removed: Vec<_> = d.received("sendgrid").into_iter().filter(|r| r.method == "DELETE").collect();
    assert_eq!(removed.len(), 10);
    assert_eq!(removed[0].path, "lists/quiz");
    assert!(removed[0].body["contact_ids"].as_str().unwrap().starts_with("contact-"));
    let status = ok(c.get("/v1/reverse-etl/status").await.unwrap()).await;
    assert_eq!(status["held_for_confirmation"]["quiz_list"], 3, "{status}");
    // Gate 4's decisions are stored as quality runs: the last one failed (held), the one before passed.
    let runs = ok(c.get("/v1/quality/runs?gate=4").await.unwrap()).await;
    let runs: Vec<Value> =
        runs["runs"].as_array().unwrap().iter().filter(|r| r["checkpoint"] == "quiz_list").cloned().collect();
    assert!(runs.len() >= 2, "{runs:?}");
    assert_eq!(runs[0]["success"], false, "{:?}", runs[0]);
    assert_eq!(runs[0]["results"][0]["observed"]["rows"], 3);
    assert_eq!(runs[0]["results"][0]["observed"]["previous"], 10);
    assert!(runs[1..].iter().any(|r| r["success"] == true));
    assert_eq!(c.post("/v1/reverse-etl/confirm/nothing", &json!({})).await.unwrap().status, 404);
    // A held member consenting meanwhile is offered her membership again, and it stays held.
    let grant = json!({ "email": { "granted": true, "source": "advisor_call" } });
    let put = c.call("PUT", "/v1/profiles/email:q12@uni.eu/consent", &grant).await.unwrap();
    assert_eq!(put.status, 200, "{}", put.body);
    drained(&demo).await;
    assert_eq!(adds(&d), 10, "a consent grant does not get round Gate 4");
    let gauge = |text: &str| text.lines().any(|l| l == "cohort_quality_gate_failing{gate=\"4\"} 1");
    let m = ok(c.get("/metrics").await.unwrap()).await;
    assert!(gauge(m.as_str().unwrap()), "a held sync sets the gate 4 gauge");
    // The hold is stored: a restart keeps it, its gauge included, and the start-up catch-up
    // (memberships no destination has seen) leaves its members alone.
    demo.stop().await.unwrap();
    let demo = DemoServer::start(Some(dir.path().to_path_buf()), &extra, SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    drained(&demo).await;
    assert_eq!(adds(&d), 10, "still held after the restart");
    let status = ok(c.get("/v1/reverse-etl/status").await.unwrap()).await;
    assert_eq!(status["held_for_confirmation"]["quiz_list"], 3, "{status}");
    let m = ok(c.get("/metrics").await.unwrap()).await;
    assert!(gauge(m.as_str().unwrap()), "the gauge shows a hold from before the restart");
    // A held member erased meanwhile leaves the hold, snapshot and all.
    let asked = json!({ "profile": "user_id:q10", "regulation": "delete", "requested_by": "dpo-ticket-9" });
    let asked = c.post("/v1/gdpr/deletions", &asked).await.unwrap();
    assert_eq!(asked.status, 202, "{}", asked.body);
    let url = format!("/v1/gdpr/deletions/{}", asked.body["id"].as_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        let s = ok(c.get(&url).await.unwrap()).await;
        if s["status"] == "completed" {
            break s;
        }
        assert!(Instant::now() < deadline, "the erasure did not complete: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let documents = done["steps"].as_array().unwrap().iter().find(|s| s["step"] == "documents").cloned();
    assert_eq!(documents.map(|s| s["detail"]["held_jobs"].clone()), Some(json!(1)), "{done}");
    let status = ok(c.get("/v1/reverse-etl/status").await.unwrap()).await;
    assert_eq!(status["held_for_confirmation"]["quiz_list"], 2, "{status}");
    ok(c.post("/v1/reverse-etl/confirm/quiz_list", &json!({})).await.unwrap()).await;
    drained(&demo).await;
    assert_eq!(adds(&d), 12, "the ten before, and the two held members still here");
    let m = ok(c.get("/metrics").await.unwrap()).await;
    assert!(!gauge(m.as_str().unwrap()), "confirming the held sync clears it");
    assert_eq!(c.post("/v1/reverse-etl/confirm/quiz_list", &json!({})).await.unwrap().status, 404, "released once");
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_entries_no_destination_has_seen_are_sent_and_sent_ones_are_not() {
    let d = Destinations::start().await;
    let dir = tempfile::tempdir().unwrap();
    let demo =
        DemoServer::start(Some(dir.path().to_path_buf()), &use_case_toml(&d), SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    prospect(c, "ada", "ada@gmail.com", "0035e00000AdaAAAAA", true).await;
    ok(c.segment(false, "track", &brochure("ada")).await.unwrap()).await;
    prospect(c, "bo", "bo@gmail.com", "0035e00000BoAAAAAA", true).await;
    drained(&demo).await;
    assert_eq!(d.received("salesforce").len(), 1);
    // Bo's entry was stored as a membership, and then the process died before dispatching it.
    let bo =
        ok(c.get("/v1/profiles/email:bo@gmail.com").await.unwrap()).await["profile_id"].as_str().unwrap().to_string();
    demo.cohort
        .ctx
        .store
        .put_documents("segment_members", vec![(format!("high_intent_mba/{bo}"), Some(json!({ "since": Utc::now() })))])
        .await
        .unwrap();
    demo.cohort.flush().await.unwrap();
    demo.stop().await.unwrap();

    let demo =
        DemoServer::start(Some(dir.path().to_path_buf()), &use_case_toml(&d), SystemOptions::default()).await.unwrap();
    drained(&demo).await;
    let tasks = d.received("salesforce");
    let status = demo.client.get("/v1/reverse-etl/status").await.unwrap().body;
    assert_eq!(tasks.len(), 2, "{tasks:?} {status}");
    assert_eq!(tasks[1].body["WhoId"], "0035e00000BoAAAAAA", "Bo's entry is sent; Ada's is not sent twice");
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_actor_that_dies_is_restarted_and_its_jobs_still_go_out() {
    let d = Destinations::start().await;
    let demo = DemoServer::start(None, &use_case_toml(&d), SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    let router = demo.cohort.reverse_etl.get().unwrap();
    // The router starts its destination actors once it is up (post_start): wait for them.
    let started = std::time::Instant::now();
    while router.get_children().len() < 4 && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let children = router.get_children();
    assert_eq!(children.len(), 4, "one actor per configured destination");
    for child in children {
        child.kill();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(router.get_children().len(), 4, "restarted under the policy");
    prospect(c, "gil", "gil@gmail.com", "0035e00000GilAAAAA", true).await;
    ok(c.segment(false, "track", &brochure("gil")).await.unwrap()).await;
    drained(&demo).await;
    assert_eq!(d.received("salesforce").len(), 1);
    assert_eq!(d.received("sendgrid").len(), 1);
    let m = c.get("/metrics").await.unwrap().body.as_str().unwrap().to_string();
    let restarts = m
        .lines()
        .find_map(|l| l.strip_prefix("cohort_actor_restarts_total{kind=\"reverse_etl_destination\"} "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert_eq!(restarts, Some(4), "{m}");
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_quota_of_a_destination_is_never_exceeded() {
    let d = Destinations::start().await;
    let extra =
        use_case_toml(&d).replacen("[reverse_etl.salesforce]\n", "[reverse_etl.salesforce]\ndaily_limit = 1\n", 1);
    let demo = DemoServer::start(None, &extra, SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    for (who, contact) in [("hal", "0035e00000HalAAAAA"), ("ivy", "0035e00000IvyAAAAA")] {
        prospect(c, who, &format!("{who}@gmail.com"), contact, true).await;
        ok(c.segment(false, "track", &brochure(who)).await.unwrap()).await;
        drained(&demo).await;
    }
    assert_eq!(d.received("salesforce").len(), 1, "one request a day");
    assert_eq!(d.received("sendgrid").len(), 2, "other destinations are not limited by it");
    let status = ok(c.get("/v1/reverse-etl/status").await.unwrap()).await;
    let sf = &status["destinations"]["salesforce"];
    assert_eq!(
        (sf["sent"].as_u64(), sf["failed"].as_u64(), sf["used_today"].as_u64()),
        (Some(1), Some(1), Some(1)),
        "{status}"
    );
    assert!(sf["last_error"].as_str().unwrap().contains("daily limit of 1"), "{status}");
    demo.stop().await.unwrap();
}

/// The quota is counted in the store, not in memory: a restart does not start the day afresh
/// (nor would another replica).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_quota_holds_across_a_restart() {
    let d = Destinations::start().await;
    let dir = tempfile::tempdir().unwrap();
    let extra =
        use_case_toml(&d).replacen("[reverse_etl.salesforce]\n", "[reverse_etl.salesforce]\ndaily_limit = 1\n", 1);
    for (who, contact) in [("joe", "0035e00000JoeAAAAA"), ("kim", "0035e00000KimAAAAA")] {
        let demo = DemoServer::start(Some(dir.path().to_path_buf()), &extra, SystemOptions::default()).await.unwrap();
        prospect(&demo.client, who, &format!("{who}@gmail.com"), contact, true).await;
        ok(demo.client.segment(false, "track", &brochure(who)).await.unwrap()).await;
        drained(&demo).await;
        if who == "kim" {
            // Refused for the quota, not for anything else.
            let status = ok(demo.client.get("/v1/reverse-etl/status").await.unwrap()).await;
            let sf = &status["destinations"]["salesforce"];
            assert_eq!((sf["sent"].as_u64(), sf["failed"].as_u64()), (Some(0), Some(1)), "{status}");
            assert!(sf["last_error"].as_str().unwrap_or_default().contains("daily limit of 1"), "{status}");
        }
        demo.stop().await.unwrap();
    }
    assert_eq!(d.received("salesforce").len(), 1, "one request a day, restart or not");
    assert_eq!(d.received("sendgrid").len(), 2, "other destinations are not limited by it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contact_updates_are_incremental_only_changed_fields_are_sent() {
    let d = Destinations::start().await;
    let extra = format!(
        "{}\n[[segments.define]]\nname = \"browsing\"\nrule = 'page_count(\"fees\", 2s) >= 1'\n\n[[activations]]\nname = \"sync_contact\"\nsegment = \"browsing\"\ndestination = \"salesforce\"\naction = \"update_contact\"\nfields = {{ Interest__c = \"{{{{segment}}}}\", Stage__c = \"{{{{computed.funnel_stage}}}}\" }}\n",
        d.config_toml()
    );
    let demo = DemoServer::start(None, &extra, SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    let cdc = payloads::salesforce_contact_cdc(
        91,
        "0035e00000JoAAAAAA",
        "CREATE",
        json!({ "Email": "jo@uni.eu", "FirstName": "Jo" }),
        Utc::now(),
    );
    ok(c.salesforce_cdc(&cdc).await.unwrap()).await;
    let id =
        payloads::segment_identify("jo-id", Some("anon-jo"), None, json!({ "email": "jo@uni.eu" }), None, Utc::now());
    ok(c.segment(false, "identify", &id).await.unwrap()).await;
    let view = |n: usize| payloads::segment_page(&format!("jo-fees-{n}"), "anon-jo", "/fees", Utc::now());
    ok(c.segment(false, "page", &view(1)).await.unwrap()).await;
    drained(&demo).await;
    let first = d.received("salesforce");
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].path, "Contact/0035e00000JoAAAAAA");
    assert_eq!(first[0].body, json!({ "Interest__c": "browsing", "Stage__c": "inquiry" }));
    // She leaves (the view is older than 2 s) and comes back: nothing changed, nothing is sent.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    ok(c.segment(false, "page", &view(2)).await.unwrap()).await;
    drained(&demo).await;
    assert_eq!(d.received("salesforce").len(), 1);
    // Salesforce makes her an applicant; the next entry sends the stage only.
    let update = payloads::salesforce_contact_cdc(
        92,
        "0035e00000JoAAAAAA",
        "UPDATE",
        json!({ "Application_Stage__c": "Submitted" }),
        Utc::now(),
    );
    ok(c.salesforce_cdc(&update).await.unwrap()).await;
    tokio::time::sleep(Duration::from_millis(2600)).await;
    ok(c.segment(false, "page", &view(3)).await.unwrap()).await;
    drained(&demo).await;
    let all = d.received("salesforce");
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(all[1].body, json!({ "Stage__c": "application" }));
    let status = ok(c.get("/v1/reverse-etl/status").await.unwrap()).await;
    assert_eq!(status["destinations"]["salesforce"]["skipped"]["unchanged"], 1, "{status}");
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_stored_with_the_profile_but_never_recorded_by_the_engine_is_recovered_at_start() {
    let d = Destinations::start().await;
    let dir = tempfile::tempdir().unwrap();
    let demo =
        DemoServer::start(Some(dir.path().to_path_buf()), &use_case_toml(&d), SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    prospect(c, "mo", "mo@gmail.com", "0035e00000MoAAAAAA", true).await;
    ok(c.segment(false, "track", &brochure("mo")).await.unwrap()).await;
    drained(&demo).await;
    demo.cohort.flush().await.unwrap();
    assert_eq!(d.received("salesforce").len(), 1);
    // As if the process had died after the profile's flush and before the engine's write (and
    // so before any request): no membership document, nothing sent.
    let mo =
        ok(c.get("/v1/profiles/email:mo@gmail.com").await.unwrap()).await["profile_id"].as_str().unwrap().to_string();
    let store = demo.cohort.ctx.store.clone();
    store.put_documents("segment_members", vec![(format!("high_intent_mba/{mo}"), None)]).await.unwrap();
    let sent = store.list_documents("reverse_etl_sent", "", None, 10).await.unwrap();
    store.put_documents("reverse_etl_sent", sent.into_iter().map(|(k, _)| (k, None)).collect()).await.unwrap();
    drop(store);
    demo.stop().await.unwrap();

    let demo =
        DemoServer::start(Some(dir.path().to_path_buf()), &use_case_toml(&d), SystemOptions::default()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.received("salesforce").len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drained(&demo).await;
    let tasks = d.received("salesforce");
    assert_eq!(tasks.len(), 2, "the entry is recovered once: {tasks:?}");
    assert_eq!(tasks[1].idempotency_key, tasks[0].idempotency_key, "as the same change");
    let members = ok(demo.client.get("/v1/segments/high_intent_mba/members").await.unwrap()).await;
    assert_eq!(members["members"][0]["profile_id"], json!(mo));
    demo.stop().await.unwrap();
}

/// An exit the engine recorded whose trigger never went (the process died first) is sent at
/// the next start, as an entry's is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_recorded_but_never_sent_is_sent_at_start() {
    let d = Destinations::start().await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "{}\n[[segments.define]]\nname = \"just_now\"\nrule = 'page_count(\"mba\", 3s) >= 1'\n\n\
         [[activations]]\nname = \"now_list\"\nsegment = \"just_now\"\ndestination = \"sendgrid\"\n\
         action = \"add_to_list\"\nlist_id = \"list-now\"\n\n\
         [[activations]]\nname = \"now_list_exit\"\nsegment = \"just_now\"\non = \"exit\"\n\
         destination = \"sendgrid\"\naction = \"remove_from_list\"\nlist_id = \"list-now\"\n",
        d.config_toml()
    );
    let demo = DemoServer::start(Some(dir.path().to_path_buf()), &toml, SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    consenting_mba_visitor(c, "ola", "ola@uni.eu").await;
    let removals =
        || d.received("sendgrid").into_iter().filter(|r| r.path == "lists/list-now" && r.method == "DELETE").count();
    let deadline = Instant::now() + Duration::from_secs(10);
    while removals() < 1 {
        assert!(Instant::now() < deadline, "the exit never went out: {:?}", d.received("sendgrid"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drained(&demo).await;
    // As if the process had died after the engine recorded the exit and before the request.
    let store = demo.cohort.ctx.store.clone();
    let sent = store.list_documents("reverse_etl_sent", "now_list_exit:", None, 10).await.unwrap();
    assert_eq!(sent.len(), 1, "{sent:?}");
    store.put_documents("reverse_etl_sent", sent.into_iter().map(|(k, _)| (k, None)).collect()).await.unwrap();
    drop(store);
    demo.stop().await.unwrap();

    let demo = DemoServer::start(Some(dir.path().to_path_buf()), &toml, SystemOptions::default()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while removals() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drained(&demo).await;
    assert_eq!(removals(), 2, "the recorded exit is sent once more at start");
    let adds = d.received("sendgrid").into_iter().filter(|r| r.method == "PUT").count();
    assert_eq!(adds, 1, "the entry went once");
    demo.stop().await.unwrap();
}

/// The start-up catch-up sends a recorded exit that never went out, except for a student who
/// has entered again since: her exit is over, and its record is removed instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_exit_of_a_student_who_entered_again_is_dropped_not_sent_at_start() {
    let d = Destinations::start().await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "{}\n[[segments.define]]\nname = \"mba_week\"\nrule = 'page_count(\"mba\", 7d) >= 1'\n\n\
         [[activations]]\nname = \"week_list\"\nsegment = \"mba_week\"\ndestination = \"sendgrid\"\n\
         action = \"add_to_list\"\nlist_id = \"list-week\"\n\n\
         [[activations]]\nname = \"week_list_exit\"\nsegment = \"mba_week\"\non = \"exit\"\n\
         destination = \"sendgrid\"\naction = \"remove_from_list\"\nlist_id = \"list-week\"\n",
        d.config_toml()
    );
    let demo = DemoServer::start(Some(dir.path().to_path_buf()), &toml, SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    // Pia is a member; Quinn never was (no MBA view).
    consenting_mba_visitor(c, "pia", "pia@uni.eu").await;
    let mut quinn = payloads::segment_identify(
        "quinn-id",
        Some("anon-quinn"),
        None,
        json!({ "email": "quinn@uni.eu" }),
        None,
        Utc::now(),
    );
    quinn["context"]["consent"] = json!({ "categoryPreferences": { "email": true } });
    ok(c.segment(false, "identify", &quinn).await.unwrap()).await;
    drained(&demo).await;
    let id = |who: &'static str| async move {
        ok(c.get(&format!("/v1/profiles/email:{who}@uni.eu")).await.unwrap()).await["profile_id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (pia, quinn) = (id("pia").await, id("quinn").await);
    let members = ok(c.get("/v1/segments/mba_week/members").await.unwrap()).await;
    assert_eq!(members["members"][0]["profile_id"], json!(pia), "{members}");
    // Exits recorded and never sent (as if the process had died after the engine wrote them):
    // Pia's is stale, she is a member again; Quinn's is due.
    let store = demo.cohort.ctx.store.clone();
    let at = json!({ "at": Utc::now() - chrono::Duration::seconds(60) });
    let exits = vec![(format!("mba_week/{pia}"), Some(at.clone())), (format!("mba_week/{quinn}"), Some(at))];
    store.put_documents("segment_exits", exits).await.unwrap();
    drop(store);
    demo.stop().await.unwrap();

    let demo = DemoServer::start(Some(dir.path().to_path_buf()), &toml, SystemOptions::default()).await.unwrap();
    let removals = || d.received("sendgrid").into_iter().filter(|r| r.method == "DELETE").count();
    let deadline = Instant::now() + Duration::from_secs(5);
    while removals() < 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drained(&demo).await;
    assert_eq!(removals(), 1, "Quinn's exit only: {:?}", d.received("sendgrid"));
    let store = demo.cohort.ctx.store.clone();
    let left = store.get_documents("segment_exits", &[format!("mba_week/{pia}")]).await.unwrap();
    assert_eq!(left, vec![None], "Pia's exit record is gone");
    let still = ok(demo.client.get("/v1/segments/mba_week/members").await.unwrap()).await;
    assert_eq!(still["members"][0]["profile_id"], json!(pia), "{still}");
    drop(store);
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_embedded_bus_segment_changes_stream_to_subscribers() {
    let demo = DemoServer::start(
        None,
        "[[segments.define]]\nname = \"fees\"\nrule = 'page_count(\"fees\") >= 1'\n",
        SystemOptions::default(),
    )
    .await
    .unwrap();
    let token = demo.cohort.config.auth.api_tokens[0].clone();
    let http = reqwest::Client::new();
    let url = format!("{}/v1/segment-changes", demo.base);
    assert_eq!(http.get(&url).send().await.unwrap().status(), 401);
    let mut stream = http.get(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(stream.status(), 200);
    assert!(stream.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let page = payloads::segment_page("sse-1", "anon-sse", "/fees", Utc::now());
    ok(demo.client.segment(false, "page", &page).await.unwrap()).await;
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !seen.contains("event: segment_change") && Instant::now() < deadline {
        if let Ok(Ok(Some(chunk))) = tokio::time::timeout(Duration::from_millis(200), stream.chunk()).await {
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    assert!(seen.contains("event: segment_change"), "{seen}");
    let data = seen.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
    let change: Value = serde_json::from_str(data).unwrap();
    assert_eq!((change["segment"].as_str(), change["change"].as_str()), (Some("fees"), Some("entered")));
    assert!(change["profile_id"].as_str().unwrap().starts_with("prof_"));
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_never_goes_faster_than_its_rate_limit() {
    let d = Destinations::start().await;
    let extra = use_case_toml(&d).replacen(
        "[reverse_etl.salesforce]\n",
        "[reverse_etl.salesforce]\nrequests_per_second = 2\n",
        1,
    );
    let demo = DemoServer::start(None, &extra, SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    let students = [
        ("na", "0035e00000NaAAAAAA"),
        ("ob", "0035e00000ObAAAAAA"),
        ("pi", "0035e00000PiAAAAAA"),
        ("qu", "0035e00000QuAAAAAA"),
    ];
    for (who, contact) in students {
        prospect(c, who, &format!("{who}@gmail.com"), contact, true).await;
    }
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    for (who, _) in students {
        ok(c.segment(false, "track", &brochure(who)).await.unwrap()).await;
    }
    drained(&demo).await;
    let tasks = d.received("salesforce");
    assert_eq!(tasks.len(), 4);
    // Two a second, a burst of two: the fourth request cannot come within a second of the first.
    let spread = tasks[3].at.duration_since(tasks[0].at);
    assert!(spread >= Duration::from_millis(900), "4 requests in {spread:?} at 2/s");
    // The other destinations are not slowed by it.
    assert_eq!(d.received("sendgrid").len(), 4);
    demo.stop().await.unwrap();
}

/// A segment defined while the profiles are being evaluated for another still reaches every
/// profile: the pass that was running had already passed some of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_defined_during_another_ones_backfill_is_evaluated_for_every_profile() {
    let demo = DemoServer::start(None, "", SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    // More profiles than one backfill page (500), so a pass takes several steps.
    const STUDENTS: usize = 1_200;
    for chunk in (0..STUDENTS).collect::<Vec<_>>().chunks(100) {
        let views = chunk
            .iter()
            .map(|s| payloads::segment_page(&format!("bf-{s}"), &format!("anon-bf-{s}"), "/programs/mba", Utc::now()))
            .collect();
        let a = c.segment(false, "batch", &payloads::segment_batch(views)).await.unwrap();
        assert_eq!(a.body["accepted"], json!(100), "{}", a.body);
    }
    demo.cohort.settle(Duration::from_secs(60)).await.unwrap();
    let rule = json!({ "rule": r#"page_count("mba", 7d) >= 1"# });
    for name in ["first", "second"] {
        assert_eq!(c.call("PUT", &format!("/v1/segments/{name}"), &rule).await.unwrap().status, 200);
    }
    for name in ["first", "second"] {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut members = 0;
            let mut after = String::new();
            loop {
                let page = c.get(&format!("/v1/segments/{name}/members?limit=1000{after}")).await.unwrap().body;
                members += page["members"].as_array().map(Vec::len).unwrap_or(0);
                match page["next_after"].as_str() {
                    Some(next) => after = format!("&after={next}"),
                    None => break,
                }
            }
            if members == STUDENTS {
                break;
            }
            assert!(Instant::now() < deadline, "{members} of {STUDENTS} profiles are in `{name}`");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    demo.stop().await.unwrap();
}

/// A batch segment runs on a timer; redefined with a rule, or deleted, it no longer does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_segment_redefined_with_a_rule_or_deleted_stops_its_timed_runs() {
    let demo = DemoServer::start(None, "", SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    let engine = demo.cohort.ctx.segment_engine.get().unwrap();
    let timers =
        || async { engine.call(SegmentMsg::Sync, Some(Duration::from_secs(10))).await.unwrap().unwrap().batch_timers };
    let sql = "SELECT DISTINCT profile_id FROM silver_dedup WHERE name = 'Quiz Completed'";
    let batch = json!({ "kind": "batch", "sql": sql, "every_secs": 3600 });
    for name in ["weekly", "nightly"] {
        let put = c.call("PUT", &format!("/v1/segments/{name}"), &batch).await.unwrap();
        assert_eq!(put.status, 200, "{}", put.body);
    }
    assert_eq!(timers().await, 2);
    let rule = json!({ "rule": r#"page_count("mba", 7d) >= 1"# });
    assert_eq!(c.call("PUT", "/v1/segments/weekly", &rule).await.unwrap().status, 200);
    assert_eq!(timers().await, 1, "a rule replaced the batch definition");
    assert_eq!(c.call("DELETE", "/v1/segments/nightly", &json!({})).await.unwrap().status, 204);
    assert_eq!(timers().await, 0, "deleted");
    demo.stop().await.unwrap();
}
