//! `fptserve serve`: bind, load the repository, serve until SIGINT/SIGTERM.

use std::sync::Arc;

use anyhow::Context;

use crate::config::ServeConfig;
use crate::engine::Engine;
use crate::grpc::admin::{AdminService, AllowedRoots, BearerToken};
use crate::grpc::calls::{Loaded, Serving};
use crate::model::adapter::{Adapter, unix_ms};
use crate::registry::{Budget, Failure, Registry};
use crate::{metrics, server};

/// Runs the daemon. The gRPC port is bound first, so that health checks and ServerLive
/// answer while the models load (NOT_SERVING / not ready until they are warm).
pub async fn run(config: ServeConfig) -> anyhow::Result<()> {
    if let Some(addr) = config.metrics_listen {
        metrics::install(addr)
            .with_context(|| format!("starting the metrics listener on {addr}"))?;
        tracing::info!(%addr, "metrics on http://{addr}/metrics");
    }
    let mut config = config;
    if let Some(files) = &config.tls {
        let tls = crate::tls::Tls::load(files.clone()).context("loading the TLS files")?;
        tracing::info!(mutual = tls.mutual(), "TLS on the gRPC listeners");
        config.grpc.tls = Some(tls);
    }
    let listener = tokio::net::TcpListener::bind(config.grpc_listen)
        .await
        .with_context(|| format!("binding gRPC on {}", config.grpc_listen))?;
    let addr = listener.local_addr()?;

    // one shutdown signal for both listeners
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    let stop = Arc::new(stop);
    let signalled = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = signalled.send(true);
    });

    let admin_token: Option<Arc<str>> = config
        .admin
        .as_ref()
        .and_then(|a| a.token.as_deref())
        .map(Arc::from);
    let (serving, health) = Serving::new(config.grpc.max_in_flight, admin_token).await;
    let server = tokio::spawn(server::serve(
        serving.clone(),
        health,
        config.grpc.clone(),
        listener,
        until_stopped(),
    ));
    // health says NOT_SERVING until the models are loaded and warm
    tracing::info!(%addr, "listening");

    let models = config.models.clone();
    let trust = config.trust.clone();
    if let Some(trust) = &trust {
        tracing::info!(
            keys = trust.keys(),
            required = trust.required(),
            "adapter signatures checked"
        );
    }
    let loading = tokio::task::spawn_blocking(move || super::load_models(&models, trust));
    let loaded = tokio::select! {
        loaded = loading => loaded.context("loading models").and_then(|l| l),
        () = until_stopped() => {
            tracing::info!("stopped while loading the models");
            return server.await.context("gRPC server task")?.map_err(Into::into);
        }
    };
    let ready = match loaded {
        Ok((runtime, loaded)) => start_engine(&config, runtime, loaded),
        Err(e) => Err(e),
    };
    let (loaded, registry, runtime) = match ready {
        Ok(ready) => ready,
        Err(e) => {
            let _ = stop.send(true);
            let _ = server.await;
            return Err(e);
        }
    };
    serving.set_ready(loaded).await;

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
                config.grpc.tls.clone(),
                admin_listener,
                until_stopped(),
            )))
        }
        None => None,
    };
    let adapters = registry.snapshot().adapters().count();
    tracing::info!(
        %addr,
        repository = %config.models.repository.display(),
        adapters,
        "serving"
    );
    server.await.context("gRPC server task")??;
    if let Some(admin) = admin {
        admin.await.context("admin API task")??;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Builds the registry and engine over the loaded models.
fn start_engine(
    config: &ServeConfig,
    runtime: Arc<crate::runtime::Runtime>,
    loaded: crate::repository::Loaded,
) -> anyhow::Result<(Loaded, Arc<Registry>, Arc<crate::runtime::Runtime>)> {
    if loaded.snapshot.backbones().is_empty() {
        anyhow::bail!(
            "no backbone loaded from {}: nothing to serve",
            config.models.repository.display()
        );
    }
    let adapters = loaded.snapshot.adapters().count();
    if adapters == 0 {
        tracing::warn!("no task adapter loaded: every Classify call will answer NOT_FOUND");
    }
    let failures = loaded.failures;
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
    // models skipped at start: adapters join the registry's failure list (ListAdapters,
    // fptserve_adapters{state="failed"}); backbones are only counted
    let tasks_dir = config.models.repository.join("tasks");
    for failure in failures {
        match failure.path.strip_prefix(&tasks_dir) {
            Ok(relative) => {
                let mut parts = relative.iter().map(|p| p.to_string_lossy().into_owned());
                registry.record_failure(Failure {
                    task: parts.next().unwrap_or_default(),
                    version: parts.next().unwrap_or_default(),
                    path: failure.path.display().to_string(),
                    error: failure.error,
                    at_unix_ms: unix_ms(),
                });
            }
            Err(_) => metrics::load_failure("backbone"),
        }
    }
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
    let loaded = Loaded {
        engine,
        runtime: runtime.clone(),
        repository: config.models.repository.clone(),
    };
    Ok((loaded, registry, runtime))
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
