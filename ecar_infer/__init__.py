"""ecar_infer: an inference-optimized sampling engine for E-CAR multistage continuous AR image models."""
from .config import ConfigError, ECARConfig
from .cpu_memory import keep_freed_memory

__version__ = "0.1.0"

__all__ = ["ECARConfig", "ConfigError", "Sampler", "SampleOutput", "load_checkpoint", "save_checkpoint",
           "CheckpointError", "keep_freed_memory", "__version__"]


def __getattr__(name):
    # Lazy so that `import ecar_infer` stays light (no diffusers import until a sampler is built).
    if name in ("Sampler", "SampleOutput"):
        from . import sampler

        return getattr(sampler, name)
    if name in ("load_checkpoint", "save_checkpoint", "CheckpointError"):
        from . import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'ecar_infer' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
