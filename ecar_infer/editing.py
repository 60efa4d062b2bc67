"""Editing without retraining: inpaint, outpaint and vary (docs/MODEL.md, "Editing without retraining").

* Inputs: `as_images` and `as_keep_masks` turn what a user gives (PIL images, uint8 arrays, tensors in
  [-1, 1]; PIL mode-L masks, bool arrays, built-in region names) into tensors, with clear errors.
* The math: the data pyramid (average pooling, as in training), the mask pyramid (min pooling: a coarse
  element is kept only if all it covers is kept), and each stage's known endpoints X_start, X_end.
* `EditRequest`: what one request keeps (the known latents, the keep-mask at latent resolution, from_stage),
  and the input pixels with their pixel keep-mask for a latent model's final paste after decoding.
* `EditBuffers`: an engine's static buffers for an edit, in token layout, and the per-stage clamp. Each
  stage has a mode fixed per request shape: "known" (kept wholly: no flow loop, its end is X_end),
  "clamp" (the Euler step fused with the clamp) or "free" (the plain loop). A request whose stages are
  all free is plain sampling and runs on a plain engine.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .checks import is_integer
from .config import ECARConfig
from .kernels import ops
from .kernels.reference import upsample2x
from .pil_input import as_model_image, resize_center_crop
from .schedule import stage_windows
from .stages import StagePlan, patchify

logger = logging.getLogger("ecar_infer")

MODES = ("inpaint", "outpaint", "vary")
REGIONS = ("left", "right", "top", "bottom", "center", "border")
STAGE_MODES = ("known", "clamp", "free")


# ---- the math ------------------------------------------------------------------------------------
def data_pyramid(x0: torch.Tensor, num_stages: int) -> list[torch.Tensor]:
    """[x0^(1), ..., x0^(S)] coarse to fine: x0^(S) = x0, x0^(s) = avgpool2(x0^(s+1))."""
    levels = [x0]
    for _ in range(num_stages - 1):
        levels.insert(0, F.avg_pool2d(levels[0], 2))
    return levels


def min_pool(keep: torch.Tensor, factor: int) -> torch.Tensor:
    """bool [N, 1, H, W] -> [N, 1, H/factor, W/factor]: an element is kept only if all it covers is kept."""
    if factor == 1:
        return keep
    return ~F.max_pool2d((~keep).float(), factor).bool()


def mask_pyramid(keep: torch.Tensor, num_stages: int) -> list[torch.Tensor]:
    """[m^(1), ..., m^(S)] coarse to fine from the latent keep-mask m^(S) = keep, m^(s) = minpool2(m^(s+1))."""
    levels = [keep]
    for _ in range(num_stages - 1):
        levels.insert(0, min_pool(levels[0], 2))
    return levels


def known_endpoints(x0: torch.Tensor, eps: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(X_start^(s), X_end^(s))] per stage, paired with eps[s] exactly as the training objective pairs them:
    X_end = (1 - e_s) x0^(s) + e_s eps_s; X_start = (1 - start_s) Up(x0^(s-1)) + start_s eps_s (eps_1 at s = 1)."""
    pyramid = data_pyramid(x0, len(eps))
    out = []
    for s, ((start, end), x0_s, eps_s) in enumerate(zip(stage_windows(len(eps)), pyramid, eps)):
        x_end = (1 - end) * x0_s + end * eps_s
        x_start = eps_s if s == 0 else (1 - start) * upsample2x(pyramid[s - 1]) + start * eps_s
        out.append((x_start, x_end))
    return out


def stage_mode(keep: torch.Tensor) -> str:
    """The mode of one stage from its keep-mask over the batch: "known", "clamp" or "free"."""
    if bool(keep.all()):
        return "known"
    return "clamp" if bool(keep.any()) else "free"


class EditInputError(ValueError):
    """An edit's image, mask, mode or stage is not usable (the caller can fix it)."""


# ---- requests --------------------------------------------------------------------------------------
@dataclass
class EditRequest:
    """The known content of an edit: scaled latents [N, C, h, w] (fp32), their keep-mask [N, 1, h, w]
    (bool, latent resolution), from_stage (stages 0..from_stage-1 are kept wholly), and for the final
    paste the input pixels [N, C, H, W] in [-1, 1] with their keep-mask [N, 1, H, W] (bool, pixels)."""

    latents: torch.Tensor
    keep: torch.Tensor
    from_stage: int = 0
    pixels: torch.Tensor | None = None
    pixel_keep: torch.Tensor | None = None

    def select(self, rows: Sequence[int]) -> "EditRequest":
        index = torch.as_tensor(list(rows), dtype=torch.long)
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return EditRequest(self.latents[index], self.keep[index], self.from_stage, pick(self.pixels),
                           pick(self.pixel_keep))

    def paste(self, images: torch.Tensor) -> torch.Tensor:
        """The final paste of a latent model's edit: the input's kept pixels over its decoded images
        [N, C, H, W] in [-1, 1], so that every pixel the mask keeps is the input's, exactly."""
        if self.pixels is None or not bool(self.pixel_keep.any()):
            return images
        keep = self.pixel_keep.to(images.device)
        return torch.where(keep, self.pixels.to(images.device, images.dtype), images)

    def kept_wholly(self) -> list[int]:
        """The images whose every latent element is kept (their output is their input)."""
        return [k for k, m in enumerate(self.keep.flatten(1)) if bool(m.all())]

    def stage_keeps(self, num_stages: int) -> list[torch.Tensor]:
        """The mask pyramid with every stage below from_stage kept wholly."""
        return [torch.ones_like(m) if s < self.from_stage else m
                for s, m in enumerate(mask_pyramid(self.keep, num_stages))]

    def stage_modes(self, num_stages: int) -> tuple[str, ...]:
        return tuple(stage_mode(m) for m in self.stage_keeps(num_stages))


class EditBuffers:
    """The static editing buffers of one engine, in token layout [batch, n_s, d]: per clamp stage the
    keep-mask and both known endpoints, per known stage its end. Loaded outside any graph by `load`."""

    def __init__(self, plan: StagePlan, batch: int, modes: tuple[str, ...], device: torch.device) -> None:
        if len(modes) != plan.num_stages or not set(modes) <= set(STAGE_MODES):
            raise EditInputError(f"stage modes must be {plan.num_stages} of {STAGE_MODES}, got {modes}")
        self.plan, self.modes, self.batch, self.device = plan, modes, batch, device
        d = plan.config.token_dim
        zeros = lambda n, dt: torch.zeros(batch, n, d, device=device, dtype=dt)  # noqa: E731
        self.keep = [zeros(n, torch.bool) if m == "clamp" else None for n, m in zip(plan.tokens, modes)]
        self.start = [zeros(n, torch.float32) if m == "clamp" else None for n, m in zip(plan.tokens, modes)]
        self.end = [zeros(n, torch.float32) if m != "free" else None for n, m in zip(plan.tokens, modes)]

    def load(self, request: EditRequest, eps: Sequence[torch.Tensor]) -> None:
        """Copy the request's mask pyramid and known endpoints in; eps[s]: [count, C, side_s, side_s]."""
        count, cfg = request.latents.shape[0], self.plan.config
        if request.stage_modes(self.plan.num_stages) != self.modes:
            raise EditInputError("the request's stage modes differ from this engine's")
        device, p, c = self.device, cfg.patch_size, cfg.latent_channels
        keeps = request.stage_keeps(self.plan.num_stages)
        ends = known_endpoints(request.latents.to(device, torch.float32), [e.to(device) for e in eps])
        for s, mode in enumerate(self.modes):
            if mode == "free":
                continue
            buffers = [(self.end[s], ends[s][1])]
            if mode == "clamp":
                keep = keeps[s].to(device).expand(-1, c, -1, -1)
                buffers += [(self.start[s], ends[s][0]), (self.keep[s], keep)]
            for buf, value in buffers:
                buf[:count].copy_(patchify(value, p))
                buf[count:].zero_()  # padding rows: nothing kept, zero endpoints

    # ---- used by the engine's units --------------------------------------------------------------
    def clamps(self, s: int) -> bool:
        return self.modes[s] == "clamp"

    def clamp_start_(self, s: int, x: torch.Tensor) -> None:
        """At a clamped stage's start (r = 1): x <- where(keep, X_start, x)."""
        if self.clamps(s):
            x.copy_(torch.where(self.keep[s], self.start[s], x))

    def euler_step_(self, s: int, x: torch.Tensor, v_cond: torch.Tensor, v_uncond: torch.Tensor | None,
                    w: torch.Tensor | None, dr: float, r: float) -> None:
        """The Euler step fused with the clamp at the new local ratio r (a clamp stage only)."""
        ops.clamped_euler_step_(x, v_cond, v_uncond, w, dr, self.keep[s], self.start[s], self.end[s], r)


# ---- user inputs ------------------------------------------------------------------------------------
def _is_sequence(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def image_channels(config: ECARConfig) -> int:
    """Channels of the model's images: the latent's for pixel models, RGB through a VAE."""
    return config.latent_channels if config.latent_kind == "pixel" else 3


def _model_image(image, channels: int):
    """as_model_image (ecar_infer/pil_input.py), whose refusal of an image it cannot read (a 32-bit image whose
    scale its values leave unknown) is an EditInputError, as every other unusable input is."""
    try:
        return as_model_image(image, channels)
    except ValueError as err:
        raise EditInputError(f"cannot read the image: {err}") from None


def as_images(images: Any, config: ECARConfig) -> torch.Tensor:
    """Images -> float32 [N, C, H, W] in [-1, 1] on the CPU.

    Accepted: a PIL image or a list of them (transparency composited on white, 16-bit grayscale scaled to
    8 bits, then L or RGB as the model needs: ecar_infer/pil_input.py); a uint8 array
    [H, W], [H, W, C] (C = 1 or 3), [N, H, W] (grayscale) or [N, H, W, C]; a float tensor [C, H, W] or
    [N, C, H, W] in [-1, 1]; a list of arrays or tensors.
    """
    size, channels = config.image_size, image_channels(config)
    if _is_sequence(images):
        if not images:
            raise EditInputError("images is empty: give at least one image")
        return torch.cat([as_images(one, config) for one in images])
    if hasattr(images, "convert") and hasattr(images, "size"):  # a PIL image
        images = np.asarray(_model_image(images, channels))
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise EditInputError(f"image arrays must be uint8 (0..255), got {images.dtype}; give floats in [-1, 1] "
                             f"as a torch tensor [N, C, H, W]")
        array = images
        if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] not in (1, 3)):
            array = array[..., None]  # [H, W] or a grayscale batch [N, H, W]
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4:
            raise EditInputError(f"an image array must be [H, W], [H, W, C], [N, H, W] or [N, H, W, C], got shape "
                             f"{images.shape}")
        x = torch.from_numpy(array.astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1.0
    elif isinstance(images, torch.Tensor):
        if not images.is_floating_point():
            raise EditInputError(f"image tensors must be float in [-1, 1] ([N, C, H, W]), got {images.dtype}; give "
                             f"uint8 images as numpy arrays [N, H, W, C]")
        x = images.detach().to("cpu", torch.float32)
        if x.dim() == 3:
            x = x[None]
        if x.dim() != 4:
            raise EditInputError(f"an image tensor must be [C, H, W] or [N, C, H, W], got shape {tuple(images.shape)}")
        if not x.numel():
            raise EditInputError(f"images is empty (shape {tuple(images.shape)}): give at least one image")
        if x.isnan().any():   # NaN passes the range check below, and an edit would carry it into its output
            raise EditInputError("image tensors must be numbers in the model's pixel range [-1, 1], got NaN values")
        if x.abs().max() > 1.0 + 1e-3:
            raise EditInputError(f"image tensors must be in the model's pixel range [-1, 1], got values up to "
                             f"{x.abs().max().item():.3g}")
        if x.min() >= 0 and x.max() > 0:
            # the likeliest cause: [0, 1] images, as output_type="pt" and torchvision's ToTensor give; read as
            # [-1, 1] their black would be mid-grey. A real image in [-1, 1] has nothing darker than mid-grey
            # only rarely, so this warns and goes on
            logger.warning("every value of the image tensor is in [0, 1], but tensors are read in the model's "
                           "pixel range [-1, 1] (0 is mid-grey): if these are [0, 1] images (output_type=\"pt\" "
                           "and torchvision's ToTensor give those), pass images * 2 - 1")
        x = x.clamp(-1, 1)
    else:
        raise EditInputError(f"cannot read images of type {type(images).__name__}: give PIL images, uint8 arrays "
                         f"or float tensors in [-1, 1]")
    if x.shape[1] == 3 and channels == 1:
        raise EditInputError("the images have 3 channels but the model makes grayscale images: convert them first")
    if x.shape[1] != channels:
        have = f"{x.shape[1]} channel" + ("" if x.shape[1] == 1 else "s")
        raise EditInputError(f"the images have {have} but the model makes {channels}-channel images"
                             f"{_array_layout_hint(images)}")
    if tuple(x.shape[-2:]) != (size, size):
        raise EditInputError(f"the images are {x.shape[-1]}x{x.shape[-2]} pixels but the model makes {size}x{size} "
                         f"images: resize or crop them first{_array_layout_hint(images)}")
    return x


def _array_layout_hint(images: Any) -> str:
    """Why an array or tensor may have been read in another layout than its user meant, for a misfit's
    error."""
    if isinstance(images, torch.Tensor):
        if images.dim() in (3, 4) and images.shape[-1] in (1, 3, 4) and images.shape[-3] not in (1, 3):
            return (f" (tensors are read channels first, [C, H, W] or [N, C, H, W], and this one's shape is "
                    f"{tuple(images.shape)}: for a channels-last tensor, pass "
                    f"images.permute({'0, 3, 1, 2' if images.dim() == 4 else '2, 0, 1'}))")
        return ""
    if not isinstance(images, np.ndarray) or images.ndim not in (3, 4):
        return ""
    if images.shape[-1] in (2, 4):
        return (f" (an array of shape {images.shape}: arrays with an alpha channel are not read; composite it, or "
                f"give a PIL image, which is composited on white)")
    if images.ndim == 3 and images.shape[0] in (1, 3):
        return (f" (a uint8 array of shape {images.shape} is read as {images.shape[0]} grayscale image(s) "
                f"[N, H, W]: give arrays channels last, [H, W, C] or [N, H, W, C])")
    return ""


def region_mask(region: str, size: int, mode: str) -> torch.Tensor:
    """bool [size, size] keep-mask of a built-in region (named in any case): inpaint regenerates the region,
    outpaint keeps it."""
    region = region.lower()
    if region not in REGIONS:
        raise EditInputError(f"unknown mask region {region!r}: choose one of {REGIONS}, or give a mask image")
    if mode not in ("inpaint", "outpaint"):
        raise EditInputError(f"a built-in mask region needs mode 'inpaint' or 'outpaint', not {mode!r}")
    rows = torch.arange(size)[:, None].expand(size, size)
    cols = torch.arange(size)[None, :].expand(size, size)
    half, quarter = size // 2, size // 4
    inside = lambda t: (t >= quarter) & (t < quarter + half)  # noqa: E731
    regions = {"left": cols < half, "right": cols >= half, "top": rows < half, "bottom": rows >= half,
               "center": inside(rows) & inside(cols), "border": ~(inside(rows) & inside(cols))}
    return ~regions[region] if mode == "inpaint" else regions[region]


def as_keep_masks(mask: Any, size: int, mode: str) -> torch.Tensor:
    """A mask -> bool [N, 1, size, size] on the CPU (N = 1 or one per image), True where kept.

    Accepted: a built-in region name (see region_mask); a PIL image without transparent pixels (refused:
    _refuse_transparency), read as every user image is (ecar_infer/pil_input.py: 16 bits scaled to 8, then
    grey; >= 128 is kept); a bool array or tensor; a uint8 array (>= 128 is kept; one of 0 and 1 only is
    refused: it is meant as bool); a float array or tensor of 0..1 (>= 0.5 is kept; NaN, or values outside
    0..1, refused); shapes [H, W], [N, H, W] or [N, 1, H, W], or channels last with one channel ([H, W, 1],
    [N, H, W, 1]); or a list of masks.
    """
    if isinstance(mask, str):
        return region_mask(mask, size, mode)[None, None]
    if _is_sequence(mask):
        if not mask:
            raise EditInputError("mask is an empty list")
        return torch.cat([as_keep_masks(one, size, mode) for one in mask])
    if hasattr(mask, "convert") and hasattr(mask, "size"):  # a PIL image
        _refuse_transparency(mask)
        mask = np.asarray(_model_image(mask, 1))
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.array(mask))  # a copy: arrays from PIL are read-only
    if not isinstance(mask, torch.Tensor):
        raise EditInputError(f"cannot read a mask of type {type(mask).__name__}: give a PIL image, a bool array or "
                         f"one of {REGIONS}")
    if mask.dtype == torch.bool:
        keep = mask
    elif mask.dtype == torch.uint8:
        if mask.numel() and mask.max() == 1:   # a 0/1 array meant as bool: it would silently keep nothing
            raise EditInputError("a uint8 mask holding only 0 and 1 keeps nothing (uint8 masks keep values >= 128, "
                                 "white in an image): give it as bool (mask.astype(bool)), or use 0 and 255")
        keep = mask >= 128
    elif mask.is_floating_point():
        if mask.isnan().any():   # NaN >= 0.5 is False: it would silently mean "regenerate"
            raise EditInputError("a float mask must hold numbers (>= 0.5 kept), got NaN values")
        if mask.numel() and mask.max() > 1:   # a 0..255 mask as floats: greys from 0.5 up would be kept
            raise EditInputError(f"a float mask holds 0..1 (>= 0.5 kept), got values up to {mask.max().item():g}: "
                                 f"divide a 0..255 mask by 255")
        if mask.numel() and mask.min() < 0:   # a [-1, 1] mask, made as images are: its mid-grey 0 would regenerate
            raise EditInputError(f"a float mask holds 0..1 (>= 0.5 kept), got values down to {mask.min().item():g}: "
                                 f"map a [-1, 1] mask to 0..1 with (mask + 1) / 2")
        keep = mask >= 0.5
    else:
        raise EditInputError(f"masks must be bool, uint8 (>= 128 kept) or float (>= 0.5 kept), got {mask.dtype}")
    keep = keep.cpu()
    if keep.dim() in (3, 4) and keep.shape[-1] in (1, 3, 4) and keep.shape[-1] != size:  # channels last
        if keep.shape[-1] != 1:
            raise EditInputError(f"a mask has one channel, got shape {tuple(mask.shape)}: give [H, W] or [N, H, W] "
                                 f"(for an RGB or RGBA array, one of its channels, such as mask[..., 0])")
        keep = keep[..., 0]   # [H, W, 1] or [N, H, W, 1], as a grayscale image array comes
    if keep.dim() == 2:
        keep = keep[None]
    if keep.dim() == 3:
        keep = keep[:, None]
    if keep.dim() != 4 or keep.shape[1] != 1:
        raise EditInputError(f"a mask must be [H, W], [N, H, W], [N, 1, H, W] or channels last with one channel, "
                             f"got shape {tuple(mask.shape)}")
    if tuple(keep.shape[-2:]) != (size, size):
        raise EditInputError(f"the mask is {keep.shape[-1]}x{keep.shape[-2]} pixels but the images are {size}x{size}")
    return keep


def _refuse_transparency(mask) -> None:
    """Refuse a PIL mask with transparent pixels. A mask is read by its grey level, and an image's
    transparency is composited on white (ecar_infer/pil_input.py), so a transparent area would be kept,
    where tools that mark the area to edit by transparency (OpenAI's image edits) mean the opposite."""
    if mask.mode not in ("RGBA", "LA", "PA") and "transparency" not in mask.info:
        return
    if mask.convert("RGBA").getchannel("A").getextrema()[0] < 255:
        raise EditInputError("the mask image has transparent pixels, which a mask does not read (white is kept, "
                             "black regenerated, and a transparent area would be kept as white): give a mask "
                             "without transparency; to keep the opaque pixels, use its alpha channel "
                             "(mask.convert(\"RGBA\").getchannel(\"A\") in Python)")


def fitted_image(image, config: ECARConfig):
    """A PIL image of any size brought to the model's as training brings its images: read as as_images reads
    a PIL image, then resized and centre-cropped (ecar_infer/pil_input.py, resize_center_crop)."""
    return resize_center_crop(_model_image(image, image_channels(config)), config.image_size)


def fitted_mask(mask, size: int):
    """A PIL mask of the image's size brought to size x size by fitted_image's rule, so that it covers the
    same pixels of the fitted image (its grey, between kept and not at the edge, is then thresholded at 128
    as every mask's is)."""
    _refuse_transparency(mask)
    return resize_center_crop(_model_image(mask, 1), size)


def build_request(pixels: torch.Tensor, count: int, mask: Any, mode: str, from_stage: int | None,
                  config: ECARConfig, encode: Callable[[torch.Tensor], torch.Tensor]) -> EditRequest:
    """The EditRequest of `count` output images from their input pixels [1 or count, C, H, W] in [-1, 1],
    the user's mask, mode and from_stage (checked here, with clear errors), and the model's encoder."""
    if mode not in MODES:
        raise EditInputError(f"mode must be one of {MODES}, got {mode!r}")
    if from_stage is None and mode == "vary" and config.num_stages == 1:   # the default would keep nothing
        raise EditInputError("mode 'vary' keeps the coarse stages of the image, and this model has one stage: there "
                             "is nothing to keep (sample instead, or inpaint with a mask)")
    if from_stage is None:  # vary: regenerate the last stage only, keeping the layout (docs/BENCHMARKS.md)
        from_stage = config.num_stages - 1 if mode == "vary" else 0
    if not is_integer(from_stage) or not 0 <= from_stage < config.num_stages:
        raise EditInputError(f"from_stage must be an integer in 0..{config.num_stages - 1} (this model has "
                         f"{config.num_stages} stages), got {from_stage!r}")
    size, down = config.image_size, config.vae_downsample
    if mode == "vary":
        if mask is not None:
            raise EditInputError("mode 'vary' takes no mask (it keeps the coarse stages below from_stage); to keep a "
                             "region as well, use mode 'inpaint' with the mask and from_stage")
        keep = torch.zeros(1, 1, size, size, dtype=torch.bool)
    elif mask is None:
        raise EditInputError(f"mode {mode!r} needs a mask: True (white) where the pixels are kept, or a region "
                         f"such as 'left' or 'center'")
    else:
        keep = as_keep_masks(mask, size, mode)
    if len(keep) not in (1, count):
        raise EditInputError(f"got {len(keep)} masks for {count} images: give one mask, or one per image")
    pixel_keep = keep.expand(count, -1, -1, -1)
    keep = min_pool(pixel_keep, down)
    if from_stage == 0 and mode != "vary":
        nothing = [k for k, m in enumerate(keep.flatten(1)) if not bool(m.any())]
        if nothing:
            block = "" if down == 1 else f" (a latent element is kept only if all its {down}x{down} pixels are)"
            raise EditInputError(f"the mask keeps nothing of image(s) {nothing}{block}: there is nothing to edit; use "
                             f"generate() for new images (uint8 masks keep values >= 128)")
    latents = encode(pixels).cpu().expand(count, -1, -1, -1)
    return EditRequest(latents, keep, int(from_stage), pixels.cpu().expand(count, -1, -1, -1), pixel_keep)
