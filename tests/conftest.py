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
