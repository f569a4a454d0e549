//! Saliency maps: where a task's side network looked, over the backbone's patch grid.
//!
//! FPT+ makes this cheap and task-specific. In every side layer the side network's CLS
//! token attends to its own patches and to fused prompt tokens, and each prompt is an
//! attention over the backbone's selected tokens, whose patch positions the backbone knows.
//! An adapter exported with explanation outputs computes, in the same forward pass as its
//! logits, a direct logit attribution of every class to those selected tokens
//! ([`TOKEN_RELEVANCE`], `[C, layers, heads, k]`) and to its own patches
//! ([`PATCH_RELEVANCE`], `[C, side grid]`); the backbone outputs the selected tokens'
//! positions ([`TOKEN_INDICES`]). This module puts them on the grid: each token's relevance
//! on its patch, each side patch's spread evenly over the backbone patches it covers, the
//! negative part dropped and the rest scaled to [0, 1] (the exporter's `explain.py` is the
//! reference it is tested against).
//!
//! Manifests list these outputs under `explanation_outputs`, which daemons that predate them
//! ignore (as they ignore the graph outputs), so an adapter or backbone exported with them
//! serves everywhere, and one exported without them serves here with a reason in place of a
//! map.

use std::io::Cursor;
use std::sync::Arc;

use image::ImageEncoder;

use crate::preprocess::RgbImage;

use crate::repository::manifest::TensorSpec;

pub use crate::model::backbone::TOKEN_INDICES;

/// Adapter output: per class, the relevance of each selected backbone token.
pub const TOKEN_RELEVANCE: &str = "token_relevance";
/// Adapter output: per class, the relevance of each of the side network's own patches.
pub const PATCH_RELEVANCE: &str = "patch_relevance";

/// The shapes of an adapter's explanation outputs, read from its manifest at load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelevanceShape {
    /// `layers * heads * k` token relevances per class.
    pub tokens: usize,
    /// The side network's patch grid, `[rows, columns]`.
    pub side_grid: [usize; 2],
}

impl RelevanceShape {
    /// From an adapter's `explanation_outputs` (`None`: it has none); `side_size` is its
    /// side input's `[height, width]`, `kv_shape` the backbone's per-image K/V shape.
    pub fn from_specs(
        specs: &[TensorSpec],
        classes: usize,
        side_size: [u32; 2],
        kv_shape: &[i64],
    ) -> Result<Option<Self>, String> {
        let find = |name: &str| specs.iter().find(|s| s.name == name);
        let (token, patch) = match (find(TOKEN_RELEVANCE), find(PATCH_RELEVANCE)) {
            (None, None) => return Ok(None),
            (Some(t), Some(p)) => (t, p),
            _ => {
                return Err(format!(
                    "explanation_outputs name one of {TOKEN_RELEVANCE} and {PATCH_RELEVANCE} \
                     without the other"
                ));
            }
        };
        for spec in [token, patch] {
            if spec.dtype != "float32" {
                return Err(format!("{} is {}, expected float32", spec.name, spec.dtype));
            }
        }
        // token_relevance [-1, C, layers, heads, k]: the K/V's [layers, heads, k]
        let expected: Vec<i64> = [-1, classes as i64]
            .into_iter()
            .chain(kv_shape.iter().take(3).copied())
            .collect();
        if token.shape != expected {
            return Err(format!(
                "{TOKEN_RELEVANCE} has shape {:?}, expected {expected:?} (classes, then the \
                 backbone's layers, heads and selected tokens)",
                token.shape
            ));
        }
        let patches = match patch.shape[..] {
            [-1, c, n] if c == classes as i64 && n > 0 => n as usize,
            _ => {
                return Err(format!(
                    "{PATCH_RELEVANCE} has shape {:?}, expected [-1, {classes}, patches]",
                    patch.shape
                ));
            }
        };
        // a square side input has a square grid; otherwise the grid keeps its aspect
        let [h, w] = side_size.map(|v| v as usize);
        let side_grid = (1..=patches)
            .filter(|rows| patches % rows == 0)
            .map(|rows| [rows, patches / rows])
            .find(|[rows, columns]| rows * w == columns * h)
            .ok_or_else(|| {
                format!(
                    "{PATCH_RELEVANCE} has {patches} patches, no grid of the side input's \
                     {h}x{w} aspect"
                )
            })?;
        Ok(Some(RelevanceShape {
            tokens: expected[2..].iter().product::<i64>() as usize,
            side_grid,
        }))
    }
}

/// One image's explanation outputs from a side network, with its token positions.
#[derive(Clone, Debug)]
pub struct Relevance {
    /// `[classes, layers, heads, k]`.
    pub token: Vec<f32>,
    /// `[classes, side rows * side columns]`.
    pub patch: Vec<f32>,
    /// The backbone's `token_indices` of the image, `[layers, heads, k]`: 0 is the CLS
    /// token, `n >= 1` patch `n - 1` of the grid in row-major order.
    pub indices: Arc<[i64]>,
}

/// A task's saliency map.
#[derive(Clone, Debug, PartialEq)]
pub struct SaliencyMap {
    /// Rows of the backbone's patch grid.
    pub rows: usize,
    /// Columns of the backbone's patch grid.
    pub columns: usize,
    /// `rows * columns` values in [0, 1], row-major; the most relevant patch is 1.
    pub values: Vec<f32>,
    /// The class explained.
    pub class_index: usize,
    /// Its name.
    pub class_name: String,
}

/// A task's explanation, or why it has none.
#[derive(Clone, Debug)]
pub enum Explanation {
    /// The map.
    Map(SaliencyMap),
    /// Why there is no map (the task's answer itself is unaffected).
    Unavailable(String),
}

/// Puts `relevance`'s `class` on the backbone's `grid` (`[rows, columns]` of patches).
/// Token relevance outside the grid (the CLS token, or an index the grid does not have) is
/// left out; accumulation is in f64.
pub fn saliency_map(
    relevance: &Relevance,
    shape: &RelevanceShape,
    class: usize,
    grid: [usize; 2],
) -> Vec<f32> {
    let [rows, columns] = grid;
    let cells = rows * columns;
    let mut map = vec![0f64; cells];
    let tokens = &relevance.token[class * shape.tokens..(class + 1) * shape.tokens];
    for (&index, &r) in relevance.indices.iter().zip(tokens) {
        if index >= 1 && (index as usize) <= cells {
            map[index as usize - 1] += f64::from(r);
        }
    }
    // each side patch covers the backbone patches whose scaled position falls in it
    let [side_rows, side_columns] = shape.side_grid;
    let side =
        &relevance.patch[class * side_rows * side_columns..(class + 1) * side_rows * side_columns];
    let side_of = |row: usize, column: usize| {
        (row * side_rows / rows) * side_columns + column * side_columns / columns
    };
    let mut covered = vec![0usize; side.len()];
    for row in 0..rows {
        for column in 0..columns {
            covered[side_of(row, column)] += 1;
        }
    }
    for row in 0..rows {
        for column in 0..columns {
            let p = side_of(row, column);
            map[row * columns + column] += f64::from(side[p]) / covered[p] as f64;
        }
    }
    let max = map.iter().copied().fold(0f64, f64::max);
    map.iter()
        .map(|&v| {
            if max > 0.0 {
                (v.max(0.0) / max) as f32
            } else {
                0.0
            }
        })
        .collect()
}

/// Which class a map explains: the named one, else the most probable.
pub fn class_to_explain(
    classes: &[String],
    probabilities: &[f32],
    named: Option<&str>,
) -> Result<usize, String> {
    match named {
        Some(name) => classes.iter().position(|c| c == name).ok_or_else(|| {
            format!(
                "class {name:?} is not one of this task's classes ({})",
                classes.join(", ")
            )
        }),
        None => Ok(probabilities
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &p)| {
                if p > best.1 { (i, p) } else { best }
            })
            .0),
    }
}

/// The map over `picture`, an RGB image of the picture's size: the map upsampled
/// bilinearly (patch centres), shown as a heat colour blended over the picture where it is
/// high.
pub fn overlay(picture: &RgbImage, map: &SaliencyMap) -> image::RgbImage {
    let (width, height) = (picture.width as usize, picture.height as usize);
    let columns = axis(width, map.columns);
    // per map level (quantised to 1/255), in 1/256 units: the picture's weight and the
    // heat colour's contribution
    let levels: Vec<(u32, [u32; 3])> = (0..=255)
        .map(|l| {
            let v = f64::from(l) / 255.0;
            let alpha = 0.6 * v;
            let heat = heat_colour(v).map(|h| (h * alpha * 256.0).round() as u32);
            (((1.0 - alpha) * 256.0).round() as u32, heat)
        })
        .collect();
    let blend = |base: u8, (keep, heat): (u32, [u32; 3]), ch: usize| {
        ((u32::from(base) * keep + heat[ch] + 128) >> 8).min(255) as u8
    };
    let mut out = vec![0u8; width * height * 3];
    let mut line = vec![0f32; map.columns];
    let mut level = vec![0usize; width];
    for (y, (r0, r1, fy)) in axis(height, map.rows).into_iter().enumerate() {
        // the map interpolated to this row, then along it
        for (c, value) in line.iter_mut().enumerate() {
            *value = map.values[r0 * map.columns + c] * (1.0 - fy)
                + map.values[r1 * map.columns + c] * fy;
        }
        for (l, &(c0, c1, fx)) in level.iter_mut().zip(&columns) {
            let v = line[c0] * (1.0 - fx) + line[c1] * fx;
            *l = (v * 255.0).round().clamp(0.0, 255.0) as usize;
        }
        let row = &mut out[y * width * 3..(y + 1) * width * 3];
        if picture.grey {
            let source = &picture.data[y * width..(y + 1) * width];
            for ((o, &base), &l) in row.chunks_exact_mut(3).zip(source).zip(&level) {
                for (ch, value) in o.iter_mut().enumerate() {
                    *value = blend(base, levels[l], ch);
                }
            }
        } else {
            let source = &picture.data[y * width * 3..(y + 1) * width * 3];
            for ((o, base), &l) in row
                .chunks_exact_mut(3)
                .zip(source.chunks_exact(3))
                .zip(&level)
            {
                for (ch, value) in o.iter_mut().enumerate() {
                    *value = blend(base[ch], levels[l], ch);
                }
            }
        }
    }
    image::RgbImage::from_raw(picture.width, picture.height, out).expect("sized for the picture")
}

/// For each of `n` pixels along an axis, the two map cells around its centre and the weight
/// of the second (map cells centred at half-integers of the axis scaled to `cells`).
fn axis(n: usize, cells: usize) -> Vec<(usize, usize, f32)> {
    (0..n)
        .map(|p| {
            let g =
                ((p as f64 + 0.5) * cells as f64 / n as f64 - 0.5).clamp(0.0, (cells - 1) as f64);
            let c0 = g.floor() as usize;
            (c0, (c0 + 1).min(cells - 1), (g - c0 as f64) as f32)
        })
        .collect()
}

/// An overlay as a PNG.
pub fn png(overlay: &image::RgbImage) -> Result<Vec<u8>, String> {
    let mut png = Vec::new();
    // fast compression: an overlay is a picture that is shown once, not archived
    image::codecs::png::PngEncoder::new_with_quality(
        Cursor::new(&mut png),
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::Sub,
    )
    .write_image(
        overlay.as_raw(),
        overlay.width(),
        overlay.height(),
        image::ExtendedColorType::Rgb8,
    )
    .map_err(|e| format!("encoding the overlay PNG failed: {e}"))?;
    Ok(png)
}

/// Blue (0) through green and yellow to red (1).
fn heat_colour(v: f64) -> [f64; 3] {
    let v = v.clamp(0.0, 1.0);
    let ramp = |x: f64| x.clamp(0.0, 1.0) * 255.0;
    [
        ramp(2.0 * v - 0.5),
        ramp(if v < 0.5 { 2.0 * v } else { 2.0 - 2.0 * v } + 0.25),
        ramp(1.0 - 2.0 * v),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> RelevanceShape {
        RelevanceShape {
            tokens: 4,
            side_grid: [2, 2],
        }
    }

    #[test]
    fn tokens_land_on_their_patches_and_side_patches_spread() {
        // 4x4 backbone grid, 2x2 side grid: each side patch covers a 2x2 block
        let relevance = Relevance {
            // class 0: tokens 0..4; class 1: tokens 4..8
            token: vec![1.0, 2.0, 0.5, -3.0, 9.0, 9.0, 9.0, 9.0],
            patch: vec![4.0, 0.0, 0.0, -8.0, 0.0, 0.0, 0.0, 0.0],
            // CLS, patch 5 twice (two heads), patch 15
            indices: Arc::from(vec![0i64, 6, 6, 16]),
        };
        let map = saliency_map(&relevance, &shape(), 0, [4, 4]);
        // patch 5 (row 1, column 1): 2 + 0.5 from tokens, 4 / 4 from side patch 0 -> 3.5
        // patch 0: 1.0 from side patch 0; patch 15: -3 - 2 < 0 -> 0
        assert_eq!(map[5], 1.0);
        assert!((map[0] - 1.0 / 3.5).abs() < 1e-6);
        assert_eq!(map[15], 0.0);
        assert_eq!(map[3], 0.0);
        assert!(map.iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn nothing_positive_is_all_zero() {
        let relevance = Relevance {
            token: vec![-1.0; 8],
            patch: vec![-1.0; 8],
            indices: Arc::from(vec![1i64, 2, 3, 4]),
        };
        assert!(
            saliency_map(&relevance, &shape(), 1, [4, 4])
                .iter()
                .all(|&v| v == 0.0)
        );
    }

    #[test]
    fn shapes_are_read_from_the_specs() {
        let spec = |name: &str, shape: Vec<i64>| TensorSpec {
            name: name.into(),
            dtype: "float32".into(),
            shape,
        };
        let specs = vec![
            spec(TOKEN_RELEVANCE, vec![-1, 3, 6, 12, 205]),
            spec(PATCH_RELEVANCE, vec![-1, 3, 64]),
        ];
        let shape = RelevanceShape::from_specs(&specs, 3, [128, 128], &[6, 12, 205, 64])
            .unwrap()
            .unwrap();
        assert_eq!(shape.side_grid, [8, 8]);
        assert_eq!(shape.tokens, 6 * 12 * 205);
        assert_eq!(
            RelevanceShape::from_specs(&[], 3, [128, 128], &[6, 12, 205, 64]),
            Ok(None)
        );
        assert!(RelevanceShape::from_specs(&specs, 4, [128, 128], &[6, 12, 205, 64]).is_err());
        assert!(RelevanceShape::from_specs(&specs[..1], 3, [128, 128], &[6, 12, 205, 64]).is_err());
    }

    #[test]
    fn the_class_is_the_named_one_or_the_most_probable() {
        let classes = vec!["a".to_string(), "b".into(), "c".into()];
        assert_eq!(class_to_explain(&classes, &[0.2, 0.5, 0.3], None), Ok(1));
        assert_eq!(
            class_to_explain(&classes, &[0.2, 0.5, 0.3], Some("c")),
            Ok(2)
        );
        assert!(class_to_explain(&classes, &[0.2, 0.5, 0.3], Some("d")).is_err());
    }

    #[test]
    fn the_overlay_is_a_png_of_the_picture_size() {
        let picture = RgbImage::from_grey(37, 21, vec![100; 37 * 21]);
        let map = SaliencyMap {
            rows: 2,
            columns: 2,
            values: vec![0.0, 1.0, 0.0, 0.0],
            class_index: 0,
            class_name: "a".into(),
        };
        let png = png(&overlay(&picture, &map)).unwrap();
        let decoded = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(decoded.dimensions(), (37, 21));
        // unchanged where the map is 0, tinted where it is 1
        assert_eq!(decoded.get_pixel(0, 20), &image::Rgb([100, 100, 100]));
        assert_ne!(decoded.get_pixel(36, 0), &image::Rgb([100, 100, 100]));
    }
}
