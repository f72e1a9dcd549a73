"""Least-squares reconstruction of pruned transformer FFNs (He et al. 2017; FLAP, ZipLM).

After FFN neurons are removed, each layer's down-projection is re-fitted on calibration tokens
so that the layer keeps producing what the unpruned model produced:

    W2', b2' = argmin  mean || T - H W2'^T - b2' ||^2  +  ridge * || W2' - W2_kept ||^2

``H``: activations (after GELU) of the kept neurons in the pruned model; ``T``: the unpruned
model's FFN output plus its residual input minus the pruned model's residual input, i.e. the
sum that enters the layer norm. Layers are fitted in order, each on activations of the already
re-fitted layers before it, so errors do not compound. The intercept carries the mean
contribution of the removed neurons (bias correction). Sums and solves are float64.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from compactai.errors import TechniqueError
from compactai.tasks import Task, trim_padding
from compactai.techniques.prune.engine import ffn_modules

Batch = tuple[list[Any], Any]  # (model args, attention mask or None)


@dataclass(frozen=True)
class Block:
    """A re-fittable output projection ``down`` inside ``block`` (``block(inputs, residual)`` adds
    the residual and normalises), fed by ``up``, the pruned unit: a BERT feed-forward block (``up``
    the FFN up-projection, GELU in between) or an attention block (``up`` the self-attention)."""

    up: str
    block: str
    down: str


def find_attention_outputs(module: Any) -> list[Block]:
    """The attention output projections of a BERT-family model, in layer order: ``up`` is the
    self-attention (its heads are the pruned unit), ``block`` its ``*.attention.output``
    (``block(context, residual)`` adds the residual and normalises), ``down`` the projection."""
    from torch import nn

    from compactai.techniques.prune.engine import attention_modules

    modules = dict(module.named_modules())
    found = []
    for up in attention_modules(module):
        block = up[: -len("self")] + "output" if up.endswith(".self") else ""
        down = modules.get(block + ".dense")
        if block not in modules or not isinstance(down, nn.Linear):
            raise TechniqueError(
                f"Reconstruction needs a BERT-style attention block ('{up}' feeding an 'attention.output.dense'), "
                f"which {type(module).__name__} does not have; use reconstruct=False."
            )
        found.append(Block(up, block, block + ".dense"))
    return found


def find_blocks(module: Any, attention: bool = False, ffn: bool = True) -> list[Block]:
    """The blocks to re-fit, in forward order (a layer's attention output before its FFN)."""
    import re

    blocks = (find_attention_outputs(module) if attention else []) + (find_ffns(module) if ffn else [])

    def order(block: Block) -> tuple[int, ...]:
        return (*(int(n) for n in re.findall(r"\.(\d+)\.", block.block)), "attention" not in block.block)

    return sorted(blocks, key=order)


def find_ffns(module: Any) -> list[Block]:
    """The FFN blocks of a BERT-family model, in layer order (``*.intermediate.dense`` -> ``*.output.dense``)."""
    from torch import nn

    modules = dict(module.named_modules())
    found = []
    for up, linear in ffn_modules(module).items():
        block = up[: -len("intermediate.dense")] + "output"
        down = modules.get(block + ".dense")
        if block not in modules or not isinstance(down, nn.Linear) or down.in_features != linear.out_features:
            raise TechniqueError(
                f"Reconstruction needs a BERT-style FFN ('{up}' feeding '{block}.dense'), which "
                f"{type(module).__name__} does not have; use reconstruct=False."
            )
        found.append(Block(up, block, block + ".dense"))
    return found


class LeastSquares:
    """Running float64 sums for a ridge least-squares fit with intercept, ``y ~ W x + b``."""

    def __init__(self) -> None:
        self.count = 0
        self.shift_x: Any = None  # the first batch's means: sums of shifted values lose no precision
        self.shift_y: Any = None

    def add(self, x: Any, y: Any) -> None:
        """Add rows of features ``x`` (n, k) and targets ``y`` (n, m)."""
        import torch

        x, y = x.double(), y.double()
        if self.shift_x is None:
            self.shift_x, self.shift_y = x.mean(0), y.mean(0)
            k, m = x.shape[1], y.shape[1]
            self.sum_x, self.sum_y = torch.zeros(k, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)
            self.sum_xx = torch.zeros(k, k, dtype=torch.float64)
            self.sum_xy = torch.zeros(k, m, dtype=torch.float64)
            self.sum_yy = torch.zeros((), dtype=torch.float64)
        x, y = x - self.shift_x, y - self.shift_y
        self.count += x.shape[0]
        self.sum_x += x.sum(0)
        self.sum_y += y.sum(0)
        self.sum_yy += (y * y).sum()
        # one batch's products in float32 (a few hundred tokens of centred values: exact enough, and the
        # bulk of the work runs at single-precision speed); the running sums stay float64
        x32, y32 = x.float(), y.float()
        self.sum_xx += (x32.T @ x32).double()
        self.sum_xy += (x32.T @ y32).double()

    def _moments(self) -> tuple[Any, Any, Any, Any, Any]:
        n = self.count
        mean_x, mean_y = self.sum_x / n, self.sum_y / n
        cov_xx = self.sum_xx / n - mean_x[:, None] * mean_x[None, :]
        cov_xy = self.sum_xy / n - mean_x[:, None] * mean_y[None, :]
        var_y = self.sum_yy / n - (mean_y * mean_y).sum()
        return mean_x + self.shift_x, mean_y + self.shift_y, cov_xx, cov_xy, var_y

    def error(self, weight: Any, bias: Any) -> float:
        """Mean squared error per row (summed over outputs) of ``x W^T + b`` on the data added."""
        mean_x, mean_y, cov_xx, cov_xy, var_y = self._moments()
        w = weight.double()
        spread = var_y - 2 * (w.T * cov_xy).sum() + (w @ cov_xx * w).sum()
        offset = mean_y - w @ mean_x - bias.double()
        return float(spread + (offset * offset).sum())

    def solve(self, weight: Any, ridge: float) -> tuple[Any, Any]:
        """The fit (weight (m, k), bias (m,)), shrunk towards ``weight`` with ``ridge`` relative to
        the mean feature variance."""
        import torch

        mean_x, mean_y, cov_xx, cov_xy, _ = self._moments()
        prior = weight.double().T
        damping = ridge * float(cov_xx.diagonal().mean().clamp(min=1e-12))
        system = cov_xx + damping * torch.eye(cov_xx.shape[0], dtype=torch.float64)
        fitted = prior + torch.linalg.solve(system, cov_xy - cov_xx @ prior)
        return fitted.T, mean_y - fitted.T @ mean_x


def calibration_batches(task: Task, input_names: list[str], samples: int, *, split: str | None = None,
                        batch_size: int = 32, seed: int = 0) -> list[Batch]:
    """``samples`` random sequences of ``split``, batched by length so padding costs little. The
    default is the train split (calibration when there is none): a fit needs many more tokens than
    the FFN has neurons, more than a small calibration split holds."""
    import torch

    data = task.split(split or ("train" if "train" in task.splits else "calibration"))
    chosen = np.random.default_rng(seed).permutation(len(data))[:samples]
    mask = data.inputs.get("attention_mask")
    if mask is not None and mask.ndim == 2:
        chosen = chosen[np.argsort(mask[chosen].sum(axis=1), kind="stable")]
    batches = []
    for start in range(0, len(chosen), batch_size):
        feeds = trim_padding(data.take(chosen[start : start + batch_size]).inputs)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
        batches.append(([tensors[n] for n in input_names], tensors.get("attention_mask")))
    return batches


class _Stop(Exception):
    """Ends a forward pass once the layer of interest has been seen."""


def _captured(module: Any, blocks: list[str], batches: list[Batch], stop: bool) -> Iterable[dict[str, Any]]:
    """Per batch, the inputs (activations, residual) of each of ``blocks``, real tokens only; with
    ``stop`` the forward pass ends at the (single) block, so later layers cost nothing."""
    import torch

    modules = dict(module.named_modules())
    seen: dict[str, Any] = {}
    mask: list[Any] = [None]

    def hook(name: str) -> Any:
        def record(_: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            residual = args[1] if len(args) > 1 else kwargs["input_tensor"]
            seen[name] = (_tokens(hidden, mask[0]), _tokens(residual, mask[0]))
            if stop:
                raise _Stop

        return record

    handles = [modules[name].register_forward_pre_hook(hook(name), with_kwargs=True) for name in blocks]
    try:
        for args, batch_mask in batches:
            seen.clear()
            mask[0] = batch_mask
            with torch.inference_mode(), contextlib.suppress(_Stop):
                module(*args)
            yield dict(seen)
    finally:
        for handle in handles:
            handle.remove()


def _tokens(tensor: Any, mask: Any) -> Any:
    """(batch, seq, d) -> (real tokens, d): padding never enters the statistics."""
    flat = tensor.reshape(-1, tensor.shape[-1])
    return flat if mask is None else flat[mask.reshape(-1).bool()]


def reconstruct_ffns(pruned: Any, original: Any, batches: Iterable[Batch], ridge: float = 1e-3,
                     progress: Callable[[str], None] = lambda message: None,
                     blocks: list[Block] | None = None) -> list[dict[str, Any]]:
    """Re-fit each FFN down-projection (or each of ``blocks``, in forward order) of ``pruned`` (in
    place, layer by layer) so that its layers reproduce ``original``'s on ``batches`` (model args,
    attention mask). Returns, per layer, the mean squared error of the pre-layer-norm sum before
    and after the fit."""
    import torch

    batches = list(batches)
    ffns = find_ffns(pruned) if blocks is None else blocks
    originals = dict(original.named_modules())
    targets: list[list[Any]] = [[] for _ in ffns]  # the unpruned model's pre-layer-norm sums
    for seen in _captured(original, [f.block for f in ffns], batches, stop=False):
        with torch.inference_mode():
            for index, ffn in enumerate(ffns):
                hidden, residual = seen[ffn.block]
                targets[index].append(originals[ffn.down](hidden) + residual)
    modules = dict(pruned.named_modules())
    records = []
    for index, ffn in enumerate(ffns):
        progress(f"reconstructing {ffn.down} ({index + 1}/{len(ffns)})")
        fit = LeastSquares()
        for number, seen in enumerate(_captured(pruned, [ffn.block], batches, stop=True)):
            hidden, residual = seen[ffn.block]
            fit.add(hidden, targets[index][number] - residual)
        targets[index] = []  # free as we go
        down = modules[ffn.down]
        before = fit.error(down.weight.detach(), down.bias.detach())
        weight, bias = fit.solve(down.weight.detach(), ridge)
        with torch.no_grad():
            down.weight.copy_(weight.to(down.weight.dtype))
            down.bias.copy_(bias.to(down.bias.dtype))
        records.append({"layer": ffn.down, "tokens": fit.count, "error_before": before,
                        "error_after": fit.error(weight, bias)})
    return records


__all__ = ["Block", "LeastSquares", "calibration_batches", "find_ffns", "reconstruct_ffns"]
