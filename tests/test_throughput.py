"""The throughput harness end to end on a tiny preset: what each reported number is made of (no timing is
asserted: speed is measured by benchmarks, never by tests)."""
import json
import os
import statistics

import pytest
import torch

from benchmarks import flops, throughput
from benchmarks.measure import write_profile
from ecar_infer import ECARConfig


def test_harness_writes_rows_json_and_markdown(tmp_path):
    out_json, out_md = tmp_path / "t.json", tmp_path / "t.md"
    throughput.main(["--device", "cpu", "--models", "ecar-tiny", "--steps", "2", "--no-dit", "--repeats", "3",
                     "--json", str(out_json), "--markdown", str(out_md)])
    payload = json.loads(out_json.read_text())
    (row,) = payload["rows"]
    assert row["model"] == "ecar-tiny" and row["batch"] == 1 and row["error"] is None
    # each derived number is what it says: the median call, images per second of it, counted FLOPs per
    # image (a pixel model: no decode) over the measured peak
    assert len(row["times"]) == 3 and row["latency_s"] == statistics.median(row["times"])
    assert row["images_per_s"] == pytest.approx(row["batch"] / row["latency_s"])
    assert row["flops_per_image"] == flops.ecar_flops(ECARConfig.preset("ecar-tiny"), 2)["generator"] > 0
    peak = payload["peak"]["flops_per_s"]
    assert peak > 0 and row["mfu"] == pytest.approx(row["flops_per_image"] * row["images_per_s"] / peak)
    assert row["backends"] == {op: "reference" for op in row["backends"]} and "guided_euler_step_" in row["backends"]
    assert payload["targets"] == []  # GPU targets are never evaluated on the CPU
    assert f"| ecar-tiny | auto | reference | 1 | 2 x 3 stages | {row['latency_s']:.3g} |" in out_md.read_text()


def test_cpu_runs_only_automatic_dispatch_unless_asked():
    cpu = throughput.torch.device("cpu")
    assert throughput.ecar_variants(cpu, None) == [("auto", None)]
    assert throughput.ecar_variants(cpu, ["sdpa"]) == [("auto", None), ("sdpa", None)]
    assert "reference" in throughput.available_backends()


def test_profile_table_and_its_failure(tmp_path):
    cpu = torch.device("cpu")
    write_profile(lambda: torch.ones(8) + 1, cpu, tmp_path / "ok.txt")
    assert "aten::add" in (tmp_path / "ok.txt").read_text()

    def broken():
        raise RuntimeError("no profile\nsecond line")

    write_profile(broken, cpu, tmp_path / "bad.txt")
    assert (tmp_path / "bad.txt").read_text() == "profiling failed: RuntimeError: no profile\n"


def test_matmul_peak_is_twice_n_cubed_over_the_fastest_product(monkeypatch):
    from benchmarks import measure

    seconds = iter([0.5, 0.25, 1.0])
    monkeypatch.setattr(measure, "time_call", lambda fn, device: next(seconds))
    peak = measure.matmul_peak(torch.device("meta"), torch.float32, repeats=3)   # meta: the products cost nothing
    assert peak["flops_per_s"] == 2 * 2048 ** 3 / 0.25
    assert peak["how"] == "2048x2048x2048 float32 matmul, fastest of 3"


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm (Linux)")
def test_cpu_peak_memory_is_the_growth_inside_the_block():
    import mmap

    import numpy as np

    from benchmarks.measure import PeakMemory

    size = 64 << 20
    with PeakMemory(torch.device("cpu")) as memory:
        block = mmap.mmap(-1, size)            # fresh pages (not the allocator's kept ones), all touched
        np.frombuffer(block, np.uint8)[:] = 1
    block.close()
    # the 64 MiB and little else: not the process's whole resident set (hundreds of MiB with torch loaded)
    assert size - (8 << 20) <= memory.peak_bytes <= size + (32 << 20), memory.peak_bytes
