//! Cluster mode on the real backends: several `cohort` processes sharing Kafka and MongoDB own
//! the profiles of their partitions of `cdp.processed.events`, and lose nothing when one dies.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use chrono::Utc;
use cohort::client::CohortClient;
use cohort::payloads;
use cohort_config::Config;
use common::{assert_exactly_once, free_port, spawn_cohort, wait_ready, LoadResult, Proc};
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn service(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run `scripts/services.sh start` and `source ~/.cache/cohort/run/env` (scripts/test.sh does both)")
    })
}

/// One cluster at a time: three replicas each already keep two cores busy.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn unique(tag: &str) -> String {
    format!("{tag}_{}_{}", std::process::id(), Utc::now().timestamp_micros())
}

/// Cluster mode on Kafka and MongoDB, three partitions per topic, fast heartbeats; a dead
/// member leaves the groups after 12 s (a tenth of the default's 30 s, plenty for Tansu's rebalances).
fn cluster_toml(id: &str) -> String {
    format!(
        "[storage]\nurl = \"{}\"\ndatabase = \"{id}\"\n[bus]\nurl = \"kafka://{}\"\ntopic_prefix = \"{id}.\"\ngroup_id = \"{id}\"\npartitions = 3\nsession_timeout_ms = 12000\n\
         [warehouse]\nurl = \"none://\"\n[gdpr]\nkey_url = \"file:{}\"\n[cluster]\nenabled = true\nheartbeat_secs = 1\nmember_ttl_secs = 3\n",
        service("COHORT_TEST_MONGODB"),
        service("COHORT_TEST_KAFKA"),
        std::env::temp_dir().join(format!("cohort-test-{id}.kek")).display(),
    )
}

struct Replica {
    name: String,
    port: u16,
    client: CohortClient,
    proc: Option<Proc>,
}

impl Replica {
    fn start(cfg: &Path, name: &str, port: u16) -> Self {
        let client =
            CohortClient::new(format!("http://127.0.0.1:{port}"), &Config::from_toml_str("").unwrap()).unwrap();
        let proc = spawn_cohort(&["--config", cfg.to_str().unwrap()], &[("HOSTNAME", name.to_string())], port);
        Replica { name: name.to_string(), port, client, proc: Some(proc) }
    }
}

/// Waits until `alive` members have settled: each holds some of the processed-events
/// partitions, each of those is held once, and every raw partition (5 topics x 3) is consumed.
async fn wait_owned(c: &CohortClient, alive: usize) -> Value {
    // Tansu takes from 15 s to over a minute to rebalance both groups after a member dies.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let view = c.get("/v1/cluster").await.map(|a| a.body).unwrap_or(Value::Null);
        let members: Vec<Vec<String>> = view["members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["alive"] == true)
            .map(|m| {
                m["partitions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p.as_str().map(str::to_string))
                    .collect()
            })
            .collect();
        let processed = |ps: &Vec<String>| ps.iter().filter(|p| p.contains("cdp.processed.events/")).count();
        let all: Vec<&String> = members.iter().flatten().collect();
        let distinct: BTreeSet<&&String> = all.iter().collect();
        let settled = members.len() == alive
            && members.iter().all(|ps| processed(ps) > 0)
            && members.iter().map(processed).sum::<usize>() == 3
            && distinct.len() == all.len()
            && all.len() == 3 + 15;
        if view["alive"] == alive && settled {
            return view;
        }
        assert!(Instant::now() < deadline, "the partitions never settled on {alive} members: {view}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A running cluster: its configuration file (in `_dir`) and its replicas.
struct Cluster {
    _dir: tempfile::TempDir,
    cfg: std::path::PathBuf,
    replicas: Vec<Replica>,
}

impl Cluster {
    /// A client of each replica, in replica order.
    fn clients(&self) -> Vec<CohortClient> {
        self.replicas.iter().map(|r| r.client.clone()).collect()
    }
}

/// Starts `n` replicas in cluster mode on a fresh prefix and database (plus `extra` config) and
/// waits until they share the partitions; returns the cluster and its `/v1/cluster` view.
async fn start_cluster(tag: &str, n: usize, extra: &str) -> (Cluster, Value) {
    let id = unique(tag);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cohort.toml");
    let mut base = cluster_toml(&id);
    if extra.contains("[warehouse]") {
        base = base.replace("[warehouse]\nurl = \"none://\"\n", "");
    }
    std::fs::write(&cfg, format!("{base}{extra}")).unwrap();
    let replicas: Vec<Replica> = (0..n).map(|i| Replica::start(&cfg, &format!("replica-{i}"), free_port())).collect();
    let mut waited_for_groups = false;
    for r in &replicas {
        waited_for_groups |= wait_ready(&r.client).await;
    }
    // Tansu holds a joining member for seconds: readiness must have waited for it somewhere.
    assert!(waited_for_groups, "no replica was ever unready for want of its consumer groups");
    let view = wait_owned(&replicas[0].client, n).await;
    (Cluster { _dir: dir, cfg, replicas }, view)
}

/// Links each student's user id and anonymous id (an identify through replica `s % n`) and
/// waits until every replica's store lookup sees both on one profile. Returns the event ids.
async fn link_students(clients: &[CohortClient], students: usize, prefix: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for s in 0..students {
        let (user, anon, mid) = (format!("{prefix}-{s}"), format!("anon-{prefix}-{s}"), format!("{prefix}-{s}-link"));
        let ev = payloads::segment_identify(&mid, Some(&anon), Some(&user), json!({}), None, Utc::now());
        let a = clients[s % clients.len()].segment(false, "identify", &ev).await.unwrap();
        assert_eq!(a.status, 200, "{}", a.body);
        ids.push(format!("web:{mid}"));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for s in 0..students {
        loop {
            let p = clients[0].get(&format!("/v1/profiles/anonymous_id:anon-{prefix}-{s}")).await.unwrap();
            if p.status == 200 && p.body["identifiers"].as_array().is_some_and(|i| i.len() >= 2) {
                break;
            }
            assert!(Instant::now() < deadline, "student {s} never linked: {}", p.body);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    ids
}

/// Each student's events alternate between their user id (mobile track) and their anonymous
/// id (web page), so the raw topics route them to different partitions and so to different
/// replicas' resolvers, and go through the replicas in turn, one every `pace`. `disruption`
/// runs once a third is acknowledged; a refused event is not retried (it counts as sent, not
/// acknowledged) and the student goes on with the next replica.
async fn alternating_load(
    clients: &[CohortClient],
    students: usize,
    per_student: usize,
    prefix: &str,
    pace: Duration,
    disruption: impl std::future::Future<Output = ()>,
) -> LoadResult {
    use std::sync::{Arc, Mutex};
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let sent: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut tasks = Vec::new();
    for s in 0..students {
        let (clients, acked, sent, prefix) = (clients.to_vec(), acked.clone(), sent.clone(), prefix.to_string());
        tasks.push(tokio::spawn(async move {
            let (user, anon) = (format!("{prefix}-{s}"), format!("anon-{prefix}-{s}"));
            for i in 0..per_student {
                let c = &clients[(s + i) % clients.len()];
                let mid = format!("{user}-{i}");
                let (id, answer) = if i % 2 == 0 {
                    let ev = payloads::segment_track(&mid, &user, "Lesson Completed", json!({ "i": i }), Utc::now());
                    (format!("mobile:{mid}"), c.segment(true, "track", &ev).await)
                } else {
                    let ev = payloads::segment_page(&mid, &anon, "/programs/mba", Utc::now());
                    (format!("web:{mid}"), c.segment(false, "page", &ev).await)
                };
                sent.lock().unwrap().insert(id.clone());
                if matches!(answer, Ok(a) if a.status == 200) {
                    acked.lock().unwrap().insert(id);
                }
                tokio::time::sleep(pace).await;
            }
        }));
    }
    common::finish_load(tasks, &sent, &acked, students * per_student, disruption).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_own_the_profiles_of_their_partitions_and_a_killed_one_loses_nothing() {
    let _one = ONE_CLUSTER.lock().await;
    let (mut cluster, view) = start_cluster("cluster", 3, "").await;
    let replicas = &mut cluster.replicas;
    for r in replicas.iter() {
        let member = view["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"].as_str().unwrap().starts_with(&format!("{}/", r.name)))
            .unwrap_or_else(|| panic!("{} is not a member: {view}", r.name));
        assert_eq!(member["advertise_url"], format!("http://127.0.0.1:{}", r.port), "{view}");
    }

    const STUDENTS: usize = 24;
    const EVENTS: usize = 30;
    let clients: Vec<CohortClient> = replicas.iter().map(|r| r.client.clone()).collect();
    let links = link_students(&clients, STUDENTS, "clu").await;
    // A student whose live actor is on replica 2, for a write while its partition has no owner.
    let mut orphan = None;
    for s in 0..STUDENTS {
        let p = clients[2].get(&format!("/v1/profiles/anonymous_id:anon-clu-{s}")).await.unwrap();
        if p.header("x-cohort-owner").is_some_and(|o| o.starts_with(&format!("{}/", replicas[2].name))) {
            orphan = Some(s);
            break;
        }
    }
    let orphan = orphan.expect("replica 2 owns some student");
    // Through another replica, answered as the owner would: a HEAD is a read, and a body over
    // the limit is 413 (503 would have the client send it again and again).
    let profile = format!("/v1/profiles/anonymous_id:anon-clu-{orphan}");
    let head = clients[0].call("HEAD", &profile, &Value::Null).await.unwrap();
    assert_eq!(head.status, 200);
    assert!(head.header("x-cohort-owner").is_some_and(|o| o.starts_with(&format!("{}/", replicas[2].name))));
    let oversized = json!({ "email": { "granted": true, "legal_basis": "x".repeat(600_000) } });
    let refused = clients[0].call("PUT", &format!("{profile}/consent"), &oversized).await.unwrap();
    assert_eq!(refused.status, 413, "{}", refused.body);
    // Replica 2 is killed (SIGKILL, nothing flushed) once a third of the load is acknowledged.
    let mut victim = replicas[2].proc.take().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let survivors = vec![clients[0].clone(), clients[1].clone()];
    let poller = tokio::spawn(poll_api(survivors, "/v1/profiles/anonymous_id:anon-clu-0".into(), stop_rx));
    let started = Instant::now();
    let mut load = alternating_load(&clients, STUDENTS, EVENTS, "clu", Duration::ZERO, async {
        victim.0.kill().unwrap();
        victim.0.wait().unwrap();
    })
    .await;
    assert!(load.acked.len() < STUDENTS * EVENTS, "the kill came too late to test anything");
    eprintln!("load: {} sent, {} acknowledged in {:?}", load.sent.len(), load.acked.len(), started.elapsed());
    load.sent.extend(links.iter().cloned());
    load.acked.extend(links);

    // Once its heartbeat is stale and before its partitions move, a write to one of its profiles
    // is refused with Retry-After (a read is answered from the stored record).
    let consent = json!({ "email": { "granted": true, "legal_basis": "consent" } });
    let path = format!("/v1/profiles/anonymous_id:anon-clu-{orphan}/consent");
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let a = clients[0].call("PUT", &path, &consent).await.unwrap();
        if a.status == 503 {
            break a;
        }
        assert!(Instant::now() < deadline, "a write to a dead owner's profile kept answering {}: {}", a.status, a.body);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(refused.header("retry-after").is_some(), "{}", refused.body);
    let head = clients[0].call("HEAD", &profile, &Value::Null).await.unwrap();
    assert_eq!((head.status.as_u16(), head.header("x-cohort-consistency")), (200, Some("snapshot")));

    // The survivors take its partitions over; every acknowledged event is in exactly one
    // history, and every counter equals its history, read through both survivors.
    let view = wait_owned(&replicas[0].client, 2).await;
    let _ = stop_tx.send(true);
    let (window, failed, polls) = poller.await.unwrap();
    assert!(window < Duration::from_secs(10), "no survivor answered the profile for {window:?}");
    eprintln!(
        "failover: partitions settled {:?} after the kill; Profile API through the survivors: {failed} of {polls} polls failed, longest error window {window:?}",
        started.elapsed()
    );
    assert_exactly_once(&replicas[0].client, STUDENTS, "clu", &load).await;
    assert_exactly_once(&replicas[1].client, STUDENTS, "clu", &load).await;

    // Either survivor answers for any profile from the owner's live actor, and says which.
    let alive: Vec<String> = view["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["alive"] == true)
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect();
    let mut owners = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    for s in 0..STUDENTS {
        let path = format!("/v1/profiles/anonymous_id:anon-clu-{s}");
        // Peers learn a new owner from its next heartbeat: until then an answer may still be
        // the stored record, which says so.
        let (a, b) = loop {
            let (a, b) = (replicas[0].client.get(&path).await.unwrap(), replicas[1].client.get(&path).await.unwrap());
            assert_eq!((a.status.as_u16(), b.status.as_u16()), (200, 200), "{} {}", a.body, b.body);
            let live = |x: &cohort::client::Answer| {
                x.header("x-cohort-consistency").is_none() && x.header("x-cohort-owner").is_some()
            };
            if (live(&a) && live(&b)) || Instant::now() > deadline {
                break (a, b);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let owner = a.header("x-cohort-owner").unwrap_or_default().to_string();
        assert!(alive.contains(&owner), "student {s} answered by {owner:?}, not a live member {alive:?}");
        assert_eq!(b.header("x-cohort-owner"), Some(owner.as_str()), "both replicas name the same owner");
        assert_eq!(a.header("x-cohort-consistency"), None, "a live answer is not a snapshot");
        assert_eq!(a.body["counters"], b.body["counters"], "student {s}");
        owners.insert(owner);
    }
    assert_eq!(owners.len(), 2, "both survivors own profiles: {owners:?}");
    drop(replicas.pop());
}

/// Polls a profile through the replicas in turn until `stop`; returns the longest stretch during
/// which no replica answered it (the API's error window), how many polls failed, and how many
/// there were.
async fn poll_api(
    clients: Vec<CohortClient>,
    path: String,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (Duration, usize, usize) {
    let (mut worst, mut failed, mut since) = (Duration::ZERO, 0, None::<Instant>);
    let mut turn = 0;
    while !*stop.borrow() {
        let c = &clients[turn % clients.len()];
        turn += 1;
        // A replica that is going away may hold a request: a second is an error for a reader.
        match tokio::time::timeout(Duration::from_secs(1), c.get(&path)).await {
            Ok(Ok(a)) if a.status == 200 => {
                // Never stale without saying so: a live owner's answer names it, any other is
                // marked as the stored record.
                let live = a.header("x-cohort-owner").is_some() && a.header("x-cohort-consistency").is_none();
                let marked = a.header("x-cohort-consistency") == Some("snapshot");
                assert!(
                    live || marked,
                    "an answer neither from a named owner nor marked as a snapshot: {:?}",
                    a.headers
                );
                if let Some(t) = since.take() {
                    worst = worst.max(t.elapsed());
                }
            }
            _ => {
                failed += 1;
                since.get_or_insert_with(Instant::now);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(t) = since {
        worst = worst.max(t.elapsed());
    }
    (worst, failed, turn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_three_replicas_under_load_loses_nothing() {
    let _one = ONE_CLUSTER.lock().await;
    let (mut cluster, _) = start_cluster("rolling", 3, "").await;
    let cfg = cluster.cfg.clone();
    let replicas = &mut cluster.replicas;
    const STUDENTS: usize = 45;
    const EVENTS: usize = 80;
    let clients: Vec<CohortClient> = replicas.iter().map(|r| r.client.clone()).collect();
    let links = link_students(&clients, STUDENTS, "rr").await;

    // One replica after the other: SIGTERM (a graceful stop hands its partitions over), then a
    // new process in its place, while the load goes on and a reader polls the Profile API.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let poller = tokio::spawn(poll_api(clients.clone(), "/v1/profiles/anonymous_id:anon-rr-0".into(), stop_rx));
    let cfg_path = cfg.clone();
    let mut stops = Vec::new();
    let mut settles = Vec::new();
    let restarts = async {
        for r in replicas.iter_mut() {
            let mut proc = r.proc.take().unwrap();
            let pid = proc.0.id().to_string();
            assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
            // It drains only its own partitions; waiting for the others' (drained by their owners)
            // ran into the 20 s grace on every stop.
            let stopping = Instant::now();
            while proc.0.try_wait().unwrap().is_none() {
                assert!(stopping.elapsed() < Duration::from_secs(15), "{} did not stop within 15 s of SIGTERM", r.name);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            stops.push(stopping.elapsed());
            *r = Replica::start(&cfg_path, &r.name, r.port);
            // Ready means it joined both consumer groups; then the groups settle before the next
            // stop, as a rollout paced by the readiness probe and `minReadySeconds` does.
            wait_ready(&r.client).await;
            let settling = Instant::now();
            wait_owned(&r.client, 3).await;
            settles.push(settling.elapsed());
        }
    };
    let started = Instant::now();
    let mut load = alternating_load(&clients, STUDENTS, EVENTS, "rr", Duration::from_millis(150), restarts).await;
    let _ = stop_tx.send(true);
    let (window, failed, polls) = poller.await.unwrap();
    assert!(failed < polls, "the Profile API never answered");
    // Generous on purpose (shared machine): it catches a gap as long as a replica's shutdown.
    assert!(window < Duration::from_secs(10), "no replica answered the profile for {window:?}");
    eprintln!(
        "rolling restart: {} sent, {} acknowledged in {:?}; Profile API: {failed} of {polls} polls failed (a third went to the replica restarting), longest error window {window:?}; SIGTERM to exit {stops:?}, ready to settled {settles:?}",
        load.sent.len(),
        load.acked.len(),
        started.elapsed()
    );
    load.sent.extend(links.iter().cloned());
    load.acked.extend(links);

    wait_owned(&replicas[0].client, 3).await;
    assert_exactly_once(&replicas[0].client, STUDENTS, "rr", &load).await;
    assert_exactly_once(&replicas[2].client, STUDENTS, "rr", &load).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_student_arriving_at_two_replicas_at_once_becomes_one_profile() {
    let _one = ONE_CLUSTER.lock().await;
    // Claims reach the store with each flush: a slow flush makes sure both replicas resolve a
    // student before either has stored what it claimed.
    let (cluster, _) = start_cluster("claims", 2, "[profiles]\nflush_interval_ms = 1500\n").await;
    let replicas = &cluster.replicas;
    // Each new student's first page view (anonymous id) reaches one replica at the same moment
    // as their sign-up (anonymous id and user id) reaches the other: two resolvers, two raw
    // partitions, both meeting the anonymous id for the first time.
    const STUDENTS: usize = 40;
    let (a, b) = (replicas[0].client.clone(), replicas[1].client.clone());
    let mut sent = HashSet::new();
    let mut tasks = Vec::new();
    for s in 0..STUDENTS {
        let (a, b) = (a.clone(), b.clone());
        let (user, anon) = (format!("twin-{s}"), format!("anon-twin-{s}"));
        let (page, signup) = (format!("{user}-page"), format!("{user}-signup"));
        sent.insert(format!("web:{page}"));
        sent.insert(format!("web:{signup}"));
        tasks.push(tokio::spawn(async move {
            let p = payloads::segment_page(&page, &anon, "/programs/mba", Utc::now());
            let i = payloads::segment_identify(&signup, Some(&anon), Some(&user), json!({}), None, Utc::now());
            let (x, y) = tokio::join!(a.segment(false, "page", &p), b.segment(false, "identify", &i));
            assert_eq!((x.unwrap().status.as_u16(), y.unwrap().status.as_u16()), (200, 200));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Both events of every student end on one profile, whichever identifier asks for it, and
    // each is counted once.
    let load = LoadResult { acked: sent.clone(), sent };
    assert_exactly_once(&a, STUDENTS, "twin", &load).await;
    // Replicas that did not see the merge learn it from the store: allow them a moment.
    let deadline = Instant::now() + Duration::from_secs(30);
    for s in 0..STUDENTS {
        loop {
            let by_anon = a.get(&format!("/v1/profiles/anonymous_id:anon-twin-{s}")).await.unwrap();
            let by_user = b.get(&format!("/v1/profiles/user_id:twin-{s}")).await.unwrap();
            let one = by_anon.body["profile_id"] == by_user.body["profile_id"]
                && by_anon.body["counters"]["events_total"] == 2
                && by_user.body["counters"]["events_total"] == 2;
            if one {
                break;
            }
            assert!(Instant::now() < deadline, "student {s} is two profiles: {} / {}", by_anon.body, by_user.body);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let metrics = common::scrape(&a).await + &common::scrape(&b).await;
    eprintln!(
        "claims lost and merged: {}",
        metrics.lines().filter(|l| l.starts_with("cohort_cluster_claims_lost_total")).collect::<Vec<_>>().join(", ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_asked_of_one_replica_is_carried_out_by_the_owners_of_the_profiles() {
    let _one = ONE_CLUSTER.lock().await;
    let (cluster, _) = start_cluster("erase", 2, "").await;
    let clients = cluster.clients();
    const STUDENTS: usize = 8;
    link_students(&clients, STUDENTS, "er").await;

    // The erasure is asked of the replica that does not hold the student's live actor.
    let student = 3;
    let p = clients[0].get(&format!("/v1/profiles/anonymous_id:anon-er-{student}")).await.unwrap();
    assert_eq!((p.status.as_u16(), p.header("x-cohort-consistency")), (200, None), "{}", p.body);
    let profile_id = p.body["profile_id"].as_str().unwrap().to_string();
    let owner = p.header("x-cohort-owner").unwrap_or_default().to_string();
    let asked = if owner.starts_with(&format!("{}/", cluster.replicas[0].name)) { 1 } else { 0 };
    assert!(owner.starts_with(&format!("{}/", cluster.replicas[1 - asked].name)), "owner {owner}");
    let c = &clients[asked];
    let url = common::erasure::request_deletion(c, &format!("user_id:er-{student}"), "suppress_with_delete").await;
    let done = common::erasure::wait_deletion(c, &url, Duration::from_secs(60), common::erasure::completed).await;
    assert_eq!(common::erasure::step(&done, "stop_actor")["detail"]["owners_confirmed"], 1, "{done}");

    // At once, not after the next refresh of erasures (30 s): the owner's live actor is gone,
    // and nothing it held is written back.
    for round in 0..2 {
        for (i, c) in clients.iter().enumerate() {
            let p = c.get(&format!("/v1/profiles/{profile_id}")).await.unwrap();
            assert_eq!(p.status, 404, "replica {i}, round {round}: {}", p.body);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The other students are untouched.
    let other = (student + 1) % STUDENTS;
    let p = clients[0].get(&format!("/v1/profiles/anonymous_id:anon-er-{other}")).await.unwrap();
    assert_eq!(p.status, 200, "{}", p.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_warehouse_outbox_is_relayed_by_one_replica() {
    let _one = ONE_CLUSTER.lock().await;
    let dataset = unique("relay");
    let extra = format!(
        "[warehouse]\nurl = \"bigquery://test-project/{dataset}?endpoint={}\"\nrelay_interval_ms = 200\n",
        service("COHORT_TEST_BIGQUERY")
    );
    let (cluster, _) = start_cluster("relay", 2, &extra).await;
    let clients = cluster.clients();
    const STUDENTS: usize = 10;
    link_students(&clients, STUDENTS, "wh").await;

    // Every replica's flushes fill the one outbox in MongoDB; one replica empties it.
    let silver = |text: &str| common::series_value(text, "cohort_warehouse_rows_written_total{layer=\"silver\"}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let relayed = loop {
        let mut rows = Vec::new();
        for c in &clients {
            rows.push(silver(&common::scrape(c).await));
        }
        if rows.iter().sum::<f64>() >= STUDENTS as f64 {
            break rows;
        }
        assert!(Instant::now() < deadline, "the outbox was not relayed: {rows:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // A few more relay intervals: the other replica still relays nothing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut after = Vec::new();
    for c in &clients {
        after.push(silver(&common::scrape(c).await));
    }
    assert_eq!(after.iter().filter(|r| **r > 0.0).count(), 1, "relayed by both replicas: {relayed:?} then {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_defined_through_one_replica_is_evaluated_by_every_replica() {
    let _one = ONE_CLUSTER.lock().await;
    // Refreshes seconds apart: replica 1 mostly learns of the segment after replica 0's pass
    // reached its profiles, so they enter through the pass replica 1 starts when it learns.
    let (cluster, _) = start_cluster("segdef", 2, "[segments]\nrefresh_interval_secs = 8\n").await;
    let clients = cluster.clients();
    const STUDENTS: usize = 16;
    link_students(&clients, STUDENTS, "sd").await;
    // Every student viewed the MBA page before the segment exists.
    for s in 0..STUDENTS {
        let view = payloads::segment_page(&format!("sd-{s}-mba"), &format!("anon-sd-{s}"), "/programs/mba", Utc::now());
        assert_eq!(clients[s % 2].segment(false, "page", &view).await.unwrap().status, 200);
    }
    let mut owners = BTreeSet::new();
    for s in 0..STUDENTS {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let p = clients[0].get(&format!("/v1/profiles/anonymous_id:anon-sd-{s}")).await.unwrap();
            if p.body["counters"]["by_kind"]["page"].as_u64().is_some_and(|n| n >= 1) {
                let owner = p.header("x-cohort-owner").unwrap_or_default();
                owners.insert(owner.split('/').next().unwrap_or_default().to_string());
                break;
            }
            assert!(Instant::now() < deadline, "student {s}'s page view never arrived: {}", p.body);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(owners.len(), 2, "both replicas must own some of the students for this test: {owners:?}");

    // Defined through replica 0: replica 1 lists it, and evaluates the students it owns.
    let rule = r#"page_count("mba", 7d) >= 1"#;
    let put = clients[0].call("PUT", "/v1/segments/mba_viewers", &json!({ "rule": rule })).await.unwrap();
    assert_eq!(put.status, 200, "{}", put.body);
    let seen_by_1 = |want: u16, field: &'static str, value: Value| {
        let c = clients[1].clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let got = c.get("/v1/segments/mba_viewers").await.unwrap();
                if got.status == want && (want != 200 || got.body[field] == value) {
                    break;
                }
                assert!(Instant::now() < deadline, "replica 1 still answers {} {}", got.status, got.body);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    seen_by_1(200, "rule", json!(rule)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = clients[1].get(&format!("/v1/segments/mba_viewers/members?limit={}", 2 * STUDENTS)).await.unwrap();
        let n = m.body["members"].as_array().map(Vec::len).unwrap_or(0);
        if n == STUDENTS {
            break;
        }
        assert!(Instant::now() < deadline, "{n} of {STUDENTS} students entered: {}", m.body);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Changed and then deleted through replica 1: replica 0 follows both.
    let described = json!({ "rule": rule, "description": "changed on replica 1" });
    assert_eq!(clients[1].call("PUT", "/v1/segments/mba_viewers", &described).await.unwrap().status, 200);
    let on_0 = |c: CohortClient| async move { c.get("/v1/segments/mba_viewers").await.unwrap() };
    let deadline = Instant::now() + Duration::from_secs(20);
    while on_0(clients[0].clone()).await.body["description"] != json!("changed on replica 1") {
        assert!(Instant::now() < deadline, "replica 0 never saw the change");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(clients[1].call("DELETE", "/v1/segments/mba_viewers", &json!({})).await.unwrap().status, 204);
    let deadline = Instant::now() + Duration::from_secs(20);
    while on_0(clients[0].clone()).await.status != 404 {
        assert!(Instant::now() < deadline, "replica 0 still has the deleted segment");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A change sent to a profile that was merged into one another replica owns reaches the
/// survivor, whichever replica made the merge: where a replica still takes the merged profile
/// for a root it is refused for a retry (a read-only copy of the survivor is never stored, and
/// an owner with an older view reads the store again), never acknowledged and lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consent_change_for_a_profile_merged_into_another_replicas_profile_reaches_the_survivor() {
    let _one = ONE_CLUSTER.lock().await;
    let (cluster, _) = start_cluster("merged-away", 2, "").await;
    let clients = cluster.clients();
    let owner = |a: &cohort::client::Answer| {
        let name = a.header("x-cohort-owner").unwrap_or_default();
        cluster.replicas.iter().position(|r| name.starts_with(&format!("{}/", r.name)))
    };
    let until = |c: CohortClient, path: String, ok: Box<dyn Fn(&cohort::client::Answer) -> bool>| async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let a = c.get(&path).await.unwrap();
            if ok(&a) {
                return a;
            }
            assert!(Instant::now() < deadline, "{path}: {} {}", a.status, a.body);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let live = |a: &cohort::client::Answer| a.status == 200 && a.header("x-cohort-consistency").is_none();
    let id = |a: &cohort::client::Answer| a.body["profile_id"].as_str().unwrap().to_string();
    let consent = json!({ "email": { "granted": true, "legal_basis": "consent" } });
    // A survivor T (older: a user id and an email) and S (newer: an anonymous visitor) on
    // different replicas, merged by a link (which replica resolves it is the broker's choice).
    for k in 0..12 {
        let (user, email, anon) = (format!("mx-{k}"), format!("mx{k}@uni.eu"), format!("anon-mx-{k}"));
        let t = payloads::segment_identify(
            &format!("{user}-t"),
            None,
            Some(&user),
            json!({ "email": email }),
            None,
            Utc::now(),
        );
        assert_eq!(clients[0].segment(false, "identify", &t).await.unwrap().status, 200);
        let t = until(clients[0].clone(), format!("/v1/profiles/user_id:{user}"), Box::new(live)).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        let s = payloads::segment_page(&format!("{user}-s"), &anon, "/programs/mba", Utc::now());
        assert_eq!(clients[0].segment(false, "page", &s).await.unwrap().status, 200);
        let s = until(clients[0].clone(), format!("/v1/profiles/anonymous_id:{anon}"), Box::new(live)).await;
        let (Some(t_owner), Some(s_owner)) = (owner(&t), owner(&s)) else { continue };
        if t_owner == s_owner {
            continue;
        }
        let (t_id, s_id) = (id(&t), id(&s));
        assert!(t_id < s_id, "T is the older");
        // S's owner reads S (and so takes it for a root); then the link merges S into T.
        let s_path = format!("/v1/profiles/{s_id}");
        assert_eq!(clients[s_owner].get(&s_path).await.unwrap().body["profile_id"], json!(s_id));
        let link = payloads::segment_identify(
            &format!("{user}-l"),
            Some(&anon),
            None,
            json!({ "email": email }),
            None,
            Utc::now(),
        );
        assert_eq!(clients[t_owner].segment(false, "identify", &link).await.unwrap().status, 200);
        let merged = t_id.clone();
        until(clients[s_owner].clone(), s_path.clone(), Box::new(move |a| a.body["profile_id"] == json!(merged))).await;
        // Where S's replica made the merge it forwards the change to T's owner, which reads the
        // merge from the store. Where T's replica made it, S's replica still takes S for a root
        // and answers itself: with a refusal to retry, not with "done" for a change applied to
        // a copy of T that no flush stores (the case this test is after).
        let first = clients[s_owner].call("PUT", &format!("{s_path}/consent"), &consent).await.unwrap();
        let answered_here = owner(&first) == Some(s_owner);
        if answered_here {
            assert_eq!(first.status, 503, "{}", first.body);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut taken = first;
        while taken.status != 200 {
            assert_eq!(taken.status, 503, "{}", taken.body);
            assert!(Instant::now() < deadline, "never taken: {}", taken.body);
            tokio::time::sleep(Duration::from_millis(200)).await;
            taken = clients[s_owner].call("PUT", &format!("{s_path}/consent"), &consent).await.unwrap();
        }
        assert_eq!(owner(&taken), Some(t_owner), "{}", taken.body);
        let t = clients[t_owner].get(&format!("/v1/profiles/{t_id}")).await.unwrap();
        assert!(t.body["consent"].to_string().contains("\"granted\":true"), "{}", t.body);
        if answered_here {
            return;
        }
    }
    panic!("no pair was merged by the survivor's replica");
}
