//! The shared frozen backbone: normalised pixels in, the selected tokens' keys and values
//! of the used layers out. Task-independent, so one run serves every task whose
//! preprocessing agrees.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ort::value::{DynValue, Tensor};

use super::{Model, ModelError};
use crate::repository::manifest::{BackboneManifest, BackboneRef};
use crate::runtime::{Memory, Runtime};

/// A loaded backbone.
pub struct Backbone {
    manifest: BackboneManifest,
    dir: PathBuf,
    model: Model,
    input_size: [usize; 2],
    warm: Mutex<Option<Arc<Features>>>,
}

/// The K/V a backbone run produced for one image, kept in ONNX Runtime values so they
/// go to the side networks as they are (f32 or f16).
pub struct Features {
    /// `key_states`, `[1, layers, heads, k, head_dim]`.
    pub key: DynValue,
    /// `value_states`, same shape.
    pub value: DynValue,
}

impl Backbone {
    /// Loads `dir` (manifest.json + the ONNX file it names), checking digest and interface.
    pub fn load(dir: &Path, runtime: &Runtime) -> Result<Self, ModelError> {
        let manifest = BackboneManifest::read(dir)?;
        let model = Model::load(
            runtime,
            dir,
            &manifest.file,
            &manifest.sha256,
            &manifest.inputs,
            &manifest.outputs,
            Memory::Arena,
        )?;
        let shape = &manifest
            .inputs
            .iter()
            .find(|s| s.name == "pixel_values")
            .expect("validated by BackboneManifest::read")
            .shape;
        let input_size = [shape[2] as usize, shape[3] as usize];
        Ok(Backbone {
            manifest,
            dir: dir.to_path_buf(),
            model,
            input_size,
            warm: Mutex::new(None),
        })
    }

    /// Features of an all-zero image, computed once: what newly loaded adapters are warmed
    /// with, so loading one costs a side-network run, not a backbone run.
    pub fn warm_features(&self) -> Result<Arc<Features>, ModelError> {
        let mut slot = self.warm.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(features) = &*slot {
            return Ok(features.clone());
        }
        let [h, w] = self.input_size;
        let features = Arc::new(self.run(vec![0.0; 3 * h * w])?);
        *slot = Some(features.clone());
        Ok(features)
    }

    /// Name and digest.
    pub fn identity(&self) -> BackboneRef {
        self.manifest.identity()
    }

    /// The manifest it was loaded from.
    pub fn manifest(&self) -> &BackboneManifest {
        &self.manifest
    }

    /// The folder it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `[height, width]` of its input.
    pub fn input_size(&self) -> [usize; 2] {
        self.input_size
    }

    /// Runs one image, `pixels` being a `[1, 3, height, width]` normalised tensor.
    pub fn run(&self, pixels: Vec<f32>) -> Result<Features, ModelError> {
        let [h, w] = self.input_size;
        let input = Tensor::from_array(([1usize, 3, h, w], pixels))
            .map_err(|e| self.model.inference_error(e))?;
        let mut session = self.model.lock();
        let mut outputs = session
            .run(ort::inputs!["pixel_values" => input])
            .map_err(|e| self.model.inference_error(e))?;
        let mut take = |name: &str| {
            outputs
                .remove(name)
                .ok_or_else(|| self.model.inference_error(format!("no output {name}")))
        };
        Ok(Features {
            key: take("key_states")?,
            value: take("value_states")?,
        })
    }
}
