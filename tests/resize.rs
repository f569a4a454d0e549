//! The PIL-exact resize, checked pixel for pixel against Pillow itself (run from the
//! project's Python environment, which `make test` installs), on the fixture images and
//! on seeded noise, shrinking and enlarging, square and not.

mod common;

use std::path::Path;
use std::process::Command;

use fptserve::decode::{Limits, Pixels};
use fptserve::preprocess::resize::resize_bilinear;

const SIZES: &[(u32, u32)] = &[
    (64, 64),
    (32, 32),
    (512, 512),
    (128, 128),
    (37, 91),
    (1, 1),
    (300, 7),
    (301, 221),
];

fn python() -> std::path::PathBuf {
    let py = common::root().join(".venv/bin/python");
    assert!(
        py.exists(),
        "{} is missing: run tools/python-env.sh (make test does)",
        py.display()
    );
    py
}

/// Pillow's `convert('RGB').resize((w, h), BILINEAR)` of `png`, as raw RGB bytes.
fn pillow(png: &Path, w: u32, h: u32, out: &Path) -> Vec<u8> {
    let script = "import sys; from PIL import Image; \
        im = Image.open(sys.argv[1]).convert('RGB').resize((int(sys.argv[2]), int(sys.argv[3])), Image.BILINEAR); \
        open(sys.argv[4], 'wb').write(im.tobytes())";
    let status = Command::new(python())
        .args(["-c", script])
        .arg(png)
        .arg(w.to_string())
        .arg(h.to_string())
        .arg(out)
        .status()
        .expect("python runs");
    assert!(status.success());
    std::fs::read(out).unwrap()
}

fn check(png: &Path) {
    let bytes = std::fs::read(png).unwrap();
    let decoded = fptserve::decode::image::decode(&bytes, 0, &Limits::default()).unwrap();
    let Pixels::Display(rgb) = decoded.pixels else {
        panic!("PNG decodes to display pixels")
    };
    let dir = tempfile::tempdir().unwrap();
    let samples = rgb.rgb_bytes();
    // Same size first: checks the convert('RGB') rules alone.
    let same = pillow(png, rgb.width, rgb.height, &dir.path().join("same.raw"));
    assert!(
        *same == *samples,
        "{}: convert('RGB') differs from Pillow",
        png.display()
    );
    // a grey picture: the server resizes a grey DICOM frame's one channel, which must equal
    // each of Pillow's three
    let grey_plane: Option<Vec<u8>> = samples
        .chunks_exact(3)
        .all(|p| p[0] == p[1] && p[1] == p[2])
        .then(|| samples.iter().step_by(3).copied().collect());
    let (width, height) = (rgb.width as usize, rgb.height as usize);
    for &(w, h) in SIZES {
        let expected = pillow(png, w, h, &dir.path().join("out.raw"));
        let ours = resize_bilinear(&samples, width, height, 3, w as usize, h as usize);
        let differing = ours.iter().zip(&expected).filter(|(a, b)| a != b).count();
        assert_eq!(
            differing,
            0,
            "{} -> {w}x{h}: {differing} samples differ from Pillow",
            png.display()
        );
        if let Some(plane) = &grey_plane {
            let grey = resize_bilinear(plane, width, height, 1, w as usize, h as usize);
            let differing = grey
                .iter()
                .zip(expected.chunks_exact(3))
                .filter(|(a, rgb)| rgb.iter().any(|v| v != *a))
                .count();
            assert_eq!(
                differing,
                0,
                "{} -> {w}x{h}, one grey channel: {differing} pixels differ from Pillow",
                png.display()
            );
        }
    }
}

#[test]
fn fixture_images_resize_exactly_as_pillow() {
    for name in ["grey8.png", "grey16.png", "rgb8.png", "rgba8.png"] {
        check(&common::fixtures().join("images").join(name));
    }
}

#[test]
fn seeded_noise_resizes_exactly_as_pillow() {
    let dir = tempfile::tempdir().unwrap();
    for (name, shape) in [
        ("noise.png", "(700, 1000, 3)"),
        ("grey-noise.png", "(700, 1000)"),
    ] {
        let png = dir.path().join(name);
        let script = format!(
            "import sys, numpy as np; from PIL import Image; \
            rng = np.random.default_rng(7); \
            Image.fromarray(rng.integers(0, 256, {shape}, dtype=np.uint8)).save(sys.argv[1])"
        );
        let status = Command::new(python())
            .args(["-c", &script])
            .arg(&png)
            .status()
            .unwrap();
        assert!(status.success());
        check(&png);
    }
}
