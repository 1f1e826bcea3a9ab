"""The provisioned Grafana dashboard's panels, drawn from a real Prometheus scraping Credence.

Grafana is not packaged in the registries this project installs from, so this draws the
dashboard itself: every panel of deploy/grafana/dashboards/credence.json at its grid
position, with its title, unit and legend format, each target's PromQL evaluated by a real
Prometheus (Debian's package) over the run with `query_range`. A change to the dashboard
file shows in the picture, and a query Prometheus refuses stops the run.

The traffic, from a few client threads at a fixed total rate, on the demo models trained by
credence-train into a temporary folder (toy:sine-gap, a regressor, and toy:moons, a
classifier): in-distribution native and V2 requests and a few malformed ones throughout;
in the middle third, a share of sine-gap requests far from its data (the OOD flag rate
climbs past its validation baseline, the epistemic quantiles with it) and a faster rate.

    .venv/bin/python benchmarks/dashboard.py [--minutes 4] [--rate 60]

Writes docs/results/dashboard.png and docs/results/dashboard.md (--out NAME.png).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import serve
from machine import machine_line, machine_record, write_report

from training.data import moons_sample

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "credence.json"
SCRAPE_S = 2
THREADS = 4
OOD_SHARE = 0.4  # of sine-gap requests in the middle third
UNITS = {"reqps": "req/s", "percentunit": "%", "s": "s", "short": ""}
MOONS = moons_sample(1000, seed=7)[0]  # fresh points from the moons' own distribution


def train_demo(folder: Path) -> None:
    exe = Path(sys.executable).with_name("credence-train")
    for name in ("sine-gap", "moons"):
        command = [str(exe), "--data", f"toy:{name}", "--name", name, "--out", str(folder)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def post(base: str, path: str, body: dict | bytes) -> int:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        base + path, data, {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as refused:
        return refused.code


def one_request(base: str, rng: random.Random, ood_phase: bool) -> int:
    """One request of the mix: 45% sine-gap, 35% moons, 12% V2, 8% malformed."""
    u = rng.random()
    seed = rng.randrange(2**31)
    if u < 0.45:
        far = ood_phase and rng.random() < OOD_SHARE
        x = rng.uniform(-0.8, 0.8) if far else rng.choice((-1, 1)) * rng.uniform(1.0, 3.0)
        body = {"instances": [[x]], "parameters": {"num_samples": 100, "seed": seed}}
        return post(base, "/v1/models/sine-gap:predict", body)
    if u < 0.80:
        point = MOONS[rng.randrange(len(MOONS))].tolist()
        body = {"instances": [point], "parameters": {"num_samples": 64, "seed": seed}}
        return post(base, "/v1/models/moons:predict", body)
    if u < 0.92:
        x = rng.choice((-1, 1)) * rng.uniform(1.0, 3.0)
        tensor = {"name": "input", "datatype": "FP32", "shape": [1, 1], "data": [x]}
        body = {"inputs": [tensor], "parameters": {"num_samples": 100, "seed": seed}}
        return post(base, "/v2/models/sine-gap/infer", body)
    if u < 0.96:
        return post(base, "/v1/models/sine-gap:predict", {"instances": [["two"]]})
    return post(base, "/v1/models/moons:predict", b'{"instances": [[0.1, 0.2]')


def drive(base: str, seconds: float, rate: float) -> dict[int, int]:
    """THREADS client threads at `rate` requests/s in all (twice that in the middle
    third); returns the count of each status code."""
    codes: dict[int, int] = {}
    lock = threading.Lock()
    start = time.monotonic()

    def client(index: int) -> None:
        rng = random.Random(index)
        next_at = start
        while (now := time.monotonic()) - start < seconds:
            middle = seconds / 3 <= now - start < 2 * seconds / 3
            code = one_request(base, rng, middle)
            with lock:
                codes[code] = codes.get(code, 0) + 1
            next_at += rng.expovariate(rate * (2 if middle else 1) / THREADS)
            time.sleep(max(0.0, next_at - time.monotonic()))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return codes


def query_range(port: int, expr: str, start: float, end: float) -> list[dict]:
    params = {"query": expr, "start": start, "end": end, "step": SCRAPE_S}
    url = f"http://127.0.0.1:{port}/api/v1/query_range?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as refused:
        raise SystemExit(f"prometheus refused {expr!r}: {refused.read()!r}") from None
    return answer["data"]["result"]


def legend(labels: dict[str, str], form: str | None) -> str:
    """Grafana's legend: the target's legendFormat with {{label}} filled in, else the
    series' label set."""
    if form:
        for key, value in labels.items():
            form = form.replace("{{" + key + "}}", value)
        return form
    return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def draw(panels: list[dict], series: dict[int, list[list]], start: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, PercentFormatter

    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(16, rows * 0.36))
    fig.patch.set_facecolor("#181b1f")
    for panel in panels:
        g = panel["gridPos"]
        # grid units -> figure fractions, leaving room for the title and the axis labels
        left, width = (g["x"] + 0.9) / 24, (g["w"] - 1.3) / 24
        bottom, height = 1 - (g["y"] + g["h"] - 0.9) / rows, (g["h"] - 2.0) / rows
        ax = fig.add_axes((left, bottom, width, height), facecolor="#111217")
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        for target, results in series[panel["id"]]:
            for result in results:
                t = [float(v[0]) - start for v in result["values"]]
                y = [float(v[1]) for v in result["values"]]
                if any(math.isfinite(v) for v in y):
                    name = legend(result["metric"], target.get("legendFormat"))
                    ax.plot(t, y, lw=1.2, label=name)
        ax.set_title(panel["title"], color="#ccccdc", fontsize=10, loc="left")
        ax.tick_params(colors="#9fa7b3", labelsize=7)
        for spine in ax.spines.values():
            spine.set_color("#2c3235")
        ax.grid(color="#2c3235", lw=0.5)
        ax.set_xlabel("seconds into the run", color="#9fa7b3", fontsize=7)
        if unit == "percentunit":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        elif unit == "s":
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v * 1000:g} ms"))
        elif UNITS.get(unit):
            ax.set_ylabel(UNITS[unit], color="#9fa7b3", fontsize=7)
        if ax.lines:
            ax.legend(fontsize=7, loc="upper left", framealpha=0.3, labelcolor="#ccccdc")
        else:
            ax.text(0.5, 0.5, "no data", color="#9fa7b3", ha="center", transform=ax.transAxes)
    fig.savefig(path, dpi=80, facecolor=fig.get_facecolor())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--rate", type=float, default=60.0, help="requests/s outside the burst")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "dashboard.png"))
    args = parser.parse_args()
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        raise SystemExit("needs Prometheus on PATH (apt-get install prometheus)")
    panels = json.loads(DASHBOARD.read_text())["panels"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        models, port, prom_port = Path(tmp) / "models", serve.free_port(), serve.free_port()
        train_demo(models)
        command = [str(Path(sys.executable).with_name("credence-serve")), "--model-dir"]
        command += [str(models), "--host", serve.HOST, "--port", str(port)]
        server = subprocess.Popen([*command, "--log-level", "warning"])
        config = Path(tmp) / "prometheus.yml"
        config.write_text(
            f"global:\n  scrape_interval: {SCRAPE_S}s\n"
            "scrape_configs:\n  - job_name: credence\n"
            f"    static_configs:\n      - targets: ['{serve.HOST}:{port}']\n"
        )
        scraper = subprocess.Popen(
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={Path(tmp) / 'data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            serve.wait_ready(server, port)
            start = time.time()
            codes = drive(f"http://{serve.HOST}:{port}", args.minutes * 60, args.rate)
            time.sleep(2 * SCRAPE_S)  # the last requests scraped
            end = time.time()
            series = {
                p["id"]: [(t, query_range(prom_port, t["expr"], start, end)) for t in p["targets"]]
                for p in panels
            }
        finally:
            serve.stop(server)
            scraper.terminate()
            scraper.wait(timeout=20)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw(panels, series, start, out)
    seconds = time.perf_counter() - started
    report(out, args, codes, seconds)


def report(out: Path, args: argparse.Namespace, codes: dict[int, int], seconds: float) -> None:
    counts = ", ".join(f"{code}: {n}" for code, n in sorted(codes.items()))
    text = f"""# The Grafana dashboard, drawn from a live Prometheus

Every panel of `deploy/grafana/dashboards/credence.json` at its place in the grid, each of
its queries evaluated by a real Prometheus scraping Credence every {SCRAPE_S} s, drawn by
`benchmarks/dashboard.py` (Grafana itself is not in the registries this project installs
from; the picture is this script's drawing of the dashboard's own queries, not Grafana's).

Traffic: {args.minutes:g} minutes from {THREADS} client threads, {args.rate:g} requests/s
(twice that in the middle third), on the demo models (`sine-gap`, `moons`): native and V2
predictions and malformed requests throughout; in the middle third {OOD_SHARE:.0%} of
`sine-gap` requests fall inside its gap, far from its data, so the OOD flag rate climbs
above its validation baseline. Answers by status: {counts}.

![dashboard]({out.name})

"""
    write_report(
        out.with_suffix(".md"),
        text,
        table=f"answers by status: {counts}",
        command=".venv/bin/python " + " ".join(sys.argv),
        machine=machine_line(machine_record(), 1),
        advice="the curves' shapes are the result, their levels a guide.",
        seconds=seconds,
    )


if __name__ == "__main__":
    main()
