"""Soak: mixed valid and invalid traffic at 70% of the measured maximum, for minutes, with a
hot reload and a corrupt checkpoint dropped in along the way.

One credence-serve (admin routes open) serves benchmarks/serve.py's small workload (an
untrained MC-dropout regression MLP 13 -> 50 -> 1, 100 draws) from a temporary model dir.

1. Maximum throughput: serve.py's closed-loop load generator, 32 requests in flight, in a
   process of its own.
2. The soak: a driver process of its own sends Poisson arrivals at 70% of that rate on a
   pool of keep-alive connections, latency counted from each scheduled arrival (no
   coordinated omission). One request in five is invalid, in one of several ways (bad JSON,
   a NaN, a row of the wrong width, an unknown parameter, a credible level of 1.5, a key
   given twice, a wrong content type, an unknown model): each must get a 4xx; every valid
   one must get a 200.
3. Meanwhile this process writes version 2 into the model dir at 40% of the run and asks
   for a reload (it must be loaded and served), and at 60% a version 3 with a bit flipped in
   its weights (it must be refused while version 2 serves on), and samples the server's
   resident memory (VmRSS of it and its children) every 2 s.

Reported: per minute, the valid requests, their p50 and p99 latency, failures of either
kind and the versions that answered; the memory after warm-up (the first minute) against
the end of the run. Writes docs/results/reliability.md (or --out).

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--out docs/results/reliability.md]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import serve
from machine import machine_line, machine_record, write_report

ROOT = Path(__file__).resolve().parents[1]
LOAD = 0.7
INVALID_SHARE = 0.2
RELOAD_AT, CORRUPT_AT = 0.4, 0.6
RSS_EVERY_S = 2.0
WORKLOAD = serve.WORKLOADS["small"]


def invalid_bodies() -> list[tuple[str, bytes, str]]:
    """(what is wrong, body, content type): each must be answered with a 4xx."""
    row = ", ".join(["0.5"] * WORKLOAD.in_features)
    short = ", ".join(["0.5"] * (WORKLOAD.in_features - 1))
    return [
        ("invalid JSON", b'{"instances": [[' + row.encode() + b"]", "application/json"),
        ("NaN", ('{"instances": [[NaN, ' + short + "]]}").encode(), "application/json"),
        ("wrong width", ('{"instances": [[' + short + "]]}").encode(), "application/json"),
        (
            "unknown parameter",
            ('{"instances": [[' + row + ']], "parameters": {"samples": 5}}').encode(),
            "application/json",
        ),
        (
            "credible level 1.5",
            ('{"instances": [[' + row + ']], "parameters": {"credible_levels": [1.5]}}').encode(),
            "application/json",
        ),
        (
            "key given twice",
            ('{"instances": [[' + row + ']], "instances": []}').encode(),
            "application/json",
        ),
        ("wrong content type", ('{"instances": [[' + row + "]]}").encode(), "text/plain"),
    ]


def request(path: str, body: bytes, content_type: str, port: int) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {serve.HOST}:{port}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def payloads(port: int) -> tuple[list[bytes], list[tuple[str, bytes]]]:
    rng = random.Random(0)
    valid = [
        request(WORKLOAD.route, serve.make_body(WORKLOAD, rng), "application/json", port)
        for _ in range(256)
    ]
    invalid = [(w, request(WORKLOAD.route, b, t, port)) for w, b, t in invalid_bodies()]
    body = serve.make_body(WORKLOAD, rng)
    invalid.append(
        ("unknown model", request("/v1/models/nope:predict", body, "application/json", port))
    )
    return valid, invalid


async def drive(port: int, rate: float, seconds: float) -> list[list]:
    """Open-loop traffic; one record per request: [scheduled s since start, latency s,
    valid, status or failure, model version or None, what was wrong, s the driver sent it
    late].

    The records live for the whole run, millions of them: a full collection of the cyclic
    garbage collector walks them all and stalls this loop for as long as a second, after
    which it sends every arrival it held back at once, a burst that no Poisson process
    makes. Freezing what exists every second keeps them out of every later collection."""
    valid, invalid = payloads(port)
    rng = random.Random(1)
    pool: asyncio.LifoQueue[tuple | None] = asyncio.LifoQueue()
    for _ in range(serve.OPEN_LOOP_MAX_CONNECTIONS):
        pool.put_nowait(None)
    records: list[list] = []
    t0 = time.perf_counter() + 0.05

    async def one(scheduled: float, payload: bytes, is_valid: bool, what: str) -> None:
        late = time.perf_counter() - scheduled
        entry = await pool.get()
        conn = None
        if entry is not None:
            conn, last_used = entry
            if time.perf_counter() - last_used > serve.KEEP_ALIVE_REUSE_S:
                conn[1].close()
                conn = None
        version = None
        try:
            if conn is None:
                conn = await asyncio.open_connection(serve.HOST, port)
            reader, writer = conn
            writer.write(payload)
            status, body = await asyncio.wait_for(
                serve.read_response(reader), serve.REQUEST_TIMEOUT_S
            )
            outcome: int | str = status
            if status == 200:
                at = body.find(b'"model_version":')
                version = int(body[at + 16 : body.index(b",", at)])
        except serve.NETWORK_ERRORS as exc:
            outcome = "timeout" if isinstance(exc, TimeoutError) else "connection"
            if conn is not None:
                conn[1].close()
            conn = None
        pool.put_nowait(None if conn is None else (conn, time.perf_counter()))
        done = time.perf_counter()
        records.append([scheduled - t0, done - scheduled, is_valid, outcome, version, what, late])

    tasks = []
    t, end = t0, t0 + seconds
    frozen = t0
    gc.freeze()
    while True:
        t += rng.expovariate(rate)
        if t >= end:
            break
        if t - frozen >= 1.0:
            gc.freeze()
            frozen = t
        delay = t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if rng.random() < INVALID_SHARE:
            what, payload = invalid[rng.randrange(len(invalid))]
            tasks.append(asyncio.create_task(one(t, payload, False, what)))
        else:
            payload = valid[rng.randrange(len(valid))]
            tasks.append(asyncio.create_task(one(t, payload, True, "")))
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=serve.REQUEST_TIMEOUT_S + 5)
        for task in pending:
            task.cancel()
        records += [[None, None, None, "unfinished", None, "", None] for _ in pending]
    return records


def rss_kb(pid: int) -> int:
    """VmRSS of a process and its children (batch workers), in kB."""
    total = 0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def post(port: int, path: str) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://{serve.HOST}:{port}{path}", data=b"", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def tamper(version_dir: Path) -> None:
    weights = version_dir / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))


def refusal(outcome: int | str) -> bool:
    return isinstance(outcome, int) and 400 <= outcome < 500


def minute_rows(records: list[list], minutes: int) -> list[dict[str, Any]]:
    rows = []
    for minute in range(minutes):
        mine = [r for r in records if r[0] is not None and minute * 60 <= r[0] < minute * 60 + 60]
        valid = [r for r in mine if r[2]]
        ok = sorted(r[1] for r in valid if r[3] == 200)
        late = sorted(r[6] for r in mine)
        rows.append(
            {
                "minute": minute + 1,
                "valid": len(valid),
                "valid_failed": sum(1 for r in valid if r[3] != 200),
                "invalid": len(mine) - len(valid),
                "invalid_not_4xx": sum(
                    1
                    for r in mine
                    if not r[2] and not (isinstance(r[3], int) and 400 <= r[3] < 500)
                ),
                "p50_ms": serve.percentile(ok, 0.5),
                "p99_ms": serve.percentile(ok, 0.99),
                "late_p99_ms": serve.percentile(late, 0.99),
                "versions": sorted({r[4] for r in valid if r[4] is not None}),
            }
        )
    return rows


def report(data: dict[str, Any], command: str, seconds: float) -> None:
    rows = data["minutes"]
    lines = [
        "| minute | valid requests | valid failed | invalid requests | invalid not 4xx | "
        "p50 ms | p99 ms | sent late, p99 ms | versions answering |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        versions = ", ".join(f"v{v}" for v in r["versions"])
        lines.append(
            f"| {r['minute']} | {r['valid']} | {r['valid_failed']} | {r['invalid']} | "
            f"{r['invalid_not_4xx']} | {serve.fmt(r['p50_ms'])} | {serve.fmt(r['p99_ms'])} | "
            f"{serve.fmt(r['late_p99_ms'])} | {versions} |"
        )
    table = "\n".join(lines)
    memory = data["memory"]
    events = data["events"]
    kinds = ", ".join(f"{k}: {n}" for k, n in sorted(data["invalid_statuses"].items()))
    failed = ", ".join(f"{k}: {n}" for k, n in sorted(data["valid_failures"].items()))
    failed = f" ({failed})" if failed else ""
    label = (
        ""
        if data["minutes_run"] >= 10
        else (
            f" **A shorter run ({data['minutes_run']} min) than the 10 minutes the soak is "
            "meant for; the command below with `--minutes 10` runs it in full.**"
        )
    )
    text = (
        "# Reliability: a soak under mixed traffic, with a hot reload and a corrupt "
        "checkpoint\n\n"
        f"benchmarks/soak.py: {WORKLOAD.description}, {WORKLOAD.num_samples} draws per request."
        f" Maximum throughput measured first (closed loop, 32 in flight): "
        f"{data['max_rps']:.0f} requests/s. Then {data['minutes_run']} min of Poisson arrivals"
        f" at {LOAD:.0%} of it ({data['rate']:.0f}/s), one in five invalid (bad JSON, NaN, wrong"
        " width, unknown parameter, credible level 1.5, a key given twice, wrong content type,"
        " unknown model), on keep-alive connections; latency from each scheduled arrival."
        f"{label}\n\n"
        f"- At {events['reload']['at_s']:.0f} s version 2 was written and reloaded: "
        f"HTTP {events['reload']['status']}, loaded {events['reload']['loaded']}.\n"
        f"- At {events['corrupt']['at_s']:.0f} s version 3, with one bit of its weights "
        f"flipped, was written and reloaded: HTTP {events['corrupt']['status']} "
        f"({events['corrupt']['code']}); version {events['corrupt']['default_after']} "
        "kept serving.\n"
        f"- Valid requests: {data['valid']}, failed: {data['valid_failed']}{failed}. Invalid: "
        f"{data['invalid']}, answered other than 4xx: {data['invalid_not_4xx']} ({kinds}).\n"
        f"- Resident memory (server and its workers): {memory['after_warmup_mb']:.1f} MB "
        f"after the first minute, {memory['end_mb']:.1f} MB at the end "
        f"({memory['growth']:+.1%}; peak {memory['peak_mb']:.1f} MB).\n"
        f"- The machine's 1-minute load average: {data['load_average']['start']:.1f} at the "
        f"start, {data['load_average']['end']:.1f} at the end ({data['machine']['cpu_count']} "
        "cores; server, traffic and whatever else runs there share them). A 503 is the "
        "server's queue bound refusing what it cannot take in time (max_queue), `connection` "
        "a connection that failed, `unfinished` a request the client still had in flight "
        f"{serve.REQUEST_TIMEOUT_S + 5:.0f} s after the last arrival; `sent late` how long "
        "after its scheduled arrival the driver got to send a request (the client's own "
        "delay, counted in the latency).\n\n"
        f"{table}\n\n"
    )
    write_report(
        Path(data["out"]),
        text,
        table=table,
        command=command,
        machine=machine_line(data["machine"], 1),
        advice="the failures and the memory growth are the result, the latencies a guide.",
        seconds=seconds,
    )
    Path(data["out"]).with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "reliability.md"))
    parser.add_argument("--drive", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--records", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:  # the traffic, in a process of its own
        records = asyncio.run(drive(args.port, args.rate, args.minutes * 60))
        Path(args.records).write_text(json.dumps(records))
        return
    started = time.monotonic()
    seconds = args.minutes * 60
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        serve.build_checkpoint(WORKLOAD, model_dir)
        port = serve.free_port()
        command = serve.server_command("credence", WORKLOAD, port, model_dir)
        server = subprocess.Popen([*command, "--admin-without-keys", "true"])
        try:
            serve.wait_ready(server, port)
            best = serve.run_loadgen(WORKLOAD, port, warmup_s=3, duration_s=15, concurrency=32)
            rate = LOAD * best["rps"]
            print(f"max {best['rps']:.0f} requests/s; soak at {rate:.0f}/s for {seconds:.0f} s")
            drive_cmd = [sys.executable, __file__, "--drive", "--port", str(port)]
            records_path = Path(tmp) / "records.json"
            drive_cmd += ["--rate", str(rate), "--minutes", str(args.minutes)]
            driver = subprocess.Popen([*drive_cmd, "--records", str(records_path)])
            t0 = time.monotonic()
            memory: list[tuple[float, int]] = []
            events: dict[str, dict] = {}
            while driver.poll() is None:
                now = time.monotonic() - t0
                memory.append((now, rss_kb(server.pid)))
                if "reload" not in events and now >= RELOAD_AT * seconds:
                    serve.build_checkpoint(WORKLOAD, model_dir)  # version 2
                    status, body = post(port, f"/v1/models/{WORKLOAD.name}:reload")
                    events["reload"] = {"at_s": now, "status": status, **body}
                if "corrupt" not in events and now >= CORRUPT_AT * seconds:
                    tamper(serve.build_checkpoint(WORKLOAD, model_dir))  # version 3
                    status, body = post(port, f"/v1/models/{WORKLOAD.name}:reload")
                    with urllib.request.urlopen(
                        f"http://{serve.HOST}:{port}/v1/models/{WORKLOAD.name}"
                    ) as r:
                        default = json.loads(r.read())["default_version"]
                    code = body.get("error", {}).get("code")
                    events["corrupt"] = {
                        "at_s": now,
                        "status": status,
                        "code": code,
                        "message": body.get("error", {}).get("message"),
                        "default_after": default,
                    }
                time.sleep(RSS_EVERY_S)
            if driver.returncode != 0:
                raise RuntimeError(f"the traffic driver exited with {driver.returncode}")
            records = json.loads(records_path.read_text())
        finally:
            serve.stop(server)
    load_after = os.getloadavg()[0]
    minutes = max(1, round(args.minutes))
    after_warmup = [kb for t, kb in memory if 60 <= t < 90] or [memory[0][1]]
    end = [kb for t, kb in memory if t >= memory[-1][0] - 30]
    valid = [r for r in records if r[2]]
    invalid = [r for r in records if r[2] is False]
    statuses: dict[str, int] = {}
    for r in invalid:
        statuses[str(r[3])] = statuses.get(str(r[3]), 0) + 1
    valid_failures: dict[str, int] = {}
    for r in records:
        if r[2] is not False and r[3] != 200:
            valid_failures[str(r[3])] = valid_failures.get(str(r[3]), 0) + 1
    data = {
        "machine": machine_record(),
        "load_average": {"start": load_before, "end": load_after},  # 1-minute, whole machine
        "out": args.out,
        "minutes_run": args.minutes,
        "max_rps": best["rps"],
        "max_run": best,
        "rate": rate,
        "events": events,
        "valid": len(valid),
        "valid_failed": sum(1 for r in records if r[2] is not False and r[3] != 200),
        "invalid": len(invalid),
        "invalid_not_4xx": sum(1 for r in invalid if not refusal(r[3])),
        "invalid_statuses": statuses,
        "valid_failures": valid_failures,  # status (503: queue full) or what went wrong
        "memory": {
            "after_warmup_mb": statistics.median(after_warmup) / 1024,
            "end_mb": statistics.median(end) / 1024,
            "peak_mb": max(kb for _, kb in memory) / 1024,
            "growth": statistics.median(end) / statistics.median(after_warmup) - 1,
            "samples": memory,
        },
        "minutes": minute_rows(records, minutes),
    }
    flags = f" --minutes {args.minutes:g}" if args.minutes != 10 else ""
    report(data, f".venv/bin/python benchmarks/soak.py{flags}", time.monotonic() - started)


if __name__ == "__main__":
    main()
