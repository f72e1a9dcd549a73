"""Inspect a torch.export ``.pt2`` archive before torch opens it, and refuse anything that runs code.

``torch.export.load`` runs code from the archive in several ways besides ``torch.load``
(which compactai forces to ``weights_only=True``), all found in torch 2.13's
``torch/export/pt2_archive/_package.py``, ``torch/_export/serde/serialize.py`` and
``torch/export/_unlift.py``:

- a constants entry whose ``path_name`` starts with ``opaque_obj_`` is read with ``pickle.loads``;
  one starting with ``custom_obj_`` with TorchScript's unpickler;
- a weights or constants entry with ``"use_pickle": true`` goes to ``torch.load(weights_only=False)``;
- legacy ``data/weights/<model>.pt`` / ``data/constants/<model>.pt`` members are unpickled;
- anything under ``data/aotinductor/`` is a compiled shared library that torch loads (native code);
- every ``expr_str`` of a symbolic shape in ``models/<model>.json`` goes to ``sympy.sympify``,
  which ``eval``s the string;
- every string of ``guards_code`` is pasted into Python source and ``exec``-ed by ``.module()``.

So the archive is read with ``zipfile`` (bounded: member count, name length, JSON sizes), its
payload configs and program JSON are checked, and only then is it handed to torch. The only
pickle left is ``data/sample_inputs/<model>.pt`` (a ``torch.save`` file of example tensors),
which torch reads with ``torch.load`` under compactai's ``weights_only=True``.
"""

from __future__ import annotations

import ast
import json
import re
import zipfile
from pathlib import Path
from typing import Any

from compactai.errors import CorruptModelError, UnsafeFormatError
from compactai.models.safety import MAX_NAME, ZipBoundError, open_zip, pickle_reason, zip_pickle_reason

MAX_CONFIG_BYTES = 64 * 1024**2  # a payload config JSON (one entry per weight)
MAX_PROGRAM_BYTES = 512 * 1024**2  # models/<name>.json, the serialized graph
MAX_EXPRESSION = 10_000  # characters of one shape expression or guard
RECORDS = {"archive_format", "archive_version", "byteorder", "version", ".data/version", ".data/serialization_id"}
SIMPLE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}$")
SYMBOL_NAME = re.compile(r"^[a-z]{1,8}[0-9]{1,12}$")  # s77, u0, ps3, zuf0: torch's shape symbols
SAFE_STRING = re.compile(r"^[A-Za-z0-9_ .:-]{0,200}$")  # no quotes or backslashes to break out with

# Names a shape expression may use: sympy's constructors and torch's sympy functions (what the
# deserializer passes to sympify as locals), and sympy assumptions as keyword arguments.
SYMPY_NAMES = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "Eq", "Ne",
    "Lt", "Le", "Gt", "Ge", "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan", "Equality",
    "Unequality", "And", "Or", "Not", "Piecewise", "ITE", "floor", "ceiling", "sqrt", "log", "exp",
    "oo", "zoo", "nan", "true", "false", "BooleanTrue", "BooleanFalse", "Infinity", "NegativeInfinity",
    "One", "Zero", "NegativeOne", "Half", "CeilDiv", "CeilToInt", "CleanDiv", "FloatPow", "FloatTrueDiv",
    "FloorDiv", "FloorToInt", "Identity", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "LShift",
    "ModularIndexing", "PowByNatural", "PythonMod", "RShift", "RoundDecimal", "RoundToInt", "ToFloat",
    "TruncToFloat", "TruncToInt", "Where",
}
SYMPY_KEYWORDS = {
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "infinite", "zero",
    "nonzero", "even", "odd", "commutative", "evaluate",
}
# What a guard may use: L[...] (the inputs), their size/stride/..., math, comparisons, arithmetic.
GUARD_NAMES = {"L", "math", "inf", "IsNonOverlappingAndDenseIndicator", "cast_symbool_to_symint_guardless"}
GUARD_ATTRIBUTES = {"size", "stride", "storage_offset", "dim", "numel", "isnan", "isinf", "inf", "floor", "ceil",
                    "trunc", "sqrt", "pi", "e"}
_OPERATOR_NODES = (ast.operator, ast.boolop, ast.cmpop, ast.unaryop, ast.expr_context)


def load_checked_program(path: Path, *, checked: bool = False) -> Any:
    """``torch.export.load`` of ``path`` after :func:`check_pt2_archive` (skipped when the caller
    has just run it: ``checked``), with every ``torch.load`` inside forced to ``weights_only=True``
    (torch.export.load otherwise falls back to full unpickling when a weights-only load fails)."""
    import torch

    if not checked:
        check_pt2_archive(path)
    original = torch.load

    def weights_only_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = weights_only_load
    try:
        return torch.export.load(str(path))
    finally:
        torch.load = original


def check_pt2_archive(path: Path) -> None:
    """Refuse (UnsafeFormatError) a .pt2 that would run code or unpickle when loaded; CorruptModelError
    for one that is not a torch.export archive. Reads the zip directly; torch never sees a refused file."""
    try:
        with path.open("rb") as stream, open_zip(stream) as archive:
            _check_archive(path, archive)
    except ZipBoundError as exc:
        raise _unsafe(path, str(exc)) from exc
    except zipfile.BadZipFile as exc:
        reason = pickle_reason(path)  # e.g. a pickle stream renamed .pt2
        if reason:
            raise _unsafe(path, reason) from exc
        raise CorruptModelError(f"{path} is not a torch.export .pt2 archive ({exc}). Re-save it with "
                                "torch.export.save, or export to ONNX.") from exc


def _unsafe(path: Path, reason: str) -> UnsafeFormatError:
    return UnsafeFormatError(
        f"Refusing to load {path.name}: {reason}, which would run code when loaded. Re-export the model "
        "with torch.export.save from plain tensors, or export it to ONNX."
    )


def _check_archive(path: Path, archive: zipfile.ZipFile) -> None:
    infos = archive.infolist()
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        # zipfile reads the last copy of a name, torch's reader may read another: what we check must be what runs
        raise _unsafe(path, "it holds two members with the same name")
    roots = {name.split("/", 1)[0] for name in names}
    bad = [n for n in names if len(n) > MAX_NAME or "\\" in n or "\x00" in n or "/" not in n]
    if len(roots) != 1 or bad:
        reason = zip_pickle_reason(archive)  # e.g. a torch.save zip renamed .pt2
        if reason:
            raise _unsafe(path, reason)
        raise CorruptModelError(f"{path} is not a torch.export .pt2 archive (its members are not under one "
                                "folder). Re-save it with torch.export.save, or export to ONNX.")
    root = roots.pop() + "/"
    records = {name[len(root):]: info for name, info in zip(names, infos)}
    if _read(archive, records.get("archive_format"), 16) != b"pt2":
        reason = zip_pickle_reason(archive)
        if reason:
            raise _unsafe(path, reason)
        raise CorruptModelError(f"{path} is not a torch.export .pt2 archive (no 'archive_format: pt2' record). "
                                "Re-save it with torch.export.save, or export to ONNX.")
    raw: set[str] = set()  # members torch reads as raw tensor bytes, never unpickled
    for record in records:
        if record.startswith("data/aotinductor/"):
            raise _unsafe(path, f"it holds AOTInductor compiled code ({record!r}), a shared library torch loads")
        if not record.startswith("models/"):
            continue
        model = record[len("models/"):].removesuffix(".json")
        if not record.endswith(".json") or not SIMPLE_NAME.match(model):
            raise _unsafe(path, f"it holds an unexpected program member {record!r}")
        raw |= _check_payloads(path, archive, records, model, "weights")
        raw |= _check_payloads(path, archive, records, model, "constants")
        _check_program(path, _json(path, archive, records[record], MAX_PROGRAM_BYTES))
        raw.add(f"data/sample_inputs/{model}.pt")  # torch.save example inputs: loaded with weights_only=True
    if not raw:
        raise CorruptModelError(f"{path} holds no exported program (no models/<name>.json). Re-save it with "
                                "torch.export.save, or export to ONNX.")
    # Every other member must not be (or hold) a pickle: torch ignores most, but nothing gets the benefit of the doubt.
    reason = zip_pickle_reason(archive, skip=frozenset(root + record for record in raw))
    if reason:
        raise _unsafe(path, reason)


def _read(archive: zipfile.ZipFile, info: zipfile.ZipInfo | None, limit: int) -> bytes | None:
    if info is None or info.file_size > limit:
        return None
    with archive.open(info) as member:
        return member.read(limit + 1)


def _json(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> Any:
    data = _read(archive, info, limit)
    if data is None or len(data) > limit:
        raise _unsafe(path, f"its {info.filename!r} is over {limit} bytes")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise CorruptModelError(f"{path}: {info.filename} is not valid JSON ({type(exc).__name__}). Re-save "
                                "it with torch.export.save, or export to ONNX.") from exc


def _check_payloads(path: Path, archive: zipfile.ZipFile, records: dict[str, zipfile.ZipInfo], model: str,
                    kind: str) -> set[str]:
    """Refuse pickled entries of one payload config; return the raw tensor members it names."""
    legacy = f"data/{kind}/{model}.pt"
    if legacy in records:
        raise _unsafe(path, f"it holds {legacy!r}, legacy pickled {kind}")
    config_name = f"data/{kind}/{model}_{kind}_config.json"
    if config_name not in records:
        raise CorruptModelError(f"{path} lacks {config_name}; it is not a complete torch.export archive. "
                                "Re-save it with torch.export.save, or export to ONNX.")
    config = _json(path, archive, records[config_name], MAX_CONFIG_BYTES)
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise CorruptModelError(f"{path}: {config_name} has no 'config' mapping. Re-save it with torch.export.save.")
    raw = set()
    for fqn, entry in entries.items():
        name = entry.get("path_name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not SIMPLE_NAME.match(name):
            raise _unsafe(path, f"its {kind} entry {str(fqn)[:80]!r} has an unexpected path_name")
        if entry.get("use_pickle") is not False:
            raise _unsafe(path, f"its {kind} entry {str(fqn)[:80]!r} is pickled (use_pickle)")
        if kind == "constants" and not name.startswith("tensor_"):
            # custom_obj_* go to TorchScript's unpickler, opaque_obj_* to pickle.loads
            raise _unsafe(path, f"its constant {str(fqn)[:80]!r} is a pickled object ({name!r})")
        raw.add(f"data/{kind}/{name}")
    return raw


def _check_program(path: Path, program: Any) -> None:
    """Every shape expression (sympified) and guard (exec-ed) of the program JSON is a plain expression."""
    if not isinstance(program, dict):
        raise CorruptModelError(f"{path}: the program JSON is not an object. Re-save it with torch.export.save.")
    guards = program.get("guards_code", [])
    if not isinstance(guards, list):
        raise _unsafe(path, "its guards_code is not a list of expressions")
    for guard in guards:
        if not _safe_expression(guard, GUARD_NAMES, GUARD_ATTRIBUTES, subscripts=True):
            raise _unsafe(path, f"its guard {str(guard)[:80]!r} is not a plain shape check (it is exec-ed)")
    stack: list[Any] = [program]
    while stack:  # iterative: a deeply nested program must not overflow the Python stack
        node = stack.pop()
        if isinstance(node, dict):
            expression = node.get("expr_str")
            if expression is not None and not _safe_expression(expression, SYMPY_NAMES, set(), subscripts=False):
                raise _unsafe(path, f"its shape expression {str(expression)[:80]!r} is not a plain sympy "
                                    "expression (it is eval-ed)")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _safe_expression(text: Any, names: set[str], attributes: set[str], *, subscripts: bool) -> bool:
    """True if ``text`` parses as one Python expression built only from allowed names, attributes,
    calls of those, literals (strings without quotes or backslashes) and operators."""
    if not isinstance(text, str) or len(text) > MAX_EXPRESSION:
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, (ast.Expression, ast.Compare, ast.BoolOp, ast.UnaryOp, ast.BinOp, ast.Tuple,
                             *_OPERATOR_NODES)):
            continue
        if isinstance(node, ast.Constant):
            if isinstance(node.value, str) and not SAFE_STRING.match(node.value):
                return False
            if not isinstance(node.value, (str, int, float, bool, type(None))):
                return False
        elif isinstance(node, ast.Name):
            if node.id not in names and not (not subscripts and SYMBOL_NAME.match(node.id)):
                return False
        elif isinstance(node, ast.Attribute):
            if node.attr not in attributes:
                return False
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, (ast.Name, ast.Attribute)):
                return False
        elif isinstance(node, ast.keyword):
            if node.arg not in SYMPY_KEYWORDS:
                return False
        elif isinstance(node, ast.Subscript):
            if not subscripts:
                return False
        else:
            return False  # lambdas, comprehensions, starred, f-strings, walrus ...
    return True
