//! The production warehouse: BigQuery through its REST API (insertAll + query jobs).
//!
//! The Storage Write API client of `gcp-bigquery-client` has a hard-coded endpoint (no emulator),
//! so rows are streamed with insertAll: chunks of at most 500 rows and ~9 MB, retried with capped
//! exponential backoff and full jitter. insertAll is at-least-once (its `insertId` dedup is best
//! effort, and the emulator ignores it), so the tables may hold duplicates and every Gold snapshot;
//! the views `bronze_dedup`, `silver_dedup` and `gold_profiles_latest` show one row per key
//! (`QUALIFY ROW_NUMBER() ...`). Tables are partitioned by day on their write time and clustered
//! by profile id, which keeps GDPR deletes and per-profile queries cheap.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cohort_messages::ProfileId;
use gcp_bigquery_client::auth::Authenticator;
use gcp_bigquery_client::client_builder::ClientBuilder;
use gcp_bigquery_client::error::BQError;
use gcp_bigquery_client::model::clustering::Clustering;
use gcp_bigquery_client::model::data_format_options::DataFormatOptions;
use gcp_bigquery_client::model::dataset::Dataset;
use gcp_bigquery_client::model::dataset_reference::DatasetReference;
use gcp_bigquery_client::model::field_type::FieldType;
use gcp_bigquery_client::model::get_query_results_parameters::GetQueryResultsParameters;
use gcp_bigquery_client::model::query_parameter::QueryParameter;
use gcp_bigquery_client::model::query_parameter_type::QueryParameterType;
use gcp_bigquery_client::model::query_parameter_value::QueryParameterValue;
use gcp_bigquery_client::model::query_request::QueryRequest;
use gcp_bigquery_client::model::query_response::QueryResponse;
use gcp_bigquery_client::model::table::Table;
use gcp_bigquery_client::model::table_data_insert_all_request::TableDataInsertAllRequest;
use gcp_bigquery_client::model::table_data_insert_all_request_rows::TableDataInsertAllRequestRows;
use gcp_bigquery_client::model::table_field_schema::TableFieldSchema;
use gcp_bigquery_client::model::table_schema::TableSchema;
use gcp_bigquery_client::model::time_partitioning::TimePartitioning;
use gcp_bigquery_client::Client;
use rand::Rng as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{
    format_timestamp, param_name, BronzeRow, DeleteOutcome, GoldProfileRow, Layer, QueryResult, QueryValue, SilverRow,
    Warehouse,
};
use crate::StoreError;

/// insertAll's documented recommendation (the hard limit is 50,000).
pub const INSERT_MAX_ROWS: usize = 500;
/// Below the 10 MB HTTP request limit, leaving room for the envelope.
pub const INSERT_MAX_BYTES: usize = 9 * 1024 * 1024;
/// BigQuery's limit on `insertId` length; longer keys are hashed.
const INSERT_ID_MAX: usize = 128;
/// How long a query may run before we give up waiting (the job itself keeps running).
const QUERY_DEADLINE: Duration = Duration::from_secs(600);

/// Where and how to reach BigQuery (`bigquery://PROJECT/DATASET?...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BigQueryConfig {
    pub project: String,
    pub dataset: String,
    /// An emulator's REST base URL (`http://127.0.0.1:9050/bigquery/v2`); `None` for Google's.
    pub endpoint: Option<String>,
    /// A service-account key file; `None` for application default credentials.
    pub credentials: Option<PathBuf>,
    /// Dataset location (`US`, `EU`, `europe-west3`, ...), used when creating the dataset and
    /// running jobs.
    pub location: String,
    /// Attempts per API call for transient errors (429, 5xx, network).
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl BigQueryConfig {
    pub fn new(project: &str, dataset: &str) -> Self {
        Self {
            project: project.to_string(),
            dataset: dataset.to_string(),
            endpoint: None,
            credentials: None,
            location: "US".to_string(),
            max_attempts: 6,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
        }
    }

    /// How requests are authenticated, as decided by the URL.
    pub fn auth(&self) -> BigQueryAuth {
        match (&self.endpoint, &self.credentials) {
            (Some(_), _) => BigQueryAuth::Emulator,
            (None, Some(path)) => BigQueryAuth::ServiceAccountKey(path.clone()),
            (None, None) => BigQueryAuth::ApplicationDefault,
        }
    }
}

/// How the client gets its OAuth token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BigQueryAuth {
    /// A fixed dummy token: emulators accept anything and there is no Google to ask.
    Emulator,
    ServiceAccountKey(PathBuf),
    /// `GOOGLE_APPLICATION_CREDENTIALS`, gcloud's user credentials, or the metadata server (GKE
    /// Workload Identity), in that order, through yup-oauth2 (tokens are cached and refreshed).
    ApplicationDefault,
}

/// An authenticator for emulators, which accept any bearer token.
#[derive(Clone)]
struct DummyToken;

#[async_trait]
impl Authenticator for DummyToken {
    async fn access_token(&self) -> Result<String, BQError> {
        Ok("cohort-emulator-token".to_string())
    }
}

/// The BigQuery warehouse.
#[derive(Clone)]
pub struct BigQueryWarehouse {
    client: Client,
    config: Arc<BigQueryConfig>,
}

impl std::fmt::Debug for BigQueryWarehouse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BigQueryWarehouse")
            .field("project", &self.config.project)
            .field("dataset", &self.config.dataset)
            .field("endpoint", &self.config.endpoint)
            .finish_non_exhaustive()
    }
}

impl BigQueryWarehouse {
    /// Builds the client; makes no request (credentials are first used by `ensure_schema`).
    pub async fn connect(config: BigQueryConfig) -> Result<Self, StoreError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| StoreError::invalid(format!("bigquery: cannot build the HTTP client: {e}")))?;
        let mut builder = ClientBuilder::new();
        builder.with_client(http);
        if let Some(endpoint) = &config.endpoint {
            builder.with_v2_base_url(endpoint.clone());
        }
        let client = match config.auth() {
            BigQueryAuth::Emulator => builder.build_from_authenticator(Arc::new(DummyToken)).await,
            BigQueryAuth::ServiceAccountKey(path) => {
                let path = path.to_str().ok_or_else(|| {
                    StoreError::invalid(format!("bigquery: credentials path {} is not UTF-8", path.display()))
                })?;
                builder.build_from_service_account_key_file(path).await
            }
            BigQueryAuth::ApplicationDefault => builder.build_from_application_default_credentials().await,
        }
        .map_err(|e| StoreError::invalid(format!("bigquery: cannot set up credentials ({:?}): {e}", config.auth())))?;
        Ok(Self { client, config: Arc::new(config) })
    }

    pub fn config(&self) -> &BigQueryConfig {
        &self.config
    }

    /// `` `project.dataset.name` ``: the emulator ignores `defaultDataset`, so SQL is always qualified.
    fn qualified(&self, name: &str) -> String {
        format!("`{}.{}.{}`", self.config.project, self.config.dataset, name)
    }

    /// Runs `op` until it succeeds, fails with a non-retryable error, or runs out of attempts.
    async fn retry<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut attempt: u32 = 0;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retryable() && attempt + 1 < self.config.max_attempts.max(1) => {
                    let delay = backoff_delay(attempt, self.config.initial_backoff, self.config.max_backoff);
                    tracing::warn!(
                        what,
                        attempt = attempt + 1,
                        delay_ms = delay.as_millis() as u64,
                        error = %e,
                        "bigquery call failed, retrying"
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn create_dataset(&self) -> Result<(), StoreError> {
        let dataset = Dataset::new(&self.config.project, &self.config.dataset).location(&self.config.location);
        self.retry("create dataset", || async {
            match self.client.dataset().create(dataset.clone()).await {
                Ok(_) => Ok(()),
                Err(e) if is_already_exists(&e) => Ok(()),
                Err(e) => Err(classify("create dataset", e)),
            }
        })
        .await
    }

    async fn create_table(&self, name: &str, fields: Vec<TableFieldSchema>, day_field: &str) -> Result<(), StoreError> {
        let table = Table::new(&self.config.project, &self.config.dataset, name, TableSchema::new(fields))
            .time_partitioning(TimePartitioning::per_day().field(day_field))
            .clustering(Clustering { fields: Some(vec!["profile_id".to_string()]) });
        // Bronze has no profile id: cluster it by source instead.
        let table = if name == Layer::Bronze.table_name() {
            table.clustering(Clustering { fields: Some(vec!["source".to_string()]) })
        } else {
            table
        };
        self.retry("create table", || async {
            match self.client.table().create(table.clone()).await {
                Ok(_) => Ok(()),
                Err(e) if is_already_exists(&e) => Ok(()),
                Err(e) => Err(classify("create table", e)),
            }
        })
        .await
    }

    /// Runs one statement to completion and returns every result page.
    async fn run(&self, sql: &str, params: &[(String, QueryValue)]) -> Result<QueryResponse, StoreError> {
        let mut request = QueryRequest::new(sql);
        request.use_legacy_sql = false;
        request.location = Some(self.config.location.clone());
        request.default_dataset =
            Some(DatasetReference { project_id: self.config.project.clone(), dataset_id: self.config.dataset.clone() });
        request.timeout_ms = Some(30_000);
        // Timestamps as int64 microseconds rather than float seconds (exact).
        request.format_options = Some(DataFormatOptions { use_int64_timestamp: Some(true) });
        // Makes a retried jobs.query run the statement once.
        request.request_id = Some(random_id());
        if !params.is_empty() {
            request.parameter_mode = Some("NAMED".to_string());
            request.query_parameters = Some(params.iter().map(to_bq_param).collect::<Result<_, _>>()?);
        }
        let project = self.config.project.as_str();
        let mut response = self
            .retry("query", || async {
                self.client.job().query(project, request.clone()).await.map_err(|e| classify("query", e))
            })
            .await?;
        check_errors(&response)?;
        let job_id = response.job_reference.as_ref().and_then(|r| r.job_id.clone());
        let location = response
            .job_reference
            .as_ref()
            .and_then(|r| r.location.clone())
            .or_else(|| Some(self.config.location.clone()));
        let started = tokio::time::Instant::now();
        // Long statements return before they finish: poll the job, then page through results.
        while response.job_complete != Some(true) || response.page_token.is_some() {
            let Some(job_id) = job_id.as_deref() else {
                return Err(StoreError::unavailable("bigquery query: incomplete response without a job id"));
            };
            if started.elapsed() > QUERY_DEADLINE {
                return Err(StoreError::unavailable(format!(
                    "bigquery query: job {job_id} still running after {}s",
                    QUERY_DEADLINE.as_secs()
                )));
            }
            let complete = response.job_complete == Some(true);
            let parameters = GetQueryResultsParameters {
                location: location.clone(),
                page_token: if complete { response.page_token.clone() } else { None },
                timeout_ms: Some(30_000),
                format_options: Some(DataFormatOptions { use_int64_timestamp: Some(true) }),
                ..Default::default()
            };
            let next: QueryResponse = self
                .retry("get query results", || async {
                    self.client
                        .job()
                        .get_query_results(project, job_id, parameters.clone())
                        .await
                        .map_err(|e| classify("get query results", e))
                })
                .await?
                .into();
            check_errors(&next)?;
            if complete {
                // A further page: append its rows.
                let mut rows = response.rows.take().unwrap_or_default();
                rows.extend(next.rows.unwrap_or_default());
                response.rows = Some(rows);
                response.page_token = next.page_token;
            } else {
                response = next;
            }
        }
        Ok(response)
    }

    /// Streams rows in chunks (≤ 500 rows, ≤ ~9 MB), each retried on transient errors.
    async fn insert(&self, table: &str, rows: Vec<(String, Value)>) -> Result<(), StoreError> {
        let total = rows.len();
        let chunks = chunk_rows(table, rows, INSERT_MAX_ROWS, INSERT_MAX_BYTES)?;
        let chunk_count = chunks.len();
        for chunk in chunks {
            let mut request = TableDataInsertAllRequest::new();
            request.add_rows(chunk).map_err(|e| classify("insertAll", e))?;
            self.retry("insertAll", || async {
                let response = self
                    .client
                    .tabledata()
                    .insert_all(&self.config.project, &self.config.dataset, table, request.clone())
                    .await
                    .map_err(|e| classify("insertAll", e))?;
                insert_errors(table, response.insert_errors.unwrap_or_default())
            })
            .await?;
        }
        tracing::debug!(table, rows = total, requests = chunk_count, "bigquery insertAll done");
        Ok(())
    }
}

/// The largest request body Cohort takes while BigQuery is the warehouse: its Bronze row must fit
/// one insertAll request, after JSON escaping (a quote doubles) or sealing (base64, a third more).
pub const MAX_RAW_PAYLOAD_BYTES: usize = 4 * 1024 * 1024;

/// A Bronze row as insertAll takes it. A payload that still does not fit one request (text full
/// of control characters, escaped six bytes each) is stored as a marker with its size instead:
/// refused, it would stop every later row behind it. The operational store keeps the payload
/// until its retention.
fn bronze_json(r: BronzeRow) -> Value {
    let mut json = json!({
        "raw_seq": r.raw_seq,
        "source": r.source.as_str(),
        "format": r.format,
        "content_type": r.content_type,
        "received_at": format_timestamp(r.received_at),
        "payload_encoding": r.payload_encoding.as_str(),
        "payload": r.payload,
    });
    let size = serde_json::to_vec(&json).map_or(usize::MAX, |v| v.len());
    if size > INSERT_MAX_BYTES - 1024 {
        tracing::warn!(
            raw_seq = r.raw_seq,
            bytes = size,
            "raw payload over BigQuery's insert limit; Bronze keeps a marker"
        );
        json["payload_encoding"] = json!("omitted");
        json["payload"] = json!(format!("(omitted: {size} bytes as JSON, over BigQuery's insert limit)"));
    }
    json
}

/// A Gold row and its key. The content is in the key (hashed, see `insert_id`): a merge changes
/// a record without moving its time, and BigQuery drops a row whose insertId it has seen.
fn gold_row(r: GoldProfileRow) -> (String, Value) {
    let snapshot_at = format_timestamp(r.snapshot_at);
    let json = json!({
        "profile_id": r.profile_id.as_str(),
        "snapshot_at": snapshot_at,
        "traits": json_text(&r.traits),
        "counters": json_text(&r.counters),
        "identifiers": json_text(&r.identifiers),
        "events_total": r.events_total,
        "first_seen": r.first_seen.map(format_timestamp),
        "last_seen": r.last_seen.map(format_timestamp),
        "merged_into": r.merged_into.as_ref().map(|p| p.as_str()),
    });
    (format!("{}@{snapshot_at}@{json}", r.profile_id), json)
}

/// Splits keyed rows into insertAll requests of at most `max_rows` rows and about `max_bytes`.
fn chunk_rows(
    table: &str,
    rows: Vec<(String, Value)>,
    max_rows: usize,
    max_bytes: usize,
) -> Result<Vec<Vec<TableDataInsertAllRequestRows>>, StoreError> {
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    let mut current_bytes = 0usize;
    for (key, json) in rows {
        let insert_id = insert_id(&key);
        // The row as it will be serialized, plus its insertId and the envelope's punctuation.
        let size = serde_json::to_vec(&json).map(|v| v.len()).unwrap_or(0) + insert_id.len() + 32;
        if size > max_bytes {
            return Err(StoreError::invalid(format!(
                "bigquery insert into {table}: one row is {size} bytes, over the {max_bytes}-byte request limit"
            )));
        }
        if !current.is_empty() && (current.len() >= max_rows || current_bytes + size > max_bytes) {
            chunks.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current.push(TableDataInsertAllRequestRows { insert_id: Some(insert_id), json });
        current_bytes += size;
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    Ok(chunks)
}

/// Full jitter over a capped exponential: spreads retries of many replicas apart.
fn backoff_delay(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let exp = initial.saturating_mul(2u32.saturating_pow(attempt.min(16)));
    let cap = exp.min(max);
    let millis = cap.as_millis().max(1) as u64;
    Duration::from_millis(rand::thread_rng().gen_range(millis / 2..=millis))
}

fn random_id() -> String {
    let bytes: [u8; 16] = rand::thread_rng().gen();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The natural key as an insertId, hashed when it is longer than BigQuery allows.
fn insert_id(key: &str) -> String {
    if key.len() <= INSERT_ID_MAX {
        key.to_string()
    } else {
        let digest = Sha256::digest(key.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }
}

fn is_already_exists(e: &BQError) -> bool {
    matches!(e, BQError::ResponseError { error } if error.error.code == 409)
}

/// Reasons BigQuery documents as transient.
const TRANSIENT_REASONS: &[&str] =
    &["backendError", "internalError", "rateLimitExceeded", "timeout", "jobBackendError"];

/// Maps a client error to a store error whose kind drives retries (ours and the caller's).
fn classify(what: &str, e: BQError) -> StoreError {
    match e {
        BQError::ResponseError { error } => {
            let inner = error.error;
            let reasons: Vec<&str> = inner.errors.iter().filter_map(|m| m.get("reason").map(String::as_str)).collect();
            let message = format!("bigquery {what}: HTTP {} {}: {}", inner.code, reasons.join(","), inner.message);
            let transient = inner.code == 429
                || inner.code >= 500
                || reasons.iter().any(|r| TRANSIENT_REASONS.contains(r))
                || reasons.contains(&"quotaExceeded") && inner.message.contains("rate");
            if transient {
                StoreError::unavailable(message)
            } else {
                StoreError::invalid(message)
            }
        }
        BQError::RequestError(e) => StoreError::unavailable(format!("bigquery {what}: request failed: {e}")),
        e @ (BQError::AuthError(_) | BQError::YupAuthError(_) | BQError::NoToken) => {
            // Token endpoints (metadata server, oauth2) have transient failures too.
            StoreError::unavailable(format!("bigquery {what}: authentication failed: {e}"))
        }
        e @ BQError::SerializationError(_) => StoreError::corrupt(format!("bigquery {what}: bad response: {e}")),
        e => StoreError::invalid(format!("bigquery {what}: {e}")),
    }
}

/// A 200 response can still carry errors (the emulator reports failed queries this way).
fn check_errors(response: &QueryResponse) -> Result<(), StoreError> {
    let Some(errors) = response.errors.as_ref().filter(|e| !e.is_empty()) else {
        return Ok(());
    };
    let reasons: Vec<&str> = errors.iter().filter_map(|e| e.reason.as_deref()).collect();
    let message = format!(
        "bigquery query failed: {}: {}",
        reasons.join(","),
        errors.iter().filter_map(|e| e.message.as_deref()).collect::<Vec<_>>().join("; ")
    );
    if reasons.iter().any(|r| TRANSIENT_REASONS.contains(r)) {
        Err(StoreError::unavailable(message))
    } else {
        Err(StoreError::invalid(message))
    }
}

fn insert_errors(
    table: &str,
    errors: Vec<gcp_bigquery_client::model::table_data_insert_all_response_insert_errors::TableDataInsertAllResponseInsertErrors>,
) -> Result<(), StoreError> {
    if errors.is_empty() {
        return Ok(());
    }
    let protos: Vec<_> = errors.iter().flat_map(|e| e.errors.iter().flatten()).collect();
    // "stopped" rows were valid but not written because another row was not; messages name
    // fields, never values, so they are safe to log.
    let invalid =
        protos.iter().find(|p| p.reason.as_deref().is_some_and(|r| r != "stopped" && !TRANSIENT_REASONS.contains(&r)));
    match invalid {
        Some(p) => Err(StoreError::invalid(format!(
            "bigquery insertAll into {table}: {} rows rejected, e.g. {}: {}",
            errors.len(),
            p.reason.as_deref().unwrap_or("?"),
            p.message.as_deref().unwrap_or("")
        ))),
        None => Err(StoreError::unavailable(format!(
            "bigquery insertAll into {table}: {} rows failed transiently",
            errors.len()
        ))),
    }
}

fn to_bq_param((name, value): &(String, QueryValue)) -> Result<QueryParameter, StoreError> {
    let (kind, text) = match value {
        QueryValue::String(s) => ("STRING", s.clone()),
        QueryValue::Int64(i) => ("INT64", i.to_string()),
        QueryValue::Float64(f) => ("FLOAT64", f.to_string()),
        QueryValue::Bool(b) => ("BOOL", b.to_string()),
        QueryValue::Timestamp(t) => ("TIMESTAMP", t.format("%Y-%m-%d %H:%M:%S%.6f+00:00").to_string()),
    };
    Ok(QueryParameter {
        name: Some(param_name(name)?.to_string()),
        parameter_type: Some(QueryParameterType { r#type: kind.to_string(), ..Default::default() }),
        parameter_value: Some(QueryParameterValue { value: Some(text), ..Default::default() }),
    })
}

/// Normalizes one result cell to the cross-backend representation (see [`QueryResult`]).
fn cell(field: Option<&TableFieldSchema>, raw: Option<Value>) -> Value {
    let Some(raw) = raw else { return Value::Null };
    let Some(field) = field else { return raw };
    if field.mode.as_deref() == Some("REPEATED") {
        return raw;
    }
    let Value::String(s) = raw else { return raw };
    match field.r#type {
        FieldType::Integer | FieldType::Int64 => s.parse::<i64>().map(Value::from).unwrap_or(Value::String(s)),
        FieldType::Float | FieldType::Float64 => {
            s.parse::<f64>().ok().and_then(serde_json::Number::from_f64).map(Value::Number).unwrap_or(Value::String(s))
        }
        FieldType::Boolean | FieldType::Bool => match s.as_str() {
            "true" | "TRUE" => Value::Bool(true),
            "false" | "FALSE" => Value::Bool(false),
            _ => Value::String(s),
        },
        FieldType::Timestamp => {
            parse_bq_timestamp(&s).map(|t| Value::String(format_timestamp(t))).unwrap_or(Value::String(s))
        }
        _ => Value::String(s),
    }
}

/// int64 microseconds (`useInt64Timestamp`, and always on the emulator) or float seconds.
fn parse_bq_timestamp(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(micros) = s.parse::<i64>() {
        return DateTime::from_timestamp_micros(micros);
    }
    let secs = s.parse::<f64>().ok()?;
    DateTime::from_timestamp_micros((secs * 1_000_000.0).round() as i64)
}

fn to_result(response: QueryResponse) -> QueryResult {
    let fields = response.schema.and_then(|s| s.fields).unwrap_or_default();
    let columns = fields.iter().map(|f| f.name.clone()).collect();
    let rows = response
        .rows
        .unwrap_or_default()
        .into_iter()
        .map(|row| {
            row.columns.unwrap_or_default().into_iter().enumerate().map(|(i, c)| cell(fields.get(i), c.value)).collect()
        })
        .collect();
    QueryResult { columns, rows }
}

fn is_streaming_buffer(e: &StoreError) -> bool {
    e.message.to_ascii_lowercase().contains("streaming buffer")
}

fn field(name: &str, kind: FieldType, required: bool) -> TableFieldSchema {
    let mut f = TableFieldSchema::new(name, kind);
    if required {
        f.mode = Some("REQUIRED".to_string());
    }
    f
}

fn bronze_fields() -> Vec<TableFieldSchema> {
    vec![
        field("raw_seq", FieldType::Int64, true),
        field("source", FieldType::String, true),
        field("format", FieldType::String, true),
        field("content_type", FieldType::String, true),
        field("received_at", FieldType::Timestamp, true),
        field("payload_encoding", FieldType::String, true),
        field("payload", FieldType::String, true),
    ]
}

fn silver_fields() -> Vec<TableFieldSchema> {
    vec![
        field("event_id", FieldType::String, true),
        field("profile_id", FieldType::String, true),
        field("source", FieldType::String, true),
        field("kind", FieldType::String, true),
        field("name", FieldType::String, false),
        field("occurred_at", FieldType::Timestamp, true),
        field("received_at", FieldType::Timestamp, true),
        field("identifiers", FieldType::Json, false),
        field("traits", FieldType::Json, false),
        field("properties", FieldType::Json, false),
        field("utm", FieldType::Json, false),
        field("raw_seq", FieldType::Int64, false),
    ]
}

fn gold_fields() -> Vec<TableFieldSchema> {
    vec![
        field("profile_id", FieldType::String, true),
        field("snapshot_at", FieldType::Timestamp, true),
        field("traits", FieldType::Json, false),
        field("counters", FieldType::Json, false),
        field("identifiers", FieldType::Json, false),
        field("events_total", FieldType::Int64, true),
        field("first_seen", FieldType::Timestamp, false),
        field("last_seen", FieldType::Timestamp, false),
        field("merged_into", FieldType::String, false),
    ]
}

/// JSON columns travel as JSON text: the emulator answers an object with a 500 and a dropped
/// connection, and BigQuery accepts both.
fn json_text(v: &Value) -> Value {
    if v.is_null() {
        Value::Null
    } else {
        Value::String(v.to_string())
    }
}

#[async_trait]
impl Warehouse for BigQueryWarehouse {
    async fn ensure_schema(&self) -> Result<(), StoreError> {
        self.create_dataset().await?;
        self.create_table(Layer::Bronze.table_name(), bronze_fields(), "received_at").await?;
        self.create_table(Layer::Silver.table_name(), silver_fields(), "received_at").await?;
        self.create_table(Layer::Gold.table_name(), gold_fields(), "snapshot_at").await?;
        // CREATE OR REPLACE keeps view definitions current across releases.
        let views = [
            (Layer::Bronze, "raw_seq", "received_at"),
            (Layer::Silver, "event_id", "received_at"),
            // Of equal times, the merged (larger) record.
            (Layer::Gold, "profile_id", "snapshot_at DESC, events_total DESC"),
        ];
        for (layer, key, order) in views {
            let sql = format!(
                "CREATE OR REPLACE VIEW {} AS SELECT * FROM {} WHERE TRUE \
                 QUALIFY ROW_NUMBER() OVER (PARTITION BY {key} ORDER BY {order}) = 1",
                self.qualified(layer.view_name()),
                self.qualified(layer.table_name()),
            );
            self.run(&sql, &[]).await?;
        }
        Ok(())
    }

    async fn write_bronze(&self, rows: Vec<BronzeRow>) -> Result<(), StoreError> {
        let rows = rows.into_iter().map(|r| (format!("bronze:{}", r.raw_seq), bronze_json(r))).collect();
        self.insert(Layer::Bronze.table_name(), rows).await
    }

    fn max_raw_payload_bytes(&self) -> Option<usize> {
        Some(MAX_RAW_PAYLOAD_BYTES)
    }

    async fn write_silver(&self, rows: Vec<SilverRow>) -> Result<(), StoreError> {
        let rows = rows
            .into_iter()
            .map(|r| {
                let json = json!({
                    "event_id": r.event_id.as_str(),
                    "profile_id": r.profile_id.as_str(),
                    "source": r.source.as_str(),
                    "kind": r.kind.as_str(),
                    "name": r.name,
                    "occurred_at": format_timestamp(r.occurred_at),
                    "received_at": format_timestamp(r.received_at),
                    "identifiers": json_text(&r.identifiers),
                    "traits": json_text(&r.traits),
                    "properties": json_text(&r.properties),
                    "utm": json_text(&r.utm),
                    "raw_seq": r.raw_seq,
                });
                (r.event_id.as_str().to_string(), json)
            })
            .collect();
        self.insert(Layer::Silver.table_name(), rows).await
    }

    async fn write_gold_profiles(&self, rows: Vec<GoldProfileRow>) -> Result<(), StoreError> {
        self.insert(Layer::Gold.table_name(), rows.into_iter().map(gold_row).collect()).await
    }

    async fn query(&self, sql: &str, params: &[(String, QueryValue)]) -> Result<QueryResult, StoreError> {
        self.run(sql, params).await.map(to_result)
    }

    async fn delete_profile(&self, profile_id: &ProfileId) -> Result<DeleteOutcome, StoreError> {
        let params = [("profile_id".to_string(), QueryValue::String(profile_id.as_str().to_string()))];
        let mut outcome = DeleteOutcome { rows_deleted: 0, retry_later: false, detail: String::new() };
        let mut details = Vec::new();
        // Bronze first: the person's Silver rows are what say which raw payloads were theirs, so
        // Silver waits while Bronze is still in the streaming buffer.
        let sql = format!(
            "SELECT DISTINCT raw_seq FROM {} WHERE profile_id = @profile_id AND raw_seq IS NOT NULL",
            self.qualified(Layer::Silver.table_name())
        );
        let seqs: Vec<u64> =
            self.query(&sql, &params).await?.rows.iter().filter_map(|r| r.first().and_then(Value::as_u64)).collect();
        let mut layers = vec![Layer::Gold];
        if !seqs.is_empty() {
            let list: Vec<String> = seqs.iter().map(u64::to_string).collect();
            let table = Layer::Bronze.table_name();
            let sql = format!("DELETE FROM {} WHERE raw_seq IN ({})", self.qualified(table), list.join(", "));
            match self.run(&sql, &[]).await {
                Ok(response) => {
                    let n = response.num_dml_affected_rows.as_deref().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
                    outcome.rows_deleted += n;
                    details.push(format!("{table}: {n} deleted"));
                    layers.insert(0, Layer::Silver);
                }
                Err(e) if is_streaming_buffer(&e) => {
                    outcome.retry_later = true;
                    details.push(format!("{table}: rows still in the streaming buffer, retry later"));
                }
                Err(e) => return Err(e),
            }
        } else {
            layers.insert(0, Layer::Silver);
        }
        for layer in layers {
            let table = layer.table_name();
            let sql = format!("DELETE FROM {} WHERE profile_id = @profile_id", self.qualified(table));
            match self.run(&sql, &params).await {
                Ok(response) => {
                    let n = response.num_dml_affected_rows.as_deref().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
                    outcome.rows_deleted += n;
                    details.push(format!("{table}: {n} deleted"));
                }
                // Rows inserted in the last ~90 minutes cannot be deleted yet; the other table
                // may still be, so carry on and let the saga call again.
                Err(e) if is_streaming_buffer(&e) => {
                    outcome.retry_later = true;
                    details.push(format!("{table}: rows still in the streaming buffer, retry later"));
                }
                Err(e) => return Err(e),
            }
        }
        outcome.detail = details.join(", ");
        Ok(outcome)
    }

    async fn raw_payloads(&self, after: u64, limit: usize) -> Result<Vec<(u64, String)>, StoreError> {
        let sql = format!(
            "SELECT raw_seq, payload FROM {} WHERE raw_seq > @after ORDER BY raw_seq LIMIT {}",
            self.qualified(Layer::Bronze.table_name()),
            limit.max(1)
        );
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let result = self.query(&sql, &[("after".to_string(), QueryValue::Int64(after))]).await?;
        Ok(result.rows.iter().filter_map(|r| Some((r.first()?.as_u64()?, r.get(1)?.as_str()?.to_string()))).collect())
    }

    async fn delete_raw(&self, seqs: &[u64]) -> Result<DeleteOutcome, StoreError> {
        if seqs.is_empty() {
            return Ok(DeleteOutcome { rows_deleted: 0, retry_later: false, detail: "bronze: 0 deleted".into() });
        }
        let list: Vec<String> = seqs.iter().map(u64::to_string).collect();
        let sql = format!(
            "DELETE FROM {} WHERE raw_seq IN ({})",
            self.qualified(Layer::Bronze.table_name()),
            list.join(", ")
        );
        match self.run(&sql, &[]).await {
            Ok(response) => {
                let n = response.num_dml_affected_rows.as_deref().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
                Ok(DeleteOutcome { rows_deleted: n, retry_later: false, detail: format!("bronze: {n} deleted") })
            }
            Err(e) if is_streaming_buffer(&e) => Ok(DeleteOutcome {
                rows_deleted: 0,
                retry_later: true,
                detail: "bronze: rows still in the streaming buffer, retry later".into(),
            }),
            Err(e) => Err(e),
        }
    }

    async fn count_rows(&self, layer: Layer) -> Result<u64, StoreError> {
        let result = self.query(&format!("SELECT COUNT(*) AS n FROM {}", self.table(layer)), &[]).await?;
        result.rows.first().and_then(|r| r.first()).and_then(Value::as_u64).ok_or_else(|| {
            StoreError::corrupt(format!("bigquery count of {}: no number in the result", layer.as_str()))
        })
    }

    fn table(&self, layer: Layer) -> String {
        self.qualified(layer.view_name())
    }

    fn backend(&self) -> &'static str {
        "bigquery"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let (initial, max) = (Duration::from_millis(100), Duration::from_secs(2));
        for attempt in 0..20 {
            let d = backoff_delay(attempt, initial, max);
            let cap = initial.saturating_mul(2u32.saturating_pow(attempt.min(16))).min(max);
            assert!(d <= cap && d >= cap / 2, "attempt {attempt}: {d:?} not in [{:?}, {cap:?}]", cap / 2);
        }
    }

    #[test]
    fn streaming_buffer_refusals_are_recognised() {
        // The text real BigQuery returns (HTTP 400 invalidQuery) for DML on fresh streamed rows.
        let e = StoreError::invalid(
            "bigquery query: HTTP 400 invalidQuery: UPDATE or DELETE statement over table p.d.silver would affect \
             rows in the streaming buffer, which is not supported",
        );
        assert!(is_streaming_buffer(&e));
        assert!(!is_streaming_buffer(&StoreError::invalid("bigquery query: HTTP 400 invalidQuery: syntax error")));
    }

    #[test]
    fn cells_are_normalized_by_type() {
        let f = |t| TableFieldSchema::new("c", t);
        assert_eq!(cell(Some(&f(FieldType::Integer)), Some(json!("42"))), json!(42));
        assert_eq!(cell(Some(&f(FieldType::Float64)), Some(json!("1.5"))), json!(1.5));
        assert_eq!(cell(Some(&f(FieldType::Bool)), Some(json!("true"))), json!(true));
        assert_eq!(
            cell(Some(&f(FieldType::Timestamp)), Some(json!("1704164645123456"))),
            json!("2024-01-02T03:04:05.123456Z")
        );
        assert_eq!(
            cell(Some(&f(FieldType::Timestamp)), Some(json!("1.704164645123456E9"))),
            json!("2024-01-02T03:04:05.123456Z")
        );
        assert_eq!(cell(Some(&f(FieldType::Json)), Some(json!("{\"a\":1}"))), json!("{\"a\":1}"));
        assert_eq!(cell(Some(&f(FieldType::String)), None), Value::Null);
    }

    /// A Bronze row that cannot fit one request even under the import cap becomes a marker
    /// (refused, it would hold back every row after it); others go as they are.
    #[test]
    fn a_bronze_payload_over_the_insert_limit_is_stored_as_a_marker() {
        let row = |payload: String| BronzeRow {
            raw_seq: 7,
            source: cohort_messages::Source::Crm,
            format: "salesforce_csv".into(),
            content_type: "text/csv".into(),
            received_at: chrono::Utc::now(),
            payload_encoding: crate::warehouse::PayloadEncoding::Utf8,
            payload,
        };
        let kept = bronze_json(row("Id,Email\n\"003A\",a@b.de\n".repeat(1000)));
        assert_eq!(
            (kept["payload_encoding"].as_str(), kept["payload"].as_str().map(str::len)),
            (Some("utf8"), Some(23_000))
        );
        // 3 MiB of control characters: 18 MiB escaped.
        let control = bronze_json(row("\u{1}".repeat(3 << 20)));
        assert_eq!(control["payload_encoding"], "omitted");
        assert!(
            control["payload"].as_str().unwrap().contains("over BigQuery's insert limit"),
            "{}",
            control["payload"]
        );
        let chunks =
            chunk_rows("bronze", vec![("bronze:7".into(), control)], INSERT_MAX_ROWS, INSERT_MAX_BYTES).unwrap();
        assert_eq!(chunks.len(), 1);
    }

    /// Two snapshots of a profile at one time but with other content are two rows to BigQuery;
    /// the same snapshot sent again is one.
    #[test]
    fn gold_rows_of_one_time_and_other_content_have_other_insert_ids() {
        let id = cohort_messages::ProfileId::derive_from_event(
            &cohort_messages::EventId::new(cohort_messages::Source::Web, "a"),
            chrono::DateTime::UNIX_EPOCH,
        );
        let mut record = cohort_messages::ProfileRecord::new(id, chrono::Utc::now());
        let key = |r: &cohort_messages::ProfileRecord| insert_id(&gold_row(GoldProfileRow::from_record(r)).0);
        let before = key(&record);
        assert_eq!(before, key(&record));
        record.counters.events_total += 2;
        assert_ne!(before, key(&record));
    }

    #[test]
    fn inserts_are_chunked_by_rows_and_bytes() {
        let rows = |n: usize, pad: usize| (0..n).map(|i| (format!("k{i}"), json!({"p": "x".repeat(pad)}))).collect();
        let sizes = |c: Vec<Vec<TableDataInsertAllRequestRows>>| c.iter().map(Vec::len).collect::<Vec<_>>();
        assert_eq!(sizes(chunk_rows("t", rows(1200, 10), 500, INSERT_MAX_BYTES).unwrap()), [500, 500, 200]);
        assert_eq!(sizes(chunk_rows("t", rows(500, 10), 500, INSERT_MAX_BYTES).unwrap()), [500]);
        assert!(chunk_rows("t", rows(0, 10), 500, INSERT_MAX_BYTES).unwrap().is_empty());
        // ~1 KB rows under a 10 KB budget: 9 per request.
        assert_eq!(sizes(chunk_rows("t", rows(20, 1000), 500, 10_000).unwrap()), [9, 9, 2]);
        let err = chunk_rows("t", rows(1, 20_000), 500, 10_000).unwrap_err();
        assert_eq!(err.kind, crate::StoreErrorKind::Invalid);
        let ids: Vec<_> = chunk_rows("t", rows(2, 1), 500, INSERT_MAX_BYTES).unwrap()[0]
            .iter()
            .map(|r| r.insert_id.clone().unwrap())
            .collect();
        assert_eq!(ids, ["k0", "k1"]);
    }

    #[test]
    fn long_keys_become_hashed_insert_ids() {
        assert_eq!(insert_id("web:m1"), "web:m1");
        let long = "x".repeat(200);
        let id = insert_id(&long);
        assert!(id.starts_with("sha256:") && id.len() <= INSERT_ID_MAX);
        assert_eq!(id, insert_id(&long));
    }

    #[test]
    fn transient_errors_are_retryable() {
        let e = classify("q", BQError::NoToken);
        assert!(e.is_retryable());
        let e = classify("q", BQError::InvalidColumnIndex { col_index: 1 });
        assert!(!e.is_retryable());
    }
}
