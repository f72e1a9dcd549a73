"""Techniques that scale a model down. Each registers itself with ``@register_technique``;
importing a family's module is all it takes for the search, CLI and report to see it."""

from __future__ import annotations

import importlib

from compactai.techniques.base import (
    AnyParam,
    ChoiceParam,
    Context,
    FloatParam,
    IntParam,
    Technique,
    available_techniques,
    create_technique,
    register_technique,
)

# Modules holding technique families; each registers its techniques on import.
FAMILIES: list[str] = [
    "compactai.techniques.quantize",
    "compactai.techniques.prune",
    "compactai.techniques.distill",
]


def load_all() -> None:
    for module in FAMILIES:
        importlib.import_module(module)


__all__ = [
    "AnyParam", "ChoiceParam", "Context", "FloatParam", "IntParam", "Technique", "available_techniques",
    "create_technique", "load_all", "register_technique",
]
