"""The one registry type behind techniques, importance criteria, student builders and examples."""

from __future__ import annotations

import pytest

from compactai._registry import Registry
from compactai.errors import DuplicateNameError, UnknownNameError


def first() -> str:
    return "first"


def second() -> str:
    return "second"


def test_register_get_and_names_in_registration_order():
    registry: Registry[object] = Registry("widget")
    assert registry.register("b", first) is first
    registry.register("a", second)
    assert registry.get("b") is first and registry.names() == ["b", "a"] and "a" in registry and len(registry) == 2


def test_a_second_entry_under_a_taken_name_is_refused_and_the_first_kept():
    registry: Registry[object] = Registry("widget")
    registry.register("x", first)
    registry.register("x", first)  # the same object again (a module imported twice) is fine
    with pytest.raises(DuplicateNameError, match=r"widget name 'x' is already taken by .*first.*unregister\('x'\)"):
        registry.register("x", second)
    assert registry.get("x") is first
    registry.unregister("x")
    registry.register("x", second)
    assert registry.get("x") is second


def test_an_unknown_name_lists_the_known_ones():
    registry: Registry[object] = Registry("widget")
    registry.register("alpha", first)
    registry.register("beta", second)
    with pytest.raises(UnknownNameError, match=r"Unknown widget 'gamma'; choose one of: alpha, beta\.$"):
        registry.get("gamma")


@pytest.mark.parametrize("lookup, message", [
    (lambda: __import__("compactai").create_technique("prun"), "Unknown technique 'prun'"),
    (lambda: __import__("compactai.techniques.prune", fromlist=["x"]).get_criterion("l3"),
     "Unknown importance criterion 'l3'"),
    (lambda: __import__("compactai.techniques.distill", fromlist=["x"]).parse_student_spec("wide:2"),
     "Unknown student builder 'wide'"),
    (lambda: __import__("compactai").load_example("mnist"), "Unknown example 'mnist'"),
])
def test_the_four_registries_answer_alike(lookup, message):
    with pytest.raises(UnknownNameError, match=message + "; choose one of: "):
        lookup()


def test_the_four_registries_refuse_duplicates_alike():
    from compactai.examples import EXAMPLES
    from compactai.techniques import Technique, register_technique
    from compactai.techniques.distill import register_student
    from compactai.techniques.prune import register_criterion

    class Impostor(Technique):
        name = "quantize"
        family = "quantize"

        def _apply(self, handle, context, params):
            return handle.derive(), {}

    for register in (lambda: register_technique(Impostor), lambda: register_criterion("l2", lambda: first),
                     lambda: register_student("self")(lambda args, handle, context: None),
                     lambda: EXAMPLES.register("digits", first)):
        with pytest.raises(DuplicateNameError, match="already taken"):
            register()
