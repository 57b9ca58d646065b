//! `cohort replay --from bronze`: rebuilds profiles and Silver from the raw payloads kept in
//! Bronze (the reason slide 9 keeps Bronze).
//!
//! Each payload is normalized again with today's rules and published to the bus like a fresh
//! ingest. Event ids come from the payloads themselves, so events the pipeline already has are
//! dropped as duplicates and a replay never double counts; a store that lost them gets them
//! back. Silver rows are then written for every replayed event under its live profile, which
//! re-creates Silver rows an analyst deleted (Silver is keyed by event id, so existing rows
//! stay single).

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use chrono::{DateTime, Utc};
use cohort_actors::ingest::parse_format_label;
use cohort_actors::normalize::normalize;
use cohort_actors::warehouse_sink::tokenize_silver;
use cohort_adapters::crypto::is_sealed;
use cohort_adapters::warehouse::PayloadEncoding;
use cohort_adapters::{AppendBatch, BronzeRow, Layer, QueryValue, SilverRow, Warehouse};
use cohort_config::Config;
use cohort_config::WarehousePii;
use cohort_messages::msgs::RawPayload;
use cohort_messages::Source;
use serde::Serialize;
use serde_json::Value;

use crate::system::{Cohort, SystemOptions};

/// Bronze rows read and replayed per step.
const PAGE: i64 = 500;

/// What to replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayFilter {
    /// Only payloads received at or after this time.
    pub since: Option<DateTime<Utc>>,
    pub source: Option<Source>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReplaySummary {
    pub payloads: u64,
    pub events: u64,
    /// Events the pipeline did not have yet (the rest were duplicates).
    pub new_events: u64,
    /// Payloads today's normalizers refuse (kept in Bronze, reported here).
    pub refused_payloads: u64,
    /// Payloads received before the deduplication window (`retention.idempotency_hours`): their
    /// events' ids are forgotten, so replayed they would count a second time. Not replayed.
    pub outside_window: u64,
    /// Events Gate 1's timestamp bounds refuse, as at ingest (they were dead letters then).
    pub refused_events: u64,
    pub silver_rows: u64,
    pub seconds: f64,
}

/// Starts Cohort from `config` without its HTTP API, replays Bronze into it, settles, and stops.
pub async fn run(config: Config, filter: ReplayFilter, options: SystemOptions) -> anyhow::Result<ReplaySummary> {
    let cohort = Cohort::start(config, options).await?;
    let result = replay(&cohort, &filter).await;
    let stopped = cohort.shutdown(Duration::from_secs(30)).await;
    let summary = result?;
    stopped?;
    Ok(summary)
}

/// Replays into a running Cohort.
pub async fn replay(cohort: &Cohort, filter: &ReplayFilter) -> anyhow::Result<ReplaySummary> {
    let warehouse = cohort
        .ctx
        .warehouse
        .clone()
        .ok_or_else(|| anyhow!("replay reads Bronze from the warehouse, and warehouse.url is none://"))?;
    // The running system's options: they carry the compiled-in connectors.
    let options = cohort.api.normalize.as_ref().clone();
    let started = Instant::now();
    let mut summary = ReplaySummary::default();
    let mut after: i64 = 0;
    let keep = cohort_actors::retention::idempotency_keep(cohort.config.retention.idempotency_hours);
    let window_start = cohort_actors::retention::dedup_window_start(keep, chrono::Utc::now());
    // A bar on a terminal (Bronze's size bounds the work; filters only shorten it).
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::new(warehouse.count_rows(Layer::Bronze).await.unwrap_or(0))
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} Bronze payloads {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        let rows = bronze_page(warehouse.as_ref(), after, filter).await?;
        let Some(last) = rows.last() else { break };
        after = i64::try_from(last.raw_seq).context("raw_seq out of range")?;
        let mut replayed = Vec::new();
        for row in &rows {
            summary.payloads += 1;
            if row.received_at < window_start {
                summary.outside_window += 1;
                continue;
            }
            let Some(format) = parse_format_label(&row.format) else {
                summary.refused_payloads += 1;
                tracing::warn!(raw_seq = row.raw_seq, format = %row.format, "unknown payload format in Bronze");
                continue;
            };
            // Sealed when the warehouse keeps no personal data: the store's data key opens it.
            let body = if is_sealed(&row.payload) {
                match cohort.pii.open_text(&row.payload) {
                    Ok(text) => BronzeRow { payload: text, ..row.clone() }.body()?,
                    Err(e) => {
                        summary.refused_payloads += 1;
                        tracing::warn!(raw_seq = row.raw_seq, error = %e, "sealed Bronze payload cannot be opened with this store's data key");
                        continue;
                    }
                }
            } else {
                row.body()?
            };
            let payload = RawPayload {
                source: row.source,
                format,
                body: body.into(),
                content_type: row.content_type.clone(),
                received_at: row.received_at,
            };
            let normalized = match normalize(&payload, &options) {
                Ok(n) => n,
                Err(e) => {
                    summary.refused_payloads += 1;
                    tracing::warn!(raw_seq = row.raw_seq, error = %e, "Bronze payload refused by today's normalizers");
                    continue;
                }
            };
            let mut events = normalized.events;
            let gate1 = &cohort.config.quality.gate1;
            let before = events.len();
            events.retain(|e| {
                cohort_actors::ingest::timestamp_out_of_bounds(gate1, e.occurred_at, e.received_at).is_none()
            });
            summary.refused_events += (before - events.len()) as u64;
            if events.is_empty() {
                continue;
            }
            for e in &mut events {
                // Silver keeps pointing at the Bronze row the event came from.
                e.raw.seq = Some(row.raw_seq);
            }
            summary.events += events.len() as u64;
            let outcome = cohort
                .ctx
                .bus
                .publish(AppendBatch { raw: None, events: events.clone() })
                .await
                .context("publishing replayed events")?;
            summary.new_events += outcome.seqs.iter().filter(|s| s.is_some()).count() as u64;
            replayed.extend(events);
        }
        cohort.settle(Duration::from_secs(300)).await?;
        let mut silver = Vec::with_capacity(replayed.len());
        for event in &replayed {
            let Some(identifier) = event.routing_identifier() else { continue };
            if let Some(profile) = cohort.ctx.index.resolve(identifier).await? {
                let mut row = SilverRow::from_event(event, &profile);
                if cohort.config.warehouse.pii == WarehousePii::Tokenize {
                    tokenize_silver(&cohort.pii, &mut row);
                }
                silver.push(row);
            }
        }
        summary.silver_rows += silver.len() as u64;
        if !silver.is_empty() {
            warehouse.write_silver(silver).await.context("writing Silver")?;
        }
        bar.inc(rows.len() as u64);
        bar.set_message(format!("({} events, {} new)", summary.events, summary.new_events));
        if rows.len() < PAGE as usize {
            break;
        }
    }
    bar.finish_and_clear();
    cohort.relay_warehouse().await?;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

async fn bronze_page(warehouse: &dyn Warehouse, after: i64, filter: &ReplayFilter) -> anyhow::Result<Vec<BronzeRow>> {
    let mut sql = format!(
        "SELECT raw_seq, source, format, content_type, received_at, payload_encoding, payload FROM {} \
         WHERE raw_seq > @after",
        warehouse.table(Layer::Bronze)
    );
    let mut params = vec![("after".to_string(), QueryValue::Int64(after))];
    if let Some(since) = filter.since {
        sql.push_str(" AND received_at >= @since");
        params.push(("since".into(), QueryValue::Timestamp(since)));
    }
    if let Some(source) = filter.source {
        sql.push_str(" AND source = @source");
        params.push(("source".into(), QueryValue::String(source.as_str().into())));
    }
    sql.push_str(&format!(" ORDER BY raw_seq LIMIT {PAGE}"));
    let result = warehouse.query(&sql, &params).await.context("reading Bronze")?;
    result.rows.into_iter().map(bronze_row).collect()
}

fn bronze_row(row: Vec<Value>) -> anyhow::Result<BronzeRow> {
    let text = |i: usize| row.get(i).and_then(Value::as_str).map(str::to_string);
    let Some(raw_seq) = row.first().and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok())) else {
        bail!("a Bronze row has no raw_seq");
    };
    let source =
        text(1).and_then(|s| s.parse::<Source>().ok()).ok_or_else(|| anyhow!("Bronze row {raw_seq}: bad source"))?;
    let received_at = text(4)
        .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
        .ok_or_else(|| anyhow!("Bronze row {raw_seq}: bad received_at"))?
        .with_timezone(&Utc);
    let payload_encoding = match text(5).as_deref() {
        Some("utf8") => PayloadEncoding::Utf8,
        Some("base64") => PayloadEncoding::Base64,
        _ => bail!("Bronze row {raw_seq}: unknown payload encoding"),
    };
    Ok(BronzeRow {
        raw_seq,
        source,
        format: text(2).unwrap_or_default(),
        content_type: text(3).unwrap_or_default(),
        received_at,
        payload_encoding,
        payload: text(6).ok_or_else(|| anyhow!("Bronze row {raw_seq}: no payload"))?,
    })
}
