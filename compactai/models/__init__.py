"""Model handles and loaders."""

from compactai.models.handle import ModelHandle, TensorSpec
from compactai.models.load import load_model

__all__ = ["ModelHandle", "TensorSpec", "load_model"]
