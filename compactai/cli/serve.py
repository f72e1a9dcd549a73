"""`compactai serve`: run a model, bundle or install directory as a KServe v2 inference server."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from compactai.cli._common import app


@app.command()
def serve(
    source: Path = typer.Argument(..., help="Install directory (compactai update), bundle directory or .tar, "
                                            "or an .onnx file."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 exposes the server to the "
                                                          "network: pair it with --token-file)."),
    port: int = typer.Option(8000, "--port", "-p", help="Port (0 picks a free one; see the start log line)."),
    threads: int | None = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads per session "
                                                               "(default: the CPUs of this process)."),
    workers: int | None = typer.Option(None, "--workers", help="Inference threads: concurrent ONNX Runtime calls "
                                                               "(default: the CPUs of this process // --threads)."),
    name: str | None = typer.Option(None, "--name", help="Model name on the wire (default: the bundle's)."),
    trusted_key: list[str] = typer.Option([], "--trusted-key", "-t", help="Public key that signs bundles and "
                                                                          "updates (repeatable)."),
    token_file: Path | None = typer.Option(None, "--token-file", help="File holding the bearer token required by "
                                                                      "inference and repository routes."),
    max_body_mb: float = typer.Option(16.0, "--max-body-mb", help="Largest request body accepted (MiB)."),
    max_batch: int = typer.Option(1, "--max-batch", help="Micro-batching: stack up to this many rows per ONNX "
                                                         "Runtime call (1 = off)."),
    max_delay_ms: float = typer.Option(2.0, "--max-delay-ms", help="Micro-batching: longest a request waits for "
                                                                   "its batch."),
    fallback_url: str | None = typer.Option(None, "--fallback-url", help="A bigger server of the same protocol "
                                                                         "for hard or late requests."),
    fallback_model: str | None = typer.Option(None, "--fallback-model", help="Model name on the fallback server "
                                                                             "(default: the same name)."),
    fallback_token_file: Path | None = typer.Option(None, "--fallback-token-file", help="Bearer token for the "
                                                                                       "fallback server."),
    min_confidence: float | None = typer.Option(None, "--min-confidence", help="Forward when the max softmax "
                                                                               "of the first output is below this."),
    max_queue_ms: float | None = typer.Option(None, "--max-queue-ms", help="Forward when the local queue would "
                                                                           "make a request wait longer."),
    fallback_rule: str | None = typer.Option(None, "--fallback-rule", help="Your rule, package.module:function "
                                                                           "(inputs, outputs) -> bool."),
    fallback_timeout_ms: float = typer.Option(1000.0, "--fallback-timeout-ms", help="Deadline of a forwarded "
                                                                                    "request."),
    update_source: str | None = typer.Option(None, "--update-source", help="Bundle directory, .tar or URL polled "
                                                                           "for signed updates (SOURCE must be an "
                                                                           "install directory)."),
    repo_url: str | None = typer.Option(None, "--repo-url", help="A TUF fleet repository (compactai repo) polled "
                                        "for updates instead of --update-source (SOURCE must be an install "
                                        "directory)."),
    trusted_root: str | None = typer.Option(None, "--trusted-root", help="The repository's root.json this "
                                            "server trusts (with --repo-url)."),
    channel: str = typer.Option("stable", "--channel", help="Repository channel to follow (with --repo-url)."),
    repo_model: str | None = typer.Option(None, "--model", help="The model's name in the repository (default: "
                                          "the installed version's)."),
    poll_interval: float = typer.Option(30.0, "--poll-interval", help="Seconds between update polls."),
    probation_requests: int = typer.Option(20, "--probation-requests", help="Live requests that watch a new "
                                                                            "version before it is committed."),
    probation_seconds: float = typer.Option(60.0, "--probation-seconds", help="Longest a probation waits for "
                                                                              "traffic (then synthesized inputs)."),
    max_latency_ratio: float = typer.Option(5.0, "--max-latency-ratio", help="Roll back when a new version's "
                                                                             "median latency exceeds this multiple "
                                                                             "of the previous one's (0 = off)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object (the address and model) on "
                                                           "stdout once listening."),
) -> None:
    """Serve a model over the KServe v2 / Open Inference Protocol, with /metrics, drift, fallback and updates."""
    from compactai.bundle import load_public_key
    from compactai.errors import BadInputError
    from compactai.runtime import ProbationPolicy
    from compactai.runtime.server import BatchSettings, FallbackPolicy, ModelServer, ServeConfig
    from compactai.runtime.server.app import bind_socket, http_stack, make_uvicorn
    from compactai.runtime.server.fallback import load_rule

    token = _read_token(token_file) if token_file is not None else None
    fallback = None
    if fallback_url is not None:
        fallback = FallbackPolicy(fallback_url, min_confidence, max_queue_ms, fallback_timeout_ms / 1e3,
                                  fallback_model, _read_token(fallback_token_file) if fallback_token_file else None,
                                  load_rule(fallback_rule) if fallback_rule else None)
    elif min_confidence is not None or max_queue_ms is not None or fallback_rule is not None:
        raise BadInputError("--min-confidence, --max-queue-ms and --fallback-rule need --fallback-url.")
    config = ServeConfig(
        host=host, port=port, threads=threads, workers=workers, name=name, token=token,
        max_body_bytes=int(max_body_mb * 1024 * 1024), batching=BatchSettings(max_batch, max_delay_ms),
        fallback=fallback, trusted_keys=[load_public_key(k) for k in trusted_key],
        update_source=update_source, repo_url=repo_url, trusted_root=trusted_root, channel=channel,
        repo_model=repo_model, poll_interval=poll_interval, probation_requests=probation_requests,
        probation_timeout=probation_seconds,
        probation=ProbationPolicy(max_latency_ratio=max_latency_ratio or None),
    )
    server = ModelServer(source, config)
    sock = bind_socket(host, port)
    bound = sock.getsockname()[1]
    slot = server.model.slot()
    start = server.log("start", url=f"http://{host}:{bound}", model=server.model.name,
                       version=slot.version if slot else None, source=str(source), kind=server.kind,
                       threads=server.threads, workers=server.workers, max_batch=max_batch, auth=token is not None,
                       fallback=fallback_url, update_source=update_source or repo_url, **http_stack())
    if json_output:
        out = sys.__stdout__ or sys.stdout
        out.write(json.dumps({**start, "port": bound}) + "\n")
        out.flush()
    make_uvicorn(server).run(sockets=[sock])


def _read_token(path: Path) -> str:
    from compactai.errors import BadInputError, ModelNotFoundError

    if not path.is_file():
        raise ModelNotFoundError(f"Token file not found: {path}.")
    token = path.read_text().strip()
    if len(token) < 16:
        raise BadInputError(f"The token in {path} is {len(token)} characters; use at least 16 random characters "
                            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))').")
    return token
