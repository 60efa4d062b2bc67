import dataclasses
import json
import math

import pytest

from ecar_infer import ConfigError, ECARConfig
from ecar_infer.registry import preset_names


@pytest.mark.parametrize("name", ["ecar-b", "ecar-l", "ecar-xl"])
def test_imagenet_presets_match_design(name):
    expected = {"ecar-b": (768, 12, 12, 1024, 3), "ecar-l": (1024, 24, 16, 1024, 6),
                "ecar-xl": (1152, 28, 16, 1280, 6)}[name]
    cfg = ECARConfig.preset(name)
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.head_width, cfg.head_blocks) == expected
    assert (cfg.image_size, cfg.latent_kind, cfg.patch_size, cfg.num_stages, cfg.num_classes) == (256, "sd-vae", 2, 5, 1000)
    assert cfg.grid_size == 16 and cfg.token_dim == 16


@pytest.mark.parametrize("name", preset_names())
def test_json_round_trip(name):
    cfg = ECARConfig.preset(name)
    assert ECARConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["width"] == cfg.width


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:   # a ValueError, whose message is not quoted as a KeyError's
        ECARConfig.preset("ecar-huge")
    assert str(err.value).startswith("unknown preset 'ecar-huge'; choose one of [") and "ecar-b" in str(err.value)


@pytest.mark.parametrize("changes, field", [
    (dict(num_heads=7), "num_heads"),                       # does not divide width 768
    (dict(num_stages=6), "num_stages"),                     # grid 16 not divisible by 2^5
    (dict(image_size=192, num_stages=4), "num_stages"),     # grid 12: 4 bits, but not divisible by 2^3
    (dict(patch_size=3), "patch_size"),                     # does not divide latent side 32
    (dict(image_size=250), "image_size"),                   # not divisible by the VAE's 8
    (dict(latent_kind="vq"), "latent_kind"),
    (dict(depth=0), "depth"),
    (dict(width=770, num_heads=10), "width"),               # head dim 77, not a multiple of 4
    (dict(latent_kind="pixel"), "vae_downsample"),          # pixel latents have no downsampling
    (dict(stage_windows="cosine"), "stage_windows"),
    (dict(head_kind="transformer"), "head_kind"),
    (dict(head_objective="diffusion"), "head_objective"),
    (dict(depth=True), "depth"),                            # a bool is not an integer
    (dict(num_classes=-1), "num_classes"),
    (dict(shortcut_max_level=0), "shortcut_max_level"),
    (dict(shortcut_max_level=11), "shortcut_max_level"),    # at most 2^10 steps
    (dict(mlp_ratio=0.0), "mlp_ratio"),
    (dict(norm_eps=0), "norm_eps"),
    (dict(time_scale=float("nan")), "time_scale"),
    (dict(time_scale=float("inf")), "time_scale"),
    (dict(time_scale=10**400), "time_scale"),               # an int beyond a float's range: no OverflowError
    (dict(time_scale=1e39), "time_scale"),                  # inf in float32: a checkpoint of it sampled NaN images
    (dict(vae_scaling_factor=1e300), "vae_scaling_factor"),
    (dict(mlp_ratio="4"), "mlp_ratio"),                     # a number, not its text
    (dict(vae_scaling_factor=-0.18215), "vae_scaling_factor"),
    (dict(width=72, num_heads=12), "width"),                # width % 4 == 0, but head dim 6 is not a multiple of 4
    (dict(head_kind="attention", head_num_heads=3), "head_num_heads"),  # does not divide head_width 1024
    (dict(head_kind="attention", head_width=1022, head_num_heads=2), "head_width"),  # not a multiple of 4
    (dict(renoise="false"), "renoise"),   # was True (a non-empty string), in a checkpoint no loader would take
    (dict(renoise=0), "renoise"),
    (dict(renoise=False), "renoise"),   # sampled each stage from less noise than its window, for a head trained on it
])
def test_validation_names_the_offending_field(changes, field):
    with pytest.raises(ConfigError, match=rf"ECARConfig\.{field}="):
        ECARConfig.preset("ecar-b").replace(**changes)


@pytest.mark.parametrize("changes", [
    dict(shortcut_max_level=10), dict(shortcut_max_level=1), dict(width=48, num_heads=12),  # head dim 4
    dict(head_kind="attention", head_width=1028, head_num_heads=4), dict(mlp_ratio=1e-3, norm_eps=1e-12),
    dict(head_width=1022, head_num_heads=3),   # an mlp head has no attention heads to divide it
    dict(image_size=192, num_stages=3),        # grid 12 halves exactly twice: 12, 6, 3
    dict(time_scale=3.4028234663852886e38),    # the largest float32
])
def test_values_at_each_bound_are_accepted(changes):
    cfg = ECARConfig.preset("ecar-b").replace(**changes)
    assert all(getattr(cfg, k) == v for k, v in changes.items())


@pytest.mark.parametrize("name, heads", [("ecar-b", 16), ("ecar-l", 16), ("ecar-xl", 16), ("ecar-digits32", 4),
                                         ("ecar-emoji32", 4)])
def test_head_variants_of_each_preset(name, heads):
    """docs/MODEL.md, "Presets": -attn has an attention head of half the blocks, rounded up; -sc the
    shortcut objective; -attn-sc both; everything else is the base preset's."""
    base = ECARConfig.preset(name)
    attn = base.replace(head_kind="attention", head_blocks=math.ceil(base.head_blocks / 2), head_num_heads=heads)
    assert ECARConfig.preset(f"{name}-attn") == attn
    assert ECARConfig.preset(f"{name}-sc") == base.replace(head_objective="shortcut")
    assert ECARConfig.preset(f"{name}-attn-sc") == attn.replace(head_objective="shortcut")
    assert base.head_kind == "mlp" and base.head_objective == "flow"


def test_frozen():
    cfg = ECARConfig.preset("ecar-b")
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'width'"):
        cfg.width = 1
    assert cfg.width == 768 and ECARConfig.preset("ecar-b").width == 768


def test_from_json_rejects_bad_input():
    with pytest.raises(ConfigError, match="not valid JSON"):
        ECARConfig.from_json("{width: 3")
    with pytest.raises(ConfigError, match="unknown config field"):
        ECARConfig.from_json('{"wdth": 3}')
    with pytest.raises(ConfigError, match="JSON object"):
        ECARConfig.from_json("[1, 2]")
    # replace() refuses a misspelt field the same way (it was dataclasses' TypeError)
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['wdth'\]"):
        ECARConfig.preset("ecar-tiny").replace(wdth=3)
