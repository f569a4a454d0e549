//! Loading a model repository: a broken adapter is reported with the reason and skipped,
//! and everything else serves.

mod common;

use std::path::Path;

use fptserve::lifecycle::Lifecycle;

fn edit_manifest(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let file = path.join("manifest.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(file, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
}

#[test]
fn broken_adapters_are_skipped_with_their_reason_and_the_rest_serve() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    common::copy_tree(&common::demo_repository(), &repo);
    let tasks = repo.join("tasks");

    // A truncated download: the bytes no longer match the manifest's digest.
    let side = tasks.join("dr-grade/2/side.onnx");
    let mut bytes = std::fs::read(&side).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&side, bytes).unwrap();
    // Trained against another backbone.
    edit_manifest(&tasks.join("chest-xray/1"), |m| {
        m["backbone"]["sha256"] = serde_json::json!("0".repeat(64));
    });
    // A class list that does not fit the graph's logits.
    edit_manifest(&tasks.join("skin-lesion/1"), |m| {
        m["classes"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!("extra"));
    });

    let loaded = common::load(&repo);
    let reason = |task: &str| -> String {
        loaded
            .failures
            .iter()
            .find(|f| f.path.to_string_lossy().contains(task))
            .map(|f| f.error.clone())
            .unwrap_or_else(|| panic!("{task} should have failed: {:?}", loaded.failures))
    };
    assert_eq!(loaded.failures.len(), 3, "{:?}", loaded.failures);
    assert!(
        reason("dr-grade").contains("SHA-256"),
        "{}",
        reason("dr-grade")
    );
    assert!(
        reason("chest-xray").contains("backbone is vit-tiny-demo@000000000000"),
        "{}",
        reason("chest-xray")
    );
    assert!(
        reason("skin-lesion").contains("output logits has shape [-1, 2], but there are 3 classes"),
        "{}",
        reason("skin-lesion")
    );

    // The intact version still serves, and is now the default.
    let snapshot = loaded.lifecycle.registry().snapshot();
    assert_eq!(snapshot.tasks().len(), 1);
    assert_eq!(snapshot.resolve("dr-grade").unwrap().version(), "1");
    assert!(snapshot.resolve("chest-xray").is_err());
}

#[test]
fn a_folder_that_is_not_a_repository_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let error = Lifecycle::start(dir.path(), common::runtime(), Default::default())
        .err()
        .expect("must fail");
    assert!(
        error.to_string().contains("no backbones/ folder"),
        "{error}"
    );
}
