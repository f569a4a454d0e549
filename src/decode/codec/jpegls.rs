//! JPEG-LS (ITU T.87) lossless and near-lossless through CharLS, whose C API turns every
//! C++ exception into an error code.

use std::ffi::CStr;

use charls_sys as ls;

use super::output::{Shape, interleave, widen};
use super::{FrameLayout, RawFrame};
use crate::decode::DecodeError;

unsafe extern "C" {
    // In CharLS's C API but not in charls-sys's generated bindings.
    fn charls_jpegls_decoder_get_interleave_mode(
        decoder: *const ls::charls_jpegls_decoder,
        interleave_mode: *mut ls::charls_interleave_mode,
    ) -> ls::charls_jpegls_errc;
}

/// A CharLS decoder, destroyed on drop.
struct Decoder(*mut ls::charls_jpegls_decoder);

impl Drop for Decoder {
    fn drop(&mut self) {
        // SAFETY: created by charls_jpegls_decoder_create, destroyed once.
        unsafe { ls::charls_jpegls_decoder_destroy(self.0) }
    }
}

/// Turns a CharLS status into a DecodeError saying what was being done.
fn check(errc: ls::charls_jpegls_errc, doing: &str) -> Result<(), DecodeError> {
    if errc == 0 {
        return Ok(());
    }
    // SAFETY: CharLS returns a static NUL-terminated string for every code.
    let message = unsafe { CStr::from_ptr(ls::charls_get_error_message(errc)) };
    Err(DecodeError::Invalid(format!(
        "{doing}: {}",
        message.to_string_lossy()
    )))
}

/// Decodes one JPEG-LS frame.
pub(super) fn decode(
    stream: &[u8],
    layout: &FrameLayout,
    shape: &Shape,
) -> Result<RawFrame, DecodeError> {
    // SAFETY: plain constructor; null when out of memory.
    let raw = unsafe { ls::charls_jpegls_decoder_create() };
    if raw.is_null() {
        return Err(DecodeError::Invalid(
            "cannot create a JPEG-LS decoder".to_string(),
        ));
    }
    let d = Decoder(raw);
    let mut info = ls::charls_frame_info {
        width: 0,
        height: 0,
        bits_per_sample: 0,
        component_count: 0,
    };
    let mut mode: ls::charls_interleave_mode = 0;
    // SAFETY: `stream` outlives the decoder's use of it (both end in this function); the
    // out-pointers are to live locals.
    unsafe {
        check(
            ls::charls_jpegls_decoder_set_source_buffer(d.0, stream.as_ptr().cast(), stream.len()),
            "bad JPEG-LS stream",
        )?;
        check(
            ls::charls_jpegls_decoder_read_header(d.0),
            "bad JPEG-LS header",
        )?;
        check(
            ls::charls_jpegls_decoder_get_frame_info(d.0, &mut info),
            "bad JPEG-LS header",
        )?;
        check(
            charls_jpegls_decoder_get_interleave_mode(d.0, &mut mode),
            "bad JPEG-LS header",
        )?;
    }
    shape.check_codestream(
        u64::from(info.width),
        u64::from(info.height),
        info.component_count.max(0) as u64,
        info.bits_per_sample.max(0) as u32,
    )?;
    // CharLS writes 1 byte per sample up to 8 bits, 2 above; check its own size too.
    let codec_bytes = if info.bits_per_sample <= 8 { 1 } else { 2 };
    let size = shape.sample_count() * codec_bytes;
    let mut need = 0usize;
    // SAFETY: live out-pointer.
    check(
        unsafe { ls::charls_jpegls_decoder_get_destination_size(d.0, 0, &mut need) },
        "bad JPEG-LS header",
    )?;
    if need != size {
        return Err(DecodeError::Invalid(format!(
            "the JPEG-LS stream needs {need} bytes for {} x {}, expected {size}",
            info.width, info.height
        )));
    }
    let mut buf = vec![0u8; size];
    // SAFETY: `buf` is exactly the size CharLS asked for.
    check(
        unsafe {
            ls::charls_jpegls_decoder_decode_to_buffer(d.0, buf.as_mut_ptr().cast(), size, 0)
        },
        "corrupt or truncated JPEG-LS data",
    )?;
    // CharLS writes native-endian u16; the output is little-endian.
    if codec_bytes == 2 && cfg!(target_endian = "big") {
        for pair in buf.chunks_exact_mut(2) {
            pair.swap(0, 1);
        }
    }
    let sample_shape = Shape {
        bytes: codec_bytes,
        ..*shape
    };
    if shape.samples == 3 && mode == ls::charls_interleave_mode_none {
        buf = interleave(&buf, &sample_shape);
    }
    Ok(RawFrame {
        width: shape.width,
        height: shape.height,
        data: widen(buf, codec_bytes, shape),
        bits_allocated: shape.bits(),
        photometric: layout.photometric.clone(),
    })
}
