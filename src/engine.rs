//! The request path: decode once, preprocess and run the backbone once per distinct
//! preprocessing key among the requested tasks, then each task's adapter.
//!
//! Everything here is blocking (pixel decoding, ONNX Runtime); the gRPC layer calls it
//! from `spawn_blocking`, never on the async executor's threads.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::decode::{self, DecodeError, DicomIdentifiers, InputInfo, Limits};
use crate::metrics;
use crate::model::ModelError;
use crate::model::adapter::Adapter;
use crate::model::backbone::Features;
use crate::preprocess::{self, RgbImage};
use crate::registry::{Registry, ResolveError};
use crate::repository::manifest::DicomPolicy;

/// Most tasks one call may ask for.
pub const MAX_TASKS_PER_REQUEST: usize = 64;

/// The image payload of a request.
pub enum Payload {
    /// A DICOM Part 10 file.
    Dicom(Vec<u8>),
    /// A PNG, JPEG or TIFF file.
    Image(Vec<u8>),
}

/// One classification request.
pub struct Request {
    /// The image.
    pub payload: Payload,
    /// Task references (`name` or `name@version`).
    pub tasks: Vec<String>,
    /// Frame index for multi-frame DICOM.
    pub frame: u32,
    /// Replaces the tasks' DICOM pixel policy, where their manifests allow it.
    pub pixel_policy: Option<DicomPolicy>,
}

/// Why a request failed; mapped to a gRPC status in `grpc::status`.
#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    /// The request names no task.
    #[error("no tasks given: name at least one task (see ListTasks)")]
    NoTasks,
    /// More tasks than [`MAX_TASKS_PER_REQUEST`].
    #[error("{0} tasks requested; at most {MAX_TASKS_PER_REQUEST} per call")]
    TooManyTasks(usize),
    /// The request carries no image.
    #[error("no input: set either dicom or image")]
    NoInput,
    /// A task reference does not resolve.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// The payload could not be decoded.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A model failed to run.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The request's pixel policy is invalid or not allowed for a task.
    #[error("{0}")]
    PixelPolicy(String),
    /// An adapter evicted under the budget could not be loaded again.
    #[error("{task} was evicted under the adapter budget and does not load again: {reason}")]
    Reload {
        /// The task reference.
        task: String,
        /// Why.
        reason: String,
    },
}

/// One class's score.
#[derive(Clone, Debug, Serialize)]
pub struct ClassScore {
    /// Class name.
    pub name: String,
    /// Softmax probability.
    pub probability: f32,
    /// Raw logit.
    pub logit: f32,
}

/// One task's answer.
#[derive(Clone, Debug, Serialize)]
pub struct TaskOutcome {
    /// Task name.
    pub task: String,
    /// Adapter version that answered.
    pub adapter_version: String,
    /// Backbone name.
    pub backbone: String,
    /// Scores in class index order.
    pub scores: Vec<ClassScore>,
    /// Most probable class.
    pub label: String,
    /// Index of the backbone pass used, within this call.
    pub backbone_run: u32,
}

/// Wall time per stage, in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    /// Decoding the payload.
    pub decode_ms: f64,
    /// Rendering, resizing and normalising.
    pub preprocess_ms: f64,
    /// Backbone runs.
    pub backbone_ms: f64,
    /// Side network runs.
    pub adapters_ms: f64,
    /// Everything.
    pub total_ms: f64,
}

/// A request's answer.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    /// In request order.
    pub results: Vec<TaskOutcome>,
    /// What was decoded.
    pub input: InputInfo,
    /// DICOM UIDs, for DICOM input.
    pub dicom: Option<DicomIdentifiers>,
    /// Stage timings.
    pub timings: Timings,
    /// Backbone passes run.
    pub backbone_runs: u32,
    /// Some task used features computed for another task.
    pub backbone_features_reused: bool,
}

/// What makes two tasks' backbone inputs identical: same backbone, same normalisation,
/// same DICOM pixel policy (the backbone size is fixed by the backbone).
#[derive(PartialEq)]
struct BackboneKey {
    backbone: String,
    mean: [u32; 3],
    std: [u32; 3],
    policy: DicomPolicy,
}

/// What makes two tasks' side inputs identical.
#[derive(PartialEq)]
struct SideKey {
    size: [u32; 2],
    mean: [u32; 3],
    std: [u32; 3],
    policy: DicomPolicy,
}

fn bits(v: [f32; 3]) -> [u32; 3] {
    v.map(f32::to_bits)
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Softmax in f64 (stable for any logit range), rounded to f32 at the end.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = logits
        .iter()
        .map(|&l| (f64::from(l) - f64::from(max)).exp())
        .collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| (e / sum) as f32).collect()
}

/// Runs classification requests against the registry's current snapshot.
pub struct Engine {
    registry: Arc<Registry>,
    limits: Limits,
}

impl Engine {
    /// An engine over `registry`, decoding within `limits`.
    pub fn new(registry: Arc<Registry>, limits: Limits) -> Self {
        Engine { registry, limits }
    }

    /// The registry it serves from.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The DICOM pixel policy a task runs with: the request's when given and allowed.
    fn pixel_policy(
        adapter: &Adapter,
        requested: Option<&DicomPolicy>,
    ) -> Result<DicomPolicy, ClassifyError> {
        let own = &adapter.manifest().preprocessing.dicom;
        match requested {
            None => Ok(own.clone()),
            Some(_) if !own.allow_request_override => Err(ClassifyError::PixelPolicy(format!(
                "task {}@{} does not allow overriding its DICOM pixel policy",
                adapter.task(),
                adapter.version()
            ))),
            Some(p) => {
                p.validate()
                    .map_err(|e| ClassifyError::PixelPolicy(format!("pixel_policy: {e}")))?;
                Ok(p.clone())
            }
        }
    }

    /// Classifies one image for the requested tasks. Blocking.
    pub fn classify(&self, request: Request) -> Result<Outcome, ClassifyError> {
        let start = Instant::now();
        if request.tasks.is_empty() {
            return Err(ClassifyError::NoTasks);
        }
        if request.tasks.len() > MAX_TASKS_PER_REQUEST {
            return Err(ClassifyError::TooManyTasks(request.tasks.len()));
        }
        // Resolve before decoding: an unknown task fails without touching the pixels.
        let snapshot = self.registry.snapshot();
        let adapters: Vec<Arc<Adapter>> = request
            .tasks
            .iter()
            .map(|t| match snapshot.resolve(t) {
                Err(e @ (ResolveError::UnknownTask(_) | ResolveError::UnknownVersion { .. })) => {
                    // evicted under the adapter budget: load it again, or say why not
                    match self.registry.reload_evicted(t) {
                        Some(Ok(adapter)) => Ok(adapter),
                        Some(Err(reason)) => Err(ClassifyError::Reload {
                            task: t.clone(),
                            reason,
                        }),
                        None => Err(e.into()),
                    }
                }
                other => other.map_err(ClassifyError::from),
            })
            .collect::<Result<_, _>>()?;
        let policies: Vec<DicomPolicy> = adapters
            .iter()
            .map(|a| Self::pixel_policy(a, request.pixel_policy.as_ref()))
            .collect::<Result<_, _>>()?;

        let mut timings = Timings::default();
        let t = Instant::now();
        let decoded = match &request.payload {
            Payload::Dicom(bytes) => decode::dicom::decode(bytes, request.frame, &self.limits)?,
            Payload::Image(bytes) => decode::image::decode(bytes, request.frame, &self.limits)?,
        };
        timings.decode_ms = ms(t);
        metrics::stage("decode", timings.decode_ms);

        let mut rendered: Vec<(DicomPolicy, Cow<'_, RgbImage>)> = Vec::new();
        let mut passes: Vec<(BackboneKey, Features)> = Vec::new();
        let mut side_inputs: Vec<(SideKey, Vec<f32>)> = Vec::new();
        let mut results = Vec::with_capacity(adapters.len());
        let mut reused = false;

        for (adapter, policy) in adapters.iter().zip(&policies) {
            let pre = &adapter.manifest().preprocessing;
            let norm = adapter.normalization();

            let t = Instant::now();
            let image_index = match rendered.iter().position(|(p, _)| p == policy) {
                Some(i) => i,
                None => {
                    rendered.push((policy.clone(), decoded.render(policy)?));
                    rendered.len() - 1
                }
            };
            let image = &rendered[image_index].1;
            timings.preprocess_ms += ms(t);

            let key = BackboneKey {
                backbone: adapter.backbone().identity().sha256,
                mean: bits(norm.mean),
                std: bits(norm.std),
                policy: policy.clone(),
            };
            let run = match passes.iter().position(|(k, _)| *k == key) {
                Some(i) => {
                    reused = true;
                    i
                }
                None => {
                    let t = Instant::now();
                    let [h, w] = adapter.backbone().input_size();
                    let pixels = preprocess::to_tensor(image, [h as u32, w as u32], &norm);
                    timings.preprocess_ms += ms(t);
                    let t = Instant::now();
                    let features = adapter.backbone().run(pixels)?;
                    let elapsed = ms(t);
                    timings.backbone_ms += elapsed;
                    metrics::stage("backbone", elapsed);
                    passes.push((key, features));
                    passes.len() - 1
                }
            };

            let side_key = SideKey {
                size: pre.side_size,
                mean: bits(norm.mean),
                std: bits(norm.std),
                policy: policy.clone(),
            };
            let side_index = match side_inputs.iter().position(|(k, _)| *k == side_key) {
                Some(i) => i,
                None => {
                    let t = Instant::now();
                    let pixels = preprocess::to_tensor(image, pre.side_size, &norm);
                    timings.preprocess_ms += ms(t);
                    side_inputs.push((side_key, pixels));
                    side_inputs.len() - 1
                }
            };

            let t = Instant::now();
            let logits = adapter.run(&side_inputs[side_index].1, &passes[run].1)?;
            let elapsed = ms(t);
            timings.adapters_ms += elapsed;
            metrics::stage("adapter", elapsed);

            adapter.record_use();
            let probabilities = softmax(&logits);
            let scores: Vec<ClassScore> = adapter
                .classes()
                .iter()
                .zip(logits.iter().zip(&probabilities))
                .map(|(name, (&logit, &probability))| ClassScore {
                    name: name.clone(),
                    probability,
                    logit,
                })
                .collect();
            let label = scores
                .iter()
                .fold(None::<&ClassScore>, |best, s| match best {
                    Some(b) if b.probability >= s.probability => Some(b),
                    _ => Some(s),
                })
                .map(|s| s.name.clone())
                .unwrap_or_default();
            metrics::task_answered(adapter.task());
            results.push(TaskOutcome {
                task: adapter.task().to_string(),
                adapter_version: adapter.version().to_string(),
                backbone: adapter.backbone().identity().name,
                scores,
                label,
                backbone_run: run as u32,
            });
        }
        drop(rendered);
        metrics::stage("preprocess", timings.preprocess_ms);
        timings.total_ms = ms(start);
        metrics::stage("total", timings.total_ms);
        Ok(Outcome {
            results,
            input: decoded.info,
            dicom: decoded.dicom,
            timings,
            backbone_runs: passes.len() as u32,
            backbone_features_reused: reused,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::softmax;

    #[test]
    fn softmax_is_stable_and_normalised() {
        let p = softmax(&[1000.0, 1000.0, -1000.0]);
        assert!((p[0] - 0.5).abs() < 1e-7 && (p[1] - 0.5).abs() < 1e-7 && p[2] == 0.0);
        let p = softmax(&[0.0, (2.0f32).ln()]);
        assert!((p[0] - 1.0 / 3.0).abs() < 1e-7, "{p:?}");
    }
}
