//! RLE Lossless (PS3.5 annex G): a 64-byte header of segment offsets, then one PackBits
//! segment per byte plane, most significant byte first, one sample plane after another.

use super::output::Shape;
use super::{FrameLayout, RawFrame};
use crate::decode::DecodeError;

/// Decodes one RLE frame straight into the interleaved output buffer.
pub(super) fn decode(
    stream: &[u8],
    layout: &FrameLayout,
    shape: &Shape,
) -> Result<RawFrame, DecodeError> {
    if layout.bits_allocated == 1 {
        return Err(DecodeError::Unsupported(
            "RLE with Bits Allocated 1 is not supported".to_string(),
        ));
    }
    if stream.len() < 64 {
        return Err(DecodeError::Invalid(format!(
            "the RLE header needs 64 bytes, the frame has {}",
            stream.len()
        )));
    }
    let header: Vec<usize> = stream[..64]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let segments = header[0];
    let expected = shape.samples * shape.bytes;
    if segments != expected {
        return Err(DecodeError::Invalid(format!(
            "the RLE header lists {segments} segment(s), but {} sample(s) of {} bits need {expected}",
            shape.samples,
            shape.bits()
        )));
    }
    let offsets = &header[1..=segments];
    let mut out = vec![0u8; shape.frame_bytes()];
    let stride = expected;
    for (s, &start) in offsets.iter().enumerate() {
        let end = offsets.get(s + 1).copied().unwrap_or(stream.len());
        if start < 64 || start > end || end > stream.len() {
            return Err(DecodeError::Invalid(format!(
                "RLE segment {s} spans bytes {start}..{end} of a {}-byte frame",
                stream.len()
            )));
        }
        // Segment s holds byte (bytes - 1 - s % bytes) (little-endian position) of sample
        // s / bytes.
        let sample = s / shape.bytes;
        let byte = shape.bytes - 1 - s % shape.bytes;
        let first = sample * shape.bytes + byte;
        unpack(
            &stream[start..end],
            &mut out[first..],
            stride,
            shape.pixels(),
        )
        .map_err(|got| {
            DecodeError::Invalid(format!(
                "RLE segment {s} is truncated: it decodes to {got} of {} bytes",
                shape.pixels()
            ))
        })?;
    }
    Ok(RawFrame {
        width: shape.width,
        height: shape.height,
        data: out,
        bits_allocated: shape.bits(),
        photometric: layout.photometric.clone(),
    })
}

/// PackBits into every `stride`-th byte of `out`, `count` bytes in all; extra input (the
/// even-length pad) is ignored. Errs with the count decoded when the segment runs short.
fn unpack(mut seg: &[u8], out: &mut [u8], stride: usize, count: usize) -> Result<(), usize> {
    let mut done = 0;
    let mut put = |b: u8, done: &mut usize| {
        out[*done * stride] = b;
        *done += 1;
    };
    while done < count {
        let Some((&n, rest)) = seg.split_first() else {
            return Err(done);
        };
        seg = rest;
        let n = n as i8;
        if n >= 0 {
            let len = n as usize + 1;
            let Some(lit) = seg.get(..len) else {
                return Err(done);
            };
            for &b in lit.iter().take(count - done) {
                put(b, &mut done);
            }
            seg = &seg[len..];
        } else if n != -128 {
            let len = 1 - n as isize;
            let Some((&b, rest)) = seg.split_first() else {
                return Err(done);
            };
            seg = rest;
            for _ in 0..(len as usize).min(count - done) {
                put(b, &mut done);
            }
        }
    }
    Ok(())
}
