from __future__ import annotations

import pytest

from compactai.budget import Budget, Constraint, parse_budget
from compactai.errors import BadInputError


def test_parse_budget_and_min_quality():
    budget = parse_budget("latency_p90_ms<=2, size_mb<=10,memory_mb<=200", "0.99")
    assert [str(c) for c in budget.constraints] == [
        "latency_p90_ms<=2", "size_mb<=10", "memory_mb<=200", "quality_relative>=0.99"]
    assert parse_budget("", "abs:0.97").constraints == [Constraint("quality", ">=", 0.97)]


@pytest.mark.parametrize("text, message", [
    ("latency<=2", "Unknown budget key 'latency'"),
    ("latency_p90_ms>=2", "takes '<='"),
    ("size_mb<=ten", "Cannot read budget term"),
    ("size_mb<=0", "positive limit"),
    ("size_mb<=1,size_mb<=2", "given twice"),
    ("latency_p90_ms<=1e999", "finite limit"),  # float('1e999') is inf: a limit that means nothing
])
def test_bad_budgets_are_explained(text, message):
    with pytest.raises(BadInputError, match=message):
        parse_budget(text)


@pytest.mark.parametrize("value", ["abs:nan", "abs:inf", "abs:-inf", "nan"])
def test_non_finite_min_quality_is_refused(value):
    with pytest.raises(BadInputError, match=r"finite|fraction of the baseline"):
        parse_budget("", value)


def test_min_quality_out_of_range_suggests_abs():
    with pytest.raises(BadInputError, match="abs:97"):
        parse_budget("", "97")


def test_check_reports_how_far_beyond():
    budget = parse_budget("latency_p90_ms<=2,size_mb<=10", "0.99")
    checks = budget.check({"latency_p90_ms": 3.0, "size_mb": 5.0, "quality_relative": 0.995})
    assert [c.ok for c in checks] == [False, True, True]
    assert "50.0% beyond" in checks[0].describe()
    assert budget.violation({"latency_p90_ms": 3.0, "size_mb": 5.0, "quality_relative": 0.995}) == pytest.approx(0.5)
    assert not budget.satisfied({"latency_p90_ms": 1.0, "size_mb": 5.0})  # quality not measured


def test_relative_limits_resolve_against_the_original():
    budget = parse_budget("latency_p90_ms<=0.5x,size_mb<=0.25x")
    assert budget.constraints[0].relative
    resolved = budget.resolve({"latency_p90_ms": 4.0, "size_mb": 8.0})
    assert str(resolved) == "latency_p90_ms<=2,size_mb<=2"
    assert isinstance(resolved, Budget)
