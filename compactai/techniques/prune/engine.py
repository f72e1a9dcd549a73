"""The structural pruning engine: Torch-Pruning's dependency graph, plus what it lacks.

Torch-Pruning couples every layer that shares a channel (residual adds, depthwise convs,
batch norms, concatenations, q/k/v and the attention output). On top of it this module:

- finds the prunable *units*: channel groups of CNNs/MLPs, or (BERT family) the FFN neurons
  and whole attention heads of each layer, never the hidden size;
- honours protected layers, checking that their names exist;
- prunes a plan ``{unit: element indices}`` on a copy, fixes the Hugging Face attention
  attributes after head removal, and checks the forward pass and output shapes, naming the
  layer to protect when the graph engine cannot follow an op;
- keeps what was removed as plain data, which :func:`replay` re-applies.
"""

from __future__ import annotations

import copy
import difflib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compactai.errors import ParameterError, TechniqueError, UnsupportedFormatError
from compactai.techniques.layers import prunable_layer_names

log = logging.getLogger(__name__)

SCOPES = ("auto", "channels", "ffn", "heads", "ffn+heads")


@dataclass
class Unit:
    """One prunable set of coupled elements: a channel group (``channels``), the FFN neurons of
    a transformer layer (``ffn``) or its attention heads (``heads``, ``width`` dims each)."""

    name: str  # the root module: first layer of the group (the query projection for heads)
    kind: str
    size: int  # prunable elements now
    width: int = 1  # tensor indices per element (the head size for heads)
    coupled: list[str] = field(default_factory=list)
    scores: np.ndarray | None = None

    def indices(self, elements: Sequence[int]) -> list[int]:
        return [int(e) * self.width + j for e in elements for j in range(self.width)]


def attention_modules(module: Any) -> dict[str, Any]:
    """BERT-style self-attention modules (query/key/value linears and a head size), by name."""
    from torch import nn

    found = {}
    for name, sub in module.named_modules():
        if all(isinstance(getattr(sub, a, None), nn.Linear) for a in ("query", "key", "value")) and hasattr(
            sub, "attention_head_size"
        ):
            found[name] = sub
    return found


FFN_UP = ("intermediate.dense", "mlp.c_fc")  # BERT family; GPT-2 (its Conv1D swapped for nn.Linear)


def ffn_modules(module: Any) -> dict[str, Any]:
    """The FFN up-projections of transformer layers (BERT's ``*.intermediate.dense``, GPT-2's
    ``*.mlp.c_fc`` once its ``Conv1D`` is an ``nn.Linear``), by name."""
    from torch import nn

    return {n: m for n, m in module.named_modules() if n.endswith(FFN_UP) and isinstance(m, nn.Linear)}


def fused_attention(module: Any) -> bool:
    """GPT-2-style attention: one fused q/k/v projection (``attn.c_attn``); its heads are not pruned."""
    return any(n.endswith("attn.c_attn") for n, _ in module.named_modules())


def resolve_scope(module: Any, scope: str) -> str:
    has_attention = bool(attention_modules(module)) or fused_attention(module)
    if scope == "auto":
        if has_attention:
            return "ffn+heads" if attention_modules(module) else "ffn"
        return "channels"
    if scope == "channels" and has_attention:
        raise ParameterError(
            "The 'scope' parameter 'channels' would shrink the hidden size of this transformer, which every "
            "layer shares; use scope='ffn', 'heads' or 'ffn+heads' instead."
        )
    if scope != "channels" and not (ffn_modules(module) if "ffn" in scope else attention_modules(module)):
        raise ParameterError(
            f"The 'scope' parameter is {scope!r}, but the model has no BERT-style "
            f"{'FFN (intermediate.dense)' if 'ffn' in scope else 'self-attention (query/key/value)'} layers; "
            "use scope='channels'."
        )
    return scope


def check_protected(module: Any, names: Sequence[str]) -> None:
    """Raise ParameterError for a protected name that is not a module of ``module``."""
    known = [n for n, _ in module.named_modules() if n]
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.5) or prunable_layer_names(module)[:8]
            raise ParameterError(
                f"The 'protect' parameter names layer {name!r}, which this model does not have; "
                f"similar layer names: {', '.join(close)}."
            )


def check_prunable(handle: Any) -> None:
    """Raise UnsupportedFormatError (exit 2) unless ``handle`` is a torch model with Conv/Linear modules to prune."""
    if handle.framework != "torch" or handle.module is None:
        raise UnsupportedFormatError(
            f"Pruning needs a torch model, but '{handle.name}' is {handle.framework}; convert it first "
            "(compactai.techniques.prune.convert.prunable_handle, as `compactai prune` does) or prune the "
            "nn.Module before export."
        )
    if not prunable_layer_names(handle.module):
        raise UnsupportedFormatError(
            f"{type(handle.module).__name__} has no nn.Conv/nn.Linear modules to prune; prune the original "
            "nn.Module, loaded with compactai.load_model(module, example_inputs)."
        )


class Graph:
    """A dependency graph over ``module`` (pruned in place: give it a copy) and its prunable units."""

    def __init__(self, module: Any, example_args: tuple[Any, ...], scope: str, protected: Sequence[str] = ()) -> None:
        import torch_pruning as tp

        self.module = module
        self.example_args = example_args
        self.scope = resolve_scope(module, scope)
        self.modules = dict(module.named_modules())
        self.names = {m: n for n, m in self.modules.items()}
        self.protected = list(protected)
        try:
            self.graph = tp.DependencyGraph().build_dependency(
                module, example_inputs=example_args, forward_fn=lambda m, x: m(*x), verbose=False
            )
        except Exception as exc:
            raise TechniqueError(
                f"The dependency graph engine (Torch-Pruning) cannot trace {type(module).__name__}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            ) from exc
        self.units = self._find_units()

    # -- discovery --------------------------------------------------------------------------
    def _find_units(self) -> list[Unit]:
        units: list[Unit] = []
        if self.scope == "channels":
            import torch_pruning as tp

            ignored = [sub for n in self.protected for sub in self.modules[n].modules()]
            roots = [tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR]
            for group in self.graph.get_all_groups(ignored_layers=ignored, root_module_types=roots):
                root = group[0].dep.target.module
                size = self.graph.get_out_channels(root)
                if size is None or size < 2 or root not in self.names:
                    continue
                units.append(Unit(self.names[root], "channels", size, coupled=self._coupled(group)))
            return units
        if "heads" in self.scope:
            for name, attention in attention_modules(self.module).items():
                query = f"{name}.query"
                heads = attention.query.out_features // attention.attention_head_size
                if heads >= 2 and not self._is_protected(name, query):
                    units.append(Unit(query, "heads", heads, attention.attention_head_size))
        if "ffn" in self.scope:
            for name, linear in ffn_modules(self.module).items():
                if linear.out_features >= 2 and not self._is_protected(name):
                    units.append(Unit(name, "ffn", linear.out_features))
        for unit in units:
            unit.coupled = self._coupled(self.group(unit, [0]))
        return units

    def _is_protected(self, *names: str) -> bool:
        return any(n == p or n.startswith(p + ".") for n in names for p in self.protected)

    def _coupled(self, group: Any) -> list[str]:
        out = []
        for dep, _ in group:
            module = dep.target.module
            if self.names.get(module):
                side = "out" if self.graph.is_out_channel_pruning_fn(dep.handler) else "in"
                tag = f"{self.names[module]}:{side}"
                if tag not in out:
                    out.append(tag)
        return out

    # -- pruning ----------------------------------------------------------------------------
    def group(self, unit: Unit, elements: Sequence[int]) -> Any:
        root = self.modules[unit.name]
        pruner = self.graph.get_pruner_of_module(root)
        return self.graph.get_pruning_group(root, pruner.prune_out_channels, unit.indices(elements))

    def score(self, criterion: Callable[[Any], Any]) -> None:
        """Fill each unit's per-element scores (per head: the mean over its dims)."""
        for unit in self.units:
            raw = criterion(self.group(unit, range(unit.size)))
            if raw is None:
                raise TechniqueError(f"The importance criterion returned no score for layer '{unit.name}'.")
            scores = raw.detach().float().cpu().numpy()
            unit.scores = scores.reshape(unit.size, unit.width).mean(axis=1) if unit.width > 1 else scores

    def prune(self, plan: dict[str, list[int]]) -> None:
        """Remove ``plan[unit]`` elements from each unit, then fix up attention attributes."""
        by_name = {u.name: u for u in self.units}
        for name, elements in plan.items():
            if not elements:
                continue
            unit = by_name[name]
            group = self.group(unit, elements)
            if not self.graph.check_pruning_group(group):
                raise TechniqueError(f"Removing {len(elements)} of {unit.size} elements of '{name}' would empty it.")
            group.prune()
        fix_attention(self.module)


def fix_attention(module: Any) -> None:
    """After head removal, set the HF attention attributes Torch-Pruning does not know about."""
    for attention in attention_modules(module).values():
        width = attention.query.out_features
        attention.all_head_size = width
        attention.num_attention_heads = width // attention.attention_head_size


def output_shapes(module: Any, example_args: tuple[Any, ...]) -> list[tuple[int, ...]]:
    import torch

    from compactai.models.handle import flatten_outputs

    module.eval()
    with torch.inference_mode():
        return [tuple(t.shape) for t in flatten_outputs(module(*example_args))]


def prune_copy(
    module: Any, example_args: tuple[Any, ...], scope: str, protected: Sequence[str], plan: dict[str, list[int]]
) -> Any:
    """A pruned deep copy of ``module``; the forward pass and output shapes are checked, and when
    they break, the unit responsible is found and named."""
    expected = output_shapes(module, example_args)
    pruned = copy.deepcopy(module)
    Graph(pruned, example_args, scope, protected).prune(plan)
    problem = _forward_problem(pruned, example_args, expected)
    if problem is None:
        return pruned
    for name, elements in plan.items():  # find the first unit that breaks the model on its own
        alone = copy.deepcopy(module)
        Graph(alone, example_args, scope, protected).prune({name: elements})
        own = _forward_problem(alone, example_args, expected)
        if own is not None:
            raise UnsupportedFormatError(  # this model cannot be pruned as asked: a refusal, exit 2
                f"Removing output channels of '{name}' {own}; the graph engine cannot follow an op that uses "
                f"this layer's width (e.g. a hard-coded reshape). Add '{name}' to the 'protect' parameter."
            )
    raise UnsupportedFormatError(f"The pruned model {problem}; protect some layers with the 'protect' parameter.")


def _forward_problem(module: Any, example_args: tuple[Any, ...], expected: list[tuple[int, ...]]) -> str | None:
    try:
        shapes = output_shapes(module, example_args)
    except Exception as exc:  # noqa: BLE001 (best effort: any failure means "not available")
        return f"breaks the forward pass ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    if shapes != expected:
        return f"changes the output shapes from {expected} to {shapes}"
    return None


def replay(module: Any, example_args: tuple[Any, ...], history: list[dict[str, Any]]) -> Any:
    """Re-apply recorded pruning steps (``{"step", "layer", "kind", "removed"}`` entries) to a copy."""
    pruned = copy.deepcopy(module)
    steps = sorted({int(entry.get("step", 1)) for entry in history})
    for step in steps:
        entries = [e for e in history if int(e.get("step", 1)) == step]
        scope = "channels" if all(e["kind"] == "channels" for e in entries) else "ffn+heads"
        graph = Graph(pruned, example_args, scope)
        units = {u.name: u for u in graph.units}
        missing = [e["layer"] for e in entries if e["layer"] not in units]
        if missing:
            raise ParameterError(f"The pruning history names layers this model cannot prune: {', '.join(missing)}.")
        graph.prune({e["layer"]: list(e["removed"]) for e in entries})
    return pruned


__all__ = ["SCOPES", "Graph", "Unit", "attention_modules", "check_protected", "check_prunable", "ffn_modules", "fix_attention",
           "fused_attention",
           "prune_copy", "replay", "resolve_scope"]
