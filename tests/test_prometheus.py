"""Operators' view: a real Prometheus server scrapes Credence on loopback and answers queries
for the request count, a latency quantile and the uncertainty histogram; promtool accepts
the metrics text, the alert rules, and the rules' own unit tests (deploy/prometheus/)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, listening, make_settings, metric_value

from training import cli

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool") or "promtool"
PROMETHEUS = shutil.which("prometheus") or "prometheus"


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prometheus")
    argv = ["--data", "toy:sine-gap", "--epochs", "20", "--out", str(root), "--name", "sg"]
    assert cli.main([*argv, "--quiet"]) == 0
    return root


def test_promtool_accepts_the_alert_rules_and_their_unit_tests():
    for command in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]):
        done = subprocess.run([PROMTOOL, *command], cwd=DEPLOY, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run(
        [PROMTOOL, "check", "config", "prometheus.yml"], cwd=DEPLOY, capture_output=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_scrapes_counts_latency_and_uncertainty(model_dir: Path, tmp_path: Path):
    with listening(make_settings(model_dir)) as address:
        base = f"http://{address}"
        for seed in range(20):  # ten in the data, ten far from it
            x = [[2.0 if seed < 10 else 8.0]]
            _post(f"{base}/v1/models/sg:predict", {"instances": x, "parameters": {"seed": seed}})
        text = _get(f"{base}/metrics")
        lint = subprocess.run(
            [PROMTOOL, "check", "metrics"], input=text, capture_output=True, check=False
        )
        assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout + lint.stderr
        page = text.decode()
        described = {"model": "sg", "version": "1", "method": "mc_dropout"}
        described |= {"architecture": "mlp", "backend": "torch", "device": "cpu"}
        assert metric_value(page, "credence_model_info", **described, precision="float32") == 1
        assert metric_value(page, "credence_ood_reference_fpr", model="sg", version="1") == 0.05
        assert metric_value(page, "credence_predictions_total", model="sg", version="1") == 20
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n"
            "scrape_configs:\n  - job_name: credence\n"
            f"    static_configs:\n      - targets: ['{address}']\n"
        )
        server = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            results = _query_until_scraped(port, server)
        finally:
            server.terminate()
            server.wait(timeout=20)
    assert results["requests"] == 20
    assert 0 < results["p90"] < 30  # seconds: a latency bucket's bound, not a placeholder
    assert results["uncertainty_count"] == 20  # one epistemic std per prediction
    assert results["flagged"] >= 10  # every point far from the data


def _query_until_scraped(port: int, server: subprocess.Popen) -> dict[str, float]:
    queries = {
        "requests": 'sum(credence_requests_total{model="sg",code="200"})',
        "p90": "histogram_quantile(0.9, sum by (le) (credence_request_seconds_bucket))",
        "uncertainty_count": 'sum(credence_epistemic_uncertainty_count{model="sg"})',
        "flagged": 'sum(credence_ood_predictions_total{model="sg"})',
    }
    deadline = time.monotonic() + 60
    while True:
        assert server.poll() is None, "prometheus exited"
        assert time.monotonic() < deadline, "prometheus did not scrape credence in 60 s"
        try:
            values = {}
            for name, query in queries.items():
                url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode(
                    {"query": query}
                )
                result = json.loads(_get(url))["data"]["result"]
                if result:
                    values[name] = float(result[0]["value"][1])
            if len(values) == len(queries):
                return values
        except OSError:  # not listening yet
            pass
        time.sleep(0.5)
