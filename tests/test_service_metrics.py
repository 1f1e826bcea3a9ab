"""The operator's series move as they should: every predict request counted once, under its
protocol, a failure under its reason whichever layer refused it; queue waits, draws and
uncertainty per request or prediction that reached a batch; load failures per version."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import make_settings, metric_value, serve

ROW = [0.0, 1.0, 2.0]
V2_ROW = {"name": "input", "shape": [1, 3], "datatype": "FP32", "data": ROW}


def series(text: str, name: str) -> dict[str, float]:
    """Every sample of one series in Prometheus text, keyed by its label text."""
    found = re.findall(rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE)
    return {labels: float(value) for labels, value in found}


def test_failures_are_counted_by_model_protocol_and_reason(model_dir: Path) -> None:
    settings = make_settings(model_dir, max_body_bytes=2000, max_instances=4)
    big = {"instances": [ROW] * 200}  # over 2000 bytes: refused from its Content-Length
    with serve(settings) as live:
        answers = {
            "ok": live.post("/v1/models/reg:predict", json={"instances": [ROW]}),
            "too_large": live.post("/v1/models/reg:predict", json=big),
            "v2_too_large": live.post("/v2/models/reg/infer", content=b" " * 2001),
            "too_many": live.post("/v1/models/reg:predict", json={"instances": [ROW] * 5}),
            "bad": live.post("/v1/models/reg:predict", json={"instances": [["x", 1, 2]]}),
            "v2_bad": live.post("/v2/models/reg/infer", json={"inputs": []}),
            "media": live.post(
                "/v1/models/reg:predict", content=b"{}", headers={"content-type": "text/plain"}
            ),
            "unknown": live.post("/v1/models/nope:predict", json={"instances": [ROW]}),
            "no_version": live.post("/v1/models/reg/versions/9:predict", json={}),
            "failed": live.post("/v1/models/broken:predict", json={"instances": [ROW]}),
            "get": live.get("/v1/models/reg:predict"),
            "v2_ok": live.post("/v2/models/reg/infer", json={"inputs": [V2_ROW]}),
        }
        text = live.get("/metrics").text
    statuses = {key: answer.status_code for key, answer in answers.items()}
    assert statuses == {
        **{"ok": 200, "too_large": 413, "v2_too_large": 413, "too_many": 422, "bad": 422},
        **{"v2_bad": 400, "media": 415, "unknown": 404, "no_version": 404, "failed": 503},
        **{"get": 405, "v2_ok": 200},
    }

    def failed(reason: str, protocol: str = "native", model: str = "reg", version: str = "1"):
        labels = {"model": model, "version": version, "protocol": protocol, "reason": reason}
        return metric_value(text, "credence_request_failures_total", **labels)

    assert failed("too_large") == 2  # a body over max_body_bytes, rows over max_instances
    assert failed("too_large", "v2") == 1
    assert failed("bad_request") == 1 and failed("bad_request", "v2") == 1
    assert failed("unsupported_media_type") == 1
    assert failed("method_not_allowed") == 1  # refused by the gateway, counted all the same
    assert failed("not_found", model="(unknown)", version="") == 1  # no label per bad name
    assert failed("not_found", version="") == 1
    assert failed("unavailable", model="broken", version="") == 1
    native = {"model": "reg", "version": "1", "protocol": "native"}
    assert metric_value(text, "credence_requests_total", **native, code="413") == 1
    assert metric_value(text, "credence_requests_total", **native, code="200") == 1
    v2 = {**native, "protocol": "v2"}
    assert metric_value(text, "credence_requests_total", **v2, code="200") == 1
    # every request counted once: the failures are the requests answered with an error
    requests = series(text, "credence_requests_total")
    errors = sum(v for labels, v in requests.items() if not re.search(r'code="2\d\d"', labels))
    assert sum(requests.values()) == len(answers)
    assert sum(series(text, "credence_request_failures_total").values()) == errors == 10
    latencies = sum(series(text, "credence_request_duration_seconds_count").values())
    assert latencies == len(answers)


def test_an_unauthorized_predict_is_counted_under_its_protocol(model_dir: Path) -> None:
    with serve(make_settings(model_dir, api_keys="alpha")) as live:
        assert live.post("/v1/models/reg:predict", json={"instances": [ROW]}).status_code == 401
        assert live.post("/v2/models/reg/infer", json={"inputs": [V2_ROW]}).status_code == 401
        key = {"authorization": "Bearer alpha"}
        text = live.get("/metrics", headers=key).text
    for protocol in ("native", "v2"):
        labels = {"model": "reg", "version": "1", "protocol": protocol}
        failures = metric_value(
            text, "credence_request_failures_total", **labels, reason="unauthorized"
        )
        assert failures == 1
        assert metric_value(text, "credence_requests_total", **labels, code="401") == 1


def test_queue_waits_draws_and_uncertainty_follow_the_served_requests(model_dir: Path) -> None:
    calls = [
        ("/v1/models/reg:predict", {"instances": [ROW] * rows, "parameters": {"num_samples": n}})
        for rows, n in ((1, 10), (2, 20), (3, 30))
    ]
    calls.append(("/v1/models/clf:predict", {"instances": [[0.0] * 4] * 2}))  # default 40
    v2 = {"inputs": [V2_ROW], "parameters": {"num_samples": 5}}
    with serve(make_settings(model_dir, max_batch_delay_ms=20)) as live:
        answers = live.gather(*calls, ("/v2/models/reg/infer", v2))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        text = live.get("/metrics").text
    reg, clf = {"model": "reg", "version": "1"}, {"model": "clf", "version": "1"}
    served = sum(v for k, v in series(text, "credence_requests_total").items() if "reg" in k)
    assert metric_value(text, "credence_queue_wait_seconds_count", **reg) == served == 4
    assert metric_value(text, "credence_queue_wait_seconds_count", **clf) == 1
    assert 0 < metric_value(text, "credence_queue_wait_seconds_sum", **reg) < 10
    assert metric_value(text, "credence_request_samples_count", **reg) == 4
    assert metric_value(text, "credence_request_samples_sum", **reg) == 10 + 20 + 30 + 5
    assert metric_value(text, "credence_request_samples_sum", **clf) == 40
    drawn = 1 * 10 + 2 * 20 + 3 * 30 + 1 * 5  # num_samples per instance
    assert metric_value(text, "credence_samples_drawn_total", **reg) == drawn
    assert metric_value(text, "credence_samples_drawn_total", **clf) == 2 * 40
    for kind in ("epistemic", "aleatoric", "predictive"):  # one value per prediction
        count = f"credence_{kind}_uncertainty_count"
        assert metric_value(text, count, **reg) == 7, kind
        assert metric_value(text, count, **clf) == 2, kind  # an entropy per row
        assert metric_value(text, f"credence_{kind}_uncertainty_sum", **clf) > 0, kind
    assert metric_value(text, "credence_predictions_total", **reg) == 7


def test_each_version_that_failed_to_load_is_counted(client) -> None:
    text = client.get("/metrics").text
    failures = series(text, "credence_model_load_failures_total")
    assert failures == {'{model="broken",version="1"}': 1, '{model="twin",version="2"}': 1}
    assert metric_value(text, "credence_model_versions", state="failed") == 2
