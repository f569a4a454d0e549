//! Every metric the daemon exports, in one place. Prefix `fptserve_`, units in the
//! names, and labels from small fixed sets: task names, stages and gRPC codes, never an
//! identifier that comes from an image.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

/// Requests answered, by gRPC method and status code.
pub const REQUESTS: &str = "fptserve_requests_total";
/// Tasks asked for, by task and the call's status code.
pub const TASK_REQUESTS: &str = "fptserve_task_requests_total";
/// Time per request stage, by stage.
pub const STAGE_SECONDS: &str = "fptserve_stage_duration_seconds";
/// Task adapters by state.
pub const ADAPTERS: &str = "fptserve_adapters";
/// Time to load an adapter.
pub const ADAPTER_LOAD_SECONDS: &str = "fptserve_adapter_load_duration_seconds";
/// Requests that ran a model nothing had warmed, by kind.
pub const COLD_RUNS: &str = "fptserve_model_cold_runs_total";
/// Models that failed to load, by kind.
pub const MODEL_LOAD_FAILURES: &str = "fptserve_model_load_failures_total";
/// Bytes of loaded models, by kind.
pub const MODEL_MEMORY: &str = "fptserve_model_memory_bytes";
/// Images per backbone run.
pub const BACKBONE_BATCH_SIZE: &str = "fptserve_backbone_batch_size";
/// Backbone batches on the bound path, by K/V element type.
pub const BOUND_BATCHES: &str = "fptserve_backbone_bound_batches_total";
/// Images whose K/V were copied into host buffers.
pub const KV_HOST_COPIES: &str = "fptserve_kv_host_copies_total";
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
/// 1 when the inference listener takes calls.
pub const READY: &str = "fptserve_ready";
/// Resident memory of the process.
pub const RESIDENT_MEMORY: &str = "fptserve_process_resident_memory_bytes";
/// Constant 1 with the version as a label.
pub const BUILD_INFO: &str = "fptserve_build_info";

const STAGE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

const LOAD_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// How often the process gauges (resident memory) are refreshed.
const PROCESS_REFRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// Installs the Prometheus exporter on its own HTTP listener (`GET /metrics`), and
/// refreshes the process gauges until `shutdown` resolves. Call inside the Tokio runtime.
pub fn install(
    listen: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), BuildError> {
    PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets_for_metric(Matcher::Full(STAGE_SECONDS.into()), STAGE_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(BACKBONE_BATCH_SIZE.into()), BATCH_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(ADAPTER_LOAD_SECONDS.into()), LOAD_BUCKETS)?
        .install()?;
    describe();
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    ready(false);
    // every series with a fixed label set exists from the start, at zero
    for state in ["loaded", "evicted", "failed"] {
        metrics::gauge!(ADAPTERS, "state" => state).set(0.0);
    }
    for kind in ["backbone", "adapter"] {
        metrics::gauge!(MODEL_MEMORY, "kind" => kind).set(0.0);
        metrics::counter!(MODEL_LOAD_FAILURES, "kind" => kind).absolute(0);
        metrics::counter!(COLD_RUNS, "kind" => kind).absolute(0);
    }
    for reason in ["deadline", "cancelled"] {
        metrics::counter!(DROPPED, "reason" => reason).absolute(0);
    }
    refresh_process();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(PROCESS_REFRESH);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = ticks.tick() => refresh_process(),
                () = &mut shutdown => break,
            }
        }
    });
    Ok(())
}

/// Resident set size of this process, from /proc/self/statm (Linux).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf reads a constant of the running system.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

fn refresh_process() {
    if let Some(bytes) = resident_bytes() {
        metrics::gauge!(RESIDENT_MEMORY).set(bytes as f64);
    }
}

fn describe() {
    metrics::describe_counter!(
        REQUESTS,
        "gRPC requests answered, by method and status code."
    );
    metrics::describe_counter!(
        TASK_REQUESTS,
        "Tasks asked for in Classify and ModelInfer calls, by task and the call's status code (task \"unknown\" for names that are not loaded)."
    );
    metrics::describe_histogram!(
        STAGE_SECONDS,
        metrics::Unit::Seconds,
        "Wall time of request stages: decode, preprocess, queue (waiting for a backbone batch), backbone, adapter, total."
    );
    metrics::describe_histogram!(BACKBONE_BATCH_SIZE, "Images per backbone run.");
    metrics::describe_counter!(
        BOUND_BATCHES,
        "Backbone batches whose K/V stayed where the backbone computed them (device memory under CUDA) for the side networks to read there, by K/V element type: float32 or float16."
    );
    metrics::describe_counter!(
        KV_HOST_COPIES,
        "Images whose K/V fptserve copied out of ONNX Runtime into host buffers: every image when K/V are not bound, only those the feature cache keeps when they are."
    );
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
    metrics::describe_gauge!(
        ADAPTERS,
        "Task adapter versions by state: loaded (serving), evicted (under the adapter budget, reloaded on demand), failed (refused at their last load and not loaded)."
    );
    metrics::describe_histogram!(
        ADAPTER_LOAD_SECONDS,
        metrics::Unit::Seconds,
        "Time to load one adapter: manifest, SHA-256, ONNX Runtime session, interface checks (the warm-up run comes after)."
    );
    metrics::describe_counter!(
        MODEL_LOAD_FAILURES,
        "Model loads refused, by kind: backbone or adapter (at start, by the admin API, the repository watch or the model repository extension)."
    );
    metrics::describe_counter!(
        COLD_RUNS,
        "Requests that ran a model ONNX Runtime had not run before, by kind (backbone, adapter), paying its first-run set-up. Every load warms its models first, so this stays 0."
    );
    metrics::describe_gauge!(
        MODEL_MEMORY,
        metrics::Unit::Bytes,
        "Size of the loaded ONNX models, by kind (backbone, adapter): the weights they hold in memory; ONNX Runtime's working buffers come on top (see fptserve_process_resident_memory_bytes)."
    );
    metrics::describe_gauge!(
        READY,
        "1 when the inference listener takes calls (models loaded and warm, not draining), else 0."
    );
    metrics::describe_gauge!(
        RESIDENT_MEMORY,
        metrics::Unit::Bytes,
        "Resident memory of the fptserve process, refreshed every second."
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

/// Counts one task asked for in a call that ended with `code`.
pub fn task_request(task: &str, code: tonic::Code) {
    metrics::counter!(TASK_REQUESTS, "task" => task.to_string(), "code" => format!("{code:?}"))
        .increment(1);
}

/// Counts one answered request.
pub fn request(method: &'static str, code: tonic::Code) {
    metrics::counter!(REQUESTS, "method" => method, "code" => format!("{code:?}")).increment(1);
}

/// Sets the adapter counts by state and the loaded models' sizes.
pub fn models(adapters: AdapterStates, backbone_bytes: u64, adapter_bytes: u64) {
    metrics::gauge!(ADAPTERS, "state" => "loaded").set(adapters.loaded as f64);
    metrics::gauge!(ADAPTERS, "state" => "evicted").set(adapters.evicted as f64);
    metrics::gauge!(ADAPTERS, "state" => "failed").set(adapters.failed as f64);
    metrics::gauge!(MODEL_MEMORY, "kind" => "backbone").set(backbone_bytes as f64);
    metrics::gauge!(MODEL_MEMORY, "kind" => "adapter").set(adapter_bytes as f64);
}

/// Adapter versions by state.
#[derive(Clone, Copy, Debug, Default)]
pub struct AdapterStates {
    /// Serving.
    pub loaded: usize,
    /// Evicted under the budget.
    pub evicted: usize,
    /// Refused at their last load and not loaded.
    pub failed: usize,
}

/// Records one adapter load's duration.
pub fn adapter_loaded(seconds: f64) {
    metrics::histogram!(ADAPTER_LOAD_SECONDS).record(seconds);
}

/// Counts one refused model load; `kind` is "backbone" or "adapter".
pub fn load_failure(kind: &'static str) {
    metrics::counter!(MODEL_LOAD_FAILURES, "kind" => kind).increment(1);
}

/// Sets whether the inference listener takes calls.
pub fn ready(ready: bool) {
    metrics::gauge!(READY).set(if ready { 1.0 } else { 0.0 });
}

/// Records one backbone run's batch size.
pub fn backbone_batch(images: usize) {
    metrics::histogram!(BACKBONE_BATCH_SIZE).record(images as f64);
}

/// Counts one backbone batch on the bound path.
pub fn bound_batch(float16: bool) {
    let dtype = if float16 { "float16" } else { "float32" };
    metrics::counter!(BOUND_BATCHES, "kv_dtype" => dtype).increment(1);
}

/// Counts images whose K/V were copied to host buffers.
pub fn kv_host_copies(images: usize) {
    metrics::counter!(KV_HOST_COPIES).increment(images as u64);
}

/// Counts one backbone job dropped unrun; `reason` is "deadline" or "cancelled".
pub fn work_dropped(reason: &'static str) {
    metrics::counter!(DROPPED, "reason" => reason).increment(1);
}

/// Counts one request run of a model that had not run before; `kind` is "backbone" or
/// "adapter".
pub fn cold_run(kind: &'static str) {
    metrics::counter!(COLD_RUNS, "kind" => kind).increment(1);
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
