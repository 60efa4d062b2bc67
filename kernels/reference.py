"""Plain-PyTorch references of every op on the sampling hot path.

These are the CPU path and the oracle every fast backend is tested against. Shapes and semantics here
are the contract for all backends (see kernels/dispatch.py):

* attention tensors are NHD: [batch, tokens, heads, head_dim];
* modulation tensors (shift, scale, gate) are either per sample, [B, D] for x of [B, N, D], or per
  token, the same shape as x;
* guidance weights are per sample, [B], for x of [B, ...].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BLOCK_NOISE_GAIN = 2.0 / math.sqrt(3.0)


def _per_sample(mod: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a [B, D] (per sample) or x-shaped (per token) modulation tensor against x."""
    if mod.shape == x.shape:
        return mod
    return mod.view(mod.shape[0], *([1] * (x.dim() - 2)), mod.shape[-1])


def stage_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Attention of one stage's queries over rows [0, kv_len) of the static KV cache, with no mask.

    q: [B, n, H, Dh]; k_cache, v_cache: [B, L_max, H, Dh]. Returns [B, n, H, Dh] in q's dtype.
    The softmax is computed in fp32.
    """
    k = k_cache[:, :kv_len]
    v = v_cache[:, :kv_len]
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.float()).to(q.dtype)


def block_causal_mask(stage_ids: torch.Tensor) -> torch.Tensor:
    """[L, L] boolean mask: token i may attend to token j iff stage(j) <= stage(i)."""
    return stage_ids[None, :] <= stage_ids[:, None]


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stage_ids: torch.Tensor) -> torch.Tensor:
    """Whole-sequence attention under the block-causal mask given by per-token stage ids.

    q, k, v: [B, L, H, Dh]; stage_ids: [L] integers, non-decreasing. Returns [B, L, H, Dh].
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    scores = scores.masked_fill(~block_causal_mask(stage_ids.to(q.device)), float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.float()).to(q.dtype)


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine (fp32 statistics), then x * (1 + scale) + shift."""
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    out = normed * (1 + _per_sample(scale, x).float()) + _per_sample(shift, x).float()
    return out.to(x.dtype)


def gated_residual_layernorm_modulate(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor,
                                      scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The AdaLN-Zero residual x_new = x + gate * y followed by the next LayerNorm + modulation:
    returns (x_new, modulated LN(x_new))."""
    x_new = x + _per_sample(gate, x) * y
    return x_new, layernorm_modulate(x_new, shift, scale, eps)


def guided_euler_step_(x: torch.Tensor, v_cond: torch.Tensor, v_uncond: torch.Tensor, w: torch.Tensor,
                       dr: float) -> torch.Tensor:
    """In place: x <- x + dr * (v_u + w * (v_c - v_u)), with w per sample ([B] for x of [B, ...])."""
    w = w.view(-1, *([1] * (x.dim() - 1))).to(torch.float32)
    v = v_uncond.float() + w * (v_cond.float() - v_uncond.float())
    x.add_((dr * v).to(x.dtype))
    return x


def euler_step_(x: torch.Tensor, v: torch.Tensor, dr: float) -> torch.Tensor:
    """In place: x <- x + dr * v."""
    x.add_((dr * v.float()).to(x.dtype))
    return x


def clamped_euler_step_(x: torch.Tensor, v_cond: torch.Tensor, v_uncond: torch.Tensor | None, w: torch.Tensor | None,
                        dr: float, keep: torch.Tensor, known_start: torch.Tensor, known_end: torch.Tensor,
                        r: float) -> torch.Tensor:
    """In place: the Euler step (guided when v_uncond is given, as guided_euler_step_; else as euler_step_),
    then the editing clamp at the step's new local ratio r (docs/MODEL.md, "Editing without retraining"):
    x <- where(keep, r * known_start + (1 - r) * known_end, x).

    keep: bool, x's shape; known_start, known_end: x's shape (fp32 in the engine).
    """
    if v_uncond is None:
        euler_step_(x, v_cond, dr)
    else:
        guided_euler_step_(x, v_cond, v_uncond, w, dr)
    known = r * known_start.float() + (1.0 - r) * known_end.float()
    return x.copy_(torch.where(keep, known.to(x.dtype), x))


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """2x nearest-neighbour upsampling of [B, C, h, w]."""
    return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


def block_noise(xi: torch.Tensor) -> torch.Tensor:
    """(2/sqrt(3)) * (xi - mean of xi over its 2x2 block): unit variance, zero block sums."""
    b, c, h, w = xi.shape
    block_mean = xi.view(b, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5), keepdim=True)
    return (BLOCK_NOISE_GAIN * (xi.view(b, c, h // 2, 2, w // 2, 2) - block_mean)).view(b, c, h, w)


def upsample_renoise(x_low: torch.Tensor, xi: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """alpha * Up(x_low) + beta * block_noise(xi): the jump from one stage's end to the next one's start.

    x_low: [B, C, h, w]; xi: [B, C, 2h, 2w] standard normal drawn by the caller. Returns [B, C, 2h, 2w].
    """
    return alpha * upsample2x(x_low) + beta * block_noise(xi)
