//! A student to erase (Jana) and one to keep (Max), seeded through every source, and the checks
//! that search each store for what is left of a person. Shared by the embedded and real-backend
//! GDPR tests.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use chrono::Utc;
use cohort::client::{Answer, CohortClient};
use cohort::payloads;
use cohort_adapters::{all_documents, EventBus, Layer, OperationalStore, Warehouse};
use cohort_messages::{ErasureCounts, ErasureTarget, Identifier, ProfileId};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

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
            assert!(!text.contains(n.as_str()), "{what} still holds `{n}`");
        }
        for p in &target.profiles {
            assert!(!text.contains(p.as_str()), "{what} still names profile {p}");
        }
    };
    for collection in
        ["consent_history", "segment_members", "reverse_etl_sent", "reverse_etl_failed", "reverse_etl_fields"]
    {
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
