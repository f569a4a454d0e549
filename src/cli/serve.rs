//! `fptserve serve`: bind, load the repository, serve until SIGINT/SIGTERM.

use crate::config::ServeConfig;
use crate::daemon::{self, Listeners};

/// Runs the daemon. The gRPC port is bound first, so that health checks and ServerLive
/// answer while the models load (NOT_SERVING / not ready until they are warm).
pub async fn run(config: ServeConfig) -> anyhow::Result<()> {
    let listeners = Listeners::bind(&config).await?;
    daemon::run(config, listeners, shutdown_signal(), None).await
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
