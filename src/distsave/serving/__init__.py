"""`distsave serve`: TF Serving's REST API for distsave artifacts, on Starlette and uvicorn.

Starlette on uvicorn rather than FastAPI: the API is six fixed routes whose JSON must be
validated into TF Serving's own error messages and status codes (a 400 ``{"error": ...}``),
which FastAPI's automatic pydantic validation (422 with its own error shape) would have to be
worked around; Starlette gives the routing, streaming bodies and lifespan without that layer.
"""

from .app import build_app
from .config import ServeConfig
from .server import create_server, serve

__all__ = ["ServeConfig", "build_app", "create_server", "serve"]
