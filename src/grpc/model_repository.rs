//! The Open Inference Protocol's model repository extension (RepositoryIndex,
//! RepositoryModelLoad, RepositoryModelUnload) over the task adapters of the repository on
//! disk: a model is a task, a model version one of its adapter folders. Served only with
//! the admin token, since it changes what is served.

use tonic::{Request, Response, Status};

use super::admin::check_bearer;
use super::calls::Serving;
use super::inference::task_reference;
use crate::lifecycle::{LoadError, Origin};
use crate::proto::inference as pb;
use crate::registry::Publish;
use crate::repository::adapter_folders;

/// The protocol extension these calls belong to (ServerMetadata lists it).
pub const EXTENSION: &str = "model_repository";

/// The extension's gate: off without an admin token, and then only for calls that carry it.
fn authorize<T>(serving: &Serving, request: &Request<T>) -> Result<(), Status> {
    match &serving.admin_token {
        Some(token) => check_bearer(request.metadata(), token),
        None => Err(Status::unimplemented(
            "the model repository extension is served only when the admin API has a \
             token (admin_listen with admin_token_file)",
        )),
    }
}

/// RepositoryIndex: every loaded adapter (READY) and every folder on disk that is not
/// loaded (UNAVAILABLE, with the reason).
pub async fn index(
    serving: &Serving,
    request: Request<pb::RepositoryIndexRequest>,
) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
    authorize(serving, &request)?;
    let only_ready = request.into_inner().ready;
    let lifecycle = serving.engine()?.lifecycle().clone();
    let registry = lifecycle.registry();
    let snapshot = registry.snapshot();
    let failures = registry.failures();
    let mut models: Vec<pb::repository_index_response::ModelIndex> = snapshot
        .adapters()
        .map(|a| pb::repository_index_response::ModelIndex {
            name: a.task().to_string(),
            version: a.version().to_string(),
            state: "READY".into(),
            reason: String::new(),
        })
        .collect();
    let repository = lifecycle.repository().to_path_buf();
    let on_disk = tokio::task::spawn_blocking(move || adapter_folders(&repository))
        .await
        .map_err(|e| Status::internal(format!("scanning the repository: {e}")))?;
    for (dir, manifest) in on_disk {
        if snapshot
            .adapter(&manifest.task, &manifest.version)
            .is_some()
        {
            continue;
        }
        let reason = if registry.is_evicted(&manifest.task, &manifest.version, &dir) {
            "evicted under the adapter budget; loaded again when requested".to_string()
        } else {
            failures
                .iter()
                .rev()
                .find(|f| f.task == manifest.task && f.version == manifest.version)
                .map_or_else(|| "not loaded".to_string(), |f| f.error.clone())
        };
        models.push(pb::repository_index_response::ModelIndex {
            name: manifest.task,
            version: manifest.version,
            state: "UNAVAILABLE".into(),
            reason,
        });
    }
    if only_ready {
        models.retain(|m| m.state == "READY");
    }
    models.sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
    Ok(Response::new(pb::RepositoryIndexResponse { models }))
}

/// RepositoryModelLoad: every version folder of the task through the adapter lifecycle,
/// loaded, or replaced when its bytes changed. The first refusal is the answer; the other
/// versions are still loaded.
pub async fn load(
    serving: &Serving,
    request: Request<pb::RepositoryModelLoadRequest>,
) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
    authorize(serving, &request)?;
    let task = request.into_inner().model_name;
    task_reference(&task, "")?;
    let lifecycle = serving.engine()?.lifecycle().clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let folders: Vec<_> = adapter_folders(lifecycle.repository())
            .into_iter()
            .filter(|(_, m)| m.task == task)
            .collect();
        if folders.is_empty() {
            return Err(Status::not_found(format!(
                "no adapter folder of task {task:?} under the repository's tasks/"
            )));
        }
        let mut first_error: Option<LoadError> = None;
        for (dir, manifest) in folders {
            if lifecycle
                .registry()
                .snapshot()
                .adapter(&manifest.task, &manifest.version)
                .is_some_and(|a| a.sha256() == manifest.sha256)
            {
                continue;
            }
            let publish = Publish {
                replace: true,
                ..Publish::default()
            };
            let shown = dir.display().to_string();
            if let Err(e) = lifecycle.load(&dir, &shown, Origin::Repository, publish) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), |e| Err(Status::from(e)))
    })
    .await
    .map_err(|e| Status::internal(format!("loading task: {e}")))?;
    outcome.map(|()| Response::new(pb::RepositoryModelLoadResponse {}))
}

/// RepositoryModelUnload: every loaded version of the task stops taking new requests.
pub async fn unload(
    serving: &Serving,
    request: Request<pb::RepositoryModelUnloadRequest>,
) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
    authorize(serving, &request)?;
    let task = request.into_inner().model_name;
    task_reference(&task, "")?;
    let registry = serving.engine()?.registry();
    let versions: Vec<String> = registry
        .snapshot()
        .tasks()
        .get(&task)
        .map(|t| {
            t.versions()
                .iter()
                .map(|a| a.version().to_string())
                .collect()
        })
        .unwrap_or_default();
    if versions.is_empty() {
        return Err(Status::not_found(format!("task {task:?} is not loaded")));
    }
    for version in versions {
        // a version unloaded meanwhile by another call is fine: it is gone either way
        if registry.remove(&task, &version).is_ok() {
            tracing::info!(%task, %version, "repository: adapter unloaded");
        }
    }
    Ok(Response::new(pb::RepositoryModelUnloadResponse {}))
}
