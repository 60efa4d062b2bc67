"""The latent cache of latent models, with a tiny random AutoencoderKL: it matches a direct encode, an
interrupted encode resumes, training samples z from it and never runs the encoder."""
import argparse
import re

import numpy as np
import pytest
import torch

from ecar_infer import ECARConfig, load_checkpoint
from ecar_infer.training import latents
from ecar_infer.training.data import DataDraws, DataError, open_npz
from ecar_infer.training.latents import LatentBatches, encode_moments, latent_moments
from ecar_infer.training.train_cli import main
from ecar_infer.training.prepare import open_training_data
from ecar_infer.vae import save_autoencoder
from test_vae import tiny_autoencoder

CONFIG = ECARConfig.preset("ecar-tiny-vae").replace(num_classes=2)   # 32 px images, 4 x 16 x 16 latents


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae():
    return tiny_autoencoder()


@pytest.fixture
def images(tmp_path):
    path = tmp_path / "five.npz"
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    np.savez(path, images=pixels, labels=np.array([0, 1, 0, 1, 1]), class_names=np.array(["cat", "dog"]))
    return open_npz(path, CONFIG, tmp_path / "cache", channels=3)


def test_cache_holds_the_posterior_of_each_image_and_its_mirror(vae, images, tmp_path):
    moments = latent_moments(images, vae, flips=True, cache_dir=tmp_path / "cache", batch=2)
    assert isinstance(moments, np.memmap) and moments.shape == (5, 2, 2, 4, 16, 16)
    x = images.images(np.arange(5))
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        mirrored = vae.encode(x.flip(-1)).latent_dist
    for view, want in ((0, posterior), (1, mirrored)):
        torch.testing.assert_close(torch.from_numpy(moments[:, view, 0].copy()), want.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(moments[:, view, 1].copy()), want.std, rtol=1e-5, atol=1e-5)
    assert latent_moments(images, vae, flips=False, cache_dir=tmp_path / "cache").shape == (5, 1, 2, 4, 16, 16)


def test_the_vae_fingerprint_is_the_same_however_its_path_is_spelt(vae, tmp_path, monkeypatch):
    """diffusers records the path a VAE was loaded from in its config (`_name_or_path`), and its own version:
    the fingerprint hashed them, so `--vae vae` and `--vae /abs/vae` re-encoded the data set and refused to
    resume each other's runs. Weights still count: one changed weight changes it."""
    from ecar_infer.vae import load_autoencoder

    import json

    vae.save_pretrained(tmp_path / "vae")   # a diffusers folder, as --vae takes it
    monkeypatch.chdir(tmp_path)
    spelt = [load_autoencoder(path) for path in ("vae", "./vae", str(tmp_path / "vae"))]
    assert len({json.loads(v.to_json_string())["_name_or_path"] for v in spelt}) > 1
    assert len({latents.vae_fingerprint(v) for v in spelt}) == 1
    other_version = json.dumps({**json.loads(spelt[1].to_json_string()), "_diffusers_version": "0.0.1"})
    monkeypatch.setattr(spelt[1], "to_json_string", lambda: other_version)   # another diffusers wrote it
    assert latents.vae_fingerprint(spelt[1]) == latents.vae_fingerprint(spelt[0])
    with torch.no_grad():
        next(spelt[0].parameters()).view(-1)[0] += 1
    assert latents.vae_fingerprint(spelt[0]) != latents.vae_fingerprint(spelt[1])


def test_an_interrupted_encode_resumes(vae, images, tmp_path, monkeypatch):
    straight = np.array(latent_moments(images, vae, flips=False, cache_dir=tmp_path / "a", batch=2))
    calls, armed = [], [True]

    def interrupted(vae, x):
        calls.append(len(x))
        if len(calls) == 2 and armed:   # interrupt the second batch, once
            armed.clear()
            raise KeyboardInterrupt
        return encode_moments(vae, x)

    monkeypatch.setattr(latents, "encode_moments", interrupted)
    with pytest.raises(KeyboardInterrupt):
        latent_moments(images, vae, flips=False, cache_dir=tmp_path / "b", batch=2)
    calls.clear()
    resumed = latent_moments(images, vae, flips=False, cache_dir=tmp_path / "b", batch=2)
    assert calls == [2, 1]   # images 2-3 and 4: images 0-1 were encoded before the interruption
    np.testing.assert_allclose(resumed, straight, rtol=1e-5, atol=1e-6)


def test_a_cache_of_another_vae_is_not_reused(vae, images, tmp_path):
    """The same images in the same cache folder, encoded by a different VAE: its own latents, not the
    first VAE's."""
    latent_moments(images, vae, flips=False, cache_dir=tmp_path / "cache")
    other = tiny_autoencoder(seed=1)
    got = latent_moments(images, other, flips=False, cache_dir=tmp_path / "cache")
    want = encode_moments(other, images.images(np.arange(5)))
    torch.testing.assert_close(torch.from_numpy(got[:, 0].copy()), want, rtol=1e-5, atol=1e-5)


def test_training_batches_sample_from_the_posterior(vae, images, tmp_path):
    moments = latent_moments(images, vae, flips=True, cache_dir=tmp_path / "cache")
    batches = LatentBatches(moments, images, scaling_factor=0.5, vae_id="")
    draws = batches.draw(torch.Generator().manual_seed(0), 3)
    assert draws.eps.shape == (3, 4, 16, 16) and draws.flip.dtype == torch.bool
    draws = DataDraws(flip=torch.tensor([False, True, True]), eps=draws.eps)
    z = batches.x0(torch.tensor([4, 0, 2]), draws)
    m = torch.from_numpy(moments[[4, 0, 2]][np.arange(3), [0, 1, 1]].copy())
    torch.testing.assert_close(z, 0.5 * (m[:, 0] + m[:, 1] * draws.eps))


def test_ecar_train_on_latents_takes_the_vae_scaling_factor_and_never_encodes_after_the_cache(
        images, tmp_path, monkeypatch, capsys):
    vae = tiny_autoencoder()
    vae.register_to_config(scaling_factor=0.3)
    vae_path = tmp_path / "vae.safetensors"
    save_autoencoder(vae, vae_path)
    config = tmp_path / "config.json"
    config.write_text(CONFIG.to_json())
    common = ["--config", str(config), "--data", images.description, "--vae", str(vae_path), "--flip",
              "--batch-size", "4", "--workdir", str(tmp_path / "run"), "--ckpt-every", "1", "--sample-every", "0",
              "--device", "cpu"]
    main(common + ["--steps", "2", "--until", "1"])
    from diffusers import AutoencoderKL

    def no_encoder(*args, **kwargs):
        raise AssertionError("training ran the VAE encoder")

    monkeypatch.setattr(AutoencoderKL, "encode", no_encoder)
    main(common + ["--steps", "2", "--resume"])
    model = load_checkpoint(tmp_path / "run" / "final.safetensors")
    assert model.config.vae_scaling_factor == pytest.approx(0.3)
    assert model.checkpoint_metadata["class_names"] == '["cat", "dog"]'
    with pytest.raises(SystemExit) as exit_info:
        main(common[:4] + common[6:] + ["--steps", "2", "--resume"])
    assert exit_info.value.code == 2 and "give --vae PATH" in capsys.readouterr().err


def test_ecar_train_draws_its_latents_at_the_vae_scaling_factor(images, tmp_path):
    """The batches ecar-train builds for a latent model scale z by the VAE's scaling factor (0.3 here),
    not by the preset's or by 1."""
    vae = tiny_autoencoder()
    vae.register_to_config(scaling_factor=0.3)
    save_autoencoder(vae, tmp_path / "vae.safetensors")
    args = argparse.Namespace(data=images.description, vae=str(tmp_path / "vae.safetensors"), flip=False,
                              train_size=None)
    data, config, _ = open_training_data(args, CONFIG, torch.device("cpu"), tmp_path / "cache", lambda message: None)
    assert config.vae_scaling_factor == pytest.approx(0.3)
    draws = data.draw(torch.Generator().manual_seed(0), 2)
    m = torch.from_numpy(np.asarray(data.moments[[0, 3], 0]))
    torch.testing.assert_close(data.x0(torch.tensor([0, 3]), draws), 0.3 * (m[:, 0] + m[:, 1] * draws.eps))


def test_a_latent_runs_data_identity_names_its_vae(images, tmp_path):
    """The settings record of a latent run holds the VAE it encodes with: a resume with another VAE (its
    latents are other numbers) is refused as other data, though the images are the same."""
    identities = []
    for seed in (0, 1):
        vae = tiny_autoencoder(seed=seed)
        save_autoencoder(vae, tmp_path / f"vae{seed}.safetensors")
        args = argparse.Namespace(data=images.description, vae=str(tmp_path / f"vae{seed}.safetensors"), flip=False,
                                  train_size=None)
        data, _, _ = open_training_data(args, CONFIG, torch.device("cpu"), tmp_path / "cache", lambda message: None)
        assert data.identity() == {**images.identity(), "vae": latents.vae_fingerprint(vae)}
        identities.append(data.identity())
    assert identities[0]["vae"] != identities[1]["vae"]


def test_a_resume_with_another_vae_is_refused_before_encoding(images, tmp_path, monkeypatch, capsys):
    """Encoding a real data set takes hours: a resume whose --vae is not the run's is refused first."""
    config = tmp_path / "config.json"
    config.write_text(CONFIG.to_json())
    for seed in (0, 1):
        save_autoencoder(tiny_autoencoder(seed=seed), tmp_path / f"vae{seed}.safetensors")
    common = ["--config", str(config), "--data", images.description, "--batch-size", "4", "--steps", "2",
              "--workdir", str(tmp_path / "run"), "--ckpt-every", "1", "--sample-every", "0", "--device", "cpu"]
    main(common + ["--vae", str(tmp_path / "vae0.safetensors"), "--until", "1"])
    from diffusers import AutoencoderKL

    def no_encoder(*args, **kwargs):
        raise AssertionError("the VAE encoder ran before the resume was refused")

    monkeypatch.setattr(AutoencoderKL, "encode", no_encoder)
    with pytest.raises(SystemExit) as exit_info:
        main(common + ["--vae", str(tmp_path / "vae1.safetensors"), "--resume"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "trained on the latents of another VAE" in err and "vae1" in err
    monkeypatch.undo()
    (tmp_path / "run" / "state.safetensors").unlink()   # a record but no state (^C before the first save):
    main(common + ["--vae", str(tmp_path / "vae1.safetensors"), "--until", "1"])   # a new run, with any VAE


def test_a_run_recorded_with_the_old_vae_fingerprint_resumes_with_the_same_vae(images, tmp_path, capsys,
                                                                              monkeypatch):
    """The fingerprint changed on 2026-12-07 (diffusers' "_" keys left out): a run recorded before was refused
    as "trained on the latents of another VAE" when resumed with the very VAE it used. The old fingerprint of
    the same VAE is accepted, and the run keeps it, and its latent cache (not encoded again); another VAE is
    still refused."""
    import json

    from ecar_infer.vae import load_autoencoder

    config = tmp_path / "config.json"
    config.write_text(CONFIG.to_json())
    vae_path = str(tmp_path / "vae0.safetensors")
    save_autoencoder(tiny_autoencoder(seed=0), vae_path)
    common = ["--config", str(config), "--data", images.description, "--batch-size", "4", "--steps", "3",
              "--workdir", str(tmp_path / "run"), "--ckpt-every", "1", "--sample-every", "0", "--device", "cpu",
              "--vae", vae_path]
    real = latents.vae_fingerprint
    with monkeypatch.context() as patch:   # the version before: its fingerprint keyed the record and the cache
        patch.setattr(latents, "vae_fingerprint", lambda vae, before_2026_12_07=False: real(vae, True))
        main(common + ["--until", "1"])
    record_path = tmp_path / "run" / "settings.json"
    record = json.loads(record_path.read_text())
    old = real(load_autoencoder(vae_path), before_2026_12_07=True)
    assert record["data"]["vae"] == old != real(load_autoencoder(vae_path))
    caches = sorted((tmp_path / "run" / "cache").glob("latents-*.npy"))
    assert len(caches) == 1
    main(common + ["--until", "2", "--resume"])
    assert json.loads(record_path.read_text())["data"]["vae"] == old
    assert sorted((tmp_path / "run" / "cache").glob("latents-*.npy")) == caches   # the same cache, reused
    record["data"]["vae"] = "0" * 16   # another VAE's
    record_path.write_text(json.dumps(record))
    with pytest.raises(SystemExit) as exit_info:
        main(common + ["--resume"])
    assert exit_info.value.code == 2 and "trained on the latents of another VAE" in capsys.readouterr().err


def test_a_vae_that_does_not_fit_the_config_says_how_to_fit_it(images, tmp_path, capsys):
    """A VAE of other downsampling than the preset's (here 4x against ecar-tiny-vae's 2x) is refused in one
    line that names the --set fields which make the config fit it."""
    save_autoencoder(tiny_autoencoder(blocks=3), tmp_path / "vae4x.safetensors")
    config = tmp_path / "config.json"
    config.write_text(CONFIG.to_json())
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "--data", images.description, "--vae", str(tmp_path / "vae4x.safetensors"),
              "--steps", "1", "--workdir", str(tmp_path / "run"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert "4x downsampling, but the model expects 4 and 2x" in err and "--set vae_downsample=" in err


def test_a_resume_with_other_settings_is_refused_before_decoding_or_encoding(images, tmp_path, monkeypatch, capsys):
    """A resume that forgets --flip asks for another latent cache (both flips against one), hours of
    encoding on a real data set: it is refused first, naming flip, as one with another --set is."""
    config = tmp_path / "config.json"
    config.write_text(CONFIG.to_json())
    save_autoencoder(tiny_autoencoder(), tmp_path / "vae.safetensors")
    common = ["--config", str(config), "--data", images.description, "--vae", str(tmp_path / "vae.safetensors"),
              "--batch-size", "4", "--steps", "2", "--workdir", str(tmp_path / "run"), "--ckpt-every", "1",
              "--sample-every", "0", "--device", "cpu"]
    main(common + ["--flip", "--until", "1"])
    from diffusers import AutoencoderKL

    def no_encoder(*args, **kwargs):
        raise AssertionError("the VAE encoder ran before the resume was refused")

    monkeypatch.setattr(AutoencoderKL, "encode", no_encoder)
    for change, named in (([], "flip"), (["--flip", "--set", "depth=3", "--cache-dir", str(tmp_path / "new")],
                                          "config.depth")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(common + ["--resume"] + change)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"holds a run with other settings ({named})" in err, err
    monkeypatch.undo()
    main(common + ["--flip", "--resume"])   # the run's own settings resume it


def test_the_rank_that_builds_the_caches_reports_them(images, tmp_path, capsys):
    """Under torchrun the ranks race for a cache's lock and any one of them builds it while the others wait:
    the builder reports its progress, named, even where it is not rank 0 (which waits silently)."""
    from ecar_infer.training.train_cli import parse_args
    from ecar_infer.training.prepare import prepare
    from ecar_infer.training.trainer import TrainSettings

    save_autoencoder(tiny_autoencoder(), tmp_path / "vae.safetensors")
    config = tmp_path / "config.json"
    config.write_text(CONFIG.to_json())
    args = parse_args(["--config", str(config), "--data", images.description, "--vae",
                       str(tmp_path / "vae.safetensors"), "--steps", "1", "--batch-size", "2", "--workdir",
                       str(tmp_path / "run")])
    capsys.readouterr()
    prepare(args, TrainSettings(steps=1, batch_size=2), torch.device("cpu"), 1, 1, lambda message: None)
    assert capsys.readouterr().out == "ecar-train: rank 1: latent cache: 5/5 images encoded (100%)\n"


def test_a_latent_cache_damaged_with_nan_is_named_and_a_rebuilt_one_resumes(images, tmp_path, capsys):
    """A NaN in a finished latent cache (a disk fault, a hand-edited file) made the step that drew it read as
    a diverged run, whose advice (a lower --lr, a new run) could never help. The line now names the cache
    row; deleting the cache and resuming trains on, as a straight run does."""
    save_autoencoder(tiny_autoencoder(), tmp_path / "vae.safetensors")
    config = tmp_path / "config.json"
    config.write_text(CONFIG.to_json())
    common = ["--config", str(config), "--data", images.description, "--vae", str(tmp_path / "vae.safetensors"),
              "--batch-size", "4", "--steps", "3", "--ckpt-every", "1", "--sample-every", "0", "--device", "cpu",
              "--cache-dir", str(tmp_path / "latents")]
    main(common + ["--workdir", str(tmp_path / "straight")])
    (cache,) = (tmp_path / "latents").glob("latents-*.npy")
    main(common + ["--workdir", str(tmp_path / "run"), "--until", "1"])
    whole = cache.read_bytes()
    damaged = np.lib.format.open_memmap(cache, mode="r+")
    damaged[:, :, 0, 0, 3, 5] = np.nan   # every image: step 2 draws one of them
    del damaged
    with pytest.raises(SystemExit) as exit_info:
        main(common + ["--workdir", str(tmp_path / "run"), "--resume"])
    err = capsys.readouterr().err.splitlines()[-1]
    assert exit_info.value.code == 1
    assert re.fullmatch(rf"ecar-train: error: step 2 read data that is not finite \(row \d of the latent cache "
                        rf"{re.escape(str(cache))}\); nothing of it was saved: the last saved state is step 1 in .*\. "
                        rf"Delete the latent cache {cache.name} and --resume: it is built again", err), err
    cache.unlink()
    main(common + ["--workdir", str(tmp_path / "run"), "--resume"])
    assert cache.read_bytes() == whole
    for name in ("final.safetensors", "state.safetensors"):
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


def test_a_vae_that_encodes_an_image_to_nan_is_refused_naming_the_image(images, tmp_path, monkeypatch):
    """A VAE with a NaN weight, or one that overflows on an image, wrote NaN into the cache, which surfaced
    hours later as a diverged run; the encode now refuses it, naming the images."""
    def encode(vae, x):
        moments = encode_moments(vae, x)
        moments[-1, 1, 0, 0, 0] = np.inf   # the last image of each batch: images 1, 3 and 4
        return moments

    monkeypatch.setattr(latents, "encode_moments", encode)
    with pytest.raises(DataError, match=r"five.npz.*: the VAE encodes image\(s\) 1 \(counting from 0\) to NaN or "
                                        r"infinite values; check the VAE's weights, or leave those images out"):
        latent_moments(images, tiny_autoencoder(), flips=False, cache_dir=tmp_path / "cache", batch=2)


def test_an_image_a_later_encode_batch_turns_to_nan_is_named_by_its_own_number(images, tmp_path, monkeypatch):
    """The images are encoded a batch at a time: an image's number is its batch's start plus its place in the
    batch. Counted within the batch, image 3 (the second of the second batch) would be named as image 1, and
    the user would leave the wrong image out."""
    calls = []

    def encode(vae, x):
        calls.append(len(x))
        moments = encode_moments(vae, x)
        if len(calls) == 2:
            moments[1, 0, 0, 0, 0] = np.nan
        return moments

    monkeypatch.setattr(latents, "encode_moments", encode)
    with pytest.raises(DataError, match=r"five.npz.*: the VAE encodes image\(s\) 3 \(counting from 0\) to NaN"):
        latent_moments(images, tiny_autoencoder(), flips=False, cache_dir=tmp_path / "cache", batch=2)
    assert calls == [2, 2]
