import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import fifo_at, random_model
from ecar_infer import CheckpointError, ECARConfig, Sampler, load_checkpoint, save_checkpoint
from ecar_infer.checkpoint import FORMAT, FORMAT_VERSION
from ecar_infer.model import ECARModel


@pytest.fixture(scope="module")
def model():
    return random_model(ECARConfig.preset("ecar-tiny"), seed=5)


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(model, path, extra_metadata={"recommended_cfg": "2.0", "recommended_steps": "2"})
    return path


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# JSON nested past the parser's recursion limit (json.loads raises RecursionError, not ValueError)
DEEP = "[" * 5_000 + "]" * 5_000   # past the JSON parser's recursion limit, within the size bounds of entries


def metadata(model, **changes):
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.to_json()}
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not None}


def generate(model):
    sampler = Sampler(model, progress=False)
    return sampler.generate([1, 8], seed=3, cfg_scale=2.0, steps_per_stage=2, output_type="latent").images


# ---- round trips -----------------------------------------------------------------------------------
def test_round_trip_gives_identical_weights_metadata_and_samples(model, ckpt):
    loaded = load_checkpoint(ckpt)
    assert isinstance(loaded, ECARModel) and loaded.config == model.config and not loaded.training
    assert loaded.checkpoint_metadata == {"recommended_cfg": "2.0", "recommended_steps": "2"}
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    # the non-persistent position table is rebuilt on the device, not left on meta
    assert torch.equal(loaded.trunk.pos, model.trunk.pos)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert torch.equal(generate(loaded), generate(model))


def test_sampler_from_pretrained_uses_the_recommended_settings(ckpt):
    sampler = Sampler.from_pretrained(ckpt, device="cpu", progress=False)
    assert sampler.defaults.cfg_scale == 2.0 and sampler.defaults.steps_per_stage == 2


def test_each_recommended_entry_becomes_its_own_default_exactly(model, tmp_path):
    """Every recommended_* entry, each at a value unlike the engine's default and unlike the others (a
    fractional cfg, a per-stage steps list in stage order, the non-default schedule, a one-point interval
    with lo == hi, which 0 <= LO <= HI <= 1 allows), arrives unchanged in the sampler's defaults; the entries
    left out keep the engine's defaults, and a shortcut head without recommended_steps samples in 4."""
    from ecar_infer.defaults import SamplingDefaults

    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path, extra_metadata={"recommended_cfg": "2.5", "recommended_steps": "1,2,3",
                                                 "recommended_cfg_schedule": "linear",
                                                 "recommended_cfg_interval": "0.5,0.5"})
    assert Sampler.from_pretrained(path, device="cpu").defaults == SamplingDefaults(
        cfg_scale=2.5, steps_per_stage=(1, 2, 3), cfg_schedule="linear", cfg_interval=(0.5, 0.5))
    engine = SamplingDefaults()
    for key, field, value, expected in [("recommended_cfg", "cfg_scale", "0.75", 0.75),
                                        ("recommended_steps", "steps_per_stage", "3,1,2", (3, 1, 2)),
                                        ("recommended_steps", "steps_per_stage", "7", 7),
                                        ("recommended_cfg_schedule", "cfg_schedule", "linear", "linear"),
                                        ("recommended_cfg_interval", "cfg_interval", "0.25,0.875", (0.25, 0.875))]:
        got = SamplingDefaults.from_metadata({key: value}, model.config)
        assert got == SamplingDefaults(**{**vars(engine), field: expected}), key
    shortcut = model.config.replace(head_objective="shortcut", shortcut_max_level=3)
    assert SamplingDefaults.from_metadata({}, shortcut).steps_per_stage == 4 != engine.steps_per_stage
    assert SamplingDefaults.from_metadata({"recommended_steps": "2,8,1"}, shortcut).steps_per_stage == (2, 8, 1)


def test_dtype_is_kept_or_cast(model, ckpt, tmp_path):
    cast = load_checkpoint(ckpt, dtype=torch.bfloat16)
    assert {t.dtype for t in [*cast.parameters(), *cast.buffers()]} == {torch.bfloat16}
    path = tmp_path / "bf16.safetensors"
    save_checkpoint(cast, path)
    kept = load_checkpoint(path)
    assert {t.dtype for t in [*kept.parameters(), *kept.buffers()]} == {torch.bfloat16}
    assert torch.equal(kept.trunk.pos, model.trunk.pos.to(torch.bfloat16))


def test_sharded_index_round_trip(model, tmp_path):
    index = tmp_path / "tiny.safetensors.index.json"
    save_checkpoint(model, index, extra_metadata={"note": "sharded"}, max_shard_bytes=20_000)
    shards = sorted(p.name for p in tmp_path.glob("tiny-*-of-*.safetensors"))
    assert len(shards) > 1 and set(json.loads(index.read_text())["weight_map"].values()) == set(shards)
    loaded = load_checkpoint(index)
    assert loaded.checkpoint_metadata == {"note": "sharded"}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    (tmp_path / shards[-1]).unlink()
    with pytest.raises(CheckpointError, match=f"shard {shards[-1]} .*missing"):
        load_checkpoint(index)


def test_a_config_written_by_hand_with_whole_numbers_for_floats_loads(model, tmp_path):
    """JSON has one number type: "time_scale": 1000 is the float 1000.0, as a hand-written or another tool's
    config would give it."""
    config = model.config.to_dict()
    text = json.dumps(config)
    for field in ("time_scale", "mlp_ratio", "vae_scaling_factor"):
        assert float(config[field]).is_integer()
        text = text.replace(f'"{field}": {config[field]!r}', f'"{field}": {int(config[field])}')
    assert all(type(json.loads(text)[f]) is int for f in ("time_scale", "mlp_ratio", "vae_scaling_factor"))
    path = tmp_path / "ints.safetensors"
    save_file(state(model), path, metadata=metadata(model, config=text))
    assert load_checkpoint(path).config == model.config


def bad_index(kind, index):
    """Edit the valid shard index `index` (its shards beside it) into the bad index `kind`."""
    data = json.loads(index.read_text())
    wm, folder = data["weight_map"], index.parent
    first = sorted(set(wm.values()))[0]
    if kind == "not UTF-8":
        index.write_bytes(b"\xff\xfe{not text")
        return
    if kind == "not JSON":
        index.write_text('{"metadata": {}, "weight_map": ')
        return
    if kind == "nested too deeply":
        index.write_text(DEEP)
        return
    if kind == "too large":   # JSON would take ~30x its size before anything refused it
        index.write_text(" " * (16 << 20) + json.dumps(data))
        return
    if kind == "a list":
        data = [data]
    elif kind == "metadata a list":
        data["metadata"] = [data["metadata"]]
    elif kind == "weight_map missing":
        del data["weight_map"]
    elif kind in ("shard in the parent folder", "shard by absolute path"):
        (folder.parent / first).write_bytes((folder / first).read_bytes())  # a readable shard there, too
        name = f"../{first}" if kind == "shard in the parent folder" else str(folder.parent / first)
        data["weight_map"] = {k: name if v == first else v for k, v in wm.items()}
    elif kind == "shard name a number":
        data["weight_map"]["head.out.bias"] = 3
    elif kind == "shard a folder":
        (folder / "tiny-dir.safetensors").mkdir()
        data["weight_map"]["head.out.bias"] = "tiny-dir.safetensors"
    elif kind == "tensor not in its shard":
        other = next(v for v in sorted(set(wm.values())) if v != wm["head.out.bias"])
        data["weight_map"]["head.out.bias"] = other
    elif kind == "config an object":
        data["metadata"]["config"] = json.loads(data["metadata"]["config"])
    index.write_text(json.dumps(data))


BAD_INDEXES = {
    "not UTF-8": "shard index is not valid JSON",
    "not JSON": "shard index is not valid JSON",
    "nested too deeply": "shard index is not valid JSON (JSON nested too deeply)",
    "a list": 'shard index must be a JSON object with "metadata" and "weight_map" objects',
    "metadata a list": 'shard index must be a JSON object with "metadata" and "weight_map" objects',
    "weight_map missing": 'shard index must be a JSON object with "metadata" and "weight_map" objects',
    "shard in the parent folder": "every weight_map value must be a file name in the index's folder",
    "shard by absolute path": "every weight_map value must be a file name in the index's folder",
    "shard name a number": "every weight_map value must be a file name in the index's folder",
    "shard a folder": "shard tiny-dir.safetensors listed in the index is missing",
    "tensor not in its shard": "lacks tensor 'head.out.bias' that the index tiny.safetensors.index.json places there",
    "config an object": "invalid config: config is not valid JSON",
    "too large": "bytes: an index is under 16,777,216",
}


@pytest.mark.parametrize("kind", sorted(BAD_INDEXES))
def test_each_bad_shard_index_gets_one_clear_error(kind, model, tmp_path):
    """An index is untrusted too: whatever it holds ends in a CheckpointError, and its shards must be files
    in its own folder (never ../ or an absolute path, even where such a file exists and is valid)."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    index = folder / "tiny.safetensors.index.json"
    save_checkpoint(model, index, max_shard_bytes=20_000)
    bad_index(kind, index)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(index)
    message = str(info.value)
    assert "\n" not in message and BAD_INDEXES[kind] in message, message


def test_an_index_reads_its_metadata_values_as_strings(model, tmp_path):
    index = tmp_path / "tiny.safetensors.index.json"
    save_checkpoint(model, index, max_shard_bytes=20_000)
    data = json.loads(index.read_text())
    data["metadata"].update(recommended_steps=2, note=1.5)  # numbers, where a single file can hold only strings
    index.write_text(json.dumps(data))
    assert load_checkpoint(index).checkpoint_metadata == {"recommended_steps": "2", "note": "1.5"}


@pytest.mark.skipif(not Path("/dev/null").exists(), reason="needs /dev/null")
def test_a_file_that_cannot_be_mapped_is_refused_as_not_safetensors():
    """A device is no checkpoint (and reading one such as a terminal would wait), refused before it is read."""
    with pytest.raises(CheckpointError, match=r"checkpoint /dev/null: is not a regular file \(a FIFO or a device\)"):
        load_checkpoint("/dev/null")


def test_shards_hold_whole_tensors_up_to_the_limit_and_are_named_i_of_n(model, tmp_path):
    """A shard holds at most max_shard_bytes unless it holds one tensor larger than that; a limit of the
    whole model's size gives one shard (the bound is inclusive), a limit of 1 byte one shard per tensor (and
    no empty shard). Shards are named STEM-iiiii-of-nnnnn.safetensors."""
    from safetensors import safe_open

    sizes = {k: v.numel() * v.element_size() for k, v in model.state_dict().items()}
    for limit, count in [(sum(sizes.values()), 1), (1, len(sizes)), (20_000, None)]:
        folder = tmp_path / f"limit{limit}"
        folder.mkdir()
        index = folder / "tiny.safetensors.index.json"
        save_checkpoint(model, index, max_shard_bytes=limit)
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
        n = len(shards)
        assert count is None or n == count, (limit, shards)
        assert shards == [f"tiny-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        weight_map = json.loads(index.read_text())["weight_map"]
        assert set(weight_map) == set(sizes) and set(weight_map.values()) == set(shards)
        for shard in shards:
            with safe_open(folder / shard, framework="pt") as f:
                held = list(f.keys())
            assert held and sorted(held) == sorted(k for k, s in weight_map.items() if s == shard)
            assert len(held) == 1 or sum(sizes[k] for k in held) <= limit, (limit, shard)
    loaded = load_checkpoint(tmp_path / "limit1" / "tiny.safetensors.index.json")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_save_to_a_folder_is_a_checkpoint_error(model, tmp_path):
    with pytest.raises(CheckpointError, match="is a directory; give the checkpoint a file name"):
        save_checkpoint(model, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_a_model_of_mixed_dtypes(model, tmp_path):
    mixed = random_model(model.config, seed=5)
    mixed.head.out.bias.data = mixed.head.out.bias.data.half()
    with pytest.raises(CheckpointError, match=r"all tensors must share one dtype .*the model has \['torch.float16', 'torch.float32'\]"):
        save_checkpoint(mixed, tmp_path / "mixed.safetensors")
    with pytest.raises(CheckpointError, match="all tensors must share one dtype"):
        save_checkpoint(mixed, tmp_path / "mixed.safetensors.index.json", max_shard_bytes=20_000)
    assert list(tmp_path.iterdir()) == []


def test_save_leaves_no_temporary_files_and_rejects_bad_metadata(model, tmp_path):
    save_checkpoint(model, tmp_path / "m.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    with pytest.raises(CheckpointError, match="reserved"):
        save_checkpoint(model, tmp_path / "x.safetensors", extra_metadata={"config": "{}"})
    with pytest.raises(CheckpointError, match="strings"):
        save_checkpoint(model, tmp_path / "x.safetensors", extra_metadata={"recommended_cfg": 3.0})
    with pytest.raises(CheckpointError, match="recommended_steps must be"):
        save_checkpoint(model, tmp_path / "x.safetensors", extra_metadata={"recommended_steps": "ten"})
    # a misspelt key is kept and never read: the model would sample unguided without a word
    with pytest.raises(CheckpointError, match=r"reads no entry 'recomended_cfg' \(did you mean recommended_cfg\?\)"):
        save_checkpoint(model, tmp_path / "x.safetensors", extra_metadata={"recomended_cfg": "3"})
    with pytest.raises(CheckpointError, match="did you mean recommended_steps"):
        save_checkpoint(model, tmp_path / "x.safetensors", extra_metadata={"Recommended_Steps": "3"})
    own_keys = {"recommended_by": "x", "recommended_seeds": "1,2", "recommended_cpu": "x", "note": "y"}
    save_checkpoint(model, tmp_path / "n.safetensors", extra_metadata=own_keys)   # keys of their own, not typos
    # a typo carried over from a loaded file does not stop it from being saved again (the user cannot drop it
    # through extra_metadata, which only adds or overrides)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model, "checkpoint_metadata", {"recomended_cfg": "3"}, raising=False)
        save_checkpoint(model, tmp_path / "n.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "n.safetensors"]


@pytest.mark.parametrize("key, near", [
    ("RECOMMENDED_CFG", "recommended_cfg"),               # another case only: 15 letters off before lower()
    ("recomended_cfg_intervl", "recommended_cfg_interval"),    # two letters dropped
    ("recommended_stepss", "recommended_steps"),         # a letter added at the end
    ("recommmended_cfg", "recommended_cfg"),             # a letter added inside
    ("recommended-steps", "recommended_steps"),          # a dash for the underscore
    ("recommended_by", None), ("recommended_cfg_scale", None), ("note", None),   # three or more off: not typos
    ("recommended_seeds", None), ("recommended_cpu", None),   # two off a short key: keys of their own
])
def test_a_metadata_key_a_letter_or_two_off_a_recommended_one_is_refused(model, tmp_path, key, near):
    """The typo rule is 'another case or a dash, or one letter added, dropped or changed (two in the long
    cfg_schedule and cfg_interval keys)': with a tighter bound, a case-sensitive comparison or a distance that
    never counts an added letter, recomended_cfg_intervl, RECOMMENDED_CFG or recommended_stepss would be saved,
    kept and never read (the model sampling unguided); with a looser one, keys of the user's own are refused."""
    if near is None:
        save_checkpoint(model, tmp_path / "n.safetensors", extra_metadata={key: "x"})
        return
    with pytest.raises(CheckpointError, match=rf"reads no entry '{key}' \(did you mean {near}\?\)"):
        save_checkpoint(model, tmp_path / "x.safetensors", extra_metadata={key: "3"})
    assert list(tmp_path.iterdir()) == []


# ---- one clear error per bad file ------------------------------------------------------------------
def write_bad(kind, model, path):
    """Write the bad checkpoint `kind` to path."""
    tensors = state(model)
    meta = metadata(model)
    if kind == "missing file":
        return
    if kind == "directory":
        path.mkdir()
        return
    if kind == "not safetensors":
        path.write_text("definitely not a checkpoint\n")
        return
    if kind == "pickle":
        torch.save(tensors, path)
        return
    if kind == "truncated":
        save_file(tensors, path, metadata=meta)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 100])
        return
    if kind == "header nested too deeply":  # a header safetensors refuses, read again to say why
        header = ('{"__metadata__": {"format": "ecar"}, "x": ' + DEEP + "}").encode()
        header += b" " * (-len(header) % 8)
        path.write_bytes(len(header).to_bytes(8, "little") + header)
        return
    if kind == "truncated header":
        save_file(tensors, path, metadata=meta)
        path.write_bytes(path.read_bytes()[:40])
        return
    if kind == "missing tensor":
        del tensors["head.out.weight"]
    elif kind == "unexpected tensor":
        tensors["head.extra"] = torch.zeros(3)
    elif kind == "misshaped tensor":
        tensors["trunk.input_proj.weight"] = torch.zeros(32, 5)
    elif kind == "mixed dtypes":
        tensors["head.out.bias"] = tensors["head.out.bias"].half()
    elif kind == "integer tensor":
        tensors["head.out.bias"] = tensors["head.out.bias"].long()
    elif kind == "NaN weights":
        tensors["head.out.bias"][1] = float("nan")
        tensors["trunk.input_proj.weight"][0, 0] = float("-inf")
    elif kind == "fp16 weights, one infinite":
        tensors = {k: v.half() for k, v in tensors.items()}
        tensors["head.out.bias"][0] = float("inf")
    elif kind == "F64 tensors":
        tensors = {k: v.double() for k, v in tensors.items()}
    elif kind == "transposed tensor":
        tensors["trunk.input_proj.weight"] = tensors["trunk.input_proj.weight"].t().contiguous()
    elif kind == "flattened tensor":
        tensors["trunk.input_proj.weight"] = tensors["trunk.input_proj.weight"].flatten()
    elif kind == "no metadata":
        meta = None
    elif kind == "wrong format":
        meta = metadata(model, format="pt")
    elif kind == "wrong version":
        meta = metadata(model, format_version="2")
    elif kind == "no config":
        meta = metadata(model, config=None)
    elif kind == "config nested too deeply":
        meta = metadata(model, config=DEEP)
    elif kind == "class_names nested too deeply":
        meta = metadata(model, class_names=DEEP)
    elif kind == "config too long":   # JSON would take ~30x its size before anything refused it
        meta = metadata(model, config=model.config.to_json()[:-1] + ', "x": "' + "x" * 70_000 + '"}')
    elif kind == "class_names too long":
        meta = metadata(model, class_names=json.dumps(["x" * 1_100] * model.config.num_classes))
    elif kind == "invalid config JSON":
        meta = metadata(model, config='{"width": 32,')
    elif kind == "config fails validation":
        meta = metadata(model, config=model.config.to_json().replace('"num_heads": 2', '"num_heads": 3'))
    elif kind.startswith("config "):  # "config FIELD=JSON": one field of a valid config set to a JSON text
        field, value = (kind[len("config "):].replace("<5000 digits>", "1" + "0" * 4999)
                        .replace("<401 digits>", "1" + "0" * 400).split("=", 1))
        meta = metadata(model, config=json.dumps(model.config.to_dict())[:-1] + f', "{field}": {value}}}')
    elif kind == "unknown config field":
        meta = metadata(model, config=json.dumps({**model.config.to_dict(), "colour": "blue"}))
    elif kind.startswith("recommended_"):
        key, value = kind.split("=", 1)
        meta = metadata(model, **{key: value})
    save_file(tensors, path, metadata=meta)


BAD_FILES = {
    "missing file": r"file not found \(the shipped models, by name: ecar-digits32, ecar-emoji32\)$",
    "NaN weights": r"head.out.bias, trunk.input_proj.weight hold NaN or infinite values: the file is corrupt",
    "fp16 weights, one infinite": r"head.out.bias hold NaN or infinite values",
    "directory": "is a directory",
    "not safetensors": "not a safetensors file",
    "pickle": "torch.save pickle",
    "truncated": "truncated safetensors file",
    "truncated header": "truncated safetensors file",
    "missing tensor": r"1 missing tensor\(s\) head.out.weight",
    "unexpected tensor": r"1 unexpected tensor\(s\) head.extra",
    "misshaped tensor": r"trunk.input_proj.weight is \[32, 5\], expected \[32, 4\]",
    "mixed dtypes": r"one dtype .*found \['F16', 'F32'\]",
    "integer tensor": "one dtype .*head.out.bias is I64",
    "F64 tensors": r"all tensors must share one dtype of \['BF16', 'F16', 'F32'\]: .* is F64",
    "transposed tensor": r"1 tensor\(s\) with the wrong shape: trunk.input_proj.weight is \[4, 32\], expected \[32, 4\]",
    "flattened tensor": r"1 tensor\(s\) with the wrong shape: trunk.input_proj.weight is \[128\], expected \[32, 4\]",
    # the last of two equal keys wins in json.loads: the field is overridden
    "config time_scale=Infinity": r"invalid config: ECARConfig.time_scale=inf: must be a finite number",
    "config norm_eps=Infinity": r"invalid config: ECARConfig.norm_eps=inf: must be a finite number",
    "config mlp_ratio=-Infinity": r"invalid config: ECARConfig.mlp_ratio=-inf: must be a finite number",
    "config width=<5000 digits>": r"invalid config: config is not valid JSON: .*digits",
    # a whole number beyond a float's range in a float field (math.isfinite would raise OverflowError)
    "config time_scale=<401 digits>": r"invalid config: ECARConfig.time_scale=10{400}: must be a finite number",
    "config nested too deeply": r"invalid config: config is not valid JSON: JSON nested too deeply",
    "class_names nested too deeply": r"class_names must be a JSON list of non-empty strings",
    "header nested too deeply": r"corrupt safetensors file",
    "config too long": r"invalid config: 70,\d+ characters \(a config is under 65,536\)$",
    "class_names too long": r"class_names is 11,\d+ characters: more than 1,024 for each of the 10 classes$",
    "no metadata": "not an E-CAR checkpoint: its metadata has no format entry",
    "wrong format": "not an E-CAR checkpoint: its metadata has format='pt'",
    "wrong version": "format_version='2' is not supported",
    "no config": "no config entry",
    "invalid config JSON": "invalid config: config is not valid JSON",
    "config fails validation": r"invalid config: ECARConfig.num_heads=3: must divide width=32",
    "unknown config field": r"invalid config: unknown config field\(s\) \['colour'\]",
    "recommended_steps=abc": r"recommended_steps must be one step count or one per stage.*got 'abc'",
    "recommended_steps=0": r"recommended_steps='0' does not fit this model: steps_per_stage must be positive",
    "recommended_steps=2,2": r"recommended_steps='2,2' does not fit .*2 entries but the model has 3 stages",
    "recommended_steps=-2": r"recommended_steps must be one step count .*got '-2'",
    "recommended_cfg=nan": r"recommended_cfg must be a finite number, got 'nan'",
    "recommended_cfg=two": r"recommended_cfg must be a finite number, got 'two'",
    "recommended_cfg=1e39": r"recommended_cfg must be within -10,000..10,000 \(.*\), got 1e\+39",
    "recommended_cfg_schedule=bogus": r"recommended_cfg_schedule must be one of \('constant', 'linear'\)",
    "recommended_cfg_interval=0.6,0.5": r"recommended_cfg_interval must be two sigmas .*got '0.6,0.5'",
    "recommended_cfg_interval=0.5,nan": r"recommended_cfg_interval must be two sigmas .*got '0.5,nan'",
    "recommended_cfg_interval=1.2.3": r"recommended_cfg_interval must be two sigmas .*got '1.2.3'",
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_each_bad_file_gets_one_clear_error(kind, model, tmp_path):
    path = tmp_path / "bad.safetensors"
    write_bad(kind, model, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"checkpoint {path}: ") and "\n" not in message
    assert info.value.path == path
    assert re.search(BAD_FILES[kind], message), message


def test_a_checkpoint_whose_header_is_past_the_bound_is_named_in_a_sentence(tmp_path):
    """The refusal of an oversized header reads 'checkpoint PATH: its safetensors header is N bytes, ...' (the
    shared reason, 'safetensors header is ...', is worded for whose header it is; without 'its' the line lost
    its subject). The length is read from the first 8 bytes: nothing of the header is parsed."""
    from ecar_infer.checks import MAX_HEADER_BYTES

    path = tmp_path / "big.safetensors"
    path.write_bytes((MAX_HEADER_BYTES + 1).to_bytes(8, "little") + b"{")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value) == (f"checkpoint {path}: its safetensors header is 16,777,217 bytes, more than an E-CAR "
                               f"checkpoint's header can need (16,777,216); it is not read")


def test_finite_weights_cast_to_fp16_are_not_refused(model, tmp_path):
    """Finiteness is checked on the stored tensors: fp32 weights beyond fp16's range load as fp16 (they
    overflow to infinity there, which is the caller's choice of dtype, not a corrupt file)."""
    big = random_model(model.config, seed=3)
    with torch.no_grad():
        big.head.out.bias[0] = 1e6
    save_checkpoint(big, tmp_path / "big.safetensors")
    assert torch.isinf(load_checkpoint(tmp_path / "big.safetensors", dtype=torch.float16).head.out.bias[0])


def test_the_same_model_is_always_written_as_the_same_bytes(model, tmp_path):
    """safetensors writes its metadata in a Rust HashMap's order, which varies from call to call; the same
    model and metadata, given in any order, must give the same file (its sha256 names the model in
    ecar-sample's resume record)."""
    extra = {f"note_{k}": str(k) for k in range(6)}
    files = []
    for i, order in enumerate([list(extra), list(reversed(extra))] * 3):
        save_checkpoint(model, tmp_path / f"m{i}.safetensors", extra_metadata={k: extra[k] for k in order})
        files.append((tmp_path / f"m{i}.safetensors").read_bytes())
    assert all(f == files[0] for f in files)
    assert load_checkpoint(tmp_path / "m5.safetensors").checkpoint_metadata == {**extra}
    for i, order in enumerate([list(extra), list(reversed(extra))]):   # each shard of a sharded checkpoint too
        (tmp_path / f"s{i}").mkdir()
        save_checkpoint(model, tmp_path / f"s{i}" / "m.safetensors.index.json",
                        extra_metadata={k: extra[k] for k in order}, max_shard_bytes=20_000)
    for pad in range(8):   # a header of any length mod 8 (safetensors pads it with up to 7 spaces)
        pair = [{"note": "x" * pad, **extra}, {**dict(reversed(extra.items())), "note": "x" * pad}]
        for i, metadata in enumerate(pair):
            save_checkpoint(model, tmp_path / f"p{i}.safetensors", extra_metadata=metadata)
        assert (tmp_path / "p0.safetensors").read_bytes() == (tmp_path / "p1.safetensors").read_bytes(), pad
    shards = sorted(p.name for p in (tmp_path / "s0").iterdir())
    assert len(shards) > 2 and all((tmp_path / "s0" / name).read_bytes() == (tmp_path / "s1" / name).read_bytes()
                                   for name in shards)


def test_a_shipped_model_loads_by_name_and_dtype_by_its_name(tmp_path, monkeypatch):
    """load_checkpoint finds a shipped model by name as from_pretrained and ecar-sample do, from any folder, and
    takes the dtype names they take."""
    monkeypatch.chdir(tmp_path)
    model = load_checkpoint("ecar-digits32", dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16 and model.config.num_classes == 10
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_checkpoint("ecar-digits32", dtype="fp64")


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_a_fifo_is_refused_before_it_is_read(tmp_path):
    """A FIFO (or a device) at the path: safetensors waited forever on it, for no writer may ever come."""
    with fifo_at(tmp_path / "model.safetensors") as path:
        with pytest.raises(CheckpointError, match=r"model.safetensors: is not a regular file \(a FIFO or a device\)"):
            load_checkpoint(path)
