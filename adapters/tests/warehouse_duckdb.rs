//! The warehouse suite against DuckDB (a file, and memory), plus what only the file backend has:
//! another process can open the file between calls, and a process holding it delays writes
//! without losing them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod warehouse_suite;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use cohort_adapters::{open_warehouse, DuckDbWarehouse, Layer, StoreErrorKind, Warehouse};
use cohort_messages::ProfileId;
use warehouse_suite::Subject;

/// `wh.duckdb` in `dir`, its schema created.
async fn file_warehouse(dir: &tempfile::TempDir) -> (std::path::PathBuf, DuckDbWarehouse) {
    let path = dir.path().join("wh.duckdb");
    let wh = DuckDbWarehouse::open(&path).await.unwrap();
    wh.ensure_schema().await.unwrap();
    (path, wh)
}

/// Panics if the file exists and holds `needle` anywhere in its bytes.
fn assert_not_in_file(file: &std::path::Path, needle: &str) {
    if let Ok(bytes) = std::fs::read(file) {
        let needle = needle.as_bytes();
        assert!(!bytes.windows(needle.len()).any(|w| w == needle), "{} still holds the value", file.display());
    }
}

/// A warehouse file in a fresh temp folder, opened through its URL (nested folders are created).
async fn file_subject() -> Subject {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/deeper/warehouse.duckdb");
    let wh = open_warehouse(&format!("duckdb://{}", path.display())).await.unwrap();
    assert_eq!(wh.backend(), "duckdb");
    Subject { wh, guard: Some(Box::new(dir)) }
}

async fn memory_subject() -> Subject {
    let wh = open_warehouse("memory://").await.unwrap();
    assert_eq!(wh.backend(), "duckdb");
    Subject { wh, guard: None }
}

mod file {
    use super::*;
    warehouse_tests!(file_subject());
}

mod memory {
    use super::*;
    warehouse_tests!(memory_subject());
}

/// Env var that turns [`analyst_session`] into a helper process holding a file open.
const HOLD: &str = "COHORT_TEST_DUCKDB_HOLD";

/// Not a test of its own: when [`HOLD`] names a file, this is the child process of
/// `a_session_holding_the_file_delays_writes_without_losing_them`. It opens the file read-only
/// like an analyst's `duckdb -readonly`, says so, and keeps it until its stdin closes.
#[test]
fn analyst_session() {
    let Ok(path) = std::env::var(HOLD) else { return };
    let config = duckdb::Config::default().access_mode(duckdb::AccessMode::ReadOnly).unwrap();
    let conn = duckdb::Connection::open_with_flags(&path, config).unwrap();
    let n: i64 = conn.query_row("SELECT COUNT(*) FROM gold_profiles_latest", [], |r| r.get(0)).unwrap();
    println!("holding {n}");
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

#[tokio::test]
async fn file_survives_reopening_and_analysts_read_it_between_calls() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wh.duckdb");
    {
        let wh = DuckDbWarehouse::open(&path).await.unwrap();
        wh.ensure_schema().await.unwrap();
        let a = warehouse_suite::profile(1);
        wh.write_silver(vec![warehouse_suite::silver("e1", 1, &a), warehouse_suite::silver("e2", 2, &a)])
            .await
            .unwrap();
        wh.write_gold_profiles(vec![warehouse_suite::gold(&a, 2, 10)]).await.unwrap();
        // The warehouse is still in use, yet once its burst of calls is over the file is free:
        // an analyst opens it and queries Gold with SQL, as the README shows.
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        let analyst = duckdb::Connection::open(&path).unwrap();
        let (id, total): (String, i64) = analyst
            .query_row("SELECT profile_id, events_total FROM gold_profiles_latest", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap();
        assert_eq!((id.as_str(), total), (a.as_str(), 2));
        analyst.close().unwrap();
    }
    let wh = DuckDbWarehouse::open(&path).await.unwrap();
    wh.ensure_schema().await.unwrap();
    assert_eq!(wh.count_rows(Layer::Silver).await.unwrap(), 2);
    assert_eq!(wh.count_rows(Layer::Gold).await.unwrap(), 1);
    let tables = wh
        .query("SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' ORDER BY 1", &[])
        .await
        .unwrap();
    let names: Vec<&str> = tables.rows.iter().map(|r| r[0].as_str().unwrap()).collect();
    assert_eq!(names, ["bronze", "bronze_dedup", "gold_profiles", "gold_profiles_latest", "silver", "silver_dedup"]);
    // JSON columns are DuckDB JSON: the arrow operators work on them.
    let email = wh
        .query("SELECT (traits ->> '$.email') AS email FROM silver_dedup ORDER BY event_id LIMIT 1", &[])
        .await
        .unwrap();
    assert_eq!(email.columns, ["email"]);
    assert_eq!(email.rows.len(), 1, "{email:?}");
    assert!(email.rows[0][0].is_string() || email.rows[0][0].is_null(), "{email:?}");
}

#[tokio::test]
async fn a_session_holding_the_file_delays_writes_without_losing_them() {
    let dir = tempfile::tempdir().unwrap();
    let (path, wh) = file_warehouse(&dir).await;
    let a = warehouse_suite::profile(3);
    wh.release().await;

    let mut holder = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "analyst_session", "--nocapture", "--test-threads", "1"])
        .env(HOLD, &path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(holder.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("holding") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "the holder exited before opening the file");
    }

    let err = wh.write_silver(vec![warehouse_suite::silver("e1", 1, &a)]).await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Unavailable, "{err}");
    assert!(err.message.contains("another process"), "{err}");

    drop(holder.stdin.take());
    assert!(holder.wait().unwrap().success());
    // The caller (the warehouse sink) retries the same rows: they land once.
    wh.write_silver(vec![warehouse_suite::silver("e1", 1, &a)]).await.unwrap();
    assert_eq!(wh.count_rows(Layer::Silver).await.unwrap(), 1);
}

/// One Silver row of a person whose email is `email`, amid 2,000 of another student (so the
/// person's row shares a row group with someone else's); returns (person, other).
async fn write_among_others(wh: &DuckDbWarehouse, email: &str) -> (ProfileId, ProfileId) {
    let (a, b) = (warehouse_suite::profile(7), warehouse_suite::profile(8));
    let mut rows: Vec<_> = (0..2000).map(|i| warehouse_suite::silver(&format!("b{i}"), i, &b)).collect();
    let mut row = warehouse_suite::silver("e1", 1, &a);
    row.traits = serde_json::json!({ "email": email });
    rows.insert(1000, row);
    wh.write_silver(rows).await.unwrap();
    (a, b)
}

#[tokio::test]
async fn gdpr_delete_leaves_no_trace_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (path, wh) = file_warehouse(&dir).await;
    let (a, b) = write_among_others(&wh, "erase-me-4711@example.org").await;
    wh.delete_profile(&a).await.unwrap();
    for file in [path.clone(), dir.path().join("wh.duckdb.wal")] {
        assert_not_in_file(&file, "erase-me-4711");
    }
    assert_eq!(wh.count_rows(Layer::Silver).await.unwrap(), 2000);
    // The rewritten file keeps its keys: a replayed row is still absorbed.
    wh.write_silver(vec![warehouse_suite::silver("b5", 5, &b)]).await.unwrap();
    assert_eq!(wh.count_rows(Layer::Silver).await.unwrap(), 2000);
    let keys = wh
        .query("SELECT table_name FROM duckdb_constraints() WHERE constraint_type = 'PRIMARY KEY' ORDER BY 1", &[])
        .await
        .unwrap();
    assert_eq!(
        keys.rows,
        vec![vec![serde_json::json!("gold_profiles")], vec![serde_json::json!("silver")]],
        "Bronze has no key; its inserts skip the raw_seqs it holds"
    );
}

#[tokio::test]
async fn positional_parameters_are_refused() {
    let wh = open_warehouse("duckdb::memory:").await.unwrap();
    wh.ensure_schema().await.unwrap();
    for sql in ["SELECT * FROM silver WHERE event_id = ?", "SELECT * FROM silver WHERE event_id = $1"] {
        let err = wh.query(sql, &[]).await.unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::Invalid, "{err}");
    }
}

#[tokio::test]
async fn query_sql_cannot_read_or_write_other_files() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("cohort.kek");
    std::fs::write(&secret, "key-material-4711").unwrap();
    let wh = DuckDbWarehouse::open(&dir.path().join("wh.duckdb")).await.unwrap();
    wh.ensure_schema().await.unwrap();
    let outside = dir.path().join("out.csv");
    for sql in [
        format!("SELECT * FROM read_text('{}')", secret.display()),
        format!("COPY silver TO '{}'", outside.display()),
        format!("ATTACH '{}' AS other", dir.path().join("other.duckdb").display()),
        "SET enable_external_access = true".to_string(),
    ] {
        let err = wh.query(&sql, &[]).await.unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::Invalid, "{sql}: {err}");
    }
    assert!(!outside.exists());
}

#[tokio::test]
async fn a_rewrite_owed_by_an_interrupted_erasure_happens_at_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = {
        let (path, wh) = file_warehouse(&dir).await;
        let (a, _) = write_among_others(&wh, "erase-me-4712@example.org").await;
        // An erasure deleted the rows, then the process died before the rewrite.
        std::fs::write(dir.path().join("wh.duckdb.rewrite-pending"), "").unwrap();
        wh.query(&format!("DELETE FROM silver WHERE profile_id = '{a}'"), &[]).await.unwrap();
        wh.release().await;
        path
    };
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let wh = DuckDbWarehouse::open(&path).await.unwrap();
    assert!(path.exists());
    assert_not_in_file(&path, "erase-me-4712");
    assert!(!dir.path().join("wh.duckdb.rewrite-pending").exists());
    assert_eq!(wh.count_rows(Layer::Silver).await.unwrap(), 2000);
}

/// Bronze has no primary key (so DuckDB gives appends new row groups instead of rewriting the
/// last one at every checkpoint); a file from an earlier version loses its key and keeps its
/// rows, and the insert still keeps every `raw_seq` once in the table itself.
#[tokio::test]
async fn bronze_from_an_earlier_version_loses_its_primary_key_and_stays_free_of_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.duckdb");
    {
        let old = duckdb::Connection::open(&path).unwrap();
        old.execute_batch(
            "CREATE TABLE bronze (raw_seq BIGINT PRIMARY KEY, source VARCHAR NOT NULL, format VARCHAR NOT NULL, \
             content_type VARCHAR NOT NULL, received_at TIMESTAMP NOT NULL, payload_encoding VARCHAR NOT NULL, \
             payload VARCHAR NOT NULL); \
             CREATE VIEW bronze_dedup AS SELECT * FROM bronze; \
             INSERT INTO bronze VALUES (1, 'web', 'segment:page', 'application/json', TIMESTAMP '2026-01-01', 'utf8', '{}'), \
             (2, 'web', 'segment:page', 'application/json', TIMESTAMP '2026-01-01', 'utf8', '{\"n\":2}');",
        )
        .unwrap();
    }
    let wh = DuckDbWarehouse::open(&path).await.unwrap();
    wh.ensure_schema().await.unwrap();
    let keys =
        "SELECT count(*) FROM duckdb_constraints() WHERE table_name = 'bronze' AND constraint_type = 'PRIMARY KEY'";
    assert_eq!(wh.query(keys, &[]).await.unwrap().rows[0][0], serde_json::json!(0));
    // Twice more: nothing left to rebuild.
    wh.ensure_schema().await.unwrap();

    use warehouse_suite::bronze;
    wh.write_bronze(vec![bronze(2, b"{\"n\":2}"), bronze(3, b"{}"), bronze(3, b"{}")]).await.unwrap();
    wh.write_bronze(vec![bronze(1, b"{}"), bronze(4, b"{}")]).await.unwrap();
    let rows = wh.query("SELECT raw_seq, count(*) FROM bronze GROUP BY raw_seq ORDER BY raw_seq", &[]).await.unwrap();
    let expected: Vec<Vec<serde_json::Value>> =
        (1..=4).map(|seq| vec![serde_json::json!(seq), serde_json::json!(1)]).collect();
    assert_eq!(rows.rows, expected, "each raw_seq once in the table itself");
    let payload = wh.query("SELECT payload FROM bronze_dedup WHERE raw_seq = 2", &[]).await.unwrap();
    assert_eq!(payload.rows[0][0], serde_json::json!("{\"n\":2}"), "rows of the old table are kept");
}
