"""The graph runner and the engine's capturable units, on the CPU (tests/gpu/test_graphs_gpu.py has the
capture and replay tests): off CUDA the runner runs each unit once and the sampler runs the exact batch,
units are idempotent and touch no host data, padding to a batch bucket leaves the real images unchanged,
engines are reused. Also benchmarks/bench_graphs.py's reported numbers (speedups, targets, medians) on stand-in
rows and times."""
import json
import types

import pytest
import torch

from conftest import random_model, stub_cuda_device
from ecar_infer.engine import StageEngine
from ecar_infer.graphs import GraphRunner, batch_bucket
from ecar_infer.model import ECARModel
from ecar_infer.noise import draw_noise
from ecar_infer.sampler import Sampler
from ecar_infer.schedule import plan_steps

LABELS, SEEDS = [3, 7, 1], [11, 12, 13]


@pytest.fixture(scope="module")
def model(request):
    from ecar_infer import ECARConfig

    return random_model(ECARConfig.preset("ecar-tiny"), seed=5)


def mixed_steps(model, cfg_scale=2.5):
    """Guided and unguided steps in one plan (cfg_interval), so both flow branches run."""
    return plan_steps(model.config.num_stages, 3, cfg_scale, "linear", cfg_interval=(0.3, 0.9))


def loaded_engine(model, batch, labels, seeds, steps):
    engine = StageEngine(model, batch, steps)
    engine.load(torch.tensor(labels), draw_noise(seeds, model.plan), steps)
    return engine


def run_units(engine):
    for _, _, fn in engine.units():
        fn()
    return engine.final_latent()


def engine_buffers(engine):
    named = {"labels": engine.labels, "mods": engine.mods, "cache": engine.cache.buffer,
             "start_noise": engine.start_noise}
    for name in ("h", "starts", "x", "ups", "jump_noise", "weights", "sigmas"):
        named.update({f"{name}{s}": t for s, t in enumerate(getattr(engine, name)) if t is not None})
    return named


def test_batch_buckets():
    assert [batch_bucket(b) for b in (1, 2, 3, 5, 8, 9, 33, 64, 65, 200, 256)] == \
        [1, 2, 4, 8, 8, 16, 64, 64, 128, 256, 256]
    assert [batch_bucket(b) for b in (257, 512, 513)] == [512, 512, 768]
    with pytest.raises(ValueError, match="batch must be positive, got 0"):
        batch_bucket(0)


def test_runner_runs_each_unit_once_eagerly_off_cuda():
    """Graphs asked for, on the CPU: nothing is captured, and each unit runs exactly once per call, in the
    order given (a runner that skipped, repeated or warmed up a unit here would change the result)."""
    runner = GraphRunner(torch.device("cpu"), cuda_graphs=True)
    assert not runner.graphs_enabled
    calls = []
    for key in ("begin", "ar", "flow", "ar"):
        runner.run(key, lambda key=key: calls.append(key))
    assert calls == ["begin", "ar", "flow", "ar"] and runner.num_captures == 0


@torch.no_grad()
def test_runner_captures_on_a_stream_of_the_current_device(monkeypatch):
    """torch.cuda streams and graphs follow the current device, which the sampler makes its own for a request
    (test_sampler covers that): torch.cuda.graph's default capture stream, made once per process, may be
    another device's, so the runner captures on a stream of its own. The CUDA calls are stubbed here to record
    the current device at each (the runner on "cuda:1", made current as the sampler does; cuda:0 was
    current when the process's default capture stream was made)."""
    import contextlib

    current, seen = stub_cuda_device(monkeypatch), []

    class Graph:
        def replay(self):
            seen.append(("replay", current[0]))

    @contextlib.contextmanager
    def capture(graph, pool=None, stream=None):
        # torch.cuda.graph's own default stream is made once per process, on the device current then
        seen.append(("capture", current[0]))
        seen.append(("capture stream", getattr(stream, "device", 0)))
        yield

    class Stream:
        def __init__(self):
            self.device = current[0]
            seen.append(("stream", current[0]))

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    runner = GraphRunner(torch.device("cuda:1"))
    runs = []
    with torch.cuda.device("cuda:1"):
        runner.run("unit", lambda: runs.append(current[0]))
        runner.run("unit", lambda: runs.append(current[0]))
    assert runner.num_captures == 1
    assert runs == [1, 1, 1]  # two warm-up runs and the captured one
    assert {d for _, d in seen} == {1} and [k for k, _ in seen].count("replay") == 2


def test_sampler_off_cuda_runs_the_engine_on_the_exact_batch(model):
    """The sampler with graphs asked for, on the CPU: one engine of exactly the requested batch (no
    padding to a bucket), and the same bits as running that engine's units by hand."""
    steps = mixed_steps(model)
    reference = run_units(loaded_engine(model, 3, LABELS, SEEDS, steps))
    sampler = Sampler(model, progress=False, cuda_graphs=True)
    out = sampler.generate(LABELS, seed=SEEDS, cfg_scale=2.5, steps_per_stage=3, cfg_schedule="linear",
                           cfg_interval=(0.3, 0.9), output_type="latent")
    assert [engine.batch for engine in sampler._engines.values()] == [3]
    assert torch.equal(out.images, reference)


@torch.no_grad()
def test_units_are_idempotent_on_the_same_static_buffers(model):
    engine = loaded_engine(model, 2, LABELS[:2], SEEDS[:2], mixed_steps(model))
    run_units(engine)
    first = {name: t.clone() for name, t in engine_buffers(engine).items()}
    for _, _, fn in engine.units():
        fn()
        fn()  # twice in a row, as the graph runner's warm-up does
    for name, t in engine_buffers(engine).items():
        assert torch.equal(t, first[name]), f"{name} changed when the units ran again"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_units_touch_no_host_data(model, dtype):
    """On the meta device, .item(), nonzero(), Python branches on values and CPU tensors made inside a unit
    all raise: a unit that runs there does no host work a CUDA graph capture would trip on."""
    with torch.device("meta"):
        meta_model = ECARModel(model.config).to(dtype)
    engine = StageEngine(meta_model, 2, mixed_steps(model))
    units = list(engine.units())
    assert len(units) >= model.config.num_stages   # the test runs something: a trunk unit per stage at least
    for _, _, fn in units:
        fn()


def test_engine_buffers_never_alias(model):
    engine = StageEngine(model, 2, mixed_steps(model))
    pointers = [t.untyped_storage().data_ptr() for t in engine_buffers(engine).values()]
    assert len(set(pointers)) == len(pointers)


@torch.no_grad()
def test_padding_to_a_bucket_leaves_the_real_images_unchanged(model):
    steps = mixed_steps(model)
    padded = run_units(loaded_engine(model, batch_bucket(3), LABELS, SEEDS, steps))
    assert padded.shape[0] == 4
    # at the same batch, what fills the fourth row cannot touch the first three: bitwise
    full = run_units(loaded_engine(model, 4, LABELS + [9], SEEDS + [99], steps))
    assert torch.equal(padded[:3], full[:3])
    # against the unpadded batch and each image regenerated alone from its seed: fp32 rounding only
    # (BLAS may block a 4-row product differently from a 3-row one); a leak would differ at O(1)
    unpadded = run_units(loaded_engine(model, 3, LABELS, SEEDS, steps))
    torch.testing.assert_close(padded[:3], unpadded, rtol=1e-5, atol=1e-5)
    for k in range(3):
        alone = run_units(loaded_engine(model, 1, LABELS[k:k + 1], SEEDS[k:k + 1], steps))
        torch.testing.assert_close(padded[k:k + 1], alone, rtol=1e-5, atol=1e-5)


def test_load_checks_the_request(model):
    engine = StageEngine(model, 2, mixed_steps(model))
    noise = draw_noise(SEEDS, model.plan)
    with pytest.raises(ValueError, match="1..2 images"):
        engine.load(torch.tensor(LABELS), noise)
    with pytest.raises(ValueError, match="structure"):
        engine.load(torch.tensor(LABELS[:2]), noise, plan_steps(model.config.num_stages, 4))


@torch.no_grad()
def test_sampler_reuses_engines_per_batch_and_step_structure(model):
    sampler = Sampler(model, progress=False)

    def run(labels, **kwargs):
        return sampler.generate(labels, seed=0, steps_per_stage=2, output_type="latent", **kwargs)

    first = run([1, 2], cfg_scale=2.0).images
    assert len(sampler._engines) == 1
    assert torch.equal(run([1, 2], cfg_scale=2.0).images, first)
    run([4, 5], cfg_scale=3.0)  # other weights, same guided pattern: same engine
    assert len(sampler._engines) == 1
    run([1, 2, 3], cfg_scale=2.0)  # a new batch size (exact on the CPU: no padding without graphs)
    run([1, 2])  # unguided: another structure
    assert sorted(key[0] for key in sampler._engines) == [2, 2, 3]
    assert torch.equal(run([1, 2], cfg_scale=2.0).images, first)



class ReplayingRunner(GraphRunner):
    """A CPU stand-in for the CUDA runner: a "graph" replays the very function it was captured from, as a
    CUDA graph replays its kernels on the buffers it was captured on, so a stale graph writes a freed
    engine's buffers instead of the current one's."""

    def __init__(self):
        super().__init__(torch.device("cpu"))
        self.graphs_enabled = True  # the sampler pads to batch buckets, as on CUDA

    def _capture(self, key, fn):
        self._graphs[key] = graph = types.SimpleNamespace(replay=fn)
        return graph


def replaying_sampler(model, **kwargs):
    sampler = Sampler(model, progress=False, **kwargs)
    sampler.runner = ReplayingRunner()
    return sampler


@torch.no_grad()
def test_sampler_keeps_the_most_recently_used_engines_and_forgets_their_graphs(model):
    """Beyond max_engines the least recently used engine is dropped with its graphs: a request of its shape
    later builds a new engine and captures anew (replaying the old graphs would fill the old buffers and
    leave the new ones as they were)."""
    sampler = replaying_sampler(model, max_engines=2)

    def run(steps, labels=(1, 2)):
        return sampler.generate(list(labels), seed=0, cfg_scale=2.0, steps_per_stage=steps,
                                output_type="latent").images

    first = {steps: run(steps) for steps in (1, 2)}
    per_engine = sampler.runner.num_captures // 2
    assert torch.equal(run(1), first[1])  # engine 1 is now the most recently used
    run(3)  # a third shape: engine 2 goes
    assert [key[1][0][0] for key in sampler._engines] == [1, 3]  # the first stage's step count
    assert sampler.runner.num_captures == 2 * per_engine
    assert torch.equal(run(2), first[2])  # rebuilt and captured anew, engine 1 dropped
    assert torch.equal(run(1), first[1])


def test_clear_cache_and_max_engines(model):
    sampler = replaying_sampler(model)
    expected = sampler.generate([4], seed=3, steps_per_stage=2, output_type="latent").images
    sampler.clear_cache()
    assert not sampler._engines and sampler.runner.num_captures == 0
    assert torch.equal(sampler.generate([4], seed=3, steps_per_stage=2, output_type="latent").images, expected)
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(ValueError, match="max_engines must be an integer of at least 1"):
            Sampler(model, max_engines=bad)


@torch.no_grad()
def test_by_default_four_request_shapes_keep_their_engines(model):
    """The documented default, max_engines=4: a CLI run's two shapes (full chunks and the last) plus an
    edit's fit with room to spare, and requests of four shapes in turn capture nothing anew."""
    sampler = replaying_sampler(model)
    shapes = [dict(labels=[1, 2, 3], batch_size=2, steps_per_stage=1), dict(labels=[1], steps_per_stage=2),
              dict(labels=[1, 2, 3, 4], steps_per_stage=3)]   # batch buckets 2 and 1, 1, 4: four engines
    for shape in shapes:
        sampler.generate(shape["labels"], seed=0, steps_per_stage=shape["steps_per_stage"],
                         batch_size=shape.get("batch_size"), output_type="latent")
    captures = sampler.runner.num_captures
    assert len(sampler._engines) == 4
    for shape in shapes:
        sampler.generate(shape["labels"], seed=0, steps_per_stage=shape["steps_per_stage"],
                         batch_size=shape.get("batch_size"), output_type="latent")
    assert sampler.runner.num_captures == captures and len(sampler._engines) == 4


def test_runner_forgets_one_engine_exactly():
    """An edit engine's key extends its plain engine's: forgetting one keeps the other's graphs."""
    runner = GraphRunner(torch.device("cpu"))
    plain, edit = (4, "structure", torch.float32), (4, "structure", torch.float32, "edit", ("known", "free"))
    for engine_key in (plain, edit):
        for unit in (("ar", 0), ("flow", 1)):
            runner._graphs[(engine_key + unit, None)] = "graph"
            runner._compiled[(engine_key + unit, None)] = "fn"
    runner._eager_keys = {(plain + ("ar", 0), "triton"), (edit + ("ar", 0), "triton")}
    runner.forget(plain)
    assert {key[0][:-2] for key in [*runner._graphs, *runner._compiled, *runner._eager_keys]} == {edit}
    runner.forget(edit)
    assert not runner._graphs and not runner._compiled and not runner._eager_keys

# ---- benchmarks/bench_graphs.py: what its reported numbers are made of (no timing is asserted) -------------
def graphs_bench(tmp_path, *argv):
    from benchmarks import bench_graphs

    return bench_graphs.Bench(bench_graphs.parse_args(["--device", "cpu", "--out", str(tmp_path), *argv]))


def test_bench_graphs_speedups_targets_and_table_of_hand_built_rows(tmp_path):
    """Each path is compared with the reference row of its own preset and batch; the batch-1 latency target is
    the one with the VAE decode; images/s are the batch over the latency."""
    from benchmarks.bench_graphs import Row, speedup

    bench = graphs_bench(tmp_path)
    bench.rows = [Row("ecar-xl", 1, "graphs", 0.010, 0.015), Row("ecar-xl", 1, "reference", 0.040, 0.045),
                  Row("ecar-xl", 64, "graphs", 0.5, 1.0), Row("ecar-xl", 64, "reference", 0.6, 1.25),
                  Row("ecar-b", 1, "graphs", 0.004, 0.006)]   # no reference row
    graphs1, ref1, graphs64, _, alone = bench.rows
    assert speedup(bench.rows, graphs1, "latency_s") == pytest.approx(4.0)
    assert speedup(bench.rows, graphs1, "latency_with_decode_s") == pytest.approx(3.0)
    assert speedup(bench.rows, graphs64, "latency_s") == pytest.approx(1.2)
    assert speedup(bench.rows, ref1, "latency_s") == 1.0 and speedup(bench.rows, alone, "latency_s") is None
    targets = bench.targets()
    assert [(t["what"], t["measured"], t["met"]) for t in targets] == [
        ("ecar-xl b1: graphs vs reference (decode excluded)", pytest.approx(4.0), True),
        ("ecar-xl b1: graphs latency with VAE decode", 0.015, True),
        ("ecar-xl b64: graphs vs reference (decode excluded)", pytest.approx(1.2), False),
        ("ecar-b b1: graphs vs reference (decode excluded)", None, None)]
    text = bench.markdown()
    assert "| ecar-xl | 1 | graphs | 10.0 | 100.0 | 15.0 | 66.7 | 4.00x | 3.00x | - | - | - | - |  |" in text
    assert "| ecar-xl | 64 | graphs | 500.0 | 128.0 | 1000.0 | 64.0 | 1.20x | 1.25x | - | - | - | - |  |" in text
    assert "- ecar-xl b1: graphs latency with VAE decode: 15.0 ms (target <= 20 ms (H100)): met" in text
    assert "- ecar-xl b64: graphs vs reference (decode excluded): 1.20x (target >= 1.5x): NOT met" in text


@pytest.mark.parametrize("row_seconds, repeats", [(1000, 3), (10, 1)])
def test_bench_graphs_row_is_the_median_of_each_kind_of_call(model, tmp_path, monkeypatch, row_seconds, repeats):
    """Stand-in call times: the first call 9 s, then (without decode, with decode) pairs (1, 11), (5, 15),
    (2, 12): the medians are 2 and 12. With --row-seconds 10 the first pair (12 s) already spends the budget."""
    from benchmarks import bench_graphs

    times = iter([9.0, 1.0, 11.0, 5.0, 15.0, 2.0, 12.0])
    monkeypatch.setattr(bench_graphs, "time_call", lambda fn, device: next(times))  # nothing is sampled
    bench = graphs_bench(tmp_path, "--repeats", "3", "--row-seconds", str(row_seconds))
    row = bench.run_row("ecar-tiny", model.config, 2, "eager", model, None)
    assert row.error is None and (row.first_call_s, row.repeats) == (9.0, repeats)
    assert (row.latency_s, row.latency_with_decode_s) == ((2.0, 12.0) if repeats == 3 else (1.0, 11.0))


def test_bench_graphs_profiles_after_the_presets_timed_rows_and_stops_at_a_device_fault(tmp_path, monkeypatch,
                                                                                        capsys):
    """The profiles come after every timed row of their preset (the profiler slows later launches); a CUDA error
    that leaves the device unusable stops the sweep with the rows so far written, and main says so (status 1)."""
    from benchmarks import bench_graphs

    order = []
    monkeypatch.setattr(bench_graphs.Bench, "models",
                        lambda self, config: {torch.bfloat16: (None, None), torch.float32: (None, None)})

    def run_row(self, preset, config, batch, path, model, decoder):
        order.append(f"{path} b{batch}")
        if (path, batch) == (fault_at, 64):
            self.faults.fault = "RuntimeError: CUDA error: an illegal memory access was encountered"
        return bench_graphs.Row(preset, batch, path, 0.01, 0.02)

    monkeypatch.setattr(bench_graphs.Bench, "run_row", run_row)
    monkeypatch.setattr(bench_graphs.Bench, "profile",
                        lambda self, preset, config, batch, path, *model: order.append(f"profile {path} b{batch}"))
    argv = ["--device", "cpu", "--out", str(tmp_path), "--presets", "ecar-xl", "--batches", "1", "64"]
    fault_at = None
    assert bench_graphs.main(argv) == 0
    assert order == ["graphs b1", "eager b1", "reference b1", "graphs b64", "eager b64", "reference b64",
                     "profile graphs b1", "profile eager b1", "profile graphs b64", "profile eager b64"]
    order.clear()
    fault_at = "eager"
    assert bench_graphs.main(argv) == 1
    assert order == ["graphs b1", "eager b1", "reference b1", "graphs b64", "eager b64"]
    assert "(stopped: the device faulted (RuntimeError: CUDA error: an illegal memory access was encountered)" \
        in capsys.readouterr().out
    saved = json.loads((tmp_path / "bench_graphs.json").read_text())["rows"]
    assert [(r["batch"], r["path"]) for r in saved] == [(1, "graphs"), (1, "eager"), (1, "reference"),
                                                       (64, "graphs"), (64, "eager")]
