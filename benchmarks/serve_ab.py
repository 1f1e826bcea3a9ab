"""Credence from this checkout against Credence from another one, on serve.py's workloads.

A change to the serving path is judged by how it moves Credence's own throughput and latency,
measured in one sitting so that the machine's noise is shared: both servers run from the same
virtual environment (the other checkout's code first on PYTHONPATH), one at a time, in
alternating rounds (A B B A A B ...), each driven by serve.py's closed-loop load generator.

    git worktree add ../credence-base <commit>
    .venv/bin/python benchmarks/serve_ab.py --baseline ../credence-base [--rounds 3]
        [--new-args "--batch-invariant true"] [--out serving-ab]

`--new-args` are more `credence-serve` flags for this checkout's server. Prints a markdown
table per workload (medians over rounds, and new/baseline ratios) and writes
docs/results/OUT.md and docs/results/OUT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import serve
from machine import machine_record

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCIES = (1, 8, 32, 128)


def commit_of(tree: Path) -> str:
    out = subprocess.run(
        ["git", "-C", str(tree), "log", "-1", "--format=%h %s"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()[:80]


def run_server(
    tree: Path, flags: list[str], workload: serve.Workload, model_dir: Path, args
) -> list[dict]:
    """One server from `tree`'s code, every concurrency once."""
    port = serve.free_port()
    cmd = [sys.executable, "-c", "from service.cli import main; main()"]
    cmd += ["--model-dir", str(model_dir), "--host", serve.HOST, "--port", str(port)]
    cmd += ["--log-level", "warning", *flags]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env, cwd=tree)
    try:
        serve.wait_ready(proc, port)
        results = []
        for c in CONCURRENCIES:
            before = serve.process_cpu_s(proc.pid)
            r = serve.run_loadgen(workload, port, args.warmup, args.duration, concurrency=c)
            after = serve.process_cpu_s(proc.pid)
            if before is not None and after is not None and r["rps"] > 0:
                served = r["rps"] * (args.warmup + args.duration)
                r["server_cpu_ms_per_request"] = (after - before) * 1e3 / served
            results.append(r)
        return results
    finally:
        serve.stop(proc)


def median(runs: list[list[dict]], i: int, key: str) -> float | None:
    values = [r[i][key] for r in runs if r[i].get(key) is not None]
    return statistics.median(values) if values else None


def table(runs: dict[str, list[list[dict]]]) -> str:
    rows = [
        "| C | req/s base | req/s new | new/base | p50 ms base | p50 ms new | p99 ms base "
        "| p99 ms new | CPU ms/req base | CPU ms/req new |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, c in enumerate(CONCURRENCIES):
        cells = {}
        for side in ("base", "new"):
            for key in ("rps", "p50_ms", "p99_ms", "server_cpu_ms_per_request"):
                cells[side, key] = median(runs[side], i, key)
        rows.append(
            f"| {c} | {serve.fmt(cells['base', 'rps'])} | {serve.fmt(cells['new', 'rps'])} "
            f"| {serve.ratio(cells['new', 'rps'], cells['base', 'rps'])} "
            f"| {serve.fmt(cells['base', 'p50_ms'], 2)} | {serve.fmt(cells['new', 'p50_ms'], 2)} "
            f"| {serve.fmt(cells['base', 'p99_ms'], 2)} | {serve.fmt(cells['new', 'p99_ms'], 2)} "
            f"| {serve.fmt(cells['base', 'server_cpu_ms_per_request'], 3)} "
            f"| {serve.fmt(cells['new', 'server_cpu_ms_per_request'], 3)} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="the other checkout")
    parser.add_argument("--workload", choices=(*serve.WORKLOADS, "both"), default="both")
    parser.add_argument("--rounds", type=int, default=3, help="servers per side and workload")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--new-args", default="", help="more credence-serve flags for new")
    parser.add_argument("--out", default="serving-ab", help="report name under docs/results")
    args = parser.parse_args()
    trees = {"base": args.baseline.resolve(), "new": ROOT}
    flags = {"base": [], "new": shlex.split(args.new_args)}
    names = list(serve.WORKLOADS) if args.workload == "both" else [args.workload]
    started = time.monotonic()
    report: dict[str, Any] = {
        "command": "benchmarks/serve_ab.py " + shlex.join(sys.argv[1:]),
        "machine": machine_record(),
        "commits": {side: commit_of(tree) for side, tree in trees.items()},
        "settings": {"warmup_s": args.warmup, "duration_s": args.duration, "rounds": args.rounds},
        "workloads": {},
    }
    sections = []
    for name in names:
        workload = serve.WORKLOADS[name]
        runs: dict[str, list[list[dict]]] = {"base": [], "new": []}
        with tempfile.TemporaryDirectory(prefix=f"credence-ab-{name}-") as tmp:
            serve.build_checkpoint(workload, Path(tmp))
            for k in range(args.rounds):  # A B, B A, A B: neither side always goes first
                order = ("base", "new") if k % 2 == 0 else ("new", "base")
                for side in order:
                    result = run_server(trees[side], flags[side], workload, Path(tmp), args)
                    runs[side].append(result)
                    rps = ", ".join(f"{r['rps']:.0f}" for r in runs[side][-1])
                    print(f"{name} round {k} {side}: req/s {rps}", flush=True)
        report["workloads"][name] = runs
        sections.append(f"### {workload.description}, num_samples {workload.num_samples}\n")
        sections.append(table(runs) + "\n")
    elapsed = time.monotonic() - started
    m = report["machine"]
    md = "\n".join(sections)
    print("\n" + md)
    out = ROOT / "docs" / "results"
    (out / f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{args.out}.md").write_text(
        f"""# Serving A/B

`.venv/bin/python {report["command"]}`

{m["date"]}; {m["arch"]}, {m["cpu_count"]} CPUs ({m["cpu_model"]}), Python {m["python"]},
torch {m["torch"]}; {elapsed:.0f} s in all.

- base: `{report["commits"]["base"]}`
- new: `{report["commits"]["new"]}`{f", with `{args.new_args}`" if args.new_args else ""}

Both servers run `credence-serve` with its defaults from the same virtual environment, one
at a time, {args.rounds} rounds each in alternating order; each round drives every
concurrency C for {args.duration:g} s after a {args.warmup:g} s warm-up with serve.py's
closed-loop load generator (one instance per request). Cells are medians over rounds; the
server's CPU per request counts its worker processes too.

{md}"""
    )
    print(f"\ntotal {elapsed:.0f} s; wrote {out / args.out}.md")


if __name__ == "__main__":
    main()
