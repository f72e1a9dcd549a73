"""Recipe files (YAML or JSON): model, task data, budget, search space, runtime and seed, validated."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

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


def load_recipe(path: str | Path) -> RecipeFile:
    """Read and validate a recipe file; errors name the file and the field."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"Recipe file not found: {path}.")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise BadInputError(f"Cannot parse recipe {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise BadInputError(f"Recipe {path} must be a mapping of fields (model/example, budget, ...).")
    try:
        return RecipeFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise BadInputError(f"Recipe {path}: field '{where}': {first['msg']}.") from None
