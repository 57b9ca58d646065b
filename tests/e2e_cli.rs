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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_made_by_the_cli_is_accepted_with_its_scope_and_only_that() {
    let bin = env!("CARGO_BIN_EXE_cohort");
    let out =
        Command::new(bin).args(["token", "new", "--name", "dashboards", "--scope", "profiles:read"]).output().unwrap();
    assert!(out.status.success());
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let entry = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(token.starts_with("cht_") && token.len() == 68, "{token}");
    assert!(!entry.contains(&token), "the entry must hold the digest, not the token");
    let entry = &entry[entry.find("[[tokens]]").unwrap()..];

    // `token hash` gives the digest the entry holds.
    let mut hash = Command::new(bin)
        .args(["token", "hash"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut hash.stdin.take().unwrap(), format!("{token}\n").as_bytes()).unwrap();
    let digest = String::from_utf8_lossy(&hash.wait_with_output().unwrap().stdout).trim().to_string();
    assert!(entry.contains(&format!("sha256 = \"{digest}\"")), "{entry}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.toml");
    std::fs::write(&file, entry).unwrap();
    let extra = format!("[auth]\ntokens_file = \"{}\"\n", file.display());
    let demo = DemoServer::start(None, &extra, SystemOptions::default()).await.unwrap();
    let get = |path: &str| demo.client.http.get(format!("{}{path}", demo.base)).bearer_auth(&token).send();
    assert_eq!(get("/v1/profiles/stats").await.unwrap().status(), 200);
    assert_eq!(get("/v1/dlq").await.unwrap().status(), 403);
    demo.stop().await.unwrap();

    let bad = Command::new(bin).args(["token", "new", "--name", "x", "--scope", "profiles:write"]).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown scope `profiles:write`"));
}

/// The binary finds DuckDB's library beside itself (its rpath `$ORIGIN/duckdb`), not through the
/// library path `cargo test` sets: run as a user runs `target/release/cohort`, the loader finds
/// `libduckdb.so` (or the process fails before `main`).
#[test]
fn the_binary_finds_the_duckdb_library_without_a_library_path() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cohort.toml");
    std::fs::write(&config, format!("[warehouse]\nurl = \"duckdb://{}\"\n", dir.path().join("wh.duckdb").display()))
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cohort"))
        .args(["config", "check"])
        .arg(&config)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
