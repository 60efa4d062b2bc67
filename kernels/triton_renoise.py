"""Triton stage jump: 2x nearest upsample fused with the block re-noise.

Reference: reference.upsample_renoise, x_high = alpha * Up(x_low) + beta * (2/sqrt(3)) * (xi - blockmean(xi))
with xi ([B, C, 2h, 2w], standard normal) drawn by the caller, so the result is reproducible.

Each program takes BLOCK low-resolution elements; each reads its 2x2 block of xi once, removes the block
mean and writes the four outputs. All arithmetic is fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import BLOCK_NOISE_GAIN
from .triton_support import runs_on, same_dtype

BLOCK = 256


@triton.jit
def _upsample_renoise_kernel(X_LOW, XI, OUT, n_low, h, w, alpha, beta_gain, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_low
    col = offs % w
    row = (offs // w) % h
    plane = offs // (w * h)  # batch * channel index
    # The 2x2 block of the [2h, 2w] plane (contiguous NCHW): top-left, top-right, bottom-left, bottom-right.
    top_left = plane * (4 * h * w) + (2 * row) * (2 * w) + 2 * col
    top_right = top_left + 1
    bottom_left = top_left + 2 * w
    bottom_right = bottom_left + 1

    x = alpha * tl.load(X_LOW + offs, mask=mask).to(tl.float32)
    a = tl.load(XI + top_left, mask=mask).to(tl.float32)
    b = tl.load(XI + top_right, mask=mask).to(tl.float32)
    c = tl.load(XI + bottom_left, mask=mask).to(tl.float32)
    d = tl.load(XI + bottom_right, mask=mask).to(tl.float32)
    mean = (a + b + c + d) * 0.25
    dtype = OUT.dtype.element_ty
    tl.store(OUT + top_left, (x + beta_gain * (a - mean)).to(dtype), mask=mask)
    tl.store(OUT + top_right, (x + beta_gain * (b - mean)).to(dtype), mask=mask)
    tl.store(OUT + bottom_left, (x + beta_gain * (c - mean)).to(dtype), mask=mask)
    tl.store(OUT + bottom_right, (x + beta_gain * (d - mean)).to(dtype), mask=mask)


def upsample_renoise(x_low: torch.Tensor, xi: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """alpha * Up(x_low) + beta * block_noise(xi) for x_low [B, C, h, w] and xi [B, C, 2h, 2w]."""
    out = torch.empty(xi.shape, dtype=x_low.dtype, device=x_low.device)
    h, w = x_low.shape[-2:]
    n_low = x_low.numel()
    _upsample_renoise_kernel[(triton.cdiv(n_low, BLOCK),)](
        x_low.contiguous(), xi.contiguous(), out, n_low, h, w, alpha, beta * BLOCK_NOISE_GAIN, BLOCK=BLOCK)
    return out


def supports_upsample_renoise(x_low: torch.Tensor, xi: torch.Tensor, alpha: float, beta: float) -> bool:
    b, c, h, w = x_low.shape if x_low.dim() == 4 else (0, 0, 0, 0)
    return (runs_on(x_low, xi) and same_dtype(x_low, xi) and x_low.numel() > 0
            and xi.shape == (b, c, 2 * h, 2 * w))
