"""Hot-path ops for ecar_infer: PyTorch references, optional fast backends, and the per-call dispatch.

Importing this package never fails for want of triton or flash-attn; those backends simply do not
register.
"""
import logging

from . import dispatch, flash, ops, reference, sdpa
from .dispatch import chosen_backends, force_backend

_REFERENCE_OPS = ("stage_attention", "block_causal_attention", "layernorm_modulate", "gated_residual",
                  "gated_residual_layernorm_modulate", "guided_euler_step_", "euler_step_", "upsample_renoise",
                  "clamped_euler_step_")
for _op in _REFERENCE_OPS:
    dispatch.register(_op, "reference", getattr(reference, _op))
for _op in ("stage_attention", "block_causal_attention"):
    dispatch.register(_op, "sdpa", getattr(sdpa, _op), supports=sdpa.supports)

if flash.AVAILABLE:
    dispatch.register("stage_attention", "flash", flash.stage_attention, supports=flash.supports)


def _register_triton() -> None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # not installed, or unusable here: the reference backends still run
        logging.getLogger(__name__).debug("triton backend unavailable: %s", exc)
        return
    from . import triton_adaln, triton_attention, triton_clamp, triton_euler, triton_renoise

    for module in (triton_attention, triton_adaln, triton_euler, triton_renoise, triton_clamp):
        for op in _REFERENCE_OPS:
            if hasattr(module, op):
                dispatch.register(op, "triton", getattr(module, op), supports=getattr(module, "supports_" + op))


_register_triton()

__all__ = ["dispatch", "ops", "reference", "force_backend", "chosen_backends"]
