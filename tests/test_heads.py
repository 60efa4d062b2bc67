"""The head variants (docs/MODEL.md, "Head variants"): the attention head and the shortcut objective.

Every check runs on random weights (init_weights(zero_init=False)) unless it is about initialisation.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import random_model
from ecar_infer import ECARConfig, Sampler
from ecar_infer.kernels.reference import block_noise, upsample2x
from ecar_infer.model import ECARModel
from ecar_infer.schedule import jump_coefficients, plan_steps, stage_windows
from ecar_infer.stages import patchify, unpatchify
from ecar_infer.training.objective import (SHORTCUT_TARGET_CLIP, ShortcutObjective, StepDraws, build_objective,
                                           draw_step, shortcut_target, stage_targets)

TINY = ECARConfig.preset("ecar-tiny")
VARIANTS = {
    "mlp/flow": TINY,
    "attention/flow": TINY.replace(head_kind="attention", head_num_heads=2),
    "mlp/shortcut": TINY.replace(head_objective="shortcut", shortcut_max_level=3),
    "attention/shortcut": TINY.replace(head_kind="attention", head_num_heads=2, head_objective="shortcut",
                                       shortcut_max_level=3),
}


def naive_sample(model: ECARModel, label: int, seed: int, steps: list[int], w: float) -> torch.Tensor:
    """One image, written out plainly: the whole sequence re-run under the block-causal mask at every stage,
    the head in its training form (head.forward_stage) on both branches at every step, x <- x - d v."""
    cfg, plan = model.config, model.plan
    p, c = cfg.patch_size, cfg.latent_channels
    gen = torch.Generator().manual_seed(seed)
    x_start = torch.randn(1, c, plan.latent_sides[0], plan.latent_sides[0], generator=gen)
    xis = [torch.randn(1, c, side, side, generator=gen) for side in plan.latent_sides[1:]]
    prev_ups = []
    for s, (start, end) in enumerate(stage_windows(cfg.num_stages)):
        labels = torch.tensor([label, cfg.null_class])
        h = model.forward_full(labels, [torch.cat([u, u]) for u in prev_ups])[:, plan.stage_slice(s)]
        x = patchify(x_start, p)                                     # [1, n, d]
        n = steps[s]
        level = torch.full((2,), float(math.log2(n))) if cfg.shortcut else None
        for k in range(n):
            t = torch.full((2,), end + (1 - k / n) * (start - end))
            v = model.head.forward_stage(torch.cat([x, x]), t, h, s, level)
            x = x - (v[1:] + w * (v[:1] - v[1:])) / n
        x_end = unpatchify(x, p, c)
        if s + 1 < cfg.num_stages:
            alpha, beta = jump_coefficients(1 - end)
            prev_ups.append(upsample2x(x_end))
            x_start = alpha * upsample2x(x_end) + beta * block_noise(xis[s])
    return x_end[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_staged_sampler_matches_the_whole_sequence_transcription(variant):
    model = random_model(VARIANTS[variant], seed=1)
    steps = [2, 1, 4] if model.config.shortcut else [3, 2, 1]
    out = Sampler(model, progress=False).generate([4, 7], seed=11, cfg_scale=2.5, steps_per_stage=steps,
                                                  output_type="latent")
    with torch.no_grad():
        for k, (label, seed) in enumerate(zip(out.class_labels, out.seeds)):
            expected = naive_sample(model, label, seed, steps, 2.5)
            torch.testing.assert_close(out.images[k], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, joint", [("mlp", False), ("attention", True)])
def test_only_the_joint_head_sees_a_neighbouring_token(kind, joint):
    model = random_model(TINY.replace(head_kind=kind, head_num_heads=2), seed=2)
    gen = torch.Generator().manual_seed(0)
    n, d = model.plan.tokens[1], model.config.token_dim
    x = torch.randn(3, n, d, generator=gen)
    h = torch.randn(3, n, model.config.width, generator=gen)
    sigma = torch.rand(3, generator=gen)
    moved = x.clone()
    moved[:, 5] += 1.0                                                 # change token 5 only
    with torch.no_grad():
        before = model.head.forward_stage(x, sigma, h, 1)
        after = model.head.forward_stage(moved, sigma, h, 1)
    others = [i for i in range(n) if i != 5]
    changed = (after[:, others] - before[:, others]).abs().max().item()
    assert changed > 1e-3 if joint else changed == 0.0
    # and never across images: image 0 alone gives the same velocity as in the batch
    with torch.no_grad():
        alone = model.head.forward_stage(x[:1], sigma[:1], h[:1], 1)
    torch.testing.assert_close(alone, before[:1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_a_fresh_shortcut_head_is_the_flow_head_at_every_level(kind):
    flow_cfg = TINY.replace(head_kind=kind, head_num_heads=2)
    flow = ECARModel(flow_cfg).init_weights(0, zero_init=False)
    shortcut = ECARModel(flow_cfg.replace(head_objective="shortcut", shortcut_max_level=4)).init_weights(0)
    missing = shortcut.load_state_dict(flow.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["head.level_fc1.bias", "head.level_fc1.weight", "head.level_fc2.bias",
                               "head.level_fc2.weight"]
    assert torch.count_nonzero(shortcut.head.level_fc1.weight) > 0      # only the output layer is zero
    gen = torch.Generator().manual_seed(1)
    n, d = flow.plan.tokens[2], flow_cfg.token_dim
    x, h = torch.randn(2, n, d, generator=gen), torch.randn(2, n, flow_cfg.width, generator=gen)
    sigma = torch.rand(2, generator=gen)
    with torch.no_grad():
        expected = flow.head.forward_stage(x, sigma, h, 2)
        for level in range(5):
            got = shortcut.head.forward_stage(x, sigma, h, 2, torch.full((2,), float(level)))
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


class AffineHead:
    """A stand-in head with a known velocity: v = a * x + b * sigma + c * level (per image)."""

    def __init__(self, a: float, b: float, c: float) -> None:
        self.a, self.b, self.c = a, b, c
        self.calls = []

    def forward_stage(self, x, sigma, h, stage, level):
        self.calls.append((sigma.clone(), level.clone()))
        return self.a * x + self.b * sigma.view(-1, 1, 1) + self.c * level.view(-1, 1, 1)


def test_shortcut_target_by_hand():
    head = AffineHead(a=0.5, b=2.0, c=0.1)
    window = (0.8, 1 / 3)                                   # stage 1 of a 3-stage model
    x_r = torch.tensor([[[1.0, -2.0]], [[0.25, 9.0]]])     # two images, one token of dim 2
    r = torch.tensor([1.0, 0.5])
    level = torch.tensor([0, 2])                            # steps d = 1 and d = 1/4
    got = shortcut_target(head, x_r, torch.zeros(2, 1, 4), 1, r, level, window)
    sigma = lambda ratio: window[1] + ratio * (window[0] - window[1])  # noqa: E731
    for i, (d, rr, lvl) in enumerate([(1.0, 1.0, 1.0), (0.25, 0.5, 3.0)]):   # the half steps are one level finer
        a = 0.5 * x_r[i] + 2.0 * sigma(rr) + 0.1 * lvl
        x_half = x_r[i] - d / 2 * a
        b = 0.5 * x_half + 2.0 * sigma(rr - d / 2) + 0.1 * lvl
        expected = ((a + b) / 2).clamp(-SHORTCUT_TARGET_CLIP, SHORTCUT_TARGET_CLIP)
        torch.testing.assert_close(got[i], expected)
    assert got[1, 0, 1] == SHORTCUT_TARGET_CLIP             # 0.5 * 9 + ... is clipped
    assert [c[1].tolist() for c in head.calls] == [[1.0, 3.0], [1.0, 3.0]]


def test_shortcut_draws_put_consistency_rows_on_their_level_grid():
    cfg = VARIANTS["mlp/shortcut"]
    draws = draw_step(torch.Generator().manual_seed(0), ECARModel(cfg).plan, 100, 4000)
    top = cfg.shortcut_max_level
    consistency = draws.level < top
    assert 0.2 < consistency.float().mean() < 0.3             # SHORTCUT_FRACTION = 1/4
    d = 2.0 ** -draws.level[consistency].float()
    r = draws.r[consistency]
    assert ((r / d) - (r / d).round()).abs().max() < 1e-5 and (r >= d - 1e-6).all() and (r <= 1).all()
    assert set(draws.level[consistency].unique().tolist()) == set(range(top))
    # the flow rows keep r ~ U(0, 1); the flow objective draws exactly what it always drew
    flow = draw_step(torch.Generator().manual_seed(0), ECARModel(TINY).plan, 100, 4000)
    assert flow.level is None and torch.equal(flow.r[~consistency], draws.r[~consistency])


def test_shortcut_draws_cover_each_level_grid_uniformly_and_drop_labels_on_every_kind_of_row():
    """docs/MODEL.md: a consistency row at level l has r ~ U{d, 2d, ..., 1} (every point of the grid, 1 included,
    equally likely), and labels drop with p = 0.1 on images with consistency rows as on the others."""
    cfg = VARIANTS["mlp/shortcut"]
    draws = draw_step(torch.Generator().manual_seed(1), ECARModel(cfg).plan, 100, 20000)
    consistency = draws.level < cfg.shortcut_max_level
    for level in range(cfg.shortcut_max_level):
        at = consistency & (draws.level == level)
        k = (draws.r[at] * 2 ** level).round().long()                  # r = k d, k = 1 .. 2^l
        counts = torch.bincount(k, minlength=2 ** level + 1)
        assert counts[0] == 0 and len(counts) == 2 ** level + 1         # never r = 0, never beyond 1
        share = counts[1:].float() / at.sum()
        assert (share - 2.0 ** -level).abs().max() < 0.25 * 2.0 ** -level, (level, share.tolist())
    mixed = consistency.any(dim=1)                                       # ~58% of the images
    for rows in (mixed, ~mixed):
        assert 0.085 < draws.drop[rows].float().mean().item() < 0.115   # binomial sd < 0.0033 here
    # rows are drawn per image AND stage: the kind, the level and r of one stage tell nothing of another's
    both = consistency[:, 0] & consistency[:, 1]
    assert 0.05 < both.float().mean().item() < 0.075                      # 1/16 (per image: 1/4)
    same_level = (draws.level[both, 0] == draws.level[both, 1]).float().mean().item()
    assert abs(same_level - 1 / cfg.shortcut_max_level) < 0.06            # 1/3 (per image: 1)
    flow = ~consistency[:, 0] & ~consistency[:, 1]
    r0, r1 = draws.r[flow, 0], draws.r[flow, 1]
    assert abs(torch.corrcoef(torch.stack([r0, r1]))[0, 1].item()) < 0.05


def test_shortcut_objective_trains_the_trunk_on_flow_rows_only():
    cfg = VARIANTS["attention/shortcut"]
    model, ema = random_model(cfg, seed=3).train(), random_model(cfg, seed=4)
    objective = ShortcutObjective(model, ema)
    assert not any(p is q for p in objective.parameters() for q in ema.parameters())
    gen = torch.Generator().manual_seed(5)
    b = 4
    eps = [torch.randn(b, 1, side, side, generator=gen) for side in model.plan.latent_sides]
    x0 = torch.randn(b, 1, 16, 16, generator=gen)
    top = cfg.shortcut_max_level
    all_consistency = StepDraws(torch.arange(b), eps, torch.full((b, 3), 0.5), torch.zeros(b, dtype=torch.bool),
                                torch.ones(b, 3, dtype=torch.long))
    loss = objective(x0, torch.arange(b), all_consistency)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.trunk.parameters())
    assert model.head.level_fc2.weight.grad.abs().max() > 0
    model.zero_grad()
    flow_rows = StepDraws(torch.arange(b), eps, torch.rand(b, 3, generator=gen), torch.zeros(b, dtype=torch.bool),
                          torch.full((b, 3), top))
    objective(x0, torch.arange(b), flow_rows).backward()
    assert model.trunk.input_proj.weight.grad.abs().max() > 0


def head_calls(sampler: Sampler, **kwargs) -> list[int]:
    calls = []
    head = sampler.model.head
    original = head.velocity

    def spy(x, c, stage):
        calls.append(stage)
        return original(x, c, stage)

    head.velocity = spy
    try:
        sampler.generate([1, 2], seed=0, output_type="latent", **kwargs)
    finally:
        del head.velocity
    return calls


def test_a_shortcut_model_takes_exactly_its_power_of_two_steps():
    sampler = Sampler(random_model(VARIANTS["attention/shortcut"]), progress=False)
    assert head_calls(sampler, steps_per_stage=[1, 2, 8], cfg_scale=3.0) == [0] + [1] * 2 + [2] * 8
    assert head_calls(sampler, steps_per_stage=1, cfg_scale=1.0) == [0, 1, 2]
    assert sampler.defaults.steps_per_stage == 4
    for bad in (3, [1, 2, 16], [1, 6, 2]):
        with pytest.raises(ValueError, match="power of two"):
            sampler.generate([1], steps_per_stage=bad)


def test_shortcut_plans_tell_the_head_its_level_and_flow_plans_do_not():
    plans = plan_steps(3, [1, 2, 4], 2.0, shortcut_max_level=3)
    assert [p.level for p in plans] == [0, 1, 2] and [p.dr for p in plans] == [-1.0, -0.5, -0.25]
    assert all(p.level is None for p in plan_steps(3, 5, 2.0))


def objective_by_hand(model: ECARModel, ema: ECARModel, x0, labels, draws: StepDraws) -> torch.Tensor:
    """docs/MODEL.md's objectives written out stage by stage with the head's training form: labels dropped
    on every kind of row; the AR input of stage s > 1 is Up of stage s-1's x_end; each stage's tokens at
    that stage's global sigma (and level); a consistency row's target from the EMA head on its own stage's
    window, one level finer; one MSE over every token."""
    cfg, plan = model.config, model.plan
    p, top = cfg.patch_size, cfg.shortcut_max_level
    stages = stage_targets(x0, draws.eps, draws.r)
    shown = torch.where(draws.drop, cfg.null_class, labels)
    h = model.forward_full(shown, [upsample2x(st.x_end) for st in stages[:-1]])
    errors = []
    for s, (st, window) in enumerate(zip(stages, stage_windows(cfg.num_stages))):
        h_s, x_r, target = h[:, plan.stage_slice(s)], patchify(st.x_r, p), patchify(st.target, p)
        level = None if draws.level is None else draws.level[:, s]
        if level is not None:
            for i in (level < top).nonzero().flatten().tolist():
                target[i] = shortcut_target(ema.head, x_r[i:i + 1], h_s[i:i + 1], s, draws.r[i:i + 1, s],
                                            level[i:i + 1], window)[0]
            level = level.float()
        v = model.head.forward_stage(x_r, st.sigma, h_s, s, level)
        errors.append((v - target).square().flatten(1))
    return torch.cat(errors, dim=1).mean()


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_objective_matches_its_definition_by_hand(variant):
    """The whole loss of a step, on random (model, EMA) pairs that differ: a shortcut batch mixes flow rows
    and consistency rows of several levels, per image and stage, and drops labels on both kinds."""
    cfg = VARIANTS[variant]
    model, ema = random_model(cfg, seed=5), random_model(cfg, seed=6)
    gen = torch.Generator().manual_seed(7)
    b, top = 4, cfg.shortcut_max_level
    x0 = torch.randn(b, 1, 16, 16, generator=gen)
    eps = [torch.randn(b, 1, side, side, generator=gen) for side in model.plan.latent_sides]
    level = torch.tensor([[top, 0, 2], [1, top, top], [2, 1, 0], [top, top, top]]) if cfg.shortcut else None
    r = torch.rand(b, 3, generator=gen)
    if level is not None:   # consistency rows on their level's grid, as draw_step puts them
        r = torch.where(level < top, (r * 2.0 ** level).floor().add(1) * 2.0 ** -level, r)
    draws = StepDraws(torch.arange(b), eps, r, torch.tensor([True, False, True, False]), level)
    labels = torch.tensor([3, 1, 4, 1])
    with torch.no_grad():
        got = build_objective(model, ema)(x0, labels, draws)
        want = objective_by_hand(model, ema, x0, labels, draws)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
