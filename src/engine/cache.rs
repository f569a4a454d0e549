//! The backbone feature cache: K/V of recent images, so that a gateway sending one image
//! for several tasks in separate calls (or retrying) pays for one backbone run.
//!
//! The key is a SHA-256 over the backbone's digest and the exact tensor the backbone
//! would be given: the decoded pixels after the preprocessing key's rendering (DICOM
//! pixel policy), resize and normalisation. Two calls share features only when the
//! backbone would see identical input, so a hit can never change an answer; a digest of
//! the raw stored pixels alone would not be enough (the same pixels with another window
//! in the DICOM header render differently). Entries are evicted least recently used
//! first within a byte budget; a budget of 0 turns the cache off.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::model::backbone::Features;

/// Identifies one backbone input.
pub type CacheKey = [u8; 32];

/// The key for `pixels` (a backbone input tensor) under the backbone with `backbone_sha256`.
pub fn key(backbone_sha256: &str, pixels: &[f32]) -> CacheKey {
    let mut hash = Sha256::new();
    hash.update(backbone_sha256.as_bytes());
    hash.update((pixels.len() as u64).to_le_bytes());
    // SAFETY: f32 has no padding and every byte of it is initialised; u8 has alignment 1.
    let bytes = unsafe {
        std::slice::from_raw_parts(pixels.as_ptr().cast::<u8>(), std::mem::size_of_val(pixels))
    };
    hash.update(bytes);
    hash.finalize().into()
}

/// K/V by key within a byte budget.
pub struct FeatureCache {
    budget: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    entries: HashMap<CacheKey, Entry>,
    /// Last use -> key, oldest first.
    order: BTreeMap<u64, CacheKey>,
    clock: u64,
    bytes: usize,
}

struct Entry {
    features: Arc<Features>,
    used: u64,
}

impl FeatureCache {
    /// A cache holding at most `budget` bytes of K/V (0 = off).
    pub fn new(budget: usize) -> Self {
        FeatureCache {
            budget,
            state: Mutex::new(State::default()),
        }
    }

    /// Whether it stores anything.
    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The features stored under `key`, marking them used.
    pub fn get(&self, key: &CacheKey) -> Option<Arc<Features>> {
        if !self.enabled() {
            return None;
        }
        let mut state = self.state();
        state.clock += 1;
        let now = state.clock;
        let entry = state.entries.get_mut(key)?;
        let before = std::mem::replace(&mut entry.used, now);
        let features = entry.features.clone();
        state.order.remove(&before);
        state.order.insert(now, *key);
        Some(features)
    }

    /// Stores `features` under `key`, evicting the least recently used entries to stay
    /// within the budget. Features larger than the whole budget are not stored.
    pub fn insert(&self, key: CacheKey, features: Arc<Features>) {
        let size = features.bytes();
        if size > self.budget {
            return;
        }
        let mut state = self.state();
        if state.entries.contains_key(&key) {
            return;
        }
        while state.bytes + size > self.budget {
            let Some((_, oldest)) = state.order.pop_first() else {
                break;
            };
            if let Some(gone) = state.entries.remove(&oldest) {
                state.bytes -= gone.features.bytes();
            }
        }
        state.clock += 1;
        let used = state.clock;
        state.order.insert(used, key);
        state.entries.insert(key, Entry { features, used });
        state.bytes += size;
        crate::metrics::feature_cache_size(state.bytes, state.entries.len());
    }

    /// Bytes of K/V held and entries.
    pub fn usage(&self) -> (usize, usize) {
        let state = self.state();
        (state.bytes, state.entries.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::backbone::KvData;

    fn features(values: usize, fill: f32) -> Arc<Features> {
        Arc::new(Features {
            shape: [1, 1, 1, values, 1],
            key: KvData::F32(vec![fill; values]),
            value: KvData::F32(vec![fill; values]),
            indices: None,
        })
    }

    #[test]
    fn keys_differ_by_backbone_and_by_any_pixel() {
        let pixels = vec![0.5f32; 12];
        let mut other = pixels.clone();
        other[7] = 0.5000001;
        assert_eq!(key("a", &pixels), key("a", &pixels));
        assert_ne!(key("a", &pixels), key("b", &pixels));
        assert_ne!(key("a", &pixels), key("a", &other));
    }

    #[test]
    fn evicts_least_recently_used_within_the_budget() {
        // each entry: 2 x 10 f32 = 80 bytes; budget for 3
        let cache = FeatureCache::new(240);
        let k = |n: u8| [n; 32];
        for n in 0..3 {
            cache.insert(k(n), features(10, f32::from(n)));
        }
        assert!(cache.get(&k(0)).is_some()); // 1 is now the oldest
        cache.insert(k(3), features(10, 3.0));
        assert_eq!(cache.usage(), (240, 3));
        assert!(cache.get(&k(1)).is_none());
        for n in [0, 2, 3] {
            let f = cache.get(&k(n)).expect("kept");
            assert!(matches!(&f.key, KvData::F32(v) if v[0] == f32::from(n)));
        }
        // too large for the whole budget: not stored, nothing evicted
        cache.insert(k(9), features(100, 9.0));
        assert_eq!(cache.usage(), (240, 3));
    }

    #[test]
    fn a_zero_budget_stores_nothing() {
        let cache = FeatureCache::new(0);
        cache.insert([1; 32], features(1, 1.0));
        assert!(!cache.enabled());
        assert!(cache.get(&[1; 32]).is_none());
        assert_eq!(cache.usage(), (0, 0));
    }
}
