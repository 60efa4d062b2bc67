"""One Markdown table from one or more saved reports of benchmarks/heads.py (issue 13's comparison table).

    python -m benchmarks.heads_table docs/heads/digits32-1200-steps.json docs/heads/digits32-shipped-22500-steps.json

Rows are grouped by setting (steps per stage as asked, then guidance and its sigma interval), and within a setting keep the
order in which the models first appear in the files, so the variants at one setting stand side by side.
A shortcut head samples only a power of two of steps: where it ran fewer steps than asked, the steps
cell says so ("8 (asked 10)"). The training steps column comes from a row's "training_steps" field
("-" where a report does not record it). Under the table, a list with one item per file: its sample
size, seeds, threads and the real held-out images' reference values, as the report records them.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

HEADERS = ("variant", "training steps", "steps/stage", "guidance", "accuracy", "FD", "nearest train",
           "isolated px", "head evals/image", "s / 64 images")


def _model_key(row: dict[str, Any]) -> tuple[str, str, Any]:
    return row["ckpt"], row["head"], row.get("training_steps")


def sorted_rows(reports: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every report's rows, ordered by (asked steps, guidance, the model's first appearance)."""
    rows = [row for report in reports for row in report["rows"]]
    first_seen: dict[tuple[str, str, Any], int] = {}
    for row in rows:
        first_seen.setdefault(_model_key(row), len(first_seen))
    return sorted(rows, key=lambda r: (r["asked_steps"], r["cfg"], tuple(r.get("cfg_interval") or ()),
                                       first_seen[_model_key(r)]))


def render_row(row: dict[str, Any]) -> list[str]:
    steps = str(row["steps"]) + (f" (asked {row['asked_steps']})" if row["steps"] != row["asked_steps"] else "")
    trained = f"{row['training_steps']:,}" if "training_steps" in row else "-"
    guidance = "none" if row["cfg"] == 1.0 else f"{row['cfg']:g}"
    if row.get("cfg_interval"):
        guidance += " on sigma {:g}-{:g}".format(*row["cfg_interval"])
    speckle = f"{row['isolated_pixels']:.2f}" if "isolated_pixels" in row else "-"
    return [row["head"], trained, steps, guidance, f"{100 * row['accuracy']:.1f}%", f"{row['fd']:.2f}",
            f"{row['nearest_train']:.2f}", speckle, str(row["head_evals_per_image"]), f"{row['seconds_64']:.2f}"]


def source_line(name: str, report: dict[str, Any]) -> str:
    real = (f"real held-out images: accuracy {100 * report['real_heldout_accuracy']:.2f}%, "
            f"nearest train {report['real_nearest_train']:.2f}")
    if "real_fd" in report:
        real += f", FD of as many real images {report['real_fd']:.2f}"
    else:   # written before the judge was mended on 2026-12-07 (ecar_infer/training/quality.py)
        real += " (the judge before 2026-12-07: nearest train among the classifier's 4,000 images)"
    if "real_isolated_pixels" in report:
        real += f", isolated px {report['real_isolated_pixels']:.2f}"
    return (f"- {name}: {report['per_class']} images per class and setting, seeds from {report['seed']}, "
            f"{report['threads']} thread(s), torch {report['torch']}; {real}.")


def render_table(reports: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """reports: (name, report) pairs -> the Markdown table and one source line per report."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(render_row(r)) + " |" for r in sorted_rows([report for _, report in reports])]
    return "\n".join(lines) + "\n\n" + "\n".join(source_line(name, report) for name, report in reports)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.heads_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", help="JSON reports written by python -m benchmarks.heads --out")
    args = parser.parse_args(argv)
    reports = []
    for path in args.reports:
        try:
            report = json.loads(Path(path).read_text())
            if not isinstance(report, dict) or not isinstance(report.get("rows"), list):
                raise ValueError("no rows")
        except (OSError, ValueError) as err:
            parser.error(f"{path}: not a report of python -m benchmarks.heads ({err})")
        reports.append((path, report))
    print(render_table(reports))


if __name__ == "__main__":
    main()
