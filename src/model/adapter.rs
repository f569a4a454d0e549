//! A task adapter: the FPT+ side network plus fusion module for one task version. Its
//! inputs are the task's own low-resolution view of the image and the backbone's K/V.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ort::value::{Tensor, TensorRef};

use super::backbone::{Backbone, BoundFeatures, Features, KvData, Standing};
use super::{Model, ModelError, host_memory};
use crate::explain::{PATCH_RELEVANCE, Relevance, RelevanceShape, TOKEN_RELEVANCE};
use crate::preprocess::Normalization;
use crate::repository::manifest::{AdapterManifest, short};
use crate::runtime::{Memory, Runtime};

/// A loaded adapter, bound to the backbone it was trained against.
pub struct Adapter {
    manifest: AdapterManifest,
    dir: PathBuf,
    backbone: Arc<Backbone>,
    model: Model,
    model_bytes: u64,
    loaded_unix_ms: i64,
    load_ms: f64,
    served: AtomicU64,
    last_used_unix_ms: AtomicI64,
    /// Its explanation outputs' shapes, or why it cannot explain its answers.
    explains: Result<RelevanceShape, String>,
    /// Declared last, so it drops after the session: gives the freed memory back.
    _release: ReleaseMemory,
}

/// Returns freed heap memory to the operating system when dropped. glibc keeps freed
/// blocks of an unloaded adapter's session in its heaps, so RSS would not come down after
/// unloading: after loading, using and unloading 100 full-size adapters RSS stayed 379 MiB
/// above where it started; with `malloc_trim` it ends 32 MiB below (benches case 6).
#[derive(Default)]
struct ReleaseMemory;

impl Drop for ReleaseMemory {
    fn drop(&mut self) {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only walks glibc's own heaps; no pointers are passed.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// What operators see of an adapter (ListAdapters); plain data, kept after it is unloaded.
#[derive(Clone, Debug)]
pub struct AdapterInfo {
    /// Task name.
    pub task: String,
    /// Version.
    pub version: String,
    /// SHA-256 of its ONNX file.
    pub sha256: String,
    /// The backbone it runs on (name and SHA-256): the one it was trained against, or an
    /// allowed variant of it.
    pub backbone: (String, String),
    /// Folder it was loaded from.
    pub path: PathBuf,
    /// Size of its ONNX model.
    pub model_bytes: u64,
    /// Loading, checking and warming took this long.
    pub load_ms: f64,
    /// When it was loaded (Unix ms).
    pub loaded_unix_ms: i64,
    /// Last request that used it (Unix ms, 0 = none).
    pub last_used_unix_ms: i64,
    /// Requests it answered.
    pub requests_served: u64,
}

/// Now, in Unix milliseconds.
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Adapter {
    /// Loads `dir`, checks it against `backbones` (picking the one it names) and its
    /// graph against its manifest. Not warm yet: [`crate::lifecycle`] warms it
    /// ([`Adapter::warm`]) before it serves.
    pub fn load(
        dir: &Path,
        runtime: &Runtime,
        backbones: &[Arc<Backbone>],
    ) -> Result<Self, ModelError> {
        let started = Instant::now();
        let signed = runtime.trust().map(|t| t.check(dir)).transpose()?;
        let manifest = AdapterManifest::read(dir)?;
        if let Some(signed) = signed {
            // the manifest read must be the one whose signature was checked
            let path = dir.join(crate::repository::manifest::MANIFEST_FILE);
            if std::fs::read(&path).ok().as_ref() != Some(&signed) {
                return Err(crate::signing::SignatureError::Invalid(dir.to_path_buf()).into());
            }
        }
        // a preferred (float16) variant of the backbone it was trained against, else that
        // backbone, else a variant of it the operator allowed where it is missing
        let standing_in = |standing| {
            backbones
                .iter()
                .find(|b| b.standing_for(&manifest.backbone) == standing)
        };
        let chosen = standing_in(Standing::Preferred)
            .or_else(|| backbones.iter().find(|b| b.identity() == manifest.backbone))
            .or_else(|| standing_in(Standing::WhereMissing));
        let backbone = match chosen {
            Some(b) => b.clone(),
            None => {
                let variant = backbones
                    .iter()
                    .find(|b| b.manifest().derives_from(&manifest.backbone));
                // Say what differs against the closest candidate (same name, if any).
                let closest = backbones
                    .iter()
                    .find(|b| b.identity().name == manifest.backbone.name)
                    .or(backbones.first());
                let problems = match (variant, closest) {
                    (Some(v), _) => vec![format!(
                        "trained on backbone {}@{}, which is not loaded; {} is a {} variant \
                         of it, used only where allowed: --allow-backbone-variant {} \
                         (allow_backbone_variants in the config file)",
                        manifest.backbone.name,
                        short(&manifest.backbone.sha256),
                        v.identity().name,
                        v.manifest().precision.as_deref().unwrap_or("derived"),
                        v.identity().name,
                    )],
                    (None, Some(b)) => manifest
                        .check_against(b.manifest())
                        .err()
                        .unwrap_or_default(),
                    (None, None) => vec!["no backbone is loaded".into()],
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
            &[
                manifest.outputs.clone(),
                manifest.explanation_outputs.clone(),
            ]
            .concat(),
            Memory::Shared,
        )?;
        let explains = explanation_support(&manifest, &backbone);
        let model_bytes = std::fs::metadata(dir.join(&manifest.file)).map_or(0, |m| m.len());
        crate::metrics::adapter_loaded(started.elapsed().as_secs_f64());
        Ok(Adapter {
            manifest,
            dir: dir.to_path_buf(),
            backbone,
            model,
            model_bytes,
            loaded_unix_ms: unix_ms(),
            load_ms: started.elapsed().as_secs_f64() * 1e3,
            served: AtomicU64::new(0),
            last_used_unix_ms: AtomicI64::new(0),
            explains,
            _release: ReleaseMemory,
        })
    }

    /// The shapes of its explanation outputs, or why it cannot explain (exported without
    /// them, or its backbone without token positions).
    pub fn explains(&self) -> Result<&RelevanceShape, &str> {
        self.explains.as_ref().map_err(String::as_str)
    }

    /// Runs it once on `features` (from a backbone warm-up), so that the first request
    /// does not pay ONNX Runtime's first-run set-up; adds the time to its load time.
    pub fn warm(mut self, features: &Features) -> Result<Self, ModelError> {
        let started = Instant::now();
        let [h, w] = self.manifest.preprocessing.side_size.map(|v| v as usize);
        self.infer(&[(&vec![0.0; 3 * h * w], features)], false)?;
        self.model.set_warm();
        self.load_ms += started.elapsed().as_secs_f64() * 1e3;
        Ok(self)
    }

    /// It came from a folder that stays (not an upload), so it can be loaded again.
    pub fn reloadable(&self) -> bool {
        self.dir.join(&self.manifest.file).is_file()
    }

    /// Counts one request it answered.
    pub fn record_use(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
        self.last_used_unix_ms.store(unix_ms(), Ordering::Relaxed);
    }

    /// When a request last used it (Unix ms, 0 = never).
    pub fn last_used_unix_ms(&self) -> i64 {
        self.last_used_unix_ms.load(Ordering::Relaxed)
    }

    /// SHA-256 of its ONNX file.
    pub fn sha256(&self) -> &str {
        &self.manifest.sha256
    }

    /// What operators see of it.
    pub fn info(&self) -> AdapterInfo {
        AdapterInfo {
            task: self.task().to_string(),
            version: self.version().to_string(),
            sha256: self.sha256().to_string(),
            backbone: {
                let runs_on = self.backbone.identity();
                (runs_on.name, runs_on.sha256)
            },
            path: self.dir.clone(),
            model_bytes: self.model_bytes,
            load_ms: self.load_ms,
            loaded_unix_ms: self.loaded_unix_ms,
            last_used_unix_ms: self.last_used_unix_ms(),
            requests_served: self.served.load(Ordering::Relaxed),
        }
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

    /// Runs the side network once for requests on several images (their side pixels,
    /// `[3, h, w]` each for its side size, and K/V stacked into one batch); returns each
    /// image's logits, in order, with its relevance where `explain` asks for it.
    pub fn run_batch(
        &self,
        images: &[(&[f32], &Features)],
        explain: &[bool],
    ) -> Result<Vec<SideOutput>, ModelError> {
        self.model.request_run("adapter");
        let outputs = self.infer(images, explain.iter().any(|&e| e))?;
        let indices: Vec<_> = images.iter().map(|(_, f)| f.indices.clone()).collect();
        self.side_outputs(outputs, explain, &indices)
    }

    fn infer(
        &self,
        images: &[(&[f32], &Features)],
        relevance: bool,
    ) -> Result<RunOutputs, ModelError> {
        let n = images.len();
        let [h, w] = self.manifest.preprocessing.side_size.map(|v| v as usize);
        let Some((_, first)) = images.first() else {
            return Ok(RunOutputs {
                n: 0,
                logits: Vec::new(),
                relevance: None,
            });
        };
        let [_, layers, heads, k, d] = first.shape;
        let kv_shape = vec![n, layers, heads, k, d];
        let error = |e: ort::Error| self.model.inference_error(e);
        // one image: its buffers as they are; several: stacked copies
        let stacked;
        let (pixels, key, value) = if n == 1 {
            (images[0].0, &first.key, &first.value)
        } else {
            stacked = (
                images
                    .iter()
                    .flat_map(|(p, _)| p.iter().copied())
                    .collect::<Vec<f32>>(),
                KvData::concat(images.iter().map(|(_, f)| &f.key)),
                KvData::concat(images.iter().map(|(_, f)| &f.value)),
            );
            (stacked.0.as_slice(), &stacked.1, &stacked.2)
        };
        let input = TensorRef::from_array_view(([n, 3, h, w], pixels)).map_err(error)?;
        let mut session = self.model.lock();
        let outputs = session
            .run(ort::inputs![
                "side_pixel_values" => input,
                "key_states" => key.view(kv_shape.clone()).map_err(error)?,
                "value_states" => value.view(kv_shape).map_err(error)?,
            ])
            .map_err(error)?;
        self.take_outputs(&outputs, n, relevance)
    }

    /// [`Adapter::run_batch`] on the bound path: the side network runs on every image of the
    /// backbone batch `kv`, reading its K/V where the backbone left them (device memory under
    /// CUDA); `side_pixels` holds a side view for each (zeros for the images that did not ask
    /// for this task, whose logits the caller drops). A side network costs about 1/200 of the
    /// backbone, less than gathering the rows that asked would on a device.
    pub fn run_bound(
        &self,
        side_pixels: Vec<f32>,
        kv: &BoundFeatures,
        explain: &[bool],
    ) -> Result<Vec<SideOutput>, ModelError> {
        self.model.request_run("adapter");
        let n = kv.images();
        let [h, w] = self.manifest.preprocessing.side_size.map(|v| v as usize);
        let error = |e: ort::Error| self.model.inference_error(e);
        // owned: see `backbone::bind_pixels`
        let pixels = Tensor::from_array(([n, 3, h, w], side_pixels)).map_err(error)?;
        let host = host_memory().map_err(error)?;
        let mut session = self.model.lock();
        let mut binding = session.create_binding().map_err(error)?;
        binding
            .bind_input("side_pixel_values", &pixels)
            .map_err(error)?;
        binding.bind_input("key_states", &kv.key).map_err(error)?;
        binding
            .bind_input("value_states", &kv.value)
            .map_err(error)?;
        binding
            .bind_output_to_device("logits", &host)
            .map_err(error)?;
        let explained = explain.iter().any(|&e| e) && self.explains.is_ok();
        if explained {
            for name in [TOKEN_RELEVANCE, PATCH_RELEVANCE] {
                binding.bind_output_to_device(name, &host).map_err(error)?;
            }
        }
        let outputs = {
            let outputs = session.run_binding(&binding).map_err(error)?;
            self.take_outputs(&outputs, n, explained)?
        };
        drop(binding);
        drop(session);
        let no_indices = vec![None; n];
        let indices = kv
            .indices
            .as_ref()
            .map_or(no_indices, |all| all.iter().cloned().map(Some).collect());
        self.side_outputs(outputs, explain, &indices)
    }

    /// A run's outputs on the host: `logits` of `n` images, and with `relevance` the
    /// explanation outputs, where the adapter has them.
    fn take_outputs(
        &self,
        outputs: &ort::session::SessionOutputs<'_>,
        n: usize,
        relevance: bool,
    ) -> Result<RunOutputs, ModelError> {
        let extract = |name: &str, per_image: usize| -> Result<Option<Vec<f32>>, ModelError> {
            let Some(value) = outputs.get(name) else {
                return Ok(None);
            };
            let (_, data) = value
                .try_extract_tensor::<f32>()
                .map_err(|e| self.model.inference_error(e))?;
            if data.len() != n * per_image {
                return Err(self.model.inference_error(format!(
                    "{name} holds {} values for {n} images of {per_image}",
                    data.len(),
                )));
            }
            Ok(Some(data.to_vec()))
        };
        let classes = self.manifest.classes.len();
        let logits = extract("logits", classes)?
            .ok_or_else(|| self.model.inference_error("no output logits"))?;
        let relevance = match &self.explains {
            Ok(shape) if relevance => {
                let [rows, columns] = shape.side_grid;
                match (
                    extract(TOKEN_RELEVANCE, classes * shape.tokens)?,
                    extract(PATCH_RELEVANCE, classes * rows * columns)?,
                ) {
                    (Some(token), Some(patch)) => Some((token, patch)),
                    _ => None,
                }
            }
            _ => None,
        };
        Ok(RunOutputs {
            n,
            logits,
            relevance,
        })
    }

    /// Each image's output: its logits, and its relevance where `explain` asks for it.
    fn side_outputs(
        &self,
        run: RunOutputs,
        explain: &[bool],
        indices: &[Option<Arc<[i64]>>],
    ) -> Result<Vec<SideOutput>, ModelError> {
        let classes = self.manifest.classes.len();
        let mut out = Vec::with_capacity(run.n);
        for i in 0..run.n {
            let logits = run.logits[i * classes..(i + 1) * classes].to_vec();
            let relevance = match (
                &self.explains,
                &run.relevance,
                explain.get(i),
                indices.get(i),
            ) {
                (Ok(shape), Some((token, patch)), Some(true), Some(Some(indices))) => {
                    if indices.len() != shape.tokens {
                        return Err(self.model.inference_error(format!(
                            "the backbone's token_indices hold {} positions per image, the \
                             adapter's {TOKEN_RELEVANCE} {}",
                            indices.len(),
                            shape.tokens
                        )));
                    }
                    let t = classes * shape.tokens;
                    let p = patch.len() / run.n;
                    Some(Relevance {
                        token: token[i * t..(i + 1) * t].to_vec(),
                        patch: patch[i * p..(i + 1) * p].to_vec(),
                        indices: indices.clone(),
                    })
                }
                _ => None,
            };
            out.push(SideOutput { logits, relevance });
        }
        Ok(out)
    }
}

/// What a side network run gives one image.
#[derive(Clone, Debug, Default)]
pub struct SideOutput {
    /// Its logits, in class order.
    pub logits: Vec<f32>,
    /// Its explanation outputs, when asked for and the adapter has them.
    pub relevance: Option<Relevance>,
}

/// A run's outputs copied out of ONNX Runtime.
struct RunOutputs {
    n: usize,
    logits: Vec<f32>,
    relevance: Option<(Vec<f32>, Vec<f32>)>,
}

/// Whether an adapter can explain its answers: its explanation outputs, and its backbone's
/// token positions.
fn explanation_support(
    manifest: &AdapterManifest,
    backbone: &Backbone,
) -> Result<RelevanceShape, String> {
    let kv_shape = backbone.manifest().kv_shape().unwrap_or_default();
    let shape = RelevanceShape::from_specs(
        &manifest.explanation_outputs,
        manifest.classes.len(),
        manifest.preprocessing.side_size,
        kv_shape,
    )?
    .ok_or_else(|| {
        format!(
            "adapter {}@{} was exported without explanation outputs ({TOKEN_RELEVANCE}, \
             {PATCH_RELEVANCE}); export it again with a current fptserve_models to explain it",
            manifest.task, manifest.version
        )
    })?;
    if !backbone.has_token_indices() {
        return Err(format!(
            "backbone {} was exported without {} (which patch each selected token is); \
             export it again with a current fptserve_models to explain its tasks",
            backbone.identity().name,
            crate::explain::TOKEN_INDICES
        ));
    }
    Ok(shape)
}
