//! The manifest files that travel with every exported model (written by models/, the
//! Python exporter). They are the contract between training and serving: nothing about a
//! model's shapes or preprocessing is hard-coded in the daemon.

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::decode::DicomPolicy;

/// `format` value of a backbone manifest.
pub const BACKBONE_FORMAT: &str = "fptserve.backbone/v1";
/// `format` value of an adapter manifest.
pub const ADAPTER_FORMAT: &str = "fptserve.adapter/v1";
/// The file holding a model's manifest inside its folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// A manifest that cannot be read or does not describe a usable model.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The manifest path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The JSON does not parse into the manifest schema.
    #[error("{path}: invalid manifest: {message}")]
    Parse {
        /// The manifest path.
        path: String,
        /// serde's message, with line and column.
        message: String,
    },
    /// The manifest parses but its content is inconsistent.
    #[error("{path}: {}", problems.join("; "))]
    Invalid {
        /// The manifest path.
        path: String,
        /// Every problem found, not just the first.
        problems: Vec<String>,
    },
}

/// One named tensor of a model's interface. `-1` marks a dynamic dimension.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct TensorSpec {
    /// Graph input or output name.
    pub name: String,
    /// Element type: `float32` or `float16`.
    pub dtype: String,
    /// Dimensions, `-1` where dynamic (the batch).
    pub shape: Vec<i64>,
}

/// A backbone's identity: adapters name the exact backbone they were trained against.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
pub struct BackboneRef {
    /// Backbone name.
    pub name: String,
    /// SHA-256 of its backbone.onnx, lowercase hex.
    pub sha256: String,
}

/// The backbone's architecture, as far as serving needs it.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct BackboneArchitecture {
    /// Model family (`vit`).
    pub kind: String,
    /// Token width.
    pub hidden_size: u32,
    /// Attention heads.
    pub num_heads: u32,
    /// Width of one head.
    pub head_dim: u32,
    /// Patch side in pixels.
    pub patch_size: u32,
    /// Layers in the original (unpruned) model.
    pub num_layers: u32,
    /// Input side in pixels.
    pub image_size: u32,
    /// Tokens per image, CLS included.
    pub num_tokens: u32,
    /// Layers whose selected K/V are exported (0-based).
    pub layers_used: Vec<u32>,
    /// Fraction of tokens kept per head.
    pub token_ratio: f64,
    /// Tokens kept per head and layer.
    pub top_k: u32,
    /// `float32` or `float16`.
    pub kv_dtype: String,
    /// Axis order of the K/V outputs.
    pub kv_layout: String,
}

/// `backbones/<name>/manifest.json`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct BackboneManifest {
    /// Must be [`BACKBONE_FORMAT`].
    pub format: String,
    /// Backbone name (also its folder name).
    pub name: String,
    /// ONNX file name inside the folder.
    pub file: String,
    /// SHA-256 of the ONNX file.
    pub sha256: String,
    /// Where the weights came from.
    #[serde(default)]
    pub source_weights: Option<String>,
    /// Architecture facts.
    pub architecture: BackboneArchitecture,
    /// Graph inputs (`pixel_values`).
    pub inputs: Vec<TensorSpec>,
    /// Graph outputs (`key_states`, `value_states`).
    pub outputs: Vec<TensorSpec>,
    /// Optional graph outputs for saliency maps (`token_indices`); a key of its own so
    /// that daemons which predate it ignore it (see [`crate::explain`]).
    #[serde(default)]
    pub explanation_outputs: Vec<TensorSpec>,
    /// Weight precision: `float32` (the default), `float16`, `int8`.
    #[serde(default)]
    pub precision: Option<String>,
    /// For a variant (an INT8 quantisation, say): the backbone it was made from. It may
    /// serve that backbone's adapters, but only where the operator allows it.
    #[serde(default)]
    pub quantized_from: Option<BackboneRef>,
    /// ONNX opset.
    #[serde(default)]
    pub opset: Option<i64>,
    /// The exporter's ONNX-vs-PyTorch check.
    #[serde(default)]
    pub parity: Option<serde_json::Value>,
    /// Exporter and library versions.
    #[serde(default)]
    pub provenance: Option<serde_json::Value>,
}

/// How a task's input pixels are prepared; two tasks whose backbone-side settings agree
/// share one backbone pass.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Preprocessing {
    /// [height, width] fed to the backbone.
    pub backbone_size: [u32; 2],
    /// [height, width] fed to the side network.
    pub side_size: [u32; 2],
    /// Resize filter; only `pil-bilinear` (the authors' pipeline) is supported.
    pub resize: String,
    /// Per-channel mean subtracted after scaling to [0, 1].
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by.
    pub std: [f32; 3],
    /// Channel policy; `rgb` = PIL `convert('RGB')`.
    pub channels: String,
    /// DICOM pixel policy.
    #[serde(default)]
    pub dicom: DicomPreprocessing,
}

/// A task's DICOM preprocessing: its pixel policy, spelled out in the same object.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct DicomPreprocessing {
    /// How stored values become display pixels (`voi`, `window_center`, ...).
    #[serde(flatten)]
    pub policy: DicomPolicy,
    /// Whether a request may replace the policy with its own.
    #[serde(default)]
    pub allow_request_override: bool,
    /// At which resolution this task's DICOM frames may be decoded.
    #[serde(default, skip_serializing_if = "DecodeResolution::is_full")]
    pub decode_resolution: DecodeResolution,
}

/// At which resolution a task's DICOM frames are decoded (`decode_resolution`).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DecodeResolution {
    /// Every pixel of the stored frame (the default).
    #[default]
    Full,
    /// JPEG 2000, HTJ2K and DCT-based JPEG frames decode at the coarsest resolution their
    /// codec offers (wavelet levels; 1/2, 1/4, 1/8 DCT scaling) whose sides are at least
    /// the task's largest input size (backbone or side network), then resize as usual. A
    /// trainer that opts in renders its training images the same way
    /// (`fptserve decode --min-size`). Other syntaxes decode fully.
    Reduced,
}

impl DecodeResolution {
    /// True for [`DecodeResolution::Full`].
    pub fn is_full(&self) -> bool {
        *self == DecodeResolution::Full
    }
}

/// `tasks/<task>/<version>/manifest.json`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct AdapterManifest {
    /// Must be [`ADAPTER_FORMAT`].
    pub format: String,
    /// Task name (also its folder name).
    pub task: String,
    /// Adapter version (also its folder name).
    pub version: String,
    /// Training method (`fpt+`).
    pub method: String,
    /// ONNX file name inside the folder.
    pub file: String,
    /// SHA-256 of the ONNX file.
    pub sha256: String,
    /// The backbone this adapter was trained against.
    pub backbone: BackboneRef,
    /// Class names in logit index order.
    pub classes: Vec<String>,
    /// Input preparation.
    pub preprocessing: Preprocessing,
    /// Side network architecture (informational).
    #[serde(default)]
    pub architecture: Option<serde_json::Value>,
    /// Graph inputs (`side_pixel_values`, `key_states`, `value_states`).
    pub inputs: Vec<TensorSpec>,
    /// Graph outputs (`logits`).
    pub outputs: Vec<TensorSpec>,
    /// Optional graph outputs for saliency maps (`token_relevance`, `patch_relevance`);
    /// a key of its own so that daemons which predate it ignore it.
    #[serde(default)]
    pub explanation_outputs: Vec<TensorSpec>,
    /// ONNX opset.
    #[serde(default)]
    pub opset: Option<i64>,
    /// The exporter's ONNX-vs-PyTorch check.
    #[serde(default)]
    pub parity: Option<serde_json::Value>,
    /// Checkpoint and exporter versions.
    #[serde(default)]
    pub provenance: Option<serde_json::Value>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Io {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ManifestError::Parse {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

fn check_sha256(problems: &mut Vec<String>, field: &str, value: &str) {
    if value.len() != 64
        || !value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        problems.push(format!("{field} is not a lowercase hex SHA-256: {value:?}"));
    }
}

/// Checks a plain name used as a folder and in `name@version` requests.
fn check_name(problems: &mut Vec<String>, field: &str, value: &str) {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !value.starts_with('.');
    if !ok {
        problems.push(format!(
            "{field} {value:?} must be 1-128 characters of letters, digits, '-', '_' or '.' and not start with '.'"
        ));
    }
}

fn spec<'a>(specs: &'a [TensorSpec], name: &str) -> Option<&'a TensorSpec> {
    specs.iter().find(|s| s.name == name)
}

fn finish(path: &Path, problems: Vec<String>) -> Result<(), ManifestError> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ManifestError::Invalid {
            path: path.display().to_string(),
            problems,
        })
    }
}

impl BackboneManifest {
    /// Reads and validates `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Self, ManifestError> {
        let path = dir.join(MANIFEST_FILE);
        let manifest: Self = read_json(&path)?;
        finish(&path, manifest.problems())?;
        Ok(manifest)
    }

    /// Whether it is the backbone `trained_on` names, or a variant made from it.
    pub fn derives_from(&self, trained_on: &BackboneRef) -> bool {
        self.identity() == *trained_on || self.quantized_from.as_ref() == Some(trained_on)
    }

    /// The identity adapters refer to.
    pub fn identity(&self) -> BackboneRef {
        BackboneRef {
            name: self.name.clone(),
            sha256: self.sha256.clone(),
        }
    }

    /// Per-image shape of `key_states` / `value_states` (without the batch axis).
    pub fn kv_shape(&self) -> Option<&[i64]> {
        spec(&self.outputs, "key_states").map(|s| &s.shape[1..])
    }

    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.format != BACKBONE_FORMAT {
            p.push(format!(
                "format is {:?}, expected {BACKBONE_FORMAT:?}",
                self.format
            ));
        }
        check_name(&mut p, "name", &self.name);
        check_sha256(&mut p, "sha256", &self.sha256);
        let a = &self.architecture;
        if a.kv_dtype != "float32" && a.kv_dtype != "float16" {
            p.push(format!(
                "architecture.kv_dtype {:?} is neither float32 nor float16",
                a.kv_dtype
            ));
        }
        match spec(&self.inputs, "pixel_values") {
            Some(s)
                if s.shape.len() == 4 && s.shape[1] == 3 && s.shape[2] > 0 && s.shape[3] > 0 => {}
            Some(s) => p.push(format!(
                "input pixel_values has shape {:?}, expected [batch, 3, height, width]",
                s.shape
            )),
            None => p.push("no input named pixel_values".into()),
        }
        let expected_kv = [
            -1,
            a.layers_used.len() as i64,
            a.num_heads as i64,
            a.top_k as i64,
            a.head_dim as i64,
        ];
        for name in ["key_states", "value_states"] {
            match spec(&self.outputs, name) {
                Some(s) => {
                    if s.shape != expected_kv {
                        p.push(format!(
                            "output {name} has shape {:?}, but the architecture implies {expected_kv:?}",
                            s.shape
                        ));
                    }
                    if s.dtype != a.kv_dtype {
                        p.push(format!(
                            "output {name} is {}, but architecture.kv_dtype is {}",
                            s.dtype, a.kv_dtype
                        ));
                    }
                }
                None => p.push(format!("no output named {name}")),
            }
        }
        p
    }
}

impl AdapterManifest {
    /// Reads and validates `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Self, ManifestError> {
        let path = dir.join(MANIFEST_FILE);
        let manifest: Self = read_json(&path)?;
        finish(&path, manifest.problems())?;
        Ok(manifest)
    }

    /// Checks this adapter against the backbone it names: identity, input size and K/V
    /// tensor shapes. Each mismatch names the field that differs.
    pub fn check_against(&self, backbone: &BackboneManifest) -> Result<(), Vec<String>> {
        let mut p = Vec::new();
        if !backbone.derives_from(&self.backbone) {
            p.push(format!(
                "backbone is {}@{}, but the loaded backbone is {}@{}",
                self.backbone.name,
                short(&self.backbone.sha256),
                backbone.name,
                short(&backbone.sha256)
            ));
        }
        if let Some(s) = spec(&backbone.inputs, "pixel_values") {
            let size = [s.shape[2], s.shape[3]];
            let want = self.preprocessing.backbone_size.map(i64::from);
            if size != want {
                p.push(format!(
                    "preprocessing.backbone_size is {want:?}, but the backbone takes {size:?}"
                ));
            }
        }
        for name in ["key_states", "value_states"] {
            if let (Some(mine), Some(theirs)) =
                (spec(&self.inputs, name), spec(&backbone.outputs, name))
                && (mine.shape != theirs.shape || mine.dtype != theirs.dtype)
            {
                p.push(format!(
                    "input {name} is {} {:?}, but the backbone produces {} {:?}",
                    mine.dtype, mine.shape, theirs.dtype, theirs.shape
                ));
            }
        }
        if p.is_empty() { Ok(()) } else { Err(p) }
    }

    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.format != ADAPTER_FORMAT {
            p.push(format!(
                "format is {:?}, expected {ADAPTER_FORMAT:?}",
                self.format
            ));
        }
        check_name(&mut p, "task", &self.task);
        check_name(&mut p, "version", &self.version);
        check_sha256(&mut p, "sha256", &self.sha256);
        check_sha256(&mut p, "backbone.sha256", &self.backbone.sha256);
        if self.classes.is_empty() {
            p.push("classes is empty".into());
        }
        let unique: HashSet<&String> = self.classes.iter().collect();
        if unique.len() != self.classes.len() {
            p.push("classes has duplicate names".into());
        }
        let pre = &self.preprocessing;
        if pre.resize != "pil-bilinear" {
            p.push(format!(
                "preprocessing.resize {:?} is not supported (only pil-bilinear)",
                pre.resize
            ));
        }
        if pre.channels != "rgb" {
            p.push(format!(
                "preprocessing.channels {:?} is not supported (only rgb)",
                pre.channels
            ));
        }
        if pre.std.iter().any(|s| !s.is_finite() || *s <= 0.0)
            || pre.mean.iter().any(|m| !m.is_finite())
        {
            p.push(format!(
                "preprocessing mean {:?} / std {:?} must be finite with std > 0",
                pre.mean, pre.std
            ));
        }
        for (field, [h, w]) in [
            ("backbone_size", pre.backbone_size),
            ("side_size", pre.side_size),
        ] {
            if h == 0 || w == 0 || h > 8192 || w > 8192 {
                p.push(format!(
                    "preprocessing.{field} [{h}, {w}] must be within 1..=8192"
                ));
            }
        }
        match spec(&self.inputs, "side_pixel_values") {
            Some(s) => {
                let want = [
                    -1,
                    3,
                    i64::from(pre.side_size[0]),
                    i64::from(pre.side_size[1]),
                ];
                if s.shape != want {
                    p.push(format!(
                        "input side_pixel_values has shape {:?}, but preprocessing.side_size implies {want:?}",
                        s.shape
                    ));
                }
            }
            None => p.push("no input named side_pixel_values".into()),
        }
        for name in ["key_states", "value_states"] {
            if spec(&self.inputs, name).is_none() {
                p.push(format!("no input named {name}"));
            }
        }
        match spec(&self.outputs, "logits") {
            Some(s) if s.shape.len() == 2 && s.shape[1] == self.classes.len() as i64 => {}
            Some(s) => p.push(format!(
                "output logits has shape {:?}, but there are {} classes",
                s.shape,
                self.classes.len()
            )),
            None => p.push("no output named logits".into()),
        }
        p
    }
}

/// The first 12 hex digits of a digest, for messages.
pub fn short(sha256: &str) -> &str {
    &sha256[..sha256.len().min(12)]
}
