"""ONNX Runtime vs PyTorch parity, graph interface, determinism, full-size export."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from fptserve_models.config import PAPER_BACKBONE, PAPER_SIDE, TINY_BACKBONE, TINY_SIDE
from fptserve_models.export import export_adapter, export_backbone, ort_session
from fptserve_models.model import SELECTION_MARGIN, FPTPlus, selection_margin
from fptserve_models.weights import random_backbone, random_side

CLASSES5 = ["none", "mild", "moderate", "severe", "proliferative"]
MEAN, STD = [0.425, 0.296, 0.197], [0.301, 0.211, 0.164]


def graph_io(path):
    m = onnx.load(str(path))
    def desc(v):
        t = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        return v.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, dims
    return m, [desc(v) for v in m.graph.input], [desc(v) for v in m.graph.output]


def end_to_end(repo, backbone_name, task, version, x, y):
    b = ort_session(Path(repo) / "backbones" / backbone_name / "backbone.onnx")
    s = ort_session(Path(repo) / "tasks" / task / version / "side.onnx")
    k, v = b.run(["key_states", "value_states"], {"pixel_values": x})
    return s.run(["logits"], {"side_pixel_values": y, "key_states": k, "value_states": v})[0], k


def test_tiny_backbone_graph_interface(tiny_repo):
    c = TINY_BACKBONE
    m, inputs, outputs = graph_io(tiny_repo / "backbones" / "tiny" / "backbone.onnx")
    assert inputs == [("pixel_values", "float32", ["batch", 3, 64, 64])]
    kv = ["batch", 3, 4, 13, 8]
    assert outputs == [("key_states", "float32", kv), ("value_states", "float32", kv), ("token_indices", "int64", kv[:-1])]
    ops = {n.op_type for n in m.graph.node}
    assert "Resize" not in ops  # position table interpolated at build time, a constant
    assert "TopK" in ops and "GatherElements" in ops
    # pruned after the last layer used: its attention output / MLP and the later layers are absent
    names = " ".join(i.name for i in m.graph.initializer) + " ".join(n.name for n in m.graph.node)
    assert f"layer.{c.last_layer_used}.intermediate" not in names and f"layer.{c.last_layer_used}/intermediate" not in names
    assert f"layer.{c.last_layer_used - 1}.intermediate" in names or f"layer.{c.last_layer_used - 1}/intermediate" in names
    assert not list(tiny_repo.rglob("*.data"))


@pytest.mark.parametrize("batch", [1, 3])
def test_tiny_end_to_end_parity_fp32(tmp_path, tiny_backbone, batch):
    side = random_side(TINY_BACKBONE, TINY_SIDE, 11)
    export_backbone(tiny_backbone, tmp_path, "tiny", "random-init(seed=0)", 0)
    man = export_adapter(tmp_path, "tiny", "dr-grade", "1", CLASSES5, side, tiny_backbone, MEAN, STD, "random-init(seed=11)", None, 11)
    assert man["parity"]["max_abs_diff"] <= 1e-4 and man["parity"]["end_to_end"]["same_tokens_max_abs_diff"] <= 1e-4
    assert man["parity"]["end_to_end"]["tie_swaps"] == 0  # tiny parity inputs: selection margin 2.8e-4, 4.6x SELECTION_MARGIN
    assert man["parity"]["end_to_end"]["max_abs_diff"] <= 1e-4
    _, inputs, outputs = graph_io(tmp_path / "tasks" / "dr-grade" / "1" / "side.onnx")
    kv = ["batch", 3, 4, 13, 8]
    assert inputs == [("side_pixel_values", "float32", ["batch", 3, 32, 32]), ("key_states", "float32", kv), ("value_states", "float32", kv)]
    assert outputs == [("logits", "float32", ["batch", 5]), ("token_relevance", "float32", ["batch", 5, 3, 4, 13]),
                       ("patch_relevance", "float32", ["batch", 5, 16])]
    assert man["parity"]["explain"]["token_relevance_max_abs_diff"] <= 1e-4
    # fresh inputs, other batch sizes than the export's
    g = torch.Generator().manual_seed(99 + batch)
    x, y = torch.randn(batch, 3, 64, 64, generator=g), torch.randn(batch, 3, 32, 32, generator=g)
    got, _ = end_to_end(tmp_path, "tiny", "dr-grade", "1", x.numpy(), y.numpy())
    with torch.no_grad():
        want = FPTPlus(tiny_backbone, side)(x, y).numpy()
        # no near-tie in token selection that another CPU's rounding could break the other way
        assert selection_margin(tiny_backbone.run(x, details=True).importance, TINY_BACKBONE.top_k) >= SELECTION_MARGIN
    assert got.shape == (batch, 5)
    assert np.abs(got - want).max() <= 1e-4
    assert np.abs(want).max() > 0.5  # logits are not trivially zero


def test_tiny_fp16_backbone(tmp_path, tiny_backbone):
    side = random_side(TINY_BACKBONE, TINY_SIDE, 12)
    bm = export_backbone(tiny_backbone, tmp_path, "tiny16", "random-init(seed=0)", 0, fp16=True)
    assert bm["architecture"]["kv_dtype"] == "float16" and bm["parity"]["dtype"] == "float16"
    assert [o["dtype"] for o in bm["outputs"]] == ["float16", "float16"]
    assert [o["dtype"] for o in bm["explanation_outputs"]] == ["int64"]
    assert bm["parity"]["max_abs_diff"] < 0.05
    am = export_adapter(tmp_path, "tiny16", "t", "1", CLASSES5, side, tiny_backbone, MEAN, STD, "random-init(seed=12)", None, 12)
    _, inputs, _ = graph_io(tmp_path / "tasks" / "t" / "1" / "side.onnx")
    assert [i[1] for i in inputs] == ["float32", "float16", "float16"]
    assert am["parity"]["max_abs_diff"] <= 1e-4  # side network on identical fp16 K/V
    e2e = am["parity"]["end_to_end"]
    assert e2e["kv_dtype"] == "float16" and 0 < e2e["max_abs_diff"] < 0.1


def test_export_is_deterministic(tmp_path, tiny_backbone):
    for fp16 in (False, True):
        for d in ("a", "b"):
            # a freshly built model from the same seed each time
            b = random_backbone(TINY_BACKBONE, 0)
            export_backbone(b, tmp_path / d, "tiny", "random-init(seed=0)", 0, fp16=fp16)
            export_adapter(tmp_path / d, "tiny", "x", "1", ["a", "b"], random_side(TINY_BACKBONE, TINY_SIDE.replace(num_classes=2), 5),
                           b, MEAN, STD, "random-init(seed=5)", None, 5)
        files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
        assert len(files) == 4
        for f in files:
            assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
        man = json.loads((tmp_path / "a" / "backbones" / "tiny" / "manifest.json").read_text())
        assert man["sha256"] == __import__("hashlib").sha256((tmp_path / "a" / "backbones" / "tiny" / "backbone.onnx").read_bytes()).hexdigest()


def test_full_size_default_config_parity(tmp_path):
    """ONE export of the paper's configuration: ViT-B/16 at 512 (from 384), layers 6..11,
    k=205, side 6x96 at 128, 16 prompts."""
    backbone = random_backbone(PAPER_BACKBONE, 0)
    bm = export_backbone(backbone, tmp_path, "vit-b16-512", "random-init(seed=0)", 0, parity_samples=1)
    a = bm["architecture"]
    assert (a["num_tokens"], a["top_k"], a["layers_used"], a["head_dim"]) == (1025, 205, [6, 7, 8, 9, 10, 11], 64)
    assert bm["outputs"][0]["shape"] == [-1, 6, 12, 205, 64]
    assert bm["parity"]["max_abs_diff"] <= 1e-4 and bm["parity"]["unexplained_set_mismatches"] == 0
    size = (tmp_path / "backbones" / "vit-b16-512" / "backbone.onnx").stat().st_size
    assert 300e6 < size < 350e6  # pruned: layers 0..10 + layer 11's Q/K/V
    side = random_side(PAPER_BACKBONE, PAPER_SIDE, 1)
    assert 0.85e6 < sum(p.numel() for p in side.parameters()) < 0.95e6  # ~0.9 M (paper)
    am = export_adapter(tmp_path, "vit-b16-512", "dr-grade", "1", CLASSES5, side, backbone, MEAN, STD,
                        "random-init(seed=1)", None, 1, parity_samples=1)
    assert am["parity"]["max_abs_diff"] <= 1e-4
    e2e = am["parity"]["end_to_end"]
    assert e2e["same_tokens_max_abs_diff"] <= 1e-4
    # 1025 importances per head lie closer together than the demo's: a rounding-level near-tie
    # may be kept differently by ONNX Runtime, which then moves the logits (recorded, checked
    # on the tokens backbone.onnx kept); without one the plain comparison must hold too
    if e2e["tie_swaps"] == 0:
        assert e2e["max_abs_diff"] <= 1e-4
    assert am["inputs"][0]["shape"] == [-1, 3, 128, 128]
    assert not list(tmp_path.rglob("*.data"))


@pytest.mark.parametrize("opset", [14, 20])
def test_opset_option(tmp_path, tiny_backbone, opset):
    m = export_backbone(tiny_backbone, tmp_path, "tiny", "random-init(seed=0)", 0, opset=opset)
    model = onnx.load(str(tmp_path / "backbones" / "tiny" / "backbone.onnx"))
    assert m["opset"] == opset
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    assert m["parity"]["max_abs_diff"] <= 1e-4
