//! Every Prometheus metric Cohort exports, registered in one registry.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// The metric set; cheap to clone (all handles are reference counted).
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub events_received: IntCounterVec,
    pub events_accepted: IntCounterVec,
    pub events_rejected: IntCounterVec,
    pub events_duplicate: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub actor_restarts: IntCounterVec,
    pub actor_escalations: IntCounterVec,
    pub profile_actors_live: IntGauge,
    pub mailbox_depth: IntGaugeVec,
    pub api_latency: HistogramVec,
    pub event_to_profile_latency: Histogram,
    /// Time since receipt as an event passes each stage on its way to a profile.
    pub stages: PipelineStages,
    pub profiles_created: IntCounter,
    pub identity_merges: IntCounter,
    pub identity_unmerges: IntCounter,
    pub segment_changes: IntCounterVec,
    pub segment_evaluations: IntCounter,
    pub reverse_etl_requests: IntCounterVec,
    pub reverse_etl_skipped: IntCounterVec,
    pub trigger_latency: Histogram,
    pub identity_reviews_opened: IntCounter,
    pub identity_reviews_decided: IntCounterVec,
    pub flush_duration: Histogram,
    pub flush_failures: IntCounter,
    /// Flushes that wrote nothing because a profile holding state another sent on to it could
    /// not be snapshotted (restarting, stuck): not a store failure, so apart from those.
    pub flush_postponed: IntCounter,
    /// Profiles with changes the last flush left for a later one (`profiles.snapshot_min_interval_ms`);
    /// 0 after a flush somebody asked for, which takes everything.
    pub flush_deferred_profiles: IntGauge,
    /// Profile records the write-behind wrote: with events applied, how often a profile is
    /// rewritten whole, the flush's main cost.
    pub flush_profiles_written: IntCounter,
    pub checkpoint: IntGauge,
    pub warehouse_rows: IntCounterVec,
    pub warehouse_failures: IntCounter,
    pub warehouse_outbox: IntGauge,
    pub processed_published: IntCounter,
    pub reconcile_runs: IntCounter,
    pub reconcile_drift: IntGaugeVec,
    pub reconcile_repaired: IntCounter,
    pub idempotency_expired: IntCounter,
    pub identity_blocked: IntCounterVec,
    pub identity_links_refused: IntCounterVec,
    pub identity_match_rate: prometheus::Gauge,
    pub profiles_live: IntGauge,
    pub profiles_known: IntGauge,
    pub gdpr_saga_duration: HistogramVec,
    pub gdpr_sagas: IntCounterVec,
    pub gdpr_step_failures: IntCounterVec,
    pub gdpr_saga_leases: IntCounterVec,
    pub cluster_heartbeats: IntCounterVec,
    pub cluster_rejoins: IntCounterVec,
    pub cluster_claims_lost: IntCounterVec,
    pub gdpr_suppressed_events: IntCounterVec,
    pub consumer_lag: IntGaugeVec,
    pub api_refused: IntCounterVec,
    pub api_auth_denied: IntCounterVec,
    pub quality_runs: IntCounterVec,
    pub quality_gate_failing: IntGaugeVec,
    pub job_runs: IntCounterVec,
    pub job_duration: HistogramVec,
    pub job_last_success: IntGaugeVec,
    pub warehouse_write_duration: HistogramVec,
}

/// The `stage` labels of `cohort_pipeline_stage_seconds`, in pipeline order.
pub const PIPELINE_STAGES: [&str; 4] = ["journaled", "polled", "resolved", "delivered"];

/// `cohort_pipeline_stage_seconds` by stage, resolved once: each is observed per event.
/// The last stage, applied, is `cohort_event_to_profile_seconds`.
#[derive(Clone)]
pub struct PipelineStages {
    /// The journal append that made the event durable returned.
    pub journaled: Histogram,
    /// The dispatcher read it from the bus.
    pub polled: Histogram,
    /// An identity resolver took it up.
    pub resolved: Histogram,
    /// The profile directory queued it for its ProfileActor.
    pub delivered: Histogram,
}

impl PipelineStages {
    /// Observes `n` events received at `received_at` passing `stage` now.
    pub fn observe(stage: &Histogram, received_at: chrono::DateTime<chrono::Utc>, n: usize) {
        let secs = (chrono::Utc::now() - received_at).to_std().unwrap_or_default().as_secs_f64();
        for _ in 0..n {
            stage.observe(secs);
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn counter(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::new(name, help)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::new(name, help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> prometheus::Result<Histogram> {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let r = Registry::new_custom(Some("cohort".into()), None)?;
        let events_received = counter_vec(
            &r,
            "ingest_events_received_total",
            "Events received per source, before validation",
            &["source"],
        )?;
        let events_accepted =
            counter_vec(&r, "ingest_events_accepted_total", "Events made durable per source", &["source"])?;
        let events_rejected = counter_vec(
            &r,
            "ingest_events_rejected_total",
            "Events or payloads refused per source and reason",
            &["source", "reason"],
        )?;
        let events_duplicate =
            counter_vec(&r, "ingest_events_duplicate_total", "Events whose id had been accepted before", &["source"])?;
        let dead_letters = counter_vec(&r, "dead_letters_total", "Dead-letter records written per stage", &["stage"])?;
        let actor_restarts = counter_vec(&r, "actor_restarts_total", "Actor restarts per actor kind", &["kind"])?;
        let actor_escalations = counter_vec(
            &r,
            "actor_escalations_total",
            "Failures escalated past a supervisor, per child kind",
            &["kind"],
        )?;
        let profile_actors_live = gauge(&r, "profile_actors_live", "ProfileActors currently running")?;
        let mailbox_depth = IntGaugeVec::new(Opts::new("mailbox_depth", "Messages queued per actor kind"), &["actor"])?;
        r.register(Box::new(mailbox_depth.clone()))?;
        let api_latency = HistogramVec::new(
            HistogramOpts::new("api_request_duration_seconds", "HTTP request latency")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "method", "status"],
        )?;
        r.register(Box::new(api_latency.clone()))?;
        let event_to_profile_latency = histogram(
            &r,
            "event_to_profile_seconds",
            "From event received to applied on its profile",
            LATENCY_BUCKETS.to_vec(),
        )?;
        let stage_latency = HistogramVec::new(
            HistogramOpts::new("pipeline_stage_seconds", "From event received to passing a pipeline stage")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["stage"],
        )?;
        r.register(Box::new(stage_latency.clone()))?;
        let [journaled, polled, resolved, delivered] = PIPELINE_STAGES.map(|s| stage_latency.with_label_values(&[s]));
        let stages = PipelineStages { journaled, polled, resolved, delivered };
        let profiles_created = counter(&r, "profiles_created_total", "Profiles created by identity resolution")?;
        let identity_merges = counter(&r, "identity_merges_total", "Profile merges")?;
        let identity_unmerges = counter(&r, "identity_unmerges_total", "Merges undone")?;
        let segment_changes = counter_vec(&r, "segment_changes_total", "Segment entries and exits", &["change"])?;
        let segment_evaluations = counter(&r, "segment_evaluations_total", "Profile segment evaluations")?;
        let reverse_etl_requests = counter_vec(
            &r,
            "reverse_etl_requests_total",
            "Destination requests by destination and outcome (sent, failed, retried)",
            &["destination", "outcome"],
        )?;
        let api_refused = counter_vec(
            &r,
            "api_refused_total",
            "Requests refused by the abuse limits: per route when rate limited (429), `overloaded` when too many were in flight (503)",
            &["route"],
        )?;
        let api_auth_denied = counter_vec(
            &r,
            "api_auth_denied_total",
            "Requests refused by authentication: `missing`, `invalid` or `revoked` token (401), or `scope` (403)",
            &["reason"],
        )?;
        let quality_runs = counter_vec(
            &r,
            "quality_runs_total",
            "Quality gate checkpoint runs by gate (1-4) and result (passed, failed)",
            &["gate", "result"],
        )?;
        let quality_gate_failing = gauge_vec(
            &r,
            "quality_gate_failing",
            "1 while a gate's latest run failed (gates 2-3: the batch failed; gate 4: a sync is held), else 0",
            &["gate"],
        )?;
        // Every gate is reported from the start, so "no failure yet" is a 0, not a missing series.
        for gate in ["1", "2", "3", "4"] {
            quality_gate_failing.with_label_values(&[gate]).set(0);
        }
        let job_runs = counter_vec(
            &r,
            "job_runs_total",
            "Scheduled job occurrences by job and outcome (succeeded, failed, elsewhere, not_started)",
            &["job", "outcome"],
        )?;
        let job_duration = HistogramVec::new(
            HistogramOpts::new("job_duration_seconds", "Scheduled job run time")
                .buckets(vec![0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0]),
            &["job"],
        )?;
        r.register(Box::new(job_duration.clone()))?;
        let job_last_success = IntGaugeVec::new(
            Opts::new("job_last_success_timestamp_seconds", "When each job last succeeded on this replica (Unix time)"),
            &["job"],
        )?;
        r.register(Box::new(job_last_success.clone()))?;
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                "consumer_lag_events",
                "Events published but not yet read by the pipeline, per topic and partition (the embedded journal is topic `journal`)",
            ),
            &["topic", "partition"],
        )?;
        r.register(Box::new(consumer_lag.clone()))?;
        let warehouse_write_duration = HistogramVec::new(
            HistogramOpts::new("warehouse_write_seconds", "Warehouse write latency per layer and outcome")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["layer", "outcome"],
        )?;
        r.register(Box::new(warehouse_write_duration.clone()))?;
        let gdpr_saga_duration = HistogramVec::new(
            HistogramOpts::new("gdpr_saga_duration_seconds", "From a deletion request to its saga's end")
                .buckets(vec![0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14_400.0, 86_400.0]),
            &["regulation"],
        )?;
        r.register(Box::new(gdpr_saga_duration.clone()))?;
        let gdpr_sagas =
            counter_vec(&r, "gdpr_sagas_total", "Deletion sagas by regulation and event", &["regulation", "event"])?;
        let gdpr_step_failures =
            counter_vec(&r, "gdpr_step_failures_total", "Deletion saga step attempts that failed", &["step"])?;
        let gdpr_saga_leases = counter_vec(
            &r,
            "gdpr_saga_leases_total",
            "Deletion saga leases: acquired, taken_over (from an expired owner), held_elsewhere, released",
            &["outcome"],
        )?;
        let cluster_heartbeats = counter_vec(
            &r,
            "cluster_heartbeats_total",
            "Membership heartbeats written to the shared store, ok or failed",
            &["outcome"],
        )?;
        let cluster_rejoins = counter_vec(
            &r,
            "cluster_rejoins_total",
            "Consumer-group rejoins forced because partitions had no live member for too long, ok or failed",
            &["outcome"],
        )?;
        let cluster_claims_lost = counter_vec(
            &r,
            "cluster_claims_lost_total",
            "Identifiers another replica stored first: the two profiles merged, or the identifier kept its first owner",
            &["outcome"],
        )?;
        let gdpr_suppressed_events = counter_vec(
            &r,
            "gdpr_suppressed_events_total",
            "Events of erased people dropped, per stage (ingest, resolver, profile)",
            &["stage"],
        )?;
        let reverse_etl_skipped = counter_vec(
            &r,
            "reverse_etl_skipped_total",
            "Activations not sent, by destination and reason (consent, suppressed, gate4, no_address)",
            &["destination", "reason"],
        )?;
        let trigger_latency = histogram(
            &r,
            "trigger_latency_seconds",
            "Event received to destination request sent",
            vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
        )?;
        let identity_reviews_opened =
            counter(&r, "identity_reviews_opened_total", "Probabilistic matches queued for review")?;
        let identity_reviews_decided = counter_vec(
            &r,
            "identity_reviews_decided_total",
            "Review decisions and automatic merges, by outcome",
            &["outcome"],
        )?;
        let flush_duration =
            histogram(&r, "profile_flush_seconds", "Write-behind flush duration", LATENCY_BUCKETS.to_vec())?;
        let flush_failures =
            counter(&r, "profile_flush_failures_total", "Write-behind flushes that failed and will be retried")?;
        let flush_postponed = counter(
            &r,
            "profile_flush_postponed_total",
            "Write-behind flushes that wrote nothing while a profile holding merged state could not be snapshotted",
        )?;
        let flush_deferred_profiles = gauge(
            &r,
            "profile_flush_deferred_profiles",
            "Profiles with unflushed changes the last flush left for a later one, snapshotted moments before",
        )?;
        let flush_profiles_written =
            counter(&r, "profile_flush_profiles_written_total", "Profile records written by write-behind flushes")?;
        let checkpoint =
            gauge(&r, "pipeline_checkpoint", "Journal seq up to which every event is persisted in profiles")?;
        let warehouse_rows =
            counter_vec(&r, "warehouse_rows_written_total", "Rows written to the warehouse per layer", &["layer"])?;
        let warehouse_failures = counter(
            &r,
            "warehouse_relay_failures_total",
            "Outbox relays that failed (the outbox keeps the rows; retried with backoff)",
        )?;
        let warehouse_outbox = gauge(
            &r,
            "warehouse_outbox_batches",
            "Outbox batches waiting for the warehouse, counted at the last relay attempt",
        )?;
        let processed_published =
            counter(&r, "processed_events_published_total", "Events published to cdp.processed.events")?;
        let reconcile_runs = counter(&r, "reconcile_runs_total", "Completed Gold reconciliations")?;
        let reconcile_drift = IntGaugeVec::new(
            Opts::new("reconcile_drift_profiles", "Profiles out of step with Gold at the last reconciliation, by kind"),
            &["kind"],
        )?;
        r.register(Box::new(reconcile_drift.clone()))?;
        let reconcile_repaired =
            counter(&r, "reconcile_repaired_total", "Gold snapshots written or removed by reconciliation")?;
        let idempotency_expired =
            counter(&r, "idempotency_keys_expired_total", "Idempotency keys removed by retention")?;
        let identity_blocked = counter_vec(
            &r,
            "identity_blocked_identifiers_total",
            "Identifiers ignored by identity resolution because they are blocked, per kind",
            &["kind"],
        )?;
        let identity_match_rate = prometheus::Gauge::new(
            "identity_match_rate",
            "Share of live profiles tied to a known person (email, phone, user id, Salesforce or WhatsApp id)",
        )?;
        r.register(Box::new(identity_match_rate.clone()))?;
        let profiles_live = gauge(&r, "profiles_live", "Profiles not merged away, at the last count")?;
        let profiles_known =
            gauge(&r, "profiles_known", "Live profiles with an identifier of a known person, at the last count")?;
        let identity_links_refused = counter_vec(
            &r,
            "identity_links_refused_total",
            "Identifiers that did not link profiles because of a limit, per kind and reason",
            &["kind", "reason"],
        )?;
        Ok(Self {
            registry: r,
            identity_blocked,
            identity_links_refused,
            identity_match_rate,
            profiles_live,
            profiles_known,
            warehouse_rows,
            warehouse_failures,
            warehouse_outbox,
            processed_published,
            reconcile_runs,
            reconcile_drift,
            reconcile_repaired,
            idempotency_expired,
            events_received,
            events_accepted,
            events_rejected,
            events_duplicate,
            dead_letters,
            actor_restarts,
            actor_escalations,
            profile_actors_live,
            mailbox_depth,
            api_latency,
            event_to_profile_latency,
            stages,
            profiles_created,
            identity_merges,
            identity_unmerges,
            segment_changes,
            segment_evaluations,
            reverse_etl_requests,
            reverse_etl_skipped,
            trigger_latency,
            identity_reviews_opened,
            identity_reviews_decided,
            flush_duration,
            flush_failures,
            flush_postponed,
            flush_deferred_profiles,
            flush_profiles_written,
            checkpoint,
            gdpr_saga_duration,
            gdpr_sagas,
            gdpr_step_failures,
            gdpr_saga_leases,
            cluster_heartbeats,
            cluster_rejoins,
            cluster_claims_lost,
            gdpr_suppressed_events,
            consumer_lag,
            api_refused,
            api_auth_denied,
            quality_runs,
            quality_gate_failing,
            job_runs,
            job_duration,
            job_last_success,
            warehouse_write_duration,
        })
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let encoder = prometheus::TextEncoder::new();
        encoder.encode_to_string(&self.registry.gather()).unwrap_or_else(|e| format!("# encode error: {e}\n"))
    }

    /// A mailbox-depth tracker for one actor kind.
    pub fn queue(&self, actor: &str) -> QueueDepth {
        QueueDepth { count: Arc::new(AtomicI64::new(0)), gauge: self.mailbox_depth.with_label_values(&[actor]) }
    }
}

/// ractor does not expose mailbox lengths, so senders count up and handlers count down.
#[derive(Clone, Debug)]
pub struct QueueDepth {
    count: Arc<AtomicI64>,
    gauge: IntGauge,
}

impl QueueDepth {
    pub fn enqueued(&self) {
        let v = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        self.gauge.set(v);
    }
    pub fn dequeued(&self) {
        let v = self.count.fetch_sub(1, Ordering::Relaxed) - 1;
        self.gauge.set(v.max(0));
    }
    pub fn get(&self) -> i64 {
        self.count.load(Ordering::Relaxed)
    }
}
