"""Triton flow steps, in place: the guidance combine fused with the Euler update, and the unguided update.

References: reference.guided_euler_step_ (x <- x + dr * (v_u + w * (v_c - v_u)), w per sample) and
reference.euler_step_ (x <- x + dr * v). Arithmetic is fp32; x is rounded once, on the store.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_support import flat, runs_on

BLOCK = 1024


@triton.jit
def euler_update(X, V_COND, V_UNCOND, W, offs, mask, per_sample, dr, GUIDED: tl.constexpr):
    """x + dr * v at `offs` in fp32, v guided when GUIDED (w per sample); shared with triton_clamp."""
    x = tl.load(X + offs, mask=mask).to(tl.float32)
    v = tl.load(V_COND + offs, mask=mask).to(tl.float32)
    if GUIDED:
        v_uncond = tl.load(V_UNCOND + offs, mask=mask).to(tl.float32)
        w = tl.load(W + offs // per_sample, mask=mask).to(tl.float32)
        v = v_uncond + w * (v - v_uncond)
    return x + dr * v


@triton.jit
def _euler_kernel(X, V_COND, V_UNCOND, W, n, per_sample, dr, GUIDED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = euler_update(X, V_COND, V_UNCOND, W, offs, mask, per_sample, dr, GUIDED)
    tl.store(X + offs, x.to(X.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, v_cond: torch.Tensor, v_uncond: torch.Tensor | None, w: torch.Tensor | None,
            dr: float) -> torch.Tensor:
    n = x.numel()
    guided = v_uncond is not None
    vc = flat(v_cond)
    # The unguided launch never reads V_UNCOND or W; v_cond stands in for their pointers.
    vu, w_ = (flat(v_uncond), flat(w)) if guided else (vc, vc)
    _euler_kernel[(triton.cdiv(n, BLOCK),)](x, vc, vu, w_, n, n // x.shape[0], dr, GUIDED=guided, BLOCK=BLOCK)
    return x


def guided_euler_step_(x: torch.Tensor, v_cond: torch.Tensor, v_uncond: torch.Tensor, w: torch.Tensor,
                       dr: float) -> torch.Tensor:
    """In place: x <- x + dr * (v_uncond + w * (v_cond - v_uncond)), w of shape [B] for x of [B, ...]."""
    return _launch(x, v_cond, v_uncond, w, dr)


def euler_step_(x: torch.Tensor, v: torch.Tensor, dr: float) -> torch.Tensor:
    """In place: x <- x + dr * v."""
    return _launch(x, v, None, None, dr)


def supports_guided_euler_step_(x: torch.Tensor, v_cond: torch.Tensor, v_uncond: torch.Tensor, w: torch.Tensor,
                                dr: float) -> bool:
    return (supports_euler_step_(x, v_cond, dr) and v_uncond.shape == x.shape and runs_on(x, v_uncond)
            and w.shape == (x.shape[0],) and w.is_floating_point() and w.device == x.device)


def supports_euler_step_(x: torch.Tensor, v: torch.Tensor, dr: float) -> bool:
    # x is updated through a flat pointer, so it must be contiguous; the velocities may be any layout.
    return runs_on(x, v) and x.is_contiguous() and v.shape == x.shape and x.dim() >= 1 and x.numel() > 0
