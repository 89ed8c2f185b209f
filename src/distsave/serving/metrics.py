"""Prometheus metrics of one server: requests, latency, batch sizes (GET ``/metrics``)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ServingMetrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServingMetrics:
    """The server's own registry (not the process-global one), so servers never share counts."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model: str):
        self.model = model
        self.registry = CollectorRegistry()
        self.requests = Counter("distsave_serving_requests", "Requests answered, by API and HTTP status.",
                                ["model", "api", "code"], registry=self.registry)
        self.latency = Histogram("distsave_serving_request_latency_seconds",
                                 "Time from request to response, by API.", ["model", "api"],
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_rows = Histogram("distsave_serving_batch_rows",
                                    "Rows per signature call (dynamic batching merges requests).",
                                    ["model", "signature"], buckets=_BATCH_BUCKETS, registry=self.registry)
        self.version = Gauge("distsave_serving_model_version", "The version being served.", ["model"],
                             registry=self.registry)

    def observe_request(self, api: str, code: int, seconds: float) -> None:
        self.requests.labels(self.model, api, str(code)).inc()
        self.latency.labels(self.model, api).observe(seconds)

    def observe_batch(self, signature: str, rows: int) -> None:
        self.batch_rows.labels(self.model, signature).observe(rows)

    def render(self, version: int) -> bytes:
        self.version.labels(self.model).set(version)
        return generate_latest(self.registry)
