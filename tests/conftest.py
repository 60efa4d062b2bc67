"""Shared test setup. TRITON_INTERPRET must be set before anything imports triton, so it is set here
(on machines without CUDA), before the tests import ecar_infer."""
import contextlib
import os
import tempfile

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


@contextlib.contextmanager
def fifo_at(path):
    """A FIFO at `path` whose first reader gets end-of-file at once (a writer process opens and closes it: a
    thread could not, while the reader holds the GIL), so that a loader that reads it fails its test instead
    of waiting forever; the writer is released at the end."""
    import subprocess

    os.mkfifo(path)
    writer = subprocess.Popen(["sh", "-c", ': > "$0"', str(path)])
    try:
        yield path
    finally:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)   # a reader: the writer's open returns
        writer.wait(5)
        os.close(fd)


def refuse_writes_in(monkeypatch, folder):
    """Make `folder` read-only to the writability checks and the atomic writes' temporary files (chmod does not
    stop root, who may run the tests)."""
    real = tempfile.TemporaryFile

    def temporary_file(*args, dir=None, **kwargs):
        if dir is not None and os.path.realpath(dir) == os.path.realpath(folder):
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", temporary_file)
    real_open = os.open

    def open_file(path, flags, *args, **kwargs):   # the atomic writes' temporary files (ecar_infer/atomic.py)
        if flags & os.O_CREAT and os.path.realpath(os.path.dirname(path)) == os.path.realpath(folder):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_file)


def stub_cuda_device(monkeypatch) -> list[int]:
    """Stand torch.cuda.device in for a machine without CUDA: entering it makes its index current (restored on
    exit); the returned one-element list holds the current index (0 to begin with)."""
    current = [0]

    @contextlib.contextmanager
    def device(d):
        previous, current[0] = current[0], torch.device(d).index
        try:
            yield
        finally:
            current[0] = previous

    monkeypatch.setattr(torch.cuda, "device", device)
    return current


@pytest.fixture(scope="module")
def one_thread():
    """torch computes with one thread for a whole module (use: pytestmark = usefixtures("one_thread")). Tiny
    models train fastest so on a busy CPU, and the thread count changes the last bits of CPU sums, so runs
    that are compared byte for byte (torchrun ranks use one thread each) must agree on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random pixel checkpoint (ecar-tiny: 16 px, 1 channel, 10 classes) recommending guidance 2."""
    from ecar_infer import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(random_model(ECARConfig.preset("ecar-tiny"), seed=2), path, extra_metadata={"recommended_cfg": "2.0"})
    return path


def compile_for_sm90(script: str) -> None:
    """Run `script` (which compiles kernels with Triton's NVIDIA backend for sm_90 and prints "compiled") in a
    fresh interpreter without TRITON_INTERPRET: no GPU is needed, and it catches what only compilation sees."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "compiled"
