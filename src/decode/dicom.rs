//! DICOM Part 10 input: parsing, the header's frame layout checked against the limits,
//! the frame decoded by [`super::codec`], then samples and the attributes of the pixel
//! pipeline (modality LUT, VOI, palette) gathered for [`super::voi`].

use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::file::ReadPreamble;
use dicom_object::mem::InMemElement;
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::codec::{self, FrameLayout};
use super::photometric;
use super::voi::{FileVoi, Lut, ModalityLut, VoiFunction, Window};
use super::{DecodeError, Decoded, DicomIdentifiers, InputInfo, Limits, Pixels, check_size};

/// One decoded frame.
#[derive(Debug)]
pub struct Frame {
    /// Columns.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// Grey values with their pipeline, or colour.
    pub samples: Samples,
    /// The photometric interpretation of `samples` (colour spaces already converted).
    pub photometric: String,
    /// Bits Stored of the header.
    pub bits_stored: u16,
    /// Bits Allocated of the header.
    pub bits_allocated: u16,
}

/// The samples of a frame.
#[derive(Debug)]
pub enum Samples {
    /// MONOCHROME1/2: stored values plus what turns them into display values.
    Grey(GreyFrame),
    /// Colour, as RGB or palette indices.
    Colour(ColourFrame),
}

/// A monochrome frame's stored values and the attributes of its pixel pipeline.
#[derive(Debug)]
pub struct GreyFrame {
    /// Stored values, masked to Bits Stored and sign-extended.
    pub stored: Vec<i32>,
    /// Bits Stored.
    pub bits_stored: u16,
    /// Pixel Representation is signed.
    pub signed: bool,
    /// Modality LUT.
    pub modality: ModalityLut,
    /// The file's VOI.
    pub voi: FileVoi,
    /// MONOCHROME1: high values are dark; inverted after VOI.
    pub monochrome1: bool,
}

impl GreyFrame {
    /// A stored value as a number: 32-bit unsigned samples fill the i32 bit pattern.
    pub fn value(&self, stored: i32) -> i64 {
        if !self.signed && self.bits_stored == 32 {
            i64::from(stored as u32)
        } else {
            i64::from(stored)
        }
    }
}

/// A colour frame.
#[derive(Debug)]
pub enum ColourFrame {
    /// Interleaved R, G, B samples (YBR already converted).
    Rgb {
        /// `3 * width * height` samples.
        samples: Vec<i32>,
        /// Bits Stored.
        bits_stored: u16,
    },
    /// PALETTE COLOR: indices and the three tables.
    Palette {
        /// One index per pixel.
        indices: Vec<i32>,
        /// Red table.
        red: Lut,
        /// Green table.
        green: Lut,
        /// Blue table.
        blue: Lut,
    },
}

fn element(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Option<&InMemElement> {
    obj.element_opt(tag).ok().flatten()
}

fn string(obj: &InMemDicomObject, tag: dicom_core::Tag) -> String {
    element(obj, tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_matches(['\0', ' ']).to_string())
        .unwrap_or_default()
}

/// An unsigned integer attribute: absent is `Ok(None)`; present but not a number is an
/// error naming it (a wrong frame count must not silently become 1).
fn uint(
    obj: &InMemDicomObject,
    tag: dicom_core::Tag,
    name: &str,
) -> Result<Option<u32>, DecodeError> {
    match element(obj, tag) {
        None => Ok(None),
        Some(e) if dicom_core::header::HasLength::is_empty(e) => Ok(None),
        Some(e) => e.to_int::<u32>().map(Some).map_err(|_| {
            DecodeError::Invalid(format!(
                "{name} ({:04X},{:04X}) is not a valid unsigned integer",
                tag.group(),
                tag.element()
            ))
        }),
    }
}

fn floats(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Vec<f64> {
    element(obj, tag)
        .and_then(|e| e.to_multi_float64().ok())
        .unwrap_or_default()
}

/// How a LUT's data element is laid out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LutData {
    /// One word per entry.
    Plain,
    /// Segmented Palette Color LUT Data (PS3.3 C.7.9.2).
    Segmented,
}

/// Reads a LUT from its descriptor and data elements (PS3.3 C.11.1.1.1): entries (0 means
/// 65536), first mapped value (signed when the descriptor is SS), bits per entry.
fn lut(
    item: &InMemDicomObject,
    descriptor: dicom_core::Tag,
    data: dicom_core::Tag,
    name: &str,
    layout: LutData,
) -> Result<Lut, DecodeError> {
    let invalid = |what: &str| DecodeError::Invalid(format!("{name}: {what}"));
    let d = element(item, descriptor)
        .and_then(|e| e.to_multi_int::<i64>().ok())
        .filter(|d| d.len() == 3)
        .ok_or_else(|| invalid("LUT Descriptor must hold 3 numbers"))?;
    let entries = if d[0] == 0 { 65536 } else { d[0] as usize };
    // A US first-mapped value above 32767 in a signed image is a negative number stored
    // unsigned; readers disagree, so accept it as written.
    let first_mapped = d[1];
    let bits = u16::try_from(d[2])
        .ok()
        .filter(|b| (1..=16).contains(b))
        .ok_or_else(|| invalid("LUT bits must be 1..=16"))?;
    let values = element(item, data)
        .and_then(|e| e.to_multi_int::<u32>().ok())
        .ok_or_else(|| invalid("LUT Data missing or unreadable"))?;
    let data = match layout {
        LutData::Plain => values,
        LutData::Segmented => {
            let mut out = Vec::with_capacity(entries);
            expand_segments(&values, 0, None, &mut out, entries, 0).map_err(|e| invalid(&e))?;
            out
        }
    };
    if data.len() < entries {
        return Err(invalid(&format!(
            "LUT Data holds {} entries, the descriptor says {entries}",
            data.len()
        )));
    }
    Ok(Lut {
        first_mapped,
        bits,
        data: data[..entries].to_vec(),
    })
}

/// The first item of `sequence` in this frame's functional groups (Enhanced multi-frame
/// objects): the Per-frame Functional Groups item of the frame first, then the Shared one.
fn functional_item(
    obj: &InMemDicomObject,
    frame: u32,
    sequence: dicom_core::Tag,
) -> Option<&InMemDicomObject> {
    let per_frame = element(obj, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
        .and_then(|e| e.items())
        .and_then(|items| items.get(frame as usize));
    let shared = element(obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE)
        .and_then(|e| e.items())
        .and_then(|items| items.first());
    [per_frame, shared].into_iter().flatten().find_map(|group| {
        element(group, sequence)
            .and_then(|e| e.items())
            .and_then(|items| items.first())
    })
}

fn modality_lut(obj: &InMemDicomObject, frame: u32) -> Result<ModalityLut, DecodeError> {
    if let Some(item) = element(obj, tags::MODALITY_LUT_SEQUENCE)
        .and_then(|e| e.items())
        .and_then(|items| items.first())
    {
        return Ok(ModalityLut::Table(lut(
            item,
            tags::LUT_DESCRIPTOR,
            tags::LUT_DATA,
            "Modality LUT Sequence",
            LutData::Plain,
        )?));
    }
    // Enhanced objects keep rescale in the Pixel Value Transformation functional group.
    let source =
        functional_item(obj, frame, tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE).unwrap_or(obj);
    let slope = floats(source, tags::RESCALE_SLOPE)
        .first()
        .copied()
        .unwrap_or(1.0);
    let intercept = floats(source, tags::RESCALE_INTERCEPT)
        .first()
        .copied()
        .unwrap_or(0.0);
    if !slope.is_finite() || !intercept.is_finite() {
        return Err(DecodeError::Invalid(format!(
            "Rescale Slope/Intercept must be finite numbers ({slope}, {intercept})"
        )));
    }
    Ok(ModalityLut::Rescale { slope, intercept })
}

fn file_voi(obj: &InMemDicomObject, frame: u32) -> Result<FileVoi, DecodeError> {
    let mut luts = Vec::new();
    if let Some(items) = element(obj, tags::VOILUT_SEQUENCE).and_then(|e| e.items()) {
        for item in items {
            luts.push(lut(
                item,
                tags::LUT_DESCRIPTOR,
                tags::LUT_DATA,
                "VOI LUT Sequence",
                LutData::Plain,
            )?);
        }
    }
    // Enhanced objects keep windows in the Frame VOI LUT functional group.
    let source = functional_item(obj, frame, tags::FRAME_VOILUT_SEQUENCE).unwrap_or(obj);
    let mut function_text = string(source, tags::VOILUT_FUNCTION);
    if function_text.is_empty() {
        function_text = string(obj, tags::VOILUT_FUNCTION);
    }
    let function = VoiFunction::parse(&function_text).ok_or_else(|| {
        DecodeError::Unsupported(format!(
            "VOI LUT Function {function_text:?} is not supported"
        ))
    })?;
    let windows = floats(source, tags::WINDOW_CENTER)
        .into_iter()
        .zip(floats(source, tags::WINDOW_WIDTH))
        .filter(|(c, w)| c.is_finite() && w.is_finite() && *w > 0.0)
        .map(|(center, width)| Window {
            center,
            width,
            function,
        })
        .collect();
    Ok(FileVoi { luts, windows })
}

/// Words a segment occupies (opcode, length, payload), if it fits in `words`.
fn segment_len(words: &[u32], at: usize) -> Option<usize> {
    let len = match *words.get(at)? {
        0 => 2 + *words.get(at + 1)? as usize,
        1 => 3,
        2 => 4,
        _ => return None,
    };
    (at + len <= words.len()).then_some(len)
}

/// Expands `count` segments of Segmented Palette Color LUT Data (PS3.3 C.7.9.2) starting at
/// word `at` (all of them when `count` is None): discrete (opcode 0), linear from the last
/// value (1), and indirect (2: copies segments found at a byte offset from the start).
fn expand_segments(
    words: &[u32],
    mut at: usize,
    count: Option<usize>,
    out: &mut Vec<u32>,
    limit: usize,
    depth: u32,
) -> Result<(), String> {
    let mut done = 0;
    while at < words.len() && count.is_none_or(|c| done < c) {
        let len = segment_len(words, at).ok_or("a segment is malformed or runs past the data")?;
        let n = words[at + 1] as usize;
        match words[at] {
            0 => out.extend_from_slice(&words[at + 2..at + 2 + n]),
            1 => {
                let y0 = f64::from(*out.last().ok_or("a linear segment comes first")?);
                let y1 = f64::from(words[at + 2]);
                out.extend((1..=n).map(|i| (y0 + (y1 - y0) * i as f64 / n as f64).round() as u32));
            }
            _ => {
                if depth > 0 {
                    return Err("an indirect segment points at another indirect segment".into());
                }
                let offset = (words[at + 2] | (words[at + 3] << 16)) as usize / 2;
                expand_segments(words, offset, Some(n), out, limit, depth + 1)?;
            }
        }
        if out.len() > limit {
            return Err("segments expand past the descriptor's entries".into());
        }
        at += len;
        done += 1;
    }
    Ok(())
}

fn palette(obj: &InMemDicomObject) -> Result<[Lut; 3], DecodeError> {
    let segmented = element(obj, tags::SEGMENTED_RED_PALETTE_COLOR_LOOKUP_TABLE_DATA).is_some();
    let (layout, [red, green, blue]) = if segmented {
        (
            LutData::Segmented,
            [
                tags::SEGMENTED_RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
                tags::SEGMENTED_GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA,
                tags::SEGMENTED_BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            ],
        )
    } else {
        (
            LutData::Plain,
            [
                tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
                tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA,
                tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            ],
        )
    };
    Ok([
        lut(
            obj,
            tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            red,
            "Red Palette Color LUT",
            layout,
        )?,
        lut(
            obj,
            tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            green,
            "Green Palette Color LUT",
            layout,
        )?,
        lut(
            obj,
            tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            blue,
            "Blue Palette Color LUT",
            layout,
        )?,
    ])
}

/// Saturates a header number into u16 (out-of-range values then fail validation).
fn small(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}

/// The header's description of a frame, validated.
pub fn layout(obj: &DefaultDicomObject) -> Result<FrameLayout, DecodeError> {
    let rows = uint(obj, tags::ROWS, "Rows")?.unwrap_or(0);
    let columns = uint(obj, tags::COLUMNS, "Columns")?.unwrap_or(0);
    let samples_per_pixel =
        small(uint(obj, tags::SAMPLES_PER_PIXEL, "Samples per Pixel")?.unwrap_or(1));
    let bits_allocated = small(uint(obj, tags::BITS_ALLOCATED, "Bits Allocated")?.unwrap_or(0));
    let bits_stored =
        small(uint(obj, tags::BITS_STORED, "Bits Stored")?.unwrap_or(u32::from(bits_allocated)));
    let photometric = string(obj, tags::PHOTOMETRIC_INTERPRETATION);
    let layout = FrameLayout {
        rows,
        columns,
        samples_per_pixel,
        bits_allocated,
        bits_stored,
        signed: uint(obj, tags::PIXEL_REPRESENTATION, "Pixel Representation")? == Some(1),
        planar_configuration: small(
            uint(obj, tags::PLANAR_CONFIGURATION, "Planar Configuration")?.unwrap_or(0),
        ),
        frames: uint(obj, tags::NUMBER_OF_FRAMES, "Number of Frames")?
            .unwrap_or(1)
            .max(1),
        photometric,
    };
    if !matches!(layout.bits_allocated, 1 | 8 | 16 | 32) {
        return Err(DecodeError::Unsupported(format!(
            "Bits Allocated {} is not supported (1, 8, 16 or 32)",
            layout.bits_allocated
        )));
    }
    if layout.bits_stored == 0 || layout.bits_stored > layout.bits_allocated {
        return Err(DecodeError::Invalid(format!(
            "Bits Stored {} must be within 1..={} (Bits Allocated)",
            layout.bits_stored, layout.bits_allocated
        )));
    }
    if !matches!(layout.samples_per_pixel, 1 | 3) {
        return Err(DecodeError::Unsupported(format!(
            "Samples per Pixel {} is not supported (1 or 3)",
            layout.samples_per_pixel
        )));
    }
    let expected_samples = match layout.photometric.as_str() {
        "MONOCHROME1" | "MONOCHROME2" | "PALETTE COLOR" => 1,
        "RGB" | "YBR_FULL" | "YBR_FULL_422" | "YBR_ICT" | "YBR_RCT" | "YBR_PARTIAL_420" => 3,
        "" => {
            return Err(DecodeError::Invalid(
                "Photometric Interpretation (0028,0004) is missing".into(),
            ));
        }
        other => {
            return Err(DecodeError::Unsupported(format!(
                "photometric interpretation {other} is not supported"
            )));
        }
    };
    if layout.samples_per_pixel != expected_samples {
        return Err(DecodeError::Invalid(format!(
            "{} needs {expected_samples} sample(s) per pixel, the header says {}",
            layout.photometric, layout.samples_per_pixel
        )));
    }
    Ok(layout)
}

/// Parses a DICOM Part 10 file (with or without its 128-byte preamble).
pub fn parse(bytes: &[u8]) -> Result<DefaultDicomObject, DecodeError> {
    let body = part10_body(bytes)?;
    super::scan::check_lengths(body)?;
    OpenFileOptions::new()
        .read_preamble(ReadPreamble::Never)
        .from_reader(body)
        .map_err(|e| DecodeError::Invalid(format!("cannot parse DICOM: {e}")))
}

/// Parses a DICOM Part 10 file's header: every attribute before the pixel data.
pub fn parse_header(bytes: &[u8]) -> Result<InMemDicomObject, DecodeError> {
    let body = part10_body(bytes)?;
    super::scan::check_lengths(body)?;
    OpenFileOptions::new()
        .read_preamble(ReadPreamble::Never)
        .read_until(tags::PIXEL_DATA)
        .from_reader(body)
        .map(|file| file.into_inner())
        .map_err(|e| DecodeError::Invalid(format!("cannot parse DICOM: {e}")))
}

/// The file after its preamble: from "DICM" on.
fn part10_body(bytes: &[u8]) -> Result<&[u8], DecodeError> {
    if bytes.len() >= 132 && &bytes[128..132] == b"DICM" {
        Ok(&bytes[128..])
    } else if bytes.starts_with(b"DICM") {
        Ok(bytes)
    } else {
        Err(DecodeError::Invalid(
            "not a DICOM Part 10 file: no \"DICM\" prefix at byte 0 or 128".into(),
        ))
    }
}

/// Reads the file and decodes frame `frame`.
pub fn decode(bytes: &[u8], frame: u32, limits: &Limits) -> Result<Decoded, DecodeError> {
    let obj = parse(bytes)?;
    let ts_uid = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches(['\0', ' '])
        .to_string();
    let ids = DicomIdentifiers {
        study_instance_uid: string(&obj, tags::STUDY_INSTANCE_UID),
        series_instance_uid: string(&obj, tags::SERIES_INSTANCE_UID),
        sop_instance_uid: string(&obj, tags::SOP_INSTANCE_UID),
        sop_class_uid: string(&obj, tags::SOP_CLASS_UID),
        transfer_syntax_uid: ts_uid.clone(),
    };
    if TransferSyntaxRegistry.get(&ts_uid).is_none() {
        return Err(DecodeError::Unsupported(format!(
            "unknown transfer syntax {ts_uid}"
        )));
    }
    if element(&obj, tags::PIXEL_DATA).is_none() {
        return Err(DecodeError::Invalid(
            "DICOM file has no Pixel Data (7FE0,0010)".into(),
        ));
    }

    // Limits, from the header, before any pixel is decoded.
    let layout = layout(&obj)?;
    check_size(
        limits,
        u64::from(layout.columns),
        u64::from(layout.rows),
        u64::from(layout.samples_per_pixel) * u64::from(layout.bits_allocated.div_ceil(8)),
    )?;
    if layout.frames > limits.max_frames {
        return Err(DecodeError::TooLarge(format!(
            "DICOM has {} frames, over the limit of {}",
            layout.frames, limits.max_frames
        )));
    }
    if frame >= layout.frames {
        return Err(DecodeError::FrameOutOfRange {
            frame,
            frames: layout.frames,
        });
    }

    let raw = codec::decode_frame(&obj, frame, &layout, limits)?;
    let stored = photometric::stored_values(&raw, &layout)?;
    let (samples, photometric) = match raw.photometric.as_str() {
        "MONOCHROME1" | "MONOCHROME2" => (
            Samples::Grey(GreyFrame {
                stored,
                bits_stored: layout.bits_stored,
                signed: layout.signed,
                modality: modality_lut(&obj, frame)?,
                voi: file_voi(&obj, frame)?,
                monochrome1: raw.photometric == "MONOCHROME1",
            }),
            raw.photometric.clone(),
        ),
        "PALETTE COLOR" => {
            let [red, green, blue] = palette(&obj)?;
            (
                Samples::Colour(ColourFrame::Palette {
                    indices: stored,
                    red,
                    green,
                    blue,
                }),
                raw.photometric.clone(),
            )
        }
        other => (
            Samples::Colour(ColourFrame::Rgb {
                samples: photometric::to_rgb(stored, other, &layout)?,
                bits_stored: layout.bits_stored,
            }),
            "RGB".to_string(),
        ),
    };
    Ok(Decoded {
        info: InputInfo {
            width: layout.columns,
            height: layout.rows,
            frames: layout.frames,
            frame,
            format: "dicom".into(),
            color: layout.photometric.clone(),
        },
        pixels: Pixels::Dicom(Frame {
            width: layout.columns,
            height: layout.rows,
            samples,
            photometric,
            bits_stored: layout.bits_stored,
            bits_allocated: layout.bits_allocated,
        }),
        dicom: Some(ids),
    })
}
