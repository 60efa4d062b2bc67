import torch

from ecar_infer import ECARConfig
from ecar_infer.stages import StagePlan, patchify, sincos_1d, stage_position_embedding, unpatchify


def test_default_pyramid_is_flowar_scales():
    plan = StagePlan(ECARConfig.preset("ecar-b"))
    assert plan.grids == (1, 2, 4, 8, 16)
    assert plan.tokens == (1, 4, 16, 64, 256)
    assert plan.prefixes == (0, 1, 5, 21, 85)
    assert plan.total_tokens == 341
    ids = plan.stage_ids()
    assert ids.shape == (341,) and ids[0] == 0 and ids[1:5].eq(1).all() and ids[85:].eq(4).all()
    assert plan.stage_slice(2) == slice(5, 21)


def test_patchify_round_trip_and_token_order():
    x = torch.randn(2, 3, 8, 8)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 16, 12)
    # token 1 is the patch at grid row 0, column 1; its first channel's 2x2 pixels come first
    torch.testing.assert_close(tokens[0, 1, :4], x[0, 0, 0:2, 2:4].reshape(-1))
    torch.testing.assert_close(unpatchify(tokens, 2, 3), x)


def test_positions_share_one_frame():
    """Token centres are measured in units of the finest grid: a 2x2 stage inside a 4x4 full grid has
    centres at 1 and 3, the 4x4 stage at 0.5, 1.5, 2.5, 3.5."""
    dim = 8
    coarse = stage_position_embedding(2, 4, dim)
    fine = stage_position_embedding(4, 4, dim)
    assert coarse.shape == (4, dim) and fine.shape == (16, dim)
    # token 1 of the coarse stage: row 0 (y = 1), column 1 (x = 3); first half embeds y, second half x
    expected = torch.cat([sincos_1d(torch.tensor([1.0]), dim // 2), sincos_1d(torch.tensor([3.0]), dim // 2)], dim=1)
    torch.testing.assert_close(coarse[1], expected[0].float())
    expected = torch.cat([sincos_1d(torch.tensor([2.5]), dim // 2), sincos_1d(torch.tensor([0.5]), dim // 2)], dim=1)
    torch.testing.assert_close(fine[8], expected[0].float())
    assert torch.cdist(fine, fine).add(torch.eye(16)).min() > 1e-3  # all fine tokens differ


def test_sincos_features_follow_their_formula():
    """sincos_1d(p, dim)[k] = sin(p * 10000^(-k / (dim/2))) for k < dim/2, then the cosines of the same angles."""
    import math

    positions = torch.tensor([0.0, 1.0, 2.5, 7.0])
    got = sincos_1d(positions, 8)
    for i, p in enumerate(positions.tolist()):
        angles = [p * 10000 ** (-k / 4) for k in range(4)]
        expected = torch.tensor([math.sin(a) for a in angles] + [math.cos(a) for a in angles], dtype=torch.float64)
        torch.testing.assert_close(got[i], expected)
