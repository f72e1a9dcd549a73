"""Shared pieces of the quantize family: quantizable ops, calibration data, quick evaluation
and measured latency (the figures every decision in this family rests on)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compactai.measure.environment import int8_kernels_saturate
from compactai.models.handle import ModelHandle
from compactai.tasks import Quality, Split, Task, sample_vectors, spread_ratio, trim_padding

# Ops whose weights ORT's int8 quantizers store as integers.
WEIGHT_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")

# (handle of an ONNX model) -> batch-1 latency p50 in ms. Injectable so that tests can
# make the guard rail's decision deterministic; the default measures on ONNX Runtime.
LatencyProbe = Callable[[ModelHandle], float]


def measured_latency_ms(
    handle: ModelHandle, batch: int = 1, queries: int = 60, seconds: float = 0.3, threads: int | None = None
) -> float:
    """Median latency of ``handle`` on ONNX Runtime at ``batch`` (example inputs tiled), in ms."""
    from compactai.measure import batch_feeds, make_runner, measure_latency

    runner = make_runner(handle, "onnxruntime", threads)
    feeds = {k: v[:1] for k, v in handle.example_inputs.items()}
    if batch > 1:
        feeds = batch_feeds(feeds, batch)
        queries = max(5, queries // 10)
    return measure_latency(runner, feeds, min_queries=queries, min_seconds=seconds, warmup=5).p50_ms


def default_probe(threads: int | None = None) -> LatencyProbe:
    return lambda handle: measured_latency_ms(handle, threads=threads)


def weight_nodes(model_path: Path, op_types: tuple[str, ...] = WEIGHT_OPS) -> list[str]:
    """Names of the nodes of ``op_types`` whose weight (input 1) is a constant initializer,
    in graph order: the ops a mixed-precision search chooses between."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    constants = {i.name for i in model.graph.initializer}
    constants |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    return [
        n.name
        for n in model.graph.node
        if n.op_type in op_types and len(n.input) > 1 and n.input[1] in constants
    ]


def name_unnamed_nodes(model_path: Path) -> None:
    """Give every node a unique name (ORT's quantizer excludes and reports nodes by name)."""
    import onnx

    model = onnx.load(str(model_path))
    seen: set[str] = set()
    changed = False
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
            changed = True
        seen.add(node.name)
    if changed:
        onnx.save(model, str(model_path))


class SplitReader:
    """ORT CalibrationDataReader over the first ``samples`` rows of a split, in small batches
    (padding trimmed per batch, so sequence models see their real lengths)."""

    def __init__(self, split: Split, input_names: list[str], samples: int, batch_size: int = 8) -> None:
        count = min(samples, len(split))
        if count > batch_size:  # ORT's entropy/percentile calibrators stack batches: all must be the same size
            count -= count % batch_size
        self.part = split.take(count)
        self.input_names = input_names
        self.batch_size = batch_size
        self._iter: Iterator[dict[str, np.ndarray]] | None = None

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for feeds, _ in self.part.batches(self.batch_size):
            feeds = trim_padding(feeds)
            yield {name: np.ascontiguousarray(feeds[name]) for name in self.input_names}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            self._iter = self._batches()
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = None


def calibration_reader(split: Split, input_names: list[str], samples: int) -> Any:
    """A real ``onnxruntime.quantization.CalibrationDataReader`` wrapping :class:`SplitReader`."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(SplitReader, CalibrationDataReader):
        pass

    return Reader(split, input_names, samples)


@dataclass
class Evaluator:
    """Scores ONNX files on one split of the task (a fixed subset, so that cached reference
    outputs are reused across the many candidates a search tries)."""

    task: Task
    handle: ModelHandle
    split_name: str = "validation"
    samples: int | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        split = self.task.split(self.split_name)
        self.split = split.take(self.samples) if self.samples and self.samples < len(split) else split

    def __call__(self, path: Path) -> Quality:
        from compactai.measure import make_runner

        runner = make_runner(self.handle.as_onnx(path), "onnxruntime", self.threads)
        value, details = self.task.metric.score(runner.run, self.split, self.task.batch_size)
        return Quality(self.task.metric.name, value, None, details)


def resolve_reduce_range(value: Any, weight_bits: int = 8, weight_type: str = "int8") -> bool:
    """``reduce_range`` as the int8 kernels need it: "auto" means 7-bit weights exactly where this
    CPU's u8s8 kernels saturate (x86 without VNNI), full 8-bit weights elsewhere. Only 8-bit int8
    weights run on those kernels: uint8 weights run on u8u8 ones and int4 weights are dequantized
    to float, so "auto" keeps all their bits (reducing int4 would leave 3-bit weights)."""
    if value == "auto":
        return weight_bits == 8 and weight_type == "int8" and int8_kernels_saturate()
    return bool(value)


def file_size(path: Path) -> int:
    from compactai.measure import size_on_disk

    return int(size_on_disk(path))


def output_spread_ratio(
    reference: ModelHandle, candidate: ModelHandle, split: Split, samples: int = 64, threads: int | None = None
) -> float:
    """How much ``candidate``'s output 0 varies across ``samples`` rows of ``split``, relative to
    ``reference``'s (about 1 for a faithful model, 0 for one that ignores its input)."""
    from compactai.measure import make_runner

    part = split.take(min(samples, len(split)))
    runners = [make_runner(h, "onnxruntime", threads) for h in (reference, candidate)]
    pooled: list[list[np.ndarray]] = [[], []]
    for feeds, _ in part.batches(16):
        for rows, runner in zip(pooled, runners):
            rows.append(sample_vectors(runner.run(feeds)[0], feeds.get("attention_mask")))
    return spread_ratio(np.concatenate(pooled[0]), np.concatenate(pooled[1]))


# Ops that carry weights, for the "left in float" list (ORT's int8 quantizers have no kernel for the
# recurrent ones, so they stay float whatever the mode).
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "GRU", "LSTM", "RNN", "Attention")
NO_INT8_KERNEL = ("GRU", "RNN")


def ops_left_in_float(model_path: Path, excluded: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """The weight-carrying ops of a quantized model that still compute in float32: their weight
    is a float32 constant rather than an integer one (QOperator ops are renamed, e.g. QLinearConv,
    and QDQ weights come from a DequantizeLinear), each with the reason it stayed float."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(model_path), load_external_data=False)
    float_constants = {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT}
    float_constants |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"
                        and any(a.t.data_type == TensorProto.FLOAT for a in n.attribute if a.name == "value")}
    left = []
    for node in model.graph.node:
        if node.op_type not in COMPUTE_OPS or len(node.input) < 2 or node.input[1] not in float_constants:
            continue
        if node.name in excluded:
            reason = "kept in float on purpose (excluded)"
        elif node.op_type in NO_INT8_KERNEL:
            reason = f"ONNX Runtime has no int8 kernel for {node.op_type}"
        else:
            reason = "not quantized by this mode"
        left.append({"name": node.name, "op_type": node.op_type, "reason": reason})
    return left
