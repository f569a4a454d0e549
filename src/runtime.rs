//! ONNX Runtime: locating the shared library, the one process-wide environment, and
//! session options for the chosen device.
//!
//! `ort` is built with `load-dynamic`, so the library is opened at run time. It is found,
//! in order, at: the explicit `--onnxruntime-lib` path, `ORT_DYLIB_PATH`, the copy that
//! `tools/fetch-onnxruntime.sh` put under `.ort/` in the source tree (its path is compiled
//! in), `lib/` next to the executable, then the system loader's search path.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use ort::environment::GlobalThreadPoolOptions;
use ort::ep::{self, ExecutionProvider};
use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};

/// The ONNX Runtime release this build is tested against (PyPI `onnxruntime` wheel).
pub const ONNXRUNTIME_VERSION: &str = "1.32.0";
const LIBRARY_FILE: &str = "libonnxruntime.so.1.32.0";

/// Where inference runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// ONNX Runtime's CPU execution provider.
    Cpu,
    /// The CUDA execution provider on the given GPU ordinal.
    Cuda(i32),
}

impl FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<i32>) {
                Some(Ok(n)) if n >= 0 => Ok(Device::Cuda(n)),
                _ => Err(format!("unknown device {s:?}: use cpu, cuda or cuda:N")),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Failure to bring up ONNX Runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No candidate path held the library.
    #[error(
        "ONNX Runtime library not found (looked at: {0}); run tools/fetch-onnxruntime.sh or pass --onnxruntime-lib"
    )]
    NotFound(String),
    /// The library was found but could not be loaded or initialised.
    #[error("cannot initialise ONNX Runtime from {path}: {message}")]
    Init {
        /// The library path.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// Thread settings for ONNX Runtime: one pool per process, shared by every session.
///
/// Per-session pools (ONNX Runtime's default) would give each of a hundred adapters its own
/// threads, each spinning after its run, all competing for the same cores.
#[derive(Clone, Copy, Debug)]
pub struct Threads {
    /// Threads inside one operator (0 = ONNX Runtime's default: one per core).
    pub intra_op: usize,
    /// Threads across independent operators.
    pub inter_op: usize,
}

/// Where a CPU session's working memory (activations) comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Memory {
    /// Its own ONNX Runtime arena, kept at its peak for the session's lifetime: one large
    /// model run over and over (the backbone). Without ONNX Runtime's memory pattern: the
    /// pattern is planned on the first run and allocated as one more block on the second,
    /// beside the arena chunks the first run left (ViT-B/16 at 512, Python, same options:
    /// resident 1212 MiB after one run, 1628 MiB after two with the pattern, 1212 without).
    /// The arena is what keeps the backbone at ONNX Runtime's full speed: without it the
    /// same model ran 1.33x slower (each run's 50 MB attention buffers become fresh mappings
    /// that the kernel zero-fills) while holding 530 instead of 813-897 MiB. An arena that
    /// grows only as requested held 754-834 MiB, within the run-to-run spread; glibc keeping
    /// large blocks instead of the arena held more (2-core Xeon, two runs of
    /// benches/ort_options.py, BENCHMARKS.md case 10).
    Arena,
    /// The process allocator, given back after every run: many small models (adapters)
    /// then share one pool instead of each holding its own peak (full-size adapters,
    /// RSS after serving each once: 10.9 MiB per adapter with arenas, 9.7 MiB without).
    /// What an adapter then holds is its weights plus about 1.3 MiB of ONNX Runtime graph,
    /// kernels and plan, the same at any width (benches/ort_options.py on the demo adapter).
    Shared,
}

/// An initialised ONNX Runtime plus the device sessions are created for.
pub struct Runtime {
    environment: ort::environment::Environment,
    library: PathBuf,
    requested: Device,
    /// Cleared when CUDA failed once, so later sessions go straight to the CPU.
    cuda_usable: AtomicBool,
    /// Which adapter signatures are accepted, if any are checked.
    trust: Option<crate::signing::Trust>,
}

static ENVIRONMENT: OnceLock<Result<(PathBuf, ort::environment::Environment), String>> =
    OnceLock::new();

fn candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Some(p) = explicit {
        paths.push(p.to_path_buf());
        return paths;
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        paths.push(PathBuf::from(p));
    }
    paths.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(".ort")
            .join(ONNXRUNTIME_VERSION)
            .join(LIBRARY_FILE),
    );
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        paths.push(dir.join("lib").join(LIBRARY_FILE));
        paths.push(dir.join("../lib").join(LIBRARY_FILE));
    }
    paths
}

/// Loads ONNX Runtime once per process and returns the library path in use.
///
/// ONNX Runtime allows one environment per process, so later calls (tests start several
/// servers in one process) reuse the first one, whatever path and threads they ask for.
pub fn init_library(
    explicit: Option<&Path>,
    threads: Threads,
) -> Result<(PathBuf, ort::environment::Environment), RuntimeError> {
    let result = ENVIRONMENT.get_or_init(|| {
        let tried = candidates(explicit);
        let path = tried
            .iter()
            .find(|p| p.is_file())
            .cloned()
            // Last resort: let the dynamic loader search its usual paths.
            .unwrap_or_else(|| PathBuf::from("libonnxruntime.so"));
        let builder = ort::init_from(&path).map_err(|e| {
            let looked: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
            format!("{e} (looked at: {})", looked.join(", "))
        })?;
        // after init_from: the options live in the library it loads
        let pool = GlobalThreadPoolOptions::default()
            .with_intra_threads(threads.intra_op)
            .and_then(|p| p.with_inter_threads(threads.inter_op))
            .map_err(|e| e.to_string())?;
        let env = builder
            .with_name("fptserve")
            .with_global_thread_pool(pool)
            .build()
            .map_err(|e| e.to_string())?;
        Ok((path, env))
    });
    match result {
        Ok((path, env)) => Ok((path.clone(), env.clone())),
        Err(message) => Err(RuntimeError::Init {
            path: explicit.map(Path::to_path_buf).unwrap_or_default(),
            message: message.clone(),
        }),
    }
}

impl Runtime {
    /// Loads the library and prepares session options for `device`.
    pub fn new(
        library: Option<&Path>,
        device: Device,
        threads: Threads,
    ) -> Result<Self, RuntimeError> {
        let (library, environment) = init_library(library, threads)?;
        let cuda_usable = match device {
            Device::Cpu => false,
            Device::Cuda(_) => match ep::CUDA::is_available() {
                Ok(true) => true,
                Ok(false) | Err(_) => {
                    tracing::warn!(
                        library = %library.display(),
                        "CUDA requested but this ONNX Runtime build has no CUDA execution provider \
                         (install the onnxruntime-gpu wheel's library); falling back to CPU"
                    );
                    false
                }
            },
        };
        Ok(Runtime {
            environment,
            library,
            requested: device,
            cuda_usable: AtomicBool::new(cuda_usable),
            trust: None,
        })
    }

    /// The library file in use.
    pub fn library(&self) -> &Path {
        &self.library
    }

    /// Checks adapter signatures against `trust` on every adapter load.
    pub fn with_trust(mut self, trust: Option<crate::signing::Trust>) -> Self {
        self.trust = trust;
        self
    }

    /// The adapter signature policy, if signatures are checked.
    pub fn trust(&self) -> Option<&crate::signing::Trust> {
        self.trust.as_ref()
    }

    /// The device asked for on the command line.
    pub fn requested_device(&self) -> Device {
        self.requested
    }

    /// The device sessions actually run on (CPU after a CUDA fallback).
    pub fn device(&self) -> Device {
        match self.requested {
            Device::Cuda(n) if self.cuda_usable.load(Ordering::Relaxed) => Device::Cuda(n),
            _ => Device::Cpu,
        }
    }

    fn builder(&self) -> ort::Result<SessionBuilder> {
        // ORT_ENABLE_ALL, ONNX Runtime's own default (the crate's Level3 stops at layout).
        Ok(Session::builder(&self.environment)?
            .with_optimization_level(GraphOptimizationLevel::All)?)
    }

    /// Creates a session from an in-memory model, on the runtime's device.
    ///
    /// When the CUDA provider cannot start (no driver, missing CUDA libraries), the failure
    /// is logged once and this and every later session runs on the CPU.
    pub fn session(&self, model: &[u8], name: &str, memory: Memory) -> ort::Result<Session> {
        if let Device::Cuda(ordinal) = self.device() {
            let cuda = ep::CUDA::default()
                .with_device_id(ordinal)
                .build()
                .error_on_failure();
            match self
                .builder()?
                .with_execution_providers([cuda])
                .map_err(|e| -> ort::Error { e.into() })
                .and_then(|mut b| b.commit_from_memory(model))
            {
                Ok(session) => return Ok(session),
                Err(e) => {
                    tracing::warn!(model = name, error = %e, "CUDA execution provider failed to start; falling back to CPU");
                    self.cuda_usable.store(false, Ordering::Relaxed);
                }
            }
        }
        let builder = self.builder()?;
        let mut builder = match memory {
            Memory::Arena => builder.with_memory_pattern(false)?,
            Memory::Shared => builder
                .with_memory_pattern(false)?
                .with_execution_providers([ep::CPU::default()
                    .with_arena_allocator(false)
                    .build()
                    .error_on_failure()])
                .map_err(|e| -> ort::Error { e.into() })?,
        };
        builder.commit_from_memory(model)
    }
}
