"""federate's settings, partitions, update compression and ONNX start, without Flower running:
bad input is one line and exit 2 before any model or Flower loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compactai.errors import BadInputError, ParameterError, UnknownNameError
from compactai.federated import FederatedConfig, partition_indices
from compactai.federated.local import decode_update, encode_update, payload_bytes


def run_cli(*args: str, prelude: str = "") -> subprocess.CompletedProcess:
    code = f"{prelude}from compactai.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          check=False)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.lower().startswith("error")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize(("args", "words"), [
    (["--clients", "0"], "--clients must be at least 2"),
    (["--clients", "1"], "--clients must be at least 2"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--fraction-fit", "0.05"], "selects no client"),
    (["--fraction-fit", "0"], "--fraction-fit must be in (0, 1]"),
    (["--fraction-evaluate", "1.5"], "--fraction-evaluate must be in (0, 1]"),
    (["--partition", "label-skew:0"], "alpha of --partition must be a number > 0"),
    (["--partition", "label-skew:-1"], "alpha of --partition must be a number > 0"),
    (["--partition", "shards"], "--partition must be 'iid' or 'label-skew:ALPHA'"),
    (["--strategy", "fedfoo"], "Unknown strategy 'fedfoo'"),
    (["--compress", "int3"], "Unknown --compress 'int3'"),
    (["--dp-clip", "1.0"], "needs both --dp-clip C and --dp-noise Z"),
    (["--dp-clip", "-1", "--dp-noise", "1"], "--dp-clip must be a positive"),
    (["--engine", "deployment"], "needs --superlink"),
    (["--engine", "cloud"], "Unknown --engine 'cloud'"),
    (["--engine", "deployment", "--superlink", "127.0.0.1:1", "model.onnx"], "deployment engine starts from --model"),
    (["--secagg"], "--secagg is not available"),
])
def test_bad_federate_input_is_one_line_exit_2(args: list[str], words: str, tmp_path: Path) -> None:
    result = run_cli("federate", "--example", "digits", "--clients", "10", *args, "-o", str(tmp_path / "out"))
    assert words in one_error_line(result)
    assert not (tmp_path / "out").exists()


def test_federate_without_flower_names_the_install_line(tmp_path: Path) -> None:
    # sys.modules[name] = None makes `import flwr` fail as if Flower were not installed
    result = run_cli("federate", "--example", "digits", "--clients", "3", "--rounds", "1", "-o", str(tmp_path / "o"),
                     prelude="import sys; sys.modules['flwr'] = None; ")
    line = one_error_line(result)
    assert "pip install -c constraints.txt 'compactai[federated]'" in line and "make install-federated" in line


def test_config_checks_raise_the_matching_error_types() -> None:
    with pytest.raises(UnknownNameError):
        FederatedConfig(strategy="krum2").validate()
    with pytest.raises(ParameterError):
        FederatedConfig(clients=4, fraction_fit=0.2).validate()  # int(0.2 * 4) = 0 clients
    assert FederatedConfig(clients=5, fraction_fit=0.2).validate().alpha() == 0.3
    assert FederatedConfig(partition="iid").validate().alpha() is None


def test_dirichlet_partition_is_skewed_complete_and_seeded() -> None:
    labels = np.repeat(np.arange(10), 120)
    skewed = partition_indices(labels, 10, alpha=0.3, seed=1)
    iid = partition_indices(labels, 10, alpha=None, seed=1)
    assert sorted(np.concatenate(skewed).tolist()) == list(range(len(labels)))  # every sample, once
    assert all(len(part) >= 10 for part in skewed)
    assert [p.tolist() for p in skewed] == [p.tolist() for p in partition_indices(labels, 10, alpha=0.3, seed=1)]

    def top_class_share(parts: list[np.ndarray]) -> float:
        return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))

    # label skew: a client's most common class dominates; IID: about a tenth each
    assert top_class_share(skewed) > 0.4 > 0.2 > top_class_share(iid)


def test_partition_refuses_too_many_clients() -> None:
    with pytest.raises(ParameterError, match="too few"):
        partition_indices(np.zeros(50, dtype=np.int64), 10, alpha=0.3, seed=0)


@pytest.mark.parametrize(("mode", "tolerance", "max_ratio"), [("none", 0.0, 1.01), ("fp16", 1e-3, 0.51),
                                                               ("int8", 0.02, 0.26)])
def test_update_compression_round_trip_and_size(mode: str, tolerance: float, max_ratio: float) -> None:
    rng = np.random.default_rng(0)
    start = {"w": rng.standard_normal((64, 32)).astype(np.float32), "b": rng.standard_normal(32).astype(np.float32)}
    new = {k: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()}
    packed = encode_update(new, start, mode)
    decoded = decode_update(packed, start, mode)
    for name in start:
        assert np.abs(decoded[name] - new[name]).max() <= tolerance + 1e-7
    assert payload_bytes(packed) <= max_ratio * payload_bytes(new)


def test_onnx_start_matches_onnx_runtime_and_trains(tmp_path: Path) -> None:
    import onnxruntime as ort
    import torch

    from compactai.federated.onnx_module import onnx_to_torch
    from compactai.models.load import load_model
    from compactai.models.zoo import digits_resnet

    torch.manual_seed(0)
    handle = load_model(digits_resnet((4, 8, 8)), {"image": torch.zeros(1, 1, 32, 32)}, output_names=["logits"])
    path = tmp_path / "model.onnx"
    handle.to_onnx(path)  # what prune/distill write: BatchNorm folded into Conv
    module = onnx_to_torch(path)
    x = np.random.default_rng(0).standard_normal((3, 1, 32, 32)).astype(np.float32)
    expected = ort.InferenceSession(str(path)).run(None, {"image": x})[0]
    assert np.abs(module(torch.from_numpy(x)).detach().numpy() - expected).max() < 1e-4
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) > 100
    loss = module(torch.from_numpy(x)).sum()
    loss.backward()
    assert all(p.grad is not None for p in trainable)


def test_quantized_onnx_start_is_refused(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from compactai.federated.onnx_module import onnx_to_torch

    scale = numpy_helper.from_array(np.array(0.1, dtype=np.float32), "scale")
    node = helper.make_node("QuantizeLinear", ["x", "scale"], ["y"])
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 4])], [scale])
    onnx.save(helper.make_model(graph), tmp_path / "q.onnx")
    with pytest.raises(BadInputError, match="quantize the federated output instead"):
        onnx_to_torch(tmp_path / "q.onnx")
