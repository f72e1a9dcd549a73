"""What the student learns from the teacher: logits (classifiers) or embeddings (encoders).

An objective precomputes the teacher's targets for the training split once (``prepare``)
when the inputs do not change between epochs, and turns a batch into a loss (``loss``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from compactai.tasks import Split, trim_padding
from compactai.techniques._training import first_output
from compactai.techniques.distill.views import make_view_bank
from compactai.techniques.losses import (
    embedding_loss,
    hidden_state_loss,
    logit_distillation_loss,
    masked_mean_pool,
)

OBJECTIVES = ("auto", "logits", "embeddings")


def to_tensors(feeds: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in feeds.items()}


def sorted_batches(split: Split, batch_size: int) -> list[np.ndarray]:
    """Index batches in order of sequence length (less padding), or in order without a mask."""
    mask = split.inputs.get("attention_mask")
    order = np.argsort(mask.sum(axis=1), kind="stable") if mask is not None else np.arange(len(split))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class Objective:
    """Base: ``targets`` holds precomputed teacher outputs (one row per training sample) or None."""

    name = "objective"

    def __init__(self, teacher: nn.Module, input_names: list[str]) -> None:
        self.teacher = teacher
        self.input_names = input_names
        self.targets: torch.Tensor | None = None

    @property
    def needs_targets(self) -> bool:
        """True when ``prepare`` should precompute the teacher's targets for the training split."""
        return False

    def run_teacher(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return first_output(self.teacher(*[inputs[n] for n in self.input_names]))

    def target_rows(self, output: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return output

    def prepare(self, split: Split, batch_size: int, progress: Callable[[str], None]) -> None:
        """Run the teacher once over ``split`` and keep one target row per sample."""
        rows: list[torch.Tensor] = [torch.empty(0)] * len(split)
        batches = sorted_batches(split, batch_size)
        for number, index in enumerate(batches):
            inputs = to_tensors(trim_padding({k: v[index] for k, v in split.inputs.items()}))
            targets = self.target_rows(self.run_teacher(inputs), inputs)
            for row, i in zip(targets, index):
                rows[int(i)] = row
            if number % 20 == 0:
                progress(f"teacher targets {min((number + 1) * batch_size, len(split))}/{len(split)}")
        self.targets = torch.stack(rows)

    def loss(self, student: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None,
             index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


class LogitObjective(Objective):
    """Soft-target KL at temperature T mixed with hard-label cross-entropy by alpha.

    With ``augment`` or ``mixup`` the student trains on augmented views of the training inputs
    (``views.py``): the teacher's logits are precomputed for every view (views x samples x
    classes) and every sample of a batch gets one of its views at random, so the teacher always
    labels exactly what the student sees. Hard labels of blended views are blended one-hot labels."""

    def __init__(self, teacher: nn.Module, input_names: list[str], temperature: float, alpha: float,
                 augment: str = "none", mixup: float = 0.0, views: int = 1, train: Split | None = None) -> None:
        super().__init__(teacher, input_names)
        self.temperature, self.alpha, self.augment, self.mixup = temperature, alpha, augment, mixup
        self.data = torch.from_numpy(np.ascontiguousarray(train.inputs[input_names[0]])) if train is not None else None
        self.labels = torch.from_numpy(train.labels) if train is not None and train.labels is not None else None
        self.bank = make_view_bank(augment, mixup, views, self.data) if self.data is not None else None
        self.views = self.bank.count if self.bank is not None else 1

    @property
    def name(self) -> str:  # type: ignore[override]
        if self.bank is None:
            return "logits"
        return f"logits-{self.augment}{self.views}" + (f"-mixup{self.mixup:g}" if self.mixup else "")

    @property
    def needs_targets(self) -> bool:
        return self.alpha > 0  # alpha 0 is training on labels alone: no teacher needed

    def prepare(self, split: Split, batch_size: int, progress: Callable[[str], None]) -> None:
        if self.bank is None or self.data is None:
            super().prepare(split, batch_size, progress)
            assert self.targets is not None
            self.targets = self.targets.unsqueeze(0)  # one view: the inputs as they are
            return
        per_view = []
        every = torch.arange(len(self.data))
        for view in range(self.views):
            outputs = []
            for index in every.split(batch_size):
                inputs = to_tensors({k: v[index.numpy()] for k, v in split.inputs.items()})
                inputs[self.input_names[0]] = self.bank.inputs(self.data, index, torch.full_like(index, view))
                outputs.append(self.run_teacher(inputs))
            per_view.append(torch.cat(outputs))
            progress(f"teacher targets: view {view + 1}/{self.views}")
        self.targets = torch.stack(per_view)

    def loss(self, student: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None,
             index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        view = torch.zeros_like(index)
        if self.bank is not None and self.data is not None:
            view = torch.randint(self.views, (len(index),), generator=generator)
            inputs = {**inputs, self.input_names[0]: self.bank.inputs(self.data, index, view)}
        student_logits = first_output(student(*[inputs[n] for n in self.input_names]))
        if self.bank is not None and self.labels is not None:
            labels = self.bank.labels(self.labels, index, view, student_logits.shape[-1])
        if self.alpha == 0 or self.targets is None:
            teacher_logits = student_logits.detach()  # unused by the loss at alpha 0
        else:
            teacher_logits = self.targets[view, index]
        return logit_distillation_loss(student_logits, teacher_logits, labels, self.temperature, self.alpha)


class EmbeddingObjective(Objective):
    """Mean-pooled sentence embeddings (cosine and/or MSE), optionally token states too."""

    name = "embeddings"

    def __init__(self, teacher: nn.Module, input_names: list[str], loss_kind: str = "cosine+mse",
                 hidden_weight: float = 0.0) -> None:
        super().__init__(teacher, input_names)
        self.loss_kind, self.hidden_weight = loss_kind, hidden_weight

    @property
    def needs_targets(self) -> bool:
        return True

    def target_rows(self, output: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return masked_mean_pool(output, inputs.get("attention_mask")).float()

    def loss(self, student: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None,
             index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mask = inputs.get("attention_mask")
        hidden = first_output(student(*[inputs[n] for n in self.input_names]))
        pooled = masked_mean_pool(hidden, mask)
        if self.targets is not None:
            target = self.targets[index]
            teacher_hidden = self.run_teacher(inputs) if self.hidden_weight > 0 else None
        else:
            teacher_hidden = self.run_teacher(inputs)
            target = masked_mean_pool(teacher_hidden, mask)
        loss = embedding_loss(pooled, target, self.loss_kind)
        if self.hidden_weight > 0 and teacher_hidden is not None and hidden.dim() == 3:
            loss = loss + self.hidden_weight * hidden_state_loss(hidden, teacher_hidden, mask)
        return loss
