"""Every Triton kernel against its PyTorch reference (docs/KERNELS.md).

Without CUDA the kernels run in the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported), so shapes are tiny and odd, inputs are fresh random
draws, outputs are NaN-poisoned before the launch and out-of-bounds work shows up as a mismatch.
On a CUDA machine the same tests run the compiled kernels on the GPU.
"""
from __future__ import annotations

import zlib

import pytest
import torch

pytest.importorskip("triton")

from conftest import assert_matches_reference, compile_for_sm90, poison_new_tensors, random_model  # noqa: E402
from ecar_infer.kernels import (force_backend, reference, triton_adaln, triton_attention,  # noqa: E402
                                triton_euler, triton_renoise)
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


@pytest.mark.skipif(not INTERPRETING, reason="relies on the interpreter's single, known query block size")
def test_block_causal_attention_skips_masked_key_blocks(rand):
    """Keys of the last stage are NaN: query blocks that end before it must not even load them."""
    sizes = (1, 4, 16, 19)  # the first query block ends before the last stage starts
    stage_ids = stage_ids_for(sizes)
    b, l, h, d = 1, stage_ids.numel(), 2, 32
    q, k, v = (rand(b, l, h, d) for _ in range(3))
    last_start = l - sizes[-1]
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, last_start:] = float("nan")
    v_bad[:, last_start:] = float("nan")
    block_m = triton_attention._CONFIGS[0].kwargs["BLOCK_M"]
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


# ---- the model's ops, end to end ------------------------------------------------------------------

def test_model_forward_through_triton():
    """The AR transformer (whole sequence and stage by stage over the cache) and the flow head of a tiny
    random model give the same outputs through the Triton backends as through the reference."""
    from ecar_infer import ECARConfig
    from ecar_infer.cache import StaticKVCache
    from ecar_infer.kernels import chosen_backends

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
        with force_backend("triton"):
            got = run()
            used = chosen_backends()
    for op in ("stage_attention", "block_causal_attention", "layernorm_modulate",
               "gated_residual_layernorm_modulate"):
        assert used[op] == "triton", used
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


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
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """The interpreter never compiles a kernel, so build the GPU variants (bf16, and fp32 attention) for
    sm_90 with Triton's NVIDIA backend, which needs no GPU: it catches what only compilation sees."""
    compile_for_sm90(COMPILE_SCRIPT)
