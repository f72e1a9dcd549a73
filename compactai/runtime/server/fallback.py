"""Edge/cloud cascade: hand hard or late requests to a bigger server that speaks the same protocol.

Rules, checked in order: **queue** (the local queue would make the request wait longer than
``max_queue_ms``: forwarded before computing locally), then after the local answer
**confidence** (a classifier's max softmax below ``min_confidence``) and **rule** (a user's
``rule(inputs, outputs) -> bool``). A forwarded request has a hard deadline; if the remote fails
or misses it, the local answer is returned, marked ``parameters.fallback: "failed"`` (for the
queue rule the request is then computed locally).
"""

from __future__ import annotations

import asyncio
import importlib
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from compactai.errors import BadInputError
from compactai.runtime.server.protocol import HEADER_LENGTH, decode_response, encode_request

FallbackRule = Callable[[dict[str, np.ndarray], list[np.ndarray]], bool]


@dataclass
class FallbackPolicy:
    """Where to forward and when. ``model`` is the remote model name (default: the local one)."""

    url: str
    min_confidence: float | None = None
    max_queue_ms: float | None = None
    timeout_s: float = 1.0
    model: str | None = None
    token: str | None = None
    rule: FallbackRule | None = None

    def validate(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise BadInputError(f"--fallback-url must be an http(s) URL. Got {self.url!r} instead.")
        if self.min_confidence is not None and not 0 < self.min_confidence <= 1:
            raise BadInputError(f"--min-confidence must be in (0, 1]. Got {self.min_confidence} instead.")
        if self.max_queue_ms is not None and self.max_queue_ms < 0:
            raise BadInputError(f"--max-queue-ms must be >= 0. Got {self.max_queue_ms} instead.")
        if not self.timeout_s > 0:
            raise BadInputError(f"--fallback-timeout-ms must be > 0. Got {self.timeout_s * 1e3} instead.")


@dataclass
class RemoteAnswer:
    """What the remote server answered: its model name and version, and the outputs."""

    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray]


def load_rule(spec: str) -> FallbackRule:
    """The user's rule from ``package.module:function`` (their own code, imported like any module)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise BadInputError(f"--fallback-rule must look like package.module:function. Got {spec!r} instead.")
    try:
        rule = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise BadInputError(f"Cannot load --fallback-rule {spec!r} ({exc}); check it is importable "
                            "(PYTHONPATH).") from exc
    if not callable(rule):
        raise BadInputError(f"--fallback-rule {spec!r} is not a function.")
    return rule


def max_softmax(output: np.ndarray) -> np.ndarray | None:
    """Per-row confidence of a (batch, classes) float output: the output itself if it already holds
    probabilities, else the softmax of the logits. None if the output is not a classifier's."""
    if output.ndim != 2 or output.dtype.kind != "f" or output.shape[1] < 2:
        return None
    values = output.astype(np.float64)
    if np.all(values >= 0) and np.allclose(values.sum(axis=1), 1.0, atol=1e-3):
        return values.max(axis=1)
    shifted = np.exp(values - values.max(axis=1, keepdims=True))
    return (shifted.max(axis=1) / shifted.sum(axis=1)).astype(np.float64)


def wants_remote(policy: FallbackPolicy, inputs: dict[str, np.ndarray], outputs: list[np.ndarray]) -> str | None:
    """The reason to forward after the local answer ("confidence" or "rule"), or None to keep it."""
    if policy.min_confidence is not None and outputs:
        confidence = max_softmax(outputs[0])
        if confidence is not None and confidence.size and float(confidence.min()) < policy.min_confidence:
            return "confidence"
    if policy.rule is not None and policy.rule(inputs, outputs):
        return "rule"
    return None


class FallbackClient:
    """An httpx client that forwards one request and gives up at the deadline."""

    def __init__(self, policy: FallbackPolicy) -> None:
        import httpx

        policy.validate()
        self.policy = policy
        headers = {"authorization": f"Bearer {policy.token}"} if policy.token else {}
        # httpx's timeouts only back up the deadline (wait_for in forward), so they sit past it
        # TCP_NODELAY: httpx writes headers and body separately, and Nagle would hold the body
        # back until the remote's delayed ACK (about 40 ms on Linux)
        transport = httpx.AsyncHTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self.client = httpx.AsyncClient(timeout=2 * policy.timeout_s + 1.0, headers=headers, follow_redirects=False,
                                        transport=transport)

    def infer_url(self, local_name: str) -> str:
        base = self.policy.url.rstrip("/")
        if base.endswith("/infer"):
            return base
        return f"{base}/v2/models/{self.policy.model or local_name}/infer"

    async def forward(self, inputs: dict[str, np.ndarray], outputs: list[str] | None, request_id: str | None,
                      local_name: str) -> RemoteAnswer | str:
        """The remote's answer, or a short reason why there is none (timeout, error, http-NNN, bad-response)."""
        try:
            # wait_for is the deadline: httpx's own timeouts are per read, which a slow trickle escapes
            return await asyncio.wait_for(self._post(inputs, outputs, request_id, local_name), self.policy.timeout_s)
        except asyncio.TimeoutError:
            return "timeout"
        except Exception as exc:  # noqa: BLE001 (any remote failure means: answer locally, marked)
            return f"error: {type(exc).__name__}"

    async def _post(self, inputs: dict[str, np.ndarray], outputs: list[str] | None, request_id: str | None,
                    local_name: str) -> RemoteAnswer | str:
        url = self.infer_url(local_name)
        response = await self.client.post(url, content=encode_request(inputs, outputs, request_id),
                                          headers={"content-type": "application/json"})
        if response.status_code != 200:
            return f"http-{response.status_code}"
        try:
            raw, arrays = decode_response(response.content, response.headers.get(HEADER_LENGTH))
        except Exception:  # noqa: BLE001 (a malformed remote answer is a failed fallback)
            return "bad-response"
        return RemoteAnswer(str(raw.get("model_name", self.policy.model or local_name)),
                            str(raw.get("model_version", "")), arrays)

    async def close(self) -> None:
        await self.client.aclose()


def describe(policy: FallbackPolicy | None) -> dict[str, Any] | None:
    if policy is None:
        return None
    return {"url": policy.url, "min_confidence": policy.min_confidence, "max_queue_ms": policy.max_queue_ms,
            "timeout_ms": policy.timeout_s * 1e3, "rule": getattr(policy.rule, "__name__", None)}
