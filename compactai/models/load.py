"""load_model: torch modules, ONNX files, Hugging Face directories and torch.export .pt2 files.

Pickle-based files are refused without being unpickled (compactai.models.safety parses their
bytes): unpickling runs arbitrary code. ``.pt2`` archives are inspected before torch reads them
(compactai.models.pt2_archive).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np

from compactai.errors import (
    BadInputError,
    CorruptModelError,
    ModelNotFoundError,
    UnsafeFormatError,
    UnsupportedFormatError,
)
from compactai.models.handle import ModelHandle, TensorSpec, output_specs, set_eval
from compactai.models.hf import TEXT_PROBES, SentenceEncoder, build_hf_model  # noqa: F401 (re-exported: callers import them from here)
from compactai.models.pt2_archive import check_pt2_archive, load_checked_program
from compactai.models.safety import pickle_reason

SAFE_ALTERNATIVES = (
    "Save the model as ONNX (torch.onnx.export), as a torch.export .pt2 file (torch.export.save), "
    "or save weights as safetensors and pass the nn.Module to compactai.load_model."
)
MAX_HF_FILES = 1000  # files of a Hugging Face directory inspected for pickles


def load_model(
    source: Any,
    example_inputs: Any = None,
    *,
    name: str | None = None,
    kind: str | None = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    hf_task: str | None = None,
) -> ModelHandle:
    """Load a model into a ModelHandle.

    ``source`` is a ``torch.nn.Module`` (``example_inputs`` required: a tensor, a tuple of
    tensors or a dict by input name), or a path to an ``.onnx`` file, a Hugging Face model
    directory (loaded offline by its declared architecture, or as ``hf_task``: embedding,
    sequence-classification, token-classification, causal-lm) or a ``torch.export`` ``.pt2`` file.
    """
    if isinstance(source, ModelHandle):
        return source
    try:
        import torch

        if isinstance(source, torch.nn.Module):
            return _from_module(source, example_inputs, name, kind, input_names, output_names)
    except ImportError:  # pragma: no cover - torch is a core dependency
        pass
    if not isinstance(source, (str, Path)):
        raise UnsupportedFormatError(
            f"Cannot load a {type(source).__name__}; pass a torch.nn.Module, or a path to an .onnx file, "
            "a Hugging Face model directory or a .pt2 file."
        )
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"Model not found: {path}. Check the path, or use --example digits|minilm.")
    if path.is_dir():
        if (path / "config.json").exists():
            return load_hf_directory(path, name=name, hf_task=hf_task)
        raise UnsupportedFormatError(
            f"{path} is a directory without config.json; pass a Hugging Face model directory or a model file."
        )
    refuse_pickle(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return load_onnx(path, name=name, kind=kind)
    if suffix == ".pt2":
        return load_pt2(path, example_inputs, name=name, kind=kind)
    if suffix == ".safetensors":
        raise UnsupportedFormatError(
            f"{path.name} holds weights only, not an architecture. Build your nn.Module, call "
            "module.load_state_dict(safetensors.torch.load_file(path)), and pass the module."
        )
    raise UnsupportedFormatError(
        f"Unsupported model format '{suffix or path.name}' for {path}. Use .onnx, .pt2 or a Hugging Face directory."
    )


def refuse_unsafe_file(path: str | Path) -> None:
    """Refuse a model file that would unpickle or run code when loaded, without loading it (a cheap
    check for commands that load other things first)."""
    path = Path(path).expanduser()
    if path.is_file():
        refuse_pickle(path)
        if path.suffix.lower() == ".pt2":
            check_pt2_archive(path)


def refuse_pickle(path: Path) -> None:
    """Raise UnsafeFormatError for pickle-based files, before anything unpickles them.

    A ``.pt2`` always holds one pickle (its torch.save example inputs, read weights-only), so it is
    inspected by :func:`compactai.models.pt2_archive.check_pt2_archive` in :func:`load_pt2` instead.
    """
    if path.suffix.lower() == ".pt2":
        return
    reason = pickle_reason(path)
    if reason:
        raise UnsafeFormatError(
            f"Refusing to load {path.name}: {reason}, and unpickling can run arbitrary code. {SAFE_ALTERNATIVES}"
        )


def load_onnx(path: Path, *, name: str | None = None, kind: str | None = None) -> ModelHandle:
    """An ONNX file, checked with the ONNX checker, with example inputs made from its signature."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises ValidationError, DecodeError, ...
        raise CorruptModelError(
            f"{path} is not a valid ONNX model ({str(exc).splitlines()[0][:200]}). Re-export it."
        ) from exc
    initializers = {i.name for i in model.graph.initializer}
    inputs = [_onnx_spec(v) for v in model.graph.input if v.name not in initializers]
    outputs = [_onnx_spec(v) for v in model.graph.output]
    guessed = kind_from_ops({n.op_type for n in model.graph.node})
    return ModelHandle(
        framework="onnx",
        name=name or path.stem,
        inputs=inputs,
        outputs=outputs,
        example_inputs=synthesize_inputs(inputs),
        path=path.resolve(),
        kind=kind or guessed,
    )


def _onnx_spec(value: Any) -> TensorSpec:
    from onnx import helper

    tensor_type = value.type.tensor_type
    dims: list[int | str] = []
    for i, dim in enumerate(tensor_type.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            dims.append(int(dim.dim_value))
        else:
            dims.append(dim.dim_param or f"dim{i}")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
    return TensorSpec(value.name, tuple(dims), dtype)


def synthesize_inputs(specs: list[TensorSpec], batch: int = 1, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Plausible inputs for a signature: batch axes 1, other dynamic axes ``seq``; masks all ones."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = tuple(d if isinstance(d, int) else (batch if i == 0 else seq) for i, d in enumerate(spec.shape))
        dtype = np.dtype(spec.dtype)
        if dtype.kind in "iu":
            high = 2 if "mask" in spec.name or "type" in spec.name else 1000
            value = np.ones(shape, dtype) if "mask" in spec.name else rng.integers(0, high, shape).astype(dtype)
        elif dtype.kind == "b":
            value = np.ones(shape, dtype)
        else:
            value = rng.standard_normal(shape).astype(dtype)
        feeds[spec.name] = value
    return feeds


def _to_feeds(module: Any, example_inputs: Any, input_names: list[str] | None) -> dict[str, np.ndarray]:
    import torch

    if example_inputs is None:
        raise BadInputError(
            "A torch module needs example_inputs (a tensor, a tuple of tensors, or a dict by input name) "
            "to learn its input signature; pass e.g. example_inputs=torch.randn(1, 3, 32, 32)."
        )
    if isinstance(example_inputs, dict):
        items = list(example_inputs.items())
    else:
        values = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        if input_names is None:
            params = [
                p.name
                for p in inspect.signature(module.forward).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            input_names = params[: len(values)] if len(params) >= len(values) else None
        names = input_names or [f"input_{i}" for i in range(len(values))]
        items = list(zip(names, values))
    feeds = {}
    for key, value in items:
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        feeds[key] = array
    return feeds


# torch.export (aten) operators -> the ONNX op type they export to, for kind_from_ops
_ATEN_AS_ONNX = {"convolution": "Conv", "conv1d": "Conv", "conv2d": "Conv", "conv3d": "Conv",
                 "softmax": "Softmax", "_softmax": "Softmax", "scaled_dot_product_attention": "Attention"}


def kind_from_ops(op_types: set[str]) -> str:
    """cnn / transformer / mlp from the op types of a graph (ONNX names; aten names of a
    torch.export program are mapped to them first), so an ONNX file and a .pt2 of the same
    model get the same kind."""
    if "Conv" in op_types:
        return "cnn"
    if {"Softmax", "Attention", "MultiHeadAttention"} & op_types:
        return "transformer"
    return "mlp"


def program_op_types(program: Any) -> set[str]:
    """The ops of a torch.export program, named as ONNX would name them where kind_from_ops cares."""
    names = set()
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        packet = getattr(getattr(node.target, "overloadpacket", None), "__name__", str(node.target))
        names.add(_ATEN_AS_ONNX.get(packet, packet))
    return names


def guess_kind(module: Any) -> str:
    """cnn / transformer / mlp, from the layer types a module contains."""
    import torch

    names = {type(m).__name__.lower() for m in module.modules()}
    if any(isinstance(m, torch.nn.Conv2d) for m in module.modules()):
        return "cnn"
    if any("attention" in n or "transformer" in n for n in names):
        return "transformer"
    return "mlp"


def _from_module(
    module: Any,
    example_inputs: Any,
    name: str | None,
    kind: str | None,
    input_names: list[str] | None,
    output_names: list[str] | None,
) -> ModelHandle:
    import torch

    set_eval(module)
    feeds = _to_feeds(module, example_inputs, input_names)
    args = tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values())
    try:
        outputs = output_specs(module, args, output_names)
    except Exception as exc:
        raise BadInputError(
            f"Running {type(module).__name__} on the example inputs failed: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}. Pass example inputs the model accepts."
        ) from exc
    inputs = []
    for key, value in feeds.items():
        dynamic = ["batch"] + (["sequence"] if value.ndim == 2 and value.dtype.kind in "iu" else [])
        shape = tuple(dynamic[i] if i < len(dynamic) else int(d) for i, d in enumerate(value.shape))
        inputs.append(TensorSpec(key, shape, value.dtype.name))
    if any(len(s.shape) >= 2 and s.shape[1] == "sequence" for s in inputs):
        outputs = [
            TensorSpec(o.name, ("batch", "sequence", *o.shape[2:]), o.dtype) if len(o.shape) >= 3 else o
            for o in outputs
        ]
    return ModelHandle(
        framework="torch",
        name=name or type(module).__name__,
        inputs=inputs,
        outputs=outputs,
        example_inputs=feeds,
        module=module,
        kind=kind or guess_kind(module),
    )


def load_hf_directory(path: Path, *, name: str | None = None, hf_task: str | None = None) -> ModelHandle:
    """A Hugging Face directory, loaded offline (no hub access) by its declared architecture
    (``config.architectures``; ``hf_task`` overrides): classifiers and causal LMs keep their heads
    and output logits, bare encoders load as sentence encoders (see :mod:`compactai.models.hf`)."""
    import os

    from compactai.errors import require

    require("transformers", "text")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # transformers is told to read safetensors only (use_safetensors=True), so pickled weights next to
    # model.safetensors are never opened; without it they are all there is, and are refused by content.
    if not (path / "model.safetensors").is_file():
        for file in sorted(path.iterdir())[:MAX_HF_FILES]:
            reason = pickle_reason(file) if file.is_file() else None
            if reason:
                raise UnsafeFormatError(
                    f"Refusing to load {file}: {reason}, so its weights are pickled. Convert them to "
                    f"model.safetensors first. {SAFE_ALTERNATIVES}"
                )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    loaded = build_hf_model(path, hf_task)
    handle = _from_module(loaded.module, loaded.feeds, name or path.name, "transformer", None, [loaded.output_name])
    handle.metadata.update(loaded.metadata)
    return handle


def load_pt2(path: Path, example_inputs: Any = None, *, name: str | None = None, kind: str | None = None) -> ModelHandle:
    """A torch.export program, loaded with every tensor read as weights only (no unpickling of code)."""

    check_pt2_archive(path)  # refuses pickled objects, compiled code and exec-ed strings before torch reads it
    try:
        program = load_checked_program(path, checked=True)
    except Exception as exc:
        raise CorruptModelError(
            f"Cannot load {path} as a torch.export program without unpickling ({str(exc).splitlines()[0][:200]}). "
            "Re-save it with torch.export.save, or export to ONNX."
        ) from exc
    module = program.module()
    if example_inputs is None and program.example_inputs is not None:
        example_inputs = tuple(program.example_inputs[0])
    names = [spec.arg.name for spec in program.graph_signature.input_specs if spec.kind.name == "USER_INPUT"]
    # the program's module holds graph nodes, not nn.Conv2d layers: the kind comes from its ops
    kind = kind or kind_from_ops(program_op_types(program))
    handle = _from_module(module, example_inputs, name or path.stem, kind, names or None, None)
    handle.metadata["source"] = str(path)
    return handle
