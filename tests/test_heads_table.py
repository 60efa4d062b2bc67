"""benchmarks/heads_table.py renders saved head-variant reports as one table: every row, in setting order,
with the numbers formatted from the JSON and nothing else."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks import heads_table


def row(ckpt, head, steps, cfg, accuracy, fd, asked=None, **extra):
    evals = 3 * steps * (2 if cfg != 1.0 else 1)
    return {"ckpt": ckpt, "head": head, "params": 1000, "steps": steps, "asked_steps": asked or steps, "cfg": cfg,
            "accuracy": accuracy, "fd": fd, "nearest_train": 12.345, "head_evals_per_image": evals,
            "seconds_64": 0.5 * evals, **extra}


def report(rows, **extra):
    return {"rows": rows, "real_heldout_accuracy": 0.9885, "real_nearest_train": 11.7, "threads": 1,
            "per_class": 30, "seed": 10000, "torch": "2.13.0+cpu", **extra}


VARIANTS = report([
    row("runs/a/ema.safetensors", "mlp/flow", 2, 4.0, 0.977, 7.219, training_steps=1200, isolated_pixels=0.19),
    row("runs/a/ema.safetensors", "mlp/flow", 1, 1.0, 0.6233, 5.0599, training_steps=1200, isolated_pixels=0.2),
    row("runs/b/ema.safetensors", "mlp/shortcut", 8, 1.0, 0.4267, 5.048, asked=10),
    row("runs/b/ema.safetensors", "mlp/shortcut", 1, 1.0, 0.38, 5.2993),
])
SHIPPED = report([row("shipped", "attention/flow", 1, 1.0, 0.94, 2.3695, training_steps=13000),
                  row("shipped", "attention/flow", 1, 2.0, 0.998, 3.1, training_steps=13000, cfg_interval=[0.55, 1.0]),
                  row("shipped", "attention/flow", 1, 2.0, 0.999, 3.0573, training_steps=13000)],
                 per_class=100, real_isolated_pixels=0.0025, real_fd=0.7049)


def table_rows(markdown):
    lines = markdown.split("\n\n")[0].splitlines()
    assert lines[0].startswith("| variant | training steps | steps/stage | guidance | accuracy | FD |")
    assert set(lines[1]) <= set("|-")
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_rows_grouped_by_setting_then_model_order():
    rendered = heads_table.render_table([("variants.json", VARIANTS), ("shipped.json", SHIPPED)])
    assert table_rows(rendered) == [
        ["mlp/flow", "1,200", "1", "none", "62.3%", "5.06", "12.35", "0.20", "3", "1.50"],
        ["mlp/shortcut", "-", "1", "none", "38.0%", "5.30", "12.35", "-", "3", "1.50"],
        ["attention/flow", "13,000", "1", "none", "94.0%", "2.37", "12.35", "-", "3", "1.50"],
        ["attention/flow", "13,000", "1", "2", "99.9%", "3.06", "12.35", "-", "6", "3.00"],
        ["attention/flow", "13,000", "1", "2 on sigma 0.55-1", "99.8%", "3.10", "12.35", "-", "6", "3.00"],
        ["mlp/flow", "1,200", "2", "4", "97.7%", "7.22", "12.35", "0.19", "12", "6.00"],
        ["mlp/shortcut", "-", "8 (asked 10)", "none", "42.7%", "5.05", "12.35", "-", "24", "12.00"],
    ]


def test_one_source_line_per_report():
    notes = heads_table.render_table([("variants.json", VARIANTS), ("shipped.json", SHIPPED)]).split("\n\n")[1]
    assert notes.splitlines() == [
        "- variants.json: 30 images per class and setting, seeds from 10000, 1 thread(s), torch 2.13.0+cpu; "
        "real held-out images: accuracy 98.85%, nearest train 11.70 (the judge before 2026-12-07: nearest train "
        "among the classifier's 4,000 images).",
        "- shipped.json: 100 images per class and setting, seeds from 10000, 1 thread(s), torch 2.13.0+cpu; "
        "real held-out images: accuracy 98.85%, nearest train 11.70, FD of as many real images 0.70, "
        "isolated px 0.00.",
    ]


def test_command_line_reads_the_files(tmp_path, capsys):
    paths = []
    for name, data in (("a.json", VARIANTS), ("b.json", SHIPPED)):
        paths.append(str(tmp_path / name))
        (tmp_path / name).write_text(json.dumps(data))
    heads_table.main(paths)
    printed = capsys.readouterr().out
    assert len(table_rows(printed)) == 7 and f"- {paths[1]}: 100 images per class" in printed


def test_head_evaluations_count_each_guided_step_twice():
    from benchmarks.heads import head_evaluations
    from ecar_infer.schedule import plan_steps

    assert head_evaluations(plan_steps(3, 2, 1.0)) == 6
    assert head_evaluations(plan_steps(3, 2, 3.0)) == 12
    assert head_evaluations(plan_steps(3, 2, 3.0, cfg_interval=(0.55, 1.0))) == 10   # stage 2 unguided


def test_isolated_pixels_of_a_hand_built_image():
    from benchmarks.heads import isolated_pixels

    image = np.full((6, 6), -1.0)
    image[0, 0] = image[0, 4] = image[5, 5] = 1.0    # three isolated pixels (two in corners)
    image[2, 2] = image[2, 3] = 0.5                  # a pair side by side
    image[4, 0] = image[5, 1] = 0.2                  # a pair touching at a corner
    image[4, 5] = 0.0                                # mid-grey is background: (5, 5) stays isolated
    images = np.stack([image, np.full((6, 6), -1.0)])[:, None]
    assert isolated_pixels(images) == 1.5                           # per image: 3 and 0
    assert isolated_pixels(images.reshape(2, 36)) == 1.5


def test_a_shortcut_head_takes_the_largest_power_of_two_not_above_the_steps_asked():
    from benchmarks.heads import usable_steps

    shortcut = SimpleNamespace(config=SimpleNamespace(shortcut=True))
    assert [usable_steps(shortcut, n) for n in (1, 2, 3, 4, 7, 8, 10, 16)] == [1, 2, 2, 4, 4, 8, 8, 16]
    assert usable_steps(SimpleNamespace(config=SimpleNamespace(shortcut=False)), 10) == 10


def test_nearest_train_distance_is_the_mean_distance_to_each_images_closest_training_image():
    from benchmarks.heads import nearest_train_distance

    train = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [100.0, 100.0]])   # the last one nearest to none
    images = np.array([[3.0, 4.0], [10.0, 1.0], [0.0, 12.0]])   # nearest: 5, 1 and 2 away
    assert nearest_train_distance(images, train) == pytest.approx(8 / 3)
    assert nearest_train_distance(np.tile(images, (300, 1)), train) == pytest.approx(8 / 3)   # several chunks


def test_models_are_told_apart_by_training_steps_and_grouped_by_the_steps_asked():
    # one run's checkpoint path at two training steps is two models, each placed where its first row is;
    # a shortcut model asked for 10 steps (run at 8) is in the group of 10, after a flow model run at 8
    path = "runs/a/ema.safetensors"
    rows = [row(path, "mlp/shortcut", 8, 1.0, 0.5, 5.0, asked=10, training_steps=1200),
            row("runs/c/ema.safetensors", "mlp/flow", 8, 1.0, 0.6, 4.0),
            row(path, "mlp/shortcut", 8, 1.0, 0.7, 3.0, asked=10, training_steps=22500),
            row("runs/c/ema.safetensors", "mlp/flow", 1, 1.0, 0.2, 8.0),
            row(path, "mlp/shortcut", 1, 1.0, 0.1, 9.0, training_steps=1200),
            row("runs/c/ema.safetensors", "mlp/flow", 10, 1.0, 0.8, 2.0)]
    cells = [r[:3] for r in table_rows(heads_table.render_table([("r.json", report(rows))]))]
    assert cells == [["mlp/shortcut", "1,200", "1"], ["mlp/flow", "-", "1"],
                     ["mlp/flow", "-", "8"],
                     ["mlp/shortcut", "1,200", "8 (asked 10)"], ["mlp/flow", "-", "10"],
                     ["mlp/shortcut", "22,500", "8 (asked 10)"]]


def test_heads_records_each_checkpoints_training_steps_for_the_table(tmp_path, monkeypatch, capsys):
    """The table's "training steps" column comes from benchmarks/heads.py's own report: each row carries the
    checkpoint's training_steps metadata (what ecar-train and a re-issue write), "-" where a file has none."""
    from benchmarks import heads
    from conftest import random_model
    from ecar_infer import ECARConfig, save_checkpoint
    from ecar_infer.training import quality
    from ecar_infer.training.quality import frechet_distance

    small = quality.build_reference(train_size=100, heldout_size=50, split_size=300)
    monkeypatch.setattr(heads, "build_reference", lambda: small)
    config = ECARConfig.preset("ecar-tiny").replace(image_size=32, patch_size=4)
    trained, bare = tmp_path / "trained.safetensors", tmp_path / "bare.safetensors"
    save_checkpoint(random_model(config, seed=1), trained, extra_metadata={"training_steps": "22500"})
    save_checkpoint(random_model(config, seed=2), bare)
    out = tmp_path / "heads.json"
    heads.main(["--ckpt", str(trained), "--ckpt", str(bare), "--steps", "1", "--cfg", "1", "--per-class", "1",
                "--repeats", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [r.get("training_steps") for r in saved["rows"]] == [22500, None]
    # how the times were taken: the repeats, the options, the date, CPU, threads and load (they were missing)
    assert saved["repeats"] == 1 and saved["arguments"]["per_class"] == 1
    assert {"date", "device", "load_average_1m_at_start"} <= set(saved["environment"])
    # the rows' FD (10 images each) is read against the FD of 10 real training images the judge was not fit on
    real = small.features(small.train[100:110])
    assert saved["real_fd"] == pytest.approx(frechet_distance(real, small.features(small.heldout)))
    printed = capsys.readouterr().out
    assert [cells[1] for cells in table_rows(printed[printed.index("| variant"):])] == ["22,500", "-"]


@pytest.mark.parametrize("argv, message", [
    (["--ckpt", "ecar-emoji32"], "--ckpt ecar-emoji32: a pixel model of 32x32 images with 3 channel(s) and 9 "
                                 "classes; this table judges digits32 models"),
    (["--ckpt", "{tmp}/missing.safetensors"], "missing.safetensors: file not found"),
    (["--ckpt", "ecar-digits32", "--steps", "1,two"], "--steps 1,two: give positive numbers separated by commas"),
    (["--ckpt", "ecar-digits32", "--cfg", "0"], "--cfg 0: give positive numbers separated by commas"),
    (["--ckpt", "ecar-digits32", "--cfg", "4,nan"], "--cfg 4,nan: give positive numbers separated by commas"),
    (["--ckpt", "{tmp}/latent.safetensors"], "latent.safetensors: a sd-vae model of 32x32 images with 4 channel(s)"),
])
def test_heads_refuses_a_request_it_cannot_judge_before_fitting_the_reference(tmp_path, monkeypatch, capsys,
                                                                              argv, message):
    """A model that is not a digits32 model, an unreadable checkpoint or a malformed step list: a usage error
    (status 2) at once, not a traceback after the reference classifier's minute of fitting (a latent model's
    was a VAEError traceback: it was refused only once loaded, which wants its VAE)."""
    from conftest import random_model

    from benchmarks import heads
    from ecar_infer import ECARConfig, save_checkpoint

    latent = ECARConfig.preset("ecar-tiny").replace(latent_kind="sd-vae", latent_channels=4, vae_downsample=2,
                                                    image_size=32)
    save_checkpoint(random_model(latent, seed=0), tmp_path / "latent.safetensors")
    monkeypatch.setattr(heads, "build_reference", lambda: pytest.fail("the reference was built"))
    with pytest.raises(SystemExit) as exit_:
        heads.main([a.format(tmp=tmp_path) for a in argv] + ["--out", str(tmp_path / "heads.json")])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "heads.json").exists()
