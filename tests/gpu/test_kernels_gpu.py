"""The compiled Triton kernels and the flash-attn adapter on a CUDA GPU: bf16 (which the interpreter cannot
run), ecar-xl's real stage shapes, the automatic backend choice, CUDA-graph replay and a whole generate().

Skipped without CUDA (the `gpu` marker, tests/conftest.py). Run: pytest tests/gpu -m gpu
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from conftest import assert_matches_reference, poison_new_tensors  # noqa: E402
from ecar_infer import ECARConfig  # noqa: E402
from ecar_infer.stages import StagePlan  # noqa: E402
from ecar_infer.kernels import (dispatch, flash, force_backend, ops, reference, triton_adaln,  # noqa: E402
                                triton_attention, triton_euler, triton_renoise)

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HALF = [torch.float16, torch.bfloat16]
XL = ECARConfig.preset("ecar-xl")
XL_PLAN = StagePlan(XL)
XL_STAGES = list(zip(XL_PLAN.tokens, XL_PLAN.prefixes))  # (tokens, prefix) of ecar-xl's five stages
XL_TOKENS, XL_HEADS, XL_WIDTH, XL_HEAD_WIDTH = XL_PLAN.total_tokens, XL.num_heads, XL.width, XL.head_width


@pytest.fixture
def gen():
    return torch.Generator(device=DEVICE).manual_seed(0)


def randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, device=DEVICE).to(dtype)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    poison_new_tensors(monkeypatch)


def fp32(*tensors):
    return [t.float() for t in tensors]


def sdpa_nhd(q, k, v, mask=None):
    """torch SDPA at the inputs' own precision: the same-precision baseline for attention, as in
    flash-attn's tests (it rounds the probabilities to the input dtype, as the kernels do)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 72, 80, 96, 128])
@pytest.mark.parametrize("n, prefix", XL_STAGES)
def test_stage_attention_xl_stages(gen, dtype, head_dim, n, prefix):
    b, kv_len = 8, prefix + n
    q = randn(gen, b, n, XL_HEADS, head_dim, dtype=dtype)
    k_cache, v_cache = (randn(gen, b, XL_TOKENS, XL_HEADS, head_dim, dtype=dtype) for _ in range(2))
    k_cache[:, kv_len:] = float("nan")  # rows past kv_len are never read
    v_cache[:, kv_len:] = float("nan")
    out = triton_attention.stage_attention(q, k_cache, v_cache, kv_len)
    oracle = reference.stage_attention(*fp32(q, k_cache, v_cache), kv_len)
    assert_matches_reference(out, oracle, sdpa_nhd(q, k_cache[:, :kv_len], v_cache[:, :kv_len]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 72])
def test_block_causal_attention_xl(gen, dtype, head_dim):
    stage_ids = XL_PLAN.stage_ids(DEVICE)
    q, k, v = (randn(gen, 4, XL_TOKENS, XL_HEADS, head_dim, dtype=dtype) for _ in range(3))
    out = triton_attention.block_causal_attention(q, k, v, stage_ids)
    oracle = reference.block_causal_attention(*fp32(q, k, v), stage_ids)
    assert_matches_reference(out, oracle, sdpa_nhd(q, k, v, reference.block_causal_mask(stage_ids)))


@pytest.mark.skipif(not flash.AVAILABLE, reason="flash-attn is not installed")
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("n, prefix", XL_STAGES)
def test_flash_stage_attention(gen, dtype, n, prefix):
    b, kv_len = 8, prefix + n
    q = randn(gen, b, n, XL_HEADS, 72, dtype=dtype)
    k_cache, v_cache = (randn(gen, b, XL_TOKENS, XL_HEADS, 72, dtype=dtype) for _ in range(2))
    oracle = reference.stage_attention(*fp32(q, k_cache, v_cache), kv_len)
    same = sdpa_nhd(q, k_cache[:, :kv_len], v_cache[:, :kv_len])
    assert flash.supports(q, k_cache, v_cache, kv_len)
    assert_matches_reference(flash.stage_attention(q, k_cache, v_cache, kv_len), oracle, same)
    assert_matches_reference(flash.stage_attention_func(q, k_cache, v_cache, kv_len), oracle, same)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adaln_trunk_shapes(gen, dtype):
    """Per-sample modulation at the AR transformer's width, on the largest stage."""
    x, y = (randn(gen, 8, 256, XL_WIDTH, dtype=dtype) for _ in range(2))
    gate, shift, scale = (randn(gen, 8, XL_WIDTH, dtype=dtype) for _ in range(3))
    out = triton_adaln.gated_residual_layernorm_modulate(x, gate, y, shift, scale, 1e-6)
    oracle = reference.gated_residual_layernorm_modulate(*fp32(x, gate, y, shift, scale), 1e-6)
    same = reference.gated_residual_layernorm_modulate(x, gate, y, shift, scale, 1e-6)
    assert_matches_reference(out[0], oracle[0], same[0])
    assert_matches_reference(out[1], oracle[1], same[1])
    h = triton_adaln.layernorm_modulate(x, shift, scale, 1e-6)
    assert_matches_reference(h, reference.layernorm_modulate(*fp32(x, shift, scale), 1e-6),
                             reference.layernorm_modulate(x, shift, scale, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_adaln_head_shapes(gen, dtype):
    """Per-token modulation at the flow head's width: rows sliced out of one [R, 3K+2, W] tensor."""
    rows = 8 * 256
    x, y = (randn(gen, rows, XL_HEAD_WIDTH, dtype=dtype) for _ in range(2))
    mods = randn(gen, rows, 20, XL_HEAD_WIDTH, dtype=dtype)
    gate, shift, scale = mods[:, 2], mods[:, 3], mods[:, 4]
    x_new, h = triton_adaln.gated_residual_layernorm_modulate(x, gate, y, shift, scale, 1e-6)
    oracle = reference.gated_residual_layernorm_modulate(*fp32(x, gate, y, shift, scale), 1e-6)
    same = reference.gated_residual_layernorm_modulate(x, gate, y, shift, scale, 1e-6)
    assert_matches_reference(x_new, oracle[0], same[0])
    assert_matches_reference(h, oracle[1], same[1])


@pytest.mark.parametrize("v_dtype", DTYPES)
def test_euler_steps_xl(gen, v_dtype):
    """x stays fp32 (as in the engine); the velocities come in the model's dtype."""
    x = randn(gen, 64, 256, 16)
    v_cond, v_uncond = (randn(gen, 64, 256, 16, dtype=v_dtype) for _ in range(2))
    w = torch.rand(64, generator=gen, device=DEVICE) * 4
    oracle = reference.guided_euler_step_(x.clone(), *fp32(v_cond, v_uncond), w, -0.05)
    same = reference.guided_euler_step_(x.clone(), v_cond, v_uncond, w, -0.05)
    assert triton_euler.guided_euler_step_(x, v_cond, v_uncond, w, -0.05) is x
    assert_matches_reference(x, oracle, same)
    oracle = reference.euler_step_(x.clone(), v_cond.float(), -0.05)
    same = reference.euler_step_(x.clone(), v_cond, -0.05)
    assert_matches_reference(triton_euler.euler_step_(x, v_cond, -0.05), oracle, same)


@pytest.mark.parametrize("dtype", DTYPES)
def test_upsample_renoise_xl(gen, dtype):
    x_low, xi = randn(gen, 64, 4, 16, 16, dtype=dtype), randn(gen, 64, 4, 32, 32, dtype=dtype)
    out = triton_renoise.upsample_renoise(x_low, xi, 0.75, 0.6)
    oracle = reference.upsample_renoise(*fp32(x_low, xi), 0.75, 0.6)
    assert_matches_reference(out, oracle, reference.upsample_renoise(x_low, xi, 0.75, 0.6))


def test_automatic_choice_on_cuda(gen):
    q = randn(gen, 2, 4, XL_HEADS, 72, dtype=torch.bfloat16)
    cache = randn(gen, 2, XL_TOKENS, XL_HEADS, 72, dtype=torch.bfloat16)
    x = randn(gen, 2, 4, XL_WIDTH, dtype=torch.bfloat16)
    mod = randn(gen, 2, XL_WIDTH, dtype=torch.bfloat16)
    assert dispatch.select("stage_attention", q, cache, cache, 5).name == ("flash" if flash.AVAILABLE else "triton")
    assert dispatch.select("stage_attention", q.float(), cache.float(), cache.float(), 5).name == "triton"
    assert dispatch.select("layernorm_modulate", x, mod, mod, 1e-6).name == "triton"
    assert dispatch.select("layernorm_modulate", x.cpu(), mod.cpu(), mod.cpu(), 1e-6).name == "reference"


def test_triton_kernels_replay_in_a_cuda_graph(gen):
    """After a warm-up (autotuning, compilation) the kernels capture, and replay reads new inputs."""
    q = randn(gen, 8, 64, XL_HEADS, 72, dtype=torch.bfloat16)
    cache = randn(gen, 8, XL_TOKENS, XL_HEADS, 72, dtype=torch.bfloat16)
    x = randn(gen, 8, 64, 16)
    v = randn(gen, 8, 64, 16, dtype=torch.bfloat16)

    def step():
        ops.euler_step_(x, v, 0.5)
        return ops.stage_attention(q, cache, cache, 85)

    with force_backend("triton"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        q.copy_(randn(gen, *q.shape, dtype=q.dtype))
        x_before = x.clone()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(x, reference.euler_step_(x_before, v, 0.5))
        torch.testing.assert_close(out, triton_attention.stage_attention(q, cache, cache, 85))


def test_generate_through_fast_backends_matches_reference():
    """A whole generate() on the GPU in fp32: automatic backends (Triton) against the reference."""
    from ecar_infer import ECARConfig, Sampler

    # tf32=False: TF32 matmuls (generate's default) would move the reference run's attention by ~1e-2
    sampler = Sampler.from_config(ECARConfig.preset("ecar-tiny"), device="cuda", dtype="fp32", seed=0, tf32=False)
    kwargs = dict(class_labels=[1, 2], seed=0, cfg_scale=2.0, steps_per_stage=2, output_type="latent",
                  progress=False)
    with force_backend("reference"):
        expected = sampler.generate(**kwargs).images
    got = sampler.generate(**kwargs).images
    assert dispatch.chosen_backends()["layernorm_modulate"] == "triton"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
