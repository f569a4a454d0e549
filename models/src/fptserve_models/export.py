"""ONNX export of the backbone and of task adapters, parity checks and manifests.

Repository layout::

    <repository>/backbones/<backbone-name>/{manifest.json, backbone.onnx}
    <repository>/tasks/<task-name>/<version>/{manifest.json, side.onnx}
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import __version__
from .config import DEFAULT_OPSET, BackboneConfig, SideConfig
from .model import Backbone, BackboneForExport, SideNetwork, SideNetworkForExplain
from .weights import sha256_file

BACKBONE_FORMAT = "fptserve.backbone/v1"
ADAPTER_FORMAT = "fptserve.adapter/v1"
KV_LAYOUT = "batch,layer,head,token,head_dim"
# Optional outputs for saliency maps (issue 22; explain.py). Manifests list them under a key of
# their own, "explanation_outputs", not "outputs": daemons check every tensor that "outputs"
# names against the graph, and those that predate these outputs know no int64 dtype, so listing
# token_indices there would make them refuse the backbone. They ignore the extra graph outputs.
TOKEN_INDICES = "token_indices"
EXPLAIN_OUTPUTS = ("token_relevance", "patch_relevance")
# ONNX Runtime against PyTorch, both float32: two summation orders (the kernels differ by CPU),
# each within a few ulps of exact, so they differ by a few ulps of values of order 10 (measured
# 1e-6 to 5e-6 on the tiny and the full-size models, models/README.md). 1e-4 leaves a factor
# of 20 for other CPUs and still fails on a wrong eps, GELU or token (DESIGN.md: 0.005 and up).
FP32_TOLERANCE = 1e-4
# Importance values closer than this to the k-th largest one count as ties (a token there may
# be swapped across the top-k boundary by float rounding without being a bug).
TIE_TOLERANCE = {"float32": 1e-6, "float16": 1e-4}
MAX_SINGLE_FILE_BYTES = 2_000_000_000

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ExportError(RuntimeError):
    """An export that cannot be made or failed its parity check."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def check_name(kind: str, value: str) -> None:
    if not _NAME.match(value or ""):
        raise ExportError(f"{kind} {value!r} must match {_NAME.pattern} (it becomes a folder name)")


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {
        "exporter": f"fptserve-models {__version__}",
        "torch": torch.__version__.split("+")[0],  # no local build tag (cpu vs cuda wheel)
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def to_onnx_bytes(
    module: torch.nn.Module,
    args: tuple,
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int,
    output_shapes: dict[str, Sequence[int]] | None = None,
) -> bytes:
    """TorchScript-based export into memory: one self-contained, deterministic file.

    ``output_shapes`` (-1 = batch) replaces the exporter's symbolic output dims, so that only
    the batch dimension is dynamic in the graph's declared interface."""
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    size += sum(b.numel() * b.element_size() for b in module.buffers())
    if size > MAX_SINGLE_FILE_BYTES:
        raise ExportError(
            f"model weights are {size / 1e9:.2f} GB: single-file ONNX is limited to 2 GB and this exporter "
            "does not write external data (.onnx.data)"
        )
    buf = io.BytesIO()
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            buf,
            dynamo=False,
            input_names=list(input_names),
            output_names=list(output_names),
            opset_version=int(opset),
            dynamic_axes={n: {0: "batch"} for n in list(input_names) + list(output_names)},
            do_constant_folding=True,
        )
    data = buf.getvalue()
    if output_shapes:
        import onnx

        model = onnx.load_from_string(data)
        for out in model.graph.output:
            if out.name in output_shapes:
                dims = out.type.tensor_type.shape.dim
                want = list(output_shapes[out.name])
                if len(dims) != len(want):
                    raise ExportError(f"output {out.name} has rank {len(dims)}, expected {len(want)}")
                for d, w in zip(dims, want):
                    if w == -1:
                        d.dim_param = "batch"
                    else:
                        d.dim_value = int(w)
        onnx.checker.check_model(model)
        data = model.SerializeToString()
    return data


def ort_session(model: bytes | str | Path):
    """An ONNX Runtime CPU session. Its intra-op threads follow FPTSERVE_INTRA_OP_THREADS (the
    daemon's variable; unset or 0: one per core), so a test run can pin every runtime at once."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = int(os.environ.get("FPTSERVE_INTRA_OP_THREADS") or 0)
    if isinstance(model, Path):
        model = str(model)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def parity_inputs(shape: Sequence[int], seed: int) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed)))


def np_dtype(name: str):
    return {"float32": np.float32, "float16": np.float16}[name]


def torch_dtype(name: str):
    return {"float32": torch.float32, "float16": torch.float16}[name]


# --------------------------------------------------------------------------------------------
# backbone
# --------------------------------------------------------------------------------------------


def backbone_architecture(config: BackboneConfig, kv_dtype: str) -> dict[str, Any]:
    return {
        "kind": "vit",
        "hidden_size": config.hidden_size,
        "num_heads": config.num_heads,
        "head_dim": config.head_dim,
        "patch_size": config.patch_size,
        "num_layers": config.num_layers,
        "image_size": config.image_size,
        "pretrained_image_size": config.pretrained_image_size,
        "num_tokens": config.num_tokens,
        "layers_used": list(config.layers_used),
        "token_ratio": config.token_ratio,
        "top_k": config.top_k,
        "layer_norm_eps": config.layer_norm_eps,
        "kv_dtype": kv_dtype,
        "kv_layout": KV_LAYOUT,
        # extra keys (allowed by the format): what a rebuild of the PyTorch model needs
        "mlp_size": config.mlp_size,
        "num_channels": config.num_channels,
        "qkv_bias": config.qkv_bias,
    }


def backbone_config_from_manifest(manifest: dict[str, Any]) -> BackboneConfig:
    a = manifest["architecture"]
    return BackboneConfig(
        hidden_size=a["hidden_size"],
        num_heads=a["num_heads"],
        num_layers=a["num_layers"],
        mlp_size=a["mlp_size"],
        patch_size=a["patch_size"],
        num_channels=a.get("num_channels", 3),
        image_size=a["image_size"],
        pretrained_image_size=a["pretrained_image_size"],
        layers_used=tuple(a["layers_used"]),
        token_ratio=a["token_ratio"],
        layer_norm_eps=a["layer_norm_eps"],
        qkv_bias=a.get("qkv_bias", True),
    )


def kv_shape(config: BackboneConfig) -> list[int]:
    return [-1, len(config.layers_used), config.num_heads, config.top_k, config.head_dim]


def token_indices_shape(config: BackboneConfig) -> list[int]:
    return [-1, len(config.layers_used), config.num_heads, config.top_k]


def explain_shapes(bconf: BackboneConfig, sconf: SideConfig) -> dict[str, list[int]]:
    """Shapes of an adapter's explanation outputs (-1 = batch)."""
    return {
        "token_relevance": [-1, sconf.num_classes, len(bconf.layers_used), bconf.num_heads, bconf.top_k],
        "patch_relevance": [-1, sconf.num_classes, sconf.grid_size * sconf.grid_size],
    }


def selection_differences(details, tokens: np.ndarray, tie_tolerance: float) -> tuple[int, int]:
    """Selected tokens [B, L, H, k] against the reference's top-k, as sets per (sample, layer,
    head): (tokens in the symmetric differences, those of them that are not near-ties with the
    k-th importance value)."""
    ref_idx = details.indices.numpy()
    importance = details.importance.double().numpy()
    b_, l_, h_, k_ = tokens.shape
    mismatched, unexplained = 0, 0
    for b in range(b_):
        for l in range(l_):
            for h in range(h_):
                diff = set(tokens[b, l, h].tolist()) ^ set(ref_idx[b, l, h].tolist())
                if diff:
                    imp = importance[b, l, h]
                    kth = np.sort(imp)[::-1][k_ - 1]
                    mismatched += len(diff)
                    unexplained += sum(1 for t in diff if abs(imp[t] - kth) > tie_tolerance)
    return mismatched, unexplained


def compare_kv_sets(details, key_states: np.ndarray, value_states: np.ndarray, tie_tolerance: float) -> dict[str, Any]:
    """Compare exported K/V with the PyTorch reference as SETS per (sample, layer, head).

    Each exported row (K||V) is matched to the nearest row of the reference's *full* K/V
    (all N tokens), which recovers the token each exported row came from (``tokens``,
    [B, L, H, k]). The K/V error is measured on those matches; the recovered token set is
    compared with the reference's top-k set, and every token in their symmetric difference
    must be a near-tie with the k-th importance value (else it counts as unexplained).
    """
    ref_full = torch.cat([details.all_keys, details.all_values], dim=-1).double().numpy()  # [B,L,H,N,2d]
    got = np.concatenate([key_states, value_states], axis=-1).astype(np.float64)  # [B,L,H,k,2d]
    b_, l_, h_, k_, _ = got.shape
    tokens = np.zeros((b_, l_, h_, k_), dtype=np.int64)
    max_diff, duplicates = 0.0, 0
    for b in range(b_):
        for l in range(l_):
            for h in range(h_):
                rows, full = got[b, l, h], ref_full[b, l, h]
                dist = (rows * rows).sum(1)[:, None] + (full * full).sum(1)[None, :] - 2.0 * rows @ full.T
                idx = dist.argmin(axis=1)
                tokens[b, l, h] = idx
                if len(set(idx.tolist())) != k_:
                    duplicates += 1
                max_diff = max(max_diff, float(np.abs(rows - full[idx]).max()))
    mismatched, unexplained = selection_differences(details, tokens, tie_tolerance)
    return {
        "max_abs_diff": max_diff,
        "tokens_compared": int(b_ * l_ * h_ * k_),
        "set_mismatches": int(mismatched),
        "unexplained_set_mismatches": int(unexplained),
        "duplicate_matches": int(duplicates),
        "tokens": tokens,
    }


def compare_token_indices(details, token_indices: np.ndarray, kv_tokens: np.ndarray, tie_tolerance: float) -> dict[str, Any]:
    """Exported ``token_indices`` [B, L, H, k] against the PyTorch reference's selection, as sets
    per (sample, layer, head) (top-k order may differ; a token in their symmetric difference must
    be a near-tie with the k-th importance), and position by position against ``kv_tokens``, the
    tokens the exported K/V rows were matched to (compare_kv_sets): index t must name the token
    whose key and value are row t."""
    mismatched, unexplained = selection_differences(details, token_indices, tie_tolerance)
    return {
        "set_mismatches": int(mismatched),
        "unexplained_set_mismatches": int(unexplained),
        "rows_not_matching_kv": int((token_indices != kv_tokens).sum()),
    }


def export_backbone(
    model: Backbone,
    repository: str | Path,
    name: str,
    source_weights: str,
    seed: int | None,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    parity_samples: int = 2,
    parity_seed: int = 1234,
    explain: bool = True,
) -> dict[str, Any]:
    """Write backbones/<name>/{backbone.onnx, manifest.json}; returns the manifest.

    ``explain`` adds the output ``token_indices`` (int64 [B, L, H, k], the selected tokens'
    indices, from which the daemon places saliency on the patch grid; explain.py), listed in
    the manifest's ``explanation_outputs``."""
    check_name("backbone name", name)
    config = model.config
    kv_dtype = "float16" if fp16 else "float32"
    export_model = copy.deepcopy(model).eval()
    if fp16:
        # weights and compute in float16; the resized position table is the float32 one rounded
        # once (.half() converts buffers too), never re-interpolated in float16
        export_model = export_model.half()
    wrapper = BackboneForExport(export_model, explain=explain)
    example = torch.zeros(1, config.num_channels, config.image_size, config.image_size)
    shape = kv_shape(config)
    output_shapes = {"key_states": shape, "value_states": shape}
    if explain:
        output_shapes[TOKEN_INDICES] = token_indices_shape(config)
    data = to_onnx_bytes(wrapper, (example,), ["pixel_values"], list(output_shapes), opset, output_shapes)

    parity = backbone_parity(model, data, kv_dtype, parity_samples, parity_seed, explain)

    folder = Path(repository) / "backbones" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "backbone.onnx").write_bytes(data)
    shape = kv_shape(config)
    manifest = {
        "format": BACKBONE_FORMAT,
        "name": name,
        "file": "backbone.onnx",
        "sha256": sha256_bytes(data),
        "source_weights": source_weights,
        "architecture": backbone_architecture(config, kv_dtype),
        "inputs": [
            {"name": "pixel_values", "dtype": "float32", "shape": [-1, config.num_channels, config.image_size, config.image_size]}
        ],
        "outputs": [
            {"name": "key_states", "dtype": kv_dtype, "shape": shape},
            {"name": "value_states", "dtype": kv_dtype, "shape": shape},
        ],
        **({"explanation_outputs": [{"name": TOKEN_INDICES, "dtype": "int64", "shape": token_indices_shape(config)}]}
           if explain else {}),
        "opset": int(opset),
        "parity": parity,
        "provenance": {**versions(), "seed": seed},
    }
    write_json(folder / "manifest.json", manifest)
    return manifest


def backbone_parity(
    model: Backbone, data: bytes, kv_dtype: str, samples: int, seed: int, explain: bool = False
) -> dict[str, Any]:
    c = model.config
    x = parity_inputs((samples, c.num_channels, c.image_size, c.image_size), seed)
    with torch.no_grad():
        details = model.run(x, details=True)
    names = ["key_states", "value_states"] + ([TOKEN_INDICES] if explain else [])
    k_o, v_o, *idx_o = ort_session(data).run(names, {"pixel_values": x.numpy()})
    expected = (samples, len(c.layers_used), c.num_heads, c.top_k, c.head_dim)
    if k_o.shape != expected or v_o.shape != expected or k_o.dtype != np_dtype(kv_dtype):
        raise ExportError(f"backbone.onnx gives K/V {k_o.shape} {k_o.dtype}, expected {expected} {kv_dtype}")
    if explain and (idx_o[0].shape != expected[:-1] or idx_o[0].dtype != np.int64):
        raise ExportError(f"backbone.onnx gives {TOKEN_INDICES} {idx_o[0].shape} {idx_o[0].dtype}, expected {expected[:-1]} int64")
    result = compare_kv_sets(details, k_o, v_o, TIE_TOLERANCE[kv_dtype])
    indices = compare_token_indices(details, idx_o[0], result["tokens"], TIE_TOLERANCE[kv_dtype]) if explain else None
    parity = {
        "dtype": kv_dtype,
        "max_abs_diff": result["max_abs_diff"],
        "samples": int(samples),
        "method": (
            f"onnxruntime CPU vs PyTorch float32 on {samples} seeded N(0,1) inputs (seed {seed}); selected K/V "
            "compared as sets per (sample, layer, head): each exported row is matched to the reference token "
            "it came from, max_abs_diff is over the matched K/V values, set mismatches must be importance ties"
        ),
        "set_mismatches": result["set_mismatches"],
        "unexplained_set_mismatches": result["unexplained_set_mismatches"],
        "tokens_compared": result["tokens_compared"],
        "tie_tolerance": TIE_TOLERANCE[kv_dtype],
    }
    if indices is not None:
        # token_indices as sets per (sample, layer, head) against PyTorch's selection, and
        # position by position against the token each exported K/V row was matched to
        parity[TOKEN_INDICES] = indices
    if kv_dtype == "float32":
        problems = []
        if result["max_abs_diff"] > FP32_TOLERANCE:
            problems.append(f"K/V max abs diff {result['max_abs_diff']:.3g} > {FP32_TOLERANCE}")
        if result["unexplained_set_mismatches"] or result["duplicate_matches"]:
            problems.append("selected token sets differ beyond ties: " + str({k: v for k, v in result.items() if k != "tokens"}))
        if indices is not None and (indices["unexplained_set_mismatches"] or indices["rows_not_matching_kv"]):
            problems.append(f"{TOKEN_INDICES} differ from the selected tokens: {indices}")
        if problems:
            raise ExportError("backbone parity check failed: " + "; ".join(problems))
    return parity


# --------------------------------------------------------------------------------------------
# adapter
# --------------------------------------------------------------------------------------------


def side_architecture(side: SideConfig) -> dict[str, Any]:
    return {
        "hidden_size": side.hidden_size,
        "num_layers": side.num_layers,
        "num_heads": side.num_heads,
        "head_dim": side.head_dim,
        "mlp_size": side.mlp_size,
        "patch_size": side.patch_size,
        "image_size": side.image_size,
        "num_prompts": side.num_prompts,
        "num_classes": side.num_classes,
        "layer_norm_eps": side.layer_norm_eps,
        # extra key (allowed by the format)
        "fusion_layer_norm_eps": side.fusion_layer_norm_eps,
    }


def read_backbone(repository: str | Path, name: str) -> tuple[dict[str, Any], Path]:
    folder = Path(repository) / "backbones" / name
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        raise ExportError(f"no backbone {name!r} in {repository} (missing {mpath}); export it first")
    return read_backbone_dir(folder)


def read_backbone_dir(folder: str | Path) -> tuple[dict[str, Any], Path]:
    """A backbone folder's manifest and ONNX path, the ONNX file's SHA-256 checked against the
    manifest (so what is read is exactly the artifact the daemon would serve)."""
    folder = Path(folder)
    mpath = folder / "manifest.json"
    if not folder.is_dir():
        raise ExportError(f"backbone folder {folder} does not exist")
    if not mpath.is_file():
        raise ExportError(
            f"{mpath} is missing: {folder} is not a backbone folder (expected manifest.json + backbone.onnx, "
            "as written by `python -m fptserve_models export-backbone`)"
        )
    try:
        manifest = json.loads(mpath.read_text())
    except ValueError as e:
        raise ExportError(f"{mpath} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BACKBONE_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise ExportError(f"{mpath}: format {got!r} is not {BACKBONE_FORMAT}")
    onnx_path = folder / manifest["file"]
    if not onnx_path.is_file():
        raise ExportError(f"{onnx_path} (named by {mpath}) is missing")
    digest = sha256_file(onnx_path)  # streamed: a 325 MB backbone is never held in memory to hash it
    if digest != manifest["sha256"]:
        raise ExportError(f"{onnx_path}: sha256 {digest} does not match its manifest ({manifest['sha256']})")
    return manifest, onnx_path


def check_backbone_matches(manifest: dict[str, Any], config: BackboneConfig) -> None:
    """The PyTorch backbone used for parity must be the one the manifest describes."""
    want = backbone_architecture(config, manifest["architecture"]["kv_dtype"])
    have = manifest["architecture"]
    diffs = [f"{k}: manifest {have.get(k)!r}, model {v!r}" for k, v in want.items() if have.get(k) != v]
    if diffs:
        raise ExportError(f"backbone {manifest['name']!r} does not match the given backbone model: " + "; ".join(diffs))


def check_classes(classes: Sequence[str], side: SideConfig) -> list[str]:
    classes = [str(c) for c in classes]
    if not classes:
        raise ExportError("class names are required (checkpoints do not carry them)")
    if any(not c.strip() for c in classes):
        raise ExportError(f"class names must be non-empty: {classes}")
    if len(set(classes)) != len(classes):
        raise ExportError(f"class names must be unique: {classes}")
    if len(classes) != side.num_classes:
        raise ExportError(
            f"{len(classes)} class names given ({classes}) but the side network has {side.num_classes} outputs"
        )
    return classes


def check_norm(kind: str, values: Sequence[float], channels: int) -> list[float]:
    values = [float(v) for v in values]
    if len(values) != channels:
        raise ExportError(f"{kind} needs {channels} values (one per channel), got {values}")
    if kind == "std" and any(v <= 0 for v in values):
        raise ExportError(f"std values must be > 0, got {values}")
    return values


def export_adapter(
    repository: str | Path,
    backbone_name: str,
    task: str,
    version: str,
    classes: Sequence[str],
    side: SideNetwork,
    backbone: Backbone | None,
    mean: Sequence[float],
    std: Sequence[float],
    checkpoint: str,
    checkpoint_sha256: str | None,
    seed: int | None = None,
    opset: int = DEFAULT_OPSET,
    parity_samples: int = 2,
    parity_seed: int = 4321,
    *,
    backbone_dir: str | Path | None = None,
    folder: str | Path | None = None,
    dicom: dict[str, Any] | None = None,
    parity_images: tuple[torch.Tensor, torch.Tensor] | None = None,
    provenance: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    explain: bool = True,
) -> dict[str, Any]:
    """Write tasks/<task>/<version>/{side.onnx, manifest.json}; returns the manifest.

    ``backbone`` is the float32 PyTorch backbone that backbones/<backbone_name> was exported
    from: the end-to-end parity check runs the whole classifier against it. Without it (a
    trained adapter whose backbone weights are not at hand) the end-to-end check feeds the K/V
    of backbone.onnx, the served artifact, to both side.onnx and the PyTorch side network.

    Keyword-only options (used by training): ``backbone_dir`` reads the backbone from that
    folder instead of <repository>/backbones/<backbone_name>; ``folder`` writes there instead
    of <repository>/tasks/<task>/<version>; ``dicom`` is the task's DICOM pixel policy
    (default {"voi": "auto"}); ``parity_images`` = (backbone pixels, side pixels) checks
    parity on these (real, preprocessed) images in addition to ``parity_samples`` seeded ones;
    ``provenance`` keys are added to the manifest's provenance and ``extra`` adds top-level keys;
    ``explain`` (default) adds the outputs ``token_relevance`` and ``patch_relevance`` after
    ``logits`` (SideNetwork.explain), from which the daemon builds saliency maps (explain.py),
    listed in the manifest's ``explanation_outputs``."""
    check_name("task name", task)
    check_name("version", str(version))
    version = str(version)
    if backbone_dir is not None:
        bmanifest, bpath = read_backbone_dir(backbone_dir)
        if bmanifest["name"] != backbone_name:
            raise ExportError(f"{backbone_dir}: backbone name {bmanifest['name']!r} is not {backbone_name!r}")
    else:
        bmanifest, bpath = read_backbone(repository, backbone_name)
    bconf, sconf = backbone_config_from_manifest(bmanifest), side.config
    if backbone is not None:
        check_backbone_matches(bmanifest, backbone.config)
        bconf = backbone.config
    if side.backbone_config != bconf:
        raise ExportError(
            f"the side network was built for backbone config {side.backbone_config} but the backbone is {bconf}"
        )
    classes = check_classes(classes, sconf)
    mean = check_norm("mean", mean, sconf.num_channels)
    std = check_norm("std", std, sconf.num_channels)
    kv_dtype = bmanifest["architecture"]["kv_dtype"]
    shape = kv_shape(bconf)

    side = side.eval()
    example = (
        torch.zeros(1, sconf.num_channels, sconf.image_size, sconf.image_size),
        torch.zeros(1, *shape[1:], dtype=torch_dtype(kv_dtype)),
        torch.zeros(1, *shape[1:], dtype=torch_dtype(kv_dtype)),
    )
    output_shapes = {"logits": [-1, sconf.num_classes]}
    if explain:
        output_shapes.update(explain_shapes(bconf, sconf))
    data = to_onnx_bytes(
        SideNetworkForExplain(side) if explain else side, example, ["side_pixel_values", "key_states", "value_states"],
        list(output_shapes), opset, output_shapes,
    )
    if backbone is not None:
        parity = adapter_parity(backbone, side, bpath, data, kv_dtype, parity_samples, parity_seed, explain)
    else:
        parity = adapter_parity_served_kv(bconf, side, bpath, data, kv_dtype, parity_samples, parity_seed, explain)
    if parity_images is not None:
        parity["images"] = adapter_parity_on_images(side, bpath, data, kv_dtype, *parity_images)

    folder = Path(folder) if folder is not None else Path(repository) / "tasks" / task / version
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "side.onnx").write_bytes(data)
    manifest = {
        "format": ADAPTER_FORMAT,
        "task": task,
        "version": version,
        "method": "fpt+",
        "file": "side.onnx",
        "sha256": sha256_bytes(data),
        "backbone": {"name": backbone_name, "sha256": bmanifest["sha256"]},
        "classes": classes,
        "preprocessing": {
            "backbone_size": [bconf.image_size, bconf.image_size],
            "side_size": [sconf.image_size, sconf.image_size],
            "resize": "pil-bilinear",
            "mean": mean,
            "std": std,
            "channels": "rgb",
            "dicom": dict(dicom) if dicom is not None else {"voi": "auto"},
        },
        "architecture": side_architecture(sconf),
        "inputs": [
            {"name": "side_pixel_values", "dtype": "float32", "shape": [-1, sconf.num_channels, sconf.image_size, sconf.image_size]},
            {"name": "key_states", "dtype": kv_dtype, "shape": shape},
            {"name": "value_states", "dtype": kv_dtype, "shape": shape},
        ],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": output_shapes["logits"]}],
        **({"explanation_outputs": [{"name": name, "dtype": "float32", "shape": output_shapes[name]}
                                    for name in EXPLAIN_OUTPUTS]} if explain else {}),
        "opset": int(opset),
        "parity": parity,
        "provenance": {
            **versions(),
            "checkpoint": checkpoint,
            "checkpoint_sha256": checkpoint_sha256,
            "seed": seed,
            **(provenance or {}),
        },
    }
    for key, value in (extra or {}).items():
        if key in manifest:
            raise ExportError(f"extra manifest key {key!r} would replace a standard one")
        manifest[key] = value
    write_json(folder / "manifest.json", manifest)
    return manifest


def explain_parity(side: SideNetwork, session, side_pixels: torch.Tensor, keys: np.ndarray, values: np.ndarray) -> dict[str, Any]:
    """side.onnx's explanation outputs against SideNetwork.explain on the same inputs (K/V as
    float32). Relevances are sums of products like the logits, so they are held to the logits'
    float32 tolerance, relative to their magnitude where it exceeds 1."""
    feeds = {"side_pixel_values": side_pixels.numpy(), "key_states": keys, "value_states": values}
    got = session.run(list(EXPLAIN_OUTPUTS), feeds)
    with torch.no_grad():
        _, *want = side.explain(side_pixels, torch.from_numpy(keys).float(), torch.from_numpy(values).float())
    result: dict[str, Any] = {}
    problems = []
    for name, out, ref in zip(EXPLAIN_OUTPUTS, got, want):
        ref = ref.numpy()
        diff = float(np.abs(out - ref).max())
        bound = FP32_TOLERANCE * max(1.0, float(np.abs(ref).max()))
        result[f"{name}_max_abs_diff"] = diff
        if out.shape != ref.shape or diff > bound:
            problems.append(f"{name} {out.shape} max abs diff {diff:.3g} > {bound:.3g} (PyTorch {ref.shape})")
    if problems:
        raise ExportError("adapter parity check failed: " + "; ".join(problems))
    return result


def adapter_parity(
    backbone: Backbone, side: SideNetwork, backbone_path: Path, data: bytes, kv_dtype: str, samples: int, seed: int,
    explain: bool = False,
) -> dict[str, Any]:
    b, s = backbone.config, side.config
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn(samples, b.num_channels, b.image_size, b.image_size, generator=gen)
    y = torch.randn(samples, s.num_channels, s.image_size, s.image_size, generator=gen)
    with torch.no_grad():
        details = backbone.run(x, details=True)
        reference = side(y, details.key_states, details.value_states).numpy()
        # side alone: identical K/V (rounded to the K/V dtype) into PyTorch and ONNX Runtime
        kq, vq = details.key_states.to(torch_dtype(kv_dtype)), details.value_states.to(torch_dtype(kv_dtype))
        side_ref = side(y, kq.float(), vq.float()).numpy()
    side_sess = ort_session(data)
    (side_out,) = side_sess.run(
        ["logits"], {"side_pixel_values": y.numpy(), "key_states": kq.numpy(), "value_states": vq.numpy()}
    )
    side_diff = float(np.abs(side_out - side_ref).max())
    k_o, v_o = ort_session(backbone_path).run(["key_states", "value_states"], {"pixel_values": x.numpy()})
    (e2e_out,) = side_sess.run(["logits"], {"side_pixel_values": y.numpy(), "key_states": k_o, "value_states": v_o})
    e2e_diff = float(np.abs(e2e_out - reference).max())
    # Top-k is discontinuous: where two importances are within rounding of each other, ONNX
    # Runtime and PyTorch (or one CPU and another) may keep different tokens, and the logits then
    # differ by far more than rounding. So the check compares with PyTorch on the tokens that
    # backbone.onnx selected, after checking that they differ from PyTorch's only at such ties.
    sets = compare_kv_sets(details, k_o, v_o, TIE_TOLERANCE[kv_dtype])
    index = torch.from_numpy(sets["tokens"])[..., None].expand(-1, -1, -1, -1, b.head_dim)
    with torch.no_grad():
        same_tokens = side(
            y, torch.gather(details.all_keys, 3, index), torch.gather(details.all_values, 3, index)
        ).numpy()
    same_tokens_diff = float(np.abs(e2e_out - same_tokens).max())
    parity = {
        "dtype": "float32",
        "max_abs_diff": side_diff,
        "samples": int(samples),
        "method": (
            f"logits, onnxruntime CPU vs PyTorch on {samples} seeded N(0,1) inputs (seed {seed}): max_abs_diff is "
            f"side.onnx vs the PyTorch side network on identical {kv_dtype} K/V; end_to_end is backbone.onnx + "
            "side.onnx vs the float32 PyTorch FPT+ model, and (same_tokens) vs the PyTorch model on the tokens "
            "backbone.onnx selected, which may differ from PyTorch's only at importance ties (tie_swaps)"
        ),
        "end_to_end": {
            "kv_dtype": kv_dtype,
            "max_abs_diff": e2e_diff,
            "same_tokens_max_abs_diff": same_tokens_diff,
            "tie_swaps": sets["set_mismatches"] // 2,
        },
    }
    if explain:
        parity["explain"] = {
            **explain_parity(side, side_sess, y, kq.numpy(), vq.numpy()),
            "method": "token_relevance and patch_relevance of side.onnx vs SideNetwork.explain, on the side-alone "
                      f"inputs above (identical {kv_dtype} K/V); bound {FP32_TOLERANCE} x max(1, max |reference|)",
        }
    problems = []
    if side_diff > FP32_TOLERANCE:
        problems.append(f"side logits max abs diff {side_diff:.3g} > {FP32_TOLERANCE}")
    if kv_dtype == "float32":
        if same_tokens_diff > FP32_TOLERANCE:
            problems.append(f"end-to-end logits max abs diff {same_tokens_diff:.3g} > {FP32_TOLERANCE}")
        if sets["unexplained_set_mismatches"] or sets["duplicate_matches"]:
            problems.append("selected token sets differ beyond ties: " + str({k: v for k, v in sets.items() if k != "tokens"}))
    if problems:
        raise ExportError("adapter parity check failed: " + "; ".join(problems))
    return parity


def adapter_parity_served_kv(
    bconf: BackboneConfig, side: SideNetwork, backbone_path: Path, data: bytes, kv_dtype: str, samples: int, seed: int,
    explain: bool = False,
) -> dict[str, Any]:
    """Parity without a PyTorch backbone: K/V from backbone.onnx (the served artifact) on seeded
    inputs go to side.onnx and to the PyTorch side network (as float32)."""
    s = side.config
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn(samples, bconf.num_channels, bconf.image_size, bconf.image_size, generator=gen)
    y = torch.randn(samples, s.num_channels, s.image_size, s.image_size, generator=gen)
    k_o, v_o = ort_session(backbone_path).run(["key_states", "value_states"], {"pixel_values": x.numpy()})
    with torch.no_grad():
        reference = side(y, torch.from_numpy(k_o).float(), torch.from_numpy(v_o).float()).numpy()
    session = ort_session(data)
    (out,) = session.run(["logits"], {"side_pixel_values": y.numpy(), "key_states": k_o, "value_states": v_o})
    diff = float(np.abs(out - reference).max())
    parity = {
        "dtype": "float32",
        "max_abs_diff": diff,
        "samples": int(samples),
        "method": (
            f"logits, onnxruntime CPU vs PyTorch on {samples} seeded N(0,1) inputs (seed {seed}): the {kv_dtype} K/V "
            "of backbone.onnx (the served artifact; no PyTorch backbone at hand) go to side.onnx and to the PyTorch "
            "side network"
        ),
        "end_to_end": {"kv_dtype": kv_dtype, "max_abs_diff": diff, "reference": "pytorch side network on backbone.onnx K/V"},
    }
    if explain:
        parity["explain"] = {
            **explain_parity(side, session, y, k_o, v_o),
            "method": "token_relevance and patch_relevance of side.onnx vs SideNetwork.explain, on the inputs above; "
                      f"bound {FP32_TOLERANCE} x max(1, max |reference|)",
        }
    if diff > FP32_TOLERANCE:
        raise ExportError(f"adapter parity check failed: side logits max abs diff {diff:.3g} > {FP32_TOLERANCE}")
    return parity


def adapter_parity_on_images(
    side: SideNetwork, backbone_path: Path, data: bytes, kv_dtype: str, pixels: torch.Tensor, side_pixels: torch.Tensor
) -> dict[str, Any]:
    """Parity on given preprocessed images (e.g. a trained task's validation images): K/V of
    backbone.onnx into side.onnx and into the PyTorch side network; logits must agree to 1e-4."""
    k_o, v_o = ort_session(backbone_path).run(["key_states", "value_states"], {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        reference = side(side_pixels, torch.from_numpy(k_o).float(), torch.from_numpy(v_o).float()).numpy()
    (out,) = ort_session(data).run(
        ["logits"], {"side_pixel_values": side_pixels.numpy(), "key_states": k_o, "value_states": v_o}
    )
    diff = float(np.abs(out - reference).max())
    if diff > FP32_TOLERANCE:
        raise ExportError(f"adapter parity check on images failed: logits max abs diff {diff:.3g} > {FP32_TOLERANCE}")
    return {
        "samples": int(pixels.shape[0]),
        "max_abs_diff": diff,
        "same_labels": bool((out.argmax(1) == reference.argmax(1)).all()),
        "method": "logits, side.onnx vs the PyTorch side network, both on the K/V of backbone.onnx for these images",
    }
