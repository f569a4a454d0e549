"""The Python peer fptserve is benchmarked against.

A gRPC server for the same `fptserve.v1.Classifier` service, written the way a hospital ML
team typically would: grpcio + pydicom (with its pylibjpeg / GDCM plugins) + numpy + PIL +
ONNX Runtime, plain code, one request at a time per worker thread, no batching and no
caching across requests.

It does the same work as fptserve per call, so the comparison is fair:

* decode the input once: DICOM through `pydicom.dcmread` -> `pixel_array` (the requested
  frame) -> the pixel policy of the README's DICOM section (modality rescale -> VOI:
  the file's first window with its VOI LUT Function, else 8-bit-or-less unsigned data
  scaled to full range, else min-max -> `floor(y + 0.5)` -> MONOCHROME1 inversion -> grey
  replicated to RGB); PNG / JPEG / TIFF through PIL's `convert('RGB')`;
* per distinct (backbone, mean, std, pixel policy) among the requested tasks: PIL bilinear
  resize to the backbone size, `/255`, `(x - mean) / std` in float32, one backbone run;
* per distinct (side size, mean, std, pixel policy): the same for the side network's size,
  from the original image;
* each task's side network on its backbone pass's K/V; softmax in float64 of the logits.

Shapes, sizes, normalisation and class names come from the repository's manifests.

Not implemented (fptserve does them; none of the benchmark inputs needs them): Modality LUT
and VOI LUT Sequences, enhanced multi-frame functional groups, PALETTE COLOR (pydicom's
indices are used as grey values), the request-size/pixel/frame limits and the in-flight
limit (RESOURCE_EXHAUSTED), SHA-256 and graph-interface checks at load.

Usage: python benches/peer.py --repository models/demo [--listen 127.0.0.1:0] [--workers 16]
       [--intra-op-threads N] [--inter-op-threads N]
Prints one line `serving HOST:PORT` on stdout once it serves; stops on SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.resources
import io
import json
import signal
import sys
import threading
import time
import uuid
import warnings
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
PROTO_FILE = "fptserve/v1/classifier.proto"

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
MAX_TASKS_PER_REQUEST = 64

_stubs_lock = threading.Lock()


# --------------------------------------------------------------------------- stubs


def load_stubs(out_dir: Path):
    """Generates classifier_pb2 / classifier_pb2_grpc from proto/ into out_dir (as the
    package fptserve.v1), puts out_dir on sys.path and returns (pb2, pb2_grpc)."""
    with _stubs_lock:
        if "fptserve.v1.classifier_pb2_grpc" in sys.modules:
            return (
                sys.modules["fptserve.v1.classifier_pb2"],
                sys.modules["fptserve.v1.classifier_pb2_grpc"],
            )
        from grpc_tools import protoc

        out_dir = Path(out_dir).resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
        include = str(importlib.resources.files("grpc_tools") / "_proto")
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{include}",
                f"--python_out={out_dir}",
                f"--grpc_python_out={out_dir}",
                str(PROTO_ROOT / PROTO_FILE),
            ]
        )
        if rc != 0:
            raise RuntimeError(f"protoc failed ({rc}) on {PROTO_ROOT / PROTO_FILE}")
        for package in (out_dir / "fptserve", out_dir / "fptserve" / "v1"):
            init = package / "__init__.py"
            if not init.exists():
                init.write_text("")
        if str(out_dir) not in sys.path:
            sys.path.insert(0, str(out_dir))
        importlib.invalidate_caches()
        pb2 = importlib.import_module("fptserve.v1.classifier_pb2")
        pb2_grpc = importlib.import_module("fptserve.v1.classifier_pb2_grpc")
        return pb2, pb2_grpc


# --------------------------------------------------------------------------- models


class InvalidTaskReference(KeyError):
    """A task reference that is empty or malformed (`name@`): INVALID_ARGUMENT."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class TaskNotFound(KeyError):
    """An unknown task, or an unknown version of a known task: NOT_FOUND."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def compare_versions(a: str, b: str) -> int:
    """fptserve's order: dot-separated parts compare numerically when both are integers,
    as text otherwise ("2" < "10", "1.2" < "1.10")."""
    left, right = a.split("."), b.split(".")
    for x, y in zip(left, right):
        if x.isascii() and x.isdigit() and y.isascii() and y.isdigit():
            m, n = int(x), int(y)
        else:
            m, n = x, y
        if m != n:
            return -1 if m < n else 1
    return (len(left) > len(right)) - (len(left) < len(right))


@dataclass(frozen=True)
class Policy:
    """A DICOM pixel policy (README: DICOM): voi "auto", "window" or "minmax"."""

    voi: str = "auto"
    window_center: float | None = None
    window_width: float | None = None
    voi_function: str | None = None

    @classmethod
    def from_manifest(cls, d: dict | None) -> tuple["Policy", bool]:
        d = d or {}
        policy = cls(
            voi=str(d.get("voi", "auto")),
            window_center=None if d.get("window_center") is None else float(d["window_center"]),
            window_width=None if d.get("window_width") is None else float(d["window_width"]),
            voi_function=d.get("voi_function") or None,
        )
        return policy, bool(d.get("allow_request_override", False))

    def validate(self) -> None:
        if self.voi in ("auto", "minmax"):
            return
        if self.voi != "window":
            raise ValueError(f"dicom.voi {self.voi!r} is not supported (auto, window or minmax)")
        if (self.voi_function or "LINEAR").strip().upper() not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
            raise ValueError(f"VOI function {self.voi_function!r}: use linear, linear_exact or sigmoid")
        c, w = self.window_center, self.window_width
        if c is None or w is None or not np.isfinite(c) or not np.isfinite(w) or w <= 0:
            raise ValueError("a window pixel policy needs a finite window_center and a window_width > 0")


AUTO = Policy()


@dataclass
class Backbone:
    name: str
    path: Path
    session: Any
    input_size: tuple[int, int]


@dataclass
class Adapter:
    task: str
    version: str
    classes: list[str]
    backbone: Backbone
    backbone_size: tuple[int, int]
    side_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    policy: Policy
    allow_request_override: bool
    sha256: str
    resize: str
    path: Path
    session: Any


def _size(value) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    h, w = value
    return int(h), int(w)


def _f32(values) -> tuple[float, float, float]:
    """Mean / std as the float32 values fptserve uses, for keys and arithmetic."""
    return tuple(float(v) for v in np.asarray(values, dtype=np.float32))  # type: ignore[return-value]


class Models:
    """Every backbone and task version of a model repository, as ONNX Runtime CPU sessions.
    A model that fails to load is reported on stderr and skipped (as fptserve does)."""

    def __init__(self, repository: Path, intra_op_threads: int = 0, inter_op_threads: int = 0):
        import onnxruntime as ort

        self.repository = Path(repository)
        self._ort = ort
        self._intra = int(intra_op_threads)
        self._inter = int(inter_op_threads)
        self.backbones: dict[str, Backbone] = {}
        self.tasks: dict[str, list[Adapter]] = {}  # versions oldest first

        for manifest_path in sorted((self.repository / "backbones").glob("*/manifest.json")):
            try:
                m = json.loads(manifest_path.read_text())
                path = manifest_path.parent / m.get("file", "backbone.onnx")
                shape = next(i["shape"] for i in m["inputs"] if i["name"] == "pixel_values")
                self.backbones[m["name"]] = Backbone(
                    name=m["name"], path=path, session=self._session(path), input_size=(int(shape[2]), int(shape[3]))
                )
            except Exception as e:  # noqa: BLE001 - skip the model, serve the rest
                print(f"peer: skipping backbone {manifest_path.parent}: {e}", file=sys.stderr)

        for manifest_path in sorted((self.repository / "tasks").glob("*/*/manifest.json")):
            try:
                m = json.loads(manifest_path.read_text())
                backbone_name = m["backbone"]["name"]
                if backbone_name not in self.backbones:
                    raise ValueError(f"its backbone {backbone_name!r} is not loaded")
                backbone = self.backbones[backbone_name]
                pre = m["preprocessing"]
                policy, allow = Policy.from_manifest(pre.get("dicom"))
                policy.validate()
                path = manifest_path.parent / m.get("file", "side.onnx")
                adapter = Adapter(
                    task=str(m.get("task", manifest_path.parent.parent.name)),
                    version=str(m.get("version", manifest_path.parent.name)),
                    classes=list(m["classes"]),
                    backbone=backbone,
                    backbone_size=_size(pre.get("backbone_size", backbone.input_size)),
                    side_size=_size(pre["side_size"]),
                    mean=_f32(pre["mean"]),
                    std=_f32(pre["std"]),
                    policy=policy,
                    allow_request_override=allow,
                    sha256=str(m.get("sha256", "")),
                    resize=str(pre.get("resize", "pil-bilinear")),
                    path=path,
                    session=self._session(path),
                )
                self.tasks.setdefault(adapter.task, []).append(adapter)
            except Exception as e:  # noqa: BLE001
                print(f"peer: skipping adapter {manifest_path.parent}: {e}", file=sys.stderr)

        import functools

        for versions in self.tasks.values():
            versions.sort(key=functools.cmp_to_key(lambda a, b: compare_versions(a.version, b.version)))
        if not self.tasks:
            raise RuntimeError(f"no task adapter could be loaded from {self.repository}")

    def _session(self, path: Path):
        ort = self._ort
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if self._intra > 0:
            so.intra_op_num_threads = self._intra
        if self._inter > 0:
            so.inter_op_num_threads = self._inter
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def resolve(self, task: str) -> Adapter:
        """`name` (its newest version) or `name@version`."""
        name, at, version = task.partition("@")
        if not name or (at and not version):
            raise InvalidTaskReference(f'invalid task reference {task!r}: use "name" or "name@version"')
        versions = self.tasks.get(name)
        if not versions:
            raise TaskNotFound(f"unknown task {name!r} (loaded: {', '.join(sorted(self.tasks))})")
        if not at:
            return versions[-1]
        for adapter in versions:
            if adapter.version == version:
                return adapter
        raise TaskNotFound(
            f"task {name!r} has no version {version!r} (loaded: {', '.join(a.version for a in versions)})"
        )


# --------------------------------------------------------------------------- decoding


class DecodeError(ValueError):
    """Bytes that are not a decodable image / DICOM, or a frame out of range."""


class Unsupported(DecodeError):
    """A valid DICOM that this peer cannot decode."""


def _first(value) -> float | None:
    if value is None or value == "":
        return None
    try:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            if len(value) == 0:
                return None
            value = value[0]
        return float(value)
    except (TypeError, ValueError):
        return None


def _to_uint8(y: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(y + 0.5), 0, 255).astype(np.uint8)


def _apply_window(x: np.ndarray, center: float, width: float, function: str | None) -> np.ndarray:
    """VOI window onto 0..255 (PS3.3 C.11.2.1.2.1 LINEAR, C.11.2.1.3 LINEAR_EXACT / SIGMOID)."""
    c = float(center)
    function = (function or "LINEAR").strip().upper()
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if function == "LINEAR_EXACT":
            w = float(width)
            return np.where(x <= c - w / 2.0, 0.0, np.where(x > c + w / 2.0, 255.0, ((x - c) / w + 0.5) * 255.0))
        if function == "SIGMOID":
            return 255.0 / (1.0 + np.exp(-4.0 * (x - c) / float(width)))
        w = max(float(width), 1.0)
        lo = c - 0.5 - (w - 1.0) / 2.0
        hi = c - 0.5 + (w - 1.0) / 2.0
        return np.where(x <= lo, 0.0, np.where(x > hi, 255.0, ((x - (c - 0.5)) / (w - 1.0) + 0.5) * 255.0))


def read_dicom(data: bytes, frame: int = 0):
    """(dataset, stored pixels of `frame` as pydicom's pixel_array gives them)."""
    import pydicom
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as e:  # noqa: BLE001
        raise DecodeError(f"not a DICOM file: {e}") from e
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DecodeError("the DICOM file has no pixel data")
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        if implicit is not None and little is not None:
            meta.TransferSyntaxUID = (
                ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
            )
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    frames = max(frames, 1)
    if frame >= frames:
        raise DecodeError(f"frame {frame} out of range: the file has {frames} frame(s)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except NotImplementedError as e:
        raise Unsupported(f"cannot decode this DICOM: {e}") from e
    except Exception as e:  # noqa: BLE001
        message = str(e)
        if "transfer syntax" in message.lower() and ("no pixel data" in message.lower() or "unable to" in message.lower()):
            raise Unsupported(f"cannot decode this DICOM: {message}") from e
        raise DecodeError(f"cannot decode the DICOM pixel data: {message}") from e
    arr = np.asarray(arr)
    if frames > 1:
        arr = arr[frame]
    return ds, arr


def render_dicom(ds, stored: np.ndarray, policy: Policy = AUTO) -> np.ndarray:
    """Display pixels, uint8 (rows, columns, 3), of one stored DICOM frame under `policy`."""
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2") and stored.ndim == 3:
        # Colour (pydicom already converted YBR to RGB): 8 bits as is, deeper -> top 8 bits.
        bits_stored = int(ds.get("BitsStored", 8) or 8)
        s = stored.astype(np.int64)
        if bits_stored > 8:
            s = s >> (bits_stored - 8)
        return np.ascontiguousarray(np.clip(s, 0, 255).astype(np.uint8))

    s = stored[:, :, 0] if stored.ndim == 3 else stored
    slope = _first(ds.get("RescaleSlope", None))
    intercept = _first(ds.get("RescaleIntercept", None))
    slope = 1.0 if slope is None else slope
    intercept = 0.0 if intercept is None else intercept
    v = s.astype(np.float64) * slope + intercept

    def minmax() -> np.ndarray:
        lo, hi = float(v.min()), float(v.max())
        return np.zeros_like(v) if hi <= lo else (v - lo) / (hi - lo) * 255.0

    if policy.voi == "window":
        y = _apply_window(v, policy.window_center, policy.window_width, policy.voi_function)
    elif policy.voi == "minmax":
        y = minmax()
    else:  # auto
        center = _first(ds.get("WindowCenter", None))
        width = _first(ds.get("WindowWidth", None))
        bits_stored = int(ds.get("BitsStored", 8) or 8)
        unsigned = int(ds.get("PixelRepresentation", 0) or 0) == 0
        if center is not None and width is not None:
            y = _apply_window(v, center, width, str(ds.get("VOILUTFunction", "") or "LINEAR"))
        elif bits_stored <= 8 and unsigned and slope == 1.0 and intercept == 0.0:
            y = v * (255.0 / float(2**bits_stored - 1))
        else:
            y = minmax()
    grey = _to_uint8(y)
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))


def decode_display(data: bytes, frame: int = 0, policy: Policy = AUTO) -> np.ndarray:
    """A DICOM file's display pixels (pixel policy "auto" unless given): uint8 HxWx3."""
    ds, stored = read_dicom(data, frame)
    return render_dicom(ds, stored, policy)


def decode_image(data: bytes) -> np.ndarray:
    """A PNG / JPEG / TIFF file as PIL's convert('RGB') gives it: uint8 HxWx3."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # noqa: BLE001
        raise DecodeError(f"not a decodable image: {e}") from e


# --------------------------------------------------------------------------- model pipeline


def _tensor(img: Image.Image, size, mean, std) -> np.ndarray:
    h, w = _size(size)
    resized = img.resize((w, h), Image.BILINEAR)
    x = np.asarray(resized, dtype=np.uint8).astype(np.float32) / np.float32(255)
    x = x.transpose(2, 0, 1)
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray(((x - m) / s)[None], dtype=np.float32)


def preprocess(rgb: np.ndarray, size: int, mean, std) -> np.ndarray:
    """PIL bilinear resize to size (int, or [height, width]), /255, (x - mean) / std in
    float32: [1, 3, H, W]."""
    img = rgb if isinstance(rgb, Image.Image) else Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    return _tensor(img.convert("RGB"), size, mean, std)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def _run(
    adapters: Sequence[Adapter],
    policies: Sequence[Policy],
    render: Callable[[Policy], np.ndarray],
    timings: dict | None = None,
) -> tuple[list[dict], int, bool]:
    """The shared-backbone pipeline. Returns (results, backbone_runs, features_reused)."""
    t_pre = t_back = t_side = 0.0
    images: dict[Policy, Image.Image] = {}
    passes: dict[tuple, tuple[int, list[np.ndarray]]] = {}
    side_inputs: dict[tuple, np.ndarray] = {}
    results = []
    reused = False
    for adapter, policy in zip(adapters, policies):
        t = time.perf_counter()
        img = images.get(policy)
        if img is None:
            img = images[policy] = Image.fromarray(render(policy))
        t_pre += time.perf_counter() - t

        key = (adapter.backbone.name, adapter.backbone_size, adapter.mean, adapter.std, policy)
        if key in passes:
            reused = True
            run_index, kv = passes[key]
        else:
            t = time.perf_counter()
            pixels = _tensor(img, adapter.backbone_size, adapter.mean, adapter.std)
            t_pre += time.perf_counter() - t
            t = time.perf_counter()
            kv = adapter.backbone.session.run(["key_states", "value_states"], {"pixel_values": pixels})
            t_back += time.perf_counter() - t
            run_index = len(passes)
            passes[key] = (run_index, kv)

        side_key = (adapter.side_size, adapter.mean, adapter.std, policy)
        side = side_inputs.get(side_key)
        if side is None:
            t = time.perf_counter()
            side = side_inputs[side_key] = _tensor(img, adapter.side_size, adapter.mean, adapter.std)
            t_pre += time.perf_counter() - t

        t = time.perf_counter()
        (logits,) = adapter.session.run(
            ["logits"], {"side_pixel_values": side, "key_states": kv[0], "value_states": kv[1]}
        )
        t_side += time.perf_counter() - t
        logits = np.asarray(logits[0], dtype=np.float32)
        probabilities = _softmax(logits)
        label = adapter.classes[int(np.argmax(probabilities.astype(np.float32)))]
        results.append(
            {
                "task": adapter.task,
                "version": adapter.version,
                "classes": list(adapter.classes),
                "probabilities": probabilities.tolist(),
                "logits": logits.astype(np.float64).tolist(),
                "label": label,
                "backbone": adapter.backbone.name,
                "backbone_run": run_index,
            }
        )
    if timings is not None:
        timings["preprocess_ms"] = timings.get("preprocess_ms", 0.0) + t_pre * 1e3
        timings["backbone_ms"] = timings.get("backbone_ms", 0.0) + t_back * 1e3
        timings["adapters_ms"] = timings.get("adapters_ms", 0.0) + t_side * 1e3
    return results, len(passes), reused


def classify(models: Models, rgb: np.ndarray, tasks: list[str]) -> list[dict]:
    """Classifies display pixels (uint8 HxWx3) for `tasks`: one dict per task, in order,
    with task, version, classes, probabilities, label (and logits, backbone, backbone_run)."""
    adapters = [models.resolve(t) for t in tasks]
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    results, _, _ = _run(adapters, [AUTO] * len(adapters), lambda _policy: rgb)
    return results


# --------------------------------------------------------------------------- gRPC


def _make_servicer(models: Models, pb2, pb2_grpc):
    import grpc

    class ClassifierServicer(pb2_grpc.ClassifierServicer):
        def Classify(self, request, context):
            start = time.perf_counter()
            request_id = request.request_id or uuid.uuid4().hex
            tasks = list(request.tasks)
            if not tasks:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no tasks given: name at least one task (see ListTasks)")
            if len(tasks) > MAX_TASKS_PER_REQUEST:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{len(tasks)} tasks requested; at most {MAX_TASKS_PER_REQUEST} per call",
                )
            try:
                adapters = [models.resolve(t) for t in tasks]
            except InvalidTaskReference as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except TaskNotFound as e:
                context.abort(grpc.StatusCode.NOT_FOUND, str(e))

            requested = None
            if request.HasField("pixel_policy"):
                p = request.pixel_policy
                requested = Policy(
                    voi=p.voi,
                    window_center=p.window_center if p.HasField("window_center") else None,
                    window_width=p.window_width if p.HasField("window_width") else None,
                    voi_function=p.voi_function or None,
                )
            policies = []
            for adapter in adapters:
                if requested is None:
                    policies.append(adapter.policy)
                    continue
                if not adapter.allow_request_override:
                    context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"task {adapter.task}@{adapter.version} does not allow overriding its DICOM pixel policy",
                    )
                try:
                    requested.validate()
                except ValueError as e:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"pixel_policy: {e}")
                policies.append(requested)

            kind = request.WhichOneof("input")
            if kind is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no input: set either dicom or image")
            timings: dict[str, float] = {}
            response = pb2.ClassifyResponse(request_id=request_id)
            try:
                t = time.perf_counter()
                if kind == "dicom":
                    ds, stored = read_dicom(request.dicom, int(request.frame))
                    frames = max(int(ds.get("NumberOfFrames", 1) or 1), 1)
                    meta = getattr(ds, "file_meta", None)
                    response.dicom.CopyFrom(
                        pb2.DicomIdentifiers(
                            study_instance_uid=str(ds.get("StudyInstanceUID", "")),
                            series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
                            sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                            sop_class_uid=str(ds.get("SOPClassUID", "")),
                            transfer_syntax_uid=str(meta.get("TransferSyntaxUID", "")) if meta is not None else "",
                        )
                    )
                    height, width = int(stored.shape[0]), int(stored.shape[1])
                    response.input.CopyFrom(
                        pb2.InputInfo(
                            width=width,
                            height=height,
                            frames=frames,
                            frame=int(request.frame),
                            format="dicom",
                            color=str(ds.get("PhotometricInterpretation", "")).strip(),
                        )
                    )
                    timings["decode_ms"] = (time.perf_counter() - t) * 1e3

                    def render(policy: Policy) -> np.ndarray:
                        return render_dicom(ds, stored, policy)

                else:
                    if request.frame != 0:
                        raise DecodeError(f"frame {request.frame} out of range: the image has 1 frame")
                    try:
                        img = Image.open(io.BytesIO(request.image))
                        fmt = (img.format or "").lower()
                        mode = img.mode
                        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
                    except Exception as e:  # noqa: BLE001
                        raise DecodeError(f"not a decodable image: {e}") from e
                    response.input.CopyFrom(
                        pb2.InputInfo(
                            width=int(rgb.shape[1]),
                            height=int(rgb.shape[0]),
                            frames=1,
                            frame=0,
                            format=fmt,
                            color=mode,
                        )
                    )
                    timings["decode_ms"] = (time.perf_counter() - t) * 1e3

                    def render(policy: Policy) -> np.ndarray:
                        return rgb

                results, runs, reused = _run(adapters, policies, render, timings)
            except Unsupported as e:
                context.abort(grpc.StatusCode.UNIMPLEMENTED, str(e))
            except DecodeError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except Exception as e:  # noqa: BLE001 - a model failure answers only this call
                context.abort(grpc.StatusCode.INTERNAL, f"classification failed: {type(e).__name__}: {e}")

            for r in results:
                response.results.add(
                    task=r["task"],
                    adapter_version=r["version"],
                    scores=[
                        pb2.ClassScore(name=n, probability=p, logit=l)
                        for n, p, l in zip(r["classes"], r["probabilities"], r["logits"])
                    ],
                    label=r["label"],
                    backbone=r["backbone"],
                    backbone_run=r["backbone_run"],
                )
            response.backbone_runs = runs
            response.backbone_features_reused = reused
            timings["total_ms"] = (time.perf_counter() - start) * 1e3
            response.timings.CopyFrom(pb2.StageTimings(**timings))
            return response

        def ListTasks(self, request, context):
            response = pb2.ListTasksResponse()
            for name in sorted(models.tasks):
                versions = models.tasks[name]
                info = response.tasks.add(name=name, default_version=versions[-1].version)
                for a in versions:
                    info.versions.add(
                        version=a.version,
                        classes=a.classes,
                        backbone=a.backbone.name,
                        sha256=a.sha256,
                        preprocessing=pb2.Preprocessing(
                            backbone_size=list(a.backbone_size),
                            side_size=list(a.side_size),
                            mean=list(a.mean),
                            std=list(a.std),
                            resize=a.resize,
                        ),
                    )
            return response

    return ClassifierServicer()


def serve(repository, listen: str = "127.0.0.1:0", workers: int = 16, intra_op_threads: int = 0, inter_op_threads: int = 0):
    """Loads the repository and starts the server; returns (grpc server, bound port)."""
    import tempfile

    import grpc

    # A no-op when the caller already loaded the stubs (they are process-wide).
    loaded = "fptserve.v1.classifier_pb2_grpc" in sys.modules
    pb2, pb2_grpc = load_stubs(ROOT if loaded else Path(tempfile.mkdtemp(prefix="fptserve-peer-stubs-")))
    models = Models(Path(repository), intra_op_threads, inter_op_threads)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    pb2_grpc.add_ClassifierServicer_to_server(_make_servicer(models, pb2, pb2_grpc), server)
    port = server.add_insecure_port(listen)
    if not port:
        raise RuntimeError(f"cannot listen on {listen}")
    server.start()
    server.models = models  # for callers that want to look
    return server, port


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Python peer of fptserve (grpcio + pydicom + PIL + ONNX Runtime)")
    parser.add_argument("--repository", required=True, type=Path, help="model repository")
    parser.add_argument("--listen", default="127.0.0.1:0", help="gRPC address (port 0: any free port)")
    parser.add_argument("--workers", type=int, default=16, help="gRPC worker threads")
    parser.add_argument("--intra-op-threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: default)")
    parser.add_argument("--inter-op-threads", type=int, default=0, help="ONNX Runtime inter-op threads (0: default)")
    args = parser.parse_args(argv)

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    server, port = serve(args.repository, args.listen, args.workers, args.intra_op_threads, args.inter_op_threads)
    host = args.listen.rsplit(":", 1)[0] if ":" in args.listen else "127.0.0.1"
    print(f"serving {host}:{port}", flush=True)
    while not stop.wait(0.5):
        pass
    server.stop(grace=2).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
