//! JPEG 2000 (Part 1) and HTJ2K (Part 15) through OpenJPEG 2.5, which decodes both from
//! the same API. The codestream's header is read and checked against the DICOM header
//! before any tile is decoded, so a lying codestream cannot make OpenJPEG allocate for a
//! bigger image than the header (and the limits) allow.

use std::ffi::{CStr, c_char, c_void};
use std::sync::Mutex;

use openjpeg_sys as opj;

use super::output::Shape;
use super::{FrameLayout, MinSize, RawFrame, budget};
use crate::decode::DecodeError;

/// OpenJPEG worker threads per frame at most: code-block decoding parallelises well, and a
/// 3000 x 3000 lossless frame takes over a second on one core. Fewer when other frames are
/// decoding ([`budget::threads`]).
const MAX_THREADS: usize = 4;

/// The compressed bytes and the read position OpenJPEG's stream callbacks work on.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

unsafe extern "C" fn read(buf: *mut c_void, n: usize, user: *mut c_void) -> usize {
    // SAFETY: `user` is the `Reader` that outlives the stream (see `decode`).
    let r = unsafe { &mut *user.cast::<Reader<'_>>() };
    let left = r.data.len() - r.pos;
    if left == 0 {
        return usize::MAX; // OpenJPEG's end-of-stream value, (OPJ_SIZE_T)-1.
    }
    let n = n.min(left);
    // SAFETY: OpenJPEG's buffer holds at least the `n` bytes it asked for.
    unsafe { std::ptr::copy_nonoverlapping(r.data.as_ptr().add(r.pos), buf.cast::<u8>(), n) };
    r.pos += n;
    n
}

unsafe extern "C" fn skip(n: i64, user: *mut c_void) -> i64 {
    // SAFETY: as in `read`.
    let r = unsafe { &mut *user.cast::<Reader<'_>>() };
    let target = (r.pos as i64)
        .saturating_add(n)
        .clamp(0, r.data.len() as i64);
    let moved = target - r.pos as i64;
    r.pos = target as usize;
    moved
}

unsafe extern "C" fn seek(n: i64, user: *mut c_void) -> opj::OPJ_BOOL {
    // SAFETY: as in `read`.
    let r = unsafe { &mut *user.cast::<Reader<'_>>() };
    if n < 0 || n as u64 > r.data.len() as u64 {
        return 0;
    }
    r.pos = n as usize;
    1
}

/// Collects OpenJPEG's error messages. Worker threads may report too, hence the mutex.
unsafe extern "C" fn on_error(msg: *const c_char, user: *mut c_void) {
    if msg.is_null() || user.is_null() {
        return;
    }
    // SAFETY: `user` is the `Mutex<String>` that outlives the codec; `msg` is a C string.
    let (log, msg) = unsafe { (&*user.cast::<Mutex<String>>(), CStr::from_ptr(msg)) };
    if let Ok(mut log) = log.lock()
        && log.len() < 1024
    {
        if !log.is_empty() {
            log.push_str("; ");
        }
        log.push_str(msg.to_string_lossy().trim());
    }
}

/// Owns the codec, stream and image, released in the right order on every path.
struct Session {
    codec: *mut opj::opj_codec_t,
    stream: *mut opj::opj_stream_t,
    image: *mut opj::opj_image_t,
}

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: each pointer is null or owned by this session, and freed once.
        unsafe {
            if !self.image.is_null() {
                opj::opj_image_destroy(self.image);
            }
            if !self.stream.is_null() {
                opj::opj_stream_destroy(self.stream);
            }
            if !self.codec.is_null() {
                opj::opj_destroy_codec(self.codec);
            }
        }
    }
}

/// Decodes one JPEG 2000 or HTJ2K frame, dropping as many of the finest wavelet levels as
/// `min` allows (each one halves the frame; OpenJPEG then skips their code-blocks).
pub(super) fn decode(
    stream: &[u8],
    layout: &FrameLayout,
    shape: &Shape,
    min: Option<MinSize>,
) -> Result<RawFrame, DecodeError> {
    check_siz(stream, shape)?;
    // Some encoders wrap the codestream in a JP2 file, which DICOM forbids but readers accept.
    let format = if stream.starts_with(&[0, 0, 0, 0x0C, 0x6A, 0x50, 0x20, 0x20]) {
        opj::CODEC_FORMAT::OPJ_CODEC_JP2
    } else {
        opj::CODEC_FORMAT::OPJ_CODEC_J2K
    };
    let log = Mutex::new(String::new());
    let mut reader = Reader {
        data: stream,
        pos: 0,
    };
    let failed = |what: &str, log: &Mutex<String>| {
        let detail = log.lock().map(|l| l.clone()).unwrap_or_default();
        DecodeError::Invalid(if detail.is_empty() {
            what.to_string()
        } else {
            format!("{what}: {detail}")
        })
    };
    let mut s = Session {
        codec: std::ptr::null_mut(),
        stream: std::ptr::null_mut(),
        image: std::ptr::null_mut(),
    };
    let threads = budget::threads(MAX_THREADS);
    // SAFETY: every pointer handed to OpenJPEG (reader, log, image out-pointer) lives until
    // `s` is dropped at the end of this function, after the last OpenJPEG call.
    unsafe {
        s.codec = opj::opj_create_decompress(format);
        s.stream = opj::opj_stream_create(1 << 16, 1);
        if s.codec.is_null() || s.stream.is_null() {
            return Err(DecodeError::Invalid(
                "cannot create a JPEG 2000 decoder".to_string(),
            ));
        }
        let user = (&raw mut reader).cast::<c_void>();
        opj::opj_stream_set_read_function(s.stream, Some(read));
        opj::opj_stream_set_skip_function(s.stream, Some(skip));
        opj::opj_stream_set_seek_function(s.stream, Some(seek));
        opj::opj_stream_set_user_data(s.stream, user, None);
        opj::opj_stream_set_user_data_length(s.stream, stream.len() as u64);
        let log_ptr = (&raw const log).cast_mut().cast::<c_void>();
        opj::opj_set_error_handler(s.codec, Some(on_error), log_ptr);
        let mut params = std::mem::zeroed::<opj::opj_dparameters_t>();
        opj::opj_set_default_decoder_parameters(&mut params);
        if opj::opj_setup_decoder(s.codec, &mut params) == 0 {
            return Err(failed("cannot set up the JPEG 2000 decoder", &log));
        }
        // OpenJPEG decoders are strict by default: a truncated codestream is an error, not
        // a blurrier image. opj_decoder_set_strict_mode(1) must not be called to say so: as
        // a side effect it switches off the check for encoders that write one tile-part
        // too few in TNsot (GDCM/Kakadu files such as GDCMJ2K_TextGBR.dcm write 5 for 6),
        // and OpenJPEG then silently drops each tile's last tile-part (its last quality
        // layer), which turns a lossless file lossy.
        opj::opj_codec_set_threads(s.codec, threads as i32);
        if opj::opj_read_header(s.stream, s.codec, &mut s.image) == 0 || s.image.is_null() {
            return Err(failed("bad JPEG 2000 header", &log));
        }
    }
    // SAFETY: opj_read_header filled a valid image whose comps array has numcomps entries.
    let image = unsafe { &*s.image };
    let comps = unsafe { component_slice(image) };
    let precision = comps.iter().map(|c| c.prec).max().unwrap_or(0);
    shape.check_codestream(
        u64::from(image.x1.saturating_sub(image.x0)),
        u64::from(image.y1.saturating_sub(image.y0)),
        u64::from(image.numcomps),
        precision,
    )?;
    if let Some(c) = comps.iter().find(|c| c.dx != 1 || c.dy != 1) {
        return Err(DecodeError::Unsupported(format!(
            "subsampled JPEG 2000 components ({} x {}) are not supported",
            c.dx, c.dy
        )));
    }
    // Levels are only dropped for an image at the origin (DICOM's always are), where
    // each one halves the sides rounding up, which is what `Shape::halved` computes.
    let levels = if image.x0 == 0 && image.y0 == 0 {
        // SAFETY: the codec has read the main header.
        unsafe { resolution_levels(s.codec) }
    } else {
        1
    };
    let halvings = shape.halvings(min, levels.saturating_sub(1));
    let shape = &shape.halved(halvings);
    // SAFETY: as above; the image pointer stays owned by `s`.
    unsafe {
        if halvings > 0 && opj::opj_set_decoded_resolution_factor(s.codec, halvings) == 0 {
            return Err(failed(
                "cannot decode JPEG 2000 at a lower resolution",
                &log,
            ));
        }
        if opj::opj_decode(s.codec, s.stream, s.image) == 0 {
            return Err(failed("corrupt or truncated JPEG 2000 data", &log));
        }
        opj::opj_end_decompress(s.codec, s.stream);
    }
    // SAFETY: decoding does not reallocate the comps array.
    let comps = unsafe { component_slice(&*s.image) };
    let n = shape.pixels();
    let mut out = vec![0u8; shape.frame_bytes()];
    let (samples, bytes) = (shape.samples, shape.bytes);
    // A coarser level is a low-pass approximation that can overshoot the stored range
    // near edges (level 4 of a 10-bit radiograph reaches 1075): it saturates at the
    // range's ends instead of wrapping when the pixel pipeline masks it to Bits Stored.
    let (lo, hi) = if halvings == 0 {
        (i32::MIN, i32::MAX)
    } else {
        let bits = u32::from(layout.bits_stored.clamp(1, 32));
        let (lo, hi) = if layout.signed {
            (-(1i64 << (bits - 1)), (1i64 << (bits - 1)) - 1)
        } else {
            (0, (1i64 << bits) - 1)
        };
        (
            lo.max(i64::from(i32::MIN)) as i32,
            hi.min(i64::from(i32::MAX)) as i32,
        )
    };
    for (c, comp) in comps.iter().enumerate() {
        if comp.data.is_null() || comp.w as usize != shape.width || comp.h as usize != shape.height
        {
            return Err(DecodeError::Invalid(format!(
                "JPEG 2000 component {c} decoded to {} x {}, expected {} x {}",
                comp.w, comp.h, shape.width, shape.height
            )));
        }
        // SAFETY: OpenJPEG allocated w x h samples for this component, checked above.
        let values = unsafe { std::slice::from_raw_parts(comp.data, n) };
        for (i, &v) in values.iter().enumerate() {
            let v = v.clamp(lo, hi);
            let at = (i * samples + c) * bytes;
            // Two's complement in the output width: signed components come out negative.
            out[at..at + bytes].copy_from_slice(&v.to_le_bytes()[..bytes]);
        }
    }
    // The decoder has inverted any multi-component transform (YBR_ICT / YBR_RCT): the
    // components are now what the encoder was given, i.e. RGB.
    let photometric = if shape.samples == 3 && uses_mct(stream) {
        "RGB".to_string()
    } else {
        layout.photometric.clone()
    };
    Ok(RawFrame {
        width: shape.width,
        height: shape.height,
        data: out,
        bits_allocated: shape.bits(),
        photometric,
    })
}

/// The fewest resolution levels (wavelet decompositions + 1) any component's default
/// coding style has: the main header's COD and COC markers. A tile header that codes
/// fewer makes OpenJPEG refuse the reduced decode, which is reported as invalid data.
///
/// # Safety
/// `codec` must be a decoder that has read the main header.
unsafe fn resolution_levels(codec: *mut opj::opj_codec_t) -> u32 {
    // SAFETY: per the function's contract; the info is freed before returning.
    unsafe {
        let mut info = opj::opj_get_cstr_info(codec);
        if info.is_null() {
            return 1;
        }
        let tile = &(*info).m_default_tile_info;
        let levels = if tile.tccp_info.is_null() {
            1
        } else {
            std::slice::from_raw_parts(tile.tccp_info, (*info).nbcomps as usize)
                .iter()
                .map(|c| c.numresolutions)
                .min()
                .unwrap_or(1)
        };
        opj::opj_destroy_cstr_info(&mut info);
        levels.max(1)
    }
}

/// The image's components as a slice.
///
/// # Safety
/// Most tiles a codestream may declare. OpenJPEG sets up each declared tile's coding
/// parameters (about 5 KB) while reading the main header, before any data: a 200-byte
/// codestream claiming the standard's 65,535 tiles made it take 330 MB (found by the
/// fuzzer, twice that with two tile grids). Encoders tile DICOM frames in 256-1024 pixel
/// tiles, if at all: a 4096 x 4096 frame in 64 x 64 tiles is 4096.
const MAX_TILES: u64 = 4096;

/// The image and tile sizes of the SIZ marker segment (which follows SOC), checked before
/// OpenJPEG reads the header: the image must be the frame the DICOM header describes, and
/// the tile grid at most [`MAX_TILES`]. A codestream whose SIZ cannot be found is left to
/// OpenJPEG to refuse.
fn check_siz(stream: &[u8], shape: &Shape) -> Result<(), DecodeError> {
    let Some(at) = stream
        .windows(4)
        .take(4096)
        .position(|w| w == [0xFF, 0x4F, 0xFF, 0x51])
    else {
        return Ok(());
    };
    let siz = &stream[at + 4..];
    let be32 = |i: usize| -> Option<u64> {
        siz.get(i..i + 4)
            .map(|b| u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]])))
    };
    let fields = (|| {
        Some((
            be32(4)?,                                                      // Xsiz
            be32(8)?,                                                      // Ysiz
            be32(12)?,                                                     // XOsiz
            be32(16)?,                                                     // YOsiz
            be32(20)?,                                                     // XTsiz
            be32(24)?,                                                     // YTsiz
            be32(28)?,                                                     // XTOsiz
            be32(32)?,                                                     // YTOsiz
            u64::from(u16::from_be_bytes([*siz.get(36)?, *siz.get(37)?])), // Csiz
            u32::from(*siz.get(38)? & 0x7F) + 1, // Ssiz of the first component
        ))
    })();
    let Some((x, y, xo, yo, xt, yt, xto, yto, components, precision)) = fields else {
        return Err(DecodeError::Invalid(
            "JPEG 2000 SIZ marker segment is truncated".into(),
        ));
    };
    shape.check_codestream(
        x.saturating_sub(xo),
        y.saturating_sub(yo),
        components,
        precision,
    )?;
    if xt == 0 || yt == 0 || xto > xo || yto > yo {
        return Err(DecodeError::Invalid(format!(
            "JPEG 2000 tile grid is invalid: tiles of {xt} x {yt} from ({xto}, {yto}) for an image from ({xo}, {yo})"
        )));
    }
    let tiles = (x - xto).div_ceil(xt) * (y - yto).div_ceil(yt);
    if tiles > MAX_TILES {
        return Err(DecodeError::Invalid(format!(
            "JPEG 2000 codestream declares {tiles} tiles ({xt} x {yt} pixels each); at most {MAX_TILES} are accepted"
        )));
    }
    Ok(())
}

/// `image` must come from OpenJPEG, with `comps` holding `numcomps` entries (or null).
unsafe fn component_slice(image: &opj::opj_image_t) -> &[opj::opj_image_comp_t] {
    if image.comps.is_null() {
        return &[];
    }
    // SAFETY: per the function's contract.
    unsafe { std::slice::from_raw_parts(image.comps, image.numcomps as usize) }
}

/// Whether the main header's COD marker enables the multiple component transform.
fn uses_mct(stream: &[u8]) -> bool {
    // SOC then SIZ: a bare FF4F may occur earlier, in a JP2 header's ICC profile.
    let Some(start) = stream
        .windows(4)
        .position(|w| w == [0xFF, 0x4F, 0xFF, 0x51])
    else {
        return false;
    };
    let mut i = start + 2;
    while let Some(&[m0, m1, l0, l1]) = stream
        .get(i..i + 4)
        .and_then(|s| <&[u8; 4]>::try_from(s).ok())
    {
        let marker = u16::from_be_bytes([m0, m1]);
        if marker == 0xFF90 || marker == 0xFFD9 {
            return false; // SOT: the main header ended without a COD.
        }
        if marker == 0xFF52 {
            // Lcod(2) Scod(1) progression(1) layers(2) MCT(1).
            return stream.get(i + 8) == Some(&1);
        }
        i += 2 + usize::from(u16::from_be_bytes([l0, l1]));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SOC, then a SIZ for one 8-bit component of `w` x `h` in tiles of `t` x `t`.
    fn codestream(w: u32, h: u32, t: u32) -> Vec<u8> {
        let mut out = vec![0xFF, 0x4F, 0xFF, 0x51, 0, 41, 0, 0];
        for v in [w, h, 0, 0, t, t, 0, 0] {
            out.extend(v.to_be_bytes());
        }
        out.extend([0, 1, 7, 1, 1]);
        out
    }

    #[test]
    fn siz_is_checked_before_openjpeg_reads_the_header() {
        let shape = Shape {
            width: 512,
            height: 512,
            samples: 1,
            bytes: 1,
        };
        assert!(check_siz(&codestream(512, 512, 512), &shape).is_ok());
        assert!(check_siz(&codestream(512, 512, 8), &shape).is_ok()); // 4096 tiles
        // the fuzzer's input: 65,536 tiles of 2 x 2 (330 MB inside OpenJPEG before)
        let many = check_siz(&codestream(512, 512, 2), &shape).unwrap_err();
        assert!(many.to_string().contains("65536 tiles"), "{many}");
        let wide = check_siz(&codestream(16_776_960, 512, 512), &shape).unwrap_err();
        assert!(wide.to_string().contains("16776960 x 512"), "{wide}");
        assert!(check_siz(&codestream(512, 512, 0), &shape).is_err());
        assert!(check_siz(&codestream(512, 512, 512)[..20], &shape).is_err());
        assert!(check_siz(b"no marker here", &shape).is_ok()); // left to OpenJPEG
    }
}
