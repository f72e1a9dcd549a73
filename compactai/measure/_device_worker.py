"""Runs inside a device runtime's own venv (LiteRT or ExecuTorch), started by ``measure/devices.py``.

Those venvs hold the official converters and runtimes, whose dependency trees must not enter
compactai's environment, and compactai is not installed in them: this file is executed by path
and imports only the standard library, numpy and the venv's own packages.

``convert RUNTIME PROGRAM.pt2 FEEDS.npz OUT [CALIBRATION.npz [static|dynamic]]`` lowers a torch.export program with
the runtime's official tool (LiteRT: ``litert_torch.convert``; ExecuTorch: ``to_edge_transform_and_lower``
with the XNNPACK partitioner). With calibration rows it is int8 through the PT2E flow first, with
the runtime's own quantizer (LiteRT: litert-torch's ``PT2EQuantizer``, passed on as its
``quant_config``; ExecuTorch: ``XNNPACKQuantizer``), symmetric and per-channel, activations static
(calibrated) or dynamic (quantized at run time: weights int8): ``prepare_pt2e``, the rows run
through the prepared program, ``convert_pt2e``. ``serve RUNTIME MODEL THREADS`` then answers requests on stdin/stdout:
each frame is an 8-byte length and a ``.npz`` archive (no pickle) whose ``__request__`` entry is
JSON: ``run`` (the arrays in, the outputs back) or ``time`` (the call timed here, so the pipe
between the processes is not part of a measured latency). A failure prints one line starting
with ``ERROR_MARK`` to stderr: the converter's or runtime's own error.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import time
from typing import Any

import numpy as np

ERROR_MARK = "compactai-device-error: "


def one_line(exc: BaseException) -> str:
    """The converter's own error, first line: where it names the operator (``Lowering not found:
    aten.cumprod.default``); torch's FX interpreter appends the graph context below it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:600]


def convert(runtime: str, program_path: str, feeds_path: str, out: str, calibration_path: str | None = None,
            mode: str = "static") -> None:
    import torch

    # safe: the file is the .pt2 compactai just saved in a private temporary directory and passed
    # through check_pt2_archive (devices.py) before starting this process; compactai is not
    # installed in this venv, so its load_checked_program is not importable: force weights-only
    # torch.load here as it does
    original = torch.load
    torch.load = lambda *a, **k: original(*a, **{**k, "weights_only": True})
    try:
        program = torch.export.load(program_path)
    finally:
        torch.load = original
    args = _arrays(feeds_path)
    calibration = _arrays(calibration_path) if calibration_path else None
    if runtime == "litert":
        import litert_torch

        if calibration is None:
            litert_torch.convert(program.module(), args).export(out)
            return
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
        from litert_torch.quantize.quant_config import QuantConfig

        quantizer = PT2EQuantizer().set_global(
            get_symmetric_quantization_config(is_per_channel=True, is_dynamic=mode == "dynamic"))
        # fold_quantize=False: litert-torch's converter folds the QDQ pairs itself (its PT2E tests do this)
        module = _pt2e_int8(program, quantizer, calibration, len(args[0]), fold_quantize=False)
        litert_torch.convert(module, args, quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(out)
        return
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    if calibration is not None:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )

        class Quantizer(XNNPACKQuantizer):
            def transform_for_annotation(self, model: Any) -> Any:
                return _integer_scalars_kept(super().transform_for_annotation(model))

        quantizer = Quantizer()
        quantizer.set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=mode == "dynamic"))
        module = _pt2e_int8(program, quantizer, calibration, len(args[0]))
        # the quantized graph is exported again, keeping the source program's batch range
        program = torch.export.export(module, args, dynamic_shapes=_batch_shapes(program), strict=False)
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    with open(out, "wb") as file:
        file.write(lowered.buffer)


def _arrays(path: str) -> tuple[Any, ...]:
    import torch

    with np.load(path, allow_pickle=False) as archive:
        return tuple(torch.from_numpy(archive[name]) for name in sorted(archive.files))  # named 000_x, 001_y


def _pt2e_int8(program: Any, quantizer: Any, calibration: tuple[Any, ...], batch: int, **options: Any) -> Any:
    """The program's module quantized by ``quantizer``: observers inserted, the calibration rows
    run through it in batches of ``batch`` (the example's: a static program takes no other; the
    last batch wraps round to the first rows), then converted to quantize/dequantize pairs."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(program.module(), quantizer)
    rows = len(calibration[0])
    with torch.no_grad():
        for start in range(0, rows, batch):
            indices = torch.arange(start, start + batch) % rows
            prepared(*(array[indices] for array in calibration))
    return convert_pt2e(prepared, **options)


def _integer_scalars_kept(model: Any) -> Any:
    """XNNPACKQuantizer's transform_for_annotation turns the scalar of every add/mul into a float32
    buffer, integer arithmetic included, so integer results turn float: MiniLM's attention-mask
    positions (``arange(n) + 0``) then fail as indices ("IndexError: tensors used as indices must be
    long, int, byte or bool tensors"). Those buffers get the dtype of the integer op they feed."""
    import torch

    for node in model.graph.nodes:
        value = node.meta.get("val")
        if node.op != "call_function" or node.target not in (torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor) \
                or value is None or value.dtype.is_floating_point or value.dtype == torch.bool:
            continue
        for arg in node.args:
            if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" and str(arg.target).startswith("_tensor_constant_"):
                constant = getattr(model, str(arg.target)).to(value.dtype)
                model.register_buffer(str(arg.target), constant)
                arg.meta["val"] = value.fake_mode.from_tensor(constant, static_shapes=True)
    model.recompile()
    return model


def _batch_shapes(program: Any) -> tuple[Any, ...] | None:
    """dynamic_shapes for exporting the quantized module: each input's batch dimension with the
    source program's range when it is symbolic, else None (all static)."""
    import torch

    inputs = set(program.graph_signature.user_inputs)
    shapes: list[Any] = []
    dynamic = False
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in inputs:
            continue
        size = node.meta["val"].shape[0]
        if isinstance(size, torch.SymInt):
            bounds = program.range_constraints[size.node.expr]
            shapes.append({0: torch.export.Dim("batch", min=int(bounds.lower), max=int(bounds.upper))})
            dynamic = True
        else:
            shapes.append(None)
    return tuple(shapes) if dynamic else None


class LiteRtModel:
    """ai-edge-litert's Interpreter (XNNPACK delegate); inputs in the order of the program."""

    def __init__(self, path: str, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=path, num_threads=threads)
        self.interpreter.allocate_tensors()
        self.inputs = self.interpreter.get_input_details()
        self.outputs = self.interpreter.get_output_details()

    def shapes(self) -> list[list[int]]:
        return [[int(d) for d in detail["shape"]] for detail in self.inputs]

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        for detail, array in zip(self.inputs, arrays):
            self.interpreter.set_tensor(detail["index"], _quantized(array, detail))
        self.interpreter.invoke()
        return [_dequantized(np.array(self.interpreter.get_tensor(detail["index"])), detail) for detail in self.outputs]


def _quantized(array: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """A float input for an int8 .tflite input (the PT2E flow quantizes the model's inputs and
    outputs too): quantized with the tensor's own scale and zero point, as an app on a device would."""
    scale, zero_point = detail["quantization"]
    if scale and np.issubdtype(detail["dtype"], np.integer) and np.issubdtype(array.dtype, np.floating):
        info = np.iinfo(detail["dtype"])
        array = np.clip(np.round(array / scale) + zero_point, info.min, info.max)
    return np.ascontiguousarray(array, dtype=detail["dtype"])


def _dequantized(array: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    scale, zero_point = detail["quantization"]
    if scale and np.issubdtype(array.dtype, np.integer):
        return ((array.astype(np.float32) - zero_point) * scale).astype(np.float32)
    return array


class ExecuTorchModel:
    """ExecuTorch's runtime (the pybind of its C++ runtime) running a .pte's ``forward``."""

    def __init__(self, path: str, threads: int) -> None:
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        # the XNNPACK threadpool is process-wide and sized to the cores by default
        portable_lib._unsafe_reset_threadpool(threads)
        self.method = Runtime.get().load_program(path).load_method("forward")

    def shapes(self) -> list[list[int]]:
        meta = self.method.metadata
        return [list(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        outputs = self.method.execute([torch.from_numpy(np.ascontiguousarray(a)) for a in arrays])
        return [o.detach().numpy().copy() for o in outputs]


def read_frame(stream: Any) -> dict[str, np.ndarray] | None:
    head = stream.read(8)
    if len(head) < 8:
        return None
    (size,) = struct.unpack("<Q", head)
    with np.load(io.BytesIO(stream.read(size)), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def write_frame(stream: Any, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    stream.write(struct.pack("<Q", buffer.tell()))
    stream.write(buffer.getvalue())
    stream.flush()


def pack_json(value: Any) -> np.ndarray:
    return np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)


def serve(runtime: str, path: str, threads: int) -> None:
    model = LiteRtModel(path, threads) if runtime == "litert" else ExecuTorchModel(path, threads)
    # frames go to a copy of stdout; fd 1 itself now points at stderr, so whatever the runtime's
    # C++ code prints cannot corrupt the protocol
    stdin, stdout = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    write_frame(stdout, {"__reply__": pack_json({"shapes": model.shapes()})})
    while (frame := read_frame(stdin)) is not None:
        request = json.loads(bytes(frame.pop("__request__")).decode())
        arrays = [frame[f"input_{i}"] for i in range(len(frame))]
        if request["command"] == "run":
            outputs = model.run(arrays)
            write_frame(stdout, {"__reply__": pack_json({}), **{f"output_{i}": o for i, o in enumerate(outputs)}})
            continue
        for _ in range(request["warmup"]):  # "time": the same call back to back, timed here
            model.run(arrays)
        samples: list[float] = []
        cpu_start = time.process_time()
        start = time.perf_counter()
        while len(samples) < request["queries"] or time.perf_counter() - start < request["seconds"]:
            t0 = time.perf_counter()
            model.run(arrays)
            samples.append(time.perf_counter() - t0)
            if time.perf_counter() - start > request["max_seconds"] and len(samples) >= 10:
                break
        write_frame(stdout, {"__reply__": pack_json({}), "samples": np.array(samples),
                             "cpu_seconds": np.array(time.process_time() - cpu_start)})


def main(argv: list[str]) -> int:
    try:
        if argv[0] == "convert":
            convert(*argv[1:7])
        else:
            serve(argv[1], argv[2], int(argv[3]))
    except Exception as exc:  # noqa: BLE001 (any converter/runtime failure becomes the one line the parent shows; the traceback stays in the log)
        import traceback

        traceback.print_exc()
        print(ERROR_MARK + one_line(exc), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
