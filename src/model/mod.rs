//! The two kinds of ONNX model FPT+ exports: the shared [`backbone`] and per-task
//! [`adapter`]s (side networks), each an ONNX Runtime session checked against its
//! manifest when loaded.

pub mod adapter;
pub mod backbone;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{TensorElementType, ValueType};
use sha2::{Digest, Sha256};

use crate::repository::manifest::{ManifestError, TensorSpec};
use crate::runtime::{Device, Memory, Runtime};

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The manifest is missing or invalid.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The ONNX file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The ONNX file is not the one the manifest describes.
    #[error("{path}: SHA-256 is {actual}, but the manifest says {expected}")]
    Digest {
        /// The file.
        path: PathBuf,
        /// From the manifest.
        expected: String,
        /// Of the bytes on disk.
        actual: String,
    },
    /// ONNX Runtime refused the model.
    #[error("{path}: ONNX Runtime cannot load it: {message}")]
    Session {
        /// The file.
        path: PathBuf,
        /// ONNX Runtime's message.
        message: String,
    },
    /// The graph's inputs or outputs differ from the manifest's.
    #[error("{path}: the graph does not match its manifest: {}", problems.join("; "))]
    Interface {
        /// The file.
        path: PathBuf,
        /// Every difference.
        problems: Vec<String>,
    },
    /// The adapter's signature is missing (when required) or does not verify.
    #[error(transparent)]
    Signature(#[from] crate::signing::SignatureError),
    /// An adapter does not fit any loaded backbone.
    #[error("{path}: {}", problems.join("; "))]
    Incompatible {
        /// The adapter folder.
        path: PathBuf,
        /// Every mismatch, naming the field.
        problems: Vec<String>,
    },
    /// An adapter folder inside the repository's tasks/ is not `tasks/<task>/<version>`.
    #[error("{path}: manifest says {task}@{version}, which differs from the folder path")]
    Misplaced {
        /// The adapter folder.
        path: PathBuf,
        /// Task of the manifest.
        task: String,
        /// Version of the manifest.
        version: String,
    },
    /// A run failed.
    #[error("inference failed in {model}: {message}")]
    Inference {
        /// The model.
        model: String,
        /// ONNX Runtime's message.
        message: String,
    },
}

/// Reads an ONNX file named by a manifest and checks its SHA-256.
pub(crate) fn read_verified(dir: &Path, file: &str, sha256: &str) -> Result<Vec<u8>, ModelError> {
    // The manifest names a file inside its own folder, never a path elsewhere.
    if file.contains(['/', '\\']) || file.starts_with('.') {
        return Err(ModelError::Interface {
            path: dir.to_path_buf(),
            problems: vec![format!("file {file:?} must be a plain file name")],
        });
    }
    let path = dir.join(file);
    let bytes = std::fs::read(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    let actual = hex::encode(Sha256::digest(&bytes));
    if actual != sha256 {
        return Err(ModelError::Digest {
            path,
            expected: sha256.to_string(),
            actual,
        });
    }
    Ok(bytes)
}

fn dtype_name(ty: &TensorElementType) -> &'static str {
    match ty {
        TensorElementType::Float32 => "float32",
        TensorElementType::Float16 => "float16",
        TensorElementType::Int64 => "int64",
        _ => "other",
    }
}

/// Compares a session's graph with the manifest's tensor specs. Inputs must match
/// exactly; outputs the manifest names must exist (extra graph outputs are ignored so the
/// interface can grow).
fn check_interface(
    session: &Session,
    inputs: &[TensorSpec],
    outputs: &[TensorSpec],
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut compare = |kind: &str, outlets: &[ort::value::Outlet], spec: &TensorSpec| match outlets
        .iter()
        .find(|o| o.name() == spec.name)
    {
        None => problems.push(format!("graph has no {kind} named {}", spec.name)),
        Some(o) => match o.dtype() {
            ValueType::Tensor { ty, shape, .. } => {
                if dtype_name(ty) != spec.dtype {
                    problems.push(format!(
                        "{kind} {} is {} in the graph, {} in the manifest",
                        spec.name,
                        dtype_name(ty),
                        spec.dtype
                    ));
                }
                let graph: Vec<i64> = shape.iter().copied().collect();
                if graph != spec.shape {
                    problems.push(format!(
                        "{kind} {} has shape {graph:?} in the graph, {:?} in the manifest",
                        spec.name, spec.shape
                    ));
                }
            }
            other => problems.push(format!("{kind} {} is not a tensor: {other:?}", spec.name)),
        },
    };
    for spec in inputs {
        compare("input", session.inputs(), spec);
    }
    for spec in outputs {
        compare("output", session.outputs(), spec);
    }
    let known: Vec<&str> = inputs.iter().map(|s| s.name.as_str()).collect();
    for input in session.inputs() {
        if !known.contains(&input.name()) {
            problems.push(format!(
                "graph input {} is not in the manifest",
                input.name()
            ));
        }
    }
    problems
}

/// Host memory, where bound outputs the request path reads (logits) are put.
pub(crate) fn host_memory() -> ort::Result<MemoryInfo<'static>> {
    MemoryInfo::new(
        AllocationDevice::CPU,
        0,
        AllocatorType::Device,
        MemoryType::Default,
    )
}

/// An ONNX Runtime session behind a mutex: `ort` runs take `&mut Session`.
///
/// The lock is held only for one run; nothing else (in particular not the adapter
/// registry) is locked while it is held.
pub(crate) struct Model {
    session: Mutex<Session>,
    path: PathBuf,
    /// Where its session runs (CPU when CUDA was asked for but failed to start).
    device: Device,
    /// It has run once: ONNX Runtime's first-run set-up is paid.
    warm: AtomicBool,
}

impl Model {
    pub(crate) fn load(
        runtime: &Runtime,
        dir: &Path,
        file: &str,
        sha256: &str,
        inputs: &[TensorSpec],
        outputs: &[TensorSpec],
        memory: Memory,
    ) -> Result<Self, ModelError> {
        let bytes = read_verified(dir, file, sha256)?;
        let path = dir.join(file);
        let session = runtime
            .session(&bytes, &path.display().to_string(), memory)
            .map_err(|e| ModelError::Session {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let problems = check_interface(&session, inputs, outputs);
        if !problems.is_empty() {
            return Err(ModelError::Interface { path, problems });
        }
        Ok(Model {
            session: Mutex::new(session),
            path,
            device: runtime.device(),
            warm: AtomicBool::new(false),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Session> {
        // A panic inside a run leaves the session itself intact (ONNX Runtime owns
        // its state), so a poisoned lock is still safe to use.
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The memory its execution provider computes in: where bound outputs stay (device
    /// memory under CUDA, host memory on the CPU).
    pub(crate) fn device_memory(&self) -> ort::Result<MemoryInfo<'static>> {
        match self.device {
            Device::Cuda(ordinal) => MemoryInfo::new(
                AllocationDevice::CUDA,
                ordinal,
                AllocatorType::Device,
                MemoryType::Default,
            ),
            Device::Cpu => host_memory(),
        }
    }

    /// Marks the model warm: a warm-up run succeeded.
    pub(crate) fn set_warm(&self) {
        self.warm.store(true, Ordering::Relaxed);
    }

    /// Called before a request's run of a model of `kind`: a model nothing warmed pays
    /// ONNX Runtime's first-run set-up in this request, which is counted.
    pub(crate) fn request_run(&self, kind: &'static str) {
        // a plain load first: every request passes here, and a swap would write the
        // shared cache line each time
        if !self.warm.load(Ordering::Relaxed) && !self.warm.swap(true, Ordering::Relaxed) {
            crate::metrics::cold_run(kind);
        }
    }

    pub(crate) fn inference_error(&self, e: impl std::fmt::Display) -> ModelError {
        ModelError::Inference {
            model: self.path.display().to_string(),
            message: e.to_string(),
        }
    }
}
