"""Triton attention for the AR transformer: one stage over the static KV cache, and the whole sequence
under the block-causal mask.

References: reference.stage_attention and reference.block_causal_attention (NHD layout,
[batch, tokens, heads, head_dim]; softmax in fp32; output in q's dtype).

One kernel serves both: each program owns BLOCK_M queries of one (batch, head) and runs an online
softmax (base 2, fp32 running max, sum and accumulator) over key blocks. Head dims that are not powers of
two (72, 80, 96) are padded to the next power of two with masked loads.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_support import runs_on, same_dtype

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128


def launch_config(n_q: int, fp32: bool = False) -> dict:
    """The kernel's blocking, a function of the query count and dtype alone and never of timing. The key
    blocks (BLOCK_N) set the order of the online softmax's float sums, so a config chosen by timing
    (autotuning) could differ between processes (torchrun's ranks, a resumed run, another machine) and with
    it the last bits of their images; one fixed rule makes them all compute the same numbers. Query blocks
    are no taller than the stage needs (stage 1 has one token); the interpreter runs the same rule.

    fp32 tiles are twice the size of bf16 ones: pipelined over 3 stages they need about 180 KB of shared
    memory at head dim 128, more than an A100 (163 KB) or an sm_86/89 GPU (99 KB) has, so fp32 runs one
    stage (about 80 KB). The pipeline depth changes when tiles load, not the order of the sums."""
    block_m = min(64, max(16, triton.next_power_of_2(n_q)))
    stages = 1 if fp32 else 3 if block_m == 64 else 2
    return dict(BLOCK_M=block_m, BLOCK_N=64, num_warps=4, num_stages=stages)


@triton.jit(do_not_specialize=["n_q", "kv_len"])  # lengths only bound masks and loops: one binary per config
def _attention_kernel(Q, K, V, O, STAGE, STAGE_END,
                      sqb, sqn, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd, sob, son, soh, sod,
                      n_q, kv_len, n_heads, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_CAUSAL: tl.constexpr,
                      FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # A 1-D grid, query blocks fastest: a second axis of batch * heads would pass CUDA's 65535 limit on
    # grid axes 1 and 2 (16,384 guided rows of 4 heads), axis 0 allows 2**31 - 1.
    blocks_m = tl.cdiv(n_q, BLOCK_M)
    pid_m = tl.program_id(0) % blocks_m
    pid_bh = tl.program_id(0) // blocks_m
    b = (pid_bh // n_heads).to(tl.int64)  # b * batch stride passes 2**31 elements in a large cache
    h = pid_bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < n_q
    mask_d = offs_d < HEAD_DIM

    q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    k_base = K + b * skb + h * skh + offs_d[None, :] * skd
    v_base = V + b * svb + h * svh + offs_d[None, :] * svd

    if BLOCK_CAUSAL:
        # Padded query rows get the largest stage so they see every key (no all -inf rows).
        q_stage = tl.load(STAGE + offs_m, mask=mask_m, other=2147483647)
        # Stage ids never decrease, so no query of this block sees past the end of the block's last
        # query's stage: key blocks beyond it are fully masked and skipped.
        kv_end = tl.load(STAGE_END + tl.minimum(pid_m * BLOCK_M + BLOCK_M, n_q) - 1)
    else:
        kv_end = kv_len

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, kv_end, BLOCK_N):
        cols = start + offs_n
        valid_n = cols < kv_end
        k = tl.load(k_base + cols[:, None] * skn, mask=valid_n[:, None] & mask_d[None, :], other=0.0)
        if FP32:  # fp32 inputs must not silently drop to tf32
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        if BLOCK_CAUSAL:
            k_stage = tl.load(STAGE + cols, mask=valid_n, other=2147483647)
            visible = valid_n[None, :] & (k_stage[None, :] <= q_stage[:, None])
        else:
            visible = valid_n[None, :]
        s = tl.where(visible, s, float("-inf"))
        # Key 0 is in every row's first block and always visible, so m_new is finite from then on.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * svn, mask=valid_n[:, None] & mask_d[None, :], other=0.0)
        if FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int, stage: torch.Tensor | None,
            stage_end: torch.Tensor | None) -> torch.Tensor:
    batch, n_q, n_heads, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    config = launch_config(n_q, fp32=q.dtype == torch.float32)
    grid = (triton.cdiv(n_q, config["BLOCK_M"]) * batch * n_heads,)
    _attention_kernel[grid](q, k, v, out, stage, stage_end, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                            n_q, kv_len, n_heads, LOG2E / math.sqrt(head_dim),
                            HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                            BLOCK_CAUSAL=stage is not None, FP32=q.dtype == torch.float32, **config)
    return out


def stage_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Attention of q [B, n, H, Dh] over rows [0, kv_len) of k_cache, v_cache [B, L_max, H, Dh], no mask."""
    return _launch(q, k_cache, v_cache, kv_len, None, None)


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stage_ids: torch.Tensor) -> torch.Tensor:
    """Attention of q, k, v [B, L, H, Dh] where token i sees token j iff stage_ids[j] <= stage_ids[i]."""
    stage = stage_ids.to(device=q.device, dtype=torch.int32).contiguous()
    # stage_end[i]: one past the last token of token i's stage (stage ids are sorted).
    stage_end = torch.searchsorted(stage, stage, right=True, out_int32=True)
    return _launch(q, k, v, q.shape[1], stage, stage_end)


def _heads_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (runs_on(q, k, v) and same_dtype(q, k, v) and q.dim() == 4 and k.shape == v.shape
            and k.shape[0] == q.shape[0] and k.shape[2:] == q.shape[2:] and q.shape[-1] <= MAX_HEAD_DIM)


def supports_stage_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: int) -> bool:
    return _heads_ok(q, k_cache, v_cache) and isinstance(kv_len, int) and 1 <= kv_len <= k_cache.shape[1]


def supports_block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    stage_ids: torch.Tensor) -> bool:
    return (_heads_ok(q, k, v) and k.shape == q.shape and stage_ids.dim() == 1
            and stage_ids.shape[0] == q.shape[1] and not stage_ids.is_floating_point())
