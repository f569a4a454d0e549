"""The committed demo repository (models/demo), its reference fixtures (models/fixtures) and
the full-size benchmark repository. Everything is seeded and deterministic."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .config import PAPER_BACKBONE, PAPER_SIDE, TINY_BACKBONE, TINY_SIDE, BackboneConfig, SideConfig
from .export import DEFAULT_OPSET, export_adapter, export_backbone, write_json
from .model import SELECTION_MARGIN, Backbone, selection_margin
from .preprocess import load_rgb, preprocess
from .weights import random_backbone, random_side

DR_MEAN, DR_STD = [0.425, 0.296, 0.197], [0.301, 0.211, 0.164]
CXR_MEAN, CXR_STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


@dataclass(frozen=True)
class TaskSpec:
    task: str
    version: str
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    seed: int


DEMO_BACKBONE_NAME = "vit-tiny-demo"
DEMO_BACKBONE_SEED = 0
DEMO_TASKS = (
    TaskSpec("dr-grade", "1", ("none", "mild", "moderate", "severe", "proliferative"), tuple(DR_MEAN), tuple(DR_STD), 101),
    TaskSpec("dr-grade", "2", ("none", "mild", "moderate", "severe", "proliferative"), tuple(DR_MEAN), tuple(DR_STD), 102),
    TaskSpec("skin-lesion", "1", ("benign", "malignant"), tuple(DR_MEAN), tuple(DR_STD), 201),
    TaskSpec("chest-xray", "1", ("normal", "pneumonia", "covid-19"), tuple(CXR_MEAN), tuple(CXR_STD), 301),
)

FULL_BACKBONE_NAME = "vit-b16-512"
FULL_TASKS = (
    TaskSpec("dr-grade", "1", ("none", "mild", "moderate", "severe", "proliferative"), tuple(DR_MEAN), tuple(DR_STD), 101),
    TaskSpec("skin-lesion", "1", ("benign", "malignant"), tuple(DR_MEAN), tuple(DR_STD), 201),
    TaskSpec("chest-xray", "1", ("normal", "pneumonia", "covid-19"), tuple(CXR_MEAN), tuple(CXR_STD), 301),
)

# fixed, fake DICOM identities (UUID-derived 2.25 UIDs written out literally)
DICOM_UIDS = {
    "grey8_explicit_le.dcm": (
        "2.25.100000000000000000000000000000000001",
        "2.25.100000000000000000000000000000000002",
        "2.25.100000000000000000000000000000000003",
    ),
    "rgb8_rle.dcm": (
        "2.25.200000000000000000000000000000000001",
        "2.25.200000000000000000000000000000000002",
        "2.25.200000000000000000000000000000000003",
    ),
}


def random_models(
    backbone_config: BackboneConfig, side_config: SideConfig, backbone_seed: int, tasks: Sequence[TaskSpec]
) -> tuple[Backbone, dict]:
    """The seeded random backbone and {(task, version): side network}, one per task spec."""
    backbone = random_backbone(backbone_config, backbone_seed)
    sides = {
        (spec.task, spec.version): random_side(
            backbone_config, side_config.replace(num_classes=len(spec.classes)), spec.seed
        )
        for spec in tasks
    }
    return backbone, sides


def build_repository(
    out: Path,
    backbone_config: BackboneConfig,
    side_config: SideConfig,
    backbone_name: str,
    backbone_seed: int,
    tasks: Sequence[TaskSpec],
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    parity_samples: int = 2,
    log=print,
    explain: bool = True,
) -> tuple[Backbone, dict]:
    """Random-weight repository: one backbone, one adapter per task spec (with explanation
    outputs unless `explain` is false). Returns the PyTorch backbone and {(task, version): side
    network}."""
    backbone, sides = random_models(backbone_config, side_config, backbone_seed, tasks)
    m = export_backbone(
        backbone, out, backbone_name, f"random-init(seed={backbone_seed})", backbone_seed,
        fp16=fp16, opset=opset, parity_samples=parity_samples, explain=explain,
    )
    log(f"backbone {backbone_name}: {m['sha256'][:12]} parity {m['parity']['dtype']} {m['parity']['max_abs_diff']:.3g}")
    for spec in tasks:
        a = export_adapter(
            out, backbone_name, spec.task, spec.version, list(spec.classes), sides[(spec.task, spec.version)],
            backbone, list(spec.mean), list(spec.std), f"random-init(seed={spec.seed})", None, seed=spec.seed,
            opset=opset, parity_samples=parity_samples, explain=explain,
        )
        log(
            f"adapter {spec.task}/{spec.version}: {a['sha256'][:12]} parity {a['parity']['max_abs_diff']:.3g} "
            f"end-to-end ({a['parity']['end_to_end']['kv_dtype']}) {a['parity']['end_to_end']['max_abs_diff']:.3g}"
        )
    return backbone, sides


# --------------------------------------------------------------------------------------------
# fixture images
# --------------------------------------------------------------------------------------------


def _grid(h: int, w: int):
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    return y / (h - 1), x / (w - 1)


def fixture_arrays() -> dict[str, np.ndarray]:
    """Synthetic images with structure (deterministic, no RNG)."""
    # 8-bit grey, 300 wide x 220 high: a lit disc, rings and a bar, spanning 0..255
    y, x = _grid(220, 300)
    r = np.hypot((x - 0.4) * 1.4, y - 0.55)
    grey = 0.55 * np.exp(-(r / 0.35) ** 2) + 0.25 * (np.sin(r * 40) > 0) * (r < 0.6) + 0.3 * x * y
    grey[60:80, 180:280] = 1.0
    grey = (grey - grey.min()) / (grey.max() - grey.min())
    grey8 = np.round(grey * 255).astype(np.uint8)

    # 16-bit grey, 256 x 192: values 0..1200, so PIL's convert('RGB') clips most of it at 255
    y, x = _grid(192, 256)
    g16 = 1200 * x * (0.6 + 0.4 * np.cos(6 * np.pi * y)) + 150 * (np.hypot(x - 0.3, y - 0.3) < 0.15)
    grey16 = np.clip(np.round(g16), 0, 65535).astype(np.uint16)

    # 8-bit RGB, 320 x 240: fundus-like red disc with a bright optic disc and dark vessels
    y, x = _grid(240, 320)
    r = np.hypot((x - 0.5) * 320 / 240, y - 0.5)
    inside = r < 0.45
    red = np.where(inside, 0.75 - 0.4 * r, 0.02)
    green = np.where(inside, 0.35 - 0.3 * r, 0.02)
    blue = np.where(inside, 0.12, 0.02)
    optic = np.hypot((x - 0.68) * 320 / 240, y - 0.45) < 0.07
    red, green, blue = np.where(optic, 0.98, red), np.where(optic, 0.85, green), np.where(optic, 0.6, blue)
    vessels = inside & (np.abs(np.sin(7 * np.arctan2(y - 0.45, x - 0.68))) < 0.08)
    red, green = np.where(vessels, red * 0.6, red), np.where(vessels, green * 0.5, green)
    rgb8 = np.round(np.stack([red, green, blue], -1).clip(0, 1) * 255).astype(np.uint8)

    # RGBA, 200 x 200: skin-lesion-like blob, alpha fading left to right (PIL drops alpha)
    y, x = _grid(200, 200)
    r = np.hypot(x - 0.5, (y - 0.5) * 1.3) * (1 + 0.15 * np.sin(9 * np.arctan2(y - 0.5, x - 0.5)))
    lesion = r < 0.28
    base = np.stack([0.86 - 0.1 * y, 0.68 - 0.05 * x, 0.58 + 0 * x], -1)
    spot = np.stack([0.35 + 0.3 * r, 0.2 + 0.2 * r, 0.15 + 0 * r], -1)
    rgb = np.where(lesion[..., None], spot, base)
    alpha = 0.3 + 0.7 * x
    rgba = np.round(np.concatenate([rgb, alpha[..., None]], -1).clip(0, 1) * 255).astype(np.uint8)
    return {"grey8": grey8, "grey16": grey16, "rgb8": rgb8, "rgba8": rgba}


def write_images(folder: Path, arrays: dict[str, np.ndarray]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    modes = {"grey8": "L", "grey16": "I;16", "rgb8": "RGB", "rgba8": "RGBA"}
    paths = []
    for name, arr in arrays.items():
        path = folder / f"{name}.png"
        Image.fromarray(arr).save(path, format="PNG")
        with Image.open(path) as check:
            if check.mode != modes[name]:
                raise RuntimeError(f"{path} was written as {check.mode}, not {modes[name]}")
        paths.append(path)
    return paths


def write_dicoms(folder: Path, arrays: dict[str, np.ndarray]) -> list[Path]:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for fname, arr, photometric, syntax in (
        ("grey8_explicit_le.dcm", arrays["grey8"], "MONOCHROME2", ExplicitVRLittleEndian),
        ("rgb8_rle.dcm", arrays["rgb8"], "RGB", RLELossless),
    ):
        study, series, sop = DICOM_UIDS[fname]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = "2.25.300000000000000000000000000000000001"
        meta.ImplementationVersionName = "FPTSERVE_DEMO"
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.PatientName = "Demo^Fixture"
        ds.PatientID = "FPTSERVE-DEMO-0001"
        ds.Modality = "OT"
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = 1
        ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PhotometricInterpretation = photometric
        if photometric == "RGB":
            ds.SamplesPerPixel = 3
            ds.PlanarConfiguration = 0
        else:
            ds.SamplesPerPixel = 1
        ds.PixelData = np.ascontiguousarray(arr).tobytes()
        if syntax == RLELossless:
            ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
        path = folder / fname
        ds.save_as(path, enforce_file_format=True)
        check = pydicom.dcmread(path)
        if (
            check.file_meta.TransferSyntaxUID != syntax
            or check.SOPInstanceUID != sop
            or not np.array_equal(check.pixel_array, arr)
        ):
            raise RuntimeError(f"{path} does not round-trip")
        out.append(path)
    return out


# --------------------------------------------------------------------------------------------
# reference numbers
# --------------------------------------------------------------------------------------------


def softmax64(logits: Sequence[float]) -> list[float]:
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max())
    return (e / e.sum()).tolist()


# How far a float32 implementation's logits and probabilities may lie from these float64
# numbers (reference.json "tolerance", read by every test that compares with them). The logits
# stay under LOGIT_BOUND in magnitude, where a float32 ulp is at most 2^-20 (9.5e-7); float32
# evaluations of these models, in any summation order, land within a few ulps of float64
# (measured: 3e-6 for PyTorch and ONNX Runtime alike). 1e-4 is about 100 ulps: room for any
# kernel on any CPU, yet a swapped token or a changed eps or GELU (DESIGN.md: 0.005 to 1.2)
# fails. A softmax moves by at most half the largest logit change, so it holds for
# probabilities too.
REFERENCE_TOLERANCE = 1e-4
LOGIT_BOUND = 16.0


def reference_cases(fixtures: Path, backbone: Backbone, sides: dict, tasks: Sequence[TaskSpec]) -> list[dict]:
    """Every fixture x task through the PyTorch model. The pixels are the authors' float32
    pipeline; the model runs in float64 on the float32 weights, so the numbers are the exact
    function every float32 implementation approximates, the same on any CPU and thread count."""
    import pydicom

    backbone64 = copy.deepcopy(backbone).double()
    inputs = sorted((fixtures / "images").glob("*.png")) + sorted((fixtures / "dicom").glob("*.dcm"))
    cases = []
    for path in inputs:
        rel = path.relative_to(fixtures).as_posix()
        img = load_rgb(path)
        ids = {}
        if path.suffix == ".dcm":
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
            ids = {
                "study_instance_uid": str(ds.StudyInstanceUID),
                "series_instance_uid": str(ds.SeriesInstanceUID),
                "sop_instance_uid": str(ds.SOPInstanceUID),
            }
        for spec in tasks:
            side64 = copy.deepcopy(sides[(spec.task, spec.version)]).double()
            bsize = [backbone.config.image_size] * 2
            ssize = [side64.config.image_size] * 2
            x, y = preprocess(img, bsize, ssize, spec.mean, spec.std)
            with torch.no_grad():
                details = backbone64.run(torch.from_numpy(x)[None].double(), details=True)
                margin = selection_margin(details.importance, backbone.config.top_k)
                if margin < SELECTION_MARGIN:
                    raise RuntimeError(
                        f"{rel} for {spec.task}/{spec.version}: top-k importance gap {margin:.3g} (relative) is under "
                        f"{SELECTION_MARGIN:.3g}; float32 implementations may select other tokens: change the fixture"
                    )
                logits = side64(torch.from_numpy(y)[None].double(), details.key_states, details.value_states)[0]
            logits = [float(v) for v in logits.tolist()]
            if max(abs(v) for v in logits) >= LOGIT_BOUND:
                raise RuntimeError(f"{rel} for {spec.task}/{spec.version}: logits {logits} reach {LOGIT_BOUND}")
            probs = softmax64(logits)
            cases.append(
                {
                    "input": rel,
                    "kind": "dicom" if path.suffix == ".dcm" else "image",
                    **ids,
                    "task": spec.task,
                    "version": spec.version,
                    "classes": list(spec.classes),
                    "logits": logits,
                    "probabilities": probs,
                    "label": spec.classes[int(np.argmax(probs))],
                }
            )
    return cases


def generate_demo(demo: Path, fixtures: Path, log=print) -> None:
    """Regenerate models/demo and models/fixtures from scratch."""
    for folder in (demo, fixtures):
        if folder.exists():
            shutil.rmtree(folder)
    backbone, sides = build_repository(
        demo, TINY_BACKBONE, TINY_SIDE, DEMO_BACKBONE_NAME, DEMO_BACKBONE_SEED, DEMO_TASKS, log=log
    )
    arrays = fixture_arrays()
    write_images(fixtures / "images", arrays)
    write_dicoms(fixtures / "dicom", arrays)
    reference = {
        "generated_by": (
            "python -m fptserve_models demo: PyTorch FPT+ reference model (not ONNX) on the demo repository's "
            "random float32 weights, evaluated in float64; PIL pipeline: convert('RGB'), separate Image.BILINEAR "
            "resizes of the original image to the backbone and side sizes, ToTensor (/255), Normalize "
            "((x - mean) / std, float32); DICOM decoded with pydicom pixel_array then Image.fromarray; "
            "probabilities = float64 softmax of the logits"
        ),
        "repository": "../demo",
        "backbone": DEMO_BACKBONE_NAME,
        "tolerance": REFERENCE_TOLERANCE,
        "cases": reference_cases(fixtures, backbone, sides, DEMO_TASKS),
    }
    write_json(fixtures / "reference.json", reference)
    log(f"fixtures: {len(reference['cases'])} reference cases in {fixtures / 'reference.json'}")


def generate_full(out: Path, fp16: bool = False, opset: int = DEFAULT_OPSET, log=print) -> None:
    """Full-size (paper) models with random weights, for benchmarks."""
    name = FULL_BACKBONE_NAME + ("-fp16" if fp16 else "")
    build_repository(out, PAPER_BACKBONE, PAPER_SIDE, name, 0, FULL_TASKS, fp16=fp16, opset=opset, parity_samples=1, log=log)
