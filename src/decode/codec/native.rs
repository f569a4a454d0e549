//! Native pixel data: the parser has already undone deflate, so a frame is a slice of the
//! Pixel Data value, unpacked (1-bit) and interleaved (planar RGB). Big endian is undone
//! here, per sample, because the parser only swaps within its own value type (OW words,
//! OL double words), which is not the sample width when Bits Allocated and the VR
//! disagree.
//!
//! dicom-pixeldata 0.10.1 has a native path of its own, not used here: it reads 1-bit
//! frames from byte boundaries and leaves planar colour planar (measured in
//! [`super::pixeldata`]).
//!
//! Native YBR_FULL_422 is stored subsampled (PS3.3 C.7.6.3.1.2: Y0 Y1 Cb Cr per pair of
//! pixels, two samples per pixel) and is returned that way; see [`RawFrame`].

use std::borrow::Cow;

use dicom_core::value::{PrimitiveValue, Value};
use dicom_object::InMemDicomObject;

use super::output::{Shape, interleave};
use super::{FrameLayout, RawFrame};
use crate::decode::DecodeError;

/// Frame `frame` of a native Pixel Data value; `big_endian` for Explicit VR Big Endian.
pub(super) fn decode(
    value: &Value<InMemDicomObject, Vec<u8>>,
    frame: u32,
    layout: &FrameLayout,
    shape: &Shape,
    big_endian: bool,
) -> Result<RawFrame, DecodeError> {
    let primitive = match value {
        Value::Primitive(p) => p,
        _ => {
            return Err(DecodeError::Invalid(
                "Pixel Data is encapsulated, but the transfer syntax is a native one".to_string(),
            ));
        }
    };
    let bytes = if big_endian {
        Cow::Owned(big_endian_samples_to_le(primitive, layout.bits_allocated))
    } else {
        little_endian_bytes(primitive)
    };
    let ybr_422 = layout.photometric == "YBR_FULL_422" && shape.samples == 3;
    if ybr_422 && layout.bits_allocated != 1 {
        return subsampled_422(&bytes, frame, layout, shape);
    }
    decode_bytes(&bytes, frame, layout, shape)
}

/// The value's bytes in little-endian order. On little-endian targets this borrows; the
/// parser stores OW as native-endian u16 words whatever the file's byte order.
fn little_endian_bytes(value: &PrimitiveValue) -> Cow<'_, [u8]> {
    fn words<T: Copy, const N: usize>(v: &[T], le: fn(T) -> [u8; N]) -> Cow<'static, [u8]> {
        Cow::Owned(v.iter().flat_map(|&x| le(x)).collect())
    }
    if cfg!(target_endian = "little") {
        return value.to_bytes();
    }
    match value {
        PrimitiveValue::U16(v) => words(v, u16::to_le_bytes),
        PrimitiveValue::I16(v) => words(v, i16::to_le_bytes),
        PrimitiveValue::U32(v) => words(v, u32::to_le_bytes),
        PrimitiveValue::I32(v) => words(v, i32::to_le_bytes),
        PrimitiveValue::F32(v) => words(v, f32::to_le_bytes),
        other => other.to_bytes(),
    }
}

/// Explicit VR Big Endian Pixel Data as little-endian samples `bits_allocated` wide.
///
/// The parser decodes the value by its VR: OB stays the file's bytes, OW becomes u16
/// words, OL u32 (each already in host order). A 32-bit sample in OW is therefore two
/// words, most significant first, and a 16-bit sample in OB two bytes, most significant
/// first: reading either as little endian scrambles it. So the file's byte stream is
/// rebuilt from the values first (each value big endian, as it was stored), and then each
/// `bits_allocated`-wide sample is reversed, as pydicom reads big-endian Pixel Data (a
/// `>u2` / `>u4` view of the stored bytes whatever the VR).
///
/// 8-bit data in OW is the exception pydicom and the standard agree on: the pixels are
/// packed into 16-bit words, so the bytes of each word swap; 1-bit data in OW likewise
/// keeps the words' little-endian layout. Both are the parser's words in little endian.
fn big_endian_samples_to_le(value: &PrimitiveValue, bits_allocated: u16) -> Vec<u8> {
    fn each<T: Copy, const N: usize>(v: &[T], f: fn(T) -> [u8; N]) -> Vec<u8> {
        v.iter().flat_map(|&x| f(x)).collect()
    }
    let sample = usize::from(bits_allocated / 8);
    if sample <= 1 {
        // OW words in little endian: the bytes within each stored word swap.
        match value {
            PrimitiveValue::U16(v) => return each(v, u16::to_le_bytes),
            PrimitiveValue::I16(v) => return each(v, i16::to_le_bytes),
            _ => {}
        }
    }
    // The file's bytes: every value big endian, as Explicit VR Big Endian stored it.
    let mut stored = match value {
        PrimitiveValue::U16(v) => each(v, u16::to_be_bytes),
        PrimitiveValue::I16(v) => each(v, i16::to_be_bytes),
        PrimitiveValue::U32(v) => each(v, u32::to_be_bytes),
        PrimitiveValue::I32(v) => each(v, i32::to_be_bytes),
        PrimitiveValue::U64(v) => each(v, u64::to_be_bytes),
        PrimitiveValue::I64(v) => each(v, i64::to_be_bytes),
        PrimitiveValue::F32(v) => each(v, f32::to_be_bytes),
        PrimitiveValue::F64(v) => each(v, f64::to_be_bytes),
        other => other.to_bytes().into_owned(),
    };
    if sample > 1 {
        for s in stored.chunks_exact_mut(sample) {
            s.reverse();
        }
    }
    stored
}

/// Frame `frame` of native YBR_FULL_422: `Y0 Y1 Cb Cr` for each pair of pixels along a
/// row, so a frame is rows x columns x 2 samples, returned as stored (expanding it is the
/// pixel pipeline's job). A value that holds the full three samples per pixel means the
/// header's YBR_FULL_422 is wrong, and is refused, as pydicom does, rather than guessed.
fn subsampled_422(
    data: &[u8],
    frame: u32,
    layout: &FrameLayout,
    shape: &Shape,
) -> Result<RawFrame, DecodeError> {
    if !shape.width.is_multiple_of(2) {
        return Err(DecodeError::Invalid(format!(
            "YBR_FULL_422 pixel data is subsampled by two along each row, but Columns is {}",
            shape.width
        )));
    }
    let size = shape.pixels() * 2 * shape.bytes;
    let frames = layout.frames.max(1) as usize;
    let full = shape.frame_bytes() * frames;
    if data.len() >= full + full % 2 {
        return Err(DecodeError::Invalid(format!(
            "Pixel Data holds {} bytes, a third more than {frames} subsampled YBR_FULL_422 \
             frame(s) of {size} bytes: the Photometric Interpretation is probably RGB or \
             YBR_FULL, not YBR_FULL_422",
            data.len()
        )));
    }
    let frame = frame as usize;
    let start = frame * size;
    let stored = data
        .get(start..start + size)
        .ok_or_else(|| short(data.len(), frame, start + size))?;
    Ok(RawFrame {
        width: shape.width,
        height: shape.height,
        data: stored.to_vec(),
        bits_allocated: shape.bits(),
        photometric: layout.photometric.clone(),
    })
}

/// Frame `frame` of little-endian native pixel bytes holding consecutive frames.
pub(super) fn decode_bytes(
    data: &[u8],
    frame: u32,
    layout: &FrameLayout,
    shape: &Shape,
) -> Result<RawFrame, DecodeError> {
    let frame = frame as usize;
    let out = if layout.bits_allocated == 1 {
        unpack_bits(data, frame, shape)?
    } else {
        let size = shape.frame_bytes();
        let start = frame * size;
        let stored = data
            .get(start..start + size)
            .ok_or_else(|| short(data.len(), frame, start + size))?;
        if shape.samples == 3 && layout.planar_configuration == 1 {
            interleave(stored, shape)
        } else {
            stored.to_vec()
        }
    };
    Ok(RawFrame {
        width: shape.width,
        height: shape.height,
        data: out,
        bits_allocated: shape.bits(),
        photometric: layout.photometric.clone(),
    })
}

/// Unpacks 1-bit samples to one byte each. Bits run least significant first within a byte
/// and frames are not byte-aligned (PS3.5 8.1.1, D.2): frame `f` starts at bit `f * n`.
fn unpack_bits(data: &[u8], frame: usize, shape: &Shape) -> Result<Vec<u8>, DecodeError> {
    let n = shape.sample_count();
    let first = frame * n;
    let end_byte = (first + n).div_ceil(8);
    if data.len() < end_byte {
        return Err(short(data.len(), frame, end_byte));
    }
    Ok((first..first + n)
        .map(|bit| (data[bit / 8] >> (bit % 8)) & 1)
        .collect())
}

fn short(have: usize, frame: usize, need: usize) -> DecodeError {
    DecodeError::Invalid(format!(
        "Pixel Data holds {have} bytes, but frame {frame} needs bytes up to {need}"
    ))
}
