//! The warehouse on embedded defaults: every payload reaches Bronze, every event Silver, every
//! profile Gold, through the outbox; analysts open the file with SQL; reconciliation finds and
//! repairs drift.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use cohort::demo::{fetch_profile, play_slide_18, DemoServer};
use cohort::SystemOptions;
use cohort_adapters::{DuckDbWarehouse, Layer, QueryValue, Warehouse};
use std::time::Duration;

/// These tests read personal data back from the warehouse, so they keep it raw; the default
/// (tokens and sealed Bronze) has its own test below.
const RAW: &str = "[warehouse]\npii = \"raw\"\n";

/// Cohort on embedded defaults in `dir` (warehouse rows raw), slide 18 played, settled and
/// relayed to the warehouse.
async fn slide_18_relayed(dir: &tempfile::TempDir) -> DemoServer {
    let demo = DemoServer::start(Some(dir.path().to_path_buf()), RAW, SystemOptions::default()).await.unwrap();
    play_slide_18(&demo.client).await.unwrap();
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let report = demo.cohort.relay_warehouse().await.unwrap().expect("a warehouse is configured by default");
    assert_eq!(report.remaining, 0, "{report:?}");
    demo
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slide_18_lands_in_bronze_silver_and_gold_and_reconciles() {
    let dir = tempfile::tempdir().unwrap();
    let demo = slide_18_relayed(&dir).await;
    let profile = fetch_profile(&demo.client, "email:max@gmail.com").await.unwrap();
    let survivor = profile["profile"]["profile_id"].as_str().unwrap().to_string();

    // The analyst's view: the file beside the store, opened on its own.
    let file = dir.path().join("cohort.warehouse.duckdb");
    assert!(file.exists(), "the embedded warehouse is a file beside the store");
    let analyst = DuckDbWarehouse::open(&file).await.unwrap();
    assert_eq!(analyst.count_rows(Layer::Bronze).await.unwrap(), 6, "six payloads were received");
    assert_eq!(analyst.count_rows(Layer::Silver).await.unwrap(), 6, "six events were normalized");
    let gold = analyst
        .query(
            "SELECT profile_id, events_total FROM gold_profiles_latest \
             WHERE (traits ->> '$.email') = @email AND merged_into IS NULL",
            &[("email".into(), QueryValue::String("max@gmail.com".into()))],
        )
        .await
        .unwrap();
    assert_eq!(gold.rows.len(), 1, "{gold:?}");
    assert_eq!(gold.rows[0][0], serde_json::json!(survivor));
    assert_eq!(gold.rows[0][1], serde_json::json!(6));
    let whatsapp = analyst
        .query("SELECT count(*) FROM silver_dedup WHERE source = 'whatsapp' AND raw_seq IS NOT NULL", &[])
        .await
        .unwrap();
    assert_eq!(whatsapp.rows[0][0], serde_json::json!(1), "Silver rows point back at their Bronze payload");
    let bronze = analyst.query("SELECT payload FROM bronze_dedup WHERE format = 'twilio_form'", &[]).await.unwrap();
    let body = bronze.rows[0][0].as_str().unwrap();
    assert!(body.contains("MessageSid=SM1f0e8ae6ade43cb3c0ce4525424e404f"), "Bronze keeps the payload as received");

    // Nothing drifted; every stored profile (merged ones too) has its latest snapshot.
    let clean = demo.cohort.reconcile().await.unwrap();
    assert_eq!((clean.missing, clean.stale, clean.orphaned, clean.repaired), (0, 0, 0, 0), "{clean:?}");
    let stored = demo.cohort.ctx.store.count_profiles().await.unwrap();
    assert_eq!(clean.profiles_checked, stored);

    // Drift: Gold loses the survivor; reconciliation notices, repairs and reports it.
    let pid = cohort_messages::ProfileId::parse(&survivor).unwrap();
    analyst.delete_profile(&pid).await.unwrap();
    let drift = demo.cohort.reconcile().await.unwrap();
    assert_eq!((drift.missing, drift.stale, drift.repaired), (1, 0, 1), "{drift:?}");
    let metrics = demo.client.get("/metrics").await.unwrap().body;
    let text = metrics.as_str().unwrap_or_default().to_string();
    assert!(text.contains("cohort_reconcile_drift_profiles{kind=\"missing\"} 1"), "{text}");
    assert!(text.contains("cohort_warehouse_rows_written_total{layer=\"silver\"} 6"), "{text}");
    let again = demo.cohort.reconcile().await.unwrap();
    assert_eq!((again.missing, again.stale), (0, 0), "the repair holds: {again:?}");
    let gold = analyst
        .query(
            "SELECT events_total FROM gold_profiles_latest WHERE profile_id = @p",
            &[("p".into(), QueryValue::String(survivor.clone()))],
        )
        .await
        .unwrap();
    assert_eq!(gold.rows.len(), 1);
    demo.stop().await.unwrap();
}

/// Between relays the file may be held open (`warehouse.duckdb_hold_ms`); a graceful stop lets
/// go of it at once, checkpointed, rather than leaving its rows in the write-ahead log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_leaves_the_duckdb_file_closed_and_checkpointed() {
    let dir = tempfile::tempdir().unwrap();
    let demo = slide_18_relayed(&dir).await;
    let file = dir.path().join("cohort.warehouse.duckdb");
    let wal = dir.path().join("cohort.warehouse.duckdb.wal");
    assert!(wal.metadata().is_ok_and(|m| m.len() > 0), "the relayed rows wait in the held file's log");
    // Past 250 ms (where an unheld file closes) and within a relay interval: the configured hold.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(wal.metadata().is_ok_and(|m| m.len() > 0), "warehouse.duckdb_hold_ms keeps the file open");
    demo.stop().await.unwrap();
    assert!(!wal.metadata().is_ok_and(|m| m.len() > 0), "closed at shutdown, its log checkpointed");
    let analyst = DuckDbWarehouse::open(&file).await.unwrap();
    assert_eq!(analyst.count_rows(Layer::Bronze).await.unwrap(), 6);
    assert_eq!(analyst.count_rows(Layer::Silver).await.unwrap(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_warehouse_nothing_waits_in_the_outbox() {
    let demo = DemoServer::start(None, "[warehouse]\nurl = \"none://\"\n", SystemOptions::default()).await.unwrap();
    play_slide_18(&demo.client).await.unwrap();
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    assert!(demo.cohort.relay_warehouse().await.unwrap().is_none());
    assert_eq!(demo.cohort.ctx.store.outbox_len().await.unwrap(), 0);
    assert!(demo.cohort.reconcile().await.is_err(), "reconciliation needs a warehouse");
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_bronze_rebuilds_lost_profiles_and_silver_idempotently() {
    use cohort::replay::{run, ReplayFilter};
    let dir = tempfile::tempdir().unwrap();
    let demo = DemoServer::start(Some(dir.path().to_path_buf()), RAW, SystemOptions::default()).await.unwrap();
    play_slide_18(&demo.client).await.unwrap();
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let before = fetch_profile(&demo.client, "email:max@gmail.com").await.unwrap()["profile"].clone();
    demo.stop().await.unwrap();

    // Disaster: the operational store and journal are gone, and Silver was emptied; Bronze is left.
    std::fs::remove_file(dir.path().join("cohort.redb")).unwrap();
    std::fs::remove_file(dir.path().join("cohort.redb.journal")).unwrap();
    let analyst = DuckDbWarehouse::open(&dir.path().join("cohort.warehouse.duckdb")).await.unwrap();
    analyst.query("DELETE FROM silver", &[]).await.unwrap();
    assert_eq!(analyst.count_rows(Layer::Silver).await.unwrap(), 0);

    let storage = format!("[storage]\nurl = \"embedded://{}\"\n", dir.path().join("cohort.redb").display());
    let config = cohort_config::Config::from_toml_layers(&[&storage, RAW]).unwrap();
    let first = run(config.clone(), ReplayFilter::default(), SystemOptions::default()).await.unwrap();
    assert_eq!((first.payloads, first.events, first.new_events, first.refused_payloads), (6, 6, 6, 0), "{first:?}");
    assert_eq!(first.silver_rows, 6);
    assert_eq!(analyst.count_rows(Layer::Silver).await.unwrap(), 6, "Silver is rebuilt");
    assert_eq!(analyst.count_rows(Layer::Bronze).await.unwrap(), 6, "replay adds nothing to Bronze");

    // Again: nothing is new, nothing is counted twice.
    let second = run(config.clone(), ReplayFilter::default(), SystemOptions::default()).await.unwrap();
    assert_eq!((second.payloads, second.new_events), (6, 0), "{second:?}");
    assert_eq!(analyst.count_rows(Layer::Silver).await.unwrap(), 6);

    // Filters: one source, and a start time after everything.
    let whatsapp = ReplayFilter { source: Some(cohort_messages::Source::Whatsapp), since: None };
    assert_eq!(run(config.clone(), whatsapp, SystemOptions::default()).await.unwrap().payloads, 1);
    let later = ReplayFilter { since: Some(chrono::Utc::now() + chrono::Duration::hours(1)), source: None };
    assert_eq!(run(config.clone(), later, SystemOptions::default()).await.unwrap().payloads, 0);
    // Payloads older than the deduplication window are not replayed: their events' ids are
    // forgotten, and they would count a second time.
    analyst.query("UPDATE bronze SET received_at = received_at - INTERVAL 2 HOUR", &[]).await.unwrap();
    let short =
        cohort_config::Config::from_toml_layers(&[&storage, RAW, "[retention]\nidempotency_hours = 1\n"]).unwrap();
    let old = run(short, ReplayFilter::default(), SystemOptions::default()).await.unwrap();
    assert_eq!((old.payloads, old.outside_window, old.events, old.new_events), (6, 6, 0, 0), "{old:?}");

    let demo = DemoServer::start(Some(dir.path().to_path_buf()), RAW, SystemOptions::default()).await.unwrap();
    let after = fetch_profile(&demo.client, "email:max@gmail.com").await.unwrap()["profile"].clone();
    // Profile ids derive from the creating event; replayed events are resolved concurrently, so
    // another of the student's first events may create the profile: same student, same content.
    assert_eq!(after["counters"]["events_total"], serde_json::json!(6));
    assert_eq!(after["identifiers"].as_array().map(Vec::len), before["identifiers"].as_array().map(Vec::len));
    assert_eq!(after["counters"]["by_source"], before["counters"]["by_source"]);
    assert_eq!(after["traits"]["first_name"], before["traits"]["first_name"]);
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_the_warehouse_holds_tokens_and_sealed_payloads_not_personal_data() {
    use cohort::replay::{replay, ReplayFilter};
    let dir = tempfile::tempdir().unwrap();
    let demo = DemoServer::start(Some(dir.path().to_path_buf()), "", SystemOptions::default()).await.unwrap();
    play_slide_18(&demo.client).await.unwrap();
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    demo.cohort.relay_warehouse().await.unwrap();
    let analyst = DuckDbWarehouse::open(&dir.path().join("cohort.warehouse.duckdb")).await.unwrap();
    assert_eq!(analyst.count_rows(Layer::Bronze).await.unwrap(), 6);
    assert_eq!(analyst.count_rows(Layer::Silver).await.unwrap(), 6);
    let everything = |layer: Layer| {
        let analyst = &analyst;
        async move {
            let rows = analyst.query(&format!("SELECT * FROM {}", analyst.table(layer)), &[]).await.unwrap();
            serde_json::to_string(&rows.rows).unwrap()
        }
    };
    for layer in Layer::ALL {
        let text = everything(layer).await;
        for secret in ["max@gmail.com", "Mustermann", "+4915"] {
            assert!(!text.contains(secret), "{} holds `{secret}`", layer.as_str());
        }
    }
    assert!(everything(Layer::Silver).await.contains("tok_"), "identifiers became tokens");
    let bronze = analyst.query("SELECT payload FROM bronze_dedup", &[]).await.unwrap();
    assert!(bronze.rows.iter().all(|r| r[0].as_str().unwrap().starts_with("enc:v1:")), "Bronze is sealed");
    // Tokens are stable: the same email is one token in Silver and in Gold, so analysts can join.
    let silver = analyst
        .query("SELECT DISTINCT (traits ->> '$.email') FROM silver_dedup WHERE (traits ->> '$.email') IS NOT NULL", &[])
        .await
        .unwrap();
    let gold = analyst
        .query("SELECT DISTINCT (traits ->> '$.email') FROM gold_profiles_latest WHERE merged_into IS NULL AND (traits ->> '$.email') IS NOT NULL", &[])
        .await
        .unwrap();
    assert_eq!(silver.rows.len(), 1, "{silver:?}");
    assert_eq!(silver.rows, gold.rows);
    // Replay opens sealed Bronze with the store's data key and writes tokenized Silver again.
    analyst.query("DELETE FROM silver", &[]).await.unwrap();
    let summary = replay(&demo.cohort, &ReplayFilter::default()).await.unwrap();
    assert_eq!((summary.payloads, summary.refused_payloads, summary.silver_rows), (6, 0, 6), "{summary:?}");
    let text = everything(Layer::Silver).await;
    assert!(!text.contains("max@gmail.com") && text.contains("tok_"), "{text}");
    demo.stop().await.unwrap();
}

/// "embedded" is a DuckDB file beside the store, except where an earlier version left its SQLite
/// warehouse there: that one keeps being used, rows and all, rather than an empty new file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_sqlite_warehouse_is_kept_and_a_new_installation_gets_duckdb() {
    use cohort::system::open_configured_warehouse;
    let config_for = |dir: &std::path::Path| {
        let storage = format!("[storage]\nurl = \"embedded://{}\"\n", dir.join("cohort.redb").display());
        cohort_config::Config::from_toml_layers(&[&storage]).unwrap()
    };

    let fresh = tempfile::tempdir().unwrap();
    let wh = open_configured_warehouse(&config_for(fresh.path())).await.unwrap().unwrap();
    assert_eq!(wh.backend(), "duckdb");
    assert!(fresh.path().join("cohort.warehouse.duckdb").exists());

    let upgraded = tempfile::tempdir().unwrap();
    {
        let old = cohort_adapters::SqliteWarehouse::open(&upgraded.path().join("cohort.warehouse.db")).await.unwrap();
        old.ensure_schema().await.unwrap();
        old.query("INSERT INTO bronze VALUES (1, 'web', 'segment', 'application/json', '2026-01-01T00:00:00.000000Z', 'utf8', '{}')", &[])
            .await
            .unwrap();
    }
    let wh = open_configured_warehouse(&config_for(upgraded.path())).await.unwrap().unwrap();
    assert_eq!(wh.backend(), "sqlite");
    assert_eq!(wh.count_rows(Layer::Bronze).await.unwrap(), 1, "the earlier rows are still there");
    assert!(!upgraded.path().join("cohort.warehouse.duckdb").exists());
}
