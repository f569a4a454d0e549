//! Logs and traces. Log lines go to stderr, human-readable or as JSON lines, filtered by
//! `FPTSERVE_LOG` (an EnvFilter, default `info`); every line of a call carries its
//! request id (the call's span). With `--otlp-endpoint`, fptserve's own spans are also
//! exported to an OpenTelemetry collector over OTLP/gRPC.
//!
//! Nothing patient-identifying reaches either: fptserve never reads the DICOM
//! attributes that identify a patient, and no log field or span attribute carries
//! decoded header values (tests/python/test_observability.py checks this at `trace`).

use std::io::IsTerminal;

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// Flushes exported spans when dropped (at exit).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("fptserve: flushing OTLP spans: {e}");
        }
    }
}

/// Installs the global subscriber. With `otlp_endpoint`, call inside a Tokio runtime:
/// the exporter's gRPC channel lives on it.
pub fn init(format: &str, otlp_endpoint: Option<&str>) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_env("FPTSERVE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let lines = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let lines: Box<dyn Layer<Registry> + Send + Sync> = match format {
        "human" => lines.with_filter(filter).boxed(),
        "json" => lines.json().flatten_event(true).with_filter(filter).boxed(),
        other => anyhow::bail!("log format {other:?}: use human or json"),
    };
    let (spans, provider) = match otlp_endpoint {
        None => (None, None),
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .with_context(|| format!("OTLP exporter for {endpoint}"))?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name("fptserve")
                        .build(),
                )
                .build();
            // only fptserve's own spans: the exporter's gRPC client must not trace itself
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("fptserve"))
                .with_filter(Targets::new().with_target("fptserve", LevelFilter::INFO))
                .boxed();
            (Some(layer), Some(provider))
        }
    };
    tracing_subscriber::registry()
        .with(lines)
        .with(spans)
        .try_init()
        .context("installing the log subscriber")?;
    if let Some(endpoint) = otlp_endpoint {
        tracing::info!(endpoint, "exporting trace spans over OTLP");
    }
    Ok(Telemetry { provider })
}
