"""Quantization-aware training: fake-quant fine-tuning in PyTorch, then a real int8 ONNX
model for ONNX Runtime.

``activations="static"`` ("auto"'s choice for all but transformers) mimics static int8 (activation
ranges learned as running min-max, the model then calibrated and quantized statically);
``activations="dynamic"`` mimics
dynamic int8 (each input's activations quantized with their own min-max at run time, as ORT's
DynamicQuantizeLinear does), and the fine-tuned model then goes through
``quantize(mode="dynamic")`` unchanged, so its ONNX graph is the one plain dynamic int8 makes:
same ops, same kernels, only the weights differ. This is "auto"'s choice for transformers (MiniLM),
whose int8 is dynamic.

BatchNorm is first folded into the convolutions (as ONNX Runtime does before it
quantizes), then every Conv/Linear sees its weight and its input through fake quantizers
that mimic ORT's scheme (int8 symmetric weights, per-tensor or per-channel; uint8
asymmetric activations with min-max ranges). The weights learn to tolerate that rounding
on the task's train split. The fine-tuned float model is exported to ONNX and quantized by
ONNX Runtime with the same settings, so the result runs with ORT's int8 kernels.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from compactai.errors import ParameterError
from compactai.models.handle import ModelHandle
from compactai.tasks import trim_padding
from compactai.techniques._training import TrainingLoop, first_output
from compactai.techniques.base import (
    ChoiceParam,
    Context,
    FloatParam,
    IntParam,
    Technique,
    register_technique,
)
from compactai.techniques.layers import quantizable_types
from compactai.techniques.quantize._common import file_size, resolve_reduce_range
from compactai.techniques.quantize.ort_ptq import INT8_SPACE, int8_config, preprocess, quantize_int8

log = logging.getLogger(__name__)


def weight_range(bits: int, reduce_range: bool) -> tuple[int, int]:
    """ORT's integer range for symmetric weights (quant_utils.get_qmin_qmax_for_qType)."""
    if reduce_range:
        return (-64, 64) if bits == 8 else (-4, 3)
    return (-127, 127) if bits == 8 else (-8, 7)


def uint8_fake_quant(x: Any, low: Any, high: Any) -> Any:
    """``x`` through ORT's uint8 activation quantization for the range [low, high] (which holds 0),
    with a straight-through gradient."""
    import torch

    scale = float((high - low).clamp(min=1e-8)) / 255.0
    zero = round(-float(low) / scale)
    return torch.fake_quantize_per_tensor_affine(x, scale, min(max(zero, 0), 255), 0, 255)


def dynamic_fake_quant(x: Any) -> Any:
    """``x`` quantized with its own range (min with 0 to max with 0, over the whole tensor, as ORT's
    DynamicQuantizeLinear computes it at run time)."""
    return uint8_fake_quant(x, x.detach().min().clamp(max=0.0), x.detach().max().clamp(min=0.0))


def make_fake_quant(
    module: Any, per_channel: bool, bits: int = 8, reduce_range: bool = False, momentum: float = 0.1,
    dynamic: bool = False,
) -> Any:
    """Wrap a Conv/Linear so that its weight and input pass through fake quantizers (``dynamic``:
    the input with its own range at run time, else with a learned running range)."""
    qmin, qmax = weight_range(bits, reduce_range)
    import torch
    from torch import nn

    class FakeQuant(nn.Module):
        low: torch.Tensor
        high: torch.Tensor
        seen: torch.Tensor
        inner: Any

        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.register_buffer("low", torch.tensor(0.0))
            self.register_buffer("high", torch.tensor(0.0))
            self.register_buffer("seen", torch.tensor(False))

        def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
            if dynamic:
                return dynamic_fake_quant(x)
            if self.training:
                with torch.no_grad():
                    low, high = x.min().clamp(max=0.0), x.max().clamp(min=0.0)
                    if not bool(self.seen):
                        self.low.copy_(low), self.high.copy_(high), self.seen.fill_(True)
                    else:
                        self.low.lerp_(low, momentum), self.high.lerp_(high, momentum)
            return uint8_fake_quant(x, self.low, self.high)

        def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
            if per_channel:
                dims = tuple(range(1, weight.dim()))
                scales = (weight.detach().abs().amax(dim=dims) * 2 / (qmax - qmin)).clamp(min=1e-12).float()
                zero = torch.zeros_like(scales, dtype=torch.int32)
                return torch.fake_quantize_per_channel_affine(weight, scales, zero, 0, qmin, qmax)
            scale = max(float(weight.detach().abs().max()) * 2 / (qmax - qmin), 1e-12)
            return torch.fake_quantize_per_tensor_affine(weight, scale, 0, qmin, qmax)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            inner = self.inner
            weight = self.quantize_weight(inner.weight)
            x = self.quantize_input(x)
            if isinstance(inner, nn.Linear):
                return nn.functional.linear(x, weight, inner.bias)
            return inner._conv_forward(x, weight, inner.bias)

    return FakeQuant(module)


def fold_batchnorm(module: Any) -> tuple[Any, bool]:
    """(module with BatchNorm folded into the preceding convs, whether folding happened)."""
    try:
        import torch.fx
        from torch.fx.experimental.optimization import fuse

        module.eval()
        return fuse(torch.fx.symbolic_trace(module)), True
    except Exception as exc:  # noqa: BLE001 untraceable models train with BatchNorm kept (ORT folds it later)
        log.info("BatchNorm folding skipped: %s", exc)
        return module, False


def swap_modules(root: Any, wrap: Any) -> int:
    """Replace every Conv/Linear under ``root`` by ``wrap(module)`` (or unwrap with ``wrap``); returns the count."""
    count = 0
    for name, child in list(root.named_children()):
        replacement = wrap(child)
        if replacement is not child:
            setattr(root, name, replacement)
            count += 1
        else:
            count += swap_modules(child, wrap)
    return count


@register_technique
class QAT(Technique):
    """Quantization-aware training on the task's train split, exported as an ORT int8 model.

    The int8 conversion uses ``per_channel``/``calibration``/``calibration_samples`` like
    ``quantize(mode="static")``, so QAT and plain PTQ can be compared at the same setting.
    """

    name = "qat"
    family = "quantize"
    accepts = ("torch",)
    kinds = ("cnn", "mlp", "transformer", "generic")
    space = {
        "activations": ChoiceParam(("auto", "static", "dynamic"), "auto"),
        "epochs": IntParam(1, 1000, 3),
        "lr": FloatParam(0.0, 1.0, 1e-4, log=True, open_low=True),
        "batch_size": IntParam(1, 65_536, 64),
        "max_batches": IntParam(0, 1_000_000, 0),  # per epoch; 0 = the whole train split
        **INT8_SPACE,
    }
    cost = 2
    search_space = {"epochs": IntParam(1, 5, 2), "lr": FloatParam(1e-5, 1e-3, 1e-4, log=True)}
    in_default_search = False  # it trains: searched only when named
    quick = {"epochs": 1, "max_batches": 2, "calibration_samples": 8}

    def _apply(self, handle: ModelHandle, context: Context, params: dict[str, Any]
               ) -> tuple[ModelHandle, dict[str, Any]]:
        import torch
        from torch import nn

        if context.task is None or "train" not in context.task.splits:
            raise ParameterError("QAT needs a task with a train split to fine-tune on.")
        say = context.progress
        torch.manual_seed(context.seed)
        if params["activations"] == "auto":
            params = {**params, "activations": "dynamic" if handle.kind == "transformer" else "static"}
        dynamic = params["activations"] == "dynamic"
        if dynamic and (params["format"] != "qoperator" or params["weight_bits"] != 8):
            raise ParameterError("QAT with activations='dynamic' makes dynamic int8 (QOperator, 8-bit weights); "
                                 "drop format/weight_bits or use activations='static'.")
        model, folded = (copy.deepcopy(handle.module), False) if dynamic \
            else fold_batchnorm(copy.deepcopy(handle.module))  # dynamic: transformers, no BatchNorm
        model = cast(Any, model)
        fake = quantizable_types()
        wrapped = swap_modules(
            model,
            lambda m: (
                make_fake_quant(m, params["per_channel"], params["weight_bits"],
                                resolve_reduce_range(params["reduce_range"], params["weight_bits"]), dynamic=dynamic)
                if isinstance(m, fake)
                else m
            ),
        )
        if wrapped == 0:
            raise ParameterError(
                f"QAT found no Conv or Linear module in '{handle.name}' to quantize (a .pt2 file holds a flattened "
                "graph without them); pass your nn.Module through the Python API, or use mode='static'."
            )
        teacher: Any = handle.module
        train = context.task.split("train")
        optimizer = torch.optim.Adam(model.parameters(), lr=params["lr"])
        rng = np.random.default_rng(context.seed)
        losses: list[float] = []
        starts = range(0, len(train), params["batch_size"])[: params["max_batches"] or None]

        def batches(epoch: int) -> Any:
            order = rng.permutation(len(train))  # one draw per epoch, in order (epochs are never skipped)
            for start in starts:
                yield train.take(order[start : start + params["batch_size"]])

        def step(part: Any) -> float:
            feeds = trim_padding(part.inputs)  # as the task's batches: no column that is padding in every row
            args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in handle.input_names]
            output = first_output(model(*args))
            if part.labels is not None and output.dim() == 2:
                loss = nn.functional.cross_entropy(output, torch.from_numpy(part.labels))
            else:
                with torch.no_grad():
                    reference = first_output(teacher(*args))
                loss = nn.functional.mse_loss(output, reference)
                if dynamic:  # and the direction of each output row, which embedding fidelity judges
                    cosine = nn.functional.cosine_similarity(output.flatten(1), reference.flatten(1), dim=1)
                    loss = loss + (1.0 - cosine).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            return losses[-1]

        # dynamic: dropout off (the model must stay the float model's function, rounding aside); its
        # fake quantizers have no running state, so eval mode changes nothing else
        model.train(not dynamic)
        run = TrainingLoop(epochs=params["epochs"], batches=batches, step=step, out_of_time=context.out_of_time,
                           progress=say, name="QAT ", steps_per_epoch=len(starts)).run()
        model.eval()
        swap_modules(model, lambda m: m.inner if hasattr(m, "inner") and hasattr(m, "quantize_weight") else m)
        context.work_dir.mkdir(parents=True, exist_ok=True)
        trained_run = {"batchnorm_folded": folded, "fake_quant_layers": wrapped, "epochs_done": run.epochs_run,
                       "stopped": run.stopped, "final_loss": float(np.mean(losses[-20:])) if losses else None,
                       "activations": params["activations"]}
        if dynamic:
            return self._dynamic_int8(handle.derive(module=model), context, params, trained_run)
        work = Path(tempfile.mkdtemp(prefix="qat-", dir=context.work_dir))
        say("exporting the fine-tuned model to ONNX")
        trained = handle.derive(module=model).to_onnx(work / "qat-float.onnx")
        source = work / "preprocessed.onnx"
        preprocess(Path(trained.path), source, handle.kind)  # type: ignore[arg-type]
        config = int8_config(params, mode="static")
        say(f"int8 with ONNX Runtime: {config.label()}")
        target = quantize_int8(
            source,
            work / "model.qat.onnx",
            config,
            context.task.splits.get("calibration", train),
            handle.input_names,
        )
        result = trained.as_onnx(target)
        result.metadata.pop("parity", None)
        decisions = {
            **trained_run,
            "config": config.to_dict(),
            "float_size_bytes": file_size(Path(str(trained.path))),
            "quantized_size_bytes": file_size(target),
        }
        result.metadata["quantize"] = {"mode": "qat", **decisions}
        return result, decisions

    @staticmethod
    def _dynamic_int8(trained: ModelHandle, context: Context, params: dict[str, Any],
                      trained_run: dict[str, Any]) -> tuple[ModelHandle, dict[str, Any]]:
        """The fine-tuned model through plain dynamic int8 (``quantize(mode="dynamic")``), so that
        its graph is the one dynamic int8 of the original model has."""
        from compactai.techniques import create_technique

        context.progress("dynamic int8 of the fine-tuned model with ONNX Runtime")
        quantize = create_technique("quantize", mode="dynamic", per_channel=params["per_channel"],
                                    reduce_range=params["reduce_range"])
        result = quantize.apply(trained, replace(context, work_dir=context.work_dir / "dynamic-int8"))
        inner = dict(result.metadata.get("quantize", {}))
        decisions = {**trained_run, "config": inner.get("config"),
                     "quantized_size_bytes": inner.get("quantized_size_bytes")}
        result.metadata["quantize"] = {"mode": "qat", **decisions}
        return result, decisions
