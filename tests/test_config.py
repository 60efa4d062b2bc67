import dataclasses
import json

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
    with pytest.raises(KeyError, match="ecar-b"):
        ECARConfig.preset("ecar-huge")


@pytest.mark.parametrize("changes, field", [
    (dict(num_heads=7), "num_heads"),                       # does not divide width 768
    (dict(num_stages=6), "num_stages"),                     # grid 16 not divisible by 2^5
    (dict(patch_size=3), "patch_size"),                     # does not divide latent side 32
    (dict(image_size=250), "image_size"),                   # not divisible by the VAE's 8
    (dict(latent_kind="vq"), "latent_kind"),
    (dict(depth=0), "depth"),
    (dict(width=770, num_heads=10), "width"),               # head dim 77, not a multiple of 4
    (dict(latent_kind="pixel"), "vae_downsample"),          # pixel latents have no downsampling
    (dict(stage_windows="cosine"), "stage_windows"),
])
def test_validation_names_the_offending_field(changes, field):
    with pytest.raises(ConfigError, match=rf"ECARConfig\.{field}="):
        ECARConfig.preset("ecar-b").replace(**changes)


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
