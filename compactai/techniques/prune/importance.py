"""Importance criteria: small callables that score each channel/neuron of a coupled group.

A criterion follows Torch-Pruning's convention, ``criterion(group) -> Tensor`` with one score
per prunable index of the group (higher = keep). Register your own with
``register_criterion(name, build, needs_gradients=..., needs_activations=...)``; criteria that
need gradients (Taylor) get them from a loss on task data before they are called, criteria that
need activations (fluctuation) find each Conv/Linear layer's input variance on calibration data
in ``layer.compactai_input_variance``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from compactai._registry import Registry
from compactai.techniques._training import first_output
from compactai.techniques.layers import prunable_types
from compactai.techniques.losses import masked_mean_pool


@dataclass(frozen=True)
class Criterion:
    """A named importance criterion: ``build()`` returns the callable ``(group) -> scores``."""

    name: str
    build: Callable[[], Callable[[Any], Any]]
    needs_gradients: bool = False
    description: str = ""
    needs_activations: bool = False


CRITERIA: Registry[Criterion] = Registry("importance criterion")


def register_criterion(
    name: str, build: Callable[[], Callable[[Any], Any]], *, needs_gradients: bool = False, description: str = "",
    needs_activations: bool = False,
) -> Criterion:
    """Make a criterion known by ``name`` (the CLI's --criterion and the technique's 'criterion')."""
    return CRITERIA.register(name, Criterion(name, build, needs_gradients, description, needs_activations))


def get_criterion(name: str) -> Criterion:
    return CRITERIA.get(name)


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


def _fluctuation() -> Callable[[Any], Any]:
    """FLAP's fluctuation metric (An et al. 2024), summed over the layers that consume the group:
    for each input channel, the variance of the channel on calibration data times the squared norm
    of its weight column, i.e. the mean-square change of that layer's output when the channel is
    replaced by its mean (which bias correction, or reconstruction, puts back)."""
    import torch
    from torch_pruning.pruner import function

    consumers = (function.prune_linear_in_channels, function.prune_conv_in_channels)

    def score(group: Any) -> Any:
        total = torch.zeros(len(group[0].idxs), dtype=torch.float64)
        measured = False
        for i, (dep, idxs) in enumerate(group):
            layer, variance = dep.layer, getattr(dep.layer, "compactai_input_variance", None)
            if dep.pruning_fn not in consumers or variance is None or getattr(layer, "groups", 1) != 1:
                continue
            root_idxs = group[i].root_idxs
            if root_idxs is None or any(r is None for r in root_idxs):
                continue
            columns = layer.weight.detach().transpose(0, 1).flatten(1).double()[idxs]
            local = columns.pow(2).sum(1) * variance[idxs]
            total.scatter_add_(0, torch.tensor(root_idxs), local)
            measured = True
        return total.float() if measured else None

    return score


def activation_statistics(module: Any, batches: list[tuple[list[Any], Any]]) -> None:
    """Store each Conv/Linear layer's per-input-channel variance over ``batches`` (model args,
    attention mask or None) as ``layer.compactai_input_variance``; padding tokens are left out."""
    import torch
    from torch import nn

    sums: dict[Any, list[Any]] = {}
    mask: list[Any] = [None]

    def record(layer: Any, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        if isinstance(layer, nn.Linear):
            if mask[0] is not None and x.dim() == 3 and x.shape[:2] == mask[0].shape:
                x = x[mask[0].bool()]
            x = x.reshape(-1, x.shape[-1])
        else:
            x = x.transpose(0, 1).flatten(1).T  # (positions, channels)
        x = x.double()
        entry = sums.setdefault(layer, [0, 0.0, 0.0])
        entry[0] += x.shape[0]
        entry[1] = entry[1] + x.sum(0)
        entry[2] = entry[2] + (x * x).sum(0)

    layers: list[Any] = [m for m in module.modules() if isinstance(m, prunable_types())]
    handles = [layer.register_forward_pre_hook(record) for layer in layers]
    module.eval()
    try:
        with torch.inference_mode():
            for args, batch_mask in batches:
                mask[0] = batch_mask
                module(*args)
    finally:
        for handle in handles:
            handle.remove()
    for layer, (count, total, squares) in sums.items():
        mean = total / count
        layer.compactai_input_variance = (squares / count - mean * mean).clamp(min=0)


register_criterion("l1", lambda: _magnitude(1), description="L1 norm of the weights of every coupled layer")
register_criterion("l2", lambda: _magnitude(2), description="L2 norm of the weights of every coupled layer")
register_criterion(
    "taylor", _taylor, needs_gradients=True,
    description="first-order Taylor |weight x gradient| of the task loss (Molchanov et al. 2019)",
)
register_criterion("bn", _bn_scale, description="|gamma| of the batch norm after the channel (L1 where none)")
register_criterion(
    "fluctuation", _fluctuation, needs_activations=True,
    description="input variance x squared weight column of the layers reading the channel, on calibration data "
                "(FLAP, An et al. 2024)",
)



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
            student, teacher = masked_mean_pool(student, mask), masked_mean_pool(teacher, mask)
        return -(F.normalize(teacher, dim=-1) * student).sum(-1).mean()

    return loss


def task_gradients(module: Any, input_names: list[str], task: Any, teacher: Any, batches: int,
                   batch_size: int, seed: int) -> None:
    """Accumulate gradients of :func:`taylor_objective` over ``batches`` batches of the task's
    calibration split (train when there is none) into ``module``'s parameters."""
    import torch

    from compactai.techniques.prune.finetune import task_batches

    split = "calibration" if "calibration" in task.splits else "train"
    objective = taylor_objective(task)
    module.eval()  # fixed batch-norm statistics and no dropout: score the model as it runs
    module.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for args, feeds, labels in task_batches(task, split, batch_size, input_names, seed, batches):
            with torch.no_grad():
                teacher_out = first_output(teacher(*args)) if labels is None else None
            objective(first_output(module(*args)), teacher_out, labels, feeds).backward()


__all__ = ["CRITERIA", "Criterion", "activation_statistics", "get_criterion", "register_criterion", "task_gradients",
           "taylor_objective"]
