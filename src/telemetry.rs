//! Logging and tracing setup: structured `tracing` output (JSON in production) and, when
//! `telemetry.otlp_endpoint` is set, OpenTelemetry spans exported over OTLP/HTTP.

use cohort_config::{LogFormat, TelemetryConfig};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Keeps the span exporter alive; [`Telemetry::shutdown`] sends what is still buffered.
#[derive(Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub fn shutdown(&self) {
        if let Some(p) = &self.provider {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
    }
}

/// Installs the global subscriber; `RUST_LOG` overrides the configured log filter (the trace
/// export keeps Cohort's own info-level spans whatever the log level).
pub fn init(cfg: &TelemetryConfig) -> Telemetry {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.log_filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match cfg.log_format {
        LogFormat::Json => fmt.json().flatten_event(true).with_filter(filter).boxed(),
        LogFormat::Text => fmt.with_filter(filter).boxed(),
    };
    let (provider, traces) = match otlp(cfg) {
        Ok(Some(provider)) => {
            let tracer = provider.tracer("cohort");
            let only_ours = Targets::new()
                .with_target("cohort", LevelFilter::INFO)
                // The pipeline's per-event spans are debug level: free when nothing exports them.
                .with_target("cohort_actors", LevelFilter::DEBUG)
                .with_target("cohort_api", LevelFilter::INFO);
            (Some(provider), Some(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(only_ours)))
        }
        Ok(None) => (None, None),
        Err(e) => {
            eprintln!("tracing is off: {e}");
            (None, None)
        }
    };
    let _ = tracing_subscriber::registry().with(logs).with(traces).try_init();
    Telemetry { provider }
}

fn otlp(cfg: &TelemetryConfig) -> Result<Option<SdkTracerProvider>, String> {
    let endpoint = cfg.otlp_endpoint.trim().trim_end_matches('/');
    if endpoint.is_empty() {
        return Ok(None);
    }
    let url = if endpoint.ends_with("/v1/traces") { endpoint.to_string() } else { format!("{endpoint}/v1/traces") };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url)
        .build()
        .map_err(|e| format!("telemetry.otlp_endpoint: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder().with_service_name("cohort").build();
    Ok(Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build()))
}
