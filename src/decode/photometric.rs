//! From a codec's raw samples to stored values, and colour spaces to RGB.

use super::DecodeError;
use super::codec::{FrameLayout, RawFrame};

/// Stored values of a raw frame: masked to Bits Stored and sign-extended when Pixel
/// Representation is signed; YBR_FULL_422 native data (two pixels share Cb and Cr) is
/// expanded to three samples per pixel.
pub fn stored_values(raw: &RawFrame, layout: &FrameLayout) -> Result<Vec<i32>, DecodeError> {
    let pixels = layout.rows as usize * layout.columns as usize;
    let bytes_per = usize::from(raw.bits_allocated.div_ceil(8));
    let subsampled = raw.photometric == "YBR_FULL_422"
        && raw.data.len() < pixels * 3 * bytes_per
        && layout.columns.is_multiple_of(2);
    let count = if subsampled {
        pixels * 2
    } else {
        pixels * usize::from(layout.samples_per_pixel)
    };
    if raw.data.len() < count * bytes_per {
        return Err(DecodeError::Invalid(format!(
            "pixel data holds {} bytes, but {} x {} x {} samples of {} bits need {}",
            raw.data.len(),
            layout.columns,
            layout.rows,
            layout.samples_per_pixel,
            raw.bits_allocated,
            count * bytes_per
        )));
    }
    let bits = layout.bits_stored.min(raw.bits_allocated.max(8));
    let mask: u32 = if bits >= 32 {
        u32::MAX
    } else {
        (1u32 << bits) - 1
    };
    let signed = layout.signed;
    let extend = |raw: u32| -> i32 {
        let v = raw & mask;
        if signed && bits < 32 && v & (1 << (bits - 1)) != 0 {
            (i64::from(v) - (1i64 << bits)) as i32
        } else {
            v as i32
        }
    };
    let data = &raw.data[..count * bytes_per];
    let values: Vec<i32> = match bytes_per {
        1 => data.iter().map(|&b| extend(u32::from(b))).collect(),
        2 => data
            .chunks_exact(2)
            .map(|c| extend(u32::from(u16::from_le_bytes([c[0], c[1]]))))
            .collect(),
        4 => data
            .chunks_exact(4)
            .map(|c| extend(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        _ => {
            return Err(DecodeError::Unsupported(format!(
                "samples of {} bits are not supported",
                raw.bits_allocated
            )));
        }
    };
    if subsampled {
        // Y0 Y1 Cb Cr -> (Y0 Cb Cr) (Y1 Cb Cr).
        Ok(values
            .chunks_exact(4)
            .flat_map(|q| [q[0], q[2], q[3], q[1], q[2], q[3]])
            .collect())
    } else {
        Ok(values)
    }
}

/// Converts interleaved colour samples to RGB. YBR_FULL (and YBR_FULL_422 once expanded)
/// uses the full-range BT.601 matrix of PS3.3 C.7.6.3.1.2, computed in f32 and rounded half
/// to even, the same arithmetic pydicom's `convert_color_space` uses.
pub fn to_rgb(
    samples: Vec<i32>,
    photometric: &str,
    layout: &FrameLayout,
) -> Result<Vec<i32>, DecodeError> {
    match photometric {
        "RGB" => Ok(samples),
        "YBR_FULL" | "YBR_FULL_422" => {
            let max = ((1u64 << layout.bits_stored.min(16)) - 1) as f32;
            let half = ((1u64 << layout.bits_stored.min(16)) / 2) as f32;
            let mut out = samples;
            for px in out.chunks_exact_mut(3) {
                let y = px[0] as f32;
                let cb = px[1] as f32 - half;
                let cr = px[2] as f32 - half;
                let r = y + 1.402 * cr;
                let g = y + (-0.114 * 1.772 / 0.587) * cb + (-0.299 * 1.402 / 0.587) * cr;
                let b = y + 1.772 * cb;
                for (o, v) in px.iter_mut().zip([r, g, b]) {
                    *o = v.round_ties_even().clamp(0.0, max) as i32;
                }
            }
            Ok(out)
        }
        other => Err(DecodeError::Unsupported(format!(
            "photometric interpretation {other} of the decoded data is not supported"
        ))),
    }
}
