"""INT8 (CPU) or float16 (GPU) variant of an exported float32 backbone, with a fidelity report
computed at export (issues 18 and 20).

    python -m fptserve_models.quantize --out REPO --backbone vit-b16-512 [--name vit-b16-512-int8]
        [--method smoothquant-static] [--calibration DIR] [--evaluation DIR] [--adapters-repo DIR]
    python -m fptserve_models.quantize --out REPO --backbone vit-b16-512 --precision float16

``--precision float16`` converts the whole graph to float16 (ONNX Runtime's converter; TopK stays
float32) with Casts at both ends, so it keeps the float32 interface below and the float32
backbone's adapters run on it unchanged; the daemon prefers it on a GPU (``--backbone-precision``).
It needs no calibration: the images only feed the fidelity report. The rest of this docstring is
about INT8.

writes ``REPO/backbones/<name>/{backbone.onnx, manifest.json}``: the same interface as the fp32
backbone (float32 pixels in, float32 K/V out, same shapes, and its ``token_indices`` output for
saliency maps where it has one), its Linear layers computed in INT8 by
ONNX Runtime, and a manifest that adds ``precision``, ``quantized_from`` (the fp32 backbone's name
and SHA-256: the adapters trained on it are the ones the daemon may serve on this variant, when the
operator allows it), ``quantization`` (what was done, what stayed float and why, the calibration
images' digest) and ``fidelity`` (this file against the fp32 one on the calibration images and on
separate evaluation images: K/V deviation, selected token sets, every adapter's probabilities and
labels, and batch consistency).

Methods (``--method``):

* ``smoothquant-static`` (shipped): SmoothQuant-style migration (Xiao et al. 2023), then static
  QDQ. For every LayerNorm whose output feeds only weight MatMuls (the Q/K/V and MLP up-projection
  inputs), its gain and bias are divided by per-channel factors s and the matching rows of those
  MatMuls' weights multiplied by s, s_j = max|x_j|^alpha / max_k|W_jk|^(1 - alpha) (alpha 0.5, x
  from the calibration images), rounded to a power of two so that the migration is exact in float32
  (the smoothed float model gives bit-identical outputs; tested). Then every weight MatMul gets
  int8 weights per output channel and uint8 activations with one range per tensor, fixed from the
  calibration images (min/max, under every covered adapter's normalisation). Fixed ranges make the
  result batch-invariant: an image's K/V do not depend on the other images of its batch, which the
  daemon's cross-request batching and its K/V cache (keyed by image content) need.
* ``static``: the same without the migration (naive).
* ``dynamic``: ONNX Runtime ``quantize_dynamic`` (naive): ranges computed at run time over the
  whole input tensor, i.e. over the whole batch, so K/V change with the batch (measured: up to 4.5
  on the tiny demo backbone, batch of 8 vs alone).
* ``smoothquant-dynamic``: migration, then dynamic.
* ``dynamic-ln-fp32``: dynamic, but the MatMuls fed by a LayerNorm (Q/K/V, MLP up-projection;
  about 60% of the Linear work) stay float32.

Why: trained ViTs have a few LayerNorm output channels 20-50x larger than the rest (large gains and
biases). One range per tensor sized for them leaves the other channels a handful of levels: on a
tiny backbone with such channels the naive methods' K/V relative error is 0.20-0.39 and labels
change 3-4x as often as with the migration (0.025, within 1.3x of the float LayerNorm-fed variant);
see models/tests/test_quantize.py and benches/int8_backbone.py (full size). Static and dynamic run
at the same speed (ViT-B/16 at 512: ~2.2x the fp32 backbone on a 2-core Xeon with AMX).

Weights use the 7-bit range [-64, 64] (``REDUCE_RANGE``): ONNX Runtime's u8 x s8 kernels on x86 CPUs
without VNNI add pairs of products in int16 with saturation; 2 * 255 * 64 < 32767 never saturates.
(8-bit weights: K/V relative error 0.018 instead of 0.025 on the tiny outlier backbone.)

Always float32: the attention itself (Q K^T, Softmax, P V: no weights, and the used layers'
probabilities are averaged and ranked to select tokens), ReduceMean / TopK / GatherElements (token
selection), LayerNorm, GELU, residual adds and the patch-embedding Conv (raw pixels, <2% of the
time). The attention is now most of the INT8 backbone's time.

Serving notes: ONNX Runtime turns the QDQ pairs into integer MatMuls (MatMulIntegerToFloat) only
at graph optimization level EXTENDED or ALL; at BASIC the graph runs dequantized in float32 (same
values up to rounding) about 3x slower than the fp32 backbone. Requantizing activations makes the
INT8 outputs sensitive to float rounding at the level of one quantization step: the same ONNX
Runtime kernels give the same K/V bit for bit, but another CPU's (or the unfused graph's) float
rounding gives a different, statistically equivalent K/V (measured at full size: 2% relative
between the fused and unfused graph, against 3-4% from fp32). The fidelity report is therefore a
statistical property of the variant, not a per-image one.

``fuse_attention`` (off; measured no faster) replaces the attention of the layers before the first
used one by ONNX Runtime's fused float32 ``com.microsoft.MultiHeadAttention``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .digest import sha256_file

# torch-heavy modules (export, weights) are imported where used, so that importing this module
# (for register(), e.g. from cli.py) stays cheap and `--help` instant.


def _export():
    from . import export

    return export


def ort_session(model):
    return _export().ort_session(model)



# precision -> default folder suffix
PRECISIONS = {"int8": "int8", "float16": "fp16"}
METHODS = ("dynamic", "static", "smoothquant-dynamic", "smoothquant-static", "dynamic-ln-fp32")
DEFAULT_METHOD = "smoothquant-static"
DEFAULT_ALPHA = 0.5
# Weights use the 7-bit range [-64, 64] ("reduce_range"): on x86 CPUs without VNNI, ONNX Runtime's
# u8 x s8 kernels add pairs of products in int16 with saturation; 2 * 255 * 64 < 32767 never
# saturates, so every x86-64 CPU computes the same integer products (AVX2, VNNI or AMX).
REDUCE_RANGE = True
DEFAULT_CALIBRATION_IMAGES = 32
DEFAULT_EVALUATION_IMAGES = 16
DEFAULT_NORMALIZATION = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MS_DOMAIN = "com.microsoft"


class QuantizeError(ValueError):
    """A quantization that cannot be made (bad input, unsupported graph). The command reports it
    like the exporter's errors (cmd_quantize_backbone raises it as an ExportError)."""


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# images: folders of PNG/JPEG files, or seeded structured synthetic images
# --------------------------------------------------------------------------------------------


@dataclass
class ImageSet:
    """Decoded RGB images (PIL) of one split, with where they came from."""

    name: str  # "calibration" | "evaluation"
    images: list
    source: str
    synthetic: bool
    files_sha256: str | None = None
    names: list = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        d = {"images": len(self.images), "source": self.source, "synthetic": self.synthetic}
        if self.files_sha256 is not None:
            d["files_sha256"] = self.files_sha256
        return d


def image_files(folder: str | Path) -> list[Path]:
    """PNG/JPEG files under ``folder`` (recursively, sorted by relative path; dot-names skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QuantizeError(f"image folder {folder} does not exist")
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or path.is_dir():
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise QuantizeError(f"{path}: not a PNG or JPEG file (calibration/evaluation folders hold images only)")
        files.append(path)
    if not files:
        raise QuantizeError(f"image folder {folder} holds no PNG or JPEG file")
    return files


def load_image_folder(name: str, folder: str | Path) -> ImageSet:
    from .preprocess import load_rgb

    folder = Path(folder)
    files = image_files(folder)
    digest = hashlib.sha256()
    images = []
    for path in files:
        rel = path.relative_to(folder).as_posix()
        digest.update(f"{rel}\t{sha256_file(path)}\n".encode())
        try:
            images.append(load_rgb(path))
        except Exception as e:  # PIL raises many kinds
            raise QuantizeError(f"{path}: cannot be decoded as an image: {e}") from None
    return ImageSet(name, images, f"files: {folder} ({len(files)} PNG/JPEG)", False, digest.hexdigest(),
                    [p.relative_to(folder).as_posix() for p in files])


def synthetic_image(rng: np.random.Generator, size: int):
    """One structured synthetic image: a smooth two-colour gradient, a few blurred shapes (discs,
    rings, bars, lines) in varied colours or grey, and sensor-like noise. Noise alone is a weak
    calibration set (no large smooth regions, no edges); this gives the backbone the kind of
    statistics photographs and medical images have."""
    from PIL import Image, ImageDraw, ImageFilter

    w = int(size * rng.uniform(1.0, 1.5))
    h = int(w * rng.uniform(0.8, 1.25))
    grey = rng.random() < 0.35  # X-ray / mammography-like
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    if grey:
        c0[:], c1[:] = c0[0], c1[0]
    base = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):
        col = tuple(int(v) for v in rng.uniform(0, 255, 3))
        if grey:
            col = (col[0],) * 3
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.05, 0.4) * min(w, h)
        kind = int(rng.integers(0, 4))
        box = [cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r * rng.uniform(0.5, 1.5)]
        box = [min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])]
        if kind == 0:
            draw.ellipse(box, fill=col)
        elif kind == 1:
            draw.ellipse(box, outline=col, width=max(1, int(r * 0.15)))
        elif kind == 2:
            draw.rectangle(box, fill=col)
        else:
            pts = [(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(int(rng.integers(2, 5)))]
            draw.line(pts, fill=col, width=max(1, int(rng.uniform(0.005, 0.03) * min(w, h))))
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 3.0)) * min(w, h) / 256))
    arr = np.asarray(img, dtype=np.float64)
    sigma = rng.uniform(2.0, 12.0)
    noise = rng.standard_normal((h, w, 1 if grey else 3)) * sigma
    arr = (arr + noise).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def synthetic_images(name: str, count: int, seed: int, size: int) -> ImageSet:
    rng = np.random.default_rng([int(seed), 0x18])
    images = [synthetic_image(rng, size) for _ in range(int(count))]
    source = (
        f"synthetic(seed={int(seed)}): {int(count)} seeded structured images (smooth gradients, blurred discs, "
        "rings, bars and lines, grey or colour, Gaussian noise), ~1-1.5x the backbone size, preprocessed like files"
    )
    return ImageSet(name, images, source, True, None, [f"synthetic-{i}" for i in range(int(count))])


def preprocess_set(images: Sequence, size: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[N, 3, H, W] float32 exactly as the daemon preprocesses (preprocess.to_tensor)."""
    from .preprocess import to_tensor

    return np.stack([to_tensor(img, size, mean, std) for img in images]).astype(np.float32)


def tensors_sha256(array: np.ndarray) -> str:
    a = np.ascontiguousarray(array, dtype=np.float32)
    h = hashlib.sha256(f"float32{list(a.shape)}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# graph analysis
# --------------------------------------------------------------------------------------------


def _load(model):
    import onnx

    if isinstance(model, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model))
    if isinstance(model, (str, Path)):
        return onnx.load(str(model))
    return model


def _consumers(graph) -> dict[str, list]:
    cons: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            if i:
                cons.setdefault(i, []).append(n)
    return cons


def _producers(graph) -> dict[str, Any]:
    return {o: n for n in graph.node for o in n.output}


def _initializers(graph) -> dict[str, Any]:
    return {i.name: i for i in graph.initializer}


def weight_matmuls(graph) -> list:
    """MatMul nodes whose second input is a 2-D float initializer (the Linear layers)."""
    import onnx

    inits = _initializers(graph)
    out = []
    for n in graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits:
            t = inits[n.input[1]]
            if len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT:
                out.append(n)
    return out


def selection_nodes(graph) -> list[tuple[Any, Any, Any]]:
    """(Softmax, ReduceMean, TopK) of every used layer, in graph order: the importance path (a
    float16 graph may put Casts between them: TopK stays float32 there)."""
    cons = _consumers(graph)

    def following(name: str) -> list:
        out = []
        for n in cons.get(name, []):
            out.extend(following(n.output[0]) if n.op_type == "Cast" else [n])
        return out

    found = []
    for n in graph.node:
        if n.op_type != "Softmax":
            continue
        for r in following(n.output[0]):
            if r.op_type == "ReduceMean":
                for t in following(r.output[0]):
                    if t.op_type == "TopK":
                        found.append((n, r, t))
    return found


def layernorm_groups(graph) -> list[tuple[Any, list]]:
    """(LayerNormalization, [weight MatMuls]) where the LayerNorm's output goes only to weight
    MatMuls as their activation input (Shape nodes aside): there a per-channel scale can move
    exactly from the LayerNorm's gain/bias into the MatMul weight rows."""
    cons = _consumers(graph)
    inits = _initializers(graph)
    wm = {id(n) for n in weight_matmuls(graph)}
    groups = []
    for n in graph.node:
        if n.op_type != "LayerNormalization" or len(n.input) < 3 or n.input[1] not in inits or n.input[2] not in inits:
            continue
        users = [u for u in cons.get(n.output[0], []) if u.op_type != "Shape"]
        if users and all(id(u) in wm and u.input[0] == n.output[0] for u in users):
            groups.append((n, users))
    return groups


# --------------------------------------------------------------------------------------------
# activation statistics (calibration)
# --------------------------------------------------------------------------------------------


def activation_ranges(model, tensor_names: Sequence[str], pixels: np.ndarray, batch: int = 1) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel (last axis) min and max of the named float tensors over every token of every
    image, from ONNX Runtime running the float model with those tensors added as outputs."""
    import onnx

    m = _load(model)
    m = onnx.ModelProto.FromString(m.SerializeToString())
    present = {o.name for o in m.graph.output}
    for name in tensor_names:
        if name not in present:
            m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort_session(m.SerializeToString())
    lo: dict[str, np.ndarray] = {}
    hi: dict[str, np.ndarray] = {}
    names = list(tensor_names)
    for start in range(0, len(pixels), batch):
        outs = sess.run(names, {"pixel_values": pixels[start:start + batch]})
        for name, value in zip(names, outs):
            v = value.reshape(-1, value.shape[-1])
            mn, mx = v.min(axis=0), v.max(axis=0)
            lo[name] = mn if name not in lo else np.minimum(lo[name], mn)
            hi[name] = mx if name not in hi else np.maximum(hi[name], mx)
    return {n: (lo[n].astype(np.float64), hi[n].astype(np.float64)) for n in names}


# --------------------------------------------------------------------------------------------
# SmoothQuant-style migration (exact: power-of-two factors)
# --------------------------------------------------------------------------------------------


def smooth_layernorms(model, ranges: dict[str, tuple[np.ndarray, np.ndarray]], alpha: float = DEFAULT_ALPHA):
    """Move per-channel scale from each LayerNorm (gain, bias) into the weight rows of the MatMuls
    it feeds: gain/s, bias/s, W[j, :]*s. ``s`` is a power of two per channel, so every product is
    scaled exactly and the float model's outputs do not change at all. Returns (model, summary,
    factors): ``model`` is a modified copy, ``factors`` maps each changed LayerNorm output to its s.
    ``ranges`` must hold the LayerNorm outputs' per-channel min/max."""
    import onnx
    from onnx import numpy_helper

    m = _load(model)
    m = onnx.ModelProto.FromString(m.SerializeToString())
    g = m.graph
    inits = _initializers(g)
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    layers, before, after, factors = 0, [], [], {}
    for ln, users in layernorm_groups(g):
        lo, hi = ranges[ln.output[0]]
        act = np.maximum(np.abs(lo), np.abs(hi))  # per-channel max |x|
        weights = [numpy_helper.to_array(inits[u.input[1]]).astype(np.float64) for u in users]
        wmax = np.max(np.stack([np.abs(w).max(axis=1) for w in weights]), axis=0)  # per input row
        ok = (act > 0) & (wmax > 0)
        raw = np.ones_like(act)
        raw[ok] = act[ok] ** alpha / wmax[ok] ** (1.0 - alpha)
        # relative to the median channel: only the ratio between channels matters for quantization
        raw[ok] /= np.median(raw[ok])
        s = np.where(ok, np.exp2(np.round(np.log2(np.clip(raw, 2.0**-20, 2.0**20)))), 1.0)
        before.append(float(act.max() / np.median(act[ok])) if ok.any() else 1.0)
        after.append(float((act / s).max() / np.median((act / s)[ok])) if ok.any() else 1.0)
        if np.all(s == 1.0):
            continue
        for idx in (1, 2):
            name = ln.input[idx]
            if uses.get(name, 0) != 1:
                raise QuantizeError(f"LayerNorm {ln.name}: parameter {name} is shared; cannot smooth it")
            arr = numpy_helper.to_array(inits[name]).astype(np.float32)
            inits[name].CopyFrom(numpy_helper.from_array((arr / s.astype(np.float32)).astype(np.float32), name))
        for u, w in zip(users, weights):
            name = u.input[1]
            if uses.get(name, 0) != 1:
                raise QuantizeError(f"MatMul {u.name}: weight {name} is shared; cannot smooth it")
            arr = numpy_helper.to_array(inits[name]).astype(np.float32)
            inits[name].CopyFrom(numpy_helper.from_array((arr * s.astype(np.float32)[:, None]).astype(np.float32), name))
        factors[ln.output[0]] = s
        layers += 1
    summary = {
        "alpha": float(alpha),
        "layernorms": layers,  # changed (factors not all 1)
        "layernorms_eligible": len(layernorm_groups(g)),
        "factors": "power of two per channel (exact in float32), s_j = max|x_j|^alpha / max_k|W_jk|^(1-alpha), "
        "normalised by the median channel",
        # largest channel max|x| / median channel's, over the eligible LayerNorm outputs
        "max_channel_ratio_before": max(before) if before else None,
        "max_channel_ratio_after": max(after) if after else None,
        "max_factor": float(max((f.max() for f in factors.values()), default=1.0)),
        "min_factor": float(min((f.min() for f in factors.values()), default=1.0)),
    }
    return m, summary, factors


# --------------------------------------------------------------------------------------------
# quantization
# --------------------------------------------------------------------------------------------


def quantize_dynamic_nodes(model, node_names: Sequence[str]):
    """ONNX Runtime's dynamic quantization of the named MatMuls (int8 per-channel weights,
    7-bit range; uint8 activations, per-tensor range computed at run time)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    m = _load(model)
    with tempfile.TemporaryDirectory(prefix="fptserve-quant-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(m, str(src))
        import logging

        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # "consider pre-processing": not applicable here
        try:
            quantize_dynamic(
                src, dst, op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=REDUCE_RANGE,
                weight_type=QuantType.QInt8, nodes_to_quantize=list(node_names),
                extra_options={"MatMulConstBOnly": True},
            )
        finally:
            logging.getLogger().setLevel(level)
        out = onnx.load(str(dst))
    _strip_value_info(out)
    return out


def _strip_value_info(m) -> None:
    # shape inference during quantization adds value_info for every tensor: not needed to run the
    # graph, and it would record intermediate shapes with the example batch
    del m.graph.value_info[:]


def quantize_static_nodes(model, node_names: Sequence[str], ranges: dict[str, tuple[np.ndarray, np.ndarray]]):
    """QDQ quantization of the named MatMuls with fixed activation ranges: each activation input
    goes through QuantizeLinear/DequantizeLinear (uint8, per tensor, scale and zero point from the
    calibrated min/max, zero included), each weight is stored int8 per output channel (symmetric,
    7-bit range) with a DequantizeLinear; ONNX Runtime fuses the pattern into an integer MatMul."""
    import onnx
    from onnx import helper, numpy_helper

    m = _load(model)
    m = onnx.ModelProto.FromString(m.SerializeToString())
    g = m.graph
    inits = _initializers(g)
    wanted = set(node_names)
    new_inits = []
    qdq_for: dict[str, str] = {}
    nodes = []
    qmax_w = 64 if REDUCE_RANGE else 127
    for n in g.node:
        if n.op_type == "MatMul" and n.name in wanted:
            x = n.input[0]
            if x not in qdq_for:
                lo, hi = ranges[x]
                rmin, rmax = min(float(lo.min()), 0.0), max(float(hi.max()), 0.0)
                scale = np.float32(max(rmax - rmin, 1e-8) / 255.0)
                zp = np.uint8(np.clip(np.round(-rmin / float(scale)), 0, 255))
                base = _safe(x)
                s_name, z_name = base + "_act_scale", base + "_act_zero_point"
                new_inits += [numpy_helper.from_array(np.array(scale, dtype=np.float32), s_name),
                              numpy_helper.from_array(np.array(zp, dtype=np.uint8), z_name)]
                q_out, dq_out = base + "_act_q", base + "_act_dq"
                nodes.append(helper.make_node("QuantizeLinear", [x, s_name, z_name], [q_out], name=base + "_QuantizeLinear"))
                nodes.append(helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out], name=base + "_DequantizeLinear"))
                qdq_for[x] = dq_out
            w_name = n.input[1]
            w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
            wscale = (np.abs(w).max(axis=0) / qmax_w).astype(np.float32)
            wscale[wscale == 0] = 1.0
            wq = np.clip(np.round(w / wscale[None, :]), -qmax_w, qmax_w).astype(np.int8)
            qn = _safe(w_name) + "_quantized"
            new_inits += [numpy_helper.from_array(wq, qn),
                          numpy_helper.from_array(wscale, qn + "_scale"),
                          numpy_helper.from_array(np.zeros(w.shape[1], dtype=np.int8), qn + "_zero_point")]
            wdq = qn + "_dq"
            nodes.append(helper.make_node("DequantizeLinear", [qn, qn + "_scale", qn + "_zero_point"], [wdq],
                                          name=qn + "_DequantizeLinear", axis=1))
            nodes.append(helper.make_node("MatMul", [qdq_for[x], wdq], list(n.output), name=n.name))
        else:
            nodes.append(n)
    g.initializer.extend(new_inits)
    del g.node[:]
    g.node.extend(_toposort(nodes, g))
    _drop_unused_initializers(m)
    return m


def _safe(name: str) -> str:
    return name.replace("/", "_").replace(":", "_").strip("_")


def _toposort(nodes: list, graph) -> list:
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    pending = list(nodes)
    ordered = []
    while pending:
        progressed = False
        rest = []
        for n in pending:
            if all((not i) or i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
                progressed = True
            else:
                rest.append(n)
        if not progressed:
            raise QuantizeError("graph rewrite left a cycle or a missing tensor: " + ", ".join(n.name for n in rest[:5]))
        pending = rest
    return ordered


def _drop_unused_initializers(m) -> None:
    used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    keep = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)


def _dead_code(m) -> None:
    live = {o.name for o in m.graph.output}
    keep = []
    for n in reversed(list(m.graph.node)):
        if any(o in live for o in n.output):
            keep.append(n)
            live.update(i for i in n.input if i)
    del m.graph.node[:]
    m.graph.node.extend(reversed(keep))
    _drop_unused_initializers(m)


# --------------------------------------------------------------------------------------------
# fused float attention for the layers whose probabilities token selection does not read
# --------------------------------------------------------------------------------------------


def fuse_unused_attention(model, num_heads: int):
    """Replace ``softmax(Q K^T * scale) V`` (+ head split/merge) by com.microsoft.MultiHeadAttention
    where the Softmax output feeds only the P V MatMul (layers before the first used one). Float32
    in and out; the used layers' attention (whose probabilities are averaged and ranked) is left
    as it is. Returns (model, count)."""
    import onnx
    from onnx import helper, numpy_helper

    m = _load(model)
    m = onnx.ModelProto.FromString(m.SerializeToString())
    g = m.graph
    prod, cons = _producers(g), _consumers(g)
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    replace, count = {}, 0
    for sm in [n for n in g.node if n.op_type == "Softmax"]:
        users = [u for u in cons.get(sm.output[0], []) if u.op_type != "Shape"]
        if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != sm.output[0]:
            continue
        pv = users[0]
        try:
            mul = prod[sm.input[0]]
            if mul.op_type != "Mul" or mul.input[1] not in consts:
                continue
            scale = float(np.asarray(consts[mul.input[1]]).reshape(-1)[0])
            qk = prod[mul.input[0]]
            qt, kt = prod[qk.input[0]], prod[qk.input[1]]
            if qk.op_type != "MatMul" or qt.op_type != "Transpose" or kt.op_type != "Transpose":
                continue
            qr = prod[qt.input[0]]
            kr = prod[kt.input[0]]
            if kr.op_type == "Transpose":  # k.transpose(-1,-2) of the head-split keys
                kr = prod[kr.input[0]]
            vt = prod[pv.input[1]]
            vr = prod[vt.input[0]]
            if not (qr.op_type == kr.op_type == vr.op_type == "Reshape" and vt.op_type == "Transpose"):
                continue
            ct = [c for c in cons[pv.output[0]] if c.op_type == "Transpose"]
            cr = [c for c in cons[ct[0].output[0]] if c.op_type == "Reshape"] if len(ct) == 1 else []
        except (KeyError, IndexError):
            continue
        if len(cr) != 1:
            continue
        mha = helper.make_node(
            "MultiHeadAttention", [qr.input[0], kr.input[0], vr.input[0]], [cr[0].output[0]],
            name=sm.name.replace("Softmax", "MultiHeadAttention") or f"MultiHeadAttention_{count}",
            domain=MS_DOMAIN, num_heads=int(num_heads), scale=scale,
        )
        replace[id(cr[0])] = mha
        count += 1
    if not count:
        return m, 0
    nodes = [replace.get(id(n), n) for n in g.node]
    del g.node[:]
    g.node.extend(nodes)
    if not any(o.domain == MS_DOMAIN for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    _dead_code(m)
    return m, count


# --------------------------------------------------------------------------------------------
# building the variant: INT8 (CPU) or float16 (GPU)
# --------------------------------------------------------------------------------------------


@dataclass
class Built:
    model: Any  # onnx.ModelProto
    info: dict[str, Any]


def build_int8(fp32_model, method: str, calibration_pixels: np.ndarray, num_heads: int, *, alpha: float = DEFAULT_ALPHA,
               fuse_attention: bool = False, batch: int = 1, log: Callable[[str], None] = log_stderr) -> Built:
    """The INT8 ModelProto for ``method`` (see the module docstring) and what was done."""
    if method not in METHODS:
        raise QuantizeError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    m = _load(fp32_model)
    g = m.graph
    wms = weight_matmuls(g)
    if not wms:
        raise QuantizeError("the backbone has no MatMul with a weight initializer: nothing to quantize")
    sel = selection_nodes(g)
    if not sel:
        raise QuantizeError("no Softmax -> ReduceMean -> TopK token-selection path found: not an fptserve backbone graph")
    groups = layernorm_groups(g)
    ln_fed = {u.name for _, users in groups for u in users}
    info: dict[str, Any] = {}
    ranges: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    t0 = time.perf_counter()
    if method in ("static", "smoothquant-dynamic", "smoothquant-static"):
        names = sorted({n.input[0] for n in wms} | {ln.output[0] for ln, _ in groups})
        log(f"calibration: activation ranges of {len(names)} tensors on {len(calibration_pixels)} images")
        ranges = activation_ranges(m, names, calibration_pixels, batch=batch)
    if method.startswith("smoothquant"):
        m, smooth, factors = smooth_layernorms(m, ranges, alpha)
        info["smoothing"] = smooth
        # the smoothed model computes bit-identical values except the LayerNorm outputs, which are
        # exactly x / s per channel: their ranges follow from the factors without another pass
        for name, s in factors.items():
            lo, hi = ranges[name]
            ranges[name] = (lo / s, hi / s)
    to_quantize = [n.name for n in weight_matmuls(m.graph) if not (method == "dynamic-ln-fp32" and n.name in ln_fed)]
    if method in ("dynamic", "smoothquant-dynamic", "dynamic-ln-fp32"):
        q = quantize_dynamic_nodes(m, to_quantize)
        tool = "onnxruntime.quantization.quantize_dynamic (IntegerOps: DynamicQuantizeLinear + MatMulInteger)"
        activation = "uint8, asymmetric, one range per tensor computed at run time (DynamicQuantizeLinear)"
    else:
        q = quantize_static_nodes(m, to_quantize, ranges)
        tool = "QDQ (QuantizeLinear/DequantizeLinear) written by fptserve_models.quantize; ONNX Runtime fuses it"
        activation = "uint8, asymmetric, one range per tensor fixed from the calibration images (min/max)"
    fused = 0
    if fuse_attention:
        q, fused = fuse_unused_attention(q, num_heads)
    info.update({
        "tool": tool,
        "activation_type": activation,
        "quantized_matmuls": len(to_quantize),
        "weight_matmuls": len(wms),
        "fused_attention_layers": fused,
        "build_seconds": round(time.perf_counter() - t0, 3),
    })
    return Built(q, info)


def build_float16(fp32_model) -> Built:
    """The float16 variant for GPUs: every weight and activation float16 (Tensor Cores, half the
    weight memory), except the ops ONNX Runtime's converter keeps float32 (TopK: the token ranking
    reads float32 importances), with Casts at both ends so that the interface is the float32
    backbone's: float32 pixels in, float32 K/V out. The adapters trained on the float32 backbone
    therefore run unchanged on its K/V; the Casts run where the backbone runs (on the GPU)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    m = _load(fp32_model)
    if not selection_nodes(m.graph):
        raise QuantizeError("no Softmax -> ReduceMean -> TopK token-selection path found: not an fptserve backbone graph")
    t0 = time.perf_counter()
    half = convert_float_to_float16(m, keep_io_types=True)
    present = {n.op_type for n in m.graph.node}
    kept = sorted(present & set(DEFAULT_OP_BLOCK_LIST))
    info = {
        "tool": "onnxruntime.transformers.float16.convert_float_to_float16 (keep_io_types: float32 pixels in, "
                "float32 K/V out)",
        "kept_float": [{"nodes": ", ".join(kept) or "none",
                        "why": "ONNX Runtime's converter keeps these ops float32 (Casts around them)"}],
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    return Built(half, info)


def kept_float(method: str, fused: int, selection_layers: int) -> list[dict[str, str]]:
    kept = [
        {"nodes": "MatMul Q.K^T, Softmax, MatMul P.V (attention, every layer)",
         "why": "no weights to quantize; the used layers' probabilities are averaged and ranked to select tokens, "
                "where a small error swaps tokens"},
        {"nodes": f"ReduceMean, TopK, GatherElements ({selection_layers} used layers)",
         "why": "token selection: the importance ranking and the gathered K/V rows stay exact float32"},
        {"nodes": "LayerNormalization", "why": "normalisation statistics; cheap (<2% of the time)"},
        {"nodes": "GELU (Erf), residual Add, bias Add", "why": "elementwise; cheap, and outliers live in the residual stream"},
        {"nodes": "Conv (patch embedding)", "why": "raw pixels in; one layer, ~1% of the fp32 time"},
    ]
    if method == "dynamic-ln-fp32":
        kept.append({"nodes": "MatMul fed by a LayerNorm (Q, K, V, MLP up-projection)",
                     "why": "their inputs carry the LayerNorm outlier channels"})
    if fused:
        kept.append({"nodes": f"com.microsoft.MultiHeadAttention ({fused} layers before the first used one)",
                     "why": "float32 fused attention where token selection does not read the probabilities"})
    return kept


# --------------------------------------------------------------------------------------------
# fidelity
# --------------------------------------------------------------------------------------------


def with_selection_outputs(model) -> tuple[bytes, list[str]]:
    """The model with each used layer's TopK indices ([B, H, k], int64) added as graph outputs,
    in layer order (the order of the K/V outputs' layer axis)."""
    import onnx

    m = _load(model)
    m = onnx.ModelProto.FromString(m.SerializeToString())
    names = []
    for _, _, topk in selection_nodes(m.graph):
        name = topk.output[1]
        names.append(name)
        if name not in {o.name for o in m.graph.output}:
            m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
    return m.SerializeToString(), names


@dataclass
class BackboneRun:
    keys: np.ndarray  # [B, L, H, k, d]
    values: np.ndarray
    indices: np.ndarray  # [B, L, H, k]


def run_backbone(session, index_names: Sequence[str], pixels: np.ndarray, batch: int) -> BackboneRun:
    ks, vs, ids = [], [], []
    for start in range(0, len(pixels), batch):
        out = session.run(["key_states", "value_states", *index_names], {"pixel_values": pixels[start:start + batch]})
        ks.append(out[0])
        vs.append(out[1])
        ids.append(np.stack(out[2:], axis=1))
    return BackboneRun(np.concatenate(ks), np.concatenate(vs), np.concatenate(ids))


def _err(ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    ref = ref.astype(np.float64)
    d = np.abs(got.astype(np.float64) - ref)
    return {
        "max_abs_diff": float(d.max()) if d.size else 0.0,
        "mean_abs_diff": float(d.mean()) if d.size else 0.0,
        "relative_error": float(np.sqrt((d * d).sum()) / max(np.sqrt((ref * ref).sum()), 1e-30)),
        "max_abs_reference": float(np.abs(ref).max()) if ref.size else 0.0,
    }


def compare_backbones(ref: BackboneRun, got: BackboneRun) -> dict[str, Any]:
    """K/V deviation on the tokens both select (matched by token index, so top-k reordering does
    not count) and the selected token sets per (image, layer, head) as sets."""
    b_, l_, h_, k_ = ref.indices.shape
    jacc = np.zeros((b_, l_, h_))
    changed = np.zeros((b_, l_, h_), dtype=np.int64)
    rk, gk, rv, gv = [], [], [], []
    for b in range(b_):
        for l in range(l_):
            for h in range(h_):
                a, c = ref.indices[b, l, h], got.indices[b, l, h]
                common, ia, ic = np.intersect1d(a, c, assume_unique=True, return_indices=True)
                jacc[b, l, h] = len(common) / (2 * k_ - len(common))
                changed[b, l, h] = k_ - len(common)
                rk.append(ref.keys[b, l, h, ia])
                gk.append(got.keys[b, l, h, ic])
                rv.append(ref.values[b, l, h, ia])
                gv.append(got.values[b, l, h, ic])
    rk, gk, rv, gv = (np.concatenate(x) for x in (rk, gk, rv, gv))
    return {
        "kv": {"keys": _err(rk, gk), "values": _err(rv, gv), "rows_compared": int(len(rk)),
               "served_max_abs_diff": float(max(np.abs(ref.keys - got.keys).max(), np.abs(ref.values - got.values).max()))},
        "token_sets": {
            "sets_compared": int(jacc.size),
            "jaccard_min": float(jacc.min()),
            "jaccard_mean": float(jacc.mean()),
            "identical_fraction": float((changed == 0).mean()),
            "max_tokens_swapped": int(changed.max()),
            "mean_tokens_swapped": float(changed.mean()),
            "top_k": int(k_),
        },
    }


def softmax64(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


def compare_logits(ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    pr, pg = softmax64(ref), softmax64(got)
    same = pr.argmax(1) == pg.argmax(1)
    dp = np.abs(pg - pr)
    top2 = np.sort(pr, axis=1)[:, -2:] if pr.shape[1] > 1 else np.concatenate([np.zeros_like(pr), pr], 1)
    return {
        "images": int(len(ref)),
        "label_agreement": float(same.mean()),
        "labels_changed": int((~same).sum()),
        "max_abs_prob_change": float(dp.max()),
        "mean_abs_prob_change": float(dp.mean()),
        "max_abs_logit_change": float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()),
        "min_reference_top2_margin": float((top2[:, 1] - top2[:, 0]).min()),
    }


@dataclass
class Adapter:
    task: str
    version: str
    folder: Path
    manifest: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.task}/{self.version}"


def find_adapters(repository: str | Path, backbone: dict[str, Any]) -> tuple[list[Adapter], list[dict[str, str]]]:
    """Adapters under ``repository/tasks`` whose manifest's backbone is {name, sha256} of
    ``backbone`` (the fp32 manifest); others are skipped, with the reason when relevant."""
    from .export import ADAPTER_FORMAT

    tasks = Path(repository) / "tasks"
    found, skipped = [], []
    if not tasks.is_dir():
        return found, skipped
    want = {"name": backbone["name"], "sha256": backbone["sha256"]}
    for mpath in sorted(tasks.glob("*/*/manifest.json")):
        folder = mpath.parent
        if folder.name.startswith(".") or folder.parent.name.startswith("."):
            continue
        try:
            manifest = json.loads(mpath.read_text())
        except ValueError:
            skipped.append({"adapter": str(folder), "why": "manifest.json is not valid JSON"})
            continue
        if not isinstance(manifest, dict) or manifest.get("format") != ADAPTER_FORMAT:
            continue
        b = manifest.get("backbone") or {}
        if {"name": b.get("name"), "sha256": b.get("sha256")} != want:
            continue
        onnx_path = folder / manifest.get("file", "side.onnx")
        if not onnx_path.is_file() or sha256_file(onnx_path) != manifest.get("sha256"):
            skipped.append({"adapter": f"{manifest.get('task')}/{manifest.get('version')}",
                            "why": f"{onnx_path} is missing or does not match its manifest's sha256"})
            continue
        found.append(Adapter(str(manifest["task"]), str(manifest["version"]), folder, manifest))
    return found, skipped


def fidelity_report(
    fp32_model, int8_model, sets: Sequence[ImageSet], adapters: Sequence[Adapter], normalization: dict[str, Any],
    image_size: int, consistency_batch: int = 4, log: Callable[[str], None] = log_stderr, variant: str = "int8",
) -> dict[str, Any]:
    """The fidelity section of the manifest: the variant (``variant`` names its precision in the
    report) against fp32 on the same preprocessed images.

    Every image is run alone (batch 1), as the daemon may run it; ``batch_consistency`` then runs
    the first ``consistency_batch`` evaluation images as one batch through the variant and
    compares with their batch-1 K/V (static quantization is batch-invariant, dynamic is not: its
    activation ranges span the whole batch)."""
    ref_bytes, ref_idx = with_selection_outputs(fp32_model)
    got_bytes, got_idx = with_selection_outputs(int8_model)
    if len(ref_idx) != len(got_idx):
        raise QuantizeError(f"token selection layers: fp32 has {len(ref_idx)}, {variant} has {len(got_idx)}")
    ref_sess, got_sess = ort_session(ref_bytes), ort_session(got_bytes)
    del ref_bytes, got_bytes
    runs: dict[tuple, tuple[BackboneRun, BackboneRun]] = {}

    def backbone_runs(split: ImageSet, mean, std):
        key = (split.name, tuple(mean), tuple(std))
        if key not in runs:
            px = preprocess_set(split.images, [image_size, image_size], mean, std)
            t0 = time.perf_counter()
            r = run_backbone(ref_sess, ref_idx, px, 1)
            t1 = time.perf_counter()
            q = run_backbone(got_sess, got_idx, px, 1)
            t2 = time.perf_counter()
            log(f"fidelity: {split.name} ({len(px)} images, mean {list(mean)}): fp32 {t1 - t0:.1f} s, {variant} {t2 - t1:.1f} s")
            runs[key] = (r, q)
        return runs[key]

    mean, std = normalization["mean"], normalization["std"]
    splits = {}
    for split in sets:
        r, q = backbone_runs(split, mean, std)
        px = preprocess_set(split.images, [image_size, image_size], mean, std)
        splits[split.name] = {**split.describe(), "pixels_sha256": tensors_sha256(px), **compare_backbones(r, q)}
    last = sets[-1]
    n = min(int(consistency_batch), len(last.images))
    consistency = None
    if n >= 2:
        px = preprocess_set(last.images[:n], [image_size, image_size], mean, std)
        k, v = got_sess.run(["key_states", "value_states"], {"pixel_values": px})
        single = runs[(last.name, tuple(mean), tuple(std))][1]
        consistency = {
            "images": n, "split": last.name,
            "max_abs_diff": float(max(np.abs(k - single.keys[:n]).max(), np.abs(v - single.values[:n]).max())),
            "method": f"{variant} K/V of the first {n} {last.name} images run as one batch vs each run alone",
        }
    adapter_reports = []
    for ad in adapters:
        pre = ad.manifest["preprocessing"]
        if list(pre["backbone_size"]) != [image_size, image_size]:
            raise QuantizeError(f"adapter {ad.label}: backbone_size {pre['backbone_size']} is not {image_size}")
        sess = ort_session(ad.folder / ad.manifest.get("file", "side.onnx"))
        entry: dict[str, Any] = {"task": ad.task, "version": ad.version, "sha256": ad.manifest["sha256"],
                                 "classes": len(ad.manifest.get("classes", [])),
                                 "normalization": {"mean": pre["mean"], "std": pre["std"]}}
        all_ref, all_got = [], []
        for split in sets:
            r, q = backbone_runs(split, pre["mean"], pre["std"])
            side = preprocess_set(split.images, pre["side_size"], pre["mean"], pre["std"])
            lr, lg = [], []
            for i in range(len(side)):
                sl = slice(i, i + 1)
                lr.append(sess.run(["logits"], {"side_pixel_values": side[sl], "key_states": r.keys[sl], "value_states": r.values[sl]})[0])
                lg.append(sess.run(["logits"], {"side_pixel_values": side[sl], "key_states": q.keys[sl], "value_states": q.values[sl]})[0])
            lr, lg = np.concatenate(lr), np.concatenate(lg)
            entry[split.name] = compare_logits(lr, lg)
            all_ref.append(lr)
            all_got.append(lg)
        entry["all"] = compare_logits(np.concatenate(all_ref), np.concatenate(all_got))
        adapter_reports.append(entry)
    summary = {
        "images": int(sum(len(s.images) for s in sets)),
        "kv_keys_max_abs_diff": max(s["kv"]["keys"]["max_abs_diff"] for s in splits.values()),
        "kv_values_max_abs_diff": max(s["kv"]["values"]["max_abs_diff"] for s in splits.values()),
        "kv_max_relative_error": max(max(s["kv"]["keys"]["relative_error"], s["kv"]["values"]["relative_error"]) for s in splits.values()),
        "token_sets_jaccard_min": min(s["token_sets"]["jaccard_min"] for s in splits.values()),
        "token_sets_jaccard_mean": float(np.mean([s["token_sets"]["jaccard_mean"] for s in splits.values()])),
        "token_sets_identical_fraction": float(np.mean([s["token_sets"]["identical_fraction"] for s in splits.values()])),
        "adapters": len(adapter_reports),
        "min_label_agreement": min((a["all"]["label_agreement"] for a in adapter_reports), default=None),
        "max_abs_prob_change": max((a["all"]["max_abs_prob_change"] for a in adapter_reports), default=None),
        "batch_consistency_max_abs_diff": consistency["max_abs_diff"] if consistency else None,
    }
    return {
        "method": (
            "ONNX Runtime CPU, the fp32 backbone.onnx and this file on the same preprocessed images (PIL bilinear, "
            "/255, (x - mean) / std, float32), one image per run. kv: K/V rows of the tokens both select, matched "
            "by token index (top-k order may differ), abs and relative (L2) error; served_max_abs_diff compares the "
            "outputs position by position. token_sets: per (image, layer, head), Jaccard index of the selected "
            "token sets and tokens swapped. adapters: "
            f"each adapter's side.onnx on fp32 vs {variant} K/V, with its own "
            "normalisation: softmax (float64) probabilities and argmax labels"
        ),
        "normalization": normalization,
        "summary": summary,
        "splits": splits,
        "batch_consistency": consistency,
        "adapters": adapter_reports,
    }


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------


def calibration_batch(image_size: int, patch_size: int) -> int:
    """Images per ONNX Runtime run while collecting activation ranges (memory: ~0.9 GB per image
    at ViT-B/16 512; the ranges do not depend on it, the float model is batch-invariant)."""
    tokens = (image_size // patch_size) ** 2 + 1
    return 1 if tokens > 400 else 16


def _norm_key(mean, std) -> tuple:
    return (tuple(float(v) for v in mean), tuple(float(v) for v in std))


def quantize_backbone(
    repository: str | Path,
    backbone: str,
    name: str | None = None,
    *,
    method: str = DEFAULT_METHOD,
    calibration: str | Path | None = None,
    evaluation: str | Path | None = None,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    evaluation_images: int = DEFAULT_EVALUATION_IMAGES,
    seed: int = 0,
    adapters_repository: str | Path | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    alpha: float = DEFAULT_ALPHA,
    fuse_attention: bool = False,
    overwrite: bool = False,
    precision: str = "int8",
    log: Callable[[str], None] = log_stderr,
) -> dict[str, Any]:
    """Write ``repository/backbones/<name>/`` (default name ``<backbone>-int8``, or ``-fp16`` for
    ``precision="float16"``); returns its manifest.

    A float16 variant needs no calibration: the calibration and evaluation images only feed its
    fidelity report. For INT8, calibration covers every normalisation the backbone will see: each calibration image is
    preprocessed with ``mean``/``std`` (when given) and with each covered adapter's; the K/V and
    token-set report uses ``mean``/``std``, else the first adapter's, else 0.5/0.5."""
    ex = _export()
    fp32_manifest, fp32_path = ex.read_backbone(repository, backbone)
    if precision not in PRECISIONS:
        raise QuantizeError(f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}")
    name = name or f"{backbone}-{PRECISIONS[precision]}"
    ex.check_name("backbone name", name)
    if name == backbone:
        raise QuantizeError("the variant needs a name of its own (it is a new backbone folder)")
    arch = fp32_manifest["architecture"]
    if arch.get("kv_dtype") != "float32" or fp32_manifest.get("precision", "float32") != "float32" or fp32_manifest.get("quantized_from"):
        raise QuantizeError(f"backbone {backbone!r} is not a float32 backbone (kv_dtype {arch.get('kv_dtype')!r}, "
                            f"precision {fp32_manifest.get('precision', 'float32')!r}); quantize the float32 export")
    if method not in METHODS:
        raise QuantizeError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    folder = Path(repository) / "backbones" / name
    if folder.exists() and not overwrite:
        raise QuantizeError(f"{folder} already exists (pass --overwrite to replace it)")
    if (mean is None) != (std is None):
        raise QuantizeError("--mean and --std go together")
    size = int(arch["image_size"])

    adapters, skipped = find_adapters(adapters_repository or repository, fp32_manifest)
    if mean is not None:
        normalization = {"mean": ex.check_norm("mean", mean, 3), "std": ex.check_norm("std", std, 3), "source": "--mean/--std"}
    elif adapters:
        pre = adapters[0].manifest["preprocessing"]
        normalization = {"mean": list(pre["mean"]), "std": list(pre["std"]), "source": f"adapter {adapters[0].label}"}
    else:
        normalization = {"mean": DEFAULT_NORMALIZATION[0], "std": DEFAULT_NORMALIZATION[1],
                         "source": "default (no adapter, no --mean/--std)"}
    norms = [_norm_key(normalization["mean"], normalization["std"])]
    for ad in adapters:
        key = _norm_key(ad.manifest["preprocessing"]["mean"], ad.manifest["preprocessing"]["std"])
        if key not in norms:
            norms.append(key)
    cal = load_image_folder("calibration", calibration) if calibration else synthetic_images("calibration", calibration_images, seed, size)
    ev = load_image_folder("evaluation", evaluation) if evaluation else synthetic_images("evaluation", evaluation_images, seed + 1, size)
    cal_pixels = np.concatenate([preprocess_set(cal.images, [size, size], m_, s_) for m_, s_ in norms])

    int8 = precision == "int8"
    log(f"{precision} variant {backbone} -> {name}: " + (f"method {method}, " if int8 else "")
        + f"{len(cal.images)} calibration images x {len(norms)} normalisation(s), {len(ev.images)} evaluation images, "
        f"{len(adapters)} adapter(s)")
    import onnx

    fp32_model = onnx.load(str(fp32_path))
    if int8:
        built = build_int8(fp32_model, method, cal_pixels, int(arch["num_heads"]), alpha=alpha,
                           fuse_attention=fuse_attention, batch=calibration_batch(size, int(arch["patch_size"])), log=log)
    else:
        built = build_float16(fp32_model)
    outputs = {o.name for o in built.model.graph.output}
    listed = fp32_manifest["outputs"] + fp32_manifest.get("explanation_outputs", [])
    missing = [o["name"] for o in listed if o["name"] not in outputs]
    if missing:  # e.g. token_indices (saliency maps): the variant keeps the float32 backbone's interface
        raise QuantizeError(f"the {precision} graph lost the output(s) {', '.join(missing)} of {backbone!r}")
    data = built.model.SerializeToString()
    fidelity = fidelity_report(fp32_model, built.model, [cal, ev], adapters,
                               {k: normalization[k] for k in ("mean", "std", "source")}, size,
                               consistency_batch=4 if size * size <= 256 * 256 else 2, log=log, variant=precision)
    if skipped:
        fidelity["adapters_skipped"] = skipped
    del fp32_model

    calib = {"images": len(cal.images), "sha256": tensors_sha256(cal_pixels),
             "sha256_of": "the preprocessed float32 calibration tensors, every image under each normalisation in "
                          "turn ([len(normalizations) * N, 3, H, W], C order), after the string 'float32' + shape",
             "source": cal.source, "synthetic": cal.synthetic,
             "normalizations": [{"mean": list(m_), "std": list(s_)} for m_, s_ in norms]}
    if cal.files_sha256:
        calib["files_sha256"] = cal.files_sha256
    info = built.info
    if not int8:
        return _write_variant(folder, data, fp32_manifest, name, "float16", {
            "method": "float16",
            "tool": info["tool"],
            "kept_float": info["kept_float"],
            "fidelity_images": calib,
            "runtime": "for the CUDA execution provider (Tensor Cores); on a CPU ONNX Runtime casts most nodes back "
                       "to float32 around kernels it lacks in float16, slower than the float32 backbone",
            "build_seconds": info["build_seconds"],
        }, fidelity, seed if (cal.synthetic or ev.synthetic) else None, overwrite)
    quantization = {
        "method": method,
        "per_channel": True,
        "weight_type": "int8, symmetric, per output channel" + (", 7-bit range [-64, 64] (reduce_range)" if REDUCE_RANGE else ""),
        "activation_type": info["activation_type"],
        "batch_invariant": method in ("static", "smoothquant-static"),
        "quantized": f"{info['quantized_matmuls']} of {info['weight_matmuls']} weight MatMuls (Linear layers)",
        "kept_float": kept_float(method, info["fused_attention_layers"], len(arch["layers_used"])),
        "calibration": calib if method != "dynamic" and method != "dynamic-ln-fp32" else None,
        "tool": info["tool"],
        "runtime": (
            "ONNX Runtime fuses each QDQ MatMul into an integer MatMul (MatMulIntegerToFloat) at graph optimization "
            "level EXTENDED or ALL; at BASIC it runs dequantized in float32, ~3x slower than the fp32 backbone"
            if method in ("static", "smoothquant-static") else
            "ONNX Runtime fuses DynamicQuantizeLinear + MatMulInteger into DynamicQuantizeMatMul at level EXTENDED or ALL"
        ),
        "reproducibility": (
            "bit for bit with the same ONNX Runtime kernels; float rounding elsewhere (another CPU) moves activations "
            "across quantization steps, giving a statistically equivalent but different K/V"
        ),
        "build_seconds": info["build_seconds"],
    }
    if quantization["calibration"] is None:
        quantization["fidelity_images"] = calib  # what the report used; nothing was calibrated
    if "smoothing" in info:
        quantization["smoothing"] = info["smoothing"]
    return _write_variant(folder, data, fp32_manifest, name, "int8", quantization, fidelity,
                          seed if (cal.synthetic or ev.synthetic) else None, overwrite)


def _write_variant(folder: Path, data: bytes, fp32_manifest: dict[str, Any], name: str, precision: str,
                   quantization: dict[str, Any], fidelity: dict[str, Any], seed: int | None,
                   overwrite: bool) -> dict[str, Any]:
    """The variant's manifest (the float32 backbone's interface, ``precision``, ``quantized_from``),
    written with ``data`` as ``folder``; returns the manifest."""
    ex = _export()
    manifest = {
        "format": ex.BACKBONE_FORMAT,
        "name": name,
        "file": "backbone.onnx",
        "sha256": hashlib.sha256(data).hexdigest(),
        "source_weights": fp32_manifest.get("source_weights"),
        "architecture": fp32_manifest["architecture"],
        "inputs": fp32_manifest["inputs"],
        "outputs": fp32_manifest["outputs"],
        **({"explanation_outputs": fp32_manifest["explanation_outputs"]} if "explanation_outputs" in fp32_manifest else {}),
        "opset": fp32_manifest.get("opset"),
        "precision": precision,
        "quantized_from": {"name": fp32_manifest["name"], "sha256": fp32_manifest["sha256"]},
        "quantization": quantization,
        "fidelity": fidelity,
        "provenance": {**ex.versions(), "seed": seed},
    }
    _write_folder(folder, data, manifest, overwrite)
    return manifest


def _write_folder(folder: Path, data: bytes, manifest: dict[str, Any], overwrite: bool) -> None:
    """Written into a hidden sibling folder and renamed into place: a watcher never sees half of it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        (tmp / "backbone.onnx").write_bytes(data)
        ex = _export()
        ex.write_json(tmp / "manifest.json", manifest)
        ex.read_backbone_dir(tmp)  # the sha256 written is the file's
        if folder.exists():
            if not overwrite:
                raise QuantizeError(f"{folder} already exists")
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def _floats(text: str | None) -> list[float] | None:
    return None if text is None else [float(v) for v in text.replace(" ", "").split(",") if v]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="model repository holding the float32 backbone; the variant is written there")
    p.add_argument("--backbone", required=True, help="name of the float32 backbone in the repository")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="int8",
                   help="int8 (CPU serving; the default) or float16 (GPU serving: float16 weights and activations, "
                        "float32 pixels in and K/V out, so the float32 backbone's adapters run on it unchanged)")
    p.add_argument("--name", help="name of the variant (default <backbone>-int8, or <backbone>-fp16)")
    p.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD, help=f"quantization method (default {DEFAULT_METHOD})")
    p.add_argument("--calibration", help="folder of PNG/JPEG calibration images (default: seeded synthetic images)")
    p.add_argument("--evaluation", help="folder of PNG/JPEG evaluation images for the fidelity report (default: seeded synthetic)")
    p.add_argument("--calibration-images", type=int, default=DEFAULT_CALIBRATION_IMAGES,
                   help=f"synthetic calibration images when no --calibration (default {DEFAULT_CALIBRATION_IMAGES})")
    p.add_argument("--evaluation-images", type=int, default=DEFAULT_EVALUATION_IMAGES,
                   help=f"synthetic evaluation images when no --evaluation (default {DEFAULT_EVALUATION_IMAGES})")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic images (default 0)")
    p.add_argument("--adapters-repo", help="repository whose adapters (trained on this backbone) the report covers (default --out)")
    p.add_argument("--mean", help="normalisation mean r,g,b for calibration and the K/V report (default: first adapter's)")
    p.add_argument("--std", help="normalisation std r,g,b (with --mean)")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help=f"SmoothQuant migration strength (default {DEFAULT_ALPHA})")
    p.add_argument("--fuse-attention", action="store_true",
                   help="use ONNX Runtime's fused MultiHeadAttention in the layers before the first used one "
                        "(float32; measured no faster on a 2-core CPU)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing backbones/<name>/")


def cmd_quantize_backbone(args) -> None:
    try:
        m = _run_command(args)
    except QuantizeError as e:
        raise _export().ExportError(str(e)) from None
    print(json.dumps({"backbone": m["name"], "sha256": m["sha256"], "precision": m["precision"],
                      "quantized_from": m["quantized_from"], "method": m["quantization"]["method"],
                      "fidelity": m["fidelity"]["summary"]}, indent=2))


def _run_command(args) -> dict[str, Any]:
    return quantize_backbone(
        args.out, args.backbone, args.name, method=args.method, calibration=args.calibration, evaluation=args.evaluation,
        calibration_images=args.calibration_images, evaluation_images=args.evaluation_images, seed=args.seed,
        adapters_repository=args.adapters_repo, mean=_floats(args.mean), std=_floats(args.std), alpha=args.alpha,
        fuse_attention=args.fuse_attention, overwrite=args.overwrite, precision=args.precision,
    )


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``quantize-backbone`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "quantize-backbone",
        help="write an INT8 (CPU) or float16 (GPU) variant backbones/<name>/ of a float32 backbone, with a fidelity report",
        description=(
            "Quantize a float32 backbone's weight MatMuls to INT8 for CPU serving (or the whole graph to float16 for "
            "GPU serving, --precision float16), as a new backbone folder whose "
            "manifest records quantized_from (the fp32 backbone's name and sha256), the method, the calibration "
            "images, and a fidelity report (K/V, selected token sets, every adapter's probabilities and labels) "
            "against the fp32 backbone on calibration and evaluation images."
        ),
    )
    add_arguments(p)
    p.set_defaults(func=cmd_quantize_backbone)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fptserve_models.quantize")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["quantize-backbone", *argv]
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        args.func(args)
    except (_export().ExportError, QuantizeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
