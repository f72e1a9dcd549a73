"""The contract every registered technique keeps (like timm's test_models / sklearn's
parametrize_with_checks): it applies with its ``quick`` parameters to a real small CNN on the
real digits data, leaves its input untouched, keeps the signature, exports to ONNX, runs in
ONNX Runtime, is measured, records its step, and rejects unknown parameters."""

from __future__ import annotations

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
    fingerprint = handle.fingerprint()
    technique = create_technique(name, **cls.quick)
    technique.validate()
    context = Context(task=task, teacher=handle, seed=0, work_dir=tmp_path)
    result = technique.apply(handle, context)
    assert result is not handle
    assert handle.fingerprint() == fingerprint, "the input model was modified in place"
    assert result.input_names == handle.input_names
    assert [o.shape[1:] for o in result.outputs] == [o.shape[1:] for o in handle.outputs]
    assert result.metadata.get("history") and result.metadata["history"][-1]["technique"] == name
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


@pytest.mark.parametrize("name", TECHNIQUES)
def test_search_space_is_usable_by_the_optimizer(name):
    import optuna

    from compactai.search.space import searched_params

    cls = available_techniques()[name]
    study = optuna.create_study()
    trial = study.ask()
    for pname, spec in searched_params(cls).items():
        assert pname in cls.space, f"{name}.search_space names unknown parameter {pname}"
        if hasattr(spec, "choices"):
            value = trial.suggest_categorical(pname, list(spec.choices))
        elif isinstance(spec.low, int) and isinstance(spec.high, int) and not isinstance(spec.low, bool):
            value = trial.suggest_int(pname, spec.low, spec.high, log=spec.log)
        else:
            value = trial.suggest_float(pname, spec.low, spec.high, log=spec.log)
        cls.space[pname].check(cls.__name__, pname, value)  # every searched value is a valid value
