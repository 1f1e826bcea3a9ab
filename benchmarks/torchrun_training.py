"""Training spread over processes: `credence-train` alone, then under torchrun with K processes.

Runs the same ensemble (or SG-MCMC) training once in one process and once per process count
under `python -m torch.distributed.run` on loopback, checks that every run wrote the same
weights (the manifests' sha256 of weights.safetensors), and times the fit (the manifest's
`training.seconds`, rank 0's) and the whole command (interpreter and torch start-up, data,
evaluation and the checkpoint included).

    .venv/bin/python benchmarks/torchrun_training.py [--processes 2] [--members 8]
        [--data ../shared/data/uci/concrete --split 0] [--epochs 100] [--hidden "200 200"]
        [--threads 1]

Prints a markdown table and writes it to docs/results/torchrun.md. With K processes on a
machine of fewer than K free cores the processes only take turns: run it where K cores are
free.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine_line, machine_record, write_report


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train(args: list[str], processes: int, out: Path) -> tuple[float, dict]:
    """(wall seconds of the command, manifest) of one `credence-train` run."""
    launcher = [sys.executable, "-m", "training.cli"]
    if processes > 1:
        launcher = [
            *(sys.executable, "-m", "torch.distributed.run", "--nnodes", "1"),
            *("--nproc-per-node", str(processes), "--master-addr", "127.0.0.1"),
            *("--master-port", str(_free_port()), "-m", "training.cli"),
        ]
    start = time.perf_counter()
    subprocess.run(
        [*launcher, *args, "--out", str(out), "--quiet"], check=True, capture_output=True
    )
    seconds = time.perf_counter() - start
    manifest = json.loads((out / "bench" / "1" / "manifest.json").read_text())
    return seconds, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[2])
    parser.add_argument("--method", default="ensemble", choices=("ensemble", "sgld", "sghmc"))
    parser.add_argument("--members", type=int, default=8, help="ensemble members or chains")
    parser.add_argument("--data", default="../shared/data/uci/concrete")
    parser.add_argument("--split", default="0")
    parser.add_argument("--epochs", default="100")
    parser.add_argument("--hidden", default="200 200", help="hidden layer widths")
    parser.add_argument(
        "--threads", default="1", help="torch threads per process (torchrun's default: 1)"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/results/torchrun.md"))
    args = parser.parse_args()
    units = "--members" if args.method == "ensemble" else "--chains"
    train_args = [
        *("--data", args.data, "--split", args.split, "--method", args.method),
        *(units, str(args.members), "--epochs", args.epochs, "--name", "bench"),
        *("--hidden", *args.hidden.split(), "--threads", args.threads),
    ]
    load = os.getloadavg()[0]  # other work on the machine takes cores from the processes
    rows, weights = [], set()
    with tempfile.TemporaryDirectory() as tmp:
        for processes in [1, *args.processes]:
            seconds, manifest = _train(train_args, processes, Path(tmp) / str(processes))
            weights.add(manifest["files"]["weights.safetensors"]["sha256"])
            rows.append((processes, manifest["training"]["seconds"], seconds))
    if len(weights) != 1:
        raise SystemExit(f"the runs wrote different weights: {sorted(weights)}")
    lines = [
        "| processes | fit (s) | fit speed-up | command (s) | command speed-up |",
        "|---:|---:|---:|---:|---:|",
    ]
    for processes, fit_s, total_s in rows:
        lines.append(
            f"| {processes} | {fit_s:.1f} | {rows[0][1] / fit_s:.2f} | {total_s:.1f} | "
            f"{rows[0][2] / total_s:.2f} |"
        )
    body = "\n".join(lines)
    text = (
        "# Training spread over processes (torchrun)\n\n"
        f"`credence-train {' '.join(train_args)}`, alone and under torchrun (gloo on "
        f"loopback): {args.method} with {args.members} {units[2:]} split into contiguous "
        f"blocks, one per process, each on {args.threads} thread(s). Every run wrote the "
        "same weights (one sha256). Fit: the manifest's `training.seconds` (rank 0); "
        "command: the whole run, interpreter start, "
        f"data, evaluation and checkpoint included. Load average at the start: {load:.1f} "
        f"on {os.cpu_count()} cores.\n\n"
        f"{body}\n\n"
    )
    write_report(
        args.out,
        text,
        table=body,
        command="python benchmarks/torchrun_training.py " + " ".join(sys.argv[1:]),
        machine=machine_line(machine_record(), int(args.threads)),
        advice="the speed-up needs as many free cores as processes.",
    )


if __name__ == "__main__":
    main()
