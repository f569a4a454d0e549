"""Explanation outputs (issue 22): the direct logit attribution of SideNetwork.explain checked
against an explicit, element-by-element computation; side.onnx and backbone.onnx against
PyTorch; the saliency map reference (explain.py)."""

import math

import numpy as np
import onnx
import pytest
import torch

from fptserve_models.config import TINY_BACKBONE, TINY_SIDE
from fptserve_models.explain import explain_map, selection_map, side_patch_of_cell
from fptserve_models.export import export_adapter, export_backbone, ort_session
from fptserve_models.model import SELECTION_MARGIN, selection_margin
from fptserve_models.weights import random_side

CLASSES = ["a", "b", "c"]
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def sharper_side(seed: int):
    """A random side network (float64) whose LayerNorm gains and every bias are far from 1 and 0,
    so that each part of the attribution (gains, centring, excluded biases) matters."""
    side = random_side(TINY_BACKBONE, TINY_SIDE.replace(num_classes=len(CLASSES)), seed).double()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in side.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm_before.weight") or name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.4 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return side


def inputs(backbone, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, TINY_BACKBONE.image_size, TINY_BACKBONE.image_size, generator=g)
    y = torch.randn(batch, 3, TINY_SIDE.image_size, TINY_SIDE.image_size, generator=g)
    with torch.no_grad():
        k, v = backbone(x)
    return x, y, k, v


# --------------------------------------------------------------------------------------------
# an explicit computation, element by element, from the modules' weights (float64)
# --------------------------------------------------------------------------------------------


def layer_norm_stats(x: np.ndarray, eps: float):
    mean = x.mean()
    return mean, math.sqrt(((x - mean) ** 2).mean() + eps)


class Explicit:
    """One image through the side network with numpy loops: records what the attribution needs."""

    def __init__(self, side, y, k, v):
        self.side = side
        P = lambda t: t.detach().double().numpy()  # noqa: E731
        self.P = P
        fusion, vit = side.fusion_module, side.side_encoder.vit
        prompts = P(fusion.prompts)[:, 0]  # [L, P, 768]
        num_layers, num_prompts, width = prompts.shape
        heads, d = fusion.num_heads, fusion.head_dim
        kk, vv = P(k), P(v)  # [L, H, k, d]
        # fusion: per layer, prompt, head: softmax(LN(prompt)_h . K_h / sqrt(d)) over the tokens
        gamma, beta = P(fusion.layer_norm.weight), P(fusion.layer_norm.bias)
        self.a = np.zeros((num_layers, heads, num_prompts, kk.shape[2]))
        fused = np.zeros((num_layers, num_prompts, P(fusion.out_proj.weight).shape[0]))
        w_p, b_p = P(fusion.out_proj.weight), P(fusion.out_proj.bias)
        for i in range(num_layers):
            for j in range(num_prompts):
                mean, sigma = layer_norm_stats(prompts[i, j], fusion.layer_norm.eps)
                q = gamma * (prompts[i, j] - mean) / sigma + beta
                context = np.zeros(width)
                for h in range(heads):
                    s = kk[i, h] @ q[h * d:(h + 1) * d] / math.sqrt(d)
                    e = np.exp(s - s.max())
                    self.a[i, h, j] = e / e.sum()
                    context[h * d:(h + 1) * d] = self.a[i, h, j] @ vv[i, h]
                fused[i, j] = w_p @ (context + prompts[i, j]) + b_p
        self.fused, self.w_p, self.b_p, self.prompts, self.vv = fused, w_p, b_p, prompts, vv
        # side ViT, keeping every layer's input and its CLS query's attention probabilities
        with torch.no_grad():
            hidden = P(vit.embeddings(y[None].double())[0])
        self.layer_inputs, self.cls_probs = [], []
        for i, layer in enumerate(vit.encoder.layer):
            x = np.concatenate([hidden, fused[i]])
            with torch.no_grad():
                probs, _, _ = layer.attention_probs(torch.from_numpy(x)[None])
                out = layer(torch.from_numpy(x)[None])[0]
            self.layer_inputs.append(x)
            self.cls_probs.append(P(probs[0, :, 0]))  # [hs, N]
            hidden = P(out)[:-num_prompts]
        self.z = hidden[0]
        self.num_patches = hidden.shape[0] - 1

    def score(self, delta: np.ndarray) -> np.ndarray:
        """Class scores of a vector added to the CLS residual stream after the last side layer:
        the final LayerNorm with its 1/sigma held at the CLS token's, then the classifier
        (biases cancel: the difference of two logits)."""
        final, cls = self.side.side_encoder.vit.layernorm, self.side.side_encoder.classifier
        _, sigma = layer_norm_stats(self.z, final.eps)
        normed = self.P(final.weight) * (delta - delta.mean()) / sigma
        return self.P(cls.weight) @ normed

    def cls_output(self, i: int, value_rows: dict) -> np.ndarray:
        """Layer i's attention output at CLS (output bias excluded) for the given value vectors
        {token n: value(...) row [D]}, weighted by the CLS query's probabilities head by head."""
        layer = self.side.side_encoder.vit.encoder.layer[i]
        heads = layer.attention.attention.num_heads
        ds = layer.attention.attention.head_dim
        merged = np.zeros(heads * ds)
        for n, row in value_rows.items():
            for h in range(heads):
                merged[h * ds:(h + 1) * ds] += self.cls_probs[i][h, n] * row[h * ds:(h + 1) * ds]
        return self.P(layer.attention.output.dense.weight) @ merged

    def value(self, i: int, x: np.ndarray, bias: bool) -> np.ndarray:
        sa = self.side.side_encoder.vit.encoder.layer[i].attention.attention
        return self.P(sa.value.weight) @ x + (self.P(sa.value.bias) if bias else 0.0)

    def ln1(self, i: int, row: np.ndarray, linear_at: np.ndarray | None = None) -> np.ndarray:
        """layernorm_before of layer i on ``row``; with ``linear_at``, its linear part (no beta)
        with sigma taken at ``linear_at``."""
        ln = self.side.side_encoder.vit.encoder.layer[i].layernorm_before
        gamma, beta = self.P(ln.weight), self.P(ln.bias)
        if linear_at is None:
            mean, sigma = layer_norm_stats(row, ln.eps)
            return gamma * (row - mean) / sigma + beta
        _, sigma = layer_norm_stats(linear_at, ln.eps)
        return gamma * (row - row.mean()) / sigma


@pytest.fixture(scope="module")
def case(tiny_backbone):
    side = sharper_side(21)
    _, y, k, v = inputs(tiny_backbone, 2, 5)
    with torch.no_grad():
        logits, tokens, patches = side.explain(y.double(), k.double(), v.double())
        reference = side(y.double(), k.double(), v.double())
    return {"side": side, "y": y, "k": k, "v": v, "logits": logits, "tokens": tokens.numpy(),
            "patches": patches.numpy(), "reference": reference}


def test_explain_shapes_and_logits(case):
    b, c = 2, len(CLASSES)
    t = TINY_BACKBONE
    assert case["tokens"].shape == (b, c, len(t.layers_used), t.num_heads, t.top_k)
    assert case["patches"].shape == (b, c, TINY_SIDE.grid_size ** 2)
    assert torch.equal(case["logits"], case["reference"])  # the same computation as forward
    assert np.abs(case["tokens"]).max() > 1e-3 and np.abs(case["patches"]).max() > 1e-2


@pytest.mark.parametrize("image", [0, 1])
def test_patch_relevance_is_each_patch_direct_score(case, image):
    """patch_relevance[c, p] = sum over side layers of the class score of side patch p's
    contribution to the CLS attention output, computed token by token."""
    ex = Explicit(case["side"], case["y"][image], case["k"][image].double(), case["v"][image].double())
    want = np.zeros((len(CLASSES), ex.num_patches))
    for i, x in enumerate(ex.layer_inputs):
        for p in range(ex.num_patches):
            n = 1 + p
            row = ex.value(i, ex.ln1(i, x[n]), bias=True)
            want[:, p] += ex.score(ex.cls_output(i, {n: row}))
    np.testing.assert_allclose(case["patches"][image], want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("image", [0, 1])
def test_token_relevance_explicit(case, image):
    """token_relevance[c, i, hb, t] = sum over prompts j of the score of backbone token (hb, t)'s
    part of fused prompt j, taken through layer i's first LayerNorm linearised at the prompt."""
    ex = Explicit(case["side"], case["y"][image], case["k"][image].double(), case["v"][image].double())
    num_layers, heads, num_prompts, top_k = ex.a.shape
    d = ex.vv.shape[-1]
    checked = 0
    rng = np.random.default_rng(image)
    for i in range(num_layers):
        for hb in range(heads):
            for t in rng.choice(top_k, size=3, replace=False):
                rows = {}
                for j in range(num_prompts):
                    u = ex.w_p[:, hb * d:(hb + 1) * d] @ (ex.a[i, hb, j, t] * ex.vv[i, hb, t])
                    rows[1 + ex.num_patches + j] = ex.value(i, ex.ln1(i, u, linear_at=ex.fused[i, j]), bias=False)
                want = ex.score(ex.cls_output(i, rows))
                np.testing.assert_allclose(case["tokens"][image, :, i, hb, t], want, rtol=1e-9, atol=1e-11)
                checked += 1
    assert checked == num_layers * heads * 3


@pytest.mark.parametrize("image", [0, 1])
def test_token_relevance_is_complete(case, image):
    """Completeness: in every side layer, the prompts' exact direct score (each prompt token's
    real contribution to the CLS attention output, LayerNorm not linearised) equals the sum of
    token_relevance over all selected tokens plus the excluded parts, computed separately: the
    raw prompt and out_proj bias through the linearised LayerNorm, its beta, and the value bias.
    (The LayerNorm is exactly linear in its input at fixed sigma, so nothing else remains.)"""
    ex = Explicit(case["side"], case["y"][image], case["k"][image].double(), case["v"][image].double())
    first_prompt = 1 + ex.num_patches
    for i, x in enumerate(ex.layer_inputs):
        exact = {n: ex.value(i, ex.ln1(i, x[n]), bias=True) for n in range(first_prompt, len(x))}
        excluded = {}
        for j, n in enumerate(range(first_prompt, len(x))):
            raw = ex.w_p @ ex.prompts[i, j] + ex.b_p
            ln = ex.side.side_encoder.vit.encoder.layer[i].layernorm_before
            rest = ex.ln1(i, raw, linear_at=ex.fused[i, j]) + ex.P(ln.bias)
            excluded[n] = ex.value(i, rest, bias=True)
        total = ex.score(ex.cls_output(i, exact))
        outside = ex.score(ex.cls_output(i, excluded))
        got = case["tokens"][image, :, i].sum(axis=(1, 2))
        np.testing.assert_allclose(got, total - outside, rtol=1e-8, atol=1e-9)
        assert np.abs(got).max() > 1e-3  # the tokens' share is not trivially zero


# --------------------------------------------------------------------------------------------
# ONNX Runtime against PyTorch
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_backbone):
    folder = tmp_path_factory.mktemp("explain-repo")
    bm = export_backbone(tiny_backbone, folder, "tiny", "random-init(seed=0)", 0)
    side = random_side(TINY_BACKBONE, TINY_SIDE.replace(num_classes=len(CLASSES)), 31)
    am = export_adapter(folder, "tiny", "t", "1", CLASSES, side, tiny_backbone, MEAN, STD, "random-init(seed=31)", None, 31)
    return {"folder": folder, "backbone": bm, "adapter": am, "side": side}


def test_manifests_list_the_outputs(repo):
    bm, am = repo["backbone"], repo["adapter"]
    t = TINY_BACKBONE
    # under a key of their own: daemons check what "outputs" lists, and older ones know no int64
    assert [o["name"] for o in bm["outputs"]] == ["key_states", "value_states"]
    assert bm["explanation_outputs"] == [{"name": "token_indices", "dtype": "int64", "shape": [-1, 3, t.num_heads, t.top_k]}]
    assert [o["name"] for o in am["outputs"]] == ["logits"]
    assert am["explanation_outputs"] == [
        {"name": "token_relevance", "dtype": "float32", "shape": [-1, 3, 3, t.num_heads, t.top_k]},
        {"name": "patch_relevance", "dtype": "float32", "shape": [-1, 3, 16]},
    ]
    p = bm["parity"]["token_indices"]
    assert p == {"set_mismatches": 0, "unexplained_set_mismatches": 0, "rows_not_matching_kv": 0}
    e = am["parity"]["explain"]
    assert e["token_relevance_max_abs_diff"] <= 1e-4 and e["patch_relevance_max_abs_diff"] <= 1e-4
    graph = onnx.load(str(repo["folder"] / "tasks" / "t" / "1" / "side.onnx")).graph
    assert [o.name for o in graph.output] == ["logits", "token_relevance", "patch_relevance"]


@pytest.mark.parametrize("batch", [1, 3])
def test_side_onnx_equals_pytorch_explain(repo, tiny_backbone, batch):
    _, y, k, v = inputs(tiny_backbone, batch, 40 + batch)
    sess = ort_session(repo["folder"] / "tasks" / "t" / "1" / "side.onnx")
    got = sess.run(None, {"side_pixel_values": y.numpy(), "key_states": k.numpy(), "value_states": v.numpy()})
    with torch.no_grad():
        want = [w.numpy() for w in repo["side"].explain(y, k, v)]
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == np.float32
        scale = max(1.0, float(np.abs(w).max()))
        assert np.abs(g - w).max() <= 1e-4 * scale
        assert np.abs(w).max() > 1e-3


def test_backbone_token_indices_equal_pytorch(repo, tiny_backbone):
    g = torch.Generator().manual_seed(72)  # selection margin 30x SELECTION_MARGIN
    x = torch.randn(3, 3, 64, 64, generator=g)
    sess = ort_session(repo["folder"] / "backbones" / "tiny" / "backbone.onnx")
    k, v, idx = sess.run(["key_states", "value_states", "token_indices"], {"pixel_values": x.numpy()})
    with torch.no_grad():
        details = tiny_backbone.run(x, details=True)
    assert selection_margin(details.importance, TINY_BACKBONE.top_k) >= SELECTION_MARGIN  # no near-tie
    assert idx.dtype == np.int64 and idx.shape == tuple(details.indices.shape)
    assert idx.min() >= 0 and idx.max() <= TINY_BACKBONE.grid_size ** 2
    # as sets per (image, layer, head): top-k order may differ between PyTorch and ONNX Runtime
    assert (np.sort(idx, -1) == np.sort(details.indices.numpy(), -1)).all()
    # row t of the K/V is token idx[t]
    gather = torch.from_numpy(idx)[..., None].expand(-1, -1, -1, -1, TINY_BACKBONE.head_dim)
    np.testing.assert_allclose(k, torch.gather(details.all_keys, 3, gather).numpy(), atol=1e-4)
    np.testing.assert_allclose(v, torch.gather(details.all_values, 3, gather).numpy(), atol=1e-4)


def test_opt_out_keeps_the_old_interface(tmp_path, tiny_backbone):
    bm = export_backbone(tiny_backbone, tmp_path, "tiny", "random-init(seed=0)", 0, explain=False)
    side = random_side(TINY_BACKBONE, TINY_SIDE.replace(num_classes=2), 3)
    am = export_adapter(tmp_path, "tiny", "t", "1", ["x", "y"], side, tiny_backbone, MEAN, STD, "r", None, explain=False)
    assert "explanation_outputs" not in bm and "token_indices" not in bm["parity"]
    assert "explanation_outputs" not in am and "explain" not in am["parity"]
    b = onnx.load(str(tmp_path / "backbones" / "tiny" / "backbone.onnx")).graph
    s = onnx.load(str(tmp_path / "tasks" / "t" / "1" / "side.onnx")).graph
    assert [o.name for o in b.output] == ["key_states", "value_states"] and [o.name for o in s.output] == ["logits"]


def test_cli_flag(tmp_path):
    from fptserve_models.cli import build_parser

    common = ["--out", str(tmp_path), "--name", "b"]
    assert build_parser().parse_args(["export-backbone", *common]).no_explain_outputs is False
    assert build_parser().parse_args(["export-backbone", *common, "--no-explain-outputs"]).no_explain_outputs is True
    args = ["export-adapter", "--out", "r", "--backbone", "b", "--task", "t", "--version", "1", "--classes", "a,b",
            "--mean", "0,0,0", "--std", "1,1,1", "--no-explain-outputs"]
    assert build_parser().parse_args(args).no_explain_outputs is True
    args = ["train", "--backbone", "b", "--data", "d", "--task", "t", "--version", "1", "--out", "r"]
    assert build_parser().parse_args(args).no_explain_outputs is False


# --------------------------------------------------------------------------------------------
# the saliency map (the daemon's reference)
# --------------------------------------------------------------------------------------------


def test_explain_map_scatters_tokens_and_spreads_patches():
    grid, side_grid = 4, 2  # 16 backbone cells, 4 side patches of 2x2 cells
    indices = np.array([[[0, 1, 6], [6, 16, 2]]])  # [L=1, H=2, k=3]; 0 is CLS
    tokens = np.zeros((2, 1, 2, 3))
    tokens[1] = [[[5.0, 1.0, 2.0], [3.0, 4.0, -1.0]]]
    patches = np.zeros((2, 4))
    patches[1] = [0.0, 0.0, 8.0, -4.0]
    m = explain_map(tokens, patches, indices, 1, grid, side_grid)
    want = np.zeros(16)
    want[0] += 1.0  # token 1 -> cell 0
    want[5] += 2.0 + 3.0  # token 6 (twice) -> cell 5
    want[15] += 4.0  # token 16 -> cell 15
    want[1] += -1.0  # token 2 -> cell 1
    # side patch 2 (rows 2-3, cols 0-1): +2 per cell; patch 3 (rows 2-3, cols 2-3): -1 per cell
    for r in (2, 3):
        for c in (0, 1):
            want[r * 4 + c] += 2.0
        for c in (2, 3):
            want[r * 4 + c] += -1.0
    want = np.maximum(want, 0) / np.maximum(want, 0).max()
    assert m.shape == (4, 4) and m.dtype == np.float64
    np.testing.assert_allclose(m.reshape(-1), want)
    # a class without positive evidence: all zeros
    assert (explain_map(tokens, patches, indices, 0, grid, side_grid) == 0).all()


def test_side_patch_of_cell_uneven_grids():
    owner = side_patch_of_cell(5, 2).reshape(5, 5)
    assert owner[0, 0] == 0 and owner[2, 2] == 0 and owner[3, 3] == 3 and owner[0, 4] == 1 and owner[4, 0] == 2
    assert sorted(np.bincount(owner.reshape(-1)).tolist()) == [4, 6, 6, 9]


def test_explain_map_on_exported_outputs(repo, tiny_backbone):
    """On real outputs: shapes, range [0, 1], a maximum of 1, and the backbone's importance map."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 3, 32, 32, generator=g)
    k, v, idx = ort_session(repo["folder"] / "backbones" / "tiny" / "backbone.onnx").run(None, {"pixel_values": x.numpy()})
    _, tokens, patches = ort_session(repo["folder"] / "tasks" / "t" / "1" / "side.onnx").run(
        None, {"side_pixel_values": y.numpy(), "key_states": k, "value_states": v})
    G, gs = TINY_BACKBONE.grid_size, TINY_SIDE.grid_size
    for b in range(2):
        for c in range(len(CLASSES)):
            m = explain_map(tokens[b], patches[b], idx[b], c, G, gs)
            assert m.shape == (G, G) and m.min() >= 0 and m.max() == pytest.approx(1.0)
        s = selection_map(idx[b], G)
        counts = np.bincount(idx[b][idx[b] >= 1] - 1, minlength=G * G)
        np.testing.assert_allclose(s.reshape(-1), counts / counts.max())
    with pytest.raises(ValueError):
        explain_map(tokens[0], patches[0], idx[0] + G * G, 0, G, gs)
