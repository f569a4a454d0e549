"""Train a task adapter: an image folder in, a served adapter (tasks/<task>/<version>/) out.

FPT+'s memory-efficient recipe: the backbone is frozen, so its selected K/V are computed once
per image ("preloading") by the backbone's exported ONNX model through ONNX Runtime (the very
artifact the daemon serves, its SHA-256 recorded) and cached on disk; only the side network and
the fusion module train, in PyTorch, reading one batch of cached K/V at a time.

What is trained is what is served:
  * pixels come from the daemon's own decoder (`fptserve decode --output display`) with the
    task's DICOM pixel policy, resized with PIL bilinear to the backbone and side sizes and
    normalised exactly as the daemon does (preprocess.py);
  * K/V come from backbone.onnx;
  * the result is exported by the exporter (export.export_adapter) with its parity checks,
    plus a check of side.onnx against the trained PyTorch model on the whole validation set.

Recipe (the authors' configuration where known): AdamW (betas 0.9/0.999, weight decay 0.1),
learning rate 1e-4 (their default for a new data set) with a half-cycle cosine decay per step
after an optional linear warm-up (0 epochs by default), 20 epochs, batch 16 (last partial
batch dropped), gradient norm clipped at 1, cross-entropy, Dropout(0.5) after the fusion
projection, HF ViT initialisation of the side ViT and N(0, 1e-6) prompts, best epoch by
validation macro AUC. Preloading fixes the backbone's input, so the authors' weak
augmentation (horizontal flip, brightness/contrast 0.2, random resized crop 0.8-1.0) applies to
the side network's input only, as theirs does when preloading; the K/V always see the
un-augmented image. ``--augment none`` turns it off. Training is float32 on every device.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance

from . import __version__
from .config import SIDE_PRESETS, BackboneConfig, ConfigError, SideConfig, check_compatible
from .data import (
    DataError,
    Dataset,
    Decoder,
    KVCache,
    PixelCache,
    build_kv_cache,
    build_pixel_cache,
    dicom_policy,
    find_fptserve,
    scan_dataset,
)
from .export import (
    ExportError,
    backbone_config_from_manifest,
    check_name,
    export_adapter,
    ort_session,
    read_backbone_dir,
    write_json,
)
from .metrics import evaluate
from .model import SideNetwork
from .preprocess import normalize
from .progress import Progress, table
from .weights import training_init

SELECT_METRICS = ("auc", "accuracy", "kappa")
SIDE_FIELDS = ("hidden_size", "num_layers", "num_heads", "mlp_size", "patch_size", "image_size", "num_prompts")


class TrainError(RuntimeError):
    """A training run that cannot start or finish; nothing was written to the repository."""


@dataclass
class TrainOptions:
    backbone: Path  # backbone folder: manifest.json + backbone.onnx
    data: Path
    task: str
    version: str
    out: Path  # model repository
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.1
    warmup_epochs: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    val_fraction: float = 0.2
    mean: list[float] | None = None
    std: list[float] | None = None
    device: str = "cpu"
    work_dir: Path | None = None
    resume: bool = False
    select_metric: str = "auc"
    patience: int = 10
    augment: str = "side"
    augment_source_size: int | None = None
    kv_cache_dtype: str = "float16"
    preload_batch_size: int = 1
    workers: int | None = None
    side_preset: str = "paper"
    side: dict[str, int] = field(default_factory=dict)  # overrides of SIDE_FIELDS
    decoder: str = "auto"  # auto | fptserve | pil
    fptserve_bin: Path | None = None
    dicom: dict[str, Any] = field(default_factory=lambda: {"voi": "auto"})
    hf_dir: Path | None = None
    publish: str | None = None
    publish_mode: str = "upload"
    make_default: bool = False
    admin_token_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None
    progress: bool = True
    opset: int = 17
    threads: int | None = None  # PyTorch CPU threads (None: PyTorch's default)
    explain: bool = True  # export the adapter's explanation outputs (token_relevance, patch_relevance)


@dataclass
class TrainResult:
    folder: Path
    manifest: dict[str, Any]
    model: SideNetwork  # the best epoch's weights, eval mode, on the CPU
    dataset: Dataset
    classes: list[str]
    mean: list[float]
    std: list[float]
    history: list[dict[str, Any]]
    best_epoch: int
    summary: str
    work_dir: Path | None  # kept only when given
    kv_cache: Path | None  # the K/V cache folder (inside work_dir), when kept
    pixel_cache: Path | None
    published: dict[str, Any] | None = None


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf become null, numpy scalars plain numbers, paths strings."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _vm_hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Resets the kernel's peak-RSS mark of this process (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class StagePeaks:
    """Peak resident set size of this process per stage: at the end of each stage the peak so
    far is read (VmHWM, else getrusage's ru_maxrss) and the kernel's mark is reset (Linux:
    /proc/self/clear_refs 5), so the next stage's figure is its own. Where the reset is not
    allowed, later stages read None and only the overall peak is known."""

    def __init__(self) -> None:
        self.stages: dict[str, int | None] = {}
        self.can_reset = True

    def end(self, stage: str) -> None:
        if not self.can_reset:
            self.stages[stage] = None
            return
        self.stages[stage] = _vm_hwm_bytes() or _maxrss_bytes()
        self.can_reset = _reset_hwm()

    def record(self) -> dict[str, Any]:
        known = [v for v in self.stages.values() if v is not None]
        if known and len(known) == len(self.stages):
            overall = max(known)
        else:  # a reset was refused: from then on ru_maxrss is the peak since the last reset that worked
            overall = max(known + [_maxrss_bytes()])
        return {"peak_rss_bytes": overall, **{f"{k}_peak_rss_bytes": v for k, v in self.stages.items()}}


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MB"


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def lr_at(opts: TrainOptions, t: float) -> float:
    """Learning rate at fractional epoch t: linear warm-up, then half-cycle cosine to 0."""
    if opts.warmup_epochs > 0 and t < opts.warmup_epochs:
        return opts.lr * t / opts.warmup_epochs
    span = max(opts.epochs - opts.warmup_epochs, 1e-12)
    return opts.lr * 0.5 * (1.0 + math.cos(math.pi * (t - opts.warmup_epochs) / span))


def augment_side(source: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """The authors' weak augmentation for the side input, in their order, with PIL (what
    torchvision's transforms call on PIL images): horizontal flip (p 0.5); brightness and
    contrast factors in [0.8, 1.2], in random order; a random resized crop of 80-100% of the
    area with aspect ratio 0.7-1.3 (log-uniform), resized (PIL bilinear) to size x size.
    ``source`` is the image resized to a square (the served side input is squashed the same
    way), larger than ``size``."""
    img = Image.fromarray(source, "RGB")
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    brightness, contrast = rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2)
    ops = [lambda im: ImageEnhance.Brightness(im).enhance(brightness),
           lambda im: ImageEnhance.Contrast(im).enhance(contrast)]
    if rng.random() < 0.5:
        ops.reverse()
    for op in ops:
        img = op(img)
    height, width = source.shape[:2]
    area = height * width
    box = (0, 0, width, height)
    for _ in range(10):
        target = area * rng.uniform(0.8, 1.0)
        ratio = math.exp(rng.uniform(math.log(0.7), math.log(1.3)))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            box = (left, top, left + w, top + h)
            break
    return np.asarray(img.crop(box).resize((size, size), Image.BILINEAR), dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def side_config_for(backbone: BackboneConfig, opts: TrainOptions, num_classes: int) -> SideConfig:
    if opts.side_preset not in SIDE_PRESETS:
        raise ConfigError(f"--side-preset {opts.side_preset!r}: use one of {sorted(SIDE_PRESETS)}")
    changes = {k: int(v) for k, v in opts.side.items() if v is not None}
    unknown = sorted(set(changes) - set(SIDE_FIELDS))
    if unknown:
        raise ConfigError(f"unknown side network settings: {unknown}")
    # one side layer per backbone layer used (FPT+ fuses layer layers_used[i] into side layer i)
    changes.setdefault("num_layers", len(backbone.layers_used))
    config = SIDE_PRESETS[opts.side_preset].replace(num_classes=num_classes, **changes)
    check_compatible(backbone, config)
    return config


def _check_options(opts: TrainOptions) -> None:
    problems = []
    if opts.epochs < 1:
        problems.append("--epochs must be >= 1")
    if opts.batch_size < 1:
        problems.append("--batch-size must be >= 1")
    if not (opts.lr > 0 and math.isfinite(opts.lr)):
        problems.append("--lr must be > 0")
    if opts.weight_decay < 0:
        problems.append("--weight-decay must be >= 0")
    if not 0 <= opts.warmup_epochs < opts.epochs:
        problems.append("--warmup-epochs must be >= 0 and less than --epochs")
    if opts.select_metric not in SELECT_METRICS:
        problems.append(f"--select-metric {opts.select_metric!r}: use one of {', '.join(SELECT_METRICS)}")
    if opts.patience < 0:
        problems.append("--patience must be >= 0 (0: no early stopping)")
    if opts.augment not in ("side", "none"):
        problems.append(f"--augment {opts.augment!r}: use side or none")
    if opts.kv_cache_dtype not in ("float16", "float32"):
        problems.append(f"--kv-cache-dtype {opts.kv_cache_dtype!r}: use float16 or float32")
    if opts.preload_batch_size < 1:
        problems.append("--preload-batch-size must be >= 1")
    if opts.decoder not in ("auto", "fptserve", "pil"):
        problems.append(f"--decoder {opts.decoder!r}: use auto, fptserve or pil")
    if opts.publish_mode not in ("upload", "path"):
        problems.append(f"--publish-mode {opts.publish_mode!r}: use upload or path")
    if opts.resume and opts.work_dir is None:
        problems.append("--resume needs --work-dir (the folder of the interrupted run)")
    for name, values in (("--mean", opts.mean), ("--std", opts.std)):
        if values is not None and (len(values) != 3 or not all(math.isfinite(v) for v in values)):
            problems.append(f"{name} needs 3 finite values (r,g,b), got {values}")
    if opts.std is not None and any(v <= 0 for v in opts.std):
        problems.append(f"--std values must be > 0, got {opts.std}")
    if (opts.mean is None) != (opts.std is None):
        problems.append("--mean and --std go together (or neither: both computed from the training images)")
    if problems:
        raise TrainError("; ".join(problems))


def _missing_parents(folder: Path) -> list[Path]:
    """Ancestors of ``folder`` (itself included) that do not exist, outermost first."""
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    return list(reversed(missing))


def _pytorch_backbone(opts: TrainOptions, manifest: dict[str, Any], config: BackboneConfig):
    """The float32 PyTorch backbone for the exporter's end-to-end parity check, when it can be
    had: --hf-dir, or a random-init backbone rebuilt from its seed. None otherwise (parity then
    runs on the K/V of backbone.onnx)."""
    from .weights import load_hf_backbone, random_backbone

    if opts.hf_dir is not None:
        return load_hf_backbone(
            opts.hf_dir, image_size=config.image_size, layers_used=config.layers_used, token_ratio=config.token_ratio
        ).model
    seed = (manifest.get("provenance") or {}).get("seed")
    if seed is not None and str(manifest.get("source_weights", "")).startswith("random-init"):
        return random_backbone(config, int(seed))
    return None


class _Run:
    """State of one training run (so the stages stay small functions)."""

    def __init__(self, opts: TrainOptions, hook: Callable[[str, dict], None] | None):
        self.opts = opts
        self.hook = hook or (lambda stage, info: None)
        self.times: dict[str, float] = {}
        self.peaks = StagePeaks()
        self.log = sys.stderr

    def say(self, text: str) -> None:
        if self.opts.progress:
            print(text, file=self.log, flush=True)


def train(opts: TrainOptions, hook: Callable[[str, dict], None] | None = None) -> TrainResult:
    """Runs the whole pipeline; see the module docstring. ``hook(stage, info)`` is called at
    "epoch_end" and "exported" (before the version folder is moved into place); tests use it to
    interrupt a run."""
    run = _Run(opts, hook)
    t_start = time.monotonic()
    opts.backbone, opts.data, opts.out = Path(opts.backbone), Path(opts.data), Path(opts.out)
    _check_options(opts)
    check_name("task name", opts.task)
    check_name("version", str(opts.version))
    opts.version = str(opts.version)
    target = opts.out / "tasks" / opts.task / opts.version
    if target.exists():
        raise TrainError(f"{target} already exists: a version is never overwritten; pick another --version")
    bmanifest, bpath = read_backbone_dir(opts.backbone)
    bconfig = backbone_config_from_manifest(bmanifest)
    served = opts.out / "backbones" / bmanifest["name"] / "manifest.json"
    if served.is_file():
        try:
            served_sha = json.loads(served.read_text()).get("sha256")
        except ValueError:
            served_sha = None
        if served_sha != bmanifest["sha256"]:
            raise TrainError(
                f"{served} has sha256 {served_sha} but {opts.backbone} has {bmanifest['sha256']}: a daemon serving "
                f"{opts.out} would refuse this adapter (same backbone name, other weights)"
            )
    else:
        run.say(
            f"note: {opts.out} has no backbones/{bmanifest['name']}/: a daemon serving it needs that backbone "
            f"(copy {opts.backbone}) before it can load the new adapter"
        )
    policy = dicom_policy(**{k: opts.dicom.get(k) for k in ("voi", "window_center", "window_width", "voi_function")},
                          allow_request_override=bool(opts.dicom.get("allow_request_override")),
                          decode_resolution=opts.dicom.get("decode_resolution") or "full")
    binary = find_fptserve(opts.fptserve_bin)
    mode = opts.decoder if opts.decoder != "auto" else ("fptserve" if binary is not None else "pil")
    try:
        device = torch.device(opts.device)
    except RuntimeError as e:
        raise TrainError(f"--device {opts.device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {opts.device}: CUDA is not available to PyTorch here")
    if opts.threads is not None and opts.threads < 1:
        raise TrainError("--threads must be >= 1")
    threads_before = torch.get_num_threads()
    if opts.threads is not None:
        torch.set_num_threads(int(opts.threads))
    try:
        return _train(run, opts, target, bmanifest, bpath, bconfig, policy, binary, mode, device, t_start)
    finally:
        torch.set_num_threads(threads_before)


def _train(run: _Run, opts: TrainOptions, target: Path, bmanifest: dict[str, Any], bpath: Path, bconfig: BackboneConfig,
           policy: dict[str, Any], binary: Path | None, mode: str, device: torch.device, t_start: float) -> TrainResult:
    t0 = time.monotonic()
    dataset = scan_dataset(opts.data, opts.val_fraction, opts.seed)
    run.times["scan"] = time.monotonic() - t0
    side_config = side_config_for(bconfig, opts, len(dataset.classes))
    decoder = Decoder(mode, binary, policy, min_size=max(bconfig.image_size, side_config.image_size))
    if mode == "pil" and any(e.kind == "dicom" for e in dataset.entries):
        first = next(e for e in dataset.entries if e.kind == "dicom")
        raise DataError(
            f"{first.path}: DICOM files are decoded by the daemon's own decoder: pass --fptserve PATH or set "
            "FPTSERVE_BIN (not --decoder pil)"
        )
    counts = dataset.counts()
    run.say(
        f"data: {len(dataset.indices('train'))} training + {len(dataset.indices('val'))} validation images, "
        f"classes {dataset.classes} ({dataset.layout}), decoder: {decoder.describe()['name']}"
    )

    temp_work = opts.work_dir is None
    work = Path(tempfile.mkdtemp(prefix=f"fptserve-train-{opts.task}-{opts.version}-")) if temp_work else Path(opts.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    pixels: PixelCache | None = None
    kv: KVCache | None = None
    try:
        augment_size = None
        if opts.augment == "side":
            augment_size = int(opts.augment_source_size or 2 * side_config.image_size)
            if augment_size < side_config.image_size:
                raise TrainError(f"--augment-source-size {augment_size} is smaller than the side input {side_config.image_size}")
        workers = opts.workers or (os.cpu_count() or 1)
        t0 = time.monotonic()
        pixels = build_pixel_cache(
            work / "cache", dataset, decoder, bconfig.image_size, side_config.image_size, augment_size, workers,
            opts.progress,
        )
        run.times["decode"] = time.monotonic() - t0
        if opts.mean is None:
            mean, std = pixels.mean_std()
            mean, std = [round(m, 6) for m in mean], [round(s, 6) for s in std]
            if any(s <= 0 for s in std):
                raise TrainError(f"the training images have a constant channel (std {std}): pass --mean and --std")
            norm_source = "computed from the training images at the backbone input size (population mean/std, rounded to 6 decimals)"
        else:
            mean, std = [float(m) for m in opts.mean], [float(s) for s in opts.std]
            norm_source = "given"
        t0 = time.monotonic()
        kv = build_kv_cache(
            work / "cache", pixels, bmanifest, bpath, mean, std, opts.kv_cache_dtype, opts.preload_batch_size,
            opts.device, opts.progress,
        )
        run.times["preload"] = time.monotonic() - t0
        run.peaks.end("preload")

        t0 = time.monotonic()
        model, history, best_epoch, stopped_early = _fit(run, dataset, pixels, kv, bconfig, side_config, mean, std,
                                                         device, work, bmanifest)
        run.times["train"] = time.monotonic() - t0
        run.peaks.end("training")
        if device.type == "cuda":
            cuda_peak = int(torch.cuda.max_memory_allocated(device))
        else:
            cuda_peak = None

        info = {
            "dataset": dataset, "counts": counts, "mean": mean, "std": std, "norm_source": norm_source,
            "history": history, "best_epoch": best_epoch, "stopped_early": stopped_early, "decoder": decoder,
            "kv": kv, "pixels": pixels, "policy": policy, "side_config": side_config,
            "cuda_max_allocated_bytes": cuda_peak,
        }
        folder, manifest = _export(run, model, bmanifest, bconfig, info, target, t_start)
        published = None
        result_summary = _summary(run, manifest, folder, info)
        if opts.progress:
            print(result_summary, flush=True)
        if opts.publish:
            from .publish import AdminTarget, publish_adapter

            admin = AdminTarget(opts.publish, opts.admin_token_file, opts.tls_ca, opts.tls_cert, opts.tls_key,
                                opts.tls_server_name)
            published = publish_adapter(admin, folder, opts.task, opts.version, opts.publish_mode, opts.make_default)
            run.say(
                f"published {opts.task}@{opts.version} to {opts.publish}: {published['state']}"
                + (", default version" if published["is_default"] else "")
            )
        return TrainResult(
            folder=folder, manifest=manifest, model=model, dataset=dataset, classes=dataset.classes, mean=mean,
            std=std, history=history, best_epoch=best_epoch, summary=result_summary,
            work_dir=None if temp_work else work,
            kv_cache=None if temp_work else kv.folder,
            pixel_cache=None if temp_work else pixels.folder,
            published=published,
        )
    finally:
        for cache in (kv, pixels):
            if cache is not None:
                cache.close()
        if temp_work:
            shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# fitting
# --------------------------------------------------------------------------------------------


def _fingerprint(opts: TrainOptions, dataset: Dataset, kv: KVCache, side: SideConfig, bmanifest: dict[str, Any]) -> dict:
    return _clean({
        "data": dataset.digest,
        "backbone_sha256": bmanifest["sha256"],
        "kv_cache": kv.folder.name,
        "side": side.to_dict(),
        "classes": dataset.classes,
        **{k: getattr(opts, k) for k in (
            "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "grad_clip", "seed", "select_metric",
            "patience", "augment", "augment_source_size",
        )},
    })


def _batch_side(pixels: PixelCache, indices, augment: bool, size: int, rng, mean, std) -> torch.Tensor:
    if augment:
        sources = pixels.augment.read(indices)
        u8 = np.stack([augment_side(s, size, rng) for s in sources])
    else:
        u8 = pixels.side.read(indices)
    return torch.from_numpy(normalize(u8, mean, std))


def _batch_kv(kv: KVCache, indices) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = kv.read(indices)
    return torch.from_numpy(k.astype(np.float32, copy=False)), torch.from_numpy(v.astype(np.float32, copy=False))


def predict(model: SideNetwork, pixels: PixelCache, kv: KVCache, indices, mean, std, batch_size: int,
            device: torch.device) -> np.ndarray:
    """Logits of the (eval-mode) model for the given entries, on served pixels and cached K/V."""
    model.eval()
    out = []
    with torch.no_grad():
        for lo in range(0, len(indices), batch_size):
            idx = indices[lo:lo + batch_size]
            k, v = _batch_kv(kv, idx)
            x = torch.from_numpy(normalize(pixels.side.read(idx), mean, std))
            out.append(model(x.to(device), k.to(device), v.to(device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.num_classes), np.float32)


def _better(metric: float, loss: float, best: tuple[float, float] | None) -> bool:
    if best is None:
        return True
    m = metric if math.isfinite(metric) else -math.inf
    b = best[0] if math.isfinite(best[0]) else -math.inf
    return m > b or (m == b and loss < best[1])


def _fit(run: _Run, dataset: Dataset, pixels: PixelCache, kv: KVCache, bconfig: BackboneConfig, side: SideConfig,
         mean, std, device: torch.device, work: Path, bmanifest: dict[str, Any]):
    opts = run.opts
    train_idx = dataset.indices("train")
    val_idx = dataset.indices("val")
    labels = np.array([e.label for e in dataset.entries], dtype=np.int64)
    model = SideNetwork(bconfig, side)
    training_init(model, opts.seed)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, betas=(0.9, 0.999), weight_decay=opts.weight_decay)
    bs = opts.batch_size
    steps = len(train_idx) // bs if len(train_idx) >= bs else 1  # the last partial batch is dropped
    fingerprint = _fingerprint(opts, dataset, kv, side, bmanifest)
    ckpt_path = work / "checkpoint.pt"
    history: list[dict[str, Any]] = []
    best: tuple[float, float] | None = None
    best_state = None
    best_epoch = 0
    bad_epochs = 0
    stopped_early = False
    start_epoch = 0
    if opts.resume:
        if not ckpt_path.is_file():
            raise TrainError(f"--resume: {ckpt_path} does not exist (no interrupted run in {work})")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ckpt["fingerprint"] != fingerprint:
            diffs = sorted(k for k in set(fingerprint) | set(ckpt["fingerprint"])
                           if fingerprint.get(k) != ckpt["fingerprint"].get(k))
            raise TrainError(f"--resume: {ckpt_path} is from a run with other settings or data ({', '.join(diffs)})")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        history = list(ckpt["history"])
        best = tuple(ckpt["best"]) if ckpt["best"] is not None else None
        best_state = ckpt["best_state"]
        best_epoch = int(ckpt["best_epoch"])
        bad_epochs = int(ckpt["bad_epochs"])
        stopped_early = bool(ckpt["stopped_early"])
        start_epoch = int(ckpt["epochs_done"])
        run.say(f"resuming after epoch {start_epoch} from {ckpt_path}")
    n_params = sum(p.numel() for p in model.parameters())
    run.say(f"side network + fusion: {n_params:,} trainable parameters; {steps} steps per epoch")

    epoch = start_epoch
    while epoch < opts.epochs and not stopped_early:
        t0 = time.monotonic()
        rng = np.random.default_rng([opts.seed, 1, epoch])
        torch.manual_seed(opts.seed * 1_000_003 + epoch)  # dropout masks
        order = rng.permutation(np.asarray(train_idx))
        model.train()
        losses, correct, seen = 0.0, 0, 0
        step_times = []
        with Progress(steps, f"epoch {epoch + 1}/{opts.epochs}", enabled=opts.progress) as bar:
            for step in range(steps):
                t_step = time.monotonic()
                idx = order[step * bs:(step + 1) * bs].tolist()
                lr = lr_at(opts, epoch + step / steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x = _batch_side(pixels, idx, opts.augment == "side", side.image_size, rng, mean, std).to(device)
                k, v = _batch_kv(kv, idx)
                y = torch.from_numpy(labels[idx]).to(device)
                logits = model(x, k.to(device), v.to(device))
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if opts.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
                optimizer.step()
                losses += float(loss.detach()) * len(idx)
                correct += int((logits.detach().argmax(1) == y).sum())
                seen += len(idx)
                step_times.append(time.monotonic() - t_step)
                bar.update(1, postfix=f"loss {losses / seen:.4f} lr {lr:.2e}")
        train_seconds = time.monotonic() - t0
        logits = predict(model, pixels, kv, val_idx, mean, std, max(bs, 1), device)
        val = evaluate(labels[val_idx], logits)
        epoch += 1
        record = {
            "epoch": epoch, "lr": lr_at(opts, epoch - 1), "train_loss": losses / max(seen, 1),
            "train_accuracy": correct / max(seen, 1), "val_loss": val["loss"], "val_accuracy": val["accuracy"],
            "val_auc": val["auc"], "val_kappa": val["kappa"], "seconds": time.monotonic() - t0,
            "train_seconds": train_seconds, "steps": steps, "step_seconds_median": float(np.median(step_times)),
        }
        metric = val[opts.select_metric]
        if _better(metric, val["loss"], best):
            best = (metric, val["loss"])
            best_state = {k: t.detach().cpu().clone() for k, t in model.state_dict().items()}
            best_epoch = epoch
            bad_epochs = 0
        else:
            bad_epochs += 1
            if opts.patience and bad_epochs >= opts.patience:
                stopped_early = True
        history.append(_clean(record))
        run.say(
            f"epoch {epoch}: train loss {record['train_loss']:.4f}, val loss {val['loss']:.4f}, "
            f"accuracy {_fmt(val['accuracy'], '.4f')}, AUC {_fmt(val['auc'], '.4f')}, kappa {_fmt(val['kappa'], '.4f')}"
            + ("  (best)" if best_epoch == epoch else "")
            + (f"  (early stop: no better {opts.select_metric} in {bad_epochs} epochs)" if stopped_early else "")
        )
        state = {
            "fingerprint": fingerprint, "epochs_done": epoch, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "history": history, "best": list(best) if best else None,
            "best_state": best_state, "best_epoch": best_epoch, "bad_epochs": bad_epochs, "stopped_early": stopped_early,
        }
        tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, ckpt_path)
        run.hook("epoch_end", {"epoch": epoch})

    run.parameters = n_params
    model = SideNetwork(bconfig, side)
    model.load_state_dict(best_state)
    return model.eval(), history, best_epoch, stopped_early


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------


def served_check(folder: Path, manifest: dict[str, Any], model: SideNetwork, pixels: PixelCache, kv: KVCache,
                 indices, labels, mean, std, batch_size: int) -> dict[str, Any]:
    """side.onnx (ONNX Runtime) against the trained PyTorch model on every validation image:
    served side pixels and the cached K/V (as the graph's K/V dtype) into both."""
    session = ort_session(folder / manifest["file"])
    kv_dtype = np.float16 if manifest["inputs"][1]["dtype"] == "float16" else np.float32
    max_diff, same, onnx_pred = 0.0, 0, []
    with torch.no_grad():
        for lo in range(0, len(indices), batch_size):
            idx = indices[lo:lo + batch_size]
            k, v = kv.read(idx)
            k, v = k.astype(kv_dtype), v.astype(kv_dtype)
            x = normalize(pixels.side.read(idx), mean, std)
            (out,) = session.run(["logits"], {"side_pixel_values": x, "key_states": k, "value_states": v})
            ref = model(torch.from_numpy(x), torch.from_numpy(k).float(), torch.from_numpy(v).float()).numpy()
            max_diff = max(max_diff, float(np.abs(out - ref).max()))
            same += int((out.argmax(1) == ref.argmax(1)).sum())
            onnx_pred.append(out.argmax(1))
    pred = np.concatenate(onnx_pred) if onnx_pred else np.zeros(0, np.int64)
    result = {
        "images": len(indices),
        "max_abs_diff": max_diff,
        "same_labels": same,
        "onnx_accuracy": float((pred == np.asarray(labels)).mean()) if len(indices) else None,
        "method": "logits of side.onnx (ONNX Runtime CPU) vs the trained PyTorch model on every validation image "
                  "(served side pixels, cached K/V)",
    }
    from .export import FP32_TOLERANCE

    if max_diff > FP32_TOLERANCE:
        raise ExportError(f"side.onnx differs from the trained model on the validation images by {max_diff:.3g} > {FP32_TOLERANCE}")
    return result


def _export(run: _Run, model: SideNetwork, bmanifest: dict[str, Any], bconfig: BackboneConfig, info: dict[str, Any],
            target: Path, t_start: float) -> tuple[Path, dict[str, Any]]:
    opts = run.opts
    dataset: Dataset = info["dataset"]
    pixels: PixelCache = info["pixels"]
    kv: KVCache = info["kv"]
    mean, std = info["mean"], info["std"]
    val_idx = dataset.indices("val")
    labels = [dataset.entries[i].label for i in val_idx]
    sample = val_idx[:4]
    parity_images = (
        torch.from_numpy(normalize(pixels.backbone.read(sample), mean, std)),
        torch.from_numpy(normalize(pixels.side.read(sample), mean, std)),
    )
    backbone = _pytorch_backbone(opts, bmanifest, bconfig)
    parent = target.parent
    created = _missing_parents(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{opts.version}.tmp-", dir=parent))
    try:
        t0 = time.monotonic()
        manifest = export_adapter(
            opts.out, bmanifest["name"], opts.task, opts.version, dataset.classes, model, backbone, mean, std,
            "trained by fptserve-models train", None, seed=opts.seed, opset=opts.opset,
            backbone_dir=opts.backbone, folder=tmp, dicom=info["policy"], parity_images=parity_images,
            provenance={"training_data_sha256": dataset.digest, "backbone_sha256": bmanifest["sha256"]},
            explain=opts.explain,
        )
        check = served_check(tmp, manifest, model, pixels, kv, val_idx, labels, mean, std, max(opts.batch_size, 1))
        run.times["export"] = time.monotonic() - t0
        run.times["total"] = time.monotonic() - t_start
        run.peaks.end("export")
        manifest["training"] = _training_record(run, bmanifest, info, check, run.times)
        write_json(tmp / "manifest.json", manifest)
        run.hook("exported", {"folder": tmp})
        if target.exists():
            raise TrainError(f"{target} appeared while training: a version is never overwritten; pick another --version")
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in reversed(created):
            try:
                p.rmdir()
            except OSError:
                break
        raise
    return target, manifest


def _training_record(run: _Run, bmanifest: dict[str, Any], info: dict[str, Any], check: dict[str, Any],
                     times: dict[str, float]) -> dict[str, Any]:
    opts = run.opts
    dataset: Dataset = info["dataset"]
    kv: KVCache = info["kv"]
    pixels: PixelCache = info["pixels"]
    history = info["history"]
    best = next(h for h in history if h["epoch"] == info["best_epoch"])
    n = len(dataset.entries)
    pixel_bytes = sum(r.record_bytes for r in (pixels.side, pixels.augment, pixels.backbone) if r is not None)
    augment = (
        {"where": "side input only (K/V are preloaded from the un-augmented image)", "horizontal_flip": 0.5,
         "brightness": 0.2, "contrast": 0.2, "random_resized_crop": {"scale": [0.8, 1.0], "ratio": [0.7, 1.3]},
         "source_size": pixels.meta["augment_shape"][0]}
        if opts.augment == "side" else None
    )
    return _clean({
        "tool": f"fptserve-models {__version__} train",
        "data": {
            "sha256": dataset.digest,
            "method": "sha256 over (split, class, path, file sha256) of every image, with the layout and classes",
            "layout": dataset.layout,
            "val_fraction": dataset.val_fraction,
            "split_seed": dataset.seed if dataset.layout == "class-folders" else None,
            "images": info["counts"],
            "formats": dataset.kinds(),
            "decoder": info["decoder"].describe(),
            "dicom": info["policy"],
        },
        "normalization": {"mean": info["mean"], "std": info["std"], "source": info["norm_source"]},
        "preload": {
            "backbone": {"name": bmanifest["name"], "sha256": bmanifest["sha256"], "file": bmanifest["file"]},
            "runtime": f"onnxruntime ({kv.meta.get('provider', 'cpu')})",
            "kv_cache_dtype": kv.dtype,
            "batch_size": opts.preload_batch_size,
            "images": n,
            "seconds": kv.meta.get("seconds"),
            "seconds_per_image": (kv.meta.get("seconds") or 0.0) / max(n, 1),
            "kv_bytes_per_image": kv.bytes_per_image,
            "pixel_bytes_per_image": pixel_bytes,
        },
        "recipe": {
            "optimizer": "AdamW", "lr": opts.lr, "betas": [0.9, 0.999], "weight_decay": opts.weight_decay,
            "schedule": "half-cycle cosine per step after linear warm-up", "warmup_epochs": opts.warmup_epochs,
            "epochs": opts.epochs, "batch_size": opts.batch_size, "drop_last": True, "grad_clip_norm": opts.grad_clip,
            "loss": "cross_entropy", "fusion_dropout": 0.5,
            "init": "side ViT: HF ViT init (trunc normal 0.02); fusion: PyTorch defaults, prompts N(0, 1e-6)",
            "augment": augment, "select_metric": opts.select_metric, "patience": opts.patience,
            "device": opts.device, "precision": "float32",
        },
        "seed": opts.seed,
        "parameters": getattr(run, "parameters", None),
        "epochs_run": len(history),
        "best_epoch": info["best_epoch"],
        "stopped_early": info["stopped_early"],
        "best": {k: best[k] for k in ("val_loss", "val_accuracy", "val_auc", "val_kappa")},
        "history": history,
        "seconds": times,
        "memory": {
            **run.peaks.record(),
            "cuda_max_allocated_bytes": info["cuda_max_allocated_bytes"],
            "method": "peak resident set size (RSS) of the training process per stage (/proc/self/status VmHWM, reset "
                      "at the end of each stage): preload = start, imports, decoding and preloading (the backbone run); "
                      "training = the training loop (the process as it stands plus what training adds); export = "
                      "export and parity checks; null where the kernel does not allow the reset. peak_rss_bytes is "
                      "the largest",
        },
        "served_check": check,
    })


def _summary(run: _Run, manifest: dict[str, Any], folder: Path, info: dict[str, Any]) -> str:
    t = manifest["training"]
    rows = []
    for h in t["history"]:
        mark = "*" if h["epoch"] == t["best_epoch"] else ""
        rows.append([
            f"{mark}{h['epoch']}", f"{h['lr']:.2e}", _fmt(h["train_loss"], ".4f"), _fmt(h["train_accuracy"], ".3f"),
            _fmt(h["val_loss"], ".4f"), _fmt(h["val_accuracy"], ".3f"), _fmt(h["val_auc"], ".4f"),
            _fmt(h["val_kappa"], ".4f"), f"{h['seconds']:.1f}",
        ])
    lines = [table(["epoch", "lr", "train loss", "train acc", "val loss", "val acc", "val AUC", "val kappa", "s"], rows)]
    data = t["data"]
    counts = ", ".join(
        f"{c} {data['images']['train'][c]}/{data['images']['val'][c]}" for c in manifest["classes"]
    )
    pre = t["preload"]
    mem = t["memory"]
    par = manifest["parity"]
    chk = t["served_check"]
    best = t["best"]
    lines += [
        "",
        f"best epoch {t['best_epoch']} of {t['epochs_run']} by {t['recipe']['select_metric']}"
        + (" (early stop)" if t["stopped_early"] else "")
        + f": val accuracy {_fmt(best['val_accuracy'], '.4f')}, AUC {_fmt(best['val_auc'], '.4f')}, "
          f"kappa {_fmt(best['val_kappa'], '.4f')}, loss {_fmt(best['val_loss'], '.4f')}",
        f"data      {data['sha256'][:16]}  train/val per class: {counts}",
        f"preload   {pre['images']} images in {pre['seconds']:.1f} s ({pre['seconds_per_image']:.3f} s/image), "
        f"K/V {pre['kv_cache_dtype']} {pre['kv_bytes_per_image'] / 1e6:.3f} MB/image, backbone {pre['backbone']['sha256'][:16]}",
        f"memory    peak RSS {_mb(mem['peak_rss_bytes'])}: preload {_mb(mem.get('preload_peak_rss_bytes'))}, "
        f"training {_mb(mem.get('training_peak_rss_bytes'))}, export {_mb(mem.get('export_peak_rss_bytes'))}",
        f"time      " + ", ".join(f"{k} {v:.1f} s" for k, v in t["seconds"].items()),
        f"parity    side.onnx vs PyTorch: seeded {par['max_abs_diff']:.2g}, end-to-end {par['end_to_end']['max_abs_diff']:.2g}, "
        f"validation set {chk['max_abs_diff']:.2g} ({chk['same_labels']}/{chk['images']} same labels)",
        f"wrote     {folder} (side.onnx sha256 {manifest['sha256'][:16]})",
    ]
    return "\n".join(lines)
