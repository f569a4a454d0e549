//! One consistent set of loaded models: what a request sees from start to end.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::model::adapter::Adapter;
use crate::model::backbone::Backbone;

/// Why a task reference in a request does not resolve.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// No task of that name is loaded.
    #[error("unknown task {0:?}")]
    UnknownTask(String),
    /// The task exists but not that version.
    #[error("task {task:?} has no version {version:?} (loaded: {})", available.join(", "))]
    UnknownVersion {
        /// Task name.
        task: String,
        /// Requested version.
        version: String,
        /// Loaded versions.
        available: Vec<String>,
    },
    /// The reference is empty or malformed.
    #[error("invalid task reference {0:?}: use \"name\" or \"name@version\"")]
    Malformed(String),
}

/// All loaded versions of one task.
pub struct Task {
    /// Oldest first.
    versions: Vec<Arc<Adapter>>,
    default: usize,
}

impl Task {
    /// Loaded versions, oldest first.
    pub fn versions(&self) -> &[Arc<Adapter>] {
        &self.versions
    }

    /// The version an unpinned request gets.
    pub fn default_version(&self) -> &Arc<Adapter> {
        &self.versions[self.default]
    }
}

/// Orders versions so that "2" < "10" and "1.2" < "1.10": dot-separated parts compare
/// numerically when both are numbers, as text otherwise.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let mut left = a.split('.');
    let mut right = b.split('.');
    loop {
        match (left.next(), right.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => {
                let ord = match (x.parse::<u64>(), y.parse::<u64>()) {
                    (Ok(m), Ok(n)) => m.cmp(&n),
                    _ => x.cmp(y),
                };
                if ord != Ordering::Equal {
                    return ord;
                }
            }
        }
    }
}

/// One consistent set of backbones and task adapters.
#[derive(Default)]
pub struct Snapshot {
    backbones: Vec<Arc<Backbone>>,
    tasks: BTreeMap<String, Task>,
}

impl Snapshot {
    /// Builds a snapshot; each task's default is its newest version.
    pub fn new(backbones: Vec<Arc<Backbone>>, adapters: Vec<Arc<Adapter>>) -> Self {
        Self::with_defaults(backbones, adapters, &BTreeMap::new())
    }

    /// Builds a snapshot; a task's default is the version `defaults` names when it is
    /// loaded, else its newest version.
    pub fn with_defaults(
        backbones: Vec<Arc<Backbone>>,
        adapters: Vec<Arc<Adapter>>,
        defaults: &BTreeMap<String, String>,
    ) -> Self {
        let mut grouped: BTreeMap<String, Vec<Arc<Adapter>>> = BTreeMap::new();
        for adapter in adapters {
            grouped
                .entry(adapter.task().to_string())
                .or_default()
                .push(adapter);
        }
        let tasks = grouped
            .into_iter()
            .map(|(name, mut versions)| {
                versions.sort_by(|a, b| compare_versions(a.version(), b.version()));
                let default = defaults
                    .get(&name)
                    .and_then(|v| versions.iter().position(|a| a.version() == v))
                    .unwrap_or(versions.len() - 1);
                (name, Task { versions, default })
            })
            .collect();
        Snapshot { backbones, tasks }
    }

    /// Loaded backbones.
    pub fn backbones(&self) -> &[Arc<Backbone>] {
        &self.backbones
    }

    /// Loaded tasks by name.
    pub fn tasks(&self) -> &BTreeMap<String, Task> {
        &self.tasks
    }

    /// Every loaded adapter.
    pub fn adapters(&self) -> impl Iterator<Item = &Arc<Adapter>> {
        self.tasks.values().flat_map(|t| t.versions.iter())
    }

    /// The loaded `task@version`, if any.
    pub fn adapter(&self, task: &str, version: &str) -> Option<&Arc<Adapter>> {
        self.tasks
            .get(task)?
            .versions
            .iter()
            .find(|a| a.version() == version)
    }

    /// Resolves `name` (default version) or `name@version`.
    pub fn resolve(&self, reference: &str) -> Result<Arc<Adapter>, ResolveError> {
        let (name, version) = match reference.split_once('@') {
            Some((n, v)) if !n.is_empty() && !v.is_empty() => (n, Some(v)),
            Some(_) => return Err(ResolveError::Malformed(reference.to_string())),
            None if reference.is_empty() => {
                return Err(ResolveError::Malformed(reference.to_string()));
            }
            None => (reference, None),
        };
        let task = self
            .tasks
            .get(name)
            .ok_or_else(|| ResolveError::UnknownTask(name.to_string()))?;
        match version {
            None => Ok(task.default_version().clone()),
            Some(v) => task
                .versions
                .iter()
                .find(|a| a.version() == v)
                .cloned()
                .ok_or_else(|| ResolveError::UnknownVersion {
                    task: name.to_string(),
                    version: v.to_string(),
                    available: task
                        .versions
                        .iter()
                        .map(|a| a.version().to_string())
                        .collect(),
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_numerically() {
        let mut v = vec!["10", "2", "1.10", "1.2", "1"];
        v.sort_by(|a, b| compare_versions(a, b));
        assert_eq!(v, ["1", "1.2", "1.10", "2", "10"]);
    }
}
