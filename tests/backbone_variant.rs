//! A backbone variant (an INT8 quantisation in practice) serves the adapters of the
//! backbone it was made from only where the operator allows it by name, never silently;
//! allowed, every answer names the backbone that actually ran. The variant here is the
//! demo backbone under another name with `quantized_from` naming the original, so the
//! expected numbers are the exporter's PyTorch references for the original.

mod common;

use std::path::Path;

use common::{TestServer, copy_tree, demo_repository, fixture, reference};
use fptserve::config::{AdminConfig, ModelConfig, ServeConfig};
use fptserve::proto::v1 as pb;
use serde_json::Value;

const VARIANT: &str = "vit-tiny-demo-int8";

/// The demo repository with its backbone replaced by a variant of it.
fn repository_with_only_the_variant() -> tempfile::TempDir {
    let repo = tempfile::tempdir().unwrap();
    copy_tree(&demo_repository(), repo.path());
    let original = repo.path().join("backbones/vit-tiny-demo");
    let variant = repo.path().join("backbones").join(VARIANT);
    std::fs::rename(&original, &variant).unwrap();
    let file = variant.join("manifest.json");
    let mut manifest: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    manifest["quantized_from"] = serde_json::json!({
        "name": manifest["name"].clone(),
        "sha256": manifest["sha256"].clone(),
    });
    manifest["name"] = VARIANT.into();
    manifest["precision"] = "int8".into();
    std::fs::write(&file, manifest.to_string()).unwrap();
    repo
}

fn config(repo: &Path, allowed: &[&str]) -> ServeConfig {
    let base = common::config(repo);
    ServeConfig {
        models: ModelConfig {
            allowed_variants: allowed.iter().map(|s| s.to_string()).collect(),
            ..base.models
        },
        admin: Some(AdminConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            token: None,
            allow_roots: Vec::new(),
        }),
        ..base
    }
}

#[tokio::test]
async fn a_variant_serves_only_where_allowed_and_answers_name_it() {
    let repo = repository_with_only_the_variant();

    // Not allowed: every adapter refused, saying what to allow.
    let refusing = TestServer::start_config(config(repo.path(), &[])).await;
    assert_eq!(refusing.failures.len(), 4, "{:?}", refusing.failures);
    for failure in &refusing.failures {
        assert!(
            failure
                .error
                .contains(&format!("--allow-backbone-variant {VARIANT}")),
            "{}",
            failure.error
        );
        assert!(failure.error.contains("int8 variant"), "{}", failure.error);
    }
    drop(refusing);

    // Allowed: the adapters serve on it with their reference numbers, and say so.
    let server = TestServer::start_config(config(repo.path(), &[VARIANT])).await;
    assert!(server.failures.is_empty(), "{:?}", server.failures);
    let mut client = server.client().await;
    let cases = reference();
    for case in cases.cases.iter().filter(|c| c.input == "images/rgb8.png") {
        let response = client
            .classify(common::request(
                pb::classify_request::Input::Image(fixture(&case.input)),
                &[&format!("{}@{}", case.task, case.version)],
            ))
            .await
            .unwrap()
            .into_inner();
        let result = &response.results[0];
        assert_eq!(result.backbone, VARIANT);
        for (score, want) in result.scores.iter().zip(&case.probabilities) {
            assert!(
                (f64::from(score.probability) - want).abs() <= cases.tolerance,
                "{}@{}: {} vs {want}",
                case.task,
                case.version,
                score.probability
            );
        }
    }
    let tasks = client
        .list_tasks(pb::ListTasksRequest {})
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert!(
        tasks
            .iter()
            .flat_map(|t| &t.versions)
            .all(|v| v.backbone == VARIANT)
    );
    let listed = server
        .admin()
        .await
        .list_adapters(pb::ListAdaptersRequest {})
        .await
        .unwrap()
        .into_inner()
        .adapters;
    assert_eq!(listed.len(), 4);
    assert!(listed.iter().all(|a| a.backbone == VARIANT), "{listed:?}");
}
