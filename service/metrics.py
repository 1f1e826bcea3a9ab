"""Prometheus metrics, on a registry of the app's own so that apps (and tests) never share.

Names follow Prometheus' conventions: counters end in `_total`, times are in seconds
(`_seconds`), and a label's values are a bounded set (a model name nobody loaded is
"(unknown)"; a failure's `reason` is one of service.errors.REASON_BY_*'s). Every predict
request is counted once, with its protocol (`native` or `v2`), whichever layer answered it:
the gateway (401, 405, 413) or the data plane.

The batch-size histogram's `_count` is the number of model calls; `_sum` is the rows they
served. The uncertainty histograms follow what served predictions say about themselves:
epistemic (the predictive epistemic standard deviation for regression, the mutual
information for classification), which is what drifts when traffic moves away from the
training data, aleatoric (the noise std; the expected entropy) and predictive (the total
std; the entropy of the mean probabilities).

Per-request series are fed through label children made once per label set
(`Metrics.observe_request`) and per-batch series through `BatchHistogram`, which takes a
batch's values under one lock: the serving fast path pays no per-value lock.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
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
QUEUE_BUCKETS = (0.0001, 0.00025, 0.0005, *LATENCY_BUCKETS)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
SAMPLE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
UNCERTAINTY_BUCKETS = (
    *(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5),
    *(1, 2, 5, 10, 20, 50, 100, 1000),
)
MODEL = ("model", "version")
UNCERTAINTY = {  # the uncertainty histograms, in the order Metrics.uncertainty takes them
    "epistemic": "Epistemic std (regression) or mutual information (classification)",
    "aleatoric": "Aleatoric (noise) std (regression) or expected entropy (classification)",
    "predictive": "Predictive std (regression) or predictive entropy (classification)",
}


class BatchHistogram:
    """Labelled histograms fed a batch of values at once, for metrics with one value per
    served prediction or per request of a batch: prometheus_client's observe() takes a lock
    and walks the buckets per value (3.5 µs each, a twentieth of a small model's batch);
    here a batch is bucketed by numpy and takes the lock once. Several metrics that share
    labels, buckets and their values' shape (epistemic, aleatoric and predictive
    uncertainty) are one BatchHistogram, bucketed in one pass: one name per row of the
    values. NaN values are not counted."""

    def __init__(
        self,
        metrics: Sequence[tuple[str, str]],  # (name, documentation) each
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ):
        self.metrics, self.labelnames = list(metrics), list(labelnames)
        self.bounds = [*buckets, math.inf]
        self._edges = np.array(self.bounds)
        # row i's bucket indices move to [i * width, (i + 1) * width): one bincount for all
        self._rows, self._width = len(self.metrics), len(self.bounds) + 1  # + 1: NaN's
        self._offsets = np.arange(self._rows)[:, None] * self._width
        self._counts: dict[tuple[str, ...], np.ndarray] = {}  # [metric, bucket]
        self._sums: dict[tuple[str, ...], list[float]] = {}  # [metric]
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, labels: tuple[str, ...], values: np.ndarray | Sequence[float]) -> None:
        """`values`: [metrics, n] (or [n] for one metric)."""
        values = np.asarray(values, dtype=np.float64).reshape(self._rows, -1)
        # value <= bound goes to the bound's bucket; NaN sorts past +Inf, into the extra one
        index = np.searchsorted(self._edges, values)
        if self._rows > 1:
            index += self._offsets
        counts = np.bincount(index.ravel(), minlength=self._rows * self._width)
        counts = counts.reshape(self._rows, self._width)
        totals = np.add.reduce(values, axis=1).tolist()
        if any(total != total for total in totals):  # a NaN: the sum of the rest
            totals = np.nansum(values, axis=1).tolist()
        with self._lock:
            series = self._counts.get(labels)
            if series is None:
                self._counts[labels], self._sums[labels] = counts, totals
            else:
                series += counts
                sums = self._sums[labels]
                for i, total in enumerate(totals):
                    sums[i] += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        bounds = [floatToGoString(b) for b in self.bounds]
        with self._lock:
            series = [
                (k, np.cumsum(c[:, :-1], axis=1).tolist(), list(self._sums[k]))
                for k, c in self._counts.items()
            ]
        for i, family in enumerate(self.describe()):
            for labels, cumulative, totals in series:
                buckets = list(zip(bounds, cumulative[i], strict=True))
                family.add_metric(list(labels), buckets, sum_value=totals[i])
            yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        for name, documentation in self.metrics:
            yield HistogramMetricFamily(name, documentation, labels=self.labelnames)


class Metrics:
    """Every metric the service exports."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        request = [*MODEL, "protocol"]
        self.requests = Counter(
            "credence_requests",
            "Predict requests answered, by model, protocol and HTTP status (499: the client "
            "left before its body arrived).",
            [*request, "code"],
            registry=r,
        )
        self.failures = Counter(
            "credence_request_failures",
            "Predict requests that failed, by model, protocol and reason (bad_request, "
            "too_large, unauthorized, not_found, timeout, overloaded, unavailable, internal, "
            "client_gone, ...).",
            [*request, "reason"],
            registry=r,
        )
        self.latency = Histogram(
            "credence_request_duration_seconds",
            "Predict request latency, from the gateway to the response.",
            request,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = BatchHistogram(
            [
                (
                    "credence_queue_wait_seconds",
                    "Time a predict request waited in its model's queue before its batch started.",
                )
            ],
            MODEL,
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "credence_inference_duration_seconds",
            "Sampling plus summaries for one batch (count = model calls).",
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
        self.request_samples = BatchHistogram(
            [
                (
                    "credence_request_samples",
                    "Posterior draws (num_samples) per predict request that reached a batch.",
                )
            ],
            MODEL,
            buckets=SAMPLE_BUCKETS,
            registry=r,
        )
        self.samples_drawn = Counter(
            "credence_samples_drawn",
            "Posterior draws made for served instances: num_samples per instance, summed "
            "(a request of 8 instances at num_samples 100 adds 800).",
            MODEL,
            registry=r,
        )
        self.queue_depth = Gauge(
            "credence_queue_depth", "Requests waiting for a model call.", MODEL, registry=r
        )
        self.uncertainty = BatchHistogram(  # one row per UNCERTAINTY kind
            [
                (f"credence_{kind}_uncertainty", f"{what} of served predictions, per output.")
                for kind, what in UNCERTAINTY.items()
            ],
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
        self.model_versions = Gauge(
            "credence_model_versions",
            "Model versions found, by load state.",
            ["state"],
            registry=r,
        )
        self.load_failures = Counter(
            "credence_model_load_failures",
            "Model versions that failed to load (a refused checkpoint, a bug), by model.",
            MODEL,
            registry=r,
        )
        self._request_children: dict[tuple[str, str, str, int, str], RequestChildren] = {}

    def observe_request(
        self, model: str, version: str, protocol: str, code: int, reason: str, seconds: float
    ) -> None:
        """Count one predict request, its failure (`reason` empty: none) and its latency."""
        key = (model, version, protocol, code, reason)
        children = self._request_children.get(key)
        if children is None:  # labels() locks and validates: once per label set, not per call
            children = RequestChildren(
                self.requests.labels(model, version, protocol, str(code)),
                self.latency.labels(model, version, protocol),
                self.failures.labels(model, version, protocol, reason) if reason else None,
            )
            self._request_children[key] = children
        children.requests.inc()
        children.latency.observe(seconds)
        if children.failures is not None:
            children.failures.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(frozen=True, slots=True)
class RequestChildren:
    """The series one label set of predict requests feeds."""

    requests: Counter
    latency: Histogram
    failures: Counter | None
