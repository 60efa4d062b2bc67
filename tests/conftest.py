"""Shared test setup. TRITON_INTERPRET must be set before anything imports triton, so it is set here
(on machines without CUDA), before the tests import ecar_infer."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ecar_infer import ECARConfig  # noqa: E402  (after TRITON_INTERPRET)
from ecar_infer.model import ECARModel  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def tiny_config() -> ECARConfig:
    return ECARConfig.preset("ecar-tiny")


def random_model(config: ECARConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> ECARModel:
    """A model whose every weight is random (no zero-initialised gates), in eval mode."""
    return ECARModel(config).init_weights(seed, zero_init=False).to(dtype).eval()


def poison_new_tensors(monkeypatch) -> None:
    """From now on (for the test), every float tensor made by torch.empty starts NaN-filled, so an output
    element a kernel wrapper allocates and the kernel fails to write shows up as NaN."""
    empty = torch.empty

    def poisoned_empty(*shape, **kwargs):
        out = empty(*shape, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", poisoned_empty)


def assert_matches_reference(out: torch.Tensor, oracle: torch.Tensor, same_precision: torch.Tensor,
                             atol: float = 1e-5) -> None:
    """flash-attn's test rule for a fast kernel's output.

    oracle: the reference computed from fp32 copies of the inputs; same_precision: the reference run at
    the kernel's own precision. The kernel may be at most twice as far from the oracle as the reference
    is, plus one rounding of the output to its dtype, plus atol (relative to the output's magnitude).
    """
    assert not out.isnan().any(), "the kernel left NaN (poisoned or unwritten) elements"
    oracle = oracle.float()
    err = (out.float() - oracle).abs().max().item()
    err_torch = (same_precision.float() - oracle).abs().max().item()
    rounding = (oracle.to(out.dtype).float() - oracle).abs().max().item()
    bound = 2 * err_torch + rounding + atol * max(1.0, oracle.abs().max().item())
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g} (same-precision torch: {err_torch:.3g})"
