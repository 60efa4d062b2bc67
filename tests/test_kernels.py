"""Every Triton kernel against its PyTorch reference (docs/KERNELS.md).

Without CUDA the kernels run in the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported), so shapes are tiny and odd, inputs are fresh random
draws, outputs are NaN-poisoned before the launch and out-of-bounds work shows up as a mismatch.
On a CUDA machine the same tests run the compiled kernels on the GPU.
"""
from __future__ import annotations

import math
import subprocess
import sys
import zlib

import pytest
import torch

pytest.importorskip("triton")

from conftest import assert_matches_reference, compile_for_sm90, poison_new_tensors, random_model  # noqa: E402
from ecar_infer.kernels import (force_backend, ops, reference, triton_adaln, triton_attention,  # noqa: E402
                                triton_clamp, triton_euler, triton_renoise)
from ecar_infer.kernels.triton_support import INTERPRETING  # noqa: E402

DEVICE = "cpu" if INTERPRETING else "cuda"
DTYPES = [torch.float32, torch.float16]  # bf16 is broken in the interpreter: tests/gpu covers it

pytestmark = pytest.mark.skipif(not INTERPRETING and not torch.cuda.is_available(),
                                reason="triton kernels need CUDA or TRITON_INTERPRET=1")


@pytest.fixture
def rand(request):
    """randn(*shape, dtype=...) from a generator seeded by the test's id: fresh per test, reproducible."""
    gen = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))

    def draw(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    return draw


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    poison_new_tensors(monkeypatch)


def test_outputs_start_poisoned():
    assert torch.empty(3, device=DEVICE).isnan().all()


def fp32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.float() for t in tensors]


# ---- attention ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 72, 80, 96, 128])
def test_stage_attention(rand, dtype, head_dim):
    b, n, h, prefix, l_max = 2, 19, 3, 21, 45
    kv_len = prefix + n
    # q, k, v as the model makes them: views of one packed qkv projection, and a cache that is a slice
    # of a larger buffer whose rows past kv_len hold garbage (NaN here: they must never be read).
    q = rand(b, n, 3, h, head_dim, dtype=dtype)[:, :, 0]
    cache = rand(2, 2, b, l_max, h, head_dim, dtype=dtype)
    cache[:, :, :, kv_len:] = float("nan")
    k_cache, v_cache = cache[1, 0], cache[1, 1]
    out = triton_attention.stage_attention(q, k_cache, v_cache, kv_len)
    oracle = reference.stage_attention(*fp32(q, k_cache, v_cache), kv_len)
    assert_matches_reference(out, oracle, reference.stage_attention(q, k_cache, v_cache, kv_len))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, prefix", [(1, 0), (1, 20), (4, 1)])
def test_stage_attention_short_stages(rand, dtype, n, prefix):
    b, h, d = 3, 2, 72
    q, k_cache, v_cache = rand(b, n, h, d, dtype=dtype), rand(b, 25, h, d, dtype=dtype), rand(b, 25, h, d, dtype=dtype)
    out = triton_attention.stage_attention(q, k_cache, v_cache, prefix + n)
    oracle = reference.stage_attention(*fp32(q, k_cache, v_cache), prefix + n)
    assert_matches_reference(out, oracle, reference.stage_attention(q, k_cache, v_cache, prefix + n))


STAGE_SIZES = (1, 3, 9, 20)  # odd, and not aligned to the key blocks


def stage_ids_for(sizes: tuple[int, ...]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [16, 72])
def test_block_causal_attention(rand, dtype, head_dim):
    stage_ids = stage_ids_for(STAGE_SIZES)
    b, l, h = 2, stage_ids.numel(), 3
    q, k, v = (rand(b, l, h, head_dim, dtype=dtype) for _ in range(3))
    out = triton_attention.block_causal_attention(q, k, v, stage_ids)
    oracle = reference.block_causal_attention(*fp32(q, k, v), stage_ids)
    assert_matches_reference(out, oracle, reference.block_causal_attention(q, k, v, stage_ids))


def test_block_causal_attention_skips_masked_key_blocks(rand):
    """Keys of the last stage are NaN: query blocks that end before it must not even load them."""
    sizes = (1, 4, 16, 64, 19)  # the first query block (64 rows) ends before the last stage starts
    stage_ids = stage_ids_for(sizes)
    b, l, h, d = 1, stage_ids.numel(), 2, 32
    q, k, v = (rand(b, l, h, d) for _ in range(3))
    last_start = l - sizes[-1]
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, last_start:] = float("nan")
    v_bad[:, last_start:] = float("nan")
    block_m = triton_attention.launch_config(l)["BLOCK_M"]
    clean_rows = last_start // block_m * block_m  # rows in query blocks with no last-stage query
    assert clean_rows > 0
    out = triton_attention.block_causal_attention(q, k_bad, v_bad, stage_ids)
    expected = reference.block_causal_attention(q, k, v, stage_ids)
    torch.testing.assert_close(out[:, :clean_rows], expected[:, :clean_rows], atol=1e-5, rtol=1e-5)


# ---- AdaLN ----------------------------------------------------------------------------------------

def modulation(rand, x: torch.Tensor, per_token: bool, dtype: torch.dtype) -> torch.Tensor:
    return rand(*x.shape, dtype=dtype) if per_token else rand(x.shape[0], x.shape[-1], dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_token", [False, True])
def test_layernorm_modulate(rand, dtype, per_token):
    x = (rand(3, 7, 45, dtype=torch.float32) * 3 + 1).to(dtype)  # non-zero mean and non-unit variance
    shift, scale = modulation(rand, x, per_token, dtype), modulation(rand, x, per_token, dtype)
    out = triton_adaln.layernorm_modulate(x, shift, scale, 1e-6)
    oracle = reference.layernorm_modulate(*fp32(x, shift, scale), 1e-6)
    assert_matches_reference(out, oracle, reference.layernorm_modulate(x, shift, scale, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_modulate_strided_rows(rand, dtype):
    """The flow head's form: x [R, W] with per-token modulations sliced out of one [R, k, W] tensor."""
    x = rand(13, 37, dtype=dtype)
    mods = rand(13, 5, 37, dtype=dtype)
    shift, scale = mods[:, 0], mods[:, 1]
    out = triton_adaln.layernorm_modulate(x, shift, scale, 1e-6)
    oracle = reference.layernorm_modulate(*fp32(x, shift, scale), 1e-6)
    assert_matches_reference(out, oracle, reference.layernorm_modulate(x, shift, scale, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_token", [False, True])
def test_gated_residual_layernorm_modulate(rand, dtype, per_token):
    x, y = rand(3, 7, 45, dtype=dtype), rand(3, 7, 45, dtype=dtype)
    gate, shift, scale = (modulation(rand, x, per_token, dtype) for _ in range(3))
    x_new, h = triton_adaln.gated_residual_layernorm_modulate(x, gate, y, shift, scale, 1e-6)
    oracle = reference.gated_residual_layernorm_modulate(*fp32(x, gate, y, shift, scale), 1e-6)
    same = reference.gated_residual_layernorm_modulate(x, gate, y, shift, scale, 1e-6)
    assert_matches_reference(x_new, oracle[0], same[0])
    assert_matches_reference(h, oracle[1], same[1])
    # h is exactly the LayerNorm of the x_new that was stored
    h_of_stored = reference.layernorm_modulate(x_new.float(), *fp32(shift, scale), 1e-6)
    assert_matches_reference(h, h_of_stored, h_of_stored)


# ---- flow steps -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v_dtype", DTYPES)
def test_guided_euler_step_(rand, dtype, v_dtype):
    # The engine keeps x in fp32 and gets v in the model's dtype, so the dtypes may differ.
    x = rand(3, 5, 9, dtype=dtype)
    v_cond, v_uncond = rand(3, 5, 9, dtype=v_dtype), rand(3, 5, 9, dtype=v_dtype)
    w = rand(3).abs() + 1
    oracle = reference.guided_euler_step_(x.float().clone(), *fp32(v_cond, v_uncond), w, -0.1)
    same = reference.guided_euler_step_(x.clone(), v_cond, v_uncond, w, -0.1)
    ptr = x.data_ptr()
    assert triton_euler.guided_euler_step_(x, v_cond, v_uncond, w, -0.1) is x and x.data_ptr() == ptr
    assert_matches_reference(x, oracle, same)


@pytest.mark.parametrize("dtype", DTYPES)
def test_euler_step_(rand, dtype):
    x, v = rand(2, 11, 7, dtype=dtype), rand(2, 11, 7, dtype=dtype)
    oracle = reference.euler_step_(x.float().clone(), v.float(), 0.3)
    same = reference.euler_step_(x.clone(), v, 0.3)
    assert triton_euler.euler_step_(x, v, 0.3) is x
    assert_matches_reference(x, oracle, same)


def test_euler_step_strided_velocity(rand):
    """v[:b] of a doubled batch and a transposed v are both read correctly."""
    x = rand(3, 5, 4)
    v_t = rand(3, 4, 5).transpose(1, 2)
    oracle = reference.euler_step_(x.clone(), v_t, 0.25)
    torch.testing.assert_close(triton_euler.euler_step_(x, v_t, 0.25), oracle)


# ---- re-noise --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_upsample_renoise(rand, dtype):
    x_low, xi = rand(2, 3, 5, 7, dtype=dtype), rand(2, 3, 10, 14, dtype=dtype)
    out = triton_renoise.upsample_renoise(x_low, xi, 0.8, 0.35)
    oracle = reference.upsample_renoise(*fp32(x_low, xi), 0.8, 0.35)
    assert_matches_reference(out, oracle, reference.upsample_renoise(x_low, xi, 0.8, 0.35))


# ---- every kernel: several programs, any input layout, nothing written out of bounds ----------------

GUARD, SENTINEL = 64, 4096.0  # elements past each output that a kernel must leave alone, and their value


@pytest.fixture
def guarded_outputs(monkeypatch):
    """From now on (for the test), every float tensor made by torch.empty (the wrappers' outputs) is the
    front of a larger buffer whose GUARD last elements hold SENTINEL: the tails are returned, to check
    that no kernel stored past the end of its output (out-of-bounds stores are silent in the interpreter)."""
    empty, tails = torch.empty, []

    def guarded_empty(*shape, **kwargs):
        out = empty(*shape, **kwargs)
        if not out.is_floating_point():
            return out
        buf = empty(out.numel() + GUARD, dtype=out.dtype, device=out.device)
        buf[out.numel():] = SENTINEL
        tails.append(buf[out.numel():])
        return buf[:out.numel()].view(out.shape)

    monkeypatch.setattr(torch, "empty", guarded_empty)
    return tails


def in_guarded_storage(t: torch.Tensor, value: float = SENTINEL) -> tuple[torch.Tensor, torch.Tensor]:
    """A contiguous copy of t at the front of a buffer whose GUARD last elements hold `value`: (copy, tail)."""
    buf = torch.full((t.numel() + GUARD,), value, dtype=t.dtype, device=t.device)
    buf[:t.numel()] = t.reshape(-1)
    return buf[:t.numel()].view(t.shape), buf[t.numel():]


KERNEL_MODULES = {"euler_step_": triton_euler, "guided_euler_step_": triton_euler, "clamped_euler_step_": triton_clamp,
                  "upsample_renoise": triton_renoise, "layernorm_modulate": triton_adaln,
                  "gated_residual_layernorm_modulate": triton_adaln, "stage_attention": triton_attention,
                  "block_causal_attention": triton_attention}
IN_PLACE = ("euler_step_", "guided_euler_step_", "clamped_euler_step_")


def several_program_args(op: str, rand) -> tuple:
    """Arguments of `op` big enough for several programs of its kernel, the last one partial: 2139 elements
    for the flow steps (blocks of 1024), 594 low-resolution elements for the re-noise (blocks of 256), 33 rows
    for AdaLN (blocks of 16 rows at width 45) and 19 or 33 queries for attention (interpreted blocks of 16)."""
    if op in IN_PLACE:
        shape = (3, 23, 31)
        # inputs followed by ones, so that a store one past the end changes the value it finds there
        x, v_cond, v_uncond, start, end = (in_guarded_storage(rand(*shape), 1.0)[0] for _ in range(5))
        w, keep = rand(3).abs() + 1, rand(*shape) > 0.3
        return {"euler_step_": (x, v_cond, 0.3), "guided_euler_step_": (x, v_cond, v_uncond, w, -0.2),
                "clamped_euler_step_": (x, v_cond, v_uncond, w, -0.2, keep, start, end, 0.4)}[op]
    if op == "upsample_renoise":
        return rand(2, 3, 9, 11), rand(2, 3, 18, 22), 0.8, 0.35
    if op == "layernorm_modulate":
        return rand(3, 11, 45) * 3 + 1, rand(3, 11, 45), rand(3, 45), 1e-6
    if op == "gated_residual_layernorm_modulate":
        return rand(3, 11, 45), rand(3, 45), rand(3, 11, 45), rand(3, 11, 45), rand(3, 45), 1e-6
    if op == "stage_attention":
        return rand(2, 19, 3, 16), rand(2, 40, 3, 16), rand(2, 40, 3, 16), 37
    stage_ids = stage_ids_for(STAGE_SIZES)
    return rand(1, 33, 2, 16), rand(1, 33, 2, 16), rand(1, 33, 2, 16), stage_ids


# Compiled on a GPU, the checks of what only a GPU shows (a store past an output corrupts memory there; an
# int32 offset wraps at ecar-xl's sizes) are part of the GPU suite's `pytest -m gpu` as well; the rest of
# this file is covered there by tests/gpu/test_kernels_gpu.py at the models' own shapes.
ALSO_IN_THE_GPU_SUITE = (lambda test: test) if INTERPRETING else pytest.mark.gpu


@ALSO_IN_THE_GPU_SUITE
@pytest.mark.parametrize("op", list(KERNEL_MODULES))
def test_kernels_cover_several_programs_and_store_nothing_past_their_outputs(rand, guarded_outputs, op):
    """Every element of a multi-program launch is computed (a grid that drops the partial last block leaves
    elements unwritten), and no store lands past the end of an output or of the state updated in place (a
    mask of `offs <= n` writes one element too many: silent in the interpreter, memory corruption on a GPU)."""
    args = several_program_args(op, rand)
    in_place = op in IN_PLACE
    expected = getattr(reference, op)(*((args[0].clone(),) + args[1:] if in_place else args))
    tails = []
    if in_place:
        x, tail = in_guarded_storage(args[0])
        args, tails = (x,) + args[1:], [tail]
    got = getattr(KERNEL_MODULES[op], op)(*args)
    if in_place:
        assert got is args[0]
    for g, e in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)):
        assert_matches_reference(g, e, e)
    tails += guarded_outputs
    assert tails and all(t.eq(SENTINEL).all() for t in tails), "a kernel stored past the end of its output"


@pytest.mark.parametrize("causal", [False, True], ids=["stage", "block-causal"])
def test_attention_reads_q_k_v_and_writes_through_each_ones_own_strides(rand, causal):
    """q a view of a packed projection, k stored head-major (HND), v with a head-dim stride that is not 1:
    each tensor is read through its own strides (the kernel takes all twelve), not another's."""
    b, h, d = 2, 3, 24
    n, length = (33, 33) if causal else (13, 30)
    q = rand(b, n, 3, h, d)[:, :, 0]
    k = rand(b, h, length, d).transpose(1, 2)
    v = rand(b, length, d, h).transpose(-1, -2)
    assert len({q.stride(), k.stride(), v.stride()}) == 3 and v.stride(-1) != 1
    if causal:
        stage_ids = stage_ids_for(STAGE_SIZES)
        out = triton_attention.block_causal_attention(q, k, v, stage_ids)
        expected = reference.block_causal_attention(q, k, v, stage_ids)
    else:
        out = triton_attention.stage_attention(q, k, v, 25)
        expected = reference.stage_attention(q, k, v, 25)
    assert_matches_reference(out, expected, expected)


@pytest.mark.parametrize("residual, per_token", [(False, "shift"), (False, "scale"), (True, "gate"), (True, "shift"),
                                                   (True, "scale")])
def test_adaln_takes_any_rank_and_modulations_of_any_layout(rand, residual, per_token):
    """x of [B, T, N, D]; one modulation per token, the others per sample (one row for all T*N rows of x of a
    sample), so each is read with its own row divisor; every modulation is stored with a column stride
    that is not 1 (transposed views)."""
    x = rand(2, 3, 5, 45) * 2 + 1

    def modulation(name: str) -> torch.Tensor:
        if name == per_token:
            return rand(2, 3, 45, 5).transpose(-1, -2)  # [2, 3, 5, 45], column stride 5
        return rand(45, 2).t()                           # [2, 45], column stride 2

    gate, shift, scale = modulation("gate"), modulation("shift"), modulation("scale")
    assert shift.stride(-1) != 1 and scale.stride(-1) != 1
    if residual:
        y = rand(2, 3, 5, 45)
        got = triton_adaln.gated_residual_layernorm_modulate(x, gate, y, shift, scale, 1e-6)
        expected = reference.gated_residual_layernorm_modulate(x, gate, y, shift, scale, 1e-6)
    else:
        got = (triton_adaln.layernorm_modulate(x, shift, scale, 1e-6),)
        expected = (reference.layernorm_modulate(x, shift, scale, 1e-6),)
    for g, e in zip(got, expected):
        assert_matches_reference(g, e, e)


@pytest.mark.parametrize("eps", [1e-6, 0.3])
def test_adaln_adds_eps_to_the_variance(rand, eps):
    """LN(x) = (x - mean) / sqrt(var + eps): with rows of small variance a large eps shows where it is added."""
    x = rand(3, 5, 45) * 0.2 + 1
    shift, scale = rand(3, 45), rand(3, 45)
    expected = reference.layernorm_modulate(x, shift, scale, eps)
    assert_matches_reference(triton_adaln.layernorm_modulate(x, shift, scale, eps), expected, expected)


def test_upsample_renoise_reads_strided_inputs(rand):
    x_low = rand(2, 3, 7, 5).transpose(-1, -2)   # [2, 3, 5, 7], not contiguous
    xi = rand(2, 3, 14, 10).transpose(-1, -2)    # [2, 3, 10, 14]
    assert not x_low.is_contiguous() and not xi.is_contiguous()
    expected = reference.upsample_renoise(x_low, xi, 0.8, 0.35)
    assert_matches_reference(triton_renoise.upsample_renoise(x_low, xi, 0.8, 0.35), expected, expected)


def test_guided_euler_step_reads_strided_velocities_and_weights(rand):
    """A transposed v_cond, v_uncond the second half of a doubled batch, and w every other element of a
    longer vector: the kernel reads each through its own layout."""
    x = rand(3, 5, 4)
    v_cond = rand(3, 4, 5).transpose(1, 2)
    v_uncond = rand(6, 5, 4)[3:]
    w = (rand(6).abs() + 1)[::2]
    assert not v_cond.is_contiguous() and not w.is_contiguous()
    expected = reference.guided_euler_step_(x.clone(), v_cond, v_uncond, w, -0.3)
    assert_matches_reference(triton_euler.guided_euler_step_(x, v_cond, v_uncond, w, -0.3), expected, expected)


@pytest.mark.parametrize("guided", [False, True])
def test_flow_step_on_a_strided_x_updates_x_in_place_under_a_forced_triton(rand, guided):
    """The kernels write x through a flat pointer: a strided x must go to a backend that updates it (the
    supports check refuses the call), never to a contiguous copy that is thrown away."""
    x = rand(2, 3, 5).transpose(1, 2)   # [2, 5, 3], not contiguous
    v_cond, v_uncond, w = rand(2, 5, 3), rand(2, 5, 3), rand(2).abs() + 1
    assert not x.is_contiguous()
    if guided:
        expected = reference.guided_euler_step_(x.clone(), v_cond, v_uncond, w, -0.5)
        with force_backend("triton"):
            assert ops.guided_euler_step_(x, v_cond, v_uncond, w, -0.5) is x
    else:
        expected = reference.euler_step_(x.clone(), v_cond, -0.5)
        with force_backend("triton"):
            assert ops.euler_step_(x, v_cond, -0.5) is x
    torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("guided", [False, True])
def test_flow_steps_on_fp32_x_with_half_velocities_round_only_the_result(rand, backend, guided):
    """The engine keeps x in fp32 and gets v in the model's (half) dtype. Both backends compute the step in
    fp32 and round x once, on the store: the result is x + dr * v in exact arithmetic, to fp32 precision
    (rounding dr * v to v's dtype first would be off by about 1e-3 here)."""
    x = rand(3, 7, 5)
    v_cond, v_uncond = (rand(3, 7, 5, dtype=torch.float16) * 3 for _ in range(2))
    w, dr = rand(3).abs() + 1, -0.7
    vc, vu = v_cond.double(), v_uncond.double()
    v = vu + w.double().view(-1, 1, 1) * (vc - vu) if guided else vc
    exact = x.double() + dr * v
    module = reference if backend == "reference" else triton_euler
    got = (module.guided_euler_step_(x, v_cond, v_uncond, w, dr) if guided else module.euler_step_(x, v_cond, dr))
    torch.testing.assert_close(got.double(), exact, rtol=2e-6, atol=2e-6)


# ---- the model's ops, end to end ------------------------------------------------------------------

def test_model_forward_through_triton():
    """The AR transformer (whole sequence and stage by stage over the cache) and the flow head of a tiny
    random model give the same outputs through the Triton backends as through the reference."""
    from ecar_infer import ECARConfig
    from ecar_infer.cache import StaticKVCache
    from ecar_infer.kernels import chosen_backends, clear_chosen_backends

    config = ECARConfig.preset("ecar-tiny")
    model = random_model(config).to(DEVICE)
    plan, gen = model.plan, torch.Generator().manual_seed(1)
    labels = torch.tensor([3, 7], device=DEVICE)
    ups = [torch.randn(2, config.latent_channels, side, side, generator=gen).to(DEVICE)
           for side in plan.latent_sides[1:]]
    x = torch.randn(2 * plan.tokens[-1], config.token_dim, generator=gen).to(DEVICE)
    sigma = torch.rand(x.shape[0], generator=gen).to(DEVICE)

    def run() -> list[torch.Tensor]:
        full = model.forward_full(labels, ups)
        mods = model.trunk.condition(labels)
        cache = StaticKVCache(config.depth, 2, plan.total_tokens, config.num_heads, config.head_dim, DEVICE,
                              torch.float32)
        staged = [model.trunk.forward_stage(s, model.trunk.stage_inputs(s, labels, ([None] + ups)[s]), mods, cache)
                  for s in range(plan.num_stages)]
        v = model.head(x, sigma, full[:, plan.stage_slice(plan.num_stages - 1)].flatten(0, 1))
        return [full, torch.cat(staged, dim=1), v]

    with torch.no_grad():
        with force_backend("reference"):
            expected = run()
        clear_chosen_backends()   # the record keeps earlier tests' choices: only this run's may count
        with force_backend("triton"):
            got = run()
            used = chosen_backends()
    for op in ("stage_attention", "block_causal_attention", "layernorm_modulate",
               "gated_residual_layernorm_modulate"):
        assert used[op] == "triton", used
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


# ---- the compiled path, without a GPU ---------------------------------------------------------------

COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ecar_infer.kernels import triton_adaln, triton_attention, triton_euler, triton_renoise

def build(kernel, consts, pointers, floats=(), num_warps=4):
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    sig = {name: "constexpr" if name in consts else pointers.get(name) or ("fp32" if name in floats else "i32")
           for name in fn.arg_names}
    triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})

for dtype, causal in (("bf16", False), ("bf16", True), ("fp32", False)):
    pointers = dict.fromkeys(("Q", "K", "V", "O"), "*" + dtype)
    consts = dict(HEAD_DIM=72, BLOCK_D=128, BLOCK_CAUSAL=causal, FP32=dtype == "fp32", BLOCK_M=64, BLOCK_N=64)
    if causal:
        pointers.update(STAGE="*i32", STAGE_END="*i32")
    else:
        consts.update(STAGE=None, STAGE_END=None)
    build(triton_attention._attention_kernel, consts, pointers, floats=("qk_scale",))
for residual in (True, False):
    pointers = dict.fromkeys(("X", "Y", "GATE", "SHIFT", "SCALE", "X_OUT", "H_OUT"), "*bf16")
    build(triton_adaln._adaln_kernel, dict(RESIDUAL=residual, BLOCK_R=2, BLOCK_D=2048), pointers,
          floats=("eps",), num_warps=8)
for guided in (True, False):
    pointers = {"X": "*fp32", "V_COND": "*bf16", "V_UNCOND": "*bf16", "W": "*fp32"}
    build(triton_euler._euler_kernel, dict(GUIDED=guided, BLOCK=1024), pointers, floats=("dr",))
build(triton_renoise._upsample_renoise_kernel, dict(BLOCK=256), dict.fromkeys(("X_LOW", "XI", "OUT"), "*bf16"),
      floats=("alpha", "beta_gain"))
# attention's launch config, at the largest head dim, fits the shared memory of every GPU it may run on
# (bytes a block may use: sm_80 A100, sm_86/89 consumer and L40 cards, sm_90 H100)
SHARED_LIMITS = {80: 166912, 86: 101376, 90: 232448}
for dtype in ("bf16", "fp32"):
    config = triton_attention.launch_config(64, fp32=dtype == "fp32")
    consts = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_CAUSAL=True, FP32=dtype == "fp32", BLOCK_M=config["BLOCK_M"],
                  BLOCK_N=config["BLOCK_N"])
    pointers = dict.fromkeys(("Q", "K", "V", "O"), "*" + dtype) | dict(STAGE="*i32", STAGE_END="*i32")
    sig = {name: "constexpr" if name in consts else pointers.get(name) or ("fp32" if name == "qk_scale" else "i32")
           for name in triton_attention._attention_kernel.arg_names}
    for arch, limit in SHARED_LIMITS.items():
        options = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
        compiled = triton.compile(ASTSource(triton_attention._attention_kernel, sig, consts),
                                  target=GPUTarget("cuda", arch, 32), options=options)
        assert compiled.metadata.shared <= limit, (dtype, arch, compiled.metadata.shared, limit)
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """The interpreter never compiles a kernel, so build the GPU variants (bf16, and fp32 attention) for
    sm_90 with Triton's NVIDIA backend, which needs no GPU: it catches what only compilation sees."""
    compile_for_sm90(COMPILE_SCRIPT)


def test_attention_grid_stays_within_cuda_limits_for_large_batches(monkeypatch):
    """CUDA caps grid axes 1 and 2 at 65,535 programs: batch * heads there failed to launch for 16,384
    guided rows of 4 heads (an 8,192-image request of ecar-digits32 in one chunk). The interpreter has no
    such limit, so the grid is checked here."""
    launched = []

    class Recorder:
        def __getitem__(self, grid):
            launched.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(triton_attention, "_attention_kernel", Recorder())
    q = torch.empty(16384, 3, 4, 32)
    triton_attention.stage_attention(q, torch.empty(16384, 5, 4, 32), torch.empty(16384, 5, 4, 32), 5)
    (grid,) = launched
    assert math.prod(grid) == 16384 * 4 and grid[0] <= 2**31 - 1 and all(n <= 65535 for n in grid[1:])


def test_attention_blocking_depends_on_the_query_count_alone():
    """The key blocking orders the float sums, so it is fixed by the shapes, never chosen by timing: every
    process (torchrun's ranks, a resumed run) computes the same bits. The query blocks fit the stage."""
    import triton

    assert not isinstance(triton_attention._attention_kernel, triton.runtime.Autotuner)
    for n_q, block_m in ((1, 16), (4, 16), (17, 32), (64, 64), (256, 64), (341, 64)):
        assert triton_attention.launch_config(n_q)["BLOCK_M"] == block_m
        assert triton_attention.launch_config(n_q)["BLOCK_N"] == 64


# ---- offsets past 2**31 elements -----------------------------------------------------------------

# Runs in a child process: an offset that wraps in int32 reads or writes far outside its tensor, which in
# the interpreter is a segfault rather than a mismatch. The tensors are views whose rows lie a huge
# stride apart in one storage, as the flow head's modulations do at ecar-xl scale; only the pages the
# kernel touches become resident (a few MB of a 4-7 GB storage on the CPU).
FAR_APART_ROWS = """
import math, sys, torch
from ecar_infer.kernels import reference, triton_adaln, triton_attention
device, op = sys.argv[1], sys.argv[2]
gen = torch.Generator().manual_seed(0)

def far_apart(shape, stride0):
    inner = [math.prod(shape[i + 1:]) for i in range(1, len(shape))]
    view = torch.empty(shape[0] * stride0, dtype=torch.float16, device=device).as_strided(shape, (stride0, *inner))
    return view.copy_(torch.randn(shape, generator=gen))

def small(*shape):
    return torch.randn(shape, generator=gen).to(device, torch.float16)

if op == "adaln":   # row 1024 starts at element 2**31
    x, shift, scale = far_apart((1025, 24), 2**21), small(1025, 24), small(1025, 24)
    out, ref = triton_adaln.layernorm_modulate(x, shift, scale, 1e-6), reference.layernorm_modulate(x, shift, scale, 1e-6)
else:               # image 2's queries start at element 2 * (2**30 + 64)
    q, k, v = far_apart((3, 5, 2, 16), 2**30 + 64), small(3, 7, 2, 16), small(3, 7, 2, 16)
    out, ref = triton_attention.stage_attention(q, k, v, 7), reference.stage_attention(q, k, v, 7)
torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
"""


@ALSO_IN_THE_GPU_SUITE
@pytest.mark.parametrize("op", ["adaln", "attention"])
def test_row_offsets_past_2_31_elements_do_not_wrap(op):
    child = subprocess.run([sys.executable, "-c", FAR_APART_ROWS, DEVICE, op], capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, f"exit status {child.returncode}\n{child.stderr[-3000:]}"
