"""The HTTP face of the server: KServe v2 / Open Inference Protocol routes on FastAPI, and uvicorn.

Routes (``*`` = needs the bearer token when the server has one)::

    GET  /v2/health/live | /v2/health/ready          liveness, readiness (503 until a version is loaded)
    GET  /v2                                          server metadata and extensions
    GET  /v2/models/{name}[/versions/{v}]             model metadata: inputs/outputs (name, datatype, shape)
    GET  /v2/models/{name}[/versions/{v}]/ready       model readiness
    POST /v2/models/{name}[/versions/{v}]/infer    *  inference (JSON, or the binary tensor extension)
    GET  /v2/models/{name}/drift                      drift report of the serving version
    POST /v2/repository/index                      *  repository extension: what is loaded
    POST /v2/repository/models/{name}/load|unload  *  repository extension: (re)load from the source, unload
    GET  /metrics                                     Prometheus text format

Client mistakes answer 4xx with ``{"error": "..."}``; the body size limit is enforced while the
body is read, so an oversize request is refused without being held in memory.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from compactai.runtime.server.drift_hook import NO_PROFILE
from compactai.runtime.server.infer_route import InferRoute, check_token, internal_error_message
from compactai.runtime.server.protocol import RequestError
from compactai.runtime.server.service import ModelServer


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (announced or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"The request body is {declared} bytes, over the server's limit of {limit} bytes "
                                "(--max-body-mb); send smaller batches.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"The request body passed the server's limit of {limit} bytes (--max-body-mb); "
                                    "send smaller batches.")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(server: ModelServer) -> FastAPI:
    """The FastAPI app serving ``server`` (start and stop run in its lifespan)."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        server.start()
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(title="compactai serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def authorize(request: Request) -> None:
        check_token(server, request.headers.get("authorization"), request.url.path,
                    request.client.host if request.client else None)

    @app.exception_handler(RequestError)
    async def request_error(_request: Request, exc: RequestError) -> JSONResponse:
        headers = {"www-authenticate": "Bearer"} if exc.status == 401 else None
        return _error(exc.status, str(exc), headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "No such route; see GET /v2 and the KServe v2 protocol." if exc.status_code == 404 else str(exc.detail)
        return _error(exc.status_code, message)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        server.log("error", error=f"{type(exc).__name__}: {exc}"[:300])
        return _error(500, internal_error_message(exc))

    # ---- health and metadata ---------------------------------------------------------------------------
    @app.get("/v2/health/live")
    async def live() -> dict[str, Any]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        if server.model.ready:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "error": f"model {server.model.name!r} is not loaded"}, status_code=503)

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "compactai", "version": _package_version(),
                "extensions": ["binary_tensor_data", "model_repository", "compactai_drift", "compactai_fallback"]}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> dict[str, Any]:
        return server.model_for(name).metadata(version)

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        model = server.model_for(name)
        try:
            slot, _ = model.route(version)
        except RequestError as exc:
            if version is not None:
                raise
            return JSONResponse({"name": name, "ready": False, "error": str(exc)}, status_code=503)
        return JSONResponse({"name": name, "version": slot.version, "ready": True})

    @app.get("/v2/models/{name}/drift")
    async def drift(name: str) -> dict[str, Any]:
        slot, _ = server.model_for(name).route(None)
        report = slot.drift.report()
        if report is None:
            return {"model_name": name, "model_version": slot.version, "enabled": False, "message": NO_PROFILE}
        return {"model_name": name, "model_version": slot.version, "enabled": True, **report}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # ---- inference: POST /v2/models/{name}[/versions/{v}]/infer is answered by InferRoute (infer_route.py),
    # a plain ASGI route in front of FastAPI's routing: it is the route on the latency path
    app.add_middleware(InferRoute, server=server)

    # ---- repository extension --------------------------------------------------------------------------
    @app.post("/v2/repository/index")
    async def repository_index(request: Request) -> list[dict[str, Any]]:
        authorize(request)
        model = server.model
        states = model.states()
        if not states:
            return [{"name": model.name, "state": "UNAVAILABLE", "reason": "unloaded"}]
        return [{"name": n, "version": v, "state": "READY", "role": s} for n, v, s, _ in states]

    @app.post("/v2/repository/models/{name}/load")
    async def repository_load(name: str, request: Request) -> dict[str, Any]:
        authorize(request)
        model = server.model_for(name)
        await read_body(request, server.config.max_body_bytes)  # parameters are accepted and ignored
        with model.lock:
            model.refuse_during_probation("load")
        loaded = await asyncio.get_running_loop().run_in_executor(None, server.load_from_source)
        if loaded is None:
            raise RequestError(404, f"{server.source} holds no installed version of {name!r} yet.")
        model.install(loaded)
        return {"name": name, "version": loaded.version, "load": True}

    @app.post("/v2/repository/models/{name}/unload")
    async def repository_unload(name: str, request: Request) -> dict[str, Any]:
        authorize(request)
        model = server.model_for(name)
        await read_body(request, server.config.max_body_bytes)
        versions = model.unload()
        server.log("unload", model=name, versions=versions)
        return {"name": name, "unload": True, "versions": versions}

    return app


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("compactai")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 picks a free one); the caller reads the port from it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the
    # socket says it is TCP; without it Nagle holds the response body until the client's delayed
    # ACK of the headers (about 40 ms per request on Linux; measured with benchmarks/slice.py)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def http_stack() -> dict[str, str]:
    """The HTTP parser and event loop uvicorn will use: httptools and uvloop (``uvicorn[standard]``)
    when installed, else the pure-Python h11 and asyncio (the server works either way, slower)."""
    import importlib.util

    return {"http": "httptools" if importlib.util.find_spec("httptools") else "h11",
            "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"}


def make_uvicorn(server: ModelServer) -> Any:
    """A uvicorn Server for the app (no access log: every event already has a structured log line)."""
    import uvicorn

    stack = http_stack()
    # the inference route also goes in front of the FastAPI app, not only inside it (where it stays for
    # create_app's users): inside, every inference request first went through FastAPI's entry (its
    # OpenTelemetry check reads environment variables per request) and Starlette's error middleware,
    # 20 to 35 us of CPU per request (A/B, interleaved rounds, docs/serve.md)
    app = InferRoute(create_app(server), server=server)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_keep_alive=30, http=stack["http"], loop=stack["loop"])
    return uvicorn.Server(config)
