//! The benchmark harness must keep working: a `--quick` run completes, every accepted event is
//! applied, and the report has every figure. (Speed is judged by the benchmark, not here.)

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use serde_json::Value;
use std::process::Command;

#[test]
fn quick_benchmark_run_reports_every_figure() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench.json");
    let run = Command::new(env!("CARGO_BIN_EXE_cohort-bench"))
        // A debug build answers the Profile API far slower than a release build: offer it a rate
        // it keeps up with, since this checks the harness, not the speed.
        .args(["--quick", "--quiet", "--profile-rps", "400", "--out"])
        .arg(&out)
        .env("COHORT__TELEMETRY__LOG_FILTER", "warn")
        .output()
        .unwrap();
    assert!(run.status.success(), "{}\n{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    let report: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let ingest = &report["ingest"];
    assert!(ingest["accepted"].as_u64().unwrap() > 0);
    assert_eq!(ingest["accepted"], ingest["applied"], "every accepted event must reach its profile");
    assert_eq!(ingest["errors"], 0, "{}", ingest);
    // Every request body was rendered before the clock started.
    assert!(ingest["prepared"]["body_bytes"].as_u64().is_some_and(|b| b > 10_000 * 100), "{ingest}");
    assert!(ingest["prepared"]["seconds"].as_f64().is_some_and(|s| s > 0.0), "{ingest}");
    // Where the event-to-profile time goes: every applied event passed each earlier stage.
    let stages = ingest["stages"].as_object().unwrap();
    assert_eq!(stages.keys().collect::<Vec<_>>(), cohort_supervisors::PIPELINE_STAGES, "{ingest}");
    let mut mean_before = 0.0;
    for stage in cohort_supervisors::PIPELINE_STAGES {
        assert_eq!(stages[stage]["observations"], ingest["event_to_profile"]["observations"], "{stage}: {ingest}");
        let mean = stages[stage]["mean_ms"].as_f64().unwrap();
        assert!(mean >= mean_before, "{stage} comes before an earlier stage: {ingest}");
        mean_before = mean;
    }
    assert!(report["profile_api"]["ok"].as_u64().unwrap() > 0);
    assert_eq!(report["profile_api"]["errors"], 0, "{}", report["profile_api"]);
    // Phase 2 starts once the warehouse has caught up with phase 1 (embedded defaults have one).
    let tail = &report["warehouse_tail"];
    assert!(tail["seconds"].as_f64().is_some_and(|s| s >= 0.0) && tail["outbox_entries_waiting"].is_u64(), "{tail}");
    // ...and once the process has gone quiet (two calm 200 ms windows at least).
    assert!(tail["quiet_after_seconds"].as_f64().is_some_and(|s| (0.4..=10.5).contains(&s)), "{tail}");
    assert!(tail["quiet_reached"].is_boolean(), "{tail}");
    assert_eq!(report["config"]["profile_concurrency"], 64);
    assert!(
        report["profile_api"]["cpu_us_per_request"].as_f64().is_some_and(|us| us > 0.0),
        "{}",
        report["profile_api"]
    );
    let targets = report["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 3);
    for t in targets {
        assert!(t["measured"].is_string() && t["pass"].is_boolean(), "{t}");
        // a quick run is not comparable with the targets' conditions
        assert_eq!(t["comparable"], false, "{t}");
    }
    assert!(report["machine"]["at_start"]["nproc"].as_u64().unwrap() >= 1);
}

/// Against a running Cohort (`--url`), phase 2 also waits for the server's warehouse to catch
/// up: a Silver row for every applied event, read from its counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_against_a_running_cohort_waits_for_its_warehouse_before_the_profile_api_phase() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let _server = common::spawn_cohort(
        &[],
        &[
            ("COHORT__STORAGE__URL", format!("embedded://{}", dir.path().join("cohort.redb").display())),
            ("COHORT__SERVER__INGEST_REQUESTS_PER_SECOND", "0".into()),
            ("COHORT__SERVER__API_REQUESTS_PER_SECOND", "0".into()),
        ],
        port,
    );
    let config = cohort_config::Config::from_toml_str("").unwrap();
    let client = cohort::client::CohortClient::new(format!("http://127.0.0.1:{port}"), &config).unwrap();
    common::wait_ready(&client).await;
    let out = dir.path().join("bench.json");
    let run = Command::new(env!("CARGO_BIN_EXE_cohort-bench"))
        .args(["--url", &format!("http://127.0.0.1:{port}"), "--quick", "--quiet", "--profile-rps", "400", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}\n{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    let report: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(report["ingest"]["accepted"], report["ingest"]["applied"], "{}", report["ingest"]);
    let tail = &report["warehouse_tail"];
    assert!(tail["seconds"].as_f64().is_some_and(|s| s >= 0.0) && tail["outbox_entries_waiting"].is_u64(), "{tail}");
    assert!(tail["quiet_after_seconds"].is_null(), "another process's CPU is not watched: {tail}");
    assert_eq!(report["profile_api"]["errors"], 0, "{}", report["profile_api"]);
    // Phase 2 began with every applied event in Silver (this server wrote nothing before).
    let scraped = client.get("/metrics").await.unwrap();
    let text = scraped.body.as_str().unwrap_or_default();
    let silver = common::series_value(text, "cohort_warehouse_rows_written_total{layer=\"silver\"}");
    assert_eq!(silver, report["ingest"]["applied"].as_f64().unwrap(), "{text}");
}

/// Issue 3's Kafka mode: one run reports both modes, the same broker's raw rate and the ratios,
/// prints the comparison with its CPU split, and leaves no database of its own behind.
#[test]
fn kafka_mode_comparison_reports_both_modes_and_the_raw_broker_and_cleans_up() {
    let (kafka, mongodb) = (common::service("COHORT_BENCH_KAFKA"), common::service("COHORT_TEST_MONGODB"));
    let bench_databases = || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let client = mongodb::Client::with_uri_str(&mongodb).await.unwrap();
            let names = client.list_database_names().await.unwrap();
            names.into_iter().filter(|n| n.starts_with("bench_")).collect::<std::collections::BTreeSet<_>>()
        })
    };
    let before = bench_databases();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench.json");
    let events = 600;
    let run = Command::new(env!("CARGO_BIN_EXE_cohort-bench"))
        .args(["--quiet", "--events", &events.to_string(), "--students", "100", "--compare-kafka", &kafka])
        .args(["--compare-mongodb", &mongodb, "--out"])
        .arg(&out)
        .env("COHORT__TELEMETRY__LOG_FILTER", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    for line in ["Kafka mode / embedded mode:", "Kafka mode / raw broker produce+consume:", "raw broker, same harness"]
    {
        assert!(stdout.contains(line), "`{line}` missing from:\n{stdout}");
    }
    assert!(stdout.contains("CPU of Cohort and the generator per event"), "{stdout}");

    let report: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(report["mode"], "kafka-compare");
    for mode in ["embedded", "kafka_mongodb"] {
        let m = &report[mode];
        assert_eq!(m["applied"], events, "every event applied in {mode}: {m}");
        assert!(m["events_per_sec"].as_f64().unwrap() > 0.0, "{m}");
        assert!(m["e2p_p99_ms"].as_f64().is_some(), "{m}");
        assert!(m["cpu"]["wall_seconds"].as_f64().unwrap() > 0.0, "{m}");
    }
    let raw = &report["raw_broker"];
    assert!(raw["produce_per_sec"].as_f64().unwrap() > 0.0 && raw["produce_consume_per_sec"].as_f64().unwrap() > 0.0);
    let rate = |m: &str| report[m]["events_per_sec"].as_f64().unwrap();
    let ratio = report["ratio_kafka_to_embedded"].as_f64().unwrap();
    assert!((ratio - rate("kafka_mongodb") / rate("embedded")).abs() < 1e-9, "{report}");
    let vs_raw = report["ratio_kafka_to_raw_broker"].as_f64().unwrap();
    assert!((vs_raw - rate("kafka_mongodb") / raw["produce_consume_per_sec"].as_f64().unwrap()).abs() < 1e-9);

    assert_eq!(bench_databases(), before, "the run dropped its own MongoDB database");
}
