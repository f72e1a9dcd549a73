"""Encoder students of a transformer teacher, built from an encoder-space spec (see space.py).

A spec picks how many of the teacher's layers to keep (``layers``) and which (``init``:
``spread`` keeps the first and the last and spreads the rest evenly, as the hand-picked MiniLM
student 0,2,5 does; ``first`` / ``last`` keep a block at one end; ``random`` spreads them and
re-initialises their weights), then narrows every kept layer to ``heads`` attention heads and
``ffn`` feed-forward neurons. The layers are cut by the distillation students' ``layers:``
builder (``students.drop_layers``); narrowing keeps the teacher's most important heads and
neurons (largest weight norms through the block), so a narrowed student starts close to the
teacher instead of from scratch. The token embeddings are the teacher's, so ``hidden`` must be
the teacher's hidden size.

Narrowing slices BERT-style layers (``attention.self.query/key/value``, ``attention.output.dense``,
``intermediate.dense``, ``output.dense``): Hugging Face BERT, RoBERTa, MiniLM and the like.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compactai.errors import ParameterError
from compactai.models.handle import ModelHandle
from compactai.techniques.distill.students import drop_layers, find_layer_stack


def _layer_parts(layer: nn.Module) -> tuple[Any, nn.Linear, nn.Linear, nn.Linear]:
    """(self-attention, attention output projection, FFN in, FFN out) of a BERT-style layer."""
    try:
        attention = layer.attention.self  # type: ignore[union-attr]
        out = layer.attention.output.dense  # type: ignore[union-attr]
        ffn_in, ffn_out = layer.intermediate.dense, layer.output.dense  # type: ignore[union-attr]
    except AttributeError:
        raise ParameterError(
            f"The encoder space narrows BERT-style layers (attention.self.query/key/value, intermediate.dense, "
            f"output.dense); the teacher's layers are {type(layer).__name__}. Use a BERT-family teacher."
        ) from None
    return attention, out, ffn_in, ffn_out  # type: ignore[return-value]


def teacher_shape(handle: ModelHandle) -> dict[str, int]:
    """The teacher's depth, hidden size, attention heads and FFN width."""
    if handle.module is None or (found := find_layer_stack(handle.module)) is None:
        raise ParameterError(f"The encoder space needs a torch teacher with a stack of transformer layers; "
                             f"'{handle.name}' has none.")
    stack = found[1]
    attention, _, ffn_in, _ = _layer_parts(stack[0])
    return {"layers": len(stack), "hidden": int(ffn_in.in_features), "heads": int(attention.num_attention_heads),
            "ffn": int(ffn_in.out_features)}


def kept_layers(init: str, layers: int, depth: int) -> list[int]:
    """Which of the teacher's ``depth`` layers a ``layers``-deep student keeps."""
    if not 1 <= layers <= depth:
        raise ParameterError(f"An encoder student keeps 1 to {depth} of the teacher's layers; the spec asks for {layers}.")
    if init == "first":
        return list(range(layers))
    if init == "last":
        return list(range(depth - layers, depth))
    if layers == 1:
        return [0]
    return sorted({round(i * (depth - 1) / (layers - 1) - 1e-9) for i in range(layers)})  # 3 of 6: 0, 2, 5


def _rows(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """``linear`` keeping only the output features ``index``."""
    new = nn.Linear(linear.in_features, len(index), bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight[index])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[index])
    return new


def _columns(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """``linear`` keeping only the input features ``index``."""
    new = nn.Linear(len(index), linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:, index])
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


def narrow_layer(layer: nn.Module, heads: int, ffn: int) -> None:
    """Keep the ``heads`` attention heads and ``ffn`` FFN neurons of ``layer`` that carry the most
    weight (value rows x output-projection columns per head; in-row x out-column per neuron)."""
    attention, out, ffn_in, ffn_out = _layer_parts(layer)
    have, size = int(attention.num_attention_heads), int(attention.attention_head_size)
    if heads > have or ffn > ffn_in.out_features:
        raise ParameterError(f"A student layer keeps at most the teacher's {have} heads and {ffn_in.out_features} "
                             f"FFN neurons; the spec asks for {heads} heads and {ffn} neurons.")
    if heads < have:
        value = attention.value.weight.detach().view(have, size, -1).norm(dim=(1, 2))
        output = out.weight.detach().view(out.out_features, have, size).norm(dim=(0, 2))
        keep_heads = torch.sort(torch.topk(value * output, heads).indices).values
        index = (keep_heads[:, None] * size + torch.arange(size)).reshape(-1)
        for name in ("query", "key", "value"):
            setattr(attention, name, _rows(getattr(attention, name), index))
        layer.attention.output.dense = _columns(out, index)  # type: ignore[union-attr]
        attention.num_attention_heads, attention.all_head_size = heads, heads * size
    if ffn < ffn_in.out_features:
        weight = ffn_in.weight.detach().norm(dim=1) * ffn_out.weight.detach().norm(dim=0)
        index = torch.sort(torch.topk(weight, ffn).indices).values
        layer.intermediate.dense = _rows(ffn_in, index)  # type: ignore[union-attr]
        layer.output.dense = _columns(ffn_out, index)  # type: ignore[union-attr]


def build_encoder(spec: dict[str, Any], teacher: ModelHandle, seed: int = 0) -> nn.Module:
    """The student of ``spec``: the teacher's layers ``kept_layers(...)`` (via the distillation
    ``layers:`` builder), each narrowed to the spec's heads and FFN width."""
    shape = teacher_shape(teacher)
    if spec["hidden"] != shape["hidden"]:
        raise ParameterError(f"An encoder student keeps the teacher's token embeddings, so 'hidden' must be "
                             f"{shape['hidden']}; the spec asks for {spec['hidden']}.")
    keep = kept_layers(spec["init"], spec["layers"], shape["layers"])
    student = drop_layers(",".join(map(str, keep)), teacher, None)
    assert teacher.module is not None
    path = find_layer_stack(teacher.module)[0]  # type: ignore[index]  # (teacher_shape found it)
    torch.manual_seed(seed)
    stack = student.get_submodule(path)  # by the teacher's path: a 1-layer list is no "stack" to find
    assert isinstance(stack, nn.ModuleList)
    for layer in stack:
        if spec["init"] == "random":  # the teacher's structure, fresh weights
            for module in layer.modules():
                if isinstance(module, (nn.Linear, nn.LayerNorm)):
                    module.reset_parameters()
        narrow_layer(layer, spec["heads"], spec["ffn"])
    for module in student.modules():  # Hugging Face configs record the widths (read by save/export code)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "intermediate_size"):
            config.intermediate_size = spec["ffn"]
    return student.eval()


__all__ = ["build_encoder", "kept_layers", "narrow_layer", "teacher_shape"]
