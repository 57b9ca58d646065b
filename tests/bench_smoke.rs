//! The benchmark harness must keep working: a `--quick` run completes, every accepted event is
//! applied, and the report has every figure. (Speed is judged by the benchmark, not here.)

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

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
    assert!(report["profile_api"]["ok"].as_u64().unwrap() > 0);
    assert_eq!(report["profile_api"]["errors"], 0, "{}", report["profile_api"]);
    let targets = report["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 3);
    for t in targets {
        assert!(t["measured"].is_string() && t["pass"].is_boolean(), "{t}");
        // a quick run is not comparable with the targets' conditions
        assert_eq!(t["comparable"], false, "{t}");
    }
    assert!(report["machine"]["at_start"]["nproc"].as_u64().unwrap() >= 1);
}
