"""The authors' test-time pipeline, done with PIL (the reference the daemon must match).

Image.open(...).convert('RGB') -> resize((W, H), Image.BILINEAR) for the backbone and a separate
resize of the ORIGINAL image for the side network -> ToTensor (uint8 / 255 in float32) ->
Normalize ((x - mean) / std in float32).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image


def load_rgb(path: str | Path) -> Image.Image:
    """An input file as a PIL RGB image. PNG/JPEG via PIL (grey replicated, alpha dropped,
    16-bit grey clipped at 255 by PIL's convert); DICOM via pydicom's pixel_array."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return Image.fromarray(dicom_pixels(path)).convert("RGB")
    with Image.open(path) as img:
        return img.convert("RGB")


def dicom_pixels(path: str | Path) -> np.ndarray:
    """Pixels of an 8-bit MONOCHROME2 or RGB DICOM file without window or rescale, for which
    the default pixel policy (VOI "auto", README: DICOM) is the identity. Other files are
    refused here: the full pixel policy is mirrored in tests/python/dicom_reference.py."""
    import pydicom

    ds = pydicom.dcmread(str(path))
    photometric = ds.PhotometricInterpretation
    if int(ds.BitsAllocated) != 8 or photometric not in ("MONOCHROME2", "RGB"):
        raise ValueError(f"{path}: only 8-bit MONOCHROME2 / RGB DICOM is supported by the reference pipeline")
    if "WindowCenter" in ds or "ModalityLUTSequence" in ds or "VOILUTSequence" in ds:
        raise ValueError(f"{path}: windowed / LUT DICOM is not supported by the reference pipeline")
    if float(getattr(ds, "RescaleSlope", 1)) != 1 or float(getattr(ds, "RescaleIntercept", 0)) != 0:
        raise ValueError(f"{path}: rescaled DICOM is not supported by the reference pipeline")
    arr = ds.pixel_array
    if photometric == "MONOCHROME2":
        arr = np.asarray(arr, dtype=np.uint8)
        if arr.size and (int(arr.min()) != 0 or int(arr.max()) != 255):
            # min-max policy would rescale: the fixtures are made to span 0..255
            raise ValueError(f"{path}: grey values must span 0..255 for the identity policy")
    return np.ascontiguousarray(arr, dtype=np.uint8)


def resize_u8(img: Image.Image, size: Sequence[int]) -> np.ndarray:
    """[H, W, 3] uint8: an RGB image resized to size=[H, W] with PIL bilinear (antialiased)."""
    h, w = int(size[0]), int(size[1])
    return np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.uint8)


def normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W]: /255, then (x - mean) / std, in float32
    (elementwise, so a batch gives each image exactly the values it gets alone)."""
    x = np.asarray(pixels, dtype=np.uint8).astype(np.float32) / np.float32(255)
    x = np.moveaxis(x, -1, -3)
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((x - m) / s, dtype=np.float32)


def to_tensor(img: Image.Image, size: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[3, H, W] float32: PIL bilinear resize to size=[H, W], /255, then (x - mean) / std."""
    return normalize(resize_u8(img, size), mean, std)


def preprocess(
    img: Image.Image,
    backbone_size: Sequence[int],
    side_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    return to_tensor(img, backbone_size, mean, std), to_tensor(img, side_size, mean, std)
