//! The shared frozen backbone: normalised pixels in, the selected tokens' keys and values
//! of the used layers out. Task-independent, so one run serves every task whose
//! preprocessing agrees.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use half::f16;
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::IoBinding;
use ort::session::{Session, SessionInputValue};
use ort::value::{
    DynTensor, DynTensorValueType, Tensor, TensorRef, TensorValueTypeMarker, Value, ValueType,
};

use super::{Model, ModelError};
use crate::repository::manifest::{BackboneManifest, BackboneRef};
use crate::runtime::{Device, Memory, Runtime};

/// A loaded backbone.
pub struct Backbone {
    manifest: BackboneManifest,
    dir: PathBuf,
    model: Model,
    input_size: [usize; 2],
    model_bytes: u64,
    warm: Mutex<Option<Arc<Features>>>,
    /// Whether it serves the adapters of the backbone it was made from.
    standing: Standing,
    /// Whether its manifest lists [`TOKEN_INDICES`] among its explanation outputs (checked
    /// against the graph at load).
    token_indices: bool,
}

/// Whether a variant serves the adapters of the backbone it was made from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// No (the default; always so for a backbone that is no variant).
    No,
    /// Where that backbone is not loaded: the operator allowed it by name
    /// (`--allow-backbone-variant`).
    WhereMissing,
    /// In preference to that backbone: a float16 variant under `--backbone-precision`.
    Preferred,
}

/// Which precision of a backbone serves its adapters when the repository holds a float16
/// variant of it (`quantize-backbone --precision float16`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackbonePrecision {
    /// float16 on a GPU, float32 on a CPU (where float16 runs slower, cast back to float32
    /// around most kernels).
    #[default]
    Auto,
    /// The float32 backbone.
    Float32,
    /// The float16 variant, on any device.
    Float16,
}

impl BackbonePrecision {
    /// Whether a float16 variant serves in preference to its float32 backbone when its
    /// sessions run on `device`.
    pub fn prefers_float16(self, device: Device) -> bool {
        match self {
            BackbonePrecision::Auto => device != Device::Cpu,
            BackbonePrecision::Float32 => false,
            BackbonePrecision::Float16 => true,
        }
    }
}

impl std::str::FromStr for BackbonePrecision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(BackbonePrecision::Auto),
            "float32" | "fp32" => Ok(BackbonePrecision::Float32),
            "float16" | "fp16" => Ok(BackbonePrecision::Float16),
            _ => Err(format!(
                "unknown backbone precision {s:?}: use auto, float32 or float16"
            )),
        }
    }
}

/// K/V values on the host, in the element type the backbone exports.
#[derive(Clone)]
pub enum KvData {
    /// `float32` K/V.
    F32(Vec<f32>),
    /// `float16` K/V (a backbone exported for the GPU).
    F16(Vec<f16>),
}

impl KvData {
    fn bytes(&self) -> usize {
        match self {
            KvData::F32(v) => v.len() * 4,
            KvData::F16(v) => v.len() * 2,
        }
    }

    /// Several images' K/V one after another: a batch for a side network.
    pub fn concat<'a>(parts: impl IntoIterator<Item = &'a KvData>) -> KvData {
        let mut parts = parts.into_iter();
        let mut out = match parts.next() {
            Some(first) => first.clone(),
            None => return KvData::F32(Vec::new()),
        };
        for part in parts {
            match (&mut out, part) {
                (KvData::F32(o), KvData::F32(p)) => o.extend_from_slice(p),
                (KvData::F16(o), KvData::F16(p)) => o.extend_from_slice(p),
                // one backbone exports one dtype; adapters are grouped per backbone
                _ => unreachable!("K/V of one backbone share one dtype"),
            }
        }
        out
    }

    /// A view as an ONNX Runtime input of `shape`.
    pub fn view(&self, shape: Vec<usize>) -> ort::Result<SessionInputValue<'_>> {
        Ok(match self {
            KvData::F32(v) => TensorRef::from_array_view((shape, v.as_slice()))?.into(),
            KvData::F16(v) => TensorRef::from_array_view((shape, v.as_slice()))?.into(),
        })
    }

    /// Splits a batch output into one part per image.
    fn split<V: TensorValueTypeMarker + ?Sized>(
        value: &Value<V>,
        images: usize,
    ) -> Result<Vec<KvData>, String> {
        fn chunks<T: Clone>(data: &[T], images: usize) -> Vec<Vec<T>> {
            let per = data.len() / images.max(1);
            data.chunks(per.max(1)).map(<[T]>::to_vec).collect()
        }
        let parts = match value.try_extract_tensor::<f32>() {
            Ok((_, data)) => chunks(data, images).into_iter().map(KvData::F32).collect(),
            Err(_) => {
                let (_, data) = value
                    .try_extract_tensor::<f16>()
                    .map_err(|e| format!("K/V are neither float32 nor float16: {e}"))?;
                chunks(data, images)
                    .into_iter()
                    .map(KvData::F16)
                    .collect::<Vec<_>>()
            }
        };
        if parts.len() != images {
            return Err(format!(
                "K/V hold {} images, expected {images}",
                parts.len()
            ));
        }
        Ok(parts)
    }
}

/// The K/V a backbone run produced for one image, on the host: shareable between
/// requests (feature cache) and stackable into side-network batches.
pub struct Features {
    /// `[1, layers, heads, k, head_dim]`.
    pub shape: [usize; 5],
    /// `key_states` of the image.
    pub key: KvData,
    /// `value_states` of the image.
    pub value: KvData,
    /// `token_indices` of the image, `[layers, heads, k]`, where the backbone outputs them:
    /// which patch each selected token is (what a saliency map needs, [`crate::explain`]).
    pub indices: Option<Arc<[i64]>>,
}

impl Features {
    /// Memory its K/V (and token indices) take.
    pub fn bytes(&self) -> usize {
        self.key.bytes() + self.value.bytes() + self.indices.as_ref().map_or(0, |i| i.len() * 8)
    }
}

/// The output naming each selected token's position, where a backbone has it.
pub const TOKEN_INDICES: &str = "token_indices";

/// Splits a batch's `token_indices` into one `[layers, heads, k]` part per image.
fn split_indices<V: TensorValueTypeMarker + ?Sized>(
    value: &Value<V>,
    images: usize,
) -> Result<Vec<Arc<[i64]>>, String> {
    let (_, data) = value
        .try_extract_tensor::<i64>()
        .map_err(|e| format!("{TOKEN_INDICES} is not int64: {e}"))?;
    if images == 0 || data.len() % images != 0 {
        return Err(format!(
            "{TOKEN_INDICES} holds {} values, not a multiple of {images} images",
            data.len()
        ));
    }
    Ok(data.chunks(data.len() / images).map(Arc::from).collect())
}

/// A backbone batch's K/V left where the backbone computed them (device memory under the
/// CUDA execution provider, host memory under the CPU one), for side networks to read
/// there through I/O binding: the bound path, with no host copy between the two models.
pub struct BoundFeatures {
    /// `key_states` of the whole batch.
    pub key: DynTensor,
    /// `value_states` of the whole batch.
    pub value: DynTensor,
    /// `[images, layers, heads, k, head_dim]`.
    pub shape: [usize; 5],
    /// Each image's `token_indices` (on the host), where the backbone outputs them.
    pub indices: Option<Vec<Arc<[i64]>>>,
}

impl BoundFeatures {
    /// Images in the batch.
    pub fn images(&self) -> usize {
        self.shape[0]
    }

    /// Whether the K/V are float16 (a backbone exported for the GPU).
    pub fn float16(&self) -> bool {
        matches!(
            self.key.dtype(),
            ValueType::Tensor {
                ty: ort::value::TensorElementType::Float16,
                ..
            }
        )
    }

    /// Bytes of K/V, wherever they are.
    pub fn bytes(&self) -> usize {
        let elements: usize = self.shape.iter().product();
        2 * elements * if self.float16() { 2 } else { 4 }
    }

    /// Each image's K/V on the host (what the feature cache keeps): copied from device
    /// memory first when they are there.
    pub fn to_host(&self) -> Result<Vec<Features>, String> {
        let images = self.images();
        let host = |t: &DynTensor| -> Result<Vec<KvData>, String> {
            if t.memory_info().is_cpu_accessible() {
                KvData::split(t, images)
            } else {
                let copy = t.to(AllocationDevice::CPU, 0).map_err(|e| e.to_string())?;
                KvData::split(&copy, images)
            }
        };
        let keys = host(&self.key)?;
        let values = host(&self.value)?;
        let shape = [
            1,
            self.shape[1],
            self.shape[2],
            self.shape[3],
            self.shape[4],
        ];
        Ok(keys
            .into_iter()
            .zip(values)
            .enumerate()
            .map(|(i, (key, value))| Features {
                shape,
                key,
                value,
                indices: self.indices.as_ref().map(|all| all[i].clone()),
            })
            .collect())
    }
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
            &[
                manifest.outputs.clone(),
                manifest.explanation_outputs.clone(),
            ]
            .concat(),
            Memory::Arena,
        )?;
        let shape = &manifest
            .inputs
            .iter()
            .find(|s| s.name == "pixel_values")
            .expect("validated by BackboneManifest::read")
            .shape;
        let input_size = [shape[2] as usize, shape[3] as usize];
        let model_bytes = std::fs::metadata(dir.join(&manifest.file)).map_or(0, |m| m.len());
        let token_indices = manifest
            .explanation_outputs
            .iter()
            .any(|o| o.name == TOKEN_INDICES);
        Ok(Backbone {
            manifest,
            dir: dir.to_path_buf(),
            model,
            input_size,
            model_bytes,
            warm: Mutex::new(None),
            standing: Standing::No,
            token_indices,
        })
    }

    /// How this variant serves the adapters of the backbone it was made from (see
    /// [`Backbone::standing_for`]); nothing changes for a backbone that is no variant.
    pub fn with_standing(mut self, standing: Standing) -> Self {
        self.standing = standing;
        self
    }

    /// How it serves adapters trained on `trained_on` although it is another backbone:
    /// [`Standing::No`] unless it was made from that one and the operator's settings say so.
    pub fn standing_for(&self, trained_on: &BackboneRef) -> Standing {
        if self.manifest.quantized_from.as_ref() == Some(trained_on) {
            self.standing
        } else {
            Standing::No
        }
    }

    /// Where its sessions run (the CPU after a CUDA fallback).
    pub fn device(&self) -> Device {
        self.model.device
    }

    /// Features of an all-zero image, computed once: what newly loaded adapters are warmed
    /// with, so loading one costs a side-network run, not a backbone run.
    pub fn warm_features(&self) -> Result<Arc<Features>, ModelError> {
        let mut slot = self.warm.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(features) = &*slot {
            return Ok(features.clone());
        }
        let [h, w] = self.input_size;
        let features: Arc<Features> = self
            .infer(vec![0.0; 3 * h * w], 1)?
            .pop()
            .expect("one image in, one out")
            .into();
        self.model.set_warm();
        *slot = Some(features.clone());
        Ok(features)
    }

    /// Whether it outputs each selected token's position ([`TOKEN_INDICES`]), which saliency
    /// maps need.
    pub fn has_token_indices(&self) -> bool {
        self.token_indices
    }

    /// Size of its ONNX model.
    pub fn model_bytes(&self) -> u64 {
        self.model_bytes
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

    /// Runs `images` images at once, `pixels` being their `[images, 3, height, width]`
    /// normalised tensor; returns each image's features, in order.
    pub fn run_batch(&self, pixels: Vec<f32>, images: usize) -> Result<Vec<Features>, ModelError> {
        self.model.request_run("backbone");
        self.infer(pixels, images)
    }

    /// [`Backbone::run_batch`] on the bound path: the K/V stay in the execution provider's
    /// memory ([`BoundFeatures`]); under CUDA the pixels go up from pinned host memory.
    pub fn run_bound(&self, pixels: Vec<f32>, images: usize) -> Result<BoundFeatures, ModelError> {
        self.model.request_run("backbone");
        let error = |e: ort::Error| self.model.inference_error(e);
        let [h, w] = self.input_size;
        let shape = [images, 3, h, w];
        let memory = self.model.device_memory().map_err(error)?;
        let mut session = self.model.lock();
        let mut binding = session.create_binding().map_err(error)?;
        bind_pixels(&mut binding, &session, &memory, shape, pixels).map_err(error)?;
        binding
            .bind_output_to_device("key_states", &memory)
            .map_err(error)?;
        binding
            .bind_output_to_device("value_states", &memory)
            .map_err(error)?;
        if self.token_indices {
            let host = super::host_memory().map_err(error)?;
            binding
                .bind_output_to_device(TOKEN_INDICES, &host)
                .map_err(error)?;
        }
        let mut outputs = session.run_binding(&binding).map_err(error)?;
        let mut take = |name: &str| -> Result<DynTensor, ModelError> {
            outputs
                .remove(name)
                .ok_or_else(|| self.model.inference_error(format!("no output {name}")))?
                .downcast::<DynTensorValueType>()
                .map_err(error)
        };
        let key = take("key_states")?;
        let value = take("value_states")?;
        let indices = if self.token_indices {
            Some(split_indices(&take(TOKEN_INDICES)?, images).map_err(error_text(&self.model))?)
        } else {
            None
        };
        drop(outputs);
        drop(binding);
        drop(session);
        let shape: [usize; 5] = match key.shape().iter().map(|&d| d as usize).collect::<Vec<_>>()[..]
        {
            [n, l, h, k, d] if n == images => [n, l, h, k, d],
            ref other => {
                return Err(self.model.inference_error(format!(
                    "key_states has shape {other:?}, expected {images} images in 5 dimensions"
                )));
            }
        };
        Ok(BoundFeatures {
            key,
            value,
            shape,
            indices,
        })
    }

    fn infer(&self, pixels: Vec<f32>, images: usize) -> Result<Vec<Features>, ModelError> {
        let [h, w] = self.input_size;
        let input = Tensor::from_array(([images, 3, h, w], pixels))
            .map_err(|e| self.model.inference_error(e))?;
        let mut session = self.model.lock();
        let mut outputs = session
            .run(ort::inputs!["pixel_values" => input])
            .map_err(|e| self.model.inference_error(e))?;
        let mut take = |name: &str| {
            let value = outputs
                .remove(name)
                .ok_or_else(|| self.model.inference_error(format!("no output {name}")))?;
            let shape = match value.dtype() {
                ValueType::Tensor { shape, .. } => shape.iter().map(|&d| d as usize).collect(),
                _ => Vec::new(),
            };
            let parts = KvData::split(&value, images).map_err(|e| self.model.inference_error(e))?;
            Ok::<_, ModelError>((shape, parts))
        };
        let (shape, keys) = take("key_states")?;
        let (_, values) = take("value_states")?;
        let mut indices = match (self.token_indices, outputs.remove(TOKEN_INDICES)) {
            (true, Some(value)) => Some(
                split_indices(&value, images)
                    .map_err(error_text(&self.model))?
                    .into_iter(),
            ),
            (true, None) => {
                return Err(self
                    .model
                    .inference_error(format!("no output {TOKEN_INDICES}")));
            }
            (false, _) => None,
        };
        drop(outputs);
        drop(session);
        let shape: [usize; 5] = match shape.as_slice() {
            [n, l, h, k, d] if *n == images => [1, *l, *h, *k, *d],
            other => {
                return Err(self.model.inference_error(format!(
                    "key_states has shape {other:?}, expected 5 dimensions"
                )));
            }
        };
        Ok(keys
            .into_iter()
            .zip(values)
            .map(|(key, value)| Features {
                shape,
                key,
                value,
                indices: indices.as_mut().and_then(Iterator::next),
            })
            .collect())
    }
}

/// Maps a message to the model's inference error.
fn error_text(model: &Model) -> impl Fn(String) -> ModelError + '_ {
    move |message| model.inference_error(message)
}

/// Binds the backbone's input: the caller's host buffer as it is on the CPU; under CUDA a
/// copy in pinned (page-locked) host memory, so the upload is one DMA transfer.
///
/// Bound inputs are owned tensors: `ort` (2.0.0-rc.15) copies a borrowed one
/// (`TensorRef`) when binding it, through a helper session whose lock it then takes twice,
/// which hangs the run.
fn bind_pixels(
    binding: &mut IoBinding,
    session: &Session,
    memory: &MemoryInfo<'static>,
    shape: [usize; 4],
    pixels: Vec<f32>,
) -> ort::Result<()> {
    if memory.is_cpu_accessible() {
        return binding.bind_input("pixel_values", &Tensor::from_array((shape, pixels))?);
    }
    let pinned = MemoryInfo::new(
        AllocationDevice::CUDA_PINNED,
        0,
        AllocatorType::Device,
        MemoryType::CPUInput,
    )?;
    let allocator = Allocator::new(session, pinned)?;
    let mut tensor = Tensor::<f32>::new(&allocator, shape)?;
    tensor.extract_tensor_mut().1.copy_from_slice(&pixels);
    binding.bind_input("pixel_values", &tensor)
}
