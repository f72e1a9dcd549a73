"""The ``distill`` technique: build a small student and train it to mimic the teacher."""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from compactai.errors import ParameterError
from compactai.models.handle import ModelHandle, set_eval
from compactai.tasks import EmbeddingFidelity, Task
from compactai.techniques._training import first_output
from compactai.techniques.base import (
    ChoiceParam,
    Context,
    FloatParam,
    IntParam,
    Param,
    Range,
    Technique,
    TypeParam,
    register_technique,
)
from compactai.techniques.distill.objectives import (
    OBJECTIVES,
    EmbeddingObjective,
    LogitObjective,
    Objective,
    to_tensors,
)
from compactai.techniques.distill.students import (
    build_student,
    parameter_count,
    parse_student_spec,
    student_choices,
)
from compactai.techniques.distill.trainer import TrainConfig, Trainer
from compactai.techniques.distill.views import AUGMENTATIONS
from compactai.techniques.losses import EMBEDDING_LOSSES


class ProjectedStudent(nn.Module):
    """A student whose token states are mapped by a learned linear layer to the teacher's width,
    so its embeddings are comparable with the teacher's (and the projection ships with it)."""

    def __init__(self, student: nn.Module, student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.student = student
        self.projection = nn.Linear(student_width, teacher_width)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.projection(first_output(self.student(*inputs)))


def fit_student_output(student: nn.Module, teacher: ModelHandle, objective: str, feeds: dict[str, np.ndarray]) -> nn.Module:
    """Check the student's output can be compared with the teacher's, adding a projection when
    only the embedding width differs; anything else is a ParameterError."""
    inputs = to_tensors(feeds)
    args = [inputs[n] for n in teacher.input_names]
    assert teacher.module is not None
    set_eval(student)
    with torch.no_grad():
        want = tuple(first_output(teacher.module(*args)).shape)
        try:
            got = tuple(first_output(student(*args)).shape)
        except Exception as exc:
            raise ParameterError(
                f"The student cannot run on the teacher's inputs {teacher.input_names}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:160]}. Give a student that takes the same inputs."
            ) from exc
    if got == want:
        return student
    if objective == "embeddings" and len(got) == len(want) and got[:-1] == want[:-1]:
        return ProjectedStudent(student, got[-1], want[-1])
    hint = ("a classifier student needs the teacher's number of classes"
            if objective == "logits" else "an encoder student must return token states or embeddings "
            "of the teacher's rank (a projection is added when only the width differs)")
    raise ParameterError(
        f"The student's output has shape {got} but the teacher's has shape {want}; {hint}."
    )


def choose_objective(requested: str, teacher_output_rank: int, task: Task) -> str:
    if requested != "auto":
        return requested
    if isinstance(task.metric, EmbeddingFidelity) or teacher_output_rank >= 3:
        return "embeddings"
    return "logits"


def validation_scorer(task: Task, input_names: list[str]) -> Any:
    """``score(student) -> float``: the task's metric on its validation split, or None without one."""
    if "validation" not in task.splits:
        return None
    split = task.split("validation")

    def score(student: nn.Module) -> float:
        def predict(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            inputs = to_tensors(feeds)
            return [first_output(student(*[inputs[n] for n in input_names])).detach().numpy()]

        value, _ = task.metric.score(predict, split, task.batch_size)
        return value

    return score


def _score(scorer: Any, student: nn.Module) -> float | None:
    if scorer is None:
        return None
    was_training = student.training
    student.eval()
    with torch.no_grad():
        value = float(scorer(student))
    student.train(was_training)
    return value


def chance_level(task: Task) -> float | None:
    """Accuracy of always answering the most common validation label (None for other metrics)."""
    if task.metric.name != "accuracy" or "validation" not in task.splits:
        return None
    labels = task.split("validation").labels
    if labels is None or len(labels) == 0:
        return None
    return float(np.bincount(np.asarray(labels, dtype=np.int64).ravel()).max() / len(labels))


def sanity_check(task: Task, untrained: float | None, final: float | None) -> dict[str, Any]:
    """Did training produce a model worth keeping (on the validation split)? Classifiers must get
    at least half-way from chance (always the most common label) to the teacher's quality; other
    metrics must beat the untrained student. A time limit that stops training before the student
    learned fails this, and callers must say so (the CLI exits 3) instead of reporting a speed-up."""
    chance = chance_level(task)
    bar: float | None
    if chance is not None:
        teacher = task.baseline if task.baseline is not None and task.baseline > chance else chance
        bar, rule = chance + 0.5 * (teacher - chance), "half-way from chance to the teacher"
    else:
        bar, rule = untrained, "better than the untrained student"
    passed = None if bar is None or final is None else final > bar
    return {"metric": task.metric.name, "split": "validation", "untrained": untrained, "chance": chance,
            "bar": bar, "rule": rule, "final": final, "passed": passed}


def check_augmentable(augment: str, mixup: float, train: Any, input_names: list[str]) -> None:
    """Augmented views transform the first input: shifts need images (samples x ... x H x W),
    mixup needs floats; anything else is a ParameterError before the teacher runs."""
    if augment == "none" and mixup == 0:
        return
    data = train.inputs[input_names[0]]
    if augment != "none" and data.ndim < 3:
        raise ParameterError(
            f"The 'augment' parameter of Distill is '{augment}', which shifts images, but the input "
            f"'{input_names[0]}' has shape {tuple(data.shape)}; use augment='none' for non-image inputs."
        )
    if mixup > 0 and not np.issubdtype(data.dtype, np.floating):
        raise ParameterError(
            f"The 'mixup' parameter of Distill is {mixup:g}, which blends inputs, but the input "
            f"'{input_names[0]}' holds {data.dtype} values (e.g. token ids) that cannot be blended; use mixup=0."
        )


@register_technique
class Distill(Technique):
    """Knowledge distillation: a student (fewer layers, narrower, or any architecture) trained on
    the teacher's soft targets (classifiers) or embeddings (encoders), with early stopping on the
    validation split, a time budget and resumable checkpoints in ``context.work_dir``. Classifiers
    can train on augmented views (shifts, mixup) that the teacher labels, see ``views.py``.

    The teacher is ``context.teacher`` when it is a torch model, else the incoming model; the
    student is built from the incoming model (see ``students.py`` for the specs)."""

    name = "distill"
    family = "distill"
    accepts = ("torch",)
    kinds = ("cnn", "mlp", "transformer", "generic")
    space: ClassVar[dict[str, Param]] = {
        "student": TypeParam((str, nn.Module), "auto"),  # a spec (see students.py), a .pt2 path or a module
        "objective": ChoiceParam(OBJECTIVES, "auto"),
        "temperature": FloatParam(1.0, 20.0, 4.0),
        "alpha": FloatParam(0.0, 1.0, 0.9),
        "embedding_loss": ChoiceParam(EMBEDDING_LOSSES, "cosine+mse"),
        "hidden_weight": FloatParam(0.0, 100.0, 0.0),
        "augment": ChoiceParam(tuple(AUGMENTATIONS), "none"),
        "mixup": FloatParam(0.0, 100.0, 0.0),  # Beta(m, m) blend of two training inputs per view (0: off)
        "views": IntParam(1, 4096, 16),  # augmented views per training sample, each labelled once by the teacher
        "dropout": ChoiceParam(("keep", "off"), "keep"),
        "freeze": ChoiceParam(("none", "embeddings"), "none"),
        "epochs": IntParam(1, 10_000, 10),
        "lr": FloatParam(1e-6, 1.0, 1e-3, log=True, open_high=True),
        "batch_size": IntParam(1, 65_536, 64),
        "weight_decay": FloatParam(0.0, 1.0, 1e-4),
        "patience": IntParam(1, 10_000, 3),
        "final_weights": ChoiceParam(("best", "last"), "best"),  # weights returned: best on validation, or the last step's
        "max_minutes": FloatParam(0.0, 100_000.0, 30.0, open_low=True),
        "checkpoint_every": IntParam(1, 10**9, 100),
        "train_samples": IntParam(0, 10**9, 0),  # use only the first N training samples (0: all)
        "resume": ChoiceParam((False, True), False),
    }
    cost = 3
    fidelity_param = "epochs"
    search_space: ClassVar[dict[str, Range]] = {
        "temperature": FloatParam(1.0, 8.0, 2.0),
        "alpha": FloatParam(0.3, 0.9, 0.5),
        "lr": FloatParam(3e-4, 5e-3, 1e-3, log=True),
    }
    quick: ClassVar[dict[str, Any]] = {"student": "self", "epochs": 1, "batch_size": 32, "max_minutes": 1.0, "patience": 1,
                                       "train_samples": 64}

    @classmethod
    def search_defaults(cls, kind: str) -> dict[str, Any]:
        """For the optimizer: a smaller student built from the incoming model (fewer layers, or
        structurally narrower), trained from the original teacher; budgets suit a search trial."""
        if kind == "transformer":  # the recipe of docs/distillation.md, shortened for a trial
            return {"student": ChoiceParam(("layers:0,2,5", "layers:0,3,5"), "layers:0,2,5"), "epochs": 3,
                    "max_minutes": 8.0, "dropout": "off", "freeze": "embeddings", "batch_size": 32}
        return {"student": ChoiceParam(("width:0.5", "width:0.35"), "width:0.5"), "epochs": 8, "max_minutes": 2.0,
                "augment": "shift" if kind == "cnn" else "none"}

    @classmethod
    def why_not(cls, handle: ModelHandle, task: Task | None) -> str | None:
        reason = super().why_not(handle, task)
        if reason is None and (task is None or "train" not in task.splits):
            reason = "the task data has no train split to train a student on (add 'train/<input>' arrays to --data)"
        return reason

    @classmethod
    def search_defaults_for(cls, handle: ModelHandle, constrained: set[str]) -> dict[str, Any]:
        """Students from this model's real shape: about half or two thirds of its layer stack when
        it has one (a 4-layer BERT keeps layers 0,2 or 0,1,3, never a 6-layer model's 0,2,5);
        else narrower copies when it has layers to prune, else an MLP on the flattened input."""
        settings = dict(cls.search_defaults(handle.kind))
        students = student_choices(handle)
        if students:
            settings["student"] = ChoiceParam(tuple(students), students[0])
        return settings

    def _apply(self, handle: ModelHandle, context: Context, params: dict[str, Any]
               ) -> tuple[ModelHandle, dict[str, Any]]:
        spec = parse_student_spec(params["student"])
        teacher = context.teacher if context.teacher is not None and context.teacher.module is not None else handle
        self.check_accepts(teacher)
        assert teacher.module is not None
        set_eval(teacher.module)
        task = context.task
        train = task.split("train")
        if params["train_samples"]:
            train = train.take(min(params["train_samples"], len(train)))
        torch.manual_seed(context.seed)
        context.progress(f"building student {spec}")
        student = build_student(spec, handle, context)
        feeds = {k: v[:2] for k, v in handle.example_inputs.items()}
        with torch.no_grad():
            inputs = to_tensors(feeds)
            rank = first_output(teacher.module(*[inputs[n] for n in teacher.input_names])).dim()
        objective_name = choose_objective(params["objective"], rank, task)
        student = fit_student_output(student, teacher, objective_name, feeds)
        objective = self.make_objective(objective_name, teacher, params, train)
        if params["freeze"] == "embeddings":  # token tables are most of a small encoder's weights
            for module in student.modules():
                if isinstance(module, nn.Embedding):
                    module.weight.requires_grad_(False)
        rung = context.stop_epoch  # a rung of the optimizer's multi-fidelity schedule: pause there, continue later
        config = TrainConfig(
            epochs=params["epochs"], lr=params["lr"], batch_size=params["batch_size"],
            weight_decay=params["weight_decay"], patience=params["patience"],
            max_minutes=params["max_minutes"] if rung is None else None,
            seed=context.seed, checkpoint_every=params["checkpoint_every"], resume=params["resume"] or rung is not None,
            dropout=params["dropout"] == "keep", final_weights=params["final_weights"], stop_epoch=rung,
        )
        work_dir = context.work_dir / f"distill-{self.run_key(teacher, spec, params, context, len(train))}"
        teacher_key = self.targets_key(teacher, objective, train)
        scorer = validation_scorer(task, teacher.input_names)
        untrained = _score(scorer, student)  # the sanity bar: training must beat the student it started from
        trainer = Trainer(student, objective, train, config, scorer,
                          work_dir, context.progress, context.deadline,
                          targets_file=context.work_dir / f"teacher-targets-{teacher_key}.safetensors")
        result = trainer.run()
        student.eval()
        final = result.best_metric if params["final_weights"] == "best" else _score(scorer, student)
        sanity = sanity_check(task, untrained, final)
        for parameter in student.parameters():
            parameter.requires_grad_(False)
        return handle.derive(module=student, name=f"{handle.name}-distilled"), {
            "student": str(spec), "objective": objective_name, "projection": isinstance(student, ProjectedStudent),
            "teacher": teacher.name, "teacher_params": parameter_count(teacher.module),
            "student_params": parameter_count(student), "epochs_run": result.epochs_run, "steps": result.steps,
            "stopped": result.stopped, "best_validation": result.best_metric,
            "validation_metric": task.metric.name, "resumed_from_step": result.resumed_from_step,
            "seconds": result.seconds, "history": result.history, "checkpoint_dir": str(work_dir),
            "sanity": sanity, "stop_epoch": rung,
        }

    def make_objective(self, name: str, teacher: ModelHandle, params: dict[str, Any], train: Any) -> Objective:
        assert teacher.module is not None
        if name == "embeddings":
            return EmbeddingObjective(teacher.module, teacher.input_names, params["embedding_loss"],
                                      params["hidden_weight"])
        alpha = params["alpha"]
        if alpha < 1 and train.labels is None:
            raise ParameterError(
                f"The 'alpha' parameter of Distill is {alpha:g}, which mixes in hard labels, but the training "
                "split has none; set alpha=1 to distill from the teacher alone."
            )
        check_augmentable(params["augment"], params["mixup"], train, teacher.input_names)
        return LogitObjective(teacher.module, teacher.input_names, params["temperature"], alpha, params["augment"],
                              params["mixup"], params["views"], train)

    @staticmethod
    def targets_key(teacher: ModelHandle, objective: Objective, train: Any) -> str:
        """Precomputed teacher targets depend only on the teacher, the objective and the data."""
        digest = hashlib.sha256(f"{teacher.fingerprint()}:{objective.name}".encode())
        for name in sorted(train.inputs):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(train.inputs[name]).tobytes())
        return digest.hexdigest()[:12]

    @staticmethod
    def run_key(teacher: ModelHandle, spec: Any, params: dict[str, Any], context: Context, samples: int) -> str:
        """Checkpoints are reused only by the same teacher, student, parameters, seed and data size."""
        plain = {k: v for k, v in params.items() if k not in ("resume", "max_minutes")}
        plain["student"] = str(spec)
        text = json.dumps({"teacher": teacher.fingerprint(), "params": plain, "seed": context.seed,
                           "samples": samples}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]
