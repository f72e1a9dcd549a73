"""Student construction: a small registry of builders, chosen by a text spec.

A spec is ``NAME`` or ``NAME:ARGS``. Builders (``STUDENT_BUILDERS``):

- ``layers:0,2,4``   keep these entries of the teacher's repeated layer stack (e.g. a BERT
                     ``encoder.layer``), initialised from the teacher's weights
- ``width:0.5``      the teacher structurally pruned to keep this fraction of its channels
                     (the ``structured_prune`` technique, through the technique registry)
- ``digits-cnn:12,24,48``  the digits residual CNN at these stage widths (random init)
- ``mlp:128``        a multilayer perceptron on the flattened input, these hidden widths (random init)
- ``self``           a copy of the incoming model (fine-tune a pruned model from the original)
- ``auto``           every other layer of the layer stack if there is one, else ``self``

A path to a ``.pt2`` file (``torch.export.save``) or an ``nn.Module`` given through the
Python API is used as the student architecture as is.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compactai._registry import Registry
from compactai.errors import ParameterError, TechniqueError
from compactai.models.handle import ModelHandle, flatten_outputs
from compactai.models.onnx_teacher import OnnxTeacher
from compactai.models.zoo import digits_resnet

StudentBuilder = Callable[[str, ModelHandle, Any], nn.Module]


@dataclass(frozen=True)
class Builder:
    """A registered student builder and the check of its argument text."""

    build: StudentBuilder
    parse_args: Callable[[str], Any]


STUDENT_BUILDERS: Registry[Builder] = Registry("student builder")


def register_student(name: str, parse_args: Callable[[str], Any] | None = None) -> Callable[[StudentBuilder], StudentBuilder]:
    """Decorator: make a student builder known under ``name``; ``parse_args`` checks the
    text after the colon (raising ParameterError) before any model is touched."""

    def wrap(builder: StudentBuilder) -> StudentBuilder:
        STUDENT_BUILDERS.register(name, Builder(builder, parse_args or (lambda args: args)))
        return builder

    return wrap


@dataclass(frozen=True)
class StudentSpec:
    """A parsed spec: builder name and its argument text, or a .pt2 path / a module."""

    name: str
    args: str = ""
    module: nn.Module | None = None

    def __str__(self) -> str:
        if self.module is not None:
            return f"module:{type(self.module).__name__}"
        return f"{self.name}:{self.args}" if self.args else self.name


def _spec_error(spec: str, why: str) -> ParameterError:
    return ParameterError(f"The 'student' parameter of Distill got {spec!r}: {why}")


def parse_student_spec(spec: Any) -> StudentSpec:
    """Check a student spec's syntax (no model needed) and return it parsed."""
    if isinstance(spec, nn.Module):
        return StudentSpec("module", module=spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ParameterError(
            "The 'student' parameter of Distill must be a spec such as 'layers:0,2,4', 'width:0.5', "
            f"'digits-cnn:12,24,48', 'mlp:128', 'self', a .pt2 path or an nn.Module. Got {spec!r} instead."
        )
    spec = spec.strip()
    if spec.endswith(".pt2"):
        if not Path(spec).expanduser().exists():
            raise _spec_error(spec, "no such .pt2 file. Check the path.")
        from compactai.models.pt2_archive import check_pt2_archive

        check_pt2_archive(Path(spec).expanduser())  # a hostile archive fails here, before any training
        return StudentSpec("pt2", spec)
    name, _, args = spec.partition(":")
    STUDENT_BUILDERS.get(name).parse_args(args)
    return StudentSpec(name, args)


def build_student(spec: StudentSpec, handle: ModelHandle, context: Any) -> nn.Module:
    """A new student module for ``spec`` (never the teacher's own module object)."""
    if spec.module is not None:
        return copy.deepcopy(spec.module)
    if spec.name == "pt2":
        from compactai.models.load import load_pt2

        module = load_pt2(Path(spec.args).expanduser()).module
        assert module is not None  # a .pt2 always loads as a torch module
        return module
    return STUDENT_BUILDERS.get(spec.name).build(spec.args, handle, context)


def _int_list(spec_name: str, example: str) -> Callable[[str], list[int]]:
    def parse(args: str) -> list[int]:
        try:
            values = [int(part) for part in args.split(",")]
        except ValueError:
            values = []
        if not values or any(v < 0 for v in values):
            raise _spec_error(f"{spec_name}:{args}", f"expected comma-separated non-negative integers, e.g. '{example}'.")
        return values

    return parse


def find_layer_stack(module: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The longest ``nn.ModuleList`` of identical layer types (a transformer's layer stack)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, child in module.named_modules():
        repeated = isinstance(child, nn.ModuleList) and len(child) > 1 and len({type(c) for c in child}) == 1
        if repeated and (best is None or len(child) > len(best[1])):
            best = (name, child)
    return best


def _teacher_module(handle: ModelHandle) -> nn.Module:
    if handle.module is None:
        raise TechniqueError(f"Distill needs a torch model to build a student from; '{handle.name}' is {handle.framework}.")
    if isinstance(handle.module, OnnxTeacher):
        raise ParameterError(
            f"'{handle.name}' is an ONNX teacher: it can teach but has no torch layers to copy or cut; use "
            f"student 'auto' (an MLP at half its widths: {', '.join(onnx_student_choices(handle))}), 'mlp:...', "
            "'digits-cnn:...' or a .pt2 student."
        )
    return handle.module


def onnx_student_choices(handle: ModelHandle) -> list[str]:
    """MLP students for an ONNX teacher: half the widths of its hidden Gemm/MatMul layers (at
    least 8), or of a 128-wide layer when it has none (e.g. a CNN with one classifier layer)."""
    import onnx

    assert isinstance(handle.module, OnnxTeacher)
    model = onnx.load(str(handle.module.path), load_external_data=False)
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    widths = []
    for node in model.graph.node:
        if node.op_type in ("Gemm", "MatMul") and len(node.input) > 1 and len(weights.get(node.input[1], [])) == 2:
            dims = weights[node.input[1]]
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            widths.append(dims[0] if trans_b else dims[1])
    hidden = [max(8, w // 2) for w in widths[:-1]] or [128]
    quarter = [max(8, w // 2) for w in hidden]
    return list(dict.fromkeys(["mlp:" + ",".join(map(str, hidden)), "mlp:" + ",".join(map(str, quarter))]))


def _parse_layers(args: str) -> list[int]:
    layers = _int_list("layers", "0,2,4")(args)
    if len(set(layers)) != len(layers):
        raise _spec_error(f"layers:{args}", "each layer may be kept once.")
    return layers


@register_student("layers", _parse_layers)
def drop_layers(args: str, handle: ModelHandle, context: Any) -> nn.Module:
    """The teacher with only the listed layers of its layer stack (weights copied)."""
    keep = _parse_layers(args)
    teacher = _teacher_module(handle)
    found = find_layer_stack(teacher)
    if found is None:
        raise ParameterError(
            f"Student 'layers:{args}' needs a model with a stack of repeated layers (nn.ModuleList), and "
            f"'{handle.name}' has none; use 'width:R' or an architecture such as 'digits-cnn:12,24,48'."
        )
    path, stack = found
    if max(keep) >= len(stack):
        raise ParameterError(
            f"Student 'layers:{args}' keeps layer {max(keep)}, but '{handle.name}' has {len(stack)} layers "
            f"(indices 0 to {len(stack) - 1})."
        )
    student = copy.deepcopy(teacher)
    parent_path, _, attribute = path.rpartition(".")
    parent = student.get_submodule(parent_path) if parent_path else student
    old = getattr(parent, attribute)
    setattr(parent, attribute, nn.ModuleList([old[i] for i in sorted(keep)]))
    for module in student.modules():  # Hugging Face configs record the depth
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "num_hidden_layers", None) == len(stack):
            config.num_hidden_layers = len(keep)
    return student


def _parse_fraction(args: str) -> float:
    try:
        value = float(args)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise _spec_error(f"width:{args}", "expected the fraction of channels to keep, in (0, 1), e.g. 'width:0.5'.")
    return value


@register_student("width", _parse_fraction)
def prune_width(args: str, handle: ModelHandle, context: Any) -> nn.Module:
    """The teacher structurally pruned (by the registered pruning technique) to ``args`` of its channels."""
    from compactai.techniques.base import create_technique

    keep = _parse_fraction(args)
    pruner = create_technique("structured_prune", ratio=round(1 - keep, 6), target="channels", finetune_epochs=0)
    pruned = pruner.apply(handle, context)
    if pruned.module is None:
        raise TechniqueError("The pruning technique returned a model without a torch module; cannot train it.")
    return copy.deepcopy(pruned.module)


@register_student("digits-cnn", _int_list("digits-cnn", "12,24,48"))
def digits_cnn(args: str, handle: ModelHandle, context: Any) -> nn.Module:
    """The digits example's residual CNN with the given stage widths, randomly initialised."""
    widths = tuple(_int_list("digits-cnn", "12,24,48")(args))
    if any(w == 0 for w in widths):
        raise _spec_error(f"digits-cnn:{args}", "widths must be positive.")
    torch.manual_seed(getattr(context, "seed", 0))
    return digits_resnet(widths)


class MLPStudent(nn.Module):
    """Flatten the input, then Linear + ReLU per hidden width, then Linear to the outputs."""

    def __init__(self, features: int, hidden: list[int], outputs: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(features, width), nn.ReLU()]
            features = width
        self.net = nn.Sequential(*layers, nn.Linear(features, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.flatten(x, 1))


@register_student("mlp", _int_list("mlp", "128"))
def mlp(args: str, handle: ModelHandle, context: Any) -> nn.Module:
    """An MLP on the flattened input with the teacher's number of outputs, randomly initialised: a
    student with none of a CNN's built-in knowledge of images, which it can learn from the teacher."""
    hidden = _int_list("mlp", "128")(args)
    if any(w == 0 for w in hidden):
        raise _spec_error(f"mlp:{args}", "hidden widths must be positive.")
    teacher = handle.module if isinstance(handle.module, OnnxTeacher) else _teacher_module(handle)
    if len(handle.input_names) != 1:
        raise ParameterError(
            f"Student 'mlp:{args}' takes one input, and '{handle.name}' has {len(handle.input_names)} "
            f"({', '.join(handle.input_names)}); use 'layers:...' or 'width:R' instead."
        )
    example = torch.from_numpy(np.ascontiguousarray(handle.example_inputs[handle.input_names[0]]))
    with torch.no_grad():
        outputs = flatten_outputs(teacher(example))[0]
    if not example.is_floating_point() or outputs.dim() != 2:
        raise ParameterError(
            f"Student 'mlp:{args}' maps float inputs to one output vector per sample; '{handle.name}' takes "
            f"{example.dtype} inputs and returns shape {tuple(outputs.shape)}. Use 'layers:...' or 'width:R'."
        )
    torch.manual_seed(getattr(context, "seed", 0))
    return MLPStudent(int(example[0].numel()), hidden, int(outputs.shape[-1]))


def _no_args(name: str) -> Callable[[str], str]:
    def parse(args: str) -> str:
        if args:
            raise _spec_error(f"{name}:{args}", f"'{name}' takes no arguments.")
        return args

    return parse


@register_student("self", _no_args("self"))
def copy_of_model(args: str, handle: ModelHandle, context: Any) -> nn.Module:
    """A copy of the incoming model: distill it from the context's teacher (e.g. after pruning)."""
    return copy.deepcopy(_teacher_module(handle))


@register_student("auto", _no_args("auto"))
def automatic(args: str, handle: ModelHandle, context: Any) -> nn.Module:
    """Every other layer of the layer stack when there is one, else a copy of the model (an ONNX
    teacher: an MLP at half its hidden widths)."""
    if isinstance(handle.module, OnnxTeacher):
        return mlp(onnx_student_choices(handle)[0].partition(":")[2], handle, context)
    found = find_layer_stack(_teacher_module(handle))
    if found is None:
        return copy_of_model("", handle, context)
    return drop_layers(",".join(str(i) for i in range(0, len(found[1]), 2)), handle, context)


def student_choices(handle: ModelHandle) -> list[str]:
    """Student specs that fit ``handle`` as it is (its real depth and layers), smallest change first;
    empty when it is not a torch model."""
    module = handle.module
    if module is None:
        return []
    if isinstance(module, OnnxTeacher):
        return onnx_student_choices(handle)
    found = find_layer_stack(module)
    if found is not None:
        depth = len(found[1])
        half = list(range(0, depth, 2))
        two_thirds = sorted({round(i * (depth - 1) / max(1, (2 * depth) // 3 - 1)) for i in range((2 * depth) // 3)})
        choices = [",".join(map(str, keep)) for keep in (two_thirds, half) if 0 < len(keep) < depth]
        return [f"layers:{c}" for c in dict.fromkeys(choices)]
    if any(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) for m in module.modules()):
        return ["width:0.5", "width:0.35"]
    # a torch.export program's module has graph nodes, no layers to narrow: a new MLP student
    if len(handle.input_names) == 1 and np.dtype(handle.inputs[0].dtype).kind == "f":
        return ["mlp:128", "mlp:64"]
    return []


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
