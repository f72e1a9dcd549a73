"""The one training loop: pruning's fine-tuning, QAT and distillation all run through it.

The loop owns what a run looks like from outside: epochs of batches, a validation after each
epoch with the best score kept and early stopping on it, the time limit, progress lines, and
what happened as plain data. What one step does (forward, loss, optimizer, learning-rate
schedule) and how batches are drawn stay with each technique, so each keeps its own
optimisation and its seeded numbers.

Stop reasons: ``completed`` (all epochs ran, or the last one ended without improvement),
``early_stopping`` (``patience`` validations in a row without improvement, with epochs left),
``time_budget`` (the time limit came first; the model is validated once more unless nothing
trained since the last validation).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compactai.models.handle import flatten_outputs

COMPLETED, EARLY_STOPPING, TIME_BUDGET = "completed", "early_stopping", "time_budget"


class ProgressMessage(str):
    """A progress line that also carries (done, total) steps, for progress bars."""

    done: int = 0
    total: int = 0

    @classmethod
    def of(cls, text: str, done: int, total: int) -> ProgressMessage:
        message = cls(text)
        message.done, message.total = done, total
        return message


@dataclass
class LoopState:
    """Where a run is, as plain data (distillation saves it in its checkpoints to resume)."""

    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0
    global_step: int = 0
    best_metric: float | None = None
    bad_validations: int = 0  # validations in a row without improvement
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per validation


@dataclass
class LoopResult:
    """What happened: plain data for a technique's record."""

    epochs_run: float  # finished epochs plus the done fraction of a cut-off one
    steps: int
    stopped: str  # COMPLETED | EARLY_STOPPING | TIME_BUDGET
    best_metric: float | None
    history: list[dict[str, Any]]
    seconds: float

    @property
    def best_epoch(self) -> float | None:
        """The epoch (0: the starting point) of the best validation."""
        best = [entry["epoch"] for entry in self.history if entry["best"]]
        return best[-1] if best else None


def _nothing(*args: Any) -> None:
    return None


@dataclass
class TrainingLoop:
    """One training run. ``batches(epoch)`` gives an epoch's batches (the same ones for the same
    epoch, so a resumed run sees what an uninterrupted one would); ``step(batch)`` runs one
    optimizer step and returns its loss; ``validate()`` scores the model (higher is better)."""

    epochs: int
    batches: Callable[[int], Iterable[Any]]
    step: Callable[[Any], float]
    validate: Callable[[], float] | None = None
    patience: int | None = None
    on_best: Callable[[], None] = _nothing  # the validation just improved: keep these weights
    out_of_time: Callable[[], bool] = lambda: False
    progress: Callable[[str], None] = _nothing
    name: str = ""  # prefix of the progress lines, e.g. "fine-tune "
    validate_first: bool = False  # score the starting point too (it may stay the best)
    steps_per_epoch: int | None = None  # for fractional epochs and progress totals
    after_step: Callable[[LoopState], None] = _nothing
    after_validation: Callable[[LoopState], None] = _nothing
    total_steps: Callable[[], int] | None = None  # for progress bars; default epochs x steps_per_epoch

    def run(self, state: LoopState | None = None) -> LoopResult:
        """Train from ``state`` (a fresh run without it) until an epoch limit, early stopping or
        the time limit; returns what happened. ``state`` is updated in place as the run goes."""
        started = time.monotonic()
        state = state if state is not None else LoopState()
        stopped = COMPLETED
        losses: list[float] = []
        if self.validate_first and not state.history:
            self._validate(state, None)
        while state.epoch < self.epochs and stopped == COMPLETED:
            for batch in itertools.islice(self.batches(state.epoch), state.step_in_epoch, None):
                if self.out_of_time():
                    stopped = TIME_BUDGET
                    break
                losses.append(float(self.step(batch)))
                state.global_step += 1
                state.step_in_epoch += 1
                self.after_step(state)
            if stopped != COMPLETED:
                break
            state.epoch += 1
            state.step_in_epoch = 0
            patience_over = self._validate(state, float(np.mean(losses)) if losses else None)
            losses.clear()
            if state.epoch < self.epochs:
                if patience_over:
                    stopped = EARLY_STOPPING
                elif self.out_of_time():
                    stopped = TIME_BUDGET
        if stopped == TIME_BUDGET and (not state.history or state.history[-1]["step"] != state.global_step):
            self._validate(state, float(np.mean(losses)) if losses else None)
        return LoopResult(
            epochs_run=self._epochs(state), steps=state.global_step, stopped=stopped, best_metric=state.best_metric,
            history=list(state.history), seconds=round(time.monotonic() - started, 2),
        )

    def _epochs(self, state: LoopState) -> float:
        return round(state.epoch + state.step_in_epoch / max(1, self.steps_per_epoch or 1), 3)

    def _validate(self, state: LoopState, loss: float | None) -> bool:
        """Score the model, keep its weights if best; True when patience has run out."""
        metric = None if self.validate is None else float(self.validate())
        improved = metric is not None and (state.best_metric is None or metric > state.best_metric)
        if improved:
            state.best_metric, state.bad_validations = metric, 0
            self.on_best()
        elif metric is not None:
            state.bad_validations += 1
        epochs = self._epochs(state)
        state.history.append({"epoch": epochs, "step": state.global_step, "loss": loss, "validation": metric,
                              "best": improved})
        total = self.total_steps() if self.total_steps is not None else self.epochs * (self.steps_per_epoch or 0)
        self.progress(ProgressMessage.of(
            f"{self.name}epoch {epochs:.2f}/{self.epochs} loss {'-' if loss is None else f'{loss:.4f}'} "
            f"validation {'-' if metric is None else f'{metric:.4f}'}", state.global_step, total))
        self.after_validation(state)
        return metric is not None and self.patience is not None and state.bad_validations >= self.patience


def optimizer_tensors(optimizer: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A torch optimizer's state as flat safetensors-ready tensors plus its param groups as plain data."""
    import torch

    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{index}.{name}"] = tensor.detach().contiguous().clone()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, groups


def load_optimizer(optimizer: Any, tensors: dict[str, Any], groups: list[dict[str, Any]]) -> None:
    """Restore what :func:`optimizer_tensors` saved."""
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = tensor
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def atomic_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON so that a reader never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def first_output(result: Any) -> Any:
    """The first output tensor of a model's result (tensor, tuple, dict or HF ModelOutput)."""
    return flatten_outputs(result)[0]


__all__ = ["COMPLETED", "EARLY_STOPPING", "TIME_BUDGET", "LoopResult", "LoopState", "ProgressMessage",
           "TrainingLoop", "atomic_json", "first_output", "load_optimizer", "optimizer_tensors"]
