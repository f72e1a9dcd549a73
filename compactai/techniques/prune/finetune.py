"""Fine-tuning after pruning: the task's train split, the validation split for the best checkpoint,
through the shared training loop (``techniques/_training.py``).

The loss is pluggable: any ``loss(student_out, teacher_out, labels, feeds) -> scalar tensor``.
Defaults (built from ``techniques/losses.py``): cross-entropy on labels (optionally plus KL to
the unpruned teacher) for labelled tasks; for embedding tasks (no labels) cosine of the pooled
embeddings + MSE of the token vectors, both against the teacher.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from compactai.errors import BadInputError
from compactai.tasks import Task, trim_padding
from compactai.techniques._training import (
    EARLY_STOPPING,
    LoopState,
    TrainingLoop,
    atomic_json,
    first_output,
    load_optimizer,
    optimizer_tensors,
)
from compactai.techniques.base import CallableParam, Context, FloatParam, IntParam, NoneOr, Param
from compactai.techniques.losses import embedding_loss as pooled_embedding_loss
from compactai.techniques.losses import hidden_state_loss, logit_distillation_loss, masked_mean_pool

Loss = Callable[[Any, Any, Any, dict[str, Any]], Any]

# The fine-tuning parameters structured and unstructured pruning share (one declaration).
FINETUNE_SPACE: dict[str, Param] = {
    "finetune_epochs": IntParam(0, 200, 0),
    "lr": FloatParam(1e-6, 1.0, 1e-3, log=True),
    "kd_weight": FloatParam(0.0, 1.0, 0.0),
    "batch_size": IntParam(1, 4096, 64),
    "max_batches": NoneOr(IntParam(0, 10**9)),  # cap on batches per fine-tune epoch (quick runs)
    "loss": NoneOr(CallableParam(signature="student, teacher, labels, feeds -> loss")),  # default per task
    "augment": NoneOr(CallableParam(signature="list of input tensors -> list")),  # for fine-tuning batches
}


def classification_loss(kd_weight: float = 0.0, temperature: float = 2.0) -> Loss:
    """Cross-entropy on labels, blended with KL(teacher || student) at ``temperature`` when kd_weight > 0."""

    def loss(student: Any, teacher: Any, labels: Any, feeds: dict[str, Any]) -> Any:
        alpha = kd_weight if teacher is not None else 0.0  # no teacher: labels alone
        return logit_distillation_loss(student, student if teacher is None else teacher, labels, temperature, alpha)

    return loss


def embedding_loss(cosine_weight: float = 1.0, mse_weight: float = 1.0) -> Loss:
    """(1 - cosine) of mean-pooled embeddings plus MSE of the token vectors, both against the teacher."""

    def loss(student: Any, teacher: Any, labels: Any, feeds: dict[str, Any]) -> Any:
        if teacher is None:
            raise BadInputError("Fine-tuning an embedding model needs the unpruned teacher's outputs.")
        if student.dim() == 3:
            mask = feeds.get("attention_mask")
            pooled = masked_mean_pool(student, mask), masked_mean_pool(teacher, mask)
            return (cosine_weight * pooled_embedding_loss(*pooled, "cosine")
                    + mse_weight * hidden_state_loss(student, teacher, mask))
        return (cosine_weight * pooled_embedding_loss(student, teacher, "cosine")
                + mse_weight * pooled_embedding_loss(student, teacher, "mse"))

    return loss


def default_loss(task: Task, kd_weight: float = 0.0) -> Loss:
    """Cross-entropy (+KL) when the train split has labels, else the embedding loss."""
    return classification_loss(kd_weight) if task.split("train").labels is not None else embedding_loss()


@dataclass
class FinetuneConfig:
    """How to fine-tune: epochs over the train split (``max_batches`` caps an epoch for quick runs)."""

    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    max_batches: int | None = None
    patience: int = 2
    seed: int = 0
    augment: Callable[[list[Any]], list[Any]] | None = None  # applied to each training batch's inputs


def torch_predict(module: Any, input_names: list[str]) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    """A numpy predict function over a torch module (eval mode, inference mode)."""
    import torch

    from compactai.models.handle import flatten_outputs

    def predict(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        module.eval()
        with torch.inference_mode():
            out = module(*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in input_names])
        return [t.numpy() for t in flatten_outputs(out)]

    return predict


def task_batches(task: Task, split: str, batch_size: int, input_names: list[str], seed: int,
                 max_batches: int | None = None) -> Any:
    """Shuffled (torch args, feeds dict of tensors, labels tensor or None) batches of a split."""
    import torch

    data = task.split(split)
    order = np.random.default_rng(seed).permutation(len(data))
    for count, start in enumerate(range(0, len(data), batch_size)):
        if max_batches is not None and count >= max_batches:
            return
        part = data.take(order[start : start + batch_size])
        feeds = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in trim_padding(part.inputs).items()}
        labels = torch.from_numpy(part.labels) if part.labels is not None else None
        yield [feeds[n] for n in input_names], feeds, labels


def recalibrate_batchnorm(module: Any, input_names: list[str], task: Task, batches: int = 8,
                          batch_size: int = 64, seed: int = 0) -> bool:
    """Re-estimate batch-norm running statistics on the calibration split (after pruning they
    describe channels that no longer exist). Returns False when the module has no batch norm."""
    import torch
    from torch import nn

    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return False
    split = "calibration" if "calibration" in task.splits else "train"
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches below
    module.train()
    with torch.no_grad():
        for args, _, _ in task_batches(task, split, batch_size, input_names, seed, batches):
            module(*args)
    for norm in norms:
        norm.momentum = 0.1
    module.eval()
    return True


def finetune(
    module: Any,
    input_names: list[str],
    task: Task,
    *,
    teacher: Any = None,
    config: FinetuneConfig | None = None,
    loss: Loss | None = None,
    after_step: Callable[[Any], None] | None = None,
    out_of_time: Callable[[], bool] = lambda: False,
    progress: Callable[[str], None] = lambda message: None,
    checkpoint_dir: Path | None = None,
    stop_epoch: int | None = None,
) -> dict[str, Any]:
    """Fine-tune ``module`` in place; keeps the weights with the best validation score (including
    the starting point). ``after_step(module)`` runs after every optimizer step (e.g. re-apply
    sparsity masks). Returns the run as plain data.

    ``stop_epoch`` pauses the run at the end of that epoch (a rung of the optimizer's multi-fidelity
    schedule); the learning-rate schedule stays planned for ``config.epochs``. With ``checkpoint_dir``
    the run saves its state there when it ends and continues from it when called again on a module
    of the same structure, so a run paused at epoch 1 and continued to 3 trains as one run of 3."""
    import torch

    config = config or FinetuneConfig()
    loss = loss or default_loss(task)
    predict = torch_predict(module, input_names)
    best: dict[str, Any] = {}
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    steps_per_epoch = len(task.split("train")) // config.batch_size + 1
    if config.max_batches:
        steps_per_epoch = min(steps_per_epoch, config.max_batches)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, config.epochs * steps_per_epoch))
    if teacher is not None:
        teacher.eval()

    def step(batch: tuple[list[Any], dict[str, Any], Any]) -> float:
        args, feeds, labels = batch
        module.train()  # validation (torch_predict) leaves it in eval mode
        if config.augment is not None:
            args = list(config.augment(args))
        teacher_out = None
        if teacher is not None:
            with torch.no_grad():
                teacher_out = first_output(teacher(*args))
        value = loss(first_output(module(*args)), teacher_out, labels, feeds)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step(module)
        return float(value.detach())

    state, resumed = LoopState(), None
    if checkpoint_dir is not None:
        resumed = _load_checkpoint(checkpoint_dir, module, optimizer, scheduler, best)
        if isinstance(resumed, dict):
            state = LoopState(**{f.name: resumed["loop"][f.name] for f in fields(LoopState)})
            progress(f"fine-tune: continuing from epoch {state.epoch} ({checkpoint_dir.name})")
    record: dict[str, Any] = {"metric": task.metric.name}
    if isinstance(resumed, dict) and resumed["stopped"] == EARLY_STOPPING:  # its patience ran out: nothing to continue
        module.load_state_dict(best["weights"])
        record.update(epochs_run=state.epoch, best_epoch=None, validation=[e["validation"] for e in state.history],
                      stopped=EARLY_STOPPING, seconds=0.0, resumed_from_epoch=state.epoch)
        module.eval()
        return record
    result = TrainingLoop(
        epochs=config.epochs,
        batches=lambda epoch: task_batches(task, "train", config.batch_size, input_names, config.seed + epoch + 1,
                                           config.max_batches),
        step=step, validate=lambda: float(task.evaluate(predict, split="validation").value),
        patience=config.patience, on_best=lambda: best.update(weights=copy.deepcopy(module.state_dict())),
        out_of_time=lambda: out_of_time() or (stop_epoch is not None and state.epoch >= stop_epoch),
        progress=progress, name="fine-tune ", validate_first=True, steps_per_epoch=steps_per_epoch,
    ).run(state)
    if checkpoint_dir is not None:
        _save_checkpoint(checkpoint_dir, module, optimizer, scheduler, best, state, result.stopped)
    module.load_state_dict(best["weights"])
    module.eval()
    record.update(epochs_run=result.epochs_run, best_epoch=result.best_epoch,
                  validation=[entry["validation"] for entry in result.history], stopped=result.stopped,
                  seconds=result.seconds)
    if stop_epoch is not None:
        record["stop_epoch"] = stop_epoch
    if resumed is not None:
        record["resumed_from_epoch" if isinstance(resumed, dict) else "not_resumed"] = (
            resumed["loop"]["epoch"] if isinstance(resumed, dict) else resumed)
    return record


def _shapes(module: Any) -> dict[str, list[int]]:
    return {name: list(tensor.shape) for name, tensor in module.state_dict().items()}


def _save_checkpoint(directory: Path, module: Any, optimizer: Any, scheduler: Any, best: dict[str, Any],
                     state: LoopState, stopped: str) -> None:
    """Weights, best weights and optimizer state as safetensors; counters and the schedule as JSON."""
    from safetensors.torch import save_file, save_model

    directory.mkdir(parents=True, exist_ok=True)
    save_model(module, str(directory / "model.safetensors"))
    save_file({k: v.detach().contiguous().clone() for k, v in best["weights"].items()},
              str(directory / "best.safetensors"))
    tensors, groups = optimizer_tensors(optimizer)
    save_file(tensors, str(directory / "optimizer.safetensors"))
    atomic_json(directory / "state.json", {"loop": asdict(state), "stopped": stopped, "shapes": _shapes(module),
                                           "scheduler": scheduler.state_dict(), "param_groups": groups})


def _load_checkpoint(directory: Path, module: Any, optimizer: Any, scheduler: Any,
                     best: dict[str, Any]) -> dict[str, Any] | str | None:
    """Restore a run saved by :func:`_save_checkpoint` into ``module`` and the optimizer; the saved
    state on success, a reason when there is a checkpoint that does not fit, None when there is none."""
    import json

    from safetensors.torch import load_file, load_model

    if not (directory / "state.json").exists():
        return None
    saved = json.loads((directory / "state.json").read_text())
    if saved.get("shapes") != _shapes(module):
        # pruning measured its way to another structure this time (a latency target): start afresh
        return "the pruned structure differs from the checkpoint's"
    load_model(module, str(directory / "model.safetensors"))
    load_optimizer(optimizer, load_file(str(directory / "optimizer.safetensors")), saved["param_groups"])
    scheduler.load_state_dict(saved["scheduler"])
    best["weights"] = load_file(str(directory / "best.safetensors"))
    return dict(saved)


def finetune_step(module: Any, input_names: list[str], task: Task, params: dict[str, Any], context: Context,
                  step: int, *, teacher: Any, loss: Loss | None,
                  after_step: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Fine-tune after pruning step ``step`` with the ``FINETUNE_SPACE`` parameters in ``params``
    (the one call structured and unstructured pruning share). Returns :func:`finetune`'s record."""
    config = FinetuneConfig(epochs=params["finetune_epochs"], lr=params["lr"], batch_size=params["batch_size"],
                            max_batches=params["max_batches"], seed=context.seed + step, augment=params["augment"])
    # a rung of the optimizer's multi-fidelity schedule pauses the last step's fine-tune (earlier steps'
    # fine-tunes make the model the last step prunes, so they run in full); its checkpoint lives in the
    # step's work directory, which does not depend on the rung
    last = step == params["steps"]
    rung = context.stop_epoch if last else None
    return finetune(module, input_names, task, teacher=teacher, loss=loss, after_step=after_step, config=config,
                    out_of_time=context.out_of_time, progress=context.progress, stop_epoch=rung,
                    checkpoint_dir=context.work_dir / f"finetune-step{step}" if rung is not None else None)


__all__ = ["FinetuneConfig", "Loss", "classification_loss", "default_loss", "embedding_loss", "finetune",
           "finetune_step", "recalibrate_batchnorm", "task_batches", "torch_predict"]
