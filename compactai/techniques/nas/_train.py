"""Training one NAS candidate on a classification task, through the shared TrainingLoop.

With a teacher the loss is soft-target distillation plus hard labels (``losses.py``). The teacher's
logits are computed once, on the unshifted training inputs, and reused by every candidate and
every shifted view: one teacher pass for the whole search. (Per-view logits cost one pass per
shift: 25 passes of the digits teacher, about as long as the whole search.) The soft targets of a
shifted batch are then the unshifted image's, which assumes the teacher is shift-invariant over
the small shifts used, as a teacher trained with shift augmentation (the digits one) is.
Augmentation for image inputs is a random shift (torch.roll) of up to 1/16 of the image per batch.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from compactai.tasks import Split
from compactai.techniques._training import LoopResult, TrainingLoop
from compactai.techniques.losses import logit_distillation_loss


@dataclass
class TrainSettings:
    max_epochs: int = 18
    # higher than a fine-tuning rate: the first rung decides after 2 epochs, and at 3e-3 a tiny CNN
    # trained from scratch on digits was still at chance there (at 8e-3 it was well above)
    lr: float = 8e-3
    batch_size: int = 64
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the soft targets when a teacher is given
    seed: int = 0


@dataclass
class TeacherViews:
    """The teacher's logits on the training inputs, computed on first use and then reused."""

    predict: Callable[[torch.Tensor], torch.Tensor]
    inputs: torch.Tensor
    logits: torch.Tensor | None = field(default=None, repr=False)

    def of(self, shift: tuple[int, int]) -> torch.Tensor:
        """Soft targets for a batch shifted by ``shift``: the unshifted inputs' (see the module doc)."""
        if self.logits is None:
            with torch.inference_mode():
                self.logits = torch.cat([self.predict(self.inputs[i:i + 256]) for i in range(0, len(self.inputs), 256)])
        return self.logits


def _shifted(x: torch.Tensor, shift: tuple[int, int]) -> torch.Tensor:
    return torch.roll(x, shifts=shift, dims=(2, 3)) if shift != (0, 0) else x


def max_shift(inputs: np.ndarray) -> int:
    """Pixels of random shift for image batches (N, C, H, W): 1/16 of the smaller side; 0 otherwise."""
    return min(inputs.shape[2], inputs.shape[3]) // 16 if inputs.ndim == 4 else 0


def accuracy(model: torch.nn.Module, split: Split, name: str) -> float:
    model.eval()
    with torch.inference_mode():
        x = torch.from_numpy(split.inputs[name])
        predicted = torch.cat([model(x[i:i + 512]).argmax(1) for i in range(0, len(x), 512)])
    return float((predicted.numpy() == split.labels).mean())


def train_candidate(
    model: torch.nn.Module,
    train: Split,
    validation: Split,
    input_name: str,
    settings: TrainSettings,
    teacher: TeacherViews | None,
    after_epoch: Callable[[int, float], bool],
    deadline: float | None,
    progress: Callable[[str], None],
) -> tuple[LoopResult, bool]:
    """Train ``model`` up to ``settings.max_epochs``; after each epoch ``after_epoch(epoch, val)``
    may return True to stop it (the pruner's call). The best validation weights are restored.
    Returns the loop's record and whether ``after_epoch`` stopped it."""
    torch.manual_seed(settings.seed)
    x = torch.from_numpy(train.inputs[input_name])
    y = torch.from_numpy(np.asarray(train.labels)).long()
    shift = max_shift(train.inputs[input_name])
    steps_per_epoch = math.ceil(len(x) / settings.batch_size)
    total = settings.max_epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    # cosine decay over the full schedule: a candidate continued to the last rung sees the whole
    # schedule, one stopped at a rung has trained exactly as the continued ones did up to there
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    best: dict[str, Any] = {"state": copy.deepcopy(model.state_dict())}
    stopped = {"by_pruner": False}

    def batches(epoch: int) -> Any:
        generator = torch.Generator().manual_seed(settings.seed * 1000 + epoch)
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), settings.batch_size):
            offsets = torch.randint(-shift, shift + 1, (2,), generator=generator).tolist() if shift else [0, 0]
            yield order[start:start + settings.batch_size], (int(offsets[0]), int(offsets[1]))

    def step(batch: Any) -> float:
        idx, view = batch
        model.train()
        logits = model(_shifted(x[idx], view))
        if teacher is None:
            loss = F.cross_entropy(logits, y[idx])
        else:
            loss = logit_distillation_loss(logits, teacher.of(view)[idx], y[idx], settings.temperature, settings.alpha)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        return loss.item()

    def after_validation(state: Any) -> None:
        if after_epoch(state.epoch, state.history[-1]["validation"]):
            stopped["by_pruner"] = True

    def keep_best() -> None:
        best["state"] = copy.deepcopy(model.state_dict())

    loop = TrainingLoop(
        epochs=settings.max_epochs, batches=batches, step=step,
        validate=lambda: accuracy(model, validation, input_name), on_best=keep_best,
        out_of_time=lambda: stopped["by_pruner"] or (deadline is not None and time.monotonic() > deadline),
        progress=progress, steps_per_epoch=steps_per_epoch, after_validation=after_validation)
    result = loop.run()
    model.load_state_dict(best["state"])
    model.eval()
    return result, stopped["by_pruner"]


__all__ = ["TeacherViews", "TrainSettings", "accuracy", "max_shift", "train_candidate"]
