"""Safetensors checkpoints (docs/MODEL.md, "Checkpoints"): save_checkpoint and load_checkpoint.

A checkpoint is one .safetensors file, or a `*.safetensors.index.json` index of shards in the diffusers /
transformers layout ({"metadata": {...}, "weight_map": {tensor name: shard file name}}). The metadata
holds format="ecar", format_version="1", config=the ECARConfig as JSON, plus any extra string entries
(recommended_cfg, recommended_steps, ...). Every tensor shares one float dtype. Only safetensors are
read, never pickle, so loading a checkpoint cannot run code.

Loading treats the file as untrusted: a corrupted or crafted file costs time and memory bounded by the
file itself and ends in a CheckpointError. The config is checked against the file's own tensor table
(the safetensors header: names, shapes, dtypes) before anything real is built: the model is first built
on the meta device (shapes only), and that build stops as soon as it asks for more than the file could
describe (ecar_infer/meta_build.py), so an absurd depth or width in the config costs nothing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checks import (MAX_HEADER_BYTES, is_finite_real, oversized_header, parse_json, safetensors_header_length,
                     some_of)
from .class_names import METADATA_KEY as CLASS_NAMES_KEY
from .class_names import ClassNameError, parse_class_names
from .config import ConfigError, ECARConfig
from .defaults import SamplingDefaults, close_recommended_key
from .model import ECARModel
from .atomic import atomic_path
from .meta_build import BuildError, build_within, mismatch

FORMAT = "ecar"
FORMAT_VERSION = "1"
RESERVED_KEYS = ("format", "format_version", "config")
INDEX_SUFFIX = ".safetensors.index.json"
# safetensors' dtype names of the float dtypes a checkpoint may hold
FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
DTYPE_NAMES = {v: k for k, v in FLOAT_DTYPES.items()}
MAX_CONFIG_CHARS = 1 << 16   # a config entry is about 700 characters; JSON would take ~30x a crafted one's size
MAX_INDEX_BYTES = 16 << 20   # a shard index names each tensor once: a few hundred kB for the largest preset
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive, or a bare pickle (protocol 2+)


class CheckpointError(ValueError):
    """A checkpoint file cannot be read as an E-CAR checkpoint; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        super().__init__(f"checkpoint {path}: {problem}")
        self.path, self.problem = Path(path), problem


# ---- saving ----------------------------------------------------------------------------------------
def save_checkpoint(model: ECARModel, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None,
                    max_shard_bytes: int | None = None) -> None:
    """Write `model` (its config and persistent weights) atomically.

    The metadata of a model read by load_checkpoint (model.checkpoint_metadata: recommended_steps,
    recommended_cfg, ...) is carried over; extra_metadata adds entries or overrides them.
    With max_shard_bytes, `path` must end in .safetensors.index.json: the weights go to shards of at most
    that many bytes (a tensor larger than that gets a shard of its own) named after the index.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(path, "is a directory; give the checkpoint a file name, e.g. model.safetensors")
    carried = getattr(model, "checkpoint_metadata", {})
    metadata = metadata_entries(path, model.config, {**carried, **(extra_metadata or {})}, new=extra_metadata or {})
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1 or not dtypes <= set(DTYPE_NAMES):
        raise CheckpointError(path, f"all tensors must share one dtype of {sorted(map(str, DTYPE_NAMES))}, "
                                    f"the model has {sorted(map(str, dtypes))}")
    if max_shard_bytes is None:
        with atomic_path(path) as tmp:
            save_safetensors(tensors, tmp, metadata)
        return
    if not path.name.endswith(INDEX_SUFFIX):
        raise CheckpointError(path, f"a sharded checkpoint is named by its index, which must end in {INDEX_SUFFIX}")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    stem = path.name[: -len(INDEX_SUFFIX)]
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        shard_name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        with atomic_path(path.parent / shard_name) as tmp:
            save_safetensors(shard, tmp, metadata)
        weight_map.update(dict.fromkeys(shard, shard_name))
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=1, sort_keys=True))


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """save_file, with the metadata's entries in sorted order: safetensors writes them in the order of a Rust
    HashMap, which differs between calls, so the same model gave files of other bytes (and another sha256,
    which ecar-sample's resume record compares). The tensors' entries are already in a fixed order. The
    sorted header is the same entries in the same JSON form, so it has the same length and is written in
    place (with the trailing spaces safetensors pads a header with)."""
    save_file(tensors, path, metadata=metadata)
    with open(path, "r+b") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= length:   # always, where serde and json agree on the form (else the file stays valid)
            f.seek(8)
            f.write(text.ljust(length))


def metadata_entries(path: Path, config: ECARConfig, extra: dict[str, str], new: dict[str, str] | None = None
                     ) -> dict[str, str]:
    """The metadata a checkpoint at `path` is written with: the reserved entries and `extra`, checked (a
    CheckpointError names what save_checkpoint would refuse; ecar-train checks its --metadata with it). The
    keys of `new` (default: all of `extra`) must not be typos of the recommended_* keys; entries carried over
    from a loaded checkpoint are not held to that, so that a file which loads can always be saved again."""
    clash = sorted(set(extra) & set(RESERVED_KEYS))
    if clash:
        raise CheckpointError(path, f"extra_metadata may not set the reserved key(s) {clash}")
    bad = sorted(k for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, str))
    if bad:
        raise CheckpointError(path, f"extra_metadata keys and values must be strings; not so for {bad}")
    misspelt = {key: near for key in (extra if new is None else new) for near in close_recommended_key(key)}
    if misspelt:   # kept, never read: a model saved with recomended_cfg samples unguided
        key, near = next(iter(misspelt.items()))
        raise CheckpointError(path, f"the sampler reads no entry {key!r} (did you mean {near}?)")
    _check_entries(path, config, extra)
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config.to_json(), **extra}


def _check_entries(path: Path, config: ECARConfig, metadata: dict[str, str]) -> None:
    """The optional entries the engine reads: class_names, one name per class (ecar_infer/class_names.py),
    and the recommended_* sampling defaults (ecar_infer/defaults.py), which must fit the model."""
    try:
        parse_class_names(metadata.get(CLASS_NAMES_KEY), config.num_classes)
        SamplingDefaults.from_metadata(metadata, config)
    except (ClassNameError, ValueError) as err:
        raise CheckpointError(path, str(err)) from None


# ---- loading ---------------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | str | None = None) -> ECARModel:
    """An ECARModel in eval mode from a checkpoint written by save_checkpoint: a path, or the name of a shipped
    model ("ecar-digits32") where no file of that name exists. `device` and `dtype` as in
    Sampler.from_pretrained.

    The model is built on the meta device within what the file's tensor table allows, every stored
    tensor's name, shape and dtype is checked against it, then the weights are assigned (cast to `dtype`
    unless it is None) and moved to `device`. model.checkpoint_metadata holds the extra metadata entries.
    Any file that is not such a checkpoint raises CheckpointError.
    """
    from .weights import checkpoint_path

    from .sampler import resolve_device, resolve_dtype

    path = checkpoint_path(path)
    device = resolve_device(device)   # "auto", "CPU", a missing GPU: as from_pretrained takes and refuses them
    if dtype is not None:
        dtype = resolve_dtype(dtype, device)
    metadata, entries = _read_header(path)
    config = _config(path, metadata)
    model = _build_on_meta(path, config, entries)   # first: it bounds the config by the file (num_stages, classes)
    _check_entries(path, config, metadata)
    stored_dtype = _check_tensors(path, model, entries)
    dtype = stored_dtype if dtype is None else dtype
    by_file: dict[Path, list[str]] = {}
    for name, (_, _, file) in entries.items():
        by_file.setdefault(file, []).append(name)
    state, nonfinite = {}, []
    for file, names in by_file.items():
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in names:
                stored = f.get_tensor(name)
                if not torch.isfinite(stored).all():   # checked as stored: an fp16 cast may overflow
                    nonfinite.append(name)
                state[name] = stored.to(dtype)
    if nonfinite:
        raise CheckpointError(path, f"{some_of(sorted(nonfinite))} hold NaN or infinite values: the file is "
                                    f"corrupt, or it was saved from a training run that diverged")
    model.load_state_dict(state, strict=True, assign=True)
    # the meta build left the config-derived (non-persistent) buffers on meta: compute them for real
    for name, value in model.config_buffers().items():
        owner, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(owner), attr, value.to(device=device, dtype=dtype))
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"load_checkpoint does not know how to build the tensors {leftover}")
    model.checkpoint_metadata = {k: v for k, v in metadata.items() if k not in RESERVED_KEYS}
    return model.eval()


def read_checkpoint_header(path: str | os.PathLike) -> tuple[ECARConfig, dict[str, tuple[int, ...]]]:
    """A checkpoint's config and the shapes of its tensors, from its header alone (no weights are read):
    what a model must match to take its weights. Any file that is not such a checkpoint raises
    CheckpointError, as in load_checkpoint."""
    path = Path(path)
    metadata, entries = _read_header(path)
    return _config(path, metadata), {name: shape for name, (shape, _, _) in entries.items()}


# name -> (shape, safetensors dtype name, file holding it)
Entries = dict[str, tuple[tuple[int, ...], str, Path]]


def _read_header(path: Path) -> tuple[dict[str, str], Entries]:
    """The metadata and tensor table of a checkpoint file or shard index."""
    if not path.exists():
        from .weights import shipped_models

        raise CheckpointError(path, f"file not found (the shipped models, by name: {', '.join(shipped_models())})")
    if path.is_dir():
        raise CheckpointError(path, f"is a directory; give a .safetensors file or a *{INDEX_SUFFIX} index")
    if not path.is_file():   # a FIFO or a device: reading it may wait forever, or never end
        raise CheckpointError(path, f"is not a regular file (a FIFO or a device); give a .safetensors file or a "
                                    f"*{INDEX_SUFFIX} index")
    return _read_index(path) if path.name.endswith(INDEX_SUFFIX) else _read_file(path)


def _read_file(path: Path) -> tuple[dict[str, str], Entries]:
    """The metadata and tensor table of one .safetensors file (its header only; no tensor data is read)."""
    oversized = oversized_header(path, "an E-CAR checkpoint's header")
    if oversized:
        raise CheckpointError(path, f"its {oversized}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            entries = {}
            for name in f.keys():
                piece = f.get_slice(name)
                entries[name] = (tuple(piece.get_shape()), piece.get_dtype(), path)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(path, _why_unreadable(path, err)) from None
    return metadata, entries


def _why_unreadable(path: Path, err: Exception) -> str:
    """Explain why safetensors could not open a file (its own messages are terse)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(PICKLE_MAGIC):
        return ("looks like a torch.save pickle, not safetensors; pickles can run code and are never loaded "
                "(convert it in a trusted session: load it, then save_checkpoint(model, PATH))")
    size = path.stat().st_size
    header_len = safetensors_header_length(path)
    if header_len is not None:
        if 8 + header_len > size or 8 + header_len + _data_bytes(path, header_len) > size:
            return f"truncated safetensors file (only {size} bytes; its header describes more)"
        return f"corrupt safetensors file ({err})"
    return f"not a safetensors file ({size} bytes that do not start with a safetensors header)"


DATA_END = re.compile(rb'"data_offsets"\s*:\s*\[\s*\d+\s*,\s*(\d+)\s*\]')


def _data_bytes(path: Path, header_len: int) -> int:
    """How many data bytes a safetensors header describes, as far as it can be read: the largest end of
    its data_offsets, found in the bytes (a JSON parse of a crafted header takes ~30x its size)."""
    with open(path, "rb") as f:
        f.seek(8)
        header = f.read(min(header_len, MAX_HEADER_BYTES))
    return max((int(end) for end in DATA_END.findall(header)), default=0)


def _read_index(path: Path) -> tuple[dict[str, str], Entries]:
    """The metadata of a shard index and the tensor table of all its shards."""
    if path.stat().st_size > MAX_INDEX_BYTES:   # before JSON takes ~30x its size
        raise CheckpointError(path, f"shard index is {path.stat().st_size:,} bytes: an index is under "
                                    f"{MAX_INDEX_BYTES:,}")
    try:
        index = parse_json(path.read_text())
    except ValueError as err:  # UnicodeDecodeError too
        raise CheckpointError(path, f"shard index is not valid JSON ({err})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    metadata = index.get("metadata") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not isinstance(metadata, dict):
        raise CheckpointError(path, 'shard index must be a JSON object with "metadata" and "weight_map" objects')
    if not all(isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..") for n in weight_map.values()):
        raise CheckpointError(path, "shard index: every weight_map value must be a file name in the index's folder")
    by_shard: dict[str, list[str]] = {}
    for name, shard_name in weight_map.items():
        by_shard.setdefault(shard_name, []).append(name)
    entries: Entries = {}
    for shard_name in sorted(by_shard):
        shard = path.parent / shard_name
        if not shard.is_file():
            raise CheckpointError(path, f"shard {shard_name} listed in the index is missing")
        _, shard_entries = _read_file(shard)
        for name in by_shard[shard_name]:
            if name not in shard_entries:
                raise CheckpointError(shard, f"lacks tensor {name!r} that the index {path.name} places there")
            entries[name] = shard_entries[name]
    return {str(k): str(v) for k, v in metadata.items()}, entries


def _config(path: Path, metadata: dict[str, str]) -> ECARConfig:
    if metadata.get("format") != FORMAT:
        found = f"format={metadata['format']!r}" if "format" in metadata else "no format entry"
        raise CheckpointError(path, f"not an E-CAR checkpoint: its metadata has {found}, expected format={FORMAT!r}")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(path, f"format_version={metadata.get('format_version')!r} is not supported; this "
                                    f"ecar_infer reads format_version={FORMAT_VERSION!r}")
    if "config" not in metadata:
        raise CheckpointError(path, "its metadata has no config entry")
    if len(metadata["config"]) > MAX_CONFIG_CHARS:
        raise CheckpointError(path, f"invalid config: {len(metadata['config']):,} characters (a config is under "
                                    f"{MAX_CONFIG_CHARS:,})")
    try:
        data = parse_json(metadata["config"])
    except ValueError as err:
        raise CheckpointError(path, f"invalid config: config is not valid JSON: {err}") from None
    if isinstance(data, dict):
        _check_field_types(path, data)
    try:
        return ECARConfig.from_dict(data)
    except (ConfigError, TypeError, ValueError) as err:
        raise CheckpointError(path, f"invalid config: {err}") from None


def _check_field_types(path: Path, data: dict[str, Any]) -> None:
    """Each known config field must hold a JSON value of its default's type (an int is a float too, a
    bool is not an int) and floats must be finite, so a config that loads also samples."""
    for field in dataclasses.fields(ECARConfig):
        if field.name not in data or field.default is None:
            continue
        value, want = data[field.name], type(field.default)
        if want is float:
            ok = is_finite_real(value)
        else:
            ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
        if not ok:
            raise CheckpointError(path, f"invalid config: ECARConfig.{field.name}={value!r}: must be "
                                        f"{'a finite number' if want is float else f'a JSON {want.__name__}'}")


def _build_on_meta(path: Path, config: ECARConfig, entries: Entries) -> ECARModel:
    """The model of `config` on the meta device, built only as far as the file's tensor table allows
    (meta_build.build_within): the expected tensors come from the model itself, whatever modules it has."""
    try:
        return build_within(lambda: ECARModel(config), {name: shape for name, (shape, _, _) in entries.items()})
    except BuildError as err:
        raise CheckpointError(path, str(err)) from None


def _check_tensors(path: Path, model: ECARModel, entries: Entries) -> torch.dtype:
    """Compare the stored tensors with the model's state; return their common dtype."""
    problem = mismatch(model, {name: shape for name, (shape, _, _) in entries.items()})
    if problem:
        raise CheckpointError(path, problem)
    expected = model.state_dict()
    dtypes = {entries[n][1] for n in expected}
    not_float = sorted(n for n in expected if entries[n][1] not in FLOAT_DTYPES)
    if not_float or len(dtypes) != 1:
        detail = (f"{some_of([f'{n} is {entries[n][1]}' for n in not_float])}" if not_float
                  else f"found {sorted(dtypes)}")
        raise CheckpointError(path, f"all tensors must share one dtype of {sorted(FLOAT_DTYPES)}: {detail}")
    return FLOAT_DTYPES[dtypes.pop()]
