//! The same end-to-end promises on the real backends: Kafka (Tansu) as the bus and MongoDB
//! (SecantusDB) as the operational store. `scripts/services.sh start` starts them and writes the
//! `COHORT_TEST_*` variables these tests read.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use chrono::Utc;
use cohort::client::CohortClient;
use cohort::demo::{fetch_profile, play_slide_18, DemoServer};
use cohort::payloads;
use cohort::SystemOptions;
use cohort_adapters::Layer;
use cohort_config::Config;
use serde_json::json;
use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
#[path = "common/destinations.rs"]
mod destinations;
use common::erasure::{
    assert_nothing_left, assert_present, completed, deletion_during_load, jana_writes_again, request_deletion,
    saga_survives_sigkill, seed, seed_both, step, target_of, wait_deletion, wait_whole, ERASURE_TOML, JANA, MAX,
};
use common::{assert_exactly_once, free_port, load_during, load_then_kill, spawn_cohort, wait_ready, Proc};
use destinations::Destinations;

fn service(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run `scripts/services.sh start` and `source ~/.cache/cohort/run/env` (scripts/test.sh does both)")
    })
}

fn unique(tag: &str) -> String {
    format!("{tag}_{}_{}", std::process::id(), Utc::now().timestamp_micros())
}

/// Config for Kafka + MongoDB + BigQuery (emulator) with a fresh topic prefix, database and
/// dataset.
fn backends_toml(prefix: &str, database: &str) -> String {
    format!("{}{}", backends_base(prefix, database), key_toml(database))
}

/// [`backends_toml`] without its `[gdpr]` table.
fn backends_base(prefix: &str, database: &str) -> String {
    format!(
        "[storage]\nurl = \"{}\"\ndatabase = \"{database}\"\n[bus]\nurl = \"kafka://{}\"\ntopic_prefix = \"{prefix}.\"\ngroup_id = \"{prefix}\"\nsession_timeout_ms = 6000\npartitions = 3\n[warehouse]\nurl = \"bigquery://test-project/{database}?endpoint={}\"\n",
        service("COHORT_TEST_MONGODB"),
        service("COHORT_TEST_KAFKA"),
        service("COHORT_TEST_BIGQUERY"),
    )
}

/// A key-encryption key file of one test's own (MongoDB needs one named explicitly).
fn key_toml(id: &str) -> String {
    format!("[gdpr]\nkey_url = \"file:{}\"\n", std::env::temp_dir().join(format!("cohort-test-{id}.kek")).display())
}

/// Reads every record of a topic from the start (until it has been quiet for a while).
fn read_topic(topic: &str) -> Vec<(String, serde_json::Value)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", service("COHORT_TEST_KAFKA"))
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(5) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            // A tombstone (no payload) reads as null.
            let value = m.payload().map(|p| serde_json::from_slice(p).unwrap()).unwrap_or(serde_json::Value::Null);
            out.push((key, value));
            quiet_since = Instant::now();
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slide_18_on_kafka_and_mongodb() {
    let id = unique("slide18");
    // DemoServer puts [storage] first; our TOML overrides it.
    let segment = "[[segments.define]]\nname = \"known\"\nrule = 'has(\"email\")'\n";
    let demo = DemoServer::start(None, &format!("{}{segment}", backends_toml(&id, &id)), SystemOptions::default())
        .await
        .unwrap();
    play_slide_18(&demo.client).await.unwrap();
    demo.cohort.settle(Duration::from_secs(60)).await.unwrap();
    let r = fetch_profile(&demo.client, "email:max@gmail.com").await.unwrap();
    let p = &r["profile"];
    let kinds: BTreeSet<&str> =
        p["identifiers"].as_array().unwrap().iter().filter_map(|i| i["kind"].as_str()).collect();
    assert!(
        kinds.is_superset(&BTreeSet::from([
            "anonymous_id",
            "email",
            "user_id",
            "device_id",
            "salesforce_id",
            "phone",
            "whatsapp_id"
        ])),
        "{kinds:?}"
    );
    assert_eq!(p["counters"]["events_total"], json!(6));
    assert_eq!(p["traits"]["first_name"]["value"], json!("Maximilian"));

    // The outbox reaches BigQuery (Bronze, Silver, Gold) and cdp.processed.events.
    // The scheduled relay may have moved part of it already; this call moves the rest. Rows are
    // at least once (a retried flush relays its rows again); the views deduplicate by key.
    let relayed = demo.cohort.relay_warehouse().await.unwrap().unwrap();
    assert_eq!(relayed.remaining, 0, "{relayed:?}");
    let wh = demo.cohort.ctx.warehouse.clone().unwrap();
    assert_eq!(wh.backend(), "bigquery");
    assert_eq!(wh.count_rows(Layer::Bronze).await.unwrap(), 6);
    assert_eq!(wh.count_rows(Layer::Silver).await.unwrap(), 6);
    let stored = demo.cohort.ctx.store.count_profiles().await.unwrap();
    assert_eq!(wh.count_rows(Layer::Gold).await.unwrap(), stored);
    let reconciled = demo.cohort.reconcile().await.unwrap();
    assert_eq!((reconciled.missing, reconciled.stale, reconciled.orphaned), (0, 0, 0), "{reconciled:?}");
    // Consumer lag per raw-topic partition (from librdkafka's statistics; everything is read, so
    // every reported partition is at 0), and the warehouse's write latency per layer.
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let text = demo.client.get("/metrics").await.unwrap().body.as_str().unwrap().to_string();
        let lag: Vec<&str> = text.lines().filter(|l| l.starts_with("cohort_consumer_lag_events{")).collect();
        if lag.iter().any(|l| l.contains(&format!("topic=\"{id}.cdp.raw."))) {
            assert!(lag.iter().all(|l| l.ends_with(" 0")), "{lag:?}");
            break text;
        }
        assert!(Instant::now() < deadline, "no consumer lag reported: {lag:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for layer in ["bronze", "silver", "gold"] {
        let series = format!("cohort_warehouse_write_seconds_count{{layer=\"{layer}\",outcome=\"ok\"}}");
        assert!(metrics.contains(&series), "{series} missing");
    }
    let processed = read_topic(&format!("{id}.cdp.processed.events"));
    let event_ids: BTreeSet<&str> = processed.iter().filter_map(|(_, row)| row["event_id"].as_str()).collect();
    assert_eq!(event_ids.len(), 6, "every event is published (at least once, keyed by event_id)");
    let keys: BTreeSet<&str> = processed.iter().map(|(k, _)| k.as_str()).collect();
    for (key, row) in &processed {
        assert_eq!(row["profile_id"].as_str(), Some(key.as_str()), "processed events are keyed by profile id");
    }
    assert!(keys.iter().all(|k| k.starts_with("prof_")), "{keys:?}");

    // A refused element is a dead letter in the store and on cdp.dlq, keyed by source.
    let bad = json!({ "batch": [{ "type": "track", "userId": "dlq-student", "event": "Quiz Completed",
        "messageId": "dlq-ok-1" }, { "type": "track", "event": "No Identity", "messageId": "dlq-bad-1" }] });
    let answer = demo.client.segment(false, "batch", &bad).await.unwrap();
    assert_eq!((answer.status.as_u16(), answer.body["accepted"].as_u64()), (200, Some(1)), "{}", answer.body);
    let dlq = read_topic(&format!("{id}.cdp.dlq"));
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(dlq[0].0, "web");
    assert!(dlq[0].1["reason"].as_str().unwrap().contains("element 1"), "{}", dlq[0].1);
    assert!(dlq[0].1["id"].as_u64().is_some(), "published with the id the store gave it");

    // Entering a segment is published on cdp.segment.change, keyed by profile, without personal data.
    let max = p["profile_id"].as_str().unwrap().to_string();
    let changes = read_topic(&format!("{id}.cdp.segment.change"));
    let entered: Vec<&serde_json::Value> = changes.iter().filter(|(k, _)| *k == max).map(|(_, v)| v).collect();
    assert!(!entered.is_empty(), "{changes:?}");
    assert_eq!(entered[0]["segment"], "known");
    assert_eq!(entered[0]["change"], "entered");
    assert!(!entered[0].to_string().contains("max@gmail.com"), "{}", entered[0]);

    // A merge is published on cdp.identity, keyed by the survivor, once it is stored.
    let c = &demo.client;
    for (mid, email, device) in [
        ("m-1", Some("merge.me@uni.eu"), None),
        ("m-2", None, Some("kiosk-7")),
        ("m-3", Some("merge.me@uni.eu"), Some("kiosk-7")),
    ] {
        let traits = email.map_or_else(|| json!({}), |e| json!({ "email": e }));
        let body = cohort::payloads::segment_identify(
            mid,
            Some(&format!("anon-{mid}")),
            None,
            traits,
            device,
            chrono::Utc::now(),
        );
        assert_eq!(c.segment(true, "identify", &body).await.unwrap().status, 200);
        demo.cohort.settle(Duration::from_secs(60)).await.unwrap();
    }
    let survivor = fetch_profile(c, "email:merge.me@uni.eu").await.unwrap()["profile"]["profile_id"].clone();
    let identity = read_topic(&format!("{id}.cdp.identity"));
    for (key, event) in &identity {
        assert_eq!(&json!(key), &event["survivor"], "keyed by the survivor: {event}");
    }
    let ours: Vec<&serde_json::Value> = identity.iter().filter(|(k, _)| json!(k) == survivor).map(|(_, e)| e).collect();
    assert_eq!(ours.len(), 1, "{identity:?}");
    assert_eq!(ours[0]["event"], "identity_merged");
    assert!(ours[0]["evidence"].to_string().contains("kiosk-7"), "{}", ours[0]);
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_on_kafka_and_mongodb_loses_nothing_acknowledged_and_counts_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let id = unique("kill");
    let cfg = dir.path().join("cohort.toml");
    std::fs::write(&cfg, backends_toml(&id, &id)).unwrap();
    let port = free_port();
    let c = CohortClient::new(format!("http://127.0.0.1:{port}"), &Config::from_toml_str("").unwrap()).unwrap();
    let mut proc = spawn_cohort(&["--config", cfg.to_str().unwrap()], &[], port);
    wait_ready(&c).await;

    const STUDENTS: usize = 10;
    let load = load_then_kill(&c, &mut proc, STUDENTS, 30, "kstudent").await;

    let _proc = spawn_cohort(&["--config", cfg.to_str().unwrap()], &[], port);
    wait_ready(&c).await;
    assert_exactly_once(&c, STUDENTS, "kstudent", &load).await;
}

/// A broker of this test's own (Tansu, in-memory storage), so freezing it cannot disturb other
/// tests sharing the suite's broker.
struct OwnBroker {
    proc: Proc,
    addr: String,
    _dir: tempfile::TempDir,
}

impl OwnBroker {
    async fn start() -> OwnBroker {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(service("COHORT_TEST_TANSU_BIN"))
            .current_dir(dir.path())
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://{addr}"),
                "--advertised-listener-url",
                &format!("tcp://{addr}"),
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "own broker did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        OwnBroker { proc: Proc(child), addr, _dir: dir }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.proc.0.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill {sig} failed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_answers_503_and_loses_nothing() {
    let broker = OwnBroker::start().await;
    let id = unique("outage");
    let extra = format!(
        "[storage]\nurl = \"{}\"\ndatabase = \"{id}\"\n[bus]\nurl = \"kafka://{}\"\ngroup_id = \"{id}\"\nsession_timeout_ms = 6000\npartitions = 2\nproduce_timeout_ms = 2000\n[warehouse]\nurl = \"none://\"\n{}",
        service("COHORT_TEST_MONGODB"),
        broker.addr,
        key_toml(&id),
    );
    let demo = DemoServer::start(None, &extra, SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    let send = |n: usize| {
        let ev = payloads::segment_track(
            &format!("o-{n}"),
            "outage-student",
            "Lesson Completed",
            json!({"n": n}),
            Utc::now(),
        );
        let c = c.clone();
        async move { c.segment(true, "track", &ev).await.unwrap() }
    };
    for n in 0..5 {
        assert_eq!(send(n).await.status, 200);
    }
    // Freeze the broker: connections hang and time out, as in a network partition.
    broker.signal("-STOP");
    let during = send(5).await;
    assert_eq!(during.status, 503, "{}", during.body);
    assert_eq!(during.body["error"]["code"], json!("unavailable"));
    // A batch with a bad element, answered 503 and sent again until it is taken, is
    // dead-lettered once, when it is taken (MongoDB, where letters go, stays up throughout).
    let good = payloads::segment_track("o-mixed", "outage-student", "Lesson Completed", json!({}), Utc::now());
    let mixed = payloads::segment_batch(vec![good, json!({"type": "track", "event": "No identity"})]);
    let mixed_during = c.segment(true, "batch", &mixed).await.unwrap();
    assert_eq!(mixed_during.status, 503, "{}", mixed_during.body);
    broker.signal("-CONT");
    // The producer reconnects by itself; the first requests may still see the outage.
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in 6..13 {
        loop {
            let a = if n == 12 { c.segment(true, "batch", &mixed).await.unwrap() } else { send(n).await };
            if a.status == 200 {
                break;
            }
            assert_eq!(a.status, 503, "{}", a.body);
            assert!(Instant::now() < deadline, "ingest did not recover after the broker came back: {}", a.body);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let dlq = c.get("/v1/dlq").await.unwrap();
    assert_eq!(dlq.body["total"], json!(1), "one letter for the one bad element: {}", dlq.body);
    demo.cohort.settle(Duration::from_secs(60)).await.unwrap();
    let p = c.get("/v1/profiles/user_id:outage-student/events?limit=100").await.unwrap();
    let ids: BTreeSet<String> =
        p.body["events"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids.len(), p.body["events"].as_array().unwrap().len(), "an event was applied twice");
    for n in (0..5).chain(6..12).map(|n| n.to_string()).chain(["mixed".to_string()]) {
        assert!(ids.contains(&format!("mobile:o-{n}")), "acknowledged event o-{n} lost: {ids:?}");
    }
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_a_resent_event_is_applied_once() {
    let id = unique("dedupe");
    let demo = DemoServer::start(None, &backends_toml(&id, &id), SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    let ev = payloads::segment_track("dup-k1", "dup-student", "Quiz Completed", json!({"score": 9}), Utc::now());
    // Kafka cannot refuse a duplicate when publishing: both are acknowledged and produced.
    assert_eq!(c.segment(true, "track", &ev).await.unwrap().status, 200);
    assert_eq!(c.segment(true, "track", &ev).await.unwrap().status, 200);
    demo.cohort.settle(Duration::from_secs(60)).await.unwrap();
    // once more after the first was flushed: now the store's idempotency keys catch it
    assert_eq!(c.segment(true, "track", &ev).await.unwrap().status, 200);
    demo.cohort.settle(Duration::from_secs(60)).await.unwrap();
    let p = c.get("/v1/profiles/user_id:dup-student").await.unwrap();
    assert_eq!(p.body["counters"]["events_total"], json!(1), "{}", p.body);
    let m = c.get("/metrics").await.unwrap();
    assert!(
        m.body.as_str().unwrap().contains("cohort_ingest_events_duplicate_total{source=\"mobile\"} 2"),
        "{}",
        m.body
    );
    demo.stop().await.unwrap();
}

/// A SecantusDB of this test's own, on a data folder that outlives its restarts.
struct OwnDatabase {
    proc: Option<Proc>,
    port: u16,
    dir: tempfile::TempDir,
}

impl OwnDatabase {
    async fn start() -> OwnDatabase {
        let mut db = OwnDatabase { proc: None, port: free_port(), dir: tempfile::tempdir().unwrap() };
        db.launch().await;
        db
    }

    async fn launch(&mut self) {
        let child = Command::new(service("COHORT_TEST_SECANTUS_BIN"))
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--storage-path", self.dir.path().to_str().unwrap(), "--cache-size", "128M"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.proc = Some(Proc(child));
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "own database did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A clean shutdown (SIGTERM), waited for.
    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let ok = Command::new("kill").args(["-TERM", &p.0.id().to_string()]).status().unwrap().success();
            assert!(ok, "kill -TERM failed");
            p.0.wait().unwrap();
        }
    }

    fn url(&self) -> String {
        format!("mongodb://127.0.0.1:{}", self.port)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_during_load_loses_nothing_and_counts_nothing_twice() {
    let mut db = OwnDatabase::start().await;
    let id = unique("dbrestart");
    let extra = format!(
        "[storage]\nurl = \"{}\"\ndatabase = \"{id}\"\n[bus]\nurl = \"kafka://{}\"\ntopic_prefix = \"{id}.\"\ngroup_id = \"{id}\"\nsession_timeout_ms = 6000\npartitions = 2\n[warehouse]\nurl = \"none://\"\n{}",
        db.url(),
        service("COHORT_TEST_KAFKA"),
        key_toml(&id),
    );
    let demo = DemoServer::start(None, &extra, SystemOptions::default()).await.unwrap();
    let c = demo.client.clone();
    const STUDENTS: usize = 6;
    const PER_STUDENT: usize = 40;
    let checkpoint = |c: CohortClient| async move {
        let m = c.get("/metrics").await.unwrap().body.as_str().unwrap().to_string();
        m.lines().find_map(|l| l.strip_prefix("cohort_pipeline_checkpoint ")?.trim().parse::<u64>().ok()).unwrap_or(0)
    };
    let mut during = 0;
    let load = load_during(&c, STUDENTS, PER_STUDENT, "dbstudent", async {
        db.stop();
        // Longer than the driver's server selection timeout, so store calls really fail.
        tokio::time::sleep(Duration::from_secs(7)).await;
        during = checkpoint(c.clone()).await;
        db.launch().await;
    })
    .await;
    assert_eq!(load.acked.len(), STUDENTS * PER_STUDENT, "ingest needs the broker, not the database");
    assert!(during < (STUDENTS * PER_STUDENT) as u64, "the pipeline cannot persist without its database");
    demo.cohort.settle(Duration::from_secs(120)).await.unwrap();
    assert_eq!(checkpoint(c.clone()).await, (STUDENTS * PER_STUDENT) as u64);
    assert_exactly_once(&c, STUDENTS, "dbstudent", &load).await;
    demo.stop().await.unwrap();

    // A fresh instance sees the same from the database alone.
    let again = DemoServer::start(None, &extra, SystemOptions::default()).await.unwrap();
    assert_exactly_once(&again.client, STUDENTS, "dbstudent", &load).await;
    again.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_topic_is_created_at_start_with_the_configured_partitions() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let id = unique("topics");
    let demo = DemoServer::start(None, &backends_toml(&id, &id), SystemOptions::default()).await.unwrap();
    let consumer: BaseConsumer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", service("COHORT_TEST_KAFKA")).create().unwrap();
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(10)).unwrap();
    let ours: std::collections::BTreeMap<String, usize> = metadata
        .topics()
        .iter()
        .filter_map(|t| t.name().strip_prefix(&format!("{id}.")).map(|n| (n.to_string(), t.partitions().len())))
        .collect();
    let expected = [
        "cdp.raw.web",
        "cdp.raw.mobile",
        "cdp.raw.crm",
        "cdp.raw.email",
        "cdp.raw.whatsapp",
        "cdp.processed.events",
        "cdp.dlq",
        "cdp.segment.change",
        "cdp.gdpr",
        "cdp.identity",
    ];
    for topic in expected {
        assert_eq!(ours.get(topic), Some(&3), "{topic}: {ours:?}");
    }
    // The GDPR topic keeps the latest record per key: compacted.
    let admin: rdkafka::admin::AdminClient<_> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", service("COHORT_TEST_KAFKA")).create().unwrap();
    let gdpr = format!("{id}.cdp.gdpr");
    let configs = admin
        .describe_configs(&[rdkafka::admin::ResourceSpecifier::Topic(&gdpr)], &rdkafka::admin::AdminOptions::new())
        .await
        .unwrap();
    let config = configs[0].as_ref().unwrap();
    let policy = config.get("cleanup.policy").and_then(|e| e.value.clone());
    assert_eq!(policy.as_deref(), Some("compact"), "{:?}", config.entry_map().keys().collect::<Vec<_>>());
    demo.stop().await.unwrap();
}

/// Backends, destinations and the erasure test setup, the key file in its `[gdpr]` table.
fn erasure_toml(id: &str, d: &Destinations) -> String {
    format!("{}{}\n{}", backends_base(id, id), d.config_toml(), ERASURE_TOML.replacen("[gdpr]\n", &key_toml(id), 1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_on_kafka_mongodb_and_bigquery_erases_everywhere_tombstones_cdp_gdpr_and_keeps_the_person_out() {
    let d = Destinations::start().await;
    let id = unique("erase");
    let demo = DemoServer::start(None, &erasure_toml(&id, &d), SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    seed_both(&demo).await;
    let jana_ref = format!("email:{}", JANA.email);
    let target = target_of(c, &jana_ref).await;
    let ctx = &demo.cohort.ctx;
    assert_present(ctx.store.as_ref(), ctx.warehouse.as_deref(), &target).await;
    let max_before = c.get(&format!("/v1/profiles/email:{}", MAX.email)).await.unwrap().body;

    let url = request_deletion(c, &jana_ref, "suppress_with_delete").await;
    let done = wait_deletion(c, &url, Duration::from_secs(60), completed).await;
    assert_eq!(step(&done, "verify")["detail"]["remnants"], 0, "{done}");
    assert_eq!(step(&done, "warehouse")["detail"]["backend"], "bigquery", "{done}");
    assert!(step(&done, "event_log")["detail"]["note"].as_str().unwrap().contains("retention"), "{done}");
    assert_eq!(step(&done, "tombstones")["status"], "done", "{done}");
    assert_nothing_left(ctx.store.as_ref(), ctx.bus.as_ref(), ctx.warehouse.as_deref(), &target, &JANA).await;
    assert_eq!(c.get(&format!("/v1/profiles/{jana_ref}")).await.unwrap().status, 404);

    // cdp.gdpr (compacted): the suppression under each identifier hash, and a tombstone under
    // each of the person's profile ids for downstream consumers to delete what they hold.
    let records = read_topic(&format!("{id}.cdp.gdpr"));
    for p in &target.profiles {
        assert!(records.iter().any(|(k, v)| k == p.as_str() && v.is_null()), "no tombstone for {p}: {records:?}");
    }
    let suppressions: Vec<_> = records.iter().filter(|(k, _)| k.starts_with("suppress:h1:")).collect();
    assert_eq!(suppressions.len(), target.identifiers.len(), "{records:?}");
    assert!(suppressions.iter().all(|(_, v)| v["suppressed"] == true));
    let text = serde_json::to_string(&records).unwrap();
    for n in JANA.needles() {
        assert!(!text.contains(&n), "cdp.gdpr carries `{n}`");
    }

    // Re-ingest: dropped and counted; Max is untouched.
    let a = jana_writes_again(c, "jana-again", "anon-jana-b").await;
    assert_eq!((&a["accepted"], &a["suppressed"]), (&json!(0), &json!(1)), "{a}");
    demo.cohort.settle(Duration::from_secs(20)).await.unwrap();
    assert_eq!(c.get(&format!("/v1/profiles/{jana_ref}")).await.unwrap().status, 404);
    let max_after = c.get(&format!("/v1/profiles/email:{}", MAX.email)).await.unwrap().body;
    assert_eq!(max_after["counters"], max_before["counters"]);
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_during_load_on_kafka_and_mongodb_loses_nobody_elses_events() {
    let d = Destinations::start().await;
    let id = unique("eraseload");
    let demo = DemoServer::start(None, &erasure_toml(&id, &d), SystemOptions::default()).await.unwrap();
    deletion_during_load(&demo).await;
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_on_kafka_and_mongodb_interrupted_by_sigkill_resumes_after_the_restart() {
    let d = Destinations::start().await;
    let dir = tempfile::tempdir().unwrap();
    let id = unique("erasekill");
    let fail = |n| d.fail_next("salesforce", n);
    saga_survives_sigkill(dir.path(), &erasure_toml(&id, &d), fail).await;
}

/// A Prometheus series' value in a replica's `/metrics` (0 when absent).
async fn series(c: &CohortClient, name_and_labels: &str) -> f64 {
    common::series_value(&common::scrape(c).await, name_and_labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_is_run_by_one_replica_at_a_time_and_taken_over_when_its_replica_is_killed() {
    let d = Destinations::start().await;
    let dir = tempfile::tempdir().unwrap();
    let id = unique("leases");
    // A lease far longer than the test: the takeover must come from the owner's missing
    // heartbeats, not from the lease running out.
    let config = erasure_toml(&id, &d).replacen(
        "[gdpr]\n",
        "[cluster]\nheartbeat_secs = 1\nmember_ttl_secs = 3\n[gdpr]\nstep_timeout_secs = 2\nlease_secs = 600\nrefresh_interval_secs = 1\n",
        1,
    );
    let cfg = dir.path().join("cohort.toml");
    std::fs::write(&cfg, config).unwrap();
    let args = ["--config", cfg.to_str().unwrap()];
    let client =
        |port: u16| CohortClient::new(format!("http://127.0.0.1:{port}"), &Config::from_toml_str("").unwrap()).unwrap();
    let (port_a, port_b) = (free_port(), free_port());
    let (a, b) = (client(port_a), client(port_b));
    let mut replica_a = spawn_cohort(&args, &[("HOSTNAME", "replica-a".into())], port_a);
    wait_ready(&a).await;
    seed(&a, &JANA, 1).await;
    let jana_ref = format!("email:{}", JANA.email);
    wait_whole(&a, &jana_ref).await;

    d.fail_next("salesforce", 1_000_000);
    let url = request_deletion(&a, &jana_ref, "suppress_with_delete").await;
    let stuck = wait_deletion(&a, &url, Duration::from_secs(60), |v| {
        step(v, "destinations")["attempts"].as_u64().unwrap_or(0) >= 2
    })
    .await;
    assert!(stuck["lease"]["owner"].as_str().unwrap().starts_with("replica-a/"), "{stuck}");
    assert_eq!(stuck["owners"].as_array().unwrap().len(), 1, "{stuck}");

    // A second replica finds the running saga and leaves it to the lease holder.
    let _replica_b = spawn_cohort(&args, &[("HOSTNAME", "replica-b".into())], port_b);
    wait_ready(&b).await;
    let leases = |outcome: &str| format!("cohort_gdpr_saga_leases_total{{outcome=\"{outcome}\"}}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while series(&b, &leases("held_elsewhere")).await < 2.0 {
        assert!(Instant::now() < deadline, "replica b never looked at the running saga");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(series(&b, &leases("acquired")).await + series(&b, &leases("taken_over")).await, 0.0);
    let still = wait_deletion(&b, &url, Duration::from_secs(5), |_| true).await;
    assert!(still["lease"]["owner"].as_str().unwrap().starts_with("replica-a/"), "{still}");

    // Both are members: alive, reachable where they listen, consuming disjoint raw partitions
    // that together cover every partition (5 sources x 3).
    let deadline = Instant::now() + Duration::from_secs(60);
    let view = loop {
        let view = b.get("/v1/cluster").await.unwrap().body;
        let members = view["members"].as_array().cloned().unwrap_or_default();
        let parts: Vec<String> = members
            .iter()
            .flat_map(|m| m["partitions"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| p.as_str().map(str::to_string))
            .collect();
        let distinct: BTreeSet<&String> = parts.iter().collect();
        if view["alive"] == 2 && parts.len() == 15 && distinct.len() == 15 {
            break view;
        }
        assert!(Instant::now() < deadline, "the two replicas never shared the partitions: {view}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let member = |prefix: &str| {
        view["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"].as_str().unwrap().starts_with(prefix))
            .unwrap()
            .clone()
    };
    assert_eq!(member("replica-a/")["advertise_url"], format!("http://127.0.0.1:{port_a}"), "{view}");
    assert_eq!(member("replica-b/")["self"], true, "{view}");
    assert!(!member("replica-a/")["partitions"].as_array().unwrap().is_empty(), "{view}");
    assert_eq!(member("replica-a/")["ready"], true, "{view}");

    // Replica a dies mid-step; once its lease expires replica b resumes the saga where it stood.
    replica_a.0.kill().unwrap();
    replica_a.0.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let view = b.get("/v1/cluster").await.unwrap().body;
        if view["alive"] == 1 && member_alive(&view, "replica-a/") == Some(false) {
            break;
        }
        assert!(Instant::now() < deadline, "the killed replica still looks alive: {view}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    d.fail_next("salesforce", 0);
    let done = wait_deletion(&b, &url, Duration::from_secs(90), completed).await;
    let owners: Vec<&str> = done["owners"].as_array().unwrap().iter().map(|o| o.as_str().unwrap()).collect();
    assert_eq!(owners.len(), 2, "{done}");
    assert!(owners[0].starts_with("replica-a/") && owners[1].starts_with("replica-b/"), "{done}");
    assert_eq!(done["lease"], serde_json::Value::Null, "a finished saga holds no lease: {done}");
    for name in ["suppress", "stop_actor", "operational_store", "documents", "event_log", "warehouse"] {
        assert_eq!(step(&done, name)["attempts"], 1, "{name} ran again after the takeover: {done}");
    }
    assert_eq!(step(&done, "destinations")["last_error"], serde_json::Value::Null, "{done}");
    assert_eq!(step(&done, "verify")["detail"]["remnants"], 0, "{done}");
    assert_eq!(series(&b, &leases("taken_over")).await, 1.0);
    assert_eq!(b.get(&format!("/v1/profiles/{jana_ref}")).await.unwrap().status, 404);
}

/// Whether the member whose name starts with `prefix` is alive in a `/v1/cluster` view.
fn member_alive(view: &serde_json::Value, prefix: &str) -> Option<bool> {
    view["members"].as_array()?.iter().find(|m| m["name"].as_str().is_some_and(|n| n.starts_with(prefix)))?["alive"]
        .as_bool()
}

/// A request larger than Kafka takes as one message is refused as too large (413, with what to
/// do), not as unavailable (503), which a client retries forever; the same rows in smaller
/// chunks all go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_too_large_for_a_kafka_message_is_413_and_smaller_chunks_go_through() {
    let id = unique("bigcsv");
    let demo = DemoServer::start(None, &backends_toml(&id, &id), SystemOptions::default()).await.unwrap();
    let header = "Id,FirstName,LastName,Email,Phone,MailingCity\n";
    // One row without an `Id` is rejected: its dead letter must be recorded once, not once per
    // attempt the request took.
    let rows: Vec<String> = std::iter::once(",Ohne,Id,ohne.id@example.edu,,Berlin\n".to_string())
        .chain(
            (0..20_000)
                .map(|n| format!("003{n:015},Studentin{n},Nachname{n},student{n}@example.edu,+4915112{n:06},Berlin\n")),
        )
        .collect();
    let whole = format!("{header}{}", rows.concat());
    assert!(whole.len() > 1_500_000, "{} bytes: more than a Kafka message once base64-encoded", whole.len());
    let answer = demo.client.salesforce_csv(&whole).await.unwrap();
    assert_eq!(answer.status, 413, "{}", answer.body);
    assert_eq!(answer.body["error"]["code"], json!("payload_too_large"), "{}", answer.body);
    assert!(answer.body["error"]["message"].as_str().unwrap().contains("smaller parts"), "{}", answer.body);

    // `cohort import` sends the chunk again in halves until each fits.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("contacts.csv");
    std::fs::write(&file, &whole).unwrap();
    let summary =
        cohort::import::salesforce_contacts(&file, &demo.base, &demo.client.crm_token, 20_000, false).await.unwrap();
    assert_eq!((summary.rows, summary.accepted, summary.rejected), (20_001, 20_000, 1), "{summary:?}");
    assert!(summary.requests >= 2, "{summary:?}");
    assert_eq!(demo.cohort.ctx.store.count_dead_letters().await.unwrap(), 1, "one letter for the one bad row");
}

/// Topics made with one partition count and a configuration that says another: Cohort refuses
/// to start, naming the key, instead of routing students to partitions nobody reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_count_that_disagrees_with_the_topics_stops_the_start() {
    let (prefix, db) = (unique("parts"), unique("parts"));
    let toml = backends_toml(&prefix, &db);
    let demo = DemoServer::start(None, &toml, SystemOptions::default()).await.unwrap();
    demo.stop().await.unwrap();
    let more = toml.replace("partitions = 3", "partitions = 6");
    assert_ne!(more, toml);
    let refused = match DemoServer::start(None, &more, SystemOptions::default()).await {
        Ok(_) => panic!("started with bus.partitions = 6 on topics of 3"),
        Err(e) => format!("{e:#}"),
    };
    assert!(refused.contains("has 3 partitions but bus.partitions = 6"), "{refused}");
    // The same count starts again.
    DemoServer::start(None, &toml, SystemOptions::default()).await.unwrap().stop().await.unwrap();
}

/// A contacts export of `rows` rows of about 3 KB each.
fn contacts_csv(rows: usize) -> String {
    let mut csv = String::from("Id,FirstName,LastName,Email,Description\n");
    for n in 0..rows {
        let note = "Interested in the evening MBA and the scholarship deadline ".repeat(50);
        csv.push_str(&format!("003{n:015},Studentin{n},Nachname{n},student{n}@example.edu,{note}\n"));
    }
    csv
}

/// Imports of `too_big` rows (over `over_mib`) are refused with 413, and one of `fits` rows
/// (under `cap_mib`) reaches Bronze whole; returns that import's size.
async fn import_cap_holds(
    demo: &DemoServer,
    (too_big, over_mib): (usize, usize),
    (fits, cap_mib): (usize, usize),
) -> usize {
    let too_big = contacts_csv(too_big);
    assert!(too_big.len() > over_mib << 20, "{}", too_big.len());
    let answer = demo.client.salesforce_csv(&too_big).await.unwrap();
    assert_eq!(answer.status, 413, "{}", answer.body);
    let fits = contacts_csv(fits);
    assert!(fits.len() > (cap_mib - 1) << 20 && fits.len() < cap_mib << 20, "{}", fits.len());
    let answer = demo.client.salesforce_csv(&fits).await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
    demo.cohort.settle(Duration::from_secs(120)).await.unwrap();
    let relayed = demo.cohort.relay_warehouse().await.unwrap().unwrap();
    assert_eq!(relayed.remaining, 0, "{relayed:?}");
    let wh = demo.cohort.ctx.warehouse.clone().unwrap();
    assert_eq!(wh.count_rows(Layer::Bronze).await.unwrap(), 1, "the payload reached the warehouse whole");
    fits.len()
}

/// With BigQuery as the warehouse a raw payload is one Bronze row of one insertAll request
/// (about 9 MiB): import bodies are capped at 4 MiB there, so one just under the cap reaches
/// Bronze whole (sealed, a third larger), and a 7 MiB one, which would stop the relay for
/// everyone behind it, is refused up front.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_bigquery_an_import_body_is_capped_so_its_raw_payload_fits_an_insert_request() {
    let id = unique("bqcap");
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[storage]\nurl = \"embedded://{}\"\n[warehouse]\nurl = \"bigquery://test-project/{id}?endpoint={}\"\n{}",
        dir.path().join("cohort.redb").display(),
        service("COHORT_TEST_BIGQUERY"),
        key_toml(&id)
    );
    let demo = DemoServer::start(None, &toml, SystemOptions::default()).await.unwrap();
    let fits = import_cap_holds(&demo, (2_600, 7), (1_350, 4)).await;
    let stored = demo.cohort.ctx.warehouse.clone().unwrap().raw_payloads(0, 10).await.unwrap();
    assert!(stored[0].1.len() > fits, "sealed, a third larger");
    demo.stop().await.unwrap();
}

/// On MongoDB a raw payload travels whole in one outbox document (16 MiB at most): import bodies
/// are capped at 8 MiB there, so one just under the cap is flushed and relayed, and one that
/// would make every flush fail (21 MiB: sealed, it does not fit even compressed) is refused up
/// front.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_mongodb_an_import_body_is_capped_so_its_raw_payload_fits_an_outbox_document() {
    let id = unique("mongocap");
    let journal = tempfile::tempdir().unwrap();
    let toml = format!(
        "[storage]\nurl = \"{}\"\ndatabase = \"{id}\"\n[bus]\nurl = \"embedded://{}\"\n[warehouse]\nurl = \"duckdb://{}\"\n{}",
        service("COHORT_TEST_MONGODB"),
        journal.path().join("journal.redb").display(),
        journal.path().join("warehouse.duckdb").display(),
        key_toml(&id)
    );
    let demo = DemoServer::start(None, &toml, SystemOptions::default()).await.unwrap();
    import_cap_holds(&demo, (7_400, 21), (2_700, 8)).await;
}
