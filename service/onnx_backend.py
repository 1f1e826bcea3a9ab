"""The ONNX Runtime backend (CREDENCE_BACKEND=onnx): a checkpoint's model.onnx as the sampler.

The exported graph (training.onnx_export) is the whole `sample(x, n, seeds)` with the sample
axis inside, so this backend only swaps what produces the draws tensor: the batcher, the
predictive summaries and the responses are the ones the torch backend uses. It runs on
onnxruntime's CPU provider, whatever CREDENCE_DEVICE says.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from service.cpus import available_cores
from training import segments
from training.checkpoint import ONNX, Checkpoint, CheckpointError
from training.onnx_export import EXPORTABLE_METHODS, run_draws, session


class OnnxSampler:
    """`PosteriorModel.sample` from an ONNX Runtime session: numpy in, a CPU tensor out."""

    def __init__(self, data: bytes, task: str, threads: int = 0):
        self.task = task
        self.session = session(data, threads=threads)

    def sample(
        self,
        x: torch.Tensor,
        n: int,
        seeds: torch.Tensor,
        sizes: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """With `sizes`, one run of the graph per request, on a copy of its rows: a request's
        draws are then the same bits alone and in any batch (training.segments); without,
        one run over the batch."""
        x_np = x.detach().to("cpu", torch.float32).numpy()
        seeds_np = seeds.detach().to("cpu", torch.int64).numpy()
        if sizes is None:
            return torch.from_numpy(np.asarray(run_draws(self.session, x_np, n, seeds_np)))
        bounds = segments.offsets(sizes)
        parts = [
            np.asarray(run_draws(self.session, x_np[a:b].copy(), n, seeds_np[a:b].copy()))
            for a, b in itertools.pairwise(bounds)
        ]
        return torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1))

    def release(self) -> None:
        """Drop the session and the weights it holds (service.workers.release_weights)."""
        self.session = None


def load_onnx(checkpoint: Checkpoint, threads: int, small: bool) -> OnnxSampler:
    """The sampler of a verified checkpoint's model.onnx; CheckpointError says how to export.

    `threads` 0 means one intra-op thread for a `small` model (training.fit.is_small), else
    one per available core (service.cpus); a large model's batches are computed one at a
    time (service.app.batch_workers)."""
    if ONNX not in checkpoint.files:
        name, version = checkpoint.manifest.get("name"), checkpoint.manifest.get("version")
        method = checkpoint.manifest.get("method")
        how = (
            f"export it with `credence-export --model {checkpoint.path}` (or train with "
            "`credence-train ... --export-onnx`)"
            if method in EXPORTABLE_METHODS
            else f"its method {method!r} does not export to ONNX (exportable: "
            f"{', '.join(EXPORTABLE_METHODS)}); serve it with CREDENCE_BACKEND=torch"
        )
        raise CheckpointError(
            f"model {name!r} version {version} has no {ONNX} in its manifest, and "
            f"CREDENCE_BACKEND=onnx needs one: {how}"
        )
    if threads == 0:  # one thread for a small model, else a core each
        threads = 1 if small else available_cores()
    try:
        return OnnxSampler(checkpoint.files[ONNX], checkpoint.manifest["task"], threads)
    except Exception as exc:  # onnxruntime raises its own exception types for a bad graph
        raise CheckpointError(f"{checkpoint.path}: {ONNX} does not load: {exc}") from exc
