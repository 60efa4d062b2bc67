"""Hot-path ops for ecar_infer: PyTorch references, optional fast backends, and the per-call dispatch.

Importing this package never fails for want of triton or flash-attn; those backends simply do not
register.
"""
from . import dispatch, ops, reference, sdpa
from .dispatch import chosen_backends, force_backend

_REFERENCE_OPS = ("stage_attention", "block_causal_attention", "layernorm_modulate", "gated_residual",
                  "gated_residual_layernorm_modulate", "guided_euler_step_", "euler_step_", "upsample_renoise")
for _op in _REFERENCE_OPS:
    dispatch.register(_op, "reference", getattr(reference, _op))
for _op in ("stage_attention", "block_causal_attention"):
    dispatch.register(_op, "sdpa", getattr(sdpa, _op), supports=sdpa.supports)

__all__ = ["dispatch", "ops", "reference", "force_backend", "chosen_backends"]
