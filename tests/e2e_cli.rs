//! The operator commands of the `cohort` binary against a running Cohort: GDPR deletion with
//! `--wait`, status and export, dead letters, segments and jobs; errors fail the command.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use cohort::demo::{play_slide_18, DemoServer};
use cohort::SystemOptions;
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

/// Runs `cohort ARGS --url BASE` and returns (success, stdout as JSON or text, stderr).
fn cohort(base: &str, args: &[&str]) -> (bool, Value, String) {
    let (group, rest) = args.split_at(1);
    let out = Command::new(env!("CARGO_BIN_EXE_cohort"))
        .args(group)
        .args(["--url", base, "--token", "dev-api-token"])
        .args(rest)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let value = serde_json::from_str(&stdout).unwrap_or(Value::String(stdout));
    (out.status.success(), value, String::from_utf8_lossy(&out.stderr).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_run_gdpr_dlq_segment_and_job_commands_against_a_running_cohort() {
    let extra = "[[segments.define]]\nname = \"known\"\nrule = 'has(\"email\")'\n";
    let demo = DemoServer::start(None, extra, SystemOptions::default()).await.unwrap();
    play_slide_18(&demo.client).await.unwrap();
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let base = demo.base.clone();

    let run = |args: Vec<&'static str>| {
        let base = base.clone();
        tokio::task::spawn_blocking(move || cohort(&base, &args))
    };
    let (ok, segments, err) = run(vec!["segments", "list"]).await.unwrap();
    assert!(ok, "{err}");
    assert!(segments.to_string().contains("known"), "{segments}");
    let (ok, _, err) = run(vec!["segments", "members", "known"]).await.unwrap();
    assert!(ok, "{err}");
    let (ok, dlq, err) = run(vec!["dlq", "list", "--limit", "10"]).await.unwrap();
    assert!(ok && dlq.is_object(), "{err} {dlq}");
    let (ok, jobs, err) = run(vec!["jobs", "list"]).await.unwrap();
    assert!(ok, "{err}");
    assert!(jobs["jobs"].to_string().contains("gold_reconcile"), "{jobs}");

    let (ok, export, err) = run(vec!["gdpr", "export", "email:max@gmail.com"]).await.unwrap();
    assert!(ok, "{err}");
    assert!(export["profile"]["profile_id"].is_string(), "{export}");
    let (ok, done, err) =
        run(vec!["gdpr", "delete", "email:max@gmail.com", "--requested-by", "dpo-cli", "--wait"]).await.unwrap();
    assert!(ok, "{err}");
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["requested_by"], "dpo-cli");
    let id = done["id"].as_str().unwrap().to_string();
    let base2 = base.clone();
    let (ok, status, err) =
        tokio::task::spawn_blocking(move || cohort(&base2, &["gdpr", "status", &id])).await.unwrap();
    assert!(ok, "{err}");
    assert_eq!(status["status"], "completed");

    // Errors: the person is gone now; an unknown deletion; a wrong token.
    let (ok, _, err) = run(vec!["gdpr", "export", "email:max@gmail.com"]).await.unwrap();
    assert!(!ok && err.contains("404"), "{err}");
    let (ok, _, err) = run(vec!["gdpr", "status", "del_nothing"]).await.unwrap();
    assert!(!ok && err.contains("404"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_cohort"))
        .args(["jobs", "--url", &base, "--token", "wrong-token-123", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"), "{}", String::from_utf8_lossy(&out.stderr));
    demo.stop().await.unwrap();
}
