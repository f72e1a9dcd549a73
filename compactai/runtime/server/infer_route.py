"""``POST /v2/models/{name}[/versions/{v}]/infer`` as a plain ASGI route in front of FastAPI.

The inference route is the one on the latency path, so it skips FastAPI's routing (a regex
match per route), dependency solving and ``Request``/``Response`` objects: it reads the body from
the ASGI ``receive`` channel under the size limit, answers with two ``send`` calls, and hands
every other request to the FastAPI app. Measured with
benchmarks/serve.py's client: a FastAPI echo route costs 0.1 to 0.25 ms more than a bare ASGI echo
on this machine (docs/serve.md, "Performance"). The behaviour is the FastAPI route's: the same
statuses, ``{"error": ...}`` bodies, metrics and log lines.
"""

from __future__ import annotations

import hmac
import json
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from compactai.runtime.server.protocol import (
    RequestError,
    check_inputs,
    check_outputs,
    encode_response,
    parse_infer_request,
)
from compactai.runtime.server.service import ModelServer

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# the same paths as FastAPI's "/v2/models/{name}/infer" and "/v2/models/{name}/versions/{version}/infer"
INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
OUTCOMES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 413: "too_large", 500: "nonfinite_output"}


class ClientGone(Exception):
    """The client closed the connection before its request body was read."""


def check_token(server: ModelServer, authorization: str | None, path: str, client: str | None) -> None:
    """RequestError(401) unless the server has no token or ``authorization`` carries it (all protected routes)."""
    token = server.config.token
    if token is None:
        return
    header = authorization or ""
    scheme, _, given = header.partition(" ")
    # constant-time comparison: the time taken does not tell how much of the token matched
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        server.log("refusal", route=path, reason="missing token" if not header else "invalid token", client=client)
        raise RequestError(401, "This route needs 'Authorization: Bearer TOKEN' with the server's token "
                                "(--token-file).")


def error_body(message: str) -> bytes:
    """``{"error": message}`` as Starlette's JSONResponse writes it."""
    return json.dumps({"error": message}, ensure_ascii=False, separators=(",", ":")).encode()


def internal_error_message(exc: BaseException) -> str:
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"internal error: {type(exc).__name__}: {first}"


class InferRoute:
    """ASGI middleware answering the inference routes itself; everything else goes to ``app``."""

    def __init__(self, app: ASGIApp, server: ModelServer) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = None
        if scope["type"] == "http" and scope["method"] == "POST":
            match = INFER_PATH.fullmatch(scope["path"])
        if match is None:  # not an inference request (a GET on /infer gets FastAPI's 405)
            await self.app(scope, receive, send)
            return
        try:
            status, body, headers = await self.infer(match[1], match[2], scope, receive)
        except ClientGone:
            return
        raw_headers = [(b"content-length", str(len(body)).encode())]
        raw_headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": body})

    async def infer(self, name: str, version: str | None, scope: Scope,
                    receive: Receive) -> tuple[int, bytes, dict[str, str]]:
        """(status, body, headers) of one inference request; never raises but for ClientGone."""
        server = self.server
        start = time.perf_counter()
        metrics = server.metrics
        served_version = ""
        label = name if name == server.model.name else "_unknown"  # a client cannot mint label values
        in_flight = metrics.child(metrics.in_flight, label)
        in_flight.inc()
        server.dispatcher.requests += 1
        try:
            headers = _headers(scope)
            client = scope.get("client")
            check_token(server, headers.get("authorization"), scope["path"], client[0] if client else None)
            model = server.model_for(name)
            body = await read_body(receive, headers.get("content-length"), server.config.max_body_bytes)
            parsed = parse_infer_request(body, headers.get("inference-header-content-length"))
            slot, probation = model.route(version)  # once: the request runs on the version it is checked against
            check_inputs(parsed, slot.loaded.inputs, name)
            names = check_outputs(parsed, slot.loaded.output_names, name)
            parameters: dict[str, Any] = {}
            model_name, served_version, outputs = await server.answer(model, slot, probation, parsed, names,
                                                                      parameters)
            content, extra = encode_response(parsed, outputs, model_name=model_name, model_version=served_version,
                                             parameters=parameters)
            metrics.child(metrics.requests, label, served_version, "ok").inc()
            return 200, content, extra
        except RequestError as exc:
            metrics.child(metrics.requests, label, served_version, OUTCOMES.get(exc.status, "bad_request")).inc()
            extra = {"content-type": "application/json"}
            if exc.status == 401:
                extra["www-authenticate"] = "Bearer"
            return exc.status, error_body(str(exc)), extra
        except ClientGone:
            metrics.child(metrics.requests, label, served_version, "bad_request").inc()
            raise
        except Exception as exc:  # noqa: BLE001 (answered 500 and logged, as the FastAPI routes' handler does)
            metrics.child(metrics.requests, label, served_version, "error").inc()
            server.log("error", error=f"{type(exc).__name__}: {exc}"[:300])
            return 500, error_body(internal_error_message(exc)), {"content-type": "application/json"}
        finally:
            server.dispatcher.requests -= 1
            in_flight.dec()
            metrics.child(metrics.request_seconds, label).observe(time.perf_counter() - start)


def _headers(scope: Scope) -> dict[str, str]:
    """The request headers this route reads, by lower-case name (ASGI servers send names lower-case)."""
    wanted = (b"authorization", b"content-length", b"inference-header-content-length")
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in wanted}


async def read_body(receive: Receive, declared: str | None, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (announced or streamed)."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"The request body is {declared} bytes, over the server's limit of {limit} bytes "
                                "(--max-body-mb); send smaller batches.")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"The request body passed the server's limit of {limit} bytes (--max-body-mb); "
                                    "send smaller batches.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
