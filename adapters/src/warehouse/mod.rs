//! The warehouse: Bronze (raw payloads), Silver (normalized, deduplicated events) and Gold (profile
//! snapshots), the medallion layers analysts and batch segments query with SQL.
//!
//! Backends behind one trait, chosen by URL (see [`open_warehouse`]): an embedded DuckDB file (the
//! default, so `cohort` runs with nothing installed; analysts open it with `duckdb`), BigQuery in
//! production, and SQLite for those who want a file that other processes can read while Cohort
//! writes it. Writes are at-least-once: every layer has
//! a natural key (Bronze `raw_seq`, Silver `event_id`, Gold `profile_id` + `snapshot_at`) and each
//! layer has a relation that shows one row per key ([`Warehouse::table`]), so a replay after a
//! crash never double-counts.

mod bigquery;
mod disabled;
mod duckdb;
mod sqlite;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use cohort_messages::{CustomerEvent, EventId, EventKind, ProfileId, ProfileRecord, Source};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{BronzeRecord, StoreError};

pub use bigquery::{BigQueryAuth, BigQueryConfig, BigQueryWarehouse};
pub use disabled::DisabledWarehouse;
pub use duckdb::{DuckDbWarehouse, Holding};
pub use sqlite::SqliteWarehouse;

/// The three medallion layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    Bronze,
    Silver,
    Gold,
}

impl Layer {
    pub const ALL: [Layer; 3] = [Layer::Bronze, Layer::Silver, Layer::Gold];

    pub fn as_str(self) -> &'static str {
        match self {
            Layer::Bronze => "bronze",
            Layer::Silver => "silver",
            Layer::Gold => "gold",
        }
    }

    /// The table rows are written to. On BigQuery it may hold duplicates (streaming inserts are
    /// at-least-once) and every Gold snapshot; query [`Layer::view_name`] instead.
    pub fn table_name(self) -> &'static str {
        match self {
            Layer::Bronze => "bronze",
            Layer::Silver => "silver",
            Layer::Gold => "gold_profiles",
        }
    }

    /// The view with one row per natural key: what analysts, batch segments and
    /// [`Warehouse::count_rows`] read. Both backends create it, so SQL written against it ports.
    pub fn view_name(self) -> &'static str {
        match self {
            Layer::Bronze => "bronze_dedup",
            Layer::Silver => "silver_dedup",
            Layer::Gold => "gold_profiles_latest",
        }
    }
}

/// How a Bronze payload's bytes are kept in its text column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadEncoding {
    /// The body was valid UTF-8 and is stored as is (lossless and readable in SQL).
    Utf8,
    /// The body was not UTF-8 (binary, or a legacy charset): standard base64 with padding.
    Base64,
}

impl PayloadEncoding {
    pub fn as_str(self) -> &'static str {
        match self {
            PayloadEncoding::Utf8 => "utf8",
            PayloadEncoding::Base64 => "base64",
        }
    }
}

/// A raw payload exactly as received (Bronze), keyed by its journal sequence number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BronzeRow {
    pub raw_seq: u64,
    pub source: Source,
    pub format: String,
    pub content_type: String,
    pub received_at: DateTime<Utc>,
    pub payload_encoding: PayloadEncoding,
    /// The body as text: verbatim when it is UTF-8, otherwise base64 (see `payload_encoding`).
    pub payload: String,
}

impl BronzeRow {
    /// Keeps UTF-8 bodies readable and still round-trips arbitrary bytes: both warehouses only
    /// take valid UTF-8 in text columns.
    pub fn from_record(raw_seq: u64, record: &BronzeRecord) -> Self {
        let (payload_encoding, payload) = match std::str::from_utf8(&record.body) {
            Ok(text) => (PayloadEncoding::Utf8, text.to_string()),
            Err(_) => (PayloadEncoding::Base64, base64::engine::general_purpose::STANDARD.encode(&record.body)),
        };
        Self {
            raw_seq,
            source: record.source,
            format: record.format.clone(),
            content_type: record.content_type.clone(),
            received_at: record.received_at,
            payload_encoding,
            payload,
        }
    }

    /// The original bytes of the payload.
    pub fn body(&self) -> Result<Vec<u8>, StoreError> {
        match self.payload_encoding {
            PayloadEncoding::Utf8 => Ok(self.payload.as_bytes().to_vec()),
            PayloadEncoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(&self.payload)
                .map_err(|e| StoreError::corrupt(format!("bronze row {}: bad base64 payload: {e}", self.raw_seq))),
        }
    }
}

/// A normalized event attributed to a profile (Silver), unique by `event_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SilverRow {
    pub event_id: EventId,
    pub profile_id: ProfileId,
    pub source: Source,
    pub kind: EventKind,
    pub name: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    /// JSON array of `{"kind": ..., "value": ...}`.
    pub identifiers: Value,
    /// JSON object of canonical trait names to values.
    pub traits: Value,
    /// JSON object of event properties.
    pub properties: Value,
    /// JSON object of UTM campaign parameters, `null` when the event had none (kept as its own
    /// column because campaign attribution is the most common analyst question).
    pub utm: Value,
    /// The Bronze row this event was normalized from, once it was journaled.
    pub raw_seq: Option<u64>,
}

impl SilverRow {
    pub fn from_event(event: &CustomerEvent, profile_id: &ProfileId) -> Self {
        Self {
            event_id: event.event_id.clone(),
            profile_id: profile_id.clone(),
            source: event.source,
            kind: event.kind,
            name: event.name.clone(),
            occurred_at: event.occurred_at,
            received_at: event.received_at,
            identifiers: Value::Array(
                event
                    .identifiers
                    .iter()
                    .map(|i| serde_json::json!({"kind": i.kind.as_str(), "value": i.value}))
                    .collect(),
            ),
            traits: Value::Object(event.traits.clone()),
            properties: Value::Object(event.properties.clone()),
            utm: if event.utm.is_empty() {
                Value::Null
            } else {
                serde_json::to_value(&event.utm).unwrap_or(Value::Null)
            },
            raw_seq: event.raw.seq,
        }
    }
}

/// A snapshot of a profile's golden record (Gold).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoldProfileRow {
    pub profile_id: ProfileId,
    pub snapshot_at: DateTime<Utc>,
    /// JSON object of trait name to value (the golden record's values, without provenance, so
    /// `JSON_VALUE(traits, '$.email')` / `traits ->> '$.email'` work directly).
    pub traits: Value,
    /// JSON of the profile's counters (`events_total`, `by_source`, `by_kind`, ...).
    pub counters: Value,
    /// JSON array of linked identifiers with their source and first-seen time.
    pub identifiers: Value,
    pub events_total: u64,
    pub first_seen: Option<DateTime<Utc>>,
    pub last_seen: Option<DateTime<Utc>>,
    pub merged_into: Option<ProfileId>,
}

impl GoldProfileRow {
    /// A snapshot taken at `snapshot_at`.
    pub fn from_record_at(record: &ProfileRecord, snapshot_at: DateTime<Utc>) -> Self {
        let traits: serde_json::Map<String, Value> =
            record.traits.iter().map(|(k, t)| (k.clone(), t.value.clone())).collect();
        Self {
            profile_id: record.profile_id.clone(),
            snapshot_at,
            traits: Value::Object(traits),
            counters: serde_json::to_value(&record.counters).unwrap_or(Value::Null),
            identifiers: serde_json::to_value(&record.identifiers).unwrap_or(Value::Array(Vec::new())),
            events_total: record.counters.events_total,
            first_seen: record.counters.first_seen,
            last_seen: record.counters.last_seen,
            merged_into: record.merged_into.clone(),
        }
    }

    /// A snapshot stamped with the record's `updated_at`, so writing the same state twice (a
    /// replay) yields the same row and the latest-snapshot view stays exact.
    pub fn from_record(record: &ProfileRecord) -> Self {
        Self::from_record_at(record, record.updated_at)
    }
}

/// Warehouse rows produced by one profile flush, waiting in the operational store's outbox.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WarehouseBatch {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bronze: Vec<BronzeRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub silver: Vec<SilverRow>,
    /// Profiles whose Gold snapshot is stale, by id: the relay loads their stored records. Only
    /// outbox entries written before Gold rows travelled with the flush carry these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gold: Vec<ProfileId>,
    /// Gold snapshots of the profiles a flush wrote, taken from the records it had in hand:
    /// loading and opening every record again at relay cost a quarter of the CPU. The relay
    /// writes the newest per profile, so a profile changed by many flushes is still one row.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gold_rows: Vec<GoldProfileRow>,
}

impl WarehouseBatch {
    pub fn is_empty(&self) -> bool {
        self.bronze.is_empty() && self.silver.is_empty() && self.gold.is_empty() && self.gold_rows.is_empty()
    }

    pub fn rows(&self) -> usize {
        self.bronze.len() + self.silver.len() + self.gold.len() + self.gold_rows.len()
    }

    /// Appends another batch's rows.
    pub fn extend(&mut self, other: WarehouseBatch) {
        self.bronze.extend(other.bronze);
        self.silver.extend(other.silver);
        self.gold.extend(other.gold);
        self.gold_rows.extend(other.gold_rows);
    }

    /// Splits into batches of at most `max_rows` rows each (at least one row per batch), so no
    /// stored outbox document outgrows a backend's size limit.
    pub fn split(mut self, max_rows: usize) -> Vec<WarehouseBatch> {
        let max_rows = max_rows.max(1);
        if self.rows() <= max_rows {
            return if self.is_empty() { Vec::new() } else { vec![self] };
        }
        let mut out = Vec::new();
        let mut current = WarehouseBatch::default();
        let take = |current: &mut WarehouseBatch, out: &mut Vec<WarehouseBatch>| {
            if current.rows() >= max_rows {
                out.push(std::mem::take(current));
            }
        };
        for row in std::mem::take(&mut self.bronze) {
            current.bronze.push(row);
            take(&mut current, &mut out);
        }
        for row in std::mem::take(&mut self.silver) {
            current.silver.push(row);
            take(&mut current, &mut out);
        }
        for id in std::mem::take(&mut self.gold) {
            current.gold.push(id);
            take(&mut current, &mut out);
        }
        for row in std::mem::take(&mut self.gold_rows) {
            current.gold_rows.push(row);
            take(&mut current, &mut out);
        }
        if !current.is_empty() {
            out.push(current);
        }
        out
    }
}

/// A named query parameter value (`@name` in SQL on both backends).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum QueryValue {
    String(String),
    Int64(i64),
    Float64(f64),
    Bool(bool),
    Timestamp(DateTime<Utc>),
}

/// Rows of a query, values normalized across backends: integers and floats as JSON numbers,
/// booleans as booleans, timestamps as RFC 3339 strings in UTC with microseconds (see
/// [`format_timestamp`]), JSON columns as their JSON text, NULL as `null`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueryResult {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

impl QueryResult {
    /// The values of one column, by name.
    pub fn column(&self, name: &str) -> Option<Vec<&Value>> {
        let idx = self.columns.iter().position(|c| c == name)?;
        Some(self.rows.iter().filter_map(|r| r.get(idx)).collect())
    }
}

/// What a GDPR delete achieved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteOutcome {
    pub rows_deleted: u64,
    /// BigQuery refused the DML because rows are still in the streaming buffer (up to ~90 min
    /// after an insert): the GDPR saga must call again later; deletes are idempotent.
    pub retry_later: bool,
    /// Per-table account, safe to log (no personal data).
    pub detail: String,
}

/// Bronze/Silver/Gold storage for analytics. Writes are batched by the caller (the warehouse
/// sink) and idempotent under replay; see the module docs for the dedup rules.
#[async_trait]
pub trait Warehouse: Send + Sync + 'static {
    /// Creates datasets, tables, indexes and views that are missing; safe to call at every start.
    async fn ensure_schema(&self) -> Result<(), StoreError>;
    /// Raw payloads as received; a `raw_seq` written twice is kept once.
    async fn write_bronze(&self, rows: Vec<BronzeRow>) -> Result<(), StoreError>;
    /// The largest request body whose raw payload one Bronze row takes, where the warehouse
    /// limits a row's size; requests above it are refused at the edge (413). `None`: no limit.
    fn max_raw_payload_bytes(&self) -> Option<usize> {
        None
    }
    /// Normalized events; an `event_id` written twice is kept once.
    async fn write_silver(&self, rows: Vec<SilverRow>) -> Result<(), StoreError>;
    /// Profile snapshots; the latest `snapshot_at` per profile is what [`Layer::Gold`] shows.
    async fn write_gold_profiles(&self, rows: Vec<GoldProfileRow>) -> Result<(), StoreError>;
    /// Runs SQL with named parameters (`@name`; give names with or without the `@`). Use
    /// [`Warehouse::table`] to name the layers so the SQL runs on every backend.
    async fn query(&self, sql: &str, params: &[(String, QueryValue)]) -> Result<QueryResult, StoreError>;
    /// GDPR erasure: deletes the profile's Silver and Gold rows and the Bronze payloads its
    /// Silver rows came from (a payload that also held other people goes too: Bronze is kept
    /// whole or not at all). A merged profile's absorbed ids (`merged_from`) are separate
    /// profile ids: call this for each of them too.
    async fn delete_profile(&self, profile_id: &ProfileId) -> Result<DeleteOutcome, StoreError>;
    /// Bronze payloads with `raw_seq > after`, in order, at most `limit`, as stored (sealed
    /// when the warehouse keeps no personal data in the clear): what a GDPR erasure scans for
    /// payloads that mention the person but reached none of their Silver rows.
    async fn raw_payloads(&self, after: u64, limit: usize) -> Result<Vec<(u64, String)>, StoreError>;
    /// Deletes Bronze rows by `raw_seq` (GDPR erasure). Idempotent.
    async fn delete_raw(&self, seqs: &[u64]) -> Result<DeleteOutcome, StoreError>;
    /// Rows of the layer's deduplicated view ([`Layer::view_name`]): payloads, events, profiles.
    async fn count_rows(&self, layer: Layer) -> Result<u64, StoreError>;
    /// Lets go of what is kept open between calls (a DuckDB file held across relays), so that
    /// other processes can open it now: at shutdown. The next call opens it again.
    async fn release(&self) {}
    /// The SQL name of the layer's deduplicated view, qualified as the backend needs it (plain on
    /// SQLite; `` `project.dataset.view` `` on BigQuery, whose emulator ignores default datasets).
    fn table(&self, layer: Layer) -> String;
    /// The backend's name, for logs and health output.
    fn backend(&self) -> &'static str;
    /// Whether writes run on this process's own cores (an embedded engine), so that a large one
    /// takes CPU from the event path; timed relays to such a warehouse are paced.
    fn runs_in_process(&self) -> bool {
        false
    }
}

/// Bronze rows whose payload (opened with `open`, for sealed payloads) mentions the person.
pub async fn raw_mentioning(
    w: &dyn Warehouse,
    target: &cohort_messages::ErasureTarget,
    open: impl Fn(&str) -> String,
) -> Result<Vec<u64>, StoreError> {
    const PAGE: usize = 1000;
    let needles = target.needles();
    let mut found = Vec::new();
    let mut after = 0;
    loop {
        let page = w.raw_payloads(after, PAGE).await?;
        let full = page.len() == PAGE;
        for (seq, payload) in &page {
            if target.mentions(&needles, open(payload).as_bytes()) {
                found.push(*seq);
            }
        }
        match page.last() {
            Some((last, _)) if full => after = *last,
            _ => return Ok(found),
        }
    }
}

/// The one timestamp text format both backends store and return: RFC 3339, UTC, microseconds
/// (fixed width, so text comparison is time order in SQLite).
pub fn format_timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Accepted URL forms, for error messages.
const ACCEPTED: &str = "duckdb://PATH, duckdb::memory:, memory://, sqlite://PATH, sqlite::memory:, \
    bigquery://PROJECT/DATASET[?endpoint=URL&credentials=KEY.json&location=LOC] or none://";

/// Opens the warehouse a URL names. Does not create tables: call [`Warehouse::ensure_schema`].
///
/// - `duckdb://PATH` (a file, parent folders created; `duckdb:///abs/path` for absolute paths),
///   `duckdb::memory:` or `memory://` (in memory, for tests);
/// - `sqlite://PATH` or `sqlite::memory:`, the same on SQLite;
/// - `bigquery://PROJECT/DATASET` with optional `endpoint=` (an emulator's
///   `http://HOST:PORT/bigquery/v2`; then a dummy token is sent), `credentials=` (a service-account
///   key file) and `location=` (dataset location, default `US`); with neither `endpoint` nor
///   `credentials`, application default credentials (GKE Workload Identity's metadata server,
///   or `GOOGLE_APPLICATION_CREDENTIALS`);
/// - `none://`: the warehouse is disabled; writes are accepted and dropped (so the pipeline runs
///   without one), queries fail with an Invalid error.
pub async fn open_warehouse(url: &str) -> Result<Arc<dyn Warehouse>, StoreError> {
    open_warehouse_holding(url, Holding::default()).await
}

/// [`open_warehouse`], with a DuckDB file kept open as `duckdb` says (other backends ignore it).
pub async fn open_warehouse_holding(url: &str, duckdb: Holding) -> Result<Arc<dyn Warehouse>, StoreError> {
    match parse_url(url)? {
        WarehouseUrl::DuckDbMemory => Ok(Arc::new(DuckDbWarehouse::open_in_memory()?)),
        WarehouseUrl::DuckDbFile(path) => Ok(Arc::new(DuckDbWarehouse::open_holding(&path, duckdb).await?)),
        WarehouseUrl::SqliteMemory => Ok(Arc::new(SqliteWarehouse::open_in_memory()?)),
        WarehouseUrl::SqliteFile(path) => Ok(Arc::new(SqliteWarehouse::open(&path).await?)),
        WarehouseUrl::BigQuery(config) => Ok(Arc::new(BigQueryWarehouse::connect(config).await?)),
        WarehouseUrl::None => Ok(Arc::new(DisabledWarehouse)),
    }
}

/// A parsed warehouse URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WarehouseUrl {
    DuckDbMemory,
    DuckDbFile(PathBuf),
    SqliteMemory,
    SqliteFile(PathBuf),
    BigQuery(BigQueryConfig),
    None,
}

/// Parses a warehouse URL without connecting (for config validation at start).
pub fn parse_url(url: &str) -> Result<WarehouseUrl, StoreError> {
    let url = url.trim();
    let invalid = |why: &str| StoreError::invalid(format!("warehouse URL `{url}`: {why} (accepted: {ACCEPTED})"));
    if url == "duckdb::memory:" || url == "memory://" || url == "duckdb://:memory:" {
        return Ok(WarehouseUrl::DuckDbMemory);
    }
    if url == "sqlite::memory:" || url == "sqlite://:memory:" {
        return Ok(WarehouseUrl::SqliteMemory);
    }
    if url == "none://" || url == "none" {
        return Ok(WarehouseUrl::None);
    }
    for (scheme, file) in [
        ("duckdb://", WarehouseUrl::DuckDbFile as fn(PathBuf) -> WarehouseUrl),
        ("sqlite://", WarehouseUrl::SqliteFile),
    ] {
        if let Some(path) = url.strip_prefix(scheme) {
            if path.is_empty() || path.contains('?') {
                return Err(invalid(&format!("expected a file path after {scheme} (no query parameters)")));
            }
            return Ok(file(PathBuf::from(path)));
        }
    }
    if let Some(rest) = url.strip_prefix("bigquery://") {
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut parts = location.trim_end_matches('/').split('/');
        let (Some(project), Some(dataset), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(invalid("expected bigquery://PROJECT/DATASET"));
        };
        if !valid_project(project) {
            return Err(invalid("the project id may only contain letters, digits, `-`, `.` and `:`"));
        }
        if !valid_dataset(dataset) {
            return Err(invalid("the dataset id may only contain letters, digits and `_` (at most 1024)"));
        }
        let params: BTreeMap<String, String> =
            serde_urlencoded::from_str(query).map_err(|e| invalid(&format!("bad query string: {e}")))?;
        let mut config = BigQueryConfig::new(project, dataset);
        for (key, value) in params {
            match key.as_str() {
                "endpoint" => {
                    if !(value.starts_with("http://") || value.starts_with("https://")) {
                        return Err(invalid(
                            "endpoint must be an http(s) URL such as http://127.0.0.1:9050/bigquery/v2",
                        ));
                    }
                    config.endpoint = Some(value.trim_end_matches('/').to_string());
                }
                "credentials" => config.credentials = Some(PathBuf::from(value)),
                "location" => config.location = value,
                other => {
                    return Err(invalid(&format!(
                        "unknown parameter `{other}` (known: endpoint, credentials, location)"
                    )))
                }
            }
        }
        if config.endpoint.is_some() && config.credentials.is_some() {
            return Err(invalid("give either endpoint (an emulator) or credentials, not both"));
        }
        return Ok(WarehouseUrl::BigQuery(config));
    }
    Err(invalid("unknown scheme"))
}

fn valid_project(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':'))
}

fn valid_dataset(s: &str) -> bool {
    !s.is_empty() && s.len() <= 1024 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Strips the optional `@` of a parameter name and checks it is a plain identifier (BigQuery's
/// rule; SQLite is laxer).
fn param_name(name: &str) -> Result<&str, StoreError> {
    let bare = name.strip_prefix('@').unwrap_or(name);
    let ok = !bare.is_empty()
        && bare.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !bare.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(bare)
    } else {
        Err(StoreError::invalid(format!("query parameter name `{name}` must be letters, digits and `_`")))
    }
}

/// A JSON column's text (both file backends keep JSON as text).
fn json_text(v: &Value) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::invalid(format!("cannot encode JSON column: {e}")))
}

/// A nullable JSON column's text: JSON `null` is SQL NULL.
fn opt_json_text(v: &Value) -> Result<Option<String>, StoreError> {
    if v.is_null() {
        Ok(None)
    } else {
        json_text(v).map(Some)
    }
}

/// What a file backend's `delete_profile` reports.
fn profile_deleted(bronze: usize, silver: usize, gold: usize) -> DeleteOutcome {
    DeleteOutcome {
        rows_deleted: (bronze + silver + gold) as u64,
        retry_later: false,
        detail: format!("bronze: {bronze} deleted, silver: {silver} deleted, gold_profiles: {gold} deleted"),
    }
}

fn to_i64(n: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| StoreError::invalid(format!("{what} {n} does not fit a signed 64-bit column")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn parses_every_scheme() {
        assert_eq!(parse_url("memory://").unwrap(), WarehouseUrl::DuckDbMemory);
        assert_eq!(parse_url("duckdb::memory:").unwrap(), WarehouseUrl::DuckDbMemory);
        assert_eq!(
            parse_url("duckdb:///var/lib/cohort/wh.duckdb").unwrap(),
            WarehouseUrl::DuckDbFile("/var/lib/cohort/wh.duckdb".into())
        );
        assert_eq!(parse_url("sqlite::memory:").unwrap(), WarehouseUrl::SqliteMemory);
        assert_eq!(parse_url("none://").unwrap(), WarehouseUrl::None);
        assert_eq!(
            parse_url("sqlite:///var/lib/cohort/wh.db").unwrap(),
            WarehouseUrl::SqliteFile("/var/lib/cohort/wh.db".into())
        );
        assert_eq!(parse_url("sqlite://data/wh.db").unwrap(), WarehouseUrl::SqliteFile("data/wh.db".into()));
        let WarehouseUrl::BigQuery(c) =
            parse_url("bigquery://my-proj/cdp_prod?endpoint=http%3A%2F%2F127.0.0.1%3A9050%2Fbigquery%2Fv2").unwrap()
        else {
            panic!("not bigquery")
        };
        assert_eq!((c.project.as_str(), c.dataset.as_str()), ("my-proj", "cdp_prod"));
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:9050/bigquery/v2"));
        let WarehouseUrl::BigQuery(c) =
            parse_url("bigquery://p/d?endpoint=http://127.0.0.1:9050/bigquery/v2/&location=EU").unwrap()
        else {
            panic!("not bigquery")
        };
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:9050/bigquery/v2"));
        assert_eq!(c.location, "EU");
        let WarehouseUrl::BigQuery(c) = parse_url("bigquery://p/d?credentials=/secrets/key.json").unwrap() else {
            panic!("not bigquery")
        };
        assert_eq!(c.auth(), BigQueryAuth::ServiceAccountKey("/secrets/key.json".into()));
        let WarehouseUrl::BigQuery(c) = parse_url("bigquery://p/d").unwrap() else { panic!("not bigquery") };
        assert_eq!(c.auth(), BigQueryAuth::ApplicationDefault);
    }

    #[test]
    fn rejects_bad_urls_naming_the_url_and_the_schemes() {
        for bad in [
            "duckdb://",
            "duckdb://x.duckdb?threads=2",
            "parquet://x",
            "sqlite://",
            "bigquery://proj",
            "bigquery://proj/ds/extra",
            "bigquery://proj/bad-dataset",
            "bigquery://pr`oj/ds",
            "bigquery://p/d?endpoint=ftp://x",
            "bigquery://p/d?color=red",
            "bigquery://p/d?endpoint=http://x&credentials=/k.json",
        ] {
            let err = parse_url(bad).unwrap_err();
            assert_eq!(err.kind, crate::StoreErrorKind::Invalid, "{bad}");
            assert!(err.message.contains(bad), "{bad}: {}", err.message);
            assert!(
                err.message.contains("duckdb://PATH")
                    && err.message.contains("sqlite://PATH")
                    && err.message.contains("bigquery://"),
                "{}",
                err.message
            );
        }
    }

    #[test]
    fn bronze_payloads_round_trip_text_and_binary() {
        let at = Utc.timestamp_opt(1_700_000_000, 0).single().unwrap();
        let mut rec = BronzeRecord {
            source: Source::Web,
            format: "segment:track".into(),
            content_type: "application/json".into(),
            received_at: at,
            body: "{\"name\":\"Zoë\"}".as_bytes().to_vec(),
        };
        let row = BronzeRow::from_record(7, &rec);
        assert_eq!(row.payload_encoding, PayloadEncoding::Utf8);
        assert_eq!(row.payload, "{\"name\":\"Zoë\"}");
        assert_eq!(row.body().unwrap(), rec.body);
        rec.body = vec![0xff, 0x00, 0xfe, b'a'];
        let row = BronzeRow::from_record(8, &rec);
        assert_eq!(row.payload_encoding, PayloadEncoding::Base64);
        assert_eq!(row.body().unwrap(), rec.body);
    }

    #[test]
    fn timestamps_are_fixed_width_utc_micros() {
        let t = Utc.timestamp_opt(1_704_164_645, 123_456_000).single().unwrap();
        assert_eq!(format_timestamp(t), "2024-01-02T03:04:05.123456Z");
        assert_eq!(
            format_timestamp(Utc.timestamp_opt(1_704_164_645, 0).single().unwrap()),
            "2024-01-02T03:04:05.000000Z"
        );
    }

    #[test]
    fn outbox_batches_split_without_losing_or_reordering_rows() {
        let at = Utc.timestamp_opt(1_700_000_000, 0).single().unwrap();
        let rec = BronzeRecord {
            source: Source::Web,
            format: "segment:track".into(),
            content_type: "application/json".into(),
            received_at: at,
            body: b"{}".to_vec(),
        };
        let batch = WarehouseBatch {
            bronze: (1..=5).map(|i| BronzeRow::from_record(i, &rec)).collect(),
            silver: Vec::new(),
            gold: (0..4)
                .map(|i| ProfileId::derive_from_event(&EventId::new(Source::Web, &i.to_string()), at))
                .collect(),
            gold_rows: (0..2)
                .map(|i| {
                    let id = ProfileId::derive_from_event(&EventId::new(Source::Web, &format!("g{i}")), at);
                    GoldProfileRow::from_record(&ProfileRecord::new(id, at))
                })
                .collect(),
        };
        let parts = batch.clone().split(3);
        assert_eq!(parts.iter().map(WarehouseBatch::rows).collect::<Vec<_>>(), vec![3, 3, 3, 2]);
        let mut joined = WarehouseBatch::default();
        for p in parts {
            joined.extend(p);
        }
        assert_eq!(joined, batch);
        assert!(WarehouseBatch::default().split(10).is_empty());
        assert_eq!(batch.clone().split(100), vec![batch]);
    }

    #[test]
    fn parameter_names_accept_an_optional_at_sign() {
        assert_eq!(param_name("@p").unwrap(), "p");
        assert_eq!(param_name("profile_id").unwrap(), "profile_id");
        assert!(param_name("p; DROP").is_err());
        assert!(param_name("1p").is_err());
        assert!(param_name("@").is_err());
    }
}
