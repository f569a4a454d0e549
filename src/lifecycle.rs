//! The adapter lifecycle: how an adapter folder comes into service, whichever path asks
//! for it (start-up, the admin API's LoadAdapter, the repository watch, the Open
//! Inference Protocol's repository extension, a request for an adapter evicted under the
//! budget). One mechanism, so that they all refuse the same bad adapter the same way:
//!
//! ```text
//! load (manifest, SHA-256, signature) -> verify (backbone identity and shapes, graph
//! interface, folder path) -> warm (one run) -> publish (Registry::insert)
//!                     \-> refused: logged, recorded for ListAdapters, counted
//! ```
//!
//! A refused adapter changes nothing that is served. Warm means ONNX Runtime has run the
//! adapter once, so no request pays its first-run set-up; start-up warms like every other
//! path, so health SERVING means warm.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::model::ModelError;
use crate::model::adapter::{Adapter, AdapterInfo, unix_ms};
use crate::model::backbone::{Backbone, BackbonePrecision, Standing};
use crate::registry::{ChangeError, Failure, Inserted, Publish, Registry};
use crate::repository::manifest::{AdapterManifest, short};
use crate::repository::{self, LoadFailure, RepositoryError};
use crate::runtime::Runtime;

/// Which path asked for a load (in log lines).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Loading the repository at start-up.
    Startup,
    /// The admin API's LoadAdapter.
    Admin,
    /// The repository watch.
    Watch,
    /// The Open Inference Protocol's RepositoryModelLoad.
    Repository,
    /// A request for an adapter evicted under the budget.
    Reload,
}

impl Origin {
    fn name(self) -> &'static str {
        match self {
            Origin::Startup => "start-up",
            Origin::Admin => "admin",
            Origin::Watch => "watch",
            Origin::Repository => "repository",
            Origin::Reload => "reload",
        }
    }
}

/// Why an adapter was not published. Nothing served changed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The folder does not hold a usable adapter for the loaded backbones (recorded).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The adapter is good but conflicts with what is loaded (not recorded: nothing is
    /// wrong with the adapter).
    #[error(transparent)]
    Change(#[from] ChangeError),
}

/// The registry, with the means to bring adapters into it.
pub struct Lifecycle {
    registry: Arc<Registry>,
    runtime: Arc<Runtime>,
    repository: PathBuf,
    /// Loads in progress, for ListAdapters.
    loading: Mutex<BTreeMap<u64, AdapterInfo>>,
}

/// How start-up loads a repository.
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    /// Most adapters loaded at once (the adapter budget), if limited.
    pub max_adapters: Option<usize>,
    /// Backbone variants (folder names) allowed to serve the adapters of the backbone
    /// they were made from where it is not loaded.
    pub allowed_variants: Vec<String>,
    /// Whether float16 variants serve in preference to the backbone they were made from.
    pub backbone_precision: BackbonePrecision,
}

/// What start-up loaded.
pub struct Started {
    /// The loaded models and the means to change them.
    pub lifecycle: Arc<Lifecycle>,
    /// Every model folder that was skipped, and why.
    pub failures: Vec<LoadFailure>,
}

impl Lifecycle {
    /// Start-up: every backbone under `repository`, then every adapter folder through the
    /// lifecycle (warm, refusals recorded), as `options` say.
    pub fn start(
        repository: &Path,
        runtime: Arc<Runtime>,
        options: StartOptions,
    ) -> Result<Started, RepositoryError> {
        let (backbones, mut failures) = load_backbones(repository, &runtime, &options)?;
        let lifecycle = Arc::new(Lifecycle {
            registry: Arc::new(Registry::new(backbones, options.max_adapters)),
            runtime,
            repository: repository.to_path_buf(),
            loading: Mutex::default(),
        });
        for dir in repository::task_folders(repository) {
            let shown = dir.display().to_string();
            match lifecycle.load(&dir, &shown, Origin::Startup, Publish::default()) {
                Ok(_) => {}
                Err(e) => failures.push(LoadFailure {
                    path: dir,
                    error: e.to_string(),
                }),
            }
        }
        Ok(Started {
            lifecycle,
            failures,
        })
    }

    /// The loaded models.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The ONNX Runtime environment adapters are loaded into.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// The model repository's folder.
    pub fn repository(&self) -> &Path {
        &self.repository
    }

    /// Loads in progress.
    pub fn loading(&self) -> Vec<AdapterInfo> {
        lock(&self.loading).values().cloned().collect()
    }

    /// The whole lifecycle for the folder `dir` (shown to operators as `shown`): load,
    /// verify, warm and publish, or record why not. Blocking.
    pub fn load(
        &self,
        dir: &Path,
        shown: &str,
        origin: Origin,
        publish: Publish,
    ) -> Result<Inserted, LoadError> {
        let result = self.try_load(dir, shown, origin, publish);
        if let Err(LoadError::Model(e)) = &result {
            self.record_refusal(dir, shown, e);
        }
        result
    }

    /// [`Lifecycle::load`] without recording a refusal: for a folder that may still be
    /// being copied (the repository watch records it once it has stopped changing).
    pub fn try_load(
        &self,
        dir: &Path,
        shown: &str,
        origin: Origin,
        publish: Publish,
    ) -> Result<Inserted, LoadError> {
        let adapter = {
            let _loading = self.track(dir);
            self.prepare(dir)?
        };
        let inserted = self.registry.insert(Arc::new(adapter), publish)?;
        let info = inserted.adapter.info();
        tracing::info!(
            origin = origin.name(),
            task = %info.task,
            version = %info.version,
            sha256 = %short(&info.sha256),
            replaced = inserted.replaced,
            load_ms = info.load_ms,
            path = %shown,
            "adapter loaded"
        );
        Ok(inserted)
    }

    /// Load, verify and warm, changing nothing served.
    fn prepare(&self, dir: &Path) -> Result<Adapter, ModelError> {
        let backbones = self.registry.snapshot().backbones().to_vec();
        let adapter = Adapter::load(dir, &self.runtime, &backbones)?;
        self.check_folder(dir, &adapter)?;
        let features = adapter.backbone().warm_features()?;
        adapter.warm(&features)
    }

    /// A folder inside the repository's tasks/ must be `tasks/<task>/<version>` of its
    /// own manifest: the watch, the repository extension and start-up find adapters by
    /// that path.
    fn check_folder(&self, dir: &Path, adapter: &Adapter) -> Result<(), ModelError> {
        let real = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        let (dir, tasks) = (real(dir), real(&self.repository.join("tasks")));
        let Ok(relative) = dir.strip_prefix(&tasks) else {
            return Ok(());
        };
        let expected = Path::new(adapter.task()).join(adapter.version());
        if relative == expected {
            return Ok(());
        }
        Err(ModelError::Misplaced {
            path: dir.clone(),
            task: adapter.task().to_string(),
            version: adapter.version().to_string(),
        })
    }

    /// Logs, records (ListAdapters) and counts a refused adapter.
    fn record_refusal(&self, dir: &Path, shown: &str, error: &ModelError) {
        let (task, version) = match AdapterManifest::read(dir) {
            Ok(m) => (m.task, m.version),
            // the folder path says, for a folder under tasks/
            Err(_) => {
                let relative = dir
                    .strip_prefix(self.repository.join("tasks"))
                    .unwrap_or(Path::new(""));
                let mut parts = relative.iter().map(|p| p.to_string_lossy().into_owned());
                (
                    parts.next().unwrap_or_default(),
                    parts.next().unwrap_or_default(),
                )
            }
        };
        tracing::warn!(path = %shown, %task, %version, %error, "adapter refused");
        self.registry.record_failure(Failure {
            task,
            version,
            path: shown.to_string(),
            error: error.to_string(),
            at_unix_ms: unix_ms(),
        });
    }

    /// Loads again the evicted adapter a request names (`task` or `task@version`), when
    /// there is one.
    pub fn reload_evicted(&self, reference: &str) -> Option<Result<Arc<Adapter>, LoadError>> {
        let dir = self.registry.evicted_folder(reference)?;
        let shown = dir.display().to_string();
        Some(
            self.load(&dir, &shown, Origin::Reload, Publish::default())
                .map(|i| i.adapter),
        )
    }

    /// Lists `dir` as loading (when its manifest reads) until the guard drops.
    fn track(&self, dir: &Path) -> Option<Tracked<'_>> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let m = AdapterManifest::read(dir).ok()?;
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let info = AdapterInfo {
            task: m.task,
            version: m.version,
            sha256: m.sha256,
            backbone: (m.backbone.name, m.backbone.sha256),
            path: dir.to_path_buf(),
            model_bytes: 0,
            load_ms: 0.0,
            loaded_unix_ms: unix_ms(),
            last_used_unix_ms: 0,
            requests_served: 0,
        };
        lock(&self.loading).insert(id, info);
        Some(Tracked {
            loading: &self.loading,
            id,
        })
    }
}

/// Loads and warms every backbone under `repository`; one that fails is skipped, logged
/// and counted. Backbones do not change at run time, so this is start-up's alone.
/// A variant serves the adapters of the backbone it was made from as `options` say
/// ([`variant_standing`]).
fn load_backbones(
    repository: &Path,
    runtime: &Runtime,
    options: &StartOptions,
) -> Result<(Vec<Arc<Backbone>>, Vec<LoadFailure>), RepositoryError> {
    let allowed_variants = &options.allowed_variants;
    let mut failures = Vec::new();
    let mut backbones: Vec<Arc<Backbone>> = Vec::new();
    for dir in repository::backbone_folders(repository)? {
        let loaded = Backbone::load(&dir, runtime).and_then(|b| {
            // one run now, so that no request pays ONNX Runtime's first-run set-up
            b.warm_features()?;
            Ok(b)
        });
        let error = match loaded {
            Ok(b) if dir.file_name() != Some(b.identity().name.as_ref()) => format!(
                "manifest name {:?} differs from the folder name",
                b.identity().name
            ),
            Ok(b) => {
                let standing = variant_standing(&b, options);
                let m = b.manifest();
                tracing::info!(
                    backbone = %m.name,
                    sha256 = %short(&m.sha256),
                    precision = m.precision.as_deref().unwrap_or("float32"),
                    device = %b.device(),
                    variant_of = m.quantized_from.as_ref().map(|r| r.name.as_str()),
                    serves_for_it = m.quantized_from.as_ref().map(|_| tracing::field::debug(standing)),
                    "backbone loaded"
                );
                backbones.push(Arc::new(b.with_standing(standing)));
                continue;
            }
            Err(e) => e.to_string(),
        };
        tracing::error!(path = %dir.display(), %error, "backbone skipped");
        crate::metrics::load_failure("backbone");
        failures.push(LoadFailure { path: dir, error });
    }
    for name in allowed_variants {
        let variant = backbones.iter().find(|b| b.identity().name == *name);
        if variant.is_none_or(|b| b.manifest().quantized_from.is_none()) {
            tracing::warn!(
                backbone = %name,
                "allowed as a backbone variant, but no loaded backbone of that name was made \
                 from another (quantized_from): it stands in for none"
            );
        }
    }
    for b in backbones
        .iter()
        .filter(|b| b.manifest().quantized_from.is_none())
    {
        let preferred = backbones
            .iter()
            .any(|v| v.standing_for(&b.identity()) == Standing::Preferred);
        if options.backbone_precision.prefers_float16(b.device()) && !preferred {
            tracing::info!(
                backbone = %b.identity().name,
                device = %b.device(),
                precision = ?options.backbone_precision,
                "no float16 variant of this backbone is loaded: it serves its adapters itself \
                 (python -m fptserve_models quantize-backbone --precision float16 makes one)"
            );
        }
    }
    Ok((backbones, failures))
}

/// How a loaded variant serves the adapters of the backbone it was made from: a float16
/// one in preference to it where `--backbone-precision` prefers float16 on the device it
/// runs on; one the operator allowed by name where it is missing; else not at all.
fn variant_standing(backbone: &Backbone, options: &StartOptions) -> Standing {
    let m = backbone.manifest();
    if m.quantized_from.is_none() {
        Standing::No
    } else if m.precision.as_deref() == Some("float16")
        && options
            .backbone_precision
            .prefers_float16(backbone.device())
    {
        Standing::Preferred
    } else if options.allowed_variants.contains(&m.name) {
        Standing::WhereMissing
    } else {
        Standing::No
    }
}

/// A load listed as in progress.
struct Tracked<'a> {
    loading: &'a Mutex<BTreeMap<u64, AdapterInfo>>,
    id: u64,
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        lock(self.loading).remove(&self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
