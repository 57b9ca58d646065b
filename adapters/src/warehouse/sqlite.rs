//! The warehouse as one SQLite file (or memory), written in one transaction per call.
//!
//! For those who want other processes to read the file while Cohort writes it (WAL mode), which
//! the default DuckDB file does not allow. Natural keys are primary
//! keys, so replays are absorbed by `INSERT OR IGNORE` (Bronze, Silver) and an upsert that keeps
//! the newest snapshot (Gold). The `*_dedup`/`*_latest` views exist only so that SQL written for
//! BigQuery's views runs here unchanged.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine as _;
use cohort_messages::ProfileId;
use parking_lot::Mutex;
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, ErrorCode};
use serde_json::Value;

use super::{
    format_timestamp, json_text, opt_json_text, param_name, profile_deleted, to_i64, BronzeRow, DeleteOutcome,
    GoldProfileRow, Layer, QueryResult, QueryValue, SilverRow, Warehouse,
};
use crate::StoreError;

/// Timestamps are TEXT in [`format_timestamp`]'s fixed-width format (sorts as time); JSON
/// columns are TEXT (a column typed `JSON` would get NUMERIC affinity and mangle numbers).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS bronze (
    raw_seq          INTEGER PRIMARY KEY,
    source           TEXT NOT NULL,
    format           TEXT NOT NULL,
    content_type     TEXT NOT NULL,
    received_at      TEXT NOT NULL,
    payload_encoding TEXT NOT NULL,
    payload          TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS bronze_received_at ON bronze (received_at);

CREATE TABLE IF NOT EXISTS silver (
    event_id    TEXT PRIMARY KEY,
    profile_id  TEXT NOT NULL,
    source      TEXT NOT NULL,
    kind        TEXT NOT NULL,
    name        TEXT,
    occurred_at TEXT NOT NULL,
    received_at TEXT NOT NULL,
    identifiers TEXT NOT NULL,
    traits      TEXT NOT NULL,
    properties  TEXT NOT NULL,
    utm         TEXT,
    raw_seq     INTEGER
);
CREATE INDEX IF NOT EXISTS silver_profile_id ON silver (profile_id);
CREATE INDEX IF NOT EXISTS silver_received_at ON silver (received_at);

CREATE TABLE IF NOT EXISTS gold_profiles (
    profile_id   TEXT PRIMARY KEY,
    snapshot_at  TEXT NOT NULL,
    traits       TEXT NOT NULL,
    counters     TEXT NOT NULL,
    identifiers  TEXT NOT NULL,
    events_total INTEGER NOT NULL,
    first_seen   TEXT,
    last_seen    TEXT,
    merged_into  TEXT
);
CREATE INDEX IF NOT EXISTS gold_profiles_snapshot_at ON gold_profiles (snapshot_at);

CREATE VIEW IF NOT EXISTS bronze_dedup AS SELECT * FROM bronze;
CREATE VIEW IF NOT EXISTS silver_dedup AS SELECT * FROM silver;
CREATE VIEW IF NOT EXISTS gold_profiles_latest AS SELECT * FROM gold_profiles;
";

/// The SQLite warehouse. One connection behind a mutex, used from `spawn_blocking`: the sink
/// writes in batches, so a single writer is the SQLite-friendly shape.
#[derive(Clone)]
pub struct SqliteWarehouse {
    conn: Arc<Mutex<Connection>>,
    path: Option<PathBuf>,
}

impl std::fmt::Debug for SqliteWarehouse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteWarehouse").field("path", &self.path).finish_non_exhaustive()
    }
}

impl SqliteWarehouse {
    /// Opens (creating it and its parent folders if needed) a warehouse file in WAL mode.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let path = path.to_path_buf();
        let opened = path.clone();
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection, StoreError> {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| {
                    StoreError::unavailable(format!("cannot create warehouse folder {}: {e}", parent.display()))
                })?;
            }
            let conn = Connection::open(&path)
                .map_err(|e| StoreError::unavailable(format!("cannot open warehouse {}: {e}", path.display())))?;
            // WAL: readers (an analyst's sqlite3) do not block the sink; NORMAL is durable
            // across process crashes, and the journal is the source of truth anyway.
            let mode: String =
                conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(|e| map_err("set WAL", e))?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(StoreError::unavailable(format!(
                    "warehouse {}: WAL mode refused ({mode})",
                    path.display()
                )));
            }
            configure(&conn)?;
            Ok(conn)
        })
        .await
        .map_err(|e| StoreError::unavailable(format!("sqlite warehouse open task failed: {e}")))??;
        Ok(Self { conn: Arc::new(Mutex::new(conn)), path: Some(opened) })
    }

    /// A private in-memory warehouse (tests, demos): gone when dropped.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        let conn = Connection::open_in_memory().map_err(|e| map_err("open in-memory warehouse", e))?;
        configure(&conn)?;
        Ok(Self { conn: Arc::new(Mutex::new(conn)), path: None })
    }

    /// The file, or `None` in memory.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock();
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::unavailable(format!("sqlite warehouse task failed: {e}")))?
    }
}

impl SqliteWarehouse {
    /// Runs one prepared statement per row inside one transaction: all rows or none.
    async fn insert_rows<R: Send + 'static>(
        &self,
        layer: &'static str,
        sql: &'static str,
        rows: Vec<R>,
        bind: fn(&mut rusqlite::CachedStatement<'_>, &R) -> Result<usize, StoreError>,
    ) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        self.with_conn(move |conn| {
            let tx = conn.transaction().map_err(|e| map_err("begin", e))?;
            {
                let mut stmt = tx.prepare_cached(sql).map_err(|e| map_err("prepare insert", e))?;
                for r in &rows {
                    bind(&mut stmt, r).map_err(|e| StoreError { message: format!("{layer}: {}", e.message), ..e })?;
                }
            }
            tx.commit().map_err(|e| map_err("commit", e))
        })
        .await
    }
}

fn configure(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(|e| map_err("set busy timeout", e))?;
    // GDPR: deleted rows are overwritten, not left readable in free pages.
    conn.pragma_update(None, "secure_delete", "ON").map_err(|e| map_err("enable secure_delete", e))?;
    // FULL, not WAL's usual NORMAL: the relay acknowledges the outbox after this commit, and
    // NORMAL may roll a commit back at a power loss, with the rows gone from both sides.
    conn.pragma_update(None, "synchronous", "FULL").map_err(|e| map_err("set synchronous", e))?;
    Ok(())
}

fn map_err(context: &str, e: rusqlite::Error) -> StoreError {
    let message = format!("sqlite warehouse: {context}: {e}");
    match &e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::CannotOpen
            | ErrorCode::OutOfMemory
            | ErrorCode::FileLockingProtocolFailed => StoreError::unavailable(message),
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => StoreError::corrupt(message),
            _ => StoreError::invalid(message),
        },
        _ => StoreError::invalid(message),
    }
}

fn sql_value(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::from(i),
        ValueRef::Real(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
        ValueRef::Text(t) => Value::String(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
    }
}

fn run_query(conn: &Connection, sql: &str, params: &[(String, QueryValue)]) -> Result<QueryResult, StoreError> {
    let mut stmt = conn.prepare(sql).map_err(|e| map_err("prepare query", e))?;
    let mut named = Vec::with_capacity(params.len());
    for (name, value) in params {
        named.push((param_name(name)?, value));
    }
    for idx in 1..=stmt.parameter_count() {
        let Some(placeholder) = stmt.parameter_name(idx).map(str::to_string) else {
            return Err(StoreError::invalid("positional query parameters are not supported: use @name"));
        };
        let bare = &placeholder[1..];
        let Some((_, value)) = named.iter().find(|(n, _)| *n == bare) else {
            return Err(StoreError::invalid(format!("query parameter {placeholder} has no value")));
        };
        let bound = match value {
            QueryValue::String(s) => stmt.raw_bind_parameter(idx, s.as_str()),
            QueryValue::Int64(i) => stmt.raw_bind_parameter(idx, *i),
            QueryValue::Float64(f) => stmt.raw_bind_parameter(idx, *f),
            QueryValue::Bool(b) => stmt.raw_bind_parameter(idx, *b),
            QueryValue::Timestamp(t) => stmt.raw_bind_parameter(idx, format_timestamp(*t)),
        };
        bound.map_err(|e| map_err("bind query parameter", e))?;
    }
    let columns: Vec<String> = stmt.column_names().into_iter().map(str::to_string).collect();
    let mut rows = stmt.raw_query();
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(|e| map_err("run query", e))? {
        let mut values = Vec::with_capacity(columns.len());
        for i in 0..columns.len() {
            values.push(sql_value(row.get_ref(i).map_err(|e| map_err("read query row", e))?));
        }
        out.push(values);
    }
    Ok(QueryResult { columns, rows: out })
}

#[async_trait]
impl Warehouse for SqliteWarehouse {
    async fn ensure_schema(&self) -> Result<(), StoreError> {
        self.with_conn(|conn| conn.execute_batch(SCHEMA).map_err(|e| map_err("create schema", e))).await
    }

    async fn write_bronze(&self, rows: Vec<BronzeRow>) -> Result<(), StoreError> {
        self.insert_rows(
            "bronze",
            "INSERT OR IGNORE INTO bronze \
             (raw_seq, source, format, content_type, received_at, payload_encoding, payload) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            rows,
            |stmt, r| {
                stmt.execute(params![
                    to_i64(r.raw_seq, "raw_seq")?,
                    r.source.as_str(),
                    r.format,
                    r.content_type,
                    format_timestamp(r.received_at),
                    r.payload_encoding.as_str(),
                    r.payload,
                ])
                .map_err(|e| map_err("insert row", e))
            },
        )
        .await
    }

    async fn write_silver(&self, rows: Vec<SilverRow>) -> Result<(), StoreError> {
        self.insert_rows(
            "silver",
            "INSERT OR IGNORE INTO silver \
             (event_id, profile_id, source, kind, name, occurred_at, received_at, identifiers, traits, \
              properties, utm, raw_seq) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            rows,
            |stmt, r| {
                stmt.execute(params![
                    r.event_id.as_str(),
                    r.profile_id.as_str(),
                    r.source.as_str(),
                    r.kind.as_str(),
                    r.name,
                    format_timestamp(r.occurred_at),
                    format_timestamp(r.received_at),
                    json_text(&r.identifiers)?,
                    json_text(&r.traits)?,
                    json_text(&r.properties)?,
                    opt_json_text(&r.utm)?,
                    r.raw_seq.map(|s| to_i64(s, "raw_seq")).transpose()?,
                ])
                .map_err(|e| map_err("insert row", e))
            },
        )
        .await
    }

    async fn write_gold_profiles(&self, rows: Vec<GoldProfileRow>) -> Result<(), StoreError> {
        // A late, older snapshot (replay) must not overwrite a newer one.
        self.insert_rows(
            "gold",
            "INSERT INTO gold_profiles \
             (profile_id, snapshot_at, traits, counters, identifiers, events_total, first_seen, \
              last_seen, merged_into) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
             ON CONFLICT (profile_id) DO UPDATE SET \
               snapshot_at = excluded.snapshot_at, traits = excluded.traits, \
               counters = excluded.counters, identifiers = excluded.identifiers, \
               events_total = excluded.events_total, first_seen = excluded.first_seen, \
               last_seen = excluded.last_seen, merged_into = excluded.merged_into \
             WHERE excluded.snapshot_at >= gold_profiles.snapshot_at",
            rows,
            |stmt, r| {
                stmt.execute(params![
                    r.profile_id.as_str(),
                    format_timestamp(r.snapshot_at),
                    json_text(&r.traits)?,
                    json_text(&r.counters)?,
                    json_text(&r.identifiers)?,
                    to_i64(r.events_total, "events_total")?,
                    r.first_seen.map(format_timestamp),
                    r.last_seen.map(format_timestamp),
                    r.merged_into.as_ref().map(|p| p.as_str().to_string()),
                ])
                .map_err(|e| map_err("insert row", e))
            },
        )
        .await
    }

    async fn query(&self, sql: &str, params: &[(String, QueryValue)]) -> Result<QueryResult, StoreError> {
        let sql = sql.to_string();
        let params = params.to_vec();
        self.with_conn(move |conn| run_query(conn, &sql, &params)).await
    }

    async fn delete_profile(&self, profile_id: &ProfileId) -> Result<DeleteOutcome, StoreError> {
        let id = profile_id.as_str().to_string();
        let in_file = self.path.is_some();
        self.with_conn(move |conn| {
            let tx = conn.transaction().map_err(|e| map_err("begin", e))?;
            // Bronze first: the person's Silver rows are what say which raw payloads were theirs.
            let bronze = tx
                .execute(
                    "DELETE FROM bronze WHERE raw_seq IN \
                     (SELECT raw_seq FROM silver WHERE profile_id = ?1 AND raw_seq IS NOT NULL)",
                    [&id],
                )
                .map_err(|e| map_err("delete bronze", e))?;
            let silver = tx
                .execute("DELETE FROM silver WHERE profile_id = ?1", [&id])
                .map_err(|e| map_err("delete silver", e))?;
            let gold = tx
                .execute("DELETE FROM gold_profiles WHERE profile_id = ?1", [&id])
                .map_err(|e| map_err("delete gold", e))?;
            tx.commit().map_err(|e| map_err("commit delete", e))?;
            if in_file {
                // Copy the zeroed pages into the main file now rather than at some later
                // checkpoint, so the erased values do not linger in the WAL. Best effort: a busy
                // reader only postpones it.
                let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
            }
            Ok(profile_deleted(bronze, silver, gold))
        })
        .await
    }

    async fn raw_payloads(&self, after: u64, limit: usize) -> Result<Vec<(u64, String)>, StoreError> {
        let (after, limit) = (i64::try_from(after).unwrap_or(i64::MAX), i64::try_from(limit).unwrap_or(i64::MAX));
        self.with_conn(move |conn| {
            let mut stmt = conn
                .prepare("SELECT raw_seq, payload FROM bronze WHERE raw_seq > ?1 ORDER BY raw_seq LIMIT ?2")
                .map_err(|e| map_err("read bronze", e))?;
            let rows = stmt
                .query_map(rusqlite::params![after, limit], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
                .map_err(|e| map_err("read bronze", e))?;
            rows.map(|r| r.map(|(s, p)| (s.max(0) as u64, p)).map_err(|e| map_err("read bronze", e))).collect()
        })
        .await
    }

    async fn delete_raw(&self, seqs: &[u64]) -> Result<DeleteOutcome, StoreError> {
        let seqs: Vec<i64> = seqs.iter().filter_map(|s| i64::try_from(*s).ok()).collect();
        self.with_conn(move |conn| {
            let tx = conn.transaction().map_err(|e| map_err("begin", e))?;
            let mut n = 0;
            for seq in &seqs {
                n += tx
                    .execute("DELETE FROM bronze WHERE raw_seq = ?1", [seq])
                    .map_err(|e| map_err("delete bronze", e))?;
            }
            tx.commit().map_err(|e| map_err("commit delete", e))?;
            Ok(DeleteOutcome { rows_deleted: n as u64, retry_later: false, detail: format!("bronze: {n} deleted") })
        })
        .await
    }

    async fn count_rows(&self, layer: Layer) -> Result<u64, StoreError> {
        self.with_conn(move |conn| {
            let n: i64 = conn
                .query_row(&format!("SELECT COUNT(*) FROM {}", layer.view_name()), [], |r| r.get(0))
                .map_err(|e| map_err("count rows", e))?;
            Ok(n.max(0) as u64)
        })
        .await
    }

    fn table(&self, layer: Layer) -> String {
        layer.view_name().to_string()
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn runs_in_process(&self) -> bool {
        true
    }
}
