//! Wires the supervised actor system: backends chosen by config, the supervision tree, the
//! HTTP API, and an orderly shutdown.

use anyhow::{anyhow, Context};
use cohort_actors::cluster::{
    MembershipActor, MembershipArgs, MembershipSettings, ProfileRouter, ProfileRouterArgs, RoutedDispatcher,
    RoutedDispatcherArgs,
};
use cohort_actors::gdpr::destinations::ErasureDestinations;
use cohort_actors::jobs::{JobFn, JobScheduler, JobSchedulerArgs, JobSpec};
use cohort_actors::matching::MatchModel;
use cohort_actors::normalize::signature::parse_sendgrid_public_key;
use cohort_actors::normalize::{normalize_email, normalize_phone, NormalizeOptions};
use cohort_actors::reverse_etl::{ReverseEtlActor, ReverseEtlArgs};
use cohort_actors::segments::engine::{SegmentEngine, SegmentEngineArgs};
use cohort_actors::segments::models::{LogisticModel, Models};
use cohort_actors::segments::{Segment, SegmentDefinition, SegmentRegistry};
use cohort_actors::watermark::{Checkpoints, PendingIds, Watermark};
use cohort_actors::{
    spawn_identity_pool, Dispatcher, DispatcherArgs, Erasures, FaultInjector, GdprArgs, GdprCoordinator, GdprSettings,
    IdentityFactoryMsg, IdentityIndex, IdentityMatcher, IdentityMatcherArgs, IdentityRules, IdentityStatsActor,
    IdentityStatsArgs, IngestActor, IngestArgs, PipelineContext, ProfileSettings, ProfilesArgs, ProfilesDirectory,
    RetentionActor, RetentionArgs, WarehouseSink, WarehouseSinkArgs,
};
use cohort_adapters::cluster::Ownership;
use cohort_adapters::crypto::{
    key_manager_from_url, new_data_key, open_data_key, Envelope, KeyedHasher, KmsOptions, WrappedKey,
};
use cohort_adapters::embedded::EmbeddedStore;
use cohort_adapters::kafka::{KafkaBus, KafkaSettings};
use cohort_adapters::{
    open_warehouse_holding, EmbeddedBus, EventBus, Holding, MongoStore, OperationalStore, Pii, SealedStore,
    StoreErrorKind, StreamPositions, Warehouse,
};
use cohort_api::{ApiShared, ApiState};
use cohort_config::{Config, WarehousePii};
use cohort_messages::msgs::{
    BatchRun, FlushReport, GdprMsg, IdentityStatsMsg, IngestMsg, JobsMsg, ProfilesMsg, ProfilesStats, ReconcileReport,
    RelayReport, RetentionMsg, ReverseEtlMsg, SegmentMsg, WarehouseMsg,
};
use cohort_messages::segment::SegmentKind;
use cohort_messages::{Identifier, IdentifierKind, SagaRecord, SagaStatus, Source};
use cohort_supervisors::{
    ChildSpec, HealthRegistry, Metrics, RestartPolicy, Slot, Strategy, SupervisorActor, SupervisorArgs, SupervisorMsg,
};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

/// Opens the operational store and the event bus named by `storage.url` and `bus.url`.
pub async fn open_backends(config: &Config) -> anyhow::Result<(Arc<dyn OperationalStore>, Arc<dyn EventBus>)> {
    let url = config.storage.url.as_str();
    // redb's own default is 1 GiB per file; measured, 64 MiB took 300-450 MiB off the resident
    // memory of a 200,000-event benchmark at the same throughput.
    let cache = config.storage.cache_bytes();
    let (store, embedded): (Arc<dyn OperationalStore>, Option<Arc<EmbeddedStore>>) =
        if url.starts_with("mongodb://") || url.starts_with("mongodb+srv://") {
            let mongo = MongoStore::connect(url, &config.storage.database)
                .await
                .with_context(|| format!("connecting to the operational store `{}`", redact_url(url)))?;
            (mongo, None)
        } else {
            let e = EmbeddedStore::open_url(url, cache).with_context(|| format!("opening storage `{url}`"))?;
            (e.clone(), Some(e))
        };
    let bus_url = config.bus.url.as_str();
    let bus: Arc<dyn EventBus> = if bus_url == "embedded" {
        if embedded.is_none() {
            return Err(anyhow!("bus.url \"embedded\" needs an embedded storage.url"));
        }
        // The journal gets a file (and writer thread) of its own beside the store, so appends
        // never queue behind a large profile flush.
        let journal_url = if url == "memory://" { url.to_string() } else { format!("{url}.journal") };
        let journal = EmbeddedStore::open_url(&journal_url, cache)
            .with_context(|| format!("opening the journal `{journal_url}`"))?;
        Arc::new(EmbeddedBus::new(journal, store.clone()))
    } else if bus_url.starts_with("embedded://") {
        let journal =
            EmbeddedStore::open_url(bus_url, cache).with_context(|| format!("opening the journal `{bus_url}`"))?;
        Arc::new(EmbeddedBus::new(journal, store.clone()))
    } else {
        let settings = KafkaSettings {
            brokers: KafkaSettings::brokers_from_url(bus_url)?,
            group_id: config.bus.group_id.clone(),
            topic_prefix: config.bus.topic_prefix.clone(),
            partitions: config.bus.partitions,
            replication_factor: config.bus.replication_factor,
            produce_timeout: Duration::from_millis(config.bus.produce_timeout_ms),
            session_timeout: Duration::from_millis(config.bus.session_timeout_ms),
            routed_processed: config.cluster.enabled,
        };
        KafkaBus::connect(settings).await.with_context(|| format!("connecting to Kafka `{bus_url}`"))?
    };
    Ok((store, bus))
}

/// Opens the warehouse `warehouse.url` names; `None` when it is `none://`. "embedded" is a
/// DuckDB file beside the embedded store (in memory when the store is), or the SQLite file that
/// versions before DuckDB kept there, when that exists and no DuckDB file does yet.
fn embedded_warehouse_url(store: &std::path::Path) -> String {
    let duckdb = store.with_extension("warehouse.duckdb");
    let legacy = store.with_extension("warehouse.db");
    if legacy.is_file() && !duckdb.exists() {
        tracing::warn!(
            file = %legacy.display(),
            "keeping the SQLite warehouse of an earlier version; set warehouse.url = \"duckdb://...\" to start a DuckDB one"
        );
        return format!("sqlite://{}", legacy.display());
    }
    format!("duckdb://{}", duckdb.display())
}

pub async fn open_configured_warehouse(config: &Config) -> anyhow::Result<Option<Arc<dyn Warehouse>>> {
    let url = match config.warehouse.url.trim() {
        "none://" | "none" => return Ok(None),
        "embedded" => {
            let store = config.storage.url.as_str();
            match store.strip_prefix("embedded://") {
                Some(path) => embedded_warehouse_url(std::path::Path::new(path)),
                None if store == "memory://" => "memory://".to_string(),
                None => return Err(anyhow!("warehouse.url \"embedded\" needs an embedded storage.url")),
            }
        }
        other => other.to_string(),
    };
    let holding = Holding::across_relays(
        Duration::from_millis(config.warehouse.duckdb_hold_ms),
        Duration::from_millis(config.warehouse.relay_interval_ms),
    );
    let warehouse = open_warehouse_holding(&url, holding)
        .await
        .with_context(|| format!("opening the warehouse `{}`", redact_url(&url)))?;
    Ok(Some(warehouse))
}

/// The data key that seals personal data at rest, from the store's keyring (created, wrapped
/// by the key-encryption key `gdpr.key_url` names, on first start).
pub async fn open_keyring(config: &Config, store: &dyn OperationalStore) -> anyhow::Result<Envelope> {
    let key_url = config.gdpr.key_url.trim();
    let url = if key_url == "embedded" {
        match config.storage.url.strip_prefix("embedded://") {
            Some(path) => format!("file:{}", std::path::Path::new(path).with_extension("kek").display()),
            // Nothing outlives a memory store, so its data key needs no wrapping.
            None => return Ok(Envelope::generate().0),
        }
    } else {
        key_url.to_string()
    };
    let nonempty = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_string());
    let options = KmsOptions {
        endpoint: nonempty(&config.gdpr.kms_endpoint),
        token: nonempty(&config.gdpr.kms_token),
        metadata_endpoint: None,
    };
    let km = key_manager_from_url(&url, &options).map_err(|e| anyhow!("invalid configuration: `gdpr.key_url`: {e}"))?;
    let key = vec![KEYRING_DATA_KEY.to_string()];
    let stored = store.get_documents(KEYRING, &key).await.context("reading the keyring")?;
    let record: WrappedKey = match stored.into_iter().next().flatten() {
        Some(doc) => serde_json::from_value(doc).context("the stored data key is unreadable")?,
        None => {
            // Replicas starting together must agree on one key: the first to create the record
            // (a compare-and-set) wins, the others take its key.
            let (_, candidate) = new_data_key(km.as_ref()).await.context("creating the data key")?;
            let now = chrono::Utc::now();
            let claim = SagaRecord {
                saga_id: KEYRING_CLAIM.into(),
                kind: "keyring".into(),
                subject: KEYRING_DATA_KEY.into(),
                status: SagaStatus::Completed,
                version: 1,
                state: serde_json::to_value(&candidate).context("encoding the data key")?,
                created_at: now,
                updated_at: now,
            };
            let record: WrappedKey = match store.save_saga(&claim).await {
                Ok(()) => {
                    tracing::info!(key_id = %candidate.key_id, kek = %km.describe(), "data key created");
                    candidate
                }
                Err(e) if e.kind == StoreErrorKind::Conflict => {
                    let won = store.load_saga(KEYRING_CLAIM).await?.context("the data key's record vanished")?;
                    serde_json::from_value(won.state).context("the stored data key is unreadable")?
                }
                Err(e) => return Err(e).context("storing the data key"),
            };
            let doc = serde_json::to_value(&record).context("encoding the data key")?;
            store.put_documents(KEYRING, vec![(KEYRING_DATA_KEY.to_string(), Some(doc))]).await?;
            record
        }
    };
    open_data_key(km.as_ref(), &record).await.with_context(|| format!("unwrapping the data key with {}", km.describe()))
}

/// This replica's name in job run records: the pod name on Kubernetes (else "cohort"), the
/// process, and a few random characters so that two instances in one process differ.
fn replica_name() -> String {
    std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "cohort".into())
        + &format!("/{}/{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..6])
}

/// Documents: the wrapped data key.
const KEYRING: &str = "keyring";
const KEYRING_DATA_KEY: &str = "data_key";
/// Records a dispatcher reads from the bus per step.
const DISPATCH_BATCH: usize = 1024;
/// Backpressure: a dispatcher stops reading while this many records are between bus and profiles.
const MAX_IN_FLIGHT: usize = 20_000;

/// The saga record whose creation decides which replica's data key everyone uses.
const KEYRING_CLAIM: &str = "keyring:data_key";

/// Asks a scheduled job to run now and waits for its outcome.
async fn ask<M, T>(
    slot: &Slot<M>,
    job: &str,
    msg: impl FnOnce(ractor::RpcReplyPort<Result<T, String>>) -> M,
    timeout_secs: u64,
) -> anyhow::Result<T>
where
    M: ractor::Message,
    T: Send + 'static,
{
    let actor = slot.get().ok_or_else(|| anyhow!("{job} is not running"))?;
    match actor.call(msg, Some(Duration::from_secs(timeout_secs))).await {
        Ok(CallResult::Success(Ok(v))) => Ok(v),
        Ok(CallResult::Success(Err(e))) => Err(anyhow!("{job} failed: {e}")),
        _ => Err(anyhow!("{job} did not answer")),
    }
}

/// Every check `Cohort::start` makes of a configuration before it opens anything, for
/// `cohort config check`: a file it accepts is one `serve` starts with (backends aside).
pub fn check_config(config: &Config) -> anyhow::Result<()> {
    let normalize =
        NormalizeOptions::from_config(&config.normalize).map_err(|e| anyhow!("invalid configuration: {e}"))?;
    identity_rules(config, &normalize)?;
    segment_setup(config)?;
    let key = config.sources.email.sendgrid_public_key.trim();
    if !key.is_empty() {
        parse_sendgrid_public_key(key)
            .map_err(|e| anyhow!("invalid configuration: `sources.email.sendgrid_public_key`: {e}"))?;
    }
    let jobs = &config.jobs;
    for (key, expr) in [
        ("gold_reconcile", &jobs.gold_reconcile),
        ("batch_segments", &jobs.batch_segments),
        ("features", &jobs.features),
    ] {
        if !expr.trim().is_empty() {
            let never: JobFn = Arc::new(|| Box::pin(async { Ok(serde_json::Value::Null) }));
            JobSpec::new(key, expr, never).map_err(|e| anyhow!("invalid configuration: `jobs.{key}`: {e}"))?;
        }
    }
    Ok(())
}

/// `identity.blocked` normalized the way ingest normalizes identifiers, so `Test@Example.com`
/// in config blocks what ingest produces from any spelling of it.
pub fn identity_rules(config: &Config, normalize: &NormalizeOptions) -> anyhow::Result<IdentityRules> {
    let mut blocked = std::collections::HashSet::new();
    for raw in &config.identity.blocked {
        let bad = |why: &str| anyhow!("invalid configuration: `identity.blocked` entry `{raw}`: {why}");
        let id: Identifier = raw.parse().map_err(|e| bad(&format!("{e}")))?;
        let value = match id.kind {
            IdentifierKind::Email => normalize_email(&id.value).map(|e| normalize.email_key(&e)),
            IdentifierKind::Phone | IdentifierKind::WhatsappId => normalize_phone(&id.value, &normalize.default_region),
            _ => Some(id.value.clone()),
        };
        let value = value.ok_or_else(|| bad(&format!("not a valid {}", id.kind)))?;
        blocked.insert(Identifier::new(id.kind, value));
    }
    let limits = |key: &str, table: &std::collections::BTreeMap<String, usize>| {
        table
            .iter()
            .map(|(kind, n)| {
                let bad = |why: &str| anyhow!("invalid configuration: `identity.{key}.{kind}`: {why}");
                let kind: IdentifierKind = kind.parse().map_err(|_| bad("not an identifier kind"))?;
                Ok((kind, *n))
            })
            // 0 turns a limit off (a table in a config file adds to the defaults, it cannot remove them).
            .filter(|r| !matches!(r, Ok((_, 0))))
            .collect::<anyhow::Result<HashMap<_, _>>>()
    };
    Ok(IdentityRules {
        blocked,
        placeholder_phones: config.identity.block_placeholder_phones,
        max_values_per_profile: limits("max_values_per_profile", &config.identity.max_values_per_profile)?,
        max_profiles_per_identifier: limits(
            "max_profiles_per_identifier",
            &config.identity.max_profiles_per_identifier,
        )?,
    })
}

/// A URL without its credentials, for messages.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_string(),
    }
}

/// The scorers of `[models.*]` and the segments of `[[segments.define]]`, validated before
/// anything starts.
pub fn segment_setup(config: &Config) -> anyhow::Result<(Arc<SegmentRegistry>, Vec<SegmentDefinition>)> {
    let mut models = Models::default();
    for (name, m) in &config.models {
        let model = LogisticModel::new(m.bias, m.weights.clone())
            .map_err(|e| anyhow!("invalid configuration: `models.{name}.weights`: {e}"))?;
        models.insert(name.clone(), Arc::new(model));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, d) in config.segments.define.iter().enumerate() {
        Segment::compile(d.clone(), &models)
            .map_err(|e| anyhow!("invalid configuration: `segments.define[{i}]` ({}): {e}", d.name))?;
        if !seen.insert(d.name.clone()) {
            anyhow::bail!("invalid configuration: `segments.define[{i}]`: segment `{}` is defined twice", d.name);
        }
    }
    Ok((Arc::new(SegmentRegistry::new(models)), config.segments.define.clone()))
}

/// Options that are not configuration: compiled-in connectors and test hooks.
#[derive(Default, Clone)]
pub struct SystemOptions {
    /// Sources beyond the built-in five (`generate-connector`); the binary passes
    /// [`crate::connectors::compiled_in`].
    pub connectors: Vec<Arc<dyn cohort_actors::normalize::connector::Connector>>,
    pub fault: Option<Arc<dyn FaultInjector>>,
    /// Wraps the configured warehouse (tests inject the answers a real one gives under
    /// conditions an emulator cannot produce, such as BigQuery's streaming buffer).
    pub warehouse_wrapper: Option<WarehouseWrapper>,
}

/// See [`SystemOptions::warehouse_wrapper`].
pub type WarehouseWrapper = Arc<dyn Fn(Arc<dyn Warehouse>) -> Arc<dyn Warehouse> + Send + Sync>;

/// A running Cohort: the actor tree and what the API needs to reach it.
pub struct Cohort {
    pub config: Arc<Config>,
    pub api: ApiState,
    pub ctx: PipelineContext,
    /// The data key's sealing and tokens (replay opens sealed Bronze and tokenizes Silver).
    pub pii: Arc<Pii>,
    pub health: HealthRegistry,
    pub warehouse: Slot<WarehouseMsg>,
    pub retention: Slot<RetentionMsg>,
    pub reverse_etl: Slot<ReverseEtlMsg>,
    root: ActorRef<SupervisorMsg>,
    root_handle: Option<JoinHandle<()>>,
    /// Re-reads `auth.tokens_file` while Cohort runs.
    token_watch: JoinHandle<()>,
}

impl Drop for Cohort {
    fn drop(&mut self) {
        self.token_watch.abort();
    }
}

/// Silver → Gold between its gates: Gate 2 on Silver first (a failure fails the batch and Gold
/// stays as it was) with Gate 1's summary, then the Gold rebuild, then Gate 3 on Gold.
async fn gold_with_gates(
    sink: &Slot<WarehouseMsg>,
    checks: &cohort_actors::quality::QualityChecks,
) -> Result<serde_json::Value, String> {
    let started = chrono::Utc::now();
    let gate2 = checks.gate2("gold_reconcile").await.map_err(|e| format!("quality gate 2 could not run: {e}"))?;
    checks.record(&gate2).await.map_err(|e| e.to_string())?;
    // Gate 1's summary whatever Gate 2 says: a bad rollout that floods the dead letters most
    // likely fails Gate 2 as well, and then Gate 1 must not keep showing "passing".
    let window = chrono::Duration::hours(i64::try_from(checks.config.gate2.window_hours).unwrap_or(24));
    let gate1 = checks.gate1("gold_reconcile", started - window, gate2.evaluated).await.map_err(|e| e.to_string())?;
    checks.record(&gate1).await.map_err(|e| e.to_string())?;
    if !gate2.success {
        let failed: Vec<&str> = gate2.failures().map(|r| r.expectation.as_str()).collect();
        return Err(format!("quality gate 2 failed ({}); Gold not rebuilt; see run {}", failed.join(", "), gate2.id));
    }
    let report = ask(sink, "warehouse sink", |r| WarehouseMsg::Reconcile { reply: Some(r) }, 3600)
        .await
        .map_err(|e| e.to_string())?;
    let gate3 = checks.gate3("gold_reconcile").await.map_err(|e| format!("quality gate 3 could not run: {e}"))?;
    checks.record(&gate3).await.map_err(|e| e.to_string())?;
    if !gate3.success {
        let failed: Vec<&str> = gate3.failures().map(|r| r.expectation.as_str()).collect();
        return Err(format!("quality gate 3 failed ({}); see run {}", failed.join(", "), gate3.id));
    }
    let mut out = serde_json::to_value(report).map_err(|e| e.to_string())?;
    out["quality_runs"] = serde_json::json!([gate2.id, gate3.id, gate1.id]);
    Ok(out)
}

fn ingest_spec(name: &str, slot: Slot<IngestMsg>, args: Arc<dyn Fn() -> IngestArgs + Send + Sync>) -> ChildSpec {
    ChildSpec::new(name, "ingest", move |sup| {
        let slot = slot.clone();
        let args = args();
        async move {
            let (r, _) = Actor::spawn_linked(None, IngestActor, args, sup).await?;
            slot.set(r.clone());
            Ok(r.get_cell())
        }
    })
}

fn supervisor_spec(name: &str, args: SupervisorArgs) -> ChildSpec {
    ChildSpec::new(name, "supervisor", move |sup| {
        let args = args.clone();
        async move {
            let (r, _) = Actor::spawn_linked(None, SupervisorActor, args, sup).await?;
            Ok(r.get_cell())
        }
    })
}

/// `server.transparent_huge_pages`, for the whole process (memory allocated from now on). With
/// huge pages, a thread that first touches one waits while the kernel zeroes 2 MiB. At 5,000
/// Profile API requests/s those waits made the p99 4–5 ms instead of about 1 ms.
fn set_transparent_huge_pages(allowed: bool) {
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::prctl::set_thp_disable(!allowed) {
        tracing::warn!(error = %e, allowed, "could not set the transparent huge page policy");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = allowed;
}

impl Cohort {
    /// Opens the backends named in `config` and starts the supervision tree.
    pub async fn start(config: Config, options: SystemOptions) -> anyhow::Result<Cohort> {
        set_transparent_huge_pages(config.server.transparent_huge_pages);
        let config = Arc::new(config);
        let mut normalize =
            NormalizeOptions::from_config(&config.normalize).map_err(|e| anyhow!("invalid configuration: {e}"))?;
        normalize.connectors = cohort_actors::normalize::connector::ConnectorSet::new(options.connectors.clone())
            .map_err(|e| anyhow!("invalid connector: {e}"))?;
        let normalize = Arc::new(normalize);
        let sendgrid_key = match config.sources.email.sendgrid_public_key.trim() {
            "" => None,
            k => Some(
                parse_sendgrid_public_key(k)
                    .map_err(|e| anyhow!("invalid configuration: `sources.email.sendgrid_public_key`: {e}"))?,
            ),
        };
        if sendgrid_key.is_none() && config.sources.email.allow_unsigned {
            tracing::warn!(
                "sources.email.allow_unsigned is set: anyone who reaches the SendGrid webhook can add email events"
            );
        } else if sendgrid_key.is_none() {
            tracing::warn!(
                "sources.email.sendgrid_public_key is empty: the SendGrid webhook takes only bearer tokens with ingest:email"
            );
        }
        if config.uses_dev_credentials() {
            tracing::warn!(
                "development credentials from the built-in defaults are in use: set real tokens before exposing cohort"
            );
        }
        // Every config check before any backend is opened or file created.
        let rules = identity_rules(&config, &normalize)?;
        let (segments, configured_segments) = segment_setup(&config)?;
        let (store, bus) = open_backends(&config).await?;
        let warehouse = open_configured_warehouse(&config).await?;
        let warehouse = match (&options.warehouse_wrapper, warehouse) {
            (Some(wrap), Some(w)) => Some(wrap(w)),
            (_, w) => w,
        };
        let envelope = Arc::new(open_keyring(&config, store.as_ref()).await?);
        let pii = Arc::new(Pii::new(envelope.clone()));
        let store: Arc<dyn OperationalStore> =
            if config.gdpr.encrypt_at_rest { Arc::new(SealedStore::new(store, pii.clone())) } else { store };
        let erasures = Arc::new(Erasures::new(KeyedHasher::derive(&envelope)));
        erasures.load(store.as_ref()).await.context("loading the GDPR suppression list")?;
        let metrics = Metrics::new().context("registering metrics")?;
        let health = HealthRegistry::new();
        let policy = RestartPolicy::from_config(&config.supervision);
        let ctx = PipelineContext {
            store: store.clone(),
            bus: bus.clone(),
            metrics: metrics.clone(),
            watermark: Arc::new(Watermark::default()),
            index: Arc::new(IdentityIndex::with_rules(store.clone(), rules)),
            checkpoints: Arc::new(Checkpoints::default()),
            pending_ids: Arc::new(PendingIds::default()),
            profiles: ProfileSettings {
                history_limit: config.profiles.history_limit,
                passivate_after: Duration::from_secs(config.profiles.passivate_after_secs),
                flush_interval: Duration::from_millis(config.profiles.flush_interval_ms),
                snapshot_min_interval: Duration::from_millis(config.profiles.snapshot_min_interval_ms),
                max_event_attempts: config.profiles.max_event_attempts,
                restart_policy: policy,
                unmerge_window: config.identity.unmerge_window,
                snapshot_timeout: ProfileSettings::SNAPSHOT_TIMEOUT,
            },
            fault: options.fault.clone(),
            warehouse: warehouse.clone(),
            staged_bronze: Arc::default(),
            matcher: Slot::default(),
            segments: segments.clone(),
            segment_engine: Slot::default(),
            person_fingerprints: Arc::default(),
            erasures: erasures.clone(),
            // Cluster mode: this is the resolver stage's context; its changes leave through here.
            outbound: config.cluster.enabled.then(Arc::default),
            ownership: None,
        };
        // The profile stage's context: its own progress markers (over `cdp.processed.events`) in
        // cluster mode, the same as the resolvers' otherwise.
        let profile_ctx = if config.cluster.enabled {
            PipelineContext {
                watermark: Arc::new(Watermark::default()),
                checkpoints: Arc::new(Checkpoints::default()),
                pending_ids: Arc::new(PendingIds::default()),
                outbound: Some(Arc::default()),
                ownership: Some(Arc::new(Ownership::new(config.bus.partitions))),
                ..ctx.clone()
            }
        } else {
            ctx.clone()
        };

        // Ingest: one actor per source, independent of each other, and one per connector, feeding
        // its channel (a connector's load or failures never hold up the source it shares it with).
        let mut ingest_children = Vec::new();
        let mut ingest_actor = |name: &str, source: Source| {
            let slot: Slot<IngestMsg> = Slot::default();
            let queue = metrics.queue(&format!("ingest_{name}"));
            let (o, b, s, m, q) = (normalize.clone(), bus.clone(), store.clone(), metrics.clone(), queue.clone());
            let (e, gate1) = (erasures.clone(), config.quality.gate1.clone());
            let make = Arc::new(move || IngestArgs {
                erasures: e.clone(),
                gate1: gate1.clone(),
                source,
                options: o.clone(),
                bus: b.clone(),
                store: s.clone(),
                metrics: m.clone(),
                queue: q.clone(),
            });
            ingest_children.push(ingest_spec(name, slot.clone(), make));
            (slot, queue)
        };
        let ingest_slots: HashMap<Source, _> =
            Source::ALL.into_iter().map(|s| (s, ingest_actor(s.as_str(), s))).collect();
        let connector_slots: HashMap<&'static str, _> = normalize
            .connectors
            .names()
            .into_iter()
            .filter_map(|name| Some((name, ingest_actor(name, normalize.connectors.get(name)?.channel()))))
            .collect();

        // Pipeline: directory, resolver pool, dispatcher. They share in-memory queues, so a
        // failure restarts all three and the dispatcher replays from the durable checkpoint.
        let profiles_slot: Slot<ProfilesMsg> = Slot::default();
        let resolvers_slot: Slot<IdentityFactoryMsg> = Slot::default();
        // Where resolved changes go: the directory, or in cluster mode the router to the
        // partitions' owners.
        let resolved_slot: Slot<ProfilesMsg> =
            if config.cluster.enabled { Slot::default() } else { profiles_slot.clone() };
        let shards = config.identity.shards;
        let mut pipeline_children = vec![
            {
                let (ctx, slot) = (profile_ctx.clone(), profiles_slot.clone());
                ChildSpec::new("profiles", "profile_directory", move |sup| {
                    let (ctx, slot) = (ctx.clone(), slot.clone());
                    async move {
                        let (r, _) = Actor::spawn_linked(None, ProfilesDirectory, ProfilesArgs { ctx }, sup).await?;
                        slot.set(r.clone());
                        Ok(r.get_cell())
                    }
                })
            },
            {
                let (ctx, dir, slot) = (ctx.clone(), resolved_slot.clone(), resolvers_slot.clone());
                ChildSpec::new("identity", "identity_pool", move |sup| {
                    let (ctx, dir, slot) = (ctx.clone(), dir.clone(), slot.clone());
                    async move {
                        let r = spawn_identity_pool(ctx, dir, shards, sup).await?;
                        slot.set(r.clone());
                        Ok(r.get_cell())
                    }
                })
            },
            {
                let (ctx, resolvers) = (ctx.clone(), resolvers_slot.clone());
                ChildSpec::new("dispatcher", "dispatcher", move |sup| {
                    let args = DispatcherArgs {
                        ctx: ctx.clone(),
                        resolvers: resolvers.clone(),
                        shards,
                        batch: DISPATCH_BATCH,
                        max_in_flight: MAX_IN_FLIGHT,
                    };
                    async move {
                        let (r, _) = Actor::spawn_linked(None, Dispatcher, args, sup).await?;
                        Ok(r.get_cell())
                    }
                })
            },
        ];
        // This replica's name in job runs, saga leases and the membership.
        let replica = replica_name();
        let membership = MembershipSettings {
            name: replica.clone(),
            advertise_url: config.advertise_url(),
            heartbeat: Duration::from_secs(config.cluster.heartbeat_secs),
            ttl: Duration::from_secs(config.cluster.member_ttl_secs),
            rejoin_after: Duration::from_millis(config.bus.session_timeout_ms)
                + Duration::from_secs(config.cluster.member_ttl_secs),
        };
        if config.cluster.enabled {
            let (ctx, slot) = (ctx.clone(), resolved_slot.clone());
            pipeline_children.push(ChildSpec::new("router", "profile_router", move |sup| {
                let (ctx, slot) = (ctx.clone(), slot.clone());
                async move {
                    let (r, _) = Actor::spawn_linked(None, ProfileRouter, ProfileRouterArgs { ctx }, sup).await?;
                    slot.set(r.clone());
                    Ok(r.get_cell())
                }
            }));
            let (ctx, directory, settings) = (profile_ctx.clone(), profiles_slot.clone(), membership.clone());
            pipeline_children.push(ChildSpec::new("routed", "routed_dispatcher", move |sup| {
                let args = RoutedDispatcherArgs {
                    ctx: ctx.clone(),
                    membership: settings.clone(),
                    directory: directory.clone(),
                    batch: DISPATCH_BATCH,
                    max_in_flight: MAX_IN_FLIGHT,
                };
                async move {
                    let (r, _) = Actor::spawn_linked(None, RoutedDispatcher, args, sup).await?;
                    Ok(r.get_cell())
                }
            }));
        }
        // Scheduled jobs: independent of each other and of the pipeline.
        let warehouse_slot: Slot<WarehouseMsg> = Slot::default();
        let retention_slot: Slot<RetentionMsg> = Slot::default();
        let mut job_children = Vec::new();
        {
            let (store, bus, metrics, health) = (store.clone(), bus.clone(), metrics.clone(), health.clone());
            let settings = membership.clone();
            let ownership = profile_ctx.ownership.clone();
            job_children.push(ChildSpec::new("membership", "membership", move |sup| {
                let args = MembershipArgs {
                    store: store.clone(),
                    bus: bus.clone(),
                    health: health.clone(),
                    metrics: metrics.clone(),
                    settings: settings.clone(),
                    ownership: ownership.clone(),
                };
                async move {
                    let (r, _) = Actor::spawn_linked(None, MembershipActor, args, sup).await?;
                    Ok(r.get_cell())
                }
            }));
        }
        // Cluster mode: who does timed once-only work (warehouse relays, batch segments).
        let leader = config.cluster.enabled.then(|| membership.clone());
        if let Some(warehouse) = warehouse.clone() {
            let (store, bus, metrics, slot) = (store.clone(), bus.clone(), metrics.clone(), warehouse_slot.clone());
            let erasures = erasures.clone();
            let leader = leader.clone();
            let tokenize = (config.warehouse.pii == WarehousePii::Tokenize).then(|| pii.clone());
            let relay_interval = Duration::from_millis(config.warehouse.relay_interval_ms);
            let reconcile_interval = match config.warehouse.reconcile_interval_secs {
                0 => None,
                secs => Some(Duration::from_secs(secs)),
            };
            job_children.push(ChildSpec::new("warehouse", "warehouse_sink", move |sup| {
                let args = WarehouseSinkArgs {
                    erasures: erasures.clone(),
                    tokenize: tokenize.clone(),
                    store: store.clone(),
                    bus: bus.clone(),
                    warehouse: warehouse.clone(),
                    metrics: metrics.clone(),
                    relay_interval,
                    reconcile_interval,
                    leader: leader.clone(),
                };
                let slot = slot.clone();
                async move {
                    let (r, _) = Actor::spawn_linked(None, WarehouseSink, args, sup).await?;
                    slot.set(r.clone());
                    Ok(r.get_cell())
                }
            }));
        }
        if config.identity.matching {
            let (store, index, dir, metrics) =
                (store.clone(), ctx.index.clone(), profiles_slot.clone(), metrics.clone());
            let erasures = erasures.clone();
            let slot = ctx.matcher.clone();
            let (review_threshold, auto) = (config.identity.review_threshold, config.identity.auto_merge_threshold);
            job_children.push(ChildSpec::new("identity_matcher", "identity_matcher", move |sup| {
                let args = IdentityMatcherArgs {
                    erasures: erasures.clone(),
                    store: store.clone(),
                    index: index.clone(),
                    directory: dir.clone(),
                    metrics: metrics.clone(),
                    model: MatchModel::default(),
                    review_threshold,
                    auto_merge_threshold: (auto > 0.0).then_some(auto),
                };
                let slot = slot.clone();
                async move {
                    let (r, _) = Actor::spawn_linked(None, IdentityMatcher, args, sup).await?;
                    slot.set(r.clone());
                    Ok(r.get_cell())
                }
            }));
        }
        let reverse_etl_slot: Slot<ReverseEtlMsg> = Slot::default();
        {
            let (store, metrics, slot) = (store.clone(), metrics.clone(), reverse_etl_slot.clone());
            let (settings, activations) = (config.reverse_etl.clone(), config.activations.clone());
            let (erasures, gate4) = (erasures.clone(), config.quality.gate4.clone());
            // Outlives restarts of the actor: a hold the store refused is still held afterwards.
            let unsaved = Arc::new(cohort_actors::reverse_etl::UnsavedHolds::default());
            job_children.push(ChildSpec::new("reverse_etl", "reverse_etl", move |sup| {
                let args = ReverseEtlArgs {
                    erasures: erasures.clone(),
                    store: store.clone(),
                    metrics: metrics.clone(),
                    config: settings.clone(),
                    activations: activations.clone(),
                    policy,
                    gate4: gate4.clone(),
                    unsaved: unsaved.clone(),
                };
                let slot = slot.clone();
                async move {
                    let (r, _) = Actor::spawn_linked(None, ReverseEtlActor, args, sup).await?;
                    slot.set(r.clone());
                    Ok(r.get_cell())
                }
            }));
        }
        {
            let (store, bus, metrics) = (store.clone(), bus.clone(), metrics.clone());
            let (registry, dir, retl, slot) =
                (segments.clone(), profiles_slot.clone(), reverse_etl_slot.clone(), ctx.segment_engine.clone());
            let (warehouse, configured) = (warehouse.clone(), configured_segments.clone());
            let tick = Duration::from_millis(config.segments.tick_ms);
            // Cluster mode: definitions other replicas' APIs store are picked up here too, and
            // batch segments run on one replica.
            let refresh = config.cluster.enabled.then(|| Duration::from_secs(config.segments.refresh_interval_secs));
            let leader = leader.clone();
            let erasures = erasures.clone();
            job_children.push(ChildSpec::new("segments", "segment_engine", move |sup| {
                let args = SegmentEngineArgs {
                    erasures: erasures.clone(),
                    store: store.clone(),
                    bus: bus.clone(),
                    warehouse: warehouse.clone(),
                    registry: registry.clone(),
                    directory: dir.clone(),
                    reverse_etl: retl.clone(),
                    metrics: metrics.clone(),
                    configured: configured.clone(),
                    tick,
                    refresh,
                    leader: leader.clone(),
                };
                let slot = slot.clone();
                async move {
                    let (r, _) = Actor::spawn_linked(None, SegmentEngine, args, sup).await?;
                    slot.set(r.clone());
                    Ok(r.get_cell())
                }
            }));
        }
        let stats_slot: Slot<IdentityStatsMsg> = Slot::default();
        {
            let (store, metrics, slot) = (store.clone(), metrics.clone(), stats_slot.clone());
            let every = Duration::from_secs(config.identity.stats_interval_secs);
            job_children.push(ChildSpec::new("identity_stats", "identity_stats", move |sup| {
                let args = IdentityStatsArgs { store: store.clone(), metrics: metrics.clone(), every };
                let slot = slot.clone();
                async move {
                    let (r, _) = Actor::spawn_linked(None, IdentityStatsActor, args, sup).await?;
                    slot.set(r.clone());
                    Ok(r.get_cell())
                }
            }));
        }
        {
            let (store, bus, metrics, slot) = (store.clone(), bus.clone(), metrics.clone(), retention_slot.clone());
            let checkpoints = ctx.checkpoints.clone();
            let keep = cohort_actors::retention::idempotency_keep(config.retention.idempotency_hours);
            let every = Duration::from_secs(config.retention.interval_secs);
            job_children.push(ChildSpec::new("retention", "retention", move |sup| {
                let args = RetentionArgs {
                    store: store.clone(),
                    bus: bus.clone(),
                    checkpoints: checkpoints.clone(),
                    metrics: metrics.clone(),
                    keep,
                    every,
                };
                let slot = slot.clone();
                async move {
                    let (r, _) = Actor::spawn_linked(None, RetentionActor, args, sup).await?;
                    slot.set(r.clone());
                    Ok(r.get_cell())
                }
            }));
        }
        let jobs_slot: Slot<JobsMsg> = Slot::default();
        {
            let mut specs = Vec::new();
            let bad = |key: &str, e: String| anyhow!("invalid configuration: `jobs.{key}`: {e}");
            if let (false, Some(w)) = (config.jobs.gold_reconcile.trim().is_empty(), &warehouse) {
                let sink = warehouse_slot.clone();
                let checks = cohort_actors::quality::QualityChecks {
                    store: store.clone(),
                    warehouse: w.clone(),
                    metrics: metrics.clone(),
                    config: config.quality.clone(),
                };
                let run: JobFn = Arc::new(move || {
                    let (sink, checks) = (sink.clone(), checks.clone());
                    Box::pin(async move { gold_with_gates(&sink, &checks).await })
                });
                specs.push(
                    JobSpec::new("gold_reconcile", &config.jobs.gold_reconcile, run)
                        .map_err(|e| bad("gold_reconcile", e))?,
                );
            }
            if !config.jobs.batch_segments.trim().is_empty() {
                let (engine, registry) = (ctx.segment_engine.clone(), segments.clone());
                let run: JobFn = Arc::new(move || {
                    let (engine, registry) = (engine.clone(), registry.clone());
                    Box::pin(async move {
                        let mut runs = serde_json::Map::new();
                        for (name, segment) in registry.snapshot().iter() {
                            if segment.definition.kind != SegmentKind::Batch {
                                continue;
                            }
                            let name = name.clone();
                            let run = ask(
                                &engine,
                                "segment engine",
                                |r| SegmentMsg::RunBatch { name: name.clone(), reply: Some(r) },
                                3600,
                            )
                            .await
                            .map_err(|e| format!("{name}: {e}"))?;
                            runs.insert(name, serde_json::to_value(run).map_err(|e| e.to_string())?);
                        }
                        Ok(serde_json::Value::Object(runs))
                    })
                });
                specs.push(
                    JobSpec::new("batch_segments", &config.jobs.batch_segments, run)
                        .map_err(|e| bad("batch_segments", e))?,
                );
            }
            if !config.jobs.features.trim().is_empty() {
                let (store, erasures) = (store.clone(), erasures.clone());
                let run: JobFn = Arc::new(move || {
                    let (store, erasures) = (store.clone(), erasures.clone());
                    Box::pin(async move {
                        cohort_actors::features::compute_all(store.as_ref(), &erasures, chrono::Utc::now())
                            .await
                            .map_err(|e| e.to_string())
                    })
                });
                specs.push(JobSpec::new("features", &config.jobs.features, run).map_err(|e| bad("features", e))?);
            }
            let (store, metrics, slot) = (store.clone(), metrics.clone(), jobs_slot.clone());
            let owner = replica.clone();
            job_children.push(ChildSpec::new("scheduler", "job_scheduler", move |sup| {
                let jobs = specs.clone();
                let args =
                    JobSchedulerArgs { store: store.clone(), metrics: metrics.clone(), owner: owner.clone(), jobs };
                let slot = slot.clone();
                async move {
                    let (r, _) = Actor::spawn_linked(None, JobScheduler, args, sup).await?;
                    slot.set(r.clone());
                    Ok(r.get_cell())
                }
            }));
        }
        let gdpr_slot: Slot<GdprMsg> = Slot::default();
        {
            let (store, bus, warehouse, metrics) = (store.clone(), bus.clone(), warehouse.clone(), metrics.clone());
            let (dir, index, erasures, envelope) =
                (profiles_slot.clone(), ctx.index.clone(), erasures.clone(), envelope.clone());
            let sink = warehouse_slot.clone();
            let destinations = ErasureDestinations::new(&config.reverse_etl).map_err(|e| anyhow!(e))?;
            let g = &config.gdpr;
            let settings = GdprSettings {
                retry_initial: Duration::from_millis(g.retry_initial_ms),
                retry_max: Duration::from_millis(g.retry_max_ms),
                step_timeout: Duration::from_secs(g.step_timeout_secs),
                refresh_interval: Duration::from_secs(g.refresh_interval_secs),
                lease: Duration::from_secs(g.lease_secs),
                member_ttl: Duration::from_secs(config.cluster.member_ttl_secs),
            };
            let slot = gdpr_slot.clone();
            let owner = replica.clone();
            let cluster = config.cluster.enabled;
            job_children.push(ChildSpec::new("gdpr", "gdpr_coordinator", move |sup| {
                let args = GdprArgs {
                    store: store.clone(),
                    bus: bus.clone(),
                    warehouse: warehouse.clone(),
                    directory: dir.clone(),
                    warehouse_sink: sink.clone(),
                    index: index.clone(),
                    erasures: erasures.clone(),
                    envelope: envelope.clone(),
                    destinations: destinations.clone(),
                    metrics: metrics.clone(),
                    settings: settings.clone(),
                    owner: owner.clone(),
                    routed: cluster,
                };
                let slot = slot.clone();
                async move {
                    let (r, _) = Actor::spawn_linked(None, GdprCoordinator, args, sup).await?;
                    slot.set(r.clone());
                    Ok(r.get_cell())
                }
            }));
        }
        let sub = |path: &str, strategy, children| SupervisorArgs {
            path: format!("root/{path}"),
            strategy,
            policy,
            children,
            health: health.clone(),
            metrics: metrics.clone(),
        };
        let root_args = SupervisorArgs {
            path: "root".into(),
            strategy: Strategy::OneForOne,
            policy,
            children: vec![
                supervisor_spec("ingest", sub("ingest", Strategy::OneForOne, ingest_children)),
                supervisor_spec("pipeline", sub("pipeline", Strategy::OneForAll, pipeline_children)),
                supervisor_spec("jobs", sub("jobs", Strategy::OneForOne, job_children)),
            ],
            health: health.clone(),
            metrics: metrics.clone(),
        };
        let (root, root_handle) = Actor::spawn(None, SupervisorActor, root_args)
            .await
            .map_err(|e| anyhow!("starting the supervision tree: {e}"))?;
        let credentials = Arc::new(
            cohort_api::auth::Credentials::new(&config.auth, &config.sources.crm.token)
                .map_err(|e| anyhow!("invalid configuration: {e}"))?,
        );
        let token_watch = tokio::spawn(credentials.clone().watch());
        let api = ApiState::new(ApiShared {
            config: config.clone(),
            credentials,
            ingest: Arc::new(ingest_slots),
            connector_ingest: Arc::new(connector_slots),
            profiles: profiles_slot,
            identity_stats: stats_slot,
            matcher: ctx.matcher.clone(),
            segments: segments.clone(),
            segment_engine: ctx.segment_engine.clone(),
            reverse_etl: reverse_etl_slot.clone(),
            gdpr: gdpr_slot,
            jobs: jobs_slot,
            erasures,
            index: ctx.index.clone(),
            store: store.clone(),
            bus: bus.clone(),
            warehouse: warehouse.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
            normalize,
            sendgrid_key,
            ready: Arc::new(AtomicBool::new(true)),
            call_timeout: Duration::from_secs(10),
            membership,
            ownership: profile_ctx.ownership.clone(),
            owners: Arc::default(),
            http: reqwest::Client::builder()
                // Each forwarded request sets its own timeout (reads and writes differ).
                .connect_timeout(Duration::from_millis(500))
                .build()
                .context("building the HTTP client for peers")?,
        });
        Ok(Cohort {
            config,
            api,
            ctx,
            pii,
            health,
            warehouse: warehouse_slot,
            retention: retention_slot,
            reverse_etl: reverse_etl_slot,
            root,
            root_handle: Some(root_handle),
            token_watch,
        })
    }

    /// The HTTP router of this instance.
    pub fn router(&self) -> axum::Router {
        cohort_api::router(self.api.clone())
    }

    /// Waits until every event this process published is reflected in persisted profiles.
    pub async fn settle(&self, timeout: Duration) -> anyhow::Result<StreamPositions> {
        self.settle_to(self.ctx.bus.published(), timeout).await
    }

    async fn settle_to(&self, target: StreamPositions, timeout: Duration) -> anyhow::Result<StreamPositions> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut failed = None;
        let mut pause = Duration::from_millis(5);
        loop {
            if self.ctx.watermark.covers(&target) && self.ctx.watermark.in_flight() == 0 {
                // A failed flush (the store away, a profile restarting) is tried again, less
                // and less often.
                failed = self.flush().await.err();
                pause =
                    if failed.is_some() { (pause * 4).min(Duration::from_secs(1)) } else { Duration::from_millis(5) };
                let durable = self.ctx.checkpoints.get();
                let done = target.iter().all(|(s, off)| *off == 0 || durable.iter().any(|(ds, d)| ds == s && d >= off));
                if done && failed.is_none() {
                    return Ok(durable);
                }
            }
            if tokio::time::Instant::now() > deadline {
                let last = failed.map_or_else(String::new, |e| format!("; last flush: {e}"));
                return Err(anyhow!(
                    "pipeline did not settle: published {:?}, delivered up to {:?}, in flight {}{last}",
                    target,
                    self.ctx.watermark.lows(),
                    self.ctx.watermark.in_flight()
                ));
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// Runs a write-behind cycle now.
    pub async fn flush(&self) -> anyhow::Result<FlushReport> {
        let dir = self.api.profiles.get().ok_or_else(|| anyhow!("profile directory is not running"))?;
        match dir.call(|r| ProfilesMsg::Flush { reply: Some(r) }, Some(Duration::from_secs(30))).await {
            Ok(CallResult::Success(Ok(report))) => Ok(report),
            Ok(CallResult::Success(Err(e))) => Err(anyhow!("flush failed: {e}")),
            _ => Err(anyhow!("profile directory did not answer")),
        }
    }

    /// Runs a batch segment now and waits for the difference to be applied.
    pub async fn run_batch_segment(&self, name: &str) -> anyhow::Result<BatchRun> {
        let name = name.to_string();
        ask(&self.ctx.segment_engine, "segment engine", |r| SegmentMsg::RunBatch { name, reply: Some(r) }, 300).await
    }

    /// Relays the warehouse outbox now; `None` when no warehouse is configured.
    pub async fn relay_warehouse(&self) -> anyhow::Result<Option<RelayReport>> {
        if self.ctx.warehouse.is_none() {
            return Ok(None);
        }
        let report = ask(&self.warehouse, "warehouse sink", |r| WarehouseMsg::Relay { reply: Some(r) }, 300).await?;
        Ok(Some(report))
    }

    /// Reconciles Gold with the operational store now.
    pub async fn reconcile(&self) -> anyhow::Result<ReconcileReport> {
        if self.ctx.warehouse.is_none() {
            return Err(anyhow!("no warehouse is configured (warehouse.url)"));
        }
        ask(&self.warehouse, "warehouse sink", |r| WarehouseMsg::Reconcile { reply: Some(r) }, 600).await
    }

    /// Runs a retention pass now; returns the idempotency keys removed.
    pub async fn expire(&self) -> anyhow::Result<u64> {
        ask(&self.retention, "retention job", |r| RetentionMsg::Expire { reply: Some(r) }, 300).await
    }

    pub async fn profile_stats(&self) -> anyhow::Result<ProfilesStats> {
        let dir = self.api.profiles.get().ok_or_else(|| anyhow!("profile directory is not running"))?;
        match dir.call(ProfilesMsg::GetStats, Some(Duration::from_secs(5))).await {
            Ok(CallResult::Success(s)) => Ok(s),
            _ => Err(anyhow!("profile directory did not answer")),
        }
    }

    /// Stops accepting work, lets the pipeline catch up, persists, and stops the tree.
    pub async fn shutdown(mut self, grace: Duration) -> anyhow::Result<()> {
        self.api.ready.store(false, Ordering::SeqCst);
        // Only this replica's partitions: in a group, the others drain what it published to theirs.
        let settled = self.settle_to(self.ctx.bus.consumed_here(self.ctx.bus.published()), grace).await;
        if let Err(e) = &settled {
            tracing::warn!(error = %e, "shutting down before the pipeline settled; the journal replays on next start");
        }
        // Best effort: what is not relayed now stays in the outbox for the next start.
        match tokio::time::timeout(grace, self.relay_warehouse()).await {
            Ok(Err(e)) => tracing::warn!(error = %e, "warehouse outbox not relayed at shutdown; it is kept"),
            Err(_) => tracing::warn!("warehouse relay did not finish within the grace period; the outbox is kept"),
            Ok(Ok(_)) => {}
        }
        if let Some(warehouse) = &self.ctx.warehouse {
            warehouse.release().await;
        }
        self.root.stop(Some("shutdown".into()));
        if let Some(h) = self.root_handle.take() {
            let _ = h.await;
        }
        Ok(())
    }

    /// Completes when the root supervisor stops (an escalation reached the top).
    pub async fn wait_root(&mut self) {
        if let Some(h) = self.root_handle.as_mut() {
            let _ = h.await;
            self.root_handle = None;
        }
    }
}
