"""Triton AdaLN ops: LayerNorm (no affine, fp32 statistics) + modulation in one pass, and the same fused
with the gated residual add before it (x_new = x + gate*y, then the LayerNorm + modulation of x_new).

References: reference.layernorm_modulate and reference.gated_residual_layernorm_modulate. Modulation
tensors are per sample ([B, D] for x of [B, ..., D]) or per token (x-shaped), each on its own.

One kernel serves both: x is seen as a [rows, D] matrix and each program takes BLOCK_R whole rows.
A modulation tensor is a matrix too; row r of x reads its row r // div, where div is the tokens per
sample (per-sample modulation) or 1 (per token).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_support import rows, runs_on, same_dtype

MAX_WIDTH = 8192  # a whole row lives in one program's registers

@triton.jit
def _adaln_kernel(X, Y, GATE, SHIFT, SCALE, X_OUT, H_OUT,
                  sx, sy, sg, s_shift, s_scale, s_xo, s_ho, div_g, div_shift, div_scale,
                  n_rows, D, eps,
                  RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # int64 rows: a row's offset r * stride passes 2**31 elements in the head's per-token modulations at
    # ecar-xl scale (rows = 2 * 256 images * 256 tokens, stride 20 * 1280), and int32 would wrap
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_D)
    mask = (r < n_rows)[:, None] & (c < D)[None, :]
    r2 = r[:, None]
    c2 = c[None, :]

    x = tl.load(X + r2 * sx + c2, mask=mask, other=0.0)
    if RESIDUAL:
        y = tl.load(Y + r2 * sy + c2, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(GATE + (r2 // div_g) * sg + c2, mask=mask, other=0.0).to(tl.float32)
        # Round x_new to its stored dtype before normalizing, so h is exactly LN(the stored x_new).
        x = (x.to(tl.float32) + gate * y).to(X_OUT.dtype.element_ty)
        tl.store(X_OUT + r2 * s_xo + c2, x, mask=mask)
    xf = x.to(tl.float32)
    mean = tl.sum(xf, axis=1) / D
    diff = tl.where(mask, xf - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / D + eps)
    shift = tl.load(SHIFT + (r2 // div_shift) * s_shift + c2, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + (r2 // div_scale) * s_scale + c2, mask=mask, other=0.0).to(tl.float32)
    h = diff * rstd[:, None] * (1.0 + scale) + shift
    tl.store(H_OUT + r2 * s_ho + c2, h.to(H_OUT.dtype.element_ty), mask=mask)


def _mod_rows(mod: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The modulation as a [rows, D] matrix and how many rows of x share one of its rows."""
    if mod.shape == x.shape:
        return rows(mod), 1
    return rows(mod), x[0].numel() // x.shape[-1]


def _launch(x: torch.Tensor, gate: torch.Tensor | None, y: torch.Tensor | None, shift: torch.Tensor,
            scale: torch.Tensor, eps: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(x_new, h), x_new = x + gate * y (None without gate), h = LN(x_new) * (1 + scale) + shift."""
    residual = gate is not None
    d = x.shape[-1]
    x_out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual else None
    h_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    # Absent tensors still need a pointer and strides; x stands in, and the constexpr flag skips their loads.
    x2 = rows(x)
    y2 = rows(y) if residual else x2
    g2, div_g = _mod_rows(gate, x) if residual else (x2, 1)
    sh2, div_sh = _mod_rows(shift, x)
    sc2, div_sc = _mod_rows(scale, x)
    xo2 = rows(x_out) if residual else x2
    ho2 = rows(h_out)

    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(16, 4096 // block_d))
    n_rows = x2.shape[0]
    _adaln_kernel[(triton.cdiv(n_rows, block_r),)](
        x2, y2, g2, sh2, sc2, xo2, ho2,
        x2.stride(0), y2.stride(0), g2.stride(0), sh2.stride(0), sc2.stride(0), xo2.stride(0), ho2.stride(0),
        div_g, div_sh, div_sc, n_rows, d, eps,
        RESIDUAL=residual, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=8 if block_r * block_d >= 4096 else 4)
    return x_out, h_out


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LN(x) * (1 + scale) + shift, LayerNorm without affine, statistics in fp32."""
    return _launch(x, None, None, shift, scale, eps)[1]


def gated_residual_layernorm_modulate(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor,
                                      scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_new, LN(x_new) * (1 + scale) + shift) with x_new = x + gate * y, in one pass over x."""
    return _launch(x, gate, y, shift, scale, eps)


def _mod_ok(mod: torch.Tensor, x: torch.Tensor) -> bool:
    width_ok = x.dim() >= 2 and x.shape[-1] <= MAX_WIDTH
    return width_ok and (mod.shape == x.shape or mod.shape == (x.shape[0], x.shape[-1]))


def supports_layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> bool:
    return runs_on(x, shift, scale) and same_dtype(x, shift, scale) and _mod_ok(shift, x) and _mod_ok(scale, x)


def supports_gated_residual_layernorm_modulate(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor,
                                               shift: torch.Tensor, scale: torch.Tensor, eps: float) -> bool:
    return (runs_on(x, gate, y) and same_dtype(x, gate, y) and y.shape == x.shape and _mod_ok(gate, x)
            and supports_layernorm_modulate(x, shift, scale, eps))
