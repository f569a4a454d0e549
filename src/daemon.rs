//! The daemon's wiring, called by `fptserve serve` and by the tests alike: ONNX Runtime,
//! the models through the adapter lifecycle, the engine, the inference and admin
//! listeners, the repository watch and the metrics, all stopped by one shutdown signal.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::{ModelConfig, ServeConfig};
use crate::engine::Engine;
use crate::grpc::admin::{AdminService, AllowedRoots, BearerToken};
use crate::grpc::calls::Serving;
use crate::lifecycle::{Lifecycle, StartOptions, Started};
use crate::runtime::Runtime;
use crate::signing::Trust;
use crate::{metrics, server};

/// The listeners the daemon serves on, bound before it starts (port 0 in tests).
pub struct Listeners {
    /// The inference APIs (Classifier, Open Inference Protocol, health, reflection).
    pub grpc: TcpListener,
    /// The admin API, when the configuration enables it.
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses `config` names.
    pub async fn bind(config: &ServeConfig) -> anyhow::Result<Self> {
        let grpc = TcpListener::bind(config.grpc_listen)
            .await
            .with_context(|| format!("binding gRPC on {}", config.grpc_listen))?;
        let admin = match &config.admin {
            Some(admin) => Some(
                TcpListener::bind(admin.listen)
                    .await
                    .with_context(|| format!("binding the admin API on {}", admin.listen))?,
            ),
            None => None,
        };
        Ok(Listeners { grpc, admin })
    }
}

/// What a started daemon serves, handed out once its models are loaded and warm.
pub struct Ready {
    /// The engine (its counters, its registry).
    pub engine: Arc<Engine>,
    /// Model folders skipped at start-up, and why.
    pub failures: Vec<crate::repository::LoadFailure>,
}

/// Brings up ONNX Runtime and loads the repository through the adapter lifecycle,
/// checking adapter signatures against `trust` when given. Blocking.
pub fn load_models(
    config: &ModelConfig,
    trust: Option<Trust>,
    max_adapters: Option<usize>,
) -> anyhow::Result<Started> {
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
    if let Some(max_adapters) = max_adapters {
        tracing::info!(max_adapters, "adapter budget");
    }
    let options = StartOptions {
        max_adapters,
        allowed_variants: config.allowed_variants.clone(),
        backbone_precision: config.backbone_precision,
    };
    Ok(Lifecycle::start(&config.repository, runtime, options)?)
}

/// Runs the daemon on `listeners` until `shutdown` resolves. The inference listener
/// answers at once (health NOT_SERVING, calls UNAVAILABLE) while the models load; when
/// they are loaded and warm it turns SERVING and `ready` (when given) gets what it serves.
pub async fn run(
    config: ServeConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: Option<tokio::sync::oneshot::Sender<Ready>>,
) -> anyhow::Result<()> {
    // one shutdown signal for every listener and background task
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
        shutdown.await;
        let _ = signalled.send(true);
    });

    if let Some(addr) = config.metrics_listen {
        metrics::install(addr, until_stopped())
            .with_context(|| format!("starting the metrics listener on {addr}"))?;
        tracing::info!(%addr, "metrics on http://{addr}/metrics");
    }
    let mut config = config;
    if let Some(files) = &config.tls {
        let tls = crate::tls::Tls::load(files.clone()).context("loading the TLS files")?;
        tracing::info!(mutual = tls.mutual(), "TLS on the gRPC listeners");
        config.grpc.tls = Some(tls);
    }
    let addr = listeners.grpc.local_addr()?;
    let admin_token: Option<Arc<str>> = config
        .admin
        .as_ref()
        .and_then(|a| a.token.as_deref())
        .map(Arc::from);
    let (serving, health) = Serving::new(config.grpc.max_in_flight, admin_token.clone()).await;
    let server = tokio::spawn(server::serve(
        serving.clone(),
        health,
        config.grpc.clone(),
        listeners.grpc,
        until_stopped(),
    ));
    tracing::info!(%addr, "listening");

    if let Some(trust) = &config.trust {
        tracing::info!(
            keys = trust.keys(),
            required = trust.required(),
            "adapter signatures checked"
        );
    }
    let (models, trust, max_adapters) = (
        config.models.clone(),
        config.trust.clone(),
        config.max_adapters,
    );
    let loading = tokio::task::spawn_blocking(move || load_models(&models, trust, max_adapters));
    let loaded = tokio::select! {
        loaded = loading => loaded.context("loading models").and_then(|l| l),
        () = until_stopped() => {
            tracing::info!("stopped while loading the models");
            return server.await.context("gRPC server task")?.map_err(Into::into);
        }
    };
    let started = match loaded.and_then(|started| start_engine(&config, started)) {
        Ok(started) => started,
        Err(e) => {
            let _ = stop.send(true);
            let _ = server.await;
            return Err(e);
        }
    };
    let (engine, failures) = started;
    let lifecycle = engine.lifecycle().clone();
    if let Some(interval) = config.watch_interval {
        tracing::info!(?interval, "watching the repository's tasks/ folder");
        tokio::spawn(crate::watch::run(
            lifecycle.clone(),
            interval,
            until_stopped(),
        ));
    }
    serving.set_ready(engine.clone()).await;

    let admin = match (&config.admin, listeners.admin) {
        (Some(admin), Some(listener)) => {
            let roots = AllowedRoots::new(&config.models.repository, &admin.allow_roots)
                .context("resolving the repository and admin_allow_roots")?;
            tracing::info!(
                addr = %listener.local_addr()?,
                token = admin.token.is_some(),
                "admin API listening"
            );
            Some(tokio::spawn(server::run_admin(
                AdminService::new(lifecycle.clone(), roots),
                BearerToken(admin_token),
                config.grpc.max_message_bytes,
                config.grpc.tls.clone(),
                listener,
                until_stopped(),
            )))
        }
        _ => None,
    };
    tracing::info!(
        %addr,
        repository = %config.models.repository.display(),
        adapters = lifecycle.registry().snapshot().adapters().count(),
        "serving"
    );
    if let Some(ready) = ready {
        let _ = ready.send(Ready { engine, failures });
    }
    server.await.context("gRPC server task")??;
    if let Some(admin) = admin {
        admin.await.context("admin API task")??;
    }
    tracing::info!("stopped");
    Ok(())
}

/// The engine over the started models.
fn start_engine(
    config: &ServeConfig,
    started: Started,
) -> anyhow::Result<(Arc<Engine>, Vec<crate::repository::LoadFailure>)> {
    let Started {
        lifecycle,
        failures,
    } = started;
    let snapshot = lifecycle.registry().snapshot();
    if snapshot.backbones().is_empty() {
        anyhow::bail!(
            "no backbone loaded from {}: nothing to serve",
            config.models.repository.display()
        );
    }
    if snapshot.adapters().next().is_none() {
        tracing::warn!("no task adapter loaded: every Classify call will answer NOT_FOUND");
    }
    let runtime = lifecycle.runtime();
    let gpu = matches!(runtime.device(), crate::runtime::Device::Cuda(_));
    let settings = config.engine.resolve(gpu);
    // after the models loaded: a CUDA provider that failed to start has fallen back by now
    tracing::info!(
        device = %runtime.device(),
        max_batch_size = settings.batch.max_batch,
        max_batch_delay_ms = settings.batch.max_delay.as_secs_f64() * 1e3,
        max_queue = settings.batch.max_queue,
        io_binding = settings.batch.io_binding,
        feature_cache_bytes = settings.feature_cache_bytes,
        decode_threads = settings.decode_threads,
        intra_op_threads = config.models.threads.intra_op,
        inter_op_threads = config.models.threads.inter_op,
        "engine"
    );
    let engine = Arc::new(Engine::new(lifecycle, config.limits, settings));
    Ok((engine, failures))
}
