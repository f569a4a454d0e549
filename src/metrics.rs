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
/// Images per backbone run.
pub const BACKBONE_BATCH_SIZE: &str = "fptserve_backbone_batch_size";
/// Backbone jobs dropped unrun, by reason.
pub const DROPPED: &str = "fptserve_backbone_jobs_dropped_total";
/// Feature cache lookups, by result.
pub const CACHE_LOOKUPS: &str = "fptserve_feature_cache_lookups_total";
/// Bytes of K/V in the feature cache.
pub const CACHE_BYTES: &str = "fptserve_feature_cache_bytes";
/// Images in the feature cache.
pub const CACHE_ENTRIES: &str = "fptserve_feature_cache_entries";
/// Calls admitted and not finished.
pub const IN_FLIGHT: &str = "fptserve_requests_in_flight";
/// Backbone jobs waiting.
pub const QUEUE_DEPTH: &str = "fptserve_backbone_queue_depth";
/// Constant 1 with the version as a label.
pub const BUILD_INFO: &str = "fptserve_build_info";

const STAGE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

/// Installs the Prometheus exporter on its own HTTP listener (`GET /metrics`).
pub fn install(listen: SocketAddr) -> Result<(), BuildError> {
    PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets_for_metric(Matcher::Full(STAGE_SECONDS.into()), STAGE_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(BACKBONE_BATCH_SIZE.into()), BATCH_BUCKETS)?
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
        "Wall time of request stages: decode, preprocess, queue (waiting for a backbone batch), backbone, adapter, total."
    );
    metrics::describe_histogram!(BACKBONE_BATCH_SIZE, "Images per backbone run.");
    metrics::describe_counter!(
        DROPPED,
        "Backbone jobs dropped before running, by reason: deadline (passed while queued) or cancelled."
    );
    metrics::describe_counter!(
        CACHE_LOOKUPS,
        "Backbone feature cache lookups, by result: hit or miss."
    );
    metrics::describe_gauge!(
        CACHE_BYTES,
        metrics::Unit::Bytes,
        "Bytes of backbone K/V held in the feature cache."
    );
    metrics::describe_gauge!(CACHE_ENTRIES, "Images held in the feature cache.");
    metrics::describe_gauge!(IN_FLIGHT, "Classify calls admitted and not yet finished.");
    metrics::describe_gauge!(QUEUE_DEPTH, "Backbone jobs waiting for a batch.");
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

/// Records one backbone run's batch size.
pub fn backbone_batch(images: usize) {
    metrics::histogram!(BACKBONE_BATCH_SIZE).record(images as f64);
}

/// Counts one backbone job dropped unrun.
pub fn work_dropped(reason: crate::engine::Abandoned) {
    let reason = match reason {
        crate::engine::Abandoned::Deadline => "deadline",
        crate::engine::Abandoned::Cancelled => "cancelled",
    };
    metrics::counter!(DROPPED, "reason" => reason).increment(1);
}

/// Counts one feature cache lookup.
pub fn feature_cache(hit: bool) {
    let result = if hit { "hit" } else { "miss" };
    metrics::counter!(CACHE_LOOKUPS, "result" => result).increment(1);
}

/// Sets the feature cache's size.
pub fn feature_cache_size(bytes: usize, entries: usize) {
    metrics::gauge!(CACHE_BYTES).set(bytes as f64);
    metrics::gauge!(CACHE_ENTRIES).set(entries as f64);
}

/// Sets the calls in flight.
pub fn in_flight(n: i64) {
    metrics::gauge!(IN_FLIGHT).set(n as f64);
}

/// Sets the backbone queue depth.
pub fn queue_depth(n: i64) {
    metrics::gauge!(QUEUE_DEPTH).set(n as f64);
}
