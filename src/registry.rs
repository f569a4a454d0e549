//! The set of loaded models, published as an immutable [`Snapshot`].
//!
//! A request loads the current snapshot once and uses it to the end, so it sees one
//! consistent set of adapters; an adapter version stays alive (it is an `Arc`) for as
//! long as a request holds it, even after a newer snapshot drops it. The snapshot sits in
//! an `ArcSwap` so that replacing it (the admin API) is one atomic pointer swap: the
//! request path takes no lock here. Changes are serialised by one mutex that only the
//! admin side takes; an unloaded or replaced version is remembered (weakly) so operators
//! can see it drain.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;

use crate::model::adapter::{Adapter, AdapterInfo};
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

/// Why a change to the loaded set was refused. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The task version is not loaded.
    #[error("{task}@{version} is not loaded")]
    NotLoaded {
        /// Task name.
        task: String,
        /// Version.
        version: String,
    },
    /// The task version is loaded with other bytes and replacing was not asked for.
    #[error(
        "{task}@{version} is already loaded with SHA-256 {loaded}; the new one is {new}: \
         load it under a new version, or set replace to swap it"
    )]
    AlreadyLoaded {
        /// Task name.
        task: String,
        /// Version.
        version: String,
        /// SHA-256 of the loaded one.
        loaded: String,
        /// SHA-256 of the new one.
        new: String,
    },
}

/// What happened to an adapter that left the serving set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Departure {
    /// Unloaded by an operator.
    Unloaded,
    /// Replaced by other bytes under the same version.
    Replaced,
    /// Evicted under the memory budget; reloaded when next requested.
    Evicted,
}

/// An adapter that left the serving set; requests that still hold it keep it alive.
#[derive(Clone)]
pub struct Retired {
    /// The adapter while any request still uses it.
    pub adapter: Weak<Adapter>,
    /// What it was, kept after it is gone.
    pub info: AdapterInfo,
    /// Why it left.
    pub departure: Departure,
}

/// A load that failed, as operators see it in ListAdapters.
#[derive(Clone, Debug)]
pub struct Failure {
    /// Task and version, when the manifest said.
    pub task: String,
    /// Version.
    pub version: String,
    /// Where it was loaded from.
    pub path: String,
    /// Why.
    pub error: String,
    /// When (Unix ms).
    pub at_unix_ms: i64,
}

/// Retired and failed entries kept for ListAdapters.
const HISTORY: usize = 256;

type Key = (String, String);

fn key(adapter: &Adapter) -> Key {
    (adapter.task().to_string(), adapter.version().to_string())
}

#[derive(Default)]
struct Changes {
    /// Explicit default versions (SetDefaultVersion, LoadAdapter with make_default).
    defaults: BTreeMap<String, String>,
    /// Never evicted under the budget.
    pinned: BTreeSet<Key>,
    /// Evicted under the budget, reloaded from these folders when next requested.
    evicted: BTreeMap<Key, PathBuf>,
    retired: VecDeque<Retired>,
    failed: VecDeque<Failure>,
}

/// What an insert did.
pub struct Inserted {
    /// The adapter now serving.
    pub adapter: Arc<Adapter>,
    /// It replaced other bytes under the same version.
    pub replaced: bool,
}

/// Loads an adapter folder again (reload on demand after an eviction).
pub type Reloader = Box<dyn Fn(&std::path::Path) -> Result<Arc<Adapter>, String> + Send + Sync>;

/// Holder of the current snapshot.
pub struct Registry {
    current: ArcSwap<Snapshot>,
    changes: Mutex<Changes>,
    budget: Option<Budget>,
}

/// An optional limit on loaded adapters, and how to bring an evicted one back.
pub struct Budget {
    /// Most adapters loaded at once.
    pub max_adapters: usize,
    /// Reloads an evicted adapter's folder.
    pub reload: Reloader,
}

impl Registry {
    /// Starts with `snapshot`.
    pub fn new(snapshot: Snapshot) -> Self {
        Self::export(&Changes::default(), &snapshot);
        Registry {
            current: ArcSwap::from_pointee(snapshot),
            changes: Mutex::default(),
            budget: None,
        }
    }

    /// Starts with `snapshot` under `budget`: beyond it, the least recently used adapters
    /// that are neither pinned nor in use are evicted (and reloaded when requested).
    pub fn with_budget(snapshot: Snapshot, budget: Budget) -> Self {
        let registry = Registry {
            budget: Some(budget),
            ..Registry::new(snapshot)
        };
        {
            let mut changes = registry.changes();
            let adapters = registry.snapshot().adapters().cloned().collect();
            let adapters = registry.enforce_budget(&mut changes, adapters, None);
            registry.publish(&changes, adapters);
        }
        registry
    }

    /// Drops least recently used adapters past the budget. An adapter is in use while a
    /// request holds it (a strong count above the snapshots' own); pinned ones and `keep`
    /// stay; uploaded ones (no folder to reload from) stay.
    fn enforce_budget(
        &self,
        changes: &mut Changes,
        mut adapters: Vec<Arc<Adapter>>,
        keep: Option<&Arc<Adapter>>,
    ) -> Vec<Arc<Adapter>> {
        let Some(budget) = &self.budget else {
            return adapters;
        };
        while adapters.len() > budget.max_adapters {
            let candidate = adapters
                .iter()
                .enumerate()
                .filter(|(_, a)| {
                    !changes.pinned.contains(&key(a))
                        && keep.is_none_or(|k| !Arc::ptr_eq(k, a))
                        && a.reloadable()
                        // this list and the current snapshot hold it; more is a request
                        && Arc::strong_count(a) <= 2
                })
                .min_by_key(|(_, a)| a.last_used_unix_ms())
                .map(|(i, _)| i);
            let Some(i) = candidate else {
                tracing::warn!(
                    loaded = adapters.len(),
                    budget = budget.max_adapters,
                    "over the adapter budget, but every adapter is pinned or in use"
                );
                break;
            };
            let evicted = adapters.swap_remove(i);
            tracing::info!(
                task = evicted.task(),
                version = evicted.version(),
                "adapter evicted (budget)"
            );
            changes
                .evicted
                .insert(key(&evicted), evicted.dir().to_path_buf());
            Self::retire(changes, &evicted, Departure::Evicted);
        }
        adapters
    }

    /// Reloads an evicted task version that `reference` names, when there is one.
    pub fn reload_evicted(&self, reference: &str) -> Option<Result<Arc<Adapter>, String>> {
        let budget = self.budget.as_ref()?;
        let (task, version) = match reference.split_once('@') {
            Some((t, v)) => (t, Some(v)),
            None => (reference, None),
        };
        let folder = {
            let changes = self.changes();
            let version = match version {
                Some(v) => v.to_string(),
                // the explicit default, else the newest evicted version
                None => changes.defaults.get(task).cloned().or_else(|| {
                    changes
                        .evicted
                        .keys()
                        .filter(|(t, _)| t == task)
                        .map(|(_, v)| v.clone())
                        .max_by(|a, b| compare_versions(a, b))
                })?,
            };
            changes.evicted.get(&(task.to_string(), version))?.clone()
        };
        Some((budget.reload)(&folder).and_then(|adapter| {
            self.insert(adapter, false, false, false)
                .map(|i| i.adapter)
                .map_err(|e| e.to_string())
        }))
    }

    /// Whether `task@version` was evicted under the budget from `dir` (and so is known).
    pub fn is_evicted(&self, task: &str, version: &str, dir: &std::path::Path) -> bool {
        self.changes()
            .evicted
            .get(&(task.to_string(), version.to_string()))
            .is_some_and(|d| d == dir)
    }

    /// Whether `task@version` is pinned.
    pub fn is_pinned(&self, task: &str, version: &str) -> bool {
        self.changes()
            .pinned
            .contains(&(task.to_string(), version.to_string()))
    }

    /// The current snapshot; hold it for the whole request.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    fn changes(&self) -> std::sync::MutexGuard<'_, Changes> {
        // every change below is computed first and published last, so a panic cannot
        // leave a half-made change behind the lock
        self.changes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, changes: &Changes, adapters: Vec<Arc<Adapter>>) {
        let backbones = self.current.load().backbones.clone();
        let snapshot = Snapshot::with_defaults(backbones, adapters, &changes.defaults);
        Self::export(changes, &snapshot);
        self.current.store(Arc::new(snapshot));
    }

    /// Sets the adapter and model-size metrics from what is published.
    fn export(changes: &Changes, snapshot: &Snapshot) {
        let failed: BTreeSet<(&str, &str)> = changes
            .failed
            .iter()
            .map(|f| (f.task.as_str(), f.version.as_str()))
            .filter(|(t, v)| snapshot.adapter(t, v).is_none())
            .collect();
        let states = crate::metrics::AdapterStates {
            loaded: snapshot.adapters().count(),
            evicted: changes.evicted.len(),
            failed: failed.len(),
        };
        let backbone_bytes = snapshot.backbones().iter().map(|b| b.model_bytes()).sum();
        let adapter_bytes = snapshot.adapters().map(|a| a.info().model_bytes).sum();
        crate::metrics::models(states, backbone_bytes, adapter_bytes);
    }

    fn retire(changes: &mut Changes, adapter: &Arc<Adapter>, departure: Departure) {
        if changes.retired.len() == HISTORY {
            changes.retired.pop_front();
        }
        changes.retired.push_back(Retired {
            adapter: Arc::downgrade(adapter),
            info: adapter.info(),
            departure,
        });
    }

    /// Publishes a loaded, warmed adapter. The same task version with the same bytes is
    /// a no-op; with other bytes it replaces the loaded one only when `replace`.
    pub fn insert(
        &self,
        adapter: Arc<Adapter>,
        make_default: bool,
        replace: bool,
        pin: bool,
    ) -> Result<Inserted, ChangeError> {
        let mut changes = self.changes();
        if pin {
            changes.pinned.insert(key(&adapter));
        }
        let current = self.snapshot();
        let (task, version) = (adapter.task().to_string(), adapter.version().to_string());
        let mut replaced = false;
        if let Some(loaded) = current.adapter(&task, &version) {
            if loaded.sha256() == adapter.sha256() {
                if make_default {
                    changes.defaults.insert(task, version);
                    self.publish(&changes, current.adapters().cloned().collect());
                }
                return Ok(Inserted {
                    adapter: loaded.clone(),
                    replaced: false,
                });
            }
            if !replace {
                return Err(ChangeError::AlreadyLoaded {
                    task,
                    version,
                    loaded: loaded.sha256().to_string(),
                    new: adapter.sha256().to_string(),
                });
            }
            Self::retire(&mut changes, loaded, Departure::Replaced);
            replaced = true;
        }
        if make_default {
            changes.defaults.insert(task.clone(), version.clone());
        }
        changes.evicted.remove(&(task.clone(), version.clone()));
        let adapters = current
            .adapters()
            .filter(|a| !(a.task() == task && a.version() == version))
            .cloned()
            .chain([adapter.clone()])
            .collect();
        let adapters = self.enforce_budget(&mut changes, adapters, Some(&adapter));
        self.publish(&changes, adapters);
        Ok(Inserted { adapter, replaced })
    }

    /// Stops new requests from using `task@version`; running ones finish on it. An
    /// evicted version is forgotten (None): it is no longer reloaded on demand.
    pub fn remove(&self, task: &str, version: &str) -> Result<Option<Arc<Adapter>>, ChangeError> {
        let mut changes = self.changes();
        let current = self.snapshot();
        let Some(adapter) = current.adapter(task, version).cloned() else {
            if changes
                .evicted
                .remove(&(task.to_string(), version.to_string()))
                .is_some()
            {
                return Ok(None);
            }
            return Err(ChangeError::NotLoaded {
                task: task.into(),
                version: version.into(),
            });
        };
        if changes.defaults.get(task).is_some_and(|v| v == version) {
            changes.defaults.remove(task);
        }
        changes.pinned.remove(&key(&adapter));
        Self::retire(&mut changes, &adapter, Departure::Unloaded);
        let adapters = current
            .adapters()
            .filter(|a| !Arc::ptr_eq(a, &adapter))
            .cloned()
            .collect();
        self.publish(&changes, adapters);
        Ok(Some(adapter))
    }

    /// Makes `task@version` the version requests naming only the task get. Returns the
    /// previous default version.
    pub fn set_default(&self, task: &str, version: &str) -> Result<String, ChangeError> {
        let mut changes = self.changes();
        let current = self.snapshot();
        let not_loaded = || ChangeError::NotLoaded {
            task: task.into(),
            version: version.into(),
        };
        let previous = current
            .tasks
            .get(task)
            .ok_or_else(not_loaded)?
            .default_version()
            .version()
            .to_string();
        current.adapter(task, version).ok_or_else(not_loaded)?;
        changes.defaults.insert(task.into(), version.into());
        self.publish(&changes, current.adapters().cloned().collect());
        Ok(previous)
    }

    /// Records a refused adapter load, for ListAdapters and the metrics.
    pub fn record_failure(&self, failure: Failure) {
        let mut changes = self.changes();
        if changes.failed.len() == HISTORY {
            changes.failed.pop_front();
        }
        changes.failed.push_back(failure);
        crate::metrics::load_failure("adapter");
        Self::export(&changes, &self.snapshot());
    }

    /// Adapters that left the serving set, oldest first (the newest `HISTORY`).
    pub fn retired(&self) -> Vec<Retired> {
        self.changes().retired.iter().cloned().collect()
    }

    /// Failed loads, oldest first (the newest `HISTORY`).
    pub fn failures(&self) -> Vec<Failure> {
        self.changes().failed.iter().cloned().collect()
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
