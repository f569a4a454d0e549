//! A task adapter: the FPT+ side network plus fusion module for one task version. Its
//! inputs are the task's own low-resolution view of the image and the backbone's K/V.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ort::value::TensorRef;

use super::backbone::{Backbone, Features};
use super::{Model, ModelError};
use crate::preprocess::Normalization;
use crate::repository::manifest::AdapterManifest;
use crate::runtime::{Memory, Runtime};

/// A loaded adapter, bound to the backbone it was trained against.
pub struct Adapter {
    manifest: AdapterManifest,
    dir: PathBuf,
    backbone: Arc<Backbone>,
    model: Model,
}

impl Adapter {
    /// Loads `dir`, checks it against `backbones` (picking the one it names) and its
    /// graph against its manifest.
    pub fn load(
        dir: &Path,
        runtime: &Runtime,
        backbones: &[Arc<Backbone>],
    ) -> Result<Self, ModelError> {
        let manifest = AdapterManifest::read(dir)?;
        let backbone = match backbones.iter().find(|b| b.identity() == manifest.backbone) {
            Some(b) => b.clone(),
            None => {
                // Say what differs against the closest candidate (same name, if any).
                let closest = backbones
                    .iter()
                    .find(|b| b.identity().name == manifest.backbone.name)
                    .or(backbones.first());
                let problems = match closest {
                    Some(b) => manifest
                        .check_against(b.manifest())
                        .err()
                        .unwrap_or_default(),
                    None => vec!["no backbone is loaded".into()],
                };
                return Err(ModelError::Incompatible {
                    path: dir.to_path_buf(),
                    problems,
                });
            }
        };
        manifest
            .check_against(backbone.manifest())
            .map_err(|problems| ModelError::Incompatible {
                path: dir.to_path_buf(),
                problems,
            })?;
        let model = Model::load(
            runtime,
            dir,
            &manifest.file,
            &manifest.sha256,
            &manifest.inputs,
            &manifest.outputs,
            Memory::Shared,
        )?;
        Ok(Adapter {
            manifest,
            dir: dir.to_path_buf(),
            backbone,
            model,
        })
    }

    /// The manifest it was loaded from.
    pub fn manifest(&self) -> &AdapterManifest {
        &self.manifest
    }

    /// The folder it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Task name.
    pub fn task(&self) -> &str {
        &self.manifest.task
    }

    /// Version string.
    pub fn version(&self) -> &str {
        &self.manifest.version
    }

    /// Class names in logit order.
    pub fn classes(&self) -> &[String] {
        &self.manifest.classes
    }

    /// The backbone whose features it consumes.
    pub fn backbone(&self) -> &Arc<Backbone> {
        &self.backbone
    }

    /// Mean and std of its preprocessing.
    pub fn normalization(&self) -> Normalization {
        Normalization {
            mean: self.manifest.preprocessing.mean,
            std: self.manifest.preprocessing.std,
        }
    }

    /// Runs the side network: `side_pixels` is `[1, 3, h, w]` for its side size.
    /// Returns the logits.
    pub fn run(&self, side_pixels: &[f32], features: &Features) -> Result<Vec<f32>, ModelError> {
        let [h, w] = self.manifest.preprocessing.side_size.map(|v| v as usize);
        let input = TensorRef::from_array_view(([1usize, 3, h, w], side_pixels))
            .map_err(|e| self.model.inference_error(e))?;
        let mut session = self.model.lock();
        let outputs = session
            .run(ort::inputs![
                "side_pixel_values" => input,
                "key_states" => &features.key,
                "value_states" => &features.value,
            ])
            .map_err(|e| self.model.inference_error(e))?;
        let logits = outputs
            .get("logits")
            .ok_or_else(|| self.model.inference_error("no output logits"))?;
        let (_, data) = logits
            .try_extract_tensor::<f32>()
            .map_err(|e| self.model.inference_error(e))?;
        if data.len() != self.manifest.classes.len() {
            return Err(self.model.inference_error(format!(
                "logits hold {} values for {} classes",
                data.len(),
                self.manifest.classes.len()
            )));
        }
        Ok(data.to_vec())
    }
}
