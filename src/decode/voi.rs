//! The grey pixel pipeline, in the standard's order (PS3.3 C.11): modality LUT ->
//! VOI -> 8-bit -> MONOCHROME1 inversion.
//!
//! 1. Modality LUT: the Modality LUT Sequence's table when present, else
//!    `stored * RescaleSlope + RescaleIntercept` (1 and 0 when absent), in f64.
//! 2. VOI, per the task's [`DicomPolicy`]:
//!    - `auto` (default): the file's first VOI LUT when it has a VOI LUT Sequence; else
//!      its first window (Window Center/Width) with its VOI LUT Function; else, for
//!      8-bit-or-less unsigned data with no modality transform, `v * 255 / (2^bits - 1)`
//!      (8-bit values as they are, which is what PIL shows for such a file; a 1-bit mask
//!      becomes 0/255); else min-max over the frame.
//!    - `window`: the manifest's (or request's) centre, width and function.
//!    - `minmax`: `(v - min) / (max - min)` over the frame.
//!
//!    Windows map onto 0..=255: LINEAR per C.11.2.1.2.1, LINEAR_EXACT per C.11.2.1.3.2,
//!    SIGMOID per C.11.2.1.3.1. A VOI LUT's output is scaled by `255 / (2^bits - 1)`.
//! 3. `floor(y + 0.5)` clamped to 0..=255.
//! 4. MONOCHROME1 (high values dark): `255 - y`, after VOI as the standard orders it.
//!
//! Colour frames take no VOI: 8-bit samples are used as they are, deeper ones keep their
//! top 8 stored bits; palette indices go through the palette tables first.

use super::dicom::{ColourFrame, Frame, GreyFrame, Samples};
use super::policy::DicomPolicy;
use crate::preprocess::RgbImage;

/// A lookup table (modality, VOI or palette): PS3.3 C.11.1.1 descriptor semantics.
#[derive(Clone, Debug, PartialEq)]
pub struct Lut {
    /// Input value mapped to the first entry; inputs below it take the first entry.
    pub first_mapped: i64,
    /// Bits per entry (8 or 16).
    pub bits: u16,
    /// Entries; inputs past the last take the last.
    pub data: Vec<u32>,
}

impl Lut {
    /// The entry for input `x`.
    pub fn lookup(&self, x: i64) -> u32 {
        let last = self.data.len() as i64 - 1;
        let i = (x - self.first_mapped).clamp(0, last.max(0));
        self.data.get(i as usize).copied().unwrap_or(0)
    }
}

/// VOI LUT Function (0028,1056).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VoiFunction {
    /// LINEAR, the default.
    #[default]
    Linear,
    /// LINEAR_EXACT.
    LinearExact,
    /// SIGMOID.
    Sigmoid,
}

impl VoiFunction {
    /// Parses the DICOM code string or the manifest's lower-case name.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_uppercase().as_str() {
            "" | "LINEAR" => Some(VoiFunction::Linear),
            "LINEAR_EXACT" => Some(VoiFunction::LinearExact),
            "SIGMOID" => Some(VoiFunction::Sigmoid),
            _ => None,
        }
    }

    /// The manifest's lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            VoiFunction::Linear => "linear",
            VoiFunction::LinearExact => "linear_exact",
            VoiFunction::Sigmoid => "sigmoid",
        }
    }
}

/// A window: centre, width and function.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Window {
    /// Window Center.
    pub center: f64,
    /// Window Width.
    pub width: f64,
    /// VOI LUT Function.
    pub function: VoiFunction,
}

impl Window {
    /// Maps a modality value onto 0..=255 (not yet rounded).
    pub fn apply(&self, x: f64) -> f64 {
        let (c, w) = (self.center, self.width);
        match self.function {
            VoiFunction::Linear => {
                let w = w.max(1.0);
                if x <= c - 0.5 - (w - 1.0) / 2.0 {
                    0.0
                } else if x > c - 0.5 + (w - 1.0) / 2.0 {
                    255.0
                } else {
                    ((x - (c - 0.5)) / (w - 1.0) + 0.5) * 255.0
                }
            }
            VoiFunction::LinearExact => {
                if x <= c - w / 2.0 {
                    0.0
                } else if x > c + w / 2.0 {
                    255.0
                } else {
                    ((x - c) / w + 0.5) * 255.0
                }
            }
            VoiFunction::Sigmoid => 255.0 / (1.0 + (-4.0 * (x - c) / w).exp()),
        }
    }
}

/// The modality transform of a frame.
#[derive(Clone, Debug, PartialEq)]
pub enum ModalityLut {
    /// Rescale Slope and Intercept.
    Rescale {
        /// (0028,1053).
        slope: f64,
        /// (0028,1052).
        intercept: f64,
    },
    /// Modality LUT Sequence (0028,3000).
    Table(Lut),
}

impl ModalityLut {
    /// True when it changes nothing.
    pub fn is_identity(&self) -> bool {
        matches!(self, ModalityLut::Rescale { slope, intercept } if *slope == 1.0 && *intercept == 0.0)
    }

    /// The modality value of a stored value.
    pub fn apply(&self, stored: i64) -> f64 {
        match self {
            ModalityLut::Rescale { slope, intercept } => stored as f64 * slope + intercept,
            ModalityLut::Table(lut) => f64::from(lut.lookup(stored)),
        }
    }
}

/// The VOI a file carries.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FileVoi {
    /// VOI LUT Sequence tables.
    pub luts: Vec<Lut>,
    /// Window Center/Width pairs with the file's VOI LUT Function.
    pub windows: Vec<Window>,
}

fn to_u8(y: f64) -> u8 {
    (y + 0.5).floor().clamp(0.0, 255.0) as u8
}

/// Display pixels of a frame under `policy`.
pub fn render(frame: &Frame, policy: &DicomPolicy) -> RgbImage {
    match &frame.samples {
        Samples::Grey(grey) => {
            let values = grey_display(grey, policy);
            RgbImage::from_grey(frame.width, frame.height, values)
        }
        Samples::Colour(colour) => RgbImage::rgb(frame.width, frame.height, colour_display(colour)),
    }
}

fn colour_display(colour: &ColourFrame) -> Vec<u8> {
    match colour {
        ColourFrame::Rgb {
            samples,
            bits_stored,
        } => {
            // Colour samples are unsigned; 32-bit ones fill the i32 bit pattern.
            let shift = bits_stored.saturating_sub(8);
            samples
                .iter()
                .map(|&v| ((v as u32) >> shift).min(255) as u8)
                .collect()
        }
        ColourFrame::Palette {
            indices,
            red,
            green,
            blue,
        } => indices
            .iter()
            .flat_map(|&i| {
                [red, green, blue].map(|lut| {
                    let v = lut.lookup(i64::from(i));
                    if lut.bits > 8 {
                        (v >> 8) as u8
                    } else {
                        v.min(255) as u8
                    }
                })
            })
            .collect(),
    }
}

/// Modality -> VOI -> 8 bits -> MONOCHROME1 inversion.
pub fn grey_display(grey: &GreyFrame, policy: &DicomPolicy) -> Vec<u8> {
    let modality = |s: i32| grey.modality.apply(grey.value(s));
    let minmax = || -> Box<dyn Fn(i32) -> u8 + '_> {
        let (min, max) = modality_range(grey);
        let range = max - min;
        Box::new(move |s| {
            if range > 0.0 {
                to_u8((modality(s) - min) / range * 255.0)
            } else {
                0
            }
        })
    };
    let window = |w: Window| -> Box<dyn Fn(i32) -> u8 + '_> {
        Box::new(move |s| to_u8(w.apply(modality(s))))
    };
    let display: Box<dyn Fn(i32) -> u8 + '_> = match policy {
        DicomPolicy::Auto => {
            if let Some(lut) = grey.voi.luts.first() {
                let scale = 255.0 / ((1u64 << lut.bits.min(32)) - 1) as f64;
                Box::new(move |s| to_u8(f64::from(lut.lookup(modality(s) as i64)) * scale))
            } else if let Some(w) = grey.voi.windows.first() {
                window(*w)
            } else if grey.bits_stored <= 8 && !grey.signed && grey.modality.is_identity() {
                let scale = 255.0 / f64::from((1u32 << grey.bits_stored) - 1);
                Box::new(move |s| to_u8(f64::from(s) * scale))
            } else {
                minmax()
            }
        }
        DicomPolicy::MinMax => minmax(),
        DicomPolicy::Window(w) => window(*w),
    };
    if grey.monochrome1 {
        map_stored(grey, |s| 255 - display(s))
    } else {
        map_stored(grey, display)
    }
}

/// The stored values' range when a table of every possible value is cheaper than the pixels.
fn possible_values(grey: &GreyFrame) -> Option<std::ops::Range<i32>> {
    if !(1..=16).contains(&grey.bits_stored) || grey.stored.len() <= 1 << grey.bits_stored {
        return None;
    }
    let lowest = if grey.signed {
        -(1i32 << (grey.bits_stored - 1))
    } else {
        0
    };
    Some(lowest..lowest + (1i32 << grey.bits_stored))
}

/// `display` of every stored value. Display pixels are a function of the stored value alone,
/// so up to 16 bits it is evaluated once per possible value into a table (65,536 evaluations
/// instead of one per pixel: 9 million for a 3000x3000 image), with identical results.
fn map_stored(grey: &GreyFrame, display: impl Fn(i32) -> u8) -> Vec<u8> {
    let Some(values) = possible_values(grey) else {
        return grey.stored.iter().map(|&s| display(s)).collect();
    };
    let lowest = values.start;
    let table: Vec<u8> = values.map(&display).collect();
    grey.stored
        .iter()
        .map(|&s| match table.get(s.wrapping_sub(lowest) as usize) {
            Some(&v) => v,
            None => display(s),
        })
        .collect()
}

/// Lowest and highest modality value of the frame's pixels.
fn modality_range(grey: &GreyFrame) -> (f64, f64) {
    let modality = |s: i32| grey.modality.apply(grey.value(s));
    let fold = |values: &mut dyn Iterator<Item = f64>| {
        values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        })
    };
    let Some(values) = possible_values(grey) else {
        return fold(&mut grey.stored.iter().map(|&s| modality(s)));
    };
    // which stored values occur, then the modality transform of those only
    let lowest = values.start;
    let mut present = vec![false; values.len()];
    let mut outside = Vec::new();
    for &s in &grey.stored {
        match present.get_mut(s.wrapping_sub(lowest) as usize) {
            Some(p) => *p = true,
            None => outside.push(s),
        }
    }
    fold(
        &mut values
            .zip(&present)
            .filter(|(_, p)| **p)
            .map(|(s, _)| s)
            .chain(outside)
            .map(modality),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linear(c: f64, w: f64) -> Window {
        Window {
            center: c,
            width: w,
            function: VoiFunction::Linear,
        }
    }

    #[test]
    fn linear_window_matches_the_standard() {
        // c = 2048, w = 4096: x <= -0.5 -> 0, x > 4094.5 -> 255, midpoint -> half.
        assert_eq!(linear(2048.0, 4096.0).apply(-1.0), 0.0);
        assert_eq!(linear(2048.0, 4096.0).apply(4095.0), 255.0);
        let mid = linear(2048.0, 4096.0).apply(2047.5);
        assert!((mid - 127.5).abs() < 1e-9, "{mid}");
    }

    #[test]
    fn linear_exact_and_sigmoid_are_centred() {
        let exact = Window {
            function: VoiFunction::LinearExact,
            ..linear(100.0, 50.0)
        };
        assert_eq!(exact.apply(100.0), 127.5);
        assert_eq!(exact.apply(75.0), 0.0);
        let sigmoid = Window {
            function: VoiFunction::Sigmoid,
            ..linear(100.0, 50.0)
        };
        assert_eq!(sigmoid.apply(100.0), 127.5);
    }

    #[test]
    fn lut_clamps_outside_its_range() {
        let lut = Lut {
            first_mapped: -2,
            bits: 16,
            data: vec![10, 20, 30],
        };
        assert_eq!(
            [-5, -2, -1, 0, 9].map(|x| lut.lookup(x)),
            [10, 10, 20, 30, 30]
        );
    }

    #[test]
    fn monochrome1_is_inverted_after_voi() {
        let grey = GreyFrame {
            stored: vec![0, 255],
            bits_stored: 8,
            signed: false,
            modality: ModalityLut::Rescale {
                slope: 1.0,
                intercept: 0.0,
            },
            voi: FileVoi::default(),
            monochrome1: true,
        };
        assert_eq!(grey_display(&grey, &DicomPolicy::default()), vec![255, 0]);
    }

    /// Pixels that use the table path and the same values as a tiny frame (per-pixel path).
    fn both_paths(
        bits: u16,
        signed: bool,
        modality: ModalityLut,
        voi: FileVoi,
        policy: &DicomPolicy,
    ) {
        let span = 1i64 << bits;
        let lowest = if signed { -(span / 2) } else { 0 };
        // a scrambled walk over every possible value, more pixels than values
        let stored: Vec<i32> = (0..span + 17)
            .map(|i| (lowest + (i * 7919) % span) as i32)
            .collect();
        let frame = |stored: Vec<i32>| GreyFrame {
            stored,
            bits_stored: bits,
            signed,
            modality: modality.clone(),
            voi: voi.clone(),
            monochrome1: signed,
        };
        let big = frame(stored.clone());
        let by_modality = |s: &&i32| modality.apply(i64::from(**s));
        let extremes = [
            *stored
                .iter()
                .min_by(|a, b| by_modality(a).total_cmp(&by_modality(b)))
                .unwrap(),
            *stored
                .iter()
                .max_by(|a, b| by_modality(a).total_cmp(&by_modality(b)))
                .unwrap(),
        ];
        assert!(
            possible_values(&big).is_some(),
            "{bits} bits take the table path"
        );
        let table = grey_display(&big, policy);
        for (chunk, want) in stored.chunks(3).zip(table.chunks(3)) {
            let small = frame(chunk.to_vec());
            assert!(possible_values(&small).is_none());
            // the per-pixel path, with the big frame's min-max range forced by two extra pixels
            let mut pixels = chunk.to_vec();
            pixels.extend(extremes);
            let got = grey_display(&frame(pixels), policy);
            assert_eq!(
                &got[..chunk.len()],
                want,
                "{bits} bits, signed {signed}, {chunk:?}"
            );
        }
    }

    #[test]
    fn display_table_equals_per_pixel_evaluation() {
        let rescale = ModalityLut::Rescale {
            slope: -1.5,
            intercept: 1024.0,
        };
        let window = FileVoi {
            luts: vec![],
            windows: vec![Window {
                function: VoiFunction::Sigmoid,
                ..linear(300.0, 900.0)
            }],
        };
        let auto = DicomPolicy::default();
        let minmax = DicomPolicy::MinMax;
        both_paths(12, false, rescale.clone(), window.clone(), &auto);
        both_paths(12, true, rescale.clone(), FileVoi::default(), &auto);
        both_paths(10, true, rescale, FileVoi::default(), &minmax);
        let table = ModalityLut::Table(Lut {
            first_mapped: -100,
            bits: 16,
            data: (0..400).map(|i| (i * 37 % 1000) as u32).collect(),
        });
        both_paths(9, true, table, FileVoi::default(), &minmax);
        let identity = ModalityLut::Rescale {
            slope: 1.0,
            intercept: 0.0,
        };
        both_paths(7, false, identity, FileVoi::default(), &auto);
    }
}
