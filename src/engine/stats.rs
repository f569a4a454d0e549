//! The engine's own counters: what the request path did (backbone batches and images,
//! dropped work, cache use). Read by tests through [`Stats::snapshot`] and exported to
//! Prometheus by `crate::metrics`.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use serde::Serialize;

/// Counters, updated with relaxed atomics (each is independent).
#[derive(Default)]
pub struct Stats {
    backbone_batches: AtomicU64,
    backbone_images: AtomicU64,
    dropped_deadline: AtomicU64,
    dropped_cancelled: AtomicU64,
    rejected_queue_full: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    bound_batches: AtomicU64,
    bound_float16_batches: AtomicU64,
    kv_host_copies: AtomicU64,
    in_flight: AtomicI64,
    queued: AtomicI64,
}

/// The counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// Backbone runs (each a batch of one or more images).
    pub backbone_batches: u64,
    /// Images the backbone ran on.
    pub backbone_images: u64,
    /// Backbone jobs dropped unrun because their call's deadline had passed.
    pub dropped_deadline: u64,
    /// Backbone jobs dropped unrun because their call was cancelled.
    pub dropped_cancelled: u64,
    /// Backbone jobs refused because the queue was full.
    pub rejected_queue_full: u64,
    /// Backbone passes answered from the feature cache.
    pub cache_hits: u64,
    /// Backbone passes the feature cache did not hold (cache enabled only).
    pub cache_misses: u64,
    /// Backbone batches on the bound path (K/V left where the backbone computed them).
    pub bound_batches: u64,
    /// Those whose K/V were float16, as the side networks read them.
    pub bound_float16_batches: u64,
    /// Images whose K/V fptserve copied out of ONNX Runtime into host buffers: every image
    /// on the host path, only those the feature cache keeps on the bound path.
    pub kv_host_copies: u64,
    /// Calls in flight (admitted, not yet finished).
    pub in_flight: i64,
    /// Backbone jobs waiting in queues.
    pub queued: i64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Stats {
    /// The values now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            backbone_batches: get(&self.backbone_batches),
            backbone_images: get(&self.backbone_images),
            dropped_deadline: get(&self.dropped_deadline),
            dropped_cancelled: get(&self.dropped_cancelled),
            rejected_queue_full: get(&self.rejected_queue_full),
            cache_hits: get(&self.cache_hits),
            cache_misses: get(&self.cache_misses),
            bound_batches: get(&self.bound_batches),
            bound_float16_batches: get(&self.bound_float16_batches),
            kv_host_copies: get(&self.kv_host_copies),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn backbone_batch(&self, images: usize) {
        add(&self.backbone_batches, 1);
        add(&self.backbone_images, images as u64);
        crate::metrics::backbone_batch(images);
    }

    pub(crate) fn bound_batch(&self, float16: bool) {
        add(&self.bound_batches, 1);
        if float16 {
            add(&self.bound_float16_batches, 1);
        }
        crate::metrics::bound_batch(float16);
    }

    pub(crate) fn kv_host_copies(&self, images: usize) {
        add(&self.kv_host_copies, images as u64);
        crate::metrics::kv_host_copies(images);
    }

    pub(crate) fn dropped(&self, reason: super::Abandoned) {
        match reason {
            super::Abandoned::Deadline => add(&self.dropped_deadline, 1),
            super::Abandoned::Cancelled => add(&self.dropped_cancelled, 1),
        }
        crate::metrics::work_dropped(reason.label());
    }

    pub(crate) fn queue_full(&self) {
        add(&self.rejected_queue_full, 1);
    }

    pub(crate) fn cache(&self, hit: bool) {
        add(
            if hit {
                &self.cache_hits
            } else {
                &self.cache_misses
            },
            1,
        );
        crate::metrics::feature_cache(hit);
    }

    pub(crate) fn call_started(&self) {
        let n = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        crate::metrics::in_flight(n);
    }

    pub(crate) fn call_finished(&self) {
        let n = self.in_flight.fetch_sub(1, Ordering::Relaxed) - 1;
        crate::metrics::in_flight(n);
    }

    pub(crate) fn queued(&self, delta: i64) {
        let n = self.queued.fetch_add(delta, Ordering::Relaxed) + delta;
        crate::metrics::queue_depth(n);
    }
}
