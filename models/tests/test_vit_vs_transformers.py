"""Our ViT backbone against transformers' ViTModel (4.x, classic names) with the same config
and the same random weights: proves the key mapping (through a saved HF folder) and the
numerics. Nothing is downloaded."""

import math

import numpy as np
import pytest
import torch
import transformers
from transformers import ViTConfig, ViTForImageClassification, ViTModel

from fptserve_models.config import BackboneConfig
from fptserve_models.model import FLOAT32_ROUNDOFF, interpolate_position_embeddings, selection_margin
from fptserve_models.weights import load_hf_backbone

assert transformers.__version__.startswith("4."), "classic ViT names need transformers < 5"

# Both models run in float64, so neither side's kernels or summation order matter (float64
# roundoff, 1e-16, is far below every check) except in one place: transformers' eager attention
# takes its softmax in float32 even in a float64 model. Its attention probabilities therefore
# carry a few float32 roundoffs (2^-24 relative: exp, the sum, the division), which reach the
# hidden states as a few roundoffs of the values they weight, themselves no larger than the
# hidden states. So the two agree to within a few float32 roundoffs of the largest hidden
# value (measured: 0.1), on any CPU; 4 roundoffs is the bound below. Meaningful differences
# (GELU tanh vs erf, a swapped token, the interpolation rule) are 1e-3 and up.
FLOAT64_ATOL = 1e-10  # float64 on both sides (the interpolation test): roundoff is ~1e-15


def assert_close_to_transformers(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    atol = 4 * FLOAT32_ROUNDOFF * float(theirs.abs().max())
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=atol, rtol=0, err_msg=what)


SMALL = dict(hidden_size=48, num_heads=4, num_layers=5, mlp_size=96, patch_size=8, layers_used=(2, 3), token_ratio=0.25)


def hf_config(c: BackboneConfig, image_size: int) -> ViTConfig:
    return ViTConfig(
        hidden_size=c.hidden_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        intermediate_size=c.mlp_size, hidden_act="gelu", layer_norm_eps=c.layer_norm_eps, image_size=image_size,
        patch_size=c.patch_size, num_channels=c.num_channels, qkv_bias=True,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def perturb(model: torch.nn.Module, seed: int) -> None:
    """HF's own init (std 0.02) gives nearly flat attention; spread the weights so token
    selection is meaningful. Seeded, independent of our init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embeddings" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1] if p.dim() == 2 else p[0].numel()))
            elif "embeddings" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def make_hf(c: BackboneConfig, image_size: int, seed: int, cls=ViTModel):
    torch.manual_seed(seed)
    kwargs = {"add_pooling_layer": False} if cls is ViTModel else {}
    model = cls(hf_config(c, image_size), **kwargs)
    model.set_attn_implementation("eager")
    perturb(model, seed)
    return model.eval()


@pytest.mark.parametrize("image_size,pretrained", [(48, 48), (64, 48), (40, 32)])
@pytest.mark.parametrize("head", [ViTModel, ViTForImageClassification])
def test_hidden_states_and_selection_match_transformers(tmp_path, image_size, pretrained, head):
    c = BackboneConfig(**SMALL, image_size=image_size, pretrained_image_size=pretrained)
    hf = make_hf(c, pretrained, seed=7, cls=head)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=head is ViTModel)  # both file kinds
    ours = load_hf_backbone(tmp_path / "hf", image_size=image_size, layers_used=c.layers_used,
                            token_ratio=c.token_ratio).model

    base = hf.vit if head is ViTForImageClassification else hf
    if image_size != pretrained:
        # transformers 4.57 interpolates with size= (not the authors' 4.29 rule): give the HF
        # model our interpolated table (tested separately below) at the target size
        ref = ViTModel(hf_config(c, image_size), add_pooling_layer=False)
        ref.set_attn_implementation("eager")
        state = dict(base.state_dict())
        state["embeddings.position_embeddings"] = ours.embeddings.position_embeddings_resized.clone()
        ref.load_state_dict(state)
        base = ref.eval()
    ours, base = ours.double(), base.double()

    keys = {}
    hooks = [
        base.encoder.layer[i].attention.attention.key.register_forward_hook(lambda m, a, o, i=i: keys.__setitem__(("k", i), o))
        for i in c.layers_used
    ] + [
        base.encoder.layer[i].attention.attention.value.register_forward_hook(lambda m, a, o, i=i: keys.__setitem__(("v", i), o))
        for i in c.layers_used
    ]
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(3)).double()
    with torch.no_grad():
        out = base(pixel_values=x, output_hidden_states=True, output_attentions=True)
        det = ours.run(x, details=True)
    for h in hooks:
        h.remove()

    # hidden states entering every layer we keep (embeddings output, then each layer's output)
    assert len(det.hidden_states) == c.last_layer_used + 1
    for i, h in enumerate(det.hidden_states):
        assert_close_to_transformers(h, out.hidden_states[i], f"layer {i}")

    # token selection from HF's own attention probabilities and key/value projections
    k = c.top_k
    # The selected sets must agree exactly, so no head may have a near-tie at the top-k boundary
    # that transformers' float32 softmax could break the other way: each of its probabilities is
    # within (N + 2) roundoffs of exact (N-term sum, exp, division), so a relative gap of twice
    # that cannot be crossed.
    assert selection_margin(det.importance, k) > 2 * (c.num_tokens + 2) * FLOAT32_ROUNDOFF
    for j, i in enumerate(c.layers_used):
        probs = out.attentions[i]  # [B, H, N, N]
        importance = probs.mean(dim=2)
        idx = torch.topk(importance, k, dim=-1).indices
        split = lambda t: t.reshape(2, -1, c.num_heads, c.head_dim).transpose(1, 2)
        hk, hv = split(keys[("k", i)]), split(keys[("v", i)])
        for b in range(2):
            for h in range(c.num_heads):
                ref_set, our_idx = sorted(idx[b, h].tolist()), det.indices[b, j, h]
                assert sorted(our_idx.tolist()) == ref_set
                order = torch.argsort(our_idx)
                assert_close_to_transformers(det.key_states[b, j, h][order], hk[b, h, ref_set], "keys")
                assert_close_to_transformers(det.value_states[b, j, h][order], hv[b, h, ref_set], "values")


def bicubic_reference(grid: np.ndarray, scale: float) -> np.ndarray:
    """Independent float64 bicubic (A=-0.75, align_corners=False, source = (dst+0.5)/scale-0.5,
    border clamp), separable, output size floor(in * scale): PyTorch's rule with scale_factor."""
    A = -0.75

    def weights(t):
        def c1(x):
            return ((A + 2) * x - (A + 3)) * x * x + 1

        def c2(x):
            return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A

        return [c2(t + 1), c1(t), c1(1 - t), c2(2 - t)]

    def resize_axis(a, axis):
        n_in = a.shape[axis]
        n_out = int(math.floor(n_in * scale))
        out = []
        for o in range(n_out):
            src = (o + 0.5) / scale - 0.5
            i0 = math.floor(src)
            w = weights(src - i0)
            acc = 0
            for m, wm in zip(range(i0 - 1, i0 + 3), w):
                acc = acc + wm * np.take(a, min(max(m, 0), n_in - 1), axis=axis)
            out.append(acc)
        return np.stack(out, axis=axis)

    return resize_axis(resize_axis(grid, 0), 1)


@pytest.mark.parametrize("old,new", [(24, 32), (6, 8), (4, 5)])
def test_position_interpolation_is_transformers_4_29_rule(old, new):
    dim = 5
    table = torch.randn(1, old * old + 1, dim, generator=torch.Generator().manual_seed(old))
    ours = interpolate_position_embeddings(table.double(), new).numpy()
    grid = table[0, 1:].double().numpy().reshape(old, old, dim)
    ref = bicubic_reference(grid, (new + 0.1) / old).reshape(new * new, dim)
    assert ours.shape == (1, new * new + 1, dim)
    np.testing.assert_array_equal(ours[0, 0], table[0, 0].double().numpy())
    np.testing.assert_allclose(ours[0, 1:], ref, atol=FLOAT64_ATOL, rtol=0)
    # the modern rule (size=, sampling step old/new) is measurably different: the test can fail
    modern = torch.nn.functional.interpolate(
        table[:, 1:].reshape(1, old, old, dim).permute(0, 3, 1, 2), size=(new, new), mode="bicubic", align_corners=False
    ).permute(0, 2, 3, 1).reshape(new * new, dim).numpy()
    assert np.abs(modern - ref).max() > 1e-3


def test_unchanged_grid_is_not_interpolated():
    table = torch.randn(1, 37, 4)
    assert interpolate_position_embeddings(table, 6) is table
