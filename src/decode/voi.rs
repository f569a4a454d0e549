//! The DICOM grey pixel pipeline, in the standard's order (PS3.3 C.11): modality LUT
//! (rescale slope/intercept) -> VOI (window, or a policy fallback) -> MONOCHROME1
//! inversion -> 8-bit display values.
//!
//! Policy `auto`: the file's first window when it has one (VOI LUT Function LINEAR);
//! otherwise 8-bit unsigned data without rescale is used as is (exactly what PIL shows
//! for such a file); otherwise min-max over the frame's modality values.

use super::DecodeError;
use super::dicom::{Frame, GreyFrame, Samples};
use crate::preprocess::RgbImage;
use crate::repository::manifest::DicomPolicy;

/// Display pixels of a frame under `policy`.
pub fn render(frame: &Frame, policy: &DicomPolicy) -> Result<RgbImage, DecodeError> {
    match &frame.samples {
        Samples::Rgb(rgb) => Ok(rgb.clone()),
        Samples::Grey(grey) => {
            let values = display(grey, policy)?;
            Ok(RgbImage::from_grey(frame.width, frame.height, &values))
        }
    }
}

/// Window LINEAR (PS3.3 C.11.2.1.2.1) onto 0..=255, rounded half away from zero.
fn window_linear(x: f64, center: f64, width: f64) -> f64 {
    let width = width.max(1.0);
    let low = center - 0.5 - (width - 1.0) / 2.0;
    let high = center - 0.5 + (width - 1.0) / 2.0;
    if x <= low {
        0.0
    } else if x > high {
        255.0
    } else {
        ((x - (center - 0.5)) / (width - 1.0) + 0.5) * 255.0
    }
}

fn display(grey: &GreyFrame, policy: &DicomPolicy) -> Result<Vec<u8>, DecodeError> {
    if policy.voi != "auto" {
        return Err(DecodeError::Unsupported(format!(
            "DICOM VOI policy {:?} is not supported",
            policy.voi
        )));
    }
    let (slope, intercept) = grey.rescale;
    let identity_rescale = slope == 1.0 && intercept == 0.0;
    let modality = |s: i32| f64::from(s) * slope + intercept;
    let mut out: Vec<u8> = if let Some((center, width)) = grey.window {
        grey.stored
            .iter()
            .map(|&s| window_linear(modality(s), center, width).round() as u8)
            .collect()
    } else if grey.bits_stored <= 8 && !grey.signed && identity_rescale {
        grey.stored.iter().map(|&s| s as u8).collect()
    } else {
        let (min, max) = grey
            .stored
            .iter()
            .map(|&s| modality(s))
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
        let range = max - min;
        grey.stored
            .iter()
            .map(|&s| {
                if range > 0.0 {
                    ((modality(s) - min) / range * 255.0).round() as u8
                } else {
                    0
                }
            })
            .collect()
    };
    if grey.monochrome1 {
        for v in &mut out {
            *v = 255 - *v;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_window_matches_the_standard() {
        // c = 2048, w = 4096: x <= -0.5 -> 0, x > 4094.5 -> 255, midpoint -> half.
        assert_eq!(window_linear(-1.0, 2048.0, 4096.0), 0.0);
        assert_eq!(window_linear(4095.0, 2048.0, 4096.0), 255.0);
        let mid = window_linear(2047.5, 2048.0, 4096.0);
        assert!((mid - 127.5).abs() < 1e-9, "{mid}");
    }

    #[test]
    fn monochrome1_is_inverted_after_voi() {
        let grey = GreyFrame {
            stored: vec![0, 255],
            bits_stored: 8,
            signed: false,
            rescale: (1.0, 0.0),
            window: None,
            monochrome1: true,
        };
        assert_eq!(
            display(&grey, &DicomPolicy::default()).unwrap(),
            vec![255, 0]
        );
    }
}
