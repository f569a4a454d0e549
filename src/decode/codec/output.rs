//! The output frame's shape, fixed from the header before any codec runs, and the checks
//! that hold every codec to it.

use super::{FrameLayout, Limits, MinSize};
use crate::decode::{DecodeError, check_size};

/// Size of one decoded frame as the header declares it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Shape {
    /// Columns.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// Samples per pixel: 1 or 3.
    pub samples: usize,
    /// Bytes of one output sample: 1, 2 or 4 (1-bit data is unpacked to 1).
    pub bytes: usize,
}

impl Shape {
    /// Validates the header's geometry and the limits; nothing is allocated yet.
    pub(super) fn new(layout: &FrameLayout, limits: &Limits) -> Result<Shape, DecodeError> {
        let bytes = match layout.bits_allocated {
            1 | 8 => 1,
            16 => 2,
            32 => 4,
            other => {
                return Err(DecodeError::Unsupported(format!(
                    "Bits Allocated {other} is not supported (1, 8, 16 or 32)"
                )));
            }
        };
        let samples = match layout.samples_per_pixel {
            1 | 3 => usize::from(layout.samples_per_pixel),
            other => {
                return Err(DecodeError::Unsupported(format!(
                    "Samples per Pixel {other} is not supported (1 or 3)"
                )));
            }
        };
        if layout.bits_stored == 0 || layout.bits_stored > layout.bits_allocated {
            return Err(DecodeError::Invalid(format!(
                "Bits Stored {} does not fit Bits Allocated {}",
                layout.bits_stored, layout.bits_allocated
            )));
        }
        check_size(
            limits,
            u64::from(layout.columns),
            u64::from(layout.rows),
            (samples * bytes) as u64,
        )?;
        Ok(Shape {
            width: layout.columns as usize,
            height: layout.rows as usize,
            samples,
            bytes,
        })
    }

    /// Pixels in one frame.
    pub(super) fn pixels(&self) -> usize {
        self.width * self.height
    }

    /// Samples in one frame.
    pub(super) fn sample_count(&self) -> usize {
        self.pixels() * self.samples
    }

    /// Bytes of one decoded frame: the most any decoder here allocates for its output.
    pub(super) fn frame_bytes(&self) -> usize {
        self.sample_count() * self.bytes
    }

    /// How many times a codec that decodes at lower resolutions (each one halving both
    /// sides, rounding up) may halve this frame, at most `max`, and keep both sides at
    /// least `min`'s: the coarsest resolution still fine enough for the caller.
    pub(super) fn halvings(&self, min: Option<MinSize>, max: u32) -> u32 {
        let Some(min) = min else { return 0 };
        (0..=max.min(16))
            .take_while(|&k| {
                let h = self.halved(k);
                h.width >= min.width as usize && h.height >= min.height as usize
            })
            .last()
            .unwrap_or(0)
    }

    /// This frame halved `k` times: ceil(side / 2^k), as both JPEG 2000 (resolution
    /// levels of an image at the origin) and JPEG's DCT scaling round.
    pub(super) fn halved(&self, k: u32) -> Shape {
        Shape {
            width: self.width.div_ceil(1 << k),
            height: self.height.div_ceil(1 << k),
            ..*self
        }
    }

    /// Output sample width in bits, as [`super::RawFrame::bits_allocated`] reports it.
    pub(super) fn bits(&self) -> u16 {
        (self.bytes * 8) as u16
    }

    /// Refuses a codestream whose own header disagrees with the DICOM header. Precision
    /// may be below Bits Allocated (and differ from Bits Stored: encoders often write the
    /// container's 16 for 12 stored bits), but never wider than the output sample.
    pub(super) fn check_codestream(
        &self,
        width: u64,
        height: u64,
        components: u64,
        precision: u32,
    ) -> Result<(), DecodeError> {
        if width != self.width as u64 || height != self.height as u64 {
            return Err(DecodeError::Invalid(format!(
                "the codestream is {width} x {height} pixels, but the DICOM header says {} x {}",
                self.width, self.height
            )));
        }
        if components != self.samples as u64 {
            return Err(DecodeError::Invalid(format!(
                "the codestream has {components} component(s), but Samples per Pixel is {}",
                self.samples
            )));
        }
        if precision == 0 || precision > u32::from(self.bits()) {
            return Err(DecodeError::Invalid(format!(
                "the codestream has {precision}-bit samples, but Bits Allocated is {}",
                self.bits()
            )));
        }
        Ok(())
    }
}

/// Reorders one planar frame (RRR..GGG..BBB..) to interleaved (RGBRGB..).
pub(super) fn interleave(planar: &[u8], shape: &Shape) -> Vec<u8> {
    let (n, s, b) = (shape.pixels(), shape.samples, shape.bytes);
    let mut out = vec![0u8; n * s * b];
    let plane = n * b;
    for c in 0..s {
        let src = &planar[c * plane..(c + 1) * plane];
        for (i, sample) in src.chunks_exact(b).enumerate() {
            let at = (i * s + c) * b;
            out[at..at + b].copy_from_slice(sample);
        }
    }
    out
}

/// Little-endian samples `from` bytes wide, widened to the output's sample width (an 8-bit
/// codestream in a Bits Allocated 16 file); `from` is never wider than the output, which
/// [`Shape::check_codestream`] guarantees through the precision.
pub(super) fn widen(data: Vec<u8>, from: usize, shape: &Shape) -> Vec<u8> {
    if from >= shape.bytes {
        return data;
    }
    let mut out = vec![0u8; data.len() / from * shape.bytes];
    for (src, dst) in data
        .chunks_exact(from)
        .zip(out.chunks_exact_mut(shape.bytes))
    {
        dst[..from].copy_from_slice(src);
    }
    out
}
