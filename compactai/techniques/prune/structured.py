"""StructuredPrune: physically remove channels, neurons, attention heads and FFN neurons.

One-shot (``steps=1``) or iterative (prune a step, fine-tune, repeat) to a target given as a
fraction of channels/neurons/heads, of parameters, of MACs, or of *measured* ONNX Runtime
batch-1 p50 latency. The result is an ordinary, smaller ``nn.Module``. On BERT-family encoders
``reconstruct=True`` re-fits by least squares on calibration tokens (``reconstruct.py``) each
pruned FFN's output projection and, where heads were removed, the attention output projection,
which keeps light pruning faithful without fine-tuning.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from compactai.errors import ParameterError, TechniqueError
from compactai.models.handle import ModelHandle, set_eval
from compactai.tasks import Task
from compactai.techniques.base import (
    ChoiceParam,
    Context,
    FloatParam,
    IntParam,
    NameParam,
    Param,
    Range,
    StringsParam,
    Technique,
    register_technique,
)
from compactai.techniques.layers import prunable_layer_names
from compactai.techniques.prune.convert import prunable_handle, why_not_prunable
from compactai.techniques.prune.engine import (
    SCOPES,
    Graph,
    check_protected,
    check_prunable,
    prune_copy,
    resolve_scope,
)
from compactai.techniques.prune.finetune import (
    FINETUNE_SPACE,
    default_loss,
    finetune_step,
    recalibrate_batchnorm,
)
from compactai.techniques.prune.importance import (
    CRITERIA,
    activation_statistics,
    get_criterion,
    task_gradients,
)
from compactai.techniques.prune.reconstruct import (
    Block,
    calibration_batches,
    find_attention_outputs,
    find_blocks,
    find_ffns,
    reconstruct_ffns,
)
from compactai.techniques.prune.schedule import TARGETS, solve


def example_args(handle: ModelHandle) -> tuple[Any, ...]:
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(handle.example_inputs[n])) for n in handle.input_names)


def count_params(module: Any) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def target_metric(target: str, handle: ModelHandle, graph_units: Callable[[Any], int], threads: int | None
                  ) -> Callable[[Any], float]:
    """The quantity a target reduces, as a function of a (pruned) module."""
    if target == "params":
        return lambda module: float(count_params(module))
    if target == "channels":
        return lambda module: float(graph_units(module))
    if target == "macs":
        from compactai.measure import count_macs

        def macs(module: Any) -> float:
            value = count_macs(handle.derive(module=module))
            if value is None:
                raise TechniqueError("MACs cannot be counted for this model; use target='params' or 'latency'.")
            return float(value)

        return macs

    def latency(module: Any) -> float:  # measured, not estimated: p50 at batch 1 on ONNX Runtime
        from compactai.measure import make_runner, measure_latency

        candidate = handle.derive(module=module)
        runner = make_runner(candidate, "onnxruntime", threads)
        single = {k: v[:1] for k, v in handle.example_inputs.items()}
        return float(measure_latency(runner, single, min_queries=100, min_seconds=0.5, warmup=20).p50_ms)

    return latency


ACTIVATION_SAMPLES = 256  # sequences for the fluctuation criterion's input variances


def check_reconstructable(module: Any, scope: str) -> None:
    """Raise ParameterError unless ``reconstruct=True`` applies: FFN neurons or attention heads
    of a BERT-family model."""
    resolved = resolve_scope(module, scope)
    if resolved == "channels":
        raise ParameterError(
            "The 'reconstruct' parameter of StructuredPrune re-fits transformer layers after their FFN neurons "
            "or attention heads are removed, but this run prunes channels (a model without attention layers). "
            "Use scope='ffn', 'heads' or 'ffn+heads' on a BERT-family model, or reconstruct=False."
        )
    try:
        find_ffns(module) if "ffn" in resolved else None
        find_attention_outputs(module) if "heads" in resolved else None
    except TechniqueError as exc:
        raise ParameterError(str(exc)) from exc


def reconstruction_blocks(pruned: Any, original: Any, scope: str) -> list[Block]:
    """What to re-fit, in forward order: every FFN output projection when FFN neurons are pruned,
    and the attention output projection of each layer that lost heads. (Re-fitting attention
    outputs of layers that kept their heads did not help: on MiniLM at 5% FFN it went from
    0.9912 to 0.9907 min cosine, an over-fit to the calibration tokens.)"""
    resolved = resolve_scope(pruned, scope)
    originals, modules = dict(original.named_modules()), dict(pruned.named_modules())
    narrowed = {b.up for b in (find_attention_outputs(pruned) if "heads" in resolved else [])
                if modules[b.down].in_features < originals[b.down].in_features}
    blocks = find_blocks(pruned, attention="heads" in resolved, ffn="ffn" in resolved)
    return [b for b in blocks if "attention" not in b.block or b.up in narrowed]


@register_technique
class StructuredPrune(Technique):
    """Remove whole channels (CNN), neurons (MLP) or attention heads and FFN neurons (BERT family),
    keeping coupled layers consistent, ranked by a pluggable importance criterion.

    ``ratio`` is the fraction of the ``target`` quantity to remove (channels, params, macs, or
    measured ORT latency). ``steps > 1`` prunes iteratively, fine-tuning ``finetune_epochs``
    after each step on the task's train split (best validation checkpoint kept).
    ``reconstruct=True`` (BERT-family models) re-fits the FFN output projections and the attention
    output projections of layers that lost heads on ``reconstruct_samples`` train sequences after
    each step, before any fine-tuning.
    """

    name = "structured_prune"
    family = "prune"
    accepts = ("torch", "onnx")  # ONNX converts with onnx2torch (why_not says when it cannot)
    kinds = ("cnn", "mlp", "transformer", "generic")
    space: ClassVar[dict[str, Param]] = {
        "ratio": FloatParam(0.0, 1.0, 0.5, open_low=True, open_high=True),
        "target": ChoiceParam(TARGETS, "params"),
        "criterion": NameParam(CRITERIA, "l2"),  # registered importance criteria, plugins included
        "ranking": ChoiceParam(("layer", "global"), "layer"),
        "scope": ChoiceParam(SCOPES, "auto"),
        "steps": IntParam(1, 20, 1),
        **FINETUNE_SPACE,
        "protect": StringsParam(single_ok=True),  # layer names whose output channels are kept
        "protect_first": ChoiceParam((True, False), True),
        "round_to": IntParam(1, 256, 1),
        "taylor_batches": IntParam(1, 1000, 4),
        "reconstruct": ChoiceParam((False, True), False),  # least-squares re-fit of pruned FFNs/heads (transformers)
        "reconstruct_samples": IntParam(16, 100_000, 1024),  # sequences of the train split for the re-fit
    }
    search_space: ClassVar[dict[str, Range]] = {
        "ratio": FloatParam(0.2, 0.75, 0.5),
        "criterion": ChoiceParam(("l2", "taylor"), "l2"),
        "ranking": ChoiceParam(("layer", "global"), "layer"),
    }
    quick: ClassVar[dict[str, Any]] = {"ratio": 0.3, "target": "channels", "finetune_epochs": 0}
    fidelity_param = "finetune_epochs"  # the optimizer's multi-fidelity schedule pauses the last fine-tune

    @classmethod
    def search_defaults(cls, kind: str) -> dict[str, Any]:
        """For the optimizer: prune MACs with a short fine-tune (KD from the unpruned model);
        on encoders the FFN neurons (heads cost more quality per millisecond saved), chosen by
        fluctuation and re-fitted by least squares, which keeps small ratios faithful. No
        fine-tune there: on MiniLM after reconstruction (10%, 150 batches at lr 3e-5) it did not
        raise the validation score above the reconstructed start, so it only cost minutes."""
        if kind == "transformer":
            return {"target": "channels", "scope": "ffn", "ratio": FloatParam(0.03, 0.3, 0.1),
                    "criterion": "fluctuation", "reconstruct": True, "finetune_epochs": 0}
        return {"target": "macs", "finetune_epochs": 3, "kd_weight": 0.5}

    @classmethod
    def why_not(cls, handle: ModelHandle, task: Task | None) -> str | None:
        reason = super().why_not(handle, task) or why_not_prunable(handle)
        if reason is None and handle.kind != "transformer" and (
                task is None or not {"train", "validation"} <= set(task.splits)):
            # without the fine-tune its search runs, pruned CNNs lose most of their accuracy (the
            # MobileNetV2-style zoo model: 0.95 -> 0.59 at 40% of channels), so trials would be wasted
            reason = ("its search fine-tunes after pruning, which needs train and validation splits in the task "
                      "data (add 'train/<input>' and 'train/labels' arrays to --data)")
        return reason

    def _apply(self, handle: ModelHandle, context: Context, params: dict[str, Any]
               ) -> tuple[ModelHandle, dict[str, Any]]:
        handle = prunable_handle(handle)  # a torch.export program or GPT-2 Conv1D layers get real layers
        check_prunable(handle)
        criterion = get_criterion(params["criterion"])
        protect = params["protect"]
        check_protected(handle.module, protect)
        task = context.task
        needs_data = params["finetune_epochs"] > 0 or criterion.needs_gradients
        if needs_data and (task is None or "train" not in task.splits or "validation" not in task.splits):
            raise ParameterError(
                f"{'Fine-tuning' if params['finetune_epochs'] else 'The taylor criterion'} needs task data with "
                "train and validation splits; pass a task, or use finetune_epochs=0 with criterion l1/l2/bn."
            )
        for wanted, what in ((criterion.needs_activations, f"The {criterion.name} criterion"),
                             (params["reconstruct"], "Reconstruction")):
            if wanted and (task is None or not {"train", "calibration"} & set(task.splits)):
                raise ParameterError(
                    f"{what} needs task data with a train or calibration split; pass a task, or use criterion "
                    "l1/l2/bn and reconstruct=False."
                )
        args = example_args(handle)
        original: Any = handle.module
        set_eval(original)
        teacher = original
        if context.teacher is not None and context.teacher.module is not None:
            teacher = context.teacher.module
        names = prunable_layer_names(original)
        if names and resolve_scope(original, params["scope"]) == "channels":
            # the last layer makes the outputs: its width is never touched
            protect = list(dict.fromkeys(protect + [names[-1]] + ([names[0]] if params["protect_first"] else [])))
        scope = params["scope"]
        if params["reconstruct"]:
            check_reconstructable(original, scope)

        def units_total(module: Any) -> int:  # channels, neurons and heads still prunable
            return sum(u.size for u in Graph(copy.deepcopy(module), args, scope, protect).units)

        metric = target_metric(params["target"], handle, units_total, context.threads)
        module = copy.deepcopy(original)
        set_eval(module)
        start_value = metric(module)
        before = {"params": count_params(module), params["target"]: start_value}
        history: list[dict[str, Any]] = []
        steps: list[dict[str, Any]] = []
        loss = params["loss"] or (default_loss(task, params["kd_weight"])
                                  if task is not None and params["finetune_epochs"] > 0 else None)
        stopped = None
        for step in range(1, params["steps"] + 1):
            if step > 1 and context.out_of_time():
                stopped = "deadline"
                break
            context.progress(f"pruning step {step}/{params['steps']}: ranking with {criterion.name}")
            work = copy.deepcopy(module)
            graph = Graph(work, args, scope, protect)
            if not graph.units:
                raise TechniqueError(
                    f"Found nothing to prune in {type(original).__name__}: no Conv/Linear channel group outside "
                    f"the protected layers ({', '.join(protect) or 'none'})."
                )
            if criterion.needs_gradients:
                task_gradients(work, handle.input_names, task, teacher, params["taylor_batches"],
                               params["batch_size"], context.seed + step)
            if criterion.needs_activations:
                split = "calibration" if "calibration" in task.splits else "train"
                activation_statistics(work, calibration_batches(task, handle.input_names, ACTIVATION_SAMPLES,
                                                                split=split, seed=context.seed + step))
            graph.score(criterion.build())
            work.zero_grad(set_to_none=True)
            wanted_total = params["ratio"] * step / params["steps"]
            current = start_value if step == 1 else metric(module)  # one measurement less (latency)
            goal = 1 - (1 - wanted_total) * start_value / current  # fraction of the current model to remove
            if goal <= 0:
                continue
            context.progress(f"pruning step {step}: removing {goal:.1%} of {params['target']}")
            solution = solve(
                graph.units, goal, current, functools.partial(prune_copy, module, args, scope, protect),
                metric, ranking=params["ranking"], round_to=params["round_to"],
                exact=params["target"] == "channels", out_of_time=context.out_of_time,
            )
            units = {u.name: u for u in graph.units}
            for layer, removed in solution.plan.items():
                if removed:
                    unit = units[layer]
                    history.append({"step": step, "layer": layer, "kind": unit.kind, "removed": removed,
                                    "count": len(removed), "of": unit.size, "criterion": criterion.name,
                                    "coupled": unit.coupled})
            module = solution.module
            record: dict[str, Any] = {
                "step": step, "fraction": solution.fraction, "goal": goal, "reduction": solution.reduction,
                "probes": solution.probes, "removed": sum(len(r) for r in solution.plan.values()),
            }
            if task is not None and recalibrate_batchnorm(module, handle.input_names, task, seed=context.seed):
                record["batchnorm_recalibrated"] = True
            if params["reconstruct"]:
                context.progress(f"pruning step {step}: least-squares reconstruction of the pruned layers' outputs")
                batches = calibration_batches(task, handle.input_names, params["reconstruct_samples"],
                                              seed=context.seed + step)
                record["reconstruction"] = reconstruct_ffns(
                    module, original, batches, progress=context.progress,
                    blocks=reconstruction_blocks(module, original, scope))
            if params["finetune_epochs"] > 0 and task is not None:
                context.progress(f"pruning step {step}: fine-tuning {params['finetune_epochs']} epoch(s)")
                record["finetune"] = finetune_step(module, handle.input_names, task, params, context, step,
                                                   teacher=teacher, loss=loss)
            steps.append(record)
        set_eval(module)
        after = {"params": count_params(module), params["target"]: metric(module)}
        return handle.derive(module=module), {
            "criterion": criterion.name, "scope": Graph(copy.deepcopy(module), args, scope, protect).scope,
            "protected": protect, "before": before, "after": after,
            "reduction": {k: 1 - after[k] / before[k] for k in before if before[k]},
            "steps": steps, "stopped": stopped, "history": history,
        }


__all__ = ["StructuredPrune", "count_params", "example_args"]
