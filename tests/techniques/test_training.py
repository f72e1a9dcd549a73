"""The shared training loop (early stopping, time limit, resumption, best score) and the one
definition of the layer types pruning and QAT work on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compactai.techniques._training import COMPLETED, EARLY_STOPPING, TIME_BUDGET, LoopState, TrainingLoop
from compactai.techniques.layers import prunable_layer_names, prunable_types, quantizable_types


class Recorder:
    """A fake model: each step appends its batch; validation returns the next scripted score."""

    def __init__(self, scores: list[float]) -> None:
        self.scores = list(scores)
        self.steps: list[tuple[int, int]] = []
        self.kept: list[int] = []  # len(steps) whenever the loop asked to keep the weights

    def loop(self, epochs: int, **options) -> TrainingLoop:
        return TrainingLoop(epochs=epochs, batches=lambda epoch: [(epoch, i) for i in range(4)], step=self.step,
                            validate=lambda: self.scores.pop(0), on_best=lambda: self.kept.append(len(self.steps)),
                            steps_per_epoch=4, **options)

    def step(self, batch: tuple[int, int]) -> float:
        self.steps.append(batch)
        return 1.0 / len(self.steps)


def test_early_stopping_keeps_the_best_and_stops_with_epochs_left():
    run = Recorder([0.5, 0.7, 0.6, 0.65, 0.9])
    result = run.loop(5, patience=2).run()
    assert result.stopped == EARLY_STOPPING and result.epochs_run == 4 and result.steps == 16
    assert result.best_metric == 0.7 and result.best_epoch == 2
    assert run.kept == [4, 8]  # after epochs 1 and 2, the improving ones
    assert [entry["best"] for entry in result.history] == [True, True, False, False]


def test_no_improvement_in_the_last_epoch_is_not_early_stopping():
    result = Recorder([0.5, 0.4]).loop(2, patience=1).run()
    assert result.stopped == COMPLETED and result.epochs_run == 2


def test_validate_first_lets_the_starting_point_stay_the_best():
    run = Recorder([0.8, 0.6, 0.7])
    result = run.loop(2, patience=5, validate_first=True).run()
    assert run.kept == [0] and result.best_epoch == 0 and result.best_metric == 0.8
    assert [entry["validation"] for entry in result.history] == [0.8, 0.6, 0.7]


def test_time_limit_mid_epoch_validates_the_partial_epoch_once():
    run = Recorder([0.5, 0.6])
    result = run.loop(3, out_of_time=lambda: len(run.steps) >= 6).run()
    assert result.stopped == TIME_BUDGET and result.steps == 6 and result.epochs_run == 1.5
    assert [entry["step"] for entry in result.history] == [4, 6] and result.best_metric == 0.6


def test_time_limit_before_any_step_still_scores_the_model():
    run = Recorder([0.3])
    result = run.loop(3, out_of_time=lambda: True).run()
    assert result.stopped == TIME_BUDGET and result.steps == 0 and result.best_metric == 0.3


def test_a_resumed_run_sees_the_batches_an_uninterrupted_one_would():
    straight = Recorder([0.1, 0.2, 0.3])
    straight.loop(3).run()

    class Interrupt(Exception):
        pass

    def stop_at_step_6(state: LoopState) -> None:
        if state.global_step == 6:
            raise Interrupt

    resumed = Recorder([0.1, 0.2, 0.3])
    state = LoopState()
    with pytest.raises(Interrupt):
        resumed.loop(3, after_step=stop_at_step_6).run(state)
    assert (state.epoch, state.step_in_epoch, state.global_step) == (1, 2, 6)
    result = resumed.loop(3).run(state)
    assert resumed.steps == straight.steps and result.steps == 12 and result.stopped == COMPLETED


def test_progress_lines_carry_steps_done_and_total():
    lines: list[str] = []
    Recorder([0.5, 0.6]).loop(2, progress=lines.append, name="fine-tune ").run()
    assert [str(line).split(" loss")[0] for line in lines] == ["fine-tune epoch 1.00/2", "fine-tune epoch 2.00/2"]
    assert [(line.done, line.total) for line in lines] == [(4, 8), (8, 8)]  # type: ignore[attr-defined]


def test_one_definition_of_the_layers_pruning_and_qat_work_on():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv3d(4, 4, 1), nn.ConvTranspose2d(4, 4, 2),
                          nn.Linear(4, 2), nn.BatchNorm2d(4), nn.Embedding(5, 4))
    assert prunable_layer_names(model) == ["0", "1", "2", "3", "4"]
    quantizable = [name for name, layer in model.named_modules() if isinstance(layer, quantizable_types())]
    assert quantizable == ["0", "1", "2", "4"]  # no transposed convolution (see layers.py)
    assert all(issubclass(t, prunable_types()) for t in quantizable_types())


def test_pruning_kd_loss_is_the_distillation_loss():
    from compactai.techniques.losses import logit_distillation_loss
    from compactai.techniques.prune.finetune import classification_loss

    torch.manual_seed(0)
    student, teacher, labels = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    got = classification_loss(kd_weight=0.3, temperature=2.0)(student, teacher, labels, {})
    assert torch.equal(got, logit_distillation_loss(student, teacher, labels, 2.0, 0.3))
    alone = classification_loss(kd_weight=0.3)(student, None, labels, {})  # no teacher: labels alone
    assert torch.equal(alone, nn.functional.cross_entropy(student, labels))
