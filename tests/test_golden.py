"""Golden latents of the shipped models: a few images at fixed seeds, at each checkpoint's recommended settings,
must stay what they were when tests/data/golden-<model>.npz was written (a regression test of the whole
sampling path: weights, model math, schedule, noise).

On the machine that wrote them the latents reproduce bit for bit (0.0 difference, at 1 and 2 threads); the
tolerance, 1e-4 on latents of order 1, leaves room only for the last-bit fp32 differences another CPU's BLAS
kernels may make, grown over a few guided steps. A change of the model's math moves them by 0.1 or more.

When the shipped model or the sampling math changes on purpose, regenerate the file (and say why in the
commit):

    python tests/test_golden.py [ecar-digits32 ...]   # default: every shipped model
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

MODELS = ("ecar-digits32", "ecar-emoji32")
LABELS, SEEDS = [0, 3, 7, 8], [0, 1, 2, 12345]


def golden_path(model: str) -> Path:
    return Path(__file__).parent / "data" / f"golden-{model.removeprefix('ecar-')}.npz"
ATOL = 1e-4


def sample(sampler) -> np.ndarray:
    out = sampler.generate(LABELS, seed=SEEDS, output_type="latent")
    return out.images.numpy().astype(np.float32)


def settings(sampler) -> dict[str, str]:
    d = sampler.defaults
    return {"cfg_scale": str(d.cfg_scale), "steps_per_stage": str(d.steps_per_stage), "cfg_schedule": d.cfg_schedule,
            "cfg_interval": str(d.cfg_interval)}


def shipped_sampler(model: str = "ecar-digits32"):
    from ecar_infer import Sampler
    from ecar_infer.weights import shipped_checkpoint

    return Sampler.from_pretrained(shipped_checkpoint(model), device="cpu", dtype="fp32", progress=False)


@pytest.mark.parametrize("model", MODELS)
@torch.no_grad()
def test_shipped_model_reproduces_its_golden_latents(model):
    sampler = shipped_sampler(model)
    with np.load(golden_path(model)) as golden:
        expected, stored = golden["latents"], {k: str(golden[k]) for k in settings(sampler)}
        assert golden["labels"].tolist() == LABELS and golden["seeds"].tolist() == SEEDS
    assert settings(sampler) == stored, ("the shipped model's recommended settings changed: regenerate the golden "
                                         "latents with `python tests/test_golden.py`")
    got = sample(sampler)
    assert got.shape == expected.shape == (len(LABELS), sampler.config.latent_channels, 32, 32)
    err = np.abs(got - expected).max()
    assert err <= ATOL, f"latents moved by up to {err:.3g} (tolerance {ATOL}); if intended, regenerate (see above)"


# A random ecar-tiny checkpoint written, and sampled, by the code before the head variants (attention head,
# shortcut objective) and the shared AdaLN layout existed (commit d0adc49, as below): a
# checkpoint of that time must still load and sample exactly as it did. Never regenerate these two files.
#
#     model = ECARModel(ECARConfig.preset("ecar-tiny")).init_weights(7, zero_init=False).eval()
#     save_checkpoint(model, path); sampler = Sampler(load_checkpoint(path), progress=False)
#     constant = sampler.generate(labels, seed=seeds, cfg_scale=3.0, steps_per_stage=3,
#                                 cfg_schedule="constant", output_type="latent")
#     linear = sampler.generate(labels, seed=seeds, cfg_scale=2.5, steps_per_stage=4,
#                               cfg_schedule="linear", output_type="latent")
OLD_CHECKPOINT = Path(__file__).parent / "data" / "tiny-before-head-variants.safetensors"
OLD_LATENTS = Path(__file__).parent / "data" / "golden-tiny-before-head-variants.npz"


@pytest.mark.parametrize("schedule, cfg_scale, steps", [("constant", 3.0, 3), ("linear", 2.5, 4)])
@torch.no_grad()
def test_an_old_checkpoint_samples_as_before_the_head_variants(schedule, cfg_scale, steps):
    from ecar_infer import Sampler
    from ecar_infer.checkpoint import load_checkpoint

    model = load_checkpoint(OLD_CHECKPOINT)
    assert model.config.head_kind == "mlp" and model.config.head_objective == "flow"
    with np.load(OLD_LATENTS) as golden:
        labels, seeds, expected = golden["labels"].tolist(), golden["seeds"].tolist(), golden[schedule]
    out = Sampler(model, progress=False).generate(labels, seed=seeds, cfg_scale=cfg_scale, steps_per_stage=steps,
                                                  cfg_schedule=schedule, output_type="latent")
    err = np.abs(out.images.numpy() - expected).max()
    assert err <= ATOL, f"latents moved by up to {err:.3g} since before the head variants"


def write_golden(models=MODELS) -> None:
    for model in models:
        sampler, path = shipped_sampler(model), golden_path(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            latents = sample(sampler)
        np.savez_compressed(path, latents=latents, labels=np.array(LABELS), seeds=np.array(SEEDS),
                            **{k: np.array(v) for k, v in settings(sampler).items()})
        print(f"wrote {path} ({latents.shape}, settings {settings(sampler)})")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    write_golden(sys.argv[1:] or MODELS)
