"""Bad input as a user gives it: usage errors and bad values are refused with exit 2 and one
line, before heavy work starts, and nothing on disk is lost or left half-written."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# Address-space cap for the CLI subprocesses: a refusal must come before any large allocation,
# and a regression that allocates anyway fails here instead of eating the shared machine's memory.
ADDRESS_SPACE_BYTES = 6 * 2**30


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_BYTES, ADDRESS_SPACE_BYTES))


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from compactai.cli import main; main()", *args],
        capture_output=True, text=True, cwd=cwd, timeout=timeout, check=False, preexec_fn=_limit_memory,
    )


def refused(result: subprocess.CompletedProcess) -> str:
    """The one error line of a run that must exit 2."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr[-2000:]
    errors = [ln for ln in result.stderr.splitlines() if ln.lower().startswith("error")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


def _mlp_onnx(path: Path, batch: int | str = "batch", features: int = 8, hidden: int = 16) -> Path:
    """A tiny ONNX classifier (x: [batch, features] -> logits: [batch, 3]) built without torch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((features, hidden)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((hidden, 3)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["logits"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, features])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3])],
                              initializer=[w1, w2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _data(path: Path, rows: int = 24, features: int = 8, **override: np.ndarray) -> Path:
    rng = np.random.default_rng(1)
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "calibration", "validation", "test"):
        arrays[f"{split}/x"] = rng.standard_normal((rows, features)).astype(np.float32)
        arrays[f"{split}/labels"] = rng.integers(0, 3, rows).astype(np.int64)
    arrays.update(override)
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    root = tmp_path_factory.mktemp("bad-input")
    made = {"model": _mlp_onnx(root / "mlp.onnx"), "data": _data(root / "data.npz")}
    bad_x = np.random.default_rng(2).standard_normal((24, 8)).astype(np.float32)
    bad_x[3, 2] = np.nan
    made["nan_data"] = _data(root / "nan.npz", **{"test/x": bad_x})
    bad_x = bad_x.copy()
    bad_x[3, 2] = np.inf
    made["inf_data"] = _data(root / "inf.npz", **{"validation/x": bad_x})
    made["empty_data"] = _data(root / "empty.npz", **{"test/x": np.zeros((0, 8), np.float32),
                                                        "test/labels": np.zeros(0, np.int64)})
    made["mismatch_data"] = _data(root / "mismatch.npz", **{"test/labels": np.zeros(5, np.int64)})
    made["long_name_data"] = _data(root / "longname.npz", **{"test/" + "x" * 5000: np.zeros(3, np.float32)})
    made["deep_name_data"] = _data(root / "deepname.npz", **{"/".join(["a"] * 3000): np.zeros(3, np.float32)})
    # a 700-byte YAML "billion laughs": nine levels of nine aliases
    bomb = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    bomb += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    (root / "bomb.yaml").write_text("\n".join([*bomb, "example: digits"]) + "\n")
    made["bomb"] = root / "bomb.yaml"
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    made["binary"] = root / "binary.yaml"
    (root / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    made["deep"] = root / "deep.json"
    (root / "deep.yaml").write_text("example: digits\nbudget: " + "[" * 20_000 + "]" * 20_000 + "\n")
    made["deep_yaml"] = root / "deep.yaml"
    (root / "existing.txt").write_text("keep me")
    made["existing"] = root / "existing.txt"
    # inputs declared with 3e9 floats, and a ConstantOfShape of 8 GiB
    huge = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3_000_000_000])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "huge", [huge],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3_000_000_000])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(root / "huge-input.onnx"))
    made["huge_input"] = root / "huge-input.onnx"
    shape = numpy_helper.from_array(np.array([2, 1024, 1024, 1024], np.int64), "shape")
    one = numpy_helper.from_array(np.array([1.0], np.float32))
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"], value=one),
             helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
             helper.make_node("Add", ["x", "total"], ["y"])]
    graph = helper.make_graph(nodes, "constant", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], initializer=[shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(root / "constant.onnx"))
    made["huge_constant"] = root / "constant.onnx"
    return made


def test_usage_errors_exit_2_with_the_usage_line(files):
    for args in (("profile", str(files["model"]), "--no-such-option"),
                 ("bundle", str(files["model"])),  # missing -o / --key / --version
                 ("profile", str(files["model"]), "--queries", "abc")):
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.returncode, result.stderr)
        assert "Usage:" in result.stderr and "internal error" not in result.stderr, result.stderr


# (CLI arguments with {model}/{data}/{out}/... placeholders, a fragment the error line must contain)
BAD_VALUES = [
    ("optimize {model} --data {data} -o {out} -b latency_p90_ms<=1e999", "finite"),
    ("optimize {model} --data {data} -o {out} --min-quality abs:nan", "finite"),
    ("optimize {model} --data {data} -o {out} --min-quality abs:inf", "finite"),
    ("optimize {model} --data {data} -o {out} --max-minutes 0", "--max-minutes"),
    ("optimize {model} --data {data} -o {out} --max-minutes -2", "--max-minutes"),
    ("optimize {model} --data {data} -o {out} --max-trials -1", "--max-trials"),
    ("optimize {model} --data {data} -o {out} --max-trials 0", "--max-trials"),
    ("optimize {model} --data {nan_data} -o {out}", "NaN"),
    ("quantize {model} --data {inf_data} -o {out} --mode dynamic", "NaN or infinite"),
    ("optimize {model} --data {empty_data} -o {out}", "no rows"),
    ("quantize {model} --data {mismatch_data} -o {out} --mode dynamic", "labels"),
    ("quantize {model} --data {long_name_data} -o {out} --mode dynamic", "name"),
    ("quantize {model} --data {deep_name_data} -o {out} --mode dynamic", "name"),
    ("optimize --recipe {bomb} -o {out}", "alias"),
    ("optimize --recipe {binary} -o {out}", "UTF-8"),
    ("optimize --recipe {deep} -o {out}", "nested"),
    ("optimize --recipe {deep_yaml} -o {out}", "nested"),
    ("optimize {model} --data {data} -o {existing}", "not a directory"),
    ("quantize {model} --data {data} -o {existing} --mode dynamic", "not a directory"),
    ("prune --example digits -o {existing}", "not a directory"),
    ("distill --example digits -o {existing}", "not a directory"),
    ("bundle {model} -o {out} -k {out}/absent.key -v 1 --expires-days inf", "--expires-days"),
    ("bundle {model} -o {out} -k {out}/absent.key -v 1 --expires-days 1e12", "--expires-days"),
    ("bundle {model} -o {existing} -k {out}/absent.key -v 1", "exists"),
    ("profile {model} --batch 0", "batch"),
    ("profile {model} --core-watts -5", "core"),
    ("profile {model} --queries 0", "queries"),
    ("update -d {out} -t {out}/absent.pub --max-latency-ratio -1", "--max-latency-ratio"),
    ("update -d {out} -t {out}/absent.pub --max-latency-ratio nan", "--max-latency-ratio"),
    ("update -d {out} -t {out}/absent.pub --probation-queries 50000000", "--probation-queries"),
    ("profile {huge_input}", "declares input"),
    ("profile " + "m" * 5000 + ".onnx", "too long"),
    ("optimize {model} --data {data} -o {out}/" + "o" * 5000, "too long"),
    ("profile {huge_constant}", "ConstantOfShape"),
]


@pytest.mark.parametrize(("command", "fragment"), BAD_VALUES, ids=[c for c, _ in BAD_VALUES])
def test_bad_value_is_refused_and_nothing_is_lost(files, tmp_path, command, fragment):
    out = tmp_path / "out"
    args = command.format(out=out, **{k: str(v) for k, v in files.items()}).split()
    before = files["existing"].read_text()
    line = refused(run_cli(*args, cwd=tmp_path))
    assert fragment in line, line
    assert files["existing"].read_text() == before
    if not command.startswith("update"):
        assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))


def test_max_trials_is_respected_and_a_recipe_still_works(files, tmp_path):
    """The positive side of the refusals above: a good recipe with one trial runs and says so."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {files['model']}\nbudget: size_mb<=100\nmin_quality: 0.1\nmax_trials: 1\n")
    result = run_cli("optimize", "--recipe", str(recipe), "--data", str(files["data"]), "-o", str(tmp_path / "o"),
                     "--quick", "--remeasure-rounds", "0", "--json", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["search"]["trials_finished"] == 1
