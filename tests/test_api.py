"""The Python API's argument rules: None means the default, anything else is checked (0, "" and [] are
errors); labels and seeds are integers; library errors speak Python, not ecar-sample's flags; a copy of
a loaded checkpoint keeps its metadata."""
import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_model
from ecar_infer import ECARConfig, Sampler, load_checkpoint, save_checkpoint
from ecar_infer.sampler import SamplingDefaults, resolve_device

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sampler():
    return Sampler(random_model(ECARConfig.preset("ecar-tiny"), seed=3), progress=False,
                   defaults=SamplingDefaults(steps_per_stage=2))


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps_per_stage=0), "steps_per_stage must be positive"),
    (dict(steps_per_stage=[]), "steps_per_stage has 0 entries"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(batch_size=2.5), "batch_size must be a positive integer"),
    (dict(cfg_schedule=""), "cfg_schedule must be one of"),
    (dict(cfg_scale=math.nan), "cfg_scale must be a finite number"),
    (dict(cfg_scale=math.inf), "cfg_scale must be a finite number"),
    (dict(cfg_scale=-math.inf), "cfg_scale must be a finite number"),
    (dict(cfg_scale=10**400), "cfg_scale must be a finite number"),     # an int beyond a float's range
    (dict(cfg_scale=1e30), r"cfg_scale must be within -10,000..10,000 \(.*\), got 1e\+30"),   # NaN images
    (dict(cfg_scale=-3.5e38), r"cfg_scale must be within -10,000..10,000"),
    (dict(class_labels=["3"]), "class_labels must be integers, got '3'"),
    (dict(class_labels=[3.0]), "class_labels must be integers, got 3.0"),
    (dict(class_labels=[True]), "class_labels must be integers"),
    (dict(class_labels="3"), "class_labels must be a sequence of integers"),
    (dict(class_labels=3), "class_labels must be a sequence of integers"),
    (dict(class_labels=torch.tensor([3.0])), "class_labels must hold integers"),
    (dict(class_labels=np.array([3.0])), "class_labels must hold integers, got an array of float64"),
    (dict(class_labels=np.array(3)), r"class_labels must be a sequence of integers: an array of one dimension, got "
                                     r"shape \(\)"),
    (dict(class_labels=torch.tensor([[1, 2]])), r"one dimension, got shape \(1, 2\)"),
    (dict(progress="no"), "progress must be True, False or None"),
    (dict(progress=1), "progress must be True, False or None"),
    (dict(seed=2**64), "seeds must lie in 0..2\\*\\*64-1"),
    (dict(seed=-1), r"seeds must lie in 0..2\*\*64-1 \(torch.Generator's range\), got -1$"),
    (dict(steps_per_stage=True), "steps_per_stage must be an integer or a sequence of integers, got True"),
    (dict(steps_per_stage=2.0), "steps_per_stage must be an integer or a sequence"),
    (dict(steps_per_stage="2"), "steps_per_stage must be an integer or a sequence"),
    (dict(steps_per_stage=[2.5, 2, 2]), "steps_per_stage must be integers, got 2.5"),
    (dict(cfg_scale="2"), "cfg_scale must be a number, got '2'"),
    (dict(cfg_scale=True), "cfg_scale must be a number, got True"),
    (dict(cfg_interval=()), "cfg_interval must be a pair"),
    (dict(cfg_interval=(0.1, "x")), "cfg_interval must be a number"),
    (dict(cfg_interval=(0.0, math.nan)), "cfg_interval must be a finite number"),
    (dict(seed=2**64 - 1, class_labels=[1, 2]), "seed may be at most 2\\*\\*64 - 2"),
    (dict(seed=[1.5]), "seed must be integers"),
    (dict(seed="7"), "seed must be a sequence of integers"),
    (dict(class_labels={3, 4}), "class_labels must be a sequence of integers in order, got a set; give a list"),
    (dict(seed=torch.tensor(1.5)), "seed must be a sequence of integers, got 1.5"),
])
def test_bad_arguments_are_errors_not_defaults(sampler, kwargs, match):
    kwargs = {"class_labels": [1], **kwargs}
    with pytest.raises(ValueError, match=match):
        sampler.generate(**kwargs, output_type="latent")


def test_guidance_up_to_ten_thousand_is_accepted_and_one_step_beyond_is_not(sampler):
    """The bound is inclusive: 10,000 is a weight; the next double above it is not (far beyond it, about 1e20 on
    the shipped models, float32 overflowed in the model and the images were NaN, written as black)."""
    for weight in (1e4, -1e4):
        assert sampler.plan(cfg_scale=weight)
        beyond = math.nextafter(weight, math.copysign(math.inf, weight))
        with pytest.raises(ValueError, match="cfg_scale must be within -10,000..10,000"):
            sampler.plan(cfg_scale=beyond)


def test_none_means_the_default_and_integer_kinds_are_accepted(sampler):
    defaults = dict(steps_per_stage=2, cfg_scale=1.0, cfg_schedule="constant")
    plain = sampler.generate([1, 2], seed=5, output_type="latent")
    explicit = sampler.generate([1, 2], seed=5, output_type="latent", batch_size=2, **defaults)
    assert torch.equal(plain.images, explicit.images)
    numpy_kinds = sampler.generate([1, 2], seed=5, output_type="latent", steps_per_stage=np.int64(2),
                                   cfg_scale=np.float32(1.0))
    assert torch.equal(plain.images, numpy_kinds.images)
    for labels in ([np.int64(1), np.int32(2)], np.array([1, 2]), torch.tensor([1, 2])):
        out = sampler.generate(labels, seed=[np.uint64(5), 6], output_type="latent", batch_size=None,
                               cfg_scale=None, cfg_schedule=None, steps_per_stage=None)
        assert out.class_labels == [1, 2] and out.seeds == [5, 6]
        assert torch.equal(out.images, plain.images)
    assert sampler.generate([1], seed=2**64 - 1, output_type="latent").seeds == [2**64 - 1]


@pytest.mark.parametrize("kwargs, match", [
    (dict(device="gpu"), "device must be 'auto', 'cpu', 'cuda' or 'cuda:N' .*got 'gpu'"),
    (dict(device=3), "device must be .*got 3"),
    (dict(device="meta"), "device must be .*got 'meta'"),
    (dict(dtype=torch.int8), r"dtype must be one of \[.*\] or torch.float32 / bfloat16 / float16, got torch.int8"),
    (dict(dtype=torch.float64), "dtype must be one of"),
    (dict(dtype="fp64"), "dtype must be one of"),
    (dict(seed=1.5), r"seed must be an integer in 0..2\*\*64-1, got 1.5"),
    (dict(seed=-1), "seed must be an integer in 0..2"),
    (dict(progress="no"), "progress must be True or False, got 'no'"),
    # a string is true to Python: compile="false" compiled for minutes
    (dict(compile="false"), "compile must be True or False, got 'false'"),
    (dict(cuda_graphs="no"), "cuda_graphs must be True or False, got 'no'"),
    (dict(tf32=0), "tf32 must be True or False, got 0"),
    (dict(random_vae="off"), "random_vae must be True or False, got 'off'"),
    (dict(max_engines=2.0), "max_engines must be an integer of at least 1, got 2.0"),
])
def test_bad_sampler_options_are_value_errors_that_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampler.from_config(ECARConfig.preset("ecar-tiny"), **{"device": "cpu", **kwargs})


@pytest.mark.parametrize("switch", ["vae_slicing", "vae_tiling"])
def test_from_pretrained_refuses_a_switch_that_is_not_a_bool_before_loading(switch, monkeypatch):
    import ecar_infer.checkpoint

    monkeypatch.setattr(ecar_infer.checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ValueError, match=f"{switch} must be True or False, got 'no'"):
        Sampler.from_pretrained("ecar-digits32", device="cpu", **{switch: "no"})


def test_from_config_takes_a_preset_name_and_refuses_other_types():
    named = Sampler.from_config("ecar-tiny", device="CPU", seed=4, progress=False)
    config = ECARConfig.preset("ecar-tiny")
    assert named.config == config and named.device == torch.device("cpu")
    same = Sampler.from_config(config, device=torch.device("cpu"), seed=4, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(named.model.state_dict().values(), same.model.state_dict().values()))
    with pytest.raises(ValueError, match="config must be an ECARConfig or a preset's name, got dict"):
        Sampler.from_config(config.to_dict(), device="cpu")
    with pytest.raises(ValueError, match="unknown preset 'ecar-nope'"):
        Sampler.from_config("ecar-nope", device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_error_speaks_python():
    with pytest.raises(ValueError, match="device='cuda' was asked for .* use device='cpu' or 'auto'"):
        resolve_device("cuda")


def cli_flags() -> set[str]:
    from ecar_infer.cli import build_parser

    return {s for action in build_parser()._actions for s in action.option_strings if s.startswith("--")}


def raised_messages(path: Path) -> list[str]:
    """The string constants (f-string parts included) in the raise statements of a source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and node.exc is not None:
            found += [n.value for n in ast.walk(node.exc) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return found


def test_library_errors_never_name_command_line_flags():
    """Only the command lines (cli.py, edit_cli.py) may tell the user to pass --something; the library's
    errors name Python arguments (device='cpu', vae=PATH)."""
    flags = cli_flags()
    sources = [p for p in [*(ROOT / "ecar_infer").glob("*.py"), *(ROOT / "ecar_infer" / "model").glob("*.py"),
                           *(ROOT / "kernels").glob("*.py")] if p.name not in ("cli.py", "edit_cli.py")]
    assert len(sources) > 10
    offending = [(p.name, m) for p in sources for m in raised_messages(p)
                 if any(f"{flag} " in f"{m} " or f"{flag}=" in m for flag in flags)]
    assert offending == []


def test_a_copy_of_a_loaded_checkpoint_keeps_its_metadata(tmp_path):
    original = tmp_path / "original.safetensors"
    save_checkpoint(random_model(ECARConfig.preset("ecar-tiny")), original,
                    extra_metadata={"recommended_steps": "10", "recommended_cfg": "4.0", "note": "kept"})
    model = load_checkpoint(original)
    save_checkpoint(model, tmp_path / "copy.safetensors", extra_metadata={"recommended_cfg": "2.0"})
    copy = load_checkpoint(tmp_path / "copy.safetensors")
    assert copy.checkpoint_metadata == {"recommended_steps": "10", "recommended_cfg": "2.0", "note": "kept"}
    assert Sampler.from_pretrained(tmp_path / "copy.safetensors", device="cpu").defaults.steps_per_stage == 10


def test_from_pretrained_takes_a_shipped_models_name(tmp_path, monkeypatch):
    from ecar_infer.weights import shipped_checkpoint

    by_name = Sampler.from_pretrained("ecar-digits32", device="cpu", progress=False)
    by_path = Sampler.from_pretrained(shipped_checkpoint("ecar-digits32"), device="cpu", progress=False)
    assert by_name.defaults == by_path.defaults
    for a, b in zip(by_name.model.parameters(), by_path.model.parameters()):
        assert torch.equal(a, b)
    monkeypatch.chdir(tmp_path)  # a file of that name in the working folder comes first
    save_checkpoint(random_model(ECARConfig.preset("ecar-tiny"), seed=1), tmp_path / "ecar-digits32")
    assert Sampler.from_pretrained("ecar-digits32", device="cpu").config == ECARConfig.preset("ecar-tiny")


def test_from_pretrained_without_a_path_is_the_default_model_of_ecar_sample():
    from ecar_infer.weights import DEFAULT_MODEL

    default = Sampler.from_pretrained(device="cpu", progress=False)
    named = Sampler.from_pretrained(DEFAULT_MODEL, device="cpu", progress=False)
    assert default.config == named.config and default.defaults == named.defaults
    assert all(torch.equal(a, b) for a, b in zip(default.model.parameters(), named.model.parameters()))


def test_a_models_name_is_resolved_only_when_no_such_path_exists(tmp_path, monkeypatch):
    from ecar_infer.weights import WEIGHTS_DIR, checkpoint_path, default_checkpoint, shipped_models

    assert {"ecar-digits32", "ecar-emoji32"} <= set(shipped_models())
    assert len(set(shipped_models())) == len(shipped_models())
    for name in shipped_models():  # a name is a file beside the package, and resolves to it
        assert (WEIGHTS_DIR / f"{name}.safetensors").is_file() and checkpoint_path(name) == WEIGHTS_DIR / f"{name}.safetensors"
    assert checkpoint_path(None) == default_checkpoint() == WEIGHTS_DIR / "ecar-emoji32.safetensors"
    monkeypatch.chdir(tmp_path)
    for given in ("elsewhere/ecar-digits32", str(tmp_path / "ecar-digits32"), "ecar-digits32.safetensors",
                  "ECAR-DIGITS32", "__init__", "ecar-digits32.md"):  # paths, not names: given back for the loader
        assert checkpoint_path(given) == Path(given), given


@pytest.mark.parametrize("name, preset, changes", [("ecar-digits32", "ecar-digits32-attn", {}),
                                                   ("ecar-emoji32", "ecar-emoji32-attn-sc", {"depth": 8})])
def test_each_shipped_checkpoint_is_the_preset_its_card_names(name, preset, changes):
    """weights/<name>.md names the preset (and --set changes) each shipped model was trained with; the
    file's own config (read from its header alone) must be that preset, so the presets cannot drift."""
    from safetensors import safe_open

    from ecar_infer.weights import WEIGHTS_DIR

    card = (WEIGHTS_DIR / f"{name}.md").read_text()
    assert f"`{preset}`" in card and all(f"--set {k}={v}" in card for k, v in changes.items())
    with safe_open(WEIGHTS_DIR / f"{name}.safetensors", framework="pt") as f:
        stored = ECARConfig.from_json(f.metadata()["config"])
    assert stored == ECARConfig.preset(preset).replace(**changes)


def test_a_samplers_repr_says_its_model_device_and_defaults():
    model = random_model(ECARConfig.preset("ecar-tiny").replace(head_kind="attention", head_objective="shortcut",
                                                                head_blocks=2), seed=1)
    params = sum(p.numel() for p in model.parameters())
    shown = repr(Sampler(model, progress=False, defaults=SamplingDefaults(cfg_scale=3.5, steps_per_stage=(1, 2, 2),
                                                                          cfg_interval=(0.55, 0.9))))
    assert shown == (f"Sampler(16x16 pixel model, 3 stages, 10 classes, {params:,} parameters, attention head "
                     f"(shortcut); cpu, float32, CUDA graphs off; defaults: [1, 2, 2] steps per stage, guidance 3.5 "
                     f"(constant) on sigma 0.55-0.9)")
    plain = repr(Sampler(random_model(ECARConfig.preset("ecar-tiny"), seed=1), progress=False))
    assert "mlp head;" in plain and plain.endswith("defaults: 20 steps per stage, unguided)")


def test_a_samplers_repr_says_whether_cuda_graphs_are_on():
    """A CPU sampler never captures graphs; one that does (on a GPU, the runner's switch on) says so: the
    line a user checks before timing a run."""
    sampler = Sampler(random_model(ECARConfig.preset("ecar-tiny"), seed=1), progress=False)
    assert "CUDA graphs off;" in repr(sampler)
    sampler.runner.graphs_enabled = True   # as a CUDA device with cuda_graphs=True sets it
    assert "CUDA graphs on;" in repr(sampler)


def test_the_lazy_names_of_the_package_are_listed():
    import ecar_infer

    assert set(ecar_infer.__all__) <= set(dir(ecar_infer))


def test_requests_from_two_threads_give_the_images_each_gives_alone():
    """Requests of one shape share an engine's static buffers: two threads on one sampler overwrote each
    other's (images off by up to 255 levels). A sampler runs one request at a time now."""
    import threading

    sampler = Sampler.from_config("ecar-tiny", device="cpu", progress=False)
    alone = {seed: sampler.generate(list(range(8)), seed=seed, steps_per_stage=20, output_type="np").images
             for seed in (0, 50)}
    together = {}

    def request(seed):
        together[seed] = sampler.generate(list(range(8)), seed=seed, steps_per_stage=20, output_type="np").images

    threads = [threading.Thread(target=request, args=(seed,)) for seed in (0, 50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed in (0, 50):
        assert np.array_equal(together[seed], alone[seed]), seed


def test_an_images_noise_does_not_follow_torchs_default_dtype():
    """torch.set_default_dtype(torch.float64) made the noise draws float64, another stream: other images for
    the same seed."""
    sampler = Sampler.from_config("ecar-tiny", device="cpu", progress=False)
    want = sampler.generate([1, 2], seed=3, steps_per_stage=2, output_type="latent").images
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = sampler.generate([1, 2], seed=3, steps_per_stage=2, output_type="latent").images
    finally:
        torch.set_default_dtype(default)
    assert torch.equal(got, want)


def test_load_checkpoint_takes_devices_as_from_pretrained_does():
    """It passed the device to torch as given: "auto" and "CPU" were RuntimeErrors from inside torch."""
    from ecar_infer import load_checkpoint

    for device in ("auto", "CPU", torch.device("cpu")):
        assert next(load_checkpoint("ecar-digits32", device=device).parameters()).device.type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        load_checkpoint("ecar-digits32", device="gpu")


def test_a_sampler_of_a_loaded_model_takes_its_checkpoints_recommended_settings():
    """Sampler(load_checkpoint(...)) sampled at 20 steps unguided while from_pretrained gave the card's
    settings; both give the checkpoint's recommended now, and given defaults still win."""
    from ecar_infer import load_checkpoint

    model = load_checkpoint("ecar-digits32")
    assert Sampler(model, progress=False).defaults == Sampler.from_pretrained("ecar-digits32", device="cpu").defaults
    assert Sampler(model, progress=False).defaults.cfg_scale == 2.0
    mine = SamplingDefaults(steps_per_stage=3)
    assert Sampler(model, defaults=mine).defaults == mine
    assert Sampler.from_pretrained("ecar-digits32", device="cpu", defaults=mine).defaults == mine
