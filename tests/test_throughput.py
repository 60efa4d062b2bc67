"""The throughput harness end to end on a tiny preset: what each reported number is made of (no timing is
asserted: speed is measured by benchmarks, never by tests)."""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
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
    # the record says how it was made: every option, defaults resolved (the docs rebuilt commands by hand)
    assert payload["arguments"]["models"] == ["ecar-tiny"] and payload["arguments"]["repeats"] == 3
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
    low, high = (f"{t:.3g}" for t in (min(row["times"]), max(row["times"])))
    assert (f"| ecar-tiny | auto | reference | 1 | 2 x 3 stages | {row['latency_s']:.3g} ({low}-{high}, n=3) |"
            in out_md.read_text())
    assert f"| {row['flops_per_image'] / 1e9:.3g} | " in out_md.read_text()  # a tiny model's GFLOPs are not "0"


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


GLIBC = __import__("platform").libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="needs glibc's mallinfo2")
@pytest.mark.parametrize("kept", [True, False])
def test_cpu_peak_memory_counts_tensors_made_in_memory_kept_for_reuse(kept):
    """With freed memory kept (as every program of the project runs), a tensor made in memory a larger freed
    one left adds nothing to the resident set: the RSS-based reading gave 0 MiB for such a row (ecar-b at batch
    8 after the decode's 2.6 GiB). The heap's bytes in use count it, and not the process's whole footprint
    (hundreds of MiB with torch loaded). The tensor lives 250 ms: a sampled peak misses what lives less than
    the 5 ms between samples. In a fresh process, since keeping freed memory changes the whole process. Without
    it (ECAR_KEEP_FREED_MEMORY=0) glibc serves the 64 MiB by mmap, counted apart from the heap's arenas."""
    assert measure._HEAP_IN_USE is not None and "mallinfo2" in measure.PeakMemory(torch.device("cpu")).kind
    script = """
import time
import torch
from benchmarks.measure import PeakMemory
from ecar_infer.cpu_memory import keep_freed_memory
assert keep_freed_memory() == {kept}
size = 64 << 20
first = torch.ones(size); del first          # 256 MiB made and freed: kept in the heap
with PeakMemory(torch.device("cpu")) as memory:
    again = torch.ones(size // 4); time.sleep(0.25); del again   # live for 50 samples
with PeakMemory(torch.device("cpu")) as nothing:
    pass
print(memory.peak_bytes, nothing.peak_bytes)
"""
    env = {**os.environ, "ECAR_KEEP_FREED_MEMORY": "1" if kept else "0"}
    done = subprocess.run([sys.executable, "-c", script.replace("{kept}", str(kept))], capture_output=True, text=True, env=env, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    peak, nothing = map(int, done.stdout.split())
    size = 64 << 20
    assert size <= peak <= size + (8 << 20), peak
    assert abs(nothing) < (1 << 20), nothing


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


def test_dit_runs_right_after_the_first_presets_default_path_and_the_profile_last(monkeypatch, tmp_path):
    """The issue-5 targets compare the first preset's default path with DiT-XL/2: when the GPU suite's time
    runs out, or a forced backend faults, the other variants' and presets' rows are the ones lost, never
    DiT's. The profile comes after every timed row, since the profiler slows later launches."""
    order = []
    monkeypatch.setattr(throughput, "matmul_peak", lambda *a, **k: {"flops_per_s": 1e12, "how": "stub"})
    monkeypatch.setattr(throughput.Harness, "vae_decode", lambda self, batch, side: order.append(f"vae b{batch}"))
    monkeypatch.setattr(throughput.Harness, "ecar", lambda self, preset, variants=slice(None):
                        order.append(f"{preset} {variants.start}:{variants.stop}"))
    monkeypatch.setattr(throughput.Harness, "dit", lambda self, pipe, batch: order.append(f"dit b{batch}"))
    monkeypatch.setattr(throughput.Harness, "profile", lambda self, preset: order.append(f"profile {preset}"))
    monkeypatch.setattr(throughput.Harness, "shared_vae", lambda self: None)
    monkeypatch.setattr(throughput, "dit_xl_2", lambda: torch.nn.Linear(1, 1))
    monkeypatch.setattr(throughput, "dit_pipeline", lambda transformer, vae: "pipe")
    monkeypatch.setattr(throughput, "render_markdown", lambda payload: "")
    throughput.main(["--device", "cpu", "--models", "ecar-tiny", "ecar-digits32-attn-sc@2", "--batches", "2", "1",
                     "--profile", str(tmp_path)])
    assert order == ["vae b1", "vae b2", "ecar-tiny 0:1", "dit b2", "dit b1", "ecar-tiny 1:None",
                     "ecar-digits32-attn-sc@2 None:None", "profile ecar-tiny"]


def test_each_presets_model_is_built_once_for_its_rows_and_its_profile(monkeypatch, tmp_path):
    """ecar-xl's random initialisation takes about 10 s of CPU, and its default path, its other variants and
    its profile are three calls: one build serves them all (seconds of a GPU session's device time)."""
    built = []
    init_weights = throughput.ECARModel.init_weights

    def counted(self, *args, **kwargs):
        built.append(self.config.depth)
        return init_weights(self, *args, **kwargs)

    monkeypatch.setattr(throughput.ECARModel, "init_weights", counted)
    monkeypatch.setattr(throughput, "render_markdown", lambda payload: "")
    throughput.main(["--device", "cpu", "--models", "ecar-tiny", "--steps", "1", "--no-dit", "--repeats", "1",
                     "--backends", "sdpa", "--profile", str(tmp_path), "--json", str(tmp_path / "t.json")])
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["auto", "sdpa"] and (tmp_path / "profile-ecar-tiny-b1.txt").exists()
    assert built == [ECARConfig.preset("ecar-tiny").depth]


def test_a_device_fault_stops_the_sweep_and_keeps_the_rows(monkeypatch, tmp_path):
    """After a sticky CUDA error (an illegal address) every later call fails, freeing the cache included: the
    faulting row is written with its error and the sweep stops there, instead of dying unwritten in release()
    or recording every later row as the same error. An out-of-memory row is not a fault: the sweep goes on."""
    h = harness(monkeypatch, "--json", str(tmp_path / "t.json"))
    oom, fault = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), \
        RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    def failing(err):
        def call():
            raise err
        return call

    h.add(h.measure(throughput.Row("ecar-xl", "auto", 256, "20", 1.0), failing(oom), lambda: None))
    assert h.faults.fault is None
    monkeypatch.setattr(measure, "release", failing(RuntimeError("CUDA error: an illegal memory access")))
    row = h.measure(throughput.Row("ecar-xl", "triton", 64, "20", 1.0), failing(fault), lambda: None)
    with pytest.raises(measure.DeviceFault, match="illegal memory access"):
        h.add(row)
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [r["error"] for r in rows] == ["OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB",
                                          "RuntimeError: CUDA error: an illegal memory access was encountered"]
    assert measure.is_device_fault(RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"))
    assert not measure.is_device_fault(ValueError("this engine takes 1..4 images"))


def test_a_fault_ends_main_with_status_1_and_says_so(monkeypatch, capsys):
    monkeypatch.setattr(throughput, "matmul_peak", lambda *a, **k: {"flops_per_s": 1e12, "how": "stub"})

    def ecar(self, preset, variants=slice(None)):
        raise measure.DeviceFault("RuntimeError: CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(throughput.Harness, "ecar", ecar)
    assert throughput.main(["--device", "cpu", "--models", "ecar-tiny", "--no-dit"]) == 1
    assert "(stopped: the device faulted (RuntimeError: CUDA error: an illegal memory access was encountered); " \
           "the later rows were not measured)" in capsys.readouterr().out


def test_an_interrupted_sweep_still_measures_the_peak_again_and_writes(monkeypatch, tmp_path):
    """The GPU suite stops the part with SIGINT at its budget: the peak is measured again (the start's, on a
    cold GPU, may be low and inflate every MFU) and the results are written before the exit."""
    peaks = iter([1e12, 3e12])
    monkeypatch.setattr(throughput, "matmul_peak", lambda *a, **k: {"flops_per_s": next(peaks), "how": "stub"})
    monkeypatch.setattr(throughput.Harness, "vae_decode", lambda self, batch, side: None)

    def ecar(self, preset, variants=slice(None)):
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


def test_without_decode_subtracts_the_decode_of_the_rows_own_latent_size_and_none_from_a_pixel_model(monkeypatch):
    """A pixel preset decodes nothing, and ecar-tiny-vae decodes 16x16 latents: each subtracted the 32x32
    decode timed for DiT. main times one decode row per latent size the run's models and DiT decode."""
    Row = throughput.Row
    h = harness(monkeypatch)
    h.decode_s = {(2, 32): 0.5, (2, 16): 0.25}
    pixel, small, large = (Row("m", "auto", 2, "-", 1, latency_s=1.0, decode_side=side) for side in (None, 16, 32))
    assert [h.derived(r)["images_per_s_without_decode"] for r in (pixel, small, large)] == [None, 2 / 0.75, 2 / 0.5]
    assert h.derived(Row("m", "auto", 2, "-", 1, latency_s=1.0, decode_side=8))["images_per_s_without_decode"] is None

    decodes = []
    monkeypatch.setattr(throughput, "matmul_peak", lambda *a, **k: {"flops_per_s": 1e12, "how": "stub"})
    monkeypatch.setattr(throughput.Harness, "vae_decode", lambda self, batch, side: decodes.append((batch, side)))
    monkeypatch.setattr(throughput.Harness, "ecar", lambda self, preset, variants=slice(None): None)
    for models, dit, expected in [(["ecar-tiny", "ecar-digits32"], ["--no-dit"], []),
                                  (["ecar-tiny-vae"], ["--no-dit"], [(1, 16)]),
                                  (["ecar-tiny-vae", "ecar-tiny"], ["--dit-batches", "1", "--dit-steps", "1"],
                                   [(1, 16), (1, 32)])]:
        monkeypatch.setattr(throughput, "run_dit", lambda harness, device, batches: None)
        decodes.clear()
        assert throughput.main(["--device", "cpu", "--models", *models, "--batches", "1", *dit]) == 0
        assert decodes == expected, models


def test_each_decode_row_is_kept_under_its_own_latent_size_and_named_by_it(monkeypatch):
    """vae_decode times one latent size: its latency is what a row of that size subtracts, so stored under
    the DiT size (32) a 16x16 decode would stand for DiT's and none would be found for ecar-tiny-vae; the
    table's variant names a size other than DiT's, or two decode rows of one batch read alike. A model call
    no longer than its decode gives no 'without decode' figure (it was a division by zero)."""
    monkeypatch.setattr(throughput, "time_call", lambda fn, device: (fn(), 0.25 if sides[-1] == 16 else 0.5)[1])
    monkeypatch.setattr(throughput, "AutoencoderDecoder", lambda vae, scaling: SimpleNamespace(
        decode=lambda z: sides.append(z.shape[-1])))
    monkeypatch.setattr(flops, "vae_decode_flops", lambda side: 1000 * side)
    sides = [None]
    h = harness(monkeypatch, "--warmup", "0", "--repeats", "1")
    h.vae = SimpleNamespace(config=SimpleNamespace(scaling_factor=0.18215))
    h.vae_decode(2, 16)
    h.vae_decode(2, 32)
    assert h.decode_s == {(2, 16): 0.25, (2, 32): 0.5}
    assert [(r.variant, r.flops_per_image) for r in h.rows] == [("AutoencoderKL, 16x16", 16000),
                                                                 ("AutoencoderKL", 32000)]
    Row = throughput.Row
    assert h.derived(Row("m", "auto", 2, "-", 1, latency_s=0.25, decode_side=16))["images_per_s_without_decode"] is None
    assert h.derived(Row("m", "auto", 2, "-", 1, latency_s=0.75, decode_side=16))["images_per_s_without_decode"] == 4.0


def test_the_peak_is_the_highest_measured(monkeypatch):
    h = harness(monkeypatch, peaks=(2e12, 5e12, 3e12))
    assert h.peak["flops_per_s"] == 2e12
    h.update_peak()
    h.update_peak()
    assert h.peak["flops_per_s"] == 5e12


def test_derived_columns_and_the_summary_against_dit_at_each_step_count(monkeypatch):
    """Batch 4: the VAE decode takes 0.5 s; two E-CAR variants take 2 s (the default path, auto) and 1 s (4
    images/s, the fastest, listed second), a third failed; DiT takes 100 s at 250 steps (0.04 images/s) and
    20 s at 50 (0.2). Batch 1 has its own DiT row (0.1 images/s), which must not leak into batch 4's speedups.
    The speedups are the default path's; the fastest variant stands beside them."""
    Row, VAE, DIT = throughput.Row, throughput.VAE_NAME, throughput.DIT_NAME
    h = harness(monkeypatch)
    h.decode_s = {(4, 32): 0.5}
    side = {"decode_side": 32}
    h.rows = [Row(VAE, "AutoencoderKL", 4, "-", 1e9, latency_s=0.5),
              Row("ecar-xl", "auto", 4, "20 x 4 stages", 2e11, latency_s=2.0, **side),
              Row("ecar-xl", "triton", 4, "20 x 4 stages", 2e11, latency_s=1.0, **side),
              Row("ecar-xl", "sdpa", 4, "20 x 4 stages", 2e11, error="OutOfMemoryError: x", **side),
              Row(DIT, "DDPM, CFG", 4, "250", 1e13, latency_s=100.0, **side),
              Row(DIT, "DDPM, CFG", 4, "50", 2e12, latency_s=20.0, **side),
              Row(DIT, "DDPM, CFG", 1, "250", 1e13, latency_s=10.0, **side),
              Row("ecar-xl", "auto", 1, "20 x 4 stages", 2e11, latency_s=0.25, **side)]
    vae, slow, fast, failed, dit250 = (h.derived(r) for r in h.rows[:5])
    assert fast == pytest.approx({"images_per_s": 4.0, "mfu": 2e11 * 4.0 / 1e12, "images_per_s_without_decode": 8.0})
    assert slow["images_per_s_without_decode"] == pytest.approx(4 / 1.5)
    assert dit250["images_per_s_without_decode"] == pytest.approx(4 / 99.5)
    assert vae["images_per_s_without_decode"] is None
    assert failed == {"images_per_s": None, "mfu": None, "images_per_s_without_decode": None}
    summary = h.summary()
    assert summary == [
        {"batch": 1, "model": "ecar-xl", "variant": "auto", "images_per_s": 4.0, "speedup_vs_dit": {"250": 40.0},
         "dit_extrapolated": [], "fastest": {"variant": "auto", "images_per_s": 4.0}},
        {"batch": 4, "model": "ecar-xl", "variant": "auto", "images_per_s": 2.0,
         "speedup_vs_dit": {"250": pytest.approx(50.0), "50": pytest.approx(10.0)},
         "dit_extrapolated": [], "fastest": {"variant": "triton", "images_per_s": 4.0}}]
    text = throughput.render_markdown(h.payload())
    assert "| ecar-xl | triton | - | 4 | 20 x 4 stages | 1 | 4 | 8 | n/a | 200 | 80.0% |  |" in text
    assert "| 4 | ecar-xl (auto) | 2 | 50.0x | 10.0x | triton (4) |" in text
    assert "| 1 | ecar-xl (auto) | 4 | 40.0x | - | auto (4) |" in text
    h.rows[4].note = "extrapolated from 100-step runs"  # DiT at 250 steps, batch 4
    assert h.summary()[1]["dit_extrapolated"] == ["250"]
    assert "| 4 | ecar-xl (auto) | 2 | 50.0x* | 10.0x | triton (4) |" in throughput.render_markdown(h.payload())


def test_targets_take_the_250_step_speedup_at_batch_64_on_an_h100_only(monkeypatch):
    h = harness(monkeypatch)
    entry = dict(dit_extrapolated=[], fastest={})
    summary = [{"batch": 64, "model": "ecar-xl", "variant": "auto", "images_per_s": 300.0,
                "speedup_vs_dit": {"250": 50.0, "50": 10.0}, **entry},
               {"batch": 8, "model": "ecar-xl", "variant": "auto", "images_per_s": 1.0, "speedup_vs_dit": {"250": 1.0},
                **entry},
               {"batch": 64, "model": "ecar-b", "variant": "auto", "images_per_s": 1.0, "speedup_vs_dit": {"250": 1.0},
                **entry}]
    assert h.targets(summary) == []  # on the CPU
    h.device = torch.device("cuda")  # targets() looks at the device type and the device's name only
    h.env["device"] = "NVIDIA H100 80GB HBM3"
    assert h.targets(summary) == [
        {"what": "speedup over DiT-XL/2 at 250 steps", "measured": 50.0, "required": 25.0, "met": True, "margin": 2.0},
        {"what": "images/s including decode", "measured": 300.0, "required": 150.0, "met": True, "margin": 2.0}]
    (only,) = h.targets([{**summary[0], "images_per_s": 75.0, "speedup_vs_dit": {"50": 10.0}}])
    assert (only["what"], only["met"], only["margin"]) == ("images/s including decode", False, 0.5)
    (speedup, _) = h.targets([{**summary[0], "dit_extrapolated": ["250"]}])
    assert speedup["what"] == "speedup over DiT-XL/2 at 250 steps (DiT extrapolated from shorter runs)"
    h.env["device"] = "NVIDIA H200"  # the targets are set for one H100: listed, with no verdict
    assert [t["met"] for t in h.targets(summary)] == [None, None]
    assert throughput._verdict(h.targets(summary)[0]) == "n/a: not an H100"


def test_long_dit_runs_are_measured_short_and_extrapolated_linearly(monkeypatch):
    """A stand-in DiT whose call takes a fixed 2.1 s (the decode row's 2 s and 0.1 s of the pipeline's own) +
    0.5 s per step, with calls of at most 30 s: at 100 and 250 steps it runs the 46 steps that fit and 1 step,
    and the slope between them gives the exact 100- and 250-step times back (subtracting the decode row
    instead put the pipeline's 0.1 s into every extrapolated step: 250 steps 0.4 s long). FLOPs per image are
    steps x the per-step count plus one decode."""
    decode, fixed, per_step = 2.0, 2.1, 0.5
    calls = []

    def pipe(class_labels, guidance_scale, num_inference_steps, output_type):
        calls.append(num_inference_steps)
        return SimpleNamespace(images=torch.zeros(len(class_labels), 3, 4, 4))  # "pt": a tensor

    monkeypatch.setattr(throughput, "time_call", lambda fn, device: (fn(), fixed + per_step * calls[-1])[1])
    monkeypatch.setattr(flops, "dit_step_flops", lambda guided=True: {"params": 1, "step": 1000 if guided else 500})
    monkeypatch.setattr(flops, "vae_decode_flops", lambda side: 7)
    h = harness(monkeypatch, "--dit-steps", "250", "100", "--max-call-s", "30", "--repeats", "3")
    h.decode_s[2, 32] = decode
    h.dit(pipe, 2)
    assert [(r.steps, r.flops_per_image) for r in h.rows] == [("100", 100 * 1000 + 7), ("250", 250 * 1000 + 7)]
    for row in h.rows:
        assert row.latency_s == pytest.approx(fixed + int(row.steps) * per_step, rel=1e-9)
        assert row.note.startswith("extrapolated from 1- and 46-step runs") and row.times == [25.1] * 3
        # both runs that set the slope are in the record (the shorter one was not: the number was uncheckable)
        assert row.runs == {46: [25.1] * 3, 1: [2.6] * 3}
    assert calls == [1, 1] + [46] * 3 + [1] * 3   # warm-up, the guess, then each point's timed calls, once

    calls.clear()   # where one step is all that fits, the second point is 2 steps
    h = harness(monkeypatch, "--dit-steps", "250", "--max-call-s", "2.5", "--repeats", "1")
    h.decode_s[2, 32] = decode
    h.dit(pipe, 2)
    assert h.rows[0].latency_s == pytest.approx(fixed + 250 * per_step, rel=1e-9)
    assert h.rows[0].note.startswith("extrapolated from 1- and 2-step runs")

    calls.clear()   # noise that times the 1-step run above the longer one: no negative per-step time
    monkeypatch.setattr(throughput, "time_call", lambda fn, device: (fn(), 9.0 if calls[-1] == 1 else 8.0)[1])
    h = harness(monkeypatch, "--dit-steps", "250", "--max-call-s", "30", "--repeats", "1")
    h.decode_s[2, 32] = decode
    h.dit(pipe, 2)
    assert h.rows[0].latency_s == 8.0   # the longer run's time, extrapolated at 0 s per step

    monkeypatch.setattr(throughput, "time_call", lambda fn, device: (fn(), fixed + per_step * calls[-1])[1])
    calls.clear()
    h = harness(monkeypatch, "--dit-steps", "50", "20", "--max-call-s", "35")
    h.decode_s[2, 32] = decode
    h.dit(pipe, 2)
    assert [(r.steps, r.latency_s, r.note) for r in h.rows] == [("20", 12.1, ""), ("50", 27.1, "")]  # measured


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
    assert row.steps == "3 x 3 stages" and row.decode_side == config.latent_size == 16
    h.ecar("ecar-tiny")
    assert h.rows[-1].decode_side is None   # a pixel model decodes nothing


def test_markdown_table_has_one_separator_per_column():
    assert report.markdown_table(["a", "b", "c"], [[1, "x", 2.5]]) == "| a | b | c |\n|---|---|---|\n| 1 | x | 2.5 |"


def test_a_device_fault_in_dits_warm_up_also_stops_the_sweep(monkeypatch):
    h = harness(monkeypatch)

    def pipe(**kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(measure.DeviceFault):
        h.dit(pipe, 2)
    assert h.rows[-1].model == throughput.DIT_NAME
    assert h.rows[-1].error == "RuntimeError: CUDA error: an illegal memory access was encountered"


@pytest.mark.parametrize("command, said", [
    ("benchmarks.flops --presets nosuch", "argument --presets: no preset 'nosuch'; the presets are "),
    ("benchmarks.flops --presets ecar-b@x", "'ecar-b@x': give NAME or NAME@STEPS with STEPS a positive integer"),
    ("benchmarks.throughput --models nosuch --no-dit", "argument --models: no preset 'nosuch'"),
    ("benchmarks.throughput --device gpu --no-dit", "--device: device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("benchmarks.heads_table {tmp}/nope.json", "nope.json: not a report of python -m benchmarks.heads"),
    ("benchmarks.heads_table {tmp}/other.json", "other.json: not a report of python -m benchmarks.heads (no rows)"),
    ("benchmarks.request_time --case {tmp}/nosuch.safetensors", "nosuch.safetensors: file not found"),
])
def test_a_harness_says_a_users_mistake_in_one_line(command, said, tmp_path, capsys):
    """Each was a traceback (ConfigError, ValueError, FileNotFoundError, KeyError, CheckpointError)."""
    import importlib

    (tmp_path / "other.json").write_text('{"cases": []}')
    module, *argv = command.format(tmp=tmp_path).split()
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and said in err[-1], err

