//! Repository watch mode: every few seconds the `tasks/` folder of the model repository is
//! compared with what is loaded, and adapters are loaded, replaced or unloaded to match,
//! so that replicas sharing one read-only volume converge without admin calls.
//!
//! A folder is taken only when its manifest reads and its model file's SHA-256 equals the
//! manifest's: a copy still being written (either file) is skipped and looked at again on
//! the next scan, and reported as failed only once it has stopped changing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::lifecycle::{Lifecycle, LoadError, Origin};
use crate::registry::Publish;
use crate::repository::adapter_folders;
use crate::repository::manifest::{AdapterManifest, MANIFEST_FILE};

/// What a folder looked like: modification times and sizes of its two files.
type Stamp = Vec<(SystemTime, u64)>;

fn stamp(dir: &Path, file: &str) -> Option<Stamp> {
    [MANIFEST_FILE, file]
        .iter()
        .map(|f| {
            let m = std::fs::metadata(dir.join(f)).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

/// One adapter folder found on disk.
struct Found {
    dir: PathBuf,
    manifest: AdapterManifest,
    stamp: Stamp,
}

fn scan(repository: &Path) -> Vec<Found> {
    adapter_folders(repository)
        .into_iter()
        .filter_map(|(dir, manifest)| {
            let stamp = stamp(&dir, &manifest.file)?;
            Some(Found {
                dir,
                manifest,
                stamp,
            })
        })
        .collect()
}

/// The watcher's memory between scans.
#[derive(Default)]
pub struct Watcher {
    /// Folders that did not load, with the stamp they had: not retried until they change.
    refused: BTreeMap<PathBuf, Stamp>,
    /// Folders that did not load once, with their stamp: reported if unchanged next time.
    unsettled: BTreeMap<PathBuf, Stamp>,
}

impl Watcher {
    /// One scan: brings the registry in line with the repository's tasks/ folder.
    pub fn sync(&mut self, lifecycle: &Lifecycle) {
        let repository = lifecycle.repository();
        let registry = lifecycle.registry();
        let found = scan(repository);
        let snapshot = registry.snapshot();
        let tasks_dir = repository.join("tasks");

        // gone from disk: unload (only what was loaded from this repository's tasks/)
        for adapter in snapshot.adapters() {
            let dir = adapter.dir();
            if dir.starts_with(&tasks_dir) && !found.iter().any(|f| f.dir == dir) {
                tracing::info!(
                    task = adapter.task(),
                    version = adapter.version(),
                    "watch: folder gone, unloading"
                );
                let _ = registry.remove(adapter.task(), adapter.version());
            }
        }

        for f in found {
            let loaded = snapshot.adapter(&f.manifest.task, &f.manifest.version);
            if loaded.is_some_and(|a| a.sha256() == f.manifest.sha256) {
                continue;
            }
            if registry.is_evicted(&f.manifest.task, &f.manifest.version, &f.dir) {
                continue;
            }
            if self.refused.get(&f.dir) == Some(&f.stamp) {
                continue;
            }
            // a copy in progress changes between scans; a bad adapter does not, so a
            // refusal is recorded only when the folder looked the same last time
            let settled = self.unsettled.get(&f.dir) == Some(&f.stamp);
            let shown = f.dir.display().to_string();
            let publish = Publish {
                replace: true,
                ..Publish::default()
            };
            let result = if settled {
                lifecycle.load(&f.dir, &shown, Origin::Watch, publish)
            } else {
                lifecycle.try_load(&f.dir, &shown, Origin::Watch, publish)
            };
            match result {
                Ok(_) | Err(LoadError::Change(_)) => {
                    self.unsettled.remove(&f.dir);
                    self.refused.remove(&f.dir);
                }
                Err(LoadError::Model(_)) if settled => {
                    self.unsettled.remove(&f.dir);
                    self.refused.insert(f.dir.clone(), f.stamp);
                }
                Err(LoadError::Model(_)) => {
                    self.unsettled.insert(f.dir.clone(), f.stamp);
                }
            }
        }
    }
}

/// Scans every `interval` until `shutdown` resolves.
pub async fn run(
    lifecycle: Arc<Lifecycle>,
    interval: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let watcher = Arc::new(std::sync::Mutex::new(Watcher::default()));
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = &mut shutdown => return,
        }
        let (lifecycle, watcher) = (lifecycle.clone(), watcher.clone());
        let _ = tokio::task::spawn_blocking(move || {
            let mut watcher = watcher.lock().unwrap_or_else(|e| e.into_inner());
            watcher.sync(&lifecycle);
        })
        .await;
    }
}
