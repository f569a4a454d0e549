//! TLS and mutual TLS on the gRPC listeners (rustls, ring), with the certificate, key and
//! client CA re-read while serving: each new connection checks the files' modification
//! times and sizes, and a change applies from that connection on (connections already
//! open keep the session they have). A change that does not load (a half-written file, a
//! key that does not match) is logged and the previous configuration stays.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig, crypto};
use tokio_rustls::server::TlsStream;

/// Longest a client may take for its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the server's certificate chain and key are, and for mutual TLS the CA that
/// client certificates must chain to.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA certificates; when set, clients must present a certificate they sign.
    pub client_ca: Option<PathBuf>,
}

/// Modification times and sizes of the files, to notice a change.
type Stamp = Vec<Option<(SystemTime, u64)>>;

impl TlsFiles {
    fn paths(&self) -> Vec<&Path> {
        let mut paths = vec![self.cert.as_path(), self.key.as_path()];
        paths.extend(self.client_ca.as_deref());
        paths
    }

    fn stamp(&self) -> Stamp {
        self.paths()
            .iter()
            .map(|p| {
                let m = std::fs::metadata(p).ok()?;
                Some((m.modified().ok()?, m.len()))
            })
            .collect()
    }

    /// Reads the files into a server configuration (HTTP/2 only, as gRPC needs).
    fn load(&self) -> anyhow::Result<Arc<ServerConfig>> {
        let provider = Arc::new(crypto::ring::default_provider());
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|certs| certs.collect())
            .with_context(|| format!("tls_cert {}", self.cert.display()))?;
        if certs.is_empty() {
            bail!("tls_cert {} holds no certificate", self.cert.display());
        }
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .with_context(|| format!("tls_key {}", self.key.display()))?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(ca)
                    .with_context(|| format!("tls_client_ca {}", ca.display()))?
                {
                    roots
                        .add(cert.with_context(|| format!("tls_client_ca {}", ca.display()))?)
                        .with_context(|| format!("tls_client_ca {}", ca.display()))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .with_context(|| format!("tls_client_ca {}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .context("tls_cert and tls_key do not make a usable pair")?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The current TLS configuration of the listeners, reloaded when its files change.
pub struct Tls {
    files: TlsFiles,
    current: Mutex<(Arc<ServerConfig>, Stamp)>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

impl Tls {
    /// Loads the files; an error says which file and why.
    pub fn load(files: TlsFiles) -> anyhow::Result<Arc<Self>> {
        let stamp = files.stamp();
        let config = files.load()?;
        Ok(Arc::new(Tls {
            files,
            current: Mutex::new((config, stamp)),
        }))
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The configuration for a new connection, re-read first if the files changed.
    fn config(&self) -> Arc<ServerConfig> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let stamp = self.files.stamp();
        if stamp != current.1 {
            match self.files.load() {
                Ok(config) => {
                    tracing::info!("TLS certificates reloaded");
                    *current = (config, stamp);
                }
                Err(e) => {
                    // a copy in progress is retried on the next connection
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "TLS files changed but do not load; keeping the previous ones"
                    );
                }
            }
        }
        current.0.clone()
    }

    /// Accepts connections on `listener` and completes their TLS handshakes, for tonic.
    /// Failed handshakes are logged and dropped; they never reach the server.
    pub fn incoming(self: &Arc<Self>, listener: TcpListener) -> Incoming {
        let (sender, receiver) = tokio::sync::mpsc::channel(64);
        let tls = self.clone();
        let accept = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = TlsAcceptor::from(tls.config());
                let sender = sender.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = sender.send(Ok(stream)).await;
                        }
                        Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake refused"),
                        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Incoming { receiver, accept }
    }
}

/// TLS connections ready for tonic; stops accepting when dropped.
pub struct Incoming {
    receiver: tokio::sync::mpsc::Receiver<std::io::Result<TlsStream<TcpStream>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl tokio_stream::Stream for Incoming {
    type Item = std::io::Result<TlsStream<TcpStream>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        self.receiver.poll_recv(cx)
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
