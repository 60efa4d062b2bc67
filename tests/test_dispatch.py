"""The backend dispatch: preference order, forcing (ECAR_BACKEND and force_backend), per-call fallback,
the once-per-(op, device, dtype, forced) resolution, one-time logging, clear errors, and an import that
survives missing optional packages."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from ecar_infer.kernels import dispatch, flash, ops

HAS_TRITON = "triton" in dispatch.registered("layernorm_modulate")
needs_interpreter = pytest.mark.skipif(
    not (HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"), reason="needs triton in interpreter mode")


@pytest.fixture(autouse=True)
def clean_dispatch(monkeypatch):
    """No ECAR_BACKEND from the caller's shell, a fresh once-only log, and the variable read again after
    the test (it is read once per process)."""
    monkeypatch.delenv("ECAR_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "_logged", set())
    dispatch.reread_environment()
    yield
    dispatch.reread_environment()


def set_env_backend(monkeypatch, value: str) -> None:
    monkeypatch.setenv("ECAR_BACKEND", value)
    dispatch.reread_environment()


def ln_args(dtype=torch.float32):
    x = torch.randn(2, 3, 8, dtype=dtype)
    return x, torch.randn(2, 8, dtype=dtype), torch.randn(2, 8, dtype=dtype), 1e-6


def attention_args(dtype=torch.float32):
    q = torch.randn(1, 2, 2, 16, dtype=dtype)
    return q, torch.randn(1, 5, 2, 16, dtype=dtype), torch.randn(1, 5, 2, 16, dtype=dtype), 4


def test_preference_order():
    assert dispatch.registered("stage_attention")[-2:] == ["sdpa", "reference"]
    assert dispatch.registered("layernorm_modulate")[-1] == "reference"
    if flash.AVAILABLE:
        assert dispatch.registered("stage_attention")[0] == "flash"
    if HAS_TRITON:
        assert dispatch.registered("upsample_renoise") == ["triton", "reference"]


def test_cpu_defaults():
    """On the CPU, fp32 stays on the exact reference; half-precision attention goes to SDPA; the Triton
    interpreter is never an automatic choice, even when TRITON_INTERPRET=1."""
    assert dispatch.select("layernorm_modulate", *ln_args()).name == "reference"
    assert dispatch.select("stage_attention", *attention_args()).name == "reference"
    assert dispatch.select("stage_attention", *attention_args(torch.float16)).name == "sdpa"


def test_env_variable_forces_a_backend(monkeypatch):
    set_env_backend(monkeypatch, "reference")  # half-precision attention would go to SDPA
    assert dispatch.forced_backend() == "reference"
    assert dispatch.select("stage_attention", *attention_args(torch.float16)).name == "reference"
    set_env_backend(monkeypatch, " Auto ")
    assert dispatch.forced_backend() is None


def test_env_variable_is_read_once(monkeypatch):
    set_env_backend(monkeypatch, "reference")
    assert dispatch.forced_backend() == "reference"
    monkeypatch.setenv("ECAR_BACKEND", "sdpa")  # a later change is not seen ...
    assert dispatch.forced_backend() == "reference"
    dispatch.reread_environment()               # ... until the variable is read again
    assert dispatch.forced_backend() == "sdpa"


@needs_interpreter
def test_env_variable_forces_triton(monkeypatch):
    set_env_backend(monkeypatch, "triton")
    assert dispatch.select("layernorm_modulate", *ln_args()).name == "triton"


def test_context_manager_forces_and_nests(monkeypatch):
    set_env_backend(monkeypatch, "sdpa")
    with dispatch.force_backend("reference"):
        assert dispatch.select("stage_attention", *attention_args(torch.float16)).name == "reference"
        with dispatch.force_backend("auto"):
            assert dispatch.forced_backend() is None
            assert dispatch.select("stage_attention", *attention_args(torch.float16)).name == "sdpa"
        assert dispatch.forced_backend() == "reference"
    assert dispatch.forced_backend() == "sdpa"


@needs_interpreter
def test_force_triton_runs_triton():
    with dispatch.force_backend("triton"):
        out = ops.layernorm_modulate(*ln_args())
    assert dispatch.chosen_backends()["layernorm_modulate"] == "triton"
    assert out.shape == (2, 3, 8)


@needs_interpreter
def test_forced_backend_that_cannot_run_falls_back_with_one_warning(caplog):
    caplog.set_level(logging.INFO, logger="ecar_infer.kernels")
    with dispatch.force_backend("triton"):
        for _ in range(2):  # bf16 does not run in the interpreter
            ops.layernorm_modulate(*ln_args(torch.bfloat16))
    assert dispatch.chosen_backends()["layernorm_modulate"] == "reference"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot run it for this call" in warnings[0].getMessage()


@pytest.mark.skipif(flash.AVAILABLE, reason="flash-attn is installed")
def test_forcing_a_missing_backend_says_so(caplog):
    caplog.set_level(logging.INFO, logger="ecar_infer.kernels")
    with dispatch.force_backend("flash"):
        ops.stage_attention(*attention_args())
        ops.layernorm_modulate(*ln_args())  # flash never serves this op: no warning for it
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["backend 'flash' forced for stage_attention but is not available (it needs the flash-attn "
                        "package); using 'reference'"]


def test_forcing_triton_where_it_is_not_registered_says_why(caplog, monkeypatch):
    """Without CUDA or TRITON_INTERPRET=1 no Triton kernel is registered (an op registered here with only its
    reference stands for that), and the warning says what Triton needs rather than that it is missing."""
    caplog.set_level(logging.INFO, logger="ecar_infer.kernels")
    monkeypatch.setitem(dispatch._REGISTRY, "toy_scale", {})
    dispatch.register("toy_scale", "reference", lambda x: 2 * x)
    with dispatch.force_backend("triton"):
        assert torch.equal(dispatch.call("toy_scale", torch.ones(3)), torch.full((3,), 2.0))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["backend 'triton' forced for toy_scale but is not available here (it needs a CUDA GPU, or "
                        "TRITON_INTERPRET=1 set before ecar_infer is imported to interpret it on the CPU); using "
                        "'reference'"]


def test_first_use_is_logged_once(caplog):
    caplog.set_level(logging.INFO, logger="ecar_infer.kernels")
    for _ in range(3):
        ops.euler_step_(torch.zeros(2, 3), torch.ones(2, 3), 0.5)
    assert [r.getMessage() for r in caplog.records] == ["ecar_infer: euler_step_ -> reference"]


def test_first_use_is_logged_once_per_op_and_backend(caplog):
    """Each (op, backend) pair is logged at its first use, so the log names the backend of every op."""
    caplog.set_level(logging.INFO, logger="ecar_infer.kernels")
    for _ in range(2):
        ops.euler_step_(torch.zeros(2, 3), torch.ones(2, 3), 0.5)
        ops.layernorm_modulate(*ln_args())
        ops.stage_attention(*attention_args(torch.float16))
    assert [r.getMessage() for r in caplog.records] == [
        "ecar_infer: euler_step_ -> reference", "ecar_infer: layernorm_modulate -> reference",
        "ecar_infer: stage_attention -> sdpa"]


def test_bad_backend_names_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'cuda'.*reference"):
        with dispatch.force_backend("cuda"):
            pass
    set_env_backend(monkeypatch, "tritn")
    with pytest.raises(ValueError, match="ECAR_BACKEND='tritn' is not a backend"):
        ops.euler_step_(torch.zeros(2), torch.ones(2), 0.5)
    with pytest.raises(ValueError, match="unknown backend"):
        dispatch.register("euler_step_", "cuda", lambda *a: None)


def test_backends_are_resolved_once_per_op_device_dtype_and_forced_backend(monkeypatch):
    """The device/dtype gates run once per key; the per-call check runs at every call, so a backend that
    refuses one call (here: any call with an odd last dimension) still gets the next one."""
    gates, checks = [], []

    def accepts(device, dtype):
        gates.append((device.type, dtype))
        return dtype == torch.float32

    def supports(x, v, dr):
        checks.append(x.shape)
        return x.shape[-1] % 2 == 0

    monkeypatch.setitem(dispatch._REGISTRY, "toy_step_", {})
    monkeypatch.setattr(dispatch, "_candidates", {})
    monkeypatch.setattr(dispatch, "_chosen", {})
    dispatch.register("toy_step_", "reference", lambda x, v, dr: "reference")
    dispatch.register("toy_step_", "triton", lambda x, v, dr: "triton", supports=supports, accepts=accepts)
    even, odd = torch.zeros(2, 4), torch.zeros(2, 3)
    assert [dispatch.call("toy_step_", x, x, 0.5) for x in (even, odd, even, odd)] == \
        ["triton", "reference", "triton", "reference"]
    assert gates == [("cpu", torch.float32)] and len(checks) == 4
    assert dispatch.call("toy_step_", even.double(), even, 0.5) == "reference"  # a new dtype: one more gate
    with dispatch.force_backend("reference"):  # a new forced backend: one more gate
        assert dispatch.call("toy_step_", even, even, 0.5) == "reference"
    assert gates == [("cpu", torch.float32), ("cpu", torch.float64), ("cpu", torch.float32)]
    assert len(checks) == 4  # forced to the reference, the Triton check is not even asked


def toy_op(monkeypatch, accepts=None, supports=None) -> None:
    """A fresh op "toy_step_" with a reference backend and a triton one that answers with its name."""
    monkeypatch.setitem(dispatch._REGISTRY, "toy_step_", {})
    monkeypatch.setattr(dispatch, "_candidates", {})
    monkeypatch.setattr(dispatch, "_chosen", {})
    dispatch.register("toy_step_", "reference", lambda x, v, dr: "reference")
    dispatch.register("toy_step_", "triton", lambda x, v, dr: "triton", supports=supports, accepts=accepts)


def test_a_forced_backend_that_refuses_a_call_falls_back_for_that_call_only(monkeypatch, caplog):
    """Forcing puts a backend first, its per-call check still applies: a call it cannot take (here an odd last
    dimension) goes down the usual order with one warning, and the next call it can take is its own."""
    caplog.set_level(logging.INFO, logger="ecar_infer.kernels")
    toy_op(monkeypatch, supports=lambda x, v, dr: x.shape[-1] % 2 == 0)
    even, odd = torch.zeros(2, 4), torch.zeros(2, 3)
    with dispatch.force_backend("triton"):
        assert [dispatch.call("toy_step_", x, x, 0.5) for x in (even, odd, even, odd)] == \
            ["triton", "reference", "triton", "reference"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["backend 'triton' forced for toy_step_ but cannot run it for this call; using 'reference'"]


def test_a_call_that_autograd_records_goes_to_a_backend_with_a_backward(monkeypatch):
    """Training on CUDA calls the ops with tensors that require grad; a Triton or flash-attn kernel there
    would return a tensor with no grad_fn and silently cut the gradient of everything before it."""
    toy_op(monkeypatch)
    x, w = torch.zeros(2, 4), torch.zeros(2, 4, requires_grad=True)
    with dispatch.force_backend("triton"):
        assert dispatch.call("toy_step_", x, w, 0.5) == "reference"
        assert dispatch.call("toy_step_", x, x, 0.5) == "triton"
        with torch.no_grad():
            assert dispatch.call("toy_step_", x, w, 0.5) == "triton"


def test_a_backend_registered_after_a_call_is_used_from_the_next_call_on(monkeypatch):
    """register() drops the resolved candidates, so a backend added later (or replaced) is not hidden by a
    resolution cached before it existed."""
    monkeypatch.setitem(dispatch._REGISTRY, "toy_step_", {})
    monkeypatch.setattr(dispatch, "_candidates", {})
    dispatch.register("toy_step_", "reference", lambda x, v, dr: "reference")
    x = torch.zeros(2, 4)
    assert dispatch.call("toy_step_", x, x, 0.5) == "reference"
    dispatch.register("toy_step_", "triton", lambda x, v, dr: "triton")
    assert dispatch.call("toy_step_", x, x, 0.5) == "triton"
    dispatch.register("toy_step_", "triton", lambda x, v, dr: "triton again")
    assert dispatch.call("toy_step_", x, x, 0.5) == "triton again"


def stage_ids_of(sizes: tuple[int, ...]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sdpa_backend_matches_the_reference(dtype):
    """The SDPA adapters (the torch.compile path, and half-precision attention on the CPU) against the
    reference: only cache rows [0, kv_len) are read (the rest are NaN), and the block-causal mask lets a
    token see its own stage and earlier ones, never later ones."""
    from conftest import assert_matches_reference
    from ecar_infer.kernels import reference, sdpa

    gen = torch.Generator().manual_seed(5)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    q, k_cache, v_cache = rand(2, 5, 3, 16), rand(2, 19, 3, 16), rand(2, 19, 3, 16)
    k_cache[:, 13:], v_cache[:, 13:] = float("nan"), float("nan")
    oracle = reference.stage_attention(q.float(), k_cache.float(), v_cache.float(), 13)
    assert_matches_reference(sdpa.stage_attention(q, k_cache, v_cache, 13), oracle,
                             reference.stage_attention(q, k_cache, v_cache, 13))
    stage_ids = stage_ids_of((1, 3, 9, 7))
    q, k, v = rand(2, 20, 3, 16), rand(2, 20, 3, 16), rand(2, 20, 3, 16)
    oracle = reference.block_causal_attention(q.float(), k.float(), v.float(), stage_ids)
    assert_matches_reference(sdpa.block_causal_attention(q, k, v, stage_ids), oracle,
                             reference.block_causal_attention(q, k, v, stage_ids))


def test_unknown_op_is_a_clear_error():
    with pytest.raises(KeyError, match="no backend registered for op 'nope'"):
        dispatch.call("nope")


def test_flash_never_claims_cpu_tensors():
    assert not flash.supports(*attention_args(torch.float16))


def test_import_and_cpu_path_without_triton_or_flash():
    """Hide triton and flash_attn (an import of either raises) and check the package still works."""
    code = """
import sys
sys.modules["triton"] = None
sys.modules["flash_attn"] = None
import torch
import ecar_infer
from ecar_infer.kernels import dispatch, force_backend, ops
assert dispatch.registered("stage_attention") == ["sdpa", "reference"], dispatch.registered("stage_attention")
assert dispatch.registered("euler_step_") == ["reference"]
with force_backend("triton"):
    x = ops.euler_step_(torch.zeros(3), torch.ones(3), 0.5)
assert x.tolist() == [0.5, 0.5, 0.5]
print("ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_clearing_the_record_of_chosen_backends():
    ops.layernorm_modulate(*ln_args())
    assert "layernorm_modulate" in dispatch.chosen_backends()
    dispatch.clear_chosen_backends()
    assert dispatch.chosen_backends() == {}
    ops.layernorm_modulate(*ln_args())
    assert list(dispatch.chosen_backends()) == ["layernorm_modulate"]
