"""Offline side of Credence: data, Bayesian models, fitting, evaluation, checkpoints.

MKL is put in strict conditional-numerical-reproducibility mode before torch first calls it
(unless MKL_CBWR is already set). Without it MKL picks GEMM kernels by matrix shape, so a
row's float results change with the number of rows it is multiplied with (single rows,
one-output layers), which breaks the sampler contract that a row's draws depend only on its
seed. The setting is read at MKL's first call, so it must happen before any matmul.
"""

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
