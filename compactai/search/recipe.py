"""Recipe files (YAML or JSON): model, task data, budget, search space, runtime and seed, validated."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from compactai.errors import BadInputError, ModelNotFoundError


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    technique: str
    optional: bool = True
    params: dict[str, Any] = Field(default_factory=dict)


class RecipeFile(BaseModel):
    """Everything needed to re-run an optimization."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    example: str | None = None
    budget: str = ""
    min_quality: str | float | None = None
    search_space: list[StageSpec] | None = None
    runtime: Literal["onnxruntime"] = "onnxruntime"
    seed: int = 0
    max_trials: int = Field(20, ge=1, le=10_000)
    max_minutes: float | None = Field(None, gt=0)
    executor: Literal["local", "ray"] = "local"
    threads: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> RecipeFile:
        if (self.model is None) == (self.example is None):
            raise ValueError("give exactly one of 'model' (a path) or 'example' (digits, minilm)")
        return self


MAX_RECIPE_BYTES = 1_000_000  # a recipe is a few hundred bytes; anything near this is not one
MAX_RECIPE_DEPTH = 32  # nesting of mappings/lists (a search space needs about 4)


class _NoAliasLoader(yaml.SafeLoader):
    """YAML's safe loader without anchors and aliases: a few hundred bytes of nested aliases
    ("billion laughs") expand to gigabytes, and recipes never need them. Nesting is bounded
    while composing, before the recursive constructor could overflow the stack."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None) is not None:
            event = self.peek_event()
            raise BadInputError(f"YAML anchors and aliases are not allowed in recipes (line {event.start_mark.line + 1}); "
                                "write the values out in full.")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_RECIPE_DEPTH:
                raise BadInputError(f"The recipe is nested more than {MAX_RECIPE_DEPTH} levels deep; a recipe needs "
                                    "about 4 (search_space -> stage -> params -> value).")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _depth(data: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(value, dict):
            stack.extend((v, level + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, level + 1) for v in value)
    return deepest


def _parse(path: Path, text: str) -> Any:
    if path.suffix.lower() in (".yaml", ".yml"):
        loader = _NoAliasLoader(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    data = json.loads(text)  # its decoder recurses per level: RecursionError is caught by the caller
    if _depth(data) > MAX_RECIPE_DEPTH:
        raise BadInputError(f"The recipe is nested more than {MAX_RECIPE_DEPTH} levels deep; a recipe needs about 4.")
    return data


def load_recipe(path: str | Path) -> RecipeFile:
    """Read and validate a recipe file; errors name the file and the field."""
    path = Path(path)
    try:
        size = path.stat().st_size if path.is_file() else None
        raw = path.read_bytes() if size is not None and size <= MAX_RECIPE_BYTES else b""
    except OSError as exc:  # e.g. ENAMETOOLONG, permission denied
        raise BadInputError(f"Cannot read recipe {str(path)[:200]}: {exc.strerror}.") from None
    if size is None:
        raise ModelNotFoundError(f"Recipe file not found: {path}.")
    if size > MAX_RECIPE_BYTES:
        raise BadInputError(f"Recipe {path} is {size:,} bytes; a recipe is a small YAML or JSON file "
                            f"(at most {MAX_RECIPE_BYTES:,} bytes).")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInputError(f"Recipe {path} is not UTF-8 text (byte {exc.start}); give a YAML or JSON file.") from None
    try:
        data = _parse(path, text)
    except BadInputError as exc:
        raise BadInputError(f"Recipe {path}: {exc}") from None
    except RecursionError:
        raise BadInputError(f"Recipe {path} is nested too deeply to read; a recipe needs about 4 levels.") from None
    except (yaml.YAMLError, ValueError) as exc:
        raise BadInputError(f"Cannot parse recipe {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise BadInputError(f"Recipe {path} must be a mapping of fields (model/example, budget, ...).")
    try:
        return RecipeFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise BadInputError(f"Recipe {path}: field '{where}': {first['msg']}.") from None
