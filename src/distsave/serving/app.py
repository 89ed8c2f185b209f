"""The Starlette application: TF Serving's REST API over a `ModelRepository`.

Routes (https://www.tensorflow.org/tfx/serving/api_rest):
``GET /v1/models/{name}[/versions/{v}]`` (status), ``GET …/metadata`` (signature_def),
``POST /v1/models/{name}[/versions/{v}]:predict``; and ``GET /metrics`` (Prometheus).
Every error is ``{"error": "..."}`` with TF Serving's status codes: 400 for bad input (malformed
or oversized body, unknown signature, wrong input name, shape or dtype), 404 for an unknown
model, version or route.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .codec import ServingError, bad_request, decode_predict, encode_predict
from .metrics import ServingMetrics
from .repository import ModelRepository

__all__ = ["build_app"]

logger = logging.getLogger(__name__)

def _json(content: Any, status: int = 200) -> Response:
    """JSON as TF Serving writes it (NaN and Infinity allowed in outputs)."""
    return Response(json.dumps(content, separators=(",", ":")), status, media_type="application/json")


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


def _version(request: Request) -> int | None:
    text = request.path_params.get("version")
    if text is None:
        return None
    if not text.isdigit():
        raise ServingError(404, f"Version '{text}' is not a number; versions are numbered folders.")
    return int(text)


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    too_large = (f"Request body is larger than the server's limit of {limit} bytes. Send fewer "
                 "instances per request, or start the server with a larger --max-body-bytes.")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise bad_request(too_large)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise bad_request(too_large)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise bad_request(f"JSON Parse error: {error}") from None
    except RecursionError:
        raise bad_request("JSON Parse error: the document is nested too deeply.") from None


def build_app(repository: ModelRepository, metrics: ServingMetrics | None = None) -> Starlette:
    """The ASGI app serving ``repository`` (polling for new versions while it runs)."""
    config = repository.config
    metrics = metrics or ServingMetrics(config.name)

    def endpoint(api: str, handler: Callable[[Request], Awaitable[Any]]) -> Callable:
        async def run(request: Request) -> Response:
            start = time.perf_counter()
            try:
                response = _json(await handler(request))
            except ServingError as error:
                response = _error(error.status, error.message)
            metrics.observe_request(api, response.status_code, time.perf_counter() - start)
            return response
        return run

    async def status(request: Request) -> Any:
        version = _version(request)
        repository.get(request.path_params["name"], version)
        return repository.status(version)

    async def metadata(request: Request) -> Any:
        name = request.path_params["name"]
        served = repository.get(name, _version(request))
        return {"model_spec": {"name": name, "signature_name": "", "version": str(served.version)},
                "metadata": {"signature_def": {"signature_def": served.signature_defs()}}}

    async def predict(request: Request) -> Any:
        served = repository.get(request.path_params["name"], _version(request))
        decoded = decode_predict(await _read_json(request, config.max_body_bytes), served.inputs_of)
        try:
            outputs = await served.runners[decoded.signature_name].run(decoded.tensors)
        except (ValueError, TypeError, RuntimeError) as error:
            raise bad_request(f"Running signature '{decoded.signature_name}' failed: {error}") from None
        return encode_predict(outputs, decoded.row_format)

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(repository.current.version), media_type=metrics.content_type)

    async def not_found(request: Request, error: HTTPException) -> Response:
        return _error(error.status_code, f"{request.method} {request.url.path}: {error.detail}. "
                                         "Routes: GET /v1/models/<name>[/versions/<v>][/metadata], "
                                         "POST /v1/models/<name>[/versions/<v>]:predict, GET /metrics.")

    @asynccontextmanager
    async def lifespan(app: Starlette):
        repository.start_polling()
        try:
            yield
        finally:
            repository.stop_polling()

    model = "/v1/models/{name}"
    version = model + "/versions/{version}"
    routes = [
        Route(model + ":predict", endpoint("predict", predict), methods=["POST"]),
        Route(version + ":predict", endpoint("predict", predict), methods=["POST"]),
        Route(model + "/metadata", endpoint("metadata", metadata), methods=["GET"]),
        Route(version + "/metadata", endpoint("metadata", metadata), methods=["GET"]),
        Route(model, endpoint("status", status), methods=["GET"]),
        Route(version, endpoint("status", status), methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: not_found})
