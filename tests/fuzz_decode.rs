//! Fuzzing the decode path on the stable toolchain: real files, mutated (bit flips, byte
//! overwrites, interesting integers, chunk deletions and duplications) and truncated by a
//! seeded generator, fed to the DICOM and image decoders. Every input must come back as
//! a decoded frame or a `DecodeError` (a clear status), never a panic, and no single Rust
//! allocation may exceed the decode limits.
//!
//! CI runs a short pass. A long one, with every allocation bounded (the C codecs' too:
//! libjpeg-turbo, OpenJPEG and CharLS allocate through malloc, which this allocator does not
//! see, so the address space of the whole process is limited to 1 GiB; an allocation past
//! it fails, and a codec that aborts on that fails the run):
//!   cargo test --release --locked --test fuzz_decode --no-run
//!   FPTSERVE_FUZZ_ITERATIONS=1000000 FPTSERVE_FUZZ_SEED=20261207 \
//!     prlimit --as=1073741824 target/release/deps/fuzz_decode-* --nocapture
//! It prints, per transfer syntax of the mutated seed, how many inputs decoded and how many
//! were refused. Without the limit, the process's peak RSS is checked after every input
//! ([`C_CODEC_BOUND_KB`]).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use dicom_core::value::PixelFragmentSequence;
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::tags;
use dicom_object::FileMetaTableBuilder;
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

/// Half the inputs: the same number of bytes changed in place inside the pixel data only
/// (after the last (7FE0,0010) tag), so that the structure holds and the damaged
/// codestream reaches its codec; the other half: [`mutate_anywhere`].
fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let pixel_data = input
        .windows(4)
        .rposition(|w| w == [0xE0, 0x7F, 0x10, 0x00])
        .map(|at| at + 12)
        .filter(|&start| start + 16 < input.len());
    match pixel_data {
        Some(start) if rng.below(2) == 0 => {
            let mut out = input.to_vec();
            for _ in 0..1 + rng.below(8) {
                let at = start + rng.below(out.len() - start);
                match rng.below(3) {
                    0 => out[at] ^= 1 << rng.below(8),
                    1 => out[at] = rng.next() as u8,
                    _ => {
                        let v = [0u8, 0xff, 0x7f, 0x80][rng.below(4)];
                        let n = (out.len() - at).min(1 + rng.below(8));
                        out[at..at + n].fill(v);
                    }
                }
            }
            out
        }
        _ => mutate_anywhere(rng, input),
    }
}

fn mutate_anywhere(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
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
    let mut files = vec![htj2k_seed()];
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

/// An HTJ2K file, which neither wheel ships: the grey fixture's pixels through OpenJPH's
/// encoder (Debian's openjph-tools, installed by tools/system-deps.sh), wrapped as DICOM.
fn htj2k_seed() -> (PathBuf, Vec<u8>) {
    let source = common::fixtures().join("dicom/grey8_explicit_le.dcm");
    let file = dicom_object::open_file(&source).unwrap();
    let int = |tag| file.element(tag).unwrap().to_int::<u32>().unwrap();
    let (rows, columns) = (int(tags::ROWS), int(tags::COLUMNS));
    assert_eq!(int(tags::BITS_ALLOCATED), 8, "the seed expects 8-bit grey");
    let pixels = file.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (raw, j2c) = (dir.path().join("grey.rawl"), dir.path().join("grey.j2c"));
    std::fs::write(&raw, &pixels[..(rows * columns) as usize]).unwrap();
    let dims = format!("{{{columns},{rows}}}");
    let done = std::process::Command::new("ojph_compress")
        .args(["-i", raw.to_str().unwrap(), "-o", j2c.to_str().unwrap()])
        .args([
            "-dims",
            &dims,
            "-num_comps",
            "1",
            "-bit_depth",
            "8",
            "-signed",
            "false",
        ])
        .args(["-downsamp", "{1,1}", "-reversible", "true"])
        .output()
        .expect("ojph_compress (install the test tools with tools/system-deps.sh)");
    assert!(done.status.success(), "ojph_compress failed: {done:?}");
    let mut codestream = std::fs::read(&j2c).unwrap();
    if codestream.len() % 2 == 1 {
        codestream.push(0);
    }
    let mut obj = file.into_inner();
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PixelFragmentSequence::new(vec![], vec![codestream]),
    ));
    let htj2k = obj
        .with_meta(FileMetaTableBuilder::new().transfer_syntax("1.2.840.10008.1.2.4.201"))
        .unwrap();
    let mut bytes = Vec::new();
    htj2k.write_all(&mut bytes).unwrap();
    // It decodes before it is mutated: the seed is a valid file.
    decode::dicom::decode(&bytes, 0, &Limits::default(), None).expect("the HTJ2K seed decodes");
    (PathBuf::from("htj2k_seed.dcm"), bytes)
}

/// Inputs this test once failed on, rebuilt here rather than committed as mutated copies.
fn regressions() -> Vec<(PathBuf, Vec<u8>)> {
    // An explicit VR little endian element header with a 2-byte length.
    fn short(out: &mut Vec<u8>, (group, element): (u16, u16), vr: &[u8; 2], value: &[u8]) {
        out.extend(group.to_le_bytes());
        out.extend(element.to_le_bytes());
        out.extend(vr);
        out.extend((value.len() as u16).to_le_bytes());
        out.extend(value);
    }
    // 400000 iterations, seed 0x5eed_f00d, iteration 283150 (a mutation of pydicom's
    // DICOMDIR-empty.dcm): the group length covers a stray (8902,0003) and then a Transfer
    // Syntax UID whose VR became "UY", which the parser reads with a 4-byte length taken
    // from the UID's text ("1.2." = 775 MB) and reserved before reading.
    let mut group = Vec::new();
    group.extend([0x02, 0x00, 0x01, 0x00, b'O', b'B', 0, 0, 2, 0, 0, 0, 0, 1]);
    short(&mut group, (0x0002, 0x0002), b"UI", b"1.2.840.10008.1.3.10");
    short(&mut group, (0x8902, 0x0003), b"UI", b"1.2.3.4\0");
    short(
        &mut group,
        (0x0002, 0x0010),
        b"UY",
        b"1.2.840.10008.1.2.1\0",
    );
    let part10 = |group: &[u8], data_set: &[u8]| {
        let mut file = vec![0u8; 128];
        file.extend(b"DICM");
        short(
            &mut file,
            (0x0002, 0x0000),
            b"UL",
            &(group.len() as u32).to_le_bytes(),
        );
        file.extend(group);
        file.extend(data_set);
        file
    };
    let stray_meta = part10(&group, &[]);
    // 400000 iterations, seed 77, iteration 80638 (a mutation of pydicom's
    // JPEGLSNearLossless_08.dcm): a UL element 2 bytes long. The parser reads length / 4
    // values, leaves 2 bytes behind and reads the pixel data header from there: tag
    // (0000,7FE0), unknown VR "\x10\x00", length 0xFFFF0000, reserved before reading.
    let mut meta = Vec::new();
    meta.extend([0x02, 0x00, 0x01, 0x00, b'O', b'B', 0, 0, 2, 0, 0, 0, 0, 1]);
    short(&mut meta, (0x0002, 0x0010), b"UI", b"1.2.840.10008.1.2.1\0");
    let mut data_set = Vec::new();
    short(&mut data_set, (0x0028, 0x0010), b"US", &8u16.to_le_bytes());
    short(&mut data_set, (0x0000, 0x0103), b"UL", &[0, 0]);
    data_set.extend([
        0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
    ]);
    data_set.extend([0xFE, 0xFF, 0x00, 0xE0, 0, 0, 0, 0]);
    data_set.extend([0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
    let short_ul = part10(&meta, &data_set);
    // 400000 iterations, seed 77, iteration 265695 (a mutation of pydicom's
    // nested_priv_SQ.dcm, implicit VR): an element one byte too long swallows the first
    // byte of its item's delimiter, and the sequence delimiter that follows carries
    // 0x7FFF0000 as its length, which the parser reserved.
    let mut implicit = Vec::new();
    implicit.extend([0x02, 0x00, 0x01, 0x00, b'O', b'B', 0, 0, 2, 0, 0, 0, 0, 1]);
    short(
        &mut implicit,
        (0x0002, 0x0010),
        b"UI",
        b"1.2.840.10008.1.2\0",
    );
    let undefined = |group: u16, element: u16| {
        let mut h = Vec::from(group.to_le_bytes());
        h.extend(element.to_le_bytes());
        h.extend([0xFF; 4]);
        h
    };
    let mut nested = Vec::new();
    for _ in 0..2 {
        nested.extend(undefined(0x0001, 0x0001)); // a sequence in a sequence
        nested.extend(undefined(0xFFFE, 0xE000)); // an item
    }
    nested.extend([0x01, 0x00, 0x01, 0x00, 16, 0, 0, 0]);
    nested.extend(b"Double Nested SQ");
    nested.extend([
        0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0, 0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0,
    ]);
    nested.extend([0x01, 0x00, 0x02, 0x00, 9, 0, 0, 0]); // (0001,0002), 9 bytes: one too many
    nested.extend(b"Nested \xFF\xFF");
    nested.extend([0xFF, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]); // what is left of the item delimiter
    nested.extend([0xFE, 0xFF, 0xDD, 0xE0, 0x00, 0x00, 0xFF, 0x7F]);
    nested.extend([0x00, 0x7F, 0x10, 0x00, 0x02, 0, 0, 0, 0, 0]);
    let long_delimiter = part10(&implicit, &nested);
    vec![
        (PathBuf::from("meta-vr-uy.dcm"), stray_meta),
        (PathBuf::from("ul-of-2-bytes.dcm"), short_ul),
        (PathBuf::from("long-delimiter.dcm"), long_delimiter),
    ]
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
    // the transfer syntax of each seed (a PNG: "png"), for the per-syntax tally
    let syntaxes: Vec<String> = corpus
        .iter()
        .map(|(path, bytes)| match decode::dicom::parse(bytes) {
            Ok(file) => file
                .meta()
                .transfer_syntax()
                .trim_end_matches('\0')
                .to_string(),
            Err(_) => path
                .extension()
                .map_or("?", |e| e.to_str().unwrap_or("?"))
                .to_string(),
        })
        .collect();
    let mut tally: std::collections::BTreeMap<&str, (u64, u64)> = Default::default();
    let baseline = peak_rss_kb();
    let (mut decoded, mut refused) = (0u64, 0u64);
    let known = regressions();
    for i in 0..iterations + known.len() as u64 {
        // Inputs an earlier run found come first, as they are; then random mutations.
        let (path, input, syntax) = match known.get(i as usize) {
            Some((path, input)) => (path.clone(), input.clone(), "regression"),
            None => {
                let seed = rng.below(corpus.len());
                let (path, original) = &corpus[seed];
                (
                    path.clone(),
                    mutate(&mut rng, original),
                    syntaxes[seed].as_str(),
                )
            }
        };
        let path = &path;
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
        // C codecs allocate through malloc, which LARGEST does not see: the process's peak
        // resident memory may not rise past the corpus's by more than C_CODEC_BOUND either
        let fail = |kind: &str, what: String| -> ! {
            let dump = std::env::temp_dir().join(format!("fptserve-fuzz-{kind}-{i}.bin"));
            std::fs::write(&dump, &input).unwrap();
            panic!(
                "iteration {i}: decoding a mutation of {} {what}; input saved to {}",
                path.display(),
                dump.display()
            );
        };
        let peak = peak_rss_kb();
        if peak > baseline + C_CODEC_BOUND_KB {
            fail(
                "rss",
                format!("raised peak RSS to {peak} kB ({baseline} kB before)"),
            );
        }
        let largest = LARGEST.swap(0, Ordering::Relaxed);
        if largest > bound {
            fail(
                "alloc",
                format!("allocated {largest} bytes at once, over {bound}"),
            );
        }
        let counts = tally.entry(syntax).or_default();
        match result {
            Ok(Ok(())) => {
                decoded += 1;
                counts.0 += 1;
            }
            Ok(Err(e)) => {
                assert!(!e.to_string().is_empty());
                refused += 1;
                counts.1 += 1;
            }
            Err(_) => fail("crash", "panicked".into()),
        }
    }
    eprintln!("{iterations} inputs: {decoded} decoded, {refused} refused");
    for (syntax, (ok, no)) in &tally {
        eprintln!("  {syntax}: {ok} decoded, {no} refused");
    }
    assert!(
        decoded > 0 && refused > 0,
        "the mutations should both pass and fail"
    );
}

/// Peak resident memory of all the decoders' work (a C codec's buffers included) above the
/// corpus: a few frames at the limits above, plus codec state; OpenJPEG took 330-630 MB for
/// 200-byte codestreams declaring 65,535 tiles before the SIZ check.
const C_CODEC_BOUND_KB: u64 = 256 * 1024;

/// VmHWM of this process, in kB.
fn peak_rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM in /proc/self/status")
}

fn rng_is_dicom(path: &std::path::Path) -> bool {
    path.extension().is_some_and(|e| e == "dcm")
}
