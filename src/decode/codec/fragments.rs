//! Which fragments of an encapsulated Pixel Data element make up one frame.
//!
//! In order of trust: the Extended Offset Table, the Basic Offset Table, one fragment per
//! frame, all fragments for a single frame, and finally codestream start markers (JPEG
//! SOI, J2K SOC) for multi-frame files that have no table and split frames into several
//! fragments, as some encoders do.
//!
//! Both ways into the codecs use it: the daemon's ([`frame_stream`], every table) and
//! dicom-rs's pixel data interface ([`super::pixeldata`], which cannot see the Extended
//! Offset Table). dicom-pixeldata 0.10.1 itself splits fragments only one per frame.

use std::borrow::Cow;

use dicom_core::value::{PrimitiveValue, Value};
use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, InMemDicomObject};

use crate::decode::DecodeError;

/// Bytes of an item header (tag + length) before each fragment: offsets count them.
const ITEM_HEADER: u64 = 8;

/// The compressed bytes of frame `frame` of a parsed object, borrowed when it is one
/// fragment.
pub(super) fn frame_stream<'a>(
    obj: &DefaultDicomObject,
    value: &'a Value<InMemDicomObject, Vec<u8>>,
    frame: u32,
    frames: u32,
) -> Result<Cow<'a, [u8]>, DecodeError> {
    let (Some(fragments), Some(bot)) = (value.fragments(), value.offset_table()) else {
        return Err(DecodeError::Invalid(
            "Pixel Data is native, but the transfer syntax is an encapsulated one".to_string(),
        ));
    };
    let range = frame_fragments(
        fragments,
        bot,
        extended_offsets(obj).as_deref(),
        frame,
        frames,
    )?;
    Ok(joined(&fragments[range]))
}

/// One frame's fragments as one codestream, borrowed when it is a single fragment.
pub(super) fn joined<F: AsRef<[u8]>>(parts: &[F]) -> Cow<'_, [u8]> {
    match parts {
        [one] => Cow::Borrowed(one.as_ref()),
        many => {
            let mut stream = Vec::with_capacity(many.iter().map(|f| f.as_ref().len()).sum());
            for f in many {
                stream.extend_from_slice(f.as_ref());
            }
            Cow::Owned(stream)
        }
    }
}

/// Which of `fragments` hold frame `frame` of `frames`, given the Basic Offset Table `bot`
/// (empty when absent) and the Extended Offset Table `eot` when the file has one.
pub(super) fn frame_fragments<F: AsRef<[u8]>>(
    fragments: &[F],
    bot: &[u32],
    eot: Option<&[u64]>,
    frame: u32,
    frames: u32,
) -> Result<std::ops::Range<usize>, DecodeError> {
    if fragments.is_empty() {
        return Err(DecodeError::Invalid(
            "encapsulated Pixel Data has no fragments".to_string(),
        ));
    }
    let frames = frames.max(1) as usize;
    let frame = frame as usize;
    eot.and_then(|eot| by_offsets(eot, fragments, frames, frame))
        .or_else(|| {
            let bot: Vec<u64> = bot.iter().map(|&o| u64::from(o)).collect();
            by_offsets(&bot, fragments, frames, frame)
        })
        .or_else(|| by_count(fragments.len(), frames, frame))
        .or_else(|| by_markers(fragments, frames, frame))
        .ok_or_else(|| {
            DecodeError::Invalid(format!(
                "cannot tell which of the {} fragments hold frame {frame} of {frames}: \
                 no usable offset table and no codestream start markers",
                fragments.len()
            ))
        })
}

/// The Extended Offset Table (7FE0,0001), when present and readable.
fn extended_offsets(obj: &DefaultDicomObject) -> Option<Vec<u64>> {
    let value = obj.element(tags::EXTENDED_OFFSET_TABLE).ok()?.value();
    match value.primitive()? {
        PrimitiveValue::U64(v) => Some(v.to_vec()),
        PrimitiveValue::U8(b) => Some(
            b.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("chunk of 8")))
                .collect(),
        ),
        _ => None,
    }
}

/// Fragments of `frame` from an offset table: frame `i` is the fragments that start at or
/// after `offsets[i]` and before `offsets[i + 1]`. A table that does not fit the fragments
/// is ignored rather than trusted.
fn by_offsets<F: AsRef<[u8]>>(
    offsets: &[u64],
    fragments: &[F],
    frames: usize,
    frame: usize,
) -> Option<std::ops::Range<usize>> {
    if offsets.len() != frames || offsets.first() != Some(&0) {
        return None;
    }
    let mut starts = Vec::with_capacity(fragments.len());
    let mut at = 0u64;
    for f in fragments {
        starts.push(at);
        at = at.checked_add(ITEM_HEADER + f.as_ref().len() as u64)?;
    }
    let index_of = |offset: u64| starts.binary_search(&offset).ok();
    let first = index_of(offsets[frame])?;
    let end = match offsets.get(frame + 1) {
        Some(&next) => index_of(next)?,
        None => fragments.len(),
    };
    (first < end).then_some(first..end)
}

/// One fragment per frame, or every fragment for a single frame.
fn by_count(fragments: usize, frames: usize, frame: usize) -> Option<std::ops::Range<usize>> {
    if fragments == frames {
        Some(frame..frame + 1)
    } else if frames == 1 {
        Some(0..fragments)
    } else {
        None
    }
}

/// Frames start at fragments that begin with a JPEG SOI (FFD8) or a J2K SOC + SIZ
/// (FF4F FF51); used only when exactly `frames` fragments do.
fn by_markers<F: AsRef<[u8]>>(
    fragments: &[F],
    frames: usize,
    frame: usize,
) -> Option<std::ops::Range<usize>> {
    let starts: Vec<usize> = fragments
        .iter()
        .enumerate()
        .filter(|(_, f)| {
            let f = f.as_ref();
            f.starts_with(&[0xFF, 0xD8]) || f.starts_with(&[0xFF, 0x4F, 0xFF, 0x51])
        })
        .map(|(i, _)| i)
        .collect();
    if starts.len() != frames || starts.first() != Some(&0) {
        return None;
    }
    let end = starts.get(frame + 1).copied().unwrap_or(fragments.len());
    Some(starts[frame]..end)
}
