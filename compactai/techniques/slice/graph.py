"""Cut points on an ONNX graph, and the head/tail models on either side of a cut.

A cut is a set of tensors that separates the graph: every path from a graph input to a graph
output passes through one of them. The head computes the cut tensors from the inputs, the tail
computes the outputs from the cut tensors (plus weights and constants), so ``tail(head(x))``
equals the model. Residual connections and attention keep several tensors alive at once, which
is why most single tensors are not cuts: the enumeration walks one topological order and, at
every step, takes the set of tensors still alive across it.
"""

from __future__ import annotations

import contextlib
import difflib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from compactai.errors import BadInputError

LOCAL, REMOTE, SPLIT = "all-local", "all-remote", "split"
COMPRESSIONS = ("raw", "fp16", "int8")


class InvalidCutError(BadInputError):
    """A requested set of tensors does not separate the graph's inputs from its outputs."""


@dataclass(frozen=True)
class Cut:
    """Tensors handed from head to tail; ``position`` = nodes in the head along the topological order."""

    tensors: tuple[str, ...]
    position: int
    kind: str = SPLIT

    @property
    def label(self) -> str:
        if self.kind != SPLIT:
            return self.kind
        return " + ".join(self.tensors)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "tensors": list(self.tensors), "position": self.position, "label": self.label}


class Graph:
    """An ONNX model with the indexes the cut logic needs (producers, consumers, data dependence)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        # shapes are a nicety: extraction falls back to the types observed on a run
        with contextlib.suppress(Exception):
            model = onnx.shape_inference.infer_shapes(model)
        self.model = model
        graph = model.graph
        self.initializers = {i.name for i in graph.initializer}
        self.inputs = [i.name for i in graph.input if i.name not in self.initializers]
        self.outputs = [o.name for o in graph.output]
        self.nodes = list(graph.node)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for index, node in enumerate(self.nodes):
            for name in node.output:
                if name:
                    self.producer[name] = index
            for name in _node_inputs(node):
                self.consumers.setdefault(name, []).append(index)
        self.value_info = {v.name: v for v in [*graph.input, *graph.value_info, *graph.output]}
        # tensors that depend on a graph input: the rest (weights, constants, shapes of constants)
        # can be recomputed on either side and never need to cross the cut
        self.dynamic: set[str] = set(self.inputs)
        for node in self.nodes:
            if any(name in self.dynamic for name in _node_inputs(node)):
                self.dynamic.update(n for n in node.output if n)

    @classmethod
    def load(cls, path: str | Path) -> Graph:
        return cls(onnx.load(str(path)))

    def live_after(self, position: int) -> tuple[str, ...]:
        """Input-dependent tensors made by the first ``position`` nodes (or graph inputs) and used later."""
        made = set(self.inputs)
        for node in self.nodes[:position]:
            made.update(n for n in node.output if n)
        needed = set(self.outputs)
        for node in self.nodes[position:]:
            needed.update(_node_inputs(node))
        order = {name: i for i, name in enumerate(self._tensor_order())}
        return tuple(sorted((made & needed & self.dynamic), key=lambda n: order.get(n, -1)))

    def _tensor_order(self) -> list[str]:
        names = list(self.inputs)
        for node in self.nodes:
            names.extend(n for n in node.output if n)
        return names

    def enumerate_cuts(self, max_tensors: int = 2) -> list[Cut]:
        """Every distinct cut of at most ``max_tensors`` tensors along the topological order,
        with all-remote (the inputs) first and all-local (the outputs) last."""
        cuts = [Cut(tuple(self.inputs), 0, REMOTE)]
        seen = {frozenset(self.inputs), frozenset(self.outputs)}
        for position in range(1, len(self.nodes)):
            live = self.live_after(position)
            if 0 < len(live) <= max_tensors and frozenset(live) not in seen:
                seen.add(frozenset(live))
                cuts.append(Cut(live, position))
        cuts.append(Cut(tuple(self.outputs), len(self.nodes), LOCAL))
        return cuts

    def validate_cut(self, tensors: list[str]) -> Cut:
        """The cut made of ``tensors``; InvalidCutError saying why if they do not separate the graph."""
        known = set(self.producer) | set(self.inputs)
        if not tensors:
            raise InvalidCutError("The cut is empty; name one or more tensors (see `compactai slice --list-cuts`).")
        for name in tensors:
            if name in self.initializers:
                raise InvalidCutError(f"Tensor {name!r} is a weight, not an activation; cut at an activation "
                                      "(see `compactai slice --list-cuts`).")
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=3)
                hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise InvalidCutError(f"Tensor {name!r} is not in the model's graph.{hint}")
            if name not in self.dynamic:
                raise InvalidCutError(f"Tensor {name!r} does not depend on the model's inputs (a weight or "
                                      "constant); cut at an activation instead.")
        cut = set(tensors)
        leak = self._path_around(cut)
        if leak is not None:
            shown = " -> ".join(leak if len(leak) <= 6 else [*leak[:3], "...", *leak[-2:]])
            suggestion = self._suggest(tensors)
            raise InvalidCutError(f"Cut {sorted(cut)} does not separate the graph: input {leak[0]!r} reaches output "
                                  f"{leak[-1]!r} without crossing it ({shown}){suggestion}.")
        needed = self._tail_reaches(cut)
        unused = [name for name in tensors if name not in needed]
        if unused:
            raise InvalidCutError(f"Tensor(s) {unused} of the cut are not used after it; drop them from the cut.")
        head = self._ancestors_nodes(cut)
        position = max(head) + 1 if head else 0
        kind = REMOTE if cut == set(self.inputs) else LOCAL if cut == set(self.outputs) else SPLIT
        return Cut(tuple(tensors), position, kind)

    def _suggest(self, tensors: list[str]) -> str:
        """The smallest valid cut at the position where the first named tensor is made."""
        producer = self.producer.get(tensors[0])
        if producer is None:
            return ""
        live = self.live_after(producer + 1)
        return f"; the tensors alive there are {list(live)}: cut at all of them"

    def _path_around(self, cut: set[str]) -> list[str] | None:
        """A tensor path from a graph input to a graph output that avoids ``cut``, or None."""
        parent: dict[str, str | None] = {name: None for name in self.inputs if name not in cut}
        queue = deque(parent)
        outputs = set(self.outputs)
        while queue:
            name = queue.popleft()
            if name in outputs:
                path = [name]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])  # type: ignore[arg-type]
                return path[::-1]
            for index in self.consumers.get(name, []):
                for out in self.nodes[index].output:
                    if out and out not in cut and out not in parent:
                        parent[out] = name
                        queue.append(out)
        return None

    def _tail_reaches(self, cut: set[str]) -> set[str]:
        """Tensors the tail reads, walking back from the outputs and stopping at the cut."""
        seen: set[str] = set()
        stack = list(self.outputs)
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in cut or name not in self.producer:
                continue
            stack.extend(_node_inputs(self.nodes[self.producer[name]]))
        return seen

    def _ancestors_nodes(self, targets: set[str]) -> list[int]:
        """Indexes (sorted) of the nodes needed to compute ``targets`` from the inputs."""
        nodes: set[int] = set()
        stack = list(targets)
        seen: set[str] = set()
        while stack:
            name = stack.pop()
            if name in seen or name not in self.producer:
                continue
            seen.add(name)
            index = self.producer[name]
            nodes.add(index)
            stack.extend(_node_inputs(self.nodes[index]))
        return sorted(nodes)

    def extract(self, inputs: list[str], outputs: list[str], name: str,
                observed: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
        """The sub-model computing ``outputs`` from ``inputs`` (plus the weights and constants it uses)."""
        observed = observed or {}
        stop = set(inputs)
        nodes: set[int] = set()
        stack = [o for o in outputs if o not in stop]
        seen: set[str] = set()
        while stack:
            tensor = stack.pop()
            if tensor in seen or tensor in stop:
                continue
            seen.add(tensor)
            if tensor not in self.producer:
                continue
            index = self.producer[tensor]
            if index not in nodes:
                nodes.add(index)
                stack.extend(_node_inputs(self.nodes[index]))
        kept = [self.nodes[i] for i in sorted(nodes)]
        used = set(stop)
        for node in kept:
            used.update(_node_inputs(node))
        graph = self.model.graph
        initializers = [i for i in graph.initializer if i.name in used and i.name not in stop]
        missing = sorted(n for n in used if n not in self.producer and n not in self.initializers
                         and n not in stop and n)
        if missing:
            raise InvalidCutError(f"The part {name!r} needs {missing}, which the cut does not provide; "
                                  "add them to the cut.")
        new_graph = helper.make_graph(
            kept, name, [self._value_info(n, observed) for n in inputs],
            [self._value_info(n, observed) for n in outputs], initializer=initializers,
            value_info=[v for v in graph.value_info if v.name in used and v.name not in stop])
        model = helper.make_model(new_graph, opset_imports=list(self.model.opset_import),
                                  producer_name="compactai-slice")
        model.ir_version = self.model.ir_version
        model.functions.extend(self.model.functions)
        return model

    def _value_info(self, name: str, observed: dict[str, np.ndarray]) -> onnx.ValueInfoProto:
        known = self.value_info.get(name)
        if known is not None and known.type.tensor_type.elem_type:
            return known
        if name not in observed:
            raise InvalidCutError(f"The type of tensor {name!r} is unknown; run the model once (give example "
                                  "inputs) so its type can be observed.")
        array = observed[name]
        # every axis symbolic: batch and sequence length vary between calls
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype),
                                             [f"{name}_d{i}" for i in range(array.ndim)])


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    """The tensors a node reads, including names its subgraphs (If/Loop bodies) capture from outside."""
    names = [n for n in node.input if n]
    for attribute in node.attribute:
        for sub in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs):
            inner = {o for n in sub.node for o in n.output} | {i.name for i in sub.input} | {
                i.name for i in sub.initializer}
            for sub_node in sub.node:
                names.extend(n for n in _node_inputs(sub_node) if n not in inner)
    return names


def observe(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """Values of the intermediate tensors ``names`` on ``feeds`` (one ONNX Runtime run, no graph
    optimisation, so every named tensor still exists)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.ValueInfoProto(name=n) for n in names if n not in present)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    wanted = list(names)
    inputs = {i.name for i in session.get_inputs()}
    return dict(zip(wanted, session.run(wanted, {k: v for k, v in feeds.items() if k in inputs})))


def compress(head: onnx.ModelProto, tail: onnx.ModelProto, cut: Cut, mode: str,
             float_tensors: set[str]) -> tuple[onnx.ModelProto, onnx.ModelProto, dict[str, str]]:
    """Head and tail with the float cut tensors sent as fp16 (a cast) or int8 (per-tensor symmetric
    scale computed at run time, sent alongside); returns them and the wire name of each cut tensor."""
    if mode == "raw":
        return head, tail, {t: t for t in cut.tensors}
    head, tail = _copy(head), _copy(tail)
    wire: dict[str, str] = {}
    head_outputs = {o.name: o for o in head.graph.output}
    tail_inputs = {i.name: i for i in tail.graph.input}
    for tensor in cut.tensors:
        if tensor not in float_tensors:
            wire[tensor] = tensor
            continue
        if mode == "fp16":
            sent = f"{tensor}.fp16"
            head.graph.node.append(helper.make_node("Cast", [tensor], [sent], to=TensorProto.FLOAT16))
            tail.graph.node.insert(0, helper.make_node("Cast", [sent], [tensor], to=TensorProto.FLOAT))
            _swap_io(head_outputs[tensor], tail_inputs[tensor], sent, TensorProto.FLOAT16, head, tail)
        elif mode == "int8":
            sent, scale = f"{tensor}.int8", f"{tensor}.scale"
            zero = f"{tensor}.zero"
            head.graph.initializer.append(helper.make_tensor(zero, TensorProto.INT8, [], [0]))
            head.graph.initializer.append(helper.make_tensor(f"{tensor}.q127", TensorProto.FLOAT, [], [127.0]))
            head.graph.initializer.append(helper.make_tensor(f"{tensor}.eps", TensorProto.FLOAT, [], [1e-12]))
            head.graph.node.extend([
                helper.make_node("Abs", [tensor], [f"{tensor}.abs"]),
                helper.make_node("ReduceMax", [f"{tensor}.abs"], [f"{tensor}.absmax"], keepdims=0),
                helper.make_node("Div", [f"{tensor}.absmax", f"{tensor}.q127"], [f"{tensor}.rawscale"]),
                helper.make_node("Max", [f"{tensor}.rawscale", f"{tensor}.eps"], [scale]),
                helper.make_node("QuantizeLinear", [tensor, scale, zero], [sent]),
            ])
            tail.graph.initializer.append(helper.make_tensor(zero, TensorProto.INT8, [], [0]))
            tail.graph.node.insert(0, helper.make_node("DequantizeLinear", [sent, scale, zero], [tensor]))
            _swap_io(head_outputs[tensor], tail_inputs[tensor], sent, TensorProto.INT8, head, tail)
            head.graph.output.append(helper.make_tensor_value_info(scale, TensorProto.FLOAT, []))
            tail.graph.input.append(helper.make_tensor_value_info(scale, TensorProto.FLOAT, []))
        else:
            raise BadInputError(f"Unknown compression {mode!r}; choose one of {', '.join(COMPRESSIONS)}.")
        wire[tensor] = sent
    return head, tail, wire


def _swap_io(head_out: onnx.ValueInfoProto, tail_in: onnx.ValueInfoProto, sent: str, elem_type: int,
             head: onnx.ModelProto, tail: onnx.ModelProto) -> None:
    """Rename the head output / tail input of a cut tensor to its compressed wire tensor."""
    for proto, graph in ((head_out, head.graph), (tail_in, tail.graph)):
        renamed = onnx.ValueInfoProto()
        renamed.CopyFrom(proto)
        renamed.name = sent
        renamed.type.tensor_type.elem_type = elem_type
        container = graph.output if graph is head.graph else graph.input
        index = [v.name for v in container].index(proto.name)
        container[index].CopyFrom(renamed)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
