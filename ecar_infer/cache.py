"""A static KV cache for the stage-by-stage AR forward: preallocated once, written in place, never grown.

Layout per layer: k and v of [B, L, H, Dh] (NHD, so flash_attn_with_kvcache can read it directly).
Stage s writes rows [P_s, P_s + n_s) and attends over rows [0, P_s + n_s).
"""
from __future__ import annotations

import copy

import torch


class StaticKVCache:
    def __init__(self, depth: int, batch: int, total_tokens: int, num_heads: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (depth, 2, batch, total_tokens, num_heads, head_dim)
        self.buffer = torch.zeros(shape, device=device, dtype=dtype)

    def first_rows(self, rows: int) -> "StaticKVCache":
        """The cache of batch rows [0, rows): a view that reads and writes this cache's buffer."""
        view = copy.copy(self)
        view.buffer = self.buffer[:, :, :rows]  # each layer's k and v stay contiguous [rows, L, H, Dh]
        return view

    def keys(self, layer: int) -> torch.Tensor:
        return self.buffer[layer, 0]

    def values(self, layer: int) -> torch.Tensor:
        return self.buffer[layer, 1]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Copy one stage's k, v ([B, n, H, Dh]) into rows [start, start + n) of `layer`."""
        n = k.shape[1]
        self.buffer[layer, 0, :, start:start + n].copy_(k)
        self.buffer[layer, 1, :, start:start + n].copy_(v)
