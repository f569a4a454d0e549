//! DICOM Part 10 input: parsing, the header's frame layout checked against the limits,
//! the frame decoded by [`super::codec`], then samples and the attributes of the pixel
//! pipeline (modality LUT, VOI, palette; [`luts`]) gathered into a [`Frame`] for
//! [`super::voi`].

mod attributes;
mod frame;
mod luts;

use std::io::Read;

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_encoding::transfer_syntax::{Codec, Endianness, TransferSyntax};
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use self::attributes::{element, string, uint};
pub use self::frame::{ColourFrame, Frame, GreyFrame, Samples};
use self::luts::{file_voi, modality_lut, palette};
use super::codec::{self, FrameLayout, MinSize};
use super::photometric;
use super::scan::{self, Checked, DEFLATED};
use super::{DecodeError, Decoded, DicomIdentifiers, InputInfo, Limits, Pixels, check_size};

/// Saturates a header number into u16 (out-of-range values then fail validation).
fn small(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}

/// The header's description of a frame, validated.
pub fn layout(obj: &DefaultDicomObject) -> Result<FrameLayout, DecodeError> {
    let rows = uint(obj, tags::ROWS, "Rows")?.unwrap_or(0);
    let columns = uint(obj, tags::COLUMNS, "Columns")?.unwrap_or(0);
    let samples_per_pixel =
        small(uint(obj, tags::SAMPLES_PER_PIXEL, "Samples per Pixel")?.unwrap_or(1));
    let bits_allocated = small(uint(obj, tags::BITS_ALLOCATED, "Bits Allocated")?.unwrap_or(0));
    let bits_stored =
        small(uint(obj, tags::BITS_STORED, "Bits Stored")?.unwrap_or(u32::from(bits_allocated)));
    let photometric = string(obj, tags::PHOTOMETRIC_INTERPRETATION);
    let layout = FrameLayout {
        rows,
        columns,
        samples_per_pixel,
        bits_allocated,
        bits_stored,
        signed: uint(obj, tags::PIXEL_REPRESENTATION, "Pixel Representation")? == Some(1),
        planar_configuration: small(
            uint(obj, tags::PLANAR_CONFIGURATION, "Planar Configuration")?.unwrap_or(0),
        ),
        frames: uint(obj, tags::NUMBER_OF_FRAMES, "Number of Frames")?
            .unwrap_or(1)
            .max(1),
        photometric,
    };
    if !matches!(layout.bits_allocated, 1 | 8 | 16 | 32) {
        return Err(DecodeError::Unsupported(format!(
            "Bits Allocated {} is not supported (1, 8, 16 or 32)",
            layout.bits_allocated
        )));
    }
    if layout.bits_stored == 0 || layout.bits_stored > layout.bits_allocated {
        return Err(DecodeError::Invalid(format!(
            "Bits Stored {} must be within 1..={} (Bits Allocated)",
            layout.bits_stored, layout.bits_allocated
        )));
    }
    if !matches!(layout.samples_per_pixel, 1 | 3) {
        return Err(DecodeError::Unsupported(format!(
            "Samples per Pixel {} is not supported (1 or 3)",
            layout.samples_per_pixel
        )));
    }
    let expected_samples = match layout.photometric.as_str() {
        "MONOCHROME1" | "MONOCHROME2" | "PALETTE COLOR" => 1,
        "RGB" | "YBR_FULL" | "YBR_FULL_422" | "YBR_ICT" | "YBR_RCT" | "YBR_PARTIAL_420" => 3,
        "" => {
            return Err(DecodeError::Invalid(
                "Photometric Interpretation (0028,0004) is missing".into(),
            ));
        }
        other => {
            return Err(DecodeError::Unsupported(format!(
                "photometric interpretation {other} is not supported"
            )));
        }
    };
    if layout.samples_per_pixel != expected_samples {
        return Err(DecodeError::Invalid(format!(
            "{} needs {expected_samples} sample(s) per pixel, the header says {}",
            layout.photometric, layout.samples_per_pixel
        )));
    }
    Ok(layout)
}

/// Parses a DICOM Part 10 file (with or without its 128-byte preamble).
pub fn parse(bytes: &[u8]) -> Result<DefaultDicomObject, DecodeError> {
    read(bytes, None)
}

/// Parses a DICOM Part 10 file's header: every attribute before the pixel data.
pub fn parse_header(bytes: &[u8]) -> Result<InMemDicomObject, DecodeError> {
    read(bytes, Some(tags::PIXEL_DATA)).map(|file| file.into_inner())
}

/// The length check, then the parser, reading up to `until` (or everything).
fn read(bytes: &[u8], until: Option<Tag>) -> Result<DefaultDicomObject, DecodeError> {
    let options = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Never)
        .transfer_syntax_index(InflatedIndex);
    let options = match until {
        Some(tag) => options.read_until(tag),
        None => options,
    };
    let parsed = match scan::check_lengths(part10_body(bytes)?)? {
        Checked::Plain(body) => options.from_reader(body),
        Checked::Inflated { meta, data_set } => options.from_reader(meta.chain(&data_set[..])),
    };
    parsed.map_err(|e| DecodeError::Invalid(format!("cannot parse DICOM: {e}")))
}

/// A deflated data set after the length check inflated it (once, with zlib-rs): explicit
/// VR little endian bytes, read under the file's own UID so that the file meta group
/// still says how the file was sent.
static INFLATED: TransferSyntax = TransferSyntax::new(
    DEFLATED,
    "Deflated Explicit VR Little Endian (inflated)",
    Endianness::Little,
    true,
    Codec::None,
);

/// dicom-rs's registry, except that the deflated syntax reads already-inflated bytes.
struct InflatedIndex;

impl TransferSyntaxIndex for InflatedIndex {
    fn get(&self, uid: &str) -> Option<&TransferSyntax> {
        if uid.trim_end_matches(['\0', ' ']) == DEFLATED {
            Some(&INFLATED)
        } else {
            TransferSyntaxRegistry.get(uid)
        }
    }
}

/// The file after its preamble: from "DICM" on.
fn part10_body(bytes: &[u8]) -> Result<&[u8], DecodeError> {
    super::dicom_prefix(bytes)
        .map(|at| &bytes[at..])
        .ok_or_else(|| {
            DecodeError::Invalid(
                "not a DICOM Part 10 file: no \"DICM\" prefix at byte 0 or 128".into(),
            )
        })
}

/// Reads the file and decodes frame `frame`, at a lower resolution where its codec can
/// and `min` allows (see [`MinSize`]; `None`: full resolution).
pub fn decode(
    bytes: &[u8],
    frame: u32,
    limits: &Limits,
    min: Option<MinSize>,
) -> Result<Decoded, DecodeError> {
    let obj = parse(bytes)?;
    let ts_uid = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches(['\0', ' '])
        .to_string();
    let ids = DicomIdentifiers {
        study_instance_uid: string(&obj, tags::STUDY_INSTANCE_UID),
        series_instance_uid: string(&obj, tags::SERIES_INSTANCE_UID),
        sop_instance_uid: string(&obj, tags::SOP_INSTANCE_UID),
        sop_class_uid: string(&obj, tags::SOP_CLASS_UID),
        transfer_syntax_uid: ts_uid.clone(),
    };
    if TransferSyntaxRegistry.get(&ts_uid).is_none() {
        return Err(DecodeError::Unsupported(format!(
            "unknown transfer syntax {ts_uid}"
        )));
    }
    if element(&obj, tags::PIXEL_DATA).is_none() {
        return Err(DecodeError::Invalid(
            "DICOM file has no Pixel Data (7FE0,0010)".into(),
        ));
    }

    // Limits, from the header, before any pixel is decoded.
    let layout = layout(&obj)?;
    check_size(
        limits,
        u64::from(layout.columns),
        u64::from(layout.rows),
        u64::from(layout.samples_per_pixel) * u64::from(layout.bits_allocated.div_ceil(8)),
    )?;
    if layout.frames > limits.max_frames {
        return Err(DecodeError::TooLarge(format!(
            "DICOM has {} frames, over the limit of {}",
            layout.frames, limits.max_frames
        )));
    }
    if frame >= layout.frames {
        return Err(DecodeError::FrameOutOfRange {
            frame,
            frames: layout.frames,
        });
    }

    let raw = codec::decode_frame_at(&obj, frame, &layout, limits, min)?;
    let (full_width, full_height) = (layout.columns, layout.rows);
    // From here on the frame is what was decoded, which a reduced decode made smaller.
    let layout = FrameLayout {
        columns: raw.width as u32,
        rows: raw.height as u32,
        ..layout
    };
    let stored = photometric::stored_values(&raw, &layout)?;
    let (samples, photometric) = match raw.photometric.as_str() {
        "MONOCHROME1" | "MONOCHROME2" => (
            Samples::Grey(GreyFrame {
                stored,
                bits_stored: layout.bits_stored,
                signed: layout.signed,
                modality: modality_lut(&obj, frame)?,
                voi: file_voi(&obj, frame)?,
                monochrome1: raw.photometric == "MONOCHROME1",
            }),
            raw.photometric.clone(),
        ),
        "PALETTE COLOR" => {
            let [red, green, blue] = palette(&obj)?;
            (
                Samples::Colour(ColourFrame::Palette {
                    indices: stored,
                    red,
                    green,
                    blue,
                }),
                raw.photometric.clone(),
            )
        }
        other => (
            Samples::Colour(ColourFrame::Rgb {
                samples: photometric::to_rgb(stored, other, &layout)?,
                bits_stored: layout.bits_stored,
            }),
            "RGB".to_string(),
        ),
    };
    Ok(Decoded {
        info: InputInfo {
            width: full_width,
            height: full_height,
            decoded_width: layout.columns,
            decoded_height: layout.rows,
            frames: layout.frames,
            frame,
            format: "dicom".into(),
            color: layout.photometric.clone(),
        },
        pixels: Pixels::Dicom(Frame {
            width: layout.columns,
            height: layout.rows,
            samples,
            photometric,
            bits_stored: layout.bits_stored,
            bits_allocated: layout.bits_allocated,
        }),
        dicom: Some(ids),
    })
}
