"""load_model: torch modules, ONNX files, Hugging Face directories and torch.export .pt2 files.

Pickle-based files are refused without being opened: unpickling runs arbitrary code.
"""

from __future__ import annotations

import contextlib
import inspect
import zipfile
from collections.abc import Iterator
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

PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".sav"}
SAFE_ALTERNATIVES = (
    "Save the model as ONNX (torch.onnx.export), as a torch.export .pt2 file (torch.export.save), "
    "or save weights as safetensors and pass the nn.Module to compactai.load_model."
)
TEXT_PROBES = ["compactai scales models down.", "A small sentence for tracing the encoder input shapes."]


def load_model(
    source: Any,
    example_inputs: Any = None,
    *,
    name: str | None = None,
    kind: str | None = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
) -> ModelHandle:
    """Load a model into a ModelHandle.

    ``source`` is a ``torch.nn.Module`` (``example_inputs`` required: a tensor, a tuple of
    tensors or a dict by input name), or a path to an ``.onnx`` file, a Hugging Face model
    directory (loaded offline) or a ``torch.export`` ``.pt2`` file.
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
            return load_hf_directory(path, name=name)
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


def is_pickle_file(path: Path) -> bool:
    """True if the file is a pickle stream or a torch.save zip (which holds one). Reads bytes only."""
    with path.open("rb") as stream:
        head = stream.read(4)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle PROTO opcode
        return True
    if head[:2] in (b"(d", b"(l", b"}q", b"]q", b"cc", b"(i"):  # protocol 0/1 opcodes
        return True
    if head == b"PK\x03\x04":
        with contextlib.suppress(zipfile.BadZipFile), zipfile.ZipFile(path) as archive:
            return any(n.endswith(".pkl") for n in archive.namelist()) and not _is_pt2(archive)
    return False


def _is_pt2(archive: zipfile.ZipFile) -> bool:
    return any(n.endswith("archive_format") or "/models/" in n for n in archive.namelist())


def refuse_pickle(path: Path) -> None:
    """Raise UnsafeFormatError for pickle-based files, before anything unpickles them."""
    if path.suffix.lower() in PICKLE_SUFFIXES or (path.suffix.lower() != ".pt2" and is_pickle_file(path)):
        raise UnsafeFormatError(
            f"Refusing to load {path.name}: it is a pickle-based file, and unpickling can run arbitrary "
            f"code. {SAFE_ALTERNATIVES}"
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
    op_types = {n.op_type for n in model.graph.node}
    guessed = "cnn" if "Conv" in op_types else "transformer" if {"Softmax", "Attention"} & op_types else "mlp"
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


class SentenceEncoder:
    """Wraps a Hugging Face encoder so its forward takes (input_ids, attention_mask)
    and returns the last hidden state (token embeddings; pooling happens in the task)."""

    def __new__(cls, model: Any) -> Any:
        import torch

        class _Encoder(torch.nn.Module):
            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.encoder = inner

            def forward(self, input_ids: Any, attention_mask: Any) -> Any:
                return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        return _Encoder(model)


def load_hf_directory(path: Path, *, name: str | None = None) -> ModelHandle:
    """A Hugging Face encoder directory, loaded offline (no hub access), as a sentence encoder."""
    import os

    from compactai.errors import require

    require("transformers", "text")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    for file in path.iterdir():
        pickled = file.suffix in (".bin", ".pt", ".pth", ".pkl") and is_pickle_file(file)
        if pickled and not (path / "model.safetensors").exists():
            raise UnsafeFormatError(
                f"Refusing to load {file}: its weights are pickled. Convert them to model.safetensors "
                f"first. {SAFE_ALTERNATIVES}"
            )
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise CorruptModelError(
            f"Cannot load the Hugging Face model in {path} offline: {str(exc).splitlines()[0][:200]}"
        ) from exc
    encoded = tokenizer(TEXT_PROBES, padding=True, return_tensors="np")
    feeds = {k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    handle = _from_module(SentenceEncoder(model), feeds, name or path.name, "transformer", None, ["last_hidden_state"])
    handle.metadata["hf_directory"] = str(path)
    handle.metadata["hidden_size"] = int(getattr(model.config, "hidden_size", 0))
    return handle


@contextlib.contextmanager
def _weights_only_torch_load() -> Iterator[None]:
    """Force every torch.load inside the block to weights_only=True (torch.export.load
    otherwise falls back to full unpickling when weights_only loading fails)."""
    import torch

    original = torch.load

    def safe_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = original


def load_pt2(path: Path, example_inputs: Any = None, *, name: str | None = None, kind: str | None = None) -> ModelHandle:
    """A torch.export program, loaded with every tensor read as weights only (no unpickling of code)."""
    import torch

    try:
        with _weights_only_torch_load():
            program = torch.export.load(str(path))
    except Exception as exc:
        raise CorruptModelError(
            f"Cannot load {path} as a torch.export program without unpickling ({str(exc).splitlines()[0][:200]}). "
            "Re-save it with torch.export.save, or export to ONNX."
        ) from exc
    module = program.module()
    if example_inputs is None and program.example_inputs is not None:
        example_inputs = tuple(program.example_inputs[0])
    names = [spec.arg.name for spec in program.graph_signature.input_specs if spec.kind.name == "USER_INPUT"]
    handle = _from_module(module, example_inputs, name or path.stem, kind, names or None, None)
    handle.metadata["source"] = str(path)
    return handle
