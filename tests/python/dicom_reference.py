"""The independent Python reference for fptserve's DICOM path (issue 4).

pydicom (with the pylibjpeg / GDCM plugins) decodes; this module mirrors, in numpy, the
pixel policy "auto" that fptserve documents, and the model pipeline after it (PIL
convert('RGB') -> PIL bilinear resize -> /255 -> normalise, from models/src/fptserve_models/
preprocess.py -> ONNX Runtime backbone + side network -> softmax).

Nothing here calls fptserve: tools/dicom_parity.py and the tests compare fptserve's answers
with what this module computes.

Pixel policy "auto" (MONOCHROME1/2), as specified for both sides:
 1. Modality LUT: ModalityLUTSequence if present (first item), else
    v = stored * RescaleSlope + RescaleIntercept in float64 (defaults 1 and 0).
 2. VOI: VOILUTSequence (first item: descriptor [entries (0 = 65536), first mapped, bits];
    below first mapped -> first entry, above the last -> last entry;
    y = lut / (2**bits - 1) * 255), else the FIRST WindowCenter/WindowWidth pair with
    VOILUTFunction (LINEAR default, LINEAR_EXACT, SIGMOID), else for unsigned data with
    BitsStored <= 8 and no modality transform v * 255 / (2**BitsStored - 1) (identity for
    8 bits, full range for fewer), else min-max over the frame
    (0 everywhere when max == min).
 3. uint8 = clamp(floor(y + 0.5), 0, 255).
 4. MONOCHROME1: 255 - y (after VOI).
Colour: RGB (YBR already converted to RGB by pydicom), BitsStored > 8 -> v >> (BitsStored - 8);
PALETTE COLOR through the Red/Green/Blue LUTs (same clamping; 16-bit entries >> 8).
"""

from __future__ import annotations

import json
import struct
import sys
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DEMO_REPOSITORY = ROOT / "models" / "demo"

# What pydicom needs for every compressed syntax the test files use (pinned in
# tests/python/requirements.txt). Missing ones are a hard failure, never a skip.
REQUIRED_PLUGINS = {
    "data_store": "pydicom-data",  # the rest of pydicom's test files, offline
    "pylibjpeg": "pylibjpeg",
    "libjpeg": "pylibjpeg-libjpeg",
    "openjpeg": "pylibjpeg-openjpeg",
    "rle": "pylibjpeg-rle",
    "gdcm": "python-gdcm",
}
INSTALL_HINT = (
    "install the pinned DICOM reference plugins: "
    ".venv/bin/pip install -r tests/python/requirements.txt (or `make python-env`)"
)

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


def missing_plugins() -> list[str]:
    """The PyPI names of required reference packages that are not installed or do not import."""
    import importlib
    from importlib.metadata import PackageNotFoundError, version

    missing = []
    for module, package in REQUIRED_PLUGINS.items():
        try:
            version(package)
            importlib.import_module(module)
        except (PackageNotFoundError, ImportError, OSError):
            missing.append(package)
    return missing


def require_plugins() -> None:
    missing = missing_plugins()
    if missing:
        raise RuntimeError(f"missing Python packages {missing}: {INSTALL_HINT}")


# --------------------------------------------------------------------------- reading


def read_dataset(path: str | Path):
    """pydicom's dataset for path (force=True, so files without a preamble read too). When
    the file has no File Meta Transfer Syntax UID (e.g. OT-PAL-8-face.dcm, written before
    Part 10), it is set from the encoding pydicom actually parsed the file with, so that the
    pixel data can be decoded; `note` says so."""
    import pydicom
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(str(path), force=True)
    note = ""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" not in meta and "PixelData" in ds:
        implicit, little = ds.original_encoding
        if implicit is not None and little is not None:
            uid = (
                ImplicitVRLittleEndian
                if implicit
                else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
            )
            meta.TransferSyntaxUID = uid
            note = f"no Transfer Syntax UID in the file: pydicom decoded it as {uid.name}, the encoding it parsed"
    return ds, note


def number_of_frames(ds) -> int:
    value = ds.get("NumberOfFrames", 1)
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"Number of Frames {value!r} is not an integer")
    return n if n > 0 else 1


def transfer_syntax(ds) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


def little_endian(ds) -> bool:
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        le = meta._tsyntax_encoding[1]
        if le is not None:
            return bool(le)
    le = ds.original_encoding[1]
    return True if le is None else bool(le)


def pydicom_frame(ds, frame: int) -> np.ndarray:
    """Frame `frame` as pydicom's default pixel_array gives it (YBR converted to RGB,
    PALETTE COLOR as indices), as int64 with shape (rows, columns, samples)."""
    from pydicom.pixels import pixel_array

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = pixel_array(ds, index=frame)
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr.astype(np.int64)


# --------------------------------------------------------------------------- LUTs


@dataclass
class Lut:
    entries: int
    first: int
    bits: int
    data: np.ndarray  # int64, len == entries (or fewer when the file is short)

    def lookup(self, values: np.ndarray) -> np.ndarray:
        """Entry for each value: below `first` -> entry 0, above the last -> last entry."""
        idx = np.floor(np.asarray(values, dtype=np.float64)) - self.first
        idx = np.clip(idx, 0, len(self.data) - 1).astype(np.int64)
        return self.data[idx]


def _words(raw: bytes, little: bool) -> np.ndarray:
    n = len(raw) // 2
    return np.asarray(struct.unpack(f"{'<' if little else '>'}{n}H", raw[: 2 * n]), dtype=np.int64)


def _lut_values(element, entries: int, little: bool) -> np.ndarray:
    value = element.value
    if isinstance(value, (bytes, bytearray)):
        if len(value) == entries:  # 8-bit entries in OB
            return np.frombuffer(bytes(value), dtype=np.uint8).astype(np.int64)
        return _words(bytes(value), little)
    if isinstance(value, int):
        return np.asarray([value], dtype=np.int64)
    return np.asarray(list(value), dtype=np.int64)


def _descriptor(values: Sequence[int], signed: bool) -> tuple[int, int, int]:
    entries, first, bits = (int(v) for v in values[:3])
    if entries == 0:
        entries = 65536
    if signed and first >= 32768:
        first -= 65536
    return entries, first, bits


def sequence_lut(item, ds) -> Lut:
    """A Modality or VOI LUT Sequence item as a Lut."""
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    entries, first, bits = _descriptor(item.LUTDescriptor, signed)
    data = _lut_values(item["LUTData"], entries, little_endian(ds))
    return Lut(entries, first, bits, data[:entries])


def palette_luts(ds) -> list[Lut]:
    """Red, green and blue Palette Color LUTs (plain or segmented)."""
    from pydicom.pixels.processing import _expand_segmented_lut

    little = little_endian(ds)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    luts = []
    for colour in ("Red", "Green", "Blue"):
        entries, first, bits = _descriptor(ds[f"{colour}PaletteColorLookupTableDescriptor"].value, signed)
        plain = f"{colour}PaletteColorLookupTableData"
        segmented = f"Segmented{colour}PaletteColorLookupTableData"
        if plain in ds:
            data = _lut_values(ds[plain], entries, little)
        elif segmented in ds:
            raw = bytes(ds[segmented].value)
            if bits == 8:
                words = list(raw)
                fmt = f"{len(raw)}B"
            else:
                words = list(_words(raw, little))
                fmt = f"{'<' if little else '>'}{len(words)}H"
            data = np.asarray(_expand_segmented_lut(tuple(int(w) for w in words), fmt), dtype=np.int64)
        else:
            raise ValueError(f"no {colour} Palette Color LUT data")
        luts.append(Lut(entries, first, bits, data[:entries]))
    return luts


# --------------------------------------------------------------------------- policy


def _to_uint8(y: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(y + 0.5), 0, 255).astype(np.uint8)


def _rescale(ds) -> tuple[float, float]:
    slope = ds.get("RescaleSlope", None)
    intercept = ds.get("RescaleIntercept", None)
    slope = 1.0 if slope is None or slope == "" else float(slope)
    intercept = 0.0 if intercept is None or intercept == "" else float(intercept)
    return slope, intercept


def _first(value) -> float:
    if value is None or value == "":
        raise ValueError("empty")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return float(value[0])
    return float(value)


def window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """VOI windowing to 0..255 in float64 (PS3.3 C.11.2.1.2.1 / C.11.2.1.3.1 / C.11.2.1.3.2)."""
    c = float(center)
    function = (function or "LINEAR").strip().upper()
    if function == "LINEAR_EXACT":
        w = float(width)
        with np.errstate(divide="ignore", invalid="ignore"):
            mid = ((x - c) / w + 0.5) * 255.0
        return np.where(x <= c - w / 2.0, 0.0, np.where(x > c + w / 2.0, 255.0, mid))
    if function == "SIGMOID":
        w = float(width)
        with np.errstate(over="ignore"):
            return 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    # LINEAR (also for an unknown function name)
    w = max(float(width), 1.0)
    lo = c - 0.5 - (w - 1.0) / 2.0
    hi = c - 0.5 + (w - 1.0) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        mid = ((x - (c - 0.5)) / (w - 1.0) + 0.5) * 255.0
    return np.where(x <= lo, 0.0, np.where(x > hi, 255.0, mid))


def monochrome_display(ds, stored: np.ndarray) -> np.ndarray:
    """The policy "auto" for one MONOCHROME1/2 frame: uint8 (rows, columns)."""
    s = np.asarray(stored)
    if s.ndim == 3:
        s = s[:, :, 0]
    s = s.astype(np.int64)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()

    # 1. modality LUT
    modality_lut = bool(ds.get("ModalityLUTSequence"))
    if modality_lut:
        v = sequence_lut(ds.ModalityLUTSequence[0], ds).lookup(s).astype(np.float64)
        slope, intercept = 1.0, 0.0
    else:
        slope, intercept = _rescale(ds)
        v = s.astype(np.float64) * slope + intercept

    # 2. VOI
    if ds.get("VOILUTSequence"):
        lut = sequence_lut(ds.VOILUTSequence[0], ds)
        y = lut.lookup(v).astype(np.float64) / float(2 ** lut.bits - 1) * 255.0
    elif _has_window(ds):
        y = window(v, _first(ds.WindowCenter), _first(ds.WindowWidth), str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR"))
    elif (
        int(ds.get("BitsStored", 0)) <= 8
        and int(ds.get("PixelRepresentation", 0)) == 0
        and not modality_lut
        and slope == 1.0
        and intercept == 0.0
    ):
        # Full range for fewer than 8 bits (a 1-bit mask becomes 0/255, not 0/1).
        y = v * (255.0 / float(2 ** int(ds.get("BitsStored", 8)) - 1))
    else:
        lo, hi = float(v.min()), float(v.max())
        y = np.zeros_like(v) if hi == lo else (v - lo) / (hi - lo) * 255.0

    # 3. 8 bits, 4. MONOCHROME1 inversion after VOI
    out = _to_uint8(y)
    if photometric == "MONOCHROME1":
        out = (255 - out).astype(np.uint8)
    return out


def _has_window(ds) -> bool:
    try:
        _first(ds.get("WindowCenter", None))
        _first(ds.get("WindowWidth", None))
    except (ValueError, TypeError, IndexError):
        return False
    return True


def colour_display(ds, stored: np.ndarray) -> np.ndarray:
    """RGB (after pydicom's YBR -> RGB) or PALETTE COLOR frame -> uint8 (rows, columns, 3)."""
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    s = np.asarray(stored).astype(np.int64)
    if photometric == "PALETTE COLOR":
        idx = s[:, :, 0] if s.ndim == 3 else s
        out = []
        for lut in palette_luts(ds):
            values = lut.lookup(idx)
            if lut.bits > 8:
                values = values >> 8
            out.append(values)
        return np.clip(np.stack(out, axis=-1), 0, 255).astype(np.uint8)
    bits_stored = int(ds.get("BitsStored", 8))
    if bits_stored > 8:
        s = s >> (bits_stored - 8)
    return np.clip(s, 0, 255).astype(np.uint8)


class _FrameView:
    """A data set with some attributes replaced (read-only, only what the policy reads)."""

    def __init__(self, ds, overrides: dict):
        self._ds, self._overrides = ds, overrides

    def get(self, name, default=None):
        return self._overrides[name] if name in self._overrides else self._ds.get(name, default)

    def __getattr__(self, name):
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._ds, name)

    def __contains__(self, name):
        return name in self._overrides or name in self._ds


def frame_attributes(ds, frame: int):
    """Enhanced multi-frame objects: the frame's Pixel Value Transformation (rescale) and
    Frame VOI LUT (window, function) functional groups, per-frame item first, then the
    shared one, replace the top-level attributes."""
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        groups.append(per_frame[frame])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    def item_of(sequence):
        for group in groups:
            if sequence in group and len(group[sequence].value) > 0:
                return group[sequence][0]
        return None

    overrides = {}
    pvt = item_of("PixelValueTransformationSequence")
    if pvt is not None:
        overrides["RescaleSlope"] = pvt.get("RescaleSlope", None)
        overrides["RescaleIntercept"] = pvt.get("RescaleIntercept", None)
    voi = item_of("FrameVOILUTSequence")
    if voi is not None:
        overrides["WindowCenter"] = voi.get("WindowCenter", None)
        overrides["WindowWidth"] = voi.get("WindowWidth", None)
        if voi.get("VOILUTFunction", None):
            overrides["VOILUTFunction"] = voi.VOILUTFunction
    return _FrameView(ds, overrides) if overrides else ds


def display(ds, stored: np.ndarray, frame: int = 0) -> np.ndarray:
    """The policy "auto" for one frame: uint8 (rows, columns, 3), grey replicated."""
    ds = frame_attributes(ds, frame)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric in MONOCHROME:
        grey = monochrome_display(ds, stored)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return colour_display(ds, stored)


# --------------------------------------------------------------------------- model


@dataclass
class Task:
    name: str
    version: str
    classes: list[str]
    backbone: str
    backbone_size: list[int]
    side_size: list[int]
    mean: list[float]
    std: list[float]
    side_path: Path
    backbone_path: Path


def load_task(spec: str, repository: str | Path = DEMO_REPOSITORY) -> Task:
    """`name@version` (or `name` for the newest version) from a model repository."""
    repository = Path(repository)
    name, _, version = spec.partition("@")
    task_dir = repository / "tasks" / name
    if not version:
        version = max((p.name for p in task_dir.iterdir() if p.is_dir()), key=lambda v: (len(v), v))
    manifest = json.loads((task_dir / version / "manifest.json").read_text())
    pre = manifest["preprocessing"]
    voi = pre.get("dicom", {}).get("voi", "auto")
    if voi != "auto":
        raise ValueError(f"{spec}: the reference implements the pixel policy 'auto' only, not {voi!r}")
    backbone = manifest["backbone"]["name"]
    bmanifest = json.loads((repository / "backbones" / backbone / "manifest.json").read_text())
    return Task(
        name=name,
        version=version,
        classes=list(manifest["classes"]),
        backbone=backbone,
        backbone_size=list(pre["backbone_size"]),
        side_size=list(pre["side_size"]),
        mean=list(pre["mean"]),
        std=list(pre["std"]),
        side_path=task_dir / version / manifest["file"],
        backbone_path=repository / "backbones" / backbone / bmanifest["file"],
    )


@lru_cache(maxsize=None)
def _session(path: str):
    _preprocess_module()  # puts the exporter on sys.path
    from fptserve_models.export import ort_session

    return ort_session(path)


def _preprocess_module():
    src = str(ROOT / "models" / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    from fptserve_models import preprocess

    return preprocess


def classify(display_rgb: np.ndarray, task: Task) -> dict[str, Any]:
    """Probabilities for a display image (uint8 (rows, columns, 3)) through PIL -> resize ->
    normalise -> backbone.onnx -> side.onnx -> softmax."""
    from PIL import Image

    preprocess = _preprocess_module()
    img = Image.fromarray(np.ascontiguousarray(display_rgb, dtype=np.uint8)).convert("RGB")
    pixel_values, side_values = preprocess.preprocess(img, task.backbone_size, task.side_size, task.mean, task.std)
    backbone = _session(str(task.backbone_path))
    side = _session(str(task.side_path))
    k, v = backbone.run(["key_states", "value_states"], {"pixel_values": pixel_values[None]})
    (logits,) = side.run(["logits"], {"side_pixel_values": side_values[None], "key_states": k, "value_states": v})
    logits = logits[0].astype(np.float64)
    e = np.exp(logits - logits.max())
    probabilities = e / e.sum()
    return {
        "task": task.name,
        "adapter_version": task.version,
        "classes": task.classes,
        "logits": logits.tolist(),
        "probabilities": probabilities.tolist(),
        "label": task.classes[int(np.argmax(probabilities))],
    }


def reference_display(path: str | Path, frame: int = 0) -> np.ndarray:
    """pydicom decode of `frame` -> policy "auto" -> uint8 (rows, columns, 3)."""
    ds, _ = read_dataset(path)
    return display(ds, pydicom_frame(ds, frame), frame)
