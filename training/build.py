"""Which class a manifest's (method, architecture) builds: each method's model on any body
of the architecture registry, and the fast paths that replace it for one architecture
(tested equal to it, tests/test_architectures.py)."""

from __future__ import annotations

from training.architectures import arch_name
from training.model import PosteriorModel
from training.posteriors.dropout import DropoutNet
from training.posteriors.laplace import LaplaceNet, LastLayerLaplace
from training.posteriors.mc_dropout import MCDropoutMLP
from training.posteriors.stacked import (
    DeepEnsemble,
    EnsembleNet,
    SGHMCNet,
    SGHMCSamples,
    SGLDNet,
    SGLDSamples,
)
from training.posteriors.variational import VariationalBody, VariationalNet

MODEL_TYPES: dict[str, type[PosteriorModel]] = {
    "mc_dropout": DropoutNet,
    "variational": VariationalBody,
    "ensemble": EnsembleNet,
    "sgld": SGLDNet,
    "sghmc": SGHMCNet,
    "laplace": LaplaceNet,
}
FAST_PATHS: dict[tuple[str, str], type[PosteriorModel]] = {
    ("mc_dropout", "mlp"): MCDropoutMLP,
    ("variational", "mlp"): VariationalNet,
    ("variational", "cnn"): VariationalNet,
    ("ensemble", "mlp"): DeepEnsemble,
    ("sgld", "mlp"): SGLDSamples,
    ("sghmc", "mlp"): SGHMCSamples,
    ("laplace", "mlp"): LastLayerLaplace,
}


def model_type(method: str, arch: dict) -> type[PosteriorModel]:
    if method not in MODEL_TYPES:
        raise ValueError(f"unknown method {method!r}; known: {sorted(MODEL_TYPES)}")
    return FAST_PATHS.get((method, arch_name(arch)), MODEL_TYPES[method])


def build_model(config: dict, normalization: dict) -> PosteriorModel:
    """Rebuild a model from its manifest config alone (no code from the training run)."""
    arch = config.get("arch") or {}
    return model_type(config.get("method"), arch)(arch, config["likelihood"], normalization)
