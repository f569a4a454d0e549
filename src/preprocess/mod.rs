//! Preprocessing: display pixels -> normalised f32 NCHW tensors, exactly as the authors'
//! torchvision pipeline (`Resize` with PIL bilinear, `ToTensor`, `Normalize`).

pub mod resize;

/// An 8-bit RGB image, interleaved, row-major: what PIL's `convert('RGB')` yields.
///
/// A grey image keeps one sample per pixel (`grey`), standing for R = G = B: PIL's `L` ->
/// `RGB` replicates the value, and resizing or normalising a replicated channel three times
/// gives the same numbers as doing it once, at a third of the cost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    /// Columns.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// `width * height * 3` samples, or `width * height` when `grey`.
    pub data: Vec<u8>,
    /// One sample per pixel, the same in R, G and B.
    pub grey: bool,
}

impl RgbImage {
    /// An interleaved RGB image.
    pub fn rgb(width: u32, height: u32, data: Vec<u8>) -> Self {
        RgbImage {
            width,
            height,
            data,
            grey: false,
        }
    }

    /// A grey image (PIL `L`, shown as RGB).
    pub fn from_grey(width: u32, height: u32, grey: Vec<u8>) -> Self {
        RgbImage {
            width,
            height,
            data: grey,
            grey: true,
        }
    }

    /// Samples per pixel in `data`.
    pub fn channels(&self) -> usize {
        if self.grey { 1 } else { 3 }
    }

    /// Interleaved R, G, B samples (a grey image's value replicated).
    pub fn rgb_bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        if self.grey {
            self.data.iter().flat_map(|&v| [v, v, v]).collect()
        } else {
            std::borrow::Cow::Borrowed(&self.data)
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
    let channels = image.channels();
    let resized = resize::resize_bilinear(
        &image.data,
        image.width as usize,
        image.height as usize,
        channels,
        w,
        h,
    );
    let plane = h * w;
    let mut out = vec![0f32; 3 * plane];
    for (c, out) in out.chunks_exact_mut(plane).enumerate() {
        // a grey image's single channel stands for all three
        let samples = resized.iter().skip(c % channels).step_by(channels);
        for (o, &v) in out.iter_mut().zip(samples) {
            let x = f32::from(v) / 255.0;
            *o = (x - norm.mean[c]) / norm.std[c];
        }
    }
    out
}
