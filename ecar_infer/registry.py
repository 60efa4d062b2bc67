"""Named ECARConfig presets (docs/MODEL.md, "Presets")."""
from __future__ import annotations

from .config import ECARConfig

_IMAGENET_256 = dict(latent_kind="sd-vae", latent_channels=4, image_size=256, vae_downsample=8,
                     vae_scaling_factor=0.18215, patch_size=2, num_stages=5, num_classes=1000)

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
    "ecar-digits32": ECARConfig(latent_kind="pixel", latent_channels=1, image_size=32, vae_downsample=1,
                                vae_scaling_factor=1.0, patch_size=4, num_stages=3, width=128, depth=4,
                                num_heads=4, head_width=128, head_blocks=3, num_classes=10),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> ECARConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {preset_names()}") from None
