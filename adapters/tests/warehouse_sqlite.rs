//! The warehouse suite against SQLite (a file, and memory), plus what only the file backend has.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod warehouse_suite;

use cohort_adapters::{open_warehouse, Layer, SqliteWarehouse, StoreErrorKind, Warehouse};
use warehouse_suite::Subject;

/// A warehouse file in a fresh temp folder, opened through its URL (nested folders are created).
async fn file_subject() -> Subject {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/deeper/warehouse.db");
    let wh = open_warehouse(&format!("sqlite://{}", path.display())).await.unwrap();
    assert_eq!(wh.backend(), "sqlite");
    Subject { wh, guard: Some(Box::new(dir)) }
}

async fn memory_subject() -> Subject {
    Subject { wh: open_warehouse("sqlite::memory:").await.unwrap(), guard: None }
}

mod file {
    use super::*;
    warehouse_tests!(file_subject());
}

mod memory {
    use super::*;
    warehouse_tests!(memory_subject());
}

#[tokio::test]
async fn file_survives_reopening_and_is_in_wal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wh.db");
    {
        let wh = SqliteWarehouse::open(&path).await.unwrap();
        wh.ensure_schema().await.unwrap();
        let a = warehouse_suite::profile(1);
        wh.write_silver(vec![warehouse_suite::silver("e1", 1, &a), warehouse_suite::silver("e2", 2, &a)])
            .await
            .unwrap();
        wh.write_gold_profiles(vec![warehouse_suite::gold(&a, 2, 10)]).await.unwrap();
    }
    let wh = SqliteWarehouse::open(&path).await.unwrap();
    wh.ensure_schema().await.unwrap();
    assert_eq!(wh.count_rows(Layer::Silver).await.unwrap(), 2);
    assert_eq!(wh.count_rows(Layer::Gold).await.unwrap(), 1);
    let mode = wh.query("PRAGMA journal_mode", &[]).await.unwrap();
    assert_eq!(mode.rows, vec![vec![serde_json::json!("wal")]]);
    // Synced at every commit (2 = FULL): the relay drops the outbox rows once it returns.
    let sync = wh.query("PRAGMA synchronous", &[]).await.unwrap();
    assert_eq!(sync.rows, vec![vec![serde_json::json!(2)]]);
    // The analyst's view: a plain sqlite file any SQLite (or DuckDB's sqlite scanner) can read.
    let tables = wh
        .query(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%' ORDER BY name",
            &[],
        )
        .await
        .unwrap();
    let names: Vec<&str> = tables.rows.iter().map(|r| r[0].as_str().unwrap()).collect();
    assert_eq!(names, ["bronze", "bronze_dedup", "gold_profiles", "gold_profiles_latest", "silver", "silver_dedup"]);
}

#[tokio::test]
async fn gdpr_delete_leaves_no_trace_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wh.db");
    let wh = SqliteWarehouse::open(&path).await.unwrap();
    wh.ensure_schema().await.unwrap();
    let a = warehouse_suite::profile(7);
    let mut row = warehouse_suite::silver("e1", 1, &a);
    row.traits = serde_json::json!({"email": "erase-me-4711@example.org"});
    wh.write_silver(vec![row]).await.unwrap();
    wh.delete_profile(&a).await.unwrap();
    // secure_delete + a checkpoint: the erased value is in neither the database nor its WAL.
    for file in [path.clone(), dir.path().join("wh.db-wal")] {
        if let Ok(bytes) = std::fs::read(&file) {
            let needle = b"erase-me-4711";
            assert!(!bytes.windows(needle.len()).any(|w| w == needle), "{} still holds the value", file.display());
        }
    }
}

#[tokio::test]
async fn disabled_warehouse_accepts_writes_and_refuses_queries() {
    let wh = open_warehouse("none://").await.unwrap();
    assert_eq!(wh.backend(), "none");
    wh.ensure_schema().await.unwrap();
    wh.write_silver(vec![warehouse_suite::silver("e1", 1, &warehouse_suite::profile(1))]).await.unwrap();
    assert_eq!(wh.count_rows(Layer::Silver).await.unwrap(), 0);
    let err = wh.query("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Invalid);
    assert!(err.message.contains("none://"), "{err}");
    let outcome = wh.delete_profile(&warehouse_suite::profile(1)).await.unwrap();
    assert!(!outcome.retry_later);
}

#[tokio::test]
async fn unknown_urls_fail_with_the_accepted_schemes() {
    let Err(err) = open_warehouse("parquet:///tmp/x.parquet").await else { panic!("parquet:// must be refused") };
    assert_eq!(err.kind, StoreErrorKind::Invalid);
    assert!(err.message.contains("parquet:///tmp/x.parquet") && err.message.contains("duckdb://PATH"), "{err}");
}

#[tokio::test]
async fn positional_parameters_are_refused() {
    let wh = open_warehouse("sqlite::memory:").await.unwrap();
    wh.ensure_schema().await.unwrap();
    let err = wh.query("SELECT * FROM silver WHERE event_id = ?", &[]).await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Invalid, "{err}");
}

/// SQLite writes on our own cores, so the sink paces its timed relays to it as it does DuckDB's.
#[tokio::test]
async fn sqlite_says_it_runs_in_process() {
    assert!(memory_subject().await.wh.runs_in_process());
    assert!(file_subject().await.wh.runs_in_process());
}
