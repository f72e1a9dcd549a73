"""The declared parameter types: each accepts what it says and refuses the rest with
scikit-learn's one-line message naming the parameter, the technique and what it must be."""

from __future__ import annotations

import math

import pytest

from compactai._registry import Registry
from compactai.errors import ParameterError
from compactai.techniques import (
    CallableParam,
    ChoiceParam,
    FloatParam,
    IntParam,
    NameParam,
    NoneOr,
    StringsParam,
    TypeParam,
    create_technique,
)

NAMES: Registry[object] = Registry("thing")
NAMES.register("l1", object())
NAMES.register("l2", object())


@pytest.mark.parametrize("spec, good, bad, must_be", [
    (FloatParam(0.0, 1.0, 0.5, open_low=True, open_high=True), [0.5, 1e-9], [0, 1, 1.5, True, "0.5"],
     "a float in the range (0, 1)"),
    (FloatParam(0.0, math.inf), [0, 7.5], [-0.1, None], "a float in the range [0, inf)"),
    (IntParam(1, 20, 1), [1, 20], [0, 21, 2.0, True], "an int in the range [1, 20]"),
    (ChoiceParam(("layer", "global"), "layer"), ["global"], ["local", None], "one of layer, global"),
    (NameParam(NAMES, "l1"), ["l2"], ["l3", 1], "one of l1, l2"),
    (StringsParam(), [[], ["a", "b"], ("a",)], ["a", [1], None], "a list of str"),
    (StringsParam(single_ok=True), ["a", ["a"]], [[1]], "a list of str or a str"),
    (NoneOr(CallableParam(signature="handle -> ms")), [None, len], [3], "a callable (handle -> ms) or None"),
    (TypeParam((dict,)), [{}], [[], None], "an instance of 'dict'"),
    (NoneOr(FloatParam(-math.inf, math.inf)), [None, -3, 2.5], ["a", True], "a float or None"),
])
def test_each_type_accepts_and_refuses_with_one_clear_line(spec, good, bad, must_be):
    for value in good:
        spec.check("Owner", "p", value)
    for value in bad:
        with pytest.raises(ParameterError) as info:
            spec.check("Owner", "p", value)
        assert str(info.value) == f"The 'p' parameter of Owner must be {must_be}. Got {value!r} instead."


def test_checked_values_come_back_as_the_technique_uses_them():
    assert StringsParam(single_ok=True).check("O", "p", "conv1") == ["conv1"]
    assert FloatParam(0, 1).check("O", "p", 1) == 1.0 and isinstance(FloatParam(0, 1).check("O", "p", 1), float)
    assert NoneOr(StringsParam()).check("O", "p", None) is None


def test_structured_prune_ratio_message_is_scikit_learns():
    with pytest.raises(ParameterError, match=r"^The 'ratio' parameter of StructuredPrune must be a float in the "
                                             r"range \(0, 1\)\. Got 1\.5 instead\.$"):
        create_technique("structured_prune", ratio=1.5).validate()


def test_a_criterion_registered_by_a_plugin_is_a_valid_criterion():
    from compactai.techniques.prune import CRITERIA, register_criterion

    register_criterion("test_plugin_criterion", lambda: (lambda group: None))
    try:
        assert create_technique("structured_prune", criterion="test_plugin_criterion").validate()["criterion"] == (
            "test_plugin_criterion")
    finally:
        CRITERIA.unregister("test_plugin_criterion")
    with pytest.raises(ParameterError, match="'criterion' parameter of StructuredPrune must be one of l1, l2"):
        create_technique("structured_prune", criterion="test_plugin_criterion").validate()
