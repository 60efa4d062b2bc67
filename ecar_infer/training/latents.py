"""The latent cache of a latent (sd-vae) model: the training images encoded once by the VAE, so that
training never runs the encoder (as MAR does).

The cache is one float32 array [N, F, 2, C, h, w]: for each image and each flip (F = 2 with --flip: the
image, then its mirror; F = 1 without) the mean ([:, :, 0]) and std ([:, :, 1]) of the VAE's posterior.
It is a resumable, memory-mapped disk cache (ecar_infer/training/diskcache.py) keyed by the data, the
VAE and the flips. A training step samples z = scaling_factor * (mean + std * eps) with eps drawn from
the step's generator, the scaling factor being the VAE config's (stored in the model's config).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..checks import some_of
from .data import MAX_NAMED, DataDraws, DataError, ImageSet, digest
from .diskcache import cached_array

ENCODE_BATCH = 32


def vae_fingerprint(vae, before_2026_12_07: bool = False) -> str:
    """A short hash of the VAE's config and weights (what the cache depends on). The config's "_" keys are
    diffusers' bookkeeping, not the model: `_name_or_path` changed with how --vae was spelt (vae, ./vae,
    /abs/vae), which re-encoded the whole data set and refused a resume, and `_diffusers_version` with the
    library. before_2026_12_07: the fingerprint as it was, "_" keys included, which runs recorded then carry."""
    text = vae.to_json_string()
    if not before_2026_12_07:
        text = json.dumps({k: v for k, v in json.loads(text).items() if not k.startswith("_")}, sort_keys=True)
    h = hashlib.sha256(text.encode())
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_moments(vae, images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> [B, 2, C, h, w]: the posterior's mean and std (unscaled)."""
    param = next(vae.parameters())
    posterior = vae.encode(images.to(param.device, param.dtype)).latent_dist
    return torch.stack([posterior.mean, posterior.std], dim=1).float().cpu()


def latent_moments(images: ImageSet, vae, flips: bool, cache_dir: str | os.PathLike, batch: int = ENCODE_BATCH,
                   report=None, vae_id: str | None = None) -> np.ndarray:
    """The memory-mapped [N, F, 2, C, h, w] cache of `images` (built first if missing or stale); vae_id: the
    VAE's fingerprint where the run knows it by another than vae_fingerprint(vae) (a run recorded before
    2026-12-07, whose cache is keyed by the old one)."""
    vae = vae.eval()
    c, down = vae.config.latent_channels, 2 ** (len(vae.config.block_out_channels) - 1)
    side = images.size // down
    views = 2 if flips else 1
    key = {"data": images.fingerprint, "count": len(images), "size": images.size,
           "vae": vae_id or vae_fingerprint(vae), "flips": views}

    def encode(a: int, b: int) -> np.ndarray:
        x = images.images(np.arange(a, b))
        out = [encode_moments(vae, x)] + ([encode_moments(vae, x.flip(-1))] if flips else [])
        moments = torch.stack(out, dim=1).numpy()
        bad = [str(a + i) for i in np.flatnonzero(~np.isfinite(moments.reshape(b - a, -1)).all(axis=1))]
        if bad:   # refused here, where the image is known, not as a diverged run at the step that draws it
            raise DataError(f"{images.description}: the VAE encodes image(s) {some_of(bad, MAX_NAMED)} (counting "
                            f"from 0) to NaN or infinite values; check the VAE's weights, or leave those images out")
        return moments

    name = f"latents-{digest(key)}.npy"
    return cached_array(Path(cache_dir) / name, key, (len(images), views, 2, c, side, side), np.float32,
                        encode, batch, report)


class LatentBatches:
    """Training batches of a latent model, read from the latent cache: x0 = scaling_factor * (mean + std * eps)
    of the drawn flip."""

    def __init__(self, moments: np.ndarray, images: ImageSet, scaling_factor: float, vae_id: str) -> None:
        self.moments, self.scaling_factor = moments, scaling_factor
        self.images, self.vae_id = images, vae_id   # vae_id: the encoder's vae_fingerprint
        self.labels = torch.from_numpy(np.asarray(images.labels))
        self.class_names = images.class_names
        flips = ", flipped at random" if moments.shape[1] == 2 else ""
        self.description = f"{images.description}{flips}, as cached VAE latents"

    def __len__(self) -> int:
        return len(self.moments)

    def identity(self) -> dict:
        """What the latents were encoded from: the images' ImageSet.identity and the VAE."""
        return {**self.images.identity(), "vae": self.vae_id}

    def draw(self, gen: torch.Generator, batch: int) -> DataDraws:
        flip = torch.rand(batch, generator=gen) < 0.5 if self.moments.shape[1] == 2 else None
        return DataDraws(flip=flip, eps=torch.randn(batch, *self.moments.shape[3:], generator=gen))

    def not_finite(self, row: int) -> tuple[str, str]:
        """(where row `row` comes from, what to do) where its values are not finite: the cache is damaged."""
        cache = Path(self.moments.filename)
        return (f"row {row} of the latent cache {cache}",
                f"Delete the latent cache {cache.name} and --resume: it is built again")

    def x0(self, index: torch.Tensor, draws: DataDraws) -> torch.Tensor:
        view = np.zeros(len(index), dtype=np.int64) if draws.flip is None else draws.flip.numpy().astype(np.int64)
        moments = torch.from_numpy(np.asarray(self.moments[index.numpy(), view]))   # [B, 2, C, h, w]
        return self.scaling_factor * (moments[:, 0] + moments[:, 1] * draws.eps)
