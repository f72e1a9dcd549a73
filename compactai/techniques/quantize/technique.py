"""The ``quantize`` technique: one entry point for int8 (dynamic/static), fp16/bf16, int4
weight-only and the accuracy-aware ``auto`` mode, with the guard rail that keeps the
float model when the quantized one is not faster on this machine."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compactai.errors import BudgetNotMetError, ParameterError
from compactai.measure.environment import int8_kernels_saturate
from compactai.models.handle import ModelHandle
from compactai.tasks import COLLAPSE_RATIO
from compactai.techniques.base import (
    CallableParam,
    ChoiceParam,
    Context,
    FloatParam,
    IntParam,
    NoneOr,
    StringsParam,
    Technique,
    TypeParam,
    register_technique,
)
from compactai.techniques.quantize._common import (
    Evaluator,
    default_probe,
    file_size,
    ops_left_in_float,
    output_spread_ratio,
    weight_nodes,
)
from compactai.techniques.quantize.auto import search_mixed_precision
from compactai.techniques.quantize.equalize import scale_outlier_channels
from compactai.techniques.quantize.float import CONVERTERS, check_executes, float_mode_runs
from compactai.techniques.quantize.ort_ptq import (
    INT8_SPACE,
    Int8Config,
    cached_weight_quantization,
    int8_config,
    preprocess,
    quantize_int8,
)
from compactai.techniques.quantize.sensitivity import analyze_sensitivity, plot_sensitivity
from compactai.techniques.quantize.weight_only import quantize_int4

MODES = ("dynamic", "static", "fp16", "bf16", "int4", "auto")


class QualityTargetNotMetError(BudgetNotMetError):
    """The quality target was not reached; ``best`` is the best model found (already on disk)."""

    def __init__(self, message: str, best: ModelHandle | None, quality: float | None) -> None:
        super().__init__(message)
        self.best = best
        self.quality = quality


@dataclass
class Target:
    """A quality target on the validation split: absolute ``min_quality`` and/or ``max_drop``
    in metric points (hundredths: 0.5 means half a percentage point of accuracy)."""

    min_quality: float | None
    max_drop: float | None
    float_quality: float

    @property
    def threshold(self) -> float:
        floors = [self.min_quality] if self.min_quality is not None else []
        if self.max_drop is not None:
            floors.append(self.float_quality - self.max_drop / 100.0)
        return max(floors)

    def meets(self, value: float, details: dict[str, float] | None = None) -> bool:
        return value >= self.threshold - 1e-12

    def describe(self) -> str:
        parts = []
        if self.min_quality is not None:
            parts.append(f"min_quality {self.min_quality:g}")
        if self.max_drop is not None:
            parts.append(f"max_drop {self.max_drop:g} points from {self.float_quality:.4f}")
        return " and ".join(parts)


def check_equivalent(float_handle: ModelHandle, rewritten: Path, tolerance: float = 1e-3) -> float:
    """The float rewrites (fusion, Sum, outlier scaling) must not change the outputs; returns the
    max abs difference on the example inputs, raising if it exceeds ``tolerance``."""
    import numpy as np

    from compactai.errors import TechniqueError
    from compactai.measure import make_runner

    feeds = float_handle.example_inputs
    expected = make_runner(float_handle).run(feeds)
    got = make_runner(float_handle.as_onnx(rewritten)).run(feeds)
    diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) for a, b in zip(expected, got))
    if not diff <= tolerance:
        raise TechniqueError(
            f"Graph pre-processing changed the model's outputs (max abs diff {diff:.3g} > {tolerance:g}); "
            "pass preprocess=False (--no-preprocess) and outlier_scaling='off' to quantize the graph as exported."
        )
    return diff


def default_configs(kind: str, has_calibration: bool, base: Int8Config) -> list[Int8Config]:
    """The int8 configurations ``auto`` chooses between, by model kind (first = ranking config)."""
    from dataclasses import replace

    if kind in ("transformer", "mlp"):
        configs = [
            replace(base, mode="dynamic", per_channel=True),
            replace(base, mode="dynamic", per_channel=False),
        ]
        if int8_kernels_saturate():
            # x86 without VNNI: int8 weights lose their 8th bit (reduce_range); uint8 weights keep it
            # through u8u8 kernels, slower at large batches but closer to float (MiniLM's mean cosine
            # 0.9966 -> 0.9975, see docs/quantization.md)
            configs.insert(1, replace(base, mode="dynamic", per_channel=True, weight_type="uint8", reduce_range=False))
        if has_calibration:
            configs.append(replace(base, mode="static", per_channel=True, format="qdq", calibration="minmax"))
        return configs
    configs = []
    if has_calibration:
        configs += [
            replace(base, mode="static", per_channel=True, format="qoperator", calibration="minmax"),
            replace(base, mode="static", per_channel=True, format="qdq", calibration="minmax"),
            replace(base, mode="static", per_channel=True, format="qoperator", calibration="percentile"),
        ]
    configs.append(replace(base, mode="dynamic", per_channel=True))
    return configs


@register_technique
class Quantize(Technique):
    """Quantize a model for ONNX Runtime on the CPU.

    ``mode``: ``dynamic``/``static`` int8 (ORT quantization), ``fp16``/``bf16`` (offered only
    if ORT runs them here), ``int4`` (block-wise weight-only MatMulNBits), ``auto`` (per-op
    sensitivity, then mixed precision meeting ``min_quality``/``max_drop`` on the
    validation split, configuration chosen by measured latency). Unless ``objective`` is
    "size", a result that is not faster than the float model at batch 1 is discarded and
    the float model is returned, with the reason recorded.
    """

    name = "quantize"
    family = "quantize"
    accepts = ("torch", "onnx")
    space = {
        "mode": ChoiceParam(MODES, "dynamic"),
        **INT8_SPACE,
        "weight_type": ChoiceParam(("int8", "uint8"), "int8"),
        "const_weights_only": ChoiceParam((True, False), True),
        "nodes_to_exclude": NoneOr(StringsParam()),
        "op_types": NoneOr(StringsParam()),
        "extra_options": NoneOr(TypeParam((dict,))),
        "preprocess": ChoiceParam((True, False), True),
        "outlier_scaling": ChoiceParam(("auto", "on", "off"), "auto"),
        "outlier_threshold": FloatParam(1.0, 1000.0, 3.0),
        "block_size": ChoiceParam((16, 32, 64, 128), 32),
        # keep the first and/or last weight op (stem, classifier) in float: the ops int8 hurts most often
        "float_ends": ChoiceParam(("none", "first", "last", "both"), "none"),
        "min_quality": NoneOr(FloatParam(-math.inf, math.inf)),
        "max_drop": NoneOr(FloatParam(0.0, math.inf)),  # metric points
        "objective": ChoiceParam(("latency", "size"), "latency"),
        "sensitivity": ChoiceParam(("both", "float", "none"), "both"),
        "sensitivity_samples": IntParam(1, 100_000, 100),
        "rank_by": TypeParam((str,), "auto"),
        "max_float_fraction": FloatParam(0.0, 1.0, 0.5),
        "configs": NoneOr(TypeParam((list, tuple))),  # of Int8Config or dicts of its fields
        "latency_probe": NoneOr(CallableParam(signature="handle -> ms")),
    }
    cost = 0
    # the optimizer tries the cheap, always-offered int8 settings; auto/fp16/bf16/int4 are asked for by name
    search_space = {
        "mode": ChoiceParam(("static", "dynamic"), "static"),
        "per_channel": ChoiceParam((True, False), True),
        "calibration": ChoiceParam(("minmax", "percentile"), "minmax"),
    }
    quick = {"mode": "static", "calibration_samples": 8}

    @classmethod
    def search_defaults(cls, kind: str) -> dict[str, Any]:
        """Static int8 of transformer encoders loses too much to activation outliers (see
        docs/quantization.md); the optimizer searches dynamic int8 for them."""
        return {"mode": "dynamic"} if kind == "transformer" else {}

    @classmethod
    def search_defaults_for(cls, handle: ModelHandle, constrained: set[str]) -> dict[str, Any]:
        """The optimizer's space for this model: int8 formats, calibrations, per-channel and keeping the
        stem/classifier in float; fp16 where ONNX Runtime runs this model in it, int4 where it has
        MatMul weights. A size budget keeps a smaller int8 model even when it is not faster."""
        settings = dict(cls.search_defaults(handle.kind))
        settings["objective"] = "size" if "size_mb" in constrained else "latency"
        if handle.framework != "onnx" or handle.path is None:
            return settings
        modes = [settings.pop("mode")] if "mode" in settings else ["static", "dynamic"]
        path = Path(handle.path)
        if weight_nodes(path, ("MatMul",)):
            modes.append("int4")
        if float_mode_runs(handle, "fp16"):
            modes.append("fp16")
        settings.update({
            "mode": ChoiceParam(tuple(modes), modes[0]),
            "format": ChoiceParam(("qdq", "qoperator"), "qdq"),
            "calibration": ChoiceParam(("minmax", "entropy", "percentile"), "minmax"),
            "float_ends": ChoiceParam(("none", "first", "last", "both"), "none"),
        })
        return settings

    @classmethod
    def canonical(cls, params: dict[str, Any]) -> dict[str, Any]:
        mode = params.get("mode", "dynamic")
        unused: tuple[str, ...] = ()
        if mode == "dynamic":
            unused = ("format", "calibration")
        elif mode == "int4":
            unused = ("format", "calibration", "per_channel", "weight_type")
        elif mode in ("fp16", "bf16"):
            unused = ("format", "calibration", "per_channel", "float_ends", "weight_type")
        return {k: v for k, v in params.items() if k not in unused}

    def _apply(self, handle: ModelHandle, context: Context, params: dict[str, Any]
               ) -> tuple[ModelHandle, dict[str, Any]]:
        mode = params["mode"]
        context.work_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"quantize-{mode}-", dir=context.work_dir))
        say = context.progress
        say("exporting to ONNX" if handle.framework == "torch" else "reading the ONNX model")
        float_handle = handle.to_onnx(work / "float.onnx") if handle.framework == "torch" else handle
        float_path = Path(float_handle.path)  # type: ignore[arg-type]
        probe = params["latency_probe"] or default_probe(context.threads)
        base = int8_config(
            params, mode=mode if mode in ("dynamic", "static") else "dynamic",
            const_weights_only=params["const_weights_only"],
            nodes_to_exclude=tuple(params["nodes_to_exclude"] or ()),
            op_types=tuple(params["op_types"]) if params["op_types"] else None,
            extra_options=dict(params["extra_options"] or {}),
            weight_type=params["weight_type"],
        )
        calibration = context.task.splits.get("calibration") if context.task is not None else None
        decisions: dict[str, Any] = {"mode": mode}
        source = float_path
        if params["preprocess"] and mode in ("dynamic", "static", "auto", "int4"):
            say("pre-processing the graph")
            source = work / "preprocessed.onnx"
            meta = float_handle.metadata
            decisions["preprocess"] = preprocess(
                float_path, source, handle.kind, int(meta.get("attention_heads", 0)), int(meta.get("hidden_size", 0))
            )
        scaling = params["outlier_scaling"]
        if scaling == "auto":
            scaling = "on" if handle.kind == "transformer" else "off"
        if scaling == "on" and mode in ("dynamic", "static", "auto"):
            if calibration is None:
                if params["outlier_scaling"] == "on":
                    raise ParameterError(
                        "outlier_scaling='on' measures activation ranges on the task's calibration split; "
                        "give a task with one, or pass outlier_scaling='off'."
                    )
            else:
                say("measuring activation ranges for outlier-channel scaling")
                scaled = work / "scaled.onnx"
                decisions["outlier_scaling"] = scale_outlier_channels(
                    source, scaled, calibration, handle.input_names, threshold=params["outlier_threshold"]
                )
                source = scaled
        if source != float_path:
            decisions["preprocess_parity_max_abs_diff"] = check_equivalent(float_handle, source)
        if params["float_ends"] != "none" and mode in ("dynamic", "static", "auto", "int4"):
            from dataclasses import replace

            weighted = weight_nodes(source)
            ends = {"first": weighted[:1], "last": weighted[-1:], "both": weighted[:1] + weighted[-1:]}
            kept = [n for n in ends[params["float_ends"]] if n not in base.nodes_to_exclude]
            base = replace(base, nodes_to_exclude=tuple(base.nodes_to_exclude) + tuple(kept))
            decisions["float_ends"] = kept
        target = work / f"model.{mode}.onnx"
        report: dict[str, Any] = {}
        if mode in ("dynamic", "static"):
            say(f"quantizing: {base.label()}")
            quantize_int8(source, target, base, calibration, handle.input_names, notes=decisions)
            decisions["config"] = base.to_dict()
        elif mode in CONVERTERS:
            say(f"converting to {mode}")
            CONVERTERS[mode](float_path, target)
            decisions["max_relative_error"] = check_executes(float_handle.as_onnx(target), float_handle, mode)
        elif mode == "int4":
            say(f"int4 weight-only, block size {params['block_size']}")
            decisions["int4_matmuls"] = quantize_int4(
                source, target, block_size=params["block_size"], nodes_to_exclude=list(base.nodes_to_exclude)
            )
        else:
            with cached_weight_quantization():
                target, report = self._auto(handle, float_handle, source, base, params, context, work, probe)
            decisions.update(
                {k: v for k, v in report.items() if k in ("chosen_config", "float_ops", "target")}
            )
        if mode in ("dynamic", "static", "int4", "auto"):
            excluded = tuple(base.nodes_to_exclude) + tuple(decisions.get("float_ops", ()))
            decisions["left_in_float"] = ops_left_in_float(target, excluded)
        self._refuse_collapsed(float_handle, target, context, decisions)
        return self._guard(handle, float_handle, target, params, probe, decisions, report, context)

    def _refuse_collapsed(
        self, float_handle: ModelHandle, target: Path, context: Context, decisions: dict[str, Any]
    ) -> None:
        """Refuse a quantized model whose outputs no longer depend on its input (their spread over
        the validation split, or the calibration split, against the float model's)."""
        task = context.task
        split = None if task is None else task.splits.get("validation") or task.splits.get("calibration")
        if split is None:
            return
        context.progress("checking that the outputs still depend on the input")
        ratio = output_spread_ratio(float_handle, float_handle.as_onnx(target), split, threads=context.threads)
        decisions["output_spread_ratio"] = ratio
        if ratio < COLLAPSE_RATIO:
            raise QualityTargetNotMetError(
                f"The {decisions['mode']} model's outputs barely vary with its input (their spread is "
                f"{ratio:.1%} of the float model's on {len(split)} rows): it is broken, so it is refused. "
                "Try another mode (e.g. dynamic) or keep the ops named in the sensitivity table in float.",
                None,
                None,
            )

    def _auto(
        self,
        handle: ModelHandle,
        float_handle: ModelHandle,
        source: Path,
        base: Int8Config,
        params: dict[str, Any],
        context: Context,
        work: Path,
        probe: Any,
    ) -> tuple[Path, dict[str, Any]]:
        """Sensitivity analysis + mixed-precision search; returns the chosen file and the report."""
        from dataclasses import replace

        task = context.task
        if task is None:
            raise ParameterError(
                "mode='auto' needs a task with a validation split (the quality target is checked on it)."
            )
        say = context.progress
        calibration = task.splits.get("calibration")
        evaluate = Evaluator(task, float_handle, "validation", threads=context.threads)
        float_quality = evaluate(Path(float_handle.path)).value  # type: ignore[arg-type]
        max_drop = params["max_drop"]
        if params["min_quality"] is None and max_drop is None:
            max_drop = 1.0
        target = Target(params["min_quality"], max_drop, float_quality)
        if params["configs"]:
            configs = [replace(base, **c) if isinstance(c, dict) else c for c in params["configs"]]
        else:
            configs = default_configs(handle.kind, calibration is not None, base)
        nodes = [n for n in weight_nodes(source) if n not in base.nodes_to_exclude]
        say(
            f"auto: {len(nodes)} quantizable ops, target {target.describe()} (threshold {target.threshold:.4f})"
        )
        first = work / "all-int8.onnx"
        quantize_int8(source, first, configs[0], calibration, handle.input_names)
        all_quantized = evaluate(first).value
        report: dict[str, Any] = {
            "target": {
                "min_quality": params["min_quality"],
                "max_drop": max_drop,
                "threshold": target.threshold,
                "split": "validation",
                "float_quality": float_quality,
            }
        }
        ranking = nodes
        if params["sensitivity"] != "none" and nodes:
            sens_eval = Evaluator(
                task, float_handle, "validation", params["sensitivity_samples"], context.threads
            )
            sens_float = sens_eval(Path(float_handle.path))  # type: ignore[arg-type]
            sens_all = sens_eval(first)
            rank_by = params["rank_by"]
            if rank_by == "auto":  # a mean is a steadier ranking signal than a minimum over few samples
                rank_by = "cosine_mean" if "cosine_mean" in sens_all.details else "primary"
            if rank_by != "primary" and rank_by not in sens_all.details:
                raise ParameterError(
                    f"The 'rank_by' parameter of Quantize names '{rank_by}', which the metric does "
                    f"not report; it reports {', '.join(sens_all.details) or 'no details'}."
                )
            sensitivity = analyze_sensitivity(
                source,
                configs[0],
                nodes,
                sens_eval,
                work,
                calibration=calibration,
                float_quality=sens_float.value,
                all_quantized_quality=sens_all.value,
                both=params["sensitivity"] == "both",
                progress=say,
                deadline=context.deadline,
                rank_by=rank_by,
                float_rank=sens_float.details.get(rank_by, sens_float.value),
                all_quantized_rank=sens_all.details.get(rank_by, sens_all.value),
            )
            ranking = sensitivity.ranking()
            report["sensitivity"] = sensitivity.to_dict()
            report["sensitivity_plot"] = str(plot_sensitivity(sensitivity, work / "sensitivity.png"))
        search = search_mixed_precision(
            source,
            configs,
            ranking,
            evaluate,
            target.meets,
            work,
            probe=probe,
            calibration=calibration,
            max_float_fraction=params["max_float_fraction"],
            progress=say,
            deadline=context.deadline,
        )
        report["search"] = search.to_dict()
        if search.chosen is None:
            best = search.best
            best_handle = float_handle.as_onnx(best.path) if best else None
            reached = best.quality if best else all_quantized
            raise QualityTargetNotMetError(
                f"No int8 configuration met the quality target ({target.describe()}) on the validation split "
                f"with at most {params['max_float_fraction']:.0%} of the ops in float; the best reached "
                f"{reached:.4f} (float model: {float_quality:.4f}). The best model so far is at {best.path if best else '-'}; "
                "relax the target or raise max_float_fraction.",
                best_handle,
                reached,
            )
        report["chosen_config"] = search.chosen.config.to_dict()
        report["float_ops"] = list(search.chosen.config.nodes_to_exclude)
        return search.chosen.path, report

    def _guard(
        self,
        handle: ModelHandle,
        float_handle: ModelHandle,
        target: Path,
        params: dict[str, Any],
        probe: Any,
        decisions: dict[str, Any],
        report: dict[str, Any],
        context: Context,
    ) -> tuple[ModelHandle, dict[str, Any]]:
        """Keep the quantized model only if it is faster at batch 1 (or the objective is size)."""
        float_path = Path(float_handle.path)  # type: ignore[arg-type]
        quantized = float_handle.as_onnx(target)
        context.progress("measuring batch-1 latency: float vs quantized")
        float_ms, quant_ms = float(probe(float_handle)), float(probe(quantized))
        float_size, quant_size = file_size(float_path), file_size(target)
        decisions.update(
            {
                "float_latency_p50_ms": float_ms,
                "quantized_latency_p50_ms": quant_ms,
                "float_size_bytes": float_size,
                "quantized_size_bytes": quant_size,
                "size_ratio": float_size / max(quant_size, 1),
                "speedup": float_ms / max(quant_ms, 1e-9),
            }
        )
        faster = quant_ms < float_ms
        if faster or params["objective"] == "size":
            decisions["kept"] = "quantized"
            if not faster:
                decisions["note"] = (
                    f"the {params['mode']} model is not faster than float on this machine at batch 1 "
                    f"({quant_ms:.2f} vs {float_ms:.2f} ms); kept because objective='size'"
                )
            result = quantized
        else:
            decisions["kept"] = "float"
            decisions["note"] = (
                f"the {params['mode']} model is not faster than the float model on this machine at "
                f"batch 1 ({quant_ms:.2f} vs {float_ms:.2f} ms p50), so the float model is kept; "
                "pass objective='size' (--objective size) to keep it for its size."
            )
            result = float_handle.as_onnx(float_path)
        if handle.framework == "torch":
            result.metadata.pop("parity", None)
        result.metadata["quantize"] = {**decisions, **{k: v for k, v in report.items() if k not in decisions}}
        return result, decisions
