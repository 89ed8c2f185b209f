"""`serve`: load a model (every check first), then answer TF Serving's REST API on uvicorn."""

from __future__ import annotations

import logging
import socket
from concurrent.futures import ThreadPoolExecutor

import uvicorn

from .app import build_app
from .config import ServeConfig
from .metrics import ServingMetrics
from .repository import ModelRepository

__all__ = ["create_server", "serve"]

logger = logging.getLogger(__name__)


def create_server(config: ServeConfig) -> tuple[uvicorn.Server, ModelRepository]:
    """Load the model and build (not start) its server.

    Raises:
        ArtifactError: the artifact fails a check; nothing is served.
    """
    metrics = ServingMetrics(config.name)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distsave-model")
    repository = ModelRepository(config, executor, on_batch=metrics.observe_batch)
    app = build_app(repository, metrics)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=10))
    return server, repository


def serve(config: ServeConfig) -> None:
    """Serve until interrupted; prints ``serving <name> version <v> at <url>`` once listening.

    Example:
        >>> serve(ServeConfig(path="models/mnist", name="mnist", port=8501))
    """
    server, repository = create_server(config)
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    try:
        sock = socket.create_server((config.host, config.port), family=family, backlog=2048)
    except OSError as error:
        raise OSError(f"Cannot listen on {config.host}:{config.port} ({error.strerror}). Pick another "
                      "--port (0 picks a free one) or --host.") from None
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    batching = (f"dynamic batching up to {config.max_batch_size} rows within {config.batch_timeout_ms:g} ms"
                if config.batching else "no batching")
    print(f"serving {config.name} version {repository.current.version} at http://{shown}:{port}"
          f"/v1/models/{config.name} ({batching})", flush=True)
    server.run(sockets=[sock])
