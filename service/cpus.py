"""How many CPUs this process may use, container limits included."""

from __future__ import annotations

import math
import os
from pathlib import Path

# A container's CPU limit (cgroup v2, then v1): quota and period in microseconds.
CPU_LIMIT_FILES = (
    (Path("/sys/fs/cgroup/cpu.max"), None),
    (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")),
)


def available_cores() -> int:
    """The CPUs this process may use: its affinity, capped by the container's CPU limit,
    which affinity does not show (a pod limited to 2 CPUs on a 64-core node sees 64)."""
    cores = len(os.sched_getaffinity(0))
    for quota_file, period_file in CPU_LIMIT_FILES:
        try:
            values = quota_file.read_text().split()
            if period_file is not None:
                values.append(period_file.read_text().strip())
            quota, period = values[0], values[1]
            if quota in ("max", "-1"):  # no limit
                return cores
            return min(cores, max(1, math.ceil(int(quota) / int(period))))
        except (OSError, ValueError, IndexError):  # absent or unreadable: the next layout
            continue
    return cores
