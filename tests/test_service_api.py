"""The HTTP API's shapes: model listings, predictions, health, metrics and routing."""

from __future__ import annotations

import gc
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, FEATURES, Client, make_settings, metric_value, serve
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.utils import floatToGoString

from service.metrics import UNCERTAINTY_BUCKETS, BatchHistogram

NATIVE = {"model": "reg", "version": "1", "protocol": "native"}  # a native request's labels
REGRESSION_FIELDS = ("mean", "std", "variance", "epistemic_variance", "aleatoric_variance")


def test_regression_prediction_has_every_field_as_lists_over_targets(client: Client) -> None:
    body = {
        "instances": [[0.1, 0.2, 0.3], {"a": 1.0, "b": -2, "c": 0.5}],
        "parameters": {"num_samples": 64, "credible_levels": [0.5, 0.9], "seed": 3},
    }
    response = client.post("/v1/models/reg:predict", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    data = response.json()
    assert (data["model_name"], data["model_version"]) == ("reg", 1)
    assert (data["num_samples"], data["seed"]) == (64, 3)
    assert len(data["predictions"]) == 2
    for prediction in data["predictions"]:
        for field in REGRESSION_FIELDS:
            assert isinstance(prediction[field], list) and len(prediction[field]) == 1
        (mean,), (variance,) = prediction["mean"], prediction["variance"]
        parts = prediction["epistemic_variance"][0] + prediction["aleatoric_variance"][0]
        assert math.isclose(variance, parts)
        assert math.isclose(prediction["std"][0], math.sqrt(variance))
        assert [i["level"] for i in prediction["intervals"]] == [0.5, 0.9]
        inner, outer = prediction["intervals"]
        assert outer["lower"][0] < inner["lower"][0] < mean < inner["upper"][0] < outer["upper"][0]


def test_classification_prediction_has_every_field(client: Client) -> None:
    body = {"instances": [[0.0, 1.0, 2.0, 3.0]] * 3, "parameters": {"seed": 11}}
    response = client.post("/v1/models/clf:predict", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["num_samples"] == 40  # the manifest's default
    for prediction in data["predictions"]:
        probabilities = prediction["probabilities"]
        assert len(probabilities) == len(CLASSES) and math.isclose(sum(probabilities), 1.0)
        assert prediction["predicted_class"] == CLASSES[probabilities.index(max(probabilities))]
        assert prediction["confidence"] == max(probabilities)
        assert math.isclose(
            prediction["mutual_information"],
            prediction["entropy"] - prediction["expected_entropy"],
            abs_tol=1e-12,
        )
        (interval,) = prediction["intervals"]
        assert interval["level"] == 0.95  # the default credible level
        for lo, p, hi in zip(interval["lower"], probabilities, interval["upper"], strict=True):
            assert 0 <= lo <= p <= hi <= 1


def test_unseeded_request_returns_a_seed_that_reproduces_it(client: Client) -> None:
    body = {"instances": [[0.3, -0.1, 2.0]]}
    first = client.post("/v1/models/reg:predict", json=body).json()
    assert 0 <= first["seed"] < 2**63
    again = client.post(
        "/v1/models/reg:predict", json={**body, "parameters": {"seed": first["seed"]}}
    )
    assert again.json() == first


def test_percent_encoded_colon_routes_the_same(client: Client) -> None:
    body = {"instances": [[0.0, 0.0, 0.0]], "parameters": {"seed": 1}}
    plain = client.post("/v1/models/reg:predict", json=body)
    encoded = client.post("/v1/models/reg%3Apredict", json=body)
    assert plain.status_code == encoded.status_code == 200
    assert plain.json() == encoded.json()


def test_version_route_and_default_version(client: Client) -> None:
    body = {"instances": [[0.0, 0.0, 0.0]], "parameters": {"seed": 1}}
    default = client.post("/v1/models/twin:predict", json=body)
    named = client.post("/v1/models/twin/versions/1:predict", json=body)
    assert default.status_code == named.status_code == 200
    assert default.json() == named.json()
    assert default.json()["model_version"] == 1  # v2 failed to load


def test_model_listing_and_detail(client: Client) -> None:
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(models) == {"reg", "clf", "twin", "broken"}
    assert models["reg"]["default_version"] == 1 and models["reg"]["state"] == "available"
    assert [v["state"] for v in models["twin"]["versions"]] == ["loaded", "failed"]
    assert models["broken"]["state"] == "unavailable" and models["broken"]["ready"] is False

    detail = client.get("/v1/models/reg").json()
    assert detail["task"] == "regression" and detail["method"] == "mc_dropout"
    assert detail["input"] == {"shape": [3], "dtype": "float32", "feature_names": FEATURES}
    assert detail["output"] == {"names": ["y"]}
    assert detail["num_samples"] == {"default": 50, "max": 500, "set_size": None}
    assert detail["metrics"] == {"test_rmse": 0.5}
    assert detail["versions"][0]["state"] == "loaded"
    assert detail["versions"][0]["device"] == "cpu"
    assert detail["versions"][0]["precision"] == "float32"
    assert detail["versions"][0]["cuda_graphs"] is False
    assert client.get("/v1/models/clf").json()["output"]["names"] == CLASSES


def test_health_readiness_and_metrics(client: Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and "reg/1" in ready.json()["loaded"]
    client.post("/v1/models/reg:predict", json={"instances": [[1.0, 2.0, 3.0]]})
    text = client.get("/metrics").text
    assert metric_value(text, "credence_requests_total", **NATIVE, code="200") > 0
    assert metric_value(text, "credence_batch_rows_count", model="reg", version="1") > 0
    assert metric_value(text, "credence_epistemic_uncertainty_count", model="reg", version="1") > 0
    assert "credence_queue_depth" in text and "credence_inference_duration_seconds_bucket" in text


def test_routing_errors_are_json(client: Client) -> None:
    for method, url, status in [
        ("get", "/nope", 404),
        ("get", "/v1/models/reg:predict", 405),
        ("post", "/v1/models/reg", 405),
        ("post", "/v1/models/reg:describe", 405),  # no such verb: GET /v1/models/{name}
    ]:
        response = getattr(client, method)(url)
        assert response.status_code == status, (url, response.text)
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]["message"]


def test_batch_histogram_counts_like_prometheus_histogram() -> None:
    """Two metrics bucketed in one pass (a row of values each) count each row as
    prometheus_client's own Histogram counts it, one value at a time."""
    values = np.concatenate([np.random.default_rng(0).lognormal(-2, 3, 1000), [0.01, 1e9]])
    rows = np.stack([values, values[::-1] * 3])
    mine, theirs = CollectorRegistry(), CollectorRegistry()
    ours = BatchHistogram([("h", "h"), ("g", "g")], ["model"], UNCERTAINTY_BUCKETS, mine)
    reference = {
        name: Histogram(name, name, ["model"], buckets=UNCERTAINTY_BUCKETS, registry=theirs)
        for name in ("h", "g")
    }
    ours.observe(("m",), rows[:, :600])
    ours.observe(("m",), np.c_[rows[:, 600:], [math.nan, math.nan]])  # NaN is not counted
    for name, row in zip(("h", "g"), rows, strict=True):
        for value in row:
            reference[name].labels("m").observe(value)
    text, expected = generate_latest(mine).decode(), generate_latest(theirs).decode()
    for name, row in zip(("h", "g"), rows, strict=True):
        for le in [*map(floatToGoString, UNCERTAINTY_BUCKETS), "+Inf"]:
            got = metric_value(text, f"{name}_bucket", model="m", le=le)
            assert got == metric_value(expected, f"{name}_bucket", model="m", le=le) > 0, le
        assert metric_value(text, f"{name}_count", model="m") == len(values)
        assert metric_value(text, f"{name}_sum", model="m") == pytest.approx(row.sum(), rel=1e-12)


def test_predict_paths_take_only_post(client: Client) -> None:
    for method in ("get", "put", "delete"):
        for url in ("/v1/models/reg:predict", "/v1/models/reg/versions/1:predict"):
            response = client.portal.call(partial(client.client.request, method, url))
            assert response.status_code == 405, (method, url)
            assert response.headers["allow"] == "POST"
            assert response.json()["error"]["code"] == "method_not_allowed"


def test_a_client_that_leaves_before_its_body_gets_nothing_and_is_counted(
    client: Client,
) -> None:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/models/reg:predict", "headers": []}
    client.portal.call(client.app, scope, receive, send)
    assert sent == []  # nothing to answer, and nothing queued
    text = client.get("/metrics").text
    assert metric_value(text, "credence_requests_total", **NATIVE, code="499") == 1
    assert (
        metric_value(text, "credence_request_failures_total", **NATIVE, reason="client_gone") == 1
    )


def test_not_ready_without_models(tmp_path: Path) -> None:
    with serve(make_settings(tmp_path)) as empty:
        assert empty.get("/healthz").status_code == 200
        assert empty.get("/readyz").status_code == 503
        assert empty.get("/v1/models").json() == {"models": []}


def test_serving_keeps_the_cycle_collector_off_the_request_path(tmp_path: Path) -> None:
    before = gc.get_threshold()
    with serve(make_settings(tmp_path)) as empty:
        assert gc.get_threshold()[0] == 50_000  # a young generation a request cannot fill
        assert gc.get_freeze_count() > 0  # startup objects are never walked again
        assert empty.get("/healthz").status_code == 200
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
