//! The embedded warehouse: one DuckDB file (or memory), the analysts' native format.
//!
//! DuckDB lets one process write a file and, while it does, no other process open it. So the file
//! is opened for a burst of calls (one relay) and closed [`LINGER`] after the last, or, with a
//! [`Holding::hold`], kept across the relays of a busy stretch up to that long: between openings
//! an analyst's `duckdb` opens it; while an analyst holds it, calls fail as unavailable and the
//! sink's rows wait in the outbox. Rows go in through DuckDB's appender into a temporary table and then
//! one `INSERT ... SELECT` per layer (a prepared insert per row costs about a millisecond).
//! Silver's and Gold's natural keys are primary keys, so replays are absorbed as in the SQLite
//! backend; Bronze has none (see [`BRONZE`]) and skips the `raw_seq`s it already holds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use chrono::{DateTime, NaiveDateTime, Utc};
use cohort_messages::ProfileId;
use duckdb::types::{TimeUnit, ValueRef};
use duckdb::{params, Appender, Connection};
use parking_lot::Mutex;
use serde_json::Value;

use super::{
    format_timestamp, json_text, opt_json_text, param_name, profile_deleted, to_i64, BronzeRow, DeleteOutcome,
    GoldProfileRow, Layer, QueryResult, QueryValue, SilverRow, Warehouse,
};
use crate::StoreError;

/// Timestamps are `TIMESTAMP` in UTC; JSON columns are DuckDB's `JSON` type, so
/// `traits ->> '$.email'` works on them.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS silver (
    event_id    VARCHAR PRIMARY KEY,
    profile_id  VARCHAR NOT NULL,
    source      VARCHAR NOT NULL,
    kind        VARCHAR NOT NULL,
    name        VARCHAR,
    occurred_at TIMESTAMP NOT NULL,
    received_at TIMESTAMP NOT NULL,
    identifiers JSON NOT NULL,
    traits      JSON NOT NULL,
    properties  JSON NOT NULL,
    utm         JSON,
    raw_seq     BIGINT
);
CREATE TABLE IF NOT EXISTS gold_profiles (
    profile_id   VARCHAR PRIMARY KEY,
    snapshot_at  TIMESTAMP NOT NULL,
    traits       JSON NOT NULL,
    counters     JSON NOT NULL,
    identifiers  JSON NOT NULL,
    events_total BIGINT NOT NULL,
    first_seen   TIMESTAMP,
    last_seen    TIMESTAMP,
    merged_into  VARCHAR
);
CREATE VIEW IF NOT EXISTS bronze_dedup AS SELECT * FROM bronze;
CREATE VIEW IF NOT EXISTS silver_dedup AS SELECT * FROM silver;
CREATE VIEW IF NOT EXISTS gold_profiles_latest AS SELECT * FROM gold_profiles;
";

/// Bronze's columns, without a primary key. DuckDB starts a new row group for what is appended
/// to a checkpointed table only when the table has no index; with one it appends to the last
/// group, and every checkpoint rewrites that group whole. Bronze rows are whole request bodies
/// and a group holds 122,880 of them, so with a key each checkpoint grew towards gigabytes.
/// Without one, DuckDB's merging of small trailing groups bounds the rewrite. Duplicates are kept
/// out by the insert instead (`raw_seq` only grows, so it reads a narrow range).
const BRONZE: &str = "(
    raw_seq          BIGINT NOT NULL,
    source           VARCHAR NOT NULL,
    format           VARCHAR NOT NULL,
    content_type     VARCHAR NOT NULL,
    received_at      TIMESTAMP NOT NULL,
    payload_encoding VARCHAR NOT NULL,
    payload          VARCHAR NOT NULL
)";

/// Creates Bronze, or rebuilds one with the primary key of earlier versions without it.
fn ensure_bronze(conn: &mut Connection) -> Result<(), StoreError> {
    let keyed: i64 = conn
        .query_row(
            "SELECT count(*) FROM duckdb_constraints() \
             WHERE schema_name = 'main' AND table_name = 'bronze' AND constraint_type = 'PRIMARY KEY'",
            [],
            |r| r.get(0),
        )
        .map_err(|e| map_err("read Bronze's constraints", e))?;
    if keyed == 0 {
        return conn
            .execute_batch(&format!("CREATE TABLE IF NOT EXISTS bronze {BRONZE}"))
            .map_err(|e| map_err("create Bronze", e));
    }
    let tx = conn.transaction().map_err(|e| map_err("begin", e))?;
    tx.execute_batch(&format!(
        "CREATE TABLE bronze_unkeyed {BRONZE}; \
         INSERT INTO bronze_unkeyed SELECT * FROM bronze; \
         DROP TABLE bronze; \
         ALTER TABLE bronze_unkeyed RENAME TO bronze;"
    ))
    .map_err(|e| map_err("rebuild Bronze without its primary key", e))?;
    tx.commit().map_err(|e| map_err("commit", e))?;
    tracing::info!("rebuilt the warehouse's Bronze table without its primary key");
    Ok(())
}

/// Where the data lives: a private in-memory database must stay open; a file is opened for a
/// call and kept open as the handle's [`Holding`] says, so the calls of one relay (or of a busy
/// stretch of relays) share one opening.
enum Place {
    Memory(Connection),
    File { path: PathBuf, open: Option<Opened> },
}

/// A file's open connection, when it was opened and when a call last used it.
struct Opened {
    conn: Connection,
    since: Instant,
    used: Instant,
}

/// How long a file stays open. Every close checkpoints the write-ahead log into the file, and a
/// checkpoint rewrites the whole last row group of every table written since the previous one
/// (for indexed tables DuckDB appends into that group rather than starting a new one), so its
/// cost grows with the rows the group holds, not with what the relay wrote. Holding the file
/// across relays pays that once per hold instead of once per relay; analysts wait longer for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holding {
    /// How long the file may stay open while calls keep coming; zero closes it `LINGER` after
    /// each burst of calls.
    pub hold: Duration,
    /// How long an idle file stays open within the hold: longer than the gap between relays,
    /// or the hold never spans two.
    pub linger: Duration,
}

impl Holding {
    /// Kept across relays `relay_interval` apart for up to `hold`.
    pub fn across_relays(hold: Duration, relay_interval: Duration) -> Self {
        Self { hold, linger: relay_interval + LINGER }
    }

    /// When an opening is closed: idle for the linger, or, once the hold is used up, idle for
    /// [`LINGER`] (so an analyst gets in before the next relay, however far apart relays are).
    fn due_at(&self, opened: &Opened) -> Instant {
        let held = (opened.since + self.hold).max(opened.used + LINGER);
        (opened.used + self.linger).min(held)
    }

    /// Whether a call on a file open this long closes it right after: relays that follow each
    /// other with gaps under [`LINGER`] would otherwise keep it open, and its write-ahead log
    /// growing, for as long as the load lasts.
    fn overdue(&self, open_for: Duration) -> bool {
        open_for >= self.hold.max(LINGER) + self.linger
    }
}

impl Default for Holding {
    /// Closed `LINGER` after each burst of calls: an analyst gets in between any two relays.
    fn default() -> Self {
        Self { hold: Duration::ZERO, linger: LINGER }
    }
}

/// How long a file stays open after a call by default, and after the last call of a used-up
/// hold. Opening and closing (which checkpoints) cost tens of milliseconds; a relay makes a burst
/// of calls, then the file is free again for analysts.
const LINGER: Duration = Duration::from_millis(250);

/// The DuckDB warehouse. Calls are serialized (one writer), each on a blocking thread.
#[derive(Clone)]
pub struct DuckDbWarehouse {
    place: Arc<Mutex<Place>>,
    path: Option<PathBuf>,
    holding: Holding,
}

impl std::fmt::Debug for DuckDbWarehouse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DuckDbWarehouse").field("path", &self.path).finish_non_exhaustive()
    }
}

impl DuckDbWarehouse {
    /// Uses a warehouse file, creating it and its parent folders if needed. Fails now, not at the
    /// first write, when the file cannot be opened.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_holding(path, Holding::default()).await
    }

    /// [`open`](Self::open), keeping the file open as `holding` says.
    pub async fn open_holding(path: &Path, holding: Holding) -> Result<Self, StoreError> {
        let path = path.to_path_buf();
        let opened = path.clone();
        let place = tokio::task::spawn_blocking(move || -> Result<Arc<Mutex<Place>>, StoreError> {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| {
                    StoreError::unavailable(format!("cannot create warehouse folder {}: {e}", parent.display()))
                })?;
            }
            // The probe takes turns with this process's other handles on the file too.
            let place = shared_place(path);
            {
                let mut guard = place.lock();
                if let Place::File { path, open } = &mut *guard {
                    if open.is_none() {
                        close(open_file(path)?)?;
                    }
                    if pending_rewrite(path).exists() {
                        // A previous erasure deleted rows but did not get to rewrite the file.
                        rewrite_locked(path, open)?;
                    }
                }
            }
            Ok(place)
        })
        .await
        .map_err(|e| StoreError::unavailable(format!("duckdb warehouse open task failed: {e}")))??;
        Ok(Self { place, path: Some(opened), holding })
    }

    /// A private in-memory warehouse (tests, demos): gone when dropped.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        let conn =
            Connection::open_in_memory_with_flags(config()?).map_err(|e| map_err("open in-memory warehouse", e))?;
        Ok(Self { place: Arc::new(Mutex::new(Place::Memory(conn))), path: None, holding: Holding::default() })
    }

    /// The file, or `None` in memory.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let this = self.clone();
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let mut guard = this.place.lock();
            match &mut *guard {
                Place::Memory(conn) => f(conn),
                Place::File { path, open } => {
                    let (mut conn, since) = match open.take() {
                        Some(Opened { conn, since, .. }) => (conn, since),
                        None => (open_file(path)?, Instant::now()),
                    };
                    let result = f(&mut conn);
                    let used = Instant::now();
                    if result.is_ok() && !this.holding.overdue(used - since) {
                        let opened = Opened { conn, since, used };
                        // Scheduled here, not by the caller, which may stop waiting for the call.
                        runtime.spawn(this.clone().close_when_due(used, this.holding.due_at(&opened)));
                        *open = Some(opened);
                    } else if let Err(e) = close(conn) {
                        // A failed call may leave the connection unusable: start afresh. The
                        // call's own error is the one to report.
                        tracing::warn!(error = %e, "closing the DuckDB warehouse file after a call");
                    }
                    result
                }
            }
        })
        .await
        .map_err(|e| StoreError::unavailable(format!("duckdb warehouse task failed: {e}")))?
    }

    /// Closes the opening a call left at `used` when it is due, `at` (which only the opening's
    /// start and last use decide), so other processes can open the file. A later call on the
    /// same opening schedules its own close, and this one lets it be.
    async fn close_when_due(self, used: Instant, at: Instant) {
        tokio::time::sleep_until(at.into()).await;
        self.with_opening(move |open| match open.take() {
            Some(opened) if opened.used == used => close(opened.conn),
            other => {
                *open = other;
                Ok(())
            }
        })
        .await;
    }

    /// Runs `f` on the file's opening under its lock, on a blocking thread (closing checkpoints
    /// the write-ahead log into the file). An error is logged and gives `T::default()`.
    async fn with_opening<T: Default + Send + 'static>(
        &self,
        f: impl FnOnce(&mut Option<Opened>) -> Result<T, StoreError> + Send + 'static,
    ) -> T {
        let place = Arc::clone(&self.place);
        let done = tokio::task::spawn_blocking(move || match &mut *place.lock() {
            Place::File { open, .. } => f(open),
            Place::Memory(_) => Ok(T::default()),
        })
        .await
        .map_err(|e| StoreError::unavailable(format!("duckdb warehouse close task failed: {e}")))
        .and_then(|done| done);
        done.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "closing the DuckDB warehouse file failed");
            T::default()
        })
    }

    /// Appends rows to a temporary copy of `table`'s columns, then moves them in with `merge`
    /// (which reads `stage`), all in one transaction: all rows or none.
    async fn insert_rows<R: Send + 'static>(
        &self,
        table: &'static str,
        merge: String,
        rows: Vec<R>,
        append: fn(&mut Appender<'_>, &R) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        self.with_conn(move |conn| {
            let tx = conn.transaction().map_err(|e| map_err("begin", e))?;
            tx.execute_batch(&format!("CREATE OR REPLACE TEMP TABLE stage AS SELECT * FROM {table} LIMIT 0"))
                .map_err(|e| map_err("create the staging table", e))?;
            {
                let mut appender =
                    tx.appender_to_catalog_and_db("stage", "temp", "main").map_err(|e| map_err("append", e))?;
                for row in &rows {
                    append(&mut appender, row)
                        .map_err(|e| StoreError { message: format!("{table}: {}", e.message), ..e })?;
                }
                appender.flush().map_err(|e| map_err("append", e))?;
            }
            tx.execute_batch(&merge).map_err(|e| map_err("insert rows", e))?;
            tx.execute_batch("DROP TABLE temp.stage").map_err(|e| map_err("drop the staging table", e))?;
            tx.commit().map_err(|e| map_err("commit", e))
        })
        .await
    }
}

impl DuckDbWarehouse {
    /// GDPR: a DuckDB delete only marks rows, and a checkpoint leaves old blocks in the file's
    /// free list, so an erased value would stay readable in the bytes. Copying the database into
    /// a fresh file and putting it in place leaves nothing behind. It costs a pass over the
    /// warehouse per erasure; the sink's rows wait in the outbox meanwhile.
    async fn rewrite_file(&self) -> Result<(), StoreError> {
        let place = Arc::clone(&self.place);
        tokio::task::spawn_blocking(move || {
            let mut guard = place.lock();
            let Place::File { path, open } = &mut *guard else { return Ok(()) };
            if pending_rewrite(path).exists() {
                rewrite_locked(path, open)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| StoreError::unavailable(format!("duckdb warehouse rewrite task failed: {e}")))?
    }

    /// Notes, before a delete commits, that the file must be rewritten: if the rewrite then
    /// fails or the process dies, the next delete or the next start still does it (a retried
    /// erasure finds nothing left to delete, so it would not know to).
    fn mark_rewrite_pending(&self) -> Result<(), StoreError> {
        let Some(path) = &self.path else { return Ok(()) };
        let marker = pending_rewrite(path);
        std::fs::write(&marker, b"rewrite after erasure\n")
            .map_err(|e| StoreError::unavailable(format!("cannot write {}: {e}", marker.display())))
    }
}

/// The marker of a rewrite still owed after deletes.
fn pending_rewrite(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".rewrite-pending");
    PathBuf::from(name)
}

/// Copies the database into a fresh file and puts it in place of the old one (see
/// [`DuckDbWarehouse::rewrite_file`]); the caller holds the file's lock.
fn rewrite_locked(path: &Path, open: &mut Option<Opened>) -> Result<(), StoreError> {
    if let Some(opened) = open.take() {
        close(opened.conn)?;
    }
    let marker = pending_rewrite(path);
    // Through symlinks: the bytes to replace are the real file's.
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let fresh = path.with_extension("duckdb-rewrite");
    remove_if_present(&fresh)?;
    remove_if_present(&wal_of(&fresh))?;
    // Our own fixed statements, so this connection may attach a file.
    let config = duckdb::Config::default().threads(1).map_err(|e| map_err("configure", e))?;
    let conn = Connection::open_with_flags(&path, config).map_err(|e| open_error(&path, e))?;
    let copied = conn
        .query_row("SELECT current_database()", [], |r| r.get::<_, String>(0))
        .map_err(|e| map_err("name the database", e))
        .and_then(|name| {
            let quoted_path = fresh.display().to_string().replace('\'', "''");
            let quoted_name = name.replace('"', "\"\"");
            conn.execute_batch(&format!(
                "ATTACH '{quoted_path}' AS cohort_rewrite; \
                 COPY FROM DATABASE \"{quoted_name}\" TO cohort_rewrite; \
                 DETACH cohort_rewrite;"
            ))
            .map_err(|e| map_err("copy into a fresh file", e))
        });
    close(conn)?;
    copied?;
    std::fs::rename(&fresh, &path)
        .map_err(|e| StoreError::unavailable(format!("cannot replace warehouse {}: {e}", path.display())))?;
    remove_if_present(&wal_of(&path))?;
    remove_if_present(&marker)
}

/// One lock per file in this process. DuckDB's file lock is the operating system's, which does
/// not stop a second opening from the same process, and two DuckDB instances writing one file
/// corrupt it; so every handle on a file (the sink's, a test's, a replay's) takes turns.
fn shared_place(path: PathBuf) -> Arc<Mutex<Place>> {
    static OPEN: std::sync::OnceLock<Mutex<HashMap<PathBuf, Weak<Mutex<Place>>>>> = std::sync::OnceLock::new();
    // The folder exists by now (the file may not): canonical folder plus name names it stably.
    let key = match (path.parent().map(std::fs::canonicalize), path.file_name()) {
        (Some(Ok(dir)), Some(name)) => dir.join(name),
        _ => path.clone(),
    };
    let mut open = OPEN.get_or_init(|| Mutex::new(HashMap::new())).lock();
    open.retain(|_, place| place.strong_count() > 0);
    if let Some(place) = open.get(&key).and_then(Weak::upgrade) {
        return place;
    }
    let place = Arc::new(Mutex::new(Place::File { path, open: None }));
    open.insert(key, Arc::downgrade(&place));
    place
}

fn wal_of(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".wal");
    PathBuf::from(name)
}

fn remove_if_present(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::unavailable(format!("cannot remove {}: {e}", path.display()))),
    }
}

/// One DuckDB worker thread: the warehouse is written in the background, and DuckDB's default
/// (a thread per core) would take every core from the pipeline and the Profile API. Query SQL
/// comes from API users (batch segments), so it may not touch other files or fetch extensions
/// (`read_text('...kek')`, `COPY ... TO`), nor change these settings. The write-ahead log is
/// checkpointed when the file closes, not every 16 MB (DuckDB's default): each checkpoint
/// rewrites the tables' last row groups (see [`Holding`]), and a file is closed after at most a
/// hold and a linger ([`Holding::overdue`]), which bounds the log.
fn config() -> Result<duckdb::Config, StoreError> {
    duckdb::Config::default()
        .threads(1)
        .and_then(|c| c.with("checkpoint_threshold", "1GB"))
        .and_then(|c| c.enable_external_access(false))
        .and_then(|c| c.enable_autoload_extension(false))
        .and_then(|c| c.with("autoinstall_known_extensions", "false"))
        .and_then(|c| c.with("lock_configuration", "true"))
        .map_err(|e| map_err("configure", e))
}

fn open_file(path: &Path) -> Result<Connection, StoreError> {
    Connection::open_with_flags(path, config()?).map_err(|e| open_error(path, e))
}

fn open_error(path: &Path, e: duckdb::Error) -> StoreError {
    let err = map_err(&format!("cannot open warehouse {}", path.display()), e);
    if err.message.contains("Could not set lock") {
        // The usual cause: an analyst's session has the file open.
        StoreError::unavailable(format!(
            "{} (another process has the file open; rows wait in the outbox until it closes it)",
            err.message
        ))
    } else {
        err
    }
}

fn close(conn: Connection) -> Result<(), StoreError> {
    conn.close().map_err(|(_, e)| map_err("close", e))
}

/// DuckDB reports one error code for nearly everything; its message names the class.
fn map_err(context: &str, e: duckdb::Error) -> StoreError {
    let message = format!("duckdb warehouse: {context}: {e}");
    let text = e.to_string();
    if text.contains("INTERNAL Error")
        || text.contains("Serialization Error")
        || text.contains("Corrupt")
        || text.contains("corrupt")
        || text.contains("not a valid DuckDB database")
    {
        StoreError::corrupt(message)
    } else if text.starts_with("IO Error") || text.contains("Could not set lock") || text.contains("Out of Memory") {
        StoreError::unavailable(message)
    } else {
        StoreError::invalid(message)
    }
}

/// UTC as DuckDB's zone-less `TIMESTAMP`.
fn naive(t: DateTime<Utc>) -> NaiveDateTime {
    t.naive_utc()
}

fn micros_of(unit: TimeUnit, v: i64) -> i64 {
    match unit {
        TimeUnit::Second => v.saturating_mul(1_000_000),
        TimeUnit::Millisecond => v.saturating_mul(1_000),
        TimeUnit::Microsecond => v,
        TimeUnit::Nanosecond => v / 1_000,
    }
}

/// One result value as JSON, normalized like the other backends (see [`QueryResult`]). Nested
/// values (lists, structs, maps) come back as DuckDB prints them: `to_json(col)` gives JSON.
fn sql_value(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Boolean(b) => Value::Bool(b),
        ValueRef::TinyInt(i) => Value::from(i),
        ValueRef::SmallInt(i) => Value::from(i),
        ValueRef::Int(i) => Value::from(i),
        ValueRef::BigInt(i) => Value::from(i),
        ValueRef::UTinyInt(i) => Value::from(i),
        ValueRef::USmallInt(i) => Value::from(i),
        ValueRef::UInt(i) => Value::from(i),
        ValueRef::UBigInt(i) => Value::from(i),
        ValueRef::HugeInt(i) => i64::try_from(i).map_or_else(|_| Value::String(i.to_string()), Value::from),
        ValueRef::UHugeInt(i) => u64::try_from(i).map_or_else(|_| Value::String(i.to_string()), Value::from),
        ValueRef::Float(f) => serde_json::Number::from_f64(f64::from(f)).map_or(Value::Null, Value::Number),
        ValueRef::Double(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
        ValueRef::Decimal(d) => {
            d.to_string().parse::<f64>().ok().and_then(serde_json::Number::from_f64).map_or(Value::Null, Value::Number)
        }
        ValueRef::Timestamp(unit, v) => DateTime::<Utc>::from_timestamp_micros(micros_of(unit, v))
            .map_or(Value::Null, |t| Value::String(format_timestamp(t))),
        ValueRef::Date32(days) => chrono::NaiveDate::from_ymd_opt(1970, 1, 1)
            .and_then(|epoch| epoch.checked_add_signed(chrono::Duration::days(i64::from(days))))
            .map_or(Value::Null, |d| Value::String(d.format("%Y-%m-%d").to_string())),
        ValueRef::Text(t) => Value::String(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
        other => Value::String(format!("{:?}", other.to_owned())),
    }
}

/// `@name` → `$name` (DuckDB's spelling) outside string literals, quoted identifiers and
/// comments, so the SQL written for the other backends runs unchanged.
fn duckdb_params(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                out.push(c);
                // A doubled quote inside the literal closes and reopens it: same result.
                for inner in chars.by_ref() {
                    out.push(inner);
                    if inner == c {
                        break;
                    }
                }
            }
            '-' if chars.peek() == Some(&'-') => {
                out.push(c);
                for inner in chars.by_ref() {
                    out.push(inner);
                    if inner == '\n' {
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                out.push(c);
                let mut prev = '\0';
                for inner in chars.by_ref() {
                    out.push(inner);
                    if prev == '*' && inner == '/' {
                        break;
                    }
                    prev = inner;
                }
            }
            '@' if chars.peek().is_some_and(|n| n.is_ascii_alphabetic() || *n == '_') => out.push('$'),
            _ => out.push(c),
        }
    }
    out
}

fn run_query(conn: &Connection, sql: &str, params: &[(String, QueryValue)]) -> Result<QueryResult, StoreError> {
    let mut stmt = conn.prepare(&duckdb_params(sql)).map_err(|e| map_err("prepare query", e))?;
    let mut named = Vec::with_capacity(params.len());
    for (name, value) in params {
        named.push((param_name(name)?, value));
    }
    for idx in 1..=stmt.parameter_count() {
        let placeholder = stmt.parameter_name(idx).map_err(|e| map_err("read query parameters", e))?;
        if placeholder.is_empty() || placeholder.chars().all(|c| c.is_ascii_digit()) {
            return Err(StoreError::invalid("positional query parameters are not supported: use @name"));
        }
        let Some((_, value)) = named.iter().find(|(n, _)| *n == placeholder) else {
            return Err(StoreError::invalid(format!("query parameter @{placeholder} has no value")));
        };
        let bound = match value {
            QueryValue::String(s) => stmt.raw_bind_parameter(idx, s.as_str()),
            QueryValue::Int64(i) => stmt.raw_bind_parameter(idx, *i),
            QueryValue::Float64(f) => stmt.raw_bind_parameter(idx, *f),
            QueryValue::Bool(b) => stmt.raw_bind_parameter(idx, *b),
            QueryValue::Timestamp(t) => stmt.raw_bind_parameter(idx, naive(*t)),
        };
        bound.map_err(|e| map_err("bind query parameter", e))?;
    }
    stmt.raw_execute().map_err(|e| map_err("run query", e))?;
    let columns = stmt.column_names();
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
impl Warehouse for DuckDbWarehouse {
    async fn ensure_schema(&self) -> Result<(), StoreError> {
        self.with_conn(|conn| {
            ensure_bronze(conn)?;
            conn.execute_batch(SCHEMA).map_err(|e| map_err("create schema", e))
        })
        .await
    }

    async fn write_bronze(&self, rows: Vec<BronzeRow>) -> Result<(), StoreError> {
        let seqs = rows.iter().map(|r| r.raw_seq);
        let (low, high) = (seqs.clone().min(), seqs.max());
        let (low, high) = (to_i64(low.unwrap_or(0), "raw_seq")?, to_i64(high.unwrap_or(0), "raw_seq")?);
        self.insert_rows(
            "bronze",
            format!(
                "INSERT INTO bronze SELECT * FROM temp.stage \
                 WHERE raw_seq NOT IN (SELECT raw_seq FROM bronze WHERE raw_seq BETWEEN {low} AND {high}) \
                 QUALIFY row_number() OVER (PARTITION BY raw_seq) = 1"
            ),
            rows,
            |app, r| {
                app.append_row(params![
                    to_i64(r.raw_seq, "raw_seq")?,
                    r.source.as_str(),
                    r.format,
                    r.content_type,
                    naive(r.received_at),
                    r.payload_encoding.as_str(),
                    r.payload,
                ])
                .map_err(|e| map_err("append row", e))
            },
        )
        .await
    }

    async fn write_silver(&self, rows: Vec<SilverRow>) -> Result<(), StoreError> {
        self.insert_rows(
            "silver",
            "INSERT OR IGNORE INTO silver SELECT * FROM temp.stage \
             QUALIFY row_number() OVER (PARTITION BY event_id) = 1"
                .to_string(),
            rows,
            |app, r| {
                app.append_row(params![
                    r.event_id.as_str(),
                    r.profile_id.as_str(),
                    r.source.as_str(),
                    r.kind.as_str(),
                    r.name,
                    naive(r.occurred_at),
                    naive(r.received_at),
                    json_text(&r.identifiers)?,
                    json_text(&r.traits)?,
                    json_text(&r.properties)?,
                    opt_json_text(&r.utm)?,
                    r.raw_seq.map(|s| to_i64(s, "raw_seq")).transpose()?,
                ])
                .map_err(|e| map_err("append row", e))
            },
        )
        .await
    }

    async fn write_gold_profiles(&self, rows: Vec<GoldProfileRow>) -> Result<(), StoreError> {
        // The newest snapshot per profile in the batch, and never over a newer stored one.
        self.insert_rows(
            "gold_profiles",
            "INSERT INTO gold_profiles SELECT * FROM temp.stage \
             QUALIFY row_number() OVER (PARTITION BY profile_id ORDER BY snapshot_at DESC) = 1 \
             ON CONFLICT (profile_id) DO UPDATE SET \
               snapshot_at = excluded.snapshot_at, traits = excluded.traits, \
               counters = excluded.counters, identifiers = excluded.identifiers, \
               events_total = excluded.events_total, first_seen = excluded.first_seen, \
               last_seen = excluded.last_seen, merged_into = excluded.merged_into \
             WHERE excluded.snapshot_at >= gold_profiles.snapshot_at"
                .to_string(),
            rows,
            |app, r| {
                app.append_row(params![
                    r.profile_id.as_str(),
                    naive(r.snapshot_at),
                    json_text(&r.traits)?,
                    json_text(&r.counters)?,
                    json_text(&r.identifiers)?,
                    to_i64(r.events_total, "events_total")?,
                    r.first_seen.map(naive),
                    r.last_seen.map(naive),
                    r.merged_into.as_ref().map(|p| p.as_str().to_string()),
                ])
                .map_err(|e| map_err("append row", e))
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
        self.mark_rewrite_pending()?;
        let outcome = self
            .with_conn(move |conn| {
                let tx = conn.transaction().map_err(|e| map_err("begin", e))?;
                // Bronze first: the person's Silver rows are what say which raw payloads were theirs.
                let bronze = tx
                    .execute(
                        "DELETE FROM bronze WHERE raw_seq IN \
                     (SELECT raw_seq FROM silver WHERE profile_id = ? AND raw_seq IS NOT NULL)",
                        [&id],
                    )
                    .map_err(|e| map_err("delete bronze", e))?;
                let silver = tx
                    .execute("DELETE FROM silver WHERE profile_id = ?", [&id])
                    .map_err(|e| map_err("delete silver", e))?;
                let gold = tx
                    .execute("DELETE FROM gold_profiles WHERE profile_id = ?", [&id])
                    .map_err(|e| map_err("delete gold", e))?;
                tx.commit().map_err(|e| map_err("commit delete", e))?;
                Ok(profile_deleted(bronze, silver, gold))
            })
            .await?;
        self.rewrite_file().await?;
        Ok(outcome)
    }

    async fn raw_payloads(&self, after: u64, limit: usize) -> Result<Vec<(u64, String)>, StoreError> {
        let (after, limit) = (i64::try_from(after).unwrap_or(i64::MAX), i64::try_from(limit).unwrap_or(i64::MAX));
        self.with_conn(move |conn| {
            let mut stmt = conn
                .prepare("SELECT raw_seq, payload FROM bronze WHERE raw_seq > ? ORDER BY raw_seq LIMIT ?")
                .map_err(|e| map_err("read bronze", e))?;
            let rows = stmt
                .query_map(params![after, limit], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
                .map_err(|e| map_err("read bronze", e))?;
            rows.map(|r| r.map(|(s, p)| (s.max(0) as u64, p)).map_err(|e| map_err("read bronze", e))).collect()
        })
        .await
    }

    async fn delete_raw(&self, seqs: &[u64]) -> Result<DeleteOutcome, StoreError> {
        let seqs: Vec<i64> = seqs.iter().filter_map(|s| i64::try_from(*s).ok()).collect();
        self.mark_rewrite_pending()?;
        let outcome = self
            .with_conn(move |conn| {
                let tx = conn.transaction().map_err(|e| map_err("begin", e))?;
                let mut n = 0;
                // Integers only, so listing them in the SQL is safe, and one statement per thousand.
                for chunk in seqs.chunks(1000) {
                    let list: Vec<String> = chunk.iter().map(i64::to_string).collect();
                    n += tx
                        .execute(&format!("DELETE FROM bronze WHERE raw_seq IN ({})", list.join(",")), [])
                        .map_err(|e| map_err("delete bronze", e))?;
                }
                tx.commit().map_err(|e| map_err("commit delete", e))?;
                Ok(DeleteOutcome { rows_deleted: n as u64, retry_later: false, detail: format!("bronze: {n} deleted") })
            })
            .await?;
        self.rewrite_file().await?;
        Ok(outcome)
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

    /// Closes the file now rather than when its holding says.
    async fn release(&self) {
        self.with_opening(|open| open.take().map_or(Ok(()), |opened| close(opened.conn))).await;
    }

    fn table(&self, layer: Layer) -> String {
        layer.view_name().to_string()
    }

    fn backend(&self) -> &'static str {
        "duckdb"
    }

    fn runs_in_process(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::warehouse::PayloadEncoding;
    use cohort_messages::Source;

    fn bronze(raw_seq: u64) -> BronzeRow {
        BronzeRow {
            raw_seq,
            source: Source::Web,
            format: "segment_batch".into(),
            content_type: "application/json".into(),
            received_at: Utc::now(),
            payload_encoding: PayloadEncoding::Utf8,
            payload: format!("{{\"batch\":[{raw_seq}]}}"),
        }
    }

    /// When the open file was opened, or `None` when it is closed.
    fn opened_since(w: &DuckDbWarehouse) -> Option<Instant> {
        match &*w.place.lock() {
            Place::File { open, .. } => open.as_ref().map(|o| o.since),
            Place::Memory(_) => None,
        }
    }

    /// A file warehouse in `dir` kept open as `holding` says, its schema created.
    async fn held(dir: &tempfile::TempDir, hold: Duration, linger: Duration) -> DuckDbWarehouse {
        let w = DuckDbWarehouse::open_holding(&dir.path().join("held.duckdb"), Holding { hold, linger }).await.unwrap();
        w.ensure_schema().await.unwrap();
        w
    }

    /// `n` one-row relays 100 ms apart: closer than [`LINGER`], so no gap lets the file close.
    async fn relays_without_a_gap(w: &DuckDbWarehouse, n: u64) {
        for seq in 0..n {
            tokio::time::sleep(Duration::from_millis(100)).await;
            w.write_bronze(vec![bronze(seq)]).await.unwrap();
        }
    }

    fn wal_len(w: &DuckDbWarehouse) -> u64 {
        w.path().and_then(|p| std::fs::metadata(wal_of(p)).ok()).map_or(0, |m| m.len())
    }

    #[tokio::test]
    async fn a_held_file_stays_open_across_relays_and_is_checkpointed_when_they_go_quiet() {
        let dir = tempfile::tempdir().unwrap();
        let w = held(&dir, Duration::from_secs(30), Duration::from_millis(900)).await;
        w.write_bronze(vec![bronze(1)]).await.unwrap();
        let first = opened_since(&w).expect("open after a write");
        // Past the default linger, within this one: the next relay finds the same opening.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(opened_since(&w), Some(first));
        // More than DuckDB's default checkpoint threshold (16 MB) in one relay.
        let big: Vec<BronzeRow> =
            (2..22).map(|seq| BronzeRow { payload: "x".repeat(1 << 20), ..bronze(seq) }).collect();
        w.write_bronze(big).await.unwrap();
        w.write_bronze(vec![bronze(22)]).await.unwrap();
        assert_eq!(opened_since(&w), Some(first));
        // The committed rows wait in the write-ahead log until the file closes.
        assert!(wal_len(&w) > 16 << 20, "write-ahead log of {} bytes", wal_len(&w));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(opened_since(&w), None);
        assert_eq!(wal_len(&w), 0);
        assert_eq!(w.count_rows(Layer::Bronze).await.unwrap(), 22);
    }

    #[tokio::test]
    async fn a_file_held_past_its_hold_is_closed_soon_after_its_last_call() {
        let dir = tempfile::tempdir().unwrap();
        let w = held(&dir, Duration::from_millis(300), Duration::from_secs(30)).await;
        let first = opened_since(&w).expect("open after a call");
        relays_without_a_gap(&w, 4).await;
        assert_eq!(opened_since(&w), Some(first), "calls keep coming: the opening is reused past the hold");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(opened_since(&w), None, "the hold is used up: closed a short linger after the call");
    }

    #[tokio::test]
    async fn a_held_file_is_closed_when_its_hold_ends_however_far_apart_relays_are() {
        let dir = tempfile::tempdir().unwrap();
        // Relays a minute apart: the linger would keep the file open that long.
        let w = held(&dir, Duration::from_millis(300), Duration::from_secs(60)).await;
        assert!(opened_since(&w).is_some());
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(opened_since(&w), None);
    }

    #[tokio::test]
    async fn relays_without_a_gap_close_the_file_once_it_is_open_a_hold_and_a_linger() {
        let dir = tempfile::tempdir().unwrap();
        let w = held(&dir, Duration::from_millis(300), Duration::from_millis(400)).await;
        let first = opened_since(&w).expect("open after a call");
        relays_without_a_gap(&w, 12).await;
        assert_ne!(opened_since(&w), Some(first), "closed (and reopened) after 700 ms open");
    }

    #[tokio::test]
    #[allow(clippy::await_holding_lock)] // holding the file's lock is how the call is made to wait
    async fn a_call_its_caller_stopped_waiting_for_still_closes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let w = DuckDbWarehouse::open(&dir.path().join("plain.duckdb")).await.unwrap();
        let busy = w.place.lock();
        let gave_up = tokio::time::timeout(Duration::from_millis(50), w.ensure_schema()).await;
        assert!(gave_up.is_err(), "the call waits for the lock");
        drop(busy);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(opened_since(&w).is_some(), "the call ran without its caller");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(opened_since(&w), None);
    }

    #[tokio::test]
    async fn by_default_a_file_is_closed_a_short_linger_after_each_call() {
        let dir = tempfile::tempdir().unwrap();
        let w = DuckDbWarehouse::open(&dir.path().join("plain.duckdb")).await.unwrap();
        w.ensure_schema().await.unwrap();
        assert!(opened_since(&w).is_some());
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(opened_since(&w), None);
    }

    #[test]
    fn named_parameters_are_respelled_outside_literals_and_comments() {
        assert_eq!(
            duckdb_params("SELECT * FROM t WHERE a = @a AND b > @b_2"),
            "SELECT * FROM t WHERE a = $a AND b > $b_2"
        );
        assert_eq!(duckdb_params("SELECT '@a', \"@b\" FROM t WHERE c = @c"), "SELECT '@a', \"@b\" FROM t WHERE c = $c");
        assert_eq!(duckdb_params("SELECT 'it''s @x' -- @y\n, @z /* @w */"), "SELECT 'it''s @x' -- @y\n, $z /* @w */");
        assert_eq!(duckdb_params("SELECT 'a@b.example'"), "SELECT 'a@b.example'");
        assert_eq!(duckdb_params("SELECT @1"), "SELECT @1");
    }
}
