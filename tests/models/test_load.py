from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from compactai import load_model
from compactai.errors import (
    BadInputError,
    CorruptModelError,
    InputSignatureError,
    ModelNotFoundError,
    UnsafeFormatError,
    UnsupportedFormatError,
)


class _Payload:
    """Unpickling this writes a marker file: proof that the loader ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_module_loads_with_signature(small_handle):
    assert small_handle.framework == "torch"
    assert small_handle.input_names == ["image"]
    assert small_handle.inputs[0].shape == ("batch", 1, 16, 16)
    assert small_handle.outputs[0].shape == ("batch", 10)
    assert small_handle.kind == "cnn"
    out = small_handle.run_torch({"image": np.zeros((3, 1, 16, 16), np.float32)})
    assert out[0].shape == (3, 10)


def test_module_without_example_inputs_is_refused(small_cnn):
    with pytest.raises(BadInputError, match="example_inputs"):
        load_model(small_cnn)


def test_onnx_file_loads_and_runs(small_onnx):
    handle = load_model(small_onnx)
    assert handle.framework == "onnx"
    assert handle.inputs[0].shape[1:] == (1, 16, 16)
    assert isinstance(handle.inputs[0].shape[0], str)  # dynamic batch axis kept
    from compactai.measure import make_runner

    out = make_runner(handle).run({"image": np.zeros((2, 1, 16, 16), np.float32)})
    assert out[0].shape == (2, 10)


def test_corrupt_onnx_is_refused(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf model" * 3)
    with pytest.raises(CorruptModelError, match="not a valid ONNX model"):
        load_model(bad)


def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="Model not found"):
        load_model(tmp_path / "nope.onnx")


def test_unsupported_format(tmp_path):
    path = tmp_path / "model.tflite"
    path.write_bytes(b"TFL3")
    with pytest.raises(UnsupportedFormatError, match="Unsupported model format"):
        load_model(path)


def test_safetensors_alone_explains_what_to_do(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(UnsupportedFormatError, match="load_state_dict"):
        load_model(path)


@pytest.mark.parametrize("name", ["model.pt", "model.pkl", "pytorch_model.bin", "weights.dat"])
def test_pickle_files_are_refused_unopened(tmp_path, name):
    marker = tmp_path / "marker.txt"
    path = tmp_path / name
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafeFormatError, match="pickle"):
        load_model(path)
    assert not marker.exists()
    # the payload really is live: unpickling it would have written the marker
    pickle.loads(path.read_bytes())
    assert marker.exists()


def test_torch_save_zip_is_refused_unopened(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "checkpoint.bin"
    torch.save({"x": _Payload(marker)}, path)
    assert zipfile.is_zipfile(path)
    with pytest.raises(UnsafeFormatError):
        load_model(path)
    assert not marker.exists()


def test_hf_directory_with_only_pickled_weights_is_refused(tmp_path):
    marker = tmp_path / "marker.txt"
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafeFormatError, match="safetensors"):
        load_model(tmp_path)
    assert not marker.exists()


def test_pt2_loads(tmp_path, small_cnn):
    example = torch.randn(1, 1, 16, 16)
    program = torch.export.export(small_cnn, (example,))
    path = tmp_path / "model.pt2"
    torch.export.save(program, str(path))
    handle = load_model(path)
    assert handle.framework == "torch"
    with torch.inference_mode():
        expected = small_cnn(example).numpy()
    got = handle.run_torch({handle.input_names[0]: example.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_hf_directory_loads_offline():
    from compactai.examples.minilm import model_directory

    handle = load_model(model_directory())
    assert handle.kind == "transformer"
    assert handle.input_names == ["input_ids", "attention_mask"]
    assert handle.inputs[0].shape == ("batch", "sequence")
    out = handle.run_torch(handle.example_inputs)[0]
    assert out.shape[-1] == 384


@pytest.mark.parametrize(
    "feeds, message",
    [
        ({"image": np.zeros((1, 3, 16, 16), np.float32)}, "shape"),
        ({"image": np.zeros((1, 1, 16, 16), np.float64)}, "dtype"),
        ({"pixels": np.zeros((1, 1, 16, 16), np.float32)}, "Missing input"),
    ],
)
def test_wrong_inputs_get_a_clear_error(small_handle, feeds, message):
    with pytest.raises(InputSignatureError, match=message):
        small_handle.run_torch(feeds)
