"""Shipped checkpoints (installed as ecar_infer.weights) and their model cards."""
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = "ecar-emoji32"   # the color model; "ecar-digits32" stays available by name


def shipped_checkpoint(name: str) -> Path:
    """Path of the shipped checkpoint `name` (e.g. "ecar-digits32"; it may not exist yet)."""
    return WEIGHTS_DIR / f"{name}.safetensors"


def shipped_models() -> list[str]:
    """Names of the checkpoints shipped with the package."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.safetensors"))


def default_checkpoint() -> Path:
    """Path of the checkpoint `ecar-sample` uses when no --ckpt is given (it may not exist yet)."""
    return shipped_checkpoint(DEFAULT_MODEL)
