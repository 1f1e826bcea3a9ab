"""Prometheus metrics, on a registry of the app's own so that apps (and tests) never share.

The batch-size histogram's `_count` is the number of model calls; `_sum` is the rows they
served. The uncertainty histogram follows the epistemic part of served predictions (the
predictive epistemic standard deviation for regression, the mutual information for
classification), which is what drifts when traffic moves away from the training data.
"""

from __future__ import annotations

import bisect
import itertools
import math
import threading
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
UNCERTAINTY_BUCKETS = (
    *(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5),
    *(1, 2, 5, 10, 20, 50, 100, 1000),
)
MODEL = ("model", "version")


class BatchHistogram:
    """A labelled histogram fed a batch of values at once, for a metric with one value per
    served prediction: prometheus_client's observe() takes a lock and walks the buckets per
    value (3.5 µs each, a twentieth of a small model's batch); here a batch takes the lock
    once and bisects the buckets. NaN values are not counted."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ):
        self.name, self.documentation, self.labelnames = name, documentation, list(labelnames)
        self.bounds = [*buckets, math.inf]
        self._counts: dict[tuple[str, ...], list[int]] = {}
        self._sums: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, labels: tuple[str, ...], values: Iterable[float]) -> None:
        counts, total = [0] * len(self.bounds), 0.0
        for value in values:
            if value == value:  # not NaN
                counts[bisect.bisect_left(self.bounds, value)] += 1  # value <= bound
                total += value
        with self._lock:
            series = self._counts.setdefault(labels, [0] * len(self.bounds))
            for i, count in enumerate(counts):
                series[i] += count
            self._sums[labels] = self._sums.get(labels, 0.0) + total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        bounds = [floatToGoString(b) for b in self.bounds]
        with self._lock:
            series = [
                (k, list(itertools.accumulate(c)), self._sums[k]) for k, c in self._counts.items()
            ]
        for labels, cumulative, total in series:
            buckets = list(zip(bounds, cumulative, strict=True))
            family.add_metric(list(labels), buckets, sum_value=total)
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)


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
        self.uncertainty = BatchHistogram(
            "credence_epistemic_uncertainty",
            "Epistemic std (regression, per target) or mutual information (classification) "
            "of served predictions.",
            MODEL,
            buckets=UNCERTAINTY_BUCKETS,
            registry=r,
        )
        self.ood = Counter(
            "credence_ood_predictions",
            "Served predictions flagged out of distribution (ood: true), by model.",
            MODEL,
            registry=r,
        )
        self.predictions = Counter(
            "credence_predictions",
            "Served predictions (instances answered with summaries), by model: the "
            "denominator of the OOD flag rate.",
            MODEL,
            registry=r,
        )
        self.ood_reference_fpr = Gauge(
            "credence_ood_reference_fpr",
            "The share of in-distribution predictions the model's OOD flag is set to fire on "
            "(its validation rows' false-positive rate); the baseline of the flag rate.",
            MODEL,
            registry=r,
        )
        self.model_info = Gauge(
            "credence_model_info",
            "1 for every loaded model version, its description in the labels.",
            [*MODEL, "method", "architecture", "backend", "device", "precision"],
            registry=r,
        )
        self.reloads = Counter(
            "credence_model_reloads",
            "Versions swapped in (loaded), refused (a corrupt, truncated or mismatched "
            "checkpoint: what served before keeps serving) or unloaded, by reloads, loads, "
            "unloads and the model directory's poll.",
            ["model", "outcome"],
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
