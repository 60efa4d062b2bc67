"""keep_freed_memory (ecar_infer/cpu_memory.py): after it, a large tensor allocated again after a free reuses the
heap's pages instead of faulting in fresh ones; the programs turn it on, the library alone does not."""
import os
import platform
import subprocess
import sys

import pytest

import ecar_infer.cli
import ecar_infer.cpu_memory
import ecar_infer.edit_cli
import ecar_infer.training.train_cli
import ecar_infer.training.edit_quality
import ecar_infer.training.quality

# In a fresh process: optionally keep freed memory, then run a step that allocates two 64 MiB tensors and frees
# them, 16 times, and count the minor page faults of the least faulting of the last 4 steps (2 x 16,384 pages of
# 4 KiB when the memory is fresh). The first steps may fault while the heap settles (torch's aligned allocations
# fragment it a little): measured, up to the 7th step, so the last step alone was a coin toss.
SCRIPT = """
import resource, sys, torch
from ecar_infer import keep_freed_memory
from ecar_infer.cpu_memory import freed_memory_kept
kept = keep_freed_memory() if sys.argv[1] == "keep" else freed_memory_kept()
steps = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.empty(16 << 20).fill_(1.0)
    (a * 2).sum()
    del a
    steps.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, min(steps[-4:]))
"""
PAGES = 2 * (64 << 20) // 4096
# What freed memory does by default, and whether keeping it can be turned on, is the C library's: the page-fault
# counts below are glibc's behaviour (musl, macOS and Windows allocators differ), and the benchmark refuses to
# compare two settings that cannot differ.
needs_glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the behaviour checked is glibc's")


def faults(mode: str, **env) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0] == "True", int(out[1])


@needs_glibc
def test_kept_memory_is_reused_without_page_faults():
    kept, with_keep = faults("keep")
    if not kept:
        pytest.skip("not glibc: keep_freed_memory is a no-op here")
    untouched, without = faults("default")
    assert not untouched  # importing the library changes nothing by itself
    assert without > PAGES // 2, "a freed 64 MiB block should go back to the system by default"
    assert with_keep < PAGES // 20


@needs_glibc
def test_environment_variable_turns_it_off():
    kept, count = faults("keep", ECAR_KEEP_FREED_MEMORY="0")
    assert not kept and count > PAGES // 2


PROGRAMS = [ecar_infer.cli, ecar_infer.edit_cli, ecar_infer.training.train_cli, ecar_infer.training.quality,
            ecar_infer.training.edit_quality]


@pytest.mark.parametrize("module", PROGRAMS, ids=lambda m: m.__name__)
def test_programs_turn_it_on_first(module, monkeypatch, capsys):
    calls = []
    recorder = lambda: calls.append(1) or True  # noqa: E731
    monkeypatch.setattr(ecar_infer.cpu_memory, "keep_freed_memory", recorder)  # the ones imported inside main()
    if hasattr(module, "keep_freed_memory"):
        monkeypatch.setattr(module, "keep_freed_memory", recorder)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    assert calls == [1]


@needs_glibc
def test_benchmark_compares_both_settings(ckpt, tmp_path, capsys):
    import json

    from benchmarks import cpu_memory

    out = tmp_path / "cpu-memory.json"
    assert cpu_memory.main(["--ckpt", str(ckpt), "--n", "2", "--steps", "1", "--repeats", "1", "--rounds", "1",
                            "--out", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    for setting in ("default", "kept"):
        row = result[setting]
        assert set(row) == set(cpu_memory.FIELDS) and row["wall_s"] > 0 and row["minor_faults"] >= 0
    assert "kept / default" in capsys.readouterr().out


# In a fresh process without torch: a 64 MiB block malloc'ed, written and freed 8 times. With both thresholds raised
# it comes from the heap (not mmap) and, when freed at the heap's top, stays there (not trimmed), so only the first
# round faults its 16,384 pages in. The module is loaded from its file, so nothing else shapes the heap.
RAW_SCRIPT = """
import ctypes, importlib.util, resource, sys
spec = importlib.util.spec_from_file_location("cpu_memory", sys.argv[2])
cpu_memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cpu_memory)
kept = cpu_memory.keep_freed_memory() if sys.argv[1] == "keep" else cpu_memory.freed_memory_kept()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
size, steps = 64 << 20, []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    steps.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, max(steps[1:]))
"""


@needs_glibc
@pytest.mark.parametrize("mode", ["keep", "default"])
def test_both_thresholds_are_raised_so_a_block_freed_at_the_top_of_the_heap_stays(mode):
    """Raising only the mmap threshold leaves glibc trimming the freed block back to the system (a fault per
    page every round); raising only the trim threshold leaves a 64 MiB block to mmap (the same)."""
    out = subprocess.run([sys.executable, "-c", RAW_SCRIPT, mode, ecar_infer.cpu_memory.__file__], capture_output=True,
                         text=True, check=True, env={k: v for k, v in os.environ.items() if k != "ECAR_KEEP_FREED_MEMORY"})
    kept, worst = out.stdout.split()
    if mode == "default":
        assert kept == "False" and int(worst) > (64 << 20) // 4096 // 2
    else:
        assert kept == "True" and int(worst) < (64 << 20) // 4096 // 20


@pytest.mark.parametrize("value, on", [(None, True), ("1", True), ("yes", True), ("", True), ("0", False), (" 0\n", False)])
def test_only_zero_in_the_environment_variable_turns_it_off(monkeypatch, value, on):
    raised = []
    monkeypatch.setattr(ecar_infer.cpu_memory, "_kept", False)
    monkeypatch.setattr(ecar_infer.cpu_memory, "_raise_thresholds", lambda: raised.append(1) or True)
    if value is None:
        monkeypatch.delenv(ecar_infer.cpu_memory.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ecar_infer.cpu_memory.ENV_VAR, value)
    assert ecar_infer.cpu_memory.keep_freed_memory() is on and ecar_infer.cpu_memory.freed_memory_kept() is on
    assert ecar_infer.cpu_memory.keep_freed_memory() is on and raised == ([1] if on else [])  # raised once


def test_benchmarks_record_whether_it_is_on(monkeypatch):
    import torch

    from benchmarks.report import environment

    for kept in (False, True):
        monkeypatch.setattr(ecar_infer.cpu_memory, "_kept", kept)
        assert environment(torch.device("cpu"))["freed_memory_kept"] is kept
