"""Training data: an image folder scanned into a labelled, split data set, decoded with the
daemon's own decoder, resized as served, and the backbone's K/V preloaded once.

Layouts (class order = sorted folder names, as torchvision's ImageFolder):

    DATA_DIR/<class>/...                      + a seeded, stratified validation split
    DATA_DIR/train/<class>/... + DATA_DIR/val/<class>/...   (DATA_DIR/test/ is ignored)

Files are found recursively in each class folder; names starting with "." are skipped.
Every other file must be PNG, JPEG, TIFF or a DICOM Part 10 file (told by its first bytes,
as the daemon does). The on-disk cache (see ``PixelCache`` and ``KVCache``) holds fixed-size
records read back with ``pread``, so training holds one batch in memory, not the data set.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import PIL
from PIL import Image

from .digest import sha256_file as sha256_path
from .preprocess import normalize, resize_u8
from .progress import Progress

SPLITS = ("train", "val")
KINDS = ("png", "jpeg", "tiff", "dicom")
MAX_LISTED_ERRORS = 20


class DataError(ValueError):
    """A data set that cannot be trained on; the message names the file or folder."""


# --------------------------------------------------------------------------------------------
# scanning
# --------------------------------------------------------------------------------------------


def sniff(head: bytes) -> str | None:
    """The kind of a file from its first 132 bytes, by the same rules as the daemon: DICOM
    is a Part 10 file ("DICM" at offset 128, or at 0 without the preamble)."""
    if head[128:132] == b"DICM" or head[:4] == b"DICM":
        return "dicom"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None




@dataclass(frozen=True)
class Entry:
    split: str  # "train" or "val"
    label: int
    cls: str
    rel: str  # path relative to the data folder, "/"-separated
    path: Path
    kind: str
    sha256: str


@dataclass
class Dataset:
    root: Path
    layout: str  # "class-folders" (seeded split) or "train-val-folders"
    classes: list[str]
    entries: list[Entry]  # train entries, then val entries; each in (class, path) order
    val_fraction: float | None
    seed: int
    digest: str = ""
    ignored: list[str] = field(default_factory=list)

    def indices(self, split: str) -> list[int]:
        return [i for i, e in enumerate(self.entries) if e.split == split]

    def counts(self) -> dict[str, dict[str, int]]:
        out = {s: {c: 0 for c in self.classes} for s in SPLITS}
        for e in self.entries:
            out[e.split][e.cls] += 1
        return out

    def kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.kind] = out.get(e.kind, 0) + 1
        return dict(sorted(out.items()))


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and _visible(p)), key=lambda p: p.name)


def _files(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return sorted(out)


def _check_classes(where: Path, dirs: list[Path]) -> list[str]:
    if not dirs:
        raise DataError(
            f"{where} has no class folders: put the images of each class in their own folder, "
            f"{where}/<class>/ (or {where}/train/<class>/ and {where}/val/<class>/)"
        )
    if len(dirs) == 1:
        raise DataError(
            f"{where} has only one class folder ({dirs[0].name}/): a classifier needs at least two classes"
        )
    return [d.name for d in dirs]


def _list_class(folder: Path, problems: list[str]) -> list[tuple[Path, str]]:
    files = _files(folder)
    if not files:
        raise DataError(f"class folder {folder} is empty (no image files)")
    out = []
    for path in files:
        try:
            with open(path, "rb") as f:
                head = f.read(132)
        except OSError as e:
            problems.append(f"{path}: cannot read: {e.strerror or e}")
            continue
        kind = sniff(head)
        if kind is None:
            problems.append(f"{path}: not a PNG, JPEG, TIFF or DICOM Part 10 file")
            continue
        out.append((path, kind))
    return out


def _raise_problems(problems: list[str], what: str) -> None:
    if not problems:
        return
    shown = problems[:MAX_LISTED_ERRORS]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    noun = "file" if len(problems) == 1 else "files"
    raise DataError(f"{len(problems)} {noun} {what}:\n  " + "\n  ".join(shown) + more)


def scan_dataset(root: str | Path, val_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Finds the classes and files, splits, hashes every file (the data digest)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    top = {p.name: p for p in root.iterdir() if p.is_dir() and _visible(p)}
    problems: list[str] = []
    ignored: list[str] = []
    listed: list[tuple[str, str, Path, str]] = []  # split, class, path, kind
    if "train" in top or "val" in top:
        for split in SPLITS:
            if split not in top:
                have = "train" if split == "val" else "val"
                raise DataError(
                    f"{root} has {have}/ but no {split}/: use {root}/train/<class>/ with {root}/val/<class>/, "
                    f"or {root}/<class>/ with a seeded validation split (--val-fraction)"
                )
        others = sorted(set(top) - {"train", "val"})
        ignored = [f"{root / name}/" for name in others]
        classes = _check_classes(top["train"], _class_dirs(top["train"]))
        val_classes = [d.name for d in _class_dirs(top["val"])]
        if val_classes != classes:
            missing = sorted(set(classes) - set(val_classes))
            extra = sorted(set(val_classes) - set(classes))
            parts = []
            if missing:
                parts.append(f"{root / 'val'} lacks " + ", ".join(f"{c}/" for c in missing))
            if extra:
                parts.append(f"{root / 'val'} has " + ", ".join(f"{c}/" for c in extra) + f" that {root / 'train'} lacks")
            raise DataError("train/ and val/ must have the same class folders: " + "; ".join(parts))
        for split in SPLITS:
            for cls in classes:
                for path, kind in _list_class(top[split] / cls, problems):
                    listed.append((split, cls, path, kind))
        layout, fraction = "train-val-folders", None
    else:
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"--val-fraction {val_fraction} must be between 0 and 1 (exclusive)")
        class_dirs = _class_dirs(root)
        classes = _check_classes(root, class_dirs)
        for label, d in enumerate(class_dirs):
            files = _list_class(d, problems)
            if len(files) < 2 and not problems:
                raise DataError(
                    f"class folder {d} has {len(files)} image: a validation split needs at least 2 per class "
                    f"(or give {root}/train/<class>/ and {root}/val/<class>/ folders)"
                )
            n = len(files)
            n_val = min(max(1, int(round(n * val_fraction))), n - 1) if n >= 2 else 0
            order = np.random.default_rng([int(seed), label]).permutation(n)
            val = set(order[:n_val].tolist())
            for i, (path, kind) in enumerate(files):
                listed.append(("val" if i in val else "train", d.name, path, kind))
        layout, fraction = "class-folders", float(val_fraction)
    _raise_problems(problems, "cannot be used (PNG, JPEG, TIFF and DICOM files only; names starting with '.' are skipped)")

    label_of = {c: i for i, c in enumerate(classes)}
    entries = []
    for split, cls, path, kind in listed:
        try:
            digest = sha256_path(path)
        except OSError as e:
            problems.append(f"{path}: cannot read: {e.strerror or e}")
            continue
        entries.append(Entry(split, label_of[cls], cls, path.relative_to(root).as_posix(), path, kind, digest))
    _raise_problems(problems, "cannot be read")
    entries.sort(key=lambda e: (SPLITS.index(e.split), e.label, e.rel))
    h = hashlib.sha256()
    h.update(json.dumps({"layout": layout, "classes": classes}).encode())
    for e in entries:
        h.update(f"{e.split}\t{e.cls}\t{e.rel}\t{e.sha256}\n".encode())
    return Dataset(root, layout, classes, entries, fraction, int(seed), h.hexdigest(), ignored)


# --------------------------------------------------------------------------------------------
# decoding: the daemon's own decoder (fptserve decode), or PIL for PNG/JPEG/TIFF
# --------------------------------------------------------------------------------------------

VOI_POLICIES = ("auto", "window", "minmax")
VOI_FUNCTIONS = ("linear", "linear_exact", "sigmoid")
# full: every stored pixel; reduced: JPEG 2000 / HTJ2K / DCT JPEG frames decode at the coarsest
# resolution whose sides are at least the task's largest input size (README: DICOM).
DECODE_RESOLUTIONS = ("full", "reduced")


def dicom_policy(
    voi: str = "auto",
    window_center: float | None = None,
    window_width: float | None = None,
    voi_function: str | None = None,
    allow_request_override: bool = False,
    decode_resolution: str = "full",
) -> dict[str, Any]:
    """The task's DICOM pixel policy, spelled as manifests spell it (README: DICOM)."""
    if decode_resolution not in DECODE_RESOLUTIONS:
        raise DataError(f"--decode-resolution {decode_resolution!r}: use full or reduced")
    if voi not in VOI_POLICIES:
        raise DataError(f"--voi {voi!r}: use auto, window or minmax")
    policy: dict[str, Any] = {"voi": voi}
    if voi == "window":
        if window_center is None or window_width is None or not math.isfinite(window_center) or not (
            math.isfinite(window_width) and window_width > 0
        ):
            raise DataError("--voi window needs a finite --window-center and a --window-width > 0")
        function = voi_function or "linear"
        if function not in VOI_FUNCTIONS:
            raise DataError(f"--voi-function {function!r}: use linear, linear_exact or sigmoid")
        policy.update(window_center=float(window_center), window_width=float(window_width), voi_function=function)
    elif window_center is not None or window_width is not None or voi_function is not None:
        raise DataError(f"--window-center / --window-width / --voi-function need --voi window (not {voi})")
    if allow_request_override:
        policy["allow_request_override"] = True
    if decode_resolution != "full":
        policy["decode_resolution"] = decode_resolution
    return policy


def find_fptserve(explicit: str | Path | None = None) -> Path | None:
    """The fptserve binary: the given path, else $FPTSERVE_BIN, else `fptserve` on PATH."""
    if explicit:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise DataError(f"--fptserve {path}: not an executable file")
        return path
    env = os.environ.get("FPTSERVE_BIN")
    if env and Path(env).is_file() and os.access(env, os.X_OK):
        return Path(env)
    found = shutil.which("fptserve")
    return Path(found) if found else None


class Decoder:
    """Decodes one file to the RGB display pixels serving would see (uint8 [H, W, 3]).

    ``fptserve``: `fptserve decode FILE --output display --npy OUT` for every file: the
    daemon's decoder and DICOM pixel policy, so training sees exactly the served pixels.
    ``pil``: PIL `convert('RGB')` for PNG/JPEG/TIFF (the authors' loader; the daemon follows
    its rules, but JPEG decoders may round differently); DICOM then needs the binary."""

    def __init__(self, mode: str, binary: Path | None, policy: dict[str, Any], min_size: int | None = None):
        """``min_size``: the task's largest input size; with ``decode_resolution: reduced`` in
        the policy, DICOM frames decode at the coarsest resolution at least that big, as the
        daemon decodes them for this task."""
        if mode not in ("fptserve", "pil"):
            raise DataError(f"decoder {mode!r}: use fptserve or pil")
        if mode == "fptserve" and binary is None:
            raise DataError(
                "the fptserve binary is needed to decode training images as the daemon does: pass --fptserve PATH, "
                "set FPTSERVE_BIN or put fptserve on PATH (or use --decoder pil for PNG/JPEG/TIFF only)"
            )
        self.mode = mode
        self.binary = binary
        self.policy = policy
        self.min_size = min_size if policy.get("decode_resolution") == "reduced" else None
        self.binary_sha256 = sha256_path(binary) if (binary is not None and mode == "fptserve") else None

    def describe(self) -> dict[str, Any]:
        if self.mode == "fptserve":
            described = {"name": "fptserve decode --output display", "binary_sha256": self.binary_sha256}
            if self.min_size is not None:
                described["min_size"] = self.min_size
            return described
        return {"name": "PIL convert('RGB')", "pillow": PIL.__version__}

    def policy_args(self) -> list[str]:
        p = self.policy
        args = ["--voi", p["voi"]]
        if p["voi"] == "window":
            args += ["--window-center", repr(p["window_center"]), "--window-width", repr(p["window_width"]),
                     "--voi-function", p["voi_function"]]
        if self.min_size is not None:
            args += ["--min-size", str(self.min_size)]
        return args

    def decode(self, entry: Entry, scratch: Path) -> np.ndarray:
        if self.mode == "fptserve":
            return self._decode_fptserve(entry.path, scratch)
        if entry.kind == "dicom":
            raise DataError(
                f"{entry.path}: DICOM files are decoded by the daemon's own decoder: pass --fptserve PATH or set "
                "FPTSERVE_BIN (not --decoder pil)"
            )
        try:
            with Image.open(entry.path) as img:
                rgb = img.convert("RGB")
                return np.asarray(rgb, dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"{entry.path}: cannot decode {entry.kind}: {e}") from None

    def _decode_fptserve(self, path: Path, scratch: Path) -> np.ndarray:
        fd, out = tempfile.mkstemp(suffix=".npy", dir=scratch)
        os.close(fd)
        try:
            cmd = [str(self.binary), "decode", str(path), "--output", "display", "--npy", out, *self.policy_args()]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            info = None
            for line in reversed(proc.stdout.strip().splitlines()):
                try:
                    info = json.loads(line)
                    break
                except ValueError:
                    continue
            if proc.returncode != 0 or not isinstance(info, dict) or not info.get("ok"):
                message = (info or {}).get("message") or (proc.stderr.strip() or f"exit status {proc.returncode}")
                raise DataError(f"{path}: cannot decode: {message}")
            arr = np.load(out)
        finally:
            try:
                os.unlink(out)
            except OSError:
                pass
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise DataError(f"{path}: fptserve decode gave {arr.dtype} {arr.shape}, expected uint8 (rows, columns, 3)")
        return arr


# --------------------------------------------------------------------------------------------
# record files: fixed-size records, written and read with pwrite / preadv
# --------------------------------------------------------------------------------------------


class Records:
    """A file of ``count`` records of one shape and dtype, record i at offset i * record_bytes."""

    def __init__(self, path: Path, shape: Sequence[int], dtype: str, count: int, create: bool = False,
                 writable: bool = False):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.count = int(count)
        self.record_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        if create:
            with open(self.path, "wb") as f:
                f.truncate(self.count * self.record_bytes)
        elif self.path.stat().st_size != self.count * self.record_bytes:
            raise DataError(f"cache file {self.path} has the wrong size; delete the work folder and rerun")
        self.fd = os.open(self.path, os.O_RDWR if (create or writable) else os.O_RDONLY)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def write(self, index: int, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array, dtype=self.dtype)
        if data.shape != self.shape:
            raise ValueError(f"record shape {data.shape} is not {self.shape}")
        os.pwrite(self.fd, data.tobytes(), int(index) * self.record_bytes)

    def read(self, indices: Sequence[int]) -> np.ndarray:
        out = np.empty((len(indices), *self.shape), dtype=self.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        rb = self.record_bytes
        for j, i in enumerate(indices):
            got = os.preadv(self.fd, [view[j * rb:(j + 1) * rb]], int(i) * rb)
            if got != rb:
                raise DataError(f"cache file {self.path} is truncated; delete the work folder and rerun")
        return out

    def flush(self) -> None:
        os.fsync(self.fd)


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


# --------------------------------------------------------------------------------------------
# pixels: decoded once, resized as served (backbone, side) and for side augmentation
# --------------------------------------------------------------------------------------------


class PixelCache:
    """uint8 pixels of every entry, resized with PIL bilinear from the decoded image:
    ``backbone`` [H, W, 3] and ``side`` [S, S, 3] exactly as served, and optionally
    ``augment`` [A, A, 3], the source the side network's training augmentation crops from.
    Also the exact per-channel sums of the training images' backbone pixels (for mean/std)."""

    def __init__(self, folder: Path, meta: dict[str, Any]):
        self.folder = folder
        self.meta = meta
        n = meta["count"]
        self.backbone = Records(folder / "backbone_u8.bin", meta["backbone_shape"], "uint8", n)
        self.side = Records(folder / "side_u8.bin", meta["side_shape"], "uint8", n)
        self.augment = Records(folder / "augment_u8.bin", meta["augment_shape"], "uint8", n) if meta["augment_shape"] else None

    def close(self) -> None:
        for r in (self.backbone, self.side, self.augment):
            if r is not None:
                r.close()

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Population mean and std per channel of the training images' backbone pixels, on
        the [0, 1] scale (the authors' 'auto' statistics), from exact integer sums."""
        s = self.meta["stats"]
        n = int(s["pixels"])
        mean, std = [], []
        for s1, s2 in zip(s["sum"], s["sum_sq"]):
            s1, s2 = int(s1), int(s2)
            mean.append(s1 / n / 255.0)
            var = (n * s2 - s1 * s1) / (n * n)  # exact integers, then one division
            std.append(math.sqrt(max(var, 0.0)) / 255.0)
        return mean, std


def build_pixel_cache(
    cache_root: Path,
    dataset: Dataset,
    decoder: Decoder,
    backbone_size: int,
    side_size: int,
    augment_size: int | None,
    workers: int,
    progress: bool,
) -> PixelCache:
    key_obj = {
        "data": dataset.digest,
        "decoder": decoder.describe(),
        "policy": decoder.policy,
        "backbone": backbone_size,
        "side": side_size,
        "augment": augment_size,
        "resize": "pil-bilinear",
        "pillow": PIL.__version__,
    }
    folder = cache_root / f"pixels-{_key(key_obj)}"
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("complete"):
            return PixelCache(folder, meta)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    n = len(dataset.entries)
    meta = {
        "key": key_obj,
        "count": n,
        "backbone_shape": [backbone_size, backbone_size, 3],
        "side_shape": [side_size, side_size, 3],
        "augment_shape": [augment_size, augment_size, 3] if augment_size else None,
        "complete": False,
    }
    bb = Records(folder / "backbone_u8.bin", meta["backbone_shape"], "uint8", n, create=True)
    sd = Records(folder / "side_u8.bin", meta["side_shape"], "uint8", n, create=True)
    ag = Records(folder / "augment_u8.bin", meta["augment_shape"], "uint8", n, create=True) if augment_size else None
    sums = np.zeros(3, dtype=np.int64)
    sums_sq = np.zeros(3, dtype=np.int64)
    pixels = 0
    problems: list[str] = []
    scratch = Path(tempfile.mkdtemp(prefix="decode-", dir=folder))
    started = time.monotonic()

    def work(i: int):
        entry = dataset.entries[i]
        rgb = decoder.decode(entry, scratch)
        img = Image.fromarray(rgb, "RGB")
        out = (resize_u8(img, (backbone_size, backbone_size)), resize_u8(img, (side_size, side_size)),
               resize_u8(img, (augment_size, augment_size)) if augment_size else None)
        return i, rgb.shape, out

    try:
        with Progress(n, "decode", enabled=progress) as bar, ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            window = 4 * max(1, workers)  # decoded images waiting to be written: bounded memory
            pending = [pool.submit(work, i) for i in range(min(n, window))]
            for j in range(n):
                future = pending[j]
                if j + window < n:
                    pending.append(pool.submit(work, j + window))
                pending[j] = None
                try:
                    i, shape, (b, s, a) = future.result()
                except DataError as e:
                    problems.append(str(e))
                    bar.update(1)
                    continue
                bb.write(i, b)
                sd.write(i, s)
                if ag is not None:
                    ag.write(i, a)
                if dataset.entries[i].split == "train":
                    flat = b.reshape(-1, 3).astype(np.int64)
                    sums += flat.sum(0)
                    sums_sq += (flat * flat).sum(0)
                    pixels += flat.shape[0]
                bar.update(1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        for r in (bb, sd, ag):
            if r is not None:
                r.close()
    if problems:
        shutil.rmtree(folder, ignore_errors=True)
        _raise_problems(problems, "cannot be decoded")
    meta["stats"] = {"pixels": pixels, "sum": sums.tolist(), "sum_sq": sums_sq.tolist()}
    meta["seconds"] = time.monotonic() - started
    meta["complete"] = True
    _atomic_json(meta_path, meta)
    return PixelCache(folder, meta)


# --------------------------------------------------------------------------------------------
# preloading: the backbone's selected K/V, computed once with backbone.onnx
# --------------------------------------------------------------------------------------------


class KVCache:
    """K/V of every entry, record i = stack([key_states[i], value_states[i]]) of backbone.onnx
    for that image's served backbone pixels, in ``dtype`` (float16 halves the disk and the
    reads; it rounds K/V as an fp16 backbone would, which moves logits by ~1e-4)."""

    def __init__(self, folder: Path, meta: dict[str, Any]):
        self.folder = folder
        self.meta = meta
        self.records = Records(folder / "kv.bin", meta["record_shape"], meta["dtype"], meta["count"])

    @property
    def dtype(self) -> str:
        return self.meta["dtype"]

    def read(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        r = self.records.read(indices)
        return r[:, 0], r[:, 1]

    def close(self) -> None:
        self.records.close()

    @property
    def bytes_per_image(self) -> int:
        return self.records.record_bytes


def backbone_session(backbone_path: Path, device: str):
    """ONNX Runtime session on the backbone file: CUDA when training on cuda and available
    (else CPU, with the same intra-op thread setting as the exporter's checks)."""
    import onnxruntime as ort

    from .export import ort_session

    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        so = ort.SessionOptions()
        so.log_severity_level = 3
        index = device.split(":", 1)[1] if ":" in device else "0"
        return ort.InferenceSession(
            str(backbone_path), so, providers=[("CUDAExecutionProvider", {"device_id": int(index)}), "CPUExecutionProvider"]
        ), "cuda"
    return ort_session(backbone_path), "cpu"


def build_kv_cache(
    cache_root: Path,
    pixels: PixelCache,
    backbone_manifest: dict[str, Any],
    backbone_path: Path,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: str,
    batch_size: int,
    device: str,
    progress: bool,
) -> KVCache:
    arch = backbone_manifest["architecture"]
    record_shape = [2, len(arch["layers_used"]), arch["num_heads"], arch["top_k"], arch["head_dim"]]
    provider = "cuda" if device.startswith("cuda") else "cpu"
    key_obj = {
        "pixels": pixels.folder.name,
        "backbone_sha256": backbone_manifest["sha256"],
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "dtype": dtype,
        "provider": provider,
    }
    folder = cache_root / f"kv-{_key(key_obj)}"
    meta_path = folder / "meta.json"
    n = pixels.meta["count"]
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if meta is None or meta.get("key") != key_obj:
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        meta = {"key": key_obj, "count": n, "record_shape": record_shape, "dtype": dtype, "done": 0, "seconds": 0.0}
        Records(folder / "kv.bin", record_shape, dtype, n, create=True).close()
        _atomic_json(meta_path, meta)
    if meta["done"] >= n:
        return KVCache(folder, meta)

    session, used = backbone_session(backbone_path, device)
    meta["provider"] = used
    records = Records(folder / "kv.bin", record_shape, dtype, n, writable=True)
    np_dtype = np.dtype(dtype)
    try:
        with Progress(n, "preload K/V", enabled=progress) as bar:
            bar.update(meta["done"])
            start = meta["done"]
            for lo in range(start, n, batch_size):
                t0 = time.monotonic()
                idx = list(range(lo, min(n, lo + batch_size)))
                x = normalize(pixels.backbone.read(idx), mean, std)
                k, v = session.run(["key_states", "value_states"], {"pixel_values": x})
                for j, i in enumerate(idx):
                    records.write(i, np.stack([k[j], v[j]]).astype(np_dtype, copy=False))
                records.flush()
                meta["done"] = idx[-1] + 1
                meta["seconds"] += time.monotonic() - t0
                _atomic_json(meta_path, meta)
                bar.update(len(idx))
    finally:
        records.close()
    return KVCache(folder, meta)
