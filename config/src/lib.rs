//! Typed configuration: built-in defaults, then a TOML file, then `COHORT__SECTION__KEY`
//! environment variables. Unknown keys and invalid values fail at start, naming the key.

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::Path;

/// The embedded defaults, also shown by `cohort config defaults`.
pub const DEFAULTS_TOML: &str = include_str!("default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub bus: BusConfig,
    pub auth: AuthConfig,
    pub sources: SourcesConfig,
    pub identity: IdentityConfig,
    pub profiles: ProfilesConfig,
    pub supervision: SupervisionConfig,
    pub telemetry: TelemetryConfig,
    pub warehouse: WarehouseConfig,
    pub retention: RetentionConfig,
    pub gdpr: GdprConfig,
    pub cluster: ClusterConfig,
    pub jobs: JobsConfig,
    pub quality: QualityConfig,
    pub segments: SegmentsConfig,
    /// Scorers for model-driven segments: `[models.NAME]` with `bias` and `[models.NAME.weights]`.
    #[serde(default)]
    pub models: std::collections::BTreeMap<String, ModelConfig>,
    pub reverse_etl: ReverseEtlConfig,
    /// What to do when a profile enters or leaves a segment: `[[activations]]`.
    #[serde(default)]
    pub activations: Vec<ActivationConfig>,
    /// Passed to the normalizers, which validate it at start (`normalize.*` keys).
    #[serde(default)]
    pub normalize: serde_json::Map<String, serde_json::Value>,
}

/// How a replica takes part in the cluster (membership heartbeats in the shared store).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Several replicas sharing Kafka and MongoDB: profiles are owned per partition of
    /// `cdp.processed.events` (see ARCHITECTURE.md, "Cluster mode").
    pub enabled: bool,
    /// Where peers reach this replica's API; empty: `http://` + `server.listen` (an unspecified
    /// host becomes `HOSTNAME`).
    pub advertise_url: String,
    pub heartbeat_secs: u64,
    pub member_ttl_secs: u64,
}

impl Config {
    /// This replica's API address as peers should use it.
    pub fn advertise_url(&self) -> String {
        if !self.cluster.advertise_url.is_empty() {
            return self.cluster.advertise_url.trim_end_matches('/').to_string();
        }
        let listen = self.server.listen;
        if !listen.ip().is_unspecified() {
            return format!("http://{listen}");
        }
        let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "127.0.0.1".into());
        format!("http://{host}:{}", listen.port())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentsConfig {
    /// How often due window re-evaluations are fired.
    pub tick_ms: u64,
    /// Cluster mode: how often each replica reads the stored definitions again, so a segment
    /// defined, changed or deleted through another replica's API is evaluated here too.
    pub refresh_interval_secs: u64,
    /// Segments defined in the file: `[[segments.define]]` with `name`, `rule` (or `kind`, `sql`,
    /// `every_secs`, `model`, `threshold`).
    #[serde(default)]
    pub define: Vec<cohort_messages::segment::SegmentDefinition>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    #[serde(default)]
    pub bias: f64,
    #[serde(default)]
    pub weights: std::collections::BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReverseEtlConfig {
    /// Attempts per request (the first included) before a job is recorded as failed.
    pub max_attempts: u32,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    pub timeout_ms: u64,
    pub salesforce: DestinationConfig,
    pub sendgrid: DestinationConfig,
    pub twilio: DestinationConfig,
    pub push: DestinationConfig,
}

/// One destination's endpoint, credentials and limits. An empty `url` leaves it off.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    #[serde(default)]
    pub url: String,
    /// Salesforce and FCM: the OAuth bearer token; SendGrid: the API key.
    #[serde(default)]
    pub token: String,
    /// Salesforce REST API version (`v60.0`).
    #[serde(default)]
    pub api_version: String,
    /// Twilio: the account SID and auth token; the WhatsApp sender (`whatsapp:+...`).
    #[serde(default)]
    pub account_sid: String,
    #[serde(default)]
    pub auth_token: String,
    #[serde(default)]
    pub from: String,
    /// FCM: the Firebase project.
    #[serde(default)]
    pub project: String,
    pub requests_per_second: u32,
    /// Requests per UTC day (Salesforce's API quota); 0: none.
    #[serde(default)]
    pub daily_limit: u64,
    /// Requests in flight at once: the size of the destination's bulkhead.
    pub max_in_flight: usize,
}

/// An activation: on entering (or leaving) `segment`, do `action` at `destination`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivationConfig {
    pub name: String,
    pub segment: String,
    /// `enter` (default) or `exit`.
    #[serde(default = "default_on")]
    pub on: String,
    /// `salesforce`, `sendgrid`, `twilio` or `push`.
    pub destination: String,
    /// salesforce: `create_task`, `update_contact`; sendgrid: `add_to_list`, `remove_from_list`;
    /// twilio: `send_template`; push: `send_push`.
    pub action: String,
    #[serde(default)]
    pub list_id: String,
    /// Twilio: the approved template (`HX...`).
    #[serde(default)]
    pub template_sid: String,
    /// Destination field → template (`{{traits.first_name}}`, `{{computed.engagement_score}}`,
    /// `{{segment}}`, `{{entered_at}}`, or text).
    #[serde(default)]
    pub fields: std::collections::BTreeMap<String, String>,
    /// Fields that may carry personal data (Gate 4 blocks personal data anywhere else).
    #[serde(default)]
    pub pii_fields: Vec<String>,
}

fn default_on() -> String {
    "enter".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub max_import_body_bytes: usize,
    pub request_timeout_ms: u64,
    pub ingest_requests_per_second: u32,
    pub api_requests_per_second: u32,
    pub max_in_flight: usize,
    /// Open client connections at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// A client must send a request's whole header within this (slowloris).
    pub header_read_timeout_ms: u64,
    /// Largest request header block; more gets 431.
    pub max_header_bytes: usize,
    /// Most header fields in one request.
    pub max_headers: usize,
    /// Linux: whether this process may use transparent huge pages (off: they stall first touches).
    pub transparent_huge_pages: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub url: String,
    pub database: String,
    /// Page cache of each embedded store file (the store and its journal), in MiB.
    pub cache_mb: u64,
}

impl StorageConfig {
    /// `cache_mb` in bytes.
    pub fn cache_bytes(&self) -> usize {
        usize::try_from(self.cache_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusConfig {
    pub url: String,
    pub group_id: String,
    pub topic_prefix: String,
    pub partitions: i32,
    pub replication_factor: i32,
    pub produce_timeout_ms: u64,
    pub session_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Plain tokens with every scope: for development and single-operator setups.
    pub api_tokens: Vec<String>,
    /// Scoped tokens, each kept only as the SHA-256 digest of its secret.
    pub tokens: Vec<TokenConfig>,
    /// A TOML file of `[[tokens]]` (a mounted Secret), read again when it changes, so tokens
    /// rotate without a restart. Empty: none.
    pub tokens_file: String,
    /// How often the tokens file is checked for changes.
    pub reload_interval_secs: u64,
}

/// Every scope a token can hold; `*` holds them all.
pub const SCOPES: &[&str] = &[
    "*",
    "ingest:web",
    "ingest:mobile",
    "ingest:crm",
    "ingest:email",
    "ingest:whatsapp",
    "profiles:read",
    "segments:admin",
    "gdpr:admin",
    "identity:review",
    "ops:read",
    "ops:admin",
    "metrics:read",
];

/// A scope of [`SCOPES`], or `ingest:<connector>` for a connector's webhook.
pub fn known_scope(s: &str) -> bool {
    SCOPES.contains(&s)
        || s.strip_prefix("ingest:").is_some_and(|n| {
            !n.is_empty() && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
}

/// One scoped API token.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it; shown in logs and audit records instead of the secret.
    pub name: String,
    /// Hex SHA-256 digest of the token (`cohort token new` prints one).
    pub sha256: String,
    pub scopes: Vec<String>,
    /// A revoked token is refused; keeping the entry records that it existed.
    #[serde(default)]
    pub revoked: bool,
}

impl TokenConfig {
    fn check(&self, key: &str) -> Result<(), ConfigError> {
        if self.name.trim().is_empty() {
            return Err(bad(key, "every token needs a name"));
        }
        let digest = self.sha256.trim();
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(key, &format!("token `{}`: sha256 must be 64 hex digits", self.name)));
        }
        if self.scopes.is_empty() {
            return Err(bad(key, &format!("token `{}` has no scopes", self.name)));
        }
        if let Some(s) = self.scopes.iter().find(|s| !known_scope(s)) {
            return Err(bad(
                key,
                &format!("token `{}`: unknown scope `{s}` (known: {})", self.name, SCOPES.join(", ")),
            ));
        }
        Ok(())
    }
}

fn bad(key: &str, problem: &str) -> ConfigError {
    ConfigError::Invalid { key: key.into(), problem: problem.into() }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    tokens: Vec<TokenConfig>,
}

/// Reads and checks a tokens file: `[[tokens]]` tables with `name`, `sha256`, `scopes`, `revoked`.
pub fn parse_tokens_file(text: &str) -> Result<Vec<TokenConfig>, ConfigError> {
    let file: TokensFile =
        Figment::from(Toml::string(text)).extract().map_err(|e| ConfigError::Parse(render_figment_error(e)))?;
    for t in &file.tokens {
        t.check("auth.tokens_file")?;
    }
    Ok(file.tokens)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcesConfig {
    pub web: WriteKeySource,
    pub mobile: WriteKeySource,
    pub crm: CrmSource,
    pub email: EmailSource,
    pub whatsapp: WhatsappSource,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteKeySource {
    pub write_key: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrmSource {
    pub token: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailSource {
    pub sendgrid_public_key: String,
    /// Accept unsigned, unauthenticated SendGrid events (only for a private network).
    pub allow_unsigned: bool,
    pub signature_max_age_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhatsappSource {
    pub auth_token: String,
    pub public_url: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    pub shards: usize,
    pub blocked: Vec<String>,
    pub block_placeholder_phones: bool,
    pub stats_interval_secs: u64,
    /// Identifier kind → most distinct values of it one profile may hold.
    pub max_values_per_profile: std::collections::BTreeMap<String, usize>,
    /// Identifier kind → most profiles one identifier may link before it stops linking.
    pub max_profiles_per_identifier: std::collections::BTreeMap<String, usize>,
    /// Events after a merge during which it can be undone exactly.
    pub unmerge_window: usize,
    /// Probabilistic matches scoring at least this go to the review queue.
    pub review_threshold: f64,
    /// Probabilistic matches scoring at least this merge without review; 0 turns it off.
    pub auto_merge_threshold: f64,
    /// Whether the live matcher looks for probabilistic duplicates at all.
    pub matching: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfilesConfig {
    pub history_limit: usize,
    pub passivate_after_secs: u64,
    pub flush_interval_ms: u64,
    /// A profile snapshotted less than this ago waits for a later timed flush (0: never waits).
    pub snapshot_min_interval_ms: u64,
    pub max_event_attempts: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisionConfig {
    pub max_restarts: u32,
    pub window_secs: u64,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarehouseConfig {
    pub url: String,
    pub pii: WarehousePii,
    pub relay_interval_ms: u64,
    pub reconcile_interval_secs: u64,
    pub duckdb_hold_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    pub idempotency_hours: u64,
    pub interval_secs: u64,
}

/// Cron schedules of the scheduled jobs (validated when the scheduler starts).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    pub gold_reconcile: String,
    pub batch_segments: String,
    pub features: String,
}

/// Quality gates 1–4 (slide 12) as declarative expectations.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QualityConfig {
    pub gate1: Gate1Config,
    pub gate2: Gate2Config,
    pub gate3: Gate3Config,
    pub gate4: Gate4Config,
}

/// Gate 1, at ingest: events failing it become dead letters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gate1Config {
    /// An event timestamped further than this after its receipt is refused (clock skew).
    pub max_future_secs: u64,
    /// An event older than this is refused.
    pub max_age_days: u64,
    /// The run summary fails when dead letters exceed this share of what arrived in its window.
    pub max_dead_letter_ratio: f64,
}

/// Gate 2, Bronze → Silver: checked on the Silver rows received since the last run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gate2Config {
    /// Columns that must be present and non-empty.
    pub required: Vec<String>,
    /// Column → JSON type (`object`, `array`, `string`, `timestamp`).
    pub types: std::collections::BTreeMap<String, String>,
    /// Column sets that must be unique.
    pub unique: Vec<Vec<String>>,
    /// Every row's profile exists in the operational store, and its Bronze row in Bronze.
    pub referential_integrity: bool,
    /// `occurred_at` may be at most this far after `received_at`.
    pub max_future_secs: u64,
    /// How far back the first run looks.
    pub window_hours: u64,
}

/// Gate 3, Silver → Gold: checked on the latest Gold snapshots.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gate3Config {
    /// Traits that make a complete student record.
    pub completeness_traits: Vec<String>,
    /// Mean share of those traits present, over profiles with at least one of them.
    pub min_completeness: f64,
    /// Every merged profile's identity confidence: 1 for shared identifiers and reviewed
    /// matches, the model's score for automatic ones.
    pub min_identity_confidence: f64,
    /// Gold snapshots of profiles the store does not know.
    pub max_orphans: u64,
}

/// Gate 4, before reverse ETL.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gate4Config {
    /// A batch sync whose size moved more than this share from the last one is held.
    pub row_count_tolerance: f64,
    /// Below this previous size the tolerance is not applied (small numbers swing).
    pub min_baseline_rows: u64,
}

/// How personal data reaches the warehouse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WarehousePii {
    Tokenize,
    Raw,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GdprConfig {
    pub key_url: String,
    pub encrypt_at_rest: bool,
    pub kms_endpoint: String,
    pub kms_token: String,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    pub step_timeout_secs: u64,
    pub refresh_interval_secs: u64,
    pub lease_secs: u64,
}

impl std::fmt::Debug for GdprConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GdprConfig")
            .field("key_url", &self.key_url)
            .field("kms_endpoint", &self.kms_endpoint)
            .field("kms_token", &if self.kms_token.is_empty() { "" } else { "***" })
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    pub log_filter: String,
    pub otlp_endpoint: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

/// A configuration problem, naming the offending key.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Parse(String),
    #[error("invalid configuration: `{key}` {problem}")]
    Invalid { key: String, problem: String },
}

impl Config {
    /// Defaults, then `file` if given, then the environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::check_file(file)?;
        Self::check_env(std::env::vars())?;
        Self::from_figment(Self::figment(file, true))
    }

    /// Refuses variables that cannot say what they mean: names are lower-cased on the way in, so
    /// a Salesforce field (`HasOptedOutOfEmail`) set through one would silently match nothing.
    fn check_env(vars: impl Iterator<Item = (String, String)>) -> Result<(), ConfigError> {
        for (name, _) in vars {
            let Some(key) = name.strip_prefix("COHORT__") else { continue };
            if key.to_ascii_uppercase().starts_with("NORMALIZE__SALESFORCE_FIELDS") {
                return Err(bad(
                    "normalize.salesforce_fields",
                    &format!("cannot be set from the environment ({name}): Salesforce field names are case-sensitive; set it in the configuration file"),
                ));
            }
        }
        Ok(())
    }

    /// Defaults and `file` only: what `cohort config check FILE` validates.
    pub fn load_file_only(file: &Path) -> Result<Config, ConfigError> {
        Self::check_file(Some(file))?;
        Self::from_figment(Self::figment(Some(file), false))
    }

    /// Defaults overridden by a TOML string (tests and the demo).
    pub fn from_toml_str(overrides: &str) -> Result<Config, ConfigError> {
        Self::from_toml_layers(&[overrides])
    }

    /// Defaults overridden by TOML strings, later ones winning.
    pub fn from_toml_layers(layers: &[&str]) -> Result<Config, ConfigError> {
        let fig = layers.iter().fold(Figment::from(Toml::string(DEFAULTS_TOML)), |f, l| f.merge(Toml::string(l)));
        Self::from_figment(fig)
    }

    fn figment(file: Option<&Path>, env: bool) -> Figment {
        let mut fig = Figment::from(Toml::string(DEFAULTS_TOML));
        if let Some(path) = file {
            fig = fig.merge(Toml::file_exact(path));
        }
        if env {
            fig = fig.merge(Env::prefixed("COHORT__").split("__").lowercase(true));
        }
        fig
    }

    fn check_file(file: Option<&Path>) -> Result<(), ConfigError> {
        match file {
            Some(path) if !path.is_file() => {
                Err(ConfigError::Parse(format!("config file {} does not exist or is not a file", path.display())))
            }
            _ => Ok(()),
        }
    }

    fn from_figment(fig: Figment) -> Result<Config, ConfigError> {
        let cfg: Config = fig.extract().map_err(|e| ConfigError::Parse(render_figment_error(e)))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks value ranges serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=65_536).contains(&self.storage.cache_mb) {
            return Err(bad("storage.cache_mb", "must be between 1 and 65536"));
        }
        if self.server.max_body_bytes < 1024 {
            return Err(bad("server.max_body_bytes", "must be at least 1024"));
        }
        if self.server.request_timeout_ms == 0 {
            return Err(bad("server.request_timeout_ms", "must be positive"));
        }
        if self.server.max_in_flight == 0 {
            return Err(bad("server.max_in_flight", "must be positive"));
        }
        if self.gdpr.retry_initial_ms == 0 || self.gdpr.retry_max_ms < self.gdpr.retry_initial_ms {
            return Err(bad("gdpr.retry_max_ms", "must be at least gdpr.retry_initial_ms, which must be positive"));
        }
        if self.gdpr.step_timeout_secs == 0 {
            return Err(bad("gdpr.step_timeout_secs", "must be positive"));
        }
        if self.gdpr.refresh_interval_secs == 0 {
            return Err(bad("gdpr.refresh_interval_secs", "must be positive"));
        }
        if self.cluster.heartbeat_secs == 0 {
            return Err(bad("cluster.heartbeat_secs", "must be positive"));
        }
        if self.cluster.member_ttl_secs < self.cluster.heartbeat_secs.saturating_mul(2) {
            // One late heartbeat must not make a live replica look dead.
            return Err(bad("cluster.member_ttl_secs", "must be at least twice cluster.heartbeat_secs"));
        }
        let advertise = &self.cluster.advertise_url;
        let http = advertise.starts_with("http://") || advertise.starts_with("https://");
        if !advertise.is_empty() && !http {
            return Err(bad("cluster.advertise_url", "must be an http:// or https:// URL, or empty"));
        }
        if self.gdpr.lease_secs <= self.gdpr.step_timeout_secs {
            // Otherwise a second replica could start a step its owner is still running.
            return Err(bad("gdpr.lease_secs", "must be longer than gdpr.step_timeout_secs"));
        }
        let store_url = self.storage.url.as_str();
        let embedded_store = store_url.starts_with("embedded://") || store_url == "memory://";
        let mongo_store = store_url.starts_with("mongodb://") || store_url.starts_with("mongodb+srv://");
        if self.cluster.enabled && !(self.bus.url.starts_with("kafka://") && mongo_store) {
            return Err(bad("cluster.enabled", "cluster mode needs bus.url = kafka://… and storage.url = mongodb://…"));
        }
        if !embedded_store && !mongo_store {
            return Err(bad("storage.url", "must be embedded://PATH, memory:// or mongodb://HOST:PORT"));
        }
        let bus_url = self.bus.url.as_str();
        if bus_url == "embedded" && !embedded_store {
            return Err(bad("bus.url", "\"embedded\" keeps the journal in the embedded store; with MongoDB use embedded://PATH or kafka://HOST:PORT"));
        }
        if bus_url != "embedded" && !bus_url.starts_with("embedded://") && !bus_url.starts_with("kafka://") {
            return Err(bad("bus.url", "must be \"embedded\", embedded://PATH or kafka://HOST:PORT[,HOST:PORT]"));
        }
        if !(1..=1024).contains(&self.bus.partitions) {
            return Err(bad("bus.partitions", "must be between 1 and 1024"));
        }
        if self.bus.replication_factor < 1 {
            return Err(bad("bus.replication_factor", "must be at least 1"));
        }
        if self.bus.produce_timeout_ms == 0 {
            return Err(bad("bus.produce_timeout_ms", "must be positive"));
        }
        // Kafka brokers refuse session timeouts outside group.{min,max}.session.timeout.ms
        // (6 s and 30 min by default): the consumer would never join.
        if !(6_000..=1_800_000).contains(&self.bus.session_timeout_ms) {
            return Err(bad(
                "bus.session_timeout_ms",
                "must be between 6000 and 1800000 (the brokers' default limits)",
            ));
        }
        if self.auth.api_tokens.iter().any(|t| t.trim().len() < 8) {
            return Err(bad("auth.api_tokens", "every token must have at least 8 characters"));
        }
        if self.server.max_connections == 0 {
            return Err(bad("server.max_connections", "must be positive"));
        }
        if self.server.header_read_timeout_ms == 0 {
            return Err(bad("server.header_read_timeout_ms", "must be positive"));
        }
        if !(8192..=1 << 20).contains(&self.server.max_header_bytes) {
            return Err(bad("server.max_header_bytes", "must be between 8192 and 1048576"));
        }
        if self.server.max_headers == 0 {
            return Err(bad("server.max_headers", "must be positive"));
        }
        let q = &self.quality;
        for (key, v) in [
            ("quality.gate1.max_dead_letter_ratio", q.gate1.max_dead_letter_ratio),
            ("quality.gate3.min_completeness", q.gate3.min_completeness),
            ("quality.gate3.min_identity_confidence", q.gate3.min_identity_confidence),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(bad(key, "must be between 0 and 1"));
            }
        }
        if q.gate4.row_count_tolerance.is_nan() || q.gate4.row_count_tolerance <= 0.0 {
            return Err(bad("quality.gate4.row_count_tolerance", "must be positive"));
        }
        // Years are plenty; a larger value overflowed the window's start time (a panic in the job).
        if !(1..=87_600).contains(&q.gate2.window_hours) {
            return Err(bad("quality.gate2.window_hours", "must be between 1 and 87600 (ten years)"));
        }
        for (col, ty) in &q.gate2.types {
            if !["object", "array", "string", "timestamp"].contains(&ty.as_str()) {
                return Err(bad(
                    "quality.gate2.types",
                    &format!("`{col}`: unknown type `{ty}` (object, array, string, timestamp)"),
                ));
            }
        }
        for t in &self.auth.tokens {
            t.check("auth.tokens")?;
        }
        if self.auth.reload_interval_secs == 0 {
            return Err(bad("auth.reload_interval_secs", "must be positive"));
        }
        for (key, value) in [
            ("sources.web.write_key", &self.sources.web.write_key),
            ("sources.mobile.write_key", &self.sources.mobile.write_key),
            ("sources.crm.token", &self.sources.crm.token),
            ("sources.whatsapp.auth_token", &self.sources.whatsapp.auth_token),
        ] {
            if value.trim().is_empty() {
                return Err(bad(key, "must not be empty"));
            }
        }
        if self.sources.web.write_key == self.sources.mobile.write_key {
            return Err(bad("sources.mobile.write_key", "must differ from sources.web.write_key"));
        }
        if self.segments.tick_ms == 0 {
            return Err(bad("segments.tick_ms", "must be positive"));
        }
        if self.segments.refresh_interval_secs == 0 {
            return Err(bad("segments.refresh_interval_secs", "must be positive"));
        }
        if self.reverse_etl.max_attempts == 0 {
            return Err(bad("reverse_etl.max_attempts", "must be at least 1"));
        }
        for (name, d) in [
            ("salesforce", &self.reverse_etl.salesforce),
            ("sendgrid", &self.reverse_etl.sendgrid),
            ("twilio", &self.reverse_etl.twilio),
            ("push", &self.reverse_etl.push),
        ] {
            if d.requests_per_second == 0 {
                return Err(bad(&format!("reverse_etl.{name}.requests_per_second"), "must be positive"));
            }
            if d.max_in_flight == 0 {
                return Err(bad(&format!("reverse_etl.{name}.max_in_flight"), "must be positive"));
            }
        }
        for (i, a) in self.activations.iter().enumerate() {
            let key = |field: &str| format!("activations[{i}].{field}");
            let actions: &[&str] = match a.destination.as_str() {
                "salesforce" => &["create_task", "update_contact"],
                "sendgrid" => &["add_to_list", "remove_from_list"],
                "twilio" => &["send_template"],
                "push" => &["send_push"],
                _ => return Err(bad(&key("destination"), "must be salesforce, sendgrid, twilio or push")),
            };
            if !actions.contains(&a.action.as_str()) {
                return Err(bad(
                    &key("action"),
                    &format!("must be one of {} for {}", actions.join(", "), a.destination),
                ));
            }
            if !["enter", "exit"].contains(&a.on.as_str()) {
                return Err(bad(&key("on"), "must be enter or exit"));
            }
            if a.name.trim().is_empty() || self.activations[..i].iter().any(|o| o.name == a.name) {
                return Err(bad(&key("name"), "must be present and unique"));
            }
            let destination = match a.destination.as_str() {
                "salesforce" => &self.reverse_etl.salesforce,
                "sendgrid" => &self.reverse_etl.sendgrid,
                "twilio" => &self.reverse_etl.twilio,
                _ => &self.reverse_etl.push,
            };
            if destination.url.trim().is_empty() {
                return Err(bad(&key("destination"), &format!("reverse_etl.{}.url is not set", a.destination)));
            }
            if a.destination == "sendgrid" && a.list_id.trim().is_empty() {
                return Err(bad(&key("list_id"), "a SendGrid activation needs the list id"));
            }
            if a.destination == "twilio" && a.template_sid.trim().is_empty() {
                return Err(bad(&key("template_sid"), "a WhatsApp activation needs an approved template (HX...)"));
            }
        }
        if !(1..=256).contains(&self.identity.shards) {
            return Err(bad("identity.shards", "must be between 1 and 256"));
        }
        if !(1..=100_000).contains(&self.identity.unmerge_window) {
            return Err(bad("identity.unmerge_window", "must be between 1 and 100000 events"));
        }
        if !(self.identity.review_threshold > 0.0 && self.identity.review_threshold < 1.0) {
            return Err(bad("identity.review_threshold", "must be between 0 and 1 (exclusive)"));
        }
        let auto = self.identity.auto_merge_threshold;
        if auto != 0.0 && !(auto > self.identity.review_threshold && auto <= 1.0) {
            return Err(bad(
                "identity.auto_merge_threshold",
                "must be 0 (off) or above identity.review_threshold and at most 1",
            ));
        }
        if self.profiles.history_limit == 0 {
            return Err(bad("profiles.history_limit", "must be positive"));
        }
        if self.profiles.flush_interval_ms == 0 {
            return Err(bad("profiles.flush_interval_ms", "must be positive"));
        }
        if self.profiles.snapshot_min_interval_ms > 60_000 {
            // The checkpoint waits for deferred profiles; longer means long replays after a crash.
            return Err(bad("profiles.snapshot_min_interval_ms", "must be at most 60000 (one minute)"));
        }
        if self.profiles.max_event_attempts == 0 {
            return Err(bad("profiles.max_event_attempts", "must be positive"));
        }
        if self.supervision.backoff_initial_ms > self.supervision.backoff_max_ms {
            return Err(bad("supervision.backoff_initial_ms", "must not exceed supervision.backoff_max_ms"));
        }
        if self.supervision.window_secs == 0 {
            return Err(bad("supervision.window_secs", "must be positive"));
        }
        let wh = self.warehouse.url.as_str();
        let known =
            ["duckdb://", "duckdb::memory:", "sqlite://", "sqlite::memory:", "memory://", "bigquery://", "none://"];
        if wh == "embedded" {
            if !embedded_store {
                return Err(bad("warehouse.url", "\"embedded\" keeps the warehouse beside the embedded store; with MongoDB use duckdb://PATH, sqlite://PATH, bigquery://PROJECT/DATASET or none://"));
            }
        } else if !known.iter().any(|k| wh.starts_with(k)) {
            return Err(bad(
                "warehouse.url",
                "must be \"embedded\", duckdb://PATH, sqlite://PATH, bigquery://PROJECT/DATASET[?endpoint=URL] or none://",
            ));
        }
        if mongo_store && self.gdpr.key_url.trim() == "embedded" {
            return Err(bad(
                "gdpr.key_url",
                "must be file:PATH or gcpkms://... with MongoDB: every replica needs the same key-encryption key",
            ));
        }
        if self.identity.stats_interval_secs == 0 {
            return Err(bad("identity.stats_interval_secs", "must be positive"));
        }
        if self.warehouse.relay_interval_ms == 0 {
            return Err(bad("warehouse.relay_interval_ms", "must be positive"));
        }
        if self.warehouse.duckdb_hold_ms > 600_000 {
            return Err(bad(
                "warehouse.duckdb_hold_ms",
                "must be at most 600000 (10 minutes): analysts wait up to this long for the file",
            ));
        }
        if self.retention.idempotency_hours == 0 {
            return Err(bad("retention.idempotency_hours", "must be positive (it is the deduplication window)"));
        }
        if self.retention.interval_secs == 0 {
            return Err(bad("retention.interval_secs", "must be positive"));
        }
        Ok(())
    }

    /// Whether built-in development credentials are still in use.
    pub fn uses_dev_credentials(&self) -> bool {
        let defaults = match Config::from_toml_str("") {
            Ok(d) => d,
            Err(_) => return false,
        };
        self.auth.api_tokens == defaults.auth.api_tokens
            || self.sources.web.write_key == defaults.sources.web.write_key
            || self.sources.whatsapp.auth_token == defaults.sources.whatsapp.auth_token
    }
}

/// Renders figment's error with the dotted key path first, so the message names the key.
fn render_figment_error(e: figment::Error) -> String {
    e.into_iter()
        .map(|err| {
            let path = err.path.join(".");
            let kind = err.kind.to_string();
            let origin = err.metadata.as_ref().map(|m| m.name.to_string()).unwrap_or_default();
            let kind = kind.trim().to_string();
            match (path.is_empty(), origin.is_empty()) {
                (false, false) => format!("`{path}`: {kind} (from {origin})"),
                (false, true) => format!("`{path}`: {kind}"),
                (true, false) => format!("{kind} (from {origin})"),
                (true, true) => kind,
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A Salesforce field set through the environment is refused, naming the key; other
    /// variables pass.
    #[test]
    fn salesforce_fields_cannot_come_from_the_environment() {
        let vars =
            |names: &[&str]| names.iter().map(|n| (n.to_string(), "x".to_string())).collect::<Vec<_>>().into_iter();
        let e =
            Config::check_env(vars(&["PATH", "COHORT__NORMALIZE__SALESFORCE_FIELDS__HASOPTEDOUTOFEMAIL"])).unwrap_err();
        assert!(e.to_string().contains("normalize.salesforce_fields"), "{e}");
        assert!(Config::check_env(vars(&["COHORT__NORMALIZE__DEFAULT_REGION", "COHORT__SERVER__LISTEN"])).is_ok());
    }

    /// Gate 2's look-back is bounded: a huge one overflowed the window's start in the job.
    #[test]
    fn gate_2_window_is_bounded() {
        let e = Config::from_toml_str("[quality.gate2]\nwindow_hours = 100000000000\n").unwrap_err();
        assert!(e.to_string().contains("quality.gate2.window_hours"), "{e}");
        assert!(Config::from_toml_str("[quality.gate2]\nwindow_hours = 48\n").is_ok());
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::from_toml_str("").unwrap();
        assert_eq!(c.identity.shards, 4);
        assert_eq!(c.storage.url, "embedded://.cohort-data/cohort.redb");
        assert!(c.uses_dev_credentials());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml_str("[server]\nlisten_port = 3\n").unwrap_err().to_string();
        assert!(err.contains("listen_port"), "{err}");
    }

    #[test]
    fn wrong_type_is_named_with_its_path() {
        let err = Config::from_toml_str("[identity]\nshards = \"many\"\n").unwrap_err().to_string();
        assert!(err.contains("identity.shards"), "{err}");
    }

    #[test]
    fn range_check_names_the_key() {
        let err = Config::from_toml_str("[identity]\nshards = 0\n").unwrap_err().to_string();
        assert!(err.contains("`identity.shards`"), "{err}");
        let err = Config::from_toml_str("[storage]\ncache_mb = 0\n").unwrap_err().to_string();
        assert!(err.contains("`storage.cache_mb`"), "{err}");
        let err = Config::from_toml_str("[profiles]\nsnapshot_min_interval_ms = 60001\n").unwrap_err().to_string();
        assert!(err.contains("`profiles.snapshot_min_interval_ms`"), "{err}");
        assert_eq!(Config::from_toml_str("").unwrap().profiles.snapshot_min_interval_ms, 1000);
        assert!(Config::from_toml_str("[profiles]\nsnapshot_min_interval_ms = 0\n").is_ok(), "0 turns deferral off");
        assert_eq!(Config::from_toml_str("").unwrap().storage.cache_mb, 64);
        assert_eq!(Config::from_toml_str("").unwrap().storage.cache_bytes(), 64 << 20);
        let err = Config::from_toml_str("[storage]\nurl = \"ftp://x\"\n").unwrap_err().to_string();
        assert!(err.contains("storage.url"), "{err}");
        let err = Config::from_toml_str("[storage]\nurl = \"mongodb://db:27017\"\n").unwrap_err().to_string();
        assert!(err.contains("`bus.url`"), "the embedded journal needs the embedded store: {err}");
        let mongo_kafka = "[storage]\nurl = \"mongodb://db:27017\"\n[bus]\nurl = \"kafka://k:9092\"\n";
        let err = Config::from_toml_str(mongo_kafka).unwrap_err().to_string();
        assert!(err.contains("`warehouse.url`"), "the embedded warehouse needs the embedded store: {err}");
        let with_warehouse = format!("{mongo_kafka}[warehouse]\nurl = \"bigquery://p/cdp\"\n");
        let err = Config::from_toml_str(&with_warehouse).unwrap_err().to_string();
        assert!(err.contains("`gdpr.key_url`"), "replicas must share the key-encryption key: {err}");
        let ok = Config::from_toml_str(&format!("{with_warehouse}[gdpr]\nkey_url = \"file:/etc/cohort/kek\"\n"));
        assert!(ok.is_ok(), "{ok:?}");
        let err = Config::from_toml_str("[warehouse]\nurl = \"parquet://x\"\n").unwrap_err().to_string();
        assert!(err.contains("warehouse.url"), "{err}");
        let err = Config::from_toml_str("[warehouse]\nduckdb_hold_ms = 600001\n").unwrap_err().to_string();
        assert!(err.contains("`warehouse.duckdb_hold_ms`"), "{err}");
        assert_eq!(Config::from_toml_str("").unwrap().warehouse.duckdb_hold_ms, 10_000);
        let err = Config::from_toml_str("[retention]\nidempotency_hours = 0\n").unwrap_err().to_string();
        assert!(err.contains("retention.idempotency_hours"), "{err}");
        let err = Config::from_toml_str("[bus]\nurl = \"amqp://x\"\n").unwrap_err().to_string();
        assert!(err.contains("bus.url"), "{err}");
        let err = Config::from_toml_str("[bus]\nsession_timeout_ms = 500\n").unwrap_err().to_string();
        assert!(err.contains("`bus.session_timeout_ms`"), "{err}");
        let err = Config::from_toml_str("[gdpr]\nstep_timeout_secs = 60\nlease_secs = 60\n").unwrap_err().to_string();
        assert!(err.contains("`gdpr.lease_secs`"), "a lease must outlast a step: {err}");
        let err =
            Config::from_toml_str("[cluster]\nheartbeat_secs = 5\nmember_ttl_secs = 6\n").unwrap_err().to_string();
        assert!(err.contains("`cluster.member_ttl_secs`"), "{err}");
        let err = Config::from_toml_str("[cluster]\nadvertise_url = \"pod-1:8080\"\n").unwrap_err().to_string();
        assert!(err.contains("`cluster.advertise_url`"), "{err}");
        let err = Config::from_toml_str("[segments]\nrefresh_interval_secs = 0\n").unwrap_err().to_string();
        assert!(err.contains("`segments.refresh_interval_secs`"), "{err}");
        assert_eq!(Config::from_toml_str("").unwrap().segments.refresh_interval_secs, 5);
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure signature
    fn file_then_environment_override() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cohort.toml");
        let mut f = std::fs::File::create(&path).unwrap();
        writeln!(f, "[identity]\nshards = 8\n[profiles]\nhistory_limit = 7").unwrap();
        let c = Config::load_file_only(&path).unwrap();
        assert_eq!(c.identity.shards, 8);
        assert_eq!(c.profiles.history_limit, 7);
        figment::Jail::expect_with(|jail| {
            jail.set_env("COHORT__IDENTITY__SHARDS", "16");
            let c = Config::load(Some(&path)).map_err(|e| e.to_string())?;
            assert_eq!(c.identity.shards, 16);
            assert_eq!(c.profiles.history_limit, 7);
            Ok(())
        });
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = Config::load_file_only(Path::new("/nonexistent/cohort.toml")).unwrap_err().to_string();
        assert!(err.contains("cohort.toml"), "{err}");
    }
}
