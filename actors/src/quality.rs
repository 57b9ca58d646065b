//! Quality gates 2 and 3 (slide 12) as checkpoints over the warehouse and the operational store,
//! the run summary of Gate 1, the row-count check of Gate 4, and the store of their results.
//!
//! Checks read rows and evaluate them here rather than in SQL, so one implementation serves
//! SQLite and BigQuery alike. Results name failing rows by id only, never by value.

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use cohort_adapters::{Layer, OperationalStore, QueryValue, StoreError, Warehouse};
use cohort_config::QualityConfig;
use cohort_messages::{
    msgs::MergeReason, ExpectationResult, Gate, ProfileId, QualityRun, SagaRecord, SagaStatus, QUALITY_RUN,
};
use cohort_supervisors::Metrics;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// Bronze rows removed by an erasure, keyed by zero-padded `raw_seq`: other students' Silver
/// rows may point at a payload they shared with the erased person, and Gate 2 must not count
/// those as broken links. Holds sequence numbers only.
pub const ERASED_BRONZE: &str = "erased_bronze";

/// The document key of a Bronze sequence number.
pub fn bronze_key(seq: u64) -> String {
    format!("{seq:020}")
}

/// Records Bronze rows removed for an erasure (see [`ERASED_BRONZE`]).
pub async fn record_erased_bronze(store: &dyn OperationalStore, seqs: &[u64]) -> Result<(), StoreError> {
    if seqs.is_empty() {
        return Ok(());
    }
    let at = json!({ "erased_at": Utc::now() });
    store.put_documents(ERASED_BRONZE, seqs.iter().map(|s| (bronze_key(*s), Some(at.clone()))).collect()).await
}

/// Rows read per warehouse query.
const PAGE: usize = 2000;
/// Failing ids kept per expectation.
const SAMPLE: usize = 10;

/// Counts one expectation's failures while rows stream past.
struct Tally {
    expectation: &'static str,
    column: Option<String>,
    expected: Value,
    unexpected: u64,
    sample: Vec<String>,
}

impl Tally {
    fn new(expectation: &'static str, column: Option<&str>, expected: Value) -> Self {
        Self { expectation, column: column.map(str::to_string), expected, unexpected: 0, sample: Vec::new() }
    }

    fn fail(&mut self, id: &str) {
        self.unexpected += 1;
        if self.sample.len() < SAMPLE {
            self.sample.push(id.to_string());
        }
    }

    fn result(self, evaluated: u64, success: Option<bool>, observed: Option<Value>) -> ExpectationResult {
        ExpectationResult {
            expectation: self.expectation.to_string(),
            column: self.column,
            success: success.unwrap_or(self.unexpected == 0),
            observed: observed.unwrap_or_else(|| json!({ "evaluated": evaluated, "unexpected": self.unexpected })),
            expected: self.expected,
            unexpected_count: self.unexpected,
            unexpected_sample: self.sample,
        }
    }
}

fn finish(
    gate: Gate,
    checkpoint: &str,
    trigger: &str,
    started: DateTime<Utc>,
    evaluated: u64,
    results: Vec<ExpectationResult>,
) -> QualityRun {
    let success = results.iter().all(|r| r.success);
    QualityRun {
        id: QualityRun::make_id(gate, started, checkpoint),
        gate,
        checkpoint: checkpoint.to_string(),
        trigger: trigger.to_string(),
        started_at: started,
        finished_at: Utc::now(),
        success,
        evaluated,
        results,
        action: if success { String::new() } else { gate.on_failure().to_string() },
    }
}

/// Runs the checkpoints and records their results.
#[derive(Clone)]
pub struct QualityChecks {
    pub store: Arc<dyn OperationalStore>,
    pub warehouse: Arc<dyn Warehouse>,
    pub metrics: Metrics,
    pub config: QualityConfig,
}

/// The Silver columns Gate 2 selects, in the order its checks index them.
const SILVER_COLUMNS: [&str; 12] = [
    "event_id",
    "profile_id",
    "source",
    "kind",
    "occurred_at",
    "received_at",
    "identifiers",
    "traits",
    "properties",
    "raw_seq",
    "name",
    "utm",
];

fn text(v: &Value) -> Option<&str> {
    v.as_str().filter(|s| !s.is_empty())
}

fn timestamp(v: &Value) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(v.as_str()?).ok().map(|t| t.with_timezone(&Utc))
}

/// Whether a column value has the configured type (JSON columns arrive as their text).
fn has_type(v: &Value, ty: &str) -> bool {
    let parsed = || match v {
        Value::String(s) => serde_json::from_str::<Value>(s).ok(),
        other => Some(other.clone()),
    };
    match ty {
        "object" => parsed().is_some_and(|p| p.is_object()),
        "array" => parsed().is_some_and(|p| p.is_array()),
        "string" => v.is_string(),
        "timestamp" => timestamp(v).is_some(),
        _ => false,
    }
}

impl QualityChecks {
    /// Gate 2 on the Silver rows received in the last `quality.gate2.window_hours`.
    pub async fn gate2(&self, trigger: &str) -> Result<QualityRun, StoreError> {
        let cfg = &self.config.gate2;
        let started = Utc::now();
        // A warehouse nobody has written to yet has no tables (they are made on first contact).
        self.warehouse.ensure_schema().await?;
        let since = started - ChronoDuration::hours(i64::try_from(cfg.window_hours).unwrap_or(i64::MAX / 4_000_000));
        let index = |c: &str| SILVER_COLUMNS.iter().position(|k| *k == c);
        // A declared column Silver does not have is a failed expectation, never a silent skip.
        let unknown: Vec<ExpectationResult> = cfg
            .required
            .iter()
            .chain(cfg.types.keys())
            .chain(cfg.unique.iter().flatten())
            .filter(|c| index(c).is_none())
            .map(|c| ExpectationResult {
                expectation: "expect_column_to_exist".into(),
                column: Some(c.clone()),
                success: false,
                observed: json!({ "columns": SILVER_COLUMNS }),
                expected: json!({ "column": c }),
                unexpected_count: 0,
                unexpected_sample: Vec::new(),
            })
            .collect();
        let mut required: Vec<(usize, Tally)> = cfg
            .required
            .iter()
            .filter_map(|c| {
                Some((index(c)?, Tally::new("expect_column_values_to_not_be_null", Some(c), json!({ "mostly": 1.0 }))))
            })
            .collect();
        let mut types: Vec<(usize, String, Tally)> = cfg
            .types
            .iter()
            .filter_map(|(c, ty)| {
                Some((
                    index(c)?,
                    ty.clone(),
                    Tally::new("expect_column_values_to_be_of_type", Some(c), json!({ "type": ty })),
                ))
            })
            .collect();
        let mut unique: Vec<(Vec<usize>, HashSet<String>, Tally)> = cfg
            .unique
            .iter()
            .filter_map(|cols| {
                let idx: Option<Vec<usize>> = cols.iter().map(|c| index(c)).collect();
                let name = cols.join(",");
                Some((
                    idx?,
                    HashSet::new(),
                    Tally::new("expect_compound_columns_to_be_unique", Some(&name), json!({ "columns": cols })),
                ))
            })
            .collect();
        let mut bounds = Tally::new(
            "expect_column_values_to_be_between",
            Some("occurred_at"),
            json!({ "max_seconds_after_received_at": cfg.max_future_secs }),
        );
        let mut orphans = Tally::new(
            "expect_column_values_to_exist_in_store",
            Some("profile_id"),
            json!({ "referential_integrity": "profiles" }),
        );
        let mut no_bronze = Tally::new(
            "expect_column_values_to_exist_in_bronze",
            Some("raw_seq"),
            json!({ "referential_integrity": "bronze" }),
        );
        let silver = self.warehouse.table(Layer::Silver);
        let cols = SILVER_COLUMNS.join(", ");
        let mut after = String::new();
        let mut evaluated = 0u64;
        loop {
            let sql = format!(
                "SELECT {cols} FROM {silver} WHERE received_at >= @since AND event_id > @after ORDER BY event_id LIMIT {PAGE}"
            );
            let params = [
                ("since".to_string(), QueryValue::Timestamp(since)),
                ("after".to_string(), QueryValue::String(after.clone())),
            ];
            let rows = self.warehouse.query(&sql, &params).await?.rows;
            let Some(last) = rows.last().and_then(|r| r.first()).and_then(Value::as_str).map(str::to_string) else {
                break;
            };
            let mut profiles: HashMap<String, Vec<String>> = HashMap::new();
            let mut seqs: Vec<(u64, String)> = Vec::new();
            for row in &rows {
                evaluated += 1;
                let get = |i: usize| row.get(i).unwrap_or(&Value::Null);
                let id = text(get(0)).unwrap_or("(no event_id)").to_string();
                for (i, t) in &mut required {
                    if text(get(*i)).is_none() && !get(*i).is_number() {
                        t.fail(&id);
                    }
                }
                for (i, ty, t) in &mut types {
                    if !has_type(get(*i), ty) {
                        t.fail(&id);
                    }
                }
                for (idx, seen, t) in &mut unique {
                    let key: Vec<String> = idx.iter().map(|i| get(*i).to_string()).collect();
                    if !seen.insert(key.join("\u{1f}")) {
                        t.fail(&id);
                    }
                }
                if let (Some(o), Some(r)) = (timestamp(get(4)), timestamp(get(5))) {
                    if (o - r).num_seconds() > i64::try_from(cfg.max_future_secs).unwrap_or(i64::MAX) {
                        bounds.fail(&id);
                    }
                }
                if cfg.referential_integrity {
                    if let Some(p) = text(get(1)) {
                        profiles.entry(p.to_string()).or_default().push(id.clone());
                    }
                    let seq = get(9).as_u64().or_else(|| get(9).as_str()?.parse().ok());
                    if let Some(seq) = seq {
                        seqs.push((seq, id.clone()));
                    }
                }
            }
            if cfg.referential_integrity {
                let ids: Vec<ProfileId> = profiles.keys().filter_map(|p| ProfileId::parse(p)).collect();
                let known: HashSet<String> = self
                    .store
                    .load_profiles(&ids)
                    .await?
                    .into_iter()
                    .map(|r| r.profile_id.as_str().to_string())
                    .collect();
                for (p, events) in &profiles {
                    if !known.contains(p) {
                        events.iter().for_each(|e| orphans.fail(e));
                    }
                }
                self.check_bronze(&seqs, &mut no_bronze).await?;
            }
            if rows.len() < PAGE {
                break;
            }
            after = last;
        }
        let mut results: Vec<ExpectationResult> = unknown;
        results.extend(required.into_iter().map(|(_, t)| t.result(evaluated, None, None)));
        results.extend(types.into_iter().map(|(_, _, t)| t.result(evaluated, None, None)));
        results.extend(unique.into_iter().map(|(_, _, t)| t.result(evaluated, None, None)));
        results.push(bounds.result(evaluated, None, None));
        if cfg.referential_integrity {
            results.push(orphans.result(evaluated, None, None));
            results.push(no_bronze.result(evaluated, None, None));
        }
        Ok(finish(Gate::BronzeToSilver, "silver", trigger, started, evaluated, results))
    }

    async fn check_bronze(&self, seqs: &[(u64, String)], tally: &mut Tally) -> Result<(), StoreError> {
        let (Some(lo), Some(hi)) = (seqs.iter().map(|s| s.0).min(), seqs.iter().map(|s| s.0).max()) else {
            return Ok(());
        };
        let bronze = self.warehouse.table(Layer::Bronze);
        let sql = format!("SELECT raw_seq FROM {bronze} WHERE raw_seq >= @lo AND raw_seq <= @hi");
        let to_i64 = |n: u64| QueryValue::Int64(i64::try_from(n).unwrap_or(i64::MAX));
        let params = [("lo".to_string(), to_i64(lo)), ("hi".to_string(), to_i64(hi))];
        let found: HashSet<u64> = self
            .warehouse
            .query(&sql, &params)
            .await?
            .rows
            .iter()
            .filter_map(|r| r.first().and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok())))
            .collect();
        let missing: Vec<&(u64, String)> = seqs.iter().filter(|(seq, _)| !found.contains(seq)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = missing.iter().map(|(seq, _)| bronze_key(*seq)).collect();
        let erased = self.store.get_documents(ERASED_BRONZE, &keys).await?;
        for ((_, id), erased) in missing.iter().zip(erased) {
            if erased.is_none() {
                tally.fail(id);
            }
        }
        Ok(())
    }

    /// Gate 3 on the latest Gold snapshot of every profile.
    pub async fn gate3(&self, trigger: &str) -> Result<QualityRun, StoreError> {
        let cfg = &self.config.gate3;
        let started = Utc::now();
        self.warehouse.ensure_schema().await?;
        let gold = self.warehouse.table(Layer::Gold);
        let mut orphans =
            Tally::new("expect_gold_profiles_to_exist_in_store", Some("profile_id"), json!({ "max": cfg.max_orphans }));
        let mut confidence = Tally::new(
            "expect_identity_confidence_to_be_at_least",
            Some("identity"),
            json!({ "min": cfg.min_identity_confidence }),
        );
        let mut incomplete = Tally::new(
            "expect_profile_completeness_mean_to_be_at_least",
            Some("traits"),
            json!({ "min": cfg.min_completeness, "traits": cfg.completeness_traits }),
        );
        let (mut scored, mut completeness_sum, mut evaluated, mut merged_checked) = (0u64, 0f64, 0u64, 0u64);
        let mut lowest_confidence = 1f64;
        let mut after = String::new();
        loop {
            let sql = format!(
                "SELECT profile_id, traits, merged_into FROM {gold} WHERE profile_id > @after ORDER BY profile_id LIMIT {PAGE}"
            );
            let params = [("after".to_string(), QueryValue::String(after.clone()))];
            let rows = self.warehouse.query(&sql, &params).await?.rows;
            let Some(last) = rows.last().and_then(|r| r.first()).and_then(Value::as_str).map(str::to_string) else {
                break;
            };
            let ids: Vec<ProfileId> =
                rows.iter().filter_map(|r| r.first().and_then(Value::as_str)).filter_map(ProfileId::parse).collect();
            let records: HashMap<String, cohort_messages::ProfileRecord> = self
                .store
                .load_profiles(&ids)
                .await?
                .into_iter()
                .map(|r| (r.profile_id.as_str().to_string(), r))
                .collect();
            for row in &rows {
                let Some(id) = row.first().and_then(Value::as_str) else { continue };
                evaluated += 1;
                let Some(record) = records.get(id) else {
                    orphans.fail(id);
                    continue;
                };
                if record.merged_into.is_some() || row.get(2).is_some_and(|m| !m.is_null()) {
                    continue;
                }
                let traits = match row.get(1) {
                    Some(Value::String(s)) => serde_json::from_str::<Value>(s).unwrap_or(Value::Null),
                    Some(v) => v.clone(),
                    None => Value::Null,
                };
                let present = cfg
                    .completeness_traits
                    .iter()
                    .filter(|t| traits.get(t.as_str()).is_some_and(|v| !v.is_null()))
                    .count();
                if present > 0 && !cfg.completeness_traits.is_empty() {
                    let share = present as f64 / cfg.completeness_traits.len() as f64;
                    scored += 1;
                    completeness_sum += share;
                    if share < cfg.min_completeness {
                        incomplete.fail(id);
                    }
                }
                if !record.merged_from.is_empty() {
                    merged_checked += 1;
                    let c = identity_confidence(&self.store.list_merges(&record.profile_id).await?);
                    lowest_confidence = lowest_confidence.min(c);
                    if c < cfg.min_identity_confidence {
                        confidence.fail(id);
                    }
                }
            }
            if rows.len() < PAGE {
                break;
            }
            after = last;
        }
        let mean = if scored == 0 { 1.0 } else { completeness_sum / scored as f64 };
        let results = vec![
            orphans.unexpected_result(evaluated, cfg.max_orphans),
            incomplete.result(
                scored,
                Some(mean >= cfg.min_completeness),
                Some(json!({ "mean": mean, "profiles_scored": scored, "below_min": 0 })),
            ),
            confidence.result(
                merged_checked,
                None,
                Some(json!({ "merged_profiles": merged_checked, "lowest": lowest_confidence })),
            ),
        ];
        let mut run = finish(Gate::SilverToGold, "gold_profiles", trigger, started, evaluated, results);
        if let Some(r) = run.results.get_mut(1) {
            r.observed["below_min"] = json!(r.unexpected_count);
        }
        Ok(run)
    }

    /// Gate 1's summary: dead letters recorded since `since` against what arrived.
    pub async fn gate1(&self, trigger: &str, since: DateTime<Utc>, accepted: u64) -> Result<QualityRun, StoreError> {
        let started = Utc::now();
        let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
        let (mut letters, mut after) = (0u64, 0u64);
        loop {
            let page = self.store.list_dead_letters(after, 1000).await?;
            let Some(last) = page.last().map(|d| d.id) else { break };
            for d in page.iter().filter(|d| d.recorded_at >= since) {
                // A summary letter stands for all of a payload's rejections, counted under the
                // first reason it lists.
                let n = d.summarized().unwrap_or(1);
                letters += n;
                // The reason's first words: "element 3: missing userId" → "missing userId".
                let reason: String = d.first_reason().chars().take(60).collect();
                *by_reason.entry(reason).or_default() += n;
            }
            if page.len() < 1000 {
                break;
            }
            after = last;
        }
        let total = letters + accepted;
        let ratio = if total == 0 { 0.0 } else { letters as f64 / total as f64 };
        let max = self.config.gate1.max_dead_letter_ratio;
        let result = ExpectationResult {
            expectation: "expect_dead_letter_ratio_to_be_at_most".into(),
            column: None,
            success: ratio <= max,
            observed: json!({ "dead_letters": letters, "arrived": total, "ratio": ratio, "by_reason": by_reason }),
            expected: json!({ "max": max, "since": since }),
            unexpected_count: letters,
            unexpected_sample: Vec::new(),
        };
        Ok(finish(Gate::Ingestion, "ingest", trigger, started, total, vec![result]))
    }

    /// Stores a run and updates the gate's metrics.
    pub async fn record(&self, run: &QualityRun) -> Result<(), StoreError> {
        record(self.store.as_ref(), &self.metrics, run).await
    }
}

impl Tally {
    /// A count bound rather than "none may fail".
    fn unexpected_result(self, evaluated: u64, max: u64) -> ExpectationResult {
        let ok = self.unexpected <= max;
        self.result(evaluated, Some(ok), None)
    }
}

/// How sure the merges behind a profile are: the weakest of them, where shared identifiers and
/// reviewed matches count as certain and an automatic match as its model score.
pub fn identity_confidence(merges: &[cohort_messages::msgs::IdentityMerged]) -> f64 {
    merges
        .iter()
        .map(|m| match m.reason {
            MergeReason::AutoMerged { score } => score,
            MergeReason::SharedIdentifier | MergeReason::ReviewApproved { .. } => 1.0,
        })
        .fold(1.0, f64::min)
}

/// The newest run of each gate (runs come newest first).
pub fn latest_per_gate(runs: &[QualityRun]) -> BTreeMap<u8, &QualityRun> {
    let mut latest = BTreeMap::new();
    for r in runs {
        latest.entry(r.gate.number()).or_insert(r);
    }
    latest
}

/// Gate 4's row-count check of one batch sync: `size` against the previous run's.
pub fn gate4_row_count(
    cfg: &cohort_config::Gate4Config,
    activation: &str,
    trigger: &str,
    size: u64,
    previous: Option<u64>,
) -> QualityRun {
    let started = Utc::now();
    let change = previous.filter(|p| *p > 0).map(|p| (size as f64 - p as f64) / p as f64);
    let applies = previous.is_some_and(|p| p >= cfg.min_baseline_rows);
    let ok = !applies || change.is_none_or(|c| c.abs() <= cfg.row_count_tolerance);
    let result = ExpectationResult {
        expectation: "expect_table_row_count_to_be_within_tolerance".into(),
        column: None,
        success: ok,
        observed: json!({ "rows": size, "previous": previous, "change": change }),
        expected: json!({ "tolerance": cfg.row_count_tolerance, "min_baseline_rows": cfg.min_baseline_rows }),
        unexpected_count: u64::from(!ok),
        unexpected_sample: Vec::new(),
    };
    finish(Gate::PreReverseEtl, activation, trigger, started, size, vec![result])
}

/// Gate 4's refusal of one job: its mapping left a field empty or put personal data where the
/// activation does not allow it. The job is kept for a retry once the mapping is fixed.
pub fn gate4_refusal(activation: &str, profile_id: &str, reason: &str) -> QualityRun {
    let started = Utc::now();
    let result = ExpectationResult {
        expectation: "expect_mapped_fields_valid_and_personal_data_only_in_pii_fields".into(),
        column: None,
        success: false,
        observed: json!({ "reason": reason }),
        expected: json!({ "pii_fields": "the activation's", "mapped_fields": "each has a value" }),
        unexpected_count: 1,
        unexpected_sample: vec![profile_id.to_string()],
    };
    finish(Gate::PreReverseEtl, activation, "activation", started, 1, vec![result])
}

/// Stores a run (a `quality_run` record) and sets the gate's metrics.
pub async fn record(store: &dyn OperationalStore, metrics: &Metrics, run: &QualityRun) -> Result<(), StoreError> {
    record_run(store, metrics, run, true).await
}

/// Stores a run; `set_gauge` false leaves `cohort_quality_gate_failing` alone (a single refused
/// job is counted and stored, but the gauge tracks held batch syncs).
pub async fn record_run(
    store: &dyn OperationalStore,
    metrics: &Metrics,
    run: &QualityRun,
    set_gauge: bool,
) -> Result<(), StoreError> {
    let state = serde_json::to_value(run).map_err(|e| StoreError::unavailable(e.to_string()))?;
    let saga = SagaRecord {
        saga_id: run.id.clone(),
        kind: QUALITY_RUN.into(),
        subject: run.checkpoint.clone(),
        status: if run.success { SagaStatus::Completed } else { SagaStatus::Failed },
        version: 1,
        state,
        created_at: run.started_at,
        updated_at: run.finished_at,
    };
    store.save_saga(&saga).await?;
    let gate = run.gate.number().to_string();
    let outcome = if run.success { "passed" } else { "failed" };
    metrics.quality_runs.with_label_values(&[gate.as_str(), outcome]).inc();
    if set_gauge {
        metrics.quality_gate_failing.with_label_values(&[gate.as_str()]).set(i64::from(!run.success));
    }
    if !run.success {
        let failed: Vec<&str> = run.failures().map(|r| r.expectation.as_str()).collect();
        tracing::warn!(gate = run.gate.number(), checkpoint = %run.checkpoint, run = %run.id, ?failed, "quality gate failed");
    }
    Ok(())
}

/// Runs recorded since `since`, newest first, at most `limit`, optionally of one gate.
pub async fn list_runs(
    store: &dyn OperationalStore,
    gate: Option<Gate>,
    since: DateTime<Utc>,
    limit: usize,
) -> Result<Vec<QualityRun>, StoreError> {
    let prefix = "quality:";
    let mut cursor = format!("{prefix}{}", since.format("%Y%m%dT%H%M%S"));
    let mut out: Vec<QualityRun> = Vec::new();
    loop {
        let page = store.list_sagas(Some(&cursor), 500).await?;
        let Some(last) = page.last().map(|s| s.saga_id.clone()) else { break };
        let done = page.len() < 500 || !last.starts_with(prefix);
        out.extend(
            page.into_iter()
                .take_while(|s| s.saga_id.starts_with(prefix))
                .filter(|s| s.kind == QUALITY_RUN)
                .filter_map(|s| serde_json::from_value::<QualityRun>(s.state).ok())
                .filter(|r| gate.is_none_or(|g| r.gate == g)),
        );
        if done {
            break;
        }
        cursor = last;
    }
    out.reverse();
    out.truncate(limit);
    Ok(out)
}

/// One stored run.
pub async fn get_run(store: &dyn OperationalStore, id: &str) -> Result<Option<QualityRun>, StoreError> {
    Ok(store.load_saga(id).await?.filter(|s| s.kind == QUALITY_RUN).and_then(|s| serde_json::from_value(s.state).ok()))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A static HTML page of runs, in the manner of Great Expectations' data docs.
pub fn report_html(runs: &[QualityRun]) -> String {
    let mut html = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Cohort quality gates</title><style>\
         body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}\
         td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}\
         .ok{color:#137333}.fail{color:#c5221f;font-weight:bold}code{font-size:90%}</style></head><body>\
         <h1>Quality gates</h1>",
    );
    let latest = latest_per_gate(runs);
    html.push_str("<h2>Latest run of each gate</h2><table><tr><th>gate</th><th>checkpoint</th><th>finished</th><th>status</th><th>on failure</th></tr>");
    for g in Gate::ALL {
        match latest.get(&g.number()) {
            Some(r) => html.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
                g.number(),
                escape(&r.checkpoint),
                r.finished_at.to_rfc3339(),
                if r.success { "ok" } else { "fail" },
                if r.success { "passed" } else { "failed" },
                escape(g.on_failure())
            )),
            None => html.push_str(&format!(
                "<tr><td>{}</td><td colspan=\"3\">no run yet</td><td>{}</td></tr>",
                g.number(),
                escape(g.on_failure())
            )),
        }
    }
    html.push_str("</table>");
    for r in runs {
        html.push_str(&format!(
            "<h3 id=\"{id}\">Gate {g} · {cp} · <span class=\"{cls}\">{st}</span></h3><p><code>{id}</code>, trigger {tr}, {n} evaluated, {at}</p>\
             <table><tr><th>expectation</th><th>column</th><th>status</th><th>observed</th><th>expected</th><th>failing ids (sample)</th></tr>",
            id = escape(&r.id),
            g = r.gate.number(),
            cp = escape(&r.checkpoint),
            cls = if r.success { "ok" } else { "fail" },
            st = if r.success { "passed" } else { "failed" },
            tr = escape(&r.trigger),
            n = r.evaluated,
            at = r.finished_at.to_rfc3339(),
        ));
        for e in &r.results {
            html.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td><code>{}</code></td><td><code>{}</code></td><td>{}</td></tr>",
                escape(&e.expectation),
                escape(e.column.as_deref().unwrap_or("")),
                if e.success { "ok" } else { "fail" },
                if e.success { "passed" } else { "failed" },
                escape(&e.observed.to_string()),
                escape(&e.expected.to_string()),
                escape(&e.unexpected_sample.join(", ")),
            ));
        }
        html.push_str("</table>");
    }
    html.push_str("</body></html>");
    html
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_config::Gate4Config;

    #[test]
    fn gate_4_holds_a_run_that_moved_beyond_the_tolerance_from_a_large_enough_baseline() {
        let cfg = Gate4Config { row_count_tolerance: 0.2, min_baseline_rows: 10 };
        assert!(gate4_row_count(&cfg, "a", "t", 12, Some(10)).success, "+20% is within");
        assert!(!gate4_row_count(&cfg, "a", "t", 13, Some(10)).success, "+30% is not");
        assert!(!gate4_row_count(&cfg, "a", "t", 3, Some(10)).success, "-70% is not");
        assert!(gate4_row_count(&cfg, "a", "t", 30, Some(5)).success, "small baselines swing freely");
        assert!(gate4_row_count(&cfg, "a", "t", 30, None).success, "the first run has nothing to compare");
        let held = gate4_row_count(&cfg, "list", "t", 3, Some(10));
        assert_eq!(held.gate, Gate::PreReverseEtl);
        assert_eq!(held.action, Gate::PreReverseEtl.on_failure());
        assert_eq!(held.results[0].observed["previous"], 10);
    }

    #[test]
    fn identity_confidence_is_the_weakest_merge() {
        use cohort_messages::msgs::IdentityMerged;
        let merge = |reason| IdentityMerged {
            survivor: ProfileId::parse("prof_000000000000aaaaaaaaaaaa").unwrap(),
            merged: ProfileId::parse("prof_000000000000bbbbbbbbbbbb").unwrap(),
            evidence: Vec::new(),
            at: Utc::now(),
            seq: 0,
            reason,
        };
        assert_eq!(identity_confidence(&[]), 1.0);
        let reviewed = MergeReason::ReviewApproved { review_id: "r".into(), score: 0.7, by: "x".into() };
        assert_eq!(identity_confidence(&[merge(MergeReason::SharedIdentifier), merge(reviewed)]), 1.0);
        let auto = [merge(MergeReason::SharedIdentifier), merge(MergeReason::AutoMerged { score: 0.8 })];
        assert_eq!(identity_confidence(&auto), 0.8, "an automatic match below 0.85 fails gate 3's default");
    }

    #[test]
    fn column_types_are_read_from_json_text_as_both_warehouses_return_it() {
        assert!(has_type(&json!("{\"a\":1}"), "object"));
        assert!(!has_type(&json!("not json"), "object"));
        assert!(has_type(&json!("[]"), "array"));
        assert!(!has_type(&json!("{}"), "array"));
        assert!(has_type(&json!("2026-11-27T10:00:00.000000Z"), "timestamp"));
        assert!(!has_type(&json!("yesterday"), "timestamp"));
        assert!(!has_type(&Value::Null, "string"));
    }

    #[test]
    fn the_html_report_escapes_what_it_shows() {
        let mut run = gate4_row_count(
            &Gate4Config { row_count_tolerance: 0.2, min_baseline_rows: 1 },
            "<b>x</b>",
            "t",
            9,
            Some(1),
        );
        run.results[0].unexpected_sample = vec!["<script>".into()];
        let html = report_html(&[run]);
        assert!(!html.contains("<script>") && html.contains("&lt;script&gt;"));
        assert!(html.contains("&lt;b&gt;x&lt;/b&gt;") && html.contains("failed"));
        assert!(html.contains("no run yet"), "gates without runs are listed");
    }
}
