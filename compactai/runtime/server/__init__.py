"""`compactai serve`: the local inference runtime (KServe v2 protocol; see docs/serve.md).

    server = ModelServer("bundle-v3/", ServeConfig(trusted_keys=[load_public_key("publisher.pub")]))
    app = create_app(server)          # a FastAPI app; run_server(server) runs it with uvicorn
"""

from compactai.runtime.server.app import bind_socket, create_app, make_uvicorn
from compactai.runtime.server.fallback import FallbackPolicy, max_softmax
from compactai.runtime.server.served import BatchSettings
from compactai.runtime.server.service import ModelServer, ServeConfig

__all__ = [
    "BatchSettings", "FallbackPolicy", "ModelServer", "ServeConfig", "bind_socket", "create_app", "make_uvicorn",
    "max_softmax",
]
