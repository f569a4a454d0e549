//! The model repository on disk:
//!
//! ```text
//! <repository>/
//!   backbones/<backbone-name>/manifest.json + backbone.onnx
//!   tasks/<task-name>/<version>/manifest.json + side.onnx
//! ```
//!
//! Everything is checked when loaded (manifest schema, SHA-256, graph interface, the
//! adapter against its backbone). A model that fails is reported and skipped; the rest
//! serve.

pub mod manifest;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::model::adapter::Adapter;
use crate::model::backbone::Backbone;
use crate::registry::Snapshot;
use crate::runtime::Runtime;

/// The repository itself is unusable.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    /// The folder is missing or lacks `backbones/`.
    #[error("{path} is not a model repository: {reason}")]
    NotARepository {
        /// The folder.
        path: PathBuf,
        /// What is missing.
        reason: String,
    },
}

/// A model that was skipped, and why.
#[derive(Debug, Clone)]
pub struct LoadFailure {
    /// Its folder.
    pub path: PathBuf,
    /// The full reason.
    pub error: String,
}

/// What loading a repository produced.
pub struct Loaded {
    /// The models that loaded.
    pub snapshot: Snapshot,
    /// The models that did not.
    pub failures: Vec<LoadFailure>,
}

/// Sub-folders of `dir`, sorted, without hidden ones.
pub(crate) fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    dirs.sort();
    dirs
}

/// Every adapter folder under `<repository>/tasks/` whose manifest reads, with it.
pub fn adapter_folders(repository: &Path) -> Vec<(PathBuf, manifest::AdapterManifest)> {
    subdirs(&repository.join("tasks"))
        .iter()
        .flat_map(|task| subdirs(task))
        .filter_map(|dir| manifest::AdapterManifest::read(&dir).ok().map(|m| (dir, m)))
        .collect()
}

fn folder_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Loads every backbone and adapter under `root`.
pub fn load(root: &Path, runtime: &Runtime) -> Result<Loaded, RepositoryError> {
    let backbones_dir = root.join("backbones");
    if !backbones_dir.is_dir() {
        return Err(RepositoryError::NotARepository {
            path: root.to_path_buf(),
            reason: "no backbones/ folder".into(),
        });
    }
    let mut failures = Vec::new();
    let mut fail = |path: &Path, error: String| {
        tracing::error!(path = %path.display(), %error, "model skipped");
        failures.push(LoadFailure {
            path: path.to_path_buf(),
            error,
        });
    };

    let mut backbones: Vec<Arc<Backbone>> = Vec::new();
    for dir in subdirs(&backbones_dir) {
        match Backbone::load(&dir, runtime) {
            Ok(b) if b.identity().name != folder_name(&dir) => fail(
                &dir,
                format!(
                    "manifest name {:?} differs from the folder name",
                    b.identity().name
                ),
            ),
            Ok(b) => {
                tracing::info!(backbone = %b.identity().name, sha256 = %manifest::short(&b.identity().sha256), "backbone loaded");
                backbones.push(Arc::new(b));
            }
            Err(e) => fail(&dir, e.to_string()),
        }
    }

    let mut adapters: Vec<Arc<Adapter>> = Vec::new();
    for task_dir in subdirs(&root.join("tasks")) {
        for dir in subdirs(&task_dir) {
            match Adapter::load(&dir, runtime, &backbones) {
                Ok(a) if a.task() != folder_name(&task_dir) || a.version() != folder_name(&dir) => {
                    fail(
                        &dir,
                        format!(
                            "manifest says {}@{}, which differs from the folder path",
                            a.task(),
                            a.version()
                        ),
                    )
                }
                Ok(a) => {
                    tracing::info!(
                        task = a.task(),
                        version = a.version(),
                        classes = a.classes().len(),
                        "adapter loaded"
                    );
                    adapters.push(Arc::new(a));
                }
                Err(e) => fail(&dir, e.to_string()),
            }
        }
    }
    Ok(Loaded {
        snapshot: Snapshot::new(backbones, adapters),
        failures,
    })
}
