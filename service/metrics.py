"""Prometheus metrics, on a registry of the app's own so that apps (and tests) never share.

The batch-size histogram's `_count` is the number of model calls; `_sum` is the rows they
served. The uncertainty histogram follows the epistemic part of served predictions (the
predictive epistemic standard deviation for regression, the mutual information for
classification), which is what drifts when traffic moves away from the training data.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
UNCERTAINTY_BUCKETS = (
    *(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5),
    *(1, 2, 5, 10, 20, 50, 100, 1000),
)
MODEL = ("model", "version")


class Metrics:
    """Every metric the service exports."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "credence_requests",
            "Predict requests by model and HTTP status.",
            [*MODEL, "code"],
            registry=r,
        )
        self.latency = Histogram(
            "credence_request_seconds",
            "Predict request latency, parse to response.",
            MODEL,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "credence_batch_rows",
            "Rows per model call (count = model calls).",
            MODEL,
            buckets=ROW_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "credence_batch_requests",
            "Requests per model call.",
            MODEL,
            buckets=ROW_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "credence_inference_seconds",
            "Sampling plus summaries for one batch.",
            MODEL,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "credence_queue_depth", "Requests waiting for a model call.", MODEL, registry=r
        )
        self.uncertainty = Histogram(
            "credence_epistemic_uncertainty",
            "Epistemic std (regression, per target) or mutual information (classification) "
            "of served predictions.",
            MODEL,
            buckets=UNCERTAINTY_BUCKETS,
            registry=r,
        )
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self.model_versions = Gauge(
            "credence_model_versions",
            "Model versions found, by load state.",
            ["state"],
            registry=r,
        )

    def observe_request(self, model: str, version: str, code: int, seconds: float) -> None:
        """Count one predict request and its latency (code 499: the client left first)."""
        children = self._request_children.get((model, version, code))
        if children is None:  # labels() locks and validates: once per label set, not per call
            children = (
                self.requests.labels(model, version, str(code)),
                self.latency.labels(model, version),
            )
            self._request_children[model, version, code] = children
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
