//! `fptserve.v1.Admin`: loading, unloading and choosing task adapter versions while the
//! Classifier keeps serving. Every change is checked completely before it is published
//! (manifest, digest, backbone identity and shapes, graph interface, one warm-up run), and
//! a refused change leaves the serving set as it was.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tonic::{Request, Response, Status};

use crate::lifecycle::{Lifecycle, Origin};
use crate::model::adapter::AdapterInfo;
use crate::proto::v1 as pb;
use crate::proto::v1::admin_server::Admin;
use crate::registry::{Departure, Publish, Registry};
use crate::repository::manifest::{AdapterManifest, MANIFEST_FILE};

/// Where LoadAdapter may read from: the model repository, plus any extra roots.
#[derive(Clone, Debug)]
pub struct AllowedRoots {
    repository: PathBuf,
    roots: Vec<PathBuf>,
}

impl AllowedRoots {
    /// The repository and `extra` roots; each is resolved (links, `..`) once here.
    pub fn new(repository: &Path, extra: &[PathBuf]) -> std::io::Result<Self> {
        let repository = repository.canonicalize()?;
        let mut roots = vec![repository.clone()];
        for root in extra {
            roots.push(root.canonicalize()?);
        }
        Ok(AllowedRoots { repository, roots })
    }

    /// The folder `path` names, after following links: relative paths are inside the
    /// repository. Anything outside every root is PERMISSION_DENIED.
    pub fn resolve(&self, path: &str) -> Result<PathBuf, Status> {
        if path.is_empty() {
            return Err(Status::invalid_argument(
                "give path (a folder with manifest.json) or manifest_json and onnx",
            ));
        }
        let joined = self.repository.join(path);
        let real = joined.canonicalize().map_err(|e| {
            Status::not_found(format!(
                "{path}: {e} (relative paths are inside the model repository)"
            ))
        })?;
        if !self.roots.iter().any(|root| real.starts_with(root)) {
            return Err(Status::permission_denied(format!(
                "{path} resolves to {}, outside the model repository and the allowed roots",
                real.display()
            )));
        }
        Ok(real)
    }
}

/// The Admin service.
pub struct AdminService {
    lifecycle: Arc<Lifecycle>,
    roots: AllowedRoots,
}

impl AdminService {
    /// Manages the adapters of `lifecycle`, loading from within `roots`.
    pub fn new(lifecycle: Arc<Lifecycle>, roots: AllowedRoots) -> Self {
        AdminService { lifecycle, roots }
    }

    fn registry(&self) -> &Arc<Registry> {
        self.lifecycle.registry()
    }
}

fn status(info: &AdapterInfo, state: pb::AdapterState, is_default: bool) -> pb::AdapterStatus {
    pb::AdapterStatus {
        task: info.task.clone(),
        version: info.version.clone(),
        state: state as i32,
        sha256: info.sha256.clone(),
        backbone: info.backbone.0.clone(),
        backbone_sha256: info.backbone.1.clone(),
        bytes: info.model_bytes,
        load_ms: info.load_ms,
        loaded_unix_ms: info.loaded_unix_ms,
        last_used_unix_ms: info.last_used_unix_ms,
        requests_served: info.requests_served,
        pinned: false,
        is_default,
        error: String::new(),
        path: info.path.display().to_string(),
    }
}

/// An uploaded adapter, written to a private folder for the loader and removed after.
struct Upload(PathBuf);

impl Upload {
    fn write(manifest_json: &str, onnx: &[u8]) -> Result<Self, Status> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let manifest: AdapterManifest = serde_json::from_str(manifest_json)
            .map_err(|e| Status::invalid_argument(format!("manifest_json: {e}")))?;
        if manifest.file.contains(['/', '\\']) || manifest.file.starts_with('.') {
            return Err(Status::invalid_argument(format!(
                "manifest file {:?} must be a plain file name",
                manifest.file
            )));
        }
        let dir = std::env::temp_dir().join(format!(
            "fptserve-upload-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join(MANIFEST_FILE), manifest_json)?;
            std::fs::write(dir.join(&manifest.file), onnx)
        };
        write().map_err(|e| Status::internal(format!("keeping the upload: {e}")))?;
        Ok(Upload(dir))
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn load_adapter(
        &self,
        request: Request<pb::LoadAdapterRequest>,
    ) -> Result<Response<pb::LoadAdapterResponse>, Status> {
        let r = request.into_inner();
        let uploaded = !r.onnx.is_empty() || !r.manifest_json.is_empty();
        let (dir, upload) = if uploaded {
            if !r.path.is_empty() {
                return Err(Status::invalid_argument(
                    "give either path or manifest_json with onnx, not both",
                ));
            }
            let upload = Upload::write(&r.manifest_json, &r.onnx)?;
            (upload.0.clone(), Some(upload))
        } else {
            (self.roots.resolve(&r.path)?, None)
        };
        let shown = if uploaded {
            "(uploaded)".to_string()
        } else {
            r.path.clone()
        };

        let lifecycle = self.lifecycle.clone();
        let publish = Publish {
            make_default: r.make_default,
            replace: r.replace,
            pin: r.pin,
        };
        let inserted = tokio::task::spawn_blocking(move || {
            let _upload = upload;
            lifecycle.load(&dir, &shown, Origin::Admin, publish)
        })
        .await
        .map_err(|e| Status::internal(format!("loading task panicked: {e}")))??;
        let info = inserted.adapter.info();
        let pinned = self.registry().is_pinned(&info.task, &info.version);
        let is_default = self.is_default(&info.task, &info.version);
        let mut adapter = status(&info, pb::AdapterState::Ready, is_default);
        adapter.pinned = pinned;
        Ok(Response::new(pb::LoadAdapterResponse {
            adapter: Some(adapter),
            replaced: inserted.replaced,
        }))
    }

    async fn unload_adapter(
        &self,
        request: Request<pb::UnloadAdapterRequest>,
    ) -> Result<Response<pb::UnloadAdapterResponse>, Status> {
        let r = request.into_inner();
        let Some(adapter) = self.registry().remove(&r.task, &r.version)? else {
            tracing::info!(task = %r.task, version = %r.version, "evicted adapter forgotten");
            return Ok(Response::new(pb::UnloadAdapterResponse {
                adapter: Some(pb::AdapterStatus {
                    task: r.task,
                    version: r.version,
                    state: pb::AdapterState::Unloaded as i32,
                    ..Default::default()
                }),
            }));
        };
        tracing::info!(task = %r.task, version = %r.version, "adapter unloaded");
        // this call's handle is one; any other is a request still running on it
        let state = if Arc::strong_count(&adapter) > 1 {
            pb::AdapterState::Draining
        } else {
            pb::AdapterState::Unloaded
        };
        Ok(Response::new(pb::UnloadAdapterResponse {
            adapter: Some(status(&adapter.info(), state, false)),
        }))
    }

    async fn list_adapters(
        &self,
        _request: Request<pb::ListAdaptersRequest>,
    ) -> Result<Response<pb::ListAdaptersResponse>, Status> {
        let registry = self.registry();
        let snapshot = registry.snapshot();
        let mut adapters: Vec<pb::AdapterStatus> = Vec::new();
        for task in snapshot.tasks().values() {
            let default = task.default_version().version();
            for adapter in task.versions() {
                let mut s = status(
                    &adapter.info(),
                    pb::AdapterState::Ready,
                    adapter.version() == default,
                );
                s.pinned = registry.is_pinned(adapter.task(), adapter.version());
                adapters.push(s);
            }
        }
        for info in self.lifecycle.loading() {
            adapters.push(status(&info, pb::AdapterState::Loading, false));
        }
        for retired in registry.retired() {
            let (info, state) = match retired.adapter.upgrade() {
                Some(a) => (a.info(), pb::AdapterState::Draining),
                None => (retired.info.clone(), pb::AdapterState::Unloaded),
            };
            let mut s = status(&info, state, false);
            s.error = match retired.departure {
                Departure::Unloaded => String::new(),
                Departure::Replaced => "replaced by other bytes under the same version".into(),
                Departure::Evicted => {
                    "evicted under the adapter budget; reloaded when requested".into()
                }
            };
            adapters.push(s);
        }
        for failure in registry.failures() {
            adapters.push(pb::AdapterStatus {
                task: failure.task,
                version: failure.version,
                state: pb::AdapterState::Failed as i32,
                error: failure.error,
                path: failure.path,
                loaded_unix_ms: failure.at_unix_ms,
                ..Default::default()
            });
        }
        Ok(Response::new(pb::ListAdaptersResponse { adapters }))
    }

    async fn set_default_version(
        &self,
        request: Request<pb::SetDefaultVersionRequest>,
    ) -> Result<Response<pb::SetDefaultVersionResponse>, Status> {
        let r = request.into_inner();
        let previous = self.registry().set_default(&r.task, &r.version)?;
        tracing::info!(task = %r.task, version = %r.version, %previous, "default version set");
        let snapshot = self.registry().snapshot();
        let adapter = snapshot
            .adapter(&r.task, &r.version)
            .map(|a| status(&a.info(), pb::AdapterState::Ready, true));
        Ok(Response::new(pb::SetDefaultVersionResponse {
            previous,
            adapter,
        }))
    }
}

impl AdminService {
    fn is_default(&self, task: &str, version: &str) -> bool {
        self.registry()
            .snapshot()
            .tasks()
            .get(task)
            .is_some_and(|t| t.default_version().version() == version)
    }
}

/// Checks `authorization: Bearer <token>` when a token is set.
#[derive(Clone)]
pub struct BearerToken(pub Option<Arc<str>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match &self.0 {
            Some(token) => check_bearer(request.metadata(), token).map(|()| request),
            None => Ok(request),
        }
    }
}

/// Checks that `metadata` carries `authorization: Bearer <token>` (compared in constant
/// time).
pub fn check_bearer(metadata: &tonic::metadata::MetadataMap, token: &str) -> Result<(), Status> {
    let given = metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(Status::unauthenticated("wrong admin token")),
        None => Err(Status::unauthenticated(
            "this call needs the admin token: `authorization: Bearer <token>`",
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
