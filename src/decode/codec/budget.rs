//! The decoders' share of the cores. The engine runs at most one decode per core at once
//! (its decode pool); a codec with its own worker threads (OpenJPEG) may add threads only
//! on the cores no other frame is decoding on, so that a lone JPEG 2000 frame uses the idle
//! machine while concurrent calls do not oversubscribe it.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Frames being decoded right now, by every caller in the process.
static DECODING: AtomicUsize = AtomicUsize::new(0);

/// One frame's claim, held while it decodes.
pub(super) struct InFlight(());

impl InFlight {
    pub(super) fn enter() -> InFlight {
        DECODING.fetch_add(1, Ordering::Relaxed);
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        DECODING.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Cores the process may run on.
fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Threads one frame's decoder may run: the cores no other frame is decoding on (this
/// frame's own included), at least 1 and at most `max`.
pub(super) fn threads(max: usize) -> usize {
    let others = DECODING.load(Ordering::Relaxed).saturating_sub(1);
    cores().saturating_sub(others).clamp(1, max.max(1))
}
