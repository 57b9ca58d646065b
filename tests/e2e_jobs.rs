//! Scheduled jobs: cron schedules inside Cohort, run history and failures in the API and the
//! metrics, and each occurrence run once when several replicas share a store.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;
#[path = "common/faulty_warehouse.rs"]
mod faulty_warehouse;

use cohort::client::CohortClient;
use cohort::demo::{play_slide_18, DemoServer};
use cohort::SystemOptions;
use common::series_value;
use faulty_warehouse::FaultyWarehouse;
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Every second, so a test sees several occurrences.
const EVERY_SECOND: &str = "[jobs]\ngold_reconcile = \"* * * * * *\"\nbatch_segments = \"\"\n";

async fn runs(c: &CohortClient, job: &str) -> Vec<Value> {
    let a = c.get(&format!("/v1/jobs/{job}/runs?limit=1000")).await.unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    a.body["runs"].as_array().unwrap().clone()
}

async fn metrics(c: &CohortClient) -> String {
    c.get("/metrics").await.unwrap().body.as_str().unwrap().to_string()
}

async fn wait_for_runs(c: &CohortClient, job: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let done: Vec<Value> = runs(c, job).await.into_iter().filter(|r| r["status"] != "running").collect();
        if done.len() >= n {
            return done;
        }
        assert!(Instant::now() < deadline, "only {} runs of {job}", done.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_job_runs_on_its_schedule_and_its_history_and_metrics_show_it() {
    let demo = DemoServer::start(None, EVERY_SECOND, SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    play_slide_18(c).await.unwrap();
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();

    let done = wait_for_runs(c, "gold_reconcile", 2).await;
    let dues: BTreeSet<&str> = done.iter().map(|r| r["due"].as_str().unwrap()).collect();
    assert_eq!(dues.len(), done.len(), "one run per occurrence");
    for r in &done {
        assert_eq!(r["status"], "succeeded", "{r}");
        assert!(r["detail"]["profiles_checked"].is_number(), "the run reports what it did: {r}");
        assert!(r["finished_at"].is_string() && r["owner"].is_string(), "{r}");
    }
    let jobs = c.get("/v1/jobs").await.unwrap().body;
    let job = jobs["jobs"].as_array().unwrap().iter().find(|j| j["name"] == "gold_reconcile").unwrap().clone();
    assert_eq!(job["schedule"], "* * * * * *");
    assert!(job["next_run"].is_string(), "{job}");
    assert!(jobs["jobs"].as_array().unwrap().iter().all(|j| j["name"] != "batch_segments"), "an empty schedule is off");
    let text = metrics(c).await;
    assert!(
        series_value(&text, "cohort_job_runs_total{job=\"gold_reconcile\",outcome=\"succeeded\"}") >= 2.0,
        "{text}"
    );
    assert!(series_value(&text, "cohort_job_last_success_timestamp_seconds{job=\"gold_reconcile\"}") > 1.7e9);

    // An operator runs it now; an unknown job is a 404.
    let now = c.post("/v1/jobs/gold_reconcile/run", &Value::Null).await.unwrap();
    assert_eq!(now.status, 200, "{}", now.body);
    assert_eq!(now.body["status"], "succeeded");
    assert_eq!(c.post("/v1/jobs/nightly_magic/run", &Value::Null).await.unwrap().status, 404);
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_job_is_recorded_with_its_error_and_counted() {
    let wrapper = FaultyWarehouse::wrapper(0, Some("warehouse quota exceeded"));
    let options = SystemOptions { warehouse_wrapper: Some(wrapper), ..SystemOptions::default() };
    let demo = DemoServer::start(None, EVERY_SECOND, options).await.unwrap();
    let c = &demo.client;
    play_slide_18(c).await.unwrap();
    let done = wait_for_runs(c, "gold_reconcile", 1).await;
    assert_eq!(done[0]["status"], "failed", "{}", done[0]);
    assert!(done[0]["error"].as_str().unwrap().contains("quota exceeded"), "{}", done[0]);
    let text = metrics(c).await;
    assert!(series_value(&text, "cohort_job_runs_total{job=\"gold_reconcile\",outcome=\"failed\"}") >= 1.0, "{text}");
    demo.stop().await.unwrap();
}

fn service(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run `scripts/services.sh start` and `source ~/.cache/cohort/run/env` (scripts/test.sh does both)")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_sharing_mongodb_run_each_occurrence_once() {
    let id = format!("jobs_{}_{}", std::process::id(), chrono::Utc::now().timestamp_micros());
    let config = format!(
        "[storage]\nurl = \"{}\"\ndatabase = \"{id}\"\n[bus]\nurl = \"kafka://{}\"\ntopic_prefix = \"{id}.\"\ngroup_id = \"{id}\"\nsession_timeout_ms = 6000\npartitions = 2\n\
         [warehouse]\nurl = \"bigquery://test-project/{id}?endpoint={}\"\n[gdpr]\nkey_url = \"file:{}\"\n{EVERY_SECOND}",
        service("COHORT_TEST_MONGODB"),
        service("COHORT_TEST_KAFKA"),
        service("COHORT_TEST_BIGQUERY"),
        std::env::temp_dir().join(format!("{id}.kek")).display(),
    );
    let a = DemoServer::start(None, &config, SystemOptions::default()).await.unwrap();
    let b = DemoServer::start(None, &config, SystemOptions::default()).await.unwrap();
    let done = wait_for_runs(&a.client, "gold_reconcile", 4).await;
    // Stop both before counting, so no occurrence is half-way.
    let (ta, tb) = (metrics(&a.client).await, metrics(&b.client).await);
    let all = runs(&a.client, "gold_reconcile").await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    let dues: BTreeSet<&str> = all.iter().map(|r| r["due"].as_str().unwrap()).collect();
    assert_eq!(dues.len(), all.len(), "an occurrence was run twice: {all:?}");
    let owners: BTreeSet<&str> = done.iter().map(|r| r["owner"].as_str().unwrap()).collect();
    let series = |outcome: &str| format!("cohort_job_runs_total{{job=\"gold_reconcile\",outcome=\"{outcome}\"}}");
    let elsewhere = series_value(&ta, &series("elsewhere")) + series_value(&tb, &series("elsewhere"));
    assert!(elsewhere >= 1.0, "neither replica ever found an occurrence taken by the other (owners {owners:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feature_job_snapshots_computed_traits_and_an_erasure_removes_them() {
    let demo = DemoServer::start(None, "", SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    play_slide_18(c).await.unwrap();
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let jobs = c.get("/v1/jobs").await.unwrap().body;
    assert!(jobs["jobs"].as_array().unwrap().iter().any(|j| j["name"] == "features"), "{jobs}");
    let none = c.get("/v1/profiles/email:max@gmail.com/features").await.unwrap();
    assert_eq!(none.status, 404, "no snapshot before the first run: {}", none.body);
    // A visitor on another device, then recognized as Max: a profile merged into his.
    let page = cohort::payloads::segment_page("feat-p", "anon-feat", "/programs/mba", chrono::Utc::now());
    assert_eq!(c.segment(false, "page", &page).await.unwrap().status, 200);
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let visitor =
        c.get("/v1/profiles/anonymous_id:anon-feat").await.unwrap().body["profile_id"].as_str().unwrap().to_string();
    let link = cohort::payloads::segment_identify(
        "feat-l",
        Some("anon-feat"),
        None,
        serde_json::json!({ "email": "max@gmail.com" }),
        None,
        chrono::Utc::now(),
    );
    assert_eq!(c.segment(false, "identify", &link).await.unwrap().status, 200);
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();

    let run = c.post("/v1/jobs/features/run", &Value::Null).await.unwrap();
    assert_eq!(run.status, 200, "{}", run.body);
    assert_eq!(run.body["status"], "succeeded", "{}", run.body);
    // Slide 18's anonymous visit and login may race into two records merged into one; the
    // merged-away record is counted but gets no snapshot.
    let store = &demo.cohort.ctx.store;
    let ids = store.list_profile_ids(None, 1000).await.unwrap();
    let records = store.load_profiles(&ids).await.unwrap();
    let live = records.iter().filter(|r| r.merged_into.is_none()).count();
    assert_eq!(run.body["detail"]["profiles"], Value::from(records.len()), "{}", run.body);
    assert_eq!(run.body["detail"]["written"], Value::from(live), "one snapshot per live profile: {}", run.body);
    assert_eq!(run.body["detail"]["merged_removed"], Value::from(records.len() - live), "{}", run.body);
    for merged in records.iter().filter(|r| r.merged_into.is_some()) {
        let doc = store.get_documents("profile_features", &[merged.profile_id.as_str().to_string()]).await.unwrap();
        assert_eq!(doc, vec![None], "a merged-away profile has no snapshot of its own");
    }

    let f = c.get("/v1/profiles/email:max@gmail.com/features").await.unwrap();
    assert_eq!(f.status, 200, "{}", f.body);
    let features = &f.body["features"];
    assert_eq!(features["funnel_stage"], "inquiry", "{features}");
    assert!(features["engagement_score"].as_f64().unwrap() > 0.0, "{features}");
    assert!(features["page_views_30d"].as_u64().unwrap() >= 1, "{features}");
    let id = f.body["profile_id"].as_str().unwrap().to_string();
    // The merged visitor's id answers with Max's snapshot, like every other profile route.
    let by_merged = c.get(&format!("/v1/profiles/{visitor}/features")).await.unwrap();
    assert_eq!(
        (by_merged.status.as_u16(), &by_merged.body["profile_id"]),
        (200, &Value::from(id.clone())),
        "{}",
        by_merged.body
    );

    // Erasure removes the snapshot in its feature_stores step.
    let a = c
        .post("/v1/gdpr/deletions", &serde_json::json!({ "profile": "email:max@gmail.com", "requested_by": "test" }))
        .await
        .unwrap();
    assert_eq!(a.status, 202, "{}", a.body);
    let url = format!("/v1/gdpr/deletions/{}", a.body["id"].as_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        let s = c.get(&url).await.unwrap().body;
        if s["status"] == "completed" {
            break s;
        }
        assert!(Instant::now() < deadline, "{s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let step = done["steps"].as_array().unwrap().iter().find(|s| s["step"] == "feature_stores").unwrap().clone();
    assert_eq!(step["status"], "done", "{step}");
    assert_eq!(step["detail"]["feature_snapshots"], 1, "{step}");
    let left = demo.cohort.ctx.store.get_documents("profile_features", &[id]).await.unwrap();
    assert_eq!(left, vec![None]);
    demo.stop().await.unwrap();
}
