"""Per-op sensitivity: the quality when each quantizable op alone is quantized, and when
each alone is left in float while everything else is quantized. The second figure ranks
the ops for the mixed-precision search (``auto``); both go into results.json, a table
and a plot."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from compactai.tasks import Split
from compactai.techniques.quantize._common import Evaluator
from compactai.techniques.quantize.ort_ptq import Int8Config, quantize_int8


@dataclass
class OpSensitivity:
    """One op's figures; ``loss_alone_quantized`` and ``gain_alone_float`` are in metric units
    (higher means more sensitive)."""

    node: str
    quality_alone_quantized: float | None = None
    quality_alone_float: float | None = None
    loss_alone_quantized: float | None = None
    gain_alone_float: float | None = None
    # the same two figures in the ranking figure (``SensitivityReport.rank_by``)
    rank_loss_alone_quantized: float | None = None
    rank_gain_alone_float: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SensitivityReport:
    config: dict[str, Any]
    split: str
    samples: int
    float_quality: float
    all_quantized_quality: float
    ops: list[OpSensitivity]
    complete: bool = True
    rank_by: str = "primary"

    def ranking(self) -> list[str]:
        """Ops, most sensitive first: by the sum of both figures (in the ranking figure). One op
        left in float barely moves a model with many int8 ops, so the gain alone is noisy; the
        loss when the op alone is int8 carries the clearer signal, and the sum uses both."""

        def key(op: OpSensitivity) -> tuple[float, float]:
            gain, loss = op.rank_gain_alone_float or 0.0, op.rank_loss_alone_quantized or 0.0
            return (-(gain + loss), -loss)

        return [op.node for op in sorted(self.ops, key=key)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "split": self.split,
            "samples": self.samples,
            "float_quality": self.float_quality,
            "all_quantized_quality": self.all_quantized_quality,
            "complete": self.complete,
            "rank_by": self.rank_by,
            "ops": [op.to_dict() for op in self.ops],
        }


def analyze_sensitivity(
    source: Path,
    config: Int8Config,
    nodes: list[str],
    evaluate: Evaluator,
    work_dir: Path,
    *,
    calibration: Split | None = None,
    float_quality: float,
    all_quantized_quality: float,
    both: bool = True,
    progress: Callable[[str], None] = lambda message: None,
    deadline: float | None = None,
    rank_by: str = "primary",
    float_rank: float | None = None,
    all_quantized_rank: float | None = None,
) -> SensitivityReport:
    """Quantize ``source`` once per op and direction and score each on ``evaluate``'s split.

    ``rank_by`` names a detail of the metric to rank by (e.g. "cosine_mean", smoother than a
    minimum over few samples); "primary" ranks by the metric's value. Stops early
    (``complete=False``) at ``deadline``; ops not reached keep ``None``.
    """

    def figure(quality: Any) -> float:
        return (
            float(quality.details.get(rank_by, quality.value))
            if rank_by != "primary"
            else float(quality.value)
        )

    float_rank = float_quality if float_rank is None else float_rank
    all_quantized_rank = all_quantized_quality if all_quantized_rank is None else all_quantized_rank
    names = evaluate.handle.input_names
    candidate = work_dir / "sensitivity-candidate.onnx"
    rows = [OpSensitivity(node) for node in nodes]
    complete = True
    for i, row in enumerate(rows):
        if deadline is not None and time.monotonic() > deadline:
            complete = False
            break
        progress(f"sensitivity {i + 1}/{len(rows)}: {row.node}")
        others = [n for n in nodes if n != row.node]
        quantize_int8(
            source,
            candidate,
            config.excluding([*list(config.nodes_to_exclude), row.node]),
            calibration,
            names,
        )
        scored = evaluate(candidate)
        row.quality_alone_float = scored.value
        row.gain_alone_float = row.quality_alone_float - all_quantized_quality
        row.rank_gain_alone_float = figure(scored) - all_quantized_rank
        if both:
            quantize_int8(
                source,
                candidate,
                config.excluding(list(config.nodes_to_exclude) + others),
                calibration,
                names,
            )
            scored = evaluate(candidate)
            row.quality_alone_quantized = scored.value
            row.loss_alone_quantized = float_quality - row.quality_alone_quantized
            row.rank_loss_alone_quantized = float_rank - figure(scored)
    candidate.unlink(missing_ok=True)
    return SensitivityReport(
        config.to_dict(),
        evaluate.split_name,
        len(evaluate.split),
        float_quality,
        all_quantized_quality,
        rows,
        complete,
        rank_by,
    )


def sensitivity_rows(report: SensitivityReport, top: int | None = None) -> list[list[Any]]:
    """Table rows (rank, op, quality alone quantized, loss, quality alone float, gain), most sensitive first."""
    by_name = {op.node: op for op in report.ops}
    order = report.ranking()[: top or None]
    return [
        [
            rank + 1,
            by_name[n].node,
            by_name[n].quality_alone_quantized,
            by_name[n].loss_alone_quantized,
            by_name[n].quality_alone_float,
            by_name[n].gain_alone_float,
            by_name[n].rank_gain_alone_float,
        ]
        for rank, n in enumerate(order)
    ]


SENSITIVITY_COLUMNS = [
    "rank",
    "op",
    "quality (only this int8)",
    "loss",
    "quality (only this float)",
    "gain",
    "gain (ranking figure)",
]


def plot_sensitivity(report: SensitivityReport, path: Path) -> Path:
    """A horizontal bar chart of both figures per op, in graph order (PNG or SVG by suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = report.ops
    labels = [short_name(op.node) for op in ops]
    height = max(3.0, 0.22 * len(ops) + 1.5)
    fig, axes = plt.subplots(1, 2, figsize=(11, height), sharey=True)
    positions = list(range(len(ops)))
    axes[0].barh(positions, [op.loss_alone_quantized or 0.0 for op in ops], color="#c0504d")
    axes[0].set_title("quality loss: only this op int8")
    axes[1].barh(positions, [op.gain_alone_float or 0.0 for op in ops], color="#4f81bd")
    axes[1].set_title("quality gain: only this op float")
    axes[0].set_yticks(positions, labels, fontsize=7)
    axes[0].invert_yaxis()
    for ax in axes:
        ax.set_xlabel(f"metric points on {report.split} ({report.samples} samples)")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(
        f"Per-op int8 sensitivity (float {report.float_quality:.4f}, all int8 {report.all_quantized_quality:.4f})"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def short_name(node: str) -> str:
    """'/encoder/encoder/layer.0/attention/self/query/MatMul' -> 'layer.0/attention/self/query'."""
    parts = [p for p in node.split("/") if p]
    if len(parts) > 1 and parts[-1].startswith(("MatMul", "Gemm", "Conv")):
        parts = parts[:-1]
    for i, part in enumerate(parts):
        if part.startswith(("layer", "stage", "block")):
            return "/".join(parts[i:])
    return "/".join(parts[-3:]) or node


def report_from_dict(data: dict[str, Any]) -> SensitivityReport:
    """The inverse of ``SensitivityReport.to_dict`` (for reading results.json)."""
    return SensitivityReport(
        data["config"],
        data["split"],
        data["samples"],
        data["float_quality"],
        data["all_quantized_quality"],
        [OpSensitivity(**op) for op in data["ops"]],
        data.get("complete", True),
        data.get("rank_by", "primary"),
    )
