"""What every benchmark records beside its numbers (machine, versions, date) and how it writes them out."""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any, Sequence

import torch

from ecar_infer.atomic import atomic_write_text
from ecar_infer.cpu_memory import freed_memory_kept


def _version(distribution: str) -> str:
    """The installed version, read from package metadata (importing diffusers or triton takes seconds)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def environment(device: torch.device) -> dict[str, Any]:
    """Date, device and versions; on the CPU also the load average, since CPU timings depend on it."""
    env = {
        "date": datetime.date.today().isoformat(),
        "device": device_name(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "triton": _version("triton"),
    }
    if device.type == "cpu":
        env["freed_memory_kept"] = freed_memory_kept()  # ecar_infer/cpu_memory.py
        if hasattr(os, "getloadavg"):
            env["load_average_1m_at_start"] = round(os.getloadavg()[0], 2)
    return env


def environment_line(env: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in env.items())


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(payload: dict[str, Any], markdown: str, json_path: str | None, markdown_path: str | None,
                  arguments: argparse.Namespace | None = None) -> None:
    """Write the JSON payload and the Markdown text where asked (parent folders are created); `arguments`,
    the command's parsed options with every default resolved, go first into the JSON, so that a published
    number's record says how it was made."""
    if arguments is not None:
        payload = {"arguments": vars(arguments), **payload}
    texts = ((json_path, json.dumps(payload, indent=2, default=str) + "\n"), (markdown_path, markdown + "\n"))
    for path, text in texts:
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text)
