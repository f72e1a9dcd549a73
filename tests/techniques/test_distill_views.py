"""Distillation on augmented views: exact shifts, blended labels, teacher targets for exactly the
view the student sees, the returned weights (best or last) and the MLP student."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from compactai import load_model
from compactai.errors import ParameterError
from compactai.tasks import Accuracy, Split, Task
from compactai.techniques import Context, create_technique
from compactai.techniques.distill.objectives import LogitObjective
from compactai.techniques.distill.views import ViewBank, make_view_bank


def _image_task(handle, size: int = 64) -> Task:
    """Random 16x16 images labelled by the teacher itself."""
    rng = np.random.default_rng(0)

    def split(n: int) -> Split:
        x = rng.standard_normal((n, 1, 16, 16)).astype(np.float32)
        return Split({"image": x}, handle.run_torch({"image": x})[0].argmax(axis=1))

    return Task("tiny-images", Accuracy(), {"train": split(size), "validation": split(16), "test": split(16)},
                batch_size=32)


def test_shifts_move_pixels_exactly_rolled_or_with_the_border_repeated():
    images = torch.arange(2 * 4 * 5, dtype=torch.float32).reshape(2, 1, 4, 5)
    shifts = torch.tensor([[[1, 0], [0, -2]]])  # one view: sample 0 down 1 row, sample 1 left 2 columns
    index, view = torch.tensor([0, 1]), torch.tensor([0, 0])
    rolled = ViewBank(shifts, wrap=True).inputs(images, index, view)
    assert torch.equal(rolled[0], torch.roll(images[0], 1, dims=-2))
    assert torch.equal(rolled[1], torch.roll(images[1], -2, dims=-1))
    bordered = ViewBank(shifts, wrap=False).inputs(images, index, view)
    assert torch.equal(bordered[0, 0, 0], images[0, 0, 0]) and torch.equal(bordered[0, 0, 1:], images[0, 0, :3])
    assert torch.equal(bordered[1, 0, :, :3], images[1, 0, :, 2:])
    assert bool((bordered[1, 0, :, 3:] == images[1, 0, :, 4:]).all())  # the last column repeated


def test_mixup_views_blend_inputs_and_labels_alike_and_view_0_is_the_sample():
    data = torch.randn(10, 1, 8, 8)
    labels = torch.arange(10) % 3
    bank = make_view_bank("translate", 1.0, 4, data)
    assert bank is not None and bank.count == 4 and bank.weights is not None and bank.partners is not None
    assert make_view_bank("translate", 1.0, 4, data).shifts.equal(bank.shifts)  # drawn from a fixed seed
    assert bool((bank.weights >= 0.5).all()) and bool((bank.shifts.abs() <= 1).all())  # 1/8 of 8 pixels
    index = torch.arange(10)
    assert torch.equal(bank.inputs(data, index, torch.zeros_like(index)), data)  # view 0: the samples themselves
    view = torch.full_like(index, 2)
    blended = bank.labels(labels, index, view, 3)
    assert torch.allclose(blended.sum(1), torch.ones(10))
    weight, partner = bank.weights[2], bank.partners[2]
    own = bank.shift(data, bank.shifts[2])
    other = bank.shift(data[partner], bank.partner_shifts[2])
    expected = weight.view(-1, 1, 1, 1) * own + (1 - weight.view(-1, 1, 1, 1)) * other
    assert torch.allclose(bank.inputs(data, index, view), expected)
    assert make_view_bank("none", 0.0, 4, data) is None


def test_teacher_targets_are_for_exactly_the_view_the_student_sees(small_handle):
    """A student identical to the teacher has zero distillation loss on every augmented batch:
    the precomputed targets are the teacher's outputs on the very images the student is given."""
    task = _image_task(small_handle)
    train = task.split("train")
    objective = LogitObjective(small_handle.module, ["image"], temperature=2.0, alpha=1.0, augment="translate",
                               mixup=1.0, views=5, train=train)
    objective.prepare(train, 32, lambda message: None)
    assert objective.targets is not None and tuple(objective.targets.shape) == (5, len(train), 10)
    generator = torch.Generator().manual_seed(0)
    for batch in torch.arange(len(train)).split(16):
        inputs = {"image": torch.from_numpy(train.inputs["image"][batch.numpy()])}
        loss = objective.loss(small_handle.module, inputs, None, batch, generator)
        assert loss.item() == pytest.approx(0.0, abs=1e-5)
    shifted = LogitObjective(small_handle.module, ["image"], 2.0, 1.0, augment="translate", views=5, train=train)
    assert shifted.name != objective.name  # different views never share cached teacher targets


def test_final_weights_best_or_last(small_handle, tmp_path):
    task = _image_task(small_handle)
    params = {"student": "self", "epochs": 3, "lr": 5e-2, "batch_size": 32, "patience": 3, "augment": "translate",
              "mixup": 1.0, "views": 3}
    for final in ("best", "last"):
        out = create_technique("distill", final_weights=final, **params).apply(
            small_handle, Context(task=task, work_dir=tmp_path / final))
        (run_dir,) = (tmp_path / final).glob("distill-*")
        (last_file,) = run_dir.glob("model-*.safetensors")
        expected = load_file(str(run_dir / ("best.safetensors" if final == "best" else last_file.name)))
        assert all(torch.equal(expected[k], v) for k, v in out.module.state_dict().items()), final
    with pytest.raises(ParameterError, match="final_weights"):
        create_technique("distill", final_weights="first").validate()


def test_augment_and_mixup_need_inputs_they_can_transform(tmp_path):
    torch.manual_seed(0)
    teacher = load_model(nn.Sequential(nn.Linear(12, 4)).eval(), torch.randn(1, 12), name="linear")
    x = np.random.default_rng(0).standard_normal((32, 12)).astype(np.float32)
    task = Task("flat", Accuracy(), {"train": Split({teacher.input_names[0]: x}, np.zeros(32, np.int64)),
                                     "validation": Split({teacher.input_names[0]: x}, np.zeros(32, np.int64))})
    with pytest.raises(ParameterError, match="shifts images"):
        create_technique("distill", student="self", augment="translate").apply(teacher, Context(task=task, work_dir=tmp_path))
    out = create_technique("distill", student="self", mixup=0.5, views=2, epochs=1).apply(
        teacher, Context(task=task, work_dir=tmp_path))  # blending float vectors is fine
    assert out.metadata["history"][-1]["decisions"]["steps"] == 1


def test_mlp_student_has_the_teachers_inputs_and_outputs(small_handle, tmp_path):
    task = _image_task(small_handle, size=32)
    out = create_technique("distill", student="mlp:20,10", epochs=1).apply(small_handle, Context(task=task, work_dir=tmp_path))
    decisions = out.metadata["history"][-1]["decisions"]
    assert decisions["student_params"] == (256 * 20 + 20) + (20 * 10 + 10) + (10 * 10 + 10)
    assert out.run_torch(small_handle.example_inputs)[0].shape == (1, 10)
    with pytest.raises(ParameterError, match="hidden widths must be positive"):
        create_technique("distill", student="mlp:0").apply(small_handle, Context(task=task, work_dir=tmp_path))
