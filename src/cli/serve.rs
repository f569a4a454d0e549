//! `fptserve serve`: load the repository, bind, serve until SIGINT/SIGTERM.

use std::sync::Arc;

use anyhow::Context;

use crate::config::ServeConfig;
use crate::engine::Engine;
use crate::registry::Registry;
use crate::{metrics, server};

/// Runs the daemon.
pub async fn run(config: ServeConfig) -> anyhow::Result<()> {
    let models = config.models.clone();
    let (_runtime, loaded) = tokio::task::spawn_blocking(move || super::load_models(&models))
        .await
        .context("loading models")??;
    let adapters: usize = loaded
        .snapshot
        .tasks()
        .values()
        .map(|t| t.versions().len())
        .sum();
    if loaded.snapshot.backbones().is_empty() {
        anyhow::bail!(
            "no backbone loaded from {}: nothing to serve",
            config.models.repository.display()
        );
    }
    if adapters == 0 {
        tracing::warn!("no task adapter loaded: every Classify call will answer NOT_FOUND");
    }

    if let Some(addr) = config.metrics_listen {
        metrics::install(addr)
            .with_context(|| format!("starting the metrics listener on {addr}"))?;
        tracing::info!(%addr, "metrics on http://{addr}/metrics");
    }
    metrics::adapters_loaded(adapters);
    metrics::load_failures(loaded.failures.len());

    let listener = tokio::net::TcpListener::bind(config.grpc_listen)
        .await
        .with_context(|| format!("binding gRPC on {}", config.grpc_listen))?;
    let engine = Arc::new(Engine::new(
        Arc::new(Registry::new(loaded.snapshot)),
        config.limits,
    ));
    tracing::info!(
        addr = %listener.local_addr()?,
        repository = %config.models.repository.display(),
        adapters,
        skipped = loaded.failures.len(),
        "serving"
    );
    server::run(engine, config.grpc, listener, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested; finishing calls in flight");
}
