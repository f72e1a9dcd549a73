"""Canary: hostile files in every model format the loaders accept never run code.

Each payload writes a marker file when unpickled or evaluated; the loaders must refuse the file
(UnsafeFormatError, or exit 2 from the CLI) and the marker must never appear. The liveness tests
show each hostile file really runs its payload in plain torch / pickle, so a passing canary means
compactai stopped it.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import compactai
from compactai import load_model
from compactai.errors import UnsafeFormatError

ROOT = Path(compactai.__file__).resolve().parents[1]  # the checkout under test, for the CLI subprocesses


class Payload:
    """Unpickling this writes ``marker``: proof that something ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def payload(marker: Path, protocol: int = 2) -> bytes:
    return pickle.dumps(Payload(marker), protocol=protocol)


def code(marker: Path) -> str:
    """A Python expression that writes the marker (for strings torch eval-s or exec-s)."""
    return f"__import__('pathlib').Path('{marker}').write_text('pwned')"


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + torch.tensor([1.0, 2.0, 3.0])


@pytest.fixture(scope="module")
def clean_pt2(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "clean.pt2"
    batch = torch.export.Dim("batch")
    program = torch.export.export(Net(), (torch.randn(2, 4),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


def rewrite(src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None] = lambda r, d: d,
            add: dict[str, bytes] | None = None) -> Path:
    """Copy a .pt2 member by member; ``edit(record, data)`` may change or (None) drop one; ``add`` adds records."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            data = edit(info.filename.split("/", 1)[1], zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)
        for record, data in (add or {}).items():
            zout.writestr(f"{root}/{record}", data)
    return dst


def edit_json(record: str, change: Callable[[dict], None]) -> Callable[[str, bytes], bytes]:
    def edit(name: str, data: bytes) -> bytes:
        if name != record:
            return data
        document = json.loads(data)
        change(document)
        return json.dumps(document).encode()

    return edit


def _entry(path_name: str, use_pickle: bool = True) -> dict:
    return {"path_name": path_name, "is_param": False, "use_pickle": use_pickle, "tensor_meta": None}


CONSTANTS = "data/constants/model_constants_config.json"
WEIGHTS = "data/weights/model_weights_config.json"


def _replace_expr(document: dict, marker: Path) -> None:
    text = json.dumps(document).replace("Symbol(", f"{code(marker)} or Symbol(", 1)
    document.clear()
    document.update(json.loads(text))


def hostile_pt2(kind: str, clean: Path, tmp_path: Path, marker: Path) -> Path:
    dst = tmp_path / f"{kind}.pt2"
    if kind == "opaque_obj":  # the attack of issue 13: pickle.loads on a constants entry
        return rewrite(clean, dst, edit_json(CONSTANTS, lambda d: d["config"].update(evil=_entry("opaque_obj_0"))),
                       {"data/constants/opaque_obj_0": payload(marker)})
    if kind == "custom_obj":  # TorchScript's unpickler
        return rewrite(clean, dst, edit_json(CONSTANTS, lambda d: d["config"].update(evil=_entry("custom_obj_0"))),
                       {"data/constants/custom_obj_0": payload(marker)})
    if kind == "pickled_constant":  # use_pickle: torch.load(weights_only=False)
        return rewrite(clean, dst, edit_json(CONSTANTS, lambda d: d["config"].update(evil=_entry("tensor_9"))),
                       {"data/constants/tensor_9": payload(marker)})
    if kind == "pickled_weight":
        def pickle_weight(document: dict) -> None:
            document["config"]["linear.bias"]["use_pickle"] = True

        return rewrite(clean, dst, lambda r, d: payload(marker) if r == "data/weights/weight_1"
                       else edit_json(WEIGHTS, pickle_weight)(r, d))
    if kind == "legacy_constants":  # preferred over the config when present; unpickled
        return rewrite(clean, dst, add={"data/constants/model.pt": payload(marker)})
    if kind == "aotinductor":  # a compiled shared library torch would dlopen
        return rewrite(clean, dst, add={"data/aotinductor/model/model.so": b"\x7fELF not really"})
    if kind == "guards_code":  # exec-ed by ExportedProgram.module()
        return rewrite(clean, dst, edit_json("models/model.json",
                                             lambda d: d.update(guards_code=[f"{code(marker)} is None"])))
    if kind == "shape_expr":  # sympy.sympify eval-s it while loading
        return rewrite(clean, dst, edit_json("models/model.json", lambda d: _replace_expr(d, marker)))
    if kind == "pkl_member":
        return rewrite(clean, dst, add={"extra/state.pkl": payload(marker)})
    if kind == "torch_save_zip":  # a torch.save checkpoint renamed .pt2
        torch.save({"x": Payload(marker)}, dst)
        return dst
    raise AssertionError(kind)


PT2_KINDS = ["opaque_obj", "custom_obj", "pickled_constant", "pickled_weight", "legacy_constants", "aotinductor",
             "guards_code", "shape_expr", "pkl_member", "torch_save_zip"]
LIVE_IN_TORCH = ["opaque_obj", "pickled_constant", "pickled_weight", "legacy_constants", "guards_code", "shape_expr"]


@pytest.mark.parametrize("kind", PT2_KINDS)
def test_hostile_pt2_is_refused_before_torch_reads_it(kind, clean_pt2, tmp_path):
    marker = tmp_path / "marker"
    path = hostile_pt2(kind, clean_pt2, tmp_path, marker)
    with pytest.raises(UnsafeFormatError, match=r"Refusing to load .*(pickle|code|exec|eval)"):
        load_model(path)
    assert not marker.exists()


def test_hostile_pt2_files_are_live_in_plain_torch(clean_pt2, tmp_path):
    """Control: torch.export.load (torch.load left as torch ships it) runs each payload. One subprocess."""
    paths = [hostile_pt2(kind, clean_pt2, tmp_path, tmp_path / f"marker-{kind}") for kind in LIVE_IN_TORCH]
    script = (
        "import sys, torch\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        torch.export.load(path).module()(torch.randn(2, 4))\n"
        "    except Exception:\n"
        "        pass\n"
    )
    subprocess.run([sys.executable, "-c", script, *map(str, paths)], capture_output=True, timeout=600, check=False)
    assert [kind for kind in LIVE_IN_TORCH if not (tmp_path / f"marker-{kind}").exists()] == []


def test_clean_pt2_still_loads(clean_pt2):
    handle = load_model(clean_pt2)
    assert handle.input_names == ["x"]
    assert handle.run_torch({"x": np.ones((3, 4), np.float32)})[0].shape == (3, 3)


def test_pt2_with_real_guards_loads(tmp_path):
    class Pair(torch.nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x.sum(1) + y[: x.shape[0]].sum()

    dims = ({0: torch.export.Dim("b", min=3, max=100)}, {0: torch.export.Dim("c", min=3)})
    program = torch.export.export(Pair(), (torch.randn(5, 4), torch.randn(8)), dynamic_shapes=dims)
    assert program._guards_code  # a shape guard, which compactai must accept
    torch.export.save(program, str(tmp_path / "pair.pt2"))
    assert load_model(tmp_path / "pair.pt2").input_names == ["x", "y"]


SYMBOL = "Symbol('s77', positive=True, integer=True)"


@pytest.mark.parametrize(("expression", "guard", "safe"), [
    (f"Mul(Integer(16), {SYMBOL})", "L['x'].size()[0] <= L['y'].size()[0]", True),
    (f"Pow({SYMBOL}, Integer(2))", "L['x'].size()[1] == 4 and L['x'].stride()[0] >= 1", True),
    ("exec(chr(49))", "True", False),
    (f"{SYMBOL}.__class__", "True", False),
    ("Symbol(\"s'),__import__('os')\")", "True", False),
    ("(lambda: 1)()", "True", False),
    (SYMBOL, "L['x'].__class__", False),
    (SYMBOL, "L['x'].size()[0] == 3) or (1", False),
    (SYMBOL, "L['x\\\"'] == 1", False),
    (SYMBOL, "open('f')", False),
])
def test_only_plain_shape_strings_reach_sympify_and_exec(clean_pt2, tmp_path, expression, guard, safe):
    from compactai.models.pt2_archive import check_pt2_archive

    def change(document: dict) -> None:
        text = json.dumps(document)
        assert json.dumps(SYMBOL) in text  # the batch symbol torch 2.13 writes for this model
        text = text.replace(json.dumps(SYMBOL), json.dumps(expression))
        document.clear()
        document.update(json.loads(text), guards_code=[guard])

    path = rewrite(clean_pt2, tmp_path / "m.pt2", edit_json("models/model.json", change))
    if safe:
        check_pt2_archive(path)
    else:
        with pytest.raises(UnsafeFormatError, match=r"(eval|exec)-ed"):
            check_pt2_archive(path)


@pytest.mark.parametrize("protocol", [0, 2])
@pytest.mark.parametrize("suffix", [".onnx", ".pt2", ".bin", ".safetensors", ".npz"])
def test_renamed_pickles_are_refused(protocol, suffix, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(payload(marker, protocol))
    with pytest.raises(UnsafeFormatError, match="pickle"):
        load_model(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the payload is live
    assert marker.exists()


def test_hand_written_protocol_0_pickles_are_refused(tmp_path):
    for i, stream in enumerate([b"cposix\nsystem\n(S'true'\ntR.", b"c__builtin__\neval\n(V1+1\ntR."]):
        path = tmp_path / f"m{i}.onnx"
        path.write_bytes(stream)
        with pytest.raises(UnsafeFormatError, match="pickle stream"):
            load_model(path)


def test_object_arrays_are_refused(tmp_path):
    marker = tmp_path / "marker"
    np.savez(tmp_path / "weights.npz", w=np.zeros(3), evil=np.array([Payload(marker)], dtype=object))
    np.save(tmp_path / "weights.npy", np.array([Payload(marker)], dtype=object))
    for name in ("weights.npz", "weights.npy"):
        with pytest.raises(UnsafeFormatError, match="object-dtype"):
            load_model(tmp_path / name)
    assert not marker.exists()


def test_hf_directory_with_pickled_bin_is_refused(tmp_path):
    marker = tmp_path / "marker"
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "pytorch_model.bin").write_bytes(payload(marker, 0))
    with pytest.raises(UnsafeFormatError, match="pickle"):
        load_model(tmp_path)
    assert not marker.exists()


@pytest.mark.slow
def test_hf_directory_ignores_pickled_bin_next_to_safetensors(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    marker = tmp_path / "marker"
    model_dir = tmp_path / "hf"
    config = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=64)
    BertModel(config).save_pretrained(model_dir, safe_serialization=True)
    vocab = model_dir / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "small", "sentence"]))
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(model_dir)
    (model_dir / "pytorch_model.bin").write_bytes(payload(marker))
    handle = load_model(model_dir)
    assert handle.input_names == ["input_ids", "attention_mask"]
    assert not marker.exists()


# The CLI: every command that loads a model refuses hostile files before heavy work (exit 2).

def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "compactai.cli", *args], capture_output=True, text=True,
                          timeout=600, check=False, env=env, cwd=cwd)


@pytest.mark.slow
def test_cli_commands_refuse_hostile_models(clean_pt2, tmp_path):
    from compactai.bundle import generate_keypair

    private, _ = generate_keypair(tmp_path / "keys")
    marker = tmp_path / "marker"
    pt2 = hostile_pt2("opaque_obj", clean_pt2, tmp_path, marker)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(payload(marker, 0))
    out = str(tmp_path / "out")
    commands = []
    for model in (pt2, onnx):
        commands += [["profile", str(model)], ["quantize", str(model), "-o", out], ["prune", str(model), "-o", out],
                     ["optimize", str(model), "-o", out]]
    commands += [["distill", "--teacher", str(pt2), "--example", "digits", "-o", out],
                 ["distill", "--student", str(pt2), "--example", "digits", "-o", out],
                 ["bundle", str(onnx), "-o", out, "-k", str(private), "-v", "1"]]
    for command in commands:
        result = run_cli(*command, cwd=tmp_path)
        assert result.returncode == 2, (command, result.stderr[-2000:])
        assert "pickle" in result.stderr or "run code" in result.stderr, (command, result.stderr[-2000:])
        assert not marker.exists(), command
