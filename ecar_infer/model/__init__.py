from .ar import ARTransformer
from .ecar import ECARModel
from .head import FlowHead

__all__ = ["ECARModel", "ARTransformer", "FlowHead"]
