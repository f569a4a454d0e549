//! Preprocessing: display pixels -> normalised f32 NCHW tensors, exactly as the authors'
//! torchvision pipeline (`Resize` with PIL bilinear, `ToTensor`, `Normalize`).

pub mod resize;

/// An 8-bit RGB image, interleaved, row-major: what PIL's `convert('RGB')` yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    /// Columns.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// `width * height * 3` samples.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Replicates a grey image into three channels (PIL `L` -> `RGB`).
    pub fn from_grey(width: u32, height: u32, grey: &[u8]) -> Self {
        let data = grey.iter().flat_map(|&v| [v, v, v]).collect();
        RgbImage {
            width,
            height,
            data,
        }
    }
}

/// Per-channel normalisation (`torchvision.transforms.Normalize`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Normalization {
    /// Subtracted after scaling to [0, 1].
    pub mean: [f32; 3],
    /// Divided by after subtracting the mean.
    pub std: [f32; 3],
}

/// Resizes to `[height, width]` and returns a `[1, 3, height, width]` f32 tensor.
///
/// The arithmetic order is torchvision's, in f32: `v / 255`, then `(x - mean) / std`.
/// Changing it (say, to a fused multiply-add) moves values by an ulp, which is enough
/// to break parity with the reference numbers.
pub fn to_tensor(image: &RgbImage, size: [u32; 2], norm: &Normalization) -> Vec<f32> {
    let [h, w] = size.map(|v| v as usize);
    let resized = resize::resize_bilinear(
        &image.data,
        image.width as usize,
        image.height as usize,
        3,
        w,
        h,
    );
    let plane = h * w;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in resized.chunks_exact(3).enumerate() {
        for c in 0..3 {
            let x = f32::from(px[c]) / 255.0;
            out[c * plane + i] = (x - norm.mean[c]) / norm.std[c];
        }
    }
    out
}
