//! Decoding request payloads into pixels: DICOM ([`dicom`]) and PNG/JPEG/TIFF
//! ([`image`]). DICOM frames keep their modality values until a task's pixel policy
//! ([`voi`]) turns them into display pixels, because tasks may window differently.

pub mod codec;
pub mod dicom;
pub mod image;
pub mod photometric;
pub mod policy;
pub mod scan;
pub mod voi;

use std::borrow::Cow;

use serde::Serialize;

pub use self::policy::DicomPolicy;
use crate::preprocess::RgbImage;

/// Where a DICOM Part 10 file's "DICM" prefix is: after the 128-byte preamble, or at the
/// start when the preamble is left out. None: not a Part 10 file (an image file, say).
pub fn dicom_prefix(bytes: &[u8]) -> Option<usize> {
    [128, 0]
        .into_iter()
        .find(|&at| bytes.get(at..at + 4) == Some(b"DICM"))
}

/// True when the bytes are a DICOM Part 10 file (by their prefix).
pub fn is_dicom(bytes: &[u8]) -> bool {
    dicom_prefix(bytes).is_some()
}

/// Bounds on what one request may make the daemon allocate. Checked from the headers,
/// before the pixels are decoded.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Rows x columns of one frame.
    pub max_pixels: u64,
    /// Frames in a multi-frame DICOM.
    pub max_frames: u32,
    /// Decoded bytes of one frame.
    pub max_frame_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // 16384 x 16384: larger than any radiograph or whole mammogram.
            max_pixels: 16384 * 16384,
            max_frames: 4096,
            max_frame_bytes: 2 << 30,
        }
    }
}

/// Why a payload could not be turned into pixels.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not a valid file of the declared kind.
    #[error("{0}")]
    Invalid(String),
    /// A valid file using a feature this daemon does not decode.
    #[error("{0}")]
    Unsupported(String),
    /// The requested frame does not exist.
    #[error("frame {frame} requested, but the image has {frames} frame(s) (frames are 0-based)")]
    FrameOutOfRange {
        /// Requested index.
        frame: u32,
        /// Frames in the file.
        frames: u32,
    },
    /// Decoding would exceed a configured limit.
    #[error("{0}")]
    TooLarge(String),
}

/// What was decoded, reported back to the caller.
#[derive(Clone, Debug, Default, Serialize)]
pub struct InputInfo {
    /// Columns.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// Columns of the decoded frame: `width`, or fewer where a reduced-resolution decode
    /// stopped at a coarser level (see [`codec::MinSize`]).
    pub decoded_width: u32,
    /// Rows of the decoded frame, likewise.
    pub decoded_height: u32,
    /// Frames in the input.
    pub frames: u32,
    /// The frame used.
    pub frame: u32,
    /// `dicom`, `png`, `jpeg` or `tiff`.
    pub format: String,
    /// Photometric interpretation or colour type.
    pub color: String,
}

/// DICOM identifiers of the input (UIDs only: nothing that identifies a patient).
#[derive(Clone, Debug, Default, Serialize)]
pub struct DicomIdentifiers {
    /// (0020,000D).
    pub study_instance_uid: String,
    /// (0020,000E).
    pub series_instance_uid: String,
    /// (0008,0018).
    pub sop_instance_uid: String,
    /// (0008,0016).
    pub sop_class_uid: String,
    /// (0002,0010).
    pub transfer_syntax_uid: String,
}

/// Decoded pixels before any task-specific policy.
#[derive(Debug)]
pub enum Pixels {
    /// Already display pixels (PNG/JPEG/TIFF after PIL's `convert('RGB')` rules).
    Display(RgbImage),
    /// A DICOM frame in modality units, rendered per task policy.
    Dicom(dicom::Frame),
}

/// A decoded request payload.
#[derive(Debug)]
pub struct Decoded {
    /// The pixels.
    pub pixels: Pixels,
    /// What was decoded.
    pub info: InputInfo,
    /// Set for DICOM input.
    pub dicom: Option<DicomIdentifiers>,
}

impl Decoded {
    /// Display pixels under a task's DICOM pixel policy (ignored for non-DICOM input).
    pub fn render(&self, policy: &DicomPolicy) -> Cow<'_, RgbImage> {
        match &self.pixels {
            Pixels::Display(img) => Cow::Borrowed(img),
            Pixels::Dicom(frame) => Cow::Owned(voi::render(frame, policy)),
        }
    }
}

/// Checks a frame's size against the limits before anything is allocated for it.
pub(crate) fn check_size(
    limits: &Limits,
    width: u64,
    height: u64,
    bytes_per_pixel: u64,
) -> Result<(), DecodeError> {
    if width == 0 || height == 0 {
        return Err(DecodeError::Invalid(format!(
            "image has no pixels ({width} x {height})"
        )));
    }
    let pixels = width * height;
    if pixels > limits.max_pixels {
        return Err(DecodeError::TooLarge(format!(
            "image is {width} x {height} = {pixels} pixels, over the limit of {}",
            limits.max_pixels
        )));
    }
    if pixels * bytes_per_pixel > limits.max_frame_bytes {
        return Err(DecodeError::TooLarge(format!(
            "one decoded frame would take {} bytes, over the limit of {}",
            pixels * bytes_per_pixel,
            limits.max_frame_bytes
        )));
    }
    Ok(())
}
