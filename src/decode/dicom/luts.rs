//! The pixel pipeline's tables, read from the data set: the modality LUT (or rescale), the
//! file's VOI (LUTs and windows, per frame for enhanced objects) and palette colour tables
//! (plain or segmented).

use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use super::attributes::{element, floats, string};
use crate::decode::DecodeError;
use crate::decode::voi::{FileVoi, Lut, ModalityLut, VoiFunction, Window};

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

pub(super) fn modality_lut(obj: &InMemDicomObject, frame: u32) -> Result<ModalityLut, DecodeError> {
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

pub(super) fn file_voi(obj: &InMemDicomObject, frame: u32) -> Result<FileVoi, DecodeError> {
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

pub(super) fn palette(obj: &InMemDicomObject) -> Result<[Lut; 3], DecodeError> {
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
