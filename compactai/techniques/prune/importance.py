"""Importance criteria: small callables that score each channel/neuron of a coupled group.

A criterion follows Torch-Pruning's convention, ``criterion(group) -> Tensor`` with one score
per prunable index of the group (higher = keep). Register your own with
``register_criterion(name, build, needs_gradients=...)``; criteria that need gradients (Taylor)
get them from a loss on task data before they are called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from compactai.errors import UnknownNameError


@dataclass(frozen=True)
class Criterion:
    """A named importance criterion: ``build()`` returns the callable ``(group) -> scores``."""

    name: str
    build: Callable[[], Callable[[Any], Any]]
    needs_gradients: bool = False
    description: str = ""


CRITERIA: dict[str, Criterion] = {}


def register_criterion(
    name: str, build: Callable[[], Callable[[Any], Any]], *, needs_gradients: bool = False, description: str = ""
) -> Criterion:
    """Make a criterion known by ``name`` (the CLI's --criterion and the technique's 'criterion')."""
    criterion = Criterion(name, build, needs_gradients, description)
    CRITERIA[name] = criterion
    return criterion


def get_criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise UnknownNameError(f"Unknown importance criterion '{name}'; choose one of: {', '.join(CRITERIA)}.")
    return CRITERIA[name]


def _magnitude(p: int) -> Callable[[Any], Any]:
    import torch_pruning as tp

    # group-mean of the per-channel norm over every coupled layer, normalised by its mean so that
    # scores of different groups are comparable in global ranking
    return tp.importance.GroupMagnitudeImportance(p=p, group_reduction="mean", normalizer="mean")


def _taylor() -> Callable[[Any], Any]:
    import torch_pruning as tp

    return tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer="mean")


def _bn_scale() -> Callable[[Any], Any]:
    import torch_pruning as tp

    bn = tp.importance.BNScaleImportance(group_reduction="mean", normalizer="mean")
    fallback = _magnitude(1)

    def score(group: Any) -> Any:
        # groups without a batch norm (linear layers, transformer blocks) fall back to L1 magnitude
        result = bn(group)
        return fallback(group) if result is None or len(result) == 0 else result

    return score


register_criterion("l1", lambda: _magnitude(1), description="L1 norm of the weights of every coupled layer")
register_criterion("l2", lambda: _magnitude(2), description="L2 norm of the weights of every coupled layer")
register_criterion(
    "taylor", _taylor, needs_gradients=True,
    description="first-order Taylor |weight x gradient| of the task loss (Molchanov et al. 2019)",
)
register_criterion("bn", _bn_scale, description="|gamma| of the batch norm after the channel (L1 where none)")



def taylor_objective(task: Any) -> Callable[..., Any]:
    """The loss whose gradient Taylor importance uses: cross-entropy on labels when the task has
    them; otherwise agreement with the teacher's mean-pooled embeddings (a distance to the teacher
    would have zero gradient at the unpruned model, where it is minimal)."""
    import torch.nn.functional as F

    def loss(student: Any, teacher: Any, labels: Any, feeds: dict[str, Any]) -> Any:
        if labels is not None:
            return F.cross_entropy(student, labels)
        mask = feeds.get("attention_mask")
        if student.dim() == 3 and mask is not None:
            weights = mask.unsqueeze(-1).to(student.dtype)
            student = (student * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            teacher = (teacher * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return -(F.normalize(teacher, dim=-1) * student).sum(-1).mean()

    return loss


def task_gradients(module: Any, input_names: list[str], task: Any, teacher: Any, batches: int,
                   batch_size: int, seed: int) -> None:
    """Accumulate gradients of :func:`taylor_objective` over ``batches`` batches of the task's
    calibration split (train when there is none) into ``module``'s parameters."""
    import torch

    from compactai.techniques.prune.finetune import first_output, task_batches

    split = "calibration" if "calibration" in task.splits else "train"
    objective = taylor_objective(task)
    module.eval()  # fixed batch-norm statistics and no dropout: score the model as it runs
    module.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for args, feeds, labels in task_batches(task, split, batch_size, input_names, seed, batches):
            with torch.no_grad():
                teacher_out = first_output(teacher(*args)) if labels is None else None
            objective(first_output(module(*args)), teacher_out, labels, feeds).backward()


__all__ = ["CRITERIA", "Criterion", "get_criterion", "register_criterion", "task_gradients", "taylor_objective"]
