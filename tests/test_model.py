"""The central correctness test: the block-causal whole-sequence forward and the stage-by-stage forward
over the static KV cache compute the same AR outputs."""
import pytest
import torch

from conftest import random_model
from ecar_infer import ECARConfig
from ecar_infer.cache import StaticKVCache


def parity_config(num_stages: int) -> ECARConfig:
    return ECARConfig(latent_kind="pixel", latent_channels=3, image_size=16, vae_downsample=1, vae_scaling_factor=1.0,
                      patch_size=2, num_stages=num_stages, width=48, depth=3, num_heads=3, head_width=40,
                      head_blocks=2, num_classes=7)


def random_prev_ups(model, batch: int, gen: torch.Generator) -> list[torch.Tensor]:
    c, sides = model.config.latent_channels, model.plan.latent_sides
    return [torch.randn(batch, c, side, side, generator=gen) for side in sides[1:]]


@pytest.mark.parametrize("num_stages", [2, 3, 4])
@pytest.mark.parametrize("batch", [1, 3])
def test_full_and_cached_forwards_agree(num_stages, batch):
    model = random_model(parity_config(num_stages), seed=num_stages)
    gen = torch.Generator().manual_seed(100 + batch)
    labels = torch.randint(0, 8, (batch,), generator=gen)  # includes the null class 7 sometimes
    prev_ups = random_prev_ups(model, batch, gen)
    with torch.no_grad():
        full = model.forward_full(labels, prev_ups)
        cfg, plan = model.config, model.plan
        cache = StaticKVCache(cfg.depth, batch, plan.total_tokens, cfg.num_heads, cfg.head_dim, "cpu", torch.float32)
        mods = model.trunk.condition(labels)
        staged = []
        for s in range(num_stages):
            tokens = model.trunk.stage_inputs(s, labels, prev_ups[s - 1] if s else None)
            staged.append(model.trunk.forward_stage(s, tokens, mods, cache))
    staged = torch.cat(staged, dim=1)
    assert staged.shape == full.shape == (batch, plan.total_tokens, cfg.width)
    torch.testing.assert_close(staged, full, rtol=1e-5, atol=1e-5 * full.abs().max().item())


def test_block_causality_later_stages_do_not_change_earlier_outputs():
    model = random_model(parity_config(3))
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([1, 2])
    prev_ups = random_prev_ups(model, 2, gen)
    changed = [prev_ups[0], torch.randn(prev_ups[1].shape, generator=gen)]  # alter the last stage's input only
    with torch.no_grad():
        a, b = model.forward_full(labels, prev_ups), model.forward_full(labels, changed)
    last = model.plan.prefixes[-1]
    torch.testing.assert_close(a[:, :last], b[:, :last], rtol=0, atol=0)
    assert (a[:, last:] - b[:, last:]).abs().max() > 1e-3


def test_images_in_a_batch_do_not_interact():
    model = random_model(parity_config(3))
    gen = torch.Generator().manual_seed(1)
    labels = torch.tensor([3, 4, 5])
    prev_ups = random_prev_ups(model, 3, gen)
    with torch.no_grad():
        together = model.forward_full(labels, prev_ups)
        alone = model.forward_full(labels[1:2], [u[1:2] for u in prev_ups])
    torch.testing.assert_close(together[1:2], alone, rtol=1e-5, atol=1e-5)


def test_training_init_starts_every_block_at_the_identity():
    """AdaLN-Zero: with zero_init the gates are zero, so the head predicts exactly zero velocity."""
    from ecar_infer.model import ECARModel

    model = ECARModel(parity_config(2)).init_weights(0, zero_init=True)
    x = torch.randn(5, model.config.token_dim)
    v = model.head(x, torch.rand(5), torch.randn(5, model.config.width))
    assert torch.count_nonzero(v) == 0
    assert model.trunk.blocks[0].adaLN.weight.abs().sum() == 0
    assert model.trunk.blocks[0].qkv.weight.abs().sum() > 0


def test_head_rows_are_independent():
    model = random_model(parity_config(2))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, model.config.token_dim, generator=gen)
    sigma = torch.rand(6, generator=gen)
    h = torch.randn(6, model.config.width, generator=gen)
    with torch.no_grad():
        all_rows = model.head(x, sigma, h)
        row = model.head(x[4:5], sigma[4:5], h[4:5])
    torch.testing.assert_close(all_rows[4:5], row, rtol=1e-5, atol=1e-6)


def test_the_first_rows_of_the_kv_cache_are_a_view_of_it():
    """The engine's conditional-only stages write and read the first rows through this view."""
    cache = StaticKVCache(2, 4, 6, 2, 3, "cpu", torch.float32)
    view = cache.first_rows(2)
    k, v = torch.randn(2, 2, 2, 3), torch.randn(2, 2, 2, 3)
    view.write(1, 2, k, v)
    assert torch.equal(cache.keys(1)[:2, 2:4], k) and torch.equal(cache.values(1)[:2, 2:4], v)
    assert cache.buffer[:, :, 2:].abs().sum() == 0 and cache.buffer[0].abs().sum() == 0  # nothing else written
    assert view.keys(1).shape == (2, 6, 2, 3) and view.keys(1).is_contiguous()
