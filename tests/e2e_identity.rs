//! Merge protection through the HTTP API: shared devices and phones must not merge strangers.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

#[path = "common/people.rs"]
mod people;

use chrono::Utc;
use cohort::demo::DemoServer;
use cohort::SystemOptions;
use people::{identify, metric, profile_id};
use serde_json::json;
use std::collections::BTreeSet;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_students_logging_in_on_one_tablet_stay_two_students() {
    let demo = DemoServer::start(None, "", SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    identify(c, "fam-1", Some("mother-7"), json!({ "email": "ruth@example.org" }), Some("family-ipad")).await;
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    identify(c, "fam-2", Some("son-8"), json!({ "email": "jonas@example.org" }), Some("family-ipad")).await;
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();

    let mother = profile_id(c, "user_id:mother-7").await;
    let son = profile_id(c, "user_id:son-8").await;
    assert_ne!(mother, son, "one user id per profile: the shared tablet must not merge them");
    assert_eq!(profile_id(c, "device_id:family-ipad").await, mother, "the device stays with its first profile");
    assert_eq!(profile_id(c, "email:jonas@example.org").await, son);
    let son_ids = c.get("/v1/profiles/user_id:son-8/identities").await.unwrap().body;
    assert!(!son_ids.to_string().contains("family-ipad"), "{son_ids}");
    let m = c.get("/metrics").await.unwrap().body.as_str().unwrap().to_string();
    assert_eq!(
        metric(&m, "cohort_identity_links_refused_total{kind=\"device_id\",reason=\"profile_limit\"} "),
        1,
        "{m}"
    );
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_shared_by_more_than_three_profiles_stops_linking() {
    let demo = DemoServer::start(None, "", SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    // Five siblings give the family landline with their own addresses, one after another.
    for n in 1..=5 {
        let traits = json!({ "email": format!("sibling{n}@example.org"), "phone": "+49 30 901820" });
        identify(c, &format!("sib-{n}"), None, traits, None).await;
        demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    }
    let ids: Vec<String> = {
        let mut v = Vec::new();
        for n in 1..=5 {
            v.push(profile_id(c, &format!("email:sibling{n}@example.org")).await);
        }
        v
    };
    // The phone links while it has linked at most three profiles; from the fourth on it links none.
    let distinct: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(ids[0], ids[1], "{ids:?}");
    assert_eq!(ids[1], ids[2], "{ids:?}");
    assert_ne!(ids[3], ids[0], "{ids:?}");
    assert_ne!(ids[4], ids[0], "{ids:?}");
    assert_ne!(ids[3], ids[4], "{ids:?}");
    assert_eq!(distinct.len(), 3, "{ids:?}");
    assert_eq!(profile_id(c, "phone:+4930901820").await, ids[0], "the phone stays with the profile it had");
    let m = c.get("/metrics").await.unwrap().body.as_str().unwrap().to_string();
    assert_eq!(
        metric(&m, "cohort_identity_links_refused_total{kind=\"phone\",reason=\"shared_identifier\"} "),
        2,
        "{m}"
    );
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_configurable_and_checked_at_start() {
    let extra = "[identity.max_values_per_profile]\nuser_id = 2\n";
    let demo = DemoServer::start(None, extra, SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    identify(c, "cfg-1", Some("acct-a"), json!({}), Some("shared-laptop")).await;
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    identify(c, "cfg-2", Some("acct-b"), json!({}), Some("shared-laptop")).await;
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    assert_eq!(profile_id(c, "user_id:acct-a").await, profile_id(c, "user_id:acct-b").await, "two accounts allowed");
    demo.stop().await.unwrap();

    let bad = cohort_config::Config::from_toml_str("[identity.max_profiles_per_identifier]\nfax = 2\n").unwrap();
    let err = match cohort::Cohort::start(bad, SystemOptions::default()).await {
        Ok(_) => panic!("started with an unknown identifier kind"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("identity.max_profiles_per_identifier.fax"), "{err}");
}

/// The partition of identifiers into profiles after resolving `events` with `shards` resolvers,
/// published `in_order` one at a time (settling after each) or all at once.
async fn partition(
    events: &[Vec<cohort_messages::Identifier>],
    shards: usize,
    one_at_a_time: bool,
) -> BTreeSet<BTreeSet<String>> {
    use cohort_adapters::AppendBatch;
    use cohort_messages::{CustomerEvent, EventId, EventKind, RawRef, Source, Utm};
    // Limits off (0): they are first-come rules by design; the graph itself must not depend on order.
    let extra = format!(
        "[identity]\nshards = {shards}\n[identity.max_values_per_profile]\nuser_id = 0\nsalesforce_id = 0\n\
         [identity.max_profiles_per_identifier]\ndevice_id = 0\nanonymous_id = 0\nphone = 0\nwhatsapp_id = 0\n\
         [warehouse]\nurl = \"none://\"\n"
    );
    let demo = DemoServer::start(None, &extra, SystemOptions::default()).await.unwrap();
    let t0 = Utc::now();
    for (n, ids) in events.iter().enumerate() {
        let event = CustomerEvent {
            event_id: EventId::new(Source::Web, &format!("prop-{n}")),
            source: Source::Web,
            kind: EventKind::Identify,
            name: None,
            occurred_at: t0,
            received_at: t0 + chrono::Duration::milliseconds(n as i64),
            identifiers: ids.clone(),
            traits: Default::default(),
            properties: Default::default(),
            utm: Utm::default(),
            trace: None,
            raw: RawRef { seq: None, index: 0 },
        };
        demo.cohort.ctx.bus.publish(AppendBatch { raw: None, events: vec![event] }).await.unwrap();
        if one_at_a_time {
            demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
        }
    }
    demo.cohort.settle(Duration::from_secs(30)).await.unwrap();
    let mut groups: std::collections::BTreeMap<String, BTreeSet<String>> = Default::default();
    for id in events.iter().flatten() {
        let root = demo.cohort.ctx.index.resolve(id).await.unwrap().unwrap_or_else(|| panic!("{id:?} has no profile"));
        groups.entry(root.to_string()).or_default().insert(id.key());
    }
    demo.stop().await.unwrap();
    groups.into_values().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_shards_reach_the_same_identity_graph_as_one_sequential_resolver() {
    use cohort_messages::{Identifier, IdentifierKind};
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    let kinds = [
        IdentifierKind::Email,
        IdentifierKind::Phone,
        IdentifierKind::DeviceId,
        IdentifierKind::AnonymousId,
        IdentifierKind::UserId,
    ];
    for seed in [1_u64, 7, 42] {
        let mut rng = StdRng::seed_from_u64(seed);
        // 60 events over a pool of 40 identifiers: enough overlap for chains of merges.
        let pool: Vec<Identifier> =
            (0..40).map(|i| Identifier::new(kinds[i % kinds.len()], format!("v{seed}-{i}@x.org"))).collect();
        let events: Vec<Vec<Identifier>> = (0..60)
            .map(|_| {
                let k = rng.gen_range(1..=3);
                pool.choose_multiple(&mut rng, k).cloned().collect()
            })
            .collect();
        let sequential = partition(&events, 1, true).await;
        let mut shuffled = events.clone();
        shuffled.shuffle(&mut rng);
        let concurrent = partition(&shuffled, 8, false).await;
        assert_eq!(concurrent, sequential, "seed {seed}: the identity graph depends on the interleaving");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_why_two_profiles_look_like_one_student() {
    let demo = DemoServer::start(None, "", SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    let person = |first: &str, last: &str, dob: &str, postal: &str| json!({ "firstName": first, "lastName": last, "birthday": dob, "postalCode": postal });
    identify(c, "ex-1", Some("crm-export-17"), person("Lena", "Müller", "03.04.2001", "20146"), None).await;
    identify(c, "ex-2", Some("app-user-99"), person("LENA", "Mueller", "2001-04-03", "20146"), None).await;
    identify(c, "ex-3", Some("other-5"), person("Lena", "Müller", "1987-07-22", "80331"), None).await;
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();

    let likely = c.get("/v1/identity/explain?a=user_id:crm-export-17&b=user_id:app-user-99").await.unwrap();
    assert_eq!(likely.status, 200, "{}", likely.body);
    assert_eq!(likely.body["same_profile"], json!(false));
    assert!(likely.body["score"].as_f64().unwrap() > 0.99, "{}", likely.body);
    let fields: Vec<&str> =
        likely.body["comparisons"].as_array().unwrap().iter().filter_map(|f| f["field"].as_str()).collect();
    assert!(fields.contains(&"date_of_birth") && fields.contains(&"last_name"), "{fields:?}");
    assert!(!likely.body.to_string().contains("Müller"), "the explanation carries no personal values");

    let unlikely = c.get("/v1/identity/explain?a=user_id:crm-export-17&b=user_id:other-5").await.unwrap();
    assert!(unlikely.body["score"].as_f64().unwrap() < 0.05, "{}", unlikely.body);
    assert_eq!(c.get("/v1/identity/explain?a=user_id:crm-export-17&b=user_id:nobody").await.unwrap().status, 404);
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_family_phone_links_a_student_again_but_never_a_sibling_whose_name_or_birthday_differs() {
    let demo = DemoServer::start(None, "", SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    let landline = "+49 30 9018211";
    let ruth =
        json!({ "email": "ruth.k@example.org", "firstName": "Ruth", "birthday": "2001-02-03", "phone": landline });
    identify(c, "fam-a", None, ruth, None).await;
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    // Her brother and her sister give the family landline with their own addresses.
    let jonas = json!({ "email": "jonas.k@example.org", "firstName": "Jonas", "phone": landline });
    identify(c, "fam-b", None, jonas, None).await;
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let lea = json!({ "email": "lea.k@example.org", "birthday": "2004-05-01", "phone": landline });
    identify(c, "fam-c", None, lea, None).await;
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    // Ruth herself, with a new address, is still linked through the phone.
    let again = json!({ "email": "ruth.klein@uni.example", "firstName": "RUTH", "phone": landline });
    identify(c, "fam-d", None, again, None).await;
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();

    let ruth = profile_id(c, "email:ruth.k@example.org").await;
    assert_eq!(profile_id(c, "phone:+49309018211").await, ruth, "the phone stays with its first owner");
    assert_ne!(profile_id(c, "email:jonas.k@example.org").await, ruth, "a different given name");
    assert_ne!(profile_id(c, "email:lea.k@example.org").await, ruth, "a different birthday");
    assert_eq!(profile_id(c, "email:ruth.klein@uni.example").await, ruth, "the same student");
    let m = c.get("/metrics").await.unwrap().body.as_str().unwrap().to_string();
    assert_eq!(
        metric(&m, "cohort_identity_links_refused_total{kind=\"phone\",reason=\"different_person\"} "),
        2,
        "{m}"
    );
    demo.stop().await.unwrap();
}
