//! Every transfer syntax fptserve decodes, made by independent encoders (Debian's dcmtk,
//! gdcm and openjph tools) from synthetic images with known pixels, decoded with
//! `decode_frame` and compared with the source: exactly for lossless syntaxes, within a
//! stated tolerance for lossy ones. One test per syntax, so a failure names the syntax.
//!
//! Needs the tools from `tools/system-deps.sh`; a missing tool fails the test (it never
//! skips), so CI cannot pass without actually checking the codecs.

use std::path::{Path, PathBuf};
use std::process::Command;

use dicom_core::value::{PixelFragmentSequence, PrimitiveValue};
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject, OpenFileOptions};
use dicom_pixeldata::PixelDecoder;
use fptserve::decode::Limits;
use fptserve::decode::codec::{FrameLayout, MinSize, decode_frame, decode_frame_at};

const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";

/// A synthetic image with known samples.
#[derive(Clone)]
struct Image {
    name: &'static str,
    rows: u32,
    columns: u32,
    samples: u16,
    bits_allocated: u16,
    bits_stored: u16,
    signed: bool,
    photometric: &'static str,
    planar: u16,
    frames: u32,
    /// Sample values, frame after frame, interleaved, as the stored integers.
    values: Vec<i64>,
}

/// Deterministic noise, so lossless tests see every bit pattern but not a compressible one.
fn hash(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51afd7ed558ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ceb9fe1a85ec53);
    x ^ (x >> 33)
}

impl Image {
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: &'static str,
        rows: u32,
        columns: u32,
        samples: u16,
        bits_allocated: u16,
        bits_stored: u16,
        signed: bool,
        photometric: &'static str,
        frames: u32,
        smooth: bool,
    ) -> Image {
        // Values span the whole stored range: smooth ramps plus (unless `smooth`, for the
        // lossy codecs) a few bits of noise.
        let (lo, hi) = if signed {
            (
                -(1i64 << (bits_stored - 1)),
                (1i64 << (bits_stored - 1)) - 1,
            )
        } else {
            (0, (1i64 << bits_stored) - 1)
        };
        let span = (hi - lo) as f64;
        let mut values =
            Vec::with_capacity((rows * columns * u32::from(samples) * frames) as usize);
        for f in 0..frames {
            for y in 0..rows {
                for x in 0..columns {
                    for s in 0..samples {
                        let u = f64::from(x) / f64::from(columns.max(2) - 1);
                        let v = f64::from(y) / f64::from(rows.max(2) - 1);
                        let t = match s {
                            0 => {
                                0.5 * u
                                    + 0.3 * v
                                    + 0.2 * ((u * 6.0).sin() * (v * 4.0).cos() * 0.5 + 0.5)
                            }
                            1 => 1.0 - (0.6 * v + 0.4 * u),
                            _ => 0.5 + 0.5 * ((u + v) * 5.0 + f64::from(f)).sin(),
                        };
                        // Later frames are shifted, without wrapping round (an edge lossy codecs blur).
                        let t = (t * 0.8 + 0.1 * f64::from(f)).min(1.0);
                        let mut val = lo + (t * span).round() as i64;
                        if !smooth {
                            let noise = (hash(
                                u64::from(x)
                                    | u64::from(y) << 20
                                    | u64::from(s) << 40
                                    | u64::from(f) << 44,
                            ) % 64) as i64;
                            val = (val + noise - 32).clamp(lo, hi);
                        }
                        if bits_allocated == 1 {
                            val = (hash(u64::from(x) * 31 + u64::from(y) * 7 + u64::from(f)) & 1)
                                as i64;
                        }
                        values.push(val);
                    }
                }
            }
        }
        Image {
            name,
            rows,
            columns,
            samples,
            bits_allocated,
            bits_stored,
            signed,
            photometric,
            planar: 0,
            frames,
            values,
        }
    }

    fn frame_len(&self) -> usize {
        (self.rows * self.columns * u32::from(self.samples)) as usize
    }

    /// Stored bytes of frames `frames`, little-endian, in the image's planar configuration.
    fn native_bytes(&self, frames: std::ops::Range<u32>) -> Vec<u8> {
        let n = self.frame_len();
        let mut out = Vec::new();
        let mut bits = Vec::new();
        for f in frames {
            let frame = &self.values[f as usize * n..(f as usize + 1) * n];
            let ordered: Vec<i64> = if self.planar == 1 {
                let s = usize::from(self.samples);
                (0..s)
                    .flat_map(|c| frame.iter().skip(c).step_by(s).copied())
                    .collect()
            } else {
                frame.to_vec()
            };
            for v in ordered {
                match self.bits_allocated {
                    1 => bits.push(v as u8),
                    8 => out.push(v as u8),
                    16 => out.extend_from_slice(&(v as u16).to_le_bytes()),
                    32 => out.extend_from_slice(&(v as u32).to_le_bytes()),
                    b => panic!("bits allocated {b}"),
                }
            }
        }
        if self.bits_allocated == 1 {
            out = bits
                .chunks(8)
                .map(|c| {
                    c.iter()
                        .enumerate()
                        .fold(0u8, |acc, (i, &b)| acc | (b << i))
                })
                .collect();
        }
        if out.len() % 2 == 1 {
            out.push(0);
        }
        out
    }

    /// The header attributes every file of this image carries.
    fn header(&self) -> InMemDicomObject {
        let mut obj = InMemDicomObject::new_empty();
        let s = |v: &str| PrimitiveValue::from(v.to_string());
        let sop_instance = format!(
            "2.25.{}",
            hash(self.name.len() as u64 * 977 + u64::from(self.rows))
        );
        let modality = if self.name.starts_with("ct") {
            "CT"
        } else {
            "OT"
        };
        obj.put(DataElement::new(
            tags::SOP_CLASS_UID,
            VR::UI,
            s("1.2.840.10008.5.1.4.1.1.7"),
        ));
        obj.put(DataElement::new(
            tags::SOP_INSTANCE_UID,
            VR::UI,
            s(&sop_instance),
        ));
        obj.put(DataElement::new(
            tags::STUDY_INSTANCE_UID,
            VR::UI,
            s("2.25.1"),
        ));
        obj.put(DataElement::new(
            tags::SERIES_INSTANCE_UID,
            VR::UI,
            s("2.25.2"),
        ));
        obj.put(DataElement::new(tags::MODALITY, VR::CS, s(modality)));
        obj.put(DataElement::new(tags::PATIENT_ID, VR::LO, s("SYNTHETIC")));
        obj.put(DataElement::new(
            tags::SAMPLES_PER_PIXEL,
            VR::US,
            PrimitiveValue::from(self.samples),
        ));
        obj.put(DataElement::new(
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            s(self.photometric),
        ));
        if self.samples == 3 {
            obj.put(DataElement::new(
                tags::PLANAR_CONFIGURATION,
                VR::US,
                PrimitiveValue::from(self.planar),
            ));
        }
        if self.frames > 1 {
            obj.put(DataElement::new(
                tags::NUMBER_OF_FRAMES,
                VR::IS,
                s(&self.frames.to_string()),
            ));
        }
        obj.put(DataElement::new(
            tags::ROWS,
            VR::US,
            PrimitiveValue::from(self.rows as u16),
        ));
        obj.put(DataElement::new(
            tags::COLUMNS,
            VR::US,
            PrimitiveValue::from(self.columns as u16),
        ));
        obj.put(DataElement::new(
            tags::BITS_ALLOCATED,
            VR::US,
            PrimitiveValue::from(self.bits_allocated),
        ));
        obj.put(DataElement::new(
            tags::BITS_STORED,
            VR::US,
            PrimitiveValue::from(self.bits_stored),
        ));
        obj.put(DataElement::new(
            tags::HIGH_BIT,
            VR::US,
            PrimitiveValue::from(self.bits_stored - 1),
        ));
        obj.put(DataElement::new(
            tags::PIXEL_REPRESENTATION,
            VR::US,
            PrimitiveValue::from(u16::from(self.signed)),
        ));
        if modality == "CT" {
            obj.put(DataElement::new(
                tags::RESCALE_INTERCEPT,
                VR::DS,
                s("-1024"),
            ));
            obj.put(DataElement::new(tags::RESCALE_SLOPE, VR::DS, s("1")));
            obj.put(DataElement::new(tags::RESCALE_TYPE, VR::LO, s("HU")));
        }
        obj
    }

    /// Writes the image as explicit VR little endian.
    fn write_native(&self, path: &Path) {
        let mut obj = self.header();
        let bytes = self.native_bytes(0..self.frames);
        let (vr, value) = if self.bits_allocated > 8 {
            let words: Vec<u16> = bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            (VR::OW, PrimitiveValue::U16(words.into()))
        } else {
            (VR::OB, PrimitiveValue::U8(bytes.into()))
        };
        obj.put(DataElement::new(tags::PIXEL_DATA, vr, value));
        write(obj, EXPLICIT_LE, path);
    }

    /// Writes the image with encapsulated pixel data: one fragment per frame.
    fn write_encapsulated(
        &self,
        fragments: Vec<Vec<u8>>,
        ts: &str,
        path: &Path,
        header: InMemDicomObject,
    ) {
        let mut obj = header;
        let mut offsets = Vec::new();
        let mut at = 0u32;
        for f in &fragments {
            offsets.push(at);
            at += 8 + f.len() as u32;
        }
        let fragments = fragments
            .into_iter()
            .map(|mut f| {
                if f.len() % 2 == 1 {
                    f.push(0);
                }
                f
            })
            .collect::<Vec<_>>();
        obj.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            PixelFragmentSequence::new(offsets, fragments),
        ));
        write(obj, ts, path);
    }
}

fn write(obj: InMemDicomObject, ts: &str, path: &Path) {
    let sop = obj
        .element(tags::SOP_INSTANCE_UID)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(ts)
                .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.7")
                .media_storage_sop_instance_uid(sop),
        )
        .unwrap();
    file.write_to_file(path).unwrap();
}

/// Runs an encoder, failing the test (never skipping it) when the tool is not installed.
fn run(tool: &str, args: &[&str]) {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run `{tool}` ({e}): install the test tools with tools/system-deps.sh")
    });
    assert!(
        out.status.success(),
        "`{tool} {}` failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A scratch folder with the source images written natively.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `img` written natively; returns the path.
    fn source(&self, img: &Image) -> PathBuf {
        let p = self.path(&format!("{}.dcm", img.name));
        if !p.exists() {
            img.write_native(&p);
        }
        p
    }

    /// Converts `img` with `tool args.. in out` and returns the output path.
    fn convert(&self, img: &Image, tag: &str, tool: &str, args: &[&str]) -> PathBuf {
        let src = self.source(img);
        let out = self.path(&format!("{}_{tag}.dcm", img.name));
        let mut all: Vec<&str> = args.to_vec();
        let (s, o) = (src.to_str().unwrap(), out.to_str().unwrap());
        all.extend([s, o]);
        run(tool, &all);
        out
    }
}

/// The header fields `decode_frame` needs, read from the file as the server would.
fn layout(obj: &dicom_object::DefaultDicomObject) -> FrameLayout {
    let int = |tag| -> u32 {
        obj.element(tag)
            .ok()
            .and_then(|e| e.to_str().ok().and_then(|s| s.trim().parse().ok()))
            .unwrap_or(0)
    };
    FrameLayout {
        rows: int(tags::ROWS),
        columns: int(tags::COLUMNS),
        samples_per_pixel: int(tags::SAMPLES_PER_PIXEL) as u16,
        bits_allocated: int(tags::BITS_ALLOCATED) as u16,
        bits_stored: int(tags::BITS_STORED) as u16,
        signed: int(tags::PIXEL_REPRESENTATION) == 1,
        photometric: obj
            .element(tags::PHOTOMETRIC_INTERPRETATION)
            .unwrap()
            .to_str()
            .unwrap()
            .trim()
            .to_string(),
        planar_configuration: int(tags::PLANAR_CONFIGURATION) as u16,
        frames: int(tags::NUMBER_OF_FRAMES).max(1),
    }
}

/// The stored integer of each sample, masked to Bits Stored and sign-extended, as the
/// pixel pipeline reads them.
fn sample_values(data: &[u8], bits_allocated: u16, bits_stored: u16, signed: bool) -> Vec<i64> {
    let raw: Vec<u64> = match bits_allocated {
        8 => data.iter().map(|&b| u64::from(b)).collect(),
        16 => data
            .chunks_exact(2)
            .map(|c| u64::from(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        32 => data
            .chunks_exact(4)
            .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        b => panic!("output bits {b}"),
    };
    let mask = (1u64 << bits_stored) - 1;
    raw.into_iter()
        .map(|v| {
            let v = v & mask;
            if signed && v >> (bits_stored - 1) & 1 == 1 {
                v as i64 - (1i64 << bits_stored)
            } else {
                v as i64
            }
        })
        .collect()
}

/// Decodes every frame of `path` and checks it against `img`: `tolerance` 0 for exact.
/// Returns the largest error seen.
fn check(path: &Path, img: &Image, expected_ts: &str, tolerance: i64, photometric: &str) -> i64 {
    let obj = OpenFileOptions::new().open_file(path).unwrap();
    let ts = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches(['\0', ' '])
        .to_string();
    assert_eq!(
        ts, expected_ts,
        "{}: the encoder wrote another transfer syntax",
        img.name
    );
    let layout = layout(&obj);
    assert_eq!(
        (layout.rows, layout.columns, layout.frames),
        (img.rows, img.columns, img.frames)
    );
    let n = img.frame_len();
    let mut worst = 0;
    let mut total = 0i64;
    for f in 0..img.frames {
        let raw = decode_frame(&obj, f, &layout, &Limits::default())
            .unwrap_or_else(|e| panic!("{} ({ts}) frame {f}: {e}", img.name));
        assert_eq!(
            raw.photometric, photometric,
            "{} ({ts}): photometric",
            img.name
        );
        assert_eq!(
            raw.data.len(),
            n * usize::from(raw.bits_allocated / 8),
            "{}: size",
            img.name
        );
        let got = sample_values(
            &raw.data,
            raw.bits_allocated,
            layout.bits_stored.max(img.bits_stored),
            img.signed,
        );
        let want = &img.values[f as usize * n..(f as usize + 1) * n];
        check_pixeldata(&obj, f, &raw.data, &raw.photometric, &want_rgb(img, want));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let d = (g - w).abs();
            total += d;
            if d > worst {
                worst = d;
            }
            if tolerance == 0 && d != 0 {
                panic!(
                    "{} ({ts}) frame {f}: sample {i} (pixel {}, component {}) is {g}, expected {w}",
                    img.name,
                    i / usize::from(img.samples),
                    i % usize::from(img.samples)
                );
            }
        }
    }
    let mean = total as f64 / (n as f64 * f64::from(img.frames));
    eprintln!("{} ({ts}): max error {worst}, mean {mean:.3}", img.name);
    assert!(
        worst <= tolerance,
        "{} ({ts}): max error {worst} above the tolerance {tolerance} (mean {mean:.3})",
        img.name
    );
    worst
}

/// Compressed syntaxes are decoded by fptserve's codecs through dicom-rs's pixel data API
/// too (`src/decode/codec/pixeldata.rs` submits them to its registry): the frame
/// dicom-pixeldata returns must be the one `decode_frame` returns, and YBR_FULL, which
/// dicom-pixeldata's contract wants as RGB, the image's own values through PS3.3
/// C.7.6.3.1.2's matrix (within 1 of it: that matrix in f32 against f64, both rounded).
fn check_pixeldata(
    obj: &dicom_object::DefaultDicomObject,
    frame: u32,
    ours: &[u8],
    photometric: &str,
    want_rgb: &[i64],
) {
    let ts = obj.meta().transfer_syntax().trim_end_matches(['\0', ' ']);
    let native_or_uncompressed = [
        EXPLICIT_LE,
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.1.98",
    ];
    if native_or_uncompressed.contains(&ts) {
        return;
    }
    let via = obj
        .decode_pixel_data_frame(frame)
        .unwrap_or_else(|e| panic!("dicom-pixeldata ({ts}) frame {frame}: {e}"));
    if photometric == "YBR_FULL" {
        let got: Vec<i64> = via.data().iter().map(|&b| i64::from(b)).collect();
        assert_eq!(got.len(), want_rgb.len());
        for (i, (g, w)) in got.iter().zip(want_rgb).enumerate() {
            assert!(
                (g - w).abs() <= 1,
                "dicom-pixeldata ({ts}) frame {frame}: sample {i} is {g}, RGB of the source {w}"
            );
        }
    } else {
        assert!(
            via.data() == ours,
            "dicom-pixeldata through fptserve's codecs ({ts}) frame {frame} differs from \
             decode_frame"
        );
    }
}

/// `values` (one frame of `img`) as 8-bit RGB when `img` is YBR_FULL, by PS3.3
/// C.7.6.3.1.2 in f64; otherwise empty.
fn want_rgb(img: &Image, values: &[i64]) -> Vec<i64> {
    if img.photometric != "YBR_FULL" {
        return Vec::new();
    }
    values
        .chunks_exact(3)
        .flat_map(|p| {
            let (y, cb, cr) = (p[0] as f64, p[1] as f64 - 128.0, p[2] as f64 - 128.0);
            let r = y + 1.402 * cr;
            let g = y - 0.344136 * cb - 0.714136 * cr;
            let b = y + 1.772 * cb;
            [r, g, b].map(|v| v.round().clamp(0.0, 255.0) as i64)
        })
        .collect()
}

// --- the images ---

fn mono2_12() -> Image {
    Image::new(
        "mono2_12",
        480,
        360,
        1,
        16,
        12,
        false,
        "MONOCHROME2",
        1,
        false,
    )
}
fn mono1_16() -> Image {
    Image::new(
        "mono1_16",
        300,
        420,
        1,
        16,
        16,
        false,
        "MONOCHROME1",
        1,
        false,
    )
}
fn ct_signed() -> Image {
    Image::new(
        "ct_signed",
        320,
        256,
        1,
        16,
        16,
        true,
        "MONOCHROME2",
        1,
        false,
    )
}
fn rgb8() -> Image {
    Image::new("rgb8", 240, 320, 3, 8, 8, false, "RGB", 1, false)
}
fn multiframe() -> Image {
    Image::new(
        "multiframe",
        128,
        160,
        1,
        16,
        14,
        false,
        "MONOCHROME2",
        3,
        false,
    )
}
fn grey8_smooth() -> Image {
    Image::new(
        "grey8_smooth",
        256,
        320,
        1,
        8,
        8,
        false,
        "MONOCHROME2",
        1,
        true,
    )
}
fn rgb8_smooth() -> Image {
    Image::new("rgb8_smooth", 256, 320, 3, 8, 8, false, "RGB", 1, true)
}
fn mono2_12_smooth() -> Image {
    Image::new(
        "mono2_12_smooth",
        400,
        512,
        1,
        16,
        12,
        false,
        "MONOCHROME2",
        2,
        true,
    )
}
/// The size of a digital radiograph: 3000 x 3000, 16 bits stored.
fn big16_smooth() -> Image {
    Image::new(
        "big16",
        3000,
        3000,
        1,
        16,
        16,
        false,
        "MONOCHROME2",
        1,
        true,
    )
}

fn lossless_set() -> Vec<Image> {
    vec![mono2_12(), mono1_16(), ct_signed(), rgb8(), multiframe()]
}

/// Converts every image of the lossless set with `tool args` and checks it exactly.
fn lossless_with(tool: &str, args: &[&str], ts: &str) {
    let s = Scratch::new();
    for img in lossless_set() {
        let out = s.convert(&img, "out", tool, args);
        check(&out, &img, ts, 0, img.photometric);
    }
}

// --- native syntaxes ---

#[test]
fn explicit_vr_little_endian() {
    let s = Scratch::new();
    let mut planar = rgb8();
    planar.name = "rgb8_planar";
    planar.planar = 1;
    let bits1 = Image::new("bits1", 7, 5, 1, 1, 1, false, "MONOCHROME2", 3, false);
    let wide = Image::new("u32", 64, 48, 1, 32, 32, false, "MONOCHROME2", 2, false);
    for img in lossless_set().into_iter().chain([planar, bits1, wide]) {
        let p = s.source(&img);
        check(&p, &img, EXPLICIT_LE, 0, img.photometric);
    }
}

#[test]
fn implicit_vr_little_endian() {
    lossless_with("dcmconv", &["+ti"], "1.2.840.10008.1.2");
}

#[test]
fn explicit_vr_big_endian() {
    let s = Scratch::new();
    let mut planar = rgb8();
    planar.name = "rgb8_planar";
    planar.planar = 1;
    for img in lossless_set().into_iter().chain([planar]) {
        let out = s.convert(&img, "be", "dcmconv", &["+tb"]);
        check(&out, &img, "1.2.840.10008.1.2.2", 0, img.photometric);
    }
}

#[test]
fn deflated_explicit_vr_little_endian() {
    lossless_with("dcmconv", &["+td"], "1.2.840.10008.1.2.1.99");
}

#[test]
fn encapsulated_uncompressed() {
    let s = Scratch::new();
    let ts = "1.2.840.10008.1.2.1.98";
    for img in lossless_set() {
        let p = s.path(&format!("{}_encap.dcm", img.name));
        let fragments = (0..img.frames)
            .map(|f| img.native_bytes(f..f + 1))
            .collect();
        img.write_encapsulated(fragments, ts, &p, img.header());
        check(&p, &img, ts, 0, img.photometric);
    }
}

// --- RLE ---

#[test]
fn rle_lossless() {
    lossless_with("dcmcrle", &[], "1.2.840.10008.1.2.5");
    // gdcm's encoder too: a second, independent writer of the same format.
    let s = Scratch::new();
    let img = ct_signed();
    let out = s.convert(&img, "gdcm", "gdcmconv", &["--rle"]);
    check(&out, &img, "1.2.840.10008.1.2.5", 0, img.photometric);
    // Colour stored as YBR_FULL stays YBR_FULL through the codec (the pixel pipeline
    // converts it); dicom-pixeldata's API gets it as RGB.
    let mut ybr = rgb8();
    ybr.name = "ybr_full8";
    ybr.photometric = "YBR_FULL";
    let out = s.convert(&ybr, "out", "dcmcrle", &[]);
    check(&out, &ybr, "1.2.840.10008.1.2.5", 0, "YBR_FULL");
}

// --- JPEG ---

#[test]
fn jpeg_baseline_8bit() {
    let ts = "1.2.840.10008.1.2.4.50";
    let s = Scratch::new();
    let grey = grey8_smooth();
    let out = s.convert(&grey, "jpeg", "dcmcjpeg", &["+eb", "+sr", "+q", "95"]);
    check(&out, &grey, ts, 3, "MONOCHROME2");
    // dcmcjpeg stores colour as YBR_FULL_422; the decoder hands back RGB.
    let rgb = rgb8_smooth();
    let out = s.convert(&rgb, "jpeg", "dcmcjpeg", &["+eb", "+sr", "+q", "95"]);
    check(&out, &rgb, ts, 12, "RGB");
}

#[test]
fn jpeg_extended_12bit() {
    let s = Scratch::new();
    let img = mono2_12_smooth();
    let out = s.convert(&img, "jpeg", "dcmcjpeg", &["+ee", "+sr", "+q", "95"]);
    check(&out, &img, "1.2.840.10008.1.2.4.51", 24, "MONOCHROME2");
}

#[test]
fn jpeg_lossless_process14() {
    lossless_with("dcmcjpeg", &["+el", "+sv", "6"], "1.2.840.10008.1.2.4.57");
}

#[test]
fn jpeg_lossless_sv1() {
    lossless_with("dcmcjpeg", &["+e1"], "1.2.840.10008.1.2.4.70");
    let s = Scratch::new();
    let img = ct_signed();
    let out = s.convert(&img, "gdcm", "gdcmconv", &["--jpeg"]);
    check(&out, &img, "1.2.840.10008.1.2.4.70", 0, img.photometric);
}

// --- JPEG-LS ---

#[test]
fn jpeg_ls_lossless() {
    lossless_with("dcmcjpls", &["+el"], "1.2.840.10008.1.2.4.80");
    let s = Scratch::new();
    let img = multiframe();
    let out = s.convert(&img, "gdcm", "gdcmconv", &["--jpegls"]);
    check(&out, &img, "1.2.840.10008.1.2.4.80", 0, img.photometric);
}

#[test]
fn jpeg_ls_near_lossless() {
    // NEAR = 3 bounds every sample's error by 3: the tolerance is the codec's guarantee.
    let s = Scratch::new();
    // dcmcjpls refuses signed data for near-lossless.
    for img in [mono2_12(), rgb8(), multiframe()] {
        let out = s.convert(&img, "near", "dcmcjpls", &["+en", "+md", "3"]);
        check(&out, &img, "1.2.840.10008.1.2.4.81", 3, img.photometric);
    }
}

// --- JPEG 2000 ---

#[test]
fn jpeg_2000_lossless() {
    let ts = "1.2.840.10008.1.2.4.90";
    let s = Scratch::new();
    for img in lossless_set() {
        let out = s.convert(&img, "j2k", "gdcmconv", &["--j2k"]);
        // gdcm applies the reversible colour transform: the decoder inverts it to RGB.
        check(&out, &img, ts, 0, img.photometric);
    }
}

#[test]
fn jpeg_2000_lossy() {
    let s = Scratch::new();
    let img = mono2_12_smooth();
    let out = s.convert(&img, "j2k", "gdcmconv", &["--j2k", "--lossy", "-r", "40"]);
    check(&out, &img, "1.2.840.10008.1.2.4.91", 16, "MONOCHROME2");
    let rgb = rgb8_smooth();
    let out = s.convert(&rgb, "j2k", "gdcmconv", &["--j2k", "--lossy", "-r", "40"]);
    check(&out, &rgb, "1.2.840.10008.1.2.4.91", 8, "RGB");
}

/// The case dicom-pixeldata 0.10 refuses (compressed below 1/64 of the decoded size).
#[test]
fn jpeg_2000_lossy_3000x3000_16bit_100_to_1() {
    let s = Scratch::new();
    let img = big16_smooth();
    let out = s.convert(&img, "j2k", "gdcmconv", &["--j2k", "--lossy", "-r", "100"]);
    let compressed = std::fs::metadata(&out).unwrap().len();
    let ratio = (3000 * 3000 * 2) as f64 / compressed as f64;
    eprintln!("big16: {compressed} bytes, {ratio:.0}:1");
    assert!(
        ratio > 64.0,
        "the test needs a ratio over 64:1, got {ratio:.1}:1"
    );
    // Measured: max 4, mean 0.3 (of 65535) on this smooth image; 32 leaves room for encoder versions.
    check(&out, &img, "1.2.840.10008.1.2.4.91", 32, "MONOCHROME2");
}

// --- HTJ2K (openjph codestreams wrapped by the test) ---

/// Encodes every frame of `img` with ojph_compress and wraps the codestreams into DICOM.
fn htj2k(img: &Image, ts: &str, args: &[&str], s: &Scratch) -> PathBuf {
    let mut fragments = Vec::new();
    for f in 0..img.frames {
        let input = if img.samples == 3 {
            let p = s.path(&format!("{}_{f}.ppm", img.name));
            let mut ppm = format!("P6\n{} {}\n255\n", img.columns, img.rows).into_bytes();
            ppm.extend(img.native_bytes(f..f + 1).iter().take(img.frame_len()));
            std::fs::write(&p, ppm).unwrap();
            p
        } else {
            // Raw little-endian samples: the only input ojph takes for signed data.
            let p = s.path(&format!("{}_{f}.rawl", img.name));
            std::fs::write(&p, img.native_bytes(f..f + 1)).unwrap();
            p
        };
        let out = s.path(&format!("{}_{f}.j2c", img.name));
        let mut all = vec!["-i", input.to_str().unwrap(), "-o", out.to_str().unwrap()];
        let dims = format!("{{{},{}}}", img.columns, img.rows);
        let depth = img.bits_stored.to_string();
        // openjph 0.9's raw reader clamps signed input to the positive range, so signed
        // samples go in as their 16-bit patterns, unsigned: the way many modalities write
        // signed J2K, which the pixel pipeline sign-extends from Bits Stored.
        let signed = "false";
        if img.samples == 1 {
            all.extend([
                "-dims",
                &dims,
                "-num_comps",
                "1",
                "-bit_depth",
                &depth,
                "-signed",
                signed,
                "-downsamp",
                "{1,1}",
            ]);
        }
        all.extend(args);
        run("ojph_compress", &all);
        fragments.push(std::fs::read(&out).unwrap());
    }
    let p = s.path(&format!("{}_{ts}.dcm", img.name));
    img.write_encapsulated(fragments, ts, &p, img.header());
    p
}

#[test]
fn htj2k_lossless() {
    let ts = "1.2.840.10008.1.2.4.201";
    let s = Scratch::new();
    for img in lossless_set() {
        let p = htj2k(
            &img,
            ts,
            &["-reversible", "true", "-prog_order", "LRCP"],
            &s,
        );
        // ojph applies the reversible colour transform to RGB input.
        check(&p, &img, ts, 0, img.photometric);
    }
}

#[test]
fn htj2k_lossless_rpcl() {
    let ts = "1.2.840.10008.1.2.4.202";
    let s = Scratch::new();
    for img in lossless_set() {
        let p = htj2k(
            &img,
            ts,
            &["-reversible", "true", "-prog_order", "RPCL"],
            &s,
        );
        check(&p, &img, ts, 0, img.photometric);
    }
}

#[test]
fn htj2k_lossy() {
    let ts = "1.2.840.10008.1.2.4.203";
    let s = Scratch::new();
    let img = mono2_12_smooth();
    let p = htj2k(&img, ts, &["-qstep", "0.002"], &s);
    check(&p, &img, ts, 16, "MONOCHROME2");
    let rgb = rgb8_smooth();
    let p = htj2k(&rgb, ts, &["-qstep", "0.01"], &s);
    check(&p, &rgb, ts, 8, "RGB");
}

// --- reduced resolution (tasks with decode_resolution: reduced) ---

/// Frame `frame`'s codestream: these files hold one fragment per frame.
fn codestream(path: &Path, frame: usize) -> Vec<u8> {
    let obj = OpenFileOptions::new().open_file(path).unwrap();
    let pixels = obj.element(tags::PIXEL_DATA).unwrap();
    let fragments = pixels.value().fragments().expect("encapsulated pixel data");
    fragments[frame].clone()
}

/// Samples of a binary PGM or PPM (8-bit, or 16-bit big-endian when maxval > 255), and
/// its width and height.
fn read_pnm(path: &Path) -> (usize, usize, Vec<i64>) {
    let bytes = std::fs::read(path).unwrap();
    let mut fields = Vec::new();
    let mut at = 0;
    while fields.len() < 4 {
        while bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        if bytes[at] == b'#' {
            while bytes[at] != b'\n' {
                at += 1;
            }
            continue;
        }
        let start = at;
        while !bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        fields.push(String::from_utf8_lossy(&bytes[start..at]).into_owned());
    }
    let body = &bytes[at + 1..];
    let (w, h, max): (usize, usize, u32) = (
        fields[1].parse().unwrap(),
        fields[2].parse().unwrap(),
        fields[3].parse().unwrap(),
    );
    let values = if max > 255 {
        body.chunks_exact(2)
            .map(|b| i64::from(u16::from_be_bytes([b[0], b[1]])))
            .collect()
    } else {
        body.iter().map(|&b| i64::from(b)).collect()
    };
    (w, h, values)
}

/// The size that allows exactly `k` halvings of `img` (rounding up, as the codecs do).
fn min_for(img: &Image, k: u32) -> MinSize {
    MinSize {
        width: img.columns.div_ceil(1 << k),
        height: img.rows.div_ceil(1 << k),
    }
}

/// Decodes frame `frame` of `path` for `min` and checks it against a reference decoder's
/// reduced output (`width` x `height`, interleaved samples): exactly, or within
/// `tolerance`. Returns the largest difference.
fn check_reduced(
    path: &Path,
    frame: u32,
    min: MinSize,
    reference: (usize, usize, Vec<i64>),
    tolerance: i64,
) -> i64 {
    let obj = OpenFileOptions::new().open_file(path).unwrap();
    let layout = layout(&obj);
    let raw = decode_frame_at(&obj, frame, &layout, &Limits::default(), Some(min))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (w, h, want) = reference;
    assert_eq!(
        (raw.width, raw.height),
        (w, h),
        "{}: decoded size for {min:?}",
        path.display()
    );
    let got = sample_values(
        &raw.data,
        raw.bits_allocated,
        layout.bits_stored,
        layout.signed,
    );
    assert_eq!(got.len(), want.len(), "{}: sample count", path.display());
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .max()
        .unwrap_or(0);
    assert!(
        worst <= tolerance,
        "{}: reduced decode differs from the reference by up to {worst} (tolerance {tolerance})",
        path.display()
    );
    worst
}

/// Runs a reference decoder on frame `frame`'s codestream (written to a file named with
/// `extension`) and reads its PGM (`samples` 1) or PPM (3) output.
fn reference_decode(
    s: &Scratch,
    path: &Path,
    frame: usize,
    samples: u16,
    (extension, tool, args): (&str, &str, &[&str]),
) -> (usize, usize, Vec<i64>) {
    let stem = path.file_stem().unwrap().to_str().unwrap();
    let input = s.path(&format!("{stem}_{frame}.{extension}"));
    std::fs::write(&input, codestream(path, frame)).unwrap();
    let pnm = if samples == 3 { "ppm" } else { "pgm" };
    let tag = args.join("").replace(['/', ',', '-'], "_");
    let output = s.path(&format!("{stem}_{frame}{tag}.{pnm}"));
    let (i, o) = (input.to_str().unwrap(), output.to_str().unwrap());
    let all: Vec<&str> = if tool == "djpeg" {
        [args, &["-pnm", "-outfile", o, i]].concat()
    } else {
        [&["-i", i, "-o", o][..], args].concat()
    };
    run(tool, &all);
    read_pnm(&output)
}

/// JPEG 2000 (gdcm's encoder) decoded 1 and 2 levels down equals OpenJPEG's own
/// `opj_decompress -r`: grey 12-bit in 16 bits, an odd size, colour with the reversible
/// colour transform, and the second frame of a multi-frame file.
#[test]
fn jpeg_2000_reduced_equals_opj_decompress() {
    let s = Scratch::new();
    let odd = Image::new("odd12", 299, 421, 1, 16, 12, false, "MONOCHROME2", 1, true);
    for img in [mono2_12(), odd, rgb8(), mono2_12_smooth()] {
        let out = s.convert(&img, "j2k", "gdcmconv", &["--j2k"]);
        let frame = img.frames - 1;
        for k in [1u32, 2] {
            let r = k.to_string();
            let reference = reference_decode(
                &s,
                &out,
                frame as usize,
                img.samples,
                ("j2k", "opj_decompress", &["-r", &r]),
            );
            check_reduced(&out, frame, min_for(&img, k), reference, 0);
        }
    }
}

/// A minimum below the coarsest level stops at it: a codestream with 3 resolution levels
/// (opj_compress -n 3) decodes at most 2 levels down, equal to `opj_decompress -r 2`; a
/// minimum above the frame decodes it whole.
#[test]
fn jpeg_2000_reduced_stops_at_the_coarsest_level() {
    let s = Scratch::new();
    let img = grey8_smooth();
    let pgm = s.path("grey8.pgm");
    let mut bytes = format!("P5\n{} {}\n255\n", img.columns, img.rows).into_bytes();
    bytes.extend(img.native_bytes(0..1));
    std::fs::write(&pgm, bytes).unwrap();
    let j2k = s.path("grey8.j2k");
    run(
        "opj_compress",
        &[
            "-i",
            pgm.to_str().unwrap(),
            "-o",
            j2k.to_str().unwrap(),
            "-n",
            "3",
        ],
    );
    let ts = "1.2.840.10008.1.2.4.90";
    let dcm = s.path("grey8_3levels.dcm");
    img.write_encapsulated(vec![std::fs::read(&j2k).unwrap()], ts, &dcm, img.header());
    let reference = reference_decode(&s, &dcm, 0, 1, ("j2k", "opj_decompress", &["-r", "2"]));
    let tiny = MinSize {
        width: 1,
        height: 1,
    };
    check_reduced(&dcm, 0, tiny, reference, 0);
    let whole = (img.columns as usize, img.rows as usize, img.values.clone());
    let above = MinSize {
        width: img.columns + 1,
        height: 1,
    };
    check_reduced(&dcm, 0, above, whole, 0);
}

/// HTJ2K (OpenJPH's encoder) decoded 1 and 2 levels down by OpenJPEG equals OpenJPH's
/// own reduced decode (`ojph_expand -skip_res`).
#[test]
fn htj2k_reduced_equals_ojph_expand() {
    let ts = "1.2.840.10008.1.2.4.201";
    let s = Scratch::new();
    let odd = Image::new("odd12", 299, 421, 1, 16, 12, false, "MONOCHROME2", 1, true);
    for img in [mono2_12(), odd] {
        let p = htj2k(&img, ts, &["-reversible", "true"], &s);
        for k in [1u32, 2] {
            let skip = format!("{k},{k}");
            let reference =
                reference_decode(&s, &p, 0, 1, ("j2c", "ojph_expand", &["-skip_res", &skip]));
            check_reduced(&p, 0, min_for(&img, k), reference, 0);
        }
    }
}

/// 8-bit JPEG (dcmtk's encoder, grey and YBR_FULL_422 colour) decoded at 1/2, 1/4 and
/// 1/8 equals libjpeg-turbo's `djpeg -scale`.
#[test]
fn jpeg_baseline_reduced_equals_djpeg_scale() {
    let s = Scratch::new();
    let odd = Image::new("odd8", 299, 421, 1, 8, 8, false, "MONOCHROME2", 1, true);
    for img in [grey8_smooth(), odd, rgb8_smooth()] {
        let out = s.convert(&img, "jpeg", "dcmcjpeg", &["+eb", "+q", "90"]);
        for k in [1u32, 2, 3] {
            let scale = format!("1/{}", 1 << k);
            let reference = reference_decode(
                &s,
                &out,
                0,
                img.samples,
                ("jpg", "djpeg", &["-scale", &scale]),
            );
            check_reduced(&out, 0, min_for(&img, k), reference, 0);
        }
    }
}

/// 12-bit JPEG has no reduced reference decoder here (Debian's djpeg is 8-bit only), so
/// its 1/8 decode is held to what the scaled inverse DCT computes: each output sample is
/// its 8x8 block's DC term, i.e. the block mean of the full decode before that decode
/// rounds and clamps each sample; the two agree within 1 (rounding) on this image, which
/// stays clear of the range's ends.
#[test]
fn jpeg_12bit_reduced_is_the_block_mean() {
    let s = Scratch::new();
    let img = mono2_12_smooth();
    let out = s.convert(&img, "jpeg", "dcmcjpeg", &["+ee", "+q", "95"]);
    let obj = OpenFileOptions::new().open_file(&out).unwrap();
    let layout = layout(&obj);
    let full = decode_frame(&obj, 0, &layout, &Limits::default()).unwrap();
    let full = sample_values(&full.data, full.bits_allocated, 12, false);
    let (w, h) = (img.columns as usize, img.rows as usize);
    let (bw, bh) = (w.div_ceil(8), h.div_ceil(8));
    // Blocks at the right and bottom edges are padded by the encoder: only whole ones count.
    let mut means = vec![0; bw * bh];
    for by in 0..bh {
        for bx in 0..bw {
            let mut sum = 0;
            for y in by * 8..(by * 8 + 8).min(h) {
                for x in bx * 8..(bx * 8 + 8).min(w) {
                    sum += full[y * w + x];
                }
            }
            let n = ((by * 8 + 8).min(h) - by * 8) * ((bx * 8 + 8).min(w) - bx * 8);
            means[by * bw + bx] = if n == 64 {
                (sum + 32).div_euclid(64)
            } else {
                -1
            };
        }
    }
    let raw =
        decode_frame_at(&obj, 0, &layout, &Limits::default(), Some(min_for(&img, 3))).unwrap();
    assert_eq!((raw.width, raw.height), (bw, bh));
    let got = sample_values(&raw.data, raw.bits_allocated, 12, false);
    let worst = got
        .iter()
        .zip(&means)
        .filter(|(_, m)| **m >= 0)
        .map(|(g, m)| (g - m).abs())
        .max()
        .unwrap();
    assert!(
        worst <= 1,
        "1/8 decode differs from the block means by {worst}"
    );
}

/// Syntaxes without a reduced decode (lossless JPEG, JPEG-LS, RLE, native) decode whole
/// whatever the minimum.
#[test]
fn other_syntaxes_ignore_the_minimum() {
    let s = Scratch::new();
    let img = mono2_12();
    for (tool, args) in [
        ("dcmcjpeg", &["+e1"][..]),
        ("dcmcjpls", &["+el"][..]),
        ("dcmcrle", &[][..]),
        ("dcmconv", &["+te"][..]),
    ] {
        let out = s.convert(&img, tool, tool, args);
        let whole = (img.columns as usize, img.rows as usize, img.values.clone());
        check_reduced(&out, 0, min_for(&img, 2), whole, 0);
    }
}

/// Broken codestreams on the reduced path are refused like on the full one: truncated
/// JPEG 2000 and JPEG, and a JPEG 2000 codestream whose size contradicts the header.
#[test]
fn reduced_decode_refuses_broken_codestreams() {
    let s = Scratch::new();
    let img = mono2_12();
    let j2k = s.convert(&img, "j2k", "gdcmconv", &["--j2k"]);
    let jpeg = s.convert(&grey8_smooth(), "jpeg", "dcmcjpeg", &["+eb"]);
    let ts_j2k = "1.2.840.10008.1.2.4.90";
    let full = codestream(&j2k, 0);
    let cut = s.path("cut_j2k.dcm");
    img.write_encapsulated(
        vec![full[..full.len() / 2].to_vec()],
        ts_j2k,
        &cut,
        img.header(),
    );
    let jpeg_stream = codestream(&jpeg, 0);
    let cut_jpeg = s.path("cut_jpeg.dcm");
    let g = grey8_smooth();
    g.write_encapsulated(
        vec![jpeg_stream[..jpeg_stream.len() / 2].to_vec()],
        "1.2.840.10008.1.2.4.50",
        &cut_jpeg,
        g.header(),
    );
    let mut taller = img.clone();
    taller.rows += 8;
    let lying = s.path("lying_j2k.dcm");
    taller.write_encapsulated(vec![full.clone()], ts_j2k, &lying, taller.header());
    for (path, min) in [
        (&cut, min_for(&img, 1)),
        (&cut_jpeg, min_for(&g, 1)),
        (&lying, min_for(&img, 1)),
    ] {
        let obj = OpenFileOptions::new().open_file(path).unwrap();
        let err = decode_frame_at(&obj, 0, &layout(&obj), &Limits::default(), Some(min))
            .expect_err("a broken codestream must not decode");
        assert!(
            matches!(err, fptserve::decode::DecodeError::Invalid(_)),
            "{}: {err:?}",
            path.display()
        );
    }
}

// --- refusals ---

#[test]
fn unsupported_syntax_names_its_uid() {
    let s = Scratch::new();
    let img = grey8_smooth();
    let p = s.path("jpegxl.dcm");
    img.write_encapsulated(
        vec![vec![0xFF, 0x0A, 0, 0]],
        "1.2.840.10008.1.2.4.110",
        &p,
        img.header(),
    );
    let obj = OpenFileOptions::new().open_file(&p).unwrap();
    let err = decode_frame(&obj, 0, &layout(&obj), &Limits::default()).unwrap_err();
    assert!(
        matches!(err, fptserve::decode::DecodeError::Unsupported(_))
            && err.to_string().contains("1.2.840.10008.1.2.4.110"),
        "{err}"
    );
}

#[test]
fn truncated_streams_are_invalid_not_panics() {
    let s = Scratch::new();
    let img = mono2_12();
    let cases: [(&str, &[&str], &str); 4] = [
        ("dcmcjpeg", &["+e1"], "jpeg"),
        ("dcmcjpls", &["+el"], "jpls"),
        ("gdcmconv", &["--j2k"], "j2k"),
        ("dcmcrle", &[], "rle"),
    ];
    for (tool, args, tag) in cases {
        let out = s.convert(&img, tag, tool, args);
        let obj = OpenFileOptions::new().open_file(&out).unwrap();
        let ts = obj
            .meta()
            .transfer_syntax()
            .trim_end_matches('\0')
            .to_string();
        let header = {
            let mut h = img.header();
            h.remove_element(tags::PIXEL_DATA);
            h
        };
        let value = obj.element(tags::PIXEL_DATA).unwrap().value();
        let fragment: Vec<u8> = value.fragments().unwrap().concat();
        for keep in [fragment.len() / 2, 100, 10] {
            let p = s.path(&format!("trunc_{tag}_{keep}.dcm"));
            img.write_encapsulated(vec![fragment[..keep].to_vec()], &ts, &p, header.clone());
            let obj = OpenFileOptions::new().open_file(&p).unwrap();
            let err = decode_frame(&obj, 0, &layout(&obj), &Limits::default())
                .expect_err(&format!("{tag} truncated to {keep} bytes decoded"));
            assert!(
                matches!(err, fptserve::decode::DecodeError::Invalid(_)),
                "{tag} truncated to {keep}: {err:?}"
            );
        }
    }
}

#[test]
fn codestream_that_contradicts_the_header_is_refused() {
    let s = Scratch::new();
    let img = mono2_12();
    let out = s.convert(&img, "j2k", "gdcmconv", &["--j2k"]);
    let obj = OpenFileOptions::new().open_file(&out).unwrap();
    let mut layout = layout(&obj);
    layout.rows += 1;
    let err = decode_frame(&obj, 0, &layout, &Limits::default()).unwrap_err();
    assert!(
        err.to_string().contains("360 x 480") && err.to_string().contains("360 x 481"),
        "{err}"
    );
}

// --- regressions found by the pydicom parity run (tools/dicom_parity.py) ---

/// A one-frame native file of `values` with the given Pixel Data VR and value, written in
/// transfer syntax `ts`.
fn write_native_value(
    img: &Image,
    vr: VR,
    value: PrimitiveValue,
    ts: &str,
    path: &Path,
) -> dicom_object::DefaultDicomObject {
    let mut obj = img.header();
    obj.put(DataElement::new(tags::PIXEL_DATA, vr, value));
    write(obj, ts, path);
    OpenFileOptions::new().open_file(path).unwrap()
}

/// Samples whose bytes all differ, so any byte order mix-up shows (pydicom's own 16- and
/// 32-bit big-endian test files, 0x8080 and 0xC0C0C0C0, cannot tell).
fn asymmetric(n: usize, bits: u16) -> Vec<i64> {
    (0..n as u64)
        .map(|i| (hash(i) & ((1u64 << bits) - 1)) as i64)
        .collect()
}

#[test]
fn explicit_vr_big_endian_samples_whatever_the_vr() {
    // rtdose_expb.dcm: 32-bit samples in OW came out with their two 16-bit words swapped
    // (1249000 = 0x00130EE8 read as 0x0EE80013).
    const BE: &str = "1.2.840.10008.1.2.2";
    let s = Scratch::new();
    let (rows, columns) = (5u32, 6u32);
    let n = (rows * columns) as usize;
    for (bits, vr) in [
        (32u16, VR::OW),
        (32, VR::OB),
        (32, VR::OL),
        (16, VR::OW),
        (16, VR::OB),
        (16, VR::OL),
        (8, VR::OB),
        (8, VR::OW),
    ] {
        let mut img = Image::new(
            "be",
            rows,
            columns,
            1,
            bits,
            bits,
            false,
            "MONOCHROME2",
            1,
            false,
        );
        img.values = asymmetric(n, bits);
        // The file's bytes: each sample big endian; 8-bit data in OW is packed into 16-bit
        // words, so the bytes of each word are swapped (PS3.5 annex D, and pydicom).
        let mut stored: Vec<u8> = img
            .values
            .iter()
            .flat_map(|&v| (v as u32).to_be_bytes()[4 - usize::from(bits / 8)..].to_vec())
            .collect();
        if !stored.len().is_multiple_of(4) {
            stored.resize(stored.len().next_multiple_of(4), 0);
        }
        if bits == 8 && vr == VR::OW {
            for w in stored.chunks_exact_mut(2) {
                w.swap(0, 1);
            }
        }
        // The value as dicom-object holds it after parsing: OW u16 and OL u32 values read
        // big endian from those bytes, OB the bytes themselves.
        let value = match vr {
            VR::OW => PrimitiveValue::U16(
                stored
                    .chunks_exact(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect(),
            ),
            VR::OL => PrimitiveValue::U32(
                stored
                    .chunks_exact(4)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            _ => PrimitiveValue::U8(stored.into()),
        };
        let p = s.path(&format!("be_{bits}_{vr:?}.dcm"));
        let obj = write_native_value(&img, vr, value, BE, &p);
        let raw = decode_frame(&obj, 0, &layout(&obj), &Limits::default())
            .unwrap_or_else(|e| panic!("{bits}-bit {vr:?}: {e}"));
        let got = sample_values(&raw.data, raw.bits_allocated, bits, false);
        assert_eq!(got, img.values, "{bits}-bit samples in {vr:?}, big endian");
    }
}

#[test]
fn native_ybr_full_422_is_returned_subsampled() {
    // SC_ybr_full_422_uncompressed.dcm was refused for holding 2 samples per pixel.
    let s = Scratch::new();
    let (rows, columns) = (4u32, 6u32);
    let pixels = (rows * columns) as usize;
    for frames in [1u32, 3] {
        let img = Image::new(
            "ybr422",
            rows,
            columns,
            3,
            8,
            8,
            false,
            "YBR_FULL_422",
            frames,
            false,
        );
        // Y0 Y1 Cb Cr per pair of pixels: rows x columns x 2 bytes a frame.
        let stored: Vec<u8> = (0..pixels * 2 * frames as usize)
            .map(|i| hash(i as u64) as u8)
            .collect();
        let p = s.path(&format!("ybr422_{frames}.dcm"));
        let obj = write_native_value(
            &img,
            VR::OB,
            PrimitiveValue::U8(stored.clone().into()),
            EXPLICIT_LE,
            &p,
        );
        let layout = layout(&obj);
        for f in 0..frames {
            let raw = decode_frame(&obj, f, &layout, &Limits::default()).unwrap();
            assert_eq!(raw.photometric, "YBR_FULL_422");
            assert_eq!(raw.bits_allocated, 8);
            let size = pixels * 2;
            assert_eq!(raw.data, stored[f as usize * size..(f as usize + 1) * size]);
        }
        // The pixel pipeline expands it to three samples a pixel.
        let raw = decode_frame(&obj, 0, &layout, &Limits::default()).unwrap();
        let values = fptserve::decode::photometric::stored_values(&raw, &layout).unwrap();
        assert_eq!(values.len(), pixels * 3);
        assert_eq!(
            &values[..6],
            &[0, 2, 3, 1, 2, 3].map(|k| i32::from(stored[k]))[..]
        );
    }
    // A value the full three samples a pixel long means the header is wrong: refused, not
    // guessed (pydicom refuses it too).
    let img = Image::new(
        "ybr422_full",
        rows,
        columns,
        3,
        8,
        8,
        false,
        "YBR_FULL_422",
        1,
        false,
    );
    let p = s.path("ybr422_full.dcm");
    let obj = write_native_value(
        &img,
        VR::OB,
        PrimitiveValue::U8(vec![0u8; pixels * 3].into()),
        EXPLICIT_LE,
        &p,
    );
    let err = decode_frame(&obj, 0, &layout(&obj), &Limits::default()).unwrap_err();
    assert!(
        matches!(err, fptserve::decode::DecodeError::Invalid(_))
            && err.to_string().contains("YBR_FULL_422"),
        "{err}"
    );
    // Encapsulated uncompressed is not subsampled (only native is, PS3.5 8.2).
    let img = Image::new(
        "ybr422_encap",
        rows,
        columns,
        3,
        8,
        8,
        false,
        "YBR_FULL_422",
        1,
        false,
    );
    let p = s.path("ybr422_encap.dcm");
    img.write_encapsulated(
        vec![img.native_bytes(0..1)],
        "1.2.840.10008.1.2.1.98",
        &p,
        img.header(),
    );
    check(&p, &img, "1.2.840.10008.1.2.1.98", 0, "YBR_FULL_422");
}

/// `name` from pydicom's or pydicom-data's test files and its pixels as pydicom decodes
/// them (`pixel_array`: YBR converted to RGB), frame after frame, through the project's
/// virtual environment. A missing environment fails the test, as a missing encoder does.
fn pydicom_reference(name: &str) -> (PathBuf, Vec<i64>) {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let script = r#"
import sys, numpy as np, pydicom, pydicom.data
path = pydicom.data.get_testdata_file(sys.argv[1])
arr = pydicom.dcmread(path).pixel_array.astype("<i8")
sys.stdout.write(path + "\n")
sys.stdout.flush()
sys.stdout.buffer.write(arr.tobytes())
"#;
    let out = Command::new(&python)
        .args(["-c", script, name])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): create it with tests/python/requirements.txt",
                python.display()
            )
        });
    assert!(
        out.status.success(),
        "pydicom could not decode {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nl = out.stdout.iter().position(|&b| b == b'\n').unwrap();
    let path = PathBuf::from(String::from_utf8(out.stdout[..nl].to_vec()).unwrap());
    let values = out.stdout[nl + 1..]
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (path, values)
}

/// Decodes every frame of pydicom's test file `name` and requires pydicom's pixels exactly.
fn check_against_pydicom(name: &str, photometric: &str) {
    let (path, want) = pydicom_reference(name);
    let obj = OpenFileOptions::new().open_file(&path).unwrap();
    let layout = layout(&obj);
    let n = (layout.rows * layout.columns * u32::from(layout.samples_per_pixel)) as usize;
    assert_eq!(
        want.len(),
        n * layout.frames as usize,
        "{name}: pydicom's size"
    );
    for f in 0..layout.frames {
        let raw = decode_frame(&obj, f, &layout, &Limits::default())
            .unwrap_or_else(|e| panic!("{name} frame {f}: {e}"));
        assert_eq!(raw.photometric, photometric, "{name}: photometric");
        let got = sample_values(
            &raw.data,
            raw.bits_allocated,
            layout.bits_stored,
            layout.signed,
        );
        let want = &want[f as usize * n..(f as usize + 1) * n];
        let bad = got.iter().zip(want).filter(|(g, w)| g != w).count();
        let worst = got
            .iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs())
            .max()
            .unwrap_or(0);
        assert_eq!(
            bad, 0,
            "{name} frame {f}: {bad} of {n} samples differ from pydicom, by up to {worst}"
        );
    }
}

#[test]
fn big_endian_32bit_in_ow_matches_pydicom() {
    check_against_pydicom("rtdose_expb_1frame.dcm", "MONOCHROME2");
    check_against_pydicom("rtdose_expb.dcm", "MONOCHROME2");
}

#[test]
fn jpeg_rgb_without_jfif_or_adobe_marker_is_not_colour_converted() {
    // Component IDs 0, 1, 2 and no JFIF/APP14 marker: libjpeg guesses YCbCr, but the DICOM
    // header says RGB, and GDCM, pylibjpeg and Pillow decode it as RGB.
    check_against_pydicom("SC_jpeg_no_color_transform.dcm", "RGB");
    // The same stream with an Adobe marker (transform 0) already decoded right.
    check_against_pydicom("SC_jpeg_no_color_transform_2.dcm", "RGB");
    // A stream whose JFIF marker says YCbCr is still converted when the header (wrongly)
    // says RGB: the stream's own marker wins, as in libjpeg.
    let name = "SC_rgb_dcmtk_+eb+cy+np.dcm";
    let (path, want) = pydicom_reference(name);
    let mut obj = OpenFileOptions::new().open_file(&path).unwrap();
    obj.put(DataElement::new(
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        PrimitiveValue::from("RGB"),
    ));
    let s = Scratch::new();
    let relabelled = s.path("jfif_labelled_rgb.dcm");
    obj.write_to_file(&relabelled).unwrap();
    let obj = OpenFileOptions::new().open_file(&relabelled).unwrap();
    let layout = layout(&obj);
    assert_eq!(layout.photometric, "RGB");
    let raw = decode_frame(&obj, 0, &layout, &Limits::default()).unwrap();
    let got = sample_values(&raw.data, 8, 8, false);
    assert_eq!(got, want, "{name} relabelled RGB");
}

#[test]
fn jpeg_2000_with_one_tile_part_too_few_in_tnsot_is_lossless() {
    // GDCM wrote TNsot 5 for the 6 tile-parts (quality layers) of every tile; with the
    // TNsot correction off, OpenJPEG dropped each tile's last layer (errors up to 108).
    check_against_pydicom("GDCMJ2K_TextGBR.dcm", "RGB");
}
