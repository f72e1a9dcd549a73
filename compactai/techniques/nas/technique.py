"""The ``nas`` technique: neural architecture search as a family the optimizer searches like the others.

Each application builds one architecture of the built-in space for the model's kind, picked by its
parameters, and trains it by distillation from the teacher:

- a transformer (BERT-style encoder): a student that keeps ``layers`` of the teacher's layers
  (chosen by ``init``), each narrowed to ``heads`` heads and ``ffn`` FFN neurons (``encoder.py``);
- a CNN: a MobileNet-style network of ``stages`` stages, each ``depth`` blocks deep, with the same
  kernel, expansion, block type and squeeze-excite in every stage (``compactai nas`` varies them per
  stage; the optimizer keeps one value each so its sampler has fewer dimensions);
- an MLP: ``layers`` hidden layers of ``hidden`` units.

Inside ``compactai optimize`` the optimizer's sampler is the architecture search: every trial's
parameters are one architecture, measured on the runtime like any candidate, and the
multi-fidelity schedule (``search/engine.py``) trains the candidates in rungs of ``epochs``,
continuing the promising ones from their checkpoint. Training is the distillation technique's
(``Distill``): its objectives, trainer, checkpoints and sanity check.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from torch import nn

from compactai.errors import ParameterError
from compactai.models.handle import ModelHandle
from compactai.tasks import Task
from compactai.techniques.base import (
    ChoiceParam,
    Context,
    FloatParam,
    IntParam,
    Param,
    Range,
    Technique,
    register_technique,
)
from compactai.techniques.distill.technique import Distill
from compactai.techniques.nas.build import build_model
from compactai.techniques.nas.encoder import build_encoder, teacher_shape
from compactai.techniques.nas.space import sample_spec, validate_space

FAMILY_OF_KIND = {"transformer": "encoder", "cnn": "cnn", "mlp": "mlp"}
# which parameters describe the architecture, per space family (the rest are training settings)
ARCHITECTURE = {
    "encoder": ("layers", "heads", "ffn", "init"),
    "cnn": ("stages", "depth", "width_mult", "kernel", "expansion", "block", "se", "head"),
    "mlp": ("layers", "hidden", "activation", "dropout"),
}
# the choice names sample_spec asks for, per stage or per size ("depth_1", "heads_for_384"): one parameter each
_PER_PART = re.compile(r"^(?P<name>[a-z_]+?)(_\d+|_for_\d+)$")


@register_technique
class Nas(Technique):
    """Neural architecture search: an architecture from the built-in space of the model's kind
    (encoder students of a transformer teacher, MobileNet-style CNNs, MLPs), built from the
    parameters and distilled from the teacher. The optimizer searches the architecture parameters;
    ``compactai nas`` is the standalone search (per-stage choices, the latency predictor)."""

    name = "nas"
    family = "nas"
    accepts = ("torch",)
    kinds = ("cnn", "mlp", "transformer")
    cost = 3
    fidelity_param = "epochs"
    space: ClassVar[dict[str, Param]] = {
        # architecture (each family reads its own; see ARCHITECTURE)
        "layers": IntParam(1, 24, 2),
        "heads": IntParam(1, 64, 12),
        "ffn": IntParam(1, 65_536, 768),
        "init": ChoiceParam(("spread", "first", "last", "random"), "spread"),
        "stages": IntParam(1, 5, 2),
        "depth": IntParam(1, 6, 1),
        "width_mult": FloatParam(0.1, 4.0, 0.5),
        "kernel": ChoiceParam((3, 5, 7), 3),
        "expansion": IntParam(1, 8, 3),
        "block": ChoiceParam(("separable", "plain"), "separable"),
        "se": ChoiceParam((False, True), False),
        "head": IntParam(0, 4096, 0),
        "hidden": IntParam(1, 4096, 128),
        "activation": ChoiceParam(("relu", "gelu"), "relu"),
        "dropout": FloatParam(0.0, 0.99, 0.0),
        # training (the distillation technique's)
        "epochs": IntParam(1, 10_000, 6),
        "lr": FloatParam(1e-6, 1.0, 1e-3, log=True, open_high=True),
        "batch_size": IntParam(1, 65_536, 32),
        "temperature": FloatParam(1.0, 20.0, 4.0),
        "alpha": FloatParam(0.0, 1.0, 0.7),
        "max_minutes": FloatParam(0.0, 100_000.0, 30.0, open_low=True),
        "views": IntParam(1, 4096, 4),  # CNNs: shifted views per training image, each labelled once by the teacher
        "train_samples": IntParam(0, 10**9, 0),  # use only the first N training samples (0: all)
    }
    # the architecture choices depend on the model's kind: ``search_defaults`` gives them (and fixes lr per kind)
    search_space: ClassVar[dict[str, Range]] = {"lr": FloatParam(3e-4, 1e-2, 1e-3, log=True)}
    quick: ClassVar[dict[str, Any]] = {"epochs": 1, "batch_size": 32, "max_minutes": 1.0, "train_samples": 64,
                                       "views": 1, "stages": 2, "depth": 1, "width_mult": 0.25}

    @classmethod
    def search_defaults(cls, kind: str) -> dict[str, Any]:
        """The built-in space of the kind's family as choices, and training settings for a trial."""
        family = FAMILY_OF_KIND.get(kind)
        if family is None:
            return {}
        choices = validate_space({"family": family, "choices": {}})["choices"]
        settings: dict[str, Any] = {name: ChoiceParam(tuple(choices[name]), choices[name][0])
                                    for name in ARCHITECTURE[family] if len(choices[name]) > 1}
        settings.update({name: choices[name][0] for name in ARCHITECTURE[family] if len(choices[name]) == 1})
        if family == "encoder":  # the distillation recipe of docs/distillation.md
            settings.update({"epochs": 6, "lr": 1e-3, "batch_size": 32})
        else:
            settings.update({"epochs": 18, "lr": 8e-3, "batch_size": 64})
        return settings

    @classmethod
    def search_defaults_for(cls, handle: ModelHandle, constrained: set[str]) -> dict[str, Any]:
        """For a transformer, students smaller than this teacher: fewer layers, at most its heads and FFN width."""
        settings = cls.search_defaults(handle.kind)
        if FAMILY_OF_KIND.get(handle.kind) == "encoder":
            shape = teacher_shape(handle)
            for name in ("layers", "heads", "ffn"):
                allowed = tuple(v for v in settings[name].choices
                                if v < shape[name] or (name != "layers" and v <= shape[name] and shape[name] % v == 0))
                if name == "heads":
                    allowed = tuple(h for h in allowed if shape["hidden"] % h == 0)
                allowed = allowed or (shape[name],)
                # the first trial (seeded with the defaults): about a third of the layers, each at full width,
                # the shape that kept most of MiniLM's fidelity per millisecond in the distillation benchmark
                default = min(allowed, key=lambda v: abs(v - max(1, shape["layers"] // 3))) if name == "layers" \
                    else max(allowed)
                settings[name] = ChoiceParam(allowed, default)
        return settings

    @classmethod
    def why_not(cls, handle: ModelHandle, task: Task | None) -> str | None:
        reason = super().why_not(handle, task)
        if reason is None and (task is None or "train" not in task.splits):
            reason = "the task data has no train split to train an architecture on (add 'train/<input>' arrays to --data)"
        if reason is None and handle.kind == "transformer":
            try:
                teacher_shape(handle)
            except ParameterError as exc:
                reason = str(exc)
        return reason

    def _apply(self, handle: ModelHandle, context: Context, params: dict[str, Any]
               ) -> tuple[ModelHandle, dict[str, Any]]:
        family = FAMILY_OF_KIND.get(handle.kind)
        if family is None:
            raise ParameterError(f"NAS searches encoders, CNNs and MLPs; '{handle.name}' is a {handle.kind} model.")
        spec = self.spec(family, handle, context.task, params)
        if family == "encoder":
            student: nn.Module = build_encoder(spec, handle, seed=context.seed)
        else:
            student = build_model(spec, seed=context.seed)
        distill = Distill(
            student=student, epochs=params["epochs"], lr=params["lr"], batch_size=params["batch_size"],
            temperature=params["temperature"], alpha=params["alpha"], max_minutes=params["max_minutes"],
            views=params["views"], train_samples=params["train_samples"],
            patience=params["epochs"] + 1,  # the schedule decides, not early stopping (rungs compare epochs)
            **({"dropout": "off", "freeze": "embeddings"} if family == "encoder" else
               {"augment": "shift" if family == "cnn" else "none"}))
        result, decisions = distill._apply(handle, context, distill.validate())
        return result.derive(name=f"{handle.name}-nas"), {**decisions, "architecture": spec}

    @staticmethod
    def spec(family: str, handle: ModelHandle, task: Task, params: dict[str, Any]) -> dict[str, Any]:
        """The architecture spec the parameters pick (``space.sample_spec`` with a fixed choice each)."""
        if family == "encoder":
            shape: dict[str, Any] = {"input": {"names": list(handle.input_names)}, "teacher": teacher_shape(handle)}
            params = {**params, "hidden": shape["teacher"]["hidden"]}
        else:
            name = handle.input_names[0]
            example = np.asarray(handle.example_inputs[name])
            shape = {"input": {"name": name, "shape": list(example.shape[1:])}, "classes": _classes(handle, task)}

        def choose(name: str, options: Sequence[Any]) -> Any:
            match = _PER_PART.match(name)
            key = name if name in params else (match.group("name") if match else name)
            value = params[key]
            if value not in options:
                raise ParameterError(f"The NAS parameter '{key}' is {value!r}, which this model does not allow here; "
                                     f"allowed: {list(options)}.")
            return value

        choices = {name: [params[name]] for name in (*ARCHITECTURE[family], *(("hidden",) if family == "encoder" else ()))}
        return sample_spec({"family": family, "choices": choices}, choose, shape)


def _classes(handle: ModelHandle, task: Task) -> int:
    """The number of classes a CNN/MLP student outputs: the width of the teacher's output."""
    import torch

    from compactai.techniques._training import first_output
    from compactai.techniques.distill.objectives import to_tensors

    assert handle.module is not None
    inputs = to_tensors({k: np.asarray(v)[:1] for k, v in handle.example_inputs.items()})
    with torch.no_grad():
        output = first_output(handle.module(*[inputs[n] for n in handle.input_names]))
    if output.dim() != 2:
        raise ParameterError(f"NAS builds CNN and MLP classifiers; '{handle.name}' outputs shape "
                             f"{tuple(output.shape)}, not (batch, classes).")
    return int(output.shape[-1])


__all__ = ["ARCHITECTURE", "FAMILY_OF_KIND", "Nas"]
