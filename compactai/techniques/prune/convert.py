"""Models users bring, turned into an ``nn.Module`` with real layers that the pruning engine can shrink.

- ONNX files go through onnx2torch (``Conv`` -> ``nn.Conv2d``, ``Gemm`` -> ``nn.Linear``, ...). The
  converted module is checked against ONNX Runtime on the model's inputs before it is pruned; an
  op onnx2torch has no converter for is named in the refusal.
- ``torch.export`` programs (``.pt2``) hold functional aten ops only, and ``torch.export.unflatten``
  gives back the module tree but not ``nn.Conv2d``/``nn.Linear`` layers; they take the ONNX route.
- Hugging Face ``Conv1D`` layers (GPT-2: weight stored ``(in, out)``, transposed against
  ``nn.Linear``) are swapped for equivalent ``nn.Linear`` layers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from typing import Any

import numpy as np

from compactai.errors import MissingDependencyError, ParityError, UnsupportedFormatError
from compactai.models.handle import ModelHandle, set_eval
from compactai.techniques.layers import prunable_layer_names

PARITY_TOLERANCE = 1e-3  # max abs difference of any output, relative to the output's scale (at least 1)


@contextlib.contextmanager
def _without_torchvision() -> Iterator[None]:
    """onnx2torch imports torchvision for its NMS and RoiAlign converters only. The PyPI torchvision
    wheel does not load against the CPU torch build pinned here ("operator torchvision::nms does not
    exist"), so when torchvision is absent a stand-in module is importable for the duration of the
    import; those two ops then fail at run time, and nothing else depends on it."""
    if importlib.util.find_spec("torchvision") is not None or "torchvision" in sys.modules:
        yield
        return
    stand_in = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")

    def _missing(*args: Any, **kwargs: Any) -> Any:
        raise UnsupportedFormatError("This model uses NMS or RoiAlign, which need torchvision; it cannot be pruned.")

    ops.nms = ops.roi_align = ops.box_convert = _missing  # type: ignore[attr-defined]
    stand_in.ops = ops  # type: ignore[attr-defined]
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = stand_in, ops
    try:
        yield
    finally:
        sys.modules.pop("torchvision", None)
        sys.modules.pop("torchvision.ops", None)


def _onnx2torch() -> Any:
    try:
        with _without_torchvision():
            import onnx2torch
    except ImportError as exc:
        raise MissingDependencyError(
            "Pruning an ONNX or .pt2 model converts it with onnx2torch, which is not installed; "
            "run: pip install --no-deps 'onnx2torch>=1.5.15' (it needs no torchvision for this)."
        ) from exc
    except RuntimeError as exc:  # an installed torchvision built for another torch fails while importing
        raise MissingDependencyError(
            f"onnx2torch cannot be imported ({str(exc).splitlines()[0][:160]}): the installed torchvision does not "
            "match this torch; uninstall torchvision (onnx2torch needs it only for NMS/RoiAlign)."
        ) from exc
    return onnx2torch


def unsupported_ops(model: Any) -> list[str]:
    """``Op (opset N)`` of every node type onnx2torch has no converter for, in graph order."""
    from onnx2torch.node_converters import get_converter

    opsets = {o.domain: o.version for o in model.opset_import}
    missing: list[str] = []
    for node in model.graph.node:
        domain = node.domain or ""
        version = opsets.get(domain, 0)
        try:
            get_converter(domain=domain, operation_type=node.op_type, version=version)
        except NotImplementedError:
            label = f"{domain + '::' if domain else ''}{node.op_type} (opset {version})"
            if label not in missing:
                missing.append(label)
    return missing


def inline_constants(model: Any) -> Any:
    """``Constant`` nodes, and ``Identity`` nodes of initializers (torch's exporter writes one per
    shared weight), turned into initializers: onnx2torch reads a Conv's weight and bias only from
    initializers, and a shared zero bias behind an Identity otherwise stops the conversion. Reshapes
    to constant shapes without a 0 lose their (then meaningless) ``allowzero=1``."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    kept = []
    for node in model.graph.node:
        value = None
        if node.op_type == "Constant" and not node.domain:
            attribute = next((a for a in node.attribute if a.name == "value"), None)
            value = numpy_helper.to_array(attribute.t) if attribute is not None else None
        elif node.op_type == "Identity" and node.input[0] in initializers:
            value = numpy_helper.to_array(initializers[node.input[0]])
        if node.op_type == "Reshape" and node.input[1] in initializers and 0 not in numpy_helper.to_array(
                initializers[node.input[1]]):
            # allowzero only changes what a 0 in the shape means; without a 0 (torch.export writes
            # allowzero=1 everywhere) it is the plain Reshape onnx2torch converts
            for attribute in node.attribute:
                if attribute.name == "allowzero":
                    attribute.i = 0
        if value is None:
            kept.append(node)
            continue
        tensor = numpy_helper.from_array(np.array(value), node.output[0])
        model.graph.initializer.append(tensor)
        initializers[tensor.name] = tensor
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


CONVERTIBLE_OPSETS = (17, 16, 13)  # onnx2torch 1.5 registers converters up to these; torch exports opset 18-20


def _older_opset(model: Any, missing: list[str]) -> tuple[Any, list[str]]:
    """The model converted down to an opset onnx2torch knows (ops such as Identity and Constant gained
    opset versions that it has no converter for, with no change in meaning), with its remaining
    unsupported ops (the fewest any opset leaves, so a refusal names the op that really blocks it)."""
    from onnx import version_converter

    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    for target in (v for v in CONVERTIBLE_OPSETS if v < current):
        try:
            older = version_converter.convert_version(model, target)
        except Exception:  # noqa: BLE001 (an op with no down-conversion: try the next opset, else refuse)
            continue
        left = unsupported_ops(older)
        if len(left) < len(missing):  # what still blocks the conversion is what the refusal names
            model, missing = older, left
        if not left:
            break
    return model, missing


def _convertible(handle: ModelHandle) -> tuple[Any, str | None]:
    """The ONNX model of ``handle`` prepared for onnx2torch (constants inlined, an older opset where
    that removes unsupported ops), and why it cannot be converted (None when it can)."""
    import onnx

    _onnx2torch()
    assert handle.path is not None
    model = inline_constants(onnx.load(str(handle.path)))
    missing = unsupported_ops(model)
    if missing:
        model, missing = _older_opset(model, missing)
    if not missing:
        return model, None
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY

    known = {(d.domain, d.operation_type) for d in _CONVERTER_REGISTRY}
    never = [m for m in missing if (m.rpartition("::")[0], m.split(" ")[0].rpartition("::")[2]) not in known]
    missing = [m.split(" ")[0] + " (no converter at any opset)" for m in never] or missing
    return model, (f"Cannot prune '{handle.name}': onnx2torch has no converter for op {', '.join(missing)}, so the "
                   "ONNX graph cannot become an nn.Module with real layers; prune the torch model before export.")


def conversion_blocker(handle: ModelHandle) -> str | None:
    """Why the ONNX model ``handle`` cannot become a prunable nn.Module (a missing onnx2torch, an op
    it has no converter for), or None. Cheap: nothing is converted."""
    try:
        return _convertible(handle)[1]
    except MissingDependencyError as exc:
        return str(exc)


def why_not_prunable(handle: ModelHandle) -> str | None:
    """For the prune techniques' ``why_not``: an ONNX model prunes through onnx2torch, unless
    its graph cannot be converted (the reason); torch models are not checked here."""
    return conversion_blocker(handle) if handle.framework == "onnx" else None


def onnx_to_module(handle: ModelHandle) -> ModelHandle:
    """A torch handle for the ONNX model ``handle`` (converted by onnx2torch, parity-checked against
    ONNX Runtime on the handle's example inputs). UnsupportedFormatError names the op that blocks it."""
    onnx2torch = _onnx2torch()
    model, blocker = _convertible(handle)
    if blocker:
        raise UnsupportedFormatError(blocker)
    try:
        module = onnx2torch.convert(model)
    except Exception as exc:
        raise UnsupportedFormatError(
            f"Cannot prune '{handle.name}': onnx2torch failed to convert it ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); prune the torch model before export."
        ) from exc
    set_eval(module)
    converted = handle.derive(framework="torch", module=module, path=None,
                              metadata={**handle.metadata, "converted_from": "onnx (onnx2torch)"})
    check_conversion(handle, converted)
    return converted


def check_conversion(source: ModelHandle, converted: ModelHandle) -> float:
    """Largest output difference (relative to the output's scale) between ``source`` run on its own
    runtime and ``converted`` run by torch; ParityError above PARITY_TOLERANCE."""
    from compactai.measure import make_runner

    feeds = source.example_inputs
    try:
        got = converted.run_torch(feeds)
    except Exception as exc:
        raise UnsupportedFormatError(
            f"Cannot prune '{source.name}': the converted nn.Module does not run ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]})."
        ) from exc
    want = make_runner(source, "onnxruntime" if source.framework == "onnx" else "torch").run(feeds)
    worst = 0.0
    for name, a, b in zip(source.output_names, want, got):
        if a.shape != b.shape:
            raise ParityError(f"The nn.Module converted from '{source.name}' gives output '{name}' of shape "
                              f"{b.shape}, not {a.shape}; it cannot be pruned safely.")
        scale = max(1.0, float(np.abs(a).max()) if a.size else 1.0)
        worst = max(worst, float(np.abs(a.astype(np.float64) - b).max()) / scale if a.size else 0.0)
    if worst > PARITY_TOLERANCE:
        raise ParityError(f"The nn.Module converted from '{source.name}' differs from it by {worst:.3g} (relative, "
                          f"tolerance {PARITY_TOLERANCE:g}); it cannot be pruned safely.")
    return worst


def replace_conv1d(module: Any) -> int:
    """Swap every Hugging Face ``Conv1D`` (GPT-2; ``y = x @ W + b`` with ``W`` of shape (in, out)) for
    the equivalent ``nn.Linear`` in place; returns how many were swapped."""
    import torch
    from torch import nn

    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ != "Conv1D" or not hasattr(child, "nf"):
                continue
            inputs, outputs = child.weight.shape
            linear = nn.Linear(inputs, outputs, bias=child.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(child.weight.t())
                if child.bias is not None:
                    linear.bias.copy_(child.bias)
            setattr(parent, name, linear)
            swapped += 1
    return swapped


def prunable_handle(handle: ModelHandle) -> ModelHandle:
    """``handle`` as a torch model with real Conv/Linear layers: ONNX and ``.pt2`` models are converted
    (with a parity check), GPT-2 ``Conv1D`` layers become ``nn.Linear``; other torch models as they are.
    UnsupportedFormatError when no route gives layers to prune."""
    import copy

    if handle.framework == "onnx":
        return onnx_to_module(handle)
    if handle.module is None:
        raise UnsupportedFormatError(f"'{handle.name}' has neither a torch module nor an ONNX file to prune.")
    if any(type(m).__name__ == "Conv1D" and hasattr(m, "nf") for m in handle.module.modules()):
        module = copy.deepcopy(handle.module)
        replace_conv1d(module)
        converted = handle.derive(module=module, metadata={**handle.metadata, "converted_from": "Conv1D -> Linear"})
        check_conversion(handle, converted)
        return converted
    if prunable_layer_names(handle.module):
        return handle
    if type(handle.module).__name__ in ("GraphModule", "InterpreterModule", "UnflattenedModule"):
        # a torch.export program: functional ops, no layers; through ONNX it gets them back
        onnx_handle = handle.to_onnx()
        converted = onnx_to_module(onnx_handle.derive(name=handle.name))
        return converted.derive(metadata={**converted.metadata, "converted_from": "torch.export -> onnx (onnx2torch)"})
    return handle


__all__ = ["PARITY_TOLERANCE", "check_conversion", "conversion_blocker", "onnx_to_module", "prunable_handle",
           "replace_conv1d", "unsupported_ops", "why_not_prunable"]
