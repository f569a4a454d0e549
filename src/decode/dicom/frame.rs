//! What a decoded DICOM frame is: its samples (grey with the attributes of their pixel
//! pipeline, or colour) and size, before any task's pixel policy.

use crate::decode::voi::{FileVoi, Lut, ModalityLut};

/// One decoded frame.
#[derive(Debug)]
pub struct Frame {
    /// Columns.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// Grey values with their pipeline, or colour.
    pub samples: Samples,
    /// The photometric interpretation of `samples` (colour spaces already converted).
    pub photometric: String,
    /// Bits Stored of the header.
    pub bits_stored: u16,
    /// Bits Allocated of the header.
    pub bits_allocated: u16,
}

/// The samples of a frame.
#[derive(Debug)]
pub enum Samples {
    /// MONOCHROME1/2: stored values plus what turns them into display values.
    Grey(GreyFrame),
    /// Colour, as RGB or palette indices.
    Colour(ColourFrame),
}

/// A monochrome frame's stored values and the attributes of its pixel pipeline.
#[derive(Debug)]
pub struct GreyFrame {
    /// Stored values, masked to Bits Stored and sign-extended.
    pub stored: Vec<i32>,
    /// Bits Stored.
    pub bits_stored: u16,
    /// Pixel Representation is signed.
    pub signed: bool,
    /// Modality LUT.
    pub modality: ModalityLut,
    /// The file's VOI.
    pub voi: FileVoi,
    /// MONOCHROME1: high values are dark; inverted after VOI.
    pub monochrome1: bool,
}

impl GreyFrame {
    /// A stored value as a number: 32-bit unsigned samples fill the i32 bit pattern.
    pub fn value(&self, stored: i32) -> i64 {
        if !self.signed && self.bits_stored == 32 {
            i64::from(stored as u32)
        } else {
            i64::from(stored)
        }
    }
}

/// A colour frame.
#[derive(Debug)]
pub enum ColourFrame {
    /// Interleaved R, G, B samples (YBR already converted).
    Rgb {
        /// `3 * width * height` samples.
        samples: Vec<i32>,
        /// Bits Stored.
        bits_stored: u16,
    },
    /// PALETTE COLOR: indices and the three tables.
    Palette {
        /// One index per pixel.
        indices: Vec<i32>,
        /// Red table.
        red: Lut,
        /// Green table.
        green: Lut,
        /// Blue table.
        blue: Lut,
    },
}
