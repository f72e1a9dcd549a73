import __future__

import importlib
import inspect
import pkgutil
import types

import pytest

import compactai


def test_all_lists_exactly_the_public_names():
    public = {name for name in vars(compactai) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(compactai, name)).__name__ == "module"}
    assert set(compactai.__all__) == public - modules


def public_names(package: types.ModuleType) -> set[str]:
    """Names a package defines or re-exports from its own modules (httpx's test, for packages whose
    ``__init__`` also holds code): helpers imported from elsewhere (``Any``, ``Path``, another
    compactai layer's classes) are not part of its API, submodules are reached by import."""
    return {
        name for name, value in vars(package).items()
        if not name.startswith("_") and not isinstance(value, (types.ModuleType, __future__._Feature))
        and _origin(value, package.__name__).startswith(package.__name__)
    }


def _origin(value: object, here: str) -> str:
    """The module a class or function comes from; other values (constants, registries) are the package's own."""
    return getattr(value, "__module__", here) if isinstance(value, type) or inspect.isroutine(value) else here


SUBPACKAGES = sorted(m.name for m in pkgutil.walk_packages(compactai.__path__, "compactai.") if m.ispkg)


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_each_subpackage_all_lists_exactly_its_public_names(name):
    package = importlib.import_module(name)
    assert hasattr(package, "__all__"), f"{name} has no __all__"
    assert len(package.__all__) == len(set(package.__all__)), f"{name}.__all__ repeats a name"
    assert set(package.__all__) == public_names(package)


def test_subpackages_are_found():
    assert {"compactai.techniques", "compactai.techniques.prune", "compactai.search", "compactai.examples"} <= set(
        SUBPACKAGES)


def test_errors_subclass_builtins():
    from compactai import errors

    assert issubclass(errors.ModelNotFoundError, FileNotFoundError)
    assert issubclass(errors.ParameterError, ValueError)
    assert issubclass(errors.InputSignatureError, TypeError)
    assert issubclass(errors.DuplicateNameError, ValueError)
    assert errors.BadInputError.exit_code == 2 and errors.BudgetNotMetError.exit_code == 3
