"""flash-attn adapters for stage attention over the static KV cache (optional; never fails to import).

Reference: reference.stage_attention. The queries of a stage see every cached row [0, kv_len), their own
stage included, so causal=False: flash-attn's causal flag is bottom-right aligned, which would hide part
of the stage from its own queries.
"""
from __future__ import annotations

import functools

import torch

try:
    from flash_attn import flash_attn_func, flash_attn_with_kvcache
except Exception:  # not installed, or a build that does not match this torch/CUDA: other backends run
    flash_attn_func = flash_attn_with_kvcache = None

AVAILABLE = flash_attn_with_kvcache is not None
DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def stage_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: int) -> torch.Tensor:
    """One kernel reads the cache in place; cache_seqlens=kv_len bounds the rows it attends to."""
    return flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=kv_len, causal=False)


def stage_attention_func(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: int) -> torch.Tensor:
    """The same through flash_attn_func on the cache slices (benchmarked against the kv-cache entry point)."""
    return flash_attn_func(q, k_cache[:, :kv_len], v_cache[:, :kv_len], causal=False)


@functools.cache
def _ampere_or_newer(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 8


def accepts(device: torch.device, dtype: torch.dtype) -> bool:
    return AVAILABLE and device.type == "cuda" and dtype in DTYPES and _ampere_or_newer(device)


def supports(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: int) -> bool:
    head_dim = q.shape[-1]
    return (AVAILABLE and q.is_cuda and q.dtype in DTYPES and k_cache.dtype == v_cache.dtype == q.dtype
            and k_cache.device == v_cache.device == q.device and q.dim() == 4 and k_cache.shape == v_cache.shape
            and k_cache.shape[0] == q.shape[0] and k_cache.shape[2:] == q.shape[2:]
            and head_dim % 8 == 0 and head_dim <= MAX_HEAD_DIM
            and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
            and isinstance(kv_len, int) and 1 <= kv_len <= k_cache.shape[1] and _ampere_or_newer(q.device))
