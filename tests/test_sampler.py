from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import random_model, stub_cuda_device
from ecar_infer import ECARConfig, Sampler
from ecar_infer.kernels.reference import block_noise, upsample2x
from ecar_infer.schedule import jump_coefficients, stage_windows
from ecar_infer.stages import patchify, unpatchify


@pytest.fixture(scope="module")
def sampler():
    return Sampler(random_model(ECARConfig.preset("ecar-tiny"), seed=3), progress=False)


def naive_sample(model, label: int, seed: int, steps: int, w: float) -> torch.Tensor:
    """docs/MODEL.md written out plainly for one image: the whole sequence is re-run through the
    block-causal forward at every stage, guidance is computed on both branches at every step."""
    cfg, plan = model.config, model.plan
    S, p, C = cfg.num_stages, cfg.patch_size, cfg.latent_channels
    gen = torch.Generator().manual_seed(seed)
    x_start = torch.randn(1, C, plan.latent_sides[0], plan.latent_sides[0], generator=gen)
    xis = [torch.randn(1, C, side, side, generator=gen) for side in plan.latent_sides[1:]]
    prev_ups = []
    for s, (start, end) in enumerate(stage_windows(S)):
        labels = torch.tensor([label, cfg.num_classes])
        h_all = model.forward_full(labels, [torch.cat([u, u]) for u in prev_ups])
        h = h_all[:, plan.stage_slice(s)]                        # [2, n_s, D]
        x = patchify(x_start, p)[0]                              # [n_s, d]
        for k in range(steps):
            r = 1 - k / steps
            t = torch.full((x.shape[0],), end + r * (start - end))
            v_c = model.head(x, t, h[0])
            v_u = model.head(x, t, h[1])
            x = x + (-1 / steps) * (v_u + w * (v_c - v_u))
        x_end = unpatchify(x[None], p, C)
        if s + 1 < S:
            alpha, beta = jump_coefficients(1 - end)
            prev_ups.append(upsample2x(x_end))
            x_start = alpha * upsample2x(x_end) + beta * block_noise(xis[s])
    return x_end[0]


def test_sampler_matches_the_plain_transcription_of_the_spec(sampler):
    out = sampler.generate([4, 7], seed=11, cfg_scale=2.5, steps_per_stage=3, output_type="latent")
    with torch.no_grad():
        for k, (label, seed) in enumerate(zip(out.class_labels, out.seeds)):
            expected = naive_sample(sampler.model, label, seed, steps=3, w=2.5)
            torch.testing.assert_close(out.images[k], expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("batch, position", [(2, 1), (5, 0), (5, 3), (8, 7)])
def test_each_image_regenerates_alone_from_its_seed(sampler, batch, position):
    labels = [(3 * i + 1) % 10 for i in range(batch)]
    out = sampler.generate(labels, seed=100, cfg_scale=2.0, steps_per_stage=2, output_type="latent")
    alone = sampler.generate([labels[position]], seed=out.seeds[position], cfg_scale=2.0, steps_per_stage=2,
                             output_type="latent")
    torch.testing.assert_close(alone.images[0], out.images[position], rtol=1e-4, atol=1e-5)


def test_batch_size_chunking_does_not_change_images(sampler):
    a = sampler.generate([1, 2, 3, 4, 5], seed=[9, 8, 7, 6, 5], steps_per_stage=2, output_type="latent")
    b = sampler.generate([1, 2, 3, 4, 5], seed=[9, 8, 7, 6, 5], steps_per_stage=2, output_type="latent", batch_size=2)
    torch.testing.assert_close(a.images, b.images, rtol=1e-4, atol=1e-5)
    assert a.seeds == [9, 8, 7, 6, 5] and a.class_labels == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_chunks_are_joined_in_order_for_every_output_type(sampler, output_type):
    """batch_size=2 over five images: the output is the three chunks' outputs, in order, of the same type."""
    labels, seeds = [1, 2, 3, 4, 5], [9, 8, 7, 6, 5]
    joined = sampler.generate(labels, seed=seeds, steps_per_stage=1, output_type=output_type, batch_size=2).images
    parts = [sampler.generate(labels[i:i + 2], seed=seeds[i:i + 2], steps_per_stage=1, output_type=output_type).images
             for i in (0, 2, 4)]
    as_array = lambda images: np.stack([np.asarray(im) for im in images]) if output_type == "pil" else np.asarray(images)  # noqa: E731
    assert type(joined) is type(parts[0]) and len(joined) == 5
    assert np.array_equal(as_array(joined), np.concatenate([as_array(p) for p in parts]))


@pytest.mark.parametrize("seed", [np.int64(5), np.array(5), torch.tensor(5)], ids=["numpy int", "0-d array",
                                                                                 "0-d tensor"])
def test_an_integer_scalar_seed_is_a_base_seed(sampler, seed):
    out = sampler.generate([1, 2], seed=seed, steps_per_stage=1, output_type="latent")
    assert out.seeds == [5, 6]


def test_different_seeds_give_different_images(sampler):
    out = sampler.generate([2, 2], seed=0, steps_per_stage=2, output_type="latent")
    assert (out.images[0] - out.images[1]).abs().max() > 1e-2


def test_output_types(sampler):
    kwargs = dict(seed=1, steps_per_stage=2)
    latent = sampler.generate([0, 1], output_type="latent", **kwargs).images
    assert isinstance(latent, torch.Tensor) and latent.shape == (2, 1, 16, 16)
    pt = sampler.generate([0, 1], output_type="pt", **kwargs).images
    torch.testing.assert_close(pt, ((latent + 1) / 2).clamp(0, 1))
    arr = sampler.generate([0, 1], output_type="np", **kwargs).images
    assert arr.dtype == np.uint8 and arr.shape == (2, 16, 16, 1)
    expected = ((latent.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    assert np.array_equal(arr, expected)
    pil = sampler.generate([0, 1], output_type="pil", **kwargs).images
    assert len(pil) == 2 and pil[0].size == (16, 16) and np.array_equal(np.asarray(pil[1]), arr[1, ..., 0])


def test_make_grid_fills_rows_left_to_right_with_ceil_sqrt_columns_by_default():
    """Image i sits at row i // columns, column i % columns, with `pad` black pixels between cells; without
    columns, a grid of b images has ceil(sqrt(b)) of them (5 -> 3, 10 -> 4, 9 -> 3)."""
    from ecar_infer.output import make_grid

    for b, columns, expected_columns in ((5, None, 3), (10, None, 4), (9, None, 3), (5, 2, 2), (3, 5, 5)):
        images = (np.arange(1, b + 1, dtype=np.uint8)[:, None, None, None] * np.ones((1, 3, 4, 2), np.uint8))
        grid = make_grid(images, columns=columns, pad=1)
        rows = -(-b // expected_columns)
        assert grid.shape == (rows * 4 - 1, expected_columns * 5 - 1, 2)
        for i in range(b):
            top, left = (i // expected_columns) * 4, (i % expected_columns) * 5
            assert (grid[top:top + 3, left:left + 4] == i + 1).all()
        assert (grid == 0).sum() == grid.size - b * 3 * 4 * 2   # everything else is padding


def test_default_dtypes_and_the_dtypes_of_the_outputs():
    """None means fp32 on the CPU and bf16 on CUDA; the VAE decodes in bf16 with a bf16 model and in fp32
    otherwise (fp16 would overflow); "latent" and "pt" outputs are fp32 on the CPU whatever the model's dtype."""
    from ecar_infer.sampler import resolve_dtype, vae_dtype

    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert [vae_dtype(d) for d in (torch.float32, torch.float16, torch.bfloat16)] == \
        [torch.float32, torch.float32, torch.bfloat16]
    cfg = ECARConfig.preset("ecar-tiny")
    assert Sampler.from_config(cfg, device="cpu", progress=False).dtype == torch.float32
    half = Sampler.from_config(cfg, device="cpu", dtype="bf16", progress=False)
    assert half.dtype == torch.bfloat16
    for output_type in ("latent", "pt"):
        images = half.generate([1], seed=0, steps_per_stage=1, output_type=output_type).images
        assert images.dtype == torch.float32 and images.device.type == "cpu"


def rows_per_call(sampler, module, method: str, rows_of, **kwargs) -> list[int]:
    """rows_of(*args) of every call of module.method during one request of 2 images, 2 steps per stage."""
    rows = []
    original = getattr(module, method)

    def spy(*args):
        rows.append(rows_of(*args))
        return original(*args)

    setattr(module, method, spy)
    try:
        sampler.generate([1, 2], seed=0, steps_per_stage=2, output_type="latent", **kwargs)
    finally:
        delattr(module, method)
    return rows


def head_rows_per_call(sampler, **kwargs) -> list[int]:
    """Rows (images x branches x tokens of the stage) of every head evaluation."""
    return rows_per_call(sampler, sampler.model.head, "velocity", lambda x, c, stage: x.shape[0] * x.shape[1],
                         **kwargs)


def trunk_rows_per_stage(sampler, **kwargs) -> list[int]:
    """Rows (images x branches) the AR transformer runs on each stage."""
    return rows_per_call(sampler, sampler.model.trunk, "forward_stage",
                         lambda s, tokens, mods, cache: tokens.shape[0], **kwargs)


def test_guidance_skips_the_null_branch_where_the_weight_is_one(sampler):
    tokens = sampler.model.plan.tokens  # (4, 16, 64) for ecar-tiny
    unguided = [2 * n for n in tokens for _ in range(2)]
    assert head_rows_per_call(sampler, cfg_scale=1.0) == unguided
    assert head_rows_per_call(sampler, cfg_scale=3.0) == [2 * r for r in unguided]
    # linear schedule: the first stage has w = 1, so its head runs on the conditional rows only
    linear = head_rows_per_call(sampler, cfg_scale=3.0, cfg_schedule="linear")
    assert linear == [2 * tokens[0]] * 2 + [4 * n for n in tokens[1:] for _ in range(2)]


def test_the_null_branch_stops_after_the_last_guided_stage(sampler):
    """Guided on stages 0-1 only (sigmas of 2 steps: 1, 0.83 | 0.8, 0.57 | 0.5, 0.25): the trunk and the head
    of stage 2 run the conditional rows alone; a guided last stage keeps both branches throughout."""
    tokens = sampler.model.plan.tokens
    assert trunk_rows_per_stage(sampler, cfg_scale=3.0) == [4, 4, 4]
    assert trunk_rows_per_stage(sampler, cfg_scale=3.0, cfg_interval=(0.55, 1.0)) == [4, 4, 2]
    assert trunk_rows_per_stage(sampler, cfg_scale=3.0, cfg_interval=(0.0, 0.55)) == [4, 4, 4]
    assert trunk_rows_per_stage(sampler, cfg_scale=1.0) == [2, 2, 2]
    early = head_rows_per_call(sampler, cfg_scale=3.0, cfg_interval=(0.55, 1.0))
    assert early == [4 * n for n in tokens[:2] for _ in range(2)] + [2 * tokens[2]] * 2


def test_a_recommended_guidance_interval_is_the_default(sampler):
    everywhere = sampler.generate([5], seed=3, cfg_scale=4.0, steps_per_stage=2, output_type="latent").images
    early = dict(cfg_scale=4.0, steps_per_stage=2, cfg_interval=(0.55, 1.0), output_type="latent")
    explicit = sampler.generate([5], seed=3, **early).images
    recommending = Sampler(sampler.model, defaults=replace(sampler.defaults, cfg_interval=(0.55, 1.0)),
                           progress=False)
    by_default = recommending.generate([5], seed=3, cfg_scale=4.0, steps_per_stage=2, output_type="latent")
    assert by_default.images.equal(explicit)
    assert recommending.generate([5], seed=3, cfg_scale=4.0, steps_per_stage=2, cfg_interval=(0.0, 1.0),
                                 output_type="latent").images.equal(everywhere)
    assert (explicit - everywhere).abs().max() > 1e-3


def test_guidance_changes_images_and_weight_one_equals_unguided(sampler):
    base = sampler.generate([5], seed=3, cfg_scale=1.0, steps_per_stage=2, output_type="latent").images
    interval_off = sampler.generate([5], seed=3, cfg_scale=4.0, cfg_interval=(0.0, 0.0), steps_per_stage=[2, 2, 2],
                                    output_type="latent").images
    guided = sampler.generate([5], seed=3, cfg_scale=4.0, steps_per_stage=2, output_type="latent").images
    torch.testing.assert_close(interval_off, base, rtol=1e-5, atol=1e-6)
    assert (guided - base).abs().max() > 1e-2


@pytest.mark.parametrize("kwargs, match", [
    (dict(class_labels=[10]), "outside this model's range 0..9"),
    (dict(class_labels=[-1]), "outside"),
    (dict(class_labels=[]), "empty"),
    (dict(class_labels=[1], steps_per_stage=[2, 2]), "3 stages"),
    (dict(class_labels=[1, 2], seed=[1]), "seeds"),
    (dict(class_labels=[1], output_type="jpeg"), "output_type"),
    (dict(class_labels=[1], cfg_schedule="cosine"), "cfg_schedule"),
    (dict(class_labels=[1], batch_size=-1), "batch_size"),
])
def test_bad_arguments_raise_clear_errors(sampler, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sampler.generate(**kwargs)


def test_progress_bar_switch(sampler, capsys):
    sampler.generate([1], seed=0, steps_per_stage=2, output_type="latent", progress=True)
    assert "sampling" in capsys.readouterr().err
    sampler.generate([1], seed=0, steps_per_stage=2, output_type="latent", progress=False)
    assert capsys.readouterr().err == ""
    # the argument overrides the sampler's setting both ways; None keeps it
    showing = Sampler(sampler.model, progress=True)
    showing.generate([1], seed=0, steps_per_stage=1, output_type="latent", progress=False)
    assert capsys.readouterr().err == ""
    showing.generate([1], seed=0, steps_per_stage=1, output_type="latent")
    assert "sampling" in capsys.readouterr().err


def test_from_config_is_deterministic_in_its_seed():
    cfg = ECARConfig.preset("ecar-tiny")
    a = Sampler.from_config(cfg, device="cpu", seed=5, progress=False)
    b = Sampler.from_config(cfg, device="cpu", seed=5, progress=False)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    out = a.generate([1], seed=0, steps_per_stage=2, output_type="latent")
    assert torch.isfinite(out.images).all()


def test_the_guidance_interval_in_effect():
    from ecar_infer.defaults import SamplingDefaults

    recommending = SamplingDefaults(cfg_interval=(0.55, 0.9))
    assert recommending.guidance_interval() == (0.55, 0.9)
    assert recommending.guidance_interval([0.2, 0.8]) == (0.2, 0.8)
    assert recommending.guidance_interval((0.0, 1.0)) is None          # everywhere, spelled out
    assert SamplingDefaults().guidance_interval() is None


@pytest.fixture
def restored_precision_flags():
    """Leaves torch's global fp32 precision flags as the test found them (the test sets them on purpose)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, torch.backends.fp32_precision)
    yield
    torch.set_float32_matmul_precision("highest")
    matmul.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, torch.backends.fp32_precision = saved


# how a caller may have set the matmul precision before generate(): the legacy flag, or the precision API
CALLER_PRECISION = {
    "legacy on": lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True),
    "legacy off": lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", False),
    "high": lambda: torch.set_float32_matmul_precision("high"),
    "highest": lambda: torch.set_float32_matmul_precision("highest"),
    "medium": lambda: torch.set_float32_matmul_precision("medium"),
}


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("caller", sorted(CALLER_PRECISION))
def test_tf32_block_keeps_the_precision_flags_readable_and_restores_them(caller, enabled, restored_precision_flags):
    """generate()'s TF32 setting, over any setting of the caller's: torch.get_float32_matmul_precision (read by
    torch.compile) works inside the block and says what the block set, and the caller's setting comes back."""
    from ecar_infer.sampler import tf32_allowed

    CALLER_PRECISION[caller]()
    before = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with tf32_allowed(enabled):
        assert torch.get_float32_matmul_precision() == ("high" if enabled else "highest")
        assert torch.backends.cuda.matmul.allow_tf32 == enabled and torch.backends.cudnn.allow_tf32 == enabled
    after = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    assert after == before


def test_tf32_block_over_flags_already_mixed_sets_and_restores_the_legacy_flag(restored_precision_flags):
    from ecar_infer.sampler import tf32_allowed

    torch.set_float32_matmul_precision("medium")
    torch.backends.cuda.matmul.allow_tf32 = True   # mixed: torch.get_float32_matmul_precision now raises
    for enabled in (False, True):
        with tf32_allowed(enabled):
            assert torch.backends.cuda.matmul.allow_tf32 == enabled
        assert torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("tf32", [True, False])
def test_an_edit_encodes_in_the_samplers_device_context(monkeypatch, tf32, restored_precision_flags):
    """The VAE encode of an edit is part of its request: on CUDA it runs with the sampler's device current and
    under its TF32 setting, as the sampling does (it ran under whatever the process had: cuDNN's TF32 on by
    default, even with tf32=False). The CUDA branch is emulated: a CPU sampler that says it is on cuda:1, with
    torch.cuda.device and the request's build stubbed."""
    import ecar_infer.sampler as sampler_module

    class Stop(Exception):
        pass

    current, seen = stub_cuda_device(monkeypatch), []

    def build_request(*args, **kwargs):
        seen.append((current[0], torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()))
        raise Stop

    sampler = Sampler.from_config(ECARConfig.preset("ecar-tiny"), device="cpu", progress=False, tf32=tf32)
    monkeypatch.setattr(sampler_module, "build_request", build_request)
    monkeypatch.setattr(sampler, "device", torch.device("cuda:1"))
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)  # no CUDA here: pixels stay put
    torch.backends.cudnn.allow_tf32 = not tf32
    with pytest.raises(Stop):
        sampler.edit(torch.zeros(1, 1, 16, 16), 1, mask="left")
    assert seen == [(1, tf32, "high" if tf32 else "highest")]
    assert current[0] == 0 and torch.backends.cudnn.allow_tf32 == (not tf32)  # restored


@pytest.mark.parametrize("call", ["generate", "edit"])
def test_a_request_in_inference_mode_leaves_the_sampler_usable_outside_it(call):
    """A first request inside torch.inference_mode() used to build the cached engine's buffers as inference
    tensors; the next request of that shape outside it failed writing into them (until clear_cache())."""
    sampler = Sampler(random_model(ECARConfig.preset("ecar-tiny"), seed=3), progress=False)
    image = torch.zeros(1, 1, sampler.config.image_size, sampler.config.image_size)
    request = {"generate": lambda: sampler.generate([3], seed=5, steps_per_stage=1, output_type="pt"),
               "edit": lambda: sampler.edit(image, 3, mask="left", seed=5, steps_per_stage=1, output_type="pt")}[call]
    with torch.inference_mode():
        inside = request().images
    outside = request().images
    torch.testing.assert_close(outside, inside, rtol=0, atol=0)
    with torch.inference_mode():   # and back again
        torch.testing.assert_close(request().images, inside, rtol=0, atol=0)


def test_the_callers_model_keeps_its_gradients():
    model = random_model(ECARConfig.preset("ecar-tiny"), seed=3)
    sampler = Sampler(model, progress=False)
    sampler.generate([1], steps_per_stage=1, output_type="pt")
    assert all(p.requires_grad for p in model.parameters())   # a model still in training stays trainable
    assert not model.training


def test_tf32_is_fixed_when_the_sampler_is_made():
    sampler = Sampler(random_model(ECARConfig.preset("ecar-tiny"), seed=3), tf32=False, progress=False)
    assert sampler.tf32 is False
    with pytest.raises(AttributeError):
        sampler.tf32 = True   # captured graphs would keep the old precision: make another Sampler
