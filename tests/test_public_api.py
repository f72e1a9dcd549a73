import compactai


def test_all_lists_exactly_the_public_names():
    public = {name for name in vars(compactai) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(compactai, name)).__name__ == "module"}
    assert set(compactai.__all__) == public - modules


def test_errors_subclass_builtins():
    from compactai import errors

    assert issubclass(errors.ModelNotFoundError, FileNotFoundError)
    assert issubclass(errors.ParameterError, ValueError)
    assert issubclass(errors.InputSignatureError, TypeError)
    assert errors.BadInputError.exit_code == 2 and errors.BudgetNotMetError.exit_code == 3
