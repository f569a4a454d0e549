//! The request path: decode once (on the bounded decode pool), preprocess once per
//! distinct preprocessing key among the requested tasks, take the backbone's features from
//! the [`cache`] or queue the image for a [`batcher`] run shared with other calls, then
//! each task's adapter. A [`call`] carries the deadline and cancellation that let queued
//! work be dropped before it costs anything.
//!
//! Decoding and ONNX Runtime are blocking: they run on `spawn_blocking` threads and the
//! batchers' own threads, never on the async executor's.

pub mod batcher;
pub mod cache;
pub mod call;
pub mod stats;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tokio::sync::{Semaphore, oneshot};

pub use self::batcher::BatchSettings;
use self::batcher::{Batcher, Job, JobError, JobOutput, SideWork};
use self::cache::{CacheKey, FeatureCache};
pub use self::call::{Abandoned, Call, CancelOnDrop};
use self::stats::Stats;
pub use self::stats::StatsSnapshot;
use crate::decode::codec::MinSize;
use crate::decode::{self, DecodeError, DicomIdentifiers, DicomPolicy, InputInfo, Limits};
use crate::explain::{self, Explanation, Relevance, SaliencyMap};
use crate::lifecycle::{Lifecycle, LoadError};
use crate::metrics;
use crate::model::ModelError;
use crate::model::adapter::{Adapter, SideOutput};
use crate::model::backbone::{Backbone, Features};
use crate::preprocess::{self, RgbImage};
use crate::registry::{Registry, ResolveError, Snapshot};
use crate::repository::manifest::DecodeResolution;

/// How the engine schedules work.
#[derive(Clone, Copy, Debug)]
pub struct EngineSettings {
    /// Backbone batching and its queue bound.
    pub batch: BatchSettings,
    /// Byte budget of the backbone feature cache (0 = off).
    pub feature_cache_bytes: usize,
    /// Calls decoding and preprocessing at once.
    pub decode_threads: usize,
}

/// One per core, at least one.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl EngineSettings {
    /// Defaults for a CPU or GPU: [`BatchSettings::for_device`], a 256 MiB feature cache
    /// (33 ViT-B/16@512 images in fp32) and one decode thread per core.
    pub fn for_device(gpu: bool) -> Self {
        EngineSettings {
            batch: BatchSettings::for_device(gpu),
            feature_cache_bytes: 256 << 20,
            decode_threads: cores(),
        }
    }
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self::for_device(false)
    }
}

/// Most tasks one call may ask for.
pub const MAX_TASKS_PER_REQUEST: usize = 64;

/// The image payload of a request.
pub enum Payload {
    /// A DICOM Part 10 file.
    Dicom(Vec<u8>),
    /// A PNG, JPEG or TIFF file.
    Image(Vec<u8>),
}

impl Payload {
    /// A file's payload kind from its first bytes: DICOM Part 10, else an image file.
    pub fn sniff(bytes: Vec<u8>) -> Self {
        if crate::decode::is_dicom(&bytes) {
            Payload::Dicom(bytes)
        } else {
            Payload::Image(bytes)
        }
    }
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
    /// Saliency maps wanted, if any.
    pub explain: Option<Explain>,
}

/// Which tasks of a call to explain, and how.
#[derive(Clone, Debug, Default)]
pub struct Explain {
    /// Task references as the call names them (`name` or `name@version`); empty: all.
    pub tasks: Vec<String>,
    /// Explain this class instead of the most probable one (in the tasks that have it).
    pub class_name: Option<String>,
    /// Also the map drawn over the decoded picture (for a PNG or a Secondary Capture).
    pub overlay: bool,
}

impl Explain {
    /// Whether the call's task reference `task` (naming `adapter`) is to be explained.
    fn wants(&self, task: &str, adapter: &Adapter) -> bool {
        self.tasks.is_empty() || self.tasks.iter().any(|t| names(t, task, adapter))
    }
}

/// Whether `name` of `explain.tasks` names the call's task reference `task` (resolved to
/// `adapter`): as the call wrote it, or by the bare task name.
fn names(name: &str, task: &str, adapter: &Adapter) -> bool {
    name == task || name == adapter.task()
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
    /// The explanation request names a task the call does not ask for.
    #[error("{0}")]
    Explain(String),
    /// Its work was dropped: deadline passed or cancelled.
    #[error(transparent)]
    Abandoned(#[from] Abandoned),
    /// The backbone queue is full.
    #[error("server busy: the backbone queue holds {capacity} images; retry with backoff")]
    QueueFull {
        /// The queue's bound.
        capacity: usize,
    },
    /// An adapter evicted under the budget could not be loaded again.
    #[error("{task} was evicted under the adapter budget and does not load again: {source}")]
    Reload {
        /// The task reference.
        task: String,
        /// Why, as any other load path would refuse it.
        source: LoadError,
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
    /// Images in the backbone batch that computed its features (0: from the cache).
    pub backbone_batch_size: u32,
    /// Its saliency map, or why it has none, when the call asked for one.
    #[serde(skip)]
    pub explanation: Option<Explanation>,
    /// The decoded picture its map is to be drawn over, when the call asked for an overlay
    /// and there is a map (drawn by whoever encodes it, off the executor:
    /// [`crate::explain::overlay`]).
    #[serde(skip)]
    pub picture: Option<Arc<RgbImage>>,
}

/// Wall time per stage, in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    /// Decoding the payload.
    pub decode_ms: f64,
    /// Rendering, resizing and normalising.
    pub preprocess_ms: f64,
    /// Waiting in the backbone queue (the longest of the call's images).
    pub queue_ms: f64,
    /// Backbone runs (shared with the other images of their batches).
    pub backbone_ms: f64,
    /// Side network runs.
    pub adapters_ms: f64,
    /// Saliency maps.
    pub explain_ms: f64,
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
    /// Backbone passes this call needed computed (cache hits not counted).
    pub backbone_runs: u32,
    /// Backbone passes answered from the feature cache.
    pub backbone_cache_hits: u32,
    /// Some task used features computed for another task of the call.
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

/// One backbone input of a call and the side networks that wait on its features.
struct Pass {
    key: BackboneKey,
    backbone: Arc<Backbone>,
    pixels: Vec<f32>,
    cache_key: CacheKey,
    cached: Option<Arc<Features>>,
    sides: Vec<SideWork>,
}

/// A call after decoding and preprocessing: ready for the models.
struct Prepared {
    passes: Vec<Pass>,
    /// Per requested task: its adapter, its pass, its place in the pass's sides.
    tasks: Vec<(Arc<Adapter>, usize, usize)>,
    /// Per requested task: what its explanation needs, when the call asked for one.
    explain: Vec<Option<TaskExplain>>,
    /// The call's explanation request.
    explain_request: Option<Explain>,
    input: InputInfo,
    dicom: Option<DicomIdentifiers>,
    timings: Timings,
}

/// A pass's results.
struct PassOutput {
    sides: Vec<Result<SideOutput, ModelError>>,
    batch_size: usize,
}

/// One task's explanation in the making: the rendered picture its overlay goes on (when
/// asked for), or why it cannot be explained.
enum TaskExplain {
    Ready(Option<Arc<RgbImage>>),
    Unavailable(String),
}

/// Runs classification requests against the registry's current snapshot.
pub struct Engine {
    lifecycle: Arc<Lifecycle>,
    limits: Limits,
    settings: EngineSettings,
    cache: Arc<FeatureCache>,
    stats: Arc<Stats>,
    decode_slots: Arc<Semaphore>,
    /// One per backbone (by SHA-256), started on first use.
    batchers: Mutex<HashMap<String, Arc<Batcher>>>,
}

impl Engine {
    /// An engine over the models of `lifecycle`, decoding within `limits`.
    pub fn new(lifecycle: Arc<Lifecycle>, limits: Limits, settings: EngineSettings) -> Self {
        Engine {
            lifecycle,
            limits,
            settings,
            cache: Arc::new(FeatureCache::new(settings.feature_cache_bytes)),
            stats: Arc::new(Stats::default()),
            decode_slots: Arc::new(Semaphore::new(settings.decode_threads.max(1))),
            batchers: Mutex::new(HashMap::new()),
        }
    }

    /// The registry it serves from.
    pub fn registry(&self) -> &Arc<Registry> {
        self.lifecycle.registry()
    }

    /// The lifecycle its adapters come through.
    pub fn lifecycle(&self) -> &Arc<Lifecycle> {
        &self.lifecycle
    }

    /// What it has done so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// A call with `deadline`, holding admission `slot`, counted by this engine.
    pub fn call(
        &self,
        deadline: Option<Instant>,
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Arc<Call> {
        Call::new(deadline, slot, self.stats.clone())
    }

    fn batcher(&self, backbone: &Arc<Backbone>) -> Arc<Batcher> {
        let mut batchers = self.batchers.lock().unwrap_or_else(|p| p.into_inner());
        batchers
            .entry(backbone.identity().sha256)
            .or_insert_with(|| {
                Arc::new(Batcher::start(
                    backbone.clone(),
                    self.settings.batch,
                    self.cache.clone(),
                    self.stats.clone(),
                ))
            })
            .clone()
    }

    /// The DICOM pixel policy a task runs with: the request's when given and allowed.
    fn pixel_policy(
        adapter: &Adapter,
        requested: Option<&DicomPolicy>,
    ) -> Result<DicomPolicy, ClassifyError> {
        let own = &adapter.manifest().preprocessing.dicom;
        match requested {
            None => Ok(own.policy),
            Some(_) if !own.allow_request_override => Err(ClassifyError::PixelPolicy(format!(
                "task {}@{} does not allow overriding its DICOM pixel policy",
                adapter.task(),
                adapter.version()
            ))),
            Some(p) => Ok(*p),
        }
    }

    /// The smallest frame a call's tasks can use: their largest input size when every one
    /// opted into reduced-resolution decoding, otherwise none (full resolution), so that
    /// one decode serves every task at the finest resolution any of them needs.
    fn min_decode_size(adapters: &[Arc<Adapter>]) -> Option<MinSize> {
        let mut min = MinSize {
            width: 0,
            height: 0,
        };
        for adapter in adapters {
            let pre = &adapter.manifest().preprocessing;
            if pre.dicom.decode_resolution != DecodeResolution::Reduced {
                return None;
            }
            let [bh, bw] = adapter.backbone().input_size();
            let [sh, sw] = pre.side_size;
            min.width = min.width.max(bw as u32).max(sw);
            min.height = min.height.max(bh as u32).max(sh);
        }
        Some(min)
    }

    /// Resolves a task reference, reloading an adapter evicted under the budget.
    fn resolve(&self, snapshot: &Snapshot, task: &str) -> Result<Arc<Adapter>, ClassifyError> {
        match snapshot.resolve(task) {
            Err(e @ (ResolveError::UnknownTask(_) | ResolveError::UnknownVersion { .. })) => {
                match self.lifecycle.reload_evicted(task) {
                    Some(Ok(adapter)) => Ok(adapter),
                    Some(Err(source)) => Err(ClassifyError::Reload {
                        task: task.to_string(),
                        source,
                    }),
                    None => Err(e.into()),
                }
            }
            other => other.map_err(ClassifyError::from),
        }
    }

    /// Classifies one image for the requested tasks, as part of `call`.
    pub async fn classify(
        self: &Arc<Self>,
        request: Request,
        call: Arc<Call>,
    ) -> Result<Outcome, ClassifyError> {
        let start = Instant::now();
        if request.tasks.is_empty() {
            return Err(ClassifyError::NoTasks);
        }
        if request.tasks.len() > MAX_TASKS_PER_REQUEST {
            return Err(ClassifyError::TooManyTasks(request.tasks.len()));
        }
        call.check()?;
        let slot = self
            .decode_slots
            .clone()
            .acquire_owned()
            .await
            .expect("the decode semaphore is never closed");
        // a call that waited past its deadline for a decode slot is not decoded
        call.check()?;
        let engine = self.clone();
        // log lines of the decoder (ours and dicom-rs's) carry the call's request id
        let span = tracing::Span::current();
        let prepared = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            span.in_scope(|| engine.prepare(request))
        })
        .await
        .map_err(|e| ModelError::Inference {
            model: "decoder".into(),
            message: format!("decoding task failed: {e}"),
        })??;
        let result = self.run_models(prepared, &call, start).await;
        if result.is_err() {
            // whatever of it is still queued is for nobody
            call.cancel();
        }
        result
    }

    /// Decodes, renders and preprocesses; looks the backbone inputs up in the cache.
    /// Blocking.
    fn prepare(&self, request: Request) -> Result<Prepared, ClassifyError> {
        // Resolve before decoding: an unknown task fails without touching the pixels.
        let snapshot = self.registry().snapshot();
        let adapters: Vec<Arc<Adapter>> = request
            .tasks
            .iter()
            .map(|t| self.resolve(&snapshot, t))
            .collect::<Result<_, _>>()?;
        if let Some(explain) = &request.explain {
            for t in &explain.tasks {
                if !request
                    .tasks
                    .iter()
                    .zip(&adapters)
                    .any(|(r, a)| names(t, r, a))
                {
                    return Err(ClassifyError::Explain(format!(
                        "explain.tasks names {t:?}, which is not one of the call's tasks"
                    )));
                }
            }
        }
        let policies: Vec<DicomPolicy> = adapters
            .iter()
            .map(|a| Self::pixel_policy(a, request.pixel_policy.as_ref()))
            .collect::<Result<_, _>>()?;

        let mut timings = Timings::default();
        let t = Instant::now();
        let decoding = tracing::info_span!("decode").entered();
        let decoded = match &request.payload {
            Payload::Dicom(bytes) => decode::dicom::decode(
                bytes,
                request.frame,
                &self.limits,
                Self::min_decode_size(&adapters),
            )?,
            Payload::Image(bytes) => decode::image::decode(bytes, request.frame, &self.limits)?,
        };
        timings.decode_ms = ms(t);
        metrics::stage("decode", timings.decode_ms);
        drop(decoding);

        let t = Instant::now();
        let preprocessing = tracing::info_span!("preprocess").entered();
        let mut rendered: Vec<(DicomPolicy, Cow<'_, RgbImage>)> = Vec::new();
        let mut passes: Vec<Pass> = Vec::new();
        let mut side_inputs: Vec<(SideKey, Arc<Vec<f32>>)> = Vec::new();
        let mut tasks = Vec::with_capacity(adapters.len());
        let mut explain = Vec::with_capacity(adapters.len());
        let mut pictures: Vec<(usize, Arc<RgbImage>)> = Vec::new();
        for ((adapter, policy), reference) in
            adapters.into_iter().zip(&policies).zip(&request.tasks)
        {
            let pre = &adapter.manifest().preprocessing;
            let norm = adapter.normalization();
            let image_index = match rendered.iter().position(|(p, _)| p == policy) {
                Some(i) => i,
                None => {
                    rendered.push((*policy, decoded.render(policy)));
                    rendered.len() - 1
                }
            };
            let image = &rendered[image_index].1;

            let key = BackboneKey {
                backbone: adapter.backbone().identity().sha256,
                mean: bits(norm.mean),
                std: bits(norm.std),
                policy: *policy,
            };
            let pass = match passes.iter().position(|p| p.key == key) {
                Some(i) => i,
                None => {
                    let [h, w] = adapter.backbone().input_size();
                    let pixels = preprocess::to_tensor(image, [h as u32, w as u32], &norm);
                    let cache_key = cache::key(&key.backbone, &pixels);
                    let cached = self.cache.get(&cache_key);
                    if self.cache.enabled() {
                        self.stats.cache(cached.is_some());
                    }
                    passes.push(Pass {
                        key,
                        backbone: adapter.backbone().clone(),
                        pixels,
                        cache_key,
                        cached,
                        sides: Vec::new(),
                    });
                    passes.len() - 1
                }
            };

            let side_key = SideKey {
                size: pre.side_size,
                mean: bits(norm.mean),
                std: bits(norm.std),
                policy: *policy,
            };
            let side_pixels = match side_inputs.iter().find(|(k, _)| *k == side_key) {
                Some((_, pixels)) => pixels.clone(),
                None => {
                    let pixels = Arc::new(preprocess::to_tensor(image, pre.side_size, &norm));
                    side_inputs.push((side_key, pixels.clone()));
                    pixels
                }
            };
            let wanted = request
                .explain
                .as_ref()
                .filter(|e| e.wants(reference, &adapter));
            let task_explain = wanted.map(|e| match adapter.explains() {
                Err(reason) => TaskExplain::Unavailable(reason.to_string()),
                Ok(_) if !e.overlay => TaskExplain::Ready(None),
                Ok(_) => {
                    let picture = match pictures.iter().find(|(i, _)| *i == image_index) {
                        Some((_, p)) => p.clone(),
                        None => {
                            let p = Arc::new(image.as_ref().clone());
                            pictures.push((image_index, p.clone()));
                            p
                        }
                    };
                    TaskExplain::Ready(Some(picture))
                }
            });
            let sides = &mut passes[pass].sides;
            sides.push(SideWork {
                adapter: adapter.clone(),
                pixels: side_pixels,
                explain: matches!(task_explain, Some(TaskExplain::Ready(_))),
            });
            tasks.push((adapter, pass, sides.len() - 1));
            explain.push(task_explain);
        }
        drop(pictures);
        drop(rendered);
        drop(preprocessing);
        timings.preprocess_ms = ms(t);
        metrics::stage("preprocess", timings.preprocess_ms);
        Ok(Prepared {
            passes,
            tasks,
            explain,
            explain_request: request.explain,
            input: decoded.info,
            dicom: decoded.dicom,
            timings,
        })
    }

    /// Gets every pass's features and logits: cached passes run their side networks here,
    /// the others go to their backbone's batcher.
    async fn run_models(
        &self,
        prepared: Prepared,
        call: &Arc<Call>,
        start: Instant,
    ) -> Result<Outcome, ClassifyError> {
        let Prepared {
            mut passes,
            tasks,
            explain,
            explain_request,
            input,
            dicom,
            mut timings,
        } = prepared;
        let mut queued: Vec<(usize, oneshot::Receiver<Result<JobOutput, JobError>>)> = Vec::new();
        for (i, pass) in passes.iter_mut().enumerate() {
            if pass.cached.is_some() {
                continue;
            }
            let (reply, answer) = oneshot::channel();
            self.batcher(&pass.backbone)
                .submit(Job {
                    call: call.clone(),
                    key: pass.cache_key,
                    pixels: std::mem::take(&mut pass.pixels),
                    sides: pass.sides.clone(),
                    queued_at: Instant::now(),
                    reply,
                })
                .map_err(|full| ClassifyError::QueueFull {
                    capacity: full.capacity,
                })?;
            queued.push((i, answer));
        }

        let mut outputs: Vec<Option<PassOutput>> = (0..passes.len()).map(|_| None).collect();
        // passes served from the cache: their side networks, grouped per adapter
        let cached: Vec<(usize, Vec<SideWork>, Arc<Features>)> = passes
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.cached.clone().map(|f| (i, p.sides.clone(), f)))
            .collect();
        let hits = cached.len() as u32;
        if !cached.is_empty() {
            let t = Instant::now();
            let results = tokio::task::spawn_blocking(move || {
                let work: Vec<(&SideWork, &Arc<Features>)> = cached
                    .iter()
                    .flat_map(|(_, sides, f)| sides.iter().map(move |s| (s, f)))
                    .collect();
                let mut outputs = batcher::run_sides(&work).into_iter();
                cached
                    .iter()
                    .map(|(i, sides, _)| (*i, outputs.by_ref().take(sides.len()).collect()))
                    .collect::<Vec<(usize, Vec<_>)>>()
            })
            .await
            .map_err(|e| ModelError::Inference {
                model: "adapters".into(),
                message: format!("side network task failed: {e}"),
            })?;
            timings.adapters_ms += ms(t);
            for (i, sides) in results {
                outputs[i] = Some(PassOutput {
                    sides,
                    batch_size: 0,
                });
            }
        }
        for (i, answer) in queued {
            let output = answer
                .await
                .map_err(|_| ModelError::Inference {
                    model: passes[i].backbone.identity().name,
                    message: "the backbone batch failed unexpectedly (see the log)".into(),
                })?
                .map_err(|e| match e {
                    JobError::Abandoned(reason) => ClassifyError::Abandoned(reason),
                    JobError::Model(e) => ClassifyError::Model(e),
                })?;
            timings.queue_ms = timings.queue_ms.max(output.queue_ms);
            timings.backbone_ms += output.backbone_ms;
            timings.adapters_ms += output.adapters_ms;
            outputs[i] = Some(PassOutput {
                sides: output.sides,
                batch_size: output.batch_size,
            });
        }

        let mut outputs: Vec<PassOutput> = outputs
            .into_iter()
            .map(|o| o.expect("every pass answered"))
            .collect();
        let mut results = Vec::with_capacity(tasks.len());
        let class_name = explain_request
            .as_ref()
            .and_then(|e| e.class_name.as_deref());
        for ((adapter, pass, side), explain) in tasks.iter().zip(explain) {
            let output =
                std::mem::replace(&mut outputs[*pass].sides[*side], Ok(SideOutput::default()))?;
            adapter.record_use();
            let mut outcome = task_outcome(
                adapter,
                output.logits,
                *pass as u32,
                outputs[*pass].batch_size as u32,
            );
            if let Some(explain) = explain {
                let t = Instant::now();
                explain_task(&mut outcome, adapter, output.relevance, explain, class_name);
                timings.explain_ms += ms(t);
            }
            results.push(outcome);
        }
        timings.total_ms = ms(start);
        metrics::stage("total", timings.total_ms);
        Ok(Outcome {
            backbone_runs: passes.len() as u32 - hits,
            backbone_cache_hits: hits,
            backbone_features_reused: tasks.len() > passes.len(),
            results,
            input,
            dicom,
            timings,
        })
    }
}

/// One task's answer from its logits.
fn task_outcome(adapter: &Adapter, logits: Vec<f32>, run: u32, batch_size: u32) -> TaskOutcome {
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
    TaskOutcome {
        task: adapter.task().to_string(),
        adapter_version: adapter.version().to_string(),
        backbone: adapter.backbone().identity().name,
        scores,
        label,
        backbone_run: run,
        backbone_batch_size: batch_size,
        explanation: None,
        picture: None,
    }
}

/// Puts a task's saliency map (and the picture for its overlay) on its outcome, or the reason
/// it has none. Cheap (a scatter onto the patch grid): it runs on the executor.
fn explain_task(
    outcome: &mut TaskOutcome,
    adapter: &Adapter,
    relevance: Option<Relevance>,
    explain: TaskExplain,
    class_name: Option<&str>,
) {
    let picture = match explain {
        TaskExplain::Unavailable(reason) => {
            outcome.explanation = Some(Explanation::Unavailable(reason));
            return;
        }
        TaskExplain::Ready(picture) => picture,
    };
    let probabilities: Vec<f32> = outcome.scores.iter().map(|s| s.probability).collect();
    let made = (|| {
        let shape = adapter.explains()?;
        let relevance = relevance.ok_or("the side network gave no relevance for this image")?;
        let class = explain::class_to_explain(adapter.classes(), &probabilities, class_name)
            .map_err(|e| e.to_string())?;
        let [h, w] = adapter.backbone().input_size();
        let patch = adapter.backbone().manifest().architecture.patch_size as usize;
        let grid = [h / patch.max(1), w / patch.max(1)];
        Ok::<_, String>(SaliencyMap {
            rows: grid[0],
            columns: grid[1],
            values: explain::saliency_map(&relevance, shape, class, grid),
            class_index: class,
            class_name: adapter.classes()[class].clone(),
        })
    })();
    match made {
        Ok(map) => {
            outcome.picture = picture;
            outcome.explanation = Some(Explanation::Map(map));
        }
        Err(reason) => outcome.explanation = Some(Explanation::Unavailable(reason)),
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
