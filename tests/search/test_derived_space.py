"""optimize on users' models: the space comes from the model (inapplicable techniques skipped with
the reason, not run as failed trials; students from the real depth; the quantize guard rail
follows the budget), the stop reason is honest, and exit 3 writes the closest model."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from compactai import load_model
from compactai.budget import parse_budget
from compactai.errors import BudgetNotMetError
from compactai.measure import MeasureConfig
from compactai.search import SearchConfig, optimize
from compactai.search.space import space_for_model
from compactai.techniques.distill.students import student_choices


@pytest.fixture(scope="module")
def tabular(user_zoo):
    from compactai.cli._common import task_from_data

    model = user_zoo("tabular")
    handle = load_model(model.onnx)
    return handle, task_from_data(model.data, handle)


@pytest.mark.slow
def test_onnx_model_space_skips_torch_techniques_with_the_reason(tabular) -> None:
    handle, task = tabular
    space = space_for_model(handle, task, parse_budget("latency_p90_ms<=0.5x,size_mb<=0.25x", "0.99"))
    assert set(space.skipped) >= {"structured_prune", "distill"}
    assert "torch model" in space.skipped["distill"]  # an ONNX file is no student to train
    assert "train and validation splits" in space.skipped["structured_prune"]  # it converts, but cannot fine-tune
    assert [stage.techniques for stage in space.stages] == [["quantize"]]
    quantize = space.stages[0].search["quantize"]
    assert {"static", "dynamic"} <= set(quantize["mode"].choices)
    assert set(quantize["format"].choices) == {"qdq", "qoperator"}
    assert set(quantize["calibration"].choices) == {"minmax", "entropy", "percentile"}
    assert "both" in quantize["float_ends"].choices
    size = space.size()
    assert size is not None and size > 20  # far more than the 3-4 recipes of a fixed list
    recorded = space.to_dict()
    assert recorded["skipped"] == space.skipped and recorded["candidates"] == size


@pytest.mark.slow
def test_quantize_guard_rail_follows_the_budget(tabular) -> None:
    handle, task = tabular
    by_size = space_for_model(handle, task, parse_budget("size_mb<=0.25x", "0.99"))
    by_latency = space_for_model(handle, task, parse_budget("latency_p90_ms<=0.5x", "0.99"))
    assert by_size.stages[0].fixed["quantize"]["objective"] == "size"
    assert by_latency.stages[0].fixed["quantize"]["objective"] == "latency"


class _Stack(nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


@pytest.mark.parametrize("depth", [3, 4, 6])
def test_students_keep_only_layers_the_model_has(depth: int) -> None:
    handle = load_model(_Stack(depth).eval(), torch.randn(1, 8))
    choices = student_choices(handle)
    assert choices and all(c.startswith("layers:") for c in choices)
    for choice in choices:
        kept = [int(i) for i in choice.split(":")[1].split(",")]
        assert 0 < len(kept) < depth and max(kept) < depth


def test_distill_is_skipped_without_a_train_split(tabular) -> None:
    _, task = tabular  # the zoo's data.npz holds calibration, validation and test only
    torch_handle = load_model(_Stack(4).eval(), torch.randn(1, 8))
    space = space_for_model(torch_handle, task, None, ["distill"])
    assert "train split" in space.skipped["distill"] and not space.stages


@pytest.mark.slow
def test_exhausted_space_stops_honestly_and_exit_3_writes_the_closest_model(tabular, tmp_path) -> None:
    handle, task = tabular
    budget = parse_budget("size_mb<=0.01x", "0.99")  # no int8 model of this MLP is 100x smaller
    space = space_for_model(handle, task, budget, overrides={
        "quantize": {"mode": ["dynamic"], "per_channel": [True], "float_ends": ["none", "last"]}})
    assert space.size() == 3  # the original, and dynamic int8 with or without the classifier in float
    config = SearchConfig(max_trials=10, measure=MeasureConfig.quick(), remeasure_rounds=0)
    out = tmp_path / "run"
    with pytest.raises(BudgetNotMetError, match="Every candidate the search space allows has run"):
        optimize(handle, task, budget, out, config, space=space)
    data = json.loads((out / "results.json").read_text())
    assert data["search"]["stopped_by"] == "exhausted"
    assert len(data["trials"]) == 3 and all(t["status"] == "ok" for t in data["trials"])
    assert data["budget_met"] is False and data["model"]["path"] == "model.onnx"
    assert (out / "model.onnx").exists()
    assert data["closest"]["trial"] == data["selection"]["closest"][0]
    assert "NOT meet the budget" in data["closest"]["note"]
    kept = [t["lineage"][-1]["decisions"]["kept"] for t in data["trials"] if t["recipe"]]
    assert kept == ["quantized", "quantized"]  # size budget: int8 kept whether or not it is faster


@pytest.mark.slow
def test_every_value_of_the_derived_quantize_space_is_accepted(tabular) -> None:
    """No trial can fail on its parameters: each fixed value and choice validates."""
    from compactai.techniques import create_technique

    handle, task = tabular
    stage = space_for_model(handle, task, parse_budget("size_mb<=0.25x", "0.99")).stages[0]
    fixed, search = stage.fixed["quantize"], stage.search["quantize"]
    refused, checked = [], 0
    for name, spec in search.items():
        for value in spec.choices:
            checked += 1
            try:
                create_technique("quantize", **{**fixed, name: value}).validate()
            except ValueError as exc:  # ParameterError: a value the technique would refuse as a trial
                refused.append(f"{name}={value!r}: {exc}")
    assert checked >= 4, search  # the derived space really has choices to check
    assert refused == []
