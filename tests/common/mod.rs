//! Shared test set-up: the real server on an ephemeral port over the committed demo
//! repository, a generated client, and the exporter's reference numbers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fptserve::config::{AdminConfig, ModelConfig, ServeConfig};
use fptserve::daemon::{self, Listeners, Ready};
use fptserve::decode::Limits;
use fptserve::engine::{Engine, EngineSettings};
use fptserve::lifecycle::{Lifecycle, Started};
use fptserve::proto::v1::ClassifyRequest;
use fptserve::proto::v1::admin_client::AdminClient;
use fptserve::proto::v1::classifier_client::ClassifierClient;
use fptserve::proto::v1::classify_request::Input;
use fptserve::repository::LoadFailure;
use fptserve::runtime::{Device, Runtime, Threads};
use fptserve::server::GrpcSettings;
use serde::Deserialize;
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// The source tree.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The committed demo repository.
pub fn demo_repository() -> PathBuf {
    root().join("models/demo")
}

/// The committed fixtures folder.
pub fn fixtures() -> PathBuf {
    root().join("models/fixtures")
}

/// Reads a fixture file.
pub fn fixture(relative: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// An ONNX Runtime on the CPU with one thread per operator (tests run in parallel), or as many
/// as FPTSERVE_INTRA_OP_THREADS says (the daemon's variable; 0 = one per core), so the suite can
/// be run with another thread count to show that no answer depends on it.
pub fn runtime() -> Arc<Runtime> {
    Arc::new(
        Runtime::new(None, Device::Cpu, runtime_threads())
            .expect("ONNX Runtime (run tools/fetch-onnxruntime.sh)"),
    )
}

fn runtime_threads() -> Threads {
    let intra_op = std::env::var("FPTSERVE_INTRA_OP_THREADS")
        .ok()
        .filter(|v| !v.is_empty())
        .map_or(1, |v| {
            v.parse()
                .unwrap_or_else(|e| panic!("FPTSERVE_INTRA_OP_THREADS={v}: {e}"))
        });
    Threads {
        intra_op,
        inter_op: 1,
    }
}

/// Loads `repository` as start-up does (backbones, then every adapter through the
/// lifecycle), without a server.
pub fn load(repository: &Path) -> Started {
    Lifecycle::start(repository, runtime(), Default::default()).expect("repository loads")
}

/// How `TestServer::start_admin` sets up the admin side.
#[derive(Default)]
pub struct AdminOptions<'a> {
    /// Bearer token the admin API requires.
    pub token: Option<&'a str>,
    /// Adapter budget.
    pub max_adapters: Option<usize>,
    /// Repository watch period.
    pub watch: Option<std::time::Duration>,
}

/// A running daemon (the binary's own wiring, `fptserve::daemon`); stops when dropped.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Models skipped at load.
    pub failures: Vec<LoadFailure>,
    /// Where the admin API listens, when started with it.
    pub admin_addr: Option<SocketAddr>,
    /// The engine it serves (for its counters).
    pub engine: Arc<Engine>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The daemon's settings for tests: `repository` on the CPU (threads as [`runtime`]
/// says), no metrics listener, no admin API unless asked for.
pub fn config(repository: &Path) -> ServeConfig {
    let threads = runtime_threads();
    ServeConfig {
        models: ModelConfig {
            repository: repository.to_path_buf(),
            device: Device::Cpu,
            onnxruntime_lib: None,
            threads,
            allowed_variants: Vec::new(),
            backbone_precision: Default::default(),
        },
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        grpc: GrpcSettings::default(),
        limits: Limits::default(),
        admin: None,
        tls: None,
        trust: None,
        max_adapters: None,
        watch_interval: None,
        engine: EngineSettings::default().into(),
    }
}

impl TestServer {
    /// Starts the daemon with `config` on ephemeral ports; returns once it is SERVING.
    pub async fn start_config(config: ServeConfig) -> Self {
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = grpc.local_addr().unwrap();
        let admin = match &config.admin {
            Some(_) => Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
            None => None,
        };
        let admin_addr = admin.as_ref().map(|l| l.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let listeners = Listeners { grpc, admin };
        tokio::spawn(async move {
            let shutdown = async {
                let _ = rx.await;
            };
            daemon::run(config, listeners, shutdown, Some(ready_tx))
                .await
                .expect("daemon runs");
        });
        let Ready { engine, failures } = ready_rx.await.expect("the daemon starts serving");
        TestServer {
            addr,
            failures,
            admin_addr,
            engine,
            shutdown: Some(tx),
        }
    }

    /// Starts the server over `repository` with the given settings.
    pub async fn start_with(repository: &Path, settings: GrpcSettings, limits: Limits) -> Self {
        Self::start_engine(repository, settings, limits, EngineSettings::default()).await
    }

    /// Starts the server over the demo repository with these engine settings.
    pub async fn start_demo_engine(engine: EngineSettings) -> Self {
        Self::start_engine(
            &demo_repository(),
            GrpcSettings::default(),
            Limits::default(),
            engine,
        )
        .await
    }

    /// Starts the server over `repository` with every setting given.
    pub async fn start_engine(
        repository: &Path,
        settings: GrpcSettings,
        limits: Limits,
        engine_settings: EngineSettings,
    ) -> Self {
        Self::start_config(ServeConfig {
            grpc: settings,
            limits,
            engine: engine_settings.into(),
            ..config(repository)
        })
        .await
    }

    /// Starts the server and the admin API over `repository`; the admin API requires
    /// `token` when given.
    pub async fn start_with_admin(repository: &Path, token: Option<&str>) -> Self {
        Self::start_admin(
            repository,
            AdminOptions {
                token,
                ..Default::default()
            },
        )
        .await
    }

    /// Starts the server and the admin API with `options`.
    pub async fn start_admin(repository: &Path, options: AdminOptions<'_>) -> Self {
        Self::start_config(ServeConfig {
            admin: Some(AdminConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                token: options.token.map(str::to_string),
                allow_roots: Vec::new(),
            }),
            max_adapters: options.max_adapters,
            watch_interval: options.watch,
            ..config(repository)
        })
        .await
    }

    /// A connected admin client (the server must have been started with the admin API).
    pub async fn admin(&self) -> AdminClient<Channel> {
        let addr = self.admin_addr.expect("started with the admin API");
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .expect("connects");
        AdminClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// Starts the server over the demo repository with default settings.
    pub async fn start() -> Self {
        Self::start_with(
            &demo_repository(),
            GrpcSettings::default(),
            Limits::default(),
        )
        .await
    }

    /// A connected client.
    pub async fn client(&self) -> ClassifierClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connects");
        ClassifierClient::new(channel)
            .max_decoding_message_size(512 << 20)
            .max_encoding_message_size(512 << 20)
    }
}

/// `models/fixtures/reference.json`, written by the exporter from PyTorch + PIL.
#[derive(Deserialize)]
pub struct Reference {
    /// Allowed absolute difference of probabilities.
    pub tolerance: f64,
    /// One per input x task version.
    pub cases: Vec<Case>,
}

/// One reference answer.
#[derive(Deserialize, Clone)]
pub struct Case {
    /// Path under models/fixtures.
    pub input: String,
    /// `image` or `dicom`.
    pub kind: String,
    /// Task name.
    pub task: String,
    /// Adapter version.
    pub version: String,
    /// Class names.
    pub classes: Vec<String>,
    /// PyTorch logits.
    pub logits: Vec<f64>,
    /// Softmax of the logits.
    pub probabilities: Vec<f64>,
    /// Top class.
    pub label: String,
    /// DICOM UIDs, for DICOM inputs.
    pub study_instance_uid: Option<String>,
    /// (0020,000E).
    pub series_instance_uid: Option<String>,
    /// (0008,0018).
    pub sop_instance_uid: Option<String>,
}

/// A Classify request for `tasks` on `input`.
pub fn request(input: Input, tasks: &[&str]) -> ClassifyRequest {
    ClassifyRequest {
        input: Some(input),
        tasks: tasks.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    }
}

/// A reference case's input file as a request input.
pub fn input_of(case: &Case) -> Input {
    let bytes = fixture(&case.input);
    match case.kind.as_str() {
        "dicom" => Input::Dicom(bytes),
        "image" => Input::Image(bytes),
        other => panic!("unknown kind {other}"),
    }
}

/// Loads the reference numbers.
pub fn reference() -> Reference {
    serde_json::from_slice(&fixture("reference.json")).expect("reference.json parses")
}

/// Copies a folder tree (a model repository into a temporary folder, say).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
