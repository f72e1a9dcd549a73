"""Search spaces as data, and the architecture specs sampled from them.

A space is a plain dict: ``{"family": "cnn" | "mlp" | "encoder", "choices": {name: [options]}}``.
Each choice is a list of allowed values; ``sample_spec`` turns one pick per choice into an
architecture *spec* (plain data too, written as ``architecture.json``) that ``build.py`` rebuilds
into a module. Per-stage choices (kernel, expansion, ...) are picked once per stage, so a CNN
can mix 3x3 and 5x5 stages like MobileNetV3.

Picking goes through a ``choose(name, options)`` callable: ``random.Random(seed).choice`` for
reproducible sampling, ``optuna.Trial.suggest_categorical`` inside the search. The same function
builds the spec either way, so what the search proposes is what ``sample_spec`` would build.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from compactai.errors import ModelNotFoundError, ParameterError

Choose = Callable[[str, Sequence[Any]], Any]

# per family: choice name -> (check of one option, what the check means, for messages)
_POSITIVE_INT = (lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096, "whole numbers from 1 to 4096")
_RULES: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "cnn": {
        "stages": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 5, "whole numbers from 1 to 5"),
        "depth": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 6, "whole numbers from 1 to 6"),
        "width_mult": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0.1 <= v <= 4.0,
                       "numbers from 0.1 to 4"),
        "kernel": (lambda v: v in (3, 5, 7), "kernel sizes 3, 5 or 7"),
        "expansion": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 8, "whole numbers from 1 to 8"),
        "block": (lambda v: v in ("separable", "plain"), "'separable' (depthwise inverted residual) or 'plain' (3x3 conv)"),
        "se": (lambda v: isinstance(v, bool), "true or false"),
        "head": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 4096,
                 "whole numbers from 0 (no extra layer) to 4096"),
    },
    "mlp": {
        "layers": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 8, "whole numbers from 1 to 8"),
        "hidden": _POSITIVE_INT,
        "activation": (lambda v: v in ("relu", "gelu"), "'relu' or 'gelu'"),
        "dropout": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1, "numbers in [0, 1)"),
    },
    "encoder": {
        "layers": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 24, "whole numbers from 1 to 24"),
        "hidden": _POSITIVE_INT,
        "heads": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 64, "whole numbers from 1 to 64"),
        "ffn": _POSITIVE_INT,
        "init": (lambda v: v in ("spread", "first", "last", "random"),
                 "'spread', 'first', 'last' (which teacher layers initialise the student) or 'random'"),
    },
}

# Stage base widths (before the width multiplier) and strides of the CNN family: MobileNet-like,
# halving resolution and doubling width per stage. The first stage halves too: training a first
# stage at full 32x32 resolution cost several times more per epoch on 2 cores, and the search has
# minutes, not hours (MobileNets also reach 1/4 resolution within their first two layers).
CNN_STAGE_WIDTHS = (16, 32, 64, 128, 256)
CNN_STAGE_STRIDES = (2, 2, 2, 2, 2)
CNN_STEM = 16

BUILTIN_SPACES: dict[str, dict[str, Any]] = {
    "cnn": {"family": "cnn", "choices": {
        "stages": [2, 3, 4], "depth": [1, 2, 3], "width_mult": [0.25, 0.5, 0.75, 1.0], "kernel": [3, 5],
        "expansion": [1, 3, 6], "block": ["separable", "plain"], "se": [False, True], "head": [0, 128]}},
    "mlp": {"family": "mlp", "choices": {
        "layers": [1, 2, 3], "hidden": [64, 128, 256, 512], "activation": ["relu", "gelu"], "dropout": [0.0, 0.1]}},
    "encoder": {"family": "encoder", "choices": {
        # students of a MiniLM-sized teacher: they keep its token embeddings, so its hidden size (384)
        "layers": [2, 3, 4], "hidden": [384], "heads": [4, 6, 8, 12], "ffn": [512, 768, 1024, 1536],
        "init": ["spread", "first", "last"]}},
}


def builtin_space(name: str) -> dict[str, Any]:
    """A copy of the built-in space ``name`` (cnn, mlp, encoder)."""
    if name not in BUILTIN_SPACES:
        raise ParameterError(f"Unknown search space '{name}'; choose one of {', '.join(BUILTIN_SPACES)} or give a JSON/YAML file.")
    return copy.deepcopy(BUILTIN_SPACES[name])


def validate_space(space: Any, where: str = "the space") -> dict[str, Any]:
    """``space`` checked (family known, every choice known and a non-empty list of allowed values)
    and completed with the built-in defaults for choices it leaves out; raises ParameterError
    naming the choice, what it allows and what was given."""
    if not isinstance(space, dict):
        raise ParameterError(f"{where} must be an object with 'family' and 'choices'; got {type(space).__name__}.")
    unknown_keys = set(space) - {"family", "choices"}
    if unknown_keys:
        raise ParameterError(f"{where} has unknown keys {sorted(unknown_keys)}; only 'family' and 'choices' are allowed.")
    family = space.get("family")
    if family not in _RULES:
        raise ParameterError(f"The 'family' of {where} must be one of {', '.join(_RULES)}; got {family!r}.")
    choices = space.get("choices", {})
    if not isinstance(choices, dict):
        raise ParameterError(f"The 'choices' of {where} must be an object of name: [options]; got {type(choices).__name__}.")
    rules = _RULES[family]
    for name, options in choices.items():
        if name not in rules:
            raise ParameterError(f"Unknown choice '{name}' in {where} ({family} family); known choices: {', '.join(rules)}.")
        check, meaning = rules[name]
        if not isinstance(options, list) or not options:
            raise ParameterError(f"The choice '{name}' of {where} must be a non-empty list of {meaning}; got {options!r}.")
        bad = [option for option in options if not check(option)]
        if bad:
            raise ParameterError(f"The choice '{name}' of {where} must be a non-empty list of {meaning}; "
                                 f"got {bad[0]!r} in {options!r}.")
    if family == "encoder":
        hidden, heads = choices.get("hidden", []), choices.get("heads", [])
        if hidden and heads and not any(h % n == 0 for h in hidden for n in heads):
            raise ParameterError(f"In {where} no 'hidden' size {hidden} is divisible by any 'heads' count {heads}; "
                                 "attention needs hidden % heads == 0.")
    return {"family": family, "choices": {**BUILTIN_SPACES[family]["choices"], **copy.deepcopy(choices)}}


def load_space(source: str) -> dict[str, Any]:
    """The space named ``source`` (cnn, mlp, encoder) or read from a JSON/YAML file; a file may hold
    the space itself or a recipe with a ``space`` (or ``nas: {space: ...}``) section."""
    if source in BUILTIN_SPACES:
        return validate_space(builtin_space(source), f"the built-in '{source}' space")
    path = Path(source)
    if not path.is_file():
        raise ModelNotFoundError(f"--space {source}: neither a built-in space ({', '.join(BUILTIN_SPACES)}) nor a file.")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ParameterError(f"{path} is not valid JSON/YAML: {str(exc).splitlines()[0]}") from None
    if isinstance(data, dict) and "nas" in data and isinstance(data["nas"], dict):
        data = data["nas"]
    if isinstance(data, dict) and "space" in data:
        data = data["space"]
    return validate_space(data, str(path))


def random_choose(seed: int) -> Choose:
    """A ``choose`` that picks uniformly with its own seeded generator (reproducible)."""
    rng = random.Random(seed)
    return lambda name, options: options[rng.randrange(len(options))]


def sample_spec(space: dict[str, Any], choose: Choose, task_shape: dict[str, Any]) -> dict[str, Any]:
    """One architecture spec from ``space``. ``task_shape`` gives what the task fixes: ``input``
    (name and per-item shape), ``classes`` (output width) and, for encoders, the teacher's sizes."""
    family, choices = space["family"], space["choices"]
    base = {"family": family, **copy.deepcopy(task_shape)}
    if family == "cnn":
        stages = choose("stages", choices["stages"])
        width_mult = choose("width_mult", choices["width_mult"])
        spec_stages = []
        for index in range(stages):
            spec_stages.append({
                "depth": choose(f"depth_{index}", choices["depth"]),
                "width": _round_width(CNN_STAGE_WIDTHS[index] * width_mult),
                "stride": CNN_STAGE_STRIDES[index],
                "kernel": choose(f"kernel_{index}", choices["kernel"]),
                "expansion": choose(f"expansion_{index}", choices["expansion"]),
                "block": choose(f"block_{index}", choices["block"]),
                "se": choose(f"se_{index}", choices["se"]),
            })
        return {**base, "stem": _round_width(CNN_STEM * width_mult), "stages": spec_stages,
                "head": choose("head", choices["head"])}
    if family == "mlp":
        layers = choose("layers", choices["layers"])
        return {**base, "hidden": [choose(f"hidden_{i}", choices["hidden"]) for i in range(layers)],
                "activation": choose("activation", choices["activation"]), "dropout": choose("dropout", choices["dropout"])}
    hidden = choose("hidden", choices["hidden"])
    # only head counts that divide the hidden size: the choice is offered per hidden size so a
    # sampler never proposes a model that cannot exist
    # (and, for a teacher's student, no more heads than the teacher has)
    most = task_shape.get("teacher", {}).get("heads", 4096)
    heads = choose(f"heads_for_{hidden}", [h for h in choices["heads"] if hidden % h == 0 and h <= most] or [1])
    return {**base, "layers": choose("layers", choices["layers"]), "hidden": hidden, "heads": heads,
            "ffn": choose("ffn", choices["ffn"]), "init": choose("init", choices["init"])}


def _round_width(value: float) -> int:
    """Channels rounded to a multiple of 4 (at least 8): SIMD-friendly widths, as MobileNet does with 8."""
    return max(8, round(value / 4) * 4)


def spec_key(spec: dict[str, Any]) -> str:
    """A stable text key of a spec (to spot repeats)."""
    return json.dumps(spec, sort_keys=True)


__all__ = ["BUILTIN_SPACES", "Choose", "builtin_space", "load_space", "random_choose", "sample_spec", "spec_key",
           "validate_space"]
