"""Editing without retraining (docs/MODEL.md, "Editing without retraining"): the mask pyramid and the known
endpoints against hand-built examples, the clamp checked inside the Euler loop, kept pixels exact (pixel
models by the clamp alone; latent models by the final paste over the decoded image), `vary` from stage 0
equal to generate, input errors, and the fused kernel against its reference."""
from __future__ import annotations

import logging
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_matches_reference, compile_for_sm90, random_model
from ecar_infer import ECARConfig, Sampler
from ecar_infer.editing import (EditInputError, EditRequest, as_images, as_keep_masks, build_request, fitted_image,
                                fitted_mask, known_endpoints, mask_pyramid, min_pool, region_mask)
from ecar_infer.engine import StageEngine
from ecar_infer.kernels import INTERPRETING, ops, reference
from ecar_infer.noise import draw_noise
from ecar_infer.stages import patchify

TINY = ECARConfig.preset("ecar-tiny")  # pixel space, 16 px, 1 channel, patch 2, 3 stages (latent sides 4, 8, 16)


@pytest.fixture(scope="module")
def sampler():
    return Sampler(random_model(TINY, seed=5), progress=False)


def digit_like(count: int, seed: int = 0) -> np.ndarray:
    """uint8 [count, 16, 16] images with structure (a bright random rectangle on a dark noisy ground)."""
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 60, size=(count, 16, 16)).astype(np.uint8)
    for img in out:
        r, c = rng.integers(2, 8, size=2)
        img[r:r + 6, c:c + 5] = rng.integers(180, 256)
    return out


# ---- the math against hand-built examples ------------------------------------------------------------

def test_mask_pyramid_min_pools_a_hand_built_mask():
    keep = torch.tensor([[1, 1, 1, 1],
                         [1, 1, 1, 0],
                         [1, 1, 1, 1],
                         [0, 1, 1, 1]], dtype=torch.bool)[None, None]
    coarse, middle, fine = mask_pyramid(keep, 3)
    assert torch.equal(fine, keep)
    # each 2x2 block is kept only if all four are: top-left yes, top-right no (a 0), bottom-left no, bottom-right yes
    assert torch.equal(middle[0, 0], torch.tensor([[True, False], [False, True]]))
    assert torch.equal(coarse[0, 0], torch.tensor([[False]]))
    assert torch.equal(mask_pyramid(torch.ones(1, 1, 4, 4, dtype=torch.bool), 3)[0], torch.ones(1, 1, 1, 1).bool())


def test_latent_mask_is_a_min_pool_over_each_latent_element():
    keep = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    keep[0, 0, 5, 2] = False
    latent = min_pool(keep, 4)
    assert torch.equal(latent[0, 0], torch.tensor([[True, True], [False, True]]))


def test_known_endpoints_of_a_hand_built_example():
    # S = 3: windows (1 -> 2/3), (0.8 -> 1/3), (0.5 -> 0)
    x0 = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4)
    eps = [torch.full((1, 1, side, side), float(s + 1), dtype=torch.float64) for s, side in enumerate((1, 2, 4))]
    (s1, e1), (s2, e2), (s3, e3) = known_endpoints(x0, eps)
    mean = 7.5                                   # x0^(1)
    quads = torch.tensor([[2.5, 4.5], [10.5, 12.5]], dtype=torch.float64)  # x0^(2): 2x2 block means
    torch.testing.assert_close(s1, torch.ones(1, 1, 1, 1, dtype=torch.float64))           # eps_1
    torch.testing.assert_close(e1, torch.full((1, 1, 1, 1), (1 / 3) * mean + (2 / 3) * 1, dtype=torch.float64))
    torch.testing.assert_close(s2, torch.full((1, 1, 2, 2), 0.2 * mean + 0.8 * 2, dtype=torch.float64))
    torch.testing.assert_close(e2[0, 0], (2 / 3) * quads + (1 / 3) * 2)
    up = quads.repeat_interleave(2, 0).repeat_interleave(2, 1)
    torch.testing.assert_close(s3[0, 0], 0.5 * up + 0.5 * 3)
    assert torch.equal(e3, x0)  # the last stage ends at the data itself, exactly


@pytest.mark.parametrize("region, kept_pixel, free_pixel", [
    ("left", (0, 12), (0, 3)), ("right", (0, 3), (0, 12)), ("top", (12, 0), (3, 0)), ("bottom", (3, 0), (12, 0)),
    ("center", (0, 0), (8, 8)), ("border", (8, 8), (0, 0))])
def test_inpaint_regions_name_what_is_regenerated_and_outpaint_regions_what_is_kept(region, kept_pixel, free_pixel):
    inpaint, outpaint = region_mask(region, 16, "inpaint"), region_mask(region, 16, "outpaint")
    assert inpaint[kept_pixel] and not inpaint[free_pixel]
    assert torch.equal(outpaint, ~inpaint)
    assert inpaint.sum() in (128, 192, 64)  # halves, or the centre square of half the side (a quarter)


def test_outpaint_regions_are_exactly_the_halves_and_the_centred_square():
    """Hand-built at 8 px: a region shifted by one pixel has the same size but is not centred (and off the
    VAE grid of a latent model)."""
    size = 8
    expected = {name: torch.zeros(size, size, dtype=torch.bool) for name in ("left", "right", "top", "bottom",
                                                                             "center")}
    expected["left"][:, :4] = expected["right"][:, 4:] = expected["top"][:4] = expected["bottom"][4:] = True
    expected["center"][2:6, 2:6] = True
    expected["border"] = ~expected["center"]
    for region, keep in expected.items():
        assert torch.equal(region_mask(region, size, "outpaint"), keep), region
        assert torch.equal(region_mask(region.upper(), size, "outpaint"), keep), region   # any case, as ecar-edit


def test_mask_thresholds_keep_uint8_from_128_and_floats_from_one_half():
    """The documented thresholds, at the boundary values: uint8 (and PIL mode L) >= 128, float >= 0.5."""
    values = np.array([[0, 127, 128, 255]], dtype=np.uint8).repeat(4, 0)
    expected = torch.tensor([False, False, True, True]).expand(4, 4)
    for mask in (values, Image.fromarray(values), torch.from_numpy(values)):
        assert torch.equal(as_keep_masks(mask, 4, "inpaint")[0, 0], expected)
    floats = np.array([[0.0, 0.4999, 0.5, 1.0]], dtype=np.float32).repeat(4, 0)
    for mask in (floats, torch.from_numpy(floats).double()):
        assert torch.equal(as_keep_masks(mask, 4, "inpaint")[0, 0], expected)


def test_pil_masks_are_read_as_every_user_image_is():
    """A 16-bit mask is scaled to 8 bits (Pillow's own conversion clips every value above 255 to white, so a
    nearly black 200/65535 was kept); an opaque RGBA mask is read by its grey; a float mask holding NaN is
    refused (NaN >= 0.5 is False: it would silently mean "regenerate")."""
    deep = np.array([[0, 200, 257 * 127, 257 * 128]], dtype=np.uint16).repeat(4, 0)
    expected = torch.tensor([False, False, False, True]).expand(4, 4)
    assert torch.equal(as_keep_masks(Image.frombytes("I;16", (4, 4), deep.astype("<u2").tobytes()), 4,
                                     "inpaint")[0, 0], expected)
    opaque = np.full((4, 4, 4), 255, np.uint8)    # white, opaque, with a black right half
    opaque[:, 2:, :3] = 0
    assert torch.equal(as_keep_masks(Image.fromarray(opaque, "RGBA"), 4, "inpaint")[0, 0],
                       torch.tensor([True, True, False, False]).expand(4, 4))
    floats = np.ones((4, 4), np.float32)
    floats[1, 2] = np.nan
    with pytest.raises(EditInputError, match="NaN"):
        as_keep_masks(floats, 4, "inpaint")


def transparent_masks():
    """Masks with some transparent pixels, in each of the ways an image carries transparency."""
    painted = np.zeros((4, 4, 4), np.uint8)       # transparent everywhere but black, opaque, right half
    painted[:, 2:, 3] = 255
    keyed_grey = Image.fromarray(np.full((4, 4), 255, np.uint8))
    keyed_grey.info["transparency"] = 255         # a PNG tRNS colour key: white is transparent
    palette = Image.fromarray(painted, "RGBA").convert("P")
    palette.info["transparency"] = palette.getpixel((0, 0))
    half_seen = np.full((4, 4, 4), 255, np.uint8)  # white, half transparent on the left: still not opaque
    half_seen[:, :2, 3] = 128
    return {"RGBA": Image.fromarray(painted, "RGBA"), "LA": Image.fromarray(painted[..., [0, 3]], "LA"),
            "L with a colour key": keyed_grey, "P with a colour key": palette,
            "PA": Image.fromarray(painted, "RGBA").convert("PA"),
            "RGBA half transparent": Image.fromarray(half_seen, "RGBA")}


@pytest.mark.parametrize("kind", list(transparent_masks()))
def test_a_mask_with_transparent_pixels_is_refused(kind):
    """Read by its grey, a transparent area would be white, kept, where tools that mark the area to edit by
    transparency (OpenAI's image edits) mean "regenerate": refused, rather than silently inverted."""
    with pytest.raises(EditInputError, match="the mask image has transparent pixels"):
        as_keep_masks(transparent_masks()[kind], 4, "inpaint")
    with pytest.raises(EditInputError, match="the mask image has transparent pixels"):
        fitted_mask(transparent_masks()[kind], 2)   # ecar-edit --fit's mask, before it is resized


def test_a_32_bit_image_of_unknown_scale_is_an_edit_input_error():
    """A mode-F image of values up to 1000 has no known scale (ecar_infer/pil_input.py): refused as every
    unusable input is, as an image, a mask or a --fit image alike (it was a plain ValueError: a traceback from
    ecar-edit)."""
    deep = Image.fromarray(np.full((16, 16), 1000.0, np.float32), "F")
    for read in (lambda: as_images(deep, TINY), lambda: as_keep_masks(deep, 16, "inpaint"),
                 lambda: fitted_image(deep, TINY), lambda: fitted_mask(deep, 16)):
        with pytest.raises(EditInputError, match=r"cannot read the image: a 32-bit image \(mode F\) with values from "
                                                 r"1000 to 1000: its scale cannot be known"):
            read()


def test_channels_last_masks_with_one_channel_are_read_and_others_refused():
    keep = np.zeros((2, 4, 4), bool)
    keep[0, :, :2], keep[1, 1:, :] = True, True
    want = as_keep_masks(keep, 4, "inpaint")
    assert want.shape == (2, 1, 4, 4) and want.any()
    assert torch.equal(as_keep_masks(keep[..., None], 4, "inpaint"), want)         # [N, H, W, 1]
    assert torch.equal(as_keep_masks(keep[0, ..., None], 4, "inpaint"), want[:1])  # [H, W, 1]
    grey = (keep * 255).astype(np.uint8)
    assert torch.equal(as_keep_masks(grey[..., None], 4, "inpaint"), want)
    with pytest.raises(EditInputError, match=r"a mask has one channel, got shape \(4, 4, 3\).*mask\[\.\.\., 0\]"):
        as_keep_masks(np.repeat(grey[0, ..., None], 3, -1), 4, "inpaint")


def test_a_channels_last_tensor_gets_a_hint():
    colour = TINY.replace(latent_channels=3)
    with pytest.raises(EditInputError, match=r"channels first.*shape is \(2, 16, 16, 3\).*permute\(0, 3, 1, 2\)"):
        as_images(torch.zeros(2, 16, 16, 3), colour)
    with pytest.raises(EditInputError, match=r"shape is \(16, 16, 3\).*permute\(2, 0, 1\)"):
        as_images(torch.zeros(16, 16, 3), colour)
    # a grayscale model's channels-last tensor, one channel last, gets the hint too
    with pytest.raises(EditInputError, match=r"channels first.*shape is \(2, 16, 16, 1\).*permute\(0, 3, 1, 2\)"):
        as_images(torch.zeros(2, 16, 16, 1), TINY)


def test_a_fitted_image_keeps_its_colour_and_is_read_as_training_reads_it(tmp_path):
    """ecar-edit --fit brings an image to a colour model's size as training's data.load_image does, in colour
    (read in the model's channels, not in grey), so a fine-tuned model edits what it was trained on."""
    from ecar_infer.training.data import load_image

    rgb = np.random.default_rng(6).integers(0, 256, size=(20, 24, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "wide.png")
    fitted = fitted_image(Image.open(tmp_path / "wide.png"), TINY.replace(latent_channels=3))
    assert fitted.mode == "RGB" and fitted.size == (16, 16)
    assert np.array_equal(np.asarray(fitted), load_image(tmp_path / "wide.png", 16, 3))


def test_pil_images_are_converted_to_the_models_channels():
    """PIL images become what the model makes: L for grayscale, RGB (from RGBA or L) for 3 channels."""
    rgb = np.random.default_rng(3).integers(0, 256, size=(16, 16, 3)).astype(np.uint8)
    colour = TINY.replace(latent_channels=3)
    want = as_images(rgb, colour)
    assert want.shape == (1, 3, 16, 16)
    assert torch.equal(as_images(Image.fromarray(rgb), colour), want)
    assert torch.equal(as_images(Image.fromarray(rgb).convert("RGBA"), colour), want)
    grey = digit_like(1)[0]
    assert torch.equal(as_images(Image.fromarray(grey), colour), as_images(np.repeat(grey[..., None], 3, -1), colour))
    assert torch.equal(as_images(Image.fromarray(rgb), TINY), as_images(np.asarray(Image.fromarray(rgb).convert("L")),
                                                                        TINY))


def test_transparent_and_16_bit_pil_images_are_read_as_training_reads_them():
    """Transparency is composited on white (as the emoji data set is: a transparent emoji read as black would
    keep a black background beside generated white), 16-bit grayscale is scaled to 8 bits, not clipped."""
    colour = TINY.replace(latent_channels=3)
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:8, :, :] = (200, 10, 20, 255)   # top half opaque red
    rgba[8:, :, :] = (0, 0, 0, 0)         # bottom half transparent (black underneath)
    rgba[8:, :8, :] = (0, 0, 255, 128)    # bottom-left half-transparent blue
    got = as_images(Image.fromarray(rgba, "RGBA"), colour)[0]
    want = np.zeros((16, 16, 3), dtype=np.uint8)
    want[:8] = (200, 10, 20)
    want[8:] = 255
    want[8:, :8] = (127, 127, 255)         # blue at alpha 128 over white, as Image.alpha_composite rounds it
    assert torch.equal(got, as_images(want, colour)[0])
    grey_alpha = Image.fromarray(rgba[..., [0, 3]], "LA")  # L 200 opaque on top, transparent below
    assert torch.equal(as_images(grey_alpha, TINY)[0, 0, 8:, 8:], torch.ones(8, 8))
    deep = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)  # 0..65535 in 16 bits
    grey16 = Image.fromarray(deep)
    assert grey16.mode == "I;16"
    assert torch.equal(as_images(grey16, TINY), as_images(np.arange(256, dtype=np.uint8).reshape(16, 16), TINY))


def test_a_channels_first_array_gets_a_hint():
    colour = TINY.replace(latent_channels=3)
    with pytest.raises(EditInputError, match=r"the images have 1 channel but the model makes 3-channel images \(a "
                                             r"uint8 array of shape \(3, 16, 16\) is read as 3 grayscale image\(s\) "
                                             r"\[N, H, W\]: give arrays channels last, \[H, W, C\] or \[N, H, W, C\]\)$"):
        as_images(np.zeros((3, 16, 16), dtype=np.uint8), colour)
    with pytest.raises(EditInputError, match=r"shape \(1, 16, 16\) is read as 1 grayscale image\(s\)"):
        as_images(np.zeros((1, 16, 16), dtype=np.uint8), colour)  # one channels-first grayscale plane
    for batch in ((2, 16, 16), (3, 16, 16, 1), (1, 16, 16, 1)):  # grayscale batches, channels last: no hint
        with pytest.raises(EditInputError, match="the images have 1 channel but the model makes 3-channel images$"):
            as_images(np.zeros(batch, dtype=np.uint8), colour)


def test_editing_noise_comes_after_the_sampling_noise():
    plan = random_model(TINY).plan
    plain, edit = draw_noise([4, 9], plan), draw_noise([4, 9], plan, edit=True)
    assert plain.edit is None and torch.equal(plain.start, edit.start)
    assert all(torch.equal(a, b) for a, b in zip(plain.jumps, edit.jumps))
    gen = torch.Generator().manual_seed(9)
    for side in plan.latent_sides:  # the seed's sampling noise: the start (side 4), then the jumps (8, 16)
        torch.randn(1, side, side, generator=gen)
    for side, eps in zip(plan.latent_sides, edit.edit):
        assert torch.equal(eps[1], torch.randn(1, side, side, generator=gen))


def test_request_select_takes_the_chunks_rows_of_every_field():
    """A batch of a chunked edit gets its own images' latents, masks, pixels and pixel masks (the last two
    are the final paste's: a wrong row pastes another image's mask)."""
    gen = torch.Generator().manual_seed(0)
    request = EditRequest(torch.randn(4, 2, 4, 4, generator=gen), torch.rand(4, 1, 4, 4, generator=gen) < 0.5, 1,
                          torch.randn(4, 3, 8, 8, generator=gen), torch.rand(4, 1, 8, 8, generator=gen) < 0.5)
    part = request.select(range(2, 4))
    rows = torch.tensor([2, 3])
    assert part.from_stage == 1
    for name in ("latents", "keep", "pixels", "pixel_keep"):
        assert torch.equal(getattr(part, name), getattr(request, name)[rows]), name


def test_latent_requests_keep_an_element_only_if_all_its_pixels_are_kept():
    """build_request at a latent model's resolution (vae_downsample 2): the latent mask min-pools the pixel
    mask, and a mask that keeps pixels but no whole latent element keeps nothing, which is an error."""
    config = ECARConfig.preset("ecar-tiny-vae")
    size, down = config.image_size, config.vae_downsample
    assert down == 2
    pixels = torch.zeros(1, 3, size, size)
    encode = lambda x: torch.nn.functional.avg_pool2d(x, down)  # noqa: E731  (any latent of the right size)
    keep = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(1)) < 0.8
    request = build_request(pixels, 2, keep, "inpaint", None, config, encode)
    assert torch.equal(request.keep, min_pool(keep, down)) and torch.equal(request.pixel_keep, keep)
    assert request.keep.any() and not torch.equal(request.keep, keep[..., ::down, ::down])
    checker = torch.zeros(size, size, dtype=torch.bool)
    checker[::down, ::down] = True  # a quarter of the pixels, but not one whole 2x2 element
    with pytest.raises(EditInputError, match=r"keeps nothing of image\(s\) \[0\] \(a latent element is kept only "
                                             r"if all its 2x2 pixels are\)"):
        build_request(pixels, 1, checker, "inpaint", None, config, encode)


# ---- the clamp, inside the loop ----------------------------------------------------------------------

def expected_endpoints(image: np.ndarray, seed: int, plan) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """X_start, X_end of every stage for one image, the editing noise drawn here from the seed directly."""
    gen = torch.Generator().manual_seed(seed)
    for side in plan.latent_sides:  # the sampling noise: the start, then one jump per later stage
        torch.randn(1, side, side, generator=gen)
    eps = [torch.randn(1, 1, side, side, generator=gen) for side in plan.latent_sides]
    x0 = torch.from_numpy(image.astype(np.float32))[None, None] / 127.5 - 1
    return known_endpoints(x0, eps)


def test_clamped_tokens_equal_their_known_values_at_every_step(sampler, monkeypatch):
    plan, p = sampler.model.plan, TINY.patch_size
    images = digit_like(2, seed=1)
    keep = np.zeros((2, 16, 16), dtype=bool)
    keep[0, :, 9:] = True           # image 0 keeps its right part (not stage-aligned)
    keep[1, 3:13, 2:15] = True      # image 1 keeps an off-centre box
    seeds = [21, 22]
    states = []
    original = StageEngine.euler_step_

    def spy(self, s, k, x, *args):
        states.append((s, k, "before", x.clone()))
        original(self, s, k, x, *args)
        states.append((s, k, "after", x.clone()))

    monkeypatch.setattr(StageEngine, "euler_step_", spy)
    steps = 3
    sampler.edit(images, [3, 8], mask=keep, seed=seeds, cfg_scale=2.0, cfg_schedule="linear",
                 steps_per_stage=steps, output_type="latent")
    pyramids = [mask_pyramid(torch.from_numpy(keep[i])[None, None], 3) for i in range(2)]
    ends = [expected_endpoints(images[i], seeds[i], plan) for i in range(2)]
    checked = 0
    for s, k, when, x in states:
        r = 1 - (k + (when == "after")) / steps
        for i in range(2):
            x_start, x_end = ends[i][s]
            known = patchify(r * x_start + (1 - r) * x_end, p)[0]
            kept = patchify(pyramids[i][s].float(), p)[0].bool()
            assert kept.any()
            torch.testing.assert_close(x[i][kept], known[kept], rtol=1e-6, atol=1e-6)
            assert not torch.allclose(x[i][~kept], known[~kept], atol=1e-3)  # the free part is not clamped
            checked += 1
    assert checked == 2 * 2 * 3 * steps  # both images, before and after, every step of every stage


def test_kept_pixels_are_exact_for_a_pixel_model(sampler, monkeypatch):
    # a pixel model's decoder is the identity: the clamp alone makes the kept pixels exact, with no paste
    monkeypatch.setattr(EditRequest, "paste", lambda self, images: pytest.fail("a pixel model pastes nothing"))
    images = digit_like(3, seed=2)
    keep = np.random.default_rng(0).random((3, 16, 16)) < 0.6
    out = sampler.edit(images, [1, 2, 3], mask=keep, seed=0, cfg_scale=3.0, steps_per_stage=2, output_type="np")
    got = out.images[..., 0]
    assert np.array_equal(got[keep], images[keep])
    assert (got[~keep] != images[~keep]).mean() > 0.5


def test_vary_from_stage_zero_equals_generate_with_the_same_seeds(sampler):
    kwargs = dict(seed=[7, 30], cfg_scale=2.5, steps_per_stage=2, output_type="latent")
    plain = sampler.generate([4, 6], **kwargs).images
    varied = sampler.edit(digit_like(2), [4, 6], mode="vary", from_stage=0, **kwargs).images
    assert torch.equal(varied, plain)


def test_the_attention_shortcut_head_edits_as_exactly():
    """The default model's head kind (attention, shortcut objective): kept pixels exact, vary from stage 0
    is plain sampling, also with 1, 2 and 4 shortcut steps in its stages."""
    config = TINY.replace(head_kind="attention", head_num_heads=2, head_objective="shortcut", shortcut_max_level=2)
    sc = Sampler(random_model(config, seed=6), progress=False)
    images = digit_like(2, seed=4)
    keep = np.random.default_rng(1).random((2, 16, 16)) < 0.5
    out = sc.edit(images, [2, 5], mask=keep, seed=3, cfg_scale=2.0, steps_per_stage=[1, 2, 4], output_type="np")
    assert np.array_equal(out.images[..., 0][keep], images[keep])
    assert (out.images[..., 0][~keep] != images[~keep]).mean() > 0.5
    kwargs = dict(seed=[7, 30], cfg_scale=2.5, steps_per_stage=2, output_type="latent")
    assert torch.equal(sc.edit(images, [4, 6], mode="vary", from_stage=0, **kwargs).images,
                       sc.generate([4, 6], **kwargs).images)


def test_vary_keeps_the_stages_below_from_stage_without_running_their_flow(sampler, monkeypatch):
    plan = sampler.model.plan
    image = digit_like(1, seed=3)[0]
    ends, head_rows = [], []
    original_known, original_velocity = StageEngine.known_stage, sampler.model.head.velocity

    def known_spy(self, s):
        original_known(self, s)
        ends.append((s, self.x[s].clone()))

    def velocity_spy(x, c, stage):
        head_rows.append(x.shape[0] * x.shape[1])   # images x tokens of the stage
        return original_velocity(x, c, stage)

    monkeypatch.setattr(StageEngine, "known_stage", known_spy)
    monkeypatch.setattr(sampler.model.head, "velocity", velocity_spy)
    out = sampler.edit(image, [5, 5], mode="vary", from_stage=2, seed=40, steps_per_stage=2, output_type="latent")
    assert [s for s, _ in ends] == [0, 1]
    assert head_rows == [2 * plan.tokens[2]] * 2  # only the last stage's flow loop runs (unguided)
    for i, seed in enumerate(out.seeds):
        expected = expected_endpoints(image, seed, plan)
        for s, x in ends:
            torch.testing.assert_close(x[i], patchify(expected[s][1], TINY.patch_size)[0], rtol=0, atol=1e-6)
    # two seeds give two variations that share the coarse content
    assert (out.images[0] - out.images[1]).abs().max() > 1e-2


def test_vary_by_default_regenerates_only_the_last_stage(sampler):
    """The default keeps the layout (docs/BENCHMARKS.md: from stage 1 keeps little of a 3-stage model)."""
    def vary(**kwargs):
        return sampler.edit(digit_like(1)[0], [2, 2], mode="vary", seed=[3, 9], steps_per_stage=2,
                            output_type="latent", **kwargs).images

    assert TINY.num_stages == 3
    assert torch.equal(vary(), vary(from_stage=2)) and not torch.equal(vary(), vary(from_stage=1))


def test_vary_without_from_stage_on_a_one_stage_model_is_refused():
    """Its default, the last stage, is stage 0 there: the image was ignored and a plain sample came back."""
    one_stage = Sampler(random_model(TINY.replace(num_stages=1), seed=5), progress=False)
    with pytest.raises(EditInputError, match="mode 'vary' keeps the coarse stages of the image, and this model has "
                                             "one stage: there is nothing to keep"):
        one_stage.edit(digit_like(1)[0], [2], mode="vary", seed=3, steps_per_stage=2)
    kept = one_stage.edit(digit_like(1)[0], [2], mode="vary", from_stage=0, seed=3, steps_per_stage=2,
                          output_type="latent")   # asked for by name, it is plain sampling, as on any model
    assert torch.equal(kept.images, one_stage.generate([2], seed=3, steps_per_stage=2, output_type="latent").images)


def test_only_varys_default_on_a_one_stage_model_is_refused():
    """The refusal is of vary's default on one stage alone: a one-stage model still inpaints by default (the
    refusal's own advice), and a two-stage model varies its last stage by default, keeping the first."""
    one_stage = Sampler(random_model(TINY.replace(num_stages=1), seed=5), progress=False)
    out = one_stage.edit(digit_like(1)[0], [2], mask="center", seed=3, steps_per_stage=2, output_type="latent")
    assert out.images.shape == (1, 1, 16, 16)
    two_stages = Sampler(random_model(TINY.replace(num_stages=2), seed=5), progress=False)

    def vary(**kwargs):
        return two_stages.edit(digit_like(1)[0], [2], mode="vary", seed=3, steps_per_stage=2, output_type="latent",
                               **kwargs).images

    assert torch.equal(vary(), vary(from_stage=1))


def test_edits_regenerate_alone_and_do_not_depend_on_batching(sampler):
    images = digit_like(5, seed=4)
    kwargs = dict(mask="center", mode="outpaint", seed=50, steps_per_stage=2, cfg_scale=2.0, output_type="latent")
    whole = sampler.edit(images, [0, 1, 2, 3, 4], **kwargs)
    chunked = sampler.edit(images, [0, 1, 2, 3, 4], batch_size=2, **kwargs)
    alone = sampler.edit(images[3], [3], **{**kwargs, "seed": whole.seeds[3]})
    torch.testing.assert_close(chunked.images, whole.images, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone.images[0], whole.images[3], rtol=1e-4, atol=1e-5)


def test_a_tensor_wholly_in_0_1_is_warned_about(sampler, caplog):
    """generate's output_type="pt" gives [0, 1] while edit reads tensors in [-1, 1]: handing one to the other
    is warned about (black would read as mid-grey); the same images in [-1, 1] are not, nor is uint8 input."""
    made = sampler.generate([1, 2], seed=7, steps_per_stage=1, output_type="pt").images
    assert made.min() >= 0
    for images, warned in [(made, True), (made * 2 - 1, False), (sampler.generate([1], seed=7, steps_per_stage=1,
                                                                                    output_type="np").images, False),
                           (torch.zeros(1, 1, 16, 16), False)]:   # mid-grey, valid in [-1, 1]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ecar_infer"):
            sampler.edit(images, [1] * len(images), mode="vary", from_stage=1, steps_per_stage=1, output_type="latent")
        assert ("pass images * 2 - 1" in caplog.text) == warned, caplog.text


def test_an_image_kept_wholly_beside_an_edited_one_leaves_the_other_edited_as_alone(sampler, caplog):
    """A stage is "known" (no flow loop, its end is X_end) only when every image of the batch keeps all of it:
    an image kept wholly comes back as its input, and the other image of its batch is edited as it is alone,
    its free half regenerated rather than copied from its input."""
    images = digit_like(2, seed=11)
    keep = np.zeros((2, 16, 16), dtype=bool)
    keep[0] = True              # image 0: every pixel kept
    keep[1, :, 8:] = True       # image 1: the right half kept, the left half regenerated
    kwargs = dict(cfg_scale=2.0, steps_per_stage=2, output_type="latent")
    with caplog.at_level(logging.WARNING, logger="ecar_infer"):
        both = sampler.edit(images, [1, 2], mask=keep, seed=[3, 4], **kwargs).images
    assert "keeps every pixel of image(s) [0]" in caplog.text
    x = torch.from_numpy(images.astype(np.float32))[:, None] / 127.5 - 1  # a pixel model's latent is its image
    assert torch.equal(both[0], x[0])
    alone = sampler.edit(images[1], [2], mask=keep[1], seed=4, **kwargs).images
    torch.testing.assert_close(both[1], alone[0], rtol=1e-4, atol=1e-5)
    assert torch.equal(both[1][..., 8:], x[1][..., 8:])
    assert (both[1][..., :8] - x[1][..., :8]).abs().mean() > 0.1


def test_one_image_is_edited_once_per_label_with_its_own_seed(sampler):
    out = sampler.edit(digit_like(1)[0], [2, 2, 7], mask="left", seed=3, steps_per_stage=2, output_type="pil")
    assert out.seeds == [3, 4, 5] and out.class_labels == [2, 2, 7] and len(out.images) == 3
    a, b = (np.asarray(im) for im in out.images[:2])
    assert not np.array_equal(a, b)


def test_pil_images_and_masks_are_accepted(sampler):
    image = digit_like(1, seed=6)[0]
    keep = region_mask("top", 16, "outpaint").numpy()  # keep the top half
    mask = Image.fromarray(np.where(keep, 255, 0).astype(np.uint8))
    out = sampler.edit(Image.fromarray(image), 4, mask=mask, seed=0, steps_per_stage=2, output_type="np")
    assert np.array_equal(out.images[0, :8, :, 0], image[:8])
    torch.testing.assert_close(as_keep_masks(mask, 16, "inpaint")[0, 0], torch.from_numpy(keep))


@pytest.fixture(scope="module")
def vae_sampler():
    """ecar-tiny-vae (32 px RGB, 2x VAE, latent 16x16x4) with a random SD-VAE-architecture decoder."""
    pytest.importorskip("diffusers")
    return Sampler.from_config(ECARConfig.preset("ecar-tiny-vae"), device="cpu", seed=0, progress=False)


def test_a_latent_samplers_repr_names_its_latent_kind(vae_sampler):
    assert repr(vae_sampler).startswith("Sampler(32x32 sd-vae latent model, ")


def rgb_images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, 32, 32, 3)).astype(np.uint8)


def test_latent_model_encodes_and_keeps_the_known_latent_exactly(vae_sampler):
    sampler = vae_sampler
    images = rgb_images(2)
    keep = np.ones((32, 32), dtype=bool)
    keep[:, :16] = False
    keep[5, 20] = False  # one pixel: its whole 2x2 latent element becomes free
    out = sampler.edit(images, [1, 2], mask=keep, seed=0, steps_per_stage=2, output_type="latent").images
    latent_keep = min_pool(torch.from_numpy(keep)[None, None], 2)[0, 0]
    assert not latent_keep[2, 10] and latent_keep[3, 10]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    z = sampler.decoder.encode(x)
    assert torch.equal(out[:, :, latent_keep], z[:, :, latent_keep])
    assert (out[:, :, ~latent_keep] != z[:, :, ~latent_keep]).all()  # the partly kept element is regenerated too
    pixels = sampler.edit(images, [1, 2], mask=keep, seed=0, steps_per_stage=2, output_type="np").images
    assert pixels.shape == (2, 32, 32, 3)
    # the paste follows the pixel mask, not the latent one: the 3 kept pixels of the freed element are exact too
    assert keep[4:6, 20:22].sum() == 3
    assert np.array_equal(pixels[:, keep], images[:, keep])
    assert (pixels[:, ~keep] != images[:, ~keep]).mean() > 0.5


@pytest.mark.parametrize("mode, region", [("inpaint", "left"), ("outpaint", "center")])
def test_latent_model_pastes_the_kept_pixels_back_exactly(vae_sampler, mode, region):
    """The VAE decoder mixes regenerated latents into kept pixels; the final paste puts the input back there,
    exactly, in each image output type, and leaves every other pixel as decoded."""
    images = rgb_images(2, seed=1)
    keep = region_mask(region, 32, mode)
    kwargs = dict(mask=region, mode=mode, seed=3, steps_per_stage=2)
    latent = vae_sampler.edit(images, [1, 2], output_type="latent", **kwargs).images
    floats = vae_sampler.edit(images, [1, 2], output_type="pt", **kwargs).images
    uint8 = vae_sampler.edit(images, [1, 2], output_type="np", **kwargs).images
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    decoded = ((vae_sampler.decoder.decode(latent) + 1) / 2).clamp(0, 1)
    kept = keep.expand_as(x)
    assert not torch.equal(decoded[kept], ((x + 1) / 2)[kept])  # the decoder alone does not keep them
    assert torch.equal(floats[kept], ((x + 1) / 2)[kept])
    assert torch.equal(floats[~kept], decoded[~kept])
    assert np.array_equal(uint8[:, keep.numpy()], images[:, keep.numpy()])
    assert (uint8[:, ~keep.numpy()] != images[:, ~keep.numpy()]).mean() > 0.5


def test_latent_model_encodes_batch_size_images_at_a_time_and_times_the_encode(vae_sampler, monkeypatch):
    """An edit request's VAE encode goes batch_size images at a time, as its sampling and decoding do (500
    images at 256 px in one encode can run a GPU out of memory whatever batch_size says), to the same
    latents (the encoder does not mix images); the request's total_s counts the encode."""
    images = rgb_images(5, seed=4)
    encode, shapes = vae_sampler.decoder.encode, []

    def slow_encode(x):
        shapes.append(len(x))
        time.sleep(0.1)
        return encode(x)

    whole = vae_sampler.edit(images, [1, 2, 3, 4, 5], mask="left", seed=1, steps_per_stage=1, output_type="latent")
    monkeypatch.setattr(vae_sampler.decoder, "encode", slow_encode)
    out = vae_sampler.edit(images, [1, 2, 3, 4, 5], mask="left", seed=1, steps_per_stage=1, output_type="latent",
                           batch_size=2)
    assert shapes == [2, 2, 1]
    torch.testing.assert_close(out.images, whole.images, rtol=1e-5, atol=1e-5)
    assert out.timings["total_s"] >= 0.3


def test_latent_model_requests_without_a_mask_paste_nothing(vae_sampler):
    """vary keeps no pixel: from stage 0 it is plain sampling, from stage 1 its images are its latents decoded."""
    kwargs = dict(seed=[4, 11], steps_per_stage=2, output_type="pt")
    images = rgb_images(1, seed=2)
    plain = vae_sampler.generate([0, 5], **kwargs).images
    assert torch.equal(vae_sampler.edit(images, [0, 5], mode="vary", from_stage=0, **kwargs).images, plain)
    varied = vae_sampler.edit(images, [0, 5], mode="vary", from_stage=1, **kwargs).images
    latent = vae_sampler.edit(images, [0, 5], mode="vary", from_stage=1, **{**kwargs, "output_type": "latent"}).images
    assert torch.equal(varied, ((vae_sampler.decoder.decode(latent) + 1) / 2).clamp(0, 1))


# ---- errors --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(mask=np.ones((8, 8), dtype=bool)), "mask is 8x8 pixels but the images are 16x16"),
    (dict(mask=np.zeros((16, 16), dtype=bool)), "keeps nothing of image"),
    (dict(mask=np.ones((16, 16), dtype=np.uint8)), "uint8 masks keep values >= 128"),
    (dict(mask=np.ones((16, 16), dtype=np.uint8), from_stage=1), "a uint8 mask holding only 0 and 1 keeps nothing"),
    (dict(mask=np.full((16, 16), 200.0, dtype=np.float32)), "a float mask holds 0..1 .*got values up to 200"),
    (dict(mask=np.full((16, 16), -1.0, dtype=np.float32)), r"a float mask holds 0..1 .*got values down to -1: "
                                                             r"map a \[-1, 1\] mask"),
    (dict(images=torch.zeros(0, 1, 16, 16)), r"images is empty \(shape \(0, 1, 16, 16\)\)"),
    (dict(images=np.zeros((16, 16, 4), dtype=np.uint8)), "the images are 4x16 pixels .*alpha channel are not read"),
    (dict(class_labels=[10]), r"class label\(s\) \[10\] outside this model's range 0..9"),
    (dict(mode="repaint"), "mode must be one of"),
    (dict(mask=None), "mode 'inpaint' needs a mask"),
    (dict(mode="vary"), "mode 'vary' takes no mask"),
    (dict(mask="middle"), "unknown mask region 'middle'"),
    (dict(from_stage=3), r"from_stage must be an integer in 0..2"),
    (dict(from_stage=True), r"from_stage must be an integer in 0..2 .*got True"),
    (dict(images=np.zeros((2, 16, 16), dtype=np.uint8), class_labels=[1, 2, 3]), "2 images and 3 class labels"),
    (dict(images=np.zeros((20, 20), dtype=np.uint8)), "images are 20x20 pixels but the model makes 16x16"),
    (dict(images=np.zeros((16, 16, 3), dtype=np.uint8)), "3 channels but the model makes grayscale"),
    (dict(images=torch.full((1, 16, 16), 3.0)), r"pixel range \[-1, 1\]"),
    (dict(images=torch.full((1, 16, 16), float("nan"))), r"pixel range \[-1, 1\], got NaN values"),
    (dict(images=np.zeros((16, 16), dtype=np.float32)), "image arrays must be uint8"),
    (dict(mask=[np.ones((16, 16), dtype=bool)] * 3), "3 masks for 1 images"),
    (dict(output_type="jpeg"), "output_type"),
])
def test_bad_edit_arguments_raise_clear_errors(sampler, kwargs, match):
    args = dict(images=digit_like(1)[0], class_labels=[1], mask="left")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sampler.edit(**args, steps_per_stage=1)


def test_a_mask_that_keeps_everything_returns_the_input_with_a_warning(sampler, caplog, monkeypatch):
    image = digit_like(1, seed=7)[0]
    monkeypatch.setattr(StageEngine, "units", lambda self: pytest.fail("nothing should be sampled"))
    with caplog.at_level(logging.WARNING, logger="ecar_infer"):
        out = sampler.edit(image, [3, 4], mask=np.ones((16, 16), dtype=bool), seed=0, output_type="np")
    assert "keeps every pixel" in caplog.text
    assert np.array_equal(out.images[..., 0], np.stack([image, image]))
    assert set(out.timings) == {"total_s", "images_per_s"} and out.timings["images_per_s"] > 0   # as generate's
    for bad, match in [(dict(batch_size=0), "batch_size must be a positive integer"),
                       (dict(progress="no"), "progress must be True, False or None"),
                       (dict(progress=1), "progress must be True, False or None")]:   # checked all the same
        with pytest.raises(ValueError, match=match):
            sampler.edit(image, [3, 4], mask=np.ones((16, 16), dtype=bool), **bad)


# ---- the engine's buffers and the fused kernel -------------------------------------------------------

def test_edit_engines_have_their_own_buffers_and_graph_keys(sampler):
    steps = sampler.plan(2.0, 2)
    plain = sampler._engine(2, steps)
    edit = sampler._engine(2, steps, ("clamp", "clamp", "clamp"))
    vary = sampler._engine(2, steps, ("known", "free", "free"))
    assert plain.edit is None and sampler._engine(2, steps, ("free",) * 3) is plain
    assert len({plain.key, edit.key, vary.key}) == 3
    assert [b is None for b in vary.edit.keep] == [True, True, True]
    assert [b is None for b in vary.edit.end] == [False, True, True]
    assert [b.dtype for b in edit.edit.keep] == [torch.bool] * 3
    request = EditRequest(torch.zeros(2, 1, 16, 16), torch.ones(2, 1, 16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="stage modes differ"):
        edit.edit.load(request, draw_noise([0, 1], sampler.model.plan, edit=True).edit)


@pytest.mark.parametrize("guided", [False, True])
def test_reference_clamped_step_is_the_euler_step_then_the_clamp(guided):
    gen = torch.Generator().manual_seed(1)
    x, vc, vu = (torch.randn(2, 3, 5, generator=gen) for _ in range(3))
    w = torch.tensor([1.5, 3.0])
    keep = torch.rand(2, 3, 5, generator=gen) < 0.5
    start, end = torch.randn(2, 3, 5, generator=gen), torch.randn(2, 3, 5, generator=gen)
    stepped = (reference.guided_euler_step_(x.clone(), vc, vu, w, -0.25) if guided
               else reference.euler_step_(x.clone(), vc, -0.25))
    got = reference.clamped_euler_step_(x.clone(), vc, vu if guided else None, w if guided else None, -0.25,
                                        keep, start, end, 0.25)
    assert torch.equal(got[~keep], stepped[~keep])
    assert torch.equal(got[keep], (0.25 * start + 0.75 * end)[keep])
    # the ends of the path are exact: r = 1 gives X_start, r = 0 gives X_end
    for r, value in ((1.0, start), (0.0, end)):
        got = reference.clamped_euler_step_(x.clone(), vc, None, None, -0.25, keep, start, end, r)
        assert torch.equal(got[keep], value[keep])


# Without CUDA (tests/conftest.py sets TRITON_INTERPRET) the Triton tests below interpret the kernel; on a GPU they
# compile it, and only `pytest -m gpu` (the GPU suite) runs there: mark them so that the suite checks the
# compiled clamp kernel too (otherwise only the graph test at the end reaches it, with no reference beside it).
compiled = pytest.mark.gpu if not INTERPRETING else (lambda test: test)
# bf16 velocities (the sampler's on CUDA) only where compiled: the interpreter's bf16 arithmetic is garbage
V_DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    INTERPRETING, reason="bf16 runs only compiled"))]


def _triton():
    pytest.importorskip("triton")
    from ecar_infer.kernels import triton_clamp as module
    from ecar_infer.kernels.triton_support import INTERPRETING

    if not INTERPRETING and not torch.cuda.is_available():
        pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1")
    return module, "cpu" if INTERPRETING else "cuda"


@compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("v_dtype", V_DTYPES)
@pytest.mark.parametrize("guided", [False, True])
def test_fused_clamped_euler_kernel_matches_its_reference(request, dtype, v_dtype, guided):
    module, device = _triton()
    gen = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
    rand = lambda *shape, dt=torch.float32: torch.randn(*shape, generator=gen).to(device, dt)  # noqa: E731
    shape = (3, 7, 5)  # 105 elements: one partial block
    x = rand(*shape, dt=dtype)
    v_cond, v_uncond = rand(*shape, dt=v_dtype), rand(*shape, dt=v_dtype)
    w = rand(3).abs() + 1
    keep = (torch.rand(*shape, generator=gen) < 0.4).to(device)
    start, end = rand(*shape), rand(*shape)
    vu, ww = (v_uncond, w) if guided else (None, None)
    oracle = reference.clamped_euler_step_(x.float().clone(), v_cond.float(), None if vu is None else vu.float(), ww,
                                           -0.2, keep, start, end, 0.4)
    same = reference.clamped_euler_step_(x.clone(), v_cond, vu, ww, -0.2, keep, start, end, 0.4)
    ptr = x.data_ptr()
    assert module.clamped_euler_step_(x, v_cond, vu, ww, -0.2, keep, start, end, 0.4) is x and x.data_ptr() == ptr
    assert_matches_reference(x, oracle, same)
    known = (0.4 * start + 0.6 * end)[keep].to(dtype)
    if device == "cpu":  # the interpreter rounds each fp32 operation as torch does: exact
        assert torch.equal(x[keep], known)
    else:  # compiled, r * start + (1 - r) * end may become an FMA: an fp32 rounding apart (one ulp in fp16)
        torch.testing.assert_close(x[keep], known, rtol=1e-6 if dtype == torch.float32 else 2**-10, atol=1e-6)


@compiled
def test_fused_kernel_reads_strided_velocities_and_skips_unkept_endpoints():
    """v[:b] of a doubled batch, and NaN endpoints where nothing is kept (they must never be read)."""
    module, device = _triton()
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(4, 5, 3, generator=gen).to(device)
    x = torch.randn(2, 5, 3, generator=gen).to(device)
    keep = torch.zeros(2, 5, 3, dtype=torch.bool, device=device)
    keep[1, 2:] = True
    start = torch.where(keep, torch.randn(2, 5, 3, generator=gen).to(device), float("nan"))
    end = torch.where(keep, torch.randn(2, 5, 3, generator=gen).to(device), float("nan"))
    w = torch.tensor([2.0, 0.5], device=device)
    expected = reference.clamped_euler_step_(x.clone(), v[:2], v[2:], w, -0.5, keep, start, end, 0.5)
    got = module.clamped_euler_step_(x.clone(), v[:2], v[2:], w, -0.5, keep, start, end, 0.5)
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected)


@compiled
def test_clamped_step_on_a_strided_x_updates_x_in_place_under_a_forced_triton():
    """The kernel writes x through a flat pointer: a strided x must go to a backend that updates it (its
    supports check refuses the call), never to a contiguous copy that is thrown away."""
    _, device = _triton()
    from ecar_infer.kernels import force_backend

    gen = torch.Generator().manual_seed(3)
    base = torch.randn(2, 3, 5, generator=gen).to(device)
    x = base.transpose(1, 2)   # [2, 5, 3], not contiguous
    assert not x.is_contiguous()
    v = torch.randn(2, 5, 3, generator=gen).to(device)
    keep = (torch.rand(2, 5, 3, generator=gen) < 0.5).to(device)
    start, end = torch.randn(2, 5, 3, generator=gen).to(device), torch.randn(2, 5, 3, generator=gen).to(device)
    expected = reference.clamped_euler_step_(x.clone(), v, None, None, -0.5, keep, start, end, 0.5)
    with force_backend("triton"):
        assert ops.clamped_euler_step_(x, v, None, None, -0.5, keep, start, end, 0.5) is x
    torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-6)


@compiled
def test_edit_through_triton_matches_the_reference_backend():
    _, device = _triton()
    from ecar_infer.kernels import chosen_backends, clear_chosen_backends, force_backend

    # tf32=False: on CUDA, TF32 matmuls (the default) would move the reference run's fp32 attention by ~1e-2
    sampler = Sampler(random_model(TINY, seed=8).to(device), progress=False, tf32=False)
    kwargs = dict(images=digit_like(2, seed=9), class_labels=[1, 2], mask="center", seed=0, cfg_scale=2.0,
                  cfg_schedule="linear", steps_per_stage=2, output_type="latent")
    with force_backend("reference"):
        expected = sampler.edit(**kwargs).images
    clear_chosen_backends()   # the record keeps earlier tests' choices: only this run's may count
    with force_backend("triton"):
        got = sampler.edit(**kwargs).images
        assert chosen_backends()["clamped_euler_step_"] == "triton"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ecar_infer.kernels import triton_clamp

fn = triton_clamp._clamped_euler_kernel
for guided in (True, False):
    consts = dict(GUIDED=guided, BLOCK=1024)
    types = {"X": "*fp32", "V_COND": "*bf16", "V_UNCOND": "*bf16", "W": "*fp32", "KEEP": "*i1",
             "KNOWN_START": "*fp32", "KNOWN_END": "*fp32", "dr": "fp32", "r": "fp32"}
    sig = {name: "constexpr" if name in consts else types.get(name, "i32") for name in fn.arg_names}
    triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
print("compiled")
"""


@pytest.mark.slow
def test_fused_kernel_compiles_for_hopper():
    """The interpreter never compiles: build the bf16-velocity variants for sm_90 with Triton's NVIDIA backend."""
    compile_for_sm90(COMPILE_SCRIPT)


@pytest.mark.gpu
def test_edit_under_cuda_graphs_equals_eager_and_keeps_pixels():
    model = random_model(TINY, seed=8).to("cuda")
    graphs, eager = Sampler(model, progress=False), Sampler(model, cuda_graphs=False, progress=False)
    images = digit_like(4, seed=10)  # a full bucket: padding rows could change GEMM rounding
    keep = np.random.default_rng(1).random((4, 16, 16)) < 0.5
    for seed in (0, 9):  # the second request replays the captured graphs on new buffers
        kwargs = dict(mask=keep, seed=seed, cfg_scale=2.0, steps_per_stage=3, output_type="np")
        got = graphs.edit(images, [1, 2, 3, 4], **kwargs).images
        expected = eager.edit(images, [1, 2, 3, 4], **kwargs).images
        assert np.array_equal(got, expected)
        assert np.array_equal(got[..., 0][keep], images[keep])
    assert graphs.runner.num_captures == 3 * TINY.num_stages
