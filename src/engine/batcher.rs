//! Dynamic batching of backbone runs: one queue and one worker thread per backbone.
//!
//! Calls put one job per image (and preprocessing key) in the backbone's queue. The worker
//! takes the oldest job, then whatever else arrives until the batch is full or the oldest
//! job has waited the maximum delay, drops jobs whose call was cancelled or whose deadline
//! passed, runs the backbone once on the rest (identical inputs once), and then each
//! adapter version once on all the batch's images that asked for it. Jobs for different
//! tasks share batches: the backbone does not depend on the task.
//!
//! The queue is bounded: a full queue refuses the job at once (RESOURCE_EXHAUSTED), so
//! memory never grows with load.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::cache::{CacheKey, FeatureCache};
use super::call::{Abandoned, Call};
use super::stats::Stats;
use crate::metrics;
use crate::model::ModelError;
use crate::model::adapter::{Adapter, SideOutput};
use crate::model::backbone::{Backbone, BoundFeatures, Features};

/// How batches are formed.
#[derive(Clone, Copy, Debug)]
pub struct BatchSettings {
    /// Most images in one backbone run (1 = no batching).
    pub max_batch: usize,
    /// Longest the oldest job in a forming batch waits for more.
    pub max_delay: Duration,
    /// Most jobs waiting per backbone; more are refused.
    pub max_queue: usize,
    /// The bound path: the backbone's K/V stay where it computed them (device memory under
    /// CUDA) and side networks read them there, each on the whole batch
    /// ([`Adapter::run_bound`]); off, they come to the host per image and each adapter runs
    /// on the images that asked for it.
    pub io_binding: bool,
}

impl BatchSettings {
    /// Defaults for the device. On a CPU a backbone run is compute-bound and batching does
    /// not pay: ViT-B/16 at 512 on 2 cores served 0.54-0.55 requests/s at 16 concurrent
    /// calls without batching, 0.49 with batches of up to 2 and 0.48 with up to 8, at far
    /// higher latency (BENCHMARKS.md case 5), so the CPU default is one image per run; the
    /// queue still coalesces identical inputs through the feature cache. On a GPU, where a
    /// batch fills the device, up to 32 images with a 2 ms wait.
    pub fn for_device(gpu: bool) -> Self {
        if gpu {
            BatchSettings {
                max_batch: 32,
                max_delay: Duration::from_millis(2),
                max_queue: 256,
                io_binding: true,
            }
        } else {
            BatchSettings {
                max_batch: 1,
                max_delay: Duration::ZERO,
                max_queue: 64,
                io_binding: false,
            }
        }
    }
}

/// A side network waiting on a job's features.
#[derive(Clone)]
pub struct SideWork {
    /// The adapter version.
    pub adapter: Arc<Adapter>,
    /// Its `[1, 3, h, w]` side input.
    pub pixels: Arc<Vec<f32>>,
    /// Whether the call asks for its relevance (a saliency map).
    pub explain: bool,
}

/// One image's backbone work.
pub struct Job {
    /// The call it belongs to (its deadline, cancellation and admission slot).
    pub call: Arc<Call>,
    /// Its feature-cache key.
    pub key: CacheKey,
    /// The `[1, 3, h, w]` backbone input.
    pub pixels: Vec<f32>,
    /// Side networks to run on its features, in the call's order.
    pub sides: Vec<SideWork>,
    /// When it was queued.
    pub queued_at: Instant,
    /// Where the result goes.
    pub reply: oneshot::Sender<Result<JobOutput, JobError>>,
}

/// What a job produced.
pub struct JobOutput {
    /// Output per side network, in the job's order.
    pub sides: Vec<Result<SideOutput, ModelError>>,
    /// Images in the backbone run that made the features (0: from the cache).
    pub batch_size: usize,
    /// Time in the queue.
    pub queue_ms: f64,
    /// The backbone run (shared with the batch).
    pub backbone_ms: f64,
    /// The side networks' runs (shared with the batch's images on the same adapters).
    pub adapters_ms: f64,
}

/// Why a job produced nothing.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Dropped unrun.
    #[error(transparent)]
    Abandoned(#[from] Abandoned),
    /// The backbone run failed.
    #[error(transparent)]
    Model(ModelError),
}

/// The queue was full.
#[derive(Debug)]
pub struct QueueFull {
    /// Its bound.
    pub capacity: usize,
}

/// The queue and worker of one backbone.
pub struct Batcher {
    sender: SyncSender<Job>,
    stats: Arc<Stats>,
    capacity: usize,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Batcher {
    /// Starts the worker thread for `backbone`; it ends when the batcher is dropped.
    pub fn start(
        backbone: Arc<Backbone>,
        settings: BatchSettings,
        cache: Arc<FeatureCache>,
        stats: Arc<Stats>,
    ) -> Self {
        let (sender, receiver) = std::sync::mpsc::sync_channel(settings.max_queue.max(1));
        let worker = Worker {
            backbone,
            settings,
            cache,
            stats: stats.clone(),
        };
        std::thread::Builder::new()
            .name("fptserve-batcher".into())
            .spawn(move || worker.run(receiver))
            .expect("spawning the batcher thread");
        Batcher {
            sender,
            stats,
            capacity: settings.max_queue.max(1),
        }
    }

    /// Queues `job`, or refuses it at once when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), QueueFull> {
        self.stats.queued(1);
        match self.sender.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.queued(-1);
                self.stats.queue_full();
                Err(QueueFull {
                    capacity: self.capacity,
                })
            }
        }
    }
}

struct Worker {
    backbone: Arc<Backbone>,
    settings: BatchSettings,
    cache: Arc<FeatureCache>,
    stats: Arc<Stats>,
}

impl Worker {
    fn run(self, queue: Receiver<Job>) {
        // a job counts as queued until its batch closes
        while let Ok(first) = queue.recv() {
            let close = first.queued_at + self.settings.max_delay;
            let mut batch = vec![first];
            while batch.len() < self.settings.max_batch {
                let wait = close.saturating_duration_since(Instant::now());
                let next = if wait.is_zero() {
                    queue.try_recv().map_err(|_| RecvTimeoutError::Timeout)
                } else {
                    queue.recv_timeout(wait)
                };
                match next {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.stats.queued(-(batch.len() as i64));
            // A panic in a run must not stop the worker: every later call on this backbone
            // would be refused. The batch's calls get INTERNAL (their reply senders drop).
            let batch_size = batch.len();
            let run =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_batch(batch)));
            if run.is_err() {
                tracing::error!(
                    backbone = %self.backbone.identity().name,
                    batch_size,
                    "a backbone batch panicked; its calls failed, the worker goes on"
                );
            }
        }
    }

    fn run_batch(&self, batch: Vec<Job>) {
        let started = Instant::now();
        // drop work nobody waits for, and answer what another batch just computed
        let mut live = Vec::with_capacity(batch.len());
        let mut ready: Vec<(Job, Arc<Features>)> = Vec::new();
        for job in batch {
            if let Err(reason) = job.call.check() {
                self.stats.dropped(reason);
                let _ = job.reply.send(Err(reason.into()));
            } else if let Some(features) = self.cache.get(&job.key) {
                self.stats.cache(true);
                ready.push((job, features));
            } else {
                live.push(job);
            }
        }

        // identical inputs (same key) run once
        let mut rows: Vec<usize> = Vec::with_capacity(live.len());
        let mut keys: Vec<CacheKey> = Vec::new();
        for job in &live {
            let row = keys.iter().position(|k| *k == job.key).unwrap_or_else(|| {
                keys.push(job.key);
                keys.len() - 1
            });
            rows.push(row);
        }
        let mut backbone_ms = 0.0;
        let mut computed = None;
        if !live.is_empty() {
            let per_image = live[0].pixels.len();
            let mut pixels = Vec::with_capacity(per_image * keys.len());
            for (i, job) in live.iter().enumerate() {
                if !rows[..i].contains(&rows[i]) {
                    pixels.extend_from_slice(&job.pixels);
                }
            }
            let t = Instant::now();
            let result = self.run_backbone(pixels, keys.len());
            backbone_ms = ms(t.elapsed());
            metrics::stage("backbone", backbone_ms);
            match result {
                Ok(features) => {
                    self.stats.backbone_batch(keys.len());
                    self.remember(&keys, &features);
                    computed = Some(features);
                }
                Err(e) => {
                    let message = e.to_string();
                    for job in live.drain(..) {
                        let _ = job.reply.send(Err(JobError::Model(ModelError::Inference {
                            model: self.backbone.identity().name,
                            message: message.clone(),
                        })));
                    }
                }
            }
        }

        // Side networks: cached images' (and, on the host path, the new ones') grouped per
        // adapter over host K/V; on the bound path the new ones' over the bound batch.
        let t = Instant::now();
        let mut host_work: Vec<(&SideWork, &Arc<Features>)> = ready
            .iter()
            .flat_map(|(job, f)| job.sides.iter().map(move |s| (s, f)))
            .collect();
        let mut bound_outputs = Vec::new();
        match &computed {
            Some(Computed::Host(features)) => host_work.extend(
                live.iter()
                    .zip(&rows)
                    .flat_map(|(job, &row)| job.sides.iter().map(move |s| (s, &features[row]))),
            ),
            Some(Computed::Bound(kv)) => {
                let work: Vec<(&SideWork, usize)> = live
                    .iter()
                    .zip(&rows)
                    .flat_map(|(job, &row)| job.sides.iter().map(move |s| (s, row)))
                    .collect();
                bound_outputs = run_sides_bound(&work, kv);
            }
            None => {}
        }
        let mut host_outputs = run_sides(&host_work).into_iter();
        let mut bound_outputs = bound_outputs.into_iter();
        drop(host_work);
        let adapters_ms = ms(t.elapsed());
        let batch_size = keys.len();
        let jobs = ready
            .into_iter()
            .map(|(job, _)| (job, 0))
            .chain(live.into_iter().map(|job| (job, batch_size)));
        for (job, batch_size) in jobs {
            let queue_ms = ms(started.saturating_duration_since(job.queued_at));
            metrics::stage("queue", queue_ms);
            let mine: Vec<_> = match (&computed, batch_size) {
                (Some(Computed::Bound(_)), 1..) => {
                    bound_outputs.by_ref().take(job.sides.len()).collect()
                }
                _ => host_outputs.by_ref().take(job.sides.len()).collect(),
            };
            let _ = job.reply.send(Ok(JobOutput {
                sides: mine,
                batch_size,
                queue_ms,
                backbone_ms: if batch_size > 0 { backbone_ms } else { 0.0 },
                adapters_ms,
            }));
        }
    }

    /// One backbone run, on the path the settings choose.
    fn run_backbone(&self, pixels: Vec<f32>, images: usize) -> Result<Computed, ModelError> {
        if self.settings.io_binding {
            let kv = self.backbone.run_bound(pixels, images)?;
            self.stats.bound_batch(kv.float16());
            Ok(Computed::Bound(kv))
        } else {
            let features = self.backbone.run_batch(pixels, images)?;
            // the host path takes every image's K/V out of ONNX Runtime's output
            self.stats.kv_host_copies(images);
            Ok(Computed::Host(features.into_iter().map(Arc::new).collect()))
        }
    }

    /// Puts a batch's features in the feature cache, when it is on: bound K/V are copied to
    /// the host for it (the cache holds one image's K/V per entry; the batch is one tensor).
    fn remember(&self, keys: &[CacheKey], computed: &Computed) {
        if !self.cache.enabled() {
            return;
        }
        let features = match computed {
            Computed::Host(features) => features.clone(),
            Computed::Bound(kv) => match kv.to_host() {
                Ok(features) => {
                    self.stats.kv_host_copies(keys.len());
                    features.into_iter().map(Arc::new).collect()
                }
                Err(e) => {
                    tracing::warn!(error = %e, "K/V not cached: copying them to the host failed");
                    return;
                }
            },
        };
        for (key, f) in keys.iter().zip(features) {
            self.cache.insert(*key, f);
        }
    }
}

/// A backbone batch's features: per image on the host, or the whole batch bound.
enum Computed {
    Host(Vec<Arc<Features>>),
    Bound(BoundFeatures),
}

/// Runs side networks, each adapter version once on all the images that asked for it;
/// returns their outputs in `work`'s order.
pub fn run_sides(work: &[(&SideWork, &Arc<Features>)]) -> Vec<Result<SideOutput, ModelError>> {
    per_adapter(
        work.len(),
        |i| &work[i].0.adapter,
        |adapter, group| {
            let inputs: Vec<(&[f32], &Features)> = group
                .iter()
                .map(|&j| (work[j].0.pixels.as_slice(), work[j].1.as_ref()))
                .collect();
            let explain: Vec<bool> = group.iter().map(|&j| work[j].0.explain).collect();
            adapter.run_batch(&inputs, &explain)
        },
    )
}

/// [`run_sides`] on a bound backbone batch: each adapter version once on the whole batch
/// (`work` pairs a side view with its image's row), keeping the rows that asked for it.
pub fn run_sides_bound(
    work: &[(&SideWork, usize)],
    kv: &BoundFeatures,
) -> Vec<Result<SideOutput, ModelError>> {
    per_adapter(
        work.len(),
        |i| &work[i].0.adapter,
        |adapter, group| {
            let per_image = work[group[0]].0.pixels.len();
            let mut pixels = vec![0.0f32; per_image * kv.images()];
            let mut explain = vec![false; kv.images()];
            for &j in group {
                let (side, row) = work[j];
                pixels[row * per_image..(row + 1) * per_image].copy_from_slice(&side.pixels);
                explain[row] |= side.explain;
            }
            let rows = adapter.run_bound(pixels, kv, &explain)?;
            Ok(group.iter().map(|&j| rows[work[j].1].clone()).collect())
        },
    )
}

/// Groups `n` side-network items by adapter version, runs each group once (`run` returns
/// one output per member, in order) and puts the results back in item order; a failed run
/// fails its group's items, naming the adapter.
fn per_adapter<'a>(
    n: usize,
    adapter_of: impl Fn(usize) -> &'a Arc<Adapter>,
    mut run: impl FnMut(&Arc<Adapter>, &[usize]) -> Result<Vec<SideOutput>, ModelError>,
) -> Vec<Result<SideOutput, ModelError>> {
    let mut results: Vec<Option<Result<SideOutput, ModelError>>> = (0..n).map(|_| None).collect();
    let mut done = vec![false; n];
    for i in 0..n {
        if done[i] {
            continue;
        }
        let adapter = adapter_of(i);
        let group: Vec<usize> = (i..n)
            .filter(|&j| !done[j] && Arc::ptr_eq(adapter_of(j), adapter))
            .collect();
        let t = Instant::now();
        let outcome = run(adapter, &group);
        metrics::stage("adapter", ms(t.elapsed()));
        match outcome {
            Ok(logits) => {
                for (&j, l) in group.iter().zip(logits) {
                    results[j] = Some(Ok(l));
                }
            }
            Err(e) => {
                let message = e.to_string();
                for &j in &group {
                    results[j] = Some(Err(ModelError::Inference {
                        model: format!("{}@{}", adapter.task(), adapter.version()),
                        message: message.clone(),
                    }));
                }
            }
        }
        for &j in &group {
            done[j] = true;
        }
    }
    results
        .into_iter()
        .map(|r| r.expect("every side run has a result"))
        .collect()
}
