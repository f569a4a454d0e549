//! The admin API against the real server: adapters loaded, replaced, unloaded and
//! re-defaulted while clients keep classifying, and every kind of bad adapter refused
//! with its own status while serving goes on unchanged. Expected probabilities are the
//! exporter's PyTorch numbers (models/fixtures/reference.json).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{TestServer, copy_tree, demo_repository, fixture, reference};
use fptserve::proto::v1 as pb;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tonic::Code;

const INPUT: &str = "images/rgb8.png";

/// The reference probabilities of `task@version` on INPUT.
fn expected(task: &str, version: &str) -> Vec<f64> {
    reference()
        .cases
        .into_iter()
        .find(|c| c.input == INPUT && c.task == task && c.version == version)
        .unwrap_or_else(|| panic!("no reference for {task}@{version}"))
        .probabilities
}

fn temp_repository() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&demo_repository(), dir.path());
    dir
}

fn load_path(path: &str) -> pb::LoadAdapterRequest {
    pb::LoadAdapterRequest {
        path: path.into(),
        ..Default::default()
    }
}

async fn classify(
    client: &mut pb::classifier_client::ClassifierClient<tonic::transport::Channel>,
    task: &str,
) -> Result<pb::TaskResult, tonic::Status> {
    let response = client
        .classify(pb::ClassifyRequest {
            input: Some(pb::classify_request::Input::Image(fixture(INPUT))),
            tasks: vec![task.into()],
            ..Default::default()
        })
        .await?;
    Ok(response.into_inner().results.remove(0))
}

fn probabilities(result: &pb::TaskResult) -> Vec<f64> {
    result
        .scores
        .iter()
        .map(|s| f64::from(s.probability))
        .collect()
}

fn assert_close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-4, "{what}: {got:?} vs {want:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn swaps_under_load_fail_no_request() {
    let repo = temp_repository();
    let server = TestServer::start_with_admin(repo.path(), None).await;
    let want: BTreeMap<&str, Vec<f64>> = [
        ("1", expected("dr-grade", "1")),
        ("2", expected("dr-grade", "2")),
    ]
    .into();
    let stop = Arc::new(AtomicBool::new(false));

    let mut clients = Vec::new();
    for n in 0..4 {
        let mut client = server.client().await;
        let stop = stop.clone();
        let want = want.clone();
        clients.push(tokio::spawn(async move {
            // half the clients follow the default version, half pin version 2
            let task = if n % 2 == 0 { "dr-grade" } else { "dr-grade@2" };
            let mut answered: BTreeMap<String, usize> = BTreeMap::new();
            while !stop.load(Ordering::Relaxed) {
                let result = classify(&mut client, task)
                    .await
                    .unwrap_or_else(|e| panic!("{task} failed during swaps: {e:?}"));
                let version = result.adapter_version.clone();
                let expected = want
                    .get(version.as_str())
                    .unwrap_or_else(|| panic!("unexpected version {version}"));
                assert_close(
                    &probabilities(&result),
                    expected,
                    &format!("dr-grade@{version}"),
                );
                if n % 2 == 1 {
                    assert_eq!(version, "2", "a pinned request got another version");
                }
                *answered.entry(version).or_default() += 1;
            }
            answered
        }));
    }

    let mut admin = server.admin().await;
    for i in 0..50 {
        if i % 2 == 0 {
            // version 1 leaves (the default falls back to version 2), and another task
            for task in ["dr-grade", "skin-lesion"] {
                admin
                    .unload_adapter(pb::UnloadAdapterRequest {
                        task: task.into(),
                        version: "1".into(),
                    })
                    .await
                    .unwrap();
            }
        } else {
            let mut load = load_path("tasks/dr-grade/1");
            load.make_default = true;
            let loaded = admin.load_adapter(load).await.unwrap().into_inner();
            assert!(loaded.adapter.unwrap().is_default);
            admin
                .load_adapter(load_path("tasks/skin-lesion/1"))
                .await
                .unwrap();
            if i % 4 == 3 {
                // and back: rollback is setting the previous default
                let previous = admin
                    .set_default_version(pb::SetDefaultVersionRequest {
                        task: "dr-grade".into(),
                        version: "2".into(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .previous;
                assert_eq!(previous, "1");
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut total: BTreeMap<String, usize> = BTreeMap::new();
    for c in clients {
        for (version, n) in c.await.expect("no client failed") {
            *total.entry(version).or_default() += n;
        }
    }
    assert!(
        total.get("1").copied().unwrap_or(0) > 0,
        "version 1 served: {total:?}"
    );
    assert!(
        total.get("2").copied().unwrap_or(0) > 0,
        "version 2 served: {total:?}"
    );

    // what operators see: the reloaded version 1 serving, earlier copies unloaded
    let listed = listed(&mut admin).await;
    let ready: Vec<_> = listed
        .iter()
        .filter(|a| a.state == pb::AdapterState::Ready as i32 && a.task == "dr-grade")
        .collect();
    assert_eq!(ready.len(), 2, "{ready:?}");
    assert!(
        ready
            .iter()
            .any(|a| a.version == "2" && a.requests_served > 0)
    );
    assert!(listed.iter().any(|a| a.task == "dr-grade"
        && a.version == "1"
        && a.state == pb::AdapterState::Unloaded as i32));
}

/// Writes an adapter folder under the repository: the dr-grade@1 files with `edit` applied
/// to the manifest (and `onnx` instead of its model when given).
fn bad_adapter(repo: &Path, name: &str, onnx: Option<&[u8]>, edit: impl FnOnce(&mut Value)) {
    let source = repo.join("tasks/dr-grade/1");
    let dir = repo.join("tasks").join(name).join("1");
    std::fs::create_dir_all(&dir).unwrap();
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(source.join("manifest.json")).unwrap()).unwrap();
    manifest["task"] = name.into();
    let model = match onnx {
        Some(bytes) => bytes.to_vec(),
        None => std::fs::read(source.join("side.onnx")).unwrap(),
    };
    if onnx.is_some() {
        manifest["sha256"] = hex::encode(Sha256::digest(&model)).into();
    }
    edit(&mut manifest);
    std::fs::write(dir.join("side.onnx"), model).unwrap();
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
}

#[tokio::test]
async fn refused_loads_say_why_and_change_nothing() {
    let repo = temp_repository();
    let outside = tempfile::tempdir().unwrap();
    copy_tree(
        &repo.path().join("tasks/dr-grade/1"),
        &outside.path().join("adapter"),
    );
    bad_adapter(
        repo.path(),
        "corrupt",
        Some(b"not an onnx model at all"),
        |_| {},
    );
    bad_adapter(repo.path(), "digest", None, |m| {
        m["sha256"] = "0".repeat(64).into();
    });
    bad_adapter(repo.path(), "other-backbone", None, |m| {
        m["backbone"]["sha256"] = "1".repeat(64).into();
    });
    bad_adapter(repo.path(), "shape", None, |m| {
        let inputs = m["inputs"].as_array_mut().unwrap();
        let kv = inputs
            .iter_mut()
            .find(|i| i["name"] == "key_states")
            .unwrap();
        kv["shape"][2] = 99.into();
    });
    #[cfg(unix)]
    std::os::unix::fs::symlink(
        outside.path().join("adapter"),
        repo.path().join("tasks/linked"),
    )
    .unwrap();

    let server = TestServer::start_with_admin(repo.path(), None).await;
    let mut client = server.client().await;
    let before = probabilities(&classify(&mut client, "dr-grade").await.unwrap());
    let mut admin = server.admin().await;

    let cases: Vec<(String, Code, &str)> = vec![
        (
            "tasks/corrupt/1".into(),
            Code::InvalidArgument,
            "ONNX Runtime cannot load",
        ),
        ("tasks/digest/1".into(), Code::DataLoss, "SHA-256"),
        (
            "tasks/other-backbone/1".into(),
            Code::FailedPrecondition,
            "backbone",
        ),
        (
            "tasks/shape/1".into(),
            Code::FailedPrecondition,
            "key_states",
        ),
        ("tasks/missing/1".into(), Code::NotFound, "missing"),
        ("../".into(), Code::PermissionDenied, "outside"),
        (
            outside.path().join("adapter").display().to_string(),
            Code::PermissionDenied,
            "outside",
        ),
        #[cfg(unix)]
        ("tasks/linked".into(), Code::PermissionDenied, "outside"),
    ];
    for (path, code, needle) in &cases {
        let err = admin.load_adapter(load_path(path)).await.unwrap_err();
        assert_eq!(err.code(), *code, "{path}: {}", err.message());
        assert!(err.message().contains(needle), "{path}: {}", err.message());
        // serving is untouched
        let now = probabilities(&classify(&mut client, "dr-grade").await.unwrap());
        assert_eq!(now, before, "{path} changed what dr-grade answers");
    }
    let listed = listed(&mut admin).await;
    let failed: Vec<&str> = listed
        .iter()
        .filter(|a| a.state == pb::AdapterState::Failed as i32)
        .map(|a| a.task.as_str())
        .collect();
    for task in ["corrupt", "digest", "other-backbone", "shape"] {
        assert!(
            failed.contains(&task),
            "{task} not listed as failed: {failed:?}"
        );
    }
    assert!(
        !listed
            .iter()
            .any(|a| a.state == pb::AdapterState::Ready as i32
                && ["corrupt", "digest", "other-backbone", "shape"].contains(&a.task.as_str()))
    );
}

#[tokio::test]
async fn versions_pin_default_and_replace() {
    let repo = temp_repository();
    let server = TestServer::start_with_admin(repo.path(), None).await;
    let mut client = server.client().await;
    let mut admin = server.admin().await;
    let v1 = expected("dr-grade", "1");
    let v2 = expected("dr-grade", "2");

    // newest is the default; a pin gets its version
    assert_close(
        &probabilities(&classify(&mut client, "dr-grade").await.unwrap()),
        &v2,
        "default",
    );
    assert_close(
        &probabilities(&classify(&mut client, "dr-grade@1").await.unwrap()),
        &v1,
        "pin",
    );

    // roll back to version 1, then forward again
    let set = |version: &str| pb::SetDefaultVersionRequest {
        task: "dr-grade".into(),
        version: version.into(),
    };
    assert_eq!(
        admin
            .set_default_version(set("1"))
            .await
            .unwrap()
            .into_inner()
            .previous,
        "2"
    );
    assert_close(
        &probabilities(&classify(&mut client, "dr-grade").await.unwrap()),
        &v1,
        "rolled back",
    );
    assert_eq!(
        admin
            .set_default_version(set("2"))
            .await
            .unwrap()
            .into_inner()
            .previous,
        "1"
    );
    let err = admin.set_default_version(set("7")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // the same bytes again: nothing to do
    let again = admin
        .load_adapter(load_path("tasks/dr-grade/2"))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.replaced);

    // other bytes under a loaded version: refused unless replace is set
    let staged = repo.path().join("staging/dr-grade-2");
    copy_tree(&repo.path().join("tasks/dr-grade/1"), &staged);
    let manifest_path = staged.join("manifest.json");
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    manifest["version"] = "2".into();
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    let err = admin
        .load_adapter(load_path("staging/dr-grade-2"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{}", err.message());
    assert_close(
        &probabilities(&classify(&mut client, "dr-grade@2").await.unwrap()),
        &v2,
        "kept",
    );
    let mut replace = load_path("staging/dr-grade-2");
    replace.replace = true;
    assert!(
        admin
            .load_adapter(replace)
            .await
            .unwrap()
            .into_inner()
            .replaced
    );
    // no cache keyed by name: version 2 now answers with the new bytes (version 1's weights)
    assert_close(
        &probabilities(&classify(&mut client, "dr-grade@2").await.unwrap()),
        &v1,
        "replaced",
    );

    // an adapter uploaded as bytes
    let dir = repo.path().join("tasks/skin-lesion/1");
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    manifest["task"] = "uploaded".into();
    let uploaded = admin
        .load_adapter(pb::LoadAdapterRequest {
            manifest_json: manifest.to_string(),
            onnx: std::fs::read(dir.join("side.onnx")).unwrap(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(uploaded.adapter.unwrap().task, "uploaded");
    assert_close(
        &probabilities(&classify(&mut client, "uploaded").await.unwrap()),
        &expected("skin-lesion", "1"),
        "uploaded",
    );

    // unloading: new requests stop at once
    admin
        .unload_adapter(pb::UnloadAdapterRequest {
            task: "uploaded".into(),
            version: "1".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        classify(&mut client, "uploaded").await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn admin_token_is_required_when_set() {
    let server = TestServer::start_with_admin(&demo_repository(), Some("s3cret")).await;
    let mut admin = server.admin().await;
    let err = admin
        .list_adapters(pb::ListAdaptersRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut wrong = tonic::Request::new(pb::ListAdaptersRequest {});
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer guess".parse().unwrap());
    assert_eq!(
        admin.list_adapters(wrong).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let mut right = tonic::Request::new(pb::ListAdaptersRequest {});
    right
        .metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    let listed = admin.list_adapters(right).await.unwrap().into_inner();
    assert_eq!(
        listed
            .adapters
            .iter()
            .filter(|a| a.state == pb::AdapterState::Ready as i32)
            .count(),
        4
    );
}

async fn listed(
    admin: &mut pb::admin_client::AdminClient<tonic::transport::Channel>,
) -> Vec<pb::AdapterStatus> {
    admin
        .list_adapters(pb::ListAdaptersRequest {})
        .await
        .unwrap()
        .into_inner()
        .adapters
}

fn ready(list: &[pb::AdapterStatus]) -> Vec<String> {
    let mut names: Vec<String> = list
        .iter()
        .filter(|a| a.state == pb::AdapterState::Ready as i32)
        .map(|a| format!("{}@{}", a.task, a.version))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn budget_evicts_least_recently_used_and_reloads_on_demand() {
    let repo = temp_repository();
    let server = TestServer::start_admin(
        repo.path(),
        common::AdminOptions {
            max_adapters: Some(2),
            ..Default::default()
        },
    )
    .await;
    let mut client = server.client().await;
    let mut admin = server.admin().await;
    assert_eq!(
        ready(&listed(&mut admin).await).len(),
        2,
        "start-up respects the budget"
    );

    // every adapter answers, each reloaded on demand when it had been evicted, with its
    // own numbers
    for (task, version) in [
        ("dr-grade", "1"),
        ("skin-lesion", "1"),
        ("dr-grade", "2"),
        ("chest-xray", "1"),
    ] {
        for _ in 0..2 {
            let result = classify(&mut client, &format!("{task}@{version}"))
                .await
                .unwrap();
            assert_close(
                &probabilities(&result),
                &expected(task, version),
                &format!("{task}@{version}"),
            );
        }
        let now = ready(&listed(&mut admin).await);
        assert!(now.len() <= 2, "{now:?}");
        assert!(now.contains(&format!("{task}@{version}")), "{now:?}");
    }
    assert!(
        listed(&mut admin)
            .await
            .iter()
            .any(|a| a.error.contains("evicted"))
    );

    // a pinned adapter stays whatever else is used
    let mut pin = load_path("tasks/dr-grade/1");
    pin.pin = true;
    let pinned = admin
        .load_adapter(pin)
        .await
        .unwrap()
        .into_inner()
        .adapter
        .unwrap();
    assert!(pinned.pinned);
    for task in [
        "skin-lesion@1",
        "chest-xray@1",
        "dr-grade@2",
        "skin-lesion@1",
    ] {
        classify(&mut client, task).await.unwrap();
        assert!(ready(&listed(&mut admin).await).contains(&"dr-grade@1".to_string()));
    }
}

#[tokio::test]
async fn watch_mode_follows_the_repository() {
    let repo = temp_repository();
    let server = TestServer::start_admin(
        repo.path(),
        common::AdminOptions {
            watch: Some(std::time::Duration::from_millis(100)),
            ..Default::default()
        },
    )
    .await;
    let mut client = server.client().await;
    let mut admin = server.admin().await;
    async fn until(
        admin: &mut pb::admin_client::AdminClient<tonic::transport::Channel>,
        what: &str,
        check: impl Fn(&[String]) -> bool,
    ) {
        for _ in 0..100 {
            if check(&ready(&listed(admin).await)) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!(
            "watch mode never got to: {what}; ready: {:?}",
            ready(&listed(admin).await)
        );
    }

    // a new version appears: first a partly written copy (model file truncated), then whole
    let source = repo.path().join("tasks/dr-grade/1");
    let target = repo.path().join("tasks/dr-grade/3");
    std::fs::create_dir_all(&target).unwrap();
    let model = std::fs::read(source.join("side.onnx")).unwrap();
    std::fs::write(target.join("side.onnx"), &model[..model.len() / 2]).unwrap();
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(source.join("manifest.json")).unwrap()).unwrap();
    manifest["version"] = "3".into();
    std::fs::write(target.join("manifest.json"), manifest.to_string()).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(350)).await;
    assert!(!ready(&listed(&mut admin).await).contains(&"dr-grade@3".to_string()));
    std::fs::write(target.join("side.onnx"), &model).unwrap();
    until(&mut admin, "dr-grade@3 loaded", |r| {
        r.contains(&"dr-grade@3".to_string())
    })
    .await;
    let result = classify(&mut client, "dr-grade").await.unwrap();
    assert_eq!(
        result.adapter_version, "3",
        "the newest version is the default"
    );
    assert_close(
        &probabilities(&result),
        &expected("dr-grade", "1"),
        "dr-grade@3 = v1 weights",
    );

    // its bytes change: replaced
    let v2 = repo.path().join("tasks/dr-grade/2");
    std::fs::copy(v2.join("side.onnx"), target.join("side.onnx")).unwrap();
    let v2_manifest: Value =
        serde_json::from_slice(&std::fs::read(v2.join("manifest.json")).unwrap()).unwrap();
    manifest["sha256"] = v2_manifest["sha256"].clone();
    std::fs::write(target.join("manifest.json"), manifest.to_string()).unwrap();
    for _ in 0..100 {
        let result = classify(&mut client, "dr-grade@3").await.unwrap();
        if (probabilities(&result)[0] - expected("dr-grade", "2")[0]).abs() < 1e-4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_close(
        &probabilities(&classify(&mut client, "dr-grade@3").await.unwrap()),
        &expected("dr-grade", "2"),
        "dr-grade@3 replaced by v2 weights",
    );

    // the folder goes: unloaded
    std::fs::remove_dir_all(&target).unwrap();
    until(&mut admin, "dr-grade@3 unloaded", |r| {
        !r.contains(&"dr-grade@3".to_string())
    })
    .await;
    assert_eq!(
        classify(&mut client, "dr-grade")
            .await
            .unwrap()
            .adapter_version,
        "2"
    );
}
