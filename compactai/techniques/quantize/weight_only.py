"""Weight-only low-bit: block-wise int4 MatMul weights (ONNX Runtime's MatMulNBits).

Activations stay float; each block of ``block_size`` weights along the reduction axis has
its own scale (and zero point unless symmetric). Only MatMuls with a constant weight whose
reduction dimension is at least ``block_size`` wide are converted; the rest stay float.
"""

from __future__ import annotations

import logging
from pathlib import Path

from compactai.errors import TechniqueError


def quantize_int4(
    source: Path,
    target: Path,
    *,
    block_size: int = 32,
    symmetric: bool = True,
    accuracy_level: int = 4,
    nodes_to_exclude: list[str] | None = None,
) -> int:
    """Write the int4 model to ``target``; returns how many MatMuls were converted."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level
    )
    try:
        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(source)),
            block_size=block_size,
            is_symmetric=symmetric,
            accuracy_level=accuracy_level,
            nodes_to_exclude=nodes_to_exclude or [],
            algo_config=config,
        )
        quantizer.process()
        model = quantizer.model.model
    except Exception as exc:
        raise TechniqueError(
            f"ONNX Runtime could not apply int4 weight-only quantization: {str(exc).splitlines()[0][:300]}"
        ) from exc
    converted = sum(1 for n in model.graph.node if n.op_type == "MatMulNBits")
    if converted == 0:
        raise TechniqueError(
            "int4 weight-only quantization found no MatMul with a constant weight to convert (it targets linear and "
            "transformer layers, not convolutions). Use mode='static' or 'dynamic' for this model."
        )
    onnx.save(model, str(target))
    return converted
