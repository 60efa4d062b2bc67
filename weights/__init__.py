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


def checkpoint_path(ckpt: "str | Path | None") -> Path:
    """A checkpoint argument as a path: an existing file, else the name of a shipped model ("ecar-emoji32"),
    else the path as given (for the loader to report); None is the default model."""
    if ckpt is None:
        return default_checkpoint()
    if not Path(ckpt).exists() and str(ckpt) in shipped_models():
        return shipped_checkpoint(str(ckpt))
    return Path(ckpt)
