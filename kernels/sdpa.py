"""torch scaled_dot_product_attention adapters for the two attention ops (NHD in, NHD out)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import block_causal_mask


def stage_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: int) -> torch.Tensor:
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k_cache[:, :kv_len], v_cache[:, :kv_len]))
    return F.scaled_dot_product_attention(q_, k_, v_).transpose(1, 2)


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stage_ids: torch.Tensor) -> torch.Tensor:
    mask = block_causal_mask(stage_ids.to(q.device))
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask).transpose(1, 2)


def accepts(device: torch.device, dtype: torch.dtype) -> bool:
    """SDPA is used for half precision and on CUDA; fp32 on the CPU stays on the exact reference."""
    return device.type == "cuda" or dtype in (torch.float16, torch.bfloat16)
