"""UnstructuredPrune: zero the smallest weights (layer-wise or global), gradually.

Honest by design: the model keeps its shapes, so a dense runtime (ONNX Runtime CPU, PyTorch
eager) does exactly the same work and runs no faster. What sparsity buys on such a runtime
is size *after compression* (zeros compress well). The technique reports the real zero
fraction; the CLI and benchmark measure the compressed size and the (absent) speed-up.
"""

from __future__ import annotations

import copy
import gzip
from pathlib import Path
from typing import Any, ClassVar

from compactai.errors import ParameterError, TechniqueError
from compactai.models.handle import ModelHandle, set_eval
from compactai.tasks import Task
from compactai.techniques.base import (
    ChoiceParam,
    Context,
    FloatParam,
    IntParam,
    Param,
    Range,
    StringsParam,
    Technique,
    register_technique,
)
from compactai.techniques.layers import prunable_layer_names
from compactai.techniques.prune.convert import prunable_handle, why_not_prunable
from compactai.techniques.prune.engine import check_protected, check_prunable
from compactai.techniques.prune.finetune import (
    FINETUNE_SPACE,
    default_loss,
    finetune_step,
    recalibrate_batchnorm,
)

DENSE_RUNTIME_NOTE = (
    "Unstructured sparsity keeps every weight tensor's shape: dense runtimes (ONNX Runtime CPU, PyTorch eager) "
    "multiply the zeros like any other number, so expect no speed-up; the gain is size after compression."
)


def compressed_size(path: str | Path, level: int = 6) -> int:
    """Bytes of the file after gzip (what a download or a bundle archive would cost)."""
    return len(gzip.compress(Path(path).read_bytes(), compresslevel=level))


def cubic_schedule(final: float, step: int, steps: int) -> float:
    """Sparsity at ``step`` of ``steps`` (Zhu & Gupta 2017: fast at first, gentle at the end)."""
    return final * (1 - (1 - step / steps) ** 3)


def magnitude_masks(weights: dict[str, Any], sparsity: float, ranking: str) -> dict[str, Any]:
    """Boolean keep-masks zeroing the ``sparsity`` fraction of smallest |w|, per tensor or over all."""
    import torch

    if ranking == "global":
        flat = torch.cat([w.detach().abs().flatten() for w in weights.values()])
        drop = int(sparsity * flat.numel())
        threshold = torch.kthvalue(flat, drop).values if drop > 0 else flat.new_tensor(-1.0)
        return {name: w.detach().abs() > threshold for name, w in weights.items()}
    masks = {}
    for name, w in weights.items():
        drop = int(sparsity * w.numel())
        threshold = torch.kthvalue(w.detach().abs().flatten(), drop).values if drop > 0 else w.new_tensor(-1.0)
        masks[name] = w.detach().abs() > threshold
    return masks


def zero_fraction(module: Any, names: list[str] | None = None) -> float:
    """Fraction of exactly-zero values among the named parameters (all parameters by default)."""
    params = dict(module.named_parameters())
    chosen = [params[n] for n in (names or list(params))]
    total = sum(p.numel() for p in chosen)
    return float(sum(int((p == 0).sum()) for p in chosen) / max(total, 1))


@register_technique
class UnstructuredPrune(Technique):
    """Magnitude sparsity on Conv/Linear weights: ``ratio`` of them set to zero, per layer or global,
    in ``steps`` (cubic schedule) with optional fine-tuning after each step (masks kept)."""

    name = "unstructured_prune"
    family = "prune"
    accepts = ("torch", "onnx")  # ONNX converts with onnx2torch (why_not says when it cannot)
    kinds = ("cnn", "mlp", "transformer", "generic")
    space: ClassVar[dict[str, Param]] = {
        "ratio": FloatParam(0.0, 1.0, 0.8, open_low=True, open_high=True),
        "ranking": ChoiceParam(("layer", "global"), "layer"),
        "steps": IntParam(1, 50, 1),
        **FINETUNE_SPACE,
        "protect": StringsParam(single_ok=True),  # layer names whose weights are kept dense
        "protect_first": ChoiceParam((True, False), True),
    }
    search_space: ClassVar[dict[str, Range]] = {
        "ratio": FloatParam(0.05, 0.95, 0.8),
        "ranking": ChoiceParam(("layer", "global"), "layer"),
    }
    in_default_search = False  # a dense runtime gains no speed from zeros; searched only when named
    quick: ClassVar[dict[str, Any]] = {"ratio": 0.5, "finetune_epochs": 0}
    fidelity_param = "finetune_epochs"  # the optimizer's multi-fidelity schedule pauses the last fine-tune

    @classmethod
    def why_not(cls, handle: ModelHandle, task: Task | None) -> str | None:
        return super().why_not(handle, task) or why_not_prunable(handle)

    def _apply(self, handle: ModelHandle, context: Context, params: dict[str, Any]
               ) -> tuple[ModelHandle, dict[str, Any]]:
        handle = prunable_handle(handle)  # a torch.export program or GPT-2 Conv1D layers get real layers
        check_prunable(handle)
        protect = params["protect"]
        check_protected(handle.module, protect)
        task = context.task
        if params["finetune_epochs"] > 0 and (task is None or "train" not in task.splits):
            raise ParameterError("Fine-tuning needs task data with train and validation splits; pass a task "
                                 "or use finetune_epochs=0.")
        names = prunable_layer_names(handle.module)
        if not names:
            raise TechniqueError(f"{type(handle.module).__name__} has no Conv/Linear weights to sparsify.")
        protected = set(protect) | {names[-1]} | ({names[0]} if params["protect_first"] else set())
        module: Any = copy.deepcopy(handle.module)
        set_eval(module)
        layers = dict(module.named_modules())
        weights = {n: layers[n].weight for n in names
                   if not any(n == p or n.startswith(p + ".") for p in protected)}
        if not weights:
            raise TechniqueError("Every Conv/Linear layer is protected; nothing to sparsify.")
        teacher = context.teacher.module if context.teacher is not None and context.teacher.module is not None \
            else handle.module
        loss = params["loss"] or (default_loss(task, params["kd_weight"]) if task is not None else None)
        steps = []
        masks: dict[str, Any] = {}

        def apply_masks(model: Any) -> None:
            for name, mask in masks.items():
                weights[name].data.mul_(mask)

        for step in range(1, params["steps"] + 1):
            if step > 1 and context.out_of_time():
                break
            sparsity = cubic_schedule(params["ratio"], step, params["steps"])
            context.progress(f"sparsity step {step}/{params['steps']}: {sparsity:.1%} of weights to zero")
            masks = magnitude_masks(weights, sparsity, params["ranking"])
            apply_masks(module)
            record: dict[str, Any] = {"step": step, "sparsity": sparsity}
            if task is not None and recalibrate_batchnorm(module, handle.input_names, task, seed=context.seed):
                record["batchnorm_recalibrated"] = True  # the zeroed weights shift every activation's statistics
            if params["finetune_epochs"] > 0 and task is not None:
                record["finetune"] = finetune_step(module, handle.input_names, task, params, context, step,
                                                   teacher=teacher, loss=loss, after_step=apply_masks)
            steps.append(record)
        set_eval(module)
        per_layer = {n: float(1 - m.float().mean()) for n, m in masks.items()}
        return handle.derive(module=module), {
            "protected": sorted(protected), "steps": steps,
            "zero_fraction": zero_fraction(module, [f"{n}.weight" for n in weights]),
            "zero_fraction_all_params": zero_fraction(module), "per_layer_sparsity": per_layer,
            "note": DENSE_RUNTIME_NOTE,
        }


__all__ = ["DENSE_RUNTIME_NOTE", "UnstructuredPrune", "compressed_size", "cubic_schedule", "magnitude_masks",
           "zero_fraction"]
