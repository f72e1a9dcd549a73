"""The contract every registered technique keeps (like timm's test_models / sklearn's
parametrize_with_checks): it applies with its ``quick`` parameters to a real small CNN on the
real digits data, leaves its input (weights and metadata) untouched, keeps the signature, exports
to ONNX, runs in ONNX Runtime, is measured, records its step as JSON data, rejects unknown
parameters, and the ranges the optimizer searches on each kind are values it accepts."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from compactai import (
    Context,
    MeasureConfig,
    Task,
    available_techniques,
    create_technique,
    load_model,
    measure,
)
from compactai.errors import ParameterError
from compactai.measure import make_runner
from compactai.search.space import SearchSpace, Stage, default_space
from compactai.techniques import ChoiceParam
from tests.conftest import SmallResidualCNN

TECHNIQUES = sorted(available_techniques())


@pytest.fixture(scope="module")
def small_digits():
    """A small residual CNN briefly trained on the real digits split (subsampled), and its task."""
    from compactai.examples.digits import load_digits_splits, train_classifier
    from compactai.tasks import Accuracy

    splits = load_digits_splits()
    small = {"train": splits["train"].take(384), "calibration": splits["calibration"].take(32),
             "validation": splits["validation"].take(96), "test": splits["test"].take(96)}
    torch.manual_seed(0)
    model = SmallResidualCNN(width=8)
    train_classifier(model, small, epochs=2, batch_size=64)
    handle = load_model(model, torch.from_numpy(small["test"].inputs["image"][:1]), name="small-digits",
                        output_names=["logits"])
    task = Task("small-digits", Accuracy(), small, batch_size=64)
    task.baseline = task.evaluate(handle.run_torch).value
    return handle, task


def test_registry_is_populated():
    assert {"quantize", "structured_prune", "distill"} <= set(TECHNIQUES)


@pytest.mark.parametrize("name", TECHNIQUES)
def test_technique_contract(name, small_digits, tmp_path):
    handle, task = small_digits
    cls = available_techniques()[name]
    assert cls.name == name and cls.family and cls.accepts
    if "cnn" not in cls.kinds:
        pytest.skip(f"{name} does not apply to CNNs")
    fingerprint, metadata = handle.fingerprint(), copy.deepcopy(handle.metadata)
    technique = create_technique(name, **cls.quick)
    context = Context(task=task, teacher=handle, seed=0, work_dir=tmp_path)
    result = technique.apply(handle, context)
    assert result is not handle
    assert handle.fingerprint() == fingerprint, "the input model was modified in place"
    assert handle.metadata == metadata, "the input handle's metadata was modified"
    assert result.input_names == handle.input_names
    assert [o.shape[1:] for o in result.outputs] == [o.shape[1:] for o in handle.outputs]
    step = result.metadata["history"][-1]
    assert step["technique"] == name and len(result.metadata["history"]) == len(metadata.get("history", [])) + 1
    try:  # the step goes into results.json and the bundle manifest as is
        json.dumps(step)
    except TypeError as exc:
        pytest.fail(f"{name} recorded a step that is not plain JSON data: {exc}")
    onnx_handle = result.to_onnx(tmp_path / "out.onnx") if result.framework == "torch" else result
    batch = {"image": task.split("test").inputs["image"][:3]}
    out = make_runner(onnx_handle, "onnxruntime", threads=1).run(batch)
    assert out[0].shape == (3, 10) and np.isfinite(out[0]).all()
    figures = measure(onnx_handle, task, runtime="onnxruntime", config=MeasureConfig.quick())
    assert figures.latency_p50_ms > 0 and figures.size_bytes and figures.quality["metric"] == "accuracy"


@pytest.mark.parametrize("name", TECHNIQUES)
def test_unknown_parameter_is_rejected_by_name(name):
    technique = create_technique(name, definitely_not_a_parameter=1)
    with pytest.raises(ParameterError, match="definitely_not_a_parameter"):
        technique.validate()


def kind_spaces(name: str) -> list[tuple[str, Stage]]:
    """The optimizer's stage for this technique on each model kind it takes (search_space narrowed
    and fixed by search_defaults(kind)), as the search builds it."""
    cls = available_techniques()[name]
    return [(kind, default_space(kind, techniques=[name]).stages[0]) for kind in cls.kinds]


@pytest.mark.parametrize("name", TECHNIQUES)
def test_search_ranges_lie_inside_the_declared_space(name):
    """Every fixed value, every choice and both ends of every range the optimizer may use on any
    kind are values the technique accepts (so no trial fails on its parameters)."""
    cls = available_techniques()[name]
    assert cls.search_space, f"{name} declares no search_space"
    for kind, stage in kind_spaces(name):
        fixed, search = stage.fixed[name], stage.search[name]
        create_technique(name, **fixed).validate()
        assert search, f"{name} searches nothing on {kind}"
        for pname, spec in search.items():
            assert pname in cls.space, f"{name} searches unknown parameter {pname} on {kind}"
            values = list(spec.choices) if isinstance(spec, ChoiceParam) else [spec.low, spec.high]
            for value in [*values, spec.default]:
                try:
                    create_technique(name, **{**fixed, pname: value}).validate()
                except ParameterError as exc:
                    raise AssertionError(f"{name} on {kind}: the search range of {pname} allows {value!r}: {exc}") from exc


@pytest.mark.parametrize("name", TECHNIQUES)
def test_recipes_sampled_by_the_search_space_are_valid(name):
    """Recipes drawn by ``SearchSpace.sample`` (the seed trials enqueued with defaults, then the
    sampler's own draws) through a real Optuna study validate on every kind."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for kind, stage in kind_spaces(name):
        space = SearchSpace([stage])
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        seeds = space.seed_trials()
        for params in seeds:
            study.enqueue_trial(params)
        steps = []
        for _ in range(len(seeds) + 8):
            trial = study.ask()
            recipe = space.sample(trial)
            steps += recipe
            study.tell(trial, 0.0)
        assert any(step["params"] for step in steps), f"{name} on {kind}: no sampled recipe used the technique"
        for step in steps:
            assert step["technique"] == name
            create_technique(name, **step["params"]).validate()
