"""benchmarks/guidance.py: guidance settings side by side on the same seed sets, on any data set."""
import argparse
import json

import numpy as np
import pytest

from benchmarks import guidance
from conftest import random_model
from ecar_infer import ECARConfig, save_checkpoint
from test_quality_any_data import colour_classes


def test_setting_spec():
    assert guidance.setting_spec("2:0.55,0.9") == (2.0, (0.55, 0.9))
    assert guidance.setting_spec("3.5:0,1") == (3.5, (0.0, 1.0))
    for bad in ("2", "2:0.9,0.55", "x:0,1", "2:0,1,1"):
        with pytest.raises(argparse.ArgumentTypeError, match="give W:LO,HI"):
            guidance.setting_spec(bad)


def test_summary_means_each_setting_over_its_seed_sets():
    rows = [{"cfg": 2.0, "interval": [0.0, 1.0], "accuracy": a, "fd": f, "memorisation_nearest": 0.5}
            for a, f in ((0.9, 2.0), (1.0, 4.0))]
    rows.insert(1, {"cfg": 2.0, "interval": [0.55, 0.9], "accuracy": 0.8, "fd": 1.0, "memorisation_nearest": 0.25})
    first, second = guidance.summarise(rows)
    assert (first["cfg"], first["interval"], first["seed_sets"]) == (2.0, [0.0, 1.0], 2)
    assert first["accuracy"] == pytest.approx(0.95) and first["fd"] == pytest.approx(3.0)
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
