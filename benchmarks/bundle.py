"""Signed bundles and secure updates on the digits teacher (issue 7).

Measures what a device pays (build, verify, install with probation), shows every attack of the
threat model refused with version 1 left active, kills the agent at each activation step and
checks what is active after a restart, and measures the installed model with compactai.measure
against the model that went in. Run it under the benchmark lock:

    flock /tmp/compactai-bench.lock .venv/bin/python benchmarks/bundle.py

Prints tables and writes benchmarks/results/bundle.json.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from compactai import MeasureConfig, load_example, load_model, measure
from compactai.bundle import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    VerifyPolicy,
    build_bundle,
    canonical_bytes,
    generate_keypair,
    load_private_key,
    load_public_key,
    verify_bundle,
    write_signed_manifest,
)
from compactai.bundle.signing import sign
from compactai.results import save_model, write_results
from compactai.runtime import ACTIVATION_STEPS, ProbationPolicy, UpdateAgent
from compactai.runtime.state import CRASH_ENV

RESULTS = Path(__file__).parent / "results" / "bundle.json"
console = Console(width=120)


def timed(fn: Callable[[], Any], repeats: int = 3) -> tuple[float, Any]:
    """Median wall time in ms of ``fn`` over ``repeats`` runs (after one warm-up), and its last result."""
    fn()
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), result


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # unpickling would create the marker file
        return (open, (self.marker, "w"))


def main() -> None:
    load_start = os.getloadavg()  # recorded so the latency noise of a shared machine is visible
    work = Path(tempfile.mkdtemp(prefix="compactai-bench-bundle-"))
    config = MeasureConfig.quick()
    example = load_example("digits")
    source = work / "optimized"
    save_model(example.handle, source)  # ONNX export with a parity check
    model = load_model(source / "model.onnx", name="digits-resnet")
    figures = measure(model, example.task, config=config)
    write_results(source, "profile", model, baseline={"onnxruntime": figures}, measurements={"onnxruntime": figures},
                  quality=figures.quality)
    private, public = generate_keypair(work / "keys")
    key, trusted = load_private_key(private), load_public_key(public)
    attacker_key = load_private_key(generate_keypair(work / "attacker")[0])
    counter = iter(range(1000))

    def bundle(version: int, signer: Any = None, **kwargs: Any) -> Path:
        out = work / f"b{next(counter)}-v{version}"
        build_bundle(source, out, signer or key, version, **kwargs)
        return out

    # ---- cost of each stage -------------------------------------------------------------------------
    build_ms, _ = timed(lambda: bundle(1))
    v1 = bundle(1)
    manifest = json.loads((v1 / MANIFEST_FILE).read_text())
    verify_ms, verified = timed(lambda: verify_bundle(v1, VerifyPolicy([trusted])))
    metadata_ms, _ = timed(lambda: verify_bundle(v1, VerifyPolicy([trusted]), validate=False))
    install = work / "device"
    agent = UpdateAgent(install, [trusted], probation=ProbationPolicy(queries=20))
    start = time.perf_counter()
    first = agent.update(v1)
    install_ms = (time.perf_counter() - start) * 1e3
    assert first.status == "committed", first
    size = sum(f["size"] for f in manifest["files"])

    # ---- attacks: each refused, version 1 stays active ---------------------------------------------
    def flipped(b: Path) -> None:
        data = bytearray((b / "model.onnx").read_bytes())
        data[len(data) // 2] ^= 1
        (b / "model.onnx").write_bytes(bytes(data))

    def edited_manifest(b: Path) -> None:
        m = json.loads((b / MANIFEST_FILE).read_text())
        m["expires"] = "2099-01-01T00:00:00Z"
        (b / MANIFEST_FILE).write_bytes(canonical_bytes(m))

    def resigned(mutate: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
        def tamper(b: Path) -> None:
            m = json.loads((b / MANIFEST_FILE).read_text())
            mutate(m)
            raw = canonical_bytes(m)
            (b / MANIFEST_FILE).write_bytes(raw)
            (b / SIGNATURE_FILE).write_bytes(sign(key, raw))
        return tamper

    def symlinked(b: Path) -> None:
        os.replace(b / "golden_inputs.npz", work / "outside.npz")
        (b / "golden_inputs.npz").symlink_to(work / "outside.npz")

    marker = work / "PWNED"

    def pickled(b: Path) -> None:
        (b / "weights.bin").write_bytes(pickle.dumps(Payload(marker)))
        write_signed_manifest(b, json.loads((b / MANIFEST_FILE).read_text()), key)

    def golden_broken(b: Path) -> None:
        outputs = dict(np.load(b / "golden_outputs.npz", allow_pickle=False))
        np.savez(b / "golden_outputs.npz", **{k: v + 1.0 for k, v in outputs.items()})
        write_signed_manifest(b, json.loads((b / MANIFEST_FILE).read_text()), key)

    def archive_with_dotdot(b: Path) -> Path:
        out = work / f"evil{next(counter)}.tar"
        with tarfile.open(out, "w") as tar:
            for path in sorted(b.iterdir()):
                tar.add(path, arcname=path.name)
            tar.add(b / "model.onnx", arcname="../escaped.onnx")
        return out

    attacks: list[tuple[str, str, Callable[[], Path]]] = []

    def attack(name: str, reason: str, tamper: Callable[[Path], Any] | None = None, version: int = 2,
               **kwargs: Any) -> None:
        def make() -> Path:
            b = bundle(version, **kwargs)
            made = tamper(b) if tamper else None
            return made if isinstance(made, Path) else b
        attacks.append((name, reason, make))

    attack("flipped byte in model.onnx", "hash-mismatch", flipped)
    attack("missing signature", "missing-signature", lambda b: (b / SIGNATURE_FILE).unlink())
    attack("manifest edited after signing", "bad-signature", edited_manifest)
    attack("signed by an unknown key", "unknown-key", signer=attacker_key)
    attack("older version, validly signed", "rollback", version=1)
    attack("expired manifest (freeze)", "expired", now=time.time() - 10 * 86400, expires_days=1)
    attack("extra file", "extra-file", lambda b: (b / "notes.txt").write_text("x"))
    attack("missing file", "missing-file", lambda b: (b / "golden_outputs.npz").unlink())
    attack("'../' path in signed manifest", "unsafe-path",
           resigned(lambda m: m["files"].append({"path": "../x", "size": 1, "sha256": "0" * 64})))
    attack("'../' entry in tar archive", "unsafe-path", archive_with_dotdot)
    attack("symlink (hash matches)", "symlink", symlinked)
    attack("signed pickle file", "pickle", pickled)
    attack("signed, golden outputs wrong", "golden-mismatch", golden_broken)
    attack("same version after block-list", "blocked")
    rows = []
    for name, expected, make in attacks:
        source_bundle = make()
        start = time.perf_counter()
        result = agent.update(source_bundle)
        elapsed = (time.perf_counter() - start) * 1e3
        rows.append({"attack": name, "expected": expected, "reason": result.reason, "status": result.status,
                     "active_after": agent.state.active, "ms": elapsed,
                     "ok": result.status == "refused" and result.reason == expected and agent.state.active == 1})
    rows.append({"attack": "pickle payload ran", "expected": "no", "reason": "yes" if marker.exists() else "no",
                 "status": "-", "active_after": agent.state.active, "ms": 0.0, "ok": not marker.exists()})
    restarted = UpdateAgent(install, [trusted])
    again = restarted.update(bundle(1))
    rows.append({"attack": "older version after restart", "expected": "rollback", "reason": again.reason,
                 "status": again.status, "active_after": restarted.state.active, "ms": 0.0,
                 "ok": again.reason == "rollback" and restarted.state.active == 1})
    # ---- crash at each activation step --------------------------------------------------------------
    crash_rows = []
    for i, step in enumerate(ACTIVATION_STEPS):
        device = work / f"crash-{i}"
        UpdateAgent(device, [trusted], probation=ProbationPolicy(queries=2)).update(v1)
        v2 = bundle(2)
        process = subprocess.run(
            [sys.executable, "-c", "from compactai.cli import main; main()", "update", "--source", str(v2),
             "--install-dir", str(device), "--trusted-key", str(public), "--probation-queries", "2"],
            env={**os.environ, CRASH_ENV: step}, capture_output=True, text=True, check=False)
        after = UpdateAgent(device, [trusted])
        status = after.status()
        intact = after._installed_ok(status["active"])
        crash_rows.append({"step": step, "exit_code": process.returncode, "active_after_restart": status["active"],
                           "trial": status["trial"], "intact": intact,
                           "ok": process.returncode == 86 and intact and status["active"] in (1, 2)})

    # ---- the installed model, measured -------------------------------------------------------------
    installed = load_model(agent.active_dir() / "model.onnx", name="installed")
    installed_figures = measure(installed, example.task, config=config)
    carried = manifest["measurements"]["onnxruntime"]["latency_p50_ms"] == figures.latency_p50_ms

    report = {
        "model": "digits-resnet (ONNX)", "bundle_bytes": size, "files": len(manifest["files"]),
        "build_ms": build_ms, "verify_full_ms": verify_ms, "verify_no_self_test_ms": metadata_ms,
        "install_with_probation_ms": install_ms, "golden_max_abs_diff": verified.validation["max_abs_diff"],
        "manifest_carries_figures": carried, "attacks": rows, "crashes": crash_rows,
        "source_measurement": figures.to_dict(), "installed_measurement": installed_figures.to_dict(),
        "load_average_start": load_start, "load_average_end": os.getloadavg(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2, default=str))
    print_report(report)
    shutil.rmtree(work, ignore_errors=True)
    if not all(r["ok"] for r in rows + crash_rows):
        sys.exit(1)


def print_report(report: dict[str, Any]) -> None:
    stage = Table(title=f"Bundle stages on {report['model']} ({report['bundle_bytes'] / 1e6:.2f} MB, "
                        f"{report['files']} files)", title_justify="left")
    stage.add_column("stage")
    stage.add_column("median ms", justify="right")
    for label, key in [("build + sign (golden outputs, hashes)", "build_ms"),
                       ("verify, all checks + self-test", "verify_full_ms"),
                       ("verify, checks without self-test", "verify_no_self_test_ms"),
                       ("install v1 incl. 21-request probation (1 run)", "install_with_probation_ms")]:
        stage.add_row(label, f"{report[key]:.1f}")
    console.print(stage)
    attacks = Table(title="Attacks (version 1 active before each)", title_justify="left")
    for column in ("attack", "expected", "refused as", "status", "active after", "ok"):
        attacks.add_column(column)
    for row in report["attacks"]:
        attacks.add_row(row["attack"], row["expected"], str(row["reason"]), row["status"],
                        str(row["active_after"]), "yes" if row["ok"] else "NO")
    console.print(attacks)
    crashes = Table(title="Agent killed at each activation step, then restarted (old = 1, new = 2)",
                    title_justify="left")
    for column in ("step", "exit code", "active after restart", "files intact", "ok"):
        crashes.add_column(column)
    for row in report["crashes"]:
        crashes.add_row(row["step"], str(row["exit_code"]), str(row["active_after_restart"]),
                        "yes" if row["intact"] else "NO", "yes" if row["ok"] else "NO")
    console.print(crashes)
    models = Table(title="Model before bundling vs installed from the bundle (compactai.measure, onnxruntime)",
                   title_justify="left")
    for column in ("model", "accuracy", "size MB", "p50 ms", "p90 ms"):
        models.add_column(column, justify="right")
    for label, key in [("source", "source_measurement"), ("installed", "installed_measurement")]:
        m = report[key]
        models.add_row(label, f"{m['quality']['value']:.4f}", f"{m['size_bytes'] / 1e6:.2f}",
                       f"{m['latency_p50_ms']:.3f}", f"{m['latency_p90_ms']:.3f}")
    console.print(models)
    console.print(f"manifest carries the measured figures of results.json: {report['manifest_carries_figures']}; "
                  f"golden max abs diff {report['golden_max_abs_diff']}")


if __name__ == "__main__":
    main()
