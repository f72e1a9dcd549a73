"""`compactai keygen`, `bundle`, `verify` and `update`: signed bundles and secure over-the-air updates."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer

from compactai.cli._common import JSON_OPTION, Output, app, check_output_dir, fmt, table

MAX_EXPIRES_DAYS = 36_500  # a century; larger values overflow the date arithmetic
MAX_PROBATION_QUERIES = 10_000  # each query is a real inference on the device; more only delays the commit


def _check_number(flag: str, value: float, low: float, high: float, example: str, low_open: bool = False) -> None:
    """ParameterError unless ``value`` is a finite number in [low, high] (or (low, high])."""
    from compactai.errors import ParameterError

    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ParameterError(f"{flag} must be a finite number in {interval} ({example}); got {value:g}.")


def _trusted(paths: list[str]) -> list[Any]:
    from compactai.bundle import load_public_key
    from compactai.errors import BadInputError

    if not paths:
        raise BadInputError("Give at least one --trusted-key PUB (the .pub file from compactai keygen).")
    return [load_public_key(p) for p in paths]


def _refused(out: Output, data: dict[str, Any], reason: str, message: str) -> None:
    """Emit the JSON object, then raise: the CLI prints the one line and exits 1 (SecurityError)."""
    from compactai.bundle import BundleRefused

    out.emit({**data, "ok": False, "reason": reason, "message": message})
    raise BundleRefused(reason, f"refused ({reason}): {message}")


@app.command()
def keygen(
    out_dir: Path = typer.Option(..., "--out", "-o", help="Directory for bundle-signing.key (0600) and .pub."),
    force: bool = typer.Option(False, "--force", help="Replace an existing key pair in OUT."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Create an Ed25519 signing key pair: keep the .key secret, give the .pub to devices."""
    from compactai.bundle import generate_keypair, key_id, load_public_key

    out = Output(json_output)
    private, public = generate_keypair(out_dir, overwrite=force)
    kid = key_id(load_public_key(public))
    out.console.print(f"Signing key {kid}: private {private} (mode 0600, keep it secret), public {public}")
    out.emit({"key_id": kid, "private_key": private, "public_key": public})


@app.command("bundle")
def bundle_command(
    source: str = typer.Argument(..., help="An .onnx file or a compactai output directory (model.onnx + results.json)."),
    out_path: Path = typer.Option(..., "--out", "-o", help="Bundle to write: a directory, or a .tar/.tar.gz archive."),
    key: Path = typer.Option(..., "--key", "-k", help="Private signing key (from compactai keygen)."),
    version: int = typer.Option(..., "--version", "-v", help="Monotonic integer version (devices refuse older)."),
    semver: str | None = typer.Option(None, "--semver", help="Semantic version label (default 0.VERSION.0)."),
    name: str | None = typer.Option(None, "--name", help="Model name (default: from results.json or the file)."),
    expires_days: float = typer.Option(365.0, "--expires-days", help="Days until devices refuse this bundle."),
    golden: Path | None = typer.Option(None, "--golden-inputs", help=".npz of self-test inputs (default: "
                                          "synthesized from the model's signature)."),
    rtol: float = typer.Option(1e-3, "--rtol", help="Relative tolerance of the golden-output self-test."),
    atol: float = typer.Option(1e-4, "--atol", help="Absolute tolerance of the golden-output self-test."),
    data: Path | None = typer.Option(None, "--data", help="Drift reference: .npz with '<split>/<input>' arrays "
                                     "(calibration and validation splits; '<split>/labels' marks a classifier)."),
    example: str | None = typer.Option(None, "--example", "-e", help="Drift reference: a built-in example's data "
                                       "(default for an output directory made from an example)."),
    drift_kind: str = typer.Option("auto", "--drift-kind", help="auto, classifier, embedding or regression: "
                                   "which test watches the outputs (auto: labels -> classifier, else embedding)."),
    drift_window: int = typer.Option(200, "--drift-window", help="Samples per drift window."),
    drift_alpha: float = typer.Option(0.01, "--drift-alpha", help="False-alarm rate per window the drift "
                                      "thresholds are calibrated to."),
    no_drift: bool = typer.Option(False, "--no-drift", help="Bundle without a drift profile."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Package a model as a signed bundle: model, manifest (hashes, figures, recipe, golden I/O), drift
    profile, signature."""
    import tempfile

    from compactai.bundle import build_bundle, load_private_key
    from compactai.bundle.build import find_source
    from compactai.bundle.drift_profile import drift_profile_files
    from compactai.bundle.verify import load_arrays
    from compactai.errors import ParameterError
    from compactai.examples import load_example

    if drift_kind not in ("auto", "classifier", "embedding", "regression"):
        raise ParameterError(f"--drift-kind must be auto, classifier, embedding or regression. Got {drift_kind!r}.")
    out = Output(json_output)
    _check_number("--expires-days", expires_days, 0.0, MAX_EXPIRES_DAYS, "e.g. 365", low_open=True)
    _check_number("--rtol", rtol, 0.0, 1.0, "e.g. 1e-3")
    _check_number("--atol", atol, 0.0, 1e6, "e.g. 1e-4")
    check_output_dir(out_path)
    if out_path.exists():  # before the key is read: bundles are never overwritten
        from compactai.errors import BadInputError

        raise BadInputError(f"{out_path} already exists; bundles are never overwritten. Choose a new -o path.")
    golden_inputs = load_arrays(golden) if golden is not None else None
    with out.progress("Bundling") as say, tempfile.TemporaryDirectory(prefix="compactai-drift-") as drift_dir:
        files: dict[str, Path] = {}
        drift_note = "off (--no-drift)"
        if not no_drift:
            say("computing the drift reference profile")
            model, results = find_source(source)
            files, drift_note = drift_profile_files(
                model, results, drift_dir, data=data, example=example,
                kind=None if drift_kind == "auto" else drift_kind, window=drift_window, alpha=drift_alpha,
                example_loader=lambda name: load_example(
                    name, progress=lambda e, n, acc: say(f"training example {e}/{n}")))
        say("computing golden outputs and hashes")
        manifest = build_bundle(source, out_path, load_private_key(key), version, semver=semver, name=name,
                                expires_days=expires_days, golden_inputs=golden_inputs, rtol=rtol, atol=atol,
                                extra_files=dict(files))
    print_manifest(out, manifest, f"Signed bundle {out_path}")
    out.console.print(f"drift profile: {'from ' if files else ''}{drift_note}", highlight=False)
    out.emit({"bundle": out_path, "manifest": manifest, "drift_profile": sorted(files) or None, "drift": drift_note})


def print_manifest(out: Output, manifest: dict[str, Any], title: str) -> None:
    rows: list[list[Any]] = [
        ["name", manifest["name"]], ["version", f"{manifest['version']} ({manifest['semver']})"],
        ["created", manifest["created"]], ["expires", manifest["expires"]],
        ["signed by key", manifest.get("signed_by")],
        ["files", ", ".join(f"{f['path']} ({f['size']:,} B)" for f in manifest["files"])],
        ["recipe", " -> ".join(step["technique"] for step in manifest.get("recipe") or []) or "-"],
    ]
    quality = manifest.get("quality")
    if isinstance(quality, dict):
        value = f"{fmt(quality.get('value'), 4)} (baseline {fmt(quality.get('baseline'), 4)})"
        rows.append([f"quality ({quality.get('metric')})", value])
    elif quality is not None:
        rows.append(["quality", fmt(quality, 4)])
    baseline = manifest.get("baseline") or {}
    for runtime, figures in (manifest.get("measurements") or {}).items():
        # per-runtime baselines (quantize/prune/distill) or one flat baseline (optimize)
        base = baseline if "latency_p50_ms" in baseline else baseline.get(runtime) or {}
        p50, base_p50 = figures.get("latency_p50_ms"), base.get("latency_p50_ms")
        speedup = f", {base_p50 / p50:.2f}x vs baseline" if p50 and base_p50 else ""
        rows.append([f"{runtime} p50 / p90 (ms)", f"{fmt(p50)} / {fmt(figures.get('latency_p90_ms'))}{speedup}"])
        if figures.get("size_bytes") is not None:
            rows.append([f"{runtime} size (MB)", fmt(figures["size_bytes"] / 1e6)])
    out.console.print(table(title, ["field", "value"], rows))


@app.command()
def verify(
    bundle: Path = typer.Argument(..., help="Bundle directory or .tar archive."),
    trusted_key: list[str] = typer.Option([], "--trusted-key", "-t", help="Trusted public key (repeatable)."),
    min_version: int = typer.Option(0, "--newer-than", help="Also refuse versions <= this (rollback check)."),
    no_self_test: bool = typer.Option(False, "--no-self-test", help="Skip loading the model and the golden check."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Check a bundle: signature, expiry, version, paths, file set, hashes, external data, no pickle, self-test.
    Exit 0 if it passes, 1 with a one-line reason if refused."""
    import tempfile

    from compactai.bundle import BundleRefused, VerifyPolicy, verify_bundle

    out = Output(json_output)
    keys = _trusted(trusted_key)
    with tempfile.TemporaryDirectory(prefix="compactai-verify-") as work:
        try:
            verified = verify_bundle(bundle, VerifyPolicy(keys, highest_trusted=min_version),
                                     validate=not no_self_test, workdir=Path(work) / "bundle")
        except BundleRefused as refusal:
            _refused(out, {"bundle": bundle}, refusal.reason, str(refusal))
    manifest = verified.manifest
    out.console.print(f"[green]ok:[/green] {manifest['name']} v{manifest['version']} ({manifest['semver']}) "
                      f"signed by {verified.key_id}; passed {', '.join(verified.steps)}", highlight=False)
    out.emit({"bundle": bundle, "ok": True, "key_id": verified.key_id, "steps": verified.steps,
              "version": manifest["version"], "name": manifest["name"], "validation": verified.validation})


@app.command()
def update(
    source: str | None = typer.Option(None, "--source", "-s", help="Bundle directory, .tar, or http(s) URL "
                                         "of a served bundle directory. Omit to only recover and show status."),
    repo_url: str | None = typer.Option(None, "--repo-url", help="Fleet repository (TUF) URL serving metadata/ "
                                        "and targets/; needs --trusted-root. See docs/fleet.md."),
    trusted_root: Path | None = typer.Option(None, "--trusted-root", help="The repository's root.json given to "
                                             "this device when it was provisioned."),
    channel: str = typer.Option("stable", "--channel", help="Channel to follow in the fleet repository."),
    model: str | None = typer.Option(None, "--model", help="Model name in the fleet repository (default: the "
                                     "active version's name)."),
    install_dir: Path = typer.Option(..., "--install-dir", "-d", help="Where versions live (state.json, versions/)."),
    trusted_key: list[str] = typer.Option([], "--trusted-key", "-t", help="Trusted public key (repeatable)."),
    probation_queries: int = typer.Option(20, "--probation-queries", help="Synthesized requests in probation."),
    max_latency_ratio: float = typer.Option(5.0, "--max-latency-ratio", help="Roll back if the median latency in "
                                            "probation exceeds this multiple of the previous version's (0 = off)."),
    download_deadline: float = typer.Option(1800.0, "--download-deadline", help="Seconds the whole download from "
                                            "a URL may take (refused as slow-retrieval after)."),
    min_download_rate: float = typer.Option(1024.0, "--min-download-rate", help="Bytes/s a download from a URL "
                                            "must keep over each 30 s window (0 = no minimum)."),
    max_version_jump: int = typer.Option(2**32, "--max-version-jump", help="Refuse versions more than this above "
                                         "the highest trusted one (0 = only the 2^53-1 bound)."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Install a signed update atomically, watch it on probation, commit or roll back. Exit 1 if refused.

    From a fleet repository (--repo-url, --trusted-root) TUF first picks and checks the newest bundle."""
    from compactai.errors import BadInputError, ParameterError
    from compactai.runtime import (
        ProbationPolicy,
        UpdateAgent,
        UpdateLimits,
        fleet_status,
        update_from_repository,
    )

    out = Output(json_output)
    if source is not None and repo_url is not None:
        raise BadInputError("Give either --source (one bundle) or --repo-url (a fleet repository), not both.")
    if (repo_url is None) != (trusted_root is None):
        raise BadInputError("--repo-url and --trusted-root go together: the device trusts the repository through "
                            "the root.json it was given.")
    if max_version_jump < 0:
        raise ParameterError(f"--max-version-jump must be >= 0 (0 = no jump bound). Got {max_version_jump} instead.")
    if not 0 <= probation_queries <= MAX_PROBATION_QUERIES:
        raise ParameterError(f"--probation-queries must be from 0 to {MAX_PROBATION_QUERIES:,}; got {probation_queries}.")
    _check_number("--max-latency-ratio", max_latency_ratio, 0.0, 1e6, "e.g. 5, or 0 to turn the check off")
    policy = ProbationPolicy(queries=probation_queries, max_latency_ratio=max_latency_ratio or None)
    limits = UpdateLimits(download_deadline_s=download_deadline, min_download_rate=min_download_rate,
                          max_version_jump=max_version_jump or None).check()
    agent = UpdateAgent(install_dir, _trusted(trusted_key), probation=policy, limits=limits)
    data: dict[str, Any] = {}
    if source is not None or repo_url is not None:
        with out.progress("Updating") as say:
            say(f"fetching and verifying {source or repo_url}")
            if repo_url is not None and trusted_root is not None:
                result = update_from_repository(agent, repo_url, trusted_root, model=model, channel=channel)
            else:
                result = agent.update(str(source))
        data["result"] = result.to_dict()
    status = agent.status()
    data.update({"status": status, "counters": agent.counters()})
    if repo_url is not None or (install_dir / "fleet").is_dir():
        data["fleet"] = fleet_status(agent)
    rows = [[k, status.get(k)] for k in ("active", "active_semver", "previous", "highest_trusted")]
    rows.append(["blocked", ", ".join(f"{v}" for v in status["blocked"]) or "-"])
    out.console.print(table(f"Install directory {install_dir}", ["field", "value"], rows))
    fleet = data.get("fleet")
    if fleet is not None:
        out.console.print(f"fleet metadata: last refresh {fleet['last_refresh'] or 'never'}, timestamp expires "
                          f"{fleet['timestamp_expires'] or '-'}{' (EXPIRED)' if fleet['expired'] else ''}"
                          f"{', last attempt refused: ' + str(fleet['last_reason']) if fleet['last_reason'] else ''}",
                          highlight=False)
    if source is None and repo_url is None:
        out.emit({**data, "ok": True})
        return
    if result.status in ("refused", "rolled_back"):
        _refused(out, data, result.reason or result.status, result.message)
    out.console.print(f"[green]{result.status}:[/green] {result.message}", highlight=False)
    out.emit({**data, "ok": True})
