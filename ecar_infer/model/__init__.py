"""The E-CAR model family (docs/MODEL.md): the block-causal AR trunk, the per-stage flow head, and ECARModel
that joins them."""
from .ar import ARTransformer
from .ecar import ECARModel
from .head import FlowHead

__all__ = ["ECARModel", "ARTransformer", "FlowHead"]
