"""Shipped checkpoints (installed as ecar_infer.weights) and their model cards."""
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT_NAME = "ecar-digits32.safetensors"


def default_checkpoint() -> Path:
    """Path of the checkpoint `ecar-sample` uses when no --ckpt is given (it may not exist yet)."""
    return WEIGHTS_DIR / DEFAULT_CHECKPOINT_NAME
