//! Supervision: injected ProfileActor failures are restarted from persisted state, poison events
//! are dead-lettered after bounded attempts, and other students are unaffected.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use chrono::Utc;
use cohort::demo::DemoServer;
use cohort::payloads;
use cohort::SystemOptions;
use cohort_actors::FaultInjector;
use cohort_messages::{CustomerEvent, ProfileId};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Panics on every event named "Poison", and once on each event named "Flaky".
#[derive(Default)]
struct Faults {
    flaky_seen: Mutex<HashSet<String>>,
    panics: AtomicUsize,
}

impl FaultInjector for Faults {
    fn before_apply(&self, _profile: &ProfileId, event: &CustomerEvent) {
        match event.name.as_deref() {
            Some("Poison") => {
                self.panics.fetch_add(1, Ordering::SeqCst);
                panic!("injected poison");
            }
            Some("Flaky") => {
                let first = self.flaky_seen.lock().map(|mut s| s.insert(event.event_id.to_string())).unwrap_or(false);
                if first {
                    self.panics.fetch_add(1, Ordering::SeqCst);
                    panic!("injected transient failure");
                }
            }
            _ => {}
        }
    }
}

fn track(id: &str, user: &str, name: &str, n: i64) -> Value {
    payloads::segment_track(id, user, name, json!({"n": n}), Utc::now() - chrono::Duration::seconds(100 - n))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_profile_actor_restarts_and_poison_goes_to_the_dead_letter_store() {
    let faults = Arc::new(Faults::default());
    let options = SystemOptions { fault: Some(faults.clone()), ..SystemOptions::default() };
    // A fast flush so the first events are persisted before the failures: the restart must
    // then come from persisted state plus the re-delivered unflushed events.
    let demo =
        DemoServer::start(None, "[profiles]\nflush_interval_ms = 20\nmax_event_attempts = 3\n", options).await.unwrap();
    let c = &demo.client;
    let first: Vec<Value> = (0..5).map(|i| track(&format!("a-{i}"), "alice", "Lesson Completed", i)).collect();
    assert_eq!(c.segment(true, "batch", &payloads::segment_batch(first)).await.unwrap().status, 200);
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let second = vec![
        track("a-5", "alice", "Lesson Completed", 5),
        track("a-poison", "alice", "Poison", 6),
        track("a-7", "alice", "Lesson Completed", 7),
        track("a-flaky", "alice", "Flaky", 8),
        track("a-9", "alice", "Lesson Completed", 9),
        track("b-0", "bob", "Lesson Completed", 1),
        track("b-1", "bob", "Lesson Completed", 2),
    ];
    assert_eq!(c.segment(true, "batch", &payloads::segment_batch(second)).await.unwrap().status, 200);
    demo.cohort.settle(Duration::from_secs(20)).await.unwrap();

    let alice = c.get("/v1/profiles/user_id:alice").await.unwrap();
    assert_eq!(alice.status, 200, "{}", alice.body);
    // 9 of 10: everything but the poison event, the flaky one exactly once
    assert_eq!(alice.body["counters"]["events_total"], json!(9), "{}", alice.body);
    let events = c.get("/v1/profiles/user_id:alice/events?limit=50").await.unwrap();
    let ids: Vec<&str> =
        events.body["events"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap()).collect();
    assert!(ids.contains(&"mobile:a-flaky"));
    assert!(!ids.contains(&"mobile:a-poison"));
    let unique: HashSet<&&str> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "an event was applied twice: {ids:?}");
    let bob = c.get("/v1/profiles/user_id:bob").await.unwrap();
    assert_eq!(bob.body["counters"]["events_total"], json!(2));

    // the poison event is in the dead-letter store with its attempts
    let dlq = c.get("/v1/dlq").await.unwrap();
    let letters = dlq.body["dead_letters"].as_array().unwrap();
    let poison = letters.iter().find(|l| l["event_id"] == json!("mobile:a-poison")).expect("poison dead-lettered");
    assert_eq!(poison["stage"], json!("profile"));
    assert_eq!(poison["attempts"], json!(3));
    assert!(poison["reason"].as_str().unwrap().contains("injected poison"));
    // three poison attempts and one transient failure, each a restart
    assert_eq!(faults.panics.load(Ordering::SeqCst), 4);
    let stats = demo.cohort.profile_stats().await.unwrap();
    assert_eq!(stats.restarts, 4);
    assert_eq!(stats.poison_events, 1);
    let m = c.get("/metrics").await.unwrap();
    let text = m.body.as_str().unwrap();
    assert!(text.contains("cohort_actor_restarts_total{kind=\"profile\"} 4"), "{text}");
    assert!(text.contains("cohort_dead_letters_total{stage=\"profile\"} 1"), "{text}");
    // the tree stayed healthy: profile failures are handled below the pipeline supervisor
    assert_eq!(c.get("/health/ready").await.unwrap().status, 200);
    demo.stop().await.unwrap();
}

/// Several poison events for one student are each dead-lettered after their attempts; together
/// they do not use up the profile's restart budget and escalate the pipeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_poison_events_for_one_student_do_not_escalate() {
    let faults = Arc::new(Faults::default());
    let options = SystemOptions { fault: Some(faults.clone()), ..SystemOptions::default() };
    let extra = "[profiles]\nmax_event_attempts = 3\n[supervision]\nmax_restarts = 4\nbackoff_initial_ms = 5\nbackoff_max_ms = 20\n";
    let demo = DemoServer::start(None, extra, options).await.unwrap();
    let c = &demo.client;
    let events: Vec<Value> = (0..3)
        .map(|i| track(&format!("p-{i}"), "alice", "Poison", i))
        .chain([track("ok-1", "alice", "Lesson Completed", 5)])
        .collect();
    assert_eq!(c.segment(true, "batch", &payloads::segment_batch(events)).await.unwrap().status, 200);
    demo.cohort.settle(Duration::from_secs(20)).await.unwrap();
    assert_eq!(faults.panics.load(Ordering::SeqCst), 9, "three attempts of each, once");
    let alice = c.get("/v1/profiles/user_id:alice").await.unwrap();
    assert_eq!(alice.body["counters"]["events_total"], json!(1), "{}", alice.body);
    let m = c.get("/metrics").await.unwrap();
    let text = m.body.as_str().unwrap();
    assert!(text.contains("cohort_dead_letters_total{stage=\"profile\"} 3"), "{text}");
    assert!(!text.contains("cohort_actor_escalations_total{kind=\"profile\"} 1"), "{text}");
    assert_eq!(c.get("/health/ready").await.unwrap().status, 200);
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_profile_actors_passivate_and_rehydrate_on_demand() {
    let demo = DemoServer::start(
        None,
        "[profiles]\npassivate_after_secs = 1\nflush_interval_ms = 20\n",
        SystemOptions::default(),
    )
    .await
    .unwrap();
    let c = &demo.client;
    let batch: Vec<Value> = (0..3).map(|i| track(&format!("p-{i}"), &format!("idle-{i}"), "App Opened", i)).collect();
    assert_eq!(c.segment(true, "batch", &payloads::segment_batch(batch)).await.unwrap().status, 200);
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    assert_eq!(demo.cohort.profile_stats().await.unwrap().live, 3);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while demo.cohort.profile_stats().await.unwrap().live > 0 {
        assert!(std::time::Instant::now() < deadline, "idle actors were not passivated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A query rehydrates the actor from the store, with all its state.
    let p = c.get("/v1/profiles/user_id:idle-1").await.unwrap();
    assert_eq!(p.status, 200);
    assert_eq!(p.body["counters"]["events_total"], json!(1));
    assert_eq!(demo.cohort.profile_stats().await.unwrap().live, 1);
    // New events reach a passivated profile too.
    let more = track("p-9", "idle-2", "App Opened", 9);
    assert_eq!(c.segment(true, "track", &more).await.unwrap().status, 200);
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let p = c.get("/v1/profiles/user_id:idle-2").await.unwrap();
    assert_eq!(p.body["counters"]["events_total"], json!(2));
    demo.stop().await.unwrap();
}

/// Panics on every event named "Poison".
struct AlwaysPoison;

impl FaultInjector for AlwaysPoison {
    fn before_apply(&self, _profile: &ProfileId, event: &CustomerEvent) {
        if event.name.as_deref() == Some("Poison") {
            panic!("injected permanent failure");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_beyond_the_restart_budget_escalate_up_the_tree() {
    // Attempts per event exceed the restart budget, so the profile escalates instead of
    // dead-lettering: the pipeline restarts (one-for-all), replays, fails again, and finally
    // exhausts its own budget; the root sees it and readiness goes red.
    let extra = "[profiles]\nmax_event_attempts = 100\n[supervision]\nmax_restarts = 2\nbackoff_initial_ms = 5\nbackoff_max_ms = 20\n";
    let mut demo = DemoServer::start(
        None,
        extra,
        SystemOptions { fault: Some(Arc::new(AlwaysPoison)), ..SystemOptions::default() },
    )
    .await
    .unwrap();
    let c = demo.client.clone();
    // Three students live when it happens.
    for s in ["ann", "bea", "cem"] {
        assert_eq!(
            c.segment(true, "track", &track(&format!("{s}-0"), s, "Lesson Completed", 1)).await.unwrap().status,
            200
        );
    }
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    assert_eq!(demo.cohort.ctx.metrics.profile_actors_live.get(), 3);
    assert_eq!(c.segment(true, "track", &track("e-0", "eve", "Poison", 1)).await.unwrap().status, 200);
    tokio::time::timeout(Duration::from_secs(20), demo.cohort.wait_root()).await.expect("root supervisor stops");
    // Every directory that escalated uncounted its actors: none is running.
    assert_eq!(demo.cohort.ctx.metrics.profile_actors_live.get(), 0);
    let ready = c.get("/health/ready").await.unwrap();
    assert_eq!(ready.status, 503);
    let sup = c.get("/v1/supervisors").await.unwrap();
    let pipeline = sup.body["children"]
        .as_array()
        .unwrap()
        .iter()
        .find(|ch| ch["path"] == json!("root/pipeline"))
        .unwrap()
        .clone();
    assert_eq!(pipeline["status"], json!("failed"), "{}", sup.body);
    let m = c.get("/metrics").await.unwrap();
    let text = m.body.as_str().unwrap();
    assert!(text.contains("cohort_actor_escalations_total{kind=\"profile\"}"), "{text}");
    assert!(text.contains("cohort_actor_escalations_total{kind=\"supervisor\"} 1"), "{text}");
    // The accepted event is still in the journal: nothing acknowledged was dropped.
    demo.stop().await.unwrap();
}
