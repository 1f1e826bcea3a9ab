"""Configuration (CREDENCE_* variables, flags on top) and the real `credence-serve` server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from conftest import free_port, metric_value
from pydantic import ValidationError

from service.cli import load_settings, main
from service.settings import Settings, resolve_device


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CREDENCE_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("CREDENCE_PORT", "8500")
    monkeypatch.setenv("CREDENCE_MAX_QUEUE", "7")
    monkeypatch.setenv("CREDENCE_MAX_BATCH_DELAY_MS", "0.5")
    monkeypatch.setenv("CREDENCE_DEVICE", "CPU")
    monkeypatch.setenv("CREDENCE_LOG_LEVEL", "DEBUG")
    settings = Settings()
    assert settings.model_dir == tmp_path and settings.port == 8500
    assert (settings.max_queue, settings.max_batch_delay_ms) == (7, 0.5)
    assert (settings.device, settings.log_level) == ("cpu", "debug")


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDENCE_PORT", "8500")
    monkeypatch.setenv("CREDENCE_MAX_QUEUE", "7")
    settings = load_settings(["--port", "9001", "--model-dir", "elsewhere", "--device", "cpu"])
    assert settings.port == 9001  # the flag wins
    assert settings.max_queue == 7  # no flag: the environment stays
    assert settings.model_dir == Path("elsewhere") and settings.device == "cpu"
    assert not settings.access_log and load_settings(["--access-log", "true"]).access_log


@pytest.mark.parametrize(
    "values",
    [
        {"device": "gpu"},
        {"device": "cuda:x"},
        {"port": 70000},
        {"max_batch_rows": 0},
        {"default_num_samples": 2000, "max_num_samples": 1000},
        {"log_level": "loud"},
    ],
)
def test_invalid_settings_are_refused(values: dict) -> None:
    with pytest.raises(ValidationError):
        Settings(**values)


def test_invalid_flags_exit_with_a_message(capsys: pytest.CaptureFixture) -> None:
    assert main(["--device", "tpu"]) == 2
    assert "device must be auto, cpu, cuda" in capsys.readouterr().err


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


def serve_command() -> list[str]:
    script = shutil.which("credence-serve", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "service.cli"]


def start_server(model_dir: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """A real credence-serve on a free port, once it is ready, and its base URL."""
    port = free_port()
    env = {**os.environ, "CREDENCE_LOG_LEVEL": "info", "CREDENCE_MODEL_DIR": "/nonexistent"}
    command = [*serve_command(), "--model-dir", str(model_dir), "--port", str(port)]
    server = subprocess.Popen(
        [*command, "--device", "cpu", "--torch-threads", "1", *flags],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert server.poll() is None, server.stdout.read()
        try:
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                return server, base
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.1)


def test_sigterm_drains_every_accepted_request_then_exits_0(model_dir: Path) -> None:
    """Requests queued behind a long batch delay when SIGTERM comes all get their answers
    (counted by the client), and the drained server exits 0 within its grace period."""
    flags = ("--max-batch-delay-ms", "2500", "--shutdown-grace-s", "20")
    server, base = start_server(model_dir, *flags)
    body = {"instances": [[0.0, 1.0, 2.0]], "parameters": {"seed": 3}}

    def post(_: int) -> int:
        with httpx.Client(base_url=base, timeout=30) as http:
            return http.post("/v1/models/reg:predict", json=body).status_code

    try:
        with ThreadPoolExecutor(16) as pool:
            answers = [pool.submit(post, i) for i in range(16)]
            time.sleep(1.2)  # all sent, all waiting for the batch to close at 2.5 s
            assert not any(a.done() for a in answers)
            server.send_signal(signal.SIGTERM)
            statuses = [a.result() for a in answers]
        output, _ = server.communicate(timeout=20)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert statuses == [200] * 16
    assert server.returncode == 0, output
    assert "Application shutdown complete" in output


def test_sigterm_under_load_answers_every_request_it_accepted(model_dir: Path) -> None:
    """Eight clients post in a loop on kept-alive connections when SIGTERM comes. Counted on
    the client side: every answer is a 200 (none is a 503 or a 5xx); every request sent well
    before the signal, so certainly read by the server, is answered; the only other outcome
    is a connection refused or closed unanswered, after the signal, by a server that had
    not read it. The server's access log shows as many 200s as the clients got, and the
    server exits 0 within its grace period."""
    flags = ("--max-batch-delay-ms", "100", "--shutdown-grace-s", "20", "--access-log", "true")
    server, base = start_server(model_dir, *flags)
    body = {"instances": [[0.0, 1.0, 2.0]], "parameters": {"num_samples": 50}}
    outcomes: list[tuple[float, float, int | str]] = []  # (sent, done, status or what failed)
    lock, stop = threading.Lock(), threading.Event()

    def client() -> None:
        with httpx.Client(base_url=base, timeout=30) as http:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    outcome: int | str = http.post("/v1/models/reg:predict", json=body).status_code
                except httpx.ConnectError:
                    outcome = "refused"
                except (httpx.RemoteProtocolError, httpx.ReadError):
                    outcome = "closed unanswered"
                with lock:
                    outcomes.append((sent, time.monotonic(), outcome))
                if outcome == "refused":  # the server stopped listening: this client stops
                    return

    threads = [threading.Thread(target=client) for _ in range(8)]
    try:
        for thread in threads:
            thread.start()
        while len(outcomes) < 40:  # every client connected and answered
            time.sleep(0.05)
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
        exited = time.monotonic() - signalled
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        if server.poll() is None:
            server.kill()
            server.communicate()
    answered = [status for _, _, status in outcomes if isinstance(status, int)]
    in_flight = [s for sent, done, s in outcomes if sent < signalled < done and s == 200]
    assert set(answered) == {200}, outcomes
    assert all(s == 200 for sent, _, s in outcomes if sent < signalled - 0.5), outcomes
    assert all(sent > signalled - 0.5 for sent, _, s in outcomes if not isinstance(s, int))
    assert in_flight  # requests were waiting when it came, and were answered
    assert server.returncode == 0 and exited < 20, output
    assert output.count('/v1/models/reg:predict HTTP/1.1" 200') == len(answered)


def test_real_server_end_to_end(model_dir: Path) -> None:
    server, base = start_server(model_dir)
    try:
        with httpx.Client(base_url=base, timeout=10) as http:
            body = {"instances": [[0.0, 1.0, 2.0]], "parameters": {"seed": 3}}
            response = http.post("/v1/models/reg:predict", json=body)
            assert response.status_code == 200, response.text
            assert response.json()["predictions"][0]["mean"]
            bad = http.post("/v1/models/reg:predict", content=b'{"instances": [[1, NaN, 2]]}')
            assert bad.status_code == 422 and "NaN" in bad.json()["error"]["message"]
            metrics = http.get("/metrics")
            assert metrics.headers["content-type"].startswith("text/plain")
            labels = {"model": "reg", "version": "1"}
            native = {**labels, "protocol": "native"}
            assert metric_value(metrics.text, "credence_requests_total", **native, code="200") == 1
            assert metric_value(metrics.text, "credence_requests_total", **native, code="422") == 1
            assert metric_value(metrics.text, "credence_batch_rows_count", **labels) == 1
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            output, _ = server.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            output, _ = server.communicate()
    assert server.returncode == 0, output  # drained, then a clean exit
    assert "Application shutdown complete" in output
    assert "loaded reg v1 on cpu" in output and "refused twin v2" in output
    assert "POST /v1/models/reg:predict" not in output  # no access log unless asked for


def test_an_api_key_appears_in_no_log_line(model_dir: Path) -> None:
    """With the access log on and debug logging, right and wrong keys leave no trace."""
    key = "k3y-9f2c1e77"
    flags = ("--api-keys", key, "--access-log", "true", "--log-level", "debug")
    server, base = start_server(model_dir, *flags)
    try:
        with httpx.Client(base_url=base, timeout=10) as http:
            body = {"instances": [[0.0, 1.0, 2.0]]}
            right = {"authorization": f"Bearer {key}"}
            wrong = {"authorization": f"Bearer {key}x"}
            assert http.post("/v1/models/reg:predict", json=body, headers=right).is_success
            assert http.post("/v1/models/reg:predict", json=body, headers=wrong).status_code == 401
            assert http.get("/v1/models", headers=right).is_success
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=20)
    assert "POST /v1/models/reg:predict" in output  # the access log did run
    assert key not in output
