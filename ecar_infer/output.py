"""Sampling results and their conversions: uint8 images, PIL, grids, and atomic PNG / NPZ writes."""
from __future__ import annotations

import math
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class SampleOutput:
    """images: list of PIL images ("pil"), uint8 [B, H, W, C] array ("np"), float [B, C, H, W] in [0, 1]
    ("pt"), or the [B, C, h, w] latent in scaled latent space ("latent"). seeds[k] regenerates image k."""

    images: Any
    seeds: list[int]
    class_labels: list[int]
    timings: dict[str, float] = field(default_factory=dict)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] in [-1, 1] -> uint8 [B, H, W, C] (CPU)."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def convert(images: torch.Tensor, output_type: str) -> Any:
    """Decoded images in [-1, 1] -> the requested output type (not "latent")."""
    if output_type == "pt":
        return ((images.float() + 1) / 2).clamp(0, 1)
    array = to_uint8(images).numpy()
    if output_type == "np":
        return array
    if output_type == "pil":
        from PIL import Image

        return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in array]
    raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


def make_grid(array: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [B, H, W, C] -> one uint8 [rows*(H+pad)-pad, cols*(W+pad)-pad, C] image."""
    b, h, w, c = array.shape
    cols = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = np.zeros((rows * (h + pad) - pad, cols * (w + pad) - pad, c), dtype=np.uint8)
    for i, img in enumerate(array):
        r, col = divmod(i, cols)
        grid[r * (h + pad):r * (h + pad) + h, col * (w + pad):col * (w + pad) + w] = img
    return grid


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix + ".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write one uint8 [H, W, C] image atomically."""
    from PIL import Image

    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def save_npz(array: np.ndarray, labels: list[int], path: str | os.PathLike) -> None:
    """Write an ADM-evaluator sample file atomically: uint8 NHWC `arr_0` (3 channels) and `labels`."""
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, arr_0=array, labels=np.asarray(labels, dtype=np.int64))
