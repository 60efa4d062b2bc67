"""Latent decoders: diffusers' AutoencoderKL for latent_kind "sd-vae", the identity for "pixel"."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .config import ECARConfig

logger = logging.getLogger("ecar_infer")

# The Stable Diffusion VAE architecture (8x down, 4 latent channels), as used by DiT.
SD_VAE_ARCHITECTURE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=256, scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2,
)


class VAEError(ValueError):
    """A VAE could not be loaded or does not fit the model."""


class IdentityDecoder:
    """The pixel latent: the model's output already is the image in [-1, 1]."""

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return latent.float()


class AutoencoderDecoder:
    """diffusers AutoencoderKL; decode() takes the scaled latent z and returns images in [-1, 1]."""

    def __init__(self, vae, scaling_factor: float) -> None:
        self.vae = vae
        self.scaling_factor = scaling_factor

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        param = next(self.vae.parameters())
        z = (latent / self.scaling_factor).to(param.device, param.dtype)
        return self.vae.decode(z).sample.float()


def sd_vae_random(seed: int = 0):
    """An SD-VAE-architecture AutoencoderKL with random weights (benchmarks; no download)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**SD_VAE_ARCHITECTURE)


def load_autoencoder(path: str | os.PathLike):
    """AutoencoderKL from a local diffusers folder (config.json + weights) or a single .safetensors file."""
    from diffusers import AutoencoderKL

    path = Path(path)
    if not path.exists():
        raise VAEError(f"VAE not found: {path} (give a local diffusers AutoencoderKL folder or a .safetensors file)")
    try:
        if path.is_dir():
            return AutoencoderKL.from_pretrained(path, local_files_only=True)
        return AutoencoderKL.from_single_file(path, local_files_only=True)
    except Exception as err:  # diffusers raises many types; report one clear line
        raise VAEError(f"could not load the VAE at {path}: {err}") from err


def build_decoder(config: ECARConfig, vae: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, slicing: bool = False, tiling: bool = False,
                  random_vae: bool = False):
    """The decoder a model needs. sd-vae models need `vae` (a path or an AutoencoderKL) or random_vae=True."""
    if config.latent_kind == "pixel":
        return IdentityDecoder()
    if vae is None:
        if not random_vae:
            raise VAEError("this model decodes through an SD-VAE: pass --vae PATH (a local diffusers "
                           "AutoencoderKL folder or .safetensors file)")
        logger.warning("using an SD-VAE-architecture AutoencoderKL with RANDOM weights: images are noise")
        vae = sd_vae_random()
    elif isinstance(vae, (str, os.PathLike)):
        vae = load_autoencoder(vae)
    vae_cfg = vae.config
    down = 2 ** (len(vae_cfg.block_out_channels) - 1)
    if vae_cfg.latent_channels != config.latent_channels or down != config.vae_downsample:
        raise VAEError(f"the VAE has {vae_cfg.latent_channels} latent channels and {down}x downsampling, but the "
                       f"model expects {config.latent_channels} and {config.vae_downsample}x")
    if slicing:
        vae.enable_slicing()
    if tiling:
        vae.enable_tiling()
    vae = vae.to(device=device, dtype=dtype).eval()
    return AutoencoderDecoder(vae, config.vae_scaling_factor)
