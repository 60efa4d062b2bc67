"""The frozen model configuration: everything a checkpoint needs to mean something (docs/MODEL.md)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from .checks import FLOAT32_MAX, is_finite_real, parse_json

LATENT_KINDS = ("sd-vae", "pixel")
STAGE_WINDOWS = ("uniform",)
HEAD_KINDS = ("mlp", "attention")       # per-token MLP, or blocks that also attend within a stage
HEAD_OBJECTIVES = ("flow", "shortcut")  # flow matching (any step count), or shortcut (2^l steps)
MAX_SHORTCUT_LEVEL = 10


class ConfigError(ValueError):
    """An ECARConfig field has a value the model cannot be built with."""


@dataclass(frozen=True)
class ECARConfig:
    # latent space
    latent_kind: str = "sd-vae"          # "sd-vae" (diffusers AutoencoderKL) or "pixel" (identity)
    latent_channels: int = 4             # C: VAE latent channels, or image channels for "pixel"
    image_size: int = 256                # pixels per side
    vae_downsample: int = 8              # pixels per latent element; must be 1 for "pixel"
    vae_scaling_factor: float = 0.18215  # z = scaling_factor * encode(x); 1.0 for "pixel"
    # tokens and stages
    patch_size: int = 2
    num_stages: int = 5
    # AR transformer
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    # flow head
    head_width: int = 1024
    head_blocks: int = 3
    head_kind: str = "mlp"               # "mlp" or "attention" (docs/MODEL.md, "Head variants")
    head_num_heads: int = 4              # attention heads of an "attention" head
    head_objective: str = "flow"         # "flow" or "shortcut" (docs/MODEL.md, "Head variants")
    shortcut_max_level: int = 6          # l_max: the finest (flow) level of a shortcut head, step 2^-l_max
    # conditioning
    num_classes: int = 1000
    # schedule options
    stage_windows: str = "uniform"       # how [0, 1] is split into stage sigma windows
    # the block re-noise jump between stages (Pyramidal Flow); a field of every checkpoint's config, which
    # must be True: the stage windows, the training pairs and editing all assume the jump
    renoise: bool = True
    time_scale: float = 1000.0           # the head embeds time_scale * sigma
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        self._validate()

    # ---- derived geometry -------------------------------------------------------------
    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_downsample

    @property
    def grid_size(self) -> int:
        """Token grid side of the last (full-resolution) stage."""
        return self.latent_size // self.patch_size

    @property
    def token_dim(self) -> int:
        return self.latent_channels * self.patch_size ** 2

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def shortcut(self) -> bool:
        return self.head_objective == "shortcut"

    @property
    def null_class(self) -> int:
        return self.num_classes

    # ---- validation ---------------------------------------------------------------------
    def _validate(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ConfigError(f"ECARConfig.{field}={getattr(self, field)!r}: {why}")

        if self.latent_kind not in LATENT_KINDS:
            fail("latent_kind", f"must be one of {LATENT_KINDS}")
        if self.stage_windows not in STAGE_WINDOWS:
            fail("stage_windows", f"must be one of {STAGE_WINDOWS}")
        if self.renoise is not True:   # "false" would count as True; False started stages at the wrong level
            fail("renoise", "must be True (a JSON true): every stage starts from the re-noise jump (docs/MODEL.md); "
                            "sampling without it started each stage with less noise than its window says, for a "
                            "head trained with the jump")
        if self.head_kind not in HEAD_KINDS:
            fail("head_kind", f"must be one of {HEAD_KINDS}")
        if self.head_objective not in HEAD_OBJECTIVES:
            fail("head_objective", f"must be one of {HEAD_OBJECTIVES}")
        positive = ("latent_channels", "image_size", "vae_downsample", "patch_size", "num_stages",
                    "width", "depth", "num_heads", "head_width", "head_blocks", "head_num_heads",
                    "shortcut_max_level", "num_classes")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, "must be a positive integer")
        for name in ("mlp_ratio", "vae_scaling_factor", "time_scale", "norm_eps"):
            value = getattr(self, name)
            if not (is_finite_real(value) and 0 < value <= FLOAT32_MAX):   # beyond: inf in the model, NaN images
                fail(name, "must be a positive finite number within float32's range (at most 3.4e38)")
        if self.latent_kind == "pixel" and self.vae_downsample != 1:
            fail("vae_downsample", "must be 1 for latent_kind='pixel' (the identity latent)")
        if self.image_size % self.vae_downsample:
            fail("image_size", f"must be divisible by vae_downsample={self.vae_downsample}")
        if self.latent_size % self.patch_size:
            fail("patch_size", f"must divide the latent side {self.latent_size}")
        # (the bit_length test first: an absurd num_stages is refused without computing 2^(num_stages-1))
        if self.num_stages > self.grid_size.bit_length() or self.grid_size % (2 ** (self.num_stages - 1)):
            power = f"={2 ** (self.num_stages - 1)}" if self.num_stages <= 64 else ""
            fail("num_stages", f"the token grid {self.grid_size} must be divisible by 2^(num_stages-1){power} "
                 f"so that every stage halves it exactly")
        if self.width % self.num_heads:
            fail("num_heads", f"must divide width={self.width}")
        if self.head_dim % 4:
            fail("width", f"width/num_heads={self.head_dim} must be a multiple of 4")
        if self.width % 4:
            fail("width", "must be a multiple of 4 (2-D sin-cos position embedding)")
        if self.head_kind == "attention":
            if self.head_width % self.head_num_heads:
                fail("head_num_heads", f"must divide head_width={self.head_width}")
            if self.head_width % 4:
                fail("head_width", "must be a multiple of 4 for an attention head (2-D sin-cos positions)")
        if self.shortcut_max_level > MAX_SHORTCUT_LEVEL:
            fail("shortcut_max_level", f"must be at most {MAX_SHORTCUT_LEVEL} (2^{MAX_SHORTCUT_LEVEL} steps)")

    # ---- serialization --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ECARConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "ECARConfig":
        try:
            data = parse_json(text)
        except ValueError as err:
            raise ConfigError(f"config is not valid JSON: {err}") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "ECARConfig":
        """A copy with `changes`; a field it does not have is a ConfigError, as in from_dict."""
        return self.from_dict({**self.to_dict(), **changes})

    @staticmethod
    def preset(name: str) -> "ECARConfig":
        from .registry import get_preset

        return get_preset(name)
