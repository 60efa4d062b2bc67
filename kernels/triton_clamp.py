"""Triton editing step, in place: the Euler update (guided or not) fused with the editing clamp.

Reference: reference.clamped_euler_step_, x <- where(keep, r * known_start + (1 - r) * known_end,
x + dr * v) with v = v_u + w * (v_c - v_u) when guided (w per sample), else v = v_c
(docs/MODEL.md, "Editing without retraining"). Arithmetic is fp32; x is rounded once, on the store. The
known endpoints are read only where keep is set, so a mostly free stage costs little more than the plain
step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_euler import euler_update
from .triton_support import flat, runs_on

BLOCK = 1024


@triton.jit
def _clamped_euler_kernel(X, V_COND, V_UNCOND, W, KEEP, KNOWN_START, KNOWN_END, n, per_sample, dr, r,
                          GUIDED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = euler_update(X, V_COND, V_UNCOND, W, offs, mask, per_sample, dr, GUIDED)
    keep = tl.load(KEEP + offs, mask=mask, other=0) != 0
    known = mask & keep
    start = tl.load(KNOWN_START + offs, mask=known, other=0.0).to(tl.float32)
    end = tl.load(KNOWN_END + offs, mask=known, other=0.0).to(tl.float32)
    x = tl.where(keep, r * start + (1.0 - r) * end, x)
    tl.store(X + offs, x.to(X.dtype.element_ty), mask=mask)


def clamped_euler_step_(x: torch.Tensor, v_cond: torch.Tensor, v_uncond: torch.Tensor | None, w: torch.Tensor | None,
                        dr: float, keep: torch.Tensor, known_start: torch.Tensor, known_end: torch.Tensor,
                        r: float) -> torch.Tensor:
    """In place: x <- where(keep, r * known_start + (1 - r) * known_end, x + dr * v)."""
    n = x.numel()
    guided = v_uncond is not None
    vc = flat(v_cond)
    # The unguided launch never reads V_UNCOND or W; v_cond stands in for their pointers.
    vu, w_ = (flat(v_uncond), flat(w)) if guided else (vc, vc)
    _clamped_euler_kernel[(triton.cdiv(n, BLOCK),)](
        x, vc, vu, w_, flat(keep), flat(known_start), flat(known_end), n, n // x.shape[0], dr, r,
        GUIDED=guided, BLOCK=BLOCK)
    return x


def supports_clamped_euler_step_(x: torch.Tensor, v_cond: torch.Tensor, v_uncond: torch.Tensor | None,
                                 w: torch.Tensor | None, dr: float, keep: torch.Tensor, known_start: torch.Tensor,
                                 known_end: torch.Tensor, r: float) -> bool:
    # x is updated through a flat pointer, so it must be contiguous; the other inputs may be any layout.
    if not (runs_on(x, v_cond, known_start, known_end) and x.is_contiguous() and x.dim() >= 1 and x.numel() > 0
            and keep.dtype == torch.bool and keep.device == x.device
            and all(t.shape == x.shape for t in (v_cond, keep, known_start, known_end))):
        return False
    if v_uncond is None:
        return True
    return (v_uncond.shape == x.shape and runs_on(x, v_uncond) and w is not None and w.shape == (x.shape[0],)
            and w.is_floating_point() and w.device == x.device)
