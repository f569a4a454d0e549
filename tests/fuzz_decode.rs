//! Fuzzing the decode path on the stable toolchain: real files, mutated (bit flips, byte
//! overwrites, interesting integers, chunk deletions and duplications) and truncated by a
//! seeded generator, fed to the DICOM and image decoders. Every input must come back as
//! a decoded frame or a `DecodeError` (a clear status), never a panic, and no single Rust
//! allocation may exceed the decode limits.
//!
//! CI runs a short pass. A longer one:
//!   FPTSERVE_FUZZ_ITERATIONS=200000 cargo test --release --test fuzz_decode -- --nocapture
//! (FPTSERVE_FUZZ_SEED picks another sequence.) Allocations made by C codecs (libjpeg-turbo,
//! OpenJPEG, CharLS) go through malloc and are not counted here.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use fptserve::decode::codec::MinSize;
use fptserve::decode::{self, Limits};

/// Records the largest single allocation.
struct Tracking;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(8) {
        if out.is_empty() {
            break;
        }
        let at = rng.below(out.len());
        match rng.below(6) {
            0 => out[at] ^= 1 << rng.below(8),
            1 => out[at] = rng.next() as u8,
            2 => {
                // Interesting little-endian integers over lengths, rows, bit depths.
                let values: [u32; 8] =
                    [0, 1, 0x7fff, 0x8000, 0xffff, 0x7fff_ffff, 0xffff_ffff, 3000];
                let v = values[rng.below(values.len())].to_le_bytes();
                let n = (out.len() - at).min(1 + rng.below(4));
                out[at..at + n].copy_from_slice(&v[..n]);
            }
            3 => {
                let n = rng.below((out.len() - at).min(64)) + 1;
                out.drain(at..at + n);
            }
            4 => {
                let n = (rng.below(64) + 1).min(out.len() - at);
                let chunk = out[at..at + n].to_vec();
                let to = rng.below(out.len());
                out.splice(to..to, chunk);
            }
            _ => out.truncate(at),
        }
    }
    out
}

/// The fixtures plus every DICOM file under 2 MB that pydicom ships (every transfer
/// syntax, so the C codecs are fuzzed too); `make test` installs pydicom in .venv.
fn corpus() -> Vec<(PathBuf, Vec<u8>)> {
    let pydicom = common::root().join(".venv/lib/python3.11/site-packages/pydicom/data/test_files");
    assert!(
        pydicom.is_dir(),
        "{} is missing: run tools/python-env.sh (make test does)",
        pydicom.display()
    );
    let mut dirs = vec![
        common::fixtures().join("dicom"),
        common::fixtures().join("images"),
        pydicom,
    ];
    let mut files = Vec::new();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if std::fs::metadata(&path).is_ok_and(|m| m.len() < 2 << 20)
                && path.extension().is_some_and(|e| e == "dcm" || e == "png")
            {
                files.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    files.sort();
    files
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn mutated_and_truncated_files_never_panic_or_overallocate() {
    // Small limits keep each iteration cheap (a mutated header may ask for the largest
    // frame the limits allow) and make an allocation past them easy to see.
    let limits = Limits {
        max_pixels: 1024 * 1024,
        max_frames: 64,
        max_frame_bytes: 8 << 20,
    };
    // A decoded frame is at most max_frame_bytes; its i32 stored values (up to 4 bytes per
    // 8-bit sample) and their RGB rendering are at most a few times that.
    let bound = 6 * limits.max_frame_bytes as usize;
    let iterations = env_u64("FPTSERVE_FUZZ_ITERATIONS", 1500);
    let mut rng = Rng(env_u64("FPTSERVE_FUZZ_SEED", 0x5eed_f00d) | 1);
    let corpus = corpus();
    assert!(corpus.len() >= 6);
    let (mut decoded, mut refused) = (0u64, 0u64);
    for i in 0..iterations {
        let (path, original) = &corpus[rng.below(corpus.len())];
        let input = mutate(&mut rng, original);
        let frame = if rng.below(8) == 0 {
            rng.below(3) as u32
        } else {
            0
        };
        // Every other input takes the reduced-resolution path (JPEG 2000 and JPEG codecs
        // drop levels or scale down for an 8 x 8 minimum).
        let min = (i % 2 == 1).then_some(MinSize {
            width: 8,
            height: 8,
        });
        let result = std::panic::catch_unwind(|| {
            if input.len() > 132 && (&input[128..132] == b"DICM" || rng_is_dicom(path)) {
                decode::dicom::decode(&input, frame, &limits, min).map(|d| {
                    // Rendering is part of the decode path too.
                    let _ = d.render(&Default::default());
                })
            } else {
                decode::image::decode(&input, frame, &limits).map(|_| ())
            }
        });
        let largest = LARGEST.swap(0, Ordering::Relaxed);
        if largest > bound {
            let dump = std::env::temp_dir().join(format!("fptserve-fuzz-alloc-{i}.bin"));
            std::fs::write(&dump, &input).unwrap();
            panic!(
                "iteration {i}: decoding a mutation of {} allocated {largest} bytes at once, over {bound}; input saved to {}",
                path.display(),
                dump.display()
            );
        }
        match result {
            Ok(Ok(())) => decoded += 1,
            Ok(Err(e)) => {
                assert!(!e.to_string().is_empty());
                refused += 1;
            }
            Err(_) => {
                let dump = std::env::temp_dir().join(format!("fptserve-fuzz-crash-{i}.bin"));
                std::fs::write(&dump, &input).unwrap();
                panic!(
                    "iteration {i}: decoding a mutation of {} panicked; input saved to {}",
                    path.display(),
                    dump.display()
                );
            }
        }
    }
    eprintln!("{iterations} inputs: {decoded} decoded, {refused} refused");
    assert!(
        decoded > 0 && refused > 0,
        "the mutations should both pass and fail"
    );
}

fn rng_is_dicom(path: &std::path::Path) -> bool {
    path.extension().is_some_and(|e| e == "dcm")
}
