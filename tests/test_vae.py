import logging
import re

import pytest
import torch

from conftest import fifo_at, random_model
from ecar_infer import ECARConfig, Sampler, save_checkpoint
from ecar_infer.vae import (CONFIG_KEY, AutoencoderDecoder, IdentityDecoder, VAEError, build_decoder, load_autoencoder,
                            save_autoencoder)

TINY_VAE = ECARConfig.preset("ecar-tiny-vae")  # 32 px, 2x down, 4 latent channels, scaling factor 0.5


def tiny_autoencoder(latent_channels=4, blocks=2, seed=0):
    """A random AutoencoderKL small enough for CPU tests; blocks=2 gives 2x downsampling."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(8,) * blocks, down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, layers_per_block=1, norm_num_groups=8,
                         sample_size=32, scaling_factor=0.5).eval()


@pytest.fixture(scope="module")
def vae():
    return tiny_autoencoder()


@pytest.fixture(scope="module")
def vae_folder(vae, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vae_file(vae, tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "tiny-vae.safetensors"
    save_autoencoder(vae, path)
    return path


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_loads_from_a_diffusers_folder_and_from_a_single_file(vae, vae_folder, vae_file):
    assert same_weights(load_autoencoder(vae_folder), vae)
    loaded = load_autoencoder(vae_file)
    assert same_weights(loaded, vae) and list(loaded.config.block_out_channels) == [8, 8]
    assert [p.name for p in vae_file.parent.iterdir()] == [vae_file.name]  # no temporary file left


def test_unloadable_vaes_raise_vae_error(vae, tmp_path):
    with pytest.raises(VAEError, match="VAE not found"):
        load_autoencoder(tmp_path / "nowhere")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_text("not weights")
    with pytest.raises(VAEError, match="could not load the VAE at .*garbage"):
        load_autoencoder(garbage)
    # a bare state dict without its config cannot be built offline
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, bare)
    with pytest.raises(VAEError, match="must carry its diffusers config"):
        load_autoencoder(bare)


def test_loading_never_touches_the_network(vae, vae_folder, tmp_path, monkeypatch):
    """Nothing is fetched at run time: a single file without its config (which diffusers would build from a
    reference config on the Hub) fails offline, and a file that is no VAE at all is refused before diffusers
    sees it; no host name is ever looked up. huggingface_hub caches what it fetched once per process, so an
    earlier load could hide a lookup here: every diffusers load must also find the offline switch on. Its
    deprecation warning about an argument diffusers passes does not reach the user."""
    import socket
    import warnings

    from diffusers import AutoencoderKL
    from huggingface_hub import constants
    from safetensors.torch import save_file

    looked_up, offline = [], []
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: looked_up.append(host) or [][0])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)   # as a user's process has it
    for name in ("from_single_file", "from_pretrained"):
        monkeypatch.setattr(AutoencoderKL, name, lambda *a, load=getattr(AutoencoderKL, name), **k:
                            offline.append(constants.HF_HUB_OFFLINE) or load(*a, **k))
    checkpoint = tmp_path / "model.safetensors"
    save_checkpoint(random_model(TINY_VAE), checkpoint)
    save_file({"w": torch.ones(2), "v": torch.ones(1)}, tmp_path / "other.safetensors")
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, bare)
    whole = tmp_path / "whole-sd.safetensors"   # a whole Stable Diffusion checkpoint prefixes its VAE's names
    save_file({f"first_stage_model.{k}": v.contiguous() for k, v in vae.state_dict().items()}, whole)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(VAEError, match="model.safetensors: it is an E-CAR checkpoint, not a VAE$"):
            load_autoencoder(checkpoint)
        with pytest.raises(VAEError, match=r"other.safetensors: it holds no VAE weights \(no encoder.conv_in.weight "
                                           r"among its 2 tensor\(s\)\)$"):
            load_autoencoder(tmp_path / "other.safetensors")
        for single_file in (bare, whole):   # the whole checkpoint is a VAE too, for diffusers to read
            with pytest.raises(VAEError, match="must carry its diffusers config"):
                load_autoencoder(single_file)
        assert same_weights(load_autoencoder(vae_folder), vae)
    assert looked_up == [] and offline == [True, True, True]
    assert constants.HF_HUB_OFFLINE is False  # the offline switch is only held while loading
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []


def crafted_file(vae, path, edit_config=None, edit_tensors=None):
    """A single-file VAE as save_autoencoder writes it, with its config and tensors edited."""
    import json

    from safetensors.torch import save_file

    config = json.loads(vae.to_json_string())
    tensors = {k: v.contiguous() for k, v in vae.state_dict().items()}
    (edit_config or (lambda c: None))(config)
    (edit_tensors or (lambda t: None))(tensors)
    save_file(tensors, path, metadata={"format": "pt", CONFIG_KEY: json.dumps(config)})
    return path


def test_a_crafted_single_file_vae_is_refused_before_anything_is_built(vae, tmp_path, monkeypatch):
    """What is built is what the file holds: a config asking for absurd sizes is refused from the tensor
    table alone (the model is built on the meta device, nothing allocated), in bounded time."""
    import time

    def set_(key, value):
        return lambda c: c.__setitem__(key, value)

    larger = "does not match its config: the config describes a model larger than the .* tensor"
    cases = [
        (set_("layers_per_block", 100_000), larger),
        # diffusers builds as many blocks as down_block_types names (2): the widths past them go unused
        (set_("block_out_channels", [8] * 100_000), r"does not match its config: 4 missing tensor\(s\) .*downsamplers"),
        (set_("block_out_channels", [10 ** 9, 10 ** 9]), larger),
        (set_("latent_channels", 10 ** 12), larger),
        (set_("layers_per_block", "1"), "its config cannot be built: "),
        (set_("block_out_channels", [8, -8]), "its config cannot be built: "),
        (set_("latent_channels", 3), r"7 tensor\(s\) with the wrong shape: .*decoder.conv_in.weight is \[8, 4, 3, 3\], expected \[8, 3, 3, 3\]"),
    ]
    for edit, message in cases:
        path = crafted_file(vae, tmp_path / "crafted.safetensors", edit_config=edit)
        start = time.monotonic()
        with pytest.raises(VAEError, match=r"could not load the VAE at .*crafted.safetensors: " + message) as info:
            load_autoencoder(path)
        assert time.monotonic() - start < 20, message
        # the file carries its config: no hint that it should, and the problem is said once
        assert "must carry its diffusers config" not in str(info.value)
        assert str(info.value).count("could not load the VAE") == 1
    # a tensor missing or added, and metadata that is not a config
    extra = crafted_file(vae, tmp_path / "extra.safetensors", edit_tensors=lambda t: t.__setitem__("x", torch.ones(1)))
    with pytest.raises(VAEError, match=r"does not match its config: 1 unexpected tensor\(s\) x"):
        load_autoencoder(extra)
    missing = crafted_file(vae, tmp_path / "missing.safetensors", edit_tensors=lambda t: t.pop("decoder.conv_out.bias"))
    with pytest.raises(VAEError, match=r"does not match its config: 1 missing tensor\(s\) decoder.conv_out.bias"):
        load_autoencoder(missing)
    from safetensors.torch import save_file

    for text in ("[1, 2", "[" * 100_000 + "]" * 100_000):  # cut short; nested past json's recursion limit
        save_file({"w": torch.ones(1)}, tmp_path / "text.safetensors", metadata={"diffusers_config": text})
        with pytest.raises(VAEError, match="diffusers_config metadata is not JSON"):
            load_autoencoder(tmp_path / "text.safetensors")
    for not_an_object in ("[1, 2]", "null", '"config.json"', "3"):
        save_file({"w": torch.ones(1)}, tmp_path / "list.safetensors", metadata={"diffusers_config": not_an_object})
        with pytest.raises(VAEError, match="list.safetensors: its diffusers_config metadata is not a JSON object$"):
            load_autoencoder(tmp_path / "list.safetensors")
    # nothing real is allocated for a refused file: the model is only ever built on the meta device
    from ecar_infer import vae as vae_module

    built = []
    real_build = vae_module.build_within
    monkeypatch.setattr(vae_module, "build_within", lambda *a: built.append(real_build(*a)) or built[-1])
    with pytest.raises(VAEError):
        load_autoencoder(crafted_file(vae, tmp_path / "narrow.safetensors", edit_config=set_("latent_channels", 3)))
    assert len(built) == 1 and all(p.is_meta for p in built[0].parameters())


def crafted_folder(vae, folder, edit_config=None, edit_tensors=None):
    """A diffusers folder as save_pretrained writes it, with its config.json and tensors edited."""
    import json

    from safetensors.torch import load_file, save_file

    vae.save_pretrained(folder)
    config_file, weights = folder / "config.json", folder / "diffusion_pytorch_model.safetensors"
    config, tensors = json.loads(config_file.read_text()), load_file(weights)
    (edit_config or (lambda c: None))(config)
    (edit_tensors or (lambda t: None))(tensors)
    config_file.write_text(json.dumps(config))
    save_file(tensors, weights, metadata={"format": "pt"})
    return folder


def test_a_crafted_diffusers_folder_is_refused_before_anything_is_built(vae, tmp_path, monkeypatch):
    """A folder's config.json is held to its safetensors weights' tensor table as a single file's config is,
    before diffusers builds anything; tensors diffusers would only log (left uninitialised) are refused."""
    import time

    from diffusers import AutoencoderKL

    def set_(key, value):
        return lambda c: c.__setitem__(key, value)

    built = []
    real_from_pretrained = AutoencoderKL.from_pretrained
    monkeypatch.setattr(AutoencoderKL, "from_pretrained",
                        lambda *a, **k: built.append(1) or real_from_pretrained(*a, **k))
    larger = "does not match its config: the config describes a model larger than the .* tensor"
    for edit, message in [(set_("layers_per_block", 100_000), larger), (set_("latent_channels", 10 ** 12), larger),
                          (set_("layers_per_block", "1"), "its config cannot be built: ")]:
        start = time.monotonic()
        with pytest.raises(VAEError, match=r"could not load the VAE at .*crafted: " + message):
            load_autoencoder(crafted_folder(vae, tmp_path / "crafted", edit_config=edit))
        assert time.monotonic() - start < 20, message
    assert built == []  # refused from the tensor table alone: diffusers never built the config
    config_file = tmp_path / "crafted" / "config.json"
    for text, why in [("[1, 2", "its config.json is not JSON"), ("[" * 100_000 + "]" * 100_000, "is not JSON"),
                      ("[1, 2]", "its config.json is not a JSON object$"),
                      (" " * (1 << 20) + "{}", "its config.json is 1,048,578 bytes: not a diffusers config")]:
        config_file.write_text(text)
        with pytest.raises(VAEError, match=why):
            load_autoencoder(tmp_path / "crafted")
    assert built == []
    # diffusers itself would load these with a warning: one weight uninitialised, one tensor ignored
    missing = crafted_folder(vae, tmp_path / "missing", edit_tensors=lambda t: t.pop("decoder.conv_out.bias"))
    with pytest.raises(VAEError, match=r"missing: does not match its config: 1 missing tensor\(s\) decoder.conv_out.bias$"):
        load_autoencoder(missing)
    extra = crafted_folder(vae, tmp_path / "extra", edit_tensors=lambda t: t.__setitem__("x", torch.ones(1)))
    with pytest.raises(VAEError, match=r"extra: does not match its config: 1 unexpected tensor\(s\) x$"):
        load_autoencoder(extra)
    misshaped = crafted_folder(vae, tmp_path / "misshaped",
                               edit_tensors=lambda t: t.__setitem__("encoder.conv_in.weight", torch.ones(8, 3, 1, 1)))
    with pytest.raises(VAEError, match=r"misshaped: 1 tensor\(s\) with the wrong shape: encoder.conv_in.weight is \[8, 3, 1, 1\], "
                                         r"expected \[8, 3, 3, 3\]$"):
        load_autoencoder(misshaped)


@pytest.mark.parametrize("craft", [crafted_file, crafted_folder], ids=["single file", "diffusers folder"])
def test_a_vae_whose_weights_hold_nan_or_inf_is_refused(vae, tmp_path, craft):
    """As a checkpoint's: such weights loaded and decoded every image to NaN (black) without a word."""
    def poison(tensors):
        tensors["decoder.conv_out.weight"] = tensors["decoder.conv_out.weight"].clone()
        tensors["decoder.conv_out.weight"][0, 0, 0, 0] = float("nan")
        tensors["encoder.conv_in.bias"] = torch.full_like(tensors["encoder.conv_in.bias"], float("inf"))

    path = craft(vae, tmp_path / ("bad.safetensors" if craft is crafted_file else "bad"), edit_tensors=poison)
    with pytest.raises(VAEError, match=r"could not load the VAE at .*bad.*: decoder.conv_out.weight, encoder.conv_in.bias "
                                       r"hold NaN or infinite values: the file is corrupt"):
        load_autoencoder(path)


@pytest.mark.parametrize("craft", [crafted_file, crafted_folder], ids=["single file", "diffusers folder"])
def test_a_vae_of_mixed_float_dtypes_decodes(vae, tmp_path, craft):
    """One weight stored in fp16 among fp32 ones loaded, and the decoder cast the VAE only if its first weight
    differed from the dtype asked for: every image was sampled, then decode failed on the dtype."""
    def half(tensors):
        tensors["decoder.conv_out.weight"] = tensors["decoder.conv_out.weight"].half()

    mixed = craft(vae, tmp_path / ("mixed.safetensors" if craft is crafted_file else "mixed"), edit_tensors=half)
    decoder = build_decoder(TINY_VAE, load_autoencoder(mixed), dtype=torch.float32)
    assert {p.dtype for p in decoder.vae.parameters()} == {torch.float32}
    assert decoder.decode(torch.randn(1, 4, 16, 16)).isfinite().all()


def test_a_single_file_vaes_config_metadata_over_a_megabyte_is_refused_unparsed(vae, tmp_path):
    """A 60 MB config cost 1.9 GB, and diffusers printed it whole to stderr."""
    path = crafted_file(vae, tmp_path / "big.safetensors", edit_config=lambda c: c.update(notes="x" * (2 << 20)))
    with pytest.raises(VAEError, match=r"big.safetensors: its diffusers_config metadata is 2,.* characters, which no "
                                       r"diffusers config is"):
        load_autoencoder(path)


@pytest.mark.parametrize("kind", ["single file", "folder"])
def test_a_vae_whose_safetensors_header_is_past_the_bound_is_refused_unparsed(vae, tmp_path, kind):
    """The bound load_checkpoint keeps (16 MiB of header) did not hold for a VAE: safetensors parsed a
    header of up to 100 MB (seconds, hundreds of MB) before anything was checked. Just under it still loads."""
    from safetensors.torch import save_file

    from ecar_infer.checks import MAX_HEADER_BYTES

    def weights(path, notes):
        metadata = {"format": "pt", "notes": notes}
        if kind == "single file":
            metadata[CONFIG_KEY] = vae.to_json_string()
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, path, metadata=metadata)

    def crafted(notes):
        if kind == "single file":
            weights(tmp_path / "v.safetensors", notes)
            return tmp_path / "v.safetensors"
        vae.save_pretrained(tmp_path / "v")
        weights(tmp_path / "v" / "diffusion_pytorch_model.safetensors", notes)
        return tmp_path / "v"

    whose = "its" if kind == "single file" else "its diffusion_pytorch_model.safetensors's"   # the file, named
    with pytest.raises(VAEError, match=rf"could not load the VAE at .*v(\.safetensors)?: {whose} safetensors header "
                                       r"is 16,7\d\d,\d{3} bytes, more than a VAE's header can need \(16,777,216\); it "
                                       r"is not read"):
        load_autoencoder(crafted("x" * MAX_HEADER_BYTES))
    assert load_autoencoder(crafted("x" * (MAX_HEADER_BYTES - 100_000))) is not None


@pytest.mark.parametrize("config", [True, False], ids=["with its config", "without (an LDM file)"])
def test_a_single_file_vaes_header_is_measured_before_safetensors_parses_it(tmp_path, monkeypatch, config):
    """The bound is the header's length, read from the file's first 8 bytes before safetensors parses any of
    it: checked only once safe_open had read the metadata, the oversized header was parsed all the same (and
    a file without a config was never bounded). A header of exactly MAX_HEADER_BYTES is within the bound."""
    import json

    import safetensors

    from ecar_infer.checks import MAX_HEADER_BYTES, oversized_header

    def file_with_header(length):
        header = json.dumps({"__metadata__": {"format": "pt", **({CONFIG_KEY: "{}"} if config else {})}}).encode()
        path = tmp_path / f"{length}.safetensors"
        path.write_bytes(length.to_bytes(8, "little") + header.ljust(length))
        return path

    assert oversized_header(file_with_header(MAX_HEADER_BYTES), "a VAE's header") is None
    monkeypatch.setattr(safetensors, "safe_open", lambda *args, **kwargs: pytest.fail("safetensors parsed it"))
    with pytest.raises(VAEError, match=r"its safetensors header is 16,777,217 bytes, more than a VAE's header can "
                                       r"need \(16,777,216\); it is not read"):
        load_autoencoder(file_with_header(MAX_HEADER_BYTES + 1))


def test_a_crafted_config_beside_pickled_weights_is_refused_before_anything_is_built(vae, tmp_path):
    """The bound held only beside safetensors weights: beside a pickled .bin, diffusers built whatever
    config.json asked for (1 KB of layers_per_block 8000: 22 s and 1.8 GB). A folder of neither kind, or
    without its config.json, is refused: nothing could bound what it builds."""
    import json
    import time

    pickled = tmp_path / "pickled"
    vae.save_pretrained(pickled, safe_serialization=False)
    config = json.loads((pickled / "config.json").read_text())
    (pickled / "config.json").write_text(json.dumps({**config, "layers_per_block": 100_000}))
    start = time.monotonic()
    with pytest.raises(VAEError, match="pickled: does not match its config: the config describes a model larger"):
        load_autoencoder(pickled)
    assert time.monotonic() - start < 20
    (pickled / "diffusion_pytorch_model.bin").rename(pickled / "diffusion_pytorch_model-00001-of-00002.bin")
    with pytest.raises(VAEError, match="pickled: it holds neither diffusion_pytorch_model.safetensors nor"):
        load_autoencoder(pickled)
    (pickled / "config.json").unlink()
    with pytest.raises(VAEError, match="pickled: it has no config.json"):
        load_autoencoder(pickled)


@pytest.mark.parametrize("factor", ["0.18", None, -1.0, float("nan")])
def test_a_vae_whose_scaling_factor_is_no_positive_number_is_refused(vae, tmp_path, factor):
    """Latents are scaled by it: a string was a TypeError in build_decoder, outside any VAEError."""
    import json

    folder = tmp_path / "vae"
    vae.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "scaling_factor": factor}))
    with pytest.raises(VAEError, match=f"vae: its config's scaling_factor is {re.escape(repr(factor))}, not a positive"):
        load_autoencoder(folder)


def test_older_diffusers_folders_still_load(vae, tmp_path):
    """The bounded check must not refuse what diffusers reads: the attention names of folders written before
    diffusers renamed them (the SD VAEs on the Hub), and pickled weights without a safetensors file."""
    renamed = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}

    def old_names(tensors):
        for name in [n for n in tensors if any(new in n for new in renamed)]:
            old = name
            for new, before in renamed.items():
                old = old.replace(new, before)
            tensors[old] = tensors.pop(name)

    folder = crafted_folder(vae, tmp_path / "old-names", edit_tensors=old_names)
    assert same_weights(load_autoencoder(folder), vae)
    pickled = tmp_path / "pickled"
    vae.save_pretrained(pickled, safe_serialization=False)
    assert not (pickled / "diffusion_pytorch_model.safetensors").exists()
    assert same_weights(load_autoencoder(pickled), vae)


def test_decoder_divides_by_the_model_scaling_factor(vae):
    decoder = build_decoder(TINY_VAE, vae)
    z = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        expected = vae.decode(z / 0.5).sample
    images = decoder.decode(z)
    assert isinstance(decoder, AutoencoderDecoder) and images.shape == (2, 3, 32, 32)
    torch.testing.assert_close(images, expected)


def test_slicing_and_tiling_switches(vae):
    z = torch.randn(3, 4, 16, 16)
    plain = build_decoder(TINY_VAE, vae).decode(z)
    sliced = build_decoder(TINY_VAE, vae, slicing=True)
    assert sliced.vae.use_slicing and not sliced.vae.use_tiling
    torch.testing.assert_close(sliced.decode(z), plain, rtol=1e-4, atol=1e-5)
    tiled = build_decoder(TINY_VAE, vae, tiling=True)
    assert tiled.vae.use_tiling and not tiled.vae.use_slicing
    tiled.vae.tile_latent_min_size, tiled.vae.tile_sample_min_size = 8, 16  # force 2x2 tiles on a 16x16 latent
    out = tiled.decode(z)
    assert out.shape == plain.shape and torch.isfinite(out).all()
    tiled.set_memory_options(slicing=False, tiling=False)
    assert not tiled.vae.use_tiling


@pytest.mark.parametrize("latent_channels, blocks, problem", [(3, 2, "3 latent channels"), (4, 3, "4x downsampling")])
def test_mismatched_vae_raises_vae_error(latent_channels, blocks, problem):
    with pytest.raises(VAEError, match=problem):
        build_decoder(TINY_VAE, tiny_autoencoder(latent_channels, blocks))


def test_sd_vae_model_without_a_vae_asks_for_one():
    with pytest.raises(VAEError, match="vae=PATH"):
        build_decoder(TINY_VAE)


@pytest.mark.parametrize("factor", [0.18215, 0.501, 0.5])
def test_scaling_factor_mismatch_warns_and_decodes_with_the_models(caplog, factor):
    """Any difference beyond rounding is reported, and the model's factor (the one it was trained with)
    is the one decoding divides by, whatever the VAE's config says."""
    vae = tiny_autoencoder()
    vae.register_to_config(scaling_factor=factor)
    with caplog.at_level(logging.WARNING, logger="ecar_infer"):
        decoder = build_decoder(TINY_VAE, vae)
    warned = f"scaling_factor {factor} differs from the model's 0.5" in caplog.text
    assert warned == (factor != 0.5), caplog.text
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        expected = vae.decode(z / 0.5).sample
    torch.testing.assert_close(decoder.decode(z), expected)


def test_decoder_runs_in_the_dtype_asked_for():
    vae = tiny_autoencoder()
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        expected = vae.decode(z / 0.5).sample
    decoder = build_decoder(TINY_VAE, vae, dtype=torch.bfloat16)
    assert {p.dtype for p in decoder.vae.parameters()} == {torch.bfloat16}
    images = decoder.decode(z)
    assert images.dtype == torch.float32
    with torch.no_grad():   # the decoder is the bf16 VAE on the scaled latents, exactly
        bf16 = decoder.vae.decode((z / 0.5).to(torch.bfloat16)).sample.float()
    torch.testing.assert_close(images, bf16, rtol=0, atol=0)
    torch.testing.assert_close(images, expected, rtol=3e-2, atol=3e-2)   # bf16's own drift measured 0.019
    back = build_decoder(TINY_VAE, decoder.vae, dtype=torch.float32)
    assert {p.dtype for p in back.vae.parameters()} == {torch.float32}


def test_pixel_kind_is_the_identity(caplog, vae_folder):
    pixel = ECARConfig.preset("ecar-tiny")
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.equal(build_decoder(pixel).decode(x), x)
    with caplog.at_level(logging.WARNING, logger="ecar_infer"):
        assert isinstance(build_decoder(pixel, vae_folder), IdentityDecoder)
    assert "needs no VAE" in caplog.text


def test_sampler_decodes_through_the_vae_to_full_size_images(vae_folder, vae_file, tmp_path):
    model = random_model(TINY_VAE, seed=1)
    ckpt = tmp_path / "tiny-vae-model.safetensors"
    save_checkpoint(model, ckpt)
    from_file = Sampler.from_pretrained(ckpt, device="cpu", vae=vae_file, vae_slicing=True, progress=False)
    from_folder = Sampler.from_pretrained(ckpt, device="cpu", vae=vae_folder, progress=False)
    assert from_file.decoder.vae.use_slicing
    kwargs = dict(class_labels=[0, 9], seed=4, steps_per_stage=2, output_type="np")
    images = from_file.generate(**kwargs).images
    assert images.shape == (2, 32, 32, 3) and images.dtype.name == "uint8"
    assert (images == from_folder.generate(**kwargs).images).all()


def test_random_vae_is_fitted_to_the_config():
    sampler = Sampler.from_config(TINY_VAE, device="cpu", seed=0, progress=False)
    assert list(sampler.decoder.vae.config.block_out_channels) == [128, 256]  # the SD-VAE's first two blocks
    images = sampler.generate([3], steps_per_stage=1, output_type="np").images
    assert images.shape == (1, 32, 32, 3)


def test_a_fifo_is_refused_before_it_is_read(tmp_path):
    """safetensors waited forever on a FIFO, for no writer may ever come."""
    with fifo_at(tmp_path / "vae.safetensors") as path:
        with pytest.raises(VAEError, match=r"vae.safetensors: not a regular file or folder \(a FIFO or a device\)"):
            load_autoencoder(path)
