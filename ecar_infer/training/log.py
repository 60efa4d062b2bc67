"""The training log in the work folder: loss.csv (one row per step) and loss.png (a plot of it). loss_avg is
the trainer's mean loss of the last LOSS_WINDOW (100) steps, or of every step before that many. Also the
pacing of progress lines (at_most_every)."""
from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path
from typing import Callable

from ..atomic import atomic_path

COLUMNS = ("step", "loss", "loss_avg", "lr", "step_seconds", "images_per_s", "tokens_per_s")
PROGRESS_SECONDS = 10.0   # a cache build's progress: one line at most this often (ImageNet: ~100 lines, not 40,000)


def at_most_every(seconds: float, report: Callable[[int, int], None],
                  clock: Callable[[], float] = time.monotonic) -> Callable[[int, int], None]:
    """report(done, total), but only the first call, the last (done == total) and any `seconds` after the
    last one shown."""
    shown = -math.inf

    def paced(done: int, total: int) -> None:
        nonlocal shown
        if done == total or clock() - shown >= seconds:
            shown = clock()
            report(done, total)

    return paced


def whole_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a loss log that hold a number in every column: a row cut short by a killed run, or damaged
    (a field that is no number, one past csv's size limit, which ends the reading), is left out."""
    rows = []
    with open(path, newline="", errors="replace") as f:   # bytes that are no UTF-8: a row that is no number
        try:
            for row in csv.DictReader(f):
                try:
                    int(row["step"]), [float(row[column]) for column in COLUMNS[1:]]
                except (KeyError, TypeError, ValueError):   # TypeError: a field missing (None)
                    continue
                if None not in row:   # no fields beyond the columns
                    rows.append(row)
        except csv.Error:
            pass
    return rows


class TrainLog:
    """Appends one row per step to `path`. A resumed run first drops the rows after the step it resumes
    from (steps an interrupted run logged after its last saved state), so the log has each step once, and
    rows cut short by a killed run or damaged (whole_rows)."""

    def __init__(self, path: str | Path, resume_step: int = 0) -> None:
        self.path = Path(path)
        rows = []
        if resume_step and self.path.exists():
            rows = [r for r in whole_rows(self.path) if int(r["step"]) <= resume_step]
        text = io.StringIO()
        writer = csv.DictWriter(text, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        with atomic_path(self.path) as tmp:
            tmp.write_text(text.getvalue())
        self._file = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._file, COLUMNS)

    def append(self, **row: float) -> None:
        self._writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def plot(self, png: str | Path) -> None:
        """loss.png: the loss of every step and its trailing mean, on a log scale (matplotlib, imported here)."""
        from matplotlib.figure import Figure

        rows = whole_rows(self.path)
        if not rows:
            return
        steps = [int(r["step"]) for r in rows]
        fig = Figure(figsize=(7, 4), dpi=100)
        ax = fig.subplots()
        ax.plot(steps, [float(r["loss"]) for r in rows], lw=0.5, alpha=0.4, label="loss")
        ax.plot(steps, [float(r["loss_avg"]) for r in rows], lw=1.5, label="trailing mean")
        ax.set(xlabel="step", ylabel="loss", yscale="log", title="ecar-train")
        ax.grid(alpha=0.3)
        ax.legend()
        with atomic_path(png) as tmp:
            fig.savefig(tmp, format="png")
