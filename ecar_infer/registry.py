"""Named ECARConfig presets (docs/MODEL.md, "Presets")."""
from __future__ import annotations

from .config import ConfigError, ECARConfig

_IMAGENET_256 = dict(latent_kind="sd-vae", latent_channels=4, image_size=256, vae_downsample=8,
                     vae_scaling_factor=0.18215, patch_size=2, num_stages=5, num_classes=1000)

_DIGITS32 = ECARConfig(latent_kind="pixel", latent_channels=1, image_size=32, vae_downsample=1, vae_scaling_factor=1.0,
                       patch_size=4, num_stages=3, width=128, depth=4, num_heads=4, head_width=128, head_blocks=3,
                       num_classes=10)

PRESETS: dict[str, ECARConfig] = {
    # ImageNet 256 px family (random weights until trained checkpoints exist)
    "ecar-b": ECARConfig(**_IMAGENET_256, width=768, depth=12, num_heads=12, head_width=1024, head_blocks=3),
    "ecar-l": ECARConfig(**_IMAGENET_256, width=1024, depth=24, num_heads=16, head_width=1024, head_blocks=6),
    "ecar-xl": ECARConfig(**_IMAGENET_256, width=1152, depth=28, num_heads=16, head_width=1280, head_blocks=6),
    # small presets for tests and CPU work
    "ecar-tiny": ECARConfig(latent_kind="pixel", latent_channels=1, image_size=16, vae_downsample=1,
                            vae_scaling_factor=1.0, patch_size=2, num_stages=3, width=32, depth=2,
                            num_heads=2, head_width=32, head_blocks=2, num_classes=10),
    "ecar-tiny-vae": ECARConfig(latent_kind="sd-vae", latent_channels=4, image_size=32, vae_downsample=2,
                                vae_scaling_factor=0.5, patch_size=2, num_stages=3, width=32, depth=2,
                                num_heads=2, head_width=32, head_blocks=2, num_classes=10),
    # the shipped CPU-trainable model (weights/ecar-digits32.safetensors, digits32 data set)
    "ecar-digits32": _DIGITS32,
    # the color model of the Noto Emoji categories (ecar_infer/training/emoji.py: nine classes)
    "ecar-emoji32": ECARConfig(latent_kind="pixel", latent_channels=3, image_size=32, vae_downsample=1,
                               vae_scaling_factor=1.0, patch_size=4, num_stages=3, width=128, depth=4,
                               num_heads=4, head_width=128, head_blocks=3, num_classes=9),
}


def head_variants(name: str, attention_heads: int) -> dict[str, ECARConfig]:
    """<name>-attn, -sc and -attn-sc: the head variants of a preset (docs/MODEL.md, "Head variants"). The
    attention head gets half the blocks (rounded up), so its parameters stay near the mlp head's
    (12 W^2 per block against 5 W^2)."""
    base = PRESETS[name]
    attention = dict(head_kind="attention", head_blocks=(base.head_blocks + 1) // 2, head_num_heads=attention_heads)
    return {f"{name}-attn": base.replace(**attention), f"{name}-sc": base.replace(head_objective="shortcut"),
            f"{name}-attn-sc": base.replace(**attention, head_objective="shortcut")}


for _name, _heads in (("ecar-b", 16), ("ecar-l", 16), ("ecar-xl", 16), ("ecar-digits32", 4), ("ecar-emoji32", 4)):
    PRESETS.update(head_variants(_name, _heads))


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> ECARConfig:
    try:
        return PRESETS[name]
    except (KeyError, TypeError):   # a ValueError (ConfigError), whose message is not quoted as a KeyError's is
        raise ConfigError(f"unknown preset {name!r}; choose one of {preset_names()}") from None
