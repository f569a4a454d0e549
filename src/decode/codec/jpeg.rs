//! JPEG (ITU T.81) through libjpeg-turbo 3's TurboJPEG API: baseline 8-bit, extended
//! 12-bit and lossless (process 14, any predictor, 2-16 bits), which no pure-Rust decoder
//! covers together.

use std::ffi::CStr;

use turbojpeg_sys as tj;

use super::output::{Shape, widen};
use super::{FrameLayout, MinSize, RawFrame};
use crate::decode::DecodeError;

/// Progressive scans above this are refused: a crafted file with thousands of tiny scans
/// costs minutes of CPU (libjpeg-turbo's own advice for untrusted input).
const SCAN_LIMIT: i32 = 500;

/// A TurboJPEG decompressor, destroyed on drop.
struct Handle(tj::tjhandle);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { tj::tj3Destroy(self.0) }
    }
}

impl Handle {
    fn new() -> Result<Handle, DecodeError> {
        // SAFETY: plain constructor; null on failure.
        let h = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as i32) };
        if h.is_null() {
            return Err(DecodeError::Invalid(
                "cannot create a JPEG decompressor".to_string(),
            ));
        }
        Ok(Handle(h))
    }

    fn get(&self, param: tj::TJPARAM) -> i32 {
        // SAFETY: valid handle; unknown parameters answer -1.
        unsafe { tj::tj3Get(self.0, param as i32) }
    }

    fn set(&self, param: tj::TJPARAM, value: i32) {
        // SAFETY: valid handle; a refused value leaves the default, which is safe.
        unsafe { tj::tj3Set(self.0, param as i32, value) };
    }

    /// The decoder's last message.
    fn error(&self) -> String {
        // SAFETY: valid handle; the string is owned by the handle and NUL-terminated.
        unsafe { CStr::from_ptr(tj::tj3GetErrorStr(self.0)) }
            .to_string_lossy()
            .into_owned()
    }

    /// Whether a failed call only warned: the image was still decoded completely.
    fn only_warned(&self) -> bool {
        // SAFETY: valid handle.
        unsafe { tj::tj3GetErrorCode(self.0) == tj::TJERR_TJERR_WARNING as i32 }
    }
}

/// The most a DCT-based frame is scaled down: libjpeg's reduced inverse DCTs go to 1/8
/// (one sample per 8x8 block).
const MAX_HALVINGS: u32 = 3;

/// Decodes one JPEG frame; a DCT-based one (not lossless) at 1/2, 1/4 or 1/8 of its size
/// where `min` allows, with libjpeg's scaled inverse DCT (what `djpeg -scale` does).
pub(super) fn decode(
    stream: &[u8],
    layout: &FrameLayout,
    shape: &Shape,
    min: Option<MinSize>,
) -> Result<RawFrame, DecodeError> {
    // libjpeg guesses the colour space of a 3-component stream without a JFIF or Adobe
    // marker from the component IDs, and takes anything but 'R','G','B' for YCbCr. DICOM
    // says RGB in the header, so such a stream is RGB, as GDCM, pylibjpeg and Pillow read
    // it; TurboJPEG cannot be told the input colour space (TJPARAM_COLORSPACE is read-only
    // when decompressing), so an Adobe marker saying "no transform" is added instead.
    let patched;
    let stream = if layout.photometric == "RGB" && !declares_colour_space(stream) {
        patched = with_adobe_rgb_marker(stream);
        &patched[..]
    } else {
        stream
    };
    let h = Handle::new()?;
    h.set(tj::TJPARAM_TJPARAM_SCANLIMIT, SCAN_LIMIT);
    // SAFETY: the buffer outlives the call; TurboJPEG only reads `len` bytes.
    if unsafe { tj::tj3DecompressHeader(h.0, stream.as_ptr(), stream.len() as _) } != 0 {
        return Err(DecodeError::Invalid(format!(
            "bad JPEG header: {}",
            h.error()
        )));
    }
    let width = h.get(tj::TJPARAM_TJPARAM_JPEGWIDTH);
    let height = h.get(tj::TJPARAM_TJPARAM_JPEGHEIGHT);
    let precision = h.get(tj::TJPARAM_TJPARAM_PRECISION);
    let colorspace = h.get(tj::TJPARAM_TJPARAM_COLORSPACE);
    let components = match colorspace as tj::TJCS {
        tj::TJCS_TJCS_GRAY => 1,
        tj::TJCS_TJCS_RGB | tj::TJCS_TJCS_YCbCr => 3,
        tj::TJCS_TJCS_CMYK | tj::TJCS_TJCS_YCCK => {
            return Err(DecodeError::Unsupported(
                "CMYK/YCCK JPEG is not supported".to_string(),
            ));
        }
        // A header cut short parses "successfully" with nothing filled in.
        _ => {
            return Err(DecodeError::Invalid(format!(
                "bad JPEG header: no frame header in {} bytes",
                stream.len()
            )));
        }
    };
    shape.check_codestream(
        width.max(0) as u64,
        height.max(0) as u64,
        components,
        precision.max(0) as u32,
    )?;
    h.set(tj::TJPARAM_TJPARAM_MAXPIXELS, width.saturating_mul(height));
    let lossless = h.get(tj::TJPARAM_TJPARAM_LOSSLESS) == 1;
    let halvings = if lossless {
        0
    } else {
        shape.halvings(min, MAX_HALVINGS)
    };
    if halvings > 0 {
        let factor = tj::tjscalingfactor {
            num: 1,
            denom: 1 << halvings,
        };
        // SAFETY: valid handle; 1/2, 1/4 and 1/8 are among TurboJPEG's factors.
        if unsafe { tj::tj3SetScalingFactor(h.0, factor) } != 0 {
            return Err(DecodeError::Invalid(format!(
                "cannot scale the JPEG: {}",
                h.error()
            )));
        }
    }
    // Past this point the output is exactly the header's frame (scaled, rounding up, as
    // TJSCALED does): TurboJPEG writes width x height x components samples at the
    // default pitch.
    let shape = &shape.halved(halvings);
    let format = if components == 1 {
        tj::TJPF_TJPF_GRAY
    } else {
        tj::TJPF_TJPF_RGB
    } as i32;
    let samples = shape.sample_count();
    let status;
    let data = if precision <= 8 {
        let mut buf = vec![0u8; samples];
        // SAFETY: `buf` holds width x height x components bytes, checked against the
        // codestream's header above.
        status = unsafe {
            tj::tj3Decompress8(
                h.0,
                stream.as_ptr(),
                stream.len() as _,
                buf.as_mut_ptr(),
                0,
                format,
            )
        };
        widen(buf, 1, shape)
    } else {
        let mut buf = vec![0u16; samples];
        // SAFETY: as above, with 16-bit samples; 12-bit samples are i16 in 0..4096.
        status = unsafe {
            if precision <= 12 {
                tj::tj3Decompress12(
                    h.0,
                    stream.as_ptr(),
                    stream.len() as _,
                    buf.as_mut_ptr().cast(),
                    0,
                    format,
                )
            } else {
                tj::tj3Decompress16(
                    h.0,
                    stream.as_ptr(),
                    stream.len() as _,
                    buf.as_mut_ptr(),
                    0,
                    format,
                )
            }
        };
        widen(buf.iter().flat_map(|v| v.to_le_bytes()).collect(), 2, shape)
    };
    if status != 0 && !(h.only_warned() && benign(&h.error())) {
        return Err(DecodeError::Invalid(format!(
            "corrupt or truncated JPEG data: {}",
            h.error()
        )));
    }
    // The decoder converts YCbCr to RGB; data that was stored as RGB stays RGB.
    let photometric = if colorspace as tj::TJCS == tj::TJCS_TJCS_YCbCr {
        "RGB".to_string()
    } else {
        layout.photometric.clone()
    };
    Ok(RawFrame {
        width: shape.width,
        height: shape.height,
        data,
        bits_allocated: shape.bits(),
        photometric,
    })
}

/// A warning that leaves the image intact: padding between the last scan and EOI is common
/// in DICOM fragments (encoders pad to even length). Every other warning (premature end,
/// bad Huffman code) means pixels were invented, so the frame is refused.
fn benign(message: &str) -> bool {
    message.contains("extraneous bytes before marker 0xd9")
}

/// Whether the stream's header, up to the first scan, has a JFIF (APP0) or Adobe (APP14)
/// marker, the two that tell libjpeg the colour space. A stream that cannot be walked
/// answers true, so it is left exactly as it was for TurboJPEG to judge.
fn declares_colour_space(stream: &[u8]) -> bool {
    if !stream.starts_with(&[0xFF, 0xD8]) {
        return true;
    }
    let mut i = 2;
    loop {
        // Markers may be preceded by any number of 0xFF fill bytes.
        while stream.get(i) == Some(&0xFF) && stream.get(i + 1) == Some(&0xFF) {
            i += 1;
        }
        let (Some(&0xFF), Some(&marker)) = (stream.get(i), stream.get(i + 1)) else {
            return true;
        };
        match marker {
            // Start of scan or end of image: no more header markers.
            0xDA | 0xD9 => return false,
            // Markers without a length.
            0x01 | 0xD0..=0xD7 => {
                i += 2;
                continue;
            }
            _ => {}
        }
        let Some(len) = stream
            .get(i + 2..i + 4)
            .map(|l| usize::from(u16::from_be_bytes([l[0], l[1]])))
        else {
            return true;
        };
        let body = stream.get(i + 4..i + 2 + len.max(2)).unwrap_or(&[]);
        if (marker == 0xE0 && body.starts_with(b"JFIF\0"))
            || (marker == 0xEE && body.starts_with(b"Adobe"))
        {
            return true;
        }
        if len < 2 {
            return true;
        }
        i += 2 + len;
    }
}

/// `stream` with an Adobe APP14 marker, transform 0 (components are not YCbCr), right
/// after the SOI marker.
fn with_adobe_rgb_marker(stream: &[u8]) -> Vec<u8> {
    const APP14: [u8; 16] = [
        0xFF, 0xEE, 0x00, 0x0E, b'A', b'd', b'o', b'b', b'e', 0x00, 0x64, 0x00, 0x00, 0x00, 0x00,
        0x00,
    ];
    let mut out = Vec::with_capacity(stream.len() + APP14.len());
    out.extend_from_slice(&stream[..2]);
    out.extend_from_slice(&APP14);
    out.extend_from_slice(&stream[2..]);
    out
}
