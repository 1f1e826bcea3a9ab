"""Operators' view: a real Prometheus server scrapes Credence on loopback and answers queries
for the request count, a latency quantile and the uncertainty histogram, and every query of
the Grafana dashboard (deploy/grafana/); promtool accepts the metrics text, the alert rules,
and the rules' own unit tests (deploy/prometheus/)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import free_port, listening, make_settings, metric_value

from training import cli

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "credence.json"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
# panels that may be empty on healthy traffic: the 5xx ratio has no 5xx series to divide
MAY_BE_EMPTY = {"Error ratio (5xx)"}
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
    """ "sg", and "broken": a copy of it whose weights no longer match their hash."""
    root = tmp_path_factory.mktemp("prometheus")
    argv = ["--data", "toy:sine-gap", "--epochs", "20", "--out", str(root), "--name", "sg"]
    assert cli.main([*argv, "--quiet"]) == 0
    shutil.copytree(root / "sg", root / "broken")
    with (root / "broken" / "1" / "weights.safetensors").open("ab") as weights:
        weights.write(b"\0")
    return root


def test_promtool_accepts_the_alert_rules_and_their_unit_tests():
    for command in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]):
        done = subprocess.run([PROMTOOL, *command], cwd=DEPLOY, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run(
        [PROMTOOL, "check", "config", "prometheus.yml"], cwd=DEPLOY, capture_output=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_dashboard_panel_uses_the_provisioned_datasource():
    provisioned = {d["uid"] for d in yaml.safe_load(DATASOURCES.read_text())["datasources"]}
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert panels
    for panel in panels:
        sources = [panel["datasource"], *(t["datasource"] for t in panel["targets"])]
        assert all(s["uid"] in provisioned for s in sources), (panel["title"], sources)


def _traffic(base: str) -> None:
    """One round: ten native predictions in the data and ten far from it, two V2 ones, and
    one malformed request; the native ones draw 64 samples each, the V2 ones 32."""
    for seed in range(20):
        x = [[2.0 if seed < 10 else 8.0]]
        _post(
            f"{base}/v1/models/sg:predict",
            {"instances": x, "parameters": {"seed": seed, "num_samples": 64}},
        )
    for seed in range(2):
        tensor = {"name": "input", "datatype": "FP32", "shape": [1, 1], "data": [2.0]}
        body = {"inputs": [tensor], "parameters": {"seed": seed, "num_samples": 32}}
        _post(f"{base}/v2/models/sg/infer", body)
    with pytest.raises(urllib.error.HTTPError) as refused:
        _post(f"{base}/v1/models/sg:predict", {"instances": [["two"]]})
    assert refused.value.code == 422


def test_prometheus_scrapes_counts_latency_uncertainty_and_the_dashboard(
    model_dir: Path, tmp_path: Path
):
    with listening(make_settings(model_dir)) as address:
        base = f"http://{address}"
        _traffic(base)  # every series exists before the first scrape: rates see round two
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
        assert metric_value(page, "credence_predictions_total", model="sg", version="1") == 22
        failed = {"model": "broken", "version": "1"}
        assert metric_value(page, "credence_model_load_failures_total", **failed) == 1
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
            scraped = {"requests": 'sum(credence_requests_total{model="sg",code="200"})'}
            _query_until(port, server, lambda got: got["requests"] == [22], scraped)
            _traffic(base)
            results = _query_until(port, server, _all_in, QUERIES | _dashboard_queries())
        finally:
            server.terminate()
            server.wait(timeout=20)
    assert results["native"] == 40 and results["v2"] == 4
    assert results["bad_request"] == 2
    assert 0 < results["p90"] < 30  # seconds: a latency bucket's bound, not a placeholder
    assert results["uncertainty_count"] == 44  # one epistemic std per prediction
    assert results["queue_waits"] == 44  # one wait per request that reached a batch
    assert results["draws"] == results["samples_asked"] == 40 * 64 + 4 * 32
    assert results["flagged"] >= 20  # every point far from the data


QUERIES = {
    "native": 'sum(credence_requests_total{model="sg",protocol="native",code="200"})',
    "v2": 'sum(credence_requests_total{model="sg",protocol="v2",code="200"})',
    "bad_request": 'sum(credence_request_failures_total{model="sg",reason="bad_request"})',
    "p90": "histogram_quantile(0.9, sum by (le) (credence_request_duration_seconds_bucket))",
    "uncertainty_count": 'sum(credence_epistemic_uncertainty_count{model="sg"})',
    "queue_waits": 'sum(credence_queue_wait_seconds_count{model="sg"})',
    "draws": 'sum(credence_samples_drawn_total{model="sg"})',
    "samples_asked": 'sum(credence_request_samples_sum{model="sg"})',
    "flagged": 'sum(credence_ood_predictions_total{model="sg"})',
}


def _dashboard_queries() -> dict[str, str]:
    """Every query of every panel of the dashboard, keyed "panel title #target"."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return {
        f"{panel['title']} #{i}": target["expr"]
        for panel in panels
        for i, target in enumerate(panel["targets"])
    }


def _all_in(got: dict[str, list[float]]) -> bool:
    """Round two was scraped, and every dashboard query but MAY_BE_EMPTY's has a number."""
    if got["native"] != [40] or got["queue_waits"] != [44]:
        return False
    return all(
        any(math.isfinite(v) for v in values)
        for key, values in got.items()
        if key.rsplit(" #", 1)[0] not in MAY_BE_EMPTY
    )


def _query_until(
    port: int,
    server: subprocess.Popen,
    done: Callable[[dict[str, list[float]]], bool],
    queries: dict[str, str],
) -> dict[str, float]:
    """Ask Prometheus `queries` every half second until `done` accepts the answers (each
    query's values); a query Prometheus refuses fails the test at once. Returns each
    query's first value."""
    deadline = time.monotonic() + 60
    got: dict[str, list[float]] = {}
    while True:
        assert server.poll() is None, "prometheus exited"
        assert time.monotonic() < deadline, f"prometheus did not answer in 60 s: {got}"
        try:
            got = {name: _query(port, query) for name, query in queries.items()}
        except urllib.error.HTTPError as refused:  # a bad query: 400 or 422, saying why
            raise AssertionError(f"prometheus refused a query: {refused.read()!r}") from None
        except OSError:  # not listening yet
            got = {}
        if got and done(got):
            return {name: values[0] for name, values in got.items() if values}
        time.sleep(0.5)


def _query(port: int, query: str) -> list[float]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    answer = json.loads(_get(url))
    assert answer["status"] == "success", (query, answer)
    return [float(series["value"][1]) for series in answer["data"]["result"]]
