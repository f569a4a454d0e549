"""INT8 backbone variant (issue 18): manifest, fidelity report recomputed independently, exact
SmoothQuant migration, and fidelity under trained-ViT-like outlier channels.

What holds on any x86-64 CPU: the INT8 MatMuls are integer arithmetic (7-bit weights, so no int16
saturation on CPUs without VNNI) and exact. The float parts (LayerNorm, attention, dequantisation)
round differently across CPUs by ~1e-6 relative, which moves a few activations across a
quantization step; such flips cascade through the layers, so another CPU gets a different but
statistically equivalent INT8 noise realization. Hence: the report is compared with a
recomputation on the same machine (same kernels: equal numbers), and the fidelity thresholds are
statistical, over hundreds of labels and thousands of token sets, with margins measured against
such realizations (see test_outlier_channels). No test involves wall-clock time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from fptserve_models import quantize as Q
from fptserve_models.config import TINY_BACKBONE, TINY_SIDE
from fptserve_models.export import ExportError, export_adapter, export_backbone, ort_session, read_backbone
from fptserve_models.preprocess import load_rgb, to_tensor
from fptserve_models.weights import random_backbone, random_side, sha256_file


def quiet(_msg: str) -> None:
    pass


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


def write_images(folder: Path, count: int, seed: int) -> list[Path]:
    """PNG and JPEG files of varied sizes and kinds (grey, RGB, RGBA), smooth patterns plus noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        h, w = int(rng.integers(48, 140)), int(rng.integers(48, 140))
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        f = rng.uniform(1, 6, 3)
        base = np.stack([np.sin(f[c] * (xx + rng.uniform()) * 3 + f[(c + 1) % 3] * yy * 2) for c in range(3)], -1)
        arr = ((base * 0.5 + 0.5) * 200 + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
        kind = i % 4
        sub = folder / ("class-a" if i % 2 else "class-b")  # nested folders are read too
        sub.mkdir(exist_ok=True)
        if kind == 0:
            path = sub / f"img{i:03d}.png"
            Image.fromarray(arr[..., 0], "L").save(path)
        elif kind == 1:
            path = sub / f"img{i:03d}.jpg"
            Image.fromarray(arr, "RGB").save(path, quality=90)
        elif kind == 2:
            path = sub / f"img{i:03d}.png"
            Image.fromarray(np.dstack([arr, np.full((h, w), 200, np.uint8)]), "RGBA").save(path)
        else:
            path = sub / f"img{i:03d}.png"
            Image.fromarray(arr, "RGB").save(path)
        paths.append(path)
    (folder / ".hidden").mkdir(exist_ok=True)  # skipped
    return sorted(paths, key=lambda p: p.relative_to(folder).as_posix())


def export_side(repo, backbone_name, backbone, task, num_classes, seed, mean, std, probe=None):
    side = random_side(backbone.config, TINY_SIDE.replace(num_classes=num_classes), seed)
    if probe is not None:
        # centre the logits on probe images so that every class is predicted, as a trained
        # classifier's would be (a random head predicts one class for almost every image)
        px, spx = probe
        with torch.no_grad():
            k, v = backbone(px)
            side.side_encoder.classifier.bias -= side(spx, k, v).mean(0)
    export_adapter(repo, backbone_name, task, "1", [f"c{i}" for i in range(num_classes)], side, backbone,
                   mean, std, f"random-init(seed={seed})", None, seed=seed)
    return side


MEAN_A, STD_A = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
MEAN_B, STD_B = [0.425, 0.296, 0.197], [0.301, 0.211, 0.164]


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_backbone):
    """A repository with the tiny fp32 backbone, two adapters with different normalisations, an
    adapter of another backbone, and calibration / evaluation image folders."""
    root = tmp_path_factory.mktemp("quant-plain")
    repo = root / "repo"
    export_backbone(tiny_backbone, repo, "tiny", "random-init(seed=0)", 0)
    export_side(repo, "tiny", tiny_backbone, "alpha", 5, 11, MEAN_A, STD_A)
    export_side(repo, "tiny", tiny_backbone, "beta", 3, 12, MEAN_B, STD_B)
    other = random_backbone(TINY_BACKBONE, 5)
    export_backbone(other, repo, "other", "random-init(seed=5)", 5)
    export_side(repo, "other", other, "gamma", 2, 13, MEAN_A, STD_A)
    cal = write_images(root / "cal", 24, 1)
    ev = write_images(root / "eval", 24, 2)
    manifest = Q.quantize_backbone(repo, "tiny", calibration=root / "cal", evaluation=root / "eval", log=quiet)
    return {"root": root, "repo": repo, "cal": cal, "eval": ev, "manifest": manifest, "backbone": tiny_backbone}


# --------------------------------------------------------------------------------------------
# the variant and its manifest
# --------------------------------------------------------------------------------------------


def test_variant_folder_and_manifest(plain):
    repo, m = plain["repo"], plain["manifest"]
    fp32, fp32_path = read_backbone(repo, "tiny")
    folder = repo / "backbones" / "tiny-int8"
    assert json.loads((folder / "manifest.json").read_text()) == m
    assert (folder / "manifest.json").read_text().endswith("}\n")
    assert sha256_file(folder / "backbone.onnx") == m["sha256"]
    read_backbone(repo, "tiny-int8")  # the exporter's reader accepts it (digest checked)
    assert not [p.name for p in (repo / "backbones").iterdir() if p.name.startswith(".")]  # no temp folder left

    assert m["format"] == "fptserve.backbone/v1"
    assert m["name"] == "tiny-int8" and m["file"] == "backbone.onnx"
    for key in ("architecture", "inputs", "outputs", "explanation_outputs", "source_weights", "opset"):
        assert m[key] == fp32[key], key
    assert m["architecture"]["kv_dtype"] == "float32"
    assert m["precision"] == "int8"
    assert m["quantized_from"] == {"name": "tiny", "sha256": fp32["sha256"]}
    q = m["quantization"]
    assert q["method"] == Q.DEFAULT_METHOD
    assert q["per_channel"] is True
    assert "int8" in q["weight_type"] and "uint8" in q["activation_type"]
    assert q["batch_invariant"] is True
    assert q["kept_float"] and all(set(k) == {"nodes", "why"} for k in q["kept_float"])
    assert any("Softmax" in k["nodes"] for k in q["kept_float"])
    assert any("TopK" in k["nodes"] for k in q["kept_float"])
    assert q["smoothing"]["alpha"] == Q.DEFAULT_ALPHA
    assert set(m["provenance"]) >= {"exporter", "torch", "onnx", "onnxruntime", "seed"}

    # the calibration digest: the preprocessed tensors of the files in relative-path order, under the
    # report's normalisation (the first adapter's, alpha/1) and then every other adapter's (beta/1)
    cal = q["calibration"]
    assert cal["images"] == len(plain["cal"]) and cal["synthetic"] is False
    assert cal["normalizations"] == [{"mean": MEAN_A, "std": STD_A}, {"mean": MEAN_B, "std": STD_B}]
    images = [load_rgb(p) for p in plain["cal"]]
    px = np.stack([to_tensor(img, [64, 64], mean, std) for mean, std in ((MEAN_A, STD_A), (MEAN_B, STD_B)) for img in images])
    h = hashlib.sha256(f"float32{list(px.shape)}".encode())
    h.update(np.ascontiguousarray(px, np.float32).tobytes())
    assert cal["sha256"] == h.hexdigest()
    files = hashlib.sha256()
    for p in plain["cal"]:
        files.update(f"{p.relative_to(plain['root'] / 'cal').as_posix()}\t{sha256_file(p)}\n".encode())
    assert cal["files_sha256"] == files.hexdigest()

    # the graph: QDQ around every weight MatMul (int8 weights), float32 K/V of the declared shapes
    model = onnx.load(str(folder / "backbone.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert {"QuantizeLinear", "DequantizeLinear", "Softmax", "TopK", "LayerNormalization"} <= set(ops)
    int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8) == 33 and q["quantized"].startswith("33 of 33")
    assert all(np.abs(onnx.numpy_helper.to_array(t)).max() <= 64 for t in int8)  # 7-bit range
    assert not any(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 and t.dims[0] >= 32 and t.dims[1] >= 32
                   for t in model.graph.initializer)  # no float weight matrix left
    assert [o.name for o in model.graph.output] == ["key_states", "value_states", "token_indices"]
    k, v, idx = ort_session(folder / "backbone.onnx").run(None, {"pixel_values": px[:3]})
    expected = (3, *m["outputs"][0]["shape"][1:])
    assert k.shape == v.shape == expected and k.dtype == v.dtype == np.float32
    assert idx.shape == expected[:-1] and idx.dtype == np.int64  # the explanation output is kept


def test_adapters_covered_and_skipped(plain):
    fid = plain["manifest"]["fidelity"]
    assert [(a["task"], a["version"]) for a in fid["adapters"]] == [("alpha", "1"), ("beta", "1")]  # not gamma (other backbone)
    assert fid["adapters"][1]["normalization"] == {"mean": MEAN_B, "std": STD_B}
    assert fid["normalization"]["source"] == "adapter alpha/1"
    assert fid["splits"]["calibration"]["synthetic"] is False
    assert fid["splits"]["evaluation"]["images"] == len(plain["eval"])


# --------------------------------------------------------------------------------------------
# the report recomputed independently
# --------------------------------------------------------------------------------------------


def session_with_indices(path: Path):
    """ONNX Runtime session on the file with every TopK's indices as extra outputs (graph order =
    the K/V layer axis order; a float16 graph's TopK too: int64 indices either way)."""
    model = onnx.load(str(path))
    names = [n.output[1] for n in model.graph.node if n.op_type == "TopK"]
    for name in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
    return ort_session(model.SerializeToString()), names


def run_with_indices(path: Path, px: np.ndarray):
    """One image per run, as the report runs them."""
    sess, names = session_with_indices(path)
    outs = [sess.run(["key_states", "value_states", *names], {"pixel_values": px[i:i + 1]}) for i in range(len(px))]
    k = np.concatenate([o[0] for o in outs])
    v = np.concatenate([o[1] for o in outs])
    return k, v, np.concatenate([np.stack(o[2:], axis=1) for o in outs])


def recompute(fp32_path, int8_path, px):
    k0, v0, i0 = run_with_indices(fp32_path, px)
    k1, v1, i1 = run_with_indices(int8_path, px)
    jac, swapped, pairs = [], [], []
    for b in range(i0.shape[0]):
        for l in range(i0.shape[1]):
            for h in range(i0.shape[2]):
                a, c = list(i0[b, l, h]), list(i1[b, l, h])
                common = set(a) & set(c)
                jac.append(len(common) / len(set(a) | set(c)))
                swapped.append(len(a) - len(common))
                for t in sorted(common):
                    pairs.append((k0[b, l, h, a.index(t)], k1[b, l, h, c.index(t)], v0[b, l, h, a.index(t)], v1[b, l, h, c.index(t)]))
    rk, gk, rv, gv = (np.array([p[i] for p in pairs], dtype=np.float64) for i in range(4))
    return {
        "jaccard_min": min(jac), "jaccard_mean": float(np.mean(jac)),
        "identical_fraction": float(np.mean(np.array(swapped) == 0)), "max_tokens_swapped": max(swapped),
        "keys_max": float(np.abs(rk - gk).max()), "keys_mean": float(np.abs(rk - gk).mean()),
        "keys_rel": float(np.linalg.norm(rk - gk) / np.linalg.norm(rk)),
        "values_max": float(np.abs(rv - gv).max()), "values_rel": float(np.linalg.norm(rv - gv) / np.linalg.norm(rv)),
        "rows": len(pairs), "served": float(max(np.abs(k0 - k1).max(), np.abs(v0 - v1).max())),
        "kv": ((k0, v0), (k1, v1)), "indices": i0,
    }


def close(a, b):
    return a == pytest.approx(b, rel=1e-5, abs=1e-7)


@pytest.fixture(scope="module")
def half(plain, tmp_path_factory):
    """The float16 variant of the plain repository's backbone, in a copy of that repository."""
    repo = tmp_path_factory.mktemp("quant-half") / "repo"
    shutil.copytree(plain["repo"], repo)
    shutil.rmtree(repo / "backbones" / "tiny-int8")
    root = plain["root"]
    manifest = Q.quantize_backbone(repo, "tiny", calibration=root / "cal", evaluation=root / "eval",
                                   precision="float16", log=quiet)
    return {**plain, "repo": repo, "manifest": manifest}


def test_float16_variant_keeps_the_float32_interface(half):
    repo, m = half["repo"], half["manifest"]
    fp32, _ = read_backbone(repo, "tiny")
    folder = repo / "backbones" / "tiny-fp16"
    assert json.loads((folder / "manifest.json").read_text()) == m
    read_backbone(repo, "tiny-fp16")  # digest checked
    assert m["name"] == "tiny-fp16" and m["precision"] == "float16"
    assert m["quantized_from"] == {"name": "tiny", "sha256": fp32["sha256"]}
    for key in ("architecture", "inputs", "outputs", "explanation_outputs", "source_weights", "opset"):
        assert m[key] == fp32[key], key  # float32 pixels in, float32 K/V out: the adapters' interface
    q = m["quantization"]
    assert q["method"] == "float16" and q["kept_float"][0]["nodes"] == "TopK"
    assert q["fidelity_images"]["images"] == len(half["cal"])

    # the graph: every weight matrix float16, none float32; float32 at both ends
    model = onnx.load(str(folder / "backbone.onnx"))
    weights = [t for t in model.graph.initializer if len(t.dims) == 2 and t.dims[0] >= 32 and t.dims[1] >= 32]
    assert len(weights) >= 33 and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    elem = onnx.TensorProto.FLOAT
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [elem]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [elem, elem, onnx.TensorProto.INT64]
    assert len(Q.selection_nodes(model.graph)) == 3  # the token selection is found through the Casts

    # float16 rounding only: the unit roundoff is 2^-11 (4.9e-4); the K/V of the tokens both
    # select are a few roundings deep per layer, so their relative error stays within ~10 of them
    s = m["fidelity"]["summary"]
    assert 0 < s["kv_max_relative_error"] <= 5e-3, s
    assert s["token_sets_jaccard_mean"] >= 0.95, s
    assert s["batch_consistency_max_abs_diff"] is not None


@pytest.mark.parametrize("variant", ["int8", "fp16"])
@pytest.mark.parametrize("split", ["calibration", "evaluation"])
def test_report_matches_independent_recomputation(plain, half, split, variant):
    repo, m = (plain["repo"], plain["manifest"]) if variant == "int8" else (half["repo"], half["manifest"])
    fp32_path = repo / "backbones" / "tiny" / "backbone.onnx"
    int8_path = repo / "backbones" / f"tiny-{variant}" / "backbone.onnx"
    files = plain["cal"] if split == "calibration" else plain["eval"]
    images = [load_rgb(p) for p in files]
    px = np.stack([to_tensor(img, [64, 64], MEAN_A, STD_A) for img in images])
    got = recompute(fp32_path, int8_path, px)
    rep = m["fidelity"]["splits"][split]
    ts, kv = rep["token_sets"], rep["kv"]
    assert ts["sets_compared"] == px.shape[0] * 3 * 4
    assert close(ts["jaccard_min"], got["jaccard_min"]) and close(ts["jaccard_mean"], got["jaccard_mean"])
    assert close(ts["identical_fraction"], got["identical_fraction"])
    assert ts["max_tokens_swapped"] == got["max_tokens_swapped"]
    assert kv["rows_compared"] == got["rows"]
    assert close(kv["keys"]["max_abs_diff"], got["keys_max"]) and close(kv["keys"]["mean_abs_diff"], got["keys_mean"])
    assert close(kv["keys"]["relative_error"], got["keys_rel"])
    assert close(kv["values"]["max_abs_diff"], got["values_max"]) and close(kv["values"]["relative_error"], got["values_rel"])
    assert close(kv["served_max_abs_diff"], got["served"])

    # the fp32 index outputs are the PyTorch model's top-k sets (where no near-tie can swap them)
    with torch.no_grad():
        details = plain["backbone"].run(torch.from_numpy(px), details=True)
    imp = details.importance.double().numpy()
    ranked = np.sort(imp, axis=-1)[..., ::-1]
    clear = (ranked[..., 12] - ranked[..., 13]) > 1e-5 * ranked[..., 12]
    torch_sets = np.sort(details.indices.numpy(), -1)
    onnx_sets = np.sort(got["indices"], -1)
    assert clear.mean() > 0.9
    assert (torch_sets == onnx_sets).all(-1)[clear].all()

    # adapters: each with its own normalisation, on fp32 vs int8 K/V
    for entry in m["fidelity"]["adapters"]:
        folder = repo / "tasks" / entry["task"] / entry["version"]
        manifest = json.loads((folder / "manifest.json").read_text())
        pre = manifest["preprocessing"]
        bpx = np.stack([to_tensor(img, pre["backbone_size"], pre["mean"], pre["std"]) for img in images])
        spx = np.stack([to_tensor(img, pre["side_size"], pre["mean"], pre["std"]) for img in images])
        (k0, v0), (k1, v1) = recompute(fp32_path, int8_path, bpx)["kv"]
        side = ort_session(folder / "side.onnx")
        l0 = side.run(["logits"], {"side_pixel_values": spx, "key_states": k0, "value_states": v0})[0].astype(np.float64)
        l1 = side.run(["logits"], {"side_pixel_values": spx, "key_states": k1, "value_states": v1})[0].astype(np.float64)
        p0 = np.exp(l0 - l0.max(1, keepdims=True))
        p0 /= p0.sum(1, keepdims=True)
        p1 = np.exp(l1 - l1.max(1, keepdims=True))
        p1 /= p1.sum(1, keepdims=True)
        r = entry[split]
        assert r["images"] == len(images)
        assert close(r["label_agreement"], float((p0.argmax(1) == p1.argmax(1)).mean()))
        assert r["labels_changed"] == int((p0.argmax(1) != p1.argmax(1)).sum())
        assert close(r["max_abs_prob_change"], float(np.abs(p1 - p0).max()))
        assert close(r["mean_abs_prob_change"], float(np.abs(p1 - p0).mean()))
        assert close(r["max_abs_logit_change"], float(np.abs(l1 - l0).max()))


def test_refusals_and_cli(plain, tmp_path, capsys):
    repo = plain["repo"]
    refused = (ExportError, Q.QuantizeError)
    with pytest.raises(refused, match="already exists"):
        Q.quantize_backbone(repo, "tiny", calibration_images=2, evaluation_images=2, log=quiet)
    with pytest.raises(refused, match="not a float32 backbone"):
        Q.quantize_backbone(repo, "tiny-int8", calibration_images=2, evaluation_images=2, log=quiet)
    with pytest.raises(ExportError, match="no backbone"):
        Q.quantize_backbone(repo, "missing", log=quiet)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.txt").write_text("x")
    with pytest.raises(refused, match="not a PNG or JPEG"):
        Q.quantize_backbone(repo, "tiny", "tiny-x", calibration=bad, log=quiet)
    assert not (repo / "backbones" / "tiny-x").exists()

    # register() adds the subcommand to any argparse subparsers object
    parser = argparse.ArgumentParser()
    Q.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["quantize-backbone", "--out", str(repo), "--backbone", "tiny"])
    assert args.func is Q.cmd_quantize_backbone and args.name is None and args.method == Q.DEFAULT_METHOD

    # the module's entry point: synthetic images, another adapters repository, explicit normalisation
    code = Q.main(["--out", str(repo), "--backbone", "tiny", "--name", "tiny-dyn", "--method", "dynamic",
                   "--calibration-images", "3", "--evaluation-images", "2", "--seed", "4",
                   "--adapters-repo", str(tmp_path / "none"), "--mean", "0.4,0.4,0.4", "--std", "0.2,0.2,0.2"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["backbone"] == "tiny-dyn" and out["method"] == "dynamic"
    m = json.loads((repo / "backbones" / "tiny-dyn" / "manifest.json").read_text())
    assert m["quantization"]["calibration"] is None  # dynamic: nothing calibrated
    assert m["quantization"]["batch_invariant"] is False and m["quantization"]["fidelity_images"]["images"] == 3
    fid = m["fidelity"]
    assert fid["adapters"] == [] and fid["normalization"]["source"] == "--mean/--std"
    assert fid["splits"]["calibration"]["synthetic"] and "synthetic(seed=4)" in fid["splits"]["calibration"]["source"]
    assert fid["splits"]["evaluation"]["images"] == 2
    assert Q.main(["--out", str(repo), "--backbone", "tiny", "--name", "tiny-dyn"]) == 2
    assert "already exists" in capsys.readouterr().err
    # through the handler cli.py will call, a refusal is an ExportError (cli: one message, status 2)
    args = parser.parse_args(["quantize-backbone", "--out", str(repo), "--backbone", "tiny", "--name", "tiny-dyn"])
    with pytest.raises(ExportError, match="already exists"):
        args.func(args)


def test_import_is_light():
    """cli.py imports torch-heavy modules inside its commands so that --help is instant; importing
    this module for register() must not pull in torch."""
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, %r); import fptserve_models.quantize as q, argparse; "
            "q.register(argparse.ArgumentParser().add_subparsers()); print('torch' in sys.modules)")
    src = str(Path(Q.__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code % src], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_synthetic_images_are_seeded_and_structured():
    a = Q.synthetic_images("calibration", 4, 3, 64)
    b = Q.synthetic_images("calibration", 4, 3, 64)
    c = Q.synthetic_images("calibration", 4, 4, 64)
    arrays = [np.asarray(i) for i in a.images]
    assert all((x == np.asarray(y)).all() for x, y in zip(arrays, b.images))
    assert any(x.shape != np.asarray(y).shape or (x != np.asarray(y)).any() for x, y in zip(arrays, c.images))
    for x in arrays:
        assert x.shape[0] >= 64 and x.shape[1] >= 64 and x.dtype == np.uint8
        # smooth structure: neighbouring pixels are far more alike than random pairs
        d_near = np.abs(np.diff(x.astype(float), axis=1)).mean()
        d_far = np.abs(x.astype(float) - np.roll(x, x.shape[1] // 2, axis=1)).mean()
        assert d_near < 0.5 * d_far


# --------------------------------------------------------------------------------------------
# outlier channels
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def add_outlier_channels(model, seed: int, channels: int = 2):
    """Trained-ViT-like outliers: in every LayerNorm feeding Q/K/V or the MLP, ``channels`` channels
    get gain and bias x U(20, 50); the matching input rows of the following Linear layers are
    divided by that factor / U(1, 2) (so those channels also carry 1-2x their former weight)."""
    gen = torch.Generator().manual_seed(seed)
    for layer in model.encoder.layer:
        sa = layer.attention.attention
        for ln, linears in ((layer.layernorm_before, [sa.query, sa.key, sa.value]),
                            (layer.layernorm_after, [layer.intermediate.dense])):
            idx = torch.randperm(ln.weight.numel(), generator=gen)[:channels]
            f = 20 + 30 * torch.rand(channels, generator=gen)
            u = 1 + torch.rand(channels, generator=gen)
            ln.weight[idx] *= f
            ln.bias[idx] *= f
            for lin in linears:
                lin.weight[:, idx] /= f / u
    return model


@pytest.fixture(scope="module")
def outliers(tmp_path_factory):
    repo = tmp_path_factory.mktemp("quant-outliers") / "repo"
    model = add_outlier_channels(random_backbone(TINY_BACKBONE, 0), seed=7)
    export_backbone(model, repo, "tiny-outlier", "random-init(seed=0)+outliers(seed=7)", 0)  # parity-checked
    probe = Q.synthetic_images("probe", 32, 99, 64).images
    probe_px = (torch.from_numpy(Q.preprocess_set(probe, [64, 64], MEAN_A, STD_A)),
                torch.from_numpy(Q.preprocess_set(probe, [32, 32], MEAN_A, STD_A)))
    for task, classes, seed in (("five", 5, 21), ("three", 3, 22), ("two", 2, 23)):
        export_side(repo, "tiny-outlier", model, task, classes, seed, MEAN_A, STD_A, probe=probe_px)
    # 96 calibration + 96 evaluation synthetic images (seeds 0 and 1): 192 labels per adapter
    naive = Q.quantize_backbone(repo, "tiny-outlier", "tiny-outlier-naive", method="dynamic",
                                calibration_images=96, evaluation_images=96, log=quiet)
    shipped = Q.quantize_backbone(repo, "tiny-outlier", calibration_images=96, evaluation_images=96, log=quiet)
    return {"repo": repo, "model": model, "naive": naive, "shipped": shipped}


def test_outlier_backbone_is_sensible(outliers):
    """The outlier model is a working model, not a broken one: its LayerNorm outputs carry
    20-50x channels, yet its token selection is well separated and its adapters spread their
    predictions over every class without saturating."""
    repo, model = outliers["repo"], outliers["model"]
    _, path = read_backbone(repo, "tiny-outlier")
    graph = onnx.load(str(path))
    ln_out = [ln.output[0] for ln, _ in Q.layernorm_groups(graph.graph)]
    assert len(ln_out) == 11
    images = Q.synthetic_images("calibration", 16, 0, 64).images
    px = Q.preprocess_set(images, [64, 64], MEAN_A, STD_A)
    ranges = Q.activation_ranges(graph, ln_out, px, batch=16)
    for name in ln_out:
        lo, hi = ranges[name]
        amax = np.maximum(np.abs(lo), np.abs(hi))
        assert amax.max() / np.median(amax) > 10, name  # outlier channels present
    with torch.no_grad():
        details = model.run(torch.from_numpy(px), details=True)
    ranked = details.importance.sort(dim=-1, descending=True).values
    gap = (ranked[..., 12] - ranked[..., 13]) / ranked[..., 12]
    assert float((gap > 1e-4).float().mean()) > 0.9  # selection is not a pile of ties
    # attention is not uniform: the selected tokens hold more than their share (13/65 = 0.2) of
    # the importance, as in the model without outliers (0.35 on average there, 0.36 here)
    top_mass = ranked[..., :13].sum(-1)
    assert float(top_mass.mean()) > 0.3 and float(top_mass.min()) > 0.2
    assert 0.5 < float(details.key_states.std()) < 2 and 0.5 < float(details.value_states.std()) < 2
    fid = outliers["naive"]["fidelity"]
    for entry in fid["adapters"]:
        folder = repo / "tasks" / entry["task"] / "1"
        side = ort_session(folder / "side.onnx")
        k, v = ort_session(path).run(["key_states", "value_states"], {"pixel_values": px})
        spx = Q.preprocess_set(images, [32, 32], MEAN_A, STD_A)
        p = Q.softmax64(side.run(["logits"], {"side_pixel_values": spx, "key_states": k, "value_states": v})[0])
        counts = np.bincount(p.argmax(1), minlength=p.shape[1])
        assert (counts > 0).sum() >= min(p.shape[1], 2) and counts.max() <= 0.8 * len(p), (entry["task"], counts)
        assert p.max(1).mean() < 0.98


def test_smoothing_is_exact(outliers):
    """The migration multiplies by powers of two: the smoothed float model gives bit-identical
    K/V, while the largest LayerNorm channel comes much closer to the median one."""
    _, path = read_backbone(outliers["repo"], "tiny-outlier")
    model = onnx.load(str(path))
    images = Q.synthetic_images("calibration", 16, 0, 64).images
    px = Q.preprocess_set(images, [64, 64], MEAN_A, STD_A)
    names = [ln.output[0] for ln, _ in Q.layernorm_groups(model.graph)]
    ranges = Q.activation_ranges(model, names, px, batch=16)
    smoothed, info, factors = Q.smooth_layernorms(model, ranges)
    assert info["layernorms"] == info["layernorms_eligible"] == 11 and set(factors) == set(names)
    # the smoothed LayerNorm outputs are exactly the old ones / s (what static calibration relies on)
    after = Q.activation_ranges(smoothed, names, px, batch=16)
    for name in names:
        assert np.array_equal(after[name][0], ranges[name][0] / factors[name])
        assert np.array_equal(after[name][1], ranges[name][1] / factors[name])
    assert info["max_channel_ratio_before"] > 20 and info["max_channel_ratio_after"] < 4
    a = ort_session(model.SerializeToString()).run(None, {"pixel_values": px})
    b = ort_session(smoothed.SerializeToString()).run(None, {"pixel_values": px})
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for ln, _ in Q.layernorm_groups(smoothed.graph):
        new = onnx.numpy_helper.to_array(next(t for t in smoothed.graph.initializer if t.name == ln.input[1]))
        ratio = init[ln.input[1]] / new
        assert np.array_equal(np.exp2(np.round(np.log2(ratio))), ratio)  # powers of two


def test_outlier_channels(outliers):
    """Naive per-tensor INT8 (ONNX Runtime dynamic quantization) against the shipped method on
    the outlier backbone, 192 images per adapter.

    Measured on this fixture and on three other seeds of the outlier channels, backbone and images
    (Xeon with AMX): naive K/V relative error 0.20-0.29, token-set Jaccard mean 0.61-0.69, labels
    changed 28-51 of 576 (worst adapter 19 of 192), max |prob change| 0.16-0.32; shipped
    0.025-0.028, 0.945-0.950, 7-13 of 576 (worst adapter 7 of 192), 0.057-0.091. Asserted, with
    margins of several flips. Integer MatMuls are exact on every x86-64 CPU, but another CPU's
    float rounding moves some activations across a quantization step, and such flips cascade: a
    different, statistically equivalent noise realization. Emulated by +-1 ulp on every weight (five
    realizations of this fixture): naive 26-28 labels changed, shipped 7-8, the other figures equal
    to 3 digits. Asserted:
      shipped: every adapter agrees on >= 94% of labels (<= 11 of 192 changed), >= 97% over all
               576, K/V relative error <= 0.06, mean Jaccard >= 0.88, batch-invariant;
      naive:   K/V relative error >= 4x the shipped one, mean Jaccard at least 0.15 lower, mean
               |prob change| >= 2x, and at least twice as many labels changed (and >= 12 more).
    The tiny model (width 32) with centred random adapters is a harsh probe: even INT8 without the
    outliers changes ~1% of its labels, whose margins are small by construction.
    """
    naive, shipped = outliers["naive"]["fidelity"], outliers["shipped"]["fidelity"]
    ns, ss = naive["summary"], shipped["summary"]
    assert ss["images"] == ns["images"] == 192 and ss["adapters"] == ns["adapters"] == 3
    for entry in shipped["adapters"]:
        assert entry["all"]["images"] == 192
        assert entry["all"]["label_agreement"] >= 0.94, entry
    shipped_changed = sum(a["all"]["labels_changed"] for a in shipped["adapters"])
    assert shipped_changed <= 0.03 * 576, shipped_changed
    assert ss["kv_max_relative_error"] <= 0.06
    assert ss["token_sets_jaccard_mean"] >= 0.88
    assert ss["batch_consistency_max_abs_diff"] <= 1e-5  # measured: exactly 0
    assert outliers["shipped"]["quantization"]["batch_invariant"] is True

    assert ns["kv_max_relative_error"] >= 4 * ss["kv_max_relative_error"]
    assert ns["token_sets_jaccard_mean"] <= ss["token_sets_jaccard_mean"] - 0.15
    mean_dp = [np.mean([a["all"]["mean_abs_prob_change"] for a in f["adapters"]]) for f in (naive, shipped)]
    assert mean_dp[0] >= 2 * mean_dp[1], mean_dp
    naive_changed = sum(a["all"]["labels_changed"] for a in naive["adapters"])
    assert naive_changed >= 2 * shipped_changed and naive_changed >= shipped_changed + 12, (naive_changed, shipped_changed)
    assert ns["min_label_agreement"] < ss["min_label_agreement"]
    # and dynamic quantization's per-tensor ranges span the batch: an image's K/V depend on its batch-mates
    assert ns["batch_consistency_max_abs_diff"] > 1e-3


def test_fused_attention_rewrite_keeps_outputs(plain):
    """The optional MultiHeadAttention rewrite (layers before the first used one) is float32 and
    leaves the K/V as they were, up to rounding; the used layers keep their explicit attention."""
    _, path = read_backbone(plain["repo"], "tiny")
    model = onnx.load(str(path))
    fused, count = Q.fuse_unused_attention(model, 4)
    assert count == 3  # layers 0, 1, 2 (3, 4, 5 are used)
    assert len(Q.selection_nodes(fused.graph)) == 3
    px = Q.preprocess_set(Q.synthetic_images("x", 4, 8, 64).images, [64, 64], MEAN_A, STD_A)
    a = ort_session(path).run(None, {"pixel_values": px})
    b = ort_session(fused.SerializeToString()).run(None, {"pixel_values": px})
    assert len(a) == len(b) == 3
    for x, y in zip(a[:2], b[:2]):
        assert np.abs(x - y).max() < 1e-4
    assert (np.sort(a[2], -1) == np.sort(b[2], -1)).all()  # token_indices: the same sets
