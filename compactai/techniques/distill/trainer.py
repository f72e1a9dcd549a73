"""Training a student: what distillation adds to the shared loop (``techniques/_training.py``):
a seeded step with a warm-up + cosine learning rate, a schedule that shrinks to fit the time
budget, resumable checkpoints written without pickle, and the teacher's precomputed targets.

Every step is seeded from (seed, global step) and the learning rate is a pure function of
the step, so a run resumed from a checkpoint continues exactly as if never interrupted.

Checkpoint directory layout::

    state.json                      epoch, step, best metric, history, optimizer hyper-parameters
    model-<step>.safetensors        the student's weights at that step
    optimizer-<step>.safetensors    the optimizer's state tensors
    best.safetensors                the weights with the best validation metric so far

The teacher's precomputed targets are kept next to it (``targets_file``), keyed by teacher and
data only, so runs with other training parameters reuse them.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from compactai.tasks import Split, trim_padding
from compactai.techniques._training import (
    LoopResult,
    LoopState,
    ProgressMessage,
    TrainingLoop,
    atomic_json,
    load_optimizer,
    optimizer_tensors,
)
from compactai.techniques.distill.objectives import Objective, to_tensors

STATE_FILE = "state.json"
BEST_FILE = "best.safetensors"


@dataclass
class TrainConfig:
    """How to train: optimisation, stopping and checkpointing."""

    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    patience: int = 3  # validations without improvement before stopping
    max_minutes: float | None = None
    seed: int = 0
    checkpoint_every: int = 100  # steps; a checkpoint is also written after every epoch
    progress_every: int = 10  # steps
    resume: bool = False
    dropout: bool = True  # False: dropout off while training (closer imitation, faster convergence)
    final_weights: str = "best"  # the weights returned: "best" on validation, or "last" (end of the decayed schedule)
    # pause at the end of this epoch (a rung of a multi-fidelity schedule): the learning-rate schedule stays
    # planned for ``epochs`` and is not shortened to fit a deadline, so a run continued from its checkpoint
    # (``resume``) trains exactly as one uninterrupted run would
    stop_epoch: int | None = None


@dataclass
class TrainResult(LoopResult):
    """What happened (the shared loop's result), and the step a resumed run started from."""

    resumed_from_step: int | None = None


def epoch_batches(split: Split, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Shuffled index batches for one epoch, the same for the same (seed, epoch). With an
    attention mask, samples are grouped by length within chunks so batches carry little padding."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(split), generator=generator)
    mask = split.inputs.get("attention_mask")
    if mask is None:
        return list(order.split(batch_size))
    lengths = torch.from_numpy(mask.sum(axis=1))
    batches: list[torch.Tensor] = []
    for chunk in order.split(batch_size * 20):
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches.extend(chunk.split(batch_size))
    shuffle = torch.randperm(len(batches), generator=generator)
    return [batches[i] for i in shuffle]


def learning_rate(config: TrainConfig, step: int, total_steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero at ``total_steps``: no hidden state (resumable)."""
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class Trainer:
    """Trains ``student`` on ``objective`` over ``train``; ``evaluate(student) -> float`` (higher is
    better) scores it on the validation split after each epoch. The student ends with the best
    validated weights, or with ``config.final_weights == "last"`` the weights of the last step."""

    def __init__(self, student: nn.Module, objective: Objective, train: Split, config: TrainConfig,
                 evaluate: Callable[[nn.Module], float] | None = None, work_dir: Path | None = None,
                 progress: Callable[[str], None] | None = None, deadline: float | None = None,
                 targets_file: Path | None = None) -> None:
        self.targets_file = targets_file
        self.student, self.objective, self.train_split, self.config = student, objective, train, config
        self.evaluate, self.work_dir = evaluate, work_dir
        self.progress = progress or (lambda message: None)
        self.deadline = deadline
        if config.max_minutes is not None:
            budget = time.monotonic() + 60 * config.max_minutes
            self.deadline = budget if deadline is None else min(deadline, budget)
        self.parameters = [p for p in student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.lr, weight_decay=config.weight_decay)
        self.state = LoopState()
        self.total_steps: int | None = None  # planned steps; shortened to fit a time budget
        self.best_weights: dict[str, torch.Tensor] | None = None

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        if self.work_dir is None:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        step = self.state.global_step
        model_file, optimizer_file = f"model-{step}.safetensors", f"optimizer-{step}.safetensors"
        save_model(self.student, str(self.work_dir / model_file))
        tensors, groups = optimizer_tensors(self.optimizer)
        save_file(tensors, str(self.work_dir / optimizer_file))
        atomic_json(self.work_dir / STATE_FILE, {
            **asdict(self.state), "total_steps": self.total_steps, "config": asdict(self.config),
            "model_file": model_file, "optimizer_file": optimizer_file, "param_groups": groups})
        for old in self.work_dir.glob("*-*.safetensors"):  # earlier steps' files
            if old.name not in (model_file, optimizer_file) and old.name.startswith(("model-", "optimizer-")):
                old.unlink(missing_ok=True)

    def load_checkpoint(self) -> bool:
        """Restore weights, optimizer, counters and best weights; False when there is nothing to resume."""
        if self.work_dir is None or not (self.work_dir / STATE_FILE).exists():
            return False
        saved = json.loads((self.work_dir / STATE_FILE).read_text())
        load_model(self.student, str(self.work_dir / saved["model_file"]))
        load_optimizer(self.optimizer, load_file(str(self.work_dir / saved["optimizer_file"])), saved["param_groups"])
        self.state = LoopState(**{f.name: saved[f.name] for f in fields(LoopState)})
        self.total_steps = saved.get("total_steps")
        if (self.work_dir / BEST_FILE).exists():
            self.best_weights = load_file(str(self.work_dir / BEST_FILE))
        return True

    def _save_best(self) -> None:
        self.best_weights = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
        if self.work_dir is not None:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.work_dir / (BEST_FILE + ".tmp")
            save_model(self.student, str(tmp))
            os.replace(tmp, self.work_dir / BEST_FILE)

    def prepare_targets(self) -> None:
        """The teacher's targets for the training split: read from ``targets_file`` when an earlier
        run with the same teacher and data saved them, else computed once and saved there."""
        if not self.objective.needs_targets:
            return
        cached = self.targets_file
        if cached is not None and cached.exists():
            self.objective.targets = load_file(str(cached))["targets"]
            return
        self.objective.prepare(self.train_split, max(self.config.batch_size, 64), self.progress)
        if cached is not None and self.objective.targets is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp")
            save_file({"targets": self.objective.targets.contiguous()}, str(tmp))
            os.replace(tmp, cached)

    # -- the run -----------------------------------------------------------------------------
    def out_of_time(self) -> bool:
        late = self.deadline is not None and time.monotonic() >= self.deadline
        return late or (self.config.stop_epoch is not None and self.state.epoch >= self.config.stop_epoch)

    def batch(self, index: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        rows = index.numpy()
        inputs = to_tensors(trim_padding({k: v[rows] for k, v in self.train_split.inputs.items()}))
        labels = self.train_split.labels
        return inputs, (torch.from_numpy(labels[rows]) if labels is not None else None)

    def score(self) -> float:
        """The student's validation score, in eval mode without gradients."""
        assert self.evaluate is not None
        self.student.eval()
        with torch.no_grad():
            metric = float(self.evaluate(self.student))
        self.student.train()
        return metric

    def run(self) -> TrainResult:
        start = time.monotonic()
        config = self.config
        resumed = self.load_checkpoint() if config.resume else False
        resumed_from = self.state.global_step if resumed else None
        self.prepare_targets()
        steps_per_epoch = len(epoch_batches(self.train_split, config.batch_size, config.seed, 0))
        planned = config.epochs * steps_per_epoch
        self.warmup = max(1, int(config.warmup_fraction * planned))
        # under a time budget the schedule is shortened so the learning rate reaches zero in time
        self.total_steps = min(planned, self.total_steps or planned)
        # at most every progress_every steps, and about ten lines per epoch on small data
        progress_every = max(1, min(config.progress_every, steps_per_epoch // 10))
        recent: deque[float] = deque(maxlen=progress_every)
        train_started = (time.monotonic(), self.state.global_step)

        def step(index: torch.Tensor) -> float:
            loss = self.train_step(index)
            recent.append(loss)
            return loss

        def after_step(state: LoopState) -> None:
            if state.global_step % progress_every == 0:
                epochs = state.epoch + state.step_in_epoch / max(1, steps_per_epoch)
                self.progress(ProgressMessage.of(
                    f"epoch {epochs:.2f}/{config.epochs} step {state.global_step}/{self.total_steps} "
                    f"loss {np.mean(recent):.4f}", state.global_step, self.total_steps or 0))
            self.fit_schedule_to_budget(train_started)
            if state.global_step % config.checkpoint_every == 0:
                self.save_checkpoint()

        loop = TrainingLoop(
            epochs=config.epochs,
            batches=lambda epoch: epoch_batches(self.train_split, config.batch_size, config.seed, epoch),
            step=step, validate=self.score if self.evaluate is not None else None, patience=config.patience,
            on_best=self._save_best,
            out_of_time=lambda: self.out_of_time() or self.state.global_step >= (self.total_steps or 0),
            progress=self.progress, steps_per_epoch=steps_per_epoch, after_step=after_step,
            after_validation=lambda state: self.save_checkpoint(), total_steps=lambda: self.total_steps or 0,
        )
        self.student.train()
        restore_dropout = self.disable_dropout() if not config.dropout else {}
        try:
            result = loop.run(self.state)
        except KeyboardInterrupt:
            self.save_checkpoint()  # Ctrl-C leaves a resumable checkpoint behind
            raise
        finally:
            for module, p in restore_dropout.items():
                module.p = p
        if self.best_weights is not None and config.final_weights == "best":
            self.student.load_state_dict(self.best_weights)
        self.student.eval()
        return TrainResult(**{**vars(result), "seconds": round(time.monotonic() - start, 2)},
                           resumed_from_step=resumed_from)

    def disable_dropout(self) -> dict[Any, float]:
        """Set every dropout probability to 0 (attention implementations read ``Dropout.p`` too);
        returns the original values to restore after training."""
        original = {m: m.p for m in self.student.modules() if isinstance(m, nn.modules.dropout._DropoutNd)}
        for module in original:
            module.p = 0.0
        return original

    def fit_schedule_to_budget(self, started: tuple[float, int], every: int = 10, margin: float = 0.9) -> None:
        """Shorten the schedule when the remaining steps would not fit before the deadline, so the
        learning rate still decays to zero (a model cut off at a high learning rate is worse)."""
        step = self.state.global_step
        done = step - started[1]
        if self.config.stop_epoch is not None or self.deadline is None or self.total_steps is None or done < every or step % every:
            return
        seconds_per_step = (time.monotonic() - started[0]) / done
        # keep time for one validation (estimated as a few steps) at the end
        affordable = step + int(margin * (self.deadline - time.monotonic()) / seconds_per_step) - 5
        if affordable < self.total_steps:
            self.total_steps = max(step + 1, affordable)

    def train_step(self, index: torch.Tensor) -> float:
        """One seeded optimizer step on the samples ``index``; returns the loss."""
        config, step = self.config, self.state.global_step
        assert self.total_steps is not None
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(config, step, self.total_steps, self.warmup)
        torch.manual_seed(config.seed * 1_000_003 + step)  # dropout etc.: same as an uninterrupted run
        generator = torch.Generator().manual_seed(config.seed * 7_919 + step)
        inputs, labels = self.batch(index)
        loss = self.objective.loss(self.student, inputs, labels, index, generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, 5.0)
        self.optimizer.step()
        return float(loss.detach())
