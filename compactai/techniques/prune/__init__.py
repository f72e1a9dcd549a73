"""The prune technique family: structured pruning (channels, neurons, attention heads, FFN
neurons) on Torch-Pruning's dependency graph, and unstructured magnitude sparsity.

Importing this package registers ``structured_prune`` and ``unstructured_prune``.
"""

from compactai.techniques.prune.engine import Graph, Unit, replay
from compactai.techniques.prune.finetune import FinetuneConfig, classification_loss, embedding_loss, finetune
from compactai.techniques.prune.importance import CRITERIA, get_criterion, register_criterion
from compactai.techniques.prune.structured import StructuredPrune
from compactai.techniques.prune.unstructured import UnstructuredPrune, compressed_size

__all__ = [
    "CRITERIA", "FinetuneConfig", "Graph", "StructuredPrune", "Unit", "UnstructuredPrune", "classification_loss",
    "compressed_size",
    "embedding_loss", "finetune", "get_criterion", "register_criterion", "replay",
]
