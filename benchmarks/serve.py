"""Serving throughput and latency: Credence against a no-model ceiling and a naive server.

Builds the "small" MC-dropout regression checkpoint (13 -> 50 -> 1, untrained: timing does
not depend on the weights) in a temporary model dir, then, one server at a time on
127.0.0.1, starts in its own subprocess:

    credence  .venv/bin/credence-serve --model-dir DIR --port P --log-level warning
    ceiling   bare FastAPI + uvicorn (uvloop, httptools, no access log), same route, parses
              the JSON body and returns a precomputed body captured from Credence (no model)
    naive     FastAPI, the checkpoint loaded with read_checkpoint(...).build(), per request
              a Python loop of N single-draw `model.sample(x, 1, seed)` calls, mean/std in
              torch, pydantic request model and a sync route (threadpool), no batching

and drives each with the same closed-loop load generator (raw asyncio streams, HTTP/1.1
keep-alive, one connection per in-flight request) in a process of its own: C requests in
flight for a fixed window after a warm-up, one instance and num_samples=100 per request.

    .venv/bin/python benchmarks/serve.py [--quick]

Prints a markdown table and writes docs/results/serving.md and docs/results/serving.json.
The same file is also the ceiling/naive server (`--serve ceiling|naive --port P --model-dir
DIR`) and the load generator (`--loadgen --port P --concurrency C ...`).
"""

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HOST = "127.0.0.1"
MODEL = "small"
ROUTE = f"/v1/models/{MODEL}:predict"
NUM_SAMPLES = 100
IN_FEATURES = 13
SERVERS = ("credence", "ceiling", "naive")
START_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 30.0


# ----------------------------------------------------------------------------- checkpoint


def build_small(model_dir: Path) -> Path:
    from training.checkpoint import save_checkpoint
    from training.model import build_model

    config = {
        "method": "mc_dropout",
        "arch": {"in_features": IN_FEATURES, "hidden": [50], "dropout": 0.05},
        "likelihood": {"kind": "gaussian", "num_targets": 1, "noise": "homoscedastic"},
    }
    normalization = {
        "x_mean": [0.0] * IN_FEATURES,
        "x_std": [1.0] * IN_FEATURES,
        "y_mean": [0.0],
        "y_std": [1.0],
    }
    manifest = {
        "input": {"shape": [IN_FEATURES], "dtype": "float32", "feature_names": None},
        "output": {"names": ["y"]},
        "num_samples": {"default": NUM_SAMPLES, "max": 1000},
        "calibration": None,
    }
    return save_checkpoint(build_model(config, normalization), model_dir, MODEL, manifest)


# ----------------------------------------------------------------------------- servers


def ceiling_app(model_dir: Path):
    """No model: parse the body, return the precomputed Credence-sized body."""
    import orjson
    from fastapi import FastAPI, Request, Response

    body = (model_dir / "ceiling_response.json").read_bytes()
    app = FastAPI()

    @app.post("/v1/models/{name}:predict")
    async def predict(request: Request, name: str) -> Response:
        orjson.loads(await request.body())
        return Response(body, media_type="application/json")

    @app.get("/readyz")
    async def readyz() -> Response:
        return Response(b"{}", media_type="application/json")

    return app


def naive_app(model_dir: Path):
    """How tutorials serve MC dropout: one forward pass per draw, in a Python loop."""
    import torch
    from fastapi import FastAPI
    from pydantic import BaseModel

    from training.checkpoint import latest_checkpoint

    model = latest_checkpoint(model_dir, MODEL).build()
    app = FastAPI()

    class Parameters(BaseModel):
        num_samples: int = NUM_SAMPLES

    class PredictBody(BaseModel):
        instances: list[list[float]]
        parameters: Parameters = Parameters()

    @app.post("/v1/models/{name}:predict")
    def predict(name: str, body: PredictBody) -> dict:
        x = torch.tensor(body.instances, dtype=torch.float32)
        base = random.getrandbits(62)
        draws = []
        for i in range(body.parameters.num_samples):
            seeds = torch.full((x.shape[0],), base + i, dtype=torch.int64)
            draws.append(model.sample(x, 1, seeds)[0])
        d = torch.stack(draws)  # [n, B, mean | variance]
        means, noise = d[..., :1], d[..., 1:]
        mean = means.mean(0)
        epistemic = means.var(0)
        aleatoric = noise.mean(0)
        variance = epistemic + aleatoric
        std = variance.sqrt()
        predictions = []
        for b in range(x.shape[0]):
            m, s = mean[b].tolist(), std[b].tolist()
            predictions.append(
                {
                    "mean": m,
                    "std": s,
                    "variance": variance[b].tolist(),
                    "epistemic_variance": epistemic[b].tolist(),
                    "aleatoric_variance": aleatoric[b].tolist(),
                    "intervals": [
                        {
                            "level": 0.95,
                            "lower": [a - 1.96 * c for a, c in zip(m, s, strict=True)],
                            "upper": [a + 1.96 * c for a, c in zip(m, s, strict=True)],
                        }
                    ],
                }
            )
        return {
            "model_name": name,
            "model_version": 1,
            "num_samples": body.parameters.num_samples,
            "seed": base,
            "predictions": predictions,
        }

    @app.get("/readyz")
    def readyz() -> dict:
        return {}

    return app


def serve(kind: str, port: int, model_dir: Path) -> None:
    import uvicorn

    app = ceiling_app(model_dir) if kind == "ceiling" else naive_app(model_dir)
    uvicorn.run(
        app,
        host=HOST,
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


def server_command(kind: str, port: int, model_dir: Path) -> list[str]:
    if kind == "credence":
        exe = str(Path(sys.executable).with_name("credence-serve"))
        args = ["--model-dir", str(model_dir), "--host", HOST, "--port", str(port)]
        return [exe, *args, "--log-level", "warning"]
    args = ["--serve", kind, "--port", str(port), "--model-dir", str(model_dir)]
    return [sys.executable, __file__, *args]


def wait_ready(proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server on port {port} not ready after {START_TIMEOUT_S} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- load generator


def request_bytes(port: int, body: bytes) -> bytes:
    head = (
        f"POST {ROUTE} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def make_body(rng: random.Random) -> bytes:
    x = [round(rng.gauss(0.0, 1.0), 6) for _ in range(IN_FEATURES)]
    return json.dumps({"instances": [x], "parameters": {"num_samples": NUM_SAMPLES}}).encode()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        if line.lower().startswith("content-length:"):
            length = int(line.split(":", 1)[1])
    return status, await reader.readexactly(length)


async def worker(port, bodies, t_warm, t_end, latencies, errors, late, wid):
    rng = random.Random(wid)
    conn = None
    while time.perf_counter() < t_end:
        payload = request_bytes(port, bodies[rng.randrange(len(bodies))])
        start = time.perf_counter()
        try:
            if conn is None:
                conn = await asyncio.open_connection(HOST, port)
            reader, writer = conn
            writer.write(payload)
            status, _ = await asyncio.wait_for(read_response(reader), REQUEST_TIMEOUT_S)
            ok = status == 200
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            ok = False
            if conn is not None:
                conn[1].close()
            conn = None
        done = time.perf_counter()
        # Throughput counts the requests that finish inside the window, whenever they
        # started, so a server slower than the window still gets a rate.
        if ok and t_warm <= done <= t_end:
            latencies.append(done - start)
        elif not ok and done >= t_warm:
            errors.append(done - start)
        elif done > t_end:  # in flight at the end: not counted, but its latency is telling
            late.append(done - start)
        if not ok:
            await asyncio.sleep(0.01)  # a refused connection must not spin the loop
    if conn is not None:
        conn[1].close()


async def drive(port: int, concurrency: int, warmup_s: float, duration_s: float) -> dict:
    rng = random.Random(0)
    bodies = [make_body(rng) for _ in range(256)]
    latencies: list[float] = []
    errors: list[float] = []
    late: list[float] = []
    t0 = time.perf_counter()
    t_warm, t_end = t0 + warmup_s, t0 + warmup_s + duration_s
    tasks = [
        asyncio.create_task(worker(port, bodies, t_warm, t_end, latencies, errors, late, i))
        for i in range(concurrency)
    ]
    # Requests still in flight at t_end are not counted; give them a bounded time to finish.
    _, pending = await asyncio.wait(tasks, timeout=warmup_s + duration_s + REQUEST_TIMEOUT_S + 5)
    for task in pending:
        task.cancel()
    latencies.sort()
    n = len(latencies)

    def pct(q: float) -> float | None:
        return latencies[min(n - 1, int(q * n))] * 1e3 if n else None

    return {
        "concurrency": concurrency,
        "duration_s": duration_s,
        "completed": n,
        "rps": n / duration_s,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "mean_ms": statistics.fmean(latencies) * 1e3 if n else None,
        "errors": len(errors),
        "late_completed": len(late),
        "late_max_ms": max(late) * 1e3 if late else None,
    }


def run_loadgen(port: int, concurrency: int, warmup_s: float, duration_s: float) -> dict:
    args = ["--port", str(port), "--concurrency", str(concurrency)]
    args += ["--warmup", str(warmup_s), "--duration", str(duration_s)]
    cmd = [sys.executable, __file__, "--loadgen", *args]
    timeout = warmup_s + duration_s + REQUEST_TIMEOUT_S + 30
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


def table(results: dict[str, list[dict]]) -> str:
    rows = [
        "| server | concurrency | req/s | p50 ms | p99 ms | errors | late: n, max ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for server in SERVERS:
        for r in results.get(server, []):
            rows.append(
                f"| {server} | {r['concurrency']} | {fmt(r['rps'])} | {fmt(r['p50_ms'], 2)} "
                f"| {fmt(r['p99_ms'], 2)} | {r['errors']} "
                f"| {r['late_completed']}, {fmt(r['late_max_ms'], 0)} |"
            )
    rows += [
        "",
        "| concurrency | req/s credence/ceiling | req/s credence/naive "
        "| p50 credence/ceiling | p50 credence/naive |",
        "|---:|---:|---:|---:|---:|",
    ]
    by = {s: {r["concurrency"]: r for r in results.get(s, [])} for s in SERVERS}
    for c in sorted(by["credence"]):
        cr, ce, na = by["credence"][c], by["ceiling"].get(c, {}), by["naive"].get(c, {})
        rows.append(
            f"| {c} | {ratio(cr['rps'], ce.get('rps'))} | {ratio(cr['rps'], na.get('rps'))} "
            f"| {ratio(cr['p50_ms'], ce.get('p50_ms'))} | {ratio(cr['p50_ms'], na.get('p50_ms'))} |"
        )
    return "\n".join(rows)


def main_bench(args: argparse.Namespace) -> None:
    import torch

    concurrencies = [1, 32] if args.quick else [1, 8, 32, 128]
    warmup_s, duration_s = (0.5, 2.0) if args.quick else (1.0, 5.0)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="credence-bench-") as tmp:
        model_dir = Path(tmp)
        build_small(model_dir)
        for server in SERVERS:
            port = free_port()
            proc = subprocess.Popen(
                server_command(server, port, model_dir), stdin=subprocess.DEVNULL
            )
            try:
                wait_ready(proc, port)
                if server == "credence":  # the ceiling returns exactly this body
                    req = urllib.request.Request(
                        f"http://{HOST}:{port}{ROUTE}",
                        data=make_body(random.Random(1)),
                        headers={"Content-Type": "application/json"},
                    )
                    with urllib.request.urlopen(req, timeout=10) as r:
                        (model_dir / "ceiling_response.json").write_bytes(r.read())
                results[server] = []
                for c in concurrencies:
                    r = run_loadgen(port, c, warmup_s, duration_s)
                    results[server].append(r)
                    print(
                        f"{server:9s} c={c:4d} {r['rps']:8.1f} req/s p50 {fmt(r['p50_ms'], 2)} "
                        f"ms p99 {fmt(r['p99_ms'], 2)} ms errors {r['errors']}",
                        flush=True,
                    )
            finally:
                stop(proc)

    md_table = table(results)
    print()
    print(md_table)
    command = ".venv/bin/python benchmarks/serve.py" + (" --quick" if args.quick else "")
    machine = {
        "arch": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    settings = {
        "model": "mc_dropout 13-50-1 regression (untrained)",
        "num_samples": NUM_SAMPLES,
        "instances_per_request": 1,
        "warmup_s": warmup_s,
        "duration_s": duration_s,
        "concurrencies": concurrencies,
    }
    out = ROOT / "docs" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(
        json.dumps(
            {"command": command, "machine": machine, "settings": settings, "results": results},
            indent=2,
        )
        + "\n"
    )
    (out / "serving.md").write_text(
        f"""# Serving benchmark

`{command}`

{machine["date"]}; {machine["arch"]}, {machine["cpu_count"]} CPUs ({machine["cpu_model"]}),
Python {machine["python"]}, torch {machine["torch"]}.

The "small" model: MC-dropout regression MLP 13 -> 50 -> 1 (untrained weights; timing does
not depend on them). Each request holds one instance and asks for num_samples =
{NUM_SAMPLES}. A closed-loop load generator (raw asyncio streams, HTTP/1.1 keep-alive, one
connection per in-flight request) keeps C requests in flight for {duration_s} s after a
{warmup_s} s warm-up; latency is per request, client-side. Servers run one at a time on
127.0.0.1, each in its own process:

- **credence**: `credence-serve --model-dir DIR --port P --log-level warning` (defaults
  otherwise: dynamic batching, torch's default thread count).
- **ceiling**: bare FastAPI + uvicorn (uvloop, httptools, access log off) on the same
  route; parses the JSON body and returns a body captured from Credence. No model: the
  most any FastAPI server can do on this machine.
- **naive**: FastAPI with a pydantic request model and a sync route; per request a Python
  loop of {NUM_SAMPLES} single-draw `model.sample(x, 1, seed)` calls, mean/variance in
  torch, no batching (the way tutorials serve MC dropout).

**The load generator shares the machine's {machine["cpu_count"]} cores with the server**,
so absolute numbers are lower than on a machine where the client runs elsewhere; the
ratios are the point. req/s counts requests that finish inside the window (whenever they
started); p50/p99 are over those. "late" are requests still in flight when the window
closed, finished afterwards (bounded by a {REQUEST_TIMEOUT_S:g} s client timeout, past which
they count as errors): a server whose requests all outlast the window shows 0 req/s and its
latency there.

{md_table}

Raw numbers: `docs/results/serving.json`.
"""
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="concurrency 1 and 32, 2 s each")
    parser.add_argument("--serve", choices=("ceiling", "naive"), help="run a server")
    parser.add_argument("--loadgen", action="store_true", help="run the load generator")
    parser.add_argument("--port", type=int)
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.model_dir)
    elif args.loadgen:
        import uvloop

        result = uvloop.run(drive(args.port, args.concurrency, args.warmup, args.duration))
        print(json.dumps(result))
    else:
        main_bench(args)


if __name__ == "__main__":
    main()
