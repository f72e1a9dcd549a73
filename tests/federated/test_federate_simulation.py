"""`compactai federate` on Flower's simulation engine, end to end: the global model improves, the
output directory has the per-round record, and it goes through `quantize`, `bundle` and `verify`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="needs Flower: make install-federated, then run these tests with build/fed-venv/bin/python (make test does)")

pytestmark = pytest.mark.slow


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from compactai.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def federate(out: Path, *args: str) -> dict:
    done = run_cli("federate", "--example", "digits", "--clients", "3", "--rounds", "3", "--json", "-o", str(out),
                   *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def fedavg_output(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("fed") / "fedavg"
    return out, federate(out, "--model", "mlp:16", "--partition", "label-skew:0.5")


def test_fedavg_improves_and_records_every_round(fedavg_output: tuple[Path, dict]) -> None:
    out, summary = fedavg_output
    results = json.loads((out / "results.json").read_text())
    section = results["federated"]
    assert results["command"] == "federate" and results["recipe"][0]["technique"] == "federate"
    assert section["config"]["strategy"] == "fedavg" and section["privacy"]["differential_privacy"] is False
    rounds = section["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert all(r["centralised"]["accuracy"] is not None for r in rounds)
    assert all(r["federated"]["accuracy"] is not None and r["bytes_up"] > 0 and r["clients_trained"] == 3
               for r in rounds[1:])
    # the global model learned: better than the starting model on the validation and the test split
    assert rounds[-1]["centralised"]["accuracy"] > rounds[0]["centralised"]["accuracy"] + 0.2
    assert summary["test_accuracy"] > summary["round0_test_accuracy"] + 0.2
    assert results["quality"]["value"] == summary["test_accuracy"]
    assert len(section["clients"]) == 3 and all(c["accuracy"] is not None for c in section["clients"])
    assert section["clients_alone"]["mean_accuracy"] is not None
    page = (out / "report.html").read_text()
    assert 'id="rounds-plot"' in page and "<svg" in page and 'id="clients"' in page


def test_federated_output_goes_through_quantize_bundle_and_verify(fedavg_output: tuple[Path, dict],
                                                                  tmp_path: Path) -> None:
    out, _ = fedavg_output
    quantized = run_cli("quantize", str(out / "model.onnx"), "--mode", "dynamic", "--queries", "20",
                        "-o", str(tmp_path / "q"), "--json")
    assert quantized.returncode == 0, quantized.stderr[-2000:]
    keys = run_cli("keygen", "-o", str(tmp_path / "keys"), "--json")
    assert keys.returncode == 0, keys.stderr[-2000:]
    made = run_cli("bundle", str(out), "-o", str(tmp_path / "bundle"), "--key",
                   str(tmp_path / "keys" / "bundle-signing.key"), "--version", "1", "--json")
    assert made.returncode == 0, made.stderr[-2000:]
    assert json.loads(made.stdout)["manifest"]["recipe"][0]["technique"] == "federate"
    checked = run_cli("verify", str(tmp_path / "bundle"), "--trusted-key",
                      str(tmp_path / "keys" / "bundle-signing.pub"), "--json")
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert json.loads(checked.stdout)["ok"] is True


def test_compressed_private_fedprox_from_an_onnx_output(tmp_path: Path) -> None:
    """Start from an output directory (model.onnx + results.json as distill writes them for its MLP
    student), FedProx with int8 update compression and client-side DP: fewer bytes up, privacy
    settings recorded, and the model still improves."""
    import torch

    from compactai.models.load import load_model
    from compactai.results import save_model, write_results
    from compactai.techniques.distill.students import MLPStudent

    torch.manual_seed(0)
    start = load_model(MLPStudent(32 * 32, [16], 10), {"image": torch.zeros(1, 1, 32, 32)}, name="student",
                       output_names=["logits"])
    save_model(start, tmp_path / "distilled")
    write_results(tmp_path / "distilled", "distill", start)
    summary = federate(tmp_path / "out", str(tmp_path / "distilled"), "--strategy", "fedprox", "--compress", "int8",
                       "--dp-clip", "10", "--dp-noise", "0.01", "--dp-side", "client", "--no-alone")
    section = json.loads((tmp_path / "out" / "results.json").read_text())["federated"]
    assert section["config"]["strategy"] == "fedprox" and section["config"]["compression"] == "int8"
    assert section["privacy"] == {"differential_privacy": True, "clipping": "fixed", "side": "client",
                                  "clipping_norm": 10.0, "noise_multiplier": 0.01, "secure_aggregation": False}
    assert section["clients_alone"] is None
    # int8 deltas: a quarter of the float32 data the server sent each client, plus per-array headers and scales
    for entry in section["rounds"][1:]:
        per_client_down = entry["bytes_down"] / (2 * entry["clients_trained"])  # train + evaluate messages
        assert entry["bytes_up"] / entry["clients_trained"] < 0.5 * per_client_down
    assert summary["test_accuracy"] > summary["round0_test_accuracy"]
