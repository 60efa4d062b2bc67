"""The hot-path ops as the model and sampler call them: each call is dispatched to a backend.

Signatures and semantics are those of kernels/reference.py.
"""
from __future__ import annotations

import torch

from . import dispatch


def stage_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: int) -> torch.Tensor:
    return dispatch.call("stage_attention", q, k_cache, v_cache, kv_len)


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stage_ids: torch.Tensor) -> torch.Tensor:
    return dispatch.call("block_causal_attention", q, k, v, stage_ids)


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return dispatch.call("layernorm_modulate", x, shift, scale, eps)


def gated_residual_layernorm_modulate(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor,
                                      scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return dispatch.call("gated_residual_layernorm_modulate", x, gate, y, shift, scale, eps)


def guided_euler_step_(x: torch.Tensor, v_cond: torch.Tensor, v_uncond: torch.Tensor, w: torch.Tensor,
                       dr: float) -> torch.Tensor:
    return dispatch.call("guided_euler_step_", x, v_cond, v_uncond, w, dr)


def euler_step_(x: torch.Tensor, v: torch.Tensor, dr: float) -> torch.Tensor:
    return dispatch.call("euler_step_", x, v, dr)


def clamped_euler_step_(x: torch.Tensor, v_cond: torch.Tensor, v_uncond: torch.Tensor | None, w: torch.Tensor | None,
                        dr: float, keep: torch.Tensor, known_start: torch.Tensor, known_end: torch.Tensor,
                        r: float) -> torch.Tensor:
    return dispatch.call("clamped_euler_step_", x, v_cond, v_uncond, w, dr, keep, known_start, known_end, r)


def upsample_renoise(x_low: torch.Tensor, xi: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return dispatch.call("upsample_renoise", x_low, xi, alpha, beta)
