"""The server's logic without HTTP: what to load, how one request is answered, start and stop.

:class:`ModelServer` loads the served source (install directory, bundle or .onnx), owns the
inference threads, the served model and its versions, the fallback client and the update
loop. :meth:`ModelServer.answer` is one inference request from parsed inputs to outputs;
``app.py`` puts the KServe v2 routes in front of it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compactai.errors import BadInputError
from compactai.measure.runtime import default_threads
from compactai.runtime import ProbationPolicy, UpdateAgent
from compactai.runtime.server.batching import Dispatcher, RunResult
from compactai.runtime.server.fallback import FallbackClient, FallbackPolicy, RemoteAnswer, wants_remote
from compactai.runtime.server.metrics import DriftCollector, EventLog, ServerMetrics
from compactai.runtime.server.models import (
    LoadedVersion,
    load_bundle,
    load_installed,
    load_onnx_file,
    source_kind,
)
from compactai.runtime.server.protocol import InferRequest, RequestError
from compactai.runtime.server.served import BatchSettings, Probation, ServedModel, VersionSlot, finite
from compactai.runtime.server.updates import UpdateLoop

MIB = 1024 * 1024


@dataclass
class ServeConfig:
    """Everything ``compactai serve`` can set; the defaults are the CLI's."""

    host: str = "127.0.0.1"
    port: int = 8000
    threads: int | None = None  # ONNX Runtime intra-op threads per session (default: the CPUs we may use)
    # inference threads (concurrent ONNX Runtime calls); default: CPUs // threads, so that the calls can
    # use every core (with --threads 1 on 2 cores, one thread left a core idle at concurrency 32)
    workers: int | None = None
    name: str | None = None
    token: str | None = None
    max_body_bytes: int = 16 * MIB
    batching: BatchSettings = field(default_factory=BatchSettings)
    fallback: FallbackPolicy | None = None
    trusted_keys: list[Any] = field(default_factory=list)
    update_source: str | None = None
    repo_url: str | None = None  # a TUF fleet repository (compactai repo), instead of update_source
    trusted_root: str | None = None  # the root.json the device trusts that repository through
    channel: str = "stable"
    repo_model: str | None = None  # the model's name in the repository (default: the installed one's)
    poll_interval: float = 30.0
    probation_requests: int = 20
    probation_timeout: float = 60.0
    probation: ProbationPolicy = field(default_factory=ProbationPolicy)

    @property
    def update_from(self) -> str | None:
        """Where updates come from (a bundle source or a fleet repository URL), if anywhere."""
        return self.update_source if self.update_source is not None else self.repo_url

    def fetch_update(self, agent: Any, *, watch: bool) -> Any:
        """One update attempt from the configured source: the agent's own fetch for a bundle source,
        TUF (python-tuf's ngclient) first for a fleet repository."""
        if self.repo_url is not None and self.trusted_root is not None:
            from compactai.runtime.fleet import update_from_repository

            return update_from_repository(agent, self.repo_url, self.trusted_root, model=self.repo_model,
                                          channel=self.channel, watch=watch)
        return agent.update(self.update_source, watch=watch)

    def validate(self) -> None:
        if self.update_source is not None and self.repo_url is not None:
            raise BadInputError("Give either --update-source (one bundle source) or --repo-url (a fleet "
                                "repository), not both.")
        if (self.repo_url is None) != (self.trusted_root is None):
            raise BadInputError("--repo-url and --trusted-root go together: the server trusts the repository "
                                "through the root.json it was given.")
        checks = [
            (self.workers is None or self.workers >= 1, f"--workers must be >= 1. Got {self.workers} instead."),
            (self.threads is None or self.threads >= 1, f"--threads must be >= 1. Got {self.threads} instead."),
            (self.max_body_bytes >= 1024, f"--max-body-mb must allow at least 1 KiB. Got {self.max_body_bytes} B."),
            (self.batching.max_batch >= 1, f"--max-batch must be >= 1. Got {self.batching.max_batch} instead."),
            (self.batching.max_delay_ms >= 0, f"--max-delay-ms must be >= 0. Got {self.batching.max_delay_ms}."),
            (self.poll_interval > 0, f"--poll-interval must be > 0 seconds. Got {self.poll_interval} instead."),
            (self.probation_requests >= 1, f"--probation-requests must be >= 1. Got {self.probation_requests}."),
            (0 <= self.port < 65536, f"--port must be in [0, 65535]. Got {self.port} instead."),
        ]
        for ok, message in checks:
            if not ok:
                raise BadInputError(message)
        if self.fallback is not None:
            self.fallback.validate()


class ModelServer:
    """One model served from ``source``: loading, answering, updating."""

    def __init__(self, source: str | Path, config: ServeConfig, log: EventLog | None = None) -> None:
        config.validate()
        self.config = config
        self.source = Path(source).expanduser()
        self.threads = config.threads or default_threads()
        self.log = log or EventLog()
        self.metrics = ServerMetrics()
        self.workers = config.workers or max(1, default_threads() // self.threads)
        self.dispatcher = Dispatcher(self.workers)
        self.agent: UpdateAgent | None = None
        self.kind = self._kind()
        if self.kind == "install":
            self.agent = UpdateAgent(self.source, list(config.trusted_keys), probation=config.probation)
            self.metrics.extra_registries.append(self.agent.events.registry)
        loaded = self.load_from_source()
        name = config.name or (loaded.name if loaded else self.source.name)
        self.model = ServedModel(name, self.dispatcher, config.batching, on_change=self._models_changed,
                                 on_drift_alarm=self._drift_alarm)
        if loaded is not None:
            self.model.install(loaded)
        self.metrics.registry.register(DriftCollector(self._drift_reports))
        self.fallback: FallbackClient | None = None  # made on the event loop (httpx.AsyncClient binds to it)
        self.updates: UpdateLoop | None = None
        if config.update_from is not None:
            assert self.agent is not None  # _kind() refused --update-source for anything but an install dir
            self.updates = UpdateLoop(self.agent, self.model, config.update_from, config.poll_interval,
                                      threads=self.threads, name=config.name, log=self.log, metrics=self.metrics,
                                      probation_requests=config.probation_requests,
                                      probation_timeout=config.probation_timeout,
                                      fetch=lambda agent: config.fetch_update(agent, watch=False),
                                      peek=config.repo_url is None)

    # ---- loading -----------------------------------------------------------------------------------------
    def _kind(self) -> str:
        if not self.source.exists() and self.config.update_from is not None:
            self.source.mkdir(parents=True)
        kind = source_kind(self.source)
        if self.config.update_from is not None and kind != "install":
            raise BadInputError(f"--update-source/--repo-url need an install directory as SOURCE (updates are installed "
                                f"there); {self.source} is a {kind}. Pass a new or existing directory.")
        if kind in ("install", "bundle", "archive") and not self.config.trusted_keys:
            raise BadInputError(f"{self.source} is a{'n install directory' if kind == 'install' else ' bundle'}: "
                                "give --trusted-key PUB so its signature can be verified (serve the .onnx "
                                "file itself to run a model without verification).")
        return kind

    def load_from_source(self) -> LoadedVersion | None:
        """The version the source holds now (verified), warmed up; None for an install dir with none yet."""
        loaded: LoadedVersion | None
        if self.kind == "install":
            assert self.agent is not None
            active = self.agent.active_dir()  # recovers first: an uncommitted trial is rolled back
            if active is None and self.config.update_from is not None:
                result = self.config.fetch_update(self.agent, watch=True)  # nothing served yet: watch it at once
                self.log("update", outcome=result.status, version=result.version, message=result.message)
                active = self.agent.active_dir()
            loaded = None if active is None else load_installed(active, self.threads, self.config.name)
        elif self.kind == "onnx":
            loaded = load_onnx_file(self.source, self.threads, self.config.name)
        else:
            loaded = load_bundle(self.source, list(self.config.trusted_keys), self.threads, self.config.name)
        if loaded is not None:
            loaded.warm_up()
            self.log("load", model=loaded.name, version=loaded.version, path=str(loaded.model_path),
                     size_bytes=loaded.size_bytes, threads=self.threads, batchable=loaded.batchable)
        return loaded

    def _models_changed(self) -> None:
        if hasattr(self, "model"):
            self.metrics.set_models(self.model.states())

    def _drift_alarm(self, model: str, version: str, alarm: bool, report: dict[str, Any]) -> None:
        self.log("drift_alarm", model=model, version=version, alarm=alarm, scores=report.get("scores"),
                 thresholds=report.get("thresholds"))

    def _drift_reports(self) -> list[tuple[str, str, dict[str, Any]]]:
        reports = []
        for version in list(self.model.versions):
            slot = self.model.slot(version)
            report = slot.drift.report() if slot is not None else None
            if report is not None:
                reports.append((self.model.name, version, report))
        return reports

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """On the event loop, before the first request."""
        if self.config.fallback is not None:
            self.fallback = FallbackClient(self.config.fallback)
        if self.updates is not None:
            self.updates.start()

    async def stop(self) -> None:
        if self.updates is not None:
            self.updates.stop()
        if self.fallback is not None:
            await self.fallback.close()
        self.dispatcher.shutdown()

    def model_for(self, name: str) -> ServedModel:
        if name != self.model.name:
            raise RequestError(404, f"Unknown model {name!r}; this server serves {self.model.name!r}.")
        return self.model

    # ---- one request -------------------------------------------------------------------------------------
    async def answer(self, model: ServedModel, slot: VersionSlot, probation: Probation | None,
                     request: InferRequest, output_names: list[str],
                     parameters: dict[str, Any]) -> tuple[str, str, dict[str, np.ndarray]]:
        """(model name, version, outputs by name) for a request validated against ``slot`` (where
        ``model.route`` sent it); fills ``parameters``."""
        client = self.fallback
        if (client is not None and client.policy.max_queue_ms is not None
                and self.dispatcher.estimated_wait_s() * 1e3 > client.policy.max_queue_ms):
            remote = await self._forward(model, request, output_names, "queue", parameters)
            if remote is not None:
                return remote
        result, used = await self._run_local(slot, probation, request.inputs)
        self._observe(model.name, used.version, result)
        parameters.setdefault("served_by", "local")
        if client is not None and "fallback" not in parameters:
            reason = wants_remote(client.policy, request.inputs, result.outputs)
            if reason is not None:
                remote = await self._forward(model, request, output_names, reason, parameters)
                if remote is not None:
                    return remote
        used.drift.observe(request.inputs, result.outputs)
        outputs = dict(zip(used.loaded.output_names, result.outputs))
        return used.loaded.name, used.version, {n: outputs[n] for n in output_names}

    async def _run_local(self, slot: VersionSlot, probation: Probation | None,
                         feeds: dict[str, np.ndarray]) -> tuple[RunResult, VersionSlot]:
        """Run on ``slot``; on probation a wrong answer (error, NaN) is recorded and the previous version answers."""
        try:
            result: RunResult | None = await slot.run(feeds)
            error: BaseException | None = None
        except Exception as exc:  # noqa: BLE001 (mapped below: probation record, 400 or 500)
            result, error = None, exc
        rows = int(next(iter(feeds.values())).shape[0]) if next(iter(feeds.values())).ndim else 1
        # amortized per-request compute time (a batch's time shared by its rows): the probation's latency
        # figure, compared with the same figure of the previous version on the same live traffic
        latency = None if result is None else result.compute_s * 1e3 * rows / max(1, result.batch_rows)
        if latency is not None and probation is None:
            slot.recent_ms.append(latency)
        if probation is not None:
            ok = result is not None and finite(result.outputs)
            probation.record(latency, result.outputs if result is not None else None, error)
            previous = probation.previous
            same_signature = previous is not None and (previous.loaded.inputs, previous.loaded.outputs) == (
                slot.loaded.inputs, slot.loaded.outputs)
            if not ok and previous is not None and same_signature:
                probation.answered_by_previous += 1
                self.metrics.probation_fallbacks.labels(self.model.name, slot.version).inc()
                return await self._run_local(previous, None, feeds)
        if result is None:
            assert error is not None
            if type(error).__name__ == "InvalidArgument":  # ONNX Runtime refusing these inputs: a client error
                raise RequestError(400, f"ONNX Runtime refused the inputs: {str(error).splitlines()[0][:300]}")
            raise error
        return result, slot

    def _observe(self, model: str, version: str, result: RunResult) -> None:
        metrics = self.metrics
        metrics.child(metrics.compute_seconds, model, version).observe(result.compute_s)
        metrics.child(metrics.queue_seconds, model).observe(result.queue_wait_s)
        metrics.child(metrics.batch_rows, model).observe(result.batch_rows)

    async def _forward(self, model: ServedModel, request: InferRequest, output_names: list[str], reason: str,
                       parameters: dict[str, Any]) -> tuple[str, str, dict[str, np.ndarray]] | None:
        assert self.fallback is not None
        start = time.perf_counter()
        answer = await self.fallback.forward(request.inputs, request.outputs, request.id, model.name)
        elapsed_ms = round((time.perf_counter() - start) * 1e3, 3)
        if isinstance(answer, RemoteAnswer):
            self.metrics.fallbacks.labels(model.name, reason, "remote").inc()
            self.log("fallback", model=model.name, reason=reason, result="remote", remote_model=answer.model_name,
                     remote_version=answer.model_version, ms=elapsed_ms)
            parameters.update({"served_by": "remote", "fallback": "remote", "fallback_reason": reason})
            missing = [n for n in output_names if n not in answer.outputs]
            if not missing:
                return answer.model_name, answer.model_version, {n: answer.outputs[n] for n in output_names}
            answer = f"bad-response: no output(s) {missing}"
        self.metrics.fallbacks.labels(model.name, reason, "failed").inc()
        self.log("fallback", model=model.name, reason=reason, result="failed", error=answer, ms=elapsed_ms)
        parameters.update({"served_by": "local", "fallback": "failed", "fallback_reason": reason,
                           "fallback_error": answer})
        return None
