"""Configuration of the FPT+ backbone and side network.

Every size is a config value. The defaults are the paper's: a ViT-B/16 backbone seen at
512x512 from a 384x384 pretrained grid, layers 6..11 used, token ratio 0.2, and a side ViT of
6 layers, width 96, MLP 384, 12 heads of 8, patch 16, input 128, 16 prompts per layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


DEFAULT_OPSET = 17


class ConfigError(ValueError):
    """A configuration that cannot describe a working model."""


@dataclass(frozen=True)
class BackboneConfig:
    hidden_size: int = 768
    num_heads: int = 12
    num_layers: int = 12
    mlp_size: int = 3072
    patch_size: int = 16
    num_channels: int = 3
    image_size: int = 512
    pretrained_image_size: int = 384
    layers_used: tuple[int, ...] = (6, 7, 8, 9, 10, 11)
    token_ratio: float = 0.2
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers_used", tuple(int(i) for i in self.layers_used))
        self.validate()

    # derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def pretrained_grid_size(self) -> int:
        return self.pretrained_image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size * self.grid_size + 1

    @property
    def pretrained_num_tokens(self) -> int:
        return self.pretrained_grid_size * self.pretrained_grid_size + 1

    @property
    def top_k(self) -> int:
        # The authors' rule: k = int(ratio * N), N counting the CLS token.
        return int(self.token_ratio * self.num_tokens)

    @property
    def last_layer_used(self) -> int:
        return self.layers_used[-1]

    def validate(self) -> None:
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.pretrained_image_size % self.patch_size:
            problems.append(
                f"pretrained_image_size {self.pretrained_image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if not self.layers_used:
            problems.append("layers_used is empty")
        elif list(self.layers_used) != sorted(set(self.layers_used)):
            problems.append(f"layers_used {list(self.layers_used)} must be strictly increasing")
        elif self.layers_used[0] < 0 or self.layers_used[-1] >= self.num_layers:
            problems.append(f"layers_used {list(self.layers_used)} out of range for {self.num_layers} layers")
        if not 0.0 < self.token_ratio <= 1.0:
            problems.append(f"token_ratio {self.token_ratio} must be in (0, 1]")
        elif self.top_k < 1:
            problems.append(f"token_ratio {self.token_ratio} selects no token out of {self.num_tokens}")
        if problems:
            raise ConfigError("invalid backbone config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers_used"] = list(self.layers_used)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BackboneConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes: Any) -> "BackboneConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class SideConfig:
    hidden_size: int = 96
    num_layers: int = 6
    num_heads: int = 12
    mlp_size: int = 384
    patch_size: int = 16
    num_channels: int = 3
    image_size: int = 128
    num_prompts: int = 16
    num_classes: int = 5
    layer_norm_eps: float = 1e-12
    fusion_layer_norm_eps: float = 1e-5
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size * self.grid_size + 1

    def validate(self) -> None:
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.num_prompts < 1:
            problems.append("num_prompts must be >= 1")
        if self.num_classes < 1:
            problems.append("num_classes must be >= 1")
        if problems:
            raise ConfigError("invalid side config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SideConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes: Any) -> "SideConfig":
        return dataclasses.replace(self, **changes)


def check_compatible(backbone: BackboneConfig, side: SideConfig) -> None:
    """The side network has one prompt group (and one fusion) per backbone layer used."""
    if side.num_layers != len(backbone.layers_used):
        raise ConfigError(
            f"side network has {side.num_layers} layers but the backbone uses {len(backbone.layers_used)} "
            f"layers {list(backbone.layers_used)}: FPT+ fuses backbone layer layers_used[i] into side layer i"
        )


# Presets -------------------------------------------------------------------------------------

PAPER_BACKBONE = BackboneConfig()
PAPER_SIDE = SideConfig()

TINY_BACKBONE = BackboneConfig(
    hidden_size=32,
    num_heads=4,
    num_layers=6,
    mlp_size=128,
    patch_size=8,
    image_size=64,
    pretrained_image_size=48,
    layers_used=(3, 4, 5),
    token_ratio=0.2,
)
TINY_SIDE = SideConfig(
    hidden_size=24,
    num_layers=3,
    num_heads=4,
    mlp_size=96,
    patch_size=8,
    image_size=32,
    num_prompts=4,
    num_classes=5,
)

BACKBONE_PRESETS = {"paper": PAPER_BACKBONE, "tiny": TINY_BACKBONE}
SIDE_PRESETS = {"paper": PAPER_SIDE, "tiny": TINY_SIDE}
