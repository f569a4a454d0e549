//! `fptserve serve`: load the repository, bind, serve until SIGINT/SIGTERM.

use std::sync::Arc;

use anyhow::Context;

use crate::config::ServeConfig;
use crate::engine::Engine;
use crate::grpc::admin::{AdminService, AllowedRoots, BearerToken};
use crate::model::adapter::Adapter;
use crate::registry::{Budget, Registry};
use crate::{metrics, server};

/// Runs the daemon.
pub async fn run(config: ServeConfig) -> anyhow::Result<()> {
    let models = config.models.clone();
    let (runtime, loaded) = tokio::task::spawn_blocking(move || super::load_models(&models))
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
    let registry = Arc::new(match config.max_adapters {
        None => Registry::new(loaded.snapshot),
        Some(max_adapters) => {
            let reload = Adapter::reloader(runtime.clone(), loaded.snapshot.backbones().to_vec());
            tracing::info!(max_adapters, "adapter budget");
            Registry::with_budget(
                loaded.snapshot,
                Budget {
                    max_adapters,
                    reload,
                },
            )
        }
    });
    if let Some(interval) = config.watch_interval {
        tracing::info!(?interval, "watching the repository's tasks/ folder");
        tokio::spawn(crate::watch::run(
            config.models.repository.clone(),
            registry.clone(),
            runtime.clone(),
            interval,
        ));
    }
    let gpu = matches!(runtime.device(), crate::runtime::Device::Cuda(_));
    let settings = config.engine.resolve(gpu);
    // after the models loaded: a CUDA provider that failed to start has fallen back by now
    tracing::info!(
        device = %runtime.device(),
        max_batch_size = settings.batch.max_batch,
        max_batch_delay_ms = settings.batch.max_delay.as_secs_f64() * 1e3,
        max_queue = settings.batch.max_queue,
        feature_cache_bytes = settings.feature_cache_bytes,
        decode_threads = settings.decode_threads,
        intra_op_threads = config.models.threads.intra_op,
        inter_op_threads = config.models.threads.inter_op,
        "engine"
    );
    let engine = Arc::new(Engine::new(registry.clone(), config.limits, settings));

    // one shutdown signal for both listeners
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    let admin = match &config.admin {
        Some(admin) => {
            let admin_listener = tokio::net::TcpListener::bind(admin.listen)
                .await
                .with_context(|| format!("binding the admin API on {}", admin.listen))?;
            let roots = AllowedRoots::new(&config.models.repository, &admin.allow_roots)
                .context("resolving the repository and admin_allow_roots")?;
            tracing::info!(
                addr = %admin_listener.local_addr()?,
                token = admin.token.is_some(),
                "admin API listening"
            );
            let service = AdminService::new(registry.clone(), runtime.clone(), roots);
            let token = BearerToken(admin.token.as_deref().map(Arc::from));
            Some(tokio::spawn(server::run_admin(
                service,
                token,
                config.grpc.max_message_bytes,
                admin_listener,
                until_stopped(),
            )))
        }
        None => None,
    };
    tracing::info!(
        addr = %listener.local_addr()?,
        repository = %config.models.repository.display(),
        adapters,
        skipped = loaded.failures.len(),
        "serving"
    );
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    server::run(engine, config.grpc, listener, until_stopped()).await?;
    if let Some(admin) = admin {
        admin.await.context("admin API task")??;
    }
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
