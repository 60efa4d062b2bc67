"""The graph runner and the engine's capturable units, on the CPU (tests/gpu/test_graphs_gpu.py has the
capture and replay tests): off CUDA the runner runs each unit once and the sampler runs the exact batch,
units are idempotent and touch no host data, padding to a batch bucket leaves the real images unchanged,
engines are reused."""
import pytest
import torch

from conftest import random_model
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
    for _, _, fn in engine.units():
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
