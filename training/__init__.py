"""Offline side of Credence: data, Bayesian models, fitting, evaluation, checkpoints.

MKL is put in strict conditional-numerical-reproducibility mode before torch first calls it
(unless MKL_CBWR is already set): its matrix products then give the same bits whatever
number of threads computes them, so `credence-eval`, on every core, computes the bits the
server computes on one thread. (Batch invariance, where it is asked for, does not rest on
it: see training.segments.) The setting is read at MKL's first call, so it must happen before
any matmul.
"""

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
