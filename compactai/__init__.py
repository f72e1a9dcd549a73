"""compactai: scale trained models down to run locally, within a budget measured on this machine.

Public API (everything else is internal and may change)::

    handle = compactai.load_model("model.onnx")            # or an nn.Module + example inputs
    example = compactai.load_example("digits")             # built-in model + task
    figures = compactai.measure(handle, example.task)      # size, latency, memory, energy, quality
"""

from compactai.budget import Budget, parse_budget
from compactai.errors import CompactAIError
from compactai.examples import Example, load_example
from compactai.export import export_onnx
from compactai.measure import MeasureConfig, Measurement, measure
from compactai.models import ModelHandle, TensorSpec, load_model
from compactai.profile import profile_model
from compactai.search import SearchConfig, optimize
from compactai.tasks import Accuracy, CallableMetric, EmbeddingFidelity, Quality, Split, Task
from compactai.techniques import (
    Context,
    Technique,
    available_techniques,
    create_technique,
    register_technique,
)

__version__ = "0.1.0"

__all__ = [
    "Accuracy",
    "Budget",
    "CallableMetric",
    "CompactAIError",
    "Context",
    "EmbeddingFidelity",
    "Example",
    "MeasureConfig",
    "Measurement",
    "ModelHandle",
    "Quality",
    "SearchConfig",
    "Split",
    "Task",
    "Technique",
    "TensorSpec",
    "available_techniques",
    "create_technique",
    "export_onnx",
    "load_example",
    "load_model",
    "measure",
    "optimize",
    "parse_budget",
    "profile_model",
    "register_technique",
]
