"""Posterior approximation methods that `credence-train --method` can fit.

A method declares its own flags and defaults, builds its model from the data's shape,
likelihood and normalization, and trains it. The shared pieces
(data loading, standardization, the validation split, evaluation, the checkpoint) stay in
`training.train` and `training.cli`, so a new method (variational, ensemble, SG-MCMC,
Laplace) is one class added to `METHODS`, with no change to the CLI.
"""

from __future__ import annotations

import argparse
from typing import Any, ClassVar

from training.data import Dataset
from training.fit import FitOptions, FitResult, fit
from training.model import PosteriorModel, model_type


class Method:
    """Base class: declared options (with defaults), then build + train.

    Option flags default to None, which means "the method's default": several methods can
    then share a flag (declared once) and each substitutes its own default.
    """

    name: ClassVar[str]
    help: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        """Declare the method's flags (default None); their dests are keys of `defaults`."""

    def __init__(self, **options: Any):
        options = {k: v for k, v in options.items() if v is not None}
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise ValueError(f"{self.name} takes no options {sorted(unknown)}")
        self.options = {**self.defaults, **options}

    def build(self, arch: dict, likelihood: dict, stats: dict) -> PosteriorModel:
        """The model of this method on the architecture `arch` (training.architectures)."""
        arch = {**arch, **self.arch_options(arch)}
        return model_type(self.name, arch)(arch, likelihood, stats)

    def arch_options(self, arch: dict) -> dict[str, Any]:
        """What the method adds to the architecture config (its model's arch keys)."""
        return {}

    def train(
        self, model: PosteriorModel, train: Dataset, val: Dataset | None, options: FitOptions
    ) -> FitResult:
        """Gradient training on NLL + penalty; methods with other samplers override this."""
        return fit(model, train, val, options)


class MCDropout(Method):
    """MC dropout (Gal & Ghahramani 2016): dropout stays on at prediction time."""

    name = "mc_dropout"
    help = "MC dropout: dropout kept on at prediction time (Gal & Ghahramani 2016)"
    defaults: ClassVar[dict[str, Any]] = {
        "dropout": 0.05,
        "prior_lengthscale": 1e-2,
        "input_dropout": False,
    }

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        d = cls.defaults
        group.add_argument(
            "--dropout",
            type=float,
            metavar="P",
            help=f"dropout rate of the hidden layers (default: {d['dropout']})",
        )
        group.add_argument(
            "--prior-lengthscale",
            type=float,
            metavar="L",
            help="prior length-scale l; the weight decay is l^2 (1-p) / 2N "
            f"(default: {d['prior_lengthscale']})",
        )
        group.add_argument(
            "--input-dropout",
            action=argparse.BooleanOptionalAction,
            help="also drop input features, as Gal's UCI code does (default: off)",
        )

    def __init__(self, **options: Any):
        super().__init__(**options)
        if not 0 <= self.options["dropout"] < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.options['dropout']}")
        if self.options["prior_lengthscale"] < 0:
            raise ValueError("the prior length-scale must be >= 0")

    def arch_options(self, arch: dict) -> dict[str, Any]:
        keys = ("dropout", "input_dropout", "prior_lengthscale")
        return {key: self.options[key] for key in keys}


METHODS: dict[str, type[Method]] = {MCDropout.name: MCDropout}


def get_method(name: str, **options: Any) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name](**options)


# The other methods (variational, ensemble, sgld, sghmc, laplace) add themselves to METHODS
# when imported, so they are imported last.
import training.posteriors.methods  # noqa: E402, F401
