//! A backbone variant serves the adapters of the backbone it was made from only where the
//! operator's settings say so, never silently: an INT8 one where the operator allows it by
//! name and the original is missing, a float16 one in the original's place where
//! `--backbone-precision` prefers float16 (by default on a GPU only). Every answer names
//! the backbone that actually ran. The variant here is the demo backbone under another name
//! with `quantized_from` naming the original, so the expected numbers are the exporter's
//! PyTorch references for the original (a real float16 variant: tests/python).

mod common;

use std::path::Path;

use common::{TestServer, copy_tree, demo_repository, fixture, reference};
use fptserve::config::{AdminConfig, ModelConfig, ServeConfig};
use fptserve::model::backbone::BackbonePrecision;
use fptserve::proto::v1 as pb;
use serde_json::Value;

const VARIANT: &str = "vit-tiny-demo-int8";
const ORIGINAL: &str = "vit-tiny-demo";

/// The demo repository with a variant `name` of its backbone at `precision`, beside the
/// original or in its place.
fn repository_with_variant(name: &str, precision: &str, keep_original: bool) -> tempfile::TempDir {
    let repo = tempfile::tempdir().unwrap();
    copy_tree(&demo_repository(), repo.path());
    let original = repo.path().join("backbones").join(ORIGINAL);
    let variant = repo.path().join("backbones").join(name);
    if keep_original {
        copy_tree(&original, &variant);
    } else {
        std::fs::rename(&original, &variant).unwrap();
    }
    let file = variant.join("manifest.json");
    let mut manifest: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    manifest["quantized_from"] = serde_json::json!({
        "name": manifest["name"].clone(),
        "sha256": manifest["sha256"].clone(),
    });
    manifest["name"] = name.into();
    manifest["precision"] = precision.into();
    std::fs::write(&file, manifest.to_string()).unwrap();
    repo
}

fn repository_with_only_the_variant() -> tempfile::TempDir {
    repository_with_variant(VARIANT, "int8", false)
}

fn config(repo: &Path, allowed: &[&str]) -> ServeConfig {
    config_with(repo, allowed, BackbonePrecision::Auto)
}

fn config_with(repo: &Path, allowed: &[&str], precision: BackbonePrecision) -> ServeConfig {
    let base = common::config(repo);
    ServeConfig {
        models: ModelConfig {
            allowed_variants: allowed.iter().map(|s| s.to_string()).collect(),
            backbone_precision: precision,
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
    assert_eq!(serving_backbone(&server).await, VARIANT);
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

/// The backbone every adapter runs on, as ListTasks says, and the one a Classify of each
/// reference case on rgb8.png names, with its numbers checked against the references.
async fn serving_backbone(server: &TestServer) -> String {
    let mut client = server.client().await;
    let cases = reference();
    let mut seen = Vec::new();
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
        for (score, want) in result.scores.iter().zip(&case.probabilities) {
            assert!(
                (f64::from(score.probability) - want).abs() <= cases.tolerance,
                "{}@{} on {}: {} vs {want}",
                case.task,
                case.version,
                result.backbone,
                score.probability
            );
        }
        seen.push(result.backbone.clone());
    }
    let tasks = client
        .list_tasks(pb::ListTasksRequest {})
        .await
        .unwrap()
        .into_inner()
        .tasks;
    seen.extend(
        tasks
            .iter()
            .flat_map(|t| &t.versions)
            .map(|v| v.backbone.clone()),
    );
    seen.dedup();
    assert_eq!(seen.len(), 1, "every adapter on one backbone: {seen:?}");
    seen.pop().unwrap()
}

#[tokio::test]
async fn a_float16_variant_serves_in_place_of_its_backbone_where_the_precision_prefers_it() {
    const HALF: &str = "vit-tiny-demo-fp16";
    let repo = repository_with_variant(HALF, "float16", true);
    for (precision, expected) in [
        (BackbonePrecision::Float16, HALF),
        (BackbonePrecision::Float32, ORIGINAL),
        // auto is float16 on a GPU only; these sessions run on the CPU
        (BackbonePrecision::Auto, ORIGINAL),
    ] {
        let server = TestServer::start_config(config_with(repo.path(), &[], precision)).await;
        assert!(server.failures.is_empty(), "{:?}", server.failures);
        assert_eq!(serving_backbone(&server).await, expected, "{precision:?}");
    }

    // an INT8 variant is never preferred, whatever the precision: the original serves
    let repo = repository_with_variant(VARIANT, "int8", true);
    let server = TestServer::start_config(config_with(
        repo.path(),
        &[VARIANT],
        BackbonePrecision::Float16,
    ))
    .await;
    assert_eq!(serving_backbone(&server).await, ORIGINAL);
}
