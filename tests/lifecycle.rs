//! The adapter lifecycle as operators meet it: whichever path loads an adapter (start-up,
//! the admin API's LoadAdapter, the Open Inference Protocol's RepositoryModelLoad, the
//! repository watch, a request for an adapter evicted under the budget), the same bad
//! adapter is refused with the same status code and message, recorded in ListAdapters
//! with that message and counted in `fptserve_model_load_failures_total`; and models are
//! warm before the daemon says SERVING, so no request pays a first run.
//!
//! One test per process reads the metrics (nextest runs each test in its own process; the
//! Prometheus recorder is global).

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::{TestServer, copy_tree, demo_repository, fixture};
use fptserve::config::{AdminConfig, ServeConfig};
use fptserve::proto::inference as kserve;
use fptserve::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use fptserve::proto::v1 as pb;
use fptserve::signing::Trust;
use serde_json::Value;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const TOKEN: &str = "lifecycle-test-token";

/// The bad adapters, by task name, and the code each is refused with.
const BAD: [(&str, Code); 3] = [
    ("digest", Code::DataLoss),
    ("foreign-backbone", Code::FailedPrecondition),
    ("bad-signature", Code::PermissionDenied),
];

/// Writes `tasks/<name>/1` as a copy of dr-grade@1 made bad in the way its name says.
fn write_bad_adapter(repo: &Path, name: &str) {
    let dir = repo.join("tasks").join(name).join("1");
    copy_tree(&repo.join("tasks/dr-grade/1"), &dir);
    let file = dir.join("manifest.json");
    let mut manifest: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    manifest["task"] = name.into();
    match name {
        "digest" => manifest["sha256"] = "0".repeat(64).into(),
        "foreign-backbone" => manifest["backbone"]["sha256"] = "1".repeat(64).into(),
        "bad-signature" => std::fs::write(dir.join("manifest.sig"), "ab".repeat(64)).unwrap(),
        other => panic!("no such bad adapter: {other}"),
    }
    std::fs::write(&file, manifest.to_string()).unwrap();
}

/// A free loopback port for the metrics listener (the exporter binds it itself).
fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The daemon over `repo` with signatures checked against a key nobody signed with, the
/// admin API (and so the repository extension) behind TOKEN, and metrics on `metrics`.
fn daemon_config(repo: &Path, keys: &Path, metrics: Option<SocketAddr>) -> ServeConfig {
    std::fs::write(keys, format!("{}\n", "42".repeat(32))).unwrap();
    ServeConfig {
        admin: Some(AdminConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            token: Some(TOKEN.into()),
            allow_roots: Vec::new(),
        }),
        trust: Some(Trust::load(keys, false).unwrap()),
        metrics_listen: metrics,
        ..common::config(repo)
    }
}

fn authorized<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    request
}

/// FAILED entries of ListAdapters: task -> every error recorded for it.
async fn failed(server: &TestServer) -> BTreeMap<String, Vec<String>> {
    let mut admin = server.admin().await;
    let mut failed: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for a in admin
        .list_adapters(authorized(pb::ListAdaptersRequest {}))
        .await
        .unwrap()
        .into_inner()
        .adapters
    {
        if a.state == pb::AdapterState::Failed as i32 {
            failed.entry(a.task).or_default().push(a.error);
        }
    }
    failed
}

/// One sample of the metrics page.
async fn metric(addr: SocketAddr, series: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut page = String::new();
    stream.read_to_string(&mut page).await.unwrap();
    page.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} not on the metrics page:\n{page}"))
}

fn assert_refusal(path: &str, got: &Status, code: Code, message: &str) {
    assert_eq!(got.code(), code, "{path}: {}", got.message());
    assert_eq!(got.message(), message, "{path} says it differently");
}

#[tokio::test]
async fn every_load_path_refuses_a_bad_adapter_alike_and_start_up_leaves_nothing_cold() {
    let temp = tempfile::tempdir().unwrap();
    // as the admin API resolves paths, so the messages name the same files
    let repo = temp.path().canonicalize().unwrap();
    copy_tree(&demo_repository(), &repo);
    for (name, _) in BAD {
        write_bad_adapter(&repo, name);
    }
    let keys = tempfile::NamedTempFile::new().unwrap();
    let metrics = free_port();
    let server = TestServer::start_config(daemon_config(&repo, keys.path(), Some(metrics))).await;
    const FAILURES: &str = "fptserve_model_load_failures_total{kind=\"adapter\"}";

    // Start-up warmed every model: the first call runs none cold.
    let mut client = server.client().await;
    client
        .classify(common::request(
            pb::classify_request::Input::Image(fixture("images/rgb8.png")),
            &["dr-grade", "skin-lesion", "chest-xray"],
        ))
        .await
        .unwrap();
    for kind in ["backbone", "adapter"] {
        let cold = format!("fptserve_model_cold_runs_total{{kind=\"{kind}\"}}");
        assert_eq!(metric(metrics, &cold).await, 0.0, "{kind} ran cold");
    }

    // Start-up: each refused and recorded, with the reason the other paths must repeat.
    let at_start = failed(&server).await;
    assert_eq!(metric(metrics, FAILURES).await, BAD.len() as f64);
    let mut admin = server.admin().await;
    let mut inference = GrpcInferenceServiceClient::new(
        Channel::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    for (name, code) in BAD {
        let reasons = &at_start[name];
        assert_eq!(reasons.len(), 1, "{name}: {reasons:?}");
        let reason = &reasons[0];

        let via_admin = admin
            .load_adapter(authorized(pb::LoadAdapterRequest {
                path: format!("tasks/{name}/1"),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_refusal("LoadAdapter", &via_admin, code, reason);

        let via_repository = inference
            .repository_model_load(authorized(kserve::RepositoryModelLoadRequest {
                model_name: name.into(),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_refusal("RepositoryModelLoad", &via_repository, code, reason);
    }
    let recorded = failed(&server).await;
    for (name, _) in BAD {
        assert_eq!(recorded[name], vec![at_start[name][0].clone(); 3], "{name}");
    }
    assert_eq!(metric(metrics, FAILURES).await, 3.0 * BAD.len() as f64);
    drop(server);

    // The repository watch: the same folders, appearing while the daemon serves.
    let moved = tempfile::tempdir().unwrap();
    for (name, _) in BAD {
        std::fs::rename(repo.join("tasks").join(name), moved.path().join(name)).unwrap();
    }
    let watching = TestServer::start_config(ServeConfig {
        watch_interval: Some(Duration::from_millis(50)),
        ..daemon_config(&repo, keys.path(), None)
    })
    .await;
    assert!(failed(&watching).await.is_empty());
    for (name, _) in BAD {
        std::fs::rename(moved.path().join(name), repo.join("tasks").join(name)).unwrap();
    }
    let mut seen = BTreeMap::new();
    for _ in 0..200 {
        seen = failed(&watching).await;
        if seen.len() == BAD.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (name, _) in BAD {
        assert_eq!(seen.get(name), Some(&at_start[name]), "watch: {name}");
    }
}

#[tokio::test]
async fn a_failed_reload_after_eviction_is_refused_like_any_load_and_recorded() {
    let temp = tempfile::tempdir().unwrap();
    let repo = temp.path().canonicalize().unwrap();
    copy_tree(&demo_repository(), &repo);
    let keys = tempfile::NamedTempFile::new().unwrap();
    let server = TestServer::start_config(ServeConfig {
        max_adapters: Some(1),
        ..daemon_config(&repo, keys.path(), None)
    })
    .await;
    let mut client = server.client().await;
    let image = || pb::classify_request::Input::Image(fixture("images/rgb8.png"));
    // skin-lesion@1 is evicted by using another adapter, then its folder goes bad
    client
        .classify(common::request(image(), &["dr-grade@2"]))
        .await
        .unwrap();
    assert!(failed(&server).await.is_empty());
    let file = repo.join("tasks/skin-lesion/1/manifest.json");
    let mut manifest: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    manifest["sha256"] = "0".repeat(64).into();
    std::fs::write(&file, manifest.to_string()).unwrap();

    let refused = client
        .classify(common::request(image(), &["skin-lesion@1"]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::DataLoss, "{}", refused.message());
    let recorded = failed(&server).await;
    let reason = &recorded["skin-lesion"];
    assert_eq!(reason.len(), 1, "{recorded:?}");
    assert!(
        refused.message().ends_with(&format!(": {}", reason[0])),
        "the call says why, as ListAdapters does: {} / {}",
        refused.message(),
        reason[0]
    );
    // and LoadAdapter on the same folder answers exactly what ListAdapters recorded
    let mut admin = server.admin().await;
    let direct = admin
        .load_adapter(authorized(pb::LoadAdapterRequest {
            path: "tasks/skin-lesion/1".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_refusal("LoadAdapter", &direct, Code::DataLoss, &reason[0]);
}
