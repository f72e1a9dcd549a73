"""The distill technique: losses against hand-computed values, student specs, a tiny run that must
improve, exact resumption after an interruption, and clear errors for incompatible students."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compactai import load_model
from compactai.errors import BadInputError, ParameterError, UnknownNameError
from compactai.tasks import Accuracy, EmbeddingFidelity, Split, Task
from compactai.techniques import Context, create_technique
from compactai.techniques.distill.students import parse_student_spec
from compactai.techniques.losses import (
    embedding_loss,
    hidden_state_loss,
    logit_distillation_loss,
    masked_mean_pool,
    soft_target_loss,
)

# -- losses ------------------------------------------------------------------------------------

def test_soft_target_loss_matches_hand_computed_kl():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    # T = 1: teacher (0.75, 0.25), student (0.5, 0.5)
    expected_t1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert soft_target_loss(student, teacher, 1.0).item() == pytest.approx(expected_t1, abs=1e-6)
    # T = 2: teacher logits halved -> (sqrt3, 1) / (1 + sqrt3); scaled by T^2 = 4
    p = math.sqrt(3) / (1 + math.sqrt(3))
    expected_t2 = 4 * (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5))
    assert soft_target_loss(student, teacher, 2.0).item() == pytest.approx(expected_t2, abs=1e-6)


def test_logit_loss_mixes_kl_and_cross_entropy_by_alpha():
    student = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])
    labels = torch.tensor([0, 1])
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    ce = math.log(2.0)  # uniform student over 2 classes
    got = logit_distillation_loss(student, teacher, labels, temperature=1.0, alpha=0.25).item()
    assert got == pytest.approx(0.25 * kl + 0.75 * ce, abs=1e-6)
    assert logit_distillation_loss(student, teacher, labels, 1.0, 0.0).item() == pytest.approx(ce, abs=1e-6)
    with pytest.raises(ValueError, match="labels"):
        logit_distillation_loss(student, teacher, None, 1.0, 0.5)


def test_embedding_losses_and_pooling_by_hand():
    student, teacher = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert embedding_loss(student, teacher, "cosine").item() == pytest.approx(1.0)  # orthogonal
    assert embedding_loss(student, teacher, "mse").item() == pytest.approx((1 + 4) / 2)
    assert embedding_loss(student, teacher, "cosine+mse").item() == pytest.approx(3.5)
    assert embedding_loss(teacher, 3 * teacher, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert masked_mean_pool(hidden, mask).tolist() == [[2.0, 3.0]]  # the padded token is ignored
    other = hidden.clone()
    other[0, 0] += 2.0  # token 0 differs by 2 in both dims -> squared error 4, mean over 2 tokens = 2
    other[0, 2] += 50.0  # padding differences do not count
    assert hidden_state_loss(hidden, other, mask).item() == pytest.approx(2.0)


# -- student specs ------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, error, words", [
    ("layers:", ParameterError, "comma-separated"),
    ("layers:a,b", ParameterError, "comma-separated"),
    ("layers:1,1", ParameterError, "once"),
    ("digits-cnn:12,0", None, None),  # syntax ok; zero width is rejected when built
    ("width:1.5", ParameterError, "(0, 1)"),
    ("self:3", ParameterError, "no arguments"),
    ("tiny-bert:4", UnknownNameError, "choose one of"),
    ("absent/student.pt2", ParameterError, "no such .pt2"),
    ("", ParameterError, "must be a spec"),
    (42, ParameterError, "must be a spec"),
])
def test_student_spec_errors(spec, error, words):
    if error is None:
        assert parse_student_spec(spec).name == "digits-cnn"
        return
    with pytest.raises(error, match=None) as info:
        parse_student_spec(spec)
    assert words in str(info.value)
    assert isinstance(info.value, BadInputError)


class TinyLayer(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.linear(x))


class TinyEncoder(nn.Module):
    """Token embedding + a stack of residual layers: (input_ids, attention_mask) -> token states."""

    def __init__(self, width: int = 8, depth: int = 4, vocab: int = 50) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layer = nn.ModuleList([TinyLayer(width) for _ in range(depth)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        for layer in self.layer:
            x = layer(x)
        return x


def _text_task(teacher_handle, n: int = 96, seq: int = 6) -> Task:
    rng = np.random.default_rng(0)

    def split(size: int) -> Split:
        ids = rng.integers(1, 50, size=(size, seq)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[:, seq - 2:] = rng.integers(0, 2, size=(size, 2))
        return Split({"input_ids": ids, "attention_mask": mask})

    return Task("tiny-text", EmbeddingFidelity(teacher_handle.run_torch, primary="cosine_mean"),
                {"train": split(n), "validation": split(32), "test": split(32)}, baseline=1.0, batch_size=32)


def _encoder_handle(module: nn.Module):
    ids = torch.randint(1, 50, (2, 6))
    return load_model(module.eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, name="tiny-encoder")


def test_layer_dropping_copies_teacher_layers(tmp_path):
    torch.manual_seed(0)
    teacher = _encoder_handle(TinyEncoder())
    task = _text_task(teacher)
    before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    out = create_technique("distill", student="layers:1,3", epochs=1, lr=1e-6).apply(
        teacher, Context(task=task, work_dir=tmp_path))
    student = out.module
    assert len(student.layer) == 2
    # initialised from the teacher's layers 1 and 3 (lr 1e-6 barely moves them)
    assert torch.allclose(student.layer[1].linear.weight, teacher.module.layer[3].linear.weight, atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in teacher.module.state_dict().items())  # teacher untouched
    assert out.metadata["history"][-1]["decisions"]["student_params"] < sum(p.numel() for p in teacher.module.parameters())
    with pytest.raises(ParameterError, match="has 4 layers"):
        create_technique("distill", student="layers:0,4").apply(teacher, Context(task=task, work_dir=tmp_path))


def test_frozen_embeddings_stay_the_teachers(tmp_path):
    torch.manual_seed(0)
    teacher = _encoder_handle(TinyEncoder(depth=2))
    out = create_technique("distill", student="layers:1", epochs=1, lr=1e-2, freeze="embeddings",
                           dropout="off").apply(teacher, Context(task=_text_task(teacher, n=64), work_dir=tmp_path))
    assert torch.equal(out.module.embed.weight, teacher.module.embed.weight)
    assert not torch.allclose(out.module.layer[0].linear.weight, teacher.module.layer[1].linear.weight)


def test_layer_dropping_needs_a_layer_stack(small_handle, tmp_path):
    task = _classification_task(small_handle, size=16)
    with pytest.raises(ParameterError, match="stack of repeated layers"):
        create_technique("distill", student="layers:0").apply(small_handle, Context(task=task, work_dir=tmp_path))


def test_narrower_encoder_student_gets_a_projection_and_learns(tmp_path):
    torch.manual_seed(0)
    teacher = _encoder_handle(TinyEncoder(width=8, depth=2))
    task = _text_task(teacher, n=128)
    torch.manual_seed(1)
    out = create_technique("distill", student=TinyEncoder(width=4, depth=1), epochs=8, lr=2e-2, batch_size=32,
                           patience=8).apply(teacher, Context(task=task, work_dir=tmp_path))
    decisions = out.metadata["history"][-1]["decisions"]
    assert decisions["projection"] is True and decisions["objective"] == "embeddings"
    assert out.run_torch(teacher.example_inputs)[0].shape == teacher.run_torch(teacher.example_inputs)[0].shape
    history = decisions["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert decisions["best_validation"] > history[0]["validation"]


# -- classifiers: a tiny teacher/student run, resumption, shape errors -----------------------------

class MLP(nn.Module):
    def __init__(self, hidden: int, classes: int = 4, features: int = 12) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _classification_task(handle, size: int = 256) -> Task:
    """Labels are the teacher's own predictions, so its accuracy is 1 and a student must learn it."""
    rng = np.random.default_rng(0)
    shape = tuple(d if isinstance(d, int) else 1 for d in handle.inputs[0].shape[1:])
    name = handle.input_names[0]

    def split(n: int) -> Split:
        x = rng.standard_normal((n, *shape)).astype(np.float32)
        return Split({name: x}, handle.run_torch({name: x})[0].argmax(axis=1))

    return Task("tiny", Accuracy(), {"train": split(size), "validation": split(size // 4), "test": split(size // 4)},
                baseline=1.0, batch_size=64)


@pytest.fixture
def mlp_teacher():
    torch.manual_seed(0)
    return load_model(MLP(64).eval(), torch.randn(1, 12), name="mlp-teacher")


def test_tiny_distillation_improves_the_student(mlp_teacher, tmp_path):
    task = _classification_task(mlp_teacher)
    torch.manual_seed(3)
    student = MLP(16)
    before = task.evaluate(load_model(student, torch.randn(1, 12)).run_torch).value
    messages: list[str] = []
    out = create_technique("distill", student=student, epochs=12, lr=1e-2, batch_size=32, alpha=1.0,
                           patience=12).apply(mlp_teacher, Context(task=task, work_dir=tmp_path,
                                                                   progress=messages.append))
    after = task.evaluate(out.run_torch).value
    assert after > before + 0.3 and after >= 0.55, (before, after)
    assert any("validation" in m for m in messages)
    decisions = out.metadata["history"][-1]["decisions"]
    assert decisions["stopped"] == "completed" and decisions["steps"] == 12 * 8
    assert decisions["student_params"] < decisions["teacher_params"]
    assert out.module is not student  # the user's module is copied, not trained in place
    sanity = decisions["sanity"]
    assert sanity["passed"] is True and sanity["final"] > sanity["bar"] > sanity["chance"], sanity


def test_resume_continues_exactly_from_the_checkpoint(mlp_teacher, tmp_path):
    task = _classification_task(mlp_teacher, size=128)
    params = {"student": "self", "epochs": 3, "lr": 5e-3, "batch_size": 32, "alpha": 0.5, "patience": 5, "resume": True,
                  "checkpoint_every": 100}

    def interrupt_after(steps: int):
        def progress(message: str) -> None:
            if getattr(message, "done", 0) >= steps:
                raise KeyboardInterrupt
        return progress

    ctx = Context(task=task, work_dir=tmp_path / "interrupted", progress=interrupt_after(3))
    with pytest.raises(KeyboardInterrupt):  # 4 steps per epoch: progress is reported every step
        create_technique("distill", **params).apply(mlp_teacher, ctx)
    (state_file,) = list((tmp_path / "interrupted").glob("distill-*/state.json"))
    assert '"global_step": 3' in state_file.read_text()
    resumed = create_technique("distill", **params).apply(
        mlp_teacher, Context(task=task, work_dir=tmp_path / "interrupted"))
    straight = create_technique("distill", **params).apply(
        mlp_teacher, Context(task=task, work_dir=tmp_path / "straight"))
    decisions = resumed.metadata["history"][-1]["decisions"]
    assert decisions["resumed_from_step"] == 3 and decisions["steps"] == 3 * 4
    assert straight.metadata["history"][-1]["decisions"]["resumed_from_step"] is None
    for (name, a), (_, b) in zip(resumed.module.state_dict().items(), straight.module.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name  # same as never interrupted
    assert not any(p.suffix == ".pt" for p in (tmp_path / "interrupted").rglob("*"))  # no pickle files


def test_student_with_wrong_number_of_classes_is_a_clear_error(mlp_teacher, tmp_path):
    task = _classification_task(mlp_teacher, size=32)
    with pytest.raises(ParameterError, match=r"shape \(1, 5\) but the teacher's has shape \(1, 4\)"):
        create_technique("distill", student=MLP(8, classes=5)).apply(mlp_teacher, Context(task=task, work_dir=tmp_path))
    with pytest.raises(ParameterError, match="cannot run on the teacher's inputs"):
        create_technique("distill", student=MLP(8, features=7)).apply(mlp_teacher, Context(task=task, work_dir=tmp_path))


def test_time_budget_stops_and_keeps_a_validated_model(mlp_teacher, tmp_path):
    task = _classification_task(mlp_teacher, size=64)
    ctx = Context(task=task, work_dir=tmp_path, deadline=0.0)  # already out of time
    out = create_technique("distill", student="self", epochs=50).apply(mlp_teacher, ctx)
    decisions = out.metadata["history"][-1]["decisions"]
    assert decisions["stopped"] == "time_budget" and decisions["steps"] == 0
    assert decisions["best_validation"] == pytest.approx(1.0)  # the untrained copy of the teacher


def test_time_limit_before_learning_fails_the_sanity_bar(mlp_teacher, tmp_path):
    """A student stopped before it learned is recorded as failing the sanity bar (the CLI exits 3 on it)."""
    task = _classification_task(mlp_teacher, size=64)
    torch.manual_seed(3)
    ctx = Context(task=task, work_dir=tmp_path, deadline=0.0)  # out of time before the first step
    out = create_technique("distill", student=MLP(16), epochs=5).apply(mlp_teacher, ctx)
    decisions = out.metadata["history"][-1]["decisions"]
    sanity = decisions["sanity"]
    assert decisions["steps"] == 0 and sanity["passed"] is False, sanity
    assert sanity["final"] == pytest.approx(sanity["untrained"])  # the returned weights are the untrained ones
    labels = task.split("validation").labels
    assert sanity["chance"] == pytest.approx(np.bincount(labels).max() / len(labels))


def test_quick_params_keep_the_signature_and_export(small_handle, tmp_path):
    from compactai.techniques.distill import Distill

    task = _classification_task(small_handle, size=96)
    out = create_technique("distill", **Distill.quick).apply(small_handle, Context(task=task, work_dir=tmp_path))
    assert out.inputs == small_handle.inputs and out.outputs == small_handle.outputs
    assert out.module is not small_handle.module
    assert out.metadata["history"][-1]["decisions"]["steps"] == 2  # 64 samples, batch 32, one epoch
    onnx = out.to_onnx(tmp_path / "student.onnx")
    assert onnx.path.exists()


def test_parameters_are_validated():
    with pytest.raises(ParameterError, match="temperature"):
        create_technique("distill", temperature=0.5).validate()
    with pytest.raises(ParameterError, match="no parameter 'temprature'"):
        create_technique("distill", temprature=2.0).validate()


# -- command line --------------------------------------------------------------------------------

def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from compactai.cli import main; main()", "distill", *args],
                          capture_output=True, text=True, timeout=600, check=False)


def test_cli_bad_student_spec_exits_2_with_one_line():
    result = _run_cli("--example", "digits", "--student", "layers:x")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "comma-separated non-negative integers" in result.stderr


@pytest.mark.slow
def test_cli_distills_digits_and_writes_model_and_results(tmp_path: Path):
    import json

    result = _run_cli("--example", "digits", "--student", "digits-cnn:4,8,8", "--epochs", "1", "--alpha", "0.5",
                      "--augment", "translate", "--mixup", "1", "--views", "2", "--final-weights", "last", "--json",
                      "--queries", "20", "-o", str(tmp_path / "out"))
    # one epoch does not teach this student (validation stays at chance): the run is honest about it
    # (exit 3, status quality_lost) and still writes the model and its results (anytime)
    assert result.returncode == 3, result.stderr
    data = json.loads(result.stdout)
    assert data["status"] == "quality_lost"
    assert (tmp_path / "out" / "model.onnx").exists()
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["command"] == "distill" and saved["distill"]["student"] == "digits-cnn:4,8,8"
    assert data["student_params"] < data["teacher_params"] / 100
    assert data["measurements"]["onnxruntime"]["latency_p50_ms"] > 0
    assert 0 <= data["quality"]["value"] <= 1
