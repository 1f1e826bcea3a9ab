"""Bounds on what a client can make the server hold: body size, content type."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest
from conftest import listening, make_settings, metric_value, serve

URL = "/v1/models/reg:predict"
BODY = b'{"instances": [[0.0, 1.0, 2.0]]}'


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(model_dir: Path):
    """The server answers 413 from the headers alone: the client never sends the body."""
    with listening(make_settings(model_dir, max_body_bytes=1000)) as address:
        host, port = address.split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                f"POST {URL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                "Content-Length: 1000000000\r\n\r\n".encode()
            )
            answer = sock.recv(65536).decode()
        metrics = httpx.get(f"http://{address}/metrics", timeout=10).text
    assert answer.startswith("HTTP/1.1 413"), answer
    assert "over the server's limit of 1000 bytes" in answer
    labels = {"model": "reg", "version": "1", "protocol": "native"}
    assert metric_value(metrics, "credence_requests_total", **labels, code="413") == 1
    assert (
        metric_value(metrics, "credence_request_failures_total", **labels, reason="too_large") == 1
    )


def test_a_chunked_body_is_refused_once_it_passes_the_limit(model_dir: Path):
    def chunks():
        yield b'{"instances": ['
        for _ in range(100):
            yield b"[0.0, 1.0, 2.0],"
        yield b"[0.0, 1.0, 2.0]]}"

    with listening(make_settings(model_dir, max_body_bytes=500)) as address:
        with httpx.Client(base_url=f"http://{address}", timeout=10) as http:
            refused = http.post(URL, content=chunks())  # no Content-Length: chunked
        with httpx.Client(base_url=f"http://{address}", timeout=10) as http:
            v2 = http.post("/v2/models/reg/infer", content=b" " * 501)
            fine = http.post(URL, content=BODY)
            metrics = http.get("/metrics").text
    for protocol in ("native", "v2"):  # counted once the body passed the limit
        labels = {"model": "reg", "version": "1", "protocol": protocol, "reason": "too_large"}
        assert metric_value(metrics, "credence_request_failures_total", **labels) == 1, protocol
    assert refused.status_code == 413 and refused.json()["error"]["code"] == "body_too_large"
    assert v2.status_code == 413 and "limit of 500 bytes" in v2.json()["error"]
    assert fine.status_code == 200


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        (None, 200),
        ("application/json", 200),
        ("application/json; charset=utf-8", 200),
        ("application/vnd.credence+json", 200),
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),  # what curl -d sends by default
    ],
)
def test_a_body_declared_as_anything_but_json_is_415(
    client, content_type: str | None, status: int
) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    response = client.post(URL, content=BODY, headers=headers)
    assert response.status_code == status, response.text
    if status == 415:
        error = response.json()["error"]
        assert error["location"] == ["headers", "content-type"]
        assert content_type in error["message"] and "application/json" in error["message"]


def test_a_client_deadline_shortens_the_servers_and_its_work_is_dropped(model_dir: Path):
    """While a batch waits 1 s for company, a request with timeout_ms 100 (and a V2 one with
    Triton's timeout of 100,000 us) gets its 504 then, and the batch computes only the
    patient request's row."""
    patient = {"instances": [[0.0, 1.0, 2.0]], "parameters": {"seed": 1}}
    hasty = {"instances": [[1.0, 1.0, 1.0]] * 5, "parameters": {"timeout_ms": 100}}
    v2 = {
        "inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [0, 0, 0]}],
        "parameters": {"timeout": 100_000},
    }
    with serve(make_settings(model_dir, max_batch_delay_ms=1000)) as live:
        started = time.monotonic()
        answers = live.gather((URL, patient), (URL, hasty), ("/v2/models/reg/infer", v2))
        elapsed = time.monotonic() - started
        metrics = live.get("/metrics").text
    reg = {"model": "reg", "version": "1"}
    rows = metric_value(metrics, "credence_batch_rows_sum", **reg)
    for protocol in ("native", "v2"):
        labels = {**reg, "protocol": protocol, "reason": "timeout"}
        assert metric_value(metrics, "credence_request_failures_total", **labels) == 1, protocol
    # only the patient request reached its batch: the others' deadlines passed first
    assert metric_value(metrics, "credence_queue_wait_seconds_count", **reg) == 1
    assert [a.status_code for a in answers] == [200, 504, 504]
    assert "deadline of 0.1 s" in answers[1].json()["error"]["message"]
    assert "deadline of 0.1 s" in answers[2].json()["error"]
    assert elapsed >= 1.0  # the patient one waited for its batch
    assert rows == 1


@pytest.mark.parametrize("value", [0, -5, "soon", None])
def test_a_bad_client_deadline_is_422(client, value: object) -> None:
    body = {"instances": [[0.0, 1.0, 2.0]], "parameters": {"timeout_ms": value}}
    response = client.post(URL, json=body)
    if value is None:  # null: no deadline of the client's
        assert response.status_code == 200
    else:
        assert response.status_code == 422
        assert "timeout_ms must be a positive number of milliseconds" in response.text
