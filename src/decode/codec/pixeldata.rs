//! fptserve's codecs behind dicom-rs's pixel data reader interface.
//!
//! dicom-rs looks up a transfer syntax's decoder in dicom-transfer-syntax-registry; a crate
//! may submit its own for a syntax whose built-in entry has none. This module submits
//! [`Codecs`] for RLE, every JPEG process, JPEG-LS, JPEG 2000 and HTJ2K (fptserve enables no
//! codec of dicom-rs's own, so those entries are empty), so that
//! `dicom_pixeldata::PixelDecoder` on any object in this process decodes with the same
//! libjpeg-turbo, CharLS and OpenJPEG calls as the daemon, and the same checks against the
//! header. `tests/pixeldata.rs` holds it equal to the daemon's decode for every syntax file
//! of the test corpus.
//!
//! The daemon itself calls [`super::decode_frame_at`], not this interface, and keeps its
//! own frame work where dicom-pixeldata 0.10.1 differs, as measured on the test corpus of
//! tests/dicom_syntaxes.rs (every syntax and layout, through `decode_pixel_data_frame`):
//! - the interface cannot ask for a lower resolution ([`super::MinSize`]), and its answer
//!   says neither at which size nor in which colour space the frame came out
//!   (dicom-pixeldata labels every three-sample result RGB, so this adapter converts YBR to
//!   RGB, which the daemon does later, once, on stored values);
//! - it cannot see the Extended Offset Table (7FE0,0001), and dicom-pixeldata leaves
//!   finding a frame's fragments to each reader: [`super::fragments`] does it once for all;
//! - dicom-pixeldata's native path returns 1-bit frames from byte boundaries (32 of the 35
//!   samples of each 7x5 frame, wrong from the second frame on) where PS3.5 8.1.1 packs
//!   frames bit after bit, and planar colour as stored: [`super::native`] unpacks and
//!   interleaves. Every other native file of the corpus came out byte-identical.

use std::borrow::Cow;

use dicom_encoding::adapters::{
    DecodeError as DicomDecodeError, DecodeResult, NeverPixelAdapter, PixelDataObject,
    PixelDataReader,
};
use dicom_encoding::submit_ele_transfer_syntax;
use dicom_encoding::transfer_syntax::{Codec, NeverAdapter};

use super::syntax::Syntax;
use super::{FrameLayout, RawFrame, decode_stream, fragments, start};
use crate::decode::{DecodeError, Limits, photometric};

/// fptserve's decoders as one dicom-rs pixel data reader; the transfer syntax picks the
/// codec.
#[derive(Clone, Copy, Debug, Default)]
pub struct Codecs;

impl PixelDataReader for Codecs {
    fn decode_frame(
        &self,
        src: &dyn PixelDataObject,
        frame: u32,
        dst: &mut Vec<u8>,
    ) -> DecodeResult<()> {
        let raw = decode(src, frame).map_err(|e| DicomDecodeError::Custom {
            message: e.to_string(),
            source: Some(Box::new(e)),
        })?;
        if dst.is_empty() {
            *dst = raw.data;
        } else {
            dst.extend_from_slice(&raw.data);
        }
        Ok(())
    }
}

/// Frame `frame` of `src` at full resolution, interleaved, colour as RGB.
fn decode(src: &dyn PixelDataObject, frame: u32) -> Result<RawFrame, DecodeError> {
    let ts_uid = src.transfer_syntax_uid().trim_end_matches(['\0', ' ']);
    let layout = layout(src);
    let (syntax, shape, _decoding) = start(ts_uid, frame, &layout, &Limits::default())?;
    if matches!(syntax, Syntax::Native | Syntax::EncapsulatedUncompressed) {
        return Err(DecodeError::Unsupported(format!(
            "fptserve submits no reader for transfer syntax {ts_uid}"
        )));
    }
    let fragments: Vec<Cow<'_, [u8]>> = (0..src.number_of_fragments().unwrap_or(0) as usize)
        .map_while(|i| src.fragment(i))
        .collect();
    let bot = src.offset_table().unwrap_or_default();
    let range = fragments::frame_fragments(&fragments, &bot, None, frame, layout.frames)?;
    let stream = fragments::joined(&fragments[range]);
    let raw = decode_stream(syntax, &stream, frame, ts_uid, &layout, &shape, None)?;
    as_rgb(raw, &layout)
}

/// The header as the interface exposes it, with the daemon's defaults
/// (`crate::decode::dicom::layout`) for absent attributes.
fn layout(src: &dyn PixelDataObject) -> FrameLayout {
    let bits_allocated = src.bits_allocated().unwrap_or(0);
    FrameLayout {
        rows: src.rows().map_or(0, u32::from),
        columns: src.cols().map_or(0, u32::from),
        samples_per_pixel: src.samples_per_pixel().unwrap_or(1),
        bits_allocated,
        bits_stored: src.bits_stored().unwrap_or(bits_allocated),
        // Pixel Representation is not part of the interface; only reduced-resolution
        // decoding reads it, which the interface never asks for.
        signed: false,
        photometric: src
            .photometric_interpretation()
            .unwrap_or_default()
            .trim_matches(['\0', ' '])
            .to_string(),
        // Planar Configuration neither: only native layouts read it, and no reader is
        // submitted for those.
        planar_configuration: 0,
        frames: src.number_of_frames().unwrap_or(1).max(1),
    }
}

/// dicom-pixeldata takes every three-sample frame a reader returns as RGB: a codec's YBR
/// output (RLE stores YBR_FULL as such) goes through the daemon's own conversion
/// ([`photometric::to_rgb`]).
fn as_rgb(raw: RawFrame, layout: &FrameLayout) -> Result<RawFrame, DecodeError> {
    if !matches!(raw.photometric.as_str(), "YBR_FULL" | "YBR_FULL_422") {
        return Ok(raw);
    }
    let values = photometric::stored_values(&raw, layout)?;
    let rgb = photometric::to_rgb(values, &raw.photometric, layout)?;
    let data = match raw.bits_allocated {
        8 => rgb.iter().map(|&v| v as u8).collect(),
        _ => rgb.iter().flat_map(|&v| (v as u16).to_le_bytes()).collect(),
    };
    Ok(RawFrame {
        data,
        photometric: "RGB".to_string(),
        ..raw
    })
}

/// Every encapsulated syntax fptserve decodes with its own codecs, as dicom-rs names them.
macro_rules! submit_codecs {
    ($($uid:literal => $name:literal),* $(,)?) => {$(
        submit_ele_transfer_syntax!(
            $uid,
            $name,
            Codec::<NeverAdapter, Codecs, NeverPixelAdapter>::EncapsulatedPixelData(
                Some(Codecs),
                None
            )
        );
    )*};
}

submit_codecs! {
    "1.2.840.10008.1.2.5" => "RLE Lossless",
    "1.2.840.10008.1.2.4.50" => "JPEG Baseline (Process 1)",
    "1.2.840.10008.1.2.4.51" => "JPEG Extended (Process 2 & 4)",
    "1.2.840.10008.1.2.4.57" => "JPEG Lossless, Non-Hierarchical (Process 14)",
    "1.2.840.10008.1.2.4.70" => "JPEG Lossless, Non-Hierarchical, First-Order Prediction",
    "1.2.840.10008.1.2.4.80" => "JPEG-LS Lossless Image Compression",
    "1.2.840.10008.1.2.4.81" => "JPEG-LS Lossy (Near-Lossless) Image Compression",
    "1.2.840.10008.1.2.4.90" => "JPEG 2000 Image Compression (Lossless Only)",
    "1.2.840.10008.1.2.4.91" => "JPEG 2000 Image Compression",
    "1.2.840.10008.1.2.4.201" => "High-Throughput JPEG 2000 Image Compression (Lossless Only)",
    "1.2.840.10008.1.2.4.202" => "High-Throughput JPEG 2000 with RPCL Options Image Compression (Lossless Only)",
    "1.2.840.10008.1.2.4.203" => "High-Throughput JPEG 2000 Image Compression",
}
