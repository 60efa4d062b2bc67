import math

import pytest
import torch

from ecar_infer.kernels.reference import block_noise, upsample2x
from ecar_infer.schedule import (euler_ratios, global_sigma, jump_coefficients, plan_steps, stage_guidance,
                                 stage_windows)


@pytest.mark.parametrize("num_stages, expected", [
    (3, [(1.0, 2 / 3), (0.8, 1 / 3), (0.5, 0.0)]),
    (4, [(1.0, 0.75), (6 / 7, 0.5), (2 / 3, 0.25), (0.4, 0.0)]),
    (5, [(1.0, 0.8), (8 / 9, 0.6), (0.75, 0.4), (4 / 7, 0.2), (1 / 3, 0.0)]),
])
def test_stage_windows_match_design_tables(num_stages, expected):
    for (start, end), (exp_start, exp_end) in zip(stage_windows(num_stages), expected):
        assert start == pytest.approx(exp_start, abs=1e-12)
        assert end == pytest.approx(exp_end, abs=1e-12)


@pytest.mark.parametrize("c", [0.2, 1 / 3, 0.5, 0.75, 0.9])
def test_covariance_identity_behind_alpha_and_beta(c):
    """alpha^2 (1-c)^2 11^T + beta^2 ((4/3) I - (1/3) 11^T) == (1 - alpha c)^2 I inside a 2x2 block."""
    alpha, beta = jump_coefficients(c)
    ones, eye = torch.ones(4, 4, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
    cov = alpha ** 2 * (1 - c) ** 2 * ones + beta ** 2 * (4 / 3 * eye - ones / 3)
    torch.testing.assert_close(cov, (1 - alpha * c) ** 2 * eye, rtol=0, atol=1e-12)
    # and the signal scale after the jump is what the next window's start sigma says
    assert alpha * c == pytest.approx(1 - 2 * (1 - c) / (2 - c))


def test_block_noise_statistics():
    gen = torch.Generator().manual_seed(0)
    xi = torch.randn(4000, 2, 8, 8, generator=gen, dtype=torch.float64)
    noise = block_noise(xi)
    blocks = noise.view(4000, 2, 4, 2, 4, 2).permute(0, 1, 2, 4, 3, 5).reshape(-1, 4)  # rows: one 2x2 block
    assert blocks.sum(dim=1).abs().max() < 1e-12                       # every block sums to zero
    cov = blocks.T @ blocks / blocks.shape[0]
    assert torch.diagonal(cov).sub(1).abs().max() < 0.02                # unit variance
    off = cov[~torch.eye(4, dtype=torch.bool)]
    assert (off + 1 / 3).abs().max() < 0.02                             # -1/3 correlation inside a block
    # independence across blocks: neighbouring blocks are uncorrelated
    left, right = noise[..., 0::4, 0], noise[..., 0::4, 2]
    corr = (left * right).mean() / (left.std() * right.std())
    assert abs(corr) < 0.02


def test_renoise_keeps_low_frequencies():
    """Block noise sums to zero per block, so 2x2 average pooling of the jump gives alpha * x_low."""
    x_low, xi = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    alpha, beta = jump_coefficients(0.4)
    x_high = alpha * upsample2x(x_low) + beta * block_noise(xi)
    torch.testing.assert_close(torch.nn.functional.avg_pool2d(x_high, 2), alpha * x_low)


def test_euler_grid_and_global_time():
    r = euler_ratios(4)
    torch.testing.assert_close(r, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    window = stage_windows(3)[1]  # (0.8, 1/3)
    assert global_sigma(1.0, window) == pytest.approx(0.8)
    assert global_sigma(0.0, window) == pytest.approx(1 / 3)
    plan = plan_steps(3, 4)[1]
    assert plan.sigmas == pytest.approx([1 / 3 + rk * (0.8 - 1 / 3) for rk in (1.0, 0.75, 0.5, 0.25)])
    assert plan.dr == -0.25


def test_cfg_schedules():
    assert [stage_guidance(4.0, "constant", s, 5) for s in range(5)] == [4.0] * 5
    assert [stage_guidance(4.0, "linear", s, 5) for s in range(5)] == pytest.approx([1.0, 1.75, 2.5, 3.25, 4.0])
    with pytest.raises(ValueError, match="cfg_schedule"):
        stage_guidance(4.0, "cosine", 0, 5)


def test_guidance_skips_where_weight_is_one():
    plans = plan_steps(3, 2, cfg_scale=3.0, cfg_schedule="linear")
    assert [p.any_guided for p in plans] == [False, True, True]
    assert not any(p.any_guided for p in plan_steps(3, 2, cfg_scale=1.0))


def test_cfg_interval_limits_guidance_by_global_sigma():
    plans = plan_steps(3, 4, cfg_scale=2.0, cfg_interval=(0.0, 0.5))
    for p in plans:
        for t, w in zip(p.sigmas, p.guidance):
            assert w == (2.0 if t <= 0.5 + 1e-6 else 1.0)
    assert not plans[0].any_guided and plans[2].any_guided


def test_a_bound_on_a_steps_sigma_holds_that_step():
    """The window table's 0.5 is 0.5000000000000001 as the float64 arithmetic gives it: a bound typed as 0.5
    holds that step (it fell outside: --cfg-interval 0,0.5, "guide only the last stage", left the last
    stage's first step unguided), and a bound clearly below it does not."""
    last = plan_steps(3, 4, cfg_scale=2.0, cfg_interval=(0.0, 0.5))[2]
    assert last.sigmas[0] > 0.5 and last.guidance == (2.0,) * 4
    assert plan_steps(3, 4, cfg_scale=2.0, cfg_interval=(0.0, 0.4999))[2].guidance == (1.0, 2.0, 2.0, 2.0)


def test_a_lower_bound_on_a_steps_sigma_holds_that_step():
    """The tolerance holds at the lower bound too: S = 4's last stage starts at 0.3999999999999999, so
    --cfg-interval 0.4,1 (guide from the table's 0.4 up) would leave that step unguided without it."""
    last = plan_steps(4, 4, cfg_scale=2.0, cfg_interval=(0.4, 1.0))[3]
    assert last.sigmas[0] < 0.4 and last.guidance == (2.0, 1.0, 1.0, 1.0)


def test_steps_validation():
    assert [p.steps for p in plan_steps(3, [2, 3, 4])] == [2, 3, 4]
    with pytest.raises(ValueError, match="3 stages"):
        plan_steps(3, [2, 3])
    with pytest.raises(ValueError, match="positive"):
        plan_steps(3, 0)
    assert [p.steps for p in plan_steps(2, 1000)] == [1000, 1000]
    with pytest.raises(ValueError, match=r"at most 1000 per stage, got \[2, 1001\]"):
        plan_steps(2, [2, 1001])   # a typo must not ask for a step table of terabytes
    with pytest.raises(ValueError, match="cfg_interval"):
        plan_steps(3, 2, cfg_interval=(0.6, 0.2))
    assert math.isclose(plan_steps(5, 20)[0].sigmas[0], 1.0)
