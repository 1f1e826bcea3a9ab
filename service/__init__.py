"""Online side of Credence: loads checkpoints and serves posterior predictions over HTTP.

OpenMP's idle threads sleep instead of spinning (unless OMP_WAIT_POLICY is already set): a
server shares its cores with the event loop, and spinning intra-op threads starved it (a
784-1024-1024 model, one row, 2 threads on a busy 2-core machine: 12 ms per call with
spinning, 3.7 ms with sleeping threads). Read when OpenMP starts, so set before torch loads.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import training  # noqa: F401  sets MKL's reproducible mode before any matmul runs
