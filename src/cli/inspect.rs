//! `fptserve inspect PATH`: print a model's manifest and check it the way the daemon
//! would when loading it. Exits non-zero when a check fails.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::config::InspectArgs;
use crate::model::adapter::Adapter;
use crate::model::backbone::Backbone;
use crate::repository::manifest::{ADAPTER_FORMAT, BACKBONE_FORMAT, MANIFEST_FILE};
use crate::runtime::{Device, Runtime, Threads};

fn model_dir(path: &Path) -> PathBuf {
    if path.is_file() {
        path.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        path.to_path_buf()
    }
}

/// Runs the command.
pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let dir = model_dir(&args.path);
    let manifest_path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", manifest_path.display()))?;
    println!("{}", serde_json::to_string_pretty(&json)?);
    let runtime = Runtime::new(
        args.onnxruntime_lib.as_deref(),
        Device::Cpu,
        Threads {
            intra_op: 1,
            inter_op: 1,
        },
    )?;
    match json.get("format").and_then(|f| f.as_str()) {
        Some(BACKBONE_FORMAT) => {
            let b = Backbone::load(&dir, &runtime)?;
            println!(
                "\nOK: backbone {} (sha256 {}): manifest valid, digest matches, graph matches",
                b.identity().name,
                b.identity().sha256
            );
        }
        Some(ADAPTER_FORMAT) => {
            // tasks/<task>/<version> -> the repository's backbones/ folder.
            let backbones_dir = dir.join("../../../backbones");
            let mut backbones = Vec::new();
            for entry in std::fs::read_dir(&backbones_dir)
                .with_context(|| {
                    format!(
                        "an adapter is checked against its backbone; expected {}",
                        backbones_dir.display()
                    )
                })?
                .flatten()
            {
                if let Ok(b) = Backbone::load(&entry.path(), &runtime) {
                    backbones.push(std::sync::Arc::new(b));
                }
            }
            let a = Adapter::load(&dir, &runtime, &backbones)?;
            println!(
                "\nOK: adapter {}@{} ({} classes): manifest valid, digest matches, graph matches, fits backbone {}",
                a.task(),
                a.version(),
                a.classes().len(),
                a.backbone().identity().name
            );
        }
        other => anyhow::bail!(
            "{}: format {other:?} is neither {BACKBONE_FORMAT} nor {ADAPTER_FORMAT}",
            manifest_path.display()
        ),
    }
    Ok(())
}
