//! DICOM Part 10 input: header checks against the limits, pixel data decoding with
//! dicom-pixeldata, and extraction of stored values for one frame.

use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use dicom_pixeldata::{PhotometricInterpretation, PixelDecoder, PlanarConfiguration};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::{DecodeError, Decoded, DicomIdentifiers, InputInfo, Limits, Pixels, check_size};
use crate::preprocess::RgbImage;

/// One decoded frame.
#[derive(Debug)]
pub struct Frame {
    /// Columns.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// Grey values with their LUT parameters, or colour pixels.
    pub samples: Samples,
}

/// The samples of a frame.
#[derive(Debug)]
pub enum Samples {
    /// One sample per pixel: stored values plus what turns them into display values.
    Grey(GreyFrame),
    /// Colour converted to RGB (no VOI applies to colour in DICOM).
    Rgb(RgbImage),
}

/// A monochrome frame's stored values and the attributes of its pixel pipeline.
#[derive(Debug)]
pub struct GreyFrame {
    /// Stored values, sign-extended, masked to Bits Stored.
    pub stored: Vec<i32>,
    /// Bits Stored.
    pub bits_stored: u16,
    /// Pixel Representation is signed.
    pub signed: bool,
    /// Rescale slope and intercept (modality LUT).
    pub rescale: (f64, f64),
    /// Window centre and width from the file, the first pair if several.
    pub window: Option<(f64, f64)>,
    /// MONOCHROME1: high values are dark; inverted after VOI.
    pub monochrome1: bool,
}

fn string(obj: &DefaultDicomObject, tag: dicom_core::Tag) -> String {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        .unwrap_or_default()
}

fn uint(obj: &DefaultDicomObject, tag: dicom_core::Tag) -> Option<u32> {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_int::<u32>().ok())
}

/// Reads the file and decodes frame `frame`.
pub fn decode(bytes: &[u8], frame: u32, limits: &Limits) -> Result<Decoded, DecodeError> {
    // Accept files with the 128-byte preamble and without it; both start the meta group
    // with "DICM".
    let body = if bytes.len() >= 132 && &bytes[128..132] == b"DICM" {
        &bytes[128..]
    } else if bytes.starts_with(b"DICM") {
        bytes
    } else {
        return Err(DecodeError::Invalid(
            "not a DICOM Part 10 file: no \"DICM\" prefix at byte 0 or 128".into(),
        ));
    };
    let obj = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Never)
        .from_reader(body)
        .map_err(|e| DecodeError::Invalid(format!("cannot parse DICOM: {e}")))?;

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
    match TransferSyntaxRegistry.get(&ts_uid) {
        Some(ts) if ts.can_decode_all() => {}
        Some(ts) => {
            return Err(DecodeError::Unsupported(format!(
                "transfer syntax {ts_uid} ({}) cannot be decoded by this build",
                ts.name()
            )));
        }
        None => {
            return Err(DecodeError::Unsupported(format!(
                "unknown transfer syntax {ts_uid}"
            )));
        }
    }
    if obj.element_opt(tags::PIXEL_DATA).ok().flatten().is_none() {
        return Err(DecodeError::Invalid(
            "DICOM file has no Pixel Data (7FE0,0010)".into(),
        ));
    }

    // Limits, from the header, before any pixel is decoded.
    let rows = uint(&obj, tags::ROWS).unwrap_or(0);
    let cols = uint(&obj, tags::COLUMNS).unwrap_or(0);
    let samples = uint(&obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1).max(1);
    let bits = uint(&obj, tags::BITS_ALLOCATED).unwrap_or(8).max(1);
    let frames = uint(&obj, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1);
    check_size(
        limits,
        u64::from(cols),
        u64::from(rows),
        u64::from(samples) * u64::from(bits.div_ceil(8)),
    )?;
    if frames > limits.max_frames {
        return Err(DecodeError::TooLarge(format!(
            "DICOM has {frames} frames, over the limit of {}",
            limits.max_frames
        )));
    }
    if frame >= frames {
        return Err(DecodeError::FrameOutOfRange { frame, frames });
    }

    let decoded = obj.decode_pixel_data_frame(frame).map_err(|e| {
        DecodeError::Invalid(format!(
            "cannot decode pixel data (transfer syntax {ts_uid}): {e}"
        ))
    })?;
    let photometric = decoded.photometric_interpretation().clone();
    let (width, height) = (decoded.columns(), decoded.rows());
    let samples = match photometric {
        PhotometricInterpretation::Monochrome1 | PhotometricInterpretation::Monochrome2 => {
            Samples::Grey(grey(&decoded, &photometric)?)
        }
        PhotometricInterpretation::Rgb | PhotometricInterpretation::YbrFull => {
            Samples::Rgb(colour(&decoded, &photometric)?)
        }
        other => {
            return Err(DecodeError::Unsupported(format!(
                "photometric interpretation {} is not supported yet",
                other.as_str()
            )));
        }
    };
    Ok(Decoded {
        info: InputInfo {
            width,
            height,
            frames,
            frame,
            format: "dicom".into(),
            color: photometric.as_str().to_string(),
        },
        pixels: Pixels::Dicom(Frame {
            width,
            height,
            samples,
        }),
        dicom: Some(ids),
    })
}

fn grey(
    decoded: &dicom_pixeldata::DecodedPixelData<'_>,
    photometric: &PhotometricInterpretation,
) -> Result<GreyFrame, DecodeError> {
    let bits_allocated = decoded.bits_allocated();
    let bits_stored = decoded.bits_stored().clamp(1, bits_allocated.max(1));
    let signed = decoded.pixel_representation() == dicom_pixeldata::PixelRepresentation::Signed;
    let n = decoded.rows() as usize * decoded.columns() as usize;
    let data = decoded.data();
    let bytes_per = usize::from(bits_allocated.div_ceil(8));
    if !matches!(bits_allocated, 8 | 16 | 32) {
        return Err(DecodeError::Unsupported(format!(
            "Bits Allocated {bits_allocated} is not supported yet for monochrome images"
        )));
    }
    if data.len() < n * bytes_per {
        return Err(DecodeError::Invalid(format!(
            "pixel data holds {} bytes, but {} x {} x {bits_allocated}-bit needs {}",
            data.len(),
            decoded.columns(),
            decoded.rows(),
            n * bytes_per
        )));
    }
    let mask: u32 = if bits_stored >= 32 {
        u32::MAX
    } else {
        (1u32 << bits_stored) - 1
    };
    let extend = |raw: u32| -> i32 {
        let v = raw & mask;
        if signed && bits_stored < 32 && v & (1 << (bits_stored - 1)) != 0 {
            (v as i64 - (1i64 << bits_stored)) as i32
        } else {
            v as i32
        }
    };
    let stored: Vec<i32> = match bits_allocated {
        8 => data[..n].iter().map(|&b| extend(u32::from(b))).collect(),
        16 => data[..2 * n]
            .chunks_exact(2)
            .map(|c| extend(u32::from(u16::from_le_bytes([c[0], c[1]]))))
            .collect(),
        _ => data[..4 * n]
            .chunks_exact(4)
            .map(|c| extend(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
    };
    let rescale = decoded
        .rescale()
        .ok()
        .and_then(|r| r.first().map(|r| (r.slope, r.intercept)))
        .unwrap_or((1.0, 0.0));
    let window = decoded
        .window()
        .ok()
        .flatten()
        .and_then(|w| w.first().map(|w| (w.center, w.width)));
    Ok(GreyFrame {
        stored,
        bits_stored,
        signed,
        rescale,
        window,
        monochrome1: *photometric == PhotometricInterpretation::Monochrome1,
    })
}

fn colour(
    decoded: &dicom_pixeldata::DecodedPixelData<'_>,
    photometric: &PhotometricInterpretation,
) -> Result<RgbImage, DecodeError> {
    if decoded.samples_per_pixel() != 3 || decoded.bits_allocated() != 8 {
        return Err(DecodeError::Unsupported(format!(
            "{} with {} samples of {} bits is not supported yet",
            photometric.as_str(),
            decoded.samples_per_pixel(),
            decoded.bits_allocated()
        )));
    }
    let (w, h) = (decoded.columns(), decoded.rows());
    let n = w as usize * h as usize;
    let data = decoded.data();
    if data.len() < 3 * n {
        return Err(DecodeError::Invalid(format!(
            "pixel data holds {} bytes, but {w} x {h} RGB needs {}",
            data.len(),
            3 * n
        )));
    }
    let mut rgb: Vec<u8> = match decoded.planar_configuration() {
        PlanarConfiguration::Standard => data[..3 * n].to_vec(),
        PlanarConfiguration::PixelFirst => (0..n)
            .flat_map(|i| [data[i], data[n + i], data[2 * n + i]])
            .collect(),
    };
    if *photometric == PhotometricInterpretation::YbrFull {
        for px in rgb.chunks_exact_mut(3) {
            let [y, cb, cr] = [px[0], px[1], px[2]].map(f64::from);
            // ITU-R BT.601 full range, as PS3.3 C.7.6.3.1.2 defines YBR_FULL.
            let r = y + 1.402 * (cr - 128.0);
            let g = y - 0.344136 * (cb - 128.0) - 0.714136 * (cr - 128.0);
            let b = y + 1.772 * (cb - 128.0);
            px[0] = r.round().clamp(0.0, 255.0) as u8;
            px[1] = g.round().clamp(0.0, 255.0) as u8;
            px[2] = b.round().clamp(0.0, 255.0) as u8;
        }
    }
    Ok(RgbImage {
        width: w,
        height: h,
        data: rgb,
    })
}
