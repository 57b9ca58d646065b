//! A student to erase (Jana) and one to keep (Max), seeded through every source, and the checks
//! that search each store for what is left of a person. Shared by the embedded and real-backend
//! GDPR tests.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use chrono::Utc;
use cohort::client::{Answer, CohortClient};
use cohort::demo::DemoServer;
use cohort::payloads;
use cohort_adapters::{all_documents, EventBus, Layer, OperationalStore, Warehouse};
use cohort_config::Config;
use cohort_messages::msgs::{ReverseEtlMsg, SegmentMsg};
use cohort_messages::{ErasureCounts, ErasureTarget, Identifier, ProfileId};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Quick saga retries, a segment every seeded student enters and an activation that syncs it
/// (so reverse-ETL state exists per profile). Goes after the destinations' `[reverse_etl]`.
pub const ERASURE_TOML: &str = r#"
[gdpr]
retry_initial_ms = 20
retry_max_ms = 200

[[segments.define]]
name = "mba_interest"
rule = 'page_count("mba") >= 1'

[[activations]]
name = "mba_list"
segment = "mba_interest"
destination = "sendgrid"
action = "add_to_list"
list_id = "list-mba"
"#;

/// One student's contact data, as the sources send it.
pub struct Student {
    pub tag: &'static str,
    pub email: &'static str,
    pub phone: &'static str,
    pub salesforce_id: &'static str,
    pub first_name: &'static str,
    pub last_name: &'static str,
    pub message: &'static str,
}

pub const JANA: Student = Student {
    tag: "jana",
    email: "jana.novak@uni.eu",
    phone: "+4915112345678",
    salesforce_id: "0035e00000JanaAAAA",
    first_name: "Jana",
    last_name: "Novakova",
    message: "Can I still apply for the MBA? My passport number is X1234567",
};

pub const MAX: Student = Student {
    tag: "max",
    email: "max.weber@uni.eu",
    phone: "+4915187654321",
    salesforce_id: "0035e00000MaxxAAAA",
    first_name: "Max",
    last_name: "Weber",
    message: "When is the deadline for the MSc?",
};

impl Student {
    /// Strings that must not survive an erasure anywhere.
    pub fn needles(&self) -> Vec<String> {
        vec![
            self.email.to_string(),
            self.phone.trim_start_matches('+').to_string(),
            self.salesforce_id.to_string(),
            self.last_name.to_string(),
            "passport number".to_string(),
            format!("anon-{}", self.tag),
        ]
        .into_iter()
        .filter(|n| !(self.tag == "max" && n == "passport number"))
        .collect()
    }
}

fn ok(a: Answer) -> Value {
    assert!(a.status.is_success(), "{} {}", a.status, a.body);
    a.body
}

/// The student through Salesforce CDC, the website (identify with consent, pages, a batch with
/// one element the validator refuses: a dead letter holding their email), and WhatsApp.
pub async fn seed(c: &CohortClient, s: &Student, round: u32) {
    let now = Utc::now();
    let cdc = payloads::salesforce_contact_cdc(
        u64::from(round) * 100 + s.tag.len() as u64,
        s.salesforce_id,
        "CREATE",
        json!({ "Email": s.email, "FirstName": s.first_name, "LastName": s.last_name, "MobilePhone": s.phone }),
        now,
    );
    ok(c.salesforce_cdc(&cdc).await.unwrap());
    let mut identify = payloads::segment_identify(
        &format!("{}-id-{round}", s.tag),
        Some(&format!("anon-{}", s.tag)),
        None,
        json!({ "email": s.email, "firstName": s.first_name }),
        None,
        now,
    );
    identify["context"]["consent"] = json!({ "categoryPreferences": { "email": true } });
    ok(c.segment(false, "identify", &identify).await.unwrap());
    for i in 0..3 {
        let page = payloads::segment_page(
            &format!("{}-p{i}-{round}", s.tag),
            &format!("anon-{}", s.tag),
            "/programs/mba",
            now,
        );
        ok(c.segment(false, "page", &page).await.unwrap());
    }
    let good = payloads::segment_page(&format!("{}-b-{round}", s.tag), &format!("anon-{}", s.tag), "/apply", now);
    let bad =
        json!({ "type": "identify", "messageId": format!("{}-bad-{round}", s.tag), "traits": { "email": s.email } });
    ok(c.segment(false, "batch", &payloads::segment_batch(vec![good, bad])).await.unwrap());
    let form = payloads::twilio_whatsapp_form(&format!("SM{}{round:030}", s.tag), s.phone, s.message, s.first_name);
    ok(c.twilio(&form).await.unwrap());
}

/// Posts a deletion and returns its status URL.
pub async fn request_deletion(c: &CohortClient, reference: &str, regulation: &str) -> String {
    let a = c
        .post(
            "/v1/gdpr/deletions",
            &json!({ "profile": reference, "regulation": regulation, "requested_by": "dpo-ticket-4711" }),
        )
        .await
        .unwrap();
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(a.body["status"], "running", "{}", a.body);
    format!("/v1/gdpr/deletions/{}", a.body["id"].as_str().unwrap())
}

/// Polls a deletion's status until `done(status)` or the timeout.
pub async fn wait_deletion(c: &CohortClient, url: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let a = c.get(url).await;
        if let Ok(a) = a {
            assert!(a.status == 200 || a.status == 503, "{} {}", a.status, a.body);
            if a.status == 200 && done(&a.body) {
                return a.body;
            }
            assert!(Instant::now() < deadline, "deletion did not get there in time: {}", a.body);
        } else {
            assert!(Instant::now() < deadline, "status endpoint unreachable");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn completed(v: &Value) -> bool {
    v["status"] == "completed"
}

/// The step named `name` of a deletion's status.
pub fn step<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["steps"].as_array().unwrap().iter().find(|s| s["step"] == name).unwrap_or_else(|| panic!("no step {name}: {v}"))
}

/// Whom to erase, read from the live profile before the request.
pub async fn target_of(c: &CohortClient, reference: &str) -> ErasureTarget {
    let p = ok(c.get(&format!("/v1/profiles/{reference}")).await.unwrap());
    let mut profiles = vec![ProfileId::parse(p["profile_id"].as_str().unwrap()).unwrap()];
    for m in p["merged_from"].as_array().into_iter().flatten() {
        profiles.push(ProfileId::parse(m.as_str().unwrap()).unwrap());
    }
    let identifiers: Vec<Identifier> = serde_json::from_value(json!(p["identifiers"].as_array().unwrap())).unwrap();
    assert!(identifiers.len() >= 4, "{p}");
    ErasureTarget { profiles, identifiers, contact_emails: vec![] }
}

/// Searches every store for the person: the operational store, the bus's own log, every
/// per-profile document collection, the dead letters, the audit log and every warehouse layer.
/// Panics naming the store that still holds something.
pub async fn assert_nothing_left(
    store: &dyn OperationalStore,
    bus: &dyn EventBus,
    warehouse: Option<&dyn Warehouse>,
    target: &ErasureTarget,
    s: &Student,
) {
    assert_eq!(store.person_remnants(target).await.unwrap(), ErasureCounts::default(), "operational store");
    assert_eq!(bus.person_remnants(target).await.unwrap(), ErasureCounts::default(), "event log");
    let found = store.lookup_identities(&target.identifiers).await.unwrap();
    assert!(found.iter().all(Option::is_none), "identity graph: {found:?}");
    for p in &target.profiles {
        assert!(store.load_profile(p).await.unwrap().is_none(), "profile {p}");
    }
    let needles = s.needles();
    let leaks = |what: &str, text: &str| {
        for n in &needles {
            if let Some(at) = text.find(n.as_str()) {
                // The surroundings name the row (its profile, event and time) for a failing run.
                let around: String = text.chars().skip(at.saturating_sub(400)).take(800).collect();
                panic!("{what} still holds `{n}` (erased profiles {:?}), in: {around}", target.profiles);
            }
        }
        for p in &target.profiles {
            assert!(!text.contains(p.as_str()), "{what} still names profile {p}");
        }
    };
    for collection in [
        "consent_history",
        "segment_members",
        "segment_exits",
        "segment_schedules",
        "reverse_etl_sent",
        "reverse_etl_failed",
        "reverse_etl_fields",
        "profile_features",
    ] {
        let docs = all_documents(store, collection, "").await.unwrap();
        leaks(collection, &serde_json::to_string(&docs).unwrap());
    }
    let letters = store.list_dead_letters(0, 10_000).await.unwrap();
    leaks("dead letters", &serde_json::to_string(&letters).unwrap());
    let reviews = cohort_adapters::all_review_items(store).await.unwrap();
    leaks("review queue", &serde_json::to_string(&reviews).unwrap());
    let audit = store.list_audit(0, 10_000).await.unwrap();
    for n in &needles {
        assert!(!serde_json::to_string(&audit).unwrap().contains(n.as_str()), "audit log holds `{n}`");
    }
    if let Some(w) = warehouse {
        for layer in Layer::ALL {
            let rows = w.query(&format!("SELECT * FROM {}", w.table(layer)), &[]).await.unwrap();
            leaks(&format!("warehouse {}", layer.as_str()), &serde_json::to_string(&rows.rows).unwrap());
        }
    }
}

/// The same search, proving the seed really put the person into each store first (so the
/// search cannot pass for want of data).
pub async fn assert_present(store: &dyn OperationalStore, warehouse: Option<&dyn Warehouse>, target: &ErasureTarget) {
    let found = store.person_remnants(target).await.unwrap();
    assert!(found.profiles >= 1 && found.identities >= 4 && found.dead_letters >= 1, "{found:?}");
    if let Some(w) = warehouse {
        let rows = w.query(&format!("SELECT * FROM {}", w.table(Layer::Silver)), &[]).await.unwrap();
        let text = serde_json::to_string(&rows.rows).unwrap();
        assert!(text.contains(target.profiles[0].as_str()), "the warehouse has no Silver rows of the person yet");
    }
}

/// Waits until everything ingested is in profiles, segments and destinations, the store and
/// the warehouse.
pub async fn everything_settled(demo: &DemoServer) {
    demo.cohort.settle(Duration::from_secs(30)).await.unwrap();
    let engine = demo.cohort.ctx.segment_engine.get().unwrap();
    engine.call(SegmentMsg::Sync, Some(Duration::from_secs(10))).await.unwrap();
    let retl = demo.cohort.reverse_etl.get().unwrap();
    retl.call(ReverseEtlMsg::Drain, Some(Duration::from_secs(30))).await.unwrap();
    demo.cohort.flush().await.unwrap();
    demo.cohort.relay_warehouse().await.unwrap();
}

/// Jana is erased while six other students send 40 events each and she keeps browsing: every
/// acknowledged event of the others lands exactly once, and nothing of hers is left (each of
/// her events was erased with her or dropped as suppressed, never the start of a new profile).
pub async fn deletion_during_load(demo: &DemoServer) {
    let c = demo.client.clone();
    seed(&c, &JANA, 1).await;
    everything_settled(demo).await;
    let jana_ref = format!("email:{}", JANA.email);
    let target = target_of(&c, &jana_ref).await;
    let jana_sender = {
        let c = c.clone();
        tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for i in 0..60 {
                let page = payloads::segment_page(&format!("jana-load-{i}"), "anon-jana", "/programs/mba", Utc::now());
                let a = c.segment(false, "page", &page).await.unwrap();
                assert_eq!(a.status, 200, "{}", a.body);
                outcomes.push(a.body["suppressed"].as_u64().unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            outcomes
        })
    };
    let status = std::sync::Arc::new(std::sync::Mutex::new(Value::Null));
    let load = {
        let (c, status) = (c.clone(), status.clone());
        super::load_during(&c.clone(), 6, 40, "loadstudent", async move {
            let url = request_deletion(&c, &jana_ref, "suppress_with_delete").await;
            *status.lock().unwrap() = wait_deletion(&c, &url, Duration::from_secs(90), completed).await;
        })
        .await
    };
    let outcomes = jana_sender.await.unwrap();
    assert!(outcomes.contains(&1), "some of her events came after the suppression");
    super::assert_exactly_once(&c, 6, "loadstudent", &load).await;
    everything_settled(demo).await;
    let done = status.lock().unwrap().clone();
    assert_eq!(step(&done, "verify")["detail"]["remnants"], 0, "{done}");
    let ctx = &demo.cohort.ctx;
    assert_nothing_left(ctx.store.as_ref(), ctx.bus.as_ref(), ctx.warehouse.as_deref(), &target, &JANA).await;
    assert_eq!(c.get("/v1/profiles/anonymous_id:anon-jana").await.unwrap().status, 404);
}

/// The real binary with `config` (written into `dir`): a deletion stuck retrying at the
/// destinations (`fail_salesforce(n)` makes the Salesforce stand-in answer 503 n times) is
/// SIGKILLed; after the restart it resumes at that step (finished steps do not run again),
/// completes, and the person stays suppressed.
pub async fn saga_survives_sigkill(dir: &std::path::Path, config: &str, fail_salesforce: impl Fn(u32)) {
    let cfg = dir.join("cohort.toml");
    std::fs::write(&cfg, config).unwrap();
    let port = super::free_port();
    let c = CohortClient::new(format!("http://127.0.0.1:{port}"), &Config::from_toml_str("").unwrap()).unwrap();
    let args = ["--config", cfg.to_str().unwrap()];
    let mut proc = super::spawn_cohort(&args, &[], port);
    super::wait_ready(&c).await;
    seed(&c, &JANA, 1).await;
    let jana_ref = format!("email:{}", JANA.email);
    let profile_id = wait_whole(&c, &jana_ref).await["profile_id"].clone();

    fail_salesforce(1_000_000);
    let url = request_deletion(&c, &jana_ref, "suppress_with_delete").await;
    let stuck = wait_deletion(&c, &url, Duration::from_secs(60), |v| {
        step(v, "destinations")["attempts"].as_u64().unwrap_or(0) >= 2
    })
    .await;
    assert_eq!(stuck["status"], "running");
    assert_eq!(step(&stuck, "destinations")["status"], "retrying");
    assert!(step(&stuck, "destinations")["last_error"].as_str().unwrap().contains("503"), "{stuck}");
    assert_eq!(step(&stuck, "operational_store")["status"], "done");

    proc.0.kill().unwrap();
    proc.0.wait().unwrap();
    fail_salesforce(0);
    let _proc = super::spawn_cohort(&args, &[], port);
    super::wait_ready(&c).await;
    let done = wait_deletion(&c, &url, Duration::from_secs(90), completed).await;
    for name in ["suppress", "stop_actor", "operational_store", "documents", "event_log", "warehouse"] {
        assert_eq!(step(&done, name)["attempts"], 1, "{name} ran again: {done}");
    }
    assert!(step(&done, "destinations")["attempts"].as_u64().unwrap() >= 3, "{done}");
    assert_eq!(step(&done, "destinations")["last_error"], Value::Null);
    assert_eq!(step(&done, "verify")["detail"]["remnants"], 0);
    assert_eq!(c.get(&format!("/v1/profiles/{jana_ref}")).await.unwrap().status, 404);
    assert_eq!(c.get(&format!("/v1/profiles/{}", profile_id.as_str().unwrap())).await.unwrap().status, 404);
    // Still suppressed after the restart: the list is reloaded from the store.
    let page = payloads::segment_page("jana-after-restart", "anon-jana", "/programs/mba", Utc::now());
    let a = c.segment(false, "page", &page).await.unwrap();
    assert_eq!((a.status.as_u16(), &a.body["suppressed"]), (200, &json!(1)), "{}", a.body);
    let list = c.get("/v1/gdpr/deletions").await.unwrap();
    assert_eq!(list.body["deletions"].as_array().unwrap().len(), 1, "{}", list.body);
}

/// Waits until every seeded event of a student is resolved (on Kafka that takes a moment):
/// their Salesforce id, email, phone, WhatsApp and anonymous ids are on one profile.
pub async fn wait_whole(c: &CohortClient, reference: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = c.get(&format!("/v1/profiles/{reference}")).await.unwrap();
        if p.status == 200 && p.body["identifiers"].as_array().is_some_and(|ids| ids.len() >= 5) {
            return p.body;
        }
        assert!(Instant::now() < deadline, "{reference} never appeared whole: {}", p.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Jana and Max through every source, settled everywhere.
pub async fn seed_both(demo: &DemoServer) {
    seed(&demo.client, &JANA, 1).await;
    seed(&demo.client, &MAX, 1).await;
    everything_settled(demo).await;
}

/// Jana identifies again on a new browser; returns the ingest answer's body.
pub async fn jana_writes_again(c: &CohortClient, message_id: &str, anonymous_id: &str) -> Value {
    let again = payloads::segment_identify(
        message_id,
        Some(anonymous_id),
        None,
        json!({ "email": JANA.email }),
        None,
        Utc::now(),
    );
    ok(c.segment(false, "identify", &again).await.unwrap())
}
