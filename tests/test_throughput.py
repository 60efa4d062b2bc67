"""The throughput harness end to end on a tiny preset: what each reported number is made of (no timing is
asserted: speed is measured by benchmarks, never by tests)."""
import json
import os
import statistics
from types import SimpleNamespace

import pytest
import torch

from benchmarks import flops, measure, report, throughput
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


def test_cuda_peak_memory_also_reads_what_is_reserved(monkeypatch):
    """A replayed CUDA graph allocates nothing (its activations sit in its private pool, reserved, never
    allocated): max_memory_allocated alone made the graph path look far lighter than eager. The CUDA branch,
    emulated with the allocator's counters stubbed, reads the reserved peak as well."""
    from benchmarks.measure import PeakMemory

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 << 30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 7 << 30)
    with PeakMemory(torch.device("cuda")) as memory:
        pass
    assert calls == ["sync", "reset"]
    assert (memory.peak_bytes, memory.reserved_bytes) == (3 << 30, 7 << 30)
    assert "reserved" in memory.kind
    assert throughput._memory(3 << 30, 7 << 30) == "3.00 GiB (7.00 GiB)"


def test_dit_runs_right_after_the_first_preset(monkeypatch):
    """The issue-5 targets compare the first preset with DiT-XL/2: when the GPU suite's time runs out, the
    later presets' rows are the ones cut, never DiT's (which used to come after every preset)."""
    order = []
    monkeypatch.setattr(throughput, "matmul_peak", lambda *a, **k: {"flops_per_s": 1e12, "how": "stub"})
    monkeypatch.setattr(throughput.Harness, "vae_decode", lambda self, batch: order.append(f"vae b{batch}"))
    monkeypatch.setattr(throughput.Harness, "ecar", lambda self, preset: order.append(preset))
    monkeypatch.setattr(throughput.Harness, "dit", lambda self, pipe, batch: order.append(f"dit b{batch}"))
    monkeypatch.setattr(throughput.Harness, "shared_vae", lambda self: None)
    monkeypatch.setattr(throughput, "dit_xl_2", lambda: torch.nn.Linear(1, 1))
    monkeypatch.setattr(throughput, "dit_pipeline", lambda transformer, vae: "pipe")
    monkeypatch.setattr(throughput, "render_markdown", lambda payload: "")
    throughput.main(["--device", "cpu", "--models", "ecar-tiny", "ecar-digits32-attn-sc@2", "--batches", "2", "1"])
    assert order == ["vae b1", "vae b2", "ecar-tiny", "dit b2", "dit b1", "ecar-digits32-attn-sc@2"]


def test_an_interrupted_sweep_still_measures_the_peak_again_and_writes(monkeypatch, tmp_path):
    """The GPU suite stops the part with SIGINT at its budget: the peak is measured again (the start's, on a
    cold GPU, may be low and inflate every MFU) and the results are written before the exit."""
    peaks = iter([1e12, 3e12])
    monkeypatch.setattr(throughput, "matmul_peak", lambda *a, **k: {"flops_per_s": next(peaks), "how": "stub"})
    monkeypatch.setattr(throughput.Harness, "vae_decode", lambda self, batch: None)

    def ecar(self, preset):
        if preset != "ecar-tiny":
            raise KeyboardInterrupt

    monkeypatch.setattr(throughput.Harness, "ecar", ecar)
    out = tmp_path / "t.json"
    code = throughput.main(["--device", "cpu", "--models", "ecar-tiny", "ecar-digits32", "--no-dit",
                            "--json", str(out)])
    assert code == 130
    assert json.loads(out.read_text())["peak"]["flops_per_s"] == 3e12


# ---- the derived numbers on hand-built rows (no sampling, no timing) ---------------------------------------
def harness(monkeypatch, *argv, peaks=(1e12,)):
    """A CPU harness whose matmul peak measurements return `peaks` in turn."""
    measured = iter(peaks)
    monkeypatch.setattr(throughput, "matmul_peak", lambda *a, **k: {"flops_per_s": next(measured), "how": "stub"})
    args = throughput.parse_args(["--device", "cpu", *argv])
    return throughput.Harness(args, torch.device("cpu"), torch.float32)


def test_the_peak_is_the_highest_measured(monkeypatch):
    h = harness(monkeypatch, peaks=(2e12, 5e12, 3e12))
    assert h.peak["flops_per_s"] == 2e12
    h.update_peak()
    h.update_peak()
    assert h.peak["flops_per_s"] == 5e12


def test_derived_columns_and_the_summary_against_dit_at_each_step_count(monkeypatch):
    """Batch 4: the VAE decode takes 0.5 s; two E-CAR variants take 2 s and 1 s (4 images/s, the fastest listed
    second), a third failed; DiT takes 100 s at 250 steps (0.04 images/s) and 20 s at 50 (0.2). Batch 1 has its
    own DiT row (0.1 images/s), which must not leak into batch 4's speedups."""
    Row, VAE, DIT = throughput.Row, throughput.VAE_NAME, throughput.DIT_NAME
    h = harness(monkeypatch)
    h.decode_s = {4: 0.5}
    h.rows = [Row(VAE, "AutoencoderKL", 4, "-", 1e9, latency_s=0.5),
              Row("ecar-xl", "auto", 4, "20 x 4 stages", 2e11, latency_s=2.0),
              Row("ecar-xl", "triton", 4, "20 x 4 stages", 2e11, latency_s=1.0),
              Row("ecar-xl", "sdpa", 4, "20 x 4 stages", 2e11, error="OutOfMemoryError: x"),
              Row(DIT, "DDPM, CFG", 4, "250", 1e13, latency_s=100.0),
              Row(DIT, "DDPM, CFG", 4, "50", 2e12, latency_s=20.0),
              Row(DIT, "DDPM, CFG", 1, "250", 1e13, latency_s=10.0),
              Row("ecar-xl", "auto", 1, "20 x 4 stages", 2e11, latency_s=0.25)]
    vae, slow, fast, failed, dit250 = (h.derived(r) for r in h.rows[:5])
    assert fast == pytest.approx({"images_per_s": 4.0, "mfu": 2e11 * 4.0 / 1e12, "images_per_s_without_decode": 8.0})
    assert slow["images_per_s_without_decode"] == pytest.approx(4 / 1.5)
    assert dit250["images_per_s_without_decode"] == pytest.approx(4 / 99.5)
    assert vae["images_per_s_without_decode"] is None
    assert failed == {"images_per_s": None, "mfu": None, "images_per_s_without_decode": None}
    summary = h.summary()
    assert summary == [
        {"batch": 1, "model": "ecar-xl", "variant": "auto", "images_per_s": 4.0, "speedup_vs_dit": {"250": 40.0}},
        {"batch": 4, "model": "ecar-xl", "variant": "triton", "images_per_s": 4.0,
         "speedup_vs_dit": {"250": pytest.approx(100.0), "50": pytest.approx(20.0)}}]
    text = throughput.render_markdown(h.payload())
    assert "| ecar-xl | triton | - | 4 | 20 x 4 stages | 1 | 4 | 8 | n/a | 200 | 80.0% |  |" in text
    assert "| 4 | ecar-xl (triton) | 4 | 100.0x | 20.0x |" in text
    assert "| 1 | ecar-xl (auto) | 4 | 40.0x | - |" in text


def test_targets_take_the_250_step_speedup_at_batch_64(monkeypatch):
    h = harness(monkeypatch)
    summary = [{"batch": 64, "model": "ecar-xl", "variant": "auto", "images_per_s": 300.0,
                "speedup_vs_dit": {"250": 50.0, "50": 10.0}},
               {"batch": 8, "model": "ecar-xl", "variant": "auto", "images_per_s": 1.0, "speedup_vs_dit": {"250": 1.0}},
               {"batch": 64, "model": "ecar-b", "variant": "auto", "images_per_s": 1.0, "speedup_vs_dit": {"250": 1.0}}]
    assert h.targets(summary) == []  # on the CPU
    h.device = torch.device("cuda")  # targets() looks at the device type only
    assert h.targets(summary) == [
        {"what": "speedup over DiT-XL/2 at 250 steps", "measured": 50.0, "required": 25.0, "met": True, "margin": 2.0},
        {"what": "images/s including decode", "measured": 300.0, "required": 150.0, "met": True, "margin": 2.0}]
    (only,) = h.targets([{**summary[0], "images_per_s": 75.0, "speedup_vs_dit": {"50": 10.0}}])
    assert (only["what"], only["met"], only["margin"]) == ("images/s including decode", False, 0.5)


def test_long_dit_runs_are_measured_short_and_extrapolated_linearly(monkeypatch):
    """A stand-in DiT whose call takes decode + steps x per-step time exactly (2 s + 0.5 s per step), with calls
    of at most 30 s: at 100 and 250 steps it runs the 56 steps that fit, and the extrapolation gives the exact
    100- and 250-step times back. FLOPs per image are steps x the per-step count plus one decode."""
    decode, per_step = 2.0, 0.5
    calls = []

    def pipe(class_labels, guidance_scale, num_inference_steps, output_type):
        calls.append(num_inference_steps)
        return SimpleNamespace(images=torch.zeros(len(class_labels), 3, 4, 4))  # "pt": a tensor

    monkeypatch.setattr(throughput, "time_call", lambda fn, device: (fn(), decode + per_step * calls[-1])[1])
    monkeypatch.setattr(flops, "dit_step_flops", lambda guided=True: {"params": 1, "step": 1000 if guided else 500})
    monkeypatch.setattr(flops, "vae_decode_flops", lambda side: 7)
    h = harness(monkeypatch, "--dit-steps", "250", "100", "--max-call-s", "30", "--repeats", "3")
    h.decode_s[2] = decode
    h.dit(pipe, 2)
    assert [(r.steps, r.flops_per_image) for r in h.rows] == [("100", 100 * 1000 + 7), ("250", 250 * 1000 + 7)]
    for row in h.rows:
        assert row.latency_s == pytest.approx(decode + int(row.steps) * per_step)
        assert row.note.startswith("extrapolated from 56-step runs") and row.times == [30.0] * 3
    assert max(calls) == 56  # the longest call that fits in 30 s

    calls.clear()
    h = harness(monkeypatch, "--dit-steps", "50", "20", "--max-call-s", "30")
    h.decode_s[2] = decode
    h.dit(pipe, 2)
    assert [(r.steps, r.latency_s, r.note) for r in h.rows] == [("20", 12.0, ""), ("50", 27.0, "")]  # measured


def test_a_row_is_the_median_of_its_repeats(monkeypatch):
    times = iter([10.0, 1.0, 3.0, 2.0])  # median 2.5; mean 4; first 10; upper middle 3
    monkeypatch.setattr(throughput, "time_call", lambda fn, device: next(times))
    h = harness(monkeypatch, "--repeats", "4", "--warmup", "0")
    row = h.measure(throughput.Row("m", "v", 1, "-", 0), lambda: None, lambda: None)
    assert row.times == [10.0, 1.0, 3.0, 2.0] and row.latency_s == 2.5
    assert measure.median([5.0, 1.0, 3.0]) == 3.0


def test_ecar_rows_count_the_decode_of_a_latent_model(monkeypatch):
    """An sd-vae preset's FLOPs per image are its generator plus one decode (a pixel preset's: the generator)."""
    monkeypatch.setattr(throughput, "time_call", lambda fn, device: 1.0)  # nothing is sampled
    monkeypatch.setattr(throughput, "AutoencoderDecoder", lambda vae, scaling: "stub decoder")
    monkeypatch.setattr(flops, "vae_decode_flops", lambda side: 1000 * side)
    h = harness(monkeypatch, "--steps", "2", "--warmup", "0", "--repeats", "1")
    h.vae = object()
    h.ecar("ecar-tiny-vae@3")
    (row,) = h.rows
    config = ECARConfig.preset("ecar-tiny-vae")
    assert row.flops_per_image == flops.ecar_flops(config, 3)["generator"] + 1000 * config.latent_size
    assert row.steps == "3 x 3 stages"


def test_markdown_table_has_one_separator_per_column():
    assert report.markdown_table(["a", "b", "c"], [[1, "x", 2.5]]) == "| a | b | c |\n|---|---|---|\n| 1 | x | 2.5 |"
