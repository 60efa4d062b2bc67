"""Latent decoders: diffusers' AutoencoderKL for latent_kind "sd-vae", the identity for "pixel".

A VAE is loaded from a local diffusers folder (config.json + weights, as save_pretrained writes it) or
from one .safetensors file. diffusers' from_single_file cannot build a VAE offline from the weights alone
(it fetches a reference config from the Hub), so a single file carries its diffusers config in its
safetensors metadata: save_autoencoder writes such a file from any AutoencoderKL. Other single files
(original LDM-format VAEs) go through from_single_file, which works offline only where diffusers'
reference config is already in the Hugging Face cache.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Iterator

import torch

from .checks import is_finite_real, oversized_header, parse_json, some_of
from .config import ECARConfig
from .atomic import atomic_path
from .meta_build import BuildError, build_within, mismatch, names_differ, shapes_differ

logger = logging.getLogger("ecar_infer")

# The Stable Diffusion VAE architecture (8x down, 4 latent channels), as used by DiT.
SD_VAE_ARCHITECTURE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=256, scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2,
)


class VAEError(ValueError):
    """A VAE could not be loaded or does not fit the model."""


# safetensors metadata key of a single-file VAE: the AutoencoderKL config as JSON (see save_autoencoder)
CONFIG_KEY = "diffusers_config"


class IdentityDecoder:
    """The pixel latent: the model's output already is the image in [-1, 1]."""

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return latent.float()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] are the latent."""
        return images.float()

    def set_memory_options(self, slicing: bool, tiling: bool) -> None:
        """Nothing to slice or tile."""


class AutoencoderDecoder:
    """diffusers AutoencoderKL; decode() takes the scaled latent z and returns images in [-1, 1]."""

    def __init__(self, vae, scaling_factor: float) -> None:
        self.vae = vae
        self.scaling_factor = scaling_factor

    def set_memory_options(self, slicing: bool, tiling: bool) -> None:
        """Slicing decodes a batch one image at a time; tiling decodes large images in overlapping tiles."""
        self.vae.enable_slicing() if slicing else self.vae.disable_slicing()
        self.vae.enable_tiling() if tiling else self.vae.disable_tiling()

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        param = next(self.vae.parameters())
        z = (latent / self.scaling_factor).to(param.device, param.dtype)
        return self.vae.decode(z).sample.float()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the scaled latent z = scaling_factor * mean of the VAE's posterior (editing)."""
        param = next(self.vae.parameters())
        posterior = self.vae.encode(images.to(param.device, param.dtype)).latent_dist
        return posterior.mean.float() * self.scaling_factor


def sd_vae_random(seed: int = 0, config: ECARConfig | None = None):
    """An AutoencoderKL of the SD-VAE architecture with random weights (benchmarks, --random-init; no download).

    With `config`, the architecture is fitted to it: its latent channels, scaling factor, and as many of the
    SD-VAE's blocks as its downsampling needs (one block more than the number of 2x downsamplings).
    """
    from diffusers import AutoencoderKL

    arch = dict(SD_VAE_ARCHITECTURE)
    if config is not None:
        down = config.vae_downsample
        if down & (down - 1):
            raise VAEError(f"no AutoencoderKL has {down}x downsampling (it must be a power of 2)")
        blocks = down.bit_length()  # log2(down) + 1
        widths = (arch["block_out_channels"] + (arch["block_out_channels"][-1],) * blocks)[:blocks]
        arch.update(latent_channels=config.latent_channels, sample_size=config.image_size,
                    scaling_factor=config.vae_scaling_factor, block_out_channels=widths,
                    down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**arch)


def save_autoencoder(vae, path: str | os.PathLike) -> None:
    """Write an AutoencoderKL as one .safetensors file (weights, and its config in the metadata) atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in vae.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt", CONFIG_KEY: vae.to_json_string()})


def _config_object(text: str | bytes, where: str) -> dict:
    """A diffusers config from untrusted text: a JSON object, or a VAEError naming `where` it came from."""
    try:
        config = parse_json(text)
    except ValueError as err:
        raise VAEError(f"{where} is not JSON ({err})") from None
    if not isinstance(config, dict):
        raise VAEError(f"{where} is not a JSON object")
    return config


def _tensor_table(path: Path, whose: str = "its") -> dict[str, tuple[int, ...]]:
    """Names and shapes from a safetensors file's header (no tensor is read); whose: the file, in a message."""
    from safetensors import safe_open

    _check_header_size(path, whose)
    with safe_open(path, framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def _check_header_size(path: Path, whose: str = "its") -> None:
    """Refuse a header that safetensors would take seconds and hundreds of MB to parse."""
    oversized = oversized_header(path, "a VAE's header")
    if oversized:
        raise VAEError(f"{whose} {oversized}")


def _build_bounded(config: dict, shapes: dict[str, tuple[int, ...]]):
    """An AutoencoderKL of `config` on the meta device, built only as far as the file's tensor table allows
    (ecar_infer/meta_build.py): however absurd the config, the work is bounded by the file."""
    from diffusers import AutoencoderKL

    try:
        return build_within(lambda: AutoencoderKL.from_config(config), shapes)
    except BuildError as err:
        raise VAEError(str(err)) from None


def _load_single_file(path: Path, config_json: str):
    """An AutoencoderKL from a file that carries its config (save_autoencoder), built bounded by the file's
    tensor table and compared with it by name and shape before the weights are assigned, as load_checkpoint
    does: what is built is what the file holds."""
    from safetensors.torch import load_file

    shapes = _tensor_table(path)
    vae = _build_bounded(_config_object(config_json, f"its {CONFIG_KEY} metadata"), shapes)
    problem = mismatch(vae, shapes)
    if problem:
        raise VAEError(problem)
    vae.load_state_dict(load_file(path), strict=True, assign=True)
    return vae


# save_pretrained's names; a config.json is about 1 KB, so one past this bound is not a diffusers config
FOLDER_CONFIG = "config.json"
FOLDER_WEIGHTS = "diffusion_pytorch_model.safetensors"
FOLDER_PICKLED = "diffusion_pytorch_model.bin"   # older folders: torch.save's zip, read with weights_only
MAX_CONFIG_BYTES = 1 << 20


def _folder_tensor_table(folder: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a folder's weights without reading them (a pickled file memory-mapped); a
    VAEError for a folder of neither kind (a sharded one among them), which could not bound the build."""
    if (folder / FOLDER_WEIGHTS).is_file():
        return _tensor_table(folder / FOLDER_WEIGHTS, f"its {FOLDER_WEIGHTS}'s")
    if (folder / FOLDER_PICKLED).is_file():
        state = torch.load(folder / FOLDER_PICKLED, map_location="cpu", mmap=True, weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise VAEError(f"its {FOLDER_PICKLED} holds no table of tensors")
        return {str(name): tuple(t.shape) for name, t in state.items()}
    raise VAEError(f"it holds neither {FOLDER_WEIGHTS} nor {FOLDER_PICKLED} (a VAE saved in shards is not read: "
                   f"save it as one file)")


def _load_folder(folder: Path):
    """An AutoencoderKL from a diffusers folder through diffusers' from_pretrained, which also reads the
    deprecated attention names of older folders (the SD VAEs on the Hub among them). The folder's config is
    first built on the meta device bounded by the weights' tensor table (safetensors, or a pickled .bin), so
    a crafted config.json costs no more than the file holds. Tensors the config needs and the file lacks,
    or that the config does not use, are refused (diffusers only logs them, and leaves the missing ones
    uninitialised), and so are tensors of the wrong shape (diffusers' own error would name none of them)."""
    from diffusers import AutoencoderKL

    config_file = folder / FOLDER_CONFIG
    if not config_file.is_file():
        raise VAEError(f"it has no {FOLDER_CONFIG}: give a folder as AutoencoderKL.save_pretrained writes it")
    if config_file.stat().st_size > MAX_CONFIG_BYTES:
        raise VAEError(f"its {FOLDER_CONFIG} is {config_file.stat().st_size:,} bytes: not a diffusers config")
    _build_bounded(_config_object(config_file.read_bytes(), f"its {FOLDER_CONFIG}"), _folder_tensor_table(folder))
    vae, info = AutoencoderKL.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False,
                                              ignore_mismatched_sizes=True, output_loading_info=True)
    # mismatched_keys: (name, shape in the file, shape the config gives)
    problem = names_differ(info["missing_keys"], info["unexpected_keys"]) or shapes_differ(info["mismatched_keys"])
    if problem:
        raise VAEError(problem)
    return vae


# Every VAE file names its encoder's first convolution so (LDM single files may prefix it, as whole Stable
# Diffusion checkpoints do with first_stage_model.)
VAE_TENSOR = "encoder.conv_in.weight"


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """huggingface_hub in offline mode for the block. local_files_only=True alone does not keep it off the
    network: building its request headers fetches a registry from huggingface.co (huggingface_hub 2.4), and
    nothing here may touch the network. Its deprecation warning about an argument diffusers passes is
    silenced with it."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks", category=UserWarning)
            yield
    finally:
        constants.HF_HUB_OFFLINE = offline


def load_autoencoder(path: str | os.PathLike):
    """AutoencoderKL from a local diffusers folder (config.json + weights) or a single .safetensors file; a
    VAEError for anything else, weights that hold NaN or infinite values included (they decode to NaN images)."""
    vae = _read_autoencoder(Path(path))
    factor = getattr(vae.config, "scaling_factor", None)
    if not (is_finite_real(factor) and factor > 0):   # latents are scaled by it: a string was a TypeError later
        raise VAEError(f"could not load the VAE at {path}: its config's scaling_factor is {factor!r}, not a positive "
                       f"number")
    nonfinite = [name for name, t in vae.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
    if nonfinite:
        raise VAEError(f"could not load the VAE at {path}: {some_of(sorted(nonfinite))} hold NaN or infinite "
                       f"values: the file is corrupt, or it was saved from a training run that diverged")
    return vae


def _read_autoencoder(path: Path):
    """load_autoencoder, but for the check of the weights' values."""
    if not path.exists():
        raise VAEError(f"VAE not found: {path} (give a local diffusers AutoencoderKL folder or a .safetensors file)")
    if not path.is_dir() and not path.is_file():   # a FIFO or a device: reading it may wait forever, or never end
        raise VAEError(f"could not load the VAE at {path}: not a regular file or folder (a FIFO or a device)")
    from diffusers import AutoencoderKL

    try:
        if path.is_dir():
            with hub_offline():
                return _load_folder(path)
        from safetensors import safe_open

        _check_header_size(path)
        with safe_open(path, framework="pt") as f:
            metadata, names = f.metadata() or {}, list(f.keys())
        if metadata.get(CONFIG_KEY) is not None:
            if len(metadata[CONFIG_KEY]) > MAX_CONFIG_BYTES:   # read, diffusers would print it whole
                raise VAEError(f"its {CONFIG_KEY} metadata is {len(metadata[CONFIG_KEY]):,} characters, which no "
                               f"diffusers config is (about 1 KB)")
            return _load_single_file(path, metadata[CONFIG_KEY])
        if metadata.get("format") == "ecar":
            raise VAEError("it is an E-CAR checkpoint, not a VAE")
        if not any(name.endswith(VAE_TENSOR) for name in names):
            raise VAEError(f"it holds no VAE weights (no {VAE_TENSOR} among its {len(names)} tensor(s))")
        with hub_offline():
            return AutoencoderKL.from_single_file(path, local_files_only=True)
    except VAEError as err:
        raise VAEError(f"could not load the VAE at {path}: {err}") from None
    except Exception as err:  # diffusers and safetensors raise many types; report one clear line
        hint = ("" if path.is_dir() else "; a single-file VAE must carry its diffusers config (write it with "
                "ecar_infer.vae.save_autoencoder) unless diffusers' reference config is in the Hugging Face cache")
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VAEError(f"could not load the VAE at {path}: {first_line}{hint}") from err


def build_decoder(config: ECARConfig, vae: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, slicing: bool = False, tiling: bool = False,
                  random_vae: bool = False):
    """The decoder a model needs. sd-vae models need `vae` (a path or an AutoencoderKL) or random_vae=True."""
    if config.latent_kind == "pixel":
        if vae is not None:
            logger.warning("this model works in pixel space and needs no VAE: the VAE given is not used")
        return IdentityDecoder()
    if vae is None:
        if not random_vae:
            raise VAEError("this model decodes through an SD-VAE: pass vae=PATH (a local diffusers "
                           "AutoencoderKL folder or .safetensors file)")
        logger.warning("using an SD-VAE-architecture AutoencoderKL with RANDOM weights: images are noise")
        vae = sd_vae_random(config=config)
    elif isinstance(vae, (str, os.PathLike)):
        vae = load_autoencoder(vae)
    vae_cfg = vae.config
    down = 2 ** (len(vae_cfg.block_out_channels) - 1)
    if vae_cfg.latent_channels != config.latent_channels or down != config.vae_downsample:
        raise VAEError(f"the VAE has {vae_cfg.latent_channels} latent channels and {down}x downsampling, but the "
                       f"model expects {config.latent_channels} and {config.vae_downsample}x")
    if abs(vae_cfg.scaling_factor - config.vae_scaling_factor) > 1e-6:
        logger.warning(f"the VAE's scaling_factor {vae_cfg.scaling_factor} differs from the model's "
                       f"{config.vae_scaling_factor}; decoding with the model's (it was trained with it)")
    # every weight, not only the first (vae.dtype): a file may mix fp16 and fp32, and decode would then fail
    if {p.dtype for p in vae.parameters()} != {dtype}:   # (diffusers warns on every .to() that names a dtype)
        vae = vae.to(dtype=dtype)
    decoder = AutoencoderDecoder(vae.to(device).eval(), config.vae_scaling_factor)
    decoder.set_memory_options(slicing, tiling)
    return decoder
