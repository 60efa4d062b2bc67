"""benchmarks/guidance.py: guidance settings side by side on the same seed sets, on any data set."""
import argparse
import json
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks import guidance
from conftest import random_model
from ecar_infer import ECARConfig, Sampler, save_checkpoint
from ecar_infer.training import quality
from test_quality_any_data import colour_classes


def test_setting_spec():
    assert guidance.setting_spec("2:0.55,0.9") == (2.0, (0.55, 0.9))
    assert guidance.setting_spec("3.5:0,1") == (3.5, (0.0, 1.0))
    for bad in ("2", "2:0.9,0.55", "x:0,1", "2:0,1,1"):
        with pytest.raises(argparse.ArgumentTypeError, match="give W:LO,HI"):
            guidance.setting_spec(bad)


def test_summary_means_each_setting_over_its_seed_sets():
    rows = [{"cfg": 2.0, "interval": [0.0, 1.0], "accuracy": a, "fd": f, "memorisation_nearest": m}
            for a, f, m in ((0.9, 2.0, 0.5), (1.0, 4.0, 0.25))]
    rows.insert(1, {"cfg": 2.0, "interval": [0.55, 0.9], "accuracy": 0.8, "fd": 1.0, "memorisation_nearest": 0.25})
    first, second = guidance.summarise(rows)
    assert (first["cfg"], first["interval"], first["seed_sets"]) == (2.0, [0.0, 1.0], 2)
    assert first["accuracy"] == pytest.approx(0.95) and first["fd"] == pytest.approx(3.0)
    assert first["memorisation_nearest"] == pytest.approx(0.375)
    assert first["fd_range"] == [2.0, 4.0] and first["accuracy_range"] == [0.9, 1.0]
    assert (second["interval"], second["seed_sets"], second["fd"]) == ([0.55, 0.9], 1, 1.0)


def test_end_to_end_on_a_tiny_model(tmp_path, capsys):
    for name, (n, seed) in {"train": (30, 0), "heldout": (10, 1)}.items():
        images, labels = colour_classes(n, seed)
        np.savez(tmp_path / f"{name}.npz", images=images, labels=labels, class_names=np.array(["r", "g", "b"]))
    config = ECARConfig.preset("ecar-tiny").replace(latent_channels=3, num_classes=3)
    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(random_model(config, seed=1), ckpt, extra_metadata={"recommended_steps": "1"})
    out = tmp_path / "g.json"
    guidance.main(["--ckpt", str(ckpt), "--data", str(tmp_path / "train.npz"),
                   "--heldout", str(tmp_path / "heldout.npz"), "--setting", "2:0,1", "--setting", "2:0.55,0.9",
                   "--seed-sets", "2", "--per-class", "4", "--steps", "2", "--out", str(out)])
    report = json.loads(out.read_text())
    assert [(r["cfg"], r["interval"], r["seed"]) for r in report["rows"]] == [
        (2.0, [0.0, 1.0], 10_000), (2.0, [0.55, 0.9], 10_000), (2.0, [0.0, 1.0], 20_000), (2.0, [0.55, 0.9], 20_000)]
    # the same seeds, other guidance: other images, so other numbers
    assert report["rows"][0]["fd"] != report["rows"][1]["fd"]
    assert [s["seed_sets"] for s in report["summary"]] == [2, 2] and report["steps_per_stage"] == 2
    assert "guidance 2 on sigma 0.55-0.9: accuracy" in capsys.readouterr().out
    # a row's numbers are those of its setting's images at --steps, against the held-out images
    sampler = Sampler.from_pretrained(str(ckpt), device="cpu", progress=False)
    ref = quality.reference_from_data(str(tmp_path / "train.npz"), str(tmp_path / "heldout.npz"), sampler.config,
                                      str(tmp_path / "cache"))
    row = report["rows"][3]
    images, labels = quality.generate(sampler, 4, 20_000, cfg_scale=2.0, cfg_interval=(0.55, 0.9), steps_per_stage=2)
    assert row["accuracy"] == ref.accuracy(images, labels)
    assert row["fd"] == pytest.approx(quality.frechet_distance(ref.features(images), ref.features(ref.heldout)))
    # ... read against the FD of as many real images (12 a set; a seeded draw: this classifier saw every one)
    real = ref.train[np.random.default_rng(0).permutation(len(ref.train))[:12]]
    assert report["real_fd_images"] == 12
    assert report["real_fd"] == pytest.approx(quality.frechet_distance(ref.features(real), ref.features(ref.heldout)))


def test_digits32_is_judged_against_its_whole_training_split(monkeypatch):
    """On digits32 the nearest-neighbour share searches the whole training split (the 20,000 images
    ecar-train reads), and the real FD draws images the classifier did not see: the reference is
    build_reference's default, not edit_quality's 4,000-image split (which searched a fifth of the images a
    model could have copied)."""
    class Built(Exception):
        pass

    calls = []

    def build_reference(*args, **kwargs):
        calls.append((args, kwargs))
        raise Built

    monkeypatch.setattr(quality, "build_reference", build_reference)
    with pytest.raises(Built):
        guidance.main(["--ckpt", "ecar-digits32", "--setting", "1:0,1", "--seed-sets", "1", "--per-class", "1"])
    assert calls == [((), {})]


def test_data_of_other_classes_than_the_models_is_refused(tmp_path, capsys):
    """The benchmark passes the model's class names on: data of its classes in another order is a usage error
    (class k of the samples would be judged as another class)."""
    from test_quality_any_data import checkpoint_of_classes, colour_npz

    ckpt = checkpoint_of_classes(tmp_path / "gbr.safetensors", ["green", "blue", "red"])
    train, held = colour_npz(tmp_path, "train", 8, 0), colour_npz(tmp_path, "heldout", 4, 1)
    with pytest.raises(SystemExit) as exit_info:
        guidance.main(["--ckpt", ckpt, "--data", train, "--heldout", held, "--setting", "2:0,1",
                       "--out", str(tmp_path / "g.json")])
    assert exit_info.value.code == 2
    assert "but the model's are green, blue, red" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "g.json").exists()


class HeldoutImages:
    """A stand-in sampler that returns the reference's held-out images of the classes asked for (images a
    model did not copy, so the pair share and the nearest-neighbour share of them differ)."""

    def __init__(self, ref):
        self.ref, self.config, self.asked = ref, SimpleNamespace(num_classes=3), []

    def generate(self, labels, seed, output_type, progress, **settings):
        self.asked.append(settings)
        labels = np.asarray(labels)
        rows = np.concatenate([np.flatnonzero(self.ref.heldout_labels == c)[:(labels == c).sum()] for c in range(3)])
        images = self.ref.heldout[rows].reshape(-1, 3, 16, 16).transpose(0, 2, 3, 1)
        return SimpleNamespace(images=np.rint((images + 1) * 127.5).astype(np.uint8))


def test_seed_sets_that_would_overlap_are_refused(tmp_path, capsys):
    """Set k samples seeds k*10,000 + i for its i-th image: a set of more than 10,000 images would share seeds
    with the next, and the range over the sets would look narrower than it is."""
    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(random_model(ECARConfig.preset("ecar-tiny")), ckpt)         # 10 classes
    with pytest.raises(SystemExit) as exit_:
        guidance.main(["--ckpt", str(ckpt), "--setting", "2:0,1", "--per-class", "1001"])
    assert exit_.value.code == 2
    assert "a seed set of 10010 images (10 classes x --per-class 1001) would overlap the next" in capsys.readouterr().err


def test_a_row_judges_the_images_of_its_own_setting():
    train, held = colour_classes(30, 0), colour_classes(10, 1)
    unit = lambda images: images.transpose(0, 3, 1, 2) / 127.5 - 1   # noqa: E731
    ref = quality.fit_reference(unit(train[0]), train[1], unit(held[0]), held[1])
    real_features = ref.features(ref.heldout)
    sampler = HeldoutImages(ref)
    row = guidance.measure(sampler, ref, real_features, 2.5, (0.55, 0.9), seed=7, per_class=6, steps=(1, 2, 2))
    assert sampler.asked == [{"cfg_scale": 2.5, "cfg_interval": (0.55, 0.9), "steps_per_stage": (1, 2, 2)}]
    images = ref.heldout[np.concatenate([np.flatnonzero(ref.heldout_labels == c)[:6] for c in range(3)])]
    labels = np.repeat(np.arange(3), 6)
    nearest = quality.memorisation(images, labels, ref, "nearest")
    assert nearest != quality.memorisation(images, labels, ref, "pair")   # the two thresholds tell apart here
    assert row == {"cfg": 2.5, "interval": [0.55, 0.9], "seed": 7, "accuracy": ref.accuracy(images, labels),
                   "fd": pytest.approx(quality.frechet_distance(ref.features(images), real_features)),
                   "memorisation_nearest": nearest}


def test_request_time_cases_and_report(ckpt, tmp_path, capsys):
    from benchmarks import request_time

    assert request_time.case_spec("a.safetensors") == {"ckpt": "a.safetensors", "settings": {}}
    assert request_time.case_spec("m:2:1,2,2:0.55,0.9") == {
        "ckpt": "m", "settings": {"cfg_scale": 2.0, "steps_per_stage": (1, 2, 2), "cfg_interval": (0.55, 0.9)}}
    for bad in ("", "m:x", "m:2:0", "m:2:2:0.9,0.1", "m:2:2:0,1:extra"):
        with pytest.raises(argparse.ArgumentTypeError):
            request_time.case_spec(bad)
    out = tmp_path / "t.json"
    request_time.main(["--case", f"{ckpt}:1:2", "--case", f"{ckpt}:3:2:0.55,0.9", "--rounds", "2", "--out", str(out)])
    report = json.loads(out.read_text())
    first, second = report["cases"]
    assert first["resolved"] == {"max_guidance": 1.0, "steps": [2, 2, 2], "guided_steps": [0, 0, 0]}
    assert second["resolved"] == {"max_guidance": 3.0, "steps": [2, 2, 2], "guided_steps": [1, 2, 0]}
    assert len(first["all_s"]) == 1 and first["speedup_vs_first"] == 1.0
    assert "1.00x" in capsys.readouterr().out
