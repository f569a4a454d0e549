//! The model repository on disk:
//!
//! ```text
//! <repository>/
//!   backbones/<backbone-name>/manifest.json + backbone.onnx
//!   tasks/<task-name>/<version>/manifest.json + side.onnx
//! ```
//!
//! This module knows the layout and the manifests ([`manifest`]); loading and checking
//! the models in it is [`crate::lifecycle`]'s work. A model that fails is reported and
//! skipped; the rest serve.

pub mod manifest;

use std::path::{Path, PathBuf};

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

/// Every adapter folder, `<repository>/tasks/<task>/<version>/`, sorted.
pub fn task_folders(repository: &Path) -> Vec<PathBuf> {
    subdirs(&repository.join("tasks"))
        .iter()
        .flat_map(|task| subdirs(task))
        .collect()
}

/// Every adapter folder under `<repository>/tasks/` whose manifest reads, with it.
pub fn adapter_folders(repository: &Path) -> Vec<(PathBuf, manifest::AdapterManifest)> {
    task_folders(repository)
        .into_iter()
        .filter_map(|dir| manifest::AdapterManifest::read(&dir).ok().map(|m| (dir, m)))
        .collect()
}

/// Every backbone folder, `<repository>/backbones/<name>/`, sorted. A folder without
/// `backbones/` is not a repository.
pub fn backbone_folders(root: &Path) -> Result<Vec<PathBuf>, RepositoryError> {
    let backbones = root.join("backbones");
    if !backbones.is_dir() {
        return Err(RepositoryError::NotARepository {
            path: root.to_path_buf(),
            reason: "no backbones/ folder".into(),
        });
    }
    Ok(subdirs(&backbones))
}
