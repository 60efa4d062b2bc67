"""Hot-path ops for ecar_infer: PyTorch references, optional fast backends, and the backend dispatch.

Importing this package never fails for want of triton or flash-attn; those backends simply do not
register. Triton is imported only where its kernels can run (a CUDA device, or TRITON_INTERPRET=1 for
the tests): elsewhere importing it would only cost start-up time.
"""
import logging
import os

import torch

from . import dispatch, flash, ops, reference, sdpa
from .dispatch import chosen_backends, clear_chosen_backends, force_backend

_REFERENCE_OPS = ("stage_attention", "block_causal_attention", "layernorm_modulate",
                  "gated_residual_layernorm_modulate", "guided_euler_step_", "euler_step_", "upsample_renoise",
                  "clamped_euler_step_")
for _op in _REFERENCE_OPS:
    dispatch.register(_op, "reference", getattr(reference, _op))
for _op in ("stage_attention", "block_causal_attention"):
    dispatch.register(_op, "sdpa", getattr(sdpa, _op), accepts=sdpa.accepts)

if flash.AVAILABLE:
    dispatch.register("stage_attention", "flash", flash.stage_attention, supports=flash.supports,
                      accepts=flash.accepts)


# triton.jit decides when a kernel is decorated (at import) whether it is interpreted, so this is read
# once, before any kernel module is imported.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _register_triton() -> None:
    if not (INTERPRETING or torch.cuda.is_available()):
        return
    try:
        import triton  # noqa: F401
    except Exception as exc:  # not installed, or unusable here: the reference backends still run
        logging.getLogger(__name__).debug("triton backend unavailable: %s", exc)
        return
    from . import triton_adaln, triton_attention, triton_clamp, triton_euler, triton_renoise, triton_support

    for module in (triton_attention, triton_adaln, triton_euler, triton_renoise, triton_clamp):
        for op in _REFERENCE_OPS:
            if hasattr(module, op):
                dispatch.register(op, "triton", getattr(module, op), supports=getattr(module, "supports_" + op),
                                  accepts=triton_support.accepts)


_register_triton()

__all__ = ["dispatch", "ops", "reference", "force_backend", "chosen_backends", "clear_chosen_backends"]
