//! The set of loaded models, published as an immutable [`Snapshot`].
//!
//! A request loads the current snapshot once and uses it to the end, so it sees one
//! consistent set of adapters; an adapter version stays alive (it is an `Arc`) for as
//! long as a request holds it, even after a newer snapshot drops it. The snapshot sits in
//! an `ArcSwap` so that replacing it (the admin API) is one atomic pointer swap: the
//! request path takes no lock here. Changes are serialised by one mutex that only the
//! admin side takes; an unloaded or replaced version is remembered (weakly) so operators
//! can see it drain.

mod snapshot;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;

pub use self::snapshot::{ResolveError, Snapshot, Task, compare_versions};
use crate::model::adapter::{Adapter, AdapterInfo};
use crate::model::backbone::Backbone;

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
    /// Task and version, when the manifest (or the folder path) said.
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

/// How an adapter joins the serving set.
#[derive(Clone, Copy, Debug, Default)]
pub struct Publish {
    /// Requests naming only the task get this version from now on.
    pub make_default: bool,
    /// The same task version loaded with other bytes is replaced (else refused).
    pub replace: bool,
    /// Never evicted under the adapter budget.
    pub pin: bool,
}

/// Holder of the current snapshot.
pub struct Registry {
    current: ArcSwap<Snapshot>,
    changes: Mutex<Changes>,
    /// Most adapters loaded at once (the adapter budget), if limited.
    max_adapters: Option<usize>,
}

impl Registry {
    /// Starts with `backbones` and no adapter. Under `max_adapters`, the least recently
    /// used adapters that are neither pinned nor in use are evicted past it (and loaded
    /// again when requested, see [`Registry::evicted_folder`]).
    pub fn new(backbones: Vec<Arc<Backbone>>, max_adapters: Option<usize>) -> Self {
        let snapshot = Snapshot::new(backbones, Vec::new());
        Self::export(&Changes::default(), &snapshot);
        Registry {
            current: ArcSwap::from_pointee(snapshot),
            changes: Mutex::default(),
            max_adapters,
        }
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
        let Some(max_adapters) = self.max_adapters else {
            return adapters;
        };
        while adapters.len() > max_adapters {
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
                    budget = max_adapters,
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

    /// The folder of the evicted task version that `reference` (`task` or `task@version`)
    /// names, when there is one: what a request for it loads again.
    pub fn evicted_folder(&self, reference: &str) -> Option<PathBuf> {
        self.max_adapters?;
        let (task, version) = match reference.split_once('@') {
            Some((t, v)) => (t, Some(v)),
            None => (reference, None),
        };
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
        changes.evicted.get(&(task.to_string(), version)).cloned()
    }

    /// Whether `task@version` was evicted under the budget from `dir` (and so is known).
    pub fn is_evicted(&self, task: &str, version: &str, dir: &Path) -> bool {
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
        let backbones = self.current.load().backbones().to_vec();
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

    /// Publishes a loaded, warmed adapter (through [`crate::lifecycle`], which checks and
    /// warms it first). The same task version with the same bytes is a no-op; with other
    /// bytes it replaces the loaded one only when `publish.replace`.
    pub fn insert(&self, adapter: Arc<Adapter>, publish: Publish) -> Result<Inserted, ChangeError> {
        let Publish {
            make_default,
            replace,
            pin,
        } = publish;
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
            .tasks()
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
