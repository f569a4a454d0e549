//! Every metric the daemon exports, in one place. Prefix `fptserve_`, units in the
//! names, and labels from small fixed sets: task names, stages and gRPC codes, never an
//! identifier that comes from an image.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

/// Requests answered, by gRPC method and status code.
pub const REQUESTS: &str = "fptserve_requests_total";
/// Task results produced, by task.
pub const TASK_RESULTS: &str = "fptserve_task_results_total";
/// Time per request stage, by stage.
pub const STAGE_SECONDS: &str = "fptserve_stage_duration_seconds";
/// Loaded adapters.
pub const ADAPTERS_LOADED: &str = "fptserve_adapters_loaded";
/// Models that failed to load at start.
pub const MODEL_LOAD_FAILURES: &str = "fptserve_model_load_failures_total";
/// Constant 1 with the version as a label.
pub const BUILD_INFO: &str = "fptserve_build_info";

const STAGE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Installs the Prometheus exporter on its own HTTP listener (`GET /metrics`).
pub fn install(listen: SocketAddr) -> Result<(), BuildError> {
    PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets_for_metric(Matcher::Full(STAGE_SECONDS.into()), STAGE_BUCKETS)?
        .install()?;
    describe();
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(())
}

fn describe() {
    metrics::describe_counter!(
        REQUESTS,
        "gRPC requests answered, by method and status code."
    );
    metrics::describe_counter!(TASK_RESULTS, "Task results produced, by task.");
    metrics::describe_histogram!(
        STAGE_SECONDS,
        metrics::Unit::Seconds,
        "Wall time of request stages: decode, preprocess, backbone, adapter, total."
    );
    metrics::describe_gauge!(ADAPTERS_LOADED, "Task adapters currently loaded.");
    metrics::describe_counter!(
        MODEL_LOAD_FAILURES,
        "Models skipped because they failed to load."
    );
    metrics::describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which build runs."
    );
}

/// Records a stage's duration.
pub fn stage(stage: &'static str, ms: f64) {
    metrics::histogram!(STAGE_SECONDS, "stage" => stage).record(ms / 1e3);
}

/// Counts one task result.
pub fn task_answered(task: &str) {
    metrics::counter!(TASK_RESULTS, "task" => task.to_string()).increment(1);
}

/// Counts one answered request.
pub fn request(method: &'static str, code: tonic::Code) {
    metrics::counter!(REQUESTS, "method" => method, "code" => format!("{code:?}")).increment(1);
}

/// Sets the number of loaded adapters.
pub fn adapters_loaded(n: usize) {
    metrics::gauge!(ADAPTERS_LOADED).set(n as f64);
}

/// Counts models that failed to load.
pub fn load_failures(n: usize) {
    metrics::counter!(MODEL_LOAD_FAILURES).increment(n as u64);
}
