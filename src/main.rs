//! `cohort`: the command line of the Cohort customer data platform.

use anyhow::Context;
use clap::{Parser, Subcommand};
use cohort::remote::{segment, Remote};
use cohort::{Cohort, SystemOptions};
use cohort_actors::normalize::NormalizeOptions;
use cohort_config::Config;
use std::path::PathBuf;
use std::time::Duration;

/// mimalloc: malloc/free were a fifth of CPU samples under load with the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "cohort", version, about = "Real-time customer data platform for education")]
struct Cli {
    /// TOML configuration file (defaults, then this file, then COHORT__SECTION__KEY variables).
    #[arg(long, short, global = true, env = "COHORT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (the default).
    Serve,
    /// Start on embedded defaults, play slide 18 through the HTTP API, print the profile.
    Demo {
        /// Keep serving after the demo instead of exiting.
        #[arg(long)]
        keep_running: bool,
        /// Where the demo keeps its data (a fresh temporary folder by default).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Bulk imports into a running Cohort.
    Import {
        #[command(subcommand)]
        command: ImportCommand,
    },
    /// Identity tools that work on files, with the live system's normalizers and match model.
    Identity {
        #[command(subcommand)]
        command: IdentityCommand,
    },
    /// Rebuild profiles and Silver from the raw payloads in Bronze (idempotent). With the
    /// embedded store, stop the server first: the replay opens the same files.
    Replay {
        /// The layer to replay from (only `bronze`).
        #[arg(long, value_parser = ["bronze"])]
        from: String,
        /// Only payloads received at or after this time (RFC 3339, e.g. 2026-11-01T00:00:00Z).
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Only this source (web, mobile, crm, email, whatsapp).
        #[arg(long)]
        source: Option<cohort_messages::Source>,
    },
    /// GDPR requests to a running Cohort: deletions and exports.
    Gdpr {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: GdprCommand,
    },
    /// The dead-letter store of a running Cohort.
    Dlq {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Segments of a running Cohort.
    Segments {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: SegmentsCommand,
    },
    /// Quality gates 1-4 of a running Cohort: their latest runs and a report.
    Quality {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: QualityCommand,
    },
    /// Scaffold a new source under connectors/NAME: connector, schema, Gate 1 expectations,
    /// README and a test; registered in the binary unless --no-register.
    GenerateConnector {
        /// Lowercase letters, digits and `_`, e.g. new_lms.
        #[arg(long)]
        name: String,
        /// How the source delivers.
        #[arg(long = "type", value_enum)]
        kind: cohort::scaffold::Kind,
        #[arg(long, value_enum)]
        format: cohort::scaffold::Format,
        /// The channel its events feed (trait precedence, topics and metrics follow it).
        #[arg(long, default_value = "web")]
        channel: cohort_messages::Source,
        /// Only write the crate; do not add it to the binary.
        #[arg(long)]
        no_register: bool,
        /// The repository root.
        #[arg(long, default_value = ".")]
        root: PathBuf,
    },
    /// Scoped API tokens: make one, or hash one for the tokens file.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Scheduled jobs of a running Cohort.
    Jobs {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: JobsCommand,
    },
}

/// Where the running Cohort is and how to authenticate.
#[derive(clap::Args)]
struct RemoteArgs {
    /// Base URL of the Cohort API.
    #[arg(long, env = "COHORT_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// An API token (defaults to the first of `auth.api_tokens` in the configuration).
    #[arg(long, env = "COHORT_API_TOKEN")]
    token: Option<String>,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a new random token (once: only its digest is kept) and its tokens-file entry.
    New {
        /// Who will hold it (shown in logs instead of the secret).
        #[arg(long)]
        name: String,
        /// A scope, repeatable: ingest:<source>, profiles:read, segments:admin, gdpr:admin,
        /// identity:review, ops:read, ops:admin, or * for all.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
    },
    /// Print the SHA-256 digest of a token read from standard input.
    Hash,
}

#[derive(Subcommand)]
enum GdprCommand {
    /// Request the erasure of a person (a profile id or `type:value`).
    Delete {
        reference: String,
        /// delete, suppress_with_delete or suppress_only.
        #[arg(long, default_value = "suppress_with_delete")]
        regulation: String,
        /// Who asked (an operator or ticket), kept in the audit record.
        #[arg(long)]
        requested_by: Option<String>,
        /// Follow the saga until it completes, showing the current step.
        #[arg(long)]
        wait: bool,
    },
    /// A deletion's status: every step with its attempts, last error and timestamps.
    Status { id: String },
    /// Everything held about a person, as JSON.
    Export { reference: String },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Dead letters with their reasons and raw payloads, oldest first.
    List {
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Send dead letters through the pipeline again once their cause is fixed: the given ids,
    /// or all of them (with a progress bar). Replayed letters are removed; the rest are listed.
    Replay {
        /// A dead letter id (repeatable); none: every letter.
        #[arg(long = "id")]
        ids: Vec<u64>,
        /// Only letters of this stage: validation, identity or profile.
        #[arg(long, value_parser = ["validation", "identity", "profile"])]
        stage: Option<String>,
    },
}

#[derive(Subcommand)]
enum QualityCommand {
    /// The latest quality gate runs as a table (or `--json`), or `--html FILE` for a data-docs
    /// page. Fails when a gate's latest run failed.
    Report {
        /// Only this gate (1-4).
        #[arg(long)]
        gate: Option<u8>,
        /// Runs since this time (RFC 3339); default the last 7 days.
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Print the runs as JSON.
        #[arg(long)]
        json: bool,
        /// Write the HTML report here.
        #[arg(long)]
        html: Option<PathBuf>,
    },
    /// Run gates 2 and 3 now (with the Silver -> Gold job), and print the outcome.
    Run,
}

#[derive(Subcommand)]
enum SegmentsCommand {
    /// Every segment with its definition and member count.
    List,
    /// One segment.
    Show { name: String },
    /// A segment's members, paged.
    Members {
        name: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[derive(Subcommand)]
enum JobsCommand {
    /// Every job with its schedule, next run and last run.
    List,
    /// A job's run history.
    Runs { name: String },
    /// Run a job now and print the finished run.
    Run { name: String },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file (with the built-in defaults underneath).
    Check { file: PathBuf },
    /// Print the built-in defaults.
    Defaults,
}

#[derive(Subcommand)]
enum IdentityCommand {
    /// Cluster the people of a CSV file: writes record_id,cluster_id,confidence.
    Dedupe {
        #[arg(long)]
        input: PathBuf,
        #[command(flatten)]
        matching: FileMatching,
    },
    /// Link the people of two CSV files: writes left_id,right_id,score for likely matches.
    Link {
        #[arg(long)]
        left: PathBuf,
        #[arg(long)]
        right: PathBuf,
        #[command(flatten)]
        matching: FileMatching,
    },
}

/// What the file identity commands share.
#[derive(clap::Args)]
struct FileMatching {
    /// FIELD=COLUMN pairs: id (required), first_name, last_name, email, phone, date_of_birth,
    /// street, house_number, postcode, city, region, national_id (the same names in both files).
    #[arg(long)]
    map: String,
    #[arg(long)]
    output: PathBuf,
    /// Pairs scoring at least this are one person.
    #[arg(long, default_value_t = 0.85)]
    threshold: f64,
}

#[derive(Subcommand)]
enum ImportCommand {
    /// Stream a Salesforce Bulk API 2.0 CSV export of Contacts into Cohort.
    SalesforceContacts {
        file: PathBuf,
        /// Base URL of the Cohort API.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// The CRM source's bearer token (defaults to `sources.crm.token` from config).
        #[arg(long, env = "COHORT_CRM_TOKEN")]
        token: Option<String>,
        /// Data rows per request.
        #[arg(long, default_value_t = 5000)]
        chunk_rows: usize,
        /// No progress bar (for scripts).
        #[arg(long)]
        quiet: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let config = Config::load(cli.config.as_deref())?;
            let telemetry = cohort::telemetry::init(&config.telemetry);
            let served = serve(config).await;
            // Spans still buffered go out before the process ends.
            telemetry.shutdown();
            served
        }
        Command::Identity { command: IdentityCommand::Dedupe { input, matching: m } } => {
            let (opts, map) = file_matching(cli.config.as_deref(), &m.map)?;
            let summary = cohort::dedupe::dedupe(&input, &map, &m.output, m.threshold, &opts)?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
            Ok(())
        }
        Command::Identity { command: IdentityCommand::Link { left, right, matching: m } } => {
            let (opts, map) = file_matching(cli.config.as_deref(), &m.map)?;
            let summary = cohort::dedupe::link(&left, &right, &map, &m.output, m.threshold, &opts)?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
            Ok(())
        }
        Command::Replay { from: _, since, source } => {
            let config = Config::load(cli.config.as_deref())?;
            cohort::telemetry::init(&config.telemetry);
            let filter = cohort::replay::ReplayFilter { since, source };
            let options = SystemOptions { connectors: cohort::connectors::compiled_in(), ..SystemOptions::default() };
            let summary = cohort::replay::run(config, filter, options).await?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
            Ok(())
        }
        Command::Gdpr { remote, command } => {
            let r = remote_of(&cli.config, remote)?;
            let out = match command {
                GdprCommand::Delete { reference, regulation, requested_by, wait } => {
                    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
                    r.delete_person(&reference, &regulation, requested_by.as_deref(), wait, progress).await?
                }
                GdprCommand::Status { id } => r.get(&format!("/v1/gdpr/deletions/{}", segment(&id))).await?,
                GdprCommand::Export { reference } => {
                    r.get(&format!("/v1/gdpr/exports/{}", segment(&reference))).await?
                }
            };
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        Command::Dlq { remote, command: DlqCommand::List { after, limit } } => {
            let r = remote_of(&cli.config, remote)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&r.get(&format!("/v1/dlq?after={after}&limit={limit}")).await?)?
            );
            Ok(())
        }
        Command::Dlq { remote, command: DlqCommand::Replay { ids, stage } } => {
            let r = remote_of(&cli.config, remote)?;
            let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let out = r.replay_dead_letters(&ids, stage.as_deref(), progress).await?;
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        Command::Quality { remote, command: QualityCommand::Run } => {
            let r = remote_of(&cli.config, remote)?;
            let out = r.post("/v1/jobs/gold_reconcile/run", serde_json::Value::Null).await?;
            println!("{}", serde_json::to_string_pretty(&out)?);
            if out["status"] != "succeeded" {
                anyhow::bail!("the gated Silver -> Gold run did not succeed: {}", out["error"]);
            }
            Ok(())
        }
        Command::Quality { remote, command: QualityCommand::Report { gate, since, json, html } } => {
            let r = remote_of(&cli.config, remote)?;
            let mut query = vec![];
            if let Some(g) = gate {
                query.push(format!("gate={g}"));
            }
            if let Some(s) = since {
                query.push(format!("since={}", s.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)));
            }
            let query = if query.is_empty() { String::new() } else { format!("?{}", query.join("&")) };
            let out = r.get(&format!("/v1/quality/runs{query}")).await?;
            if let Some(path) = html {
                let page = r.quality_report_html(&query).await?;
                std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
                eprintln!("report written to {}", path.display());
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                print!("{}", cohort::remote::quality_table(&out));
            }
            let failing = out["failing_gates"].as_array().cloned().unwrap_or_default();
            if !failing.is_empty() {
                anyhow::bail!("failing gates: {}", serde_json::Value::Array(failing));
            }
            Ok(())
        }
        Command::Segments { remote, command } => {
            let r = remote_of(&cli.config, remote)?;
            let out = match command {
                SegmentsCommand::List => r.get("/v1/segments").await?,
                SegmentsCommand::Show { name } => r.get(&format!("/v1/segments/{}", segment(&name))).await?,
                SegmentsCommand::Members { name, limit } => {
                    r.get(&format!("/v1/segments/{}/members?limit={limit}", segment(&name))).await?
                }
            };
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        Command::Jobs { remote, command } => {
            let r = remote_of(&cli.config, remote)?;
            let out = match command {
                JobsCommand::List => r.get("/v1/jobs").await?,
                JobsCommand::Runs { name } => r.get(&format!("/v1/jobs/{}/runs", segment(&name))).await?,
                JobsCommand::Run { name } => {
                    r.post(&format!("/v1/jobs/{}/run", segment(&name)), serde_json::Value::Null).await?
                }
            };
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        Command::GenerateConnector { name, kind, format, channel, no_register, root } => {
            let scaffold =
                cohort::scaffold::Scaffold { name: name.clone(), kind, format, channel, register: !no_register };
            let written = scaffold.write(&root)?;
            for path in &written {
                println!("{}", path.display());
            }
            eprintln!(
                "\nNext: edit connectors/{name}/src/lib.rs (map) and schema.json for the source's fields, then\n  cargo test -p cohort-connector-{}",
                name.replace('_', "-")
            );
            Ok(())
        }
        Command::Token { command: TokenCommand::New { name, scopes } } => {
            if let Some(bad) = scopes.iter().find(|s| !cohort_config::known_scope(s)) {
                anyhow::bail!("unknown scope `{bad}` (known: {})", cohort_config::SCOPES.join(", "));
            }
            let mut secret = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
            let token: String =
                std::iter::once("cht_".to_string()).chain(secret.iter().map(|b| format!("{b:02x}"))).collect();
            let scopes: Vec<String> = scopes.iter().map(|s| format!("\"{s}\"")).collect();
            eprintln!("The token (shown once; give it to {name} and keep only the entry below):");
            println!("{token}");
            eprintln!("\nAdd to auth.tokens_file:");
            eprintln!(
                "[[tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\nscopes = [{}]",
                cohort_api::auth::token_digest(&token),
                scopes.join(", ")
            );
            Ok(())
        }
        Command::Token { command: TokenCommand::Hash } => {
            let mut token = String::new();
            std::io::stdin().read_line(&mut token).context("reading the token from standard input")?;
            println!("{}", cohort_api::auth::token_digest(token.trim()));
            Ok(())
        }
        Command::Demo { keep_running, data_dir } => cohort::demo::run(keep_running, data_dir).await,
        Command::Config { command: ConfigCommand::Check { file } } => {
            match Config::load_file_only(&file)
                .map_err(|e| e.to_string())
                .and_then(|c| cohort::system::check_config(&c).map_err(|e| format!("{e:#}")))
            {
                Ok(_) => {
                    println!("{}: ok", file.display());
                    Ok(())
                }
                Err(e) => {
                    eprintln!("{}: {e}", file.display());
                    std::process::exit(2);
                }
            }
        }
        Command::Config { command: ConfigCommand::Defaults } => {
            print!("{}", cohort_config::DEFAULTS_TOML);
            Ok(())
        }
        Command::Import { command: ImportCommand::SalesforceContacts { file, url, token, chunk_rows, quiet } } => {
            let token = match token {
                Some(t) => t,
                None => Config::load(cli.config.as_deref())?.sources.crm.token,
            };
            let summary = cohort::import::salesforce_contacts(&file, &url, &token, chunk_rows, !quiet).await?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
            if summary.rejected > 0 {
                eprintln!("{} rows rejected; see GET /v1/dlq for the reasons", summary.rejected);
            }
            // Nothing taken at all is a failed import (a script with --quiet must see it); some
            // rows refused is reported above and in the summary.
            if summary.rows > 0 && summary.rejected == summary.rows {
                anyhow::bail!("every row was rejected; see GET /v1/dlq for the reasons");
            }
            Ok(())
        }
    }
}

/// The API client of the operator commands; the token falls back to the configuration's.
fn remote_of(config: &Option<PathBuf>, args: RemoteArgs) -> anyhow::Result<Remote> {
    let token = match args.token {
        Some(t) => t,
        None => Config::load(config.as_deref())?
            .auth
            .api_tokens
            .first()
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no API token: pass --token or set auth.api_tokens"))?,
    };
    Remote::new(&args.url, &token)
}

/// The normalizer options from config and the parsed `--map` of the file identity commands.
fn file_matching(
    config: Option<&std::path::Path>,
    map: &str,
) -> anyhow::Result<(NormalizeOptions, std::collections::BTreeMap<String, String>)> {
    let config = Config::load(config)?;
    let opts = NormalizeOptions::from_config(&config.normalize).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((opts, cohort::dedupe::parse_map(map)?))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listen = config.server.listen;
    let options = SystemOptions { connectors: cohort::connectors::compiled_in(), ..SystemOptions::default() };
    let mut cohort = Cohort::start(config, options).await?;
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    tracing::info!(%listen, "cohort listening");
    let router = cohort.router();
    let server_cfg = cohort.config.server.clone();
    let metrics = cohort.api.metrics.clone();
    let server =
        cohort_api::serve::serve(listener, router, &server_cfg, metrics, shutdown_signal(), Duration::from_secs(15));
    tokio::select! {
        () = server => {},
        _ = cohort.wait_root() => {
            anyhow::bail!("the supervision tree stopped: a failure escalated to the root");
        }
    }
    tracing::info!("shutting down");
    cohort.shutdown(Duration::from_secs(20)).await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
