"""benchmarks/heads_table.py renders saved head-variant reports as one table: every row, in setting order,
with the numbers formatted from the JSON and nothing else."""
import json

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
                 per_class=100, real_isolated_pixels=0.0025)


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
        "real held-out images: accuracy 98.85%, nearest train 11.70.",
        "- shipped.json: 100 images per class and setting, seeds from 10000, 1 thread(s), torch 2.13.0+cpu; "
        "real held-out images: accuracy 98.85%, nearest train 11.70, isolated px 0.00.",
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
