"""Post-training int8 with ONNX Runtime: graph pre-processing, dynamic and static quantization.

Everything one int8 configuration needs fits in :class:`Int8Config`; ``quantize_int8``
turns a float ONNX file into an int8 one with it. The calibration methods are a small
table (``CALIBRATION_METHODS``) so that adding one is a one-line change.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from compactai.errors import TechniqueError
from compactai.tasks import Split
from compactai.techniques.base import ChoiceParam, IntParam, Param
from compactai.techniques.quantize._common import calibration_reader, name_unnamed_nodes, resolve_reduce_range
from compactai.techniques.quantize.masks import mask_path_nodes, nodes_touching, unbounded_scales

log = logging.getLogger(__name__)

CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}

# The int8 parameters quantize and qat share (one declaration; ``int8_config`` reads them), so
# that QAT and plain PTQ can be compared at the same setting.
INT8_SPACE: dict[str, Param] = {
    "per_channel": ChoiceParam((True, False), True),
    "format": ChoiceParam(("qoperator", "qdq"), "qoperator"),
    "calibration": ChoiceParam(tuple(CALIBRATION_METHODS), "minmax"),
    "calibration_samples": IntParam(1, 100_000, 128),
    "reduce_range": ChoiceParam(("auto", False, True), "auto"),
    "weight_bits": ChoiceParam((8, 4), 8),
}


@dataclass(frozen=True)
class Int8Config:
    """One int8 configuration: dynamic (activations quantized at run time) or static
    (activation ranges calibrated on ``calibration_samples`` rows of the calibration split)."""

    mode: str = "dynamic"  # "dynamic" | "static"
    per_channel: bool = True
    reduce_range: bool = False
    format: str = "qoperator"  # static only: "qoperator" | "qdq"
    calibration: str = "minmax"  # static only: "minmax" | "entropy" | "percentile"
    calibration_samples: int = 128
    weight_bits: int = 8  # 4 = int4 weights (static QDQ only; ONNX opset 21)
    # "uint8": u8 x u8 kernels, which do not saturate on x86 without VNNI, so weights keep all
    # 8 bits there (the alternative on such CPUs is 7-bit int8 weights: reduce_range)
    weight_type: str = "int8"
    const_weights_only: bool = True  # MatMuls of two activations (attention scores) stay float
    nodes_to_exclude: tuple[str, ...] = ()
    op_types: tuple[str, ...] | None = None
    extra_options: dict[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        parts = [self.mode, "per-channel" if self.per_channel else "per-tensor"]
        if self.mode == "static":
            parts += [self.format, self.calibration]
        if self.weight_bits != 8:
            parts.append(f"int{self.weight_bits} weights")
        elif self.weight_type != "int8":
            parts.append(f"{self.weight_type} weights")
        if self.reduce_range:
            parts.append("reduce-range")
        if self.nodes_to_exclude:
            parts.append(f"{len(self.nodes_to_exclude)} float")
        return " ".join(parts)

    def excluding(self, nodes: list[str] | tuple[str, ...]) -> Int8Config:
        return replace(self, nodes_to_exclude=tuple(nodes))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["nodes_to_exclude"] = list(self.nodes_to_exclude)
        return data


def int8_config(params: dict[str, Any], mode: str, **more: Any) -> Int8Config:
    """The :class:`Int8Config` of a technique's ``INT8_SPACE`` parameters, in ``mode``
    (``more``: the other fields, e.g. ``nodes_to_exclude``)."""
    reduce_range = resolve_reduce_range(params["reduce_range"], params["weight_bits"], more.get("weight_type", "int8"))
    return Int8Config(mode=mode, per_channel=params["per_channel"], reduce_range=reduce_range, format=params["format"],
                      calibration=params["calibration"], calibration_samples=params["calibration_samples"],
                      weight_bits=params["weight_bits"], **more)


@contextmanager
def cached_weight_quantization() -> Iterator[None]:
    """Memoize ORT's per-channel weight quantization while a search re-quantizes one model many
    times (it is a Python loop over channels, most of the cost of each call). The function is
    pure, so results are identical; if ORT moves it, this does nothing."""
    try:
        from onnxruntime.quantization import base_quantizer
    except ImportError:  # pragma: no cover
        yield
        return
    original = getattr(base_quantizer, "quantize_data", None)
    if original is None:
        yield
        return
    cache: dict[tuple[Any, ...], tuple[Any, Any, Any]] = {}

    def quantize_data(data: Any, qType: Any, symmetric: Any, *args: Any, **kwargs: Any) -> Any:
        import numpy as np

        array = np.asarray(data)
        key = (
            array.dtype.str,
            array.shape,
            array.tobytes(),
            qType,
            symmetric,
            args,
            tuple(sorted(kwargs.items())),
        )
        if key not in cache:
            cache[key] = original(data, qType, symmetric, *args, **kwargs)
        return tuple(v.copy() if hasattr(v, "copy") else v for v in cache[key])

    base_quantizer.quantize_data = quantize_data
    try:
        yield
    finally:
        base_quantizer.quantize_data = original


def preprocess(source: Path, target: Path, kind: str = "generic", heads: int = 0, hidden: int = 0) -> str:
    """Graph pre-processing before quantizing; returns what was done.

    Transformers go through ONNX Runtime's transformer optimizer with attention fusion only
    (given ``heads``/``hidden`` of the encoder, or, when its layers kept different numbers of
    heads, each layer's own count spelled out in the graph by :func:`~compactai.techniques.
    quantize.equalize.explicit_head_counts`; the Attention op quantizes to the fused QAttention
    kernel), and their residual Add before each LayerNorm is written as Sum (see
    :func:`~compactai.techniques.quantize.equalize.residual_adds_as_sum`). Every model then gets
    ORT's ``quant_pre_process`` (shape inference, constant folding, Conv+BN folding). A step
    that fails is skipped, never fatal: the model is still valid without it.
    """
    from compactai.techniques.quantize.equalize import explicit_head_counts, residual_adds_as_sum

    done = []
    current = source
    explicit = 0
    if kind == "transformer":
        spelled = target.with_name(target.stem + ".heads.onnx")
        try:
            explicit = explicit_head_counts(source, spelled)
            current = spelled
        except Exception as exc:  # noqa: BLE001 an unusual graph: fuse with the model-wide counts, or not at all
            log.info("explicit head counts skipped: %s", exc)
        if not (heads > 0 and hidden > 0):
            heads = hidden = 0  # layers differ (head pruning): the fusion reads each layer's own count
    if kind == "transformer" and (heads > 0 or explicit):
        try:
            from onnxruntime.transformers.fusion_options import FusionOptions
            from onnxruntime.transformers.optimizer import optimize_model

            options = FusionOptions("bert")
            # SkipLayerNorm/BiasGelu/EmbedLayerNorm fusions measured slower here once quantized
            for flag in (
                "enable_skip_layer_norm",
                "enable_bias_skip_layer_norm",
                "enable_bias_gelu",
                "enable_gelu",
                "enable_embed_layer_norm",
            ):
                setattr(options, flag, False)
            fused = target.with_name(target.stem + ".fused.onnx")
            previous = os.getcwd()
            os.chdir(target.parent)  # the optimizer leaves temporary files in the working directory
            try:
                optimized = optimize_model(
                    str(Path(current).resolve()),
                    model_type="bert",
                    num_heads=heads,
                    hidden_size=hidden,
                    opt_level=0,
                    optimization_options=options,
                )
                optimized.save_model_to_file(str(fused.resolve()))
            finally:
                os.chdir(previous)
            if current != source:
                current.unlink(missing_ok=True)
            current = fused
            attention = sum(1 for n in optimized.model.graph.node if n.op_type == "Attention")
            done.append(f"attention fusion ({attention} layers)")
        except Exception as exc:  # noqa: BLE001 the optimizer raises many types on unusual graphs
            log.info("transformer fusion skipped: %s", exc)
    from onnxruntime.quantization import quant_pre_process

    # symbolic shape inference first for transformers; it gives up on some graphs ("Incomplete
    # symbolic shape inference" on the fused MiniLM, whose position ids are Min(512, sequence)),
    # and then the rest of the pre-processing still runs: skipping it all left MiniLM's int8 graph
    # with 37 more nodes (unfolded constants) and 11% slower at batch 1, fidelity identical
    attempts = [True, False] if kind == "transformer" else [False]
    for symbolic in attempts:
        # ORT's pre-processing writes temporary files (symbolic shape inference, external data)
        # into the working directory; run it from the target's folder so nothing lands in the user's.
        previous = os.getcwd()
        os.chdir(target.parent)
        try:
            quant_pre_process(str(current.resolve()), str(target.resolve()), skip_symbolic_shape=not symbolic)
            done.append(f"{'symbolic ' if symbolic else ''}shape inference + ORT optimization")
            break
        except Exception as exc:  # noqa: BLE001 ORT's tooling raises bare Exception
            log.info("quant_pre_process%s failed: %s", " with symbolic shapes" if symbolic else "", exc)
        finally:
            os.chdir(previous)
    else:
        shutil.copyfile(current, target)
    if current != source:
        current.unlink(missing_ok=True)
    name_unnamed_nodes(target)
    if kind == "transformer" and residual_adds_as_sum(target):
        done.append("residual Add as Sum")
    return ", ".join(done) or "none"


class _LogWriter(io.TextIOBase):
    """A text stream whose lines go to ``logger`` at INFO (for libraries that print)."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self.logger.info(line)
        return len(text)


def quantize_int8(
    source: Path,
    target: Path,
    config: Int8Config,
    calibration: Split | None = None,
    input_names: list[str] | None = None,
    notes: dict[str, Any] | None = None,
) -> Path:
    """Quantize the (pre-processed) float ONNX file ``source`` to ``target`` with ``config``.

    Static int8 keeps the attention-mask path in float and checks every scale of the result
    (:mod:`~compactai.techniques.quantize.masks`): tensors with an unbounded scale are kept in
    float and the model quantized again once; if that does not remove them, the model is refused.
    What was kept in float for these reasons is added to ``notes``.
    """
    if config.mode != "static":
        return _quantize_once(source, target, config, calibration, input_names)
    notes = notes if notes is not None else {}
    if config.format == "qoperator" and _has_fused_attention(source):
        # ORT's QOperator quantizer fails after a fused Attention op (it leaves its output
        # uncalibrated); QDQ expresses the same int8 MatMuls and keeps Attention in float
        log.warning("static int8 of %s: QOperator cannot express the fused Attention op; writing QDQ instead",
                    source.name)
        notes["format"] = "qdq: QOperator cannot express the fused Attention op"
        config = replace(config, format="qdq")
    masked = [n for n in mask_path_nodes(source) if n not in config.nodes_to_exclude]
    if masked:
        notes["mask_path_float_nodes"] = masked
        config = config.excluding([*config.nodes_to_exclude, *masked])
    _quantize_once(source, target, config, calibration, input_names)
    bad = unbounded_scales(target)
    if bad:
        log.info("unbounded int8 scales %s; re-quantizing with their ops in float", bad)
        touching = [n for n in nodes_touching(source, list(bad)) if n not in config.nodes_to_exclude]
        notes["unbounded_scale_tensors"] = sorted(bad)
        notes["unbounded_scale_float_nodes"] = touching
        config = config.excluding([*config.nodes_to_exclude, *touching])
        _quantize_once(source, target, config, calibration, input_names)
        still = unbounded_scales(target)
        if still:
            raise TechniqueError(
                f"Static int8 of {source.name} calibrated unbounded scales for {', '.join(sorted(still)[:5])} "
                f"(largest {max(still.values()):.3g}) even with those ops in float, so the int8 model would "
                "ignore its input; refused. Use mode='dynamic', or exclude the ops computing them (--exclude)."
            )
    return target


def _quantize_once(
    source: Path,
    target: Path,
    config: Int8Config,
    calibration: Split | None,
    input_names: list[str] | None,
) -> Path:
    """One call of ORT's dynamic or static quantizer with ``config``."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    extra = {
        "MatMulConstBOnly": config.const_weights_only,
        "DefaultTensorType": onnx.TensorProto.FLOAT,
        **config.extra_options,
    }
    common = {
        "per_channel": config.per_channel,
        "reduce_range": config.reduce_range,
        "nodes_to_exclude": list(config.nodes_to_exclude) or None,
        "op_types_to_quantize": list(config.op_types) if config.op_types else None,
        "extra_options": extra,
    }
    weight_type = QuantType.QUInt8 if config.weight_type == "uint8" else QuantType.QInt8
    try:
        if config.mode == "dynamic":
            if config.weight_bits != 8:
                raise TechniqueError(
                    "Dynamic quantization stores int8 weights only; use mode='static' with format='qdq' for int4."
                )
            quantize_dynamic(str(source), str(target), weight_type=weight_type, **common)
        elif config.mode == "static":
            if calibration is None or input_names is None:
                raise TechniqueError(
                    "Static int8 needs a task with a calibration split; use mode='dynamic' without one."
                )
            if config.weight_bits == 4 and config.format != "qdq":
                raise TechniqueError(
                    "int4 weights (weight_bits=4) need format='qdq'; QOperator kernels are int8 only."
                )
            reader = calibration_reader(calibration, input_names, config.calibration_samples)
            # ORT's histogram calibrators print their progress: into the log, not the user's terminal
            with contextlib.redirect_stdout(_LogWriter(log)):
                quantize_static(
                    str(source),
                    str(target),
                    reader,
                    quant_format=QuantFormat.QDQ if config.format == "qdq" else QuantFormat.QOperator,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt4 if config.weight_bits == 4 else weight_type,
                    calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[config.calibration]),
                    **common,
                )
        else:
            raise TechniqueError(f"Unknown int8 mode '{config.mode}'; use dynamic or static.")
    except TechniqueError:
        raise
    except Exception as exc:  # ORT's quantizer raises RuntimeError/ValueError/onnx errors
        hint = ""
        if config.mode == "static" and config.format == "qoperator" and _has_fused_attention(source):
            # ORT leaves the fused Attention op's output uncalibrated, and the QOperator MatMul after it fails
            hint = " Static QOperator int8 does not handle fused Attention ops; use format='qdq' (--format qdq) or mode='dynamic'."
        raise TechniqueError(
            f"ONNX Runtime could not quantize {source.name} ({config.label()}): {str(exc).splitlines()[0][:300]}.{hint}"
        ) from exc
    return target


def _has_fused_attention(path: Path) -> bool:
    import onnx

    return any(n.op_type == "Attention" for n in onnx.load(str(path), load_external_data=False).graph.node)
