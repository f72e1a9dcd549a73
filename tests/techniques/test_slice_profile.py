"""`compactai slice --profile-only` (run on the server) and `--server-profile` (on the device): the
tail latencies and the server's per-request overhead measured there drive the choice here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compactai.cli import main

pytestmark = pytest.mark.slow
FAST = ["--rounds", "1", "--max-cuts", "2"]


def _profile(small_onnx: Path, out: Path, capfd) -> dict:
    # no --server-overhead-ms: the overhead is measured with /infer of a one-element model on a real server
    assert main(["slice", str(small_onnx), "--profile-only", *FAST, "-o", str(out), "--json"]) == 0
    emitted = json.loads(capfd.readouterr().out)
    profile = json.loads((out / "profile.json").read_text())
    assert emitted["profile"] == str(out / "profile.json")
    return profile


def _place(small_onnx: Path, profile: Path, out: Path, capfd, *extra: str) -> dict:
    code = main(["slice", str(small_onnx), "--bandwidth-mbps", "1000", "--rtt-ms", "0.001", "--server-profile",
                 str(profile), *FAST, *extra, "-o", str(out), "--json"])
    assert code == 0
    return json.loads(capfd.readouterr().out)


def test_profile_only_writes_tail_timings_and_the_measured_server_overhead(small_onnx: Path, tmp_path: Path,
                                                                           capfd) -> None:
    profile = _profile(small_onnx, tmp_path / "server", capfd)
    kinds = [c["cut"]["kind"] for c in profile["cuts"]]
    assert kinds[0] == "all-remote" and kinds[-1] == "all-local" and "split" in kinds
    # every cut and wire compression has its tail timing, keyed as the device looks it up
    expected = {f"{c['cut']['kind']}|{'+'.join(c['cut']['tensors'])}|{mode}" for c in profile["cuts"]
                for mode in c["tail_ms"]}
    assert set(profile["tail_ms"]) == expected and len(expected) > 3
    assert all(value > 0 for key, value in profile["tail_ms"].items() if not key.startswith("all-local"))
    assert 0 < profile["server_overhead_ms"] < 1000


def test_server_profile_drives_the_choice_and_carries_the_overhead(small_onnx: Path, tmp_path: Path, capfd) -> None:
    measured = _profile(small_onnx, tmp_path / "server", capfd)
    keys = list(measured["tail_ms"])
    remote_key = next(k for k in keys if k.startswith("all-remote|"))
    # a server where only the all-remote tail is fast, on a 1000 Mbit/s link: sending the input wins
    fast_remote = {**measured, "tail_ms": {k: (0.001 if k == remote_key else 500.0) for k in keys},
                   "server_overhead_ms": 0.002}
    (tmp_path / "fast.json").write_text(json.dumps(fast_remote))
    result = _place(small_onnx, tmp_path / "fast.json", tmp_path / "a", capfd)
    assert result["assumptions"]["tail_latency"] == "server profile"
    assert result["assumptions"]["server_overhead_ms"] == 0.002
    assert result["choice"]["cut"]["kind"] == "all-remote"
    assert result["choice"]["tail_ms"] == 0.001 and result["choice"]["overhead_ms"] == 0.002
    row = result["cuts"][0]
    expected = row["head_ms"]["raw"] + row["request_bytes"]["raw"] * 8 / 1e9 * 1e3 + 0.001 + 0.002 + 0.001
    assert result["choice"]["end_to_end_ms"] == pytest.approx(expected)
    # the same network with every remote tail slow: the device keeps the model
    slow = {**fast_remote, "tail_ms": dict.fromkeys(keys, 500.0)}
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    assert _place(small_onnx, tmp_path / "slow.json", tmp_path / "b", capfd)["choice"]["cut"]["kind"] == "all-local"
    # an explicit --server-overhead-ms wins over the profile's: 3 ms per request and the tiny model stays here
    result = _place(small_onnx, tmp_path / "fast.json", tmp_path / "c", capfd, "--server-overhead-ms", "3")
    assert result["assumptions"]["server_overhead_ms"] == 3.0
    assert result["choice"]["cut"]["kind"] == "all-local" and result["choice"]["end_to_end_ms"] < 3.0


@pytest.mark.parametrize("args, message", [
    (["--server-profile", "nowhere.json"], "--server-profile nowhere.json does not exist"),
    (["--server-overhead-ms", "-1"], "--server-overhead-ms must be 0 or more"),
])
def test_bad_profile_arguments_exit_2(small_onnx: Path, tmp_path: Path, capsys, args: list[str], message: str) -> None:
    code = main(["slice", str(small_onnx), "--bandwidth-mbps", "10", "--rtt-ms", "5", *args, "-o",
                 str(tmp_path / "out")])
    assert code == 2
    assert message in " ".join(capsys.readouterr().err.split())
