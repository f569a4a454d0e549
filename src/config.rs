//! Command line, config file and environment, merged into validated settings before any
//! port is bound. Precedence: command line > FPTSERVE_* environment > TOML file > default.
//!
//! Each setting is declared once, as a field of [`ServeArgs`] (or [`ModelArgs`]): clap
//! derives its flag and environment variable from the field, serde its config-file key
//! (the field name). [`ServeArgs::resolve`] lays the flags over the file and validates.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use std::time::Duration;

use crate::decode::Limits;
use crate::decode::codec::MinSize;
use crate::engine::EngineSettings;
use crate::model::backbone::BackbonePrecision;
use crate::runtime::{Device, Threads};
use crate::server::GrpcSettings;

/// fptserve: serve FPT+ medical image classifiers over gRPC.
#[derive(Parser, Debug)]
#[command(name = "fptserve", version, about)]
pub struct Cli {
    /// The action.
    #[command(subcommand)]
    pub command: Command,
    /// Log format: human or json.
    #[arg(
        long,
        global = true,
        env = "FPTSERVE_LOG_FORMAT",
        default_value = "human"
    )]
    pub log_format: String,
    /// Export trace spans over OTLP/gRPC to this collector, e.g. http://localhost:4317
    /// [default: off].
    #[arg(long, global = true, env = "FPTSERVE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gRPC daemon.
    Serve(Box<ServeArgs>),
    /// Classify one file without a server and print the result.
    Classify(ClassifyArgs),
    /// Print a model's manifest and check it (digest, graph interface, backbone match).
    Inspect(InspectArgs),
    /// Decode one image frame and write its samples as .npy (for checking against pydicom).
    Decode(DecodeArgs),
}

/// Where models come from and where they run.
#[derive(Args, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct ModelArgs {
    /// Model repository folder [default: models/demo].
    #[arg(long, env = "FPTSERVE_REPOSITORY")]
    pub repository: Option<PathBuf>,
    /// cpu, cuda or cuda:N [default: cpu]. Falls back to cpu, with a warning, when CUDA cannot start.
    #[arg(long, env = "FPTSERVE_DEVICE")]
    pub device: Option<String>,
    /// Path of libonnxruntime.so [default: found automatically].
    #[arg(long, env = "FPTSERVE_ONNXRUNTIME_LIB")]
    pub onnxruntime_lib: Option<PathBuf>,
    /// ONNX Runtime threads inside one operator, one pool shared by every model [default: 0 = one per core].
    #[arg(long, env = "FPTSERVE_INTRA_OP_THREADS")]
    pub intra_op_threads: Option<usize>,
    /// ONNX Runtime threads across operators [default: 0 = runtime default].
    #[arg(long, env = "FPTSERVE_INTER_OP_THREADS")]
    pub inter_op_threads: Option<usize>,
    /// A backbone variant (an INT8 quantisation, by folder name) that may serve the adapters
    /// of the backbone it was made from, when that one is not loaded; repeat for several
    /// [default: none: adapters run only on the backbone they were trained against].
    #[arg(
        long = "allow-backbone-variant",
        env = "FPTSERVE_ALLOW_BACKBONE_VARIANTS",
        value_delimiter = ','
    )]
    pub allow_backbone_variants: Vec<String>,
    /// auto, float32 or float16: whether a float16 variant of a backbone (made by
    /// `quantize-backbone --precision float16`) serves its adapters in its place
    /// [default: auto: float16 on a GPU, float32 on a CPU].
    #[arg(long, env = "FPTSERVE_BACKBONE_PRECISION")]
    pub backbone_precision: Option<String>,
}

/// `fptserve serve`. The config file's keys are these fields' names.
#[derive(Args, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (keys in snake_case).
    #[arg(long, env = "FPTSERVE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Models.
    #[command(flatten)]
    #[serde(flatten)]
    pub models: ModelArgs,
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long, env = "FPTSERVE_GRPC_LISTEN")]
    pub grpc_listen: Option<String>,
    /// Prometheus /metrics listen address, or "off" [default: 127.0.0.1:9464].
    #[arg(long, env = "FPTSERVE_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Largest gRPC message in bytes [default: 268435456 = 256 MiB].
    #[arg(long, env = "FPTSERVE_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Classifications running at once; more get RESOURCE_EXHAUSTED [default: 16].
    #[arg(long, env = "FPTSERVE_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<usize>,
    /// Largest frame in pixels (rows x columns) [default: 268435456].
    #[arg(long, env = "FPTSERVE_MAX_PIXELS")]
    pub max_pixels: Option<u64>,
    /// Most frames in a multi-frame DICOM [default: 4096].
    #[arg(long, env = "FPTSERVE_MAX_FRAMES")]
    pub max_frames: Option<u32>,
    /// Largest decoded frame in bytes [default: 2147483648 = 2 GiB].
    #[arg(long, env = "FPTSERVE_MAX_FRAME_BYTES")]
    pub max_frame_bytes: Option<u64>,
    /// Admin API (LoadAdapter, ...) listen address, or "off" [default: 127.0.0.1:50052].
    #[arg(long, env = "FPTSERVE_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// File holding the bearer token the admin API requires [default: none required].
    #[arg(long, env = "FPTSERVE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// PEM certificate chain: serve both gRPC listeners over TLS [default: plaintext].
    #[arg(long, env = "FPTSERVE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "FPTSERVE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// File of trusted ed25519 public keys (hex, one per line): adapter signatures
    /// (manifest.sig) that are present must verify against one [default: not checked].
    #[arg(long, env = "FPTSERVE_TRUSTED_KEYS")]
    pub trusted_keys: Option<PathBuf>,
    /// Refuse adapters without a valid signature from a trusted key.
    #[arg(long, env = "FPTSERVE_REQUIRE_SIGNATURES")]
    pub require_signatures: bool,
    /// PEM CA certificates: require client certificates they sign (mutual TLS).
    #[arg(long, env = "FPTSERVE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Most task adapters loaded at once; beyond it the least recently used unpinned ones
    /// are evicted and reloaded when next requested [default: no limit].
    #[arg(long, env = "FPTSERVE_MAX_ADAPTERS")]
    pub max_adapters: Option<usize>,
    /// Seconds between scans of the repository's tasks/ folder, loading, replacing and
    /// unloading adapters to match it; 0 = no watching [default: 0].
    #[arg(long, env = "FPTSERVE_WATCH_INTERVAL")]
    pub watch_interval: Option<f64>,
    /// Most images in one backbone run; 1 turns batching off [default: 1 on CPU, 32 on GPU].
    #[arg(long, env = "FPTSERVE_MAX_BATCH_SIZE")]
    pub max_batch_size: Option<usize>,
    /// Longest an image waits for others to join its backbone batch, in milliseconds
    /// [default: 0 on CPU, 2 on GPU].
    #[arg(long, env = "FPTSERVE_MAX_BATCH_DELAY_MS")]
    pub max_batch_delay_ms: Option<f64>,
    /// Most images waiting for the backbone; more get RESOURCE_EXHAUSTED [default: 64 on CPU, 256 on GPU].
    #[arg(long, env = "FPTSERVE_MAX_QUEUE")]
    pub max_queue: Option<usize>,
    /// Byte budget of the backbone feature cache (K/V of recent images); 0 = off
    /// [default: 268435456 = 256 MiB].
    #[arg(long, env = "FPTSERVE_FEATURE_CACHE_BYTES")]
    pub feature_cache_bytes: Option<usize>,
    /// Calls decoding and preprocessing at once [default: one per core].
    #[arg(long, env = "FPTSERVE_DECODE_THREADS")]
    pub decode_threads: Option<usize>,
    /// Keep the backbone's K/V where it computed them (GPU memory under CUDA) and run the
    /// side networks on them there, each on the whole batch: true or false [default: true on
    /// GPU, false on CPU].
    #[arg(long, env = "FPTSERVE_IO_BINDING")]
    pub io_binding: Option<bool>,
    /// Seconds calls in flight get to finish after SIGTERM/SIGINT [default: 30].
    #[arg(long, env = "FPTSERVE_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<f64>,
    /// Folder outside the repository that LoadAdapter may read from; repeat for several.
    #[arg(
        long = "admin-allow-root",
        env = "FPTSERVE_ADMIN_ALLOW_ROOTS",
        value_delimiter = ','
    )]
    pub admin_allow_roots: Vec<PathBuf>,
}

/// `fptserve classify`.
#[derive(Args, Debug)]
pub struct ClassifyArgs {
    /// A DICOM, PNG, JPEG or TIFF file.
    pub file: PathBuf,
    /// Task, or task@version; repeat for several.
    #[arg(long = "task", required = true)]
    pub tasks: Vec<String>,
    /// Frame of a multi-frame DICOM (0-based).
    #[arg(long, default_value_t = 0)]
    pub frame: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Models.
    #[command(flatten)]
    pub models: ModelArgs,
}

/// `fptserve inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A backbone or adapter folder (holding manifest.json), or the manifest itself.
    pub path: PathBuf,
    /// Path of libonnxruntime.so [default: found automatically].
    #[arg(long, env = "FPTSERVE_ONNXRUNTIME_LIB")]
    pub onnxruntime_lib: Option<PathBuf>,
}

/// `fptserve decode`.
#[derive(Args, Debug)]
pub struct DecodeArgs {
    /// A DICOM, PNG, JPEG or TIFF file.
    pub file: PathBuf,
    /// Frame (0-based).
    #[arg(long, default_value_t = 0)]
    pub frame: u32,
    /// `stored`: int32 (rows, columns, samples) before any value transform (DICOM only);
    /// `display`: uint8 (rows, columns, 3) after the pixel policy.
    #[arg(long, default_value = "stored")]
    pub output: String,
    /// Where to write the .npy file.
    #[arg(long)]
    pub npy: Option<PathBuf>,
    /// DICOM VOI policy for `display`: auto, window or minmax.
    #[arg(long, default_value = "auto")]
    pub voi: String,
    /// Window centre for `--voi window`.
    #[arg(long)]
    pub window_center: Option<f64>,
    /// Window width for `--voi window`.
    #[arg(long)]
    pub window_width: Option<f64>,
    /// VOI function for `--voi window`: linear, linear_exact or sigmoid.
    #[arg(long)]
    pub voi_function: Option<String>,
    /// Reduced-resolution decoding, as a task with `decode_resolution: reduced` gets it:
    /// JPEG 2000, HTJ2K and DCT-based JPEG stop at the coarsest resolution whose sides are
    /// at least WIDTHxHEIGHT (the task's largest input size). Default: full resolution.
    #[arg(long, value_name = "WIDTHxHEIGHT", value_parser = parse_min_size)]
    pub min_size: Option<MinSize>,
}

/// `WIDTHxHEIGHT`, or one number for a square.
fn parse_min_size(text: &str) -> Result<MinSize, String> {
    let number = |t: &str| {
        t.trim()
            .parse::<u32>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("{text:?}: expected WIDTHxHEIGHT or N, positive integers"))
    };
    match text.split_once(['x', 'X']) {
        Some((w, h)) => Ok(MinSize {
            width: number(w)?,
            height: number(h)?,
        }),
        None => {
            let n = number(text)?;
            Ok(MinSize {
                width: n,
                height: n,
            })
        }
    }
}

/// Settings shared by `serve` and `classify`.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Repository folder.
    pub repository: PathBuf,
    /// Requested device.
    pub device: Device,
    /// Explicit library path.
    pub onnxruntime_lib: Option<PathBuf>,
    /// ONNX Runtime threads.
    pub threads: Threads,
    /// Backbone variants allowed to stand in for the backbone they were made from.
    pub allowed_variants: Vec<String>,
    /// Whether float16 variants serve in place of the backbone they were made from.
    pub backbone_precision: BackbonePrecision,
}

/// Validated `serve` settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Models.
    pub models: ModelConfig,
    /// gRPC address.
    pub grpc_listen: SocketAddr,
    /// Metrics address, if enabled.
    pub metrics_listen: Option<SocketAddr>,
    /// gRPC settings.
    pub grpc: GrpcSettings,
    /// Decode limits.
    pub limits: Limits,
    /// The admin API, if enabled.
    pub admin: Option<AdminConfig>,
    /// TLS certificate files, if the listeners use TLS.
    pub tls: Option<crate::tls::TlsFiles>,
    /// Adapter signature policy, if signatures are checked.
    pub trust: Option<crate::signing::Trust>,
    /// Most adapters loaded at once.
    pub max_adapters: Option<usize>,
    /// Repository watch period, if watching.
    pub watch_interval: Option<std::time::Duration>,
    /// Engine settings given explicitly; the rest default by device.
    pub engine: EngineOverrides,
}

/// Engine settings from flags, environment or file; unset ones default by the device
/// the models run on, known only once ONNX Runtime is up.
#[derive(Clone, Copy, Debug, Default)]
pub struct EngineOverrides {
    /// Most images per backbone run.
    pub max_batch_size: Option<usize>,
    /// Longest wait for a batch to fill.
    pub max_batch_delay: Option<Duration>,
    /// Most images queued per backbone.
    pub max_queue: Option<usize>,
    /// Feature cache budget in bytes.
    pub feature_cache_bytes: Option<usize>,
    /// Decode pool size.
    pub decode_threads: Option<usize>,
    /// The bound path (K/V stay on the device).
    pub io_binding: Option<bool>,
}

impl From<EngineSettings> for EngineOverrides {
    /// Every setting given.
    fn from(settings: EngineSettings) -> Self {
        EngineOverrides {
            max_batch_size: Some(settings.batch.max_batch),
            max_batch_delay: Some(settings.batch.max_delay),
            max_queue: Some(settings.batch.max_queue),
            feature_cache_bytes: Some(settings.feature_cache_bytes),
            decode_threads: Some(settings.decode_threads),
            io_binding: Some(settings.batch.io_binding),
        }
    }
}

impl EngineOverrides {
    /// The settings for a CPU or GPU with these overrides applied.
    pub fn resolve(&self, gpu: bool) -> EngineSettings {
        let mut settings = EngineSettings::for_device(gpu);
        let batch = &mut settings.batch;
        batch.max_batch = self.max_batch_size.unwrap_or(batch.max_batch);
        batch.max_delay = self.max_batch_delay.unwrap_or(batch.max_delay);
        batch.max_queue = self.max_queue.unwrap_or(batch.max_queue);
        batch.io_binding = self.io_binding.unwrap_or(batch.io_binding);
        settings.feature_cache_bytes = self
            .feature_cache_bytes
            .unwrap_or(settings.feature_cache_bytes);
        settings.decode_threads = self.decode_threads.unwrap_or(settings.decode_threads);
        settings
    }
}

/// The admin API's listener and access.
#[derive(Clone)]
pub struct AdminConfig {
    /// Where it listens.
    pub listen: SocketAddr,
    /// The bearer token it requires, if any.
    pub token: Option<String>,
    /// Folders besides the repository that LoadAdapter may read.
    pub allow_roots: Vec<PathBuf>,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("allow_roots", &self.allow_roots)
            .finish()
    }
}

/// A setting that does not validate.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

/// The demo repository: `models/demo` under the working directory, else under the source
/// tree this binary was built from.
pub fn default_repository() -> PathBuf {
    let local = PathBuf::from("models/demo");
    if local.is_dir() {
        local
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo")
    }
}

impl ModelArgs {
    /// Validated model settings.
    pub fn resolve(self) -> Result<ModelConfig, ConfigError> {
        Ok(ModelConfig {
            repository: self.repository.unwrap_or_else(default_repository),
            device: self
                .device
                .as_deref()
                .unwrap_or("cpu")
                .parse()
                .map_err(ConfigError)?,
            onnxruntime_lib: self.onnxruntime_lib,
            allowed_variants: self.allow_backbone_variants,
            backbone_precision: self
                .backbone_precision
                .as_deref()
                .map_or(Ok(BackbonePrecision::Auto), str::parse)
                .map_err(ConfigError)?,
            threads: Threads {
                intra_op: self.intra_op_threads.unwrap_or(0),
                inter_op: self.inter_op_threads.unwrap_or(0),
            },
        })
    }
}

/// Whether a flag was given: clap leaves an absent option `None`, an absent switch
/// `false` and an absent list empty.
fn given(value: &Value) -> bool {
    !(value.is_null()
        || *value == Value::Bool(false)
        || value.as_array().is_some_and(Vec::is_empty))
}

fn fields(args: &ServeArgs) -> Map<String, Value> {
    match serde_json::to_value(args) {
        Ok(Value::Object(fields)) => fields,
        _ => unreachable!("ServeArgs serialises to an object"),
    }
}

impl ServeArgs {
    /// These settings laid over the config file's, when there is one.
    fn over_file(self) -> Result<ServeArgs, ConfigError> {
        let Some(path) = &self.config else {
            return Ok(self);
        };
        let shown = path.display();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {shown}: {e}")))?;
        let table: toml::Table =
            toml::from_str(&text).map_err(|e| ConfigError(format!("{shown}: {e}")))?;
        let mut merged = fields(&ServeArgs::default());
        for key in table.keys() {
            if !merged.contains_key(key) {
                return Err(ConfigError(format!(
                    "{shown}: unknown field `{key}`: the keys are the `serve` flags in \
                     snake_case ({})",
                    merged.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
        }
        let file: ServeArgs =
            toml::from_str(&text).map_err(|e| ConfigError(format!("{shown}: {e}")))?;
        merged.extend(fields(&file));
        merged.extend(fields(&self).into_iter().filter(|(_, v)| given(v)));
        serde_json::from_value(Value::Object(merged))
            .map_err(|e| ConfigError(format!("{shown}: {e}")))
    }
}

fn address(field: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|e| {
        ConfigError(format!(
            "{field} {value:?} is not an address like 127.0.0.1:50051: {e}"
        ))
    })
}

impl ServeArgs {
    /// Merges flags, environment and config file into validated settings.
    pub fn resolve(self) -> Result<ServeConfig, ConfigError> {
        let args = self.over_file()?;
        let models = args.models.resolve()?;
        let grpc_listen = address(
            "grpc_listen",
            &args.grpc_listen.unwrap_or_else(|| "127.0.0.1:50051".into()),
        )?;
        let metrics = args
            .metrics_listen
            .unwrap_or_else(|| "127.0.0.1:9464".into());
        let metrics_listen = match metrics.as_str() {
            "off" | "" => None,
            a => Some(address("metrics_listen", a)?),
        };
        let defaults = GrpcSettings::default();
        let limits_default = Limits::default();
        let grpc = GrpcSettings {
            max_message_bytes: args.max_message_bytes.unwrap_or(defaults.max_message_bytes),
            max_in_flight: args.max_in_flight.unwrap_or(defaults.max_in_flight),
            drain_timeout: defaults.drain_timeout,
            tls: None,
        };
        if grpc.max_message_bytes < 1024 {
            return Err(ConfigError(format!(
                "max_message_bytes {} is too small to carry an image",
                grpc.max_message_bytes
            )));
        }
        if grpc.max_in_flight == 0 {
            return Err(ConfigError("max_in_flight must be at least 1".into()));
        }
        let limits = Limits {
            max_pixels: args.max_pixels.unwrap_or(limits_default.max_pixels),
            max_frames: args.max_frames.unwrap_or(limits_default.max_frames),
            max_frame_bytes: args
                .max_frame_bytes
                .unwrap_or(limits_default.max_frame_bytes),
        };
        if limits.max_pixels == 0 || limits.max_frames == 0 || limits.max_frame_bytes == 0 {
            return Err(ConfigError(
                "max_pixels, max_frames and max_frame_bytes must be at least 1".into(),
            ));
        }
        let admin_listen = args
            .admin_listen
            .unwrap_or_else(|| "127.0.0.1:50052".into());
        let admin = match admin_listen.as_str() {
            "off" | "" => None,
            a => {
                let token = match args.admin_token_file {
                    Some(path) => {
                        let text = std::fs::read_to_string(&path).map_err(|e| {
                            ConfigError(format!("admin_token_file {}: {e}", path.display()))
                        })?;
                        let token = text.trim().to_string();
                        if token.is_empty() {
                            return Err(ConfigError(format!(
                                "admin_token_file {} is empty",
                                path.display()
                            )));
                        }
                        Some(token)
                    }
                    None => None,
                };
                let allow_roots = args.admin_allow_roots;
                Some(AdminConfig {
                    listen: address("admin_listen", a)?,
                    token,
                    allow_roots,
                })
            }
        };
        let tls = match (args.tls_cert, args.tls_key, args.tls_client_ca) {
            (Some(cert), Some(key), client_ca) => Some(crate::tls::TlsFiles {
                cert,
                key,
                client_ca,
            }),
            (None, None, None) => None,
            _ => {
                return Err(ConfigError(
                    "TLS needs both tls_cert and tls_key (tls_client_ca adds mutual TLS)".into(),
                ));
            }
        };
        // Whoever reaches the admin API can change what is served: off loopback it must
        // authenticate its callers, by bearer token or by client certificate.
        if let Some(admin) = &admin
            && !admin.listen.ip().is_loopback()
            && admin.token.is_none()
            && tls.as_ref().is_none_or(|t| t.client_ca.is_none())
        {
            return Err(ConfigError(format!(
                "admin_listen {} is not a loopback address, so the admin API must authenticate \
                 its callers: set admin_token_file, or mutual TLS (tls_cert, tls_key and \
                 tls_client_ca), or listen on 127.0.0.1",
                admin.listen
            )));
        }
        let require_signatures = args.require_signatures;
        let trust = match args.trusted_keys {
            Some(path) => {
                Some(crate::signing::Trust::load(&path, require_signatures).map_err(ConfigError)?)
            }
            None if require_signatures => {
                return Err(ConfigError(
                    "require_signatures needs trusted_keys: the public keys signatures must verify against".into(),
                ));
            }
            None => None,
        };
        let max_adapters = args.max_adapters;
        if max_adapters == Some(0) {
            return Err(ConfigError("max_adapters must be at least 1".into()));
        }
        let watch = args.watch_interval.unwrap_or(0.0);
        if !(watch >= 0.0 && watch.is_finite()) {
            return Err(ConfigError(format!(
                "watch_interval {watch} is not a number of seconds"
            )));
        }
        let watch_interval = (watch > 0.0).then(|| std::time::Duration::from_secs_f64(watch));
        let positive = |name: &str, v: Option<usize>| match v {
            Some(0) => Err(ConfigError(format!("{name} must be at least 1"))),
            v => Ok(v),
        };
        let seconds = |name: &str, v: Option<f64>| match v {
            Some(s) if !(s >= 0.0 && s.is_finite()) => Err(ConfigError(format!(
                "{name} {s} is not a number of {}",
                if name.ends_with("_ms") {
                    "milliseconds"
                } else {
                    "seconds"
                }
            ))),
            v => Ok(v),
        };
        let engine = EngineOverrides {
            max_batch_size: positive("max_batch_size", args.max_batch_size)?,
            max_batch_delay: seconds("max_batch_delay_ms", args.max_batch_delay_ms)?
                .map(|ms| Duration::from_secs_f64(ms / 1e3)),
            max_queue: positive("max_queue", args.max_queue)?,
            feature_cache_bytes: args.feature_cache_bytes,
            decode_threads: positive("decode_threads", args.decode_threads)?,
            io_binding: args.io_binding,
        };
        let grpc = GrpcSettings {
            drain_timeout: seconds("drain_timeout", args.drain_timeout)?
                .map_or(grpc.drain_timeout, Duration::from_secs_f64),
            ..grpc
        };
        Ok(ServeConfig {
            engine,
            models,
            grpc_listen,
            metrics_listen,
            grpc,
            limits,
            admin,
            tls,
            trust,
            max_adapters,
            watch_interval,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("fptserve.toml");
        std::fs::write(
            &file,
            "grpc_listen = \"0.0.0.0:6000\"\nmax_in_flight = 3\nmetrics_listen = \"off\"\n\
             intra_op_threads = 3\nrequire_signatures = false\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file.clone()),
            max_in_flight: Some(7),
            ..ServeArgs::default()
        };
        let config = args.resolve().unwrap();
        assert_eq!(config.grpc_listen, "0.0.0.0:6000".parse().unwrap());
        assert_eq!(config.grpc.max_in_flight, 7);
        assert_eq!(config.metrics_listen, None);
        assert_eq!(config.grpc.max_message_bytes, 256 << 20);
        assert_eq!(config.models.device, Device::Cpu);
        assert_eq!(config.models.threads.intra_op, 3);

        std::fs::write(&file, "grpc_listn = \"x\"\n").unwrap();
        let err = ServeArgs {
            config: Some(file),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap_err();
        assert!(
            err.to_string().contains("unknown field `grpc_listn`"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_are_refused_before_binding() {
        let bad = |args: ServeArgs| args.resolve().unwrap_err().to_string();
        assert!(
            bad(ServeArgs {
                grpc_listen: Some("localhost".into()),
                ..ServeArgs::default()
            })
            .contains("not an address")
        );
        assert!(
            bad(ServeArgs {
                max_in_flight: Some(0),
                ..ServeArgs::default()
            })
            .contains("at least 1")
        );
    }
}
