"""What machine a benchmark ran on, and the provenance its written report ends with."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_record() -> dict[str, str | int | None]:
    """The machine and software a result came from, as stored beside it in JSON."""
    return {
        "arch": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_line(machine: dict, threads: int) -> str:
    """A `machine_record` as the one line a written report gives it."""
    return (
        f"{machine['arch']}, {machine['cpu_count']} cores ({machine['cpu_model']}), "
        f"Python {machine['python']}, torch {machine['torch']} with {threads} thread(s); "
        f"{machine['date']}"
    )


def write_report(
    out: Path,
    text: str,
    *,
    table: str,
    command: str,
    machine: str,
    advice: str,
    seconds: float | None = None,
) -> None:
    """Write `text` (heading, prose and table) to `out`, ending in the command that made it
    (and its run time), the machine and the date, and print the table.

    `advice` ends the sentence on how much timings on a shared machine vary."""
    took = f" ({seconds:.0f} s)" if seconds is not None else ""
    report = (
        f"{text}"
        f"Command: `{command.strip()}`{took}  \n"
        f"Machine: {machine}  \n"
        f"Date: {datetime.now(UTC).date().isoformat()}. Timings on a shared machine vary by "
        f"tens of percent between runs; {advice}\n"
    )
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(f"\nwrote {out}")


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up, in milliseconds."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)
