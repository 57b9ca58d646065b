//! The warehouse suite against the BigQuery REST API, served by bqemulator.
//!
//! Needs `COHORT_TEST_BIGQUERY` (`http://127.0.0.1:PORT/bigquery/v2`): run `scripts/services.sh start`
//! and `source ~/.cache/cohort/run/env`. Every test gets a dataset of its own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod warehouse_suite;

use std::sync::atomic::{AtomicU32, Ordering};

use cohort_adapters::warehouse::{BigQueryConfig, BigQueryWarehouse};
use cohort_adapters::{open_warehouse, Layer, QueryValue, StoreErrorKind, Warehouse};
use warehouse_suite::Subject;

/// The project bqemulator was started with (`--project` in scripts/services.sh).
const PROJECT: &str = "test-project";

fn endpoint() -> String {
    std::env::var("COHORT_TEST_BIGQUERY").ok().filter(|v| !v.trim().is_empty()).unwrap_or_else(|| {
        panic!(
            "COHORT_TEST_BIGQUERY is not set: run `scripts/services.sh start` and then \
             `source ~/.cache/cohort/run/env` (it points at bqemulator's http://127.0.0.1:PORT/bigquery/v2)"
        )
    })
}

fn unique_dataset() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("cohort_test_{}_{}_{}", std::process::id(), nanos % 1_000_000_000_000, N.fetch_add(1, Ordering::Relaxed))
}

fn url(dataset: &str) -> String {
    format!("bigquery://{PROJECT}/{dataset}?endpoint={}", endpoint())
}

async fn subject() -> Subject {
    let wh = open_warehouse(&url(&unique_dataset())).await.unwrap();
    assert_eq!(wh.backend(), "bigquery");
    assert!(!wh.runs_in_process(), "BigQuery takes no CPU of ours: the sink never paces relays to it");
    Subject { wh, guard: None }
}

warehouse_tests!(subject());

#[tokio::test]
async fn tables_hold_every_write_and_the_views_deduplicate() {
    let dataset = unique_dataset();
    let wh = open_warehouse(&url(&dataset)).await.unwrap();
    wh.ensure_schema().await.unwrap();
    let a = warehouse_suite::profile(1);
    wh.write_silver(vec![warehouse_suite::silver("e1", 1, &a)]).await.unwrap();
    wh.write_silver(vec![warehouse_suite::silver("e1", 1, &a)]).await.unwrap();
    wh.write_gold_profiles(vec![warehouse_suite::gold(&a, 1, 10), warehouse_suite::gold(&a, 2, 20)]).await.unwrap();
    // The raw tables are append-only: the emulator keeps insertAll duplicates (real BigQuery
    // drops most of them by insertId, best effort), and Gold keeps every snapshot.
    let count = |table: &str| format!("SELECT COUNT(*) AS n FROM `{PROJECT}.{dataset}.{table}`");
    let silver_raw = wh.query(&count("silver"), &[]).await.unwrap().rows[0][0].as_u64().unwrap();
    assert!((1..=2).contains(&silver_raw), "{silver_raw}");
    assert_eq!(wh.query(&count("gold_profiles"), &[]).await.unwrap().rows, vec![vec![serde_json::json!(2)]]);
    assert_eq!(wh.count_rows(Layer::Silver).await.unwrap(), 1);
    assert_eq!(wh.count_rows(Layer::Gold).await.unwrap(), 1);
    assert_eq!(wh.table(Layer::Gold), format!("`{PROJECT}.{dataset}.gold_profiles_latest`"));
}

#[tokio::test]
async fn unreachable_endpoint_is_unavailable_after_retries() {
    let mut config = BigQueryConfig::new(PROJECT, "nowhere");
    // A port nothing listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    config.endpoint = Some(format!("http://127.0.0.1:{port}/bigquery/v2"));
    config.max_attempts = 3;
    config.initial_backoff = std::time::Duration::from_millis(10);
    let wh = BigQueryWarehouse::connect(config).await.unwrap();
    let started = std::time::Instant::now();
    let err = wh.count_rows(Layer::Silver).await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Unavailable, "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
}

#[tokio::test]
async fn missing_tables_are_invalid() {
    let wh = open_warehouse(&url(&unique_dataset())).await.unwrap();
    // No ensure_schema: the dataset does not exist.
    let err = wh.count_rows(Layer::Bronze).await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Invalid, "{err}");
    let err = wh
        .query(
            "SELECT @x AS x",
            &[("x".into(), QueryValue::String("a".into())), ("bad name".into(), QueryValue::Int64(1))],
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Invalid, "{err}");
}
