//! Process-level tests: the real `cohort` binary, killed with SIGKILL under load and restarted,
//! must reflect every acknowledged event exactly once; and the CSV importer CLI.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use cohort::client::CohortClient;
use cohort_config::Config;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{assert_exactly_once, free_port, load_then_kill, spawn_cohort, wait_ready};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_event_and_counts_none_twice() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = Config::from_toml_str("").unwrap();
    let c = CohortClient::new(format!("http://127.0.0.1:{port}"), &config).unwrap();
    let mut proc = spawn_cohort(
        &[],
        &[("COHORT__STORAGE__URL", format!("embedded://{}", dir.path().join("cohort.redb").display()))],
        port,
    );
    wait_ready(&c).await;

    const STUDENTS: usize = 20;
    let load = load_then_kill(&c, &mut proc, STUDENTS, 40, "student").await;

    // Restart on the same data and wait for the pipeline to replay the journal.
    let _proc = spawn_cohort(
        &[],
        &[("COHORT__STORAGE__URL", format!("embedded://{}", dir.path().join("cohort.redb").display()))],
        port,
    );
    wait_ready(&c).await;
    // Every acknowledged event sent again is a duplicate, also those acknowledged in the last
    // moments before the kill, whose ids the journal's writer had not yet written to its
    // idempotency table (it reads them back from the journal at start).
    for id in &load.acked {
        let mid = id.strip_prefix("mobile:").unwrap();
        let (user, _) = mid.rsplit_once('-').unwrap();
        let ev = cohort::payloads::segment_track(mid, user, "Lesson Completed", json!({}), chrono::Utc::now());
        let again = c.segment(true, "track", &ev).await.unwrap();
        assert_eq!((again.status.as_u16(), again.body["duplicates"].as_u64()), (200, Some(1)), "{id}: {}", again.body);
    }
    assert_exactly_once(&c, STUDENTS, "student", &load).await;
}

/// `server.transparent_huge_pages`: off by default for the whole process, on when asked for.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_huge_pages_are_off_unless_configured() {
    let thp_enabled = |pid: u32| -> String {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status.lines().find_map(|l| l.strip_prefix("THP_enabled:")).map(|v| v.trim().to_string()).unwrap()
    };
    for (allowed, expected) in [(None, "0"), (Some("true"), "1")] {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let c = CohortClient::new(format!("http://127.0.0.1:{port}"), &Config::from_toml_str("").unwrap()).unwrap();
        let mut env =
            vec![("COHORT__STORAGE__URL", format!("embedded://{}", dir.path().join("cohort.redb").display()))];
        if let Some(v) = allowed {
            env.push(("COHORT__SERVER__TRANSPARENT_HUGE_PAGES", v.to_string()));
        }
        let proc = spawn_cohort(&[], &env, port);
        wait_ready(&c).await;
        assert_eq!(thp_enabled(proc.0.id()), expected, "server.transparent_huge_pages = {allowed:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_import_cli_streams_a_bulk_export_and_summarises() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = Config::from_toml_str("").unwrap();
    let c = CohortClient::new(format!("http://127.0.0.1:{port}"), &config).unwrap();
    let _proc = spawn_cohort(
        &[],
        &[("COHORT__STORAGE__URL", format!("embedded://{}", dir.path().join("cohort.redb").display()))],
        port,
    );
    wait_ready(&c).await;
    // A Bulk API 2.0 export with semicolons and CRLF, one bad row (empty Id).
    let csv_path = dir.path().join("contacts.csv");
    let mut csv = String::from("Id;FirstName;LastName;Email;Phone;HasOptedOutOfEmail;LastModifiedDate\r\n");
    for i in 0..2500 {
        csv.push_str(&format!(
            "003Dp{i:08}AAA;Lena;Schmidt{i};lena.schmidt{i}@uni-example.de;+49 30 1234{i:04};false;2026-11-01T10:00:00.000Z\r\n"
        ));
    }
    csv.push_str(";Nobody;Missing;nobody@example.de;;false;2026-11-01T10:00:00.000Z\r\n");
    std::fs::write(&csv_path, csv).unwrap();
    let run = |path: &Path| {
        Command::new(env!("CARGO_BIN_EXE_cohort"))
            .args(["import", "salesforce-contacts"])
            .arg(path)
            .args(["--url", &c.base, "--chunk-rows", "700", "--quiet"])
            .output()
            .unwrap()
    };
    let out = run(&csv_path);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["rows"], json!(2501));
    assert_eq!(summary["accepted"], json!(2500));
    assert_eq!(summary["rejected"], json!(1));
    assert_eq!(summary["requests"], json!(4));
    // importing the same export again is idempotent
    let again: Value = serde_json::from_slice(&run(&csv_path).stdout).unwrap();
    assert_eq!(again["accepted"], json!(0));
    assert_eq!(again["duplicates"], json!(2500));
    assert_eq!(again["suppressed"], json!(0));
    // A file with no row Cohort takes (no `Id` column) is a failed import, not a quiet success.
    let no_ids = dir.path().join("no-ids.csv");
    std::fs::write(&no_ids, "FirstName;Email\r\nLena;lena@uni-example.de\r\n").unwrap();
    let out = run(&no_ids);
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stderr).contains("every row was rejected"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let p = c.get("/v1/profiles/email:lena.schmidt2499@uni-example.de").await.unwrap();
        if p.status == 200 {
            assert_eq!(p.body["traits"]["last_name"]["value"], json!("Schmidt2499"));
            assert!(p.body["identifiers"].as_array().unwrap().iter().any(|i| i["kind"] == json!("salesforce_id")));
            break;
        }
        assert!(Instant::now() < deadline, "imported contact never appeared: {}", p.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn config_check_names_the_bad_key_and_accepts_a_good_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[identity]\nshards = 8\n[server]\nlisten = \"0.0.0.0:9000\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cohort")).args(["config", "check"]).arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[profiles]\nhistory_limit = -3\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cohort")).args(["config", "check"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("profiles.history_limit"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // normalizer options are checked too
    let bad_region = dir.path().join("region.toml");
    std::fs::write(&bad_region, "[normalize]\ndefault_region = \"XX\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cohort")).args(["config", "check"]).arg(&bad_region).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("normalize.default_region"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // and every other check `serve` makes before it opens anything, each naming its key
    for (toml, key) in [
        ("[jobs]\nfeatures = \"nightly\"\n", "jobs.features"),
        ("[identity.max_values_per_profile]\nemial = 1\n", "identity.max_values_per_profile.emial"),
        ("[identity]\nblocked = [\"email:not-an-address\"]\n", "identity.blocked"),
        ("[[segments.define]]\nname = \"s\"\nrule = \"page_count(\"\n", "segments.define[0]"),
        ("[sources.email]\nsendgrid_public_key = \"nope\"\n", "sources.email.sendgrid_public_key"),
    ] {
        let file = dir.path().join("more.toml");
        std::fs::write(&file, toml).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_cohort")).args(["config", "check"]).arg(&file).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{toml}: {stderr}");
        assert!(stderr.contains(key), "{toml}: {stderr}");
    }
    // a Salesforce field map given through the environment stops `serve` (its names would be
    // lower-cased and match no column)
    let out = Command::new(env!("CARGO_BIN_EXE_cohort"))
        .arg("serve")
        .env("COHORT__NORMALIZE__SALESFORCE_FIELDS__HASOPTEDOUTOFEMAIL", "x")
        .env("COHORT__STORAGE__URL", "memory://")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("normalize.salesforce_fields"));
    // the same error stops `serve` before it binds anything
    let out = Command::new(env!("CARGO_BIN_EXE_cohort"))
        .arg("serve")
        .env("COHORT__IDENTITY__SHARDS", "0")
        .env("COHORT__STORAGE__URL", "memory://")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("identity.shards"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn demo_command_prints_one_profile_from_five_sources() {
    let out = Command::new(env!("CARGO_BIN_EXE_cohort"))
        .arg("demo")
        .env("COHORT__TELEMETRY__LOG_FILTER", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("One profile: \"prof_"), "{stdout}");
    for kind in ["anonymous_id", "email", "user_id", "device_id", "salesforce_id", "phone", "whatsapp_id"] {
        assert!(stdout.contains(kind), "{kind} missing:\n{stdout}");
    }
    for source in ["\"web\"", "\"mobile\"", "\"crm\"", "\"email\"", "\"whatsapp\""] {
        assert!(stdout.contains(source), "{source} missing:\n{stdout}");
    }
}
