"""Sampling and editing through a latent model on CUDA in bf16, as users call them (skipped without CUDA):
every output type leaves the GPU as the CPU path's does, the VAE encodes and decodes on the GPU in bf16,
and an edit keeps its pixels exactly there too."""
import numpy as np
import pytest
import torch

from ecar_infer import ECARConfig, Sampler
from ecar_infer.editing import region_mask

pytestmark = pytest.mark.gpu

TINY_VAE = ECARConfig.preset("ecar-tiny-vae")  # 32 px RGB through a 2x SD-VAE-architecture AutoencoderKL


@pytest.fixture(scope="module")
def sampler():
    return Sampler.from_config(TINY_VAE, device="cuda", seed=0, progress=False)  # bf16 by default on CUDA


def rgb_images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, 32, 32, 3)).astype(np.uint8)


@torch.no_grad()
def test_every_output_type_comes_back_on_the_cpu(sampler):
    assert sampler.dtype == torch.bfloat16 and next(sampler.decoder.vae.parameters()).dtype == torch.bfloat16
    kwargs = dict(class_labels=[1, 2, 3], seed=0, steps_per_stage=2)
    for output_type in ("pt", "latent"):
        images = sampler.generate(output_type=output_type, **kwargs).images
        assert images.device.type == "cpu" and images.dtype == torch.float32 and torch.isfinite(images).all()
    array = sampler.generate(output_type="np", **kwargs).images
    assert isinstance(array, np.ndarray) and array.dtype == np.uint8 and array.shape == (3, 32, 32, 3)
    assert [im.size for im in sampler.generate(output_type="pil", **kwargs).images] == [(32, 32)] * 3


@pytest.mark.parametrize("slicing, tiling", [(True, False), (False, True)])
@torch.no_grad()
def test_vae_memory_options_decode_on_cuda(sampler, slicing, tiling):
    kwargs = dict(class_labels=[1, 2, 3], seed=0, steps_per_stage=2, output_type="pt")
    plain = sampler.generate(**kwargs).images
    sampler.decoder.set_memory_options(slicing, tiling)
    try:
        got = sampler.generate(**kwargs).images
    finally:
        sampler.decoder.set_memory_options(False, False)
    # bf16 convolutions of one image may round differently from those of the batch (cuDNN picks per shape)
    assert got.shape == plain.shape and ((got - plain).norm() / plain.norm()).item() <= 0.05


@torch.no_grad()
def test_edit_keeps_its_pixels_exactly_on_cuda(sampler):
    images = rgb_images(2, seed=1)
    keep = region_mask("left", 32, "inpaint")
    kwargs = dict(mask="left", mode="inpaint", seed=3, steps_per_stage=2)
    floats = sampler.edit(images, [1, 2], output_type="pt", **kwargs).images
    assert floats.device.type == "cpu"
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    kept = keep.expand_as(x)
    assert torch.equal(floats[kept], ((x + 1) / 2)[kept])
    uint8 = sampler.edit(images, [1, 2], output_type="np", **kwargs).images
    assert np.array_equal(uint8[:, keep.numpy()], images[:, keep.numpy()])
    latent = sampler.edit(images, [1, 2], output_type="latent", **kwargs).images
    assert latent.device.type == "cpu" and latent.shape == (2, 4, 16, 16)
    # a mask that keeps everything returns the input: the same type and device as any other edit
    whole = sampler.edit(images, [1, 2], mask=np.ones((32, 32), bool), output_type="pt", seed=3).images
    assert whole.device.type == "cpu" and torch.equal(whole, (x + 1) / 2)
