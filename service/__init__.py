"""Online side of Credence: loads checkpoints and serves posterior predictions over HTTP."""

import training  # noqa: F401  first: sets MKL's reproducible mode before any matmul runs
