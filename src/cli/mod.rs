//! The `fptserve` subcommands. `main` parses and sets up logging, then calls one of these.

pub mod classify;
pub mod decode;
pub mod inspect;
pub mod serve;

use std::sync::Arc;

use anyhow::Context;

use crate::config::ModelConfig;
use crate::repository::{self, Loaded};
use crate::runtime::Runtime;
use crate::signing::Trust;

/// Brings up ONNX Runtime and loads the repository, checking adapter signatures
/// against `trust` when given.
pub fn load_models(
    config: &ModelConfig,
    trust: Option<Trust>,
) -> anyhow::Result<(Arc<Runtime>, Loaded)> {
    let runtime = Arc::new(
        Runtime::new(
            config.onnxruntime_lib.as_deref(),
            config.device,
            config.threads,
        )
        .context("starting ONNX Runtime")?
        .with_trust(trust),
    );
    tracing::info!(
        library = %runtime.library().display(),
        requested = %runtime.requested_device(),
        device = %runtime.device(),
        "ONNX Runtime ready"
    );
    let loaded = repository::load(&config.repository, &runtime)?;
    Ok((runtime, loaded))
}
