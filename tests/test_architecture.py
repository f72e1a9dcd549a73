"""The layer order of docs/architecture.md, enforced: a module imports only from layers below.

The table in the doc is the one source; this test parses it, walks every import statement in
``compactai/`` (top level, in functions, under ``if TYPE_CHECKING:``, absolute and relative) and
fails on an import that goes up a layer or sideways to another unit of the same layer.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "compactai"
DOC = ROOT / "docs" / "architecture.md"

# Known edges that go against the order, each with the reason it is tolerated for now.
ALLOWED: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Edge:
    source: str  # module that imports
    target: str  # module (or package) imported
    file: str
    line: int


def read_layers(doc: Path = DOC) -> dict[str, int]:
    """Unit (dotted module path) -> layer number, from the doc's table rows ``| N | `unit`, ... |``."""
    layers: dict[str, int] = {}
    for row in doc.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", row)
        if not match:
            continue
        for name in re.findall(r"`([A-Za-z_][\w.]*)`", match.group(2)):
            unit = name if name == "compactai" else f"compactai.{name}"
            assert unit not in layers, f"{unit} is listed twice in {doc.name}"
            layers[unit] = int(match.group(1))
    return layers


def module_names(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    modules = {}
    for file in sorted(package.rglob("*.py")):
        parts = list(file.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = file
    return modules


def imports_of(source: str, module: str, is_package: bool, known: set[str], file: str = "") -> list[Edge]:
    """Every compactai import in ``source`` (any depth of the syntax tree), resolved to a module."""
    edges = []
    here = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # `from pkg import name` imports the submodule pkg.name when there is one
            targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in known else origin for a in node.names]
        else:
            continue
        edges += [Edge(module, t, file, node.lineno) for t in targets if t == "compactai" or t.startswith("compactai.")]
    return edges


def unit_of(module: str, layers: dict[str, int]) -> str | None:
    """The longest unit that contains ``module`` (the root unit only holds compactai/__init__.py)."""
    if module == "compactai":
        return "compactai" if "compactai" in layers else None
    candidates = [u for u in layers if u != "compactai" and (module == u or module.startswith(u + "."))]
    return max(candidates, key=len, default=None)


def violations(edges: list[Edge], layers: dict[str, int], allowed: dict[tuple[str, str], str]) -> list[str]:
    """One line per edge that does not go strictly down the layers (imports within a unit are free)."""
    found = []
    for edge in edges:
        source, target = unit_of(edge.source, layers), unit_of(edge.target, layers)
        if source is None or target is None or source == target or (edge.source, edge.target) in allowed:
            continue
        if layers[target] >= layers[source]:
            way = "sideways (same layer)" if layers[target] == layers[source] else "up"
            found.append(f"{edge.file}:{edge.line}: {edge.source} imports {edge.target}: {way} from layer "
                         f"{layers[source]} ({source}) to layer {layers[target]} ({target})")
    return found


def package_edges() -> list[Edge]:
    modules = module_names()
    known = set(modules)
    edges = []
    for name, file in modules.items():
        edges += imports_of(file.read_text(encoding="utf-8"), name, file.name == "__init__.py", known,
                            str(file.relative_to(ROOT)))
    return edges


def test_no_import_goes_up_or_sideways() -> None:
    found = violations(package_edges(), read_layers(), ALLOWED)
    assert not found, "imports against the layer order of docs/architecture.md:\n" + "\n".join(found)


def test_every_module_has_a_layer() -> None:
    layers = read_layers()
    missing = [name for name in module_names() if unit_of(name, layers) is None]
    assert not missing, f"modules with no row in docs/architecture.md: {missing}"


def test_every_technique_family_and_command_has_its_own_row() -> None:
    """Families and commands are siblings; one lumped into the shared unit would escape the check."""
    layers = read_layers()
    families = {f"compactai.techniques.{p.parent.name}" for p in (PACKAGE / "techniques").glob("*/__init__.py")}
    commands = {f"compactai.cli.{p.stem}" for p in (PACKAGE / "cli").glob("*.py") if not p.stem.startswith("_")}
    assert families >= {"compactai.techniques.prune", "compactai.techniques.quantize", "compactai.techniques.distill"}
    assert not (families | commands) - set(layers), sorted((families | commands) - set(layers))


def test_every_allowance_is_still_needed() -> None:
    """When the edge is gone, its allowance must go too (so it cannot hide a new one)."""
    edges = {(edge.source, edge.target) for edge in package_edges()}
    stale = [pair for pair in ALLOWED if pair not in edges]
    assert not stale, f"remove these allowances from tests/test_architecture.py, the imports are gone: {stale}"


SAMPLE = '''
from typing import TYPE_CHECKING
import compactai.errors
from . import handle
from ..tasks import Task
if TYPE_CHECKING:
    from compactai.search import engine
def later():
    from compactai import cli
'''


def test_the_walker_sees_every_kind_of_import() -> None:
    known = {"compactai.models.handle", "compactai.search.engine", "compactai.tasks", "compactai.errors"}
    edges = imports_of(SAMPLE, "compactai.models.load", False, known)
    assert sorted(e.target for e in edges) == [
        "compactai", "compactai.errors", "compactai.models.handle", "compactai.search.engine", "compactai.tasks",
    ]


@pytest.mark.parametrize(("target", "expected"), [
    ("compactai.search.engine", "up"), ("compactai.examples", "up"),
    ("compactai", "up"), ("compactai.tasks", "sideways"), ("compactai.errors", None), ("compactai.models.zoo", None),
])
def test_an_edge_against_the_order_is_reported(target: str, expected: str | None) -> None:
    edge = Edge("compactai.models.load", target, "compactai/models/load.py", 1)
    found = violations([edge], read_layers(), {})
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1 and expected in found[0], found


def test_a_handle_converts_through_the_exporter_the_export_layer_plugs_in(monkeypatch) -> None:
    """models sits below export, so ModelHandle.to_onnx reaches it through a registered hook."""
    import torch

    from compactai import load_model
    from compactai.errors import CompactAIError
    from compactai.export import onnx as export_module
    from compactai.models import handle as handle_module

    assert handle_module._onnx_exporter == [export_module._export_for_handle]
    model = load_model(torch.nn.Linear(3, 2).eval(), torch.randn(1, 3), name="linear")
    monkeypatch.setattr(handle_module, "_onnx_exporter", [])
    with pytest.raises(CompactAIError, match="No ONNX exporter is registered"):
        model.to_onnx()
