"""Sampler: checkpoint or config -> model -> [per stage: AR forward, flow loop, re-noise] -> decode -> images.

On CUDA the fast path is the default: bf16 weights and activations (from_config / from_pretrained, the
VAE included), the engine's units replayed as CUDA graphs (ecar_infer/graphs.py), batches padded up to a
few bucket sizes so that few graphs are recorded, and engines (static buffers and their graphs) kept per
(bucket, step structure) so repeated requests reuse them. Every generate() on CUDA runs with TF32 allowed
for fp32 matmuls and convolutions (tf32=True; the previous setting is restored afterwards). Elsewhere, or
with cuda_graphs=False, the units run eagerly on exactly the requested batch: the reference path.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Sequence

import torch

from .checks import MAX_SEED, guidance_weight, integers, is_integer, switches
from .class_names import METADATA_KEY as CLASS_NAMES_KEY
from .class_names import parse_class_names, resolve_class
from .config import ECARConfig
from .defaults import SamplingDefaults
from .editing import EditInputError, EditRequest, as_images, build_request
from .engine import StageEngine, step_structure
from .graphs import GraphRunner, batch_bucket
from .model import ECARModel
from .noise import draw_noise
from .output import OUTPUT_TYPES, SampleOutput, convert, join_outputs
from .schedule import CFG_SCHEDULES, StageSteps, plan_for
from .vae import build_decoder

logger = logging.getLogger("ecar_infer")

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


# request shapes whose engines stay cached: a CLI run needs two (full chunks and the last); an edit adds one
DEFAULT_MAX_ENGINES = 4


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto" (or None): CUDA where there is a GPU, else the CPU; otherwise "cpu", "cuda", "cuda:N" (any case)
    or a torch.device of those."""
    if device is None or str(device).lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    expected = f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (or such a torch.device), got {device!r}"
    if not isinstance(device, (str, torch.device)):
        raise ValueError(expected)
    try:
        device = torch.device(device.lower() if isinstance(device, str) else device)
    except RuntimeError:
        raise ValueError(expected) from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(expected)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available here; use device='cpu' or 'auto'")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device={str(device)!r}: this machine has {torch.cuda.device_count()} GPU(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def vae_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The VAE decodes in bf16 with a bf16 model, else in fp32 (the SD-VAE can overflow in fp16)."""
    return torch.bfloat16 if model_dtype == torch.bfloat16 else torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None means bf16 on CUDA and fp32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    try:
        return DTYPES[dtype]
    except (KeyError, TypeError):
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or torch.float32 / bfloat16 / float16, got "
                         f"{dtype!r}") from None


@contextlib.contextmanager
def tf32_allowed(enabled: bool):
    """Within the block, TF32 is (dis)allowed for fp32 CUDA matmuls and cuDNN convolutions.

    The matmul setting goes through torch.set_float32_matmul_precision, which keeps torch's legacy flag
    (allow_tf32) and its per-backend precisions consistent: writing allow_tf32 over a precision the caller
    set the other way leaves them mixed, and torch.get_float32_matmul_precision (which torch.compile reads)
    then raises. Where the caller's flags are mixed already, only the legacy flag is set and restored."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn

    def set_matmul(value: str | bool) -> None:   # a precision name, or the legacy flag
        if isinstance(value, bool):
            matmul.allow_tf32 = value
        else:
            torch.set_float32_matmul_precision(value)

    try:
        saved_matmul, wanted = torch.get_float32_matmul_precision(), "high" if enabled else "highest"
    except RuntimeError:
        saved_matmul, wanted = matmul.allow_tf32, enabled
    saved_cudnn = cudnn.allow_tf32
    set_matmul(wanted)
    cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        set_matmul(saved_matmul)
        cudnn.allow_tf32 = saved_cudnn


class Sampler:
    """Generates images from a model and its decoder. The model is put in eval mode (the caller's object: to
    sample from a model in training, give a copy, as ecar-train does); its parameters are left as they are.

    cuda_graphs: capture and replay the units as CUDA graphs (CUDA only; eager elsewhere).
    compile: wrap each unit in torch.compile (optional; minutes of compilation on first use).
    tf32: on CUDA, allow TF32 for fp32 matmuls and cuDNN convolutions during generate().
    max_engines: how many request shapes (batch bucket, step structure, edit pattern) keep their static
        buffers, KV cache and CUDA graphs between requests; the least recently used is dropped beyond
        that (ecar-xl's KV cache alone is about 5 GiB at bucket 64). clear_cache() drops them all.
    defaults: the sampling settings a request gets where it leaves one out (default: those the model's
        checkpoint metadata recommends, if it was loaded from one).

    A sampler runs one request at a time: requests from several threads (a web demo's workers) wait for
    each other, since requests of one shape share an engine's static buffers.
    """

    def __init__(self, model: ECARModel, decoder=None, defaults: SamplingDefaults | None = None,
                 cuda_graphs: bool = True, progress: bool = True, compile: bool = False, tf32: bool = True,
                 max_engines: int = DEFAULT_MAX_ENGINES) -> None:
        if not is_integer(max_engines) or max_engines < 1:
            raise ValueError(f"max_engines must be an integer of at least 1, got {max_engines!r}")
        switches(progress=progress, cuda_graphs=cuda_graphs, compile=compile, tf32=tf32)
        self.model = model.eval()   # the caller's model, in eval mode: sample from a copy of one in training
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.decoder = decoder if decoder is not None else build_decoder(model.config)
        self.defaults = defaults or SamplingDefaults.from_metadata(getattr(model, "checkpoint_metadata", {}),
                                                                   model.config)
        self.runner = GraphRunner(self.device, cuda_graphs=cuda_graphs, compile=compile)
        self._tf32 = tf32
        self.progress = progress
        self.max_engines = max_engines
        self._engines: OrderedDict[tuple, StageEngine] = OrderedDict()  # least recently used first
        self._busy = threading.Lock()   # held by a request, and by clear_cache

    def __repr__(self) -> str:
        """What a user checks first: the model, where and how it samples, and the defaults a request gets."""
        cfg, d = self.config, self.defaults
        kind = "pixel" if cfg.latent_kind == "pixel" else f"{cfg.latent_kind} latent"
        params = sum(p.numel() for p in self.model.parameters())
        head = f"{cfg.head_kind} head" + (" (shortcut)" if cfg.shortcut else "")
        steps = d.steps_per_stage if is_integer(d.steps_per_stage) else list(d.steps_per_stage)
        interval = d.guidance_interval()
        guidance = ("unguided" if d.cfg_scale == 1 else f"guidance {d.cfg_scale:g} ({d.cfg_schedule})"
                    + ("" if interval is None else f" on sigma {interval[0]:g}-{interval[1]:g}"))
        graphs = "on" if self.runner.graphs_enabled else "off"
        return (f"Sampler({cfg.image_size}x{cfg.image_size} {kind} model, {cfg.num_stages} stages, "
                f"{cfg.num_classes} classes, {params:,} parameters, {head}; {self.device}, "
                f"{str(self.dtype).removeprefix('torch.')}, CUDA graphs {graphs}; "
                f"defaults: {steps} steps per stage, {guidance})")

    @property
    def tf32(self) -> bool:
        """Fixed at construction: a CUDA graph keeps the matmul precision it was captured with, so a later
        change would reach only some of the sampler's work (make another Sampler instead)."""
        return self._tf32

    @property
    def config(self) -> ECARConfig:
        return self.model.config

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device: str | torch.device | None = "auto",
                        dtype: str | torch.dtype | None = None, vae=None, vae_slicing: bool = False,
                        vae_tiling: bool = False, **kwargs) -> "Sampler":
        """A sampler for a safetensors checkpoint written by save_checkpoint: a path, or the name of a shipped
        model ("ecar-emoji32", "ecar-digits32"); None is the default model of ecar-sample."""
        from .checkpoint import load_checkpoint
        from .weights import checkpoint_path

        switches(vae_slicing=vae_slicing, vae_tiling=vae_tiling)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        model = load_checkpoint(checkpoint_path(path), device=device, dtype=dtype)
        decoder = build_decoder(model.config, vae, device, vae_dtype(dtype), slicing=vae_slicing, tiling=vae_tiling)
        return cls(model, decoder, **kwargs)   # the defaults: the checkpoint's recommended

    @classmethod
    def from_config(cls, config: ECARConfig, device: str | torch.device | None = "auto",
                    dtype: str | torch.dtype | None = None, seed: int = 0, vae=None, random_vae: bool = True,
                    **kwargs) -> "Sampler":
        """A sampler with random weights drawn from `seed` (every weight random, see init_weights); `config`
        is an ECARConfig or a preset's name ("ecar-tiny")."""
        if isinstance(config, str):
            config = ECARConfig.preset(config)
        if not isinstance(config, ECARConfig):
            raise ValueError(f"config must be an ECARConfig or a preset's name, got {type(config).__name__} (a dict "
                             f"of fields: ECARConfig.from_dict)")
        if not is_integer(seed) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in 0..2**64-1, got {seed!r}")
        switches(random_vae=random_vae)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        model = ECARModel(config).init_weights(seed, zero_init=False).to(device=device, dtype=dtype)
        decoder = build_decoder(config, vae, device, vae_dtype(dtype), random_vae=random_vae)
        return cls(model, decoder, **kwargs)

    # ---- classes -----------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str] | None:
        """One name per class label, from the checkpoint's metadata (None for a model without names)."""
        meta = getattr(self.model, "checkpoint_metadata", {})
        return parse_class_names(meta.get(CLASS_NAMES_KEY), self.config.num_classes)

    def class_index(self, name: str) -> int:
        """The class label of `name`, found as `ecar-sample --class` finds it: a class name (any case), an
        index ("3"), or the unambiguous beginning of a name ("smil"); raises ClassNameError listing the
        classes otherwise."""
        if not isinstance(name, str):
            raise TypeError(f"class_index takes a class name (str), got {type(name).__name__}")
        return resolve_class(name, self.class_names, self.config.num_classes)

    # ---- sampling ----------------------------------------------------------------------------
    def _validate_labels(self, class_labels: Sequence[int]) -> list[int]:
        labels = integers("class_labels", class_labels)
        if not labels:
            raise ValueError("class_labels is empty: give at least one class")
        bad = [y for y in labels if not 0 <= y < self.config.num_classes]
        if bad:
            raise ValueError(f"class label(s) {sorted(set(bad))} outside this model's range "
                             f"0..{self.config.num_classes - 1}")
        return labels

    @staticmethod
    def _seeds(seed: int | Sequence[int], count: int) -> list[int]:
        if getattr(seed, "ndim", None) == 0 and hasattr(seed, "item"):   # a 0-d tensor or array: one seed
            seed = seed.item()
        if is_integer(seed):
            seeds = [int(seed) + k for k in range(count)]
        else:
            seeds = integers("seed", seed)
            if len(seeds) != count:
                raise ValueError(f"got {len(seeds)} seeds for {count} class labels; give one int or one seed per image")
        bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
        if bad:
            raise ValueError(f"seeds must lie in 0..2**64-1 (torch.Generator's range), got {bad[0]}"
                             + (f" (image k has seed + k, so seed may be at most 2**64 - {count})"
                                if is_integer(seed) and bad[0] > MAX_SEED else ""))
        return seeds

    # Both run outside inference mode, whatever the caller's: the engines they cache keep static buffers that
    # later calls write in place, which an inference tensor refuses outside inference mode.
    @torch.inference_mode(False)
    @torch.no_grad()
    def generate(self, class_labels: Sequence[int], seed: int | Sequence[int] = 0, cfg_scale: float | None = None,
                 steps_per_stage: int | Sequence[int] | None = None, cfg_schedule: str | None = None,
                 cfg_interval: tuple[float, float] | None = None, output_type: str = "pil",
                 batch_size: int | None = None, progress: bool | None = None) -> SampleOutput:
        """Generate one image per class label. Image k uses seed + k (or seed[k] when a list is given).

        Settings left None take the sampler's defaults (a checkpoint's recommended_* metadata): guidance
        weight, steps per stage, schedule, and the sigma interval (lo, hi) where guidance applies, (0, 1)
        meaning everywhere. After the last stage with a guided step only the conditional branch runs."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        labels = self._validate_labels(class_labels)
        seeds = self._seeds(seed, len(labels))
        steps = self.plan(cfg_scale, steps_per_stage, cfg_schedule, cfg_interval)
        return self._run(labels, seeds, steps, output_type, batch_size, progress)

    @torch.inference_mode(False)
    @torch.no_grad()
    def edit(self, images, class_labels: int | Sequence[int], mask=None, mode: str = "inpaint",
             from_stage: int | None = None, seed: int | Sequence[int] = 0, cfg_scale: float | None = None,
             steps_per_stage: int | Sequence[int] | None = None, cfg_schedule: str | None = None,
             cfg_interval: tuple[float, float] | None = None, output_type: str = "pil",
             batch_size: int | None = None, progress: bool | None = None) -> SampleOutput:
        """Inpaint, outpaint or vary images without retraining (docs/MODEL.md, "Editing without retraining").

        images: PIL images, uint8 arrays ([H, W], [H, W, C] or [N, H, W, C]) or float tensors in [-1, 1]
        ([C, H, W] or [N, C, H, W]) at the model's image size; latent models encode them with their VAE.
        generate's output_type="pt" gives [0, 1]: pass `images * 2 - 1` (a tensor wholly in [0, 1] is
        warned about).
        One image with several class labels is edited once per label.
        class_labels: one per output image, or one int for every image.
        mask: True (white, >= 128, >= 0.5) where the pixels are kept: a PIL image, an array or a tensor, one
        for all images or one per image. Or a built-in region, "left", "right", "top", "bottom" (halves),
        "center" (the centred square of half the side) or "border": regenerated by "inpaint", kept by
        "outpaint".
        mode: "inpaint" or "outpaint" (a mask is needed), or "vary" (no mask): re-generate from stage
        `from_stage` on, keeping the input's coarser stages; from_stage 0 is plain sampling.
        from_stage: stages 0..from_stage-1 are kept wholly, in any mode (default 0; for "vary" the last
        stage, num_stages - 1, so that only the finest stage is regenerated and the variations keep the
        layout: on the 3-stage digits model from_stage 1 keeps little, docs/BENCHMARKS.md).
        Seeds, guidance, steps, output types and batching are those of generate(); output image k uses
        seed + k (or seed[k]) for both its sampling noise and its editing noise.
        Kept pixels are the input's exactly in every image output type (latent models paste them back over
        the decoded image); output_type="latent" returns the edited latent, whose kept elements are the
        encoded input's, with nothing pasted.
        """
        started = time.perf_counter()
        cfg = self.config
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        self._show_progress(batch_size, progress)   # checked whether or not anything is sampled
        pixels = as_images(images, cfg)
        labels = self._validate_labels([class_labels] if is_integer(class_labels) else class_labels)
        if len(labels) == 1 and len(pixels) > 1:
            labels = labels * len(pixels)
        if len(pixels) not in (1, len(labels)):
            raise EditInputError(f"got {len(pixels)} images and {len(labels)} class labels: give one label per image, "
                             f"one label for all images, or one image")
        count = len(labels)
        seeds = self._seeds(seed, count)
        with self._on_device():  # the VAE encode is part of the request: the same TF32 setting as its sampling
            request = build_request(pixels, count, mask, mode, from_stage, cfg,
                                    lambda x: self._encode(x, batch_size))
        everything = request.kept_wholly()
        steps = self.plan(cfg_scale, steps_per_stage, cfg_schedule, cfg_interval)
        if len(everything) == count:
            logger.warning("the mask keeps every pixel: the input is returned unchanged")
            images = (request.latents.clone() if output_type == "latent"
                      else convert(pixels.expand(count, -1, -1, -1), output_type))
            elapsed = time.perf_counter() - started
            return SampleOutput(images, seeds, labels, {"total_s": elapsed, "images_per_s": count / elapsed})
        if everything:
            logger.warning(f"the mask keeps every pixel of image(s) {everything}: their outputs are their inputs")
        return self._run(labels, seeds, steps, output_type, batch_size, progress, request, started)

    def _encode(self, pixels: torch.Tensor, batch_size: int | None) -> torch.Tensor:
        """Latents of input pixels (on the CPU), encoded batch_size images at a time on the device, as
        sampling and decoding go (the whole request for None): a long edit request holds one chunk there."""
        chunks = pixels.split(batch_size or len(pixels))
        return torch.cat([self.decoder.encode(chunk.to(self.device)).cpu() for chunk in chunks])

    def plan(self, cfg_scale: float | None = None, steps_per_stage: int | Sequence[int] | None = None,
             cfg_schedule: str | None = None, cfg_interval: tuple[float, float] | None = None) -> list[StageSteps]:
        """The per-stage step plan (ecar_infer/schedule.py) a request with these settings runs, the sampler's
        defaults filling what is not given. None means the default; any other value is checked (0, "" or
        [] are errors, not defaults)."""
        cfg_scale = self.defaults.cfg_scale if cfg_scale is None else guidance_weight(cfg_scale)
        cfg_schedule = self.defaults.cfg_schedule if cfg_schedule is None else cfg_schedule
        if cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
        steps_per_stage = self.defaults.steps_per_stage if steps_per_stage is None else steps_per_stage
        cfg_interval = self.defaults.cfg_interval if cfg_interval is None else cfg_interval  # (0, 1): everywhere
        return plan_for(self.config, steps_per_stage, cfg_scale, cfg_schedule, cfg_interval)

    def _run(self, labels: list[int], seeds: list[int], steps, output_type: str, batch_size: int | None,
             progress: bool | None, edit: EditRequest | None = None, started: float | None = None) -> SampleOutput:
        """Sample (or, with `edit`, edit) the images batch by batch, decode and convert them. The timings
        count from `started` (an edit's start, its encode included), or from the first batch."""
        show = self._show_progress(batch_size, progress)
        batch_size = len(labels) if batch_size is None else batch_size
        from tqdm.auto import tqdm

        chunks = [range(i, min(i + batch_size, len(labels))) for i in range(0, len(labels), batch_size)]
        bar = tqdm(total=len(chunks) * sum(st.steps for st in steps), unit="step", disable=not show,
                   desc="sampling" if edit is None else "editing")
        started = time.perf_counter() if started is None else started
        pieces = []
        # one request at a time (the class docstring); the bar is closed however the loop ends, so a line
        # printed after an interrupt starts on its own line
        with self._busy, self._on_device():
            with bar:
                for chunk in chunks:
                    part = None if edit is None else edit.select(chunk)
                    latent = self._sample_latents([labels[i] for i in chunk], [seeds[i] for i in chunk], steps,
                                                  bar, part)
                    # each chunk leaves the device as it is done: a long request holds one chunk there
                    pieces.append(latent.float().cpu() if output_type == "latent"
                                  else convert(self._decode(latent, part), output_type))
            images = join_outputs(pieces, output_type)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - started
        return SampleOutput(images, seeds, labels, {"total_s": elapsed, "images_per_s": len(labels) / elapsed})

    def _show_progress(self, batch_size: int | None, progress: bool | None) -> bool:
        """Whether a request shows its progress bar, once its run options are checked: batch_size a positive
        integer or None (the whole request), progress True, False or None (the sampler's setting)."""
        if batch_size is not None and (not is_integer(batch_size) or batch_size <= 0):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if progress is not None and not isinstance(progress, bool):
            raise ValueError(f"progress must be True, False or None (the sampler's setting), got {progress!r}")
        return self.progress if progress is None else progress

    def _on_device(self) -> contextlib.AbstractContextManager:
        """A request's context. On CUDA: the sampler's device current, since streams, graphs and Triton's
        launches follow the current device while torch's kernels follow their tensors' (a sampler on cuda:1
        with cuda:0 current captured empty graphs and launched its Triton kernels on cuda:0), and TF32
        allowed or not as the sampler says (tf32_allowed). Elsewhere nothing changes."""
        stack = contextlib.ExitStack()
        if self.device.type == "cuda":
            stack.enter_context(torch.cuda.device(self.device))
            stack.enter_context(tf32_allowed(self.tf32))
        return stack

    def _decode(self, latent: torch.Tensor, edit: EditRequest | None) -> torch.Tensor:
        """Decoded images in [-1, 1]. A latent model's edit ends with the final paste of the input's kept
        pixels (docs/MODEL.md, "Editing without retraining"); a pixel model's decoder is the identity, so its
        kept pixels already are the clamp's exact write and nothing is pasted."""
        images = self.decoder.decode(latent)
        if edit is None or self.config.latent_kind == "pixel":
            return images
        return edit.paste(images)

    def _engine(self, count: int, steps, edit_modes: tuple[str, ...] | None = None) -> StageEngine:
        """The cached engine for `count` images, this step structure and an edit's stage modes (built on
        first use; an edit whose stages are all free is plain sampling and shares the plain engine).

        With graphs the batch is padded up to its bucket, so one engine (and one set of graphs) serves
        every batch size of the bucket; without them the engine has exactly `count` rows.
        """
        batch = batch_bucket(count) if self.runner.graphs_enabled else count
        if edit_modes is not None and set(edit_modes) == {"free"}:
            edit_modes = None
        key = (batch, step_structure(steps)) + (() if edit_modes is None else (edit_modes,))
        if key in self._engines:
            self._engines.move_to_end(key)
            return self._engines[key]
        while len(self._engines) >= self.max_engines:
            _, evicted = self._engines.popitem(last=False)
            self.runner.forget(evicted.key)  # its graphs point into the buffers being freed
        self._engines[key] = StageEngine(self.model, batch, steps, edit_modes)
        return self._engines[key]

    def clear_cache(self) -> None:
        """Drop every cached engine with its buffers, KV cache and graphs (they are rebuilt on next use)."""
        with self._busy:
            for engine in self._engines.values():
                self.runner.forget(engine.key)
            self._engines.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _sample_latents(self, labels: list[int], seeds: list[int], steps, bar,
                        edit: EditRequest | None = None) -> torch.Tensor:
        """One chunk through every stage: [B, C, H, W] scaled latents."""
        plan = self.model.plan
        engine = self._engine(len(labels), steps, None if edit is None else edit.stage_modes(plan.num_stages))
        noise = draw_noise(seeds, plan, edit=edit is not None).to(self.device)
        engine.load(torch.tensor(labels, device=self.device), noise, steps)
        if engine.edit is not None:
            engine.edit.load(edit, noise.edit)
        for kind, s, fn in engine.units():
            self.runner.run(engine.key + (kind, s), fn)
            if kind in ("flow", "known"):
                bar.update(steps[s].steps)
        return engine.final_latent()[: len(labels)].clone()
