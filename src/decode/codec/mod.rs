//! Transfer syntaxes: one DICOM frame's stored bytes -> native samples.
//!
//! Everything format-specific lives here: native (little/big endian, deflated; the parser
//! already undid deflate, and big endian per VR, which `native` turns into per-sample
//! byte order), encapsulated uncompressed, RLE, JPEG, JPEG-LS, JPEG 2000 and HTJ2K. What comes out is the same for all of them ([`RawFrame`]), so the pixel
//! pipeline (`dicom.rs`, `voi.rs`) never knows how the frame was stored.
//!
//! The codecs are called directly (libjpeg-turbo 3, CharLS, OpenJPEG) rather than through
//! dicom-rs's own adapters, because those refuse 12-bit JPEG and any frame compressed more
//! than 64:1, which real lossy files routinely are. `pixeldata` puts them behind dicom-rs's
//! pixel data reader interface, so dicom-pixeldata decodes with them too; it says why the
//! daemon does not go through that interface itself. The bound against decompression
//! bombs is the header instead: every decoder here checks the codestream's dimensions,
//! components and precision against [`FrameLayout`] before it decodes, and writes into one
//! buffer of exactly the header's frame size.
//!
//! Limits: the caller checks rows x columns x samples against [`Limits`] from the header
//! before calling; [`decode_frame`] checks again, so it is safe on its own.

mod budget;
mod fragments;
mod j2k;
mod jpeg;
mod jpegls;
mod native;
mod output;
mod pixeldata;
mod rle;
mod syntax;

use dicom_dictionary_std::tags;
use dicom_object::DefaultDicomObject;

use super::{DecodeError, Limits};
pub use pixeldata::Codecs;
use syntax::Syntax;

/// What the DICOM header says one frame looks like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameLayout {
    /// Rows (0028,0010).
    pub rows: u32,
    /// Columns (0028,0011).
    pub columns: u32,
    /// Samples per Pixel (0028,0002): 1 or 3.
    pub samples_per_pixel: u16,
    /// Bits Allocated (0028,0100): 1, 8, 16 or 32.
    pub bits_allocated: u16,
    /// Bits Stored (0028,0101).
    pub bits_stored: u16,
    /// Pixel Representation (0028,0103) is 1.
    pub signed: bool,
    /// Photometric Interpretation (0028,0004), trimmed.
    pub photometric: String,
    /// Planar Configuration (0028,0006): 0 interleaved, 1 planar.
    pub planar_configuration: u16,
    /// Number of Frames (0028,0008), at least 1.
    pub frames: u32,
}

/// The smallest frame a caller can use. Codecs that can decode at lower resolutions
/// (JPEG 2000 and HTJ2K by dropping wavelet levels, DCT-based JPEG by scaling its inverse
/// DCT to 1/2, 1/4 or 1/8) stop at the coarsest such resolution whose sides are both at
/// least this big; every other codec decodes the full frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MinSize {
    /// Columns.
    pub width: u32,
    /// Rows.
    pub height: u32,
}

/// One decoded frame, before any pixel-value transform.
#[derive(Clone, Debug)]
pub struct RawFrame {
    /// Samples, little-endian, `bits_allocated` wide (1-bit data unpacked to one byte per
    /// sample), interleaved (R, G, B per pixel) whatever the stored planar configuration:
    /// rows x columns x samples per pixel samples.
    ///
    /// One exception: native (uncompressed, not encapsulated) YBR_FULL_422 is subsampled
    /// as stored (PS3.3 C.7.6.3.1.2): `Y0 Y1 Cb Cr` for each pair of pixels in a row, i.e.
    /// rows x columns x 2 samples, with `photometric` "YBR_FULL_422"; the pixel pipeline
    /// expands it (`photometric::stored_values`). Encapsulated syntaxes never produce this
    /// layout: their YBR_FULL_422 (PS3.5 8.2) comes out with three samples per pixel
    /// (JPEG converted to RGB, RLE and the rest as YBR_FULL_422 at full size).
    pub data: Vec<u8>,
    /// Width of one sample in `data`: 8, 16 or 32.
    pub bits_allocated: u16,
    /// Columns of `data`: the header's, unless a [`MinSize`] let the codec decode at a
    /// lower resolution.
    pub width: usize,
    /// Rows of `data`, likewise.
    pub height: usize,
    /// Photometric interpretation of `data`: the header's, unless the codec converted
    /// colour (a JPEG decoder that outputs RGB from YBR_FULL_422 says `RGB`).
    pub photometric: String,
}

/// Decodes frame `frame` (0-based) of `obj`, whose header is `layout`, at full resolution.
pub fn decode_frame(
    obj: &DefaultDicomObject,
    frame: u32,
    layout: &FrameLayout,
    limits: &Limits,
) -> Result<RawFrame, DecodeError> {
    decode_frame_at(obj, frame, layout, limits, None)
}

/// Decodes frame `frame` (0-based) of `obj`, at a lower resolution where the codec can and
/// `min` allows it (see [`MinSize`]; `None`: full resolution).
pub fn decode_frame_at(
    obj: &DefaultDicomObject,
    frame: u32,
    layout: &FrameLayout,
    limits: &Limits,
    min: Option<MinSize>,
) -> Result<RawFrame, DecodeError> {
    let ts_uid = obj.meta().transfer_syntax().trim_end_matches(['\0', ' ']);
    let (syntax, shape, _decoding) = start(ts_uid, frame, layout, limits)?;
    let pixel_data = obj
        .element(tags::PIXEL_DATA)
        .map_err(|_| DecodeError::Invalid("the file has no Pixel Data (7FE0,0010)".to_string()))?;
    if let Syntax::Native = syntax {
        let big_endian = ts_uid == "1.2.840.10008.1.2.2";
        return native::decode(pixel_data.value(), frame, layout, &shape, big_endian);
    }
    let stream = fragments::frame_stream(obj, pixel_data.value(), frame, layout.frames)?;
    decode_stream(syntax, &stream, frame, ts_uid, layout, &shape, min)
}

/// What every way into the codecs checks first: the frame exists, the header's frame fits
/// `limits`, and the transfer syntax is one fptserve decodes. The claim on a core share
/// ([`budget`]) is held until the returned guard drops.
fn start(
    ts_uid: &str,
    frame: u32,
    layout: &FrameLayout,
    limits: &Limits,
) -> Result<(Syntax, output::Shape, budget::InFlight), DecodeError> {
    if frame >= layout.frames.max(1) {
        return Err(DecodeError::FrameOutOfRange {
            frame,
            frames: layout.frames.max(1),
        });
    }
    let shape = output::Shape::new(layout, limits)?;
    let syntax = Syntax::from_uid(ts_uid);
    if let Syntax::Unknown = syntax {
        return Err(DecodeError::Unsupported(format!(
            "transfer syntax {ts_uid} is not supported: fptserve decodes native, deflated, \
             encapsulated uncompressed, RLE, JPEG (baseline, extended, lossless), JPEG-LS, \
             JPEG 2000 and HTJ2K"
        )));
    }
    Ok((syntax, shape, budget::InFlight::enter()))
}

/// One encapsulated frame's bytes -> samples.
fn decode_stream(
    syntax: Syntax,
    stream: &[u8],
    frame: u32,
    ts_uid: &str,
    layout: &FrameLayout,
    shape: &output::Shape,
    min: Option<MinSize>,
) -> Result<RawFrame, DecodeError> {
    let what = syntax.name();
    let raw = match syntax {
        Syntax::EncapsulatedUncompressed => native::decode_bytes(stream, 0, layout, shape),
        Syntax::Rle => rle::decode(stream, layout, shape),
        Syntax::Jpeg => jpeg::decode(stream, layout, shape, min),
        Syntax::JpegLs => jpegls::decode(stream, layout, shape),
        Syntax::J2k => j2k::decode(stream, layout, shape, min),
        Syntax::Native | Syntax::Unknown => {
            return Err(DecodeError::Invalid(format!(
                "transfer syntax {ts_uid} does not encapsulate its Pixel Data"
            )));
        }
    };
    // Name the syntax in every codec error: "bad Huffman code" alone does not tell a PACS
    // administrator which of their modalities wrote the file.
    raw.map_err(|e| match e {
        DecodeError::Invalid(m) => {
            DecodeError::Invalid(format!("{what} frame {frame} ({ts_uid}): {m}"))
        }
        DecodeError::Unsupported(m) => {
            DecodeError::Unsupported(format!("{what} frame {frame} ({ts_uid}): {m}"))
        }
        other => other,
    })
}
