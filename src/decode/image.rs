//! PNG, JPEG and TIFF input with the `image` crate, converted to RGB by the rules of PIL's
//! `convert('RGB')`, which is what the authors' training pipeline applied:
//! grey is replicated, alpha is dropped (not composited), 16-bit grey is clipped at 255
//! (PIL's `I;16` -> `RGB` conversion clips rather than rescales), and 16-bit RGB keeps its
//! high byte (PIL reads such PNGs as 8-bit RGB).

use std::io::Cursor;

use image::{DynamicImage, ImageFormat, ImageReader};

use super::{DecodeError, Decoded, InputInfo, Limits, Pixels, check_size};
use crate::preprocess::RgbImage;

fn format_name(format: ImageFormat) -> Option<&'static str> {
    match format {
        ImageFormat::Png => Some("png"),
        ImageFormat::Jpeg => Some("jpeg"),
        ImageFormat::Tiff => Some("tiff"),
        _ => None,
    }
}

/// Decodes a PNG, JPEG or TIFF file.
pub fn decode(bytes: &[u8], frame: u32, limits: &Limits) -> Result<Decoded, DecodeError> {
    if frame != 0 {
        return Err(DecodeError::FrameOutOfRange { frame, frames: 1 });
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DecodeError::Invalid(format!("cannot read image: {e}")))?;
    let format = reader.format().and_then(format_name).ok_or_else(|| {
        DecodeError::Invalid(
            "image bytes are not PNG, JPEG or TIFF (for DICOM use the dicom field)".into(),
        )
    })?;
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| DecodeError::Invalid(format!("cannot read {format} header: {e}")))?;
    // Up to 8 bytes per pixel (16-bit RGBA) while decoding.
    check_size(limits, u64::from(width), u64::from(height), 8)?;

    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DecodeError::Invalid(format!("cannot read image: {e}")))?;
    let mut image_limits = image::Limits::default();
    image_limits.max_alloc = Some(limits.max_frame_bytes);
    reader.limits(image_limits);
    let image = reader
        .decode()
        .map_err(|e| DecodeError::Invalid(format!("cannot decode {format}: {e}")))?;
    let color = format!("{:?}", image.color());
    let rgb = to_rgb(image)?;
    Ok(Decoded {
        info: InputInfo {
            width: rgb.width,
            height: rgb.height,
            decoded_width: rgb.width,
            decoded_height: rgb.height,
            frames: 1,
            frame: 0,
            format: format.into(),
            color,
        },
        pixels: Pixels::Display(rgb),
        dicom: None,
    })
}

fn to_rgb(image: DynamicImage) -> Result<RgbImage, DecodeError> {
    let (width, height) = (image.width(), image.height());
    let data: Vec<u8> = match image {
        DynamicImage::ImageLuma8(g) => g.pixels().flat_map(|p| [p.0[0]; 3]).collect(),
        DynamicImage::ImageLumaA8(g) => g.pixels().flat_map(|p| [p.0[0]; 3]).collect(),
        DynamicImage::ImageRgb8(rgb) => rgb.into_raw(),
        DynamicImage::ImageRgba8(rgba) => rgba
            .pixels()
            .flat_map(|p| [p.0[0], p.0[1], p.0[2]])
            .collect(),
        DynamicImage::ImageLuma16(g) => g
            .pixels()
            .flat_map(|p| [p.0[0].min(255) as u8; 3])
            .collect(),
        DynamicImage::ImageLumaA16(g) => g
            .pixels()
            .flat_map(|p| [p.0[0].min(255) as u8; 3])
            .collect(),
        DynamicImage::ImageRgb16(rgb) => rgb
            .pixels()
            .flat_map(|p| p.0.map(|v| (v >> 8) as u8))
            .collect(),
        DynamicImage::ImageRgba16(rgba) => rgba
            .pixels()
            .flat_map(|p| [p.0[0], p.0[1], p.0[2]].map(|v| (v >> 8) as u8))
            .collect(),
        other => {
            return Err(DecodeError::Unsupported(format!(
                "colour type {:?} is not supported (8/16-bit grey or RGB(A) only)",
                other.color()
            )));
        }
    };
    Ok(RgbImage::rgb(width, height, data))
}
