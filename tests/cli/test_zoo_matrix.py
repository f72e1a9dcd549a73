"""Every user-style zoo model through every command, as a user runs them (issue 15, item 8).

Each cell (model x command) either works (exit 0) or is refused with one line saying why (exit 2
for a model or option the command cannot take, 3 for a result that misses its bar) - never an
internal error (exit 1) or a traceback. The expected outcome of each cell is pinned, so a command
that starts failing, or starts refusing, on a model shows up here. The matrix is written out
(model x command: ok / refused with the reason) to $COMPACTAI_MATRIX_OUT when set, for
docs/your-model.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from compactai.measure.environment import int8_kernels_saturate
from tests.cli.test_bad_input import run_cli

FAST = ("--queries", "5", "--seconds", "0.02")
COMMANDS = ("profile", "quantize dynamic", "quantize static", "quantize auto", "prune", "bundle + verify")

# expected exit code per (model, command); 0 unless listed
EXPECTED: dict[tuple[str, str], int] = {
    ("sensor", "prune"): 2,  # onnx2torch has no GRU converter: refused, naming the op
    ("mobilenet.pt2", "bundle + verify"): 2,  # a bundle ships ONNX: export first
    ("bert-dir", "bundle + verify"): 2,
    ("gpt2-dir", "bundle + verify"): 2,
    # no int8-weight configuration keeps next-token agreement within 1 point; where the u8s8 kernels
    # saturate (x86 without VNNI, where int8 weights lose their 8th bit) auto also tries uint8 weights,
    # which keep it
    ("gpt2-dir", "quantize auto"): 0 if int8_kernels_saturate() else 3,
    # Torch-Pruning cannot follow the graph onnx2torch makes of the program's ONNX export: refused,
    # naming the layer to --protect
    ("mobilenet.pt2", "prune"): 2,
}


def _model(user_zoo, root: Path, name: str) -> tuple[Path, Path]:
    """(model path, data.npz) of zoo model ``name``; the user zoo is built once per session."""
    from tests.zoo.hf import bert_classifier_dir, gpt2_dir, token_npz

    if name == "bert-dir":
        bert = bert_classifier_dir(root / "bert", train_steps=60)
        return bert, token_npz(root / "bert.npz", bert, labels=2)
    if name == "gpt2-dir":
        gpt2 = gpt2_dir(root / "gpt2")
        return gpt2, token_npz(root / "gpt2.npz", gpt2)
    model = user_zoo(name.split(".")[0])
    if not name.endswith(".pt2"):
        return model.onnx, model.data
    # torch.export names the input after forward's argument ('x'), the ONNX export 'input': a user
    # keys the data by the names their file has
    arrays = {key.replace("/input", "/x"): value for key, value in np.load(model.data, allow_pickle=False).items()}
    np.savez(root / "pt2-data.npz", **arrays)
    return model.pt2, root / "pt2-data.npz"


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory) -> Path:
    """One `compactai keygen` for the whole matrix (each model's bundle cell signs with it)."""
    key = tmp_path_factory.mktemp("matrix-key")
    result = run_cli("keygen", "-o", str(key), "--force")
    assert result.returncode == 0, result.stderr[-3000:]
    return key


def _cell(command: str, model: Path, data: Path, work: Path, key: Path) -> tuple[int, str]:
    """(exit code, the error line or "ok") of one command on one model."""
    out = work / command.replace(" ", "-").replace("+", "")
    if command == "profile":
        runs = [("profile", str(model), "--data", str(data), "--runtime", "onnxruntime", "--no-memory", *FAST)]
    elif command.startswith("quantize"):
        runs = [("quantize", str(model), "--data", str(data), "--mode", command.split()[1], "-o", str(out), *FAST)]
    elif command == "prune":
        runs = [("prune", str(model), "--data", str(data), "--ratio", "0.25", "--target", "channels",
                 "--finetune-epochs", "0", "--max-drop", "100", "--check-rounds", "0", "--round-to", "8",
                 "--runtime", "onnxruntime", "-o", str(out), *FAST)]
    else:
        runs = [("bundle", str(model), "-o", str(out), "-k", str(key / "bundle-signing.key"), "-v", "1",
                 "--data", str(data), "--drift-window", "32"),  # small data sets, as a user's may be
                ("verify", str(out), "-t", str(key / "bundle-signing.pub"))]
    for args in runs:
        result = run_cli(*args, timeout=900)
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        if result.returncode != 0:
            errors = [ln for ln in result.stderr.splitlines() if ln.lower().startswith("error")]
            assert len(errors) == 1, (args, result.returncode, result.stderr[-3000:])
            return result.returncode, errors[0]
    return 0, "ok"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet", "mobilenet.pt2", "tabular", "sensor", "bert-dir", "gpt2-dir"])
def test_zoo_model_through_every_command(user_zoo, signing_key, tmp_path_factory, name: str) -> None:
    root = tmp_path_factory.mktemp("matrix")
    model, data = _model(user_zoo, root, name)
    cells = {command: _cell(command, model, data, root, signing_key) for command in COMMANDS}
    wanted = {command: EXPECTED.get((name, command), 0) for command in COMMANDS}
    got = {command: code for command, (code, _) in cells.items()}
    target = os.environ.get("COMPACTAI_MATRIX_OUT")
    if target:  # a record for the docs, not a check
        path = Path(target)
        matrix = json.loads(path.read_text()) if path.exists() else {}
        matrix[name] = {c: {"exit": code, "line": line} for c, (code, line) in cells.items()}
        path.write_text(json.dumps(matrix, indent=1))
    assert 1 not in got.values(), cells
    assert got == wanted, cells
