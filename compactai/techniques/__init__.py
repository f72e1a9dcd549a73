"""Techniques that scale a model down. Each registers itself with ``@register_technique``;
importing a family's module is all it takes for the search, CLI and report to see it."""

from __future__ import annotations

import importlib

from compactai.techniques.base import (
    CallableParam,
    ChoiceParam,
    Context,
    FloatParam,
    IntParam,
    NameParam,
    NoneOr,
    StringsParam,
    Technique,
    TypeParam,
    available_techniques,
    create_technique,
    register_technique,
)

# Modules holding technique families; each registers its techniques on import.
FAMILIES: list[str] = [
    "compactai.techniques.quantize",
    "compactai.techniques.prune",
    "compactai.techniques.distill",
    "compactai.techniques.nas.technique",
]


def load_all() -> None:
    """Import the built-in families, plus user plugin modules named in $COMPACTAI_PLUGINS
    (comma-separated module paths whose import registers techniques; also seen by Ray workers)."""
    import os

    plugins = [m.strip() for m in os.environ.get("COMPACTAI_PLUGINS", "").split(",") if m.strip()]
    for module in FAMILIES + plugins:
        importlib.import_module(module)


__all__ = [
    "FAMILIES", "CallableParam", "ChoiceParam", "Context", "FloatParam", "IntParam", "NameParam", "NoneOr",
    "StringsParam", "Technique", "TypeParam", "available_techniques", "create_technique", "load_all",
    "register_technique",
]
