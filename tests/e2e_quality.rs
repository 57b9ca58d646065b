//! Quality gates 1–4 on embedded defaults: Gate 1 turns out-of-bounds events into dead letters
//! (replayed once the bound is fixed), Gates 2–3 gate the Silver → Gold batch and raise the
//! alert metric, every run is stored and shown by the API and `cohort quality report`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use chrono::{Duration as ChronoDuration, Utc};
use cohort::demo::{play_slide_18, DemoServer};
use cohort::payloads;
use cohort::SystemOptions;
use cohort_adapters::warehouse::format_timestamp;
use cohort_adapters::{DuckDbWarehouse, Layer, QueryValue, Warehouse};
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

fn gauge(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0)
}

async fn metrics(demo: &DemoServer) -> String {
    demo.client.get("/metrics").await.unwrap().body.as_str().unwrap().to_string()
}

async fn run_gold(demo: &DemoServer) -> Value {
    let r = demo.client.post("/v1/jobs/gold_reconcile/run", &json!(null)).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

fn result<'a>(run: &'a Value, expectation: &str, column: &str) -> &'a Value {
    run["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["expectation"] == expectation && r["column"] == column)
        .unwrap_or_else(|| panic!("no {expectation}({column}) in {run}"))
}

/// `cohort quality report` against the server: (success, stdout, stderr).
fn quality_report(base: &str, extra: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cohort"))
        .args(["quality", "--url", base, "--token", "dev-api-token", "report"])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_gate_2_fails_the_gold_batch_raises_the_alert_and_is_reported_until_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let demo = DemoServer::start(Some(dir.path().to_path_buf()), "", SystemOptions::default()).await.unwrap();
    play_slide_18(&demo.client).await.unwrap();
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    demo.cohort.relay_warehouse().await.unwrap();

    // A clean pipeline passes every gate and the batch succeeds.
    let run = run_gold(&demo).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["detail"]["quality_runs"].as_array().unwrap().len(), 3, "{run}");
    let runs = demo.client.get("/v1/quality/runs").await.unwrap().body;
    assert_eq!(runs["failing_gates"], json!([]), "{runs}");
    let gates: Vec<&str> = runs["runs"].as_array().unwrap().iter().map(|r| r["gate"].as_str().unwrap()).collect();
    for g in ["ingestion", "bronze_to_silver", "silver_to_gold"] {
        assert!(gates.contains(&g), "{g} missing: {gates:?}");
    }
    let gate2 = runs["runs"].as_array().unwrap().iter().find(|r| r["gate"] == "bronze_to_silver").unwrap();
    assert_eq!(gate2["evaluated"], 6, "slide 18's six Silver rows: {gate2}");
    let gate3 = runs["runs"].as_array().unwrap().iter().find(|r| r["gate"] == "silver_to_gold").unwrap();
    let completeness = result(gate3, "expect_profile_completeness_mean_to_be_at_least", "traits");
    assert!(completeness["observed"]["mean"].as_f64().unwrap() >= 0.6, "{completeness}");

    // A bad row reaches Silver: unknown profile, a Bronze row that does not exist, traits that
    // are not an object, a timestamp two days after receipt. And Gold loses Max's snapshot.
    let analyst = DuckDbWarehouse::open(&dir.path().join("cohort.warehouse.duckdb")).await.unwrap();
    let now = Utc::now();
    analyst
        .query(
            "INSERT INTO silver VALUES ('web:bogus-1', 'prof_000000000000aaaaaaaaaaaa', 'web', 'track', 'X', @occ, @rec, \
             '[]', '[\"not an object\"]', '{}', NULL, 999999)",
            &[
                ("occ".into(), QueryValue::String(format_timestamp(now + ChronoDuration::days(2)))),
                ("rec".into(), QueryValue::String(format_timestamp(now))),
            ],
        )
        .await
        .unwrap();
    analyst.query("DELETE FROM gold_profiles", &[]).await.unwrap();
    let gate1_runs = || async {
        let r = demo.client.get("/v1/quality/runs?gate=1&limit=100").await.unwrap().body;
        r["runs"].as_array().map_or(0, Vec::len)
    };
    let gate1_before = gate1_runs().await;

    let run = run_gold(&demo).await;
    assert_eq!(run["status"], "failed", "{run}");
    // Gate 1's summary still runs: a bad rollout that floods the letters fails Gate 2 too.
    assert_eq!(gate1_runs().await, gate1_before + 1);
    let error = run["error"].as_str().unwrap();
    assert!(error.contains("quality gate 2 failed") && error.contains("Gold not rebuilt"), "{error}");
    assert_eq!(analyst.count_rows(Layer::Gold).await.unwrap(), 0, "the failed batch left Gold alone");
    assert_eq!(gauge(&metrics(&demo).await, "cohort_quality_gate_failing{gate=\"2\"}"), 1.0);

    let failed = demo.client.get("/v1/quality/runs?gate=2").await.unwrap().body;
    assert_eq!(failed["failing_gates"], json!([2]), "{failed}");
    let latest = &failed["runs"][0];
    assert_eq!(latest["success"], false);
    assert_eq!(latest["action"], "the batch fails and cohort_quality_gate_failing alerts");
    for (expectation, column) in [
        ("expect_column_values_to_exist_in_store", "profile_id"),
        ("expect_column_values_to_exist_in_bronze", "raw_seq"),
        ("expect_column_values_to_be_of_type", "traits"),
        ("expect_column_values_to_be_between", "occurred_at"),
    ] {
        let r = result(latest, expectation, column);
        assert_eq!(r["success"], false, "{r}");
        assert_eq!(r["unexpected_count"], 1, "{r}");
        assert_eq!(r["unexpected_sample"], json!(["web:bogus-1"]), "{r}");
    }
    assert_eq!(result(latest, "expect_column_values_to_not_be_null", "event_id")["success"], true);
    let one = demo.client.get(&format!("/v1/quality/runs/{}", latest["id"].as_str().unwrap())).await.unwrap();
    assert_eq!(one.status, 200);
    assert_eq!(one.body["id"], latest["id"]);
    assert_eq!(demo.client.get("/v1/quality/runs/quality:nope").await.unwrap().status, 404);

    // The CLI report names the failure and fails; its HTML report shows the failing rows.
    let base = demo.base.clone();
    let html = dir.path().join("report.html");
    let html_arg = html.to_str().unwrap().to_string();
    let (ok, table, err) =
        tokio::task::spawn_blocking(move || quality_report(&base, &["--html", &html_arg])).await.unwrap();
    assert!(!ok, "a failing gate fails the command");
    assert!(err.contains("failing gates: [2]"), "{err}");
    assert!(
        table.contains("FAILED") && table.contains("expect_column_values_to_exist_in_store(profile_id): 1"),
        "{table}"
    );
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        page.contains("<html") && page.contains("web:bogus-1") && page.contains("expect_column_values_to_be_of_type")
    );
    let r = demo
        .client
        .http
        .get(format!("{}/v1/quality/report", demo.base))
        .bearer_auth("dev-api-token")
        .send()
        .await
        .unwrap();
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/html"));

    // Fixed: the next batch passes, rebuilds Gold and clears the alert.
    analyst.query("DELETE FROM silver WHERE event_id = 'web:bogus-1'", &[]).await.unwrap();
    let run = run_gold(&demo).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(analyst.count_rows(Layer::Gold).await.unwrap() > 0, "Gold rebuilt");
    assert_eq!(gauge(&metrics(&demo).await, "cohort_quality_gate_failing{gate=\"2\"}"), 0.0);
    let base = demo.base.clone();
    let (ok, table, err) = tokio::task::spawn_blocking(move || quality_report(&base, &["--gate", "2"])).await.unwrap();
    assert!(ok, "{err}");
    assert!(table.lines().nth(1).unwrap().contains("passed"), "newest first: {table}");
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_3_fails_the_batch_on_orphan_gold_records_and_low_completeness() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "[quality.gate3]\nmin_completeness = 0.99\n";
    let demo = DemoServer::start(Some(dir.path().to_path_buf()), extra, SystemOptions::default()).await.unwrap();
    play_slide_18(&demo.client).await.unwrap();
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    demo.cohort.relay_warehouse().await.unwrap();
    let analyst = DuckDbWarehouse::open(&dir.path().join("cohort.warehouse.duckdb")).await.unwrap();
    analyst
        .query(
            "INSERT INTO gold_profiles VALUES ('prof_000000000000bbbbbbbbbbbb', @at, '{}', '{}', '[]', 0, NULL, NULL, NULL)",
            &[("at".into(), QueryValue::String(format_timestamp(Utc::now())))],
        )
        .await
        .unwrap();

    let run = run_gold(&demo).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert!(run["error"].as_str().unwrap().contains("quality gate 3 failed"), "{run}");
    assert_eq!(gauge(&metrics(&demo).await, "cohort_quality_gate_failing{gate=\"3\"}"), 1.0);
    let runs = demo.client.get("/v1/quality/runs?gate=3").await.unwrap().body;
    let latest = &runs["runs"][0];
    let orphans = result(latest, "expect_gold_profiles_to_exist_in_store", "profile_id");
    assert_eq!(orphans["success"], false);
    assert_eq!(orphans["unexpected_sample"], json!(["prof_000000000000bbbbbbbbbbbb"]));
    let completeness = result(latest, "expect_profile_completeness_mean_to_be_at_least", "traits");
    assert_eq!(completeness["success"], false, "slide 18's Max has no programme_interest trait: {completeness}");
    assert_eq!(completeness["expected"]["min"], 0.99);
    // Gate 2 passed: the batch got as far as Gold.
    let gate2 = demo.client.get("/v1/quality/runs?gate=2").await.unwrap().body;
    assert_eq!(gate2["runs"][0]["success"], true, "{gate2}");
    demo.stop().await.unwrap();
}

/// A CSV import sent without a CSV content type (curl's default) is dead-lettered as CSV, so its
/// replay reads it as CSV once the cause is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csv_import_sent_as_a_form_is_replayed_as_csv() {
    let dir = tempfile::tempdir().unwrap();
    let strict = "[quality.gate1]\nmax_future_secs = 60\n";
    let demo = DemoServer::start(Some(dir.path().to_path_buf()), strict, SystemOptions::default()).await.unwrap();
    let ahead = (Utc::now() + ChronoDuration::hours(2)).format("%Y-%m-%dT%H:%M:%S.000Z");
    let now = Utc::now().format("%Y-%m-%dT%H:%M:%S.000Z");
    let csv = format!(
        "Id,Email,LastModifiedDate\n003000000000001AAA,csv-one@example.org,{now}\n003000000000002AAA,csv-two@example.org,{ahead}\n"
    );
    let c = &demo.client;
    let r = c
        .http
        .post(format!("{}/v1/import/salesforce/contacts", c.base))
        .bearer_auth(&c.crm_token)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(csv)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let dlq = c.get("/v1/dlq").await.unwrap().body;
    assert_eq!(dlq["total"], 1, "{dlq}");
    demo.stop().await.unwrap();

    let demo = DemoServer::start(Some(dir.path().to_path_buf()), "", SystemOptions::default()).await.unwrap();
    let again = demo.client.post("/v1/dlq/replay", &json!({})).await.unwrap();
    assert_eq!((again.body["replayed"].as_u64(), again.body["kept"].as_u64()), (Some(1), Some(0)), "{}", again.body);
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let p = demo.client.get("/v1/profiles/email:csv-two@example.org").await.unwrap();
    assert_eq!(p.status, 200, "{}", p.body);
    demo.stop().await.unwrap();
}

/// A batch whose many refused events would each store a copy of it gets one letter for all of
/// them: it counts every refusal at Gate 1, stays while a replay refuses any again, and goes
/// once a replay brings them all in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_many_refused_events_is_dead_lettered_once_and_replayed_whole() {
    let dir = tempfile::tempdir().unwrap();
    let strict = "[quality.gate1]\nmax_future_secs = 60\n";
    let demo = DemoServer::start(Some(dir.path().to_path_buf()), strict, SystemOptions::default()).await.unwrap();
    let ahead = Utc::now() + ChronoDuration::hours(2);
    let mut batch = vec![payloads::segment_track("many-ok", "many-student", "Course Viewed", json!({}), Utc::now())];
    batch.extend(
        (0..300)
            .map(|i| payloads::segment_track(&format!("many-{i}"), "many-student", "Quiz Started", json!({}), ahead)),
    );
    let body = json!({ "batch": batch });
    assert!(300 * body.to_string().len() > 1 << 20, "one letter each would hold over a MiB");
    let r = demo.client.segment(false, "batch", &body).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!((r.body["accepted"].as_u64(), r.body["rejected"].as_array().map(Vec::len)), (Some(1), Some(300)));
    let dlq = demo.client.get("/v1/dlq").await.unwrap().body;
    assert_eq!(dlq["total"], 1, "one letter for the payload: {dlq}");
    let reason = dlq["dead_letters"][0]["reason"].as_str().unwrap();
    assert!(reason.starts_with("300 rejections in this payload: ") && reason.contains("max_future_secs"), "{reason}");
    assert!(reason.ends_with("; and 280 more"), "{reason}");
    let text = demo.client.get("/metrics").await.unwrap().body;
    let text = text.as_str().unwrap();
    assert!(text.contains("cohort_dead_letters_total{stage=\"validation\"} 1"), "{text}");
    assert!(text.contains("cohort_ingest_events_rejected_total{reason=\"invalid\",source=\"web\"} 300"), "{text}");
    // Gate 1 counts the refusals the letter stands for, not the letter.
    let run = run_gold(&demo).await;
    let ids = run["detail"]["quality_runs"].as_array().unwrap();
    let id = ids.iter().filter_map(Value::as_str).find(|id| id.ends_with(":ingest"));
    let id = id.unwrap_or_else(|| panic!("no ingestion run in {run}"));
    let ingestion = demo.client.get(&format!("/v1/quality/runs/{id}")).await.unwrap().body;
    let observed = &ingestion["results"][0]["observed"];
    assert_eq!(observed["dead_letters"], 300, "{ingestion}");
    let by_reason = observed["by_reason"].as_object().unwrap();
    assert_eq!(by_reason.values().filter_map(Value::as_u64).sum::<u64>(), 300, "{observed}");
    assert!(by_reason.keys().all(|k| !k.starts_with("300 rejections")), "{observed}");

    // Elements that can never be read (a track call without its event) are refused again.
    let mut broken = vec![payloads::segment_track("many-ok-2", "many-student", "Course Viewed", json!({}), Utc::now())];
    broken
        .extend((0..300).map(|i| json!({ "type": "track", "userId": "many-student", "messageId": format!("b-{i}") })));
    let r = demo.client.segment(false, "batch", &json!({ "batch": broken })).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["accepted"], 1);
    let again = demo.client.post("/v1/dlq/replay", &json!({})).await.unwrap();
    assert_eq!((again.body["replayed"].as_u64(), again.body["kept"].as_u64()), (Some(0), Some(2)), "{}", again.body);
    assert!(again.body["results"].as_array().unwrap().iter().all(|r| r["outcome"] == "kept"), "{}", again.body);
    demo.stop().await.unwrap();

    let demo = DemoServer::start(Some(dir.path().to_path_buf()), "", SystemOptions::default()).await.unwrap();
    let again = demo.client.post("/v1/dlq/replay", &json!({})).await.unwrap();
    assert_eq!((again.body["replayed"].as_u64(), again.body["kept"].as_u64()), (Some(1), Some(1)), "{}", again.body);
    assert_eq!(demo.client.get("/v1/dlq").await.unwrap().body["total"], 1, "the unreadable elements' letter stays");
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let p = demo.client.get("/v1/profiles/user_id:many-student").await.unwrap();
    assert_eq!(p.body["counters"]["events_total"], 302, "each accepted event once, the replayed ones once each");
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_1_dead_letters_an_event_outside_its_bounds_and_replay_brings_it_in_once_the_bound_is_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let strict = "[quality.gate1]\nmax_future_secs = 60\n";
    let demo = DemoServer::start(Some(dir.path().to_path_buf()), strict, SystemOptions::default()).await.unwrap();
    let ahead = Utc::now() + ChronoDuration::hours(2);
    let good = payloads::segment_track("q-ok-1", "q-student", "Course Viewed", json!({}), Utc::now());
    let early = payloads::segment_track("q-early-1", "q-student", "Course Viewed", json!({}), ahead);
    let early2 = payloads::segment_track("q-early-2", "q-student", "Quiz Started", json!({}), ahead);
    let batch = json!({ "batch": [good, early, early2] });
    let r = demo.client.segment(false, "batch", &batch).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["accepted"], 1);
    let reason = r.body["rejected"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("gate 1") && reason.contains("max_future_secs"), "{reason}");
    let dlq = demo.client.get("/v1/dlq").await.unwrap().body;
    assert_eq!(dlq["total"], 2, "one letter per refused event: {dlq}");
    assert!(dlq["dead_letters"][0]["reason"].as_str().unwrap().contains("gate 1"));
    // Replaying with the bound unchanged refuses it again: the letter stays as it was, and no
    // new one is written (replaying twice changes nothing).
    let letter_id = dlq["dead_letters"][0]["id"].clone();
    for _ in 0..2 {
        let again = demo.client.post("/v1/dlq/replay", &json!({})).await.unwrap();
        assert_eq!(again.status, 200, "{}", again.body);
        assert_eq!(again.body["results"][0]["outcome"], "kept", "{}", again.body);
        assert_eq!((again.body["replayed"].as_u64(), again.body["kept"].as_u64()), (Some(0), Some(2)));
        assert_eq!(again.body["next_after"], Value::Null, "one page: paging ends");
        let now = demo.client.get("/v1/dlq").await.unwrap().body;
        assert_eq!(now["total"], 2);
        assert_eq!(now["dead_letters"][0]["id"], letter_id);
    }
    demo.stop().await.unwrap();

    // The operator widens the bound (the default) and replays from the command line.
    let demo = DemoServer::start(Some(dir.path().to_path_buf()), "", SystemOptions::default()).await.unwrap();
    let base = demo.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_cohort"))
            .args(["dlq", "--url", &base, "--token", "dev-api-token", "replay"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((summary["replayed"].as_u64(), summary["kept"].as_u64()), (Some(2), Some(0)), "{summary}");
    assert_eq!(demo.client.get("/v1/dlq").await.unwrap().body["total"], 0, "the replayed letter is removed");
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let p = demo.client.get("/v1/profiles/user_id:q-student").await.unwrap();
    assert_eq!(p.status, 200, "{}", p.body);
    assert_eq!(p.body["counters"]["events_total"], 3, "the accepted event once, the two replayed once each");
    // A letter that is gone is reported, not invented.
    let missing = demo.client.post("/v1/dlq/replay", &json!({ "ids": [424242] })).await.unwrap();
    assert_eq!(missing.body["not_found"], json!([424242]));
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_that_removes_a_shared_bronze_payload_does_not_fail_gate_2_for_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let demo = DemoServer::start(Some(dir.path().to_path_buf()), "", SystemOptions::default()).await.unwrap();
    // One SendGrid delivery about two students: one Bronze payload, two Silver rows.
    let at = Utc::now();
    let mut events = payloads::sendgrid_event("sg-shared-1", "leaving@example.edu", "open", at);
    let other = payloads::sendgrid_event("sg-shared-2", "staying@example.edu", "open", at);
    events.as_array_mut().unwrap().push(other[0].clone());
    let r = demo.client.sendgrid(&events).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    demo.cohort.relay_warehouse().await.unwrap();
    assert_eq!(run_gold(&demo).await["status"], "succeeded");

    let a = demo
        .client
        .post("/v1/gdpr/deletions", &json!({ "profile": "email:leaving@example.edu", "requested_by": "test" }))
        .await
        .unwrap();
    assert_eq!(a.status, 202, "{}", a.body);
    let url = format!("/v1/gdpr/deletions/{}", a.body["id"].as_str().unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while demo.client.get(&url).await.unwrap().body["status"] != "completed" {
        assert!(std::time::Instant::now() < deadline, "the deletion did not complete");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let analyst = DuckDbWarehouse::open(&dir.path().join("cohort.warehouse.duckdb")).await.unwrap();
    assert_eq!(analyst.count_rows(Layer::Bronze).await.unwrap(), 0, "the shared payload went with the person");
    assert_eq!(analyst.count_rows(Layer::Silver).await.unwrap(), 1, "the other student's row stays");

    let run = run_gold(&demo).await;
    assert_eq!(run["status"], "succeeded", "an erased payload is not a broken link: {run}");
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_unique_column_set_catches_an_event_stored_twice_under_two_ids() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "[quality.gate2]\nunique = [[\"event_id\"], [\"profile_id\", \"kind\", \"name\", \"occurred_at\"]]\n";
    let demo = DemoServer::start(Some(dir.path().to_path_buf()), extra, SystemOptions::default()).await.unwrap();
    play_slide_18(&demo.client).await.unwrap();
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    demo.cohort.relay_warehouse().await.unwrap();
    assert_eq!(run_gold(&demo).await["status"], "succeeded");

    // The same event again under another id (a source that re-sent it with a new message id).
    let analyst = DuckDbWarehouse::open(&dir.path().join("cohort.warehouse.duckdb")).await.unwrap();
    analyst
        .query(
            "INSERT INTO silver SELECT 'web:resent-1', profile_id, source, kind, name, occurred_at, received_at, \
             identifiers, traits, properties, utm, raw_seq FROM silver ORDER BY event_id LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(analyst.count_rows(Layer::Silver).await.unwrap(), 7, "slide 18's six rows and the copy");
    let run = run_gold(&demo).await;
    let runs = demo.client.get("/v1/quality/runs?gate=2").await.unwrap().body;
    assert_eq!(run["status"], "failed", "{run} {runs}");
    let latest = &runs["runs"][0];
    let dup = result(latest, "expect_compound_columns_to_be_unique", "profile_id,kind,name,occurred_at");
    assert_eq!((dup["success"].as_bool(), dup["unexpected_count"].as_u64()), (Some(false), Some(1)), "{dup}");
    assert_eq!(result(latest, "expect_compound_columns_to_be_unique", "event_id")["success"], true);
    demo.stop().await.unwrap();
}
