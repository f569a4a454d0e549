"""Building models with weights: seeded random init, local Hugging Face ViT folders and the
authors' side checkpoints. Nothing here ever downloads anything."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from .config import BackboneConfig, ConfigError, SideConfig, check_compatible
from .digest import sha256_file  # noqa: F401 (re-exported for callers)
from .model import Backbone, SideNetwork


class CheckpointMismatch(ValueError):
    """A checkpoint whose keys or shapes do not fit the model it is loaded into."""




# --------------------------------------------------------------------------------------------
# Seeded random init
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def random_init(module: torch.nn.Module, seed: int, classifier_scale: float = 1.0) -> None:
    """Deterministic init from ``seed``, in parameter-name order.

    Scaled so activations stay O(1) and attention is far from uniform (a random model with
    HF's std=0.02 init has almost flat attention, which makes token selection and the demo
    outputs uninformative): Linear/Conv weights N(0, 1/fan_in), biases N(0, 0.02^2),
    LayerNorm weight 1 + N(0, 0.1^2), CLS / position / prompts N(0, 1). The classifier weight
    is additionally multiplied by ``classifier_scale`` (spreads the demo logits).
    """
    gen = torch.Generator().manual_seed(int(seed))
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        shape = p.shape
        if name.endswith("layernorm_before.weight") or name.endswith("layernorm_after.weight") or (
            name.endswith("layer_norm.weight") or name.endswith("layernorm.weight")
        ):
            value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            value = 0.02 * torch.randn(shape, generator=gen)
        elif p.dim() >= 2 and name.endswith(".weight"):
            fan_in = math.prod(shape[1:])
            value = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
            if name.endswith("classifier.weight"):
                value = value * classifier_scale
        else:  # cls_token, position_embeddings, prompts
            value = torch.randn(shape, generator=gen)
        p.copy_(value.to(p.dtype))
    for m in module.modules():
        if hasattr(m, "refresh"):
            m.refresh()


def random_backbone(config: BackboneConfig, seed: int) -> Backbone:
    model = Backbone(config)
    random_init(model, seed)
    return model.eval()


def random_side(backbone: BackboneConfig, side: SideConfig, seed: int, classifier_scale: float = 4.0) -> SideNetwork:
    model = SideNetwork(backbone, side)
    random_init(model, seed, classifier_scale=classifier_scale)
    return model.eval()


@torch.no_grad()
def training_init(model: SideNetwork, seed: int) -> SideNetwork:
    """The initialisation a side network starts training from (FPT+: randomly initialised).

    As the authors' modules get it: the side ViT (a Hugging Face ViTForImageClassification)
    has HF's ViT init: Linear / Conv2d weights, CLS token and position embeddings
    N(0, 0.02^2) truncated at +-2, biases 0, LayerNorm weight 1 and bias 0; the fusion module
    keeps PyTorch's defaults for its LayerNorm (1, 0) and out_proj (U(-1/sqrt(fan_in),
    1/sqrt(fan_in)) for weight and bias), and its prompts are N(0, 1e-6^2). Deterministic from
    ``seed`` (parameters drawn in name order)."""
    gen = torch.Generator().manual_seed(int(seed))
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name == "fusion_module.prompts":
            p.normal_(0.0, 1e-6, generator=gen)
        elif name.startswith("fusion_module.out_proj."):
            bound = 1.0 / math.sqrt(model.fusion_module.out_proj.in_features)
            p.uniform_(-bound, bound, generator=gen)
        elif name.endswith("layer_norm.weight") or name.endswith("layernorm.weight") or (
            name.endswith("layernorm_before.weight") or name.endswith("layernorm_after.weight")
        ):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:  # Linear / Conv2d weights, cls_token, position_embeddings
            torch.nn.init.trunc_normal_(p, mean=0.0, std=0.02, a=-2.0, b=2.0, generator=gen)
    for m in model.modules():
        if hasattr(m, "refresh"):
            m.refresh()
    return model


# --------------------------------------------------------------------------------------------
# Strict loading with one clear message
# --------------------------------------------------------------------------------------------


def _fmt_shape(t) -> str:
    return "[" + ", ".join(str(int(s)) for s in t) + "]"


def check_state_dict(
    what: str, expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], hint: str = ""
) -> None:
    """Raise ONE CheckpointMismatch listing missing, unexpected and mis-shaped keys."""
    missing = sorted(k for k in expected if k not in given)
    unexpected = sorted(k for k in given if k not in expected)
    misshaped = sorted(
        f"{k}: checkpoint {_fmt_shape(given[k].shape)}, expected {_fmt_shape(expected[k].shape)}"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    )
    if not (missing or unexpected or misshaped):
        return
    parts = [f"{what} does not fit the model:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)):
        if items:
            shown = items if len(items) <= 40 else items[:40] + [f"... and {len(items) - 40} more"]
            parts.append(f"  {title} ({len(items)}):\n    " + "\n    ".join(shown))
        else:
            parts.append(f"  {title}: none")
    if hint:
        parts.append("  hint: " + hint)
    raise CheckpointMismatch("\n".join(parts))


def _load_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatch(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return dict(obj)


# --------------------------------------------------------------------------------------------
# Backbone from a local Hugging Face ViT folder
# --------------------------------------------------------------------------------------------


@dataclass
class HFBackbone:
    model: Backbone
    source: str  # model name from config.json, else the folder name


def backbone_config_from_hf(folder: str | os.PathLike, **overrides) -> tuple[BackboneConfig, str]:
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json (expected a Hugging Face ViT folder)")
    cfg = json.loads(cfg_path.read_text())
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise ConfigError(f"{cfg_path}: hidden_act {act!r} is not supported (FPT+ ViT uses exact 'gelu')")
    model_type = cfg.get("model_type", "vit")
    if model_type != "vit":
        raise ConfigError(f"{cfg_path}: model_type {model_type!r} is not a ViT")
    pretrained = int(cfg.get("image_size", 224))
    values = dict(
        hidden_size=int(cfg.get("hidden_size", 768)),
        num_heads=int(cfg.get("num_attention_heads", 12)),
        num_layers=int(cfg.get("num_hidden_layers", 12)),
        mlp_size=int(cfg.get("intermediate_size", 3072)),
        patch_size=int(cfg.get("patch_size", 16)),
        num_channels=int(cfg.get("num_channels", 3)),
        pretrained_image_size=pretrained,
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
        qkv_bias=bool(cfg.get("qkv_bias", True)),
    )
    values.update({k: v for k, v in overrides.items() if v is not None})
    source = cfg.get("_name_or_path") or folder.resolve().name
    return BackboneConfig(**values), str(source)


_PRUNED = re.compile(r"^(layernorm|pooler|classifier)\.")
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.")


def load_hf_backbone(folder: str | os.PathLike, **overrides) -> HFBackbone:
    """Backbone weights from a local HF ViT folder (config.json + model.safetensors or
    pytorch_model.bin). A ``vit.`` prefix (ViTForImageClassification) is accepted; the final
    LayerNorm, pooler, classifier and layers after the last used one are pruned."""
    folder = Path(folder)
    config, source = backbone_config_from_hf(folder, **overrides)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            weights = _load_tensor_file(folder / name)
            break
    else:
        raise FileNotFoundError(f"{folder} has neither model.safetensors nor pytorch_model.bin")
    state = {}
    for key, value in weights.items():
        k = key[len("vit."):] if key.startswith("vit.") else key
        if _PRUNED.match(k):
            continue
        m = _LAYER.match(k)
        if m and int(m.group(1)) > config.last_layer_used:
            continue
        state[k] = value
    model = Backbone(config)
    check_state_dict(f"backbone weights {folder}", model.state_dict(), state)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return HFBackbone(model.eval(), source)


# --------------------------------------------------------------------------------------------
# Side network from the authors' checkpoint
# --------------------------------------------------------------------------------------------


def _side_hint(state: Mapping[str, torch.Tensor], backbone: BackboneConfig, side: SideConfig) -> str:
    hints = []
    cls = state.get("side_encoder.vit.embeddings.cls_token")
    if cls is not None and cls.shape[-1] != side.hidden_size:
        hints.append(f"the checkpoint's side network has width {cls.shape[-1]}, not {side.hidden_size}")
    prompts = state.get("fusion_module.prompts")
    if prompts is not None and prompts.dim() == 4:
        if prompts.shape[-1] != backbone.hidden_size:
            hints.append(
                f"its prompts have width {prompts.shape[-1]}: it was trained against a backbone of hidden size "
                f"{prompts.shape[-1]}, not {backbone.hidden_size}"
            )
        if prompts.shape[0] != len(backbone.layers_used):
            hints.append(f"its prompts cover {prompts.shape[0]} backbone layers, not {len(backbone.layers_used)}")
        if prompts.shape[2] != side.num_prompts:
            hints.append(f"it has {prompts.shape[2]} prompts per layer, not {side.num_prompts}")
    layers = {int(m.group(1)) for k in state for m in [re.match(r"side_encoder\.vit\.encoder\.layer\.(\d+)\.", k)] if m}
    if layers and max(layers) + 1 != side.num_layers:
        hints.append(f"it has {max(layers) + 1} side layers, not {side.num_layers}")
    if any(k.startswith("module.") for k in state):
        hints.append("keys start with 'module.' (a DataParallel wrapper); strip that prefix")
    return "; ".join(hints)


def load_side_checkpoint(
    path: str | os.PathLike,
    backbone: BackboneConfig,
    side: SideConfig,
    classes: list[str] | None = None,
) -> SideNetwork:
    """Load an authors'-style side checkpoint (``torch.save(model.state_dict())`` holding
    ``fusion_module.*`` and ``side_encoder.*``) as is. ``side.num_classes`` is taken from
    ``classes`` when given; the checkpoint's classifier must agree."""
    path = Path(path)
    state = _load_tensor_file(path)
    return side_from_state_dict(state, backbone, side, classes, what=f"side checkpoint {path.name}")


def side_from_state_dict(
    state: Mapping[str, torch.Tensor],
    backbone: BackboneConfig,
    side: SideConfig,
    classes: list[str] | None = None,
    what: str = "side checkpoint",
) -> SideNetwork:
    if classes is not None:
        side = side.replace(num_classes=len(classes))
        w = state.get("side_encoder.classifier.weight")
        if w is not None and w.dim() == 2 and w.shape[0] != len(classes):
            raise CheckpointMismatch(
                f"{what} has {w.shape[0]} output classes (side_encoder.classifier.weight "
                f"{_fmt_shape(w.shape)}) but {len(classes)} class names were given: {list(classes)}"
            )
    check_compatible(backbone, side)
    model = SideNetwork(backbone, side)
    check_state_dict(what, model.state_dict(), state, hint=_side_hint(state, backbone, side))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()
