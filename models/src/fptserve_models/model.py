"""PyTorch FPT+ model, written from the paper's description.

Module and parameter names follow Hugging Face's classic ViT (transformers 4.x) so that
backbone weights load from a ViT folder and side checkpoints saved by the authors' training
code (keys ``fusion_module.*`` and ``side_encoder.*``) load as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import BackboneConfig, SideConfig, check_compatible


# --------------------------------------------------------------------------------------------
# ViT building blocks (Hugging Face classic names)
# --------------------------------------------------------------------------------------------


class PatchEmbeddings(nn.Module):
    def __init__(self, num_channels: int, hidden_size: int, patch_size: int) -> None:
        super().__init__()
        self.projection = nn.Conv2d(num_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # [B, C, H, W] -> [B, hidden, h, w] -> [B, h*w, hidden]
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


def interpolate_position_embeddings(position_embeddings: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Resize a [1, 1 + g*g, D] position table to a grid of ``grid_size`` per side.

    Behaviour of transformers 4.29 (what the authors ran): the patch part is resized bicubically
    (align_corners=False) with ``scale_factor=(new + 0.1) / old``, which sets both the output
    size (floor) and the sampling step (1 / scale_factor, not old / new). When the grid already
    has the wanted size the table is returned as it is.
    """
    num_positions = position_embeddings.shape[1] - 1
    old = int(round(math.sqrt(num_positions)))
    if old * old != num_positions:
        raise ValueError(f"position table of {num_positions} patch positions is not a square grid")
    if old == grid_size:
        return position_embeddings
    dim = position_embeddings.shape[-1]
    cls_pos = position_embeddings[:, :1]
    grid = position_embeddings[:, 1:].reshape(1, old, old, dim).permute(0, 3, 1, 2)
    scale = (grid_size + 0.1) / old
    grid = F.interpolate(grid, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    if grid.shape[-2:] != (grid_size, grid_size):
        raise ValueError(f"interpolated grid {tuple(grid.shape[-2:])} is not {grid_size}x{grid_size}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, grid_size * grid_size, dim)
    return torch.cat([cls_pos, grid], dim=1)


class Embeddings(nn.Module):
    """CLS token + patch embeddings + position embeddings.

    ``position_embeddings`` has the *pretrained* grid (what checkpoints hold). The table used
    in ``forward`` is the one resized to ``grid_size``, computed once by ``refresh()`` and kept
    in a non-persistent buffer: an exported graph carries it as a constant.
    """

    def __init__(self, num_channels: int, hidden_size: int, patch_size: int, pretrained_grid: int, grid: int):
        super().__init__()
        self.grid_size = grid
        self.same_grid = pretrained_grid == grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, pretrained_grid * pretrained_grid + 1, hidden_size))
        self.patch_embeddings = PatchEmbeddings(num_channels, hidden_size, patch_size)
        if not self.same_grid:
            self.register_buffer(
                "position_embeddings_resized", torch.zeros(1, grid * grid + 1, hidden_size), persistent=False
            )
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        if self.same_grid:
            return
        resized = interpolate_position_embeddings(self.position_embeddings.detach(), self.grid_size)
        self.position_embeddings_resized.copy_(resized)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embeddings(pixel_values)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        pos = self.position_embeddings if self.same_grid else self.position_embeddings_resized
        return torch.cat([cls, patches], dim=1) + pos


class SelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.query = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.key = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.value = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.split_heads(self.query(x)), self.split_heads(self.key(x)), self.split_heads(self.value(x))

    @staticmethod
    def merge_heads(x: torch.Tensor) -> torch.Tensor:
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)


class SelfOutput(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.attention = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.output = SelfOutput(hidden_size)


class Intermediate(nn.Module):
    def __init__(self, hidden_size: int, mlp_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, mlp_size)


class Output(nn.Module):
    def __init__(self, hidden_size: int, mlp_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(mlp_size, hidden_size)


class Layer(nn.Module):
    """Pre-norm transformer block (HF ViTLayer names)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_size: int, eps: float, qkv_bias: bool = True):
        super().__init__()
        self.attention = Attention(hidden_size, num_heads, qkv_bias)
        self.intermediate = Intermediate(hidden_size, mlp_size)
        self.output = Output(hidden_size, mlp_size)
        self.layernorm_before = nn.LayerNorm(hidden_size, eps=eps)
        self.layernorm_after = nn.LayerNorm(hidden_size, eps=eps)

    def attention_probs(self, hidden: torch.Tensor):
        sa = self.attention.attention
        q, k, v = sa.qkv(self.layernorm_before(hidden))
        probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * sa.scale, dim=-1)
        return probs, k, v

    def finish(self, hidden: torch.Tensor, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        context = SelfAttention.merge_heads(torch.matmul(probs, v))
        hidden = hidden + self.attention.output.dense(context)
        mlp = self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(hidden))))
        return hidden + mlp

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        probs, _, v = self.attention_probs(hidden)
        return self.finish(hidden, probs, v)


class Encoder(nn.Module):
    def __init__(self, num_layers: int, hidden_size: int, num_heads: int, mlp_size: int, eps: float, qkv_bias=True):
        super().__init__()
        self.layer = nn.ModuleList(
            [Layer(hidden_size, num_heads, mlp_size, eps, qkv_bias) for _ in range(num_layers)]
        )


# --------------------------------------------------------------------------------------------
# Backbone with important-token selection
# --------------------------------------------------------------------------------------------


@dataclass
class BackboneDetails:
    key_states: torch.Tensor  # [B, L, H, k, d]
    value_states: torch.Tensor  # [B, L, H, k, d]
    indices: torch.Tensor  # [B, L, H, k] selected token indices (descending importance)
    importance: torch.Tensor  # [B, L, H, N]
    all_keys: torch.Tensor  # [B, L, H, N, d]
    all_values: torch.Tensor  # [B, L, H, N, d]
    hidden_states: list  # input of each kept layer + outputs of layers before the last used


# Token selection is a top-k, so it is discontinuous: a float32 evaluation (PyTorch, or ONNX
# Runtime with whatever kernels a CPU gets) selects the same tokens as an exact (float64) one
# only if, in every (layer, head), the k-th and (k+1)-th importances lie further apart than its
# rounding error. Float32 unit roundoff is 2^-24 (6e-8); an importance is a mean of softmax
# outputs several transformer layers deep, and float32 evaluations of it are within ~30
# roundoffs of float64 (measured: 1.5e-6 relative on the demo fixtures, 1.8e-6 on the full-size
# ViT-B). Inputs whose gap is at least 1000 roundoffs (6e-5 relative) select the same tokens
# on any machine: the demo fixtures and the tests' comparisons with PyTorch are held to it.
FLOAT32_ROUNDOFF = 2.0**-24
SELECTION_MARGIN = 1000 * FLOAT32_ROUNDOFF


def selection_margin(importance: torch.Tensor, top_k: int) -> float:
    """How clearly token selection separates: the smallest gap between the k-th and the
    (k+1)-th importance over every (image, layer, head) of ``importance`` [..., N], relative
    to the k-th. Rounding that moves importances by less than this cannot change the sets."""
    ranked = importance.sort(dim=-1, descending=True).values
    kth, next_ = ranked[..., top_k - 1], ranked[..., top_k]
    return float(((kth - next_) / kth).min())


class Backbone(nn.Module):
    """Frozen ViT backbone pruned after the last layer used.

    Holds layers 0..max(layers_used) with HF names (``embeddings.*``, ``encoder.layer.N.*``).
    The last used layer only runs up to its attention probabilities (its attention output,
    MLP and everything after it are never computed, so an export drops them).
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embeddings = Embeddings(c.num_channels, c.hidden_size, c.patch_size, c.pretrained_grid_size, c.grid_size)
        self.encoder = Encoder(c.last_layer_used + 1, c.hidden_size, c.num_heads, c.mlp_size, c.layer_norm_eps, c.qkv_bias)

    def refresh(self) -> None:
        self.embeddings.refresh()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.refresh()
        return result

    @staticmethod
    def select(probs: torch.Tensor, k: torch.Tensor, v: torch.Tensor, top_k: int):
        """Important-token selection for one layer, separately for every head.

        importance = attention probabilities averaged over all queries (CLS included);
        the top_k keys by importance (descending) and their values are gathered.
        """
        importance = probs.mean(dim=2)  # [B, H, N]
        indices = torch.topk(importance, top_k, dim=-1, largest=True, sorted=True).indices  # [B, H, k]
        gather_index = indices.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
        return torch.gather(k, 2, gather_index), torch.gather(v, 2, gather_index), indices, importance

    def run(self, pixel_values: torch.Tensor, details: bool = False, token_indices: bool = False):
        """K/V of the selected tokens; with ``token_indices`` also their indices [B, L, H, k];
        with ``details`` a :class:`BackboneDetails` instead."""
        c = self.config
        hidden = self.embeddings(pixel_values)
        keys, values, extra = [], [], {"indices": [], "importance": [], "k": [], "v": [], "hidden": []}
        for i, layer in enumerate(self.encoder.layer):
            if details:
                extra["hidden"].append(hidden)
            if i in c.layers_used:
                probs, k, v = layer.attention_probs(hidden)
                sk, sv, idx, imp = self.select(probs, k, v, c.top_k)
                keys.append(sk)
                values.append(sv)
                extra["indices"].append(idx)
                if details:
                    extra["importance"].append(imp)
                    extra["k"].append(k)
                    extra["v"].append(v)
                if i == c.last_layer_used:
                    break
                hidden = layer.finish(hidden, probs, v)
            else:
                hidden = layer(hidden)
        key_states = torch.stack(keys, dim=1)
        value_states = torch.stack(values, dim=1)
        if not details:
            if token_indices:
                return key_states, value_states, torch.stack(extra["indices"], dim=1)
            return key_states, value_states
        return BackboneDetails(
            key_states=key_states,
            value_states=value_states,
            indices=torch.stack(extra["indices"], dim=1),
            importance=torch.stack(extra["importance"], dim=1),
            all_keys=torch.stack(extra["k"], dim=1),
            all_values=torch.stack(extra["v"], dim=1),
            hidden_states=extra["hidden"],
        )

    def forward(self, pixel_values: torch.Tensor):
        return self.run(pixel_values)


class BackboneForExport(nn.Module):
    """Wraps a backbone for export: f32 pixels in, K/V out in the backbone's dtype, and with
    ``explain`` the selected token indices (int64 [B, L, H, k]: 0 is CLS, n >= 1 is patch n - 1
    of the row-major patch grid), from which a saliency map is built."""

    def __init__(self, backbone: Backbone, explain: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.explain = explain

    def forward(self, pixel_values: torch.Tensor):
        dtype = self.backbone.embeddings.cls_token.dtype
        return self.backbone.run(pixel_values.to(dtype), token_indices=self.explain)


# --------------------------------------------------------------------------------------------
# Side network: fusion module + side ViT
# --------------------------------------------------------------------------------------------


class FusionModule(nn.Module):
    """Fine-grained prompts that query each backbone layer's selected K/V.

    prompts [L, 1, P, D]; per layer: q = LayerNorm(prompts) split into heads,
    softmax(q K^T / sqrt(d)) V, merged, plus the raw prompts, then Linear(D -> side width),
    then Dropout(0.5) (training only).
    """

    def __init__(self, backbone: BackboneConfig, side: SideConfig) -> None:
        super().__init__()
        self.num_heads = backbone.num_heads
        self.head_dim = backbone.head_dim
        self.scale = 1.0 / math.sqrt(backbone.head_dim)
        self.prompts = nn.Parameter(torch.zeros(len(backbone.layers_used), 1, side.num_prompts, backbone.hidden_size))
        self.layer_norm = nn.LayerNorm(backbone.hidden_size, eps=side.fusion_layer_norm_eps)
        self.out_proj = nn.Linear(backbone.hidden_size, side.hidden_size)
        self.dropout = nn.Dropout(0.5)

    def attend(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """The prompts' attention over the selected tokens.

        key_states / value_states [B, L, H, k, d] -> (raw prompts [L, P, D], attention weights
        [B, L, H, P, k], context [B, L, P, D] with head h in slot h*d:(h+1)*d)."""
        num_layers, _, num_prompts, dim = self.prompts.shape
        prompts = self.prompts.reshape(num_layers, num_prompts, dim)
        q = self.layer_norm(prompts).reshape(num_layers, num_prompts, self.num_heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q.unsqueeze(0), key_states.transpose(-1, -2)) * self.scale  # [B, L, H, P, k]
        weights = torch.softmax(scores, dim=-1)
        context = torch.matmul(weights, value_states)  # [B, L, H, P, d]
        b = context.shape[0]
        context = context.transpose(2, 3).reshape(b, num_layers, num_prompts, dim)
        return prompts, weights, context

    def forward(self, key_states: torch.Tensor, value_states: torch.Tensor) -> torch.Tensor:
        # key_states / value_states: [B, L, H, k, d] -> fused prompts [B, L, P, side width]
        prompts, _, context = self.attend(key_states, value_states)
        # Dropout(0.5) acts on the projected tokens (after out_proj), as in the authors' module;
        # it is the identity in eval mode, so exported graphs do not contain it.
        return self.dropout(self.out_proj(context + prompts.unsqueeze(0)))


class SideViT(nn.Module):
    def __init__(self, side: SideConfig) -> None:
        super().__init__()
        g = side.grid_size
        self.embeddings = Embeddings(side.num_channels, side.hidden_size, side.patch_size, g, g)
        self.encoder = Encoder(side.num_layers, side.hidden_size, side.num_heads, side.mlp_size, side.layer_norm_eps, side.qkv_bias)
        self.layernorm = nn.LayerNorm(side.hidden_size, eps=side.layer_norm_eps)


class SideEncoder(nn.Module):
    def __init__(self, side: SideConfig) -> None:
        super().__init__()
        self.vit = SideViT(side)
        self.classifier = nn.Linear(side.hidden_size, side.num_classes)


class SideNetwork(nn.Module):
    """What a task adapter holds: the fusion module and the side ViT (authors' key names)."""

    def __init__(self, backbone: BackboneConfig, side: SideConfig) -> None:
        super().__init__()
        check_compatible(backbone, side)
        self.backbone_config = backbone
        self.config = side
        self.fusion_module = FusionModule(backbone, side)
        self.side_encoder = SideEncoder(side)

    def forward(self, side_pixel_values: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor):
        dtype = self.fusion_module.prompts.dtype
        fused = self.fusion_module(key_states.to(dtype), value_states.to(dtype))  # [B, L, P, D]
        vit = self.side_encoder.vit
        hidden = vit.embeddings(side_pixel_values)
        num_prompts = fused.shape[2]
        for i, layer in enumerate(vit.encoder.layer):
            hidden = layer(torch.cat([hidden, fused[:, i]], dim=1))[:, :-num_prompts]
        hidden = vit.layernorm(hidden)
        return self.side_encoder.classifier(hidden[:, 0])

    def explain(self, side_pixel_values: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor):
        """Logits and their direct logit attribution to the backbone's selected tokens and to
        the side network's own patches: (logits [B, C], token_relevance [B, C, L, H, k],
        patch_relevance [B, C, g*g]); L = side layers (= backbone layers used), H = backbone
        heads, k = selected tokens, g = side patch grid.

        Every LayerNorm on the way is linearised at its actual statistics (its 1/sigma is held
        fixed), so a vector d added to the CLS residual stream scores d . g_c for class c, with
        g_c = Center(classifier.weight[c] * gamma_final) / sigma(CLS before the final LayerNorm).
        In side layer i, token n adds sum_h probs[h, 0, n] W_o^h V[h, n] to the CLS attention
        output (value bias included, output bias excluded):

        * patch_relevance[c, p]: that score of side patch p (token 1 + p), summed over the layers;
        * token_relevance[c, i, hb, t]: the score of prompt j's (token 1 + g*g + j) part that
          backbone head hb's selected token t brought, a[hb, j, t] W_p^hb V_bb[i, hb, t] (the
          out_proj image of its attention-weighted value; out_proj bias and the raw prompt are
          left out), taken through layer i's first LayerNorm linearised at the fused prompt,
          summed over the prompts j.

        Only direct paths count: what a token adds to the CLS token's attention output in one
        layer, carried by the residual stream to the classifier; what later layers' attention
        and MLPs make of it is not followed."""
        dtype = self.fusion_module.prompts.dtype
        key_states, value_states = key_states.to(dtype), value_states.to(dtype)
        fusion = self.fusion_module
        prompts, weights, context = fusion.attend(key_states, value_states)
        fused = fusion.dropout(fusion.out_proj(context + prompts.unsqueeze(0)))  # [B, L, P, D]
        vit = self.side_encoder.vit
        hidden = vit.embeddings(side_pixel_values)
        num_patches = hidden.shape[1] - 1
        num_prompts = fused.shape[2]
        cls_probs, values = [], []
        for i, layer in enumerate(vit.encoder.layer):
            x = torch.cat([hidden, fused[:, i]], dim=1)
            probs, _, v = layer.attention_probs(x)
            hidden = layer.finish(x, probs, v)[:, :-num_prompts]
            cls_probs.append(probs[:, :, 0])  # [B, hs, N]: the CLS query's attention
            values.append(v)  # [B, hs, N, ds]
        final = vit.layernorm
        classifier = self.side_encoder.classifier
        logits = classifier(final(hidden)[:, 0])

        # g_c: the final LayerNorm and the classifier, linearised at the CLS token's statistics
        z = hidden[:, 0]
        sigma = torch.sqrt(layer_variance(z) + final.eps)  # [B, 1]
        w = classifier.weight * final.weight  # [C, D]
        direction = (w - w.mean(dim=-1, keepdim=True)).unsqueeze(0) / sigma.unsqueeze(-1)  # [B, C, D]

        b, num_classes, width = direction.shape
        bb_heads, bb_dim = fusion.num_heads, fusion.head_dim
        patch_relevance, prompt_directions = [], []
        for i, layer in enumerate(vit.encoder.layer):
            sa = layer.attention.attention
            w_o = layer.attention.output.dense.weight  # [D, D]
            p = cls_probs[i]
            # each token's share of the CLS attention output: [B, N, D], and its score [B, C, N]
            share = torch.matmul(SelfAttention.merge_heads(p.unsqueeze(-1) * values[i]), w_o.t())
            scores = torch.matmul(direction, share.transpose(1, 2))
            patch_relevance.append(scores[:, :, 1 : 1 + num_patches])

            # q[c, j] = Center(gamma1 / sigma_j * sum_h p[h, j] (W_v^h)^T (W_o^h)^T g_c): the
            # score of u added to prompt j's input is q . u
            back = torch.matmul(direction, w_o).reshape(b, num_classes, 1, sa.num_heads, sa.head_dim)
            p_prompts = p[:, :, 1 + num_patches :].transpose(1, 2).unsqueeze(1).unsqueeze(-1)  # [B, 1, P, hs, 1]
            q = torch.matmul((back * p_prompts).reshape(b, num_classes, num_prompts, width), sa.value.weight)
            ln = layer.layernorm_before
            sigma_j = torch.sqrt(layer_variance(fused[:, i]) + ln.eps)  # [B, P, 1]
            q = q * (ln.weight / sigma_j).unsqueeze(1)
            q = q - q.mean(dim=-1, keepdim=True)  # [B, C, P, D]
            prompt_directions.append(q)

        # all layers at once: r[i, c, j, hb] = (W_p^hb)^T q[i, c, j], by backbone head [B, L, H, C*P, d]
        q = torch.stack(prompt_directions, dim=1)  # [B, L, C, P, D]
        num_layers = q.shape[1]
        r = torch.matmul(q, fusion.out_proj.weight)  # [B, L, C, P, H*d]
        r = r.reshape(b, num_layers, num_classes * num_prompts, bb_heads, bb_dim).transpose(2, 3)
        # token t of head hb in layer i: sum_j a[i, hb, j, t] (V_bb[i, hb, t] . r[i, c, j, hb])
        dots = torch.matmul(r, value_states.transpose(-1, -2))  # [B, L, H, C*P, k]
        dots = dots.reshape(b, num_layers, bb_heads, num_classes, num_prompts, -1)
        token_relevance = (weights.unsqueeze(3) * dots).sum(dim=-2)  # [B, L, H, C, k]
        return logits, token_relevance.permute(0, 3, 1, 2, 4), torch.stack(patch_relevance).sum(dim=0)


def layer_variance(x: torch.Tensor) -> torch.Tensor:
    """Biased variance over the last axis (as LayerNorm computes it), keeping that axis."""
    centred = x - x.mean(dim=-1, keepdim=True)
    return (centred * centred).mean(dim=-1, keepdim=True)


class SideNetworkForExplain(nn.Module):
    """Wraps a side network for export with its explanation outputs (:meth:`SideNetwork.explain`)."""

    def __init__(self, side: SideNetwork) -> None:
        super().__init__()
        self.side = side

    def forward(self, side_pixel_values: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor):
        return self.side.explain(side_pixel_values, key_states, value_states)


class FPTPlus(nn.Module):
    """Backbone + side network: the whole classifier, the reference for every parity check."""

    def __init__(self, backbone: Backbone, side: SideNetwork) -> None:
        super().__init__()
        self.backbone = backbone
        self.side = side

    def forward(self, pixel_values: torch.Tensor, side_pixel_values: torch.Tensor) -> torch.Tensor:
        key_states, value_states = self.backbone(pixel_values)
        return self.side(side_pixel_values, key_states, value_states)
