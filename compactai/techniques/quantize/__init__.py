"""The quantize technique family: int8 (dynamic/static), fp16/bf16, int4 weight-only,
accuracy-aware mixed precision (``quantize``) and quantization-aware training (``qat``)."""

from compactai.techniques.quantize.ort_ptq import Int8Config, preprocess, quantize_int8
from compactai.techniques.quantize.qat import QAT
from compactai.techniques.quantize.sensitivity import SensitivityReport, analyze_sensitivity, plot_sensitivity
from compactai.techniques.quantize.technique import MODES, QualityTargetNotMetError, Quantize

__all__ = [
    "MODES",
    "QAT",
    "Int8Config",
    "QualityTargetNotMetError",
    "Quantize",
    "SensitivityReport",
    "analyze_sensitivity",
    "plot_sensitivity",
    "preprocess",
    "quantize_int8",
]
